//! The NFQUEUE engine: userspace decisions for the first packet of each new flow.
//!
//! Rules with `decide = "queue"` hand the first packet of a new flow to an NFQUEUE (xt
//! `NFQUEUE` through nft compat, or native `queue`; always with bypass). [`QueueEngine`]
//! binds queues `num .. num + count` (the rule's fanout), one blocking netlink socket per
//! queue, each on its own OS thread (never on tokio). For every packet it parses the
//! headers ([`parse`]), asks a [`Decider`] for a [`Verdict`], and answers `NF_ACCEPT` with
//! the packet mark rewritten as `(mark & !layout.mask()) | layout.value(verdict)` (see
//! [`MarkLayout`]); the rules then copy the mark into the conntrack mark so every later
//! packet of the flow is handled in the kernel. A `Drop` verdict is answered `NF_DROP` by
//! default ([`DropMode`]). Queues are configured fail-open and copy only the headers.
//! See docs/queue.md.

pub mod inline;
pub mod parse;
pub mod policy;
pub mod stats;
pub mod sys;

use std::fs::File;
use std::os::fd::RawFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub use inline::{INLINE_QUEUE, InlineDecider};
pub use parse::{Family, FlowKey, Headers, ParseError};
pub use policy::{
    Fallback, HealthFlag, Lists, ListsHandle, PolicyDecider, PrefixSet, RateLimit, RateLimiter,
    TokenBucket,
};
pub use stats::{Histogram, QueueCounters, QueueStats, Totals};

/// What to do with a new flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Divert it by the rule with this tag (the tag inside `kernel.mark_mask`, 1..).
    Divert(u32),
    /// Bridge it straight through, untouched.
    Bypass,
    /// Refuse it.
    Drop,
}

/// One queued packet, as the decider sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketInfo {
    /// The queue it came from.
    pub queue: u16,
    /// Its packet mark when queued (the queueing rule may have put the rule tag in it).
    pub mark: u32,
    /// Input interface index (0 if none), and the bridge port it came in on (0 if none).
    pub indev: u32,
    pub physindev: u32,
    pub headers: Headers,
}

impl PacketInfo {
    pub fn key(&self) -> &FlowKey {
        &self.headers.key
    }
}

/// Decides new flows. Called concurrently from every queue thread: keep it quick and
/// non-blocking (no I/O, no awaiting); a panic is caught and answered as `Bypass`.
pub trait Decider: Send + Sync {
    fn decide(&self, pkt: &PacketInfo) -> Verdict;
}

impl<F: Fn(&PacketInfo) -> Verdict + Send + Sync> Decider for F {
    fn decide(&self, pkt: &PacketInfo) -> Verdict {
        self(pkt)
    }
}

/// Verdict codes inside `verdict_mask` (0 = not decided yet).
pub const CODE_DIVERT: u32 = 1;
pub const CODE_BYPASS: u32 = 2;
pub const CODE_DROP: u32 = 3;

/// The mark bits a decision writes: the rule tag in `tag_mask` (brdivert's
/// `kernel.mark_mask`, the bits the diverting rules already match on) and a verdict code
/// in `verdict_mask` (2 bits at least: 1 divert, 2 bypass, 3 drop). A decided flow has a
/// non-zero verdict code, so `ct mark & verdict_mask != 0` means "decided, do not queue".
/// Bypass and drop clear the tag bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkLayout {
    tag_mask: u32,
    verdict_mask: u32,
}

fn contiguous(m: u32) -> bool {
    m != 0 && {
        let v = m >> m.trailing_zeros();
        v & v.wrapping_add(1) == 0
    }
}

/// Default verdict bits: the two bits just above the default `kernel.mark_mask` 0x00ff0000.
pub const DEFAULT_VERDICT_MASK: u32 = 0x0300_0000;

impl MarkLayout {
    pub fn new(tag_mask: u32, verdict_mask: u32) -> Result<MarkLayout> {
        if !contiguous(tag_mask) {
            bail!("tag mask {tag_mask:#x} is not one contiguous run of bits");
        }
        if !contiguous(verdict_mask) || verdict_mask.count_ones() < 2 {
            bail!("verdict mask {verdict_mask:#x} must be one contiguous run of 2 bits or more");
        }
        if tag_mask & verdict_mask != 0 {
            bail!("tag mask {tag_mask:#x} and verdict mask {verdict_mask:#x} overlap");
        }
        Ok(MarkLayout {
            tag_mask,
            verdict_mask,
        })
    }

    pub fn tag_mask(&self) -> u32 {
        self.tag_mask
    }
    pub fn verdict_mask(&self) -> u32 {
        self.verdict_mask
    }
    /// Every bit a decision rewrites.
    pub fn mask(&self) -> u32 {
        self.tag_mask | self.verdict_mask
    }
    /// Largest tag that fits.
    pub fn max_tag(&self) -> u32 {
        self.tag_mask >> self.tag_mask.trailing_zeros()
    }
    pub fn tag_mark(&self, tag: u32) -> u32 {
        tag.checked_shl(self.tag_mask.trailing_zeros()).unwrap_or(0) & self.tag_mask
    }
    pub fn tag_of(&self, mark: u32) -> u32 {
        (mark & self.tag_mask) >> self.tag_mask.trailing_zeros()
    }
    /// The verdict code `code` placed in the verdict bits.
    pub fn code_mark(&self, code: u32) -> u32 {
        (code << self.verdict_mask.trailing_zeros()) & self.verdict_mask
    }

    /// The value (inside [`mask`](Self::mask)) a verdict writes; `None` for a tag that does
    /// not fit (0 or above [`max_tag`](Self::max_tag)).
    pub fn value(&self, v: &Verdict) -> Option<u32> {
        match *v {
            Verdict::Divert(tag) if tag == 0 || tag > self.max_tag() => None,
            Verdict::Divert(tag) => Some(self.tag_mark(tag) | self.code_mark(CODE_DIVERT)),
            Verdict::Bypass => Some(self.code_mark(CODE_BYPASS)),
            Verdict::Drop => Some(self.code_mark(CODE_DROP)),
        }
    }

    /// `mark` with the verdict written into brdivert's bits, every other bit kept.
    pub fn apply(&self, mark: u32, v: &Verdict) -> Option<u32> {
        Some((mark & !self.mask()) | self.value(v)?)
    }

    /// The verdict a mark carries, if any.
    pub fn decode(&self, mark: u32) -> Option<Verdict> {
        match (mark & self.verdict_mask) >> self.verdict_mask.trailing_zeros() {
            CODE_DIVERT => Some(Verdict::Divert(self.tag_of(mark))),
            CODE_BYPASS => Some(Verdict::Bypass),
            CODE_DROP => Some(Verdict::Drop),
            _ => None,
        }
    }
}

impl Default for MarkLayout {
    fn default() -> MarkLayout {
        MarkLayout {
            tag_mask: 0x00ff_0000,
            verdict_mask: DEFAULT_VERDICT_MASK,
        }
    }
}

/// How a `Drop` verdict is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropMode {
    /// `NF_DROP` right away (the mark is irrelevant: the unconfirmed conntrack entry goes
    /// with the packet, so a retransmitted SYN is queued and decided again).
    Verdict,
    /// `NF_ACCEPT` with the drop code in the mark; the rules drop it (and count it).
    Mark,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QueueConfig {
    /// First queue number.
    pub num: u16,
    /// Queues `num .. num + count` (the rule's fanout; the kernel spreads flows by hash).
    pub count: u16,
    /// Bytes of each packet copied to userspace: headers only.
    pub copy_range: u16,
    /// Kernel queue length; beyond it packets are accepted (fail-open) or dropped.
    pub max_len: u32,
    /// Socket receive buffer in bytes.
    pub rcvbuf: usize,
    /// NFQA_CFG_F_FAIL_OPEN: accept rather than drop when the queue is full.
    pub fail_open: bool,
    /// NFQA_CFG_F_GSO: take GSO packets unsegmented (we read headers only, never the
    /// payload, so this saves the kernel a segmentation).
    pub gso: bool,
    pub layout: MarkLayout,
    pub drop_mode: DropMode,
    /// How often a blocked queue thread wakes up to check for shutdown.
    pub poll: Duration,
}

impl Default for QueueConfig {
    fn default() -> QueueConfig {
        QueueConfig {
            num: 0,
            count: 1,
            copy_range: 128,
            max_len: 8192,
            rcvbuf: 8 << 20,
            fail_open: true,
            gso: true,
            layout: MarkLayout::default(),
            drop_mode: DropMode::Verdict,
            poll: Duration::from_millis(100),
        }
    }
}

impl QueueConfig {
    /// Queue numbers `num .. num + count` (validated by `start` not to pass 65535).
    pub fn queues(&self) -> Vec<u16> {
        (0..self.count)
            .filter_map(|i| self.num.checked_add(i))
            .collect()
    }
}

/// Running queue threads. Dropping it stops them too.
pub struct QueueEngine {
    stop: Arc<AtomicBool>,
    workers: Vec<(u16, JoinHandle<()>)>,
    stats: Arc<QueueStats>,
    queues: Vec<u16>,
}

impl std::fmt::Debug for QueueEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueEngine")
            .field("queues", &self.queues)
            .field("running", &self.workers.len())
            .finish()
    }
}

struct Worker {
    queue: nfq::Queue,
    num: u16,
    idx: usize,
    netns: Option<File>,
    cfg: QueueConfig,
    decider: Arc<dyn Decider>,
    stats: Arc<QueueStats>,
    stop: Arc<AtomicBool>,
}

/// Opens, binds and configures queue `num` in the calling thread's network namespace.
fn open_queue(num: u16, cfg: &QueueConfig) -> Result<(nfq::Queue, RawFd)> {
    let mut q = nfq::Queue::open().context("opening an NFQUEUE netlink socket")?;
    q.bind(num).with_context(|| {
        format!(
            "binding NFQUEUE {num} (is another process bound to it? is nfnetlink_queue available?)"
        )
    })?;
    q.set_copy_range(num, cfg.copy_range)
        .with_context(|| format!("NFQUEUE {num}: copy range"))?;
    q.set_queue_max_len(num, cfg.max_len)
        .with_context(|| format!("NFQUEUE {num}: queue max length"))?;
    q.set_fail_open(num, cfg.fail_open)
        .with_context(|| format!("NFQUEUE {num}: fail-open flag"))?;
    if let Err(e) = q.set_recv_gso(num, cfg.gso) {
        tracing::warn!("NFQUEUE {num}: GSO flag refused: {e}");
    }
    let fd = sys::find_queue_fd(num).with_context(|| format!("NFQUEUE {num}: socket"))?;
    if let Err(e) = sys::set_rcvbuf(fd, cfg.rcvbuf) {
        tracing::warn!("NFQUEUE {num}: receive buffer {}: {e}", cfg.rcvbuf);
    }
    sys::set_rcv_timeout(fd, cfg.poll)
        .with_context(|| format!("NFQUEUE {num}: receive timeout"))?;
    Ok((q, fd))
}

impl QueueEngine {
    /// Binds every queue of `config` (in the calling thread's network namespace) and starts
    /// one thread per queue. Fails, with nothing left bound, if any queue cannot be set up.
    pub fn start(config: QueueConfig, decider: Arc<dyn Decider>) -> Result<QueueEngine> {
        if config.count == 0 {
            bail!("NFQUEUE: count must be at least 1");
        }
        if u32::from(config.num) + u32::from(config.count) > 65536 {
            bail!(
                "NFQUEUE {} + {} queues runs past queue 65535",
                config.num,
                config.count
            );
        }
        let queues = config.queues();
        let stats = Arc::new(QueueStats::new(queues.clone()));
        let mut engine = QueueEngine {
            stop: Arc::new(AtomicBool::new(false)),
            workers: Vec::new(),
            stats: Arc::clone(&stats),
            queues: queues.clone(),
        };
        for (idx, num) in queues.into_iter().enumerate() {
            // on error `engine` is dropped: started threads stop, their queues unbind
            let (queue, fd) = open_queue(num, &config)?;
            let rcvbuf = sys::rcvbuf(fd).unwrap_or(0);
            stats.queues[idx].rcvbuf.store(rcvbuf as u64, Relaxed);
            tracing::debug!("NFQUEUE {num}: bound, receive buffer {rcvbuf} bytes");
            let w = Worker {
                queue,
                num,
                idx,
                netns: File::open("/proc/thread-self/ns/net").ok(),
                cfg: config.clone(),
                decider: Arc::clone(&decider),
                stats: Arc::clone(&stats),
                stop: Arc::clone(&engine.stop),
            };
            let h = std::thread::Builder::new()
                .name(format!("brd-nfq-{num}"))
                .spawn(move || w.run())
                .with_context(|| format!("NFQUEUE {num}: starting its thread"))?;
            engine.workers.push((num, h));
        }
        Ok(engine)
    }

    pub fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }

    pub fn queues(&self) -> &[u16] {
        &self.queues
    }

    /// Whether every queue thread is still running.
    pub fn is_running(&self) -> bool {
        !self.workers.is_empty() && self.workers.iter().all(|(_, h)| !h.is_finished())
    }

    /// Unbinds every queue and joins the threads (each notices within `poll`). Packets
    /// queued meanwhile are answered first; rules with bypass let new ones through.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Relaxed);
        for (num, h) in self.workers.drain(..) {
            if h.join().is_err() {
                tracing::error!("NFQUEUE {num}: its thread panicked");
            }
        }
    }
}

impl Drop for QueueEngine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

impl Worker {
    fn run(mut self) {
        if let Some(ns) = &self.netns {
            // only for reading the kernel's queue counters of the right namespace
            if let Err(e) = sys::setns_net(ns) {
                tracing::debug!("NFQUEUE {}: setns: {e}", self.num);
            }
        }
        let mut last_kernel = Instant::now();
        self.refresh_kernel_stats();
        while !self.stop.load(Relaxed) {
            match self.queue.recv() {
                Ok(mut msg) => {
                    let t0 = Instant::now();
                    self.handle(&mut msg);
                    if let Err(e) = self.queue.verdict(msg) {
                        bump(&self.counters().verdict_errors);
                        tracing::debug!("NFQUEUE {}: verdict: {e}", self.num);
                    }
                    self.stats.latency.record(t0.elapsed());
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    bump(&self.counters().recv_errors);
                    tracing::debug!("NFQUEUE {}: recv: {e}", self.num);
                    // ENOBUFS and the like: do not spin on a persistent error
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            if last_kernel.elapsed() >= Duration::from_secs(1) {
                last_kernel = Instant::now();
                self.refresh_kernel_stats();
            }
        }
        self.refresh_kernel_stats();
        if let Err(e) = self.queue.unbind(self.num) {
            tracing::debug!("NFQUEUE {}: unbind: {e}", self.num);
        }
        tracing::debug!("NFQUEUE {}: stopped", self.num);
    }

    fn counters(&self) -> &QueueCounters {
        &self.stats.queues[self.idx]
    }

    fn refresh_kernel_stats(&self) {
        let Ok(qs) = sys::kernel_queues() else { return };
        if let Some(k) = qs.into_iter().find(|q| q.num == self.num) {
            let c = self.counters();
            c.kernel_waiting.store(k.waiting, Relaxed);
            c.kernel_dropped.store(k.dropped, Relaxed);
            c.kernel_user_dropped.store(k.user_dropped, Relaxed);
        }
    }

    fn handle(&self, msg: &mut nfq::Message) {
        let c = self.counters();
        bump(&c.packets);
        let layout = &self.cfg.layout;
        let verdict = match parse::parse(msg.get_payload()) {
            Ok(headers) => {
                let info = PacketInfo {
                    queue: self.num,
                    mark: msg.get_nfmark(),
                    indev: msg.get_indev(),
                    physindev: msg.get_physindev(),
                    headers,
                };
                match catch_unwind(AssertUnwindSafe(|| self.decider.decide(&info))) {
                    Ok(v) => v,
                    Err(_) => {
                        bump(&c.decider_panics);
                        Verdict::Bypass
                    }
                }
            }
            Err(e) => {
                bump(&c.parse_errors);
                tracing::trace!("NFQUEUE {}: {e}", self.num);
                Verdict::Bypass
            }
        };
        let (verdict, mark) = match layout.apply(msg.get_nfmark(), &verdict) {
            Some(m) => (verdict, m),
            None => {
                bump(&c.mark_errors);
                let m = (msg.get_nfmark() & !layout.mask()) | layout.code_mark(CODE_BYPASS);
                (Verdict::Bypass, m)
            }
        };
        msg.set_nfmark(mark);
        match verdict {
            Verdict::Divert(_) => bump(&c.divert),
            Verdict::Bypass => bump(&c.bypass),
            Verdict::Drop => bump(&c.drop),
        }
        msg.set_verdict(match (verdict, self.cfg.drop_mode) {
            (Verdict::Drop, DropMode::Verdict) => nfq::Verdict::Drop,
            _ => nfq::Verdict::Accept,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_layout_validation() {
        assert!(MarkLayout::new(0x00ff_0000, 0x0300_0000).is_ok());
        assert!(MarkLayout::new(0x0101, 0x0300_0000).is_err());
        assert!(MarkLayout::new(0x00ff_0000, 0x0100_0000).is_err(), "1 bit");
        assert!(
            MarkLayout::new(0x00ff_0000, 0x0180_0000).is_err(),
            "overlap"
        );
        assert!(MarkLayout::new(0, 0x3).is_err());
        assert!(MarkLayout::new(0xf000_0000, 0x3).is_ok());
    }

    #[test]
    fn mark_layout_values_keep_foreign_bits() {
        let l = MarkLayout::default();
        assert_eq!(l.mask(), 0x03ff_0000);
        assert_eq!(l.max_tag(), 255);
        let foreign = 0x8000_4001;
        let m = l
            .apply(foreign | l.tag_mark(9), &Verdict::Divert(7))
            .unwrap();
        assert_eq!(m, foreign | 0x0107_0000);
        assert_eq!(l.decode(m), Some(Verdict::Divert(7)));
        let m = l.apply(foreign | l.tag_mark(9), &Verdict::Bypass).unwrap();
        assert_eq!(m, foreign | 0x0200_0000, "bypass clears the tag");
        assert_eq!(l.decode(m), Some(Verdict::Bypass));
        let m = l.apply(0, &Verdict::Drop).unwrap();
        assert_eq!(l.decode(m), Some(Verdict::Drop));
        assert_eq!(l.decode(foreign), None);
        assert_eq!(l.value(&Verdict::Divert(0)), None);
        assert_eq!(l.value(&Verdict::Divert(256)), None);
        assert_eq!(l.value(&Verdict::Divert(255)), Some(0x01ff_0000));
    }

    #[test]
    fn closures_are_deciders() {
        let d: Arc<dyn Decider> = Arc::new(|p: &PacketInfo| {
            if p.key().dport == 22 {
                Verdict::Drop
            } else {
                Verdict::Bypass
            }
        });
        let h = parse::parse(&{
            let mut p = vec![0x45u8, 0, 0, 40, 0, 0, 0, 0, 64, 6];
            p.resize(40, 0);
            p[22..24].copy_from_slice(&22u16.to_be_bytes());
            p
        })
        .unwrap();
        let info = PacketInfo {
            queue: 0,
            mark: 0,
            indev: 0,
            physindev: 0,
            headers: h,
        };
        assert_eq!(d.decide(&info), Verdict::Drop);
    }

    #[test]
    fn bad_configs_are_refused_before_binding() {
        let d: Arc<dyn Decider> = Arc::new(|_: &PacketInfo| Verdict::Bypass);
        let e = QueueEngine::start(
            QueueConfig {
                count: 0,
                ..QueueConfig::default()
            },
            Arc::clone(&d),
        )
        .unwrap_err();
        assert!(e.to_string().contains("at least 1"), "{e}");
        let e = QueueEngine::start(
            QueueConfig {
                num: 65535,
                count: 2,
                ..QueueConfig::default()
            },
            d,
        )
        .unwrap_err();
        assert!(e.to_string().contains("65535"), "{e}");
    }
}
