//! `[novelty]` against the real kernel: flows an allow rule accepts, from
//! real clients run as `nobody`, reported once per (identity, destination,
//! port, protocol) as `allowed-new`: the kernel's dynamic sets filter what it
//! already reported, the store remembers across restarts.

mod common;

use std::process::{Child, Stdio};

use common::verdicts::rule_counters;
use common::*;
use serde_json::Value;

const NOBODY: u32 = 65534;

fn policy(novelty: &str) -> PolicyFile {
    PolicyFile::new(&format!(
        "mode = \"enforce\"\n\
         [novelty]\n{novelty}\n\
         [[allow]]\nname = \"web\"\ncidrs = [\"{B4}\"]\nports = [443]\nprotocol = \"tcp\"\n\
         [[allow]]\nname = \"bulk\"\ncidrs = [\"{B4}\"]\nports = [\"20000-29999\"]\nprotocol = \"udp\"\n"
    ))
}

fn python_exe() -> String {
    std::fs::canonicalize("/usr/bin/python3")
        .expect("python3")
        .to_string_lossy()
        .into_owned()
}

fn first_seen(e: &Value) -> bool {
    at(e, "/event/action") == "allowed-new" && at(e, "/egret/update") == false
}

/// (kernel logged, received) from this daemon's books.
fn books(d: &Running) -> (u64, u64) {
    let m = d.books().unwrap_or_default();
    (
        at(&m, "/loss/kernel_logged").as_u64().unwrap_or(0),
        at(&m, "/loss/received").as_u64().unwrap_or(0),
    )
}

/// Connects as `nobody` (python) to B4:443 until the kernel has logged a
/// first-seen packet past `logged` (its 1 s filter forgot the flow), then
/// waits until the daemon received everything the kernel logged.
fn connect_until_logged_again(pair: &Pair, d: &Running, logged: u64) {
    d.wait_until("the kernel to report the flow again", 20, || {
        let attempt = Attempt::start(&pair.a, Some(NOBODY), &["try-tcp", B4, "443"]);
        // Alive while egret attributes it (scaled: emulated kernels are slow),
        // or the flow would be reported as the bare uid's.
        std::thread::sleep(std::time::Duration::from_millis(200 * time_scale()));
        drop(attempt);
        books(d).0 > logged
    });
    // No more connections now: each could be logged just before the
    // daemon's next reading of the counters and be received just after it.
    d.wait_until("egret to receive all the kernel logged", 20, || {
        let (k, r) = books(d);
        k > logged && r == k
    });
}

/// `egret events --json --action allowed-new`: the first-seen flows in the store.
fn stored_first_seen(ns: &Netns, state_dir: &str) -> String {
    ns.egret_ok(&[
        "events",
        "--json",
        "--action",
        "allowed-new",
        "--state-dir",
        state_dir,
    ])
}

/// A shell (another executable) holding a connection to B4:443, as `nobody`.
/// (`read` is a builtin: no child inherits the socket.)
fn bash_connect(ns: &Netns) -> Child {
    let script = format!("exec 3<>/dev/tcp/{B4}/443 && read -t 30 x");
    ns.as_nobody("bash", &["-c", &script])
        .stdin(Stdio::piped())
        .spawn()
        .expect("bash")
}

#[test]
fn a_first_seen_flow_is_reported_once_per_identity_and_never_after_a_restart() {
    let pair = Pair::new();
    let _server = pair.b.server("tcp", B4, 443);
    let policy = policy("kernel_timeout = \"1s\"");
    let state_dir = policy.state_dir();
    let daemon = Running::start(&pair.a, &state_dir, &["--policy", policy.path()]);

    let first = Attempt::start(&pair.a, Some(NOBODY), &["try-tcp", B4, "443"]);
    let e = daemon.wait_event(10, "allowed-new for python", first_seen);
    assert_eq!(at(&e, "/rule/name"), "web");
    assert_eq!(at(&e, "/destination/ip"), B4);
    assert_eq!(at(&e, "/destination/port"), 443);
    assert_eq!(at(&e, "/process/pid"), first.pid);
    assert_eq!(at(&e, "/process/executable"), python_exe().as_str());
    assert_eq!(at(&e, "/user/name"), "nobody");
    assert_eq!(
        at(&e, "/event/type"),
        &serde_json::json!(["connection", "allowed"])
    );
    assert_eq!(at(&e, "/event/outcome"), "success");
    assert!(at(&e, "/event/severity").as_u64().is_some());
    drop(first);

    // Again, once the kernel's filter has forgotten it: known, not reported.
    let (logged, _) = books(&daemon);
    connect_until_logged_again(&pair, &daemon, logged);
    let news = daemon.snapshot().iter().filter(|e| first_seen(e)).count();
    assert_eq!(
        news,
        1,
        "python to B4:443 is known: {:#?}",
        daemon.snapshot()
    );

    // Another executable, same user and destination: reported once the
    // kernel's filter (keyed on the uid) has forgotten the flow.
    // Each shell lives until egret names it (attribution needs the process)
    // or 1.5 s (scaled: an emulated kernel is slow to start a shell), then
    // the next one tries, in case the filter still knew the flow.
    let bash_seen = || {
        daemon.snapshot().iter().any(|e| {
            first_seen(e) && at(e, "/process/name") == "bash" && at(e, "/destination/port") == 443
        })
    };
    daemon.wait_until("allowed-new for bash", 20, || {
        let mut bash = bash_connect(&pair.a);
        let until =
            std::time::Instant::now() + std::time::Duration::from_millis(1500 * time_scale());
        while !bash_seen() && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = bash.kill();
        let _ = bash.wait();
        bash_seen()
    });

    // The store has it (written in batches, after stdout); `egret events
    // --action allowed-new` lists it.
    let listed = || stored_first_seen(&pair.a, &state_dir);
    daemon.wait_until("both first-seen flows in the store", 10, || {
        listed().lines().count() >= 2
    });

    // `egret explain` says for whom the flow is known.
    let explained = pair.a.egret_ok(&[
        "explain",
        &format!("{B4}:443"),
        "--policy",
        policy.path(),
        "--state-dir",
        &state_dir,
    ]);
    assert!(
        explained.contains(&format!("first seen: exe:{} → {B4}", python_exe())),
        "{explained}"
    );
    assert!(
        explained.contains("first seen: exe:/usr/bin/bash"),
        "{explained}"
    );

    assert_eq!(listed().lines().count(), 2, "{}", listed());
    let table = pair.a.egret_ok(&[
        "events",
        "--action",
        "allowed-new",
        "--state-dir",
        &state_dir,
    ]);
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.contains("allowed-new"))
        .collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(
        rows.iter().all(|r| r.trim_end().ends_with(" web")),
        "{table}"
    );
    // `egret top` lists them apart from the blocked traffic; `--action`
    // gives their destinations.
    let top = pair.a.egret_ok(&["top", "--state-dir", &state_dir]);
    let (blocked, first) = top
        .split_once("first seen, allowed (allowed-new), by process:")
        .unwrap_or_else(|| panic!("{top}"));
    assert!(!blocked.contains(&python_exe()), "{top}");
    assert!(first.contains(&python_exe()), "{top}");
    assert!(first.contains("/usr/bin/bash"), "{top}");
    let top = pair
        .a
        .egret_ok(&["top", "--action", "allowed-new", "--state-dir", &state_dir]);
    assert!(
        top.contains(&format!("         2  {B4}:443/tcp")),
        "two identities' new flows to it: {top}"
    );

    // Restart: the kernel reports the flow again, egret does not.
    assert!(daemon.stop().success());
    let daemon = Running::start(&pair.a, &state_dir, &["--policy", policy.path()]);
    let (logged, _) = books(&daemon);
    connect_until_logged_again(&pair, &daemon, logged);
    assert!(
        !daemon.snapshot().iter().any(first_seen),
        "re-reported after a restart: {:#?}",
        daemon.snapshot()
    );
}

#[test]
fn the_kernel_filter_keeps_repeats_away_from_egret() {
    let pair = Pair::new();
    let _server = pair.b.server("tcp", B4, 443);
    let policy = policy("");
    let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    for _ in 0..20 {
        assert!(pair.a.tcp_ok(Some(NOBODY), B4, 443));
    }
    let out = run_ok(
        &mut pair
            .a
            .cmd("nft", &["list", "chain", "inet", "egret", "n_web_v4"]),
    );
    let chain = String::from_utf8_lossy(&out.stdout).into_owned();
    let logged: Vec<&str> = chain
        .lines()
        .filter(|l| l.contains("egret:allowed-new:web") && l.contains("ip daddr"))
        .collect();
    assert_eq!(logged.len(), 1, "{chain}");
    assert!(logged[0].contains("counter packets 1 "), "{chain}");
    daemon.wait_event(10, "the one allowed-new", first_seen);
    let rule_packets = rule_counters(&pair.a)["web"];
    assert_eq!(
        rule_packets, 20,
        "the allow rule still counts every new flow"
    );
}

#[test]
fn during_the_learning_period_first_seen_flows_are_recorded_not_alerted() {
    let pair = Pair::new();
    let _server = pair.b.server("tcp", B4, 443);
    let hook_dir = tempfile::tempdir().unwrap();
    let hook = hook_dir.path().join("alerts.jsonl");
    let policy = PolicyFile::new(&format!(
        "mode = \"enforce\"\n\
         [novelty]\nlearn = \"7d\"\n\
         [[alerts]]\nname = \"hook\"\ntype = \"exec\"\n\
         command = [\"/bin/sh\", \"-c\", \"cat >> {}\"]\nmin_severity = \"info\"\n\
         [[allow]]\nname = \"web\"\ncidrs = [\"{B4}\"]\nports = [443]\n",
        hook.display()
    ));
    let state_dir = policy.state_dir();
    let daemon = Running::start(&pair.a, &state_dir, &["--policy", policy.path()]);
    let _ok = Attempt::start(&pair.a, Some(NOBODY), &["try-tcp", B4, "443"]);
    daemon.wait_event(10, "allowed-new", first_seen);
    // A blocked attempt after it: alerted, so the hook works and the
    // first-seen flow's alert, had there been one, went out before it.
    let _blocked = Attempt::start(&pair.a, Some(NOBODY), &["try-tcp", B4, "1389"]);
    daemon.wait_until("the block's alert", 20, || {
        std::fs::read_to_string(&hook).is_ok_and(|t| t.contains("\"blocked\""))
    });
    let alerted = std::fs::read_to_string(&hook).unwrap();
    assert!(!alerted.contains("allowed-new"), "{alerted}");
    // Recorded all the same (once the store has written it).
    let listed = || stored_first_seen(&pair.a, &state_dir);
    daemon.wait_until("the first-seen flow in the store", 20, || {
        !listed().trim().is_empty()
    });
    let listed = listed();
    assert_eq!(listed.lines().count(), 1, "{listed}");
}

#[test]
fn a_flood_of_new_allowed_destinations_folds_with_balanced_books() {
    let pair = Pair::new();
    let policy = policy("");
    let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    let _flood = Attempt::start(&pair.a, Some(NOBODY), &["udp-ports", B4, "20000", "10000"]);
    // Every message the kernel logged was received or counted lost.
    daemon.wait_until("the books to balance", 60, || {
        let m = daemon.books().unwrap_or_default();
        let kernel = at(&m, "/loss/kernel_logged").as_u64().unwrap_or(0);
        let received = at(&m, "/loss/received").as_u64().unwrap_or(0);
        let lost = at(&m, "/lost").as_u64().unwrap_or(0);
        kernel >= 10_000 && received + lost == kernel
    });
    let m = daemon.books().unwrap();
    let received = at(&m, "/loss/received").as_u64().unwrap();
    // Each received first-seen packet is one incident of its own or one
    // count of a flood incident: one, or a few when attribution degrades to
    // the uid under the flood or the flood pauses past the limiter's quiet
    // time on a loaded machine (as for blocks, tests/adversary_flood.rs).
    daemon.wait_until("every flow accounted for", 30, || {
        let snap = daemon.snapshot();
        let new = snap.iter().filter(|e| first_seen(e)).count() as u64;
        let mut floods = std::collections::BTreeMap::new();
        for e in snap.iter().filter(|e| at(e, "/event/action") == "flood") {
            let count = at(e, "/egret/count").as_u64().unwrap_or(0);
            let c = floods.entry(at(e, "/event/id").to_string()).or_insert(0);
            *c = count.max(*c);
        }
        let folded: u64 = floods.values().sum();
        let done = !floods.is_empty() && new + folded == received;
        if !done {
            eprintln!("{new} incidents + {folded} folded in {floods:?}, {received} received");
        }
        done
    });
    let new = daemon.snapshot().iter().filter(|e| first_seen(e)).count();
    assert!(new < 1000, "{new} incidents: the flood did not fold");
}

#[test]
fn a_dispatched_rule_reports_its_first_seen_flow_and_counts_every_connection() {
    let pair = Pair::new();
    let _server = pair.b.server("tcp", B4, 443);
    // Eight rules confined to CIDRs before it: the run is dispatched by a
    // verdict map, and `web` lives in its own chain `allow_web`.
    let padding: String = (0..8)
        .map(|i| {
            format!(
                "[[allow]]\nname = \"pad{i}\"\ncidrs = [\"198.18.{i}.0/24\"]\nports = [{}]\nprotocol = \"tcp\"\n",
                9000 + i
            )
        })
        .collect();
    let policy = PolicyFile::new(&format!(
        "mode = \"enforce\"\n[novelty]\n{padding}\
         [[allow]]\nname = \"web\"\ncidrs = [\"{B4}\"]\nports = [443]\nprotocol = \"tcp\"\n"
    ));
    let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    let ruleset = pair.a.nft_ruleset();
    assert!(ruleset.contains("ip daddr vmap @dispatch0_v4"), "{ruleset}");
    assert!(ruleset.contains("jump n_web"), "{ruleset}");
    for _ in 0..3 {
        assert!(pair.a.tcp_ok(Some(NOBODY), B4, 443));
    }
    let e = daemon.wait_event(10, "allowed-new through the map", first_seen);
    assert_eq!(at(&e, "/rule/name"), "web");
    assert_eq!(at(&e, "/destination/port"), 443);
    daemon.wait_until("egret to receive all the kernel logged", 20, || {
        let (k, r) = books(&daemon);
        k >= 1 && r == k
    });
    let news = daemon.snapshot().iter().filter(|e| first_seen(e)).count();
    assert_eq!(news, 1, "{:#?}", daemon.snapshot());
    let web = rule_counters(&pair.a)["web"];
    assert_eq!(web, 3, "the dispatched rule counts every new connection");
    // The live table (the kernel's own dump, with an element the packet
    // path added) reads back as what was compiled: `plan` sees no change,
    // nft accepts what it prints, and the daemon saw no tampering.
    let plan = pair.a.egret_ok(&["plan", policy.path()]);
    assert!(plan.contains("no change"), "{plan}");
    let nft_text = PolicyFile::new(
        &plan
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    run_ok(&mut pair.a.cmd("nft", &["-c", "-f", nft_text.path()]));
    assert!(
        !daemon
            .snapshot()
            .iter()
            .any(|e| at(e, "/event/action") == "tamper"),
        "{:#?}",
        daemon.snapshot()
    );
}

/// In audit mode the allow rules accept as in enforce mode, so first-seen
/// flows are reported the same way, beside the would-be blocks `suggest`
/// learns from.
#[test]
fn in_audit_mode_first_seen_flows_are_reported_beside_the_would_be_blocks() {
    let pair = Pair::new();
    let _server = pair.b.server("tcp", B4, 443);
    let policy = PolicyFile::new(&format!(
        "mode = \"audit\"\n[novelty]\n\
         [[allow]]\nname = \"web\"\ncidrs = [\"{B4}\"]\nports = [443]\nprotocol = \"tcp\"\n"
    ));
    let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    let _allowed = Attempt::start(&pair.a, Some(NOBODY), &["try-tcp", B4, "443"]);
    let e = daemon.wait_event(10, "allowed-new in audit mode", first_seen);
    assert_eq!(at(&e, "/rule/name"), "web");
    assert_eq!(at(&e, "/destination/port"), 443);
    assert_eq!(at(&e, "/user/name"), "nobody");
    let _other = Attempt::start(&pair.a, Some(NOBODY), &["try-tcp", B4, "8443"]);
    let e = daemon.wait_event(10, "the would-be block", |e| {
        at(e, "/destination/port") == 8443
    });
    assert_eq!(at(&e, "/event/action"), "would-block");
    let news = daemon.snapshot().iter().filter(|e| first_seen(e)).count();
    assert_eq!(news, 1, "{:#?}", daemon.snapshot());
}

/// The kernel path for each kind of allow rule: one confined to IPv6
/// addresses jumps straight to its family's chain; one with no address
/// goes through the chain that sorts by family (both families tracked);
/// ICMP has no port to key on and is accepted untracked, never logged.
#[test]
fn ipv6_rules_without_an_address_and_icmp_take_their_own_paths() {
    let pair = Pair::new();
    let _web6 = pair.b.server("tcp", B6, 443);
    let _any4 = pair.b.server("tcp", B4, 8443);
    let _any6 = pair.b.server("tcp", B6, 8443);
    let policy = PolicyFile::new(&format!(
        "mode = \"enforce\"\n[novelty]\n\
         [[allow]]\nname = \"web6\"\ncidrs = [\"{B6}\"]\nports = [443]\nprotocol = \"tcp\"\n\
         [[allow]]\nname = \"anywhere\"\nports = [8443]\nprotocol = \"tcp\"\n\
         [[allow]]\nname = \"echo\"\ncidrs = [\"{B4}\"]\nprotocol = \"icmp\"\n"
    ));
    let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    let ruleset = pair.a.nft_ruleset();
    for expected in ["jump n_web6_v6", "jump n_anywhere_any", "jump n_echo_any"] {
        assert!(ruleset.contains(expected), "{expected}: {ruleset}");
    }
    for (host, port) in [(B6, 443), (B6, 443), (B4, 8443), (B6, 8443), (B4, 8443)] {
        assert!(pair.a.tcp_ok(Some(NOBODY), host, port), "{host} {port}");
    }
    // Three echo requests with ids of their own: three new ICMP flows.
    let ping = "import socket, struct, sys\n\
        def csum(b):\n    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))\n    s = (s >> 16) + (s & 0xffff)\n    return ~(s + (s >> 16)) & 0xffff\n\
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)\n\
        s.settimeout(5)\n\
        for i in (1, 2, 3):\n    h = struct.pack('!BBHHH', 8, 0, 0, 0x4500 + i, 1)\n    s.sendto(struct.pack('!BBHHH', 8, 0, csum(h), 0x4500 + i, 1), (sys.argv[1], 0))\n    while s.recv(128)[20] != 0:\n        pass\n";
    run_ok(&mut pair.a.cmd("python3", &["-c", ping, B4]));

    let news = |rule: &str, host: &str| {
        daemon
            .snapshot()
            .iter()
            .filter(|e| {
                first_seen(e) && at(e, "/rule/name") == rule && at(e, "/destination/ip") == host
            })
            .count()
    };
    daemon.wait_until("the three first-seen flows", 20, || {
        news("web6", B6) == 1 && news("anywhere", B4) == 1 && news("anywhere", B6) == 1
    });
    daemon.wait_until("egret to receive all the kernel logged", 20, || {
        let (k, r) = books(&daemon);
        k == 3 && r == k
    });
    assert!(
        !daemon
            .snapshot()
            .iter()
            .any(|e| at(e, "/rule/name") == "echo"),
        "{:#?}",
        daemon.snapshot()
    );
    let packets = rule_counters(&pair.a);
    assert_eq!(packets["web6"], 2, "{packets:?}");
    assert_eq!(packets["anywhere"], 3, "{packets:?}");
    assert_eq!(packets["echo"], 3, "every echo request passed the rule");
    let plan = pair.a.egret_ok(&["plan", policy.path()]);
    assert!(plan.contains("no change"), "{plan}");
}
