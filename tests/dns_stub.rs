//! Programs and local resolvers (issue 18, "Programs behind a local stub
//! resolver"): a program that asks the guard itself, through glibc with the
//! resolv.conf docs/dns.md recommends (the guard as the nameserver, the
//! host's search domains kept), is named in the guard's events and reaches
//! what it resolved; the discouraged layout, a caching dnsmasq in front of
//! the guard (programs -> dnsmasq -> guard), hides the program behind
//! dnsmasq, and `egret doctor` says so.

mod common;

use std::time::{Duration, Instant};

use common::*;

const ALLOWED4: &str = "10.1.0.10";
const OTHER4: &str = "10.1.0.11";
const PORT: u16 = 8080;
/// Where the discouraged local cache listens in egret's namespace.
const STUB: &str = "127.0.0.2";

const POLICY: &str = r#"
mode = "enforce"

[dns]
listen = "127.0.0.1:53"
upstream = ["10.1.0.2"]

[[allow]]
name = "web"
hosts = ["allowed.test"]
ports = [8080]
"#;

struct Lab {
    pair: Pair,
    _upstream: Spawned,
    _servers: Vec<Server>,
    dir: tempfile::TempDir,
}

fn lab() -> Lab {
    let pair = Pair::new();
    add_addresses(
        &pair.b,
        &[&format!("{ALLOWED4}/24"), &format!("{OTHER4}/24")],
    );
    let records = [
        format!("--host-record=allowed.test,{ALLOWED4}"),
        format!("--host-record=x1y2z3.test,{OTHER4}"),
    ];
    let upstream = dnsmasq(&pair.b, &[B4], &records);
    wait_answers(&pair.b, B4, "allowed.test", ALLOWED4);
    let servers = [ALLOWED4, OTHER4]
        .iter()
        .map(|h| pair.b.server("tcp", h, PORT))
        .collect();
    Lab {
        pair,
        _upstream: upstream,
        _servers: servers,
        dir: tempfile::tempdir().expect("tempdir"),
    }
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

impl Lab {
    /// A resolv.conf for the program: `nameserver` and the host's search domain.
    fn resolv_conf(&self, nameserver: &str) -> String {
        write_resolv_conf(self.dir.path(), nameserver, Some("test"))
    }

    /// The glibc client as nobody in egret's namespace, with `resolv_conf` as its
    /// /etc/resolv.conf (bind-mounted in a mount namespace of its own).
    /// Returns its pid and output.
    fn program(&self, resolv_conf: &str, name: &str) -> (u32, String) {
        glibc_client(&self.pair.a, resolv_conf, name, PORT)
    }
}

/// The recommended layout: programs ask the guard (resolv.conf names it,
/// with the host's search domain, as resolved's uplink resolv.conf does in
/// docs/dns.md). A refused name is reported with the program, as nobody; an
/// allowed short name is completed by the search domain, resolves and connects.
#[test]
fn a_program_that_asks_the_guard_itself_is_named_and_connects() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = PolicyFile::new(POLICY);
    let run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);
    let conf = lab.resolv_conf("127.0.0.1");

    // A DNS callback: "x1y2z3" + the search domain; no rule allows it.
    let (pid, out) = lab.program(&conf, "x1y2z3");
    assert!(out.contains("unresolved"), "{out}");
    let e = run.wait_event(10, "dns-refused x1y2z3.test", |e| {
        at(e, "/event/action") == "dns-refused" && at(e, "/dns/question/name") == "x1y2z3.test"
    });
    assert_eq!(at(&e, "/process/pid"), pid, "{e:#}");
    assert!(
        at(&e, "/process/executable")
            .as_str()
            .is_some_and(|x| x.starts_with("/usr/bin/python3")),
        "{e:#}"
    );
    assert_eq!(at(&e, "/user/id"), "65534", "{e:#}");
    assert!(!a.tcp_ok(None, OTHER4, PORT));

    // An allowed name, short: the search domain completes it, the guard
    // opens its address before answering, the program connects.
    let (_, out) = lab.program(&conf, "allowed");
    assert!(out.contains(&format!("connected {ALLOWED4} True")), "{out}");

    // Doctor: programs ask the guard, and no query came through a stub.
    run.wait_until("books counting the queries", 10, || {
        run.books()
            .is_some_and(|b| b["dns_guard"]["queries"].as_u64() >= Some(2))
    });
    let (s, detail) = doctor_check_for(a, &policy, &conf, "resolver");
    assert_eq!(s, "ok", "{detail}");
    let (s, detail) = doctor_check_for(a, &policy, &conf, "dns askers");
    assert_eq!(s, "ok", "{detail}");
    drop(run);
}

/// The discouraged layout: a caching dnsmasq on 127.0.0.2 is the programs'
/// resolver and forwards to the guard. Lookups work, but the guard sees
/// dnsmasq: the refused name is reported as dnsmasq's, not the program's.
/// Doctor warns twice: resolv.conf names a local resolver instead of the
/// guard, and the guard's books count queries asked by dnsmasq.
#[test]
fn a_local_cache_in_front_of_the_guard_hides_the_program_and_doctor_warns() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = PolicyFile::new(POLICY);
    let run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);
    let _cache = dnsmasq(a, &[STUB], &["--server=127.0.0.1".to_string()]);
    wait_answers(a, STUB, "allowed.test", ALLOWED4);
    let conf = lab.resolv_conf(STUB);

    let (pid, out) = lab.program(&conf, "x1y2z3");
    assert!(out.contains("unresolved"), "{out}");
    let e = run.wait_event(10, "dns-refused x1y2z3.test", |e| {
        at(e, "/event/action") == "dns-refused" && at(e, "/dns/question/name") == "x1y2z3.test"
    });
    assert_eq!(at(&e, "/process/executable"), "/usr/sbin/dnsmasq", "{e:#}");
    assert_ne!(at(&e, "/process/pid"), pid, "{e:#}");

    run.wait_until("books counting dnsmasq's queries", 10, || {
        run.books()
            .is_some_and(|b| b["dns_guard"]["via_stub"]["dnsmasq"].as_u64() >= Some(1))
    });
    let (s, detail) = doctor_check_for(a, &policy, &conf, "resolver");
    assert_eq!(s, "warn", "{detail}");
    assert!(detail.contains(STUB), "{detail}");
    let (s, detail) = doctor_check_for(a, &policy, &conf, "dns askers");
    assert_eq!(s, "warn", "{detail}");
    assert!(
        detail.contains("dnsmasq") && detail.contains("not the program that asked"),
        "{detail}"
    );
    let status = a.egret_ok(&["status", "--state-dir", &policy.state_dir()]);
    assert!(
        status.contains("asked through a local resolver") && status.contains("dnsmasq"),
        "{status}"
    );
    drop(run);
}
