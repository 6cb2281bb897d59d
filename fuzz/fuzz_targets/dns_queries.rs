//! The DNS guard's handling of what arrives on its socket and what upstream
//! answers: never a panic, whatever the bytes. The first byte splits the input
//! into a "query" and a "response" part.
#![no_main]

use egret::dns::message::{self, Incoming};
use egret::policy::{HostPattern, Refusal};
use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map(|&b| b as usize).unwrap_or(0).min(data.len());
    let (query, response) = data.split_at(split);
    let patterns = ["*.example.com", "s3.*.amazonaws.com", "deb.debian.org"]
        .map(|p| HostPattern::parse(p).expect("valid pattern"));
    match message::parse(query) {
        Incoming::Query(q) => {
            let _ = patterns.iter().any(|p| p.matches(&q.name));
            let _ = message::refusal(&q, Refusal::Refused);
            let _ = message::refusal(&q, Refusal::Nxdomain);
            let _ = message::server_failure(&q);
            if let Ok(r) = Message::from_vec(response) {
                let _ = message::answers(&q, &r);
                let _ = message::addresses(&r, &q.name);
                let _ = message::cache_ttl(&r);
                let _ = message::reply_for(&q, &r, u32::from(split as u8), q.udp_limit());
                let _ = message::reply_for(&q, &r, 0, 512);
            }
        }
        Incoming::Reply(r) => assert!(!r.is_empty()),
        Incoming::Ignore => {}
    }
});
