//! The recorded flows: incidents from the store, read back from their ECS
//! documents into what `suggest` and `simulate` need.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use serde_json::Value;

use super::evaluate::{Flow, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};
use crate::monitor::store::Store;

/// What an incident was about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A packet the ruleset logged.
    Packet,
    /// A DNS query the guard refused (or would have): the name asked.
    DnsQuery { name: String },
    /// A request the egress proxy refused.
    Proxy { host: String, port: u16 },
}

/// One incident: a flow (or query, or proxy request) and how often it was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub kind: Kind,
    /// `event.action`: blocked, would-block, dns-refused, ...
    pub action: String,
    /// `rule.name`: the rule that logged it (`default`, `dns-bypass`, a
    /// rule in per-rule audit mode, ...).
    pub rule: String,
    pub flow: Flow,
    pub executable: Option<String>,
    pub user_name: Option<String>,
    pub count: u64,
    /// RFC 3339, as stored.
    pub first_seen: String,
    pub last_seen: String,
}

fn text(doc: &Value, pointer: &str) -> Option<String> {
    match doc.pointer(pointer)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn number<T: std::str::FromStr>(doc: &Value, pointer: &str) -> Option<T> {
    text(doc, pointer)?.parse().ok()
}

fn protocol_number(transport: &str) -> Option<u8> {
    Some(match transport {
        "tcp" => IPPROTO_TCP,
        "udp" => IPPROTO_UDP,
        "icmp" => IPPROTO_ICMP,
        "ipv6-icmp" => IPPROTO_ICMPV6,
        other => other.parse().ok()?,
    })
}

/// Reads one stored document; `None` for documents that are not incidents.
pub fn from_doc(doc: &Value) -> Option<Recorded> {
    let action = text(doc, "/event/action")?;
    // A flood folds many destinations: no one flow to learn from.
    if action == "flood" {
        return None;
    }
    let kind = if let Some(name) = text(doc, "/dns/question/name") {
        Kind::DnsQuery { name }
    } else if doc.pointer("/http").is_some() {
        Kind::Proxy {
            host: text(doc, "/destination/domain").or_else(|| text(doc, "/destination/ip"))?,
            port: number(doc, "/destination/port")?,
        }
    } else {
        Kind::Packet
    };
    let protocol = number(doc, "/network/iana_number")
        .or_else(|| protocol_number(&text(doc, "/network/transport")?))
        .unwrap_or(0);
    let flow = Flow {
        dst: number(doc, "/destination/ip"),
        protocol,
        port: number(doc, "/destination/port"),
        icmp_type: number(doc, "/egret/icmp/type"),
        uid: number(doc, "/user/id"),
        gid: number(doc, "/user/group/id"),
        cgroup: text(doc, "/egret/cgroup"),
        unit: text(doc, "/egret/unit"),
        domain: text(doc, "/destination/domain").map(|d| d.to_ascii_lowercase()),
    };
    Some(Recorded {
        kind,
        action,
        rule: text(doc, "/rule/name").unwrap_or_else(|| "default".into()),
        flow,
        executable: text(doc, "/process/executable"),
        user_name: text(doc, "/user/name"),
        count: number(doc, "/egret/count").unwrap_or(1),
        first_seen: text(doc, "/egret/first_seen").unwrap_or_default(),
        last_seen: text(doc, "/egret/last_seen").unwrap_or_default(),
    })
}

/// The incidents in `state_dir`'s store seen within `since`; an empty list
/// when there is no store yet.
pub fn load(state_dir: &Path, since: Duration) -> Result<Vec<Recorded>> {
    let Some(store) = Store::open_read_only(state_dir)? else {
        return Ok(Vec::new());
    };
    let from = SystemTime::now().checked_sub(since).unwrap_or(UNIX_EPOCH);
    Ok(store
        .incident_docs(from)?
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|d| from_doc(&d))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::attribution::{Attribution, Method, Process};
    use crate::monitor::event;
    use crate::monitor::event::{ResolvedName, Subject};
    use crate::monitor::incident::Aggregator;
    use crate::monitor::nflog::Verdict;
    use crate::monitor::packet::{Flow as Packet, L4};

    #[test]
    fn an_incident_document_reads_back_into_the_flow_it_was() {
        let mut agg = Aggregator::new(1);
        let packet = Packet {
            src: "2001:db8::2".parse().unwrap(),
            dst: "2001:db8::7".parse().unwrap(),
            protocol: 17,
            l4: L4::Ports {
                src: 5000,
                dst: 123,
            },
        };
        let who = Attribution {
            method: Method::SockDiagProc,
            uid: Some(998),
            gid: Some(997),
            user_name: Some("chrony".into()),
            cgroup: Some("/system.slice/chrony.service".into()),
            unit: Some("chrony.service".into()),
            process: Some(Process {
                pid: 7,
                name: Some("chronyd".into()),
                executable: Some("/usr/sbin/chronyd".into()),
                command_line: None,
                parent_pid: None,
                parent_name: None,
            }),
            ..Attribution::unknown()
        };
        let resolved = ResolvedName {
            name: "ntp.example.org".into(),
            asked_by: None,
        };
        let verdict = Verdict {
            blocked: false,
            rule: Some("chrony".into()),
        };
        let at = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let inc = agg
            .record(crate::monitor::incident::Observation {
                verdict: &verdict,
                subject: Subject::Packet(Some(packet)),
                attribution: &who,
                resolved: Some(&resolved),
                at,
            })
            .unwrap()
            .clone();
        let r = from_doc(&event::incident(&inc, false, "h")).unwrap();
        assert_eq!(r.kind, Kind::Packet);
        assert_eq!(
            (r.action.as_str(), r.rule.as_str()),
            ("would-block", "chrony")
        );
        assert_eq!(
            r.flow,
            Flow {
                dst: Some("2001:db8::7".parse().unwrap()),
                protocol: 17,
                port: Some(123),
                icmp_type: None,
                uid: Some(998),
                gid: Some(997),
                cgroup: Some("/system.slice/chrony.service".into()),
                unit: Some("chrony.service".into()),
                domain: Some("ntp.example.org".into()),
            }
        );
        assert_eq!(r.executable.as_deref(), Some("/usr/sbin/chronyd"));
        assert_eq!(r.count, 1);
        assert_eq!(r.first_seen, "2027-01-15T08:00:00.000Z");
    }
}
