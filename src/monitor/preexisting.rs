//! The `preexisting` event: a TCP connection that was open before egret's
//! first ruleset, let through once so it does not stall, which the policy
//! itself would not allow.

use std::time::SystemTime;

use serde_json::{json, Value};

use crate::apply::Preexisting;
use crate::monitor::event::{self, Action};
use crate::policy::Severity;

pub const ACTION: &str = Action::Preexisting.as_str();

pub fn document(at: SystemTime, c: &Preexisting, host: &str) -> Value {
    let flow = &c.socket.flow;
    let mut doc = event::self_event(
        at,
        host,
        format!("{c}"),
        (
            "alert",
            "network",
            "connection",
            Some("success"),
            Action::Preexisting,
        ),
        Severity::High,
        json!({
            "rule": c.decision.rule,
            "outcome": c.decision.outcome.as_str(),
            "why": c.decision.why,
        }),
    );
    if let Some(o) = doc.as_object_mut() {
        o.insert(
            "source".into(),
            json!({ "ip": flow.local.ip().to_string(), "port": flow.local.port() }),
        );
        o.insert(
            "destination".into(),
            json!({ "ip": flow.remote.ip().to_string(), "port": flow.remote.port() }),
        );
        o.insert(
            "network".into(),
            json!({
                "transport": "tcp",
                "type": if flow.remote.is_ipv4() { "ipv4" } else { "ipv6" },
                "direction": "egress",
            }),
        );
        o.insert("user".into(), json!({ "id": c.socket.uid.to_string() }));
        // A listener on an unprivileged local port proves nothing (any user
        // may open one); the operator judges.
        if c.socket.listener {
            if let Some(e) = o.get_mut("egret").and_then(|e| e.as_object_mut()) {
                e.insert("source_port_listener".into(), json!(true));
            }
        }
    }
    doc
}
