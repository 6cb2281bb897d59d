//! A fleet's events read back (`--from`): documents printed by a real
//! `egret run` (blocked connections of an unprivileged user), relabelled as
//! four hosts of one role the way a collector would hold them (bare lines,
//! Elasticsearch hits, journal entries), mixed with other programs' lines,
//! truncated and non-JSON lines. `events --from` counts what it skipped and
//! finds which hosts tried a destination; `suggest --from --hosts` writes one
//! policy that `check` accepts, each rule with how many hosts needed it and
//! the flow of one host apart for review; `simulate --from` reports per host.

mod common;

use common::*;
use serde_json::{json, Value};

const NOBODY: u32 = 65534;

/// `doc` as if `host` had written it.
fn on_host(doc: &Value, host: &str) -> Value {
    let mut d = doc.clone();
    d["host"] = json!({ "name": host, "hostname": host });
    d
}

fn egret(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(egret_bin())
        .args(args)
        .output()
        .expect("running egret");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_roles_collected_events_become_one_policy_with_host_counts() {
    let pair = Pair::new();
    let policy = PolicyFile::new("mode = \"enforce\"\n");
    let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    let common_flow = Attempt::start(&pair.a, Some(NOBODY), &["try-tcp", B4, "8080"]);
    let odd_flow = Attempt::start(&pair.a, Some(NOBODY), &["try-tcp", B4, "9090"]);
    let first = |port: u64| {
        daemon.wait_event(10, &format!("blocked :{port}"), |e| {
            at(e, "/event/action") == "blocked" && at(e, "/destination/port") == port
        })
    };
    let (common_doc, odd_doc) = (first(8080), first(9090));
    // An update of the common incident (count 2 or more), once it comes.
    let update = daemon.wait_event(10, "an update of :8080", |e| {
        at(e, "/destination/port") == 8080 && at(e, "/egret/update") == true
    });
    let heartbeat_like = daemon
        .snapshot()
        .into_iter()
        .find(|e| at(e, "/event/id").is_null())
        .unwrap_or_else(|| {
            // egret's own event with no id: its books count for the host list.
            json!({"event": {"module": "egret", "action": "heartbeat"}, "message": "alive"})
        });
    drop((common_flow, odd_flow));
    drop(daemon);

    let hosts = ["web-1", "web-2", "web-3", "web-4"];
    let mut lines: Vec<String> = Vec::new();
    for h in hosts {
        let d = on_host(&common_doc, h);
        // As different collectors hand them back.
        lines.push(match h {
            "web-1" => d.to_string(),
            "web-2" => json!({"_index": "egret", "_id": "x", "_source": d}).to_string(),
            "web-3" => {
                json!({"MESSAGE": d.to_string(), "_UID": "0", "_SYSTEMD_UNIT": "egret.service"})
                    .to_string()
            }
            _ => {
                json!({"@timestamp": "2026-01-01T00:00:00Z", "message": d.to_string()}).to_string()
            }
        });
        lines.push(on_host(&update, h).to_string());
    }
    lines.push(on_host(&odd_doc, "web-2").to_string());
    // Only a heartbeat from web-5: one of the role's hosts, needing nothing.
    lines.push(on_host(&heartbeat_like, "web-5").to_string());
    // Another role's host, not selected by 'web-*'.
    lines.push(on_host(&odd_doc, "db-1").to_string());
    // Skipped and counted.
    let whole = on_host(&odd_doc, "web-3").to_string();
    lines.push(whole[..whole.len() / 2].to_string());
    lines.push("Dec  2 03:00:00 web-1 sshd[812]: Accepted publickey for root".into());
    lines.push(json!({"message": "GET / 200", "service": {"name": "nginx"}}).to_string());
    let forged = json!({"MESSAGE": on_host(&odd_doc, "web-1").to_string(), "_UID": "65534"});
    lines.push(forged.to_string());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fleet.jsonl");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let f = file.to_str().unwrap();

    // events: what was read, then which hosts tried B4:9090.
    let (code, out, err) = egret(&["events", "--from", f, "--destination", B4]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("read 15 lines: 11 egret events (7 after folding updates), 4 skipped: 1 not egret, 2 malformed, 1 not written by egret"),
        "{err}"
    );
    assert_eq!(
        out.lines().filter(|l| l.contains(":8080/tcp")).count(),
        4,
        "{out}"
    );
    let (_, out, _) = egret(&[
        "events",
        "--from",
        f,
        "--hosts",
        "web-*",
        "--destination",
        &format!("{B4}/32"),
        "--json",
    ]);
    let nine: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|d: &Value| at(d, "/destination/port") == 9090)
        .collect();
    assert_eq!(nine.len(), 1, "only web-2 of the role: {out}");
    assert_eq!(at(&nine[0], "/host/name"), "web-2");
    let counted: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|d: &Value| at(d, "/destination/port") == 8080)
        .collect();
    assert!(
        counted.iter().all(|d| at(d, "/egret/update") == true),
        "each host's incident is its latest update: {out}"
    );

    // suggest: one policy for web-*.
    let (code, text, err) = egret(&["suggest", "--from", f, "--hosts", "web-*"]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("5 host(s) matching web-*"), "{text}");
    assert!(
        text.contains("# seen on 4 of 5 hosts (not on web-5)\n"),
        "{text}"
    );
    assert!(text.contains("# seen on 1 of 5 hosts (web-2)\n"), "{text}");
    assert!(
        text.contains("\n# ports = [9090]\n"),
        "the odd flow is commented out: {text}"
    );
    assert!(text.contains("\nports = [8080]\n"), "{text}");
    // Keyed by user, unless the test runner itself runs in a service.
    let in_service = std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("0::") && l.contains(".service"));
    assert!(
        in_service || text.contains("users = [\"nobody\"]"),
        "{text}"
    );
    assert!(!text.contains("db-1"), "{text}");
    let suggested = dir.path().join("suggested.toml");
    std::fs::write(&suggested, &text).unwrap();
    let s = suggested.to_str().unwrap();
    let (code, out, err) = egret(&["check", s]);
    assert_eq!(code, 0, "check refused the suggestion: {out}{err}\n{text}");
    // With --min-hosts 1 the odd flow is a rule too.
    let (_, all, _) = egret(&[
        "suggest",
        "--from",
        f,
        "--hosts",
        "web-*",
        "--min-hosts",
        "1",
    ]);
    assert!(
        all.contains("\nports = [9090]\n") || all.contains("\nports = [8080, 9090]\n"),
        "{all}"
    );

    // simulate: per host, only web-2's odd flow is not allowed.
    let (code, out, err) = egret(&["simulate", s, "--from", f, "--hosts", "web-*"]);
    assert_eq!(code, 5, "{out}{err}");
    assert!(
        out.contains("1 host(s) with flows this policy would not allow"),
        "{out}"
    );
    let web2 = out
        .split("\nhost ")
        .find(|h| h.starts_with("web-2:"))
        .unwrap();
    assert!(
        web2.contains("blocked 1") && web2.contains(&format!("{B4}:9090/tcp")),
        "{out}"
    );
    for h in ["web-1", "web-3", "web-4"] {
        let part = out
            .split("\nhost ")
            .find(|p| p.starts_with(&format!("{h}:")))
            .unwrap();
        assert!(
            part.contains("allowed 1 incident(s), would-block 0, blocked 0"),
            "{h}: {out}"
        );
    }
    let (_, json_out, _) = egret(&["simulate", s, "--from", f, "--hosts", "web-*", "--json"]);
    let reports: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(reports.as_array().map(Vec::len), Some(5), "{json_out}");
}
