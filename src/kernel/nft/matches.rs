//! Each [`Match`] kind as nf_tables expressions: its encoder and its decoder
//! side by side. The decoder accepts exactly the expressions the encoder
//! writes; anything else is "changed outside egret".

use super::expr::*;
use super::*;

const META_MARK: u32 = 3;
const META_IIFNAME: u32 = 6;
const META_OIFNAME: u32 = 7;
const META_SKUID: u32 = 10;
const META_SKGID: u32 = 11;
const META_NFPROTO: u32 = 15;
const META_L4PROTO: u32 = 16;
const CT_DREG: u16 = 1;
const CT_KEY: u16 = 2;
const CT_STATE: u32 = 0;
const CT_SREG: u16 = 4;
const CT_MARK: u32 = 3;
const IMMEDIATE_DREG: u16 = 1;
const IMMEDIATE_DATA: u16 = 2;
const BITWISE_SREG: u16 = 1;
const BITWISE_DREG: u16 = 2;
const BITWISE_LEN: u16 = 3;
const BITWISE_MASK: u16 = 4;
const BITWISE_XOR: u16 = 5;
const SOCKET_KEY: u16 = 1;
const SOCKET_DREG: u16 = 2;
const SOCKET_LEVEL: u16 = 3;
const SOCKET_WILDCARD: u32 = 2;
const SOCKET_CGROUPV2: u32 = 3;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// (offset, length) of transport header fields.
const TH_SPORT: (u32, u32) = (0, 2);
const TH_DPORT: (u32, u32) = (2, 2);
const ICMP_TYPE: (u32, u32) = (0, 1);
/// `tcp flags`: byte 13 of the TCP header.
const TCP_FLAGS: (u32, u32) = (13, 1);

/// (offset, length) of the destination address in the network header.
pub(super) fn daddr(f: Family) -> (u32, u32) {
    match f {
        Family::V4 => (16, 4),
        Family::V6 => (24, 16),
    }
}

/// (offset, length) of the source address in the network header.
fn saddr(f: Family) -> (u32, u32) {
    match f {
        Family::V4 => (12, 4),
        Family::V6 => (8, 16),
    }
}

/// A match read back: the match and how many expressions it took; or what
/// egret found instead (for the "changed outside egret" error).
pub(super) type Decoded = std::result::Result<(Match, usize), String>;

impl Batch {
    pub(super) fn encode_match(&mut self, m: &Match) {
        match m {
            Match::OifName(name) => self.encode_ifname(META_OIFNAME, name),
            Match::IifName(name) => self.encode_ifname(META_IIFNAME, name),
            Match::CtState(bits) => self.encode_ct_state(*bits),
            Match::NfProto(f) => self.encode_nfproto(*f),
            Match::L4Proto(p) => self.encode_l4proto(*p),
            Match::L4ProtoIn(set) => self.encode_l4proto_in(set),
            Match::Mark(mark) => self.encode_mark(*mark),
            Match::Daddr(f, set) => self.encode_daddr(*f, set),
            Match::ProtoDport(set) => self.encode_proto_dport(set),
            Match::IcmpType(_, set) => self.encode_icmp_type(set),
            Match::SkUid(id) => self.encode_id(META_SKUID, id),
            Match::SkGid(id) => self.encode_id(META_SKGID, id),
            Match::Cgroup { level, set } => self.encode_cgroup(*level, set),
            Match::FiveTuple(f, set) => self.encode_flow(*f, set),
            Match::TcpFlagsZero(mask) => self.encode_tcp_flags_zero(*mask),
            Match::CtMarkSet(mark) => self.encode_ct_mark_set(*mark),
            Match::Seen { family, set } => self.encode_seen(*family, set),
            Match::Remember {
                family,
                set,
                timeout,
            } => self.encode_remember(*family, set, *timeout),
            Match::BoundSocket => self.encode_bound_socket(),
        }
    }
}

/// The match that starts at `x[0]`, or `None` if `x[0]` starts no match (a
/// statement: counter, log, verdict). `family` is the rule's `meta nfproto`
/// so far (an ICMP type match does not say which ICMP it means).
pub(super) fn decode_match(x: &[Expr], family: Option<Family>) -> Option<Decoded> {
    let e = x.first()?;
    Some(match e.name.as_str() {
        "meta" => {
            let key = e.u32(META_KEY).unwrap_or(u32::MAX);
            match (key, e.u32(META_DREG).unwrap_or(0)) {
                (META_OIFNAME, REG_1) => decode_ifname(x, Match::OifName, "an oifname match"),
                (META_IIFNAME, REG_1) => decode_ifname(x, Match::IifName, "an iifname match"),
                (META_NFPROTO, REG_1) => decode_nfproto(x),
                // The kernel dumps NFT_REG32_00 as NFT_REG_1 (the same register),
                // so a concatenation is told apart by the payload load that follows.
                (META_L4PROTO, REG_1 | REG32_00) if x.get(1).is_some_and(|n| n.is("payload")) => {
                    match x[1].u32(PAYLOAD_BASE) {
                        Some(PAYLOAD_TRANSPORT) => decode_proto_dport(x),
                        Some(PAYLOAD_NETWORK) => decode_flow(x),
                        _ => Err("an l4proto concatenation egret does not write".into()),
                    }
                }
                (META_L4PROTO, REG_1) => decode_l4proto(x),
                (META_MARK, REG_1) => decode_mark(x),
                (META_SKUID, REG_1 | REG32_00) if x.get(1).is_some_and(|n| n.is("payload")) => {
                    decode_novelty(x)
                }
                (META_SKUID, REG_1) => decode_id(x, Match::SkUid),
                (META_SKGID, REG_1) => decode_id(x, Match::SkGid),
                _ => Err(format!("meta key {key}, which egret does not write")),
            }
        }
        "ct" => decode_ct_state(x),
        // A value loaded into register 1 for `ct mark set`; any other
        // immediate is a verdict (or a redirect's port), not a match.
        "immediate"
            if e.u32(IMMEDIATE_DREG) == Some(REG_1) && x.get(1).is_some_and(|n| n.is("ct")) =>
        {
            decode_ct_mark_set(x)
        }
        "payload" if is_tcp_flags(x) => decode_tcp_flags_zero(x),
        "payload" => decode_daddr(x)
            .or_else(|| decode_icmp_type(x, family))
            .ok_or_else(|| "a payload match egret does not write".into()),
        "socket" if x[0].u32(SOCKET_KEY) == Some(SOCKET_WILDCARD) => decode_bound_socket(x),
        "socket" => decode_cgroup(x),
        _ => return None,
    })
}

fn not_written(what: &str) -> String {
    format!("{what} egret does not write")
}

/// A 4-byte compare value in host order.
fn ne_u32(d: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(d.try_into().ok()?))
}

// `oifname "lo"`, `iifname "br-*"`: meta → cmp eq.

impl Batch {
    fn encode_ifname(&mut self, key: u32, name: &str) {
        self.meta(key, REG_1);
        self.cmp(CMP_EQ, &ifname_data(name));
    }
}

fn decode_ifname(x: &[Expr], make: fn(String) -> Match, what: &str) -> Decoded {
    match cmp_data(x.get(1), CMP_EQ) {
        Some(d) => Ok((make(ifname_from(&d)), 2)),
        None => Err(not_written(what)),
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

// `ct state established,related`: ct → bitwise (mask) → cmp neq 0.

impl Batch {
    fn encode_ct_state(&mut self, bits: u32) {
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
}

fn decode_ct_state(x: &[Expr]) -> Decoded {
    let mask = x
        .get(1)
        .filter(|n| n.is("bitwise"))
        .and_then(|n| n.data(BITWISE_MASK));
    match (x[0].u32(CT_KEY), mask, cmp_data(x.get(2), CMP_NEQ)) {
        (Some(CT_STATE), Some(mask), Some(_)) => match ne_u32(&mask) {
            Some(bits) => Ok((Match::CtState(bits), 3)),
            None => Err(not_written("a ct match")),
        },
        _ => Err(not_written("a ct match")),
    }
}

// `meta nfproto ipv4|ipv6`: meta → cmp eq.

fn nfproto(f: Family) -> u8 {
    match f {
        Family::V4 => NFPROTO_IPV4,
        Family::V6 => NFPROTO_IPV6,
    }
}

impl Batch {
    fn encode_nfproto(&mut self, f: Family) {
        self.meta(META_NFPROTO, REG_1);
        self.cmp(CMP_EQ, &[nfproto(f)]);
    }
}

fn decode_nfproto(x: &[Expr]) -> Decoded {
    let d = cmp_data(x.get(1), CMP_EQ);
    [Family::V4, Family::V6]
        .into_iter()
        .find(|f| d.as_deref() == Some(&[nfproto(*f)][..]))
        .map(|f| (Match::NfProto(f), 2))
        .ok_or_else(|| not_written("an nfproto match"))
}

// `meta l4proto tcp` (meta → cmp eq) and `meta l4proto @set` (meta → lookup).

impl Batch {
    fn encode_l4proto(&mut self, p: u8) {
        self.meta(META_L4PROTO, REG_1);
        self.cmp(CMP_EQ, &[p]);
    }

    fn encode_l4proto_in(&mut self, set: &str) {
        self.meta(META_L4PROTO, REG_1);
        self.lookup(set, REG_1);
    }
}

fn decode_l4proto(x: &[Expr]) -> Decoded {
    match (cmp_data(x.get(1), CMP_EQ).as_deref(), lookup_set(x.get(1))) {
        (Some([p]), _) => Ok((Match::L4Proto(*p), 2)),
        (_, Some(set)) => Ok((Match::L4ProtoIn(set), 2)),
        _ => Err(not_written("an l4proto match")),
    }
}

// `meta mark 0x...`: meta → cmp eq.

impl Batch {
    fn encode_mark(&mut self, mark: u32) {
        self.meta(META_MARK, REG_1);
        self.cmp(CMP_EQ, &mark.to_ne_bytes());
    }
}

fn decode_mark(x: &[Expr]) -> Decoded {
    match cmp_data(x.get(1), CMP_EQ).as_deref().and_then(ne_u32) {
        Some(mark) => Ok((Match::Mark(mark), 2)),
        None => Err(not_written("a mark match")),
    }
}

// `ip daddr @set` / `ip6 daddr @set`: payload → lookup.

impl Batch {
    fn encode_daddr(&mut self, f: Family, set: &str) {
        let (offset, len) = daddr(f);
        self.payload(PAYLOAD_NETWORK, offset, len, REG_1);
        self.lookup(set, REG_1);
    }
}

/// `None` when `x[0]` is not a destination address load.
fn decode_daddr(x: &[Expr]) -> Option<(Match, usize)> {
    let set = lookup_set(x.get(1))?;
    let at = payload_at(&x[0]);
    [Family::V4, Family::V6]
        .into_iter()
        .find(|f| at == (Some(PAYLOAD_NETWORK), Some(daddr(*f))))
        .map(|f| (Match::Daddr(f, set), 2))
}

/// A payload load's base and (offset, length).
fn payload_at(e: &Expr) -> (Option<u32>, Option<(u32, u32)>) {
    let place = e.u32(PAYLOAD_OFFSET).zip(e.u32(PAYLOAD_LEN));
    (e.u32(PAYLOAD_BASE), place)
}

// `icmp type @set` / `icmpv6 type @set`: payload → lookup; the family is the
// rule's `meta nfproto` before it.

impl Batch {
    fn encode_icmp_type(&mut self, set: &str) {
        let (offset, len) = ICMP_TYPE;
        self.payload(PAYLOAD_TRANSPORT, offset, len, REG_1);
        self.lookup(set, REG_1);
    }
}

/// `None` when `x[0]` is not an ICMP type load.
fn decode_icmp_type(x: &[Expr], family: Option<Family>) -> Option<(Match, usize)> {
    let set = lookup_set(x.get(1))?;
    (payload_at(&x[0]) == (Some(PAYLOAD_TRANSPORT), Some(ICMP_TYPE)))
        .then(|| (Match::IcmpType(family.unwrap_or(Family::V4), set), 2))
}

// `meta l4proto . th dport @set`: meta and payload into consecutive 32-bit
// registers → lookup.

impl Batch {
    fn encode_proto_dport(&mut self, set: &str) {
        let (offset, len) = TH_DPORT;
        self.meta(META_L4PROTO, REG32_00);
        self.payload(PAYLOAD_TRANSPORT, offset, len, REG32_00 + 1);
        self.lookup(set, REG32_00);
    }
}

fn decode_proto_dport(x: &[Expr]) -> Decoded {
    match lookup_set(x.get(2)) {
        Some(set) => Ok((Match::ProtoDport(set), 3)),
        None => Err(not_written("a port match")),
    }
}

// `meta l4proto . ip saddr . th sport . ip daddr . th dport @set`: five
// loads into consecutive 32-bit registers → lookup.

impl Batch {
    fn encode_flow(&mut self, f: Family, set: &str) {
        let (saddr_off, len) = saddr(f);
        let (daddr_off, _) = daddr(f);
        let words = len / 4;
        self.meta(META_L4PROTO, REG32_00);
        self.payload(PAYLOAD_NETWORK, saddr_off, len, REG32_00 + 1);
        let (sport_off, sport_len) = TH_SPORT;
        self.payload(
            PAYLOAD_TRANSPORT,
            sport_off,
            sport_len,
            REG32_00 + 1 + words,
        );
        self.payload(PAYLOAD_NETWORK, daddr_off, len, REG32_00 + 2 + words);
        let (dport_off, dport_len) = TH_DPORT;
        self.payload(
            PAYLOAD_TRANSPORT,
            dport_off,
            dport_len,
            REG32_00 + 2 + 2 * words,
        );
        self.lookup(set, REG32_00);
    }
}

fn decode_flow(x: &[Expr]) -> Decoded {
    let (_, v6_len) = saddr(Family::V6);
    let f = if x[1].u32(PAYLOAD_LEN) == Some(v6_len) {
        Family::V6
    } else {
        Family::V4
    };
    match lookup_set(x.get(5)) {
        Some(set) => Ok((Match::FiveTuple(f, set), 6)),
        None => Err(not_written("a flow match")),
    }
}

// A novelty set's key, `meta skuid . ip daddr . meta l4proto . th dport`:
// four loads into consecutive 32-bit registers, then a lookup (`@set`,
// Seen) or a dynset (`add @set { <key> timeout Ns }`, Remember).

impl Batch {
    fn encode_novelty_key(&mut self, f: Family) {
        let (daddr_off, len) = daddr(f);
        let words = len / 4;
        self.meta(META_SKUID, REG32_00);
        self.payload(PAYLOAD_NETWORK, daddr_off, len, REG32_00 + 1);
        self.meta(META_L4PROTO, REG32_00 + 1 + words);
        let (dport_off, dport_len) = TH_DPORT;
        self.payload(
            PAYLOAD_TRANSPORT,
            dport_off,
            dport_len,
            REG32_00 + 2 + words,
        );
    }

    fn encode_seen(&mut self, f: Family, set: &str) {
        self.encode_novelty_key(f);
        self.lookup(set, REG32_00);
    }

    fn encode_remember(&mut self, f: Family, set: &str, timeout: u32) {
        self.encode_novelty_key(f);
        self.dynset_add(set, REG32_00, u64::from(timeout) * 1000);
    }
}

fn decode_novelty(x: &[Expr]) -> Decoded {
    let at = payload_at(&x[1]);
    let Some(family) = [Family::V4, Family::V6]
        .into_iter()
        .find(|f| at == (Some(PAYLOAD_NETWORK), Some(daddr(*f))))
    else {
        return Err(not_written("a novelty key"));
    };
    let proto = x
        .get(2)
        .is_some_and(|e| e.is("meta") && e.u32(META_KEY) == Some(META_L4PROTO));
    let port = x
        .get(3)
        .is_some_and(|e| payload_at(e) == (Some(PAYLOAD_TRANSPORT), Some(TH_DPORT)));
    if !(proto && port) {
        return Err(not_written("a novelty key"));
    }
    if let Some(set) = lookup_set(x.get(4)) {
        return Ok((Match::Seen { family, set }, 5));
    }
    let Some(add) = x.get(4).filter(|e| e.is("dynset")) else {
        return Err(not_written("a novelty match"));
    };
    let timeout_ms = add.raw(DYNSET_TIMEOUT).and_then(be_u64);
    match (add.string(DYNSET_SET_NAME), add.u32(DYNSET_OP), timeout_ms) {
        (Some(set), Some(DYNSET_OP_ADD), Some(ms)) if ms % 1000 == 0 && plain(add) => Ok((
            Match::Remember {
                family,
                set,
                timeout: u32::try_from(ms / 1000).unwrap_or(u32::MAX),
            },
            5,
        )),
        _ => Err(not_written("a dynset")),
    }
}

/// A dynset with nothing egret does not write: no flags, no expressions
/// attached to its elements.
fn plain(add: &Expr) -> bool {
    add.u32(DYNSET_FLAGS).unwrap_or(0) == 0
        && add.raw(DYNSET_EXPR).is_none()
        && add.raw(DYNSET_EXPRESSIONS).is_none()
}

// `meta skuid 33`, `meta skgid @set`: meta → cmp eq or lookup.

impl Batch {
    fn encode_id(&mut self, key: u32, id: &IdMatch) {
        self.meta(key, REG_1);
        match id {
            IdMatch::Eq(v) => self.cmp(CMP_EQ, &v.to_ne_bytes()),
            IdMatch::Set(set) => self.lookup(set, REG_1),
        }
    }
}

fn decode_id(x: &[Expr], make: fn(IdMatch) -> Match) -> Decoded {
    let eq = cmp_data(x.get(1), CMP_EQ).as_deref().and_then(ne_u32);
    match (eq, lookup_set(x.get(1))) {
        (Some(v), _) => Ok((make(IdMatch::Eq(v)), 2)),
        (_, Some(set)) => Ok((make(IdMatch::Set(set)), 2)),
        _ => Err(not_written("a user or group match")),
    }
}

// `socket cgroupv2 level N @set`: socket → lookup.

impl Batch {
    fn encode_cgroup(&mut self, level: u32, set: &str) {
        self.expr("socket", |b| {
            b.attr_u32(SOCKET_KEY, SOCKET_CGROUPV2);
            b.attr_u32(SOCKET_DREG, REG_1);
            b.attr_u32(SOCKET_LEVEL, level);
        });
        self.lookup(set, REG_1);
    }
}

fn decode_cgroup(x: &[Expr]) -> Decoded {
    let e = &x[0];
    match (e.u32(SOCKET_KEY), e.u32(SOCKET_LEVEL), lookup_set(x.get(1))) {
        (Some(SOCKET_CGROUPV2), Some(level), Some(set)) => Ok((Match::Cgroup { level, set }, 2)),
        _ => Err(not_written("a socket match")),
    }
}

// `socket wildcard 0`: socket (one byte: is the socket bound to a wildcard
// address?) → cmp eq 0. No socket at all: the expression breaks, no match.

impl Batch {
    fn encode_bound_socket(&mut self) {
        self.expr("socket", |b| {
            b.attr_u32(SOCKET_KEY, SOCKET_WILDCARD);
            b.attr_u32(SOCKET_DREG, REG_1);
        });
        self.cmp(CMP_EQ, &[0]);
    }
}

fn decode_bound_socket(x: &[Expr]) -> Decoded {
    match (
        x[0].u32(SOCKET_LEVEL),
        cmp_data(x.get(1), CMP_EQ).as_deref(),
    ) {
        (None, Some(&[0])) => Ok((Match::BoundSocket, 2)),
        _ => Err(not_written("a socket wildcard match")),
    }
}

// `tcp flags & MASK == 0`: payload → bitwise (mask) → cmp eq 0.

impl Batch {
    fn encode_tcp_flags_zero(&mut self, mask: u8) {
        let (offset, len) = TCP_FLAGS;
        self.payload(PAYLOAD_TRANSPORT, offset, len, REG_1);
        self.expr("bitwise", |b| {
            b.attr_u32(BITWISE_SREG, REG_1);
            b.attr_u32(BITWISE_DREG, REG_1);
            b.attr_u32(BITWISE_LEN, len);
            data_attr(b, BITWISE_MASK, &[mask]);
            data_attr(b, BITWISE_XOR, &[0]);
        });
        self.cmp(CMP_EQ, &[0]);
    }
}

/// A load of the TCP flags byte followed by a bitwise: this match's shape.
fn is_tcp_flags(x: &[Expr]) -> bool {
    payload_at(&x[0]) == (Some(PAYLOAD_TRANSPORT), Some(TCP_FLAGS))
        && x.get(1).is_some_and(|n| n.is("bitwise"))
}

fn decode_tcp_flags_zero(x: &[Expr]) -> Decoded {
    let bitwise = x.get(1).filter(|n| {
        n.data(BITWISE_XOR).as_deref() == Some(&[0][..]) && n.u32(BITWISE_LEN) == Some(TCP_FLAGS.1)
    });
    match (
        bitwise.and_then(|n| n.data(BITWISE_MASK)).as_deref(),
        cmp_data(x.get(2), CMP_EQ).as_deref(),
    ) {
        (Some(&[mask]), Some(&[0])) => Ok((Match::TcpFlagsZero(mask), 3)),
        _ => Err(not_written("a tcp flags match")),
    }
}

// `ct mark set 0x...`: immediate (the mark into register 1) → ct set.

impl Batch {
    fn encode_ct_mark_set(&mut self, mark: u32) {
        self.expr("immediate", |b| {
            b.attr_u32(IMMEDIATE_DREG, REG_1);
            data_attr(b, IMMEDIATE_DATA, &mark.to_ne_bytes());
        });
        self.expr("ct", |b| {
            b.attr_u32(CT_KEY, CT_MARK);
            b.attr_u32(CT_SREG, REG_1);
        });
    }
}

fn decode_ct_mark_set(x: &[Expr]) -> Decoded {
    let value = x[0].data(IMMEDIATE_DATA).as_deref().and_then(ne_u32);
    let ct = &x[1];
    match (value, ct.u32(CT_KEY), ct.u32(CT_SREG)) {
        (Some(mark), Some(CT_MARK), Some(REG_1)) => Ok((Match::CtMarkSet(mark), 2)),
        _ => Err(not_written("a ct statement")),
    }
}
