//! sock_diag: the TCP connections open right now in this network namespace.

use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr as NlAddr};

use crate::ruleset::OpenFlow;

/// An established TCP connection, with its owner and direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct OpenSocket {
    pub flow: OpenFlow,
    pub uid: u32,
    /// Accepted by a local listener: its packets out are replies.
    pub inbound: bool,
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
        .map(|s| OpenSocket {
            inbound: listening(s.flow.local),
            ..s
        })
        .collect();
    open.sort();
    open.dedup_by(|a, b| a.flow == b.flow);
    Ok(open)
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
