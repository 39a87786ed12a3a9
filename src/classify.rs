//! The policy evaluated in Rust, per frame: what the userspace datapath runs, and what the
//! tests compare with the kernel datapath. It reads the same [`Policy`] as `nft::compile`
//! and follows the same order: rules in policy order; per rule, ingress port, source MAC and
//! L4 protocol/port first, then the rule's exemptions (which only skip this rule), then its
//! address match; the first rule that diverts, passes or drops decides.
//!
//! [`parse_frame`] turns wire bytes into the few fields classification needs, checking every
//! length before reading a field (`pnet_packet` views are only built over checked slices).

use std::net::IpAddr;

use pnet_packet::Packet as _;
use pnet_packet::ethernet::{EtherTypes, EthernetPacket};
use pnet_packet::ipv4::Ipv4Packet;
use pnet_packet::ipv6::Ipv6Packet;

use crate::policy::{Action, DivertRule, Family, Policy, Proto, family_of};

/// What classification looks at in one IP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketInfo {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// 802.1Q VLAN id, if the frame was tagged
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number (IPv6: the first next-header; extension headers are not walked)
    pub l4proto: u8,
    /// (source, destination) ports of TCP/UDP; `None` for other protocols, truncated
    /// headers and non-first fragments (as the kernel: no transport header there)
    pub ports: Option<(u16, u16)>,
    /// TCP flags (FIN 0x01, SYN 0x02, RST 0x04, …) where `ports` is read from a TCP
    /// header that has them; 0 otherwise
    pub tcp_flags: u8,
}

impl PacketInfo {
    pub fn family(&self) -> Family {
        family_of(self.src)
    }
}

/// Why a frame is not classified as IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotIp {
    /// shorter than its headers say
    Truncated,
    /// ARP, LLDP, … (bridged untouched)
    OtherEthertype(u16),
    /// an IPv4 header whose version or length fields are inconsistent
    BadIpHeader,
}

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// Parse an Ethernet frame (optionally 802.1Q-tagged) down to the fields of [`PacketInfo`].
pub fn parse_frame(frame: &[u8]) -> Result<PacketInfo, NotIp> {
    let eth = EthernetPacket::new(frame).ok_or(NotIp::Truncated)?;
    let mut src_mac = [0u8; 6];
    let mut dst_mac = [0u8; 6];
    src_mac.copy_from_slice(&frame[6..12]);
    dst_mac.copy_from_slice(&frame[0..6]);
    let mut ethertype = eth.get_ethertype();
    let mut payload = eth.payload();
    let mut vlan = None;
    if ethertype == EtherTypes::Vlan {
        // TCI (2 bytes) + inner ethertype (2 bytes)
        let tag = payload.get(..4).ok_or(NotIp::Truncated)?;
        vlan = Some(u16::from_be_bytes([tag[0], tag[1]]) & 0x0fff);
        ethertype = pnet_packet::ethernet::EtherType(u16::from_be_bytes([tag[2], tag[3]]));
        payload = &payload[4..];
    }
    let (src, dst, l4proto, l4, first_fragment) = match ethertype {
        EtherTypes::Ipv4 => {
            let ip = Ipv4Packet::new(payload).ok_or(NotIp::Truncated)?;
            let hlen = usize::from(ip.get_header_length()) * 4;
            if ip.get_version() != 4 || hlen < 20 {
                return Err(NotIp::BadIpHeader);
            }
            let total = usize::from(ip.get_total_length());
            if total < hlen || payload.len() < hlen {
                return Err(NotIp::Truncated);
            }
            // Ignore link-layer padding beyond the IP total length.
            let end = total.min(payload.len());
            (
                IpAddr::V4(ip.get_source()),
                IpAddr::V4(ip.get_destination()),
                ip.get_next_level_protocol().0,
                &payload[hlen..end],
                ip.get_fragment_offset() == 0,
            )
        }
        EtherTypes::Ipv6 => {
            let ip = Ipv6Packet::new(payload).ok_or(NotIp::Truncated)?;
            let end = (40 + usize::from(ip.get_payload_length())).min(payload.len());
            (
                IpAddr::V6(ip.get_source()),
                IpAddr::V6(ip.get_destination()),
                ip.get_next_header().0,
                &payload[40..end],
                true,
            )
        }
        other => return Err(NotIp::OtherEthertype(other.0)),
    };
    let ports = match (l4proto, l4.get(..4)) {
        (IPPROTO_TCP | IPPROTO_UDP, Some(p)) if first_fragment => Some((
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        )),
        _ => None,
    };
    let tcp_flags = match (l4proto, l4.get(13)) {
        (IPPROTO_TCP, Some(&f)) if first_fragment => f,
        _ => 0,
    };
    Ok(PacketInfo {
        src_mac,
        dst_mac,
        vlan,
        src,
        dst,
        l4proto,
        ports,
        tcp_flags,
    })
}

/// What the policy decides for one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Hand it to the local stack for rule `rule` (index into `policy.rules`).
    Divert {
        rule: usize,
        tag: u32,
        action: Action,
    },
    /// A `pass` rule matched: bridge it, look no further.
    Pass { rule: usize },
    /// A `drop` rule matched.
    Drop { rule: usize },
    /// No rule matched: bridge it.
    Bridge,
}

/// Evaluate `policy` for a packet that arrived on port `iif`.
///
/// A `dr` rule's match reads as `Divert` with `action = Dr`; the realserver is chosen by the
/// userspace datapath (`datapath::Rules::decide`, buckets from `crate::dr`), as `decide =
/// "queue"` verdicts are.
pub fn classify(policy: &Policy, iif: &str, p: &PacketInfo) -> Decision {
    for (i, r) in policy.rules.iter().enumerate() {
        if rule_matches(r, iif, p) {
            return taken_by(i, r);
        }
    }
    Decision::Bridge
}

/// The decision for a packet rule `i` (`r`) takes.
pub fn taken_by(i: usize, r: &DivertRule) -> Decision {
    match r.action {
        Action::Pass => Decision::Pass { rule: i },
        Action::Drop => Decision::Drop { rule: i },
        action => Decision::Divert {
            rule: i,
            tag: r.tag,
            action,
        },
    }
}

/// Does rule `r` take this packet (exemptions already applied)?
pub fn rule_matches(r: &DivertRule, iif: &str, p: &PacketInfo) -> bool {
    rule_match(r, iif, p) == RuleMatch::Yes
}

/// How rule `r` meets a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleMatch {
    No,
    /// It reached the rule's exemptions (`except_src`/`except_dst`), which returned it: the
    /// kernel datapath counts it as the rule's "exempted".
    Exempted,
    Yes,
}

/// [`rule_matches`], telling an exempted packet apart.
pub fn rule_match(r: &DivertRule, iif: &str, p: &PacketInfo) -> RuleMatch {
    if !reaches_exemptions(r, iif, p) {
        RuleMatch::No
    } else if r.except_src.contains(p.src) || r.except_dst.contains(p.dst) {
        RuleMatch::Exempted
    } else if r.src.contains(p.src) && r.dst.contains(p.dst) {
        RuleMatch::Yes
    } else {
        RuleMatch::No
    }
}

/// Does the packet get as far as rule `r`'s exemptions (the base chain's jump, then the
/// rule chain's family check)?
fn reaches_exemptions(r: &DivertRule, iif: &str, p: &PacketInfo) -> bool {
    // The base chain's jump: ingress port, source MAC, L4 protocol and port.
    if !r.from.is_empty() && !r.from.iter().any(|f| f == iif) {
        return false;
    }
    if !r.src_mac.is_empty() && !r.src_mac.contains(&p.src_mac) {
        return false;
    }
    // no `vlan`: untagged frames only; else tagged with one of the rule's VLANs
    let vlan_ok = match p.vlan {
        None => r.vlan.is_empty(),
        Some(v) => r.vlan.contains(&v),
    };
    if !vlan_ok {
        return false;
    }
    if let Some(proto) = r.proto {
        let num = match proto {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        };
        if p.l4proto != num {
            return false;
        }
        if !r.dport.is_empty() {
            match p.ports {
                Some((_, dport)) if r.dport.iter().any(|range| range.contains(dport)) => {}
                _ => return false,
            }
        }
    }
    // The rule's chain: only its families; then exemptions return, then the address match
    // (in rule_match).
    r.families().contains(&p.family())
}

/// A frame to build (tests, benchmarks, fuzz seeds): Ethernet, optional 802.1Q tag, IPv4 or
/// IPv6, and an 8-byte L4 header carrying the ports for TCP/UDP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameSpec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4proto: u8,
    pub sport: u16,
    pub dport: u16,
}

impl FrameSpec {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(96);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        if let Some(v) = self.vlan {
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&(v & 0x0fff).to_be_bytes());
        }
        // L4: ports, then a TCP-sized rest (data offset 5, SYN) or UDP length/checksum.
        let mut l4 = Vec::with_capacity(20);
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        if self.l4proto == IPPROTO_TCP {
            l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        } else {
            l4.extend_from_slice(&8u16.to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&0x0800u16.to_be_bytes());
                let total = (20 + l4.len()) as u16;
                let mut h = [0u8; 20];
                h[0] = 0x45;
                h[2..4].copy_from_slice(&total.to_be_bytes());
                h[8] = 64;
                h[9] = self.l4proto;
                h[12..16].copy_from_slice(&s.octets());
                h[16..20].copy_from_slice(&d.octets());
                let sum = ipv4_checksum(&h);
                h[10..12].copy_from_slice(&sum.to_be_bytes());
                f.extend_from_slice(&h);
            }
            (s, d) => {
                let v6 = |a: IpAddr| match a {
                    IpAddr::V6(a) => a.octets(),
                    IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                };
                f.extend_from_slice(&0x86ddu16.to_be_bytes());
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
                f.push(self.l4proto);
                f.push(64);
                f.extend_from_slice(&v6(s));
                f.extend_from_slice(&v6(d));
            }
        }
        f.extend_from_slice(&l4);
        f
    }
}

fn ipv4_checksum(h: &[u8; 20]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests;
