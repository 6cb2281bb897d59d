//! `egret run`: applies the policy, then turns every logged packet into an
//! attributed, deduplicated event until SIGTERM/SIGINT. SIGHUP (or `egret
//! reload`) swaps in a re-read policy; an invalid one is refused and the old
//! one stays. On exit the ruleset stays loaded: egress stays filtered (fail
//! closed) and a later `egret run` picks up where this one left off.
//!
//! The composition root, above `monitor`, `alert`, `dns`, `proxy` and `api`
//! (which never import it), below `cli`:
//! - this file: the start-up order (pid file, alerts, NFLOG, services, then
//!   the ruleset) and the shut-down order;
//! - `services`: what starts and stops together (DNS guard, proxy, API,
//!   metrics endpoint);
//! - `main_loop`: the loop over one closed `Event` enum and what each event does;
//! - `publish`: the one path a document takes (stdout and the live feed,
//!   alerts, the store);
//! - `books`: loss accounting, the books in the store, heartbeat and metrics;
//! - `table`: tamper detection and restore;
//! - `reload`: a re-read policy, and unit cgroups that changed.

mod books;
mod main_loop;
pub mod metrics;
pub mod preexisting;
mod publish;
mod reload;
mod revalidation;
mod services;
mod table;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use tracing::{error, info, warn};

use crate::alert::severity::Classifier;
use crate::alert::Dispatcher;
use crate::apply;
use crate::dns::RefusedQuery;
use crate::kernel::nft::Nftables;
use crate::monitor::accounting::Accounting;
use crate::monitor::attribution::Attributor;
use crate::monitor::containers::ContainerDirectory;
use crate::monitor::event;
use crate::monitor::incident::Aggregator;
use crate::monitor::nflog::{BindError, LoggedPacket, NflogConfig, NflogReader};
use crate::monitor::store::{Retention, Store};
use crate::pidfile::PidFile;
use crate::policy::Policy;
use crate::proxy::ProxyDenial;

use books::Books;
use main_loop::Daemon;
use publish::{Outlet, Output, Route};
use services::Services;

/// What the NFLOG reader, the DNS guard and the proxy hand to the loop.
pub enum Input {
    Packet(LoggedPacket),
    Query(Box<RefusedQuery>),
    Proxy(Box<ProxyDenial>),
    /// A name (guard) or host (proxy) only a wildcard allows, first asked
    /// by its identity as far as the sender's filter knows (`[novelty]`).
    Name(Box<crate::monitor::names::NameSeen>),
    /// The DNS guard's verdict on a blocked address it once allowed.
    Revalidated(Box<crate::dns::Revalidation>),
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

const CHANNEL_DEPTH: usize = 16_384;
/// At exit, alert sinks may take this long to send what they hold.
const ALERTS_GRACE: Duration = Duration::from_secs(3);

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

pub fn run(opts: RunOptions, policy: Policy) -> Result<()> {
    crate::kernel::features::require(&policy, &crate::kernel::features::running_release())
        .map_err(anyhow::Error::msg)?;
    let signals = Signals::register().context("installing signal handlers")?;
    let store = Store::open_for(&opts.state_dir, Some(policy.access_group()))?;
    let _pid_file = PidFile::create(&opts.state_dir)?;
    run_inner(opts, policy, store, signals)
}

/// For `egret suggest` and `egret doctor` from the state dir alone.
fn record_settings(store: &mut Store, policy: &Policy) {
    let settings = crate::audit::policy_text::settings(policy, policy.mode);
    if let Err(e) = store.record_run_settings(policy, &settings, SystemTime::now()) {
        warn!("recording the policy's settings in the store: {e:#}");
    }
}

fn run_inner(opts: RunOptions, policy: Policy, mut store: Store, signals: Signals) -> Result<()> {
    let epoch = Instant::now();
    let mut nft = Nftables::open().context("opening nf_tables netlink")?;
    let while_down = logged_while_down(&mut nft, &store)?;
    let cfg = nflog_config(&policy, &opts);
    let (tx, rx) = sync_channel::<Input>(CHANNEL_DEPTH);
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    // Started first, so that even a failed start can be reported.
    let alerts = Dispatcher::start(&policy, &host)?;
    let mut early = Vec::new();
    let reader = match NflogReader::bind(cfg, epoch, &mut |p| early.push(p)) {
        Ok(r) => r,
        Err(e) => {
            let mut outlet = Outlet::new(Output::stdout(Default::default()), alerts);
            if let BindError::Busy(group) = e {
                let now = SystemTime::now();
                let doc = event::nflog_taken(now, group, &host);
                let id = store.next_incident_id()?;
                outlet.publish(&mut store, doc, Route::event(id, "nflog-taken", now, 1));
            }
            outlet.alerts.stop(ALERTS_GRACE);
            return Err(e.into());
        }
    };
    let stats = Arc::clone(&reader.stats);

    // The guard, the proxy and the HTTP servers bind their ports before
    // anything changes in the kernel, so a port in use fails the start cleanly.
    let services = Services::start(&policy, &opts.state_dir, &tx, alerts.stats())?;

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
    crate::monitor::systemd::notify("READY=1\nSTATUS=watching blocked egress");
    let reader_thread = spawn_reader(reader, early, tx, Arc::clone(&signals.stop))?;

    let mut accounting = Accounting::new(cfg.flush);
    accounting.add_while_down(while_down);
    let mut agg = Aggregator::new(store.next_incident_id()?);
    agg.update_every = opts.update_every;
    let mut daemon = Daemon {
        agg,
        classifier: Classifier::new(policy.severity.clone()),
        outlet: Outlet::new(Output::stdout(services.feed.clone()), alerts),
        store,
        opts,
        containers: container_directory(&policy),
        policy,
        units,
        nft,
        attributor: Attributor::new(),
        books: Books::new(accounting, stats, Arc::clone(&services.dropped), epoch),
        host,
        services,
        timeline: Default::default(),
        table: table::Loaded::new(&rs),
        new_since_prune: 0,
        held: Default::default(),
        novelty: Default::default(),
    };
    daemon.report_preexisting(&preexisting);
    // At once, so `status` shows this daemon (its pid) from its first moment.
    daemon.write_books();
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
    daemon.services.stop_inputs();
    daemon.books.reader_stopped = true;
    while let Ok(p) = rx.try_recv() {
        daemon.handle(p);
    }
    daemon.finish();
    result
}

/// Packets logged while no daemon listened never reached anyone: they are
/// booked as lost.
fn logged_while_down(nft: &mut Nftables, store: &Store) -> Result<u64> {
    let live_before = nft
        .logged_packets()
        .context("reading egret's log counters")?;
    let seen_at_exit: Option<u64> = store
        .counter("live_logged_at_exit")?
        .and_then(|s| s.parse().ok());
    Ok(match (live_before, seen_at_exit) {
        (Some(now), Some(then)) if now >= then => now - then,
        (Some(now), _) => now,
        (None, _) => 0,
    })
}

fn nflog_config(policy: &Policy, opts: &RunOptions) -> NflogConfig {
    let mut cfg = NflogConfig::new(policy.log_group);
    if let Some(b) = opts.nflog_rcvbuf {
        cfg.rcvbuf = b;
    }
    if let Some(q) = opts.nflog_qthresh {
        cfg.qthresh = q;
    }
    cfg
}

/// The NFLOG reader's thread: what arrived while binding, then the socket
/// until `stop` (or until the loop is gone).
fn spawn_reader(
    mut reader: NflogReader,
    early: Vec<LoggedPacket>,
    tx: SyncSender<Input>,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<std::io::Result<()>>> {
    std::thread::Builder::new()
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
        .context("starting the NFLOG reader")
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
