//! scope = "host+containers": a "container" namespace behind a `docker0`
//! bridge in the host namespace, routed out to another namespace. Forwarded
//! flows are filtered by the same rules and reported with the bridge and the
//! container's address.

mod bridge_lab;
mod common;

use bridge_lab::*;
use common::*;

const POLICY: &str = r#"
mode = "enforce"
scope = "host+containers"
# No runtime answers here: events name the bridge and the address.
container_runtime = "/nonexistent/docker.sock"

[[allow]]
name = "web"
cidrs = ["198.51.100.10"]
ports = [8080]

[[allow]]
name = "root-only"
cidrs = ["198.51.100.11"]
users = [0]
"#;

#[test]
fn forwarded_container_traffic_is_filtered_and_reported_with_its_bridge() {
    let lab = lab();
    let policy = PolicyFile::new(POLICY);
    let run = Running::start(&lab.host, &policy.state_dir(), &["--policy", policy.path()]);
    assert!(
        lab.container.tcp_ok(None, ALLOWED, 8080),
        "allowed by rule web"
    );
    // Rules that name users cannot apply to forwarded packets (no local socket).
    assert!(!lab.container.tcp_ok(None, OTHER, 8080));
    let e = run.wait_event(10, "forwarded block", |e| {
        at(e, "/source/ip") == CONTAINER && at(e, "/destination/ip") == OTHER
    });
    assert_eq!(at(&e, "/event/action"), "blocked");
    assert_eq!(at(&e, "/rule/name"), "containers");
    assert_eq!(at(&e, "/observer/ingress/interface/name"), "docker0");
    assert_eq!(at(&e, "/destination/port"), 8080);
    assert_eq!(at(&e, "/egret/attribution"), "bridge");
    assert!(e.pointer("/container/name").is_none(), "{e:#}");
    assert!(
        at(&e, "/message")
            .as_str()
            .unwrap_or("")
            .contains("forwarded from 10.88.0.2 via docker0"),
        "{e:#}"
    );
    // The host's own sockets are still under the output rules.
    assert!(
        lab.host.tcp_ok(None, OTHER, 8080),
        "root-only allows root on the host"
    );
    assert!(!lab.host.tcp_ok(Some(65534), OTHER, 8080));
    // nft as the witness: a forward chain jumping to the containers chain.
    let rules = lab.host.nft_ruleset();
    assert!(
        rules.contains("type filter hook forward priority filter; policy accept;"),
        "{rules}"
    );
    assert!(
        rules.contains("iifname \"docker0\" counter packets"),
        "{rules}"
    );
    assert!(rules.contains("iifname \"br-*\""), "{rules}");
    drop(run);
}

#[test]
fn container_dns_goes_through_the_guard_whatever_resolver_the_container_was_given() {
    let l = dns_lab();
    let (lab, c) = (&l.lab, &l.lab.container);
    let policy = PolicyFile::new(DNS_POLICY);
    let run = Running::start(&lab.host, &policy.state_dir(), &["--policy", policy.path()]);

    // Not resolved yet: the allowed name's address is closed.
    assert!(!c.tcp_ok(None, ALLOWED, 8080));
    // The runtime's resolver (nothing there), UDP and TCP: the guard answers,
    // and the answer opens the address for the container (forward path).
    for transport in ["+notcp", "+tcp"] {
        let answer = dig(
            c,
            &[
                &format!("@{RUNTIME_RESOLVER}"),
                transport,
                "+short",
                "allowed.test",
            ],
        );
        assert_eq!(answer.trim(), ALLOWED, "{transport}");
    }
    assert!(
        c.tcp_ok(None, ALLOWED, 8080),
        "opened by the guard's answer"
    );
    // The real upstream, asked directly: the guard answers that too.
    let refused = dig(c, &[&format!("@{RESOLVER}"), "x1y2.callback.other.test"]);
    assert!(refused.contains("status: REFUSED"), "{refused}");
    let e = run.wait_event(10, "the container's refused query", |e| {
        at(e, "/event/action") == "dns-refused"
            && at(e, "/dns/question/name") == "x1y2.callback.other.test"
    });
    assert_eq!(at(&e, "/source/ip"), CONTAINER, "{e:#}");
    assert_eq!(
        at(&e, "/observer/ingress/interface/name"),
        "docker0",
        "{e:#}"
    );
    assert_eq!(at(&e, "/egret/attribution"), "bridge", "{e:#}");
    assert!(e.pointer("/process").is_none(), "{e:#}");
    assert!(e.pointer("/user").is_none(), "{e:#}");

    // DNS over TLS, around the guard: blocked and reported with the bridge.
    assert!(!c.tcp_ok(None, RESOLVER, 853));
    let e = run.wait_event(10, "the container's DNS over TLS", |e| {
        at(e, "/rule/name") == "dns-bypass" && at(e, "/destination/port") == 853
    });
    assert_eq!(at(&e, "/source/ip"), CONTAINER, "{e:#}");
    assert_eq!(
        at(&e, "/observer/ingress/interface/name"),
        "docker0",
        "{e:#}"
    );
    assert_eq!(at(&e, "/event/action"), "blocked");

    // The outside world gets nothing from it: tests/adversary_containers.rs.

    // A bridge made after egret started: the interface wildcard covers it.
    let late = late_container(lab, "br-late0");
    assert_eq!(
        dig(
            &late,
            &[&format!("@{RUNTIME_RESOLVER}"), "+short", "site.test"]
        )
        .trim(),
        SITE
    );
    assert_eq!(
        late.status_via_proxy("", &format!("http://{SITE}:8080/")),
        "200",
        "opened by the guard's answer to the late container"
    );
    let refused = dig(&late, &[&format!("@{RUNTIME_RESOLVER}"), "late.other.test"]);
    assert!(refused.contains("status: REFUSED"), "{refused}");
    let e = run.wait_event(10, "the late container's refused query", |e| {
        at(e, "/dns/question/name") == "late.other.test"
    });
    assert_eq!(at(&e, "/source/ip"), "10.89.0.2", "{e:#}");
    assert_eq!(
        at(&e, "/observer/ingress/interface/name"),
        "br-late0",
        "{e:#}"
    );

    // egret reads its new chains back as it wrote them: no tamper alarm.
    let tamper = run
        .snapshot()
        .into_iter()
        .find(|e| at(e, "/event/action") == "tamper");
    assert!(tamper.is_none(), "{tamper:#?}");
    // nft as the witness.
    let rules = lab.host.nft_ruleset();
    assert!(
        rules.contains("type nat hook prerouting priority dstnat; policy accept;"),
        "{rules}"
    );
    assert!(
        rules.contains(
            "iifname \"br-*\" meta nfproto ipv4 meta l4proto . th dport @dns_plain counter packets"
        ),
        "{rules}"
    );
    drop(run);
}

#[test]
fn the_proxy_serves_containers_on_the_bridge_and_denials_name_the_bridge() {
    let l = dns_lab();
    let (lab, c) = (&l.lab, &l.lab.container);
    let policy = PolicyFile::new(DNS_POLICY);
    let run = Running::start(&lab.host, &policy.state_dir(), &["--policy", policy.path()]);
    let proxy = "http://10.88.0.1:3128";
    assert_eq!(
        c.status_via_proxy(proxy, "http://site.test:8080/"),
        "200",
        "allowed by rule web"
    );
    assert_eq!(c.status_via_proxy(proxy, "http://other.test:8080/"), "403");
    let e = run.wait_event(10, "the container's proxy denial", |e| {
        at(e, "/event/action") == "proxy-denied" && at(e, "/destination/domain") == "other.test"
    });
    assert_eq!(at(&e, "/source/ip"), CONTAINER, "{e:#}");
    assert_eq!(
        at(&e, "/observer/ingress/interface/name"),
        "docker0",
        "{e:#}"
    );
    assert_eq!(at(&e, "/egret/attribution"), "bridge", "{e:#}");
    // The host's own processes still use it on loopback.
    assert_eq!(
        lab.host
            .status_via_proxy("http://127.0.0.1:3128", "http://site.test:8080/"),
        "200"
    );
    drop(run);
}

/// podman's aardvark-dns (and libvirt's dnsmasq) listen on the bridge's own
/// address: they answer the names of their containers, which the guard
/// cannot, and forward the rest from the host. Played by dnsmasq bound on
/// the gateway address, forwarding to the guard's host listener.
#[test]
fn a_resolver_bound_on_the_bridge_address_answers_its_names_and_forwards_through_the_guard() {
    let l = dns_lab();
    let (lab, c) = (&l.lab, &l.lab.container);
    let policy = PolicyFile::new(DNS_POLICY);
    let run = Running::start(&lab.host, &policy.state_dir(), &["--policy", policy.path()]);
    // Nothing bound on the gateway: a query to it goes to the guard like any other.
    let refused = dig(c, &[&format!("@{GATEWAY}"), "peer.dns.podman"]);
    assert!(refused.contains("status: REFUSED"), "{refused}");
    let e = run.wait_event(10, "the query to the bare gateway", |e| {
        at(e, "/event/action") == "dns-refused" && at(e, "/dns/question/name") == "peer.dns.podman"
    });
    assert_eq!(at(&e, "/source/ip"), CONTAINER, "{e:#}");

    let records = [
        "--host-record=peer.dns.podman,10.88.0.3".to_string(),
        "--server=127.0.0.1".to_string(),
    ];
    let _runtime_resolver = dnsmasq(&lab.host, &[GATEWAY], &records);
    let peer = || dig(c, &[&format!("@{GATEWAY}"), "+short", "peer.dns.podman"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10 * time_scale());
    while peer().trim() != "10.88.0.3" {
        assert!(
            std::time::Instant::now() < deadline,
            "the runtime's resolver answers its container names: {}",
            peer()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Other names: forwarded from the host to the guard, whose answer opens
    // the address for the container.
    assert!(!c.tcp_ok(None, ALLOWED, 8080));
    let answer = dig(c, &[&format!("@{GATEWAY}"), "+short", "allowed.test"]);
    assert_eq!(answer.trim(), ALLOWED);
    assert!(
        c.tcp_ok(None, ALLOWED, 8080),
        "opened by the guard's answer"
    );
    // A refused name: refused all the same; the guard saw the runtime's
    // resolver ask it.
    let refused = dig(
        c,
        &[&format!("@{GATEWAY}"), "+short", "fwd.callback.other.test"],
    );
    assert!(!refused.contains("198.51.100."), "{refused}");
    let e = run.wait_event(10, "the forwarded refused query", |e| {
        at(e, "/event/action") == "dns-refused"
            && at(e, "/dns/question/name") == "fwd.callback.other.test"
    });
    assert_eq!(at(&e, "/process/name"), "dnsmasq", "{e:#}");
    // Queries to any other address are still the guard's, UDP and TCP.
    for transport in ["+notcp", "+tcp"] {
        let refused = dig(
            c,
            &[
                &format!("@{RUNTIME_RESOLVER}"),
                transport,
                "peer.dns.podman",
            ],
        );
        assert!(
            refused.contains("status: REFUSED"),
            "{transport}: {refused}"
        );
    }
    let rules = lab.host.nft_ruleset();
    assert!(
        rules.contains("iifname \"docker0\" meta l4proto . th dport @dns_plain socket wildcard 0 counter packets"),
        "{rules}"
    );
    drop(run);
}

const DNS6_POLICY: &str = r#"
mode = "enforce"
scope = "host+containers"
container_runtime = "/nonexistent/docker.sock"

[dns]
upstream = ["2001:db8:100::53"]
container_listen = "[::]:10053"

[[allow]]
name = "web6"
hosts = ["allowed6.test"]
ports = [8080]
"#;

/// A container with an IPv6 address: DNS over IPv6 to the gateway, or to any
/// address, reaches the guard (a dual-stack container listener); AAAA
/// answers open the IPv6 address; the container connects by name over IPv6;
/// DNS over TLS over IPv6 is blocked and reported.
#[test]
fn ipv6_container_dns_goes_through_the_guard_and_opens_the_aaaa_address() {
    let lab = lab();
    add_ipv6(&lab);
    let c = &lab.container;
    let records = [
        format!("--host-record=allowed6.test,{ALLOWED6}"),
        format!("--host-record=other6.test,{OTHER6}"),
    ];
    let _upstream = dnsmasq(&lab.outside, &[RESOLVER6], &records);
    let _servers = [
        lab.outside.server("tcp", ALLOWED6, 8080),
        lab.outside.server("tcp", OTHER6, 8080),
        lab.outside.server("tcp", RESOLVER6, 853),
    ];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10 * time_scale());
    while dig(
        c,
        &[&format!("@{RESOLVER6}"), "AAAA", "+short", "allowed6.test"],
    )
    .trim()
        != ALLOWED6
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the lab resolves over IPv6 before egret"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(c.tcp_ok(None, OTHER6, 8080), "the lab routes IPv6");
    assert!(c.tcp_ok(None, RESOLVER6, 853));

    let policy = PolicyFile::new(DNS6_POLICY);
    let run = Running::start(&lab.host, &policy.state_dir(), &["--policy", policy.path()]);
    assert!(!c.tcp_ok(None, ALLOWED6, 8080), "not resolved yet");
    // To the gateway (nothing bound there) and to an address nothing
    // answers: both redirected to the guard, over UDP and TCP.
    for server in [GATEWAY6, "2001:db8:ffff::53"] {
        for transport in ["+notcp", "+tcp"] {
            let answer = dig(
                c,
                &[
                    &format!("@{server}"),
                    transport,
                    "AAAA",
                    "+short",
                    "allowed6.test",
                ],
            );
            assert_eq!(answer.trim(), ALLOWED6, "@{server} {transport}");
        }
    }
    assert!(c.tcp_ok(None, ALLOWED6, 8080), "opened by the AAAA answer");
    // By name, with the gateway as the container's resolver.
    let dir = tempfile::tempdir().unwrap();
    let script = peer_script();
    let by_name = with_resolver(
        c,
        dir.path(),
        GATEWAY6,
        "python3",
        &[
            script.to_str().unwrap(),
            "tcp-connect",
            "allowed6.test",
            "8080",
        ],
    )
    .output()
    .expect("peer");
    assert!(
        by_name.status.success(),
        "reaches allowed6.test by name: {}",
        String::from_utf8_lossy(&by_name.stderr)
    );
    // A refused name over IPv6, reported with the bridge and the IPv6 address.
    let refused = dig(c, &[&format!("@{GATEWAY6}"), "AAAA", "x6.callback.test"]);
    assert!(refused.contains("status: REFUSED"), "{refused}");
    let e = run.wait_event(10, "the IPv6 refused query", |e| {
        at(e, "/event/action") == "dns-refused" && at(e, "/dns/question/name") == "x6.callback.test"
    });
    assert_eq!(at(&e, "/source/ip"), CONTAINER6, "{e:#}");
    assert_eq!(
        at(&e, "/observer/ingress/interface/name"),
        "docker0",
        "{e:#}"
    );
    assert_eq!(at(&e, "/egret/attribution"), "bridge", "{e:#}");
    // IPv4 through the same dual-stack listener: the IPv4 address, not ::ffff:.
    let refused = dig(c, &[&format!("@{RUNTIME_RESOLVER}"), "x4.callback.test"]);
    assert!(refused.contains("status: REFUSED"), "{refused}");
    let e = run.wait_event(10, "the IPv4 refused query", |e| {
        at(e, "/dns/question/name") == "x4.callback.test"
    });
    assert_eq!(at(&e, "/source/ip"), CONTAINER, "{e:#}");
    assert_eq!(at(&e, "/egret/attribution"), "bridge", "{e:#}");
    // Around the guard over IPv6: DNS over TLS blocked and reported.
    assert!(!c.tcp_ok(None, RESOLVER6, 853));
    let e = run.wait_event(10, "DNS over TLS over IPv6", |e| {
        at(e, "/rule/name") == "dns-bypass" && at(e, "/destination/ip") == RESOLVER6
    });
    assert_eq!(at(&e, "/source/ip"), CONTAINER6, "{e:#}");
    assert_eq!(at(&e, "/event/action"), "blocked");
    // What no rule allows stays closed.
    assert!(!c.tcp_ok(None, OTHER6, 8080));
    let rules = lab.host.nft_ruleset();
    assert!(
        rules.contains(
            "iifname \"docker0\" meta nfproto ipv6 meta l4proto . th dport @dns_plain counter packets"
        ),
        "{rules}"
    );
    drop(run);
}
