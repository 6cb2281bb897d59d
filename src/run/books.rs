//! The books of `egret run`: the kernel's log counters against what was
//! received, data-loss events, the books in the store (`egret status`), the
//! heartbeat and the metrics' set sizes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tracing::warn;

use super::main_loop::Daemon;
use super::publish::Route;
use crate::dns::GuardStats;
use crate::monitor::accounting::{Accounting, ReaderCounts};
use crate::monitor::books::{AttributionCounts, DaemonBooks, GuardCounts, ProxyCounts};
use crate::monitor::event::{self, LossFigures};
use crate::monitor::flood::Dropped;
use crate::monitor::nflog::NflogStats;
use crate::proxy::ProxyStats;

/// data-loss events are rate-limited to one per this interval.
const LOSS_EVENT_EVERY: Duration = Duration::from_secs(60);

pub(super) struct Books {
    pub accounting: Accounting,
    /// The NFLOG reader's counts.
    stats: Arc<NflogStats>,
    /// Reports of the guard and the proxy that found the pipeline full.
    dropped: Arc<Dropped>,
    /// The NFLOG reader has stopped: nothing logged is in flight any more.
    pub reader_stopped: bool,
    epoch: Instant,
    /// The last reading of the log rules' counters.
    pub last_live: u64,
    reported_lost: u64,
    last_loss_event: Option<Instant>,
    /// Reloads that replaced the policy, for the stored books.
    pub reloads: u64,
    /// Unit-cgroup swaps, for the stored books.
    pub unit_changes: u64,
}

impl Books {
    pub fn new(
        accounting: Accounting,
        stats: Arc<NflogStats>,
        dropped: Arc<Dropped>,
        epoch: Instant,
    ) -> Books {
        Books {
            accounting,
            stats,
            dropped,
            reader_stopped: false,
            epoch,
            last_live: 0,
            reported_lost: 0,
            last_loss_event: None,
            reloads: 0,
            unit_changes: 0,
        }
    }

    pub fn counts(&self) -> ReaderCounts {
        ReaderCounts {
            received: self.stats.received.load(Ordering::Relaxed),
            seq_lost: self.stats.seq_lost.load(Ordering::Relaxed),
            enobufs: self.stats.enobufs.load(Ordering::Relaxed),
            drained_at_ms: self.stats.drained_at_ms.load(Ordering::Relaxed),
            dns_dropped: self.dropped.dns.load(Ordering::Relaxed),
            proxy_dropped: self.dropped.proxy.load(Ordering::Relaxed),
        }
    }

    pub fn figures(&self) -> LossFigures {
        self.accounting.figures(self.counts())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

impl Daemon {
    /// Reads the log rules' counters (and checks the rules: a reading that
    /// differs from what egret loaded is tampering), then reports new loss.
    pub fn account(&mut self) {
        match self.nft.live_rules() {
            Ok(Some(rules)) => {
                let live = crate::kernel::nft::logged_total(&rules);
                self.services
                    .metrics
                    .set_novelty_overflow(crate::kernel::nft::novelty_overflow(&rules));
                let (now_ms, counts) = (self.books.now_ms(), self.books.counts());
                if self.books.reader_stopped {
                    self.books.accounting.final_reading(live, counts);
                } else {
                    self.books.accounting.kernel_reading(live, now_ms, counts);
                }
                self.books.last_live = live;
                self.write_books();
                self.check_rules(rules);
            }
            Ok(None) => self.tampered("deleted", None),
            // A rule egret cannot decode is one it did not write.
            Err(crate::kernel::nft::NftError::Foreign(what)) => {
                let found = crate::monitor::tamper::Found {
                    changes: vec![format!("egret cannot decode the table: {what}")],
                    ..Default::default()
                };
                self.tampered("changed", Some(found));
            }
            Err(e) => warn!("reading egret's log counters: {e}"),
        }
        let figures = self.books.figures();
        self.services.metrics.books(figures, self.agg.open_count());
        let lost = figures.lost();
        let may_report = self
            .books
            .last_loss_event
            .map_or(true, |t| t.elapsed() >= LOSS_EVENT_EVERY);
        if lost > self.books.reported_lost && may_report {
            let now = SystemTime::now();
            let delta = lost - self.books.reported_lost;
            let doc = event::data_loss(now, delta, &figures, &self.host);
            warn!(
                lost = delta,
                total = lost,
                "reports were lost (see `egret status`)"
            );
            let route = Route::event(self.agg.reserve_id(), "data-loss", now, delta);
            self.outlet.publish(&mut self.store, doc, route);
            self.books.reported_lost = lost;
            self.books.last_loss_event = Some(Instant::now());
        }
    }

    /// Stores the books for `egret status`, with the last reading of the
    /// log counters.
    pub fn write_books(&mut self) {
        let figures = self.books.figures();
        let a = self.attributor.stats;
        let metrics = &self.services.metrics;
        let books = DaemonBooks {
            pid: std::process::id(),
            updated_at: event::timestamp(SystemTime::now()),
            loss: figures,
            open_incidents: self.agg.open_count(),
            attribution: AttributionCounts {
                cache_hits: a.cache_hits,
                deep_lookups: a.deep_lookups,
                rate_limited: a.rate_limited,
            },
            // From the metrics' handles: the final books, written after
            // the guard and the proxy stopped, still carry their counts.
            dns_guard: metrics.guard.get().map(|g| guard_counts(g)),
            proxy: metrics.proxy.get().map(|p| proxy_counts(p)),
            reloads: self.books.reloads,
            unit_changes: self.books.unit_changes,
        };
        let live = self.books.last_live;
        let r = self.store.put_books(&books).and_then(|()| {
            self.store
                .put_counter("loss", &serde_json::to_string(&figures)?)
        });
        let r = r.and_then(|()| {
            self.store
                .put_counter("live_logged_at_exit", &live.to_string())
        });
        if let Err(e) = r {
            warn!("writing counters to the store: {e:#}");
        }
    }

    pub fn heartbeat(&mut self) {
        let figures = self.books.figures();
        let doc = event::heartbeat(
            SystemTime::now(),
            &figures,
            self.agg.open_count(),
            &self.host,
        );
        let route = Route {
            alert: true,
            flush: true,
            keep: super::publish::Keep::Nothing,
        };
        self.outlet.publish(&mut self.store, doc, route);
    }

    /// Set sizes for the metrics: compiled counts, and the kernel's for the
    /// timeout sets the DNS guard fills.
    pub fn count_set_elements(&mut self) {
        match self.store.first_seen_count() {
            Ok(n) => self.services.metrics.set_novelty_memory(n),
            Err(e) => warn!("counting the novelty memory: {e:#}"),
        }
        let mut sizes = std::collections::BTreeMap::new();
        for (set, n) in &self.table.sets {
            let n = if set.timeout {
                match self.nft.timed_elements(set) {
                    Ok(e) => e.len() as u64,
                    Err(e) => {
                        warn!("reading set {}: {e}", set.name);
                        continue;
                    }
                }
            } else {
                *n
            };
            sizes.insert(set.name.clone(), n);
        }
        self.services.metrics.set_elements(sizes);
    }
}

fn guard_counts(g: &GuardStats) -> GuardCounts {
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    GuardCounts {
        queries: n(&g.queries),
        cache_hits: n(&g.cache_hits),
        forwarded: n(&g.forwarded),
        refused: n(&g.refused),
        upstream_failures: n(&g.upstream_failures),
        set_failures: n(&g.set_failures),
        tcp_accept_errors: n(&g.tcp_accept_errors),
        tcp_refused: n(&g.tcp_refused),
        revalidation: g.revalidation(),
        via_stub: g.via_stub(),
        new_names: n(&g.names_new),
        novelty_filter: n(&g.names_held),
    }
}

fn proxy_counts(p: &ProxyStats) -> ProxyCounts {
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    ProxyCounts {
        connections: n(&p.connections),
        open: p.open.load(Ordering::Relaxed) as u64,
        requests: n(&p.requests),
        tunnels: n(&p.tunnels),
        denied: n(&p.denied),
        upstream_failures: n(&p.upstream_failures),
        over_limit: n(&p.over_limit),
        accept_errors: n(&p.accept_errors),
        allowed_by_rule: p.allowed_by_rule().into_iter().collect(),
        new_hosts: n(&p.hosts_new),
        novelty_filter: n(&p.hosts_held),
    }
}
