//! Nothing lost silently: reconciles what the kernel logged (the counters on
//! egret's log rules) with what the reader received and the losses it saw.
//!
//! Sequence gaps give exact counts while packets flow, but tail loss (the
//! last burst before a quiet spell) and failed allocations leave no gap.
//! Those are found by comparing a kernel count read at time T with our
//! counts once the stream has been quiet and drained since T plus the flush
//! delay: then nothing logged before T can still be in flight, and
//! `kernel(T) = received + seq_lost + unaccounted` is exact.

use std::time::Duration;

use crate::monitor::event::LossFigures;

/// The reader's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReaderCounts {
    pub received: u64,
    pub seq_lost: u64,
    pub enobufs: u64,
    /// When (ms on the daemon's monotonic clock) the socket was last found empty.
    pub drained_at_ms: u64,
    /// Reports of the DNS guard and the proxy dropped on a full pipeline.
    pub dns_dropped: u64,
    pub proxy_dropped: u64,
}

#[derive(Debug, Default)]
pub struct Accounting {
    /// Kernel counts of rulesets that have since been replaced.
    retired: u64,
    /// The live ruleset's log-rule count at the last reading.
    live: u64,
    /// A kernel reading waiting for the stream to settle: (total, at_ms, received then).
    pending: Option<(u64, u64, u64)>,
    unaccounted: u64,
    while_down: u64,
    /// Largest in-flight margin: the kernel's flush timer plus scheduling slack.
    settle: Duration,
}

impl Accounting {
    pub fn new(flush: Duration) -> Accounting {
        Accounting {
            settle: flush + Duration::from_millis(200),
            ..Accounting::default()
        }
    }

    /// Packets logged while no daemon listened (from the previous run's books).
    pub fn add_while_down(&mut self, n: u64) {
        self.while_down += n;
    }

    /// The live ruleset is about to be replaced; `last` is its final count.
    pub fn retire(&mut self, last: u64) {
        self.retired += last.max(self.live);
        self.live = 0;
        self.pending = None;
    }

    /// The live ruleset is being replaced after it was deleted or changed
    /// outside egret (a tamper restore): its final count cannot be read, so
    /// `last` (the last reading) may miss what it logged since. Everything
    /// received by then was logged by the tables egret loaded, so the books
    /// carry at least that: they stay continuous across the restore.
    pub fn retire_vanished(&mut self, last: u64, counts: ReaderCounts) {
        self.retire(last);
        self.retired = self.retired.max(counts.received + counts.seq_lost);
    }

    /// A kernel reading of the live ruleset's log-rule counters at `now_ms`.
    pub fn kernel_reading(&mut self, live: u64, now_ms: u64, counts: ReaderCounts) {
        if live < self.live {
            // Someone replaced the table behind our back: counters restarted.
            self.retired += self.live;
        }
        self.live = live;
        self.settle_pending(counts);
        if self.pending.is_none() {
            self.pending = Some((self.retired + live, now_ms, counts.received));
        }
    }

    /// The last reading, taken after the reader stopped: what the kernel
    /// logged and was not received never will be, so it is booked now
    /// rather than left in flight (a flood leaves a full socket at exit).
    pub fn final_reading(&mut self, live: u64, counts: ReaderCounts) {
        if live < self.live {
            self.retired += self.live;
        }
        self.live = live;
        self.pending = None;
        self.unaccounted = (self.retired + live).saturating_sub(counts.received + counts.seq_lost);
    }

    /// Checks whether a pending reading has settled and books tail loss.
    fn settle_pending(&mut self, counts: ReaderCounts) {
        let Some((kernel, at_ms, received_then)) = self.pending else {
            return;
        };
        let quiet = counts.received == received_then;
        let drained_after = counts.drained_at_ms >= at_ms + self.settle.as_millis() as u64;
        if !drained_after {
            return;
        }
        self.pending = None;
        if quiet {
            // A gauge, not a sum: tail loss that a later gap reveals moves
            // from here to seq_lost instead of being counted twice.
            self.unaccounted = kernel.saturating_sub(counts.received + counts.seq_lost);
        }
    }

    pub fn figures(&self, counts: ReaderCounts) -> LossFigures {
        // Until the next quiet spell re-measures it, a revealed tail may sit
        // in both seq_lost and the gauge; never claim more than the kernel logged.
        let room = (self.retired + self.live).saturating_sub(counts.received + counts.seq_lost);
        // Messages still in flight from a vanished table arrive after its
        // count was carried: the kernel logged at least what was received.
        let logged = (self.retired + self.live).max(counts.received + counts.seq_lost);
        LossFigures {
            kernel_logged: logged + self.while_down,
            received: counts.received,
            seq_lost: counts.seq_lost,
            unaccounted: self.unaccounted.min(room),
            while_down: self.while_down,
            enobufs: counts.enobufs,
            dns_dropped: counts.dns_dropped,
            proxy_dropped: counts.proxy_dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(received: u64, seq_lost: u64, drained_at_ms: u64) -> ReaderCounts {
        ReaderCounts {
            received,
            seq_lost,
            enobufs: 0,
            drained_at_ms,
            ..ReaderCounts::default()
        }
    }

    #[test]
    fn tail_loss_is_booked_once_the_stream_is_quiet() {
        let mut acc = Accounting::new(Duration::from_millis(100));
        // 1000 logged, 900 received, 50 known by gaps, 50 lost at the tail.
        acc.kernel_reading(1000, 1_000, counts(900, 50, 900));
        let f = acc.figures(counts(900, 50, 900));
        assert_eq!(f.lost(), 50, "not settled yet: only gaps count");
        acc.kernel_reading(1000, 2_000, counts(900, 50, 1_400));
        let f = acc.figures(counts(900, 50, 1_400));
        assert_eq!((f.unaccounted, f.lost()), (50, 100));
        assert_eq!(f.kernel_logged, f.received + f.packets_lost());
        // A later packet reveals the tail as a gap: not counted twice.
        acc.kernel_reading(1001, 3_000, counts(901, 100, 2_500));
        let f = acc.figures(counts(901, 100, 2_500));
        assert_eq!(f.kernel_logged, f.received + f.packets_lost());
        acc.kernel_reading(1001, 4_000, counts(901, 100, 3_500));
        let f = acc.figures(counts(901, 100, 3_500));
        assert_eq!((f.unaccounted, f.seq_lost), (0, 100));
        assert_eq!(f.kernel_logged, f.received + f.packets_lost());
    }

    #[test]
    fn at_exit_what_was_not_received_is_lost() {
        let mut acc = Accounting::new(Duration::from_millis(100));
        acc.kernel_reading(900, 1_000, counts(850, 10, 990));
        // Still flooding when the reader stopped: 40 sat in the socket.
        acc.final_reading(1000, counts(950, 10, 1_990));
        let f = acc.figures(counts(950, 10, 1_990));
        assert_eq!((f.unaccounted, f.packets_lost()), (40, 50));
        assert_eq!(f.kernel_logged, f.received + f.packets_lost());
    }

    #[test]
    fn dropped_reports_are_lost_but_not_packets() {
        let acc = Accounting::new(Duration::from_millis(100));
        let c = ReaderCounts {
            dns_dropped: 3,
            proxy_dropped: 2,
            ..counts(10, 1, 0)
        };
        let f = acc.figures(c);
        assert_eq!((f.packets_lost(), f.lost()), (1, 6));
    }

    #[test]
    fn a_busy_stream_does_not_look_like_loss() {
        let mut acc = Accounting::new(Duration::from_millis(100));
        acc.kernel_reading(1000, 1_000, counts(950, 0, 990));
        // Still receiving: the reading is dropped, not booked.
        acc.kernel_reading(3000, 2_000, counts(2900, 0, 1_990));
        assert_eq!(acc.figures(counts(2900, 0, 1_990)).packets_lost(), 0);
    }

    #[test]
    fn ruleset_swaps_and_downtime_keep_the_books_whole() {
        let mut acc = Accounting::new(Duration::from_millis(100));
        acc.add_while_down(7);
        acc.kernel_reading(10, 0, counts(10, 0, 0));
        acc.retire(12);
        acc.kernel_reading(3, 1_000, counts(15, 0, 1_000));
        acc.kernel_reading(3, 2_000, counts(15, 0, 2_000));
        let f = acc.figures(counts(15, 0, 2_000));
        assert_eq!(f.kernel_logged, 22);
        assert_eq!(f.while_down, 7);
        assert_eq!(f.kernel_logged, f.received + f.packets_lost());
        // An outside `apply` resets the counters: nothing is forgotten.
        acc.kernel_reading(1, 3_000, counts(16, 0, 3_000));
        assert_eq!(acc.figures(counts(16, 0, 3_000)).kernel_logged, 23);
    }

    #[test]
    fn a_deleted_table_restored_keeps_the_books_continuous() {
        let mut acc = Accounting::new(Duration::from_millis(100));
        acc.kernel_reading(10, 0, counts(10, 0, 0));
        // 5 more were logged and received before the table was deleted,
        // after the last reading: the deleted table cannot be read.
        acc.retire_vanished(10, counts(15, 0, 500));
        acc.kernel_reading(3, 1_000, counts(18, 0, 1_000));
        let f = acc.figures(counts(18, 0, 1_000));
        assert_eq!(f.kernel_logged, 18, "{f:?}");
        assert_eq!(f.kernel_logged, f.received + f.lost());
        // A message of the old table still in flight after the restore.
        let f = acc.figures(counts(19, 0, 1_100));
        assert_eq!(f.kernel_logged, f.received + f.lost(), "{f:?}");
    }
}
