//! egret's documents as a collector hands them back (`egret suggest`,
//! `simulate` and `events` with `--from`): JSON lines from any host, each a
//! bare document (egret's stdout, `journalctl -o cat`), or wrapped by what
//! carried it: an Elasticsearch hit (`_source`), a journal entry
//! (`journalctl -o json`: `MESSAGE`), a log shipper's or Loki's line
//! (`message`, `line`, `log`), or a syslog collector's JSON of egret's
//! syslog record (rsyslog: the structured data `mmpstrucdata` extracted, or
//! the local record's CEE JSON), which carries the sink's fields rather
//! than the whole document ([`ecs::from_sink_fields`]).
//!
//! Whatever else is in the file (other programs' logs, other versions of
//! egret, truncated or overlong lines, forged documents) is skipped and
//! counted, never fatal. Each incident's copies (its first report and its
//! updates) fold into the last one, per host.

use std::collections::HashMap;
use std::io::BufRead;

use serde::Serialize;
use serde_json::{Map, Value};

use super::ecs;
use super::Action;

/// Longer lines are skipped (counted as malformed) without being held in
/// memory: egret's own documents are a few KiB (`text::bound` caps what
/// senders name), a journal entry around one more.
pub const MAX_LINE: usize = 256 * 1024;

/// How deep wrappers may nest (a hit around a shipper's event around a
/// journal entry): more is not something a collector writes.
const MAX_WRAPPING: usize = 4;

/// The SD-ID of egret's syslog records (`alert::syslog::SD_ID`).
const SD_ID: &str = "egret@32473";

/// What the reader made of its input, for the line the commands print.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReadCounts {
    pub lines: u64,
    /// egret documents read (incidents' updates included).
    pub events: u64,
    /// Incidents (and egret's own events) after folding updates.
    pub kept: u64,
    /// Valid JSON that is not an egret document, and blank lines.
    pub not_egret: u64,
    /// egret documents this build does not understand (an action it does not know).
    pub other_version: u64,
    /// Not JSON, truncated, or longer than [`MAX_LINE`] (counted in both).
    pub malformed: u64,
    pub too_long: u64,
    /// egret documents a journal says another user wrote (not root, as
    /// `egret run` is): a forgery, skipped.
    pub untrusted: u64,
}

impl ReadCounts {
    pub fn skipped(&self) -> u64 {
        self.not_egret + self.other_version + self.malformed + self.untrusted
    }

    /// "read 10000 lines: 9870 egret events, 130 skipped: 100 not egret, 30 malformed"
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        for (n, what) in [
            (self.not_egret, "not egret"),
            (self.other_version, "from another egret version"),
            (self.malformed, "malformed"),
            (self.untrusted, "not written by egret (journal: not root)"),
        ] {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        }
        if self.too_long > 0 {
            parts.push(format!(
                "({} longer than {} KiB)",
                self.too_long,
                MAX_LINE / 1024
            ));
        }
        let skipped = if parts.is_empty() {
            "none skipped".to_string()
        } else {
            format!("{} skipped: {}", self.skipped(), parts.join(", "))
        };
        format!(
            "read {} lines: {} egret events ({} after folding updates), {skipped}",
            self.lines, self.events, self.kept
        )
    }
}

/// One line, classified.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    Egret(Value),
    NotEgret,
    OtherVersion,
    Malformed,
    Untrusted,
}

/// A line (without its newline) as an egret document, unwrapped.
pub fn classify(line: &str) -> Line {
    let line = line.trim();
    if line.is_empty() {
        return Line::NotEgret;
    }
    match serde_json::from_str::<Value>(line) {
        Ok(v) => unwrap(v, 0),
        Err(_) => Line::Malformed,
    }
}

fn unwrap(v: Value, depth: usize) -> Line {
    if depth > MAX_WRAPPING {
        return Line::NotEgret;
    }
    let Value::Object(mut map) = v else {
        return Line::NotEgret;
    };
    // A shipper may write ECS's dotted names as flat keys.
    if map.keys().any(|k| k.contains('.')) && !map.contains_key("event") {
        map = expand_dotted(map);
    }
    let v = Value::Object(map);
    if ecs::is_egret(&v) {
        let action = v.pointer("/event/action").and_then(Value::as_str);
        return match action.and_then(Action::from_name) {
            Some(_) => Line::Egret(v),
            None => Line::OtherVersion,
        };
    }
    let Value::Object(mut map) = v else {
        return Line::NotEgret;
    };
    // Elasticsearch: a hit from an export or a search answer.
    if let Some(source) = map.remove("_source") {
        return unwrap(source, depth + 1);
    }
    // The journal: MESSAGE is what egret printed; `_UID` is the journal's
    // own (trusted) record of who wrote it. egret runs as root, so anything
    // else is another user's line that only looks like egret's.
    if let Some(message) = map.get("MESSAGE") {
        let Some(text) = journal_text(message) else {
            return Line::NotEgret;
        };
        let inner = classify(&text);
        let uid = map.get("_UID").and_then(Value::as_str);
        return match inner {
            Line::Egret(_) if uid.is_some_and(|u| u != "0") => Line::Untrusted,
            Line::Malformed => Line::NotEgret,
            other => other,
        };
    }
    // rsyslog's JSON of egret's RFC 5424 record, fields by mmpstrucdata.
    if let Some(fields) = map
        .get("$!")
        .and_then(|v| v.pointer(&format!("/rfc5424-sd/{SD_ID}")))
        .or_else(|| map.get("rfc5424-sd").and_then(|v| v.get(SD_ID)))
        .and_then(Value::as_object)
    {
        return sink_record(&map, fields);
    }
    // A shipper's or log store's line: the document as a string.
    for key in ["message", "msg", "line", "log"] {
        let Some(text) = map.get(key).and_then(Value::as_str) else {
            continue;
        };
        let text = text.trim_start_matches('\u{feff}').trim();
        if text.starts_with('{') {
            return match classify(text) {
                Line::Malformed => Line::NotEgret,
                other => other,
            };
        }
        // egret's local syslog record: `MESSAGE @cee: {fields}`.
        if let Some((human, cee)) = text.split_once(" @cee: {") {
            let Ok(Value::Object(fields)) = serde_json::from_str(&format!("{{{cee}")) else {
                return Line::NotEgret;
            };
            return classify_rebuilt(sink_doc(&map, &fields, human));
        }
    }
    Line::NotEgret
}

fn sink_record(map: &Map<String, Value>, fields: &Map<String, Value>) -> Line {
    let message = ["msg", "message"]
        .iter()
        .find_map(|k| map.get(*k).and_then(Value::as_str))
        .unwrap_or_default()
        .trim_start_matches(['\u{feff}', ' ']);
    classify_rebuilt(sink_doc(map, fields, message))
}

/// The collector's host name and time for the record, then the document.
fn sink_doc(map: &Map<String, Value>, fields: &Map<String, Value>, message: &str) -> Value {
    let s = |k: &str| map.get(k).and_then(Value::as_str);
    let host = s("hostname").or_else(|| s("host"));
    let at = s("timereported")
        .or_else(|| s("timestamp"))
        .or_else(|| s("@timestamp"));
    ecs::from_sink_fields(fields, host, at, message)
}

fn classify_rebuilt(doc: Value) -> Line {
    match doc
        .pointer("/event/action")
        .and_then(Value::as_str)
        .map(Action::from_name)
    {
        Some(Some(_)) => Line::Egret(doc),
        _ => Line::OtherVersion,
    }
}

/// `journalctl -o json` writes a message that is not valid UTF-8 (or is
/// very long) as an array of byte values.
fn journal_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(bytes) => {
            let bytes: Option<Vec<u8>> = bytes
                .iter()
                .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect();
            Some(String::from_utf8_lossy(&bytes?).into_owned())
        }
        _ => None,
    }
}

/// `{"event.action": "blocked"}` → `{"event": {"action": "blocked"}}`.
fn expand_dotted(map: Map<String, Value>) -> Map<String, Value> {
    let mut out = Value::Object(Map::new());
    for (k, v) in map {
        let mut at = &mut out;
        let mut parts = k.split('.').peekable();
        while let Some(part) = parts.next() {
            if !at.is_object() {
                *at = Value::Object(Map::new());
            }
            let Some(o) = at.as_object_mut() else { break };
            if parts.peek().is_none() {
                o.insert(part.to_string(), v);
                break;
            }
            at = o.entry(part).or_insert_with(|| Value::Object(Map::new()));
        }
    }
    match out {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// The next line of `input` into `buf` (without its newline); `Ok(false)`
/// at the end. A line longer than `max` is read past, not kept: `buf` is
/// cleared and the result says so.
fn next_line(
    input: &mut impl BufRead,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<bool>> {
    buf.clear();
    let mut too_long = false;
    let mut any = false;
    loop {
        let chunk = input.fill_buf()?;
        if chunk.is_empty() {
            return Ok(any.then_some(too_long));
        }
        any = true;
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let body = &chunk[..if done { take - 1 } else { take }];
        if !too_long {
            if buf.len() + body.len() > max {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(body);
            }
        }
        input.consume(take);
        if done {
            return Ok(Some(too_long));
        }
    }
}

/// The egret documents of a collected file, each incident once (its latest
/// copy per host), in the order first seen.
pub struct Collected {
    pub docs: Vec<Value>,
    pub counts: ReadCounts,
}

pub fn read(mut input: impl BufRead) -> std::io::Result<Collected> {
    let mut counts = ReadCounts::default();
    let mut docs: Vec<Value> = Vec::new();
    let mut index: HashMap<(String, String, String), usize> = HashMap::new();
    let mut buf = Vec::new();
    while let Some(too_long) = next_line(&mut input, &mut buf, MAX_LINE)? {
        counts.lines += 1;
        if too_long {
            counts.too_long += 1;
            counts.malformed += 1;
            continue;
        }
        let line = match std::str::from_utf8(&buf) {
            Ok(l) => classify(l),
            Err(_) => Line::Malformed,
        };
        let doc = match line {
            Line::Egret(doc) => doc,
            Line::NotEgret => {
                counts.not_egret += 1;
                continue;
            }
            Line::OtherVersion => {
                counts.other_version += 1;
                continue;
            }
            Line::Malformed => {
                counts.malformed += 1;
                continue;
            }
            Line::Untrusted => {
                counts.untrusted += 1;
                continue;
            }
        };
        counts.events += 1;
        let key = ecs::incident_key(&doc).map(|(id, start)| {
            let host = ecs::host_name(&doc).unwrap_or_default().to_string();
            (host, id, start)
        });
        let Some(key) = key else {
            docs.push(doc);
            continue;
        };
        match index.get(&key) {
            Some(&i) => {
                let kept = &mut docs[i];
                // The copy with the higher count (else the later one) is
                // the incident as it stands; the other may know an earlier start.
                let newer = (ecs::count_of(&doc), ecs::last_seen_of(&doc))
                    >= (ecs::count_of(kept), ecs::last_seen_of(kept));
                if newer {
                    let old = std::mem::replace(kept, doc);
                    ecs::widen_seen(kept, &old);
                } else {
                    ecs::widen_seen(kept, &doc);
                }
            }
            None => {
                index.insert(key, docs.len());
                docs.push(doc);
            }
        }
    }
    counts.kept = docs.len() as u64;
    Ok(Collected { docs, counts })
}

/// Reads `path` (`-`: standard input).
pub fn read_path(path: &std::path::Path) -> anyhow::Result<Collected> {
    use anyhow::Context;
    if path.as_os_str() == "-" {
        return read(std::io::stdin().lock()).context("reading standard input");
    }
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    read(std::io::BufReader::with_capacity(64 * 1024, file))
        .with_context(|| format!("reading {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(host: &str, id: u64, count: u64, last: &str) -> String {
        serde_json::json!({
            "@timestamp": last,
            "message": "blocked curl → 192.0.2.7:443/tcp",
            "ecs": {"version": ecs::ECS_VERSION},
            "event": {"module": "egret", "action": "blocked", "id": id.to_string(), "start": "2026-01-01T00:00:00.000Z"},
            "host": {"name": host, "hostname": host},
            "destination": {"ip": "192.0.2.7", "port": 443},
            "network": {"transport": "tcp"},
            "egret": {"count": count, "first_seen": "2026-01-01T00:00:00.000Z", "last_seen": last},
        })
        .to_string()
    }

    #[test]
    fn every_wrapper_yields_the_document_and_junk_is_counted() {
        let d = doc("web-1", 1, 1, "2026-01-01T00:00:00.000Z");
        let lines = [
            d.clone(),
            format!(r#"{{"_index":"logs","_source":{d}}}"#),
            serde_json::json!({"MESSAGE": d, "_UID": "0", "_HOSTNAME": "web-1"}).to_string(),
            serde_json::json!({"MESSAGE": d.as_bytes(), "_UID": "0"}).to_string(),
            serde_json::json!({"message": d, "agent": {"type": "filebeat"}}).to_string(),
            serde_json::json!({"labels": {"job": "egret"}, "line": d}).to_string(),
            serde_json::json!({"log": format!("{d}\n"), "stream": "stdout"}).to_string(),
        ];
        for l in &lines {
            assert!(matches!(classify(l), Line::Egret(_)), "{l}");
        }
        let forged = serde_json::json!({"MESSAGE": d, "_UID": "65534"}).to_string();
        assert_eq!(classify(&forged), Line::Untrusted);
        assert_eq!(classify(r#"{"message":"sshd: accepted"}"#), Line::NotEgret);
        assert_eq!(classify(&d[..d.len() / 2]), Line::Malformed);
        let other = d.replace("\"blocked\"", "\"teleported\"");
        assert_eq!(classify(&other), Line::OtherVersion);
        let flat = r#"{"event.module":"egret","event.action":"blocked","host.name":"h"}"#;
        let Line::Egret(flat) = classify(flat) else {
            panic!("dotted keys")
        };
        assert_eq!(ecs::host_name(&flat), Some("h"));
    }

    #[test]
    fn updates_fold_per_host_and_overlong_lines_are_skipped_unread() {
        let text = [
            doc("web-1", 7, 1, "2026-01-01T00:00:00.000Z"),
            doc("web-2", 7, 1, "2026-01-01T00:00:00.000Z"),
            doc("web-1", 7, 5, "2026-01-01T00:00:05.000Z"),
            "x".repeat(MAX_LINE + 10),
            "not json".into(),
            String::new(),
            doc("web-1", 7, 3, "2026-01-01T00:00:03.000Z"),
        ]
        .join("\n");
        let c = read(std::io::BufReader::with_capacity(64, text.as_bytes())).unwrap();
        assert_eq!(c.docs.len(), 2);
        assert_eq!(ecs::count_of(&c.docs[0]), 5);
        assert_eq!(ecs::host_name(&c.docs[1]), Some("web-2"));
        assert_eq!(
            c.counts,
            ReadCounts {
                lines: 7,
                events: 4,
                kept: 2,
                not_egret: 1,
                other_version: 0,
                malformed: 2,
                too_long: 1,
                untrusted: 0,
            }
        );
        assert!(
            c.counts.summary().contains("3 skipped"),
            "{}",
            c.counts.summary()
        );
    }

    #[test]
    fn a_syslog_record_becomes_a_document_with_the_records_host() {
        let rsyslog = serde_json::json!({
            "msg": "\u{feff}blocked /usr/bin/curl (pid 9, user nobody) → 192.0.2.7:443/tcp",
            "hostname": "web-3",
            "timereported": "2026-01-01T00:00:01.000Z",
            "$!": {"rfc5424-sd": {"egret@32473": {
                "action": "blocked", "id": "4", "rule": "default", "user": "nobody",
                "executable": "/usr/bin/curl", "dst": "192.0.2.7", "dport": "443",
                "transport": "tcp", "count": "2"}}},
        });
        let Line::Egret(d) = classify(&rsyslog.to_string()) else {
            panic!("not read")
        };
        let r = ecs::RecordedIncident::decode(&d).unwrap();
        assert_eq!(r.host.as_deref(), Some("web-3"));
        assert_eq!((r.port, r.protocol, r.count), (Some(443), 6, 2));
        assert_eq!(r.user_name.as_deref(), Some("nobody"));
        assert_eq!(r.first_seen, "2026-01-01T00:00:01.000Z");
        let local = serde_json::json!({
            "msg": r#"refused DNS query A x.test from curl @cee: {"action":"dns-refused","query":"x.test","count":1}"#,
            "hostname": "web-4",
        });
        let Line::Egret(d) = classify(&local.to_string()) else {
            panic!("not read")
        };
        let r = ecs::RecordedIncident::decode(&d).unwrap();
        assert_eq!(
            r.subject,
            ecs::RecordedSubject::DnsQuery {
                name: "x.test".into()
            }
        );
    }
}
