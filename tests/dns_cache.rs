//! A local cache behind the guard (issue 18): programs -> guard -> cache ->
//! world, with the cache's split DNS kept. The cache is a real dnsmasq on
//! 127.0.0.2 in egret's namespace (`--conntrack`, a default server and a
//! per-domain server for `corp.test`); its upstreams are real dnsmasqs in
//! another namespace; programs resolve with glibc as `nobody`, as
//! tests/dns_stub.rs does. The guard still names the program, the cache's
//! split domain still resolves; a cache that cannot carry the mark is
//! blocked and doctor says so. That only the guard may ask the cache is
//! tests/adversary_dns_cache.rs.

mod common;
mod dns_cache_lab;

use common::*;
use dns_cache_lab::*;

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

    // The live table (its `ct mark set` included) decodes as egret wrote it.
    let status = a.egret_ok(&["status", "--state-dir", &policy.state_dir()]);
    assert!(
        status.contains("its queries to the local cache"),
        "{status}"
    );
    let (s, detail) = doctor_check_for(a, &policy, &conf, "dns cache");
    assert_eq!(s, "ok", "{detail}");
    assert!(
        detail.contains("dnsmasq") && detail.contains("--conntrack"),
        "{detail}"
    );
    let (s, detail) = doctor_check_for(a, &policy, &conf, "resolver");
    assert_eq!(s, "ok", "{detail}");
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
    let resolv = lab.resolv_conf("127.0.0.1");
    let (s, detail) = doctor_check_for(a, &policy, &resolv, "dns cache");
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

    let (s, detail) = doctor_check_for(a, &policy, &guard, "dns cache");
    assert_eq!(s, "ok", "{detail}");
    assert!(
        detail.contains("unbound") && detail.contains("cache_user"),
        "{detail}"
    );
    drop(run);
}

/// With `intercept = true` too: a program asking a resolver out there is
/// answered by the guard, whose cache's marked upstream queries are not
/// redirected back to the guard (they would loop) but leave.
#[test]
fn intercept_spares_the_caches_own_queries() {
    let lab = lab();
    let a = &lab.pair.a;
    let _cache = cache(a, &[CACHE], &["--conntrack"]);
    wait_listening(a, CACHE);
    let policy = PolicyFile::new(&POLICY.replace(
        "upstream = [\"127.0.0.2\"]",
        "upstream = [\"127.0.0.2\"]\nintercept = true",
    ));
    let run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);
    let (_, out) = lab.program(&lab.resolv_conf(B4), "allowed.test");
    assert!(out.contains(&format!("connected {ALLOWED4} True")), "{out}");
    assert!(rule_packets(a, CACHE_QUERIES) >= 1);
    let (_, out) = lab.program(&lab.resolv_conf(B4), "x1y2z3.test");
    assert!(out.contains("unresolved"), "{out}");
    run.wait_event(10, "dns-refused x1y2z3.test", |e| {
        at(e, "/event/action") == "dns-refused" && at(e, "/dns/question/name") == "x1y2z3.test"
    });
    drop(run);
}
