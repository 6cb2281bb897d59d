//! Ruleset → nft syntax, for `egret plan` and for feeding `nft -f` in benchmarks.

use std::collections::HashMap;
use std::fmt::Write;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::*;

/// Sets with more elements than this print one element per line (diffs read better).
const INLINE_ELEMENTS: usize = 8;

pub fn render(rs: &Ruleset) -> String {
    let mut out = String::new();
    let cgroup_levels: HashMap<&str, u32> = rs
        .chains
        .iter()
        .flat_map(|c| &c.rules)
        .flat_map(|r| &r.matches)
        .filter_map(|m| match m {
            Match::Cgroup { level, set } => Some((set.as_str(), *level)),
            _ => None,
        })
        .collect();
    let _ = writeln!(out, "table inet {TABLE} {{");
    let _ = writeln!(out, "\tcomment {}", quote(&rs.comment));
    for set in &rs.sets {
        out.push('\n');
        render_set(&mut out, set, cgroup_levels.get(set.name.as_str()).copied());
    }
    for chain in &rs.chains {
        out.push('\n');
        let _ = writeln!(out, "\tchain {} {{", chain.name);
        if let Some(base) = &chain.base {
            let hook = match base.hook {
                Hook::Prerouting => "prerouting",
                Hook::Input => "input",
                Hook::Output => "output",
                Hook::Forward => "forward",
            };
            let priority = match (base.nat, base.priority) {
                (false, 0) => "filter".to_string(),
                (true, -100) => "dstnat".to_string(),
                (_, p) => p.to_string(),
            };
            let kind = if base.nat { "nat" } else { "filter" };
            let policy = if base.accept { "accept" } else { "drop" };
            let _ = writeln!(
                out,
                "\t\ttype {kind} hook {hook} priority {priority}; policy {policy};"
            );
        }
        for rule in &chain.rules {
            let _ = writeln!(out, "\t\t{}", render_rule(rule, false));
        }
        let _ = writeln!(out, "\t}}");
    }
    out.push_str("}\n");
    out
}

fn render_set(out: &mut String, set: &Set, cgroup_level: Option<u32>) {
    let kind = if set.verdict_map { "map" } else { "set" };
    let _ = writeln!(out, "\t{kind} {} {{", set.name);
    let data = if set.verdict_map { " : verdict" } else { "" };
    match (set.key.as_slice(), cgroup_level) {
        ([Field::CgroupId], Some(level)) => {
            let _ = writeln!(out, "\t\ttypeof socket cgroupv2 level {level}{data}");
        }
        (key, _) => {
            let names: Vec<&str> = key.iter().map(|f| f.nft_name()).collect();
            let _ = writeln!(out, "\t\ttype {}{data}", names.join(" . "));
        }
    }
    if let Some(size) = set.size {
        let _ = writeln!(out, "\t\tsize {size}");
    }
    if set.interval {
        let _ = writeln!(out, "\t\tflags interval");
    }
    if set.is_dynamic() {
        // Filled by the kernel from the packet path (first-seen flows).
        let _ = writeln!(out, "\t\tflags dynamic,timeout");
    } else if set.timeout {
        // Its elements are the DNS guard's run-time state, not part of the plan.
        let _ = writeln!(out, "\t\tflags timeout");
    }
    if !set.elements.is_empty() && !set.timeout {
        let items: Vec<String> = set
            .elements
            .iter()
            .map(|e| match &e.jump {
                Some(chain) => format!(
                    "{} : jump {chain}",
                    render_element(&set.key, set.interval, e)
                ),
                None => render_element(&set.key, set.interval, e),
            })
            .collect();
        if items.len() <= INLINE_ELEMENTS {
            let _ = writeln!(out, "\t\telements = {{ {} }}", items.join(", "));
        } else {
            let _ = writeln!(out, "\t\telements = {{");
            let last = items.len() - 1;
            for (i, item) in items.iter().enumerate() {
                let _ = writeln!(out, "\t\t\t{item}{}", if i == last { "" } else { "," });
            }
            let _ = writeln!(out, "\t\t}}");
        }
    }
    let _ = writeln!(out, "\t}}");
}

pub fn render_element(key: &[Field], interval: bool, e: &Element) -> String {
    if let ([field @ (Field::Ipv4 | Field::Ipv6)], true, Some(end)) = (key, interval, &e.end) {
        if let Some(prefix) = prefix_of(*field, e.key[0], end[0]) {
            return format!("{}/{prefix}", value(*field, e.key[0]));
        }
    }
    let parts: Vec<String> = key
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let start = e.key.get(i).copied().unwrap_or_default();
            match e.end.as_ref().and_then(|end| end.get(i)).copied() {
                Some(end) if end != start => format!("{}-{}", value(*f, start), value(*f, end)),
                _ => value(*f, start),
            }
        })
        .collect();
    parts.join(" . ")
}

/// The prefix length if `[start, end]` is exactly one CIDR block.
fn prefix_of(field: Field, start: u128, end: u128) -> Option<u32> {
    let bits = 8 * field.byte_len() as u32;
    let size = end.checked_sub(start)?.checked_add(1);
    let host_bits = match size {
        None => 128, // the whole IPv6 space
        Some(size) if size.is_power_of_two() => size.trailing_zeros(),
        Some(_) => return None,
    };
    (host_bits == 128 || start.trailing_zeros() >= host_bits).then(|| bits - host_bits)
}

fn value(field: Field, v: u128) -> String {
    match field {
        Field::Ipv4 => Ipv4Addr::from(v as u32).to_string(),
        Field::Ipv6 => Ipv6Addr::from(v).to_string(),
        Field::L4Proto => proto_name(v as u8),
        Field::IcmpType => match v {
            3 => "destination-unreachable".into(),
            11 => "time-exceeded".into(),
            12 => "parameter-problem".into(),
            other => other.to_string(),
        },
        Field::Icmpv6Type => match v {
            1 => "destination-unreachable".into(),
            2 => "packet-too-big".into(),
            3 => "time-exceeded".into(),
            4 => "parameter-problem".into(),
            130 => "mld-listener-query".into(),
            131 => "mld-listener-report".into(),
            132 => "mld-listener-done".into(),
            133 => "nd-router-solicit".into(),
            135 => "nd-neighbor-solicit".into(),
            136 => "nd-neighbor-advert".into(),
            143 => "mld2-listener-report".into(),
            other => other.to_string(),
        },
        Field::Port | Field::Uid | Field::Gid | Field::CgroupId => v.to_string(),
    }
}

pub fn proto_name(p: u8) -> String {
    match p {
        IPPROTO_ICMP => "icmp".into(),
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        IPPROTO_ICMPV6 => "ipv6-icmp".into(),
        other => other.to_string(),
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn family_kw(f: Family) -> &'static str {
    match f {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

/// A novelty set's key as nft writes it.
fn novelty_key_text(family: Family) -> String {
    format!(
        "meta skuid . {} daddr . meta l4proto . th dport",
        family_kw(family)
    )
}

fn id_match(kw: &str, m: &IdMatch) -> String {
    match m {
        IdMatch::Eq(id) => format!("meta {kw} {id}"),
        IdMatch::Set(set) => format!("meta {kw} @{set}"),
    }
}

/// One rule in nft syntax; with `counters`, the live packet and byte counts.
pub fn render_rule(rule: &Rule, counters: bool) -> String {
    let mut parts: Vec<String> = rule
        .matches
        .iter()
        .map(|m| match m {
            Match::OifName(name) => format!("oifname {}", quote(name)),
            Match::Mark(mark) => format!("meta mark {mark:#010x}"),
            Match::IifName(name) => format!("iifname {}", quote(name)),
            Match::CtState(bits) => {
                let names: Vec<&str> = [
                    (1, "invalid"),
                    (CT_ESTABLISHED, "established"),
                    (CT_RELATED, "related"),
                    (8, "new"),
                    (64, "untracked"),
                ]
                .iter()
                .filter(|(b, _)| bits & b != 0)
                .map(|(_, n)| *n)
                .collect();
                format!("ct state {}", names.join(","))
            }
            Match::NfProto(f) => format!(
                "meta nfproto {}",
                if *f == Family::V4 { "ipv4" } else { "ipv6" }
            ),
            Match::L4Proto(p) => format!("meta l4proto {}", proto_name(*p)),
            Match::L4ProtoIn(set) => format!("meta l4proto @{set}"),
            Match::Daddr(f, set) => format!("{} daddr @{set}", family_kw(*f)),
            Match::ProtoDport(set) => format!("meta l4proto . th dport @{set}"),
            Match::IcmpType(Family::V4, set) => format!("icmp type @{set}"),
            Match::IcmpType(Family::V6, set) => format!("icmpv6 type @{set}"),
            Match::SkUid(m) => id_match("skuid", m),
            Match::SkGid(m) => id_match("skgid", m),
            Match::Cgroup { level, set } => format!("socket cgroupv2 level {level} @{set}"),
            Match::BoundSocket => "socket wildcard 0".into(),
            Match::FiveTuple(f, set) => {
                let kw = family_kw(*f);
                format!("meta l4proto . {kw} saddr . th sport . {kw} daddr . th dport @{set}")
            }
            Match::Seen { family, set } => format!("{} @{set}", novelty_key_text(*family)),
            Match::Remember {
                family,
                set,
                timeout,
            } => format!(
                "add @{set} {{ {} timeout {timeout}s }}",
                novelty_key_text(*family)
            ),
            Match::TcpFlagsZero(mask) => {
                let names: Vec<&str> = ["fin", "syn", "rst", "psh", "ack", "urg", "ecn", "cwr"]
                    .iter()
                    .enumerate()
                    .filter(|(bit, _)| mask & (1 << bit) != 0)
                    .map(|(_, n)| *n)
                    .collect();
                match names.as_slice() {
                    [one] => format!("tcp flags & {one} == 0"),
                    many => format!("tcp flags & ({}) == 0", many.join(" | ")),
                }
            }
            Match::CtMarkSet(mark) => format!("ct mark set {mark:#010x}"),
        })
        .collect();
    if let Some(c) = &rule.counter {
        parts.push(if counters {
            format!("counter packets {} bytes {}", c.packets, c.bytes)
        } else {
            "counter".into()
        });
    }
    if let Some(log) = &rule.log {
        parts.push(format!(
            "log prefix {} group {}",
            quote(&log.prefix),
            log.group
        ));
    }
    if let Some(v) = &rule.verdict {
        parts.push(match v {
            Verdict::Accept => "accept".into(),
            Verdict::Drop => "drop".into(),
            Verdict::RejectTcpReset => "reject with tcp reset".into(),
            Verdict::RejectAdminProhibited => "reject with icmpx admin-prohibited".into(),
            Verdict::Redirect(port) => format!("redirect to :{port}"),
            Verdict::Jump(chain) => format!("jump {chain}"),
            Verdict::DaddrVmap(f, map) => format!("{} daddr vmap @{map}", family_kw(*f)),
        });
    }
    if let Some(c) = &rule.comment {
        parts.push(format!("comment {}", quote(c)));
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_print_as_cidrs_when_they_are_blocks() {
        let k = [Field::Ipv4];
        let e = |s: u32, t: u32| Element::range(vec![s as u128], Some(vec![t as u128]));
        assert_eq!(
            render_element(&k, true, &e(0x0a000000, 0x0affffff)),
            "10.0.0.0/8"
        );
        assert_eq!(
            render_element(&k, true, &e(0x0a000001, 0x0a000002)),
            "10.0.0.1-10.0.0.2"
        );
        assert_eq!(render_element(&k, true, &e(0, u32::MAX)), "0.0.0.0/0");
        let all6 = Element::range(vec![0], Some(vec![u128::MAX]));
        assert_eq!(render_element(&[Field::Ipv6], true, &all6), "::/0");
    }
}
