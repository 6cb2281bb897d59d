//! Revalidation on block. Programs keep addresses longer than their TTL
//! (nginx resolves `proxy_pass` names once, a JVM may cache forever,
//! connection pools redial what they got), and once the kernel forgot such an
//! address their next connection is blocked although the name still resolves
//! to it. When the guard once put that address into a rule's set for a name,
//! the monitor asks here: the name is looked up again (marked, like every
//! guard query), and if the fresh answer still holds the address it goes back
//! into the sets of the rules that allow the name *now*, before the client's
//! retransmission; otherwise the address is stale and stays blocked.
//!
//! This opens nothing a fresh lookup would not: the address must be in the
//! current answer, the rules are matched under the current policy, and a
//! client that never had the guard resolve the name gets nothing (the memory
//! is filled only by the guard's own answers). Upstream lookups are capped
//! and answers reused, so a flood of blocked packets cannot become a flood of
//! queries. Pure: time is an argument; the guard does the I/O.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How long the guard remembers which name an address it allowed came from.
pub const REMEMBER_FOR: Duration = Duration::from_secs(24 * 3600);
/// Upstream lookups started by revalidation: sustained rate and burst.
pub const LOOKUPS_PER_SECOND: f64 = 20.0;
pub const LOOKUP_BURST: f64 = 40.0;
/// An upstream answer serves every revalidation of its name for its TTL,
/// within these bounds (at least a retransmission's worth, at most half a
/// minute so a moved name is noticed).
const ANSWER_REUSE_MIN: Duration = Duration::from_secs(2);
const ANSWER_REUSE_MAX: Duration = Duration::from_secs(30);
const ANSWERS_MAX: usize = 10_000;
const IN_FLIGHT_MAX: usize = 1_000;

/// What became of one revalidation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The name still resolves to the address: it is back in these rules'
    /// sets for `timeout`.
    StillResolves {
        rules: Vec<String>,
        timeout: Duration,
    },
    /// The name resolves to other addresses now (at most a few are kept).
    Stale { current: Vec<IpAddr> },
    /// No rule allows the name any more: the policy changed.
    NotAllowed,
    /// Too many revalidations at once: the packet is reported as blocked.
    Limited,
    /// The upstream did not answer, or the kernel write failed.
    Failed(String),
}

impl Outcome {
    /// ECS-friendly one word, for `egret.revalidation.outcome`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::StillResolves { .. } => "revalidated",
            Outcome::Stale { .. } => "stale",
            Outcome::NotAllowed => "not-allowed",
            Outcome::Limited => "limited",
            Outcome::Failed(_) => "failed",
        }
    }
}

/// The answer to "may this blocked address be revalidated?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A lookup (or a reused answer) runs; its result comes back once.
    Started { name: String },
    /// A revalidation of this address already runs; its result covers this packet.
    Pending { name: String },
    /// Over the lookup cap.
    Limited { name: String },
}

/// The revalidator's counts are the books' own type: the daemon stores them as they are.
pub use crate::monitor::books::RevalidationCounts as Stats;

/// Lookup cap, reused answers and what is in flight.
pub struct Revalidator {
    tokens: f64,
    refilled: Option<Instant>,
    answers: HashMap<String, (Vec<(IpAddr, u32)>, Instant)>,
    in_flight: HashSet<IpAddr>,
    pub stats: Stats,
}

/// What the guard should do for a started revalidation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// Ask the upstream for the name.
    Lookup,
    /// Use this answer, fetched moments ago.
    Reuse(Vec<(IpAddr, u32)>),
}

impl Default for Revalidator {
    fn default() -> Self {
        Revalidator {
            tokens: LOOKUP_BURST,
            refilled: None,
            answers: HashMap::new(),
            in_flight: HashSet::new(),
            stats: Stats::default(),
        }
    }
}

impl Revalidator {
    /// Called for a blocked address the guard remembers under `name`.
    pub fn begin(&mut self, address: IpAddr, name: &str, now: Instant) -> (Request, Option<Work>) {
        if self.in_flight.contains(&address) {
            return (
                Request::Pending {
                    name: name.to_string(),
                },
                None,
            );
        }
        let reused = self
            .answers
            .get(name)
            .filter(|(_, until)| *until > now)
            .map(|(a, _)| a.clone());
        let work = match reused {
            Some(answer) => Work::Reuse(answer),
            None if self.in_flight.len() < IN_FLIGHT_MAX && self.take_token(now) => Work::Lookup,
            None => {
                self.stats.limited += 1;
                return (
                    Request::Limited {
                        name: name.to_string(),
                    },
                    None,
                );
            }
        };
        if work == Work::Lookup {
            self.stats.lookups += 1;
        }
        self.stats.started += 1;
        self.in_flight.insert(address);
        (
            Request::Started {
                name: name.to_string(),
            },
            Some(work),
        )
    }

    /// Keeps an upstream answer for the other addresses of the same name.
    pub fn answered(&mut self, name: &str, answer: &[(IpAddr, u32)], now: Instant) {
        let ttl = answer.iter().map(|&(_, t)| t).min().unwrap_or(0);
        let reuse = Duration::from_secs(ttl.into()).clamp(ANSWER_REUSE_MIN, ANSWER_REUSE_MAX);
        if self.answers.len() >= ANSWERS_MAX {
            self.answers.retain(|_, (_, until)| *until > now);
            if self.answers.len() >= ANSWERS_MAX {
                self.answers.clear();
            }
        }
        self.answers
            .insert(name.to_string(), (answer.to_vec(), now + reuse));
    }

    /// The revalidation of `address` ended with `outcome`.
    pub fn finish(&mut self, address: IpAddr, outcome: &Outcome) {
        self.in_flight.remove(&address);
        match outcome {
            Outcome::StillResolves { .. } => self.stats.revalidated += 1,
            Outcome::Stale { .. } | Outcome::NotAllowed => self.stats.stale += 1,
            Outcome::Limited => self.stats.limited += 1,
            Outcome::Failed(_) => self.stats.failed += 1,
        }
    }

    /// After a reload: the rules may differ, answers are asked again.
    pub fn forget_answers(&mut self) {
        self.answers.clear();
    }

    fn take_token(&mut self, now: Instant) -> bool {
        let last = *self.refilled.get_or_insert(now);
        let earned = now.saturating_duration_since(last).as_secs_f64() * LOOKUPS_PER_SECOND;
        self.tokens = (self.tokens + earned).min(LOOKUP_BURST);
        self.refilled = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Decides from a fresh answer; `rules` are those that allow the name now.
pub fn judge(
    address: IpAddr,
    answer: &[(IpAddr, u32)],
    rules: Vec<String>,
    timeout_for: impl Fn(u32) -> Duration,
) -> Outcome {
    if rules.is_empty() {
        return Outcome::NotAllowed;
    }
    match answer.iter().find(|(ip, _)| *ip == address) {
        Some(&(_, ttl)) => Outcome::StillResolves {
            rules,
            timeout: timeout_for(ttl),
        },
        None => {
            let mut current: Vec<IpAddr> = answer.iter().map(|&(ip, _)| ip).collect();
            current.sort();
            current.dedup();
            current.truncate(4);
            Outcome::Stale { current }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_running_revalidation_covers_later_packets_to_the_same_address() {
        let mut r = Revalidator::default();
        let now = Instant::now();
        let (req, work) = r.begin(ip("10.0.0.1"), "a.test", now);
        assert_eq!(
            req,
            Request::Started {
                name: "a.test".into()
            }
        );
        assert_eq!(work, Some(Work::Lookup));
        let (req, work) = r.begin(ip("10.0.0.1"), "a.test", now);
        assert_eq!(
            req,
            Request::Pending {
                name: "a.test".into()
            }
        );
        assert_eq!(work, None);
        r.finish(ip("10.0.0.1"), &Outcome::Stale { current: vec![] });
        let (req, _) = r.begin(ip("10.0.0.1"), "a.test", now);
        assert!(matches!(req, Request::Started { .. }));
        assert_eq!(r.stats.lookups, 2);
    }

    #[test]
    fn one_answer_serves_every_address_of_its_name_for_its_ttl() {
        let mut r = Revalidator::default();
        let now = Instant::now();
        let answer = vec![(ip("10.0.0.1"), 10), (ip("10.0.0.2"), 10)];
        r.begin(ip("10.0.0.1"), "a.test", now);
        r.answered("a.test", &answer, now);
        let (_, work) = r.begin(ip("10.0.0.2"), "a.test", now + Duration::from_secs(5));
        assert_eq!(work, Some(Work::Reuse(answer)));
        let (_, work) = r.begin(ip("10.0.0.3"), "a.test", now + Duration::from_secs(11));
        assert_eq!(work, Some(Work::Lookup), "reused no longer than its TTL");
        assert_eq!(r.stats.lookups, 2);
    }

    #[test]
    fn lookups_are_capped_at_the_burst_then_the_rate() {
        let mut r = Revalidator::default();
        let now = Instant::now();
        let mut started = 0;
        for i in 0..100u32 {
            let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            if let (Request::Started { .. }, _) = r.begin(a, &format!("n{i}.test"), now) {
                started += 1;
            }
        }
        assert_eq!(started, LOOKUP_BURST as u32);
        assert_eq!(r.stats.limited, 100 - LOOKUP_BURST as u64);
        // One second later, one second's worth more.
        let later = now + Duration::from_secs(1);
        let more = (200..300u32)
            .filter(|i| {
                let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
                matches!(
                    r.begin(a, &format!("n{i}.test"), later).0,
                    Request::Started { .. }
                )
            })
            .count();
        assert_eq!(more, LOOKUPS_PER_SECOND as usize);
    }

    #[test]
    fn only_an_address_the_name_still_has_is_revalidated_and_only_for_rules_that_allow_it_now() {
        let answer = vec![(ip("10.0.0.2"), 30), (ip("10.0.0.1"), 30)];
        let t = |ttl: u32| Duration::from_secs(ttl.into()) + Duration::from_secs(1);
        assert_eq!(
            judge(ip("10.0.0.1"), &answer, vec!["web".into()], t),
            Outcome::StillResolves {
                rules: vec!["web".into()],
                timeout: Duration::from_secs(31)
            }
        );
        assert_eq!(
            judge(ip("10.0.0.9"), &answer, vec!["web".into()], t),
            Outcome::Stale {
                current: vec![ip("10.0.0.1"), ip("10.0.0.2")]
            }
        );
        assert_eq!(
            judge(ip("10.0.0.1"), &answer, vec![], t),
            Outcome::NotAllowed
        );
    }
}
