//! Which nf_tables features this kernel has, by version (measured on Debian's
//! kernels with scripts/kernel-matrix.sh, see docs/deployment.md "Kernels").
//! A version check rather than a probe: a probe transaction would have to
//! create and delete a table in the namespace egret guards, and a kernel too
//! old for an expression rejects the whole batch anyway (nothing half-loaded),
//! but only after egret has said "applying"; refusing before is clearer.

use crate::policy::Policy;

/// A kernel feature some policies need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    /// The first mainline version that has it.
    pub since: (u32, u32),
    /// What in a policy needs it.
    pub used_by: &'static str,
}

/// `socket cgroupv2 level N` (nft_socket's NFT_SOCKET_CGROUPV2 key) arrived in 5.13.
pub const SOCKET_CGROUPV2: Feature = Feature {
    name: "socket cgroupv2",
    since: (5, 13),
    used_by: "`units` rules",
};

pub const ALL: &[Feature] = &[SOCKET_CGROUPV2];

/// "5.10.0-32-amd64" -> (5, 10); None when it does not start with two numbers.
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// The running kernel's release (`uname -r`).
pub fn running_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn has(feature: Feature, release: &str) -> bool {
    // An unparsable release is let through: the kernel still refuses the
    // whole batch if it lacks the expression.
    parse_release(release).map_or(true, |v| v >= feature.since)
}

/// The features `policy` uses, with the names of the rules that use them.
pub fn used(policy: &Policy) -> Vec<(Feature, Vec<String>)> {
    let units: Vec<String> = policy
        .rules
        .iter()
        .filter(|r| !r.units.is_empty())
        .map(|r| r.name.clone())
        .collect();
    if units.is_empty() {
        vec![]
    } else {
        vec![(SOCKET_CGROUPV2, units)]
    }
}

/// Err with what is missing, the kernel and the fix when `policy` needs a
/// feature kernel `release` lacks; checked before anything is loaded.
pub fn require(policy: &Policy, release: &str) -> Result<(), String> {
    let missing: Vec<String> = used(policy)
        .into_iter()
        .filter(|(f, _)| !has(*f, release))
        .map(|(f, rules)| {
            let mut names = rules.join(", ");
            if names.chars().count() > 200 {
                names = names.chars().take(200).collect::<String>() + "...";
            }
            format!(
                "{} (used by {}: {}) needs Linux {}.{} or newer",
                f.name, f.used_by, names, f.since.0, f.since.1
            )
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "this kernel ({release}) lacks what the policy needs: {}; nothing was loaded. \
         Fix: boot Linux 5.13 or newer (Debian 12 ships 6.1), \
         or replace the `units` rules with `users`/`groups` rules",
        missing.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse() {
        assert_eq!(parse_release("5.10.0-32-amd64"), Some((5, 10)));
        assert_eq!(parse_release("6.12.95+deb12-amd64"), Some((6, 12)));
        assert_eq!(parse_release("6.18.44-fc-v1045"), Some((6, 18)));
        assert_eq!(parse_release("5.13"), Some((5, 13)));
        assert_eq!(parse_release("weird"), None);
        assert!(!has(SOCKET_CGROUPV2, "5.10.0-32-amd64"));
        assert!(has(SOCKET_CGROUPV2, "5.13.0"));
        assert!(has(SOCKET_CGROUPV2, "6.1.0-50-amd64"));
        assert!(has(SOCKET_CGROUPV2, ""));
    }

    fn policy(text: &str) -> Policy {
        crate::policy::parse_str(
            text,
            std::path::Path::new("p.toml"),
            &crate::policy::NoAccounts,
        )
        .expect("valid policy")
    }

    #[test]
    fn unit_rules_are_refused_below_5_13_with_the_feature_kernel_and_fix() {
        let units = policy(
            "[[allow]]\nname = \"backup\"\ncidrs = [\"192.0.2.1\"]\nports = [443]\nunits = [\"backup.service\"]\n",
        );
        let err = require(&units, "5.10.0-32-amd64").expect_err("refused on 5.10");
        for needle in [
            "socket cgroupv2",
            "backup",
            "5.10.0-32-amd64",
            "5.13",
            "nothing was loaded",
            "Fix:",
        ] {
            assert!(err.contains(needle), "{needle} missing from: {err}");
        }
        assert!(require(&units, "5.13.0").is_ok());
        assert!(require(&units, "6.1.0-50-amd64").is_ok());
        let plain = policy("[[allow]]\nname = \"web\"\ncidrs = [\"192.0.2.1\"]\nports = [443]\n");
        assert!(require(&plain, "5.10.0-32-amd64").is_ok());
    }
}
