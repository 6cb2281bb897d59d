//! Who sent a logged packet: socket owner from NFLOG, then the socket itself
//! (sock_diag exact lookup by 5-tuple: inode, cgroup id), then the process
//! holding that inode (/proc), its executable, command line and unit.
//!
//! Cost control: results are cached per 5-tuple (SYN retries and UDP floods
//! from one socket are looked up once), inode→pid is cached from every scan,
//! scans visit recently seen processes and the socket owner's processes first,
//! and deep lookups are rate-limited so a flood from fresh sockets degrades to
//! `uid-only` instead of stalling the pipeline.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::kernel::sockets::SockDiag;
use crate::monitor::packet::{Flow, L4Header, IPPROTO_TCP, IPPROTO_UDP};
use crate::text;

const SOCKET_CACHE_TTL: Duration = Duration::from_secs(10);
const SOCKET_CACHE_MAX: usize = 65_536;
const INODE_CACHE_MAX: usize = 262_144;
/// Deep lookups (sock_diag + /proc) per second, with the same burst.
const DEEP_LOOKUPS_PER_SEC: f64 = 2_000.0;

/// How an event was attributed, from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// Socket found by sock_diag, process found in /proc.
    SockDiagProc,
    /// Socket found (uid, cgroup) but no process holds it any more.
    SockDiag,
    /// Only the socket owner's uid/gid from NFLOG.
    UidOnly,
    /// Forwarded from a container bridge; the runtime named the container.
    ContainerRuntime,
    /// Forwarded from a container bridge; only the bridge and the source
    /// address are known (no runtime answered, or it runs no such container).
    Bridge,
    /// Nothing: no local socket (forwarded traffic) or no uid.
    None,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::SockDiagProc => "sock_diag+proc",
            Method::SockDiag => "sock_diag",
            Method::UidOnly => "uid-only",
            Method::ContainerRuntime => "container-runtime",
            Method::Bridge => "bridge",
            Method::None => "none",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Process {
    pub pid: u32,
    pub name: Option<String>,
    pub executable: Option<String>,
    pub command_line: Option<String>,
    pub parent_pid: Option<u32>,
    pub parent_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribution {
    pub method: Method,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub user_name: Option<String>,
    pub group_name: Option<String>,
    pub process: Option<Process>,
    /// cgroup v2 path relative to the hierarchy root, e.g. `/system.slice/nginx.service`.
    pub cgroup: Option<String>,
    pub unit: Option<String>,
    pub container_id: Option<String>,
    /// Forwarded traffic whose runtime named it: the container and its image.
    pub container_name: Option<String>,
    pub container_image: Option<String>,
    /// Forwarded traffic (scope = "host+containers"): the interface it came
    /// in on and its source address, which stand for the container.
    pub ingress: Option<(String, IpAddr)>,
    /// ECS fields cut to their cap (`crate::text`), for `egret.truncated`.
    pub truncated: Vec<&'static str>,
}

/// What the aggregation keys on: executable, else unit, else uid.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    Executable(String),
    Unit(String),
    Uid(u32),
    /// A forwarded flow from a container the runtime named.
    Container(String),
    /// A forwarded flow: ingress interface and source address.
    Forwarded(String, IpAddr),
    Unknown,
}

impl Attribution {
    /// Nothing known yet.
    pub fn unknown() -> Attribution {
        Attribution {
            method: Method::None,
            uid: None,
            gid: None,
            user_name: None,
            group_name: None,
            process: None,
            cgroup: None,
            unit: None,
            container_id: None,
            container_name: None,
            container_image: None,
            ingress: None,
            truncated: Vec::new(),
        }
    }

    pub fn identity(&self) -> Identity {
        if let Some(exe) = self.process.as_ref().and_then(|p| p.executable.clone()) {
            Identity::Executable(exe)
        } else if let Some(unit) = &self.unit {
            Identity::Unit(unit.clone())
        } else if let Some(uid) = self.uid {
            Identity::Uid(uid)
        } else if let Some(name) = &self.container_name {
            Identity::Container(name.clone())
        } else if let Some((iface, src)) = &self.ingress {
            Identity::Forwarded(iface.clone(), *src)
        } else {
            Identity::Unknown
        }
    }
}

type SocketKey = (u8, IpAddr, u16, IpAddr, u16, Option<u32>);

pub struct Attributor {
    diag: Option<SockDiag>,
    proc_root: PathBuf,
    sockets: HashMap<SocketKey, (Instant, Attribution)>,
    inodes: HashMap<u64, (u32, u32)>,
    recent_pids: Vec<u32>,
    names: Names,
    cgroups: CgroupPaths,
    tokens: f64,
    refilled: Instant,
    pub stats: AttributionStats,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct AttributionStats {
    pub cache_hits: u64,
    pub deep_lookups: u64,
    pub rate_limited: u64,
}

impl Attributor {
    pub fn new() -> Attributor {
        Attributor {
            diag: SockDiag::open().ok(),
            proc_root: PathBuf::from("/proc"),
            sockets: HashMap::new(),
            inodes: HashMap::new(),
            recent_pids: Vec::new(),
            names: Names::default(),
            cgroups: CgroupPaths::default(),
            tokens: DEEP_LOOKUPS_PER_SEC,
            refilled: Instant::now(),
            stats: AttributionStats::default(),
        }
    }

    pub fn attribute(
        &mut self,
        flow: Option<&Flow>,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Attribution {
        let base = Attribution {
            method: if uid.is_some() {
                Method::UidOnly
            } else {
                Method::None
            },
            uid,
            gid,
            user_name: uid.and_then(|u| self.names.user(u)),
            group_name: gid.and_then(|g| self.names.group(g)),
            ..Attribution::unknown()
        };
        let Some(flow) = flow else { return base };
        let (
            L4Header::Ports {
                src: sport,
                dst: dport,
            },
            IPPROTO_TCP | IPPROTO_UDP,
        ) = (flow.l4, flow.protocol)
        else {
            return base;
        };
        // Without a uid the packet did not come from a local socket.
        if uid.is_none() {
            return base;
        }
        let key = (flow.protocol, flow.src, sport, flow.dst, dport, uid);
        self.lookup(key, base)
    }

    /// Who holds a local socket that talked to us (a DNS client of the guard):
    /// no uid comes with it, so the socket's own is used.
    pub fn attribute_socket(
        &mut self,
        protocol: u8,
        local: std::net::SocketAddr,
        remote: std::net::SocketAddr,
    ) -> Attribution {
        let key = (
            protocol,
            local.ip(),
            local.port(),
            remote.ip(),
            remote.port(),
            None,
        );
        self.lookup(key, Attribution::unknown())
    }

    /// [`Attributor::attribute_socket`]'s answer if it is cached, without a
    /// system call: the DNS guard asks on its runtime thread and sends only
    /// the misses to the blocking pool.
    pub fn cached_socket(
        &mut self,
        protocol: u8,
        local: std::net::SocketAddr,
        remote: std::net::SocketAddr,
    ) -> Option<Attribution> {
        let key = (
            protocol,
            local.ip(),
            local.port(),
            remote.ip(),
            remote.port(),
            None,
        );
        let (at, a) = self.sockets.get(&key)?;
        if at.elapsed() >= SOCKET_CACHE_TTL {
            return None;
        }
        self.stats.cache_hits += 1;
        Some(a.clone())
    }

    /// Who holds exactly this socket now: sock_diag by the exact tuple, the
    /// process holding that socket's inode, no cache and no rate limit. For
    /// access decisions (the proxy's `users`/`groups`/`units`): a cached
    /// answer for the same tuple may be another, earlier socket's (the port
    /// reused by another user within the cache's lifetime).
    pub fn attribute_socket_now(
        &mut self,
        protocol: u8,
        local: std::net::SocketAddr,
        remote: std::net::SocketAddr,
    ) -> Attribution {
        self.stats.deep_lookups += 1;
        let (src, sport, dst, dport) = (local.ip(), local.port(), remote.ip(), remote.port());
        self.deep(protocol, src, sport, dst, dport, Attribution::unknown())
    }

    /// The socket behind `key`, from the cache or a deep lookup (rate-limited:
    /// past the budget, `base` is all we say).
    fn lookup(&mut self, key: SocketKey, base: Attribution) -> Attribution {
        let now = Instant::now();
        if let Some((at, a)) = self.sockets.get(&key) {
            if now.duration_since(*at) < SOCKET_CACHE_TTL {
                self.stats.cache_hits += 1;
                return a.clone();
            }
        }
        if !self.take_token(now) {
            self.stats.rate_limited += 1;
            return base;
        }
        self.stats.deep_lookups += 1;
        let (protocol, src, sport, dst, dport, _) = key;
        let found = self.deep(protocol, src, sport, dst, dport, base);
        if self.sockets.len() >= SOCKET_CACHE_MAX {
            self.sockets
                .retain(|_, (at, _)| now.duration_since(*at) < SOCKET_CACHE_TTL);
            if self.sockets.len() >= SOCKET_CACHE_MAX {
                self.sockets.clear();
            }
        }
        self.sockets.insert(key, (now, found.clone()));
        found
    }

    /// Forgets cached sockets past their time to live (called from the
    /// pipeline's tick), so a burst of one-off flows does not stay in memory.
    pub fn expire(&mut self, now: Instant) {
        if !self.sockets.is_empty() {
            self.sockets
                .retain(|_, (at, _)| now.duration_since(*at) < SOCKET_CACHE_TTL);
            if self.sockets.capacity() > 4 * self.sockets.len().max(1024) {
                self.sockets.shrink_to_fit();
            }
        }
    }

    fn take_token(&mut self, now: Instant) -> bool {
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * DEEP_LOOKUPS_PER_SEC).min(DEEP_LOOKUPS_PER_SEC);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn deep(
        &mut self,
        protocol: u8,
        src: IpAddr,
        sport: u16,
        dst: IpAddr,
        dport: u16,
        mut a: Attribution,
    ) -> Attribution {
        let Some(diag) = self.diag.as_mut() else {
            return a;
        };
        let Some(sock) = diag.lookup(protocol, src, sport, dst, dport) else {
            return a;
        };
        a.method = Method::SockDiag;
        if a.uid.is_none() {
            a.uid = Some(sock.uid);
            a.user_name = self.names.user(sock.uid);
        }
        if let Some(pid) = self.find_inode(sock.inode, sock.uid) {
            let process = read_process_bounded(&self.proc_root, pid, &mut a.truncated);
            if let Some(path) = read_cgroup(&self.proc_root, pid) {
                a.cgroup = Some(path);
            }
            if let Some(p) = process {
                a.method = Method::SockDiagProc;
                a.process = Some(p);
            }
        }
        if a.cgroup.is_none() {
            a.cgroup = sock.cgroup_id.and_then(|id| self.cgroups.path(id));
        }
        if a.cgroup
            .as_mut()
            .is_some_and(|c| text::bound(c, text::PATH_MAX))
        {
            a.truncated.push("egret.cgroup");
        }
        if let Some(cg) = &a.cgroup {
            (a.unit, a.container_id) = unit_and_container(cg);
        }
        a
    }

    /// The pid holding socket `inode`.
    fn find_inode(&mut self, inode: u64, uid: u32) -> Option<u32> {
        if let Some(&(pid, fd)) = self.inodes.get(&inode) {
            if fd_is_socket(&self.proc_root, pid, fd, inode) {
                self.remember(pid);
                return Some(pid);
            }
            self.inodes.remove(&inode);
        }
        let recent = self.recent_pids.clone();
        for pid in recent.into_iter().rev() {
            if self.scan_pid(pid, inode) {
                self.remember(pid);
                return Some(pid);
            }
        }
        let mut pids = list_pids(&self.proc_root);
        // Newest first: a blocked connect usually comes from a fresh process.
        pids.sort_unstable_by(|a, b| b.cmp(a));
        // The socket owner's processes first (one stat each, stopping at the
        // first hit), then everyone else's.
        for own in [true, false] {
            for &pid in &pids {
                if (pid_uid(&self.proc_root, pid) == Some(uid)) == own && self.scan_pid(pid, inode)
                {
                    self.remember(pid);
                    return Some(pid);
                }
            }
        }
        None
    }

    fn remember(&mut self, pid: u32) {
        self.recent_pids.retain(|&p| p != pid);
        self.recent_pids.push(pid);
        if self.recent_pids.len() > 16 {
            self.recent_pids.remove(0);
        }
    }

    /// Indexes every socket of `pid`; true if `inode` is among them.
    fn scan_pid(&mut self, pid: u32, inode: u64) -> bool {
        let dir = self.proc_root.join(pid.to_string()).join("fd");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return false;
        };
        if self.inodes.len() > INODE_CACHE_MAX {
            self.inodes.clear();
        }
        let mut found = false;
        for entry in entries.flatten() {
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(target) = std::fs::read_link(entry.path()) else {
                continue;
            };
            if let Some(ino) = socket_inode(&target) {
                self.inodes.insert(ino, (pid, fd));
                found |= ino == inode;
            }
        }
        found
    }
}

impl Default for Attributor {
    fn default() -> Self {
        Self::new()
    }
}

fn socket_inode(link: &Path) -> Option<u64> {
    link.to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

fn fd_is_socket(proc_root: &Path, pid: u32, fd: u32, inode: u64) -> bool {
    let link = proc_root.join(format!("{pid}/fd/{fd}"));
    std::fs::read_link(link).ok().and_then(|t| socket_inode(&t)) == Some(inode)
}

fn list_pids(proc_root: &Path) -> Vec<u32> {
    std::fs::read_dir(proc_root)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn pid_uid(proc_root: &Path, pid: u32) -> Option<u32> {
    std::fs::metadata(proc_root.join(pid.to_string()))
        .ok()
        .map(|m| m.uid())
}

/// At most `max` bytes of a file, and whether there was more: a process's
/// arguments can be megabytes, and only the cap is ever read.
fn read_at_most(path: &Path, max: usize) -> Option<(Vec<u8>, bool)> {
    use std::io::Read;
    let file = std::fs::File::open(path).ok()?;
    let mut buf = Vec::with_capacity(max.min(8192) + 1);
    file.take(max as u64 + 1).read_to_end(&mut buf).ok()?;
    let more = buf.len() > max;
    buf.truncate(max);
    Some((buf, more))
}

/// A small /proc text file (comm), first line, bounded.
fn read_trimmed(path: PathBuf) -> Option<String> {
    let (raw, _) = read_at_most(&path, text::SHORT_MAX)?;
    let mut s = String::from_utf8_lossy(&raw).into_owned();
    text::bound(&mut s, text::SHORT_MAX);
    let s = s.trim_end_matches('\n');
    (!s.is_empty()).then(|| s.to_string())
}

pub fn read_process(proc_root: &Path, pid: u32) -> Option<Process> {
    read_process_bounded(proc_root, pid, &mut Vec::new())
}

/// The process's name, executable, command line and parent, each cut to its
/// cap (`crate::text`); the ECS names of the fields cut go to `truncated`.
fn read_process_bounded(
    proc_root: &Path,
    pid: u32,
    truncated: &mut Vec<&'static str>,
) -> Option<Process> {
    let dir = proc_root.join(pid.to_string());
    let name = read_trimmed(dir.join("comm"));
    // A process that exited between lookup and read leaves nothing behind.
    name.as_ref()?;
    // The kernel caps the link at PATH_MAX; the JSON cost may still exceed it.
    let executable = std::fs::read_link(dir.join("exe")).ok().map(|p| {
        let mut exe = p
            .to_string_lossy()
            .trim_end_matches(" (deleted)")
            .to_string();
        if text::bound(&mut exe, text::PATH_MAX) {
            truncated.push("process.executable");
        }
        exe
    });
    let command_line =
        read_at_most(&dir.join("cmdline"), text::COMMAND_LINE_MAX).and_then(|(raw, more)| {
            let args: Vec<String> = raw
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let mut line = args.join(" ");
            if text::bound(&mut line, text::COMMAND_LINE_MAX) || more {
                truncated.push("process.command_line");
            }
            (!line.is_empty()).then_some(line)
        });
    let parent_pid = read_at_most(&dir.join("status"), 16 * 1024).and_then(|(raw, _)| {
        String::from_utf8_lossy(&raw)
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|v| v.trim().parse().ok())
    });
    let parent_name = parent_pid
        .filter(|&p| p != 0)
        .and_then(|p| read_trimmed(proc_root.join(format!("{p}/comm"))));
    Some(Process {
        pid,
        name,
        executable,
        command_line,
        parent_pid,
        parent_name,
    })
}

/// The process's cgroup v2 path (or, on hybrid hosts, the systemd v1 one).
fn read_cgroup(proc_root: &Path, pid: u32) -> Option<String> {
    // A delegated subtree lets its owner nest cgroups deep: read a bounded
    // amount (the caller cuts the path to its cap).
    let (raw, _) = read_at_most(&proc_root.join(format!("{pid}/cgroup")), 64 * 1024)?;
    let content = String::from_utf8_lossy(&raw);
    let mut v2 = None;
    let mut systemd = None;
    for line in content.lines() {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if id == "0" && controllers.is_empty() {
            v2 = Some(path.to_string());
        } else if controllers == "name=systemd" {
            systemd = Some(path.to_string());
        }
    }
    let path = match (v2, systemd) {
        (Some(p), Some(s)) if p == "/" => s,
        (Some(p), _) => p,
        (None, s) => s?,
    };
    // The root cgroup says nothing about who sent the packet.
    (path != "/").then_some(path)
}

/// The systemd unit and the container id a cgroup path names, if any.
pub fn unit_and_container(path: &str) -> (Option<String>, Option<String>) {
    const UNIT_SUFFIXES: [&str; 4] = [".service", ".scope", ".socket", ".mount"];
    let mut unit = None;
    let mut container = None;
    for part in path.rsplit('/').filter(|p| !p.is_empty()) {
        if container.is_none() {
            let stem = part.strip_suffix(".scope").unwrap_or(part);
            let id = stem.rsplit(['-', ':']).next().unwrap_or(stem);
            if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                container = Some(id.to_string());
            }
        }
        if unit.is_none() && UNIT_SUFFIXES.iter().any(|s| part.ends_with(s)) {
            unit = Some(part.to_string());
        }
    }
    (unit, container)
}

/// cgroup id (the cgroup directory's inode) → path, for sockets whose
/// process is gone. The tree is re-walked on a miss, at most every 10 s.
#[derive(Default)]
struct CgroupPaths {
    by_id: HashMap<u64, String>,
    walked: Option<Instant>,
}

impl CgroupPaths {
    fn path(&mut self, id: u64) -> Option<String> {
        if let Some(p) = self.by_id.get(&id) {
            return Some(p.clone());
        }
        if self
            .walked
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
        {
            return None;
        }
        self.walked = Some(Instant::now());
        let root = crate::cgroup::cgroup2_root()?;
        self.by_id.clear();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            let rel = dir
                .strip_prefix(&root)
                .map(|r| format!("/{}", r.display()))
                .ok();
            if let Some(rel) = rel {
                self.by_id.insert(meta.ino(), rel);
            }
            if let Ok(entries) = std::fs::read_dir(&dir) {
                stack.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                        .map(|e| e.path()),
                );
            }
        }
        self.by_id.get(&id).cloned()
    }
}

/// uid/gid → name through NSS, cached (NSS may be slow: LDAP, sssd).
#[derive(Default)]
struct Names {
    users: HashMap<u32, Option<String>>,
    groups: HashMap<u32, Option<String>>,
}

impl Names {
    fn user(&mut self, uid: u32) -> Option<String> {
        self.users
            .entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(uid.into())
                    .ok()
                    .flatten()
                    .map(|u| u.name)
            })
            .clone()
    }
    fn group(&mut self, gid: u32) -> Option<String> {
        self.groups
            .entry(gid)
            .or_insert_with(|| {
                nix::unistd::Group::from_gid(gid.into())
                    .ok()
                    .flatten()
                    .map(|g| g.name)
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_containers_from_cgroup_paths() {
        assert_eq!(
            unit_and_container("/system.slice/nginx.service"),
            (Some("nginx.service".into()), None)
        );
        let id = "a".repeat(64);
        assert_eq!(
            unit_and_container(&format!("/system.slice/docker-{id}.scope")),
            (Some(format!("docker-{id}.scope")), Some(id.clone()))
        );
        assert_eq!(
            unit_and_container(&format!("/docker/{id}")),
            (None, Some(id))
        );
        assert_eq!(
            unit_and_container(
                "/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service"
            ),
            (Some("foo.service".into()), None)
        );
        assert_eq!(unit_and_container("/egret-test"), (None, None));
    }

    #[test]
    fn identity_prefers_executable_then_unit_then_uid() {
        let mut a = Attribution {
            method: Method::UidOnly,
            uid: Some(7),
            ..Attribution::unknown()
        };
        assert_eq!(a.identity(), Identity::Uid(7));
        a.unit = Some("x.service".into());
        assert_eq!(a.identity(), Identity::Unit("x.service".into()));
        a.process = Some(Process {
            pid: 1,
            executable: Some("/usr/bin/java".into()),
            ..Process::default()
        });
        assert_eq!(a.identity(), Identity::Executable("/usr/bin/java".into()));
    }

    #[test]
    fn own_process_is_readable() {
        let me = read_process(Path::new("/proc"), std::process::id()).unwrap();
        assert!(me.executable.is_some());
        assert!(me.command_line.is_some());
        assert!(me.parent_pid.is_some());
    }
}
