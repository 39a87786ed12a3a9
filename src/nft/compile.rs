//! policy -> nft ruleset (kernel datapath).
//!
//! Two tables, both named [`TABLE_NAME`], both owned whole by brdivert:
//!
//! `bridge brdivert` decides, per frame, at bridge prerouting. Chain `prerouting` holds one
//! `jump` per rule, in rule order, on what is cheap to test (ingress port, source MAC, L4
//! protocol and port). Each rule's own chain first `return`s its exemptions (counted), then
//! applies the action to what its address sets match: `pass` and `drop` as said; a divert
//! marks the packet with the rule's tag (inside `kernel.mark_mask`) and hands the frame to the
//! local stack with the frame diverter's move: `meta pkttype set host` + `ether daddr set
//! <bridge MAC>`, so the bridge passes it up *on the bridge device*, where the host's
//! addresses and routes are. (`meta broute set 1`, where a kernel has it, would pass the frame
//! up on the ingress port instead — no address there for REDIRECT — so it is only probed and
//! reported, not used.) The first rule that diverts, passes or drops a frame ends the
//! evaluation.
//!
//! `inet brdivert` acts on what arrived in the local stack *with a tag*: REDIRECT at dstnat,
//! TPROXY at mangle. Matching the tag (not `iifname br0`) keeps exempted and bridged packets
//! untouched even when br_netfilter makes them cross these hooks too. TPROXY'd packets get
//! the tproxy mark (every bit of the mask), which the policy-routing rule sends to the local
//! table; replies of the origin to a TPROXY'd flow are diverted back by a reply chain in the
//! bridge table (matched by source port, honouring the same exemptions) and found by
//! `socket transparent 1`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use super::QueueForm;
use super::pins::{self, EarlierPins};
use super::{
    BaseChain, Chain, ChainType, Dir, Dynamic, Family, FlowKey, Hook, IpFamily, KeyField, L4,
    MapData, Match, Rule, Ruleset, Set, SetElem, SetKind, Stmt, TABLE_NAME, Table,
};
use crate::policy::{self, Action, Decide, DivertRule, OnUnhealthy, Policy, Prefixes, Proto};
use crate::queue::{CODE_BYPASS, CODE_DIVERT, MarkLayout};

/// What compiling needs beyond the policy: facts about this bridge and kernel.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// The bridge's own MAC: diverted frames are re-addressed to it.
    pub bridge_mac: [u8; 6],
    /// Bits of the packet mark brdivert owns.
    pub mark_mask: u32,
    /// MACs learned from the neighbour table for `dr` realservers given by address.
    pub neighbours: BTreeMap<IpAddr, [u8; 6]>,
    /// Health-check keys ([`dr_check_key`]) of `dr` realservers that are down.
    pub dr_down: BTreeSet<String>,
    /// How `decide = "queue"` rules queue (used only when the policy has such rules).
    pub queue: QueueTarget,
    /// Keep the TPROXY return-path lookups although the policy has no tproxy rule: an
    /// earlier one's flows may still run (brdivert's TPROXY routing is still installed).
    pub tproxy_replies: bool,
    /// What earlier policies may have left pinned (the pin record): decides where the
    /// pin maps are looked up ([`super::pins`]).
    pub earlier_pins: EarlierPins,
    /// The host's own addresses on the bridge (`bridge.address`): packets the host sends
    /// from any other address are a transparent proxy's (see `tproxy_upstream_rules`).
    pub bridge_addrs: Vec<IpAddr>,
}

/// How queue rules are compiled: the queue range, the rule form the kernel takes, and the
/// verdict bits (`queue.verdict_mask`) next to the tag bits (`mark_mask`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueTarget {
    pub num: u16,
    pub fanout: u16,
    pub form: QueueForm,
    pub verdict_mask: u32,
}

impl Default for QueueTarget {
    fn default() -> QueueTarget {
        QueueTarget {
            num: 0,
            fanout: 1,
            form: QueueForm::Native,
            verdict_mask: crate::queue::DEFAULT_VERDICT_MASK,
        }
    }
}

impl Target {
    /// The mark bits of queue decisions: the single source of truth shared with the engine.
    /// Settings validation guarantees the masks fit; a target built by hand with masks that
    /// overlap falls back to the default verdict bits.
    pub fn layout(&self) -> MarkLayout {
        MarkLayout::new(self.mark_mask, self.queue.verdict_mask).unwrap_or_default()
    }

    fn shift(&self) -> u32 {
        self.mark_mask.trailing_zeros()
    }

    /// The mark value of a rule's tag.
    pub fn tag_mark(&self, tag: u32) -> u32 {
        (tag << self.shift()) & self.mark_mask
    }

    /// The mark that routes a TPROXY'd packet to the local table: every bit of the mask
    /// (a value no rule tag uses, see `policy::Context::max_tag`).
    pub fn tproxy_mark(&self) -> u32 {
        self.mark_mask
    }
}

/// IPv4 link-local sources (169.254.0.0/16).
const LINK_LOCAL4: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(169, 254, 0, 0), 16) {
    Ok(n) => n,
    Err(_) => panic!("valid prefix"),
};
/// IPv6 link-local sources (fe80::/10).
const LINK_LOCAL6: Ipv6Net = match Ipv6Net::new(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10) {
    Ok(n) => n,
    Err(_) => panic!("valid prefix"),
};

/// Bridge priority `filter` (-200): at bridge prerouting, before the forwarding decision.
pub const BRIDGE_PRIORITY: i32 = -200;
/// inet priority `dstnat`.
pub const DSTNAT_PRIORITY: i32 = -100;
/// inet priority `mangle` (TPROXY must run before routing).
pub const MANGLE_PRIORITY: i32 = -150;
/// Queue decisions, in the IP prerouting hook after conntrack (-200) and before mangle:
/// restore a decided flow's verdict from its ct mark, queue undecided new flows, pin the
/// verdict (an accepted queued packet goes on at the *next base chain*, so the pin is a
/// chain of its own).
pub const QUEUE_RESTORE_PRIORITY: i32 = -180;
pub const QUEUE_DECIDE_PRIORITY: i32 = -170;
pub const QUEUE_PIN_PRIORITY: i32 = -160;
/// Bridge prerouting after br_netfilter's IP pass (NF_BR_PRI_BRNF = 0): where a `local`
/// queue rule's divert verdict (set in that pass) is turned into the frame diverter's move.
pub const BRIDGE_QUEUE_DIVERT_PRIORITY: i32 = 100;

/// The whole kernel-datapath ruleset: the bridge table and the local-stack table.
pub fn compile(policy: &Policy, target: &Target) -> Ruleset {
    let mut bridge = bridge_table(policy, target);
    let mut inet = local_stack_table(policy, target);
    if policy.uses_queue() {
        bridge.chains.extend(queue_bridge_chain(policy, target));
        inet.chains.extend(queue_chains(policy, target));
    }
    Ruleset {
        tables: vec![bridge, inet],
    }
}

/// How long a pinned flow stays pinned without a packet (seconds). Long enough for idle TCP
/// connections that use the default keepalive (first probe after 2 h idle) to stay pinned;
/// an expired pin only matters if a reload changed that flow's rule meanwhile (while the rules
/// are unchanged the next packet pins the flow again).
pub const PIN_TIMEOUT_S: u64 = 3 * 3600;
/// The most flows pinned per map (per IP family, per direction map). Beyond it new flows are
/// still diverted, just not pinned.
pub const PIN_MAP_SIZE: u32 = 262_144;

/// Names of the sets that hold run-time state and survive `apply` (see [`Set::keep`]).
pub fn flows_map(f: IpFamily) -> &'static str {
    match f {
        IpFamily::V4 => "flows4",
        IpFamily::V6 => "flows6",
    }
}

/// The TPROXY reply-path map of family `f`: the exact 5-tuples of the proxy's upstream
/// connections, as their replies see them.
pub fn replies_map(f: IpFamily) -> &'static str {
    match f {
        IpFamily::V4 => "tpreplies4",
        IpFamily::V6 => "tpreplies6",
    }
}

pub use super::netlink::HEALTH_DOWN_SET;
/// The `dr` bucket logic lives in [`crate::dr`], shared with the userspace datapath.
pub use crate::dr::{DR_BUCKETS, DR_HASH_SEED, dr_assignment, dr_check_key, parse_check_key};

/// The forward 5-tuple as the packet at hand sees it.
pub fn five_tuple(family: IpFamily) -> FlowKey {
    FlowKey {
        family,
        fields: vec![
            KeyField::Saddr,
            KeyField::Daddr,
            KeyField::L4Proto,
            KeyField::Sport,
            KeyField::Dport,
        ],
    }
}

/// The 5-tuple the other direction of the flow sees, read from a packet of this direction.
fn reversed_five_tuple(family: IpFamily) -> FlowKey {
    FlowKey {
        family,
        fields: vec![
            KeyField::Daddr,
            KeyField::Saddr,
            KeyField::L4Proto,
            KeyField::Dport,
            KeyField::Sport,
        ],
    }
}

/// The element of the `down` set that marks `r` unhealthy (its tag as a mark value): what
/// [`super::netlink::set_rule_health`] takes.
pub fn health_key(target: &Target, r: &DivertRule) -> u32 {
    target.tag_mark(r.tag)
}

/// Every health-checked rule of the policy: (name, `down` element).
pub fn health_keys(policy: &Policy, target: &Target) -> Vec<(String, u32)> {
    policy
        .rules
        .iter()
        .filter(|r| r.health.is_some())
        .map(|r| (r.name.clone(), health_key(target, r)))
        .collect()
}

fn state_sets() -> Vec<Set> {
    let mut v = Vec::new();
    for f in [IpFamily::V4, IpFamily::V6] {
        for name in [flows_map(f), replies_map(f)] {
            let key = five_tuple(f);
            v.push(Set {
                name: name.into(),
                kind: key.kind(),
                interval: false,
                elements: Vec::new(),
                dynamic: Some(Dynamic {
                    map: Some(MapData::Mark),
                    size: PIN_MAP_SIZE,
                    timeout_s: PIN_TIMEOUT_S,
                }),
                keep: true,
            });
        }
    }
    v.push(Set {
        name: HEALTH_DOWN_SET.into(),
        kind: SetKind::Mark,
        interval: false,
        elements: Vec::new(),
        dynamic: None,
        keep: true,
    });
    v
}

/// A packet whose `key` is in `map` is diverted with the mark recorded there (and refreshes
/// its entry): what keeps a flow on the path it was first given, across reloads.
fn pin_rule(f: IpFamily, map: &str, comment: String, target: &Target) -> Rule {
    let key = five_tuple(f);
    let mut stmts = vec![
        Stmt::MarkSetMap {
            key: key.clone(),
            set: map.into(),
        },
        Stmt::UpdateMark {
            key,
            set: map.into(),
        },
        Stmt::Counter,
    ];
    stmts.extend(divert_move(target));
    stmts.push(Stmt::Accept);
    Rule {
        matches: vec![Match::Family(f)],
        stmts,
        comment: Some(comment),
    }
}

/// The frame diverter's move, after the mark is set.
fn divert_move(target: &Target) -> [Stmt; 2] {
    [Stmt::PkttypeSetHost, Stmt::EtherDaddrSet(target.bridge_mac)]
}

/// `bridge brdivert`: pinned flows first, then exemptions, then diverts, per rule, at bridge
/// prerouting.
pub fn bridge_table(policy: &Policy, target: &Target) -> Table {
    let mut t = Table {
        family: Family::Bridge,
        name: TABLE_NAME.into(),
        sets: state_sets(),
        chains: Vec::new(),
    };
    // ARP shield first: ARP frames meet nothing else in this table.
    let mut prerouting = arp_shield_rules(policy, target, &mut t.sets);
    // Pinned flows keep the path they were given, whatever the rules say now; every packet
    // refreshes its pin. Looked up in each rule's chain, or for every frame while an earlier
    // policy's flows may reach no rule chain now (see `pins`).
    let [flow_pins, dr_pins] = pins::lookups(policy, &target.earlier_pins);
    for f in [IpFamily::V4, IpFamily::V6] {
        if flow_pins.everywhere {
            prerouting.push(pin_rule(f, flows_map(f), "pinned".into(), target));
        }
        if dr_pins.everywhere {
            prerouting.push(dr_pin_rule(f, "dr pinned".into()));
        }
    }
    // TPROXY return path: the origin answers the proxy's spoofed upstream connection
    // (client address, the proxy's own source port), so the bridge would deliver the reply to
    // the client. The output chain below records each upstream connection's exact 5-tuple as
    // its replies see it; those replies go to the local stack, where the proxy's transparent
    // socket takes them. Exact, so the client's own bridged connections to the same server
    // and port (after a reload, or while the proxy is down and the rule bypasses) are never
    // taken. Only while TPROXY is in use: every bridged frame pays for these lookups.
    let replies = policy.uses_tproxy() || target.tproxy_replies;
    for f in [IpFamily::V4, IpFamily::V6].into_iter().filter(|_| replies) {
        prerouting.push(pin_rule(f, replies_map(f), "tproxy reply".into(), target));
    }
    if dr_pins.any() {
        t.sets.extend(dr_flows_maps());
    }
    for r in policy.rules.iter().filter(|r| r.action == Action::Dr) {
        t.sets.push(dr_buckets(r, target));
    }
    let mut rule_chains = Vec::new();
    for r in &policy.rules {
        let l4 = r.proto.map(l4_of);
        // Cheap matches first, in the base chain: ingress port, source MAC, L4 + port.
        let mut head = Vec::new();
        if !r.from.is_empty() {
            let set = add_set(
                &mut t.sets,
                r,
                "from",
                SetKind::IfName,
                false,
                ifname_elems(&r.from),
            );
            head.push(Match::IifName { negate: false, set });
        }
        if !r.src_mac.is_empty() {
            let elems = r.src_mac.iter().map(|m| SetElem::Ether(*m)).collect();
            let set = add_set(&mut t.sets, r, "src_mac", SetKind::EtherAddr, false, elems);
            head.push(Match::EtherSaddr { set });
        }
        let dport_set = (!r.dport.is_empty()).then(|| dport_set(&mut t.sets, r));
        let l4 = l4_match(l4, Dir::Dst, &dport_set);
        // One jump per VLAN id (a rule names a few at most; nft's `vlan id` takes no set
        // here without a typed concatenation), or one for any frame.
        let vlans: Vec<Option<u16>> = if r.vlan.is_empty() {
            vec![None]
        } else {
            r.vlan.iter().copied().map(Some).collect()
        };
        for vid in vlans {
            let mut matches = head.clone();
            // no `vlan`: untagged frames only (tagged ones belong to other networks)
            matches.push(vid.map_or(Match::Untagged, Match::VlanId));
            matches.extend(l4.clone());
            prerouting.push(Rule {
                matches,
                stmts: vec![Stmt::Jump(chain_name(r))],
                comment: Some(r.name.clone()),
            });
        }

        // Frames of a family or from/to addresses the rule does not select leave first (one
        // lookup, the cheapest way out for most frames of a rule with many VIPs) ...
        // The sets made here serve the rule's own matches below too: (family, src, dst).
        let families = r.families();
        let mut chain = Vec::new();
        let mut selected = Vec::new();
        for f in policy::FAMILIES {
            let fam = ip_family(f);
            if !families.contains(&f) {
                let what = if fam == IpFamily::V4 { "ipv4" } else { "ipv6" };
                chain.push(return_rule(vec![Match::Family(fam)], r, what));
                continue;
            }
            let mut set_of = |what, prefixes: &policy::AddrMatch| {
                prefixes
                    .restricts(f)
                    .and_then(|p| prefix_set(&mut t.sets, r, what, p, f))
            };
            let (src, dst) = (set_of("src", &r.src), set_of("dst", &r.dst));
            for (dir, what, set) in [(Dir::Src, "src", &src), (Dir::Dst, "dst", &dst)] {
                if let Some(set) = set {
                    let m = Match::Addr {
                        family: fam,
                        dir,
                        negate: true,
                        set: set.clone(),
                    };
                    chain.push(return_rule(vec![m], r, what));
                }
            }
            selected.push((f, src, dst));
        }
        // ... then pinned flows (the rest of the rule's scope): they keep their path whatever
        // the rule's exemptions, health and action say now
        for f in [IpFamily::V4, IpFamily::V6] {
            if flow_pins.in_rule_chains && !flow_pins.everywhere {
                let comment = format!("{}: pinned", r.name);
                chain.push(pin_rule(f, flows_map(f), comment, target));
            }
            if dr_pins.in_rule_chains && !dr_pins.everywhere {
                chain.push(dr_pin_rule(f, format!("{}: dr pinned", r.name)));
            }
        }
        for (f, src, dst) in selected {
            let fam = ip_family(f);
            let xsrc = prefix_set(&mut t.sets, r, "except_src", &r.except_src, f);
            let xdst = prefix_set(&mut t.sets, r, "except_dst", &r.except_dst, f);
            for (set, dir, what) in [
                (xsrc, Dir::Src, "except_src"),
                (xdst, Dir::Dst, "except_dst"),
            ] {
                if let Some(set) = set {
                    chain.push(exempt_rule(r, fam, dir, set, what));
                }
            }
            let matches = addr_matches(fam, &src, &dst);
            if r.health.is_some() && r.action.diverts() {
                chain.extend(health_rules(r, target, &matches));
            }
            if r.action == Action::Dr {
                chain.push(dr_rule(r, fam, &matches));
                continue;
            }
            let stmts = if r.decide == Decide::Queue {
                queue_candidate_stmts(r, target)
            } else {
                action_stmts(r, target, fam)
            };
            chain.push(Rule {
                matches,
                stmts,
                comment: Some(r.name.clone()),
            });
        }
        rule_chains.push(Chain {
            name: chain_name(r),
            base: None,
            rules: chain,
        });
    }
    t.chains.push(Chain {
        name: "prerouting".into(),
        base: Some(BaseChain {
            kind: ChainType::Filter,
            hook: Hook::Prerouting,
            priority: BRIDGE_PRIORITY,
        }),
        rules: prerouting,
    });
    // Base chains before the rule chains: `apply` keeps base chains hooked and recreates the
    // rest, so this order is also the order the kernel lists them in after a re-apply.
    if replies {
        let rules = tproxy_upstream_rules(target, &mut t.sets);
        t.chains.push(Chain {
            name: "output".into(),
            base: Some(BaseChain {
                kind: ChainType::Filter,
                hook: Hook::Output,
                priority: BRIDGE_PRIORITY,
            }),
            rules,
        });
    }
    t.chains.extend(rule_chains);
    t
}

/// The bridge's output chain while TPROXY is in use: a TCP/UDP packet the host sends into
/// the bridge from an address that is not its own is a transparent proxy's upstream packet
/// (it carries the client's address). Its 5-tuple, reversed, goes into the reply-path map
/// with the TPROXY mark, so exactly that connection's replies are taken to the local stack.
/// Not restricted to the current rules' ports: a proxy may open upstream connections for a
/// client connection that an earlier policy's rule diverted.
fn tproxy_upstream_rules(target: &Target, sets: &mut Vec<Set>) -> Vec<Rule> {
    // The host's own sources: its addresses on the bridge, and what a host sends from before
    // or besides them (unspecified, link-local: DHCP, DAD, ND, MLD).
    let mut own4: Vec<Ipv4Net> = vec![Ipv4Net::from(Ipv4Addr::UNSPECIFIED), LINK_LOCAL4];
    let mut own6: Vec<Ipv6Net> = vec![Ipv6Net::from(Ipv6Addr::UNSPECIFIED), LINK_LOCAL6];
    for a in &target.bridge_addrs {
        match a {
            IpAddr::V4(a) => own4.push((*a).into()),
            IpAddr::V6(a) => own6.push((*a).into()),
        }
    }
    let own = [
        (
            IpFamily::V4,
            "own4",
            SetKind::Ipv4Addr,
            Ipv4Net::aggregate(&own4)
                .into_iter()
                .map(SetElem::V4)
                .collect::<Vec<_>>(),
        ),
        (
            IpFamily::V6,
            "own6",
            SetKind::Ipv6Addr,
            Ipv6Net::aggregate(&own6)
                .into_iter()
                .map(SetElem::V6)
                .collect(),
        ),
    ];
    let mut rules = Vec::new();
    for (f, name, kind, elements) in own {
        sets.push(Set {
            name: name.into(),
            kind,
            interval: true,
            elements,
            dynamic: None,
            keep: false,
        });
        // every protocol: the key holds it, so a reply only ever meets its own connection
        let matches = vec![Match::Addr {
            family: f,
            dir: Dir::Src,
            negate: true,
            set: name.into(),
        }];
        rules.push(Rule {
            matches,
            stmts: vec![
                Stmt::MarkSetMasked {
                    keep: !target.mark_mask,
                    value: target.tproxy_mark(),
                },
                Stmt::UpdateMark {
                    key: reversed_five_tuple(f),
                    set: replies_map(f).into(),
                },
                Stmt::Counter,
            ],
            comment: Some("tproxy upstream".into()),
        });
    }
    rules
}

/// A queue rule's main match in the bridge table: tag the frame with the rule (so the IP
/// hook's queue rule knows which rule matched, after the exemptions) and bridge it on. Whether
/// it is diverted is decided in br_netfilter's IP pass (see [`queue_chains`]).
fn queue_candidate_stmts(r: &DivertRule, target: &Target) -> Vec<Stmt> {
    vec![
        Stmt::Counter,
        Stmt::MarkSetMasked {
            keep: !target.layout().mask(),
            value: target.tag_mark(r.tag),
        },
        Stmt::Accept,
    ]
}

/// The mark (tag + verdict code) of a `divert` decision for queue rule `r`; the local-stack
/// rules of a queue rule match it (under `l.mask()`), whichever datapath decided.
pub fn divert_mark(l: &MarkLayout, r: &DivertRule) -> u32 {
    l.tag_mark(r.tag) | l.code_mark(CODE_DIVERT)
}

fn queue_rules(policy: &Policy) -> impl Iterator<Item = &DivertRule> {
    policy.rules.iter().filter(|r| r.decide == Decide::Queue)
}

/// The IP-hook half of `decide = "queue"` (inet table, prerouting; reached by bridged frames
/// through br_netfilter, which brdivert turns on for its bridge when a policy has queue
/// rules):
/// - `q_restore`: a decided flow (verdict code in its ct mark) gets its decision back in
///   the packet mark — tag and code, every other bit kept;
/// - `q_decide`: the first packet of a new, undecided flow that a queue rule tagged goes to
///   the queue (bypass: no listener, the packet goes on undecided, i.e. bridged);
/// - `q_pin`: the decision the daemon wrote into the packet mark is copied into the ct mark.
///
/// A `drop` decision is answered NF_DROP by the daemon and never pinned (see docs/queue.md).
/// The divert itself: `redirect` at dstnat on the decided mark (br_netfilter then hands the
/// frame to the host), `local` in the bridge chain of [`queue_bridge_chain`].
pub fn queue_chains(policy: &Policy, target: &Target) -> Vec<Chain> {
    let l = target.layout();
    let q = target.queue;
    let decided: Vec<(u32, String)> = queue_rules(policy)
        .map(|r| (divert_mark(&l, r), format!("{}: divert", r.name)))
        .chain(std::iter::once((
            l.code_mark(CODE_BYPASS),
            "queue: bypass".to_string(),
        )))
        .collect();
    let keep = !l.mask();
    let restore = decided
        .iter()
        .map(|(m, comment)| Rule {
            matches: vec![Match::CtMark {
                mask: l.mask(),
                value: *m,
            }],
            stmts: vec![Stmt::MarkSetMasked { keep, value: *m }],
            comment: Some(comment.clone()),
        })
        .collect();
    let decide = queue_rules(policy)
        .map(|r| Rule {
            matches: vec![
                Match::Mark {
                    mask: l.mask(),
                    value: l.tag_mark(r.tag),
                },
                Match::CtStateNew,
                Match::CtMark {
                    mask: l.verdict_mask(),
                    value: 0,
                },
            ],
            stmts: vec![
                Stmt::Counter,
                Stmt::Queue {
                    num: q.num,
                    fanout: q.fanout,
                    bypass: true,
                    form: q.form,
                },
            ],
            comment: Some(format!("{}: queue", r.name)),
        })
        .collect();
    let pin = decided
        .iter()
        .map(|(m, comment)| Rule {
            matches: vec![
                Match::CtStateNew,
                Match::Mark {
                    mask: l.mask(),
                    value: *m,
                },
            ],
            stmts: vec![Stmt::Counter, Stmt::CtMarkSetMasked { keep, value: *m }],
            comment: Some(comment.clone()),
        })
        .collect();
    let base = |priority| {
        Some(BaseChain {
            kind: ChainType::Filter,
            hook: Hook::Prerouting,
            priority,
        })
    };
    vec![
        Chain {
            name: "q_restore".into(),
            base: base(QUEUE_RESTORE_PRIORITY),
            rules: restore,
        },
        Chain {
            name: "q_decide".into(),
            base: base(QUEUE_DECIDE_PRIORITY),
            rules: decide,
        },
        Chain {
            name: "q_pin".into(),
            base: base(QUEUE_PIN_PRIORITY),
            rules: pin,
        },
    ]
}

/// `local` queue rules: a frame whose flow was decided `divert` (its mark set in
/// br_netfilter's IP pass, which runs before this chain) is handed to the local stack with
/// the frame diverter's move (and the rule's IPVS fwmark, if any). None without such rules.
pub fn queue_bridge_chain(policy: &Policy, target: &Target) -> Option<Chain> {
    let l = target.layout();
    let rules: Vec<Rule> = queue_rules(policy)
        .filter_map(|r| {
            let Action::Local { fwmark } = r.action else {
                return None;
            };
            let mut stmts = vec![Stmt::Counter];
            if let Some(m) = fwmark {
                stmts.push(Stmt::MarkSet(m));
            }
            stmts.extend(divert_move(target));
            stmts.push(Stmt::Accept);
            Some(Rule {
                matches: vec![Match::Mark {
                    mask: l.mask(),
                    value: divert_mark(&l, r),
                }],
                stmts,
                comment: Some(format!("{}: divert", r.name)),
            })
        })
        .collect();
    (!rules.is_empty()).then(|| Chain {
        name: "q_divert".into(),
        base: Some(BaseChain {
            kind: ChainType::Filter,
            hook: Hook::Prerouting,
            priority: BRIDGE_QUEUE_DIVERT_PRIORITY,
        }),
        rules,
    })
}

/// `arp_shield` on a `local` VIP rule: only the bridge host (the director, which holds the
/// VIPs) answers ARP for them. Every rule's drops come first (as the userspace datapath checks
/// the sender before the target):
/// - ARP from a port whose *sender* address is a VIP (a realserver's reply or gratuitous ARP
///   for the VIP) is dropped — except a request for another address (a realserver resolving
///   its gateway for a reply sourced from the VIP, default `arp_announce = 0`), which is
///   turned into a probe (sender 0.0.0.0): answered, but nobody learns the VIP from it;
/// - ARP *requests* for a VIP are not flooded: the frame diverter's move hands them to the
///   bridge host only (the broadcast is re-addressed to the bridge MAC, so the bridge delivers
///   it locally and nowhere else), whose ARP stack answers with the bridge MAC.
///
/// IPv6 VIPs get the same for Neighbour Discovery, one rule pair per VIP (the ND target is a
/// raw 128-bit compare in nft 1.0.6): neighbour adverts about a VIP from a port are dropped,
/// neighbour solicitations for a VIP go to the bridge host only (which must hold the VIP on
/// the bridge device: Linux answers NS only for addresses of the receiving interface).
///
/// Frames the bridge host sends itself (its own replies and announcements) never pass bridge
/// prerouting, so they are untouched. Replies *to* the VIP (the director's own resolution)
/// are unicast to the bridge MAC already and are left alone.
fn arp_shield_rules(policy: &Policy, target: &Target, sets: &mut Vec<Set>) -> Vec<Rule> {
    let mut drops = Vec::new();
    let mut requests = Vec::new();
    for r in &policy.rules {
        if !r.arp_shield || !matches!(r.action, Action::Local { .. }) {
            continue;
        }
        let comment = Some(format!("{}: arp shield", r.name));
        // IPv6: Neighbour Discovery about each VIP address, the same two moves
        if let Some(p) = r.dst.restricts(policy::Family::V6) {
            for vip in p.v6.iter().filter(|n| n.prefix_len() == 128) {
                for advert in [true, false] {
                    let m = Match::NdTarget {
                        advert,
                        target: vip.addr(),
                    };
                    if advert {
                        drops.push(Rule {
                            matches: vec![m],
                            stmts: vec![Stmt::Counter, Stmt::Drop],
                            comment: comment.clone(),
                        });
                    } else {
                        let mut stmts = vec![Stmt::Counter];
                        stmts.extend(divert_move(target));
                        stmts.push(Stmt::Accept);
                        requests.push(Rule {
                            matches: vec![m],
                            stmts,
                            comment: comment.clone(),
                        });
                    }
                }
            }
        }
        let Some(set) = r
            .dst
            .restricts(policy::Family::V4)
            .and_then(|p| prefix_set(sets, r, "dst", p, policy::Family::V4))
        else {
            continue;
        };
        let spa = Match::ArpAddr {
            dir: Dir::Src,
            set: set.clone(),
        };
        let tpa = Match::ArpAddr {
            dir: Dir::Dst,
            set: set.clone(),
        };
        // gratuitous ARP for a VIP (sender = target = VIP), request or reply
        drops.push(Rule {
            matches: vec![spa.clone(), tpa.clone()],
            stmts: vec![Stmt::Counter, Stmt::Drop],
            comment: comment.clone(),
        });
        // a realserver resolving someone for a packet sourced from the VIP (its default
        // arp_announce = 0): as is, the request would teach the target VIP -> realserver MAC;
        // as a probe (sender 0.0.0.0) it is still answered (to the sender's MAC) and teaches
        // nothing
        drops.push(Rule {
            matches: vec![Match::ArpRequest, spa.clone()],
            stmts: vec![
                Stmt::Counter,
                Stmt::ArpSaddrSet(std::net::Ipv4Addr::UNSPECIFIED),
                Stmt::Accept,
            ],
            comment: comment.clone(),
        });
        // any other ARP claiming a VIP: replies
        drops.push(Rule {
            matches: vec![spa],
            stmts: vec![Stmt::Counter, Stmt::Drop],
            comment: comment.clone(),
        });
        let mut stmts = vec![Stmt::Counter];
        stmts.extend(divert_move(target));
        stmts.push(Stmt::Accept);
        requests.push(Rule {
            matches: vec![Match::ArpRequest, tpa],
            stmts,
            comment,
        });
    }
    drops.extend(requests);
    drops
}

/// A health-checked rule, before its divert: tag what it would divert, and while the tag is in
/// the `down` set, bypass (clear the tag, bridge) or drop it. One set element flips it.
fn health_rules(r: &DivertRule, target: &Target, matches: &[Match]) -> [Rule; 2] {
    let tag = Stmt::MarkSetMasked {
        keep: !target.mark_mask,
        value: target.tag_mark(r.tag),
    };
    let down = match r.on_unhealthy {
        OnUnhealthy::Bypass => vec![
            Stmt::MarkSetMasked {
                keep: !target.mark_mask,
                value: 0,
            },
            Stmt::Counter,
            Stmt::Accept,
        ],
        OnUnhealthy::Drop => vec![Stmt::Counter, Stmt::Drop],
    };
    [
        Rule {
            matches: matches.to_vec(),
            stmts: vec![tag],
            comment: Some(format!("{}: health", r.name)),
        },
        Rule {
            matches: vec![Match::MarkIn {
                mask: target.mark_mask,
                set: HEALTH_DOWN_SET.into(),
            }],
            stmts: down,
            comment: Some(format!("{}: down", r.name)),
        },
    ]
}

/// `inet brdivert`: REDIRECT and TPROXY for packets carrying a rule's tag. Also what the
/// userspace datapath installs for its TAP local port.
pub fn local_stack_table(policy: &Policy, target: &Target) -> Table {
    let mut t = Table {
        family: Family::Inet,
        name: TABLE_NAME.into(),
        sets: Vec::new(),
        chains: Vec::new(),
    };
    let mut dstnat = Vec::new();
    let mut mangle = Vec::new();
    let to_tproxy_mark = Stmt::MarkSetMasked {
        keep: !target.mark_mask,
        value: target.tproxy_mark(),
    };
    // Packets of flows a TPROXY socket already holds (and the origin's replies to them) go to
    // that socket — for any tag, so flows pinned by a rule a reload removed keep working.
    mangle.push(Rule {
        matches: vec![
            Match::MarkNonZero {
                mask: target.mark_mask,
            },
            Match::SocketTransparent,
        ],
        stmts: vec![to_tproxy_mark.clone(), Stmt::Counter, Stmt::Accept],
        comment: Some("tproxy: established".into()),
    });
    for r in &policy.rules {
        // a queue rule's tag is on every packet it matched; only a divert verdict diverts
        let tagged = if r.decide == Decide::Queue {
            let l = target.layout();
            Match::Mark {
                mask: l.mask(),
                value: divert_mark(&l, r),
            }
        } else {
            Match::Mark {
                mask: target.mark_mask,
                value: target.tag_mark(r.tag),
            }
        };
        let l4 = r.proto.map(l4_of);
        match r.action {
            Action::Redirect { port } => {
                let dport = (!r.dport.is_empty()).then(|| dport_set(&mut t.sets, r));
                let mut m = vec![tagged];
                m.extend(l4_match(l4, Dir::Dst, &dport));
                dstnat.push(Rule {
                    matches: m,
                    stmts: vec![Stmt::Counter, Stmt::Redirect { port }],
                    comment: Some(r.name.clone()),
                });
            }
            Action::Tproxy { addr, port } => {
                let dport = (!r.dport.is_empty()).then(|| dport_set(&mut t.sets, r));
                for f in r.families() {
                    let family = ip_family(f);
                    let mut m = vec![tagged.clone(), Match::Family(family)];
                    m.extend(l4_match(l4, Dir::Dst, &dport));
                    mangle.push(Rule {
                        matches: m,
                        stmts: vec![
                            Stmt::Tproxy { family, addr, port },
                            to_tproxy_mark.clone(),
                            Stmt::Counter,
                            Stmt::Accept,
                        ],
                        comment: Some(r.name.clone()),
                    });
                }
            }
            Action::Local { .. } | Action::Dr | Action::Pass | Action::Drop => {}
        }
    }
    t.chains.push(Chain {
        name: "dstnat".into(),
        base: Some(BaseChain {
            kind: ChainType::Nat,
            hook: Hook::Prerouting,
            priority: DSTNAT_PRIORITY,
        }),
        rules: dstnat,
    });
    t.chains.push(Chain {
        name: "mangle".into(),
        base: Some(BaseChain {
            kind: ChainType::Filter,
            hook: Hook::Prerouting,
            priority: MANGLE_PRIORITY,
        }),
        rules: mangle,
    });
    t
}

/// The pin maps of `dr` flows (5-tuple → realserver MAC), per family.
pub fn dr_flows_map(f: IpFamily) -> &'static str {
    match f {
        IpFamily::V4 => "dr_flows4",
        IpFamily::V6 => "dr_flows6",
    }
}

/// The `dr` pin maps: run-time state like the divert pin maps, kept across applies.
fn dr_flows_maps() -> impl Iterator<Item = Set> {
    [IpFamily::V4, IpFamily::V6].into_iter().map(|f| Set {
        name: dr_flows_map(f).into(),
        kind: five_tuple(f).kind(),
        interval: false,
        elements: Vec::new(),
        dynamic: Some(Dynamic {
            map: Some(MapData::Ether),
            size: PIN_MAP_SIZE,
            timeout_s: PIN_TIMEOUT_S,
        }),
        keep: true,
    })
}

/// The bucket map of a `dr` rule (bucket → realserver MAC).
pub fn dr_buckets_map(r: &DivertRule) -> String {
    set_name(r, "buckets")
}

/// The bucket map of a `dr` rule, as `target` says ([`crate::dr::bucket_macs`]: the same
/// assignment the userspace datapath uses); buckets without a MAC are left out, so with no
/// MAC known at all the map is empty and the rule's frames are bridged untouched.
pub fn dr_buckets(r: &DivertRule, target: &Target) -> Set {
    let elements = crate::dr::bucket_macs(r, &target.neighbours, &target.dr_down)
        .into_iter()
        .enumerate()
        .filter_map(|(b, mac)| Some(SetElem::Bucket(b as u32, mac?)))
        .collect();
    Set {
        name: dr_buckets_map(r),
        kind: SetKind::Buckets,
        interval: false,
        elements,
        dynamic: None,
        keep: false,
    }
}

/// `action = "dr"`, per family: `<vip match> counter ether daddr set jhash ip saddr . th sport
/// mod 256 seed S map @<rule>_buckets update @dr_flows4 { <5-tuple> : ether daddr } accept`.
/// Only the destination MAC changes; the bridge then forwards the frame to that realserver's
/// port (no pkttype change, no local-stack hop). The flow is pinned to that MAC (the `dr
/// pinned` rules at the head of prerouting), so a later change of the buckets (health) moves
/// new flows only.
fn dr_rule(r: &DivertRule, family: IpFamily, matches: &[Match]) -> Rule {
    Rule {
        matches: matches.to_vec(),
        stmts: vec![
            Stmt::Counter,
            Stmt::EtherDaddrSetHash {
                key: FlowKey {
                    family,
                    fields: vec![KeyField::Saddr, KeyField::Sport],
                },
                modulus: DR_BUCKETS,
                seed: DR_HASH_SEED,
                set: dr_buckets_map(r),
            },
            Stmt::UpdateEther {
                key: five_tuple(family),
                set: dr_flows_map(family).into(),
            },
            Stmt::Accept,
        ],
        comment: Some(r.name.clone()),
    }
}

/// A `dr` flow already pinned keeps its realserver: `ether daddr set <5-tuple> map
/// @dr_flows4`, refreshing the pin.
fn dr_pin_rule(f: IpFamily, comment: String) -> Rule {
    Rule {
        matches: vec![Match::Family(f)],
        stmts: vec![
            Stmt::EtherDaddrSetMap {
                key: five_tuple(f),
                set: dr_flows_map(f).into(),
            },
            Stmt::UpdateEther {
                key: five_tuple(f),
                set: dr_flows_map(f).into(),
            },
            Stmt::Counter,
            Stmt::Accept,
        ],
        comment: Some(comment),
    }
}

/// What the bridge does with a frame the rule's main match takes. A divert also pins the flow
/// (and, for tproxy, the way back from the server).
fn action_stmts(r: &DivertRule, target: &Target, family: IpFamily) -> Vec<Stmt> {
    let mut s = vec![Stmt::Counter];
    match r.action {
        Action::Pass => s.push(Stmt::Accept),
        Action::Drop => s.push(Stmt::Drop),
        // built by `dr_rules` instead; bridging untouched is the safe reading
        Action::Dr => s.push(Stmt::Accept),
        Action::Redirect { .. } | Action::Tproxy { .. } | Action::Local { .. } => {
            match r.action {
                Action::Local { fwmark: Some(m) } => s.push(Stmt::MarkSet(m)),
                _ => s.push(Stmt::MarkSetMasked {
                    keep: !target.mark_mask,
                    value: target.tag_mark(r.tag),
                }),
            }
            s.extend(divert_move(target));
            s.push(Stmt::UpdateMark {
                key: five_tuple(family),
                set: flows_map(family).into(),
            });
            s.push(Stmt::Accept);
        }
    }
    s
}

fn exempt_rule(r: &DivertRule, family: IpFamily, dir: Dir, set: String, what: &str) -> Rule {
    Rule {
        matches: vec![Match::Addr {
            family,
            dir,
            negate: false,
            set,
        }],
        stmts: vec![Stmt::Counter, Stmt::Return],
        comment: Some(format!("{}: {what}", r.name)),
    }
}

/// Address matches for one family; with none, the family itself (so the v4 and v6 rules
/// of one policy rule stay distinct).
/// `<matches> return` in rule `r`'s chain: frames the rule does not select.
fn return_rule(matches: Vec<Match>, r: &DivertRule, what: &str) -> Rule {
    Rule {
        matches,
        stmts: vec![Stmt::Return],
        comment: Some(format!("{}: not {what}", r.name)),
    }
}

fn addr_matches(family: IpFamily, src: &Option<String>, dst: &Option<String>) -> Vec<Match> {
    let mut m = Vec::new();
    for (set, dir) in [(src, Dir::Src), (dst, Dir::Dst)] {
        if let Some(set) = set {
            m.push(Match::Addr {
                family,
                dir,
                negate: false,
                set: set.clone(),
            });
        }
    }
    if m.is_empty() {
        m.push(Match::Family(family));
    }
    m
}

fn l4_match(l4: Option<L4>, dir: Dir, ports: &Option<String>) -> Option<Match> {
    let l4 = l4?;
    Some(match ports {
        Some(set) => Match::Port {
            l4,
            dir,
            negate: false,
            set: set.clone(),
        },
        None => Match::L4Proto(l4),
    })
}

pub fn chain_name(r: &DivertRule) -> String {
    format!("rule_{}", r.name)
}

fn set_name(r: &DivertRule, what: &str) -> String {
    format!("{}_{what}", r.name)
}

fn family_suffix(f: policy::Family) -> &'static str {
    match f {
        policy::Family::V4 => "4",
        policy::Family::V6 => "6",
    }
}

fn add_set(
    sets: &mut Vec<Set>,
    r: &DivertRule,
    what: &str,
    kind: SetKind,
    interval: bool,
    elements: Vec<SetElem>,
) -> String {
    let name = set_name(r, what);
    if !sets.iter().any(|s| s.name == name) {
        sets.push(Set {
            name: name.clone(),
            kind,
            interval,
            elements,
            dynamic: None,
            keep: false,
        });
    }
    name
}

/// The set of `p`'s prefixes of family `f` (named `<rule>_<what>4|6`), if it has any.
fn prefix_set(
    sets: &mut Vec<Set>,
    r: &DivertRule,
    what: &str,
    p: &Prefixes,
    f: policy::Family,
) -> Option<String> {
    let (kind, elems): (SetKind, Vec<SetElem>) = match f {
        policy::Family::V4 => (
            SetKind::Ipv4Addr,
            p.v4.iter().map(|n| SetElem::V4(*n)).collect(),
        ),
        policy::Family::V6 => (
            SetKind::Ipv6Addr,
            p.v6.iter().map(|n| SetElem::V6(*n)).collect(),
        ),
    };
    if elems.is_empty() {
        return None;
    }
    // A list of plain addresses (VIPs) goes in a hash set: a cheaper lookup per frame and a
    // cheaper load than an interval set (measured in bench/kernel.sh); prefixes need intervals.
    let interval = elems.iter().any(|e| match e {
        SetElem::V4(n) => n.prefix_len() < 32,
        SetElem::V6(n) => n.prefix_len() < 128,
        _ => true,
    });
    Some(add_set(
        sets,
        r,
        &format!("{what}{}", family_suffix(f)),
        kind,
        interval,
        elems,
    ))
}

fn ifname_elems(names: &[String]) -> Vec<SetElem> {
    names.iter().map(|n| SetElem::IfName(n.clone())).collect()
}

/// The set of `r`'s destination ports (`<rule>_dport`). Single ports go in a hash set (a
/// cheaper lookup for every TCP/UDP frame the rule's jump tests); ranges need intervals.
fn dport_set(sets: &mut Vec<Set>, r: &DivertRule) -> String {
    let interval = r.dport.iter().any(|p| p.lo != p.hi);
    let elems = r.dport.iter().map(|p| SetElem::Ports(p.lo, p.hi)).collect();
    add_set(sets, r, "dport", SetKind::InetService, interval, elems)
}

fn l4_of(p: Proto) -> L4 {
    match p {
        Proto::Tcp => L4::Tcp,
        Proto::Udp => L4::Udp,
    }
}

pub fn ip_family(f: policy::Family) -> IpFamily {
    match f {
        policy::Family::V4 => IpFamily::V4,
        policy::Family::V6 => IpFamily::V6,
    }
}

/// The address a TPROXY rule sends to, for people (`check`'s plan).
pub fn describe_tproxy(addr: Option<IpAddr>, port: u16) -> String {
    match addr {
        Some(IpAddr::V6(a)) => format!("[{a}]:{port}"),
        Some(IpAddr::V4(a)) => format!("{a}:{port}"),
        None => format!(":{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::pins::{PinMap, PinScope};

    fn target() -> Target {
        Target {
            bridge_mac: [2, 0, 0, 0, 0, 0xfe],
            mark_mask: 0x00ff_0000,
            ..Default::default()
        }
    }

    fn policy(text: &str) -> Policy {
        crate::policy::test_policy(text)
    }

    fn set<'a>(t: &'a Table, name: &str) -> &'a Set {
        t.sets
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no set {name}"))
    }

    fn chain<'a>(t: &'a Table, name: &str) -> &'a Chain {
        t.chains
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no chain {name}"))
    }

    /// The head of a rule's chain: the early returns (`NAME: not …`) and the pin lookups
    /// (`NAME: pinned`, `NAME: dr pinned`).
    fn is_head(rule: &str, r: &Rule) -> bool {
        r.comment.as_ref().is_some_and(|k| {
            k.starts_with(&format!("{rule}: not "))
                || *k == format!("{rule}: pinned")
                || *k == format!("{rule}: dr pinned")
        })
    }

    /// A rule's chain without its head ([`is_head`]).
    fn rule_chain(t: &Table, rule: &str) -> Chain {
        let mut c = chain(t, &format!("rule_{rule}")).clone();
        let n = c.rules.iter().take_while(|r| is_head(rule, r)).count();
        c.rules.drain(..n);
        c
    }

    #[test]
    fn v4_v6_split_and_sets() {
        let p = policy(
            "[[divert]]\nname = \"web\"\nproto = \"tcp\"\ndport = [80, \"8080-8090\"]\n\
             dst = [\"10.0.0.0/8\", \"2001:db8::/32\"]\nexcept_src = \"10.0.0.5\"\n\
             action = \"redirect\"\nport = 3129\n",
        );
        let rs = compile(&p, &target());
        let b = rs.table(Family::Bridge).unwrap();
        assert_eq!(
            set(b, "web_dport").elements,
            vec![SetElem::Ports(80, 80), SetElem::Ports(8080, 8090)]
        );
        assert!(set(b, "web_dport").interval);
        assert_eq!(
            set(b, "web_dst4").elements,
            vec![SetElem::V4("10.0.0.0/8".parse().unwrap())]
        );
        assert_eq!(
            set(b, "web_dst6").elements,
            vec![SetElem::V6("2001:db8::/32".parse().unwrap())]
        );
        assert!(
            b.sets.iter().all(|s| s.name != "web_except_src6"),
            "no empty sets"
        );
        let c = rule_chain(b, "web");
        // v4: exemption then divert; v6: divert only
        assert_eq!(c.rules.len(), 3);
        assert_eq!(c.rules[0].stmts, vec![Stmt::Counter, Stmt::Return]);
        assert_eq!(
            c.rules[1].matches,
            vec![Match::Addr {
                family: IpFamily::V4,
                dir: Dir::Dst,
                negate: false,
                set: "web_dst4".into()
            }]
        );
        assert_eq!(
            c.rules[1].stmts,
            vec![
                Stmt::Counter,
                Stmt::MarkSetMasked {
                    keep: 0xff00_ffff,
                    value: 0x0001_0000
                },
                Stmt::PkttypeSetHost,
                Stmt::EtherDaddrSet([2, 0, 0, 0, 0, 0xfe]),
                Stmt::UpdateMark {
                    key: five_tuple(IpFamily::V4),
                    set: "flows4".into()
                },
                Stmt::Accept
            ]
        );
        let pre = chain(b, "prerouting");
        // just the rule's jump (no tproxy rule: no reply lookups); its chain first returns
        // frames to other addresses, then looks up the pinned flows, v4 and v6
        assert_eq!(pre.rules.len(), 1);
        assert_eq!(pre.rules[0].stmts, vec![Stmt::Jump("rule_web".into())]);
        let head = &chain(b, "rule_web").rules[..4];
        for (r, f) in head[..2].iter().zip([IpFamily::V4, IpFamily::V6]) {
            assert_eq!(r.comment.as_deref(), Some("web: not dst"));
            assert_eq!(r.stmts, vec![Stmt::Return]);
            assert_eq!(
                r.matches,
                vec![Match::Addr {
                    family: f,
                    dir: Dir::Dst,
                    negate: true,
                    set: format!("web_dst{}", if f == IpFamily::V4 { 4 } else { 6 })
                }]
            );
        }
        let pinned = &head[2..];
        assert_eq!(pinned[0].comment.as_deref(), Some("web: pinned"));
        assert_eq!(pinned[0].matches, vec![Match::Family(IpFamily::V4)]);
        assert!(matches!(
            &pinned[0].stmts[0],
            Stmt::MarkSetMap { set, .. } if set == "flows4"
        ));
        assert_eq!(pinned[1].matches, vec![Match::Family(IpFamily::V6)]);
        // ... and the reply lookups while an earlier policy's TPROXY routing is installed
        let kept = Target {
            tproxy_replies: true,
            ..target()
        };
        let pre = chain(&bridge_table(&p, &kept), "prerouting").clone();
        assert_eq!(pre.rules.len(), 3);
        assert_eq!(pre.rules[0].comment.as_deref(), Some("tproxy reply"));
        assert!(b.sets.iter().filter(|s| s.keep).count() == 5);
        let inet = rs.table(Family::Inet).unwrap();
        let dnat = chain(inet, "dstnat");
        assert_eq!(
            dnat.rules[0].matches[0],
            Match::Mark {
                mask: 0x00ff_0000,
                value: 0x0001_0000
            }
        );
        assert_eq!(
            dnat.rules[0].stmts.last(),
            Some(&Stmt::Redirect { port: 3129 })
        );
    }

    #[test]
    fn family_pins_rules_without_addresses() {
        let p =
            policy("[[divert]]\nname = \"web\"\nproto = \"tcp\"\ndport = 80\naction = \"local\"\n");
        let b = bridge_table(&p, &target());
        let c = rule_chain(&b, "web");
        assert_eq!(c.rules[0].matches, vec![Match::Family(IpFamily::V4)]);
        assert_eq!(c.rules[1].matches, vec![Match::Family(IpFamily::V6)]);
    }

    #[test]
    fn local_fwmark_sets_the_whole_mark() {
        let p = policy(
            "[[divert]]\nname = \"v\"\ndst = \"10.0.0.100\"\naction = \"local\"\nfwmark = 16\n",
        );
        let b = bridge_table(&p, &target());
        let c = rule_chain(&b, "v");
        assert_eq!(
            c.rules[0].stmts,
            vec![
                Stmt::Counter,
                Stmt::MarkSet(16),
                Stmt::PkttypeSetHost,
                Stmt::EtherDaddrSet([2, 0, 0, 0, 0, 0xfe]),
                Stmt::UpdateMark {
                    key: five_tuple(IpFamily::V4),
                    set: "flows4".into()
                },
                Stmt::Accept
            ]
        );
        // local needs nothing in the local-stack table but the generic tproxy socket rule
        let inet = local_stack_table(&p, &target());
        assert!(chain(&inet, "dstnat").rules.is_empty());
        assert_eq!(chain(&inet, "mangle").rules.len(), 1);
    }

    #[test]
    fn tproxy_has_reply_path_and_socket_rule() {
        let p = policy(
            "[[divert]]\nname = \"tp\"\nfrom = \"eth1\"\nproto = \"tcp\"\ndport = 8080\n\
             except_src = \"10.77.0.3\"\naction = \"tproxy\"\naddress = \"127.0.0.1\"\nport = 3130\n",
        );
        let rs = compile(&p, &target());
        let b = rs.table(Family::Bridge).unwrap();
        let pre = chain(b, "prerouting");
        // replies are found by their exact 5-tuple, which the output chain records from the
        // proxy's upstream packets (sent from an address not the host's own)
        assert_eq!(pre.rules.len(), 3);
        assert!(matches!(
            &pre.rules[0].stmts[0],
            Stmt::MarkSetMap { key, set } if set == "tpreplies4" && key == &five_tuple(IpFamily::V4)
        ));
        let c = rule_chain(b, "tp");
        assert_eq!(c.rules[0].stmts, vec![Stmt::Counter, Stmt::Return]);
        assert!(
            !c.rules[1]
                .stmts
                .iter()
                .any(|s| matches!(s, Stmt::UpdateMark { set, .. } if set == "tpreplies4")),
            "the divert records nothing for the reply path"
        );
        let out = chain(b, "output");
        assert_eq!(out.rules.len(), 2, "v4 and v6: {:?}", out.rules);
        // only packets from addresses that are not the host's own
        assert_eq!(
            out.rules[0].matches,
            vec![Match::Addr {
                family: IpFamily::V4,
                dir: Dir::Src,
                negate: true,
                set: "own4".into()
            }]
        );
        assert!(out.rules[0].stmts.contains(&Stmt::UpdateMark {
            key: reversed_five_tuple(IpFamily::V4),
            set: "tpreplies4".into()
        }));
        let own = Target {
            bridge_addrs: vec!["10.77.0.254".parse().unwrap(), "fd77::fe".parse().unwrap()],
            ..target()
        };
        let b = bridge_table(&p, &own);
        let set = |name: &str| {
            b.sets
                .iter()
                .find(|s| s.name == name)
                .unwrap()
                .elements
                .clone()
        };
        assert_eq!(
            set("own4"),
            ["0.0.0.0/32", "10.77.0.254/32", "169.254.0.0/16"]
                .map(|n| SetElem::V4(n.parse().unwrap()))
        );
        assert_eq!(
            set("own6"),
            ["::/128", "fd77::fe/128", "fe80::/10"].map(|n| SetElem::V6(n.parse().unwrap()))
        );
        // the reversed key has the forward key's type
        assert_eq!(
            reversed_five_tuple(IpFamily::V6).kind(),
            five_tuple(IpFamily::V6).kind()
        );
        let inet = rs.table(Family::Inet).unwrap();
        let m = chain(inet, "mangle");
        assert_eq!(m.rules.len(), 2, "socket rule + one v4 tproxy rule");
        assert_eq!(
            m.rules[0].matches,
            vec![
                Match::MarkNonZero { mask: 0x00ff_0000 },
                Match::SocketTransparent
            ]
        );
        assert!(m.rules[1].stmts.contains(&Stmt::Tproxy {
            family: IpFamily::V4,
            addr: Some("127.0.0.1".parse().unwrap()),
            port: 3130
        }));
        assert!(m.rules[1].stmts.contains(&Stmt::MarkSetMasked {
            keep: 0xff00_ffff,
            value: 0x00ff_0000
        }));
    }

    #[test]
    fn pass_and_drop() {
        let p = policy(
            "[[divert]]\nname = \"ssh\"\nproto = \"tcp\"\ndport = 22\ndst = \"10.0.0.1\"\naction = \"pass\"\n\
             [[divert]]\nname = \"bad\"\nproto = \"udp\"\nsrc_mac = \"02:00:00:00:00:09\"\naction = \"drop\"\n",
        );
        let b = bridge_table(&p, &target());
        assert_eq!(
            rule_chain(&b, "ssh").rules[0].stmts,
            vec![Stmt::Counter, Stmt::Accept]
        );
        let pre = chain(&b, "prerouting");
        // nothing diverts, so nothing is pinned: no pin lookups, just the two jumps
        assert_eq!(pre.rules.len(), 2);
        assert_eq!(
            pre.rules[1].matches,
            vec![
                Match::EtherSaddr {
                    set: "bad_src_mac".into()
                },
                Match::Untagged,
                Match::L4Proto(L4::Udp)
            ]
        );
        assert_eq!(
            rule_chain(&b, "bad").rules[1].stmts,
            vec![Stmt::Counter, Stmt::Drop]
        );
        // ... unless an earlier policy's flows may still be pinned: with the scope of one of
        // these rules, in that rule's chains, first ...
        let covered = Target {
            earlier_pins: EarlierPins {
                scopes: [(
                    PinScope {
                        map: PinMap::Flows,
                        scope: p.rules[1].scope(),
                    },
                    u64::MAX,
                )]
                .into(),
                unknown: false,
            },
            ..target()
        };
        let b = bridge_table(&p, &covered);
        assert_eq!(chain(&b, "prerouting").rules.len(), 2);
        for name in ["ssh", "bad"] {
            let c = chain(&b, &format!("rule_{name}"));
            let pinned = format!("{name}: pinned");
            let pins: Vec<&Rule> = c
                .rules
                .iter()
                .filter(|r| r.comment.as_deref() == Some(pinned.as_str()))
                .collect();
            assert_eq!(pins.len(), 2, "{c:?}");
        }
        // ... and with a scope no rule has now, for every frame
        let elsewhere = Target {
            earlier_pins: EarlierPins {
                scopes: [(
                    PinScope {
                        map: PinMap::Flows,
                        scope: "tcp/80".into(),
                    },
                    u64::MAX,
                )]
                .into(),
                unknown: false,
            },
            ..target()
        };
        let b = bridge_table(&p, &elsewhere);
        let pre = chain(&b, "prerouting");
        assert_eq!(pre.rules.len(), 4);
        assert_eq!(pre.rules[0].comment.as_deref(), Some("pinned"));
        assert!(
            rule_chain(&b, "bad")
                .rules
                .iter()
                .all(|r| r.comment.as_deref() != Some("bad: pinned"))
        );
    }

    #[test]
    fn health_rule_checks_down_set_before_divert() {
        for (on, last) in [("bypass", Stmt::Accept), ("drop", Stmt::Drop)] {
            let p = policy(&format!(
                "[[divert]]\nname = \"web\"\nproto = \"tcp\"\ndport = 80\ndst = \"10.0.0.0/8\"\n\
                 action = \"redirect\"\nport = 3129\n\
                 health = {{ connect = \"127.0.0.1:3129\" }}\non_unhealthy = \"{on}\"\n"
            ));
            let b = bridge_table(&p, &target());
            let c = rule_chain(&b, "web");
            // tag, down check, divert (v4 only: dst is v4)
            assert_eq!(c.rules.len(), 3);
            assert_eq!(c.rules[0].matches, c.rules[2].matches);
            assert_eq!(
                c.rules[0].stmts,
                vec![Stmt::MarkSetMasked {
                    keep: 0xff00_ffff,
                    value: 0x0001_0000
                }]
            );
            assert_eq!(
                c.rules[1].matches,
                vec![Match::MarkIn {
                    mask: 0x00ff_0000,
                    set: "down".into()
                }]
            );
            assert_eq!(c.rules[1].stmts.last(), Some(&last));
            if on == "bypass" {
                // the tag is cleared before the frame is bridged
                assert_eq!(
                    c.rules[1].stmts[0],
                    Stmt::MarkSetMasked {
                        keep: 0xff00_ffff,
                        value: 0
                    }
                );
            }
            assert_eq!(
                health_keys(&p, &target()),
                vec![("web".to_string(), 0x0001_0000)]
            );
        }
    }

    #[test]
    fn dr_rule_hashes_into_the_bucket_map_and_pins() {
        let p = policy(
            "[[divert]]\nname = \"vip\"\nproto = \"tcp\"\ndport = 80\ndst = \"10.0.0.80\"\n\
             action = \"dr\"\nrealservers = [{ mac = \"02:00:00:00:00:31\" }, \
             { address = \"10.0.0.32\", health = { connect = \"10.0.0.32:80\" } }]\n",
        );
        let mut t = target();
        let b = bridge_table(&p, &t);
        let c = rule_chain(&b, "vip");
        assert_eq!(c.rules.len(), 1, "v4 only");
        assert_eq!(
            c.rules[0].stmts[1],
            Stmt::EtherDaddrSetHash {
                key: FlowKey {
                    family: IpFamily::V4,
                    fields: vec![KeyField::Saddr, KeyField::Sport]
                },
                modulus: DR_BUCKETS,
                seed: DR_HASH_SEED,
                set: "vip_buckets".into()
            }
        );
        assert_eq!(
            c.rules[0].stmts[2],
            Stmt::UpdateEther {
                key: five_tuple(IpFamily::V4),
                set: "dr_flows4".into()
            }
        );
        // dr flows keep their realserver: looked up first in the rule's chain only (the
        // realservers' replies never meet the lookup)
        let head: Vec<Option<&str>> = chain(&b, "rule_vip")
            .rules
            .iter()
            .map(|r| r.comment.as_deref())
            .take(3)
            .collect();
        // (the VIPs are IPv4 only: IPv6 frames leave at once)
        assert_eq!(
            head,
            [
                Some("vip: not dst"),
                Some("vip: not ipv6"),
                Some("vip: dr pinned")
            ]
        );
        assert!(
            chain(&b, "prerouting")
                .rules
                .iter()
                .all(|r| r.comment.as_deref() != Some("dr pinned"))
        );
        assert!(set(&b, "dr_flows6").keep);
        // the second realserver's MAC is unknown: every bucket goes to the first
        let mac1 = [2, 0, 0, 0, 0, 0x31];
        let mac2 = [2, 0, 0, 0, 0, 0x32];
        let all_first = |s: &Set| {
            s.elements
                .iter()
                .all(|e| matches!(e, SetElem::Bucket(_, m) if *m == mac1))
        };
        assert!(all_first(set(&b, "vip_buckets")));
        assert_eq!(set(&b, "vip_buckets").elements.len(), DR_BUCKETS as usize);
        // learned: half each; down: the first again
        t.neighbours.insert("10.0.0.32".parse().unwrap(), mac2);
        let s = dr_buckets(&p.rules[0], &t);
        let n2 = s
            .elements
            .iter()
            .filter(|e| matches!(e, SetElem::Bucket(_, m) if *m == mac2))
            .count();
        assert_eq!(n2, DR_BUCKETS as usize / 2);
        t.dr_down
            .insert(dr_check_key("vip", &p.rules[0].realservers[1]));
        assert!(all_first(&dr_buckets(&p.rules[0], &t)));
        // every realserver down: all keep their buckets
        t.dr_down
            .insert(dr_check_key("vip", &p.rules[0].realservers[0]));
        assert_eq!(dr_buckets(&p.rules[0], &t), s);
        // policies without dr pay nothing
        let plain =
            policy("[[divert]]\nname = \"x\"\nproto = \"tcp\"\ndport = 80\naction = \"pass\"\n");
        assert!(
            bridge_table(&plain, &target())
                .sets
                .iter()
                .all(|s| !s.name.starts_with("dr_"))
        );
        assert_eq!(parse_check_key("vip/10.0.0.32"), ("vip", Some("10.0.0.32")));
        assert_eq!(parse_check_key("web"), ("web", None));
    }

    #[test]
    fn queue_rule_tags_in_bridge_and_decides_in_ip_hooks() {
        let p = policy(
            "[[divert]]\nname = \"web\"\nproto = \"tcp\"\ndport = 80\naction = \"redirect\"\n\
             port = 3129\ndecide = \"queue\"\n\
             [[divert]]\nname = \"vip\"\ndst = \"10.0.0.100\"\naction = \"local\"\nfwmark = 16\n\
             decide = \"queue\"\n",
        );
        let mut t = target();
        t.queue = QueueTarget {
            num: 4,
            fanout: 2,
            form: QueueForm::XtCompat,
            verdict_mask: 0x0300_0000,
        };
        let rs = compile(&p, &t);
        let b = rs.table(Family::Bridge).unwrap();
        // the bridge only tags (tag bits set, verdict bits cleared) and bridges on
        assert_eq!(
            rule_chain(b, "web").rules[0].stmts,
            vec![
                Stmt::Counter,
                Stmt::MarkSetMasked {
                    keep: 0xfc00_ffff,
                    value: 0x0001_0000
                },
                Stmt::Accept
            ]
        );
        // local: diverted after br_netfilter's pass, on the decided mark, with its fwmark
        let qd = chain(b, "q_divert");
        assert_eq!(
            qd.base.as_ref().unwrap().priority,
            BRIDGE_QUEUE_DIVERT_PRIORITY
        );
        assert_eq!(qd.rules.len(), 1);
        assert_eq!(
            qd.rules[0].matches,
            vec![Match::Mark {
                mask: 0x03ff_0000,
                value: 0x0102_0000
            }]
        );
        assert_eq!(qd.rules[0].stmts[1], Stmt::MarkSet(16));
        let inet = rs.table(Family::Inet).unwrap();
        let decide = chain(inet, "q_decide");
        assert_eq!(decide.rules.len(), 2);
        assert_eq!(
            decide.rules[0].matches,
            vec![
                Match::Mark {
                    mask: 0x03ff_0000,
                    value: 0x0001_0000
                },
                Match::CtStateNew,
                Match::CtMark {
                    mask: 0x0300_0000,
                    value: 0
                }
            ]
        );
        assert_eq!(
            decide.rules[0].stmts[1],
            Stmt::Queue {
                num: 4,
                fanout: 2,
                bypass: true,
                form: QueueForm::XtCompat
            }
        );
        // restore and pin: each rule's divert mark and the bypass code
        let pin = chain(inet, "q_pin");
        assert_eq!(pin.rules.len(), 3);
        assert_eq!(
            pin.rules[0].stmts[1],
            Stmt::CtMarkSetMasked {
                keep: 0xfc00_ffff,
                value: 0x0101_0000
            }
        );
        assert_eq!(chain(inet, "q_restore").rules.len(), 3);
        let prio = |n| chain(inet, n).base.as_ref().unwrap().priority;
        assert!(prio("q_restore") < prio("q_decide") && prio("q_decide") < prio("q_pin"));
        assert!(prio("q_pin") < MANGLE_PRIORITY);
        // redirect only on the decided mark
        assert_eq!(
            chain(inet, "dstnat").rules[0].matches[0],
            Match::Mark {
                mask: 0x03ff_0000,
                value: 0x0101_0000
            }
        );
        // both forms render; native as nft syntax
        t.queue.form = QueueForm::Native;
        let text = crate::nft::render::render(&compile(&p, &t));
        assert!(text.contains("queue flags bypass to 4-5"), "{text}");
        assert!(
            text.contains("ct state new ct mark & 0x03000000 == 0x00000000"),
            "{text}"
        );
        assert!(
            text.contains("ct mark set ct mark & 0xfd01ffff | 0x01010000"),
            "{text}"
        );
        // no queue rules: no queue chains
        let plain = compile(
            &policy(
                "[[divert]]\nname = \"w\"\nproto = \"tcp\"\ndport = 80\naction = \"redirect\"\nport = 3129\n",
            ),
            &t,
        );
        assert!(
            plain
                .table(Family::Inet)
                .unwrap()
                .chains
                .iter()
                .all(|c| !c.name.starts_with("q_"))
        );
    }
}
