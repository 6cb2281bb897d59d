//! What the guard reads from and writes to DNS messages. Pure, on top of
//! hickory-proto (no hand-written wire parsing), and fuzzed (`fuzz/`).

use std::net::IpAddr;

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use hickory_proto::serialize::binary::BinDecodable;

use crate::policy::Refusal;

/// Longest CNAME chain the guard follows (resolvers stop at about 8-16).
const MAX_CNAME_CHAIN: usize = 16;
/// Without EDNS a UDP reply may be 512 bytes.
const CLASSIC_UDP_PAYLOAD: usize = 512;

/// A query the guard will act on.
#[derive(Debug, Clone)]
pub struct Query {
    pub message: Message,
    /// The question name in wire form: ASCII, lower case, no trailing dot.
    pub name: String,
    pub qtype: RecordType,
}

impl Query {
    /// The largest UDP reply this client accepts.
    pub fn udp_limit(&self) -> usize {
        self.message
            .extensions()
            .as_ref()
            .map(|e| (e.max_payload() as usize).max(CLASSIC_UDP_PAYLOAD))
            .unwrap_or(CLASSIC_UDP_PAYLOAD)
    }
}

/// What to do with a datagram that arrived on the guard's socket.
#[derive(Debug)]
pub enum Incoming {
    Query(Box<Query>),
    /// Not a query we can act on; send this reply (FORMERR, NOTIMP).
    Reply(Vec<u8>),
    /// Not worth an answer (a response, or too short to carry an id).
    Ignore,
}

/// Name in the guard's canonical form (see [`Query::name`]).
pub fn wire_name(name: &Name) -> String {
    let mut s = name.to_ascii();
    if s.ends_with('.') {
        s.pop();
    }
    s.make_ascii_lowercase();
    s
}

pub fn parse(bytes: &[u8]) -> Incoming {
    let message = match Message::from_vec(bytes) {
        Ok(m) => m,
        Err(_) => {
            // Answer FORMERR when at least the header is readable.
            return match Header::from_bytes(bytes.get(..12).unwrap_or(&[])) {
                Ok(h) if h.message_type() == MessageType::Query => {
                    Incoming::Reply(error_reply(h.id(), h.op_code(), ResponseCode::FormErr))
                }
                _ => Incoming::Ignore,
            };
        }
    };
    if message.message_type() != MessageType::Query {
        return Incoming::Ignore;
    }
    if message.op_code() != OpCode::Query {
        return Incoming::Reply(error_reply(
            message.id(),
            message.op_code(),
            ResponseCode::NotImp,
        ));
    }
    let [q] = message.queries() else {
        return Incoming::Reply(error_reply(
            message.id(),
            message.op_code(),
            ResponseCode::FormErr,
        ));
    };
    let name = wire_name(q.name());
    let qtype = q.query_type();
    Incoming::Query(Box::new(Query {
        message,
        name,
        qtype,
    }))
}

fn error_reply(id: u16, op: OpCode, code: ResponseCode) -> Vec<u8> {
    Message::error_msg(id, op, code)
        .to_vec()
        .unwrap_or_default()
}

/// The answer for a name no rule allows.
pub fn refusal(query: &Query, refusal: Refusal) -> Vec<u8> {
    let code = match refusal {
        Refusal::Refused => ResponseCode::Refused,
        Refusal::Nxdomain => ResponseCode::NXDomain,
    };
    let mut m = reply_skeleton(&query.message);
    m.set_response_code(code);
    m.to_vec().unwrap_or_default()
}

/// SERVFAIL: no upstream answered.
pub fn server_failure(query: &Query) -> Vec<u8> {
    let mut m = reply_skeleton(&query.message);
    m.set_response_code(ResponseCode::ServFail);
    m.to_vec().unwrap_or_default()
}

fn reply_skeleton(q: &Message) -> Message {
    let mut m = Message::new();
    m.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_op_code(q.op_code())
        .set_recursion_desired(q.recursion_desired())
        .set_recursion_available(true)
        .set_checking_disabled(q.checking_disabled());
    m.add_queries(q.queries().iter().cloned());
    if q.extensions().is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        m.set_edns(edns);
    }
    m
}

/// Is `response` an answer to `query`'s question? (The caller checks the
/// id: upstream queries carry their own.)
pub fn answers(query: &Query, response: &Message) -> bool {
    response.message_type() == MessageType::Response
        && response.queries().len() == 1
        && wire_name(response.queries()[0].name()) == query.name
        && response.queries()[0].query_type() == query.qtype
}

/// Addresses the answer gives for `name`, following its CNAME chain, each
/// with the smallest TTL along the way (an address is only as fresh as the
/// aliases that led to it).
pub fn addresses(response: &Message, name: &str) -> Vec<(IpAddr, u32)> {
    let mut out = Vec::new();
    let mut current = name.to_string();
    let mut chain_ttl = u32::MAX;
    for _ in 0..MAX_CNAME_CHAIN {
        let mut next = None;
        for r in response.answers() {
            if wire_name(r.name()) != current {
                continue;
            }
            let ttl = r.ttl().min(chain_ttl);
            match r.data() {
                RData::A(a) => out.push((IpAddr::V4(a.0), ttl)),
                RData::AAAA(a) => out.push((IpAddr::V6(a.0), ttl)),
                RData::CNAME(c) if next.is_none() => next = Some((wire_name(&c.0), r.ttl())),
                _ => {}
            }
        }
        match next {
            Some((target, ttl)) if target != current => {
                current = target;
                chain_ttl = chain_ttl.min(ttl);
            }
            _ => break,
        }
    }
    out.sort();
    out.dedup_by(|a, b| a.0 == b.0);
    out
}

/// How long a response may be cached: the smallest answer TTL, or for an
/// answer without records the SOA's negative TTL (RFC 2308), capped.
pub fn cache_ttl(response: &Message) -> u32 {
    const MAX_NEGATIVE: u32 = 300;
    match response.response_code() {
        ResponseCode::NoError | ResponseCode::NXDomain => {}
        _ => return 0,
    }
    if let Some(min) = response.answers().iter().map(|r| r.ttl()).min() {
        return min;
    }
    response
        .name_servers()
        .iter()
        .find_map(|r| match r.data() {
            RData::SOA(soa) => Some(r.ttl().min(soa.minimum()).min(MAX_NEGATIVE)),
            _ => None,
        })
        .unwrap_or(0)
}

/// `response` for `query`: its id, TTLs lowered by `age` seconds, EDNS only
/// if the client used it, and truncated (TC, no records) past `limit` bytes.
pub fn reply_for(query: &Query, response: &Message, age: u32, limit: usize) -> Vec<u8> {
    let mut m = response.clone();
    m.set_id(query.message.id());
    // Echo the question exactly as asked: resolvers that randomise its case
    // (0x20) check it, and the cache is shared between spellings.
    *m.queries_mut() = query.message.queries().to_vec();
    m.set_recursion_desired(query.message.recursion_desired());
    if age > 0 {
        for r in m.answers_mut().iter_mut() {
            let ttl = r.ttl().saturating_sub(age);
            r.set_ttl(ttl);
        }
        for r in m.name_servers_mut().iter_mut() {
            let ttl = r.ttl().saturating_sub(age);
            r.set_ttl(ttl);
        }
    }
    if query.message.extensions().is_none() {
        *m.extensions_mut() = None;
    }
    let bytes = m.to_vec().unwrap_or_default();
    if bytes.len() <= limit {
        return bytes;
    }
    let mut t = reply_skeleton(&query.message);
    t.set_response_code(response.response_code());
    t.set_truncated(true);
    t.to_vec().unwrap_or_default()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use hickory_proto::op::Query as Question;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME, SOA};
    use hickory_proto::rr::Record;
    use std::str::FromStr;

    pub fn query_bytes(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(id).set_recursion_desired(true);
        m.add_query(Question::query(Name::from_str(name).unwrap(), qtype));
        m.to_vec().unwrap()
    }

    fn query(name: &str) -> Query {
        match parse(&query_bytes(7, name, RecordType::A)) {
            Incoming::Query(q) => *q,
            other => panic!("{other:?}"),
        }
    }

    fn record(name: &str, ttl: u32, data: RData) -> Record {
        Record::from_rdata(Name::from_str(name).unwrap(), ttl, data)
    }

    fn response(q: &Query, answers: Vec<Record>) -> Message {
        let mut m = reply_skeleton(&q.message);
        m.add_answers(answers);
        m
    }

    #[test]
    fn queries_are_parsed_to_the_wire_name() {
        let q = query("WWW.Example.COM.");
        assert_eq!(q.name, "www.example.com");
        assert_eq!(q.qtype, RecordType::A);
        assert_eq!(q.udp_limit(), 512);
    }

    #[test]
    fn garbage_gets_formerr_or_nothing() {
        assert!(matches!(parse(&[]), Incoming::Ignore));
        assert!(matches!(parse(&[1, 2, 3]), Incoming::Ignore));
        let mut bad = query_bytes(0x4242, "a.example", RecordType::A);
        bad.truncate(15);
        let Incoming::Reply(r) = parse(&bad) else {
            panic!()
        };
        let m = Message::from_vec(&r).unwrap();
        assert_eq!((m.id(), m.response_code()), (0x4242, ResponseCode::FormErr));
        // A response arriving at the guard is never answered (no loops).
        let q = query("a.example");
        let resp = response(&q, vec![]).to_vec().unwrap();
        assert!(matches!(parse(&resp), Incoming::Ignore));
    }

    #[test]
    fn refusal_keeps_id_and_question() {
        let q = query("evil.example");
        for (how, code) in [
            (Refusal::Refused, ResponseCode::Refused),
            (Refusal::Nxdomain, ResponseCode::NXDomain),
        ] {
            let m = Message::from_vec(&refusal(&q, how)).unwrap();
            assert_eq!(m.id(), 7);
            assert_eq!(m.response_code(), code);
            assert_eq!(wire_name(m.queries()[0].name()), "evil.example");
            assert!(m.answers().is_empty());
        }
    }

    #[test]
    fn addresses_follow_the_cname_chain_with_the_smallest_ttl() {
        let q = query("www.allowed.test");
        let m = response(
            &q,
            vec![
                record(
                    "www.allowed.test.",
                    30,
                    RData::CNAME(CNAME(Name::from_str("edge.cdn.test.").unwrap())),
                ),
                record("edge.cdn.test.", 300, RData::A(A::new(10, 0, 0, 1))),
                record(
                    "edge.cdn.test.",
                    20,
                    RData::AAAA(AAAA::from_str("2001:db8::1").unwrap()),
                ),
                // Not on the chain: ignored.
                record("other.test.", 300, RData::A(A::new(10, 0, 0, 99))),
            ],
        );
        assert_eq!(
            addresses(&m, &q.name),
            vec![
                ("10.0.0.1".parse().unwrap(), 30),
                ("2001:db8::1".parse().unwrap(), 20)
            ]
        );
        assert!(answers(&q, &m));
        assert_eq!(cache_ttl(&m), 20);
    }

    #[test]
    fn a_cname_loop_ends() {
        let q = query("a.test");
        let cname = |from: &str, to: &str| {
            record(from, 60, RData::CNAME(CNAME(Name::from_str(to).unwrap())))
        };
        let m = response(
            &q,
            vec![cname("a.test.", "b.test."), cname("b.test.", "a.test.")],
        );
        assert!(addresses(&m, "a.test").is_empty());
    }

    #[test]
    fn negative_answers_are_cached_for_the_soa_minimum() {
        let q = query("nothing.test");
        let mut m = response(&q, vec![]);
        m.set_response_code(ResponseCode::NXDomain);
        let soa = SOA::new(
            Name::from_str("test.").unwrap(),
            Name::from_str("admin.test.").unwrap(),
            1,
            3600,
            600,
            86400,
            42,
        );
        m.add_name_server(record("test.", 3600, RData::SOA(soa)));
        assert_eq!(cache_ttl(&m), 42);
        m.set_response_code(ResponseCode::ServFail);
        assert_eq!(cache_ttl(&m), 0);
    }

    #[test]
    fn replies_age_their_ttls_and_truncate_past_the_limit() {
        let q = query("many.test");
        let answers: Vec<Record> = (0..60)
            .map(|i| record("many.test.", 100, RData::A(A::new(10, 0, 0, i))))
            .collect();
        let m = response(&q, answers);
        let r = Message::from_vec(&reply_for(&q, &m, 40, 65535)).unwrap();
        assert_eq!(r.answers().len(), 60);
        assert!(r.answers().iter().all(|a| a.ttl() == 60));
        let t = Message::from_vec(&reply_for(&q, &m, 0, 512)).unwrap();
        assert!(t.truncated() && t.answers().is_empty());
        assert_eq!(t.id(), 7);
    }
}
