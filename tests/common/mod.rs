//! Test harness: network namespaces and veth links that clean up after
//! themselves (even when a test fails), real peers, and the egret binary.
#![allow(dead_code)]

pub mod runtime;
pub mod verdicts;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// How much slower than this machine the kernel under test runs:
/// EGRET_TEST_TIME_SCALE (scripts/kernel-matrix.sh sets it for its emulated
/// guests; default 1). Stretches the time windows tests give egret (confirm
/// deadlines, start-up), never turning a wait into a fixed sleep.
pub fn time_scale() -> u64 {
    std::env::var("EGRET_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1u64)
        .clamp(1, 50)
}

pub fn egret_bin() -> &'static str {
    env!("CARGO_BIN_EXE_egret")
}

/// What a test runs as another user (scripts, the egret binary) must not be
/// read from the checkout: it may sit in a directory only root can enter
/// (`/root/egret`). They are placed once per test process in a world-readable
/// temporary directory instead, removed when the process exits.
struct SupportDir {
    dir: PathBuf,
    bin: std::sync::OnceLock<PathBuf>,
}

const SUPPORT_FILES: [(&str, &str); 7] = [
    ("peer.py", include_str!("../support/peer.py")),
    (
        "alert_receiver.py",
        include_str!("../support/alert_receiver.py"),
    ),
    ("dashboard.py", include_str!("../support/dashboard.py")),
    ("flood.py", include_str!("../support/flood.py")),
    ("hold.py", include_str!("../support/hold.py")),
    (
        "otlp_receiver.py",
        include_str!("../support/otlp_receiver.py"),
    ),
    (
        "KeepAddress.java",
        include_str!("../support/KeepAddress.java"),
    ),
];

extern "C" fn remove_support_dir() {
    if let Some(s) = SUPPORT.get() {
        let _ = std::fs::remove_dir_all(&s.dir);
    }
}

static SUPPORT: std::sync::OnceLock<SupportDir> = std::sync::OnceLock::new();

fn support() -> &'static SupportDir {
    SUPPORT.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt;
        // Not under the checkout and not under $TMPDIR (which may be private):
        // /tmp is what every user can traverse.
        let dir = tempfile::Builder::new()
            .prefix("egret-test-support-")
            .tempdir_in("/tmp")
            .expect("a temporary directory in /tmp")
            .keep();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .expect("chmod 755 the support directory");
        for (name, text) in SUPPORT_FILES {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("writing a support script");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
                .expect("chmod 644 a support script");
        }
        // SAFETY: registers a plain function; statics are never dropped by the
        // test harness, so this is what removes the directory.
        unsafe { libc::atexit(remove_support_dir) };
        SupportDir {
            dir,
            bin: std::sync::OnceLock::new(),
        }
    })
}

/// A support script (tests/support/NAME) at a path any user can read.
pub fn support_script(name: &str) -> PathBuf {
    let s = support();
    assert!(
        SUPPORT_FILES.iter().any(|(n, _)| *n == name),
        "unknown support script {name}"
    );
    s.dir.join(name)
}

pub fn peer_script() -> PathBuf {
    support_script("peer.py")
}

/// The egret binary at a path any user can execute: for tests that run it
/// as another user (the build's own copy may be in a private checkout).
pub fn egret_bin_for_others() -> &'static str {
    let s = support();
    s.bin
        .get_or_init(|| {
            // Copied by a child process: a file open for writing in this
            // process would leak into children other test threads fork at
            // that moment, and exec of the copy would fail (ETXTBSY).
            let path = s.dir.join("egret");
            run_ok(
                Command::new("install")
                    .args(["-m", "755", egret_bin()])
                    .arg(&path),
            );
            path
        })
        .to_str()
        .expect("utf-8 path")
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        assert!(
            nix_is_root(),
            "the namespace tests need root (they create network namespaces with `ip netns add`)"
        );
        let name = unique("egt");
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        run_ok(&mut ns.cmd("ip", &["link", "set", "lo", "up"]));
        ns
    }

    /// A command run inside this namespace. `nsenter --net` changes only the
    /// network namespace (`ip netns exec` would also remount /sys).
    pub fn cmd(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(program)
            .args(args);
        c
    }

    pub fn egret(&self, args: &[&str]) -> Command {
        self.cmd(egret_bin(), args)
    }

    /// `program args...` in this namespace as user and group `nobody` (65534), no capabilities.
    pub fn as_nobody(&self, program: &str, args: &[&str]) -> Command {
        self.as_user(65534, program, args)
    }

    /// `program args...` in this namespace as `uid` (group the same), no capabilities.
    pub fn as_user(&self, uid: u32, program: &str, args: &[&str]) -> Command {
        let (u, g) = (format!("--reuid={uid}"), format!("--regid={uid}"));
        let mut a = vec![u.as_str(), g.as_str(), "--clear-groups", program];
        a.extend_from_slice(args);
        self.cmd("setpriv", &a)
    }

    /// `egret run` with `policy` and its state dir, not started.
    pub fn egret_run(&self, policy: &PolicyFile) -> Command {
        let state = policy.state_dir();
        self.egret(&["run", "--policy", policy.path(), "--state-dir", &state])
    }

    /// Runs egret and returns its output, whatever the exit status.
    pub fn egret_out(&self, args: &[&str]) -> Output {
        self.egret(args).output().expect("running egret")
    }

    pub fn egret_ok(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&run_ok(&mut self.egret(args)).stdout).into_owned()
    }

    /// The peer script, optionally as another user.
    pub fn peer(&self, uid: Option<u32>, args: &[&str]) -> Command {
        let script = peer_script();
        let script = script.to_str().expect("utf-8 path");
        match uid {
            None => {
                let mut a = vec![script];
                a.extend_from_slice(args);
                self.cmd("/usr/bin/python3", &a)
            }
            Some(uid) => {
                let id = uid.to_string();
                let (reuid, regid) = (format!("--reuid={id}"), format!("--regid={id}"));
                let mut a = vec![
                    reuid.as_str(),
                    regid.as_str(),
                    "--clear-groups",
                    "/usr/bin/python3",
                    script,
                ];
                a.extend_from_slice(args);
                self.cmd("setpriv", &a)
            }
        }
    }

    /// True when a TCP connection and an echo round trip to host:port work.
    pub fn tcp_ok(&self, uid: Option<u32>, host: &str, port: u16) -> bool {
        self.peer(uid, &["tcp-connect", host, &port.to_string()])
            .status()
            .expect("peer")
            .success()
    }

    pub fn udp_ok(&self, host: &str, port: u16) -> bool {
        self.peer(None, &["udp-send", host, &port.to_string()])
            .status()
            .expect("peer")
            .success()
    }

    /// Starts an echo server and waits until it listens.
    pub fn server(&self, proto: &str, host: &str, port: u16) -> Server {
        let mut child = self
            .peer(None, &[&format!("{proto}-server"), host, &port.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning server");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("server output");
        assert_eq!(line.trim(), "listening", "server did not start");
        Server(child)
    }

    /// `nft list ruleset` in this namespace: an independent view of what is loaded.
    /// The HTTP status curl got for `url` through the proxy at `proxy`.
    pub fn status_via_proxy(&self, proxy: &str, url: &str) -> String {
        let out = self
            .cmd(
                "curl",
                &[
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "-x",
                    proxy,
                    url,
                ],
            )
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn nft_ruleset(&self) -> String {
        String::from_utf8_lossy(&run_ok(&mut self.cmd("nft", &["list", "ruleset"])).stdout)
            .into_owned()
    }

    /// The ruleset with counter values and element expiry blanked: for
    /// comparing rule structure while background traffic (IPv6 neighbour
    /// discovery) moves counters and time runs down the novelty sets'
    /// elements.
    pub fn nft_rules_only(&self) -> String {
        let text = self.nft_ruleset();
        let mut tokens = text.split_whitespace().peekable();
        let mut out = Vec::new();
        while let Some(t) = tokens.next() {
            if t == "expires" {
                tokens.next(); // the time left, and its trailing comma if any
                continue;
            }
            out.push(t);
            if t == "counter" && tokens.peek() == Some(&"packets") {
                tokens.nth(3); // packets N bytes M
            }
        }
        out.join(" ")
    }

    pub fn status_json(&self) -> serde_json::Value {
        let out = self.egret_out(&["status", "--json", "--state-dir", "/nonexistent"]);
        serde_json::from_slice(&out.stdout).expect("status --json")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            });
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

/// Two namespaces joined by a veth pair: `a` (10.1.0.1, 2001:db8:1::1) and
/// `b` (10.1.0.2, 2001:db8:1::2). Documentation/test addresses only.
pub struct Pair {
    pub a: Netns,
    pub b: Netns,
}

pub const A4: &str = "10.1.0.1";
pub const B4: &str = "10.1.0.2";
pub const A6: &str = "2001:db8:1::1";
pub const B6: &str = "2001:db8:1::2";

impl Pair {
    pub fn new() -> Pair {
        let (a, b) = (Netns::new(), Netns::new());
        let (va, vb) = (unique("va"), unique("vb"));
        run_ok(
            a.cmd(
                "ip",
                &[
                    "link", "add", &va, "type", "veth", "peer", "name", &vb, "netns", &b.name,
                ],
            )
            .stdout(Stdio::null()),
        );
        for (ns, dev, v4, v6) in [(&a, &va, A4, A6), (&b, &vb, B4, B6)] {
            run_ok(&mut ns.cmd("ip", &["addr", "add", &format!("{v4}/24"), "dev", dev]));
            run_ok(&mut ns.cmd(
                "ip",
                &["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"],
            ));
            run_ok(&mut ns.cmd("ip", &["link", "set", dev, "up"]));
        }
        Pair { a, b }
    }
}

/// A running peer server; killed on drop.
pub struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A client that holds one TCP connection open until told to use it.
pub struct Held {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Held {
    pub fn connect(ns: &Netns, host: &str, port: u16) -> Held {
        let mut child = ns
            .peer(None, &["hold", host, &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning hold");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("hold output");
        assert_eq!(line.trim(), "connected");
        let stdin = child.stdin.take();
        Held { child, stdin }
    }

    /// Sends on the held connection and reports whether the echo came back.
    pub fn round_trip(mut self) -> bool {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"go\n");
        }
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cgroup v2 directory (a stand-in for a systemd unit's cgroup), removed on drop.
pub struct Cgroup {
    pub root: PathBuf,
    /// Path relative to the cgroup2 root, as a policy's `units` names it.
    pub relative: String,
}

impl Cgroup {
    pub fn new(leaf: &str) -> Cgroup {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let root = mountinfo
            .lines()
            .find_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                (right.split_whitespace().next()? == "cgroup2").then_some(())?;
                left.split_whitespace().nth(4).map(PathBuf::from)
            })
            .expect("a cgroup2 hierarchy is mounted (needed by `socket cgroupv2`)");
        let relative = format!("{}.slice/{leaf}", unique("egret-test-"));
        std::fs::create_dir_all(root.join(&relative)).expect("creating a test cgroup");
        Cgroup { root, relative }
    }

    pub fn procs(&self) -> String {
        self.root
            .join(&self.relative)
            .join("cgroup.procs")
            .to_string_lossy()
            .into_owned()
    }

    /// A TCP round trip from a process placed in this cgroup before it opens its socket.
    pub fn tcp_ok(&self, ns: &Netns, host: &str, port: u16) -> bool {
        let script = format!(
            "echo $$ > {} && exec nsenter --net=/run/netns/{} -- /usr/bin/python3 {} tcp-connect {host} {port}",
            self.procs(),
            ns.name,
            peer_script().display()
        );
        Command::new("sh")
            .args(["-c", &script])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let dir = self.root.join(&self.relative);
        let _ = std::fs::remove_dir(&dir);
        if let Some(parent) = dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// A policy file in a temporary directory.
pub struct PolicyFile {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl PolicyFile {
    pub fn new(text: &str) -> PolicyFile {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, text).expect("write policy");
        PolicyFile { dir, path }
    }

    pub fn path(&self) -> &str {
        self.path.to_str().expect("utf-8")
    }

    pub fn state_dir(&self) -> String {
        self.dir.path().join("state").to_string_lossy().into_owned()
    }

    pub fn rewrite(&self, text: &str) {
        std::fs::write(&self.path, text).expect("rewrite policy");
    }
}

/// Packets counted by the final log rule (blocked or would-block).
pub fn blocked_packets(ns: &Netns) -> u64 {
    ns.status_json()["blocked_packets"].as_u64().unwrap_or(0)
}

/// A running `egret run` in a namespace: its stdout JSON lines are collected
/// as they come; SIGTERM (then SIGKILL) on drop.
pub struct Running {
    child: Child,
    pub events: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
    pub state_dir: String,
    netns: String,
}

impl Running {
    pub fn start(ns: &Netns, state_dir: &str, extra: &[&str]) -> Running {
        let mut args = vec!["run", "--state-dir", state_dir, "--update-every", "1s"];
        args.extend_from_slice(extra);
        let mut child = ns
            .egret(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning egret run");
        let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let out = child.stdout.take().expect("stdout");
        let sink = std::sync::Arc::clone(&events);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let doc = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("egret run printed a non-JSON line ({e}): {line}"));
                sink.lock().expect("events").push(doc);
            }
        });
        let err = child.stderr.take().expect("stderr");
        let errs = std::sync::Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut e = errs.lock().expect("stderr");
                e.push_str(&line);
                e.push('\n');
            }
        });
        let mut r = Running {
            child,
            events,
            stderr,
            state_dir: state_dir.to_string(),
            netns: ns.name.clone(),
        };
        r.wait_ready();
        r
    }

    /// `egret status --json` for this daemon's state dir, run in its namespace.
    pub fn status(&self) -> serde_json::Value {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .arg(egret_bin())
            .args(["status", "--json", "--state-dir", &self.state_dir])
            .output()
            .expect("running egret status");
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// This daemon's books, if it has written any (`status`'s `monitor`
    /// with this daemon's pid: books left by an earlier run do not count).
    pub fn books(&self) -> Option<serde_json::Value> {
        let m = self.status().get("monitor")?.clone();
        (m["pid"].as_u64() == Some(u64::from(self.child.id()))).then_some(m)
    }

    /// Polls `done` (up to `secs`, stretched by `time_scale`) until it holds;
    /// panics naming `what`, with the daemon's stderr.
    pub fn wait_until(&self, what: &str, secs: u64, mut done: impl FnMut() -> bool) {
        let deadline =
            std::time::Instant::now() + std::time::Duration::from_secs(secs * time_scale());
        while !done() {
            if std::time::Instant::now() > deadline {
                panic!(
                    "not {what} within {secs} s; egret run's stderr:\n{}",
                    self.stderr_text()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Waits until the loop is up: the daemon writes its books once the
    /// ruleset is loaded and just before it takes its first input.
    pub fn wait_ready(&mut self) {
        let deadline =
            std::time::Instant::now() + std::time::Duration::from_secs(30 * time_scale());
        while self.books().is_none() {
            if let Ok(Some(exit)) = self.child.try_wait() {
                panic!(
                    "egret run exited ({exit}) before it was ready:\n{}",
                    self.stderr_text()
                );
            }
            if std::time::Instant::now() > deadline {
                panic!("egret run did not start:\n{}", self.stderr_text());
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Reloads that replaced the policy so far (the books' `reloads`).
    pub fn reloads(&self) -> u64 {
        self.books()
            .and_then(|b| b["reloads"].as_u64())
            .unwrap_or(0)
    }

    /// Waits until a reload after the `prev`-th replaced the policy.
    pub fn wait_reloaded(&self, prev: u64) {
        self.wait_until("reloaded", 10, || self.reloads() > prev);
    }

    /// Times the unit rules followed restarted units (the books' `unit_changes`).
    pub fn unit_changes(&self) -> u64 {
        self.books()
            .and_then(|b| b["unit_changes"].as_u64())
            .unwrap_or(0)
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().expect("stderr").clone()
    }

    pub fn snapshot(&self) -> Vec<serde_json::Value> {
        self.events.lock().expect("events").clone()
    }

    /// Waits (up to `secs`) until an event matches; panics with what was seen.
    pub fn wait_event(
        &self,
        secs: u64,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline =
            std::time::Instant::now() + std::time::Duration::from_secs(secs * time_scale());
        loop {
            if let Some(e) = self.snapshot().into_iter().find(|e| pred(e)) {
                return e;
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "no event {what} within {secs} s; events: {:#?}\nstderr:\n{}",
                    self.snapshot(),
                    self.stderr_text()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn signal(&self, sig: &str) {
        run_ok(Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]));
    }

    /// The exit status, once it has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        let status = self.child.wait().expect("waiting for egret run");
        std::thread::sleep(std::time::Duration::from_millis(100));
        status
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// JSON pointer lookup that reads well in assertions.
pub fn at<'a>(doc: &'a serde_json::Value, pointer: &str) -> &'a serde_json::Value {
    doc.pointer(pointer).unwrap_or(&serde_json::Value::Null)
}

/// A peer that keeps running (and so keeps its socket) until dropped.
pub struct Attempt {
    child: Child,
    pub pid: u32,
}

impl Attempt {
    pub fn start(ns: &Netns, uid: Option<u32>, args: &[&str]) -> Attempt {
        let mut child = ns
            .peer(uid, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning peer");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("peer output");
        let pid = line.trim().parse().expect("peer prints its pid");
        Attempt { child, pid }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A background process of a test (a real server); killed on drop.
pub struct Spawned(pub Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The name of the veth interface in `ns`.
pub fn veth_name(ns: &Netns) -> String {
    String::from_utf8_lossy(
        &run_ok(&mut ns.cmd("ip", &["-o", "link", "show", "type", "veth"])).stdout,
    )
    .split(':')
    .nth(1)
    .map(|s| s.trim().split('@').next().unwrap_or("").to_string())
    .expect("a veth interface")
}

/// Adds addresses (`10.1.0.10/24`, `2001:db8:1::10/64`) to `ns`'s veth.
pub fn add_addresses(ns: &Netns, cidrs: &[&str]) {
    let dev = veth_name(ns);
    for c in cidrs {
        let mut args = vec!["addr", "add", c, "dev", &dev];
        if c.contains(':') {
            args.push("nodad");
        }
        run_ok(&mut ns.cmd("ip", &args));
    }
}

/// dnsmasq in `ns` as an authoritative test upstream on port 53 of `listen`,
/// with `extra` options (`--host-record=...`, `--local-ttl=...`).
pub fn dnsmasq(ns: &Netns, listen: &[&str], extra: &[String]) -> Spawned {
    let mut args: Vec<String> = [
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--bind-interfaces",
        "--port=53",
        "--user=root",
        "--pid-file=",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(listen.iter().map(|l| format!("--listen-address={l}")));
    args.extend(extra.iter().cloned());
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    Spawned(
        ns.cmd("dnsmasq", &a)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (apt-get install dnsmasq-base)"),
    )
}

/// Connections a user opens to the proxy on 127.0.0.1:3128 and never
/// finishes (one per argv[1], until connect fails); "held N" once they are
/// open, released when stdin closes.
const HOLD_MANY: &str = r#"
import socket, sys
held = []
for _ in range(int(sys.argv[1])):
    try:
        held.append(socket.create_connection(("127.0.0.1", 3128), timeout=10))
    except OSError:
        break
print("held %d" % len(held), flush=True)
sys.stdin.read()
for s in held:
    s.close()
"#;

/// A user holding every descriptor the proxy of `run` can get: egret's
/// descriptor limit is capped 40 above what it has open (prlimit), then
/// `uid` opens 200 proxy connections and keeps them. Returns once the proxy
/// has said it cannot accept (`proxy: accept:`); dropping the returned
/// holder's stdin releases the connections.
pub fn exhaust_proxy_descriptors(ns: &Netns, run: &Running, uid: u32) -> Child {
    let pid = std::fs::read_to_string(format!("{}/egret.pid", run.state_dir))
        .expect("pid file")
        .trim()
        .to_string();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("egret's descriptors")
        .count();
    let limit = open + 40;
    run_ok(Command::new("prlimit").args(["--pid", &pid, &format!("--nofile={limit}:{limit}")]));
    let mut holder = ns
        .as_user(uid, "/usr/bin/python3", &["-c", HOLD_MANY, "200"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("holder");
    let mut line = String::new();
    BufReader::new(holder.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("holder");
    assert_eq!(line.trim(), "held 200", "connections wait in the backlog");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !run.stderr_text().contains("proxy: accept:") {
        assert!(
            std::time::Instant::now() < deadline,
            "the proxy never ran out of descriptors:\n{}",
            run.stderr_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    holder
}

/// systemd-journald in mount and network namespaces of its own, with tmpfs
/// on /run and /var/log: its sockets and journal files exist only there
/// (reached through /proc/PID/root), never this machine's. Returns once its
/// syslog and stdout sockets exist.
pub fn private_journald() -> (Spawned, u32) {
    let child = Command::new("unshare")
        .args(["--mount", "--net", "--propagation", "private", "sh", "-ec"])
        .arg(
            "mount -t tmpfs egret-test /run; mount -t tmpfs egret-test /var/log; \
             mkdir -p /run/systemd/journal; exec /lib/systemd/systemd-journald",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("systemd-journald (Debian package systemd)");
    let pid = child.id();
    let journald = Spawned(child);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    for socket in ["dev-log", "stdout"] {
        let path = format!("/proc/{pid}/root/run/systemd/journal/{socket}");
        while !std::path::Path::new(&path).exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "journald made no {path}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    (journald, pid)
}

/// A program that resolves NAME with glibc (getaddrinfo, so resolv.conf's
/// search list applies), connects to the first address on PORT and echoes a
/// line. Prints its pid first, then what happened.
const GLIBC_CLIENT: &str = r#"
import os, socket, sys
name, port = sys.argv[1], int(sys.argv[2])
print(os.getpid(), flush=True)
try:
    addr = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
except socket.gaierror as e:
    print("unresolved", e, flush=True)
    sys.exit(2)
with socket.create_connection(addr, timeout=5) as s:
    s.sendall(b"ping\n")
    print("connected", addr[0], s.recv(16) == b"ping\n", flush=True)
"#;

/// Writes a resolv.conf naming `nameserver` (and `search`, if any) into
/// `dir`; its path.
pub fn write_resolv_conf(dir: &std::path::Path, nameserver: &str, search: Option<&str>) -> String {
    let path = dir.join(format!("resolv.conf.{nameserver}"));
    let search = search.map(|s| format!("search {s}\n")).unwrap_or_default();
    std::fs::write(
        &path,
        format!("nameserver {nameserver}\n{search}options timeout:2 attempts:1\n"),
    )
    .expect("writing resolv.conf");
    path.to_string_lossy().into_owned()
}

/// GLIBC_CLIENT resolving `name` and connecting to `port`, as nobody in
/// `ns`, with `resolv_conf` as its /etc/resolv.conf (bind-mounted in a mount
/// namespace of its own). Returns its pid and output.
pub fn glibc_client(ns: &Netns, resolv_conf: &str, name: &str, port: u16) -> (u32, String) {
    let script = r#"mount --bind "$1" /etc/resolv.conf && exec setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/python3 -c "$PROGRAM" "$2" "$3""#;
    let out = ns
        .cmd(
            "unshare",
            &[
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                "sh",
                resolv_conf,
                name,
                &port.to_string(),
            ],
        )
        .env("PROGRAM", GLIBC_CLIENT)
        .output()
        .expect("running the program");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let pid = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "the program did not start: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    (pid, text)
}

/// `host` joined to a fresh `outside` namespace (a stand-in for the world)
/// by a veth pair: `host_addr`/24 on the host's end, each of
/// `outside_addrs`/24 on the other, both ends up.
pub fn link_to_outside(host: &Netns, outside: &Netns, host_addr: &str, outside_addrs: &[&str]) {
    let (up, world) = ("uplink", "world");
    run_ok(&mut host.cmd(
        "ip",
        &[
            "link",
            "add",
            up,
            "type",
            "veth",
            "peer",
            "name",
            world,
            "netns",
            &outside.name,
        ],
    ));
    run_ok(&mut host.cmd(
        "ip",
        &["addr", "add", &format!("{host_addr}/24"), "dev", up],
    ));
    run_ok(&mut host.cmd("ip", &["link", "set", up, "up"]));
    for a in outside_addrs {
        run_ok(&mut outside.cmd("ip", &["addr", "add", &format!("{a}/24"), "dev", world]));
    }
    run_ok(&mut outside.cmd("ip", &["link", "set", world, "up"]));
}

/// A one-file container image, made here (no registry is reachable): a tar
/// of a root with /bin/busybox and `applets` linked to it, written under `dir`.
pub fn busybox_rootfs_tar(dir: &std::path::Path, applets: &[&str]) -> PathBuf {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).expect("rootfs");
    std::fs::create_dir_all(root.join("etc")).expect("rootfs");
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox (busybox-static)");
    for applet in applets {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("applet");
    }
    let tar = dir.join("rootfs.tar");
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
    );
    tar
}

/// The check `name` from `egret doctor` in `ns` for `policy` (and its state
/// directory) with `resolv_conf` as the programs' resolver configuration.
pub fn doctor_check_for(
    ns: &Netns,
    policy: &PolicyFile,
    resolv_conf: &str,
    name: &str,
) -> (String, String) {
    let state = policy.state_dir();
    let args = [
        "--policy",
        policy.path(),
        "--state-dir",
        &state,
        "--resolv-conf",
        resolv_conf,
    ];
    doctor_check(ns, &args, name)
}

/// The check `name` from `egret doctor --json ARGS` in `ns`: (status,
/// detail). Panics, listing the checks, if there is none by that name.
pub fn doctor_check(ns: &Netns, args: &[&str], name: &str) -> (String, String) {
    let mut a = vec!["doctor", "--json"];
    a.extend_from_slice(args);
    let out = ns.egret_out(&a);
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let c = checks
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no check {name}: {checks:#}"))
        .clone();
    let s = |k: &str| c[k].as_str().unwrap_or("").to_string();
    (s("status"), s("detail"))
}
