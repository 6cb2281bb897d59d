//! The guard's answer cache. A hit costs no upstream round trip and no kernel
//! write: an answer is cached for at most its TTL, and its addresses stay in
//! the kernel sets for at least TTL (floor) + grace, so a cached answer's
//! addresses are always still allowed. A ruleset swap clears the cache.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;

use super::message::{reply_for, Query};

/// (name in wire form, type, DNSSEC OK / checking disabled bits).
pub type CacheKey = (String, RecordType, bool);

struct Entry {
    response: Message,
    stored: Instant,
    ttl: Duration,
    /// The last reply rendered from it. Clients asking the same question the
    /// same way within the same second get these bytes with their own id:
    /// no re-encoding on the hot path.
    rendered: Option<Rendered>,
}

struct Rendered {
    age: u32,
    /// Exactly as asked (case kept), with the EDNS presence and RD bit that shaped the reply.
    question: String,
    edns: bool,
    rd: bool,
    limit: usize,
    bytes: Vec<u8>,
}

pub struct Cache {
    entries: HashMap<CacheKey, Entry>,
    max: usize,
}

impl Cache {
    pub fn new(max: usize) -> Cache {
        Cache {
            entries: HashMap::new(),
            max,
        }
    }

    /// The cached response and its age in whole seconds, if still fresh.
    #[cfg(test)]
    pub fn get(&self, key: &CacheKey, now: Instant) -> Option<(&Message, u32)> {
        let e = self.entries.get(key)?;
        let age = now.checked_duration_since(e.stored)?;
        (age < e.ttl).then_some((&e.response, age.as_secs() as u32))
    }

    /// The reply to `q` from the cache, if fresh: rendered at most once per
    /// second per way of asking, otherwise copied with the client's id.
    pub fn answer(
        &mut self,
        key: &CacheKey,
        q: &Query,
        limit: usize,
        now: Instant,
    ) -> Option<Vec<u8>> {
        let e = self.entries.get_mut(key)?;
        let age = now.checked_duration_since(e.stored)?;
        if age >= e.ttl {
            return None;
        }
        let age = age.as_secs() as u32;
        let question = q.message.queries().first()?.name().to_ascii();
        let (edns, rd) = (
            q.message.extensions().is_some(),
            q.message.recursion_desired(),
        );
        let fresh = e.rendered.as_ref().is_some_and(|r| {
            r.age == age
                && r.edns == edns
                && r.rd == rd
                && r.limit == limit
                && r.question == question
        });
        if !fresh {
            let bytes = reply_for(q, &e.response, age, limit);
            e.rendered = Some(Rendered {
                age,
                question,
                edns,
                rd,
                limit,
                bytes,
            });
        }
        let mut out = e.rendered.as_ref()?.bytes.clone();
        // The id is the first two bytes of every DNS message (RFC 1035 4.1.1).
        if out.len() >= 2 {
            out[..2].copy_from_slice(&q.message.id().to_be_bytes());
        }
        Some(out)
    }

    pub fn put(&mut self, key: CacheKey, response: Message, ttl: u32, now: Instant) {
        if ttl == 0 {
            return;
        }
        if self.entries.len() >= self.max {
            self.entries.retain(|_, e| {
                now.checked_duration_since(e.stored)
                    .is_some_and(|a| a < e.ttl)
            });
            if self.entries.len() >= self.max {
                // Still full of live entries: start over rather than scan for the oldest.
                self.entries.clear();
            }
        }
        self.entries.insert(
            key,
            Entry {
                response,
                stored: now,
                ttl: Duration::from_secs(ttl as u64),
                rendered: None,
            },
        );
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_live_for_their_ttl_and_report_their_age() {
        let mut c = Cache::new(10);
        let t0 = Instant::now();
        let key: CacheKey = ("a.test".into(), RecordType::A, false);
        c.put(key.clone(), Message::new(), 30, t0);
        assert_eq!(
            c.get(&key, t0 + Duration::from_secs(12)).map(|(_, a)| a),
            Some(12)
        );
        assert!(c.get(&key, t0 + Duration::from_secs(30)).is_none());
        c.put(
            ("b.test".into(), RecordType::A, false),
            Message::new(),
            0,
            t0,
        );
        assert_eq!(c.len(), 1, "TTL 0 is not cached");
    }

    #[test]
    fn a_full_cache_drops_expired_entries_first() {
        let mut c = Cache::new(2);
        let t0 = Instant::now();
        c.put(("old".into(), RecordType::A, false), Message::new(), 1, t0);
        c.put(
            ("live".into(), RecordType::A, false),
            Message::new(),
            100,
            t0,
        );
        let later = t0 + Duration::from_secs(5);
        c.put(
            ("new".into(), RecordType::A, false),
            Message::new(),
            100,
            later,
        );
        assert!(c
            .get(&("live".into(), RecordType::A, false), later)
            .is_some());
        assert!(c
            .get(&("new".into(), RecordType::A, false), later)
            .is_some());
        assert_eq!(c.len(), 2);
    }
}
