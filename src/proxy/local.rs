//! The host's own addresses, for the SSRF guard and per-user limits: a
//! connection to any of them reaches this host's services (bound to 0.0.0.0
//! or to that address) as surely as one to 127.0.0.1.
//!
//! Read at start and again whenever the kernel announces an address change
//! (rtnetlink multicast groups): a check first drains that socket without
//! blocking, so an address added before a request is known to that request.

use std::collections::HashSet;
use std::net::IpAddr;

use tracing::warn;

use crate::kernel::route::AddressChanges;

pub struct LocalAddrs {
    addrs: HashSet<IpAddr>,
    /// Address change notifications; `None` if it could not be opened, then
    /// the list is re-read on every check instead.
    changes: Option<AddressChanges>,
}

impl LocalAddrs {
    pub fn new() -> LocalAddrs {
        let changes = match AddressChanges::subscribe() {
            Ok(s) => Some(s),
            Err(e) => {
                warn!("proxy: cannot follow address changes ({e}); re-reading them per request");
                None
            }
        };
        let mut l = LocalAddrs {
            addrs: HashSet::new(),
            changes,
        };
        l.reread();
        l
    }

    /// Is `ip` (or the IPv4 address an IPv4-mapped `ip` stands for) one of
    /// this host's addresses, as of now?
    pub fn contains(&mut self, ip: IpAddr) -> bool {
        self.refresh();
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.addrs.contains(&ip)
    }

    /// Re-reads the list if the kernel announced a change since the last look.
    fn refresh(&mut self) {
        let Some(changes) = &mut self.changes else {
            return self.reread();
        };
        if changes.changed() {
            self.reread();
        }
    }

    pub fn reread(&mut self) {
        match nix::ifaddrs::getifaddrs() {
            Ok(list) => {
                self.addrs = list
                    .filter_map(|i| i.address)
                    .filter_map(|a| {
                        if let Some(v4) = a.as_sockaddr_in() {
                            Some(IpAddr::V4(v4.ip()))
                        } else {
                            a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                        }
                    })
                    .collect();
            }
            // Keep the last list: an empty one would open the host's addresses.
            Err(e) => warn!("proxy: reading this host's addresses: {e}"),
        }
    }
}

impl Default for LocalAddrs {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_local_in_every_spelling() {
        let mut l = LocalAddrs::new();
        assert!(l.contains("127.0.0.1".parse().unwrap()));
        assert!(l.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!l.contains("192.0.2.77".parse().unwrap()));
    }
}
