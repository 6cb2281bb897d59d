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
