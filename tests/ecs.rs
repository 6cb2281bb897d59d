//! egret's documents checked against the Elastic Common Schema itself
//! (tests/fixtures/ecs/ecs_flat-v9.4.0.yml, Elastic's own flat field list):
//! every field outside `egret.*` exists with its ECS type, the categorization
//! fields take allowed values in allowed category/type pairs, and `ecs.version`
//! is there. First every kind of document egret's code builds, then everything
//! a real `egret run` in a namespace printed, stored and served.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use egret::monitor::attribution::{Attribution, Method, Process};
use egret::monitor::event::{self, LossFigures, ECS_VERSION};
use egret::monitor::event::{
    Action, DnsQuestion, ProxyRequest, ResolvedName, RevalidationNote, Subject,
};
use egret::monitor::incident::{Aggregator, Observation};
use egret::monitor::nflog::LoggedVerdict;
use egret::monitor::packet::{Flow, L4Header};
use egret::policy::Severity;
use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

const SCHEMA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/ecs/ecs_flat-v9.4.0.yml"
);

struct Schema {
    /// flat name → (ECS type, normalised to an array)
    fields: HashMap<String, (String, bool)>,
    /// field → allowed values (event.kind, event.category, event.type, event.outcome)
    allowed: HashMap<String, HashSet<String>>,
    /// category → the event.type values expected with it
    expected_types: HashMap<String, HashSet<String>>,
}

fn schema() -> &'static Schema {
    static SCHEMA_: OnceLock<Schema> = OnceLock::new();
    SCHEMA_.get_or_init(|| {
        let text = std::fs::read_to_string(SCHEMA).expect("the ECS fixture");
        let docs = YamlLoader::load_from_str(&text).expect("ECS YAML");
        let map = docs[0].as_hash().expect("a map of fields");
        let mut s = Schema {
            fields: HashMap::new(),
            allowed: HashMap::new(),
            expected_types: HashMap::new(),
        };
        let strings = |y: &Yaml| -> Vec<String> {
            y.as_vec()
                .map(|v| {
                    v.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        for (k, v) in map {
            let name = k.as_str().expect("field name").to_string();
            let ty = v["type"].as_str().expect("field type").to_string();
            let array = strings(&v["normalize"]).iter().any(|n| n == "array");
            if let Some(values) = v["allowed_values"].as_vec() {
                let mut set = HashSet::new();
                for a in values {
                    let value = a["name"].as_str().expect("allowed value").to_string();
                    if name == "event.category" {
                        s.expected_types.insert(
                            value.clone(),
                            strings(&a["expected_event_types"]).into_iter().collect(),
                        );
                    }
                    set.insert(value);
                }
                s.allowed.insert(name.clone(), set);
            }
            s.fields.insert(name, (ty, array));
        }
        assert!(s.fields.len() > 1000 && s.expected_types.contains_key("network"));
        s
    })
}

fn type_ok(ty: &str, v: &Value) -> bool {
    match ty {
        "keyword" | "constant_keyword" | "wildcard" | "match_only_text" | "text" => v.is_string(),
        "long" | "integer" | "short" | "byte" | "unsigned_long" => v.is_i64() || v.is_u64(),
        "float" | "double" | "scaled_float" | "half_float" => v.is_number(),
        "boolean" => v.is_boolean(),
        "date" => v
            .as_str()
            .is_some_and(|s| humantime::parse_rfc3339(s).is_ok()),
        "ip" => v.as_str().is_some_and(|s| s.parse::<IpAddr>().is_ok()),
        "object" | "flattened" | "nested" => v.is_object(),
        _ => false,
    }
}

fn leaves(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
    let s = schema();
    match v {
        Value::Object(map)
            if prefix.is_empty()
                || !s.fields.get(prefix).is_some_and(|(t, _)| {
                    matches!(t.as_str(), "object" | "flattened" | "nested")
                }) =>
        {
            for (k, v) in map {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                // egret's own namespace, which ECS leaves to the producer.
                if name != "egret" {
                    leaves(&name, v, out);
                }
            }
        }
        other => out.push((prefix.to_string(), other.clone())),
    }
}

fn strings_at(doc: &Value, pointer: &str) -> Vec<String> {
    match doc.pointer(pointer) {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

/// Everything in `doc` that ECS 9.4.0 does not allow (empty: conformant).
fn problems(doc: &Value) -> Vec<String> {
    let s = schema();
    let mut out = Vec::new();
    let mut fields = Vec::new();
    leaves("", doc, &mut fields);
    for (name, value) in &fields {
        let Some((ty, array)) = s.fields.get(name) else {
            out.push(format!("{name}: not an ECS field"));
            continue;
        };
        let ok = match value {
            Value::Array(items) => *array && items.iter().all(|i| type_ok(ty, i)),
            v => !*array && type_ok(ty, v),
        };
        if !ok {
            out.push(format!(
                "{name}: {value} is not {}{ty}",
                if *array { "an array of " } else { "" }
            ));
        }
        if let Some(allowed) = s.allowed.get(name) {
            for v in strings_at(doc, &format!("/{}", name.replace('.', "/"))) {
                if !allowed.contains(&v) {
                    out.push(format!("{name}: {v:?} is not an allowed value"));
                }
            }
        }
    }
    if doc.pointer("/ecs/version").and_then(Value::as_str) != Some(ECS_VERSION) {
        out.push(format!("ecs.version is not {ECS_VERSION:?}"));
    }
    for required in [
        "/@timestamp",
        "/event/kind",
        "/event/category",
        "/event/type",
        "/message",
        "/host/name",
    ] {
        if doc.pointer(required).is_none() {
            out.push(format!("{required} is missing"));
        }
    }
    let categories = strings_at(doc, "/event/category");
    for t in strings_at(doc, "/event/type") {
        let expected = categories.iter().any(|c| {
            s.expected_types
                .get(c)
                .is_some_and(|types| types.contains(&t))
        });
        if !expected {
            out.push(format!(
                "event.type {t:?} is not expected with event.category {categories:?}"
            ));
        }
    }
    out
}

fn assert_conformant(what: &str, doc: &Value) {
    let p = problems(doc);
    assert!(p.is_empty(), "{what}: {p:#?}\n{doc:#}");
}

// --- every kind of document egret builds -----------------------------------

const AT: Duration = Duration::from_millis(1_700_000_000_123);

fn when() -> SystemTime {
    SystemTime::UNIX_EPOCH + AT
}

fn process_who() -> Attribution {
    Attribution {
        method: Method::SockDiagProc,
        uid: Some(1000),
        gid: Some(1000),
        user_name: Some("app".into()),
        group_name: Some("app".into()),
        process: Some(Process {
            pid: 4242,
            name: Some("java".into()),
            executable: Some("/usr/bin/java".into()),
            command_line: Some("java -jar app.jar".into()),
            parent_pid: Some(1),
            parent_name: Some("systemd".into()),
        }),
        cgroup: Some("/system.slice/app.service".into()),
        unit: Some("app.service".into()),
        container_id: None,
        container_name: None,
        container_image: None,
        ingress: None,
        truncated: vec!["process.command_line"],
    }
}

fn container_who(method: Method) -> Attribution {
    Attribution {
        method,
        uid: None,
        gid: None,
        user_name: None,
        group_name: None,
        process: None,
        cgroup: None,
        unit: None,
        container_id: Some("4f2c1e0d9a8b".into()),
        container_name: Some("web".into()),
        container_image: Some("registry.example/nginx:1.25".into()),
        ingress: Some(("docker0".into(), "172.17.0.2".parse().unwrap())),
        truncated: Vec::new(),
    }
}

fn ports(src: &str, dst: &str, protocol: u8, port: u16) -> Flow {
    Flow {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        protocol,
        l4: L4Header::Ports {
            src: 40000,
            dst: port,
        },
    }
}

fn icmp(src: &str, dst: &str, protocol: u8, kind: u8) -> Flow {
    Flow {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        protocol,
        l4: L4Header::Icmp { kind, code: 0 },
    }
}

/// What was seen: a logged packet, a refused query or a denied proxy request.
enum Seen {
    Packet(Flow),
    Revalidated(Flow),
    AllowedNew(Flow),
    Question(DnsQuestion),
    Proxy(ProxyRequest),
    /// A name (or proxy host) only this wildcard allows, first asked.
    NameNew(DnsQuestion, &'static str),
    ProxyNew(ProxyRequest, &'static str),
}
use Seen::*;

/// What the daemon emits for one observation: the incident's document with
/// its severity (the first one, or an update).
fn observed(
    blocked: bool,
    rule: Option<&str>,
    seen: Seen,
    who: Attribution,
    resolved: Option<ResolvedName>,
    update: bool,
) -> Value {
    let verdict = LoggedVerdict {
        blocked,
        rule: rule.map(String::from),
    };
    let subject = match seen {
        Packet(f) => Subject::Packet(Some(f)),
        Question(q) => Subject::DnsQuery(Box::new(q)),
        Proxy(p) => Subject::ProxyRequest(Box::new(p)),
        Revalidated(f) => Subject::Revalidated(f),
        AllowedNew(f) => Subject::AllowedNew(f),
        NameNew(question, pattern) => Subject::NameNew(Box::new(event::NewName {
            question,
            pattern: pattern.into(),
        })),
        ProxyNew(request, pattern) => Subject::ProxyNew(Box::new(event::NewHost {
            request,
            pattern: pattern.into(),
        })),
    };
    let mut agg = Aggregator::new(7);
    let inc = agg
        .record(Observation {
            verdict: &verdict,
            subject,
            attribution: &who,
            resolved: resolved.as_ref(),
            at: when(),
        })
        .expect("a new incident")
        .clone();
    let mut doc = event::incident(&inc, update, "web1");
    event::set_severity(&mut doc, Severity::High);
    doc
}

fn packet(blocked: bool, flow: Flow) -> Value {
    observed(blocked, None, Packet(flow), process_who(), None, false)
}

fn question(blocked: bool, name: &str) -> Value {
    let q = DnsQuestion {
        name: name.into(),
        qtype: "A".into(),
        client: "127.0.0.1:5300".parse::<SocketAddr>().unwrap(),
        transport: "udp",
    };
    observed(
        blocked,
        Some("dns-guard"),
        Question(q),
        process_who(),
        None,
        false,
    )
}

fn proxy(blocked: bool, host: &str, ip: Option<&str>) -> Value {
    let p = ProxyRequest {
        host: host.into(),
        port: 443,
        method: "CONNECT".into(),
        client: "127.0.0.1:41000".parse().unwrap(),
        reason: "no rule allows it".into(),
        ip: ip.map(|i| i.parse().unwrap()),
    };
    observed(blocked, None, Proxy(p), process_who(), None, false)
}

/// Every kind of document egret makes, one line each: add new actions here.
#[rustfmt::skip]
fn documents() -> Vec<(&'static str, Value)> {
    let loss = LossFigures { kernel_logged: 10, received: 8, seq_lost: 1, unaccounted: 1, while_down: 0, enobufs: 1, dns_dropped: 2, proxy_dropped: 1 };
    let resolved = ResolvedName { name: "api.example.test".into(), asked_by: Some(process_who()), revalidation: None };
    let (v4, v6, dst4, dst6) = ("10.1.0.1", "2001:db8::1", "192.0.2.7", "2001:db8::2");
    vec![
        ("blocked tcp v4", packet(true, ports(v4, dst4, 6, 1389))),
        ("blocked tcp v6", packet(true, ports(v6, dst6, 6, 443))),
        ("blocked udp v4", packet(true, ports(v4, dst4, 17, 5353))),
        ("blocked udp v6", packet(true, ports(v6, dst6, 17, 5353))),
        ("blocked icmp v4", packet(true, icmp(v4, dst4, 1, 8))),
        ("blocked icmp v6", packet(true, icmp(v6, dst6, 58, 128))),
        ("blocked other protocol", packet(true, Flow { l4: L4Header::None, ..ports(v4, dst4, 47, 0) })),
        ("would-block", packet(false, ports(v4, dst4, 6, 1389))),
        ("an update", observed(true, None, Packet(ports(v4, dst4, 6, 22)), process_who(), None, true)),
        ("dns-bypass", observed(true, Some("dns-bypass"), Packet(ports(v4, "192.0.2.53", 17, 53)), process_who(), None, false)),
        ("blocked with a resolved name", observed(true, None, Packet(ports(v4, dst4, 6, 443)), process_who(), Some(resolved.clone()), false)),
        ("dns-revalidated", observed(false, Some("web"), Revalidated(ports(v4, dst4, 6, 443)), process_who(), Some(revalidation("revalidated", &[])), false)),
        ("blocked, a stale address", observed(true, None, Packet(ports(v4, dst4, 6, 443)), process_who(), Some(revalidation("stale", &["192.0.2.8", "2001:db8::8"])), false)),
        ("dns-refused", question(true, "callback.evil.test")),
        ("dns-refused, escaped labels", question(true, "sp\\040ace\\377.evil.test")),
        ("dns-would-refuse", question(false, "callback.evil.test")),
        ("proxy-denied name", proxy(true, "nope.test", None)),
        ("proxy-denied address", proxy(true, "192.0.2.9", Some("192.0.2.9"))),
        ("proxy would deny", proxy(false, "nope.test", None)),
        ("container, bridge", observed(true, Some("containers"), Packet(ports("172.17.0.2", dst4, 6, 80)), container_who(Method::Bridge), None, false)),
        ("container, runtime", observed(true, None, Packet(ports("172.17.0.2", dst4, 6, 80)), container_who(Method::ContainerRuntime), None, false)),
        ("allowed-new", observed(false, Some("web"), AllowedNew(ports(v4, dst4, 6, 443)), process_who(), Some(resolved.clone()), false)),
        ("name-new", observed(false, Some("web"), NameNew(DnsQuestion { name: "gist.githubusercontent.com".into(), qtype: "A".into(), client: "127.0.0.1:5300".parse().unwrap(), transport: "udp" }, "*.githubusercontent.com"), process_who(), None, false)),
        ("proxy-new", observed(false, Some("web"), ProxyNew(ProxyRequest { host: "gist.githubusercontent.com".into(), port: 443, method: "CONNECT".into(), client: "127.0.0.1:41000".parse().unwrap(), reason: String::new(), ip: None }, "*.githubusercontent.com"), process_who(), None, false)),
        ("preexisting", preexisting()),
        ("flood", flood()),
        ("tamper restored", event::tamper(when(), "deleted", true, "web1")),
        ("tamper not restored", event::tamper(when(), "changed", false, "web1")),
        ("heartbeat", event::heartbeat(when(), &loss, 3, "web1")),
        ("data-loss", event::data_loss(when(), 2, &loss, "web1")),
        ("nflog-taken", event::nflog_taken(when(), 7, "web1")),
        ("alert-failed", event::alert_failed(when(), "siem", 3, "connection refused", "web1")),
        ("alert-digest", event::alert_digest(when(), "siem", Duration::from_secs(60), &[("blocked".into(), Severity::High, 12)], 2, "web1")),
    ]
}

/// A blocked address's name, asked again.
fn revalidation(outcome: &'static str, current: &[&str]) -> ResolvedName {
    ResolvedName {
        name: "api.example.test".into(),
        asked_by: None,
        revalidation: Some(RevalidationNote {
            outcome,
            current: current.iter().map(|a| a.parse().unwrap()).collect(),
        }),
    }
}

/// One identity's new destinations past its rate fold into a flood incident.
fn flood() -> Value {
    let verdict = LoggedVerdict {
        blocked: true,
        rule: None,
    };
    let who = process_who();
    let mut agg = Aggregator::new(7);
    for port in 1..=1000u16 {
        let f = ports("10.1.0.1", "192.0.2.7", 6, port);
        let o = Observation {
            verdict: &verdict,
            subject: Subject::Packet(Some(f)),
            attribution: &who,
            resolved: None,
            at: when(),
        };
        if let Some(inc) = agg.record(o).filter(|i| i.action() == Action::Flood) {
            let mut doc = event::incident(inc, false, "web1");
            event::set_severity(&mut doc, Severity::High);
            return doc;
        }
    }
    panic!("1,000 new destinations at once never folded into a flood incident")
}

fn preexisting() -> Value {
    use egret::apply::Preexisting;
    use egret::audit::evaluate::{Decision, Outcome};
    use egret::kernel::sockets::OpenSocket;
    use egret::ruleset::OpenFlow;
    let c = Preexisting {
        socket: OpenSocket {
            flow: OpenFlow {
                protocol: 6,
                local: "10.1.0.1:40312".parse().unwrap(),
                remote: "192.0.2.7:7000".parse().unwrap(),
            },
            uid: 65534,
            inbound: false,
            listener: true,
            mark: None,
            cookie: 1,
        },
        decision: Decision {
            outcome: Outcome::Blocked,
            rule: "default".into(),
            index: None,
            host_pattern: None,
            why: "no rule allows it".into(),
        },
    };
    egret::run::preexisting::document(when(), &c, "web1")
}

#[test]
fn every_kind_of_document_conforms_to_ecs() {
    let mut failed = Vec::new();
    for (what, doc) in documents() {
        let p = problems(&doc);
        if !p.is_empty() {
            failed.push(format!("{what}: {p:#?}\n{doc}"));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}

#[test]
fn the_validator_catches_what_ecs_forbids() {
    let (_, good) = documents().swap_remove(0);
    assert_conformant("blocked", &good);
    let broken = |pointer: &str, value: Value| {
        let mut d = good.clone();
        *d.pointer_mut(pointer).unwrap() = value;
        problems(&d)
    };
    assert!(
        !broken("/destination/port", "1389".into()).is_empty(),
        "a long as text"
    );
    assert!(!broken("/source/ip", "not-an-ip".into()).is_empty());
    assert!(!broken("/@timestamp", "yesterday".into()).is_empty());
    assert!(
        !broken("/event/category", "network".into()).is_empty(),
        "must be an array"
    );
    assert!(
        !broken("/event/type", serde_json::json!(["error"])).is_empty(),
        "not with network"
    );
    assert!(!broken("/event/outcome", "denied".into()).is_empty());
    assert!(!broken("/event/kind", "incident".into()).is_empty());
    assert!(!broken("/ecs/version", "8.0.0".into()).is_empty());
    let mut d = good.clone();
    d["network"]["made_up"] = "x".into();
    assert!(!problems(&d).is_empty(), "unknown fields");
    d = good.clone();
    d["egret"]["made_up"] = "x".into();
    assert!(problems(&d).is_empty(), "egret.* is egret's own");
}

#[test]
fn categorization_follows_the_ecs_guide() {
    let by = |what: &str| {
        documents()
            .into_iter()
            .find(|(w, _)| *w == what)
            .map(|(_, d)| d)
            .unwrap()
    };
    // A firewall that blocks what its policy says succeeded (ECS's own
    // "firewall blocking a network connection" example); denied is the type.
    let b = by("blocked tcp v4");
    assert_eq!(at(&b, "/event/outcome"), "success");
    assert_eq!(
        at(&b, "/event/type"),
        &serde_json::json!(["connection", "denied"])
    );
    assert_eq!(at(&b, "/host/name"), "web1");
    let q = by("dns-refused, escaped labels");
    assert_eq!(at(&q, "/dns/type"), "query");
    // RFC 1035 decimal escapes, not hickory's octal: `sp<32>ace<255>`.
    assert_eq!(at(&q, "/dns/question/name"), "sp\\032ace\\255.evil.test");
    let f = by("alert-failed");
    assert_eq!(at(&f, "/error/message"), "connection refused");
    assert_eq!(at(&f, "/event/outcome"), "failure");
    assert_eq!(at(&by("nflog-taken"), "/event/outcome"), "failure");
    let n = by("allowed-new");
    assert_eq!(at(&n, "/event/action"), "allowed-new");
    assert_eq!(at(&n, "/event/outcome"), "success");
    assert_eq!(
        at(&n, "/event/type"),
        &serde_json::json!(["connection", "allowed"])
    );
    assert_eq!(at(&n, "/rule/name"), "web");
    for (what, dataset) in [("name-new", "egret.dns"), ("proxy-new", "egret.proxy")] {
        let n = by(what);
        assert_eq!(at(&n, "/event/action"), what);
        assert_eq!(at(&n, "/event/kind"), "event");
        assert_eq!(at(&n, "/event/dataset"), dataset);
        assert_eq!(
            at(&n, "/event/type"),
            &serde_json::json!(["protocol", "allowed"])
        );
        assert_eq!(at(&n, "/egret/novelty/pattern"), "*.githubusercontent.com");
        assert!(at(&n, "/egret/reason").is_null(), "{n:#}");
        assert!(at(&n, "/dns/response_code").is_null(), "{n:#}");
    }
}

// --- everything a real egret run makes --------------------------------------

const POLICY: &str = r#"
mode = "enforce"
heartbeat = "1s"

[dns]
upstream = ["10.1.0.2"]

[proxy]
listen = "127.0.0.1:3128"

[api]
listen = "127.0.0.1:9465"

# Cannot deliver: its failures are reported as alert-failed events.
[[alerts]]
name = "down"
type = "syslog"
target = "unix:///nonexistent/egret-test/log"
"#;

const ICMP_ECHO: &str = r#"
import socket, struct, sys
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff)
    return ~(s + (s >> 16)) & 0xffff
v6 = ":" in sys.argv[1]
body = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, 1, 1) + b"egret\0"
if not v6:
    body = body[:2] + struct.pack("!H", csum(body)) + body[4:]
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                  socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
try:
    s.sendto(body, (sys.argv[1], 0))
except OSError:
    pass
"#;

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn every_document_of_a_real_run_conforms_to_ecs() {
    let pair = Pair::new();
    let a = &pair.a;
    let policy = PolicyFile::new(POLICY);
    let run = Running::start(a, &policy.state_dir(), &["--policy", policy.path()]);

    assert!(!a.tcp_ok(Some(65534), B4, 1389));
    assert!(!a.tcp_ok(Some(65534), B6, 1389));
    let _udp = Attempt::start(a, Some(65534), &["try-udp", B4, "5353"]);
    let _udp6 = Attempt::start(a, Some(65534), &["try-udp", B6, "5353"]);
    for dst in [B4, B6] {
        run_ok(&mut a.cmd("/usr/bin/python3", &["-c", ICMP_ECHO, dst]));
    }
    let refused = a
        .cmd(
            "dig",
            &["+tries=1", "+time=2", "@127.0.0.1", "callback.evil.test"],
        )
        .output()
        .expect("dig");
    assert!(String::from_utf8_lossy(&refused.stdout).contains("REFUSED"));
    // The labels `sp<32>ace<255>`, in dig's (RFC 1035) presentation form.
    let odd = a
        .cmd(
            "dig",
            &[
                "+tries=1",
                "+time=2",
                "@127.0.0.1",
                "sp\\032ace\\255.evil.test",
            ],
        )
        .output()
        .expect("dig");
    assert!(String::from_utf8_lossy(&odd.stdout).contains("REFUSED"));
    assert_eq!(
        a.status_via_proxy("http://127.0.0.1:3128", "http://nope.test/"),
        "403"
    );
    run_ok(&mut a.cmd("nft", &["delete", "table", "inet", "egret"]));

    let wanted = [
        "blocked",
        "dns-refused",
        "proxy-denied",
        "tamper",
        "heartbeat",
        "alert-failed",
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = run.snapshot();
        let has = |action: &str| seen.iter().any(|e| at(e, "/event/action") == action);
        let icmp = |t: &str| {
            seen.iter()
                .any(|e| at(e, "/network/transport") == t && at(e, "/event/action") == "blocked")
        };
        let odd_name = seen
            .iter()
            .any(|e| at(e, "/dns/question/name") == "sp\\032ace\\255.evil.test");
        if wanted.iter().all(|w| has(w)) && icmp("icmp") && icmp("ipv6-icmp") && odd_name {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every kind of event came: {:#?}\n{}",
            seen.iter()
                .map(|e| at(e, "/event/action").clone())
                .collect::<Vec<_>>(),
            run.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The API serves what the store holds (written every 250 ms).
    let api = |path: &str| -> Value {
        let out = a
            .cmd(
                "curl",
                &["-s", "-m", "5", &format!("http://127.0.0.1:9465{path}")],
            )
            .output()
            .expect("curl");
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let served = loop {
        let v = api("/api/v1/events?limit=1000");
        let events = v["events"].as_array().cloned().unwrap_or_default();
        if events
            .iter()
            .any(|e| at(e, "/event/action") == "proxy-denied")
        {
            break events;
        }
        assert!(
            Instant::now() < deadline,
            "the API never served the events: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let printed = run.snapshot();
    assert!(run.stop().success());
    let stored = json_lines(&a.egret_ok(&["events", "--json", "--state-dir", &policy.state_dir()]));

    let mut failed = Vec::new();
    let mut checked = HashSet::new();
    for (source, docs) in [("stdout", &printed), ("store", &stored), ("API", &served)] {
        assert!(!docs.is_empty(), "nothing from the {source}");
        for doc in docs {
            checked.insert(at(doc, "/event/action").as_str().unwrap_or("?").to_string());
            let p = problems(doc);
            if !p.is_empty() {
                failed.push(format!("{source}: {p:#?}\n{doc}"));
            }
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
    println!("checked actions: {checked:?}");
}

/// Every kind of document, and what the sinks and `egret suggest` make of
/// it, byte for byte as the golden file has them: a refactor of the event
/// model changes none of it. `EGRET_BLESS=1` rewrites the file after an
/// intended change (review its diff).
#[test]
fn documents_and_their_readings_match_the_golden_file() {
    let mut docs = documents();
    let mut annotated = event::tamper(when(), "changed", false, "web1");
    egret::monitor::tamper::annotate(
        &mut annotated,
        &egret::monitor::tamper::Found {
            by: Some((Some(42), Some("nft".into()))),
            changes: vec!["rule added to chain output".into()],
            ..Default::default()
        },
    );
    docs.push(("tamper annotated", annotated));
    let pid = format!(" {} ", std::process::id());
    let mut out = String::new();
    for (what, doc) in &docs {
        let rfc5424 = egret::alert::syslog::format(doc, 1, "egret").replacen(&pid, " PID ", 1);
        out.push_str(&format!("== {what}\n{doc}\n"));
        out.push_str(&format!(
            "chat: {}\n",
            egret::alert::webhook::chat_text(doc)
        ));
        out.push_str(&format!("5424: {rfc5424}\n"));
        out.push_str(&format!(
            "recorded: {:?}\n",
            egret::audit::recorded::from_doc(doc)
        ));
    }
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ecs/documents.golden"
    );
    if std::env::var_os("EGRET_BLESS").is_some() {
        std::fs::write(path, &out).unwrap();
    }
    let golden = std::fs::read_to_string(path).unwrap();
    for (n, (want, got)) in golden.lines().zip(out.lines()).enumerate() {
        assert_eq!(got, want, "line {} of {path}", n + 1);
    }
    assert_eq!(out.lines().count(), golden.lines().count(), "{path}");
}
