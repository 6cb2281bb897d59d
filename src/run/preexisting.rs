//! The `preexisting` event: a TCP connection that was open before egret's
//! first ruleset, let through once so it does not stall, which the policy
//! itself would not allow.

use std::time::SystemTime;

use serde_json::Value;

use crate::apply::Preexisting;
use crate::monitor::event::{self, Action};

pub const ACTION: &str = Action::Preexisting.as_str();

pub fn document(at: SystemTime, c: &Preexisting, host: &str) -> Value {
    let connection = event::ecs::PreexistingConnection {
        local: c.socket.flow.local,
        remote: c.socket.flow.remote,
        uid: c.socket.uid,
        listener: c.socket.listener,
        rule: &c.decision.rule,
        outcome: c.decision.outcome.as_str(),
        why: &c.decision.why,
        message: c.to_string(),
    };
    event::ecs::preexisting(at, connection, host)
}
