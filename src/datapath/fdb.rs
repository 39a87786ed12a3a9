//! The forwarding database: source MAC -> port, learnt from traffic, aged, bounded.
//!
//! Time is passed in (`now`) so tests can age entries without sleeping.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::frame::is_multicast;

pub const DEFAULT_AGING: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_ENTRIES: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    port: usize,
    last_seen: Instant,
    is_static: bool,
}

/// What learning a source address did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    New,
    Refreshed,
    Moved {
        from: usize,
    },
    /// multicast/zero source, or a static entry for another port
    Ignored,
}

/// Where a frame goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    /// One known port.
    Port(usize),
    /// Every port but the ingress port.
    Flood,
    /// The destination lives on the ingress port: nothing to send.
    Filtered,
}

#[derive(Debug)]
pub struct Fdb {
    map: HashMap<[u8; 6], Entry>,
    aging: Duration,
    max: usize,
    /// dynamic entries evicted because the table was full
    pub evicted: u64,
}

impl Fdb {
    pub fn new(aging: Duration, max: usize) -> Fdb {
        Fdb {
            map: HashMap::new(),
            aging,
            max: max.max(1),
            evicted: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// A permanent entry: never aged, never moved by learning.
    pub fn add_static(&mut self, mac: [u8; 6], port: usize, now: Instant) {
        self.map.insert(
            mac,
            Entry {
                port,
                last_seen: now,
                is_static: true,
            },
        );
    }

    /// Replace every static entry with `entries` (a reload's new list). Learnt entries
    /// stay, except where a new static entry takes their address over; an address that is
    /// no longer static is learnt again from its next frame.
    pub fn set_static(&mut self, entries: &[([u8; 6], usize)], now: Instant) {
        self.map.retain(|_, e| !e.is_static);
        for &(mac, port) in entries {
            self.add_static(mac, port, now);
        }
    }

    /// Learn that `mac` lives behind `port`.
    pub fn learn(&mut self, mac: [u8; 6], port: usize, now: Instant) -> Learned {
        if is_multicast(&mac) || mac == [0; 6] {
            return Learned::Ignored;
        }
        if let Some(e) = self.map.get_mut(&mac) {
            if e.is_static {
                return Learned::Ignored;
            }
            let expired = now.saturating_duration_since(e.last_seen) > self.aging;
            let from = e.port;
            e.last_seen = now;
            e.port = port;
            return if from == port {
                if expired {
                    Learned::New
                } else {
                    Learned::Refreshed
                }
            } else {
                Learned::Moved { from }
            };
        }
        if self.map.len() >= self.max {
            self.expire(now);
        }
        if self.map.len() >= self.max {
            self.evict_oldest();
        }
        self.map.insert(
            mac,
            Entry {
                port,
                last_seen: now,
                is_static: false,
            },
        );
        Learned::New
    }

    fn evict_oldest(&mut self) {
        let oldest = self
            .map
            .iter()
            .filter(|(_, e)| !e.is_static)
            .min_by_key(|(_, e)| e.last_seen)
            .map(|(m, _)| *m);
        if let Some(m) = oldest {
            self.map.remove(&m);
            self.evicted += 1;
        }
    }

    /// The port `mac` was last seen on, unless that is older than the aging time.
    pub fn lookup(&self, mac: &[u8; 6], now: Instant) -> Option<usize> {
        self.map
            .get(mac)
            .filter(|e| e.is_static || now.saturating_duration_since(e.last_seen) <= self.aging)
            .map(|e| e.port)
    }

    /// Where a frame to `dst` that arrived on `ingress` goes.
    pub fn out(&self, dst: &[u8; 6], ingress: usize, now: Instant) -> Out {
        if is_multicast(dst) {
            return Out::Flood;
        }
        match self.lookup(dst, now) {
            Some(p) if p == ingress => Out::Filtered,
            Some(p) => Out::Port(p),
            None => Out::Flood,
        }
    }

    /// Remove dynamic entries older than the aging time; how many went.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.map.len();
        let aging = self.aging;
        self.map
            .retain(|_, e| e.is_static || now.saturating_duration_since(e.last_seen) <= aging);
        before - self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];
    const C: [u8; 6] = [2, 0, 0, 0, 0, 0xc];
    const BCAST: [u8; 6] = [0xff; 6];

    fn fdb() -> (Fdb, Instant) {
        (Fdb::new(Duration::from_secs(300), 100), Instant::now())
    }

    #[test]
    fn learning_and_forwarding() {
        let (mut f, t) = fdb();
        assert_eq!(f.out(&A, 1, t), Out::Flood, "unknown unicast floods");
        assert_eq!(f.learn(A, 0, t), Learned::New);
        assert_eq!(f.learn(A, 0, t), Learned::Refreshed);
        assert_eq!(f.out(&A, 1, t), Out::Port(0));
        assert_eq!(
            f.out(&A, 0, t),
            Out::Filtered,
            "never back out of the ingress port"
        );
        assert_eq!(f.out(&BCAST, 1, t), Out::Flood);
        assert_eq!(f.out(&[0x33, 0x33, 0, 0, 0, 1], 1, t), Out::Flood);
        assert_eq!(f.learn(BCAST, 1, t), Learned::Ignored);
        assert_eq!(f.learn([0; 6], 1, t), Learned::Ignored);
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn aging_with_injected_time() {
        let (mut f, t) = fdb();
        f.learn(A, 0, t);
        f.learn(B, 1, t + Duration::from_secs(200));
        let later = t + Duration::from_secs(301);
        assert_eq!(f.lookup(&A, later), None, "aged out");
        assert_eq!(f.out(&A, 1, later), Out::Flood);
        assert_eq!(f.lookup(&B, later), Some(1));
        assert_eq!(f.expire(later), 1);
        assert_eq!(f.len(), 1);
        // refresh keeps an entry alive
        f.learn(B, 1, later);
        assert_eq!(f.lookup(&B, later + Duration::from_secs(299)), Some(1));
    }

    #[test]
    fn move_between_ports() {
        let (mut f, t) = fdb();
        f.learn(A, 0, t);
        assert_eq!(f.learn(A, 2, t), Learned::Moved { from: 0 });
        assert_eq!(f.out(&A, 0, t), Out::Port(2));
    }

    #[test]
    fn static_entries_stay() {
        let (mut f, t) = fdb();
        f.add_static(C, 3, t);
        assert_eq!(f.learn(C, 0, t), Learned::Ignored);
        let much_later = t + Duration::from_secs(10_000);
        assert_eq!(f.lookup(&C, much_later), Some(3));
        f.expire(much_later);
        assert_eq!(f.lookup(&C, much_later), Some(3));
    }

    #[test]
    fn static_entries_replaced() {
        let (mut f, t) = fdb();
        f.add_static(C, 3, t);
        f.learn(A, 0, t);
        f.learn(B, 1, t);
        // C is no longer static, A becomes static on another port, B stays learnt
        f.set_static(&[(A, 2)], t);
        assert_eq!(f.lookup(&C, t), None, "the old static entry went");
        assert_eq!(f.learn(A, 0, t), Learned::Ignored, "A is static now");
        assert_eq!(f.lookup(&A, t), Some(2));
        assert_eq!(f.lookup(&B, t), Some(1), "learnt entries stay");
        assert_eq!(f.learn(C, 0, t), Learned::New, "C is learnt again");
        let much_later = t + Duration::from_secs(10_000);
        f.expire(much_later);
        assert_eq!(
            f.lookup(&A, much_later),
            Some(2),
            "new static entries do not age"
        );
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn bound_evicts_oldest() {
        let mut f = Fdb::new(Duration::from_secs(300), 3);
        let t = Instant::now();
        f.add_static(C, 9, t);
        f.learn(A, 0, t);
        f.learn(B, 1, t + Duration::from_secs(1));
        let d = [2, 0, 0, 0, 0, 0xd];
        f.learn(d, 2, t + Duration::from_secs(2));
        assert_eq!(f.len(), 3);
        assert_eq!(f.evicted, 1);
        assert_eq!(f.lookup(&A, t), None, "the oldest dynamic entry went");
        assert_eq!(f.lookup(&C, t), Some(9), "static entries are not evicted");
        assert_eq!(f.lookup(&d, t + Duration::from_secs(2)), Some(2));
        // aged entries go before live ones
        let e = [2, 0, 0, 0, 0, 0xe];
        let later = t + Duration::from_secs(302);
        f.learn(e, 0, later);
        assert_eq!(f.lookup(&d, later), Some(2));
        assert_eq!(f.lookup(&e, later), Some(0));
    }
}
