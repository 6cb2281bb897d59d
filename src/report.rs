//! Read-side commands over the event store: `egret events`, `egret top`, and
//! the monitor section of `egret status`.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use serde_json::{json, Value};

use crate::monitor::daemon::running_pid;
use crate::monitor::store::{Store, TopBy};

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

pub fn events(state_dir: &Path, since: Duration, as_json: bool, limit: usize) -> Result<u8> {
    let Some(store) = open(state_dir)? else {
        return Ok(crate::cli::EXIT_OK);
    };
    let rows = store.events(since_time(since), limit)?;
    if as_json {
        for r in &rows {
            println!("{}", r.doc);
        }
        return Ok(crate::cli::EXIT_OK);
    }
    println!(
        "{:<20} {:<12} {:>7}  {:<44} {:<28} rule",
        "last seen (UTC)", "action", "count", "who", "destination"
    );
    for r in &rows {
        let at = UNIX_EPOCH + Duration::from_millis(r.last_seen_ms.max(0) as u64);
        let at = humantime::format_rfc3339_seconds(at).to_string();
        println!(
            "{:<20} {:<12} {:>7}  {:<44} {:<28} {}",
            at.trim_end_matches('Z').replace('T', " "),
            r.action,
            r.count,
            clip(&r.who, 44),
            clip(&r.destination, 28),
            r.rule
        );
    }
    if rows.is_empty() {
        println!("(no events in this window: nothing was blocked)");
    }
    Ok(crate::cli::EXIT_OK)
}

pub fn top(state_dir: &Path, since: Duration, limit: usize) -> Result<u8> {
    let Some(store) = open(state_dir)? else {
        return Ok(crate::cli::EXIT_OK);
    };
    for (title, by) in [
        ("by process", TopBy::Process),
        ("by destination", TopBy::Destination),
    ] {
        let rows = store.top(by, since_time(since), limit)?;
        println!("{title}:");
        println!("{:>10} {:>10}", "packets", "incidents");
        for (label, packets, incidents) in &rows {
            println!("{packets:>10} {incidents:>10}  {label}");
        }
        if rows.is_empty() {
            println!("{:>10} {:>10}  (nothing blocked)", 0, 0);
        }
        println!();
    }
    Ok(crate::cli::EXIT_OK)
}

/// The daemon's latest books, if a store exists.
pub fn monitor_status(state_dir: &Path) -> Option<Value> {
    let store = Store::open_read_only(state_dir).ok()??;
    let books: Value = serde_json::from_str(&store.counter("books").ok()??).ok()?;
    let lost = store.loss().ok().flatten().map(|f| f.lost()).unwrap_or(0);
    let mut m = json!({
        "running": running_pid(state_dir).is_some(),
        "lost": lost,
    });
    if let (Some(obj), Some(books)) = (m.as_object_mut(), books.as_object()) {
        for (k, v) in books {
            obj.insert(k.clone(), v.clone());
        }
    }
    Some(m)
}

pub fn print_monitor(m: &Value) {
    let n = |p: &str| m.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    println!(
        "monitor: {} (books updated {})",
        if m["running"].as_bool() == Some(true) {
            "egret run is running"
        } else {
            "egret run is NOT running: blocked packets are not being reported"
        },
        m["updated_at"].as_str().unwrap_or("?")
    );
    println!(
        "  kernel logged {}, received {}, lost {} (sequence gaps {}, unaccounted {}, while down {}; buffer overruns {})",
        n("/loss/kernel_logged"),
        n("/loss/received"),
        n("/lost"),
        n("/loss/seq_lost"),
        n("/loss/unaccounted"),
        n("/loss/while_down"),
        n("/loss/enobufs"),
    );
    if m.pointer("/dns_guard").is_some_and(|g| !g.is_null()) {
        println!(
            "  dns guard: {} queries, {} from cache, {} forwarded, {} refused; upstream failures {}, kernel set failures {}",
            n("/dns_guard/queries"),
            n("/dns_guard/cache_hits"),
            n("/dns_guard/forwarded"),
            n("/dns_guard/refused"),
            n("/dns_guard/upstream_failures"),
            n("/dns_guard/set_failures"),
        );
    }
    if m.pointer("/proxy").is_some_and(|g| !g.is_null()) {
        println!(
            "  proxy: {} connections ({} open), {} requests, {} tunnels, {} denied; upstream failures {}, over limits {}",
            n("/proxy/connections"),
            n("/proxy/open"),
            n("/proxy/requests"),
            n("/proxy/tunnels"),
            n("/proxy/denied"),
            n("/proxy/upstream_failures"),
            n("/proxy/over_limit"),
        );
    }
}
