//! Attacks on a local cache behind the DNS guard (issue 18), run for real:
//! a program that asks the cache directly, over UDP or TCP, as nobody or
//! root, and a network peer that asks it through a LAN address. Neither may
//! get a name resolved around the guard; both are reported (`dns-bypass`).

mod common;
mod dns_cache_lab;

use common::*;
use dns_cache_lab::*;

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
    let resolv = lab.resolv_conf(CACHE);
    let (s, detail) = doctor_check_for(a, &policy, &resolv, "resolver");
    assert_eq!(s, "fail", "{detail}");
    assert!(detail.contains("local cache"), "{detail}");
    drop(run);
}
