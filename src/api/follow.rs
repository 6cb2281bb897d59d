//! `egret events --follow`: the CLI side of the live feed. Subscribes to the
//! running daemon's `/api/v1/stream` first, then prints the stored events,
//! then the pushed ones, so nothing falls between the two.

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use serde_json::Value;

use crate::monitor::event::ecs::Envelope;
use crate::monitor::store::EventFilter;

/// Follows the feed until the daemon goes away (an error) or stdout closes.
pub fn follow(
    api: SocketAddr,
    filter: &EventFilter,
    stored: impl FnOnce() -> Result<u8>,
    as_json: bool,
) -> Result<u8> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?;
    runtime.block_on(async move {
        let hint = "is `egret run` running with an [api] section in its policy? (--api names another address)";
        let stream = tokio::net::TcpStream::connect(api)
            .await
            .with_context(|| format!("connecting to the API at {api}: {hint}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::get("/api/v1/stream")
            .header(hyper::header::HOST, api.to_string())
            .header(hyper::header::ACCEPT, "text/event-stream")
            .body(Empty::<Bytes>::new())?;
        let mut resp = sender
            .send_request(req)
            .await
            .with_context(|| format!("asking {api} for its live feed: {hint}"))?;
        if !resp.status().is_success() {
            let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            bail!("{api} answered {}: {}", resp_status_text(&body), String::from_utf8_lossy(&body).trim());
        }
        let code = stored()?;
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = resp.body_mut().frame().await {
            let frame = frame.context("reading the live feed")?;
            let Some(data) = frame.data_ref() else { continue };
            pending.extend_from_slice(data);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let Some(json) = line.strip_prefix(b"data: ") else { continue };
                let Ok(doc) = serde_json::from_slice::<Value>(json) else { continue };
                if selected(&doc, filter) {
                    crate::report::print_event_line(&doc, as_json);
                }
            }
        }
        eprintln!("egret: the live feed ended (egret run stopped)");
        Ok(code)
    })
}

fn resp_status_text(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/status").and_then(Value::as_u64))
        .map(|s| format!("HTTP {s}"))
        .unwrap_or_else(|| "an error".into())
}

/// The filter's action, rule and text (in the message) applied to a pushed event.
fn selected(doc: &Value, filter: &EventFilter) -> bool {
    let e = Envelope::of(doc);
    filter
        .action
        .as_deref()
        .map_or(true, |a| a == e.action_name())
        && filter.rule.as_deref().map_or(true, |r| r == e.rule)
        && filter.text.as_deref().map_or(true, |t| {
            e.message.to_lowercase().contains(&t.to_lowercase())
        })
}
