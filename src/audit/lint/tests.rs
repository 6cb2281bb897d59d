use proptest::prelude::*;

use super::*;
use crate::audit::evaluate::evaluate;
use crate::audit::evaluate::tests::{arb_flow, arb_policy};

struct Accounts;
impl crate::policy::Accounts for Accounts {
    fn uid(&self, name: &str) -> Option<u32> {
        (name == "app").then_some(1000)
    }
    fn gid(&self, _: &str) -> Option<u32> {
        None
    }
}

fn policy(rules: &str) -> Policy {
    let text = format!("[dns]\nupstream = [\"192.0.2.53\"]\n{rules}");
    crate::policy::parse_str(&text, std::path::Path::new("p.toml"), &Accounts).unwrap()
}

fn kinds(p: &Policy, hits: Option<&BTreeMap<String, u64>>) -> Vec<(String, &'static str)> {
    lint(p, hits)
        .into_iter()
        .map(|w| (w.rule, w.kind))
        .collect()
}

#[test]
fn each_kind_of_warning() {
    let p = policy(
        r#"
[[allow]]
name = "net"
cidrs = ["10.0.0.0/8"]
ports = ["1-1024"]
[[allow]]
name = "inner"
cidrs = ["10.1.0.0/16"]
ports = [443]
users = ["app"]
[[allow]]
name = "web"
hosts = ["*.example.org"]
ports = [443]
[[allow]]
name = "api"
hosts = ["api.example.org", "*.eu.example.org"]
ports = [443]
[[allow]]
name = "tld"
hosts = ["*.com", "*.co.uk", "s3.*.amazonaws.com"]
[[allow]]
name = "open"
cidrs = ["0.0.0.0/0", "::/0"]
[[allow]]
name = "after-open"
cidrs = ["192.0.2.0/24"]
"#,
    );
    let hits = BTreeMap::from([("net".to_string(), 5), ("web".to_string(), 0)]);
    assert_eq!(
        kinds(&p, Some(&hits)),
        [
            ("inner".to_string(), "shadowed"),
            ("web".to_string(), "unused"),
            ("api".to_string(), "shadowed"),
            ("tld".to_string(), "broad-host"),
            ("tld".to_string(), "broad-host"),
            ("open".to_string(), "allows-everything"),
            ("after-open".to_string(), "shadowed"),
        ]
    );
}

#[test]
fn proxy_only_cidrs_shadow_no_direct_rule() {
    let p = policy(
        r#"
[proxy]
[[allow]]
name = "via-proxy"
cidrs = ["10.0.0.0/8"]
via = "proxy"
[[allow]]
name = "direct"
cidrs = ["10.1.0.0/16"]
[[allow]]
name = "direct-too"
cidrs = ["10.1.2.0/24"]
via = "proxy"
"#,
    );
    let k = kinds(&p, None);
    assert!(!k.iter().any(|(r, _)| r == "direct"), "{k:?}");
    assert!(
        k.contains(&("direct-too".to_string(), "shadowed")),
        "a direct rule also opens the proxy: {k:?}"
    );
}

#[test]
fn near_misses_are_not_shadowed() {
    let p = policy(
        r#"
[[allow]]
name = "a"
cidrs = ["10.0.0.0/8"]
ports = [443]
users = ["app"]
[[allow]]
name = "other-user"
cidrs = ["10.1.0.0/16"]
ports = [443]
[[allow]]
name = "other-port"
cidrs = ["10.1.0.0/16"]
ports = ["443-444"]
users = ["app"]
[[allow]]
name = "udp"
cidrs = ["10.1.0.0/16"]
protocol = "udp"
ports = [443]
users = ["app"]
"#,
    );
    assert_eq!(kinds(&p, None), []);
}

proptest! {
    #[test]
    fn a_rule_reported_shadowed_never_decides_a_flow(p in arb_policy(), flows in proptest::collection::vec(arb_flow(), 1..24)) {
        let shadowed: Vec<String> = lint(&p, None)
            .into_iter()
            .filter(|w| w.kind == "shadowed")
            .map(|w| w.rule)
            .collect();
        for f in &flows {
            let d = evaluate(&p, f);
            if d.outcome == crate::audit::evaluate::Outcome::Allowed {
                prop_assert!(!shadowed.contains(&d.rule), "{:?} decided by shadowed {}", f, d.rule);
            }
        }
    }
}
