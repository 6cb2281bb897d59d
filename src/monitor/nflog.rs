//! nfnetlink_log: binds egret's NFLOG group and turns kernel messages into
//! [`LoggedPacket`]s. Keeps the books that loss accounting needs: messages
//! received, sequence gaps and receive-buffer overruns (ENOBUFS).
//!
//! Protocol facts this relies on (measured, see docs/architecture.md): one
//! consumer per group; `NFULA_SEQ` counts every message of the instance from
//! 0; the output hook carries no timestamp, so packets are stamped on receipt;
//! UID/GID are present for packets from local full sockets.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::kernel::netlink::{
    attrs, be_u32, messages, MsgBuilder, NetlinkSocket, NLMSG_ERROR, NLM_F_ACK, NLM_F_REQUEST,
};
use crate::monitor::packet::{self, Flow};
use crate::ruleset::{PREFIX_BLOCKED, PREFIX_WOULD_BLOCK};

const NETLINK_NETFILTER: isize = 12;
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

/// Which egret rule logged the packet, read from the log prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Verdict {
    /// true: the packet was dropped/rejected; false: audit mode let it pass.
    pub blocked: bool,
    /// The policy rule whose per-rule mode caught it, or None for the final rule.
    pub rule: Option<String>,
}

impl Verdict {
    pub fn parse(prefix: &[u8]) -> Option<Verdict> {
        let prefix = std::str::from_utf8(prefix).ok()?.trim_end_matches('\0');
        for (tag, blocked) in [(PREFIX_BLOCKED, true), (PREFIX_WOULD_BLOCK, false)] {
            if let Some(rest) = prefix.strip_prefix(tag) {
                return match rest.strip_prefix(':') {
                    None if rest.is_empty() => Some(Verdict {
                        blocked,
                        rule: None,
                    }),
                    Some(rule) if !rule.is_empty() => Some(Verdict {
                        blocked,
                        rule: Some(rule.to_string()),
                    }),
                    _ => None,
                };
            }
        }
        None
    }
}

/// One packet egret's ruleset logged, as received.
#[derive(Debug, Clone)]
pub struct LoggedPacket {
    pub received: SystemTime,
    pub verdict: Verdict,
    pub flow: Result<Flow, packet::DecodeError>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Input interface index, for forwarded packets.
    pub indev: Option<u32>,
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

/// Counters the reader keeps; shared with the daemon for accounting.
#[derive(Debug, Default)]
pub struct NflogStats {
    /// Messages with an egret prefix that reached us.
    pub received: AtomicU64,
    /// Messages the kernel numbered but we never saw (sequence gaps).
    pub seq_lost: AtomicU64,
    /// Receive-buffer overruns the kernel signalled.
    pub enobufs: AtomicU64,
    /// Messages in our group without an egret prefix (someone else's rule).
    pub foreign: AtomicU64,
    /// Messages that were not parseable at all.
    pub malformed: AtomicU64,
    /// Milliseconds since `epoch` when the socket was last found empty.
    pub drained_at_ms: AtomicU64,
}

pub struct NflogReader {
    sock: NetlinkSocket,
    buf: Vec<u8>,
    next_seq: Option<u32>,
    pub stats: Arc<NflogStats>,
    epoch: Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("NFLOG group {0} is already in use by another program (ulogd2 or another egret?); pick another `log_group` in the policy or stop that program")]
    Busy(u16),
    #[error("binding NFLOG group {group}: {source}")]
    Io { group: u16, source: io::Error },
}

impl NflogReader {
    /// Binds `cfg.group`. Packets that arrive before the kernel's ack are kept
    /// and handed to `sink`, so that nothing is lost to the handshake.
    pub fn bind(
        cfg: NflogConfig,
        epoch: Instant,
        sink: &mut dyn FnMut(LoggedPacket),
    ) -> Result<NflogReader, BindError> {
        let io_err = |source| BindError::Io {
            group: cfg.group,
            source,
        };
        let sock = NetlinkSocket::open(NETLINK_NETFILTER).map_err(io_err)?;
        sock.force_buffer(false, cfg.rcvbuf);
        let mut reader = NflogReader {
            sock,
            buf: vec![0; 256 * 1024],
            next_seq: None,
            stats: Arc::default(),
            epoch,
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
        reader.sock.send(&b.buf).map_err(io_err)?;
        loop {
            reader
                .sock
                .wait_readable(Duration::from_secs(5))
                .map_err(io_err)?;
            match reader.read_once(sink, Some(seq)) {
                Ok(Some(0)) => return Ok(reader),
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
    /// first message. Returns how many packets went to `sink`.
    pub fn drain(
        &mut self,
        wait: Duration,
        sink: &mut dyn FnMut(LoggedPacket),
    ) -> io::Result<usize> {
        if !self.sock.wait_readable(wait)? {
            self.mark_drained();
            return Ok(0);
        }
        let before = self.stats.received.load(Ordering::Relaxed);
        loop {
            match self.read_once(sink, None) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.mark_drained();
                    break;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    self.stats.enobufs.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok((self.stats.received.load(Ordering::Relaxed) - before) as usize)
    }

    fn mark_drained(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.stats.drained_at_ms.store(ms, Ordering::Relaxed);
    }

    /// One recv. Returns the errno of an ack for `ack_seq` if one arrived.
    fn read_once(
        &mut self,
        sink: &mut dyn FnMut(LoggedPacket),
        ack_seq: Option<u32>,
    ) -> io::Result<Option<i32>> {
        let n = self.sock.try_recv(&mut self.buf)?;
        let received = SystemTime::now();
        let mut ack = None;
        // Moved out for the loop so that seq tracking can borrow self.
        let buf = std::mem::take(&mut self.buf);
        for msg in messages(&buf[..n]) {
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
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if let Some(seq) = rec.seq {
                self.track_seq(seq);
            }
            let Some(verdict) = Verdict::parse(rec.prefix) else {
                self.stats.foreign.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            self.stats.received.fetch_add(1, Ordering::Relaxed);
            sink(LoggedPacket {
                received,
                verdict,
                flow: packet::decode(rec.payload),
                uid: rec.uid,
                gid: rec.gid,
                indev: rec.indev,
            });
        }
        self.buf = buf;
        Ok(ack)
    }

    fn track_seq(&mut self, seq: u32) {
        if let Some(expected) = self.next_seq {
            let gap = seq.wrapping_sub(expected);
            // A huge "gap" is a reordering or restart, not billions of losses.
            if gap != 0 && gap < u32::MAX / 2 {
                self.stats
                    .seq_lost
                    .fetch_add(u64::from(gap), Ordering::Relaxed);
            }
        }
        self.next_seq = Some(seq.wrapping_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn packet_msg(prefix: &str, uid: u32, seq: u32, payload: &[u8]) -> Vec<u8> {
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
        let pkt = crate::monitor::packet::tests::ipv4_udp([10, 1, 0, 1], [10, 1, 0, 2], 999, 1389);
        let msg = packet_msg("egret:blocked", 1000, 7, &pkt);
        let m = messages(&msg).next().unwrap();
        let rec = parse_record(m.payload).unwrap();
        assert_eq!(
            (rec.uid, rec.gid, rec.seq),
            (Some(1000), Some(1001), Some(7))
        );
        assert_eq!(rec.payload, &pkt[..]);
        assert_eq!(
            Verdict::parse(rec.prefix),
            Some(Verdict {
                blocked: true,
                rule: None
            })
        );
    }

    #[test]
    fn prefixes() {
        let v = |s: &str| Verdict::parse(s.as_bytes());
        assert_eq!(
            v("egret:would-block:web\0"),
            Some(Verdict {
                blocked: false,
                rule: Some("web".into())
            })
        );
        assert_eq!(v("egret:blockedX"), None);
        assert_eq!(v("egret:blocked:"), None);
        assert_eq!(v("ufw-block"), None);
        assert_eq!(Verdict::parse(&[0xff, 0xfe]), None);
    }

    #[test]
    fn sequence_gaps_are_counted_and_restarts_are_not() {
        let sock = NetlinkSocket::open(NETLINK_NETFILTER).unwrap();
        let mut r = NflogReader {
            sock,
            buf: vec![],
            next_seq: None,
            stats: Arc::default(),
            epoch: Instant::now(),
        };
        for s in [0, 1, 2, 5, 6, 10, 3] {
            r.track_seq(s);
        }
        assert_eq!(r.stats.seq_lost.load(Ordering::Relaxed), 2 + 3);
    }

    proptest! {
        #[test]
        fn arbitrary_and_truncated_messages_never_panic(
            cut in 0usize..200,
            junk in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let pkt = crate::monitor::packet::tests::ipv4_udp([10, 1, 0, 1], [10, 1, 0, 2], 1, 2);
            let msg = packet_msg("egret:blocked:x", 1, 2, &pkt);
            for buf in [&msg[..cut.min(msg.len())], &junk[..]] {
                for m in messages(buf) {
                    if let Some(rec) = parse_record(m.payload) {
                        let _ = Verdict::parse(rec.prefix);
                        let _ = packet::decode(rec.payload);
                    }
                }
                if let Some(rec) = parse_record(buf) {
                    let _ = packet::decode(rec.payload);
                }
            }
        }
    }
}
