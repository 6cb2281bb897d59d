//! rtnetlink: the kernel's announcements that an address of this host was
//! added or removed (multicast groups RTMGRP_IPV4_IFADDR/RTMGRP_IPV6_IFADDR).

use std::io;

use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;

/// A non-blocking subscription to address changes.
pub struct AddressChanges {
    sock: Socket,
    buf: Vec<u8>,
}

impl AddressChanges {
    pub fn subscribe() -> io::Result<AddressChanges> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind(&SocketAddr::new(0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))?;
        sock.set_non_blocking(true)?;
        Ok(AddressChanges {
            sock,
            buf: vec![0; 8192],
        })
    }

    /// Drains what was announced, without blocking: true if an address
    /// changed since the last call, or if announcements were lost.
    pub fn changed(&mut self) -> bool {
        let mut changed = false;
        loop {
            match self.sock.recv(&mut &mut self.buf[..], libc::MSG_DONTWAIT) {
                Ok(0) => break,
                Ok(_) => changed = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // ENOBUFS: notifications were lost; the list is stale.
                Err(_) => {
                    changed = true;
                    break;
                }
            }
        }
        changed
    }
}
