//! Orchestration at the CLI edge: load a policy, gather the facts the compiler
//! needs from the running system, compile, and load — with an optional
//! commit-confirm that rolls back unless `egret confirm` comes in time.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::audit::evaluate::{evaluate, Attempt, Decision, Outcome};
use crate::kernel::nft::Nftables;
use crate::kernel::sockets::{self, OpenSocket};
use crate::policy::{self, Policy, PolicyErrors, SystemAccounts};
use crate::ruleset::{compile, CompileInput, Element, Ruleset};

pub const DEFAULT_STATE_DIR: &str = "/var/lib/egret";
const PENDING_FILE: &str = "pending-confirm.json";
const ROLLBACK_LOG: &str = "last-rollback.json";

pub fn load_policy(path: &Path) -> std::result::Result<Policy, PolicyErrors> {
    policy::load(path, &SystemAccounts)
}

/// Policy files and directories someone other than root or the invoking user
/// could change (like sshd's StrictModes). `run`, `apply` and `reload` refuse
/// to load such a policy; `check` warns.
pub fn unsafe_policy_files(path: &Path) -> Vec<policy::UnsafeFile> {
    policy::unsafe_files(path, nix::unistd::geteuid().as_raw())
}

/// Loads a policy only if no one but root or the invoking user could have
/// changed it (every file read from the descriptor that was checked).
pub fn load_policy_strict(path: &Path) -> std::result::Result<Policy, policy::LoadError> {
    policy::load_strict(path, nix::unistd::geteuid().as_raw(), &SystemAccounts)
}

/// Compiles `policy` against the system as it is now (unit cgroups, open connections).
pub fn compile_live(policy: &Policy) -> Result<Ruleset> {
    compile_with_units(policy, resolve_units(policy), Seeds::Kernel)
}

/// [`compile_live`], with the seeded connections the policy would not allow.
pub fn compile_live_seeded(policy: &Policy) -> Result<(Ruleset, Vec<Preexisting>)> {
    compile_seeded(policy, resolve_units(policy), Seeds::Kernel)
}

/// Where a compile learns which connections may stay seeded.
#[derive(Debug, Clone, Copy)]
pub enum Seeds<'a> {
    /// From the kernel: without an egret table this is the first load, which
    /// seeds the TCP connections open now; with one, the live seeds still open.
    Kernel,
    /// The sockets egret itself seeded last (`egret run` remembers them, see
    /// [`seeded_sockets`]), those still open; never anything new. A table
    /// missing at that moment was deleted by someone (a tamper restore): no
    /// first load, and whatever opened while it was gone, on a seeded tuple
    /// or not, is a new flow for the policy to decide.
    Kept(&'a std::collections::BTreeSet<SeededSocket>),
}

/// A seeded connection as `egret run` remembers it: its set element and the
/// socket's cookie, so a new socket on a closed seed's tuple is not it.
pub type SeededSocket = (Element, u64);

/// The open sockets `rs` seeds, right after it was loaded.
pub fn seeded_sockets(rs: &Ruleset) -> Result<std::collections::BTreeSet<SeededSocket>> {
    let seeds = seeds_of(rs);
    if seeds.is_empty() {
        return Ok(Default::default());
    }
    Ok(sockets::open_tcp()
        .context("listing open connections (sock_diag)")?
        .into_iter()
        .map(|s| (crate::ruleset::preexisting_element(&s.flow), s.cookie))
        .filter(|(e, _)| seeds.contains(e))
        .collect())
}

/// The elements of a ruleset's `preexisting_v4/v6` sets: what it seeds.
pub fn seeds_of(rs: &Ruleset) -> std::collections::BTreeSet<Element> {
    [
        crate::ruleset::PREEXISTING_V4,
        crate::ruleset::PREEXISTING_V6,
    ]
    .iter()
    .filter_map(|name| rs.set(name))
    .flat_map(|s| s.elements.iter().cloned())
    .collect()
}

/// The cgroups of every unit the policy names, as they are now.
pub fn resolve_units(policy: &Policy) -> crate::ruleset::UnitCgroups {
    crate::cgroup::resolve_units(policy.rules.iter().flat_map(|r| &r.units))
}

pub fn compile_with_units(
    policy: &Policy,
    units: crate::ruleset::UnitCgroups,
    seeds: Seeds<'_>,
) -> Result<Ruleset> {
    Ok(compile_seeded(policy, units, seeds)?.0)
}

/// A TCP connection let through once because it predates egret, which the
/// policy itself would not allow: the operator must see it (it may be a
/// command-and-control channel that was open before egret came).
#[derive(Debug, Clone)]
pub struct Preexisting {
    pub socket: OpenSocket,
    pub decision: Decision,
}

impl std::fmt::Display for Preexisting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a TCP connection that predates egret's table, {} → {} (uid {}), was let through; the policy would not allow it (rule {}: {})",
            self.socket.flow.local,
            self.socket.flow.remote,
            self.socket.uid,
            self.decision.rule,
            self.decision.outcome.as_str()
        )?;
        if self.socket.listener {
            write!(
                f,
                "; a socket listens on local port {}, but any user may listen on an unprivileged port, so it is not taken for a reply to an inbound connection",
                self.socket.flow.local.port()
            )?;
        }
        Ok(())
    }
}

/// Compiles like [`compile_with_units`]; also returns the seeded connections
/// the policy would not allow.
///
/// Seeding exists for one case: a TCP session conntrack has not seen stalls
/// when the first ruleset with `ct state established` lands. Once egret's
/// table is loaded (it always has that rule), conntrack tracks every new
/// flow, so a reload, a restart of `egret run` or another `apply` adds
/// nothing: it keeps only what the first load seeded and is still open. A
/// socket that merely exists (a connected UDP socket has sent nothing) never
/// gains anything from it, nor does one of egret's own (its mark: the mark
/// rules say where those may go).
pub fn compile_seeded(
    policy: &Policy,
    units: crate::ruleset::UnitCgroups,
    seeds: Seeds<'_>,
) -> Result<(Ruleset, Vec<Preexisting>)> {
    let mut open = sockets::open_tcp().context("listing open connections (sock_diag)")?;
    open.retain(|s| s.mark != Some(policy.mark));
    let first_load = match seeds {
        Seeds::Kept(seeded) => {
            open.retain(|s| {
                seeded.contains(&(crate::ruleset::preexisting_element(&s.flow), s.cookie))
            });
            false
        }
        Seeds::Kernel => {
            let mut nft = Nftables::open().context("opening nf_tables netlink")?;
            let loaded = nft
                .table_comment()
                .context("reading egret's table")?
                .is_some();
            if loaded {
                // Only what the first load seeded and is still open: an idle
                // connection may not have sent the packet that lets conntrack
                // confirm it yet. Nothing new is ever added.
                let mut seeded = std::collections::BTreeSet::new();
                for name in [
                    crate::ruleset::PREEXISTING_V4,
                    crate::ruleset::PREEXISTING_V6,
                ] {
                    seeded.extend(
                        nft.set_elements(name)
                            .with_context(|| format!("reading set {name}"))?,
                    );
                }
                open.retain(|s| seeded.contains(&crate::ruleset::preexisting_element(&s.flow)));
            }
            !loaded
        }
    };
    let open_flows = open.iter().map(|s| s.flow).collect();
    let rs = compile(policy, &CompileInput { units, open_flows });
    let unallowed = open
        .into_iter()
        // Reported when first seeded, not at every reload.
        .filter(|s| !s.inbound && first_load)
        .filter_map(|socket| {
            let gid = nix::unistd::User::from_uid(socket.uid.into())
                .ok()
                .flatten()
                .map(|u| u.gid.as_raw());
            let flow = Attempt {
                dst: Some(socket.flow.remote.ip()),
                protocol: socket.flow.protocol,
                port: Some(socket.flow.remote.port()),
                uid: Some(socket.uid),
                gid,
                ..Attempt::default()
            };
            let decision = evaluate(policy, &flow);
            (decision.outcome != Outcome::Allowed).then_some(Preexisting { socket, decision })
        })
        .collect();
    Ok((rs, unallowed))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Pending {
    pub deadline_unix: u64,
    pub token: u64,
    /// What to restore: the table that was live before, or none.
    pub previous: Option<Ruleset>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RollbackRecord {
    pub at_unix: u64,
    pub restored_previous: bool,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn pending_path(state_dir: &Path) -> PathBuf {
    state_dir.join(PENDING_FILE)
}

pub fn read_pending(state_dir: &Path) -> Option<Pending> {
    let text = std::fs::read_to_string(pending_path(state_dir)).ok()?;
    serde_json::from_str(&text).ok()
}

/// The ruleset files hold the previous policy: root's alone, whatever the umask.
fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    crate::monitor::store::write_file(path, data, 0o600)
}

/// The pid of an `egret run` using `state_dir` in this network namespace
/// (the one whose table `apply` and `remove` would change behind its back).
pub fn daemon_here(state_dir: &Path) -> Option<i32> {
    let pid = crate::pidfile::running_pid(state_dir)?;
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).ok();
    match (ns(&pid.to_string()), ns("self")) {
        (Some(theirs), Some(ours)) if theirs != ours => None,
        _ => Some(pid),
    }
}

/// Loads `rs`. With `confirm`, first records what was live and starts a
/// detached watcher that restores it after the timeout unless confirmed.
pub fn apply(rs: &Ruleset, confirm: Option<Duration>, state_dir: &Path) -> Result<()> {
    let mut nft = Nftables::open().context("opening nf_tables netlink")?;
    let Some(timeout) = confirm else {
        nft.apply(rs).context("loading the ruleset")?;
        return Ok(());
    };
    if let Some(p) = read_pending(state_dir) {
        bail!(
            "an apply is already waiting for confirmation (rollback in {} s); run `egret confirm` or wait for the rollback",
            p.deadline_unix.saturating_sub(now_unix())
        );
    }
    let previous = nft
        .read()
        .context("reading the live ruleset to roll back to")?;
    crate::monitor::store::prepare_state_dir(state_dir, None)?;
    let token = u64::from(std::process::id()) << 32 | (now_unix() & 0xffff_ffff);
    let pending = Pending {
        deadline_unix: now_unix() + timeout.as_secs().max(1),
        token,
        previous,
    };
    write_atomic(&pending_path(state_dir), &serde_json::to_vec(&pending)?)?;
    if let Err(e) = spawn_watcher(state_dir, token) {
        let _ = std::fs::remove_file(pending_path(state_dir));
        return Err(e.context("starting the rollback watcher; nothing was applied"));
    }
    if let Err(e) = nft.apply(rs) {
        let _ = std::fs::remove_file(pending_path(state_dir));
        return Err(anyhow::Error::new(e).context("loading the ruleset"));
    }
    Ok(())
}

/// The watcher runs in its own session, so closing the terminal (or losing
/// the SSH connection) that ran `apply` does not stop the rollback.
fn spawn_watcher(state_dir: &Path, token: u64) -> Result<()> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let exe = std::env::current_exe().context("finding egret's own executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("rollback-watch")
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--token")
        .arg(token.to_string());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            Ok(())
        });
    }
    cmd.spawn().context("spawning `egret rollback-watch`")?;
    Ok(())
}

/// Body of the hidden `rollback-watch` command.
pub fn watch_and_roll_back(state_dir: &Path, token: u64) -> Result<()> {
    loop {
        let Some(pending) = read_pending(state_dir) else {
            return Ok(());
        };
        if pending.token != token {
            return Ok(());
        }
        let now = now_unix();
        if now >= pending.deadline_unix {
            // Claim the pending file first: if `egret confirm` removed it a moment
            // ago, the rename fails and nothing is rolled back.
            let claimed = pending_path(state_dir).with_extension("rolling-back");
            if std::fs::rename(pending_path(state_dir), &claimed).is_err() {
                return Ok(());
            }
            let mut nft = Nftables::open()?;
            match &pending.previous {
                Some(previous) => nft.apply(previous)?,
                None => nft.remove()?,
            }
            let record = RollbackRecord {
                at_unix: now,
                restored_previous: pending.previous.is_some(),
            };
            let _ = write_atomic(&state_dir.join(ROLLBACK_LOG), &serde_json::to_vec(&record)?);
            let _ = std::fs::remove_file(&claimed);
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(
            ((pending.deadline_unix - now) * 1000).min(250),
        ));
    }
}

/// `egret confirm`: keeps the applied ruleset. False when nothing was pending.
pub fn confirm(state_dir: &Path) -> Result<bool> {
    match std::fs::remove_file(pending_path(state_dir)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", pending_path(state_dir).display())),
    }
}

pub fn last_rollback(state_dir: &Path) -> Option<RollbackRecord> {
    serde_json::from_str(&std::fs::read_to_string(state_dir.join(ROLLBACK_LOG)).ok()?).ok()
}
