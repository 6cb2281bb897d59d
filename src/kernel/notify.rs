//! nf_tables' own change notifications (multicast group NFNLGRP_NFTABLES, what
//! `nft monitor` reads): every committed transaction that touched egret's
//! table, and who committed it. The kernel ends each transaction's messages
//! with NFT_MSG_NEWGEN, which names the committing process (pid and comm);
//! every message's header carries the committing socket's netlink port, which
//! tells egret's own transactions (sockets this process opened) from others'.

use std::collections::BTreeSet;
use std::io;
use std::sync::Mutex;

use super::netlink::*;

use super::nft::{
    MSG_DELCHAIN, MSG_DELRULE, MSG_DELSET, MSG_DELSETELEM, MSG_DELTABLE, MSG_NEWCHAIN, MSG_NEWGEN,
    MSG_NEWRULE, MSG_NEWSET, MSG_NEWSETELEM, MSG_NEWTABLE, NETLINK_NETFILTER, NFNL_SUBSYS_NFTABLES,
    NFPROTO_INET,
};

const NFNLGRP_NFTABLES: u32 = 7;
use crate::ruleset::{HOST_SET_PREFIX, TABLE};

const GEN_PROC_PID: u16 = 2;
const GEN_PROC_NAME: u16 = 3;
/// Attribute 1 of every table-scoped message (table, chain, rule, set,
/// element list, object, flowtable) is the table's name; attribute 2 of a
/// chain message is its name too, and of an element list its set.
const ATTR_TABLE: u16 = 1;
const ATTR_SET_OF_ELEMENTS: u16 = 2;
const ATTR_SET_NAME: u16 = 2;
const ATTR_CHAIN_OF_RULE: u16 = 2;
const ATTR_CHAIN_NAME: u16 = 3;

/// Most changes listed per transaction; the rest are counted.
const MAX_CHANGES: usize = 16;

/// Netlink ports of the nf_tables sockets this process has open: their
/// transactions are egret's own.
static OWN_PORTS: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

pub(super) fn own_port(port: u32, open: bool) {
    let mut ports = OWN_PORTS.lock().unwrap_or_else(|p| p.into_inner());
    if open {
        ports.insert(port);
    } else {
        ports.remove(&port);
    }
}

fn is_own(port: u32) -> bool {
    OWN_PORTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&port)
}

/// One transaction that changed egret's table, committed by someone else.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForeignCommit {
    /// The committing task, as the kernel names it (NFTA_GEN_PROC_PID/NAME).
    pub pid: Option<u32>,
    pub process: Option<String>,
    /// What changed, e.g. "rule added to chain output", "elements added to set a_web_v4".
    pub changes: Vec<String>,
    /// Changes beyond `changes` that were only counted.
    pub more: usize,
    /// The transaction's last word on the table was its deletion.
    pub deleted: bool,
    /// It added elements to a DNS guard set (`h_<rule>_v4/v6`): a restore
    /// must not carry that set's live elements over.
    pub host_sets: bool,
}

/// What one poll found.
#[derive(Debug, Default)]
pub struct Notifications {
    pub foreign: Vec<ForeignCommit>,
    /// The socket overran (ENOBUFS): changes were lost, so the caller must
    /// compare the whole table instead.
    pub overrun: bool,
}

struct Change {
    text: String,
    /// Some(true): the table was created, Some(false): deleted.
    table: Option<bool>,
    host_set: bool,
}

pub struct ChangeListener {
    sock: NetlinkSocket,
    buf: Vec<u8>,
    /// Changes to egret's table seen since the last NEWGEN, and whose port.
    pending: Vec<(u32, Change)>,
}

impl ChangeListener {
    pub fn open() -> io::Result<ChangeListener> {
        let sock = NetlinkSocket::open(NETLINK_NETFILTER)?;
        sock.join_group(NFNLGRP_NFTABLES)?;
        // egret's own reload of a 100k-element policy is notified element by
        // element; an overrun only costs a full comparison.
        sock.force_buffer(false, 8 << 20);
        Ok(ChangeListener {
            sock,
            buf: vec![0; 256 * 1024],
            pending: Vec::new(),
        })
    }

    /// Reads every notification queued now, without waiting.
    pub fn poll(&mut self) -> Notifications {
        let mut out = Notifications::default();
        loop {
            let n = match self.sock.try_recv(&mut self.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return out,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    out.overrun = true;
                    self.pending.clear();
                    continue;
                }
                Err(_) => {
                    out.overrun = true;
                    return out;
                }
            };
            let buf = std::mem::take(&mut self.buf);
            for m in messages(&buf[..n]) {
                self.message(&m, &mut out);
            }
            self.buf = buf;
        }
    }

    fn message(&mut self, m: &RawMsg<'_>, out: &mut Notifications) {
        if m.msg_type >> 8 != NFNL_SUBSYS_NFTABLES {
            return;
        }
        let kind = m.msg_type & 0xff;
        let family = m.payload.first().copied().unwrap_or(0);
        let body = m.payload.get(4..).unwrap_or_default();
        if kind == MSG_NEWGEN {
            let pending = std::mem::take(&mut self.pending);
            let foreign: Vec<Change> = pending
                .into_iter()
                .filter(|(port, _)| !is_own(*port))
                .map(|(_, c)| c)
                .collect();
            if foreign.is_empty() {
                return;
            }
            let mut commit = ForeignCommit::default();
            for (k, v) in attrs(body) {
                match k {
                    GEN_PROC_PID => commit.pid = be_u32(v),
                    GEN_PROC_NAME => commit.process = Some(c_str(v)),
                    _ => {}
                }
            }
            for Change {
                text: change,
                table,
                host_set,
            } in foreign
            {
                if let Some(exists) = table {
                    commit.deleted = !exists;
                }
                commit.host_sets |= host_set;
                if commit.changes.len() < MAX_CHANGES {
                    if !commit.changes.contains(&change) {
                        commit.changes.push(change);
                    }
                } else {
                    commit.more += 1;
                }
            }
            out.foreign.push(commit);
            return;
        }
        if family != NFPROTO_INET {
            return;
        }
        let attr = |key: u16| {
            attrs(body)
                .find(|(k, _)| *k == key)
                .map(|(_, v)| c_str(v))
                .unwrap_or_default()
        };
        if attr(ATTR_TABLE) != TABLE {
            return;
        }
        let mut host_set = false;
        let (change, table) = match kind {
            MSG_NEWTABLE => ("table created or changed".to_string(), Some(true)),
            MSG_DELTABLE => ("table deleted".to_string(), Some(false)),
            MSG_NEWCHAIN => (
                format!("chain {} added or changed", attr(ATTR_CHAIN_NAME)),
                None,
            ),
            MSG_DELCHAIN => (format!("chain {} deleted", attr(ATTR_CHAIN_NAME)), None),
            MSG_NEWRULE => (
                format!("rule added to chain {}", attr(ATTR_CHAIN_OF_RULE)),
                None,
            ),
            MSG_DELRULE => (
                format!("rule deleted from chain {}", attr(ATTR_CHAIN_OF_RULE)),
                None,
            ),
            MSG_NEWSET => (
                format!("set {} added or changed", attr(ATTR_SET_NAME)),
                None,
            ),
            MSG_DELSET => (format!("set {} deleted", attr(ATTR_SET_NAME)), None),
            MSG_NEWSETELEM => {
                let set = attr(ATTR_SET_OF_ELEMENTS);
                host_set = set.starts_with(HOST_SET_PREFIX);
                (format!("elements added to set {set}"), None)
            }
            MSG_DELSETELEM => {
                let set = attr(ATTR_SET_OF_ELEMENTS);
                // Expired addresses of the DNS guard's sets are run-time
                // state; deleting one only takes an allowance away.
                if set.starts_with(HOST_SET_PREFIX) {
                    return;
                }
                (format!("elements deleted from set {set}"), None)
            }
            other => (format!("nf_tables message {other}"), None),
        };
        // Bounded: a transaction of 100k elements is one pending entry per message.
        if self.pending.len() < 4096 {
            self.pending.push((
                m.port,
                Change {
                    text: change,
                    table,
                    host_set,
                },
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u16, port: u32, family: u8, attrs: &[(u16, &str)]) -> Vec<u8> {
        let mut b = MsgBuilder::default();
        b.begin((NFNL_SUBSYS_NFTABLES << 8) | kind, 0, 1, family, 0);
        for (k, v) in attrs {
            b.attr_str(*k, v);
        }
        b.end();
        b.buf[12..16].copy_from_slice(&port.to_ne_bytes());
        b.buf
    }

    fn feed(l: &mut ChangeListener, buf: &[u8]) -> Notifications {
        let mut out = Notifications::default();
        for m in messages(buf) {
            l.message(&m, &mut out);
        }
        out
    }

    #[test]
    fn foreign_changes_to_egrets_table_are_named_with_their_committer() {
        let Ok(mut l) = ChangeListener::open() else {
            return; // no nf_tables here
        };
        own_port(777, true);
        let mut buf = msg(
            MSG_NEWSETELEM,
            4242,
            NFPROTO_INET,
            &[(1, "egret"), (2, "a_web_v4")],
        );
        buf.extend(msg(
            MSG_NEWRULE,
            4242,
            NFPROTO_INET,
            &[(1, "other"), (2, "output")],
        ));
        let mut b = MsgBuilder::default();
        b.begin((NFNL_SUBSYS_NFTABLES << 8) | MSG_NEWGEN, 0, 1, 0, 0);
        b.attr_u32(GEN_PROC_PID, 4242);
        b.attr_str(GEN_PROC_NAME, "nft");
        b.end();
        let gen = b.buf;
        buf.extend(&gen);
        let out = feed(&mut l, &buf);
        assert_eq!(out.foreign.len(), 1);
        let c = &out.foreign[0];
        assert_eq!(c.pid, Some(4242));
        assert_eq!(c.process.as_deref(), Some("nft"));
        assert_eq!(
            c.changes,
            vec!["elements added to set a_web_v4".to_string()]
        );

        // egret's own transaction, and another table's: nothing.
        let mut buf = msg(
            MSG_NEWSETELEM,
            777,
            NFPROTO_INET,
            &[(1, "egret"), (2, "h_web_v4")],
        );
        buf.extend(msg(
            MSG_NEWRULE,
            4242,
            NFPROTO_INET,
            &[(1, "other"), (2, "output")],
        ));
        buf.extend(&gen);
        assert!(feed(&mut l, &buf).foreign.is_empty());
        own_port(777, false);
    }
}
