use proptest::prelude::*;

use super::*;
use crate::policy::{BlockAction, DnsConfig, HostPattern, PortRange, Refusal, Scope};
use crate::ruleset::{
    compile, ip_to_u128, CompileInput, Element, Family, IdMatch, Match, Ruleset, Set, Verdict,
    CT_NEW, NOVELTY_PREFIX, OUTPUT_CHAIN, PREFIX_WOULD_BLOCK,
};

fn allow(name: &str) -> AllowRule {
    AllowRule::for_test(name)
}

fn policy(mode: Mode, dns: bool, rules: Vec<AllowRule>) -> Policy {
    Policy {
        dns: dns.then(|| DnsConfig {
            listen: "127.0.0.1:53".parse().unwrap(),
            upstream: vec!["192.0.2.53:53".parse().unwrap()],
            refuse: Refusal::Refused,
            ttl_floor: std::time::Duration::from_secs(60),
            grace: std::time::Duration::from_secs(300),
            intercept: false,
            revalidate: true,
            container_listen: "0.0.0.0:10053".parse().unwrap(),
            cache_user: None,
        }),
        rules,
        mode,
        block: BlockAction::Drop,
        ..Policy::audit_default()
    }
}

fn tcp(dst: &str, port: u16) -> Attempt {
    Attempt {
        dst: Some(dst.parse().unwrap()),
        protocol: IPPROTO_TCP,
        port: Some(port),
        ..Attempt::default()
    }
}

fn ports(list: &[(u16, u16)]) -> Vec<PortRange> {
    list.iter()
        .map(|&(first, last)| PortRange { first, last })
        .collect()
}

#[test]
fn first_matching_rule_decides_and_the_rest_falls_to_default() {
    let mut web = allow("web");
    web.cidrs = vec![
        "10.1.0.0/16".parse().unwrap(),
        "2001:db8::/32".parse().unwrap(),
    ];
    web.ports = ports(&[(443, 443), (8000, 8100)]);
    let mut all = allow("all-10");
    all.cidrs = vec!["10.0.0.0/8".parse().unwrap()];
    let p = policy(Mode::Enforce, false, vec![web, all]);
    let d = evaluate(&p, &tcp("10.1.2.3", 8050));
    assert_eq!((d.outcome, d.rule.as_str()), (Outcome::Allowed, "web"));
    assert_eq!(evaluate(&p, &tcp("2001:db8::1", 443)).rule, "web");
    assert_eq!(evaluate(&p, &tcp("10.1.2.3", 22)).rule, "all-10");
    let d = evaluate(&p, &tcp("2001:db9::1", 443));
    assert_eq!((d.outcome, d.rule.as_str()), (Outcome::Blocked, "default"));
    let udp = Attempt {
        protocol: IPPROTO_UDP,
        ..tcp("10.1.2.3", 443)
    };
    assert_eq!(
        evaluate(&p, &udp).outcome,
        Outcome::Blocked,
        "rules default to TCP"
    );
    let audit = policy(Mode::Audit, false, p.rules.clone());
    assert_eq!(evaluate(&audit, &udp).outcome, Outcome::WouldBlock);
}

#[test]
fn proxy_only_cidrs_allow_no_direct_packet() {
    let mut wiki = allow("wiki");
    wiki.cidrs = vec!["10.2.0.5/32".parse().unwrap()];
    wiki.via = crate::policy::Via::Proxy;
    let p = policy(Mode::Enforce, false, vec![wiki]);
    let d = evaluate(&p, &tcp("10.2.0.5", 443));
    assert_eq!((d.outcome, d.rule.as_str()), (Outcome::Blocked, "default"));
}

#[test]
fn baseline_and_dns_guard_come_before_the_rules() {
    let mut any = allow("any");
    any.cidrs = vec!["0.0.0.0/0".parse().unwrap()];
    any.protocols = vec![L4::Tcp, L4::Udp];
    let p = policy(Mode::Enforce, true, vec![any]);
    assert_eq!(evaluate(&p, &tcp("127.0.0.1", 1)).rule, BASELINE_RULE);
    let d = evaluate(&p, &tcp("192.0.2.1", 853));
    assert_eq!(
        (d.outcome, d.rule.as_str()),
        (Outcome::Blocked, "dns-bypass")
    );
    let icmp_error = Attempt {
        dst: Some("2001:db8::1".parse().unwrap()),
        protocol: IPPROTO_ICMPV6,
        icmp_type: Some(135),
        ..Attempt::default()
    };
    assert_eq!(evaluate(&p, &icmp_error).rule, BASELINE_RULE);
    let ping = Attempt {
        icmp_type: Some(128),
        ..icmp_error
    };
    assert_eq!(evaluate(&p, &ping).outcome, Outcome::Blocked);
    let mut intercept = p.clone();
    if let Some(d) = intercept.dns.as_mut() {
        d.intercept = true;
    }
    assert_eq!(
        evaluate(&intercept, &tcp("192.0.2.1", 53)).rule,
        DNS_GUARD_RULE
    );
}

/// A local cache behind the guard: over loopback, only the guard may ask
/// it (on any local address); programs still reach the guard on the same
/// port; the compiled ruleset says the same.
#[test]
fn only_the_guard_may_ask_its_local_cache() {
    let mut p = policy(Mode::Enforce, true, vec![]);
    if let Some(d) = p.dns.as_mut() {
        d.upstream = vec!["127.0.0.2:53".parse().unwrap()];
    }
    let rs = compile(&p, &CompileInput::default());
    let udp = |dst: &str, port: u16| Attempt {
        protocol: IPPROTO_UDP,
        ..tcp(dst, port)
    };
    for (flow, rule) in [
        (udp("127.0.0.2", 53), "dns-bypass"),
        (tcp("127.0.0.2", 53), "dns-bypass"),
        (udp("127.0.0.53", 53), "dns-bypass"),
        (udp("::1", 53), "dns-bypass"),
        (udp("127.0.0.1", 53), BASELINE_RULE),
        (tcp("127.0.0.2", 80), BASELINE_RULE),
    ] {
        let d = evaluate(&p, &flow);
        assert_eq!(d.rule, rule, "{flow:?}");
        assert_eq!((d.outcome, d.rule), interpret(&rs, &p, &flow), "{flow:?}");
    }
}

#[test]
fn host_patterns_need_the_guard_and_a_resolved_name() {
    let mut web = allow("web");
    web.hosts = vec![HostPattern::parse("*.example.test").unwrap()];
    web.ports = ports(&[(443, 443)]);
    let with_name = Attempt {
        domain: Some("api.example.test".into()),
        ..tcp("192.0.2.7", 443)
    };
    let p = policy(Mode::Enforce, true, vec![web.clone()]);
    let d = evaluate(&p, &with_name);
    assert_eq!(d.rule, "web");
    assert_eq!(d.host_pattern.as_deref(), Some("*.example.test"));
    assert_eq!(evaluate(&p, &tcp("192.0.2.7", 443)).rule, "default");
    let apex = Attempt {
        domain: Some("example.test".into()),
        ..with_name.clone()
    };
    assert_eq!(evaluate(&p, &apex).rule, "default");
    let no_guard = policy(Mode::Enforce, false, vec![web.clone()]);
    assert_eq!(evaluate(&no_guard, &with_name).rule, "default");
    web.via = Via::Proxy;
    let proxy_only = policy(Mode::Enforce, true, vec![web]);
    assert_eq!(evaluate(&proxy_only, &with_name).rule, "default");
}

#[test]
fn subjects_and_per_rule_audit_mode() {
    let mut app = allow("app");
    app.units = vec!["app.service".into()];
    app.users = vec![1000];
    app.cidrs = vec!["10.1.0.0/16".parse().unwrap()];
    app.mode = Some(Mode::Audit);
    let p = policy(Mode::Enforce, false, vec![app]);
    let from_app = |dst: &str| Attempt {
        uid: Some(1000),
        cgroup: Some("/system.slice/app.service/worker".into()),
        ..tcp(dst, 80)
    };
    assert_eq!(evaluate(&p, &from_app("10.1.0.1")).rule, "app");
    let d = evaluate(&p, &from_app("10.9.0.1"));
    assert_eq!((d.outcome, d.rule.as_str()), (Outcome::WouldBlock, "app"));
    let other_user = Attempt {
        uid: Some(0),
        ..from_app("10.9.0.1")
    };
    assert_eq!(evaluate(&p, &other_user).outcome, Outcome::Blocked);
    let unknown_uid = Attempt {
        uid: None,
        ..from_app("10.1.0.1")
    };
    assert_eq!(evaluate(&p, &unknown_uid).rule, "default");
    let by_unit_name = Attempt {
        cgroup: None,
        unit: Some("app.service".into()),
        ..from_app("10.1.0.1")
    };
    assert_eq!(evaluate(&p, &by_unit_name).rule, "app");
}

#[test]
fn a_unit_path_matches_from_the_root_only() {
    let mut r = allow("p");
    r.units = vec!["system.slice/app.service".into()];
    let p = policy(Mode::Enforce, false, vec![r]);
    let at = |cg: &str| Attempt {
        cgroup: Some(cg.into()),
        ..tcp("10.0.0.1", 1)
    };
    assert_eq!(evaluate(&p, &at("/system.slice/app.service")).rule, "p");
    assert_eq!(evaluate(&p, &at("/system.slice/app.service/x")).rule, "p");
    assert_eq!(
        evaluate(&p, &at("/user.slice/system.slice/app.service")).rule,
        "default"
    );
    assert_eq!(
        evaluate(&p, &at("/system.slice/app.service2")).rule,
        "default"
    );
}

// The compiled ruleset, interpreted: the evaluator must name the same rule
// and outcome as walking the output chain `compile` emits, for any policy and
// flow. Host sets hold what the guard would have put there: the flow's
// address, when its name matches the set's rule.

/// cgroup ids of the test units: `system.slice/uN.service` has id N.
fn unit_ids(units: &[String]) -> crate::ruleset::UnitCgroups {
    units
        .iter()
        .map(|u| {
            let n: u64 = u
                .trim_start_matches('u')
                .trim_end_matches(".service")
                .parse()
                .unwrap();
            (u.clone(), vec![(2, n)])
        })
        .collect()
}

fn cgroup_id_at(path: &str, level: u32) -> Option<u64> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let at = parts.get(level as usize - 1)?;
    (level == 2 && parts[0] == "system.slice")
        .then(|| {
            at.trim_start_matches('u')
                .trim_end_matches(".service")
                .parse()
                .ok()
        })
        .flatten()
}

fn in_set(set: &Set, values: &[u128]) -> bool {
    set.elements.iter().any(|e| holds(e, values))
}

fn holds(e: &Element, values: &[u128]) -> bool {
    let end = e.end.as_ref().unwrap_or(&e.key);
    e.key
        .iter()
        .zip(end)
        .zip(values)
        .all(|((lo, hi), v)| lo <= v && v <= hi)
}

fn interpret(rs: &Ruleset, policy: &Policy, flow: &Attempt) -> (Outcome, String) {
    walk(rs, OUTPUT_CHAIN, policy, flow).expect("the final rule matches everything")
}

/// The decision of chain `chain` (following jumps and verdict maps as the
/// kernel does), or `None` when the packet returns from it undecided.
fn walk(rs: &Ruleset, chain: &str, policy: &Policy, flow: &Attempt) -> Option<(Outcome, String)> {
    let dst = flow.dst.unwrap();
    let family = Family::of(&dst);
    let set = |name: &str| rs.set(name).unwrap();
    let host_set_holds = |name: &str| {
        let rule = name.trim_start_matches("h_").rsplit_once('_').unwrap().0;
        let r = policy.rules.iter().find(|r| r.name == rule).unwrap();
        flow.domain.as_deref().is_some_and(|d| r.allows_host(d))
    };
    let chain = rs.chains.iter().find(|c| c.name == chain).unwrap();
    for rule in &chain.rules {
        let hit = rule.matches.iter().all(|m| match m {
            Match::OifName(n) => n == "lo" && dst.is_loopback(),
            // A flow's first packet: a SYN for TCP, never seeded.
            Match::IifName(_)
            | Match::Mark(_)
            | Match::FiveTuple(..)
            | Match::TcpFlagsZero(_)
            | Match::BoundSocket => false,
            Match::CtState(bits) => bits & CT_NEW != 0,
            Match::CtMarkSet(_) => true,
            // Only in novelty chains, which accept whatever they match.
            Match::Seen { .. } | Match::Remember { .. } => false,
            Match::NfProto(f) => *f == family,
            Match::L4Proto(p) => *p == flow.protocol,
            Match::L4ProtoIn(s) => in_set(set(s), &[flow.protocol as u128]),
            Match::Daddr(f, s) if set(s).timeout => *f == family && host_set_holds(s),
            Match::Daddr(f, s) => *f == family && in_set(set(s), &[ip_to_u128(&dst)]),
            Match::ProtoDport(s) => flow
                .port
                .is_some_and(|p| in_set(set(s), &[flow.protocol as u128, p as u128])),
            Match::IcmpType(_, s) => flow.icmp_type.is_some_and(|t| in_set(set(s), &[t as u128])),
            Match::SkUid(IdMatch::Eq(u)) => flow.uid == Some(*u),
            Match::SkUid(IdMatch::Set(s)) => flow.uid.is_some_and(|u| in_set(set(s), &[u as u128])),
            Match::SkGid(IdMatch::Eq(g)) => flow.gid == Some(*g),
            Match::SkGid(IdMatch::Set(s)) => flow.gid.is_some_and(|g| in_set(set(s), &[g as u128])),
            Match::Cgroup { level, set: s } => flow
                .cgroup
                .as_deref()
                .and_then(|c| cgroup_id_at(c, *level))
                .is_some_and(|id| in_set(set(s), &[id as u128])),
        });
        if !hit {
            continue;
        }
        let logged_as = rule.log.as_ref().map(|l| {
            l.prefix
                .split_once(':')
                .and_then(|(_, rest)| rest.split_once(':'))
                .map(|(_, r)| r.to_string())
                .unwrap_or_else(|| DEFAULT_RULE.to_string())
        });
        let Some(verdict) = &rule.verdict else {
            continue;
        };
        if let Verdict::Jump(to) = verdict {
            if to.starts_with(NOVELTY_PREFIX) {
                // A novelty chain accepts whatever arrives, new or known:
                // the decision is the jumping allow rule's.
                let decided = walk(rs, to, policy, flow).map(|(o, _)| o);
                assert_eq!(decided, Some(Outcome::Allowed), "{to} decides");
                return Some((Outcome::Allowed, rule.comment.clone().unwrap_or_default()));
            }
        }
        let next = match verdict {
            Verdict::Jump(to) => Some(to.clone()),
            Verdict::DaddrVmap(f, map) => {
                assert_eq!(*f, family, "a vmap rule matches its family first");
                let map = set(map);
                assert!(map.verdict_map);
                let mut hits = map
                    .elements
                    .iter()
                    .filter(|e| holds(e, &[ip_to_u128(&dst)]));
                let hit = hits
                    .next()
                    .map(|e| e.jump.clone().expect("a map element jumps"));
                assert!(hits.next().is_none(), "map elements never overlap");
                hit
            }
            _ => None,
        };
        if matches!(verdict, Verdict::Jump(_) | Verdict::DaddrVmap(..)) {
            match next.and_then(|to| walk(rs, &to, policy, flow)) {
                Some(decided) => return Some(decided),
                None => continue,
            }
        }
        let comment = rule.comment.clone().unwrap_or_default();
        return Some(match (verdict, logged_as) {
            (Verdict::Accept, None) if comment.starts_with("baseline") => {
                (Outcome::Allowed, BASELINE_RULE.into())
            }
            (Verdict::Accept, None) => (Outcome::Allowed, comment),
            (Verdict::Accept, Some(r)) => {
                let prefix = &rule.log.as_ref().unwrap().prefix;
                assert!(prefix.starts_with(PREFIX_WOULD_BLOCK));
                (Outcome::WouldBlock, r)
            }
            (_, Some(r)) => (Outcome::Blocked, r),
            (v, None) => panic!("unlogged {v:?}"),
        });
    }
    None
}

prop_compose! {
    fn arb_rule(i: usize)(
        cidrs in proptest::sample::subsequence(vec!["10.0.0.0/8", "10.1.0.0/16", "192.0.2.0/24", "2001:db8::/32", "2001:db8:1::/48"], 0..3),
        hosts in proptest::sample::subsequence(vec!["a.test", "*.b.test", "c.*.test"], 0..2),
        protocols in proptest::sample::subsequence(vec![L4::Tcp, L4::Udp, L4::Icmp], 0..3),
        port_list in proptest::sample::subsequence(vec![(22, 22), (80, 443), (8080, 8080)], 0..3),
        users in proptest::sample::subsequence(vec![0u32, 1000], 0..2),
        units in proptest::sample::subsequence(vec!["u1.service", "u2.service"], 0..2),
        mode in proptest::option::of(prop_oneof![Just(Mode::Audit), Just(Mode::Enforce)]),
        proxy_only in proptest::bool::weighted(0.2),
    ) -> AllowRule {
        let mut r = allow(&format!("r{i}"));
        r.cidrs = cidrs.iter().map(|c| c.parse().unwrap()).collect();
        r.hosts = hosts.iter().map(|h| HostPattern::parse(h).unwrap()).collect();
        if proxy_only && !(r.cidrs.is_empty() && r.hosts.is_empty()) {
            r.via = crate::policy::Via::Proxy;
        }
        let ported = !protocols.is_empty() && !protocols.contains(&L4::Icmp);
        r.protocols = protocols;
        r.ports = if ported { ports(&port_list) } else { vec![] };
        r.users = users;
        r.units = units.iter().map(|u| u.to_string()).collect();
        r.mode = mode.filter(|_| r.has_subject());
        r
    }
}

/// `[novelty]` on: every accept of an allow rule becomes a jump to its
/// first-seen chain, which accepts; the decision and its rule stay.
fn with_novelty(p: Policy, on: bool) -> Policy {
    Policy {
        novelty: crate::policy::Novelty {
            enabled: on,
            ..Default::default()
        },
        ..p
    }
}

pub(crate) fn arb_policy() -> impl Strategy<Value = Policy> {
    (
        prop_oneof![Just(Mode::Audit), Just(Mode::Enforce)],
        any::<bool>(),
        (0..4usize).prop_flat_map(|n| (0..n).map(arb_rule).collect::<Vec<_>>()),
        any::<bool>(),
    )
        .prop_map(|(mode, dns, rules, novelty)| with_novelty(policy(mode, dns, rules), novelty))
}

prop_compose! {
    /// A rule of a long policy: mostly confined to overlapping CIDRs (so
    /// runs of them are dispatched by destination), sometimes a `hosts` or
    /// any-destination rule between them.
    fn arb_listed_rule(i: usize)(
        cidrs in proptest::sample::subsequence(vec![
            "0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "10.1.3.0/24",
            "192.0.2.0/25", "192.0.2.128/25", "2001:db8::/32", "2001:db8:1::/48", "::/0",
        ], 0..4),
        hosts in proptest::sample::subsequence(vec!["a.test", "*.b.test"], 0..2),
        with_hosts in proptest::bool::weighted(0.1),
        protocols in proptest::sample::subsequence(vec![L4::Tcp, L4::Udp, L4::Icmp], 0..3),
        port_list in proptest::sample::subsequence(vec![(22, 22), (80, 443), (8080, 8080)], 0..3),
        users in proptest::sample::subsequence(vec![0u32, 1000], 0..2),
        units in proptest::sample::subsequence(vec!["u1.service", "u2.service"], 0..2),
        mode in proptest::option::of(prop_oneof![Just(Mode::Audit), Just(Mode::Enforce)]),
    ) -> AllowRule {
        let mut r = allow(&format!("r{i}"));
        r.cidrs = cidrs.iter().map(|c| c.parse().unwrap()).collect();
        if with_hosts || r.cidrs.is_empty() {
            r.hosts = hosts.iter().map(|h| HostPattern::parse(h).unwrap()).collect();
        }
        let ported = !protocols.is_empty() && !protocols.contains(&L4::Icmp);
        r.protocols = protocols;
        r.ports = if ported { ports(&port_list) } else { vec![] };
        r.users = users;
        r.units = units.iter().map(|u| u.to_string()).collect();
        r.mode = mode.filter(|_| r.has_subject());
        r
    }
}

fn arb_long_policy() -> impl Strategy<Value = Policy> {
    (
        prop_oneof![Just(Mode::Audit), Just(Mode::Enforce)],
        any::<bool>(),
        (8..40usize).prop_flat_map(|n| (0..n).map(arb_listed_rule).collect::<Vec<_>>()),
        any::<bool>(),
    )
        .prop_map(|(mode, dns, rules, novelty)| with_novelty(policy(mode, dns, rules), novelty))
}

/// Flows to the edges of `arb_listed_rule`'s CIDRs.
fn arb_edge_flow() -> impl Strategy<Value = Attempt> {
    (
        arb_flow(),
        proptest::sample::select(vec![
            "9.255.255.255",
            "10.0.0.0",
            "10.1.1.255",
            "10.1.2.0",
            "10.1.2.2",
            "10.1.2.3",
            "10.1.2.4",
            "10.1.2.255",
            "10.1.3.0",
            "10.1.4.0",
            "10.255.255.255",
            "11.0.0.0",
            "192.0.2.127",
            "192.0.2.128",
            "192.0.2.255",
            "255.255.255.255",
            "2001:db8::",
            "2001:db8:1::5",
            "2001:db8:2::1",
            "2001:db9::",
            "ffff::1",
        ]),
    )
        .prop_map(|(flow, dst)| Attempt {
            dst: Some(dst.parse().unwrap()),
            ..flow
        })
}

pub(crate) fn arb_flow() -> impl Strategy<Value = Attempt> {
    (
        proptest::sample::select(vec![
            "10.1.2.3",
            "10.200.0.1",
            "192.0.2.9",
            "2001:db8::1",
            "2001:db8:1::5",
            "198.51.100.1",
            "127.0.0.1",
        ]),
        proptest::sample::select(vec![IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, IPPROTO_ICMPV6]),
        proptest::sample::select(vec![22u16, 53, 80, 300, 443, 853, 8080]),
        proptest::sample::select(vec![None, Some(0u32), Some(1000), Some(65534)]),
        proptest::sample::select(vec![
            None,
            Some("/system.slice/u1.service"),
            Some("/system.slice/u2.service/x"),
            Some("/system.slice/u3.service"),
        ]),
        proptest::sample::select(vec![
            None,
            Some("a.test"),
            Some("x.y.b.test"),
            Some("c.q.test"),
            Some("b.test"),
        ]),
        proptest::sample::select(vec![0u8, 3, 8, 12, 128, 135, 143]),
    )
        .prop_map(|(dst, protocol, port, uid, cgroup, domain, icmp)| {
            let icmp_proto = matches!(protocol, IPPROTO_ICMP | IPPROTO_ICMPV6);
            Attempt {
                dst: Some(dst.parse().unwrap()),
                protocol,
                port: (!icmp_proto).then_some(port),
                icmp_type: icmp_proto.then_some(icmp),
                uid,
                gid: None,
                cgroup: cgroup.map(str::to_string),
                unit: None,
                domain: domain.map(str::to_string),
            }
        })
}

proptest! {
    #[test]
    fn the_evaluator_agrees_with_the_compiled_ruleset(p in arb_policy(), flows in proptest::collection::vec(arb_flow(), 1..16)) {
        let units: Vec<String> = p.rules.iter().flat_map(|r| r.units.clone()).collect();
        let rs = compile(&p, &CompileInput { units: unit_ids(&units), open_flows: vec![] });
        for flow in &flows {
            let d = evaluate(&p, flow);
            let want = interpret(&rs, &p, flow);
            prop_assert_eq!((d.outcome, d.rule.clone()), want, "{:?}", flow);
        }
    }

    /// Long policies are dispatched by destination: the first match (the
    /// rule whose counter counts) is still the policy's first match.
    #[test]
    fn the_evaluator_agrees_with_the_dispatched_ruleset(p in arb_long_policy(), flows in proptest::collection::vec(arb_edge_flow(), 1..24)) {
        let units: Vec<String> = p.rules.iter().flat_map(|r| r.units.clone()).collect();
        let rs = compile(&p, &CompileInput { units: unit_ids(&units), open_flows: vec![] });
        for flow in &flows {
            let d = evaluate(&p, flow);
            let want = interpret(&rs, &p, flow);
            prop_assert_eq!((d.outcome, d.rule.clone()), want, "{:?}", flow);
        }
    }

    #[test]
    fn an_added_rule_never_blocks_what_was_allowed(p in arb_policy(), extra in arb_rule(9), flow in arb_flow()) {
        let before = evaluate(&p, &flow);
        let mut more = p.clone();
        more.rules.push(AllowRule { mode: None, ..extra });
        prop_assume!(more.rules.iter().all(|r| r.mode.is_none()));
        let after = evaluate(&more, &flow);
        if before.outcome == Outcome::Allowed {
            prop_assert_eq!(after, before);
        }
    }
}

#[test]
fn scope_is_ignored_for_host_flows() {
    let p = Policy {
        scope: Scope::HostAndContainers,
        ..policy(Mode::Enforce, false, vec![])
    };
    assert_eq!(evaluate(&p, &tcp("10.0.0.1", 1)).rule, "default");
}

#[test]
fn near_misses_say_what_a_rule_lacks() {
    let mut web = allow("web");
    web.cidrs = vec!["192.0.2.0/24".parse().unwrap()];
    web.ports = ports(&[(443, 443), (8000, 8100)]);
    let mut backup = allow("backup");
    backup.cidrs = vec!["198.51.100.7/32".parse().unwrap()];
    backup.ports = ports(&[(22, 22)]);
    backup.users = vec![34];
    // No destination list: it would "almost" match everything, so it is left out.
    let mut anywhere = allow("anywhere-ssh");
    anywhere.ports = ports(&[(22, 22)]);
    anywhere.users = vec![1];
    let p = policy(Mode::Enforce, false, vec![web, backup, anywhere]);
    let none = |_: &str, _: IpAddr| false;

    let wrong_port = near_misses(&p, &tcp("192.0.2.9", 22), &none);
    assert_eq!(wrong_port.len(), 1, "{wrong_port:?}");
    assert_eq!(wrong_port[0].0, "web");
    assert!(
        wrong_port[0].1.contains("ports 443, 8000-8100"),
        "{wrong_port:?}"
    );

    let wrong_user = near_misses(
        &p,
        &Attempt {
            uid: Some(0),
            ..tcp("198.51.100.7", 22)
        },
        &none,
    );
    assert_eq!(wrong_user.len(), 1, "{wrong_user:?}");
    assert!(
        wrong_user[0].1.contains("only for uids 34"),
        "{wrong_user:?}"
    );

    assert!(
        near_misses(&p, &tcp("192.0.2.9", 443), &none).is_empty(),
        "allowed: nothing missing"
    );
    assert!(
        near_misses(&p, &tcp("203.0.113.1", 22), &none).is_empty(),
        "no destination matches"
    );
}
