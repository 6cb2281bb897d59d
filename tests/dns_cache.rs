//! A local cache behind the guard (issue 18): programs -> guard -> cache ->
//! world, with the cache's split DNS kept. The cache is a real dnsmasq on
//! 127.0.0.2 in egret's namespace (`--conntrack`, a default server and a
//! per-domain server for `corp.test`); its upstreams are real dnsmasqs in
//! another namespace; programs resolve with glibc as `nobody`, as
//! tests/dns_stub.rs does. The guard still names the program, the cache's
//! split domain still resolves, and only the guard may ask the cache: a
//! program asking it is blocked and reported, and an upstream query the
//! cache did not make for the guard is blocked too.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::*;

const ALLOWED4: &str = "10.1.0.10";
const OTHER4: &str = "10.1.0.11";
const DB4: &str = "10.1.0.12";
/// The upstream that serves `corp.test` only (the cache's split domain).
const CORP_NS: &str = "10.1.0.3";
const PORT: u16 = 8080;
/// Where the cache listens in egret's namespace.
const CACHE: &str = "127.0.0.2";

const POLICY: &str = r#"
mode = "enforce"

[dns]
listen = "127.0.0.1:53"
upstream = ["127.0.0.2"]

[[allow]]
name = "web"
hosts = ["allowed.test", "db.corp.test", "fresh.test"]
ports = [8080]
"#;

/// A program: resolves NAME with glibc (getaddrinfo), connects to the first
/// address and echoes a line. Prints its pid first, then what happened.
const PROGRAM: &str = r#"
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

struct Lab {
    pair: Pair,
    _upstreams: Vec<Spawned>,
    _servers: Vec<Server>,
    dir: tempfile::TempDir,
}

/// The world: the default upstream on B4 (knows *.test but not corp.test),
/// the corp upstream on CORP_NS (knows db.corp.test only), and echo
/// servers on the names' addresses.
fn lab() -> Lab {
    let pair = Pair::new();
    add_addresses(
        &pair.b,
        &[
            &format!("{CORP_NS}/24"),
            &format!("{ALLOWED4}/24"),
            &format!("{OTHER4}/24"),
            &format!("{DB4}/24"),
        ],
    );
    let world = dnsmasq(
        &pair.b,
        &[B4],
        &[
            format!("--host-record=allowed.test,{ALLOWED4}"),
            format!("--host-record=fresh.test,{ALLOWED4}"),
            format!("--host-record=x1y2z3.test,{OTHER4}"),
            format!("--host-record=direct.test,{OTHER4}"),
            format!("--host-record=around.test,{OTHER4}"),
        ],
    );
    let corp = dnsmasq(
        &pair.b,
        &[CORP_NS],
        &[format!("--host-record=db.corp.test,{DB4}")],
    );
    wait_answers(&pair.b, B4, "allowed.test", ALLOWED4);
    wait_answers(&pair.b, CORP_NS, "db.corp.test", DB4);
    let servers = [ALLOWED4, OTHER4, DB4]
        .iter()
        .map(|h| pair.b.server("tcp", h, PORT))
        .collect();
    Lab {
        pair,
        _upstreams: vec![world, corp],
        _servers: servers,
        dir: tempfile::tempdir().expect("tempdir"),
    }
}

/// The cache as docs/dns.md sets it up: `conntrack` (its upstream queries
/// carry the conntrack mark of the query they answer), `bind-dynamic` (with
/// `bind-interfaces` dnsmasq cannot find a query's conntrack entry), a
/// default server and a server for the split domain. `extra` adds options.
fn cache(ns: &Netns, listen: &[&str], extra: &[&str]) -> Spawned {
    let mut args: Vec<String> = [
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--bind-dynamic",
        "--user=root",
        "--pid-file=",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(listen.iter().map(|l| format!("--listen-address={l}")));
    args.push(format!("--server={B4}"));
    args.push(format!("--server=/corp.test/{CORP_NS}"));
    args.extend(extra.iter().map(|s| s.to_string()));
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    Spawned(
        ns.cmd("dnsmasq", &a)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dnsmasq (apt-get install dnsmasq-base)"),
    )
}

/// Polls `dig @server name` until it answers `want` (bounded).
fn wait_answers(ns: &Netns, server: &str, name: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10 * time_scale());
    loop {
        let out = ns
            .cmd(
                "dig",
                &["+tries=1", "+time=1", "+short", &format!("@{server}"), name],
            )
            .output()
            .expect("dig");
        if String::from_utf8_lossy(&out.stdout).trim() == want {
            return;
        }
        assert!(Instant::now() < deadline, "{server} does not answer {name}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls until a UDP socket is bound to `addr`:53 in `ns` (the cache is up).
fn wait_listening(ns: &Netns, addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(10 * time_scale());
    loop {
        let out = ns.cmd("ss", &["-Hlun"]).output().expect("ss");
        if String::from_utf8_lossy(&out.stdout).contains(&format!("{addr}:53 ")) {
            return;
        }
        assert!(Instant::now() < deadline, "nothing listens on {addr}:53");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Lab {
    fn resolv_conf(&self, nameserver: &str) -> String {
        let path = self.dir.path().join(format!("resolv.conf.{nameserver}"));
        std::fs::write(
            &path,
            format!("nameserver {nameserver}\noptions timeout:2 attempts:1\n"),
        )
        .expect("writing resolv.conf");
        path.to_string_lossy().into_owned()
    }

    /// PROGRAM as nobody in egret's namespace, with `resolv_conf` as its
    /// /etc/resolv.conf (bind-mounted in a mount namespace of its own).
    fn program(&self, resolv_conf: &str, name: &str) -> (u32, String) {
        let script = r#"mount --bind "$1" /etc/resolv.conf && exec setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/python3 -c "$PROGRAM" "$2" "$3""#;
        let out: Output = self
            .pair
            .a
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
                    &PORT.to_string(),
                ],
            )
            .env("PROGRAM", PROGRAM)
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
}

/// The packet count of the output rule whose comment is `comment`.
fn rule_packets(ns: &Netns, comment: &str) -> u64 {
    let text = ns.nft_ruleset();
    let line = text
        .lines()
        .find(|l| l.contains(&format!("comment \"{comment}\"")))
        .unwrap_or_else(|| panic!("no rule {comment}: {text}"));
    line.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter: {line}"))
}

fn doctor_check(ns: &Netns, args: &[&str], name: &str) -> (String, String) {
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

const CACHE_QUERIES: &str = "dns guard: its local cache's upstream queries";

/// Programs ask the guard, the guard asks the cache: a refused name is the
/// program's (not the cache's), an allowed name and a name of the cache's
/// split domain resolve through guard -> cache -> upstream and the program
/// connects by name; the cache's upstream queries left with the cache mark.
/// Doctor calls the layout healthy.
#[test]
fn programs_ask_the_guard_and_the_guard_asks_its_local_cache() {
    let lab = lab();
    let a = &lab.pair.a;
    let _cache = cache(a, &[CACHE], &["--conntrack"]);
    wait_listening(a, CACHE);
    let policy = PolicyFile::new(POLICY);
    let run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);
    let conf = lab.resolv_conf("127.0.0.1");

    // A DNS callback: refused by the guard, reported with the program.
    let (pid, out) = lab.program(&conf, "x1y2z3.test");
    assert!(out.contains("unresolved"), "{out}");
    let e = run.wait_event(10, "dns-refused x1y2z3.test", |e| {
        at(e, "/event/action") == "dns-refused" && at(e, "/dns/question/name") == "x1y2z3.test"
    });
    assert_eq!(at(&e, "/process/pid"), pid, "{e:#}");
    assert_eq!(at(&e, "/user/id"), "65534", "{e:#}");
    assert_eq!(
        rule_packets(a, CACHE_QUERIES),
        0,
        "a refused name reaches no cache"
    );

    // An allowed name: the guard's only upstream is the cache, which asks
    // the world; the address is opened before the answer; it connects.
    let (_, out) = lab.program(&conf, "allowed.test");
    assert!(out.contains(&format!("connected {ALLOWED4} True")), "{out}");
    assert!(rule_packets(a, CACHE_QUERIES) >= 1);

    // The split domain: only the cache's per-domain server knows it.
    let (_, out) = lab.program(&conf, "db.corp.test");
    assert!(out.contains(&format!("connected {DB4} True")), "{out}");
    assert!(!a.tcp_ok(None, OTHER4, PORT));

    let args = [
        "--policy",
        policy.path(),
        "--state-dir",
        &policy.state_dir(),
        "--resolv-conf",
        &conf,
    ];
    // The live table (its `ct mark set` included) decodes as egret wrote it.
    let status = a.egret_ok(&["status", "--state-dir", &policy.state_dir()]);
    assert!(
        status.contains("its queries to the local cache"),
        "{status}"
    );
    let (s, detail) = doctor_check(a, &args, "dns cache");
    assert_eq!(s, "ok", "{detail}");
    assert!(
        detail.contains("dnsmasq") && detail.contains("--conntrack"),
        "{detail}"
    );
    let (s, detail) = doctor_check(a, &args, "resolver");
    assert_eq!(s, "ok", "{detail}");
    drop(run);
}

/// Only the guard may ask the cache. A program pointed at the cache
/// (resolv.conf naming it) gets nothing and is reported as `dns-bypass`
/// with its pid; a query the cache got from elsewhere (a peer on the
/// network, through a listen address on the veth) makes the cache ask
/// its upstream without the mark: blocked and reported as dnsmasq's.
#[test]
fn only_the_guard_may_ask_the_cache_and_only_its_queries_leave() {
    let lab = lab();
    let a = &lab.pair.a;
    let _cache = cache(a, &[CACHE, A4], &["--conntrack"]);
    wait_listening(a, CACHE);
    let policy = PolicyFile::new(POLICY);
    let run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);

    // glibc: its UDP send fails at once (EPERM) and it closes the socket,
    // so the event may name only the user; never the cache listening there.
    let conf = lab.resolv_conf(CACHE);
    let (_, out) = lab.program(&conf, "direct.test");
    assert!(out.contains("unresolved"), "{out}");
    let e = run.wait_event(10, "dns-bypass to the cache", |e| {
        at(e, "/rule/name") == "dns-bypass"
            && at(e, "/destination/ip") == CACHE
            && at(e, "/user/id") == "65534"
    });
    assert_eq!(at(&e, "/destination/port"), 53, "{e:#}");
    assert_ne!(at(&e, "/process/executable"), "/usr/sbin/dnsmasq", "{e:#}");
    // A program whose socket stays (TCP in SYN-SENT) is named.
    let out = a
        .as_nobody(
            "dig",
            &[
                "+tcp",
                "+tries=1",
                "+time=2",
                "+short",
                "@127.0.0.2",
                "direct.test",
            ],
        )
        .output()
        .expect("dig");
    assert!(!String::from_utf8_lossy(&out.stdout).contains(OTHER4));
    let e = run.wait_event(10, "dns-bypass to the cache by dig", |e| {
        at(e, "/rule/name") == "dns-bypass"
            && at(e, "/destination/ip") == CACHE
            && at(e, "/process/name") == "dig"
    });
    assert_eq!(at(&e, "/user/id"), "65534", "{e:#}");
    assert_eq!(at(&e, "/network/transport"), "tcp", "{e:#}");
    // root without egret's mark fares no better, over UDP or TCP.
    for tcp in [false, true] {
        let mut args = vec!["+tries=1", "+time=2", "+short", "@127.0.0.2", "direct.test"];
        if tcp {
            args.push("+tcp");
        }
        let out = a.cmd("dig", &args).output().expect("dig");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains(OTHER4),
            "tcp={tcp}"
        );
    }
    assert_eq!(
        rule_packets(a, CACHE_QUERIES),
        0,
        "nothing asked through the cache left"
    );

    // A query from the network: the cache forwards it unmarked: blocked.
    let out = lab
        .pair
        .b
        .cmd(
            "dig",
            &[
                "+tries=1",
                "+time=3",
                "+short",
                &format!("@{A4}"),
                "around.test",
            ],
        )
        .output()
        .expect("dig");
    assert!(!String::from_utf8_lossy(&out.stdout).contains(OTHER4));
    // dnsmasq (root here) closes its socket on EPERM: named by its user.
    let e = run.wait_event(10, "dns-bypass by the cache", |e| {
        at(e, "/rule/name") == "dns-bypass" && at(e, "/destination/ip") == B4
    });
    assert_eq!(at(&e, "/user/id"), "0", "{e:#}");
    assert_eq!(rule_packets(a, CACHE_QUERIES), 0);

    // The guard still gets its answers through the same cache.
    let conf = lab.resolv_conf("127.0.0.1");
    let (_, out) = lab.program(&conf, "fresh.test");
    assert!(out.contains(&format!("connected {ALLOWED4} True")), "{out}");
    assert!(rule_packets(a, CACHE_QUERIES) >= 1);

    // Doctor: programs pointed at the cache is a failure.
    let args = [
        "--policy",
        policy.path(),
        "--state-dir",
        &policy.state_dir(),
        "--resolv-conf",
        &lab.resolv_conf(CACHE),
    ];
    let (s, detail) = doctor_check(a, &args, "resolver");
    assert_eq!(s, "fail", "{detail}");
    assert!(detail.contains("local cache"), "{detail}");
    drop(run);
}

/// A cache that does not carry the mark (dnsmasq without --conntrack):
/// its upstream queries are blocked, so an allowed name does not resolve,
/// and doctor warns before anyone finds out.
#[test]
fn a_cache_without_conntrack_is_blocked_and_doctor_warns() {
    let lab = lab();
    let a = &lab.pair.a;
    let _cache = cache(a, &[CACHE], &[]);
    wait_listening(a, CACHE);
    let policy = PolicyFile::new(POLICY);
    let args = [
        "--policy",
        policy.path(),
        "--state-dir",
        &policy.state_dir(),
        "--resolv-conf",
        &lab.resolv_conf("127.0.0.1"),
    ];
    let (s, detail) = doctor_check(a, &args, "dns cache");
    assert_eq!(s, "warn", "{detail}");
    assert!(detail.contains("without --conntrack"), "{detail}");

    let run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);
    let (_, out) = lab.program(&lab.resolv_conf("127.0.0.1"), "allowed.test");
    assert!(!out.contains("connected"), "{out}");
    let e = run.wait_event(10, "dns-bypass by the unmarked cache", |e| {
        at(e, "/rule/name") == "dns-bypass" && at(e, "/destination/ip") == B4
    });
    assert_eq!(at(&e, "/user/id"), "0", "{e:#}");
    drop(run);
}

/// unbound cannot copy a conntrack mark: with `cache_user = "unbound"` its
/// user's upstream queries leave instead (weaker: docs/dns.md). The same
/// layout works (the program named, the split domain resolved) and the
/// cache is still the guard's alone.
#[test]
fn unbound_as_the_cache_by_its_user() {
    let lab = lab();
    let a = &lab.pair.a;
    const UNBOUND: &str = "127.0.0.3";
    let conf = lab.dir.path().join("unbound.conf");
    std::fs::write(
        &conf,
        format!(
            "server:\n  interface: {UNBOUND}\n  port: 53\n  do-daemonize: no\n  username: \"unbound\"\n  chroot: \"\"\n  directory: \"/\"\n  pidfile: \"\"\n  use-syslog: no\n  do-ip6: no\n  module-config: \"iterator\"\n  do-not-query-localhost: no\n  local-zone: \"test.\" nodefault\n  access-control: 127.0.0.0/8 allow\n\nforward-zone:\n  name: \"corp.test.\"\n  forward-addr: {CORP_NS}\n\nforward-zone:\n  name: \".\"\n  forward-addr: {B4}\n"
        ),
    )
    .expect("unbound.conf");
    let _cache = Spawned(
        a.cmd("unbound", &["-d", "-c", &conf.to_string_lossy()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("unbound (apt-get install unbound)"),
    );
    wait_listening(a, UNBOUND);
    let policy = PolicyFile::new(&POLICY.replace(
        "upstream = [\"127.0.0.2\"]",
        "upstream = [\"127.0.0.3\"]\ncache_user = \"unbound\"",
    ));
    let run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);
    let guard = lab.resolv_conf("127.0.0.1");

    let (pid, out) = lab.program(&guard, "x1y2z3.test");
    assert!(out.contains("unresolved"), "{out}");
    let e = run.wait_event(10, "dns-refused x1y2z3.test", |e| {
        at(e, "/event/action") == "dns-refused" && at(e, "/dns/question/name") == "x1y2z3.test"
    });
    assert_eq!(at(&e, "/process/pid"), pid, "{e:#}");
    let (_, out) = lab.program(&guard, "allowed.test");
    assert!(out.contains(&format!("connected {ALLOWED4} True")), "{out}");
    let (_, out) = lab.program(&guard, "db.corp.test");
    assert!(out.contains(&format!("connected {DB4} True")), "{out}");
    assert!(rule_packets(a, &format!("{CACHE_QUERIES} (cache_user)")) >= 1);

    let (_, out) = lab.program(&lab.resolv_conf(UNBOUND), "direct.test");
    assert!(out.contains("unresolved"), "{out}");
    let e = run.wait_event(10, "dns-bypass to unbound", |e| {
        at(e, "/rule/name") == "dns-bypass"
            && at(e, "/destination/ip") == UNBOUND
            && at(e, "/user/id") == "65534"
    });
    assert_ne!(at(&e, "/process/executable"), "/usr/sbin/unbound", "{e:#}");

    let args = [
        "--policy",
        policy.path(),
        "--state-dir",
        &policy.state_dir(),
        "--resolv-conf",
        &guard,
    ];
    let (s, detail) = doctor_check(a, &args, "dns cache");
    assert_eq!(s, "ok", "{detail}");
    assert!(
        detail.contains("unbound") && detail.contains("cache_user"),
        "{detail}"
    );
    drop(run);
}
