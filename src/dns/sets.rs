//! Where resolved addresses go: the rules' kernel sets (with timeouts), and a
//! map of recent names the monitor uses to say which host a blocked packet
//! was for.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::kernel::nft::{Nftables, Result};
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
    resolved: ResolvedName,
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
/// past the cap the entries remembered the shortest go first.
#[derive(Default)]
pub struct RecentNames {
    map: HashMap<IpAddr, Recent>,
}

const RECENT_MAX: usize = 100_000;

impl RecentNames {
    pub fn get(&self, ip: &IpAddr, now: Instant) -> Option<ResolvedName> {
        self.map
            .get(ip)
            .filter(|r| r.until > now)
            .map(|r| r.resolved.clone())
    }

    /// The name whose answer put `ip` into a rule's set, within
    /// [`super::revalidate::REMEMBER_FOR`] of that answer.
    pub fn remembered(&self, ip: &IpAddr, now: Instant) -> Option<&ResolvedName> {
        self.map
            .get(ip)
            .filter(|r| r.remember_until.is_some_and(|u| u > now))
            .map(|r| &r.resolved)
    }

    /// `in_set`: the address went into a rule's set, so it is remembered for
    /// revalidation.
    pub fn insert(&mut self, ip: IpAddr, resolved: ResolvedName, until: Instant, in_set: bool) {
        let now = Instant::now();
        if self.map.len() >= RECENT_MAX && !self.map.contains_key(&ip) {
            self.map.retain(|_, r| r.last_use() > now);
            if self.map.len() >= RECENT_MAX {
                // Drop the quarter that would be forgotten soonest.
                let mut uses: Vec<Instant> = self.map.values().map(Recent::last_use).collect();
                let cut = RECENT_MAX / 4;
                let (_, &mut threshold, _) = uses.select_nth_unstable(cut);
                self.map.retain(|_, r| r.last_use() > threshold);
            }
        }
        let remember_until = if in_set {
            Some(now + super::revalidate::REMEMBER_FOR)
        } else {
            // Forwarded only (audit mode): keep what an earlier answer allowed.
            self.map.get(&ip).and_then(|r| r.remember_until)
        };
        self.map.insert(
            ip,
            Recent {
                resolved,
                until,
                remember_until,
            },
        );
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

    #[test]
    fn recent_names_expire_and_keep_the_latest_name() {
        let mut r = RecentNames::default();
        let now = Instant::now();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let name = |n: &str| ResolvedName {
            name: n.into(),
            asked_by: None,
        };
        r.insert(ip, name("a.test"), now + Duration::from_secs(10), true);
        r.insert(ip, name("b.test"), now + Duration::from_secs(10), true);
        assert_eq!(r.get(&ip, now).unwrap().name, "b.test");
        assert!(r.get(&ip, now + Duration::from_secs(11)).is_none());
        // Still remembered for revalidation long after the kernel forgot it.
        let later = now + Duration::from_secs(3600);
        assert_eq!(r.remembered(&ip, later).unwrap().name, "b.test");
    }

    #[test]
    fn only_addresses_put_in_a_set_are_remembered_for_revalidation() {
        let mut r = RecentNames::default();
        let now = Instant::now();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let name = ResolvedName {
            name: "audit.test".into(),
            asked_by: None,
        };
        r.insert(ip, name, now + Duration::from_secs(10), false);
        assert!(r.get(&ip, now).is_some());
        assert!(r.remembered(&ip, now).is_none());
    }

    #[test]
    fn past_the_cap_the_soonest_forgotten_go_first() {
        let mut r = RecentNames::default();
        let now = Instant::now();
        let name = |n: u32| ResolvedName {
            name: format!("n{n}.test"),
            asked_by: None,
        };
        for i in 0..RECENT_MAX as u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            // The first ones are forwarded only (short memory).
            r.insert(ip, name(i), now + Duration::from_secs(60), i >= 1000);
        }
        let newest = IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000));
        r.insert(newest, name(0), now + Duration::from_secs(60), true);
        assert!(r.len() <= RECENT_MAX);
        assert!(r.remembered(&newest, now).is_some());
        let first = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000));
        assert!(
            r.get(&first, now).is_none(),
            "a short-lived entry went first"
        );
        let kept = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + 90_000));
        assert!(r.remembered(&kept, now).is_some());
    }
}
