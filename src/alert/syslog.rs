//! Syslog sink: RFC 5424 messages with the event's main fields as
//! structured data, to the local socket, or to a collector over UDP (one
//! message per datagram, RFC 5426) or TCP (octet counting, RFC 6587). Remote
//! sockets carry egret's firewall mark, which the `syslog` crates cannot set.

use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use super::Deliver;
use crate::dns::upstream::set_mark;
use crate::policy::{Severity, SyslogConfig, SyslogTarget};

/// The private enterprise number RFC 5612 reserves for documentation: the
/// SD-ID `egret@32473` is not registered, as RFC 5424 7.2.2 allows.
pub const SD_ID: &str = "egret@32473";

/// ECS field → SD-PARAM name.
const PARAMS: &[(&str, &str)] = &[
    ("/event/action", "action"),
    ("/egret/severity", "severity"),
    ("/event/id", "id"),
    ("/rule/name", "rule"),
    ("/process/pid", "pid"),
    ("/process/executable", "executable"),
    ("/user/name", "user"),
    ("/egret/unit", "unit"),
    ("/container/id", "container"),
    ("/source/ip", "src"),
    ("/destination/ip", "dst"),
    ("/destination/port", "dport"),
    ("/network/transport", "transport"),
    ("/destination/domain", "domain"),
    ("/dns/question/name", "query"),
    ("/egret/count", "count"),
    ("/egret/alert/sink", "sink"),
    ("/egret/alert/suppressed", "suppressed"),
];

/// RFC 5424 severity (0 emergency ... 7 debug) for an egret severity.
fn syslog_severity(s: Severity) -> u8 {
    match s {
        Severity::Critical => 2,
        Severity::High => 3,
        Severity::Medium => 4,
        Severity::Low => 5,
        Severity::Info => 6,
    }
}

/// PARAM-VALUE escaping (RFC 5424 6.3.3): `"`, `\` and `]`.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// HOSTNAME, APP-NAME, PROCID, MSGID: 1*N printable US-ASCII, else "-".
fn header_field(v: &str, max: usize) -> String {
    let v: String = v
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if v.is_empty() {
        "-".into()
    } else {
        v
    }
}

pub fn format(doc: &Value, facility: u8, app_name: &str) -> String {
    let severity = crate::monitor::event::severity_of(doc).unwrap_or(Severity::Info);
    let pri = u16::from(facility) * 8 + u16::from(syslog_severity(severity));
    let text = |p: &str| match doc.pointer(p) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::Bool(b)) => Some(b.to_string()),
        _ => None,
    };
    let timestamp = text("/@timestamp").unwrap_or_else(|| "-".into());
    let host = header_field(&text("/host/hostname").unwrap_or_default(), 255);
    let msgid = header_field(&text("/event/action").unwrap_or_default(), 32);
    let mut sd = format!("[{SD_ID}");
    for (pointer, name) in PARAMS {
        if let Some(v) = text(pointer) {
            sd.push_str(&format!(" {name}=\"{}\"", escape(&v)));
        }
    }
    sd.push(']');
    let message = text("/message").unwrap_or_default();
    format!(
        "<{pri}>1 {timestamp} {host} {} {} {msgid} {sd} \u{feff}{message}",
        header_field(app_name, 48),
        std::process::id()
    )
}

pub struct Syslog {
    config: SyslogConfig,
    mark: u32,
    timeout: Duration,
    tcp: Option<TcpStream>,
}

impl Syslog {
    pub fn new(config: &SyslogConfig, mark: u32, timeout: Duration) -> Syslog {
        Syslog {
            config: config.clone(),
            mark,
            timeout,
            tcp: None,
        }
    }

    fn tcp(&mut self, addr: SocketAddr) -> Result<&mut TcpStream> {
        if self.tcp.is_none() {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            set_mark(socket.as_raw_fd(), self.mark).context("marking the syslog socket")?;
            socket
                .connect_timeout(&addr.into(), self.timeout)
                .with_context(|| format!("connecting to syslog collector {addr}"))?;
            let stream: TcpStream = socket.into();
            stream.set_write_timeout(Some(self.timeout))?;
            self.tcp = Some(stream);
        }
        self.tcp.as_mut().context("no connection")
    }
}

impl Deliver for Syslog {
    fn deliver(&mut self, doc: &Value) -> Result<()> {
        let msg = format(doc, self.config.facility, &self.config.app_name);
        match self.config.target.clone() {
            SyslogTarget::Unix(path) => {
                let s = UnixDatagram::unbound()?;
                s.send_to(msg.as_bytes(), &path)
                    .with_context(|| format!("sending to {}", path.display()))?;
            }
            SyslogTarget::Udp(addr) => {
                let bind: SocketAddr = if addr.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                }
                .parse()?;
                let s = UdpSocket::bind(bind)?;
                set_mark(s.as_raw_fd(), self.mark).context("marking the syslog socket")?;
                s.send_to(msg.as_bytes(), addr)
                    .with_context(|| format!("sending to syslog collector {addr}"))?;
            }
            SyslogTarget::Tcp(addr) => {
                let frame = format!("{} {msg}", msg.len());
                let r = self
                    .tcp(addr)
                    .and_then(|s| Ok(s.write_all(frame.as_bytes())?));
                if r.is_err() {
                    // The next attempt reconnects.
                    self.tcp = None;
                }
                r.with_context(|| format!("sending to syslog collector {addr}"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc5424_header_and_escaped_structured_data() {
        let doc = serde_json::json!({
            "@timestamp": "2026-11-25T03:48:38.287Z",
            "message": "blocked /usr/bin/java → 10.66.0.2:1389/tcp",
            "event": {"action": "blocked", "severity": 4},
            "host": {"hostname": "web 1"},
            "rule": {"name": "a]\"b\\"},
            "destination": {"ip": "10.66.0.2", "port": 1389},
            "egret": {"severity": "high"},
        });
        let m = format(&doc, 4, "egret");
        let pid = std::process::id();
        assert_eq!(
            m,
            format!("<35>1 2026-11-25T03:48:38.287Z web1 egret {pid} blocked [egret@32473 action=\"blocked\" severity=\"high\" rule=\"a\\]\\\"b\\\\\" dst=\"10.66.0.2\" dport=\"1389\"] \u{feff}blocked /usr/bin/java → 10.66.0.2:1389/tcp")
        );
    }

    /// The message back, by RFC 5424's grammar: header fields, the SD
    /// element's params (unescaped), the MSG after the BOM.
    struct Parsed<'a> {
        header: Vec<&'a str>,
        params: Vec<(String, String)>,
        msg: &'a str,
    }

    fn parse(m: &str) -> Option<Parsed<'_>> {
        let mut rest = m;
        let mut header = Vec::new();
        for _ in 0..6 {
            let (field, r) = rest.split_once(' ')?;
            if field.is_empty() || !field.chars().all(|c| c.is_ascii_graphic()) {
                return None;
            }
            header.push(field);
            rest = r;
        }
        let body = rest.strip_prefix('[')?;
        let id_end = body.find([' ', ']'])?;
        if &body[..id_end] != SD_ID {
            return None;
        }
        let mut params = Vec::new();
        let mut i = id_end;
        loop {
            match body[i..].chars().next()? {
                ']' => {
                    i += 1;
                    break;
                }
                ' ' => {
                    let eq = body[i + 1..].find('=')? + i + 1;
                    let name = &body[i + 1..eq];
                    if name.is_empty()
                        || !name
                            .chars()
                            .all(|c| c.is_ascii_graphic() && !"=]\" ".contains(c))
                    {
                        return None;
                    }
                    if !body[eq + 1..].starts_with('"') {
                        return None;
                    }
                    let mut value = String::new();
                    let mut escaped = false;
                    let mut end = None;
                    for (j, c) in body[eq + 2..].char_indices() {
                        match (escaped, c) {
                            (false, '\\') => escaped = true,
                            (false, '"') => {
                                end = Some(eq + 2 + j + 1);
                                break;
                            }
                            (false, ']') => return None,
                            (_, c) => {
                                escaped = false;
                                value.push(c);
                            }
                        }
                    }
                    params.push((name.to_string(), value));
                    i = end?;
                }
                _ => return None,
            }
        }
        let msg = body[i..].strip_prefix(" \u{feff}")?;
        Some(Parsed {
            header,
            params,
            msg,
        })
    }

    proptest::proptest! {
        /// Whatever a blocked process or a DNS name puts in an event, the
        /// message stays one valid RFC 5424 record with the same values.
        #[test]
        fn any_field_values_round_trip_through_the_grammar(
            rule in "\\PC*", domain in "\\PC*", exe in ".*", message in ".*", host in ".*"
        ) {
            let doc = serde_json::json!({
                "@timestamp": "2026-11-25T03:48:38.287Z",
                "message": message,
                "event": {"action": "blocked"},
                "host": {"hostname": host},
                "rule": {"name": rule},
                "process": {"executable": exe},
                "destination": {"domain": domain},
            });
            let m = format(&doc, 4, "egret");
            let Parsed { header, params, msg } =
                parse(&m).unwrap_or_else(|| panic!("not RFC 5424: {m:?}"));
            proptest::prop_assert_eq!(header.len(), 6);
            proptest::prop_assert_eq!(msg, message.as_str());
            let get = |n: &str| params.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
            proptest::prop_assert_eq!(get("rule"), Some(rule));
            proptest::prop_assert_eq!(get("domain"), Some(domain));
            proptest::prop_assert_eq!(get("executable"), Some(exe));
        }
    }
}
