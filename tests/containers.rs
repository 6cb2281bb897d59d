//! scope = "host+containers": a "container" namespace behind a `docker0`
//! bridge in the host namespace, routed out to another namespace. Forwarded
//! flows are filtered by the same rules and reported with the bridge and the
//! container's address.

mod common;

use common::*;

const CONTAINER: &str = "10.88.0.2";
const ALLOWED: &str = "198.51.100.10";
const OTHER: &str = "198.51.100.11";

fn ip(ns: &Netns, args: &[&str]) {
    run_ok(&mut ns.cmd("ip", args));
}

struct Lab {
    host: Netns,
    container: Netns,
    _outside: Netns,
    _servers: Vec<Server>,
}

fn lab() -> Lab {
    let (host, container, outside) = (Netns::new(), Netns::new(), Netns::new());
    let id = std::process::id() % 10_000;
    let (vc, vo) = (format!("vc{id}"), format!("vo{id}"));
    // The bridge containers sit behind, as Docker makes it.
    ip(&host, &["link", "add", "docker0", "type", "bridge"]);
    ip(&host, &["addr", "add", "10.88.0.1/24", "dev", "docker0"]);
    ip(&host, &["link", "set", "docker0", "up"]);
    ip(
        &host,
        &[
            "link",
            "add",
            &vc,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &container.name,
        ],
    );
    ip(&host, &["link", "set", &vc, "master", "docker0", "up"]);
    ip(
        &container,
        &["addr", "add", &format!("{CONTAINER}/24"), "dev", "eth0"],
    );
    ip(&container, &["link", "set", "eth0", "up"]);
    ip(&container, &["route", "add", "default", "via", "10.88.0.1"]);
    // The uplink.
    ip(
        &host,
        &[
            "link",
            "add",
            &vo,
            "type",
            "veth",
            "peer",
            "name",
            "up0",
            "netns",
            &outside.name,
        ],
    );
    ip(&host, &["addr", "add", "198.51.100.1/24", "dev", &vo]);
    ip(&host, &["link", "set", &vo, "up"]);
    for a in [ALLOWED, OTHER] {
        ip(&outside, &["addr", "add", &format!("{a}/24"), "dev", "up0"]);
    }
    ip(&outside, &["link", "set", "up0", "up"]);
    ip(
        &outside,
        &["route", "add", "10.88.0.0/24", "via", "198.51.100.1"],
    );
    run_ok(&mut host.cmd("sysctl", &["-qw", "net.ipv4.ip_forward=1"]));
    let servers = vec![
        outside.server("tcp", ALLOWED, 8080),
        outside.server("tcp", OTHER, 8080),
    ];
    assert!(
        container.tcp_ok(None, OTHER, 8080),
        "the lab routes before egret runs"
    );
    Lab {
        host,
        container,
        _outside: outside,
        _servers: servers,
    }
}

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

/// The outside namespace's resolver (the guard's upstream) and web server.
const RESOLVER: &str = "198.51.100.53";
const SITE: &str = "198.51.100.12";
/// What a runtime hands containers when the host's resolver is on loopback
/// (Docker: Google's). A TEST-NET address here: nothing answers it but the
/// guard, through the redirect.
const RUNTIME_RESOLVER: &str = "192.0.2.53";
const HOST_UPLINK: &str = "198.51.100.1";

const DNS_POLICY: &str = r#"
mode = "enforce"
scope = "host+containers"
container_runtime = "/nonexistent/docker.sock"

[dns]
upstream = ["198.51.100.53"]

[proxy]
listen = "0.0.0.0:3128"

[[allow]]
name = "web"
hosts = ["allowed.test", "site.test"]
ports = [8080]
"#;

/// The lab, plus dnsmasq (allowed.test, other.test, site.test) and an HTTP
/// server on site.test in the outside namespace, and a DNS-over-TLS port.
struct DnsLab {
    lab: Lab,
    _extra: Vec<Spawned>,
    _dot: Server,
}

fn dns_lab() -> DnsLab {
    let lab = lab();
    let outside = &lab._outside;
    for a in [RESOLVER, SITE] {
        ip(outside, &["addr", "add", &format!("{a}/24"), "dev", "up0"]);
    }
    let records = [
        format!("--host-record=allowed.test,{ALLOWED}"),
        format!("--host-record=other.test,{OTHER}"),
        format!("--host-record=site.test,{SITE}"),
    ];
    let upstream = dnsmasq(outside, &[RESOLVER], &records);
    let site = Spawned(
        outside
            .cmd(
                "python3",
                &[
                    "-m",
                    "http.server",
                    "--bind",
                    SITE,
                    "--directory",
                    "/",
                    "8080",
                ],
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3"),
    );
    let dot = outside.server("tcp", RESOLVER, 853);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while dig(
        &lab.container,
        &[&format!("@{RESOLVER}"), "+short", "allowed.test"],
    )
    .trim()
        != ALLOWED
        || lab
            .container
            .status_via_proxy("", &format!("http://{SITE}:8080/"))
            != "200"
    {
        assert!(
            std::time::Instant::now() < deadline,
            "dnsmasq or the web server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Before egret: DNS over TLS reaches the outside, and the container's
    // "runtime resolver" answers nothing.
    assert!(lab.container.tcp_ok(None, RESOLVER, 853));
    let nothing = dig(
        &lab.container,
        &[&format!("@{RUNTIME_RESOLVER}"), "+short", "allowed.test"],
    );
    assert!(nothing.contains("no servers could be reached"), "{nothing}");
    DnsLab {
        lab,
        _extra: vec![upstream, site],
        _dot: dot,
    }
}

fn dig(ns: &Netns, args: &[&str]) -> String {
    let time = format!("+time={}", 2 * time_scale());
    let mut a = vec!["+tries=1", time.as_str()];
    a.extend_from_slice(args);
    String::from_utf8_lossy(&ns.cmd("dig", &a).output().expect("dig").stdout).into_owned()
}

/// The HTTP status curl got for `url` through `proxy` ("000": no connection).
fn curl_code(ns: &Netns, proxy: &str, url: &str) -> String {
    let timeout = (3 * time_scale()).to_string();
    let args = [
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--connect-timeout",
        &timeout,
        "-x",
        proxy,
        url,
    ];
    String::from_utf8_lossy(&ns.cmd("curl", &args).output().expect("curl").stdout).into_owned()
}

/// A second container namespace behind a new `br-*` bridge, made while egret runs.
fn late_container(lab: &Lab, bridge: &str) -> Netns {
    let late = Netns::new();
    let veth = format!("vl{}", std::process::id() % 10_000);
    ip(&lab.host, &["link", "add", bridge, "type", "bridge"]);
    ip(&lab.host, &["addr", "add", "10.89.0.1/24", "dev", bridge]);
    ip(&lab.host, &["link", "set", bridge, "up"]);
    ip(
        &lab.host,
        &[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &late.name,
        ],
    );
    ip(&lab.host, &["link", "set", &veth, "master", bridge, "up"]);
    ip(&late, &["addr", "add", "10.89.0.2/24", "dev", "eth0"]);
    ip(&late, &["link", "set", "eth0", "up"]);
    ip(&late, &["route", "add", "default", "via", "10.89.0.1"]);
    ip(
        &lab._outside,
        &["route", "add", "10.89.0.0/24", "via", HOST_UPLINK],
    );
    late
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

    // The outside world gets nothing from the guard's container listener,
    // though it listens on the wildcard address.
    let outside = &lab._outside;
    for transport in ["+notcp", "+tcp"] {
        let answer = dig(
            outside,
            &[
                &format!("@{HOST_UPLINK}"),
                "-p",
                "10053",
                transport,
                "allowed.test",
            ],
        );
        assert!(!answer.contains("ANSWER SECTION"), "{transport}: {answer}");
        assert!(!answer.contains("status:"), "{transport}: {answer}");
    }
    // Nor from the proxy on the wildcard address (000: no connection).
    let proxy = format!("http://{HOST_UPLINK}:3128");
    assert_eq!(curl_code(outside, &proxy, "http://site.test:8080/"), "000");

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
