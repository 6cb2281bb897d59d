//! The egress proxy end to end: curl and Python clients in one namespace,
//! real HTTP, HTTPS and echo servers and a dnsmasq upstream in another.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// "Public" test servers (TEST-NET-2), on b's veth.
const WEB: &str = "198.51.100.10";
const OTHER: &str = "198.51.100.11";
const PROXY: &str = "http://127.0.0.1:3128";

struct Lab {
    pair: Pair,
    _keep: Vec<Spawned>,
    _servers: Vec<Server>,
    _certs: tempfile::TempDir,
}

fn lab() -> Lab {
    let pair = Pair::new();
    add_addresses(&pair.a, &["198.51.100.1/24"]);
    add_addresses(&pair.b, &[&format!("{WEB}/24"), &format!("{OTHER}/24")]);
    let certs = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    run_ok(
        std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=web.test",
                "-keyout",
                key.to_str().unwrap(),
                "-out",
                cert.to_str().unwrap(),
            ])
            .stderr(Stdio::null()),
    );
    let records = [
        format!("--host-record=web.test,{WEB}"),
        format!("--host-record=other.test,{OTHER}"),
        format!("--host-record=unlisted.test,{OTHER}"),
        format!("--host-record=private.test,{B4}"),
        "--host-record=metadata.test,169.254.169.254".to_string(),
    ];
    let mut keep = vec![dnsmasq(&pair.b, &[B4], &records)];
    for ip in [WEB, OTHER] {
        let http = pair
            .b
            .cmd(
                "/usr/bin/python3",
                &["-m", "http.server", "--bind", ip, "80"],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("http.server");
        keep.push(Spawned(http));
    }
    let https = pair
        .b
        .peer(
            None,
            &[
                "https-server",
                WEB,
                "443",
                cert.to_str().unwrap(),
                key.to_str().unwrap(),
            ],
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("https server");
    let mut https = Spawned(https);
    let mut line = String::new();
    BufReader::new(https.0.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("https");
    keep.push(https);
    let servers = vec![
        pair.b.server("tcp", WEB, 7000),
        pair.b.server("tcp", B4, 7000),
    ];
    // Wait until everything answers (no firewall in b).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(pair.b.tcp_ok(None, WEB, 7000) && http_up(&pair.b, WEB) && http_up(&pair.b, OTHER)) {
        assert!(Instant::now() < deadline, "servers did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    Lab {
        pair,
        _keep: keep,
        _servers: servers,
        _certs: certs,
    }
}

fn http_up(ns: &Netns, ip: &str) -> bool {
    curl(ns, None, &[&format!("http://{ip}/")]).0 == 200
}

/// curl in `ns` (as `uid`), returning (HTTP status, body, pid).
fn curl(ns: &Netns, uid: Option<u32>, args: &[&str]) -> (u16, String, u32) {
    let mut a = vec!["-s", "-k", "-m", "5", "-w", "\n%{http_code}"];
    a.extend_from_slice(args);
    let mut cmd = match uid {
        None => ns.cmd("curl", &a),
        Some(uid) => {
            let (u, g) = (format!("--reuid={uid}"), format!("--regid={uid}"));
            let mut v = vec![u.as_str(), g.as_str(), "--clear-groups", "curl"];
            v.extend_from_slice(&a);
            ns.cmd("setpriv", &v)
        }
    };
    let child = cmd.stdout(Stdio::piped()).spawn().expect("curl");
    let pid = child.id();
    let out = child.wait_with_output().expect("curl output");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string(), pid)
}

fn peer_line(ns: &Netns, args: &[&str]) -> String {
    let out = ns.peer(None, args).output().expect("peer");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A CONNECT tunnel to an echo server, held open until `round_trip`.
struct Tunnel {
    child: Child,
    stdin: Option<ChildStdin>,
    first: String,
}

impl Tunnel {
    fn open(ns: &Netns, target: &str) -> Tunnel {
        let mut child = ns
            .peer(None, &["proxy-hold", "127.0.0.1", "3128", target])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("proxy-hold");
        let mut first = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut first)
            .expect("line");
        let stdin = child.stdin.take();
        Tunnel {
            child,
            stdin,
            first: first.trim().to_string(),
        }
    }

    fn connected(&self) -> bool {
        self.first == "connected"
    }

    fn round_trip(mut self) -> bool {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"go\n");
        }
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const POLICY: &str = r#"
mode = "enforce"

[dns]
upstream = ["10.1.0.2"]

[proxy]
listen = "127.0.0.1:3128"
require_sni = true

[[allow]]
name = "web"
hosts = ["web.test", "private.test", "metadata.test"]
via = "proxy"
ports = [80, 443, 7000]

[[allow]]
name = "admin-only"
hosts = ["other.test"]
via = "proxy"
users = [0]
ports = [80]

[[allow]]
name = "lan"
cidrs = ["10.1.0.2"]
ports = [7000]
"#;

fn start(lab: &Lab, policy: &PolicyFile) -> Running {
    Running::start(
        &lab.pair.a,
        &policy.state_dir(),
        &["--policy", policy.path()],
    )
}

#[test]
fn allowed_hosts_pass_over_http_and_https_and_others_get_403_naming_the_client() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = PolicyFile::new(POLICY);
    let run = start(&lab, &policy);

    assert_eq!(curl(a, None, &["-x", PROXY, "http://web.test/"]).0, 200);
    let (code, body, _) = curl(a, None, &["-x", PROXY, "https://web.test/"]);
    assert_eq!(
        (code, body.as_str()),
        (200, "hello"),
        "CONNECT tunnel to 443"
    );
    // Without the proxy the same server is blocked: via = "proxy" opens no addresses.
    assert_eq!(curl(a, None, &[&format!("http://{WEB}/")]).0, 0);

    let (code, body, pid) = curl(a, None, &["-x", PROXY, "http://nope.test/x"]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("not allowed"), "{body}");
    let e = run.wait_event(10, "proxy-denied nope.test", |e| {
        at(e, "/event/action") == "proxy-denied" && at(e, "/destination/domain") == "nope.test"
    });
    assert_eq!(at(&e, "/process/pid"), pid, "{e:#}");
    assert_eq!(at(&e, "/process/executable"), "/usr/bin/curl");
    assert_eq!(at(&e, "/destination/port"), 80);
    assert_eq!(at(&e, "/rule/name"), "default");
    assert_eq!(at(&e, "/http/request/method"), "GET");
    assert_eq!(at(&e, "/event/dataset"), "egret.proxy");
    assert!(at(&e, "/egret/reason")
        .as_str()
        .unwrap_or("")
        .contains("no rule allows"));
    // HTTP/1.0 clients keep their connection too (ab, old libraries).
    let kept = peer_line(
        a,
        &[
            "proxy-keepalive",
            "127.0.0.1",
            "3128",
            "http://web.test/",
            "5",
        ],
    );
    assert_eq!(kept, "5");
    // A host allowed on other ports only.
    assert_eq!(
        curl(a, None, &["-x", PROXY, "http://web.test:8080/"]).0,
        403
    );
    drop(run);
    let status = String::from_utf8_lossy(
        &run_ok(&mut a.egret(&["status", "--state-dir", &policy.state_dir()])).stdout,
    )
    .into_owned();
    assert!(status.contains("proxy: "), "{status}");
}

#[test]
fn special_purpose_addresses_are_refused_unless_a_cidrs_rule_covers_them() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = PolicyFile::new(POLICY);
    let run = start(&lab, &policy);

    // A host-name rule alone never opens a private address.
    let (code, _, _) = curl(a, None, &["-x", PROXY, "http://private.test/"]);
    assert_eq!(code, 403);
    let e = run.wait_event(10, "private.test refused", |e| {
        at(e, "/destination/domain") == "private.test"
    });
    assert_eq!(at(&e, "/destination/ip"), B4);
    assert_eq!(at(&e, "/rule/name"), "web");
    assert!(
        at(&e, "/egret/reason")
            .as_str()
            .unwrap_or("")
            .contains("RFC 1918"),
        "{e:#}"
    );
    assert_eq!(
        curl(a, None, &["-x", PROXY, "http://metadata.test/"]).0,
        403,
        "link-local metadata address"
    );

    // IP literals: private and mapped forms refused, one covered by a cidrs rule allowed.
    for target in [
        "10.1.0.2:443",
        "169.254.169.254:80",
        "[::ffff:10.1.0.2]:7000",
        "127.0.0.1:22",
    ] {
        let t = Tunnel::open(a, target);
        assert!(t.first.contains("403"), "{target}: {}", t.first);
    }
    let lan = Tunnel::open(a, "10.1.0.2:7000");
    assert!(lan.connected(), "{}", lan.first);
    assert!(lan.round_trip());
    drop(run);
}

#[test]
fn the_tls_server_name_must_match_the_connect_host_when_required() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = PolicyFile::new(POLICY);
    let run = start(&lab, &policy);
    let good = peer_line(
        a,
        &["proxy-tls", "127.0.0.1", "3128", "web.test:443", "web.test"],
    );
    assert!(good.contains("200"), "{good}");
    let fronted = peer_line(
        a,
        &[
            "proxy-tls",
            "127.0.0.1",
            "3128",
            "web.test:443",
            "evil.example",
        ],
    );
    assert_eq!(fronted, "closed");
    let e = run.wait_event(10, "SNI mismatch", |e| {
        at(e, "/egret/reason")
            .as_str()
            .unwrap_or("")
            .contains("does not match")
    });
    assert_eq!(at(&e, "/event/action"), "proxy-denied");
    assert_eq!(at(&e, "/http/request/method"), "CONNECT");
    // Not TLS at all inside a 443 tunnel: closed too.
    let mut t = Tunnel::open(a, "web.test:443");
    assert!(t.connected());
    if let Some(mut s) = t.stdin.take() {
        let _ = s.write_all(b"go\n");
    }
    assert!(
        !t.child.wait().expect("wait").success(),
        "plain bytes into a 443 tunnel"
    );
    drop(run);
}

#[test]
fn a_client_outside_the_rules_users_is_refused() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = PolicyFile::new(POLICY);
    let run = start(&lab, &policy);
    assert_eq!(
        curl(a, None, &["-x", PROXY, "http://other.test/"]).0,
        200,
        "root is in users"
    );
    let (code, _, pid) = curl(a, Some(65534), &["-x", PROXY, "http://other.test/"]);
    assert_eq!(code, 403);
    let e = run.wait_event(10, "nobody refused", |e| {
        at(e, "/event/action") == "proxy-denied" && at(e, "/user/name") == "nobody"
    });
    assert_eq!(at(&e, "/rule/name"), "admin-only");
    assert_eq!(at(&e, "/process/pid"), pid);
    drop(run);
}

/// A `groups` rule matches through the proxy as it does in the kernel: by
/// the client socket's group (the process's gid), not only by its user.
/// (Before, the proxy never knew a client's group: nothing a `groups` rule
/// allowed got through.)
#[test]
fn a_groups_rule_admits_its_group_through_the_proxy_and_no_one_else() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = PolicyFile::new(&format!(
        "{POLICY}\n[[allow]]\nname = \"staff\"\nhosts = [\"unlisted.test\"]\n\
         via = \"proxy\"\ngroups = [65533]\nports = [80]\n"
    ));
    let run = start(&lab, &policy);
    let as_ids = |uid: u32, gid: u32| {
        let (u, g) = (format!("--reuid={uid}"), format!("--regid={gid}"));
        let out = a
            .cmd(
                "setpriv",
                &[
                    &u,
                    &g,
                    "--clear-groups",
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-m",
                    "5",
                    "-w",
                    "%{http_code}",
                    "-x",
                    PROXY,
                    "http://unlisted.test/",
                ],
            )
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(as_ids(65534, 65533), "200", "nobody in group 65533");
    assert_eq!(as_ids(65534, 65534), "403", "nobody in its own group");
    let e = run.wait_event(10, "the other group refused", |e| {
        at(e, "/event/action") == "proxy-denied" && at(e, "/destination/domain") == "unlisted.test"
    });
    assert_eq!(at(&e, "/rule/name"), "staff", "{e:#}");
    drop(run);
}

#[test]
fn reload_keeps_open_tunnels_and_decides_new_requests_by_the_new_policy() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = PolicyFile::new(POLICY);
    let run = start(&lab, &policy);
    let open = Tunnel::open(a, "web.test:7000");
    assert!(open.connected(), "{}", open.first);
    policy.rewrite(&POLICY.replace("ports = [80, 443, 7000]", "ports = [80, 443]"));
    let reloads = run.reloads();
    run.signal("HUP");
    run.wait_reloaded(reloads);
    assert!(
        Tunnel::open(a, "web.test:7000").first.contains("403"),
        "new tunnels follow the new policy"
    );
    assert!(open.round_trip(), "the open tunnel survived the reload");
    drop(run);
}

#[test]
fn malformed_requests_get_400_and_the_proxy_keeps_serving() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = PolicyFile::new(POLICY);
    let run = start(&lab, &policy);
    for raw in [
        "GARBAGE\\r\\n\\r\\n",
        "GET / HTTP/1.1\\r\\nHost: web.test\\r\\n\\r\\n",
        "CONNECT web.test HTTP/1.1\\r\\n\\r\\n",
        "GET https://web.test/ HTTP/1.1\\r\\nHost: web.test\\r\\n\\r\\n",
        "GET http://exa mple/ HTTP/1.1\\r\\n\\r\\n",
    ] {
        let line = peer_line(a, &["proxy-raw", "127.0.0.1", "3128", raw]);
        assert!(line.starts_with("HTTP/1.1 400"), "{raw}: {line}");
    }
    assert_eq!(curl(a, None, &["-x", PROXY, "http://web.test/"]).0, 200);
    drop(run);
}

#[test]
fn audit_mode_lets_requests_through_and_reports_would_block() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = PolicyFile::new(&POLICY.replace("mode = \"enforce\"", "mode = \"audit\""));
    let run = start(&lab, &policy);
    assert_eq!(
        curl(a, None, &["-x", PROXY, "http://unlisted.test/"]).0,
        200
    );
    let e = run.wait_event(10, "would-block unlisted.test", |e| {
        at(e, "/destination/domain") == "unlisted.test"
    });
    assert_eq!(at(&e, "/event/action"), "would-block");
    assert_eq!(at(&e, "/event/dataset"), "egret.proxy");
    drop(run);
}

#[test]
fn connection_limits_and_the_idle_timeout_apply() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = PolicyFile::new(&POLICY.replace(
        "require_sni = true",
        "require_sni = true\nmax_per_client = 2\nidle_timeout = \"1s\"",
    ));
    let run = start(&lab, &policy);
    let t1 = Tunnel::open(a, "web.test:7000");
    let t2 = Tunnel::open(a, "web.test:7000");
    assert!(t1.connected() && t2.connected());
    let third = Tunnel::open(a, "web.test:7000");
    assert!(third.first.contains("503"), "{}", third.first);
    drop(t2);
    std::thread::sleep(Duration::from_millis(1600));
    assert!(!t1.round_trip(), "closed after 1 s without traffic");
    // The slots are free again.
    let again = Tunnel::open(a, "web.test:7000");
    assert!(again.connected(), "{}", again.first);
    assert!(again.round_trip());
    drop(run);
}

/// An upstream that answers `/stall` with a head and 10 of 1,000 body bytes,
/// then nothing, and reads `/upload`'s body without ever answering. Prints
/// "listening", then one line per connection when the proxy closed it.
const STALLING_UPSTREAM: &str = r#"
import socket, sys, threading
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
def serve(c):
    c.settimeout(120)
    head = b""
    try:
        while b"\r\n\r\n" not in head:
            d = c.recv(1)
            if not d:
                return
            head += d
        if head.startswith(b"GET /stall"):
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        while c.recv(4096):
            pass
        print("upstream closed", flush=True)
    except OSError as e:
        print("upstream error %s" % e, flush=True)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// A client through the proxy: `upload` sends a POST head announcing 1,000
/// bytes, trickles 5 of them 0.3 s apart (under the idle timeout), then
/// stalls; `stall` GETs a body the upstream stops sending. Prints what it
/// got and whether the proxy closed the connection (within 60 s).
const TRICKLING_CLIENT: &str = r#"
import socket, sys, time
mode, target = sys.argv[1], sys.argv[2]
s = socket.create_connection(("127.0.0.1", 3128), timeout=60)
if mode == "upload":
    s.sendall(("POST http://%s/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" % target).encode())
    sent = 0
    for _ in range(5):
        time.sleep(0.3)
        s.sendall(b"y")
        sent += 1
else:
    s.sendall(("GET http://%s/stall HTTP/1.1\r\nHost: x\r\n\r\n" % target).encode())
    sent = 0
got = b""
try:
    while True:
        d = s.recv(4096)
        if not d:
            print("closed sent %d got %d" % (sent, len(got)), flush=True)
            break
        got += d
except socket.timeout:
    print("still open after 60 s", flush=True)
except OSError as e:
    print("closed (%s) sent %d got %d" % (e.errno, sent, len(got)), flush=True)
"#;

/// Bodies relayed by the proxy hold a connection only while bytes move: a
/// client that trickles an upload and then stalls, and an upstream that stalls
/// its answer's body, are cut after `idle_timeout` (before: held forever,
/// with the client's connection slot).
#[test]
fn stalled_bodies_are_cut_after_the_idle_timeout() {
    let pair = Pair::new();
    let a = &pair.a;
    let mut upstream = Spawned(
        pair.b
            .cmd("/usr/bin/python3", &["-c", STALLING_UPSTREAM, B4, "7001"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("stalling upstream"),
    );
    let mut lines = BufReader::new(upstream.0.stdout.take().expect("stdout")).lines();
    assert_eq!(
        lines.next().and_then(Result::ok).as_deref(),
        Some("listening")
    );
    let policy = PolicyFile::new(&format!(
        "mode = \"enforce\"\n[proxy]\nlisten = \"127.0.0.1:3128\"\nidle_timeout = \"1s\"\n\
         [[allow]]\nname = \"internal\"\ncidrs = [\"{B4}\"]\nports = [7001]\nvia = \"proxy\"\n"
    ));
    let run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);
    let target = format!("{B4}:7001");
    let client = |mode: &str| {
        let out = a
            .cmd(
                "setpriv",
                &[
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "/usr/bin/python3",
                    "-c",
                    TRICKLING_CLIENT,
                    mode,
                    &target,
                ],
            )
            .output()
            .expect("client");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let upload = client("upload");
    assert!(
        upload.starts_with("closed") && upload.contains("sent 5"),
        "a trickle under the timeout goes on, a stall is cut: {upload}"
    );
    assert_eq!(
        lines.next().and_then(Result::ok).as_deref(),
        Some("upstream closed"),
        "the upstream side of the upload is closed too"
    );
    let stall = client("stall");
    assert!(
        stall.starts_with("closed") && stall.contains("got ") && !stall.ends_with("got 0"),
        "the head and 10 bytes arrived, then the stalled answer was cut: {stall}"
    );
    assert_eq!(
        lines.next().and_then(Result::ok).as_deref(),
        Some("upstream closed")
    );
    drop(run);
}

/// `via = "proxy"` on `cidrs`: an internal service (a private address in
/// another namespace) that the proxy may reach and nothing else may.
#[test]
fn proxy_only_cidrs_are_reached_through_the_proxy_and_never_directly() {
    let pair = Pair::new();
    let a = &pair.a;
    let _echo = pair.b.server("tcp", B4, 7000);
    let _other = pair.b.server("tcp", B4, 7001);
    assert!(a.tcp_ok(None, B4, 7000), "reachable before egret");
    let policy = PolicyFile::new(&format!(
        "mode = \"enforce\"\n[proxy]\nlisten = \"127.0.0.1:3128\"\n\
         [[allow]]\nname = \"internal\"\ncidrs = [\"{B4}\"]\nports = [7000]\nvia = \"proxy\"\n"
    ));
    let run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);

    // Through the proxy, by address, past its SSRF guard for private addresses.
    let t = Tunnel::open(a, &format!("{B4}:7000"));
    assert!(t.connected(), "{}", t.first);
    assert!(t.round_trip());
    // Only the rule's port.
    let t = Tunnel::open(a, &format!("{B4}:7001"));
    assert!(t.first.contains("403"), "{}", t.first);

    // Directly: no kernel rule names the address, for root or anyone.
    assert!(!a.tcp_ok(None, B4, 7000));
    assert!(!a.tcp_ok(Some(65534), B4, 7000));
    let e = run.wait_event(10, "the direct attempt blocked", |e| {
        at(e, "/event/action") == "blocked" && at(e, "/destination/port") == 7000
    });
    assert_eq!(at(&e, "/rule/name"), "default", "{e:#}");
    assert!(
        !a.nft_ruleset().contains(B4),
        "no direct rule names {B4}: {}",
        a.nft_ruleset()
    );
    drop(run);
}
