//! Attacks on the proxy's tunnel relay (src/proxy/relay.rs), run for real by
//! unprivileged local users with Python against egret in its own namespace:
//! one user exhausting the proxy's descriptors while another's tunnel moves
//! bulk data (which splice(2) needs a pipe for), and bulk tunnels of several
//! users at once, twice over, so that pipes are reused between tunnels.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Stdio};

use common::*;

/// "Public" test server (TEST-NET-2) on b's veth: a TCP echo server on :7000.
const WEB: &str = "198.51.100.10";
const NOBODY: u32 = 65534;
const DAEMON: u32 = 1;

const POLICY: &str = r#"
mode = "enforce"

[proxy]
listen = "127.0.0.1:3128"

[[allow]]
name = "echo"
cidrs = ["198.51.100.10"]
ports = [7000]
"#;

/// CONNECT to argv[2] through the proxy on 127.0.0.1:argv[1]; prints
/// "connected", waits for a line on stdin, then sends argv[3] pseudo-random
/// bytes (seed argv[4]) while reading the echo; prints "echoed N ok" when it
/// got back exactly what it sent, "echoed N mismatch" otherwise.
const BULK: &str = r#"
import random, socket, sys, threading
port, target, total, seed = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.create_connection(("127.0.0.1", port), timeout=30)
s.sendall(("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target)).encode())
head = b""
while b"\r\n\r\n" not in head:
    c = s.recv(1)
    if not c:
        break
    head += c
status = head.split(b"\r\n", 1)[0].decode(errors="replace")
if " 200" not in status:
    print(status or "closed", flush=True)
    sys.exit(0)
print("connected", flush=True)
sys.stdin.readline()
data = random.Random(seed).randbytes(total)
def send():
    try:
        for i in range(0, total, 1 << 16):
            s.sendall(data[i:i + (1 << 16)])
    except OSError:
        pass
threading.Thread(target=send, daemon=True).start()
got = bytearray()
try:
    while len(got) < total:
        c = s.recv(1 << 16)
        if not c:
            break
        got += c
except OSError:
    pass
print("echoed %d %s" % (len(got), "ok" if bytes(got) == data else "mismatch"), flush=True)
"#;

/// Opens argv[1] connections to the proxy and holds them until stdin closes.
struct Lab {
    pair: Pair,
    _servers: Vec<Server>,
}

fn lab() -> Lab {
    let pair = Pair::new();
    // a reaches the server's /24 on the link.
    add_addresses(&pair.a, &["198.51.100.1/24"]);
    add_addresses(&pair.b, &[&format!("{WEB}/24")]);
    let servers = vec![pair.b.server("tcp", WEB, 7000)];
    Lab {
        pair,
        _servers: servers,
    }
}

/// A bulk echo client (BULK) of `uid`, connected and waiting for `go`.
struct Bulk {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Bulk {
    fn connect(ns: &Netns, uid: u32, bytes: usize, seed: u32) -> Bulk {
        let target = format!("{WEB}:7000");
        let (bytes, seed) = (bytes.to_string(), seed.to_string());
        let mut child = ns
            .as_user(
                uid,
                "/usr/bin/python3",
                &["-c", BULK, "3128", &target, &bytes, &seed],
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("bulk client");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("bulk client");
        assert_eq!(line.trim(), "connected", "tunnel of uid {uid}");
        Bulk { child, out }
    }

    fn go(&mut self) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(b"go\n").expect("go");
        stdin.flush().expect("go");
    }

    /// Its verdict line ("echoed N ok" when every byte came back intact).
    fn result(mut self) -> String {
        let mut line = String::new();
        self.out.read_line(&mut line).expect("bulk client");
        let _ = self.child.wait();
        line.trim().to_string()
    }
}

impl Drop for Bulk {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A user who holds every descriptor the proxy can get (connections it never
/// finishes) must not cut another user's open tunnel when it turns to bulk:
/// splicing needs a pipe (two descriptors), and with none to be had the
/// burst is copied instead of the tunnel failing.
#[test]
fn a_tunnel_keeps_moving_bulk_data_while_another_user_exhausts_the_proxys_descriptors() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = PolicyFile::new(POLICY);
    let run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);
    // The victim's tunnel is open (and has moved nothing yet, so no pipe).
    let mut victim = Bulk::connect(a, NOBODY, 4 << 20, 1);
    let mut holder = exhaust_proxy_descriptors(a, &run, DAEMON);
    victim.go();
    let result = victim.result();
    drop(holder.stdin.take());
    let _ = holder.wait();
    assert_eq!(
        result,
        format!("echoed {} ok", 4 << 20),
        "egret:\n{}",
        run.stderr_text()
    );
}

/// Bulk tunnels of two users at once, in two rounds: pipes are handed from
/// one tunnel to the next, and no byte of one tunnel may reach another.
#[test]
fn concurrent_bulk_tunnels_get_back_exactly_their_own_bytes() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = PolicyFile::new(POLICY);
    let _run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);
    for round in 0..2u32 {
        let mut clients: Vec<Bulk> = [NOBODY, DAEMON, NOBODY, DAEMON]
            .iter()
            .enumerate()
            .map(|(i, &uid)| Bulk::connect(a, uid, 3 << 20, round * 10 + i as u32))
            .collect();
        for c in &mut clients {
            c.go();
        }
        for (i, c) in clients.into_iter().enumerate() {
            assert_eq!(
                c.result(),
                format!("echoed {} ok", 3 << 20),
                "round {round}, client {i}"
            );
        }
    }
}
