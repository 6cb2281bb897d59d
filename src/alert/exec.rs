//! Exec sink: runs a command per alert with the event as one JSON line on
//! stdin. Its stdout is discarded (egret's own stdout is the event stream);
//! its stderr is egret's, so a hook's complaints reach the journal.
//! The timeout covers the whole run, writing stdin included, and ends the
//! hook's whole process group.

use std::io::{ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use super::Deliver;
use crate::monitor::event::ecs::Envelope;
use crate::policy::{ExecConfig, Severity};

pub struct Exec {
    config: ExecConfig,
    timeout: Duration,
}

impl Exec {
    pub fn new(config: &ExecConfig, timeout: Duration) -> Exec {
        Exec {
            config: config.clone(),
            timeout,
        }
    }
}

impl Deliver for Exec {
    fn deliver(&mut self, doc: &Value) -> Result<()> {
        let (program, args) = self.config.command.split_first().context("empty command")?;
        let envelope = Envelope::of(doc);
        // Its own process group, so a timeout ends whatever the hook started.
        let mut child = Command::new(program)
            .args(args)
            .env("EGRET_ACTION", envelope.action_name())
            .env(
                "EGRET_SEVERITY",
                envelope.severity.map_or("", Severity::as_str),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("running {program}"))?;
        let group = Pid::from_raw(child.id() as i32);
        let mut line = serde_json::to_vec(doc)?;
        line.push(b'\n');
        // The event goes in as the hook reads it, under the same deadline: a
        // hook that never reads must not hold the sink past its timeout.
        let mut stdin = child.stdin.take();
        if let Some(pipe) = &stdin {
            if let Err(e) = set_nonblocking(pipe) {
                kill_group(group, &mut child);
                return Err(e).context("making the hook's stdin non-blocking");
            }
        }
        let mut written = 0;
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(pipe) = stdin.as_mut() {
                match pipe.write(&line[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    // A hook that does not read its stdin is its own business.
                    Err(_) => written = line.len(),
                }
                if written >= line.len() {
                    stdin = None;
                }
            }
            if let Some(status) = child.try_wait()? {
                if status.success() {
                    return Ok(());
                }
                bail!("{program} exited with {status}");
            }
            if Instant::now() >= deadline {
                kill_group(group, &mut child);
                bail!(
                    "{program} did not finish within {}; killed with its process group",
                    humantime::format_duration(self.timeout)
                );
            }
            std::thread::sleep(Duration::from_millis(if stdin.is_some() { 2 } else { 10 }));
        }
    }
}

fn set_nonblocking(pipe: &ChildStdin) -> std::io::Result<()> {
    let flags = fcntl(pipe.as_raw_fd(), FcntlArg::F_GETFL)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(pipe.as_raw_fd(), FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// SIGKILL to the hook's whole group (its children too), then reaps the hook.
fn kill_group(group: Pid, child: &mut Child) {
    let _ = killpg(group, Signal::SIGKILL);
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(false)
    }

    /// A document bigger than a pipe holds, a hook that never reads it and
    /// leaves a child behind: delivery gives up at the timeout (before, the
    /// write waited as long as the hook lived) and ends the child too.
    #[test]
    fn a_hook_that_never_reads_a_big_document_is_ended_with_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("child");
        let config = ExecConfig {
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("sleep 120 & echo $! > {}; sleep 120", pid_file.display()),
            ],
        };
        let mut exec = Exec::new(&config, Duration::from_millis(500));
        let doc = serde_json::json!({ "big": "x".repeat(1 << 20) });
        let err = exec.deliver(&doc).expect_err("the hook never finishes");
        assert!(err.to_string().contains("did not finish"), "{err:#}");
        let child: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SIGKILL is delivered before killpg returns; reaping by init may lag.
        for _ in 0..200 {
            if !alive(child) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the hook's child {child} survived the timeout");
    }

    #[test]
    fn a_hook_that_reads_gets_the_whole_document() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let config = ExecConfig {
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("cat > {}", out.display()),
            ],
        };
        let mut exec = Exec::new(&config, Duration::from_secs(60));
        let doc = serde_json::json!({ "big": "y".repeat(1 << 20) });
        exec.deliver(&doc).unwrap();
        let got: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(got, doc);
    }
}
