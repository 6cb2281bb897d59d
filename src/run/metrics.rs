//! Prometheus metrics of `egret run` (`[metrics] listen`): the pipeline's
//! counts, kept by the daemon, plus the DNS guard's and the proxy's own
//! counters, rendered in the text exposition format. Labels are bounded:
//! actions, attribution methods and the policy's own rule and set names,
//! never addresses, ports or pids.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use hyper::StatusCode;

use crate::alert::SinkStats;
use crate::dns::GuardStats;
use crate::local_http::{full, Access, Handler, Limits, LocalServer};
use crate::monitor::event::LossFigures;
use crate::proxy::ProxyStats;

#[derive(Default)]
struct Counts {
    incidents: BTreeMap<(&'static str, String), u64>,
    attribution: BTreeMap<&'static str, u64>,
    loss: LossFigures,
    open_incidents: u64,
    set_elements: BTreeMap<String, u64>,
}

pub struct Metrics {
    /// Per logged packet: atomics, no lock on the packet path.
    blocked_packets: AtomicU64,
    would_block_packets: AtomicU64,
    /// First-seen packets from the novelty chains, by what the memory said:
    /// new, known, excluded (or undecodable).
    first_seen: [AtomicU64; 3],
    /// New flows the kernel accepted without remembering (a full novelty
    /// set), from the overflow rules' counters.
    novelty_overflow: AtomicU64,
    /// Flows the novelty memory holds (the store's `allowed:` rows).
    novelty_memory: AtomicU64,
    /// New names the guard [0] and the proxy [1] handed over, by what the
    /// store said: new, known, excluded.
    new_names: [[AtomicU64; 3]; 2],
    counts: Mutex<Counts>,
    started: SystemTime,
    pub guard: OnceLock<Arc<GuardStats>>,
    pub proxy: OnceLock<Arc<ProxyStats>>,
    /// The alert sinks' counts, replaced when a reload changes the sinks.
    pub alerts: Mutex<Vec<(String, Arc<SinkStats>)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            blocked_packets: AtomicU64::new(0),
            would_block_packets: AtomicU64::new(0),
            first_seen: Default::default(),
            novelty_overflow: AtomicU64::new(0),
            novelty_memory: AtomicU64::new(0),
            new_names: Default::default(),
            counts: Mutex::new(Counts::default()),
            started: SystemTime::now(),
            guard: OnceLock::new(),
            proxy: OnceLock::new(),
            alerts: Mutex::new(Vec::new()),
        }
    }
}

impl Metrics {
    /// The alert sinks' counts (at start, and when a reload replaces the sinks).
    pub fn set_alerts(&self, stats: Vec<(String, Arc<SinkStats>)>) {
        *self.alerts.lock().unwrap_or_else(|p| p.into_inner()) = stats;
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A logged packet arrived: blocked, or (audit mode) would have been.
    pub fn packet(&self, blocked: bool) {
        let c = if blocked {
            &self.blocked_packets
        } else {
            &self.would_block_packets
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// What the novelty memory said of a first-seen packet.
    pub fn novelty(&self, v: crate::monitor::novelty::Verdict) {
        use crate::monitor::novelty::Verdict;
        let i = match v {
            Verdict::New => 0,
            Verdict::Known => 1,
            Verdict::Excluded => 2,
        };
        self.first_seen[i].fetch_add(1, Ordering::Relaxed);
    }

    /// What the store said of a name the guard (`dns`) or the proxy handed
    /// over as new.
    pub fn new_name(&self, dns: bool, v: crate::monitor::novelty::Verdict) {
        use crate::monitor::novelty::Verdict;
        let i = match v {
            Verdict::New => 0,
            Verdict::Known => 1,
            Verdict::Excluded => 2,
        };
        self.new_names[usize::from(!dns)][i].fetch_add(1, Ordering::Relaxed);
    }

    /// The novelty overflow rules' packet count (read with the log counters).
    pub fn set_novelty_overflow(&self, packets: u64) {
        self.novelty_overflow.store(packets, Ordering::Relaxed);
    }

    /// Flows in the novelty memory.
    pub fn set_novelty_memory(&self, flows: u64) {
        self.novelty_memory.store(flows, Ordering::Relaxed);
    }

    /// An incident was opened.
    pub fn incident(&self, action: &'static str, rule: &str, attribution: &'static str) {
        let mut c = self.counts();
        *c.incidents.entry((action, rule.to_string())).or_default() += 1;
        *c.attribution.entry(attribution).or_default() += 1;
    }

    pub fn books(&self, loss: LossFigures, open_incidents: usize) {
        let mut c = self.counts();
        c.loss = loss;
        c.open_incidents = open_incidents as u64;
    }

    /// Elements per set of the loaded ruleset (host sets as the kernel holds them).
    pub fn set_elements(&self, sizes: BTreeMap<String, u64>) {
        self.counts().set_elements = sizes;
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let c = self.counts();
        let started = self
            .started
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        gauge(
            &mut out,
            "egret_start_time_seconds",
            "When this egret run started (Unix time).",
            &[(String::new(), started)],
        );
        counter(
            &mut out,
            "egret_packets_total",
            "Blocked (or, in audit mode, would-be-blocked) packets received from the kernel, by action.",
            &[
                (labels(&[("action", "blocked")]), self.blocked_packets.load(Ordering::Relaxed) as f64),
                (labels(&[("action", "would-block")]), self.would_block_packets.load(Ordering::Relaxed) as f64),
            ],
        );
        let first_seen = |i: usize| self.first_seen[i].load(Ordering::Relaxed) as f64;
        counter(
            &mut out,
            "egret_first_seen_packets_total",
            "Allowed flows the kernel's novelty filter reported, by what egret's memory said of them.",
            &[
                (labels(&[("outcome", "new")]), first_seen(0)),
                (labels(&[("outcome", "known")]), first_seen(1)),
                (labels(&[("outcome", "excluded")]), first_seen(2)),
            ],
        );
        counter(
            &mut out,
            "egret_novelty_overflow_packets_total",
            "New allowed flows a full novelty set could not remember (accepted, not reported).",
            &[(
                String::new(),
                self.novelty_overflow.load(Ordering::Relaxed) as f64,
            )],
        );
        gauge(
            &mut out,
            "egret_novelty_memory_flows",
            "(identity, destination, port, protocol) tuples the novelty memory holds.",
            &[(
                String::new(),
                self.novelty_memory.load(Ordering::Relaxed) as f64,
            )],
        );
        counter(
            &mut out,
            "egret_incidents_total",
            "Incidents opened (deduplicated events), by action and rule.",
            &c.incidents
                .iter()
                .map(|((a, r), n)| (labels(&[("action", a), ("rule", r)]), *n as f64))
                .collect::<Vec<_>>(),
        );
        counter(
            &mut out,
            "egret_attribution_total",
            "How incidents were attributed to a process.",
            &c.attribution
                .iter()
                .map(|(m, n)| (labels(&[("method", m)]), *n as f64))
                .collect::<Vec<_>>(),
        );
        let l = &c.loss;
        let names = |s: usize, i: usize| self.new_names[s][i].load(Ordering::Relaxed) as f64;
        counter(
            &mut out,
            "egret_new_names_total",
            "Names only a wildcard allows that the DNS guard or the proxy handed over as first asked by their identity, by what egret's memory said of them.",
            &[
                (labels(&[("source", "dns"), ("outcome", "new")]), names(0, 0)),
                (labels(&[("source", "dns"), ("outcome", "known")]), names(0, 1)),
                (labels(&[("source", "dns"), ("outcome", "excluded")]), names(0, 2)),
                (labels(&[("source", "proxy"), ("outcome", "new")]), names(1, 0)),
                (labels(&[("source", "proxy"), ("outcome", "known")]), names(1, 1)),
                (labels(&[("source", "proxy"), ("outcome", "excluded")]), names(1, 2)),
            ],
        );
        counter(
            &mut out,
            "egret_kernel_logged_packets_total",
            "Packets egret's log rules counted in the kernel.",
            &[(String::new(), l.kernel_logged as f64)],
        );
        counter(&mut out, "egret_lost_packets_total", "Logged packets that never reached egret (sequence gaps, buffer overruns, while egret was down).", &[(String::new(), l.packets_lost() as f64)]);
        counter(
            &mut out,
            "egret_dropped_reports_total",
            "Refusals and new names of the DNS guard and the proxy whose report found egret's pipeline full (counted, never an event).",
            &[
                (labels(&[("source", "dns")]), l.dns_dropped as f64),
                (labels(&[("source", "proxy")]), l.proxy_dropped as f64),
            ],
        );
        gauge(
            &mut out,
            "egret_open_incidents",
            "Incidents currently open (still deduplicating).",
            &[(String::new(), c.open_incidents as f64)],
        );
        gauge(
            &mut out,
            "egret_set_elements",
            "Elements in each set of egret's table.",
            &c.set_elements
                .iter()
                .map(|(s, n)| (labels(&[("set", s)]), *n as f64))
                .collect::<Vec<_>>(),
        );
        drop(c);
        self.render_alerts(&mut out);
        if let Some(g) = self.guard.get() {
            let v = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
            counter(
                &mut out,
                "egret_dns_queries_total",
                "Queries the DNS guard received.",
                &[(String::new(), v(&g.queries))],
            );
            counter(
                &mut out,
                "egret_dns_cache_hits_total",
                "Queries answered from the guard's cache.",
                &[(String::new(), v(&g.cache_hits))],
            );
            counter(
                &mut out,
                "egret_dns_forwarded_total",
                "Queries forwarded upstream.",
                &[(String::new(), v(&g.forwarded))],
            );
            counter(
                &mut out,
                "egret_dns_refused_total",
                "Queries for names no rule allows.",
                &[(String::new(), v(&g.refused))],
            );
            counter(
                &mut out,
                "egret_dns_upstream_failures_total",
                "Forwarded queries no upstream answered.",
                &[(String::new(), v(&g.upstream_failures))],
            );
            counter(
                &mut out,
                "egret_dns_set_failures_total",
                "Answers withheld because the kernel sets could not be written.",
                &[(String::new(), v(&g.set_failures))],
            );
            let r = g.revalidation();
            counter(
                &mut out,
                "egret_dns_revalidations_total",
                "Blocked packets to an address the guard once allowed, by the verdict of asking its name again.",
                &[
                    ("revalidated", r.revalidated),
                    ("stale", r.stale),
                    ("limited", r.limited),
                    ("failed", r.failed),
                ]
                .map(|(o, n)| (labels(&[("outcome", o)]), n as f64)),
            );
            counter(
                &mut out,
                "egret_dns_revalidation_lookups_total",
                "Upstream lookups revalidation made (capped; answers are reused for their TTL).",
                &[(String::new(), r.lookups as f64)],
            );
            counter(
                &mut out,
                "egret_dns_new_names_total",
                "Names only a wildcard allows that the guard handed over as first asked by their identity ([novelty]).",
                &[(String::new(), v(&g.names_new))],
            );
            gauge(
                &mut out,
                "egret_dns_novelty_filter_entries",
                "(identity, name) pairs the guard's novelty filter holds (bounded; see docs/dns.md).",
                &[(String::new(), v(&g.names_held))],
            );
            let stubs = g.via_stub();
            counter(
                &mut out,
                "egret_dns_queries_via_local_resolver_total",
                "Attributed queries a local resolver asked for a program the guard cannot see (docs/dns.md).",
                &crate::monitor::books::LocalResolver::ALL
                    .map(|r| (labels(&[("resolver", r.name())]), stubs.get(r) as f64)),
            );
        }
        if let Some(p) = self.proxy.get() {
            let v = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
            counter(
                &mut out,
                "egret_proxy_connections_total",
                "Client connections the proxy accepted.",
                &[(String::new(), v(&p.connections))],
            );
            gauge(
                &mut out,
                "egret_proxy_open_connections",
                "Client connections (and tunnels) open now.",
                &[(String::new(), p.open.load(Ordering::Relaxed) as f64)],
            );
            counter(
                &mut out,
                "egret_proxy_requests_total",
                "Requests the proxy received.",
                &[(String::new(), v(&p.requests))],
            );
            counter(
                &mut out,
                "egret_proxy_tunnels_total",
                "CONNECT tunnels opened.",
                &[(String::new(), v(&p.tunnels))],
            );
            counter(
                &mut out,
                "egret_proxy_denied_total",
                "Requests refused (or, in audit mode, reported) by policy.",
                &[(String::new(), v(&p.denied))],
            );
            counter(
                &mut out,
                "egret_proxy_upstream_failures_total",
                "Requests that failed to reach or resolve the upstream.",
                &[(String::new(), v(&p.upstream_failures))],
            );
            counter(
                &mut out,
                "egret_proxy_over_limit_total",
                "Connections refused by max_connections or max_per_client.",
                &[(String::new(), v(&p.over_limit))],
            );
            counter(
                &mut out,
                "egret_proxy_new_hosts_total",
                "Hosts only a wildcard allows that the proxy handed over as first asked by their identity ([novelty]).",
                &[(String::new(), v(&p.hosts_new))],
            );
            gauge(
                &mut out,
                "egret_proxy_novelty_filter_entries",
                "(identity, host, port) triples the proxy's novelty filter holds (bounded).",
                &[(String::new(), v(&p.hosts_held))],
            );
            let allowed: Vec<(String, f64)> = p
                .allowed_by_rule()
                .into_iter()
                .map(|(r, n)| (labels(&[("rule", &r)]), n as f64))
                .collect();
            counter(
                &mut out,
                "egret_proxy_allowed_total",
                "Requests allowed, by rule.",
                &allowed,
            );
        }
        out
    }
}

impl Metrics {
    fn render_alerts(&self, out: &mut String) {
        let sinks = self.alerts.lock().unwrap_or_else(|p| p.into_inner());
        if sinks.is_empty() {
            return;
        }
        let per_sink = |f: fn(&SinkStats) -> &AtomicU64| -> Vec<(String, f64)> {
            sinks
                .iter()
                .map(|(name, s)| {
                    (
                        labels(&[("sink", name)]),
                        f(s).load(Ordering::Relaxed) as f64,
                    )
                })
                .collect()
        };
        counter(
            out,
            "egret_alerts_delivered_total",
            "Alerts (and digests) an alert sink delivered.",
            &per_sink(|s| &s.delivered),
        );
        counter(
            out,
            "egret_alerts_failed_total",
            "Alerts an alert sink failed to deliver after its retries.",
            &per_sink(|s| &s.failed),
        );
        counter(
            out,
            "egret_alerts_suppressed_total",
            "Alerts held back by a sink's rate limit (counted in its digests).",
            &per_sink(|s| &s.suppressed),
        );
        counter(
            out,
            "egret_alerts_dropped_total",
            "Alerts dropped because a sink's queue was full (it was slow or down).",
            &per_sink(|s| &s.queue_full),
        );
        counter(
            out,
            "egret_alerts_rejected_total",
            "Alerts a receiver refused for good (not retried; also in failed).",
            &per_sink(|s| &s.rejected),
        );
        counter(
            out,
            "egret_alerts_retries_total",
            "Delivery attempts that failed and were tried again.",
            &per_sink(|s| &s.retries),
        );
    }
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        let labels = if labels == "{}" { "" } else { labels.as_str() };
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

fn counter(out: &mut String, name: &str, help: &str, samples: &[(String, f64)]) {
    family(out, name, "counter", help, samples);
}

fn gauge(out: &mut String, name: &str, help: &str, samples: &[(String, f64)]) {
    family(out, name, "gauge", help, samples);
}

/// The `/metrics` endpoint, on its own thread. Everything else is 404.
pub struct MetricsServer(LocalServer);

impl MetricsServer {
    /// Binds (errors surface here) and serves `metrics`.
    pub fn start(
        listen: std::net::SocketAddr,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<MetricsServer> {
        let handler: Handler = Arc::new(move |req| {
            let metrics = Arc::clone(&metrics);
            Box::pin(async move {
                if req.uri().path() == "/metrics" {
                    full(
                        StatusCode::OK,
                        "text/plain; version=0.0.4; charset=utf-8",
                        metrics.render(),
                    )
                } else {
                    full(
                        StatusCode::NOT_FOUND,
                        "text/plain; charset=utf-8",
                        "egret: see /metrics\n",
                    )
                }
            })
        });
        // Counts only, no command lines: any local scraper may read them.
        Ok(MetricsServer(LocalServer::start(
            "metrics",
            listen,
            Limits::new(Access::Anyone),
            handler,
        )?))
    }

    pub fn stop(self) {
        self.0.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_exposition_format_with_bounded_labels() {
        let m = Metrics::default();
        m.packet(true);
        m.packet(true);
        m.incident("blocked", "default", "sock_diag+proc");
        m.incident("dns-refused", "dns-guard", "sock_diag");
        let text = m.render();
        assert!(
            text.contains(
                "# TYPE egret_packets_total counter\negret_packets_total{action=\"blocked\"} 2\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("egret_incidents_total{action=\"dns-refused\",rule=\"dns-guard\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("egret_attribution_total{method=\"sock_diag+proc\"} 1"),
            "{text}"
        );
        assert!(text.contains("egret_lost_packets_total 0"), "{text}");
        assert!(
            text.contains("egret_dropped_reports_total{source=\"dns\"} 0"),
            "{text}"
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            assert!(name.starts_with("egret_"), "{line}");
        }
        assert_eq!(labels(&[("rule", "a\"b")]), "{rule=\"a\\\"b\"}");
    }
}
