//! The proxy's server: hyper's HTTP/1.1 on one tokio thread. CONNECT opens a
//! tunnel (after the decision and the upstream connect), absolute-form
//! `http://` requests are forwarded over a kept-alive upstream connection per
//! client connection. Upstream sockets carry egret's firewall mark.
//!
//! Tunnels hold no buffers while idle: each direction waits for readability
//! and borrows a buffer only for the read and write that follow, so 10,000
//! idle tunnels cost little more than their sockets.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{
    header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri,
};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::decision::{Host, ProxyRules, Target};
use super::local::LocalAddrs;
use super::relay;
use super::sni::{self, Sni};
use crate::dns::upstream;
use crate::kernel::sockets::SockDiag;
use crate::local_http::{Activity, Tracked};
use crate::monitor::attribution::{Attribution, Attributor};
use crate::monitor::event::ProxyRequest;
use crate::monitor::names::{self, Asked, NameSeen};
use crate::policy::{Policy, ProxyConfig};

const IPPROTO_TCP: u8 = 6;
/// How long a name the proxy resolved through the system resolver is reused.
const SYSTEM_NAME_TTL: Duration = Duration::from_secs(30);
const NAME_CACHE_MAX: usize = 10_000;
/// A request's header must be complete this long after the connection starts
/// waiting for it (or `idle_timeout`, if shorter): a client dribbling a
/// header byte by byte holds a slot no longer than this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest pause between failed accepts (EMFILE and the like).
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Failed accepts are logged at most this often (and counted always): while
/// descriptors are short, accept fails and succeeds by turns, many times a second.
const ACCEPT_REPORT_EVERY: Duration = Duration::from_secs(60);
/// Refused connections being closed politely at once (answer sent, the
/// client's request drained so the close is not a reset); past this they are
/// just closed.
const REFUSING_MAX: usize = 256;
/// How long a refused connection may take to read its answer.
const REFUSE_LINGER: Duration = Duration::from_secs(1);

type Body = BoxBody<Bytes, hyper::Error>;

/// What the proxy needs from the policy. Swapped whole on reload; open
/// tunnels keep running under the decision they were opened with.
#[derive(Debug, Clone)]
pub struct ProxyState {
    pub config: ProxyConfig,
    pub rules: ProxyRules,
    pub mark: u32,
    /// The DNS guard's upstream resolvers, when `[dns]` is set.
    pub resolvers: Option<Vec<SocketAddr>>,
    /// egret's own listeners (proxy, DNS guard, API, metrics). The proxy's
    /// upstream sockets belong to root: through them a local user would be
    /// taken for root by the API's access check, so no policy opens these.
    pub own: Vec<SocketAddr>,
    /// scope = "host+containers": the bridges (names, `*` patterns) whose
    /// clients are containers, named by the bridge and their address.
    pub bridges: Vec<String>,
}

impl ProxyState {
    pub fn from_policy(p: &Policy) -> Option<ProxyState> {
        Some(ProxyState {
            config: p.proxy.clone()?,
            rules: ProxyRules::from_policy(p),
            mark: p.mark,
            resolvers: p.dns.as_ref().map(|d| d.upstream.clone()),
            own: own_listeners(p),
            bridges: match p.scope {
                crate::policy::Scope::HostAndContainers => p.container_interfaces.clone(),
                crate::policy::Scope::Host => Vec::new(),
            },
        })
    }

    /// Is `ip:port` one of egret's own listeners? `local`: `ip` is one of
    /// this host's addresses (a listener on the unspecified address takes
    /// those and loopback).
    fn own_listener(&self, ip: IpAddr, port: u16, local: bool) -> bool {
        let ip = ip.to_canonical();
        self.own.iter().any(|l| {
            l.port() == port
                && (l.ip().to_canonical() == ip
                    || (l.ip().is_unspecified() && (ip.is_loopback() || local)))
        })
    }
}

fn own_listeners(p: &Policy) -> Vec<SocketAddr> {
    let mut own = Vec::new();
    own.extend(p.proxy.as_ref().map(|c| c.listen));
    own.extend(p.dns.as_ref().map(|c| c.listen));
    if p.scope == crate::policy::Scope::HostAndContainers {
        own.extend(p.dns.as_ref().map(|c| c.container_listen));
    }
    own.extend(p.api.as_ref().map(|c| c.listen));
    own.extend(p.metrics);
    own
}

/// A request the proxy refused (or, in audit mode, would have).
#[derive(Debug, Clone)]
pub struct ProxyDenial {
    pub target: Target,
    pub method: String,
    pub client: SocketAddr,
    pub attribution: Attribution,
    /// The rule that named the host but did not allow this request, if any.
    pub rule: Option<String>,
    pub reason: String,
    /// The address the host resolved to, when that was the problem.
    pub ip: Option<IpAddr>,
    pub blocked: bool,
    pub at: SystemTime,
}

#[derive(Debug, Default)]
pub struct ProxyStats {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub tunnels: AtomicU64,
    pub denied: AtomicU64,
    pub upstream_failures: AtomicU64,
    pub over_limit: AtomicU64,
    /// Failed accepts (out of descriptors, memory): the proxy backs off and goes on.
    pub accept_errors: AtomicU64,
    /// Hosts only a wildcard allows, handed to the daemon the first time an
    /// identity asked for them (`[novelty]`; a full pipeline counts them lost).
    pub hosts_new: AtomicU64,
    /// (identity, host, port) triples the proxy's novelty filter holds.
    pub hosts_held: AtomicU64,
    pub open: AtomicUsize,
    refusing: AtomicUsize,
    allowed: Mutex<HashMap<String, u64>>,
}

impl ProxyStats {
    /// Requests allowed so far, per rule.
    pub fn allowed_by_rule(&self) -> Vec<(String, u64)> {
        self.allowed
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default()
    }

    fn allowed(&self, rule: &str) {
        if let Ok(mut m) = self.allowed.lock() {
            match m.get_mut(rule) {
                Some(n) => *n += 1,
                None => {
                    m.insert(rule.to_string(), 1);
                }
            }
        }
    }
}

type OnDenied = Box<dyn Fn(ProxyDenial) + Send + Sync>;
type OnNewHost = Box<dyn Fn(NameSeen) + Send + Sync>;

struct Shared {
    state: RwLock<Arc<ProxyState>>,
    attributor: Mutex<Attributor>,
    names: Mutex<HashMap<String, (Vec<IpAddr>, Instant)>>,
    clients: Mutex<HashMap<ClientKey, usize>>,
    /// This host's addresses: the SSRF guard refuses them like loopback, and
    /// clients from them are local users, limited per uid.
    local: Mutex<LocalAddrs>,
    /// sock_diag, for the uid of a local client's socket at accept.
    diag: Mutex<Option<SockDiag>>,
    on_denied: OnDenied,
    /// (identity, host, port) already handed over as new.
    seen_hosts: Mutex<names::Filter>,
    on_new_host: OnNewHost,
    stats: Arc<ProxyStats>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Proxy {
    shared: Arc<Shared>,
    listen: SocketAddr,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    pub stats: Arc<ProxyStats>,
}

impl Proxy {
    /// Binds (errors surface here, before anything else changes) and serves.
    ///
    /// `threads` current-thread runtimes (one by default), each with its own
    /// listening socket on the same address (SO_REUSEPORT): the kernel spreads
    /// new connections, and no work moves between threads.
    pub fn start(state: ProxyState, on_denied: OnDenied, on_new_host: OnNewHost) -> Result<Proxy> {
        let listen = state.config.listen;
        let workers = state.config.threads;
        let mut sockets = Vec::new();
        for _ in 0..workers {
            let sock = match listen {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            sock.set_reuseaddr(true)?;
            sock.set_reuseport(true)?;
            sock.bind(listen)
                .with_context(|| format!("proxy: binding {listen}"))?;
            sockets.push(sock);
        }
        let probe = std::net::UdpSocket::bind("0.0.0.0:0")?;
        upstream::set_mark(probe.as_raw_fd(), state.mark)
            .context("proxy: setting the firewall mark on upstream sockets needs CAP_NET_ADMIN")?;
        let stats = Arc::new(ProxyStats::default());
        let shared = Arc::new(Shared {
            state: RwLock::new(Arc::new(state)),
            attributor: Mutex::new(Attributor::new()),
            names: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            local: Mutex::new(LocalAddrs::new()),
            diag: Mutex::new(SockDiag::open().ok()),
            on_denied,
            seen_hosts: Mutex::new(names::Filter::default()),
            on_new_host,
            stats: Arc::clone(&stats),
        });
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut threads = Vec::new();
        for (i, sock) in sockets.into_iter().enumerate() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .max_blocking_threads(4)
                .build()
                .context("proxy: starting its runtime")?;
            let (inner, mut stop_rx) = (Arc::clone(&shared), stop_rx.clone());
            let thread = std::thread::Builder::new()
                .name(format!("proxy-{i}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        let listener = match sock.listen(4096) {
                            Ok(l) => l,
                            Err(e) => return warn!("proxy: listen: {e}"),
                        };
                        tokio::select! {
                            r = accept_loop(inner, listener) => if let Err(e) = r { warn!("proxy stopped: {e}") },
                            _ = stop_rx.changed() => {}
                        }
                    });
                    runtime.shutdown_background();
                })
                .context("proxy: starting its thread")?;
            threads.push(thread);
        }
        Ok(Proxy {
            shared,
            listen,
            stop: Some(stop_tx),
            threads,
            stats,
        })
    }

    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// New requests are decided by `state`; open tunnels keep running.
    pub fn reload(&self, state: ProxyState) {
        *self.shared.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(state);
        lock(&self.shared.names).clear();
        lock(&self.shared.local).reread();
    }

    pub fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(true);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn state(&self) -> Arc<ProxyState> {
        Arc::clone(&self.state.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Who a connection counts against: a remote client by its address; a
    /// local one (from loopback or any of this host's addresses, where every
    /// user shares the address) by the uid owning its socket.
    fn client_key(&self, peer: SocketAddr, local: SocketAddr) -> ClientKey {
        let ip = peer.ip();
        if !(ip.is_loopback() || lock(&self.local).contains(ip)) {
            return ClientKey::Addr(ip);
        }
        let mut diag = lock(&self.diag);
        match diag
            .as_mut()
            .and_then(|d| d.lookup(IPPROTO_TCP, ip, peer.port(), local.ip(), local.port()))
        {
            Some(sock) => ClientKey::Uid(sock.uid),
            // Gone already (closed right after connecting): its address.
            None => ClientKey::Addr(ip),
        }
    }

    /// Counts a client in; the answer for it when a limit is reached.
    fn admit(self: &Arc<Self>, client: ClientKey) -> Result<Admission, &'static str> {
        let cfg = self.state().config.clone();
        let open = self.stats.open.fetch_add(1, Ordering::Relaxed) + 1;
        let mut clients = lock(&self.clients);
        let mine = clients.entry(client).or_default();
        *mine += 1;
        let mine = *mine;
        drop(clients);
        let admission = Admission {
            shared: Arc::clone(self),
            client,
        };
        let refusal = if open > cfg.max_connections {
            "egret: too many connections\n"
        } else if mine > cfg.max_per_client {
            "egret: too many connections from this client\n"
        } else {
            return Ok(admission);
        };
        drop(admission);
        self.stats.over_limit.fetch_add(1, Ordering::Relaxed);
        Err(refusal)
    }

    /// The identity of exactly this client socket, looked up now (never a
    /// cached answer for an earlier socket with the same addresses and ports).
    async fn attribute(self: &Arc<Self>, client: SocketAddr, local: SocketAddr) -> Attribution {
        let s = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let mut who = lock(&s.attributor).attribute_socket_now(IPPROTO_TCP, client, local);
            let ip = client.ip().to_canonical();
            if who.uid.is_none() && !ip.is_loopback() {
                // A container's socket is in its own namespace: no uid, no
                // process; its bridge and address stand for it.
                let bridges = s.state().bridges.clone();
                if let Some(bridge) = crate::monitor::containers::bridge_of(ip, &bridges) {
                    who.method = crate::monitor::attribution::Method::Bridge;
                    who.ingress = Some((bridge, ip));
                }
            }
            if who.gid.is_none() {
                who.gid = socket_gid(&who);
            }
            who
        })
        .await
        .unwrap_or_else(|_| Attribution::unknown())
    }

    async fn resolve(&self, st: &ProxyState, name: &str, port: u16) -> io::Result<Vec<IpAddr>> {
        if let Some((ips, until)) = lock(&self.names).get(name) {
            if *until > Instant::now() {
                return Ok(ips.clone());
            }
        }
        let (ips, ttl) = match &st.resolvers {
            Some(resolvers) => {
                let found = upstream::lookup(resolvers, st.mark, name).await?;
                let ttl = found.iter().map(|a| a.1).min().unwrap_or(0);
                (
                    found.into_iter().map(|a| a.0).collect::<Vec<_>>(),
                    Duration::from_secs(ttl.into()),
                )
            }
            None => {
                let found = tokio::net::lookup_host((name, port)).await?;
                (found.map(|a| a.ip()).collect(), SYSTEM_NAME_TTL)
            }
        };
        if ips.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{name} has no address"),
            ));
        }
        let mut names = lock(&self.names);
        if names.len() >= NAME_CACHE_MAX {
            names.clear();
        }
        names.insert(name.to_string(), (ips.clone(), Instant::now() + ttl));
        Ok(ips)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ClientKey {
    Addr(IpAddr),
    Uid(u32),
}

/// A client's place in the limits; given back on drop.
struct Admission {
    shared: Arc<Shared>,
    client: ClientKey,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.shared.stats.open.fetch_sub(1, Ordering::Relaxed);
        let mut clients = lock(&self.shared.clients);
        if let Some(n) = clients.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                clients.remove(&self.client);
            }
        }
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) -> io::Result<()> {
    let mut backoff = Duration::ZERO;
    let mut reported: Option<Instant> = None;
    let mut unreported = 0u64;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            // Out of descriptors and the like: the pending connection stays
            // queued and accept fails again at once, so back off (doubling,
            // up to a second), say it once a minute, and keep serving.
            Err(e) => {
                shared.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                if reported.map_or(true, |at| at.elapsed() >= ACCEPT_REPORT_EVERY) {
                    warn!(
                        "proxy: accept: {e} ({unreported} more failures since the last report); \
                         backing off, still serving (counted in accept_errors)"
                    );
                    (reported, unreported) = (Some(Instant::now()), 0);
                } else {
                    unreported += 1;
                }
                backoff = (backoff * 2).clamp(Duration::from_millis(10), ACCEPT_BACKOFF_MAX);
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        backoff = Duration::ZERO;
        shared.stats.connections.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        let admission = shared.admit(shared.client_key(peer, local));
        let shared = Arc::clone(&shared);
        match admission {
            Ok(admission) => {
                tokio::spawn(async move {
                    if let Err(e) = serve_client(shared, stream, peer, local, admission).await {
                        debug!(%peer, "proxy: client connection: {e}");
                    }
                });
            }
            Err(msg) => refuse(&shared, stream, msg),
        }
    }
}

/// Over a limit: answer 503 at once (without waiting for the request, which
/// could take until a timeout) and close.
fn refuse(shared: &Arc<Shared>, stream: TcpStream, msg: &'static str) {
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{msg}",
        msg.len()
    );
    // A fresh socket's send buffer takes these bytes whole. Sent directly:
    // tokio's try_write declines until the reactor has seen the new socket
    // writable, which it may not have yet.
    let _ = socket2::SockRef::from(&stream).send(answer.as_bytes());
    if shared.stats.refusing.fetch_add(1, Ordering::Relaxed) >= REFUSING_MAX {
        shared.stats.refusing.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let mut stream = stream;
        let _ = stream.shutdown().await;
        // Closing with the request unread would reset the connection, and
        // the client could lose the answer: read it (briefly, boundedly) first.
        let drain = async {
            let mut buf = [0u8; 4096];
            let mut left: usize = 64 * 1024;
            while left > 0 {
                match tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        let _ = tokio::time::timeout(REFUSE_LINGER, drain).await;
        shared.stats.refusing.fetch_sub(1, Ordering::Relaxed);
    });
}

/// Per client connection: the upstream connection kept alive for plain HTTP,
/// and the client's identity once looked up (the socket cannot change owner
/// for another's while this end of it is open, so one lookup serves every
/// request on it).
struct Conn {
    upstream: tokio::sync::Mutex<Option<(Target, SendRequest<Incoming>)>>,
    who: tokio::sync::OnceCell<Attribution>,
    /// When a byte last moved on the client connection or its upstream.
    activity: Arc<Activity>,
}

async fn serve_client(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    admission: Admission,
) -> Result<()> {
    let idle = shared.state().config.idle_timeout;
    let admission = Arc::new(admission);
    let activity = Arc::new(Activity::new());
    let conn = Arc::new(Conn {
        upstream: tokio::sync::Mutex::new(None),
        who: tokio::sync::OnceCell::new(),
        activity: Arc::clone(&activity),
    });
    let svc = service_fn(move |req| {
        let (shared, conn, admission) = (Arc::clone(&shared), Arc::clone(&conn), admission.clone());
        async move { Ok::<_, Infallible>(handle(&shared, &conn, admission, req, peer, local).await) }
    });
    let io = TokioIo::new(Tracked {
        inner: stream,
        activity: Arc::clone(&activity),
    });
    let served = hyper::server::conn::http1::Builder::new()
        .title_case_headers(true)
        .timer(TokioTimer::new())
        .header_read_timeout(idle.min(HEADER_TIMEOUT))
        .serve_connection(io, svc)
        .with_upgrades();
    tokio::pin!(served);
    // Bodies relayed either way (a client trickling its upload, an upstream
    // stalling its answer) hold the connection and its slot only while
    // bytes move: after `idle` with none on the client connection or its
    // upstream, both are closed. (A tunnel has its own timer, in `relay`.)
    loop {
        let wait = idle.saturating_sub(activity.quiet_for());
        tokio::select! {
            r = &mut served => {
                r?;
                return Ok(());
            }
            _ = tokio::time::sleep(wait.max(Duration::from_millis(50))) => {
                if activity.quiet_for() >= idle {
                    debug!(%peer, "proxy: closing a connection idle for {idle:?}");
                    return Ok(());
                }
            }
        }
    }
}

/// 502, counted: the upstream could not be reached or broke off.
fn bad_gateway(shared: &Shared, msg: &str) -> Response<Body> {
    shared
        .stats
        .upstream_failures
        .fetch_add(1, Ordering::Relaxed);
    text(StatusCode::BAD_GATEWAY, msg, false)
}

fn text(status: StatusCode, msg: &str, close: bool) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(msg.to_string()))
            .map_err(|n| match n {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if close {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

async fn handle(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    admission: Arc<Admission>,
    req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
) -> Response<Body> {
    shared.stats.requests.fetch_add(1, Ordering::Relaxed);
    let st = shared.state();
    let connect = req.method() == Method::CONNECT;
    let authority = req.uri().authority().map(|a| a.as_str().to_string());
    let target = match (&authority, connect, req.uri().scheme_str()) {
        (Some(a), true, _) => Target::parse(a, None),
        (Some(a), false, Some("http")) => Target::parse(a, Some(80)),
        _ => Err("send CONNECT host:port, or an absolute http:// URL".to_string()),
    };
    let target = match target {
        Ok(t) => t,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("egret: bad request: {e}\n"),
                true,
            )
        }
    };
    let method = req.method().to_string();
    let ask = Ask {
        shared,
        conn: Some(conn),
        st: &st,
        target: &target,
        method: &method,
        peer,
        local,
    };
    let decision = decide(&ask).await;
    let (addrs, rule) = match decision {
        Decided::Allow { addrs, rule } => (addrs, rule),
        Decided::Deny { status, message } => return text(status, &message, false),
    };
    if let Some(rule) = &rule {
        shared.stats.allowed(rule);
        if let Some(pattern) = st.rules.watched(rule, &target) {
            new_host(&ask, rule, &pattern.to_string()).await;
        }
    }
    debug!(%peer, %target, rule = rule.as_deref().unwrap_or("-"), %method, "proxy: allowed");
    if !connect {
        return forward(shared, &st, conn, req, target, &addrs).await;
    }
    let upstream = match connect_upstream(&addrs, st.mark, st.config.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            return bad_gateway(shared, &format!("egret: cannot connect to {target}: {e}\n"));
        }
    };
    {
        shared.stats.tunnels.fetch_add(1, Ordering::Relaxed);
        let sni = (st.config.require_sni && target.port == 443).then(|| target.clone());
        let (shared, st) = (Arc::clone(shared), Arc::clone(&st));
        tokio::spawn(async move {
            let _admission = admission;
            match hyper::upgrade::on(req).await {
                Ok(upgraded) => {
                    if let Err(e) = tunnel(&shared, &st, upgraded, upstream, sni, peer, local).await
                    {
                        debug!(%peer, "proxy: tunnel: {e}");
                    }
                }
                Err(e) => debug!(%peer, "proxy: upgrade: {e}"),
            }
        });
        Response::new(Full::new(Bytes::new()).map_err(|n| match n {}).boxed())
    }
}

/// One request being decided: who asked for what, under which policy.
#[derive(Clone, Copy)]
struct Ask<'a> {
    shared: &'a Arc<Shared>,
    conn: Option<&'a Conn>,
    st: &'a ProxyState,
    target: &'a Target,
    method: &'a str,
    peer: SocketAddr,
    local: SocketAddr,
}

impl Ask<'_> {
    /// The client's identity: this connection's, looked up once.
    async fn who(&self) -> Attribution {
        match self.conn {
            Some(c) => c
                .who
                .get_or_init(|| self.shared.attribute(self.peer, self.local))
                .await
                .clone(),
            None => self.shared.attribute(self.peer, self.local).await,
        }
    }
}

/// The group a `groups` rule compares, as the kernel's `meta skgid` would:
/// the filesystem gid of the process holding the socket (sock_diag gives
/// only the uid), else the owner's primary group. Supplementary groups are
/// not consulted: the kernel's rule for the same policy does not match them,
/// and the proxy must not allow more than the firewall would.
fn socket_gid(who: &Attribution) -> Option<u32> {
    let uid = who.uid?;
    let from_proc = who.process.as_ref().and_then(|p| {
        let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid)).ok()?;
        let fields = |key: &str| -> Option<Vec<u32>> {
            let line = status.lines().find(|l| l.starts_with(key))?;
            line[key.len()..]
                .split_whitespace()
                .map(|f| f.parse().ok())
                .collect()
        };
        // The pid may have been reused since the lookup: only trust a
        // process still running as the socket's owner.
        let uids = fields("Uid:")?;
        let gids = fields("Gid:")?;
        (uids.get(1) == Some(&uid)).then(|| gids.get(3).copied())?
    });
    from_proc.or_else(|| {
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.gid.as_raw())
    })
}

enum Decided {
    Allow {
        addrs: Vec<SocketAddr>,
        rule: Option<String>,
    },
    Deny {
        status: StatusCode,
        message: String,
    },
}

/// The policy decision, with its report. In audit mode a denial is reported
/// (`would-block`) and the request goes on.
async fn decide(ask: &Ask<'_>) -> Decided {
    let Ask {
        shared, st, target, ..
    } = *ask;
    let candidates = st.rules.candidates(target);
    let mut who: Option<Attribution> = None;
    let mut problem: Option<(Option<String>, String, Option<IpAddr>)> = None;
    let mut rule = None;
    if candidates.is_empty() {
        problem = Some((None, format!("no rule allows {target}"), None));
    } else if let Some(r) = candidates.iter().find(|r| !r.has_subject()) {
        rule = Some(r.name.clone());
    } else {
        let w = ask.who().await;
        match candidates.iter().find(|r| r.subject_ok(&w)) {
            Some(r) => rule = Some(r.name.clone()),
            None => {
                problem = Some((
                    Some(candidates[0].name.clone()),
                    format!(
                        "{} is not a user, group or unit rule {} allows",
                        describe(&w),
                        candidates[0].name
                    ),
                    None,
                ))
            }
        }
        who = Some(w);
    }
    let ips = match &target.host {
        Host::Ip(ip) => vec![*ip],
        Host::Name(n) => match shared.resolve(st, n, target.port).await {
            Ok(ips) => ips,
            Err(e) => {
                shared
                    .stats
                    .upstream_failures
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(p) = problem {
                    report(ask, who, p, !ask.st.rules.audit).await;
                    if !st.rules.audit {
                        return denied(target);
                    }
                }
                return Decided::Deny {
                    status: StatusCode::BAD_GATEWAY,
                    message: format!("egret: cannot resolve {}: {e}\n", target.host),
                };
            }
        },
    };
    let mut addrs = Vec::new();
    let mut refused = None;
    if problem.is_none() {
        let needs_who = st.rules.cidr_rules_need_subject() && who.is_none();
        if needs_who
            && ips.iter().any(|ip| {
                crate::proxy::special_purpose(*ip).is_some() || lock(&shared.local).contains(*ip)
            })
        {
            who = Some(ask.who().await);
        }
        for &ip in &ips {
            let local = lock(&shared.local).contains(ip);
            if st.own_listener(ip, target.port, local) {
                let reason = format!(
                    "{} resolves to {ip}, where egret itself listens on port {}: the proxy never connects to egret's own servers",
                    target.host, target.port
                );
                // Whatever the policy or its mode: refused and reported.
                report(ask, who, (None, reason, Some(ip)), true).await;
                return denied(target);
            }
            match st.rules.address_ok(ip, target.port, who.as_ref(), local) {
                Ok(()) => addrs.push(SocketAddr::new(ip, target.port)),
                Err(why) => {
                    refused.get_or_insert((ip, why));
                }
            }
        }
        if addrs.is_empty() {
            if let Some((ip, why)) = refused {
                problem = Some((
                    rule.clone(),
                    format!("{} resolves to {ip}: {why}", target.host),
                    Some(ip),
                ));
            }
        }
    }
    match problem {
        None => Decided::Allow { addrs, rule },
        Some(p) => {
            report(ask, who, p, !ask.st.rules.audit).await;
            if st.rules.audit {
                let addrs = ips
                    .iter()
                    .map(|&ip| SocketAddr::new(ip, target.port))
                    .collect();
                Decided::Allow { addrs, rule: None }
            } else {
                denied(target)
            }
        }
    }
}

fn denied(target: &Target) -> Decided {
    Decided::Deny {
        status: StatusCode::FORBIDDEN,
        message: format!("egret: {target} is not allowed by this host's egress policy\n"),
    }
}

async fn report(
    ask: &Ask<'_>,
    who: Option<Attribution>,
    (rule, reason, ip): (Option<String>, String, Option<IpAddr>),
    blocked: bool,
) {
    let Ask {
        shared,
        target,
        method,
        peer,
        ..
    } = *ask;
    let attribution = match who {
        Some(w) => w,
        None => ask.who().await,
    };
    shared.stats.denied.fetch_add(1, Ordering::Relaxed);
    debug!(%peer, %target, %reason, "proxy: denied");
    (shared.on_denied)(ProxyDenial {
        target: target.clone(),
        method: method.to_string(),
        client: peer,
        attribution,
        rule,
        reason,
        ip,
        blocked,
        at: SystemTime::now(),
    });
}

/// A host only `pattern` (of `rule`) allows: handed to the daemon the first
/// time the client's identity asks for it (on this port).
async fn new_host(ask: &Ask<'_>, rule: &str, pattern: &str) {
    let Ask {
        shared,
        target,
        method,
        peer,
        ..
    } = *ask;
    let Host::Name(host) = &target.host else {
        return;
    };
    let who = ask.who().await;
    let first = names::first_counted(
        &shared.seen_hosts,
        (&who.identity(), host, target.port),
        &shared.stats.hosts_held,
        &shared.stats.hosts_new,
    );
    if !first {
        return;
    }
    (shared.on_new_host)(NameSeen {
        asked: Asked::Proxy(ProxyRequest {
            host: host.clone(),
            port: target.port,
            method: method.to_string(),
            client: peer,
            reason: String::new(),
            ip: None,
        }),
        rule: rule.to_string(),
        pattern: pattern.to_string(),
        attribution: who,
        at: SystemTime::now(),
    });
}

fn describe(w: &Attribution) -> String {
    let exe = w
        .process
        .as_ref()
        .and_then(|p| p.executable.clone().or(p.name.clone()));
    let user = w.user_name.clone().or(w.uid.map(|u| format!("uid {u}")));
    match (exe, user) {
        (Some(e), Some(u)) => format!("{e} (user {u})"),
        (None, Some(u)) => format!("user {u}"),
        (Some(e), None) => e,
        (None, None) => "an unidentified client".into(),
    }
}

/// Connects to the first address that answers, from a marked socket.
pub(crate) async fn connect_upstream(
    addrs: &[SocketAddr],
    mark: u32,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for &addr in addrs {
        let sock = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        upstream::set_mark(sock.as_raw_fd(), mark)?;
        match tokio::time::timeout(timeout, sock.connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = e,
            Err(_) => {
                last = io::Error::new(io::ErrorKind::TimedOut, format!("{addr} did not answer"))
            }
        }
    }
    Err(last)
}

/// Headers for one hop only (RFC 9110 7.6.1), plus the proxy's own.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let listed: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for name in listed {
        h.remove(name.as_str());
    }
    for name in [
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
    ] {
        h.remove(name);
    }
}

async fn forward(
    shared: &Arc<Shared>,
    st: &ProxyState,
    conn: &Arc<Conn>,
    req: Request<Incoming>,
    target: Target,
    addrs: &[SocketAddr],
) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    // The upstream hop is HTTP/1.1 whatever the client spoke, so the kept-alive
    // connection survives an HTTP/1.0 client (ab, old libraries).
    let client_version = parts.version;
    parts.version = http::Version::HTTP_11;
    // An HTTP/1.0 client keeps its connection only if the answer says so.
    let keep_alive_1_0 = client_version == http::Version::HTTP_10
        && [
            header::CONNECTION,
            HeaderName::from_static("proxy-connection"),
        ]
        .iter()
        .flat_map(|h| parts.headers.get_all(h))
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("keep-alive"));
    let origin = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    parts.uri = match origin.parse::<Uri>() {
        Ok(u) => u,
        Err(_) => return text(StatusCode::BAD_REQUEST, "egret: bad request target\n", true),
    };
    strip_hop_by_hop(&mut parts.headers);
    // RFC 9112 3.2.2: a proxy replaces Host with the request target's
    // authority. The upstream is asked for exactly the host that was decided,
    // whatever Host the client sent (domain fronting: an allowed name in the
    // request line, another site of the same server in Host).
    let host = match target.port {
        80 => target.host.to_string(),
        _ => target.to_string(),
    };
    match HeaderValue::from_str(&host) {
        Ok(v) => {
            parts.headers.insert(header::HOST, v);
        }
        Err(_) => return text(StatusCode::BAD_REQUEST, "egret: bad request target\n", true),
    }
    let req = Request::from_parts(parts, body);
    let mut slot = conn.upstream.lock().await;
    // Keep-alive: reuse this client connection's upstream connection to the
    // same target (the request was decided above like any other).
    let mut sender = match slot.take() {
        Some((t, s)) if t == target && !s.is_closed() => s,
        _ => {
            let upstream = match connect_upstream(addrs, st.mark, st.config.connect_timeout).await {
                Ok(s) => s,
                Err(e) => {
                    return bad_gateway(
                        shared,
                        &format!("egret: cannot connect to {target}: {e}\n"),
                    );
                }
            };
            let upstream = TokioIo::new(Tracked {
                inner: upstream,
                activity: Arc::clone(&conn.activity),
            });
            match hyper::client::conn::http1::handshake(upstream).await {
                Ok((s, c)) => {
                    tokio::spawn(async move {
                        let _ = c.await;
                    });
                    s
                }
                Err(e) => return bad_gateway(shared, &format!("egret: upstream: {e}\n")),
            }
        }
    };
    if sender.ready().await.is_err() {
        return bad_gateway(shared, "egret: upstream closed the connection\n");
    }
    match sender.send_request(req).await {
        Ok(resp) => {
            *slot = Some((target, sender));
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            parts.version = client_version;
            if keep_alive_1_0 {
                parts
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
            }
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => bad_gateway(shared, &format!("egret: upstream: {e}\n")),
    }
}

/// Moves bytes both ways until both sides are done or nothing moved for the idle time.
async fn tunnel(
    shared: &Arc<Shared>,
    st: &ProxyState,
    upgraded: hyper::upgrade::Upgraded,
    upstream: TcpStream,
    sni: Option<Target>,
    peer: SocketAddr,
    local: SocketAddr,
) -> io::Result<()> {
    let parts = upgraded
        .downcast::<TokioIo<Tracked>>()
        .map_err(|_| io::Error::other("unexpected upgraded connection type"))?;
    let client = parts.io.into_inner().inner;
    // hyper's read buffer (kilobytes) would otherwise live as long as the tunnel.
    let mut first = parts.read_buf.to_vec();
    drop(parts.read_buf);
    if let Some(target) = sni {
        if let Err(reason) =
            check_sni(&client, &mut first, &target, st.config.connect_timeout).await
        {
            let ask = Ask {
                shared,
                conn: None,
                st,
                target: &target,
                method: "CONNECT",
                peer,
                local,
            };
            report(&ask, None, (None, reason, None), !st.rules.audit).await;
            if !st.rules.audit {
                return Ok(());
            }
        }
    }
    let mut upstream = upstream;
    if !first.is_empty() {
        upstream.write_all(&first).await?;
    }
    drop(first);
    relay::relay(&client, &upstream, st.config.idle_timeout).await
}

/// Reads the ClientHello (into `buf`, to be forwarded) and compares its SNI.
async fn check_sni(
    client: &TcpStream,
    buf: &mut Vec<u8>,
    target: &Target,
    timeout: Duration,
) -> Result<(), String> {
    let Host::Name(want) = &target.host else {
        return Err(format!(
            "require_sni: CONNECT to the address {} names no host to compare",
            target.host
        ));
    };
    let deadline = Instant::now() + timeout;
    loop {
        match sni::server_name(buf) {
            Sni::Name(n) if &n == want => return Ok(()),
            Sni::Name(n) => {
                return Err(format!(
                    "TLS server name {n} does not match the CONNECT host {want}"
                ))
            }
            Sni::Missing(why) => return Err(format!("require_sni: {why}")),
            Sni::Incomplete if buf.len() >= sni::MAX_RECORD => {
                return Err("require_sni: ClientHello too large".into())
            }
            Sni::Incomplete => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, client.readable()).await {
            Ok(Ok(())) => {}
            _ => return Err("require_sni: no ClientHello in time".into()),
        }
        let mut chunk = vec![0u8; sni::MAX_RECORD - buf.len()];
        match client.try_read(&mut chunk) {
            Ok(0) => return Err("require_sni: the client closed before its ClientHello".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("require_sni: {e}")),
        }
    }
}
