//! sock_diag, egret's one implementation: the TCP connections open right now
//! in this network namespace (for seeding), and the exact lookup of one socket
//! by its 5-tuple (for attribution, and the uid of a local client of the
//! proxy, the API or the metrics endpoint). Messages are netlink-packet-sock-diag's;
//! the socket is `kernel::netlink`'s.

use std::io;
use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::{Emitable, Parseable};
use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, INET_DIAG_MARK, IPPROTO_TCP, IPPROTO_UDP, SOCK_DIAG_BY_FAMILY},
    inet::{ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags},
    SockDiagMessage,
};

use super::netlink::{attrs, NetlinkSocket};
use crate::ruleset::OpenFlow;

const INET_DIAG_CGROUP_ID: u16 = 21;
/// INET_DIAG_NOCOOKIE: the lookup is by address and port alone.
const NO_COOKIE: [u8; 8] = [0xff; 8];

/// An established TCP connection, with its owner and direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct OpenSocket {
    pub flow: OpenFlow,
    pub uid: u32,
    /// Taken for a connection a local listener accepted: its packets out are
    /// replies. Only when the listener's port is privileged (see `open_tcp`).
    pub inbound: bool,
    /// A socket listens on the local port (whether or not taken for inbound).
    pub listener: bool,
    /// The socket's firewall mark (sock_diag gives it to CAP_NET_ADMIN only).
    pub mark: Option<u32>,
    /// The kernel's socket cookie: tells this socket from a later one on the
    /// same 5-tuple.
    pub cookie: u64,
}

/// Established TCP connections that talk to something other than loopback.
/// These are the flows conntrack may not know yet when egret's first ruleset
/// lands, so the ruleset lets their packets through once (see architecture.md).
///
/// Never UDP: a UDP `connect()` sends nothing, so any user could register
/// any destination and have it seeded; a UDP flow that predates conntrack
/// does not freeze either (its next datagram is simply a new flow).
pub fn open_tcp() -> io::Result<Vec<OpenSocket>> {
    let mut socket = SockDiag::open()?;
    let tcp_states = StateFlags::ESTABLISHED
        | StateFlags::SYN_RECV
        | StateFlags::FIN_WAIT1
        | StateFlags::FIN_WAIT2
        | StateFlags::CLOSE_WAIT
        | StateFlags::LAST_ACK
        | StateFlags::CLOSING;
    let mut found = Vec::new();
    let mut listeners = Vec::new();
    for family in [AF_INET, AF_INET6] {
        dump(
            &mut socket,
            family,
            IPPROTO_TCP,
            tcp_states.clone(),
            &mut found,
        )?;
        dump(
            &mut socket,
            family,
            IPPROTO_TCP,
            StateFlags::LISTEN,
            &mut listeners,
        )?;
    }
    // A listener on the local port suggests a server's accepted connection,
    // but any user may listen on an unprivileged port (and, with
    // SO_REUSEPORT, connect out from the same port it listens on) to pass
    // its own outbound connection off as a reply. Only a port below
    // ip_unprivileged_port_start (CAP_NET_BIND_SERVICE to bind) counts.
    let privileged = unprivileged_port_start();
    let listening = |local: SocketAddr| {
        listeners.iter().any(|l| {
            l.flow.local.port() == local.port()
                && (l.flow.local.ip() == local.ip() || l.flow.local.ip().is_unspecified())
        })
    };
    let mut open: Vec<OpenSocket> = found
        .into_iter()
        .filter(|s| {
            !s.flow.local.ip().is_loopback()
                && !s.flow.remote.ip().is_loopback()
                && !s.flow.remote.ip().is_unspecified()
        })
        .map(|s| {
            let listener = listening(s.flow.local);
            OpenSocket {
                inbound: listener && u32::from(s.flow.local.port()) < privileged,
                listener,
                ..s
            }
        })
        .collect();
    open.sort();
    open.dedup_by(|a, b| a.flow == b.flow);
    Ok(open)
}

/// Ports below this need CAP_NET_BIND_SERVICE (a per-namespace sysctl;
/// Linux's default when it cannot be read).
fn unprivileged_port_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

fn canonical(addr: IpAddr, port: u16) -> SocketAddr {
    let ip = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
        v4 => v4,
    };
    SocketAddr::new(ip, port)
}

fn dump(
    socket: &mut SockDiag,
    family: u8,
    protocol: u8,
    states: StateFlags,
    out: &mut Vec<OpenSocket>,
) -> io::Result<()> {
    let socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let request = socket.request(
        NLM_F_REQUEST | NLM_F_DUMP,
        InetRequest {
            family,
            protocol,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id,
        },
    );
    let mut bad = None;
    socket
        .sock
        .dump(&request, |kind, payload| {
            if kind != SOCK_DIAG_BY_FAMILY {
                return;
            }
            match InetResponseHeader::parse(payload) {
                Ok(r) => out.push(OpenSocket {
                    flow: OpenFlow {
                        protocol,
                        local: canonical(r.socket_id.source_address, r.socket_id.source_port),
                        remote: canonical(
                            r.socket_id.destination_address,
                            r.socket_id.destination_port,
                        ),
                    },
                    uid: r.uid,
                    inbound: false,
                    listener: false,
                    cookie: u64::from_ne_bytes(r.socket_id.cookie),
                    // Given to CAP_NET_ADMIN only.
                    mark: attrs(payload.get(r.buffer_len()..).unwrap_or(&[]))
                        .find(|(k, _)| *k == INET_DIAG_MARK)
                        .and_then(|(_, v)| Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))),
                }),
                Err(e) => bad = Some(e.to_string()),
            }
        })?
        .map_err(|e| io::Error::other(format!("sock_diag: {e}")))?;
    match bad {
        Some(e) => Err(io::Error::other(format!("sock_diag: {e}"))),
        None => Ok(()),
    }
}

/// A sock_diag socket.
pub struct SockDiag {
    sock: NetlinkSocket,
    seq: u32,
}

/// What sock_diag knows about one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketInfo {
    pub inode: u64,
    pub uid: u32,
    pub cgroup_id: Option<u64>,
}

impl SockDiag {
    pub fn open() -> io::Result<SockDiag> {
        Ok(SockDiag {
            sock: NetlinkSocket::open(libc::NETLINK_SOCK_DIAG as isize)?,
            seq: 0,
        })
    }

    /// One request; each has its own sequence number, so a late reply to an
    /// earlier one is never taken for its answer.
    fn request(&mut self, flags: u16, request: InetRequest) -> Vec<u8> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, SockDiagMessage::InetRequest(request).into());
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        buf
    }

    /// Exact lookup of the local socket that sent `src:sport → dst:dport`.
    ///
    /// A socket no process holds any more (closed with data still queued) has
    /// inode 0, and the kernel reports its owner as root: it is nobody's, so it
    /// is not found. Otherwise a user could close a connection to the proxy or
    /// the API mid-request and be taken for root.
    pub fn lookup(
        &mut self,
        protocol: u8,
        src: IpAddr,
        sport: u16,
        dst: IpAddr,
        dport: u16,
    ) -> Option<SocketInfo> {
        // udp_diag looks sockets up with source and destination swapped (a
        // historical quirk of the kernel), so UDP tries both orientations.
        let orientations: &[bool] = if protocol == IPPROTO_UDP {
            &[true, false]
        } else {
            &[false]
        };
        orientations.iter().find_map(|&swap| {
            let ((a, a_port), (b, b_port)) = if swap {
                ((dst, dport), (src, sport))
            } else {
                ((src, sport), (dst, dport))
            };
            let family = match a {
                IpAddr::V4(_) => AF_INET,
                IpAddr::V6(_) => AF_INET6,
            };
            let req = self.request(
                NLM_F_REQUEST,
                InetRequest {
                    family,
                    protocol,
                    extensions: ExtensionFlags::empty(),
                    states: StateFlags::from_bits_retain(u32::MAX),
                    socket_id: SocketId {
                        source_port: a_port,
                        destination_port: b_port,
                        source_address: a,
                        destination_address: b,
                        interface_id: 0,
                        cookie: NO_COOKIE,
                    },
                },
            );
            // The wanted socket is the sender's: its local port is the
            // packet's source port. Over loopback the other orientation finds
            // the receiver (a local server on the destination port) instead.
            let mut info = None;
            self.sock
                .dump(&req, |_, payload| {
                    let local_port = InetResponseHeader::parse(payload)
                        .ok()
                        .map(|h| h.socket_id.source_port);
                    if local_port == Some(sport) {
                        info = parse_diag_msg(payload);
                    }
                })
                .ok()?
                .ok()?;
            info.filter(|i: &SocketInfo| i.inode != 0)
        })
    }
}

/// Parses an inet_diag_msg (the payload of a SOCK_DIAG_BY_FAMILY reply): its
/// header, then the cgroup id among its attributes.
pub fn parse_diag_msg(payload: &[u8]) -> Option<SocketInfo> {
    let header = InetResponseHeader::parse(payload).ok()?;
    let cgroup_id = attrs(payload.get(header.buffer_len()..).unwrap_or(&[]))
        .find(|(k, _)| *k == INET_DIAG_CGROUP_ID)
        .and_then(|(_, v)| Some(u64::from_ne_bytes(v.get(..8)?.try_into().ok()?)));
    Some(SocketInfo {
        inode: u64::from(header.inode),
        uid: header.uid,
        cgroup_id,
    })
}

/// Whether sock_diag answers here (`egret doctor`).
pub fn probe() -> io::Result<()> {
    SockDiag::open().map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diag_messages_parse_and_truncations_do_not_panic() {
        let mut m = vec![0u8; 72];
        m[0] = AF_INET;
        m[64..68].copy_from_slice(&1000u32.to_ne_bytes());
        m[68..72].copy_from_slice(&4242u32.to_ne_bytes());
        m.extend_from_slice(&12u16.to_ne_bytes());
        m.extend_from_slice(&INET_DIAG_CGROUP_ID.to_ne_bytes());
        m.extend_from_slice(&99u64.to_ne_bytes());
        assert_eq!(
            parse_diag_msg(&m),
            Some(SocketInfo {
                inode: 4242,
                uid: 1000,
                cgroup_id: Some(99)
            })
        );
        for cut in 0..m.len() {
            let _ = parse_diag_msg(&m[..cut]);
        }
    }

    #[test]
    fn a_lookup_finds_this_process_s_own_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (local, remote) = (client.local_addr().unwrap(), client.peer_addr().unwrap());
        let mut diag = SockDiag::open().unwrap();
        let found = diag
            .lookup(
                IPPROTO_TCP,
                local.ip(),
                local.port(),
                remote.ip(),
                remote.port(),
            )
            .expect("sock_diag finds an open socket");
        assert_eq!(found.uid, nix::unistd::geteuid().as_raw());
        assert_ne!(found.inode, 0);
        // Nothing listens or connects here.
        assert_eq!(
            diag.lookup(IPPROTO_TCP, local.ip(), 1, remote.ip(), 1),
            None
        );
    }
}
