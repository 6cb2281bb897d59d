//! `egret check --lint`: rules that are probably mistakes. Warnings, never
//! errors: a policy with lint warnings is still valid.
//!
//! Shadowing is judged conservatively: a rule is reported only when an
//! earlier rule certainly allows every flow it allows (so its own allow rule
//! can never decide a packet). "Unused" needs the live per-rule counters.

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::Serialize;

use crate::policy::{AllowRule, HostPattern, Policy, Via};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    pub rule: String,
    /// `shadowed`, `allows-everything`, `broad-host`, `unused`.
    pub kind: &'static str,
    pub message: String,
}

/// Second-level labels under which registrations are sold (`co.uk`,
/// `com.au`, ...): a pattern whose fixed part is one of these, or a bare
/// top-level domain, allows names of unrelated owners.
const SECOND_LEVEL_SUFFIXES: &[&str] = &[
    "ac", "co", "com", "edu", "gov", "ltd", "ne", "net", "or", "org", "plc",
];

fn hosts_active(r: &AllowRule, policy: &Policy) -> bool {
    !r.hosts.is_empty() && (policy.dns.is_some() || policy.proxy.is_some())
}

fn dest_any(r: &AllowRule) -> bool {
    (r.cidrs.is_empty() && r.hosts.is_empty())
        || (r.via == Via::Any
            && r.cidrs
                .iter()
                .any(|c| matches!(c, IpNet::V4(n) if n.prefix_len() == 0))
            && r.cidrs
                .iter()
                .any(|c| matches!(c, IpNet::V6(n) if n.prefix_len() == 0)))
}

/// Does pattern `a` match every name `b` matches?
fn pattern_covers(a: &HostPattern, b: &HostPattern) -> bool {
    let (a_text, b_text) = (a.to_string(), b.to_string());
    if a_text == b_text || (!b_text.contains('*') && a.matches(&b_text)) {
        return true;
    }
    // `*.s` covers anything strictly under `s`, wildcards included.
    match a_text.strip_prefix("*.") {
        Some(suffix) if !suffix.contains('*') => b_text.ends_with(&format!(".{suffix}")),
        _ => false,
    }
}

fn subset<T: PartialEq>(inner: &[T], outer: &[T]) -> bool {
    outer.is_empty() || (!inner.is_empty() && inner.iter().all(|x| outer.contains(x)))
}

/// Does `earlier` allow every flow `later` allows?
fn covers(earlier: &AllowRule, later: &AllowRule, policy: &Policy) -> bool {
    let destinations = dest_any(earlier)
        || (!dest_any(later)
            // Proxy-only cidrs do not cover direct ones.
            && (later.cidrs.is_empty() || earlier.via == Via::Any || later.via == Via::Proxy)
            && later
                .cidrs
                .iter()
                .all(|c| earlier.cidrs.iter().any(|e| e.contains(c)))
            && later.hosts.iter().all(|h| {
                hosts_active(later, policy)
                    && earlier.via == later.via
                    && earlier.hosts.iter().any(|e| pattern_covers(e, h))
            }));
    let protocols = if earlier.ports.is_empty() {
        earlier.protocols.is_empty()
            || (!later.protocols.is_empty()
                && later
                    .protocols
                    .iter()
                    .all(|p| earlier.protocols.contains(p)))
    } else {
        !later.ports.is_empty()
            && !later.protocols.is_empty()
            && later
                .protocols
                .iter()
                .all(|p| earlier.protocols.contains(p))
            && later.ports.iter().all(|l| {
                earlier
                    .ports
                    .iter()
                    .any(|e| e.first <= l.first && l.last <= e.last)
            })
    };
    destinations
        && protocols
        && subset(&later.users, &earlier.users)
        && subset(&later.groups, &earlier.groups)
        && subset(&later.units, &earlier.units)
}

fn broad(p: &HostPattern) -> Option<String> {
    let text = p.to_string();
    if !text.contains('*') {
        return None;
    }
    let fixed: Vec<&str> = text.rsplit('.').take_while(|l| *l != "*").collect();
    let too_broad = fixed.len() < 2
        || (fixed.len() == 2 && SECOND_LEVEL_SUFFIXES.contains(&fixed[1]) && fixed[0].len() == 2);
    too_broad.then(|| {
        let fixed: Vec<&str> = fixed.into_iter().rev().collect();
        format!(
            "host pattern {text} allows names under {}, which anyone can register under",
            fixed.join(".")
        )
    })
}

/// `hits`: packets each rule's allow rules counted in the live table, when
/// it could be read (rules missing from it are not judged).
pub fn lint(policy: &Policy, hits: Option<&BTreeMap<String, u64>>) -> Vec<Warning> {
    let mut out = Vec::new();
    for (j, later) in policy.rules.iter().enumerate() {
        if let Some(earlier) = policy.rules[..j].iter().find(|e| covers(e, later, policy)) {
            out.push(Warning {
                rule: later.name.clone(),
                kind: "shadowed",
                message: format!(
                    "every flow it allows is already allowed by rule {} (line {}), which comes first",
                    earlier.name, earlier.origin.line
                ),
            });
        }
        if dest_any(later) && later.ports.is_empty() && !later.has_subject() {
            out.push(Warning {
                rule: later.name.clone(),
                kind: "allows-everything",
                message: "allows every destination on every port to every sender; egress is not filtered for its protocols".into(),
            });
        }
        for p in &later.hosts {
            if let Some(message) = broad(p) {
                out.push(Warning {
                    rule: later.name.clone(),
                    kind: "broad-host",
                    message,
                });
            }
        }
        if let Some(&0) = hits.and_then(|h| h.get(&later.name)) {
            out.push(Warning {
                rule: later.name.clone(),
                kind: "unused",
                message: "no packet matched it since the ruleset was loaded (kernel counters)"
                    .into(),
            });
        }
    }
    out
}

/// Packets per policy rule from a live ruleset's allow rules (their comment is the rule name).
pub fn hits(rs: &crate::ruleset::Ruleset) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for rule in rs.counted_rules() {
        // An allow rule accepts, or jumps to its novelty chain (which accepts).
        let (
            Some(c),
            Some(name),
            None,
            Some(crate::ruleset::Verdict::Accept | crate::ruleset::Verdict::Jump(_)),
        ) = (&rule.counter, &rule.comment, &rule.log, &rule.verdict)
        else {
            continue;
        };
        *out.entry(name.clone()).or_insert(0) += c.packets;
    }
    out
}

#[cfg(test)]
mod tests;
