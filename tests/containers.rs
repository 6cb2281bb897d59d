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
