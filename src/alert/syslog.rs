//! Syslog sink. To a collector over UDP (one message per datagram, RFC 5426)
//! or TCP (octet counting, RFC 6587): RFC 5424 with the event's main fields as
//! structured data. On the local socket (`/dev/log`): the format syslog(3)
//! writes, which is what rsyslog's imuxsock and journald parse there (neither
//! parses RFC 5424 on that socket), with the same fields as a trailing CEE
//! JSON object. Remote sockets carry egret's firewall mark, which the `syslog`
//! crates cannot set.
//!
//! Every field and the message are written with their control characters
//! escaped: a CR or LF in an executable name must never start a second,
//! forged record at a relay that splits on lines.

use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use serde_json::Value;

use super::Deliver;
use crate::dns::upstream::set_mark;
use crate::monitor::event::ecs::{sink_fields, Envelope};
use crate::policy::{Severity, SyslogConfig, SyslogTarget};

/// The private enterprise number RFC 5612 reserves for documentation: the
/// SD-ID `egret@32473` is not registered, as RFC 5424 7.2.2 allows.
pub const SD_ID: &str = "egret@32473";

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

/// Characters that must not reach a log line raw: C0 and C1 controls, DEL
/// (`char::is_control`), and the Unicode line and paragraph separators.
fn is_unsafe(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

/// `v` with each unsafe character written as `\xNN` (or `\u{NNNN}`): a
/// visible, one-line form. The exact value stays in the stored event.
pub fn escape_controls(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            c if is_unsafe(c) && (c as u32) < 0x100 => {
                out.push_str(&std::format!("\\x{:02x}", c as u32))
            }
            c if is_unsafe(c) => out.push_str(&std::format!("\\u{{{:04x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// PARAM-VALUE escaping (RFC 5424 6.3.3): `"`, `\` and `]`; control
/// characters in their escaped form, itself behind an escaped backslash so
/// every parser reads the same `\xNN` text.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if is_unsafe(c) {
            out.push('\\');
            out.push_str(&escape_controls(c.encode_utf8(&mut [0; 4])));
            continue;
        }
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The fields as one JSON object whose text has no unsafe character:
/// serde_json escapes C0 controls, this escapes DEL, C1 and U+2028/9 (which
/// can only occur inside JSON strings, where `\uNNNN` is valid).
fn cee_json(fields: serde_json::Map<String, Value>) -> String {
    let text = Value::Object(fields).to_string();
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if is_unsafe(c) {
            out.push_str(&std::format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
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

fn pri(doc: &Envelope, facility: u8) -> u16 {
    let severity = doc.severity.unwrap_or(Severity::Info);
    u16::from(facility) * 8 + u16::from(syslog_severity(severity))
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The cookie before the JSON fields of a local record (CEE, as rsyslog's
/// mmjsonparse and other log shippers know it).
pub const CEE_COOKIE: &str = "@cee: ";

/// What syslog(3) sends to `/dev/log`: `<PRI>Mmm dd hh:mm:ss TAG[PID]: MSG`
/// (RFC 3164 layout, local time, no host name), which rsyslog's imuxsock
/// and journald take apart into facility, severity, program name (journald's
/// `SYSLOG_IDENTIFIER`) and pid. MSG is the one-line human message followed
/// by ` @cee: {JSON}` with the same fields RFC 5424 records carry as
/// structured data, so a local rsyslog can still extract them (see
/// docs/alerts.md). The cookie is escaped inside the human message, so the
/// first ` @cee: ` is always egret's own.
pub fn format_local(doc: &Value, facility: u8, app_name: &str, now: SystemTime) -> String {
    let tag: String = header_field(app_name, 32)
        .chars()
        .filter(|c| !matches!(c, '[' | ']' | ':'))
        .collect();
    let tag = if tag.is_empty() { "egret".into() } else { tag };
    let fields: serde_json::Map<String, Value> = sink_fields(doc)
        .map(|(name, v)| (name.to_string(), v.clone()))
        .collect();
    let envelope = Envelope::of(doc);
    let message = escape_controls(&envelope.message).replace(CEE_COOKIE.trim_end(), "@cee\\x3a");
    std::format!(
        "<{}>{} {tag}[{}]: {message} {CEE_COOKIE}{}",
        pri(&envelope, facility),
        bsd_timestamp(now),
        std::process::id(),
        cee_json(fields)
    )
}

/// "Dec  1 21:05:03" in local time, as syslog(3) writes it.
fn bsd_timestamp(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let secs = libc::time_t::try_from(secs).unwrap_or(libc::time_t::MAX);
    // SAFETY: localtime_r writes into the tm we own and reads only `secs`.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&secs, &mut tm) }.is_null() {
        return "Jan  1 00:00:00".into();
    }
    let month = usize::try_from(tm.tm_mon).unwrap_or(0).min(11);
    std::format!(
        "{} {:>2} {:02}:{:02}:{:02}",
        MONTHS[month],
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// An RFC 5424 record, for collectors over the network.
pub fn format(doc: &Value, facility: u8, app_name: &str) -> String {
    let envelope = Envelope::of(doc);
    let timestamp = envelope.timestamp.as_deref().unwrap_or("-");
    let host = header_field(envelope.host.as_deref().unwrap_or_default(), 255);
    let msgid = header_field(envelope.action_name(), 32);
    let mut sd = format!("[{SD_ID}");
    for (name, v) in sink_fields(doc) {
        if let Some(v) = text(v) {
            sd.push_str(&std::format!(" {name}=\"{}\"", escape(&v)));
        }
    }
    sd.push(']');
    let message = escape_controls(&envelope.message);
    std::format!(
        "<{}>1 {timestamp} {host} {} {} {msgid} {sd} \u{feff}{message}",
        pri(&envelope, facility),
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
        let msg = match &self.config.target {
            SyslogTarget::Unix(_) => format_local(
                doc,
                self.config.facility,
                &self.config.app_name,
                SystemTime::now(),
            ),
            _ => format(doc, self.config.facility, &self.config.app_name),
        };
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

    #[test]
    fn local_records_are_what_syslog3_writes_with_cee_fields() {
        let doc = serde_json::json!({
            "message": "blocked /tmp/a\r\nb\u{1b}[31m\u{85} @cee: {} → 10.66.0.2:1389/tcp",
            "event": {"action": "blocked"},
            "process": {"executable": "/tmp/a\r\nb\u{7f}", "pid": 12},
            "destination": {"ip": "10.66.0.2", "port": 1389},
            "egret": {"severity": "critical"},
        });
        let m = format_local(&doc, 3, "eg[r]et:", SystemTime::UNIX_EPOCH);
        let pid = std::process::id();
        // The time is local: only its shape is fixed.
        let (head, rest) = m.split_at(20);
        assert!(
            head.starts_with("<26>") && head.as_bytes()[7] == b' ',
            "{m}"
        );
        assert_eq!(
            rest,
            format!(
                "egret[{pid}]: blocked /tmp/a\\x0d\\x0ab\\x1b[31m\\x85 @cee\\x3a {{}} → 10.66.0.2:1389/tcp @cee: \
                 {{\"action\":\"blocked\",\"dport\":1389,\"dst\":\"10.66.0.2\",\"executable\":\"/tmp/a\\r\\nb\\u007f\",\"pid\":12,\"severity\":\"critical\"}}"
            )
        );
    }

    #[test]
    fn control_characters_are_escaped_in_rfc5424_params_and_message() {
        let doc = serde_json::json!({
            "@timestamp": "2026-11-25T03:48:38.287Z",
            "message": "a\nb",
            "process": {"executable": "/tmp/x\r\n<34>1 forged"},
        });
        let m = format(&doc, 4, "egret");
        assert!(
            m.ends_with(
                " [egret@32473 executable=\"/tmp/x\\\\x0d\\\\x0a<34>1 forged\"] \u{feff}a\\x0ab"
            ),
            "{m}"
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
            proptest::prop_assert!(!m.chars().any(is_unsafe), "unescaped control: {:?}", m);
            let Parsed { header, params, msg } =
                parse(&m).unwrap_or_else(|| panic!("not RFC 5424: {m:?}"));
            proptest::prop_assert_eq!(header.len(), 6);
            proptest::prop_assert_eq!(msg, escape_controls(&message));
            let get = |n: &str| params.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
            proptest::prop_assert_eq!(get("rule"), Some(escape_controls(&rule)));
            proptest::prop_assert_eq!(get("domain"), Some(escape_controls(&domain)));
            proptest::prop_assert_eq!(get("executable"), Some(escape_controls(&exe)));
        }

        /// The local format: one line, no control character, the program
        /// name and pid where syslog(3) puts them, the message before the
        /// first cookie and the exact values in the JSON after it.
        #[test]
        fn any_field_values_stay_one_local_record_with_exact_json_fields(
            exe in ".*", message in ".*", domain in "\\PC*"
        ) {
            let doc = serde_json::json!({
                "message": message,
                "event": {"action": "blocked"},
                "process": {"executable": exe, "pid": 7},
                "destination": {"domain": domain},
            });
            let m = format_local(&doc, 4, "egret", SystemTime::UNIX_EPOCH);
            proptest::prop_assert!(!m.chars().any(is_unsafe), "unescaped control: {:?}", m);
            let rest = m.strip_prefix("<38>").expect("pri");
            let (_, rest) = rest.split_at(16);
            let rest = rest
                .strip_prefix(&std::format!("egret[{}]: ", std::process::id()))
                .expect("tag[pid]: ");
            let (human, json) = rest.split_once(" @cee: ").expect("cookie");
            proptest::prop_assert_eq!(
                human.to_string(),
                escape_controls(&message).replace("@cee:", "@cee\\x3a")
            );
            let fields: Value = serde_json::from_str(json).expect("JSON fields");
            proptest::prop_assert_eq!(&fields["executable"], &Value::from(exe));
            proptest::prop_assert_eq!(&fields["domain"], &Value::from(domain));
            proptest::prop_assert_eq!(&fields["pid"], &Value::from(7));
            proptest::prop_assert_eq!(&fields["action"], &Value::from("blocked"));
        }
    }
}
