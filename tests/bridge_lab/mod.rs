//! The bridge lab of tests/containers.rs and tests/adversary_containers.rs:
//! a "container" namespace behind a `docker0` bridge in a host namespace,
//! routed to an outside namespace (servers, a resolver).
#![allow(dead_code)]

use crate::common::*;

pub const CONTAINER: &str = "10.88.0.2";
pub const ALLOWED: &str = "198.51.100.10";
pub const OTHER: &str = "198.51.100.11";

pub fn ip(ns: &Netns, args: &[&str]) {
    run_ok(&mut ns.cmd("ip", args));
}

pub struct Lab {
    pub host: Netns,
    pub container: Netns,
    pub outside: Netns,
    pub _servers: Vec<Server>,
}

pub fn lab() -> Lab {
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
        outside,
        _servers: servers,
    }
}

/// The outside namespace's resolver (the guard's upstream) and web server.
pub const RESOLVER: &str = "198.51.100.53";
pub const SITE: &str = "198.51.100.12";
/// What a runtime hands containers when the host's resolver is on loopback
/// (Docker: Google's). A TEST-NET address here: nothing answers it but the
/// guard, through the redirect.
pub const RUNTIME_RESOLVER: &str = "192.0.2.53";
pub const HOST_UPLINK: &str = "198.51.100.1";

pub const DNS_POLICY: &str = r#"
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
pub struct DnsLab {
    pub lab: Lab,
    pub _extra: Vec<Spawned>,
    pub _dot: Server,
}

pub fn dns_lab() -> DnsLab {
    let lab = lab();
    let outside = &lab.outside;
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

pub fn dig(ns: &Netns, args: &[&str]) -> String {
    let time = format!("+time={}", 2 * time_scale());
    let mut a = vec!["+tries=1", time.as_str()];
    a.extend_from_slice(args);
    String::from_utf8_lossy(&ns.cmd("dig", &a).output().expect("dig").stdout).into_owned()
}

/// The HTTP status curl got for `url` through `proxy` ("000": no connection).
pub fn curl_code(ns: &Netns, proxy: &str, url: &str) -> String {
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
pub fn late_container(lab: &Lab, bridge: &str) -> Netns {
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
        &lab.outside,
        &["route", "add", "10.89.0.0/24", "via", HOST_UPLINK],
    );
    late
}

/// The bridge's own address: where a runtime's resolver (podman's
/// aardvark-dns, libvirt's dnsmasq) listens for its containers.
pub const GATEWAY: &str = "10.88.0.1";

/// IPv6 in the lab: the bridge, the container and the uplink get addresses
/// (no duplicate address detection: usable at once), the outside a server
/// address, a resolver address and another one, routes both ways.
pub const GATEWAY6: &str = "fd00:88::1";
pub const CONTAINER6: &str = "fd00:88::2";
pub const HOST_UPLINK6: &str = "2001:db8:100::1";
pub const ALLOWED6: &str = "2001:db8:100::10";
pub const OTHER6: &str = "2001:db8:100::11";
pub const RESOLVER6: &str = "2001:db8:100::53";

pub fn add_ipv6(lab: &Lab) {
    let uplink = format!("vo{}", std::process::id() % 10_000);
    let addr = |ns: &Netns, cidr: &str, dev: &str| {
        ip(ns, &["-6", "addr", "add", cidr, "dev", dev, "nodad"]);
    };
    addr(&lab.host, &format!("{GATEWAY6}/64"), "docker0");
    addr(&lab.host, &format!("{HOST_UPLINK6}/64"), &uplink);
    addr(&lab.container, &format!("{CONTAINER6}/64"), "eth0");
    for a in [ALLOWED6, OTHER6, RESOLVER6] {
        addr(&lab.outside, &format!("{a}/64"), "up0");
    }
    ip(
        &lab.container,
        &["-6", "route", "add", "default", "via", GATEWAY6],
    );
    ip(
        &lab.outside,
        &["-6", "route", "add", "fd00:88::/64", "via", HOST_UPLINK6],
    );
    run_ok(
        &mut lab
            .host
            .cmd("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]),
    );
}

/// `program args` in `ns` with `/etc/resolv.conf` replaced (in a mount
/// namespace of its own) by one naming `nameserver`, written into `dir`:
/// how a runtime hands a container its resolver.
pub fn with_resolver(
    ns: &Netns,
    dir: &std::path::Path,
    nameserver: &str,
    program: &str,
    args: &[&str],
) -> std::process::Command {
    let conf = dir.join(format!("resolv-{}.conf", nameserver.replace(':', "_")));
    std::fs::write(
        &conf,
        format!("nameserver {nameserver}\noptions timeout:2 attempts:1\n"),
    )
    .expect("writing resolv.conf");
    let script = format!(
        "mount --bind {} /etc/resolv.conf && exec \"$@\"",
        conf.display()
    );
    let mut a = vec![
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script.as_str(),
        "sh",
        program,
    ];
    a.extend_from_slice(args);
    ns.cmd("unshare", &a)
}
