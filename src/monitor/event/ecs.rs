//! The event model in Elastic Common Schema: incidents and egret's own
//! events encoded as documents (one JSON object per line on stdout, the same
//! document stored in SQLite), and those documents decoded back. Every ECS
//! field path egret knows is in this file.

use std::net::IpAddr;
use std::time::SystemTime;

use serde_json::{json, Map, Value};

use super::describe::{presentation_name, summary};
use super::{Action, Subject, DEFAULT_RULE};
use crate::monitor::incident::Incident;
use crate::monitor::packet::L4Header;
use crate::policy::{Mode, Severity};

/// The ECS version egret's documents follow (`ecs.version`), checked by
/// tests/ecs.rs against that version's own field list.
pub const ECS_VERSION: &str = "9.4.0";

pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Removes nulls so documents carry only what is known.
fn compact(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let out: Map<String, Value> = map
                .into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, compact(v)))
                .filter(|(_, v)| !matches!(v, Value::Object(m) if m.is_empty()))
                .collect();
            Value::Object(out)
        }
        other => other,
    }
}

/// A short ECS-shaped description of a process, for `egret.dns.asked_by`.
fn asker(a: &crate::monitor::attribution::Attribution) -> Value {
    let p = a.process.as_ref();
    json!({
        "process": p.map(|p| json!({"pid": p.pid, "name": p.name, "executable": p.executable})),
        "user": { "id": a.uid.map(|u| u.to_string()), "name": a.user_name },
        "unit": a.unit,
    })
}

pub fn incident(inc: &Incident, update: bool, host: &str) -> Value {
    let blocked = inc.key.verdict.blocked;
    let (mut flow, mut q, mut px, mut flood) = (None, None, None, None);
    // A name-new or proxy-new incident: the wildcard that allowed the name.
    let mut pattern = None;
    let dataset = match &inc.subject {
        Subject::Packet(f) => {
            flow = f.as_ref();
            "egret.egress"
        }
        Subject::DnsQuery(d) => {
            q = Some(&**d);
            "egret.dns"
        }
        Subject::ProxyRequest(p) => {
            px = Some(&**p);
            "egret.proxy"
        }
        Subject::NameNew(n) => {
            q = Some(&n.question);
            pattern = Some(n.pattern.as_str());
            "egret.dns"
        }
        Subject::ProxyNew(n) => {
            px = Some(&n.request);
            pattern = Some(n.pattern.as_str());
            "egret.proxy"
        }
        Subject::Flood(f) => {
            flood = Some(&**f);
            "egret.flood"
        }
        Subject::Revalidated(f) | Subject::AllowedNew(f) => {
            flow = Some(f);
            "egret.egress"
        }
    };
    // A revalidated packet passed because the policy allows its name; a
    // first-seen flow or name because a rule allows it.
    let enforced = blocked
        || matches!(
            inc.subject,
            Subject::Revalidated(_)
                | Subject::AllowedNew(_)
                | Subject::NameNew(_)
                | Subject::ProxyNew(_)
        );
    let a = &inc.attribution;
    let p = a.process.as_ref();
    let (icmp_type, icmp_code) = match flow.map(|f| f.l4) {
        Some(L4Header::Icmp { kind, code }) => (Some(kind), Some(code)),
        _ => (None, None),
    };
    let at = if update {
        inc.last_seen
    } else {
        inc.first_seen
    };
    compact(json!({
        "@timestamp": timestamp(at),
        "message": summary(inc),
        "ecs": { "version": ECS_VERSION },
        "event": {
            "kind": if blocked { "alert" } else { "event" },
            "category": ["network"],
            "type": [if flow.is_some() { "connection" } else { "protocol" }, if blocked { "denied" } else { "allowed" }],
            "action": inc.action().as_str(),
            // The firewall did what its policy says (ECS's own "firewall
            // blocking a network connection" example): denied or allowed is
            // in event.type, so the outcome is a success either way.
            "outcome": "success",
            "id": inc.id.to_string(),
            "start": timestamp(inc.first_seen),
            "end": timestamp(inc.last_seen),
            "module": "egret",
            "dataset": dataset,
        },
        "host": { "name": host, "hostname": host },
        "network": {
            "direction": "egress",
            "transport": flow.map(|f| f.transport()).or(q.map(|q| q.transport.to_string())).or(px.map(|_| "tcp".to_string())),
            "type": flow.map(|f| f.network_type()),
            "iana_number": flow.map(|f| f.protocol.to_string()),
            "protocol": q.map(|_| "dns").or(px.map(|_| "http")),
        },
        "source": {
            "ip": flow.map(|f| f.src).or(q.map(|q| q.client.ip())).or(px.map(|p| p.client.ip())).map(|ip| ip.to_string()),
            "port": flow.and_then(|f| f.src_port()).or(q.map(|q| q.client.port())).or(px.map(|p| p.client.port())),
        },
        "destination": {
            "ip": flow.map(|f| f.dst).or(px.and_then(|p| p.ip)).map(|ip| ip.to_string()),
            "port": flow.and_then(|f| f.dst_port()).or(px.map(|p| p.port)),
            "domain": inc.resolved.as_ref().map(|r| r.name.clone())
                .or(px.filter(|p| p.host.parse::<std::net::IpAddr>().is_err()).map(|p| p.host.clone())),
        },
        "http": px.map(|p| json!({"request": {"method": p.method}})),
        "dns": q.map(|q| json!({
            "type": "query",
            "question": { "name": presentation_name(&q.name), "type": q.qtype },
            // A new name was answered by the upstream, whatever it said.
            "response_code": pattern.is_none().then_some(if blocked { "REFUSED" } else { "NOERROR" }),
        })),
        "process": p.map(|p| json!({
            "pid": p.pid,
            "name": p.name,
            "executable": p.executable,
            "command_line": p.command_line,
            "parent": { "pid": p.parent_pid, "name": p.parent_name },
        })),
        "user": {
            "id": a.uid.map(|u| u.to_string()),
            "name": a.user_name,
            "group": { "id": a.gid.map(|g| g.to_string()), "name": a.group_name },
        },
        "container": {
            "id": a.container_id,
            "name": a.container_name,
            "image": a.container_image.as_deref().map(|r| {
                let (name, tag) = crate::monitor::containers::image_name_and_tag(r);
                json!({ "name": name, "tag": tag.map(|t| vec![t]) })
            }),
        },
        "observer": { "ingress": { "interface": { "name": a.ingress.as_ref().map(|i| i.0.clone()) } } },
        "rule": { "name": inc.key.verdict.rule.as_deref().unwrap_or(DEFAULT_RULE) },
        "egret": {
            "count": inc.count,
            "first_seen": timestamp(inc.first_seen),
            "last_seen": timestamp(inc.last_seen),
            "attribution": a.method.as_str(),
            "mode": if enforced { Mode::Enforce.as_str() } else { Mode::Audit.as_str() },
            "update": update,
            "unit": a.unit,
            "cgroup": a.cgroup,
            "icmp": { "type": icmp_type, "code": icmp_code },
            "reason": px.filter(|_| pattern.is_none()).map(|p| p.reason.clone()),
            "novelty": pattern.map(|p| json!({ "pattern": p })),
            "truncated": (!a.truncated.is_empty()).then_some(&a.truncated),
            "flood": flood.map(|f| json!({
                "destinations": f.destinations,
                "capped": f.capped,
                "sample": f.sample,
            })),
            "dns": inc.resolved.as_ref().map(|r| json!({
                "resolved": r.name,
                "asked_by": r.asked_by.as_ref().map(asker),
            })),
            "revalidation": inc.resolved.as_ref().and_then(|r| r.revalidation.as_ref()).map(|v| json!({
                "outcome": v.outcome,
                "current": (!v.current.is_empty()).then(|| v.current.iter().map(|ip| ip.to_string()).collect::<Vec<_>>()),
            })),
        },
    }))
}

/// Packets the kernel logged that egret did not receive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LossFigures {
    /// All-time packets egret's log rules counted (across ruleset swaps).
    pub kernel_logged: u64,
    pub received: u64,
    /// Numbered by the kernel, never received.
    pub seq_lost: u64,
    /// Logged by the ruleset but neither received nor numbered (tail loss,
    /// allocation failures), measured when the stream was quiet.
    pub unaccounted: u64,
    /// Logged while no egret daemon was listening.
    pub while_down: u64,
    pub enobufs: u64,
    /// Reports of the DNS guard (refused queries, new names under a
    /// wildcard) that found the pipeline full.
    #[serde(default)]
    pub dns_dropped: u64,
    /// Reports of the proxy (denied requests, new hosts) that found the
    /// pipeline full.
    #[serde(default)]
    pub proxy_dropped: u64,
}

impl LossFigures {
    /// Everything that should have been an event and was not.
    pub fn lost(&self) -> u64 {
        self.packets_lost() + self.dns_dropped + self.proxy_dropped
    }

    /// Blocked-packet log messages only: `kernel_logged = received + packets_lost`.
    pub fn packets_lost(&self) -> u64 {
        self.seq_lost + self.unaccounted + self.while_down
    }
}

pub fn data_loss(at: SystemTime, lost_since_last: u64, figures: &LossFigures, host: &str) -> Value {
    self_event(
        at,
        host,
        format!(
            "{lost_since_last} reports were lost ({} in all: {} blocked-packet log messages, {} refused DNS queries, {} proxy denials); see `egret status`",
            figures.lost(),
            figures.packets_lost(),
            figures.dns_dropped,
            figures.proxy_dropped
        ),
        ("event", "network", "info", None, Action::DataLoss),
        Severity::High,
        json!({ "lost": lost_since_last, "loss": figures }),
    )
}

/// A sign of life, with the books, so a silent host can be told apart from a dead daemon.
pub fn heartbeat(
    at: SystemTime,
    figures: &LossFigures,
    open_incidents: usize,
    host: &str,
) -> Value {
    self_event(
        at,
        host,
        format!(
            "egret run is alive: {} blocked packets received, {} lost",
            figures.received,
            figures.lost()
        ),
        ("state", "host", "info", None, Action::Heartbeat),
        Severity::Info,
        json!({ "loss": figures, "open_incidents": open_incidents }),
    )
}

/// egret's table was deleted or changed by something other than egret.
pub fn tamper(at: SystemTime, what: &str, restored: bool, host: &str) -> Value {
    let outcome = if restored {
        "; egret restored it"
    } else {
        "; egress is not filtered as the policy says"
    };
    self_event(
        at,
        host,
        format!("egret's table was {what} outside egret{outcome}"),
        ("alert", "configuration", "change", None, Action::Tamper),
        Severity::Critical,
        json!({ "tamper": what, "restored": restored }),
    )
}

/// Another program holds egret's NFLOG group: `egret run` cannot start, and
/// blocked packets would be reported to that program instead.
pub fn nflog_taken(at: SystemTime, group: u16, host: &str) -> Value {
    let mut doc = self_event(
        at,
        host,
        format!("NFLOG group {group} is taken by another program: egret run cannot start and blocked packets are not reported"),
        ("alert", "process", "start", Some("failure"), Action::NflogTaken),
        Severity::Critical,
        json!({ "log_group": group }),
    );
    set_error(
        &mut doc,
        &format!("NFLOG group {group} is taken by another program"),
    );
    doc
}

/// An alert sink failed to deliver `failed` alerts since its last report.
pub fn alert_failed(at: SystemTime, sink: &str, failed: u64, error: &str, host: &str) -> Value {
    let mut doc = self_event(
        at,
        host,
        format!("alert sink {sink} failed to deliver {failed} alert(s): {error}"),
        (
            "event",
            "host",
            "info",
            Some("failure"),
            Action::AlertFailed,
        ),
        Severity::Medium,
        json!({ "alert": { "sink": sink, "failed": failed, "error": error } }),
    );
    set_error(&mut doc, error);
    doc
}

/// What a sink's rate limit held back in one window: sent in place of them.
pub fn alert_digest(
    at: SystemTime,
    sink: &str,
    window: std::time::Duration,
    suppressed: &[(String, Severity, u64)],
    queue_full: u64,
    host: &str,
) -> Value {
    let total: u64 = suppressed.iter().map(|s| s.2).sum::<u64>() + queue_full;
    let top = suppressed
        .iter()
        .map(|s| s.1)
        .max()
        .unwrap_or(Severity::Info);
    let parts: Vec<String> = suppressed
        .iter()
        .map(|(a, s, n)| format!("{n} {a} ({})", s.as_str()))
        .chain((queue_full > 0).then(|| format!("{queue_full} dropped while the sink was busy")))
        .collect();
    self_event(
        at,
        host,
        format!(
            "{total} more alert(s) in the last {} were held back by the rate limit of sink {sink}: {}; see `egret events`",
            humantime::format_duration(window),
            parts.join(", ")
        ),
        ("event", "host", "info", None, Action::AlertDigest),
        top,
        json!({ "alert": {
            "sink": sink,
            "suppressed": total,
            "queue_full": queue_full,
            "by": suppressed.iter().map(|(a, s, n)| json!({"action": a, "severity": s.as_str(), "count": n})).collect::<Vec<_>>(),
        }}),
    )
}

/// Adds who committed the change (ECS `process.*`) and what changed to a
/// tamper document.
pub fn annotate_tamper(
    doc: &mut Value,
    by: Option<&(Option<u32>, Option<String>)>,
    changes: &[String],
) {
    if let Some((pid, name)) = by {
        let mut process = serde_json::Map::new();
        if let Some(pid) = pid {
            process.insert("pid".into(), json!(pid));
        }
        if let Some(name) = name {
            process.insert("name".into(), json!(name));
        }
        if !process.is_empty() {
            if let Some(m) = doc.as_object_mut() {
                m.insert("process".into(), Value::Object(process));
            }
            if let (Some(msg), Some(name)) = (doc.get("message").and_then(|m| m.as_str()), name) {
                let by = match pid {
                    Some(pid) => format!(" (committed by {name}, pid {pid})"),
                    None => format!(" (committed by {name})"),
                };
                doc["message"] = json!(format!("{msg}{by}"));
            }
        }
    }
    if !changes.is_empty() {
        if let Some(egret) = doc.get_mut("egret").and_then(|e| e.as_object_mut()) {
            egret.insert("changes".into(), json!(changes));
        }
    }
}

/// A TCP connection older than egret's table that the policy would not
/// allow, as the event needs it (built by `run::preexisting` from what
/// `apply` found, so the model does not depend on `apply`).
pub struct PreexistingConnection<'a> {
    pub local: std::net::SocketAddr,
    pub remote: std::net::SocketAddr,
    pub uid: u32,
    /// A socket listens on the local (unprivileged) port.
    pub listener: bool,
    pub rule: &'a str,
    pub outcome: &'a str,
    pub why: &'a str,
    pub message: String,
}

/// A TCP connection older than egret's table that the policy would not allow.
pub fn preexisting(at: SystemTime, c: PreexistingConnection<'_>, host: &str) -> Value {
    let mut doc = self_event(
        at,
        host,
        c.message,
        (
            "alert",
            "network",
            "connection",
            Some("success"),
            Action::Preexisting,
        ),
        Severity::High,
        json!({
            "rule": c.rule,
            "outcome": c.outcome,
            "why": c.why,
        }),
    );
    if let Some(o) = doc.as_object_mut() {
        o.insert(
            "source".into(),
            json!({ "ip": c.local.ip().to_string(), "port": c.local.port() }),
        );
        o.insert(
            "destination".into(),
            json!({ "ip": c.remote.ip().to_string(), "port": c.remote.port() }),
        );
        o.insert(
            "network".into(),
            json!({
                "transport": "tcp",
                "type": if c.remote.is_ipv4() { "ipv4" } else { "ipv6" },
                "direction": "egress",
            }),
        );
        o.insert("user".into(), json!({ "id": c.uid.to_string() }));
        // A listener on an unprivileged local port proves nothing (any user
        // may open one); the operator judges.
        if c.listener {
            if let Some(e) = o.get_mut("egret").and_then(|e| e.as_object_mut()) {
                e.insert("source_port_listener".into(), json!(true));
            }
        }
    }
    doc
}

/// Writes a severity into a document: ECS `event.severity` (a number, higher
/// is more urgent) and `egret.severity` (its name).
pub fn set_severity(doc: &mut Value, severity: Severity) {
    if let Some(e) = doc.get_mut("event").and_then(Value::as_object_mut) {
        e.insert("severity".into(), severity.number().into());
    }
    match doc.get_mut("egret").and_then(Value::as_object_mut) {
        Some(e) => {
            e.insert("severity".into(), severity.as_str().into());
        }
        None => {
            if let Some(d) = doc.as_object_mut() {
                d.insert("egret".into(), json!({ "severity": severity.as_str() }));
            }
        }
    }
}

/// The severity a document carries (`egret.severity`), if any.
pub fn severity_of(doc: &Value) -> Option<Severity> {
    doc.pointer("/egret/severity")
        .and_then(Value::as_str)
        .and_then(Severity::from_name)
}

/// ECS `error.message`: what went wrong, where SIEMs look for it.
fn set_error(doc: &mut Value, message: &str) {
    if let Some(d) = doc.as_object_mut() {
        d.insert("error".into(), json!({ "message": message }));
    }
}

/// An event about egret itself: ECS envelope with (kind, category, type,
/// outcome, action); docs/monitoring.md says why each is what it is.
/// A document about something other than an incident (egret's own events,
/// pre-existing connections): the ECS skeleton every event shares.
fn self_event(
    at: SystemTime,
    host: &str,
    message: String,
    (kind, category, kind_type, outcome, action): (&str, &str, &str, Option<&str>, Action),
    severity: Severity,
    egret: Value,
) -> Value {
    let mut doc = json!({
        "@timestamp": timestamp(at),
        "message": message,
        "ecs": { "version": ECS_VERSION },
        "event": {
            "kind": kind,
            "category": [category],
            "type": [kind_type],
            "action": action.as_str(),
            "module": "egret",
            "dataset": "egret.egress",
        },
        "host": { "name": host, "hostname": host },
        "egret": egret,
    });
    if let (Some(o), Some(e)) = (outcome, doc.get_mut("event").and_then(Value::as_object_mut)) {
        e.insert("outcome".into(), o.into());
    }
    set_severity(&mut doc, severity);
    doc
}

// ---- Decoding: documents read back (stored, streamed, or handed to a sink) ----

/// What any document says about itself, egret's own events included: what
/// the sinks filter and format on, and what `egret events --follow` prints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    /// `event.action`; `None` for an action this build does not know.
    pub action: Option<Action>,
    /// `egret.severity`.
    pub severity: Option<Severity>,
    pub message: String,
    /// `rule.name` (incidents only).
    pub rule: String,
    /// `host.hostname`.
    pub host: Option<String>,
    /// `@timestamp`, as written.
    pub timestamp: Option<String>,
    /// `egret.last_seen`, as written (incidents only).
    pub last_seen: Option<String>,
    /// `egret.count` (incidents and data-loss reports).
    pub count: Option<u64>,
}

impl Envelope {
    pub fn of(doc: &Value) -> Envelope {
        let s = |p: &str| doc.pointer(p).and_then(Value::as_str);
        Envelope {
            action: s("/event/action").and_then(Action::from_name),
            severity: severity_of(doc),
            message: s("/message").unwrap_or_default().to_string(),
            rule: s("/rule/name").unwrap_or_default().to_string(),
            host: s("/host/hostname").map(str::to_string),
            timestamp: s("/@timestamp").map(str::to_string),
            last_seen: s("/egret/last_seen").map(str::to_string),
            count: doc.pointer("/egret/count").and_then(Value::as_u64),
        }
    }

    pub fn action_name(&self) -> &'static str {
        self.action.map_or("", Action::as_str)
    }
}

/// What a sink carries beside the message (syslog's structured data and
/// CEE fields), by its short name.
const SINK_FIELDS: &[(&str, &str)] = &[
    ("/event/action", "action"),
    ("/egret/severity", "severity"),
    ("/event/id", "id"),
    ("/rule/name", "rule"),
    ("/process/pid", "pid"),
    ("/process/executable", "executable"),
    ("/user/name", "user"),
    ("/egret/unit", "unit"),
    ("/container/id", "container"),
    ("/source/ip", "src"),
    ("/destination/ip", "dst"),
    ("/destination/port", "dport"),
    ("/network/transport", "transport"),
    ("/destination/domain", "domain"),
    ("/dns/question/name", "query"),
    ("/egret/count", "count"),
    ("/egret/alert/sink", "sink"),
    ("/egret/alert/suppressed", "suppressed"),
];

/// The sink fields `doc` has (not null), as (short name, value), always in
/// the same order.
pub fn sink_fields(doc: &Value) -> impl Iterator<Item = (&'static str, &Value)> {
    SINK_FIELDS.iter().filter_map(move |(pointer, name)| {
        let v = doc.pointer(pointer).filter(|v| !v.is_null())?;
        Some((*name, v))
    })
}

/// Every field of `doc` but the two a log record carries apart
/// (`@timestamp`, `message`), by its dotted ECS name (`destination.port`):
/// objects are walked, arrays and values kept as they are (for OTLP
/// attributes).
pub fn flat_fields(doc: &Value) -> Vec<(String, &Value)> {
    fn walk<'a>(prefix: &str, v: &'a Value, out: &mut Vec<(String, &'a Value)>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    let name = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&name, v, out);
                }
            }
            Value::Null => {}
            _ => out.push((prefix.to_string(), v)),
        }
    }
    let mut out = Vec::new();
    if let Value::Object(map) = doc {
        for (k, v) in map {
            if k != "@timestamp" && k != "message" {
                walk(k, v, &mut out);
            }
        }
    }
    out
}

/// What a recorded incident was about, as far as its document tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordedSubject {
    Packet,
    /// The name asked, in presentation form.
    DnsQuery {
        name: String,
    },
    /// The host asked for (a name, else the address) and port.
    ProxyRequest {
        host: String,
        port: u16,
    },
}

/// An incident document read back into typed values (`egret suggest`,
/// `simulate`, `explain`): what it was about, who sent it, how often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedIncident {
    pub action: Action,
    pub subject: RecordedSubject,
    /// `rule.name`: the rule that logged it ([`DEFAULT_RULE`] if none).
    pub rule: String,
    pub destination: Option<IpAddr>,
    pub port: Option<u16>,
    /// IANA protocol number (0 when the document names none).
    pub protocol: u8,
    pub icmp_type: Option<u8>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub cgroup: Option<String>,
    pub unit: Option<String>,
    /// `destination.domain`, as written.
    pub domain: Option<String>,
    pub executable: Option<String>,
    pub user_name: Option<String>,
    pub count: u64,
    /// RFC 3339, as stored.
    pub first_seen: String,
    pub last_seen: String,
    /// `host.name`: the host that recorded it.
    pub host: Option<String>,
}

impl RecordedIncident {
    /// `None` for documents that are not incidents about one subject
    /// (egret's own events; floods, which fold many destinations).
    pub fn decode(doc: &Value) -> Option<RecordedIncident> {
        let text = |pointer: &str| -> Option<String> {
            match doc.pointer(pointer)? {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            }
        };
        fn parse<T: std::str::FromStr>(v: Option<String>) -> Option<T> {
            v?.parse().ok()
        }
        let action = Action::from_name(&text("/event/action")?)?;
        if !matches!(
            action,
            Action::Blocked
                | Action::WouldBlock
                | Action::DnsRefused
                | Action::DnsWouldRefuse
                | Action::ProxyDenied
        ) {
            return None;
        }
        let subject = if let Some(name) = text("/dns/question/name") {
            RecordedSubject::DnsQuery { name }
        } else if doc.pointer("/http").is_some() {
            RecordedSubject::ProxyRequest {
                host: text("/destination/domain").or_else(|| text("/destination/ip"))?,
                port: parse(text("/destination/port"))?,
            }
        } else {
            RecordedSubject::Packet
        };
        let protocol = parse(text("/network/iana_number"))
            .or_else(|| protocol_number(&text("/network/transport")?))
            .unwrap_or(0);
        Some(RecordedIncident {
            action,
            subject,
            rule: text("/rule/name").unwrap_or_else(|| DEFAULT_RULE.into()),
            destination: parse(text("/destination/ip")),
            port: parse(text("/destination/port")),
            protocol,
            icmp_type: parse(text("/egret/icmp/type")),
            uid: parse(text("/user/id")),
            gid: parse(text("/user/group/id")),
            cgroup: text("/egret/cgroup"),
            unit: text("/egret/unit"),
            domain: text("/destination/domain"),
            executable: text("/process/executable"),
            user_name: text("/user/name"),
            count: parse(text("/egret/count")).unwrap_or(1),
            first_seen: text("/egret/first_seen").unwrap_or_default(),
            last_seen: text("/egret/last_seen").unwrap_or_default(),
            host: host_name(doc).map(str::to_string),
        })
    }
}

/// `network.transport` back to its IANA number (the encoder writes
/// [`crate::monitor::packet::transport_name`]).
fn protocol_number(transport: &str) -> Option<u8> {
    use crate::monitor::packet::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};
    Some(match transport {
        "tcp" => IPPROTO_TCP,
        "udp" => IPPROTO_UDP,
        "icmp" => IPPROTO_ICMP,
        "ipv6-icmp" => IPPROTO_ICMPV6,
        other => other.parse().ok()?,
    })
}

// ---- Documents read back from a collector (`--from`): see `collected` ----

/// An egret document, of any version: `event.module` is egret's.
pub fn is_egret(doc: &Value) -> bool {
    doc.pointer("/event/module").and_then(Value::as_str) == Some("egret")
}

/// The host a document came from: `host.name` (else `host.hostname`).
pub fn host_name(doc: &Value) -> Option<&str> {
    doc.pointer("/host/name")
        .or_else(|| doc.pointer("/host/hostname"))
        .and_then(Value::as_str)
}

/// What one incident's documents share across its updates (`event.id`, and
/// `event.start` in case a host's ids started again), so a collector's many
/// copies fold into the last; `None` for documents that are not incidents.
pub fn incident_key(doc: &Value) -> Option<(String, String)> {
    let id = match doc.pointer("/event/id")? {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    let start = doc
        .pointer("/event/start")
        .and_then(Value::as_str)
        .unwrap_or_default();
    Some((id, start.to_string()))
}

/// `egret.count`, also when a sink carried it as text.
pub fn count_of(doc: &Value) -> u64 {
    match doc.pointer("/egret/count") {
        Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

/// When a document was last true: `egret.last_seen`, else `@timestamp`.
pub fn last_seen_of(doc: &Value) -> Option<&str> {
    doc.pointer("/egret/last_seen")
        .or_else(|| doc.pointer("/@timestamp"))
        .and_then(Value::as_str)
}

/// Where a document says something went: `destination.ip`, and the names
/// (`destination.domain`, the DNS question).
pub fn destination_of(doc: &Value) -> (Option<IpAddr>, Vec<&str>) {
    let s = |p: &str| doc.pointer(p).and_then(Value::as_str);
    let ip = s("/destination/ip").and_then(|ip| ip.parse().ok());
    let names = [s("/destination/domain"), s("/dns/question/name")]
        .into_iter()
        .flatten()
        .collect();
    (ip, names)
}

/// Sink fields that are numbers in the document (a syslog record's
/// structured data carries every value as text).
const NUMERIC_SINK_FIELDS: &[&str] = &["pid", "dport", "count", "suppressed"];

/// A document rebuilt from what a sink carried ([`sink_fields`]: RFC 5424
/// structured data, or the local record's CEE JSON), with the record's host
/// name and time: enough for `egret events`, `suggest` and `simulate`, not
/// the whole document (no uid, cgroup or command line: `--from` takes the
/// user by name). The inverse of [`SINK_FIELDS`].
pub fn from_sink_fields(
    fields: &Map<String, Value>,
    host: Option<&str>,
    at: Option<&str>,
    message: &str,
) -> Value {
    let mut doc = json!({
        "message": message,
        "event": { "module": "egret", "kind": "event" },
    });
    for (pointer, name) in SINK_FIELDS {
        let Some(v) = fields.get(*name) else { continue };
        let v = match v {
            Value::String(s) if NUMERIC_SINK_FIELDS.contains(name) => {
                s.parse::<u64>().map_or_else(|_| v.clone(), Value::from)
            }
            Value::String(_) | Value::Number(_) | Value::Bool(_) => v.clone(),
            _ => continue,
        };
        set_pointer(&mut doc, pointer, v);
    }
    if let Some(host) = host {
        doc["host"] = json!({ "name": host, "hostname": host });
    }
    if let Some(at) = at {
        doc["@timestamp"] = json!(at);
        // One record per report: the first at `first_seen`, updates at
        // `last_seen`; folding the copies keeps the earliest and latest.
        if let Some(e) = doc.get_mut("egret").and_then(Value::as_object_mut) {
            e.insert("first_seen".into(), json!(at));
            e.insert("last_seen".into(), json!(at));
        }
    }
    let action = doc.pointer("/event/action").and_then(Value::as_str);
    if action.and_then(Action::from_name) == Some(Action::ProxyDenied) {
        // What `RecordedIncident` tells a proxy request by; the record does
        // not carry the method.
        doc["http"] = json!({ "request": {} });
    }
    doc
}

/// Writes `v` at a JSON pointer of plain object keys, creating the objects.
fn set_pointer(doc: &mut Value, pointer: &str, v: Value) {
    let mut at = doc;
    let mut keys = pointer.split('/').skip(1).peekable();
    while let Some(key) = keys.next() {
        if !at.is_object() {
            *at = Value::Object(Map::new());
        }
        let Some(map) = at.as_object_mut() else {
            return;
        };
        if keys.peek().is_none() {
            map.insert(key.to_string(), v);
            return;
        }
        at = map.entry(key).or_insert_with(|| Value::Object(Map::new()));
    }
}

/// An incident read back from a sink's fields keeps its first and last
/// times across the copies (see [`from_sink_fields`]).
pub fn widen_seen(kept: &mut Value, other: &Value) {
    let first = |d: &Value| {
        d.pointer("/egret/first_seen")
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    if let (Some(a), Some(b)) = (first(kept), first(other)) {
        if b < a {
            if let Some(e) = kept.get_mut("egret").and_then(Value::as_object_mut) {
                e.insert("first_seen".into(), json!(b));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::attribution::{Attribution, Method, Process};
    use crate::monitor::incident::Aggregator;
    use crate::monitor::nflog::LoggedVerdict;
    use crate::monitor::packet::Flow;

    #[test]
    fn dns_names_are_in_rfc1035_presentation_form_with_decimal_escapes() {
        // hickory's text for the labels `sp<32>ace<255>` and `a.b` (one label).
        assert_eq!(
            presentation_name("sp\\040ace\\377.a\\.b.example"),
            "sp\\032ace\\255.a\\.b.example"
        );
        assert_eq!(presentation_name("x\\(y\\\\z\\000"), "x(y\\\\z\\000");
        assert_eq!(presentation_name("-a_b.*.test"), "-a_b.*.test");
        assert_eq!(presentation_name("\\-lead"), "-lead");
        let name = hickory_proto::rr::Name::from_labels(vec![
            b"sp ace\xff".to_vec(),
            b"tab\there\x7f".to_vec(),
            b"ex".to_vec(),
        ])
        .unwrap();
        assert_eq!(
            presentation_name(&crate::dns::message::wire_name(&name)),
            "sp\\032ace\\255.tab\\009here\\127.ex"
        );
    }

    #[test]
    fn an_incident_has_the_ecs_fields_siems_expect() {
        let mut agg = Aggregator::new(42);
        let flow = Flow {
            src: "10.1.0.1".parse().unwrap(),
            dst: "10.1.0.2".parse().unwrap(),
            protocol: 6,
            l4: L4Header::Ports {
                src: 40000,
                dst: 1389,
            },
        };
        let who = Attribution {
            method: Method::SockDiagProc,
            uid: Some(1000),
            gid: Some(1000),
            user_name: Some("app".into()),
            group_name: None,
            process: Some(Process {
                pid: 4242,
                name: Some("java".into()),
                executable: Some("/usr/bin/java".into()),
                command_line: Some("java -jar app.jar".into()),
                parent_pid: Some(1),
                parent_name: Some("systemd".into()),
            }),
            cgroup: Some("/system.slice/app.service".into()),
            unit: Some("app.service".into()),
            container_id: None,
            container_name: None,
            container_image: None,
            ingress: None,
            truncated: Vec::new(),
        };
        let v = LoggedVerdict {
            blocked: true,
            rule: None,
        };
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123);
        let inc = agg.observe(&v, Some(&flow), &who, at).unwrap().clone();
        let doc = incident(&inc, false, "web1");
        let get = |p: &str| doc.pointer(p).cloned().unwrap_or(Value::Null);
        assert_eq!(get("/@timestamp"), "2023-11-14T22:13:20.123Z");
        assert_eq!(get("/event/action"), "blocked");
        assert_eq!(get("/event/kind"), "alert");
        assert_eq!(get("/network/transport"), "tcp");
        assert_eq!(get("/network/type"), "ipv4");
        assert_eq!(get("/destination/port"), 1389);
        assert_eq!(get("/source/ip"), "10.1.0.1");
        assert_eq!(get("/process/pid"), 4242);
        assert_eq!(get("/process/executable"), "/usr/bin/java");
        assert_eq!(get("/user/id"), "1000");
        assert_eq!(get("/user/name"), "app");
        assert_eq!(get("/rule/name"), "default");
        assert_eq!(get("/egret/count"), 1);
        assert_eq!(get("/egret/attribution"), "sock_diag+proc");
        assert_eq!(get("/egret/mode"), "enforce");
        assert_eq!(get("/egret/unit"), "app.service");
        assert_eq!(get("/event/id"), "42");
        assert!(
            doc.pointer("/user/group/name").is_none(),
            "unknowns are left out, not null"
        );
        assert!(doc.pointer("/container").is_none());
        assert_eq!(
            get("/message"),
            "blocked /usr/bin/java (pid 4242, user app) → 10.1.0.2:1389/tcp"
        );
    }

    fn first(subject: Subject, blocked: bool) -> Incident {
        let mut agg = Aggregator::new(9);
        let verdict = LoggedVerdict {
            blocked,
            rule: Some("r".into()),
        };
        let who = Attribution {
            uid: Some(65534),
            ..Attribution::unknown()
        };
        agg.record(crate::monitor::incident::Observation {
            verdict: &verdict,
            subject,
            attribution: &who,
            resolved: None,
            at: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000),
        })
        .unwrap()
        .clone()
    }

    #[test]
    fn what_is_encoded_decodes_back_for_each_subject() {
        let query = Subject::DnsQuery(Box::new(super::super::DnsQuestion {
            name: "x.example".into(),
            qtype: "TXT".into(),
            client: "127.0.0.1:5000".parse().unwrap(),
            transport: "tcp",
        }));
        let inc = first(query, false);
        let doc = incident(&inc, true, "h");
        let r = RecordedIncident::decode(&doc).unwrap();
        assert_eq!(r.action, Action::DnsWouldRefuse);
        assert_eq!(
            r.subject,
            RecordedSubject::DnsQuery {
                name: "x.example".into()
            }
        );
        assert_eq!((r.rule.as_str(), r.uid, r.protocol), ("r", Some(65534), 6));
        let e = Envelope::of(&doc);
        assert_eq!(e.action, Some(Action::DnsWouldRefuse));
        assert_eq!(e.host.as_deref(), Some("h"));
        assert_eq!((e.count, e.rule.as_str()), (Some(1), "r"));
        assert_eq!(e.message, summary(&inc));

        let request = Subject::ProxyRequest(Box::new(super::super::ProxyRequest {
            host: "198.51.100.4".into(),
            port: 8443,
            method: "CONNECT".into(),
            client: "127.0.0.1:5001".parse().unwrap(),
            reason: "no rule".into(),
            ip: Some("198.51.100.4".parse().unwrap()),
        }));
        let doc = incident(&first(request, true), false, "h");
        let r = RecordedIncident::decode(&doc).unwrap();
        assert_eq!(r.action, Action::ProxyDenied);
        assert_eq!(
            r.subject,
            RecordedSubject::ProxyRequest {
                host: "198.51.100.4".into(),
                port: 8443
            }
        );
        let fields: Vec<&str> = sink_fields(&doc).map(|(n, _)| n).collect();
        assert_eq!(
            fields,
            [
                "action",
                "id",
                "rule",
                "src",
                "dst",
                "dport",
                "transport",
                "count"
            ]
        );

        let flood = incident(&first(Subject::Flood(Box::default()), true), false, "h");
        assert_eq!(Envelope::of(&flood).action, Some(Action::Flood));
        assert!(
            RecordedIncident::decode(&flood).is_none(),
            "a flood has no one flow"
        );
    }

    #[test]
    fn egrets_own_events_decode_as_envelopes_not_incidents() {
        let at = SystemTime::UNIX_EPOCH;
        let doc = tamper(at, "deleted", true, "h");
        let e = Envelope::of(&doc);
        assert_eq!(e.action, Some(Action::Tamper));
        assert_eq!(e.severity, Some(Severity::Critical));
        assert_eq!(e.timestamp.as_deref(), Some("1970-01-01T00:00:00.000Z"));
        assert_eq!((e.count, e.last_seen), (None, None));
        assert!(RecordedIncident::decode(&doc).is_none());
        let e = Envelope::of(&alert_failed(at, "hook", 2, "refused", "h"));
        assert_eq!(e.action_name(), "alert-failed");
    }
}
