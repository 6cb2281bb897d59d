//! Deduplication: packets become incidents. A blocked TCP connect retries its
//! SYN for minutes and a UDP client resends: one incident each, not hundreds
//! of events. Pure: time is passed in, so tests drive it directly.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, SystemTime};

use crate::monitor::attribution::{Attribution, Identity};
use crate::monitor::event::{Action, ResolvedName, Subject, SubjectKey};
use crate::monitor::flood::{
    describe, Admit, Limiter, Who, MAX_TRACKED, MAX_TRACKED_TOTAL, SAMPLE,
};
use crate::monitor::nflog::LoggedVerdict;
#[cfg(test)]
use crate::monitor::packet::Flow;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IncidentKey {
    pub verdict: LoggedVerdict,
    pub identity: Identity,
    /// The sender's uid and unit, which policy rules can name: the same
    /// executable run by two users or from two units is two incidents, so
    /// `egret suggest` sees both.
    pub uid: Option<u32>,
    pub unit: Option<String>,
    /// Destination, port and protocol; the (name, type) of a query; the host
    /// of a proxy request; nothing for a flood (it folds destinations).
    pub subject: SubjectKey,
}

/// One thing the monitor saw: a logged packet, a refused query or proxy request.
#[derive(Debug, Clone)]
pub struct Observation<'a> {
    pub verdict: &'a LoggedVerdict,
    pub subject: Subject,
    pub attribution: &'a Attribution,
    pub resolved: Option<&'a ResolvedName>,
    pub at: SystemTime,
}

impl Observation<'_> {
    pub fn action(&self) -> Action {
        self.subject.action(self.verdict.blocked)
    }
}

#[derive(Debug, Clone)]
pub struct Incident {
    pub id: u64,
    pub key: IncidentKey,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    pub count: u64,
    /// The first observation's subject (later ones differ only in source
    /// port and timing); a flood's summary of what it folded.
    pub subject: Subject,
    /// The host name behind the destination address, if the guard resolved
    /// it. Boxed: most incidents have none, and an open incident's size is
    /// what a port scan multiplies.
    pub resolved: Option<Box<ResolvedName>>,
    pub attribution: Attribution,
    emitted_count: u64,
    emitted_at: SystemTime,
}

impl Incident {
    /// ECS `event.action`.
    pub fn action(&self) -> Action {
        self.subject.action(self.key.verdict.blocked)
    }
}

/// Index entry: (time, id). Ids are unique, so entries never collide.
type Aged = (SystemTime, u64);

pub struct Aggregator {
    /// Boxed: an incident is ~1.5 KB inline, and the table keeps spare slots.
    open: HashMap<u64, Box<Incident>>,
    ids: HashMap<IncidentKey, u64>,
    /// Open incidents by last packet: eviction and idle closing take the
    /// oldest in O(log n) instead of scanning the table (a flood keeps it full).
    by_age: BTreeSet<Aged>,
    /// Incidents whose count grew since their last emission, by that
    /// emission's time: `due` takes the front instead of scanning.
    dirty: BTreeSet<Aged>,
    /// Closed to make room (or reopened after idling) with an update not yet
    /// emitted: `due` hands them out, so no count is ever lost.
    closed_dirty: Vec<Incident>,
    /// Destinations each open flood incident has seen (hashes), by incident id.
    flood_seen: HashMap<u64, HashSet<u64>>,
    flood_tracked: usize,
    hasher: RandomState,
    next_id: u64,
    /// Repeats are emitted at most this often per incident.
    pub update_every: Duration,
    /// An incident with no packet for this long is closed; the next packet opens a new one.
    pub idle_close: Duration,
    /// Bound on open incidents: the oldest idle one is closed to make room.
    pub max_open: usize,
    /// Per-identity rate of new incidents; past it they fold into a flood incident.
    pub floods: Limiter,
}

impl Aggregator {
    pub fn new(first_id: u64) -> Aggregator {
        Aggregator {
            open: HashMap::new(),
            ids: HashMap::new(),
            by_age: BTreeSet::new(),
            dirty: BTreeSet::new(),
            closed_dirty: Vec::new(),
            flood_seen: HashMap::new(),
            flood_tracked: 0,
            hasher: RandomState::new(),
            next_id: first_id.max(1),
            update_every: Duration::from_secs(5),
            idle_close: Duration::from_secs(600),
            max_open: 50_000,
            floods: Limiter::default(),
        }
    }

    /// Records one packet (tests' shorthand for [`Aggregator::record`]).
    #[cfg(test)]
    pub fn observe(
        &mut self,
        verdict: &LoggedVerdict,
        flow: Option<&Flow>,
        attribution: &Attribution,
        at: SystemTime,
    ) -> Option<&Incident> {
        self.record(Observation {
            verdict,
            subject: Subject::Packet(flow.copied()),
            attribution,
            resolved: None,
            at,
        })
    }

    /// Records one observation. Returns the incident when it is new (emit
    /// now): a first attempt, or the start of an identity's flood.
    pub fn record(&mut self, o: Observation<'_>) -> Option<&Incident> {
        let at = o.at;
        let key = IncidentKey {
            verdict: o.verdict.clone(),
            identity: o.attribution.identity(),
            uid: o.attribution.uid,
            unit: o.attribution.unit.clone(),
            subject: o.subject.key(),
        };
        if let Some(&id) = self.ids.get(&key) {
            let fresh = self.open.get(&id).is_some_and(|inc| {
                at.duration_since(inc.last_seen).unwrap_or_default() < self.idle_close
            });
            if fresh {
                self.bump(id, at);
                return None;
            }
            self.close(id);
        }
        let who = Who::of(&key);
        if let Some(flood) = self.floods.flood_of(&who) {
            let flooding = self.open.get(&flood).is_some_and(|inc| {
                at.duration_since(inc.last_seen).unwrap_or_default() < self.floods.quiet
            });
            if flooding {
                self.fold(flood, &key, &o);
                return None;
            }
            self.close(flood);
        }
        let level = self.floods.admit(&who, at);
        if level == Admit::Open {
            let inc = Incident {
                resolved: o.resolved.cloned().map(Box::new),
                ..Incident::first(key, o.subject, o.attribution, at)
            };
            return self.open(inc);
        }
        // Over its rate: this and the identity's next new destinations are
        // one flood incident; over its account's, the account's flood (keyed
        // on the uid alone, whatever program name each attempt came under).
        let mut flood_key = IncidentKey {
            subject: SubjectKey::Flood,
            ..key.clone()
        };
        if level == Admit::User {
            flood_key.identity = key.uid.map_or(Identity::Unknown, Identity::Uid);
            flood_key.unit = None;
        }
        if let Some(&old) = self.ids.get(&flood_key) {
            self.close(old);
        }
        let inc = Incident::first(flood_key, Subject::Flood(Box::default()), o.attribution, at);
        let id = self.next_id;
        self.floods.set_flood(&who, level, Some(id));
        self.flood_seen.insert(id, HashSet::new());
        let opened = self.open(inc).map(|i| i.id);
        debug_assert_eq!(opened, Some(id));
        self.track(id, &key, &o);
        self.open.get(&id).map(|b| &**b)
    }

    /// Opens an incident under the next id, making room if the table is full.
    fn open(&mut self, mut inc: Incident) -> Option<&Incident> {
        while self.open.len() >= self.max_open.max(1) {
            match self.by_age.first() {
                Some(&(_, oldest)) => self.close(oldest),
                None => break,
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        inc.id = id;
        self.ids.insert(inc.key.clone(), id);
        self.by_age.insert((inc.last_seen, id));
        self.open.insert(id, Box::new(inc));
        self.open.get(&id).map(|b| &**b)
    }

    /// One more packet for an open incident.
    fn bump(&mut self, id: u64, at: SystemTime) {
        let Some(inc) = self.open.get_mut(&id) else {
            return;
        };
        if inc.count == inc.emitted_count {
            self.dirty.insert((inc.emitted_at, id));
        }
        inc.count += 1;
        if at > inc.last_seen {
            self.by_age.remove(&(inc.last_seen, id));
            inc.last_seen = at;
            self.by_age.insert((at, id));
        }
    }

    /// One more attempt for a flood incident: counted, its destination told apart.
    fn fold(&mut self, id: u64, key: &IncidentKey, o: &Observation<'_>) {
        self.bump(id, o.at);
        self.track(id, key, o);
    }

    fn track(&mut self, id: u64, key: &IncidentKey, o: &Observation<'_>) {
        let hash = self.hasher.hash_one(key);
        let (Some(seen), Some(inc)) = (self.flood_seen.get_mut(&id), self.open.get_mut(&id)) else {
            return;
        };
        let Subject::Flood(summary) = &mut inc.subject else {
            return;
        };
        if seen.contains(&hash) {
            return;
        }
        if seen.len() >= MAX_TRACKED || self.flood_tracked >= MAX_TRACKED_TOTAL {
            summary.capped = true;
            return;
        }
        seen.insert(hash);
        self.flood_tracked += 1;
        summary.destinations += 1;
        if summary.sample.len() < SAMPLE {
            summary.sample.push(describe(&o.subject));
        }
    }

    /// Closes an open incident; an update it still owes goes out with the next `due`.
    fn close(&mut self, id: u64) {
        let Some(inc) = self.open.remove(&id) else {
            return;
        };
        if self.ids.get(&inc.key) == Some(&id) {
            self.ids.remove(&inc.key);
        }
        self.by_age.remove(&(inc.last_seen, id));
        if let Some(seen) = self.flood_seen.remove(&id) {
            self.flood_tracked -= seen.len();
            self.floods.end_flood(&Who::of(&inc.key), id);
        }
        if inc.count > inc.emitted_count {
            self.dirty.remove(&(inc.emitted_at, id));
            self.closed_dirty.push(*inc);
        }
    }

    /// Incidents whose count grew and whose last emission is `update_every`
    /// old (or all that grew, with `force`, e.g. at shutdown), and those
    /// closed since with counts not yet emitted. Marks them emitted.
    pub fn due(&mut self, now: SystemTime, force: bool) -> Vec<Incident> {
        let mut out = std::mem::take(&mut self.closed_dirty);
        for inc in &mut out {
            inc.emitted_count = inc.count;
            inc.emitted_at = now;
        }
        while let Some(&(emitted_at, id)) = self.dirty.first() {
            if !force && now.duration_since(emitted_at).unwrap_or_default() < self.update_every {
                break;
            }
            self.dirty.pop_first();
            if let Some(inc) = self.open.get_mut(&id) {
                inc.emitted_count = inc.count;
                inc.emitted_at = now;
                out.push(Incident::clone(inc));
            }
        }
        out.sort_by_key(|i| i.id);
        out
    }

    /// Closes incidents idle for `idle_close` and floods quiet for the
    /// limiter's `quiet` (their last update was emitted by `due`).
    pub fn close_idle(&mut self, now: SystemTime) {
        let owes = |inc: &Incident| inc.count > inc.emitted_count;
        let quiet: Vec<u64> = self
            .flood_seen
            .keys()
            .filter(|id| {
                self.open.get(id).is_some_and(|inc| {
                    !owes(inc)
                        && now.duration_since(inc.last_seen).unwrap_or_default()
                            >= self.floods.quiet
                })
            })
            .copied()
            .collect();
        for id in quiet {
            self.close(id);
        }
        if let Some(cutoff) = now.checked_sub(self.idle_close) {
            let idle: Vec<u64> = self
                .by_age
                .iter()
                .take_while(|(t, _)| *t <= cutoff)
                .filter(|(_, id)| self.open.get(id).is_some_and(|i| !owes(i)))
                .map(|&(_, id)| id)
                .collect();
            for id in idle {
                self.close(id);
            }
        }
        self.floods.sweep(now);
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

impl Incident {
    /// A first attempt: count 1, emitted at once; its id is set when it opens.
    fn first(
        key: IncidentKey,
        subject: Subject,
        attribution: &Attribution,
        at: SystemTime,
    ) -> Incident {
        Incident {
            id: 0,
            key,
            first_seen: at,
            last_seen: at,
            count: 1,
            subject,
            resolved: None,
            attribution: attribution.clone(),
            emitted_count: 1,
            emitted_at: at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::attribution::Method;
    use crate::monitor::event::DnsQuestion;
    use crate::monitor::packet::L4Header;

    fn flow(sport: u16, dport: u16) -> Flow {
        Flow {
            src: "10.1.0.1".parse().unwrap(),
            dst: "10.1.0.2".parse().unwrap(),
            protocol: 6,
            l4: L4Header::Ports {
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

    const BLOCKED: LoggedVerdict = LoggedVerdict {
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
        let audit = LoggedVerdict {
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

    fn dns(name: &str) -> DnsQuestion {
        DnsQuestion {
            name: name.into(),
            qtype: "A".into(),
            client: "127.0.0.1:5353".parse().unwrap(),
            transport: "udp",
        }
    }

    fn ask(agg: &mut Aggregator, q: &DnsQuestion, a: &Attribution, at: SystemTime) -> Option<u64> {
        agg.record(Observation {
            verdict: &BLOCKED,
            subject: Subject::DnsQuery(Box::new(q.clone())),
            attribution: a,
            resolved: None,
            at,
        })
        .map(|i| i.id)
    }

    /// Final counts per incident id, as the store ends up with them.
    fn books(emitted: &[Incident], into: &mut HashMap<u64, (u64, bool)>) {
        for i in emitted {
            let e = into.entry(i.id).or_default();
            assert!(i.count >= e.0, "an incident's count never shrinks");
            *e = (i.count, matches!(i.subject, Subject::Flood(_)));
        }
    }

    #[test]
    fn a_flood_folds_into_one_incident_and_others_still_go_out_at_once() {
        let mut agg = Aggregator::new(1);
        agg.floods.burst = 10.0;
        agg.floods.per_second = 1.0;
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let (a, b) = (who(65534), who(1000));
        let mut first = HashMap::new();
        let mut emitted = Vec::new();
        for n in 0..10_000u32 {
            // 100 a second for 100 s, some names asked twice.
            let at = t0 + Duration::from_millis(u64::from(n) * 10);
            let name = format!("n{}.example", n - n % 2 * (n % 3));
            if let Some(id) = ask(&mut agg, &dns(&name), &a, at) {
                first.insert(id, at);
            }
            if n == 5_000 {
                let id = ask(&mut agg, &dns("b.example"), &b, at);
                assert!(
                    id.is_some(),
                    "another identity's first attempt goes out at once"
                );
                first.extend(id.map(|id| (id, at)));
            }
            if n % 25 == 0 {
                emitted.extend(agg.due(at, false));
                agg.close_idle(at);
            }
        }
        emitted.extend(agg.due(t0 + Duration::from_secs(101), true));
        let mut counts = HashMap::new();
        for id in first.keys() {
            counts.insert(*id, (1, false));
        }
        books(&emitted, &mut counts);
        let floods: Vec<u64> = counts
            .iter()
            .filter(|(_, c)| c.1)
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(floods.len(), 1, "one flood incident: {counts:?}");
        // A's ten incidents within its burst, its flood, and B's.
        assert_eq!(first.len(), 12);
        assert_eq!(counts.values().map(|c| c.0).sum::<u64>(), 10_001);
        let flood = emitted
            .iter()
            .rev()
            .find(|i| i.action() == Action::Flood)
            .unwrap();
        let Subject::Flood(f) = &flood.subject else {
            panic!("{flood:?}")
        };
        // 10,000 asks of 6,667 distinct names; the burst's 10 are incidents of their own.
        let distinct: HashSet<String> = (0..10_000u32)
            .map(|n| format!("n{}.example", n - n % 2 * (n % 3)))
            .collect();
        assert_eq!(f.destinations as usize, distinct.len() - 10);
        assert_eq!(f.sample.len(), SAMPLE);
        assert!(!f.capped);
        assert_eq!(flood.key.identity, Identity::Uid(65534));
    }

    #[test]
    fn a_quiet_flood_closes_and_the_identity_is_heard_again() {
        let mut agg = Aggregator::new(1);
        agg.floods.burst = 2.0;
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let a = who(7);
        let opened: Vec<bool> = (0..5)
            .map(|n| ask(&mut agg, &dns(&format!("{n}.x")), &a, t0).is_some())
            .collect();
        // Two within the burst, then the flood opens, then it folds.
        assert_eq!(opened, [true, true, true, false, false]);
        assert_eq!(agg.open_count(), 3);
        let later = t0 + agg.floods.quiet;
        assert_eq!(agg.due(later, false).len(), 1, "the flood's last update");
        agg.close_idle(later);
        assert_eq!(agg.open_count(), 2, "the quiet flood closed");
        assert!(ask(&mut agg, &dns("new.x"), &a, later).is_some());
    }

    #[test]
    fn eviction_takes_the_oldest_and_keeps_its_count() {
        let mut agg = Aggregator::new(1);
        agg.max_open = 2;
        let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        agg.observe(&BLOCKED, Some(&flow(1, 1)), &who(1), t(1));
        agg.observe(&BLOCKED, Some(&flow(1, 2)), &who(1), t(2));
        // Port 1 is seen again: port 2 is now the oldest.
        agg.observe(&BLOCKED, Some(&flow(1, 1)), &who(1), t(3));
        agg.observe(&BLOCKED, Some(&flow(1, 2)), &who(1), t(3));
        agg.observe(&BLOCKED, Some(&flow(1, 1)), &who(1), t(4));
        agg.observe(&BLOCKED, Some(&flow(1, 3)), &who(1), t(5));
        let due = agg.due(t(5), false);
        assert_eq!(
            due.iter().map(|i| (i.id, i.count)).collect::<Vec<_>>(),
            [(2, 2)],
            "the evicted incident's last count goes out at once"
        );
        assert_eq!(agg.open_count(), 2);
        assert!(agg
            .observe(&BLOCKED, Some(&flow(1, 1)), &who(1), t(6))
            .is_none());
    }

    /// The naive aggregator the indexed one replaced: a scan for the oldest.
    #[derive(Default)]
    struct Model {
        open: HashMap<(u32, u16), (u64, SystemTime, u64)>,
        next: u64,
    }

    impl Model {
        fn observe(&mut self, k: (u32, u16), at: SystemTime, max: usize, idle: Duration) -> bool {
            if let Some(e) = self.open.get_mut(&k) {
                if at.duration_since(e.1).unwrap_or_default() < idle {
                    e.1 = e.1.max(at);
                    e.2 += 1;
                    return false;
                }
            }
            if !self.open.contains_key(&k) && self.open.len() >= max {
                let oldest = *self.open.iter().min_by_key(|(_, v)| (v.1, v.0)).unwrap().0;
                self.open.remove(&oldest);
            }
            self.next += 1;
            self.open.insert(k, (self.next, at, 1));
            true
        }
    }

    proptest::proptest! {
        #[test]
        fn the_index_agrees_with_a_scan_and_the_books_balance(
            ops in proptest::collection::vec((0u32..3, 0u16..12, 0u64..40, 0u8..8), 1..300),
            max in 1usize..8,
        ) {
            let mut agg = Aggregator::new(1);
            agg.max_open = max;
            agg.idle_close = Duration::from_secs(30);
            agg.update_every = Duration::from_secs(3);
            // Generous enough that no flood folds: the model does not fold.
            agg.floods.burst = 1e9;
            let mut model = Model::default();
            let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
            let mut clock = 0u64;
            let mut counts: HashMap<u64, (u64, bool)> = HashMap::new();
            let n = ops.len();
            for (uid, port, dt, what) in ops {
                // Mostly forward, sometimes a little back (timestamps from several sources).
                clock = (clock + dt).saturating_sub(if what == 7 { 50 } else { 0 });
                let at = t0 + Duration::from_secs(clock);
                let new = agg.observe(&BLOCKED, Some(&flow(9, port)), &who(uid), at).map(|i| i.id);
                let model_new = model.observe((uid, port), at, max, agg.idle_close);
                proptest::prop_assert_eq!(new.is_some(), model_new);
                if let Some(id) = new {
                    counts.insert(id, (1, false));
                }
                proptest::prop_assert!(agg.open_count() <= max);
                proptest::prop_assert_eq!(agg.open_count(), model.open.len());
                match what {
                    0 => books(&agg.due(at, false), &mut counts),
                    1 => {
                        books(&agg.due(at, true), &mut counts);
                        agg.close_idle(at);
                        model.open.retain(|_, v| at.duration_since(v.1).unwrap_or_default() < agg.idle_close);
                        proptest::prop_assert_eq!(agg.open_count(), model.open.len());
                    }
                    _ => {}
                }
            }
            books(&agg.due(t0 + Duration::from_secs(clock), true), &mut counts);
            // Every observation is in exactly one incident's final count,
            // evicted and idle-closed ones included.
            proptest::prop_assert_eq!(counts.values().map(|c| c.0).sum::<u64>(), n as u64);
        }
    }
}
