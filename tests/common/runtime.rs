//! What the container-runtime tests (tests/docker.rs, tests/podman.rs) do
//! with a real engine: its client, talking only to the daemon the test
//! started, and the busybox containers they run.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

/// A container engine's command-line client (docker, podman) bound to one
/// test's daemon.
pub trait Engine {
    /// The client's name, for failures.
    const CLIENT: &'static str;

    /// The client run with `args` against this test's daemon.
    fn client(&self, args: &[&str]) -> Output;

    /// The daemon's log, for failures.
    fn log(&self) -> String;

    /// The client's trimmed stdout; panics (with the daemon's log) unless it succeeds.
    fn client_ok(&self, args: &[&str]) -> String {
        let out = self.client(args);
        assert!(
            out.status.success(),
            "{} {args:?} failed: {}\n{}\ndaemon log:\n{}",
            Self::CLIENT,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn inspect(&self, container: &str, format: &str) -> String {
        self.client_ok(&["inspect", "--format", format, container])
    }

    /// The container's address on its network(s).
    fn ip(&self, container: &str) -> String {
        self.inspect(
            container,
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        )
    }

    /// `sh -c script` in a running container: (exit 0, stdout).
    fn exec(&self, container: &str, script: &str) -> (bool, String) {
        let out = self.client(&["exec", container, "sh", "-c", script]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// `nslookup NAME` in a container, through whatever resolver the engine gave it.
    fn lookup(&self, container: &str, name: &str) -> String {
        self.exec(container, &format!("nslookup {name}")).1
    }

    /// An echo round trip from a container to `to:port` (a name or an address).
    fn connects(&self, container: &str, to: &str, port: u16) -> bool {
        let (ok, out) = self.exec(container, &format!("echo ping | nc -w 3 {to} {port}"));
        ok && out.contains("ping")
    }
}

/// Processes whose command line names `dir`: what a daemon started there
/// left behind (containerd, shims, conmon, aardvark-dns, docker-proxy).
pub fn processes_naming(dir: &Path) -> Vec<u32> {
    let dir = dir.display().to_string();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&dir) {
            pids.push(pid);
        }
    }
    pids
}

/// Polls for up to 20 s (scaled by `time_scale`): an engine takes a moment
/// to wire a (re)started container.
pub fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20 * super::time_scale());
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within 20 s");
        std::thread::sleep(Duration::from_millis(250));
    }
}
