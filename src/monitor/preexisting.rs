//! The `preexisting` event: a TCP connection that was open before egret's
//! first ruleset, let through once so it does not stall, which the policy
//! itself would not allow.

use std::time::SystemTime;

use serde_json::{json, Value};

use crate::apply::Preexisting;
use crate::monitor::event;
use crate::policy::Severity;

pub const ACTION: &str = "preexisting";

pub fn document(at: SystemTime, c: &Preexisting, host: &str) -> Value {
    let flow = &c.socket.flow;
    let mut doc = json!({
        "@timestamp": event::timestamp(at),
        "message": format!("{c}"),
        "event": {
            "kind": "alert",
            "category": ["network"],
            "type": ["connection"],
            "action": ACTION,
            "module": "egret",
            "dataset": "egret.egress",
        },
        "host": { "hostname": host },
        "source": { "ip": flow.local.ip().to_string(), "port": flow.local.port() },
        "destination": { "ip": flow.remote.ip().to_string(), "port": flow.remote.port() },
        "network": {
            "transport": "tcp",
            "type": if flow.remote.is_ipv4() { "ipv4" } else { "ipv6" },
            "direction": "egress",
        },
        "user": { "id": c.socket.uid.to_string() },
        "egret": {
            "rule": c.decision.rule,
            "outcome": c.decision.outcome.as_str(),
            "why": c.decision.why,
        },
    });
    event::set_severity(&mut doc, Severity::High);
    doc
}
