//! The Prometheus endpoint of `egret run`, scraped with curl after real
//! blocked traffic and a refused DNS query in a namespace.

mod common;

use std::time::{Duration, Instant};

use common::*;

const POLICY: &str = r#"
mode = "enforce"

[dns]
upstream = ["10.1.0.2"]

[proxy]
listen = "127.0.0.1:3128"

[metrics]
listen = "127.0.0.1:9464"

[[allow]]
name = "web"
hosts = ["allowed.test"]
ports = [443]

# So the alert sinks' families are rendered (and linted) too.
[[alerts]]
name = "page"
type = "exec"
command = ["/bin/true"]
"#;

fn scrape(ns: &Netns, path: &str) -> (String, String) {
    let out = ns
        .cmd(
            "curl",
            &[
                "-s",
                "-m",
                "5",
                "-w",
                "\n%{http_code}",
                &format!("http://127.0.0.1:9464{path}"),
            ],
        )
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
    (body.to_string(), code.to_string())
}

/// Prometheus's own linter (naming conventions, HELP/TYPE, suffixes) finds
/// nothing to say about the exposition.
fn promtool_clean(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus, scripts/deps.sh)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("writing to promtool");
    let out = child.wait_with_output().expect("promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}\n{text}"
    );
}

fn value(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_count_incidents_packets_dns_and_proxy_with_bounded_labels() {
    let pair = Pair::new();
    let a = &pair.a;
    let policy = PolicyFile::new(POLICY);
    let run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);

    assert!(!a.tcp_ok(None, B4, 9));
    let refused = a
        .cmd(
            "dig",
            &["+tries=1", "+time=2", "@127.0.0.1", "callback.evil.test"],
        )
        .output()
        .expect("dig");
    assert!(String::from_utf8_lossy(&refused.stdout).contains("REFUSED"));
    assert_eq!(
        a.status_via_proxy("http://127.0.0.1:3128", "http://nope.test/"),
        "403"
    );

    let deadline = Instant::now() + Duration::from_secs(15);
    let text = loop {
        let (text, code) = scrape(a, "/metrics");
        assert_eq!(code, "200", "{text}");
        let done = value(
            &text,
            "egret_incidents_total{action=\"blocked\",rule=\"default\"}",
        ) == Some(1.0)
            && value(
                &text,
                "egret_incidents_total{action=\"dns-refused\",rule=\"dns-guard\"}",
            ) == Some(1.0)
            && value(
                &text,
                "egret_incidents_total{action=\"proxy-denied\",rule=\"default\"}",
            ) == Some(1.0)
            && value(&text, "egret_kernel_logged_packets_total").is_some_and(|v| v >= 1.0);
        if done {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed the incidents:\n{text}\n{}",
            run.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        value(&text, "egret_packets_total{action=\"blocked\"}").is_some_and(|v| v >= 1.0),
        "{text}"
    );
    assert_eq!(value(&text, "egret_dns_refused_total"), Some(1.0), "{text}");
    // dig asked the guard itself: no query came through a local resolver.
    assert_eq!(
        value(
            &text,
            "egret_dns_queries_via_local_resolver_total{resolver=\"dnsmasq\"}"
        ),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "egret_proxy_denied_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "egret_lost_packets_total"),
        Some(0.0),
        "{text}"
    );
    assert!(
        value(&text, "egret_set_elements{set=\"h_web_v4\"}").is_some(),
        "{text}"
    );
    assert!(
        text.contains("# TYPE egret_incidents_total counter"),
        "{text}"
    );
    assert!(
        text.contains("egret_alerts_delivered_total{sink=\"page\"}")
            && text.contains("egret_alerts_failed_total{sink=\"page\"}"),
        "{text}"
    );
    promtool_clean(&text);
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (sample, v) = line.rsplit_once(' ').expect("name value");
        assert!(v.parse::<f64>().is_ok(), "{line}");
        assert!(sample.starts_with("egret_"), "{line}");
        // No unbounded labels: no addresses, ports or pids in label values.
        if let Some((_, labels)) = sample.split_once('{') {
            assert!(
                !labels.contains("10.1.0")
                    && !labels.contains("127.0.0.1")
                    && !labels.contains("pid"),
                "{line}"
            );
        }
    }
    assert_eq!(scrape(a, "/").1, "404");
    drop(run);
}
