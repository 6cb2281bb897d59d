//! What a person reads about an incident: the one-line message, who sent
//! it, where to. The store's `who` and `destination` columns and the
//! documents' `message` are these strings.

use super::Subject;
use crate::monitor::incident::Incident;

/// One line a human reads in a terminal or a SIEM's message column.
pub fn summary(inc: &Incident) -> String {
    let blocked = inc.key.verdict.blocked;
    match &inc.subject {
        Subject::Flood(f) => format!(
            "flood from {}: {} attempts at {}{} new destinations past its rate, folded (e.g. {})",
            who(inc),
            inc.count,
            if f.capped { "at least " } else { "" },
            f.destinations,
            f.sample.join(", ")
        ),
        Subject::ProxyRequest(p) => {
            let what = if blocked {
                "proxy denied"
            } else {
                "proxy would deny"
            };
            format!(
                "{what} {} {}:{} for {}: {}",
                p.method,
                p.host,
                p.port,
                who(inc),
                p.reason
            )
        }
        Subject::DnsQuery(q) => {
            let what = if blocked { "refused" } else { "would refuse" };
            format!(
                "{what} DNS query {} {} from {}",
                q.qtype,
                presentation_name(&q.name),
                who(inc)
            )
        }
        Subject::Packet(_) => {
            let what = if blocked { "blocked" } else { "would block" };
            let stale = inc
                .resolved
                .as_ref()
                .and_then(|r| r.revalidation.as_ref())
                .filter(|v| v.outcome == "stale")
                .map_or("", |_| ": a stale address, the name resolves elsewhere now");
            format!(
                "{what} {} → {}{stale}",
                who(inc),
                destination(inc).unwrap_or_else(|| "?".into())
            )
        }
        Subject::Revalidated(_) => format!(
            "revalidated {} → {}: the name still resolves there, allowed again",
            who(inc),
            destination(inc).unwrap_or_else(|| "?".into())
        ),
        Subject::AllowedNew(_) => format!(
            "first seen {} → {}, allowed by rule {}",
            who(inc),
            destination(inc).unwrap_or_else(|| "?".into()),
            inc.key.verdict.rule.as_deref().unwrap_or("?")
        ),
        Subject::NameNew(n) => format!(
            "new name {} asked by {}, allowed by {} of rule {}",
            presentation_name(&n.question.name),
            who(inc),
            n.pattern,
            inc.key.verdict.rule.as_deref().unwrap_or("?")
        ),
        Subject::ProxyNew(n) => format!(
            "new proxy host {}:{} for {}, allowed by {} of rule {}",
            n.request.host,
            n.request.port,
            who(inc),
            n.pattern,
            inc.key.verdict.rule.as_deref().unwrap_or("?")
        ),
    }
}

/// "java (pid 4242, user app)" / "unit foo.service" / "uid 1000".
pub fn who(inc: &Incident) -> String {
    let a = &inc.attribution;
    let user = a.user_name.clone().or_else(|| a.uid.map(|u| u.to_string()));
    let user = user.map(|u| format!("user {u}")).unwrap_or_default();
    if let (None, None, None, Some((iface, src))) = (&a.process, &a.unit, a.uid, &a.ingress) {
        return match &a.container_name {
            Some(name) => format!("container {name} ({src} via {iface})"),
            None => format!("forwarded from {src} via {iface}"),
        };
    }
    match (&a.process, &a.unit) {
        (Some(p), _) => format!(
            "{} (pid {}{}{})",
            p.executable.as_deref().or(p.name.as_deref()).unwrap_or("?"),
            p.pid,
            if user.is_empty() { "" } else { ", " },
            user
        ),
        (None, Some(unit)) => format!("unit {unit} ({user})"),
        (None, None) if !user.is_empty() => user,
        (None, None) => "unknown sender".into(),
    }
}

/// `192.0.2.7:1389/tcp`, `[2001:db8::1]:53/udp`, `192.0.2.7/icmp`.
pub fn destination(inc: &Incident) -> Option<String> {
    let f = match &inc.subject {
        Subject::Flood(f) => {
            return Some(format!(
                "{}{} destinations (flood)",
                if f.capped { "≥" } else { "" },
                f.destinations
            ))
        }
        Subject::ProxyRequest(p) => return Some(format!("{}:{} (proxy)", p.host, p.port)),
        Subject::ProxyNew(n) => {
            return Some(format!("{}:{} (proxy)", n.request.host, n.request.port))
        }
        Subject::DnsQuery(q) => {
            return Some(format!("{} {} (dns)", presentation_name(&q.name), q.qtype))
        }
        Subject::NameNew(n) => {
            let q = &n.question;
            return Some(format!("{} {} (dns)", presentation_name(&q.name), q.qtype));
        }
        Subject::Packet(f) => f.as_ref()?,
        Subject::Revalidated(f) | Subject::AllowedNew(f) => f,
    };
    let ip = match f.dst {
        std::net::IpAddr::V6(v6) if f.dst_port().is_some() => format!("[{v6}]"),
        other => other.to_string(),
    };
    let name = inc
        .resolved
        .as_ref()
        .map(|r| format!(" ({})", r.name))
        .unwrap_or_default();
    Some(match f.dst_port() {
        Some(p) => format!("{ip}:{p}/{}{name}", f.transport()),
        None => format!("{ip}/{}{name}", f.transport()),
    })
}

/// A DNS name in RFC 1035 §5.1 presentation form, as ECS's `dns.question.name`
/// wants it: printable ASCII as is, `.` inside a label and `\\` escaped with a
/// backslash, every other byte (space, controls, non-ASCII) as decimal
/// `\\DDD`. `wire` is the guard's name (hickory's text form: `\\ooo` octal
/// and `\\c` escapes), which every reader of ECS would misread.
pub fn presentation_name(wire: &str) -> String {
    let mut labels: Vec<Vec<u8>> = vec![Vec::new()];
    let mut bytes = wire.bytes().peekable();
    while let Some(b) = bytes.next() {
        let label = labels.last_mut().expect("never empty");
        match b {
            b'\\' => {
                let mut octal = Vec::with_capacity(3);
                while octal.len() < 3 && bytes.peek().is_some_and(|d| (b'0'..=b'7').contains(d)) {
                    octal.extend(bytes.next());
                }
                if octal.is_empty() {
                    label.extend(bytes.next());
                } else {
                    let v = octal.iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
                    label.push(u8::try_from(v).unwrap_or(u8::MAX));
                }
            }
            b'.' => labels.push(Vec::new()),
            b => label.push(b),
        }
    }
    let mut out = String::with_capacity(wire.len());
    for (i, label) in labels.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        for &b in label {
            match b {
                b'.' | b'\\' => {
                    out.push('\\');
                    out.push(char::from(b));
                }
                0x21..=0x7e => out.push(char::from(b)),
                _ => out.push_str(&format!("\\{b:03}")),
            }
        }
    }
    out
}
