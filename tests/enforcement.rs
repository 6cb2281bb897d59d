//! The spine, end to end: real egret binary, real nf_tables, real sockets, in
//! network namespaces each test creates and removes.

mod common;

use common::*;

fn enforce_policy(extra: &str) -> PolicyFile {
    PolicyFile::new(&format!(
        r#"
mode = "enforce"

[[allow]]
name = "web"
cidrs = ["{B4}", "{B6}"]
ports = [8080]

[[allow]]
name = "dns"
protocol = "udp"
cidrs = ["{B4}/32"]
ports = [5353]
{extra}
"#
    ))
}

#[test]
fn allowed_flows_pass_and_everything_else_is_blocked() {
    let pair = Pair::new();
    let _s = [
        pair.b.server("tcp", "0.0.0.0", 8080),
        pair.b.server("tcp", "0.0.0.0", 9090),
        pair.b.server("tcp", "::", 8080),
        pair.b.server("tcp", "::", 9090),
        pair.b.server("udp", "0.0.0.0", 5353),
        pair.b.server("udp", "0.0.0.0", 5454),
    ];
    // Before egret, everything is reachable: the blocks below are egret's doing.
    assert!(pair.a.tcp_ok(None, B4, 9090));
    assert!(pair.a.udp_ok(B4, 5454));

    let policy = enforce_policy("");
    pair.a.egret_ok(&["apply", policy.path()]);

    assert!(pair.a.tcp_ok(None, B4, 8080), "allowed TCP/IPv4");
    assert!(pair.a.tcp_ok(None, B6, 8080), "allowed TCP/IPv6");
    assert!(pair.a.udp_ok(B4, 5353), "allowed UDP");

    let before = blocked_packets(&pair.a);
    assert!(
        !pair.a.tcp_ok(None, B4, 9090),
        "TCP/IPv4 to another port is blocked"
    );
    assert!(
        !pair.a.tcp_ok(None, B6, 9090),
        "TCP/IPv6 to another port is blocked"
    );
    assert!(!pair.a.udp_ok(B4, 5454), "UDP to another port is blocked");
    assert!(!pair.a.udp_ok(B4, 8080), "the web rule is TCP only");
    let after = blocked_packets(&pair.a);
    assert!(
        after >= before + 4,
        "each blocked attempt is counted by the log rule ({before} -> {after})"
    );

    // Loopback is part of the baseline.
    let _lo = pair.a.server("tcp", "127.0.0.1", 7000);
    assert!(pair.a.tcp_ok(None, "127.0.0.1", 7000));
}

#[test]
fn a_uid_rule_lets_one_user_out_and_not_another() {
    let pair = Pair::new();
    let _s = pair.b.server("tcp", "0.0.0.0", 2222);
    let policy = PolicyFile::new(&format!(
        "[[allow]]\nname = \"nobody-only\"\ncidrs = [\"{B4}\"]\nports = [2222]\nusers = [65534]\n"
    ));
    pair.a.egret_ok(&["apply", policy.path()]);
    assert!(pair.a.tcp_ok(Some(65534), B4, 2222), "uid 65534 is allowed");
    assert!(!pair.a.tcp_ok(None, B4, 2222), "root is not in the rule");
    assert!(
        !pair.a.tcp_ok(Some(1), B4, 2222),
        "uid 1 is not in the rule"
    );
}

#[test]
fn inbound_connections_still_work() {
    let pair = Pair::new();
    let _s = pair.a.server("tcp", "0.0.0.0", 22);
    let policy = PolicyFile::new("mode = \"enforce\"\n");
    pair.a.egret_ok(&["apply", policy.path()]);
    assert!(
        pair.b.tcp_ok(None, A4, 22),
        "replies to inbound connections are never blocked"
    );
}

#[test]
fn a_connection_opened_before_the_first_ruleset_survives_apply() {
    // The SSH case: conntrack is not loaded in `a` until egret's first ruleset,
    // so it has never seen this connection. The policy does not allow it.
    let pair = Pair::new();
    let _s = pair.b.server("tcp", "0.0.0.0", 4000);
    let held = Held::connect(&pair.a, B4, 4000);
    let policy = PolicyFile::new("mode = \"enforce\"\n");
    pair.a.egret_ok(&["apply", policy.path()]);
    assert!(
        !pair.a.tcp_ok(None, B4, 4000),
        "new connections to the same server are blocked"
    );
    assert!(
        held.round_trip(),
        "the connection that was open before apply keeps working"
    );
}

#[test]
fn an_established_connection_survives_a_reapply() {
    let pair = Pair::new();
    let _s = pair.b.server("tcp", "0.0.0.0", 8080);
    let policy = enforce_policy("");
    pair.a.egret_ok(&["apply", policy.path()]);
    let held = Held::connect(&pair.a, B4, 8080);
    // The new policy no longer allows port 8080.
    let narrower = PolicyFile::new(&format!(
        "[[allow]]\nname = \"other\"\ncidrs = [\"{B4}\"]\nports = [1]\n"
    ));
    pair.a.egret_ok(&["apply", narrower.path()]);
    assert!(!pair.a.tcp_ok(None, B4, 8080));
    assert!(
        held.round_trip(),
        "established connections survive every apply"
    );
}

#[test]
fn audit_mode_blocks_nothing_but_counts() {
    let pair = Pair::new();
    let _s = pair.b.server("tcp", "0.0.0.0", 9090);
    let policy = PolicyFile::new("mode = \"audit\"\n");
    pair.a.egret_ok(&["apply", policy.path()]);
    assert!(pair.a.tcp_ok(None, B4, 9090), "audit mode blocks nothing");
    let status = pair.a.status_json();
    assert_eq!(status["mode"], "audit");
    assert!(
        status["blocked_packets"].as_u64().unwrap_or(0) >= 1,
        "would-be-blocked packets are counted: {status}"
    );
    let rules = status["rules"].as_array().expect("rules");
    assert!(rules
        .iter()
        .any(|r| r["action"] == "would-block" && r["packets"].as_u64() >= Some(1)));
}

#[test]
fn an_invalid_policy_leaves_the_live_ruleset_unchanged() {
    let ns = Netns::new();
    let good = enforce_policy("");
    ns.egret_ok(&["apply", good.path()]);
    let before = ns.nft_ruleset();
    let bad = PolicyFile::new("[[allow]]\nname = \"x\"\ncidrs = [\"10.0.0.0/33\"]\n");
    let out = ns.egret_out(&["apply", bad.path()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:3:10: error: invalid CIDR", bad.path())),
        "{stderr}"
    );
    assert_eq!(ns.nft_ruleset(), before, "byte-for-byte unchanged");
}

#[test]
fn plan_of_the_live_policy_reports_no_change_and_changes_nothing() {
    let ns = Netns::new();
    let good = enforce_policy("");
    ns.egret_ok(&["apply", good.path()]);
    let before = ns.nft_ruleset();
    // `plan` reads the live table and says there is no change.
    let plan = ns.egret_ok(&["plan", good.path()]);
    assert!(plan.contains("# no change"), "{plan}");
    assert_eq!(ns.nft_ruleset(), before, "plan changes nothing");
}

#[test]
fn confirm_rolls_back_unless_confirmed() {
    let pair = Pair::new();
    let _s = pair.b.server("tcp", "0.0.0.0", 8080);
    let first = enforce_policy("");
    let state = first.state_dir();
    pair.a.egret_ok(&["apply", first.path()]);
    let original = pair.a.nft_rules_only();

    let lockout = PolicyFile::new("mode = \"enforce\"\n");
    // The window must outlast the checks below (a blocked connect waits for
    // its own timeout) on a loaded machine and on an emulated kernel.
    let secs = 5 * time_scale();
    let window = secs.to_string();
    let out = pair.a.egret_ok(&[
        "apply",
        lockout.path(),
        "--confirm",
        &window,
        "--state-dir",
        &state,
    ]);
    assert!(out.contains("egret confirm"), "{out}");
    assert_ne!(pair.a.nft_rules_only(), original);
    assert!(!pair.a.tcp_ok(None, B4, 8080), "the new ruleset is live");

    // The watcher restores the previous ruleset after 2 s. Poll (bounded).
    let mut restored = false;
    for _ in 0..200 * time_scale() {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if !std::path::Path::new(&state)
            .join("pending-confirm.json")
            .exists()
            && pair.a.nft_rules_only() == original
        {
            restored = true;
            break;
        }
    }
    assert!(restored, "rolled back to the previous ruleset");
    assert!(pair.a.tcp_ok(None, B4, 8080));
    let out = pair.a.egret_out(&["confirm", "--state-dir", &state]);
    assert_eq!(out.status.code(), Some(1), "nothing left to confirm");

    // Confirmed in time: the new ruleset stays.
    pair.a.egret_ok(&[
        "apply",
        lockout.path(),
        "--confirm",
        &window,
        "--state-dir",
        &state,
    ]);
    pair.a.egret_ok(&["confirm", "--state-dir", &state]);
    std::thread::sleep(std::time::Duration::from_millis(secs * 1000 + 600));
    assert!(
        !pair.a.tcp_ok(None, B4, 8080),
        "the confirmed ruleset stays"
    );
}

#[test]
fn confirm_rolls_back_to_no_table_when_there_was_none() {
    let ns = Netns::new();
    let p = PolicyFile::new("mode = \"enforce\"\n");
    let state = p.state_dir();
    let window = (3 * time_scale()).to_string();
    ns.egret_ok(&[
        "apply",
        p.path(),
        "--confirm",
        &window,
        "--state-dir",
        &state,
    ]);
    assert!(ns.nft_ruleset().contains("table inet egret"));
    let mut gone = false;
    for _ in 0..60 * time_scale() {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if !ns.nft_ruleset().contains("table inet egret") {
            gone = true;
            break;
        }
    }
    assert!(gone, "the table was removed again");
}

#[test]
fn remove_and_status_report_the_table() {
    let ns = Netns::new();
    assert_eq!(
        ns.egret_out(&["status"]).status.code(),
        Some(4),
        "not loaded"
    );
    let p = enforce_policy("");
    ns.egret_ok(&["apply", p.path()]);
    let text = ns.egret_ok(&["status"]);
    assert!(text.contains("mode enforce"), "{text}");
    assert!(text.contains("web"));
    ns.egret_ok(&["remove"]);
    assert!(!ns.nft_ruleset().contains("egret"));
    ns.egret_ok(&["remove"]); // idempotent
}

#[test]
fn other_tables_are_never_touched() {
    let ns = Netns::new();
    run_ok(&mut ns.cmd("nft", &["add", "table", "inet", "mine"]));
    run_ok(&mut ns.cmd(
        "nft",
        &[
            "add",
            "chain",
            "inet",
            "mine",
            "c",
            "{ type filter hook output priority 10; }",
        ],
    ));
    let p = enforce_policy("");
    ns.egret_ok(&["apply", p.path()]);
    ns.egret_ok(&["apply", p.path()]);
    ns.egret_ok(&["remove"]);
    let rs = ns.nft_ruleset();
    assert!(
        rs.contains("table inet mine") && rs.contains("chain c"),
        "{rs}"
    );
}

#[test]
fn a_unit_rule_matches_processes_in_that_cgroup_only() {
    let pair = Pair::new();
    let _s = pair.b.server("tcp", "0.0.0.0", 443);
    let unit = Cgroup::new("backup.service");
    let other = Cgroup::new("other.service");
    let policy = PolicyFile::new(&format!(
        "[[allow]]\nname = \"backup\"\ncidrs = [\"{B4}\"]\nports = [443]\nunits = [\"{}\"]\n",
        unit.relative
    ));
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    if !egret::kernel::features::has(egret::kernel::features::SOCKET_CGROUPV2, release.trim()) {
        // Below 5.13 (no `socket cgroupv2`): refused by name, nothing loaded.
        let out = pair.a.egret_out(&["apply", policy.path()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "applied on {release}");
        assert!(
            err.contains("socket cgroupv2") && err.contains(release.trim()) && err.contains("Fix:"),
            "{err}"
        );
        assert!(
            !pair.a.nft_ruleset().contains("table inet egret"),
            "half loaded"
        );
        return;
    }
    pair.a.egret_ok(&["apply", policy.path()]);
    assert!(
        unit.tcp_ok(&pair.a, B4, 443),
        "a process in the unit's cgroup is allowed"
    );
    assert!(
        !other.tcp_ok(&pair.a, B4, 443),
        "a process in another cgroup is not"
    );
    assert!(!pair.a.tcp_ok(None, B4, 443), "nor is one outside both");
}

#[test]
fn many_single_addresses_in_a_hash_set_beside_ranges_match_and_read_back() {
    let pair = Pair::new();
    let _s = [
        pair.b.server("tcp", "0.0.0.0", 8080),
        pair.b.server("tcp", "0.0.0.0", 8443),
        pair.b.server("tcp", "0.0.0.0", 9090),
    ];
    let singles: Vec<String> = (0..20)
        .map(|i| format!("\"192.0.2.{}\"", 2 * i + 1))
        .collect();
    // Enough single addresses (with B4: 1,101; odd ones, so none merge into a
    // range) for a hash set of fixed size.
    let many: Vec<String> = (0..1100)
        .map(|i| format!("\"198.18.{}.{}\"", i / 100, 2 * (i % 100) + 1))
        .collect();
    let policy = PolicyFile::new(&format!(
        r#"
mode = "enforce"

[[allow]]
name = "by_address"
cidrs = ["{B4}", "198.51.100.0/24", {many}]
ports = [8080]

[[allow]]
name = "by_range"
cidrs = ["10.1.0.0/24", {singles}]
ports = [8443]
"#,
        singles = singles.join(", "),
        many = many.join(", ")
    ));
    pair.a.egret_ok(&["apply", policy.path()]);
    let ruleset = pair.a.nft_ruleset();
    for set in ["a_by_address_v4_addr", "a_by_range_v4_addr"] {
        assert!(ruleset.contains(&format!("set {set} ")), "{ruleset}");
    }
    let sized = ruleset
        .split("set a_by_address_v4_addr ")
        .nth(1)
        .and_then(|s| s.split('}').next())
        .unwrap_or_default();
    assert!(
        sized.contains("size 1101"),
        "the kernel keeps the size: {sized}"
    );
    assert!(pair.a.tcp_ok(None, B4, 8080), "an address in the hash set");
    assert!(
        pair.a.tcp_ok(None, B4, 8443),
        "an address in a range beside the hash set"
    );
    assert!(!pair.a.tcp_ok(None, B4, 9090), "other ports stay blocked");
    let plan = pair.a.egret_ok(&["plan", policy.path()]);
    assert!(plan.contains("# no change"), "{plan}");
}
