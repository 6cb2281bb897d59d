//! The audit commands at the edge: read the store, the policy, the kernel
//! and the resolver, then hand the facts to the pure modules and print.

use std::collections::BTreeMap;
use std::net::{IpAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use super::evaluate::{Attempt, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};
use super::explain::{self, Target};
use super::{lint, recorded, simulate, suggest};
use crate::exit;
use crate::policy::{Accounts, Policy, SystemAccounts};

fn window(state_dir: &Path, since: Duration) -> String {
    format!(
        "{}, last {}",
        state_dir.display(),
        humantime::format_duration(since)
    )
}

/// Events collected from many hosts (`--from`): the file, which hosts, how recent.
pub struct Collected<'a> {
    /// `-`: standard input.
    pub path: &'a Path,
    pub hosts: Option<&'a recorded::HostGlobs>,
    /// Only events last seen within this long (default: all).
    pub since: Option<Duration>,
}

impl Collected<'_> {
    /// The selected hosts' incidents, with the reader's counts on stderr.
    fn load(&self) -> Result<recorded::Fleet> {
        let c = crate::monitor::event::collected::read_path(self.path)?;
        eprintln!("egret: {}: {}", self.path.display(), c.counts.summary());
        let since = self.since.map(|d| {
            std::time::SystemTime::now()
                .checked_sub(d)
                .unwrap_or(std::time::UNIX_EPOCH)
        });
        let fleet = recorded::from_collected(&c.docs, self.hosts, since, &SystemAccounts);
        if fleet.hosts.is_empty() {
            eprintln!(
                "egret: no egret events from {} in {}",
                self.selection(),
                self.path.display()
            );
        }
        Ok(fleet)
    }

    fn selection(&self) -> String {
        match self.hosts {
            Some(h) => format!("hosts matching {}", h.text()),
            None => "any host".into(),
        }
    }

    fn describe(&self, hosts: usize) -> String {
        let window = self.since.map_or(String::new(), |d| {
            format!(", last {}", humantime::format_duration(d))
        });
        format!(
            "{}: {hosts} host(s){}{window}",
            self.path.display(),
            self.hosts
                .map_or(String::new(), |h| format!(" matching {}", h.text()))
        )
    }
}

/// `egret suggest --from`: one policy for the selected hosts.
pub fn suggest_fleet(
    from: &Collected,
    base: Option<&Policy>,
    min_hosts: suggest::MinHosts,
) -> Result<u8> {
    let fleet = from.load()?;
    let source = from.describe(fleet.hosts.len());
    print!(
        "{}",
        suggest::suggest(&suggest::Input {
            recorded: &fleet.recorded,
            base,
            source: &source,
            fleet: Some(suggest::FleetInput {
                hosts: &fleet.hosts,
                min_hosts: min_hosts.of(fleet.hosts.len()),
            }),
        })
    );
    Ok(exit::OK)
}

/// Per host: what the candidate would not allow of what the host recorded.
#[derive(serde::Serialize)]
struct HostReport {
    host: String,
    #[serde(flatten)]
    report: simulate::Report,
}

/// `egret simulate --from`: every selected host's flows against the candidate.
pub fn simulate_fleet(policy: &Policy, from: &Collected, json: bool) -> Result<u8> {
    let fleet = from.load()?;
    let mut by_host: BTreeMap<&str, Vec<recorded::Recorded>> = fleet
        .hosts
        .iter()
        .map(|h| (h.as_str(), Vec::new()))
        .collect();
    for r in &fleet.recorded {
        if let Some(list) = r.host.as_deref().and_then(|h| by_host.get_mut(h)) {
            list.push(r.clone());
        }
    }
    let reports: Vec<HostReport> = by_host
        .iter()
        .map(|(host, flows)| HostReport {
            host: host.to_string(),
            report: simulate::simulate(policy, flows),
        })
        .collect();
    let not_allowed: Vec<&HostReport> = reports
        .iter()
        .filter(|r| r.report.anything_not_allowed())
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        println!(
            "{} incident(s) from {}; {} host(s) with flows this policy would not allow",
            fleet.recorded.len(),
            crate::text::printable(&from.describe(fleet.hosts.len())),
            not_allowed.len()
        );
        for r in &reports {
            let t = &r.report.totals;
            println!(
                "\nhost {}: allowed {} incident(s), would-block {}, blocked {}, not simulated (proxy) {}",
                crate::text::printable(&r.host),
                t.allowed.incidents,
                t.would_block.incidents,
                t.blocked.incidents,
                t.not_simulated.incidents
            );
            if r.report.anything_not_allowed() {
                let not_allowed = simulate::Report {
                    groups: r
                        .report
                        .groups
                        .iter()
                        .filter(|g| g.outcome != super::evaluate::Outcome::Allowed)
                        .cloned()
                        .collect(),
                    totals: r.report.totals.clone(),
                };
                for line in simulate::render(&not_allowed).lines() {
                    if !line.starts_with("totals:") {
                        println!("  {line}");
                    }
                }
            }
        }
    }
    Ok(if not_allowed.is_empty() {
        exit::OK
    } else {
        exit::NOT_ALLOWED
    })
}

pub fn suggest(state_dir: &Path, since: Duration, base: Option<&Policy>) -> Result<u8> {
    let flows = recorded::load(state_dir, since)?;
    if flows.is_empty() {
        eprintln!(
            "egret: no incidents recorded in {} within {} (has `egret run` run in audit mode with this --state-dir?)",
            state_dir.display(),
            humantime::format_duration(since)
        );
    }
    let mut source = window(state_dir, since);
    let recorded_base = match base {
        Some(_) => None,
        None => recorded_settings(state_dir),
    };
    if let Some((_, at)) = &recorded_base {
        source.push_str(&format!("; settings as `egret run` recorded them at {at}"));
    }
    print!(
        "{}",
        suggest::suggest(&suggest::Input {
            recorded: &flows,
            base: base.or(recorded_base.as_ref().map(|(p, _)| p)),
            source: &source,
            fleet: None,
        })
    );
    Ok(exit::OK)
}

/// The settings (`[dns]`, `[proxy]`...) the last audit ran with, as the
/// daemon recorded them in the store: without `--policy`, suggestions still
/// use host names when the audit had the DNS guard.
fn recorded_settings(state_dir: &Path) -> Option<(Policy, String)> {
    let store = crate::monitor::store::Store::open_read_only(state_dir)
        .ok()
        .flatten()?;
    let recorded = match store.run_settings() {
        Ok(r) => r?,
        Err(e) => {
            eprintln!("egret: reading the recorded settings: {e:#}");
            return None;
        }
    };
    match crate::policy::parse_str(
        &recorded.settings,
        Path::new("(settings recorded by egret run)"),
        &SystemAccounts,
    ) {
        Ok(p) => Some((p, recorded.at)),
        Err(errors) => {
            for d in &errors.0 {
                eprintln!("egret: the recorded settings are not used: {d}");
            }
            None
        }
    }
}

pub fn simulate(policy: &Policy, state_dir: &Path, since: Duration, json: bool) -> Result<u8> {
    let flows = recorded::load(state_dir, since)?;
    let report = simulate::simulate(policy, &flows);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} incident(s) from {}",
            flows.len(),
            window(state_dir, since)
        );
        print!("{}", simulate::render(&report));
    }
    Ok(if report.anything_not_allowed() {
        exit::NOT_ALLOWED
    } else {
        exit::OK
    })
}

pub struct ExplainArgs<'a> {
    pub dest: &'a str,
    pub protocol: &'a str,
    pub user: Option<&'a str>,
    pub unit: Option<&'a str>,
    pub json: bool,
    /// Where `egret run` keeps its store: who the flow is known for.
    pub state_dir: &'a Path,
}

/// Identities shown per destination by `explain`.
const FIRST_SEEN_SHOWN: usize = 20;

/// (destination, identity, first seen) the novelty memory holds for these
/// destinations; empty when the store cannot be read (no privileges, no run yet).
fn first_seen_by(
    state_dir: &Path,
    dests: &[IpAddr],
    port: u16,
    protocol: u8,
) -> Vec<(IpAddr, String, String)> {
    let Ok(Some(store)) = crate::monitor::store::Store::open_read_only(state_dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for d in dests {
        for (who, ms) in store
            .first_seen_by(&d.to_string(), port, protocol, FIRST_SEEN_SHOWN)
            .unwrap_or_default()
        {
            let at = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
            out.push((*d, who, crate::monitor::event::timestamp(at)));
        }
    }
    out
}

/// (identity, where, first seen) for the identities the novelty memory for
/// names knows asked `name` (`monitor::names`): where is "the DNS guard" or
/// "the proxy (port N)".
fn name_asked_by(state_dir: &Path, name: &str) -> Vec<(String, String, String)> {
    let Ok(Some(store)) = crate::monitor::store::Store::open_read_only(state_dir) else {
        return Vec::new();
    };
    let wire = name.trim_end_matches('.').to_ascii_lowercase();
    store
        .name_seen_by(&wire, FIRST_SEEN_SHOWN)
        .unwrap_or_default()
        .into_iter()
        .map(|(who, protocol, port, ms)| {
            let at = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
            let via = if protocol == crate::monitor::names::DNS_PROTOCOL {
                "the DNS guard".to_string()
            } else {
                format!("the proxy (port {port})")
            };
            (who, via, crate::monitor::event::timestamp(at))
        })
        .collect()
}

/// What `name` maps to now. With `[dns]`, the guard is asked, and only for
/// a name it answers: a refused name would be reported as an incident. Its
/// answer puts the addresses in the kernel sets, as any client's would.
fn resolve_now(policy: &Policy, name: &str) -> explain::Resolved {
    let mut addresses: Vec<IpAddr> = match crate::dns::guard::GuardConfig::from_policy(policy) {
        Some(guard) if guard.allows(name) => {
            let asked = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(crate::dns::upstream::lookup(&[guard.dns.listen], 0, name)));
            match asked {
                Ok(Ok(found)) => found.into_iter().map(|(ip, _)| ip).collect(),
                _ => Vec::new(),
            }
        }
        Some(_) => Vec::new(),
        None => (name, 0)
            .to_socket_addrs()
            .map(|it| it.map(|s| s.ip()).collect())
            .unwrap_or_default(),
    };
    addresses.sort();
    addresses.dedup();
    let by = if policy.dns.is_some() {
        "dns-guard"
    } else {
        "resolver"
    };
    explain::Resolved { addresses, by }
}

pub fn explain(policy: &Policy, a: &ExplainArgs) -> Result<u8> {
    let (target, port) = match explain::parse_target(a.dest) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("egret: {}: {e}", a.dest);
            return Ok(exit::USAGE);
        }
    };
    let uid = match a.user {
        None => None,
        Some(u) => match u.parse::<u32>().ok().or_else(|| SystemAccounts.uid(u)) {
            Some(uid) => Some(uid),
            None => {
                eprintln!("egret: unknown user {u:?}");
                return Ok(exit::USAGE);
            }
        },
    };
    let v6 = matches!(target, Target::Ip(IpAddr::V6(_)));
    let protocol = match a.protocol {
        "tcp" => IPPROTO_TCP,
        "udp" => IPPROTO_UDP,
        "icmp" if v6 => IPPROTO_ICMPV6,
        "icmp" => IPPROTO_ICMP,
        other => {
            eprintln!("egret: protocol {other:?}: tcp, udp or icmp");
            return Ok(exit::USAGE);
        }
    };
    let base = Attempt {
        protocol,
        port: port.filter(|_| matches!(protocol, IPPROTO_TCP | IPPROTO_UDP)),
        uid,
        unit: a.unit.map(str::to_string),
        ..Attempt::default()
    };
    let resolved = match &target {
        Target::Name(n) => resolve_now(policy, n),
        Target::Ip(_) => explain::Resolved::default(),
    };
    // Live kernel facts are a bonus: without privileges the policy still answers.
    let live = explain::live_host_sets().ok();
    let e = explain::explain(policy, &target, &base, &resolved, live.as_deref());
    let dests = match &target {
        Target::Ip(ip) => vec![*ip],
        Target::Name(_) => resolved.addresses.clone(),
    };
    let known = first_seen_by(a.state_dir, &dests, base.port.unwrap_or(0), protocol);
    let asked = match &target {
        Target::Name(n) => name_asked_by(a.state_dir, n),
        Target::Ip(_) => Vec::new(),
    };
    if a.json {
        let mut v = serde_json::to_value(&e)?;
        v["first_seen"] = known
            .iter()
            .map(|(d, who, at)| serde_json::json!({"destination": d, "identity": who, "first_seen": at}))
            .collect();
        v["name_first_asked"] = asked
            .iter()
            .map(|(who, via, at)| serde_json::json!({"identity": who, "of": via, "first_seen": at}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let mut text = explain::render(&e);
        if known.is_empty() {
            text.push_str("first seen: no identity's allowed flow to it is known (egret run's novelty memory)\n");
        }
        for (d, who, at) in &known {
            text.push_str(&format!("first seen: {who} → {d}, {at}\n"));
        }
        for (who, via, at) in &asked {
            text.push_str(&format!("name first asked: {who} of {via}, {at}\n"));
        }
        print!("{}", crate::text::printable_lines(&text));
    }
    Ok(if e.allowed() {
        exit::OK
    } else {
        exit::NOT_ALLOWED
    })
}

/// Prints lint warnings after `check`; the exit status stays `check`'s.
pub fn lint(policy: &Policy) -> u8 {
    let live = crate::kernel::nft::Nftables::open()
        .and_then(|mut n| n.read())
        .ok()
        .flatten();
    let hits: Option<BTreeMap<String, u64>> = live.as_ref().map(lint::hits);
    let warnings = lint::lint(policy, hits.as_ref());
    for w in &warnings {
        println!("warning: rule {}: {} ({})", w.rule, w.message, w.kind);
    }
    if hits.is_none() {
        println!("note: unused rules not checked: egret's table could not be read here (not loaded, or no CAP_NET_ADMIN)");
    }
    println!("lint: {} warning(s)", warnings.len());
    exit::OK
}
