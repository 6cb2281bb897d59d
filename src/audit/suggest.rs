//! `egret suggest`: the recorded would-be-blocked flows as a policy to review.
//!
//! One rule per identity (systemd service, else user) and purpose (protocol
//! and port), destinations by host name where the DNS guard resolved one,
//! addresses otherwise. Rules whose destinations are the same merge their
//! ports, so nothing is allowed that was not seen. Pure and stable: the same
//! flows give the same text, sorted, so suggestions diff cleanly in review.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::IpAddr;

use ipnet::IpNet;

use super::evaluate::{
    evaluate, Attempt, Outcome, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
};
use super::policy_text::{self, comment_text, list, quote};
use super::recorded::{Kind, Recorded};
use crate::policy::{Mode, Policy, L4};
use crate::ruleset::DNS_BYPASS_RULE;

/// This many names under one parent domain (in one rule) become `*.parent`.
pub const COLLAPSE_AT: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Subject {
    Unit(String),
    User(String),
    Uid(u32),
    Anyone,
}

impl Subject {
    fn of(r: &Recorded) -> Subject {
        // Only services: session scopes and their numbers come and go.
        if let Some(u) = r.flow.unit.as_ref().filter(|u| u.ends_with(".service")) {
            return Subject::Unit(u.clone());
        }
        match (&r.user_name, r.flow.uid) {
            (Some(name), _) => Subject::User(name.clone()),
            (None, Some(uid)) => Subject::Uid(uid),
            (None, None) => Subject::Anyone,
        }
    }

    fn label(&self) -> String {
        match self {
            Subject::Unit(u) => u.strip_suffix(".service").unwrap_or(u).to_string(),
            Subject::User(n) => format!("user-{n}"),
            Subject::Uid(n) => format!("uid-{n}"),
            Subject::Anyone => "any".into(),
        }
    }

    fn toml(&self) -> Option<String> {
        match self {
            Subject::Unit(u) => Some(format!("units = {}", list(&[u]))),
            Subject::User(n) => Some(format!("users = {}", list(&[n]))),
            Subject::Uid(n) => Some(format!("users = [{n}]")),
            Subject::Anyone => None,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Seen {
    packets: u64,
    incidents: u64,
    first: String,
    last: String,
    executables: BTreeSet<String>,
    /// Rules other than `default` that logged the flows (per-rule audit mode).
    logged_under: BTreeSet<String>,
    /// Address → the name it was resolved from, when no hosts rule can use it.
    resolved_from: BTreeMap<IpAddr, BTreeSet<String>>,
    /// The hosts that recorded it (`--from` a fleet's events).
    hosts: BTreeSet<String>,
}

impl Seen {
    fn add(&mut self, r: &Recorded) {
        // Counts come from documents anyone could have edited.
        self.packets = self.packets.saturating_add(r.count);
        self.incidents += 1;
        if let Some(h) = &r.host {
            self.hosts.insert(h.clone());
        }
        if self.first.is_empty() || r.first_seen < self.first {
            self.first = r.first_seen.clone();
        }
        if r.last_seen > self.last {
            self.last = r.last_seen.clone();
        }
        if let Some(e) = &r.executable {
            self.executables.insert(e.clone());
        }
        if r.rule != crate::monitor::event::DEFAULT_RULE {
            self.logged_under.insert(r.rule.clone());
        }
    }

    fn merge(&mut self, o: &Seen) {
        self.packets = self.packets.saturating_add(o.packets);
        self.incidents += o.incidents;
        self.hosts.extend(o.hosts.iter().cloned());
        if self.first.is_empty() || (!o.first.is_empty() && o.first < self.first) {
            self.first = o.first.clone();
        }
        if o.last > self.last {
            self.last = o.last.clone();
        }
        self.executables.extend(o.executables.iter().cloned());
        self.logged_under.extend(o.logged_under.iter().cloned());
        for (ip, names) in &o.resolved_from {
            self.resolved_from
                .entry(*ip)
                .or_default()
                .extend(names.iter().cloned());
        }
    }
}

/// Who, what protocol, through the proxy only or not.
type Purpose = (Subject, L4, bool);

/// A purpose and port: what one rule of the suggestion is about.
type GroupKey = (Purpose, Option<u16>);

/// Destinations of each purpose and port, with what was seen.
type Groups = BTreeMap<GroupKey, (Destinations, Seen)>;

/// A rule being built: its ports, collapse notes and what was seen.
type Merged = (BTreeSet<u16>, Vec<String>, Seen);

#[derive(Debug, Default)]
struct Destinations {
    names: BTreeSet<String>,
    ips: BTreeSet<IpAddr>,
}

struct Suggested {
    name: String,
    /// Seen on fewer hosts than `--min-hosts`: written commented out.
    rare: bool,
    subject: Subject,
    protocol: L4,
    via_proxy: bool,
    hosts: Vec<String>,
    cidrs: Vec<IpNet>,
    ports: Vec<(u16, u16)>,
    collapsed: Vec<String>,
    seen: Seen,
}

/// Flows that no rule can allow, reported after the rules.
#[derive(Default)]
struct Notes {
    bypass: Seen,
    unexpressible: BTreeMap<u8, Seen>,
    names_only_asked: BTreeSet<String>,
}

pub struct Input<'a> {
    pub recorded: &'a [Recorded],
    /// The policy the audit ran under: its settings and rules are kept.
    pub base: Option<&'a Policy>,
    /// Where the flows came from, for the header ("/var/lib/egret, last 7d").
    pub source: &'a str,
    /// Many hosts' flows (`--from`): one policy for all of them.
    pub fleet: Option<FleetInput<'a>>,
}

/// A role's hosts: each rule says how many of them needed it, and what
/// fewer than `min_hosts` needed is written apart, commented out.
pub struct FleetInput<'a> {
    pub hosts: &'a BTreeSet<String>,
    pub min_hosts: usize,
}

/// `--min-hosts`: a number of hosts, or a share of them (`10%`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MinHosts {
    Count(usize),
    Percent(f64),
}

impl MinHosts {
    pub fn parse(s: &str) -> Result<MinHosts, String> {
        let bad = || format!("{s:?}: a number of hosts (3) or a share of them (10%)");
        match s.strip_suffix('%') {
            Some(p) => match p.trim().parse::<f64>() {
                Ok(p) if (0.0..=100.0).contains(&p) => Ok(MinHosts::Percent(p)),
                _ => Err(bad()),
            },
            None => s.trim().parse().map(MinHosts::Count).map_err(|_| bad()),
        }
    }

    /// The fewest hosts a flow needs to be suggested as a rule, out of
    /// `hosts`. A share is rounded up, and at least 2 (a flow of one host
    /// is for review), but never more than there are hosts: with one host,
    /// everything it did is its role.
    pub fn of(self, hosts: usize) -> usize {
        match self {
            MinHosts::Count(n) => n,
            MinHosts::Percent(p) => {
                let share = (p / 100.0 * hosts as f64).ceil() as usize;
                share.max(2).min(hosts)
            }
        }
    }
}

pub fn suggest(input: &Input) -> String {
    let default_base = Policy::audit_default();
    let base = input.base.unwrap_or(&default_base);
    let already = Policy {
        mode: Mode::Enforce,
        ..base.clone()
    };
    let names_in_kernel = base.dns.is_some();
    let mut items: Vec<(GroupKey, Attempt, &Recorded)> = Vec::new();
    let mut notes = Notes::default();
    let mut connected_names = BTreeSet::new();
    for r in input.recorded {
        let (flow, via_proxy) = match &r.kind {
            Kind::DnsQuery { name } => {
                if !base.rules.iter().any(|rule| rule.allows_host(name)) {
                    notes.names_only_asked.insert(name.clone());
                }
                continue;
            }
            Kind::Proxy { host, port } => {
                let ip = host.parse::<IpAddr>().ok();
                if ip.is_none() && !names_in_kernel && base.proxy.is_none() {
                    notes.names_only_asked.insert(host.to_ascii_lowercase());
                    continue;
                }
                let flow = Attempt {
                    dst: ip,
                    protocol: IPPROTO_TCP,
                    port: Some(*port),
                    domain: ip.is_none().then(|| host.to_ascii_lowercase()),
                    ..r.flow.clone()
                };
                (flow, !names_in_kernel)
            }
            Kind::Packet => (r.flow.clone(), false),
        };
        let now = evaluate(&already, &flow);
        if r.rule == DNS_BYPASS_RULE || now.rule == DNS_BYPASS_RULE {
            notes.bypass.add(r);
            continue;
        }
        if now.outcome == Outcome::Allowed {
            continue;
        }
        let protocol = match flow.protocol {
            IPPROTO_TCP => L4::Tcp,
            IPPROTO_UDP => L4::Udp,
            IPPROTO_ICMP | IPPROTO_ICMPV6 => L4::Icmp,
            other => {
                notes.unexpressible.entry(other).or_default().add(r);
                continue;
            }
        };
        let port = if protocol == L4::Icmp {
            None
        } else {
            flow.port
        };
        if protocol != L4::Icmp && port.is_none() {
            notes.unexpressible.entry(flow.protocol).or_default().add(r);
            continue;
        }
        let key = ((Subject::of(r), protocol, via_proxy), port);
        if let (Some(name), true) = (&flow.domain, names_in_kernel || via_proxy) {
            connected_names.insert(name.clone());
        }
        items.push((key, flow, r));
    }
    notes
        .names_only_asked
        .retain(|n| !connected_names.contains(n));

    // Across a fleet: how many hosts needed each (purpose, destination).
    let by_name = |flow: &Attempt, via_proxy: bool| {
        flow.domain.clone().filter(|_| names_in_kernel || via_proxy)
    };
    let dest_of = |key: &GroupKey, flow: &Attempt| {
        by_name(flow, key.0 .2).or_else(|| flow.dst.map(|ip| ip.to_string()))
    };
    let mut needed_by: BTreeMap<(&GroupKey, Option<String>), BTreeSet<&str>> = BTreeMap::new();
    for (key, flow, r) in &items {
        if let Some(h) = &r.host {
            needed_by
                .entry((key, dest_of(key, flow)))
                .or_default()
                .insert(h);
        }
    }
    let rare = |key: &GroupKey, flow: &Attempt| match &input.fleet {
        Some(f) => {
            needed_by
                .get(&(key, dest_of(key, flow)))
                .map_or(0, BTreeSet::len)
                < f.min_hosts
        }
        None => false,
    };
    let mut groups: [Groups; 2] = Default::default();
    for (key, flow, r) in &items {
        let (dests, seen) = groups[usize::from(rare(key, flow))]
            .entry(key.clone())
            .or_default();
        seen.add(r);
        match (by_name(flow, key.0 .2), flow.dst) {
            (Some(name), _) => {
                dests.names.insert(name);
            }
            (None, Some(ip)) => {
                if let Some(name) = &flow.domain {
                    seen.resolved_from
                        .entry(ip)
                        .or_default()
                        .insert(name.clone());
                }
                dests.ips.insert(ip);
            }
            (None, None) => {}
        }
    }
    let [common, rare] = groups;
    let mut rules = rules_of(common, false);
    rules.extend(rules_of(rare, true));
    let mut taken: BTreeSet<String> = base.rules.iter().map(|r| r.name.clone()).collect();
    for r in &mut rules {
        r.name = unique_name(&r.name, &taken);
        taken.insert(r.name.clone());
    }
    render(input, base, &rules, &notes)
}

/// Same purpose, same destinations: one rule with all their ports.
fn rules_of(groups: Groups, rare: bool) -> Vec<Suggested> {
    let mut merged: BTreeMap<(Purpose, Vec<String>, Vec<IpNet>), Merged> = BTreeMap::new();
    for ((purpose, port), (dests, seen)) in groups {
        if dests.names.is_empty() && dests.ips.is_empty() {
            continue;
        }
        let (hosts, collapsed) = collapse(&dests.names);
        let cidrs = dests.ips.iter().map(|&ip| IpNet::from(ip)).collect();
        let entry = merged.entry((purpose, hosts, cidrs)).or_default();
        entry.0.extend(port);
        entry.1.extend(collapsed);
        entry.2.merge(&seen);
    }
    let mut rules: Vec<Suggested> = merged
        .into_iter()
        .map(
            |(((subject, protocol, via_proxy), hosts, cidrs), (ports, collapsed, seen))| {
                let ports = ranges(&ports);
                Suggested {
                    name: rule_name(&subject, protocol, &ports),
                    rare,
                    subject,
                    protocol,
                    via_proxy,
                    hosts,
                    cidrs,
                    ports,
                    collapsed,
                    seen,
                }
            },
        )
        .collect();
    rules.sort_by(|a, b| a.name.cmp(&b.name));
    rules
}

/// Names → patterns: `COLLAPSE_AT` or more siblings under one parent (of at
/// least two labels) become `*.parent`, with a note saying so.
fn collapse(names: &BTreeSet<String>) -> (Vec<String>, Vec<String>) {
    let mut by_parent: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
    for n in names {
        if let Some((_, parent)) = n.split_once('.') {
            if parent.contains('.') {
                by_parent.entry(parent).or_default().push(n);
            }
        }
    }
    let mut patterns = Vec::new();
    let mut notes = Vec::new();
    for (parent, siblings) in &by_parent {
        if siblings.len() >= COLLAPSE_AT {
            let shown: Vec<&str> = siblings.iter().take(6).map(|s| s.as_str()).collect();
            let more = siblings.len().saturating_sub(shown.len());
            notes.push(format!(
                "*.{parent}: {} names seen ({}{}); the pattern allows any name under {parent}",
                siblings.len(),
                shown.join(", "),
                if more > 0 {
                    format!(", and {more} more")
                } else {
                    String::new()
                }
            ));
            patterns.push(format!("*.{parent}"));
        }
    }
    let pats: Vec<crate::policy::HostPattern> = patterns
        .iter()
        .filter_map(|p| crate::policy::HostPattern::parse(p).ok())
        .collect();
    patterns.extend(
        names
            .iter()
            .filter(|n| !pats.iter().any(|p| p.matches(n)))
            .cloned(),
    );
    patterns.sort();
    (patterns, notes)
}

fn ranges(ports: &BTreeSet<u16>) -> Vec<(u16, u16)> {
    let mut out: Vec<(u16, u16)> = Vec::new();
    for &p in ports {
        match out.last_mut() {
            Some((_, last)) if last.checked_add(1) == Some(p) => *last = p,
            _ => out.push((p, p)),
        }
    }
    out
}

/// `<who>-<protocol>-<ports>`, in the characters a rule name may use.
fn rule_name(subject: &Subject, protocol: L4, ports: &[(u16, u16)]) -> String {
    let mut name = format!("{}-{}", subject.label(), protocol.name());
    for (i, (first, last)) in ports.iter().enumerate() {
        if i == 3 {
            name.push_str("-more");
            break;
        }
        let _ = write!(name, "-{first}");
        if first != last {
            let _ = write!(name, "-{last}");
        }
    }
    let mut name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_-.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        name.insert(0, 'r');
    }
    name.truncate(60);
    name
}

fn unique_name(name: &str, taken: &BTreeSet<String>) -> String {
    let reserved = |n: &str| taken.contains(n) || crate::policy::RESERVED_RULE_NAMES.contains(&n);
    if !reserved(name) {
        return name.to_string();
    }
    (2..)
        .map(|i| format!("{name}-{i}"))
        .find(|n| !reserved(n))
        .unwrap_or_else(|| name.to_string())
}

fn seen_lines(out: &mut String, seen: &Seen) {
    let _ = writeln!(
        out,
        "# seen {} packet(s) in {} incident(s), first {}, last {}",
        seen.packets, seen.incidents, seen.first, seen.last
    );
    if !seen.executables.is_empty() {
        let all: Vec<&str> = seen.executables.iter().map(|s| s.as_str()).collect();
        let shown = all.iter().take(5).copied().collect::<Vec<_>>().join(", ");
        let more = all.len().saturating_sub(5);
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        let _ = writeln!(out, "# from {}{more}", comment_text(&shown));
    }
}

fn render(input: &Input, base: &Policy, rules: &[Suggested], notes: &Notes) -> String {
    let mut out = String::new();
    let packets: u64 = input.recorded.iter().map(|r| r.count).sum();
    let _ = writeln!(
        out,
        "# Suggested by `egret suggest` from {} incident(s) ({packets} packet(s)) in {}.",
        input.recorded.len(),
        comment_text(input.source)
    );
    let _ = writeln!(
        out,
        "# Review every rule; then `egret simulate` this file and apply it (docs/audit.md).\n"
    );
    out.push_str(&policy_text::settings(base, Mode::Enforce));
    if !base.rules.is_empty() {
        let _ = writeln!(out, "\n# Rules of the audited policy, kept as they were.");
        for r in &base.rules {
            out.push('\n');
            out.push_str(&policy_text::rule(r));
        }
    }
    if rules.iter().any(|r| !r.rare) {
        let _ = writeln!(out, "\n# Rules for what the audit saw.");
    }
    for r in rules.iter().filter(|r| !r.rare) {
        out.push('\n');
        if let Some(f) = &input.fleet {
            out.push_str(&hosts_line(&r.seen, f));
        }
        out.push_str(&rule_text(r));
    }
    if let Some(f) = input
        .fleet
        .as_ref()
        .filter(|_| rules.iter().any(|r| r.rare))
    {
        let _ = writeln!(
            out,
            "\n# Seen on fewer than {} of the {} hosts: not allowed, listed for review (often the\n# interesting ones). Uncomment a rule to allow it on every host of the role.",
            f.min_hosts,
            f.hosts.len()
        );
        for r in rules.iter().filter(|r| r.rare) {
            out.push('\n');
            out.push_str(&hosts_line(&r.seen, f));
            for line in rule_text(r).lines() {
                match line.starts_with('#') {
                    true => out.push_str(line),
                    false => {
                        out.push_str("# ");
                        out.push_str(line);
                    }
                }
                out.push('\n');
            }
        }
    }
    render_notes(&mut out, notes);
    out
}

/// "# seen on 37 of 40 hosts (not on web-03, web-09)"
fn hosts_line(seen: &Seen, fleet: &FleetInput) -> String {
    let n = fleet.hosts.len();
    let k = seen.hosts.len();
    let listed = |hosts: Vec<&String>| {
        let shown: Vec<String> = hosts.iter().take(5).map(|h| comment_text(h)).collect();
        let more = hosts.len().saturating_sub(shown.len());
        match more {
            0 => shown.join(", "),
            more => format!("{}, and {more} more", shown.join(", ")),
        }
    };
    let which = if k * 2 <= n {
        format!(" ({})", listed(seen.hosts.iter().collect()))
    } else if k < n {
        let missing: Vec<&String> = fleet.hosts.difference(&seen.hosts).collect();
        format!(" (not on {})", listed(missing))
    } else {
        String::new()
    };
    format!("# seen on {k} of {n} hosts{which}\n")
}

/// A suggested rule with the comments that say what it was made from.
fn rule_text(r: &Suggested) -> String {
    let mut out = String::new();
    seen_lines(&mut out, &r.seen);
    for under in &r.seen.logged_under {
        let _ = writeln!(
            out,
            "# logged under rule {} (its per-rule mode)",
            comment_text(under)
        );
    }
    for c in &r.collapsed {
        let _ = writeln!(out, "# {}", comment_text(c));
    }
    for (ip, names) in &r.seen.resolved_from {
        let names: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
        let _ = writeln!(
            out,
            "# {ip} was resolved from {}; a hosts rule needs [dns] in the policy",
            comment_text(&names.join(", "))
        );
    }
    let _ = writeln!(out, "[[allow]]\nname = {}", quote(&r.name));
    if !r.cidrs.is_empty() {
        let cidrs: Vec<String> = r.cidrs.iter().map(|c| c.to_string()).collect();
        let _ = writeln!(out, "cidrs = {}", list(&cidrs));
    }
    if !r.hosts.is_empty() {
        let _ = writeln!(out, "hosts = {}", list(&r.hosts));
    }
    if r.via_proxy {
        let _ = writeln!(out, "via = \"proxy\"");
    }
    let _ = writeln!(out, "protocol = {}", quote(r.protocol.name()));
    if !r.ports.is_empty() {
        let ports: Vec<crate::policy::PortRange> = r
            .ports
            .iter()
            .map(|&(first, last)| crate::policy::PortRange { first, last })
            .collect();
        let _ = writeln!(out, "ports = {}", policy_text::ports(&ports));
    }
    if let Some(s) = r.subject.toml() {
        let _ = writeln!(out, "{s}");
    }
    out
}

fn render_notes(out: &mut String, notes: &Notes) {
    if notes.bypass.incidents > 0 {
        let _ = writeln!(
            out,
            "\n# DNS sent around the guard (rule dns-bypass) no rule can allow; point these at the guard:"
        );
        seen_lines(out, &notes.bypass);
    }
    for (proto, seen) in &notes.unexpressible {
        let _ = writeln!(
            out,
            "\n# IP protocol {proto} (or no port) cannot be named in a rule except with protocol = \"any\":"
        );
        seen_lines(out, seen);
    }
    if !notes.names_only_asked.is_empty() {
        let names: Vec<&str> = notes.names_only_asked.iter().map(|s| s.as_str()).collect();
        let _ = writeln!(
            out,
            "\n# Names asked but never connected to (no rule suggested): {}",
            comment_text(&names.join(", "))
        );
    }
}

#[cfg(test)]
mod tests;
