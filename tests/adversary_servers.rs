//! Attacks on the servers `egret run` keeps open on loopback (the DNS guard,
//! the API, the metrics endpoint, the live feed) and on what it writes to
//! disk, run for real by unprivileged users in a namespace of their own:
//! descriptor exhaustion, idle and half-sent connections, one user taking
//! every connection or feed, reading the API and the store without being in
//! its group, and a hostile umask.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const API: &str = "127.0.0.1:9465";
const METRICS: &str = "127.0.0.1:9464";

/// A policy with the guard, the API and metrics, `[api] group = group`.
fn policy(group: Option<&str>) -> String {
    let group = group
        .map(|g| format!("group = \"{g}\"\n"))
        .unwrap_or_default();
    format!(
        r#"
mode = "enforce"

[dns]
listen = "127.0.0.1:53"
# TEST-NET: never answers; the tests only ask names the guard refuses.
upstream = ["192.0.2.1"]

[api]
listen = "{API}"
{group}
[metrics]
listen = "{METRICS}"

[[allow]]
name = "web"
hosts = ["allowed.test"]
ports = [80]
"#
    )
}

fn hold_script() -> String {
    support_script("hold.py").to_string_lossy().into_owned()
}

/// `program args` in `ns` as `uid` (its primary group, no others), or as root.
fn as_user(ns: &Netns, uid: Option<u32>, program: &str, args: &[&str]) -> Command {
    match uid {
        None => ns.cmd(program, args),
        Some(uid) => {
            let (reuid, regid) = (format!("--reuid={uid}"), format!("--regid={uid}"));
            let mut a = vec![reuid.as_str(), regid.as_str(), "--clear-groups", program];
            a.extend_from_slice(args);
            ns.cmd("setpriv", &a)
        }
    }
}

/// The HTTP status of `GET http://addr/path` with curl as `uid` (0: no answer).
fn http_status(ns: &Netns, uid: Option<u32>, addr: &str, path: &str) -> u16 {
    let url = format!("http://{addr}{path}");
    let out = as_user(
        ns,
        uid,
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-m",
            "5",
            "-w",
            "%{http_code}",
            &url,
        ],
    )
    .output()
    .expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// The status dig reports for `name` through the guard (None: no answer).
fn dig_status(ns: &Netns, name: &str, tcp: bool) -> Option<String> {
    let mut args = vec!["+tries=1", "+time=2", "@127.0.0.1", name];
    if tcp {
        args.push("+tcp");
    }
    let out = as_user(ns, Some(65534), "dig", &args)
        .output()
        .expect("dig");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .map(str::to_string)
}

fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `hold.py hold ...` as `uid`: connections kept open until dropped.
struct Holder {
    child: Child,
    summary: serde_json::Value,
}

impl Holder {
    fn start(ns: &Netns, uid: Option<u32>, addr: &str, n: usize, path: Option<&str>) -> Holder {
        let (host, port) = addr.split_once(':').expect("host:port");
        let script = hold_script();
        let n = n.to_string();
        let mut args = vec![script.as_str(), "hold", host, port, n.as_str()];
        args.extend(path);
        let mut child = as_user(ns, uid, "/usr/bin/python3", &args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("hold.py");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("hold.py output");
        let summary =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("hold.py printed {line:?}: {e}"));
        Holder { child, summary }
    }

    fn statuses(&self, code: &str) -> u64 {
        self.summary["statuses"][code].as_u64().unwrap_or(0)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn egret_pid(state_dir: &str) -> u32 {
    std::fs::read_to_string(format!("{state_dir}/egret.pid"))
        .expect("pid file")
        .trim()
        .parse()
        .expect("a pid")
}

/// The finding: `accept()?` on EMFILE ended the guard's TCP task, and with it
/// the UDP one (host DNS down until a restart). Here egret runs with few
/// descriptors, `nobody` exhausts them with TCP connections to the guard,
/// and the guard must keep answering UDP meanwhile, then TCP, the API and
/// metrics once they are released.
#[test]
fn servers_survive_descriptor_exhaustion() {
    let ns = Netns::new();
    let policy = PolicyFile::new(&policy(None));
    let run = Running::start(&ns, &policy.state_dir(), &["--policy", policy.path()]);
    let pid = egret_pid(&run.state_dir);
    assert!(
        dig_status(&ns, "refused.test", true).is_some(),
        "the guard answers TCP"
    );

    // A few descriptors above what egret holds now.
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("egret's fds")
        .count();
    let limit = (open + 6).to_string();
    run_ok(Command::new("prlimit").args([
        "--pid",
        &pid.to_string(),
        &format!("--nofile={limit}:{limit}"),
    ]));
    let holder = Holder::start(&ns, Some(65534), "127.0.0.1:53", 24, None);
    wait_for("the guard's accept() failing", 20, || {
        run.stderr_text().contains("DNS guard (TCP)")
    });
    // Out of descriptors, the guard still answers over UDP.
    assert!(
        dig_status(&ns, "refused.test", false).is_some(),
        "the guard stopped answering UDP after an accept error:\n{}",
        run.stderr_text()
    );

    drop(holder);
    wait_for("the guard answering TCP again", 30, || {
        dig_status(&ns, "refused.test", true).is_some()
    });
    assert!(dig_status(&ns, "refused.test", false).is_some());

    // The API and metrics, driven into the same error, serve again too.
    let api_holder = Holder::start(&ns, None, API, 24, None);
    let metrics_holder = Holder::start(&ns, None, METRICS, 24, None);
    wait_for("the API's accept() failing", 20, || {
        run.stderr_text()
            .contains("api: accepting a connection failed")
            && run
                .stderr_text()
                .contains("metrics: accepting a connection failed")
    });
    drop((api_holder, metrics_holder));
    wait_for("the API answering again", 30, || {
        http_status(&ns, None, API, "/api/v1/status") == 200
    });
    wait_for("metrics answering again", 30, || {
        http_status(&ns, None, METRICS, "/metrics") == 200
    });
    assert!(dig_status(&ns, "refused.test", true).is_some());
}

/// The finding: 20 idle connections were still open after 240 s. A client
/// that sends nothing, one that stops in its request head and a keep-alive
/// connection left idle are all closed by the server (polled, not timed).
#[test]
fn idle_and_half_sent_connections_are_closed() {
    let ns = Netns::new();
    let policy = PolicyFile::new(&policy(None));
    let _run = Running::start(&ns, &policy.state_dir(), &["--policy", policy.path()]);
    for addr in [API, METRICS] {
        let (host, port) = addr.split_once(':').expect("host:port");
        let out = ns
            .cmd(
                "/usr/bin/python3",
                &[&hold_script(), "idle", host, port, "120"],
            )
            .output()
            .expect("hold.py");
        assert!(
            out.status.success(),
            "{addr}: connections left open: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// One user opens far more connections than its share: past its cap they
/// are closed at once, and another user is still served.
#[test]
fn one_user_cannot_take_every_connection() {
    let ns = Netns::new();
    let policy = PolicyFile::new(&policy(None));
    let _run = Running::start(&ns, &policy.state_dir(), &["--policy", policy.path()]);
    let hog = Holder::start(&ns, Some(65534), METRICS, 300, None);
    let kept = hog.summary["open"].as_u64().expect("open");
    assert!(
        kept <= 32,
        "one user kept {kept} of 300 connections: {}",
        hog.summary
    );
    assert_eq!(http_status(&ns, Some(1), METRICS, "/metrics"), 200);
    assert_eq!(http_status(&ns, None, METRICS, "/metrics"), 200);
}

/// The finding: one user could hold all 64 live-feed slots. Root (in the
/// group) asks for all 64; it gets its share and the next member still gets one.
#[test]
fn one_user_cannot_take_every_live_feed() {
    let ns = Netns::new();
    let policy = PolicyFile::new(&policy(Some("daemon")));
    let _run = Running::start(&ns, &policy.state_dir(), &["--policy", policy.path()]);
    let hog = Holder::start(&ns, None, API, 64, Some("/api/v1/stream"));
    let got = hog.statuses("200");
    assert!(
        got > 0 && got <= 8,
        "one user holds {got} live feeds: {}",
        hog.summary
    );
    let other = Holder::start(&ns, Some(1), API, 1, Some("/api/v1/stream"));
    assert_eq!(
        other.statuses("200"),
        1,
        "a second user got no feed: {}",
        other.summary
    );
}

/// The finding: any local user read every user's command lines through the
/// API. Only root and members of `[api] group` may; a refused user is told so.
#[test]
fn only_root_and_the_api_group_read_the_api() {
    let ns = Netns::new();
    // `daemon` (uid 1) is in group daemon; nobody is not.
    let policy = PolicyFile::new(&policy(Some("daemon")));
    let run = Running::start(&ns, &policy.state_dir(), &["--policy", policy.path()]);
    for path in ["/api/v1/status", "/api/v1/events", "/api/v1/stream"] {
        assert_eq!(
            http_status(&ns, Some(65534), API, path),
            403,
            "nobody: {path}"
        );
    }
    assert_eq!(http_status(&ns, None, API, "/api/v1/status"), 200, "root");
    assert_eq!(
        http_status(&ns, Some(1), API, "/api/v1/status"),
        200,
        "group member"
    );
    assert_eq!(
        http_status(&ns, Some(1), API, "/api/v1/events"),
        200,
        "group member"
    );
    assert!(run.stderr_text().contains("refused uid 65534"));
    // Counted where an operator looks.
    let out = run_ok(&mut ns.cmd(
        "curl",
        &["-s", "-m", "5", &format!("http://{API}/api/v1/status")],
    ));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert!(
        status["api"]["connections"]["refused_access"].as_u64() >= Some(3),
        "{:#}",
        status["api"]
    );
    // Metrics hold counts only: anyone local may scrape them.
    assert_eq!(http_status(&ns, Some(65534), METRICS, "/metrics"), 200);
}

/// With the default group (absent here, as on a host without the package),
/// only root is served.
#[test]
fn without_its_group_only_root_reads_the_api() {
    let ns = Netns::new();
    let policy = PolicyFile::new(&policy(Some("egret-test-no-such-group")));
    let _run = Running::start(&ns, &policy.state_dir(), &["--policy", policy.path()]);
    assert_eq!(http_status(&ns, Some(65534), API, "/api/v1/status"), 403);
    assert_eq!(http_status(&ns, Some(1), API, "/api/v1/status"), 403);
    assert_eq!(http_status(&ns, None, API, "/api/v1/status"), 200);
}

/// The finding: a custom `--state-dir` came out 0755 and events.db 0644.
/// Under umask 000, in a directory everyone may traverse, egret still makes
/// the state dir 0750 and the store 0640 (group: `[api] group`), and nobody
/// cannot read the store.
#[test]
fn state_files_keep_their_modes_under_a_hostile_umask() {
    let ns = Netns::new();
    let policy = PolicyFile::new(&policy(Some("daemon")));
    std::fs::set_permissions(policy.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let state = policy.dir.path().join("custom/state");
    let state_s = state.to_string_lossy().into_owned();
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "umask 000 && exec \"$@\"",
        "sh",
        "nsenter",
        &format!("--net=/run/netns/{}", ns.name),
        "--",
        egret_bin(),
        "run",
        "--policy",
        policy.path(),
        "--state-dir",
        &state_s,
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = Spawned(cmd.spawn().expect("egret run"));
    let stderr = child.0.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut log = String::new();
    while !log.contains("watching blocked egress") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                log.push_str(&line);
                log.push('\n');
            }
            Err(_) => panic!("egret run did not start:\n{log}"),
        }
    }
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("stat").mode() & 0o7777;
    let gid = |p: &std::path::Path| std::fs::metadata(p).expect("stat").gid();
    assert_eq!(mode(&state), 0o750, "state dir");
    assert_eq!(gid(&state), 1, "state dir group");
    let db = state.join("events.db");
    assert_eq!(mode(&db), 0o640, "events.db");
    assert_eq!(gid(&db), 1, "events.db group");
    for side in ["events.db-wal", "events.db-shm"] {
        let p = state.join(side);
        if p.exists() {
            assert_eq!(mode(&p), 0o640, "{side}");
        }
    }
    assert_eq!(mode(&state.join("egret.pid")), 0o644, "pid file");
    let db_s = db.to_string_lossy().into_owned();
    let read = as_user(&ns, Some(65534), "cat", &[&db_s])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("cat");
    assert!(!read.success(), "nobody read events.db");
    let list = as_user(&ns, Some(65534), "ls", &[&state_s])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("ls");
    assert!(!list.success(), "nobody listed the state dir");
    let _ = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status();
    let _ = child.0.wait();
    let _ = std::io::stderr().flush();
}

/// `apply --confirm` under umask 000 into a new `--state-dir`: the dir is
/// 0750 and the pending file (the previous ruleset) root's alone.
#[test]
fn apply_confirm_files_keep_their_modes_under_a_hostile_umask() {
    let ns = Netns::new();
    let policy = PolicyFile::new("mode = \"enforce\"\n");
    let state = policy.dir.path().join("custom/state");
    let state_s = state.to_string_lossy().into_owned();
    let netns = format!("--net=/run/netns/{}", ns.name);
    run_ok(Command::new("sh").args([
        "-c",
        "umask 000 && exec \"$@\"",
        "sh",
        "nsenter",
        &netns,
        "--",
        egret_bin(),
        "apply",
        policy.path(),
        "--confirm",
        "600",
        "--state-dir",
        &state_s,
    ]));
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("stat").mode() & 0o7777;
    let pending = state.join("pending-confirm.json");
    let modes = (mode(&state), mode(&pending));
    // Confirm before asserting, so the watcher never outlives the test.
    ns.egret_ok(&["confirm", "--state-dir", &state_s]);
    assert_eq!(modes, (0o750, 0o600), "state dir, pending file");
}
