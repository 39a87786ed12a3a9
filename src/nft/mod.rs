//! A small nftables ruleset model: the tables, sets, chains and rules brdivert owns.
//!
//! The model is deliberately high level (one variant per match or statement brdivert uses),
//! so that both back ends stay simple and agree:
//! - [`render`] prints it as nft text, exactly as `nft list table` prints it back;
//! - [`netlink`] lowers it to kernel expressions and applies it in one transaction.
//!
//! [`compile`] builds it from the validated policy. Nothing else builds rulesets.

pub mod compile;
pub mod ext;
pub mod netlink;
pub mod pins;
pub mod render;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// Name of every table brdivert owns (one per family it uses). Nothing else is touched.
pub const TABLE_NAME: &str = "brdivert";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Bridge,
    Inet,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Bridge => "bridge",
            Family::Inet => "inet",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub tables: Vec<Table>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub family: Family,
    pub name: String,
    pub sets: Vec<Set>,
    pub chains: Vec<Chain>,
}

/// The key type of a named set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetKind {
    Ipv4Addr,
    Ipv6Addr,
    /// tcp/udp port (`inet_service`)
    InetService,
    /// interface name (`ifname`)
    IfName,
    EtherAddr,
    /// packet mark (`mark`): rule tags in the health `down` set
    Mark,
    /// a concatenation of flow fields (`ipv4_addr . ipv4_addr . inet_proto . …`)
    Concat(IpFamily, FlowKeyShape),
    /// a `dr` rule's hash buckets: a 32-bit integer (the `jhash … mod N` result) mapped to a
    /// realserver MAC (`type integer : ether_addr`); elements are [`SetElem::Bucket`]
    Buckets,
}

/// What a map's elements map to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapData {
    /// the packet mark a flow was diverted with
    Mark,
    /// the MAC a `dr` flow was sent to
    Ether,
}

/// Which flow fields a concatenated key holds, in this order (the address family comes
/// from [`FlowKey::family`] / the set kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowKeyShape {
    /// source address, destination address, L4 protocol, source port, destination port
    FiveTuple,
    /// source address, destination address, L4 protocol, destination port (a client's
    /// flows to one service, whatever its source port)
    Peer,
}

/// One field of a concatenated flow key, as the packet at hand sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyField {
    /// `ip saddr` / `ip6 saddr`
    Saddr,
    /// `ip daddr` / `ip6 daddr`
    Daddr,
    /// `meta l4proto`
    L4Proto,
    /// `th sport` (raw transport header, offset 0)
    Sport,
    /// `th dport` (raw transport header, offset 2)
    Dport,
}

/// A concatenated key built from the packet: `ip saddr . ip daddr . meta l4proto . th sport`.
/// Reversing saddr/daddr and sport/dport gives the key the other direction sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowKey {
    pub family: IpFamily,
    pub fields: Vec<KeyField>,
}

impl FlowKey {
    /// The set kind whose keys this expression builds (saddr/daddr and sport/dport have the
    /// same types, so a reversed key fits the same set).
    pub fn kind(&self) -> SetKind {
        let shape = if self.fields.len() == 5 {
            FlowKeyShape::FiveTuple
        } else {
            FlowKeyShape::Peer
        };
        SetKind::Concat(self.family, shape)
    }
}

/// A set filled by the packet path (`flags dynamic,timeout`), mapping to a mark when `map`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dynamic {
    /// `: mark` / `: ether_addr` — a map from the key to what the flow was given
    pub map: Option<MapData>,
    /// `size N` — the most elements the kernel keeps; updates beyond it fail
    pub size: u32,
    /// default element timeout, seconds (refreshed by `update`)
    pub timeout_s: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetElem {
    V4(Ipv4Net),
    V6(Ipv6Net),
    /// inclusive port range; `lo == hi` is a single port
    Ports(u16, u16),
    IfName(String),
    Ether([u8; 6]),
    /// a `mark` value
    Mark(u32),
    /// `dr` hash bucket → realserver MAC (in a [`SetKind::Buckets`] map)
    Bucket(u32, [u8; 6]),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub name: String,
    pub kind: SetKind,
    /// `flags interval`: prefixes and port ranges. Elements are already merged and sorted
    /// (no overlaps), as the kernel requires.
    pub interval: bool,
    pub elements: Vec<SetElem>,
    /// Filled by the packet path, not by brdivert (`None` for plain sets).
    pub dynamic: Option<Dynamic>,
    /// Survives `apply`: an existing set of this name (with its elements: pinned flows, health
    /// state) is kept when the table's chains and other sets are replaced.
    pub keep: bool,
}

impl Set {
    /// The size the set is created with (`size N` in `nft list`): a dynamic set's limit, or
    /// for a plain hash set, its element count, so the kernel builds the hash at its final
    /// size instead of growing (and rehashing) it while one batch fills it (a quarter of the
    /// apply time of 10k VIPs otherwise). The kernel also takes it as the element limit,
    /// which is right only for sets every apply recreates whole (not `keep`) and nothing
    /// adds to afterwards. Interval sets are left alone.
    pub fn size(&self) -> Option<u32> {
        match &self.dynamic {
            Some(d) => Some(d.size),
            None if !self.interval && !self.keep && !self.elements.is_empty() => {
                Some(u32::try_from(self.elements.len()).unwrap_or(u32::MAX))
            }
            None => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainType {
    Filter,
    Nat,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseChain {
    pub kind: ChainType,
    pub hook: Hook,
    /// numeric priority; render prints the standard name when one matches (`filter`, `dstnat`, …)
    pub priority: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    /// `None` for a regular chain (a jump target).
    pub base: Option<BaseChain>,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// All must hold, in this order (the order `nft list` prints).
    pub matches: Vec<Match>,
    /// Applied in order.
    pub stmts: Vec<Stmt>,
    /// Names the rule-file rule this came from.
    pub comment: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpFamily {
    V4,
    V6,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Src,
    Dst,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp,
    Udp,
}

impl L4 {
    pub fn as_str(self) -> &'static str {
        match self {
            L4::Tcp => "tcp",
            L4::Udp => "udp",
        }
    }
}

/// One match expression. Set references name a set of the same table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// `iifname @set` / `iifname != @set`
    IifName { negate: bool, set: String },
    /// `ether saddr @set`
    EtherSaddr { set: String },
    /// `vlan id N` (802.1Q tagged frames, bridge family)
    VlanId(u16),
    /// `ether type != 8021q ether type != 8021ad`: untagged frames only (bridge family)
    Untagged,
    /// `meta l4proto tcp` — only needed where no port match implies it
    L4Proto(L4),
    /// `ether type ip` (bridge) / `meta nfproto ipv4` (inet): pins a rule to one IP family
    /// where no address match does
    Family(IpFamily),
    /// `ip saddr @set`, `ip6 daddr != @set`, …
    Addr {
        family: IpFamily,
        dir: Dir,
        negate: bool,
        set: String,
    },
    /// `tcp dport @set`, `udp sport != @set`, …
    Port {
        l4: L4,
        dir: Dir,
        negate: bool,
        set: String,
    },
    /// `meta mark & MASK == VALUE`
    Mark { mask: u32, value: u32 },
    /// `socket transparent 1` (inet family: an established TPROXY socket exists)
    SocketTransparent,
    /// `meta mark & MASK != 0x00000000` (some bit of MASK is set)
    MarkNonZero { mask: u32 },
    /// `ct state new` (inet family: conntrack exists only in the IP hooks)
    CtStateNew,
    /// `ct mark & MASK == VALUE` (inet family)
    CtMark { mask: u32, value: u32 },
    /// `meta mark & MASK == @set` (the masked mark is an element of the set)
    MarkIn { mask: u32, set: String },
    /// `arp operation request` (bridge family; implies `ether type arp`)
    ArpRequest,
    /// `arp saddr ip @set` / `arp daddr ip @set`: the sender / target protocol address of an
    /// Ethernet/IPv4 ARP packet (bridge family; implies `ether type arp`)
    ArpAddr { dir: Dir, set: String },
    /// `icmpv6 type nd-neighbor-solicit @th,64,128 0x…` (`advert`: `nd-neighbor-advert`): a
    /// Neighbour Discovery message about `target` (the ND target address, 8 bytes into the
    /// ICMPv6 header; nft 1.0.6 has no name for it). Bridge family; implies `ether type ip6`.
    NdTarget { advert: bool, target: Ipv6Addr },
    /// `jhash ip saddr . th sport mod N seed 0xS V`: the Jenkins hash of the key fields, modulo
    /// `modulus`, equals `value`. Needs an address match of the key's family before it in the
    /// rule (that match carries nft's `ether type` dependency).
    Jhash {
        key: FlowKey,
        modulus: u32,
        seed: u32,
        value: u32,
    },
}

/// One statement (action). Verdicts come last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stmt {
    /// `counter`
    Counter,
    /// `meta mark set meta mark & KEEP | VALUE` — set our bits, keep everyone else's
    MarkSetMasked {
        keep: u32,
        value: u32,
    },
    /// `meta mark set VALUE` — the whole mark (IPVS fwmark services match it exactly)
    MarkSet(u32),
    /// `ct mark set ct mark & KEEP | VALUE` — pin our bits of a decision in the conntrack
    /// mark, keep everyone else's (inet family)
    CtMarkSetMasked {
        keep: u32,
        value: u32,
    },
    /// `meta pkttype set host` — the frame diverter's move, part 1
    PkttypeSetHost,
    /// `ether daddr set MAC` — the frame diverter's move, part 2 (the bridge's own MAC)
    EtherDaddrSet([u8; 6]),
    /// `arp saddr ip set ADDR` — rewrite an ARP packet's sender protocol address (after an
    /// `arp` match). `0.0.0.0` turns a request into an RFC 5227 probe.
    ArpSaddrSet(Ipv4Addr),
    /// `meta broute set 1` — where the kernel has it, replaces the two above
    BrouteSet,
    /// `redirect to :PORT`
    Redirect {
        port: u16,
    },
    /// `tproxy ip to 127.0.0.1:3129` / `tproxy ip6 to [::1]:3129` / `tproxy ip to :3129`
    Tproxy {
        family: IpFamily,
        addr: Option<IpAddr>,
        port: u16,
    },
    /// Hand the packet to NFQUEUE `num` (`fanout` queues from `num`), bypass when no
    /// listener. Rendered and lowered in the form the kernel supports (see [`QueueForm`]).
    Queue {
        num: u16,
        fanout: u16,
        bypass: bool,
        form: QueueForm,
    },
    /// `meta mark set KEY map @set`: the mark a pinned flow was diverted with. A key not in
    /// the map ends the rule (no match).
    MarkSetMap {
        key: FlowKey,
        set: String,
    },
    /// `update @set { KEY : meta mark }`: add the flow with the packet's mark, or refresh its
    /// timeout (an existing element keeps its mark). A full set ends the rule.
    UpdateMark {
        key: FlowKey,
        set: String,
    },
    /// `ether daddr set jhash ip saddr . th sport mod N seed 0xS map @set`: the realserver
    /// MAC of the flow's hash bucket (`dr`). A bucket not in the map ends the rule. Needs an
    /// address match of the key's family before it in the rule.
    EtherDaddrSetHash {
        key: FlowKey,
        modulus: u32,
        seed: u32,
        set: String,
    },
    /// `ether daddr set KEY map @set`: the MAC a pinned `dr` flow was sent to. A key not in
    /// the map ends the rule.
    EtherDaddrSetMap {
        key: FlowKey,
        set: String,
    },
    /// `update @set { KEY : ether daddr }`: pin the flow to the (rewritten) destination MAC,
    /// or refresh its timeout (an existing element keeps its MAC). A full set ends the rule.
    UpdateEther {
        key: FlowKey,
        set: String,
    },
    /// `jump CHAIN` (a regular chain of the same table)
    Jump(String),
    Accept,
    Drop,
    Return,
}

/// Native nft `queue` (needs CONFIG_NFT_QUEUE) or the xtables `NFQUEUE` target through nft
/// compat (`xt target NFQUEUE`); which one is chosen by probing the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueForm {
    Native,
    XtCompat,
}

impl Ruleset {
    pub fn table(&self, family: Family) -> Option<&Table> {
        self.tables.iter().find(|t| t.family == family)
    }
}
