//! The command line: argument parsing and the text users read. Exit codes are
//! part of the contract (see `egret --help` and docs/cli.md).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::apply;
use crate::kernel::nft::Nftables;
use crate::ruleset::{
    render, render_rule, Ruleset, Verdict, OUTPUT_CHAIN, PREFIX_BLOCKED, PREFIX_WOULD_BLOCK,
};

/// Exit codes.
pub const EXIT_OK: u8 = 0;
/// The policy is invalid (check, plan, apply), or nothing was pending (confirm).
pub const EXIT_INVALID: u8 = 1;
/// Kernel or system error: netlink refused, missing privileges, I/O.
pub const EXIT_SYSTEM: u8 = 3;
/// `status`: egret's table is not loaded.
pub const EXIT_NOT_LOADED: u8 = 4;

#[derive(Parser)]
#[command(name = "egret", version, about = "Default-deny egress firewall: every blocked outbound attempt becomes an intrusion signal", after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

const EXIT_CODES: &str = "Exit codes: 0 success; 1 invalid policy (or nothing to confirm); 2 usage error; 3 kernel or system error; 4 egret's table is not loaded (status).\nEvery command acts on the network namespace it runs in.";

#[derive(Subcommand)]
pub enum Command {
    /// Validate a policy file; errors are printed as file:line:col.
    Check { policy: PathBuf },
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
    Remove,
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
    let code = match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("egret: error: {e:#}");
            EXIT_SYSTEM
        }
    };
    ExitCode::from(code)
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

fn run(command: Command) -> Result<u8> {
    match command {
        Command::Check { policy } => {
            let Some(p) = load_or_report(&policy) else {
                return Ok(EXIT_INVALID);
            };
            println!(
                "{}: ok ({} rule(s), mode {})",
                policy.display(),
                p.rules.len(),
                p.mode
            );
            Ok(EXIT_OK)
        }
        Command::Plan { policy } => {
            let Some(p) = load_or_report(&policy) else {
                return Ok(EXIT_INVALID);
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
            Ok(EXIT_OK)
        }
        Command::Apply {
            policy,
            confirm,
            state_dir,
        } => {
            let Some(p) = load_or_report(&policy) else {
                return Ok(EXIT_INVALID);
            };
            let rs = apply::compile_live(&p)?;
            apply::apply(&rs, confirm.map(Duration::from_secs), &state_dir)?;
            let rules = p.rules.len();
            match confirm {
                Some(s) => println!("applied {} ({rules} rule(s), mode {}); run `egret confirm` within {s} s or it is rolled back", policy.display(), p.mode),
                None => println!("applied {} ({rules} rule(s), mode {})", policy.display(), p.mode),
            }
            Ok(EXIT_OK)
        }
        Command::Confirm { state_dir } => {
            if apply::confirm(&state_dir)? {
                println!("confirmed: the applied ruleset stays");
                Ok(EXIT_OK)
            } else {
                eprintln!("egret: nothing to confirm (no pending `apply --confirm`, or it was already rolled back)");
                Ok(EXIT_INVALID)
            }
        }
        Command::Status {
            json,
            rules,
            state_dir,
        } => status(json, rules, &state_dir),
        Command::Remove => {
            Nftables::open()
                .context("opening nf_tables netlink")?
                .remove()
                .context("deleting egret's table")?;
            println!("removed egret's table: egress is no longer filtered by egret");
            Ok(EXIT_OK)
        }
        Command::RollbackWatch { state_dir, token } => {
            apply::watch_and_roll_back(&state_dir, token)?;
            Ok(EXIT_OK)
        }
    }
}

#[derive(Serialize)]
struct RuleStatus {
    rule: String,
    action: &'static str,
    packets: u64,
    bytes: u64,
}

#[derive(Serialize)]
struct Status {
    loaded: bool,
    mode: Option<String>,
    log_group: Option<u16>,
    rules: Vec<RuleStatus>,
    /// Packets logged as blocked (enforce) or would-be-blocked (audit).
    blocked_packets: u64,
    pending_confirm_seconds: Option<u64>,
}

fn comment_field(comment: &str, key: &str) -> Option<String> {
    comment
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=').map(str::to_string))
}

fn status_of(live: &Option<Ruleset>, state_dir: &Path) -> Status {
    let pending_confirm_seconds = apply::read_pending(state_dir).map(|p| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        p.deadline_unix.saturating_sub(now)
    });
    let Some(rs) = live else {
        return Status {
            loaded: false,
            mode: None,
            log_group: None,
            rules: vec![],
            blocked_packets: 0,
            pending_confirm_seconds,
        };
    };
    let mut rules = Vec::new();
    let mut blocked = 0;
    for rule in rs
        .chains
        .iter()
        .filter(|c| c.name == OUTPUT_CHAIN)
        .flat_map(|c| &c.rules)
    {
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
        let action = match (&rule.log, rule.verdict) {
            (Some(l), _) if l.prefix.starts_with(PREFIX_WOULD_BLOCK) => "would-block",
            (Some(_), _) => "block",
            (None, Some(Verdict::Accept)) => "allow",
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
        mode: comment_field(&rs.comment, "mode"),
        log_group: comment_field(&rs.comment, "log_group").and_then(|g| g.parse().ok()),
        rules,
        blocked_packets: blocked,
        pending_confirm_seconds,
    }
}

fn status(json: bool, show_rules: bool, state_dir: &Path) -> Result<u8> {
    let live = Nftables::open()
        .context("opening nf_tables netlink")?
        .read()
        .context("reading the live table")?;
    let s = status_of(&live, state_dir);
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
                r.packets, r.bytes, r.action, r.rule
            );
        }
        println!("blocked: {} packet(s)", s.blocked_packets);
        if let (Some(rs), true) = (&live, show_rules) {
            for r in rs.chains.iter().flat_map(|c| &c.rules) {
                println!("  {}", render_rule(r, true));
            }
        }
    }
    Ok(if s.loaded { EXIT_OK } else { EXIT_NOT_LOADED })
}
