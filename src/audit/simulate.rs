//! `egret simulate`: the recorded flows replayed against a candidate policy.
//! Pure: the report is a function of the policy and the flows.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use super::evaluate::{evaluate, Attempt, Outcome};
use super::recorded::{Kind, Recorded};
use crate::dns::guard::GuardConfig;
use crate::monitor::packet::transport_name;
use crate::policy::Policy;

/// Flows of one outcome under one rule.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Group {
    pub outcome: Outcome,
    /// The deciding rule (for DNS queries: `dns-guard`; for proxy requests: `proxy`).
    pub rule: String,
    pub packets: u64,
    pub incidents: u64,
    pub flows: Vec<Line>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Line {
    pub who: String,
    pub destination: String,
    pub packets: u64,
    pub incidents: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Tally {
    pub packets: u64,
    pub incidents: u64,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Totals {
    pub allowed: Tally,
    pub would_block: Tally,
    pub blocked: Tally,
    /// Proxy requests (the proxy decides those itself; see docs/audit.md).
    pub not_simulated: Tally,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Report {
    pub groups: Vec<Group>,
    pub totals: Totals,
}

impl Report {
    /// Would the candidate keep any recorded flow from being allowed?
    pub fn anything_not_allowed(&self) -> bool {
        self.totals.blocked.incidents + self.totals.would_block.incidents > 0
    }
}

pub fn who(r: &Recorded) -> String {
    let user = r
        .user_name
        .clone()
        .or_else(|| r.flow.uid.map(|u| format!("uid {u}")));
    let mut parts = Vec::new();
    if let Some(u) = &r.flow.unit {
        parts.push(u.clone());
    }
    if let Some(e) = &r.executable {
        parts.push(e.clone());
    }
    match (parts.is_empty(), user) {
        (true, Some(u)) => format!("user {u}"),
        (true, None) => "unknown sender".into(),
        (false, Some(u)) => format!("{} (user {u})", parts.join(" ")),
        (false, None) => parts.join(" "),
    }
}

pub fn destination(flow: &Attempt) -> String {
    let ip = match flow.dst {
        Some(std::net::IpAddr::V6(v6)) if flow.port.is_some() => format!("[{v6}]"),
        Some(ip) => ip.to_string(),
        None => "?".into(),
    };
    let host = match &flow.domain {
        Some(d) => format!("{d} {ip}"),
        None => ip,
    };
    match flow.port {
        Some(p) => format!("{host}:{p}/{}", transport_name(flow.protocol)),
        None => format!("{host}/{}", transport_name(flow.protocol)),
    }
}

pub fn simulate(policy: &Policy, recorded: &[Recorded]) -> Report {
    let guard = GuardConfig::from_policy(policy);
    let mut groups: BTreeMap<(Outcome, String), BTreeMap<(String, String), Tally>> =
        BTreeMap::new();
    let mut totals = Totals::default();
    for r in recorded {
        let (outcome, rule, dest) = match &r.kind {
            Kind::Packet => {
                let d = evaluate(policy, &r.flow);
                (Some(d.outcome), d.rule, destination(&r.flow))
            }
            Kind::DnsQuery { name } => {
                let dest = format!("{name} (DNS query)");
                match &guard {
                    // Without a guard the name is resolved elsewhere, and the
                    // connection that follows is what the ruleset decides.
                    None => (Some(Outcome::Allowed), "no-dns-guard".into(), dest),
                    Some(g) => match g.matching(name).into_iter().next() {
                        Some(rule) => (Some(Outcome::Allowed), rule, dest),
                        None if g.audit => (
                            Some(Outcome::WouldBlock),
                            crate::ruleset::DNS_GUARD_RULE.into(),
                            dest,
                        ),
                        None => (
                            Some(Outcome::Blocked),
                            crate::ruleset::DNS_GUARD_RULE.into(),
                            dest,
                        ),
                    },
                }
            }
            Kind::Proxy { host, port } => (None, "proxy".into(), format!("{host}:{port} (proxy)")),
        };
        let tally = match outcome {
            Some(Outcome::Allowed) => &mut totals.allowed,
            Some(Outcome::WouldBlock) => &mut totals.would_block,
            Some(Outcome::Blocked) => &mut totals.blocked,
            None => {
                totals.not_simulated.packets += r.count;
                totals.not_simulated.incidents += 1;
                continue;
            }
        };
        tally.packets += r.count;
        tally.incidents += 1;
        let Some(outcome) = outcome else { continue };
        let line = groups
            .entry((outcome, rule))
            .or_default()
            .entry((who(r), dest))
            .or_default();
        line.packets += r.count;
        line.incidents += 1;
    }
    let groups = groups
        .into_iter()
        .map(|((outcome, rule), lines)| {
            let mut flows: Vec<Line> = lines
                .into_iter()
                .map(|((who, destination), t)| Line {
                    who,
                    destination,
                    packets: t.packets,
                    incidents: t.incidents,
                })
                .collect();
            flows.sort_by(|a, b| {
                b.packets
                    .cmp(&a.packets)
                    .then_with(|| (&a.who, &a.destination).cmp(&(&b.who, &b.destination)))
            });
            Group {
                outcome,
                rule,
                packets: flows.iter().map(|f| f.packets).sum(),
                incidents: flows.iter().map(|f| f.incidents).sum(),
                flows,
            }
        })
        .collect();
    Report { groups, totals }
}

pub fn render(report: &Report) -> String {
    use crate::text::printable;
    let mut out = String::new();
    for g in &report.groups {
        let _ = writeln!(
            out,
            "{:<12} {:<28} {:>8} packet(s) {:>6} incident(s)",
            g.outcome.as_str(),
            printable(&g.rule),
            g.packets,
            g.incidents
        );
        for f in &g.flows {
            let _ = writeln!(
                out,
                "    {:>8}  {} → {}",
                f.packets,
                printable(&f.who),
                printable(&f.destination)
            );
        }
    }
    let t = &report.totals;
    let _ = writeln!(
        out,
        "totals: allowed {} packet(s) in {} incident(s); would-block {} in {}; blocked {} in {}; not simulated (proxy) {} in {}",
        t.allowed.packets,
        t.allowed.incidents,
        t.would_block.packets,
        t.would_block.incidents,
        t.blocked.packets,
        t.blocked.incidents,
        t.not_simulated.packets,
        t.not_simulated.incidents
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::evaluate::{IPPROTO_TCP, IPPROTO_UDP};

    fn rec(kind: Kind, flow: Attempt, count: u64) -> Recorded {
        Recorded {
            kind,
            action: "would-block".into(),
            rule: "default".into(),
            flow,
            executable: Some("/usr/bin/curl".into()),
            user_name: Some("nobody".into()),
            count,
            first_seen: String::new(),
            last_seen: String::new(),
            host: None,
        }
    }

    fn flow(dst: &str, protocol: u8, port: u16, domain: Option<&str>) -> Attempt {
        Attempt {
            dst: Some(dst.parse().unwrap()),
            protocol,
            port: Some(port),
            domain: domain.map(str::to_string),
            ..Attempt::default()
        }
    }

    fn policy(text: &str) -> Policy {
        crate::policy::parse_str(
            text,
            std::path::Path::new("c.toml"),
            &crate::policy::NoAccounts,
        )
        .unwrap()
    }

    #[test]
    fn groups_by_outcome_and_rule_with_totals() {
        let p = policy(
            r#"
[dns]
upstream = ["192.0.2.53"]
[[allow]]
name = "web"
hosts = ["*.example.test"]
ports = ["440-449"]
[[allow]]
name = "v6"
cidrs = ["2001:db8::/32"]
protocol = "udp"
"#,
        );
        let recorded = vec![
            rec(
                Kind::Packet,
                flow("10.1.0.10", IPPROTO_TCP, 443, Some("a.example.test")),
                5,
            ),
            rec(
                Kind::Packet,
                flow("10.1.0.10", IPPROTO_TCP, 450, Some("a.example.test")),
                2,
            ),
            rec(Kind::Packet, flow("2001:db8::1", IPPROTO_UDP, 123, None), 1),
            rec(Kind::Packet, flow("2001:db8::1", IPPROTO_TCP, 123, None), 1),
            rec(Kind::Packet, flow("192.0.2.1", IPPROTO_UDP, 53, None), 4),
            rec(
                Kind::DnsQuery {
                    name: "b.example.test".into(),
                },
                Attempt::default(),
                1,
            ),
            rec(
                Kind::DnsQuery {
                    name: "evil.test".into(),
                },
                Attempt::default(),
                3,
            ),
            rec(
                Kind::Proxy {
                    host: "x.test".into(),
                    port: 443,
                },
                Attempt::default(),
                1,
            ),
        ];
        let r = simulate(&p, &recorded);
        let summary: Vec<(Outcome, &str, u64, u64)> = r
            .groups
            .iter()
            .map(|g| (g.outcome, g.rule.as_str(), g.packets, g.incidents))
            .collect();
        assert_eq!(
            summary,
            [
                (Outcome::Allowed, "v6", 1, 1),
                (Outcome::Allowed, "web", 6, 2),
                (Outcome::Blocked, "default", 3, 2),
                (Outcome::Blocked, "dns-bypass", 4, 1),
                (Outcome::Blocked, "dns-guard", 3, 1),
            ]
        );
        assert_eq!(
            r.totals.allowed,
            Tally {
                packets: 7,
                incidents: 3
            }
        );
        assert_eq!(
            r.totals.blocked,
            Tally {
                packets: 10,
                incidents: 4
            }
        );
        assert_eq!(
            r.totals.not_simulated,
            Tally {
                packets: 1,
                incidents: 1
            }
        );
        assert!(r.anything_not_allowed());
        let text = render(&r);
        assert!(
            text.contains("/usr/bin/curl (user nobody) → a.example.test 10.1.0.10:450/tcp"),
            "{text}"
        );
        assert!(text.contains("[2001:db8::1]:123/tcp"), "{text}");

        let fixed = policy(
            r#"
mode = "audit"
[[allow]]
name = "all"
cidrs = ["0.0.0.0/0", "::/0"]
protocol = "any"
"#,
        );
        let r = simulate(&fixed, &recorded[..4]);
        assert!(!r.anything_not_allowed(), "{r:?}");
    }
}
