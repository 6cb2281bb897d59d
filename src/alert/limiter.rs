//! A sink's rate limit: at most `limit` alerts per window; what is held back
//! is counted (by action and severity) and summed up in one digest when the
//! window ends. Pure: time is an argument.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::policy::Severity;

pub struct Limiter {
    limit: u32,
    window: Duration,
    started: Option<Instant>,
    sent: u32,
    held: BTreeMap<(String, Severity), u64>,
    /// Alerts dropped before reaching the limiter (full queue).
    dropped: u64,
}

/// What one window held back.
#[derive(Debug, PartialEq, Eq)]
pub struct Digest {
    pub suppressed: Vec<(String, Severity, u64)>,
    pub dropped: u64,
}

impl Limiter {
    pub fn new(limit: u32, window: Duration) -> Limiter {
        Limiter {
            limit,
            window,
            started: None,
            sent: 0,
            held: BTreeMap::new(),
            dropped: 0,
        }
    }

    /// True: send it now. False: it is counted for the digest.
    pub fn admit(&mut self, now: Instant, action: &str, severity: Severity) -> bool {
        let started = *self.started.get_or_insert(now);
        if now.duration_since(started) >= self.window && self.held.is_empty() && self.dropped == 0 {
            self.started = Some(now);
            self.sent = 0;
        }
        if self.sent < self.limit {
            self.sent += 1;
            return true;
        }
        *self.held.entry((action.to_string(), severity)).or_default() += 1;
        false
    }

    pub fn note_dropped(&mut self, now: Instant, n: u64) {
        self.started.get_or_insert(now);
        self.dropped += n;
    }

    /// When the current window ends, if it has something to report.
    pub fn deadline(&self) -> Option<Instant> {
        let pending = !self.held.is_empty() || self.dropped > 0;
        self.started.filter(|_| pending).map(|s| s + self.window)
    }

    /// The digest of a window that has ended; a new window starts.
    pub fn due(&mut self, now: Instant) -> Option<Digest> {
        let end = self.deadline()?;
        if now < end {
            return None;
        }
        self.started = Some(now);
        self.sent = 0;
        let suppressed = std::mem::take(&mut self.held)
            .into_iter()
            .map(|((a, s), n)| (a, s, n))
            .collect();
        Some(Digest {
            suppressed,
            dropped: std::mem::take(&mut self.dropped),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_sends_the_limit_then_one_digest_per_window() {
        let t0 = Instant::now();
        let mut l = Limiter::new(3, Duration::from_secs(60));
        let sent = (0..10)
            .filter(|i| l.admit(t0 + Duration::from_millis(*i), "blocked", Severity::High))
            .count();
        assert_eq!(sent, 3);
        assert!(!l.admit(t0, "dns-refused", Severity::High));
        assert_eq!(l.deadline(), Some(t0 + Duration::from_secs(60)));
        assert_eq!(l.due(t0 + Duration::from_secs(59)), None);
        let d = l.due(t0 + Duration::from_secs(60)).unwrap();
        assert_eq!(
            d.suppressed,
            vec![
                ("blocked".into(), Severity::High, 7),
                ("dns-refused".into(), Severity::High, 1)
            ]
        );
        assert_eq!(l.due(t0 + Duration::from_secs(200)), None, "one digest");
        // The new window has its own allowance.
        assert!(l.admit(t0 + Duration::from_secs(61), "blocked", Severity::Low));
    }

    #[test]
    fn a_quiet_sink_starts_a_fresh_window() {
        let t0 = Instant::now();
        let mut l = Limiter::new(1, Duration::from_secs(10));
        assert!(l.admit(t0, "blocked", Severity::Low));
        assert!(l.admit(t0 + Duration::from_secs(11), "blocked", Severity::Low));
        assert!(!l.admit(t0 + Duration::from_secs(12), "blocked", Severity::Low));
        l.note_dropped(t0, 2);
        let d = l.due(t0 + Duration::from_secs(21)).unwrap();
        assert_eq!(d.dropped, 2);
        assert_eq!(d.suppressed.len(), 1);
    }
}
