//! Running egret as a system service: the unit file, readiness notification,
//! the capabilities the unit grants, man pages and completions.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::process::Stdio;
use std::time::Duration;

use common::*;

fn unit_text() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/egret.service"
    ))
    .expect("packaging/egret.service")
}

#[test]
fn the_unit_file_verifies_and_its_exposure_is_ok() {
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("egret.service");
    // verify wants the binary to exist: point it at the one under test.
    std::fs::write(&unit, unit_text().replace("/usr/bin/egret", egret_bin())).unwrap();
    let out = run_ok(
        std::process::Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&unit),
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_ok(
        std::process::Command::new("systemd-analyze")
            .args(["security", "--offline=true"])
            .arg(&unit),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for egret.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("an exposure score");
    assert!(score <= 3.0, "exposure {score}\n{text}");
}

#[test]
fn readiness_reload_and_stop_are_notified_to_systemd() {
    let ns = Netns::new();
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let policy = PolicyFile::new("mode = \"audit\"\n");
    let mut child = ns
        .egret_run(&policy)
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let mut next = || {
        // A socket with a receive timeout is never restarted after a signal
        // (signal(7)): EINTR, seen here about once in eight runs, is not a
        // missing notification.
        let n = loop {
            match sock.recv(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r.expect("a notification"),
            }
        };
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = next();
    assert!(ready.starts_with("READY=1"), "{ready}");
    // Ready means the ruleset is loaded.
    assert!(ns.nft_ruleset().contains("table inet egret"));
    run_ok(std::process::Command::new("kill").args(["-HUP", &child.id().to_string()]));
    assert_eq!(next(), "RELOADING=1");
    assert!(next().starts_with("READY=1"));
    run_ok(std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]));
    assert_eq!(next(), "STOPPING=1");
    assert!(child.wait().unwrap().success());
}

#[test]
fn the_capabilities_the_unit_grants_are_enough_and_each_is_needed() {
    // egret as an unprivileged user with exactly the unit's ambient
    // capabilities, then without each of the two that attribution needs; the
    // blocked process belongs to yet another user.
    let unit = unit_text();
    assert!(unit.contains(
        "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE CAP_SYS_PTRACE CAP_DAC_READ_SEARCH"
    ));
    for (granted, want) in [
        (
            "+net_admin,+net_bind_service,+sys_ptrace,+dac_read_search",
            "sock_diag+proc",
        ),
        ("+net_admin,+net_bind_service,+dac_read_search", "sock_diag"),
        ("+net_admin,+net_bind_service,+sys_ptrace", "sock_diag"),
    ] {
        let pair = Pair::new();
        let policy = PolicyFile::new("mode = \"enforce\"\n");
        let state = policy.state_dir();
        std::fs::create_dir_all(&state).unwrap();
        // The policy stays root's and unwritable by others (egret refuses
        // a policy others may change); nobody may read it and write state.
        run_ok(
            std::process::Command::new("chmod").args(["755", policy.dir.path().to_str().unwrap()]),
        );
        run_ok(std::process::Command::new("chmod").args(["-R", "777", &state]));
        let mut egret = pair
            .a
            .cmd(
                "setpriv",
                &[
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    &format!("--inh-caps={granted}"),
                    &format!("--ambient-caps={granted}"),
                    egret_bin_for_others(),
                    "run",
                    "--policy",
                    policy.path(),
                    "--state-dir",
                    &state,
                ],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The attempt must meet the ruleset, not race egret's start.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !pair.a.nft_ruleset().contains("table inet egret") {
            assert!(
                std::time::Instant::now() < deadline,
                "egret run did not load its ruleset ({granted})"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let attempt = Attempt::start(&pair.a, Some(4242), &["try-tcp", B4, "1389"]);
        // Lines on a channel, so a missing event fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        let out = BufReader::new(egret.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let event = loop {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no event for the blocked connect ({granted})"));
            let doc: serde_json::Value = serde_json::from_str(&line).unwrap();
            if at(&doc, "/destination/port") == 1389 {
                break doc;
            }
        };
        assert_eq!(
            at(&event, "/egret/attribution"),
            want,
            "{granted}: {event:#}"
        );
        if want == "sock_diag+proc" {
            assert_eq!(at(&event, "/process/pid"), attempt.pid);
        }
        assert_eq!(at(&event, "/user/id"), "4242");
        let _ = egret.kill();
        let _ = egret.wait();
    }
}

#[test]
fn man_pages_and_completions_come_from_the_command_line_definition() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_ok(
        std::process::Command::new(egret_bin())
            .arg("man")
            .arg(dir.path()),
    );
    let written = String::from_utf8_lossy(&out.stdout);
    for page in ["egret.1", "egret-run.1", "egret-apply.1", "egret-events.1"] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
        assert!(text.contains(".TH"), "{page}");
        assert!(written.contains(page));
    }
    assert!(
        !written.contains("rollback-watch"),
        "internal commands have no page"
    );
    for (shell, marker) in [
        ("bash", "complete -F _egret"),
        ("zsh", "#compdef egret"),
        ("fish", "complete -c egret"),
    ] {
        let out = run_ok(std::process::Command::new(egret_bin()).args(["completions", shell]));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(marker), "{shell}");
        assert!(text.contains("run") && text.contains("policy"), "{shell}");
    }
}
