//! Alerts: the events of `egret run`, pushed to where operators already look
//! (`[[alerts]]`: webhook, syslog, exec, otlp).
//!
//! The pipeline hands each document to [`Dispatcher::send`], which filters
//! it per sink and puts it on that sink's bounded queue without waiting. Each
//! sink has its own worker thread: rate limit and digest ([`limiter`]),
//! batching (otlp), delivery with retries ([`Deliver`]). Invariant: nothing here blocks or
//! fails the pipeline; a slow or dead sink costs alerts, never stored events.
//! A sink's failures come back through [`Dispatcher::failure_events`] and are
//! reported by the daemon as `alert-failed` events, which go to the *other*
//! sinks only, and whose own failures are counted but not reported again.

pub mod exec;
pub mod http;
pub mod limiter;
pub mod otlp;
pub mod severity;
pub mod syslog;
pub mod webhook;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use serde_json::Value;
use tracing::warn;

use crate::monitor::event::{self, ecs::Envelope, Action};
use crate::policy::{AlertSink, Policy, Severity, SinkKind};
use limiter::Limiter;

/// One way of getting an alert out. Called on the sink's own thread.
/// An error is retried with backoff unless it is a [`Refusal`].
pub trait Deliver: Send {
    /// One attempt at delivering one document.
    fn deliver(&mut self, doc: &Value) -> Result<()>;

    /// A sink that carries many documents per request (otlp) says how many
    /// and how long the first may wait for the others; the rest get each
    /// document at once.
    fn batching(&self) -> Batching {
        Batching::ONE
    }

    /// One attempt at delivering `docs` (at most `batching().max`) in one
    /// request: `Ok` with what the receiver accepted the request but
    /// refused of it (an OTLP partial success).
    fn deliver_batch(&mut self, docs: &[Arc<Value>]) -> Result<Option<Refused>> {
        for doc in docs {
            self.deliver(doc)?;
        }
        Ok(None)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    pub max: usize,
    pub delay: Duration,
}

impl Batching {
    pub const ONE: Batching = Batching {
        max: 1,
        delay: Duration::ZERO,
    };
}

/// Documents of an accepted request that the receiver still refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub count: u64,
    pub why: String,
}

/// A failed attempt that says how to go on (other errors are retried with
/// the sink's backoff).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Retrying would get the same answer (an OTLP receiver's 400, 401,
    /// 413, 500 ...): not retried, counted as rejected.
    #[error("{0}")]
    Final(String),
    /// Retry, but not before this long (`Retry-After` on a 429 or 503).
    #[error("{why}")]
    After { why: String, wait: Duration },
}

/// Alerts waiting per sink; past this, new ones are counted and dropped.
const QUEUE: usize = 1024;
/// The longest wait between two attempts (backoff or `Retry-After`).
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// `alert-failed` events: at most one per sink per this interval.
const FAILURE_EVENT_EVERY: Duration = Duration::from_secs(60);

/// A sink's counts, for the metrics.
#[derive(Default)]
pub struct SinkStats {
    pub delivered: AtomicU64,
    pub failed: AtomicU64,
    /// Held back by the rate limit (summed up in digests).
    pub suppressed: AtomicU64,
    /// Dropped because the sink's queue was full.
    pub queue_full: AtomicU64,
    /// Of `failed`: refused by the receiver, not retried (a 4xx, an OTLP
    /// partial success).
    pub rejected: AtomicU64,
    /// Attempts that failed and were tried again.
    pub retries: AtomicU64,
}

/// A delivery that failed after its retries.
#[derive(Debug, Clone)]
pub struct Failure {
    pub sink: String,
    pub error: String,
}

struct Sink {
    config: AlertSink,
    tx: SyncSender<Arc<Value>>,
    stats: Arc<SinkStats>,
    thread: JoinHandle<()>,
}

pub struct Dispatcher {
    sinks: Vec<Sink>,
    failures: Receiver<Failure>,
    /// Per sink: when its last `alert-failed` event went out, failures since.
    reported: HashMap<String, (Option<Instant>, u64, String)>,
}

impl Dispatcher {
    /// Starts one worker per sink. Fails only on what the policy check cannot
    /// see (an unreadable `ca_file`, no CA certificates).
    pub fn start(policy: &Policy, host: &str) -> Result<Dispatcher> {
        let (fail_tx, failures) = sync_channel(256);
        let mut sinks = Vec::new();
        for config in &policy.alerts {
            let deliver: Box<dyn Deliver> = match &config.kind {
                SinkKind::Webhook(w) => Box::new(
                    webhook::Webhook::new(w, policy.mark, config.timeout)
                        .with_context(|| format!("alert sink {}", config.name))?,
                ),
                SinkKind::Syslog(s) => {
                    Box::new(syslog::Syslog::new(s, policy.mark, config.timeout))
                }
                SinkKind::Exec(e) => Box::new(exec::Exec::new(e, config.timeout)),
                SinkKind::Otlp(o) => Box::new(
                    otlp::Otlp::new(o, policy.mark, config.timeout, host)
                        .with_context(|| format!("alert sink {}", config.name))?,
                ),
            };
            let (tx, rx) = sync_channel(QUEUE);
            let stats = Arc::new(SinkStats::default());
            let worker = Worker {
                config: config.clone(),
                host: host.to_string(),
                batching: deliver.batching(),
                batch: Vec::new(),
                batch_since: None,
                deliver,
                limiter: Limiter::new(config.rate_limit, config.rate_window),
                stats: Arc::clone(&stats),
                failures: fail_tx.clone(),
                dropped_seen: 0,
            };
            let thread = std::thread::Builder::new()
                .name(format!("alert-{}", config.name))
                .spawn(move || worker.run(rx))
                .context("starting an alert sink's thread")?;
            sinks.push(Sink {
                config: config.clone(),
                tx,
                stats,
                thread,
            });
        }
        Ok(Dispatcher {
            sinks,
            failures,
            reported: HashMap::new(),
        })
    }

    /// No sinks (what is left after [`Dispatcher::stop`]).
    pub fn none() -> Dispatcher {
        Dispatcher {
            sinks: Vec::new(),
            failures: sync_channel(0).1,
            reported: HashMap::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }

    pub fn configs(&self) -> Vec<AlertSink> {
        self.sinks.iter().map(|s| s.config.clone()).collect()
    }

    /// Queues `doc` for every sink whose filters it passes. Never blocks.
    pub fn send(&self, doc: &Value) {
        self.send_except(doc, None);
    }

    fn send_except(&self, doc: &Value, except: Option<&str>) {
        if self.sinks.is_empty() {
            return;
        }
        let envelope = Envelope::of(doc);
        let action = envelope.action_name();
        let severity = envelope.severity.unwrap_or(Severity::Info);
        let mut shared: Option<Arc<Value>> = None;
        for s in &self.sinks {
            let wanted = severity >= s.config.min_severity
                && (s.config.actions.is_empty() || s.config.actions.iter().any(|a| a == action))
                && except != Some(s.config.name.as_str());
            if !wanted {
                continue;
            }
            let doc = shared.get_or_insert_with(|| Arc::new(doc.clone()));
            match s.tx.try_send(Arc::clone(doc)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    s.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// `alert-failed` events due now: one per failing sink per minute, with
    /// how many deliveries failed since the last one. Also sent to the other
    /// sinks (never to the one that failed).
    pub fn failure_events(&mut self, host: &str) -> Vec<Value> {
        for f in self.failures.try_iter() {
            let e = self
                .reported
                .entry(f.sink)
                .or_insert((None, 0, String::new()));
            e.1 += 1;
            e.2 = f.error;
        }
        let mut out = Vec::new();
        for (sink, (last, pending, error)) in &mut self.reported {
            let due = last.map_or(true, |t| t.elapsed() >= FAILURE_EVENT_EVERY);
            if *pending == 0 || !due {
                continue;
            }
            warn!(sink = %sink, failed = *pending, "alert delivery failed: {error}");
            let doc = event::alert_failed(SystemTime::now(), sink, *pending, error, host);
            *last = Some(Instant::now());
            *pending = 0;
            out.push((sink.clone(), doc));
        }
        for (sink, doc) in &out {
            self.send_except(doc, Some(sink));
        }
        out.into_iter().map(|(_, d)| d).collect()
    }

    pub fn stats(&self) -> Vec<(String, Arc<SinkStats>)> {
        self.sinks
            .iter()
            .map(|s| (s.config.name.clone(), Arc::clone(&s.stats)))
            .collect()
    }

    /// Lets the workers send what is queued, for up to `grace`; a sink still
    /// busy after that is left behind (its thread ends with the process).
    pub fn stop(self, grace: Duration) {
        let deadline = Instant::now() + grace;
        let threads: Vec<JoinHandle<()>> = self
            .sinks
            .into_iter()
            .map(|s| {
                drop(s.tx);
                s.thread
            })
            .collect();
        while Instant::now() < deadline && threads.iter().any(|t| !t.is_finished()) {
            std::thread::sleep(Duration::from_millis(20));
        }
        for t in threads.into_iter().filter(|t| t.is_finished()) {
            let _ = t.join();
        }
    }
}

struct Worker {
    config: AlertSink,
    host: String,
    deliver: Box<dyn Deliver>,
    limiter: Limiter,
    stats: Arc<SinkStats>,
    failures: SyncSender<Failure>,
    dropped_seen: u64,
    batching: Batching,
    /// Admitted documents waiting for their request.
    batch: Vec<Arc<Value>>,
    /// When the first of them came.
    batch_since: Option<Instant>,
}

impl Worker {
    fn run(mut self, rx: Receiver<Arc<Value>>) {
        loop {
            let now = Instant::now();
            let batch_due = self.batch_since.map(|t| t + self.batching.delay);
            let wait = [self.limiter.deadline(), batch_due]
                .into_iter()
                .flatten()
                .min()
                .map(|d| d.saturating_duration_since(now))
                .unwrap_or(Duration::from_secs(1));
            let closed = match rx.recv_timeout(wait) {
                Ok(doc) => {
                    self.digest_if_due();
                    let envelope = Envelope::of(&doc);
                    let severity = envelope.severity.unwrap_or(Severity::Info);
                    if self
                        .limiter
                        .admit(Instant::now(), envelope.action_name(), severity)
                    {
                        self.add(doc);
                    } else {
                        self.stats.suppressed.fetch_add(1, Ordering::Relaxed);
                    }
                    false
                }
                Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => true,
            };
            let dropped = self.stats.queue_full.load(Ordering::Relaxed);
            if dropped > self.dropped_seen {
                self.limiter
                    .note_dropped(Instant::now(), dropped - self.dropped_seen);
                self.dropped_seen = dropped;
            }
            self.digest_if_due();
            let due = self
                .batch_since
                .is_some_and(|t| t.elapsed() >= self.batching.delay);
            if closed || due {
                self.flush();
            }
            if closed {
                return;
            }
        }
    }

    /// Into the batch; a full batch goes at once.
    fn add(&mut self, doc: Arc<Value>) {
        self.batch.push(doc);
        self.batch_since.get_or_insert_with(Instant::now);
        if self.batch.len() >= self.batching.max {
            self.flush();
        }
    }

    fn flush(&mut self) {
        self.batch_since = None;
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        self.send(&batch);
    }

    fn digest_if_due(&mut self) {
        if let Some(d) = self.limiter.due(Instant::now()) {
            let doc = event::alert_digest(
                SystemTime::now(),
                &self.config.name,
                self.config.rate_window,
                &d.suppressed,
                d.dropped,
                &self.host,
            );
            self.add(Arc::new(doc));
        }
    }

    /// Delivers with retries, `backoff` apart and doubling (or as long as
    /// the receiver asked); a [`Refusal::Final`] is not retried.
    fn send(&mut self, docs: &[Arc<Value>]) {
        let mut backoff = self.config.backoff;
        let mut attempt = 0;
        let n = docs.len() as u64;
        loop {
            let error = match self.deliver.deliver_batch(docs) {
                Ok(refused) => {
                    let refused = refused.map(|r| (r.count.min(n), r.why));
                    let count = refused.as_ref().map_or(0, |r| r.0);
                    self.stats.delivered.fetch_add(n - count, Ordering::Relaxed);
                    match refused {
                        Some((count, why)) if count > 0 => {
                            self.stats.rejected.fetch_add(count, Ordering::Relaxed);
                            self.failed(docs, count, format!("{count} of {n} refused: {why}"));
                        }
                        _ => {}
                    }
                    return;
                }
                Err(e) => e,
            };
            let (retry, wait) = match error.downcast_ref::<Refusal>() {
                Some(Refusal::Final(_)) => (false, backoff),
                Some(Refusal::After { wait, .. }) => (true, (*wait).min(MAX_BACKOFF)),
                None => (true, backoff),
            };
            if !retry || attempt >= self.config.retries {
                if !retry {
                    self.stats.rejected.fetch_add(n, Ordering::Relaxed);
                }
                self.failed(docs, n, format!("{error:#}"));
                return;
            }
            attempt += 1;
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(wait);
            backoff = backoff.saturating_mul(2).min(MAX_BACKOFF);
        }
    }

    fn failed(&self, docs: &[Arc<Value>], count: u64, error: String) {
        self.stats.failed.fetch_add(count, Ordering::Relaxed);
        let about_failures = docs
            .iter()
            .all(|d| Envelope::of(d).action == Some(Action::AlertFailed));
        // A failure to report a failure stays in the metrics: no loop.
        if !about_failures {
            let _ = self.failures.try_send(Failure {
                sink: self.config.name.clone(),
                error,
            });
        }
    }
}
