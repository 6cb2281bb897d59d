//! The pid file of `egret run` in its state dir: how `reload`, `apply`,
//! `remove`, `status` and `doctor` find the running daemon. A leaf module, so
//! those commands need not import the daemon.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub const PID_FILE: &str = "egret.pid";

pub fn pid_path(state_dir: &Path) -> PathBuf {
    state_dir.join(PID_FILE)
}

/// The pid of a running `egret run` for this state dir, if any.
pub fn running_pid(state_dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_path(state_dir))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "egret").then_some(pid)
}

/// This process's pid file, removed when dropped.
pub struct PidFile(PathBuf);

impl PidFile {
    /// Refuses a state dir another `egret run` uses.
    pub fn create(state_dir: &Path) -> Result<PidFile> {
        if let Some(pid) = running_pid(state_dir) {
            bail!(
                "another `egret run` (pid {pid}) uses {}",
                state_dir.display()
            );
        }
        let path = pid_path(state_dir);
        crate::monitor::store::write_file(
            &path,
            format!("{}\n", std::process::id()).as_bytes(),
            0o644,
        )
        .context("writing the pid file")?;
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
