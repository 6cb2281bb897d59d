//! Which rule decides a flow: the compiled ruleset's semantics, in userspace.
//!
//! `simulate`, `explain` and the lints ask this instead of the kernel, so it
//! walks the same order `ruleset::compile` emits: baseline, the DNS guard's
//! rules, the allow rules in file order, per-rule mode overrides, the final
//! log rule. Pure; tested against the compiler's output here and against the
//! kernel in `tests/audit.rs`.
//!
//! What it cannot know: conntrack state (every flow is taken as a new one),
//! which local addresses route over `lo` (only loopback addresses count), and
//! the DNS guard's run-time sets: a flow matches a rule's `hosts` when its
//! `domain` (the name it was resolved from) matches one of the patterns.

use std::net::IpAddr;

use serde::Serialize;

use crate::policy::{AllowRule, Mode, Policy, Via, L4};
use crate::ruleset::DNS_BYPASS_RULE;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// The rule name reported for the baseline and the DNS guard's interception.
pub const BASELINE_RULE: &str = "baseline";
pub const DNS_GUARD_RULE: &str = crate::ruleset::DNS_GUARD_RULE;
pub const DEFAULT_RULE: &str = crate::policy::DEFAULT_RULE;

/// A question for the evaluator: an outbound attempt (the first packet of a
/// flow) and who makes it; `evaluate` answers which rule decides it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Attempt {
    pub dst: Option<IpAddr>,
    /// IANA protocol number.
    pub protocol: u8,
    /// Destination port (TCP, UDP, SCTP).
    pub port: Option<u16>,
    pub icmp_type: Option<u8>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// The sender's cgroup v2 path (`/system.slice/app.service`).
    pub cgroup: Option<String>,
    /// The sender's systemd unit, when the cgroup path is not known.
    pub unit: Option<String>,
    /// The name the DNS guard resolved `dst` from (wire form).
    pub domain: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Allowed,
    /// Logged and let through (audit mode).
    WouldBlock,
    Blocked,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::WouldBlock => "would-block",
            Outcome::Blocked => "blocked",
        }
    }

    fn of_mode(mode: Mode) -> Outcome {
        match mode {
            Mode::Enforce => Outcome::Blocked,
            Mode::Audit => Outcome::WouldBlock,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub outcome: Outcome,
    /// The deciding rule: a policy rule's name, or `baseline`, `dns-guard`,
    /// `dns-bypass`, `default` (the names events carry).
    pub rule: String,
    /// Index into `policy.rules` when a policy rule decided.
    #[serde(skip)]
    pub index: Option<usize>,
    /// The host pattern that matched the flow's domain, for `hosts` rules.
    pub host_pattern: Option<String>,
    pub why: String,
}

impl Decision {
    fn new(outcome: Outcome, rule: &str, why: impl Into<String>) -> Decision {
        Decision {
            outcome,
            rule: rule.to_string(),
            index: None,
            host_pattern: None,
            why: why.into(),
        }
    }
}

/// ICMP types every policy allows (errors); ICMPv6 also neighbour discovery and MLD.
const BASELINE_ICMP: &[u8] = &[3, 11, 12];
const BASELINE_ICMPV6: &[u8] = &[1, 2, 3, 4, 130, 131, 132, 133, 135, 136, 143];

pub fn evaluate(policy: &Policy, flow: &Attempt) -> Decision {
    evaluate_with(policy, flow, &|_, _| false)
}

/// [`evaluate`], with what the DNS guard's sets hold now: `in_host_set(rule,
/// address)` says whether `address` is in the rule's `h_<rule>_v4/v6` set
/// (read from the kernel by `egret explain`).
pub fn evaluate_with(
    policy: &Policy,
    flow: &Attempt,
    in_host_set: &dyn Fn(&str, IpAddr) -> bool,
) -> Decision {
    if let (Some(dst), Some(port), Some(dns)) = (flow.dst, flow.port, &policy.dns) {
        // A local cache behind the guard: only the guard (its mark) may ask it.
        let cache = dns.local_upstream().iter().any(|a| a.port() == port);
        let guard = dns.listen.port() == port && dns.listen.ip() == dst;
        if dst.is_loopback()
            && matches!(flow.protocol, IPPROTO_TCP | IPPROTO_UDP)
            && cache
            && !guard
        {
            return Decision::new(
                Outcome::of_mode(policy.mode),
                DNS_BYPASS_RULE,
                "only the DNS guard may ask its local cache",
            );
        }
    }
    if flow.dst.is_some_and(|d| d.is_loopback()) {
        return Decision::new(Outcome::Allowed, BASELINE_RULE, "loopback");
    }
    if let Some(t) = flow.icmp_type {
        let (proto, types) = match flow.dst {
            Some(IpAddr::V6(_)) => (IPPROTO_ICMPV6, BASELINE_ICMPV6),
            _ => (IPPROTO_ICMP, BASELINE_ICMP),
        };
        if flow.protocol == proto && types.contains(&t) {
            return Decision::new(
                Outcome::Allowed,
                BASELINE_RULE,
                "ICMP errors and neighbour discovery",
            );
        }
    }
    let tcp_or_udp = matches!(flow.protocol, IPPROTO_TCP | IPPROTO_UDP);
    if let (Some(dns), true) = (&policy.dns, tcp_or_udp) {
        if dns.intercept && flow.port == Some(53) {
            return Decision::new(
                Outcome::Allowed,
                DNS_GUARD_RULE,
                "plain DNS is redirected to the DNS guard (intercept = true)",
            );
        }
        let cache_user = dns.cache_user.filter(|_| !dns.local_upstream().is_empty());
        if matches!(flow.port, Some(53 | 853)) && cache_user.is_some() && flow.uid == cache_user {
            return Decision::new(
                Outcome::Allowed,
                DNS_GUARD_RULE,
                "the DNS guard's local cache's user (cache_user) may ask its upstream servers",
            );
        }
        if matches!(flow.port, Some(53 | 853)) {
            return Decision::new(
                Outcome::of_mode(policy.mode),
                DNS_BYPASS_RULE,
                "DNS may only go through the DNS guard",
            );
        }
    }
    let guard = policy.dns.is_some();
    for (index, rule) in policy.rules.iter().enumerate() {
        let Some(pattern) = destination_matches(rule, flow, guard, in_host_set) else {
            continue;
        };
        if service_matches(rule, flow) && subject_matches(rule, flow) {
            let why = match &pattern {
                Some(p) => format!(
                    "{} matches host pattern {p}",
                    flow.domain.as_deref().unwrap_or("")
                ),
                None if rule.cidrs.is_empty() => "the rule allows any destination".to_string(),
                None => "destination in the rule's cidrs".to_string(),
            };
            return Decision {
                index: Some(index),
                host_pattern: pattern,
                ..Decision::new(Outcome::Allowed, &rule.name, why)
            };
        }
    }
    for (index, rule) in policy.rules.iter().enumerate() {
        let Some(mode) = rule.mode.filter(|m| *m != policy.mode) else {
            continue;
        };
        if subject_matches(rule, flow) {
            return Decision {
                index: Some(index),
                ..Decision::new(
                    Outcome::of_mode(mode),
                    &rule.name,
                    format!("no rule allows it; mode = \"{mode}\" for this rule's subject"),
                )
            };
        }
    }
    Decision::new(
        Outcome::of_mode(policy.mode),
        DEFAULT_RULE,
        format!("no rule allows it (policy mode {})", policy.mode),
    )
}

/// Rules that almost allow a flow they do not allow: the destination
/// matches but the protocol/port does not, or destination and port match but
/// the sender is not the rule's. `(rule, what is missing)`, in policy order.
pub fn near_misses(
    policy: &Policy,
    flow: &Attempt,
    in_host_set: &dyn Fn(&str, IpAddr) -> bool,
) -> Vec<(String, String)> {
    let guard = policy.dns.is_some();
    let mut out = Vec::new();
    for rule in &policy.rules {
        if rule.cidrs.is_empty() && rule.hosts.is_empty() {
            // "Any destination" rules would almost-match everything.
            continue;
        }
        if destination_matches(rule, flow, guard, in_host_set).is_none() {
            continue;
        }
        let service = service_matches(rule, flow);
        let subject = subject_matches(rule, flow);
        let missing = match (service, subject) {
            (true, true) => continue,
            (false, _) => format!(
                "the destination matches, but the rule allows only {}",
                services(rule)
            ),
            (true, false) => format!(
                "destination and port match, but the rule is only for {}",
                subjects(rule)
            ),
        };
        out.push((rule.name.clone(), missing));
    }
    out
}

fn services(rule: &AllowRule) -> String {
    let protocols: Vec<&str> = rule
        .protocols
        .iter()
        .map(|p| match p {
            L4::Tcp => "tcp",
            L4::Udp => "udp",
            L4::Icmp => "icmp",
        })
        .collect();
    let protocols = if protocols.is_empty() {
        "any protocol".to_string()
    } else {
        protocols.join("/")
    };
    if rule.ports.is_empty() {
        return protocols;
    }
    let ports: Vec<String> = rule
        .ports
        .iter()
        .map(|r| {
            if r.first == r.last {
                r.first.to_string()
            } else {
                format!("{}-{}", r.first, r.last)
            }
        })
        .collect();
    format!("{protocols} ports {}", ports.join(", "))
}

fn subjects(rule: &AllowRule) -> String {
    let list =
        |what: &str, v: Vec<String>| (!v.is_empty()).then(|| format!("{what} {}", v.join(", ")));
    [
        list("uids", rule.users.iter().map(u32::to_string).collect()),
        list("gids", rule.groups.iter().map(u32::to_string).collect()),
        list("units", rule.units.clone()),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join("; ")
}

/// `None`: the destination does not match. `Some(pattern)`: it matches, by
/// that host pattern or (`None` inside) by CIDR or because the rule names none.
fn destination_matches(
    rule: &AllowRule,
    flow: &Attempt,
    guard: bool,
    in_host_set: &dyn Fn(&str, IpAddr) -> bool,
) -> Option<Option<String>> {
    if rule.cidrs.is_empty() && rule.hosts.is_empty() {
        return Some(None);
    }
    if let Some(dst) = flow.dst {
        // via = "proxy": its cidrs are for the proxy only, never a direct packet.
        if rule.via == Via::Any && rule.cidrs.iter().any(|n| n.contains(&dst)) {
            return Some(None);
        }
    }
    // Without a guard (or with via = "proxy") no address ever enters the host sets.
    if !guard || rule.via != Via::Any {
        return None;
    }
    if let Some(found) = flow
        .domain
        .as_deref()
        .and_then(|d| rule.hosts.iter().find(|p| p.matches(d)))
    {
        return Some(Some(found.to_string()));
    }
    let live = flow.dst.is_some_and(|d| in_host_set(&rule.name, d));
    live.then(|| Some(format!("h_{}_v4/v6", rule.name)))
}

pub fn protocol_numbers(p: L4) -> &'static [u8] {
    match p {
        L4::Tcp => &[IPPROTO_TCP],
        L4::Udp => &[IPPROTO_UDP],
        L4::Icmp => &[IPPROTO_ICMP, IPPROTO_ICMPV6],
    }
}

fn service_matches(rule: &AllowRule, flow: &Attempt) -> bool {
    let protocol_ok = rule.protocols.is_empty() && rule.ports.is_empty()
        || rule
            .protocols
            .iter()
            .any(|&p| protocol_numbers(p).contains(&flow.protocol));
    if !protocol_ok {
        return false;
    }
    if rule.ports.is_empty() {
        return true;
    }
    flow.port
        .is_some_and(|port| rule.ports.iter().any(|r| r.first <= port && port <= r.last))
}

/// Does the flow's sender match the rule's users, groups and units? Unknown
/// facts never match: the kernel knows them, we do not.
pub fn subject_matches(rule: &AllowRule, flow: &Attempt) -> bool {
    let ids = |want: &[u32], have: Option<u32>| {
        want.is_empty() || have.is_some_and(|h| want.contains(&h))
    };
    ids(&rule.users, flow.uid)
        && ids(&rule.groups, flow.gid)
        && (rule.units.is_empty() || rule.units.iter().any(|u| in_unit(u, flow)))
}

/// `socket cgroupv2 level N`: the sender's cgroup or one of its ancestors is
/// the unit's. A bare unit name is found anywhere in the hierarchy; a path is
/// relative to the root.
fn in_unit(unit: &str, flow: &Attempt) -> bool {
    let path = match (&flow.cgroup, &flow.unit) {
        (Some(c), _) => c.as_str(),
        (None, Some(u)) => u.as_str(),
        (None, None) => return false,
    };
    let path = path.trim_matches('/');
    if unit.contains('/') {
        let unit = unit.trim_matches('/');
        path == unit || path.starts_with(&format!("{unit}/"))
    } else {
        path.split('/').any(|c| c == unit)
    }
}

#[cfg(test)]
pub(crate) mod tests;
