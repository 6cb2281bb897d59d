//! Where resolved addresses go: the rules' kernel sets (with timeouts), and a
//! map of recent names the monitor uses to say which host a blocked packet
//! was for.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::kernel::nft::{Nftables, Result};
use crate::monitor::attribution::Attribution;
use crate::monitor::event::ResolvedName;
use crate::ruleset::{host_set_name, ip_to_u128, Element, Family, Field, Set};

/// Refresh an element only when that extends its life by more than this:
/// a busy name is re-resolved often and need not be re-written each time.
const REFRESH_SLACK: Duration = Duration::from_secs(2);
const TRACKED_MAX: usize = 200_000;

/// Writes resolved addresses into the `h_<rule>_v4/v6` sets.
pub struct HostSets {
    nft: Nftables,
    /// (set, address) → when the kernel element expires, as far as we wrote it.
    expiry: HashMap<(String, IpAddr), Instant>,
}

impl HostSets {
    pub fn open() -> Result<HostSets> {
        Ok(HostSets {
            nft: Nftables::open()?,
            expiry: HashMap::new(),
        })
    }

    /// Puts each address in the sets of each rule for its duration, in one
    /// transaction, unless the kernel already holds it about as long.
    /// Returns how many elements were written.
    pub fn insert(&mut self, rules: &[String], addrs: &[(IpAddr, Duration)]) -> Result<usize> {
        let now = Instant::now();
        let mut by_set: HashMap<String, (Set, Vec<(Element, u64)>)> = HashMap::new();
        let mut planned = Vec::new();
        for rule in rules {
            for &(ip, life) in addrs {
                let family = Family::of(&ip);
                let name = host_set_name(rule, family);
                let until = now + life;
                let key = (name.clone(), ip);
                if self
                    .expiry
                    .get(&key)
                    .is_some_and(|&have| have + REFRESH_SLACK >= until)
                {
                    continue;
                }
                let entry = by_set.entry(name.clone()).or_insert_with(|| {
                    let field = match family {
                        Family::V4 => Field::Ipv4,
                        Family::V6 => Field::Ipv6,
                    };
                    (
                        Set {
                            name,
                            key: vec![field],
                            interval: false,
                            timeout: true,
                            size: None,
                            verdict_map: false,
                            elements: Vec::new(),
                        },
                        Vec::new(),
                    )
                });
                entry.1.push((
                    Element::single(vec![ip_to_u128(&ip)]),
                    life.as_millis().max(1) as u64,
                ));
                planned.push((key, until));
            }
        }
        if planned.is_empty() {
            return Ok(0);
        }
        let items: Vec<(&Set, Vec<(Element, u64)>)> =
            by_set.values().map(|(s, e)| (s, e.clone())).collect();
        self.nft.add_timed_elements(&items)?;
        if self.expiry.len() + planned.len() > TRACKED_MAX {
            self.expiry.retain(|_, until| *until > now);
        }
        let n = planned.len();
        self.expiry.extend(planned);
        Ok(n)
    }

    /// After the ruleset was swapped: what we wrote may be gone.
    pub fn forget(&mut self) {
        self.expiry.clear();
    }
}

struct Recent {
    /// Shared by the addresses of one answer.
    name: Arc<str>,
    /// Who asked; dropped once `until` passed (a command line may be 4 KiB
    /// and the entry lives a day).
    asked_by: Option<Arc<Attribution>>,
    /// While the kernel holds the address for it (the name is shown for
    /// blocked packets to it until then).
    until: Instant,
    /// Put into a rule's set (not only forwarded in audit mode): a blocked
    /// packet to it may be revalidated until then.
    remember_until: Option<Instant>,
}

impl Recent {
    fn last_use(&self) -> Instant {
        self.remember_until
            .map_or(self.until, |r| r.max(self.until))
    }
}

/// Address → the name the guard last resolved to it, and who asked. Bounded:
/// past the cap the entries remembered the shortest go first. At the cap,
/// ~80 bytes an entry plus its name (shared by the addresses of one answer):
/// at most ~22 MiB with 65,536 distinct 253-byte names.
#[derive(Default)]
pub struct RecentNames {
    map: HashMap<IpAddr, Recent>,
    inserts: u64,
}

const RECENT_MAX: usize = 65_536;
/// Every this many inserts, who-asked is dropped from entries past `until`.
const STRIP_EVERY: u64 = 4096;

impl RecentNames {
    pub fn get(&self, ip: &IpAddr, now: Instant) -> Option<ResolvedName> {
        self.map
            .get(ip)
            .filter(|r| r.until > now)
            .map(|r| ResolvedName {
                name: r.name.to_string(),
                asked_by: r.asked_by.as_deref().cloned(),
                revalidation: None,
            })
    }

    /// The name whose answer put `ip` into a rule's set, within
    /// [`super::revalidate::REMEMBER_FOR`] of that answer.
    pub fn remembered(&self, ip: &IpAddr, now: Instant) -> Option<String> {
        self.map
            .get(ip)
            .filter(|r| r.remember_until.is_some_and(|u| u > now))
            .map(|r| r.name.to_string())
    }

    /// Records one answer: `addrs` with how long the kernel holds each.
    /// `in_set`: they went into a rule's set, so they are remembered for
    /// revalidation.
    pub fn insert(
        &mut self,
        name: &str,
        asked_by: Option<Attribution>,
        addrs: &[(IpAddr, Instant)],
        in_set: bool,
    ) {
        let now = Instant::now();
        let name: Arc<str> = Arc::from(name);
        let asked_by = asked_by.map(Arc::new);
        for &(ip, until) in addrs {
            self.make_room(&ip, now);
            let remember_until = if in_set {
                Some(now + super::revalidate::REMEMBER_FOR)
            } else {
                // Forwarded only (audit mode): keep what an earlier answer allowed.
                self.map.get(&ip).and_then(|r| r.remember_until)
            };
            let recent = Recent {
                name: Arc::clone(&name),
                asked_by: asked_by.clone(),
                until,
                remember_until,
            };
            self.map.insert(ip, recent);
        }
        self.inserts += 1;
        if self.inserts % STRIP_EVERY == 0 {
            for r in self.map.values_mut().filter(|r| r.until <= now) {
                r.asked_by = None;
            }
        }
    }

    fn make_room(&mut self, ip: &IpAddr, now: Instant) {
        if self.map.len() < RECENT_MAX || self.map.contains_key(ip) {
            return;
        }
        self.map.retain(|_, r| r.last_use() > now);
        if self.map.len() >= RECENT_MAX {
            // Drop the quarter that would be forgotten soonest.
            let mut uses: Vec<Instant> = self.map.values().map(Recent::last_use).collect();
            let (_, &mut threshold, _) = uses.select_nth_unstable(RECENT_MAX / 4);
            self.map.retain(|_, r| r.last_use() > threshold);
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(i: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i))
    }

    #[test]
    fn recent_names_expire_and_keep_the_latest_name() {
        let mut r = RecentNames::default();
        let now = Instant::now();
        let until = now + Duration::from_secs(10);
        r.insert("a.test", None, &[(ip(1), until)], true);
        r.insert("b.test", None, &[(ip(1), until)], true);
        assert_eq!(r.get(&ip(1), now).unwrap().name, "b.test");
        assert!(r.get(&ip(1), now + Duration::from_secs(11)).is_none());
        // Still remembered for revalidation long after the kernel forgot it.
        let later = now + Duration::from_secs(3600);
        assert_eq!(r.remembered(&ip(1), later).as_deref(), Some("b.test"));
    }

    #[test]
    fn only_addresses_put_in_a_set_are_remembered_for_revalidation() {
        let mut r = RecentNames::default();
        let now = Instant::now();
        r.insert(
            "audit.test",
            None,
            &[(ip(1), now + Duration::from_secs(10))],
            false,
        );
        assert!(r.get(&ip(1), now).is_some());
        assert!(r.remembered(&ip(1), now).is_none());
    }

    #[test]
    fn past_the_cap_the_soonest_forgotten_go_first() {
        let mut r = RecentNames::default();
        let now = Instant::now();
        let until = now + Duration::from_secs(60);
        for i in 0..RECENT_MAX as u32 {
            // The first ones are forwarded only (short memory).
            r.insert(&format!("n{i}.test"), None, &[(ip(i), until)], i >= 1000);
        }
        r.insert("new.test", None, &[(ip(0x0100_0000), until)], true);
        assert!(r.len() <= RECENT_MAX);
        assert!(r.remembered(&ip(0x0100_0000), now).is_some());
        assert!(
            r.get(&ip(0), now).is_none(),
            "a short-lived entry went first"
        );
        assert!(r.remembered(&ip(60_000), now).is_some());
    }
}
