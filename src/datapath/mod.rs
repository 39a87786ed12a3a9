//! The userspace datapath (`datapath = "userspace"`): brdivert bridges frames itself.
//!
//! - Every port is an AF_PACKET socket ([`port`]); the local port is a TAP device named after
//!   the bridge ([`tap`]) carrying the bridge's addresses, bridged like any other port.
//! - Dedicated forwarding threads (not tokio; one per port, at most one per CPU, the ports
//!   shared out among them) receive a batch per port (from the port's mapped ring,
//!   [`port::RxRing`], or with `recvmmsg`), classify each IP frame with the same policy as
//!   the kernel datapath ([`crate::classify`]), learn source MACs in the shared [`fdb`], and
//!   send per destination port in one `sendmmsg`. A thread that just forwarded keeps
//!   polling for [`Options::spin`] before it sleeps, while traffic flows both ways
//!   ([`Shared::two_way`]): waking a sleeping thread costs more than the whole forwarding
//!   work of a frame.
//! - A diverted frame gets the frame diverter's move: destination MAC := the TAP's MAC, and
//!   it is written to the TAP only. The TAP cannot carry a packet mark, so the rule's tag
//!   rides in the frame's source MAC ([`frame::tag_mac`]) and one nft rule per diverting rule
//!   on the TAP's ingress turns it back into the mark the usual local-stack rules (REDIRECT,
//!   TPROXY, fwmark) match on ([`local_rules`]).
//! - Decisions are made on the first packet of a flow and cached ([`flow`]) so a policy swap
//!   ([`Datapath::swap_policy`]) leaves established flows on their path.
//! - `decide = "queue"` rules: the first frame of a new flow is decided inline, on this
//!   thread, by the same decider the NFQUEUE engine runs ([`crate::queue::InlineDecider`],
//!   [`Options::decider`]); the verdict is pinned in the flow table like any decision.
//! - `action = "dr"`: the destination MAC becomes the realserver's that the flow's bucket
//!   names ([`crate::dr`], the kernel datapath's assignment), pinned per flow; the frame is
//!   bridged to that MAC's port (flooded if unknown), never to the local port.
//!
//! Frames carry a `virtio_net_hdr` end to end (AF_PACKET `PACKET_VNET_HDR`, TAP
//! `IFF_VNET_HDR`), so GSO/GRO super-frames and checksum-partial frames cross intact.
//!
//! STP policy: BPDUs (01:80:c2:00:00:00) are forwarded transparently, like a Linux bridge
//! with STP off; the other IEEE link-local groups (…:01 to …:0f: pause, LACP, 802.1X, LLDP)
//! are not forwarded, as a Linux bridge's default `group_fwd_mask`.
//!
//! Without the process nothing is bridged: killing the daemon stops traffic until it is
//! restarted (systemd `Restart=always`).

pub mod fdb;
pub mod flow;
pub mod frame;
pub mod local_rules;
pub mod port;
mod sys;
pub mod tap;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::classify::{self, Decision, PacketInfo, RuleMatch};
use crate::daemon::counters::{Count, RuleCounts};
use crate::policy::{Action, Decide, DivertRule, OnUnhealthy, Policy};
use crate::queue::{InlineDecider, Verdict as QueueVerdict};
use crate::settings::{Datapath as DatapathKind, Settings};

use fdb::{Fdb, Out};
use flow::{FlowKey, FlowTable, Pin};
use frame::{VNET_HDR_LEN, VnetHdr};
use port::{PacketPort, RxBatch, RxRing, TxBatch};
use tap::Tap;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("bridge.datapath is not \"userspace\"; the kernel datapath is set up by `apply`")]
    NotUserspace,
    #[error("port {port:?}: {source}")]
    Port { port: String, source: io::Error },
    #[error("local port (TAP) {name:?}: {source}")]
    Tap { name: String, source: io::Error },
    #[error("static FDB entry names {port:?}, which is not a port of this bridge")]
    UnknownStaticPort { port: String },
    #[error("starting a datapath thread: {0}")]
    Thread(io::Error),
}

/// [`Options::spin`] unless set (`[bridge] busy_poll_us`). A sleeping thread takes tens of
/// microseconds to wake for the next frame (measured: 45 us per crossing on a 2-CPU VM whose
/// idle vCPUs halt at once, against the kernel bridge's 4; ~15 us with guest halt polling);
/// polling this long after traffic catches the next frame of a request/response exchange
/// at once, and costs nothing when the bridge is idle.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(200);

/// How many forwarding threads serve `ports` ports (the local port included) for
/// [`Options::threads`] = `wanted`: 0 means one per port, at most one per CPU; never more
/// threads than ports.
pub fn forwarding_threads(wanted: usize, ports: usize) -> usize {
    match wanted {
        0 => ports.min(std::thread::available_parallelism().map_or(ports, |c| c.get())),
        t => t.min(ports),
    }
    .max(1)
}

/// Tunables (the defaults suit a small inline box).
#[derive(Debug, Clone)]
pub struct Options {
    /// Frames per `recvmmsg`/`sendmmsg`.
    pub batch: usize,
    pub fdb_aging: Duration,
    pub fdb_max: usize,
    pub flow_idle: Duration,
    pub flow_max: usize,
    /// Permanent FDB entries: MAC -> port name (a port of `bridge.ports` or `bridge.name`).
    pub static_fdb: Vec<([u8; 6], String)>,
    /// Forwarding threads, the ports (the local port included) dealt out among them; 0: one
    /// per port, at most one per CPU.
    pub threads: usize,
    /// How long a thread keeps polling its ports (yielding the CPU between polls) after it
    /// last received a frame, while frames arrive on two ports or more; zero: it sleeps as
    /// soon as they are empty.
    pub spin: Duration,
    /// Receive on the ports through a mapped ring ([`RxRing`]) rather than `recvmmsg`
    /// (falls back to `recvmmsg`, with a warning, where the kernel refuses the ring).
    pub rx_ring: bool,
    /// Decides new flows of `decide = "queue"` rules (the daemon's `PolicyDecider`). Without
    /// one they are bridged undecided, as the kernel datapath's queue rules bypass when no
    /// daemon listens.
    pub decider: Option<Arc<InlineDecider>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            batch: 64,
            fdb_aging: fdb::DEFAULT_AGING,
            fdb_max: fdb::DEFAULT_MAX_ENTRIES,
            flow_idle: flow::DEFAULT_IDLE,
            flow_max: flow::DEFAULT_MAX_FLOWS,
            static_fdb: Vec::new(),
            threads: 0,
            spin: DEFAULT_SPIN,
            rx_ring: true,
            decider: None,
        }
    }
}

impl Options {
    /// The defaults with what the settings say: `[bridge] static_fdb`, `threads`,
    /// `busy_poll_us`.
    pub fn from_settings(settings: &Settings) -> Options {
        let b = &settings.bridge;
        Options {
            static_fdb: b.static_fdb_entries(),
            threads: b.threads.unwrap_or(0),
            spin: b.busy_poll_us.map_or(DEFAULT_SPIN, Duration::from_micros),
            ..Options::default()
        }
    }
}

enum Io {
    Packet(PacketPort),
    Tap(Tap),
}

impl Io {
    fn recv_now(&self, b: &mut RxBatch) -> io::Result<usize> {
        match self {
            Io::Packet(p) => p.recv_now(b),
            Io::Tap(p) => p.recv_now(b),
        }
    }

    fn raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Io::Packet(p) => p.raw_fd(),
            Io::Tap(p) => p.raw_fd(),
        }
    }

    fn send(&self, tx: &mut TxBatch, frames: &[&[u8]]) -> usize {
        match self {
            Io::Packet(p) => p.send(tx, frames),
            Io::Tap(p) => p.send(frames),
        }
    }
}

#[derive(Default)]
struct PortCounters {
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    tx_frames: AtomicU64,
    tx_errors: AtomicU64,
    mtu_dropped: AtomicU64,
    rx_bad: AtomicU64,
    rx_copied: AtomicU64,
    /// frames the kernel dropped on the port's socket, as of the last [`Datapath::stats`]
    rx_full: AtomicU64,
    /// whether the port receives through a mapped ring ([`RxRing`])
    rx_ring: AtomicBool,
    /// when the port last received ([`Shared::stamp`]; 0: never)
    last_rx: AtomicU64,
}

#[derive(Default)]
struct Counters {
    diverted: AtomicU64,
    policy_dropped: AtomicU64,
    passed: AtomicU64,
    flooded: AtomicU64,
    link_local_dropped: AtomicU64,
    dr_forwarded: AtomicU64,
}

/// Per `dr` rule (by name): the realserver MAC of each bucket ([`crate::dr::bucket_macs`]).
pub type DrBuckets = HashMap<String, Vec<Option<[u8; 6]>>>;

/// What the `dr` buckets are computed from besides the policy: MACs learned for realservers
/// given by address, and the health-check keys of realservers that are down.
#[derive(Debug, Clone, Default)]
struct DrInputs {
    neighbours: BTreeMap<IpAddr, [u8; 6]>,
    down: BTreeSet<String>,
}

fn dr_buckets_for(policy: &Policy, inputs: &DrInputs) -> Arc<DrBuckets> {
    Arc::new(
        policy
            .rules
            .iter()
            .filter(|r| r.action == Action::Dr)
            .map(|r| {
                (
                    r.name.clone(),
                    crate::dr::bucket_macs(r, &inputs.neighbours, &inputs.down),
                )
            })
            .collect(),
    )
}

/// The policy in force for new flows, its sequence number (bumped by every swap) and its
/// `dr` buckets: swapped together, so a worker never sees a policy without its buckets.
#[derive(Clone)]
struct Current {
    policy: Arc<Policy>,
    seq: u64,
    dr: Arc<DrBuckets>,
}

struct Shared {
    ports: Vec<Io>,
    names: Vec<String>,
    mtu: Vec<u32>,
    tap_index: usize,
    tap_mac: [u8; 6],
    fdb: Mutex<Fdb>,
    policy: RwLock<Current>,
    dr_inputs: Mutex<DrInputs>,
    /// what each rule took, by rule name, since start
    rule_hits: Mutex<HashMap<String, RuleCounts>>,
    /// names of rules whose health check says their target is down
    down: RwLock<Arc<HashSet<String>>>,
    generation: AtomicU64,
    stop: AtomicBool,
    port_counters: Vec<PortCounters>,
    counters: Counters,
    opts: Options,
    /// the origin of [`Shared::stamp`]
    epoch: Instant,
}

impl Shared {
    /// `t` as nanoseconds since the datapath started, plus one (0 stays "never").
    fn stamp(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64 + 1
    }

    /// Whether frames arrived on two ports or more within [`Options::spin`] before `now`:
    /// traffic flows both ways, an exchange whose other side waits for the next frame.
    /// Busy polling pays there; for a one-way stream nobody waits, and sleeping until the
    /// next frame costs less CPU than polling for it.
    fn two_way(&self, now: Instant) -> bool {
        let since = self
            .stamp(now)
            .saturating_sub(self.opts.spin.as_nanos() as u64);
        received_on_two_ports(
            self.port_counters
                .iter()
                .map(|c| c.last_rx.load(Ordering::Relaxed)),
            since,
        )
    }
}

/// Whether two of the ports' last-receive stamps are later than `since`.
fn received_on_two_ports(last_rx: impl IntoIterator<Item = u64>, since: u64) -> bool {
    last_rx.into_iter().filter(|&t| t > since).nth(1).is_some()
}

/// Counters of one port.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortStats {
    pub name: String,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_errors: u64,
    pub mtu_dropped: u64,
    pub rx_bad: u64,
    /// The port receives through a mapped ring ([`Options::rx_ring`]), not `recvmmsg`.
    pub rx_ring: bool,
    /// Frames too big for a ring slot (GSO super-frames, jumbo frames), read whole from the
    /// socket instead.
    pub rx_copied: u64,
    /// Frames the kernel dropped because the port's ring (or socket queue) was full: the
    /// datapath fell behind. Not counted for the local port (TAP).
    #[serde(default)]
    pub rx_full: u64,
}

/// A snapshot of the datapath's counters (in `brdivert status` as `userspace`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    /// `bridge.ports` in order, then the local port (TAP).
    pub ports: Vec<PortStats>,
    pub diverted: u64,
    pub policy_dropped: u64,
    pub passed: u64,
    pub flooded: u64,
    pub link_local_dropped: u64,
    /// Frames of `dr` flows sent towards their realserver.
    pub dr_forwarded: u64,
    pub fdb_entries: usize,
    pub fdb_evicted: u64,
    pub policy_generation: u64,
    /// What each rule took, by rule name, sorted, in the rows the kernel datapath's rule
    /// counters fill: `diverted`, the frames its action took (diverted, passed or dropped; a
    /// `dr` rule's: sent to a realserver; a `decide = "queue"` rule's: as its decider said);
    /// `unhealthy`, frames of flows decided while its target was down; `exempted`, frames of
    /// flows its `except_src`/`except_dst` returned (counted for the first rule that exempted
    /// the flow, where the kernel counts every such rule). Bytes are L3 bytes (after the
    /// Ethernet header and VLAN tags), as the kernel's counters count them at the bridge
    /// hooks; a GSO super-frame counts once, as it does there. Frames of flows decided under
    /// an earlier policy count under that policy's rule names too.
    pub rules: Vec<(String, RuleCounts)>,
}

/// The running userspace datapath. Dropping it stops it too.
pub struct Datapath {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("ports", &self.shared.names)
            .field("tap_mac", &self.shared.tap_mac)
            .finish()
    }
}

impl Datapath {
    /// Open the ports, create the TAP local port (`bridge.name`, with `bridge.address`), and
    /// start the forwarding threads. Runs in the caller's network namespace.
    pub fn start(settings: &Settings, policy: Arc<Policy>) -> Result<Datapath, DatapathError> {
        Datapath::start_with(settings, policy, Options::default())
    }

    pub fn start_with(
        settings: &Settings,
        policy: Arc<Policy>,
        opts: Options,
    ) -> Result<Datapath, DatapathError> {
        if settings.bridge.datapath != DatapathKind::Userspace {
            return Err(DatapathError::NotUserspace);
        }
        let mut ports = Vec::new();
        let mut names = Vec::new();
        let mut mtu = Vec::new();
        for name in &settings.bridge.ports {
            let p = PacketPort::open(name).map_err(|source| DatapathError::Port {
                port: name.clone(),
                source,
            })?;
            names.push(p.name.clone());
            mtu.push(p.mtu);
            ports.push(Io::Packet(p));
        }
        let tap_name = settings.bridge.name.clone();
        let tap_err = |source| DatapathError::Tap {
            name: tap_name.clone(),
            source,
        };
        let tap = Tap::create(&tap_name, mtu.iter().copied().min()).map_err(tap_err)?;
        tap::add_addresses(tap.ifindex as u32, &settings.bridge.address).map_err(tap_err)?;
        let tap_index = ports.len();
        let tap_mac = tap.mac;
        names.push(tap.name.clone());
        mtu.push(tap.mtu);
        ports.push(Io::Tap(tap));

        let now = Instant::now();
        let mut fdb = Fdb::new(opts.fdb_aging, opts.fdb_max);
        fdb.set_static(
            &static_entries(&names, (tap_mac, tap_index), &opts.static_fdb)?,
            now,
        );
        let n = ports.len();
        let mut rings: Vec<Option<RxRing>> = ports
            .iter()
            .map(|p| match p {
                Io::Packet(p) if opts.rx_ring => RxRing::attach(p)
                    .inspect_err(|e| tracing::warn!("{e}; receiving with recvmmsg instead"))
                    .ok(),
                _ => None,
            })
            .collect();
        let shared = Arc::new(Shared {
            ports,
            names,
            mtu,
            tap_index,
            tap_mac,
            fdb: Mutex::new(fdb),
            policy: RwLock::new(Current {
                dr: dr_buckets_for(&policy, &DrInputs::default()),
                policy,
                seq: 0,
            }),
            dr_inputs: Mutex::new(DrInputs::default()),
            rule_hits: Mutex::new(HashMap::new()),
            down: RwLock::new(Arc::new(HashSet::new())),
            generation: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            port_counters: rings
                .iter()
                .map(|r| PortCounters {
                    rx_ring: AtomicBool::new(r.is_some()),
                    ..PortCounters::default()
                })
                .collect(),
            counters: Counters::default(),
            opts,
            epoch: now,
        });
        let mut dp = Datapath {
            shared: shared.clone(),
            threads: Vec::new(),
        };
        let threads = forwarding_threads(shared.opts.threads, n);
        for t in 0..threads {
            let sh = shared.clone();
            let mine: Vec<usize> = (t..n).step_by(threads).collect();
            let my_rings = mine.iter().map(|&p| rings[p].take()).collect();
            let name = match threads {
                1 => "brdivert-fwd".to_string(),
                _ if threads == n => format!("brdivert-{}", sh.names[t]),
                _ => format!("brdivert-fwd{t}"),
            };
            let t = std::thread::Builder::new()
                .name(name)
                .spawn(move || Worker::new(sh, mine, my_rings).run())
                .map_err(DatapathError::Thread)?;
            dp.threads.push(t);
        }
        tracing::info!(
            "userspace datapath up: ports {:?}, local port {} ({})",
            &dp.shared.names[..tap_index],
            dp.shared.names[tap_index],
            mac_text(&tap_mac)
        );
        Ok(dp)
    }

    /// The local port's (TAP's) name and MAC.
    pub fn local_port(&self) -> (&str, [u8; 6]) {
        (
            &self.shared.names[self.shared.tap_index],
            self.shared.tap_mac,
        )
    }

    /// Replace the static FDB entries (`[bridge] static_fdb` after a reload); the local
    /// port's own entry stays. Refused, with nothing changed, if an entry names a port this
    /// datapath does not have.
    pub fn set_static_fdb(&self, entries: &[([u8; 6], String)]) -> Result<(), DatapathError> {
        let sh = &self.shared;
        let entries = static_entries(&sh.names, (sh.tap_mac, sh.tap_index), entries)?;
        lock(&sh.fdb).set_static(&entries, Instant::now());
        Ok(())
    }

    /// Swap in a new policy: new flows follow it from the next batch on, established flows
    /// keep their decision until they idle out.
    pub fn swap_policy(&self, policy: Arc<Policy>) {
        let inputs = lock(&self.shared.dr_inputs).clone();
        let dr = dr_buckets_for(&policy, &inputs);
        let mut p = self
            .shared
            .policy
            .write()
            .unwrap_or_else(|e| e.into_inner());
        *p = Current {
            policy,
            seq: p.seq + 1,
            dr,
        };
        drop(p);
        self.shared.generation.fetch_add(1, Ordering::Release);
    }

    /// The `dr` realservers' state: MACs learned for realservers given by address, and the
    /// health-check keys ([`crate::dr::dr_check_key`]) of those that are down. The buckets of
    /// every `dr` rule are recomputed ([`crate::dr::bucket_macs`]); new flows follow them,
    /// pinned flows keep their realserver.
    pub fn set_dr_state(&self, neighbours: BTreeMap<IpAddr, [u8; 6]>, down: BTreeSet<String>) {
        let mut inputs = lock(&self.shared.dr_inputs);
        *inputs = DrInputs { neighbours, down };
        let mut p = self
            .shared
            .policy
            .write()
            .unwrap_or_else(|e| e.into_inner());
        p.dr = dr_buckets_for(&p.policy, &inputs);
        drop(p);
        drop(inputs);
        self.shared.generation.fetch_add(1, Ordering::Release);
    }

    /// Tell the datapath which rules' targets are down (by rule name; health checks run
    /// elsewhere). New flows a down rule would divert follow its `on_unhealthy`: bridged to
    /// their original destination (`bypass`) or dropped. Established flows keep their path.
    pub fn set_unhealthy(&self, down: HashSet<String>) {
        match self.shared.down.write() {
            Ok(mut d) => *d = Arc::new(down),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(down),
        }
        self.shared.generation.fetch_add(1, Ordering::Release);
    }

    pub fn stats(&self) -> Stats {
        let sh = &self.shared;
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (fdb_entries, fdb_evicted) = match sh.fdb.lock() {
            Ok(f) => (f.len(), f.evicted),
            Err(p) => (p.get_ref().len(), p.get_ref().evicted),
        };
        for (port, c) in sh.ports.iter().zip(&sh.port_counters) {
            if let Io::Packet(p) = port {
                match p.take_drops() {
                    Ok(n) => c.rx_full.fetch_add(n, Ordering::Relaxed),
                    Err(e) => {
                        tracing::debug!("PACKET_STATISTICS on {}: {e}", p.name);
                        0
                    }
                };
            }
        }
        Stats {
            ports: sh
                .names
                .iter()
                .zip(&sh.port_counters)
                .map(|(name, c)| PortStats {
                    name: name.clone(),
                    rx_frames: ld(&c.rx_frames),
                    rx_bytes: ld(&c.rx_bytes),
                    tx_frames: ld(&c.tx_frames),
                    tx_errors: ld(&c.tx_errors),
                    mtu_dropped: ld(&c.mtu_dropped),
                    rx_bad: ld(&c.rx_bad),
                    rx_ring: c.rx_ring.load(Ordering::Relaxed),
                    rx_copied: ld(&c.rx_copied),
                    rx_full: ld(&c.rx_full),
                })
                .collect(),
            diverted: ld(&sh.counters.diverted),
            policy_dropped: ld(&sh.counters.policy_dropped),
            passed: ld(&sh.counters.passed),
            flooded: ld(&sh.counters.flooded),
            link_local_dropped: ld(&sh.counters.link_local_dropped),
            dr_forwarded: ld(&sh.counters.dr_forwarded),
            fdb_entries,
            fdb_evicted,
            policy_generation: ld(&sh.generation),
            rules: {
                let hits = match sh.rule_hits.lock() {
                    Ok(h) => h.clone(),
                    Err(p) => p.into_inner().clone(),
                };
                let mut v: Vec<_> = hits.into_iter().collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                v
            },
        }
    }

    /// Stop forwarding, join the threads, close the ports and remove the TAP.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a datapath thread panicked");
            }
        }
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The FDB's static entries by port index: the local port's own MAC on the local port,
/// then the settings' entries (MAC, port name).
fn static_entries(
    names: &[String],
    (tap_mac, tap_index): ([u8; 6], usize),
    entries: &[([u8; 6], String)],
) -> Result<Vec<([u8; 6], usize)>, DatapathError> {
    let mut out = vec![(tap_mac, tap_index)];
    for (mac, port) in entries {
        let i = names
            .iter()
            .position(|n| n == port)
            .ok_or_else(|| DatapathError::UnknownStaticPort { port: port.clone() })?;
        out.push((*mac, i));
    }
    Ok(out)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn mac_text(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What happens to one received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not sent anywhere (bad, dropped by policy, link-local).
    Skip,
    /// Rewritten and sent to the local port only.
    Divert,
    /// Bridged by the FDB.
    Forward,
    /// Sent unchanged to the local port only (ARP for a shielded VIP).
    Local,
    /// A `dr` frame, its destination MAC rewritten to the realserver's: bridged by the FDB
    /// to that MAC's port (flooded if unknown), never to the local port.
    Dr,
}

/// `arp_shield`: ARP about a VIP of a `local` rule with `arp_shield = true` does not cross
/// the bridge, as in the kernel datapath's bridge table. From a port:
/// - sender and target both a VIP (gratuitous ARP for it): dropped;
/// - a request whose sender is a VIP (a realserver resolving its gateway for a reply sourced
///   from the VIP, default `arp_announce = 0`): its sender address is zeroed (an RFC 5227
///   probe: answered, but nobody learns the VIP from it) and it is bridged;
/// - anything else whose sender is a VIP (a realserver's reply for it): dropped;
/// - requests and replies whose target is a VIP go to the local port only (the bridge host,
///   which holds the VIP, answers).
///
/// `None`: not shielded ARP.
pub fn arp_shield(policy: &Policy, eth: &mut [u8]) -> Option<Verdict> {
    let mut et_at = 12;
    if eth.get(12..14)? == [0x81, 0x00] {
        et_at = 16;
    }
    if eth.get(et_at..et_at + 2)? == [0x86, 0xdd] {
        return nd_shield(policy, eth.get(et_at + 2..)?);
    }
    if eth.get(et_at..et_at + 2)? != [0x08, 0x06] {
        return None;
    }
    let arp = eth.get_mut(et_at + 2..et_at + 2 + 28)?;
    // Ethernet/IPv4 ARP only: htype 1, ptype 0x0800, hlen 6, plen 4
    if arp[..6] != [0, 1, 0x08, 0x00, 6, 4] {
        return None;
    }
    let request = arp[6..8] == [0, 1];
    let ip = |at: usize| {
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(
            arp[at],
            arp[at + 1],
            arp[at + 2],
            arp[at + 3],
        ))
    };
    let (spa, tpa) = (ip(14), ip(24));
    let (mut garp, mut spa_vip, mut tpa_vip) = (false, false, false);
    for r in &policy.rules {
        if !r.arp_shield || !matches!(r.action, Action::Local { .. }) {
            continue;
        }
        let crate::policy::AddrMatch::Only(vips) = &r.dst else {
            continue;
        };
        // per rule, as the kernel's rules are
        garp |= vips.contains(spa) && vips.contains(tpa);
        spa_vip |= vips.contains(spa);
        tpa_vip |= vips.contains(tpa);
    }
    if garp {
        Some(Verdict::Skip)
    } else if spa_vip && request {
        arp[14..18].fill(0);
        Some(Verdict::Forward)
    } else if spa_vip {
        Some(Verdict::Skip)
    } else if tpa_vip {
        Some(Verdict::Local)
    } else {
        None
    }
}

/// The IPv6 half of [`arp_shield`], as the kernel datapath's ND rules: a neighbour
/// solicitation for an IPv6 VIP goes to the local port only, a neighbour advert about one
/// from a port is dropped. `ip6` starts at the IPv6 header; ND messages carry no extension
/// headers.
fn nd_shield(policy: &Policy, ip6: &[u8]) -> Option<Verdict> {
    if *ip6.get(6)? != 58 {
        return None;
    }
    let icmp = ip6.get(40..)?;
    let solicit = match *icmp.first()? {
        135 => true,
        136 => false,
        _ => return None,
    };
    let t: [u8; 16] = icmp.get(8..24)?.try_into().ok()?;
    let shielded = policy.rules.iter().any(|r| {
        r.arp_shield
            && matches!(r.action, Action::Local { .. })
            && matches!(&r.dst, crate::policy::AddrMatch::Only(v)
                if v.v6.iter().any(|n| n.prefix_len() == 128 && n.addr() == std::net::Ipv6Addr::from(t)))
    });
    if !shielded {
        return None;
    }
    Some(if solicit {
        Verdict::Local
    } else {
        Verdict::Skip
    })
}

/// True at most once a second (`last` remembers when): the pace of the FDB's and the flow
/// table's sweeps.
pub(crate) fn due_once_a_second(last: &mut Option<Instant>, now: Instant) -> bool {
    if last.is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1)) {
        return false;
    }
    *last = Some(now);
    true
}

/// The policy's decision for a packet that arrived on `iif`, including the TPROXY return
/// path (the origin's replies to a TPROXY'd flow go to the proxy's socket too), and the
/// first rule whose exemptions returned the packet on the way. Rules are tried in order,
/// each rule's reply match right after its own match, as in the kernel datapath's bridge
/// table; the matching itself is `classify::rule_match`.
pub fn decide(policy: &Policy, iif: &str, p: &PacketInfo) -> (Decision, Option<usize>) {
    let mut exempted = None;
    for (i, r) in policy.rules.iter().enumerate() {
        match classify::rule_match(r, iif, p) {
            RuleMatch::Yes => return (classify::taken_by(i, r), exempted),
            RuleMatch::Exempted => {
                exempted.get_or_insert(i);
            }
            RuleMatch::No => {}
        }
        if matches!(r.action, Action::Tproxy { .. }) && reply_matches(r, iif, p) {
            return (classify::taken_by(i, r), exempted);
        }
    }
    (Decision::Bridge, exempted)
}

/// The rules in force for new flows: the policy, the rules whose targets are down, the
/// `dr` buckets and the decider of queue rules.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    pub policy: &'a Policy,
    pub down: &'a HashSet<String>,
    /// the policy's sequence number (kept with each flow's decision)
    pub seq: u64,
    pub dr: &'a DrBuckets,
    pub queue: Option<&'a InlineDecider>,
}

impl Rules<'_> {
    /// What a new flow is pinned to: [`decide`], then
    /// - `dr`: the realserver of the flow's bucket ([`crate::dr::bucket_of`]); no MAC for it
    ///   (none known, or no ports: a non-first fragment) -> bridged untouched;
    /// - `decide = "queue"`: the decider's verdict (its deny/allow lists, health, rate
    ///   limit; `Bypass` bridges, `Drop` drops); no decider -> bridged undecided;
    /// - else the health state: a diverting rule whose target is down bypasses (bridges) or
    ///   drops, as its `on_unhealthy` says.
    pub fn decide(&self, iif: &str, p: &PacketInfo) -> Pin {
        let (d, exempted) = decide(self.policy, iif, p);
        Pin {
            exempted,
            ..self.pin(d, p)
        }
    }

    /// What a flow the policy decided `d` for is pinned to.
    fn pin(&self, d: Decision, p: &PacketInfo) -> Pin {
        let Decision::Divert { rule, action, .. } = d else {
            return d.into();
        };
        let Some(r) = self.policy.rules.get(rule) else {
            return d.into();
        };
        if action == Action::Dr {
            let mac = p.ports.and_then(|(sport, _)| {
                let buckets = self.dr.get(&r.name)?;
                *buckets.get(crate::dr::bucket_of(p.src, sport))?
            });
            return match mac {
                Some(m) => Pin {
                    dr_mac: Some(m),
                    ..d.into()
                },
                None => Decision::Bridge.into(),
            };
        }
        if r.decide == Decide::Queue {
            let Some(q) = self.queue else {
                return Decision::Bridge.into();
            };
            return match q.decide(r.tag, p) {
                QueueVerdict::Divert(tag) if tag == r.tag => d.into(),
                // another rule's tag (a custom decider): divert by that rule, if it diverts
                QueueVerdict::Divert(tag) => self
                    .policy
                    .rules
                    .iter()
                    .position(|o| o.tag == tag && o.action.diverts())
                    .map_or(Decision::Bridge, |i| Decision::Divert {
                        rule: i,
                        tag,
                        action: self.policy.rules[i].action,
                    })
                    .into(),
                QueueVerdict::Bypass => Decision::Bridge.into(),
                QueueVerdict::Drop => Decision::Drop { rule }.into(),
            };
        }
        if self.down.contains(&r.name) {
            let decision = match r.on_unhealthy {
                OnUnhealthy::Bypass => Decision::Bridge,
                OnUnhealthy::Drop => Decision::Drop { rule },
            };
            return Pin {
                unhealthy: Some(rule),
                ..decision.into()
            };
        }
        d.into()
    }
}

/// Is `p` a reply of the origin to a flow rule `r` TPROXYs? Seen as the forward packet it
/// answers (addresses and ports swapped), arriving on a port that is not one of `from`; the
/// source MAC is not looked at (the kernel's reply chain does not either).
fn reply_matches(r: &DivertRule, iif: &str, p: &PacketInfo) -> bool {
    if !r.from.is_empty() && r.from.iter().any(|f| f == iif) {
        return false;
    }
    let Some((sport, dport)) = p.ports else {
        return false;
    };
    let fwd = PacketInfo {
        src_mac: r.src_mac.first().copied().unwrap_or(p.src_mac),
        dst_mac: p.src_mac,
        vlan: p.vlan,
        src: p.dst,
        dst: p.src,
        l4proto: p.l4proto,
        ports: Some((dport, sport)),
        tcp_flags: p.tcp_flags,
    };
    let as_iif = r.from.first().map_or(iif, String::as_str);
    classify::rule_matches(r, as_iif, &fwd)
}

/// Where and when a frame arrived, for [`process_frame`].
#[derive(Debug, Clone, Copy)]
pub struct Ingress<'a> {
    pub iif: usize,
    pub iif_name: &'a str,
    /// from the local port (the host's own frames: bridged, not classified)
    pub from_local: bool,
    pub local_mac: [u8; 6],
    pub now: Instant,
}

/// Classify one received frame (vnet header + Ethernet) from port `iif_name` and apply the
/// frame diverter's rewrite if it is diverted. Besides the verdict: what the frame's flow
/// is pinned to and the sequence number of the policy that decided it, for an IP frame.
pub fn process_frame(
    buf: &mut [u8],
    at: &Ingress<'_>,
    rules: &Rules<'_>,
    flows: &mut FlowTable<Pin>,
) -> (Verdict, Option<(Pin, u64)>) {
    let Ingress {
        iif,
        iif_name,
        from_local,
        local_mac,
        now,
    } = *at;
    let Some(eth) = buf.get_mut(VNET_HDR_LEN..) else {
        return (Verdict::Skip, None);
    };
    if eth.len() < frame::ETH_HLEN {
        return (Verdict::Skip, None);
    }
    // IEEE 802.1D link-local groups other than BPDUs are not forwarded.
    if eth[..5] == [0x01, 0x80, 0xc2, 0x00, 0x00] && eth[5] != 0 && eth[5] <= 0x0f {
        return (Verdict::Skip, None);
    }
    if from_local {
        return (Verdict::Forward, None);
    }
    if let Some(v) = arp_shield(rules.policy, eth) {
        return (v, None);
    }
    let Ok(info) = classify::parse_frame(eth) else {
        return (Verdict::Forward, None);
    };
    let key = FlowKey::of(iif, &info);
    let (pin, seq) = flows.decide_seq(key, now, rules.seq, info.tcp_flags, || {
        rules.decide(iif_name, &info)
    });
    let d = pin.decision;
    let v = match d {
        Decision::Divert { .. } if let Some(mac) = pin.dr_mac => {
            eth[..6].copy_from_slice(&mac);
            Verdict::Dr
        }
        Decision::Divert { tag, .. } => {
            if frame::divert_rewrite(eth, local_mac, tag) {
                Verdict::Divert
            } else {
                Verdict::Skip
            }
        }
        Decision::Drop { .. } => Verdict::Skip,
        Decision::Pass { .. } | Decision::Bridge => Verdict::Forward,
    };
    (v, Some((pin, seq)))
}

/// One forwarding thread: it receives on its ports ([`Options::threads`] says how the ports
/// are shared out), forwards each batch, and when all its ports are empty keeps polling them
/// for [`Options::spin`] before it sleeps in one `poll` over them.
struct Worker {
    sh: Arc<Shared>,
    /// the ports this thread receives on
    mine: Vec<usize>,
    /// their receive rings, where they have one
    rings: Vec<Option<RxRing>>,
    rx: RxBatch,
    tx: TxBatch,
    flows: FlowTable<Pin>,
    verdicts: Vec<Verdict>,
    srcs: Vec<[u8; 6]>,
    out: Vec<Vec<usize>>,
}

/// A worker's view of the policy in force, refreshed when the shared generation moves.
struct View {
    seen_gen: u64,
    cur: Current,
    down: Arc<HashSet<String>>,
    hits: RuleHits,
}

impl Worker {
    fn new(sh: Arc<Shared>, mine: Vec<usize>, rings: Vec<Option<RxRing>>) -> Worker {
        let b = sh.opts.batch;
        let n = sh.ports.len();
        Worker {
            rx: RxBatch::new(b),
            tx: TxBatch::default(),
            flows: FlowTable::new(sh.opts.flow_idle, sh.opts.flow_max),
            verdicts: vec![Verdict::Skip; b.max(1)],
            srcs: vec![[0; 6]; b.max(1)],
            out: vec![Vec::with_capacity(b); n],
            sh,
            mine,
            rings,
        }
    }

    fn run(mut self) {
        let sh = self.sh.clone();
        let mut view = View {
            seen_gen: sh.generation.load(Ordering::Acquire),
            cur: read_policy(&sh),
            down: read_down(&sh),
            hits: RuleHits::default(),
        };
        view.hits.track(view.cur.seq, &view.cur.policy);
        let mut pollfds: Vec<libc::pollfd> = self
            .mine
            .iter()
            .map(|&p| libc::pollfd {
                fd: sh.ports[p].raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let sweeps_fdb = self.mine.contains(&0);
        let mut fdb_swept: Option<Instant> = None;
        let mut last_err: Option<Instant> = None;
        let mut busy_at: Option<Instant> = None;
        while !sh.stop.load(Ordering::Relaxed) {
            let (mut got, mut failed) = (false, false);
            for k in 0..self.mine.len() {
                let me = self.mine[k];
                let got_now = match (&mut self.rings[k], &sh.ports[me]) {
                    (Some(ring), Io::Packet(port)) => ring.recv(port, &mut self.rx),
                    _ => sh.ports[me].recv_now(&mut self.rx),
                };
                match got_now {
                    Ok(0) => {}
                    Ok(n) => {
                        got = true;
                        self.forward(&sh, me, n, &mut view);
                    }
                    Err(e) => {
                        failed = true;
                        if last_err.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                            tracing::warn!("receiving on {}: {e}", sh.names[me]);
                            last_err = Some(Instant::now());
                        }
                    }
                }
            }
            let now = Instant::now();
            if got {
                busy_at = Some(now);
            } else if failed {
                std::thread::sleep(Duration::from_millis(50));
            } else if busy_at.is_some_and(|t| now.saturating_duration_since(t) < sh.opts.spin)
                && sh.two_way(now)
            {
                // An exchange is under way: its next frame is likely within microseconds,
                // sooner than a sleeping thread would be woken for it.
                std::thread::yield_now();
            } else if let Err(e) = sys::poll_readable(&mut pollfds, Duration::from_millis(100)) {
                tracing::warn!("waiting for frames: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            self.flows.sweep(now);
            // the shared FDB's lock only once a second, not on every poll
            if sweeps_fdb
                && due_once_a_second(&mut fdb_swept, now)
                && let Ok(mut f) = sh.fdb.try_lock()
            {
                f.expire(now);
            }
        }
    }

    /// Classify, learn and send on one batch of `n` frames received on port `me`.
    fn forward(&mut self, sh: &Shared, me: usize, n: usize, view: &mut View) {
        let from_local = me == sh.tap_index;
        let pc = &sh.port_counters[me];
        let now = Instant::now();
        let g = sh.generation.load(Ordering::Acquire);
        if g != view.seen_gen {
            view.seen_gen = g;
            view.cur = read_policy(sh);
            view.down = read_down(sh);
            view.hits.track(view.cur.seq, &view.cur.policy);
        }
        let View {
            cur, down, hits, ..
        } = view;
        pc.rx_frames.fetch_add(n as u64, Ordering::Relaxed);
        pc.last_rx.store(sh.stamp(now), Ordering::Relaxed);
        pc.rx_bad
            .fetch_add(std::mem::take(&mut self.rx.bad), Ordering::Relaxed);
        pc.rx_copied
            .fetch_add(std::mem::take(&mut self.rx.copied), Ordering::Relaxed);
        let mut bytes = 0u64;
        let (mut diverted, mut dropped, mut passed, mut ll, mut dr) =
            (0u64, 0u64, 0u64, 0u64, 0u64);
        for i in 0..n {
            let f = self.rx.frame_mut(i);
            bytes += f.len().saturating_sub(VNET_HDR_LEN) as u64;
            if f.len() >= VNET_HDR_LEN + 12 {
                self.srcs[i].copy_from_slice(&f[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12]);
            }
            let at = Ingress {
                iif: me,
                iif_name: &sh.names[me],
                from_local,
                local_mac: sh.tap_mac,
                now,
            };
            let (v, d) = process_frame(
                f,
                &at,
                &Rules {
                    policy: &cur.policy,
                    down,
                    seq: cur.seq,
                    dr: &cur.dr,
                    queue: sh.opts.decider.as_deref(),
                },
                &mut self.flows,
            );
            if let Some((pin, at_seq)) = d {
                hits.count(at_seq, &pin, frame::l3_len(&f[VNET_HDR_LEN..]) as u64);
            }
            match (v, d.map(|(pin, _)| pin.decision)) {
                (Verdict::Divert, _) => diverted += 1,
                (Verdict::Dr, _) => dr += 1,
                (Verdict::Skip, Some(Decision::Drop { .. })) => dropped += 1,
                (Verdict::Skip, None) if f.len() > VNET_HDR_LEN => ll += 1,
                (_, Some(Decision::Pass { .. })) => passed += 1,
                _ => {}
            }
            self.verdicts[i] = v;
        }
        hits.flush(&sh.rule_hits);
        pc.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
        let c = &sh.counters;
        c.diverted.fetch_add(diverted, Ordering::Relaxed);
        c.policy_dropped.fetch_add(dropped, Ordering::Relaxed);
        c.passed.fetch_add(passed, Ordering::Relaxed);
        c.link_local_dropped.fetch_add(ll, Ordering::Relaxed);
        c.dr_forwarded.fetch_add(dr, Ordering::Relaxed);

        // Learn and look up under one lock per batch.
        let nports = sh.ports.len();
        let mut flooded = 0u64;
        {
            let mut fdb = match sh.fdb.lock() {
                Ok(f) => f,
                Err(p) => p.into_inner(),
            };
            for i in 0..n {
                let (_, len) = self.rx.frames[i];
                if len < VNET_HDR_LEN + frame::ETH_HLEN {
                    continue;
                }
                fdb.learn(self.srcs[i], me, now);
                match self.verdicts[i] {
                    Verdict::Skip => {}
                    Verdict::Divert | Verdict::Local => self.out[sh.tap_index].push(i),
                    v @ (Verdict::Forward | Verdict::Dr) => {
                        // dr frames never go to the host
                        let skip = if v == Verdict::Dr { sh.tap_index } else { me };
                        let f = self.rx.frame(i);
                        let mut dst = [0u8; 6];
                        dst.copy_from_slice(&f[VNET_HDR_LEN..VNET_HDR_LEN + 6]);
                        match fdb.out(&dst, me, now) {
                            Out::Port(p) if p != skip => self.out[p].push(i),
                            Out::Port(_) | Out::Filtered => {}
                            Out::Flood => {
                                flooded += 1;
                                for (p, o) in self.out.iter_mut().enumerate() {
                                    if p != me && p != skip {
                                        o.push(i);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        sh.counters.flooded.fetch_add(flooded, Ordering::Relaxed);

        for p in 0..nports {
            if self.out[p].is_empty() {
                continue;
            }
            let mtu = sh.mtu[p] as usize;
            let mut too_big = 0u64;
            let frames: Vec<&[u8]> = self.out[p]
                .iter()
                .map(|&i| self.rx.frame(i))
                .filter(|f| {
                    let gso = VnetHdr::parse(f).is_some_and(|h| h.is_gso());
                    let ok = gso || frame::l3_len(&f[VNET_HDR_LEN..]) <= mtu;
                    if !ok {
                        too_big += 1;
                    }
                    ok
                })
                .collect();
            let sent = sh.ports[p].send(&mut self.tx, &frames) as u64;
            let q = &sh.port_counters[p];
            q.tx_frames.fetch_add(sent, Ordering::Relaxed);
            q.tx_errors
                .fetch_add(frames.len() as u64 - sent, Ordering::Relaxed);
            q.mtu_dropped.fetch_add(too_big, Ordering::Relaxed);
            self.out[p].clear();
        }
    }
}

fn read_policy(sh: &Shared) -> Current {
    match sh.policy.read() {
        Ok(p) => p.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

/// Per-thread rule counters for the policies this thread's flows were decided under (the
/// newest few), flushed into the shared counters by rule name once per batch.
#[derive(Default)]
struct RuleHits {
    seen: Vec<(u64, Arc<Policy>, Vec<RuleCounts>)>,
}

impl RuleHits {
    const KEEP: usize = 8;

    fn track(&mut self, seq: u64, policy: &Arc<Policy>) {
        if self.seen.iter().any(|(s, _, _)| *s == seq) {
            return;
        }
        if self.seen.len() >= Self::KEEP {
            self.seen.remove(0);
        }
        self.seen.push((
            seq,
            policy.clone(),
            vec![RuleCounts::default(); policy.rules.len()],
        ));
    }

    /// One frame of `bytes` L3 bytes of a flow pinned to `pin` under policy `seq`.
    fn count(&mut self, seq: u64, pin: &Pin, bytes: u64) {
        let taken = match (pin.unhealthy, pin.decision) {
            (Some(_), _) | (None, Decision::Bridge) => None,
            (
                None,
                Decision::Divert { rule, .. } | Decision::Pass { rule } | Decision::Drop { rule },
            ) => Some(rule),
        };
        if taken.is_none() && pin.unhealthy.is_none() && pin.exempted.is_none() {
            return; // the common case: bridged, no rule involved
        }
        let Some((_, _, hits)) = self.seen.iter_mut().find(|(s, _, _)| *s == seq) else {
            return;
        };
        let one = Count { packets: 1, bytes };
        let mut add = |rule: Option<usize>, what: fn(&mut RuleCounts) -> &mut Count| {
            if let Some(h) = rule.and_then(|r| hits.get_mut(r)) {
                *what(h) += one;
            }
        };
        add(taken, |h| &mut h.diverted);
        add(pin.unhealthy, |h| &mut h.unhealthy);
        add(pin.exempted, |h| &mut h.exempted);
    }

    fn flush(&mut self, into: &Mutex<HashMap<String, RuleCounts>>) {
        let zero = RuleCounts::default();
        if self
            .seen
            .iter()
            .all(|(_, _, h)| h.iter().all(|c| *c == zero))
        {
            return;
        }
        let mut m = match into.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        for (_, policy, hits) in &mut self.seen {
            for (r, h) in policy.rules.iter().zip(hits.iter_mut()) {
                if *h != zero {
                    *m.entry(r.name.clone()).or_default() += std::mem::take(h);
                }
            }
        }
    }
}

fn read_down(sh: &Shared) -> Arc<HashSet<String>> {
    match sh.down.read() {
        Ok(d) => d.clone(),
        Err(d) => d.into_inner().clone(),
    }
}

#[cfg(test)]
mod tests;
