//! Read-side commands over the event store: `egret events`, `egret top`, and
//! the monitor section of `egret status`.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use serde_json::Value;

use serde::Serialize;

use crate::monitor::books::DaemonBooks;
use crate::monitor::event::ecs::Envelope;
use crate::monitor::store::{EventFilter, Store, TopBy};
use crate::pidfile::running_pid;
use crate::ruleset::{Rule, Ruleset, Verdict, PREFIX_BLOCKED, PREFIX_WOULD_BLOCK};
use crate::text::printable;

fn open(state_dir: &Path) -> Result<Option<Store>> {
    let store = Store::open_read_only(state_dir)?;
    if store.is_none() {
        eprintln!(
            "egret: no events stored in {} (has `egret run` run with this --state-dir?)",
            state_dir.display()
        );
    }
    Ok(store)
}

fn since_time(since: Duration) -> SystemTime {
    SystemTime::now().checked_sub(since).unwrap_or(UNIX_EPOCH)
}

fn clip(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_string();
    }
    let mut out: String = s.chars().take(width.saturating_sub(1)).collect();
    out.push('…');
    out
}

pub fn events(state_dir: &Path, filter: &EventFilter, as_json: bool, follow: bool) -> Result<u8> {
    let Some(store) = open(state_dir)? else {
        return Ok(crate::exit::OK);
    };
    let mut rows = store.events(filter)?;
    if follow {
        // Like `tail -f`: oldest first, the live ones continue below.
        rows.reverse();
        for r in &rows {
            match serde_json::from_str::<Value>(&r.doc) {
                Ok(doc) => print_event_line(&doc, as_json),
                Err(_) => println!("{}", r.doc),
            }
        }
        return Ok(crate::exit::OK);
    }
    if as_json {
        for r in &rows {
            println!("{}", r.doc);
        }
        return Ok(crate::exit::OK);
    }
    println!(
        "{:<20} {:<12} {:>7}  {:<44} {:<28} rule",
        "last seen (UTC)", "action", "count", "who", "destination"
    );
    for r in &rows {
        let at = UNIX_EPOCH + Duration::from_millis(r.last_seen_ms.max(0) as u64);
        println!(
            "{:<20} {:<12} {:>7}  {:<44} {:<28} {}",
            table_time(at),
            printable(&r.action),
            r.count,
            clip(&printable(&r.who), 44),
            clip(&printable(&r.destination), 28),
            printable(&r.rule)
        );
    }
    if rows.is_empty() {
        println!("(no events in this window: nothing was blocked)");
    }
    Ok(crate::exit::OK)
}

/// `egret events --destination`: an address, a network, or a host name
/// (`*.example.com` for any name under it).
#[derive(Debug, Clone)]
pub enum DestinationFilter {
    Net(ipnet::IpNet),
    Name(crate::policy::HostPattern),
}

impl DestinationFilter {
    pub fn parse(s: &str) -> std::result::Result<DestinationFilter, String> {
        if let Ok(ip) = s.parse::<std::net::IpAddr>() {
            return Ok(DestinationFilter::Net(ip.into()));
        }
        if let Ok(net) = s.parse::<ipnet::IpNet>() {
            return Ok(DestinationFilter::Net(net));
        }
        crate::policy::HostPattern::parse(s).map(DestinationFilter::Name)
    }

    pub fn matches(&self, doc: &Value) -> bool {
        let (ip, names) = crate::monitor::event::ecs::destination_of(doc);
        match self {
            DestinationFilter::Net(net) => ip.is_some_and(|ip| net.contains(&ip)),
            DestinationFilter::Name(p) => names
                .iter()
                .any(|n| p.matches(n.trim_end_matches('.').to_ascii_lowercase().as_str())),
        }
    }
}

/// `egret events --from`: what the selected hosts reported, newest first,
/// each incident once (its latest update).
pub struct CollectedQuery<'a> {
    pub hosts: Option<&'a crate::audit::recorded::HostGlobs>,
    pub since: Option<SystemTime>,
    pub limit: usize,
    pub action: Option<&'a str>,
    pub rule: Option<&'a str>,
    pub text: Option<&'a str>,
    pub destination: Option<&'a DestinationFilter>,
}

pub fn events_from(path: &Path, q: &CollectedQuery, as_json: bool) -> Result<u8> {
    let c = crate::monitor::event::collected::read_path(path)?;
    eprintln!("egret: {}: {}", path.display(), c.counts.summary());
    let text = q.text.map(str::to_lowercase);
    let mut rows: Vec<(Option<SystemTime>, Envelope, &Value)> = c
        .docs
        .iter()
        .filter_map(|doc| {
            let e = Envelope::of(doc);
            let host = crate::monitor::event::ecs::host_name(doc).unwrap_or_default();
            let at = crate::monitor::event::ecs::last_seen_of(doc)
                .and_then(|t| humantime::parse_rfc3339_weak(t).ok());
            let keep = q.hosts.map_or(true, |h| h.matches(host))
                && q.since.map_or(true, |s| at.is_some_and(|at| at >= s))
                && q.action.map_or(true, |a| e.action_name() == a)
                && q.rule.map_or(true, |r| e.rule == r)
                && text
                    .as_deref()
                    .map_or(true, |t| e.message.to_lowercase().contains(t))
                && q.destination.map_or(true, |d| d.matches(doc));
            keep.then_some((at, e, doc))
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.0));
    rows.truncate(q.limit);
    if as_json {
        for (_, _, doc) in &rows {
            println!("{doc}");
        }
        return Ok(crate::exit::OK);
    }
    println!(
        "{:<20} {:<20} {:<12} {:>7}  message [rule]",
        "last seen (UTC)", "host", "action", "count"
    );
    for (at, e, _) in &rows {
        println!(
            "{:<20} {:<20} {:<12} {:>7}  {}  [{}]",
            at.map(table_time).unwrap_or_default(),
            clip(&printable(e.host.as_deref().unwrap_or("?")), 20),
            e.action_name(),
            e.count.unwrap_or(1),
            printable(&e.message),
            printable(&e.rule)
        );
    }
    if rows.is_empty() {
        println!("(no events match)");
    }
    Ok(crate::exit::OK)
}

fn table_time(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at)
        .to_string()
        .trim_end_matches('Z')
        .replace('T', " ")
}

/// One event as `egret events --follow` prints it: the document, or a line
/// with its time, action, count and message.
pub fn print_event_line(doc: &Value, as_json: bool) {
    if as_json {
        println!("{doc}");
        return;
    }
    // The document is the daemon's, but its strings are the attacker's
    // (executable names, command lines, host names).
    let e = Envelope::of(doc);
    let at = [e.last_seen.as_deref(), e.timestamp.as_deref()]
        .into_iter()
        .find_map(|t| humantime::parse_rfc3339_weak(&printable(t.unwrap_or(""))).ok())
        .map(table_time)
        .unwrap_or_default();
    println!(
        "{:<20} {:<12} {:>7}  {}  [{}]",
        at,
        e.action_name(),
        e.count.unwrap_or(1),
        printable(&e.message),
        printable(&e.rule)
    );
}

/// The actions `egret top` lists apart, after the blocked tables, when the
/// window has any: what the allow rules let through for the first time.
const FIRST_SEEN_ACTIONS: &[crate::monitor::event::Action] = &[
    crate::monitor::event::Action::AllowedNew,
    crate::monitor::event::Action::NameNew,
    crate::monitor::event::Action::ProxyNew,
];

/// `egret top`: the blocked traffic by process and by destination, then
/// (when there are any) the first-seen allowed flows by process; with
/// `action`, that action's incidents only.
pub fn top(state_dir: &Path, since: Duration, limit: usize, action: Option<&str>) -> Result<u8> {
    let Some(store) = open(state_dir)? else {
        return Ok(crate::exit::OK);
    };
    let since = since_time(since);
    for (title, by) in [
        ("by process", TopBy::Process),
        ("by destination", TopBy::Destination),
    ] {
        let rows = store.top(by, since, limit, action)?;
        match action {
            Some(a) => println!("{} {title}:", printable(a)),
            None => println!("{title}:"),
        }
        println!("{:>10} {:>10}", "packets", "incidents");
        for (label, packets, incidents) in &rows {
            println!("{packets:>10} {incidents:>10}  {}", printable(label));
        }
        if rows.is_empty() {
            match action {
                Some(_) => println!("{:>10} {:>10}  (none)", 0, 0),
                None => println!("{:>10} {:>10}  (nothing blocked)", 0, 0),
            }
        }
        println!();
    }
    if action.is_some() {
        return Ok(crate::exit::OK);
    }
    for a in FIRST_SEEN_ACTIONS {
        let rows = store.top(TopBy::Process, since, limit, Some(a.as_str()))?;
        if rows.is_empty() {
            continue;
        }
        // One incident per new (identity, destination, port, protocol), or
        // per new (identity, name).
        println!("first seen, allowed ({}), by process:", a.as_str());
        let what = match a {
            crate::monitor::event::Action::AllowedNew => "new flows",
            _ => "new names",
        };
        println!("{what:>10}");
        for (label, _, incidents) in &rows {
            println!("{incidents:>10}  {}", printable(label));
        }
        println!("(egret top --action {} for their destinations)", a.as_str());
        println!();
    }
    Ok(crate::exit::OK)
}

#[derive(Serialize)]
pub struct RuleStatus {
    pub rule: String,
    pub action: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Serialize)]
pub struct Status {
    pub loaded: bool,
    pub mode: Option<String>,
    pub log_group: Option<u16>,
    pub rules: Vec<RuleStatus>,
    /// Packets logged as blocked (enforce) or would-be-blocked (audit).
    pub blocked_packets: u64,
    pub pending_confirm_seconds: Option<u64>,
    /// The daemon's books: what the kernel logged versus what egret received.
    pub monitor: Option<MonitorStatus>,
}

fn comment_field(comment: &str, key: &str) -> Option<String> {
    comment
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=').map(str::to_string))
}

pub fn status_of(live: &Option<Ruleset>, state_dir: &Path) -> Status {
    let live = live
        .as_ref()
        .map(|rs| (rs.comment.as_str(), rs.counted_rules().into_iter()));
    status_from(live, state_dir)
}

/// Status from the table's comment and its counted rules (the API
/// reads only these, not the sets, so a poll stays cheap with big sets).
pub fn status_from<'a>(
    live: Option<(&str, impl Iterator<Item = &'a Rule>)>,
    state_dir: &Path,
) -> Status {
    let pending_confirm_seconds = crate::apply::read_pending(state_dir).map(|p| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        p.deadline_unix.saturating_sub(now)
    });
    let Some((comment, output_rules)) = live else {
        return Status {
            loaded: false,
            mode: None,
            log_group: None,
            rules: vec![],
            blocked_packets: 0,
            pending_confirm_seconds,
            monitor: monitor_status(state_dir),
        };
    };
    let mut rules = Vec::new();
    let mut blocked = 0;
    for rule in output_rules {
        let Some(counter) = rule.counter else {
            continue;
        };
        let logged = rule
            .log
            .as_ref()
            .map(|l| {
                l.prefix.starts_with(PREFIX_BLOCKED) || l.prefix.starts_with(PREFIX_WOULD_BLOCK)
            })
            .unwrap_or(false);
        if logged {
            blocked += counter.packets;
        }
        let action = match (&rule.log, &rule.verdict) {
            (Some(l), _) if l.prefix.starts_with(PREFIX_WOULD_BLOCK) => "would-block",
            (Some(_), _) => "block",
            // A jump from the output chain is to an allow rule's novelty chain.
            (None, Some(Verdict::Accept | Verdict::Jump(_))) => "allow",
            (None, _) => "block",
        };
        rules.push(RuleStatus {
            rule: rule.comment.clone().unwrap_or_default(),
            action,
            packets: counter.packets,
            bytes: counter.bytes,
        });
    }
    Status {
        loaded: true,
        mode: comment_field(comment, "mode"),
        log_group: comment_field(comment, "log_group").and_then(|g| g.parse().ok()),
        rules,
        blocked_packets: blocked,
        pending_confirm_seconds,
        monitor: monitor_status(state_dir),
    }
}

/// `status`'s `monitor`: the daemon's last books and whether it still runs.
#[derive(Serialize)]
pub struct MonitorStatus {
    pub running: bool,
    /// Everything that should have been an event and was not (`loss.lost()`
    /// as last stored).
    pub lost: u64,
    #[serde(flatten)]
    pub books: DaemonBooks,
}

/// The daemon's latest books, if a store exists.
pub fn monitor_status(state_dir: &Path) -> Option<MonitorStatus> {
    let store = Store::open_read_only(state_dir).ok()??;
    let books = store.books().ok()??;
    let lost = store.loss().ok().flatten().map(|f| f.lost()).unwrap_or(0);
    Some(MonitorStatus {
        running: running_pid(state_dir).is_some(),
        lost,
        books,
    })
}

pub fn print_monitor(m: &MonitorStatus) {
    let (b, l) = (&m.books, &m.books.loss);
    println!(
        "monitor: {} (books updated {})",
        if m.running {
            "egret run is running"
        } else {
            "egret run is NOT running: blocked packets are not being reported"
        },
        printable(&b.updated_at)
    );
    println!(
        "  kernel logged {}, received {}, lost {} (sequence gaps {}, unaccounted {}, while down {}; buffer overruns {})",
        l.kernel_logged, l.received, m.lost, l.seq_lost, l.unaccounted, l.while_down, l.enobufs,
    );
    if l.dns_dropped + l.proxy_dropped > 0 {
        println!(
            "  reports dropped on a full pipeline (counted in lost): {} refused DNS queries, {} proxy denials",
            l.dns_dropped, l.proxy_dropped,
        );
    }
    if let Some(g) = &b.dns_guard {
        println!(
            "  dns guard: {} queries, {} from cache, {} forwarded, {} refused; upstream failures {}, kernel set failures {}",
            g.queries, g.cache_hits, g.forwarded, g.refused, g.upstream_failures, g.set_failures,
        );
        let r = &g.revalidation;
        if r.started + r.limited > 0 {
            println!(
                "  revalidation: {} revalidated, {} stale, {} over the cap, {} failed; {} upstream lookups",
                r.revalidated, r.stale, r.limited, r.failed, r.lookups,
            );
        }
        if g.via_stub.total() > 0 {
            println!(
                "  asked through a local resolver (the program behind it unknown; see egret doctor): {}",
                crate::monitor::books::LocalResolver::ALL
                    .iter()
                    .filter(|r| g.via_stub.get(**r) > 0)
                    .map(|r| format!("{} {}", r.name(), g.via_stub.get(*r)))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
        }
    }
    if let Some(p) = &b.proxy {
        println!(
            "  proxy: {} connections ({} open), {} requests, {} tunnels, {} denied; upstream failures {}, over limits {}",
            p.connections, p.open, p.requests, p.tunnels, p.denied, p.upstream_failures, p.over_limit,
        );
    }
}
