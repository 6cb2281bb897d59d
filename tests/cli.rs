//! The command-line contract: exit codes and messages that scripts rely on.

mod common;

use std::process::Command;

use common::{egret_bin, PolicyFile};

fn egret(args: &[&str]) -> std::process::Output {
    Command::new(egret_bin())
        .args(args)
        .output()
        .expect("running egret")
}

#[test]
fn check_accepts_a_valid_policy() {
    let p = PolicyFile::new(
        "mode = \"audit\"\n[[allow]]\nname = \"web\"\ncidrs = [\"192.0.2.0/24\"]\nports = [443]\n",
    );
    let out = egret(&["check", p.path()]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 rule(s), mode audit)"));
}

#[test]
fn check_reports_every_error_with_file_line_column_and_exits_1() {
    let p = PolicyFile::new("[[allow]]\nname = \"web\"\ncidrs = [\"192.0.2.0/24\", \"nope\"]\nports = [443, \"99999\"]\nusers = [\"no-such-user-egret\"]\n");
    let out = egret(&["check", p.path()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:3:26: error: invalid address \"nope\"",
            p.path()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{}:4:15: error: port 99999 is out of range",
            p.path()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{}:5:10: error: unknown user \"no-such-user-egret\"",
            p.path()
        )),
        "{err}"
    );
    assert!(err.contains("hint:"), "errors say how to fix them: {err}");
    assert!(err.contains("3 error(s); nothing was applied"), "{err}");
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let out = egret(&["check", "/nonexistent/egret/policy.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("/nonexistent/egret/policy.toml:1:1: error: cannot read policy file"));
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(egret(&["apply"]).status.code(), Some(2));
    assert_eq!(egret(&["frobnicate"]).status.code(), Some(2));
}

#[test]
fn the_shipped_example_policies_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/policies");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/policies") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = egret(&["check", path.to_str().expect("utf-8")]);
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 2);
}

/// The packaged /etc/egret/policy.toml, a new user's first contact: valid,
/// its step-1 [dns] block valid once uncommented, and every document it
/// names installed by the package (docs/*.md → /usr/share/doc/egret/docs/).
#[test]
fn the_packaged_policy_leads_down_the_audit_path_with_working_references() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("packaging/policy.toml")).expect("policy.toml");
    let p = PolicyFile::new(&text);
    let out = egret(&["check", p.path()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let with_dns = text
        .replace("# [dns]\n", "[dns]\n")
        .replace("# upstream = [", "upstream = [")
        .replace("# intercept = true", "intercept = true");
    assert_ne!(with_dns, text, "the [dns] block of step 1 is there");
    let p = PolicyFile::new(&with_dns);
    let out = egret(&["check", p.path()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    for step in ["[dns]", "egret suggest", "egret simulate", "enforce"] {
        assert!(text.contains(step), "the recipe names {step}");
    }
    assert!(!text.contains("https://"), "no placeholder URL: {text}");
    let mut named = 0;
    for (i, _) in text.match_indices("/usr/share/doc/egret/") {
        let rest = &text[i + "/usr/share/doc/egret/".len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || "/._-".contains(c)))
            .unwrap_or(rest.len());
        let doc = rest[..end].trim_end_matches('.');
        assert!(
            root.join(doc).is_file(),
            "{doc} is not a document the package installs"
        );
        named += 1;
    }
    assert!(named >= 3, "{text}");
}

/// StrictModes over the whole path: a world-writable grandparent of the
/// policy, and a drop-in that is a symlink into a directory nobody owns, are
/// named by `check` (which warns; `run`, `apply` and `reload` refuse: the same
/// function, `adversary_kernel::policy_files_others_may_write_are_refused`).
/// Before, only the file and its immediate directory were looked at, through
/// the symlink.
#[test]
fn check_names_writable_ancestors_and_symlinks_into_others_directories() {
    use std::os::unix::fs::{chown, symlink, PermissionsExt};
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let chmod = |p: &std::path::Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    let top = tempfile::tempdir().expect("tempdir");
    chmod(top.path(), 0o755);
    let gp = top.path().join("gp");
    let etc = gp.join("etc");
    let d = etc.join("policy.d");
    std::fs::create_dir_all(&d).expect("mkdir");
    for dir in [&gp, &etc, &d] {
        chmod(dir, 0o755);
    }
    chmod(&gp, 0o777);
    let main = etc.join("policy.toml");
    std::fs::write(
        &main,
        "mode = \"enforce\"\ninclude = [\"policy.d/*.toml\"]\n",
    )
    .expect("write");
    chmod(&main, 0o644);
    let evil = top.path().join("evil");
    std::fs::create_dir(&evil).expect("mkdir");
    chmod(&evil, 0o755);
    let target = evil.join("x.toml");
    std::fs::write(
        &target,
        "[[allow]]\nname = \"all\"\ncidrs = [\"0.0.0.0/0\"]\n",
    )
    .expect("write");
    chmod(&target, 0o644);
    chown(&evil, Some(65534), None).expect("chown");
    chown(&target, Some(65534), None).expect("chown");
    symlink(&target, d.join("a.toml")).expect("symlink");

    let out = egret(&["check", main.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(0), "check only warns");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("chmod go-w {}", gp.display())),
        "the writable grandparent: {err}"
    );
    assert!(
        err.contains(&format!("chown root {}", evil.display())),
        "the directory the symlink leads into: {err}"
    );
}
