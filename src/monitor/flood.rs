//! Floods: what one identity does to everybody else's signal.
//!
//! Two parts. [`hand_over`] is how the DNS guard and the proxy give their
//! refusals to the daemon without ever waiting on it: a full pipeline drops
//! the report, never the answer, and every drop is counted ([`Dropped`]) so it
//! enters the books. [`Limiter`] is a token bucket per identity on *new*
//! incidents, inside a bigger one per uid: past its burst, an identity's new
//! destinations fold into one `flood` incident with counts, and past the
//! account's, all of that account's do, so one process (or one account
//! under many program names) cannot bury the first attempts of every other. Pure apart from the atomics; time is passed in.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::time::{Duration, SystemTime};

use crate::monitor::attribution::Identity;
use crate::monitor::event::Subject;
use crate::monitor::incident::IncidentKey;

/// Reports the DNS guard and the proxy could not hand to the daemon:
/// refusals, and new names under a wildcard (`[novelty]`).
#[derive(Debug, Default)]
pub struct Dropped {
    pub dns: AtomicU64,
    pub proxy: AtomicU64,
}

/// Sends without blocking the sender; a full (or closed) pipeline counts the
/// report in `dropped` instead of losing it silently.
pub fn hand_over<T>(tx: &SyncSender<T>, item: T, dropped: &AtomicU64) {
    if tx.try_send(item).is_err() {
        dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// Whose new incidents a bucket limits: the identity, and the uid and unit
/// an incident key carries (the same executable run by two users is two
/// identities here too, so one user's flood never folds another's attempts).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Who {
    pub identity: Identity,
    pub uid: Option<u32>,
    pub unit: Option<String>,
}

impl Who {
    pub fn of(key: &IncidentKey) -> Who {
        Who {
            identity: key.identity.clone(),
            uid: key.uid,
            unit: key.unit.clone(),
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: SystemTime,
    /// The open flood incident of this identity, if it is flooding.
    flood: Option<u64>,
}

/// What a flood incident says about what it folded (cheap to clone: the
/// set of destinations seen stays in the aggregator).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FloodSummary {
    /// Distinct destinations (exact up to [`MAX_TRACKED`], then a lower bound).
    pub destinations: u64,
    /// More destinations were seen than could be told apart: `destinations` is a lower bound.
    pub capped: bool,
    /// The first few destinations, as `event::destination` writes them.
    pub sample: Vec<String>,
}

/// Destinations one flood incident tells apart; past it they still count as attempts.
pub const MAX_TRACKED: usize = 65_536;
/// Destinations all open floods together tell apart (bounds memory when
/// many identities flood at once: 8 bytes and a hash slot each).
pub const MAX_TRACKED_TOTAL: usize = 262_144;
pub const SAMPLE: usize = 5;
/// A sample entry longer than this is cut (names are bounded already; this
/// keeps a flood document small whatever a proxy host holds).
const SAMPLE_CHARS: usize = 300;

/// Per-identity token buckets on new incidents, inside one per account.
#[derive(Debug)]
pub struct Limiter {
    /// New incidents an identity may open at once.
    pub burst: f64,
    /// ... and per second after that.
    pub per_second: f64,
    /// New incidents all identities of one uid may open at once. An
    /// identity is an executable, and an account can copy its binary under
    /// as many names as it likes: without this outer bucket each copy would
    /// bring a fresh `burst`. Three identities' worth: a service account
    /// running a few programs keeps every first attempt; past it, what that
    /// account does folds into one `flood` incident for the uid.
    pub user_burst: f64,
    /// ... and per second after that (three identities' rate).
    pub user_per_second: f64,
    /// A flood with no new attempt for this long is over: its incident
    /// closes and the identity's next new destination is an incident again.
    pub quiet: Duration,
    buckets: HashMap<Who, Bucket>,
    /// Keyed on the uid (`None`: attempts no uid is known for).
    users: HashMap<Option<u32>, Bucket>,
    last_sweep: Option<SystemTime>,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter {
            burst: 100.0,
            per_second: 10.0,
            user_burst: 300.0,
            user_per_second: 30.0,
            quiet: Duration::from_secs(10),
            buckets: HashMap::new(),
            users: HashMap::new(),
            last_sweep: None,
        }
    }
}

/// What [`Limiter::admit`] decided for a new incident.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Within both rates: an incident of its own.
    Open,
    /// The identity is over its rate: fold into the identity's flood.
    Identity,
    /// The account is over its rate (whichever identity asks): fold into
    /// the account's flood, keyed on its uid alone.
    User,
}

fn refill(b: &mut Bucket, at: SystemTime, rate: f64, burst: f64) {
    // A clock going back refills nothing; it never drains either.
    let dt = at.duration_since(b.at).unwrap_or_default().as_secs_f64();
    b.tokens = (b.tokens + dt * rate).min(burst);
    b.at = b.at.max(at);
}

impl Limiter {
    /// The open flood incident `who`'s new destinations fold into: its own,
    /// else its account's.
    pub fn flood_of(&self, who: &Who) -> Option<u64> {
        self.buckets
            .get(who)
            .and_then(|b| b.flood)
            .or_else(|| self.users.get(&who.uid).and_then(|b| b.flood))
    }

    /// Takes a token from the identity's bucket and its account's for a new
    /// incident; if either is empty, neither is taken and the answer says
    /// which flood the attempt belongs to.
    pub fn admit(&mut self, who: &Who, at: SystemTime) -> Admit {
        let user = self.users.entry(who.uid).or_insert(Bucket {
            tokens: self.user_burst,
            at,
            flood: None,
        });
        refill(user, at, self.user_per_second, self.user_burst);
        if user.tokens < 1.0 {
            return Admit::User;
        }
        let b = self.buckets.entry(who.clone()).or_insert(Bucket {
            tokens: self.burst,
            at,
            flood: None,
        });
        refill(b, at, self.per_second, self.burst);
        if b.tokens < 1.0 {
            return Admit::Identity;
        }
        b.tokens -= 1.0;
        user.tokens -= 1.0;
        Admit::Open
    }

    /// Notes (or ends) the flood incident of an identity ([`Admit::Identity`])
    /// or of its account ([`Admit::User`]).
    pub fn set_flood(&mut self, who: &Who, level: Admit, id: Option<u64>) {
        let b = match level {
            Admit::User => self.users.get_mut(&who.uid),
            _ => self.buckets.get_mut(who),
        };
        if let Some(b) = b {
            b.flood = id;
        }
    }

    /// Forgets flood incident `id` wherever it is noted (it closed).
    pub fn end_flood(&mut self, who: &Who, id: u64) {
        if let Some(b) = self.buckets.get_mut(who) {
            if b.flood == Some(id) {
                b.flood = None;
            }
        }
        if let Some(b) = self.users.get_mut(&who.uid) {
            if b.flood == Some(id) {
                b.flood = None;
            }
        }
    }

    /// Forgets buckets that are full again and not flooding (a full bucket
    /// is what a missing one means), at most once per `quiet`.
    pub fn sweep(&mut self, now: SystemTime) {
        if self
            .last_sweep
            .is_some_and(|t| now.duration_since(t).unwrap_or_default() < self.quiet)
        {
            return;
        }
        self.last_sweep = Some(now);
        let keep = |b: &Bucket, rate: f64, burst: f64| {
            let dt = now.duration_since(b.at).unwrap_or_default().as_secs_f64();
            b.flood.is_some() || b.tokens + dt * rate < burst
        };
        let (burst, rate) = (self.burst, self.per_second);
        self.buckets.retain(|_, b| keep(b, rate, burst));
        let (burst, rate) = (self.user_burst, self.user_per_second);
        self.users.retain(|_, b| keep(b, rate, burst));
    }

    pub fn len(&self) -> usize {
        self.buckets.len() + self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty() && self.users.is_empty()
    }
}

/// One folded destination for a flood's sample: `10.0.0.1:80/tcp`,
/// `x.example A (dns)`, `host:443 (proxy)`.
pub fn describe(subject: &Subject) -> String {
    let mut s = match subject {
        Subject::ProxyRequest(p) => format!("{}:{} (proxy)", p.host, p.port),
        Subject::ProxyNew(n) => format!("{}:{} (proxy)", n.request.host, n.request.port),
        Subject::DnsQuery(q) => format!("{} {} (dns)", q.name, q.qtype),
        Subject::NameNew(n) => format!("{} {} (dns)", n.question.name, n.question.qtype),
        Subject::Packet(Some(f)) | Subject::Revalidated(f) | Subject::AllowedNew(f) => {
            let ip = match f.dst {
                std::net::IpAddr::V6(v6) if f.dst_port().is_some() => format!("[{v6}]"),
                other => other.to_string(),
            };
            match f.dst_port() {
                Some(p) => format!("{ip}:{p}/{}", f.transport()),
                None => format!("{ip}/{}", f.transport()),
            }
        }
        Subject::Packet(None) | Subject::Flood(_) => "?".into(),
    };
    if s.chars().count() > SAMPLE_CHARS {
        s = s.chars().take(SAMPLE_CHARS).collect();
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(uid: u32) -> Who {
        Who {
            identity: Identity::Uid(uid),
            uid: Some(uid),
            unit: None,
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let mut l = Limiter {
            burst: 3.0,
            per_second: 1.0,
            ..Limiter::default()
        };
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let a = who(1);
        assert!((0..3).all(|_| l.admit(&a, t0) == Admit::Open));
        assert_eq!(l.admit(&a, t0), Admit::Identity);
        // Another identity has its own bucket.
        assert_eq!(l.admit(&who(2), t0), Admit::Open);
        assert_eq!(l.admit(&a, t0 + Duration::from_secs(1)), Admit::Open);
        assert_eq!(l.admit(&a, t0 + Duration::from_secs(1)), Admit::Identity);
        // A clock stepping back neither refills nor panics.
        assert_eq!(l.admit(&a, t0), Admit::Identity);
    }

    fn exe(uid: u32, name: &str) -> Who {
        Who {
            identity: Identity::Executable(name.into()),
            uid: Some(uid),
            unit: None,
        }
    }

    /// One account under a thousand executable names gets its account's
    /// burst, not a thousand identities' worth; another account is untouched.
    #[test]
    fn renamed_copies_share_their_accounts_bucket() {
        let mut l = Limiter::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let mut opened = 0;
        let mut folded = 0;
        for i in 0..1000 {
            for _ in 0..5 {
                match l.admit(&exe(65534, &format!("/tmp/copy{i}")), t0) {
                    Admit::Open => opened += 1,
                    Admit::User => folded += 1,
                    Admit::Identity => panic!("each copy is within its own rate"),
                }
            }
        }
        assert_eq!((opened, folded), (300, 4700));
        assert_eq!(l.admit(&exe(1000, "/usr/bin/curl"), t0), Admit::Open);
        // The account refills at its own rate.
        let t1 = t0 + Duration::from_secs(1);
        let n = (0..100)
            .filter(|i| l.admit(&exe(65534, &format!("/tmp/again{i}")), t1) == Admit::Open)
            .count();
        assert_eq!(n, 30);
        // An account flood is found from any of its identities, and ends.
        l.set_flood(&exe(65534, "/tmp/copy1"), Admit::User, Some(9));
        assert_eq!(l.flood_of(&exe(65534, "/tmp/other")), Some(9));
        assert_eq!(l.flood_of(&exe(1000, "/usr/bin/curl")), None);
        l.end_flood(&exe(65534, "/tmp/x"), 9);
        assert_eq!(l.flood_of(&exe(65534, "/tmp/other")), None);
    }

    #[test]
    fn full_idle_buckets_are_forgotten_flooding_ones_kept() {
        let mut l = Limiter::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        l.admit(&who(1), t0);
        l.admit(&who(2), t0);
        l.set_flood(&who(2), Admit::Identity, Some(7));
        l.sweep(t0 + Duration::from_secs(60));
        assert_eq!(l.len(), 1);
        assert_eq!(l.flood_of(&who(2)), Some(7));
    }

    #[test]
    fn a_full_pipeline_counts_what_it_drops() {
        let (tx, rx) = std::sync::mpsc::sync_channel(2);
        let dropped = AtomicU64::new(0);
        for i in 0..5 {
            hand_over(&tx, i, &dropped);
        }
        assert_eq!(dropped.load(Ordering::Relaxed), 3);
        drop(rx);
        hand_over(&tx, 9, &dropped);
        assert_eq!(dropped.load(Ordering::Relaxed), 4);
    }
}
