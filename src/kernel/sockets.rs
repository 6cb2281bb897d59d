//! sock_diag: the TCP connections open right now in this network namespace.

use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{nlas::Nla, ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr as NlAddr};

use crate::ruleset::OpenFlow;

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
pub fn open_tcp() -> std::io::Result<Vec<OpenSocket>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NlAddr::new(0, 0))?;
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
    socket: &mut Socket,
    family: u8,
    protocol: u8,
    states: StateFlags,
    out: &mut Vec<OpenSocket>,
) -> std::io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id,
        })
        .into(),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut rx = vec![0u8; 64 * 1024];
    loop {
        let n = socket.recv(&mut &mut rx[..], 0)?;
        let mut offset = 0;
        while offset < n {
            let msg = match NetlinkMessage::<SockDiagMessage>::deserialize(&rx[offset..n]) {
                Ok(m) => m,
                Err(e) => return Err(std::io::Error::other(format!("sock_diag: {e}"))),
            };
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let id = &r.header.socket_id;
                    out.push(OpenSocket {
                        flow: OpenFlow {
                            protocol,
                            local: canonical(id.source_address, id.source_port),
                            remote: canonical(id.destination_address, id.destination_port),
                        },
                        uid: r.header.uid,
                        inbound: false,
                        listener: false,
                        cookie: u64::from_ne_bytes(id.cookie),
                        mark: r.nlas.iter().find_map(|n| match n {
                            Nla::Mark(m) => Some(*m),
                            _ => None,
                        }),
                    });
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return Err(std::io::Error::other(format!("sock_diag: {e}")))
                }
                _ => {}
            }
            if len == 0 {
                return Ok(());
            }
            offset += (len + 3) & !3;
        }
    }
}
