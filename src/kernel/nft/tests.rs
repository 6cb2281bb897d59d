//! What egret writes it can read: encode → decode round trips.

use super::chain::decode_chain;
use super::rule::{decode_rule, rule_chain};
use super::set::{assemble_elements, decode_elements, decode_set, Point, ELEM_LIST_SET};
use super::table::decode_table_comment;
use super::*;
use crate::policy::{parse_str, Accounts};
use crate::ruleset::{compile, render, CompileInput, OpenFlow};

struct Ids;
impl Accounts for Ids {
    fn uid(&self, _: &str) -> Option<u32> {
        Some(1000)
    }
    fn gid(&self, _: &str) -> Option<u32> {
        Some(100)
    }
}

/// Encodes a ruleset as the kernel would receive it, then decodes the
/// messages as if they were dumped back: what egret writes it can read.
fn roundtrip(rs: &Ruleset) -> Ruleset {
    let mut batch = Batch::new(1);
    batch.replace_table(rs);
    batch.finish();
    let mut sets: Vec<Set> = Vec::new();
    let mut chains: Vec<Chain> = Vec::new();
    let mut points: HashMap<String, Vec<Point>> = HashMap::new();
    let mut comment = String::new();
    let mut table_count = 0;
    for m in messages(&batch.b.buf) {
        let p = &m.payload[4..];
        match m.msg_type & 0xff {
            x if x == MSG_NEWTABLE && m.msg_type >> 8 == NFNL_SUBSYS_NFTABLES => {
                table_count += 1;
                comment = decode_table_comment(p);
            }
            x if x == MSG_NEWSET => sets.push(decode_set(p).unwrap()),
            x if x == MSG_NEWSETELEM => {
                let name = attrs(p)
                    .find(|(k, _)| *k == ELEM_LIST_SET)
                    .map(|(_, v)| c_str(v))
                    .unwrap();
                let set = sets.iter().find(|s| s.name == name).unwrap();
                decode_elements(p, set, points.entry(name).or_default());
            }
            x if x == MSG_NEWCHAIN => chains.push(decode_chain(p)),
            x if x == MSG_NEWRULE => {
                let rule = decode_rule(p).unwrap();
                let chain = rule_chain(p);
                let c = chains.iter_mut().find(|c| c.name == chain).unwrap();
                c.rules.push(rule);
            }
            _ => {}
        }
    }
    assert_eq!(table_count, 2, "add + re-add around the delete");
    for set in &mut sets {
        set.elements = assemble_elements(set, points.remove(&set.name).unwrap_or_default());
    }
    Ruleset {
        comment,
        sets,
        chains,
    }
}

#[test]
fn a_full_policy_survives_encode_and_decode() {
    let text = r#"
scope = "host+containers"
[dns]
upstream = ["192.0.2.53", "[2001:db8::53]:5353"]
listen = "[::]:53"
intercept = true
container_listen = "[::]:10053"
[proxy]
listen = "0.0.0.0:3128"
[[allow]]
name = "mirrors"
hosts = ["*.debian.org"]
ports = [80, 443]
[[allow]]
name = "backups"
cidrs = ["10.20.0.0/16", "192.0.2.7", "2001:db8::/32", "0.0.0.0/1"]
ports = [22, "8000-8100"]
users = ["backup", 0]
groups = ["staff"]
units = ["borg.service"]
[[allow]]
name = "dns"
protocol = ["udp", "tcp", "icmp"]
cidrs = ["255.255.255.0/24", "::/0"]
[[allow]]
name = "web"
users = [33]
mode = "audit"
ports = [443]
"#;
    let policy = parse_str(text, std::path::Path::new("p.toml"), &Ids).unwrap();
    let mut input = CompileInput::default();
    input.units.insert("borg.service".into(), vec![(2, 4242)]);
    input.open_flows.push(OpenFlow {
        protocol: 6,
        local: "10.0.0.1:22".parse().unwrap(),
        remote: "10.0.0.2:5555".parse().unwrap(),
    });
    input.open_flows.push(OpenFlow {
        protocol: 6,
        local: "[2001:db8::1]:22".parse().unwrap(),
        remote: "[2001:db8::2]:5555".parse().unwrap(),
    });
    let mut rs = compile(&policy, &input);
    // Every hook egret writes: the containers' DNS redirect and input guard too.
    let hooks: Vec<Hook> = rs
        .chains
        .iter()
        .filter_map(|c| c.base.as_ref().map(|b| b.hook))
        .collect();
    for hook in [Hook::Output, Hook::Forward, Hook::Prerouting, Hook::Input] {
        assert!(hooks.contains(&hook), "{hook:?}");
    }
    let mut back = roundtrip(&rs);
    rs.sets.sort_by(|a, b| a.name.cmp(&b.name));
    back.sets.sort_by(|a, b| a.name.cmp(&b.name));
    for s in &mut rs.sets {
        s.elements.sort();
    }
    assert_eq!(back, rs);
}

#[test]
fn big_sets_are_split_into_messages_that_fit() {
    let elements: Vec<Element> = (0..20_000u128)
        .map(|i| Element::range(vec![i * 4], Some(vec![i * 4 + 1])))
        .collect();
    let rs = Ruleset {
        comment: "t".into(),
        sets: vec![Set {
            name: "big".into(),
            key: vec![Field::Ipv4],
            interval: true,
            timeout: false,
            size: None,
            verdict_map: false,
            elements: elements.clone(),
        }],
        chains: vec![],
    };
    let back = roundtrip(&rs);
    assert_eq!(back.sets[0].elements, elements);
}

/// Which `Match` variant `m` is. Exhaustive on purpose: a new variant does
/// not compile until it has a number here, and then
/// `every_match_and_verdict_survives_encode_and_decode` fails until it has a
/// sample in `every_match`.
fn match_kind(m: &Match) -> usize {
    match m {
        Match::OifName(_) => 0,
        Match::IifName(_) => 1,
        Match::CtState(_) => 2,
        Match::NfProto(_) => 3,
        Match::L4Proto(_) => 4,
        Match::Mark(_) => 5,
        Match::L4ProtoIn(_) => 6,
        Match::Daddr(..) => 7,
        Match::ProtoDport(_) => 8,
        Match::IcmpType(..) => 9,
        Match::SkUid(_) => 10,
        Match::SkGid(_) => 11,
        Match::Cgroup { .. } => 12,
        Match::FiveTuple(..) => 13,
        Match::TcpFlagsZero(_) => 14,
        Match::CtMarkSet(_) => 15,
        Match::Seen { .. } => 16,
        Match::Remember { .. } => 17,
        Match::BoundSocket => 18,
    }
}
const MATCH_KINDS: usize = 19;

/// One rule per match kind and spelling (each family, each id form), each
/// preceded by what the decoder reads it with (an ICMP type's `nfproto`).
fn every_match() -> Vec<Vec<Match>> {
    let set = |n: &str| n.to_string();
    let mut rules = vec![
        vec![Match::OifName("lo".into())],
        vec![Match::OifName("veth-with-a-lo".into())],
        vec![Match::IifName("docker0".into())],
        vec![Match::IifName("br-*".into())],
        vec![Match::CtState(CT_ESTABLISHED | CT_RELATED)],
        vec![Match::L4Proto(6)],
        vec![Match::L4Proto(6), Match::TcpFlagsZero(TCP_SYN)],
        vec![Match::TcpFlagsZero(0x14)],
        vec![Match::ProtoDport(set("svc")), Match::BoundSocket],
        vec![Match::Mark(0x6567_7274)],
        vec![Match::Mark(0x6567_7274), Match::CtMarkSet(0x6567_7275)],
        vec![Match::L4ProtoIn(set("protos"))],
        vec![Match::ProtoDport(set("svc"))],
        vec![Match::SkUid(IdMatch::Eq(33))],
        vec![Match::SkUid(IdMatch::Set(set("uids")))],
        vec![Match::SkGid(IdMatch::Eq(100))],
        vec![Match::SkGid(IdMatch::Set(set("gids")))],
        vec![Match::Cgroup {
            level: 2,
            set: set("cg"),
        }],
    ];
    for f in [Family::V4, Family::V6] {
        let (addrs, icmp, flows) = match f {
            Family::V4 => ("a4", "icmp4", "flows4"),
            Family::V6 => ("a6", "icmp6", "flows6"),
        };
        rules.push(vec![Match::NfProto(f), Match::Daddr(f, set(addrs))]);
        rules.push(vec![Match::NfProto(f), Match::IcmpType(f, set(icmp))]);
        rules.push(vec![Match::FiveTuple(f, set(flows))]);
        rules.push(vec![Match::Seen {
            family: f,
            set: novelty_set_name("r", f),
        }]);
        rules.push(vec![Match::Remember {
            family: f,
            set: novelty_set_name("r", f),
            timeout: 3600,
        }]);
    }
    rules
}

#[test]
fn every_match_and_verdict_survives_encode_and_decode() {
    let matches = every_match();
    let kinds: std::collections::BTreeSet<usize> =
        matches.iter().flatten().map(match_kind).collect();
    assert_eq!(
        kinds,
        (0..MATCH_KINDS).collect(),
        "every Match kind needs a sample in every_match()"
    );
    let verdicts = [
        Some(Verdict::Accept),
        Some(Verdict::Drop),
        Some(Verdict::RejectTcpReset),
        Some(Verdict::RejectAdminProhibited),
        Some(Verdict::Jump("other".into())),
        Some(Verdict::Redirect(5353)),
        Some(Verdict::DaddrVmap(Family::V4, "m4".into())),
        Some(Verdict::DaddrVmap(Family::V6, "m6".into())),
        None,
    ];
    let mut rules = Vec::new();
    for (i, m) in matches.into_iter().enumerate() {
        rules.push(Rule {
            matches: m,
            counter: (i % 2 == 0).then_some(Counter {
                packets: i as u64,
                bytes: 100 * i as u64,
            }),
            log: (i % 3 == 0).then(|| Log {
                group: 5,
                prefix: format!("{PREFIX_BLOCKED}:r{i}"),
            }),
            verdict: verdicts[i % verdicts.len()].clone(),
            comment: (i % 2 == 1).then(|| format!("rule {i}")),
        });
    }
    for v in verdicts {
        rules.push(Rule {
            matches: vec![],
            counter: None,
            log: None,
            verdict: v,
            comment: None,
        });
    }
    let key = |k: &[Field]| Set {
        name: String::new(),
        key: k.to_vec(),
        interval: false,
        timeout: false,
        size: None,
        verdict_map: false,
        elements: vec![],
    };
    let named = |name: &str, s: Set| Set {
        name: name.into(),
        ..s
    };
    let sets = vec![
        named("protos", key(&[Field::L4Proto])),
        named("svc", key(&[Field::L4Proto, Field::Port])),
        named("uids", key(&[Field::Uid])),
        named("gids", key(&[Field::Gid])),
        named("cg", key(&[Field::CgroupId])),
        named("a4", key(&[Field::Ipv4])),
        named("a6", key(&[Field::Ipv6])),
        named("icmp4", key(&[Field::IcmpType])),
        named("icmp6", key(&[Field::Icmpv6Type])),
        named(
            "flows4",
            key(&[
                Field::L4Proto,
                Field::Ipv4,
                Field::Port,
                Field::Ipv4,
                Field::Port,
            ]),
        ),
        Set {
            verdict_map: true,
            interval: true,
            // Adjacent stretches jumping to different chains, and one
            // reaching the top of the address space.
            elements: vec![
                Element {
                    jump: Some("other".into()),
                    ..Element::range(vec![0x0a00_0000], Some(vec![0x0a00_00ff]))
                },
                Element {
                    jump: Some("output2".into()),
                    ..Element::range(vec![0x0a00_0100], Some(vec![0x0a00_01ff]))
                },
                Element {
                    jump: Some("other".into()),
                    ..Element::range(vec![0xffff_ff00], Some(vec![0xffff_ffff]))
                },
            ],
            ..named("m4", key(&[Field::Ipv4]))
        },
        Set {
            verdict_map: true,
            interval: true,
            elements: vec![Element {
                jump: Some("other".into()),
                ..Element::range(vec![0], Some(vec![u128::MAX]))
            }],
            ..named("m6", key(&[Field::Ipv6]))
        },
        named(
            "flows6",
            key(&[
                Field::L4Proto,
                Field::Ipv6,
                Field::Port,
                Field::Ipv6,
                Field::Port,
            ]),
        ),
    ];
    let mut sets = sets;
    for f in [Family::V4, Family::V6] {
        sets.push(Set {
            timeout: true,
            size: Some(1000),
            ..named(&novelty_set_name("r", f), key(&novelty_key(f)))
        });
    }
    let rs = Ruleset {
        comment: "egret mode=enforce log_group=5".into(),
        sets,
        chains: vec![
            Chain {
                name: OUTPUT_CHAIN.into(),
                base: Some(BaseChain {
                    hook: Hook::Output,
                    nat: false,
                    priority: 0,
                    accept: false,
                }),
                rules,
            },
            Chain {
                name: "other".into(),
                base: None,
                rules: vec![],
            },
            Chain {
                name: "output2".into(),
                base: None,
                rules: vec![],
            },
        ],
    };
    assert_eq!(roundtrip(&rs), rs);
}

#[test]
fn a_dispatched_policy_survives_encode_and_decode() {
    let mut text = String::from("[dns]\nupstream = [\"192.0.2.53\"]\n");
    for i in 0..20 {
        text.push_str(&format!(
            "[[allow]]\nname = \"r{i}\"\ncidrs = [\"10.{i}.0.0/24\", \"2001:db8:{i}::/64\"]\nports = [{}]\nusers = [\"u\"]\n",
            8000 + i
        ));
        if i == 9 {
            text.push_str("[[allow]]\nname = \"web\"\nhosts = [\"example.com\"]\n");
        }
    }
    text.push_str(
        "[[allow]]\nname = \"wide\"\ncidrs = [\"10.0.0.0/8\", \"::/0\"]\nports = [443]\n",
    );
    let policy = parse_str(&text, std::path::Path::new("p.toml"), &Ids).unwrap();
    let mut rs = compile(&policy, &CompileInput::default());
    assert!(
        rs.set("dispatch0_v4").is_some_and(|m| m.verdict_map) && rs.set("dispatch1_v6").is_some(),
        "{}",
        render(&rs)
    );
    let mut back = roundtrip(&rs);
    rs.sets.sort_by(|a, b| a.name.cmp(&b.name));
    back.sets.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(back, rs);
}
