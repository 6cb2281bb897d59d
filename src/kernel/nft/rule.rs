//! Rules: their matches (`matches`), then the statements egret writes, each
//! with its encoder beside its decoder: counter, log, and the verdict
//! (accept, drop, reject, jump, redirect, a verdict map on the destination).

use super::expr::*;
use super::matches::decode_match;
use super::*;

const RULE_TABLE: u16 = 1;
pub(super) const RULE_CHAIN: u16 = 2;
const RULE_EXPRESSIONS: u16 = 4;
const RULE_USERDATA: u16 = 7;
const COUNTER_BYTES: u16 = 1;
const COUNTER_PACKETS: u16 = 2;
const LOG_GROUP: u16 = 1;
const LOG_PREFIX: u16 = 2;
const IMMEDIATE_DREG: u16 = 1;
const IMMEDIATE_DATA: u16 = 2;
const VERDICT_CODE: u16 = 1;
const VERDICT_CHAIN: u16 = 2;
/// NFT_JUMP, (u32)-3.
const NFT_JUMP: u32 = 0xffff_fffd;
const REJECT_TYPE: u16 = 1;
const REJECT_ICMP_CODE: u16 = 2;
const REJECT_TCP_RST: u32 = 1;
const REJECT_ICMPX: u32 = 2;
const REJECT_ICMPX_ADMIN_PROHIBITED: u8 = 3;
const REDIR_REG_PROTO_MIN: u16 = 1;

impl Batch {
    pub(super) fn new_rule(&mut self, chain: &str, rule: &Rule) {
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
            self.encode_counter(c);
        }
        if let Some(log) = &rule.log {
            self.encode_log(log);
        }
        if let Some(v) = &rule.verdict {
            self.encode_verdict(v);
        }
        self.b.nest_end(list);
        if let Some(c) = &rule.comment {
            self.b
                .attr(RULE_USERDATA, &udata(UDATA_COMMENT, c.as_bytes(), true));
        }
        self.b.end();
    }
}

/// A rule message's chain name.
pub(super) fn rule_chain(payload: &[u8]) -> String {
    attrs(payload)
        .find(|(k, _)| *k == RULE_CHAIN)
        .map(|(_, v)| c_str(v))
        .unwrap_or_default()
}

pub(super) fn decode_rule(payload: &[u8]) -> Result<Rule> {
    let mut exprs = Vec::new();
    let mut comment = None;
    for (k, v) in attrs(payload) {
        match k {
            RULE_EXPRESSIONS => exprs.extend(attrs(v).map(|(_, elem)| Expr::parse(elem))),
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
    while let Some(e) = exprs.get(i) {
        if let Some((verdict, used)) = decode_daddr_vmap(&exprs[i..]) {
            rule.verdict = Some(verdict);
            i += used;
            continue;
        }
        if let Some(decoded) = decode_match(&exprs[i..], family) {
            let (m, used) = decoded.map_err(|what| foreign(&what))?;
            if let Match::NfProto(f) = &m {
                family = Some(*f);
            }
            rule.matches.push(m);
            i += used;
            continue;
        }
        i += match e.name.as_str() {
            "counter" => {
                rule.counter = Some(decode_counter(e));
                1
            }
            "log" => {
                rule.log = Some(decode_log(e));
                1
            }
            "immediate" | "reject" => {
                let (verdict, used) = decode_verdict(&exprs[i..]).map_err(foreign)?;
                rule.verdict = Some(verdict);
                used
            }
            other => {
                return Err(foreign(&format!(
                    "a {other} expression, which egret does not write"
                )))
            }
        };
    }
    Ok(rule)
}

impl Nftables {
    /// The live table's rules with their chains, or `None` when it has gone.
    pub(super) fn dump_rules(&mut self) -> Result<Option<Vec<(String, Rule)>>> {
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
            rules.push((rule_chain(&p), decode_rule(&p)?));
        }
        Ok(Some(rules))
    }
}

// `counter`

impl Batch {
    fn encode_counter(&mut self, c: &Counter) {
        self.expr("counter", |b| {
            b.attr_u64(COUNTER_BYTES, c.bytes);
            b.attr_u64(COUNTER_PACKETS, c.packets);
        });
    }
}

fn decode_counter(e: &Expr) -> Counter {
    Counter {
        packets: e.raw(COUNTER_PACKETS).and_then(be_u64).unwrap_or(0),
        bytes: e.raw(COUNTER_BYTES).and_then(be_u64).unwrap_or(0),
    }
}

// `log prefix "..." group N`

impl Batch {
    fn encode_log(&mut self, log: &Log) {
        self.expr("log", |b| {
            b.attr(LOG_GROUP, &log.group.to_be_bytes());
            b.attr_str(LOG_PREFIX, &log.prefix);
        });
    }
}

fn decode_log(e: &Expr) -> Log {
    let group = e
        .raw(LOG_GROUP)
        .and_then(|v| v.get(..2))
        .map(|v| u16::from_be_bytes([v[0], v[1]]))
        .unwrap_or(0);
    Log {
        group,
        prefix: e.string(LOG_PREFIX).unwrap_or_default(),
    }
}

// Verdicts: `accept`/`drop`/`jump CHAIN` (immediate into the verdict
// register), `reject ...`, and `redirect to :PORT` (the port loaded into a
// register, then redir).

impl Batch {
    fn encode_verdict(&mut self, v: &Verdict) {
        match v {
            Verdict::Accept => self.verdict_code(NF_ACCEPT, None),
            Verdict::Drop => self.verdict_code(NF_DROP, None),
            Verdict::Jump(chain) => self.verdict_code(NFT_JUMP, Some(chain)),
            Verdict::DaddrVmap(f, map) => self.encode_daddr_vmap(*f, map),
            Verdict::RejectTcpReset => self.expr("reject", |b| {
                b.attr_u32(REJECT_TYPE, REJECT_TCP_RST);
                b.attr(REJECT_ICMP_CODE, &[0]);
            }),
            Verdict::RejectAdminProhibited => self.expr("reject", |b| {
                b.attr_u32(REJECT_TYPE, REJECT_ICMPX);
                b.attr(REJECT_ICMP_CODE, &[REJECT_ICMPX_ADMIN_PROHIBITED]);
            }),
            Verdict::Redirect(port) => {
                self.expr("immediate", |b| {
                    b.attr_u32(IMMEDIATE_DREG, REG_1);
                    data_attr(b, IMMEDIATE_DATA, &port.to_be_bytes());
                });
                self.expr("redir", |b| b.attr_u32(REDIR_REG_PROTO_MIN, REG_1));
            }
        }
    }

    fn verdict_code(&mut self, code: u32, chain: Option<&str>) {
        self.expr("immediate", |b| {
            b.attr_u32(IMMEDIATE_DREG, REG_VERDICT);
            verdict_data(b, IMMEDIATE_DATA, code, chain);
        });
    }
}

/// Attribute `kind` holding a verdict (`NFTA_DATA_VERDICT`): an immediate's
/// data, or a verdict map element's.
fn verdict_data(b: &mut MsgBuilder, kind: u16, code: u32, chain: Option<&str>) {
    let data = b.nest(kind);
    let v = b.nest(DATA_VERDICT);
    b.attr_u32(VERDICT_CODE, code);
    if let Some(chain) = chain {
        b.attr_str(VERDICT_CHAIN, chain);
    }
    b.nest_end(v);
    b.nest_end(data);
}

/// The (code, chain) of a verdict attribute's value (`NFTA_DATA_*` nested).
fn decode_verdict_data(data: &[u8]) -> (Option<u32>, Option<String>) {
    let verdict = attrs(data)
        .find(|(k, _)| *k == DATA_VERDICT)
        .map(|(_, v)| v);
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
    (code, chain)
}

/// A verdict map element's data: `jump CHAIN`.
pub(super) fn encode_jump_data(b: &mut MsgBuilder, kind: u16, chain: &str) {
    verdict_data(b, kind, NFT_JUMP, Some(chain));
}

/// The chain a verdict map element jumps to; `None` for any other verdict
/// (which egret never writes, so the element reads back as changed).
pub(super) fn decode_jump_data(data: &[u8]) -> Option<String> {
    match decode_verdict_data(data) {
        (Some(NFT_JUMP), chain) => chain,
        _ => None,
    }
}

// `ip daddr vmap @map`: the destination loaded into a register, looked up in
// a verdict map whose data goes to the verdict register.

impl Batch {
    fn encode_daddr_vmap(&mut self, f: Family, map: &str) {
        let (offset, len) = super::matches::daddr(f);
        self.payload(PAYLOAD_NETWORK, offset, len, REG_1);
        self.lookup_verdict(map, REG_1);
    }
}

/// `None` when `x` does not start with a destination load into a verdict map.
fn decode_daddr_vmap(x: &[Expr]) -> Option<(Verdict, usize)> {
    let map = verdict_lookup_set(x.get(1))?;
    let e = &x[0];
    if !e.is("payload") || e.u32(PAYLOAD_BASE) != Some(PAYLOAD_NETWORK) {
        return None;
    }
    let at = e.u32(PAYLOAD_OFFSET).zip(e.u32(PAYLOAD_LEN));
    [Family::V4, Family::V6]
        .into_iter()
        .find(|f| at == Some(super::matches::daddr(*f)))
        .map(|f| (Verdict::DaddrVmap(f, map), 2))
}

/// The verdict starting at `x[0]` (an immediate or a reject) and how many
/// expressions it took.
fn decode_verdict(x: &[Expr]) -> std::result::Result<(Verdict, usize), &'static str> {
    let e = &x[0];
    if e.is("reject") {
        return match e.u32(REJECT_TYPE) {
            Some(REJECT_TCP_RST) => Ok((Verdict::RejectTcpReset, 1)),
            Some(REJECT_ICMPX) => Ok((Verdict::RejectAdminProhibited, 1)),
            _ => Err("a reject egret does not write"),
        };
    }
    if e.u32(IMMEDIATE_DREG) == Some(REG_1) && x.get(1).is_some_and(|n| n.is("redir")) {
        let port = e
            .raw(IMMEDIATE_DATA)
            .and_then(|d| attrs(d).find(|(k, _)| *k == DATA_VALUE).map(|(_, v)| v))
            .and_then(|v| Some(u16::from_be_bytes(v.get(..2)?.try_into().ok()?)))
            .ok_or("a redirect egret does not write")?;
        return Ok((Verdict::Redirect(port), 2));
    }
    let (code, chain) = e
        .raw(IMMEDIATE_DATA)
        .map(decode_verdict_data)
        .unwrap_or_default();
    match (code, chain) {
        (Some(NFT_JUMP), Some(chain)) => Ok((Verdict::Jump(chain), 1)),
        (Some(NF_ACCEPT), _) => Ok((Verdict::Accept, 1)),
        (Some(NF_DROP), _) => Ok((Verdict::Drop, 1)),
        _ => Err("a verdict egret does not write"),
    }
}
