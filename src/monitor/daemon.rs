//! `egret run`: applies the policy, then turns every logged packet into an
//! attributed, deduplicated event until SIGTERM/SIGINT. SIGHUP (or `egret
//! reload`) swaps in a re-read policy; an invalid one is refused and the old
//! one stays. On exit the ruleset stays loaded: egress stays filtered (fail
//! closed) and a later `egret run` picks up where this one left off.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tracing::{debug, error, info, warn};

use crate::alert::severity::Classifier;
use crate::alert::Dispatcher;
use crate::api::{ApiServer, LiveFeed};
use crate::apply;
use crate::dns::{Guard, GuardConfig, RecentNames, RefusedQuery};
use crate::kernel::nft::Nftables;
use crate::monitor::accounting::{Accounting, ReaderCounts};
use crate::monitor::attribution::{Attributor, Method};
use crate::monitor::containers::{ContainerDirectory, Lookup};
use crate::monitor::event::{self, ProxyRequest, Subject};
use crate::monitor::flood::{hand_over, Dropped};
use crate::monitor::incident::{Aggregator, Incident, Observation};
use crate::monitor::metrics::{Metrics, MetricsServer};
use crate::monitor::nflog::{LoggedPacket, NflogConfig, NflogReader, NflogStats, Verdict};
use crate::monitor::store::{Retention, Store};
use crate::policy::Policy;
use crate::proxy::{Proxy, ProxyDenial, ProxyState};
use crate::ruleset::{Ruleset, UnitCgroups, DNS_GUARD_RULE};
use crate::text;

pub const PID_FILE: &str = "egret.pid";
const TICK: Duration = Duration::from_millis(250);
const ACCOUNT_EVERY: Duration = Duration::from_secs(1);
const UNITS_EVERY: Duration = Duration::from_secs(2);
/// How often the host sets' sizes are read from the kernel for the metrics.
const SET_SIZES_EVERY: Duration = Duration::from_secs(10);
/// Retention (`--retention`, `--max-events`, `--max-seen`) is enforced this
/// often, and also once a tenth of `--max-events` new incidents were stored,
/// so the bounds hold within a minute even under a flood.
const PRUNE_EVERY: Duration = Duration::from_secs(30);
/// data-loss events are rate-limited to one per this interval.
const LOSS_EVENT_EVERY: Duration = Duration::from_secs(60);
const CHANNEL_DEPTH: usize = 16_384;
/// How often cached socket attributions past their time to live are dropped.
const SOCKET_EXPIRE_EVERY: Duration = Duration::from_secs(5);
/// Written batches at least this big are followed by a `malloc_trim`.
const TRIM_AFTER_BATCH: usize = 256;
/// At exit, alert sinks may take this long to send what they hold.
const ALERTS_GRACE: Duration = Duration::from_secs(3);

/// What reaches the pipeline: packets from the NFLOG reader, queries the DNS guard refused.
pub enum Input {
    Packet(LoggedPacket),
    Query(Box<RefusedQuery>),
    Proxy(Box<ProxyDenial>),
}

pub struct RunOptions {
    /// None: the embedded default (audit mode, baseline only).
    pub policy_path: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub nflog_rcvbuf: Option<usize>,
    pub nflog_qthresh: Option<u32>,
    pub update_every: Duration,
    pub retention: Retention,
}

pub fn pid_path(state_dir: &Path) -> PathBuf {
    state_dir.join(PID_FILE)
}

/// The pid of a running `egret run` for this state dir, if any.
pub fn running_pid(state_dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_path(state_dir))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "egret").then_some(pid)
}

struct Signals {
    stop: Arc<AtomicBool>,
    reload: Arc<AtomicBool>,
}

impl Signals {
    fn register() -> Result<Signals> {
        let stop = Arc::new(AtomicBool::new(false));
        let reload = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, Arc::clone(&stop))?;
        }
        signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&reload))?;
        Ok(Signals { stop, reload })
    }
}

/// stdout, one JSON document per line. A closed pipe is reported once and
/// does not stop the daemon: the store still gets every event.
struct Output {
    out: std::io::BufWriter<std::io::Stdout>,
    broken: bool,
    /// The API's live feed (costs nothing without listeners).
    feed: LiveFeed,
}

impl Output {
    fn stdout(feed: LiveFeed) -> Output {
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
    fn flush(&mut self) {
        if !self.broken && self.out.flush().is_err() {
            self.broken = true;
        }
    }
}

struct Daemon {
    opts: RunOptions,
    policy: Policy,
    units: UnitCgroups,
    nft: Nftables,
    store: Store,
    agg: Aggregator,
    attributor: Attributor,
    accounting: Accounting,
    stats: Arc<NflogStats>,
    /// Reports of the guard and the proxy that found the pipeline full.
    dropped: Arc<Dropped>,
    /// The NFLOG reader has stopped: nothing logged is in flight any more.
    reader_stopped: bool,
    epoch: Instant,
    out: Output,
    host: String,
    pending: Vec<(Incident, Value)>,
    guard: Option<Guard>,
    proxy: Option<Proxy>,
    recent: Arc<Mutex<RecentNames>>,
    metrics: Arc<Metrics>,
    metrics_server: Option<MetricsServer>,
    api_server: Option<ApiServer>,
    /// Attempts per (unix minute, action) not yet written to the store.
    timeline: BTreeMap<(i64, &'static str), u64>,
    /// The rules egret loaded (counters zeroed): what the live table must show.
    expected: Vec<(String, crate::ruleset::Rule)>,
    tamper_reported: bool,
    /// Changes to the table egret did not make (notifications, full comparison).
    watch: super::tamper::TamperWatch,
    /// The sockets egret's table seeds: every later compile (reload,
    /// restore, units) keeps those still open and adds nothing.
    seeded: std::collections::BTreeSet<apply::SeededSocket>,
    /// The last reading of the log rules' counters.
    last_live: u64,
    /// The loaded ruleset's sets: name, element count (0 for timeout sets, read live).
    sets: Vec<(crate::ruleset::Set, u64)>,
    reported_lost: u64,
    last_loss_event: Option<Instant>,
    /// Grades incidents (written into every document).
    classifier: Classifier,
    /// `[[alerts]]`: documents go here too, without waiting.
    alerts: Dispatcher,
    /// scope = "host+containers": container names by address.
    containers: Option<ContainerDirectory>,
    /// New incidents since the store was last pruned.
    new_since_prune: u64,
}

pub fn run(opts: RunOptions, policy: Policy) -> Result<()> {
    crate::kernel::features::require(&policy, &crate::kernel::features::running_release())
        .map_err(anyhow::Error::msg)?;
    let signals = Signals::register().context("installing signal handlers")?;
    let store = Store::open_for(&opts.state_dir, Some(policy.access_group()))?;
    if let Some(pid) = running_pid(&opts.state_dir) {
        bail!(
            "another `egret run` (pid {pid}) uses {}",
            opts.state_dir.display()
        );
    }
    let pid_file = pid_path(&opts.state_dir);
    crate::monitor::store::write_file(
        &pid_file,
        format!("{}\n", std::process::id()).as_bytes(),
        0o644,
    )
    .context("writing the pid file")?;
    let _pid_guard = PidFile(pid_file);
    run_inner(opts, policy, store, signals)
}

/// For `egret suggest` and `egret doctor` from the state dir alone.
fn record_settings(store: &mut Store, policy: &Policy) {
    if let Err(e) = store.record_run_settings(policy, SystemTime::now()) {
        warn!("recording the policy's settings in the store: {e:#}");
    }
}

fn run_inner(opts: RunOptions, policy: Policy, mut store: Store, signals: Signals) -> Result<()> {
    let epoch = Instant::now();
    let mut nft = Nftables::open().context("opening nf_tables netlink")?;

    // Packets logged while no daemon listened never reached anyone: book them.
    let live_before = nft
        .logged_packets()
        .context("reading egret's log counters")?;
    let seen_at_exit: Option<u64> = store
        .counter("live_logged_at_exit")?
        .and_then(|s| s.parse().ok());
    let while_down = match (live_before, seen_at_exit) {
        (Some(now), Some(then)) if now >= then => now - then,
        (Some(now), _) => now,
        (None, _) => 0,
    };

    let mut cfg = NflogConfig::new(policy.log_group);
    if let Some(b) = opts.nflog_rcvbuf {
        cfg.rcvbuf = b;
    }
    if let Some(q) = opts.nflog_qthresh {
        cfg.qthresh = q;
    }
    let (tx, rx) = sync_channel::<Input>(CHANNEL_DEPTH);
    let dropped = Arc::new(Dropped::default());
    let mut early = Vec::new();
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    // Started first, so that even a failed start can be reported.
    let alerts = Dispatcher::start(&policy, &host)?;
    let mut reader = match NflogReader::bind(cfg, epoch, &mut |p| early.push(p)) {
        Ok(r) => r,
        Err(e) => {
            if let crate::monitor::nflog::BindError::Busy(group) = e {
                let now = SystemTime::now();
                let doc = event::nflog_taken(now, group, &host);
                let mut out = Output::stdout(LiveFeed::default());
                out.line(&doc);
                out.flush();
                let id = store.next_incident_id()?;
                if let Err(e) = store.insert_event(id, "nflog-taken", now, 1, &doc) {
                    warn!("storing an nflog-taken event: {e:#}");
                }
                alerts.send(&doc);
            }
            alerts.stop(ALERTS_GRACE);
            return Err(e.into());
        }
    };
    let stats = Arc::clone(&reader.stats);

    // The guard binds its port before anything changes in the kernel, so a
    // port in use fails the start cleanly.
    let recent = Arc::new(Mutex::new(RecentNames::default()));
    let guard = match GuardConfig::from_policy(&policy) {
        Some(gc) => {
            let (tx, dropped) = (tx.clone(), Arc::clone(&dropped));
            let guard = Guard::start(
                gc,
                Arc::clone(&recent),
                Box::new(move |q| {
                    // A full pipeline drops the report (counted), never the answer.
                    hand_over(&tx, Input::Query(Box::new(q)), &dropped.dns);
                }),
            )?;
            info!(listen = %guard.listen(), "DNS guard listening");
            Some(guard)
        }
        None => None,
    };
    let metrics = Arc::new(Metrics::default());
    let metrics_server = match policy.metrics {
        Some(listen) => {
            let server = MetricsServer::start(listen, Arc::clone(&metrics))?;
            info!(%listen, "metrics on http://{listen}/metrics");
            Some(server)
        }
        None => None,
    };
    if let Some(g) = &guard {
        let _ = metrics.guard.set(Arc::clone(&g.stats));
    }
    *metrics.alerts.lock().unwrap_or_else(|p| p.into_inner()) = alerts.stats();
    let feed = LiveFeed::default();
    let api_server = match &policy.api {
        Some(api) => {
            let server = ApiServer::start(api, opts.state_dir.clone(), feed.clone())?;
            if api.dashboard {
                info!(listen = %api.listen, "dashboard on http://{}/", api.listen);
            } else {
                info!(listen = %api.listen, "API on http://{}/api/v1/", api.listen);
            }
            Some(server)
        }
        None => None,
    };
    let proxy = match ProxyState::from_policy(&policy) {
        Some(state) => {
            let (tx, dropped) = (tx.clone(), Arc::clone(&dropped));
            let proxy = Proxy::start(
                state,
                Box::new(move |d| {
                    hand_over(&tx, Input::Proxy(Box::new(d)), &dropped.proxy);
                }),
            )?;
            info!(listen = %proxy.listen(), "proxy listening");
            let _ = metrics.proxy.set(Arc::clone(&proxy.stats));
            Some(proxy)
        }
        None => None,
    };

    let units = apply::resolve_units(&policy);
    let (rs, preexisting) = apply::compile_seeded(&policy, units.clone(), apply::Seeds::Kernel)?;
    nft.apply(&rs).context("loading the ruleset")?;
    record_settings(&mut store, &policy);
    info!(
        policy = %opts.policy_path.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "(embedded default: audit mode, baseline only)".into()),
        mode = %policy.mode,
        rules = policy.rules.len(),
        log_group = policy.log_group,
        "policy applied; watching blocked egress"
    );
    super::systemd::notify("READY=1\nSTATUS=watching blocked egress");

    let stop = Arc::clone(&signals.stop);
    let reader_thread = std::thread::Builder::new()
        .name("nflog".into())
        .spawn(move || -> std::io::Result<()> {
            for p in early {
                if tx.send(Input::Packet(p)).is_err() {
                    return Ok(());
                }
            }
            let mut gone = false;
            while !stop.load(Ordering::Relaxed) && !gone {
                reader.drain(Duration::from_millis(100), &mut |p| {
                    gone |= tx.send(Input::Packet(p)).is_err();
                })?;
            }
            Ok(())
        })
        .context("starting the NFLOG reader")?;

    let mut accounting = Accounting::new(cfg.flush);
    accounting.add_while_down(while_down);
    let mut daemon = Daemon {
        agg: Aggregator::new(store.next_incident_id()?),
        classifier: Classifier::new(policy.severity.clone()),
        alerts,
        store,
        opts,
        containers: container_directory(&policy),
        policy,
        units,
        nft,
        attributor: Attributor::new(),
        accounting,
        stats,
        dropped,
        reader_stopped: false,
        epoch,
        out: Output::stdout(feed),
        host,
        pending: Vec::new(),
        guard,
        proxy,
        recent,
        metrics,
        metrics_server,
        api_server,
        timeline: BTreeMap::new(),
        sets: set_sizes(&rs),
        expected: expected_rules(&rs),
        watch: super::tamper::TamperWatch::new(&rs),
        seeded: seeded_sockets(&rs),
        tamper_reported: false,
        last_live: 0,
        reported_lost: 0,
        last_loss_event: None,
        new_since_prune: 0,
    };
    daemon.agg.update_every = daemon.opts.update_every;
    daemon.report_preexisting(&preexisting);
    if let Ok(n) = daemon.store.prune(daemon.opts.retention, SystemTime::now()) {
        if n > 0 {
            info!(events = n, "pruned events past retention");
        }
    }
    let result = daemon.main_loop(&rx, &signals, &reader_thread);
    signals.stop.store(true, Ordering::Relaxed);
    match reader_thread.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => error!("NFLOG reader failed: {e}"),
        Err(_) => error!("NFLOG reader panicked"),
    }
    // Whatever was queued before stopping still counts. The guard and the
    // proxy stop first: under a flood they would refill the queue forever.
    daemon.stop_inputs();
    daemon.reader_stopped = true;
    while let Ok(p) = rx.try_recv() {
        daemon.handle(p);
    }
    daemon.finish();
    result
}

/// With scope = "host+containers": the runtime's names for container addresses.
fn container_directory(policy: &Policy) -> Option<ContainerDirectory> {
    if policy.scope != crate::policy::Scope::HostAndContainers {
        return None;
    }
    match ContainerDirectory::start(policy.container_runtime.as_deref()) {
        Ok(d) => Some(d),
        Err(e) => {
            warn!("container names are off: {e:#}");
            None
        }
    }
}

struct PidFile(PathBuf);
impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Daemon {
    fn main_loop(
        &mut self,
        rx: &Receiver<Input>,
        signals: &Signals,
        reader: &std::thread::JoinHandle<std::io::Result<()>>,
    ) -> Result<()> {
        let mut last_tick = Instant::now();
        let mut last_account = Instant::now() - ACCOUNT_EVERY;
        let mut last_units = Instant::now();
        let mut last_expire = Instant::now();
        let mut last_prune = Instant::now();
        let mut last_sizes = Instant::now() - SET_SIZES_EVERY;
        let mut last_heartbeat = Instant::now();
        loop {
            match rx.recv_timeout(TICK) {
                Ok(p) => {
                    self.handle(p);
                    // Take what is queued before looking at the clock again.
                    for p in rx.try_iter().take(4096) {
                        self.handle(p);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) if signals.stop.load(Ordering::Relaxed) => {}
                Err(RecvTimeoutError::Disconnected) => bail!("the NFLOG reader stopped"),
            }
            // The guard holds a sender too, so a dead reader does not disconnect the channel.
            if reader.is_finished() && !signals.stop.load(Ordering::Relaxed) {
                bail!("the NFLOG reader stopped");
            }
            if signals.stop.load(Ordering::Relaxed) {
                super::systemd::notify("STOPPING=1");
                info!("stopping; the ruleset stays loaded (`egret remove` deletes it)");
                return Ok(());
            }
            if signals.reload.swap(false, Ordering::Relaxed) {
                super::systemd::notify("RELOADING=1");
                self.reload();
                super::systemd::notify("READY=1\nSTATUS=watching blocked egress");
            }
            if last_tick.elapsed() >= TICK {
                last_tick = Instant::now();
                self.tick(false);
            }
            self.watch_table();
            if last_account.elapsed() >= ACCOUNT_EVERY {
                last_account = Instant::now();
                self.account();
            }
            if last_expire.elapsed() >= SOCKET_EXPIRE_EVERY {
                last_expire = Instant::now();
                self.attributor.expire(last_expire);
            }
            if last_units.elapsed() >= UNITS_EVERY {
                last_units = Instant::now();
                self.refresh_units();
            }
            if let Some(every) = self.policy.heartbeat {
                if last_heartbeat.elapsed() >= every {
                    last_heartbeat = Instant::now();
                    let figures = self.accounting.figures(self.counts());
                    let doc = event::heartbeat(
                        SystemTime::now(),
                        &figures,
                        self.agg.open_count(),
                        &self.host,
                    );
                    self.out.line(&doc);
                    self.out.flush();
                    self.alerts.send(&doc);
                }
            }
            if self.metrics_server.is_some() && last_sizes.elapsed() >= SET_SIZES_EVERY {
                last_sizes = Instant::now();
                self.count_set_elements();
            }
            let prune_after = (self.opts.retention.max_rows / 10).max(100);
            if last_prune.elapsed() >= PRUNE_EVERY || self.new_since_prune >= prune_after {
                last_prune = Instant::now();
                self.new_since_prune = 0;
                match self.store.prune(self.opts.retention, SystemTime::now()) {
                    Ok(n) if n > 0 => debug!(events = n, "pruned events past retention"),
                    Ok(_) => {}
                    Err(e) => warn!("pruning the event store: {e:#}"),
                }
            }
        }
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Packet(p) => self.packet(p),
            Input::Query(q) => self.refused_query(*q),
            Input::Proxy(d) => self.proxy_denial(*d),
        }
    }

    fn proxy_denial(&mut self, mut d: ProxyDenial) {
        // The method is the client's own token (hyper takes any length).
        if text::bound(&mut d.method, text::SHORT_MAX) {
            d.attribution.truncated.push("http.request.method");
        }
        let verdict = Verdict {
            blocked: d.blocked,
            rule: Some(d.rule.clone().unwrap_or_else(|| event::DEFAULT_RULE.into())),
        };
        let ip = d.ip.or(match d.target.host {
            crate::proxy::decision::Host::Ip(ip) => Some(ip),
            crate::proxy::decision::Host::Name(_) => None,
        });
        let mut host = match &d.target.host {
            crate::proxy::decision::Host::Name(n) => n.clone(),
            crate::proxy::decision::Host::Ip(ip) => ip.to_string(),
        };
        if text::bound(&mut host, text::NAME_MAX) {
            d.attribution.truncated.push("destination.domain");
        }
        if text::bound(&mut d.reason, text::NAME_MAX) {
            d.attribution.truncated.push("egret.reason");
        }
        let request = ProxyRequest {
            host,
            port: d.target.port,
            method: d.method,
            client: d.client,
            reason: d.reason,
            ip,
        };
        self.record(Observation {
            verdict: &verdict,
            subject: Subject::ProxyRequest(Box::new(request)),
            attribution: &d.attribution,
            resolved: None,
            at: d.at,
        });
    }

    fn packet(&mut self, p: LoggedPacket) {
        self.metrics.packet(p.verdict.blocked);
        let flow = p.flow.as_ref().ok();
        let mut who = self.attributor.attribute(flow, p.uid, p.gid);
        if let (Some(index), Some(f), None) = (p.indev, flow, p.uid) {
            who.ingress = Some((interface_name(index), f.src));
            who.method = Method::Bridge;
            if let Some(Lookup::Found(c)) = self.containers.as_ref().map(|d| d.lookup(f.src)) {
                who.method = Method::ContainerRuntime;
                who.container_id = Some(c.id.clone());
                let (name, cut) = text::bounded(&c.name, text::NAME_MAX);
                who.container_name = Some(name.to_string());
                if cut {
                    who.truncated.push("container.name");
                }
                let (image, cut) = text::bounded(&c.image, text::NAME_MAX);
                who.container_image = Some(image.to_string());
                if cut {
                    who.truncated.push("container.image.name");
                }
            }
        }
        let resolved = flow.and_then(|f| {
            self.recent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&f.dst, Instant::now())
        });
        self.record(Observation {
            verdict: &p.verdict,
            subject: Subject::Packet(flow.copied()),
            attribution: &who,
            resolved: resolved.as_ref(),
            at: p.received,
        });
    }

    fn refused_query(&mut self, mut q: RefusedQuery) {
        // hickory caps names at 255 bytes; the cap keeps that promise here.
        if text::bound(&mut q.question.name, text::NAME_MAX) {
            q.attribution.truncated.push("dns.question.name");
        }
        let verdict = Verdict {
            blocked: q.blocked,
            rule: Some(DNS_GUARD_RULE.into()),
        };
        self.record(Observation {
            verdict: &verdict,
            subject: Subject::DnsQuery(Box::new(q.question)),
            attribution: &q.attribution,
            resolved: None,
            at: q.at,
        });
    }

    fn record(&mut self, o: Observation<'_>) {
        let action = o.action().as_str();
        let minute =
            o.at.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64 / 60)
                .unwrap_or(0);
        *self.timeline.entry((minute, action)).or_default() += 1;
        if let Some(inc) = self.agg.record(o) {
            self.metrics.incident(
                inc.action().as_str(),
                inc.key
                    .verdict
                    .rule
                    .as_deref()
                    .unwrap_or(event::DEFAULT_RULE),
                inc.attribution.method.as_str(),
            );
            self.new_since_prune += 1;
            let mut doc = event::incident(inc, false, &self.host);
            let severity = self.classifier.new_incident(inc, &mut self.store);
            event::set_severity(&mut doc, severity);
            self.out.line(&doc);
            self.out.flush();
            self.alerts.send(&doc);
            self.pending.push((inc.clone(), doc));
        }
    }

    /// Emits due updates and writes everything pending to the store.
    fn tick(&mut self, force: bool) {
        let now = SystemTime::now();
        for inc in self.agg.due(now, force) {
            let mut doc = event::incident(&inc, true, &self.host);
            event::set_severity(&mut doc, self.classifier.of(&inc));
            self.out.line(&doc);
            self.pending.push((inc, doc));
        }
        self.agg.close_idle(now);
        for doc in self.alerts.failure_events(&self.host) {
            self.out.line(&doc);
            let id = self.agg.reserve_id();
            if let Err(e) = self.store.insert_event(id, "alert-failed", now, 1, &doc) {
                warn!("storing an alert-failed event: {e:#}");
            }
        }
        self.out.flush();
        if !self.timeline.is_empty() {
            let minutes: Vec<(i64, &str, u64)> = self
                .timeline
                .iter()
                .map(|(&(m, a), &n)| (m, a, n))
                .collect();
            match self.store.add_timeline(&minutes) {
                Ok(()) => self.timeline.clear(),
                // Kept and retried; at most one entry per minute and action.
                Err(e) => warn!("writing the timeline to the store: {e:#}"),
            }
        }
        if self.pending.is_empty() {
            return;
        }
        let batch: Vec<(&Incident, &Value)> = self.pending.iter().map(|(i, d)| (i, d)).collect();
        match self.store.upsert(&batch) {
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
            // Kept for the next tick; bounded so a dead disk cannot eat memory.
            Err(e) => {
                warn!("writing events to the store: {e:#}");
                if self.pending.len() > 100_000 {
                    self.pending.drain(..50_000);
                }
            }
        }
    }

    fn counts(&self) -> ReaderCounts {
        ReaderCounts {
            received: self.stats.received.load(Ordering::Relaxed),
            seq_lost: self.stats.seq_lost.load(Ordering::Relaxed),
            enobufs: self.stats.enobufs.load(Ordering::Relaxed),
            drained_at_ms: self.stats.drained_at_ms.load(Ordering::Relaxed),
            dns_dropped: self.dropped.dns.load(Ordering::Relaxed),
            proxy_dropped: self.dropped.proxy.load(Ordering::Relaxed),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn account(&mut self) {
        match self.nft.live_rules() {
            Ok(Some(rules)) => {
                let live = crate::kernel::nft::logged_total(&rules);
                let (now_ms, counts) = (self.now_ms(), self.counts());
                if self.reader_stopped {
                    self.accounting.final_reading(live, counts);
                } else {
                    self.accounting.kernel_reading(live, now_ms, counts);
                }
                self.write_books(live);
                self.last_live = live;
                if normalized(rules) != self.expected {
                    self.tampered("changed", None);
                } else if !self.watch.standing() {
                    self.tamper_reported = false;
                }
            }
            Ok(None) => self.tampered("deleted", None),
            // A rule egret cannot decode is one it did not write.
            Err(crate::kernel::nft::NftError::Foreign(what)) => {
                let found = super::tamper::Found {
                    changes: vec![format!("egret cannot decode the table: {what}")],
                    ..Default::default()
                };
                self.tampered("changed", Some(found));
            }
            Err(e) => warn!("reading egret's log counters: {e}"),
        }
        let figures = self.accounting.figures(self.counts());
        self.metrics.books(figures, self.agg.open_count());
        let lost = figures.lost();
        let may_report = self
            .last_loss_event
            .map_or(true, |t| t.elapsed() >= LOSS_EVENT_EVERY);
        if lost > self.reported_lost && may_report {
            let now = SystemTime::now();
            let delta = lost - self.reported_lost;
            let doc = event::data_loss(now, delta, &figures, &self.host);
            warn!(
                lost = delta,
                total = lost,
                "reports were lost (see `egret status`)"
            );
            self.out.line(&doc);
            self.out.flush();
            self.alerts.send(&doc);
            let id = self.agg.reserve_id();
            if let Err(e) = self.store.insert_event(id, "data-loss", now, delta, &doc) {
                warn!("storing a data-loss event: {e:#}");
            }
            self.reported_lost = lost;
            self.last_loss_event = Some(Instant::now());
        }
    }

    fn write_books(&mut self, live: u64) {
        let figures = self.accounting.figures(self.counts());
        let a = self.attributor.stats;
        let books = serde_json::json!({
            "pid": std::process::id(),
            "updated_at": event::timestamp(SystemTime::now()),
            "loss": figures,
            "open_incidents": self.agg.open_count(),
            "attribution": {"cache_hits": a.cache_hits, "deep_lookups": a.deep_lookups, "rate_limited": a.rate_limited},
            // From the metrics' handles: the final books, written after
            // the guard and the proxy stopped, still carry their counts.
            "dns_guard": self.metrics.guard.get().map(|g| g.snapshot()),
            "proxy": self.metrics.proxy.get().map(|p| p.snapshot()),
        });
        let r = self
            .store
            .put_counter("books", &books.to_string())
            .and_then(|()| {
                self.store
                    .put_counter("loss", &serde_json::to_string(&figures)?)
            })
            .and_then(|()| {
                self.store
                    .put_counter("live_logged_at_exit", &live.to_string())
            });
        if let Err(e) = r {
            warn!("writing counters to the store: {e:#}");
        }
    }

    /// Another process's transaction on egret's table (a new occurrence,
    /// reported even while an earlier one stands), or a difference the full
    /// comparison found.
    fn watch_table(&mut self) {
        if let Some(found) = self.watch.notified() {
            self.tamper_reported = false;
            self.tampered(found.what(), Some(found));
        } else if let Some(found) = self.watch.compare(&mut self.nft, false) {
            self.tampered(found.what(), Some(found));
        }
    }

    /// egret's table was deleted or changed by something else: report it
    /// (once per occurrence) and, with `restore_table`, load the policy again.
    fn tampered(&mut self, what: &str, found: Option<super::tamper::Found>) {
        // A change found by polling: its notification names who made it.
        // Another process's transaction is a new occurrence, even while an
        // earlier change stands.
        let notified = self.watch.notified();
        if notified.is_some() {
            self.tamper_reported = false;
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
        if !self.tamper_reported {
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
        if self.tamper_reported && !restored {
            return;
        }
        let now = SystemTime::now();
        let mut doc = event::tamper(now, what, restored, &self.host);
        if let Some(f) = &found {
            super::tamper::annotate(&mut doc, f);
        }
        self.out.line(&doc);
        self.out.flush();
        self.alerts.send(&doc);
        let id = self.agg.reserve_id();
        if let Err(e) = self.store.insert_event(id, "tamper", now, 1, &doc) {
            warn!("storing a tamper event: {e:#}");
        }
        // Once restored, a new change is a new occurrence.
        self.tamper_reported = !restored;
        self.watch.set_standing(!restored);
    }

    /// New sinks from a reloaded policy; the old ones get a moment to send
    /// what they hold.
    fn restart_alerts(&mut self, policy: &Policy) {
        match Dispatcher::start(policy, &self.host) {
            Ok(d) => {
                *self
                    .metrics
                    .alerts
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = d.stats();
                std::mem::replace(&mut self.alerts, d).stop(Duration::from_secs(1));
                info!(sinks = policy.alerts.len(), "alert sinks reconfigured");
            }
            Err(e) => error!("reload: the alert sinks could not start, the old ones stay: {e:#}"),
        }
    }

    /// Connections seeded because they predate egret's table, which the
    /// policy would not allow.
    fn report_preexisting(&mut self, list: &[apply::Preexisting]) {
        for c in list {
            warn!("{c}");
            let now = SystemTime::now();
            let doc = super::preexisting::document(now, c, &self.host);
            self.out.line(&doc);
            self.alerts.send(&doc);
            let id = self.agg.reserve_id();
            if let Err(e) = self
                .store
                .insert_event(id, super::preexisting::ACTION, now, 1, &doc)
            {
                warn!("storing a preexisting event: {e:#}");
            }
        }
        self.out.flush();
    }

    fn restore(&mut self, carry: bool) -> Result<()> {
        // Never a first load, though the table may be gone: only what egret
        // seeded before and is still open.
        let (rs, preexisting) = apply::compile_seeded(
            &self.policy,
            self.units.clone(),
            apply::Seeds::Kept(&self.seeded),
        )?;
        let nft = &mut self.nft;
        let mut swap = || {
            nft.apply_carrying(&rs, carry)
                .context("restoring the ruleset")
        };
        match &self.guard {
            Some(g) => g.swap(None, swap)?,
            None => swap()?,
        }
        let counts = self.counts();
        self.accounting.retire_vanished(self.last_live, counts);
        self.last_live = 0;
        self.expected = expected_rules(&rs);
        self.watch.expect(&rs);
        self.sets = set_sizes(&rs);
        self.seeded = seeded_sockets(&rs);
        info!("egret's table restored from the policy");
        self.report_preexisting(&preexisting);
        Ok(())
    }

    /// Swaps the whole ruleset; the old one's counts are kept in the books.
    /// With a DNS guard, the swap happens with its set writer held (and its
    /// configuration replaced by `guard_config`, if given).
    fn swap_ruleset(&mut self, rs: &Ruleset, guard_config: Option<GuardConfig>) -> Result<()> {
        let nft = &mut self.nft;
        let mut swap = || -> Result<u64> {
            let last = nft.logged_packets().ok().flatten().unwrap_or(0);
            nft.apply(rs).context("loading the ruleset")?;
            Ok(last)
        };
        let last = match &self.guard {
            Some(g) => g.swap(guard_config, swap)?,
            None => swap()?,
        };
        self.accounting.retire(last);
        self.sets = set_sizes(rs);
        self.expected = expected_rules(rs);
        self.watch.expect(rs);
        self.seeded = seeded_sockets(rs);
        Ok(())
    }

    fn reload(&mut self) {
        let Some(path) = self.opts.policy_path.clone() else {
            info!("reload: running on the embedded default policy; nothing to re-read");
            return;
        };
        let policy = match apply::load_policy_strict(&path) {
            Ok(p) => p,
            Err(crate::policy::LoadError::Unsafe(unsafe_files)) => {
                for f in &unsafe_files {
                    error!("reload: refusing an unsafe policy file: {f}");
                }
                error!("reload: someone other than root could change what egret allows; the running policy stays");
                return;
            }
            Err(crate::policy::LoadError::Invalid(errors)) => {
                for d in &errors.0 {
                    error!("{d}");
                }
                error!(
                    "reload: {} has {} error(s); the running policy stays",
                    path.display(),
                    errors.0.len()
                );
                return;
            }
        };
        if let Err(e) =
            crate::kernel::features::require(&policy, &crate::kernel::features::running_release())
        {
            error!("reload: {e}; the running policy stays");
            return;
        }
        if policy.log_group != self.policy.log_group {
            error!(
                "reload: log_group changed ({} → {}); that needs a restart. The running policy stays",
                self.policy.log_group, policy.log_group
            );
            return;
        }
        let listen = |p: &Policy| p.dns.as_ref().map(|d| d.listen);
        if listen(&policy) != listen(&self.policy) {
            error!("reload: the [dns] section was added, removed or its listen address changed; that needs a restart. The running policy stays");
            return;
        }
        if policy.metrics != self.policy.metrics {
            error!("reload: the [metrics] section was added, removed or its listen address changed; that needs a restart. The running policy stays");
            return;
        }
        if policy.api != self.policy.api {
            error!("reload: the [api] section was added, removed or changed; that needs a restart. The running policy stays");
            return;
        }
        let proxy_listen = |p: &Policy| p.proxy.as_ref().map(|x| x.listen);
        if proxy_listen(&policy) != proxy_listen(&self.policy) {
            error!("reload: the [proxy] section was added, removed or its listen address changed; that needs a restart. The running policy stays");
            return;
        }
        let units = apply::resolve_units(&policy);
        let guard_config = GuardConfig::from_policy(&policy);
        let applied =
            apply::compile_with_units(&policy, units.clone(), apply::Seeds::Kept(&self.seeded))
                .and_then(|rs| self.swap_ruleset(&rs, guard_config));
        match applied {
            Ok(()) => {
                if let (Some(p), Some(state)) = (&self.proxy, ProxyState::from_policy(&policy)) {
                    p.reload(state);
                }
                self.classifier.rules = policy.severity.clone();
                if (policy.scope, &policy.container_runtime)
                    != (self.policy.scope, &self.policy.container_runtime)
                {
                    self.containers = container_directory(&policy);
                }
                if policy.alerts != self.alerts.configs() || policy.mark != self.policy.mark {
                    self.restart_alerts(&policy);
                }
                info!(policy = %path.display(), mode = %policy.mode, rules = policy.rules.len(), "reloaded");
                self.policy = policy;
                record_settings(&mut self.store, &self.policy);
                self.units = units;
            }
            Err(e) => error!("reload failed, the running policy stays: {e:#}"),
        }
    }

    /// Set sizes for the metrics: compiled counts, and the kernel's for the
    /// timeout sets the DNS guard fills.
    fn count_set_elements(&mut self) {
        let mut sizes = std::collections::BTreeMap::new();
        for (set, n) in &self.sets {
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
        self.metrics.set_elements(sizes);
    }

    /// A restarted unit gets a new cgroup (new id): follow it, or its
    /// `units` rules would silently stop matching.
    fn refresh_units(&mut self) {
        if !self.policy.rules.iter().any(|r| !r.units.is_empty()) {
            return;
        }
        let units = apply::resolve_units(&self.policy);
        if units == self.units {
            return;
        }
        let seeds = apply::Seeds::Kept(&self.seeded);
        let rs = match apply::compile_with_units(&self.policy, units.clone(), seeds) {
            Ok(rs) => rs,
            Err(e) => return warn!("recompiling for changed unit cgroups: {e:#}"),
        };
        let cg_sets = |rs: &Ruleset| -> Vec<String> {
            rs.sets
                .iter()
                .filter(|s| is_cgroup_set(&s.name))
                .map(|s| s.name.clone())
                .collect()
        };
        let live = apply::compile_with_units(&self.policy, self.units.clone(), seeds).ok();
        let same_shape = live.as_ref().is_some_and(|l| cg_sets(l) == cg_sets(&rs));
        let result = if same_shape {
            // Same sets, new members: swap elements only (counters survive).
            let swapped: Vec<&crate::ruleset::Set> =
                rs.sets.iter().filter(|s| is_cgroup_set(&s.name)).collect();
            swapped
                .iter()
                .try_for_each(|s| {
                    self.nft.replace_elements(s, &s.elements)?;
                    // Only this set changed: the rest of the table (the
                    // seeds loaded before, some closed since) is as it was.
                    self.watch.expect_elements(&[s]);
                    if let Some((_, n)) = self.sets.iter_mut().find(|(x, _)| x.name == s.name) {
                        *n = s.elements.len() as u64;
                    }
                    Ok(())
                })
                .map_err(|e: crate::kernel::nft::NftError| anyhow::Error::from(e))
        } else {
            self.swap_ruleset(&rs, None)
        };
        match result {
            Ok(()) => {
                info!(units = ?units.keys().collect::<Vec<_>>(), "unit cgroups changed; unit rules follow them");
                self.units = units;
            }
            Err(e) => warn!("updating unit cgroups: {e:#}"),
        }
    }

    /// Stops the DNS guard and the proxy (their reports are inputs).
    fn stop_inputs(&mut self) {
        if let Some(g) = self.guard.take() {
            g.stop();
        }
        if let Some(p) = self.proxy.take() {
            p.stop();
        }
    }

    fn finish(&mut self) {
        self.stop_inputs();
        if let Some(m) = self.metrics_server.take() {
            m.stop();
        }
        if let Some(a) = self.api_server.take() {
            a.stop();
        }
        self.tick(true);
        // Settle the books: let the kernel flush, read once more.
        std::thread::sleep(Duration::from_millis(50));
        self.account();
        self.out.flush();
        let alerts = std::mem::replace(&mut self.alerts, Dispatcher::none());
        alerts.stop(ALERTS_GRACE);
        let f = self.accounting.figures(self.counts());
        info!(
            received = f.received,
            lost = f.lost(),
            kernel_logged = f.kernel_logged,
            "stopped"
        );
    }
}

/// The name of interface `index` in this network namespace, or its number.
fn interface_name(index: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes, NUL included.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("if{index}");
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// A ruleset's rules as the kernel lists them, counters zeroed.
fn expected_rules(rs: &Ruleset) -> Vec<(String, crate::ruleset::Rule)> {
    normalized(
        rs.chains
            .iter()
            .flat_map(|c| c.rules.iter().map(move |r| (c.name.clone(), r.clone())))
            .collect(),
    )
}

/// Rules with their counters zeroed, sorted by chain (the kernel lists chains
/// in its own order; within a chain the order is the rules' order).
fn normalized(
    mut rules: Vec<(String, crate::ruleset::Rule)>,
) -> Vec<(String, crate::ruleset::Rule)> {
    for (_, r) in &mut rules {
        if r.counter.is_some() {
            r.counter = Some(crate::ruleset::Counter::default());
        }
    }
    rules.sort_by(|a, b| a.0.cmp(&b.0));
    rules
}

/// Element counts of a compiled ruleset's sets (timeout sets are counted live).
fn set_sizes(rs: &Ruleset) -> Vec<(crate::ruleset::Set, u64)> {
    rs.sets
        .iter()
        .map(|s| {
            let shape = crate::ruleset::Set {
                elements: Vec::new(),
                ..s.clone()
            };
            (shape, s.elements.len() as u64)
        })
        .collect()
}

/// What `rs` seeds, to keep across later loads. Unknown (sock_diag failed):
/// nothing, so a later load seeds nothing rather than anything new.
fn seeded_sockets(rs: &Ruleset) -> std::collections::BTreeSet<apply::SeededSocket> {
    apply::seeded_sockets(rs).unwrap_or_else(|e| {
        warn!("remembering the seeded connections: {e:#}; later loads seed none");
        Default::default()
    })
}

fn is_cgroup_set(name: &str) -> bool {
    name.rsplit_once("_cg")
        .is_some_and(|(_, level)| !level.is_empty() && level.bytes().all(|b| b.is_ascii_digit()))
}
