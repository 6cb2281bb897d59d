//! The loop of `egret run`: one closed `Event` enum (inputs, signals, timers)
//! and what each one does to the daemon's state.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Result};
use tracing::{debug, info, warn};

use super::books::Books;
use super::publish::{Keep, Outlet, Route};
use super::revalidation::{HeldPacket, Hold};
use super::services::Services;
use super::table::Loaded;
use super::{Input, RunOptions, Signals, ALERTS_GRACE};
use crate::alert::severity::Classifier;
use crate::alert::Dispatcher;
use crate::dns::RefusedQuery;
use crate::kernel::nft::Nftables;
use crate::monitor::attribution::{Attribution, Attributor, Method};
use crate::monitor::containers::{ContainerDirectory, Lookup};
use crate::monitor::event;
use crate::monitor::event::{ProxyRequest, Subject};
use crate::monitor::held::Held;
use crate::monitor::incident::{Aggregator, Observation};
use crate::monitor::nflog::{LoggedPacket, LoggedVerdict};
use crate::monitor::store::Store;
use crate::policy::Policy;
use crate::proxy::ProxyDenial;
use crate::ruleset::{UnitCgroups, DNS_GUARD_RULE};
use crate::text;

/// How long the loop waits for input before looking at signals and timers.
const TICK: Duration = Duration::from_millis(250);
/// Inputs taken in one turn before signals and timers are looked at again.
const BATCH: usize = 4096;

/// Everything the loop reacts to.
pub(super) enum Event {
    Input(Input),
    /// SIGTERM/SIGINT.
    Stop,
    /// SIGHUP (`egret reload`).
    Reload,
    Timer(Timer),
}

/// The loop's periodic work, in the order it runs within a turn.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Timer {
    /// Due incident updates, the store's batch, the timeline.
    Flush,
    /// Foreign transactions on egret's table, and the periodic comparison.
    Table,
    /// The kernel's log counters against what was received.
    Account,
    /// Cached socket attributions past their time to live.
    ExpireSockets,
    /// Restarted units' new cgroups.
    Units,
    Heartbeat,
    /// The host sets' sizes for the metrics.
    SetSizes,
    Prune,
}

impl Timer {
    const ALL: [Timer; 8] = [
        Timer::Flush,
        Timer::Table,
        Timer::Account,
        Timer::ExpireSockets,
        Timer::Units,
        Timer::Heartbeat,
        Timer::SetSizes,
        Timer::Prune,
    ];
}

const ACCOUNT_EVERY: Duration = Duration::from_secs(1);
const UNITS_EVERY: Duration = Duration::from_secs(2);
/// How often the host sets' sizes are read from the kernel for the metrics.
const SET_SIZES_EVERY: Duration = Duration::from_secs(10);
/// Retention (`--retention`, `--max-events`, `--max-seen`) is enforced this
/// often, and also once a tenth of `--max-events` new incidents were stored,
/// so the bounds hold within a minute even under a flood.
const PRUNE_EVERY: Duration = Duration::from_secs(30);
/// How often cached socket attributions past their time to live are dropped.
const SOCKET_EXPIRE_EVERY: Duration = Duration::from_secs(5);

/// When each timer last fired (None: not yet, so it fires on the first turn).
struct Timers {
    last: [Option<Instant>; Timer::ALL.len()],
}

impl Timers {
    fn new(now: Instant) -> Timers {
        let mut last = [Some(now); Timer::ALL.len()];
        // The books and the set sizes are read on the first turn.
        for t in [Timer::Account, Timer::SetSizes] {
            last[t as usize] = None;
        }
        Timers { last }
    }

    /// The timers due at `now` (a period of zero: every turn; None: off).
    fn due(&mut self, now: Instant, period: impl Fn(Timer) -> Option<Duration>) -> Vec<Timer> {
        Timer::ALL
            .into_iter()
            .filter(|&t| {
                let last = &mut self.last[t as usize];
                let due =
                    period(t).is_some_and(|p| last.map_or(true, |l| now.duration_since(l) >= p));
                if due {
                    *last = Some(now);
                }
                due
            })
            .collect()
    }
}

pub(super) struct Daemon {
    pub opts: RunOptions,
    pub policy: Policy,
    pub units: UnitCgroups,
    pub nft: Nftables,
    pub store: Store,
    pub agg: Aggregator,
    pub attributor: Attributor,
    /// Loss accounting and what was reported of it.
    pub books: Books,
    pub outlet: Outlet,
    pub host: String,
    pub services: Services,
    /// Attempts per (unix minute, action) not yet written to the store.
    pub timeline: BTreeMap<(i64, &'static str), u64>,
    /// What egret loaded, and changes to it egret did not make.
    pub table: Loaded,
    /// Grades incidents (written into every document).
    pub classifier: Classifier,
    /// scope = "host+containers": container names by address.
    pub containers: Option<ContainerDirectory>,
    /// New incidents since the store was last pruned.
    pub new_since_prune: u64,
    /// Blocked packets waiting for the DNS guard's revalidation verdict.
    pub held: Held<HeldPacket>,
    /// What each identity's allowed flows were (`[novelty]`).
    pub novelty: crate::monitor::novelty::Memory,
}

impl Daemon {
    pub fn main_loop(
        &mut self,
        rx: &Receiver<Input>,
        signals: &Signals,
        reader: &std::thread::JoinHandle<std::io::Result<()>>,
    ) -> Result<()> {
        let mut timers = Timers::new(Instant::now());
        loop {
            let first = match rx.recv_timeout(TICK) {
                Ok(input) => Some(input),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) if signals.stop.load(Ordering::Relaxed) => None,
                Err(RecvTimeoutError::Disconnected) => bail!("the NFLOG reader stopped"),
            };
            // Take what is queued before looking at the clock again.
            let inputs = first.into_iter().chain(rx.try_iter().take(BATCH));
            for input in inputs {
                // An input never ends the loop.
                let _ = self.on(Event::Input(input));
            }
            // The guard holds a sender too, so a dead reader does not disconnect the channel.
            let stop = signals.stop.load(Ordering::Relaxed);
            if reader.is_finished() && !stop {
                bail!("the NFLOG reader stopped");
            }
            // Then, in this order: stop, reload, the timers that are due.
            let mut events = Vec::new();
            if stop {
                events.push(Event::Stop);
            }
            if signals.reload.swap(false, Ordering::Relaxed) {
                events.push(Event::Reload);
            }
            let due = timers.due(Instant::now(), |t| self.period(t));
            events.extend(due.into_iter().map(Event::Timer));
            for e in events {
                if self.on(e).is_break() {
                    return Ok(());
                }
            }
        }
    }

    /// How often `timer` runs now (zero: every turn; None: not at all).
    fn period(&self, timer: Timer) -> Option<Duration> {
        match timer {
            Timer::Flush => Some(TICK),
            Timer::Table => Some(Duration::ZERO),
            Timer::Account => Some(ACCOUNT_EVERY),
            Timer::ExpireSockets => Some(SOCKET_EXPIRE_EVERY),
            Timer::Units => Some(UNITS_EVERY),
            Timer::Heartbeat => self.policy.heartbeat,
            Timer::SetSizes => self
                .services
                .metrics_server
                .is_some()
                .then_some(SET_SIZES_EVERY),
            Timer::Prune => {
                let prune_after = (self.opts.retention.max_rows / 10).max(100);
                Some(if self.new_since_prune >= prune_after {
                    Duration::ZERO
                } else {
                    PRUNE_EVERY
                })
            }
        }
    }

    fn on(&mut self, event: Event) -> ControlFlow<()> {
        match event {
            Event::Input(input) => self.handle(input),
            Event::Stop => {
                crate::monitor::systemd::notify("STOPPING=1");
                info!("stopping; the ruleset stays loaded (`egret remove` deletes it)");
                return ControlFlow::Break(());
            }
            Event::Reload => {
                crate::monitor::systemd::notify("RELOADING=1");
                self.reload();
                crate::monitor::systemd::notify("READY=1\nSTATUS=watching blocked egress");
            }
            Event::Timer(Timer::Flush) => self.tick(false),
            Event::Timer(Timer::Table) => self.watch_table(),
            Event::Timer(Timer::Account) => self.account(),
            Event::Timer(Timer::ExpireSockets) => self.attributor.expire(Instant::now()),
            Event::Timer(Timer::Units) => self.refresh_units(),
            Event::Timer(Timer::Heartbeat) => self.heartbeat(),
            Event::Timer(Timer::SetSizes) => self.count_set_elements(),
            Event::Timer(Timer::Prune) => {
                self.new_since_prune = 0;
                match self.store.prune(self.opts.retention, SystemTime::now()) {
                    Ok(n) if n > 0 => debug!(events = n, "pruned events past retention"),
                    Ok(_) => {}
                    Err(e) => warn!("pruning the event store: {e:#}"),
                }
            }
        }
        ControlFlow::Continue(())
    }

    pub fn handle(&mut self, input: Input) {
        match input {
            Input::Packet(p) => self.packet(p),
            Input::Query(q) => self.refused_query(*q),
            Input::Proxy(d) => self.proxy_denial(*d),
            Input::Name(n) => self.new_name(*n),
            Input::Revalidated(r) => self.revalidated(*r),
        }
    }

    fn proxy_denial(&mut self, mut d: ProxyDenial) {
        if let Some((_, src)) = d.attribution.ingress {
            self.name_container(&mut d.attribution, src);
        }
        // The method is the client's own token (hyper takes any length).
        if text::bound(&mut d.method, text::SHORT_MAX) {
            d.attribution.truncated.push("http.request.method");
        }
        let verdict = LoggedVerdict {
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
        if !p.first_seen {
            self.services.metrics.packet(p.verdict.blocked);
        }
        let flow = p.flow.as_ref().ok();
        let mut who = self.attributor.attribute(flow, p.uid, p.gid);
        if let (Some(index), Some(f), None) = (p.indev, flow, p.uid) {
            who.ingress = Some((crate::kernel::link::interface_name(index), f.src));
            who.method = Method::Bridge;
            self.name_container(&mut who, f.src);
        }
        let mut resolved = flow.and_then(|f| {
            self.services
                .recent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&f.dst, Instant::now())
        });
        if p.first_seen {
            return self.first_seen(&p, &who, resolved.as_ref());
        }
        if let (true, Some(f)) = (p.verdict.blocked, flow) {
            match self.hold_for_revalidation(&p.verdict, f, &who, p.received) {
                Hold::Held => return,
                Hold::Report => {}
                Hold::Limited(mut limited) => {
                    if let Some(r) = &resolved {
                        limited.asked_by = r.asked_by.clone();
                    }
                    resolved = Some(*limited);
                }
            }
        }
        self.record(Observation {
            verdict: &p.verdict,
            subject: Subject::Packet(flow.copied()),
            attribution: &who,
            resolved: resolved.as_ref(),
            at: p.received,
        });
    }

    /// A container's address (forwarded packet, or a query or proxy request
    /// that came in on a bridge): its name, id and image, if the runtime knows it.
    fn name_container(&self, who: &mut Attribution, src: IpAddr) {
        let Some(Lookup::Found(c)) = self.containers.as_ref().map(|d| d.lookup(src)) else {
            return;
        };
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

    /// A flow an allow rule accepted that the kernel's filter had not seen:
    /// reported once per (identity, destination, port, protocol), ever.
    fn first_seen(
        &mut self,
        p: &LoggedPacket,
        who: &crate::monitor::attribution::Attribution,
        resolved: Option<&crate::monitor::event::ResolvedName>,
    ) {
        use crate::monitor::novelty::Verdict;
        let Ok(flow) = &p.flow else {
            self.services.metrics.novelty(Verdict::Excluded);
            return;
        };
        let verdict = self.novelty.judge(
            &self.policy.novelty,
            &who.identity(),
            flow,
            p.received,
            &mut self.store,
        );
        self.services.metrics.novelty(verdict);
        if verdict != Verdict::New {
            return;
        }
        self.record(Observation {
            verdict: &p.verdict,
            subject: Subject::AllowedNew(*flow),
            attribution: who,
            resolved,
            at: p.received,
        });
    }

    /// A name (guard) or proxy host only a wildcard allows, which the
    /// sender's filter had not seen this identity ask: reported once per
    /// (identity, name), ever (the store decides).
    fn new_name(&mut self, mut n: crate::monitor::names::NameSeen) {
        use crate::monitor::event::{NewHost, NewName};
        use crate::monitor::names::{self, Asked};
        if let Some((_, src)) = n.attribution.ingress {
            self.name_container(&mut n.attribution, src);
        }
        // Bounded like a refused query's name or a denied request's host.
        let (name, field) = match &mut n.asked {
            Asked::Dns(q) => (&mut q.name, "dns.question.name"),
            Asked::Proxy(p) => (&mut p.host, "destination.domain"),
        };
        if text::bound(name, text::NAME_MAX) {
            n.attribution.truncated.push(field);
        }
        if text::bound(&mut n.pattern, text::NAME_MAX) {
            n.attribution.truncated.push("egret.novelty.pattern");
        }
        let identity = n.attribution.identity();
        // An identity already flooding (DNS tunnelling through an allowed
        // zone asks thousands of names a second) folds into its flood
        // without a store write per name: the loop keeps up, and its names
        // do not evict what the memory holds for everybody else. They are
        // not remembered one by one.
        let who = crate::monitor::flood::Who {
            identity: identity.clone(),
            uid: n.attribution.uid,
            unit: n.attribution.unit.clone(),
        };
        let verdict = if self.agg.floods.flood_of(&who).is_some()
            && !crate::monitor::novelty::excluded(
                &self.policy.novelty,
                &identity,
                &crate::monitor::novelty::identity_key(&identity),
            ) {
            crate::monitor::novelty::Verdict::New
        } else {
            names::judge(&self.policy.novelty, &identity, &n, &mut self.store)
        };
        let dns = matches!(n.asked, Asked::Dns(_));
        self.services.metrics.new_name(dns, verdict);
        if verdict != crate::monitor::novelty::Verdict::New {
            return;
        }
        let subject = match n.asked {
            Asked::Dns(question) => Subject::NameNew(Box::new(NewName {
                question,
                pattern: n.pattern,
            })),
            Asked::Proxy(mut request) => {
                if text::bound(&mut request.method, text::SHORT_MAX) {
                    n.attribution.truncated.push("http.request.method");
                }
                Subject::ProxyNew(Box::new(NewHost {
                    request,
                    pattern: n.pattern,
                }))
            }
        };
        let verdict = LoggedVerdict {
            blocked: false,
            rule: Some(n.rule),
        };
        self.record(Observation {
            verdict: &verdict,
            subject,
            attribution: &n.attribution,
            resolved: None,
            at: n.at,
        });
    }

    fn refused_query(&mut self, mut q: RefusedQuery) {
        if let Some((_, src)) = q.attribution.ingress {
            self.name_container(&mut q.attribution, src);
        }
        // hickory caps names at 255 bytes; the cap keeps that promise here.
        if text::bound(&mut q.question.name, text::NAME_MAX) {
            q.attribution.truncated.push("dns.question.name");
        }
        let verdict = LoggedVerdict {
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

    pub(super) fn record(&mut self, o: Observation<'_>) {
        let action = o.action().as_str();
        let minute =
            o.at.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64 / 60)
                .unwrap_or(0);
        *self.timeline.entry((minute, action)).or_default() += 1;
        if let Some(inc) = self.agg.record(o) {
            self.services.metrics.incident(
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
            // During `[novelty] learn`, first-seen flows and names are
            // recorded only.
            let learning =
                matches!(
                    inc.action(),
                    event::Action::AllowedNew | event::Action::NameNew | event::Action::ProxyNew
                ) && self
                    .novelty
                    .learning(&self.policy.novelty, inc.first_seen, &mut self.store);
            let route = Route {
                alert: !learning,
                flush: true,
                keep: Keep::Incident(Box::new(inc.clone())),
            };
            self.outlet.publish(&mut self.store, doc, route);
        }
    }

    /// Emits due updates and writes everything pending to the store.
    pub fn tick(&mut self, force: bool) {
        // Held packets whose verdict is late (all of them when stopping) go
        // out as blocks before the flush.
        self.overdue_revalidations(force);
        let now = SystemTime::now();
        for inc in self.agg.due(now, force) {
            let mut doc = event::incident(&inc, true, &self.host);
            event::set_severity(&mut doc, self.classifier.of(&inc));
            let route = Route {
                alert: false,
                flush: false,
                keep: Keep::Incident(Box::new(inc)),
            };
            self.outlet.publish(&mut self.store, doc, route);
        }
        self.agg.close_idle(now);
        for doc in self.outlet.alerts.failure_events(&self.host) {
            let route = Route {
                alert: false,
                flush: false,
                ..Route::event(self.agg.reserve_id(), "alert-failed", now, 1)
            };
            self.outlet.publish(&mut self.store, doc, route);
        }
        self.outlet.flush();
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
        self.outlet.write_pending(&mut self.store);
    }

    pub fn finish(&mut self) {
        self.services.stop();
        self.tick(true);
        // Settle the books: let the kernel flush, read once more.
        std::thread::sleep(Duration::from_millis(50));
        self.account();
        self.outlet.flush();
        let alerts = std::mem::replace(&mut self.outlet.alerts, Dispatcher::none());
        alerts.stop(ALERTS_GRACE);
        let f = self.books.figures();
        info!(
            received = f.received,
            lost = f.lost(),
            kernel_logged = f.kernel_logged,
            "stopped"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn periods(t: Timer) -> Option<Duration> {
        match t {
            Timer::Flush => Some(TICK),
            Timer::Table => Some(Duration::ZERO),
            Timer::Account => Some(ACCOUNT_EVERY),
            Timer::Units => Some(UNITS_EVERY),
            Timer::SetSizes => None,
            _ => Some(Duration::from_secs(3600)),
        }
    }

    #[test]
    fn timers_fire_by_their_period_in_a_fixed_order() {
        let start = Instant::now();
        let mut timers = Timers::new(start);
        // First turn: the per-turn comparison, and the books read at once;
        // the set sizes are off.
        assert_eq!(timers.due(start, periods), [Timer::Table, Timer::Account]);
        let t = start + Duration::from_millis(300);
        assert_eq!(timers.due(t, periods), [Timer::Flush, Timer::Table]);
        let t = start + Duration::from_millis(1100);
        assert_eq!(
            timers.due(t, periods),
            [Timer::Flush, Timer::Table, Timer::Account]
        );
        let t = start + Duration::from_secs(2);
        assert_eq!(
            timers.due(t, periods),
            [Timer::Flush, Timer::Table, Timer::Units]
        );
        // The set sizes, off until now and never read, are read at once.
        let on = |t: Timer| (t == Timer::SetSizes).then_some(Duration::from_secs(1));
        assert_eq!(timers.due(t, on), [Timer::SetSizes]);
        assert_eq!(timers.due(t, on), []);
    }
}
