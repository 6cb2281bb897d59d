//! The services `egret run` starts beside the monitor and stops with it: the
//! DNS guard, the egress proxy (both feed the loop), the API and the metrics
//! endpoint (both read what the loop keeps).

use std::path::Path;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use tracing::info;

use super::metrics::{Metrics, MetricsServer};
use super::Input;
use crate::alert::SinkStats;
use crate::api::{ApiServer, LiveFeed};
use crate::dns::{Guard, GuardConfig, RecentNames};
use crate::monitor::flood::{hand_over, Dropped};
use crate::policy::Policy;
use crate::proxy::{Proxy, ProxyState};

pub(super) struct Services {
    pub guard: Option<Guard>,
    pub proxy: Option<Proxy>,
    pub metrics_server: Option<MetricsServer>,
    pub api_server: Option<ApiServer>,
    /// What the metrics endpoint serves; the loop writes it.
    pub metrics: Arc<Metrics>,
    /// Every document the loop prints, for the API's stream.
    pub feed: LiveFeed,
    /// Names the guard resolved, by address: they enrich blocked packets.
    pub recent: Arc<Mutex<RecentNames>>,
    /// Reports of the guard and the proxy that found the loop's queue full.
    pub dropped: Arc<Dropped>,
    /// With the guard: where its revalidation verdicts go.
    pub loop_tx: Option<SyncSender<Input>>,
}

impl Services {
    /// Binds every port before the caller loads a ruleset, so a port in use
    /// fails the start with nothing changed in the kernel.
    pub fn start(
        policy: &Policy,
        state_dir: &Path,
        tx: &SyncSender<Input>,
        alert_stats: Vec<(String, Arc<SinkStats>)>,
    ) -> Result<Services> {
        let dropped = Arc::new(Dropped::default());
        let recent = Arc::new(Mutex::new(RecentNames::default()));
        let guard = match GuardConfig::from_policy(policy) {
            Some(gc) => {
                let (tx, dropped) = (tx.clone(), Arc::clone(&dropped));
                let (names_tx, names_dropped) = (tx.clone(), Arc::clone(&dropped));
                let guard = Guard::start(
                    gc,
                    Arc::clone(&recent),
                    Box::new(move |q| {
                        // A full pipeline drops the report (counted), never the answer.
                        hand_over(&tx, Input::Query(Box::new(q)), &dropped.dns);
                    }),
                    Box::new(move |n| {
                        hand_over(&names_tx, Input::Name(Box::new(n)), &names_dropped.dns);
                    }),
                )?;
                info!(listen = %guard.listen(), "DNS guard listening");
                Some(guard)
            }
            None => None,
        };
        let metrics = Arc::new(Metrics::default());
        let metrics_server = match policy.metrics {
            Some(listen) => {
                let server = MetricsServer::start(listen, Arc::clone(&metrics))?;
                info!(%listen, "metrics on http://{listen}/metrics");
                Some(server)
            }
            None => None,
        };
        if let Some(g) = &guard {
            let _ = metrics.guard.set(Arc::clone(&g.stats));
        }
        metrics.set_alerts(alert_stats);
        let feed = LiveFeed::default();
        let api_server = match &policy.api {
            Some(api) => {
                let server = ApiServer::start(api, state_dir.to_path_buf(), feed.clone())?;
                if api.dashboard {
                    info!(listen = %api.listen, "dashboard on http://{}/", api.listen);
                } else {
                    info!(listen = %api.listen, "API on http://{}/api/v1/", api.listen);
                }
                Some(server)
            }
            None => None,
        };
        let proxy = match ProxyState::from_policy(policy) {
            Some(state) => {
                let (tx, dropped) = (tx.clone(), Arc::clone(&dropped));
                let (hosts_tx, hosts_dropped) = (tx.clone(), Arc::clone(&dropped));
                let proxy = Proxy::start(
                    state,
                    Box::new(move |d| {
                        hand_over(&tx, Input::Proxy(Box::new(d)), &dropped.proxy);
                    }),
                    Box::new(move |n| {
                        hand_over(&hosts_tx, Input::Name(Box::new(n)), &hosts_dropped.proxy);
                    }),
                )?;
                info!(listen = %proxy.listen(), "proxy listening");
                let _ = metrics.proxy.set(Arc::clone(&proxy.stats));
                Some(proxy)
            }
            None => None,
        };
        Ok(Services {
            loop_tx: guard.as_ref().map(|_| tx.clone()),
            guard,
            proxy,
            metrics_server,
            api_server,
            metrics,
            feed,
            recent,
            dropped,
        })
    }

    /// Stops the DNS guard and the proxy (their reports are inputs).
    pub fn stop_inputs(&mut self) {
        self.loop_tx = None;
        if let Some(g) = self.guard.take() {
            g.stop();
        }
        if let Some(p) = self.proxy.take() {
            p.stop();
        }
    }

    pub fn stop(&mut self) {
        self.stop_inputs();
        if let Some(m) = self.metrics_server.take() {
            m.stop();
        }
        if let Some(a) = self.api_server.take() {
            a.stop();
        }
    }
}
