//! Adversarial tests for egret's kernel side (issue 15, findings 1, 13, 14):
//! each attack runs for real, as the unprivileged user `nobody` (65534) where
//! the attacker is unprivileged, in namespaces the test creates, and must fail.
//!
//! Run: `cargo test --test adversary_kernel`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A socket connected (UDP: `connect()` sends nothing) and parked; each line
/// on stdin tries one echo round trip on it (`reconnect`: first close it with
/// a reset, so no TIME_WAIT holds the tuple, and connect the same tuple
/// again). Options: `sport=N` binds that source port (SO_REUSEADDR and
/// SO_REUSEPORT), `listen=1` also listens on it (as a server would),
/// `mark=N` sets the socket's firewall mark (root only).
const PARKER: &str = r#"
import socket, struct, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
opts = dict(a.split("=", 1) for a in sys.argv[4:])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
sport = int(opts.get("sport", 0))
if "listen" in opts:
    l = socket.socket(fam, socket.SOCK_STREAM)
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    l.bind(("", sport))
    l.listen(1)
def connect():
    s = socket.socket(fam, socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM)
    s.settimeout(2.0)
    if "mark" in opts:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, int(opts["mark"]))
    if sport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("", sport))
    s.connect((host, port))
    return s
s = connect()
print("parked", flush=True)
for line in sys.stdin:
    try:
        if line.strip() == "reconnect":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            s = connect()
        s.send(b"ping\n")
        ok = s.recv(16) == b"ping\n"
    except OSError:
        ok = False
    print("ok" if ok else "blocked", flush=True)
"#;

struct Parked {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    what: String,
}

impl Parked {
    /// `nobody`'s socket to host:port.
    fn new(ns: &Netns, proto: &str, host: &str, port: u16) -> Parked {
        Parked::with(ns, Some(65534), proto, host, port, &[])
    }

    /// As `uid` (None: root), with PARKER's options.
    fn with(
        ns: &Netns,
        uid: Option<u32>,
        proto: &str,
        host: &str,
        port: u16,
        opts: &[&str],
    ) -> Parked {
        let port_s = port.to_string();
        let mut args = vec!["-c", PARKER, proto, host, &port_s];
        args.extend_from_slice(opts);
        let mut cmd = match uid {
            Some(65534) => ns.as_nobody("/usr/bin/python3", &args),
            None => ns.cmd("/usr/bin/python3", &args),
            Some(other) => panic!("no helper for uid {other}"),
        };
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning the parked socket");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("parker output");
        assert_eq!(line.trim(), "parked", "{proto} {host}:{port} {opts:?}");
        Parked {
            child,
            stdin,
            stdout,
            what: format!("{proto} {host}:{port} {opts:?}"),
        }
    }

    /// True when an echo round trip on the parked socket works.
    fn round_trip(&mut self) -> bool {
        self.command("go")
    }

    /// Closes the connection with a reset, opens the same tuple again: true
    /// when that new connection and an echo round trip on it work.
    fn reconnect(&mut self) -> bool {
        self.command("reconnect")
    }

    fn command(&mut self, what: &str) -> bool {
        self.stdin
            .write_all(format!("{what}\n").as_bytes())
            .expect("parker stdin");
        self.stdin.flush().expect("parker stdin");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("parker answer");
        line.trim() == "ok"
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_stderr(run: &Running, needle: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(30 * time_scale());
    while run.stderr_text().matches(needle).count() < count {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} (x{count}) in egret run's stderr:\n{}",
            run.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The elements of egret's pre-existing-connection sets, from `nft` (an
/// independent witness), one family per line.
fn seeded(ns: &Netns) -> String {
    let mut out = String::new();
    for set in ["preexisting_v4", "preexisting_v6"] {
        let o = run_ok(&mut ns.cmd("nft", &["list", "set", "inet", "egret", set]));
        let text = String::from_utf8_lossy(&o.stdout);
        if let Some(i) = text.find("elements = {") {
            out.push_str(&text[i..]);
        }
    }
    out
}

const ENFORCE: &str = "mode = \"enforce\"\n";

fn assert_all_blocked(parked: &mut [Parked], when: &str, ns: &Netns) {
    for p in parked.iter_mut() {
        assert!(
            !p.round_trip(),
            "{when}: the parked {} socket of nobody became an allowed flow; seeded: {}",
            p.what,
            seeded(ns)
        );
    }
    let s = seeded(ns);
    assert!(!s.contains("udp"), "{when}: UDP seeded: {s}");
}

// Finding 1: a connected UDP socket sends nothing, so seeding it let any
// user pick a destination (DNS around the guard included) that the next
// reload, restart or apply opened for good.
#[test]
fn parked_udp_sockets_never_become_allowed_flows() {
    let pair = Pair::new();
    let _servers: Vec<Server> = [B4, B6]
        .iter()
        .flat_map(|h| [53u16, 9999].map(|port| pair.b.server("udp", h, port)))
        .collect();
    let mut parked = Vec::new();
    let park_all = |parked: &mut Vec<Parked>| {
        for host in [B4, B6] {
            for port in [53, 9999] {
                parked.push(Parked::new(&pair.a, "udp", host, port));
            }
        }
    };
    // Parked before egret's first ruleset...
    park_all(&mut parked);
    let policy = PolicyFile::new(ENFORCE);
    let state = policy.state_dir();
    let run = Running::start(&pair.a, &state, &["--policy", policy.path()]);
    assert_all_blocked(&mut parked, "first load", &pair.a);

    // ...and while it is loaded, then a reload.
    park_all(&mut parked);
    run_ok(&mut pair.a.egret(&["reload", "--state-dir", &state]));
    run.wait_reloaded(0);
    assert_all_blocked(&mut parked, "reload", &pair.a);

    // A restart of `egret run`.
    park_all(&mut parked);
    drop(run);
    let run = Running::start(&pair.a, &state, &["--policy", policy.path()]);
    assert_all_blocked(&mut parked, "restart", &pair.a);
    drop(run);

    // `egret apply`.
    park_all(&mut parked);
    pair.a
        .egret_ok(&["apply", policy.path(), "--state-dir", &state]);
    assert_all_blocked(&mut parked, "apply", &pair.a);
}

// Finding 1, TCP: only what egret's first ruleset needs is seeded (TCP
// that conntrack has not seen), it is reported when the policy would not
// allow it, and nothing is seeded once the table is loaded.
#[test]
fn only_tcp_that_predates_egret_is_seeded_and_it_is_reported() {
    let pair = Pair::new();
    let _servers: Vec<Server> = [B4, B6]
        .iter()
        .flat_map(|h| [7000u16, 7001].map(|port| pair.b.server("tcp", h, port)))
        .collect();
    // nobody's connections that predate egret: let through (they must not
    // stall), and reported, since this policy allows neither.
    let mut before: Vec<Parked> = [B4, B6]
        .iter()
        .map(|h| Parked::new(&pair.a, "tcp", h, 7000))
        .collect();
    let policy = PolicyFile::new(&format!(
        "{ENFORCE}[[allow]]\nname = \"later\"\nusers = [\"nobody\"]\ncidrs = [\"{B4}/32\", \"{B6}/128\"]\nports = [7001]\nprotocol = \"tcp\"\n"
    ));
    let state = policy.state_dir();
    let run = Running::start(&pair.a, &state, &["--policy", policy.path()]);
    for host in [B4, B6] {
        let e = run.wait_event(10, "preexisting", |e| {
            at(e, "/event/action") == "preexisting" && at(e, "/destination/ip") == host
        });
        assert_eq!(at(&e, "/destination/port"), 7000, "{e:#}");
        assert_eq!(at(&e, "/user/id"), "65534", "{e:#}");
        assert_eq!(at(&e, "/network/transport"), "tcp", "{e:#}");
        assert_eq!(at(&e, "/event/kind"), "alert", "{e:#}");
        assert_eq!(at(&e, "/egret/rule"), "default", "{e:#}");
    }
    for p in &mut before {
        assert!(p.round_trip(), "{} stalled", p.what);
    }
    // Allowed while it ran: nobody's connections to 7001.
    let mut during: Vec<Parked> = [B4, B6]
        .iter()
        .map(|h| Parked::new(&pair.a, "tcp", h, 7001))
        .collect();
    for p in &mut during {
        assert!(p.round_trip(), "{}", p.what);
    }
    // The rule goes; a reload, a restart and an apply must not seed the
    // connections opened while egret's table was loaded (conntrack knows
    // them); what the first load seeded stays while it is open.
    policy.rewrite(ENFORCE);
    let only_first = |when: &str| {
        let s = seeded(&pair.a);
        assert!(!s.contains("7001"), "{when} seeded a later connection: {s}");
        assert_eq!(s.matches(". 7000").count(), 2, "{when}: {s}");
    };
    only_first("first load");
    run_ok(&mut pair.a.egret(&["reload", "--state-dir", &state]));
    run.wait_reloaded(0);
    only_first("reload");
    drop(run);
    let run = Running::start(&pair.a, &state, &["--policy", policy.path()]);
    only_first("restart");
    assert!(
        !run.snapshot()
            .iter()
            .any(|e| at(e, "/event/action") == "preexisting"),
        "nothing predates a loaded table"
    );
    drop(run);
    let out = pair
        .a
        .egret_out(&["apply", policy.path(), "--state-dir", &state]);
    assert!(out.status.success());
    only_first("apply");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("predates"));
    // Established connections still work (conntrack).
    for p in before.iter_mut().chain(during.iter_mut()) {
        assert!(p.round_trip(), "{} stalled", p.what);
    }

    // `egret apply` as the first load warns about what it let through.
    pair.a.egret_ok(&["remove", "--state-dir", &state]);
    let out = pair
        .a
        .egret_out(&["apply", policy.path(), "--state-dir", &state]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for host in [B4, B6] {
        let port = if host.contains(':') {
            format!("[{host}]:7000")
        } else {
            format!("{host}:7000")
        };
        assert!(
            stderr.contains(&port) && stderr.contains("uid 65534"),
            "{stderr}"
        );
    }
    // Closed, they are not seeded again.
    drop(before);
    drop(during);
    pair.a
        .egret_ok(&["apply", policy.path(), "--state-dir", &state]);
    let s = seeded(&pair.a);
    assert!(!s.contains("7000") && !s.contains("7001"), "{s}");
}

// Finding 13: policy files others may write.
#[test]
fn policy_files_others_may_write_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let chmod = |p: &std::path::Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    let ns = Netns::new();
    let policy = PolicyFile::new(&format!("{ENFORCE}include = [\"policy.d/*.toml\"]\n"));
    let state = policy.state_dir();
    let dropins = policy.dir.path().join("policy.d");
    std::fs::create_dir(&dropins).unwrap();
    chmod(&dropins, 0o755);
    let run = Running::start(&ns, &state, &["--policy", policy.path()]);

    // A world-writable policy: nobody adds a rule that allows everything.
    chmod(&policy.path, 0o666);
    chmod(policy.dir.path(), 0o755);
    run_ok(&mut ns.as_nobody(
        "/bin/sh",
        &[
            "-c",
            &format!(
                "printf '[[allow]]\\nname = \"evil\"\\ncidrs = [\"0.0.0.0/0\"]\\n' >> {}",
                policy.path()
            ),
        ],
    ));
    run_ok(&mut ns.egret(&["reload", "--state-dir", &state]));
    wait_stderr(&run, "refusing an unsafe policy file", 1);
    let stderr = run.stderr_text();
    assert!(
        stderr.contains(policy.path()) && stderr.contains("chmod go-w"),
        "{stderr}"
    );
    assert!(!ns.nft_ruleset().contains("evil"), "the reload was refused");
    for args in [
        vec!["apply", policy.path(), "--state-dir", "/nonexistent"],
        vec![
            "run",
            "--policy",
            policy.path(),
            "--state-dir",
            "/nonexistent",
        ],
    ] {
        let out = ns.egret_out(&args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(policy.path()) && err.contains("chmod go-w"),
            "{args:?}: {err}"
        );
    }
    assert!(!ns.nft_ruleset().contains("evil"));
    // `check` warns only.
    let out = ns.egret_out(&["check", policy.path()]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod go-w"));
    drop(run);
    ns.egret_ok(&["remove", "--state-dir", &state]);

    // A drop-in nobody owns (and so may rewrite at will).
    let policy = PolicyFile::new(&format!("{ENFORCE}include = [\"policy.d/*.toml\"]\n"));
    let dropins = policy.dir.path().join("policy.d");
    std::fs::create_dir(&dropins).unwrap();
    chmod(&dropins, 0o755);
    let file = dropins.join("a.toml");
    std::fs::write(&file, "").unwrap();
    std::os::unix::fs::chown(&file, Some(65534), Some(65534)).unwrap();
    let out = ns.egret_out(&["apply", policy.path(), "--state-dir", "/nonexistent"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(file.to_str().unwrap()) && err.contains("chown root"),
        "{err}"
    );
    // A drop-in directory anyone may write (sticky or not): nobody adds a file.
    std::os::unix::fs::chown(&file, Some(0), Some(0)).unwrap();
    chmod(&dropins, 0o1777);
    let out = ns.egret_out(&["apply", policy.path(), "--state-dir", "/nonexistent"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(dropins.to_str().unwrap()));
    // The containing directory writable by others, without the sticky bit.
    chmod(&dropins, 0o755);
    chmod(policy.dir.path(), 0o777);
    let out = ns.egret_out(&["apply", policy.path(), "--state-dir", "/nonexistent"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod go-w"));
    assert!(!ns.nft_ruleset().contains("table inet egret"));
    // Fixed as the message says: accepted.
    chmod(policy.dir.path(), 0o700);
    ns.egret_ok(&["apply", policy.path(), "--state-dir", "/nonexistent"]);
}

fn tampers(run: &Running) -> Vec<serde_json::Value> {
    run.snapshot()
        .into_iter()
        .filter(|e| at(e, "/event/action") == "tamper")
        .collect()
}

fn changes_mention(e: &serde_json::Value, what: &str) -> bool {
    at(e, "/egret/changes").as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c.as_str().is_some_and(|c| c.contains(what)))
    })
}

// Finding 14: what an attacker with root would actually do to egret's table.
#[test]
fn foreign_changes_to_the_table_are_reported_with_their_committer_and_undone() {
    let pair = Pair::new();
    let _server = pair.b.server("tcp", B4, 7100);
    let allow =
        "[[allow]]\nname = \"web\"\ncidrs = [\"10.1.0.98/32\", \"10.1.0.99/32\"]\nports = [7100]\n";
    let policy = PolicyFile::new(&format!("{ENFORCE}restore_table = true\n{allow}"));
    let run = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    assert!(
        pair.a.nft_ruleset().contains("a_web_v4"),
        "{}",
        pair.a.nft_ruleset()
    );
    assert!(!pair.a.tcp_ok(Some(65534), B4, 7100));

    // A new address in a static allow set.
    nft_add_element(&pair.a, "a_web_v4", &format!("{{ {B4} }}"));
    let e = run.wait_event(15, "tamper: element added", |e| {
        at(e, "/event/action") == "tamper" && changes_mention(e, "a_web_v4")
    });
    assert_eq!(at(&e, "/process/name"), "nft", "{e:#}");
    assert!(at(&e, "/process/pid").is_u64(), "{e:#}");
    assert_eq!(at(&e, "/egret/restored"), true, "{e:#}");
    let set = String::from_utf8_lossy(
        &run_ok(
            &mut pair
                .a
                .cmd("nft", &["list", "set", "inet", "egret", "a_web_v4"]),
        )
        .stdout,
    )
    .into_owned();
    assert!(!set.contains(B4), "restored: {set}");
    assert!(!pair.a.tcp_ok(Some(65534), B4, 7100));

    // A rule egret does not write (and cannot decode).
    run_ok(&mut pair.a.cmd(
        "nft",
        &[
            "insert", "rule", "inet", "egret", "output", "ip", "daddr", B4, "accept",
        ],
    ));
    let before = tampers(&run).len();
    let e = run.wait_event(15, "tamper: rule added", |e| {
        at(e, "/event/action") == "tamper" && changes_mention(e, "rule added")
    });
    assert_eq!(at(&e, "/process/name"), "nft", "{e:#}");
    assert_eq!(at(&e, "/egret/restored"), true, "{e:#}");
    assert!(!pair
        .a
        .nft_ruleset()
        .contains(&format!("ip daddr {B4} accept")));
    assert!(!pair.a.tcp_ok(Some(65534), B4, 7100));
    assert!(tampers(&run).len() > before);
    drop(run);

    // Without restore_table: each change reported once, never a reason to
    // stop looking, and a later change is reported too.
    let policy = PolicyFile::new(&format!("{ENFORCE}{allow}"));
    let run = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    run_ok(&mut pair.a.cmd(
        "nft",
        &[
            "insert", "rule", "inet", "egret", "output", "ip", "daddr", B4, "accept",
        ],
    ));
    let e = run.wait_event(15, "tamper: undecodable rule", |e| {
        at(e, "/event/action") == "tamper"
    });
    assert_eq!(at(&e, "/egret/restored"), false, "{e:#}");
    assert_eq!(at(&e, "/process/name"), "nft", "{e:#}");
    std::thread::sleep(Duration::from_millis(2500 * time_scale()));
    assert_eq!(tampers(&run).len(), 1, "once: {:#?}", tampers(&run));
    run_ok(&mut pair.a.cmd(
        "nft",
        &[
            "add",
            "element",
            "inet",
            "egret",
            "a_web_v4",
            "{ 10.1.0.77 }",
        ],
    ));
    run.wait_event(15, "tamper: element added later", |e| {
        at(e, "/event/action") == "tamper" && changes_mention(e, "a_web_v4")
    });
    drop(run);
}

// Finding 14: `egret apply`/`remove` behind a running daemon's back.
#[test]
fn apply_and_remove_while_run_runs_are_refused_or_reported() {
    let ns = Netns::new();
    let policy = PolicyFile::new(&format!("{ENFORCE}restore_table = true\n"));
    let state = policy.state_dir();
    let run = Running::start(&ns, &state, &["--policy", policy.path()]);
    let pid = std::fs::read_to_string(format!("{state}/egret.pid"))
        .unwrap()
        .trim()
        .to_string();
    let other = PolicyFile::new("mode = \"audit\"\n");
    let live = ns.nft_rules_only();
    for args in [
        vec!["apply", other.path(), "--state-dir", &state],
        vec!["remove", "--state-dir", &state],
    ] {
        let out = ns.egret_out(&args);
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("pid {pid}")), "{args:?}: {err}");
        assert_eq!(ns.nft_rules_only(), live, "{args:?} changed the table");
    }
    let out = ns.egret_out(&["apply", other.path(), "--state-dir", &state]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("egret reload"));

    // From another state dir egret cannot know: the daemon sees a foreign
    // transaction, names it and puts its own policy back.
    let elsewhere = other.state_dir();
    ns.egret_ok(&["apply", other.path(), "--state-dir", &elsewhere]);
    let e = run.wait_event(15, "tamper by egret apply", |e| {
        at(e, "/event/action") == "tamper"
    });
    assert_eq!(at(&e, "/process/name"), "egret", "{e:#}");
    assert_eq!(at(&e, "/egret/restored"), true, "{e:#}");
    assert!(
        ns.nft_ruleset().contains("mode=enforce"),
        "{}",
        ns.nft_ruleset()
    );
    drop(run);
}

// Finding 14: an address slipped into a DNS guard set (run-time state egret
// writes itself) is someone else's change too, and not carried over.
#[test]
fn addresses_slipped_into_a_dns_guard_set_are_reported_and_dropped() {
    let pair = Pair::new();
    let _server = pair.b.server("tcp", B4, 7200);
    let policy = PolicyFile::new(&format!(
        "{ENFORCE}restore_table = true\n[dns]\nlisten = \"127.0.0.1:5399\"\nupstream = [\"192.0.2.53\"]\n[[allow]]\nname = \"web\"\nhosts = [\"web.test\"]\nports = [7200]\n"
    ));
    let run = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    assert!(!pair.a.tcp_ok(Some(65534), B4, 7200));
    nft_add_element(&pair.a, "h_web_v4", &format!("{{ {B4} timeout 1h }}"));
    let e = run.wait_event(15, "tamper: host set element", |e| {
        at(e, "/event/action") == "tamper" && changes_mention(e, "h_web_v4")
    });
    assert_eq!(at(&e, "/process/name"), "nft", "{e:#}");
    assert_eq!(at(&e, "/egret/restored"), true, "{e:#}");
    let set = String::from_utf8_lossy(
        &run_ok(
            &mut pair
                .a
                .cmd("nft", &["list", "set", "inet", "egret", "h_web_v4"]),
        )
        .stdout,
    )
    .into_owned();
    assert!(!set.contains(B4), "not carried over: {set}");
    assert!(!pair.a.tcp_ok(Some(65534), B4, 7200));
    drop(run);
}

// The other side of finding 1: an idle connection the first load seeded has
// not yet sent the packet that lets conntrack confirm it; a reload before it
// does must not take its seed away (it would stall).
#[test]
fn an_idle_connection_seeded_at_first_load_survives_an_early_reload() {
    let pair = Pair::new();
    let _server = pair.b.server("tcp", B4, 7300);
    let held = Held::connect(&pair.a, B4, 7300);
    let policy = PolicyFile::new(ENFORCE);
    let state = policy.state_dir();
    let run = Running::start(&pair.a, &state, &["--policy", policy.path()]);
    run_ok(&mut pair.a.egret(&["reload", "--state-dir", &state]));
    run.wait_reloaded(0);
    assert!(seeded(&pair.a).contains(". 7300"), "{}", seeded(&pair.a));
    assert!(held.round_trip(), "the idle connection stalled");
    drop(run);
}

/// `nft add element inet egret SET ELEMENTS`: a change made outside egret.
fn nft_add_element(ns: &Netns, set: &str, elements: &str) {
    run_ok(&mut ns.cmd("nft", &["add", "element", "inet", "egret", set, elements]));
}

fn blocked_to(run: &Running, host: &str, port: u16) -> serde_json::Value {
    run.wait_event(15, &format!("blocked to {host}:{port}"), |e| {
        at(e, "/event/action") == "blocked"
            && at(e, "/destination/ip") == host
            && at(e, "/destination/port") == port
    })
}

// Seeding, SYN: a seeded 5-tuple let any packet through, a fresh SYN
// included, so whoever binds the source port again after the seeded
// connection closed got a new connection through the seed. A connection
// that predates egret only ever needs packets without SYN.
#[test]
fn a_seeded_tuple_reused_for_a_new_connection_is_blocked() {
    let pair = Pair::new();
    let _servers: Vec<Server> = [B4, B6]
        .iter()
        .map(|h| pair.b.server("tcp", h, 7400))
        .collect();
    let mut parked: Vec<Parked> = [(B4, "sport=40400"), (B6, "sport=40406")]
        .iter()
        .map(|(h, sport)| Parked::with(&pair.a, Some(65534), "tcp", h, 7400, &[sport]))
        .collect();
    let policy = PolicyFile::new(ENFORCE);
    let run = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    for host in [B4, B6] {
        run.wait_event(10, "preexisting", |e| {
            at(e, "/event/action") == "preexisting" && at(e, "/destination/ip") == host
        });
    }
    let s = seeded(&pair.a);
    assert!(
        s.contains("40400") && s.contains("40406"),
        "seeded at first load: {s}"
    );
    let live = pair.a.nft_ruleset();
    assert!(
        live.contains("tcp flags ! syn meta l4proto . ip saddr"),
        "the seed rule takes no SYN: {live}"
    );
    // What egret reads back is what it wrote.
    let plan = pair.a.egret_ok(&["plan", policy.path()]);
    assert!(plan.contains("# no change"), "{plan}");
    for p in &mut parked {
        assert!(p.round_trip(), "{}: the seeded connection stalled", p.what);
    }
    // The seeded connection closes; nobody opens the same tuple again.
    for p in &mut parked {
        assert!(
            !p.reconnect(),
            "{}: a new connection went through the seed; seeded: {}",
            p.what,
            seeded(&pair.a)
        );
    }
    for host in [B4, B6] {
        blocked_to(&run, host, 7400);
    }
    drop(run);
}

// Tamper restore, seeding: the restore after root deleted the table used
// to take the missing table for a first load and seed every open TCP
// connection, the ones opened while the table was gone included. A restore
// seeds nothing new, not even a new socket on a seeded tuple.
#[test]
fn a_restore_seeds_nothing_opened_while_the_table_was_gone() {
    let pair = Pair::new();
    let _server = pair.b.server("tcp", B4, 7500);
    // Seeded at the first load (and reported).
    let mut reused = Parked::with(&pair.a, Some(65534), "tcp", B4, 7500, &["sport=40500"]);
    let policy = PolicyFile::new(&format!("{ENFORCE}restore_table = true\n"));
    let run = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    assert!(seeded(&pair.a).contains("40500"), "{}", seeded(&pair.a));
    // Held still so that the window stays open: the table is gone and
    // nobody opens connections before egret can put it back, one of them
    // on the seeded tuple.
    run.signal("STOP");
    run_ok(&mut pair.a.cmd("nft", &["delete", "table", "inet", "egret"]));
    let mut during = Parked::new(&pair.a, "tcp", B4, 7500);
    assert!(during.round_trip(), "no table, nothing blocks");
    assert!(reused.reconnect(), "no table, nothing blocks");
    run.signal("CONT");
    let e = run.wait_event(15, "tamper: deleted", |e| {
        at(e, "/event/action") == "tamper" && at(e, "/egret/tamper") == "deleted"
    });
    assert_eq!(at(&e, "/egret/restored"), true, "{e:#}");
    let s = seeded(&pair.a);
    assert!(!s.contains("7500"), "the restore seeded it: {s}");
    assert!(
        !during.round_trip(),
        "a connection opened while the table was gone is allowed after the restore"
    );
    assert!(
        !reused.round_trip(),
        "a new socket on a seeded tuple is allowed after the restore"
    );
    blocked_to(&run, B4, 7500);
    let reported = run
        .snapshot()
        .iter()
        .filter(|e| at(e, "/event/action") == "preexisting")
        .count();
    assert_eq!(reported, 1, "a restore is not a first load");
    drop(run);
}

// egret's own sockets (the firewall mark of its DNS guard, proxy and alert
// sinks) are never seeded: what they may reach the mark rules say.
#[test]
fn sockets_with_egrets_mark_are_never_seeded() {
    let pair = Pair::new();
    let _servers: Vec<Server> = [7600u16, 7601]
        .iter()
        .map(|p| pair.b.server("tcp", B4, *p))
        .collect();
    let mark = format!("mark={}", egret::policy::DEFAULT_MARK);
    let _marked = Parked::with(&pair.a, None, "tcp", B4, 7600, &[&mark]);
    let _plain = Parked::with(&pair.a, None, "tcp", B4, 7601, &[]);
    let policy = PolicyFile::new(ENFORCE);
    let out = pair
        .a
        .egret_out(&["apply", policy.path(), "--state-dir", &policy.state_dir()]);
    assert!(out.status.success());
    let s = seeded(&pair.a);
    assert!(
        s.contains(". 7601"),
        "an unmarked connection is seeded: {s}"
    );
    assert!(!s.contains(". 7600"), "egret's mark was seeded: {s}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains(":7600"), "{stderr}");
}

// The inbound guess: a connection whose local port has a listener was taken
// for a reply to an inbound connection and never reported. Any user can
// listen on a port of 1024 and above (SO_REUSEPORT lets the same user also
// connect out from it), so only a privileged port's listener counts.
#[test]
fn a_listener_on_an_unprivileged_port_does_not_hide_an_outbound_connection() {
    let pair = Pair::new();
    let _server = pair.b.server("tcp", B4, 7700);
    let _c2 = Parked::with(
        &pair.a,
        Some(65534),
        "tcp",
        B4,
        7700,
        &["sport=40700", "listen=1"],
    );
    // A real inbound connection to a privileged port (an SSH session into
    // `a`) is still a reply, not reported.
    let _sshd = pair.a.server("tcp", "0.0.0.0", 22);
    let _session = Parked::with(&pair.b, None, "tcp", A4, 22, &[]);
    let policy = PolicyFile::new(ENFORCE);
    let run = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    let e = run.wait_event(10, "preexisting with a listener", |e| {
        at(e, "/event/action") == "preexisting" && at(e, "/destination/port") == 7700
    });
    assert_eq!(at(&e, "/source/port"), 40700, "{e:#}");
    assert_eq!(at(&e, "/user/id"), "65534", "{e:#}");
    assert_eq!(at(&e, "/egret/source_port_listener"), true, "{e:#}");
    assert!(
        !run.snapshot()
            .iter()
            .any(|e| { at(e, "/event/action") == "preexisting" && at(e, "/source/port") == 22 }),
        "the reply of an inbound connection to a privileged port was reported"
    );
    drop(run);
}
