//! `egret run` against the real kernel: real sockets in namespaces the tests
//! create, real NFLOG messages, the real binary's stdout, store and status.

mod common;

use common::*;
use serde_json::Value;

const NOBODY: u32 = 65534;

fn python_exe() -> String {
    std::fs::canonicalize("/usr/bin/python3")
        .expect("python3")
        .to_string_lossy()
        .into_owned()
}

fn enforce_policy(extra: &str) -> PolicyFile {
    PolicyFile::new(&format!(
        "mode = \"enforce\"\n[[allow]]\nname = \"web\"\ncidrs = [\"{B4}\"]\nports = [443]\n{extra}"
    ))
}

fn is_new(e: &Value, port: u64) -> bool {
    at(e, "/destination/port") == port && at(e, "/egret/update") == false
}

#[test]
fn blocked_tcp_and_udp_name_the_process_user_destination_and_rule() {
    let pair = Pair::new();
    let policy = enforce_policy("");
    let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);

    let tcp = Attempt::start(&pair.a, Some(NOBODY), &["try-tcp", B4, "1389"]);
    let e = daemon.wait_event(10, "for the TCP attempt", |e| is_new(e, 1389));
    assert_eq!(at(&e, "/event/action"), "blocked");
    assert_eq!(at(&e, "/event/kind"), "alert");
    assert_eq!(at(&e, "/network/transport"), "tcp");
    assert_eq!(at(&e, "/network/type"), "ipv4");
    assert_eq!(at(&e, "/destination/ip"), B4);
    assert_eq!(at(&e, "/source/ip"), A4);
    assert_eq!(at(&e, "/process/pid"), tcp.pid);
    assert_eq!(at(&e, "/process/executable"), python_exe().as_str());
    assert!(at(&e, "/process/command_line")
        .as_str()
        .is_some_and(|c| c.contains("try-tcp")));
    assert_eq!(at(&e, "/user/id"), "65534");
    assert_eq!(at(&e, "/user/name"), "nobody");
    assert_eq!(at(&e, "/rule/name"), "default");
    assert_eq!(at(&e, "/egret/attribution"), "sock_diag+proc");
    assert_eq!(at(&e, "/egret/mode"), "enforce");
    assert_eq!(at(&e, "/egret/count"), 1);
    assert!(at(&e, "/@timestamp")
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));

    let udp = Attempt::start(&pair.a, Some(NOBODY), &["try-udp", B6, "53"]);
    let e = daemon.wait_event(10, "for the UDP attempt", |e| is_new(e, 53));
    assert_eq!(at(&e, "/network/transport"), "udp");
    assert_eq!(at(&e, "/network/type"), "ipv6");
    assert_eq!(at(&e, "/destination/ip"), B6);
    assert_eq!(at(&e, "/process/pid"), udp.pid);
    assert_eq!(at(&e, "/user/name"), "nobody");
    assert_eq!(at(&e, "/egret/attribution"), "sock_diag+proc");

    // Stopping the daemon leaves the rules in place: egress stays filtered.
    let status = daemon.stop();
    assert!(status.success(), "egret run exits cleanly on SIGTERM");
    let _server = pair.b.server("tcp", B4, 1389);
    assert!(
        !pair.a.tcp_ok(None, B4, 1389),
        "fail closed: still blocked after exit"
    );
    assert_eq!(pair.a.status_json()["loaded"], true);
}

#[test]
fn repeated_attempts_are_one_incident_whose_count_grows() {
    let pair = Pair::new();
    let policy = enforce_policy("");
    let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    let _udp = Attempt::start(&pair.a, None, &["try-udp", B4, "5353", "6"]);
    let first = daemon.wait_event(10, "for the first datagram", |e| is_new(e, 5353));
    let id = at(&first, "/event/id").clone();
    let update = daemon.wait_event(15, "with all 6 datagrams counted", |e| {
        at(e, "/event/id") == &id && at(e, "/egret/count").as_u64() == Some(6)
    });
    assert_eq!(at(&update, "/egret/update"), true);
    assert_eq!(
        at(&update, "/egret/first_seen"),
        at(&first, "/egret/first_seen")
    );
    let new_events = daemon.snapshot().iter().filter(|e| is_new(e, 5353)).count();
    assert_eq!(new_events, 1, "six datagrams, one incident");

    // The store has the same incident, with its final count.
    let out = pair
        .a
        .egret_ok(&["events", "--json", "--state-dir", &policy.state_dir()]);
    let stored: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let row = stored
        .iter()
        .find(|e| at(e, "/event/id") == &id)
        .expect("stored incident");
    assert_eq!(at(row, "/egret/count"), 6);
    let table = pair
        .a
        .egret_ok(&["events", "--state-dir", &policy.state_dir()]);
    assert!(table.contains("10.1.0.2:5353/udp"), "{table}");
    let top = pair
        .a
        .egret_ok(&["top", "--state-dir", &policy.state_dir()]);
    assert!(top.contains("10.1.0.2:5353/udp"), "{top}");
    assert!(top.contains("python3"), "{top}");
}

#[test]
fn without_a_policy_egret_run_audits_and_reports_would_block() {
    let pair = Pair::new();
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_string_lossy().into_owned();
    let daemon = Running::start(&pair.a, &state_dir, &[]);
    let _server = pair.b.server("tcp", B4, 8080);
    assert!(pair.a.tcp_ok(None, B4, 8080), "audit mode blocks nothing");
    let e = daemon.wait_event(10, "would-block for 8080", |e| is_new(e, 8080));
    assert_eq!(at(&e, "/event/action"), "would-block");
    assert_eq!(at(&e, "/egret/mode"), "audit");
    assert_eq!(at(&e, "/event/kind"), "event");
    assert_eq!(at(&pair.a.status_json(), "/mode"), "audit");
}

#[test]
fn a_flood_keeps_the_books_exact_kernel_count_equals_received_plus_lost() {
    let pair = Pair::new();
    let policy = enforce_policy("");
    let state_dir = policy.state_dir();
    // A deliberately tiny receive buffer so that the kernel must drop.
    let daemon = Running::start(
        &pair.a,
        &state_dir,
        &[
            "--policy",
            policy.path(),
            "--nflog-rcvbuf",
            "65536",
            "--nflog-qthresh",
            "1",
        ],
    );
    let sent: u64 = String::from_utf8(
        run_ok(&mut pair.a.peer(None, &["flood-udp", B4, "9999", "20000"])).stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    assert_eq!(sent, 20000, "every datagram was refused by the ruleset");

    let deadline =
        std::time::Instant::now() + std::time::Duration::from_secs(20 * common::time_scale());
    let books = loop {
        let status = pair
            .a
            .egret_out(&["status", "--json", "--state-dir", &state_dir]);
        let s: Value = serde_json::from_slice(&status.stdout).unwrap();
        let m = at(&s, "/monitor").clone();
        let received = at(&m, "/loss/received").as_u64().unwrap_or(0);
        let lost = at(&m, "/lost").as_u64().unwrap_or(0);
        if received + lost == sent {
            break m;
        }
        if std::time::Instant::now() > deadline {
            panic!("books never balanced: {m:#}\n{}", daemon.stderr_text());
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    // The kernel's own counter (read independently through nft) agrees.
    let kernel: u64 = at(&pair.a.status_json(), "/blocked_packets")
        .as_u64()
        .unwrap();
    assert!(kernel >= sent, "kernel counted {kernel}, sent {sent}");
    assert_eq!(at(&books, "/loss/kernel_logged").as_u64(), Some(kernel));
    // Whether this flood overflows depends on how fast the sender is against
    // the reader: an emulated kernel's sender is too slow (the books then
    // balance with nothing lost). Loss itself, whatever the speed, is
    // a_stalled_reader_books_every_lost_message_whatever_the_host_speed's.
    if common::time_scale() > 1 {
        note(&format!(
            "a_flood_keeps_the_books_exact: the books balanced; loss is not asserted on an emulated kernel (lost {})",
            at(&books, "/lost")
        ));
        return;
    }
    assert!(
        at(&books, "/lost").as_u64().unwrap() > 0,
        "the tiny buffer overflowed: {books:#}"
    );
    let loss = daemon.wait_event(10, "data-loss", |e| at(e, "/event/action") == "data-loss");
    assert!(at(&loss, "/egret/lost").as_u64().unwrap() > 0);
}

/// A line in the test's output even when the harness captures it (the
/// kernel matrix's logs show why a test did less than it could).
fn note(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "note: {text}");
}

/// `units` rules need `socket cgroupv2` (5.13+). Below it egret refuses them
/// before loading anything (tests/enforcement.rs checks that refusal), so a
/// test of what they do has nothing to run: it says so and passes.
fn lacks_unit_rules(test: &str) -> bool {
    let release = egret::kernel::features::running_release();
    if egret::kernel::features::has(egret::kernel::features::SOCKET_CGROUPV2, &release) {
        return false;
    }
    note(&format!(
        "{test}: skipped: kernel {release} has no `socket cgroupv2` (5.13+), which `units` rules need"
    ));
    true
}

/// The NFLOG socket holding `group` in `ns`, as the kernel shows it:
/// (bytes queued on it, messages the kernel dropped because it was full).
/// Independent of egret: nfnetlink_log's port, then that port's row in
/// /proc/net/netlink (Rmem, Drops).
fn nflog_socket(ns: &Netns, group: u16) -> Option<(u64, u64)> {
    let read = |path: &str| {
        String::from_utf8_lossy(&run_ok(&mut ns.cmd("cat", &[path])).stdout).into_owned()
    };
    let port: u32 = read("/proc/net/netfilter/nfnetlink_log")
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let g: u16 = f.next()?.parse().ok()?;
            (g == group).then_some(())?;
            f.next()?.parse().ok()
        })?;
    read("/proc/net/netlink").lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (proto, pid) = (f.get(1)?, f.get(2)?.parse::<u32>().ok()?);
        (*proto == "12" && pid == port).then_some(())?;
        Some((f.get(4)?.parse().ok()?, f.get(8)?.parse().ok()?))
    })
}

/// Every thread of `pid` is stopped (SIGSTOP is delivered asynchronously).
fn all_threads_stopped(pid: u64) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| matches!(r.trim_start().chars().next(), Some('T' | 't')))
            })
            .unwrap_or(false)
    })
}

/// Sends SIGCONT on drop: a failed assertion must not leave the daemon
/// stopped (it would not see its SIGTERM).
struct Resume(String);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0])
            .status();
    }
}

// NFLOG loss that does not depend on the host's speed: egret's reader is
// held still (SIGSTOP) while an unprivileged user's bounded burst is logged,
// so the socket overflows on any machine. nfnetlink_log then drops whole
// batches (`__nfulnl_send` ignores the unicast's failure), the socket gets
// ENOBUFS once per overrun, and the dropped messages' NFULA_SEQ numbers are
// skipped: the books must find every message, first by the kernel's count
// (tail loss: nothing arrives after it, no gap shows), then by the sequence
// gap once messages flow again, counted once.
#[test]
fn a_stalled_reader_books_every_lost_message_whatever_the_host_speed() {
    const BURST: u64 = 3000;
    const AFTER: u64 = 100;
    let pair = Pair::new();
    let policy = enforce_policy("[metrics]\nlisten = \"127.0.0.1:9464\"\n");
    let state_dir = policy.state_dir();
    // 64 KiB (the kernel doubles it): a few hundred messages fit, far fewer
    // than the burst.
    let daemon = Running::start(
        &pair.a,
        &state_dir,
        &["--policy", policy.path(), "--nflog-rcvbuf", "65536"],
    );
    let pid = daemon
        .books()
        .and_then(|b| b["pid"].as_u64())
        .expect("the daemon's books name its pid");
    let flood = |port: &str, n: u64| -> u64 {
        let out = run_ok(
            &mut pair
                .a
                .peer(Some(NOBODY), &["flood-udp", B4, port, &n.to_string()]),
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("flood-udp prints a count")
    };
    let books = || daemon.books().unwrap_or(Value::Null);
    let n = |b: &Value, p: &str| at(b, p).as_u64().unwrap_or(0);

    let resume = Resume(pid.to_string());
    daemon.signal("STOP");
    daemon.wait_until("stopped", 10, || all_threads_stopped(pid));
    assert_eq!(
        flood("9999", BURST),
        BURST,
        "the ruleset refused each datagram"
    );
    // The kernel's own witnesses, egret still stopped: its log rule counted
    // every datagram, and the full socket made it drop some.
    assert_eq!(blocked_packets(&pair.a), BURST);
    let (queued, drops) = nflog_socket(&pair.a, 5).expect("egret's NFLOG socket");
    assert!(
        drops > 0,
        "the stopped reader's socket overflowed (queued {queued} bytes)"
    );
    drop(resume);

    // Tail loss: found by the kernel's count once the stream is quiet.
    daemon.wait_until("the books balancing after the burst", 30, || {
        let b = books();
        n(&b, "/loss/received") + n(&b, "/lost") == BURST
    });
    let b = books();
    let (received, lost) = (n(&b, "/loss/received"), n(&b, "/lost"));
    assert!(lost > 0 && received > 0, "{b:#}");
    assert_eq!(n(&b, "/loss/kernel_logged"), BURST, "{b:#}");
    assert!(n(&b, "/loss/enobufs") >= 1, "the overrun was seen: {b:#}");

    // Messages flow again: their sequence numbers skip the lost ones.
    assert_eq!(flood("9998", AFTER), AFTER);
    daemon.wait_until("the sequence gap", 30, || {
        let b = books();
        n(&b, "/loss/received") + n(&b, "/lost") == BURST + AFTER && n(&b, "/loss/seq_lost") >= lost
    });
    let b = books();
    let (received, lost, gaps) = (
        n(&b, "/loss/received"),
        n(&b, "/lost"),
        n(&b, "/loss/seq_lost"),
    );
    assert_eq!(
        lost, gaps,
        "counted once, not as a gap and as tail loss: {b:#}"
    );
    assert_eq!(n(&b, "/loss/kernel_logged"), BURST + AFTER, "{b:#}");

    note(&format!(
        "a_stalled_reader: sent {}, received {received}, lost {lost} (sequence gaps {gaps}, overruns {})",
        BURST + AFTER,
        n(&b, "/loss/enobufs")
    ));

    // What the operator sees: an event, `egret status`, the metric.
    let e = daemon.wait_event(15, "data-loss", |e| at(e, "/event/action") == "data-loss");
    assert!(at(&e, "/egret/lost").as_u64().unwrap_or(0) > 0, "{e:#}");
    let text = pair.a.egret_ok(&["status", "--state-dir", &state_dir]);
    assert!(
        text.contains(&format!(
            "received {received}, lost {lost} (sequence gaps {gaps}"
        )),
        "{text}"
    );
    daemon.wait_until("the metric", 15, || {
        let out = pair
            .a
            .cmd("curl", &["-s", "-m", "5", "http://127.0.0.1:9464/metrics"])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).lines().any(|l| {
            l.strip_prefix("egret_lost_packets_total ")
                .and_then(|v| v.trim().parse::<f64>().ok())
                == Some(lost as f64)
        })
    });
}

#[test]
fn sighup_reloads_a_valid_policy_and_refuses_an_invalid_one() {
    let pair = Pair::new();
    let policy = enforce_policy("");
    let state_dir = policy.state_dir();
    let daemon = Running::start(&pair.a, &state_dir, &["--policy", policy.path()]);
    let _server = pair.b.server("tcp", B4, 1389);
    assert!(!pair.a.tcp_ok(None, B4, 1389));

    std::fs::write(
        &policy.path,
        "mode = \"enforce\"\n[[allow]]\nname = \"ldap\"\ncidrs = [\"10.1.0.2\"]\nports = [1389]\n",
    )
    .unwrap();
    let reloads = daemon.reloads();
    pair.a.egret_ok(&["reload", "--state-dir", &state_dir]);
    daemon.wait_reloaded(reloads);
    assert!(
        pair.a.tcp_ok(None, B4, 1389),
        "the reloaded policy allows 1389"
    );

    let before = pair.a.nft_rules_only();
    std::fs::write(
        &policy.path,
        "mode = \"enforce\"\n[[allow]]\nname = \"x\"\ncidrs = [\"10.1.0.300\"]\n",
    )
    .unwrap();
    daemon.signal("HUP");
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_secs(10 * common::time_scale());
    while !daemon.stderr_text().contains("the running policy stays") {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            daemon.stderr_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        daemon.stderr_text().contains("policy.toml:4:"),
        "{}",
        daemon.stderr_text()
    );
    assert_eq!(
        pair.a.nft_rules_only(),
        before,
        "the live ruleset is unchanged"
    );
    assert!(pair.a.tcp_ok(None, B4, 1389));
}

#[test]
fn unit_rules_follow_a_restarted_unit_to_its_new_cgroup() {
    if lacks_unit_rules("unit_rules_follow_a_restarted_unit_to_its_new_cgroup") {
        return;
    }
    let pair = Pair::new();
    let _server = pair.b.server("tcp", B4, 7000);
    let cg = Cgroup::new("app.service");
    let policy = PolicyFile::new(&format!(
        "mode = \"enforce\"\n[[allow]]\nname = \"app\"\ncidrs = [\"{B4}\"]\nports = [7000]\nunits = [\"{}\"]\n",
        cg.relative
    ));
    let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    assert!(cg.tcp_ok(&pair.a, B4, 7000), "the unit's cgroup is allowed");
    assert!(!pair.a.tcp_ok(None, B4, 7000), "others are not");

    // A restart: systemd removes the cgroup and creates it again, with a new id.
    let dir = cg.root.join(&cg.relative);
    std::fs::remove_dir(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    daemon.wait_until("following the new cgroup", 15, || daemon.unit_changes() > 0);
    assert!(
        cg.tcp_ok(&pair.a, B4, 7000),
        "the rule follows the new cgroup"
    );
    assert!(!pair.a.tcp_ok(None, B4, 7000));
}

// A unit restart swaps the unit's cgroup set elements only; what egret then
// expects must be the table as it is (the seeds it loaded included), or the
// next full comparison takes egret's own swap for tampering.
#[test]
fn a_unit_restart_with_a_seeded_flow_is_not_tampering() {
    if lacks_unit_rules("a_unit_restart_with_a_seeded_flow_is_not_tampering") {
        return;
    }
    let pair = Pair::new();
    let _app = pair.b.server("tcp", B4, 7000);
    let _old = pair.b.server("tcp", B4, 7001);
    let cg = Cgroup::new("app.service");
    let policy = PolicyFile::new(&format!(
        "mode = \"enforce\"\n[[allow]]\nname = \"app\"\ncidrs = [\"{B4}\"]\nports = [7000]\nunits = [\"{}\"]\n",
        cg.relative
    ));
    // Open before egret: seeded at the first load; it closes while egret runs.
    let held = Held::connect(&pair.a, B4, 7001);
    let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    assert!(
        pair.a.nft_ruleset().contains(". 7001"),
        "{}",
        pair.a.nft_ruleset()
    );
    assert!(held.round_trip(), "the seeded connection works");
    let dir = cg.root.join(&cg.relative);
    std::fs::remove_dir(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    daemon.wait_until("following the new cgroup", 15, || daemon.unit_changes() > 0);
    assert!(
        cg.tcp_ok(&pair.a, B4, 7000),
        "the rule follows the new cgroup"
    );
    // The full comparison runs every 10 s: give it one round (nothing to
    // wait for: the point is that nothing happens).
    std::thread::sleep(std::time::Duration::from_secs(12 * common::time_scale()));
    let tampers: Vec<_> = daemon
        .snapshot()
        .into_iter()
        .filter(|e| at(e, "/event/action") == "tamper")
        .collect();
    assert!(
        tampers.is_empty(),
        "egret's own swap taken for tampering: {tampers:#?}"
    );
    assert!(
        cg.tcp_ok(&pair.a, B4, 7000),
        "the unit rule follows the new cgroup"
    );
    assert!(!pair.a.tcp_ok(None, B4, 7000), "others are still blocked");
}

#[test]
fn tampering_with_the_table_is_reported_and_with_restore_table_undone() {
    let ns = Netns::new();
    let policy = PolicyFile::new("mode = \"enforce\"\nrestore_table = true\n");
    let run = Running::start(&ns, &policy.state_dir(), &["--policy", policy.path()]);
    run_ok(&mut ns.cmd("nft", &["delete", "table", "inet", "egret"]));
    let e = run.wait_event(10, "tamper: deleted", |e| {
        at(e, "/event/action") == "tamper" && at(e, "/egret/tamper") == "deleted"
    });
    assert_eq!(at(&e, "/egret/restored"), true, "{e:#}");
    assert!(ns.nft_ruleset().contains("table inet egret"), "restored");
    // A rule slipped in front of egret's: changed, and put back as the policy says.
    run_ok(&mut ns.cmd(
        "nft",
        &["insert", "rule", "inet", "egret", "output", "accept"],
    ));
    run.wait_event(10, "tamper: changed", |e| {
        at(e, "/event/action") == "tamper"
            && at(e, "/egret/tamper") == "changed"
            && at(e, "/egret/restored") == true
    });
    let rules = ns.nft_ruleset();
    assert!(
        !rules.contains("\t\taccept\n"),
        "the inserted rule is gone: {rules}"
    );
    drop(run);

    // Without restore_table: reported, not undone.
    let policy = PolicyFile::new("mode = \"enforce\"\n");
    let run = Running::start(&ns, &policy.state_dir(), &["--policy", policy.path()]);
    run_ok(&mut ns.cmd("nft", &["delete", "table", "inet", "egret"]));
    let e = run.wait_event(10, "tamper: deleted", |e| {
        at(e, "/event/action") == "tamper"
    });
    assert_eq!(at(&e, "/egret/restored"), false);
    // Nothing to wait for: the point is that nothing more happens in a few
    // of the daemon's one-second rounds.
    std::thread::sleep(std::time::Duration::from_millis(
        1500 * common::time_scale(),
    ));
    assert!(!ns.nft_ruleset().contains("table inet egret"));
    let tampers = run
        .snapshot()
        .iter()
        .filter(|e| at(e, "/event/action") == "tamper")
        .count();
    assert_eq!(tampers, 1, "reported once, not every second");
    drop(run);
}

#[test]
fn a_heartbeat_tells_a_quiet_host_from_a_dead_daemon() {
    let ns = Netns::new();
    let policy = PolicyFile::new("mode = \"audit\"\nheartbeat = \"1s\"\n");
    let run = Running::start(&ns, &policy.state_dir(), &["--policy", policy.path()]);
    let first = run.wait_event(10, "heartbeat", |e| at(e, "/event/action") == "heartbeat");
    assert_eq!(at(&first, "/event/kind"), "state");
    assert!(at(&first, "/egret/loss/received").is_u64(), "{first:#}");
    run.wait_event(10, "a second heartbeat", |e| {
        at(e, "/event/action") == "heartbeat" && at(e, "/@timestamp") != at(&first, "/@timestamp")
    });
    drop(run);
}

/// `egret status --json` for a state dir.
fn status_of(ns: &Netns, state_dir: &str) -> Value {
    let out = ns.egret_out(&["status", "--json", "--state-dir", state_dir]);
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

#[test]
fn the_books_stay_continuous_across_a_tamper_restore_and_top_shows_traffic_only() {
    let pair = Pair::new();
    let a = &pair.a;
    let policy = PolicyFile::new("mode = \"enforce\"\nrestore_table = true\n");
    let state = policy.state_dir();
    let run = Running::start(a, &state, &["--policy", policy.path()]);
    // Blocked packets, then the table deleted before the daemon reads its
    // counters again: what the deleted table logged can no longer be read.
    run_ok(&mut a.peer(None, &["flood-udp", B4, "9999", "20"]));
    run_ok(&mut a.cmd("nft", &["delete", "table", "inet", "egret"]));
    run.wait_event(15, "tamper: restored", |e| {
        at(e, "/event/action") == "tamper" && at(e, "/egret/restored") == true
    });
    run_ok(&mut a.peer(None, &["flood-udp", B4, "9998", "5"]));
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_secs(20 * common::time_scale());
    let s = loop {
        let s = status_of(a, &state);
        let n = |p: &str| at(&s, p).as_u64().unwrap_or(0);
        let (logged, received) = (
            n("/monitor/loss/kernel_logged"),
            n("/monitor/loss/received"),
        );
        if received == 25 && logged == received + n("/monitor/lost") {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the books do not add up after the restore: {s:#}\n{}",
            run.stderr_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(at(&s, "/monitor/lost"), 0, "{s:#}");
    assert!(
        at(&s, "/blocked_packets").as_u64().unwrap_or(0) < 25,
        "the restored table counts only its own packets: {s:#}"
    );

    // The tamper event is in the store, but not in the traffic tables.
    let top = a.egret_ok(&["top", "--state-dir", &state]);
    let labels: Vec<String> = top
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .map(|l| l.split_whitespace().skip(2).collect::<Vec<_>>().join(" "))
        .collect();
    assert!(
        !labels.iter().any(|l| l.is_empty() || l == "egret"),
        "egret's own events in top: {top}"
    );
    assert!(top.contains(&format!("{B4}:9999/udp")), "{top}");
    drop(run);
}
