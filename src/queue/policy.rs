//! The default decider: dynamic deny/allow prefix lists, target health per rule tag, and a
//! per-source new-flow rate limit.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use ipnet::IpNet;

use super::{Decider, MarkLayout, PacketInfo, Verdict};

/// A target's health, shared between the daemon's health checker (writer) and the deciders
/// (readers). Cloning shares the flag.
#[derive(Debug, Clone)]
pub struct HealthFlag(Arc<AtomicBool>);

impl HealthFlag {
    pub fn new(healthy: bool) -> HealthFlag {
        HealthFlag(Arc::new(AtomicBool::new(healthy)))
    }
    pub fn set(&self, healthy: bool) {
        self.0.store(healthy, Ordering::Relaxed);
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// What to do with a new flow that must not be diverted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Bridge it straight through (fail-open).
    Bypass,
    /// Refuse it.
    Drop,
}

impl From<Fallback> for Verdict {
    fn from(f: Fallback) -> Verdict {
        match f {
            Fallback::Bypass => Verdict::Bypass,
            Fallback::Drop => Verdict::Drop,
        }
    }
}

/// A classic token bucket: `rate` tokens a second, at most `burst`.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(burst: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: burst,
            last: now,
        }
    }

    /// Refills for the time since the last call, then takes one token if there is one.
    pub fn take(&mut self, now: Instant, rate: f64, burst: f64) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + dt * rate).min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Per-source new-flow rate limit settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// New flows a second per source (sustained).
    pub per_sec: f64,
    /// Burst size (bucket depth), at least 1.
    pub burst: f64,
    /// Sources remembered; the least recently seen is forgotten beyond this (a forgotten
    /// source starts again with a full bucket).
    pub max_sources: usize,
    /// IPv6 sources are grouped by this prefix length (one host usually owns a /64).
    pub v6_prefix: u8,
    /// What happens to flows over the limit.
    pub on_exceed: Fallback,
}

impl Default for RateLimit {
    fn default() -> RateLimit {
        RateLimit {
            per_sec: 100.0,
            burst: 200.0,
            max_sources: 65536,
            v6_prefix: 64,
            on_exceed: Fallback::Bypass,
        }
    }
}

/// A bounded LRU map of source -> bucket.
#[derive(Debug)]
struct Lru {
    map: HashMap<IpAddr, (TokenBucket, u64)>,
    order: BTreeMap<u64, IpAddr>,
    tick: u64,
    cap: usize,
}

impl Lru {
    fn new(cap: usize) -> Lru {
        Lru {
            map: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            cap: cap.max(1),
        }
    }

    fn take(&mut self, key: IpAddr, now: Instant, rate: f64, burst: f64) -> bool {
        self.tick += 1;
        let tick = self.tick;
        if let Some((bucket, seen)) = self.map.get_mut(&key) {
            self.order.remove(seen);
            *seen = tick;
            self.order.insert(tick, key);
            return bucket.take(now, rate, burst);
        }
        while self.map.len() >= self.cap {
            match self.order.pop_first() {
                Some((_, old)) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
        let mut bucket = TokenBucket::full(burst, now);
        let ok = bucket.take(now, rate, burst);
        self.map.insert(key, (bucket, tick));
        self.order.insert(tick, key);
        ok
    }
}

const SHARDS: usize = 8;

/// Token bucket per source address, sharded to keep the queue threads off one lock.
#[derive(Debug)]
pub struct RateLimiter {
    cfg: RateLimit,
    shards: Vec<Mutex<Lru>>,
    hasher: RandomState,
}

impl RateLimiter {
    pub fn new(cfg: RateLimit) -> RateLimiter {
        let per_shard = cfg.max_sources.div_ceil(SHARDS).max(1);
        RateLimiter {
            cfg,
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Lru::new(per_shard)))
                .collect(),
            hasher: RandomState::new(),
        }
    }

    pub fn config(&self) -> &RateLimit {
        &self.cfg
    }

    fn key(&self, src: IpAddr) -> IpAddr {
        match src {
            IpAddr::V4(_) => src,
            IpAddr::V6(a) => {
                let len = u32::from(self.cfg.v6_prefix.min(128));
                let bits = u128::from(a);
                let masked = if len == 0 {
                    0
                } else {
                    bits & (u128::MAX << (128 - len))
                };
                IpAddr::V6(Ipv6Addr::from(masked))
            }
        }
    }

    /// Takes one new-flow token for `src`; false when it is over its limit.
    pub fn allow(&self, src: IpAddr, now: Instant) -> bool {
        let key = self.key(src);
        let shard = (self.hasher.hash_one(key) as usize) % self.shards.len();
        let mut lru = match self.shards[shard].lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        lru.take(key, now, self.cfg.per_sec, self.cfg.burst.max(1.0))
    }

    /// Sources currently remembered.
    pub fn sources(&self) -> usize {
        self.shards
            .iter()
            .map(|s| match s.lock() {
                Ok(g) => g.map.len(),
                Err(p) => p.into_inner().map.len(),
            })
            .sum()
    }
}

/// A set of prefixes with longest-match-free membership: one hash set of masked addresses
/// per prefix length present, so a lookup costs one hash probe per distinct length.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixSet {
    v4: Vec<(u8, HashSet<u32>)>,
    v6: Vec<(u8, HashSet<u128>)>,
    len: usize,
}

fn mask4(a: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        a & (u32::MAX << (32 - u32::from(len)))
    }
}
fn mask6(a: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        a & (u128::MAX << (128 - u32::from(len)))
    }
}

impl PrefixSet {
    pub fn new(prefixes: impl IntoIterator<Item = IpNet>) -> PrefixSet {
        let mut s = PrefixSet::default();
        for p in prefixes {
            s.insert(p);
        }
        s
    }

    pub fn insert(&mut self, p: IpNet) {
        let fresh = match p {
            IpNet::V4(n) => {
                let len = n.prefix_len();
                let key = mask4(u32::from(n.addr()), len);
                let slot = match self.v4.iter().position(|(l, _)| *l == len) {
                    Some(i) => i,
                    None => {
                        self.v4.push((len, HashSet::new()));
                        self.v4.len() - 1
                    }
                };
                self.v4[slot].1.insert(key)
            }
            IpNet::V6(n) => {
                let len = n.prefix_len();
                let key = mask6(u128::from(n.addr()), len);
                let slot = match self.v6.iter().position(|(l, _)| *l == len) {
                    Some(i) => i,
                    None => {
                        self.v6.push((len, HashSet::new()));
                        self.v6.len() - 1
                    }
                };
                self.v6[slot].1.insert(key)
            }
        };
        if fresh {
            self.len += 1;
        }
    }

    pub fn contains(&self, a: IpAddr) -> bool {
        match a {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.iter().any(|(l, s)| s.contains(&mask4(a, *l)))
            }
            IpAddr::V6(a) => {
                // IPv4-mapped addresses also match IPv4 prefixes
                if let Some(v4) = a.to_ipv4_mapped()
                    && self.contains(IpAddr::V4(v4))
                {
                    return true;
                }
                let a = u128::from(a);
                self.v6.iter().any(|(l, s)| s.contains(&mask6(a, *l)))
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The prefixes, for `status` output.
    pub fn prefixes(&self) -> Vec<IpNet> {
        let mut out = Vec::with_capacity(self.len);
        for (l, s) in &self.v4 {
            for a in s {
                if let Ok(n) = ipnet::Ipv4Net::new(Ipv4Addr::from(*a), *l) {
                    out.push(IpNet::V4(n));
                }
            }
        }
        for (l, s) in &self.v6 {
            for a in s {
                if let Ok(n) = ipnet::Ipv6Net::new(Ipv6Addr::from(*a), *l) {
                    out.push(IpNet::V6(n));
                }
            }
        }
        out.sort();
        out
    }
}

/// The dynamic lists. `deny`: new flows from or to these prefixes are dropped. `allow`: new
/// flows from or to these prefixes are never diverted (bridged straight through, no rate
/// limit). Deny wins over allow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lists {
    pub allow: PrefixSet,
    pub deny: PrefixSet,
}

/// A run-time replaceable handle on the lists: readers take a cheap `Arc` snapshot, writers
/// swap the whole value (so a reader never sees half an update).
#[derive(Debug, Clone, Default)]
pub struct ListsHandle(Arc<RwLock<Arc<Lists>>>);

impl ListsHandle {
    pub fn new(lists: Lists) -> ListsHandle {
        ListsHandle(Arc::new(RwLock::new(Arc::new(lists))))
    }

    pub fn load(&self) -> Arc<Lists> {
        match self.0.read() {
            Ok(g) => Arc::clone(&g),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    pub fn store(&self, lists: Lists) {
        let new = Arc::new(lists);
        match self.0.write() {
            Ok(mut g) => *g = new,
            Err(p) => *p.into_inner() = new,
        }
    }

    /// Read-modify-write (e.g. `brdivert deny add …`).
    pub fn update(&self, f: impl FnOnce(&mut Lists)) {
        let mut g = match self.0.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let mut next = Lists::clone(&g);
        f(&mut next);
        *g = Arc::new(next);
    }
}

/// Per-rule health policy.
#[derive(Debug, Clone)]
pub struct RulePolicy {
    pub health: HealthFlag,
    pub on_unhealthy: Fallback,
}

/// The default decider. In order: deny list -> Drop; allow list -> Bypass; the rule tag
/// (from the queue number, else from the tag bits of the incoming mark; none -> Bypass);
/// target unhealthy -> the rule's `on_unhealthy`; source over its new-flow rate ->
/// `on_exceed`; otherwise Divert(tag).
#[derive(Debug)]
pub struct PolicyDecider {
    layout: MarkLayout,
    rules: HashMap<u32, RulePolicy>,
    queue_tags: HashMap<u16, u32>,
    limiter: Option<RateLimiter>,
    lists: ListsHandle,
}

impl PolicyDecider {
    pub fn new(layout: MarkLayout, lists: ListsHandle) -> PolicyDecider {
        PolicyDecider {
            layout,
            rules: HashMap::new(),
            queue_tags: HashMap::new(),
            limiter: None,
            lists,
        }
    }

    /// Health policy for the rule with `tag`. Tags without one are taken as healthy.
    pub fn with_rule(mut self, tag: u32, health: HealthFlag, on_unhealthy: Fallback) -> Self {
        self.rules.insert(
            tag,
            RulePolicy {
                health,
                on_unhealthy,
            },
        );
        self
    }

    /// Packets from queues `nums` belong to the rule with `tag` (one queue range per rule);
    /// without this the tag comes from the mark the queueing rule set.
    pub fn with_queues(mut self, nums: impl IntoIterator<Item = u16>, tag: u32) -> Self {
        for n in nums {
            self.queue_tags.insert(n, tag);
        }
        self
    }

    pub fn with_rate_limit(mut self, cfg: RateLimit) -> Self {
        self.limiter = Some(RateLimiter::new(cfg));
        self
    }

    pub fn lists(&self) -> &ListsHandle {
        &self.lists
    }

    pub fn rate_limiter(&self) -> Option<&RateLimiter> {
        self.limiter.as_ref()
    }

    /// `decide` with an explicit clock (tests).
    pub fn decide_at(&self, pkt: &PacketInfo, now: Instant) -> Verdict {
        let key = &pkt.headers.key;
        let lists = self.lists.load();
        if lists.deny.contains(key.src) || lists.deny.contains(key.dst) {
            return Verdict::Drop;
        }
        if lists.allow.contains(key.src) || lists.allow.contains(key.dst) {
            return Verdict::Bypass;
        }
        let tag = match self.queue_tags.get(&pkt.queue) {
            Some(t) => *t,
            None => self.layout.tag_of(pkt.mark),
        };
        if tag == 0 {
            return Verdict::Bypass;
        }
        if let Some(r) = self.rules.get(&tag)
            && !r.health.get()
        {
            return r.on_unhealthy.into();
        }
        if let Some(l) = &self.limiter
            && !l.allow(key.src, now)
        {
            return l.cfg.on_exceed.into();
        }
        Verdict::Divert(tag)
    }
}

impl Decider for PolicyDecider {
    fn decide(&self, pkt: &PacketInfo) -> Verdict {
        self.decide_at(pkt, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::parse::{Family, FlowKey, Headers, PROTO_TCP, TCP_SYN};
    use std::time::Duration;

    fn pkt(queue: u16, mark: u32, src: &str, dst: &str) -> PacketInfo {
        PacketInfo {
            queue,
            mark,
            indev: 0,
            physindev: 0,
            headers: Headers {
                key: FlowKey {
                    family: Family::V4,
                    src: src.parse().unwrap(),
                    dst: dst.parse().unwrap(),
                    proto: PROTO_TCP,
                    sport: 40000,
                    dport: 80,
                },
                tcp_flags: Some(TCP_SYN),
                fragment: false,
            },
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn token_bucket_refills_at_rate_up_to_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(3.0, t0);
        assert!(b.take(t0, 2.0, 3.0));
        assert!(b.take(t0, 2.0, 3.0));
        assert!(b.take(t0, 2.0, 3.0));
        assert!(!b.take(t0, 2.0, 3.0));
        // 0.5 s at 2/s = one token
        let t1 = t0 + Duration::from_millis(500);
        assert!(b.take(t1, 2.0, 3.0));
        assert!(!b.take(t1, 2.0, 3.0));
        // a long pause refills to the burst, not beyond
        let t2 = t1 + Duration::from_secs(100);
        for _ in 0..3 {
            assert!(b.take(t2, 2.0, 3.0));
        }
        assert!(!b.take(t2, 2.0, 3.0));
        // a clock going backwards takes nothing and breaks nothing
        assert!(!b.take(t0, 2.0, 3.0));
    }

    #[test]
    fn rate_limiter_is_per_source_and_bounded() {
        let l = RateLimiter::new(RateLimit {
            per_sec: 1.0,
            burst: 2.0,
            max_sources: 16,
            ..RateLimit::default()
        });
        let t = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(l.allow(a, t));
        assert!(l.allow(a, t));
        assert!(!l.allow(a, t));
        assert!(l.allow(b, t), "another source has its own bucket");
        for i in 0..1000u32 {
            l.allow(IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i)), t);
        }
        assert!(l.sources() <= 16, "{} sources kept", l.sources());
    }

    #[test]
    fn rate_limiter_groups_ipv6_by_prefix() {
        let l = RateLimiter::new(RateLimit {
            per_sec: 1.0,
            burst: 1.0,
            ..RateLimit::default()
        });
        let t = Instant::now();
        assert!(l.allow("2001:db8:1:2::1".parse().unwrap(), t));
        assert!(!l.allow("2001:db8:1:2::99".parse().unwrap(), t));
        assert!(l.allow("2001:db8:1:3::1".parse().unwrap(), t));
    }

    #[test]
    fn lru_forgets_least_recently_seen() {
        let mut lru = Lru::new(2);
        let t = Instant::now();
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "1.0.0.1".parse().unwrap(),
            "1.0.0.2".parse().unwrap(),
            "1.0.0.3".parse().unwrap(),
        );
        assert!(lru.take(a, t, 0.0, 1.0));
        assert!(lru.take(b, t, 0.0, 1.0));
        assert!(!lru.take(a, t, 0.0, 1.0)); // a is now the most recent
        assert!(lru.take(c, t, 0.0, 1.0)); // evicts b
        assert!(lru.map.contains_key(&a) && !lru.map.contains_key(&b));
        assert_eq!(lru.map.len(), lru.order.len());
    }

    #[test]
    fn prefix_sets() {
        let s = PrefixSet::new([
            net("10.0.0.0/8"),
            net("192.0.2.7/32"),
            net("2001:db8::/32"),
            net("10.1.0.0/16"),
            net("10.0.0.0/8"),
        ]);
        assert_eq!(s.len(), 4);
        assert!(s.contains("10.200.3.4".parse().unwrap()));
        assert!(s.contains("192.0.2.7".parse().unwrap()));
        assert!(!s.contains("192.0.2.8".parse().unwrap()));
        assert!(s.contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!s.contains("2001:db9::1".parse().unwrap()));
        assert!(s.contains("::ffff:10.9.9.9".parse().unwrap()));
        let all = PrefixSet::new([net("0.0.0.0/0")]);
        assert!(all.contains("255.255.255.255".parse().unwrap()));
        assert!(!all.contains("::1".parse().unwrap()));
        assert_eq!(
            PrefixSet::new([net("10.1.2.3/8")]).prefixes(),
            vec![net("10.0.0.0/8")]
        );
        assert!(PrefixSet::default().is_empty());
    }

    #[test]
    fn lists_handle_swaps_whole_lists() {
        let h = ListsHandle::default();
        let before = h.load();
        h.update(|l| l.deny.insert(net("10.0.0.0/8")));
        assert!(before.deny.is_empty(), "an old snapshot is unchanged");
        assert!(h.load().deny.contains("10.1.1.1".parse().unwrap()));
        h.store(Lists::default());
        assert!(h.load().deny.is_empty());
    }

    #[test]
    fn decider_order_of_checks() {
        let layout = MarkLayout::new(0x00ff_0000, 0x0300_0000).unwrap();
        let health = HealthFlag::new(true);
        let lists = ListsHandle::default();
        let d = PolicyDecider::new(layout, lists.clone())
            .with_rule(5, health.clone(), Fallback::Drop)
            .with_rule(6, HealthFlag::new(false), Fallback::Bypass)
            .with_queues([10, 11], 6)
            .with_rate_limit(RateLimit {
                per_sec: 0.0,
                burst: 2.0,
                on_exceed: Fallback::Drop,
                ..RateLimit::default()
            });
        let t = Instant::now();
        let tagged = layout.tag_mark(5) | 0x1;
        // tag from the mark, healthy, within the rate
        assert_eq!(
            d.decide_at(&pkt(0, tagged, "10.0.0.1", "192.0.2.1"), t),
            Verdict::Divert(5)
        );
        // no tag -> bypass
        assert_eq!(
            d.decide_at(&pkt(0, 0x1, "10.0.0.1", "192.0.2.1"), t),
            Verdict::Bypass
        );
        // the queue's tag wins; rule 6 is unhealthy -> its fallback
        assert_eq!(
            d.decide_at(&pkt(11, tagged, "10.0.0.1", "192.0.2.1"), t),
            Verdict::Bypass
        );
        // unhealthy rule 5 -> drop
        health.set(false);
        assert_eq!(
            d.decide_at(&pkt(0, tagged, "10.0.0.9", "192.0.2.1"), t),
            Verdict::Drop
        );
        health.set(true);
        // source 10.0.0.1 has used one token; one more, then over the limit
        assert_eq!(
            d.decide_at(&pkt(0, tagged, "10.0.0.1", "192.0.2.1"), t),
            Verdict::Divert(5)
        );
        assert_eq!(
            d.decide_at(&pkt(0, tagged, "10.0.0.1", "192.0.2.1"), t),
            Verdict::Drop
        );
        // lists come first: allow skips the limit, deny beats allow
        lists.update(|l| l.allow.insert(net("10.0.0.0/24")));
        assert_eq!(
            d.decide_at(&pkt(0, tagged, "10.0.0.1", "192.0.2.1"), t),
            Verdict::Bypass
        );
        lists.update(|l| l.deny.insert(net("192.0.2.0/24")));
        assert_eq!(
            d.decide_at(&pkt(0, tagged, "10.0.0.1", "192.0.2.1"), t),
            Verdict::Drop
        );
        assert!(d.rate_limiter().is_some());
    }
}
