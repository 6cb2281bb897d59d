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
    until: Instant,
}

/// Address → the name the guard last resolved to it, and who asked. Bounded.
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

    pub fn insert(&mut self, ip: IpAddr, resolved: ResolvedName, until: Instant) {
        if self.map.len() >= RECENT_MAX {
            let now = Instant::now();
            self.map.retain(|_, r| r.until > now);
            if self.map.len() >= RECENT_MAX {
                self.map.clear();
            }
        }
        self.map.insert(ip, Recent { resolved, until });
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
        r.insert(ip, name("a.test"), now + Duration::from_secs(10));
        r.insert(ip, name("b.test"), now + Duration::from_secs(10));
        assert_eq!(r.get(&ip, now).unwrap().name, "b.test");
        assert!(r.get(&ip, now + Duration::from_secs(11)).is_none());
    }
}
