//! Sets and their elements: the set's flags, key and description, elements
//! split across messages (and rbtree end markers), and keys as the kernel's
//! registers hold them.

use super::*;

pub(super) const SET_TABLE: u16 = 1;
const SET_NAME: u16 = 2;
const SET_FLAGS: u16 = 3;
const SET_KEY_TYPE: u16 = 4;
const SET_KEY_LEN: u16 = 5;
const SET_DATA_TYPE: u16 = 6;
const SET_DESC: u16 = 9;
const SET_ID: u16 = 10;
const SET_USERDATA: u16 = 13;
const SET_DESC_SIZE: u16 = 1;
const SET_DESC_CONCAT: u16 = 2;
const SET_FIELD_LEN: u16 = 1;
const SET_F_INTERVAL: u32 = 0x4;
const SET_F_MAP: u32 = 0x8;
const SET_F_TIMEOUT: u32 = 0x10;
/// NFT_SET_EVAL (`flags dynamic`): rules add elements from the packet path.
const SET_F_EVAL: u32 = 0x20;
const SET_F_CONCAT: u32 = 0x80;
const ELEM_LIST_TABLE: u16 = 1;
pub(super) const ELEM_LIST_SET: u16 = 2;
const ELEM_LIST_ELEMENTS: u16 = 3;
const ELEM_LIST_SET_ID: u16 = 4;
const ELEM_KEY: u16 = 1;
const ELEM_DATA: u16 = 2;
const ELEM_FLAGS: u16 = 3;
const ELEM_TIMEOUT: u16 = 4;
const ELEM_EXPIRATION: u16 = 5;
const ELEM_KEY_END: u16 = 10;
const ELEM_F_INTERVAL_END: u32 = 1;
/// NFT_DATA_VERDICT: a map whose data are verdicts.
const DATA_TYPE_VERDICT: u32 = 0xffff_ff00;

/// nft's userdata TLV type for a set's key byte order.
const UDATA_SET_KEYBYTEORDER: u8 = 0;

/// Largest payload of one NEWSETELEM message: its element list is a single
/// attribute, whose length field is 16 bits.
const MAX_ELEMENTS_BYTES: usize = 60_000;

impl Nftables {
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

    pub(super) fn live_sets(&mut self) -> Result<Vec<Set>> {
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
    pub(super) fn dump_elements(&mut self, set: &Set) -> Result<Vec<Element>> {
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
}

// The set: flags, key type and length, description, key byte order.

impl Batch {
    pub(super) fn new_set(&mut self, set: &Set, id: u32) {
        self.label(format!("set {}", set.name));
        self.msg(MSG_NEWSET, NLM_F_CREATE | NLM_F_EXCL);
        self.b.attr_str(SET_TABLE, TABLE);
        self.b.attr_str(SET_NAME, &set.name);
        let concat = set.key.len() > 1;
        let mut flags = 0;
        if set.timeout {
            flags |= SET_F_TIMEOUT;
        }
        if set.is_dynamic() {
            flags |= SET_F_EVAL;
        }
        if set.interval {
            flags |= SET_F_INTERVAL;
            if concat {
                flags |= SET_F_CONCAT;
            }
        }
        if set.verdict_map {
            flags |= SET_F_MAP;
        }
        self.b.attr_u32(SET_FLAGS, flags);
        let key_type = set.key.iter().fold(0u32, |t, f| (t << 6) | f.nft_type());
        self.b.attr_u32(SET_KEY_TYPE, key_type);
        self.b.attr_u32(SET_KEY_LEN, key_len(&set.key) as u32);
        if set.verdict_map {
            // The kernel sizes verdict data itself: no data length.
            self.b.attr_u32(SET_DATA_TYPE, DATA_TYPE_VERDICT);
        }
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
}

pub(super) fn decode_set(payload: &[u8]) -> Result<Set> {
    let mut name = String::new();
    let (mut flags, mut key_type, mut data_type) = (0u32, 0u32, None);
    let mut field_lens = Vec::new();
    let mut size = None;
    for (k, v) in attrs(payload) {
        match k {
            SET_NAME => name = c_str(v),
            SET_FLAGS => flags = be_u32(v).unwrap_or(0),
            SET_KEY_TYPE => key_type = be_u32(v).unwrap_or(0),
            SET_DATA_TYPE => data_type = be_u32(v),
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
    let verdict_map = flags & SET_F_MAP != 0;
    if verdict_map && data_type != Some(DATA_TYPE_VERDICT) {
        return Err(NftError::Foreign(format!(
            "set {name} is a map egret does not write"
        )));
    }
    if (flags & SET_F_EVAL != 0) != name.starts_with(NOVELTY_PREFIX) {
        return Err(NftError::Foreign(format!(
            "set {name} has flags egret does not write ({flags:#x})"
        )));
    }
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
        verdict_map,
        elements: Vec::new(),
    })
}

// Elements: split across messages whose element list fits a 16-bit length;
// single-field interval sets as start elements and end markers (rbtree).

impl Batch {
    pub(super) fn flush_set(&mut self, name: &str) {
        self.msg(MSG_DELSETELEM, 0);
        self.b.attr_str(ELEM_LIST_TABLE, TABLE);
        self.b.attr_str(ELEM_LIST_SET, name);
        self.b.end();
    }

    pub(super) fn delete_elements(&mut self, set: &Set, elements: impl Iterator<Item = Element>) {
        let elements: Vec<Element> = elements.collect();
        self.elements(MSG_DELSETELEM, 0, set, None, &elements, &[]);
    }

    pub(super) fn timed_elements(&mut self, set: &Set, items: &[(Element, u64)]) {
        let (elements, timeouts): (Vec<Element>, Vec<u64>) = items.iter().cloned().unzip();
        let id = self.set_ids.get(&set.name).copied();
        self.elements(MSG_NEWSETELEM, NLM_F_CREATE, set, id, &elements, &timeouts);
    }

    /// Element messages for `elements`, split so each element list fits its
    /// 16-bit attribute length. `timeouts_ms`, when not empty, holds one
    /// timeout per element.
    pub(super) fn elements(
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
                        timeout_ms: Option<u64>,
                        jump: Option<&str>| {
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
            if let (Some(chain), false) = (jump, interval_end) {
                super::rule::encode_jump_data(&mut this.b, ELEM_DATA, chain);
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
                emit(self, &encode_key(&set.key, &[0]), None, true, None, None);
            }
            for (i, el) in elements.iter().enumerate() {
                let start = el.key[0];
                let end = el.end.as_ref().map(|e| e[0]).unwrap_or(start);
                let timeout = timeouts_ms.get(i).copied();
                let jump = el.jump.as_deref();
                emit(
                    self,
                    &encode_key(&set.key, &[start]),
                    None,
                    false,
                    timeout,
                    jump,
                );
                if end < max {
                    emit(
                        self,
                        &encode_key(&set.key, &[end + 1]),
                        None,
                        true,
                        None,
                        None,
                    );
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
                    el.jump.as_deref(),
                );
            }
        }
        if let Some(l) = list {
            self.b.nest_end(l);
            self.b.end();
        }
    }
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

/// An element as dumped: key, optional key end, whether it is an rbtree end
/// marker, and the chain a verdict map's element jumps to.
pub(super) type Point = (Vec<u128>, Option<Vec<u128>>, bool, Option<String>);

pub(super) fn decode_elements(payload: &[u8], set: &Set, out: &mut Vec<Point>) {
    for (k, v) in attrs(payload) {
        if k != ELEM_LIST_ELEMENTS {
            continue;
        }
        for (_, elem) in attrs(v) {
            let (mut key, mut end, mut is_end, mut jump) = (None, None, false, None);
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
                    ELEM_DATA => jump = super::rule::decode_jump_data(ev),
                    _ => {}
                }
            }
            if let Some(key) = key {
                out.push((key, end, is_end, jump));
            }
        }
    }
}

/// Turns dumped elements back into inclusive ranges. rbtree sets dump start
/// elements and end markers (at end + 1) in no useful order.
pub(super) fn assemble_elements(set: &Set, mut points: Vec<Point>) -> Vec<Element> {
    if !(set.interval && set.key.len() == 1) {
        let mut out: Vec<Element> = points
            .into_iter()
            .map(|(key, end, _, jump)| {
                let end = end
                    .filter(|e| *e != key)
                    .or_else(|| set.interval.then(|| key.clone()));
                Element { key, end, jump }
            })
            .collect();
        out.sort();
        return out;
    }
    points.sort_by(|a, b| a.0.cmp(&b.0).then(b.2.cmp(&a.2)));
    let max = set.key[0].max();
    let mut out = Vec::new();
    let mut open: Option<(u128, Option<String>)> = None;
    for (key, _, is_end, jump) in points {
        let v = key[0];
        match (is_end, open.take()) {
            (false, None) => open = Some((v, jump)),
            (false, Some(already)) => open = Some(already),
            (true, Some((start, jump))) => {
                let end = v.saturating_sub(1);
                out.push(Element {
                    key: vec![start],
                    end: (end != start).then(|| vec![end]),
                    jump,
                });
            }
            (true, None) => {}
        }
    }
    if let Some((start, jump)) = open {
        out.push(Element {
            key: vec![start],
            end: (start != max).then(|| vec![max]),
            jump,
        });
    }
    out
}

// Keys as the kernel's registers hold them.

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

fn encode_key(key: &[Field], values: &[u128]) -> Vec<u8> {
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
