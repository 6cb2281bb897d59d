//! Blocked packets held back while the DNS guard revalidates their address
//! (`dns::revalidate`): once the verdict is in they are reported as
//! revalidated or as blocked (stale), never twice and never lost. Bounded in
//! addresses and in packets per address; what does not fit is handed back at
//! once, and what waits past its deadline later, to be reported as an
//! ordinary block.
//! Pure: time is an argument.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How long a packet waits for its verdict: an upstream that does not answer
/// within the guard's own timeouts (UDP 2 s, then TCP 4 s) has failed.
pub const WAIT: Duration = Duration::from_secs(8);
const ADDRESSES_MAX: usize = 1_024;
/// A connect's SYN and its retries are a handful; beyond this, packets to
/// the address are reported at once.
const PACKETS_PER_ADDRESS: usize = 16;

struct Waiting<T> {
    packets: Vec<T>,
    deadline: Instant,
}

pub struct Held<T> {
    by_address: HashMap<IpAddr, Waiting<T>>,
}

impl<T> Default for Held<T> {
    fn default() -> Self {
        Held {
            by_address: HashMap::new(),
        }
    }
}

impl<T> Held<T> {
    /// Holds `packet` until [`Held::release`] for its address. `Err` gives it
    /// back when there is no room: report it now.
    pub fn hold(&mut self, address: IpAddr, packet: T, now: Instant) -> Result<(), T> {
        let full = self.by_address.len() >= ADDRESSES_MAX;
        match self.by_address.get_mut(&address) {
            Some(w) if w.packets.len() < PACKETS_PER_ADDRESS => w.packets.push(packet),
            Some(_) => return Err(packet),
            None if full => return Err(packet),
            None => {
                self.by_address.insert(
                    address,
                    Waiting {
                        packets: vec![packet],
                        deadline: now + WAIT,
                    },
                );
            }
        }
        Ok(())
    }

    pub fn is_holding(&self, address: &IpAddr) -> bool {
        self.by_address.contains_key(address)
    }

    /// The verdict for `address` is in.
    pub fn release(&mut self, address: &IpAddr) -> Vec<T> {
        self.by_address
            .remove(address)
            .map(|w| w.packets)
            .unwrap_or_default()
    }

    /// Everything whose verdict is overdue (or everything, when stopping).
    pub fn overdue(&mut self, now: Option<Instant>) -> Vec<T> {
        let due: Vec<IpAddr> = self
            .by_address
            .iter()
            .filter(|(_, w)| now.map_or(true, |n| w.deadline <= n))
            .map(|(a, _)| *a)
            .collect();
        due.into_iter().flat_map(|a| self.release(&a)).collect()
    }

    pub fn len(&self) -> usize {
        self.by_address.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_address.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(i: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i))
    }

    #[test]
    fn packets_wait_for_their_address_and_come_back_once() {
        let mut h = Held::default();
        let now = Instant::now();
        h.hold(ip(1), "syn", now).unwrap();
        h.hold(ip(1), "retry", now).unwrap();
        h.hold(ip(2), "other", now).unwrap();
        assert_eq!(h.release(&ip(1)), vec!["syn", "retry"]);
        assert!(h.release(&ip(1)).is_empty());
        assert!(h.is_holding(&ip(2)));
    }

    #[test]
    fn overdue_packets_are_handed_back_and_a_full_table_refuses() {
        let mut h = Held::default();
        let now = Instant::now();
        h.hold(ip(1), 1, now).unwrap();
        h.hold(ip(2), 2, now + Duration::from_secs(5)).unwrap();
        assert_eq!(h.overdue(Some(now + WAIT)), vec![1]);
        assert_eq!(h.overdue(None), vec![2], "stopping hands back the rest");
        for i in 0..ADDRESSES_MAX as u32 {
            h.hold(ip(i), 0, now).unwrap();
        }
        assert_eq!(h.hold(ip(99_999), 7, now), Err(7));
        for _ in 1..PACKETS_PER_ADDRESS {
            h.hold(ip(0), 0, now).unwrap();
        }
        assert_eq!(
            h.hold(ip(0), 8, now),
            Err(8),
            "a full address reports at once"
        );
        assert_eq!(h.release(&ip(0)).len(), PACKETS_PER_ADDRESS);
    }
}
