//! The only module that speaks nf_tables: [`Ruleset`] → one atomic netlink
//! transaction, and the live `inet egret` table → [`Ruleset`] (with counters).

use std::collections::HashMap;
use std::io;

use crate::ruleset::*;

use super::netlink::*;

const NETLINK_NETFILTER: isize = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFPROTO_INET: u8 = 1;
const AF_UNSPEC: u8 = 0;

const MSG_NEWTABLE: u16 = 0;
const MSG_GETTABLE: u16 = 1;
const MSG_DELTABLE: u16 = 2;
const MSG_NEWCHAIN: u16 = 3;
const MSG_GETCHAIN: u16 = 4;
const MSG_NEWRULE: u16 = 6;
const MSG_GETRULE: u16 = 7;
const MSG_NEWSET: u16 = 9;
const MSG_GETSET: u16 = 10;
const MSG_NEWSETELEM: u16 = 12;
const MSG_GETSETELEM: u16 = 13;
const MSG_DELSETELEM: u16 = 14;

// Attribute numbers from include/uapi/linux/netfilter/nf_tables.h.
const TABLE_NAME: u16 = 1;
const TABLE_USERDATA: u16 = 6;
const CHAIN_TABLE: u16 = 1;
const CHAIN_NAME: u16 = 3;
const CHAIN_HOOK: u16 = 4;
const CHAIN_POLICY: u16 = 5;
const CHAIN_TYPE: u16 = 7;
const HOOK_HOOKNUM: u16 = 1;
const HOOK_PRIORITY: u16 = 2;
const RULE_TABLE: u16 = 1;
const RULE_CHAIN: u16 = 2;
const RULE_EXPRESSIONS: u16 = 4;
const RULE_USERDATA: u16 = 7;
const LIST_ELEM: u16 = 1;
const EXPR_NAME: u16 = 1;
const EXPR_DATA: u16 = 2;
const SET_TABLE: u16 = 1;
const SET_NAME: u16 = 2;
const SET_FLAGS: u16 = 3;
const SET_KEY_TYPE: u16 = 4;
const SET_KEY_LEN: u16 = 5;
const SET_DESC: u16 = 9;
const SET_ID: u16 = 10;
const SET_USERDATA: u16 = 13;
const SET_DESC_SIZE: u16 = 1;
const SET_DESC_CONCAT: u16 = 2;
const SET_FIELD_LEN: u16 = 1;
const SET_F_INTERVAL: u32 = 0x4;
const SET_F_TIMEOUT: u32 = 0x10;
const SET_F_CONCAT: u32 = 0x80;
const ELEM_LIST_TABLE: u16 = 1;
const ELEM_LIST_SET: u16 = 2;
const ELEM_LIST_ELEMENTS: u16 = 3;
const ELEM_LIST_SET_ID: u16 = 4;
const ELEM_KEY: u16 = 1;
const ELEM_FLAGS: u16 = 3;
const ELEM_TIMEOUT: u16 = 4;
const ELEM_EXPIRATION: u16 = 5;
const ELEM_KEY_END: u16 = 10;
const ELEM_F_INTERVAL_END: u32 = 1;
const DATA_VALUE: u16 = 1;
const DATA_VERDICT: u16 = 2;
const VERDICT_CODE: u16 = 1;
const VERDICT_CHAIN: u16 = 2;
/// NFT_JUMP, (u32)-3.
const NFT_JUMP: u32 = 0xffff_fffd;

// Expression attributes.
const META_DREG: u16 = 1;
const META_KEY: u16 = 2;
const CMP_SREG: u16 = 1;
const CMP_OP: u16 = 2;
const CMP_DATA: u16 = 3;
const PAYLOAD_DREG: u16 = 1;
const PAYLOAD_BASE: u16 = 2;
const PAYLOAD_OFFSET: u16 = 3;
const PAYLOAD_LEN: u16 = 4;
const LOOKUP_SET: u16 = 1;
const LOOKUP_SREG: u16 = 2;
const LOOKUP_SET_ID: u16 = 4;
const CT_DREG: u16 = 1;
const CT_KEY: u16 = 2;
const BITWISE_SREG: u16 = 1;
const BITWISE_DREG: u16 = 2;
const BITWISE_LEN: u16 = 3;
const BITWISE_MASK: u16 = 4;
const BITWISE_XOR: u16 = 5;
const COUNTER_BYTES: u16 = 1;
const COUNTER_PACKETS: u16 = 2;
const LOG_GROUP: u16 = 1;
const LOG_PREFIX: u16 = 2;
const IMMEDIATE_DREG: u16 = 1;
const IMMEDIATE_DATA: u16 = 2;
const REJECT_TYPE: u16 = 1;
const REJECT_ICMP_CODE: u16 = 2;
const REDIR_REG_PROTO_MIN: u16 = 1;
const SOCKET_KEY: u16 = 1;
const SOCKET_DREG: u16 = 2;
const SOCKET_LEVEL: u16 = 3;

const META_MARK: u32 = 3;
const META_IIFNAME: u32 = 6;
const META_OIFNAME: u32 = 7;
const META_SKUID: u32 = 10;
const META_SKGID: u32 = 11;
const META_NFPROTO: u32 = 15;
const META_L4PROTO: u32 = 16;
const CT_STATE: u32 = 0;
const SOCKET_CGROUPV2: u32 = 3;
const PAYLOAD_NETWORK: u32 = 1;
const PAYLOAD_TRANSPORT: u32 = 2;
const CMP_EQ: u32 = 0;
const CMP_NEQ: u32 = 1;
const REG_VERDICT: u32 = 0;
const REG_1: u32 = 1;
const REG32_00: u32 = 8;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const REJECT_TCP_RST: u32 = 1;
const REJECT_ICMPX: u32 = 2;
const REJECT_ICMPX_ADMIN_PROHIBITED: u8 = 3;
const NF_INET_LOCAL_OUT: u32 = 3;
const NF_INET_FORWARD: u32 = 2;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// nft's userdata TLV types for comments (table, rule) and a set's key byte order.
const UDATA_COMMENT: u8 = 0;
const UDATA_SET_KEYBYTEORDER: u8 = 0;

/// Largest payload of one NEWSETELEM message: its element list is a single
/// attribute, whose length field is 16 bits.
const MAX_ELEMENTS_BYTES: usize = 60_000;

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

    /// Adds elements with their timeouts (milliseconds) to live timeout sets,
    /// all in one transaction. Re-adding an element resets its timeout.
    pub fn add_timed_elements(&mut self, items: &[(&Set, Vec<(Element, u64)>)]) -> Result<()> {
        let mut batch = Batch::new(self.next_seq());
        for (set, elements) in items {
            batch.timed_elements(set, elements);
        }
        self.commit(batch)
    }

    /// The elements of a live timeout set with the milliseconds each has left.
    pub fn timed_elements(&mut self, set: &Set) -> Result<Vec<(Element, u64)>> {
        let req = self.request(MSG_GETSETELEM, |b| {
            b.attr_str(ELEM_LIST_TABLE, TABLE);
            b.attr_str(ELEM_LIST_SET, &set.name);
        });
        let mut out = Vec::new();
        match self.sock.dump(&req, |_, p| {
            decode_timed_elements(p.get(4..).unwrap_or_default(), set, &mut out)
        })? {
            Ok(()) => Ok(out),
            Err(e) if e.errno == libc::ENOENT => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    fn live_sets(&mut self) -> Result<Vec<Set>> {
        let req = self.request(MSG_GETSET, |b| b.attr_str(SET_TABLE, TABLE));
        let mut raw = Vec::new();
        self.sock.dump(&req, |_, p| raw.push(p.to_vec()))??;
        raw.iter()
            .map(|p| decode_set(p.get(4..).unwrap_or_default()))
            .collect()
    }

    /// The elements of live static set `name`; empty when it does not exist.
    pub fn set_elements(&mut self, name: &str) -> Result<Vec<Element>> {
        match self.live_sets()?.into_iter().find(|s| s.name == name) {
            Some(set) => self.dump_elements(&set),
            None => Ok(Vec::new()),
        }
    }

    /// The elements of live set `set`, as the kernel dumps them.
    fn dump_elements(&mut self, set: &Set) -> Result<Vec<Element>> {
        let req = self.request(MSG_GETSETELEM, |b| {
            b.attr_str(ELEM_LIST_TABLE, TABLE);
            b.attr_str(ELEM_LIST_SET, &set.name);
        });
        let mut points = Vec::new();
        self.sock.dump(&req, |_, p| {
            decode_elements(p.get(4..).unwrap_or_default(), set, &mut points)
        })??;
        Ok(assemble_elements(set, points))
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
        let req = self.request(MSG_GETSET, |b| b.attr_str(SET_TABLE, TABLE));
        let mut raw_sets = Vec::new();
        self.sock.dump(&req, |_, p| raw_sets.push(p.to_vec()))??;
        for p in raw_sets {
            let mut set = decode_set(p.get(4..).unwrap_or_default())?;
            if set.timeout {
                // Run-time state (the DNS guard's addresses), not policy.
                sets.push(set);
                continue;
            }
            set.elements = self.dump_elements(&set)?;
            sets.push(set);
        }
        sets.sort_by(|a, b| a.name.cmp(&b.name));

        let mut chains = Vec::new();
        let req = self.request(MSG_GETCHAIN, |b| b.attr_str(CHAIN_TABLE, TABLE));
        self.sock.dump(&req, |_, p| {
            chains.push(decode_chain(p.get(4..).unwrap_or_default()))
        })??;
        let mut rules: Vec<(String, Vec<u8>)> = Vec::new();
        let req = self.request(MSG_GETRULE, |b| b.attr_str(RULE_TABLE, TABLE));
        self.sock.dump(&req, |_, p| {
            let chain = attrs(p.get(4..).unwrap_or_default())
                .find(|(k, _)| *k == RULE_CHAIN)
                .map(|(_, v)| c_str(v))
                .unwrap_or_default();
            rules.push((chain, p.get(4..).unwrap_or_default().to_vec()));
        })??;
        for (chain_name, payload) in rules {
            let rule = decode_rule(&payload)?;
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
        let req = self.request(MSG_GETRULE, |b| b.attr_str(RULE_TABLE, TABLE));
        let mut payloads = Vec::new();
        match self.sock.dump(&req, |_, p| {
            payloads.push(p.get(4..).unwrap_or_default().to_vec())
        })? {
            Ok(()) => {}
            Err(e) if e.errno == libc::ENOENT => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let mut rules = Vec::with_capacity(payloads.len());
        for p in payloads {
            let chain = attrs(&p)
                .find(|(k, _)| *k == RULE_CHAIN)
                .map(|(_, v)| c_str(v))
                .unwrap_or_default();
            rules.push((chain, decode_rule(&p)?));
        }
        Ok(Some(rules))
    }

    /// The table's comment (mode, log group), or None when egret is not loaded.
    pub fn table_comment(&mut self) -> Result<Option<String>> {
        self.get_table()
    }

    fn get_table(&mut self) -> Result<Option<String>> {
        let seq = self.next_seq();
        let mut b = MsgBuilder::default();
        b.begin(msg_type(MSG_GETTABLE), NLM_F_REQUEST, seq, NFPROTO_INET, 0);
        b.attr_str(TABLE_NAME, TABLE);
        b.end();
        let mut comment = None;
        match self.sock.dump(&b.buf, |_, p| {
            let ud = attrs(p.get(4..).unwrap_or_default())
                .find(|(k, _)| *k == TABLE_USERDATA)
                .map(|(_, v)| v.to_vec());
            comment = Some(ud.and_then(|u| udata_comment(&u)).unwrap_or_default());
        })? {
            Ok(()) => Ok(comment),
            Err(e) if e.errno == libc::ENOENT => Ok(None),
            Err(e) => Err(e.into()),
        }
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
            r.log
                .as_ref()
                .is_some_and(|l| l.prefix.starts_with("egret:"))
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

    fn ensure_and_delete_table(&mut self) {
        // "add" succeeds whether or not the table exists, so the delete that
        // follows never fails: no separate existence check, no race.
        self.msg(MSG_NEWTABLE, NLM_F_CREATE);
        self.b.attr_str(TABLE_NAME, TABLE);
        self.b.end();
        self.msg(MSG_DELTABLE, 0);
        self.b.attr_str(TABLE_NAME, TABLE);
        self.b.end();
    }

    pub fn replace_table(&mut self, rs: &Ruleset) {
        self.ensure_and_delete_table();
        self.msg(MSG_NEWTABLE, NLM_F_CREATE);
        self.b.attr_str(TABLE_NAME, TABLE);
        self.b.attr(
            TABLE_USERDATA,
            &udata(UDATA_COMMENT, rs.comment.as_bytes(), true),
        );
        self.b.end();
        for (i, set) in rs.sets.iter().enumerate() {
            let id = i as u32 + 1;
            self.set_ids.insert(set.name.clone(), id);
            self.new_set(set, id);
            self.elements(
                MSG_NEWSETELEM,
                NLM_F_CREATE | NLM_F_EXCL,
                set,
                Some(id),
                &set.elements,
                &[],
            );
        }
        for chain in &rs.chains {
            self.new_chain(chain);
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

    fn new_set(&mut self, set: &Set, id: u32) {
        self.label(format!("set {}", set.name));
        self.msg(MSG_NEWSET, NLM_F_CREATE | NLM_F_EXCL);
        self.b.attr_str(SET_TABLE, TABLE);
        self.b.attr_str(SET_NAME, &set.name);
        let concat = set.key.len() > 1;
        let mut flags = 0;
        if set.timeout {
            flags |= SET_F_TIMEOUT;
        }
        if set.interval {
            flags |= SET_F_INTERVAL;
            if concat {
                flags |= SET_F_CONCAT;
            }
        }
        self.b.attr_u32(SET_FLAGS, flags);
        let key_type = set.key.iter().fold(0u32, |t, f| (t << 6) | f.nft_type());
        self.b.attr_u32(SET_KEY_TYPE, key_type);
        self.b.attr_u32(SET_KEY_LEN, key_len(&set.key) as u32);
        self.b.attr_u32(SET_ID, id);
        if set.size.is_some() || (concat && set.interval) {
            let desc = self.b.nest(SET_DESC);
            if let Some(size) = set.size {
                self.b.attr_u32(SET_DESC_SIZE, size);
            }
            if concat && set.interval {
                let list = self.b.nest(SET_DESC_CONCAT);
                for f in &set.key {
                    let e = self.b.nest(LIST_ELEM);
                    self.b.attr_u32(SET_FIELD_LEN, f.byte_len() as u32);
                    self.b.nest_end(e);
                }
                self.b.nest_end(list);
            }
            self.b.nest_end(desc);
        }
        if !concat {
            let order: u32 = if set.key[0].big_endian() { 2 } else { 1 };
            self.b.attr(
                SET_USERDATA,
                &udata(UDATA_SET_KEYBYTEORDER, &order.to_ne_bytes(), false),
            );
        }
        self.b.end();
    }

    fn flush_set(&mut self, name: &str) {
        self.msg(MSG_DELSETELEM, 0);
        self.b.attr_str(ELEM_LIST_TABLE, TABLE);
        self.b.attr_str(ELEM_LIST_SET, name);
        self.b.end();
    }

    fn timed_elements(&mut self, set: &Set, items: &[(Element, u64)]) {
        let (elements, timeouts): (Vec<Element>, Vec<u64>) = items.iter().cloned().unzip();
        let id = self.set_ids.get(&set.name).copied();
        self.elements(MSG_NEWSETELEM, NLM_F_CREATE, set, id, &elements, &timeouts);
    }

    /// Element messages for `elements`, split so each element list fits its
    /// 16-bit attribute length. `timeouts_ms`, when not empty, holds one
    /// timeout per element.
    fn elements(
        &mut self,
        msg: u16,
        flags: u16,
        set: &Set,
        set_id: Option<u32>,
        elements: &[Element],
        timeouts_ms: &[u64],
    ) {
        let single_interval = set.interval && set.key.len() == 1;
        let max = set.key[0].max();
        let mut list: Option<usize> = None;
        let mut emit = |this: &mut Batch,
                        key: &[u8],
                        key_end: Option<&[u8]>,
                        interval_end: bool,
                        timeout_ms: Option<u64>| {
            if list.is_some() && this.b.message_len() > MAX_ELEMENTS_BYTES {
                if let Some(l) = list.take() {
                    this.b.nest_end(l);
                    this.b.end();
                }
            }
            if list.is_none() {
                this.msg(msg, flags);
                this.b.attr_str(ELEM_LIST_TABLE, TABLE);
                this.b.attr_str(ELEM_LIST_SET, &set.name);
                if let Some(id) = set_id {
                    this.b.attr_u32(ELEM_LIST_SET_ID, id);
                }
                list = Some(this.b.nest(ELEM_LIST_ELEMENTS));
            }
            let e = this.b.nest(LIST_ELEM);
            data_attr(&mut this.b, ELEM_KEY, key);
            if let Some(end) = key_end {
                data_attr(&mut this.b, ELEM_KEY_END, end);
            }
            if interval_end {
                this.b.attr_u32(ELEM_FLAGS, ELEM_F_INTERVAL_END);
            }
            if let (Some(t), false) = (timeout_ms, interval_end) {
                this.b.attr_u64(ELEM_TIMEOUT, t);
            }
            this.b.nest_end(e);
        };
        self.label(format!("elements of set {}", set.name));
        if single_interval {
            // rbtree sets take a start element and an end marker at end+1; like
            // nft, mark the gap below the first range with an end marker at 0.
            if elements.first().is_some_and(|e| e.key[0] != 0)
                && msg == MSG_NEWSETELEM
                && set_id.is_some()
            {
                emit(self, &encode_key(&set.key, &[0]), None, true, None);
            }
            for (i, el) in elements.iter().enumerate() {
                let start = el.key[0];
                let end = el.end.as_ref().map(|e| e[0]).unwrap_or(start);
                let timeout = timeouts_ms.get(i).copied();
                emit(self, &encode_key(&set.key, &[start]), None, false, timeout);
                if end < max {
                    emit(self, &encode_key(&set.key, &[end + 1]), None, true, None);
                }
            }
        } else {
            for (i, el) in elements.iter().enumerate() {
                let key = encode_key(&set.key, &el.key);
                let end = if set.interval {
                    Some(encode_key(&set.key, el.end.as_deref().unwrap_or(&el.key)))
                } else {
                    None
                };
                emit(
                    self,
                    &key,
                    end.as_deref(),
                    false,
                    timeouts_ms.get(i).copied(),
                );
            }
        }
        if let Some(l) = list {
            self.b.nest_end(l);
            self.b.end();
        }
    }

    fn new_chain(&mut self, chain: &Chain) {
        self.label(format!("chain {}", chain.name));
        self.msg(MSG_NEWCHAIN, NLM_F_CREATE);
        self.b.attr_str(CHAIN_TABLE, TABLE);
        self.b.attr_str(CHAIN_NAME, &chain.name);
        if let Some(base) = &chain.base {
            let hook = self.b.nest(CHAIN_HOOK);
            self.b.attr_u32(
                HOOK_HOOKNUM,
                if base.hook == Hook::Output {
                    NF_INET_LOCAL_OUT
                } else {
                    NF_INET_FORWARD
                },
            );
            self.b.attr_u32(HOOK_PRIORITY, base.priority as u32);
            self.b.nest_end(hook);
            self.b
                .attr_u32(CHAIN_POLICY, if base.accept { NF_ACCEPT } else { NF_DROP });
            self.b
                .attr_str(CHAIN_TYPE, if base.nat { "nat" } else { "filter" });
        }
        self.b.end();
    }

    fn new_rule(&mut self, chain: &str, rule: &Rule) {
        self.label(format!(
            "rule {:?}",
            crate::ruleset::render_rule(rule, false)
        ));
        self.msg(MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND);
        self.b.attr_str(RULE_TABLE, TABLE);
        self.b.attr_str(RULE_CHAIN, chain);
        let list = self.b.nest(RULE_EXPRESSIONS);
        for m in &rule.matches {
            self.encode_match(m);
        }
        if let Some(c) = &rule.counter {
            self.expr("counter", |b| {
                b.attr_u64(COUNTER_BYTES, c.bytes);
                b.attr_u64(COUNTER_PACKETS, c.packets);
            });
        }
        if let Some(log) = &rule.log {
            self.expr("log", |b| {
                b.attr(LOG_GROUP, &log.group.to_be_bytes());
                b.attr_str(LOG_PREFIX, &log.prefix);
            });
        }
        match &rule.verdict {
            Some(Verdict::Accept) => self.verdict(NF_ACCEPT),
            Some(Verdict::Drop) => self.verdict(NF_DROP),
            Some(Verdict::RejectTcpReset) => self.expr("reject", |b| {
                b.attr_u32(REJECT_TYPE, REJECT_TCP_RST);
                b.attr(REJECT_ICMP_CODE, &[0]);
            }),
            Some(Verdict::RejectAdminProhibited) => self.expr("reject", |b| {
                b.attr_u32(REJECT_TYPE, REJECT_ICMPX);
                b.attr(REJECT_ICMP_CODE, &[REJECT_ICMPX_ADMIN_PROHIBITED]);
            }),
            Some(Verdict::Jump(chain)) => self.expr("immediate", |b| {
                b.attr_u32(IMMEDIATE_DREG, REG_VERDICT);
                let data = b.nest(IMMEDIATE_DATA);
                let v = b.nest(DATA_VERDICT);
                b.attr_u32(VERDICT_CODE, NFT_JUMP);
                b.attr_str(VERDICT_CHAIN, chain);
                b.nest_end(v);
                b.nest_end(data);
            }),
            Some(Verdict::Redirect(port)) => {
                self.expr("immediate", |b| {
                    b.attr_u32(IMMEDIATE_DREG, REG_1);
                    data_attr(b, IMMEDIATE_DATA, &port.to_be_bytes());
                });
                self.expr("redir", |b| b.attr_u32(REDIR_REG_PROTO_MIN, REG_1));
            }
            None => {}
        }
        self.b.nest_end(list);
        if let Some(c) = &rule.comment {
            self.b
                .attr(RULE_USERDATA, &udata(UDATA_COMMENT, c.as_bytes(), true));
        }
        self.b.end();
    }

    fn expr(&mut self, name: &str, data: impl FnOnce(&mut MsgBuilder)) {
        let e = self.b.nest(LIST_ELEM);
        self.b.attr_str(EXPR_NAME, name);
        let d = self.b.nest(EXPR_DATA);
        data(&mut self.b);
        self.b.nest_end(d);
        self.b.nest_end(e);
    }

    fn verdict(&mut self, code: u32) {
        self.expr("immediate", |b| {
            b.attr_u32(IMMEDIATE_DREG, REG_VERDICT);
            let data = b.nest(IMMEDIATE_DATA);
            let v = b.nest(DATA_VERDICT);
            b.attr_u32(VERDICT_CODE, code);
            b.nest_end(v);
            b.nest_end(data);
        });
    }

    fn meta(&mut self, key: u32, dreg: u32) {
        self.expr("meta", |b| {
            b.attr_u32(META_KEY, key);
            b.attr_u32(META_DREG, dreg);
        });
    }

    fn cmp(&mut self, op: u32, data: &[u8]) {
        self.expr("cmp", |b| {
            b.attr_u32(CMP_SREG, REG_1);
            b.attr_u32(CMP_OP, op);
            data_attr(b, CMP_DATA, data);
        });
    }

    fn payload(&mut self, base: u32, offset: u32, len: u32, dreg: u32) {
        self.expr("payload", |b| {
            b.attr_u32(PAYLOAD_DREG, dreg);
            b.attr_u32(PAYLOAD_BASE, base);
            b.attr_u32(PAYLOAD_OFFSET, offset);
            b.attr_u32(PAYLOAD_LEN, len);
        });
    }

    fn lookup(&mut self, set: &str, sreg: u32) {
        let id = self.set_ids.get(set).copied();
        self.expr("lookup", |b| {
            b.attr_str(LOOKUP_SET, set);
            b.attr_u32(LOOKUP_SREG, sreg);
            if let Some(id) = id {
                b.attr_u32(LOOKUP_SET_ID, id);
            }
        });
    }

    fn encode_match(&mut self, m: &Match) {
        match m {
            Match::OifName(name) => {
                self.meta(META_OIFNAME, REG_1);
                self.cmp(CMP_EQ, &ifname_data(name));
            }
            Match::IifName(name) => {
                self.meta(META_IIFNAME, REG_1);
                self.cmp(CMP_EQ, &ifname_data(name));
            }
            Match::CtState(bits) => {
                self.expr("ct", |b| {
                    b.attr_u32(CT_KEY, CT_STATE);
                    b.attr_u32(CT_DREG, REG_1);
                });
                self.expr("bitwise", |b| {
                    b.attr_u32(BITWISE_SREG, REG_1);
                    b.attr_u32(BITWISE_DREG, REG_1);
                    b.attr_u32(BITWISE_LEN, 4);
                    data_attr(b, BITWISE_MASK, &bits.to_ne_bytes());
                    data_attr(b, BITWISE_XOR, &0u32.to_ne_bytes());
                });
                self.cmp(CMP_NEQ, &0u32.to_ne_bytes());
            }
            Match::NfProto(f) => {
                self.meta(META_NFPROTO, REG_1);
                self.cmp(
                    CMP_EQ,
                    &[if *f == Family::V4 {
                        NFPROTO_IPV4
                    } else {
                        NFPROTO_IPV6
                    }],
                );
            }
            Match::L4Proto(p) => {
                self.meta(META_L4PROTO, REG_1);
                self.cmp(CMP_EQ, &[*p]);
            }
            Match::Mark(mark) => {
                self.meta(META_MARK, REG_1);
                self.cmp(CMP_EQ, &mark.to_ne_bytes());
            }
            Match::L4ProtoIn(set) => {
                self.meta(META_L4PROTO, REG_1);
                self.lookup(set, REG_1);
            }
            Match::Daddr(f, set) => {
                let (offset, len) = daddr(*f);
                self.payload(PAYLOAD_NETWORK, offset, len, REG_1);
                self.lookup(set, REG_1);
            }
            Match::ProtoDport(set) => {
                self.meta(META_L4PROTO, REG32_00);
                self.payload(PAYLOAD_TRANSPORT, 2, 2, REG32_00 + 1);
                self.lookup(set, REG32_00);
            }
            Match::IcmpType(_, set) => {
                self.payload(PAYLOAD_TRANSPORT, 0, 1, REG_1);
                self.lookup(set, REG_1);
            }
            Match::SkUid(id) | Match::SkGid(id) => {
                self.meta(
                    if matches!(m, Match::SkUid(_)) {
                        META_SKUID
                    } else {
                        META_SKGID
                    },
                    REG_1,
                );
                match id {
                    IdMatch::Eq(v) => self.cmp(CMP_EQ, &v.to_ne_bytes()),
                    IdMatch::Set(set) => self.lookup(set, REG_1),
                }
            }
            Match::Cgroup { level, set } => {
                self.expr("socket", |b| {
                    b.attr_u32(SOCKET_KEY, SOCKET_CGROUPV2);
                    b.attr_u32(SOCKET_DREG, REG_1);
                    b.attr_u32(SOCKET_LEVEL, *level);
                });
                self.lookup(set, REG_1);
            }
            Match::Flow(f, set) => {
                let (saddr_off, len) = saddr(*f);
                let (daddr_off, _) = daddr(*f);
                let words = len / 4;
                self.meta(META_L4PROTO, REG32_00);
                self.payload(PAYLOAD_NETWORK, saddr_off, len, REG32_00 + 1);
                self.payload(PAYLOAD_TRANSPORT, 0, 2, REG32_00 + 1 + words);
                self.payload(PAYLOAD_NETWORK, daddr_off, len, REG32_00 + 2 + words);
                self.payload(PAYLOAD_TRANSPORT, 2, 2, REG32_00 + 2 + 2 * words);
                self.lookup(set, REG32_00);
            }
            Match::TcpFlagsZero(mask) => {
                self.payload(PAYLOAD_TRANSPORT, TCP_FLAGS_OFFSET, 1, REG_1);
                self.expr("bitwise", |b| {
                    b.attr_u32(BITWISE_SREG, REG_1);
                    b.attr_u32(BITWISE_DREG, REG_1);
                    b.attr_u32(BITWISE_LEN, 1);
                    data_attr(b, BITWISE_MASK, &[*mask]);
                    data_attr(b, BITWISE_XOR, &[0]);
                });
                self.cmp(CMP_EQ, &[0]);
            }
        }
    }
}

/// `tcp flags`: byte 13 of the TCP header.
const TCP_FLAGS_OFFSET: u32 = 13;

fn daddr(f: Family) -> (u32, u32) {
    match f {
        Family::V4 => (16, 4),
        Family::V6 => (24, 16),
    }
}

fn saddr(f: Family) -> (u32, u32) {
    match f {
        Family::V4 => (12, 4),
        Family::V6 => (8, 16),
    }
}

/// An interface name as nft compares it: the name NUL-padded to 16 bytes, or
/// for a `prefix*` pattern only the prefix (a shorter compare).
fn ifname_data(name: &str) -> Vec<u8> {
    match name.strip_suffix('*') {
        Some(prefix) => prefix.as_bytes()[..prefix.len().min(15)].to_vec(),
        None => {
            let mut data = vec![0u8; 16];
            let n = name.len().min(15);
            data[..n].copy_from_slice(&name.as_bytes()[..n]);
            data
        }
    }
}

/// The inverse of [`ifname_data`].
fn ifname_from(data: &[u8]) -> String {
    if data.len() == 16 {
        c_str(data)
    } else {
        format!("{}*", String::from_utf8_lossy(data))
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

/// Key length: single fields are their own length; concatenations pad each
/// field to a 32-bit register.
fn key_len(key: &[Field]) -> usize {
    match key {
        [one] => one.byte_len(),
        many => many.iter().map(|f| (f.byte_len() + 3) & !3).sum(),
    }
}

fn encode_value(out: &mut Vec<u8>, f: Field, v: u128) {
    let n = f.byte_len();
    if f.big_endian() {
        out.extend_from_slice(&v.to_be_bytes()[16 - n..]);
    } else {
        out.extend_from_slice(&v.to_le_bytes()[..n]);
        if cfg!(target_endian = "big") {
            let at = out.len() - n;
            out[at..].reverse();
        }
    }
}

fn decode_value(f: Field, bytes: &[u8]) -> u128 {
    let n = f.byte_len().min(bytes.len());
    let mut v = [0u8; 16];
    if f.big_endian() {
        v[16 - n..].copy_from_slice(&bytes[..n]);
        u128::from_be_bytes(v)
    } else {
        v[..n].copy_from_slice(&bytes[..n]);
        if cfg!(target_endian = "big") {
            v[..n].reverse();
        }
        u128::from_le_bytes(v)
    }
}

pub(crate) fn encode_key(key: &[Field], values: &[u128]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key_len(key));
    for (f, v) in key.iter().zip(values) {
        encode_value(&mut out, *f, *v);
        if key.len() > 1 {
            out.resize((out.len() + 3) & !3, 0);
        }
    }
    out
}

fn decode_key(key: &[Field], bytes: &[u8]) -> Vec<u128> {
    let mut at = 0;
    key.iter()
        .map(|f| {
            let v = decode_value(*f, bytes.get(at..).unwrap_or_default());
            at += if key.len() > 1 {
                (f.byte_len() + 3) & !3
            } else {
                f.byte_len()
            };
            v
        })
        .collect()
}

fn decode_set(payload: &[u8]) -> Result<Set> {
    let mut name = String::new();
    let (mut flags, mut key_type) = (0u32, 0u32);
    let mut field_lens = Vec::new();
    let mut size = None;
    for (k, v) in attrs(payload) {
        match k {
            SET_NAME => name = c_str(v),
            SET_FLAGS => flags = be_u32(v).unwrap_or(0),
            SET_KEY_TYPE => key_type = be_u32(v).unwrap_or(0),
            SET_DESC => {
                for (dk, dv) in attrs(v) {
                    if dk == SET_DESC_SIZE {
                        size = be_u32(dv);
                    }
                    if dk == SET_DESC_CONCAT {
                        for (_, elem) in attrs(dv) {
                            field_lens.extend(
                                attrs(elem)
                                    .filter(|(k, _)| *k == SET_FIELD_LEN)
                                    .filter_map(|(_, v)| be_u32(v)),
                            );
                        }
                    }
                }
            }
            _ => {}
        }
    }
    // Concatenated types pack one 6-bit datatype per field.
    let mut key = Vec::new();
    let mut t = key_type;
    loop {
        let field = Field::from_nft_type(t & 0x3f).ok_or_else(|| {
            NftError::Foreign(format!(
                "set {name} has a key type egret does not write ({key_type})"
            ))
        })?;
        key.push(field);
        t >>= 6;
        if t == 0 {
            break;
        }
    }
    key.reverse();
    if !field_lens.is_empty() && field_lens.len() != key.len() {
        return Err(NftError::Foreign(format!(
            "set {name} has an inconsistent key description"
        )));
    }
    Ok(Set {
        name,
        key,
        interval: flags & SET_F_INTERVAL != 0,
        timeout: flags & SET_F_TIMEOUT != 0,
        size,
        elements: Vec::new(),
    })
}

/// Elements of a timeout set with the milliseconds they have left.
fn decode_timed_elements(payload: &[u8], set: &Set, out: &mut Vec<(Element, u64)>) {
    for (k, v) in attrs(payload) {
        if k != ELEM_LIST_ELEMENTS {
            continue;
        }
        for (_, elem) in attrs(v) {
            let (mut key, mut left) = (None, None);
            for (ek, ev) in attrs(elem) {
                match ek {
                    ELEM_KEY => {
                        key = attrs(ev)
                            .find(|(k, _)| *k == DATA_VALUE)
                            .map(|(_, d)| decode_key(&set.key, d))
                    }
                    ELEM_EXPIRATION => left = be_u64(ev),
                    _ => {}
                }
            }
            // An element without expiration never expires: keep it a day at a time.
            if let Some(key) = key {
                out.push((Element::single(key), left.unwrap_or(86_400_000).max(1)));
            }
        }
    }
}

/// An element as dumped: key, optional key end, and whether it is an rbtree end marker.
type Point = (Vec<u128>, Option<Vec<u128>>, bool);

fn decode_elements(payload: &[u8], set: &Set, out: &mut Vec<Point>) {
    for (k, v) in attrs(payload) {
        if k != ELEM_LIST_ELEMENTS {
            continue;
        }
        for (_, elem) in attrs(v) {
            let (mut key, mut end, mut is_end) = (None, None, false);
            for (ek, ev) in attrs(elem) {
                let value = || {
                    attrs(ev)
                        .find(|(k, _)| *k == DATA_VALUE)
                        .map(|(_, d)| decode_key(&set.key, d))
                };
                match ek {
                    ELEM_KEY => key = value(),
                    ELEM_KEY_END => end = value(),
                    ELEM_FLAGS => is_end = be_u32(ev).unwrap_or(0) & ELEM_F_INTERVAL_END != 0,
                    _ => {}
                }
            }
            if let Some(key) = key {
                out.push((key, end, is_end));
            }
        }
    }
}

/// Turns dumped elements back into inclusive ranges. rbtree sets dump start
/// elements and end markers (at end + 1) in no useful order.
fn assemble_elements(set: &Set, mut points: Vec<Point>) -> Vec<Element> {
    if !(set.interval && set.key.len() == 1) {
        let mut out: Vec<Element> = points
            .into_iter()
            .map(|(key, end, _)| {
                let end = end
                    .filter(|e| *e != key)
                    .or_else(|| set.interval.then(|| key.clone()));
                Element { key, end }
            })
            .collect();
        out.sort();
        return out;
    }
    points.sort_by(|a, b| a.0.cmp(&b.0).then(b.2.cmp(&a.2)));
    let max = set.key[0].max();
    let mut out = Vec::new();
    let mut open: Option<u128> = None;
    for (key, _, is_end) in points {
        let v = key[0];
        match (is_end, open) {
            (false, None) => open = Some(v),
            (false, Some(_)) => {}
            (true, Some(start)) => {
                let end = v.saturating_sub(1);
                out.push(Element {
                    key: vec![start],
                    end: (end != start).then(|| vec![end]),
                });
                open = None;
            }
            (true, None) => {}
        }
    }
    if let Some(start) = open {
        out.push(Element {
            key: vec![start],
            end: (start != max).then(|| vec![max]),
        });
    }
    out
}

fn decode_chain(payload: &[u8]) -> Chain {
    let mut chain = Chain {
        name: String::new(),
        base: None,
        rules: Vec::new(),
    };
    let (mut hook, mut priority, mut policy) = (None, 0i32, NF_ACCEPT);
    let mut nat = false;
    for (k, v) in attrs(payload) {
        match k {
            CHAIN_NAME => chain.name = c_str(v),
            CHAIN_TYPE => nat = c_str(v) == "nat",
            CHAIN_HOOK => {
                for (hk, hv) in attrs(v) {
                    match hk {
                        HOOK_HOOKNUM => hook = be_u32(hv),
                        HOOK_PRIORITY => priority = be_u32(hv).unwrap_or(0) as i32,
                        _ => {}
                    }
                }
            }
            CHAIN_POLICY => policy = be_u32(v).unwrap_or(NF_ACCEPT),
            _ => {}
        }
    }
    if let Some(h) = hook {
        let hook = if h == NF_INET_FORWARD {
            Hook::Forward
        } else {
            Hook::Output
        };
        chain.base = Some(BaseChain {
            hook,
            nat,
            priority,
            accept: policy == NF_ACCEPT,
        });
    }
    chain
}

/// One expression as the kernel dumps it: its name and attributes.
struct Expr<'a> {
    name: String,
    data: Vec<(u16, &'a [u8])>,
}

impl Expr<'_> {
    fn u32(&self, k: u16) -> Option<u32> {
        self.data
            .iter()
            .find(|(a, _)| *a == k)
            .and_then(|(_, v)| be_u32(v))
    }
    fn raw(&self, k: u16) -> Option<&[u8]> {
        self.data.iter().find(|(a, _)| *a == k).map(|(_, v)| *v)
    }
    fn data(&self, k: u16) -> Option<Vec<u8>> {
        self.raw(k).and_then(|v| {
            attrs(v)
                .find(|(a, _)| *a == DATA_VALUE)
                .map(|(_, d)| d.to_vec())
        })
    }
    fn string(&self, k: u16) -> Option<String> {
        self.raw(k).map(c_str)
    }
    fn is(&self, name: &str) -> bool {
        self.name == name
    }
}

fn decode_rule(payload: &[u8]) -> Result<Rule> {
    let mut exprs = Vec::new();
    let mut comment = None;
    for (k, v) in attrs(payload) {
        match k {
            RULE_EXPRESSIONS => {
                for (_, elem) in attrs(v) {
                    let mut name = String::new();
                    let mut data = Vec::new();
                    for (ek, ev) in attrs(elem) {
                        match ek {
                            EXPR_NAME => name = c_str(ev),
                            EXPR_DATA => data = attrs(ev).collect(),
                            _ => {}
                        }
                    }
                    exprs.push(Expr { name, data });
                }
            }
            RULE_USERDATA => comment = udata_comment(v),
            _ => {}
        }
    }
    let foreign = |what: &str| {
        NftError::Foreign(format!(
            "a rule{} has {what}",
            comment
                .as_ref()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default()
        ))
    };
    let mut rule = Rule {
        matches: Vec::new(),
        counter: None,
        log: None,
        verdict: None,
        comment: comment.clone(),
    };
    let mut family = None;
    let mut i = 0;
    let at = |i: usize| exprs.get(i);
    while let Some(e) = at(i) {
        let next = at(i + 1);
        let lookup_set = |n: Option<&Expr>| {
            n.filter(|n| n.is("lookup"))
                .and_then(|n| n.string(LOOKUP_SET))
        };
        let cmp_data = |n: Option<&Expr>, op: u32| {
            n.filter(|n| n.is("cmp") && n.u32(CMP_OP) == Some(op))
                .and_then(|n| n.data(CMP_DATA))
        };
        let (m, used) = match e.name.as_str() {
            "meta" => {
                let key = e.u32(META_KEY).unwrap_or(u32::MAX);
                let dreg = e.u32(META_DREG).unwrap_or(0);
                match (key, dreg) {
                    (META_OIFNAME, REG_1) => match cmp_data(next, CMP_EQ) {
                        Some(d) => (Match::OifName(ifname_from(&d)), 2),
                        None => return Err(foreign("an oifname match egret does not write")),
                    },
                    (META_IIFNAME, REG_1) => match cmp_data(next, CMP_EQ) {
                        Some(d) => (Match::IifName(ifname_from(&d)), 2),
                        None => return Err(foreign("an iifname match egret does not write")),
                    },
                    (META_NFPROTO, REG_1) => match cmp_data(next, CMP_EQ).as_deref() {
                        Some([NFPROTO_IPV4]) => (Match::NfProto(Family::V4), 2),
                        Some([NFPROTO_IPV6]) => (Match::NfProto(Family::V6), 2),
                        _ => return Err(foreign("an nfproto match egret does not write")),
                    },
                    // The kernel dumps NFT_REG32_00 as NFT_REG_1 (the same register),
                    // so a concatenation is told apart by the payload load that follows.
                    (META_L4PROTO, REG_1 | REG32_00) if next.is_some_and(|n| n.is("payload")) => {
                        let p1 = next.filter(|n| n.is("payload"));
                        match p1.and_then(|p| p.u32(PAYLOAD_BASE)) {
                            Some(PAYLOAD_TRANSPORT) => match lookup_set(at(i + 2)) {
                                Some(set) => (Match::ProtoDport(set), 3),
                                None => return Err(foreign("a port match egret does not write")),
                            },
                            Some(PAYLOAD_NETWORK) => {
                                let f = if p1.and_then(|p| p.u32(PAYLOAD_LEN)) == Some(16) {
                                    Family::V6
                                } else {
                                    Family::V4
                                };
                                match lookup_set(at(i + 5)) {
                                    Some(set) => (Match::Flow(f, set), 6),
                                    None => {
                                        return Err(foreign("a flow match egret does not write"))
                                    }
                                }
                            }
                            _ => {
                                return Err(foreign(
                                    "an l4proto concatenation egret does not write",
                                ))
                            }
                        }
                    }
                    (META_L4PROTO, REG_1) => {
                        match (cmp_data(next, CMP_EQ).as_deref(), lookup_set(next)) {
                            (Some([p]), _) => (Match::L4Proto(*p), 2),
                            (_, Some(set)) => (Match::L4ProtoIn(set), 2),
                            _ => return Err(foreign("an l4proto match egret does not write")),
                        }
                    }
                    (META_MARK, REG_1) => match cmp_data(next, CMP_EQ) {
                        Some(d) if d.len() == 4 => {
                            (Match::Mark(u32::from_ne_bytes([d[0], d[1], d[2], d[3]])), 2)
                        }
                        _ => return Err(foreign("a mark match egret does not write")),
                    },
                    (META_SKUID | META_SKGID, REG_1) => {
                        let id = match (cmp_data(next, CMP_EQ), lookup_set(next)) {
                            (Some(d), _) if d.len() == 4 => {
                                IdMatch::Eq(u32::from_ne_bytes([d[0], d[1], d[2], d[3]]))
                            }
                            (_, Some(set)) => IdMatch::Set(set),
                            _ => return Err(foreign("a user or group match egret does not write")),
                        };
                        (
                            if key == META_SKUID {
                                Match::SkUid(id)
                            } else {
                                Match::SkGid(id)
                            },
                            2,
                        )
                    }
                    _ => {
                        return Err(foreign(&format!(
                            "meta key {key}, which egret does not write"
                        )))
                    }
                }
            }
            "ct" => {
                let mask = next
                    .filter(|n| n.is("bitwise"))
                    .and_then(|n| n.data(BITWISE_MASK));
                match (e.u32(CT_KEY), mask, cmp_data(at(i + 2), CMP_NEQ)) {
                    (Some(CT_STATE), Some(mask), Some(_)) if mask.len() == 4 => (
                        Match::CtState(u32::from_ne_bytes([mask[0], mask[1], mask[2], mask[3]])),
                        3,
                    ),
                    _ => return Err(foreign("a ct match egret does not write")),
                }
            }
            "payload"
                if (
                    e.u32(PAYLOAD_BASE),
                    e.u32(PAYLOAD_OFFSET),
                    e.u32(PAYLOAD_LEN),
                ) == (Some(PAYLOAD_TRANSPORT), Some(TCP_FLAGS_OFFSET), Some(1))
                    && next.is_some_and(|n| n.is("bitwise")) =>
            {
                let bitwise = next.filter(|n| {
                    n.data(BITWISE_XOR).as_deref() == Some(&[0][..])
                        && n.u32(BITWISE_LEN) == Some(1)
                });
                match (
                    bitwise.and_then(|n| n.data(BITWISE_MASK)).as_deref(),
                    cmp_data(at(i + 2), CMP_EQ).as_deref(),
                ) {
                    (Some(&[mask]), Some(&[0])) => (Match::TcpFlagsZero(mask), 3),
                    _ => return Err(foreign("a tcp flags match egret does not write")),
                }
            }
            "payload" => {
                let (base, offset, len) = (
                    e.u32(PAYLOAD_BASE),
                    e.u32(PAYLOAD_OFFSET),
                    e.u32(PAYLOAD_LEN),
                );
                let set = lookup_set(next)
                    .ok_or_else(|| foreign("a payload match egret does not write"))?;
                match (base, offset, len) {
                    (Some(PAYLOAD_NETWORK), Some(16), Some(4)) => {
                        (Match::Daddr(Family::V4, set), 2)
                    }
                    (Some(PAYLOAD_NETWORK), Some(24), Some(16)) => {
                        (Match::Daddr(Family::V6, set), 2)
                    }
                    (Some(PAYLOAD_TRANSPORT), Some(0), Some(1)) => {
                        (Match::IcmpType(family.unwrap_or(Family::V4), set), 2)
                    }
                    _ => return Err(foreign("a payload match egret does not write")),
                }
            }
            "socket" => match (e.u32(SOCKET_KEY), e.u32(SOCKET_LEVEL), lookup_set(next)) {
                (Some(SOCKET_CGROUPV2), Some(level), Some(set)) => {
                    (Match::Cgroup { level, set }, 2)
                }
                _ => return Err(foreign("a socket match egret does not write")),
            },
            "counter" => {
                rule.counter = Some(Counter {
                    packets: e.raw(COUNTER_PACKETS).and_then(be_u64).unwrap_or(0),
                    bytes: e.raw(COUNTER_BYTES).and_then(be_u64).unwrap_or(0),
                });
                i += 1;
                continue;
            }
            "log" => {
                let group = e
                    .raw(LOG_GROUP)
                    .and_then(|v| v.get(..2))
                    .map(|v| u16::from_be_bytes([v[0], v[1]]))
                    .unwrap_or(0);
                rule.log = Some(Log {
                    group,
                    prefix: e.string(LOG_PREFIX).unwrap_or_default(),
                });
                i += 1;
                continue;
            }
            // `redirect to :PORT`: the port loaded into a register, then redir.
            "immediate"
                if e.u32(IMMEDIATE_DREG) == Some(REG_1) && next.is_some_and(|n| n.is("redir")) =>
            {
                let port = e
                    .raw(IMMEDIATE_DATA)
                    .and_then(|d| attrs(d).find(|(k, _)| *k == DATA_VALUE).map(|(_, v)| v))
                    .and_then(|v| Some(u16::from_be_bytes(v.get(..2)?.try_into().ok()?)))
                    .ok_or_else(|| foreign("a redirect egret does not write"))?;
                rule.verdict = Some(Verdict::Redirect(port));
                i += 2;
                continue;
            }
            "immediate" => {
                let verdict = e
                    .raw(IMMEDIATE_DATA)
                    .and_then(|d| attrs(d).find(|(k, _)| *k == DATA_VERDICT).map(|(_, v)| v));
                let code = verdict.and_then(|v| {
                    attrs(v)
                        .find(|(k, _)| *k == VERDICT_CODE)
                        .and_then(|(_, c)| be_u32(c))
                });
                let chain = verdict.and_then(|v| {
                    attrs(v)
                        .find(|(k, _)| *k == VERDICT_CHAIN)
                        .map(|(_, c)| c_str(c))
                });
                rule.verdict = Some(match (code, chain) {
                    (Some(NFT_JUMP), Some(chain)) => Verdict::Jump(chain),
                    (code, _) => match code {
                        Some(NF_ACCEPT) => Verdict::Accept,
                        Some(NF_DROP) => Verdict::Drop,
                        _ => return Err(foreign("a verdict egret does not write")),
                    },
                });
                i += 1;
                continue;
            }
            "reject" => {
                rule.verdict = Some(match e.u32(REJECT_TYPE) {
                    Some(REJECT_TCP_RST) => Verdict::RejectTcpReset,
                    Some(REJECT_ICMPX) => Verdict::RejectAdminProhibited,
                    _ => return Err(foreign("a reject egret does not write")),
                });
                i += 1;
                continue;
            }
            other => {
                return Err(foreign(&format!(
                    "a {other} expression, which egret does not write"
                )))
            }
        };
        if let Match::NfProto(f) = &m {
            family = Some(*f);
        }
        rule.matches.push(m);
        i += used;
    }
    Ok(rule)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{parse_str, Accounts};
    use crate::ruleset::{compile, CompileInput, OpenFlow};

    struct Ids;
    impl Accounts for Ids {
        fn uid(&self, _: &str) -> Option<u32> {
            Some(1000)
        }
        fn gid(&self, _: &str) -> Option<u32> {
            Some(100)
        }
    }

    /// Encodes a ruleset as the kernel would receive it, then decodes the
    /// messages as if they were dumped back: what egret writes it can read.
    fn roundtrip(rs: &Ruleset) -> Ruleset {
        let mut batch = Batch::new(1);
        batch.replace_table(rs);
        batch.finish();
        let mut sets: Vec<Set> = Vec::new();
        let mut chains: Vec<Chain> = Vec::new();
        let mut points: HashMap<String, Vec<Point>> = HashMap::new();
        let mut comment = String::new();
        let mut table_count = 0;
        for m in messages(&batch.b.buf) {
            let p = &m.payload[4..];
            match m.msg_type & 0xff {
                x if x == MSG_NEWTABLE && m.msg_type >> 8 == NFNL_SUBSYS_NFTABLES => {
                    table_count += 1;
                    if let Some((_, ud)) = attrs(p).find(|(k, _)| *k == TABLE_USERDATA) {
                        comment = udata_comment(ud).unwrap();
                    }
                }
                x if x == MSG_NEWSET => sets.push(decode_set(p).unwrap()),
                x if x == MSG_NEWSETELEM => {
                    let name = attrs(p)
                        .find(|(k, _)| *k == ELEM_LIST_SET)
                        .map(|(_, v)| c_str(v))
                        .unwrap();
                    let set = sets.iter().find(|s| s.name == name).unwrap();
                    decode_elements(p, set, points.entry(name).or_default());
                }
                x if x == MSG_NEWCHAIN => chains.push(decode_chain(p)),
                x if x == MSG_NEWRULE => {
                    let rule = decode_rule(p).unwrap();
                    let chain = attrs(p)
                        .find(|(k, _)| *k == RULE_CHAIN)
                        .map(|(_, v)| c_str(v))
                        .unwrap();
                    let c = chains.iter_mut().find(|c| c.name == chain).unwrap();
                    c.rules.push(rule);
                }
                _ => {}
            }
        }
        assert_eq!(table_count, 2, "add + re-add around the delete");
        for set in &mut sets {
            set.elements = assemble_elements(set, points.remove(&set.name).unwrap_or_default());
        }
        Ruleset {
            comment,
            sets,
            chains,
        }
    }

    #[test]
    fn a_full_policy_survives_encode_and_decode() {
        let text = r#"
scope = "host+containers"
[dns]
upstream = ["192.0.2.53", "[2001:db8::53]:5353"]
listen = "[::]:53"
intercept = true
[[allow]]
name = "mirrors"
hosts = ["*.debian.org"]
ports = [80, 443]
[[allow]]
name = "backups"
cidrs = ["10.20.0.0/16", "192.0.2.7", "2001:db8::/32", "0.0.0.0/1"]
ports = [22, "8000-8100"]
users = ["backup", 0]
groups = ["staff"]
units = ["borg.service"]
[[allow]]
name = "dns"
protocol = ["udp", "tcp", "icmp"]
cidrs = ["255.255.255.0/24", "::/0"]
[[allow]]
name = "web"
users = [33]
mode = "audit"
ports = [443]
"#;
        let policy = parse_str(text, std::path::Path::new("p.toml"), &Ids).unwrap();
        let mut input = CompileInput::default();
        input.units.insert("borg.service".into(), vec![(2, 4242)]);
        input.open_flows.push(OpenFlow {
            protocol: 6,
            local: "10.0.0.1:22".parse().unwrap(),
            remote: "10.0.0.2:5555".parse().unwrap(),
        });
        input.open_flows.push(OpenFlow {
            protocol: 6,
            local: "[2001:db8::1]:22".parse().unwrap(),
            remote: "[2001:db8::2]:5555".parse().unwrap(),
        });
        let mut rs = compile(&policy, &input);
        let mut back = roundtrip(&rs);
        rs.sets.sort_by(|a, b| a.name.cmp(&b.name));
        back.sets.sort_by(|a, b| a.name.cmp(&b.name));
        for s in &mut rs.sets {
            s.elements.sort();
        }
        assert_eq!(back, rs);
    }

    #[test]
    fn big_sets_are_split_into_messages_that_fit() {
        let elements: Vec<Element> = (0..20_000u128)
            .map(|i| Element {
                key: vec![i * 4],
                end: Some(vec![i * 4 + 1]),
            })
            .collect();
        let rs = Ruleset {
            comment: "t".into(),
            sets: vec![Set {
                name: "big".into(),
                key: vec![Field::Ipv4],
                interval: true,
                timeout: false,
                size: None,
                elements: elements.clone(),
            }],
            chains: vec![],
        };
        let back = roundtrip(&rs);
        assert_eq!(back.sets[0].elements, elements);
    }
}
