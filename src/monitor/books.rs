//! The daemon's books as `egret run` stores them (counter `books`) and
//! `egret status` / the API read them back: one type for both sides, so the
//! reader names fields instead of JSON pointers. The JSON is an interface
//! (`status --json`): renaming a field here changes it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::event::LossFigures;

/// One writing of the books. Written when the loop starts, after each
/// reload or unit-cgroup swap, at every accounting tick and at exit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DaemonBooks {
    /// The `egret run` that wrote them: a test or a supervisor knows the
    /// loop it started is up when the books carry its pid.
    pub pid: u32,
    pub updated_at: String,
    pub loss: LossFigures,
    pub open_incidents: usize,
    pub attribution: AttributionCounts,
    /// Present when the DNS guard runs (and in the final books after it stopped).
    pub dns_guard: Option<GuardCounts>,
    pub proxy: Option<ProxyCounts>,
    /// Reloads that replaced the running policy (refused ones do not count).
    pub reloads: u64,
    /// Times the unit rules followed restarted units to new cgroups.
    pub unit_changes: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AttributionCounts {
    pub cache_hits: u64,
    pub deep_lookups: u64,
    pub rate_limited: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuardCounts {
    pub queries: u64,
    pub cache_hits: u64,
    pub forwarded: u64,
    pub refused: u64,
    pub upstream_failures: u64,
    pub set_failures: u64,
    pub tcp_accept_errors: u64,
    pub tcp_refused: u64,
    pub revalidation: RevalidationCounts,
    /// Attributed queries whose asker was a local resolver: the program
    /// behind it is lost (`egret doctor` warns).
    pub via_stub: StubCounts,
    /// Names only a wildcard allows, handed to the daemon as first asked by
    /// their identity (`[novelty]`; drops count in `loss.dns_dropped`).
    pub new_names: u64,
    /// (identity, name) pairs the guard's novelty filter holds.
    pub novelty_filter: u64,
}

/// The local resolvers the guard recognises by the asking socket's
/// executable: a fixed list, so the books stay bounded whatever asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalResolver {
    SystemdResolved,
    Dnsmasq,
    Unbound,
    Nscd,
    Named,
}

impl LocalResolver {
    pub const ALL: [LocalResolver; 5] = [
        LocalResolver::SystemdResolved,
        LocalResolver::Dnsmasq,
        LocalResolver::Unbound,
        LocalResolver::Nscd,
        LocalResolver::Named,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LocalResolver::SystemdResolved => "systemd-resolved",
            LocalResolver::Dnsmasq => "dnsmasq",
            LocalResolver::Unbound => "unbound",
            LocalResolver::Nscd => "nscd",
            LocalResolver::Named => "named",
        }
    }

    /// The resolver an executable path is, by its file name (`/proc/PID/exe`
    /// may end in " (deleted)" after an upgrade).
    pub fn of_executable(path: &str) -> Option<LocalResolver> {
        let file = path.trim_end_matches(" (deleted)").rsplit('/').next()?;
        LocalResolver::ALL.into_iter().find(|r| r.name() == file)
    }
}

/// Queries that reached the guard from each local resolver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StubCounts {
    #[serde(rename = "systemd-resolved")]
    pub systemd_resolved: u64,
    pub dnsmasq: u64,
    pub unbound: u64,
    pub nscd: u64,
    pub named: u64,
}

impl StubCounts {
    fn slot(&mut self, r: LocalResolver) -> &mut u64 {
        match r {
            LocalResolver::SystemdResolved => &mut self.systemd_resolved,
            LocalResolver::Dnsmasq => &mut self.dnsmasq,
            LocalResolver::Unbound => &mut self.unbound,
            LocalResolver::Nscd => &mut self.nscd,
            LocalResolver::Named => &mut self.named,
        }
    }

    pub fn add(&mut self, r: LocalResolver) {
        *self.slot(r) += 1;
    }

    pub fn get(&self, r: LocalResolver) -> u64 {
        match r {
            LocalResolver::SystemdResolved => self.systemd_resolved,
            LocalResolver::Dnsmasq => self.dnsmasq,
            LocalResolver::Unbound => self.unbound,
            LocalResolver::Nscd => self.nscd,
            LocalResolver::Named => self.named,
        }
    }

    pub fn total(&self) -> u64 {
        LocalResolver::ALL.iter().map(|&r| self.get(r)).sum()
    }
}

/// Blocked packets to addresses the guard once allowed, asked again
/// (`dns::revalidate`): by verdict, and the upstream lookups it took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RevalidationCounts {
    pub started: u64,
    pub revalidated: u64,
    pub stale: u64,
    pub limited: u64,
    pub failed: u64,
    pub lookups: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProxyCounts {
    pub connections: u64,
    pub open: u64,
    pub requests: u64,
    pub tunnels: u64,
    pub denied: u64,
    pub upstream_failures: u64,
    pub over_limit: u64,
    pub accept_errors: u64,
    pub allowed_by_rule: BTreeMap<String, u64>,
    /// Hosts only a wildcard allows, handed to the daemon as first asked by
    /// their identity (`[novelty]`; drops count in `loss.proxy_dropped`).
    pub new_hosts: u64,
    /// (identity, host, port) triples the proxy's novelty filter holds.
    pub novelty_filter: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The record reads back what it wrote, and a record from an older
    /// egret (no `reloads`, no guard) still reads.
    #[test]
    fn round_trips_and_reads_older_records() {
        let books = DaemonBooks {
            pid: 7,
            updated_at: "2026-01-01T00:00:00.000Z".into(),
            dns_guard: Some(GuardCounts {
                queries: 3,
                ..Default::default()
            }),
            reloads: 2,
            ..Default::default()
        };
        let text = serde_json::to_string(&books).unwrap();
        assert_eq!(serde_json::from_str::<DaemonBooks>(&text).unwrap(), books);
        let old = r#"{"pid":9,"updated_at":"x","loss":{"kernel_logged":1,"received":1,"seq_lost":0,"unaccounted":0,"while_down":0,"enobufs":0},"open_incidents":0,"attribution":{"cache_hits":0,"deep_lookups":0,"rate_limited":0},"dns_guard":null,"proxy":null}"#;
        let read: DaemonBooks = serde_json::from_str(old).unwrap();
        assert_eq!((read.pid, read.reloads, read.loss.kernel_logged), (9, 0, 1));
    }

    #[test]
    fn local_resolvers_are_known_by_their_executable_only() {
        let of = LocalResolver::of_executable;
        assert_eq!(
            of("/usr/lib/systemd/systemd-resolved"),
            Some(LocalResolver::SystemdResolved)
        );
        assert_eq!(
            of("/usr/sbin/dnsmasq (deleted)"),
            Some(LocalResolver::Dnsmasq)
        );
        assert_eq!(of("/usr/sbin/named"), Some(LocalResolver::Named));
        for other in [
            "/usr/bin/dig",
            "/usr/sbin/dnsmasq-helper",
            "/tmp/x/",
            "",
            "unbound.sh",
        ] {
            assert_eq!(of(other), None, "{other}");
        }
        let mut c = StubCounts::default();
        c.add(LocalResolver::Dnsmasq);
        c.add(LocalResolver::Dnsmasq);
        c.add(LocalResolver::SystemdResolved);
        assert_eq!((c.get(LocalResolver::Dnsmasq), c.total()), (2, 3));
        let json = serde_json::to_value(c).unwrap();
        assert_eq!(json["systemd-resolved"], 1, "{json}");
    }
}
