//! `decide = "queue"` without NFQUEUE: the userspace datapath asks the same [`Decider`] (in
//! the daemon: the swappable [`super::PolicyDecider`] with its deny/allow lists, health
//! flags and per-source rate limit) directly, on its forwarding thread, for the first frame
//! of each new flow of a queue rule; its flow table pins the verdict. Counted like a queue
//! ([`QueueStats`], one pseudo-queue [`INLINE_QUEUE`]) so `status` and the metrics show the
//! same figures in both datapaths.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use super::parse::{Family, FlowKey, Headers};
use super::{Decider, MarkLayout, PacketInfo, QueueStats, Verdict};
use crate::classify;

/// The queue number inline decisions carry in [`PacketInfo::queue`] (no NFQUEUE is bound):
/// the decider takes the rule's tag from the mark, as with one queue range for every rule.
pub const INLINE_QUEUE: u16 = u16::MAX;

/// A decider called inline, with the engine's counters.
pub struct InlineDecider {
    decider: Arc<dyn Decider>,
    layout: MarkLayout,
    stats: QueueStats,
}

impl std::fmt::Debug for InlineDecider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InlineDecider")
            .field("layout", &self.layout)
            .field("stats", &self.stats)
            .finish()
    }
}

/// The headers a decider sees for a frame the userspace datapath parsed.
pub fn headers_of(p: &classify::PacketInfo) -> Headers {
    let (sport, dport) = p.ports.unwrap_or((0, 0));
    Headers {
        key: FlowKey {
            family: match p.src {
                std::net::IpAddr::V4(_) => Family::V4,
                std::net::IpAddr::V6(_) => Family::V6,
            },
            src: p.src,
            dst: p.dst,
            proto: p.l4proto,
            sport,
            dport,
        },
        // the datapath does not parse TCP flags; no decider here looks at them
        tcp_flags: None,
        fragment: p.ports.is_none() && matches!(p.l4proto, 6 | 17),
    }
}

impl InlineDecider {
    pub fn new(decider: Arc<dyn Decider>, layout: MarkLayout) -> InlineDecider {
        InlineDecider {
            decider,
            layout,
            stats: QueueStats::new([INLINE_QUEUE]),
        }
    }

    /// Decide a new flow of the queue rule with `tag`. Counted as one queued packet; a
    /// panicking decider, or a `Divert` tag that does not fit the mark layout, is answered
    /// `Bypass` (as the engine does).
    pub fn decide(&self, tag: u32, p: &classify::PacketInfo) -> Verdict {
        let t0 = Instant::now();
        let c = &self.stats.queues[0];
        c.packets.fetch_add(1, Relaxed);
        let info = PacketInfo {
            queue: INLINE_QUEUE,
            mark: self.layout.tag_mark(tag),
            indev: 0,
            physindev: 0,
            headers: headers_of(p),
        };
        let mut v = match catch_unwind(AssertUnwindSafe(|| self.decider.decide(&info))) {
            Ok(v) => v,
            Err(_) => {
                c.decider_panics.fetch_add(1, Relaxed);
                Verdict::Bypass
            }
        };
        if self.layout.value(&v).is_none() {
            c.mark_errors.fetch_add(1, Relaxed);
            v = Verdict::Bypass;
        }
        match v {
            Verdict::Divert(_) => c.divert.fetch_add(1, Relaxed),
            Verdict::Bypass => c.bypass.fetch_add(1, Relaxed),
            Verdict::Drop => c.drop.fetch_add(1, Relaxed),
        };
        self.stats.latency.record(t0.elapsed());
        v
    }

    pub fn stats(&self) -> &QueueStats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{Fallback, HealthFlag, ListsHandle, PolicyDecider};

    fn pkt(src: &str, sport: u16) -> classify::PacketInfo {
        classify::PacketInfo {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            vlan: None,
            src: src.parse().unwrap(),
            dst: "192.0.2.1".parse().unwrap(),
            l4proto: 6,
            ports: Some((sport, 80)),
            tcp_flags: 0,
        }
    }

    #[test]
    fn the_policy_decider_decides_inline_and_is_counted() {
        let layout = MarkLayout::default();
        let lists = ListsHandle::default();
        let health = HealthFlag::new(true);
        let d =
            PolicyDecider::new(layout, lists.clone()).with_rule(3, health.clone(), Fallback::Drop);
        let inline = InlineDecider::new(Arc::new(d), layout);
        // the tag travels in the mark, as from a queueing rule
        assert_eq!(inline.decide(3, &pkt("10.0.0.1", 1)), Verdict::Divert(3));
        lists.update(|l| l.allow.insert("10.0.0.0/24".parse().unwrap()));
        assert_eq!(inline.decide(3, &pkt("10.0.0.1", 2)), Verdict::Bypass);
        lists.update(|l| l.deny.insert("10.0.0.1/32".parse().unwrap()));
        assert_eq!(inline.decide(3, &pkt("10.0.0.1", 3)), Verdict::Drop);
        lists.store(Default::default());
        health.set(false);
        assert_eq!(inline.decide(3, &pkt("10.0.0.1", 4)), Verdict::Drop);
        let t = inline.stats().totals();
        assert_eq!((t.packets, t.divert, t.bypass, t.drop), (4, 1, 1, 2));
        assert_eq!(inline.stats().latency.count(), 4);
    }

    #[test]
    fn a_panicking_or_bad_decider_bypasses() {
        let layout = MarkLayout::default();
        let boom = InlineDecider::new(
            Arc::new(|_: &PacketInfo| -> Verdict { panic!("decider bug") }),
            layout,
        );
        assert_eq!(boom.decide(1, &pkt("10.0.0.1", 1)), Verdict::Bypass);
        let bad = InlineDecider::new(Arc::new(|_: &PacketInfo| Verdict::Divert(0)), layout);
        assert_eq!(bad.decide(1, &pkt("10.0.0.1", 1)), Verdict::Bypass);
        assert_eq!(boom.stats().totals().decider_panics, 1);
        assert_eq!(bad.stats().totals().mark_errors, 1);
        assert_eq!(bad.stats().totals().bypass, 1);
    }
}
