//! The DNS guard end to end: a real upstream (dnsmasq) in one namespace, egret
//! and real clients (dig, Python sockets) in another, the kernel's sets read
//! back with `nft` as the independent witness.

mod common;

use std::io::BufRead;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// Addresses in `b` beyond B4/B6: what the test names resolve to.
const ALLOWED4: &str = "10.1.0.10";
const ALLOWED6: &str = "2001:db8:1::10";
const OTHER4: &str = "10.1.0.11";
const EDGE4: &str = "10.1.0.12";
const IDN4: &str = "10.1.0.13";
const PORT: u16 = 8080;

struct Lab {
    pair: Pair,
    _upstream: Spawned,
    _servers: Vec<Server>,
}

fn lab() -> Lab {
    let pair = Pair::new();
    add_addresses(
        &pair.b,
        &[
            &format!("{ALLOWED4}/24"),
            &format!("{OTHER4}/24"),
            &format!("{EDGE4}/24"),
            &format!("{IDN4}/24"),
            &format!("{ALLOWED6}/64"),
        ],
    );
    let records = [
        "--local-ttl=2".to_string(),
        format!("--host-record=allowed.test,{ALLOWED4},{ALLOWED6}"),
        format!("--host-record=other.test,{OTHER4}"),
        format!("--host-record=edge.cdn.test,{EDGE4}"),
        "--cname=alias.allowed.test,edge.cdn.test".to_string(),
        format!("--host-record=xn--bcher-kva.test,{IDN4}"),
        "--host-record=many.allowed.test,10.1.0.21".to_string(),
        "--host-record=many.allowed.test,10.1.0.22".to_string(),
        "--host-record=many.allowed.test,10.1.0.23".to_string(),
        format!("--host-record=twin.test,{ALLOWED4}"),
    ];
    let upstream = dnsmasq(&pair.b, &[B4, B6], &records);
    // Wait until dnsmasq answers (no firewall in b).
    let deadline = Instant::now() + Duration::from_secs(10);
    while dig(&pair.b, &[&format!("@{B4}"), "+short", "allowed.test"]).trim() != ALLOWED4 {
        assert!(Instant::now() < deadline, "dnsmasq did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let servers = [ALLOWED4, OTHER4, EDGE4, IDN4, ALLOWED6]
        .iter()
        .map(|h| pair.b.server("tcp", h, PORT))
        .collect();
    Lab {
        pair,
        _upstream: upstream,
        _servers: servers,
    }
}

fn dig(ns: &Netns, args: &[&str]) -> String {
    // One try, so a refused or dropped query shows; its wait stretches on
    // emulated kernels (EGRET_TEST_TIME_SCALE), where 2 s is not enough.
    let time = format!("+time={}", 2 * time_scale());
    let mut a = vec!["+tries=1", time.as_str(), "+noidnin", "+noidnout"];
    a.extend_from_slice(args);
    String::from_utf8_lossy(&ns.cmd("dig", &a).output().expect("dig").stdout).into_owned()
}

/// `dig +short @127.0.0.1 NAME [TYPE]` through the guard.
fn resolve(ns: &Netns, name: &str, qtype: &str) -> String {
    dig(ns, &["@127.0.0.1", "+short", name, qtype])
}

fn status_of(ns: &Netns, name: &str) -> String {
    let out = dig(ns, &["@127.0.0.1", name]);
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("(no answer)")
        .to_string()
}

const POLICY: &str = r#"
mode = "enforce"

[dns]
listen = "127.0.0.1:53"
upstream = ["10.1.0.2"]
ttl_floor = "0s"
grace = "2s"

[[allow]]
name = "web"
hosts = ["allowed.test", "*.allowed.test", "bücher.test"]
ports = [8080]
"#;

fn set_text(ns: &Netns, set: &str) -> String {
    String::from_utf8_lossy(
        &run_ok(&mut ns.cmd("nft", &["list", "set", "inet", "egret", set])).stdout,
    )
    .into_owned()
}

#[test]
fn allowed_names_open_their_addresses_and_nothing_else() {
    let lab = lab();
    let a = &lab.pair.a;
    // Grace 2 s, stretched on emulated kernels, where the steps below take
    // longer than an element's life.
    let grace = 2 * time_scale();
    let policy =
        PolicyFile::new(&POLICY.replace("grace = \"2s\"", &format!("grace = \"{grace}s\"")));
    let run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);

    // Nothing resolved yet: even the allowed name's address is closed.
    assert!(!a.tcp_ok(None, ALLOWED4, PORT));

    assert_eq!(resolve(a, "allowed.test", "A").trim(), ALLOWED4);
    let v4 = set_text(a, "h_web_v4");
    assert!(
        v4.contains(&format!("{ALLOWED4} timeout {}s", 2 + grace)),
        "{v4}"
    );
    assert!(
        a.tcp_ok(None, ALLOWED4, PORT),
        "resolved through the guard, then allowed"
    );

    // AAAA, and case does not matter.
    assert_eq!(resolve(a, "ALLOWED.Test.", "AAAA").trim(), ALLOWED6);
    assert!(a.tcp_ok(None, ALLOWED6, PORT));

    // An allowed name that is an alias: the CNAME target's address is opened.
    let alias = resolve(a, "alias.allowed.test", "A");
    assert!(
        alias.contains("edge.cdn.test.") && alias.contains(EDGE4),
        "{alias}"
    );
    assert!(a.tcp_ok(None, EDGE4, PORT));

    // An internationalised pattern matches the punycode name on the wire.
    assert_eq!(resolve(a, "XN--BCHER-KVA.test", "A").trim(), IDN4);
    assert!(a.tcp_ok(None, IDN4, PORT));

    // A name no rule allows is refused, and its address stays closed.
    assert_eq!(status_of(a, "other.test"), "REFUSED");
    assert!(!a.tcp_ok(None, OTHER4, PORT));
    assert!(!set_text(a, "h_web_v4").contains(OTHER4));

    // The allowed name's address on a port the rule does not name: blocked,
    // and the event says which host that address was for. The name is shown
    // while the kernel holds the address (TTL + grace), so it is asked again
    // first: the steps above may take longer than that on a loaded machine.
    assert_eq!(resolve(a, "allowed.test", "A").trim(), ALLOWED4);
    assert!(!a.tcp_ok(None, ALLOWED4, 9090));
    let e = run.wait_event(10, "blocked 10.1.0.10:9090", |e| {
        at(e, "/destination/port") == 9090 && at(e, "/event/action") == "blocked"
    });
    assert_eq!(at(&e, "/destination/domain"), "allowed.test", "{e:#}");
    assert_eq!(
        at(&e, "/egret/dns/asked_by/process/executable"),
        "/usr/bin/dig",
        "{e:#}"
    );
    drop(run);
}

#[test]
fn refused_names_and_dns_around_the_guard_are_reported_with_the_process() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = PolicyFile::new(POLICY);
    let run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);

    // A Log4Shell-style DNS callback: a name no rule allows.
    for _ in 0..3 {
        assert_eq!(status_of(a, "x1y2z3.callback.other.test"), "REFUSED");
    }
    let e = run.wait_event(10, "dns-refused", |e| {
        at(e, "/event/action") == "dns-refused"
    });
    assert_eq!(at(&e, "/dns/question/name"), "x1y2z3.callback.other.test");
    assert_eq!(at(&e, "/dns/question/type"), "A");
    assert_eq!(at(&e, "/process/executable"), "/usr/bin/dig", "{e:#}");
    assert_eq!(at(&e, "/user/name"), "root");
    assert_eq!(at(&e, "/rule/name"), "dns-guard");
    assert_eq!(at(&e, "/egret/attribution"), "sock_diag+proc");
    // Deduplicated like other incidents: one incident whose count grows.
    let update = run.wait_event(10, "dns-refused update", |e| {
        at(e, "/event/action") == "dns-refused" && at(e, "/egret/count") == 3
    });
    assert_eq!(at(&update, "/event/id"), at(&e, "/event/id"));

    // DNS straight to the upstream, UDP and TCP, bypassing the guard: blocked and logged.
    assert!(!dig(a, &[&format!("@{B4}"), "+short", "allowed.test"]).contains(ALLOWED4));
    assert!(!dig(a, &[&format!("@{B4}"), "+tcp", "+short", "allowed.test"]).contains(ALLOWED4));
    let bypass = run.wait_event(10, "dns-bypass", |e| {
        at(e, "/rule/name") == "dns-bypass" && at(e, "/network/transport") == "tcp"
    });
    assert_eq!(at(&bypass, "/destination/port"), 53);
    assert_eq!(at(&bypass, "/process/name"), "dig");
    run.wait_event(10, "dns-bypass over udp", |e| {
        at(e, "/rule/name") == "dns-bypass" && at(e, "/network/transport") == "udp"
    });

    // The guard itself answers over TCP too.
    let tcp = dig(a, &["@127.0.0.1", "+tcp", "+short", "allowed.test"]);
    assert_eq!(tcp.trim(), ALLOWED4);
    drop(run);
    let events = String::from_utf8_lossy(
        &run_ok(&mut a.egret(&["events", "--state-dir", &policy.state_dir()])).stdout,
    )
    .into_owned();
    assert!(events.contains("dns-refused"), "{events}");
    assert!(events.contains("x1y2z3.callback.other.test"), "{events}");
}

#[test]
fn elements_expire_after_ttl_plus_grace_but_connections_and_restarts_keep_working() {
    let lab = lab();
    let a = &lab.pair.a;
    // Without revalidation, which would let a client that kept the address
    // through again (tested below).
    let no_revalidation = POLICY.replace("grace = \"2s\"", "grace = \"2s\"\nrevalidate = false");
    let policy = PolicyFile::new(&no_revalidation);
    let run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);

    assert_eq!(resolve(a, "allowed.test", "A").trim(), ALLOWED4);
    let held = Held::connect(a, ALLOWED4, PORT);
    // TTL 2 s + grace 2 s: the element goes away on its own.
    let deadline = Instant::now() + Duration::from_secs(15);
    while set_text(a, "h_web_v4").contains(ALLOWED4) {
        assert!(Instant::now() < deadline, "the element did not expire");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !a.tcp_ok(None, ALLOWED4, PORT),
        "expired: new connections are blocked"
    );
    assert!(
        held.round_trip(),
        "an established connection outlives its element"
    );

    // Resolved again, then SIGHUP (a reload) and a restart of the daemon: the
    // element survives both with its remaining time (fail closed, not reset).
    let long = no_revalidation.replace("grace = \"2s\"", "grace = \"10m\"");
    policy.rewrite(&long);
    let reloads = run.reloads();
    run.signal("HUP");
    run.wait_reloaded(reloads);
    assert_eq!(resolve(a, "allowed.test", "A").trim(), ALLOWED4);
    assert!(set_text(a, "h_web_v4").contains(&format!("{ALLOWED4} timeout 10m2s")));
    run.signal("HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        set_text(a, "h_web_v4").contains(ALLOWED4),
        "kept across a reload"
    );
    run.stop();
    assert!(
        set_text(a, "h_web_v4").contains(ALLOWED4),
        "kept while egret is down"
    );
    assert!(a.tcp_ok(None, ALLOWED4, PORT), "and still allowed");
    let again = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);
    let text = set_text(a, "h_web_v4");
    assert!(text.contains(ALLOWED4), "kept across a restart: {text}");
    assert!(
        text.contains("expires 9m") || text.contains("expires 10m"),
        "{text}"
    );
    assert!(a.tcp_ok(None, ALLOWED4, PORT));
    drop(again);
}

/// A name resolved again before its element expires must give the element
/// its new, longer life. Re-adding an element replaces its timeout on 6.18 but
/// not on 6.1 or 5.10, where the element would vanish at its first expiry while
/// the guard believed it extended (scripts/kernel-matrix.sh runs this there).
#[test]
fn a_name_resolved_again_gets_its_new_lifetime_in_the_kernel() {
    let lab = lab();
    let a = &lab.pair.a;
    let grace = |g: &str| {
        POLICY.replace(
            "grace = \"2s\"",
            &format!("grace = \"{g}\"\nrevalidate = false"),
        )
    };
    // TTL 2 s + a grace long enough to outlive the reload below, even emulated
    // (at most 10 min), then a grace of an hour.
    let policy = PolicyFile::new(&grace(&format!("{}s", 60 * time_scale())));
    let run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);
    assert_eq!(resolve(a, "allowed.test", "A").trim(), ALLOWED4);
    let first = set_text(a, "h_web_v4");
    assert!(first.contains(ALLOWED4), "{first}");
    assert!(!first.contains("timeout 1h2s"), "{first}");

    policy.rewrite(&grace("1h"));
    let reloads = run.reloads();
    run.signal("HUP");
    run.wait_reloaded(reloads);
    // The guard's cache holds the answer 2 s: wait it out so the name is
    // resolved again and its addresses written again.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(resolve(a, "allowed.test", "A").trim(), ALLOWED4);
    let text = set_text(a, "h_web_v4");
    assert!(
        text.contains(&format!("{ALLOWED4} timeout 1h2s expires 1h"))
            || text.contains(&format!("{ALLOWED4} timeout 1h2s expires 59m")),
        "the element keeps its old life: {text}"
    );
    assert!(a.tcp_ok(None, ALLOWED4, PORT));
    drop(run);
}

#[test]
fn audit_mode_forwards_every_name_and_reports_those_no_rule_allows() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = PolicyFile::new(&POLICY.replace("mode = \"enforce\"", "mode = \"audit\""));
    let run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);
    assert_eq!(resolve(a, "other.test", "A").trim(), OTHER4);
    let e = run.wait_event(10, "dns-would-refuse", |e| {
        at(e, "/event/action") == "dns-would-refuse"
    });
    assert_eq!(at(&e, "/dns/question/name"), "other.test");
    // The would-block event for the address names the host it came from.
    assert!(a.tcp_ok(None, OTHER4, PORT));
    let w = run.wait_event(10, "would-block 10.1.0.11", |e| {
        at(e, "/event/action") == "would-block" && at(e, "/destination/ip") == OTHER4
    });
    assert_eq!(at(&w, "/destination/domain"), "other.test", "{w:#}");
    drop(run);
}

#[test]
fn a_busy_port_fails_the_start_before_the_ruleset_changes() {
    let ns = Netns::new();
    let _squatter = ns.server("udp", "127.0.0.1", 53);
    let policy = PolicyFile::new(&POLICY.replace("10.1.0.2", "192.0.2.53"));
    let out = ns
        .egret_run(&policy)
        .stdout(Stdio::null())
        .output()
        .expect("egret run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DNS guard: binding UDP 127.0.0.1:53"), "{err}");
    assert!(!ns.nft_ruleset().contains("egret"), "nothing was loaded");
}

#[test]
fn intercept_answers_dns_sent_to_any_resolver_from_the_guard() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy =
        PolicyFile::new(&POLICY.replace("grace = \"2s\"", "grace = \"2s\"\nintercept = true"));
    let run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);
    // Sent straight to the upstream's address: the guard answers, so the
    // address lands in the rule's set and the connection is allowed.
    let direct = dig(a, &[&format!("@{B4}"), "+short", "allowed.test"]);
    assert_eq!(direct.trim(), ALLOWED4, "{direct}\n{}", run.stderr_text());
    assert!(set_text(a, "h_web_v4").contains(ALLOWED4));
    assert!(a.tcp_ok(None, ALLOWED4, PORT));
    let tcp = dig(
        a,
        &[&format!("@{B4}"), "+tcp", "+short", "alias.allowed.test"],
    );
    assert!(tcp.contains(EDGE4), "{tcp}");
    // A name no rule allows, sent to any address: refused by the guard, reported.
    let refused = dig(a, &["@10.1.0.99", "other.test"]);
    assert!(refused.contains("status: REFUSED"), "{refused}");
    let e = run.wait_event(10, "dns-refused", |e| {
        at(e, "/event/action") == "dns-refused"
    });
    assert_eq!(at(&e, "/dns/question/name"), "other.test");
    // DNS-over-TLS is not redirected: still blocked and logged.
    assert!(!a.tcp_ok(None, B4, 853));
    run.wait_event(10, "dns-bypass 853", |e| {
        at(e, "/rule/name") == "dns-bypass" && at(e, "/destination/port") == 853
    });
    drop(run);
}

#[test]
fn one_name_many_addresses_and_one_address_many_names_and_rules() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = PolicyFile::new(&format!(
        "{POLICY}\n[[allow]]\nname = \"api\"\nhosts = [\"twin.test\"]\nports = [9443]\n"
    ));
    let run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);
    let many = resolve(a, "many.allowed.test", "A");
    let web = set_text(a, "h_web_v4");
    for ip in ["10.1.0.21", "10.1.0.22", "10.1.0.23"] {
        assert!(many.contains(ip), "{many}");
        assert!(web.contains(ip), "every address of the answer: {web}");
    }
    // twin.test shares allowed.test's address but belongs to another rule:
    // the address goes into that rule's set only, for that rule's port only.
    assert_eq!(resolve(a, "twin.test", "A").trim(), ALLOWED4);
    assert!(set_text(a, "h_api_v4").contains(ALLOWED4));
    assert!(
        !set_text(a, "h_web_v4").contains(ALLOWED4),
        "allowed.test was not asked for"
    );
    assert!(
        !a.tcp_ok(None, ALLOWED4, PORT),
        "rule web's port is not open for api's name"
    );
    assert_eq!(resolve(a, "allowed.test", "A").trim(), ALLOWED4);
    assert!(set_text(a, "h_web_v4").contains(ALLOWED4));
    assert!(a.tcp_ok(None, ALLOWED4, PORT));
    drop(run);
}

#[test]
fn ordinary_users_cannot_borrow_the_guards_mark() {
    // The exemption for the guard's upstream queries is a firewall mark;
    // setting one needs CAP_NET_ADMIN, so an unprivileged process cannot.
    let ns = Netns::new();
    let out = ns.as_nobody("/usr/bin/python3", &["-c", "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x65677274)"])
        .output()
        .expect("python3");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"));
}

/// Connects to host:port by address (no name lookup), with a timeout long
/// enough for one SYN retransmission; exit 0 when an echo round trip works.
fn dial(ns: &Netns, host: &str, port: u16) -> bool {
    let timeout = (5 * time_scale()).to_string();
    let script = "import socket,sys\n\
        s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=float(sys.argv[3]))\n\
        s.sendall(b'ping\\n'); sys.exit(0 if s.recv(5)==b'ping\\n' else 1)\n";
    ns.cmd(
        "python3",
        &["-c", script, host, &port.to_string(), timeout.as_str()],
    )
    .stderr(Stdio::null())
    .status()
    .expect("python3")
    .success()
}

fn wait_expired(ns: &Netns, set: &str, address: &str) {
    let deadline = Instant::now() + Duration::from_secs(15 * time_scale());
    while set_text(ns, set).contains(address) {
        assert!(Instant::now() < deadline, "the element did not expire");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn action_for<'a>(e: &'a serde_json::Value, address: &str) -> Option<&'a str> {
    (e.pointer("/destination/ip").and_then(|v| v.as_str()) == Some(address))
        .then(|| e.pointer("/event/action").and_then(|v| v.as_str()))
        .flatten()
}

#[test]
fn an_address_kept_past_its_time_is_revalidated_while_the_name_still_has_it() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = PolicyFile::new(POLICY);
    let run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);

    assert_eq!(resolve(a, "allowed.test", "A").trim(), ALLOWED4);
    wait_expired(a, "h_web_v4", ALLOWED4);
    // The program kept the address: its first SYN is blocked, the guard asks
    // again, the retransmission passes.
    assert!(dial(a, ALLOWED4, PORT), "revalidated: the connection works");
    let e = run.wait_event(10, "dns-revalidated", |e| {
        action_for(e, ALLOWED4) == Some("dns-revalidated")
    });
    assert_eq!(at(&e, "/destination/domain"), "allowed.test");
    assert_eq!(at(&e, "/rule/name"), "web");
    assert_eq!(at(&e, "/event/kind"), "event");
    assert_eq!(at(&e, "/egret/revalidation/outcome"), "revalidated");
    assert!(
        set_text(a, "h_web_v4").contains(ALLOWED4),
        "back in the set"
    );

    // Not on a port the rule does not allow, and never for an address the
    // guard did not resolve: those are blocked and reported as before.
    assert!(!dial(a, ALLOWED4, PORT + 1));
    assert!(!dial(a, OTHER4, PORT));
    run.wait_event(10, "blocked, not revalidated", |e| {
        action_for(e, OTHER4) == Some("blocked")
    });
    run.wait_event(10, "blocked on the other port", |e| {
        action_for(e, ALLOWED4) == Some("blocked")
            && e.pointer("/destination/port").and_then(|v| v.as_u64()) == Some(u64::from(PORT + 1))
    });
    assert!(!set_text(a, "h_web_v4").contains(OTHER4));
    let revalidated = run
        .snapshot()
        .iter()
        .filter(|e| e.pointer("/event/action").and_then(|v| v.as_str()) == Some("dns-revalidated"))
        .count();
    assert_eq!(revalidated, 1, "{:#?}", run.snapshot());
    // The books say so too (written every second).
    let deadline = Instant::now() + Duration::from_secs(10 * time_scale());
    loop {
        let status = a.egret_ok(&["status", "--state-dir", &policy.state_dir(), "--json"]);
        let doc: serde_json::Value = serde_json::from_str(&status).expect("status --json");
        let counts = doc.pointer("/monitor/dns_guard/revalidation").cloned();
        if counts.as_ref().and_then(|c| c["revalidated"].as_u64()) == Some(1) {
            assert_eq!(counts.unwrap()["lookups"], 1, "one upstream lookup");
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A namespace pair whose upstream (dnsmasq in `b`) answers from a hosts
/// file the test can rewrite (dnsmasq rereads it on SIGHUP), TTL 2 s.
struct MovingName {
    pair: Pair,
    upstream: Spawned,
    hosts: std::path::PathBuf,
    dir: tempfile::TempDir,
}

impl MovingName {
    fn new(addresses: &[&str], first: &str) -> MovingName {
        let pair = Pair::new();
        let cidrs: Vec<String> = addresses.iter().map(|a| format!("{a}/24")).collect();
        add_addresses(
            &pair.b,
            &cidrs.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
        );
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, format!("{first} allowed.test\n")).unwrap();
        let upstream = dnsmasq(
            &pair.b,
            &[B4],
            &[
                "--local-ttl=2".to_string(),
                format!("--addn-hosts={}", hosts.display()),
            ],
        );
        let m = MovingName {
            pair,
            upstream,
            hosts,
            dir,
        };
        m.point_at(first);
        m
    }

    /// allowed.test → `address`, once the upstream answers so.
    fn point_at(&self, address: &str) {
        std::fs::write(&self.hosts, format!("{address} allowed.test\n")).unwrap();
        let pid = self.upstream.0.id().to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let answer = dig(&self.pair.b, &[&format!("@{B4}"), "+short", "allowed.test"]);
            if answer.trim() == address {
                return;
            }
            // Only once it answers: a SIGHUP before dnsmasq set its handler would end it.
            if !answer.trim().is_empty() {
                let _ = std::process::Command::new("kill")
                    .args(["-HUP", &pid])
                    .status();
            }
            assert!(
                Instant::now() < deadline,
                "dnsmasq does not answer {address}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `program args` in `a` with the guard as its only resolver: its own
    /// mount namespace gets a resolv.conf naming 127.0.0.1, so getaddrinfo
    /// (nginx, the JVM) asks the guard.
    fn via_guard(&self, program: &str, args: &[&str]) -> std::process::Command {
        let conf = self.dir.path().join("resolv.conf");
        std::fs::write(&conf, "nameserver 127.0.0.1\noptions attempts:1\n").unwrap();
        let mut line = format!(
            "mount --bind {} /etc/resolv.conf && exec {program}",
            conf.display()
        );
        for a in args {
            line.push_str(&format!(" '{a}'"));
        }
        self.pair.a.cmd(
            "unshare",
            &["--mount", "--propagation", "private", "sh", "-c", &line],
        )
    }
}

#[test]
fn a_stale_address_stays_blocked_and_is_reported_as_stale() {
    let lab = MovingName::new(&[ALLOWED4, OTHER4], ALLOWED4);
    let _servers = [
        lab.pair.b.server("tcp", ALLOWED4, PORT),
        lab.pair.b.server("tcp", OTHER4, PORT),
    ];
    let a = &lab.pair.a;
    let policy = PolicyFile::new(POLICY);
    let run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);

    assert_eq!(resolve(a, "allowed.test", "A").trim(), ALLOWED4);
    lab.point_at(OTHER4);
    wait_expired(a, "h_web_v4", ALLOWED4);
    assert!(!dial(a, ALLOWED4, PORT), "a stale address stays blocked");
    let e = run.wait_event(10, "blocked as stale", |e| {
        action_for(e, ALLOWED4) == Some("blocked")
    });
    assert_eq!(at(&e, "/egret/revalidation/outcome"), "stale");
    assert_eq!(at(&e, "/destination/domain"), "allowed.test");
    let sets = set_text(a, "h_web_v4");
    assert!(!sets.contains(ALLOWED4), "{sets}");
    assert!(
        !sets.contains(OTHER4),
        "nothing opened for a client that did not ask: {sets}"
    );
}

const HTTP_PORT: u16 = 8081;

#[test]
fn nginx_keeps_proxying_to_a_name_it_resolved_at_start() {
    let lab = MovingName::new(&[ALLOWED4, OTHER4], ALLOWED4);
    let _web = Spawned(
        lab.pair
            .b
            .cmd(
                "python3",
                &[
                    "-m",
                    "http.server",
                    "--bind",
                    ALLOWED4,
                    &HTTP_PORT.to_string(),
                ],
            )
            .current_dir(lab.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m http.server"),
    );
    let a = &lab.pair.a;
    let policy = PolicyFile::new(&POLICY.replace("ports = [8080]", "ports = [8080, 8081]"));
    let run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);

    let dir = lab.dir.path().display().to_string();
    let conf = format!(
        "daemon off; master_process off; user root; pid {dir}/nginx.pid; error_log {dir}/nginx.log;\n\
         events {{}}\n\
         http {{ access_log off; client_body_temp_path {dir}; proxy_temp_path {dir};\n\
           fastcgi_temp_path {dir}; uwsgi_temp_path {dir}; scgi_temp_path {dir};\n\
           server {{ listen 127.0.0.1:8088;\n\
             location / {{ proxy_pass http://allowed.test:{HTTP_PORT}; proxy_connect_timeout {}s; }} }} }}\n",
        5 * time_scale()
    );
    let conf_path = lab.dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let conf_arg = conf_path.display().to_string();
    let _nginx = Spawned(
        lab.via_guard("nginx", &["-c", &conf_arg, "-p", &dir])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (apt-get install nginx-light)"),
    );
    let status = || {
        let out = a
            .cmd(
                "curl",
                &[
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "http://127.0.0.1:8088/",
                ],
            )
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(10 * time_scale());
    while status() != "200" {
        assert!(
            Instant::now() < deadline,
            "nginx does not proxy: {}",
            std::fs::read_to_string(lab.dir.path().join("nginx.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // nginx resolved allowed.test once, at start; the kernel forgets it.
    wait_expired(a, "h_web_v4", ALLOWED4);
    assert_eq!(status(), "200", "still proxying after the address expired");
    run.wait_event(10, "dns-revalidated", |e| {
        action_for(e, ALLOWED4) == Some("dns-revalidated")
    });
}

#[test]
fn a_jvm_that_caches_addresses_for_ever_keeps_connecting() {
    let lab = MovingName::new(&[ALLOWED4], ALLOWED4);
    let _server = lab.pair.b.server("tcp", ALLOWED4, PORT);
    let a = &lab.pair.a;
    let policy = PolicyFile::new(POLICY);
    let run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);

    let source = support_script("KeepAddress.java").display().to_string();
    let timeout = (5000 * time_scale()).to_string();
    let mut jvm = lab
        .via_guard(
            "java",
            &[&source, "allowed.test", &PORT.to_string(), &timeout],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("java (apt-get install default-jre-headless)");
    let mut input = jvm.stdin.take().unwrap();
    let mut lines = std::io::BufReader::new(jvm.stdout.take().unwrap()).lines();
    let _jvm = Spawned(jvm);
    let first = lines.next().expect("a line").unwrap();
    assert_eq!(first, format!("ok {ALLOWED4}"));
    wait_expired(a, "h_web_v4", ALLOWED4);
    use std::io::Write;
    writeln!(input, "again").unwrap();
    let second = lines.next().expect("a line").unwrap();
    assert_eq!(
        second,
        format!("ok {ALLOWED4}"),
        "the cached address still works"
    );
    run.wait_event(10, "dns-revalidated", |e| {
        action_for(e, ALLOWED4) == Some("dns-revalidated")
    });
}
