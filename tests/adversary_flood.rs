//! Floods from the unprivileged service account (uid 65534), run for real in
//! a test namespace: refused DNS names and blocked UDP by the ten thousand.
//! What must hold: nothing is dropped without being counted in the books,
//! one identity's flood folds into a flood incident while another identity's
//! first attempt still goes out, and SIGTERM in the middle of it stops egret
//! with its books intact.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const NOBODY: u32 = 65534;
/// Another unprivileged uid (no passwd entry needed).
const OTHER: u32 = 65533;

fn flood_script() -> String {
    support_script("flood.py").to_string_lossy().into_owned()
}

/// tests/support/flood.py as `uid` in `ns`.
fn flood(ns: &Netns, uid: u32, args: &[&str]) -> Command {
    let (reuid, regid) = (format!("--reuid={uid}"), format!("--regid={uid}"));
    let script = flood_script();
    let mut a = vec![
        reuid.as_str(),
        regid.as_str(),
        "--clear-groups",
        "/usr/bin/python3",
        script.as_str(),
    ];
    a.extend_from_slice(args);
    ns.cmd("setpriv", &a)
}

const DNS_POLICY: &str = r#"
mode = "enforce"

[dns]
listen = "127.0.0.1:53"
upstream = ["192.0.2.53"]

[[allow]]
name = "web"
hosts = ["allowed.test"]
ports = [443]
"#;

/// (action, uid, sum of counts, incidents) per action and uid, from the store.
fn stored(state_dir: &str) -> Vec<(String, Option<u32>, u64, u64)> {
    let db = rusqlite::Connection::open(format!("{state_dir}/events.db")).expect("events.db");
    let mut stmt = db
        .prepare("SELECT action, doc, count FROM events")
        .expect("query");
    let rows: Vec<(String, String, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("rows")
        .map(|r| r.expect("row"))
        .collect();
    let mut out: Vec<(String, Option<u32>, u64, u64)> = Vec::new();
    for (action, doc, count) in rows {
        let doc: Value = serde_json::from_str(&doc).expect("stored document");
        let uid = at(&doc, "/user/id").as_str().and_then(|u| u.parse().ok());
        match out
            .iter_mut()
            .find(|(a, u, _, _)| *a == action && *u == uid)
        {
            Some(e) => {
                e.2 += count as u64;
                e.3 += 1;
            }
            None => out.push((action, uid, count as u64, 1)),
        }
    }
    out
}

fn sum(rows: &[(String, Option<u32>, u64, u64)], action: &str, uid: Option<u32>) -> (u64, u64) {
    rows.iter()
        .filter(|(a, u, _, _)| a == action && (uid.is_none() || *u == uid))
        .fold((0, 0), |(c, n), r| (c + r.2, n + r.3))
}

/// `egret status --json`'s books of the run in `state_dir`.
fn monitor(ns: &Netns, state_dir: &str) -> Value {
    let out = ns.egret_out(&["status", "--json", "--state-dir", state_dir]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("status --json");
    v["monitor"].clone()
}

/// Waits for `egret run` to exit on its own (bounded, generous for slow kernels).
fn wait_exit(run: &mut Running, secs: u64) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = run.try_wait() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "egret run did not stop within {secs} s of SIGTERM:\n{}",
            run.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// 20,000 unique refused names from one process as nobody: every refusal the
/// guard made is an incident's count or counted as lost, and `egret status`
/// says so. (Without counted handoffs, 17,208 of 20,000 arrived and status
/// said `lost 0`.)
#[test]
fn refused_name_flood_books_balance_exactly() {
    let ns = Netns::new();
    let policy = PolicyFile::new(DNS_POLICY);
    let state = policy.state_dir();
    let run = Running::start(&ns, &state, &["--policy", policy.path()]);

    const N: u64 = 20_000;
    let out = flood(&ns, NOBODY, &["dns", "127.0.0.1", "53", &N.to_string()])
        .output()
        .expect("flood.py");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        said.trim(),
        format!("sent {N} answered {N} refused {N}"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(run.stop().success());

    let m = monitor(&ns, &state);
    // (Books without the field counted no drops.)
    let dropped = m["loss"]["dns_dropped"].as_u64().unwrap_or(0);
    let rows = stored(&state);
    let (incident_counts, _) = sum(&rows, "dns-refused", Some(NOBODY));
    let (flood_counts, floods) = sum(&rows, "flood", Some(NOBODY));
    assert_eq!(
        incident_counts + flood_counts + dropped,
        N,
        "incidents + counted drops == sent: {rows:?} {m:#}"
    );
    assert_eq!(
        m["dns_guard"]["refused"].as_u64(),
        Some(N),
        "the final books keep the guard's count: {m:#}"
    );
    assert!(m["lost"].as_u64().unwrap_or(0) >= dropped, "{m:#}");
    let human = ns.egret_ok(&["status", "--state-dir", &state]);
    assert!(
        human.contains(&format!("lost {}", m["lost"])),
        "status says what was lost: {human}"
    );
    if dropped > 0 {
        assert!(
            human.contains(&format!("{dropped} refused DNS queries")),
            "{human}"
        );
        let (_, losses) = sum(&rows, "data-loss", None);
        assert!(losses >= 1, "a data-loss event for the drops: {rows:?}");
    }
    // The flood showed as what it is.
    assert!(floods >= 1, "{rows:?}");
}

/// Identity A (python3 as nobody) sends to 10,000 distinct blocked
/// destinations; meanwhile identity B (another uid) makes one blocked
/// attempt. B's incident goes out while A is still flooding; A's flood is
/// one (or a few) flood incidents whose counts add up, not 10,000 incidents.
#[test]
fn one_identitys_flood_is_folded_and_another_identity_is_still_heard() {
    let pair = Pair::new();
    let a = &pair.a;
    let policy = PolicyFile::new("mode = \"enforce\"\n");
    let state = policy.state_dir();
    let run = Running::start(a, &state, &["--policy", policy.path()]);

    const N: u64 = 10_000;
    let mut flooder = Spawned(
        flood(a, NOBODY, &["udp", B4, &N.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("flood.py"),
    );
    let mut lines = BufReader::new(flooder.0.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("half"));
    // A is still sending (a new destination every 10 ms) until told to go on.
    run.wait_event(60, "A's flood incident", |e| {
        at(e, "/event/action") == "flood" && at(e, "/user/id") == "65534"
    });
    let b = flood(a, OTHER, &["udp-one", B4, "40000"])
        .output()
        .expect("flood.py udp-one");
    assert_eq!(String::from_utf8_lossy(&b.stdout).trim(), "refused");
    let seen_b = run.wait_event(60, "B's first attempt", |e| {
        at(e, "/event/action") == "blocked" && at(e, "/user/id") == "65533"
    });
    assert_eq!(at(&seen_b, "/destination/port"), 40000);
    assert_eq!(
        at(&seen_b, "/egret/update"),
        false,
        "B's own first incident"
    );
    // A has not finished: B was heard during A's flood, not after it.
    assert!(
        flooder.0.try_wait().expect("flood.py").is_none(),
        "A's flood ran out before B was heard"
    );
    let mut stdin = flooder.0.stdin.take().expect("stdin");
    writeln!(stdin, "go").expect("telling A to finish");
    let done = lines.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(
        done,
        format!("done {N}"),
        "every send was refused by the firewall"
    );
    assert!(flooder.0.wait().expect("flood.py").success());
    assert!(run.stop().success());

    let m = monitor(a, &state);
    let rows = stored(&state);
    let (a_counts, a_incidents) = sum(&rows, "blocked", Some(NOBODY));
    let (flood_counts, floods) = sum(&rows, "flood", Some(NOBODY));
    assert!(
        (1..=5).contains(&floods),
        "A's flood is one or a few flood incidents: {rows:?}"
    );
    assert!(
        a_incidents <= 400,
        "A's burst and no more went out one by one ({a_incidents}): {rows:?}"
    );
    // The books balance: every packet received is in an incident's count,
    // every one logged and not received is counted as lost (also those
    // still in the socket when egret stopped).
    let n = |p: &str| m.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    let lost = n("/loss/seq_lost") + n("/loss/unaccounted") + n("/loss/while_down");
    let all: u64 = rows
        .iter()
        .filter(|r| r.0 == "blocked" || r.0 == "flood")
        .map(|r| r.2)
        .sum();
    assert_eq!(all, n("/loss/received"), "{rows:?} {m:#}");
    assert_eq!(
        n("/loss/received") + lost,
        n("/loss/kernel_logged"),
        "{m:#}"
    );
    assert!(
        a_counts + flood_counts <= N && a_counts + flood_counts + lost >= N,
        "A's counts add up: {a_counts} + {flood_counts} (+ {lost} lost) of {N}: {m:#}"
    );
    assert_eq!(sum(&rows, "blocked", Some(OTHER)), (1, 1), "{rows:?}");
}

/// One account (nobody) under 40 program names (hard links of python3, each
/// its own identity, each within its own 100-incident burst) sends to 50
/// blocked destinations per name. The account as a whole gets its own burst
/// and rate (300, then 30/s) and the rest folds into a flood incident of the
/// uid, not one per name; another account's first attempt still goes out at
/// once. (Before: every copy had a fresh bucket, so 2,000 incidents.)
#[test]
fn renamed_copies_of_one_program_share_their_accounts_budget() {
    let pair = Pair::new();
    let a = &pair.a;
    let policy = PolicyFile::new("mode = \"enforce\"\n");
    let state = policy.state_dir();
    let run = Running::start(a, &state, &["--policy", policy.path()]);

    const COPIES: usize = 40;
    const PER_COPY: usize = 50;
    // Hard links (copies across file systems): /proc/PID/exe names the
    // file a process was started from, so each is an identity of its own.
    let python = std::fs::canonicalize("/usr/bin/python3").expect("python3");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let script = flood_script();
    let started = Instant::now();
    let mut copies = Vec::new();
    for i in 0..COPIES {
        let copy = dir.path().join(format!("copy{i}"));
        if std::fs::hard_link(&python, &copy).is_err() {
            std::fs::copy(&python, &copy).expect("a copy of python3");
        }
        let first = (1000 + i * PER_COPY).to_string();
        let mut child = Spawned(
            a.cmd(
                "setpriv",
                &[
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    copy.to_str().expect("path"),
                    &script,
                    "udp-hold",
                    B4,
                    &first,
                    &PER_COPY.to_string(),
                ],
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("a copy"),
        );
        let mut line = String::new();
        BufReader::new(child.0.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("sent");
        assert_eq!(
            line.trim(),
            format!("sent {PER_COPY}"),
            "every send refused"
        );
        copies.push(child);
    }
    run.wait_event(60, "the account's flood incident", |e| {
        at(e, "/event/action") == "flood" && at(e, "/user/id") == "65534"
    });
    let b = flood(a, OTHER, &["udp-one", B4, "40000"])
        .output()
        .expect("flood.py udp-one");
    assert_eq!(String::from_utf8_lossy(&b.stdout).trim(), "refused");
    let seen_b = run.wait_event(60, "the other account's first attempt", |e| {
        at(e, "/event/action") == "blocked" && at(e, "/user/id") == "65533"
    });
    assert_eq!(at(&seen_b, "/egret/update"), false);
    drop(copies);
    let elapsed = started.elapsed().as_secs_f64();
    assert!(run.stop().success());

    let rows = stored(&state);
    let (a_counts, a_incidents) = sum(&rows, "blocked", Some(NOBODY));
    let (flood_counts, floods) = sum(&rows, "flood", Some(NOBODY));
    // The account's burst plus its rate over the whole run, and no more.
    let budget = 300 + (30.0 * elapsed).ceil() as u64;
    eprintln!("{a_incidents} incidents, {floods} floods in {elapsed:.1} s");
    assert!(
        a_incidents <= budget,
        "{a_incidents} incidents one by one from one account in {elapsed:.1} s (budget {budget}): {rows:?}"
    );
    assert!(
        (1..=3).contains(&floods),
        "one flood incident for the account, not one per program name: {rows:?}"
    );
    let n = (COPIES * PER_COPY) as u64;
    let m = monitor(a, &state);
    let lost = ["/loss/seq_lost", "/loss/unaccounted", "/loss/while_down"]
        .iter()
        .map(|p| m.pointer(p).and_then(Value::as_u64).unwrap_or(0))
        .sum::<u64>();
    assert!(
        a_counts + flood_counts <= n && a_counts + flood_counts + lost >= n,
        "the account's counts add up: {a_counts} + {flood_counts} (+ {lost} lost) of {n}: {m:#}"
    );
    assert_eq!(sum(&rows, "blocked", Some(OTHER)), (1, 1), "{rows:?}");
}

/// SIGTERM while nobody floods the guard with refused names: egret ends
/// (bounded wait, generous for slow kernels; bench/flood.sh measures the
/// time) and its books still balance: every refusal the guard made is in an
/// incident's count or counted as dropped.
#[test]
fn sigterm_during_a_flood_stops_with_the_books_intact() {
    let ns = Netns::new();
    let policy = PolicyFile::new(DNS_POLICY);
    let state = policy.state_dir();
    let mut run = Running::start(&ns, &state, &["--policy", policy.path()]);

    let flooder = Spawned(
        flood(&ns, NOBODY, &["dns", "127.0.0.1", "53", "60000", "512"])
            .stdout(Stdio::null())
            .spawn()
            .expect("flood.py"),
    );
    // Well under way: the books (written every second) show 5,000 refusals.
    let deadline = Instant::now() + Duration::from_secs(120);
    while monitor(&ns, &state)["dns_guard"]["refused"]
        .as_u64()
        .unwrap_or(0)
        < 5_000
    {
        assert!(Instant::now() < deadline, "{}", run.stderr_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    run.signal("TERM");
    let status = wait_exit(&mut run, 60);
    assert!(status.success(), "{}", run.stderr_text());
    drop(flooder);

    let m = monitor(&ns, &state);
    assert_eq!(m["running"], false);
    let refused = m["dns_guard"]["refused"].as_u64().expect("guard books");
    let dropped = m["loss"]["dns_dropped"].as_u64().unwrap_or(0);
    let rows = stored(&state);
    let (incident_counts, _) = sum(&rows, "dns-refused", Some(NOBODY));
    let (flood_counts, _) = sum(&rows, "flood", Some(NOBODY));
    assert!(refused > 0);
    assert_eq!(
        incident_counts + flood_counts + dropped,
        refused,
        "books at exit: {rows:?} {m:#}"
    );
}
