//! The validated policy: the single source of truth that both the nft compiler
//! ([`crate::nft::compile`]) and the Rust classifier read.
//!
//! [`Policy::build`] checks every key of every `[[divert]]` and either returns a typed model
//! (plus warnings) or refuses with `file:line:column: what; how to fix` for every problem.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_spanned::Spanned;

use crate::diag::{Diagnostic, Refused};
use crate::rules::{self, RawDivert, RuleFile};
use crate::settings::Settings;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

pub const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// Inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
}

/// A list of prefixes, split by family, each list merged (no overlaps) and sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prefixes {
    pub v4: Vec<Ipv4Net>,
    pub v6: Vec<Ipv6Net>,
}

impl Prefixes {
    fn from_nets(nets: Nets) -> Prefixes {
        Prefixes {
            v4: aggregate_v4(nets.v4),
            v6: aggregate_v6(nets.v6),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    pub fn has(&self, f: Family) -> bool {
        match f {
            Family::V4 => !self.v4.is_empty(),
            Family::V6 => !self.v6.is_empty(),
        }
    }

    /// Does the list hold every address of family `f` (`0.0.0.0/0` or `::/0`)?
    pub fn is_all(&self, f: Family) -> bool {
        match f {
            Family::V4 => self.v4.iter().any(|n| n.prefix_len() == 0),
            Family::V6 => self.v6.iter().any(|n| n.prefix_len() == 0),
        }
    }

    pub fn contains(&self, a: IpAddr) -> bool {
        match a {
            IpAddr::V4(a) => self.v4.iter().any(|n| n.contains(&a)),
            IpAddr::V6(a) => self.v6.iter().any(|n| n.contains(&a)),
        }
    }

    /// Is every address of `other` in `self`?
    fn covers(&self, other: &Prefixes) -> bool {
        other
            .v4
            .iter()
            .all(|o| self.v4.iter().any(|s| s.contains(o)))
            && other
                .v6
                .iter()
                .all(|o| self.v6.iter().any(|s| s.contains(o)))
    }
}

/// The nets of a list as written (truncated), split by family, before merging: collected
/// straight from the parsed items, so no list of `IpNet` is built only to be split.
#[derive(Default)]
struct Nets {
    v4: Vec<Ipv4Net>,
    v6: Vec<Ipv6Net>,
}

impl Extend<IpNet> for Nets {
    fn extend<I: IntoIterator<Item = IpNet>>(&mut self, nets: I) {
        for n in nets {
            match n {
                IpNet::V4(n) => self.v4.push(n.trunc()),
                IpNet::V6(n) => self.v6.push(n.trunc()),
            }
        }
    }
}

/// `Ipv4Net::aggregate` (of truncated nets), without its interval and subnet rebuilding when
/// no two nets overlap or touch: then each is its own aggregate, and sorting is all there is
/// to do. A long list of scattered VIPs is like that.
fn aggregate_v4(mut v: Vec<Ipv4Net>) -> Vec<Ipv4Net> {
    v.sort_unstable_by_key(|n| u32::from(n.network()));
    let apart = v.windows(2).all(|w| {
        u32::from(w[0].broadcast())
            .checked_add(1)
            .is_some_and(|next| next < u32::from(w[1].network()))
    });
    if apart { v } else { Ipv4Net::aggregate(&v) }
}

/// [`aggregate_v4`] for IPv6.
fn aggregate_v6(mut v: Vec<Ipv6Net>) -> Vec<Ipv6Net> {
    v.sort_unstable_by_key(|n| u128::from(n.network()));
    let apart = v.windows(2).all(|w| {
        u128::from(w[0].broadcast())
            .checked_add(1)
            .is_some_and(|next| next < u128::from(w[1].network()))
    });
    if apart { v } else { Ipv6Net::aggregate(&v) }
}

/// `src`/`dst`: any address, or only the listed prefixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddrMatch {
    Any,
    Only(Prefixes),
}

impl AddrMatch {
    /// Can this match hold for family `f` at all?
    pub fn allows(&self, f: Family) -> bool {
        match self {
            AddrMatch::Any => true,
            AddrMatch::Only(p) => p.has(f),
        }
    }

    /// The prefixes to match for family `f`, or `None` when every address matches.
    pub fn restricts(&self, f: Family) -> Option<&Prefixes> {
        match self {
            AddrMatch::Only(p) if !p.is_all(f) => Some(p),
            _ => None,
        }
    }

    pub fn contains(&self, a: IpAddr) -> bool {
        match self {
            AddrMatch::Any => true,
            AddrMatch::Only(p) => p.contains(a),
        }
    }

    fn covers(&self, other: &AddrMatch) -> bool {
        match (self, other) {
            (AddrMatch::Any, _) => true,
            (AddrMatch::Only(_), AddrMatch::Any) => false,
            (AddrMatch::Only(a), AddrMatch::Only(b)) => a.covers(b),
        }
    }
}

/// The most realservers one `dr` rule may list.
pub const MAX_REALSERVERS: usize = 64;

/// One realserver of a `dr` rule: its MAC on the bridge segment, given in the file or learned
/// from the bridge host's neighbour table for `address`; optionally health-checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Realserver {
    pub mac: Option<[u8; 6]>,
    pub address: Option<IpAddr>,
    pub health: Option<Health>,
}

impl Realserver {
    /// How messages name it: its address when it has one, else its MAC.
    pub fn describe(&self) -> String {
        match (self.address, self.mac) {
            (Some(a), _) => a.to_string(),
            (None, Some(m)) => mac_text(&m),
            (None, None) => "?".into(),
        }
    }
}

/// `02:00:00:00:00:31`
pub fn mac_text(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// NAT REDIRECT to a local port (Squid `intercept`).
    Redirect {
        port: u16,
    },
    /// TPROXY to a local address:port (Squid `tproxy`); `addr: None` = the address the
    /// packet arrived on.
    Tproxy {
        addr: Option<IpAddr>,
        port: u16,
    },
    /// Deliver to the local stack unchanged; with `fwmark`, set the whole packet mark
    /// (IPVS fwmark services match it exactly).
    Local {
        fwmark: Option<u32>,
    },
    /// Direct routing on the bridge: rewrite only the destination MAC to one of the rule's
    /// realservers (chosen by a hash of source address and port) and bridge it there. Kernel
    /// datapath only; no local-stack hop, no mark.
    Dr,
    /// Bridge it untouched (stop looking at later rules).
    Pass,
    Drop,
}

impl Action {
    /// Does this action take the frame into the local stack?
    pub fn diverts(&self) -> bool {
        matches!(
            self,
            Action::Redirect { .. } | Action::Tproxy { .. } | Action::Local { .. }
        )
    }

    pub fn keyword(&self) -> &'static str {
        match self {
            Action::Redirect { .. } => "redirect",
            Action::Tproxy { .. } => "tproxy",
            Action::Local { .. } => "local",
            Action::Dr => "dr",
            Action::Pass => "pass",
            Action::Drop => "drop",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decide {
    /// Every packet is decided by the kernel rules alone.
    Kernel,
    /// The first packet of each new flow is decided in userspace (NFQUEUE).
    Queue,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub connect: SocketAddr,
    pub interval: Duration,
    pub timeout: Duration,
    pub fall: u32,
    pub rise: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnhealthy {
    Bypass,
    Drop,
}

/// Where a rule was written, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// One validated `[[divert]]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DivertRule {
    pub name: String,
    pub origin: Origin,
    /// Small number identifying the rule inside the mark bits brdivert owns; 0 for rules
    /// that do not divert.
    pub tag: u32,
    /// Ingress ports; empty = every port.
    pub from: Vec<String>,
    /// Source MACs; empty = any.
    pub src_mac: Vec<[u8; 6]>,
    /// 802.1Q VLAN ids, sorted: frames tagged with one of these; empty = untagged frames only.
    pub vlan: Vec<u16>,
    pub proto: Option<Proto>,
    /// Destination ports, merged and sorted; empty = any (only without `proto`-less rules).
    pub dport: Vec<PortRange>,
    pub src: AddrMatch,
    pub dst: AddrMatch,
    pub except_src: Prefixes,
    pub except_dst: Prefixes,
    pub action: Action,
    pub decide: Decide,
    pub arp_shield: bool,
    pub health: Option<Health>,
    pub on_unhealthy: OnUnhealthy,
    /// `action = "dr"`: the realservers, in file order (the flow-hash buckets are dealt out
    /// in this order, see `nft::compile::dr_buckets`). Empty for every other action.
    pub realservers: Vec<Realserver>,
}

impl DivertRule {
    /// The frames the rule selects before its exemptions, health and action: ingress ports,
    /// source MACs, VLANs, protocol and destination ports (its jump in the bridge table),
    /// the IP families and the `src`/`dst` prefixes (the head of its chain), as a comparable
    /// string. Two rules with the same scope select the same frames (see `nft::pins`). The
    /// prefixes go in as a digest: a rule may name 10,000 VIPs.
    pub fn scope(&self) -> String {
        let mut from = self.from.clone();
        from.sort();
        let mut src_mac = self.src_mac.clone();
        src_mac.sort();
        format!(
            "from={from:?} src_mac={src_mac:?} vlan={:?} proto={:?} dport={:?} addrs={:016x}",
            self.vlan,
            self.proto,
            self.dport,
            self.addrs_digest()
        )
    }

    /// FNV-1a (64 bits) of the families and the `src`/`dst` prefixes, fed their bytes: the
    /// same across builds (std's hasher may not be), for what is recorded in the state dir,
    /// and cheap for 10,000 VIPs (formatting them took ~2 ms).
    fn addrs_digest(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        for f in self.families() {
            eat(&[f as u8]);
        }
        for m in [&self.src, &self.dst] {
            match m {
                AddrMatch::Any => eat(b"any"),
                AddrMatch::Only(p) => {
                    eat(b"only");
                    for n in &p.v4 {
                        eat(&n.addr().octets());
                        eat(&[n.prefix_len()]);
                    }
                    eat(b"v6");
                    for n in &p.v6 {
                        eat(&n.addr().octets());
                        eat(&[n.prefix_len()]);
                    }
                }
            }
        }
        h
    }

    /// The IP families this rule can match.
    pub fn families(&self) -> Vec<Family> {
        FAMILIES
            .into_iter()
            .filter(|&f| self.src.allows(f) && self.dst.allows(f))
            .filter(|&f| match self.action {
                Action::Tproxy { addr: Some(a), .. } => family_of(a) == f,
                _ => true,
            })
            .collect()
    }
}

pub fn family_of(a: IpAddr) -> Family {
    match a {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

/// The validated rules of all rule files, in evaluation order (files sorted by path, rules
/// in file order; the first rule that matches decides).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub rules: Vec<DivertRule>,
    pub warnings: Vec<Diagnostic>,
}

/// What validation needs to know beyond the rule files.
#[derive(Debug, Clone)]
pub struct Context {
    /// The bridge's ports (`from` must name some of them); `None` skips that check.
    pub ports: Option<Vec<String>>,
    /// Bits of the packet mark brdivert owns.
    pub mark_mask: u32,
}

impl Context {
    pub fn from_settings(s: &Settings) -> Context {
        Context {
            ports: Some(s.bridge.ports.clone()),
            mark_mask: s.kernel.mark_mask,
        }
    }

    /// Tags available for diverting rules: 1..=max (the highest value is kept for TPROXY's
    /// "deliver locally" mark, see `nft::compile`).
    pub fn max_tag(&self) -> u32 {
        (self.mark_mask >> self.mark_mask.trailing_zeros()).saturating_sub(1)
    }
}

impl Policy {
    /// Read every rule file the settings name and validate them together.
    pub fn load(settings: &Settings) -> Result<Policy, Refused> {
        let mut files = Vec::new();
        let mut errors = Vec::new();
        for path in settings.rule_files()? {
            match rules::read(&path) {
                Ok(f) => files.push(f),
                Err(Refused(mut d)) => errors.append(&mut d),
            }
        }
        if !errors.is_empty() {
            return Err(Refused(errors));
        }
        Policy::build(&files, &Context::from_settings(settings))
    }

    /// Validate parsed rule files into a policy.
    pub fn build(files: &[RuleFile], ctx: &Context) -> Result<Policy, Refused> {
        let mut v = Validator {
            ctx,
            errors: Vec::new(),
            warnings: Vec::new(),
            names: HashMap::new(),
            first_queue: None,
            tproxies: Vec::new(),
        };
        let mut rules = Vec::new();
        for file in files {
            for raw in &file.diverts {
                if let Some(rule) = v.rule(file, raw) {
                    rules.push(rule);
                }
            }
        }
        // Tags in evaluation order; only diverting rules use one.
        let mut next_tag = 1;
        for r in rules.iter_mut().filter(|r| r.action.diverts()) {
            r.tag = next_tag;
            next_tag += 1;
        }
        if next_tag - 1 > ctx.max_tag() {
            let r = &rules[rules.len() - 1];
            v.errors.push(Diagnostic::error(
                &r.origin.file,
                crate::diag::Pos {
                    line: r.origin.line,
                    column: 1,
                },
                format!(
                    "{} diverting rules do not fit in kernel.mark_mask {:#x} ({} at most)",
                    next_tag - 1,
                    ctx.mark_mask,
                    ctx.max_tag()
                ),
                "merge rules, or widen kernel.mark_mask in the settings",
            ));
        }
        v.queue_conflicts();
        v.shadow_warnings(&rules);
        if v.errors.is_empty() {
            Ok(Policy {
                rules,
                warnings: v.warnings,
            })
        } else {
            let mut all = v.errors;
            all.extend(v.warnings);
            Err(Refused(all))
        }
    }

    /// Does any rule need the NFQUEUE daemon?
    pub fn uses_queue(&self) -> bool {
        self.rules.iter().any(|r| r.decide == Decide::Queue)
    }

    /// Does any rule use TPROXY (and so need its policy routing)?
    pub fn uses_tproxy(&self) -> bool {
        self.rules
            .iter()
            .any(|r| matches!(r.action, Action::Tproxy { .. }))
    }
}

struct Validator<'a> {
    ctx: &'a Context,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
    /// rule name -> where first defined
    names: HashMap<String, Origin>,
    /// where the first `decide = "queue"` is (rule name, file, position)
    first_queue: Option<(String, std::path::PathBuf, crate::diag::Pos)>,
    /// every `action = "tproxy"` (rule name, file, position)
    tproxies: Vec<(String, std::path::PathBuf, crate::diag::Pos)>,
}

impl Validator<'_> {
    fn err(&mut self, file: &RuleFile, offset: usize, what: String, fix: &str) {
        self.errors
            .push(Diagnostic::error(&file.path, file.pos(offset), what, fix));
    }

    /// Queue rules turn br_netfilter on for the bridge (see `nft::compile::queue_chains`),
    /// and TPROXY through a bridge with br_netfilter on does not work (measured on 6.18:
    /// the proxy never gets the connection): refuse every tproxy rule of such a policy, at
    /// its action.
    fn queue_conflicts(&mut self) {
        let Some((qname, qfile, qpos)) = &self.first_queue else {
            return;
        };
        for (name, file, pos) in &self.tproxies {
            self.errors.push(Diagnostic::error(
                file,
                *pos,
                format!(
                    "rule {name:?}: action = \"tproxy\" cannot be combined with decide = \"queue\" \
                     (rule {qname:?} at {}:{}:{}): queue rules turn br_netfilter on for the bridge, \
                     and TPROXY through a bridge with br_netfilter on does not deliver to the proxy",
                    qfile.display(),
                    qpos.line,
                    qpos.column
                ),
                "use action = \"redirect\" (Squid `intercept`) for this rule, or remove decide = \"queue\" from the queue rules",
            ));
        }
    }

    fn rule(&mut self, file: &RuleFile, raw: &Spanned<RawDivert>) -> Option<DivertRule> {
        let before = self.errors.len();
        let r = raw.get_ref();
        let origin = Origin {
            file: file.path.clone(),
            line: file.pos(raw.span().start).line,
        };

        let name = r.name.get_ref().clone();
        if !valid_rule_name(&name) {
            self.err(
                file,
                r.name.span().start,
                format!("rule name {name:?} is not allowed"),
                "use 1-32 characters: a letter first, then letters, digits, '_' or '-'",
            );
        } else if let Some(first) = self.names.get(&name) {
            let what = format!("rule name {name:?} is already used at {first}");
            self.err(
                file,
                r.name.span().start,
                what,
                "give every rule a unique name",
            );
        } else {
            self.names.insert(name.clone(), origin.clone());
        }

        let from = self.from(file, r);
        let src_mac = self.macs(file, r);
        let vlan = self.vlans(file, r);
        let proto = r.proto.as_ref().and_then(|p| match p.get_ref().as_str() {
            "tcp" => Some(Proto::Tcp),
            "udp" => Some(Proto::Udp),
            other => {
                let what = format!("proto {other:?} is not supported");
                self.err(file, p.span().start, what, "use \"tcp\" or \"udp\"");
                None
            }
        });
        let dport = self.ports(file, r);
        if !dport.is_empty() && proto.is_none() && r.proto.is_none() {
            let at = r.dport.as_ref().map_or(0, |d| d.span().start);
            self.err(
                file,
                at,
                "dport needs proto".into(),
                "add proto = \"tcp\" or proto = \"udp\"",
            );
        }
        let src = self.addr_match(file, &r.src, "src");
        let dst = self.addr_match(file, &r.dst, "dst");
        let except_src = self.prefixes(file, &r.except_src, "except_src");
        let except_dst = self.prefixes(file, &r.except_dst, "except_dst");

        let action = self.action(file, r, proto);
        let decide = match &r.decide {
            None => Decide::Kernel,
            Some(d) => match d.get_ref().as_str() {
                "kernel" => Decide::Kernel,
                "queue" => Decide::Queue,
                other => {
                    let what = format!("decide {other:?} is not known");
                    self.err(file, d.span().start, what, "use \"queue\" or leave it out");
                    Decide::Kernel
                }
            },
        };
        let arp_shield = r.arp_shield.as_ref().is_some_and(|a| *a.get_ref());
        if let (Some(a), Some(act)) = (&r.arp_shield, action)
            && *a.get_ref()
            && !matches!(act, Action::Local { .. })
        {
            self.err(
                file,
                a.span().start,
                "arp_shield only applies to action = \"local\"".into(),
                "remove arp_shield, or use it on the VIP's local rule",
            );
        }
        if let (Some(a), Some(Action::Local { .. })) = (&r.arp_shield, action)
            && *a.get_ref()
        {
            // VIPs: IPv4 addresses or prefixes (ARP), IPv6 single addresses (ND targets)
            let vips = match &dst {
                AddrMatch::Only(p) if !p.is_all(Family::V4) && !p.is_all(Family::V6) => {
                    Some(p.v6.iter().all(|n| n.prefix_len() == 128))
                        .filter(|_| !p.v4.is_empty() || !p.v6.is_empty())
                }
                _ => None,
            };
            match vips {
                None => self.err(
                    file,
                    a.span().start,
                    "arp_shield needs the VIPs as dst addresses".into(),
                    "add dst = [\"<VIP>\"], or remove arp_shield",
                ),
                Some(false) => self.err(
                    file,
                    a.span().start,
                    "arp_shield: IPv6 VIPs must be single addresses (/128)".into(),
                    "list the IPv6 VIPs one by one",
                ),
                Some(true) => {}
            }
        }
        let realservers = self.realservers(file, r, action, proto, &dst, &dport);
        let health = r.health.as_ref().and_then(|h| self.health(file, h, None));
        let on_unhealthy = match &r.on_unhealthy {
            None => OnUnhealthy::Bypass,
            Some(o) => match o.get_ref().as_str() {
                "bypass" => OnUnhealthy::Bypass,
                "drop" => OnUnhealthy::Drop,
                other => {
                    let what = format!("on_unhealthy {other:?} is not known");
                    self.err(file, o.span().start, what, "use \"bypass\" or \"drop\"");
                    OnUnhealthy::Bypass
                }
            },
        };
        if let (Some(o), None) = (&r.on_unhealthy, &r.health) {
            self.err(
                file,
                o.span().start,
                "on_unhealthy without a health check".into(),
                "add health = { connect = \"ADDR:PORT\" } or remove on_unhealthy",
            );
        }
        if let (Some(h), Some(Action::Dr)) = (&r.health, action) {
            self.err(
                file,
                h.span().start,
                "a dr rule checks each realserver, not the rule".into(),
                "move health into the realservers: { address = \"10.0.0.31\", health = { connect = \"10.0.0.31:80\" } }",
            );
        } else if let (Some(h), Some(act)) = (&r.health, action)
            && !act.diverts()
        {
            let what = format!(
                "health checks need a diverting action, not {:?}",
                act.keyword()
            );
            self.err(file, h.span().start, what, "remove health from this rule");
        }
        if let (Some(d), Some(act)) = (&r.decide, action)
            && decide == Decide::Queue
            && !act.diverts()
        {
            let what = format!(
                "decide = \"queue\" needs a diverting action, not {:?}",
                act.keyword()
            );
            self.err(file, d.span().start, what, "remove decide from this rule");
        }
        // A diverted tagged frame would go up the bridge still tagged, and the kernel gives
        // it to the host only through a VLAN interface (CONFIG_VLAN_8021Q, absent here):
        // without one it is dropped, so such a rule would blackhole its VLAN.
        if let (Some(list), Some(act)) = (&r.vlan, action)
            && act.diverts()
        {
            let what = format!(
                "action {:?} cannot take VLAN-tagged frames to the host (no VLAN interfaces)",
                act.keyword()
            );
            self.err(
                file,
                list.span().start,
                what,
                "use vlan with pass, drop or dr, or divert the untagged traffic (leave vlan out)",
            );
        }

        if let (Some(d), Decide::Queue) = (&r.decide, decide)
            && self.first_queue.is_none()
        {
            self.first_queue = Some((name.clone(), file.path.clone(), file.pos(d.span().start)));
        }
        if let Some(Action::Tproxy { .. }) = &action {
            let at = file.pos(r.action.span().start);
            self.tproxies.push((name.clone(), file.path.clone(), at));
        }
        let rule = DivertRule {
            name,
            origin,
            tag: 0,
            from,
            src_mac,
            vlan,
            proto,
            dport,
            src,
            dst,
            except_src,
            except_dst,
            action: action?,
            decide,
            arp_shield,
            health,
            on_unhealthy,
            realservers,
        };
        if self.errors.len() != before {
            return None;
        }
        self.family_checks(file, raw, &rule);
        (self.errors.len() == before).then_some(rule)
    }

    /// Every item of a list key parsed with `parse`; an empty list is an error (leaving the key
    /// out is how to say "any"), and each bad item is reported at its own position.
    fn list<L: rules::List, R, C: Default + Extend<R>>(
        &mut self,
        file: &RuleFile,
        list: &L,
        key: &str,
        parse: impl Fn(&L::Item) -> Result<R, (String, &'static str)>,
    ) -> C {
        if list.is_empty() {
            let what = format!("{key} is an empty list");
            self.err(
                file,
                list.start(),
                what,
                "list values, or leave the key out to match any",
            );
        }
        let mut out = C::default();
        let mut bad = Vec::new();
        for (i, item) in list.values().enumerate() {
            match parse(item) {
                Ok(v) => out.extend(Some(v)),
                Err(e) => bad.push((i, e)),
            }
        }
        // Item positions are looked up only now: finding them costs a pass over the list.
        if !bad.is_empty() {
            let at = list.offsets(&file.text);
            for (i, (what, fix)) in bad {
                let offset = at.get(i).copied().unwrap_or(list.start());
                self.err(file, offset, what, fix);
            }
        }
        out
    }

    fn from(&mut self, file: &RuleFile, r: &RawDivert) -> Vec<String> {
        let Some(list) = &r.from else {
            return Vec::new();
        };
        let ports = self.ctx.ports.clone();
        let mut out: Vec<_> = self.list(file, list, "from", |name: &String| {
            if !crate::settings::valid_ifname(name) {
                return Err((
                    format!("{name:?} is not a valid interface name"),
                    "use 1-15 characters, no '/', ':' or whitespace",
                ));
            }
            match &ports {
                Some(ports) if !ports.contains(name) => Err((
                    format!(
                        "{name:?} is not a port of the bridge ({})",
                        ports.join(", ")
                    ),
                    "name one of bridge.ports, or add it there",
                )),
                _ => Ok(name.clone()),
            }
        });
        let mut seen = std::collections::HashSet::new();
        out.retain(|n| seen.insert(n.clone()));
        out
    }

    fn macs(&mut self, file: &RuleFile, r: &RawDivert) -> Vec<[u8; 6]> {
        let Some(list) = &r.src_mac else {
            return Vec::new();
        };
        let mut out: Vec<_> = self.list(file, list, "src_mac", |text: &str| {
            parse_mac(text).ok_or_else(|| {
                (
                    format!("{text:?} is not a MAC address"),
                    "write it as 02:00:00:00:00:01",
                )
            })
        });
        out.sort();
        out.dedup();
        out
    }

    fn vlans(&mut self, file: &RuleFile, r: &RawDivert) -> Vec<u16> {
        let Some(list) = &r.vlan else {
            return Vec::new();
        };
        let mut out: Vec<_> = self.list(file, list, "vlan", |v: &i64| match u16::try_from(*v) {
            Ok(id @ 1..=4094) => Ok(id),
            _ => Err((
                format!("vlan {v} is not a VLAN id"),
                "use an 802.1Q VLAN id 1-4094",
            )),
        });
        out.sort();
        out.dedup();
        out
    }

    fn ports(&mut self, file: &RuleFile, r: &RawDivert) -> Vec<PortRange> {
        let Some(list) = &r.dport else {
            return Vec::new();
        };
        let out: Vec<_> = self.list(file, list, "dport", |v: &toml::Value| {
            parse_port_item(v).map_err(|what| (what, "use a port 1-65535 or a range \"LO-HI\""))
        });
        merge_ports(out)
    }

    fn nets(&mut self, file: &RuleFile, list: &rules::Addresses, key: &str) -> Nets {
        self.list(file, list, key, |text: &str| {
            parse_prefix(text).map_err(|what| {
                (
                    format!("{key}: {what}"),
                    "write an address (10.0.0.1, 2001:db8::1) or a prefix (10.0.0.0/8, ::/0)",
                )
            })
        })
    }

    fn addr_match(
        &mut self,
        file: &RuleFile,
        list: &Option<rules::Addresses>,
        key: &str,
    ) -> AddrMatch {
        match list {
            None => AddrMatch::Any,
            Some(l) => AddrMatch::Only(Prefixes::from_nets(self.nets(file, l, key))),
        }
    }

    fn prefixes(
        &mut self,
        file: &RuleFile,
        list: &Option<rules::Addresses>,
        key: &str,
    ) -> Prefixes {
        match list {
            None => Prefixes::default(),
            Some(l) => Prefixes::from_nets(self.nets(file, l, key)),
        }
    }

    fn action(&mut self, file: &RuleFile, r: &RawDivert, proto: Option<Proto>) -> Option<Action> {
        let kw = r.action.get_ref().as_str();
        let at = r.action.span().start;
        let port = match &r.port {
            None => None,
            Some(p) => match u16::try_from(*p.get_ref()) {
                Ok(v) if v > 0 => Some(v),
                _ => {
                    let what = format!("port {} is out of range", p.get_ref());
                    self.err(file, p.span().start, what, "use a port 1-65535");
                    return None;
                }
            },
        };
        let address = match &r.address {
            None => None,
            Some(a) => match a.get_ref().parse::<IpAddr>() {
                Ok(ip) => Some(ip),
                Err(_) => {
                    let what = format!("address {:?} is not an IP address", a.get_ref());
                    self.err(
                        file,
                        a.span().start,
                        what,
                        "write e.g. \"127.0.0.1\" or \"::1\"",
                    );
                    return None;
                }
            },
        };
        let fwmark = match &r.fwmark {
            None => None,
            Some(m) => match u32::try_from(*m.get_ref()) {
                Ok(v) if v > 0 && v & self.ctx.mark_mask == 0 => Some(v),
                Ok(v) if v > 0 => {
                    let what = format!(
                        "fwmark {v:#x} uses bits of kernel.mark_mask {:#x}, which brdivert owns",
                        self.ctx.mark_mask
                    );
                    self.err(
                        file,
                        m.span().start,
                        what,
                        "pick a mark outside the mask, or move the mask",
                    );
                    return None;
                }
                _ => {
                    let what = format!("fwmark {} is out of range", m.get_ref());
                    self.err(file, m.span().start, what, "use a mark 1-4294967295");
                    return None;
                }
            },
        };
        let needs_port = matches!(kw, "redirect" | "tproxy");
        if !needs_port && let Some(p) = &r.port {
            let what = format!("port only applies to redirect and tproxy, not {kw:?}");
            self.err(file, p.span().start, what, "remove port");
        }
        if kw != "tproxy"
            && let Some(a) = &r.address
        {
            let what = format!("address only applies to tproxy, not {kw:?}");
            self.err(file, a.span().start, what, "remove address");
        }
        if kw != "local"
            && let Some(m) = &r.fwmark
        {
            let what = format!("fwmark only applies to action = \"local\", not {kw:?}");
            self.err(
                file,
                m.span().start,
                what,
                "remove fwmark, or use action = \"local\"",
            );
        }
        if needs_port && proto.is_none() {
            let what = format!("{kw} needs proto");
            self.err(file, at, what, "add proto = \"tcp\" (or \"udp\")");
        }
        if needs_port && port.is_none() {
            let what = format!("{kw} needs port, the local port to divert to");
            self.err(file, at, what, "add e.g. port = 3129");
            return None;
        }
        match kw {
            "redirect" => Some(Action::Redirect { port: port? }),
            "tproxy" => Some(Action::Tproxy {
                addr: address,
                port: port?,
            }),
            "local" => Some(Action::Local { fwmark }),
            "dr" => Some(Action::Dr),
            "pass" => Some(Action::Pass),
            "drop" => Some(Action::Drop),
            other => {
                let what = format!("action {other:?} is not known");
                self.err(
                    file,
                    at,
                    what,
                    "use one of redirect, tproxy, local, dr, pass, drop",
                );
                None
            }
        }
    }

    /// `realservers` of a `dr` rule (and its other needs: proto for the hash's source port,
    /// the VIPs as dst). Refused on any other action.
    fn realservers(
        &mut self,
        file: &RuleFile,
        r: &RawDivert,
        action: Option<Action>,
        proto: Option<Proto>,
        dst: &AddrMatch,
        dport: &[PortRange],
    ) -> Vec<Realserver> {
        let is_dr = matches!(action, Some(Action::Dr));
        let Some(list) = &r.realservers else {
            if is_dr {
                self.err(
                    file,
                    r.action.span().start,
                    "action = \"dr\" needs realservers".into(),
                    "add realservers = [{ mac = \"02:00:00:00:00:31\" }, ...]",
                );
            }
            return Vec::new();
        };
        if !is_dr {
            if action.is_some() {
                let what = format!(
                    "realservers only apply to action = \"dr\", not {:?}",
                    r.action.get_ref()
                );
                self.err(
                    file,
                    list.span().start,
                    what,
                    "remove realservers, or use action = \"dr\"",
                );
            }
            return Vec::new();
        }
        if list.get_ref().is_empty() {
            self.err(
                file,
                list.span().start,
                "realservers is an empty list".into(),
                "list at least one realserver: [{ mac = \"02:00:00:00:00:31\" }]",
            );
        }
        if list.get_ref().len() > MAX_REALSERVERS {
            let what = format!(
                "{} realservers; a dr rule takes at most {MAX_REALSERVERS}",
                list.get_ref().len()
            );
            self.err(
                file,
                list.span().start,
                what,
                "split the VIPs over several rules",
            );
        }
        let mut out: Vec<Realserver> = Vec::new();
        for rs in list.get_ref() {
            let raw = rs.get_ref();
            let before = self.errors.len();
            let mac = raw
                .mac
                .as_ref()
                .and_then(|mac| match parse_mac(mac.get_ref()) {
                    Some(m) if m[0] & 1 == 1 || m == [0; 6] => {
                        self.err(
                            file,
                            mac.span().start,
                            format!("{:?} is not a unicast MAC address", mac.get_ref()),
                            "give the realserver's own (unicast) interface MAC",
                        );
                        None
                    }
                    Some(m) if out.iter().any(|o| o.mac == Some(m)) => {
                        self.err(
                            file,
                            mac.span().start,
                            format!("realserver {:?} is listed twice", mac.get_ref()),
                            "list every realserver once",
                        );
                        None
                    }
                    Some(m) => Some(m),
                    None => {
                        self.err(
                            file,
                            mac.span().start,
                            format!("{:?} is not a MAC address", mac.get_ref()),
                            "write it as 02:00:00:00:00:31",
                        );
                        None
                    }
                });
            let address = raw
                .address
                .as_ref()
                .and_then(|a| match a.get_ref().parse::<IpAddr>() {
                    Ok(ip) if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() => {
                        self.err(
                            file,
                            a.span().start,
                            format!("realserver address {ip} is not a unicast host address"),
                            "give the realserver's own address on the bridge segment",
                        );
                        None
                    }
                    Ok(ip) if out.iter().any(|o| o.address == Some(ip)) => {
                        self.err(
                            file,
                            a.span().start,
                            format!("realserver {ip} is listed twice"),
                            "list every realserver once",
                        );
                        None
                    }
                    Ok(ip) => Some(ip),
                    Err(_) => {
                        self.err(
                            file,
                            a.span().start,
                            format!("realserver address {:?} is not an IP address", a.get_ref()),
                            "write e.g. \"10.0.0.31\" or \"2001:db8::31\"",
                        );
                        None
                    }
                });
            if raw.mac.is_none() && raw.address.is_none() {
                self.err(
                    file,
                    rs.span().start,
                    "a realserver needs a mac or an address".into(),
                    "add mac = \"02:00:00:00:00:31\", or address = \"10.0.0.31\" to learn its MAC from the neighbour table",
                );
            }
            // default health target: the realserver's address, at the rule's first port
            let default_connect = address
                .zip(dport.first())
                .map(|(a, p)| SocketAddr::new(a, p.lo));
            let health = raw
                .health
                .as_ref()
                .and_then(|h| self.health(file, h, default_connect));
            if self.errors.len() == before {
                out.push(Realserver {
                    mac,
                    address,
                    health,
                });
            }
        }
        if proto.is_none() {
            self.err(
                file,
                r.action.span().start,
                "action = \"dr\" needs proto (the flow hash uses the source port)".into(),
                "add proto = \"tcp\" or proto = \"udp\"",
            );
        }
        if !matches!(dst, AddrMatch::Only(p) if !p.is_all(Family::V4) && !p.is_all(Family::V6)) {
            self.err(
                file,
                r.action.span().start,
                "action = \"dr\" needs the VIPs as dst addresses".into(),
                "add dst = [\"<VIP>\"]",
            );
        }
        out
    }

    /// A `health` table; `default_connect` is the target when `connect` is left out (a
    /// realserver given by address).
    fn health(
        &mut self,
        file: &RuleFile,
        h: &Spanned<rules::RawHealth>,
        default_connect: Option<SocketAddr>,
    ) -> Option<Health> {
        let r = h.get_ref();
        let connect = match (&r.connect, default_connect) {
            (None, Some(d)) => Some(d),
            (None, None) => {
                self.err(
                    file,
                    h.span().start,
                    "health needs connect, the ADDR:PORT to check".into(),
                    "add connect = \"127.0.0.1:3129\" (on a realserver: give it an address, the check then connects to address:first dport)",
                );
                None
            }
            (Some(c), _) => match c.get_ref().parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    let what = format!("health.connect {:?} is not ADDR:PORT", c.get_ref());
                    self.err(
                        file,
                        c.span().start,
                        what,
                        "write e.g. \"127.0.0.1:3129\" or \"[::1]:3129\"",
                    );
                    None
                }
            },
        };
        let mut dur = |v: &Option<Spanned<String>>, key: &str, default: Duration| match v {
            None => Some(default),
            Some(s) => match parse_duration(s.get_ref()) {
                Some(d) if !d.is_zero() => Some(d),
                _ => {
                    let what = format!("health.{key} {:?} is not a duration", s.get_ref());
                    self.err(file, s.span().start, what, "write e.g. \"2s\" or \"500ms\"");
                    None
                }
            },
        };
        let interval = dur(&r.interval, "interval", Duration::from_secs(2));
        let timeout = dur(&r.timeout, "timeout", Duration::from_secs(1));
        let mut count = |v: &Option<Spanned<i64>>, key: &str, default: u32| match v {
            None => Some(default),
            Some(n) => match u32::try_from(*n.get_ref()) {
                Ok(c) if (1..=100).contains(&c) => Some(c),
                _ => {
                    let what = format!("health.{key} {} is out of range", n.get_ref());
                    self.err(file, n.span().start, what, "use a count 1-100");
                    None
                }
            },
        };
        let fall = count(&r.fall, "fall", 3);
        let rise = count(&r.rise, "rise", 2);
        Some(Health {
            connect: connect?,
            interval: interval?,
            timeout: timeout?,
            fall: fall?,
            rise: rise?,
        })
    }

    /// Checks across keys that need the whole rule: does it match anything, and do the
    /// families of its lists and its TPROXY address agree?
    fn family_checks(&mut self, file: &RuleFile, raw: &Spanned<RawDivert>, rule: &DivertRule) {
        let r = raw.get_ref();
        if let Action::Tproxy { addr: Some(a), .. } = rule.action {
            let fam = family_of(a);
            for (key, m) in [("src", &rule.src), ("dst", &rule.dst)] {
                if let AddrMatch::Only(p) = m {
                    let other = if fam == Family::V4 {
                        Family::V6
                    } else {
                        Family::V4
                    };
                    if p.has(other)
                        && let Some(at) = r.address.as_ref().map(|a| a.span().start)
                    {
                        let what = format!(
                            "tproxy address {a} is {} but {key} lists {} prefixes",
                            fam_name(fam),
                            fam_name(other)
                        );
                        self.err(file, at, what, "split the rule in two, one per family, each with an address of its family");
                    }
                }
            }
        }
        if rule.families().is_empty() {
            self.err(
                file,
                raw.span().start,
                format!(
                    "rule {:?} can never match: src and dst share no address family",
                    rule.name
                ),
                "give src and dst prefixes of the same family (IPv4 or IPv6)",
            );
        }
        if rule.proto.is_none()
            && matches!(rule.src, AddrMatch::Any)
            && matches!(rule.dst, AddrMatch::Any)
        {
            self.err(
                file,
                raw.span().start,
                format!("rule {:?} would match every IP packet", rule.name),
                "narrow it with proto, dst or src",
            );
        }
    }

    /// Warn about a rule that can never match because an earlier rule takes all its traffic.
    fn shadow_warnings(&mut self, rules: &[DivertRule]) {
        for (i, later) in rules.iter().enumerate() {
            if let Some(earlier) = rules[..i].iter().find(|e| shadows(e, later)) {
                self.warnings.push(Diagnostic::warning(
                    &later.origin.file,
                    crate::diag::Pos {
                        line: later.origin.line,
                        column: 1,
                    },
                    format!(
                        "rule {:?} never matches: rule {:?} ({}) comes first and matches all it does",
                        later.name, earlier.name, earlier.origin
                    ),
                    "reorder the rules or narrow the earlier one",
                ));
            }
        }
    }
}

/// Does `a` (evaluated first) match every packet `b` matches?
fn shadows(a: &DivertRule, b: &DivertRule) -> bool {
    let from =
        a.from.is_empty() || (!b.from.is_empty() && b.from.iter().all(|p| a.from.contains(p)));
    let macs = a.src_mac.is_empty()
        || (!b.src_mac.is_empty() && b.src_mac.iter().all(|m| a.src_mac.contains(m)));
    // no `vlan` = untagged frames only, so two rules can overlap only when both name VLANs
    // or both leave them out
    let vlans = a.vlan.is_empty() == b.vlan.is_empty() && b.vlan.iter().all(|v| a.vlan.contains(v));
    let proto = a.proto.is_none() || a.proto == b.proto;
    let ports = a.dport.is_empty()
        || (!b.dport.is_empty()
            && b.dport
                .iter()
                .all(|p| a.dport.iter().any(|q| q.lo <= p.lo && p.hi <= q.hi)));
    // Exemptions of `a` let some of b's traffic through to b.
    let no_holes = a.except_src.is_empty() && a.except_dst.is_empty();
    let families = b.families().iter().all(|f| a.families().contains(f));
    families
        && from
        && macs
        && vlans
        && proto
        && ports
        && no_holes
        && a.src.covers(&b.src)
        && a.dst.covers(&b.dst)
}

fn fam_name(f: Family) -> &'static str {
    match f {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    }
}

fn valid_rule_name(n: &str) -> bool {
    let mut chars = n.chars();
    n.len() <= 32
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// `02:00:00:00:00:01` (or with `-`): six two-digit hex bytes.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for b in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn parse_port_item(v: &toml::Value) -> Result<PortRange, String> {
    let one = |n: i64| -> Result<u16, String> {
        match u16::try_from(n) {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(format!("port {n} is out of range")),
        }
    };
    match v {
        toml::Value::Integer(n) => one(*n).map(|p| PortRange { lo: p, hi: p }),
        toml::Value::String(s) => {
            let (lo, hi) = s.split_once('-').unwrap_or((s, s));
            let num = |t: &str| {
                t.trim()
                    .parse::<i64>()
                    .map_err(|_| format!("{s:?} is not a port or a range"))
                    .and_then(one)
            };
            let (lo, hi) = (num(lo)?, num(hi)?);
            if lo > hi {
                return Err(format!("range {s:?} runs backwards"));
            }
            Ok(PortRange { lo, hi })
        }
        other => Err(format!("{other} is not a port or a range")),
    }
}

/// Sort and merge overlapping or adjacent ranges (interval sets may not overlap).
pub fn merge_ports(mut v: Vec<PortRange>) -> Vec<PortRange> {
    v.sort();
    let mut out: Vec<PortRange> = Vec::with_capacity(v.len());
    for p in v {
        match out.last_mut() {
            Some(last) if u32::from(p.lo) <= u32::from(last.hi) + 1 => last.hi = last.hi.max(p.hi),
            _ => out.push(p),
        }
    }
    out
}

fn parse_prefix(s: &str) -> Result<IpNet, String> {
    // Without a '/' ipnet's parser always fails, after reading the address (as IPv4, then as
    // IPv6); only std's parse below can take it. Going there directly halves the cost of a
    // long list of plain addresses, with the same result and message.
    if !s.contains('/') {
        return s
            .parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| format!("{s:?} is not an address or prefix"));
    }
    if let Ok(n) = s.parse::<IpNet>() {
        if n.trunc() != n {
            return Err(format!(
                "{s:?} has host bits set (did you mean {}?)",
                n.trunc()
            ));
        }
        return Ok(n);
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is not an address or prefix"))
}

/// "2s", "500ms", "1m", "1.5s".
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(secs).ok()
}

/// The policy of one rule file's `text` (named `r.toml`), for unit tests: no port check,
/// the default mark bits. Panics on bad input.
#[cfg(test)]
pub(crate) fn test_policy(text: &str) -> Policy {
    let f = crate::rules::parse(std::path::Path::new("r.toml"), text.into())
        .unwrap_or_else(|e| panic!("{e}"));
    Policy::build(
        &[f],
        &Context {
            ports: None,
            mark_mask: 0x00ff_0000,
        },
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

#[cfg(test)]
mod bench;
#[cfg(test)]
mod tests;
