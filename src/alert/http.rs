//! The HTTP(S) client of the webhook and otlp sinks: one POST per call, from
//! a socket carrying egret's firewall mark. hyper's HTTP/1.1 client (already
//! egret's) on a current-thread runtime owned by the sink's worker; rustls
//! for https.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls;

use crate::policy::HttpTarget;

/// The most of an answer's body that is read (an OTLP partial-success
/// message); the rest is left unread.
const MAX_REPLY_BODY: usize = 64 * 1024;

pub struct HttpClient {
    target: HttpTarget,
    uri: http::Uri,
    mark: u32,
    timeout: Duration,
    tls: Option<tokio_rustls::TlsConnector>,
    rt: tokio::runtime::Runtime,
}

/// What the receiver answered.
pub struct Reply {
    pub status: http::StatusCode,
    pub headers: HeaderMap,
    /// At most [`MAX_REPLY_BODY`] bytes of it; empty if it could not be read.
    pub body: Bytes,
}

impl HttpClient {
    pub fn new(target: &HttpTarget, mark: u32, timeout: Duration) -> Result<HttpClient> {
        let uri: http::Uri = target.url.parse().context("sink url")?;
        let tls = if target.https {
            Some(tokio_rustls::TlsConnector::from(Arc::new(tls_config(
                target.ca_file.as_deref(),
            )?)))
        } else {
            None
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the sink's runtime")?;
        Ok(HttpClient {
            target: target.clone(),
            uri,
            mark,
            timeout,
            tls,
            rt,
        })
    }

    /// For messages: scheme, host and port only (a Slack URL's path is its secret).
    pub fn url_without_secrets(&self) -> String {
        self.target.url_without_secrets()
    }

    /// One POST of `body` with `headers` (and the sink's own), answered
    /// within the sink's timeout.
    pub fn post(&self, headers: &[(HeaderName, HeaderValue)], body: Vec<u8>) -> Result<Reply> {
        let timeout = self.timeout;
        self.rt
            .block_on(async { tokio::time::timeout(timeout, self.exchange(headers, body)).await })
            .map_err(|_| {
                anyhow!(
                    "{} did not answer within {}",
                    self.url_without_secrets(),
                    humantime::format_duration(timeout)
                )
            })?
    }

    async fn exchange(
        &self,
        headers: &[(HeaderName, HeaderValue)],
        body: Vec<u8>,
    ) -> Result<Reply> {
        let host = self
            .target
            .host
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = self.target.port;
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .with_context(|| format!("resolving {host}"))?
                .collect(),
        };
        let tcp = crate::proxy::server::connect_upstream(&addrs, self.mark, self.timeout)
            .await
            .with_context(|| format!("connecting to {host}:{port}"))?;
        let authority = self
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        let path = self.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let mut req = http::Request::post(path)
            .header(http::header::HOST, authority)
            .header(
                http::header::USER_AGENT,
                concat!("egret/", env!("CARGO_PKG_VERSION")),
            );
        for (k, v) in headers {
            req = req.header(k, v);
        }
        for (k, v) in &self.target.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req.body(Full::new(Bytes::from(body)))?;
        match &self.tls {
            Some(tls) => {
                let name = ServerName::try_from(host.to_string())
                    .map_err(|e| anyhow!("{host} is not a TLS server name: {e}"))?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .with_context(|| format!("TLS handshake with {host}"))?;
                send(stream, req).await
            }
            None => send(tcp, req).await,
        }
    }
}

async fn send<S>(io: S, req: http::Request<Full<Bytes>>) -> Result<Reply>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    let driver = tokio::spawn(conn);
    let resp = sender.send_request(req).await.context("sending")?;
    let (parts, body) = resp.into_parts();
    // The answer is already in: a body that cannot be read costs its
    // details (a partial success), not the delivery.
    let body = match Limited::new(body, MAX_REPLY_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    drop(sender);
    driver.abort();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
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

impl HttpTarget {
    /// For messages: scheme, host and port only (a Slack URL's path is its secret).
    pub fn url_without_secrets(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.host, self.port)
    }
}
