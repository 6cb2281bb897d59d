//! The DNS guard's server: UDP and TCP on the policy's `[dns] listen`, one
//! tokio thread. Cache hits are answered inline on the receive loop; misses,
//! refusals and TCP connections are tasks. A miss stays on that thread: the
//! kernel set write (one netlink transaction, acknowledged within its send)
//! and a cached attribution are done inline, because each hop to another
//! thread cost a wake-up and, on a loaded host, a wait for a core. Only what
//! can take long goes to tokio's blocking pool: `/proc` scans for a socket not
//! seen before, and a set write while a ruleset swap holds the writer.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tracing::{debug, warn};

use crate::local_http::{AcceptErrors, Caps, PeerUids};

use super::batch::{self, Batcher};
use super::cache::{Cache, CacheKey};
use super::message::{self, Incoming, Query};
use super::revalidate::{self, Outcome, Request, Revalidator, Work};
use super::sets::{HostSets, RecentNames};
use super::upstream;
use crate::monitor::attribution::{Attribution, Attributor};
use crate::monitor::books::{LocalResolver, StubCounts};
use crate::monitor::event::DnsQuestion;
use crate::monitor::names::{self, Asked, NameSeen};
use crate::policy::{DnsConfig, HostPattern, Mode, Policy, Scope};

const TCP_CLIENT_IDLE: Duration = Duration::from_secs(10);
/// TCP connections open at once, and per client (uid, else address).
const TCP_MAX_CLIENTS: usize = 256;
const TCP_MAX_PER_CLIENT: usize = 32;
const CACHE_ENTRIES: usize = 20_000;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// What the guard needs from the policy. Swapped whole on reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardConfig {
    pub dns: DnsConfig,
    pub mark: u32,
    /// Audit mode: forward every name, report those no rule allows.
    pub audit: bool,
    /// Rules with `hosts`: name and patterns.
    pub rules: Vec<(String, Vec<HostPattern>)>,
    /// Whether `[novelty]` tracks each of `rules` (same order): a name only
    /// its wildcards allow is reported the first time an identity asks it.
    pub tracked: Vec<bool>,
    /// Some tracked rule has a wildcard: names are watched at all.
    pub watching: bool,
    /// scope = "host+containers": the listener container bridges' DNS is
    /// redirected to, and the bridges (names, `*` patterns) that name a client.
    pub containers: Option<(SocketAddr, Vec<String>)>,
}

impl GuardConfig {
    pub fn from_policy(p: &Policy) -> Option<GuardConfig> {
        let dns = p.dns.clone()?;
        Some(GuardConfig {
            containers: (p.scope == Scope::HostAndContainers)
                .then(|| (dns.container_listen, p.container_interfaces.clone())),
            dns,
            mark: p.mark,
            audit: p.mode == Mode::Audit,
            rules: p
                .host_rules()
                .map(|r| (r.name.clone(), r.hosts.clone()))
                .collect(),
            tracked: p.host_rules().map(|r| p.novelty.tracks(&r.name)).collect(),
            watching: p
                .host_rules()
                .any(|r| p.novelty.tracks(&r.name) && r.hosts.iter().any(|h| h.is_wildcard())),
        })
    }

    /// The tracked rule whose wildcard alone allows `name`, and the wildcard
    /// (`monitor::names::watched`).
    pub fn watched(&self, name: &str) -> Option<(&str, &HostPattern)> {
        if !self.watching {
            return None;
        }
        let rules = self
            .rules
            .iter()
            .zip(&self.tracked)
            .map(|((rule, patterns), t)| (rule.as_str(), &patterns[..], *t));
        names::watched(rules, name)
    }

    /// The listener's address: `[dns] listen` or the containers'.
    fn listen_for(&self, listener: Listener) -> SocketAddr {
        match (listener, &self.containers) {
            (Listener::Containers, Some((l, _))) => *l,
            _ => self.dns.listen,
        }
    }

    /// Does any rule allow `name` (wire form)?
    pub fn allows(&self, name: &str) -> bool {
        self.rules
            .iter()
            .any(|(_, pats)| pats.iter().any(|p| p.matches(name)))
    }

    /// The rules whose host patterns match `name` (wire form).
    pub fn matching(&self, name: &str) -> Vec<String> {
        self.rules
            .iter()
            .filter(|(_, pats)| pats.iter().any(|p| p.matches(name)))
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// A query the guard refused, or would have in audit mode.
#[derive(Debug, Clone)]
pub struct RefusedQuery {
    pub question: DnsQuestion,
    pub attribution: Attribution,
    pub blocked: bool,
    pub at: SystemTime,
}

#[derive(Debug, Default)]
pub struct GuardStats {
    pub queries: AtomicU64,
    pub cache_hits: AtomicU64,
    pub forwarded: AtomicU64,
    pub refused: AtomicU64,
    pub upstream_failures: AtomicU64,
    pub set_failures: AtomicU64,
    /// accept() failures (EMFILE...), waited out.
    pub tcp_accept_errors: AtomicU64,
    /// TCP connections closed at once: their client, or everyone, was at the cap.
    pub tcp_refused: AtomicU64,
    /// Revalidation on block, copied from the revalidator after each change.
    pub revalidation: Mutex<revalidate::Stats>,
    /// Attributed queries asked by a local resolver (systemd-resolved,
    /// dnsmasq...): the program behind it is lost.
    pub via_stub: Mutex<StubCounts>,
    /// Names only a wildcard allows, handed to the daemon the first time an
    /// identity asked them (`[novelty]`; a full pipeline counts them lost).
    pub names_new: AtomicU64,
    /// (identity, name) pairs the guard's novelty filter holds.
    pub names_held: AtomicU64,
}

impl GuardStats {
    pub fn revalidation(&self) -> revalidate::Stats {
        *lock(&self.revalidation)
    }

    pub fn via_stub(&self) -> StubCounts {
        *lock(&self.via_stub)
    }

    /// Counts a query whose asker is a local resolver.
    fn asked_by(&self, a: &Attribution) {
        let stub = a
            .process
            .as_ref()
            .and_then(|p| p.executable.as_deref())
            .and_then(LocalResolver::of_executable);
        if let Some(stub) = stub {
            lock(&self.via_stub).add(stub);
        }
    }
}

type OnRefused = Box<dyn Fn(RefusedQuery) + Send + Sync>;
type OnNewName = Box<dyn Fn(NameSeen) + Send + Sync>;

struct Shared {
    config: RwLock<Arc<GuardConfig>>,
    cache: Mutex<Cache>,
    sets: Arc<Mutex<HostSets>>,
    recent: Arc<Mutex<RecentNames>>,
    attributor: Arc<Mutex<Attributor>>,
    on_refused: OnRefused,
    /// (identity, name) pairs already handed over as new; only the guard's
    /// thread takes it.
    names: Mutex<names::Filter>,
    on_new_name: OnNewName,
    stats: Arc<GuardStats>,
    revalidator: Mutex<Revalidator>,
}

/// A running guard. Dropping it does not stop it; call [`Guard::stop`].
pub struct Guard {
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Where revalidations run: the guard's own runtime.
    runtime: tokio::runtime::Handle,
    pub stats: Arc<GuardStats>,
}

/// The result of [`Guard::revalidate`], delivered once per started revalidation.
#[derive(Debug, Clone)]
pub struct Revalidation {
    pub address: IpAddr,
    pub name: String,
    pub outcome: Outcome,
}

/// Which of the guard's listeners a query came in on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Listener {
    /// `[dns] listen`: this host's processes.
    Host,
    /// `container_listen`: what the bridges' DNS was redirected to.
    Containers,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }

    fn protocol(self) -> u8 {
        match self {
            Transport::Udp => IPPROTO_UDP,
            Transport::Tcp => IPPROTO_TCP,
        }
    }
}

impl Guard {
    /// Binds the listen address (errors surface here, at startup) and starts serving.
    pub fn start(
        config: GuardConfig,
        recent: Arc<Mutex<RecentNames>>,
        on_refused: OnRefused,
        on_new_name: OnNewName,
    ) -> Result<Guard> {
        let (udp, tcp) = bind(config.dns.listen)?;
        let for_containers = match &config.containers {
            Some((listen, _)) => Some(bind(*listen)?),
            None => None,
        };
        // Fail now, not on the first query, if marks cannot be set.
        let probe = std::net::UdpSocket::bind("0.0.0.0:0")?;
        upstream::set_mark(probe.as_raw_fd(), config.mark).context(
            "DNS guard: setting the firewall mark on upstream sockets needs CAP_NET_ADMIN",
        )?;
        let sets = HostSets::open().context("DNS guard: opening nf_tables netlink")?;
        let stats = Arc::new(GuardStats::default());
        let shared = Arc::new(Shared {
            config: RwLock::new(Arc::new(config)),
            cache: Mutex::new(Cache::new(CACHE_ENTRIES)),
            sets: Arc::new(Mutex::new(sets)),
            recent,
            attributor: Arc::new(Mutex::new(Attributor::new())),
            on_refused,
            names: Mutex::new(names::Filter::default()),
            on_new_name,
            stats: Arc::clone(&stats),
            revalidator: Mutex::new(Revalidator::default()),
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(8)
            .build()
            .context("DNS guard: starting its runtime")?;
        let handle = runtime.handle().clone();
        let inner = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("dns-guard".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let udp = match UdpSocket::from_std(udp) {
                        Ok(s) => Arc::new(s),
                        Err(e) => return warn!("DNS guard: {e}"),
                    };
                    let tcp = match TcpListener::from_std(tcp) {
                        Ok(s) => s,
                        Err(e) => return warn!("DNS guard: {e}"),
                    };
                    let containers = async {
                        let Some((udp, tcp)) = for_containers else {
                            return std::future::pending().await;
                        };
                        let (udp, tcp) = match (UdpSocket::from_std(udp), TcpListener::from_std(tcp)) {
                            (Ok(u), Ok(t)) => (Arc::new(u), t),
                            (Err(e), _) | (_, Err(e)) => return warn!("DNS guard (containers): {e}"),
                        };
                        tokio::select! {
                            r = serve_udp(Arc::clone(&inner), udp, Listener::Containers) => if let Err(e) = r { warn!("DNS guard (UDP, containers) stopped: {e}") },
                            r = serve_tcp(Arc::clone(&inner), tcp, Listener::Containers) => if let Err(e) = r { warn!("DNS guard (TCP, containers) stopped: {e}") },
                        }
                    };
                    tokio::select! {
                        r = serve_udp(Arc::clone(&inner), udp, Listener::Host) => if let Err(e) = r { warn!("DNS guard (UDP) stopped: {e}") },
                        r = serve_tcp(Arc::clone(&inner), tcp, Listener::Host) => if let Err(e) = r { warn!("DNS guard (TCP) stopped: {e}") },
                        _ = containers => {}
                        _ = stop_rx => {}
                    }
                });
                // Blocking tasks (attribution) may still run; don't wait for them.
                runtime.shutdown_background();
            })
            .context("DNS guard: starting its thread")?;
        Ok(Guard {
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
            runtime: handle,
            stats,
        })
    }

    /// Runs `swap` (a ruleset swap) with the set writer held, so no address
    /// is written into a table that is being replaced; then forgets what was
    /// written and cached, and takes the new configuration.
    pub fn swap<T>(
        &self,
        config: Option<GuardConfig>,
        swap: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let mut sets = self.shared.sets.lock().unwrap_or_else(|p| p.into_inner());
        let out = swap()?;
        sets.forget();
        lock(&self.shared.cache).clear();
        lock(&self.shared.revalidator).forget_answers();
        if let Some(c) = config {
            *self
                .shared
                .config
                .write()
                .unwrap_or_else(|p| p.into_inner()) = Arc::new(c);
        }
        Ok(out)
    }

    /// The name whose answer once put `address` into a rule's set, if
    /// revalidation is on and the guard still remembers it.
    pub fn remembered(&self, address: IpAddr) -> Option<String> {
        if !self.shared.config().dns.revalidate {
            return None;
        }
        lock(&self.shared.recent).remembered(&address, Instant::now())
    }

    /// A packet to `address` was blocked, and `rule` would allow it if the
    /// address were still in its set for `name` (the caller checked its
    /// ports and subject). The name is asked again and `done` gets the
    /// verdict once (see [`revalidate`]); later packets to the same address
    /// meanwhile get [`Request::Pending`] and no call.
    pub fn revalidate(
        &self,
        address: IpAddr,
        name: String,
        rule: String,
        done: impl FnOnce(Revalidation) + Send + 'static,
    ) -> Request {
        let cfg = self.shared.config();
        let now = Instant::now();
        let (request, work) = {
            let mut r = lock(&self.shared.revalidator);
            let begun = r.begin(address, &name, now);
            *lock(&self.stats.revalidation) = r.stats;
            begun
        };
        let Some(work) = work else {
            return request;
        };
        let shared = Arc::clone(&self.shared);
        self.runtime.spawn(async move {
            let outcome = revalidation(&shared, &cfg, address, &name, &rule, work).await;
            {
                let mut r = lock(&shared.revalidator);
                r.finish(address, &outcome);
                *lock(&shared.stats.revalidation) = r.stats;
            }
            done(Revalidation {
                address,
                name,
                outcome,
            });
        });
        request
    }

    pub fn listen(&self) -> SocketAddr {
        self.shared.config().dns.listen
    }

    /// Where container bridges' DNS goes, if the guard serves them.
    pub fn container_listen(&self) -> Option<SocketAddr> {
        self.shared.config().containers.as_ref().map(|c| c.0)
    }

    pub fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One listener's UDP and TCP sockets (errors surface at startup).
fn bind(listen: SocketAddr) -> Result<(std::net::UdpSocket, std::net::TcpListener)> {
    let udp = std::net::UdpSocket::bind(listen)
        .with_context(|| format!("DNS guard: binding UDP {listen}"))?;
    let tcp = std::net::TcpListener::bind(listen)
        .with_context(|| format!("DNS guard: binding TCP {listen}"))?;
    udp.set_nonblocking(true)?;
    tcp.set_nonblocking(true)?;
    Ok((udp, tcp))
}

impl Shared {
    fn config(&self) -> Arc<GuardConfig> {
        Arc::clone(&self.config.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The answer from the cache, when the name may be forwarded and is cached.
    fn cached(&self, cfg: &GuardConfig, q: &Query, limit: usize) -> Option<Vec<u8>> {
        if !cfg.audit && !cfg.allows(&q.name) {
            return None;
        }
        let reply = lock(&self.cache).answer(&cache_key(q), q, limit, Instant::now())?;
        self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
        Some(reply)
    }

    /// A name only `watched`'s wildcard allows, asked by `who`: handed to the
    /// daemon the first time this identity asks it (a hash lookup after that).
    fn new_name(
        &self,
        (rule, pattern): (&str, &HostPattern),
        q: &Query,
        client: SocketAddr,
        t: Transport,
        who: &Attribution,
    ) {
        let first = names::first_counted(
            &self.names,
            (&who.identity(), &q.name, 0),
            &self.stats.names_held,
            &self.stats.names_new,
        );
        if !first {
            return;
        }
        (self.on_new_name)(NameSeen {
            asked: Asked::Dns(DnsQuestion {
                name: q.name.clone(),
                qtype: q.qtype.to_string(),
                client,
                transport: t.name(),
            }),
            rule: rule.to_string(),
            pattern: pattern.to_string(),
            attribution: who.clone(),
            at: SystemTime::now(),
        });
    }

    /// Who holds the client's socket (blocking: sock_diag and /proc); for
    /// a container, whose socket is in another namespace, the bridge and
    /// its address (the pipeline asks the runtime for its name).
    fn attribute(
        &self,
        client: SocketAddr,
        server: SocketAddr,
        t: Transport,
        listener: Listener,
    ) -> Attribution {
        let ip = client.ip().to_canonical();
        if listener == Listener::Containers && !ip.is_loopback() {
            let cfg = self.config();
            let bridges = cfg.containers.as_ref().map_or(&[][..], |c| &c.1[..]);
            if let Some(bridge) = crate::monitor::containers::bridge_of(ip, bridges) {
                return Attribution {
                    method: crate::monitor::attribution::Method::Bridge,
                    ingress: Some((bridge, ip)),
                    ..Attribution::unknown()
                };
            }
        }
        lock(&self.attributor).attribute_socket(t.protocol(), client, server)
    }

    /// Who asked, without leaving the runtime thread when the socket was seen
    /// in the last seconds (the cache holds only what `attribute` found for
    /// a local socket); otherwise looked up on the blocking pool.
    fn asker(
        self: &Arc<Self>,
        client: SocketAddr,
        server: SocketAddr,
        t: Transport,
        listener: Listener,
    ) -> Asker {
        let cached = match self.attributor.try_lock() {
            Ok(mut a) => a.cached_socket(t.protocol(), client, server),
            Err(_) => None,
        };
        match cached {
            Some(a) => Asker::Known(Box::new(a)),
            None => {
                let s = Arc::clone(self);
                Asker::Pending(tokio::task::spawn_blocking(move || {
                    s.attribute(client, server, t, listener)
                }))
            }
        }
    }

    /// Puts `lives` into the sets of `rules`. Inline when the writer is free:
    /// nf_tables handles the batch inside the send and queues its ack before
    /// the call returns, so the wait for the ack never blocks (~8 µs in all).
    /// A ruleset swap holds the writer for as long as the table takes to
    /// load; the write then waits on the blocking pool, not on this thread.
    async fn write_sets(
        &self,
        rules: &[String],
        lives: Vec<(IpAddr, Duration)>,
    ) -> std::result::Result<usize, String> {
        if let Ok(mut sets) = self.sets.try_lock() {
            return sets.insert(rules, &lives).map_err(|e| e.to_string());
        }
        let sets = Arc::clone(&self.sets);
        let rules = rules.to_vec();
        match tokio::task::spawn_blocking(move || lock(&sets).insert(&rules, &lives)).await {
            Ok(written) => written.map_err(|e| e.to_string()),
            Err(e) => Err(format!("set writer failed: {e}")),
        }
    }
}

/// Who asked a query: known already, or being looked up.
enum Asker {
    Known(Box<Attribution>),
    Pending(tokio::task::JoinHandle<Attribution>),
}

impl Asker {
    async fn get(self) -> Option<Attribution> {
        match self {
            Asker::Known(a) => Some(*a),
            Asker::Pending(h) => h.await.ok(),
        }
    }
}

fn cache_key(q: &Query) -> CacheKey {
    let dnssec = q.message.checking_disabled()
        || q.message
            .extensions()
            .as_ref()
            .is_some_and(|e| e.flags().dnssec_ok);
    (q.name.clone(), q.qtype, dnssec)
}

async fn serve_udp(
    shared: Arc<Shared>,
    sock: Arc<UdpSocket>,
    listener: Listener,
) -> io::Result<()> {
    let mut batch = Batcher::default();
    let mut replies = Vec::with_capacity(batch::BATCH);
    let mut errors = AcceptErrors::default();
    loop {
        // An error (ENOMEM, a pending ICMP error) is waited out, never the end of the guard.
        let received = match batch.recv(&sock).await {
            Ok(r) => {
                errors.ok();
                r
            }
            Err(e) => {
                errors.back_off("DNS guard (UDP)", &e).await;
                continue;
            }
        };
        let cfg = shared.config();
        for (i, r) in received.iter().enumerate() {
            let incoming = if r.truncated {
                // Too big for a query slot: answer as if malformed.
                message::parse(&batch.data(i, r.len)[..12.min(r.len)])
            } else {
                message::parse(batch.data(i, r.len))
            };
            let q = match incoming {
                Incoming::Query(q) => q,
                Incoming::Reply(reply) => {
                    replies.push((reply, r.peer));
                    continue;
                }
                Incoming::Ignore => continue,
            };
            shared.stats.queries.fetch_add(1, Ordering::Relaxed);
            if let Some(reply) = shared.cached(&cfg, &q, q.udp_limit()) {
                let Some(w) = cfg.watched(&q.name) else {
                    replies.push((reply, r.peer));
                    continue;
                };
                // A name only a wildcard allows: who asks it decides whether
                // it is new for them.
                let client = as_asked(r.peer);
                let server = reachable(cfg.listen_for(listener), client);
                match shared.asker(client, server, Transport::Udp, listener) {
                    Asker::Known(a) => {
                        shared.new_name(w, &q, client, Transport::Udp, &a);
                        replies.push((reply, r.peer));
                    }
                    pending => {
                        // A socket not seen lately: looked up on the blocking
                        // pool before the reply, as on a miss, because a
                        // client may close it as soon as it has its answer.
                        let (shared, sock, cfg, peer) = (
                            Arc::clone(&shared),
                            Arc::clone(&sock),
                            Arc::clone(&cfg),
                            r.peer,
                        );
                        tokio::spawn(async move {
                            if let (Some(a), Some(w)) = (pending.get().await, cfg.watched(&q.name))
                            {
                                shared.new_name(w, &q, client, Transport::Udp, &a);
                            }
                            let _ = sock.send_to(&reply, peer).await;
                        });
                    }
                }
                continue;
            }
            let (shared, sock, cfg, peer) = (
                Arc::clone(&shared),
                Arc::clone(&sock),
                Arc::clone(&cfg),
                r.peer,
            );
            tokio::spawn(async move {
                let limit = q.udp_limit();
                let reply = answer(&shared, cfg, *q, peer, Transport::Udp, limit, listener).await;
                let _ = sock.send_to(&reply, peer).await;
            });
        }
        if let Err(e) = batch.send(&sock, &replies).await {
            debug!("DNS guard (UDP): sending replies: {e}");
        }
        replies.clear();
    }
}

async fn serve_tcp(shared: Arc<Shared>, listener: TcpListener, from: Listener) -> io::Result<()> {
    let mut errors = AcceptErrors::default();
    let caps = Caps::new(TCP_MAX_CLIENTS, TCP_MAX_PER_CLIENT);
    let uids = Arc::new(PeerUids::default());
    loop {
        // Out of descriptors (EMFILE, ENFILE), memory, an aborted handshake:
        // wait and accept again; UDP answers meanwhile on the same runtime.
        let (stream, peer) = match listener.accept().await {
            Ok(c) => {
                errors.ok();
                c
            }
            Err(e) => {
                shared
                    .stats
                    .tcp_accept_errors
                    .fetch_add(1, Ordering::Relaxed);
                errors.back_off("DNS guard (TCP)", &e).await;
                continue;
            }
        };
        let (shared, caps, uids) = (Arc::clone(&shared), Arc::clone(&caps), Arc::clone(&uids));
        tokio::spawn(async move {
            let (_, client) = uids.client(peer, stream.local_addr().ok());
            let Some(_slot) = caps.admit(client) else {
                shared.stats.tcp_refused.fetch_add(1, Ordering::Relaxed);
                debug!(%peer, "DNS guard (TCP): {client} is over its connections: closed");
                return;
            };
            if let Err(e) = tcp_client(&shared, stream, peer, from).await {
                debug!(%peer, "DNS guard: TCP client: {e}");
            }
        });
    }
}

async fn tcp_client(
    shared: &Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    listener: Listener,
) -> io::Result<()> {
    loop {
        let len = match tokio::time::timeout(TCP_CLIENT_IDLE, stream.read_u16()).await {
            Ok(Ok(n)) => n as usize,
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        };
        let mut buf = vec![0u8; len];
        tokio::time::timeout(TCP_CLIENT_IDLE, stream.read_exact(&mut buf))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        let reply = match message::parse(&buf) {
            Incoming::Query(q) => {
                shared.stats.queries.fetch_add(1, Ordering::Relaxed);
                let cfg = shared.config();
                match shared.cached(&cfg, &q, u16::MAX as usize) {
                    Some(r) => {
                        if let Some(w) = cfg.watched(&q.name) {
                            let client = as_asked(peer);
                            let server = reachable(cfg.listen_for(listener), client);
                            let asker = shared.asker(client, server, Transport::Tcp, listener);
                            if let Some(a) = asker.get().await {
                                shared.new_name(w, &q, client, Transport::Tcp, &a);
                            }
                        }
                        r
                    }
                    None => {
                        let limit = u16::MAX as usize;
                        answer(shared, cfg, *q, peer, Transport::Tcp, limit, listener).await
                    }
                }
            }
            Incoming::Reply(r) => r,
            Incoming::Ignore => continue,
        };
        let len = u16::try_from(reply.len()).unwrap_or(u16::MAX);
        stream.write_all(&len.to_be_bytes()).await?;
        stream.write_all(&reply[..len as usize]).await?;
    }
}

/// The slow path: refuse (and report), or forward, put the addresses in the
/// kernel sets, cache, reply.
async fn answer(
    shared: &Arc<Shared>,
    cfg: Arc<GuardConfig>,
    q: Query,
    client: SocketAddr,
    transport: Transport,
    limit: usize,
    listener: Listener,
) -> Vec<u8> {
    let client = as_asked(client);
    let rules = cfg.matching(&q.name);
    let watched = cfg.watched(&q.name);
    let server = reachable(cfg.listen_for(listener), client);
    if rules.is_empty() {
        // Attribute before replying: the asking socket may close right after.
        let attribution = shared
            .asker(client, server, transport, listener)
            .get()
            .await;
        shared.stats.refused.fetch_add(1, Ordering::Relaxed);
        if let Some(attribution) = attribution {
            shared.stats.asked_by(&attribution);
            (shared.on_refused)(RefusedQuery {
                question: DnsQuestion {
                    name: q.name.clone(),
                    qtype: q.qtype.to_string(),
                    client,
                    transport: transport.name(),
                },
                attribution,
                blocked: !cfg.audit,
                at: SystemTime::now(),
            });
        }
        if !cfg.audit {
            return message::refusal(&q, cfg.dns.refuse);
        }
    }
    shared.stats.forwarded.fetch_add(1, Ordering::Relaxed);
    let asker = shared.asker(client, server, transport, listener);
    let Some(response) =
        upstream::exchange(&cfg.dns.upstream, cfg.mark, &q, transport == Transport::Tcp).await
    else {
        shared
            .stats
            .upstream_failures
            .fetch_add(1, Ordering::Relaxed);
        // Asked all the same: a name under a wildcard need not resolve to
        // carry data out.
        if let Some(w) = watched {
            if let Some(a) = asker.get().await {
                shared.new_name(w, &q, client, transport, &a);
            }
        }
        return message::server_failure(&q);
    };
    let addrs = message::addresses(&response, &q.name);
    if !rules.is_empty() && !addrs.is_empty() {
        let lives: Vec<(IpAddr, Duration)> = addrs
            .iter()
            .map(|&(ip, ttl)| (ip, cfg.dns.set_timeout(ttl)))
            .collect();
        match shared.write_sets(&rules, lives).await {
            Ok(n) => debug!(name = %q.name, elements = n, "DNS guard: addresses allowed"),
            Err(e) => {
                // Fail closed: an answer the kernel would not honour helps nobody.
                shared.stats.set_failures.fetch_add(1, Ordering::Relaxed);
                warn!(name = %q.name, "DNS guard: writing the kernel sets failed: {e}");
                return message::server_failure(&q);
            }
        }
    }
    // Who asked, looked up while the upstream answered; awaited before the
    // reply, because a client like dig exits as soon as it has its answer.
    // Needed for a name with addresses, and for any name only a wildcard
    // allows (NXDOMAIN included: the question itself can carry data).
    let asked_by = if !addrs.is_empty() || watched.is_some() {
        asker.get().await
    } else {
        None
    };
    if let (Some(w), Some(a)) = (watched, &asked_by) {
        shared.new_name(w, &q, client, transport, a);
    }
    if !addrs.is_empty() {
        if let Some(a) = &asked_by {
            shared.stats.asked_by(a);
        }
        let now = Instant::now();
        let until: Vec<(IpAddr, Instant)> = addrs
            .iter()
            .map(|&(ip, ttl)| (ip, now + cfg.dns.set_timeout(ttl)))
            .collect();
        lock(&shared.recent).insert(&q.name, asked_by, &until, !rules.is_empty());
    }
    let reply = message::reply_for(&q, &response, 0, limit);
    let ttl = message::cache_ttl(&response);
    lock(&shared.cache).put(cache_key(&q), response, ttl, Instant::now());
    reply
}

/// Asks again (or reuses a fresh answer), judges, and puts a still-valid
/// address back into the sets of the rules that allow the name now.
async fn revalidation(
    shared: &Arc<Shared>,
    cfg: &GuardConfig,
    address: IpAddr,
    name: &str,
    rule: &str,
    work: Work,
) -> Outcome {
    let answer = match work {
        Work::Reuse(answer) => answer,
        Work::Lookup => match upstream::lookup(&cfg.dns.upstream, cfg.mark, name).await {
            Ok(answer) => {
                lock(&shared.revalidator).answered(name, &answer, Instant::now());
                answer
            }
            Err(e) => {
                shared
                    .stats
                    .upstream_failures
                    .fetch_add(1, Ordering::Relaxed);
                return Outcome::Failed(format!("asking the upstream for {name}: {e}"));
            }
        },
    };
    // The rule must still allow the name under the policy in force now.
    let mut rules = cfg.matching(name);
    rules.retain(|r| r == rule);
    let outcome = revalidate::judge(address, &answer, rules, |ttl| cfg.dns.set_timeout(ttl));
    if let Outcome::StillResolves { rules, timeout } = &outcome {
        if let Err(e) = shared.write_sets(rules, vec![(address, *timeout)]).await {
            shared.stats.set_failures.fetch_add(1, Ordering::Relaxed);
            return Outcome::Failed(format!("writing the kernel sets: {e}"));
        }
        let until = Instant::now() + *timeout;
        lock(&shared.recent).insert(name, None, &[(address, until)], true);
    }
    outcome
}

/// The address the client sent to: the listen address, or, when the guard
/// listens on a wildcard, loopback for a loopback client and the client's
/// own address for another local one (the kernel sends from the destination
/// address to a local address), e.g. a process on the host asking the
/// container listener at a bridge's address.
/// The client as it asked: an IPv4 client of a dual-stack listener
/// (`[::]:10053`) arrives as ::ffff:a.b.c.d, and is reported, and its socket
/// looked up, as the IPv4 it is (replies still go to the address it came from).
fn as_asked(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

fn reachable(listen: SocketAddr, client: SocketAddr) -> SocketAddr {
    if !listen.ip().is_unspecified() {
        return listen;
    }
    if !client.ip().is_loopback() {
        return SocketAddr::new(client.ip(), listen.port());
    }
    let ip: IpAddr = match client.ip() {
        IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
        IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
    };
    SocketAddr::new(ip, listen.port())
}
