//! How urgent an incident is. The rule is pure ([`grade`]); the
//! [`Classifier`] adds the memory of what each identity tried before, kept in
//! the store so a restart does not make every old destination "new" again.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, SystemTime};

use tracing::warn;

use crate::monitor::attribution::Identity;
use crate::monitor::event::{Action, SubjectKey};
use crate::monitor::incident::Incident;
use crate::monitor::store::Store;
use crate::policy::{Severity, SeverityRules};

/// An incident's severity: `new_destination` or `repeat`, raised to `high`
/// on a second-stage port and to the action's floor.
pub fn grade(rules: &SeverityRules, action: &str, port: Option<u16>, new: bool) -> Severity {
    let mut s = if new {
        rules.new_destination
    } else {
        rules.repeat
    };
    if port.is_some_and(|p| rules.second_stage_ports.contains(&p)) {
        s = s.max(Severity::High);
    }
    if let Some(floor) = rules.actions.get(action) {
        s = s.max(*floor);
    }
    s
}

fn revalidated_grade(rules: &SeverityRules) -> Severity {
    rules
        .actions
        .get(Action::DnsRevalidated.as_str())
        .copied()
        .unwrap_or(Severity::Low)
}

/// A first-seen allowed flow (`[novelty]`): medium unless `[severity]
/// actions` says otherwise (then exactly that: it is the kind's grade, not a
/// floor); its novelty was already decided by `monitor::novelty`.
fn allowed_new_grade(rules: &SeverityRules) -> Severity {
    rules
        .actions
        .get(Action::AllowedNew.as_str())
        .copied()
        .unwrap_or(Severity::Medium)
}

/// A new name under a wildcard (`name-new`, `proxy-new`): high unless
/// `[severity] actions` says otherwise (exactly that, as for `allowed-new`):
/// the signal of a second stage hiding behind an allowed domain.
fn new_name_grade(rules: &SeverityRules, action: Action) -> Option<Severity> {
    matches!(action, Action::NameNew | Action::ProxyNew).then(|| {
        rules
            .actions
            .get(action.as_str())
            .copied()
            .unwrap_or(Severity::High)
    })
}

/// (identity, destination, port, protocol): what "tried before" means.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SeenKey {
    pub identity: String,
    pub destination: String,
    pub port: u16,
    pub protocol: String,
}

impl SeenKey {
    pub fn of(inc: &Incident) -> SeenKey {
        let identity = match &inc.key.identity {
            Identity::Executable(e) => format!("exe:{e}"),
            Identity::Unit(u) => format!("unit:{u}"),
            Identity::Uid(u) => format!("uid:{u}"),
            Identity::Container(name) => format!("container:{name}"),
            Identity::Forwarded(iface, src) => format!("forwarded:{iface}:{src}"),
            Identity::Unknown => "unknown".into(),
        };
        let (destination, protocol) = match &inc.key.subject {
            SubjectKey::DnsQuery { name, qtype } => (name.clone(), format!("dns:{qtype}")),
            SubjectKey::ProxyRequest { host, .. } => (host.clone(), "proxy".into()),
            SubjectKey::Packet {
                destination,
                protocol,
                ..
            } => (
                destination.map(|d| d.to_string()).unwrap_or_default(),
                protocol.map(|p| p.to_string()).unwrap_or_default(),
            ),
            SubjectKey::Flood => (String::new(), String::new()),
        };
        SeenKey {
            identity,
            destination,
            port: inc.key.subject.port().unwrap_or(0),
            protocol,
        }
    }
}

/// Bounds on the in-memory caches; past them they start over (the store
/// still answers).
const MAX_KNOWN: usize = 200_000;
const MAX_GRADED: usize = 100_000;
/// A known pair's `last_seen` in the store is refreshed at most this often:
/// the cap on the `seen` table evicts by it, at this resolution.
const TOUCH_EVERY: Duration = Duration::from_secs(600);

pub struct Classifier {
    pub rules: SeverityRules,
    /// Pairs known to the store, by a keyed hash (a key can be a 4 KiB path):
    /// when its `last_seen` was last written.
    known: HashMap<u64, SystemTime>,
    hasher: RandomState,
    /// Severity of recent incidents, so updates keep their first grade.
    graded: HashMap<u64, Severity>,
}

impl Classifier {
    pub fn new(rules: SeverityRules) -> Classifier {
        Classifier {
            rules,
            known: HashMap::new(),
            hasher: RandomState::new(),
            graded: HashMap::new(),
        }
    }

    /// Grades a new incident and remembers its destination for its identity.
    pub fn new_incident(&mut self, inc: &Incident, store: &mut Store) -> Severity {
        if inc.action() == Action::DnsRevalidated {
            // Traffic the policy allows by name: low unless the operator
            // raised it, and not an attempt that makes a destination "seen".
            let s = revalidated_grade(&self.rules);
            self.graded.insert(inc.id, s);
            return s;
        }
        if inc.action() == Action::AllowedNew {
            return allowed_new_grade(&self.rules);
        }
        if let Some(s) = new_name_grade(&self.rules, inc.action()) {
            return s;
        }
        let key = SeenKey::of(inc);
        let hash = self.hasher.hash_one(&key);
        let fresh = self.known.get(&hash).is_some_and(|&t| {
            inc.first_seen
                .duration_since(t)
                .map_or(true, |d| d < TOUCH_EVERY)
        });
        let new = if fresh {
            false
        } else {
            let new = store
                .first_attempt(
                    &key.identity,
                    &key.destination,
                    key.port,
                    &key.protocol,
                    inc.first_seen,
                )
                .unwrap_or_else(|e| {
                    // Better one alert too loud than a new destination graded low.
                    warn!("recording a first attempt in the store: {e:#}");
                    true
                });
            if self.known.len() >= MAX_KNOWN {
                self.known.clear();
            }
            self.known.insert(hash, inc.first_seen);
            new
        };
        let s = grade(
            &self.rules,
            inc.action().as_str(),
            inc.key.subject.port(),
            new,
        );
        if self.graded.len() >= MAX_GRADED {
            let oldest_kept = inc.id.saturating_sub(MAX_GRADED as u64 / 2);
            self.graded.retain(|id, _| *id >= oldest_kept);
        }
        self.graded.insert(inc.id, s);
        s
    }

    /// The grade an incident got when it opened (updates keep it).
    pub fn of(&self, inc: &Incident) -> Severity {
        if inc.action() == Action::DnsRevalidated {
            return revalidated_grade(&self.rules);
        }
        if inc.action() == Action::AllowedNew {
            return allowed_new_grade(&self.rules);
        }
        if let Some(s) = new_name_grade(&self.rules, inc.action()) {
            return s;
        }
        self.graded.get(&inc.id).copied().unwrap_or_else(|| {
            grade(
                &self.rules,
                inc.action().as_str(),
                inc.key.subject.port(),
                false,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_is_high_repeat_low_second_stage_and_dns_always_high() {
        let r = SeverityRules::default();
        assert_eq!(grade(&r, "blocked", Some(443), true), Severity::High);
        assert_eq!(grade(&r, "blocked", Some(443), false), Severity::Low);
        assert_eq!(grade(&r, "blocked", Some(1389), false), Severity::High);
        assert_eq!(grade(&r, "blocked", Some(1099), false), Severity::High);
        assert_eq!(grade(&r, "dns-refused", None, false), Severity::High);
        assert_eq!(grade(&r, "would-block", None, false), Severity::Low);
    }

    #[test]
    fn rules_are_configurable() {
        let r = SeverityRules {
            second_stage_ports: vec![],
            new_destination: Severity::Medium,
            repeat: Severity::Info,
            actions: [("proxy-denied".to_string(), Severity::Critical)].into(),
        };
        assert_eq!(grade(&r, "blocked", Some(1389), false), Severity::Info);
        assert_eq!(grade(&r, "blocked", Some(1389), true), Severity::Medium);
        assert_eq!(grade(&r, "dns-refused", None, false), Severity::Info);
        assert_eq!(
            grade(&r, "proxy-denied", Some(80), false),
            Severity::Critical
        );
    }
}
