//! Container names for forwarded packets (scope = "host+containers"): a map
//! from container address to id, name and image, read from the container
//! runtime's Docker Engine API (`GET /containers/json`, which podman's
//! Docker-compatible socket answers the same way) over its unix socket.
//!
//! The pipeline never talks to the runtime. A `ContainerDirectory` thread
//! keeps the map fresh (every `REFRESH_EVERY`, and when asked); a lookup
//! reads it under a mutex. An address it does not know makes the lookup ask
//! for a refresh and wait at most `LOOKUP_WAIT`, at most once per
//! `WAIT_GAP` overall and once per address per `MISS_TTL`, and never while
//! the runtime is unreachable: a new container is named from its first
//! packet, and a runtime that is down or slow costs names, not events.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tracing::{info, warn};

/// Where Docker, then podman (rootful), listen when the policy names no socket.
pub const DEFAULT_SOCKETS: [&str; 2] = ["/var/run/docker.sock", "/run/podman/podman.sock"];
const REFRESH_EVERY: Duration = Duration::from_secs(10);
/// Refreshes never come closer than this, however many lookups ask.
const REFRESH_GAP: Duration = Duration::from_millis(200);
/// One request to the runtime, connect to last byte.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const LOOKUP_WAIT: Duration = Duration::from_millis(500);
const WAIT_GAP: Duration = Duration::from_secs(1);
const MISS_TTL: Duration = Duration::from_secs(30);
const MISSES_MAX: usize = 4096;
/// Addresses are kept this long after the runtime stopped answering (an
/// address may be given to another container later).
const STALE_AFTER: Duration = Duration::from_secs(60);
const BODY_MAX: usize = 32 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    pub name: String,
    pub image: String,
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(Arc<Container>),
    /// The runtime answered but runs no container with this address.
    NotAContainer,
    /// No runtime answered (none running, no permission, too slow).
    RuntimeUnreachable,
}

/// ECS's `container.image.name` and `container.image.tag` of an image
/// reference: `registry:5000/team/app:1.2` → (`registry:5000/team/app`,
/// `1.2`); a digest or an image id stays whole.
pub fn image_name_and_tag(reference: &str) -> (&str, Option<&str>) {
    if reference.contains('@') || reference.starts_with("sha256:") {
        return (reference, None);
    }
    match reference.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, Some(tag)),
        _ => (reference, None),
    }
}

/// The container bridge (by the policy's names and `*` patterns) whose
/// network holds `ip`: the interface a container with that address sits
/// behind. Never the bridge's own address: that is this host (a local
/// process can send from it), not a container.
pub fn bridge_of(ip: IpAddr, bridges: &[String]) -> Option<String> {
    let named = |name: &str| {
        bridges.iter().any(|b| match b.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == b,
        })
    };
    if bridges.is_empty() {
        return None;
    }
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    for a in addrs {
        if !named(&a.interface_name) {
            continue;
        }
        let net = |addr: Option<&nix::sys::socket::SockaddrStorage>| -> Option<IpAddr> {
            let addr = addr?;
            if let Some(v4) = addr.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        };
        let (Some(own), Some(mask)) = (net(a.address.as_ref()), net(a.netmask.as_ref())) else {
            continue;
        };
        if own == ip {
            return None;
        }
        let same = match (own, mask, ip) {
            (IpAddr::V4(o), IpAddr::V4(m), IpAddr::V4(c)) => {
                u32::from(o) & u32::from(m) == u32::from(c) & u32::from(m)
            }
            (IpAddr::V6(o), IpAddr::V6(m), IpAddr::V6(c)) => {
                u128::from(o) & u128::from(m) == u128::from(c) & u128::from(m)
            }
            _ => false,
        };
        if same {
            return Some(a.interface_name);
        }
    }
    None
}

/// The running containers' addresses, as one `GET /containers/json` lists them.
pub fn addresses(list: &[u8]) -> Result<HashMap<IpAddr, Arc<Container>>> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Listed {
        id: String,
        #[serde(default)]
        names: Vec<String>,
        #[serde(default)]
        image: String,
        network_settings: Option<Settings>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Settings {
        #[serde(default)]
        networks: HashMap<String, Endpoint>,
    }
    #[derive(Deserialize)]
    struct Endpoint {
        #[serde(rename = "IPAddress", default)]
        ipv4: Option<String>,
        #[serde(rename = "GlobalIPv6Address", default)]
        ipv6: Option<String>,
    }
    let listed: Vec<Listed> = serde_json::from_slice(list).context("parsing /containers/json")?;
    let mut by_address = HashMap::new();
    for c in listed {
        let container = Arc::new(Container {
            name: c
                .names
                .first()
                .map(|n| n.trim_start_matches('/').to_string())
                .unwrap_or_else(|| c.id.chars().take(12).collect()),
            id: c.id,
            image: c.image,
        });
        for endpoint in c
            .network_settings
            .into_iter()
            .flat_map(|s| s.networks.into_values())
        {
            for addr in [endpoint.ipv4, endpoint.ipv6].into_iter().flatten() {
                // Host-networked and stopped containers list "".
                if let Ok(ip) = addr.parse::<IpAddr>() {
                    by_address.insert(ip, Arc::clone(&container));
                }
            }
        }
    }
    Ok(by_address)
}

/// `GET path` on a Docker-API unix socket; the body, if the answer is 200.
async fn get(socket: &Path, path: &str) -> Result<Bytes> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), BODY_MAX)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?
        .to_bytes();
    driver.abort();
    if !status.is_success() {
        bail!("{} answered {status} to GET {path}", socket.display());
    }
    Ok(body)
}

struct State {
    by_address: HashMap<IpAddr, Arc<Container>>,
    /// The socket that answered last; `None` while none does.
    answering: Option<PathBuf>,
    last_answer: Option<Instant>,
    /// Refreshes begun and finished; a waiting lookup wants one begun after it asked.
    begun: u64,
    finished: u64,
    wanted: bool,
    misses: HashMap<IpAddr, Instant>,
    last_wait: Option<Instant>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct ContainerDirectory {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl ContainerDirectory {
    /// Starts the refresher for `socket`, or for the default sockets in turn.
    pub fn start(socket: Option<&Path>) -> Result<ContainerDirectory> {
        let sockets: Vec<PathBuf> = match socket {
            Some(s) => vec![s.to_path_buf()],
            None => DEFAULT_SOCKETS.iter().map(PathBuf::from).collect(),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                by_address: HashMap::new(),
                answering: None,
                last_answer: None,
                begun: 0,
                finished: 0,
                wanted: true,
                misses: HashMap::new(),
                last_wait: None,
            }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the container runtime client")?;
        let thread = std::thread::Builder::new()
            .name("containers".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || refresher(&shared, &sockets, &rt)
            })
            .context("starting the container directory")?;
        Ok(ContainerDirectory {
            shared,
            thread: Some(thread),
        })
    }

    pub fn lookup(&self, ip: IpAddr) -> Lookup {
        let now = Instant::now();
        let mut st = self.shared.lock();
        if let Some(c) = st.by_address.get(&ip) {
            return Lookup::Found(Arc::clone(c));
        }
        // Before the first refresh ends, the runtime's state is not known yet.
        let unreachable = st.answering.is_none() && st.finished > 0;
        let missed_lately = st
            .misses
            .get(&ip)
            .is_some_and(|&t| now.duration_since(t) < MISS_TTL);
        let waited_lately = st
            .last_wait
            .is_some_and(|t| now.duration_since(t) < WAIT_GAP);
        if !(unreachable || missed_lately || waited_lately) {
            st.last_wait = Some(now);
            st.wanted = true;
            let after = st.begun;
            self.shared.wake.notify_all();
            let (guard, _) = self
                .shared
                .wake
                .wait_timeout_while(st, LOOKUP_WAIT, |s| s.finished <= after)
                .unwrap_or_else(|p| p.into_inner());
            st = guard;
            if let Some(c) = st.by_address.get(&ip) {
                return Lookup::Found(Arc::clone(c));
            }
        }
        if st.misses.len() >= MISSES_MAX {
            st.misses.clear();
        }
        st.misses.insert(ip, now);
        if st.answering.is_some() {
            Lookup::NotAContainer
        } else {
            Lookup::RuntimeUnreachable
        }
    }
}

impl Drop for ContainerDirectory {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn refresher(shared: &Shared, sockets: &[PathBuf], rt: &tokio::runtime::Runtime) {
    let mut last_begun: Option<Instant> = None;
    let mut reported_down = false;
    loop {
        {
            let mut st = shared.lock();
            loop {
                if shared.stop.load(Ordering::Relaxed) {
                    return;
                }
                let since = last_begun.map(|t| t.elapsed());
                let due = match since {
                    None => true,
                    Some(s) => s >= REFRESH_EVERY || (st.wanted && s >= REFRESH_GAP),
                };
                if due {
                    break;
                }
                let sleep = match since {
                    Some(s) if st.wanted => REFRESH_GAP.saturating_sub(s),
                    Some(s) => REFRESH_EVERY.saturating_sub(s),
                    None => Duration::ZERO,
                };
                st = shared
                    .wake
                    .wait_timeout(st, sleep)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            st.wanted = false;
            st.begun += 1;
        }
        last_begun = Some(Instant::now());
        let answer = sockets.iter().find_map(|socket| {
            let listed = rt.block_on(async {
                tokio::time::timeout(REQUEST_TIMEOUT, get(socket, "/containers/json")).await
            });
            match listed {
                Ok(Ok(body)) => Some((socket, addresses(&body))),
                Ok(Err(e)) => {
                    if !reported_down {
                        warn!("container runtime at {}: {e:#}", socket.display());
                    }
                    None
                }
                Err(_) => {
                    if !reported_down {
                        warn!(
                            "container runtime at {} did not answer within {REQUEST_TIMEOUT:?}",
                            socket.display()
                        );
                    }
                    None
                }
            }
        });
        let mut st = shared.lock();
        match answer {
            Some((socket, Ok(by_address))) => {
                if st.answering.as_deref() != Some(socket.as_path()) {
                    info!(socket = %socket.display(), containers = by_address.len(), "naming containers through their runtime");
                }
                reported_down = false;
                st.answering = Some(socket.clone());
                st.last_answer = Some(Instant::now());
                st.by_address = by_address;
                st.misses.clear();
            }
            Some((socket, Err(e))) => {
                if !reported_down {
                    warn!("container runtime at {}: {e:#}", socket.display());
                }
                reported_down = true;
                st.answering = None;
            }
            None => {
                if !reported_down {
                    warn!("no container runtime answers; forwarded packets are reported by bridge and address");
                }
                reported_down = true;
                st.answering = None;
            }
        }
        if st.answering.is_none() && st.last_answer.is_some_and(|t| t.elapsed() >= STALE_AFTER) {
            st.by_address.clear();
        }
        st.finished = st.begun;
        shared.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTED: &str = r#"[
      {"Id":"4f2a9c","Names":["/web"],"Image":"nginx:1.25","State":"running",
       "NetworkSettings":{"Networks":{
         "bridge":{"IPAddress":"172.17.0.2","GlobalIPv6Address":""},
         "backend":{"IPAddress":"172.18.0.5","GlobalIPv6Address":"fd00::5"}}}},
      {"Id":"77aa00112233445566","Names":[],"Image":"sha256:beef",
       "NetworkSettings":{"Networks":{"host":{"IPAddress":""}}}},
      {"Id":"99","Names":["/db"],"Image":"postgres","NetworkSettings":null}
    ]"#;

    #[test]
    fn every_address_of_every_network_names_its_container() {
        let m = addresses(LISTED.as_bytes()).unwrap();
        assert_eq!(m.len(), 3);
        for ip in ["172.17.0.2", "172.18.0.5", "fd00::5"] {
            let c = &m[&ip.parse::<IpAddr>().unwrap()];
            assert_eq!(
                (c.id.as_str(), c.name.as_str(), c.image.as_str()),
                ("4f2a9c", "web", "nginx:1.25")
            );
        }
    }

    #[test]
    fn image_references_split_into_name_and_tag() {
        assert_eq!(image_name_and_tag("nginx:1.25"), ("nginx", Some("1.25")));
        assert_eq!(image_name_and_tag("nginx"), ("nginx", None));
        assert_eq!(
            image_name_and_tag("registry:5000/team/app:2"),
            ("registry:5000/team/app", Some("2"))
        );
        assert_eq!(
            image_name_and_tag("registry:5000/team/app"),
            ("registry:5000/team/app", None)
        );
        assert_eq!(
            image_name_and_tag("app@sha256:ab12"),
            ("app@sha256:ab12", None)
        );
        assert_eq!(image_name_and_tag("sha256:ab12"), ("sha256:ab12", None));
    }

    #[test]
    fn a_listing_that_is_not_a_list_is_an_error() {
        assert!(addresses(b"{\"message\":\"page not found\"}").is_err());
        assert!(addresses(b"[{\"Names\":[\"/x\"]}]").is_err());
        assert!(addresses(b"[]").unwrap().is_empty());
    }

    /// A Docker-API server on a unix socket: real HTTP, answers from a list.
    fn serve(dir: &Path, answers: Vec<(u16, &'static str)>) -> (PathBuf, JoinHandle<()>) {
        use std::io::{Read, Write};
        let path = dir.join("docker.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            for (status, body) in answers {
                let (mut s, _) = listener.accept().unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    req.extend_from_slice(&buf[..n]);
                }
                assert!(req.starts_with(b"GET /containers/json HTTP/1.1\r\n"));
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (path, t)
    }

    #[test]
    fn a_new_address_waits_for_one_refresh_and_an_absent_runtime_for_none() {
        let dir = tempfile::tempdir().unwrap();
        let (socket, server) = serve(dir.path(), vec![(200, "[]"), (200, LISTED)]);
        let d = ContainerDirectory::start(Some(&socket)).unwrap();
        let finished = |n: u64| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while d.shared.lock().finished < n && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            d.shared.lock().finished >= n
        };
        assert!(finished(1));
        // Unknown after the first (empty) listing: the lookup asks for another.
        let ip: IpAddr = "172.17.0.2".parse().unwrap();
        let first = d.lookup(ip);
        assert!(
            matches!(&first, Lookup::Found(c) if c.name == "web") || first == Lookup::NotAContainer,
            "{first:?}"
        );
        // Well before the periodic refresh would come.
        assert!(finished(2), "the lookup asked for a refresh");
        match d.lookup(ip) {
            Lookup::Found(c) => {
                assert_eq!((c.id.as_str(), c.image.as_str()), ("4f2a9c", "nginx:1.25"))
            }
            other => panic!("{other:?}"),
        }
        server.join().unwrap();
        drop(d);

        let gone = dir.path().join("nothing.sock");
        let d = ContainerDirectory::start(Some(&gone)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while d.shared.lock().finished == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(d.lookup(ip), Lookup::RuntimeUnreachable);
        assert!(
            d.shared.lock().last_wait.is_none(),
            "no wait while unreachable"
        );
    }
}
