//! Deduplication: packets become incidents. A blocked TCP connect retries its
//! SYN for minutes and a UDP client resends: one incident each, not hundreds
//! of events. Pure: time is passed in, so tests drive it directly.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use crate::monitor::attribution::{Attribution, Identity};
use crate::monitor::nflog::Verdict;
use crate::monitor::packet::Flow;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IncidentKey {
    pub verdict: Verdict,
    pub identity: Identity,
    /// The sender's uid and unit, which policy rules can name: the same
    /// executable run by two users or from two units is two incidents, so
    /// `egret suggest` sees both.
    pub uid: Option<u32>,
    pub unit: Option<String>,
    pub destination: Option<IpAddr>,
    pub port: Option<u16>,
    pub protocol: Option<u8>,
    /// For queries the DNS guard refused: (name, type).
    pub question: Option<(String, String)>,
    /// For requests the proxy refused: the host asked for.
    pub proxy_host: Option<String>,
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
}

/// One thing the monitor saw: a logged packet or a refused query.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    pub verdict: &'a Verdict,
    pub flow: Option<&'a Flow>,
    pub question: Option<&'a DnsQuestion>,
    pub proxy: Option<&'a ProxyRequest>,
    pub attribution: &'a Attribution,
    pub resolved: Option<&'a ResolvedName>,
    pub at: SystemTime,
}

#[derive(Debug, Clone)]
pub struct Incident {
    pub id: u64,
    pub key: IncidentKey,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    pub count: u64,
    /// The first packet's flow and attribution (later ones differ only in
    /// source port and timing).
    pub flow: Option<Flow>,
    /// Boxed, like `proxy` and `resolved`: most incidents have none, and an
    /// open incident's size is what a port scan multiplies.
    pub question: Option<Box<DnsQuestion>>,
    pub proxy: Option<Box<ProxyRequest>>,
    /// The host name behind the destination address, if the guard resolved it.
    pub resolved: Option<Box<ResolvedName>>,
    pub attribution: Attribution,
    emitted_count: u64,
    emitted_at: SystemTime,
}

/// What to tell the outside world about an incident.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emit {
    /// First packet: at once.
    New,
    /// The count grew since the last emission.
    Update,
}

pub struct Aggregator {
    /// Boxed: an incident is ~1.5 KB inline, and the table keeps spare slots.
    open: HashMap<IncidentKey, Box<Incident>>,
    next_id: u64,
    /// Repeats are emitted at most this often per incident.
    pub update_every: Duration,
    /// An incident with no packet for this long is closed; the next packet opens a new one.
    pub idle_close: Duration,
    /// Bound on open incidents: the oldest idle one is closed to make room.
    pub max_open: usize,
}

impl Aggregator {
    pub fn new(first_id: u64) -> Aggregator {
        Aggregator {
            open: HashMap::new(),
            next_id: first_id.max(1),
            update_every: Duration::from_secs(5),
            idle_close: Duration::from_secs(600),
            max_open: 50_000,
        }
    }

    /// Records one packet (tests' shorthand for [`Aggregator::record`]).
    #[cfg(test)]
    pub fn observe(
        &mut self,
        verdict: &Verdict,
        flow: Option<&Flow>,
        attribution: &Attribution,
        at: SystemTime,
    ) -> Option<&Incident> {
        self.record(Observation {
            verdict,
            flow,
            question: None,
            proxy: None,
            attribution,
            resolved: None,
            at,
        })
    }

    /// Records one observation. Returns the incident when it is new (emit now).
    pub fn record(&mut self, o: Observation<'_>) -> Option<&Incident> {
        let Observation {
            verdict,
            flow,
            question,
            proxy,
            attribution,
            resolved,
            at,
        } = o;
        let key = IncidentKey {
            verdict: verdict.clone(),
            identity: attribution.identity(),
            uid: attribution.uid,
            unit: attribution.unit.clone(),
            destination: flow.map(|f| f.dst).or(proxy.and_then(|p| p.ip)),
            port: flow.and_then(|f| f.dst_port()).or(proxy.map(|p| p.port)),
            protocol: flow.map(|f| f.protocol),
            question: question.map(|q| (q.name.clone(), q.qtype.clone())),
            proxy_host: proxy.map(|p| p.host.clone()),
        };
        if let Some(inc) = self.open.get_mut(&key) {
            if at.duration_since(inc.last_seen).unwrap_or_default() < self.idle_close {
                inc.count += 1;
                inc.last_seen = inc.last_seen.max(at);
                return None;
            }
        }
        if self.open.len() >= self.max_open {
            self.evict_oldest();
        }
        let id = self.next_id;
        self.next_id += 1;
        let inc = Incident {
            id,
            key: key.clone(),
            first_seen: at,
            last_seen: at,
            count: 1,
            flow: flow.copied(),
            question: question.cloned().map(Box::new),
            proxy: proxy.cloned().map(Box::new),
            resolved: resolved.cloned().map(Box::new),
            attribution: attribution.clone(),
            emitted_count: 1,
            emitted_at: at,
        };
        self.open.insert(key.clone(), Box::new(inc));
        self.open.get(&key).map(|b| &**b)
    }

    /// Incidents whose count grew and whose last emission is `update_every`
    /// old (or all that grew, with `force`, e.g. at shutdown). Marks them emitted.
    pub fn due(&mut self, now: SystemTime, force: bool) -> Vec<Incident> {
        let every = self.update_every;
        let mut out: Vec<Incident> = self
            .open
            .values_mut()
            .filter(|i| {
                i.count > i.emitted_count
                    && (force || now.duration_since(i.emitted_at).unwrap_or_default() >= every)
            })
            .map(|i| {
                i.emitted_count = i.count;
                i.emitted_at = now;
                Incident::clone(i)
            })
            .collect();
        out.sort_by_key(|i| i.id);
        out
    }

    /// Closes incidents idle for `idle_close` (their last update was emitted by `due`).
    pub fn close_idle(&mut self, now: SystemTime) {
        let idle = self.idle_close;
        self.open.retain(|_, i| {
            now.duration_since(i.last_seen).unwrap_or_default() < idle || i.count > i.emitted_count
        });
    }

    fn evict_oldest(&mut self) {
        if let Some(key) = self
            .open
            .values()
            .min_by_key(|i| i.last_seen)
            .map(|i| i.key.clone())
        {
            self.open.remove(&key);
        }
    }

    /// An id for an event that is not an incident (data loss, tamper).
    pub fn reserve_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub fn open_count(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::attribution::Method;
    use crate::monitor::packet::L4;

    fn flow(sport: u16, dport: u16) -> Flow {
        Flow {
            src: "10.1.0.1".parse().unwrap(),
            dst: "10.1.0.2".parse().unwrap(),
            protocol: 6,
            l4: L4::Ports {
                src: sport,
                dst: dport,
            },
        }
    }

    fn who(uid: u32) -> Attribution {
        Attribution {
            method: Method::UidOnly,
            uid: Some(uid),
            ..Attribution::unknown()
        }
    }

    const BLOCKED: Verdict = Verdict {
        blocked: true,
        rule: None,
    };

    #[test]
    fn one_executable_under_two_users_or_units_is_two_incidents() {
        let mut agg = Aggregator::new(1);
        let t0 = SystemTime::UNIX_EPOCH;
        let as_user = |uid: u32, unit: Option<&str>| Attribution {
            process: Some(crate::monitor::attribution::Process {
                pid: 10,
                executable: Some("/usr/bin/python3".into()),
                ..Default::default()
            }),
            unit: unit.map(str::to_string),
            ..who(uid)
        };
        let f = flow(1000, 443);
        assert!(agg
            .observe(&BLOCKED, Some(&f), &as_user(0, None), t0)
            .is_some());
        assert!(agg
            .observe(&BLOCKED, Some(&f), &as_user(0, None), t0)
            .is_none());
        assert!(agg
            .observe(&BLOCKED, Some(&f), &as_user(65534, None), t0)
            .is_some());
        let in_unit = as_user(0, Some("app.service"));
        assert!(agg.observe(&BLOCKED, Some(&f), &in_unit, t0).is_some());
    }

    #[test]
    fn syn_retries_are_one_incident_with_rate_limited_updates() {
        let mut agg = Aggregator::new(1);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let s = |n| t0 + Duration::from_secs(n);
        assert_eq!(
            agg.observe(&BLOCKED, Some(&flow(4000, 1389)), &who(1), t0)
                .map(|i| i.id),
            Some(1)
        );
        for n in 1..=3 {
            // A new source port (a retrying client) is still the same incident.
            assert!(agg
                .observe(&BLOCKED, Some(&flow(4000 + n as u16, 1389)), &who(1), s(n))
                .is_none());
        }
        assert!(
            agg.due(s(3), false).is_empty(),
            "updates wait for update_every"
        );
        let due = agg.due(s(5), false);
        assert_eq!((due.len(), due[0].count, due[0].last_seen), (1, 4, s(3)));
        assert!(
            agg.due(s(20), false).is_empty(),
            "nothing new, nothing emitted"
        );
        agg.observe(&BLOCKED, Some(&flow(4000, 1389)), &who(1), s(21));
        assert_eq!(agg.due(s(21), true)[0].count, 5);
    }

    #[test]
    fn identity_destination_port_and_verdict_split_incidents() {
        let mut agg = Aggregator::new(10);
        let t = SystemTime::UNIX_EPOCH;
        assert!(agg
            .observe(&BLOCKED, Some(&flow(1, 1389)), &who(1), t)
            .is_some());
        assert!(agg
            .observe(&BLOCKED, Some(&flow(1, 1389)), &who(2), t)
            .is_some());
        assert!(agg
            .observe(&BLOCKED, Some(&flow(1, 389)), &who(1), t)
            .is_some());
        let audit = Verdict {
            blocked: false,
            rule: Some("web".into()),
        };
        assert!(agg
            .observe(&audit, Some(&flow(1, 1389)), &who(1), t)
            .is_some());
        assert_eq!(agg.open_count(), 4);
    }

    #[test]
    fn idle_incidents_close_and_a_new_one_opens() {
        let mut agg = Aggregator::new(1);
        let t0 = SystemTime::UNIX_EPOCH;
        agg.observe(&BLOCKED, Some(&flow(1, 53)), &who(1), t0);
        let later = t0 + agg.idle_close + Duration::from_secs(1);
        agg.close_idle(later);
        assert_eq!(agg.open_count(), 0);
        assert_eq!(
            agg.observe(&BLOCKED, Some(&flow(1, 53)), &who(1), later)
                .map(|i| i.id),
            Some(2)
        );
    }

    #[test]
    fn the_open_set_is_bounded() {
        let mut agg = Aggregator::new(1);
        agg.max_open = 3;
        for p in 0..10 {
            agg.observe(
                &BLOCKED,
                Some(&flow(1, p)),
                &who(1),
                SystemTime::UNIX_EPOCH + Duration::from_secs(p.into()),
            );
        }
        assert_eq!(agg.open_count(), 3);
    }
}
