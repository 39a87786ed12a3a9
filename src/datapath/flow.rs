//! Per-flow decisions: the first packet of a flow is classified, the rest follow that
//! decision until the flow has been idle for the timeout. This is what keeps established
//! flows on their path across a policy swap (the userspace twin of conntrack-mark pinning).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::classify::{Decision, PacketInfo};

pub const DEFAULT_IDLE: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_FLOWS: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub iif: usize,
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub ports: Option<(u16, u16)>,
}

impl FlowKey {
    pub fn of(iif: usize, p: &PacketInfo) -> FlowKey {
        FlowKey {
            iif,
            vlan: p.vlan,
            src: p.src,
            dst: p.dst,
            proto: p.l4proto,
            ports: p.ports,
        }
    }
}

/// What the userspace datapath pins per flow: the policy's decision and, for a `dr` rule,
/// the realserver MAC its bucket had when the flow started (so a later bucket change, from
/// health, moves new flows only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin {
    pub decision: Decision,
    pub dr_mac: Option<[u8; 6]>,
}

impl From<Decision> for Pin {
    fn from(decision: Decision) -> Pin {
        Pin {
            decision,
            dr_mac: None,
        }
    }
}

/// Flows and what each is pinned to (`T`: a [`Decision`], or the datapath's [`Pin`]).
#[derive(Debug)]
pub struct FlowTable<T: Copy = Decision> {
    /// decision, last seen, and the policy sequence number it was decided under
    map: HashMap<FlowKey, (T, Instant, u64)>,
    idle: Duration,
    max: usize,
    last_sweep: Option<Instant>,
}

impl<T: Copy> FlowTable<T> {
    pub fn new(idle: Duration, max: usize) -> FlowTable<T> {
        FlowTable {
            map: HashMap::new(),
            idle,
            max,
            last_sweep: None,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The flow's decision, deciding with `decide` on its first packet (or after it idled
    /// out). When the table is full, packets of new flows are decided each time, uncached.
    pub fn decide(&mut self, key: FlowKey, now: Instant, decide: impl FnOnce() -> T) -> T {
        self.decide_seq(key, now, 0, decide).0
    }

    /// [`FlowTable::decide`], also saying under which policy (`seq`, the caller's numbering)
    /// the decision was made, so rule indexes of older policies are not miscounted.
    pub fn decide_seq(
        &mut self,
        key: FlowKey,
        now: Instant,
        seq: u64,
        decide: impl FnOnce() -> T,
    ) -> (T, u64) {
        if let Some((d, seen, s)) = self.map.get_mut(&key)
            && now.saturating_duration_since(*seen) <= self.idle
        {
            *seen = now;
            return (*d, *s);
        }
        let d = decide();
        if self.map.len() >= self.max {
            self.expire(now);
        }
        if self.map.len() < self.max || self.map.contains_key(&key) {
            self.map.insert(key, (d, now, seq));
        }
        (d, seq)
    }

    /// Drop idle flows (at most once a second).
    pub fn sweep(&mut self, now: Instant) {
        if super::due_once_a_second(&mut self.last_sweep, now) {
            self.expire(now);
        }
    }

    fn expire(&mut self, now: Instant) {
        let idle = self.idle;
        self.map
            .retain(|_, (_, seen, _)| now.saturating_duration_since(*seen) <= idle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(sport: u16) -> FlowKey {
        FlowKey {
            iif: 0,
            vlan: None,
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            proto: 6,
            ports: Some((sport, 80)),
        }
    }

    #[test]
    fn first_decision_sticks_until_idle() {
        let mut ft = FlowTable::new(Duration::from_secs(10), 10);
        let t = Instant::now();
        assert_eq!(ft.decide(key(1), t, || Decision::Bridge), Decision::Bridge);
        // a new policy would drop it, but the flow keeps its path
        let d = ft.decide(key(1), t + Duration::from_secs(5), || Decision::Drop {
            rule: 0,
        });
        assert_eq!(d, Decision::Bridge);
        // new flows follow the new policy
        assert_eq!(
            ft.decide(key(2), t, || Decision::Drop { rule: 0 }),
            Decision::Drop { rule: 0 }
        );
        // after idling out, decided again
        let d = ft.decide(key(1), t + Duration::from_secs(16), || Decision::Drop {
            rule: 0,
        });
        assert_eq!(d, Decision::Drop { rule: 0 });
    }

    #[test]
    fn decisions_remember_their_policy() {
        let mut ft = FlowTable::new(Duration::from_secs(10), 10);
        let t = Instant::now();
        let d = Decision::Pass { rule: 3 };
        assert_eq!(ft.decide_seq(key(1), t, 7, || d), (d, 7));
        assert_eq!(ft.decide_seq(key(1), t, 8, || Decision::Bridge), (d, 7));
        assert_eq!(
            ft.decide_seq(key(2), t, 8, || Decision::Bridge),
            (Decision::Bridge, 8)
        );
    }

    #[test]
    fn bounded() {
        let mut ft = FlowTable::new(Duration::from_secs(10), 2);
        let t = Instant::now();
        for p in 0..5 {
            ft.decide(key(p), t, || Decision::Bridge);
        }
        assert_eq!(ft.len(), 2);
        ft.sweep(t + Duration::from_secs(11));
        assert!(ft.is_empty());
    }
}
