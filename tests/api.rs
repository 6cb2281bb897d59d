//! The local API and the dashboard of `egret run`, in a namespace: real
//! blocked connections, then the API read with curl (status, rules, events
//! with filters, top, timeline, the live feed) and the dashboard driven in
//! Debian's headless Chromium.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const API: &str = "http://127.0.0.1:9465";

/// With the dashboard, `[novelty]` too: its first-seen table is checked.
fn policy(dashboard: bool) -> String {
    let novelty = if dashboard { "[novelty]" } else { "" };
    format!(
        r#"
mode = "enforce"

[api]
listen = "127.0.0.1:9465"
dashboard = {dashboard}

{novelty}

[[allow]]
name = "web"
cidrs = ["10.1.0.2"]
ports = [80]
"#
    )
}

/// (status code, body) of a GET through curl, with extra curl arguments.
fn get(ns: &Netns, path: &str, extra: &[&str]) -> (u16, String) {
    let url = format!("{API}{path}");
    let mut args = vec!["-s", "-m", "10", "-w", "\n%{http_code}"];
    args.extend_from_slice(extra);
    args.push(&url);
    let out = ns.cmd("curl", &args).output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.parse().unwrap_or(0), body.to_string())
}

fn get_json(ns: &Netns, path: &str) -> Value {
    let (code, body) = get(ns, path, &[]);
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// Polls `path` until `done` holds (the daemon writes the store every 250 ms).
fn wait_json(ns: &Netns, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = get_json(ns, path);
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{path} never matched: {v:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The child's stdout, line by line, as it comes.
fn lines_of(child: &mut Spawned) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = child.0.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn blocked_connect(ns: &Netns, port: u16) {
    assert!(!ns.tcp_ok(None, B4, port), "port {port} should be blocked");
}

#[test]
fn api_serves_status_rules_events_top_timeline_and_a_live_feed() {
    let pair = Pair::new();
    let a = &pair.a;
    let _web = pair.b.server("tcp", B4, 80);
    let policy = PolicyFile::new(&policy(false));
    let run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);

    assert!(a.tcp_ok(None, B4, 80));
    blocked_connect(a, 1389);
    blocked_connect(a, 636);
    assert!(!a
        .peer(Some(65534), &["tcp-connect", B4, "1099"])
        .status()
        .expect("peer")
        .success());

    // Events, newest first, with the stored ECS documents; filters narrow them.
    let all = wait_json(a, "/api/v1/events?since=1h", |v| {
        v["events"].as_array().is_some_and(|e| e.len() >= 3)
    });
    let ports: Vec<u64> = all["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.pointer("/destination/port").and_then(Value::as_u64))
        .collect();
    assert_eq!(ports, [1099, 636, 1389], "{all:#}");
    let by_user = get_json(a, "/api/v1/events?q=NOBODY");
    let by_user = by_user["events"].as_array().unwrap();
    assert_eq!(by_user.len(), 1, "{by_user:#?}");
    assert_eq!(
        by_user[0].pointer("/user/name"),
        Some(&Value::from("nobody"))
    );
    let limited = get_json(a, "/api/v1/events?limit=1&action=blocked&rule=default");
    assert_eq!(limited["events"].as_array().unwrap().len(), 1);
    assert_eq!(
        get_json(a, "/api/v1/events?action=dns-refused")["events"],
        Value::Array(vec![])
    );

    // Status is what `egret status --json` says, plus the API's own facts.
    let status = get_json(a, "/api/v1/status");
    let cli = a.status_json();
    assert_eq!(status["mode"], "enforce");
    assert_eq!(status["loaded"], cli["loaded"]);
    assert_eq!(
        status["rules"].as_array().map(Vec::len),
        cli["rules"].as_array().map(Vec::len)
    );
    assert_eq!(status["monitor"]["running"], true);
    assert!(
        status["blocked_packets"].as_u64().unwrap() >= 3,
        "{status:#}"
    );
    assert_eq!(status["api"]["version"], env!("CARGO_PKG_VERSION"));

    let rules = get_json(a, "/api/v1/rules");
    let web = rules["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule"] == "web")
        .unwrap_or_else(|| panic!("{rules:#}"));
    assert_eq!(web["action"], "allow");
    assert!(web["packets"].as_u64().unwrap() >= 1, "{rules:#}");

    let top = get_json(a, "/api/v1/top?by=destination&since=1h");
    let labels: Vec<&str> = top["top"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["label"].as_str())
        .collect();
    assert!(labels.contains(&"10.1.0.2:1389/tcp"), "{top:#}");
    let top = get_json(a, "/api/v1/top?by=process&limit=1");
    assert_eq!(top["top"].as_array().unwrap().len(), 1);

    // The timeline counts attempts (SYN retries too), zero-filled per minute.
    let timeline = wait_json(a, "/api/v1/timeline?since=10m", |v| {
        v["series"]["blocked"]
            .as_array()
            .is_some_and(|s| s.iter().filter_map(Value::as_u64).sum::<u64>() >= 3)
    });
    assert_eq!(timeline["step"], 60);
    let width = timeline["series"]["blocked"].as_array().unwrap().len();
    assert!((10..=11).contains(&width), "{timeline:#}");

    // The live feed pushes the next event as it happens.
    let mut curl = Spawned(
        a.cmd(
            "curl",
            &["-sN", "-m", "30", &format!("{API}/api/v1/stream")],
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl stream"),
    );
    let rx = lines_of(&mut curl);
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).ok().as_deref(),
        Some("retry: 2000")
    );
    let feeds = wait_json(a, "/api/v1/status", |v| v["api"]["live_feeds"] == 1);
    assert_eq!(feeds["api"]["live_feeds"], 1);
    blocked_connect(a, 4444);
    let deadline = Instant::now() + Duration::from_secs(15);
    let pushed: Value = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no pushed event\n{}", run.stderr_text()));
        if let Some(data) = line.strip_prefix("data: ") {
            let doc: Value = serde_json::from_str(data).expect("a JSON document per data line");
            if doc.pointer("/destination/port") == Some(&Value::from(4444)) {
                break doc;
            }
        }
    };
    assert_eq!(
        pushed.pointer("/event/action"),
        Some(&Value::from("blocked"))
    );
    assert!(pushed.pointer("/process/pid").is_some(), "{pushed:#}");

    // `egret events --follow`: the stored events (oldest first), then pushed ones.
    let mut follow = Spawned(
        a.egret(&[
            "events",
            "--follow",
            "--action",
            "blocked",
            "--state-dir",
            &run.state_dir,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("egret events --follow"),
    );
    let lines = lines_of(&mut follow);
    let mut seen = Vec::new();
    let mut next = |what: &str| -> String {
        let line = lines
            .recv_timeout(Duration::from_secs(15))
            .unwrap_or_else(|_| panic!("events --follow printed no {what}; so far: {seen:#?}"));
        seen.push(line.clone());
        line
    };
    assert!(next("stored event").contains(":1389/tcp"), "oldest first");
    assert!(next("stored event").contains(":636/tcp"));
    assert!(next("stored event").contains(":1099/tcp"));
    assert!(next("stored event").contains(":4444/tcp"));
    let feeds = wait_json(a, "/api/v1/status", |v| v["api"]["live_feeds"] == 2);
    assert_eq!(feeds["api"]["live_feeds"], 2);
    blocked_connect(a, 5555);
    let line = loop {
        let line = next("pushed event");
        if line.contains(":5555/tcp") {
            break line;
        }
    };
    assert!(
        line.contains("blocked") && line.contains("[default]"),
        "{line}"
    );
    let out = a.egret_out(&[
        "events",
        "--follow",
        "--api",
        "127.0.0.1:1",
        "--state-dir",
        &run.state_dir,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[api] section"), "{err}");

    // Read-only, loopback names only, checked input, no dashboard unless asked.
    let (code, body) = get(a, "/api/v1/status", &["-X", "POST"]);
    assert_eq!(code, 405, "{body}");
    let (code, body) = get(a, "/api/v1/status", &["-H", "Host: attacker.example"]);
    assert_eq!(code, 403, "{body}");
    let (code, _) = get(a, "/api/v1/status", &["-H", "Host: localhost:9465"]);
    assert_eq!(code, 200);
    let (code, body) = get(a, "/api/v1/events?since=soon", &[]);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("since"), "{body}");
    let (code, body) = get(a, "/api/v1/top?by=pid", &[]);
    assert_eq!(code, 400, "{body}");
    let (code, body) = get(a, "/", &[]);
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("dashboard = true"), "{body}");
    let (code, _) = get(a, "/api/v1/nope", &[]);
    assert_eq!(code, 404);
}

#[test]
fn dashboard_in_headless_chromium_shows_stored_and_pushed_incidents() {
    let pair = Pair::new();
    let a = &pair.a;
    let _web = pair.b.server("tcp", B4, 80);
    let policy = PolicyFile::new(&policy(true));
    let run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);

    // Before the page loads: it must come from the store through the API.
    blocked_connect(a, 1389);
    run.wait_event(10, "the first incident", |e| {
        e.pointer("/destination/port") == Some(&Value::from(1389))
    });
    // A flow rule web allows, first seen: its own table, and a top of its own.
    assert!(a.tcp_ok(None, B4, 80));
    run.wait_event(10, "the first-seen flow", |e| {
        e.pointer("/event/action") == Some(&Value::from("allowed-new"))
    });
    let top = wait_json(a, "/api/v1/top?by=destination&action=allowed-new", |v| {
        v["top"].as_array().is_some_and(|t| !t.is_empty())
    });
    assert_eq!(top["top"][0]["label"], format!("{B4}:80/tcp"), "{top:#}");
    let blocked_top = get_json(a, "/api/v1/top?by=destination");
    assert!(
        !blocked_top.to_string().contains(":80/tcp"),
        "allowed flows stay out of the blocked top: {blocked_top:#}"
    );
    let (code, page) = get(a, "/", &[]);
    assert_eq!(code, 200);
    assert!(page.contains("<title>egret</title>"), "{page}");

    let shot = std::env::temp_dir().join(format!("egret-dashboard-{}.png", std::process::id()));
    let script = support_script("dashboard.py");
    let out = a
        .cmd(
            "python3",
            &[
                script.to_str().unwrap(),
                &format!("{API}/"),
                shot.to_str().unwrap(),
                ":1389/",
                B4,
                "6379",
                &format!("{B4}:80/tcp"),
            ],
        )
        .output()
        .expect("dashboard.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dashboard.py failed:\n{stdout}\n{}\negret:\n{}",
        String::from_utf8_lossy(&out.stderr),
        run.stderr_text()
    );
    let seen: Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(seen["title"], "egret");
    assert!(
        seen["first_row"].as_str().unwrap().contains("blocked"),
        "{seen:#}"
    );
    // Pushed, not reloaded: the marker set before the connection survived.
    assert_eq!(seen["marker"], 42, "{seen:#}");
    assert!(seen["pushed"].as_u64().unwrap() >= 1, "{seen:#}");
    assert!(
        seen["pushed_row"].as_str().unwrap().contains("python3"),
        "{seen:#}"
    );
    // A destination python3 never tried before: graded high.
    assert!(
        seen["pushed_row"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("high"),
        "{seen:#}"
    );
    assert!(seen["bars"].as_u64().unwrap() >= 1, "{seen:#}");
    assert!(
        seen["rules"]
            .as_str()
            .unwrap()
            .contains("enforce: block and log the rest"),
        "{seen:#}"
    );
    assert!(
        seen["health"].as_str().unwrap().contains("daemon: running"),
        "{seen:#}"
    );
    assert!(
        seen["health"].as_str().unwrap().contains("live: on"),
        "{seen:#}"
    );
    // The first-seen table names the rule that allowed the flow; the feed's
    // filter leaves only first-seen rows.
    let first = seen["first_seen"].as_str().unwrap_or_default();
    assert!(
        first.contains("allowed-new") && first.contains("web"),
        "{seen:#}"
    );
    let filtered = seen["filtered"].as_array().unwrap();
    assert!(!filtered.is_empty(), "{seen:#}");
    assert!(
        filtered
            .iter()
            .all(|r| r.as_str().unwrap().contains("allowed-new")),
        "{seen:#}"
    );
    let png = std::fs::read(&shot).expect("screenshot");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    if let Ok(dir) = std::env::var("EGRET_SCREENSHOT_DIR") {
        std::fs::copy(&shot, std::path::Path::new(&dir).join("dashboard.png")).expect("copy");
    }
    let _ = std::fs::remove_file(&shot);
}
