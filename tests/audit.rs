//! Audit to policy end to end: real traffic from several processes, users
//! and a unit through the DNS guard in audit mode; `suggest` writes a policy
//! that `check` accepts; enforced by `egret run`, the same traffic passes and
//! a new destination is blocked. `simulate` and `explain` on hand-written
//! policies with known answers; the evaluator against the kernel for random
//! policies and flows.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::verdicts::*;
use common::*;
use egret::audit::evaluate::{self as evaluator, evaluate, Outcome};
use serde_json::Value;

const WEB4: &str = "10.1.0.10";
const API4: &str = "10.1.0.11";
const NEW4: &str = "10.1.0.12";
const CDN_A: &str = "10.1.0.21";
const CDN_B: &str = "10.1.0.22";
const V6: &str = "2001:db8:1::10";
const NOBODY: u32 = 65534;

struct Lab {
    pair: Pair,
    _upstream: Spawned,
    _servers: Vec<Server>,
}

fn lab() -> Lab {
    let pair = Pair::new();
    add_addresses(
        &pair.b,
        &[
            &format!("{WEB4}/24"),
            &format!("{API4}/24"),
            &format!("{NEW4}/24"),
            &format!("{CDN_A}/24"),
            &format!("{CDN_B}/24"),
            &format!("{V6}/64"),
        ],
    );
    let records = [
        "--local-ttl=600".to_string(),
        format!("--host-record=web.test,{WEB4}"),
        format!("--host-record=api.test,{API4}"),
        format!("--host-record=new.test,{NEW4}"),
        format!("--host-record=a.cdn.test,{CDN_A}"),
        format!("--host-record=b.cdn.test,{CDN_B}"),
    ];
    let upstream = dnsmasq(&pair.b, &[B4], &records);
    let deadline = Instant::now() + Duration::from_secs(10);
    while dig(&pair.b, &[&format!("@{B4}"), "+short", "web.test"]).trim() != WEB4 {
        assert!(Instant::now() < deadline, "dnsmasq did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut servers: Vec<Server> = [
        (WEB4, 8080),
        (API4, 8443),
        (NEW4, 8080),
        (CDN_A, 8080),
        (CDN_B, 8081),
        (V6, 8080),
        (V6, 8081),
    ]
    .iter()
    .map(|(h, p)| pair.b.server("tcp", h, *p))
    .collect();
    servers.push(pair.b.server("udp", B4, 5353));
    Lab {
        pair,
        _upstream: upstream,
        _servers: servers,
    }
}

fn dig(ns: &Netns, args: &[&str]) -> String {
    let mut a = vec!["+tries=1", "+time=2"];
    a.extend_from_slice(args);
    String::from_utf8_lossy(&ns.cmd("dig", &a).output().expect("dig").stdout).into_owned()
}

/// `dig +short NAME` through the guard.
fn resolve(ns: &Netns, name: &str) -> String {
    dig(ns, &["@127.0.0.1", "+short", name]).trim().to_string()
}

/// A peer that keeps its socket open (so the monitor can attribute it) from
/// inside `cg`, until dropped.
fn attempt_in(cg: &Cgroup, ns: &Netns, args: &[&str]) -> Spawned {
    let script = format!(
        "echo $$ > {} && exec nsenter --net=/run/netns/{} -- /usr/bin/python3 {} {}",
        cg.procs(),
        ns.name,
        peer_script().display(),
        args.join(" ")
    );
    let mut child = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning peer in a cgroup");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("peer output");
    assert!(line.trim().parse::<u32>().is_ok(), "peer printed {line:?}");
    Spawned(child)
}

fn is_flow(e: &Value, action: &str, ip: &str, port: u64) -> bool {
    at(e, "/event/action") == action
        && at(e, "/destination/ip") == ip
        && at(e, "/destination/port") == port
}

/// The test runner's own cgroup names a service (CI inside a unit): then
/// every flow is that unit's and rules are keyed by unit, not user.
fn runner_in_a_service() -> bool {
    std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("0::") && l.contains(".service"))
}

fn egret_in(ns: &Netns, args: &[&str]) -> (i32, String, String) {
    let out = ns.egret_out(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const AUDIT: &str = r#"
mode = "audit"

[dns]
upstream = ["10.1.0.2"]
ttl_floor = "10m"
grace = "10m"
"#;

#[test]
fn audit_then_suggest_then_enforce_the_same_traffic_passes_and_new_is_blocked() {
    let lab = lab();
    let a = &lab.pair.a;
    let audit = PolicyFile::new(AUDIT);
    let state = audit.state_dir();
    let unit = Cgroup::new("egret-audit-app.service");
    let unit_name = "egret-audit-app.service";

    // 1. Audit: everything passes and is recorded with who and where.
    let run = Running::start(a, &state, &["--policy", audit.path()]);
    assert_eq!(resolve(a, "web.test"), WEB4);
    assert_eq!(resolve(a, "api.test"), API4);
    let web_nobody = Attempt::start(a, Some(NOBODY), &["try-tcp", WEB4, "8080"]);
    let e = run.wait_event(15, "nobody → web.test", |e| {
        is_flow(e, "would-block", WEB4, 8080) && at(e, "/user/id") == "65534"
    });
    assert_eq!(at(&e, "/destination/domain"), "web.test", "{e:#}");
    let api_root = Attempt::start(a, None, &["try-tcp", API4, "8443"]);
    run.wait_event(15, "root → api.test", |e| {
        is_flow(e, "would-block", API4, 8443)
    });
    let v6_root = Attempt::start(a, None, &["try-tcp", V6, "8080"]);
    run.wait_event(15, "root → v6", |e| is_flow(e, "would-block", V6, 8080));
    let web_unit = attempt_in(&unit, a, &["try-tcp", WEB4, "8080"]);
    let e = run.wait_event(15, "the unit → web.test", |e| {
        is_flow(e, "would-block", WEB4, 8080) && at(e, "/egret/unit") == unit_name
    });
    assert_eq!(at(&e, "/destination/domain"), "web.test", "{e:#}");
    let udp_nobody = Attempt::start(a, Some(NOBODY), &["try-udp", B4, "5353"]);
    run.wait_event(15, "nobody → udp 5353", |e| {
        is_flow(e, "would-block", B4, 5353) && at(e, "/network/transport") == "udp"
    });
    drop((web_nobody, api_root, v6_root, web_unit, udp_nobody));
    run.stop();

    // 2. Suggest: a policy check accepts, stable, with names and identities.
    let (code, text, err) = egret_in(
        a,
        &["suggest", "--state-dir", &state, "--policy", audit.path()],
    );
    assert_eq!(code, 0, "{err}");
    let (_, again, _) = egret_in(
        a,
        &["suggest", "--state-dir", &state, "--policy", audit.path()],
    );
    assert_eq!(again, text, "same store, same text");
    assert!(text.contains("mode = \"enforce\""), "{text}");
    assert!(text.contains("hosts = [\"web.test\"]"), "{text}");
    assert!(text.contains("hosts = [\"api.test\"]"), "{text}");
    assert!(text.contains(&format!("cidrs = [\"{V6}/128\"]")), "{text}");
    assert!(
        text.contains(&format!("units = [\"{unit_name}\"]")),
        "{text}"
    );
    assert!(text.contains("protocol = \"udp\""), "{text}");
    if !runner_in_a_service() {
        assert!(text.contains("users = [\"nobody\"]"), "{text}");
    }
    assert!(text.contains("# seen "), "{text}");
    let suggested = PolicyFile::new(&text);
    let check = egret_in(a, &["check", suggested.path()]);
    assert_eq!(check.0, 0, "{}{}\n{text}", check.1, check.2);

    // Simulated against what was recorded: everything allowed.
    let (code, out, err) = egret_in(a, &["simulate", suggested.path(), "--state-dir", &state]);
    assert_eq!(code, 0, "{out}{err}\n{text}");
    assert!(out.contains("blocked 0 in 0"), "{out}");

    // 3. Enforce it: the same traffic passes, a new destination does not.
    let enforce_state = suggested.state_dir();
    let run = Running::start(a, &enforce_state, &["--policy", suggested.path()]);
    assert_eq!(resolve(a, "web.test"), WEB4);
    assert_eq!(resolve(a, "api.test"), API4);
    assert!(a.tcp_ok(Some(NOBODY), WEB4, 8080), "{text}");
    assert!(a.tcp_ok(None, API4, 8443), "{text}");
    assert!(a.tcp_ok(None, V6, 8080), "{text}");
    assert!(unit.tcp_ok(a, WEB4, 8080), "{text}");
    assert!(
        a.peer(Some(NOBODY), &["udp-send", B4, "5353"])
            .status()
            .unwrap()
            .success(),
        "{text}"
    );
    if !runner_in_a_service() {
        assert!(
            !a.tcp_ok(Some(NOBODY), API4, 8443),
            "another identity's destination"
        );
    }
    assert!(
        !resolve(a, "new.test").contains(NEW4),
        "a name nobody used is refused"
    );
    assert!(!a.tcp_ok(None, NEW4, 8080));
    run.wait_event(15, "the new destination blocked", |e| {
        is_flow(e, "blocked", NEW4, 8080)
    });
    drop(run);
}

#[test]
fn suggest_from_the_state_dir_alone_knows_the_audit_had_the_dns_guard() {
    let lab = lab();
    let a = &lab.pair.a;
    let audit = PolicyFile::new(AUDIT);
    let state = audit.state_dir();
    let run = Running::start(a, &state, &["--policy", audit.path()]);
    assert_eq!(resolve(a, "web.test"), WEB4);
    let web = Attempt::start(a, None, &["try-tcp", WEB4, "8080"]);
    run.wait_event(15, "root → web.test", |e| {
        is_flow(e, "would-block", WEB4, 8080) && at(e, "/destination/domain") == "web.test"
    });
    drop(web);
    run.stop();
    // A later run in enforce mode without [dns] does not hide what the audit ran with.
    let later = PolicyFile::new("mode = \"enforce\"\n");
    Running::start(a, &state, &["--policy", later.path()]).stop();

    let (code, text, err) = egret_in(a, &["suggest", "--state-dir", &state]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("\n[dns]\n"), "{text}");
    assert!(text.contains("upstream = [\"10.1.0.2:53\"]"), "{text}");
    assert!(text.contains("hosts = [\"web.test\"]"), "{text}");
    assert!(!text.contains("needs [dns]"), "{text}");
    assert!(text.contains("recorded them at"), "{text}");
    let suggested = PolicyFile::new(&text);
    let check = egret_in(a, &["check", suggested.path()]);
    assert_eq!(check.0, 0, "{}{}\n{text}", check.1, check.2);
}

const CANDIDATE: &str = r#"
mode = "enforce"

[dns]
upstream = ["10.1.0.2"]

[[allow]]
name = "cdn"
hosts = ["*.cdn.test"]
ports = ["8080-8081"]
users = ["nobody"]

[[allow]]
name = "v6"
cidrs = ["2001:db8:1::/64"]
ports = [8080]
"#;

#[test]
fn simulate_and_explain_give_known_answers_for_hand_written_policies() {
    let lab = lab();
    let a = &lab.pair.a;
    let audit = PolicyFile::new(AUDIT);
    let state = audit.state_dir();
    let run = Running::start(a, &state, &["--policy", audit.path()]);
    assert_eq!(resolve(a, "a.cdn.test"), CDN_A);
    assert_eq!(resolve(a, "b.cdn.test"), CDN_B);
    let flows = [
        (Some(NOBODY), "try-tcp", CDN_A, 8080u16),
        (Some(NOBODY), "try-tcp", CDN_B, 8081),
        (None, "try-tcp", V6, 8080),
        (None, "try-tcp", V6, 8081),
        (None, "try-udp", B4, 5353),
    ];
    for (uid, how, ip, port) in flows {
        let held = Attempt::start(a, uid, &[how, ip, &port.to_string()]);
        run.wait_event(15, &format!("{ip}:{port}"), |e| {
            is_flow(e, "would-block", ip, port as u64)
        });
        drop(held);
    }
    run.stop();

    let candidate = PolicyFile::new(CANDIDATE);
    let (code, out, err) = egret_in(
        a,
        &[
            "simulate",
            candidate.path(),
            "--state-dir",
            &state,
            "--json",
        ],
    );
    assert_eq!(code, 5, "something would be blocked: {out}{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let groups: Vec<(String, String, u64)> = report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["outcome"].as_str().unwrap().to_string(),
                g["rule"].as_str().unwrap().to_string(),
                g["incidents"].as_u64().unwrap(),
            )
        })
        .collect();
    let want = |o: &str, r: &str, n: u64| (o.to_string(), r.to_string(), n);
    assert_eq!(
        groups,
        [
            want("allowed", "cdn", 4), // two connections and the two DNS queries before them
            want("allowed", "v6", 1),
            want("blocked", "default", 2),
        ],
        "{out}"
    );
    let blocked: Vec<String> = report["groups"][2]["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["destination"].as_str().unwrap().to_string())
        .collect();
    assert!(
        blocked
            .iter()
            .any(|d| d.contains(&format!("[{V6}]:8081/tcp"))),
        "{blocked:?}"
    );
    assert!(
        blocked
            .iter()
            .any(|d| d.contains(&format!("{B4}:5353/udp"))),
        "{blocked:?}"
    );

    // Narrower ports: the second CDN name's port is now blocked too.
    let narrow = PolicyFile::new(&CANDIDATE.replace("\"8080-8081\"", "8080"));
    let (_, out, _) = egret_in(a, &["simulate", narrow.path(), "--state-dir", &state]);
    assert!(out.contains("b.cdn.test 10.1.0.22:8081/tcp"), "{out}");
    assert!(
        out.contains("blocked 2 in 2") || out.contains("blocked 3 in 3"),
        "{out}"
    );

    // Explain, from the policy alone.
    let ex = |args: &[&str]| {
        let mut full = vec!["explain"];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--policy", candidate.path()]);
        egret_in(a, &full)
    };
    let (code, out, _) = ex(&["a.cdn.test:8080", "--user", "nobody"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("host pattern: *.cdn.test in rule cdn"),
        "{out}"
    );
    assert!(out.contains("DNS guard: answers this name"), "{out}");
    let (code, out, _) = ex(&["a.cdn.test:8080", "--user", "root"]);
    assert_eq!(code, 5, "rule cdn is for nobody only: {out}");
    let (code, out, _) = ex(&[&format!("[{V6}]:8080")]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("allowed by rule v6"), "{out}");
    let (code, out, _) = ex(&[&format!("[{V6}]:8080"), "--protocol", "udp"]);
    assert_eq!(code, 5, "{out}");
    let (code, out, _) = ex(&["evil.test:443"]);
    assert_eq!(code, 5);
    assert!(out.contains("DNS guard: refuses this name"), "{out}");

    // With the candidate live, an address alone is explained by the guard's set.
    let run = Running::start(a, &candidate.state_dir(), &["--policy", candidate.path()]);
    assert_eq!(resolve(a, "a.cdn.test"), CDN_A);
    let (code, out, _) = ex(&[&format!("{CDN_A}:8080"), "--user", "nobody", "--json"]);
    assert_eq!(code, 0, "{out}");
    let e: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(e["decision"]["rule"], "cdn", "{out}");
    assert_eq!(e["live"], true);
    assert!(a.tcp_ok(Some(NOBODY), CDN_A, 8080), "the kernel agrees");
    let (code, out, _) = ex(&["a.cdn.test:8080", "--user", "nobody"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("{CDN_A} [dns-guard, h_cdn (")),
        "asked of the guard, and found in the rule's live set: {out}"
    );
    let (code, _, _) = ex(&[&format!("{CDN_B}:8081"), "--user", "nobody"]);
    assert_eq!(code, 5, "b.cdn.test was not resolved under this policy");
    assert!(!a.tcp_ok(Some(NOBODY), CDN_B, 8081), "the kernel agrees");
    drop(run);
}

fn random_policy(rng: &mut Rng) -> String {
    let mut text = format!("mode = \"{}\"\n", rng.pick(&["enforce", "audit"]));
    for i in 0..(1 + rng.next() % 3) {
        let cidrs = rng.some(&[
            "\"10.1.0.0/24\"",
            "\"10.1.0.10\"",
            "\"2001:db8:1::/64\"",
            "\"2001:db8:1::10\"",
        ]);
        let protocol = *rng.pick(&["\"tcp\"", "\"udp\"", "[\"tcp\", \"udp\"]", "\"any\""]);
        let ports = if protocol == "\"any\"" {
            vec![]
        } else {
            rng.some(&["8080", "\"8000-8443\"", "5353"])
        };
        let users = rng.some(&["\"nobody\"", "0"]);
        let _ = std::fmt::Write::write_fmt(
            &mut text,
            format_args!("\n[[allow]]\nname = \"r{i}\"\nprotocol = {protocol}\n"),
        );
        if !cidrs.is_empty() || (ports.is_empty() && users.is_empty()) {
            let cidrs = if cidrs.is_empty() {
                vec!["\"10.1.0.10\""]
            } else {
                cidrs
            };
            text.push_str(&format!("cidrs = [{}]\n", cidrs.join(", ")));
        }
        if !ports.is_empty() {
            text.push_str(&format!("ports = [{}]\n", ports.join(", ")));
        }
        if !users.is_empty() {
            text.push_str(&format!("users = [{}]\n", users.join(", ")));
            if rng.next() % 3 == 0 {
                text.push_str(&format!("mode = \"{}\"\n", rng.pick(&["audit", "enforce"])));
            }
        }
    }
    text
}

#[test]
fn the_evaluator_agrees_with_the_kernel_for_random_policies_and_flows() {
    let pair = Pair::new();
    let (a, b) = (&pair.a, &pair.b);
    add_addresses(b, &[&format!("{WEB4}/24"), &format!("{V6}/64")]);
    let mut servers = Vec::new();
    for host in [B4, WEB4, B6, V6] {
        for port in [8080, 8443] {
            servers.push(b.server("tcp", host, port));
        }
        servers.push(b.server("udp", host, 5353));
    }
    let hosts = [B4, WEB4, B6, V6];
    let services: [(&str, u16); 3] = [("tcp", 8080), ("tcp", 8443), ("udp", 5353)];
    let mut rng = Rng(0x5eed_e9e7);
    let mut checked = 0;
    for round in 0..6 {
        let text = random_policy(&mut rng);
        let file = PolicyFile::new(&text);
        let policy = egret::policy::load(&file.path, &egret::policy::SystemAccounts)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        run_ok(&mut a.egret(&["apply", file.path(), "--state-dir", &file.state_dir()]));
        for _ in 0..6 {
            let host = *rng.pick(&hosts);
            let (proto, port) = *rng.pick(&services);
            let uid = *rng.pick(&[None, Some(NOBODY)]);
            let flow = evaluator::Attempt {
                dst: Some(host.parse().unwrap()),
                protocol: if proto == "tcp" { 6 } else { 17 },
                port: Some(port),
                uid: Some(uid.unwrap_or(0)),
                ..evaluator::Attempt::default()
            };
            let d = evaluate(&policy, &flow);
            let comment = kernel_comment(&policy, &d);
            let before = rule_counters(a).get(&comment).copied().unwrap_or(0);
            let mode = if proto == "tcp" {
                "tcp-connect"
            } else {
                "udp-send"
            };
            let passed = a
                .peer(uid, &[mode, host, &port.to_string()])
                .status()
                .unwrap()
                .success();
            let after = rule_counters(a).get(&comment).copied().unwrap_or(0);
            let what = format!("round {round}: {proto} {host}:{port} uid {uid:?} → {d:?}\n{text}");
            assert_eq!(passed, d.outcome != Outcome::Blocked, "{what}");
            assert!(
                after > before,
                "kernel rule {comment:?} did not count it: {what}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 36);
    run_ok(&mut a.egret(&["remove"]));
    drop(servers);
}

const ROLLOUT: &str = r#"
mode = "enforce"

[[allow]]
name = "batch"
cidrs = ["10.1.0.10"]
ports = [8080]
users = ["nobody"]
mode = "audit"
"#;

#[test]
fn a_rule_in_audit_mode_records_its_subjects_other_traffic_under_its_name() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = PolicyFile::new(ROLLOUT);
    let state = policy.state_dir();
    let run = Running::start(a, &state, &["--policy", policy.path()]);
    assert!(a.tcp_ok(Some(NOBODY), WEB4, 8080), "allowed by the rule");
    let other = Attempt::start(a, Some(NOBODY), &["try-tcp", API4, "8443"]);
    let e = run.wait_event(15, "nobody's other traffic", |e| {
        is_flow(e, "would-block", API4, 8443)
    });
    assert_eq!(at(&e, "/rule/name"), "batch", "{e:#}");
    assert_eq!(at(&e, "/user/id"), "65534");
    assert!(
        a.tcp_ok(Some(NOBODY), API4, 8443),
        "audit for the rule's subject: it passes"
    );
    assert!(!a.tcp_ok(None, API4, 8443), "everyone else is enforced");
    let e = run.wait_event(15, "root blocked", |e| is_flow(e, "blocked", API4, 8443));
    assert_eq!(at(&e, "/rule/name"), "default");
    drop(other);
    run.stop();

    let (code, text, err) = egret_in(
        a,
        &["suggest", "--state-dir", &state, "--policy", policy.path()],
    );
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("# logged under rule batch"), "{text}");
    assert!(
        text.contains("name = \"batch\""),
        "the rule is kept: {text}"
    );
    assert!(
        text.contains("mode = \"audit\""),
        "with its mode, for the reviewer: {text}"
    );
    let suggested = PolicyFile::new(&text);
    let (code, out, err) = egret_in(a, &["simulate", suggested.path(), "--state-dir", &state]);
    assert_eq!(code, 0, "{out}{err}\n{text}");
    let (code, out, _) = egret_in(a, &["simulate", policy.path(), "--state-dir", &state]);
    assert_eq!(code, 5, "the rollout policy itself still logs them: {out}");
    assert!(out.contains("would-block  batch"), "{out}");
}

#[test]
fn lint_reports_a_rule_the_kernel_never_counted_as_unused() {
    let pair = Pair::new();
    let (a, b) = (&pair.a, &pair.b);
    let _server = b.server("tcp", B4, 8080);
    let policy = PolicyFile::new(
        r#"
[[allow]]
name = "used"
cidrs = ["10.1.0.2"]
ports = [8080]

[[allow]]
name = "idle"
cidrs = ["10.1.0.3"]
ports = [8080]

[[allow]]
name = "inner"
cidrs = ["10.1.0.2"]
ports = [8080]
users = ["nobody"]
"#,
    );
    let (_, out, _) = egret_in(a, &["check", "--lint", policy.path()]);
    assert!(
        out.contains("unused rules not checked"),
        "no table yet: {out}"
    );
    run_ok(&mut a.egret(&["apply", policy.path(), "--state-dir", &policy.state_dir()]));
    assert!(a.tcp_ok(None, B4, 8080));
    let (code, out, err) = egret_in(a, &["check", "--lint", policy.path()]);
    assert_eq!(code, 0, "warnings are not errors: {err}");
    assert!(
        out.contains("warning: rule idle: no packet matched it"),
        "{out}"
    );
    assert!(!out.contains("rule used: no packet"), "{out}");
    assert!(
        out.contains("warning: rule inner: every flow it allows is already allowed by rule used"),
        "{out}"
    );
    run_ok(&mut a.egret(&["remove"]));
}
