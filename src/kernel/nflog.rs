//! nfnetlink_log: the socket bound to egret's NFLOG group, its configuration
//! messages, and NFULNL packet messages decoded in place. What a packet means
//! (egret's prefixes, the packet's headers, the books) is `monitor::nflog`'s.
//!
//! Protocol facts this relies on (measured, see docs/architecture.md): one
//! consumer per group; `NFULA_SEQ` counts every message of the instance from
//! 0; the output hook carries no timestamp, so packets are stamped on receipt;
//! UID/GID are present for packets from local full sockets.

use std::io;
use std::time::{Duration, SystemTime};

use super::netlink::{
    attrs, be_u32, messages, MsgBuilder, NetlinkSocket, NLMSG_ERROR, NLM_F_ACK, NLM_F_REQUEST,
};

const NETLINK_NETFILTER: isize = libc::NETLINK_NETFILTER as isize;
const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;

const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULA_CFG_NLBUFSIZ: u16 = 3;
const NFULA_CFG_TIMEOUT: u16 = 4;
const NFULA_CFG_QTHRESH: u16 = 5;
const NFULA_CFG_FLAGS: u16 = 6;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULNL_CFG_F_SEQ: u16 = 1;

const NFULA_IFINDEX_INDEV: u16 = 4;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NFULA_UID: u16 = 11;
const NFULA_SEQ: u16 = 12;
const NFULA_GID: u16 = 14;

/// Enough for IPv6 + a few extension headers + the transport ports.
pub const COPY_BYTES: u32 = 128;

/// Tuning for the NFLOG instance and our socket.
#[derive(Debug, Clone, Copy)]
pub struct NflogConfig {
    pub group: u16,
    /// Socket receive buffer; raised past rmem_max with SO_RCVBUFFORCE.
    pub rcvbuf: usize,
    /// Packets the kernel batches into one message burst.
    pub qthresh: u32,
    /// Longest a batch waits before the kernel flushes it.
    pub flush: Duration,
}

impl NflogConfig {
    pub fn new(group: u16) -> NflogConfig {
        NflogConfig {
            group,
            rcvbuf: 32 << 20,
            qthresh: 32,
            flush: Duration::from_millis(100),
        }
    }
}

/// The fields of one NFULNL_MSG_PACKET, borrowed from the receive buffer.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RawRecord<'a> {
    pub prefix: &'a [u8],
    pub payload: &'a [u8],
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub seq: Option<u32>,
    /// Input interface: set for forwarded packets (the forward hook).
    pub indev: Option<u32>,
}

/// Parses the payload of a packet message (after nlmsghdr). Never panics;
/// missing attributes stay `None`/empty.
pub fn parse_record(payload: &[u8]) -> Option<RawRecord<'_>> {
    let body = payload.get(4..)?; // nfgenmsg
    let mut rec = RawRecord::default();
    for (kind, value) in attrs(body) {
        match kind {
            NFULA_PREFIX => rec.prefix = value,
            NFULA_PAYLOAD => rec.payload = value,
            NFULA_UID => rec.uid = be_u32(value),
            NFULA_GID => rec.gid = be_u32(value),
            NFULA_SEQ => rec.seq = be_u32(value),
            NFULA_IFINDEX_INDEV => rec.indev = be_u32(value),
            _ => {}
        }
    }
    Some(rec)
}

/// What one receive brought, as the reader hands it on.
#[derive(Debug)]
pub enum Received<'a> {
    /// A packet message, stamped on receipt.
    Packet(SystemTime, RawRecord<'a>),
    /// Messages the kernel numbered but that never arrived (a sequence gap).
    Lost(u64),
    /// The kernel signalled a receive-buffer overrun (ENOBUFS).
    Overrun,
    /// A packet message that did not parse.
    Malformed,
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("NFLOG group {0} is already in use by another program (ulogd2 or another egret?); pick another `log_group` in the policy or stop that program")]
    Busy(u16),
    #[error("binding NFLOG group {group}: {source}")]
    Io { group: u16, source: io::Error },
}

/// Gaps in `NFULA_SEQ`.
#[derive(Debug, Default)]
struct Sequence {
    next: Option<u32>,
}

impl Sequence {
    /// Messages skipped before `seq`.
    fn see(&mut self, seq: u32) -> u64 {
        let mut lost = 0;
        if let Some(expected) = self.next {
            let gap = seq.wrapping_sub(expected);
            // A huge "gap" is a reordering or restart, not billions of losses.
            if gap != 0 && gap < u32::MAX / 2 {
                lost = u64::from(gap);
            }
        }
        self.next = Some(seq.wrapping_add(1));
        lost
    }
}

/// The socket bound to one NFLOG group.
pub struct NflogSocket {
    sock: NetlinkSocket,
    buf: Vec<u8>,
    seq: Sequence,
}

impl NflogSocket {
    /// Binds `cfg.group`. Packets that arrive before the kernel's ack go to
    /// `each`, so that nothing is lost to the handshake.
    pub fn bind(
        cfg: NflogConfig,
        each: &mut dyn FnMut(Received<'_>),
    ) -> Result<NflogSocket, BindError> {
        let io_err = |source| BindError::Io {
            group: cfg.group,
            source,
        };
        let sock = NetlinkSocket::open(NETLINK_NETFILTER).map_err(io_err)?;
        sock.force_buffer(false, cfg.rcvbuf);
        let mut nflog = NflogSocket {
            sock,
            buf: vec![0; 256 * 1024],
            seq: Sequence::default(),
        };
        let seq = 1;
        let mut b = MsgBuilder::default();
        b.begin(
            (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            libc::AF_UNSPEC as u8,
            cfg.group,
        );
        b.attr(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND]);
        let mut mode = COPY_BYTES.to_be_bytes().to_vec();
        mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
        b.attr(NFULA_CFG_MODE, &mode);
        b.attr_u32(NFULA_CFG_NLBUFSIZ, 128 * 1024);
        b.attr_u32(
            NFULA_CFG_TIMEOUT,
            (cfg.flush.as_millis() / 10).max(1) as u32,
        );
        b.attr_u32(NFULA_CFG_QTHRESH, cfg.qthresh.max(1));
        b.attr(NFULA_CFG_FLAGS, &NFULNL_CFG_F_SEQ.to_be_bytes());
        b.end();
        nflog.sock.send(&b.buf).map_err(io_err)?;
        loop {
            nflog
                .sock
                .wait_readable(Duration::from_secs(5))
                .map_err(io_err)?;
            match nflog.read_once(each, Some(seq)) {
                Ok(Some(0)) => return Ok(nflog),
                Ok(Some(errno)) if errno == libc::EBUSY || errno == libc::EPERM => {
                    return Err(BindError::Busy(cfg.group))
                }
                Ok(Some(errno)) => return Err(io_err(io::Error::from_raw_os_error(errno))),
                Ok(None) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(io_err(e)),
            }
        }
    }

    /// Receives and decodes everything queued, waiting up to `wait` for the
    /// first message. Returns once the socket is empty.
    pub fn drain(&mut self, wait: Duration, each: &mut dyn FnMut(Received<'_>)) -> io::Result<()> {
        if !self.sock.wait_readable(wait)? {
            return Ok(());
        }
        loop {
            match self.read_once(each, None) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => each(Received::Overrun),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// One recv. Returns the errno of an ack for `ack_seq` if one arrived.
    fn read_once(
        &mut self,
        each: &mut dyn FnMut(Received<'_>),
        ack_seq: Option<u32>,
    ) -> io::Result<Option<i32>> {
        let n = self.sock.try_recv(&mut self.buf)?;
        let received = SystemTime::now();
        let mut ack = None;
        for msg in messages(&self.buf[..n]) {
            if msg.msg_type == NLMSG_ERROR {
                if Some(msg.seq) == ack_seq {
                    let code = msg
                        .payload
                        .get(..4)
                        .and_then(|b| b.try_into().ok())
                        .map(i32::from_ne_bytes)
                        .unwrap_or(-libc::EIO);
                    ack = Some(-code);
                }
                continue;
            }
            if msg.msg_type != (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET {
                continue;
            }
            let Some(rec) = parse_record(msg.payload) else {
                each(Received::Malformed);
                continue;
            };
            if let Some(seq) = rec.seq {
                let lost = self.seq.see(seq);
                if lost > 0 {
                    each(Received::Lost(lost));
                }
            }
            each(Received::Packet(received, rec));
        }
        Ok(ack)
    }
}

/// The netlink port holding NFLOG group `group` in this network namespace,
/// from `/proc/net/netfilter/nfnetlink_log` (one line per bound group:
/// group, port, ...). `Err` when nfnetlink_log is not loaded yet.
pub fn group_holder(group: u16) -> io::Result<Option<u32>> {
    let text = std::fs::read_to_string("/proc/net/netfilter/nfnetlink_log")?;
    Ok(text.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let g: u16 = f.next()?.parse().ok()?;
        let port: u32 = f.next()?.parse().ok()?;
        (g == group).then_some(port)
    }))
}

/// The process holding the netfilter netlink socket with this port id:
/// `/proc/net/netlink` gives the socket's inode, `/proc/*/fd` its owner.
pub fn port_owner(port: u32) -> Option<u32> {
    let table = std::fs::read_to_string("/proc/net/netlink").ok()?;
    let inode = table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (proto, pid, inode) = (
            f.get(1)?.parse::<u32>().ok()?,
            f.get(2)?.parse::<u32>().ok()?,
            f.get(9)?,
        );
        (proto == NETLINK_NETFILTER as u32 && pid == port).then(|| inode.to_string())
    })?;
    let link = format!("socket:[{inode}]");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|p| {
        let pid: u32 = p.file_name().to_str()?.parse().ok()?;
        let fds = std::fs::read_dir(p.path().join("fd")).ok()?;
        fds.flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == link.as_str()))
            .then_some(pid)
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One NFULNL packet message as the kernel sends it.
    pub(crate) fn packet_msg(prefix: &str, uid: u32, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut b = MsgBuilder::default();
        b.begin(NFNL_SUBSYS_ULOG << 8, 0, 0, libc::AF_INET as u8, 5);
        b.attr(1, &[8, 0, 3, 0]);
        b.attr_str(NFULA_PREFIX, prefix);
        b.attr(NFULA_PAYLOAD, payload);
        b.attr_u32(NFULA_UID, uid);
        b.attr_u32(NFULA_GID, uid + 1);
        b.attr_u32(NFULA_SEQ, seq);
        b.end();
        b.buf
    }

    #[test]
    fn a_packet_message_decodes() {
        let pkt = [0x45u8, 0, 0, 28];
        let msg = packet_msg("egret:blocked", 1000, 7, &pkt);
        let m = messages(&msg).next().unwrap();
        let rec = parse_record(m.payload).unwrap();
        assert_eq!(
            (rec.uid, rec.gid, rec.seq),
            (Some(1000), Some(1001), Some(7))
        );
        assert_eq!(rec.payload, &pkt[..]);
        assert_eq!(rec.prefix, b"egret:blocked\0");
    }

    #[test]
    fn sequence_gaps_are_counted_and_restarts_are_not() {
        let mut s = Sequence::default();
        let lost: u64 = [0, 1, 2, 5, 6, 10, 3].into_iter().map(|n| s.see(n)).sum();
        assert_eq!(lost, 2 + 3);
    }
}
