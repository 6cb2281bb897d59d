//! `[[alerts]]` sinks and `[severity]` rules: their model and validation.
//! Parsed with the rest of the policy, so `egret check` reports a bad URL or
//! facility as `file:line:col` like any other mistake.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::diagnostic::Diagnostic;
use super::parse::duration_field;

/// How urgent an event is. Ordered: `Info < Low < ... < Critical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }

    /// ECS `event.severity`: higher is more urgent.
    pub fn number(self) -> u8 {
        self as u8 + 1
    }

    pub fn from_name(name: &str) -> Option<Severity> {
        [
            Severity::Info,
            Severity::Low,
            Severity::Medium,
            Severity::High,
            Severity::Critical,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }
}

/// `[severity]`: how an incident's severity is decided (docs/alerts.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeverityRules {
    /// Destination ports of classic second stages (LDAP, LDAPS, the
    /// marshalsec LDAP port, RMI): an attempt on one is at least `high`.
    pub second_stage_ports: Vec<u16>,
    /// A destination this identity never tried before.
    pub new_destination: Severity,
    /// A destination this identity tried before.
    pub repeat: Severity,
    /// A floor per event action, e.g. `dns-refused = "high"`.
    pub actions: BTreeMap<String, Severity>,
}

pub const DEFAULT_SECOND_STAGE_PORTS: &[u16] = &[389, 636, 1099, 1389];

impl Default for SeverityRules {
    fn default() -> Self {
        SeverityRules {
            second_stage_ports: DEFAULT_SECOND_STAGE_PORTS.to_vec(),
            new_destination: Severity::High,
            repeat: Severity::Low,
            actions: BTreeMap::from([
                ("dns-refused".to_string(), Severity::High),
                ("flood".to_string(), Severity::High),
            ]),
        }
    }
}

/// Every `event.action` egret emits: what a sink's `actions` may name.
pub const ACTIONS: &[&str] = &[
    "blocked",
    "would-block",
    "dns-refused",
    "dns-would-refuse",
    "proxy-denied",
    "dns-revalidated",
    "allowed-new",
    "name-new",
    "proxy-new",
    "flood",
    "preexisting",
    "tamper",
    "data-loss",
    "heartbeat",
    "nflog-taken",
    "alert-failed",
    "alert-digest",
];

/// One `[[alerts]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertSink {
    pub name: String,
    pub kind: SinkKind,
    /// Events below this severity are not sent.
    pub min_severity: Severity,
    /// Only these actions are sent; empty: all.
    pub actions: Vec<String>,
    /// At most this many alerts per `rate_window`; then one digest.
    pub rate_limit: u32,
    pub rate_window: Duration,
    /// Further attempts after a failed delivery, `backoff` apart, doubling.
    pub retries: u32,
    pub backoff: Duration,
    /// One attempt (connect, send, answer; or the hook's run) may take this long.
    pub timeout: Duration,
}

impl AlertSink {
    pub const DEFAULT_RATE_LIMIT: u32 = 20;
    pub const DEFAULT_RATE_WINDOW: Duration = Duration::from_secs(60);
    pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(1);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
    /// An otlp sink is a log export: every event, no rate limit unless set.
    pub const UNLIMITED: u32 = u32::MAX;

    /// The address egret's ruleset must let this sink's marked socket reach,
    /// when the configuration pins one (a webhook URL with an IP address, a
    /// remote syslog collector). A webhook host name is resolved at delivery
    /// and needs an allow rule like any other destination.
    pub fn pinned_destination(&self) -> Option<(SocketAddr, u8)> {
        const TCP: u8 = 6;
        const UDP: u8 = 17;
        match &self.kind {
            SinkKind::Webhook(WebhookConfig { http, .. })
            | SinkKind::Otlp(OtlpConfig { http, .. }) => http
                .host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .ok()
                .map(|ip| (SocketAddr::new(ip, http.port), TCP)),
            SinkKind::Syslog(s) => match s.target {
                SyslogTarget::Udp(a) => Some((a, UDP)),
                SyslogTarget::Tcp(a) => Some((a, TCP)),
                SyslogTarget::Unix(_) => None,
            },
            SinkKind::Exec(_) => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkKind {
    Webhook(WebhookConfig),
    Syslog(SyslogConfig),
    Exec(ExecConfig),
    Otlp(OtlpConfig),
}

impl SinkKind {
    pub fn name(&self) -> &'static str {
        match self {
            SinkKind::Webhook(_) => "webhook",
            SinkKind::Syslog(_) => "syslog",
            SinkKind::Exec(_) => "exec",
            SinkKind::Otlp(_) => "otlp",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    /// The ECS document as the JSON body.
    Json,
    /// `{"text": "..."}`: Slack and Mattermost incoming webhooks.
    Slack,
}

/// Where an HTTP(S) sink (webhook, otlp) posts, and whom it trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    /// The URL requests go to.
    pub url: String,
    pub https: bool,
    /// As written in the URL (a name, an IPv4 address or a bracketed IPv6 one).
    pub host: String,
    pub port: u16,
    /// Trust only the certificates in this PEM file (instead of the system's).
    pub ca_file: Option<PathBuf>,
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    pub http: HttpTarget,
    pub format: WebhookFormat,
}

/// OpenTelemetry logs over HTTP/protobuf (OTLP), batched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpConfig {
    /// `url` is the endpoint with `/v1/logs` appended.
    pub http: HttpTarget,
    pub gzip: bool,
    /// At most this many log records per request.
    pub batch_size: usize,
    /// A record waits at most this long for others to share its request.
    pub batch_delay: Duration,
}

impl OtlpConfig {
    pub const DEFAULT_BATCH_SIZE: usize = 512;
    pub const MAX_BATCH_SIZE: usize = 8192;
    pub const DEFAULT_BATCH_DELAY: Duration = Duration::from_secs(1);
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyslogConfig {
    pub target: SyslogTarget,
    /// RFC 5424 facility number (0-23).
    pub facility: u8,
    pub app_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyslogTarget {
    /// The local syslog daemon's datagram socket (`/dev/log`).
    Unix(PathBuf),
    Udp(SocketAddr),
    /// Octet-counted frames (RFC 6587) on one kept-open connection.
    Tcp(SocketAddr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecConfig {
    /// Program (absolute path) and arguments; the event arrives on stdin.
    pub command: Vec<String>,
}

/// RFC 5424 facility names (section 6.2.1) and their numbers.
const FACILITIES: &[(&str, u8)] = &[
    ("kern", 0),
    ("user", 1),
    ("mail", 2),
    ("daemon", 3),
    ("auth", 4),
    ("syslog", 5),
    ("lpr", 6),
    ("news", 7),
    ("uucp", 8),
    ("cron", 9),
    ("authpriv", 10),
    ("ftp", 11),
    ("ntp", 12),
    ("security", 13),
    ("console", 14),
    ("local0", 16),
    ("local1", 17),
    ("local2", 18),
    ("local3", 19),
    ("local4", 20),
    ("local5", 21),
    ("local6", 22),
    ("local7", 23),
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSeverity {
    second_stage_ports: Option<Vec<Spanned<i64>>>,
    new_destination: Option<Spanned<String>>,
    repeat: Option<Spanned<String>>,
    actions: Option<BTreeMap<String, Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAlert {
    name: Spanned<String>,
    #[serde(rename = "type")]
    kind: Spanned<String>,
    min_severity: Option<Spanned<String>>,
    actions: Option<Vec<Spanned<String>>>,
    rate_limit: Option<Spanned<i64>>,
    rate_window: Option<Spanned<String>>,
    retries: Option<Spanned<i64>>,
    backoff: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    // webhook
    url: Option<Spanned<String>>,
    format: Option<Spanned<WebhookFormat>>,
    ca_file: Option<Spanned<String>>,
    headers: Option<Spanned<BTreeMap<String, String>>>,
    // otlp (with ca_file and headers)
    endpoint: Option<Spanned<String>>,
    compression: Option<Spanned<String>>,
    batch_size: Option<Spanned<i64>>,
    batch_delay: Option<Spanned<String>>,
    // syslog
    target: Option<Spanned<String>>,
    facility: Option<Spanned<String>>,
    app_name: Option<Spanned<String>>,
    // exec
    command: Option<Spanned<Vec<String>>>,
}

struct Errors<'a> {
    path: &'a Path,
    source: &'a str,
    out: &'a mut Vec<Diagnostic>,
}

impl Errors<'_> {
    fn at(&mut self, span: Range<usize>, msg: impl Into<String>, hint: &str) {
        self.out
            .push(Diagnostic::at(self.path, self.source, Some(span), msg).with_hint(hint));
    }

    fn severity(&mut self, v: &Spanned<String>) -> Option<Severity> {
        let s = Severity::from_name(v.get_ref());
        if s.is_none() {
            self.at(
                v.span(),
                format!("unknown severity {:?}", v.get_ref()),
                "one of \"info\", \"low\", \"medium\", \"high\", \"critical\"",
            );
        }
        s
    }

    fn duration(&mut self, v: &Option<Spanned<String>>, default: Duration) -> Duration {
        duration_field(v, default, false).unwrap_or_else(|(span, msg)| {
            self.at(span, msg, "write a duration such as \"5s\" or \"1m\"");
            default
        })
    }
}

pub(super) fn severity_rules(
    path: &Path,
    source: &str,
    raw: &RawSeverity,
    errors: &mut Vec<Diagnostic>,
) -> SeverityRules {
    let mut e = Errors {
        path,
        source,
        out: errors,
    };
    let mut rules = SeverityRules::default();
    if let Some(ports) = &raw.second_stage_ports {
        rules.second_stage_ports.clear();
        for p in ports {
            match u16::try_from(*p.get_ref()) {
                Ok(n) if n > 0 => rules.second_stage_ports.push(n),
                _ => e.at(
                    p.span(),
                    format!("port {} is out of range", p.get_ref()),
                    "a port is a number from 1 to 65535",
                ),
            }
        }
    }
    if let Some(s) = raw.new_destination.as_ref().and_then(|v| e.severity(v)) {
        rules.new_destination = s;
    }
    if let Some(s) = raw.repeat.as_ref().and_then(|v| e.severity(v)) {
        rules.repeat = s;
    }
    if let Some(actions) = &raw.actions {
        rules.actions.clear();
        for (action, sev) in actions {
            if !ACTIONS.contains(&action.as_str()) {
                e.at(
                    sev.span(),
                    format!("unknown action {action:?}"),
                    &format!("actions are {}", ACTIONS.join(", ")),
                );
            } else if let Some(s) = e.severity(sev) {
                rules.actions.insert(action.clone(), s);
            }
        }
    }
    rules
}

pub(super) fn alert_sinks(
    path: &Path,
    source: &str,
    raw: &[RawAlert],
    errors: &mut Vec<Diagnostic>,
) -> Vec<AlertSink> {
    let mut e = Errors {
        path,
        source,
        out: errors,
    };
    let mut sinks: Vec<AlertSink> = Vec::new();
    for r in raw {
        let name = r.name.get_ref().clone();
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !name_ok {
            e.at(
                r.name.span(),
                format!("invalid sink name {name:?}"),
                "letters, digits, '-', '_' and '.', up to 64 characters (it is a metrics label)",
            );
        } else if sinks.iter().any(|s| s.name == name) {
            e.at(
                r.name.span(),
                format!("a sink named {name:?} is already defined"),
                "give each [[alerts]] entry its own name",
            );
        }
        if let Some(kind) = sink_kind(&mut e, r) {
            let count = |e: &mut Errors, v: &Option<Spanned<i64>>, default: u32, min: i64| match v {
                None => default,
                Some(n) => match u32::try_from(*n.get_ref()) {
                    Ok(v) if i64::from(v) >= min => v,
                    _ => {
                        e.at(
                            n.span(),
                            format!("{} is out of range", n.get_ref()),
                            &format!("a count from {min} up"),
                        );
                        default
                    }
                },
            };
            let default_retries = match kind {
                SinkKind::Exec(_) => 0,
                // A log export rides out a collector's restart.
                SinkKind::Otlp(_) => 4,
                _ => 2,
            };
            let default_rate_limit = match kind {
                SinkKind::Otlp(_) => AlertSink::UNLIMITED,
                _ => AlertSink::DEFAULT_RATE_LIMIT,
            };
            let mut actions = Vec::new();
            for a in r.actions.iter().flatten() {
                if ACTIONS.contains(&a.get_ref().as_str()) {
                    actions.push(a.get_ref().clone());
                } else {
                    e.at(
                        a.span(),
                        format!("unknown action {:?}", a.get_ref()),
                        &format!("actions are {}", ACTIONS.join(", ")),
                    );
                }
            }
            sinks.push(AlertSink {
                name,
                min_severity: r
                    .min_severity
                    .as_ref()
                    .and_then(|v| e.severity(v))
                    .unwrap_or(Severity::Info),
                actions,
                rate_limit: count(&mut e, &r.rate_limit, default_rate_limit, 1),
                rate_window: e.duration(&r.rate_window, AlertSink::DEFAULT_RATE_WINDOW),
                retries: count(&mut e, &r.retries, default_retries, 0),
                backoff: e.duration(&r.backoff, AlertSink::DEFAULT_BACKOFF),
                timeout: e.duration(&r.timeout, AlertSink::DEFAULT_TIMEOUT),
                kind,
            });
        }
    }
    sinks
}

fn sink_kind(e: &mut Errors, r: &RawAlert) -> Option<SinkKind> {
    let kind = r.kind.get_ref().as_str();
    // Keys that belong to another kind of sink are mistakes, not noise.
    let foreign: Vec<(&str, Option<Range<usize>>)> = vec![
        ("url", r.url.as_ref().map(|v| v.span())),
        ("format", r.format.as_ref().map(|v| v.span())),
        ("ca_file", r.ca_file.as_ref().map(|v| v.span())),
        ("headers", r.headers.as_ref().map(|v| v.span())),
        ("endpoint", r.endpoint.as_ref().map(|v| v.span())),
        ("compression", r.compression.as_ref().map(|v| v.span())),
        ("batch_size", r.batch_size.as_ref().map(|v| v.span())),
        ("batch_delay", r.batch_delay.as_ref().map(|v| v.span())),
        ("target", r.target.as_ref().map(|v| v.span())),
        ("facility", r.facility.as_ref().map(|v| v.span())),
        ("app_name", r.app_name.as_ref().map(|v| v.span())),
        ("command", r.command.as_ref().map(|v| v.span())),
    ];
    let own: &[&str] = match kind {
        "webhook" => &["url", "format", "ca_file", "headers"],
        "syslog" => &["target", "facility", "app_name"],
        "exec" => &["command"],
        "otlp" => &[
            "endpoint",
            "ca_file",
            "headers",
            "compression",
            "batch_size",
            "batch_delay",
        ],
        _ => {
            e.at(
                r.kind.span(),
                format!("unknown sink type {kind:?}"),
                "type is \"webhook\", \"syslog\", \"exec\" or \"otlp\"",
            );
            return None;
        }
    };
    for (key, span) in foreign {
        if let (false, Some(span)) = (own.contains(&key), span) {
            e.at(
                span,
                format!("{key} does not apply to a {kind} sink"),
                &format!("a {kind} sink takes {}", own.join(", ")),
            );
        }
    }
    match kind {
        "webhook" => webhook(e, r).map(SinkKind::Webhook),
        "syslog" => syslog(e, r).map(SinkKind::Syslog),
        "otlp" => otlp(e, r).map(SinkKind::Otlp),
        _ => exec(e, r).map(SinkKind::Exec),
    }
}

fn webhook(e: &mut Errors, r: &RawAlert) -> Option<WebhookConfig> {
    let Some(url) = &r.url else {
        e.at(
            r.kind.span(),
            "a webhook sink needs a url",
            "add url = \"https://hooks.example.org/egret\"",
        );
        return None;
    };
    let hint =
        "write an http or https URL such as \"https://hooks.slack.com/services/T000/B000/XXXX\"";
    let (http, _) = http_target(e, r, url, hint)?;
    Some(WebhookConfig {
        http,
        format: r
            .format
            .as_ref()
            .map(|f| *f.get_ref())
            .unwrap_or(WebhookFormat::Json),
    })
}

fn otlp(e: &mut Errors, r: &RawAlert) -> Option<OtlpConfig> {
    let Some(endpoint) = &r.endpoint else {
        e.at(
            r.kind.span(),
            "an otlp sink needs an endpoint",
            "add endpoint = \"http://192.0.2.10:4318\" (the collector's OTLP/HTTP receiver)",
        );
        return None;
    };
    let hint = "write the collector's OTLP/HTTP base URL, such as \"https://otel.example.org:4318\" (egret posts to its /v1/logs)";
    let (mut http, uri) = http_target(e, r, endpoint, hint)?;
    if uri.query().is_some() {
        e.at(
            endpoint.span(),
            format!("{:?} has a query", endpoint.get_ref()),
            hint,
        );
        return None;
    }
    // The OTLP/HTTP base endpoint: the signal's path is appended to it.
    let scheme = if http.https { "https" } else { "http" };
    let base = uri.path().trim_end_matches('/');
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    http.url = format!("{scheme}://{authority}{base}/v1/logs");
    let gzip = match r.compression.as_ref().map(|c| c.get_ref().as_str()) {
        None | Some("gzip") => true,
        Some("none") => false,
        Some(other) => {
            let span = r.compression.as_ref().map(|c| c.span()).unwrap_or_default();
            e.at(
                span,
                format!("unknown compression {other:?}"),
                "\"gzip\" (the default) or \"none\"",
            );
            return None;
        }
    };
    let batch_size = match &r.batch_size {
        None => OtlpConfig::DEFAULT_BATCH_SIZE,
        Some(n) => match usize::try_from(*n.get_ref()) {
            Ok(v) if (1..=OtlpConfig::MAX_BATCH_SIZE).contains(&v) => v,
            _ => {
                e.at(
                    n.span(),
                    format!("batch_size {} is out of range", n.get_ref()),
                    &format!("from 1 to {} log records", OtlpConfig::MAX_BATCH_SIZE),
                );
                return None;
            }
        },
    };
    Some(OtlpConfig {
        http,
        gzip,
        batch_size,
        batch_delay: e.duration(&r.batch_delay, OtlpConfig::DEFAULT_BATCH_DELAY),
    })
}

/// The URL, TLS and headers of an HTTP(S) sink, checked the same way for
/// every kind; also the parsed URL for what is particular to the kind.
fn http_target(
    e: &mut Errors,
    r: &RawAlert,
    url: &Spanned<String>,
    hint: &str,
) -> Option<(HttpTarget, http::Uri)> {
    let uri: http::Uri = match url.get_ref().parse() {
        Ok(u) => u,
        Err(err) => {
            e.at(
                url.span(),
                format!("invalid URL {:?}: {err}", url.get_ref()),
                hint,
            );
            return None;
        }
    };
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            e.at(
                url.span(),
                format!("{:?} is not an http or https URL", url.get_ref()),
                hint,
            );
            return None;
        }
    };
    let Some(authority) = uri.authority() else {
        e.at(url.span(), format!("{:?} has no host", url.get_ref()), hint);
        return None;
    };
    if authority.as_str().contains('@') {
        e.at(
            url.span(),
            "credentials in the URL are not supported",
            "put a token in headers = { Authorization = \"Bearer ...\" }",
        );
        return None;
    }
    let ca_file = r.ca_file.as_ref().map(|c| PathBuf::from(c.get_ref()));
    if let (Some(c), false) = (&r.ca_file, https) {
        e.at(
            c.span(),
            "ca_file needs an https URL",
            "use https:// or remove ca_file",
        );
    }
    if let Some(c) = &r.ca_file {
        if !Path::new(c.get_ref()).is_absolute() {
            e.at(
                c.span(),
                format!("ca_file {:?} is not an absolute path", c.get_ref()),
                "write the full path of a PEM file, e.g. \"/etc/egret/ca.pem\"",
            );
        }
    }
    let mut headers = Vec::new();
    if let Some(h) = &r.headers {
        for (k, v) in h.get_ref() {
            let ok = http::HeaderName::from_bytes(k.as_bytes()).is_ok()
                && http::HeaderValue::from_str(v).is_ok();
            if ok {
                headers.push((k.clone(), v.clone()));
            } else {
                e.at(
                    h.span(),
                    format!("invalid HTTP header {k:?}"),
                    "header names are tokens such as Authorization; values are visible ASCII",
                );
            }
        }
    }
    let target = HttpTarget {
        url: url.get_ref().clone(),
        https,
        host: authority.host().to_string(),
        port: authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
        ca_file,
        headers,
    };
    Some((target, uri))
}

fn syslog(e: &mut Errors, r: &RawAlert) -> Option<SyslogConfig> {
    let hint = "write \"unix:///dev/log\", \"udp://192.0.2.10:514\" or \"tcp://192.0.2.10:601\"";
    let target = match &r.target {
        None => SyslogTarget::Unix(PathBuf::from("/dev/log")),
        Some(t) => {
            let text = t.get_ref().trim();
            let parsed = if let Some(p) = text.strip_prefix("unix://") {
                Path::new(p)
                    .is_absolute()
                    .then(|| SyslogTarget::Unix(PathBuf::from(p)))
            } else if let Some(a) = text.strip_prefix("udp://") {
                socket_addr(a, 514).map(SyslogTarget::Udp)
            } else if let Some(a) = text.strip_prefix("tcp://") {
                socket_addr(a, 601).map(SyslogTarget::Tcp)
            } else {
                None
            };
            match parsed {
                Some(p) => p,
                None => {
                    e.at(t.span(), format!("invalid syslog target {text:?}"), hint);
                    return None;
                }
            }
        }
    };
    let facility = match &r.facility {
        None => 4,
        Some(f) => match FACILITIES.iter().find(|(n, _)| n == f.get_ref()) {
            Some((_, n)) => *n,
            None => {
                e.at(
                    f.span(),
                    format!("unknown syslog facility {:?}", f.get_ref()),
                    "one of auth, authpriv, daemon, security, user, local0 ... local7 (RFC 5424 6.2.1)",
                );
                return None;
            }
        },
    };
    let app_name = match &r.app_name {
        None => "egret".to_string(),
        Some(a) => {
            let name = a.get_ref();
            // RFC 5424 APP-NAME: 1*48PRINTUSASCII
            if name.is_empty() || name.len() > 48 || !name.bytes().all(|b| (33..=126).contains(&b))
            {
                e.at(
                    a.span(),
                    format!("invalid app_name {name:?}"),
                    "1 to 48 printable ASCII characters without spaces",
                );
                return None;
            }
            name.clone()
        }
    };
    Some(SyslogConfig {
        target,
        facility,
        app_name,
    })
}

fn exec(e: &mut Errors, r: &RawAlert) -> Option<ExecConfig> {
    let Some(command) = &r.command else {
        e.at(
            r.kind.span(),
            "an exec sink needs a command",
            "add command = [\"/usr/local/bin/notify\", \"--from-egret\"]",
        );
        return None;
    };
    match command.get_ref().first() {
        Some(p) if Path::new(p).is_absolute() => Some(ExecConfig {
            command: command.get_ref().clone(),
        }),
        _ => {
            e.at(
                command.span(),
                "the command's program must be an absolute path",
                "write the full path first: command = [\"/usr/local/bin/notify\", \"--json\"]",
            );
            None
        }
    }
}

/// `192.0.2.10`, `192.0.2.10:514`, `[2001:db8::10]:514`.
fn socket_addr(text: &str, default_port: u16) -> Option<SocketAddr> {
    text.parse::<SocketAddr>().ok().or_else(|| {
        text.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, default_port))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{parse_str, Policy, PolicyErrors};

    fn parse(text: &str) -> Result<Policy, PolicyErrors> {
        parse_str(
            text,
            Path::new("/etc/egret/policy.toml"),
            &crate::policy::NoAccounts,
        )
    }

    fn first_error(text: &str) -> Diagnostic {
        parse(text).expect_err("invalid").0.remove(0)
    }

    #[test]
    fn the_three_kinds_of_sink_and_severity_rules_parse() {
        let p = parse(
            r#"
[severity]
second_stage_ports = [389, 1389, 4444]
repeat = "info"
actions = { "proxy-denied" = "medium" }

[[alerts]]
name = "slack"
type = "webhook"
url = "https://hooks.slack.com/services/T0/B0/XX"
format = "slack"
min_severity = "high"
actions = ["blocked", "dns-refused", "tamper"]
rate_limit = 5
rate_window = "30s"

[[alerts]]
name = "siem"
type = "syslog"
target = "tcp://[2001:db8::10]"
facility = "local3"

[[alerts]]
name = "hook"
type = "exec"
command = ["/usr/local/bin/page", "--json"]
timeout = "2s"
"#,
        )
        .unwrap();
        assert_eq!(p.severity.second_stage_ports, vec![389, 1389, 4444]);
        assert_eq!(p.severity.repeat, Severity::Info);
        assert_eq!(p.severity.new_destination, Severity::High);
        assert_eq!(
            p.severity.actions.get("proxy-denied"),
            Some(&Severity::Medium)
        );
        assert_eq!(p.severity.actions.get("dns-refused"), None);
        let [slack, siem, hook] = &p.alerts[..] else {
            panic!("three sinks")
        };
        let SinkKind::Webhook(w) = &slack.kind else {
            panic!()
        };
        assert!(w.http.https);
        assert_eq!(
            (w.http.host.as_str(), w.http.port),
            ("hooks.slack.com", 443)
        );
        assert_eq!(w.format, WebhookFormat::Slack);
        assert_eq!(slack.min_severity, Severity::High);
        assert_eq!(
            (slack.rate_limit, slack.rate_window),
            (5, Duration::from_secs(30))
        );
        assert_eq!(slack.retries, 2);
        assert_eq!(slack.pinned_destination(), None, "a name is not pinned");
        assert_eq!(
            siem.kind,
            SinkKind::Syslog(SyslogConfig {
                target: SyslogTarget::Tcp("[2001:db8::10]:601".parse().unwrap()),
                facility: 19,
                app_name: "egret".into()
            })
        );
        assert_eq!(
            siem.pinned_destination(),
            Some(("[2001:db8::10]:601".parse().unwrap(), 6))
        );
        assert_eq!(hook.retries, 0);
        assert_eq!(hook.timeout, Duration::from_secs(2));
        assert_eq!(hook.min_severity, Severity::Info);
    }

    #[test]
    fn webhook_with_an_address_is_pinned() {
        let p = parse(
            "[[alerts]]\nname = \"w\"\ntype = \"webhook\"\nurl = \"http://10.1.0.2:8080/hook\"\n",
        )
        .unwrap();
        assert_eq!(
            p.alerts[0].pinned_destination(),
            Some(("10.1.0.2:8080".parse().unwrap(), 6))
        );
    }

    #[test]
    fn an_otlp_sink_posts_to_its_endpoints_logs_path_with_export_defaults() {
        let p = parse(
            "[[alerts]]\nname = \"otel\"\ntype = \"otlp\"\nendpoint = \"http://192.0.2.10:4318/\"\n\n[[alerts]]\nname = \"gw\"\ntype = \"otlp\"\nendpoint = \"https://otel.example.org/ingest\"\nca_file = \"/etc/egret/ca.pem\"\ncompression = \"none\"\nbatch_size = 100\nbatch_delay = \"250ms\"\nrate_limit = 1000\n",
        )
        .unwrap();
        let [otel, gw] = &p.alerts[..] else {
            panic!("two sinks")
        };
        let SinkKind::Otlp(o) = &otel.kind else {
            panic!()
        };
        assert_eq!(o.http.url, "http://192.0.2.10:4318/v1/logs");
        assert!(o.gzip);
        assert_eq!((o.batch_size, o.batch_delay), (512, Duration::from_secs(1)));
        assert_eq!(otel.rate_limit, AlertSink::UNLIMITED, "a log export");
        assert_eq!(otel.retries, 4);
        assert_eq!(
            otel.pinned_destination(),
            Some(("192.0.2.10:4318".parse().unwrap(), 6))
        );
        let SinkKind::Otlp(o) = &gw.kind else {
            panic!()
        };
        assert_eq!(o.http.url, "https://otel.example.org/ingest/v1/logs");
        assert_eq!((o.http.port, o.gzip, o.batch_size), (443, false, 100));
        assert_eq!(o.batch_delay, Duration::from_millis(250));
        assert_eq!(gw.rate_limit, 1000);
        assert_eq!(gw.pinned_destination(), None, "a name is not pinned");
    }

    #[test]
    fn mistakes_name_line_column_and_a_fix() {
        let cases = [
            ("type = \"pager\"", 3, "unknown sink type"),
            (
                "type = \"webhook\"\nurl = \"ftp://x/\"",
                4,
                "not an http or https URL",
            ),
            (
                "type = \"webhook\"\nurl = \"http://u:p@x/\"",
                4,
                "credentials",
            ),
            ("type = \"webhook\"", 3, "needs a url"),
            ("type = \"otlp\"", 3, "needs an endpoint"),
            (
                "type = \"otlp\"\nendpoint = \"http://x:4318/?a=b\"",
                4,
                "has a query",
            ),
            (
                "type = \"otlp\"\nendpoint = \"http://x:4318\"\ncompression = \"zstd\"",
                5,
                "unknown compression",
            ),
            (
                "type = \"otlp\"\nendpoint = \"http://x:4318\"\nbatch_size = 0",
                5,
                "out of range",
            ),
            (
                "type = \"otlp\"\nendpoint = \"http://x:4318\"\nurl = \"http://x/\"",
                5,
                "does not apply",
            ),
            (
                "type = \"syslog\"\nfacility = \"loca0\"",
                4,
                "unknown syslog facility",
            ),
            (
                "type = \"syslog\"\ntarget = \"udp://host:514\"",
                4,
                "invalid syslog target",
            ),
            (
                "type = \"exec\"\ncommand = [\"notify\"]",
                4,
                "absolute path",
            ),
            (
                "type = \"exec\"\ncommand = [\"/bin/true\"]\nurl = \"http://x/\"",
                5,
                "does not apply",
            ),
            (
                "type = \"exec\"\ncommand = [\"/bin/true\"]\nmin_severity = \"urgent\"",
                5,
                "unknown severity",
            ),
            (
                "type = \"exec\"\ncommand = [\"/bin/true\"]\nactions = [\"block\"]",
                5,
                "unknown action",
            ),
            (
                "type = \"exec\"\ncommand = [\"/bin/true\"]\nrate_limit = 0",
                5,
                "out of range",
            ),
            (
                "type = \"exec\"\ncommand = [\"/bin/true\"]\nbackoff = \"soon\"",
                5,
                "invalid duration",
            ),
        ];
        for (body, line, what) in cases {
            let d = first_error(&format!("[[alerts]]\nname = \"x\"\n{body}\n"));
            assert_eq!(d.line, line, "{body}: {d}");
            assert!(d.message.contains(what), "{body}: {d}");
            assert!(d.hint.is_some(), "{body}");
        }
        let d = first_error("[severity]\nrepeat = \"loud\"\n");
        assert_eq!((d.line, d.column), (2, 10));
        let d = first_error(
            "[[alerts]]\nname = \"a\"\ntype = \"exec\"\ncommand = [\"/bin/true\"]\nbogus = 1\n",
        );
        assert!(d.message.contains("unknown field"), "{d}");
        let d = first_error("[[alerts]]\nname = \"a\"\ntype = \"exec\"\ncommand = [\"/bin/true\"]\n[[alerts]]\nname = \"a\"\ntype = \"exec\"\ncommand = [\"/bin/true\"]\n");
        assert!(d.message.contains("already defined"), "{d}");
    }
}
