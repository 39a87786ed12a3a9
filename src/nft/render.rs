//! nft text back end: the ruleset exactly as `nft list table FAMILY NAME` (nft 1.0.6) prints
//! it, tables concatenated. The text also loads with `nft -f`, with two exceptions that nft
//! itself cannot parse (see [`render`]).
//!
//! The forms were taken from nft 1.0.6 listings of rules it loaded itself:
//! - priorities print as `NAME`, `NAME + N` or `NAME - N` (|N| <= 10) for the standard names
//!   valid for that family and hook, else as a number;
//! - `meta mark set meta mark & KEEP | VALUE` prints as `meta mark set meta mark & (KEEP|VALUE)
//!   | VALUE`, with `& ...` left out when that mask is all ones and `| ...` when VALUE is 0;
//! - `meta mark VALUE` with a full mask, `meta mark & MASK == VALUE` otherwise, always as
//!   0x%08x;
//! - `ether daddr set MAC` prints as `@ll,0,48 set 0xHEX` when the rule matched `vlan id`
//!   (nft loses the ether header context after the vlan dependency); both forms load;
//! - `meta l4proto tcp` is folded into a later `tcp …` port match (nft takes it as that
//!   match's dependency and does not print it); likewise `meta protocol ip` right before a
//!   flow-key map lookup/update that starts with `ip …` (the `pinned` rules);
//! - sets list `size N` when created with one (see [`Set::size`]); dynamic maps as
//!   `map NAME { type A . B : mark; size N; flags dynamic,timeout; timeout 3h }` (one per
//!   line, in that order);
//! - set elements: sorted as nft sorts them, wrapped 2 per line for ipv4_addr, 5 for
//!   inet_service, 1 otherwise.
use std::fmt::Write as _;

use super::{
    BaseChain, Chain, ChainType, Dir, Family, FlowKey, FlowKeyShape, Hook, IpFamily, KeyField, L4,
    MapData, Match, QueueForm, Rule, Ruleset, Set, SetElem, SetKind, Stmt, Table,
};

/// The ruleset as nft text, as `nft list table` prints each table.
///
/// Loadable with `nft -f` except for three statements nft 1.0.6 cannot load: `meta broute set
/// 1` (the key is newer than nft 1.0.6; newer nft prints it this way), the xtables
/// compat `NFQUEUE` target (see [`XT_NFQUEUE_TEXT`]; no nft can load `xt` statements) — both
/// only emitted when probing chose them — and `update @map { A . B … : meta mark }` (flow
/// pinning): nft 1.0.6 lists it exactly so but aborts loading it (assertion `dreg <
/// ctx->reg_low` in netlink_linearize.c for any concatenated key with a data expression).
/// brdivert applies over netlink, where the kernel takes it.
pub fn render(rs: &Ruleset) -> String {
    let mut out = String::new();
    for t in &rs.tables {
        render_table(t, &mut out);
    }
    out
}

fn render_table(t: &Table, out: &mut String) {
    let _ = writeln!(out, "table {} {} {{", t.family.as_str(), t.name);
    let mut first = true;
    for s in &t.sets {
        if !first {
            out.push('\n');
        }
        first = false;
        render_set(s, out);
    }
    for c in &t.chains {
        if !first {
            out.push('\n');
        }
        first = false;
        render_chain(t.family, c, out);
    }
    out.push_str("}\n");
}

fn render_set(s: &Set, out: &mut String) {
    let map = match (s.kind, &s.dynamic) {
        (SetKind::Buckets, _) => Some(MapData::Ether),
        (_, Some(d)) => d.map,
        _ => None,
    };
    let _ = writeln!(
        out,
        "\t{} {} {{",
        if map.is_some() { "map" } else { "set" },
        s.name
    );
    let data = match map {
        Some(MapData::Mark) => " : mark",
        Some(MapData::Ether) => " : ether_addr",
        None => "",
    };
    let _ = writeln!(out, "\t\ttype {}{data}", set_type_name(s.kind));
    if let Some(size) = s.size() {
        let _ = writeln!(out, "\t\tsize {size}");
    }
    if let Some(d) = &s.dynamic {
        out.push_str("\t\tflags dynamic,timeout\n");
        let _ = writeln!(out, "\t\ttimeout {}", duration_text(d.timeout_s));
    }
    if s.interval {
        out.push_str("\t\tflags interval\n");
    }
    if !s.elements.is_empty() {
        let _ = writeln!(out, "\t\telements = {{ {} }}", elements_text(s));
    }
    out.push_str("\t}\n");
}

/// nft's datatype name for a set key (`ipv4_addr . ipv4_addr . inet_proto` for a
/// concatenation).
pub fn set_type_name(kind: SetKind) -> String {
    match kind {
        SetKind::Ipv4Addr => "ipv4_addr".into(),
        SetKind::Ipv6Addr => "ipv6_addr".into(),
        SetKind::InetService => "inet_service".into(),
        SetKind::IfName => "ifname".into(),
        SetKind::EtherAddr => "ether_addr".into(),
        SetKind::Mark => "mark".into(),
        // nft 1.0.6 lists a map keyed by a plain integer (`jhash … mod N`) with the type's
        // number: there is no `type` name for it (and `typeof jhash …` crashes its listing)
        SetKind::Buckets => "0".into(),
        SetKind::Concat(f, shape) => {
            let a = match f {
                IpFamily::V4 => "ipv4_addr",
                IpFamily::V6 => "ipv6_addr",
            };
            match shape {
                FlowKeyShape::FiveTuple => {
                    format!("{a} . {a} . inet_proto . inet_service . inet_service")
                }
                FlowKeyShape::Peer => format!("{a} . {a} . inet_proto . inet_service"),
            }
        }
    }
}

/// A duration as nft prints it: `3h`, `1d2h30m`, `45s`.
pub fn duration_text(secs: u64) -> String {
    let mut t = String::new();
    let (d, h, m, s) = (
        secs / 86400,
        secs % 86400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    for (v, unit) in [(d, "d"), (h, "h"), (m, "m"), (s, "s")] {
        if v > 0 {
            let _ = write!(t, "{v}{unit}");
        }
    }
    if t.is_empty() {
        t.push_str("0s");
    }
    t
}

/// `ip saddr . ip daddr . meta l4proto . th sport . th dport`
pub fn flow_key_text(k: &FlowKey) -> String {
    let ip = match k.family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    };
    let parts: Vec<String> = k
        .fields
        .iter()
        .map(|f| match f {
            KeyField::Saddr => format!("{ip} saddr"),
            KeyField::Daddr => format!("{ip} daddr"),
            KeyField::L4Proto => "meta l4proto".to_string(),
            KeyField::Sport => "th sport".to_string(),
            KeyField::Dport => "th dport".to_string(),
        })
        .collect();
    parts.join(" . ")
}

/// The elements in nft's listing order, joined and wrapped as nft wraps them.
fn elements_text(s: &Set) -> String {
    let per_line = match s.kind {
        SetKind::Ipv4Addr => 2,
        SetKind::InetService => 5,
        _ => 1,
    };
    let mut elems: Vec<&SetElem> = s.elements.iter().collect();
    elems.sort_by_key(|e| listing_sort_key(e));
    let mut text = String::new();
    for (i, e) in elems.iter().enumerate() {
        if i > 0 {
            text.push_str(if i % per_line == 0 {
                ",\n\t\t\t     "
            } else {
                ", "
            });
        }
        text.push_str(&elem_text(e));
    }
    text
}

/// nft sorts listed elements by value. Values of big-endian types (addresses, ports, MACs)
/// sort as their bytes; interface names are host-endian strings, so on little-endian hosts
/// they sort by their 16 bytes read backwards (longer names last, then by last character).
fn listing_sort_key(e: &SetElem) -> Vec<u8> {
    match e {
        SetElem::V4(n) => n.network().octets().to_vec(),
        SetElem::V6(n) => n.network().octets().to_vec(),
        SetElem::Ports(lo, _) => lo.to_be_bytes().to_vec(),
        SetElem::Ether(m) => m.to_vec(),
        SetElem::Mark(m) => m.to_be_bytes().to_vec(),
        SetElem::Bucket(b, _) => b.to_be_bytes().to_vec(),
        SetElem::IfName(name) => {
            let mut k = ifname_key(name).to_vec();
            if cfg!(target_endian = "little") {
                k.reverse();
            }
            k
        }
    }
}

/// An interface name as the kernel's 16-byte key (IFNAMSIZ, NUL padded).
pub fn ifname_key(name: &str) -> [u8; 16] {
    let mut k = [0u8; 16];
    let b = name.as_bytes();
    let n = b.len().min(15);
    k[..n].copy_from_slice(&b[..n]);
    k
}

/// One element as nft prints it.
pub fn elem_text(e: &SetElem) -> String {
    match e {
        SetElem::V4(n) if n.prefix_len() == 32 => n.addr().to_string(),
        SetElem::V4(n) => format!("{}/{}", n.network(), n.prefix_len()),
        SetElem::V6(n) if n.prefix_len() == 128 => n.addr().to_string(),
        SetElem::V6(n) => format!("{}/{}", n.network(), n.prefix_len()),
        SetElem::Ports(lo, hi) if lo == hi => lo.to_string(),
        SetElem::Ports(lo, hi) => format!("{lo}-{hi}"),
        SetElem::IfName(n) => format!("\"{n}\""),
        SetElem::Ether(m) => mac_text(m),
        SetElem::Mark(m) => format!("0x{m:08x}"),
        SetElem::Bucket(b, m) => format!("{b} : {}", mac_text(m)),
    }
}

fn mac_text(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

fn render_chain(family: Family, c: &Chain, out: &mut String) {
    let _ = writeln!(out, "\tchain {} {{", c.name);
    if let Some(b) = &c.base {
        let _ = writeln!(out, "\t\t{}", base_chain_text(family, b));
    }
    for r in &c.rules {
        let _ = writeln!(out, "\t\t{}", rule_text(r));
    }
    out.push_str("\t}\n");
}

/// `type filter hook prerouting priority filter; policy accept;`
pub fn base_chain_text(family: Family, b: &BaseChain) -> String {
    let kind = match b.kind {
        ChainType::Filter => "filter",
        ChainType::Nat => "nat",
    };
    format!(
        "type {kind} hook {} priority {}; policy accept;",
        hook_name(b.hook),
        priority_text(family, b.hook, b.priority)
    )
}

pub fn hook_name(h: Hook) -> &'static str {
    match h {
        Hook::Prerouting => "prerouting",
        Hook::Input => "input",
        Hook::Forward => "forward",
        Hook::Output => "output",
        Hook::Postrouting => "postrouting",
    }
}

/// The standard priority names nft 1.0.6 prints for a family and hook (checked against
/// `nft list` for every hook; `dstnat`/`srcnat`/`out` only where nft accepts them).
fn std_priorities(family: Family, hook: Hook) -> Vec<(&'static str, i32)> {
    match family {
        Family::Bridge => {
            let mut v = vec![("filter", -200)];
            match hook {
                Hook::Prerouting => v.push(("dstnat", -300)),
                Hook::Output => v.push(("out", 100)),
                Hook::Postrouting => v.push(("srcnat", 300)),
                _ => {}
            }
            v
        }
        Family::Inet => {
            let mut v = vec![
                ("raw", -300),
                ("mangle", -150),
                ("filter", 0),
                ("security", 50),
            ];
            match hook {
                Hook::Prerouting => v.push(("dstnat", -100)),
                Hook::Postrouting => v.push(("srcnat", 100)),
                _ => {}
            }
            v
        }
    }
}

/// `filter`, `dstnat - 5`, `-250`, ... as nft prints a chain priority.
pub fn priority_text(family: Family, hook: Hook, prio: i32) -> String {
    for (name, val) in std_priorities(family, hook) {
        let off = i64::from(prio) - i64::from(val);
        if off == 0 {
            return name.to_string();
        }
        if (-10..0).contains(&off) {
            return format!("{name} - {}", -off);
        }
        if (1..=10).contains(&off) {
            return format!("{name} + {off}");
        }
    }
    prio.to_string()
}

/// One rule as nft lists it (matches, statements, comment).
pub fn rule_text(r: &Rule) -> String {
    let has_vlan = r.matches.iter().any(|m| matches!(m, Match::VlanId(_)));
    let mut parts: Vec<String> = Vec::new();
    for (i, m) in r.matches.iter().enumerate() {
        if let Match::L4Proto(l4) = m {
            // nft takes it as the dependency of a later port match and does not print it.
            let folded = r.matches[i + 1..]
                .iter()
                .any(|n| matches!(n, Match::Port { l4: p, .. } if p == l4));
            if folded {
                continue;
            }
        }
        if let Match::Family(f) = m {
            // nft takes it as the dependency of a flow key that follows at once (a map lookup
            // or update as the first statement) and does not print it.
            let last = i + 1 == r.matches.len();
            let folded = last
                && matches!(r.stmts.first(),
                    Some(Stmt::MarkSetMap { key, .. }
                        | Stmt::UpdateMark { key, .. }
                        | Stmt::EtherDaddrSetMap { key, .. }
                        | Stmt::UpdateEther { key, .. })
                        if key.family == *f);
            if folded {
                continue;
            }
        }
        parts.push(match_text(m));
    }
    for s in &r.stmts {
        parts.push(stmt_text(s, has_vlan));
    }
    if let Some(c) = &r.comment {
        parts.push(format!("comment \"{c}\""));
    }
    parts.join(" ")
}

fn neg(negate: bool) -> &'static str {
    if negate { "!= " } else { "" }
}

fn dir_text(d: Dir) -> &'static str {
    match d {
        Dir::Src => "saddr",
        Dir::Dst => "daddr",
    }
}

fn port_dir_text(d: Dir) -> &'static str {
    match d {
        Dir::Src => "sport",
        Dir::Dst => "dport",
    }
}

pub fn match_text(m: &Match) -> String {
    match m {
        Match::IifName { negate, set } => format!("iifname {}@{set}", neg(*negate)),
        Match::EtherSaddr { set } => format!("ether saddr @{set}"),
        Match::VlanId(id) => format!("vlan id {id}"),
        Match::Untagged => "ether type != 8021q ether type != 8021ad".to_string(),
        Match::L4Proto(l4) => format!("meta l4proto {}", l4.as_str()),
        Match::Addr {
            family,
            dir,
            negate,
            set,
        } => {
            let f = match family {
                IpFamily::V4 => "ip",
                IpFamily::V6 => "ip6",
            };
            format!("{f} {} {}@{set}", dir_text(*dir), neg(*negate))
        }
        Match::Port {
            l4,
            dir,
            negate,
            set,
        } => format!(
            "{} {} {}@{set}",
            l4.as_str(),
            port_dir_text(*dir),
            neg(*negate)
        ),
        Match::Mark { mask, value } if *mask == u32::MAX => format!("meta mark 0x{value:08x}"),
        Match::Mark { mask, value } => format!("meta mark & 0x{mask:08x} == 0x{value:08x}"),
        Match::Family(IpFamily::V4) => "meta protocol ip".to_string(),
        Match::Family(IpFamily::V6) => "meta protocol ip6".to_string(),
        Match::SocketTransparent => "socket transparent 1".to_string(),
        Match::MarkNonZero { mask } => format!("meta mark & 0x{mask:08x} != 0x00000000"),
        Match::CtStateNew => "ct state new".to_string(),
        Match::CtMark { mask, value } => format!("ct mark & 0x{mask:08x} == 0x{value:08x}"),
        Match::MarkIn { mask, set } if *mask == u32::MAX => format!("meta mark @{set}"),
        Match::MarkIn { mask, set } => format!("meta mark & 0x{mask:08x} == @{set}"),
        Match::ArpRequest => "arp operation request".to_string(),
        Match::ArpAddr { dir, set } => format!("arp {} ip @{set}", dir_text(*dir)),
        Match::NdTarget { advert, target } => format!(
            "icmpv6 type nd-neighbor-{} @th,64,128 0x{:032x}",
            if *advert { "advert" } else { "solicit" },
            u128::from(*target)
        ),
        Match::Jhash {
            key,
            modulus,
            seed,
            value,
        } => format!(
            "jhash {} mod {modulus} seed 0x{seed:x} {value}",
            flow_key_text(key)
        ),
    }
}

/// The queue range `N` or `N-M` for `total` queues from `num`.
fn queue_range(num: u16, fanout: u16) -> String {
    let total = u32::from(fanout.max(1));
    if total == 1 {
        num.to_string()
    } else {
        format!("{num}-{}", u32::from(num) + total - 1)
    }
}

/// `KEY set KEY & AND | VALUE`: nft prints the kernel's (x & (KEEP & ~VALUE)) ^ VALUE as
/// `& (mask|xor) | xor`.
fn masked_set_text(key: &str, keep: u32, value: u32) -> String {
    let and = keep | value;
    let mut t = format!("{key} set {key}");
    if and != u32::MAX {
        let _ = write!(t, " & 0x{and:08x}");
    }
    if value != 0 {
        let _ = write!(t, " | 0x{value:08x}");
    }
    t
}

pub fn stmt_text(s: &Stmt, after_vlan: bool) -> String {
    match s {
        Stmt::Counter => "counter packets 0 bytes 0".to_string(),
        Stmt::MarkSetMasked { keep, value } => masked_set_text("meta mark", *keep, *value),
        Stmt::CtMarkSetMasked { keep, value } => masked_set_text("ct mark", *keep, *value),
        Stmt::MarkSet(v) => format!("meta mark set 0x{v:08x}"),
        Stmt::PkttypeSetHost => "meta pkttype set host".to_string(),
        Stmt::EtherDaddrSet(mac) if after_vlan => {
            let v = mac.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            format!("@ll,0,48 set 0x{v:x}")
        }
        Stmt::EtherDaddrSet(mac) => format!("ether daddr set {}", mac_text(mac)),
        Stmt::ArpSaddrSet(a) => format!("arp saddr ip set {a}"),
        Stmt::BrouteSet => "meta broute set 1".to_string(),
        Stmt::Redirect { port } => format!("redirect to :{port}"),
        Stmt::Tproxy { family, addr, port } => {
            let f = match family {
                IpFamily::V4 => "ip",
                IpFamily::V6 => "ip6",
            };
            match addr {
                None => format!("tproxy {f} to :{port}"),
                Some(std::net::IpAddr::V6(a)) => format!("tproxy {f} to [{a}]:{port}"),
                Some(a) => format!("tproxy {f} to {a}:{port}"),
            }
        }
        Stmt::Queue {
            num,
            fanout,
            bypass,
            form: QueueForm::Native,
        } => {
            let flags = if *bypass { " flags bypass" } else { "" };
            format!("queue{flags} to {}", queue_range(*num, *fanout))
        }
        Stmt::Queue {
            form: QueueForm::XtCompat,
            ..
        } => XT_NFQUEUE_TEXT.to_string(),
        Stmt::Accept => "accept".to_string(),
        Stmt::Drop => "drop".to_string(),
        Stmt::Return => "return".to_string(),
        Stmt::Jump(chain) => format!("jump {chain}"),
        Stmt::MarkSetMap { key, set } => {
            format!("meta mark set {} map @{set}", flow_key_text(key))
        }
        Stmt::UpdateMark { key, set } => {
            format!("update @{set} {{ {} : meta mark }}", flow_key_text(key))
        }
        Stmt::EtherDaddrSetHash {
            key,
            modulus,
            seed,
            set,
        } => format!(
            "ether daddr set jhash {} mod {modulus} seed 0x{seed:x} map @{set}",
            flow_key_text(key)
        ),
        Stmt::EtherDaddrSetMap { key, set } => {
            format!("ether daddr set {} map @{set}", flow_key_text(key))
        }
        Stmt::UpdateEther { key, set } => {
            format!("update @{set} {{ {} : ether daddr }}", flow_key_text(key))
        }
    }
}

/// The compat `NFQUEUE` target as text. nft 1.0.6 cannot print it in an inet table
/// (libxtables: "unhandled NFPROTO"; the statement lists as nothing, leaving two spaces);
/// newer nft prints untranslatable compat statements this way. Never loadable with `nft -f`.
pub const XT_NFQUEUE_TEXT: &str = "xt target \"NFQUEUE\"";

/// For comparisons in tests: `nft list` output (or `render` output) with counter values
/// zeroed, wrapped element lines joined, trailing blanks removed, and the xt `NFQUEUE`
/// statement dropped (nft 1.0.6 lists it as nothing; see [`XT_NFQUEUE_TEXT`]).
pub fn normalise(listing: &str) -> String {
    let joined = listing.replace(",\n\t\t\t     ", ", ");
    let mut out = String::new();
    for line in joined.lines() {
        let line = line.replace(XT_NFQUEUE_TEXT, "");
        let line = collapse_spaces(line.trim_end());
        let line = zero_counters(&line);
        out.push_str(&line);
        out.push('\n');
    }
    while out.ends_with("\n\n") {
        out.pop();
    }
    out
}

/// Runs of spaces become one (leading tabs are kept).
fn collapse_spaces(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    for c in line.chars() {
        if c == ' ' && out.ends_with(' ') {
            continue;
        }
        out.push(c);
    }
    out
}

fn zero_counters(line: &str) -> String {
    let mut words: Vec<&str> = line.split(' ').collect();
    for i in 0..words.len() {
        // `counter packets N bytes M` (the word before may carry the indentation tabs)
        if words[i].ends_with("counter")
            && words.get(i + 1) == Some(&"packets")
            && words.get(i + 3) == Some(&"bytes")
            && i + 4 < words.len()
        {
            words[i + 2] = "0";
            words[i + 4] = "0";
        }
    }
    words.join(" ")
}

/// The L4 protocol number.
pub fn l4_proto(l4: L4) -> u8 {
    match l4 {
        L4::Tcp => 6,
        L4::Udp => 17,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::BaseChain;

    fn rule(matches: Vec<Match>, stmts: Vec<Stmt>) -> Rule {
        Rule {
            matches,
            stmts,
            comment: None,
        }
    }

    #[test]
    fn matches_text() {
        let cases: Vec<(Match, &str)> = vec![
            (
                Match::IifName {
                    negate: true,
                    set: "ports".into(),
                },
                "iifname != @ports",
            ),
            (
                Match::IifName {
                    negate: false,
                    set: "p".into(),
                },
                "iifname @p",
            ),
            (Match::EtherSaddr { set: "m".into() }, "ether saddr @m"),
            (Match::VlanId(10), "vlan id 10"),
            (Match::L4Proto(L4::Udp), "meta l4proto udp"),
            (
                Match::Addr {
                    family: IpFamily::V4,
                    dir: Dir::Src,
                    negate: false,
                    set: "s".into(),
                },
                "ip saddr @s",
            ),
            (
                Match::Addr {
                    family: IpFamily::V6,
                    dir: Dir::Dst,
                    negate: true,
                    set: "d".into(),
                },
                "ip6 daddr != @d",
            ),
            (
                Match::Port {
                    l4: L4::Tcp,
                    dir: Dir::Dst,
                    negate: false,
                    set: "p".into(),
                },
                "tcp dport @p",
            ),
            (
                Match::Port {
                    l4: L4::Udp,
                    dir: Dir::Src,
                    negate: true,
                    set: "p".into(),
                },
                "udp sport != @p",
            ),
            (
                Match::Mark {
                    mask: 0xff00,
                    value: 0x100,
                },
                "meta mark & 0x0000ff00 == 0x00000100",
            ),
            (
                Match::Mark {
                    mask: u32::MAX,
                    value: 16,
                },
                "meta mark 0x00000010",
            ),
            (Match::SocketTransparent, "socket transparent 1"),
        ];
        for (m, want) in cases {
            assert_eq!(match_text(&m), want);
        }
    }

    #[test]
    fn stmts_text() {
        let mac = [2, 0, 0, 0, 0, 1];
        let cases: Vec<(Stmt, bool, &str)> = vec![
            (Stmt::Counter, false, "counter packets 0 bytes 0"),
            (
                Stmt::MarkSetMasked {
                    keep: 0xffff00ff,
                    value: 0x100,
                },
                false,
                "meta mark set meta mark & 0xffff01ff | 0x00000100",
            ),
            (
                Stmt::MarkSetMasked {
                    keep: 0xfffffffe,
                    value: 1,
                },
                false,
                "meta mark set meta mark | 0x00000001",
            ),
            (
                Stmt::MarkSetMasked {
                    keep: 0xffff0000,
                    value: 0,
                },
                false,
                "meta mark set meta mark & 0xffff0000",
            ),
            (Stmt::MarkSet(16), false, "meta mark set 0x00000010"),
            (Stmt::PkttypeSetHost, false, "meta pkttype set host"),
            (
                Stmt::EtherDaddrSet(mac),
                false,
                "ether daddr set 02:00:00:00:00:01",
            ),
            (Stmt::EtherDaddrSet(mac), true, "@ll,0,48 set 0x20000000001"),
            (Stmt::BrouteSet, false, "meta broute set 1"),
            (Stmt::Redirect { port: 3129 }, false, "redirect to :3129"),
            (
                Stmt::Tproxy {
                    family: IpFamily::V4,
                    addr: Some("127.0.0.1".parse().unwrap()),
                    port: 3129,
                },
                false,
                "tproxy ip to 127.0.0.1:3129",
            ),
            (
                Stmt::Tproxy {
                    family: IpFamily::V4,
                    addr: None,
                    port: 3129,
                },
                false,
                "tproxy ip to :3129",
            ),
            (
                Stmt::Tproxy {
                    family: IpFamily::V6,
                    addr: Some("::1".parse().unwrap()),
                    port: 3129,
                },
                false,
                "tproxy ip6 to [::1]:3129",
            ),
            (
                Stmt::Tproxy {
                    family: IpFamily::V6,
                    addr: None,
                    port: 3129,
                },
                false,
                "tproxy ip6 to :3129",
            ),
            (
                Stmt::Queue {
                    num: 0,
                    fanout: 1,
                    bypass: true,
                    form: QueueForm::Native,
                },
                false,
                "queue flags bypass to 0",
            ),
            (
                Stmt::Queue {
                    num: 4,
                    fanout: 2,
                    bypass: false,
                    form: QueueForm::Native,
                },
                false,
                "queue to 4-5",
            ),
            (
                Stmt::Queue {
                    num: 4,
                    fanout: 2,
                    bypass: true,
                    form: QueueForm::XtCompat,
                },
                false,
                "xt target \"NFQUEUE\"",
            ),
            (Stmt::Accept, false, "accept"),
            (Stmt::Drop, false, "drop"),
            (Stmt::Return, false, "return"),
        ];
        for (s, vlan, want) in cases {
            assert_eq!(stmt_text(&s, vlan), want, "{s:?}");
        }
    }

    #[test]
    fn l4proto_folds_into_port_match() {
        let p = Match::Port {
            l4: L4::Tcp,
            dir: Dir::Dst,
            negate: false,
            set: "p".into(),
        };
        let r = rule(vec![Match::L4Proto(L4::Tcp), p.clone()], vec![Stmt::Accept]);
        assert_eq!(rule_text(&r), "tcp dport @p accept");
        let r = rule(
            vec![Match::L4Proto(L4::Tcp), Match::SocketTransparent],
            vec![],
        );
        assert_eq!(rule_text(&r), "meta l4proto tcp socket transparent 1");
        let mut r = rule(vec![Match::VlanId(7)], vec![Stmt::Drop]);
        r.comment = Some("web".into());
        assert_eq!(rule_text(&r), "vlan id 7 drop comment \"web\"");
    }

    #[test]
    fn priorities() {
        use Family::*;
        use Hook::*;
        let cases = [
            (Bridge, Prerouting, -300, "dstnat"),
            (Bridge, Prerouting, -310, "dstnat - 10"),
            (Bridge, Prerouting, -311, "-311"),
            (Bridge, Prerouting, -200, "filter"),
            (Bridge, Input, -300, "-300"),
            (Bridge, Forward, -190, "filter + 10"),
            (Bridge, Output, 100, "out"),
            (Bridge, Postrouting, 300, "srcnat"),
            (Bridge, Prerouting, 0, "0"),
            (Inet, Prerouting, -150, "mangle"),
            (Inet, Prerouting, -100, "dstnat"),
            (Inet, Output, -100, "-100"),
            (Inet, Prerouting, -1, "filter - 1"),
            (Inet, Prerouting, 60, "security + 10"),
            (Inet, Postrouting, 100, "srcnat"),
            (Inet, Prerouting, 100, "100"),
            (Inet, Input, -300, "raw"),
        ];
        for (f, h, p, want) in cases {
            assert_eq!(priority_text(f, h, p), want, "{f:?} {h:?} {p}");
        }
    }

    #[test]
    fn sets_sorted_and_wrapped() {
        let s = Set {
            name: "i".into(),
            kind: SetKind::IfName,
            interval: false,
            elements: ["veth0", "a2", "b1", "eth10", "eth2", "zz", "eth1"]
                .iter()
                .map(|n| SetElem::IfName(n.to_string()))
                .collect(),
            dynamic: None,
            keep: false,
        };
        let mut out = String::new();
        render_set(&s, &mut out);
        assert_eq!(
            out,
            "\tset i {\n\t\ttype ifname\n\t\tsize 7\n\t\telements = { \"b1\",\n\t\t\t     \"a2\",\n\t\t\t     \"zz\",\n\t\t\t     \"eth1\",\n\t\t\t     \"eth2\",\n\t\t\t     \"eth10\",\n\t\t\t     \"veth0\" }\n\t}\n"
        );
        let s = Set {
            name: "q".into(),
            kind: SetKind::Ipv4Addr,
            interval: true,
            elements: vec![
                SetElem::V4("5.0.0.0/24".parse().unwrap()),
                SetElem::V4("1.0.0.0/8".parse().unwrap()),
                SetElem::V4("3.0.0.1/32".parse().unwrap()),
            ],
            dynamic: None,
            keep: false,
        };
        let mut out = String::new();
        render_set(&s, &mut out);
        assert_eq!(
            out,
            "\tset q {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 1.0.0.0/8, 3.0.0.1,\n\t\t\t     5.0.0.0/24 }\n\t}\n"
        );
        let s = Set {
            name: "p".into(),
            kind: SetKind::InetService,
            interval: true,
            elements: (0..6).map(|i| SetElem::Ports(i * 2, i * 2)).collect(),
            dynamic: None,
            keep: false,
        };
        assert_eq!(elements_text(&s), "0, 2, 4, 6, 8,\n\t\t\t     10");
    }

    #[test]
    fn whole_table() {
        let rs = Ruleset {
            tables: vec![Table {
                family: Family::Bridge,
                name: "brdivert".into(),
                sets: vec![Set {
                    name: "m".into(),
                    kind: SetKind::EtherAddr,
                    interval: false,
                    elements: vec![],
                    dynamic: None,
                    keep: false,
                }],
                chains: vec![
                    Chain {
                        name: "prerouting".into(),
                        base: Some(BaseChain {
                            kind: ChainType::Filter,
                            hook: Hook::Prerouting,
                            priority: -200,
                        }),
                        rules: vec![rule(vec![], vec![Stmt::Counter, Stmt::Accept])],
                    },
                    Chain {
                        name: "x".into(),
                        base: None,
                        rules: vec![],
                    },
                ],
            }],
        };
        assert_eq!(
            render(&rs),
            "table bridge brdivert {\n\tset m {\n\t\ttype ether_addr\n\t}\n\n\tchain prerouting {\n\t\ttype filter hook prerouting priority filter; policy accept;\n\t\tcounter packets 0 bytes 0 accept\n\t}\n\n\tchain x {\n\t}\n}\n"
        );
    }

    #[test]
    fn normalise_zeroes_and_joins() {
        let l = "\t\tcounter packets 12 bytes 3400 accept\n\t\telements = { 1.1.1.1, 2.2.2.2,\n\t\t\t     3.3.3.3 }\n";
        assert_eq!(
            normalise(l),
            "\t\tcounter packets 0 bytes 0 accept\n\t\telements = { 1.1.1.1, 2.2.2.2, 3.3.3.3 }\n"
        );
        assert_eq!(
            normalise("counter packets 1 bytes 2"),
            "counter packets 0 bytes 0\n"
        );
        // nft 1.0.6 lists the xt target as nothing
        assert_eq!(
            normalise("\t\tmeta l4proto tcp  comment \"q\"\n"),
            normalise("\t\tmeta l4proto tcp xt target \"NFQUEUE\" comment \"q\"\n")
        );
    }
}
