//! Webhook sink: an HTTP(S) POST per alert ([`super::http`]).

use std::time::Duration;

use anyhow::{bail, Result};
use http::header::{HeaderValue, CONTENT_TYPE};
use serde_json::{json, Value};

use super::http::HttpClient;
use super::Deliver;
use crate::monitor::event::ecs::Envelope;
use crate::policy::{Severity, WebhookConfig, WebhookFormat};

pub struct Webhook {
    format: WebhookFormat,
    client: HttpClient,
}

impl Webhook {
    pub fn new(config: &WebhookConfig, mark: u32, timeout: Duration) -> Result<Webhook> {
        Ok(Webhook {
            format: config.format,
            client: HttpClient::new(&config.http, mark, timeout)?,
        })
    }
}

/// `[egret HIGH] web1: blocked /usr/bin/java (pid 4242, user app) → 192.0.2.7:1389/tcp`
pub fn chat_text(doc: &Value) -> String {
    let e = Envelope::of(doc);
    let severity = e
        .severity
        .map_or("info", Severity::as_str)
        .to_ascii_uppercase();
    let host = e.host.as_deref().unwrap_or("?");
    format!("[egret {severity}] {host}: {}", e.message)
}

impl Deliver for Webhook {
    fn deliver(&mut self, doc: &Value) -> Result<()> {
        let body = match self.format {
            WebhookFormat::Json => serde_json::to_vec(doc)?,
            WebhookFormat::Slack => serde_json::to_vec(&json!({ "text": chat_text(doc) }))?,
        };
        let json = HeaderValue::from_static("application/json");
        let reply = self.client.post(&[(CONTENT_TYPE, json)], body)?;
        if !reply.status.is_success() {
            bail!(
                "{} answered {}",
                self.client.url_without_secrets(),
                reply.status
            );
        }
        Ok(())
    }
}
