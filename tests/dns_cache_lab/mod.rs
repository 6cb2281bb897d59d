//! The lab of tests/dns_cache.rs and tests/adversary_dns_cache.rs: egret's
//! namespace with a local cache behind the guard, and another namespace with
//! the world's resolvers (a default one and the split domain's) and servers.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use crate::common::*;

pub const ALLOWED4: &str = "10.1.0.10";
pub const OTHER4: &str = "10.1.0.11";
pub const DB4: &str = "10.1.0.12";
/// The upstream that serves `corp.test` only (the cache's split domain).
pub const CORP_NS: &str = "10.1.0.3";
pub const PORT: u16 = 8080;
/// Where the cache listens in egret's namespace.
pub const CACHE: &str = "127.0.0.2";

pub const POLICY: &str = r#"
mode = "enforce"

[dns]
listen = "127.0.0.1:53"
upstream = ["127.0.0.2"]

[[allow]]
name = "web"
hosts = ["allowed.test", "db.corp.test", "fresh.test"]
ports = [8080]
"#;

pub struct Lab {
    pub pair: Pair,
    _upstreams: Vec<Spawned>,
    _servers: Vec<Server>,
    pub dir: tempfile::TempDir,
}

/// The world: the default upstream on B4 (knows *.test but not corp.test),
/// the corp upstream on CORP_NS (knows db.corp.test only), and echo
/// servers on the names' addresses.
pub fn lab() -> Lab {
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
pub fn cache(ns: &Netns, listen: &[&str], extra: &[&str]) -> Spawned {
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
pub fn wait_answers(ns: &Netns, server: &str, name: &str, want: &str) {
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
pub fn wait_listening(ns: &Netns, addr: &str) {
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
    pub fn resolv_conf(&self, nameserver: &str) -> String {
        write_resolv_conf(self.dir.path(), nameserver, None)
    }

    /// The glibc client as nobody in egret's namespace, with `resolv_conf` as its
    /// /etc/resolv.conf (bind-mounted in a mount namespace of its own).
    pub fn program(&self, resolv_conf: &str, name: &str) -> (u32, String) {
        glibc_client(&self.pair.a, resolv_conf, name, PORT)
    }
}

/// The packet count of the output rule whose comment is `comment`.
pub fn rule_packets(ns: &Netns, comment: &str) -> u64 {
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

pub const CACHE_QUERIES: &str = "dns guard: its local cache's upstream queries";
