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
}
