//! Adversarial tests for many rules (issue 22, part 4): long runs of allow
//! rules are dispatched by a verdict map on the destination instead of being
//! walked in turn. The attacker is `nobody` (65534) reaching for what another
//! rule allows: a neighbouring address, an address two rules cover with
//! different ports or users, the address just past a rule's range. Each
//! attempt runs for real against the kernel, in namespaces the test creates,
//! and must be blocked; what is allowed must be counted by the rule the
//! policy's first match names, as with the linear walk.
//!
//! Run: `cargo test --test adversary_rules`.

mod common;

use common::verdicts::*;
use common::*;
use egret::audit::evaluate::{self as evaluator, evaluate, Outcome};

const NOBODY: u32 = 65534;

/// Addresses on `b`, all in the veth's /24 (routed without more setup).
const ROOT_ONLY: &str = "10.1.0.10";
const NOBODY_OK: &str = "10.1.0.11";
const PAST_END: &str = "10.1.0.12";
const BELOW: &str = "10.1.0.9";
const V6: &str = "2001:db8:1::10";

/// Padding rules: each its own /24 elsewhere, port and user, as `egret
/// suggest` writes them; enough to make the run a dispatched one.
fn padding(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "[[allow]]\nname = \"pad{i}\"\ncidrs = [\"198.18.{i}.0/24\"]\nprotocol = \"tcp\"\nports = [{}]\nusers = [{}]\n\n",
                9000 + i,
                2000 + i
            )
        })
        .collect()
}

fn dispatched(text: &str) -> PolicyFile {
    PolicyFile::new(text)
}

#[test]
fn nobody_cannot_borrow_a_neighbouring_or_overlapping_rule_through_the_dispatch_map() {
    let pair = Pair::new();
    let (a, b) = (&pair.a, &pair.b);
    add_addresses(
        b,
        &[
            &format!("{ROOT_ONLY}/24"),
            &format!("{NOBODY_OK}/24"),
            &format!("{PAST_END}/24"),
            &format!("{BELOW}/24"),
            &format!("{V6}/64"),
        ],
    );
    let mut servers = Vec::new();
    for host in [ROOT_ONLY, NOBODY_OK, PAST_END, BELOW, V6] {
        for port in [8080, 8443] {
            servers.push(b.server("tcp", host, port));
        }
    }
    // Adjacent single addresses with different users; a /24 over them for
    // root on another port; then nobody's one address on that port (in the
    // map, a chain of both rules, tried in policy order).
    let text = format!(
        r#"mode = "enforce"
block = "reject"

{pad}[[allow]]
name = "root-only"
cidrs = ["{ROOT_ONLY}/32"]
protocol = "tcp"
ports = [8080]
users = [0]

[[allow]]
name = "nobody-one"
cidrs = ["{NOBODY_OK}/32", "{V6}/128"]
protocol = "tcp"
ports = [8080]
users = ["nobody"]

[[allow]]
name = "root-wide"
cidrs = ["10.1.0.0/24"]
protocol = "tcp"
ports = [8443]
users = [0]

[[allow]]
name = "nobody-past"
cidrs = ["{PAST_END}/32"]
protocol = "tcp"
ports = [8443]
users = ["nobody"]
"#,
        pad = padding(10)
    );
    let file = dispatched(&text);
    run_ok(&mut a.egret(&["apply", file.path(), "--state-dir", &file.state_dir()]));
    let live = a.nft_ruleset();
    assert!(
        live.contains("ip daddr vmap @dispatch0_v4"),
        "the policy is dispatched: {live}"
    );
    // What `plan` prints is what is live, and nft itself accepts it.
    let plan = a.egret_ok(&["plan", file.path()]);
    assert!(plan.contains("no change"), "{plan}");
    let nft_text = PolicyFile::new(
        &plan
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    run_ok(&mut a.cmd("nft", &["-c", "-f", nft_text.path()]));

    for (host, port, why) in [
        (ROOT_ONLY, 8080, "the neighbouring address is root's"),
        (PAST_END, 8080, "one past the end of nobody's address"),
        (BELOW, 8080, "one below root's address"),
        (NOBODY_OK, 8443, "root's port on nobody's address"),
        (ROOT_ONLY, 8443, "root's /24 on root's port"),
    ] {
        assert!(
            !a.tcp_ok(Some(NOBODY), host, port),
            "nobody reached {host}:{port}: {why}"
        );
    }
    let before = rule_counters(a);
    assert!(a.tcp_ok(Some(NOBODY), NOBODY_OK, 8080));
    assert!(a.tcp_ok(Some(NOBODY), V6, 8080));
    assert!(a.tcp_ok(None, ROOT_ONLY, 8080));
    assert!(a.tcp_ok(None, PAST_END, 8443));
    assert!(a.tcp_ok(Some(NOBODY), PAST_END, 8443));
    let after = rule_counters(a);
    let grew = |rule: &str, by: u64| {
        after.get(rule).copied().unwrap_or(0) >= before.get(rule).copied().unwrap_or(0) + by
    };
    assert!(grew("nobody-one", 2), "{before:?} → {after:?}");
    assert!(grew("root-only", 1), "{before:?} → {after:?}");
    assert!(grew("root-wide", 1), "{before:?} → {after:?}");
    assert!(grew("nobody-past", 1), "{before:?} → {after:?}");
    run_ok(&mut a.egret(&["remove"]));
    drop(servers);
}

/// A long policy of rules confined to CIDRs that overlap around `b`'s
/// addresses (so the map has stretches covered by several rules), with
/// per-rule audit mode now and then.
fn random_long_policy(rng: &mut Rng) -> String {
    let mut text = format!(
        "mode = \"{}\"\nblock = \"reject\"\n\n{}",
        rng.pick(&["enforce", "audit"]),
        padding(4)
    );
    let cidrs = [
        "10.1.0.0/24",
        "10.1.0.0/28",
        "10.1.0.10/32",
        "10.1.0.11/32",
        "10.1.0.8/30",
        "2001:db8:1::/64",
        "2001:db8:1::10/128",
    ];
    for i in 0..(6 + rng.next() % 6) {
        let (a, b) = (*rng.pick(&cidrs), *rng.pick(&cidrs));
        let port = *rng.pick(&["8080", "8443", "\"8000-8443\""]);
        text.push_str(&format!(
            "[[allow]]\nname = \"r{i}\"\ncidrs = [\"{a}\", \"{b}\"]\nprotocol = \"tcp\"\nports = [{port}]\n"
        ));
        match rng.next() % 4 {
            0 => {}
            1 => text.push_str("users = [0]\n"),
            _ => {
                text.push_str("users = [\"nobody\"]\n");
                if rng.next() % 3 == 0 {
                    text.push_str(&format!("mode = \"{}\"\n", rng.pick(&["audit", "enforce"])));
                }
            }
        }
        text.push('\n');
    }
    text
}

#[test]
fn dispatched_policies_decide_and_count_as_the_evaluator_says() {
    let pair = Pair::new();
    let (a, b) = (&pair.a, &pair.b);
    let hosts = [ROOT_ONLY, NOBODY_OK, PAST_END, BELOW, V6];
    let with_prefix = hosts.map(|h| format!("{h}/{}", if h.contains(':') { 64 } else { 24 }));
    add_addresses(
        b,
        &with_prefix.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut servers = Vec::new();
    for host in hosts {
        for port in [8080, 8443] {
            servers.push(b.server("tcp", host, port));
        }
    }
    let mut rng = Rng(0xd15_7a7c);
    let mut checked = 0;
    for round in 0..4 {
        let mut text = random_long_policy(&mut rng);
        // Every other round with `[novelty]`: each accept becomes a jump to
        // the rule's first-seen chain, inside the dispatched chains too.
        let novelty = round % 2 == 1;
        if novelty {
            text.push_str("[novelty]\n");
        }
        let file = PolicyFile::new(&text);
        let policy = egret::policy::load(&file.path, &egret::policy::SystemAccounts)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        run_ok(&mut a.egret(&["apply", file.path(), "--state-dir", &file.state_dir()]));
        assert!(
            a.nft_ruleset().contains("daddr vmap @dispatch0_v"),
            "round {round} is dispatched:\n{text}"
        );
        assert_eq!(
            a.nft_ruleset().contains("jump n_r0"),
            novelty,
            "round {round}:\n{text}"
        );
        for _ in 0..8 {
            let host = *rng.pick(&hosts);
            let port = *rng.pick(&[8080u16, 8443]);
            let uid = *rng.pick(&[None, Some(NOBODY)]);
            let flow = evaluator::Attempt {
                dst: Some(host.parse().unwrap()),
                protocol: 6,
                port: Some(port),
                uid: Some(uid.unwrap_or(0)),
                ..evaluator::Attempt::default()
            };
            let d = evaluate(&policy, &flow);
            let comment = kernel_comment(&policy, &d);
            let before = rule_counters(a).get(&comment).copied().unwrap_or(0);
            let passed = a.tcp_ok(uid, host, port);
            let after = rule_counters(a).get(&comment).copied().unwrap_or(0);
            let what = format!("round {round}: {host}:{port} uid {uid:?} → {d:?}\n{text}");
            assert_eq!(passed, d.outcome != Outcome::Blocked, "{what}");
            assert!(
                after > before,
                "kernel rule {comment:?} did not count it: {what}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 32);
    run_ok(&mut a.egret(&["remove"]));
    drop(servers);
}
