//! Exec sink: runs a command per alert with the event as one JSON line on
//! stdin. Its stdout is discarded (egret's own stdout is the event stream);
//! its stderr is egret's, so a hook's complaints reach the journal.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::Deliver;
use crate::policy::ExecConfig;

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
        let text = |p: &str| doc.pointer(p).and_then(Value::as_str).unwrap_or("");
        let mut child = Command::new(program)
            .args(args)
            .env("EGRET_ACTION", text("/event/action"))
            .env("EGRET_SEVERITY", text("/egret/severity"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("running {program}"))?;
        let mut line = serde_json::to_vec(doc)?;
        line.push(b'\n');
        // A hook that does not read its stdin is its own business.
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(&line);
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                if status.success() {
                    return Ok(());
                }
                bail!("{program} exited with {status}");
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{program} did not finish within {}; killed",
                    humantime::format_duration(self.timeout)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
