//! Blocked packets held back while the DNS guard revalidates their address
//! (`dns::revalidate`): once the verdict is in they are reported as
//! revalidated or as blocked (stale), never twice and never lost. Bounded in
//! addresses and in packets per address; what does not fit, and what waits
//! past its deadline, is handed back to be reported as an ordinary block.
//! Pure: time is an argument.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How long a packet waits for its verdict: an upstream that does not answer
/// within the guard's own timeouts (UDP 2 s, then TCP 4 s) has failed.
pub const WAIT: Duration = Duration::from_secs(8);
const ADDRESSES_MAX: usize = 1_024;
/// Beyond this, further packets to the address are only counted: the first
/// ones carry who and what; the rest are retransmissions.
const PACKETS_PER_ADDRESS: usize = 16;

struct Waiting<T> {
    packets: Vec<T>,
    /// Packets beyond `PACKETS_PER_ADDRESS`, reported with the first.
    more: u64,
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

/// What was held for one address: the packets, and how many more were folded.
pub struct Released<T> {
    pub packets: Vec<T>,
    pub more: u64,
}

impl<T> Held<T> {
    /// Holds `packet` until [`Held::release`] for its address. `Err` gives it
    /// back when the table is full: report it now.
    pub fn hold(&mut self, address: IpAddr, packet: T, now: Instant) -> Result<(), T> {
        let full = self.by_address.len() >= ADDRESSES_MAX;
        match self.by_address.get_mut(&address) {
            Some(w) if w.packets.len() < PACKETS_PER_ADDRESS => w.packets.push(packet),
            Some(w) => w.more += 1,
            None if full => return Err(packet),
            None => {
                self.by_address.insert(
                    address,
                    Waiting {
                        packets: vec![packet],
                        more: 0,
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
    pub fn release(&mut self, address: &IpAddr) -> Option<Released<T>> {
        self.by_address.remove(address).map(|w| Released {
            packets: w.packets,
            more: w.more,
        })
    }

    /// Everything whose verdict is overdue (or everything, when stopping).
    pub fn overdue(&mut self, now: Option<Instant>) -> Vec<(IpAddr, Released<T>)> {
        let due: Vec<IpAddr> = self
            .by_address
            .iter()
            .filter(|(_, w)| now.is_none_or(|n| w.deadline <= n))
            .map(|(a, _)| *a)
            .collect();
        due.into_iter()
            .filter_map(|a| self.release(&a).map(|r| (a, r)))
            .collect()
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
        let r = h.release(&ip(1)).unwrap();
        assert_eq!(r.packets, vec!["syn", "retry"]);
        assert!(h.release(&ip(1)).is_none());
        assert!(h.is_holding(&ip(2)));
    }

    #[test]
    fn overdue_packets_are_handed_back_and_a_full_table_refuses() {
        let mut h = Held::default();
        let now = Instant::now();
        h.hold(ip(1), 1, now).unwrap();
        h.hold(ip(2), 2, now + Duration::from_secs(5)).unwrap();
        let due = h.overdue(Some(now + WAIT));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].0, ip(1));
        assert_eq!(h.overdue(None).len(), 1, "stopping hands back the rest");
        for i in 0..ADDRESSES_MAX as u32 {
            h.hold(ip(i), 0, now).unwrap();
        }
        assert_eq!(h.hold(ip(99_999), 7, now), Err(7));
        for _ in 0..100 {
            h.hold(ip(0), 0, now).unwrap();
        }
        let r = h.release(&ip(0)).unwrap();
        assert_eq!(r.packets.len(), PACKETS_PER_ADDRESS);
        assert_eq!(r.more, 101 - PACKETS_PER_ADDRESS as u64);
    }
}
