//! Attacks on the DNS guard's upstream exchange, run for real: a local
//! unprivileged user who can see the guard's upstream socket in
//! /proc/net/udp (any user can) answers for the upstream, every possible
//! query id, while the real upstream is slow. A forged answer that were
//! taken would put an address of the attacker's choosing into the kernel's
//! allow set. The guard's socket is connected to the upstream, so the kernel
//! delivers only datagrams from the upstream's address and port, which an
//! unprivileged user cannot send from.

mod common;

use std::process::Stdio;

use common::*;

const REAL4: &str = "10.1.0.10";
const FORGED4: &str = "10.1.0.66";
const PORT: u16 = 8080;

/// An upstream in `b` that answers `slow.test A` with REAL4 after a delay:
/// the window in which the attacker answers first.
const SLOW_UPSTREAM: &str = r#"
import socket, struct, sys, threading, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
print("listening", flush=True)
def answer(q, peer):
    time.sleep(float(sys.argv[3]))
    end = 12
    while q[end] != 0:
        end += 1 + q[end]
    question = q[12:end + 5]
    head = q[:2] + struct.pack(">HHHHH", 0x8180, 1, 1, 0, 0)
    rr = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton(sys.argv[2])
    s.sendto(head + question + rr, peer)
while True:
    q, peer = s.recvfrom(4096)
    threading.Thread(target=answer, args=(q, peer), daemon=True).start()
"#;

/// The attacker, as nobody: waits for a root-owned UDP socket other than the
/// guard's listener (the guard's upstream query), then sends it a forged
/// answer for every query id, claiming `slow.test` is at FORGED4. Prints how
/// many sockets and datagrams it aimed.
const ATTACKER: &str = r#"
import socket, struct, sys, time
forged = sys.argv[1]
name = b"".join(bytes([len(l)]) + l for l in b"slow.test".split(b".")) + b"\0"
def targets():
    out = set()
    for line in open("/proc/net/udp").readlines()[1:]:
        f = line.split()
        ip, port = f[1].split(":")
        if f[7] == "0" and int(port, 16) != 53:
            a = socket.inet_ntoa(struct.pack("<I", int(ip, 16)))
            out.add(("127.0.0.1" if a == "0.0.0.0" else a, int(port, 16)))
    return out
deadline = time.time() + 20
found = set()
while time.time() < deadline and not found:
    found = targets()
    time.sleep(0.005)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent = 0
for target in found:
    for qid in range(65536):
        msg = (struct.pack(">HHHHHH", qid, 0x8180, 1, 1, 0, 0) + name + struct.pack(">HH", 1, 1)
               + b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 3600, 4) + socket.inet_aton(forged))
        try:
            s.sendto(msg, target)
            sent += 1
        except OSError:
            pass
print(len(found), sent, flush=True)
"#;

#[test]
fn a_local_user_cannot_answer_for_the_upstream() {
    let pair = Pair::new();
    let (a, b) = (&pair.a, &pair.b);
    add_addresses(b, &[&format!("{REAL4}/24"), &format!("{FORGED4}/24")]);
    let _servers: Vec<Server> = [REAL4, FORGED4]
        .iter()
        .map(|h| b.server("tcp", h, PORT))
        .collect();
    // The real answer comes after 1.5 s: inside the 2 s the guard waits on
    // UDP before it tries TCP (which this upstream does not serve), and long
    // enough for 65,536 forged datagrams here.
    let delay = "1.5";
    let mut upstream = b
        .cmd("/usr/bin/python3", &["-c", SLOW_UPSTREAM, B4, REAL4, delay])
        .stdout(Stdio::piped())
        .spawn()
        .expect("upstream");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(upstream.stdout.as_mut().expect("stdout")),
        &mut line,
    )
    .expect("upstream output");
    assert_eq!(line.trim(), "listening");
    let _upstream = Spawned(upstream);

    let policy = PolicyFile::new(&format!(
        r#"
mode = "enforce"

[dns]
listen = "127.0.0.1:53"
upstream = ["{B4}"]

[[allow]]
name = "web"
hosts = ["slow.test"]
ports = [{PORT}]
"#
    ));
    let _run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);

    let attacker = a
        .as_nobody("/usr/bin/python3", &["-c", ATTACKER, FORGED4])
        .stdout(Stdio::piped())
        .spawn()
        .expect("attacker");
    let time = format!("+time={}", 5 * time_scale());
    let answer = a
        .as_nobody(
            "dig",
            &["+tries=1", &time, "+short", "@127.0.0.1", "slow.test"],
        )
        .output()
        .expect("dig");
    let aimed = attacker.wait_with_output().expect("attacker");
    let aimed = String::from_utf8_lossy(&aimed.stdout);
    let counts: Vec<u64> = aimed
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(
        counts.len() == 2 && counts[0] >= 1 && counts[1] >= 65_536,
        "the attacker never found the guard's upstream socket: {aimed}"
    );

    // The client got the upstream's answer, and only its address is open.
    assert_eq!(
        String::from_utf8_lossy(&answer.stdout).trim(),
        REAL4,
        "{answer:?}"
    );
    let set = String::from_utf8_lossy(
        &run_ok(&mut a.cmd("nft", &["list", "set", "inet", "egret", "h_web_v4"])).stdout,
    )
    .into_owned();
    assert!(set.contains(REAL4), "{set}");
    assert!(!set.contains(FORGED4), "a forged answer was taken: {set}");
    // In the kernel before the answer left: open at once.
    assert!(a.tcp_ok(None, REAL4, PORT));
    assert!(!a.tcp_ok(None, FORGED4, PORT));
}
