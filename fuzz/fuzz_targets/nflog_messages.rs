//! Arbitrary bytes as an NFLOG receive buffer: splitting into netlink
//! messages, reading the attributes, the log prefix and the packet headers
//! must never panic, whatever the kernel (or an attacker-shaped packet) sends.
#![no_main]

use egret::kernel::netlink::messages;
use egret::kernel::nflog::parse_record;
use egret::monitor::nflog::LoggedVerdict;
use egret::monitor::packet;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    for msg in messages(data) {
        if let Some(rec) = parse_record(msg.payload) {
            let _ = LoggedVerdict::parse(rec.prefix);
            let _ = packet::decode(rec.payload);
        }
    }
    let _ = packet::decode(data);
    let _ = egret::kernel::sockets::parse_diag_msg(data);
});
