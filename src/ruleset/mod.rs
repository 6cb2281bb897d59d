//! The compiled ruleset: egret's one `inet egret` table as data.
//!
//! This is the boundary between policy and kernel. [`compile`] builds it from a
//! [`crate::policy::Policy`] (pure), [`render`] prints it in nft syntax for `plan`,
//! and `crate::kernel::nft` turns it into one netlink transaction (and reads it
//! back for `status`, `plan` diffs and rollback). No I/O here.

mod compile;
mod merge;
mod render;

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

pub use crate::policy::cache_mark;
pub use compile::{compile, unit_default_level, CompileInput, UnitCgroups};
pub use merge::merge_ranges;
pub use render::{render, render_rule};

/// The table egret owns. Nothing else is ever touched.
pub const TABLE: &str = "egret";
/// The base chain on the output hook.
pub const OUTPUT_CHAIN: &str = "output";
/// Set holding connections that were open before egret's first ruleset (see
/// docs/architecture.md, "connections opened before conntrack").
pub const PREEXISTING_V4: &str = "preexisting_v4";
pub const PREEXISTING_V6: &str = "preexisting_v6";
/// NFLOG prefixes: the monitor reads the action (and rule) from them.
pub const PREFIX_BLOCKED: &str = "egret:blocked";
pub const PREFIX_WOULD_BLOCK: &str = "egret:would-block";
/// The rule name in the log prefix of DNS sent around the guard.
pub const DNS_BYPASS_RULE: &str = "dns-bypass";
/// `scope = "host+containers"`: the forward-hook base chain, and the chain it
/// jumps to for traffic from container bridges (also the rule name in events).
pub const FORWARD_CHAIN: &str = "forward";
pub const CONTAINERS_CHAIN: &str = "containers";
/// What the chain of a dispatched allow rule is named: `allow_<rule>` (see
/// [`allow_chain_name`]).
pub const ALLOW_CHAIN_PREFIX: &str = "allow_";

/// The chain holding the kernel rules of policy rule `rule` when a verdict
/// map dispatches to it (`ip daddr vmap @dispatch<N>_v4`).
pub fn allow_chain_name(rule: &str) -> String {
    format!("{ALLOW_CHAIN_PREFIX}{rule}")
}

/// scope = "host+containers" with `[dns]`: the nat chain that gives
/// containers' DNS to the guard, and the input chain that keeps egret's
/// container listeners to the bridges.
pub const CONTAINER_DNS_CHAIN: &str = "container_dns";
pub const CONTAINER_SERVICES_CHAIN: &str = "container_services";
/// The nat chain that redirects plain DNS to the guard (`intercept = true`).
pub const DNS_INTERCEPT_CHAIN: &str = "dns_intercept";
/// The rule name on events about queries the DNS guard refused.
pub const DNS_GUARD_RULE: &str = "dns-guard";

/// IP protocol numbers the compiler writes and `render` names.
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;
pub const IPPROTO_ICMPV6: u8 = 58;

/// The set of a rule's unit cgroup ids at one level of the hierarchy.
pub fn cgroup_set_name(rule: &str, level: u32) -> String {
    format!("a_{rule}_cg{level}")
}

/// The sets the DNS guard fills for a rule with `hosts`.
pub fn host_set_name(rule: &str, family: Family) -> String {
    match family {
        Family::V4 => format!("{HOST_SET_PREFIX}{rule}_v4"),
        Family::V6 => format!("{HOST_SET_PREFIX}{rule}_v6"),
    }
}

/// What the names of [`host_set_name`]'s sets begin with; no other set's does.
pub const HOST_SET_PREFIX: &str = "h_";

/// The dynamic set of a rule's flows already reported as first seen (filled
/// by the kernel from the packet path, see docs/policy.md, `[novelty]`).
pub fn novelty_set_name(rule: &str, family: Family) -> String {
    match family {
        Family::V4 => format!("{NOVELTY_PREFIX}{rule}_v4"),
        Family::V6 => format!("{NOVELTY_PREFIX}{rule}_v6"),
    }
}

/// The chains a rule's accepted packets jump to. Per family, named as its
/// set (`n_<rule>_v4`): a flow not yet in the set is logged
/// (`egret:allowed-new:<rule>`) and remembered before being accepted. With
/// no family, `n_<rule>_any`, which sends each packet to its family's chain.
/// The suffixes keep rules apart: no family chain's name ends in `_any`.
pub fn novelty_chain_name(rule: &str, family: Option<Family>) -> String {
    match family {
        Some(f) => novelty_set_name(rule, f),
        None => format!("{NOVELTY_PREFIX}{rule}_any"),
    }
}

/// What the names of novelty sets and chains begin with; no other's does.
/// Sets with this prefix are the only ones the kernel itself writes to
/// (`flags dynamic`).
pub const NOVELTY_PREFIX: &str = "n_";

/// The comment suffix of a novelty chain's rule that counts new flows its
/// full set could not remember (`<rule>: novelty set full`).
pub const NOVELTY_OVERFLOW: &str = "novelty set full";

/// The NFLOG prefix of a first-seen allowed flow: `egret:allowed-new:<rule>`.
pub const PREFIX_ALLOWED_NEW: &str = "egret:allowed-new";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// One field of a set key. Lengths and byte order follow the kernel's registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Field {
    Ipv4,
    Ipv6,
    L4Proto,
    Port,
    Uid,
    Gid,
    /// cgroup v2 id (the inode of the cgroup directory), 8 bytes, host order.
    CgroupId,
    IcmpType,
    Icmpv6Type,
}

impl Field {
    /// Length of the value in bytes (before padding to 4 in concatenations).
    pub fn byte_len(self) -> usize {
        match self {
            Field::Ipv4 => 4,
            Field::Ipv6 => 16,
            Field::L4Proto | Field::IcmpType | Field::Icmpv6Type => 1,
            Field::Port => 2,
            Field::Uid | Field::Gid => 4,
            Field::CgroupId => 8,
        }
    }

    /// nft's datatype id, so `nft list` shows the elements properly.
    pub fn nft_type(self) -> u32 {
        match self {
            Field::Ipv4 => 7,
            Field::Ipv6 => 8,
            Field::L4Proto => 12,
            Field::Port => 13,
            Field::IcmpType => 14,
            Field::Uid => 24,
            Field::Gid => 25,
            Field::Icmpv6Type => 29,
            Field::CgroupId => 4, // integer
        }
    }

    pub fn nft_name(self) -> &'static str {
        match self {
            Field::Ipv4 => "ipv4_addr",
            Field::Ipv6 => "ipv6_addr",
            Field::L4Proto => "inet_proto",
            Field::Port => "inet_service",
            Field::IcmpType => "icmp_type",
            Field::Icmpv6Type => "icmpv6_type",
            Field::Uid => "uid",
            Field::Gid => "gid",
            Field::CgroupId => "integer",
        }
    }

    /// Big-endian (network order) fields; the rest are in host order.
    pub fn big_endian(self) -> bool {
        matches!(self, Field::Ipv4 | Field::Ipv6 | Field::Port)
    }

    /// The largest value the field can hold.
    pub fn max(self) -> u128 {
        match self.byte_len() {
            16 => u128::MAX,
            n => (1u128 << (8 * n)) - 1,
        }
    }

    pub fn from_nft_type(t: u32) -> Option<Field> {
        Some(match t {
            7 => Field::Ipv4,
            8 => Field::Ipv6,
            12 => Field::L4Proto,
            13 => Field::Port,
            14 => Field::IcmpType,
            24 => Field::Uid,
            25 => Field::Gid,
            29 => Field::Icmpv6Type,
            4 => Field::CgroupId,
            _ => return None,
        })
    }
}

/// A named set. Interval sets hold ranges; `end` is inclusive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Set {
    pub name: String,
    pub key: Vec<Field>,
    pub interval: bool,
    /// Elements expire (the DNS guard's addresses). Their elements are run-time
    /// state: the compiler leaves them empty and the kernel layer carries live
    /// ones across a reload.
    #[serde(default)]
    pub timeout: bool,
    /// A fixed capacity, given to the kernel for large sets whose elements
    /// never change after loading: it sizes the hash table once instead of
    /// growing and rehashing it while 50,000 elements arrive (halves their
    /// load time), and caps the set at exactly that many elements.
    #[serde(default)]
    pub size: Option<u32>,
    /// A verdict map: each element carries the chain it jumps to
    /// ([`Element::jump`]); looked up by [`Verdict::DaddrVmap`].
    #[serde(default)]
    pub verdict_map: bool,
    pub elements: Vec<Element>,
}

impl Set {
    /// A set of unit cgroup ids (see [`cgroup_set_name`]): what `egret run`
    /// swaps when a unit restarts. Known by its key, the one thing every
    /// such set has and no other set has.
    pub fn is_cgroup(&self) -> bool {
        self.key == [Field::CgroupId]
    }

    /// A set the packet path adds to (`add @set {...}` in a rule): a
    /// novelty set, known by its name's prefix.
    pub fn is_dynamic(&self) -> bool {
        self.name.starts_with(NOVELTY_PREFIX)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Element {
    /// One value per key field.
    pub key: Vec<u128>,
    /// For interval sets: the inclusive end, one value per field. `None` = a single value.
    pub end: Option<Vec<u128>>,
    /// In a verdict map: the chain this element jumps to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jump: Option<String>,
}

impl Element {
    pub fn single(key: Vec<u128>) -> Element {
        Element {
            key,
            end: None,
            jump: None,
        }
    }

    /// An element of an interval set: `[start, end]`, or a single value.
    pub fn range(key: Vec<u128>, end: Option<Vec<u128>>) -> Element {
        Element {
            key,
            end,
            jump: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ruleset {
    /// Stored as the table's comment: `egret mode=<mode> log_group=<n>`.
    pub comment: String,
    pub sets: Vec<Set>,
    pub chains: Vec<Chain>,
}

impl Ruleset {
    pub fn set(&self, name: &str) -> Option<&Set> {
        self.sets.iter().find(|s| s.name == name)
    }
    pub fn set_mut(&mut self, name: &str) -> Option<&mut Set> {
        self.sets.iter_mut().find(|s| s.name == name)
    }
    /// The filter rules that stand for policy rules and carry their counters,
    /// in the order `status` lists them: see [`counted_rules`].
    pub fn counted_rules(&self) -> Vec<&Rule> {
        counted_rules(
            self.chains
                .iter()
                .flat_map(|c| c.rules.iter().map(move |r| (c.name.as_str(), r))),
        )
    }
    /// This ruleset's rules as the kernel lists them (see `uncounted`): what
    /// a live table loaded from it must show.
    pub fn listed_rules(&self) -> Vec<(String, Rule)> {
        uncounted(
            self.chains
                .iter()
                .flat_map(|c| c.rules.iter().map(move |r| (c.name.clone(), r.clone())))
                .collect(),
        )
    }
}

/// The output chain's rules, with the rules of the dispatched allow rules'
/// chains (`allow_<rule>`, in table order) where the first verdict map
/// dispatches to them: the rules whose counters `status`, the API and
/// `check --lint` read. Takes (chain, rule) pairs as the kernel lists them,
/// so it needs no set elements.
pub fn counted_rules<'a>(rules: impl Iterator<Item = (&'a str, &'a Rule)>) -> Vec<&'a Rule> {
    let (mut output, mut dispatched) = (Vec::new(), Vec::new());
    for (chain, rule) in rules {
        if chain == OUTPUT_CHAIN {
            output.push(rule);
        } else if chain.starts_with(ALLOW_CHAIN_PREFIX) {
            dispatched.push(rule);
        }
    }
    let mut out = Vec::with_capacity(output.len() + dispatched.len());
    for rule in output {
        let first_dispatch = matches!(rule.verdict, Some(Verdict::DaddrVmap(..)));
        out.push(rule);
        if first_dispatch {
            out.append(&mut dispatched);
        }
    }
    out
}

/// (chain, rule) pairs with their counters zeroed, sorted by chain (the
/// kernel lists chains in its own order; within a chain the order is the
/// rules' order), so rules read back compare equal to rules compiled.
pub fn uncounted(mut rules: Vec<(String, Rule)>) -> Vec<(String, Rule)> {
    for (_, r) in &mut rules {
        if r.counter.is_some() {
            r.counter = Some(Counter::default());
        }
    }
    rules.sort_by(|a, b| a.0.cmp(&b.0));
    rules
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hook {
    Output,
    Forward,
    /// Container DNS redirected to the guard (nat).
    Prerouting,
    /// What may reach egret's container listeners.
    Input,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseChain {
    pub hook: Hook,
    /// A `nat` chain (the DNS guard's intercept) rather than a `filter` one.
    #[serde(default)]
    pub nat: bool,
    pub priority: i32,
    /// Chain policy: true = accept, false = drop.
    pub accept: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chain {
    pub name: String,
    pub base: Option<BaseChain>,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub counter: Option<Counter>,
    pub log: Option<Log>,
    pub verdict: Option<Verdict>,
    /// The policy rule name or baseline item; shown by `nft list` and `egret status`.
    pub comment: Option<String>,
}

/// Packet and byte counts. Compiled rules carry zeros; rules read back from
/// the kernel carry the live counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Log {
    pub group: u16,
    pub prefix: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    Accept,
    Drop,
    /// `reject with tcp reset` (the rule must match TCP first).
    RejectTcpReset,
    /// `reject with icmpx admin-prohibited`.
    RejectAdminProhibited,
    /// `redirect to :PORT` (nat chains): to the local host, this port.
    Redirect(u16),
    /// `jump CHAIN`
    Jump(String),
    /// `ip daddr vmap @MAP` / `ip6 daddr vmap @MAP`: jump to the chain the
    /// destination's element names; no element, no verdict (the next rule).
    DaddrVmap(Family, String),
}

/// Who may send, by id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdMatch {
    Eq(u32),
    Set(String),
}

/// The matches egret uses. Each has one netlink encoding and one nft spelling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Match {
    /// `oifname "lo"`
    OifName(String),
    /// `iifname "docker0"`, or a prefix with a trailing `*`: `iifname "br-*"`.
    IifName(String),
    /// `ct state ...` with nft's state bits (established = 2, related = 4, new = 8).
    CtState(u32),
    /// `meta nfproto ipv4|ipv6`
    NfProto(Family),
    /// `meta l4proto tcp`
    L4Proto(u8),
    /// `meta mark 0x...`: set only by egret's own upstream sockets.
    Mark(u32),
    /// `meta l4proto @set`
    L4ProtoIn(String),
    /// `ip daddr @set` / `ip6 daddr @set`
    Daddr(Family, String),
    /// `meta l4proto . th dport @set`
    ProtoDport(String),
    /// `icmp type @set` / `icmpv6 type @set`
    IcmpType(Family, String),
    /// `meta skuid ...`
    SkUid(IdMatch),
    /// `meta skgid ...`
    SkGid(IdMatch),
    /// `socket cgroupv2 level N @set`
    Cgroup { level: u32, set: String },
    /// A connection's 5-tuple in a set (the seeded ones):
    /// `meta l4proto . ip saddr . th sport . ip daddr . th dport @set`
    FiveTuple(Family, String),
    /// `tcp flags & MASK == 0` (after `meta l4proto tcp`): none of these flags set.
    TcpFlagsZero(u8),
    /// `ct mark set 0x...`: a statement, not a test (it always matches);
    /// written after the rule's matches. The guard's queries to a local cache
    /// hand [`cache_mark`] to the cache this way (see docs/dns.md).
    CtMarkSet(u32),
    /// A flow already in a novelty set, keyed by what the kernel knows of
    /// its sender and destination:
    /// `meta skuid . ip daddr . meta l4proto . th dport @set`.
    Seen { family: Family, set: String },
    /// `add @set { meta skuid . ip daddr . meta l4proto . th dport timeout Ns }`:
    /// remembers the flow (a statement that matches unless the set is full,
    /// the kernel's NFT_BREAK). After a [`Match::Seen`] rule, so only a flow
    /// not yet seen gets here.
    Remember {
        family: Family,
        set: String,
        timeout: u32,
    },
    /// `socket wildcard 0`: a local socket bound to the packet's very
    /// destination address and port (not to a wildcard) would receive it,
    /// e.g. a container runtime's resolver on a bridge's gateway address.
    BoundSocket,
}

/// The key of a novelty set for `family`.
pub fn novelty_key(family: Family) -> Vec<Field> {
    let addr = match family {
        Family::V4 => Field::Ipv4,
        Family::V6 => Field::Ipv6,
    };
    vec![Field::Uid, addr, Field::L4Proto, Field::Port]
}

/// The SYN bit of `tcp flags`.
pub const TCP_SYN: u8 = 0x02;

pub const CT_ESTABLISHED: u32 = 2;
pub const CT_RELATED: u32 = 4;
pub const CT_NEW: u32 = 8;

/// A connection that exists before a ruleset is applied (local end first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OpenFlow {
    pub protocol: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// An open flow as an element of `preexisting_v4/v6`.
pub fn preexisting_element(f: &OpenFlow) -> Element {
    Element::single(vec![
        f.protocol as u128,
        ip_to_u128(&f.local.ip()),
        f.local.port() as u128,
        ip_to_u128(&f.remote.ip()),
        f.remote.port() as u128,
    ])
}

pub fn ip_to_u128(ip: &IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(*a) as u128,
        IpAddr::V6(a) => u128::from(*a),
    }
}
