//! What the evaluator-against-the-kernel tests share: a replayable random
//! source, the kernel's per-rule counters, and which counter a decision of
//! `egret::audit::evaluate` lands on.

use super::Netns;
use egret::audit::evaluate::{Decision, Outcome};
use egret::policy::{Mode, Policy};

/// A small deterministic generator (xorshift), so a failure replays.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next() % items.len() as u64) as usize]
    }
    pub fn some<T: Clone>(&mut self, items: &[T]) -> Vec<T> {
        items
            .iter()
            .filter(|_| self.next() % 2 == 0)
            .cloned()
            .collect()
    }
}

/// Per-rule packet counters from `egret status --json`, by rule comment.
pub fn rule_counters(ns: &Netns) -> std::collections::HashMap<String, u64> {
    let mut out = std::collections::HashMap::new();
    for r in ns.status_json()["rules"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        *out.entry(r["rule"].as_str().unwrap_or("").to_string())
            .or_insert(0) += r["packets"].as_u64().unwrap_or(0);
    }
    out
}

/// The comment of the kernel rule that decides as `decision` says, to read
/// its counter (the comments src/ruleset/compile.rs gives its rules).
pub fn kernel_comment(policy: &Policy, decision: &Decision) -> String {
    match decision.rule.as_str() {
        "default" => match policy.mode {
            Mode::Audit => "audit: log what would be blocked".into(),
            Mode::Enforce => "enforce: block and log the rest".into(),
        },
        rule if decision.outcome != Outcome::Allowed => {
            let mode = if decision.outcome == Outcome::Blocked {
                "enforce"
            } else {
                "audit"
            };
            format!("{rule}: {mode} mode for its subject")
        }
        rule => rule.to_string(),
    }
}
