//! What the monitor does with egret's NFLOG packets: reads the action and
//! rule from the log prefix, decodes the packet, and keeps the books that loss
//! accounting needs: messages received, sequence gaps and receive-buffer
//! overruns (ENOBUFS). The socket and the NFULNL protocol are
//! `kernel::nflog`'s.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

pub use crate::kernel::nflog::{BindError, NflogConfig, COPY_BYTES};
use crate::kernel::nflog::{NflogSocket, Received};
use crate::monitor::packet::{self, Flow};
use crate::ruleset::{PREFIX_ALLOWED_NEW, PREFIX_BLOCKED, PREFIX_WOULD_BLOCK};

/// What a logged packet's prefix says: blocked or would-block, and which
/// rule (not what a rule does: that is `ruleset::Verdict`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LoggedVerdict {
    /// true: the packet was dropped/rejected; false: audit mode let it pass.
    pub blocked: bool,
    /// The policy rule whose per-rule mode caught it, or None for the final rule.
    pub rule: Option<String>,
}

impl LoggedVerdict {
    pub fn parse(prefix: &[u8]) -> Option<LoggedVerdict> {
        let prefix = std::str::from_utf8(prefix).ok()?.trim_end_matches('\0');
        for (tag, blocked) in [(PREFIX_BLOCKED, true), (PREFIX_WOULD_BLOCK, false)] {
            if let Some(rest) = prefix.strip_prefix(tag) {
                return match rest.strip_prefix(':') {
                    None if rest.is_empty() => Some(LoggedVerdict {
                        blocked,
                        rule: None,
                    }),
                    Some(rule) if !rule.is_empty() => Some(LoggedVerdict {
                        blocked,
                        rule: Some(rule.to_string()),
                    }),
                    _ => None,
                };
            }
        }
        None
    }

    /// `egret:allowed-new:<rule>`: a flow the rule accepted that the
    /// kernel's novelty filter had not seen.
    pub fn parse_allowed_new(prefix: &[u8]) -> Option<LoggedVerdict> {
        let prefix = std::str::from_utf8(prefix).ok()?.trim_end_matches('\0');
        let rule = prefix.strip_prefix(PREFIX_ALLOWED_NEW)?.strip_prefix(':')?;
        (!rule.is_empty()).then(|| LoggedVerdict {
            blocked: false,
            rule: Some(rule.to_string()),
        })
    }
}

/// One packet egret's ruleset logged, as received.
#[derive(Debug, Clone)]
pub struct LoggedPacket {
    pub received: SystemTime,
    pub verdict: LoggedVerdict,
    pub flow: Result<Flow, packet::DecodeError>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Input interface index, for forwarded packets.
    pub indev: Option<u32>,
    /// Logged by a novelty chain (`egret:allowed-new:<rule>`): accepted,
    /// first seen by the kernel's filter.
    pub first_seen: bool,
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
    socket: NflogSocket,
    pub stats: Arc<NflogStats>,
    epoch: Instant,
}

impl NflogReader {
    /// Binds `cfg.group`. Packets that arrive before the kernel's ack are kept
    /// and handed to `sink`, so that nothing is lost to the handshake.
    pub fn bind(
        cfg: NflogConfig,
        epoch: Instant,
        sink: &mut dyn FnMut(LoggedPacket),
    ) -> Result<NflogReader, BindError> {
        let stats = Arc::<NflogStats>::default();
        let socket = NflogSocket::bind(cfg, &mut |r| take(&stats, r, sink))?;
        Ok(NflogReader {
            socket,
            stats,
            epoch,
        })
    }

    /// Receives and decodes everything queued, waiting up to `wait` for the
    /// first message. Returns how many packets went to `sink`.
    pub fn drain(
        &mut self,
        wait: Duration,
        sink: &mut dyn FnMut(LoggedPacket),
    ) -> io::Result<usize> {
        let before = self.stats.received.load(Ordering::Relaxed);
        let stats = &self.stats;
        self.socket.drain(wait, &mut |r| take(stats, r, sink))?;
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.stats.drained_at_ms.store(ms, Ordering::Relaxed);
        Ok((self.stats.received.load(Ordering::Relaxed) - before) as usize)
    }
}

/// Books what the socket received; egret's packets go on to `sink`.
fn take(stats: &NflogStats, r: Received<'_>, sink: &mut dyn FnMut(LoggedPacket)) {
    let count = |c: &AtomicU64, n: u64| {
        c.fetch_add(n, Ordering::Relaxed);
    };
    match r {
        Received::Lost(n) => count(&stats.seq_lost, n),
        Received::Overrun => count(&stats.enobufs, 1),
        Received::Malformed => count(&stats.malformed, 1),
        Received::Packet(received, rec) => {
            let (verdict, first_seen) = match LoggedVerdict::parse(rec.prefix) {
                Some(v) => (v, false),
                None => match LoggedVerdict::parse_allowed_new(rec.prefix) {
                    Some(v) => (v, true),
                    None => return count(&stats.foreign, 1),
                },
            };
            count(&stats.received, 1);
            sink(LoggedPacket {
                received,
                verdict,
                flow: packet::decode(rec.payload),
                uid: rec.uid,
                gid: rec.gid,
                indev: rec.indev,
                first_seen,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::netlink::messages;
    use crate::kernel::nflog::parse_record;
    use crate::kernel::nflog::tests::packet_msg;
    use proptest::prelude::*;

    #[test]
    fn a_packet_message_decodes() {
        let pkt = crate::monitor::packet::tests::ipv4_udp([10, 1, 0, 1], [10, 1, 0, 2], 999, 1389);
        let msg = packet_msg("egret:blocked", 1000, 7, &pkt);
        let m = messages(&msg).next().unwrap();
        let rec = parse_record(m.payload).unwrap();
        assert_eq!(
            LoggedVerdict::parse(rec.prefix),
            Some(LoggedVerdict {
                blocked: true,
                rule: None
            })
        );
        let stats = NflogStats::default();
        let mut got = Vec::new();
        take(&stats, Received::Packet(SystemTime::now(), rec), &mut |p| {
            got.push(p)
        });
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].uid, got[0].gid), (Some(1000), Some(1001)));
        assert!(got[0].flow.is_ok());
    }

    #[test]
    fn prefixes() {
        let v = |s: &str| LoggedVerdict::parse(s.as_bytes());
        assert_eq!(
            v("egret:would-block:web\0"),
            Some(LoggedVerdict {
                blocked: false,
                rule: Some("web".into())
            })
        );
        assert_eq!(v("egret:blockedX"), None);
        assert_eq!(v("egret:blocked:"), None);
        assert_eq!(v("ufw-block"), None);
        assert_eq!(LoggedVerdict::parse(&[0xff, 0xfe]), None);
    }

    #[test]
    fn the_books_count_what_the_socket_reports() {
        let stats = NflogStats::default();
        let mut sink = |_: LoggedPacket| panic!("not egret's");
        let msg = packet_msg("ufw-block", 1, 2, &[]);
        let m = messages(&msg).next().unwrap();
        let foreign = parse_record(m.payload).unwrap();
        take(
            &stats,
            Received::Packet(SystemTime::now(), foreign),
            &mut sink,
        );
        take(&stats, Received::Lost(3), &mut sink);
        take(&stats, Received::Lost(2), &mut sink);
        take(&stats, Received::Overrun, &mut sink);
        take(&stats, Received::Malformed, &mut sink);
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!(
            (
                n(&stats.received),
                n(&stats.foreign),
                n(&stats.seq_lost),
                n(&stats.enobufs),
                n(&stats.malformed)
            ),
            (0, 1, 5, 1, 1)
        );
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
                        let _ = LoggedVerdict::parse(rec.prefix);
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
