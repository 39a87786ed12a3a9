//! Per-flow decisions: the first packet of a flow is classified, the rest follow that
//! decision until the flow has been idle for its timeout. This is what keeps established
//! flows on their path across a policy swap (the userspace twin of conntrack-mark pinning).
//!
//! Timeouts, per direction (each direction of a connection is a flow of its own): once a TCP
//! packet without SYN has passed (the handshake is done), the connection stays pinned as
//! long as the kernel datapath's pins ([`crate::nft::compile::PIN_TIMEOUT_S`], 3 h: idle
//! connections with the default keepalive keep their path); once a FIN or RST has passed,
//! the entry goes after [`CLOSING_IDLE`]. Everything else, SYNs of a connection not (yet)
//! open included (a dropped SYN's retransmissions), goes after the table's idle time (300 s
//! by default). So closed connections do not fill the table for hours.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::classify::{Decision, PacketInfo};

/// Idle timeout of flows other than open or closing TCP connections.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_FLOWS: usize = 256 * 1024;
/// Idle timeout of an open TCP connection: the kernel datapath's pin timeout.
pub const TCP_OPEN_IDLE: Duration = Duration::from_secs(crate::nft::compile::PIN_TIMEOUT_S);
/// Idle timeout of a TCP direction after its FIN or RST (the other side's last data and
/// ACKs, retransmissions of the FIN).
pub const CLOSING_IDLE: Duration = Duration::from_secs(30);

const TCP_FIN_OR_RST: u8 = 0x01 | 0x04;
const TCP_SYN: u8 = 0x02;

/// Where a flow is in its life, for its idle timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// not TCP, or TCP with only SYNs so far: the table's idle time
    Other,
    /// TCP past its handshake: [`TCP_OPEN_IDLE`]
    Open,
    /// TCP after its FIN or RST: [`CLOSING_IDLE`]
    Closing,
}

impl Stage {
    /// The stage after a packet with `tcp_flags` (`before`: `None` for a new flow).
    fn after(key: &FlowKey, tcp_flags: u8, before: Option<Stage>) -> Stage {
        if key.proto != 6 {
            Stage::Other
        } else if tcp_flags & TCP_FIN_OR_RST != 0 || before == Some(Stage::Closing) {
            Stage::Closing
        } else if tcp_flags & TCP_SYN != 0 {
            before.unwrap_or(Stage::Other)
        } else {
            Stage::Open
        }
    }

    /// How long a flow in this stage may idle; `other`: the table's idle time.
    fn idle(self, other: Duration) -> Duration {
        match self {
            Stage::Other => other,
            Stage::Open => TCP_OPEN_IDLE,
            Stage::Closing => CLOSING_IDLE,
        }
    }
}

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
    /// The rule that matched but whose target was down: `decision` is then its
    /// `on_unhealthy` (bridge or drop), and the flow's frames count as that rule's unhealthy.
    pub unhealthy: Option<usize>,
    /// The first rule whose exemptions returned the flow before it was decided.
    pub exempted: Option<usize>,
}

impl From<Decision> for Pin {
    fn from(decision: Decision) -> Pin {
        Pin {
            decision,
            dr_mac: None,
            unhealthy: None,
            exempted: None,
        }
    }
}

/// One flow: what it is pinned to, when it was last seen, under which policy (the caller's
/// sequence number) it was decided, and its stage.
#[derive(Debug, Clone, Copy)]
struct Entry<T> {
    pin: T,
    seen: Instant,
    seq: u64,
    stage: Stage,
}

/// Flows and what each is pinned to (`T`: a [`Decision`], or the datapath's [`Pin`]).
#[derive(Debug)]
pub struct FlowTable<T: Copy = Decision> {
    map: HashMap<FlowKey, Entry<T>>,
    /// idle timeout of flows other than open or closing TCP connections
    idle: Duration,
    max: usize,
    last_sweep: Option<Instant>,
}

impl<T: Copy> FlowTable<T> {
    /// `idle`: the idle timeout of flows other than open or closing TCP connections.
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
    /// (No TCP flags: a TCP flow counts as open.)
    pub fn decide(&mut self, key: FlowKey, now: Instant, decide: impl FnOnce() -> T) -> T {
        self.decide_seq(key, now, 0, 0, decide).0
    }

    /// [`FlowTable::decide`] for a packet with `tcp_flags` (0 for other protocols), also
    /// saying under which policy (`seq`, the caller's numbering) the decision was made, so
    /// rule indexes of older policies are not miscounted.
    pub fn decide_seq(
        &mut self,
        key: FlowKey,
        now: Instant,
        seq: u64,
        tcp_flags: u8,
        decide: impl FnOnce() -> T,
    ) -> (T, u64) {
        let idle = self.idle;
        if let Some(e) = self.map.get_mut(&key)
            && now.saturating_duration_since(e.seen) <= e.stage.idle(idle)
        {
            e.seen = now;
            e.stage = Stage::after(&key, tcp_flags, Some(e.stage));
            return (e.pin, e.seq);
        }
        let pin = decide();
        if self.map.len() >= self.max {
            // at most one scan a second: a full table of live flows must not cost a scan
            // per new flow
            self.sweep(now);
        }
        if self.map.len() < self.max || self.map.contains_key(&key) {
            let stage = Stage::after(&key, tcp_flags, None);
            self.map.insert(
                key,
                Entry {
                    pin,
                    seen: now,
                    seq,
                    stage,
                },
            );
        }
        (pin, seq)
    }

    /// Drop idle flows (at most once a second).
    pub fn sweep(&mut self, now: Instant) {
        if super::due_once_a_second(&mut self.last_sweep, now) {
            let idle = self.idle;
            self.map
                .retain(|_, e| now.saturating_duration_since(e.seen) <= e.stage.idle(idle));
        }
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
            proto: 17,
            ports: Some((sport, 53)),
        }
    }

    fn tcp(sport: u16) -> FlowKey {
        FlowKey {
            proto: 6,
            ports: Some((sport, 80)),
            ..key(sport)
        }
    }

    /// An open TCP connection stays pinned as long as the kernel's pins (past the table's
    /// idle time), a direction that saw FIN or RST goes after CLOSING_IDLE, and stays
    /// closing whatever comes after.
    #[test]
    fn tcp_connections_stay_pinned_until_closed() {
        let mut ft = FlowTable::new(Duration::from_secs(10), 10);
        let t = Instant::now();
        let seen = |ft: &mut FlowTable, k, at, flags| {
            ft.decide_seq(k, t + at, 0, flags, || Decision::Drop { rule: 0 })
                .0
        };
        let hour = Duration::from_secs(3600);
        // SYNs only (a connection not open, e.g. a dropped one's retransmissions): the
        // table's idle time
        ft.decide_seq(tcp(9), t, 0, 0x02, || Decision::Drop { rule: 0 });
        ft.decide_seq(tcp(9), t + Duration::from_secs(3), 0, 0x02, || {
            Decision::Bridge
        });
        ft.sweep(t + Duration::from_secs(14));
        assert_eq!(ft.len(), 0, "a SYN-only flow idles out like any other");
        // open connections: SYN, then a packet without SYN
        assert_eq!(
            seen(&mut ft, tcp(1), Duration::ZERO, 0x02),
            Decision::Drop { rule: 0 }
        );
        ft.decide_seq(tcp(2), t, 0, 0x02, || Decision::Bridge);
        ft.decide_seq(tcp(3), t, 0, 0x02, || Decision::Bridge);
        for k in [tcp(1), tcp(2), tcp(3)] {
            ft.decide_seq(k, t, 0, 0x10, || Decision::Bridge);
        }
        // idle for two hours, still pinned (the table's own idle time is 10 s)
        assert_eq!(seen(&mut ft, tcp(2), 2 * hour, 0x10), Decision::Bridge);
        // FIN: closing; later packets (ACKs) keep it closing
        assert_eq!(seen(&mut ft, tcp(3), 2 * hour, 0x11), Decision::Bridge);
        assert_eq!(
            seen(&mut ft, tcp(3), 2 * hour + Duration::from_secs(20), 0x10),
            Decision::Bridge
        );
        ft.sweep(t + 2 * hour + CLOSING_IDLE + Duration::from_secs(21));
        assert_eq!(ft.len(), 2, "the closed direction went, the open ones stay");
        // RST works the same
        let rst = 2 * hour + Duration::from_secs(60);
        ft.decide_seq(tcp(2), t + rst, 0, 0x04, || Decision::Bridge);
        ft.sweep(t + rst + CLOSING_IDLE + Duration::from_secs(1));
        assert_eq!(ft.len(), 1);
        // and past the pin timeout an idle connection is decided again
        assert_eq!(
            seen(
                &mut ft,
                tcp(1),
                TCP_OPEN_IDLE + Duration::from_secs(1),
                0x10
            ),
            Decision::Drop { rule: 0 }
        );
    }

    /// A full table of live flows: new flows are decided uncached, and only a sweep (at most
    /// once a second) makes room.
    #[test]
    fn a_full_table_makes_room_once_a_second() {
        let mut ft = FlowTable::new(Duration::from_secs(10), 2);
        let t = Instant::now();
        ft.decide(key(1), t, || Decision::Bridge);
        ft.decide(key(2), t, || Decision::Bridge);
        ft.sweep(t); // the second's sweep is spent
        // key(1) and key(2) idle out at t + 10 s; within the same second no room is made
        ft.decide(key(3), t + Duration::from_millis(500), || Decision::Bridge);
        assert_eq!(ft.len(), 2);
        ft.decide(key(3), t + Duration::from_secs(11), || Decision::Bridge);
        assert_eq!(ft.len(), 1, "swept, then key(3) cached");
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
        assert_eq!(ft.decide_seq(key(1), t, 7, 0, || d), (d, 7));
        assert_eq!(ft.decide_seq(key(1), t, 8, 0, || Decision::Bridge), (d, 7));
        assert_eq!(
            ft.decide_seq(key(2), t, 8, 0, || Decision::Bridge),
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
