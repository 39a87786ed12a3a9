//! Counters the engine keeps (lock-free atomics, written by the queue threads, read by the
//! daemon's exporter) and a fixed-bucket verdict latency histogram.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the latency buckets (the last bucket, above these, is +Inf).
pub const LATENCY_BOUNDS: [Duration; 16] = [
    Duration::from_micros(1),
    Duration::from_micros(2),
    Duration::from_micros(5),
    Duration::from_micros(10),
    Duration::from_micros(20),
    Duration::from_micros(50),
    Duration::from_micros(100),
    Duration::from_micros(200),
    Duration::from_micros(500),
    Duration::from_millis(1),
    Duration::from_millis(2),
    Duration::from_millis(5),
    Duration::from_millis(10),
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_secs(1),
];

/// Verdict latency: from the packet leaving `recv` to the verdict being sent.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn record(&self, d: Duration) {
        let i = LATENCY_BOUNDS
            .iter()
            .position(|b| d <= *b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_ns.load(Relaxed))
    }

    /// Per-bucket counts (not cumulative): `(upper bound, count)`, `None` = +Inf.
    pub fn buckets(&self) -> Vec<(Option<Duration>, u64)> {
        self.buckets
            .iter()
            .enumerate()
            .map(|(i, c)| (LATENCY_BOUNDS.get(i).copied(), c.load(Relaxed)))
            .collect()
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1); `None` when empty,
    /// `Duration::MAX` when it falls in the +Inf bucket.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let counts = self.buckets();
        let total: u64 = counts.iter().map(|(_, c)| c).sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bound, c) in counts {
            seen += c;
            if seen >= rank {
                return Some(bound.unwrap_or(Duration::MAX));
            }
        }
        Some(Duration::MAX)
    }

    pub fn p50(&self) -> Option<Duration> {
        self.quantile(0.5)
    }

    pub fn p99(&self) -> Option<Duration> {
        self.quantile(0.99)
    }
}

/// Counters of one queue.
#[derive(Debug, Default)]
pub struct QueueCounters {
    pub num: u16,
    /// Packets received from the kernel.
    pub packets: AtomicU64,
    pub divert: AtomicU64,
    pub bypass: AtomicU64,
    pub drop: AtomicU64,
    /// Packets whose headers did not parse (answered as bypass).
    pub parse_errors: AtomicU64,
    /// Divert tags that do not fit the mark layout (answered as bypass).
    pub mark_errors: AtomicU64,
    /// Decider panics (answered as bypass).
    pub decider_panics: AtomicU64,
    pub recv_errors: AtomicU64,
    pub verdict_errors: AtomicU64,
    /// From /proc/net/netfilter/nfnetlink_queue, refreshed about once a second: packets
    /// waiting, dropped by the kernel (queue full without fail-open, or no memory) and
    /// dropped because the netlink socket was full.
    pub kernel_waiting: AtomicU64,
    pub kernel_dropped: AtomicU64,
    pub kernel_user_dropped: AtomicU64,
    /// The socket receive buffer the kernel granted (bytes).
    pub rcvbuf: AtomicU64,
}

/// Everything the engine counts.
#[derive(Debug)]
pub struct QueueStats {
    pub queues: Vec<QueueCounters>,
    pub latency: Histogram,
}

impl QueueStats {
    pub fn new(nums: impl IntoIterator<Item = u16>) -> QueueStats {
        QueueStats {
            queues: nums
                .into_iter()
                .map(|num| QueueCounters {
                    num,
                    ..Default::default()
                })
                .collect(),
            latency: Histogram::default(),
        }
    }

    pub fn queue(&self, num: u16) -> Option<&QueueCounters> {
        self.queues.iter().find(|q| q.num == num)
    }

    /// Totals over every queue.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for q in &self.queues {
            t.packets += q.packets.load(Relaxed);
            t.divert += q.divert.load(Relaxed);
            t.bypass += q.bypass.load(Relaxed);
            t.drop += q.drop.load(Relaxed);
            t.parse_errors += q.parse_errors.load(Relaxed);
            t.mark_errors += q.mark_errors.load(Relaxed);
            t.decider_panics += q.decider_panics.load(Relaxed);
            t.recv_errors += q.recv_errors.load(Relaxed);
            t.verdict_errors += q.verdict_errors.load(Relaxed);
            t.kernel_dropped += q.kernel_dropped.load(Relaxed);
            t.kernel_user_dropped += q.kernel_user_dropped.load(Relaxed);
        }
        t
    }
}

/// A plain snapshot of the totals.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub packets: u64,
    pub divert: u64,
    pub bypass: u64,
    pub drop: u64,
    pub parse_errors: u64,
    pub mark_errors: u64,
    pub decider_panics: u64,
    pub recv_errors: u64,
    pub verdict_errors: u64,
    pub kernel_dropped: u64,
    pub kernel_user_dropped: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_read_bucket_bounds() {
        let h = Histogram::default();
        assert_eq!(h.p50(), None);
        for _ in 0..98 {
            h.record(Duration::from_nanos(1500)); // 2 µs bucket
        }
        h.record(Duration::from_micros(300)); // 500 µs bucket
        h.record(Duration::from_secs(5)); // +Inf
        assert_eq!(h.count(), 100);
        assert_eq!(h.p50(), Some(Duration::from_micros(2)));
        assert_eq!(h.quantile(0.99), Some(Duration::from_micros(500)));
        assert_eq!(h.quantile(1.0), Some(Duration::MAX));
        assert_eq!(h.quantile(0.0), Some(Duration::from_micros(2)));
        assert!(h.sum() > Duration::from_secs(5));
        let b = h.buckets();
        assert_eq!(b.len(), LATENCY_BOUNDS.len() + 1);
        assert_eq!(b.last(), Some(&(None, 1)));
    }

    #[test]
    fn totals_add_queues() {
        let s = QueueStats::new([3, 4]);
        s.queue(3).unwrap().packets.fetch_add(2, Relaxed);
        s.queue(4).unwrap().packets.fetch_add(5, Relaxed);
        s.queue(4).unwrap().drop.fetch_add(1, Relaxed);
        assert!(s.queue(5).is_none());
        let t = s.totals();
        assert_eq!((t.packets, t.drop), (7, 1));
    }
}
