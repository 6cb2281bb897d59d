//! Webhook sink: an HTTP(S) POST per alert, from a socket carrying egret's
//! firewall mark. hyper's HTTP/1.1 client (already egret's) on a
//! current-thread runtime owned by the sink's worker; rustls for https.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls;

use super::Deliver;
use crate::monitor::event::ecs::Envelope;
use crate::policy::{Severity, WebhookConfig, WebhookFormat};

pub struct Webhook {
    config: WebhookConfig,
    uri: http::Uri,
    mark: u32,
    timeout: Duration,
    tls: Option<tokio_rustls::TlsConnector>,
    rt: tokio::runtime::Runtime,
}

impl Webhook {
    pub fn new(config: &WebhookConfig, mark: u32, timeout: Duration) -> Result<Webhook> {
        let uri: http::Uri = config.url.parse().context("webhook url")?;
        let tls = if config.https {
            Some(tokio_rustls::TlsConnector::from(Arc::new(tls_config(
                config.ca_file.as_deref(),
            )?)))
        } else {
            None
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the webhook's runtime")?;
        Ok(Webhook {
            config: config.clone(),
            uri,
            mark,
            timeout,
            tls,
            rt,
        })
    }

    async fn post(&self, body: Vec<u8>) -> Result<()> {
        let host = self
            .config
            .host
            .trim_start_matches('[')
            .trim_end_matches(']');
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, self.config.port)],
            Err(_) => tokio::net::lookup_host((host, self.config.port))
                .await
                .with_context(|| format!("resolving {host}"))?
                .collect(),
        };
        let tcp = crate::proxy::server::connect_upstream(&addrs, self.mark, self.timeout)
            .await
            .with_context(|| format!("connecting to {host}:{}", self.config.port))?;
        let authority = self
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        let path = self.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let mut req = http::Request::post(path)
            .header(http::header::HOST, authority)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("egret/", env!("CARGO_PKG_VERSION")),
            );
        for (k, v) in &self.config.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req.body(Full::new(Bytes::from(body)))?;
        let status = match &self.tls {
            Some(tls) => {
                let name = ServerName::try_from(host.to_string())
                    .map_err(|e| anyhow!("{host} is not a TLS server name: {e}"))?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .with_context(|| format!("TLS handshake with {host}"))?;
                exchange(stream, req).await?
            }
            None => exchange(tcp, req).await?,
        };
        if !status.is_success() {
            bail!("{} answered {status}", self.config.url_without_secrets());
        }
        Ok(())
    }
}

async fn exchange<S>(io: S, req: http::Request<Full<Bytes>>) -> Result<http::StatusCode>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    let driver = tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .context("sending the alert")?;
    let status = resp.status();
    drop(resp);
    drop(sender);
    driver.abort();
    Ok(status)
}

/// System roots, or only the PEM certificates in `ca_file`.
fn tls_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("reading ca_file {}", path.display()))?
            {
                let cert = cert.with_context(|| format!("parsing ca_file {}", path.display()))?;
                roots
                    .add(cert)
                    .with_context(|| format!("ca_file {}", path.display()))?;
            }
            if roots.is_empty() {
                bail!("ca_file {} holds no certificate", path.display());
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                bail!("no system CA certificates found (install ca-certificates, or set ca_file)");
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl WebhookConfig {
    /// For messages: scheme, host and port only (a Slack URL's path is its secret).
    pub fn url_without_secrets(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.host, self.port)
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
        let body = match self.config.format {
            WebhookFormat::Json => serde_json::to_vec(doc)?,
            WebhookFormat::Slack => serde_json::to_vec(&json!({ "text": chat_text(doc) }))?,
        };
        let timeout = self.timeout;
        self.rt
            .block_on(async { tokio::time::timeout(timeout, self.post(body)).await })
            .map_err(|_| {
                anyhow!(
                    "{} did not answer within {}",
                    self.config.url_without_secrets(),
                    humantime::format_duration(timeout)
                )
            })?
    }
}
