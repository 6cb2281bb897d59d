//! `[api]`: egret's local, read-only HTTP API, and the dashboard on top of it.
//! Served by `egret run` on loopback only. Every answer is read from the same
//! places the CLI reads (the event store, the kernel's table, the daemon's
//! books) through the same functions (`report`), so `egret status --json`
//! and `GET /api/v1/status` agree; the live feed is the daemon's own stdout.
//!
//! Endpoints (GET only): `/api/v1/status`, `/api/v1/rules`,
//! `/api/v1/events?since=&limit=&action=&rule=&q=`, `/api/v1/top?by=&since=&limit=&action=`,
//! `/api/v1/timeline?since=`, `/api/v1/stream` (Server-Sent Events), and with
//! `dashboard = true` the page at `/`.

pub mod feed;
pub mod follow;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

pub use feed::LiveFeed;

use crate::kernel::nft::Nftables;
use crate::local_http::{full, Access, Body, Client, Handler, Limits, LocalServer, ServerStats};
use crate::monitor::store::{EventFilter, Store, TopBy};
use crate::policy::ApiConfig;

const JSON: &str = "application/json";
const MAX_LIMIT: usize = 1000;
/// Live feeds open at once; each holds a socket and a small queue.
const MAX_STREAMS: usize = 64;
/// Live feeds one client (uid) may hold, so one user cannot take them all.
const MAX_STREAMS_PER_CLIENT: usize = 8;
/// The longest window the timeline serves, in minutes (a week).
const MAX_TIMELINE_MINUTES: i64 = 7 * 24 * 60;

const DASHBOARD_HTML: &str = include_str!("dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("dashboard/app.js");
const DASHBOARD_CSS: &str = include_str!("dashboard/style.css");

struct Api {
    state_dir: PathBuf,
    feed: LiveFeed,
    dashboard: bool,
    started: SystemTime,
    /// The server's refusals, set once it started.
    server: std::sync::OnceLock<Arc<ServerStats>>,
}

pub struct ApiServer(LocalServer);

impl ApiServer {
    pub fn start(config: &ApiConfig, state_dir: PathBuf, feed: LiveFeed) -> Result<ApiServer> {
        let api = Arc::new(Api {
            state_dir,
            feed,
            dashboard: config.dashboard,
            started: SystemTime::now(),
            server: std::sync::OnceLock::new(),
        });
        let stats_slot = Arc::clone(&api);
        let handler: Handler = Arc::new(move |req| {
            let api = Arc::clone(&api);
            Box::pin(async move { api.route(req).await })
        });
        let limits = Limits::new(Access::RootAndGroup(config.group.clone()));
        if config.group.is_empty()
            || !matches!(nix::unistd::Group::from_name(&config.group), Ok(Some(_)))
        {
            tracing::warn!(
                "API: group {:?} does not exist: only root may use the API (create it, or set `group` in [api])",
                config.group
            );
        }
        let server = LocalServer::start("api", config.listen, limits, handler)?;
        let _ = stats_slot.server.set(Arc::clone(&server.stats));
        Ok(ApiServer(server))
    }

    pub fn stop(self) {
        self.0.stop();
    }
}

/// Why a request was turned away.
struct Refusal(StatusCode, String);

impl Refusal {
    fn bad(msg: impl Into<String>) -> Refusal {
        Refusal(StatusCode::BAD_REQUEST, msg.into())
    }
}

impl Api {
    async fn route(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let mut resp = match self.answer(&req).await {
            Ok(r) => r,
            Err(Refusal(status, msg)) => full(
                status,
                JSON,
                json!({"error": {"status": status.as_u16(), "message": msg}}).to_string(),
            ),
        };
        let h = resp.headers_mut();
        h.insert(
            hyper::header::CACHE_CONTROL,
            hyper::header::HeaderValue::from_static("no-store"),
        );
        h.insert(
            "x-content-type-options",
            hyper::header::HeaderValue::from_static("nosniff"),
        );
        resp
    }

    async fn answer(self: &Arc<Self>, req: &Request<Incoming>) -> Result<Response<Body>, Refusal> {
        // A web page elsewhere could reach a loopback port through DNS
        // rebinding; it cannot make the browser send a loopback Host header.
        if let Some(host) = req.headers().get(hyper::header::HOST) {
            if !loopback_host(host.to_str().unwrap_or("")) {
                return Err(Refusal(
                    StatusCode::FORBIDDEN,
                    "the API answers only requests addressed to a loopback host".into(),
                ));
            }
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return Err(Refusal(
                StatusCode::METHOD_NOT_ALLOWED,
                "the API is read-only".into(),
            ));
        }
        let query = Query::parse(req.uri().query().unwrap_or(""));
        match req.uri().path() {
            "/" | "/index.html" if self.dashboard => Ok(page(
                DASHBOARD_HTML,
                "text/html; charset=utf-8",
                // The page loads only its own script and style and talks only to this API.
                Some("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
            )),
            "/app.js" if self.dashboard => Ok(page(DASHBOARD_JS, "text/javascript; charset=utf-8", None)),
            "/style.css" if self.dashboard => Ok(page(DASHBOARD_CSS, "text/css; charset=utf-8", None)),
            "/" => Err(Refusal(
                StatusCode::NOT_FOUND,
                "the dashboard is off (set `dashboard = true` in [api]); the API is under /api/v1/".into(),
            )),
            "/api/v1/stream" => self.stream(req.extensions().get::<Client>().copied()),
            "/api/v1/status" => self.blocking(move |api| api.status(false)).await,
            "/api/v1/rules" => self.blocking(move |api| api.status(true)).await,
            "/api/v1/events" => {
                let filter = query.event_filter()?;
                self.blocking(move |api| api.events(&filter)).await
            }
            "/api/v1/top" => {
                let (by, since, limit, action) = query.top()?;
                self.blocking(move |api| api.top(by, since, limit, action.as_deref()))
                    .await
            }
            "/api/v1/timeline" => {
                let since = query.since(Duration::from_secs(3600))?;
                self.blocking(move |api| api.timeline(since)).await
            }
            _ => Err(Refusal(StatusCode::NOT_FOUND, "no such endpoint".into())),
        }
    }

    /// Store and netlink reads run on the blocking pool, so a slow disk
    /// never stalls the live feeds.
    async fn blocking(
        self: &Arc<Self>,
        f: impl FnOnce(&Api) -> Result<Value, Refusal> + Send + 'static,
    ) -> Result<Response<Body>, Refusal> {
        let api = Arc::clone(self);
        let value = tokio::task::spawn_blocking(move || f(&api))
            .await
            .map_err(|e| Refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
        Ok(full(StatusCode::OK, JSON, value.to_string()))
    }

    fn stream(&self, client: Option<Client>) -> Result<Response<Body>, Refusal> {
        if self.feed.clients() >= MAX_STREAMS {
            return Err(Refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{MAX_STREAMS} live feeds are open already"),
            ));
        }
        let stream = self
            .feed
            .stream_for(client, MAX_STREAMS_PER_CLIENT)
            .ok_or_else(|| {
                Refusal(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("you have {MAX_STREAMS_PER_CLIENT} live feeds open already"),
                )
            })?;
        let mut resp = Response::new(stream.boxed());
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/event-stream"),
        );
        Ok(resp)
    }

    fn store(&self) -> Result<Option<Store>, Refusal> {
        Store::open_read_only(&self.state_dir).map_err(internal)
    }

    fn status(&self, rules_only: bool) -> Result<Value, Refusal> {
        let mut nft = Nftables::open().map_err(internal)?;
        let comment = nft.table_comment().map_err(internal)?;
        let rules = match comment {
            Some(_) => nft.live_rules().map_err(internal)?.unwrap_or_default(),
            None => Vec::new(),
        };
        let output =
            crate::ruleset::counted_rules(rules.iter().map(|(c, r)| (c.as_str(), r))).into_iter();
        let status =
            crate::report::status_from(comment.as_deref().map(|c| (c, output)), &self.state_dir);
        if rules_only {
            return Ok(json!({ "loaded": status.loaded, "rules": status.rules }));
        }
        let mut v = serde_json::to_value(&status).map_err(internal)?;
        v["api"] = json!({
            "version": env!("CARGO_PKG_VERSION"),
            "host": nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()),
            "started": rfc3339(self.started),
            "now": rfc3339(SystemTime::now()),
            "live_feeds": self.feed.clients(),
            "connections": self.server.get().map(|s| s.snapshot()),
        });
        Ok(v)
    }

    fn events(&self, filter: &EventFilter) -> Result<Value, Refusal> {
        let Some(store) = self.store()? else {
            return Ok(json!({ "events": [] }));
        };
        let rows = store.events(filter).map_err(internal)?;
        let events: Vec<Value> = rows
            .iter()
            .filter_map(|r| serde_json::from_str(&r.doc).ok())
            .collect();
        Ok(json!({ "events": events }))
    }

    fn top(
        &self,
        by: TopBy,
        since: SystemTime,
        limit: usize,
        action: Option<&str>,
    ) -> Result<Value, Refusal> {
        let rows = match self.store()? {
            Some(store) => store.top(by, since, limit, action).map_err(internal)?,
            None => Vec::new(),
        };
        let top: Vec<Value> = rows
            .into_iter()
            .map(|(label, packets, incidents)| {
                json!({ "label": label, "packets": packets, "incidents": incidents })
            })
            .collect();
        Ok(json!({ "top": top }))
    }

    /// Attempts per minute and action, zero-filled from `since` to now.
    fn timeline(&self, since: SystemTime) -> Result<Value, Refusal> {
        let rows = match self.store()? {
            Some(store) => store.timeline(since).map_err(internal)?,
            None => Vec::new(),
        };
        let minute = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64 / 60)
                .unwrap_or(0)
        };
        let end = minute(SystemTime::now());
        let start = minute(since).max(end - MAX_TIMELINE_MINUTES + 1);
        let width = (end - start + 1).max(1) as usize;
        let mut series: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for (m, action, count) in rows {
            let slots = series.entry(action).or_insert_with(|| vec![0; width]);
            if let Some(slot) = usize::try_from(m - start)
                .ok()
                .and_then(|i| slots.get_mut(i))
            {
                *slot += count;
            }
        }
        Ok(json!({ "start": start * 60, "step": 60, "series": series }))
    }
}

fn internal(e: impl std::fmt::Display) -> Refusal {
    Refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn page(
    body: &'static str,
    content_type: &'static str,
    csp: Option<&'static str>,
) -> Response<Body> {
    let mut r = full(StatusCode::OK, content_type, body);
    if let Some(csp) = csp {
        r.headers_mut().insert(
            "content-security-policy",
            hyper::header::HeaderValue::from_static(csp),
        );
    }
    r
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Query parameters, last one wins.
struct Query(BTreeMap<String, String>);

impl Query {
    fn parse(q: &str) -> Query {
        Query(form_urlencoded::parse(q.as_bytes()).into_owned().collect())
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn since(&self, default: Duration) -> Result<SystemTime, Refusal> {
        let d = match self.get("since") {
            None => default,
            Some(s) => humantime::parse_duration(s)
                .map_err(|e| Refusal::bad(format!("since={s:?}: {e} (write e.g. 15m, 1h, 7d)")))?,
        };
        Ok(SystemTime::now().checked_sub(d).unwrap_or(UNIX_EPOCH))
    }

    fn limit(&self, default: usize) -> Result<usize, Refusal> {
        match self.get("limit") {
            None => Ok(default),
            Some(s) => match s.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
                _ => Err(Refusal::bad(format!(
                    "limit={s:?}: expected a number from 1 to {MAX_LIMIT}"
                ))),
            },
        }
    }

    fn event_filter(&self) -> Result<EventFilter, Refusal> {
        Ok(EventFilter {
            since: self.since(Duration::from_secs(24 * 3600))?,
            limit: self.limit(100)?,
            action: self.get("action").map(str::to_string),
            rule: self.get("rule").map(str::to_string),
            text: self.get("q").map(str::to_string),
        })
    }

    /// `by`, `since`, `limit`, and `action` (that action's incidents, e.g.
    /// `allowed-new`, instead of the blocked traffic).
    fn top(&self) -> Result<(TopBy, SystemTime, usize, Option<String>), Refusal> {
        let by = match self.get("by") {
            None | Some("process") => TopBy::Process,
            Some("destination") => TopBy::Destination,
            Some(other) => {
                return Err(Refusal::bad(format!(
                    "by={other:?}: expected process or destination"
                )))
            }
        };
        Ok((
            by,
            self.since(Duration::from_secs(24 * 3600))?,
            self.limit(10)?,
            self.get("action").map(str::to_string),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_pass() {
        for ok in [
            "localhost",
            "localhost:9465",
            "127.0.0.1:9465",
            "127.1.2.3",
            "[::1]:9465",
            "[::1]",
            "LOCALHOST",
        ] {
            assert!(loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:9465",
            "10.0.0.1:9465",
            "[2001:db8::1]:1",
            "",
            "localhost.evil.example",
        ] {
            assert!(!loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn queries_are_checked() {
        let q = Query::parse("since=15m&limit=5&action=blocked&q=curl&rule=");
        let f = q.event_filter().ok().unwrap();
        assert_eq!(
            (f.limit, f.action.as_deref(), f.text.as_deref(), f.rule),
            (5, Some("blocked"), Some("curl"), None)
        );
        assert!(Query::parse("limit=0").event_filter().is_err());
        assert!(Query::parse("limit=5000").event_filter().is_err());
        assert!(Query::parse("since=yesterday").event_filter().is_err());
        assert!(Query::parse("by=pid").top().is_err());
        assert!(matches!(
            Query::parse("by=destination").top(),
            Ok((TopBy::Destination, _, 10, None))
        ));
        assert!(matches!(
            Query::parse("by=process&action=allowed-new").top(),
            Ok((TopBy::Process, _, 10, Some(a))) if a == "allowed-new"
        ));
    }
}
