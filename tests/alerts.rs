//! `[[alerts]]` end to end: real blocked connections in a namespace, real
//! receivers in another one (an HTTP server, RFC 5424 syslog listeners that
//! parse what they get, an OTLP/HTTP logs receiver decoding with the
//! OpenTelemetry protobuf definitions, an exec hook writing a file), egret
//! enforcing with no allow rule for any of them.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const NOBODY: u32 = 65534;

fn receiver_script() -> PathBuf {
    support_script("alert_receiver.py")
}

/// A receiver from alert_receiver.py in `ns`, recording into `out`.
fn receiver(ns: &Netns, args: &[&str]) -> Spawned {
    listening(ns, &receiver_script(), args)
}

/// `script` in `ns`, once it says "listening".
fn listening(ns: &Netns, script: &Path, args: &[&str]) -> Spawned {
    let mut a = vec![script.to_str().unwrap()];
    a.extend_from_slice(args);
    let mut child = ns
        .cmd("/usr/bin/python3", &a)
        .stdout(Stdio::piped())
        .spawn()
        .expect("receiver");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "listening", "receiver {args:?} did not start");
    Spawned(child)
}

/// What a receiver (or the exec hook) wrote: one JSON object per line.
fn received(file: &Path) -> Vec<Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Polls `file` until `pred` holds for some record; panics with what came.
fn wait_for(file: &Path, secs: u64, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = received(file).into_iter().find(|v| pred(v)) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not received within {secs} s; got {:#?}",
            received(file)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `egret events --json`: the store's documents.
fn stored_events(ns: &Netns, policy: &PolicyFile) -> Vec<Value> {
    ns.egret_ok(&["events", "--json", "--state-dir", &policy.state_dir()])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The metrics endpoint of a policy with `[metrics] listen = "127.0.0.1:9464"`.
fn metrics(ns: &Netns) -> String {
    let out = ns
        .cmd("curl", &["-s", "-m", "5", "http://127.0.0.1:9464/metrics"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn metric(metrics: &str, name: &str, sink: &str) -> f64 {
    let prefix = format!("{name}{{sink=\"{sink}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix}in {metrics}"))
}

/// A private CA in `dir` and a certificate it signed for B4: (ca, cert, key).
fn private_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (ca, cert, key) = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    // A private CA and a server certificate it signed (webpki refuses a
    // CA certificate as the server's own).
    let ca_key = dir.join("ca-key.pem");
    let csr = dir.join("server.csr");
    let ext = dir.join("ext.cnf");
    std::fs::write(&ext, format!("subjectAltName=IP:{B4}\n")).unwrap();
    let p = |p: &PathBuf| p.to_str().unwrap().to_string();
    let openssl = |args: &[&str]| run_ok(std::process::Command::new("openssl").args(args));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=egret test CA",
        "-keyout",
        &p(&ca_key),
        "-out",
        &p(&ca),
    ]);
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/CN=egret test receiver",
        "-keyout",
        &p(&key),
        "-out",
        &p(&csr),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p(&ca),
        "-CAkey",
        &p(&ca_key),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &p(&ext),
        "-out",
        &p(&cert),
    ]);
    (ca, cert, key)
}

/// Every one of `ports` has its `blocked` event in the store.
fn assert_blocked_stored(docs: &[Value], ports: &[u16]) {
    for p in ports {
        assert!(
            docs.iter()
                .any(|d| at(d, "/destination/port") == *p as u64
                    && at(d, "/event/action") == "blocked"),
            "port {p} is in the store: {docs:#?}"
        );
    }
}

/// A blocked TCP attempt by nobody to each of `ports` on B4, and each
/// one's first event.
fn tcp_attempts(pair: &Pair, daemon: &Running, ports: &[u16]) -> Vec<Attempt> {
    ports
        .iter()
        .map(|p| {
            let a = Attempt::start(&pair.a, Some(NOBODY), &["try-tcp", B4, &p.to_string()]);
            daemon.wait_event(10, "the attempt", |e| is_new(e, *p as u64));
            a
        })
        .collect()
}

fn exec_hook(file: &Path) -> String {
    format!(
        "command = [\"/bin/sh\", \"-c\", \"cat >> {}\"]",
        file.display()
    )
}

fn is_new(e: &Value, port: u64) -> bool {
    at(e, "/destination/port") == port && at(e, "/egret/update") == false
}

#[test]
fn a_blocked_callback_reaches_webhook_syslog_and_exec_through_egrets_own_hole() {
    let pair = Pair::new();
    let tmp = tempfile::tempdir().unwrap();
    let (web, udp, tcp, hook) = (
        tmp.path().join("web"),
        tmp.path().join("udp"),
        tmp.path().join("tcp"),
        tmp.path().join("hook"),
    );
    let _web = receiver(&pair.b, &["http", B4, "8080", web.to_str().unwrap()]);
    let _udp = receiver(&pair.b, &["syslog-udp", B4, "5514", udp.to_str().unwrap()]);
    let _tcp = receiver(&pair.b, &["syslog-tcp", B4, "6601", tcp.to_str().unwrap()]);
    let policy = PolicyFile::new(&format!(
        r#"
mode = "enforce"

[[alerts]]
name = "web"
type = "webhook"
url = "http://{B4}:8080/egret?team=sec"
headers = {{ Authorization = "Bearer t0ken" }}

[[alerts]]
name = "siem-udp"
type = "syslog"
target = "udp://{B4}:5514"
facility = "local3"

[[alerts]]
name = "siem-tcp"
type = "syslog"
target = "tcp://{B4}:6601"

[[alerts]]
name = "hook"
type = "exec"
{}
"#,
        exec_hook(&hook)
    ));
    let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);

    // The holes are egret's marked sockets' only: a process may not use them.
    assert!(
        !pair.a.tcp_ok(None, B4, 8080),
        "unmarked traffic to the sink is blocked"
    );
    let ruleset = pair.a.nft_ruleset();
    assert!(
        ruleset.contains("comment \"alerts: sink web\""),
        "{ruleset}"
    );
    assert!(ruleset.contains("meta mark 0x65677274"), "{ruleset}");

    let attempt = Attempt::start(&pair.a, Some(NOBODY), &["try-tcp", B4, "1389"]);
    let e = daemon.wait_event(10, "for the callback", |e| is_new(e, 1389));
    assert_eq!(at(&e, "/egret/severity"), "high", "second-stage port");
    assert_eq!(at(&e, "/event/severity"), 4);
    let blocked =
        |v: &Value| at(v, "/event/action") == "blocked" && at(v, "/destination/port") == 1389;

    let post = wait_for(&web, 20, "webhook post", |p| blocked(&p["body"]));
    assert_eq!(post["path"], "/egret?team=sec");
    assert_eq!(post["content_type"], "application/json");
    assert_eq!(post["authorization"], "Bearer t0ken");
    assert!(post["user_agent"].as_str().unwrap().starts_with("egret/"));
    let body = &post["body"];
    assert_eq!(at(body, "/process/pid"), attempt.pid);
    assert_eq!(at(body, "/user/name"), "nobody");
    assert_eq!(at(body, "/egret/severity"), "high");
    assert_eq!(at(body, "/event/id"), at(&e, "/event/id"));
    let blocked_at = humantime::parse_rfc3339(at(body, "/@timestamp").as_str().unwrap()).unwrap();
    let received_at =
        std::time::UNIX_EPOCH + Duration::from_secs_f64(post["received_at"].as_f64().unwrap());
    // A figure for docs/alerts.md, not an assertion (no wall-clock limits in tests).
    println!(
        "webhook latency: {:?} from the first packet to the receiver",
        received_at.duration_since(blocked_at).unwrap_or_default()
    );

    for (file, facility) in [(&udp, 19), (&tcp, 4)] {
        let m = wait_for(file, 20, "syslog message", |m| {
            m["msgid"] == "blocked" && m["sd"]["egret@32473"]["dport"] == "1389"
        });
        assert_eq!(m["version"], 1);
        assert_eq!(m["facility"], facility);
        assert_eq!(m["severity"], 3, "high is syslog err");
        assert_eq!(m["app_name"], "egret");
        assert!(m["bom"].as_bool().unwrap());
        let sd = &m["sd"]["egret@32473"];
        assert_eq!(sd["action"], "blocked");
        assert_eq!(sd["severity"], "high");
        assert_eq!(sd["dport"], "1389");
        assert_eq!(sd["dst"], B4);
        assert_eq!(sd["pid"], attempt.pid.to_string());
        assert_eq!(sd["user"], "nobody");
        assert!(
            m["msg"].as_str().unwrap().contains("→ 10.1.0.2:1389/tcp"),
            "{m}"
        );
        assert!(
            received(file).iter().all(|m| m.get("error").is_none()),
            "every message parses as RFC 5424: {:#?}",
            received(file)
        );
    }
    let line = wait_for(&hook, 20, "exec hook", blocked);
    assert_eq!(at(&line, "/process/pid"), attempt.pid);
}

#[test]
fn severity_is_high_for_a_new_destination_and_low_for_a_known_one_across_restarts() {
    let pair = Pair::new();
    let tmp = tempfile::tempdir().unwrap();
    let hook = tmp.path().join("hook");
    let policy = PolicyFile::new(&format!(
        "mode = \"enforce\"\n[[alerts]]\nname = \"hook\"\ntype = \"exec\"\n{}\nmin_severity = \"low\"\n",
        exec_hook(&hook)
    ));
    {
        let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
        let _a = Attempt::start(&pair.a, Some(NOBODY), &["try-tcp", B4, "7000"]);
        let e = daemon.wait_event(10, "first attempt", |e| is_new(e, 7000));
        assert_eq!(at(&e, "/egret/severity"), "high");
        wait_for(&hook, 20, "high alert", |v| {
            at(v, "/destination/port") == 7000 && at(v, "/egret/severity") == "high"
        });
        assert!(daemon.stop().success());
    }
    // A new daemon, a new process: the same identity, the same destination.
    let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    let _b = Attempt::start(&pair.a, Some(NOBODY), &["try-tcp", B4, "7000"]);
    let e = daemon.wait_event(10, "repeat", |e| is_new(e, 7000));
    assert_eq!(at(&e, "/egret/severity"), "low", "known from the store");
    assert_eq!(at(&e, "/event/severity"), 2);
    wait_for(&hook, 20, "low alert", |v| {
        at(v, "/destination/port") == 7000 && at(v, "/egret/severity") == "low"
    });
    assert!(daemon.stop().success());
    // The store holds the graded documents too.
    let stored = stored_events(&pair.a, &policy);
    let grades: Vec<String> = stored
        .iter()
        .filter(|d| at(d, "/destination/port") == 7000)
        .map(|d| at(d, "/egret/severity").as_str().unwrap().to_string())
        .collect();
    assert_eq!(grades.len(), 2, "{stored:#?}");
    assert!(grades.contains(&"high".into()) && grades.contains(&"low".into()));
}

#[test]
fn a_burst_sends_the_rate_limit_then_one_digest_counting_the_rest() {
    let pair = Pair::new();
    let tmp = tempfile::tempdir().unwrap();
    let web = tmp.path().join("web");
    let _web = receiver(&pair.b, &["http", B4, "8080", web.to_str().unwrap()]);
    let policy = PolicyFile::new(&format!(
        "mode = \"enforce\"\n[[alerts]]\nname = \"web\"\ntype = \"webhook\"\nurl = \"http://{B4}:8080/\"\nrate_limit = 3\nrate_window = \"5s\"\nactions = [\"blocked\"]\n"
    ));
    let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    let ports: Vec<u16> = (7101..=7110).collect();
    let _attempts: Vec<Attempt> = ports
        .iter()
        .map(|p| Attempt::start(&pair.a, Some(NOBODY), &["try-udp", B4, &p.to_string()]))
        .collect();
    for p in &ports {
        daemon.wait_event(10, "each attempt", |e| is_new(e, *p as u64));
    }
    let digest = wait_for(&web, 30, "digest", |p| {
        at(&p["body"], "/event/action") == "alert-digest"
    });
    let posts = received(&web);
    let alerts = posts
        .iter()
        .filter(|p| at(&p["body"], "/event/action") == "blocked")
        .count();
    assert_eq!(alerts, 3, "the rate limit: {posts:#?}");
    let incidents = daemon
        .snapshot()
        .iter()
        .filter(|e| at(e, "/event/action") == "blocked" && at(e, "/egret/update") == false)
        .count();
    let body = &digest["body"];
    assert_eq!(
        at(body, "/egret/alert/suppressed"),
        (incidents - 3) as u64,
        "the digest counts every held-back alert: {body:#}"
    );
    assert_eq!(at(body, "/egret/alert/sink"), "web");
    assert!(at(body, "/message")
        .as_str()
        .unwrap()
        .contains("rate limit"));
    assert_eq!(
        posts
            .iter()
            .filter(|p| at(&p["body"], "/event/action") == "alert-digest")
            .count(),
        1
    );
    // Every incident reached stdout, whatever the sink got.
    assert!(incidents >= 10);
}

#[test]
fn a_down_webhook_loses_no_stored_event_and_its_failure_is_reported() {
    let pair = Pair::new();
    let tmp = tempfile::tempdir().unwrap();
    let hook = tmp.path().join("hook");
    // Nothing listens on 8081 in b: every delivery is refused.
    let policy = PolicyFile::new(&format!(
        r#"
mode = "enforce"

[metrics]
listen = "127.0.0.1:9464"

[[alerts]]
name = "down"
type = "webhook"
url = "http://{B4}:8081/"
retries = 1
backoff = "100ms"
timeout = "2s"

[[alerts]]
name = "hook"
type = "exec"
{}
actions = ["alert-failed"]
"#,
        exec_hook(&hook)
    ));
    let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    let ports: Vec<u16> = (7201..=7205).collect();
    let _attempts: Vec<Attempt> = ports
        .iter()
        .map(|p| Attempt::start(&pair.a, Some(NOBODY), &["try-tcp", B4, &p.to_string()]))
        .collect();
    let failed = daemon.wait_event(30, "alert-failed", |e| {
        at(e, "/event/action") == "alert-failed"
    });
    assert_eq!(at(&failed, "/egret/alert/sink"), "down");
    assert_eq!(at(&failed, "/egret/severity"), "medium");
    assert!(at(&failed, "/egret/alert/error")
        .as_str()
        .unwrap()
        .contains("10.1.0.2:8081"));
    // It reached the other sink, and only that one.
    let line = wait_for(&hook, 20, "alert-failed at the hook", |v| {
        at(v, "/event/action") == "alert-failed"
    });
    assert_eq!(at(&line, "/egret/alert/sink"), "down");
    for p in &ports {
        daemon.wait_event(10, "each attempt", |e| is_new(e, *p as u64));
    }
    let metrics = metrics(&pair.a);
    let failures = metric(&metrics, "egret_alerts_failed_total", "down");
    assert!(failures >= 1.0, "{metrics}");
    assert!(metrics.contains("egret_alerts_delivered_total{sink=\"hook\"}"));

    assert!(daemon.stop().success());
    let docs = stored_events(&pair.a, &policy);
    assert_blocked_stored(&docs, &ports);
    assert!(docs
        .iter()
        .any(|d| at(d, "/event/action") == "alert-failed"));
}

#[test]
fn deleting_egrets_table_reaches_the_sinks_as_critical_tamper() {
    let ns = Netns::new();
    let tmp = tempfile::tempdir().unwrap();
    let (hook, log) = (tmp.path().join("hook"), tmp.path().join("log"));
    let socket = tmp.path().join("dev-log");
    let _syslogd = receiver(
        &ns,
        &[
            "syslog-unix",
            socket.to_str().unwrap(),
            log.to_str().unwrap(),
        ],
    );
    let policy = PolicyFile::new(&format!(
        "mode = \"enforce\"\n[[alerts]]\nname = \"hook\"\ntype = \"exec\"\n{}\nmin_severity = \"critical\"\n[[alerts]]\nname = \"local\"\ntype = \"syslog\"\ntarget = \"unix://{}\"\n",
        exec_hook(&hook),
        socket.display()
    ));
    let daemon = Running::start(&ns, &policy.state_dir(), &["--policy", policy.path()]);
    run_ok(&mut ns.cmd("nft", &["delete", "table", "inet", "egret"]));
    let line = wait_for(&hook, 20, "tamper at the hook", |v| {
        at(v, "/event/action") == "tamper"
    });
    assert_eq!(at(&line, "/egret/severity"), "critical");
    assert_eq!(at(&line, "/egret/tamper"), "deleted");
    let m = wait_for(&log, 20, "tamper in syslog", |m| {
        m["fields"]["action"] == "tamper"
    });
    assert_eq!(m["severity"], 2, "critical is syslog crit");
    assert_eq!(m["app_name"], "egret");
    assert_eq!(m["fields"]["severity"], "critical");
    assert!(m["msg"]
        .as_str()
        .unwrap()
        .starts_with("egret's table was deleted"));
    assert!(
        received(&hook)
            .iter()
            .all(|v| at(v, "/event/action") == "tamper"),
        "min_severity keeps the rest away"
    );
    drop(daemon);
}

#[test]
fn an_https_webhook_with_its_own_ca_file() {
    let pair = Pair::new();
    let tmp = tempfile::tempdir().unwrap();
    let web = tmp.path().join("web");
    let (ca, cert, key) = private_ca(tmp.path());
    let _web = receiver(
        &pair.b,
        &[
            "http",
            B4,
            "8443",
            web.to_str().unwrap(),
            cert.to_str().unwrap(),
            key.to_str().unwrap(),
        ],
    );
    let policy = PolicyFile::new(&format!(
        "mode = \"enforce\"\n[[alerts]]\nname = \"tls\"\ntype = \"webhook\"\nurl = \"https://{B4}:8443/hook\"\nformat = \"slack\"\nca_file = \"{}\"\n",
        ca.display()
    ));
    let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    let _a = Attempt::start(&pair.a, Some(NOBODY), &["try-tcp", B4, "1099"]);
    daemon.wait_event(10, "the attempt", |e| is_new(e, 1099));
    let post = wait_for(&web, 20, "slack-style post over TLS", |p| {
        p["body"]["text"]
            .as_str()
            .is_some_and(|t| t.contains(":1099/tcp"))
    });
    let text = post["body"]["text"].as_str().unwrap();
    assert!(text.starts_with("[egret HIGH] "), "{text}");
    assert_eq!(post["path"], "/hook");
}

#[test]
fn a_taken_nflog_group_is_reported_to_the_sinks_before_egret_gives_up() {
    let ns = Netns::new();
    let tmp = tempfile::tempdir().unwrap();
    let hook = tmp.path().join("hook");
    let first = PolicyFile::new("mode = \"audit\"\n");
    let _holder = Running::start(&ns, &first.state_dir(), &["--policy", first.path()]);
    let second = PolicyFile::new(&format!(
        "mode = \"audit\"\n[[alerts]]\nname = \"hook\"\ntype = \"exec\"\n{}\n",
        exec_hook(&hook)
    ));
    let out = ns.egret_run(&second).output().unwrap();
    assert!(!out.status.success(), "the group is taken: egret run fails");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let doc: Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(at(&doc, "/event/action"), "nflog-taken");
    let line = wait_for(&hook, 10, "nflog-taken at the hook", |v| {
        at(v, "/event/action") == "nflog-taken"
    });
    assert_eq!(at(&line, "/egret/severity"), "critical");
    assert_eq!(at(&line, "/egret/log_group"), 5);
}

#[test]
fn a_reload_adds_a_sink_and_its_hole() {
    let pair = Pair::new();
    let tmp = tempfile::tempdir().unwrap();
    let web = tmp.path().join("web");
    let _web = receiver(&pair.b, &["http", B4, "8080", web.to_str().unwrap()]);
    let policy = PolicyFile::new("mode = \"enforce\"\n");
    let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    assert!(!pair.a.nft_ruleset().contains("alerts: sink"));
    policy.rewrite(&format!(
        "mode = \"enforce\"\n[[alerts]]\nname = \"web\"\ntype = \"webhook\"\nurl = \"http://{B4}:8080/\"\n"
    ));
    let reloads = daemon.reloads();
    daemon.signal("HUP");
    daemon.wait_reloaded(reloads);
    assert!(pair
        .a
        .nft_ruleset()
        .contains("comment \"alerts: sink web\""));
    let _a = Attempt::start(&pair.a, Some(NOBODY), &["try-tcp", B4, "7300"]);
    wait_for(&web, 20, "post after reload", |p| {
        at(&p["body"], "/destination/port") == 7300
    });
}

// --- otlp -----------------------------------------------------------------

/// otlp_receiver.py in `ns`: decodes with the OpenTelemetry project's own
/// protobuf definitions, one JSON object per request.
fn otlp_receiver(ns: &Netns, args: &[&str]) -> Spawned {
    listening(ns, &support_script("otlp_receiver.py"), args)
}

/// An OTLP receiver on B4:4318 answering its first requests `answers`
/// (then 200), and the file it records into.
fn scripted_collector(pair: &Pair, dir: &Path, answers: &str) -> (Spawned, PathBuf) {
    let out = dir.join("otlp");
    let rx = otlp_receiver(
        &pair.b,
        &[B4, "4318", out.to_str().unwrap(), "--answers", answers],
    );
    (rx, out)
}

/// Enforcing, with the metrics endpoint [`metrics`] reads.
const WITH_METRICS: &str = "mode = \"enforce\"\n[metrics]\nlisten = \"127.0.0.1:9464\"\n";

/// The records of the requests in `file`, each with its request.
fn otlp_records(file: &Path) -> Vec<(Value, Value)> {
    let mut out = Vec::new();
    for req in received(file) {
        assert!(req.get("error").is_none(), "undecodable request: {req:#}");
        for rl in req["resource_logs"].as_array().unwrap() {
            for sl in rl["scopes"].as_array().unwrap() {
                for r in sl["records"].as_array().unwrap() {
                    out.push((req.clone(), r.clone()));
                }
            }
        }
    }
    out
}

fn record_port(r: &Value) -> Option<u64> {
    r["attributes"]["destination.port"].as_u64()
}

/// `doc`'s fields by dotted name, as the test reads ECS (not egret's code).
fn dotted(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                dotted(&name, v, out);
            }
        }
        _ => out.push((prefix.to_string(), v.clone())),
    }
}

#[test]
fn otlp_records_carry_the_resource_severity_body_and_every_ecs_field_typed() {
    let pair = Pair::new();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("otlp");
    let _rx = otlp_receiver(&pair.b, &[B4, "4318", out.to_str().unwrap()]);
    // Four records per request and a delay no test waits for: the four
    // incidents (a process's try at the collector's port, three callbacks)
    // must travel together.
    let policy = PolicyFile::new(&format!(
        r#"
mode = "enforce"

[[alerts]]
name = "otel"
type = "otlp"
endpoint = "http://{B4}:4318/otlp/"
headers = {{ Authorization = "Bearer t0ken" }}
actions = ["blocked"]
batch_size = 4
batch_delay = "1h"
"#
    ));
    let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    assert!(pair
        .a
        .nft_ruleset()
        .contains("comment \"alerts: sink otel\""));
    assert!(!pair.a.tcp_ok(None, B4, 4318), "the hole is egret's only");
    let java = Attempt::start(&pair.a, Some(NOBODY), &["try-tcp", B4, "1389"]);
    let _b = Attempt::start(&pair.a, Some(NOBODY), &["try-tcp", B4, "7401"]);
    let _c = Attempt::start(&pair.a, Some(NOBODY), &["try-udp", B4, "7402"]);
    let events: Vec<Value> = [4318, 1389, 7401, 7402]
        .iter()
        .map(|p| daemon.wait_event(10, "each attempt", |e| is_new(e, *p)))
        .collect();
    let req = wait_for(&out, 30, "one request of four records", |r| {
        r["resource_logs"][0]["scopes"][0]["records"]
            .as_array()
            .is_some_and(|a| a.len() == 4)
    });
    assert_eq!(received(&out).len(), 1, "the batch is one request");
    assert_eq!(req["path"], "/otlp/v1/logs");
    assert_eq!(req["content_type"], "application/x-protobuf");
    assert_eq!(req["content_encoding"], "gzip");
    assert_eq!(req["authorization"], "Bearer t0ken");
    assert!(req["user_agent"].as_str().unwrap().starts_with("egret/"));
    let rl = &req["resource_logs"][0];
    assert_eq!(
        rl["resource"]["host.name"],
        at(&events[0], "/host/name").clone()
    );
    assert_eq!(rl["resource"]["service.name"], "egret");
    assert_eq!(rl["resource"]["service.version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(rl["scopes"][0]["scope"]["name"], "egret");

    let records = otlp_records(&out);
    for e in &events {
        let port = at(e, "/destination/port").as_u64();
        let (_, r) = records
            .iter()
            .find(|(_, r)| record_port(r) == port)
            .unwrap_or_else(|| panic!("port {port:?}: {records:#?}"));
        assert_eq!(r["body"], at(e, "/message").clone());
        assert_eq!(r["severity_text"], "high", "new destinations");
        assert_eq!(r["severity_number"], 17, "high is ERROR");
        let time = humantime::parse_rfc3339(at(e, "/@timestamp").as_str().unwrap()).unwrap();
        let nanos = time
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        assert_eq!(r["time_unix_nano"].as_u64().map(u128::from), Some(nanos));
        assert!(r["observed_time_unix_nano"].as_u64().map(u128::from) >= Some(nanos));
        // Every ECS field, by its dotted name, with its JSON type.
        let mut fields = Vec::new();
        dotted("", e, &mut fields);
        let attrs = r["attributes"].as_object().unwrap();
        assert!(attrs.get("__duplicates__").is_none(), "{attrs:#?}");
        for (name, value) in &fields {
            if name == "message" || name == "@timestamp" {
                assert!(!attrs.contains_key(name), "{name} is not an attribute");
                continue;
            }
            assert_eq!(attrs.get(name), Some(value), "attribute {name}");
        }
        assert_eq!(attrs.len(), fields.len() - 2, "{attrs:#?}");
    }
    let (_, r) = records
        .iter()
        .find(|(_, r)| record_port(r) == Some(1389))
        .unwrap();
    let a = &r["attributes"];
    assert_eq!(a["process.pid"], java.pid, "an int attribute");
    assert_eq!(a["user.name"], "nobody");
    assert_eq!(a["egret.update"], false, "a bool attribute");
    assert!(a["event.type"]
        .as_array()
        .unwrap()
        .contains(&"denied".into()));
}

#[test]
fn otlp_over_https_with_a_private_ca_uncompressed() {
    let pair = Pair::new();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("otlp");
    let (ca, cert, key) = private_ca(tmp.path());
    let _rx = otlp_receiver(
        &pair.b,
        &[
            B4,
            "4318",
            out.to_str().unwrap(),
            "--tls",
            cert.to_str().unwrap(),
            key.to_str().unwrap(),
        ],
    );
    let policy = PolicyFile::new(&format!(
        "mode = \"enforce\"\n[[alerts]]\nname = \"otel\"\ntype = \"otlp\"\nendpoint = \"https://{B4}:4318\"\nca_file = \"{}\"\ncompression = \"none\"\nbatch_delay = \"100ms\"\n",
        ca.display()
    ));
    let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    let _a = Attempt::start(&pair.a, Some(NOBODY), &["try-tcp", B4, "1099"]);
    let e = daemon.wait_event(10, "the attempt", |e| is_new(e, 1099));
    let req = wait_for(&out, 30, "a record over TLS", |r| {
        r["resource_logs"][0]["scopes"][0]["records"]
            .as_array()
            .is_some_and(|a| a.iter().any(|r| record_port(r) == Some(1099)))
    });
    assert_eq!(req["path"], "/v1/logs");
    assert_eq!(req["content_encoding"], Value::Null, "compression = none");
    let records = otlp_records(&out);
    let (_, r) = records
        .iter()
        .find(|(_, r)| record_port(r) == Some(1099))
        .unwrap();
    assert_eq!(r["body"], at(&e, "/message").clone());
}

#[test]
fn a_collector_answering_503_then_200_gets_the_batch_once_after_its_retry_after() {
    let (pair, tmp) = (Pair::new(), tempfile::tempdir().unwrap());
    let (_rx, out) = scripted_collector(&pair, tmp.path(), "503");
    // A backoff no test waits for: the retry comes after the receiver's
    // Retry-After (1 s) or not at all.
    let policy = PolicyFile::new(&format!(
        r#"{WITH_METRICS}
[[alerts]]
name = "otel"
type = "otlp"
endpoint = "http://{B4}:4318"
actions = ["blocked"]
backoff = "10m"
batch_delay = "100ms"
"#
    ));
    let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    let _a = tcp_attempts(&pair, &daemon, &[7501]);
    wait_for(&out, 30, "the retried request", |r| r["answered"] == 200);
    let records = otlp_records(&out);
    let answered: Vec<u64> = records
        .iter()
        .filter(|(_, r)| record_port(r) == Some(7501))
        .map(|(req, _)| req["answered"].as_u64().unwrap())
        .collect();
    assert_eq!(answered, vec![503, 200], "sent, refused, sent again once");
    daemon.wait_until("the delivery is counted", 20, || {
        metric(&metrics(&pair.a), "egret_alerts_delivered_total", "otel") >= 1.0
    });
    let m = metrics(&pair.a);
    assert_eq!(
        metric(&m, "egret_alerts_delivered_total", "otel"),
        1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "egret_alerts_retries_total", "otel"), 1.0, "{m}");
    assert_eq!(metric(&m, "egret_alerts_failed_total", "otel"), 0.0, "{m}");
}

#[test]
fn a_down_collector_loses_no_stored_event_and_a_refusing_one_is_not_retried() {
    let (pair, tmp) = (Pair::new(), tempfile::tempdir().unwrap());
    let hook = tmp.path().join("hook");
    // 4318 answers its first request 400; nothing listens on 4319.
    let (_rx, out) = scripted_collector(&pair, tmp.path(), "400");
    let policy = PolicyFile::new(&format!(
        r#"{WITH_METRICS}
[[alerts]]
name = "down"
type = "otlp"
endpoint = "http://{B4}:4319"
retries = 1
backoff = "100ms"
timeout = "2s"
batch_delay = "100ms"

[[alerts]]
name = "refusing"
type = "otlp"
endpoint = "http://{B4}:4318"
actions = ["blocked"]
backoff = "100ms"
batch_delay = "100ms"

[[alerts]]
name = "hook"
type = "exec"
{}
actions = ["alert-failed"]
"#,
        exec_hook(&hook)
    ));
    let daemon = Running::start(&pair.a, &policy.state_dir(), &["--policy", policy.path()]);
    let ports: Vec<u16> = (7601..=7605).collect();
    let _attempts = tcp_attempts(&pair, &daemon, &ports);
    let failed = daemon.wait_event(30, "alert-failed for the down sink", |e| {
        at(e, "/event/action") == "alert-failed" && at(e, "/egret/alert/sink") == "down"
    });
    assert!(at(&failed, "/egret/alert/error")
        .as_str()
        .unwrap()
        .contains("10.1.0.2:4319"));
    wait_for(&hook, 20, "alert-failed at the hook", |v| {
        at(v, "/event/action") == "alert-failed" && at(v, "/egret/alert/sink") == "down"
    });
    let refused = daemon.wait_event(30, "alert-failed for the refusing sink", |e| {
        at(e, "/event/action") == "alert-failed" && at(e, "/egret/alert/sink") == "refusing"
    });
    assert!(
        at(&refused, "/egret/alert/error")
            .as_str()
            .unwrap()
            .contains("400"),
        "{refused:#}"
    );
    // Every port reached the refusing collector once: the refused batch
    // was not sent again, the ones after it were delivered.
    daemon.wait_until("every blocked event at the collector", 30, || {
        let got = otlp_records(&out);
        ports
            .iter()
            .all(|p| got.iter().any(|(_, r)| record_port(r) == Some(*p as u64)))
    });
    let records = otlp_records(&out);
    for p in &ports {
        let n = records
            .iter()
            .filter(|(_, r)| record_port(r) == Some(*p as u64))
            .count();
        assert_eq!(n, 1, "port {p}: {records:#?}");
    }
    let m = metrics(&pair.a);
    assert!(
        metric(&m, "egret_alerts_failed_total", "down") >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "egret_alerts_retries_total", "down") >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "egret_alerts_rejected_total", "refusing") >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "egret_alerts_retries_total", "refusing"),
        0.0,
        "{m}"
    );

    assert!(daemon.stop().success());
    let docs = stored_events(&pair.a, &policy);
    assert_blocked_stored(&docs, &ports);
}
