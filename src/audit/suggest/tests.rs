use proptest::prelude::*;

use super::*;
use crate::policy::{parse_str, Accounts, DnsConfig, Refusal};

struct Users;
impl Accounts for Users {
    fn uid(&self, name: &str) -> Option<u32> {
        match name {
            "nobody" => Some(65534),
            "app" => Some(1000),
            "root" => Some(0),
            _ => None,
        }
    }
    fn gid(&self, _: &str) -> Option<u32> {
        None
    }
}

fn with_dns() -> Policy {
    Policy {
        dns: Some(DnsConfig {
            listen: "127.0.0.1:53".parse().unwrap(),
            upstream: vec!["10.1.0.2:53".parse().unwrap()],
            refuse: Refusal::Refused,
            ttl_floor: std::time::Duration::from_secs(60),
            grace: std::time::Duration::from_secs(300),
            intercept: false,
            revalidate: true,
            container_listen: "0.0.0.0:10053".parse().unwrap(),
            cache_user: None,
        }),
        ..Policy::audit_default()
    }
}

fn seen(dst: &str, protocol: u8, port: Option<u16>, user: &str, domain: Option<&str>) -> Recorded {
    let uid = Users.uid(user);
    Recorded {
        kind: Kind::Packet,
        action: "would-block".into(),
        rule: "default".into(),
        flow: Attempt {
            dst: Some(dst.parse().unwrap()),
            protocol,
            port,
            uid,
            domain: domain.map(str::to_string),
            ..Attempt::default()
        },
        executable: Some("/usr/bin/curl".into()),
        user_name: uid.map(|_| user.to_string()),
        count: 3,
        first_seen: "2026-11-28T01:00:00.000Z".into(),
        last_seen: "2026-11-28T02:00:00.000Z".into(),
        host: None,
    }
}

fn parse(text: &str) -> Policy {
    parse_str(text, std::path::Path::new("suggested.toml"), &Users)
        .unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn run(recorded: &[Recorded], base: Option<&Policy>) -> String {
    suggest(&Input {
        recorded,
        base,
        source: "/var/lib/egret, last 24h",
        fleet: None,
    })
}

#[test]
fn a_fleet_gets_one_policy_with_host_counts_and_rare_flows_apart() {
    let base = with_dns();
    let hosts: BTreeSet<String> = (1..=10).map(|i| format!("web-{i:02}")).collect();
    let on = |r: Recorded, host: &str| Recorded {
        host: Some(host.into()),
        ..r
    };
    let mut flows = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        flows.push(on(
            seen("10.1.0.10", 6, Some(443), "app", Some("api.example.test")),
            h,
        ));
        if i < 9 {
            flows.push(on(
                seen("10.1.0.11", 6, Some(443), "app", Some("cdn.example.test")),
                h,
            ));
        }
    }
    flows.push(on(
        seen("203.0.113.9", 6, Some(4444), "app", None),
        "web-07",
    ));
    let fleet = FleetInput {
        hosts: &hosts,
        min_hosts: MinHosts::Percent(10.0).of(hosts.len()),
    };
    let text = suggest(&Input {
        recorded: &flows,
        base: Some(&base),
        source: "fleet.jsonl",
        fleet: Some(fleet),
    });
    let p = parse(&text);
    assert_eq!(p.rules.len(), 1, "the rare flow is not allowed: {text}");
    assert_eq!(p.rules[0].hosts.len(), 2, "{text}");
    assert!(text.contains("# seen on 10 of 10 hosts\n"), "{text}");
    assert!(
        text.contains("# seen on 1 of 10 hosts (web-07)\n"),
        "{text}"
    );
    assert!(text.contains("# cidrs = [\"203.0.113.9/32\"]"), "{text}");
    assert_eq!(MinHosts::Percent(10.0).of(1), 1);
    assert_eq!(MinHosts::Percent(10.0).of(40), 4);
    assert_eq!(MinHosts::parse("3"), Ok(MinHosts::Count(3)));
    assert!(MinHosts::parse("300%").is_err());
}

#[test]
fn one_rule_per_identity_and_purpose_names_where_known() {
    let base = with_dns();
    let flows = vec![
        seen(
            "10.1.0.10",
            6,
            Some(443),
            "nobody",
            Some("api.example.test"),
        ),
        seen(
            "10.1.0.11",
            6,
            Some(443),
            "nobody",
            Some("cdn.example.test"),
        ),
        seen("10.1.0.11", 6, Some(80), "nobody", Some("cdn.example.test")),
        seen("10.1.0.10", 6, Some(80), "nobody", Some("api.example.test")),
        seen("2001:db8::7", 17, Some(123), "root", None),
        seen("10.9.0.1", 1, None, "app", None),
    ];
    let text = run(&flows, Some(&base));
    let p = parse(&text);
    assert_eq!(p.mode, Mode::Enforce);
    let names: Vec<&str> = p.rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "user-app-icmp",
            "user-nobody-tcp-80-443",
            "user-root-udp-123"
        ],
        "{text}"
    );
    let web = &p.rules[1];
    assert_eq!(web.hosts.len(), 2);
    assert!(web.cidrs.is_empty(), "names, not addresses: {text}");
    assert_eq!(web.users, [65534]);
    assert!(text.contains("# seen 12 packet(s) in 4 incident(s), first 2026-11-28T01:00:00.000Z"));
    assert!(text.contains("# from /usr/bin/curl"));
    assert_eq!(p.rules[2].cidrs, ["2001:db8::7/128".parse().unwrap()]);
    for f in &flows {
        assert_eq!(
            evaluate(&p, &f.flow).outcome,
            Outcome::Allowed,
            "{f:?}\n{text}"
        );
    }
}

#[test]
fn different_destinations_do_not_share_ports() {
    let flows = vec![
        seen("10.1.0.10", 6, Some(443), "nobody", None),
        seen("10.1.0.11", 6, Some(22), "nobody", None),
    ];
    let p = parse(&run(&flows, None));
    assert_eq!(p.rules.len(), 2);
    let mut crossed = flows[0].flow.clone();
    crossed.port = Some(22);
    assert_eq!(evaluate(&p, &crossed).outcome, Outcome::Blocked);
}

#[test]
fn many_siblings_collapse_to_a_wildcard_and_say_so() {
    let base = with_dns();
    let names = ["a", "b", "c", "d"].map(|l| format!("{l}.cdn.example.test"));
    let mut flows: Vec<Recorded> = names
        .iter()
        .map(|n| seen("10.1.0.10", 6, Some(443), "nobody", Some(n)))
        .collect();
    let text = run(&flows[..3], Some(&base));
    assert!(!text.contains("*.cdn"), "three are not many: {text}");
    flows.push(seen(
        "10.1.0.12",
        6,
        Some(443),
        "nobody",
        Some("x.other.test"),
    ));
    let text = run(&flows, Some(&base));
    let p = parse(&text);
    let hosts: BTreeSet<String> = p.rules[0].hosts.iter().map(|h| h.to_string()).collect();
    assert_eq!(
        hosts,
        BTreeSet::from(["*.cdn.example.test".into(), "x.other.test".into()])
    );
    assert!(
        text.contains("# *.cdn.example.test: 4 names seen (a.cdn.example.test, b.cdn.example.test")
    );
}

#[test]
fn without_dns_names_become_addresses_with_a_note() {
    let flows = vec![seen(
        "10.1.0.10",
        6,
        Some(443),
        "nobody",
        Some("api.example.test"),
    )];
    let text = run(&flows, None);
    let p = parse(&text);
    assert_eq!(p.rules[0].cidrs, ["10.1.0.10/32".parse().unwrap()]);
    assert!(
        text.contains("# 10.1.0.10 was resolved from api.example.test"),
        "{text}"
    );
}

#[test]
fn the_audited_policy_is_kept_and_what_it_allows_is_not_suggested_again() {
    let base = parse(
        "mode = \"audit\"\n[dns]\nupstream = [\"10.1.0.2\"]\n[[allow]]\nname = \"web\"\nhosts = [\"api.example.test\"]\nports = [443]\nusers = [\"app\"]\nmode = \"audit\"\n",
    );
    let mut logged = seen("10.1.0.10", 6, Some(8443), "app", Some("api.example.test"));
    logged.rule = "web".into();
    let flows = [
        seen("10.1.0.10", 6, Some(443), "app", Some("api.example.test")),
        logged,
        seen("10.1.0.9", 17, Some(53), "app", None),
    ];
    let mut bypass = flows[2].clone();
    bypass.rule = "dns-bypass".into();
    let text = run(&[flows[0].clone(), flows[1].clone(), bypass], Some(&base));
    let p = parse(&text);
    let names: Vec<&str> = p.rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["web", "user-app-tcp-8443"], "{text}");
    assert_eq!(
        p.rules[0].mode,
        Some(Mode::Audit),
        "per-rule modes are the reviewer's call"
    );
    assert!(text.contains("# logged under rule web"));
    assert!(text.contains("DNS sent around the guard"));
    assert_eq!(p.dns, base.dns);
}

#[test]
fn quoting_survives_hostile_names() {
    let mut r = seen("10.1.0.10", 6, Some(443), "nobody", None);
    r.executable = Some("/tmp/evil\"\n[[allow]]\nname = \"x".into());
    r.user_name = Some("we\"ird".into());
    let text = run(&[r], None);
    let parsed = parse_str(&text, std::path::Path::new("s.toml"), &Users);
    let e = parsed.expect_err("an unknown user is an error, not an injection");
    assert!(
        e.to_string().contains("we\\\"ird") || e.to_string().contains("we\"ird"),
        "{e}"
    );
    let tables = text.lines().filter(|l| l.starts_with("[[allow]]")).count();
    assert_eq!(tables, 1, "{text}");
}

fn arb_recorded() -> impl Strategy<Value = Recorded> {
    (
        proptest::sample::select(vec![
            "10.1.0.10",
            "10.1.0.11",
            "192.0.2.1",
            "2001:db8::1",
            "2001:db8::2",
        ]),
        proptest::sample::select(vec![6u8, 17, 1, 58]),
        proptest::sample::select(vec![22u16, 53, 80, 81, 443]),
        proptest::sample::select(vec!["nobody", "app", "root", "ghost"]),
        proptest::sample::select(vec![
            None,
            Some("a.x.test"),
            Some("b.x.test"),
            Some("c.x.test"),
            Some("d.x.test"),
            Some("y.test"),
        ]),
        proptest::option::of(proptest::sample::select(vec![
            "app.service",
            "session-4.scope",
        ])),
        1u64..5,
    )
        .prop_map(|(dst, proto, port, user, domain, unit, count)| {
            let icmp = matches!(proto, 1 | 58);
            let dst = match (proto, dst.contains(':')) {
                (1, true) => "10.1.0.10",
                (58, false) => "2001:db8::1",
                _ => dst,
            };
            let mut r = seen(dst, proto, (!icmp).then_some(port), user, domain);
            r.flow.unit = unit.map(str::to_string);
            r.count = count;
            r
        })
}

proptest! {
    #[test]
    fn the_suggestion_allows_every_flow_seen_and_is_stable(
        flows in proptest::collection::vec(arb_recorded(), 0..12),
        dns in any::<bool>(),
    ) {
        let base = dns.then(with_dns);
        let text = run(&flows, base.as_ref());
        let p = parse(&text);
        for f in &flows {
            let d = evaluate(&p, &f.flow);
            // DNS around the guard cannot be allowed by any rule (it is listed instead).
            if d.rule == DNS_BYPASS_RULE {
                prop_assert!(text.contains("DNS sent around the guard"));
                continue;
            }
            prop_assert_eq!(d.outcome, Outcome::Allowed, "{:?}\n{}", f, text);
        }
        let mut reversed = flows.clone();
        reversed.reverse();
        prop_assert_eq!(run(&reversed, base.as_ref()), text);
    }
}
