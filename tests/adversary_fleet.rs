//! Forged documents in collected events: an unprivileged user writes lines
//! that look exactly like egret's documents into the journal (its stdout
//! stream, as `systemd-cat`, and its syslog socket, as `logger`), claiming a
//! destination of its choosing, so that `egret suggest --from` the exported
//! journal would allow it on every host of the role. A real journald (run
//! privately: its own mount and network namespaces, tmpfs on /run and
//! /var/log) records who wrote each line (`_UID`); egret takes only what root
//! wrote and counts the rest.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const NOBODY: u32 = 65534;
const FORGED_DST: &str = "203.0.113.66";

/// Runs `args` in journald's mount namespace (where its sockets are), as `uid`.
fn in_journal_ns(pid: u32, uid: Option<u32>, args: &[&str]) {
    let mut cmd = Command::new("nsenter");
    cmd.args(["-t", &pid.to_string(), "-m", "--"]);
    if let Some(uid) = uid {
        let id = uid.to_string();
        cmd.args(["setpriv", "--reuid", &id, "--regid", &id, "--clear-groups"]);
    }
    let status = cmd.args(args).status().expect("nsenter");
    assert!(status.success(), "{args:?}");
}

fn journal_json(pid: u32) -> String {
    let out = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-m", "--"])
        .args([
            "journalctl",
            "-D",
            "/run/log/journal",
            "-o",
            "json",
            "--no-pager",
        ])
        .output()
        .expect("journalctl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn documents_another_user_wrote_to_the_journal_are_not_egrets() {
    let pair = Pair::new();
    let policy = PolicyFile::new("mode = \"enforce\"\n");
    let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    let attempt = Attempt::start(&pair.a, Some(NOBODY), &["try-tcp", B4, "8080"]);
    let genuine = daemon.wait_event(10, "blocked :8080", |e| {
        at(e, "/event/action") == "blocked" && at(e, "/destination/port") == 8080
    });
    drop(attempt);
    drop(daemon);
    // The forgery: the same document, to the attacker's destination.
    let mut forged = genuine.clone();
    forged["destination"]["ip"] = Value::from(FORGED_DST);
    forged["destination"]["port"] = Value::from(4444);
    forged["event"]["id"] = Value::from("999999");
    // Short enough for one syslog datagram (logger cuts longer ones).
    let short = serde_json::json!({
        "event": {"module": "egret", "action": "blocked", "id": "999998"},
        "host": genuine["host"].clone(),
        "destination": {"ip": FORGED_DST, "port": 4445},
        "network": {"transport": "tcp"},
        "user": {"id": "65534", "name": "nobody"},
    })
    .to_string();
    let (genuine, forged) = (genuine.to_string(), forged.to_string());

    let (_journald, jpid) = private_journald();
    // Root's stdout stream, as `egret run` under systemd.
    in_journal_ns(
        jpid,
        None,
        &["systemd-cat", "-t", "egret", "printf", "%s\\n", &genuine],
    );
    // The attacker's: a stdout stream and a syslog record, named egret too.
    in_journal_ns(
        jpid,
        Some(NOBODY),
        &["systemd-cat", "-t", "egret", "printf", "%s\\n", &forged],
    );
    in_journal_ns(
        jpid,
        Some(NOBODY),
        &[
            "logger",
            "--socket",
            "/run/systemd/journal/dev-log",
            "-t",
            "egret",
            &short,
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let journal = loop {
        let j = journal_json(jpid);
        if j.matches(FORGED_DST).count() >= 2 && j.contains("\"_UID\":\"0\"") {
            break j;
        }
        assert!(
            Instant::now() < deadline,
            "journald did not file all three: {j}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("journal.jsonl");
    std::fs::write(&file, &journal).unwrap();
    let out = Command::new(egret_bin())
        .args(["suggest", "--from", file.to_str().unwrap()])
        .output()
        .unwrap();
    let (text, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{err}");
    assert!(
        text.contains(&format!("\"{B4}/32\"")),
        "the genuine flow: {text}"
    );
    assert!(
        !text.contains(FORGED_DST),
        "the forged flow was suggested: {text}"
    );
    assert!(
        err.contains("1 egret events")
            && err.contains("2 not written by egret (journal: not root)"),
        "{err}\n{}",
        journal
            .lines()
            .filter(|l| l.contains(FORGED_DST))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
