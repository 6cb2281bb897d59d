//! Tamper detection for `egret run`: any change to egret's table that egret
//! did not make. Two sources: nf_tables' change notifications
//! (`kernel::notify`), which name the committing process at once, and a
//! slower full comparison of the live table (rules, chains, sets and the
//! elements of static sets) with what egret loaded, the backstop for a lost
//! notification. A table egret cannot decode is tampering too.

use std::time::{Duration, Instant};

use serde_json::Value;
use tracing::warn;

use crate::kernel::nft::{NftError, Nftables};
use crate::kernel::notify::{ChangeListener, ForeignCommit};
use crate::ruleset::{Ruleset, Set};

/// How often the whole table is compared (reads every static set's elements).
const FULL_CHECK_EVERY: Duration = Duration::from_secs(10);

/// A change egret did not make.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    pub deleted: bool,
    /// The committing process (pid, name), when a notification named it.
    pub by: Option<(Option<u32>, Option<String>)>,
    pub changes: Vec<String>,
    /// Someone else added addresses to a DNS guard set.
    pub host_sets: bool,
}

impl Found {
    pub fn what(&self) -> &'static str {
        if self.deleted {
            "deleted"
        } else {
            "changed"
        }
    }

    fn merge(&mut self, other: Found) {
        self.deleted |= other.deleted;
        self.host_sets |= other.host_sets;
        if self.by.is_none() {
            self.by = other.by;
        }
        for c in other.changes {
            if self.changes.len() < 32 && !self.changes.contains(&c) {
                self.changes.push(c);
            }
        }
    }

    fn from_commit(c: ForeignCommit) -> Found {
        let mut changes = c.changes;
        if c.more > 0 {
            changes.push(format!("{} more change(s)", c.more));
        }
        Found {
            deleted: c.deleted,
            host_sets: c.host_sets,
            by: Some((c.pid, c.process)),
            changes,
        }
    }
}

pub struct TamperWatch {
    listener: Option<ChangeListener>,
    expected: Ruleset,
    last_full: Instant,
    /// A notification was lost: compare the whole table at the next chance.
    full_due: bool,
    /// A reported change is still live (not restored): not a new occurrence.
    standing: bool,
}

impl TamperWatch {
    pub fn new(loaded: &Ruleset) -> TamperWatch {
        let listener = match ChangeListener::open() {
            Ok(l) => Some(l),
            Err(e) => {
                warn!("nf_tables change notifications are unavailable ({e}); tampering is found by polling only, without the committing process");
                None
            }
        };
        TamperWatch {
            listener,
            expected: normalized(loaded.clone()),
            last_full: Instant::now(),
            full_due: false,
            standing: false,
        }
    }

    /// What egret just loaded (after each of its own transactions).
    pub fn expect(&mut self, loaded: &Ruleset) {
        self.expected = normalized(loaded.clone());
        self.standing = false;
    }

    /// egret replaced the elements of these static sets, and nothing else.
    pub fn expect_elements(&mut self, sets: &[&Set]) {
        for set in sets {
            if let Some(e) = self.expected.sets.iter_mut().find(|e| e.name == set.name) {
                e.elements = set.elements.clone();
                e.elements.sort();
            }
        }
        self.standing = false;
    }

    pub fn standing(&self) -> bool {
        self.standing
    }

    pub fn set_standing(&mut self, standing: bool) {
        self.standing = standing;
    }

    /// Transactions of other processes that changed egret's table since the
    /// last call, folded into one finding.
    pub fn notified(&mut self) -> Option<Found> {
        let n = self.listener.as_mut()?.poll();
        if n.overrun {
            self.full_due = true;
        }
        n.foreign
            .into_iter()
            .map(Found::from_commit)
            .reduce(|mut a, b| {
                a.merge(b);
                a
            })
    }

    /// The whole live table against what egret loaded, when due (or `force`).
    pub fn compare(&mut self, nft: &mut Nftables, force: bool) -> Option<Found> {
        if !force && !self.full_due && self.last_full.elapsed() < FULL_CHECK_EVERY {
            return None;
        }
        self.last_full = Instant::now();
        self.full_due = false;
        match nft.read() {
            Ok(None) => Some(Found {
                deleted: true,
                ..Found::default()
            }),
            Ok(Some(live)) => {
                let live = normalized(live);
                let changes = differences(&self.expected, &live);
                if changes.is_empty() {
                    self.standing = false;
                }
                (!changes.is_empty()).then_some(Found {
                    changes,
                    ..Found::default()
                })
            }
            Err(NftError::Foreign(what)) => Some(Found {
                changes: vec![format!("egret cannot decode the table: {what}")],
                ..Found::default()
            }),
            Err(e) => {
                warn!("reading egret's table to compare it: {e}");
                None
            }
        }
    }
}

/// Counters zeroed, chains and sets in name order, elements sorted (what
/// egret loads and what it reads back then compare equal).
fn normalized(mut rs: Ruleset) -> Ruleset {
    for chain in &mut rs.chains {
        for rule in &mut chain.rules {
            if rule.counter.is_some() {
                rule.counter = Some(crate::ruleset::Counter::default());
            }
        }
    }
    rs.chains.sort_by(|a, b| a.name.cmp(&b.name));
    for set in &mut rs.sets {
        set.size = None;
        if set.timeout {
            // Run-time state (the DNS guard's addresses), not policy.
            set.elements.clear();
        }
        set.elements.sort();
    }
    rs.sets.sort_by(|a, b| a.name.cmp(&b.name));
    rs
}

fn differences(expected: &Ruleset, live: &Ruleset) -> Vec<String> {
    let mut out = Vec::new();
    if expected.comment != live.comment {
        out.push("table comment changed".to_string());
    }
    for set in &live.sets {
        match expected.sets.iter().find(|s| s.name == set.name) {
            None => out.push(format!("set {} added", set.name)),
            Some(e)
                if e.key != set.key || e.interval != set.interval || e.timeout != set.timeout =>
            {
                out.push(format!("set {} changed (key or flags)", set.name))
            }
            Some(e) if e.elements != set.elements => {
                // Both sorted (`normalized`): a linear scan per element was
                // quadratic, seconds per comparison for a 100k-entry set.
                let added = set
                    .elements
                    .iter()
                    .filter(|x| e.elements.binary_search(x).is_err())
                    .count();
                let removed = e
                    .elements
                    .iter()
                    .filter(|x| set.elements.binary_search(x).is_err())
                    .count();
                out.push(format!(
                    "set {}: {added} element(s) added, {removed} removed",
                    set.name
                ));
            }
            Some(_) => {}
        }
    }
    for set in &expected.sets {
        if !live.sets.iter().any(|s| s.name == set.name) {
            out.push(format!("set {} deleted", set.name));
        }
    }
    for chain in &live.chains {
        match expected.chains.iter().find(|c| c.name == chain.name) {
            None => out.push(format!("chain {} added", chain.name)),
            Some(e) if e.base != chain.base => out.push(format!(
                "chain {} changed (hook, priority or policy)",
                chain.name
            )),
            Some(e) if e.rules != chain.rules => {
                out.push(format!("rules of chain {} changed", chain.name))
            }
            Some(_) => {}
        }
    }
    for chain in &expected.chains {
        if !live.chains.iter().any(|c| c.name == chain.name) {
            out.push(format!("chain {} deleted", chain.name));
        }
    }
    out
}

/// Adds who committed the change and what changed to a tamper document.
pub fn annotate(doc: &mut Value, found: &Found) {
    crate::monitor::event::ecs::annotate_tamper(doc, found.by.as_ref(), &found.changes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ruleset::{Element, Field};

    fn set(name: &str, elements: Vec<u128>) -> Set {
        Set {
            name: name.into(),
            key: vec![Field::Ipv4],
            interval: false,
            timeout: false,
            size: None,
            verdict_map: false,
            elements: elements
                .into_iter()
                .map(|v| Element::range(vec![v], None))
                .collect(),
        }
    }

    #[test]
    fn an_element_added_to_a_static_set_is_a_difference() {
        let expected = Ruleset {
            comment: "c".into(),
            sets: vec![set("a_web_v4", vec![1])],
            chains: vec![],
        };
        let live = Ruleset {
            sets: vec![set("a_web_v4", vec![1, 2])],
            ..expected.clone()
        };
        assert_eq!(
            differences(&normalized(expected.clone()), &normalized(live)),
            vec!["set a_web_v4: 1 element(s) added, 0 removed".to_string()]
        );
        assert!(differences(&normalized(expected.clone()), &normalized(expected)).is_empty());
    }

    #[test]
    fn the_committer_is_named() {
        let mut doc =
            serde_json::json!({"message": "egret's table was changed outside egret", "egret": {}});
        annotate(
            &mut doc,
            &Found {
                deleted: false,
                by: Some((Some(42), Some("nft".into()))),
                changes: vec!["rule added to chain output".into()],
                host_sets: false,
            },
        );
        assert_eq!(doc["process"]["pid"], 42);
        assert_eq!(doc["process"]["name"], "nft");
        assert_eq!(doc["egret"]["changes"][0], "rule added to chain output");
        assert!(doc["message"].as_str().unwrap().contains("nft, pid 42"));
    }
}
