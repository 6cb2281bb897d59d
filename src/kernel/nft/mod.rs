//! The only module that speaks nf_tables: [`Ruleset`] → one atomic netlink
//! transaction, and the live `inet egret` table → [`Ruleset`] (with counters).
//!
//! One file per nf_tables object, each with its encoder (methods on [`Batch`])
//! beside its decoder: `table`, `chain`, `set` (sets, elements, keys), `rule`
//! (a rule and its statements: counter, log, verdicts), `matches` (each
//! [`Match`] kind's expressions, written and read back) on `expr` (the
//! expression primitives). This file holds the transport: the connection,
//! its requests and dumps, and the batch that makes one transaction.

use std::collections::HashMap;
use std::io;

use crate::ruleset::*;

use super::netlink::*;

mod chain;
mod expr;
mod matches;
mod rule;
mod set;
mod table;
#[cfg(test)]
mod tests;

pub(super) const NETLINK_NETFILTER: isize = libc::NETLINK_NETFILTER as isize;
pub(super) const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
pub(super) const NFPROTO_INET: u8 = 1;
const AF_UNSPEC: u8 = 0;

// Message types (enum nf_tables_msg_types), shared with `notify`.
pub(super) const MSG_NEWTABLE: u16 = 0;
pub(super) const MSG_GETTABLE: u16 = 1;
pub(super) const MSG_DELTABLE: u16 = 2;
pub(super) const MSG_NEWCHAIN: u16 = 3;
pub(super) const MSG_GETCHAIN: u16 = 4;
pub(super) const MSG_DELCHAIN: u16 = 5;
pub(super) const MSG_NEWRULE: u16 = 6;
pub(super) const MSG_GETRULE: u16 = 7;
pub(super) const MSG_DELRULE: u16 = 8;
pub(super) const MSG_NEWSET: u16 = 9;
pub(super) const MSG_GETSET: u16 = 10;
pub(super) const MSG_DELSET: u16 = 11;
pub(super) const MSG_NEWSETELEM: u16 = 12;
pub(super) const MSG_GETSETELEM: u16 = 13;
pub(super) const MSG_DELSETELEM: u16 = 14;
pub(super) const MSG_NEWGEN: u16 = 15;

// Attribute numbers from include/uapi/linux/netfilter/nf_tables.h used by
// more than one object.
const LIST_ELEM: u16 = 1;
const DATA_VALUE: u16 = 1;
const DATA_VERDICT: u16 = 2;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;

/// nft's userdata TLV type for comments (table, rule).
const UDATA_COMMENT: u8 = 0;

pub type Result<T> = std::result::Result<T, NftError>;

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("netlink I/O: {0}")]
    Io(#[from] io::Error),
    #[error("the kernel rejected {what}: {error}")]
    Kernel { what: String, error: KernelError },
    #[error("the live table was changed outside egret: {0}")]
    Foreign(String),
}

/// A connection to nf_tables in the current network namespace.
pub struct Nftables {
    sock: NetlinkSocket,
    seq: u32,
}

impl From<KernelError> for NftError {
    fn from(error: KernelError) -> NftError {
        NftError::Kernel {
            what: "the request".into(),
            error,
        }
    }
}

impl Drop for Nftables {
    fn drop(&mut self) {
        if let Ok(port) = self.sock.port() {
            super::notify::own_port(port, false);
        }
    }
}

impl Nftables {
    pub fn open() -> Result<Nftables> {
        let sock = NetlinkSocket::open(NETLINK_NETFILTER)?;
        // A 100k-entry ruleset is several MB and must go in one datagram.
        sock.force_buffer(true, 64 << 20);
        sock.force_buffer(false, 8 << 20);
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(1);
        if let Ok(port) = sock.port() {
            super::notify::own_port(port, true);
        }
        Ok(Nftables { sock, seq })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Replaces egret's table with `rs` in one transaction: either all of it is
    /// live afterwards or nothing changed.
    ///
    /// Elements of timeout sets (addresses the DNS guard resolved) are run-time
    /// state, not policy: those of a live set with the same name and key are
    /// carried into the new table with their remaining time, in the same transaction.
    pub fn apply(&mut self, rs: &Ruleset) -> Result<()> {
        self.apply_carrying(rs, true)
    }

    /// [`Nftables::apply`]; with `carry` false the timeout sets start empty
    /// (someone else wrote into them: their live elements are not egret's).
    pub fn apply_carrying(&mut self, rs: &Ruleset, carry: bool) -> Result<()> {
        let mut carried = Vec::new();
        if carry && rs.sets.iter().any(|s| s.timeout) && self.get_table()?.is_some() {
            let live = self.live_sets()?;
            for set in rs.sets.iter().filter(|s| s.timeout) {
                if live
                    .iter()
                    .any(|l| l.name == set.name && l.key == set.key && l.timeout)
                {
                    carried.push((set, self.timed_elements(set)?));
                }
            }
        }
        let mut batch = Batch::new(self.next_seq());
        batch.replace_table(rs);
        for (set, elements) in &carried {
            batch.timed_elements(set, elements);
        }
        self.commit(batch)
    }

    /// Gives elements of live timeout sets these timeouts (milliseconds),
    /// whether or not they are already there, all in one transaction.
    ///
    /// Re-adding an element replaces its timeout on 6.18 but not on 6.1 or
    /// 5.10 (measured: the old expiry stays), so each element is added (it
    /// may have expired), deleted and added again with its new timeout. The
    /// transaction commits at once: no packet sees the element missing.
    pub fn add_timed_elements(&mut self, items: &[(&Set, Vec<(Element, u64)>)]) -> Result<()> {
        let mut batch = Batch::new(self.next_seq());
        for (set, elements) in items {
            batch.timed_elements(set, elements);
            batch.delete_elements(set, elements.iter().map(|(e, _)| e.clone()));
            batch.timed_elements(set, elements);
        }
        self.commit(batch)
    }

    /// Deletes egret's table if it exists.
    pub fn remove(&mut self) -> Result<()> {
        let mut batch = Batch::new(self.next_seq());
        batch.ensure_and_delete_table();
        self.commit(batch)
    }

    /// Replaces all elements of a live set atomically.
    pub fn replace_elements(&mut self, set: &Set, elements: &[Element]) -> Result<()> {
        let mut batch = Batch::new(self.next_seq());
        batch.flush_set(&set.name);
        batch.elements(MSG_NEWSETELEM, NLM_F_CREATE, set, None, elements, &[]);
        self.commit(batch)
    }

    fn commit(&mut self, mut batch: Batch) -> Result<()> {
        let last = batch.finish();
        self.seq = last.wrapping_add(1);
        self.sock.send(&batch.b.buf)?;
        match self.sock.wait_ack(last)? {
            Ok(()) => Ok(()),
            Err(error) => {
                let what = batch
                    .labels
                    .iter()
                    .rev()
                    .find(|(seq, _)| *seq <= error.seq)
                    .map(|(_, l)| l.clone())
                    .unwrap_or_else(|| "the transaction".into());
                Err(NftError::Kernel { what, error })
            }
        }
    }

    /// Reads egret's live table, or `None` when it is not loaded.
    pub fn read(&mut self) -> Result<Option<Ruleset>> {
        let comment = match self.get_table()? {
            Some(c) => c,
            None => return Ok(None),
        };
        let mut sets = Vec::new();
        for mut set in self.live_sets()? {
            // A timeout set's elements are run-time state (the DNS guard's
            // addresses), not policy.
            if !set.timeout {
                set.elements = self.dump_elements(&set)?;
            }
            sets.push(set);
        }
        sets.sort_by(|a, b| a.name.cmp(&b.name));
        let mut chains = self.live_chains()?;
        let Some(rules) = self.dump_rules()? else {
            return Ok(None);
        };
        for (chain_name, rule) in rules {
            if let Some(chain) = chains.iter_mut().find(|c| c.name == chain_name) {
                chain.rules.push(rule);
            }
        }
        Ok(Some(Ruleset {
            comment,
            sets,
            chains,
        }))
    }

    /// Packets egret's log rules have counted since the table was loaded, or
    /// `None` when it is not loaded. Reads rules only (no set elements), so
    /// it stays cheap with 100k-entry sets.
    pub fn logged_packets(&mut self) -> Result<Option<u64>> {
        Ok(self.live_rules()?.map(|rules| logged_total(&rules)))
    }

    /// The rules of egret's live table with their chains, or `None` when it
    /// is not loaded. Rules only (no set elements): cheap enough to poll.
    pub fn live_rules(&mut self) -> Result<Option<Vec<(String, Rule)>>> {
        if self.get_table()?.is_none() {
            return Ok(None);
        }
        self.dump_rules()
    }

    /// The table's comment (mode, log group), or None when egret is not loaded.
    pub fn table_comment(&mut self) -> Result<Option<String>> {
        self.get_table()
    }

    fn request(&mut self, msg: u16, attrs: impl FnOnce(&mut MsgBuilder)) -> Vec<u8> {
        let seq = self.next_seq();
        let mut b = MsgBuilder::default();
        b.begin(
            msg_type(msg),
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            NFPROTO_INET,
            0,
        );
        attrs(&mut b);
        b.end();
        b.buf
    }
}

/// Packets egret's own log rules counted.
pub fn logged_total(rules: &[(String, Rule)]) -> u64 {
    rules
        .iter()
        .filter(|(_, r)| {
            r.log.as_ref().is_some_and(|l| {
                l.prefix.starts_with(PREFIX_BLOCKED)
                    || l.prefix.starts_with(PREFIX_WOULD_BLOCK)
                    || l.prefix.starts_with(PREFIX_ALLOWED_NEW)
            })
        })
        .filter_map(|(_, r)| r.counter.map(|c| c.packets))
        .sum()
}

/// Packets the novelty chains' overflow rules counted: new flows accepted
/// while their rule's set was full (not reported as first seen).
pub fn novelty_overflow(rules: &[(String, Rule)]) -> u64 {
    rules
        .iter()
        .filter(|(chain, r)| {
            chain.starts_with(NOVELTY_PREFIX)
                && r.comment
                    .as_deref()
                    .is_some_and(|c| c.ends_with(NOVELTY_OVERFLOW))
        })
        .filter_map(|(_, r)| r.counter.map(|c| c.packets))
        .sum()
}

fn msg_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// One nfnetlink batch (a transaction) under construction.
pub struct Batch {
    b: MsgBuilder,
    seq: u32,
    set_ids: HashMap<String, u32>,
    /// (first seq, what) for error messages that say which part failed.
    labels: Vec<(u32, String)>,
}

impl Batch {
    pub fn new(seq: u32) -> Batch {
        let mut b = MsgBuilder::with_capacity(1 << 16);
        b.begin(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            seq,
            AF_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
        );
        b.end();
        Batch {
            b,
            seq,
            set_ids: HashMap::new(),
            labels: Vec::new(),
        }
    }

    fn msg(&mut self, msg: u16, flags: u16) {
        self.seq = self.seq.wrapping_add(1);
        self.b.begin(
            msg_type(msg),
            NLM_F_REQUEST | flags,
            self.seq,
            NFPROTO_INET,
            0,
        );
    }

    /// Ends the batch with an ack request on its last message; returns that seq.
    fn finish(&mut self) -> u32 {
        // Ask for one ack, on the last message: errors come back regardless.
        let last = self.seq;
        let mut at = 0;
        let mut last_start = 0;
        for m in messages(&self.b.buf) {
            if m.seq == last {
                last_start = at;
            }
            at += (m.payload.len() + 16 + 3) & !3;
        }
        let flags = u16::from_ne_bytes([self.b.buf[last_start + 6], self.b.buf[last_start + 7]])
            | NLM_F_ACK;
        self.b.buf[last_start + 6..last_start + 8].copy_from_slice(&flags.to_ne_bytes());
        self.seq = self.seq.wrapping_add(1);
        self.b.begin(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            self.seq,
            AF_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
        );
        self.b.end();
        last
    }

    pub fn replace_table(&mut self, rs: &Ruleset) {
        self.ensure_and_delete_table();
        self.new_table(&rs.comment);
        let new_elements = |this: &mut Batch, set: &Set, id: u32| {
            this.elements(
                MSG_NEWSETELEM,
                NLM_F_CREATE | NLM_F_EXCL,
                set,
                Some(id),
                &set.elements,
                &[],
            )
        };
        for (i, set) in rs.sets.iter().enumerate() {
            let id = i as u32 + 1;
            self.set_ids.insert(set.name.clone(), id);
            self.new_set(set, id);
            if !set.verdict_map {
                new_elements(self, set, id);
            }
        }
        for chain in &rs.chains {
            self.new_chain(chain);
        }
        // A verdict map's elements name chains, which must exist first.
        for (i, set) in rs.sets.iter().enumerate() {
            if set.verdict_map {
                new_elements(self, set, i as u32 + 1);
            }
        }
        for chain in &rs.chains {
            for rule in &chain.rules {
                self.new_rule(&chain.name, rule);
            }
        }
    }

    fn label(&mut self, what: String) {
        self.labels.push((self.seq.wrapping_add(1), what));
    }
}

fn data_attr(b: &mut MsgBuilder, kind: u16, data: &[u8]) {
    let n = b.nest(kind);
    b.attr(DATA_VALUE, data);
    b.nest_end(n);
}

/// nft's userdata TLV: type, length, value (strings NUL-terminated).
fn udata(kind: u8, value: &[u8], string: bool) -> Vec<u8> {
    let mut v = value[..value.len().min(250)].to_vec();
    if string {
        v.push(0);
    }
    let mut out = vec![kind, v.len() as u8];
    out.extend_from_slice(&v);
    out
}

fn udata_comment(buf: &[u8]) -> Option<String> {
    let mut rest = buf;
    while rest.len() >= 2 {
        let (kind, len) = (rest[0], rest[1] as usize);
        let value = rest.get(2..2 + len)?;
        if kind == UDATA_COMMENT {
            return Some(c_str(value));
        }
        rest = &rest[2 + len..];
    }
    None
}
