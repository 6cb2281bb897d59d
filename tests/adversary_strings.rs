//! Attacks with the strings an unprivileged account controls, run for real
//! as `nobody` in a namespace with egret enforcing: megabytes of arguments,
//! a program named with terminal escapes and policy lines, an alert hook that
//! never finishes, and a flood of incidents against the store's bounds.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A blocked connect that stays in SYN-SENT: prints its pid, then waits for
/// stdin to close. Extra arguments are ignored (they are the payload).
const TRY_TCP: &str = "import socket,os,sys\n\
s=socket.socket(socket.AF_INET,socket.SOCK_STREAM)\n\
s.setblocking(False)\n\
s.connect_ex((sys.argv[1],int(sys.argv[2])))\n\
print(os.getpid(),flush=True)\n\
sys.stdin.read()\n";

/// `python` (any copy of it) running TRY_TCP as nobody in `ns`; killed on drop.
fn try_tcp(ns: &Netns, python: &str, port: u16, payload: &[String]) -> (Spawned, u32) {
    let port = port.to_string();
    let mut args = vec![python, "-c", TRY_TCP, B4, &port];
    args.extend(payload.iter().map(String::as_str));
    let mut child = ns
        .as_nobody(args[0], &args[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning the attempt");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("attempt output");
    let pid = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("the attempt printed {line:?}, not its pid"));
    (Spawned(child), pid)
}

fn enforce() -> PolicyFile {
    PolicyFile::new("mode = \"enforce\"\n")
}

fn new_attempt(e: &Value, port: u64) -> bool {
    at(e, "/destination/port") == port && at(e, "/egret/update") == false
}

/// A directory nobody can enter (tempdirs are 0700).
fn open_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// Bytes a terminal acts on: C0 (but newline), DEL, C1 (U+0080..U+009F),
/// bidi overrides.
fn terminal_controls(text: &str) -> Vec<char> {
    text.chars()
        .filter(|&c| {
            (c.is_control() && c != '\n')
                || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        })
        .collect()
}

#[test]
fn a_megabyte_of_arguments_is_cut_at_the_cap_and_marked_truncated() {
    let pair = Pair::new();
    let policy = enforce();
    let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    // 8 arguments of 128,000 bytes: the kernel's per-argument maximum.
    let payload: Vec<String> = (0..8).map(|i| format!("{i}").repeat(128_000)).collect();
    let (_attempt, pid) = try_tcp(&pair.a, "/usr/bin/python3", 7101, &payload);
    let e = daemon.wait_event(20, "for the attempt", |e| new_attempt(e, 7101));
    assert_eq!(at(&e, "/process/pid"), pid, "attributed to the attempt");
    let line = serde_json::to_string(&e).unwrap();
    assert!(
        line.len() < 64 * 1024,
        "an event line is {} bytes",
        line.len()
    );
    let cmd = at(&e, "/process/command_line")
        .as_str()
        .expect("command line");
    assert!(cmd.len() <= 4096, "command line of {} bytes", cmd.len());
    assert!(
        cmd.contains(TRY_TCP.lines().next().unwrap()),
        "its start is kept"
    );
    let truncated: Vec<&str> = at(&e, "/egret/truncated")
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert_eq!(truncated, ["process.command_line"], "{e:#}");
    // The store holds the same bounded document (written on the next tick).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stored = pair
            .a
            .egret_ok(&["events", "--json", "--state-dir", &policy.state_dir()]);
        assert!(stored.lines().all(|l| l.len() < 64 * 1024));
        if stored.contains("\"truncated\":[\"process.command_line\"]") {
            break;
        }
        assert!(Instant::now() < deadline, "not stored: {stored}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A copy of python3 named with an OSC title sequence, a newline and a policy
/// rule, in a directory nobody can run it from.
fn hostile_python(dir: &Path) -> PathBuf {
    let name =
        "x\u{1b}]0;owned\u{7}\u{9b}31m\u{202e}\n[[allow]]\nname = \"pwn\"\nprotocol = \"any\"\n#";
    let path = dir.join(name);
    std::fs::copy(
        std::fs::canonicalize("/usr/bin/python3").expect("python3"),
        &path,
    )
    .expect("copying python3");
    path
}

/// `egret events --follow` in `ns` until its output contains `want` (or the
/// deadline); then it is killed.
fn follow_until(ns: &Netns, state: &str, want: &str, secs: u64) -> String {
    let mut child = Spawned(
        ns.egret(&[
            "events",
            "--follow",
            "--api",
            "127.0.0.1:9465",
            "--state-dir",
            state,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("egret events --follow"),
    );
    let out = child.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut text = String::new();
    while !text.contains(want) && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            text.push_str(&line);
            text.push('\n');
        }
    }
    text
}

#[test]
fn a_program_named_with_terminal_escapes_is_printed_escaped_and_suggests_no_extra_rule() {
    let pair = Pair::new();
    let policy = PolicyFile::new("mode = \"enforce\"\n[api]\nlisten = \"127.0.0.1:9465\"\n");
    let dir = open_dir();
    let python = hostile_python(dir.path());
    let python = python.to_str().expect("utf-8");
    let state = policy.state_dir();
    let daemon = Running::start(&pair.a, &state, &["--policy", policy.path()]);
    let (_attempt, pid) = try_tcp(&pair.a, python, 7102, &[]);
    let e = daemon.wait_event(20, "for the attempt", |e| new_attempt(e, 7102));
    assert_eq!(at(&e, "/process/pid"), pid);
    assert_eq!(
        at(&e, "/process/executable"),
        python,
        "JSON keeps the name exact"
    );
    // Stored, then pushed live: both through the follower's printer.
    let (_again, _) = std::thread::scope(|s| {
        let follower = s.spawn(|| follow_until(&pair.a, &state, ":7202", 30));
        std::thread::sleep(Duration::from_millis(500));
        let again = try_tcp(&pair.a, python, 7202, &[]);
        let text = follower.join().expect("follower");
        assert!(text.contains(":7202"), "the live event never came: {text}");
        check_human_output("events --follow", &text);
        again
    });
    drop(daemon);

    for args in [
        vec!["events", "--state-dir", &state],
        vec!["top", "--state-dir", &state],
    ] {
        let out = pair.a.egret_out(&args);
        check_human_output(&args.join(" "), &String::from_utf8_lossy(&out.stdout));
    }

    let suggested = pair.a.egret_ok(&["suggest", "--state-dir", &state]);
    assert_eq!(
        terminal_controls(&suggested),
        Vec::<char>::new(),
        "{suggested}"
    );
    assert!(
        !suggested.lines().any(|l| l.trim() == "name = \"pwn\""),
        "a line of the program's name became policy: {suggested}"
    );
    let file = PolicyFile::new(&suggested);
    let check = pair.a.egret_out(&["check", file.path()]);
    assert!(
        check.status.success(),
        "the suggestion does not pass check: {}\n{suggested}",
        String::from_utf8_lossy(&check.stderr)
    );
    let rules = suggested
        .lines()
        .filter(|l| l.trim() == "[[allow]]")
        .count();
    assert_eq!(rules, 1, "one rule, for the one identity seen: {suggested}");
}

fn check_human_output(what: &str, text: &str) {
    assert!(
        text.contains("\\x1b]0;owned\\x07"),
        "`egret {what}` shows the name, escaped: {text}"
    );
    assert_eq!(
        terminal_controls(text),
        Vec::<char>::new(),
        "`egret {what}` printed raw control characters: {text:?}"
    );
    assert!(
        !text.lines().any(|l| l.starts_with("[[allow]]")),
        "`egret {what}` printed a line of the attacker's: {text}"
    );
}

fn alive(pid: u32) -> bool {
    // A zombie has exited; only its parent's wait is missing.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn read_pid(file: &Path, secs: u64) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(pid) = std::fs::read_to_string(file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "{} never written",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_exec_hook_that_never_reads_nor_exits_is_ended_with_its_children_and_the_next_alert_arrives() {
    let pair = Pair::new();
    let dir = open_dir();
    let d = dir.path().display();
    // The first run stalls: it never reads its stdin, starts a child that
    // sleeps and sleeps itself. Later runs deliver.
    let hook = dir.path().join("hook.sh");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\n\
             if [ -e {d}/stalled ]; then cat >> {d}/delivered; exit 0; fi\n\
             touch {d}/stalled\n\
             sleep 600 &\n\
             echo $! > {d}/grandchild\n\
             echo $$ > {d}/hook\n\
             sleep 600\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let policy = PolicyFile::new(&format!(
        "mode = \"enforce\"\n[[alerts]]\nname = \"hook\"\ntype = \"exec\"\n\
         command = [\"{}\"]\ntimeout = \"1s\"\nretries = 0\nmin_severity = \"low\"\n",
        hook.display()
    ));
    let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    // A long command line makes a document bigger than the first write.
    let payload = vec!["p".repeat(3_000)];
    let _first = try_tcp(&pair.a, "/usr/bin/python3", 7103, &payload);
    let hook_pid = read_pid(&dir.path().join("hook"), 20);
    let grandchild = read_pid(&dir.path().join("grandchild"), 20);
    let deadline = Instant::now() + Duration::from_secs(60);
    while alive(hook_pid) || alive(grandchild) {
        assert!(
            Instant::now() < deadline,
            "after the 1 s timeout the hook (pid {hook_pid}, alive {}) or its child (pid {grandchild}, alive {}) still runs",
            alive(hook_pid),
            alive(grandchild)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    daemon.wait_event(20, "alert-failed for the stalled hook", |e| {
        at(e, "/event/action") == "alert-failed"
    });
    let _second = try_tcp(&pair.a, "/usr/bin/python3", 7104, &[]);
    let delivered = dir.path().join("delivered");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&delivered).unwrap_or_default();
        if text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|v| at(&v, "/destination/port") == 7104)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the next alert never arrived: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn rows(state_dir: &str, table: &str) -> i64 {
    let db = Path::new(state_dir).join("events.db");
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("opening the store");
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .expect("counting rows")
}

#[test]
fn retention_holds_within_a_minute_under_a_flood_of_incidents_and_seen_is_capped() {
    let pair = Pair::new();
    let policy = enforce();
    let state = policy.state_dir();
    let daemon = Running::start(
        &pair.a,
        &state,
        &[
            "--policy",
            policy.path(),
            "--max-events",
            "100",
            "--max-seen",
            "50",
        ],
    );
    // 2,112 blocked datagrams to 2,112 ports: 2,112 incidents, 2,112 new
    // (identity, destination) pairs. Spread over 22 uids of 96 each, so that
    // no sender passes its flood rate (100 new incidents at once) and every
    // datagram is an incident of its own.
    let flood = "import socket,sys\n\
s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
first=int(sys.argv[2])\n\
for p in range(first,first+96):\n\
\x20   try: s.sendto(b'x',(sys.argv[1],p))\n\
\x20   except OSError: pass\n";
    for u in 0..22u32 {
        let (reuid, regid) = (
            format!("--reuid={}", 60000 + u),
            format!("--regid={}", 60000 + u),
        );
        let first = (20000 + u * 96).to_string();
        run_ok(&mut pair.a.cmd(
            "setpriv",
            &[
                &reuid,
                &regid,
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
                flood,
                B4,
                &first,
            ],
        ));
    }
    daemon.wait_event(30, "for the last datagram", |e| new_attempt(e, 22111));
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (events, seen) = (rows(&state, "events"), rows(&state, "seen"));
        if events <= 100 && seen <= 50 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the store still holds {events} events (max 100) and {seen} seen pairs (max 50)"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        daemon.snapshot().len() >= 2_000,
        "the flood made its incidents"
    );
}
