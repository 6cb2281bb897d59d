//! `egret doctor` reports each failure it claims to detect, created for real
//! in a namespace the test owns.

mod common;

use std::process::Output;

use common::*;

fn doctor(ns: &Netns, args: &[&str]) -> (Output, serde_json::Value) {
    let mut a = vec!["doctor", "--json"];
    a.extend_from_slice(args);
    let out = ns.egret_out(&a);
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out, json)
}

fn status<'a>(checks: &'a serde_json::Value, name: &str) -> (&'a str, &'a str) {
    let c = checks
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no check {name}: {checks:#}"));
    (
        c["status"].as_str().unwrap_or(""),
        c["detail"].as_str().unwrap_or(""),
    )
}

#[test]
fn a_healthy_namespace_passes() {
    let ns = Netns::new();
    let dir = tempfile::tempdir().unwrap();
    let (out, checks) = doctor(&ns, &["--state-dir", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{checks:#}");
    for name in [
        "privileges",
        "nf_tables",
        "nflog",
        "sock_diag",
        "clock",
        "state dir",
    ] {
        assert_eq!(status(&checks, name).0, "ok", "{name}: {checks:#}");
    }
}

#[test]
fn an_nflog_group_taken_by_another_process_fails_and_egrets_own_does_not() {
    let ns = Netns::new();
    let policy = PolicyFile::new("mode = \"audit\"\n");
    let run = Running::start(&ns, &policy.state_dir(), &["--policy", policy.path()]);
    let (out, checks) = doctor(&ns, &["--state-dir", &policy.state_dir()]);
    assert!(out.status.success(), "{checks:#}");
    let (s, detail) = status(&checks, "nflog");
    assert_eq!(s, "ok");
    assert!(detail.contains("read by egret run"), "{detail}");
    // Seen from another state dir, that egret is just another consumer.
    let other = tempfile::tempdir().unwrap();
    let (out, checks) = doctor(&ns, &["--state-dir", other.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    let (s, detail) = status(&checks, "nflog");
    assert_eq!(s, "fail");
    assert!(detail.contains("taken by egret (pid"), "{detail}");
    drop(run);
}

#[test]
fn an_unwritable_state_dir_and_missing_privileges_fail() {
    let ns = Netns::new();
    let (out, checks) = doctor(&ns, &["--state-dir", "/proc/egret-doctor-test"]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(status(&checks, "state dir").0, "fail");
    let dir = tempfile::tempdir().unwrap();
    run_ok(std::process::Command::new("chmod").args(["777", dir.path().to_str().unwrap()]));
    let out = ns
        .as_nobody(
            egret_bin_for_others(),
            &[
                "doctor",
                "--json",
                "--state-dir",
                dir.path().to_str().unwrap(),
            ],
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status(&checks, "privileges").0, "fail");
}

#[test]
fn a_resolver_that_bypasses_the_dns_guard_fails() {
    let ns = Netns::new();
    let policy = PolicyFile::new("[dns]\nupstream = [\"192.0.2.53\"]\n");
    let state = tempfile::tempdir().unwrap();
    let conf = state.path().join("resolv.conf");
    let args = |c: &std::path::Path| {
        vec![
            "--policy".to_string(),
            policy.path().to_string(),
            "--state-dir".to_string(),
            state.path().to_string_lossy().into_owned(),
            "--resolv-conf".to_string(),
            c.to_string_lossy().into_owned(),
        ]
    };
    std::fs::write(&conf, "nameserver 192.0.2.53\n").unwrap();
    let a = args(&conf);
    let (out, checks) = doctor(&ns, &a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(3));
    let (s, detail) = status(&checks, "resolver");
    assert_eq!(s, "fail");
    assert!(detail.contains("192.0.2.53"), "{detail}");
    std::fs::write(&conf, "nameserver 127.0.0.1\n").unwrap();
    let (out, checks) = doctor(&ns, &a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(out.status.success(), "{checks:#}");
    assert_eq!(status(&checks, "resolver").0, "ok");
}

/// A local resolver in front of the guard works but hides who asked: warnings,
/// not failures (docs/dns.md, "Programs must ask the guard"). Queries it
/// forwarded are counted in the books (tests/dns_stub.rs).
#[test]
fn a_local_resolver_in_front_of_the_guard_is_a_warning() {
    let ns = Netns::new();
    let policy = PolicyFile::new("[dns]\nupstream = [\"192.0.2.53\"]\n");
    let state = tempfile::tempdir().unwrap();
    let (conf, nss) = (
        state.path().join("resolv.conf"),
        state.path().join("nsswitch.conf"),
    );
    std::fs::write(&conf, "nameserver 127.0.0.2\nsearch corp.example\n").unwrap();
    std::fs::write(&nss, "hosts: files resolve [!UNAVAIL=return] dns\n").unwrap();
    let args = [
        "--policy",
        policy.path(),
        "--state-dir",
        state.path().to_str().unwrap(),
        "--resolv-conf",
        conf.to_str().unwrap(),
        "--nsswitch-conf",
        nss.to_str().unwrap(),
    ];
    let (out, checks) = doctor(&ns, &args);
    assert!(out.status.success(), "warnings only: {checks:#}");
    let (s, detail) = status(&checks, "resolver");
    assert_eq!(s, "warn", "{detail}");
    assert!(detail.contains("127.0.0.2"), "{detail}");
    let (s, detail) = status(&checks, "nsswitch");
    assert_eq!(s, "warn", "{detail}");
    assert!(detail.contains("systemd-resolved"), "{detail}");
    // No guard has run with this state dir: nothing to say about askers yet.
    assert_eq!(status(&checks, "dns askers").0, "ok");

    std::fs::write(&conf, "nameserver 127.0.0.1\nsearch corp.example\n").unwrap();
    std::fs::write(&nss, "hosts: files myhostname dns\n").unwrap();
    let (_, checks) = doctor(&ns, &args);
    assert_eq!(status(&checks, "resolver").0, "ok", "{checks:#}");
    assert_eq!(status(&checks, "nsswitch").0, "ok", "{checks:#}");
}

#[test]
fn a_container_runtime_that_does_not_answer_is_a_warning() {
    let ns = Netns::new();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("docker.sock");
    let policy = PolicyFile::new(&format!(
        "mode = \"audit\"\nscope = \"host+containers\"\ncontainer_runtime = \"{}\"\n",
        socket.display()
    ));
    let (out, checks) = doctor(
        &ns,
        &[
            "--policy",
            policy.path(),
            "--state-dir",
            &policy.state_dir(),
        ],
    );
    assert!(
        out.status.success(),
        "a warning is not a failure: {checks:#}"
    );
    let (s, detail) = status(&checks, "container runtime");
    assert_eq!(s, "warn", "{detail}");
    assert!(
        detail.contains("docker.sock") && detail.contains("bridge and address"),
        "{detail}"
    );
    // Without container scope the runtime is not egret's concern.
    let host_only = PolicyFile::new("mode = \"audit\"\n");
    let (_, checks) = doctor(
        &ns,
        &[
            "--policy",
            host_only.path(),
            "--state-dir",
            &host_only.state_dir(),
        ],
    );
    assert!(
        !checks.to_string().contains("container runtime"),
        "{checks:#}"
    );
}

/// The "audit path" check: (status, detail, fix).
fn audit_path(ns: &Netns, policy: &PolicyFile, state: &str) -> (String, String, String) {
    let (_, checks) = doctor(ns, &["--policy", policy.path(), "--state-dir", state]);
    let c = checks
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "audit path"))
        .unwrap_or_else(|| panic!("no audit path check: {checks:#}"))
        .clone();
    let s = |k: &str| c[k].as_str().unwrap_or("").to_string();
    (s("status"), s("detail"), s("fix"))
}

#[test]
fn doctor_leads_a_new_user_from_an_audit_with_the_dns_guard_to_enforcement() {
    let ns = Netns::new();
    let state = tempfile::tempdir().unwrap();
    let state = state.path().to_str().unwrap();
    const DOC: &str = "/usr/share/doc/egret/docs/audit.md";

    let bare_audit = PolicyFile::new("mode = \"audit\"\n");
    let (s, detail, fix) = audit_path(&ns, &bare_audit, state);
    assert_eq!(s, "warn", "{detail}");
    assert!(detail.contains("without [dns]"), "{detail}");
    assert!(fix.contains("[dns]") && fix.contains(DOC), "{fix}");

    let guarded = PolicyFile::new("mode = \"audit\"\n[dns]\nupstream = [\"192.0.2.53\"]\n");
    let (s, detail, _) = audit_path(&ns, &guarded, state);
    assert_eq!(s, "ok", "{detail}");
    assert!(
        detail.contains("egret suggest") && detail.contains("egret simulate"),
        "{detail}"
    );

    let enforce = PolicyFile::new("mode = \"enforce\"\n");
    let (s, detail, fix) = audit_path(&ns, &enforce, state);
    assert_eq!(s, "warn", "{detail}");
    assert!(detail.contains("no audit"), "{detail}");
    assert!(fix.contains("audit") && fix.contains(DOC), "{fix}");

    // Once an audit ran with this state dir, enforcing is the next step.
    Running::start(&ns, state, &["--policy", bare_audit.path()]).stop();
    let (s, detail, _) = audit_path(&ns, &enforce, state);
    assert_eq!(s, "ok", "{detail}");
    assert!(detail.contains("the last audit ran at"), "{detail}");
}

#[test]
fn containers_dns_not_redirected_to_the_guard_fails() {
    let ns = Netns::new();
    let containers = PolicyFile::new(
        "mode = \"audit\"\nscope = \"host+containers\"\ncontainer_runtime = \"/nonexistent.sock\"\n[dns]\nupstream = [\"192.0.2.53\"]\n",
    );
    let args = [
        "--policy",
        containers.path(),
        "--state-dir",
        &containers.state_dir(),
    ];
    // Nothing loaded yet: a warning.
    let (_, checks) = doctor(&ns, &args);
    assert_eq!(status(&checks, "container dns").0, "warn", "{checks:#}");
    // A table loaded from a policy without the containers' redirect.
    let host_only = PolicyFile::new("mode = \"audit\"\n[dns]\nupstream = [\"192.0.2.53\"]\n");
    run_ok(&mut ns.egret(&[
        "apply",
        "--state-dir",
        &host_only.state_dir(),
        host_only.path(),
    ]));
    let (out, checks) = doctor(&ns, &args);
    let (s, detail) = status(&checks, "container dns");
    assert_eq!(s, "fail", "{detail}");
    assert!(detail.contains("does not redirect"), "{detail}");
    assert!(!out.status.success());
    // Loaded with `egret apply` alone: redirected to a port nobody serves.
    run_ok(&mut ns.egret(&[
        "apply",
        "--state-dir",
        &containers.state_dir(),
        containers.path(),
    ]));
    let (_, checks) = doctor(&ns, &args);
    let (s, detail) = status(&checks, "container dns");
    assert_eq!(s, "fail", "{detail}");
    assert!(detail.contains("nothing listens"), "{detail}");
    // egret run with the policy: redirected, and the guard listens there.
    let run = Running::start(
        &ns,
        &containers.state_dir(),
        &["--policy", containers.path()],
    );
    let (_, checks) = doctor(&ns, &args);
    let (s, detail) = status(&checks, "container dns");
    assert_eq!(s, "ok", "{detail}");
    assert!(detail.contains("port 10053"), "{detail}");
    drop(run);
}
