//! Policy → Ruleset. Pure: every fact from the running system (cgroup ids of
//! units, connections already open) comes in through [`CompileInput`].

use std::collections::{BTreeMap, BTreeSet};

use crate::policy::{AllowRule, BlockAction, Mode, Policy, Scope, Via, L4};

use super::*;

/// Unit (as written in the policy) → the cgroups it has now: (level, cgroup id).
pub type UnitCgroups = BTreeMap<String, Vec<(u32, u64)>>;

#[derive(Debug, Default, Clone)]
pub struct CompileInput {
    pub units: UnitCgroups,
    pub open_flows: Vec<OpenFlow>,
}

/// ICMP types a host must be able to send whatever the policy: errors.
const BASELINE_ICMP: &[u8] = &[3, 11, 12]; // destination-unreachable, time-exceeded, parameter-problem
/// ICMPv6 errors, and neighbour discovery and MLD without which IPv6 does not work.
const BASELINE_ICMPV6: &[u8] = &[1, 2, 3, 4, 130, 131, 132, 133, 135, 136, 143];

/// The level a unit's cgroup is expected at when it is not running yet:
/// a path counts its components; a bare unit name lives in a slice (level 2).
pub fn unit_default_level(unit: &str) -> u32 {
    if unit.contains('/') {
        unit.split('/').count() as u32
    } else {
        2
    }
}

pub fn table_comment(policy: &Policy) -> String {
    format!("egret mode={} log_group={}", policy.mode, policy.log_group)
}

pub fn compile(policy: &Policy, input: &CompileInput) -> Ruleset {
    let containers = policy.scope == Scope::HostAndContainers;
    let mut c = Compiler {
        sets: Vec::new(),
        rules: Vec::new(),
        nat_rules: Vec::new(),
        container_rules: Vec::new(),
        container_nat: Vec::new(),
        container_input: Vec::new(),
        allow_chains: Vec::new(),
        novelty_chains: Vec::new(),
    };
    // Before the baseline's loopback rule: the cache is reached over lo.
    c.local_cache(policy);
    c.baseline(&input.open_flows);
    c.dns_guard(policy);
    c.proxy(policy);
    c.alert_sinks(policy);
    let mut allowed = Vec::with_capacity(policy.rules.len());
    for rule in &policy.rules {
        let mut a = c.allow_rule(rule, input, policy.dns.is_some());
        // Forwarded packets have no local socket: rules that name users,
        // groups or units cannot apply to them.
        if containers && !rule.has_subject() {
            c.container_rules.extend(a.rules.iter().cloned());
        }
        // After the copy: forwarded packets have no socket, so no uid to
        // key a first-seen flow on; the container chain accepts plainly.
        c.novelty(rule, policy, &mut a.rules);
        allowed.push((rule.name.as_str(), a));
    }
    c.place_allow_rules(allowed);
    for rule in &policy.rules {
        if let Some(mode) = rule.mode.filter(|m| *m != policy.mode) {
            c.subject_override(rule, mode, policy, input);
        }
    }
    c.final_rules(policy);
    let mut container_bypass = if containers {
        c.container_dns(policy)
    } else {
        None
    };
    c.sets.sort_by(|a, b| a.name.cmp(&b.name));
    let mut chains = vec![Chain {
        name: OUTPUT_CHAIN.to_string(),
        base: Some(BaseChain {
            hook: Hook::Output,
            nat: false,
            priority: 0,
            accept: policy.mode == Mode::Audit,
        }),
        rules: c.rules,
    }];
    chains.append(&mut c.allow_chains);
    if containers {
        let mut rules = vec![Rule {
            counter: None,
            ..rule(
                vec![Match::CtState(CT_ESTABLISHED | CT_RELATED)],
                Verdict::Accept,
                "baseline: established and related",
            )
        }];
        // Container to container (Docker loads br_netfilter, so bridged
        // traffic passes the forward hook too): east-west, not egress.
        rules.extend(policy.container_interfaces.iter().map(|i| Rule {
            counter: None,
            ..rule(
                vec![Match::OifName(i.clone())],
                Verdict::Accept,
                format!("between containers behind {i}"),
            )
        }));
        // Plain DNS never gets here (prerouting gave it to the guard); what
        // does is DNS over TLS, or to another port the guard cannot see.
        if let Some(set) = container_bypass.take() {
            let log = Some(Log {
                group: policy.log_group,
                prefix: format!(
                    "{}:{DNS_BYPASS_RULE}",
                    match policy.mode {
                        Mode::Audit => PREFIX_WOULD_BLOCK,
                        Mode::Enforce => PREFIX_BLOCKED,
                    }
                ),
            });
            let verdict = match policy.mode {
                Mode::Audit => Verdict::Accept,
                Mode::Enforce => Verdict::Drop,
            };
            rules.push(Rule {
                log,
                ..rule(
                    vec![Match::ProtoDport(set)],
                    verdict,
                    "dns guard: DNS sent around the guard from a container",
                )
            });
        }
        rules.append(&mut c.container_rules);
        let log = Some(Log {
            group: policy.log_group,
            prefix: format!(
                "{}:{CONTAINERS_CHAIN}",
                match policy.mode {
                    Mode::Audit => PREFIX_WOULD_BLOCK,
                    Mode::Enforce => PREFIX_BLOCKED,
                }
            ),
        });
        let last = match policy.mode {
            Mode::Audit => Verdict::Accept,
            Mode::Enforce => Verdict::Drop,
        };
        rules.push(Rule {
            log,
            ..rule(
                vec![],
                last,
                "containers: log the rest and block it (audit: let it pass)",
            )
        });
        chains.push(Chain {
            name: CONTAINERS_CHAIN.to_string(),
            base: None,
            rules,
        });
        chains.push(Chain {
            name: FORWARD_CHAIN.to_string(),
            base: Some(BaseChain {
                hook: Hook::Forward,
                nat: false,
                priority: 0,
                accept: true,
            }),
            rules: policy
                .container_interfaces
                .iter()
                .map(|i| {
                    rule(
                        vec![Match::IifName(i.clone())],
                        Verdict::Jump(CONTAINERS_CHAIN.into()),
                        format!("containers behind {i}"),
                    )
                })
                .collect(),
        });
    }
    if !c.container_nat.is_empty() {
        chains.push(Chain {
            name: CONTAINER_DNS_CHAIN.to_string(),
            base: Some(BaseChain {
                hook: Hook::Prerouting,
                nat: true,
                priority: -100,
                accept: true,
            }),
            rules: std::mem::take(&mut c.container_nat),
        });
    }
    if !c.container_input.is_empty() {
        chains.push(Chain {
            name: CONTAINER_SERVICES_CHAIN.to_string(),
            base: Some(BaseChain {
                hook: Hook::Input,
                nat: false,
                priority: 0,
                accept: true,
            }),
            rules: std::mem::take(&mut c.container_input),
        });
    }
    chains.append(&mut c.novelty_chains);
    if !c.nat_rules.is_empty() {
        chains.push(Chain {
            name: DNS_INTERCEPT_CHAIN.to_string(),
            base: Some(BaseChain {
                hook: Hook::Output,
                nat: true,
                priority: -100,
                accept: true,
            }),
            rules: c.nat_rules,
        });
    }
    Ruleset {
        comment: table_comment(policy),
        sets: c.sets,
        chains,
    }
}

struct Compiler {
    sets: Vec<Set>,
    /// The output filter chain.
    rules: Vec<Rule>,
    /// The DNS intercept nat chain, when there is one.
    nat_rules: Vec<Rule>,
    /// What forwarded container traffic may do (scope = "host+containers").
    container_rules: Vec<Rule>,
    /// Container DNS redirected to the guard (nat, prerouting).
    container_nat: Vec<Rule>,
    /// Who may reach egret's container listeners (filter, input).
    container_input: Vec<Rule>,
    /// Dispatched allow rules' chains and the chains for overlapping ones.
    allow_chains: Vec<Chain>,
    /// One chain per allow rule with novelty on (`novelty_chain_name`).
    novelty_chains: Vec<Chain>,
}

/// The kernel rules of one allow rule, and where they can match.
struct AllowRules {
    rules: Vec<Rule>,
    /// Per family (v4, v6), the merged ranges of the rule's static CIDR
    /// sets, when every one of its rules matches one of them; `None` when
    /// one may match any address or a DNS guard set (filled at run time).
    confined: Option<[Vec<(u128, u128)>; 2]>,
}

/// From this many consecutive allow rules confined to CIDRs on, they are
/// reached through a verdict map on the destination instead of in turn; a
/// few rules cost little walked in turn, and `plan` reads better linearly.
const DISPATCH_MIN_RULES: usize = 8;

/// The protocols whose flows novelty tracks: those with a destination port
/// (for others `th dport` is not a port); and the static set of them.
const NOVELTY_PROTOS: [u8; 3] = [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP];
const NOVELTY_PROTOS_SET: &str = "novelty_protos";

/// Below this many single addresses beside ranges, they stay in the interval set.
const HASHED_ADDRESSES_MIN: usize = 16;

/// From this many elements on, a hash set is loaded with a fixed size.
const SIZED_SET_MIN: usize = 1024;

/// The families a listener on `ip` answers (`::` is dual-stack).
fn listen_families(ip: std::net::IpAddr) -> Vec<Family> {
    match ip {
        std::net::IpAddr::V4(_) => vec![Family::V4],
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => vec![Family::V4, Family::V6],
        std::net::IpAddr::V6(_) => vec![Family::V6],
    }
}

fn rule(matches: Vec<Match>, verdict: Verdict, comment: impl Into<String>) -> Rule {
    Rule {
        matches,
        counter: Some(Counter::default()),
        log: None,
        verdict: Some(verdict),
        comment: Some(comment.into()),
    }
}

impl Compiler {
    fn add_set(
        &mut self,
        name: String,
        key: Vec<Field>,
        interval: bool,
        elements: Vec<Element>,
    ) -> String {
        // Unit cgroup sets are refilled at run time (a restarted unit gets a
        // new cgroup id) and may grow, so they never get a fixed size.
        let fixed = !interval && elements.len() >= SIZED_SET_MIN && key != [Field::CgroupId];
        self.sets.push(Set {
            name: name.clone(),
            key,
            interval,
            timeout: false,
            size: fixed.then(|| u32::try_from(elements.len()).unwrap_or(u32::MAX)),
            verdict_map: false,
            elements,
        });
        name
    }

    /// A set the DNS guard fills at run time; elements expire.
    fn add_timeout_set(&mut self, name: String, field: Field) -> String {
        self.sets.push(Set {
            name: name.clone(),
            key: vec![field],
            interval: false,
            timeout: true,
            size: None,
            verdict_map: false,
            elements: Vec::new(),
        });
        name
    }

    /// With a DNS guard: its upstream queries (marked) may leave; any other
    /// DNS, DNS-over-TLS or DNS-over-QUIC is blocked and logged, whatever the
    /// allow rules say, so names cannot be resolved around the guard.
    fn dns_guard(&mut self, policy: &Policy) {
        let Some(dns) = &policy.dns else { return };
        let ports = |list: &[u16]| -> Vec<Element> {
            let mut v: Vec<Element> = [IPPROTO_TCP, IPPROTO_UDP]
                .iter()
                .flat_map(|&p| {
                    list.iter().map(move |&port| {
                        Element::range(
                            vec![p as u128, port as u128],
                            Some(vec![p as u128, port as u128]),
                        )
                    })
                })
                .collect();
            v.sort();
            v.dedup();
            v
        };
        // A local cache is reached over lo, before the baseline (`local_cache`).
        let remote: Vec<&std::net::SocketAddr> = dns
            .upstream
            .iter()
            .filter(|a| !a.ip().is_loopback())
            .collect();
        let upstream_ports: Vec<u16> = remote.iter().map(|a| a.port()).collect();
        let svc = (!remote.is_empty()).then(|| {
            self.add_set(
                "dns_upstream_svc".into(),
                vec![Field::L4Proto, Field::Port],
                true,
                ports(&upstream_ports),
            )
        });
        for family in [Family::V4, Family::V6] {
            let Some(svc) = &svc else { break };
            let mut ips: Vec<Element> = remote
                .iter()
                .filter(|a| Family::of(&a.ip()) == family)
                .map(|a| Element::single(vec![ip_to_u128(&a.ip())]))
                .collect();
            if ips.is_empty() {
                continue;
            }
            ips.sort();
            ips.dedup();
            let (name, field) = match family {
                Family::V4 => ("dns_upstream_v4", Field::Ipv4),
                Family::V6 => ("dns_upstream_v6", Field::Ipv6),
            };
            let set = self.add_set(name.into(), vec![field], false, ips);
            self.rules.push(rule(
                vec![
                    Match::Mark(policy.mark),
                    Match::NfProto(family),
                    Match::Daddr(family, set),
                    Match::ProtoDport(svc.clone()),
                ],
                Verdict::Accept,
                "dns guard: its upstream resolvers",
            ));
        }
        if dns.intercept {
            self.dns_intercept(policy);
        }
        let dns_ports = self.dns_ports_set();
        if !dns.local_upstream().is_empty() {
            self.rules.push(rule(
                vec![
                    Match::Mark(cache_mark(policy.mark)),
                    Match::ProtoDport(dns_ports.clone()),
                ],
                Verdict::Accept,
                "dns guard: its local cache's upstream queries",
            ));
            if let Some(uid) = dns.cache_user {
                self.rules.push(rule(
                    vec![
                        Match::SkUid(IdMatch::Eq(uid)),
                        Match::ProtoDport(dns_ports.clone()),
                    ],
                    Verdict::Accept,
                    "dns guard: its local cache's upstream queries (cache_user)",
                ));
            }
        }
        self.log_then(
            vec![Match::ProtoDport(dns_ports)],
            policy.mode,
            policy,
            DNS_BYPASS_RULE,
            "dns guard: DNS sent around the guard".into(),
        );
    }

    /// A local cache behind the guard (`upstream` on loopback): programs ->
    /// guard -> cache -> world. Only the guard may ask the cache: the guard's
    /// new queries to the cache's port over lo (its mark) are accepted and
    /// their conntrack entry gets the cache mark, which dnsmasq `--conntrack`
    /// copies onto the upstream queries it makes for them (`dns_guard`
    /// accepts those); programs still reach the guard on its own address;
    /// every other new query to the cache's port, on any local address, is
    /// `dns-bypass`. Goes before the baseline's `oifname "lo"` accept.
    fn local_cache(&mut self, policy: &Policy) {
        let Some(dns) = &policy.dns else { return };
        let local = dns.local_upstream();
        if local.is_empty() {
            return;
        }
        let ports: Vec<u16> = local.iter().map(|a| a.port()).collect();
        let svc = self.port_set("dns_cache_svc", &ports);
        let new_on_lo = || vec![Match::OifName("lo".into()), Match::CtState(CT_NEW)];
        let mut guard = new_on_lo();
        guard.extend([
            Match::Mark(policy.mark),
            Match::ProtoDport(svc.clone()),
            Match::CtMarkSet(cache_mark(policy.mark)),
        ]);
        self.rules.push(rule(
            guard,
            Verdict::Accept,
            "dns guard: its queries to the local cache",
        ));
        // The guard itself may share the cache's port on another address.
        let listen = dns.listen;
        if ports.contains(&listen.port()) && !listen.ip().is_unspecified() {
            let family = Family::of(&listen.ip());
            let (name, field) = match family {
                Family::V4 => ("dns_listen_v4", Field::Ipv4),
                Family::V6 => ("dns_listen_v6", Field::Ipv6),
            };
            let addr = self.add_set(
                name.into(),
                vec![field],
                false,
                vec![Element::single(vec![ip_to_u128(&listen.ip())])],
            );
            let listen_svc = self.port_set("dns_listen_svc", &[listen.port()]);
            let mut to_guard = new_on_lo();
            to_guard.extend([
                Match::NfProto(family),
                Match::Daddr(family, addr),
                Match::ProtoDport(listen_svc),
            ]);
            self.rules.push(Rule {
                counter: None,
                ..rule(
                    to_guard,
                    Verdict::Accept,
                    "baseline: loopback, to the DNS guard",
                )
            });
        }
        let mut around = new_on_lo();
        around.push(Match::ProtoDport(svc));
        self.log_then(
            around,
            policy.mode,
            policy,
            DNS_BYPASS_RULE,
            "dns guard: its local cache asked around the guard".into(),
        );
    }

    /// `intercept = true`: plain DNS to any address is redirected to the guard
    /// (nat, output hook, before filtering), except the guard's own queries and
    /// what already goes to this host. The redirected packet reaches the filter
    /// chain addressed to loopback but still routed out of the original
    /// interface, so it is accepted there by destination.
    fn dns_intercept(&mut self, policy: &Policy) {
        let Some(dns) = &policy.dns else { return };
        let listen = dns.listen;
        let families = listen_families(listen.ip());
        let plain = self.plain_dns_set();
        let mut loopbacks = Vec::new();
        for &family in &families {
            let (name, field, range) = match family {
                Family::V4 => (
                    "loopback_v4",
                    Field::Ipv4,
                    (0x7f00_0000u128, 0x7fff_ffffu128),
                ),
                Family::V6 => ("loopback_v6", Field::Ipv6, (1u128, 1u128)),
            };
            let set = self.add_set(
                name.into(),
                vec![field],
                true,
                vec![Element::range(
                    vec![range.0],
                    (range.0 != range.1).then(|| vec![range.1]),
                )],
            );
            loopbacks.push((family, set));
        }
        for (family, set) in &loopbacks {
            let to_loopback = vec![Match::NfProto(*family), Match::Daddr(*family, set.clone())];
            self.rules.push(rule(
                to_loopback.clone(),
                Verdict::Accept,
                "dns guard: intercepted queries",
            ));
            self.nat_rules.push(Rule {
                counter: None,
                ..rule(to_loopback, Verdict::Accept, "dns guard: already local")
            });
        }
        self.nat_rules.push(Rule {
            counter: None,
            ..rule(
                vec![Match::Mark(policy.mark)],
                Verdict::Accept,
                "dns guard: its own queries",
            )
        });
        if !dns.local_upstream().is_empty() {
            let mut exempt = vec![vec![Match::Mark(cache_mark(policy.mark))]];
            if let Some(uid) = dns.cache_user {
                exempt.push(vec![Match::SkUid(IdMatch::Eq(uid))]);
            }
            for matches in exempt {
                self.nat_rules.push(Rule {
                    counter: None,
                    ..rule(
                        matches,
                        Verdict::Accept,
                        "dns guard: its local cache's queries",
                    )
                });
            }
        }
        for family in families {
            self.nat_rules.push(rule(
                vec![Match::NfProto(family), Match::ProtoDport(plain.clone())],
                Verdict::Redirect(listen.port()),
                "dns guard: intercept",
            ));
        }
    }

    /// scope = "host+containers" with `[dns]`: plain DNS (UDP and TCP 53)
    /// arriving on a container bridge, to any address, is redirected to the
    /// guard's container listener (`redirect` rewrites the destination to the
    /// bridge's own address, so a bridge created later needs nothing new).
    /// That listener, and the proxy when it listens on a wildcard address,
    /// take connections from loopback and the bridges only: never from the
    /// outside world. Returns the set of DNS ports (53, 853) for the
    /// containers chain's bypass rule.
    fn container_dns(&mut self, policy: &Policy) -> Option<String> {
        let mut services: Vec<(u8, u16)> = Vec::new();
        if let Some(proxy) = policy
            .proxy
            .as_ref()
            .filter(|p| p.listen.ip().is_unspecified())
        {
            services.push((IPPROTO_TCP, proxy.listen.port()));
        }
        let bypass = policy.dns.as_ref().map(|dns| {
            let listen = dns.container_listen;
            let plain = self.plain_dns_set();
            // A resolver the runtime runs on the bridge's own address
            // (podman's aardvark-dns, libvirt's dnsmasq) answers the names of
            // its containers, which the guard cannot: it keeps its queries,
            // and what it forwards leaves from this host, under the output
            // rules (and `intercept`). Only a socket bound to that very
            // address and port counts: the guard on a wildcard, or nothing
            // listening, and the query is redirected as any other.
            for i in &policy.container_interfaces {
                self.container_nat.push(rule(
                    vec![
                        Match::IifName(i.clone()),
                        Match::ProtoDport(plain.clone()),
                        Match::BoundSocket,
                    ],
                    Verdict::Accept,
                    format!("dns guard: the resolver bound on {i}'s address answers it"),
                ));
            }
            for family in listen_families(listen.ip()) {
                for i in &policy.container_interfaces {
                    self.container_nat.push(rule(
                        vec![
                            Match::IifName(i.clone()),
                            Match::NfProto(family),
                            Match::ProtoDport(plain.clone()),
                        ],
                        Verdict::Redirect(listen.port()),
                        format!("dns guard: DNS from containers behind {i}"),
                    ));
                }
            }
            services.push((IPPROTO_TCP, listen.port()));
            services.push((IPPROTO_UDP, listen.port()));
            self.dns_ports_set()
        });
        if services.is_empty() {
            return bypass;
        }
        let mut elements: Vec<Element> = services
            .iter()
            .map(|&(p, port)| {
                Element::range(
                    vec![p as u128, port as u128],
                    Some(vec![p as u128, port as u128]),
                )
            })
            .collect();
        elements.sort();
        elements.dedup();
        let svc = self.add_set(
            "container_services_svc".into(),
            vec![Field::L4Proto, Field::Port],
            true,
            elements,
        );
        let from =
            std::iter::once("lo".to_string()).chain(policy.container_interfaces.iter().cloned());
        for i in from {
            self.container_input.push(Rule {
                counter: None,
                ..rule(
                    vec![Match::IifName(i.clone()), Match::ProtoDport(svc.clone())],
                    Verdict::Accept,
                    format!("egret's container services: from {i}"),
                )
            });
        }
        self.container_input.push(rule(
            vec![Match::ProtoDport(svc)],
            Verdict::Drop,
            "egret's container services: not from a container bridge",
        ));
        bypass
    }

    /// `dns_plain` (UDP and TCP 53), shared by the intercepts.
    fn plain_dns_set(&mut self) -> String {
        self.port_set("dns_plain", &[53])
    }

    /// `dns_ports` (UDP and TCP 53 and 853), shared by the bypass rules.
    fn dns_ports_set(&mut self) -> String {
        self.port_set("dns_ports", &[53, 853])
    }

    fn port_set(&mut self, name: &str, ports: &[u16]) -> String {
        if self.sets.iter().any(|s| s.name == name) {
            return name.to_string();
        }
        let mut elements: Vec<Element> = [IPPROTO_TCP, IPPROTO_UDP]
            .iter()
            .flat_map(|&p| {
                ports.iter().map(move |&port| {
                    Element::range(
                        vec![p as u128, port as u128],
                        Some(vec![p as u128, port as u128]),
                    )
                })
            })
            .collect();
        elements.sort();
        elements.dedup();
        self.add_set(
            name.into(),
            vec![Field::L4Proto, Field::Port],
            true,
            elements,
        )
    }

    /// Logs what `matches` under `rule_name`, then blocks it (enforce) or lets it pass (audit).
    fn log_then(
        &mut self,
        matches: Vec<Match>,
        mode: Mode,
        policy: &Policy,
        rule_name: &str,
        comment: String,
    ) {
        let prefix = match mode {
            Mode::Audit => PREFIX_WOULD_BLOCK,
            Mode::Enforce => PREFIX_BLOCKED,
        };
        let log = Some(Log {
            group: policy.log_group,
            prefix: format!("{prefix}:{rule_name}"),
        });
        match mode {
            Mode::Audit => self.rules.push(Rule {
                log,
                ..rule(matches, Verdict::Accept, comment)
            }),
            Mode::Enforce => self.block(matches, log, policy.block, comment),
        }
    }

    fn baseline(&mut self, open_flows: &[OpenFlow]) {
        self.rules.push(Rule {
            counter: None,
            ..rule(
                vec![Match::OifName("lo".into())],
                Verdict::Accept,
                "baseline: loopback",
            )
        });
        self.rules.push(Rule {
            counter: None,
            ..rule(
                vec![Match::CtState(CT_ESTABLISHED | CT_RELATED)],
                Verdict::Accept,
                "baseline: established and related",
            )
        });
        for family in [Family::V4, Family::V6] {
            let (name, addr) = match family {
                Family::V4 => (PREEXISTING_V4, Field::Ipv4),
                Family::V6 => (PREEXISTING_V6, Field::Ipv6),
            };
            // TCP only, whatever the caller gathered: a connected UDP socket
            // has sent nothing, so seeding it would let anyone pick a destination.
            let mut elements: Vec<Element> = open_flows
                .iter()
                .filter(|f| f.protocol == IPPROTO_TCP)
                .filter(|f| {
                    Family::of(&f.local.ip()) == family && Family::of(&f.remote.ip()) == family
                })
                .map(super::preexisting_element)
                .collect();
            elements.sort();
            elements.dedup();
            let set = self.add_set(
                name.into(),
                vec![Field::L4Proto, addr, Field::Port, addr, Field::Port],
                false,
                elements,
            );
            // Never a SYN: a session that predates egret needs only the
            // packets of a connection already open (FIN and RST included). A
            // new connection on a seeded tuple (the source port bound again
            // once the seeded one closed) is a new flow, decided by the policy.
            self.rules.push(rule(
                vec![
                    Match::NfProto(family),
                    Match::L4Proto(IPPROTO_TCP),
                    Match::TcpFlagsZero(TCP_SYN),
                    Match::FiveTuple(family, set),
                ],
                Verdict::Accept,
                "baseline: connections open before egret",
            ));
        }
        for (family, proto, field, name, types, comment) in [
            (
                Family::V4,
                IPPROTO_ICMP,
                Field::IcmpType,
                "baseline_icmp",
                BASELINE_ICMP,
                "baseline: ICMP errors",
            ),
            (
                Family::V6,
                IPPROTO_ICMPV6,
                Field::Icmpv6Type,
                "baseline_icmpv6",
                BASELINE_ICMPV6,
                "baseline: ICMPv6 errors, neighbour discovery, MLD",
            ),
        ] {
            let set = self.add_set(name.into(), vec![field], false, singles(types));
            self.rules.push(rule(
                vec![
                    Match::NfProto(family),
                    Match::L4Proto(proto),
                    Match::IcmpType(family, set),
                ],
                Verdict::Accept,
                comment,
            ));
        }
    }

    /// The matches on who sends: users, groups, one cgroup level. A rule whose
    /// units sit at several levels needs one variant per level (an OR).
    fn subject_variants(&mut self, r: &AllowRule, input: &CompileInput) -> Vec<Vec<Match>> {
        let mut base = Vec::new();
        if let Some(m) = self.ids(&r.name, "uid", Field::Uid, &r.users) {
            base.push(Match::SkUid(m));
        }
        if let Some(m) = self.ids(&r.name, "gid", Field::Gid, &r.groups) {
            base.push(Match::SkGid(m));
        }
        if r.units.is_empty() {
            return vec![base];
        }
        let mut by_level: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
        for unit in &r.units {
            match input.units.get(unit).filter(|ids| !ids.is_empty()) {
                Some(ids) => {
                    for &(level, id) in ids {
                        by_level.entry(level).or_default().insert(id);
                    }
                }
                None => {
                    by_level.entry(unit_default_level(unit)).or_default();
                }
            }
        }
        by_level
            .into_iter()
            .map(|(level, ids)| {
                let elements = ids
                    .into_iter()
                    .map(|id| Element::single(vec![id as u128]))
                    .collect();
                let set = self.add_set(
                    cgroup_set_name(&r.name, level),
                    vec![Field::CgroupId],
                    false,
                    elements,
                );
                let mut m = base.clone();
                m.push(Match::Cgroup { level, set });
                m
            })
            .collect()
    }

    fn ids(&mut self, rule: &str, what: &str, field: Field, ids: &[u32]) -> Option<IdMatch> {
        match ids {
            [] => None,
            [one] => Some(IdMatch::Eq(*one)),
            many => {
                let elements = many
                    .iter()
                    .map(|&id| Element::single(vec![id as u128]))
                    .collect();
                Some(IdMatch::Set(self.add_set(
                    format!("a_{rule}_{what}"),
                    vec![field],
                    false,
                    elements,
                )))
            }
        }
    }

    /// Protocol and port matches, shared by both families.
    fn service(&mut self, r: &AllowRule) -> Vec<Match> {
        let numbers = |p: L4| match p {
            L4::Tcp => vec![IPPROTO_TCP],
            L4::Udp => vec![IPPROTO_UDP],
            L4::Icmp => vec![IPPROTO_ICMP, IPPROTO_ICMPV6],
        };
        if !r.ports.is_empty() {
            // The kernel refuses overlapping elements (EEXIST): `[8080, "8000-8443"]` is one range.
            let ranges = merge_ranges(
                r.ports
                    .iter()
                    .map(|p| (p.first as u128, p.last as u128))
                    .collect(),
            );
            let mut elements = Vec::new();
            for &p in &r.protocols {
                for n in numbers(p) {
                    for &(first, last) in &ranges {
                        elements.push(Element::range(
                            vec![n as u128, first],
                            Some(vec![n as u128, last]),
                        ));
                    }
                }
            }
            let set = self.add_set(
                format!("a_{}_svc", r.name),
                vec![Field::L4Proto, Field::Port],
                true,
                elements,
            );
            return vec![Match::ProtoDport(set)];
        }
        let all: Vec<u8> = r.protocols.iter().flat_map(|&p| numbers(p)).collect();
        match all.as_slice() {
            [] => vec![],
            [one] => vec![Match::L4Proto(*one)],
            many => {
                let set = self.add_set(
                    format!("a_{}_proto", r.name),
                    vec![Field::L4Proto],
                    false,
                    singles(many),
                );
                vec![Match::L4ProtoIn(set)]
            }
        }
    }

    /// With a proxy: its upstream connections (marked) may go out; the proxy
    /// itself decides by host name. After the DNS rules, so DNS ports stay closed.
    fn proxy(&mut self, policy: &Policy) {
        if policy.proxy.is_none() {
            return;
        }
        self.rules.push(rule(
            vec![Match::Mark(policy.mark), Match::L4Proto(IPPROTO_TCP)],
            Verdict::Accept,
            "proxy: its upstream connections",
        ));
    }

    /// Alert sinks with a pinned address (a webhook URL with an IP, a remote
    /// syslog collector): their marked sockets may reach exactly that address,
    /// port and protocol, whatever the allow rules say.
    fn alert_sinks(&mut self, policy: &Policy) {
        for (i, sink) in policy.alerts.iter().enumerate() {
            let Some((addr, proto)) = sink.pinned_destination() else {
                continue;
            };
            let family = Family::of(&addr.ip());
            let field = match family {
                Family::V4 => Field::Ipv4,
                Family::V6 => Field::Ipv6,
            };
            let dst = self.add_set(
                format!("alert{i}_dst"),
                vec![field],
                false,
                vec![Element::single(vec![ip_to_u128(&addr.ip())])],
            );
            let svc = self.add_set(
                format!("alert{i}_svc"),
                vec![Field::L4Proto, Field::Port],
                true,
                vec![Element::range(
                    vec![proto as u128, addr.port() as u128],
                    Some(vec![proto as u128, addr.port() as u128]),
                )],
            );
            self.rules.push(rule(
                vec![
                    Match::Mark(policy.mark),
                    Match::NfProto(family),
                    Match::Daddr(family, dst),
                    Match::ProtoDport(svc),
                ],
                Verdict::Accept,
                format!("alerts: sink {}", sink.name),
            ));
        }
    }

    /// The statements of one allow rule: its kernel rules, in order.
    /// `guard`: a DNS guard fills host sets (for rules reachable directly).
    fn allow_rule(&mut self, r: &AllowRule, input: &CompileInput, guard: bool) -> AllowRules {
        let service = self.service(r);
        let subjects = self.subject_variants(r, input);
        let mut destinations: Vec<Vec<Match>> = Vec::new();
        let mut confined = Some([Vec::new(), Vec::new()]);
        if r.cidrs.is_empty() && r.hosts.is_empty() {
            destinations.push(Vec::new());
            confined = None;
        }
        // via = "proxy": the cidrs are reached through the proxy only (its
        // marked sockets), so no direct rule names them.
        let direct_cidrs: &[ipnet::IpNet] = match r.via {
            Via::Any => &r.cidrs,
            Via::Proxy => &[],
        };
        for family in [Family::V4, Family::V6] {
            let ranges: Vec<(u128, u128)> = direct_cidrs
                .iter()
                .filter(|n| Family::of(&n.addr()) == family)
                .map(|n| (ip_to_u128(&n.network()), ip_to_u128(&n.broadcast())))
                .collect();
            if ranges.is_empty() {
                continue;
            }
            let (suffix, field) = match family {
                Family::V4 => ("v4", Field::Ipv4),
                Family::V6 => ("v6", Field::Ipv6),
            };
            // Single addresses cost the kernel's interval tree two nodes each
            // (start and end); a hash set holds them as one element and loads
            // in about half the time. Mixed lists split only when the single
            // addresses are many enough to pay for a second rule.
            let merged = merge_ranges(ranges);
            if let Some(c) = confined.as_mut() {
                c[family as usize] = merged.clone();
            }
            let (addresses, ranges): (Vec<_>, Vec<_>) =
                merged.into_iter().partition(|(s, e)| s == e);
            let split = ranges.is_empty() || addresses.len() >= HASHED_ADDRESSES_MIN;
            let (singles, intervals) = if split {
                (addresses, ranges)
            } else {
                let mut all = [addresses, ranges].concat();
                all.sort_unstable();
                (Vec::new(), all)
            };
            let name = format!("a_{}_{suffix}", r.name);
            let single_name = if intervals.is_empty() {
                name.clone()
            } else {
                format!("{name}_addr")
            };
            if !intervals.is_empty() {
                let elements = intervals
                    .into_iter()
                    .map(|(s, e)| Element::range(vec![s], (s != e).then(|| vec![e])))
                    .collect();
                let set = self.add_set(name, vec![field], true, elements);
                destinations.push(vec![Match::NfProto(family), Match::Daddr(family, set)]);
            }
            if !singles.is_empty() {
                let elements = singles
                    .into_iter()
                    .map(|(s, _)| Element::single(vec![s]))
                    .collect();
                let set = self.add_set(single_name, vec![field], false, elements);
                destinations.push(vec![Match::NfProto(family), Match::Daddr(family, set)]);
            }
        }
        if !r.hosts.is_empty() && guard && r.via == Via::Any {
            for (family, field) in [(Family::V4, Field::Ipv4), (Family::V6, Field::Ipv6)] {
                let set = self.add_timeout_set(host_set_name(&r.name, family), field);
                destinations.push(vec![Match::NfProto(family), Match::Daddr(family, set)]);
            }
            confined = None;
        }
        let mut rules = Vec::new();
        for dest in &destinations {
            for subject in &subjects {
                let mut m = dest.clone();
                m.extend(service.iter().cloned());
                m.extend(subject.iter().cloned());
                rules.push(rule(m, Verdict::Accept, r.name.clone()));
            }
        }
        AllowRules { rules, confined }
    }

    /// The allow rules' kernel rules into the output chain, in policy order.
    /// Each run of at least [`DISPATCH_MIN_RULES`] consecutive rules confined
    /// to CIDRs becomes one verdict map per family on the destination: each
    /// rule's kernel rules move, unchanged, to its own chain `allow_<rule>`,
    /// and the map jumps from every stretch of addresses to the rules whose
    /// CIDRs cover it, in policy order (a chain of jumps where they overlap).
    /// A packet so meets exactly the rules that could match it, in the same
    /// order as the linear walk, so the first match (and its counter) is the
    /// same; a destination no rule covers finds no element and goes on.
    fn place_allow_rules(&mut self, allowed: Vec<(&str, AllowRules)>) {
        let mut run: Vec<(&str, AllowRules)> = Vec::new();
        let mut dispatches = 0;
        for (name, a) in allowed {
            if a.rules.is_empty() {
                continue;
            }
            if a.confined.is_some() {
                run.push((name, a));
                continue;
            }
            self.flush_run(&mut run, &mut dispatches);
            self.rules.extend(a.rules);
        }
        self.flush_run(&mut run, &mut dispatches);
    }

    fn flush_run(&mut self, run: &mut Vec<(&str, AllowRules)>, dispatches: &mut usize) {
        if run.len() < DISPATCH_MIN_RULES {
            for (_, a) in run.drain(..) {
                self.rules.extend(a.rules);
            }
            return;
        }
        let index = *dispatches;
        *dispatches += 1;
        let targets: Vec<String> = run.iter().map(|(name, _)| allow_chain_name(name)).collect();
        let mut overlaps: BTreeMap<Vec<usize>, String> = BTreeMap::new();
        for (family, field) in [(Family::V4, Field::Ipv4), (Family::V6, Field::Ipv6)] {
            let ranges: Vec<(usize, &[(u128, u128)])> = run
                .iter()
                .enumerate()
                .filter_map(|(i, (_, a))| {
                    Some((i, a.confined.as_ref()?[family as usize].as_slice()))
                })
                .collect();
            let mut elements = Vec::new();
            for (start, end, rules) in cover(&ranges) {
                let jump = match rules.as_slice() {
                    [one] => targets[*one].clone(),
                    _ => {
                        let n = overlaps.len();
                        overlaps
                            .entry(rules.clone())
                            .or_insert_with(|| format!("dispatch{index}_{n}"))
                            .clone()
                    }
                };
                elements.push(Element {
                    jump: Some(jump),
                    ..Element::range(vec![start], (start != end).then(|| vec![end]))
                });
            }
            if elements.is_empty() {
                continue;
            }
            let suffix = match family {
                Family::V4 => "v4",
                Family::V6 => "v6",
            };
            let map = format!("dispatch{index}_{suffix}");
            self.sets.push(Set {
                name: map.clone(),
                key: vec![field],
                interval: true,
                timeout: false,
                size: None,
                verdict_map: true,
                elements,
            });
            self.rules.push(Rule {
                counter: None,
                ..rule(
                    vec![Match::NfProto(family)],
                    Verdict::DaddrVmap(family, map),
                    format!(
                        "allow rules {} to {}, by destination",
                        run[0].0,
                        run[run.len() - 1].0
                    ),
                )
            });
        }
        for (name, a) in run.drain(..) {
            self.allow_chains.push(Chain {
                name: allow_chain_name(name),
                base: None,
                rules: a.rules,
            });
        }
        let mut overlaps: Vec<(String, Vec<usize>)> = overlaps
            .into_iter()
            .map(|(rules, name)| (name, rules))
            .collect();
        overlaps.sort_by_key(|(name, _)| name.clone());
        for (name, rules) in overlaps {
            self.allow_chains.push(Chain {
                name,
                base: None,
                rules: rules
                    .into_iter()
                    .map(|i| Rule {
                        counter: None,
                        comment: None,
                        ..rule(vec![], Verdict::Jump(targets[i].clone()), "")
                    })
                    .collect(),
            });
        }
    }

    /// With `[novelty]` on for `r`: its accepting kernel rules jump to a
    /// chain that logs a flow the kernel has not seen for this rule
    /// (`egret:allowed-new:<rule>`), remembers it in a dynamic set, and
    /// accepts. The allow rules keep their counters; a full set lands in a
    /// rule of its own whose counter is the overflow.
    ///
    /// A kernel rule that fixes its family and a protocol with ports jumps
    /// straight to that family's chain, where a flow already seen costs a
    /// compare and one set lookup: this is the path of a busy server's
    /// steady traffic, so nothing more is on it (`bench/novelty.sh`
    /// measures it). Other kernel
    /// rules go through `n_<rule>_any`, which sorts by family and protocol.
    fn novelty(&mut self, r: &AllowRule, policy: &Policy, kernel_rules: &mut [Rule]) {
        if !policy.novelty.tracks(&r.name) {
            return;
        }
        for k in kernel_rules {
            if k.verdict != Some(Verdict::Accept) || k.comment.as_deref() != Some(&r.name) {
                continue;
            }
            let family = k.matches.iter().find_map(|m| match m {
                Match::NfProto(f) => Some(*f),
                _ => None,
            });
            let with_ports = k.matches.iter().any(|m| match m {
                Match::ProtoDport(_) => true,
                Match::L4Proto(p) => NOVELTY_PROTOS.contains(p),
                _ => false,
            });
            let target = match family {
                Some(f) if with_ports => self.novelty_family_chain(r, f, policy),
                _ => self.novelty_any_chain(r, policy),
            };
            k.verdict = Some(Verdict::Jump(target));
        }
    }

    /// `n_<rule>_v4` or `_v6` (and its set), made once: a flow already
    /// seen is accepted, a new one is logged and remembered, and what the
    /// full set could not remember is counted as the overflow. The family
    /// is matched again (a compare) so that `nft list` can name the
    /// addresses in the key (`ip daddr`, not `@nh,128,32`).
    fn novelty_family_chain(&mut self, r: &AllowRule, family: Family, policy: &Policy) -> String {
        let name = novelty_chain_name(&r.name, Some(family));
        if self.novelty_chains.iter().any(|c| c.name == name) {
            return name;
        }
        let set = novelty_set_name(&r.name, family);
        self.sets.push(Set {
            name: set.clone(),
            key: novelty_key(family),
            interval: false,
            timeout: true,
            size: Some(policy.novelty.set_size),
            verdict_map: false,
            elements: Vec::new(),
        });
        let timeout = u32::try_from(policy.novelty.kernel_timeout.as_secs()).unwrap_or(u32::MAX);
        let seen = Rule {
            counter: None,
            ..rule(
                vec![
                    Match::NfProto(family),
                    Match::Seen {
                        family,
                        set: set.clone(),
                    },
                ],
                Verdict::Accept,
                format!("{}: seen", r.name),
            )
        };
        let first = Rule {
            log: Some(Log {
                group: policy.log_group,
                prefix: format!("{PREFIX_ALLOWED_NEW}:{}", r.name),
            }),
            ..rule(
                vec![
                    Match::NfProto(family),
                    Match::Remember {
                        family,
                        set,
                        timeout,
                    },
                ],
                Verdict::Accept,
                format!("{}: first seen", r.name),
            )
        };
        // Reached only when the add above failed: the set is full.
        let full = rule(
            vec![],
            Verdict::Accept,
            format!("{}: {NOVELTY_OVERFLOW}", r.name),
        );
        self.novelty_chains.push(Chain {
            name: name.clone(),
            base: None,
            rules: vec![seen, first, full],
        });
        name
    }

    /// `n_<rule>_any` (made once): TCP, UDP and SCTP go to their family's
    /// chain; anything else (ICMP, say) has no port to key on and is
    /// accepted untracked.
    fn novelty_any_chain(&mut self, r: &AllowRule, policy: &Policy) -> String {
        let name = novelty_chain_name(&r.name, None);
        if self.novelty_chains.iter().any(|c| c.name == name) {
            return name;
        }
        if !self.sets.iter().any(|s| s.name == NOVELTY_PROTOS_SET) {
            self.add_set(
                NOVELTY_PROTOS_SET.into(),
                vec![Field::L4Proto],
                false,
                singles(&NOVELTY_PROTOS),
            );
        }
        let mut rules = Vec::new();
        for family in [Family::V4, Family::V6] {
            let target = self.novelty_family_chain(r, family, policy);
            rules.push(Rule {
                counter: None,
                ..rule(
                    vec![
                        Match::NfProto(family),
                        Match::L4ProtoIn(NOVELTY_PROTOS_SET.into()),
                    ],
                    Verdict::Jump(target),
                    r.name.clone(),
                )
            });
        }
        rules.push(Rule {
            counter: None,
            ..rule(vec![], Verdict::Accept, r.name.clone())
        });
        self.novelty_chains.push(Chain {
            name: name.clone(),
            base: None,
            rules,
        });
        name
    }

    /// A rule whose mode differs from the policy's: what its subject sends that no
    /// rule allowed is logged under the rule's name and then handled per the rule's mode.
    fn subject_override(
        &mut self,
        r: &AllowRule,
        mode: Mode,
        policy: &Policy,
        input: &CompileInput,
    ) {
        // Reuse the subject sets the allow rule created (same names) instead of adding twice.
        let existing: Vec<String> = self.sets.iter().map(|s| s.name.clone()).collect();
        let before = self.sets.len();
        let subjects = self.subject_variants(r, input);
        self.sets.truncate(before);
        debug_assert!(subjects.iter().flatten().all(|m| match m {
            Match::Cgroup { set, .. }
            | Match::SkUid(IdMatch::Set(set))
            | Match::SkGid(IdMatch::Set(set)) => existing.contains(set),
            _ => true,
        }));
        for subject in subjects {
            let comment = format!("{}: {mode} mode for its subject", r.name);
            self.log_then(subject, mode, policy, &r.name, comment);
        }
    }

    fn block(
        &mut self,
        matches: Vec<Match>,
        log: Option<Log>,
        action: BlockAction,
        comment: String,
    ) {
        match action {
            BlockAction::Drop => self.rules.push(Rule {
                log,
                ..rule(matches, Verdict::Drop, comment)
            }),
            BlockAction::Reject => {
                self.rules.push(Rule {
                    log,
                    verdict: None,
                    ..rule(matches.clone(), Verdict::Drop, comment.clone())
                });
                let mut tcp = matches.clone();
                tcp.push(Match::L4Proto(IPPROTO_TCP));
                self.rules.push(Rule {
                    counter: None,
                    ..rule(tcp, Verdict::RejectTcpReset, comment.clone())
                });
                self.rules.push(Rule {
                    counter: None,
                    ..rule(matches, Verdict::RejectAdminProhibited, comment)
                });
            }
        }
    }

    fn final_rules(&mut self, policy: &Policy) {
        match policy.mode {
            Mode::Audit => {
                let log = Some(Log {
                    group: policy.log_group,
                    prefix: PREFIX_WOULD_BLOCK.into(),
                });
                self.rules.push(Rule {
                    log,
                    ..rule(vec![], Verdict::Accept, "audit: log what would be blocked")
                });
            }
            Mode::Enforce => {
                let log = Some(Log {
                    group: policy.log_group,
                    prefix: PREFIX_BLOCKED.into(),
                });
                self.block(
                    vec![],
                    log,
                    policy.block,
                    "enforce: block and log the rest".into(),
                );
            }
        }
    }
}

/// The stretches of addresses the rules' ranges cover, each with the rules
/// covering it (ascending): `(first, last, rules)`, sorted and disjoint;
/// neighbours with the same rules are one stretch. Each rule's own ranges
/// must be disjoint (merged). A sweep over the ranges' starts and ends.
fn cover(ranges: &[(usize, &[(u128, u128)])]) -> Vec<(u128, u128, Vec<usize>)> {
    // (point, rule, opens): a range [s, e] opens at s and closes after e.
    // A range reaching the top of IPv6 never closes.
    let mut events: Vec<(u128, bool, usize)> = Vec::new();
    for &(rule, list) in ranges {
        for &(s, e) in list {
            events.push((s, true, rule));
            if let Some(after) = e.checked_add(1) {
                events.push((after, false, rule));
            }
        }
    }
    // At one point, closes come before opens (`false` < `true`).
    events.sort_unstable();
    let mut out: Vec<(u128, u128, Vec<usize>)> = Vec::new();
    let mut open: BTreeSet<usize> = BTreeSet::new();
    let mut i = 0;
    while i < events.len() {
        let at = events[i].0;
        while let Some(&(_, opens, rule)) = events.get(i).filter(|e| e.0 == at) {
            if opens {
                open.insert(rule);
            } else {
                open.remove(&rule);
            }
            i += 1;
        }
        if open.is_empty() {
            continue;
        }
        let end = events.get(i).map(|e| e.0 - 1);
        let rules: Vec<usize> = open.iter().copied().collect();
        match out.last_mut() {
            Some(last) if last.2 == rules && last.1.checked_add(1) == Some(at) => {
                last.1 = end.unwrap_or(u128::MAX)
            }
            _ => out.push((at, end.unwrap_or(u128::MAX), rules)),
        }
    }
    out
}

fn singles(values: &[u8]) -> Vec<Element> {
    values
        .iter()
        .map(|&v| Element::single(vec![v as u128]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PortRange;
    use crate::ruleset::render::render_element;

    fn allow(name: &str) -> AllowRule {
        AllowRule::for_test(name)
    }

    fn policy(rules: Vec<AllowRule>) -> Policy {
        Policy {
            mode: Mode::Enforce,
            block: BlockAction::Drop,
            log_group: 5,
            mark: crate::policy::DEFAULT_MARK,
            dns: None,
            proxy: None,
            metrics: None,
            api: None,
            restore_table: false,
            heartbeat: None,
            severity: Default::default(),
            alerts: vec![],
            scope: crate::policy::Scope::Host,
            container_interfaces: vec![],
            container_runtime: None,
            // The rule texts below are about the allow rules themselves;
            // `novelty_*` tests turn it on.
            novelty: crate::policy::Novelty {
                enabled: false,
                ..Default::default()
            },
            rules,
        }
    }

    fn with_dns(rules: Vec<AllowRule>) -> Policy {
        Policy {
            dns: Some(crate::policy::DnsConfig {
                listen: "127.0.0.1:53".parse().unwrap(),
                upstream: vec![
                    "192.0.2.53:53".parse().unwrap(),
                    "[2001:db8::53]:5353".parse().unwrap(),
                ],
                refuse: crate::policy::Refusal::Refused,
                ttl_floor: std::time::Duration::from_secs(60),
                grace: std::time::Duration::from_secs(300),
                intercept: false,
                revalidate: true,
                container_listen: "0.0.0.0:10053".parse().unwrap(),
                cache_user: None,
            }),
            ..policy(rules)
        }
    }

    #[test]
    fn container_dns_goes_to_the_guard_and_its_listeners_serve_only_the_bridges() {
        let mut any = allow("everything");
        any.cidrs = vec!["0.0.0.0/0".parse().unwrap()];
        let mut p = with_dns(vec![any]);
        p.scope = Scope::HostAndContainers;
        p.container_interfaces = vec!["docker0".into(), "br-*".into()];
        p.proxy = Some(crate::policy::ProxyConfig {
            listen: "0.0.0.0:3128".parse().unwrap(),
            require_sni: false,
            ssrf_guard: true,
            connect_timeout: std::time::Duration::from_secs(5),
            idle_timeout: std::time::Duration::from_secs(60),
            max_connections: 10,
            max_per_client: 10,
            threads: 1,
        });
        let rs = compile(&p, &CompileInput::default());
        let t = render(&rs);
        let chain = |name: &str| {
            let start = t.find(&format!("chain {name} {{")).expect(&t);
            t[start..start + t[start..].find("\n\t}").unwrap()].to_string()
        };
        let nat = chain(CONTAINER_DNS_CHAIN);
        assert!(
            nat.contains("type nat hook prerouting priority dstnat; policy accept;"),
            "{nat}"
        );
        for i in ["docker0", "br-*"] {
            assert!(nat.contains(&format!("iifname \"{i}\" meta nfproto ipv4 meta l4proto . th dport @dns_plain counter redirect to :10053")), "{nat}");
        }
        assert!(!nat.contains("ipv6"), "a v4 listener gets v4 only: {nat}");
        // A resolver bound on a bridge's own address keeps its queries: the
        // exception comes before every redirect.
        for i in ["docker0", "br-*"] {
            let keep = nat
                .find(&format!("iifname \"{i}\" meta l4proto . th dport @dns_plain socket wildcard 0 counter accept"))
                .expect(&nat);
            assert!(keep < nat.find("redirect").expect(&nat), "{nat}");
        }
        let input = chain(CONTAINER_SERVICES_CHAIN);
        assert!(
            input.contains("type filter hook input priority filter; policy accept;"),
            "{input}"
        );
        assert_eq!(
            rs.set("container_services_svc")
                .unwrap()
                .elements
                .iter()
                .map(|e| e.key.clone())
                .collect::<Vec<_>>(),
            [vec![6, 3128], vec![6, 10053], vec![17, 10053]]
        );
        // Loopback and the bridges in; anything else dropped, last.
        let lines: Vec<&str> = input
            .lines()
            .filter(|l| l.contains("@container_services_svc"))
            .collect();
        assert_eq!(lines.len(), 4, "{input}");
        for (l, i) in lines.iter().zip(["lo", "docker0", "br-*"]) {
            assert!(
                l.starts_with(&format!("\t\tiifname \"{i}\" ")) && l.contains(" accept "),
                "{l}"
            );
        }
        assert!(
            lines[3]
                .trim_start()
                .starts_with("meta l4proto . th dport @container_services_svc counter drop"),
            "{input}"
        );
        // DNS over TLS from a container, before any allow rule: dns-bypass.
        let containers = chain(CONTAINERS_CHAIN);
        let bypass = containers.find("meta l4proto . th dport @dns_ports counter log prefix \"egret:blocked:dns-bypass\" group 5 drop").expect(&containers);
        assert!(
            bypass
                < containers
                    .find("comment \"everything\"")
                    .expect(&containers),
            "{containers}"
        );
        // Not with scope = "host".
        p.scope = Scope::Host;
        let t = render(&compile(&p, &CompileInput::default()));
        assert!(
            !t.contains(CONTAINER_DNS_CHAIN) && !t.contains(CONTAINER_SERVICES_CHAIN),
            "{t}"
        );
    }

    #[test]
    fn overlapping_port_ranges_become_one_element() {
        let mut r = allow("web");
        r.ports = vec![
            PortRange {
                first: 8080,
                last: 8080,
            },
            PortRange {
                first: 8000,
                last: 8443,
            },
            PortRange {
                first: 8444,
                last: 8444,
            },
        ];
        let rs = compile(&policy(vec![r]), &CompileInput::default());
        assert_eq!(
            rs.set("a_web_svc").unwrap().elements,
            [Element::range(vec![6, 8000], Some(vec![6, 8444]))]
        );
    }

    #[test]
    fn host_rules_get_timeout_sets_per_family_beside_their_cidrs() {
        let mut r = allow("debian");
        r.hosts = vec![crate::policy::HostPattern::parse("*.debian.org").unwrap()];
        r.cidrs = vec!["10.9.0.0/16".parse().unwrap()];
        r.ports = vec![PortRange {
            first: 443,
            last: 443,
        }];
        let rs = compile(&with_dns(vec![r]), &CompileInput::default());
        for name in ["h_debian_v4", "h_debian_v6"] {
            let set = rs.set(name).unwrap();
            assert!(set.timeout && !set.interval && set.elements.is_empty());
        }
        assert!(!rs.set("a_debian_v4").unwrap().timeout);
        let t = render(&rs);
        assert!(t.contains("ip daddr @a_debian_v4 meta l4proto . th dport @a_debian_svc counter accept comment \"debian\""), "{t}");
        assert!(t.contains("ip daddr @h_debian_v4 meta l4proto . th dport @a_debian_svc counter accept comment \"debian\""), "{t}");
        assert!(
            t.contains("ip6 daddr @h_debian_v6 meta l4proto . th dport @a_debian_svc"),
            "{t}"
        );
        assert!(t.contains("flags timeout"), "{t}");
    }

    #[test]
    fn dns_guard_lets_its_marked_upstream_out_and_blocks_dns_around_it_before_any_allow() {
        let mut any = allow("everything");
        any.cidrs = vec!["0.0.0.0/0".parse().unwrap()];
        any.protocols = vec![L4::Tcp, L4::Udp];
        let t = text(&with_dns(vec![any]));
        let upstream = t
            .find("meta mark 0x65677274 meta nfproto ipv4 ip daddr @dns_upstream_v4 meta l4proto . th dport @dns_upstream_svc counter accept")
            .expect(&t);
        assert!(t.contains("ip6 daddr @dns_upstream_v6"), "{t}");
        let bypass = t
            .find("meta l4proto . th dport @dns_ports counter log prefix \"egret:blocked:dns-bypass\" group 5 drop")
            .expect(&t);
        let allow_at = t.find("comment \"everything\"").unwrap();
        assert!(upstream < bypass && bypass < allow_at, "{t}");
        assert!(t.contains("tcp . 853"), "{t}");
        assert!(t.contains("udp . 5353"), "{t}");
        // Audit mode logs DNS around the guard and lets it pass.
        let audit = text(&Policy {
            mode: Mode::Audit,
            ..with_dns(vec![])
        });
        assert!(
            audit.contains(
                "@dns_ports counter log prefix \"egret:would-block:dns-bypass\" group 5 accept"
            ),
            "{audit}"
        );
        // No [dns]: none of it.
        assert!(!text(&policy(vec![])).contains("dns"));
    }

    /// A local cache as the guard's upstream: before the loopback baseline,
    /// the guard's new queries to the cache's port hand the cache mark to
    /// conntrack, programs still reach the guard, anything else to that port
    /// over lo is dns-bypass; the cache's marked upstream queries (and its
    /// user's, with cache_user) leave, before DNS around the guard is blocked;
    /// intercept does not redirect them back to the guard.
    #[test]
    fn a_local_cache_is_asked_by_the_guard_only_and_its_marked_queries_leave() {
        let mut p = with_dns(vec![]);
        if let Some(d) = p.dns.as_mut() {
            d.upstream = vec!["127.0.0.2:53".parse().unwrap(), "[::1]:53".parse().unwrap()];
        }
        let t = text(&p);
        let guard = t
            .find("oifname \"lo\" ct state new meta mark 0x65677274 meta l4proto . th dport @dns_cache_svc ct mark set 0x65677275 counter accept")
            .expect(&t);
        let programs = t
            .find("oifname \"lo\" ct state new meta nfproto ipv4 ip daddr @dns_listen_v4 meta l4proto . th dport @dns_listen_svc accept")
            .expect(&t);
        let around = t
            .find("oifname \"lo\" ct state new meta l4proto . th dport @dns_cache_svc counter log prefix \"egret:blocked:dns-bypass\" group 5 drop")
            .expect(&t);
        let lo = t.find("oifname \"lo\" accept").expect(&t);
        assert!(guard < programs && programs < around && around < lo, "{t}");
        let cache = t
            .find("meta mark 0x65677275 meta l4proto . th dport @dns_ports counter accept")
            .expect(&t);
        let bypass = t
            .find("meta l4proto . th dport @dns_ports counter log prefix \"egret:blocked:dns-bypass\"")
            .expect(&t);
        assert!(lo < cache && cache < bypass, "{t}");
        // The cache is not an upstream reached off the host.
        assert!(!t.contains("dns_upstream"), "{t}");
        let rs = compile(&p, &CompileInput::default());
        let keys = |set: &str| -> Vec<Vec<u128>> {
            rs.set(set)
                .unwrap()
                .elements
                .iter()
                .map(|e| e.key.clone())
                .collect()
        };
        assert_eq!(keys("dns_cache_svc"), [vec![6, 53], vec![17, 53]]);
        assert_eq!(keys("dns_listen_v4"), [vec![0x7f00_0001]]);

        // A cache on its own port: no rule for the guard's address is needed.
        let mut own_port = p.clone();
        if let Some(d) = own_port.dns.as_mut() {
            d.upstream = vec!["127.0.0.1:5353".parse().unwrap()];
        }
        let t = text(&own_port);
        assert!(!t.contains("dns_listen"), "{t}");
        assert!(t.contains("udp . 5353"), "{t}");

        // cache_user: that user's DNS leaves too; intercept spares both.
        if let Some(d) = p.dns.as_mut() {
            d.cache_user = Some(991);
            d.intercept = true;
        }
        let t = text(&p);
        assert!(
            t.contains("meta skuid 991 meta l4proto . th dport @dns_ports counter accept"),
            "{t}"
        );
        let nat = &t[t.find("chain dns_intercept {").expect(&t)..];
        let redirect = nat.find("redirect to").expect(nat);
        for exempt in ["meta mark 0x65677275 accept", "meta skuid 991 accept"] {
            assert!(nat.find(exempt).expect(nat) < redirect, "{nat}");
        }

        // Audit mode: asking the cache around the guard is logged, not blocked.
        let audit = text(&Policy {
            mode: Mode::Audit,
            ..own_port
        });
        assert!(
            audit.contains("dport @dns_cache_svc counter log prefix \"egret:would-block:dns-bypass\" group 5 accept"),
            "{audit}"
        );
    }

    #[test]
    fn alert_sinks_with_a_pinned_address_get_exactly_that_marked_hole() {
        let mut p = policy(vec![]);
        p.alerts = crate::policy::parse_str(
            "[[alerts]]\nname = \"siem\"\ntype = \"syslog\"\ntarget = \"udp://192.0.2.10:514\"\n[[alerts]]\nname = \"slack\"\ntype = \"webhook\"\nurl = \"https://hooks.slack.com/x\"\n",
            std::path::Path::new("p.toml"),
            &crate::policy::SystemAccounts,
        )
        .unwrap()
        .alerts;
        let t = render(&compile(&p, &CompileInput::default()));
        assert!(
            t.contains("meta mark 0x65677274 meta nfproto ipv4 ip daddr @alert0_dst meta l4proto . th dport @alert0_svc counter accept comment \"alerts: sink siem\""),
            "{t}"
        );
        assert!(t.contains("udp . 514"), "{t}");
        assert!(!t.contains("alert1_"), "a host name opens nothing: {t}");
    }

    #[test]
    fn proxy_rules_open_its_marked_connections_and_proxy_only_hosts_get_no_sets() {
        let mut web = allow("web");
        web.hosts = vec![crate::policy::HostPattern::parse("example.com").unwrap()];
        web.via = Via::Proxy;
        let mut p = with_dns(vec![web]);
        p.proxy = Some(crate::policy::ProxyConfig {
            listen: "127.0.0.1:3128".parse().unwrap(),
            require_sni: false,
            ssrf_guard: true,
            connect_timeout: std::time::Duration::from_secs(10),
            idle_timeout: std::time::Duration::from_secs(300),
            max_connections: 10,
            max_per_client: 10,
            threads: 1,
        });
        let rs = compile(&p, &CompileInput::default());
        assert!(rs.set("h_web_v4").is_none());
        let t = render(&rs);
        let proxy = t
            .find("meta mark 0x65677274 meta l4proto tcp counter accept comment \"proxy: its upstream connections\"")
            .expect(&t);
        assert!(
            t.find("@dns_ports counter log").unwrap() < proxy,
            "DNS ports stay closed to the proxy: {t}"
        );
        assert!(
            !t.contains("comment \"web\""),
            "no kernel rule for a proxy-only rule: {t}"
        );
    }

    #[test]
    fn proxy_only_cidrs_get_no_direct_rule() {
        let mut wiki = allow("wiki");
        wiki.cidrs = vec!["10.2.0.5/32".parse().unwrap()];
        wiki.via = Via::Proxy;
        let mut direct = allow("direct");
        direct.cidrs = vec!["10.3.0.0/24".parse().unwrap()];
        let rs = compile(&policy(vec![wiki, direct]), &CompileInput::default());
        let t = render(&rs);
        assert!(rs.set("a_wiki_v4").is_none(), "{t}");
        assert!(!t.contains("comment \"wiki\""), "{t}");
        assert!(!t.contains("10.2.0.5"), "{t}");
        assert!(t.contains("comment \"direct\""), "{t}");
    }

    #[test]
    fn intercept_redirects_plain_dns_except_the_guards_own_and_local() {
        let mut p = with_dns(vec![]);
        if let Some(d) = p.dns.as_mut() {
            d.intercept = true;
        }
        let t = text(&p);
        let nat = t.find("chain dns_intercept {").expect(&t);
        let body = &t[nat..];
        assert!(
            body.contains("type nat hook output priority dstnat; policy accept;"),
            "{t}"
        );
        let local = body.find("ip daddr @loopback_v4 accept").expect(&t);
        let own = body.find("meta mark 0x65677274 accept").expect(&t);
        let redirect = body
            .find("meta nfproto ipv4 meta l4proto . th dport @dns_plain counter redirect to :53")
            .expect(&t);
        assert!(local < own && own < redirect, "{t}");
        assert!(
            !body.contains("ipv6"),
            "the guard listens on IPv4 only: {t}"
        );
        // In the filter chain, redirected queries are accepted before DNS is blocked.
        let accepted = t
            .find("ip daddr @loopback_v4 counter accept comment \"dns guard: intercepted queries\"")
            .expect(&t);
        let bypass = t.find("th dport @dns_ports counter log").expect(&t);
        assert!(accepted < bypass, "{t}");
        assert!(t.contains("elements = { 127.0.0.0/8 }"), "{t}");
    }

    fn text(p: &Policy) -> String {
        render(&compile(p, &CompileInput::default()))
    }

    #[test]
    fn baseline_and_final_rule_are_always_there() {
        let t = text(&policy(vec![]));
        assert!(t.contains("oifname \"lo\" accept"), "{t}");
        assert!(t.contains("ct state established,related accept"));
        assert!(t.contains("policy drop;"));
        assert!(
            t.trim_end().ends_with("}\n}")
                || t.contains("counter log prefix \"egret:blocked\" group 5 drop"),
            "{t}"
        );
        let audit = text(&Policy {
            mode: Mode::Audit,
            ..policy(vec![])
        });
        assert!(audit.contains("policy accept;"));
        assert!(audit.contains("log prefix \"egret:would-block\" group 5 accept"));
    }

    #[test]
    fn cidrs_become_one_interval_set_per_family() {
        let mut r = allow("backups");
        r.cidrs = vec![
            "10.20.0.0/16".parse().unwrap(),
            "10.21.0.0/16".parse().unwrap(),
            "192.0.2.7/32".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        r.ports = vec![
            PortRange {
                first: 22,
                last: 22,
            },
            PortRange {
                first: 8000,
                last: 8100,
            },
        ];
        r.users = vec![0, 34];
        let rs = compile(&policy(vec![r]), &CompileInput::default());
        let v4 = rs.set("a_backups_v4").unwrap();
        assert_eq!(v4.elements.len(), 2, "adjacent /16s are merged");
        assert!(rs.set("a_backups_v6").is_some());
        let t = render(&rs);
        assert!(t.contains("meta nfproto ipv4 ip daddr @a_backups_v4 meta l4proto . th dport @a_backups_svc meta skuid @a_backups_uid counter accept comment \"backups\""), "{t}");
        assert!(t.contains("elements = { 10.20.0.0/15, 192.0.2.7 }"), "{t}");
        assert!(
            t.contains("elements = { tcp . 22, tcp . 8000-8100 }"),
            "{t}"
        );
    }

    #[test]
    fn many_single_addresses_go_to_a_hash_set_beside_the_ranges() {
        let mut r = allow("mirrors");
        r.cidrs = (0..20u8)
            .map(|i| format!("192.0.2.{}/32", 2 * i + 1).parse().unwrap())
            .chain(["198.51.100.0/24".parse().unwrap()])
            .collect();
        let rs = compile(&policy(vec![r.clone()]), &CompileInput::default());
        let ranges = rs.set("a_mirrors_v4").unwrap();
        let singles = rs.set("a_mirrors_v4_addr").unwrap();
        assert!(ranges.interval && !singles.interval);
        assert_eq!((ranges.elements.len(), singles.elements.len()), (1, 20));
        assert!(singles.elements.iter().all(|e| e.end.is_none()));
        let t = render(&rs);
        assert!(t.contains("ip daddr @a_mirrors_v4 "), "{t}");
        assert!(t.contains("ip daddr @a_mirrors_v4_addr "), "{t}");

        // Only addresses: one hash set under the usual name.
        r.cidrs.pop();
        let rs = compile(&policy(vec![r.clone()]), &CompileInput::default());
        assert!(!rs.set("a_mirrors_v4").unwrap().interval);
        assert!(rs.set("a_mirrors_v4_addr").is_none());

        // A few addresses beside a range stay in the interval set: one rule.
        r.cidrs.truncate(3);
        r.cidrs.push("198.51.100.0/24".parse().unwrap());
        let rs = compile(&policy(vec![r]), &CompileInput::default());
        assert_eq!(rs.set("a_mirrors_v4").unwrap().elements.len(), 4);
        assert!(rs.set("a_mirrors_v4_addr").is_none());
    }

    #[test]
    fn large_fixed_hash_sets_get_their_size_and_refilled_ones_never() {
        let mut r = allow("bulk");
        r.cidrs = (0..SIZED_SET_MIN as u32 + 5)
            .map(|i| {
                format!("198.18.{}.{}/32", i / 100, 2 * (i % 100) + 1)
                    .parse()
                    .unwrap()
            })
            .chain(["198.51.100.0/24".parse().unwrap()])
            .collect();
        r.units = vec!["many.service".into()];
        let mut input = CompileInput::default();
        let ids = (0..SIZED_SET_MIN as u64 + 1)
            .map(|id| (2, 1000 + id))
            .collect();
        input.units.insert("many.service".into(), ids);
        let rs = compile(&policy(vec![r]), &input);
        let singles = rs.set("a_bulk_v4_addr").unwrap();
        assert_eq!(singles.size, Some(SIZED_SET_MIN as u32 + 5));
        assert!(render(&rs).contains(&format!("\t\tsize {}\n", SIZED_SET_MIN + 5)));
        assert_eq!(rs.set("a_bulk_v4").unwrap().size, None, "interval sets");
        // A restarted unit's new cgroup id is added at run time: no cap.
        assert_eq!(rs.set("a_bulk_cg2").unwrap().size, None);

        let mut small = allow("few");
        small.cidrs = (0..20u8)
            .map(|i| format!("192.0.2.{}/32", i + 1).parse().unwrap())
            .collect();
        let rs = compile(&policy(vec![small]), &CompileInput::default());
        assert!(rs.sets.iter().all(|s| s.size.is_none()));
    }

    #[test]
    fn rules_without_cidrs_match_any_destination() {
        let mut r = allow("proxy");
        r.users = vec![13];
        r.protocols = vec![];
        let t = text(&policy(vec![r]));
        assert!(
            t.contains("meta skuid 13 counter accept comment \"proxy\""),
            "{t}"
        );
    }

    #[test]
    fn units_at_several_levels_give_one_rule_per_level() {
        let mut r = allow("borg");
        r.ports = vec![PortRange {
            first: 22,
            last: 22,
        }];
        r.units = vec![
            "borg.service".into(),
            "a.slice/b.slice/c.service".into(),
            "stopped.service".into(),
        ];
        let mut input = CompileInput::default();
        input.units.insert("borg.service".into(), vec![(2, 1234)]);
        input
            .units
            .insert("a.slice/b.slice/c.service".into(), vec![(3, 99)]);
        let rs = compile(&policy(vec![r]), &input);
        assert_eq!(
            rs.set("a_borg_cg2").unwrap().elements,
            vec![Element::single(vec![1234])]
        );
        assert_eq!(rs.set("a_borg_cg3").unwrap().elements.len(), 1);
        // The sets `egret run` swaps when a unit restarts, and only those.
        let cgroup_sets: Vec<&str> = rs
            .sets
            .iter()
            .filter(|s| s.is_cgroup())
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(cgroup_sets, ["a_borg_cg2", "a_borg_cg3"]);
        let t = render(&rs);
        assert!(
            t.contains("socket cgroupv2 level 2 @a_borg_cg2 counter accept"),
            "{t}"
        );
        assert!(
            t.contains("socket cgroupv2 level 3 @a_borg_cg3 counter accept"),
            "{t}"
        );
    }

    #[test]
    fn per_rule_audit_logs_the_subjects_other_traffic() {
        let mut r = allow("web");
        r.users = vec![33];
        r.ports = vec![PortRange {
            first: 443,
            last: 443,
        }];
        r.mode = Some(Mode::Audit);
        let t = text(&policy(vec![r]));
        assert!(
            t.contains("meta skuid 33 counter log prefix \"egret:would-block:web\" group 5 accept"),
            "{t}"
        );
        let allow_at = t.find("comment \"web\"").unwrap();
        let audit_at = t.find("egret:would-block:web").unwrap();
        assert!(allow_at < audit_at);
    }

    #[test]
    fn reject_logs_once_then_rejects_by_protocol() {
        let p = Policy {
            block: BlockAction::Reject,
            ..policy(vec![])
        };
        let t = text(&p);
        assert!(
            t.contains("counter log prefix \"egret:blocked\" group 5 comment"),
            "{t}"
        );
        assert!(t.contains("meta l4proto tcp reject with tcp reset"));
        assert!(t.contains("reject with icmpx admin-prohibited"));
    }

    #[test]
    fn open_flows_seed_the_preexisting_set() {
        let flows = vec![OpenFlow {
            protocol: 6,
            local: "10.0.0.1:22".parse().unwrap(),
            remote: "10.0.0.2:50000".parse().unwrap(),
        }];
        let rs = compile(
            &policy(vec![]),
            &CompileInput {
                open_flows: flows,
                ..Default::default()
            },
        );
        let set = rs.set(PREEXISTING_V4).unwrap();
        assert_eq!(set.elements.len(), 1);
        assert!(render(&rs).contains("tcp . 10.0.0.1 . 22 . 10.0.0.2 . 50000"));
        // A seed never lets a SYN through: a new connection on a seeded
        // tuple is the policy's to decide.
        assert!(render(&rs).contains(
            "meta nfproto ipv4 meta l4proto tcp tcp flags & syn == 0 meta l4proto . ip saddr . th sport . ip daddr . th dport @preexisting_v4 counter accept"
        ), "{}", render(&rs));
    }

    fn confined(name: &str, cidrs: &[&str], port: u16, user: u32) -> AllowRule {
        let mut r = allow(name);
        r.cidrs = cidrs.iter().map(|c| c.parse().unwrap()).collect();
        r.ports = vec![PortRange {
            first: port,
            last: port,
        }];
        r.users = vec![user];
        r
    }

    #[test]
    fn short_runs_of_rules_stay_in_the_output_chain() {
        let rules: Vec<AllowRule> = (0..DISPATCH_MIN_RULES - 1)
            .map(|i| confined(&format!("r{i}"), &[&format!("10.{i}.0.0/24")], 443, 1000))
            .collect();
        let rs = compile(&policy(rules), &CompileInput::default());
        assert_eq!(rs.chains.len(), 1, "{}", render(&rs));
        assert!(rs.sets.iter().all(|s| !s.verdict_map));
        assert!(render(&rs).contains("ip daddr @a_r0_v4 meta l4proto . th dport @a_r0_svc meta skuid 1000 counter accept comment \"r0\""));
    }

    #[test]
    fn long_runs_are_dispatched_by_destination_in_policy_order() {
        let mut rules: Vec<AllowRule> = (0..DISPATCH_MIN_RULES)
            .map(|i| confined(&format!("r{i}"), &[&format!("10.{i}.0.0/24")], 443, 1000))
            .collect();
        // Overlaps: a wider rule after them, a /32 inside r1.
        rules.push(confined("wide", &["10.0.0.0/8", "2001:db8::/32"], 22, 0));
        rules.push(confined("one", &["10.1.0.7/32"], 22, 0));
        // A hosts rule ends the run; the rules after it are walked in turn.
        let mut web = allow("web");
        web.hosts = vec![crate::policy::HostPattern::parse("example.com").unwrap()];
        rules.push(web);
        rules.push(confined("after", &["10.1.0.0/16"], 80, 0));
        let rs = compile(&with_dns(rules), &CompileInput::default());
        let t = render(&rs);
        let output = &rs.chains[0];
        let at = |needle: &str| {
            output
                .rules
                .iter()
                .position(|r| render_rule(r, false).contains(needle))
                .unwrap_or_else(|| panic!("{needle}: {t}"))
        };
        assert!(at("ip daddr vmap @dispatch0_v4") < at("ip6 daddr vmap @dispatch0_v6"));
        assert!(at("ip6 daddr vmap @dispatch0_v6") < at("@h_web_v4"));
        assert!(at("@h_web_v4") < at("@a_after_v4"), "{t}");
        assert!(at("@a_after_v4") < at("enforce: block"), "{t}");
        // Each dispatched rule's kernel rules, unchanged, in its own chain.
        let chain = |name: &str| rs.chains.iter().find(|c| c.name == name).unwrap();
        assert_eq!(
            render_rule(&chain("allow_r3").rules[0], false),
            "meta nfproto ipv4 ip daddr @a_r3_v4 meta l4proto . th dport @a_r3_svc meta skuid 1000 counter accept comment \"r3\""
        );
        let map = rs.set("dispatch0_v4").unwrap();
        let jumps: Vec<String> = map
            .elements
            .iter()
            .map(|e| {
                format!(
                    "{} {}",
                    render_element(&map.key, true, e),
                    e.jump.as_deref().unwrap()
                )
            })
            .collect();
        assert_eq!(
            jumps,
            [
                "10.0.0.0/24 dispatch0_0",
                "10.0.1.0-10.0.255.255 allow_wide",
                "10.1.0.0-10.1.0.6 dispatch0_1",
                "10.1.0.7 dispatch0_2",
                "10.1.0.8-10.1.0.255 dispatch0_1",
                "10.1.1.0-10.1.255.255 allow_wide",
                "10.2.0.0/24 dispatch0_3",
                "10.2.1.0-10.2.255.255 allow_wide",
                "10.3.0.0/24 dispatch0_4",
                "10.3.1.0-10.3.255.255 allow_wide",
                "10.4.0.0/24 dispatch0_5",
                "10.4.1.0-10.4.255.255 allow_wide",
                "10.5.0.0/24 dispatch0_6",
                "10.5.1.0-10.5.255.255 allow_wide",
                "10.6.0.0/24 dispatch0_7",
                "10.6.1.0-10.6.255.255 allow_wide",
                "10.7.0.0/24 dispatch0_8",
                "10.7.1.0-10.255.255.255 allow_wide",
            ],
            "{t}"
        );
        // Where rules overlap, they are tried in policy order.
        let jumps_of = |name: &str| -> Vec<String> {
            chain(name)
                .rules
                .iter()
                .map(|r| render_rule(r, false))
                .collect()
        };
        assert_eq!(
            jumps_of("dispatch0_2"),
            ["jump allow_r1", "jump allow_wide", "jump allow_one"]
        );
        assert_eq!(
            rs.set("dispatch0_v6").unwrap().elements[0].jump.as_deref(),
            Some("allow_wide")
        );
        // `status` lists the dispatched rules' counters where the dispatch is.
        let counted: Vec<String> = rs
            .counted_rules()
            .iter()
            .filter_map(|r| r.counter.and(r.comment.clone()))
            .collect();
        let r0 = counted.iter().position(|c| c == "r0").unwrap();
        assert_eq!(
            counted[r0 - 1],
            "dns guard: DNS sent around the guard",
            "{counted:?}"
        );
        assert!(counted.contains(&"one".to_string()), "{counted:?}");
    }

    #[test]
    fn novelty_jumps_from_each_accept_linear_or_dispatched_and_counts_stay_put() {
        let mut rules: Vec<AllowRule> = (0..DISPATCH_MIN_RULES)
            .map(|i| confined(&format!("r{i}"), &[&format!("10.{i}.0.0/24")], 443, 1000))
            .collect();
        // Overlapping r1: the dispatch chain tries r1, then wide.
        rules.push(confined("wide", &["10.0.0.0/8"], 22, 0));
        // Not confined to CIDRs: walked in the output chain.
        let mut any = allow("any");
        any.ports = vec![PortRange {
            first: 53,
            last: 53,
        }];
        rules.push(any);
        let mut p = policy(rules);
        p.novelty = crate::policy::Novelty {
            enabled: true,
            exclude_rules: vec!["r5".into()],
            ..Default::default()
        };
        let rs = compile(&p, &CompileInput::default());
        let t = render(&rs);
        let chain = |name: &str| {
            rs.chains
                .iter()
                .find(|c| c.name == name)
                .unwrap_or_else(|| panic!("no chain {name}: {t}"))
        };
        // Family and a protocol with ports fixed: straight to the family's chain.
        assert_eq!(
            render_rule(&chain("allow_r3").rules[0], false),
            "meta nfproto ipv4 ip daddr @a_r3_v4 meta l4proto . th dport @a_r3_svc meta skuid 1000 counter jump n_r3_v4 comment \"r3\""
        );
        // Excluded: accepted as before, no chain, no sets.
        assert!(render_rule(&chain("allow_r5").rules[0], false)
            .ends_with("counter accept comment \"r5\""));
        assert!(!rs.chains.iter().any(|c| c.name.starts_with("n_r5")), "{t}");
        assert!(rs.set("n_r5_v4").is_none(), "{t}");
        // The linear rule has no address, so no family: it jumps from the
        // output chain to the chain that sorts by family and protocol.
        assert!(
            chain(OUTPUT_CHAIN)
                .rules
                .iter()
                .any(|r| r.comment.as_deref() == Some("any")
                    && r.verdict == Some(Verdict::Jump("n_any_any".into()))),
            "{t}"
        );
        let sort: Vec<String> = chain("n_any_any")
            .rules
            .iter()
            .map(|r| render_rule(r, false))
            .collect();
        assert_eq!(
            sort,
            [
                "meta nfproto ipv4 meta l4proto @novelty_protos jump n_any_v4 comment \"any\"",
                "meta nfproto ipv6 meta l4proto @novelty_protos jump n_any_v6 comment \"any\"",
                "accept comment \"any\"",
            ]
        );
        // The family's chain: a flow already seen costs one lookup; a new
        // one is logged and remembered; the overflow has its own counter.
        let n = &chain("n_r3_v4").rules;
        assert_eq!(n.len(), 3, "{t}");
        assert_eq!(
            render_rule(&n[0], false),
            "meta nfproto ipv4 meta skuid . ip daddr . meta l4proto . th dport @n_r3_v4 accept comment \"r3: seen\""
        );
        let first = render_rule(&n[1], false);
        assert!(
            first.starts_with(
                "meta nfproto ipv4 add @n_r3_v4 { meta skuid . ip daddr . meta l4proto . th dport timeout 3600s }"
            ),
            "{first}"
        );
        assert!(first.contains("egret:allowed-new:r3"), "{first}");
        assert!(
            first.ends_with("accept comment \"r3: first seen\""),
            "{first}"
        );
        assert_eq!(n[2].comment.as_deref(), Some("r3: novelty set full"));
        assert!(n[2].matches.is_empty() && n[2].log.is_none() && n[2].counter.is_some());
        // r3's rules are all IPv4: no IPv6 chain or set.
        assert!(!rs.chains.iter().any(|c| c.name == "n_r3_v6"), "{t}");
        let set = rs.set("n_r3_v4").unwrap();
        assert!(set.is_dynamic() && set.timeout && set.size == Some(p.novelty.set_size));
        assert!(t.contains("flags dynamic,timeout"), "{t}");
        // `status` and `check --lint` still find every rule's counter where
        // it was: the jumps are counted as the accepts were.
        let counted: Vec<String> = rs
            .counted_rules()
            .iter()
            .filter_map(|r| r.counter.and(r.comment.clone()))
            .collect();
        for name in ["r0", "r3", "r5", "wide", "any"] {
            assert!(counted.contains(&name.to_string()), "{name}: {counted:?}");
        }
        assert!(
            !counted.iter().any(|c| c.contains("first seen")),
            "{counted:?}"
        );
    }

    #[test]
    fn cover_splits_overlaps_and_keeps_the_top_of_the_space() {
        let a: &[(u128, u128)] = &[(0, 9), (20, 29)];
        let b: &[(u128, u128)] = &[(5, u128::MAX)];
        assert_eq!(
            cover(&[(0, a), (1, b)]),
            [
                (0, 4, vec![0]),
                (5, 9, vec![0, 1]),
                (10, 19, vec![1]),
                (20, 29, vec![0, 1]),
                (30, u128::MAX, vec![1]),
            ]
        );
        // Touching ranges of different rules stay apart; nothing covers the gap.
        let c: &[(u128, u128)] = &[(30, 39)];
        assert_eq!(
            cover(&[(0, a), (2, c)]),
            [(0, 9, vec![0]), (20, 29, vec![0]), (30, 39, vec![2])]
        );
    }

    #[test]
    fn connected_udp_sockets_are_never_seeded() {
        let flows = vec![OpenFlow {
            protocol: 17,
            local: "10.0.0.1:40000".parse().unwrap(),
            remote: "10.0.0.2:53".parse().unwrap(),
        }];
        let rs = compile(
            &policy(vec![]),
            &CompileInput {
                open_flows: flows,
                ..Default::default()
            },
        );
        assert!(rs.set(PREEXISTING_V4).unwrap().elements.is_empty());
    }
}
