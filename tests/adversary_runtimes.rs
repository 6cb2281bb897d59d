//! The exception for a runtime's resolver on the bridge (podman's
//! aardvark-dns, libvirt's dnsmasq: a socket bound to the bridge's very
//! address keeps its queries) is no way around the guard for a container:
//! a resolver of the host listening on a wildcard address, or nothing at
//! all on the gateway, over IPv4 or IPv6, and the query goes to the guard,
//! which refuses and reports what no rule allows.

mod bridge_lab;
mod common;

use std::time::{Duration, Instant};

use bridge_lab::*;
use common::*;

const POLICY: &str = r#"
mode = "enforce"
scope = "host+containers"
container_runtime = "/nonexistent/docker.sock"

[dns]
listen = "127.0.0.1:5300"
upstream = ["198.51.100.53"]
container_listen = "[::]:10053"

[[allow]]
name = "web"
hosts = ["allowed.test"]
ports = [8080]
"#;

#[test]
fn a_container_cannot_reach_a_wildcard_resolver_of_the_host_or_skip_the_guard_on_the_gateway() {
    let l = dns_lab();
    let (lab, c) = (&l.lab, &l.lab.container);
    add_ipv6(lab);
    // A resolver of the host on the wildcard address, port 53, answering a
    // name no rule allows (it could as well forward anywhere).
    let _wildcard = Spawned(
        lab.host
            .cmd(
                "dnsmasq",
                &[
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                    "--no-poll",
                    "--port=53",
                    "--user=root",
                    "--pid-file=",
                    "--host-record=secret.test,10.88.0.99",
                ],
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dnsmasq"),
    );
    // Before egret, the container gets its answer from it: the attack works.
    let deadline = Instant::now() + Duration::from_secs(10 * time_scale());
    while dig(c, &[&format!("@{GATEWAY}"), "+short", "secret.test"]).trim() != "10.88.0.99" {
        assert!(
            Instant::now() < deadline,
            "the host's wildcard resolver answers"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let policy = PolicyFile::new(POLICY);
    let run = Running::start(&lab.host, &policy.state_dir(), &["--policy", policy.path()]);
    for (server, transport, name) in [
        (GATEWAY, "+notcp", "secret.test"),
        (GATEWAY, "+tcp", "tcp.secret.test"),
        (GATEWAY6, "+notcp", "v6.secret.test"),
    ] {
        let answer = dig(c, &[&format!("@{server}"), transport, name]);
        assert!(
            answer.contains("status: REFUSED"),
            "@{server} {transport}: {answer}"
        );
        assert!(!answer.contains("10.88.0.99"), "{answer}");
        let e = run.wait_event(10, "the refused query", |e| {
            at(e, "/event/action") == "dns-refused" && at(e, "/dns/question/name") == name
        });
        let source = if server == GATEWAY6 {
            CONTAINER6
        } else {
            CONTAINER
        };
        assert_eq!(at(&e, "/source/ip"), source, "{e:#}");
        assert_eq!(
            at(&e, "/observer/ingress/interface/name"),
            "docker0",
            "{e:#}"
        );
    }
    // The exception's rule matched nothing of this.
    let rules = lab.host.nft_ruleset();
    let keep = rules
        .lines()
        .find(|l| l.contains("iifname \"docker0\"") && l.contains("socket wildcard 0"))
        .unwrap_or_else(|| panic!("{rules}"));
    assert!(keep.contains("counter packets 0 "), "{keep}");
    drop(run);
}
