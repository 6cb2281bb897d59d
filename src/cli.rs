//! The command line: argument parsing, one function per command, and the
//! text users read. Exit codes (`crate::exit`) are part of the contract (see
//! `egret --help` and README.md).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::apply;
use crate::exit;
use crate::kernel::nft::Nftables;
use crate::ruleset::{render, render_rule};

#[derive(Parser)]
#[command(name = "egret", version, about = "Default-deny egress firewall: every blocked outbound attempt becomes an intrusion signal", after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

const EXIT_CODES: &str = "Exit codes: 0 success; 1 invalid policy (or nothing to confirm); 2 usage error; 3 kernel or system error; 4 egret's table is not loaded (status) or no `egret run` is running (reload); 5 a flow would not be allowed (simulate, explain).\nEvery command acts on the network namespace it runs in.";

#[derive(Subcommand)]
pub enum Command {
    /// Validate a policy file; errors are printed as file:line:col.
    Check {
        policy: PathBuf,
        /// Also warn about shadowed rules, rules that allow everything, too broad
        /// host patterns and (with the live table's counters) unused rules.
        #[arg(long)]
        lint: bool,
    },
    /// Print the exact nftables ruleset a policy compiles to, and how it differs from what is live.
    Plan { policy: PathBuf },
    /// Load a policy atomically, replacing egret's table.
    Apply {
        policy: PathBuf,
        /// Roll back to the previous ruleset unless `egret confirm` runs within SECONDS.
        #[arg(long, value_name = "SECONDS")]
        confirm: Option<u64>,
        #[arg(long, default_value = apply::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Keep the ruleset of a pending `apply --confirm`.
    Confirm {
        #[arg(long, default_value = apply::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Show whether egret's table is loaded, its mode, and per-rule counters.
    Status {
        #[arg(long)]
        json: bool,
        /// Also print every live rule in nft syntax with its counters.
        #[arg(long)]
        rules: bool,
        #[arg(long, default_value = apply::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Delete egret's table: all egress is allowed again (the emergency exit).
    Remove {
        /// Refused while an `egret run` uses this state dir (stop it first).
        #[arg(long, default_value = apply::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Apply the policy, then report every blocked outbound attempt (egret's main job).
    ///
    /// Events go to stdout as ECS JSON lines and to the store in the state dir;
    /// diagnostics go to stderr. SIGHUP (or `egret reload`) re-reads the policy.
    /// On exit the ruleset stays loaded (fail closed); `egret remove` deletes it.
    Run {
        /// Policy file. Without it: audit mode, nothing allowed beyond the baseline.
        #[arg(long)]
        policy: Option<PathBuf>,
        #[arg(long, default_value = apply::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Repeats of an incident are reported at most this often.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        update_every: Duration,
        /// Events older than this are deleted from the store.
        #[arg(long, default_value = "30d", value_parser = parse_duration)]
        retention: Duration,
        /// At most this many events are kept in the store.
        #[arg(long, default_value_t = 1_000_000)]
        max_events: u64,
        /// At most this many (identity, destination) pairs are remembered for
        /// severity; the least recently seen are forgotten first.
        #[arg(long, default_value_t = crate::monitor::store::DEFAULT_MAX_SEEN)]
        max_seen: u64,
        /// NFLOG socket receive buffer in bytes (tuning; default 32 MiB).
        #[arg(long, hide = true)]
        nflog_rcvbuf: Option<usize>,
        /// Packets the kernel batches per NFLOG message burst (tuning; default 32).
        #[arg(long, hide = true)]
        nflog_qthresh: Option<u32>,
        /// Diagnostics level on stderr: error, warn, info, debug.
        #[arg(long, default_value = "info")]
        log_level: tracing::Level,
    },
    /// Make a running `egret run` re-read its policy (same as SIGHUP).
    Reload {
        #[arg(long, default_value = apply::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// List stored events (incidents), newest first.
    Events {
        /// Only events seen within this long, e.g. 15m, 1h, 7d [default: 24h; with --from: all].
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
        /// One ECS JSON document per line instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Only this action: blocked, would-block, dns-refused, proxy-denied, allowed-new, name-new, proxy-new, tamper, ...
        #[arg(long)]
        action: Option<String>,
        /// Only events of this rule (`default` for the final block rule).
        #[arg(long)]
        rule: Option<String>,
        /// Only events whose process/user or destination contains TEXT (any case).
        #[arg(long, value_name = "TEXT")]
        grep: Option<String>,
        /// Read events collected from any hosts instead of the store: JSON
        /// lines of egret's documents, bare or as a collector wrote them
        /// (Elasticsearch hits, `journalctl -o json`, rsyslog JSON); `-` is
        /// standard input. Other lines are skipped and counted.
        #[arg(long, value_name = "FILE")]
        from: Option<PathBuf>,
        /// With --from: only these hosts (host.name), shell patterns, comma-separated: 'web-*,api-?'.
        #[arg(long, value_name = "GLOBS", requires = "from", value_parser = parse_hosts)]
        hosts: Option<crate::audit::recorded::HostGlobs>,
        /// With --from: only events to this address, network or host name ('*.example.com').
        #[arg(long, value_name = "DEST", requires = "from", value_parser = parse_destination)]
        destination: Option<crate::report::DestinationFilter>,
        /// After the stored events, print new ones as they happen, from the
        /// running daemon's live feed (needs an [api] section in its policy).
        #[arg(long, short = 'f')]
        follow: bool,
        /// Where the daemon's API listens (its policy's `[api] listen`).
        #[arg(long, default_value = crate::policy::DEFAULT_API_LISTEN, value_name = "ADDR")]
        api: std::net::SocketAddr,
        #[arg(long, default_value = apply::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Summarise stored events by process and by destination.
    Top {
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        since: Duration,
        #[arg(long, default_value_t = 10)]
        limit: usize,
        /// Only this action's incidents (e.g. allowed-new: who opened new
        /// allowed flows, and to where) instead of the blocked traffic.
        #[arg(long)]
        action: Option<String>,
        #[arg(long, default_value = apply::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Write a policy from what audit mode recorded, to review and then enforce.
    ///
    /// One rule per identity (service, else user) and purpose (protocol, port),
    /// host names where the DNS guard resolved them. Stable output: same
    /// incidents, same text.
    Suggest {
        /// Only incidents seen within this long [default: 30d; with --from: all].
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
        #[arg(long, default_value = apply::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// The policy the audit ran under: its settings ([dns], [proxy], ...) and rules are kept.
        #[arg(long)]
        policy: Option<PathBuf>,
        /// One policy for many hosts, from their collected events (see `events --from`):
        /// each rule says how many of the hosts needed it.
        #[arg(long, value_name = "FILE")]
        from: Option<PathBuf>,
        /// With --from: the role's hosts (host.name), shell patterns, comma-separated: 'web-*'.
        #[arg(long, value_name = "GLOBS", requires = "from", value_parser = parse_hosts)]
        hosts: Option<crate::audit::recorded::HostGlobs>,
        /// With --from: what fewer hosts needed is listed apart, commented out, for
        /// review: a number of hosts, or a share of them (then at least 2).
        #[arg(long, value_name = "N|P%", default_value = "10%", requires = "from", value_parser = crate::audit::suggest::MinHosts::parse)]
        min_hosts: crate::audit::suggest::MinHosts,
    },
    /// Replay the recorded flows against a candidate policy: what it would allow
    /// and block. Exit 5 when anything would not be allowed.
    Simulate {
        policy: PathBuf,
        /// Only incidents seen within this long [default: 30d; with --from: all].
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
        #[arg(long, default_value = apply::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[arg(long)]
        json: bool,
        /// Replay every host's collected events (see `events --from`), reported per host.
        #[arg(long, value_name = "FILE")]
        from: Option<PathBuf>,
        /// With --from: only these hosts (host.name), shell patterns, comma-separated.
        #[arg(long, value_name = "GLOBS", requires = "from", value_parser = parse_hosts)]
        hosts: Option<crate::audit::recorded::HostGlobs>,
    },
    /// Say which rule allows or blocks a flow, and why. Exit 5 when it is not allowed.
    Explain {
        /// 192.0.2.7:443, [2001:db8::1]:53, deb.debian.org:443, ...
        dest: String,
        /// tcp, udp or icmp.
        #[arg(long, default_value = "tcp")]
        protocol: String,
        /// The sending user (name or uid).
        #[arg(long)]
        user: Option<String>,
        /// The sending systemd unit (or cgroup path).
        #[arg(long)]
        unit: Option<String>,
        #[arg(long, default_value = "/etc/egret/policy.toml")]
        policy: PathBuf,
        #[arg(long)]
        json: bool,
        /// Where `egret run` keeps its store (who the flow is known for).
        #[arg(long, default_value = apply::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Check what egret needs from this host, and say how to fix each problem.
    /// Exit 3 when something keeps egret from working.
    Doctor {
        /// Also check what this policy needs (its NFLOG group, the resolver for [dns]).
        #[arg(long)]
        policy: Option<PathBuf>,
        #[arg(long, default_value = apply::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[arg(long)]
        json: bool,
        /// The resolver configuration to check (tests).
        #[arg(long, default_value = "/etc/resolv.conf", hide = true)]
        resolv_conf: PathBuf,
        /// The name-service switch to check (tests).
        #[arg(long, default_value = "/etc/nsswitch.conf", hide = true)]
        nsswitch_conf: PathBuf,
    },
    /// Print a shell completion script: bash, zsh, fish (e.g. `egret completions bash > /etc/bash_completion.d/egret`).
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (egret.1 and one per command, egret-run.1, ...) into a directory.
    Man { dir: PathBuf },
    /// Internal: waits for a confirmation and rolls back without one.
    #[command(hide = true)]
    RollbackWatch {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        token: u64,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        // Like other Unix tools, stop quietly when the reader goes away
        // (`egret events | head`). `egret run` keeps SIGPIPE ignored: a closed
        // stdout must not stop the monitor (its events still reach the store).
        // SAFETY: restoring a signal's default disposition at startup.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let code = match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("egret: error: {e:#}");
            exit::SYSTEM
        }
    };
    ExitCode::from(code)
}

/// egret.1, and egret-<command>.1 for each visible command.
fn write_man_pages(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cmd = <Cli as clap::CommandFactory>::command();
    let mut pages = vec![("egret".to_string(), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("egret-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name)));
    }
    for (name, page) in pages {
        let mut buf = Vec::new();
        clap_mangen::Man::new(page).render(&mut buf)?;
        let path = dir.join(format!("{name}.1"));
        std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}

fn parse_hosts(s: &str) -> std::result::Result<crate::audit::recorded::HostGlobs, String> {
    crate::audit::recorded::HostGlobs::parse(s)
}

fn parse_destination(s: &str) -> std::result::Result<crate::report::DestinationFilter, String> {
    crate::report::DestinationFilter::parse(s)
}

const EVENTS_SINCE: Duration = Duration::from_secs(24 * 3600);
const AUDIT_SINCE: Duration = Duration::from_secs(30 * 24 * 3600);

fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 30s, 15m, 1h, 7d)"))
}

fn load_or_report(path: &Path) -> Option<crate::policy::Policy> {
    match apply::load_policy(path) {
        Ok(p) => Some(p),
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("egret: {} error(s); nothing was applied", errors.0.len());
            None
        }
    }
}

/// For commands that load a policy into the kernel: refuses a policy others
/// could have written (see `apply::unsafe_policy_files`).
fn load_strict(path: &Path) -> Option<crate::policy::Policy> {
    match apply::load_policy_strict(path) {
        Ok(p) => Some(p),
        Err(crate::policy::LoadError::Unsafe(unsafe_files)) => {
            for f in &unsafe_files {
                eprintln!("egret: refusing an unsafe policy file: {f}");
            }
            eprintln!(
                "egret: someone other than root could change what egret allows; nothing was applied"
            );
            None
        }
        Err(crate::policy::LoadError::Invalid(errors)) => {
            eprintln!("{errors}");
            eprintln!("egret: {} error(s); nothing was applied", errors.0.len());
            None
        }
    }
}

/// One function per command (below, in the order of `Command`).
fn dispatch(command: Command) -> Result<u8> {
    match command {
        Command::Check { policy, lint } => check(&policy, lint),
        Command::Plan { policy } => plan(&policy),
        Command::Apply {
            policy,
            confirm,
            state_dir,
        } => apply(&policy, confirm, &state_dir),
        Command::Confirm { state_dir } => confirm(&state_dir),
        Command::Status {
            json,
            rules,
            state_dir,
        } => status(json, rules, &state_dir),
        Command::Remove { state_dir } => remove(&state_dir),
        Command::Run {
            policy,
            state_dir,
            update_every,
            retention,
            max_events,
            max_seen,
            nflog_rcvbuf,
            nflog_qthresh,
            log_level,
        } => {
            let opts = crate::run::RunOptions {
                policy_path: policy,
                state_dir,
                nflog_rcvbuf,
                nflog_qthresh,
                update_every,
                retention: crate::monitor::store::Retention {
                    max_age: retention,
                    max_rows: max_events,
                    max_seen,
                },
            };
            run(opts, log_level)
        }
        Command::Reload { state_dir } => reload(&state_dir),
        Command::Events {
            since,
            json,
            limit,
            action,
            rule,
            grep,
            from,
            hosts,
            destination,
            follow,
            api,
            state_dir,
        } => {
            let ago = |d: Duration| {
                std::time::SystemTime::now()
                    .checked_sub(d)
                    .unwrap_or(std::time::UNIX_EPOCH)
            };
            if let Some(from) = from {
                if follow {
                    eprintln!("egret: --follow reads a running daemon's feed, not --from");
                    return Ok(exit::USAGE);
                }
                let q = crate::report::CollectedQuery {
                    hosts: hosts.as_ref(),
                    since: since.map(ago),
                    limit,
                    action: action.as_deref(),
                    rule: rule.as_deref(),
                    text: grep.as_deref(),
                    destination: destination.as_ref(),
                };
                return crate::report::events_from(&from, &q, json);
            }
            let filter = crate::monitor::store::EventFilter {
                since: ago(since.unwrap_or(EVENTS_SINCE)),
                limit,
                action,
                rule,
                text: grep,
            };
            events(&filter, json, follow.then_some(api), &state_dir)
        }
        Command::Top {
            since,
            limit,
            action,
            state_dir,
        } => crate::report::top(&state_dir, since, limit, action.as_deref()),
        Command::Suggest {
            since,
            state_dir,
            policy,
            from,
            hosts,
            min_hosts,
        } => {
            let from = from
                .as_deref()
                .map(|path| crate::audit::commands::Collected {
                    path,
                    hosts: hosts.as_ref(),
                    since,
                });
            suggest(since, &state_dir, policy.as_deref(), from, min_hosts)
        }
        Command::Simulate {
            policy,
            since,
            state_dir,
            json,
            from,
            hosts,
        } => {
            let from = from
                .as_deref()
                .map(|path| crate::audit::commands::Collected {
                    path,
                    hosts: hosts.as_ref(),
                    since,
                });
            simulate(&policy, since, &state_dir, json, from)
        }
        Command::Explain {
            dest,
            protocol,
            user,
            unit,
            policy,
            json,
            state_dir,
        } => explain(
            &policy,
            &crate::audit::commands::ExplainArgs {
                dest: &dest,
                protocol: &protocol,
                user: user.as_deref(),
                unit: unit.as_deref(),
                json,
                state_dir: &state_dir,
            },
        ),
        Command::Doctor {
            policy,
            state_dir,
            json,
            resolv_conf,
            nsswitch_conf,
        } => doctor(
            policy.as_deref(),
            &state_dir,
            json,
            resolv_conf,
            nsswitch_conf,
        ),
        Command::Completions { shell } => completions(shell),
        Command::Man { dir } => {
            write_man_pages(&dir)?;
            Ok(exit::OK)
        }
        Command::RollbackWatch { state_dir, token } => {
            apply::watch_and_roll_back(&state_dir, token)?;
            Ok(exit::OK)
        }
    }
}

fn check(policy: &Path, lint: bool) -> Result<u8> {
    let Some(p) = load_or_report(policy) else {
        return Ok(exit::INVALID);
    };
    for f in apply::unsafe_policy_files(policy) {
        eprintln!("egret: warning: `run`, `apply` and `reload` refuse this policy: {f}");
    }
    println!(
        "{}: ok ({} rule(s), mode {})",
        policy.display(),
        p.rules.len(),
        p.mode
    );
    if lint {
        return Ok(crate::audit::commands::lint(&p));
    }
    Ok(exit::OK)
}

fn plan(policy: &Path) -> Result<u8> {
    let Some(p) = load_or_report(policy) else {
        return Ok(exit::INVALID);
    };
    let desired = apply::compile_live(&p)?;
    let text = render(&desired);
    print!("{text}");
    let live = Nftables::open()
        .context("opening nf_tables netlink")?
        .read()
        .context("reading the live table")?;
    match live {
        None => println!("\n# egret's table is not loaded: applying creates it."),
        Some(live) => {
            let before = render(&live);
            if before == text {
                println!("\n# no change: this is what is live.");
            } else {
                println!("\n# difference from what is live (- live, + this policy):");
                let diff = similar::TextDiff::from_lines(&before, &text);
                print!(
                    "{}",
                    diff.unified_diff().context_radius(2).header("live", "plan")
                );
            }
        }
    }
    Ok(exit::OK)
}

fn apply(policy: &Path, confirm: Option<u64>, state_dir: &Path) -> Result<u8> {
    let Some(p) = load_strict(policy) else {
        return Ok(exit::INVALID);
    };
    if let Some(pid) = apply::daemon_here(state_dir) {
        eprintln!("egret: `egret run` (pid {pid}) is running with {} and owns egret's table; nothing was applied. Edit the policy it runs with and use `egret reload --state-dir {}` instead (a policy loaded behind its back would be reported as tampering)", state_dir.display(), state_dir.display());
        return Ok(exit::INVALID);
    }
    crate::kernel::features::require(&p, &crate::kernel::features::running_release())
        .map_err(anyhow::Error::msg)?;
    let (rs, preexisting) = apply::compile_live_seeded(&p)?;
    apply::apply(&rs, confirm.map(Duration::from_secs), state_dir)?;
    for c in &preexisting {
        eprintln!("egret: warning: {c}");
    }
    let rules = p.rules.len();
    match confirm {
        Some(s) => println!("applied {} ({rules} rule(s), mode {}); run `egret confirm` within {s} s or it is rolled back", policy.display(), p.mode),
        None => println!("applied {} ({rules} rule(s), mode {})", policy.display(), p.mode),
    }
    Ok(exit::OK)
}

fn confirm(state_dir: &Path) -> Result<u8> {
    if apply::confirm(state_dir)? {
        println!("confirmed: the applied ruleset stays");
        Ok(exit::OK)
    } else {
        eprintln!("egret: nothing to confirm (no pending `apply --confirm`, or it was already rolled back)");
        Ok(exit::INVALID)
    }
}

fn remove(state_dir: &Path) -> Result<u8> {
    if let Some(pid) = apply::daemon_here(state_dir) {
        eprintln!("egret: `egret run` (pid {pid}) is running with {} and would report the removal as tampering (and, with restore_table, load its table again); stop it first (systemctl stop egret, or kill -TERM {pid}), then remove", state_dir.display());
        return Ok(exit::INVALID);
    }
    Nftables::open()
        .context("opening nf_tables netlink")?
        .remove()
        .context("deleting egret's table")?;
    println!("removed egret's table: egress is no longer filtered by egret");
    Ok(exit::OK)
}

fn run(opts: crate::run::RunOptions, log_level: tracing::Level) -> Result<u8> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(log_level)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let p = match &opts.policy_path {
        Some(path) => match load_strict(path) {
            Some(p) => p,
            None => return Ok(exit::INVALID),
        },
        None => crate::policy::Policy::audit_default(),
    };
    crate::run::run(opts, p)?;
    Ok(exit::OK)
}

fn reload(state_dir: &Path) -> Result<u8> {
    let Some(pid) = crate::pidfile::running_pid(state_dir) else {
        eprintln!(
            "egret: no `egret run` is running for {}",
            state_dir.display()
        );
        return Ok(exit::NOT_LOADED);
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGHUP)
        .with_context(|| format!("signalling egret run (pid {pid})"))?;
    println!("asked egret run (pid {pid}) to reload its policy; its log says how it went");
    Ok(exit::OK)
}

/// With `follow`: the stored events, then the live feed of the API at that address.
fn events(
    filter: &crate::monitor::store::EventFilter,
    json: bool,
    follow: Option<std::net::SocketAddr>,
    state_dir: &Path,
) -> Result<u8> {
    if let Some(api) = follow {
        let stored = || crate::report::events(state_dir, filter, json, true);
        return crate::api::follow::follow(api, filter, stored, json);
    }
    crate::report::events(state_dir, filter, json, false)
}

fn suggest(
    since: Option<Duration>,
    state_dir: &Path,
    policy: Option<&Path>,
    from: Option<crate::audit::commands::Collected>,
    min_hosts: crate::audit::suggest::MinHosts,
) -> Result<u8> {
    let base = match policy {
        Some(path) => match load_or_report(path) {
            Some(p) => Some(p),
            None => return Ok(exit::INVALID),
        },
        None => None,
    };
    match from {
        Some(from) => crate::audit::commands::suggest_fleet(&from, base.as_ref(), min_hosts),
        None => {
            crate::audit::commands::suggest(state_dir, since.unwrap_or(AUDIT_SINCE), base.as_ref())
        }
    }
}

fn simulate(
    policy: &Path,
    since: Option<Duration>,
    state_dir: &Path,
    json: bool,
    from: Option<crate::audit::commands::Collected>,
) -> Result<u8> {
    let Some(p) = load_or_report(policy) else {
        return Ok(exit::INVALID);
    };
    match from {
        Some(from) => crate::audit::commands::simulate_fleet(&p, &from, json),
        None => crate::audit::commands::simulate(&p, state_dir, since.unwrap_or(AUDIT_SINCE), json),
    }
}

fn explain(policy: &Path, args: &crate::audit::commands::ExplainArgs<'_>) -> Result<u8> {
    let Some(p) = load_or_report(policy) else {
        return Ok(exit::INVALID);
    };
    crate::audit::commands::explain(&p, args)
}

fn doctor(
    policy: Option<&Path>,
    state_dir: &Path,
    json: bool,
    resolv_conf: PathBuf,
    nsswitch_conf: PathBuf,
) -> Result<u8> {
    let loaded = match policy {
        Some(path) => match load_or_report(path) {
            Some(p) => Some(p),
            None => return Ok(exit::SYSTEM),
        },
        None => None,
    };
    let checks = crate::doctor::run(&crate::doctor::Inputs {
        policy: loaded.as_ref(),
        state_dir,
        resolv_conf,
        nsswitch_conf,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            let mark = match c.status {
                crate::doctor::Status::Ok => "ok  ",
                crate::doctor::Status::Warn => "WARN",
                crate::doctor::Status::Fail => "FAIL",
            };
            println!(
                "{mark}  {:<11} {}",
                c.name,
                crate::text::printable(&c.detail)
            );
            if !c.fix.is_empty() {
                println!("      {:<11} fix: {}", "", crate::text::printable(&c.fix));
            }
        }
    }
    let failed = checks
        .iter()
        .any(|c| c.status == crate::doctor::Status::Fail);
    Ok(if failed { exit::SYSTEM } else { exit::OK })
}

fn completions(shell: clap_complete::Shell) -> Result<u8> {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut cmd, "egret", &mut std::io::stdout());
    Ok(exit::OK)
}

fn status(json: bool, show_rules: bool, state_dir: &Path) -> Result<u8> {
    let live = Nftables::open()
        .context("opening nf_tables netlink")?
        .read()
        .context("reading the live table")?;
    let s = crate::report::status_of(&live, state_dir);
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else if !s.loaded {
        println!("egret: not loaded (no `inet egret` table in this network namespace)");
    } else {
        println!(
            "egret: loaded, mode {}, log group {}",
            s.mode.as_deref().unwrap_or("?"),
            s.log_group.map(|g| g.to_string()).unwrap_or("?".into())
        );
        if let Some(secs) = s.pending_confirm_seconds {
            println!("pending: rolls back in {secs} s unless `egret confirm` runs");
        }
        if let Some(r) = apply::last_rollback(state_dir) {
            println!(
                "last rollback: at unix time {} ({})",
                r.at_unix,
                if r.restored_previous {
                    "previous ruleset restored"
                } else {
                    "table removed"
                }
            );
        }
        println!("{:>12} {:>14}  {:<12} rule", "packets", "bytes", "action");
        for r in &s.rules {
            println!(
                "{:>12} {:>14}  {:<12} {}",
                r.packets,
                r.bytes,
                r.action,
                crate::text::printable(&r.rule)
            );
        }
        println!("blocked: {} packet(s)", s.blocked_packets);
        if let Some(m) = &s.monitor {
            crate::report::print_monitor(m);
        }
        if let (Some(rs), true) = (&live, show_rules) {
            for r in rs.chains.iter().flat_map(|c| &c.rules) {
                println!("  {}", render_rule(r, true));
            }
        }
    }
    Ok(if s.loaded { exit::OK } else { exit::NOT_LOADED })
}
