//! Attacks on the egress proxy, run for real by unprivileged local users
//! (nobody, daemon) with curl and Python against egret in its own namespace:
//! domain fronting with the Host header, a reused source port inheriting
//! another user's verdict, the host's own addresses as SSRF targets, one user
//! taking every local user's connection quota, slow refusals, and descriptor
//! exhaustion.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// "Public" test server (TEST-NET-2) on b's veth.
const WEB: &str = "198.51.100.10";
/// One of the proxy host's own addresses, public like any other.
const OWN: &str = "198.51.100.1";
const PROXY: &str = "http://127.0.0.1:3128";
const NOBODY: u32 = 65534;
const DAEMON: u32 = 1;

/// An HTTP server answering every GET with the Host header(s) it received.
const HOST_ECHO: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = ("host=%s" % self.headers.get_all("Host")).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
s = http.server.ThreadingHTTPServer((sys.argv[1], 80), H)
print("listening", flush=True)
s.serve_forever()
"#;

/// From source port argv[1]: a proxied GET for argv[2]; prints the status
/// code, then closes with a reset (no TIME_WAIT), so the port is free again.
const FROM_PORT: &str = r#"
import socket, struct, sys, time
port, url = int(sys.argv[1]), sys.argv[2]
deadline = time.time() + 10
while True:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        s.connect(("127.0.0.1", 3128))
        break
    except OSError:
        s.close()
        if time.time() > deadline:
            raise
        time.sleep(0.05)
s.settimeout(15)
s.sendall(("GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % url).encode())
line = s.makefile("rb").readline().split(b" ")
print(line[1].decode() if len(line) > 1 else "closed", flush=True)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
"#;

/// Connects and sends nothing; prints the first line the proxy sends (or
/// why none came).
const SILENT: &str = r#"
import socket
s = socket.create_connection(("127.0.0.1", 3128), timeout=60)
try:
    line = s.makefile("rb").readline().decode(errors="replace").strip()
    print(line or "closed", flush=True)
except OSError as e:
    print("no answer: %s" % e, flush=True)
"#;

/// Opens argv[1] connections to the proxy and holds them until stdin closes.
struct Lab {
    pair: Pair,
    _keep: Vec<Spawned>,
    _servers: Vec<Server>,
}

fn lab() -> Lab {
    let pair = Pair::new();
    add_addresses(&pair.a, &[&format!("{OWN}/24")]);
    add_addresses(&pair.b, &[&format!("{WEB}/24")]);
    let records = [
        format!("--host-record=web.test,{WEB}"),
        format!("--host-record=evil.test,{WEB}"),
        format!("--host-record=nobody.test,{WEB}"),
        format!("--host-record=self.test,{OWN}"),
        format!("--host-record=self6.test,{A6}"),
        "--host-record=late.test,198.51.100.3".to_string(),
    ];
    let mut keep = vec![dnsmasq(&pair.b, &[B4], &records)];
    let mut echo = pair
        .b
        .cmd("/usr/bin/python3", &["-c", HOST_ECHO, WEB])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("host echo server");
    let mut line = String::new();
    BufReader::new(echo.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("host echo server");
    assert_eq!(line.trim(), "listening");
    keep.push(Spawned(echo));
    let servers = vec![pair.b.server("tcp", WEB, 7000)];
    Lab {
        pair,
        _keep: keep,
        _servers: servers,
    }
}

const POLICY: &str = r#"
mode = "enforce"

[dns]
upstream = ["10.1.0.2"]

[proxy]
listen = "127.0.0.1:3128"

[[allow]]
name = "web"
hosts = ["web.test", "self.test", "self6.test", "late.test"]
via = "proxy"
ports = [80, 8080]

[[allow]]
name = "echo"
cidrs = ["198.51.100.10"]
ports = [80, 7000]

[[allow]]
name = "nobody-only"
hosts = ["nobody.test"]
via = "proxy"
users = ["nobody"]
ports = [80]
"#;

fn start(lab: &Lab, policy: &PolicyFile) -> Running {
    Running::start(
        &lab.pair.a,
        &policy.state_dir(),
        &["--policy", policy.path()],
    )
}

fn output(mut cmd: std::process::Command) -> String {
    let out = cmd.stderr(Stdio::inherit()).output().expect("client");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// curl through the proxy as `uid`: (status, body).
fn curl(ns: &Netns, uid: u32, args: &[&str]) -> (u16, String) {
    let mut a = vec!["-s", "-m", "10", "-w", "\n%{http_code}", "-x", PROXY];
    a.extend_from_slice(args);
    let text = output(ns.as_user(uid, "curl", &a));
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A CONNECT tunnel held open by `uid` (peer.py proxy-hold); its first line.
struct Tunnel(Child, String);

impl Tunnel {
    fn open(ns: &Netns, uid: Option<u32>, target: &str) -> Tunnel {
        let mut child = ns
            .peer(uid, &["proxy-hold", "127.0.0.1", "3128", target])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("proxy-hold");
        let mut first = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut first)
            .expect("line");
        Tunnel(child, first.trim().to_string())
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Finding 4: the request line names an allowed host, the Host header
/// another site of the same server. The upstream must see the allowed one.
#[test]
fn a_fronted_host_header_never_reaches_the_upstream() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = PolicyFile::new(POLICY);
    let _run = start(&lab, &policy);
    let (code, body) = curl(a, NOBODY, &["http://web.test/"]);
    assert_eq!((code, body.as_str()), (200, "host=['web.test']"));
    let (code, body) = curl(a, NOBODY, &["-H", "Host: evil.test", "http://web.test/"]);
    assert_eq!(
        (code, body.as_str()),
        (200, "host=['web.test']"),
        "the Host header the upstream received"
    );
    // A port other than 80 is kept; an address literal stays a literal.
    let (code, body) = curl(
        a,
        NOBODY,
        &["-H", "Host: evil.test", &format!("http://{WEB}/")],
    );
    assert_eq!(
        (code, body.as_str()),
        (200, format!("host=['{WEB}']").as_str())
    );
    // Two Host headers (a parser disagreement upstream): still only the decided one.
    let (code, body) = curl(
        a,
        NOBODY,
        &[
            "-H",
            "Host: evil.test",
            "-H",
            "Host: evil2.test",
            "http://web.test/",
        ],
    );
    assert_eq!((code, body.as_str()), (200, "host=['web.test']"));
}

/// Finding 5: nobody (allowed by `users`) is answered from source port P and
/// closes; daemon then connects from the same port and must be judged as
/// itself, not get nobody's cached verdict.
#[test]
fn a_reused_source_port_does_not_inherit_another_users_verdict() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = PolicyFile::new(POLICY);
    let run = start(&lab, &policy);
    let port = "41234";
    let first = output(a.as_user(
        NOBODY,
        "/usr/bin/python3",
        &["-c", FROM_PORT, port, "http://nobody.test/"],
    ));
    assert_eq!(first, "200", "nobody is in users");
    let second = output(a.as_user(
        DAEMON,
        "/usr/bin/python3",
        &["-c", FROM_PORT, port, "http://nobody.test/"],
    ));
    assert_eq!(second, "403", "daemon from nobody's old source port");
    let e = run.wait_event(10, "daemon refused", |e| {
        at(e, "/event/action") == "proxy-denied" && at(e, "/user/id") == "1"
    });
    assert_eq!(at(&e, "/rule/name"), "nobody-only", "{e:#}");
}

/// Finding 12: names resolving to this host's own public addresses (v4, v6,
/// and one added after the proxy started) are refused like loopback.
#[test]
fn the_hosts_own_addresses_are_refused_like_loopback() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = PolicyFile::new(POLICY);
    let run = start(&lab, &policy);
    run_ok(&mut a.cmd("ip", &["addr", "add", "198.51.100.3/32", "dev", "lo"]));
    for (name, ip) in [
        ("self.test", OWN),
        ("self6.test", A6),
        ("late.test", "198.51.100.3"),
    ] {
        let (code, body) = curl(a, NOBODY, &[&format!("http://{name}:8080/")]);
        assert_eq!(code, 403, "{name}: {body}");
        let e = run.wait_event(10, name, |e| at(e, "/destination/domain") == name);
        assert_eq!(at(&e, "/destination/ip"), ip, "{e:#}");
        assert!(
            at(&e, "/egret/reason")
                .as_str()
                .unwrap_or("")
                .contains("an address of this host"),
            "{e:#}"
        );
    }
}

/// The proxy's upstream sockets belong to root. With a `cidrs` rule covering
/// loopback, nobody asked the proxy for egret's own API and was served as
/// root (the API checks the uid of the connecting socket). The proxy now
/// refuses egret's own listeners whatever the policy, and reports it.
#[test]
fn the_proxy_never_reaches_egrets_own_listeners() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = PolicyFile::new(&format!(
        "{POLICY}\n[api]\nlisten = \"127.0.0.1:9465\"\n\
         [metrics]\nlisten = \"127.0.0.1:9464\"\n\
         [[allow]]\nname = \"loopback\"\ncidrs = [\"127.0.0.0/8\"]\n"
    ));
    let run = start(&lab, &policy);
    // The API is up, and refuses nobody when asked directly.
    let direct = output(a.as_user(
        NOBODY,
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-m",
            "10",
            "http://127.0.0.1:9465/api/v1/events",
        ],
    ));
    assert_eq!(direct, "403", "nobody asking the API directly");
    let url = "http://127.0.0.1:9465/api/v1/events";
    let (code, body) = curl(a, NOBODY, &[url]);
    assert_eq!(code, 403, "absolute-form through the proxy: {body}");
    assert!(!body.contains("\"events\""), "{body}");
    // A CONNECT tunnel to the API, to the guard and to the proxy itself.
    for target in [
        "127.0.0.1:9465",
        "127.0.0.1:53",
        "127.0.0.1:3128",
        "127.0.0.1:9464",
    ] {
        let t = Tunnel::open(a, Some(NOBODY), target);
        assert!(t.1.contains("403"), "CONNECT {target}: {}", t.1);
    }
    let (code, body) = curl(a, NOBODY, &["-p", url]);
    assert_ne!(code, 200, "tunnelled: {body}");
    let e = run.wait_event(10, "the refusal reported", |e| {
        at(e, "/event/action") == "proxy-denied" && at(e, "/destination/port") == 9465
    });
    assert!(
        at(&e, "/egret/reason")
            .as_str()
            .unwrap_or("")
            .contains("egret itself listens"),
        "{e:#}"
    );
    assert_eq!(at(&e, "/user/id"), "65534", "{e:#}");
    // The rule still works for anything else on loopback.
    let _echo = a.server("tcp", "127.0.0.1", 7000);
    let t = Tunnel::open(a, Some(NOBODY), "127.0.0.1:7000");
    assert_eq!(t.1, "connected");
}

/// Finding 12: `max_per_client` counts local users by uid (root's full quota
/// leaves nobody's untouched), and a connection over the limit is answered at
/// once, without waiting for a request it may never send.
#[test]
fn local_users_have_their_own_quota_and_over_limit_is_refused_at_once() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = PolicyFile::new(&POLICY.replace(
        "listen = \"127.0.0.1:3128\"",
        "listen = \"127.0.0.1:3128\"\nmax_per_client = 2",
    ));
    let _run = start(&lab, &policy);
    let target = format!("{WEB}:7000");
    let t1 = Tunnel::open(a, None, &target);
    let t2 = Tunnel::open(a, None, &target);
    assert_eq!((t1.1.as_str(), t2.1.as_str()), ("connected", "connected"));
    let mine = Tunnel::open(a, Some(NOBODY), &target);
    assert_eq!(mine.1, "connected", "nobody has a quota of its own");
    // Root's third connection sends nothing and still gets its answer.
    let silent = output(a.cmd("/usr/bin/python3", &["-c", SILENT]));
    assert!(silent.starts_with("HTTP/1.1 503"), "{silent}");
}

/// Finding 3: the proxy runs out of descriptors (an unprivileged user holds
/// connections until accept fails with EMFILE), says so once, and serves
/// again once they are released.
#[test]
fn the_proxy_survives_running_out_of_descriptors() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = PolicyFile::new(POLICY);
    let run = start(&lab, &policy);
    let url = format!("http://{WEB}/");
    let mut holder = exhaust_proxy_descriptors(a, &run, NOBODY);
    // Let the error repeat: it must not be logged again.
    std::thread::sleep(Duration::from_millis(500));
    drop(holder.stdin.take());
    let _ = holder.wait();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if curl(a, NOBODY, &[&url]).0 == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not serving again:\n{}",
            run.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, body) = curl(a, NOBODY, &["http://web.test/"]);
    assert_eq!((code, body.as_str()), (200, "host=['web.test']"));
    let log = run.stderr_text();
    assert_eq!(log.matches("proxy: accept:").count(), 1, "said once: {log}");
    // ... and counted every time.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = a.egret_out(&["status", "--json", "--state-dir", &policy.state_dir()]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if find(&status, "accept_errors").is_some_and(|n| n >= 2) {
            break;
        }
        assert!(Instant::now() < deadline, "accept_errors: {status:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The first number under `key` anywhere in `v`.
fn find(v: &serde_json::Value, key: &str) -> Option<u64> {
    match v {
        serde_json::Value::Object(m) => m
            .get(key)
            .and_then(|n| n.as_u64())
            .or_else(|| m.values().find_map(|x| find(x, key))),
        serde_json::Value::Array(a) => a.iter().find_map(|x| find(x, key)),
        _ => None,
    }
}
