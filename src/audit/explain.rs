//! `egret explain`: which rule allows or blocks one flow, and why.
//!
//! The decision is the evaluator's, from the policy alone, so it works
//! without privileges. For a host name it also says which patterns match,
//! what the name resolves to now (asked of the policy's DNS guard when it
//! answers the name, else of this host's resolver), and, when the kernel can
//! be read, which addresses the guard has put in the rules' sets and for how long.

use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Result;
use serde::Serialize;

use super::evaluate::{evaluate_with, near_misses, Attempt, Decision, Outcome};
use super::simulate::destination;
use crate::dns::guard::GuardConfig;
use crate::policy::{Policy, Via};
use crate::ruleset::Field;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Ip(IpAddr),
    Name(String),
}

/// `10.0.0.1`, `10.0.0.1:443`, `2001:db8::1`, `[2001:db8::1]:443`, `example.org`, `example.org:443`.
pub fn parse_target(s: &str) -> Result<(Target, Option<u16>), String> {
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
    };
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, after) = rest
            .split_once(']')
            .ok_or("an IPv6 address in brackets needs the closing ']'")?;
        let ip: Ipv6Addr = ip
            .parse()
            .map_err(|_| format!("{ip:?} is not an IPv6 address"))?;
        let p = match after.strip_prefix(':') {
            Some(p) => Some(port(p)?),
            None if after.is_empty() => None,
            None => return Err(format!("unexpected {after:?} after ']'")),
        };
        return Ok((Target::Ip(IpAddr::V6(ip)), p));
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok((Target::Ip(ip), None));
    }
    let (host, p) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(port(p)?)),
        None => (s, None),
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok((Target::Ip(ip), p));
    }
    let name = crate::policy::HostPattern::parse(host)
        .map_err(|e| format!("{host:?} is neither an address nor a host name: {e}"))?
        .to_string();
    if name.contains('*') {
        return Err("give one name, not a pattern".into());
    }
    Ok((Target::Name(name), p))
}

/// An address the guard holds in a rule's set, with the milliseconds it has left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LiveElement {
    pub rule: String,
    pub ip: IpAddr,
    pub ms_left: u64,
}

/// The elements of every `h_<rule>_v4/v6` set in the live table.
pub fn live_host_sets() -> Result<Vec<LiveElement>> {
    let mut nft = crate::kernel::nft::Nftables::open()?;
    let Some(rs) = nft.read()? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for set in rs.sets.iter().filter(|s| s.timeout) {
        let Some(rule) = set
            .name
            .strip_prefix("h_")
            .and_then(|n| n.strip_suffix("_v4").or_else(|| n.strip_suffix("_v6")))
        else {
            continue;
        };
        for (e, ms_left) in nft.timed_elements(set)? {
            let Some(&v) = e.key.first() else { continue };
            let ip = match set.key.first() {
                Some(Field::Ipv4) => IpAddr::V4(Ipv4Addr::from(v as u32)),
                Some(Field::Ipv6) => IpAddr::V6(Ipv6Addr::from(v)),
                _ => continue,
            };
            out.push(LiveElement {
                rule: rule.to_string(),
                ip,
                ms_left,
            });
        }
    }
    Ok(out)
}

/// What a name resolved to when explain asked, and who answered.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    pub addresses: Vec<IpAddr>,
    /// `dns-guard` or `resolver`.
    pub by: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct PatternMatch {
    pub rule: String,
    pub pattern: String,
    /// `any` (kernel sets and proxy) or `proxy` (proxy only).
    pub via: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct AddressAnswer {
    pub ip: IpAddr,
    /// Who maps the name to it now: `dns-guard` or `resolver` (asked now),
    /// `h_<rule>` (in the guard's set in the kernel).
    pub sources: Vec<String>,
    pub decision: Decision,
}

#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub flow: String,
    pub mode: String,
    /// For a name: does the DNS guard answer it (`None`: no `[dns]`).
    pub dns_guard_answers: Option<bool>,
    pub patterns: Vec<PatternMatch>,
    pub addresses: Vec<AddressAnswer>,
    /// The decision by name alone (for a name), or for the address.
    pub decision: Decision,
    /// Live kernel facts were read (false without privileges or table).
    pub live: bool,
    /// When not allowed: rules that almost allow it, and what is missing.
    pub near_misses: Vec<NearMiss>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NearMiss {
    pub rule: String,
    pub missing: String,
}

fn near(
    policy: &Policy,
    flow: &Attempt,
    decision: &Decision,
    in_set: &dyn Fn(&str, IpAddr) -> bool,
) -> Vec<NearMiss> {
    if decision.outcome == Outcome::Allowed {
        return Vec::new();
    }
    near_misses(policy, flow, in_set)
        .into_iter()
        .map(|(rule, missing)| NearMiss { rule, missing })
        .collect()
}

impl Explanation {
    /// Allowed by name and at every address considered.
    pub fn allowed(&self) -> bool {
        self.decision.outcome == Outcome::Allowed
            && self
                .addresses
                .iter()
                .all(|a| a.decision.outcome == Outcome::Allowed)
    }
}

pub fn explain(
    policy: &Policy,
    target: &Target,
    base: &Attempt,
    resolved: &Resolved,
    live: Option<&[LiveElement]>,
) -> Explanation {
    let elements = live.unwrap_or_default();
    let in_set = |rule: &str, ip: IpAddr| elements.iter().any(|e| e.rule == rule && e.ip == ip);
    match target {
        Target::Ip(ip) => {
            let flow = Attempt {
                dst: Some(*ip),
                ..base.clone()
            };
            let decision = evaluate_with(policy, &flow, &in_set);
            Explanation {
                flow: destination(&flow),
                mode: policy.mode.to_string(),
                dns_guard_answers: None,
                patterns: Vec::new(),
                addresses: Vec::new(),
                near_misses: near(policy, &flow, &decision, &in_set),
                decision,
                live: live.is_some(),
            }
        }
        Target::Name(name) => {
            let guard = GuardConfig::from_policy(policy);
            let patterns = policy
                .rules
                .iter()
                .flat_map(|r| {
                    r.hosts
                        .iter()
                        .filter(|p| p.matches(name))
                        .map(|p| PatternMatch {
                            rule: r.name.clone(),
                            pattern: p.to_string(),
                            via: if r.via == Via::Proxy { "proxy" } else { "any" },
                        })
                })
                .collect();
            let named = Attempt {
                dst: None,
                domain: Some(name.clone()),
                ..base.clone()
            };
            let mut ips: Vec<(IpAddr, Vec<String>)> = Vec::new();
            let mut note = |ip: IpAddr, source: String| match ips.iter_mut().find(|(i, _)| *i == ip)
            {
                Some((_, s)) => s.push(source),
                None => ips.push((ip, vec![source])),
            };
            for &ip in &resolved.addresses {
                note(ip, resolved.by.to_string());
            }
            // The sets hold addresses of every name a rule allows; only the
            // rules whose patterns match this name are relevant.
            for e in elements {
                let rule = policy.rules.iter().find(|r| r.name == e.rule);
                if rule.is_some_and(|r| r.allows_host(name)) {
                    note(e.ip, format!("h_{} ({} s left)", e.rule, e.ms_left / 1000));
                }
            }
            ips.sort();
            let addresses = ips
                .into_iter()
                .map(|(ip, sources)| {
                    let flow = Attempt {
                        dst: Some(ip),
                        ..named.clone()
                    };
                    AddressAnswer {
                        ip,
                        sources,
                        decision: evaluate_with(policy, &flow, &in_set),
                    }
                })
                .collect();
            let decision = evaluate_with(policy, &named, &in_set);
            Explanation {
                flow: destination(&named),
                mode: policy.mode.to_string(),
                dns_guard_answers: guard.map(|g| g.allows(name)),
                patterns,
                addresses,
                near_misses: near(policy, &named, &decision, &in_set),
                decision,
                live: live.is_some(),
            }
        }
    }
}

fn decision_line(d: &Decision) -> String {
    let by = match d.outcome {
        Outcome::Allowed => "allowed by",
        Outcome::WouldBlock => "would be blocked (audit: logged, let through) by",
        Outcome::Blocked => "blocked by",
    };
    format!("{by} rule {}: {}", d.rule, d.why)
}

pub fn render(e: &Explanation) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "flow: {} (policy mode {})", e.flow, e.mode);
    match e.dns_guard_answers {
        Some(true) => {
            let _ = writeln!(out, "DNS guard: answers this name");
        }
        Some(false) => {
            let _ = writeln!(
                out,
                "DNS guard: refuses this name (no rule's hosts match it)"
            );
        }
        None => {}
    }
    for p in &e.patterns {
        let via = if p.via == "proxy" {
            " (via proxy only)"
        } else {
            ""
        };
        let _ = writeln!(out, "host pattern: {} in rule {}{via}", p.pattern, p.rule);
    }
    let _ = writeln!(out, "{}", decision_line(&e.decision));
    for m in &e.near_misses {
        let _ = writeln!(out, "  almost: rule {}: {}", m.rule, m.missing);
    }
    for a in &e.addresses {
        let _ = writeln!(
            out,
            "  {} [{}]: {}",
            a.ip,
            a.sources.join(", "),
            decision_line(&a.decision)
        );
    }
    if !e.live {
        let _ = writeln!(
            out,
            "(the DNS guard's live sets were not read: egret's table is not loaded here, or reading it needs CAP_NET_ADMIN)"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::evaluate::IPPROTO_TCP;

    #[test]
    fn targets_parse_in_every_form() {
        let ip = |s: &str| Target::Ip(s.parse().unwrap());
        assert_eq!(parse_target("10.0.0.1").unwrap(), (ip("10.0.0.1"), None));
        assert_eq!(
            parse_target("10.0.0.1:443").unwrap(),
            (ip("10.0.0.1"), Some(443))
        );
        assert_eq!(
            parse_target("2001:db8::1").unwrap(),
            (ip("2001:db8::1"), None)
        );
        assert_eq!(
            parse_target("[2001:db8::1]:53").unwrap(),
            (ip("2001:db8::1"), Some(53))
        );
        assert_eq!(
            parse_target("API.Example.org:8443").unwrap(),
            (Target::Name("api.example.org".into()), Some(8443))
        );
        for bad in ["[2001:db8::1", "x.org:0", "x.org:http", "*.x.org", "a..b"] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_name_is_explained_by_pattern_resolver_and_live_set() {
        let p = crate::policy::parse_str(
            "[dns]\nupstream = [\"192.0.2.53\"]\n[[allow]]\nname = \"web\"\nhosts = [\"*.example.org\"]\nports = [443]\n[[allow]]\nname = \"other\"\nhosts = [\"other.test\"]\nports = [443]\n",
            std::path::Path::new("p.toml"),
            &crate::policy::NoAccounts,
        )
        .unwrap();
        let base = Attempt {
            protocol: IPPROTO_TCP,
            port: Some(443),
            ..Attempt::default()
        };
        let live = vec![
            LiveElement {
                rule: "web".into(),
                ip: "192.0.2.7".parse().unwrap(),
                ms_left: 42_000,
            },
            LiveElement {
                rule: "other".into(),
                ip: "192.0.2.99".parse().unwrap(),
                ms_left: 1_000,
            },
        ];
        let target = Target::Name("api.example.org".into());
        let resolved = Resolved {
            addresses: vec!["192.0.2.7".parse().unwrap(), "2001:db8::7".parse().unwrap()],
            by: "dns-guard",
        };
        let e = explain(&p, &target, &base, &resolved, Some(&live));
        assert!(e.allowed());
        assert_eq!(e.dns_guard_answers, Some(true));
        assert_eq!(e.patterns[0].pattern, "*.example.org");
        let text = render(&e);
        assert!(
            text.contains("192.0.2.7 [dns-guard, h_web (42 s left)]: allowed by rule web"),
            "{text}"
        );
        assert!(
            !text.contains("192.0.2.99"),
            "another rule's addresses: {text}"
        );

        // An address alone: allowed while the guard holds it in web's set.
        let ip = Target::Ip("192.0.2.7".parse().unwrap());
        let none = Resolved::default();
        let e = explain(&p, &ip, &base, &none, Some(&live));
        assert_eq!(e.decision.rule, "web");
        let e = explain(&p, &ip, &base, &none, None);
        assert_eq!(e.decision.outcome, Outcome::Blocked);
        assert!(render(&e).contains("live sets were not read"));

        let e = explain(&p, &Target::Name("evil.test".into()), &base, &none, None);
        assert_eq!(e.dns_guard_answers, Some(false));
        assert!(!e.allowed());
    }
}
