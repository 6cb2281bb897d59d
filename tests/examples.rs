//! The runnable stories in examples/ are tests too: they must keep working.

mod common;

#[test]
fn log4shell_second_stage_is_blocked_and_reported() {
    let out = std::process::Command::new("bash")
        .arg("examples/log4shell/run.sh")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("EGRET", common::egret_bin())
        .output()
        .expect("running examples/log4shell/run.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("exploited"),
        "the unprotected run reaches the attacker: {stdout}"
    );
    assert!(
        stdout.contains("attacker's LDAP server: 0 connection(s)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("== ok: the callback was blocked and attributed"),
        "{stdout}"
    );
}
