//! The one path a document takes out of `egret run`: stdout and the API's
//! live feed, then the alert sinks, then the store.

use std::io::Write;
use std::time::SystemTime;

use serde_json::Value;
use tracing::warn;

use crate::alert::Dispatcher;
use crate::api::LiveFeed;
use crate::monitor::incident::Incident;
use crate::monitor::store::Store;

/// Written batches at least this big are followed by a `malloc_trim`.
const TRIM_AFTER_BATCH: usize = 256;

/// stdout, one JSON document per line. A closed pipe is reported once and
/// does not stop the daemon: the store still gets every event.
pub(super) struct Output {
    out: std::io::BufWriter<std::io::Stdout>,
    broken: bool,
    /// The API's live feed (costs nothing without listeners).
    feed: LiveFeed,
}

impl Output {
    pub fn stdout(feed: LiveFeed) -> Output {
        Output {
            out: std::io::BufWriter::new(std::io::stdout()),
            broken: false,
            feed,
        }
    }

    fn line(&mut self, doc: &Value) {
        if self.broken && self.feed.clients() == 0 {
            return;
        }
        // Serialized once for stdout and the live feed.
        let line = doc.to_string();
        self.feed.publish(&line);
        if self.broken {
            return;
        }
        let r = self
            .out
            .write_all(line.as_bytes())
            .and_then(|()| self.out.write_all(b"\n"));
        if let Err(e) = r {
            warn!("stdout is gone ({e}); events still go to the store");
            self.broken = true;
        }
    }

    pub fn flush(&mut self) {
        if !self.broken && self.out.flush().is_err() {
            self.broken = true;
        }
    }
}

/// Where a document goes besides stdout and the live feed.
pub(super) struct Route {
    /// To the alert sinks (not for incident updates, nor for an alert
    /// sink's own failures: those reach the other sinks through the
    /// dispatcher).
    pub alert: bool,
    /// Flush stdout now (a batch flushes once, at its end).
    pub flush: bool,
    pub keep: Keep,
}

/// How the store keeps a document.
pub(super) enum Keep {
    Nothing,
    /// A row of its own now: an event that is not an incident (tamper,
    /// data-loss, ...).
    Event {
        id: u64,
        action: &'static str,
        at: SystemTime,
        count: u64,
    },
    /// Upserted with the next batch (`Outlet::write_pending`): an incident
    /// or its update.
    Incident(Box<Incident>),
}

impl Route {
    /// Printed, alerted and stored as an event of its own.
    pub fn event(id: u64, action: &'static str, at: SystemTime, count: u64) -> Route {
        Route {
            alert: true,
            flush: true,
            keep: Keep::Event {
                id,
                action,
                at,
                count,
            },
        }
    }
}

/// stdout (with the live feed), the alert sinks, and the incidents waiting
/// for the store.
pub(super) struct Outlet {
    out: Output,
    /// `[[alerts]]`: documents go here too, without waiting.
    pub alerts: Dispatcher,
    /// Incidents and their documents not yet written to the store.
    pub pending: Vec<(Incident, Value)>,
}

impl Outlet {
    pub fn new(out: Output, alerts: Dispatcher) -> Outlet {
        Outlet {
            out,
            alerts,
            pending: Vec::new(),
        }
    }

    /// Print, flush, alert, store: every document `egret run` emits goes
    /// through here.
    pub fn publish(&mut self, store: &mut Store, doc: Value, route: Route) {
        self.out.line(&doc);
        if route.flush {
            self.out.flush();
        }
        if route.alert {
            self.alerts.send(&doc);
        }
        match route.keep {
            Keep::Nothing => {}
            Keep::Event {
                id,
                action,
                at,
                count,
            } => {
                if let Err(e) = store.insert_event(id, action, at, count, &doc) {
                    warn!("storing a {action} event: {e:#}");
                }
            }
            Keep::Incident(inc) => self.pending.push((*inc, doc)),
        }
    }

    pub fn flush(&mut self) {
        self.out.flush();
    }

    /// Upserts the pending incidents in one transaction; on failure they are
    /// kept for the next try, bounded so a dead disk cannot eat memory.
    pub fn write_pending(&mut self, store: &mut Store) {
        if self.pending.is_empty() {
            return;
        }
        let batch: Vec<(&Incident, &Value)> = self.pending.iter().map(|(i, d)| (i, d)).collect();
        match store.upsert(&batch) {
            Ok(()) => {
                let burst = self.pending.len() >= TRIM_AFTER_BATCH;
                self.pending = Vec::new();
                // A burst's documents are many small allocations; glibc
                // keeps the freed pages unless asked to give them back.
                #[cfg(target_env = "gnu")]
                if burst {
                    // SAFETY: malloc_trim only releases free heap memory.
                    unsafe { libc::malloc_trim(0) };
                }
            }
            Err(e) => {
                warn!("writing events to the store: {e:#}");
                if self.pending.len() > 100_000 {
                    self.pending.drain(..50_000);
                }
            }
        }
    }
}
