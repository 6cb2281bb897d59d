//! The long memory behind first-seen allowed flows (`[novelty]`).
//!
//! The kernel reports a flow an allow rule accepted the first time it sees
//! its (uid, destination, protocol, port) within its set's timeout
//! (`ruleset::Match::Seen` and `Remember`); that filter forgets, and it does not know
//! executables. This memory decides whether (identity, destination, port,
//! protocol) is really new: kept in the store's `seen` table (so it survives
//! restarts, capped by `--max-seen` with the least recently seen evicted, the
//! same cap as the severity memory) under the protocol `allowed:<n>`, so an
//! attempt that was blocked once does not make the allowed flow "known".

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, SystemTime};

use crate::monitor::attribution::Identity;
use crate::monitor::packet::Flow;
use crate::monitor::store::Store;
use crate::policy::Novelty;

/// The store counter holding when novelty first ran (unix seconds): the
/// learning period counts from it, across restarts.
pub const LEARN_START: &str = "novelty_learn_start";

/// Tuples known without asking the store; past it the cache starts over
/// (the store still answers).
const MAX_CACHED: usize = 200_000;

/// An identity as the `seen` table spells it.
pub fn identity_key(id: &Identity) -> String {
    match id {
        Identity::Executable(e) => format!("exe:{e}"),
        Identity::Unit(u) => format!("unit:{u}"),
        Identity::Uid(u) => format!("uid:{u}"),
        Identity::Container(name) => format!("container:{name}"),
        Identity::Forwarded(iface, src) => format!("forwarded:{iface}:{src}"),
        Identity::Unknown => "unknown".into(),
    }
}

/// Whether `[novelty] exclude_identities` names `identity` (spelled `who`
/// by [`identity_key`]; an executable may also be named by its bare path).
pub fn excluded(cfg: &Novelty, identity: &Identity, who: &str) -> bool {
    cfg.exclude_identities
        .iter()
        .any(|x| *x == who || matches!(identity, Identity::Executable(e) if e == x))
}

/// What the memory says of one first-seen packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Never seen for this identity: report it.
    New,
    /// Seen before (the kernel's filter forgot, or another uid's key).
    Known,
    /// The identity is excluded by `[novelty] exclude_identities`.
    Excluded,
}

#[derive(Default)]
pub struct Memory {
    known: HashSet<u64>,
    hasher: RandomState,
    /// When learning started (from the store), once read.
    learn_start: Option<SystemTime>,
}

impl Memory {
    /// Whether `identity` sending `flow` is new, recording it if so.
    pub fn judge(
        &mut self,
        cfg: &Novelty,
        identity: &Identity,
        flow: &Flow,
        at: SystemTime,
        store: &mut Store,
    ) -> Verdict {
        let who = identity_key(identity);
        if excluded(cfg, identity, &who) {
            return Verdict::Excluded;
        }
        let port = flow.dst_port().unwrap_or(0);
        let protocol = format!("allowed:{}", flow.protocol);
        let hash = self.hasher.hash_one((&who, flow.dst, port, flow.protocol));
        if self.known.contains(&hash) {
            return Verdict::Known;
        }
        let new = store
            .first_attempt(&who, &flow.dst.to_string(), port, &protocol, at)
            .unwrap_or_else(|e| {
                tracing::warn!("recording a first-seen flow in the store: {e:#}");
                true
            });
        if self.known.len() >= MAX_CACHED {
            self.known.clear();
        }
        self.known.insert(hash);
        if new {
            Verdict::New
        } else {
            Verdict::Known
        }
    }

    /// Whether `at` is inside the learning period (recorded, not alerted).
    /// The period's start is stored the first time it is asked.
    pub fn learning(&mut self, cfg: &Novelty, at: SystemTime, store: &mut Store) -> bool {
        if cfg.learn.is_zero() {
            return false;
        }
        let start = *self
            .learn_start
            .get_or_insert_with(|| learn_start(store, at));
        at.duration_since(start).unwrap_or(Duration::ZERO) < cfg.learn
    }
}

/// When learning started: stored, or `now` (then stored).
fn learn_start(store: &mut Store, now: SystemTime) -> SystemTime {
    let stored = store
        .counter(LEARN_START)
        .ok()
        .flatten()
        .and_then(|v| v.parse::<u64>().ok());
    match stored {
        Some(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        None => {
            let secs = now
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            if let Err(e) = store.put_counter(LEARN_START, &secs.to_string()) {
                tracing::warn!("storing the novelty learning start: {e:#}");
            }
            now
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::packet::L4Header;

    fn flow(dst: &str, port: u16) -> Flow {
        Flow {
            src: "10.0.0.1".parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol: 6,
            l4: L4Header::Ports {
                src: 40000,
                dst: port,
            },
        }
    }

    #[test]
    fn new_once_per_identity_and_destination_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Novelty::default();
        let now = SystemTime::now();
        let curl = Identity::Executable("/usr/bin/curl".into());
        let wget = Identity::Executable("/usr/bin/wget".into());
        let f = flow("192.0.2.1", 443);
        {
            let mut store = Store::open(dir.path()).unwrap();
            let mut m = Memory::default();
            assert_eq!(m.judge(&cfg, &curl, &f, now, &mut store), Verdict::New);
            assert_eq!(m.judge(&cfg, &curl, &f, now, &mut store), Verdict::Known);
            assert_eq!(m.judge(&cfg, &wget, &f, now, &mut store), Verdict::New);
            let other_port = flow("192.0.2.1", 80);
            assert_eq!(
                m.judge(&cfg, &curl, &other_port, now, &mut store),
                Verdict::New
            );
        }
        let mut store = Store::open(dir.path()).unwrap();
        let mut m = Memory::default();
        assert_eq!(m.judge(&cfg, &curl, &f, now, &mut store), Verdict::Known);
        let excluding = Novelty {
            exclude_identities: vec!["/usr/bin/curl".into()],
            ..Novelty::default()
        };
        let g = flow("192.0.2.9", 443);
        assert_eq!(
            m.judge(&excluding, &curl, &g, now, &mut store),
            Verdict::Excluded
        );
    }

    #[test]
    fn the_learning_period_counts_from_the_first_start() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Novelty {
            learn: Duration::from_secs(3600),
            ..Novelty::default()
        };
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        {
            let mut store = Store::open(dir.path()).unwrap();
            assert!(Memory::default().learning(&cfg, t0, &mut store));
        }
        let mut store = Store::open(dir.path()).unwrap();
        let mut m = Memory::default();
        assert!(m.learning(&cfg, t0 + Duration::from_secs(3599), &mut store));
        let mut m = Memory::default();
        assert!(!m.learning(&cfg, t0 + Duration::from_secs(3600), &mut store));
        assert!(!Memory::default().learning(&Novelty::default(), t0, &mut store));
    }
}
