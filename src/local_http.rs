//! The loopback HTTP endpoints of `egret run` (`[metrics]`, `[api]`): hyper
//! on a current-thread runtime of their own thread, so a slow scraper or a
//! dashboard never competes with the pipeline, and a stop that joins it.
//! Every connection is charged to its client (uid, else address) under caps,
//! slow heads and idle connections are closed, accept errors are waited out.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::ffi::CString;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use nix::unistd::{getgrouplist, Group, Uid, User};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{debug, warn};

use crate::kernel::sockets::SockDiag;
use crate::monitor::packet::IPPROTO_TCP;

pub type Body = BoxBody<Bytes, Infallible>;
pub type Reply = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;
pub type Handler = Arc<dyn Fn(Request<Incoming>) -> Reply + Send + Sync>;

/// Who may talk to a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Anyone who can reach the address (the metrics endpoint).
    Anyone,
    /// Root and the members of this group (the API: it shows every user's
    /// command lines). A group that does not exist leaves root alone.
    RootAndGroup(String),
}

/// Bounds on one server's connections. Every connection is charged to its
/// client: the uid holding the peer socket when it is local (sock_diag),
/// else the peer address.
#[derive(Debug, Clone)]
pub struct Limits {
    pub access: Access,
    pub max_connections: usize,
    pub max_per_client: usize,
    /// From the first byte of a request head to its end.
    pub header_read: Duration,
    /// No byte read or written and no request being answered for this long: closed.
    pub idle: Duration,
}

impl Limits {
    pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
    pub const DEFAULT_MAX_PER_CLIENT: usize = 32;
    pub const DEFAULT_HEADER_READ: Duration = Duration::from_secs(10);
    /// Longer than the live feed's 15 s keep-alive.
    pub const DEFAULT_IDLE: Duration = Duration::from_secs(30);

    pub fn new(access: Access) -> Limits {
        Limits {
            access,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            max_per_client: Self::DEFAULT_MAX_PER_CLIENT,
            header_read: Self::DEFAULT_HEADER_READ,
            idle: Self::DEFAULT_IDLE,
        }
    }
}

/// Whom a connection is charged to (caps), put in each request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Client {
    Uid(u32),
    Addr(IpAddr),
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Client::Uid(u) => write!(f, "uid {u}"),
            Client::Addr(a) => write!(f, "{a}"),
        }
    }
}

/// What a server turned away, for logs and tests.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Not root nor in the group: answered 403.
    pub refused_access: AtomicU64,
    /// Over the cap in all or for its client: closed at once.
    pub refused_busy: AtomicU64,
    pub accept_errors: AtomicU64,
    /// Closed after `idle` without traffic, or a head not read in `header_read`.
    pub closed_idle: AtomicU64,
}

impl ServerStats {
    pub fn snapshot(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "refused_access": g(&self.refused_access),
            "refused_busy": g(&self.refused_busy),
            "accept_errors": g(&self.accept_errors),
            "closed_idle": g(&self.closed_idle),
        })
    }
}

pub struct LocalServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub stats: Arc<ServerStats>,
}

impl LocalServer {
    /// Binds now (so a taken port fails the start) and serves on thread `name`.
    pub fn start(
        name: &'static str,
        listen: SocketAddr,
        limits: Limits,
        handler: Handler,
    ) -> Result<LocalServer> {
        let listener = std::net::TcpListener::bind(listen)
            .with_context(|| format!("{name}: binding {listen}"))?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .with_context(|| format!("{name}: starting its runtime"))?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let stats = Arc::new(ServerStats::default());
        let server = Arc::new(Server {
            name,
            handler,
            stats: Arc::clone(&stats),
            caps: Caps::new(limits.max_connections, limits.max_per_client),
            uids: PeerUids::default(),
            limits,
            logged: Mutex::new(HashSet::new()),
        });
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    tokio::select! {
                        _ = accept(listener, server) => {}
                        _ = stop_rx => {}
                    }
                });
                // Dropping the runtime here ends open connections (live feeds).
            })
            .with_context(|| format!("{name}: starting its thread"))?;
        Ok(LocalServer {
            stop: Some(stop_tx),
            thread: Some(thread),
            stats,
        })
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

struct Server {
    name: &'static str,
    limits: Limits,
    handler: Handler,
    stats: Arc<ServerStats>,
    caps: Arc<Caps>,
    uids: PeerUids,
    /// What was logged once already (a flood of refusals is one warning).
    logged: Mutex<HashSet<String>>,
}

/// Connections open in all and per client, under caps.
pub struct Caps {
    max_connections: usize,
    max_per_client: usize,
    clients: Mutex<HashMap<Client, usize>>,
    open: AtomicUsize,
}

impl Caps {
    pub fn new(max_connections: usize, max_per_client: usize) -> Arc<Caps> {
        Arc::new(Caps {
            max_connections,
            max_per_client,
            clients: Mutex::new(HashMap::new()),
            open: AtomicUsize::new(0),
        })
    }

    /// A place for one more connection of `client`, unless it or everyone is at the cap.
    pub fn admit(self: &Arc<Self>, client: Client) -> Option<Slot> {
        let mut clients = lock(&self.clients);
        let mine = clients.get(&client).copied().unwrap_or(0);
        if mine >= self.max_per_client || self.open.load(Ordering::Relaxed) >= self.max_connections
        {
            return None;
        }
        clients.insert(client, mine + 1);
        self.open.fetch_add(1, Ordering::Relaxed);
        Some(Slot {
            caps: Arc::clone(self),
            client,
        })
    }
}

/// A connection's place under the caps, given back when it closes.
pub struct Slot {
    caps: Arc<Caps>,
    client: Client,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.caps.open.fetch_sub(1, Ordering::Relaxed);
        let mut clients = lock(&self.caps.clients);
        if let Some(n) = clients.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                clients.remove(&self.client);
            }
        }
    }
}

/// Who holds the other end of a TCP connection on this host (sock_diag).
#[derive(Default)]
pub struct PeerUids(Mutex<Option<SockDiag>>);

impl PeerUids {
    /// The uid holding the peer's socket, when the peer is on this host.
    pub fn uid(&self, peer: SocketAddr, local: SocketAddr) -> Option<u32> {
        let mut diag = lock(&self.0);
        if diag.is_none() {
            *diag = SockDiag::open().ok();
        }
        let sock = diag.as_mut()?;
        let found = sock.lookup(
            IPPROTO_TCP,
            peer.ip(),
            peer.port(),
            local.ip(),
            local.port(),
        );
        if found.is_none() {
            // Maybe a broken socket: the next connection opens a fresh one.
            *diag = None;
        }
        let found = found?;
        // egret's own sockets (the proxy's upstream connections, made for
        // whoever asked the proxy) belong to root, but speak for someone
        // else: they are nobody's here.
        if found.uid == nix::unistd::geteuid().as_raw() && held_by_this_process(found.inode) {
            return None;
        }
        Some(found.uid)
    }

    /// The peer's uid, and whom its connection is charged to (its uid, else its address).
    pub fn client(&self, peer: SocketAddr, local: Option<SocketAddr>) -> (Option<u32>, Client) {
        let uid = local.and_then(|local| self.uid(peer, local));
        let client = match uid {
            Some(u) => Client::Uid(u),
            None => Client::Addr(peer.ip()),
        };
        (uid, client)
    }
}

/// Does this process hold the socket with inode `inode`?
fn held_by_this_process(inode: u64) -> bool {
    let wanted = format!("socket:[{inode}]");
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        // Cannot tell: assume it is ours (refusing root is the safe side).
        return true;
    };
    fds.filter_map(Result::ok)
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == wanted.as_str()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Backs off after a failed accept() (EMFILE, ENFILE, ENOMEM, ECONNABORTED...):
/// the first failure of each kind is logged, the server keeps serving the
/// connections it has and accepts again once the pause is over.
#[derive(Default)]
pub struct AcceptErrors {
    seen: HashSet<i32>,
    pause: Duration,
}

impl AcceptErrors {
    pub async fn back_off(&mut self, server: &str, e: &io::Error) {
        let code = e.raw_os_error().unwrap_or(-1);
        if self.seen.insert(code) {
            warn!("{server}: accepting a connection failed ({e}); backing off and serving on");
        }
        self.pause = (self.pause * 2).clamp(Duration::from_millis(10), Duration::from_millis(500));
        tokio::time::sleep(self.pause).await;
    }

    pub fn ok(&mut self) {
        self.pause = Duration::ZERO;
    }
}

async fn accept(listener: tokio::net::TcpListener, server: Arc<Server>) {
    let mut errors = AcceptErrors::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                server.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                errors.back_off(server.name, &e).await;
                continue;
            }
        };
        errors.ok();
        let server = Arc::clone(&server);
        tokio::spawn(async move { server.connection(stream, peer).await });
    }
}

impl Server {
    fn warn_once(&self, key: String, msg: impl FnOnce() -> String) {
        let mut logged = lock(&self.logged);
        // Bounded: past this many distinct clients, nothing more is logged.
        if logged.len() < 1024 && logged.insert(key) {
            warn!("{}: {}", self.name, msg());
        }
    }

    async fn connection(self: Arc<Self>, stream: tokio::net::TcpStream, peer: SocketAddr) {
        let (uid, client) = self.uids.client(peer, stream.local_addr().ok());
        let Some(_slot) = self.caps.admit(client) else {
            self.stats.refused_busy.fetch_add(1, Ordering::Relaxed);
            self.warn_once(format!("busy {client}"), || {
                format!(
                    "{client} is over its {} connections (or all {} are open): closing its new ones",
                    self.limits.max_per_client, self.limits.max_connections
                )
            });
            return;
        };
        let allowed = match &self.limits.access {
            Access::Anyone => true,
            Access::RootAndGroup(group) => uid.is_some_and(|u| authorized(u, group)),
        };
        let refusal: Handler = Arc::new(|_| Box::pin(async { forbidden() }));
        let handler = if allowed {
            Arc::clone(&self.handler)
        } else {
            self.stats.refused_access.fetch_add(1, Ordering::Relaxed);
            self.warn_once(format!("access {client}"), || {
                let group = match &self.limits.access {
                    Access::RootAndGroup(g) => g.as_str(),
                    Access::Anyone => "",
                };
                format!("refused {client} ({peer}): only root and group {group:?} may read it")
            });
            refusal
        };
        let activity = Arc::new(Activity::new());
        let svc = {
            let activity = Arc::clone(&activity);
            hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(client);
                let busy = Busy::new(&activity);
                let reply = handler(req);
                async move {
                    let r = reply.await;
                    drop(busy);
                    Ok::<_, Infallible>(r)
                }
            })
        };
        let io = hyper_util::rt::TokioIo::new(Tracked {
            inner: stream,
            activity: Arc::clone(&activity),
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.limits.header_read)
            .keep_alive(allowed);
        let conn = builder.serve_connection(io, svc);
        tokio::pin!(conn);
        let idle = self.limits.idle;
        loop {
            let wait = idle
                .saturating_sub(activity.quiet_for())
                .max(Duration::from_millis(100));
            tokio::select! {
                r = &mut conn => {
                    if let Err(e) = r {
                        if e.is_timeout() {
                            self.stats.closed_idle.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    return;
                }
                _ = tokio::time::sleep(wait) => {
                    if activity.quiet_for() >= idle && activity.in_flight() == 0 {
                        self.stats.closed_idle.fetch_add(1, Ordering::Relaxed);
                        debug!(%peer, "{}: closing an idle connection", self.name);
                        return;
                    }
                }
            }
        }
    }
}

/// Is `uid` root (or egret's own) or a member (primary or supplementary) of `group`?
pub fn authorized(uid: u32, group: &str) -> bool {
    // Root, and the user egret runs as when it is not root (it wrote it all).
    if uid == 0 || uid == nix::unistd::geteuid().as_raw() {
        return true;
    }
    let Ok(Some(g)) = Group::from_name(group) else {
        return false;
    };
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return false;
    };
    if user.gid == g.gid {
        return true;
    }
    let Ok(name) = CString::new(user.name.as_bytes()) else {
        return false;
    };
    getgrouplist(&name, user.gid)
        .map(|groups| groups.contains(&g.gid))
        .unwrap_or(false)
}

fn forbidden() -> Response<Body> {
    full(
        StatusCode::FORBIDDEN,
        "application/json",
        r#"{"error":{"status":403,"message":"only root and members of egret's API group may use this API"}}"#,
    )
}

/// When a connection last moved a byte, and how many requests it is answering.
pub(crate) struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    pub(crate) fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    pub(crate) fn quiet_for(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// A request being answered (a slow store query is not idleness).
struct Busy(Arc<Activity>);

impl Busy {
    fn new(a: &Arc<Activity>) -> Busy {
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(Arc::clone(a))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// The connection's stream, noting every byte that moves.
pub(crate) struct Tracked {
    pub(crate) inner: tokio::net::TcpStream,
    pub(crate) activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A whole response.
pub fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_group_members_only() {
        assert!(authorized(0, "no-such-group-here"));
        // daemon (uid 1) has group daemon (gid 1) on every Debian system.
        assert!(authorized(1, "daemon"));
        assert!(!authorized(65534, "daemon"));
        assert!(!authorized(65534, "no-such-group-here"));
        assert!(!authorized(65534, ""));
    }

    /// A connection from one of egret's own sockets (the proxy connecting
    /// for a client) is nobody's; the same connection from another process
    /// of the same user is that user's.
    #[test]
    fn egrets_own_sockets_are_nobodys() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap();
        let uids = PeerUids::default();
        let me = nix::unistd::geteuid().as_raw();

        let own = std::net::TcpStream::connect(local).unwrap();
        let (_accepted, peer) = listener.accept().unwrap();
        assert_eq!(peer, own.local_addr().unwrap());
        assert_eq!(uids.uid(peer, local), None, "egret's own socket");

        let mut other = std::process::Command::new("python3")
            .args([
                "-c",
                "import socket,sys,time\n\
                 s=socket.create_connection(('127.0.0.1',int(sys.argv[1])))\n\
                 sys.stdin.read()",
                &local.port().to_string(),
            ])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (_accepted, peer) = listener.accept().unwrap();
        let found = uids.uid(peer, local);
        drop(other.stdin.take());
        other.wait().unwrap();
        assert_eq!(found, Some(me), "another process of the same user");
    }

    #[test]
    fn caps_count_per_client_and_in_all() {
        let caps = Caps::new(3, 2);
        let a = Client::Uid(1000);
        let b = Client::Addr(IpAddr::from([127, 0, 0, 1]));
        let a1 = caps.admit(a).unwrap();
        let _a2 = caps.admit(a).unwrap();
        assert!(caps.admit(a).is_none(), "per client");
        let _b1 = caps.admit(b).unwrap();
        assert!(caps.admit(b).is_none(), "in all");
        drop(a1);
        assert!(
            caps.admit(b).is_some(),
            "a closed connection gives its place back"
        );
    }
}
