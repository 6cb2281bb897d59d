//! The event model: what egret reports, as types. An incident is about one
//! [`Subject`] (a packet, a DNS query, a proxy request, or an identity's
//! flood); what egret did with it is an [`Action`]. egret's own events
//! (tamper, data loss, heartbeat, ...) have an `Action` and no subject.
//!
//! [`ecs`] is the one place that knows Elastic Common Schema field paths: it
//! encodes incidents and egret's own events as documents, and decodes them
//! back ([`ecs::Envelope`], [`ecs::RecordedIncident`], [`ecs::sink_fields`])
//! for the sinks, the read-side commands and `egret suggest`. Everything else
//! reads typed values; `serde_json::Value` is only the wire and storage form.

pub mod collected;
pub mod describe;
pub mod ecs;

use std::net::{IpAddr, SocketAddr};

pub use describe::{destination, presentation_name, summary, who};
pub use ecs::{
    alert_digest, alert_failed, data_loss, heartbeat, incident, nflog_taken, set_severity,
    severity_of, tamper, timestamp, LossFigures, ECS_VERSION,
};

use crate::monitor::attribution::Attribution;
use crate::monitor::flood::FloodSummary;
use crate::monitor::packet::Flow;

/// The rule name reported for packets caught by the final default rule.
pub use crate::policy::DEFAULT_RULE;

/// What an incident is about: exactly one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A packet the ruleset logged; `None` when its headers could not be decoded.
    Packet(Option<Flow>),
    /// A query the DNS guard refused (or, in audit mode, would have).
    /// Boxed, like the others: an open incident's size is what a scan multiplies.
    DnsQuery(Box<DnsQuestion>),
    /// A request the egress proxy refused (or, in audit mode, would have).
    ProxyRequest(Box<ProxyRequest>),
    /// An identity's new destinations past its rate, folded into one incident.
    Flood(Box<FloodSummary>),
    /// A blocked packet to an address the guard once allowed for a name that
    /// still resolves there: put back in the rule's set, the retry passes
    /// (`dns::revalidate`). The name and the verdict are in the incident's
    /// [`ResolvedName`].
    Revalidated(Flow),
    /// A flow an allow rule accepted that this identity never sent before
    /// (`[novelty]`): reported once per (identity, destination, port,
    /// protocol). The rule is the incident's verdict's.
    AllowedNew(Flow),
    /// A name only a rule's wildcard allows, asked of the DNS guard by an
    /// identity that never asked it before (`[novelty]`). The rule is the
    /// incident's verdict's.
    NameNew(Box<NewName>),
    /// The same for a host asked of the proxy (with its port).
    ProxyNew(Box<NewHost>),
}

/// A query for a name only a wildcard allows, first asked by its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewName {
    pub question: DnsQuestion,
    /// The rule's pattern that matched (`*.githubusercontent.com`).
    pub pattern: String,
}

/// A proxy request for a host only a wildcard allows, first asked by its
/// identity. The request's `reason` is empty: it was allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewHost {
    pub request: ProxyRequest,
    pub pattern: String,
}

impl Subject {
    /// `event.action` of an incident about this subject: `blocked` is the
    /// policy's verdict (false: audit mode let it pass).
    pub fn action(&self, blocked: bool) -> Action {
        match (self, blocked) {
            (Subject::Flood(_), _) => Action::Flood,
            (Subject::Revalidated(_), _) => Action::DnsRevalidated,
            (Subject::AllowedNew(_), _) => Action::AllowedNew,
            (Subject::NameNew(_), _) => Action::NameNew,
            (Subject::ProxyNew(_), _) => Action::ProxyNew,
            (Subject::DnsQuery(_), true) => Action::DnsRefused,
            (Subject::DnsQuery(_), false) => Action::DnsWouldRefuse,
            (Subject::ProxyRequest(_), true) => Action::ProxyDenied,
            (Subject::Packet(_), true) => Action::Blocked,
            // A proxy request audit mode let through is reported as a packet would be.
            (Subject::Packet(_) | Subject::ProxyRequest(_), false) => Action::WouldBlock,
        }
    }

    /// What tells this subject's incidents apart (a packet's source port and
    /// a client's socket do not: a retry is the same incident).
    pub fn key(&self) -> SubjectKey {
        match self {
            Subject::Packet(flow) => SubjectKey::Packet {
                destination: flow.map(|f| f.dst),
                port: flow.and_then(|f| f.dst_port()),
                protocol: flow.map(|f| f.protocol),
            },
            // Told apart from the blocks of the same destination by the verdict.
            Subject::Revalidated(f) | Subject::AllowedNew(f) => SubjectKey::Packet {
                destination: Some(f.dst),
                port: f.dst_port(),
                protocol: Some(f.protocol),
            },
            Subject::DnsQuery(q) => SubjectKey::DnsQuery {
                name: q.name.clone(),
                qtype: q.qtype.clone(),
            },
            // Told apart from refusals of the same name by the verdict.
            Subject::NameNew(n) => SubjectKey::DnsQuery {
                name: n.question.name.clone(),
                qtype: n.question.qtype.clone(),
            },
            Subject::ProxyRequest(p) => SubjectKey::ProxyRequest {
                host: p.host.clone(),
                ip: p.ip,
                port: p.port,
            },
            Subject::ProxyNew(n) => SubjectKey::ProxyRequest {
                host: n.request.host.clone(),
                ip: n.request.ip,
                port: n.request.port,
            },
            Subject::Flood(_) => SubjectKey::Flood,
        }
    }

    pub fn flow(&self) -> Option<&Flow> {
        match self {
            Subject::Packet(f) => f.as_ref(),
            Subject::Revalidated(f) | Subject::AllowedNew(f) => Some(f),
            _ => None,
        }
    }
}

/// The part of a [`Subject`] an incident is keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SubjectKey {
    Packet {
        destination: Option<IpAddr>,
        port: Option<u16>,
        protocol: Option<u8>,
    },
    DnsQuery {
        name: String,
        qtype: String,
    },
    ProxyRequest {
        host: String,
        ip: Option<IpAddr>,
        port: u16,
    },
    Flood,
}

impl SubjectKey {
    /// The destination port, where there is one.
    pub fn port(&self) -> Option<u16> {
        match self {
            SubjectKey::Packet { port, .. } => *port,
            SubjectKey::ProxyRequest { port, .. } => Some(*port),
            SubjectKey::DnsQuery { .. } | SubjectKey::Flood => None,
        }
    }
}

/// A request the egress proxy refused (or, in audit mode, would have).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyRequest {
    /// The host as asked: a name (wire form) or an address.
    pub host: String,
    pub port: u16,
    /// `CONNECT`, `GET`, ...
    pub method: String,
    pub client: SocketAddr,
    /// Why it was refused.
    pub reason: String,
    /// The address the host resolved to, when that was the problem, or the literal.
    pub ip: Option<IpAddr>,
}

/// A DNS query the guard refused (or, in audit mode, would have refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsQuestion {
    /// Wire form: ASCII, lower case, no trailing dot.
    pub name: String,
    /// "A", "AAAA", "TXT", ...
    pub qtype: String,
    /// The asking socket.
    pub client: SocketAddr,
    /// "udp" or "tcp".
    pub transport: &'static str,
}

/// The name the DNS guard recently resolved to a packet's destination, and who asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedName {
    pub name: String,
    pub asked_by: Option<Attribution>,
    /// When the packet waited for the name to be asked again: the verdict.
    pub revalidation: Option<RevalidationNote>,
}

/// What asking a blocked address's name again found (`egret.revalidation`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevalidationNote {
    /// `revalidated`, `stale`, `not-allowed`, `limited`, `failed`.
    pub outcome: &'static str,
    /// The name's addresses now, when the blocked one is no longer among them.
    pub current: Vec<IpAddr>,
}

/// ECS `event.action`: every kind of event egret emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// A packet the policy dropped.
    Blocked,
    /// A packet (or proxy request) audit mode let through.
    WouldBlock,
    DnsRefused,
    DnsWouldRefuse,
    ProxyDenied,
    /// A kept address whose name still resolves there, let through again.
    DnsRevalidated,
    /// A flow an allow rule accepted, first seen for its identity.
    AllowedNew,
    /// A name only a wildcard allows, first asked of the DNS guard by its identity.
    NameNew,
    /// A host only a wildcard allows, first asked of the proxy by its identity.
    ProxyNew,
    Flood,
    /// A connection older than egret's table that the policy would not allow.
    Preexisting,
    Tamper,
    DataLoss,
    Heartbeat,
    NflogTaken,
    AlertFailed,
    AlertDigest,
}

impl Action {
    pub const ALL: [Action; 17] = [
        Action::Blocked,
        Action::WouldBlock,
        Action::DnsRefused,
        Action::DnsWouldRefuse,
        Action::ProxyDenied,
        Action::DnsRevalidated,
        Action::AllowedNew,
        Action::NameNew,
        Action::ProxyNew,
        Action::Flood,
        Action::Preexisting,
        Action::Tamper,
        Action::DataLoss,
        Action::Heartbeat,
        Action::NflogTaken,
        Action::AlertFailed,
        Action::AlertDigest,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Action::Blocked => "blocked",
            Action::WouldBlock => "would-block",
            Action::DnsRefused => "dns-refused",
            Action::DnsWouldRefuse => "dns-would-refuse",
            Action::ProxyDenied => "proxy-denied",
            Action::DnsRevalidated => "dns-revalidated",
            Action::AllowedNew => "allowed-new",
            Action::NameNew => "name-new",
            Action::ProxyNew => "proxy-new",
            Action::Flood => "flood",
            Action::Preexisting => "preexisting",
            Action::Tamper => "tamper",
            Action::DataLoss => "data-loss",
            Action::Heartbeat => "heartbeat",
            Action::NflogTaken => "nflog-taken",
            Action::AlertFailed => "alert-failed",
            Action::AlertDigest => "alert-digest",
        }
    }

    pub fn from_name(name: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == name)
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_names_round_trip_and_cover_what_sinks_may_filter_on() {
        for a in Action::ALL {
            assert_eq!(Action::from_name(a.as_str()), Some(a));
        }
        for name in crate::policy::ACTIONS {
            assert!(Action::from_name(name).is_some(), "{name}");
        }
    }
}
