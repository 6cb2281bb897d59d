//! otlp sink: events as OpenTelemetry log records, batched, posted as
//! OTLP/HTTP protobuf (`ExportLogsServiceRequest`) to `<endpoint>/v1/logs`
//! with [`super::http`]'s client (gzip unless `compression = "none"`).
//! The message types are the OpenTelemetry project's own generated ones
//! (`opentelemetry-proto`), encoded by prost.
//!
//! Retries follow the OTLP/HTTP specification: 429, 502, 503 and 504 are
//! retried (after `Retry-After` when the receiver gives one), any other
//! answer but 2xx is final; a partial success counts its refused records.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use flate2::write::GzEncoder;
use http::header::{HeaderName, HeaderValue, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER};
use http::StatusCode;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{
    any_value, AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use serde_json::Value;

use super::http::{HttpClient, Reply};
use super::{Batching, Deliver, Refusal, Refused};
use crate::monitor::event::ecs::{flat_fields, Envelope};
use crate::policy::{OtlpConfig, Severity};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A partial success's message is the receiver's text: cut to this.
const MAX_REASON: usize = 512;

pub struct Otlp {
    client: HttpClient,
    gzip: bool,
    batching: Batching,
    host: String,
}

impl Otlp {
    pub fn new(config: &OtlpConfig, mark: u32, timeout: Duration, host: &str) -> Result<Otlp> {
        Ok(Otlp {
            client: HttpClient::new(&config.http, mark, timeout)?,
            gzip: config.gzip,
            batching: Batching {
                max: config.batch_size,
                delay: config.batch_delay,
            },
            host: host.to_string(),
        })
    }

    fn export<'a>(&self, docs: impl Iterator<Item = &'a Value>) -> Result<Option<Refused>> {
        let request = request(docs, &self.host, SystemTime::now());
        let mut body = request.encode_to_vec();
        if self.gzip {
            let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
            gz.write_all(&body).context("compressing")?;
            body = gz.finish().context("compressing")?;
        }
        let headers = content_headers(self.gzip);
        let reply = self.client.post(&headers, body)?;
        self.outcome(&reply)
    }

    fn outcome(&self, reply: &Reply) -> Result<Option<Refused>> {
        let status = reply.status;
        if status.is_success() {
            // The body may be empty or not protobuf (a proxy's answer):
            // the request was accepted either way.
            let partial = ExportLogsServiceResponse::decode(reply.body.as_ref())
                .ok()
                .and_then(|r| r.partial_success);
            return Ok(partial.map(|p| Refused {
                count: u64::try_from(p.rejected_log_records).unwrap_or(0),
                why: crate::text::printable(crate::text::bounded(&p.error_message, MAX_REASON).0)
                    .into_owned(),
            }));
        }
        let why = format!("{} answered {status}", self.client.url_without_secrets());
        let retryable = matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS
                | StatusCode::BAD_GATEWAY
                | StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::GATEWAY_TIMEOUT
        );
        if !retryable {
            return Err(Refusal::Final(why).into());
        }
        match retry_after(reply, SystemTime::now()) {
            Some(wait) => Err(Refusal::After { why, wait }.into()),
            None => Err(anyhow::anyhow!(why)),
        }
    }
}

impl Deliver for Otlp {
    fn deliver(&mut self, doc: &Value) -> Result<()> {
        self.export(std::iter::once(doc)).map(|_| ())
    }

    fn batching(&self) -> Batching {
        self.batching
    }

    fn deliver_batch(&mut self, docs: &[Arc<Value>]) -> Result<Option<Refused>> {
        self.export(docs.iter().map(|d| &**d))
    }
}

/// `Retry-After`: seconds or an HTTP date (RFC 9110 10.2.3).
fn retry_after(reply: &Reply, now: SystemTime) -> Option<Duration> {
    let v = reply.headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    match v.parse::<u64>() {
        Ok(secs) => Some(Duration::from_secs(secs)),
        Err(_) => httpdate::parse_http_date(v)
            .ok()
            .map(|t| t.duration_since(now).unwrap_or_default()),
    }
}

/// egret's severity as an OpenTelemetry severity number, in step with the
/// syslog sink's mapping (critical → crit, high → err, medium → warning,
/// low → notice, info → info) and the log data model's syslog table.
pub fn severity_number(s: Severity) -> SeverityNumber {
    match s {
        Severity::Info => SeverityNumber::Info,
        Severity::Low => SeverityNumber::Info2,
        Severity::Medium => SeverityNumber::Warn,
        Severity::High => SeverityNumber::Error,
        Severity::Critical => SeverityNumber::Fatal,
    }
}

fn string(s: &str) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(s.to_string())),
    }
}

fn key_value(key: &str, value: AnyValue) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(value),
        ..Default::default()
    }
}

/// A JSON value as an OTLP value, with its type: integers stay integers,
/// arrays arrays, objects (inside arrays) key-value lists.
fn any_value(v: &Value) -> AnyValue {
    let value = match v {
        Value::String(s) => any_value::Value::StringValue(s.clone()),
        Value::Bool(b) => any_value::Value::BoolValue(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => any_value::Value::IntValue(i),
            // Past i64 (a u64 counter): its exact digits.
            _ if n.is_u64() => any_value::Value::StringValue(n.to_string()),
            (None, Some(f)) => any_value::Value::DoubleValue(f),
            (None, None) => any_value::Value::StringValue(n.to_string()),
        },
        Value::Array(a) => any_value::Value::ArrayValue(ArrayValue {
            values: a.iter().map(any_value).collect(),
        }),
        Value::Object(m) => any_value::Value::KvlistValue(KeyValueList {
            values: m
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| key_value(k, any_value(v)))
                .collect(),
        }),
        Value::Null => return AnyValue { value: None },
    };
    AnyValue { value: Some(value) }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// One log record: the event's time, egret's severity, the one-line
/// message as the body, every other ECS field as a dotted attribute.
pub fn log_record(doc: &Value, observed: SystemTime) -> LogRecord {
    let envelope = Envelope::of(doc);
    // Unknown (0) if the document's time does not parse.
    let time = envelope
        .timestamp
        .as_deref()
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        .map_or(0, unix_nanos);
    let severity = envelope.severity.unwrap_or(Severity::Info);
    LogRecord {
        time_unix_nano: time,
        observed_time_unix_nano: unix_nanos(observed),
        severity_number: severity_number(severity) as i32,
        severity_text: severity.as_str().to_string(),
        body: Some(string(&envelope.message)),
        attributes: flat_fields(doc)
            .into_iter()
            .map(|(k, v)| key_value(&k, any_value(v)))
            .collect(),
        ..Default::default()
    }
}

/// The request for `docs`: one resource (this host, egret and its
/// version), one scope, a record per document.
pub fn request<'a>(
    docs: impl Iterator<Item = &'a Value>,
    host: &str,
    observed: SystemTime,
) -> ExportLogsServiceRequest {
    let resource = Resource {
        attributes: vec![
            key_value("host.name", string(host)),
            key_value("service.name", string("egret")),
            key_value("service.version", string(VERSION)),
        ],
        ..Default::default()
    };
    let scope = InstrumentationScope {
        name: "egret".to_string(),
        version: VERSION.to_string(),
        ..Default::default()
    };
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(resource),
            scope_logs: vec![ScopeLogs {
                scope: Some(scope),
                log_records: docs.map(|d| log_record(d, observed)).collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn content_headers(gzip: bool) -> Vec<(HeaderName, HeaderValue)> {
    let mut h = vec![(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-protobuf"),
    )];
    if gzip {
        h.push((CONTENT_ENCODING, HeaderValue::from_static("gzip")));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_document_becomes_a_typed_record() {
        let doc = json!({
            "@timestamp": "2026-11-28T03:32:01.488Z",
            "message": "blocked /usr/bin/java → 192.0.2.7:1389/tcp",
            "event": {"action": "blocked", "severity": 4, "type": ["connection", "denied"]},
            "destination": {"ip": "192.0.2.7", "port": 1389},
            "egret": {"severity": "high", "update": false,
                      "alert": {"by": [{"action": "blocked", "count": 7}]}},
        });
        let observed = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let r = log_record(&doc, observed);
        assert_eq!(r.time_unix_nano, 1_795_836_721_488_000_000);
        assert_eq!(r.observed_time_unix_nano, 1_800_000_000_000_000_000);
        assert_eq!(r.severity_number, SeverityNumber::Error as i32);
        assert_eq!(r.severity_text, "high");
        assert_eq!(
            r.body,
            Some(string("blocked /usr/bin/java → 192.0.2.7:1389/tcp"))
        );
        let attr = |k: &str| {
            r.attributes
                .iter()
                .find(|a| a.key == k)
                .and_then(|a| a.value.clone())
                .and_then(|v| v.value)
        };
        assert_eq!(
            attr("destination.port"),
            Some(any_value::Value::IntValue(1389))
        );
        assert_eq!(
            attr("destination.ip"),
            Some(any_value::Value::StringValue("192.0.2.7".into()))
        );
        assert_eq!(
            attr("egret.update"),
            Some(any_value::Value::BoolValue(false))
        );
        let Some(any_value::Value::ArrayValue(types)) = attr("event.type") else {
            panic!("event.type is an array")
        };
        assert_eq!(types.values, vec![string("connection"), string("denied")]);
        let Some(any_value::Value::ArrayValue(by)) = attr("egret.alert.by") else {
            panic!("an array of objects")
        };
        assert!(matches!(
            by.values[0].value,
            Some(any_value::Value::KvlistValue(_))
        ));
        assert_eq!(attr("message"), None, "the body, not an attribute");
        assert_eq!(attr("@timestamp"), None);
    }

    #[test]
    fn the_request_names_the_host_and_egret_and_round_trips() {
        let doc = json!({"@timestamp": "bad", "message": "m"});
        let req = request([&doc].into_iter(), "web1", UNIX_EPOCH);
        let decoded = ExportLogsServiceRequest::decode(req.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, req);
        let rl = &decoded.resource_logs[0];
        let attrs: Vec<(&str, &AnyValue)> = rl
            .resource
            .as_ref()
            .unwrap()
            .attributes
            .iter()
            .map(|a| (a.key.as_str(), a.value.as_ref().unwrap()))
            .collect();
        assert_eq!(
            attrs,
            vec![
                ("host.name", &string("web1")),
                ("service.name", &string("egret")),
                ("service.version", &string(VERSION)),
            ]
        );
        let record = &rl.scope_logs[0].log_records[0];
        assert_eq!(record.time_unix_nano, 0, "an unreadable time is unknown");
        assert_eq!(record.severity_number, SeverityNumber::Info as i32);
    }

    #[test]
    fn severities_map_in_order() {
        let all = [
            Severity::Info,
            Severity::Low,
            Severity::Medium,
            Severity::High,
            Severity::Critical,
        ];
        let numbers: Vec<i32> = all.iter().map(|s| severity_number(*s) as i32).collect();
        assert_eq!(numbers, vec![9, 10, 13, 17, 21]);
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let reply = |v: &str| Reply {
            status: StatusCode::SERVICE_UNAVAILABLE,
            headers: [(RETRY_AFTER, HeaderValue::from_str(v).unwrap())]
                .into_iter()
                .collect(),
            body: Default::default(),
        };
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(retry_after(&reply("3"), now), Some(Duration::from_secs(3)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(7));
        assert_eq!(
            retry_after(&reply(&later), now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(retry_after(&reply("soon"), now), None);
    }
}
