//! `[novelty]` for names: a name only a rule's wildcard allows, asked of the
//! DNS guard (`name-new`) or of the proxy (`proxy-new`) by real clients (dig,
//! host, curl, Python) run as `nobody`, reported once per identity and never
//! again after a restart; a flood of new names folds with balanced books.
//! The upstream is dnsmasq in the other namespace, answering every name
//! under `cdn.test`.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// What dnsmasq answers for every name under cdn.test (TEST-NET-2, on b).
const WEB: &str = "198.51.100.10";
const METRICS: &str = "127.0.0.1:9464";

struct Lab {
    pair: Pair,
    _keep: Vec<Spawned>,
}

fn lab() -> Lab {
    let pair = Pair::new();
    add_addresses(&pair.a, &["198.51.100.1/24"]);
    add_addresses(&pair.b, &[&format!("{WEB}/24")]);
    // A TTL long enough that asking again is a cache hit.
    let records = [
        format!("--address=/cdn.test/{WEB}"),
        "--local-ttl=600".to_string(),
    ];
    let mut keep = vec![dnsmasq(&pair.b, &[B4], &records)];
    let http = pair
        .b
        .cmd(
            "/usr/bin/python3",
            &["-m", "http.server", "--bind", WEB, "80"],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("http.server");
    keep.push(Spawned(http));
    let deadline = Instant::now() + Duration::from_secs(10 * time_scale());
    loop {
        let answer = pair
            .b
            .cmd(
                "dig",
                &["+short", "+tries=1", &format!("@{B4}"), "x.cdn.test"],
            )
            .output()
            .expect("dig");
        let http = pair
            .b
            .cmd(
                "curl",
                &[
                    "-s",
                    "-o",
                    "/dev/null",
                    "-m",
                    "2",
                    &format!("http://{WEB}/"),
                ],
            )
            .status()
            .is_ok_and(|s| s.success());
        if String::from_utf8_lossy(&answer.stdout).trim() == WEB && http {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dnsmasq or http.server did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Lab { pair, _keep: keep }
}

/// `*.cdn.test` allowed by a wildcard, `www.cdn.test` written out.
fn policy(extra: &str) -> PolicyFile {
    PolicyFile::new(&format!(
        "mode = \"enforce\"\n\
         [dns]\nlisten = \"127.0.0.1:53\"\nupstream = [\"{B4}\"]\n\
         [proxy]\nlisten = \"127.0.0.1:3128\"\n\
         [metrics]\nlisten = \"{METRICS}\"\n\
         [novelty]\n{extra}\n\
         [[allow]]\nname = \"cdn\"\nhosts = [\"*.cdn.test\", \"www.cdn.test\"]\nports = [443]\n\
         [[allow]]\nname = \"web\"\nhosts = [\"*.cdn.test\"]\nvia = \"proxy\"\nports = [80]\n"
    ))
}

/// Asks the guard for `name`'s A record with `program` (dig or host) as nobody.
fn ask(ns: &Netns, program: &str, name: &str) -> String {
    let time = format!("{}", 2 * time_scale());
    let out = match program {
        "dig" => ns.as_nobody(
            "dig",
            &[
                "+short",
                "+tries=1",
                &format!("+time={time}"),
                "@127.0.0.1",
                name,
            ],
        ),
        "host" => ns.as_nobody("host", &["-t", "A", "-W", &time, name, "127.0.0.1"]),
        other => panic!("no {other}"),
    }
    .output()
    .expect("a DNS client");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn is_new(e: &Value, action: &str) -> bool {
    at(e, "/event/action") == action && at(e, "/egret/update") == false
}

fn news(d: &Running, action: &str) -> Vec<Value> {
    d.snapshot()
        .into_iter()
        .filter(|e| is_new(e, action))
        .collect()
}

/// A count from this daemon's books (`status --json`'s `monitor`).
fn book(d: &Running, pointer: &str) -> u64 {
    d.books()
        .and_then(|m| m.pointer(pointer).and_then(Value::as_u64))
        .unwrap_or(0)
}

/// One series of the metrics endpoint, e.g.
/// `egret_new_names_total{source="dns",outcome="known"}`.
fn metric(ns: &Netns, series: &str) -> u64 {
    let out = ns
        .cmd(
            "curl",
            &["-s", "-m", "5", &format!("http://{METRICS}/metrics")],
        )
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

fn outcome(source: &str, outcome: &str) -> String {
    format!("egret_new_names_total{{source=\"{source}\",outcome=\"{outcome}\"}}")
}

fn python_exe() -> String {
    std::fs::canonicalize("/usr/bin/python3")
        .expect("python3")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn a_new_name_under_a_wildcard_is_reported_once_per_identity_and_never_after_a_restart() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = policy("");
    let state_dir = policy.state_dir();
    let daemon = Running::start(a, &state_dir, &["--policy", policy.path()]);

    assert_eq!(ask(a, "dig", "gist.cdn.test"), WEB);
    let e = daemon.wait_event(10, "name-new for dig", |e| is_new(e, "name-new"));
    assert_eq!(at(&e, "/rule/name"), "cdn", "{e:#}");
    assert_eq!(at(&e, "/egret/novelty/pattern"), "*.cdn.test");
    assert_eq!(at(&e, "/dns/question/name"), "gist.cdn.test");
    assert_eq!(at(&e, "/process/executable"), "/usr/bin/dig");
    assert_eq!(at(&e, "/user/name"), "nobody");
    assert_eq!(at(&e, "/event/type"), &json!(["protocol", "allowed"]));
    assert_eq!(at(&e, "/egret/severity"), "high");
    assert!(
        at(&e, "/message")
            .as_str()
            .is_some_and(|m| m.contains("*.cdn.test") && m.contains("/usr/bin/dig")),
        "{e:#}"
    );

    // Asked again (now a cache hit) and a name a rule writes out: the guard
    // hands nothing more over; its books count the queries.
    assert_eq!(ask(a, "dig", "gist.cdn.test"), WEB);
    assert_eq!(ask(a, "dig", "www.cdn.test"), WEB);
    daemon.wait_until("the guard's books to count the queries", 10, || {
        book(&daemon, "/dns_guard/queries") >= 3
    });
    assert_eq!(book(&daemon, "/dns_guard/new_names"), 1);

    // Another executable of the same user, the same (cached) name: reported.
    assert!(ask(a, "host", "gist.cdn.test").contains(WEB));
    let e = daemon.wait_event(10, "name-new for host", |e| {
        is_new(e, "name-new") && at(e, "/process/executable") == "/usr/bin/host"
    });
    assert_eq!(at(&e, "/dns/question/name"), "gist.cdn.test");
    assert_eq!(
        news(&daemon, "name-new").len(),
        2,
        "{:#?}",
        daemon.snapshot()
    );

    // The store has both (written with the loop's next flush).
    daemon.wait_until("egret events to list both", 10, || {
        let listed = a.egret_ok(&[
            "events",
            "--json",
            "--action",
            "name-new",
            "--state-dir",
            &state_dir,
        ]);
        listed.lines().count() == 2
    });

    let top = a.egret_ok(&["top", "--state-dir", &state_dir]);
    assert!(
        top.contains("first seen, allowed (name-new), by process:")
            && top.contains("/usr/bin/host"),
        "{top}"
    );

    // Restart: the guard's filter starts empty and hands the name over
    // again; the store knows it.
    assert!(daemon.stop().success());
    let daemon = Running::start(a, &state_dir, &["--policy", policy.path()]);
    assert_eq!(ask(a, "dig", "gist.cdn.test"), WEB);
    daemon.wait_until("the store to know the name", 10, || {
        metric(a, &outcome("dns", "known")) >= 1
    });
    assert!(
        news(&daemon, "name-new").is_empty(),
        "re-reported after a restart: {:#?}",
        daemon.snapshot()
    );

    // `egret explain` says who asked the name first.
    let explained = a.egret_ok(&[
        "explain",
        "gist.cdn.test:443",
        "--policy",
        policy.path(),
        "--state-dir",
        &state_dir,
    ]);
    for who in ["exe:/usr/bin/dig", "exe:/usr/bin/host"] {
        assert!(
            explained.contains(&format!("name first asked: {who} of the DNS guard")),
            "{explained}"
        );
    }
}

#[test]
fn excluded_identities_and_rules_are_not_reported() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = policy("exclude_identities = [\"/usr/bin/host\"]\nexclude_rules = [\"web\"]\n");
    let daemon = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);
    assert!(ask(a, "host", "quiet.cdn.test").contains(WEB));
    daemon.wait_until("the exclusion to be counted", 10, || {
        metric(a, &outcome("dns", "excluded")) >= 1
    });
    // Through the proxy, under an excluded rule: not even handed over.
    let (code, _) = curl_via_proxy(a, "http://quiet.cdn.test/");
    assert_eq!(code, 200);
    daemon.wait_until("the proxy's books to count the request", 10, || {
        book(&daemon, "/proxy/requests") >= 1
    });
    assert_eq!(book(&daemon, "/proxy/new_hosts"), 0);
    // The same name from dig is still reported.
    assert_eq!(ask(a, "dig", "quiet.cdn.test"), WEB);
    daemon.wait_event(10, "name-new for dig", |e| is_new(e, "name-new"));
    assert_eq!(
        news(&daemon, "name-new").len(),
        1,
        "{:#?}",
        daemon.snapshot()
    );
    assert!(news(&daemon, "proxy-new").is_empty());
}

#[test]
fn during_the_learning_period_new_names_are_recorded_not_alerted() {
    let lab = lab();
    let a = &lab.pair.a;
    let hook_dir = tempfile::tempdir().unwrap();
    let hook = hook_dir.path().join("alerts.jsonl");
    let policy = policy(&format!(
        "learn = \"7d\"\n\
         [[alerts]]\nname = \"hook\"\ntype = \"exec\"\n\
         command = [\"/bin/sh\", \"-c\", \"cat >> {}\"]\nmin_severity = \"info\"\n",
        hook.display()
    ));
    let state_dir = policy.state_dir();
    let daemon = Running::start(a, &state_dir, &["--policy", policy.path()]);
    assert_eq!(ask(a, "dig", "learnt.cdn.test"), WEB);
    daemon.wait_event(10, "name-new", |e| is_new(e, "name-new"));
    // A refused name after it: alerted, so the hook works, and the new
    // name's alert, had there been one, went out before it.
    ask(a, "dig", "refused.example");
    daemon.wait_until("the refusal's alert", 20, || {
        std::fs::read_to_string(&hook).is_ok_and(|t| t.contains("\"dns-refused\""))
    });
    let alerted = std::fs::read_to_string(&hook).unwrap();
    assert!(!alerted.contains("name-new"), "{alerted}");
    // Recorded all the same (with the loop's next flush).
    daemon.wait_until("egret events to list it", 10, || {
        let listed = a.egret_ok(&[
            "events",
            "--json",
            "--action",
            "name-new",
            "--state-dir",
            &state_dir,
        ]);
        listed.lines().count() == 1
    });
}

/// Asks `n` distinct names under cdn.test from one UDP socket, 100 at a
/// time, each batch's answers awaited; prints how many were answered.
const ASK_MANY: &str = r#"
import socket, struct, sys
n = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
def query(i):
    name = b"".join(bytes([len(l)]) + l for l in f"n{i}.cdn.test".encode().split(b"."))
    return struct.pack(">HHHHHH", i & 0xFFFF, 0x0100, 1, 0, 0, 0) + name + b"\0" + struct.pack(">HH", 1, 1)
answered = 0
for start in range(0, n, 100):
    batch = range(start, min(n, start + 100))
    for i in batch:
        s.sendto(query(i), ("127.0.0.1", 53))
    for _ in batch:
        try:
            s.recv(512)
            answered += 1
        except socket.timeout:
            break
print(answered)
"#;

#[test]
fn a_flood_of_new_names_folds_with_balanced_books() {
    const N: u64 = 10_000;
    let lab = lab();
    let a = &lab.pair.a;
    let policy = policy("");
    let daemon = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);
    let out = a
        .as_nobody("/usr/bin/python3", &["-c", ASK_MANY, &N.to_string()])
        .output()
        .expect("python3");
    let answered: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(answered > 0, "{}", String::from_utf8_lossy(&out.stderr));
    // Every distinct name reached the guard's filter once: handed over.
    daemon.wait_until("the guard to hand over every name", 60, || {
        book(&daemon, "/dns_guard/new_names") >= N
    });
    assert_eq!(book(&daemon, "/dns_guard/new_names"), N);
    // Handed over = judged by the loop + dropped on a full pipeline.
    daemon.wait_until("the books to balance", 60, || {
        let judged: u64 = ["new", "known", "excluded"]
            .iter()
            .map(|o| metric(a, &outcome("dns", o)))
            .sum();
        judged + book(&daemon, "/loss/dns_dropped") == N
    });
    let new = metric(a, &outcome("dns", "new"));
    assert!(new > 0);
    // Each new name is one incident of its own or one count of a flood.
    daemon.wait_until("every new name accounted for", 30, || {
        let snap = daemon.snapshot();
        let own = snap.iter().filter(|e| is_new(e, "name-new")).count() as u64;
        let mut floods = std::collections::BTreeMap::new();
        for e in snap.iter().filter(|e| at(e, "/event/action") == "flood") {
            let count = at(e, "/egret/count").as_u64().unwrap_or(0);
            let c = floods.entry(at(e, "/event/id").to_string()).or_insert(0);
            *c = count.max(*c);
        }
        let folded: u64 = floods.values().sum();
        let done = !floods.is_empty() && own + folded == new;
        if !done {
            eprintln!("{own} incidents + {folded} folded in {floods:?}, {new} new");
        }
        done
    });
    let own = news(&daemon, "name-new").len();
    assert!(own < 1000, "{own} incidents: the flood did not fold");
    let flood = daemon.wait_event(5, "a flood", |e| at(e, "/event/action") == "flood");
    assert!(flood.to_string().contains(".cdn.test A (dns)"), "{flood:#}");
}

/// curl as nobody through the proxy: (HTTP status, pid).
fn curl_via_proxy(ns: &Netns, url: &str) -> (u16, u32) {
    let child = ns
        .as_nobody(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-m",
                "5",
                "-w",
                "%{http_code}",
                "-x",
                "http://127.0.0.1:3128",
                url,
            ],
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl");
    let pid = child.id();
    let out = child.wait_with_output().expect("curl");
    (
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0),
        pid,
    )
}

#[test]
fn the_proxy_reports_a_new_host_under_a_wildcard_once_per_identity() {
    let lab = lab();
    let a = &lab.pair.a;
    let policy = policy("");
    let state_dir = policy.state_dir();
    let daemon = Running::start(a, &state_dir, &["--policy", policy.path()]);

    assert_eq!(curl_via_proxy(a, "http://stage2.cdn.test/").0, 200);
    let e = daemon.wait_event(10, "proxy-new for curl", |e| is_new(e, "proxy-new"));
    assert_eq!(at(&e, "/rule/name"), "web", "{e:#}");
    assert_eq!(at(&e, "/egret/novelty/pattern"), "*.cdn.test");
    assert_eq!(at(&e, "/destination/domain"), "stage2.cdn.test");
    assert_eq!(at(&e, "/destination/port"), 80);
    assert_eq!(at(&e, "/http/request/method"), "GET");
    assert_eq!(at(&e, "/process/executable"), "/usr/bin/curl");
    assert_eq!(at(&e, "/user/name"), "nobody");
    assert_eq!(at(&e, "/event/type"), &json!(["protocol", "allowed"]));
    assert_eq!(at(&e, "/egret/severity"), "high");
    assert!(at(&e, "/egret/reason").is_null(), "{e:#}");

    // Again: nothing handed over.
    assert_eq!(curl_via_proxy(a, "http://stage2.cdn.test/").0, 200);
    daemon.wait_until("the proxy's books to count both requests", 10, || {
        book(&daemon, "/proxy/requests") >= 2
    });
    assert_eq!(book(&daemon, "/proxy/new_hosts"), 1);

    // Another executable (Python's urllib), as nobody: reported.
    let script = "import urllib.request as u, sys\n\
                  o = u.build_opener(u.ProxyHandler({'http': 'http://127.0.0.1:3128'}))\n\
                  sys.exit(0 if o.open('http://stage2.cdn.test/', timeout=5).status == 200 else 1)";
    let ok = a
        .as_nobody("/usr/bin/python3", &["-c", script])
        .status()
        .expect("python3");
    assert!(ok.success());
    let e = daemon.wait_event(10, "proxy-new for python", |e| {
        is_new(e, "proxy-new") && at(e, "/process/executable") == python_exe().as_str()
    });
    assert_eq!(at(&e, "/destination/domain"), "stage2.cdn.test");
    assert_eq!(
        news(&daemon, "proxy-new").len(),
        2,
        "{:#?}",
        daemon.snapshot()
    );

    // Restart: the store knows curl asked for it.
    assert!(daemon.stop().success());
    let daemon = Running::start(a, &state_dir, &["--policy", policy.path()]);
    assert_eq!(curl_via_proxy(a, "http://stage2.cdn.test/").0, 200);
    daemon.wait_until("the store to know the host", 10, || {
        metric(a, &outcome("proxy", "known")) >= 1
    });
    assert!(
        news(&daemon, "proxy-new").is_empty(),
        "re-reported after a restart: {:#?}",
        daemon.snapshot()
    );
}
