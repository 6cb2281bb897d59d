//! A policy written back as TOML, for `egret suggest`: the settings and rules
//! of the policy the audit ran under, so the suggestion is a whole policy.
//! Values are quoted by the toml crate; the text parses back to the same policy.

use std::fmt::Write;
use std::time::Duration;

use crate::policy::{
    AllowRule, BlockAction, Mode, Policy, Refusal, Scope, Via, DEFAULT_LOG_GROUP, DEFAULT_MARK, L4,
};

/// A TOML string literal.
pub fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

pub fn list<T: AsRef<str>>(items: &[T]) -> String {
    let inner: Vec<String> = items.iter().map(|s| quote(s.as_ref())).collect();
    format!("[{}]", inner.join(", "))
}

/// Text safe inside a `#` comment: one line (a newline would start a policy
/// line of the attacker's choosing), no control characters or bidi overrides.
pub fn comment_text(s: &str) -> String {
    crate::text::printable(s).into_owned()
}

fn duration(d: Duration) -> String {
    quote(&humantime::format_duration(d).to_string())
}

/// The top level and sections of `policy`, with `mode` in its place.
pub fn settings(policy: &Policy, mode: Mode) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "mode = {}", quote(mode.as_str()));
    if policy.block == BlockAction::Reject {
        let _ = writeln!(out, "block = \"reject\"");
    }
    if policy.log_group != DEFAULT_LOG_GROUP {
        let _ = writeln!(out, "log_group = {}", policy.log_group);
    }
    if policy.mark != DEFAULT_MARK {
        let _ = writeln!(out, "mark = {:#x}", policy.mark);
    }
    if policy.restore_table {
        let _ = writeln!(out, "restore_table = true");
    }
    if let Some(h) = policy.heartbeat {
        let _ = writeln!(out, "heartbeat = {}", duration(h));
    }
    if policy.scope == Scope::HostAndContainers {
        let _ = writeln!(out, "scope = \"host+containers\"");
        let _ = writeln!(
            out,
            "container_interfaces = {}",
            list(&policy.container_interfaces)
        );
        if let Some(socket) = &policy.container_runtime {
            let _ = writeln!(
                out,
                "container_runtime = {:?}",
                socket.display().to_string()
            );
        }
    }
    if let Some(dns) = &policy.dns {
        let upstream: Vec<String> = dns.upstream.iter().map(|a| a.to_string()).collect();
        let _ = writeln!(out, "\n[dns]");
        let _ = writeln!(out, "listen = {}", quote(&dns.listen.to_string()));
        let _ = writeln!(out, "upstream = {}", list(&upstream));
        if dns.refuse == Refusal::Nxdomain {
            let _ = writeln!(out, "refuse = \"nxdomain\"");
        }
        let _ = writeln!(out, "ttl_floor = {}", duration(dns.ttl_floor));
        let _ = writeln!(out, "grace = {}", duration(dns.grace));
        let _ = writeln!(out, "intercept = {}", dns.intercept);
        if !dns.revalidate {
            let _ = writeln!(out, "revalidate = false");
        }
    }
    if let Some(p) = &policy.proxy {
        let _ = writeln!(out, "\n[proxy]");
        let _ = writeln!(out, "listen = {}", quote(&p.listen.to_string()));
        let _ = writeln!(out, "require_sni = {}", p.require_sni);
        let _ = writeln!(out, "ssrf_guard = {}", p.ssrf_guard);
        let _ = writeln!(out, "connect_timeout = {}", duration(p.connect_timeout));
        let _ = writeln!(out, "idle_timeout = {}", duration(p.idle_timeout));
        let _ = writeln!(out, "max_connections = {}", p.max_connections);
        let _ = writeln!(out, "max_per_client = {}", p.max_per_client);
        let _ = writeln!(out, "threads = {}", p.threads);
    }
    if let Some(m) = policy.metrics {
        let _ = writeln!(out, "\n[metrics]\nlisten = {}", quote(&m.to_string()));
    }
    out
}

pub fn protocol(protocols: &[L4]) -> String {
    match protocols {
        [] => quote("any"),
        [one] => quote(one.name()),
        many => list(&many.iter().map(|p| p.name()).collect::<Vec<_>>()),
    }
}

pub fn ports(ranges: &[crate::policy::PortRange]) -> String {
    let items: Vec<String> = ranges
        .iter()
        .map(|r| {
            if r.first == r.last {
                r.first.to_string()
            } else {
                quote(&r.to_string())
            }
        })
        .collect();
    format!("[{}]", items.join(", "))
}

fn ids(ids: &[u32]) -> String {
    let items: Vec<String> = ids.iter().map(u32::to_string).collect();
    format!("[{}]", items.join(", "))
}

/// One `[[allow]]` table (users and groups as numeric ids: the policy holds them resolved).
pub fn rule(r: &AllowRule) -> String {
    let mut out = String::from("[[allow]]\n");
    let _ = writeln!(out, "name = {}", quote(&r.name));
    if let Some(c) = &r.comment {
        let _ = writeln!(out, "comment = {}", quote(c));
    }
    if !r.cidrs.is_empty() {
        let cidrs: Vec<String> = r.cidrs.iter().map(|c| c.to_string()).collect();
        let _ = writeln!(out, "cidrs = {}", list(&cidrs));
    }
    if !r.hosts.is_empty() {
        let hosts: Vec<String> = r.hosts.iter().map(|h| h.to_string()).collect();
        let _ = writeln!(out, "hosts = {}", list(&hosts));
    }
    if r.via == Via::Proxy {
        let _ = writeln!(out, "via = \"proxy\"");
    }
    let _ = writeln!(out, "protocol = {}", protocol(&r.protocols));
    if !r.ports.is_empty() {
        let _ = writeln!(out, "ports = {}", ports(&r.ports));
    }
    if !r.users.is_empty() {
        let _ = writeln!(out, "users = {}", ids(&r.users));
    }
    if !r.groups.is_empty() {
        let _ = writeln!(out, "groups = {}", ids(&r.groups));
    }
    if !r.units.is_empty() {
        let _ = writeln!(out, "units = {}", list(&r.units));
    }
    if let Some(m) = r.mode {
        let _ = writeln!(out, "mode = {}", quote(m.as_str()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_written_back_parses_to_the_same_policy() {
        let text = r#"
mode = "audit"
block = "reject"
log_group = 7
mark = 0x10
heartbeat = "5m"
restore_table = true
scope = "host+containers"
container_interfaces = ["docker0", "br-*"]

[dns]
upstream = ["192.0.2.53", "[2001:db8::53]:5353"]
refuse = "nxdomain"
ttl_floor = "0s"
grace = "90s"
intercept = true

[proxy]
require_sni = true
idle_timeout = "30s"

[metrics]

[[allow]]
name = "web"
comment = "a \"quoted\" comment"
cidrs = ["10.1.0.0/16", "2001:db8::/32"]
hosts = ["*.example.org", "bücher.test"]
protocol = ["tcp", "udp"]
ports = [443, "8000-8100"]
users = [0, 1000]
groups = [50]
units = ["app.service", "system.slice/x.service"]
mode = "enforce"

[[allow]]
name = "mirror"
hosts = ["deb.example.org"]
via = "proxy"
protocol = "any"
"#;
        let path = std::path::Path::new("p.toml");
        let p = crate::policy::parse_str(text, path, &crate::policy::NoAccounts).unwrap();
        let mut back = settings(&p, Mode::Audit);
        for r in &p.rules {
            back.push('\n');
            back.push_str(&rule(r));
        }
        let again = crate::policy::parse_str(&back, path, &crate::policy::NoAccounts)
            .unwrap_or_else(|e| panic!("{e}\n{back}"));
        let strip = |mut p: Policy| {
            for r in &mut p.rules {
                r.origin.line = 0;
            }
            p
        };
        assert_eq!(strip(again), strip(p), "{back}");
    }
}
