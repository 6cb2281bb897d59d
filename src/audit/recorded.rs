//! The recorded flows: incidents from the store, decoded from their ECS
//! documents by the event model, as the flows `suggest` and `simulate` need.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use serde_json::Value;

use super::evaluate::Attempt;
use crate::monitor::event::ecs::{RecordedIncident, RecordedSubject};
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
    pub flow: Attempt,
    pub executable: Option<String>,
    pub user_name: Option<String>,
    pub count: u64,
    /// RFC 3339, as stored.
    pub first_seen: String,
    pub last_seen: String,
    /// `host.name`: the host that recorded it.
    pub host: Option<String>,
}

/// Reads one stored document; `None` for documents that are not incidents
/// about one flow, query or request.
pub fn from_doc(doc: &Value) -> Option<Recorded> {
    let r = RecordedIncident::decode(doc)?;
    let kind = match r.subject {
        RecordedSubject::Packet => Kind::Packet,
        RecordedSubject::DnsQuery { name } => Kind::DnsQuery { name },
        RecordedSubject::ProxyRequest { host, port } => Kind::Proxy { host, port },
    };
    let flow = Attempt {
        dst: r.destination,
        protocol: r.protocol,
        port: r.port,
        icmp_type: r.icmp_type,
        uid: r.uid,
        gid: r.gid,
        cgroup: r.cgroup,
        unit: r.unit,
        // A name becomes a `hosts` entry in a suggestion: never a pattern,
        // whatever a document (perhaps collected from elsewhere) says.
        domain: r
            .domain
            .map(|d| d.to_ascii_lowercase())
            .filter(|d| !d.contains('*') && crate::policy::HostPattern::parse(d).is_ok()),
    };
    Some(Recorded {
        kind,
        action: r.action.as_str().to_string(),
        rule: r.rule,
        flow,
        executable: r.executable,
        user_name: r.user_name,
        count: r.count,
        first_seen: r.first_seen,
        last_seen: r.last_seen,
        host: r.host,
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

/// `--hosts`: shell-style patterns on `host.name` (`web-*`, `db-?`),
/// comma-separated; any one matching selects the host.
#[derive(Debug, Clone)]
pub struct HostGlobs(Vec<glob::Pattern>);

impl HostGlobs {
    pub fn parse(text: &str) -> std::result::Result<HostGlobs, String> {
        let patterns = text
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| glob::Pattern::new(p).map_err(|e| format!("{p:?}: {e}")))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if patterns.is_empty() {
            return Err("no host pattern".into());
        }
        Ok(HostGlobs(patterns))
    }

    pub fn matches(&self, host: &str) -> bool {
        self.0.iter().any(|p| p.matches(host))
    }

    pub fn text(&self) -> String {
        let all: Vec<&str> = self.0.iter().map(glob::Pattern::as_str).collect();
        all.join(",")
    }
}

/// Documents collected from many hosts (`--from`), as `suggest`, `simulate`
/// and `events` take them.
pub struct Fleet {
    /// The incidents of the selected hosts.
    pub recorded: Vec<Recorded>,
    /// Every selected host that sent anything (its heartbeats count: a
    /// host that needed nothing new is still one of the role's hosts).
    pub hosts: std::collections::BTreeSet<String>,
}

/// Selects the hosts and the window; users are taken by name where this
/// host knows the name (see [`local_ids`]).
pub fn from_collected(
    docs: &[Value],
    hosts: Option<&HostGlobs>,
    since: Option<SystemTime>,
    accounts: &dyn crate::policy::Accounts,
) -> Fleet {
    use crate::monitor::event::ecs;
    let mut fleet = Fleet {
        recorded: Vec::new(),
        hosts: Default::default(),
    };
    for doc in docs {
        let host = ecs::host_name(doc).unwrap_or_default();
        if hosts.is_some_and(|h| !h.matches(host)) {
            continue;
        }
        if let Some(since) = since {
            let at = ecs::last_seen_of(doc).and_then(|t| humantime::parse_rfc3339_weak(t).ok());
            if at.is_some_and(|at| at < since) {
                continue;
            }
        }
        // A host name is as long as the collector let it be.
        let host = crate::text::bounded(host, crate::text::NAME_MAX)
            .0
            .to_string();
        fleet.hosts.insert(host.clone());
        if let Some(mut r) = from_doc(doc) {
            r.host = Some(host);
            local_ids(&mut r, accounts);
            fleet.recorded.push(r);
        }
    }
    fleet
}

/// A policy names users, each host maps the names to its own uids: a flow
/// recorded on another host is judged here by its user's name, mapped to
/// this host's uid (the recorded uid when this host does not know the name,
/// or when the record has no name). A syslog record carries only the name.
pub fn local_ids(r: &mut Recorded, accounts: &dyn crate::policy::Accounts) {
    if let Some(uid) = r.user_name.as_deref().and_then(|n| accounts.uid(n)) {
        r.flow.uid = Some(uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::attribution::{Attribution, Method, Process};
    use crate::monitor::event;
    use crate::monitor::event::{ResolvedName, Subject};
    use crate::monitor::incident::Aggregator;
    use crate::monitor::nflog::LoggedVerdict;
    use crate::monitor::packet::{Flow as Packet, L4Header};

    #[test]
    fn an_incident_document_reads_back_into_the_flow_it_was() {
        let mut agg = Aggregator::new(1);
        let packet = Packet {
            src: "2001:db8::2".parse().unwrap(),
            dst: "2001:db8::7".parse().unwrap(),
            protocol: 17,
            l4: L4Header::Ports {
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
            revalidation: None,
        };
        let verdict = LoggedVerdict {
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
            Attempt {
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
