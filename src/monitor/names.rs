//! New names under a wildcard (`[novelty]`): `name-new` from the DNS guard,
//! `proxy-new` from the proxy.
//!
//! A name a rule allows only through a wildcard (`*.githubusercontent.com`)
//! is where a second stage hides behind an allowed domain. The guard and the
//! proxy see every name with the process asking for it; on their own threads
//! they keep a bounded [`Filter`] of the (identity, name) pairs they already
//! handed to the daemon, so a repeat costs one hash lookup and no store I/O.
//! The daemon decides with the store ([`judge`], the `seen` table under the
//! protocols `name:dns` and `name:proxy`), which remembers across restarts
//! and evicts the least recently seen past `--max-seen`. Names a rule writes
//! out are never novelty: the operator named them.

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use crate::monitor::attribution::{Attribution, Identity};
use crate::monitor::event::{DnsQuestion, ProxyRequest};
use crate::monitor::novelty::{excluded, identity_key, Verdict};
use crate::monitor::store::Store;
use crate::policy::{HostPattern, Novelty};

/// (identity, name) pairs a guard or proxy filter holds before it starts
/// forgetting the older half (forgotten pairs are asked of the store again).
pub const FILTER_CAP: usize = 65_536;

/// The `seen` table's protocol for names asked of the DNS guard.
pub const DNS_PROTOCOL: &str = "name:dns";
/// ... and for hosts asked of the proxy (the port is part of the key).
pub const PROXY_PROTOCOL: &str = "name:proxy";

/// The rule whose wildcard alone allows `name`, and that wildcard: the first
/// tracked rule (`tracked`) with a wildcard matching it, unless some rule
/// (tracked or not) writes the name out. `rules` are (rule, its patterns).
/// Walks the patterns without allocating: it runs on every guard query.
pub fn watched<'a>(
    rules: impl IntoIterator<Item = (&'a str, &'a [HostPattern], bool)>,
    name: &str,
) -> Option<(&'a str, &'a HostPattern)> {
    let mut found = None;
    for (rule, patterns, tracked) in rules {
        for p in patterns {
            if !p.matches(name) {
                continue;
            }
            if !p.is_wildcard() {
                return None;
            }
            if tracked && found.is_none() {
                found = Some((rule, p));
            }
        }
    }
    found
}

/// The (identity, name) pairs already handed to the daemon. Two
/// generations: when the current one is half the cap, it becomes the
/// previous one and the old previous is forgotten, so memory stays bounded
/// and a pair asked often stays known (a hit in the previous generation
/// moves it to the current one).
#[derive(Debug)]
pub struct Filter {
    current: HashSet<u64>,
    previous: HashSet<u64>,
    hasher: RandomState,
    cap: usize,
}

impl Default for Filter {
    fn default() -> Self {
        Filter::new(FILTER_CAP)
    }
}

impl Filter {
    pub fn new(cap: usize) -> Filter {
        Filter {
            current: HashSet::new(),
            previous: HashSet::new(),
            hasher: RandomState::new(),
            cap: cap.max(2),
        }
    }

    /// True the first time `who` asks `name` (on `port`; 0 for DNS) since
    /// the filter last forgot the pair: then it is to be handed over.
    pub fn first(&mut self, who: &Identity, name: &str, port: u16) -> bool {
        let h = self.hasher.hash_one((who, name, port));
        if self.current.contains(&h) {
            return false;
        }
        let known = self.previous.remove(&h);
        self.current.insert(h);
        if self.current.len() >= self.cap / 2 {
            self.previous = std::mem::take(&mut self.current);
        }
        !known
    }

    /// Pairs held (a metric).
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets everything (the rules changed: what they allow is new).
    pub fn clear(&mut self) {
        self.current.clear();
        self.previous.clear();
    }
}

/// `filter.first(who, name, port)` under its lock, keeping the gauge of
/// pairs `held` and the count of `new` ones (the guard's and the proxy's
/// books) up to date.
pub fn first_counted(
    filter: &Mutex<Filter>,
    (who, name, port): (&Identity, &str, u16),
    held: &AtomicU64,
    new: &AtomicU64,
) -> bool {
    let mut f = filter.lock().unwrap_or_else(PoisonError::into_inner);
    let first = f.first(who, name, port);
    held.store(f.len() as u64, Ordering::Relaxed);
    if first {
        new.fetch_add(1, Ordering::Relaxed);
    }
    first
}

/// Where a new name was asked.
#[derive(Debug, Clone)]
pub enum Asked {
    /// A query to the DNS guard.
    Dns(DnsQuestion),
    /// A request to the proxy (its reason is empty: it was allowed).
    Proxy(ProxyRequest),
}

/// A name (or proxy host) the guard or the proxy handed to the daemon: the
/// first time its filter saw this identity ask it.
#[derive(Debug, Clone)]
pub struct NameSeen {
    pub asked: Asked,
    /// The rule that allowed it, and the wildcard of that rule that matched.
    pub rule: String,
    pub pattern: String,
    pub attribution: Attribution,
    pub at: SystemTime,
}

impl NameSeen {
    /// The name as asked (wire form).
    pub fn name(&self) -> &str {
        match &self.asked {
            Asked::Dns(q) => &q.name,
            Asked::Proxy(p) => &p.host,
        }
    }
}

/// Whether `identity` asking `seen` is new, recording it in the store if so.
/// A store error reports the name (better twice than never).
pub fn judge(cfg: &Novelty, identity: &Identity, seen: &NameSeen, store: &mut Store) -> Verdict {
    let who = identity_key(identity);
    if excluded(cfg, identity, &who) {
        return Verdict::Excluded;
    }
    let (port, protocol) = match &seen.asked {
        Asked::Dns(_) => (0, DNS_PROTOCOL),
        Asked::Proxy(p) => (p.port, PROXY_PROTOCOL),
    };
    let new = store
        .first_attempt(&who, seen.name(), port, protocol, seen.at)
        .unwrap_or_else(|e| {
            tracing::warn!("recording a new name in the store: {e:#}");
            true
        });
    if new {
        Verdict::New
    } else {
        Verdict::Known
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn p(s: &str) -> HostPattern {
        HostPattern::parse(s).unwrap()
    }

    #[test]
    fn only_a_wildcard_of_a_tracked_rule_makes_a_name_novel() {
        let web = [p("*.githubusercontent.com"), p("api.github.com")];
        let cdn = [p("*.cdn.test")];
        let named = [p("raw.githubusercontent.com")];
        let rules = |cdn_tracked: bool| {
            vec![
                ("named", &named[..], false),
                ("web", &web[..], true),
                ("cdn", &cdn[..], cdn_tracked),
            ]
        };
        let w = watched(rules(true), "gist.githubusercontent.com").unwrap();
        assert_eq!(
            (w.0, w.1.to_string().as_str()),
            ("web", "*.githubusercontent.com")
        );
        // Written out by some rule, even one novelty does not track.
        assert_eq!(watched(rules(true), "raw.githubusercontent.com"), None);
        assert_eq!(watched(rules(true), "api.github.com"), None);
        assert_eq!(watched(rules(true), "other.test"), None);
        assert!(watched(rules(true), "x.cdn.test").is_some());
        assert_eq!(watched(rules(false), "x.cdn.test"), None, "excluded rule");
    }

    #[test]
    fn the_filter_hands_over_each_pair_once_and_stays_bounded() {
        let curl = Identity::Executable("/usr/bin/curl".into());
        let wget = Identity::Executable("/usr/bin/wget".into());
        let mut f = Filter::new(8);
        assert!(f.first(&curl, "a.example.com", 0));
        assert!(!f.first(&curl, "a.example.com", 0));
        assert!(f.first(&wget, "a.example.com", 0));
        assert!(f.first(&curl, "a.example.com", 443), "another port");
        // A pair asked often survives the turnover of generations.
        for i in 0..1000 {
            f.first(&curl, &format!("n{i}.example.com"), 0);
            assert!(!f.first(&curl, "a.example.com", 0));
            assert!(f.len() <= 8);
        }
        // A pair not asked for two generations is forgotten (the store decides).
        assert!(f.first(&wget, "a.example.com", 0));
        f.clear();
        assert!(f.is_empty());
    }

    #[test]
    fn the_store_remembers_names_per_identity_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Novelty::default();
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let curl = Identity::Executable("/usr/bin/curl".into());
        let wget = Identity::Executable("/usr/bin/wget".into());
        let seen = |name: &str| NameSeen {
            asked: Asked::Dns(DnsQuestion {
                name: name.into(),
                qtype: "A".into(),
                client: "127.0.0.1:5300".parse().unwrap(),
                transport: "udp",
            }),
            rule: "web".into(),
            pattern: "*.example.com".into(),
            attribution: Attribution::unknown(),
            at,
        };
        let proxied = NameSeen {
            asked: Asked::Proxy(ProxyRequest {
                host: "a.example.com".into(),
                port: 443,
                method: "CONNECT".into(),
                client: "127.0.0.1:41000".parse().unwrap(),
                reason: String::new(),
                ip: None,
            }),
            ..seen("a.example.com")
        };
        {
            let mut store = Store::open(dir.path()).unwrap();
            assert_eq!(
                judge(&cfg, &curl, &seen("a.example.com"), &mut store),
                Verdict::New
            );
            assert_eq!(
                judge(&cfg, &curl, &seen("a.example.com"), &mut store),
                Verdict::Known
            );
            assert_eq!(
                judge(&cfg, &wget, &seen("a.example.com"), &mut store),
                Verdict::New
            );
            // Asked through the proxy is another memory.
            assert_eq!(judge(&cfg, &curl, &proxied, &mut store), Verdict::New);
        }
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(
            judge(&cfg, &curl, &seen("a.example.com"), &mut store),
            Verdict::Known
        );
        assert_eq!(judge(&cfg, &curl, &proxied, &mut store), Verdict::Known);
        let excluding = Novelty {
            exclude_identities: vec!["/usr/bin/curl".into()],
            ..Novelty::default()
        };
        assert_eq!(
            judge(&excluding, &curl, &seen("b.example.com"), &mut store),
            Verdict::Excluded
        );
    }
}
