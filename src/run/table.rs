//! egret's table as loaded, and changes to it egret did not make: reported
//! once per occurrence and, with `restore_table`, undone by loading the
//! policy again.

use std::collections::BTreeSet;
use std::time::SystemTime;

use anyhow::{Context, Result};
use tracing::{info, warn};

use super::main_loop::Daemon;
use super::publish::Route;
use crate::apply;
use crate::monitor::event;
use crate::monitor::tamper::{Found, TamperWatch};
use crate::ruleset::{Rule, Ruleset, Set};

/// What egret loaded: what the live table must show.
pub(super) struct Loaded {
    /// The rules, counters zeroed (`Ruleset::listed_rules`).
    pub expected: Vec<(String, Rule)>,
    /// The sets: shape and element count (0 for timeout sets, read live).
    pub sets: Vec<(Set, u64)>,
    /// Changes to the table egret did not make (notifications, full comparison).
    pub watch: TamperWatch,
    pub tamper_reported: bool,
    /// The sockets egret's table seeds: every later compile (reload,
    /// restore, units) keeps those still open and adds nothing.
    pub seeded: BTreeSet<apply::SeededSocket>,
}

impl Loaded {
    pub fn new(rs: &Ruleset) -> Loaded {
        Loaded {
            expected: rs.listed_rules(),
            sets: set_sizes(rs),
            watch: TamperWatch::new(rs),
            tamper_reported: false,
            seeded: seeded_sockets(rs),
        }
    }

    /// `rs` replaced the loaded ruleset.
    pub fn loaded(&mut self, rs: &Ruleset) {
        self.sets = set_sizes(rs);
        self.expected = rs.listed_rules();
        self.watch.expect(rs);
        self.seeded = seeded_sockets(rs);
    }
}

/// What `rs` seeds, to keep across later loads. Unknown (sock_diag failed):
/// nothing, so a later load seeds nothing rather than anything new.
fn seeded_sockets(rs: &Ruleset) -> BTreeSet<apply::SeededSocket> {
    apply::seeded_sockets(rs).unwrap_or_else(|e| {
        warn!("remembering the seeded connections: {e:#}; later loads seed none");
        Default::default()
    })
}

/// Element counts of a compiled ruleset's sets (timeout sets are counted live).
pub(super) fn set_sizes(rs: &Ruleset) -> Vec<(Set, u64)> {
    rs.sets
        .iter()
        .map(|s| {
            let shape = Set {
                elements: Vec::new(),
                ..s.clone()
            };
            (shape, s.elements.len() as u64)
        })
        .collect()
}

impl Daemon {
    /// The live rules (read with the counters) against what egret loaded.
    pub fn check_rules(&mut self, live: Vec<(String, Rule)>) {
        if crate::ruleset::uncounted(live) != self.table.expected {
            self.tampered("changed", None);
        } else if !self.table.watch.standing() {
            self.table.tamper_reported = false;
        }
    }

    /// Another process's transaction on egret's table (a new occurrence,
    /// reported even while an earlier one stands), or a difference the full
    /// comparison found.
    pub fn watch_table(&mut self) {
        if let Some(found) = self.table.watch.notified() {
            self.table.tamper_reported = false;
            self.tampered(found.what(), Some(found));
        } else if let Some(found) = self.table.watch.compare(&mut self.nft, false) {
            self.tampered(found.what(), Some(found));
        }
    }

    /// egret's table was deleted or changed by something else: report it
    /// (once per occurrence) and, with `restore_table`, load the policy again.
    pub fn tampered(&mut self, what: &str, found: Option<Found>) {
        // A change found by polling: its notification names who made it.
        // Another process's transaction is a new occurrence, even while an
        // earlier change stands.
        let notified = self.table.watch.notified();
        if notified.is_some() {
            self.table.tamper_reported = false;
        }
        let found = match (found, notified) {
            (Some(mut f), Some(n)) => {
                f.by = f.by.or(n.by);
                f.changes.extend(n.changes);
                Some(f)
            }
            (f, n) => f.or(n),
        };
        let restore = self.policy.restore_table;
        if !self.table.tamper_reported {
            warn!(
                "egret's table was {what} outside egret{}",
                if restore { "; restoring it" } else { "" }
            );
        }
        // Addresses someone else put in the DNS guard's sets must not be
        // carried into the restored table; the guard re-adds what it resolves.
        let carry = !found.as_ref().is_some_and(|f| f.host_sets);
        let restored = restore && {
            match self.restore(carry) {
                Ok(()) => true,
                Err(e) => {
                    warn!("restoring egret's table: {e:#}");
                    false
                }
            }
        };
        if self.table.tamper_reported && !restored {
            return;
        }
        let now = SystemTime::now();
        let mut doc = event::tamper(now, what, restored, &self.host);
        if let Some(f) = &found {
            crate::monitor::tamper::annotate(&mut doc, f);
        }
        let route = Route::event(self.agg.reserve_id(), "tamper", now, 1);
        self.outlet.publish(&mut self.store, doc, route);
        // Once restored, a new change is a new occurrence.
        self.table.tamper_reported = !restored;
        self.table.watch.set_standing(!restored);
    }

    /// Loads the policy again (with the current unit cgroups).
    fn restore(&mut self, carry: bool) -> Result<()> {
        // Never a first load, though the table may be gone: only what egret
        // seeded before and is still open.
        let (rs, preexisting) = apply::compile_seeded(
            &self.policy,
            self.units.clone(),
            apply::Seeds::Kept(&self.table.seeded),
        )?;
        let nft = &mut self.nft;
        let mut swap = || {
            nft.apply_carrying(&rs, carry)
                .context("restoring the ruleset")
        };
        match &self.services.guard {
            Some(g) => g.swap(None, swap)?,
            None => swap()?,
        }
        let counts = self.books.counts();
        self.books
            .accounting
            .retire_vanished(self.books.last_live, counts);
        self.books.last_live = 0;
        self.table.loaded(&rs);
        info!("egret's table restored from the policy");
        self.report_preexisting(&preexisting);
        Ok(())
    }

    /// Connections seeded because they predate egret's table, which the
    /// policy would not allow.
    pub fn report_preexisting(&mut self, list: &[apply::Preexisting]) {
        for c in list {
            warn!("{c}");
            let now = SystemTime::now();
            let doc = super::preexisting::document(now, c, &self.host);
            let route = Route {
                flush: false,
                ..Route::event(self.agg.reserve_id(), super::preexisting::ACTION, now, 1)
            };
            self.outlet.publish(&mut self.store, doc, route);
        }
        self.outlet.flush();
    }
}
