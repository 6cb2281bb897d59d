//! Expression primitives: writing one expression into a rule, and the
//! expressions of a dumped rule as the decoders read them.

use super::*;

const EXPR_NAME: u16 = 1;
const EXPR_DATA: u16 = 2;
pub(super) const META_DREG: u16 = 1;
pub(super) const META_KEY: u16 = 2;
const CMP_SREG: u16 = 1;
pub(super) const CMP_OP: u16 = 2;
pub(super) const CMP_DATA: u16 = 3;
const PAYLOAD_DREG: u16 = 1;
pub(super) const PAYLOAD_BASE: u16 = 2;
pub(super) const PAYLOAD_OFFSET: u16 = 3;
pub(super) const PAYLOAD_LEN: u16 = 4;
pub(super) const PAYLOAD_NETWORK: u32 = 1;
pub(super) const PAYLOAD_TRANSPORT: u32 = 2;
const LOOKUP_SET: u16 = 1;
const LOOKUP_SREG: u16 = 2;
const LOOKUP_DREG: u16 = 3;
const LOOKUP_SET_ID: u16 = 4;
const LOOKUP_FLAGS: u16 = 5;
pub(super) const DYNSET_SET_NAME: u16 = 1;
const DYNSET_SET_ID: u16 = 2;
pub(super) const DYNSET_OP: u16 = 3;
pub(super) const DYNSET_SREG_KEY: u16 = 4;
pub(super) const DYNSET_TIMEOUT: u16 = 6;
pub(super) const DYNSET_EXPR: u16 = 7;
pub(super) const DYNSET_FLAGS: u16 = 9;
pub(super) const DYNSET_EXPRESSIONS: u16 = 10;
pub(super) const DYNSET_OP_ADD: u32 = 0;
pub(super) const CMP_EQ: u32 = 0;
pub(super) const CMP_NEQ: u32 = 1;
pub(super) const REG_VERDICT: u32 = 0;
pub(super) const REG_1: u32 = 1;
/// The first 32-bit register; concatenations fill consecutive ones.
pub(super) const REG32_00: u32 = 8;

impl Batch {
    pub(super) fn expr(&mut self, name: &str, data: impl FnOnce(&mut MsgBuilder)) {
        let e = self.b.nest(LIST_ELEM);
        self.b.attr_str(EXPR_NAME, name);
        let d = self.b.nest(EXPR_DATA);
        data(&mut self.b);
        self.b.nest_end(d);
        self.b.nest_end(e);
    }

    pub(super) fn meta(&mut self, key: u32, dreg: u32) {
        self.expr("meta", |b| {
            b.attr_u32(META_KEY, key);
            b.attr_u32(META_DREG, dreg);
        });
    }

    pub(super) fn cmp(&mut self, op: u32, data: &[u8]) {
        self.expr("cmp", |b| {
            b.attr_u32(CMP_SREG, REG_1);
            b.attr_u32(CMP_OP, op);
            data_attr(b, CMP_DATA, data);
        });
    }

    pub(super) fn payload(&mut self, base: u32, offset: u32, len: u32, dreg: u32) {
        self.expr("payload", |b| {
            b.attr_u32(PAYLOAD_DREG, dreg);
            b.attr_u32(PAYLOAD_BASE, base);
            b.attr_u32(PAYLOAD_OFFSET, offset);
            b.attr_u32(PAYLOAD_LEN, len);
        });
    }

    pub(super) fn lookup(&mut self, set: &str, sreg: u32) {
        self.lookup_into(set, sreg, None);
    }

    /// A lookup in a verdict map: the element's verdict is the rule's.
    pub(super) fn lookup_verdict(&mut self, map: &str, sreg: u32) {
        self.lookup_into(map, sreg, Some(REG_VERDICT));
    }

    fn lookup_into(&mut self, set: &str, sreg: u32, dreg: Option<u32>) {
        let id = self.set_ids.get(set).copied();
        self.expr("lookup", |b| {
            b.attr_str(LOOKUP_SET, set);
            b.attr_u32(LOOKUP_SREG, sreg);
            if let Some(dreg) = dreg {
                b.attr_u32(LOOKUP_DREG, dreg);
            }
            if let Some(id) = id {
                b.attr_u32(LOOKUP_SET_ID, id);
            }
        });
    }

    /// `add @set { <key in sreg> timeout T }`: the kernel adds the element
    /// from the packet path; a full set makes the rule stop here (NFT_BREAK).
    pub(super) fn dynset_add(&mut self, set: &str, sreg: u32, timeout_ms: u64) {
        let id = self.set_ids.get(set).copied();
        self.expr("dynset", |b| {
            b.attr_str(DYNSET_SET_NAME, set);
            if let Some(id) = id {
                b.attr_u32(DYNSET_SET_ID, id);
            }
            b.attr_u32(DYNSET_OP, DYNSET_OP_ADD);
            b.attr_u32(DYNSET_SREG_KEY, sreg);
            b.attr_u64(DYNSET_TIMEOUT, timeout_ms);
        });
    }
}

/// One expression as the kernel dumps it: its name and attributes.
pub(super) struct Expr<'a> {
    pub(super) name: String,
    pub(super) data: Vec<(u16, &'a [u8])>,
}

impl<'a> Expr<'a> {
    /// Parses one element of a rule's expression list.
    pub(super) fn parse(elem: &'a [u8]) -> Expr<'a> {
        let mut name = String::new();
        let mut data = Vec::new();
        for (ek, ev) in attrs(elem) {
            match ek {
                EXPR_NAME => name = c_str(ev),
                EXPR_DATA => data = attrs(ev).collect(),
                _ => {}
            }
        }
        Expr { name, data }
    }
}

impl Expr<'_> {
    pub(super) fn u32(&self, k: u16) -> Option<u32> {
        self.data
            .iter()
            .find(|(a, _)| *a == k)
            .and_then(|(_, v)| be_u32(v))
    }
    pub(super) fn raw(&self, k: u16) -> Option<&[u8]> {
        self.data.iter().find(|(a, _)| *a == k).map(|(_, v)| *v)
    }
    pub(super) fn data(&self, k: u16) -> Option<Vec<u8>> {
        self.raw(k).and_then(|v| {
            attrs(v)
                .find(|(a, _)| *a == DATA_VALUE)
                .map(|(_, d)| d.to_vec())
        })
    }
    pub(super) fn string(&self, k: u16) -> Option<String> {
        self.raw(k).map(c_str)
    }
    pub(super) fn is(&self, name: &str) -> bool {
        self.name == name
    }
}

/// The set an expression looks its register up in, if `e` is a plain
/// membership lookup (not inverted; a map lookup writing a register is no match).
pub(super) fn lookup_set(e: Option<&Expr>) -> Option<String> {
    e.filter(|e| {
        e.is("lookup") && e.raw(LOOKUP_DREG).is_none() && e.u32(LOOKUP_FLAGS).unwrap_or(0) == 0
    })
    .and_then(|e| e.string(LOOKUP_SET))
}

/// The map a lookup into the verdict register reads, if `e` is one.
pub(super) fn verdict_lookup_set(e: Option<&Expr>) -> Option<String> {
    e.filter(|e| {
        e.is("lookup")
            && e.u32(LOOKUP_DREG) == Some(REG_VERDICT)
            && e.u32(LOOKUP_FLAGS).unwrap_or(0) == 0
    })
    .and_then(|e| e.string(LOOKUP_SET))
}

/// The value a `cmp` with operator `op` compares against, if `e` is one.
pub(super) fn cmp_data(e: Option<&Expr>, op: u32) -> Option<Vec<u8>> {
    e.filter(|e| e.is("cmp") && e.u32(CMP_OP) == Some(op))
        .and_then(|e| e.data(CMP_DATA))
}
