//! Header parsing for queued packets: validates every length before reading and never
//! panics on any input (see the property test below). Only the headers are copied to
//! userspace (copy range ~128 bytes), so the IP total length routinely exceeds what we hold;
//! the parser reads what is there and reports what it could not.

use std::fmt;
use std::net::IpAddr;

use pnet_packet::ipv4::Ipv4Packet;
use pnet_packet::ipv6::Ipv6Packet;
use pnet_packet::tcp::TcpPacket;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;
pub const PROTO_UDPLITE: u8 = 136;

/// TCP flag bits (low byte of the flags field).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

/// The 5-tuple (plus family) of a packet. Ports are 0 for protocols without ports and for
/// non-first fragments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub family: Family,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

impl fmt::Display for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "proto {} {}:{} -> {}:{}",
            self.proto, self.src, self.sport, self.dst, self.dport
        )
    }
}

/// What the parser learnt from one packet's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headers {
    pub key: FlowKey,
    /// TCP flags (low 8 bits), when the TCP header was complete enough to hold them.
    pub tcp_flags: Option<u8>,
    /// A non-first fragment: no transport header, ports are 0.
    pub fragment: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    Empty,
    BadVersion(u8),
    /// Shorter than the fixed IP header, or than the header length it announces.
    Truncated,
    /// IPv4 IHL below 5.
    BadHeaderLength(u8),
    /// More IPv6 extension headers than we walk (or a malformed one).
    ExtensionHeaders,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Empty => write!(f, "empty packet"),
            ParseError::BadVersion(v) => write!(f, "IP version {v}"),
            ParseError::Truncated => write!(f, "truncated IP header"),
            ParseError::BadHeaderLength(l) => write!(f, "IPv4 header length {l}"),
            ParseError::ExtensionHeaders => write!(f, "IPv6 extension headers"),
        }
    }
}

impl std::error::Error for ParseError {}

/// Parses an IPv4 or IPv6 packet (as queued from an ip/ip6/inet hook: no link-layer header).
pub fn parse(bytes: &[u8]) -> Result<Headers, ParseError> {
    let first = *bytes.first().ok_or(ParseError::Empty)?;
    match first >> 4 {
        4 => parse_v4(bytes),
        6 => parse_v6(bytes),
        v => Err(ParseError::BadVersion(v)),
    }
}

fn parse_v4(bytes: &[u8]) -> Result<Headers, ParseError> {
    let ip = Ipv4Packet::new(bytes).ok_or(ParseError::Truncated)?;
    let ihl = ip.get_header_length();
    if ihl < 5 {
        return Err(ParseError::BadHeaderLength(ihl));
    }
    let hlen = usize::from(ihl) * 4;
    let rest = bytes.get(hlen..).ok_or(ParseError::Truncated)?;
    let proto = ip.get_next_level_protocol().0;
    let fragment = ip.get_fragment_offset() != 0;
    let (sport, dport, tcp_flags) = if fragment {
        (0, 0, None)
    } else {
        transport(proto, rest)
    };
    Ok(Headers {
        key: FlowKey {
            family: Family::V4,
            src: IpAddr::V4(ip.get_source()),
            dst: IpAddr::V4(ip.get_destination()),
            proto,
            sport,
            dport,
        },
        tcp_flags,
        fragment,
    })
}

/// Extension headers walked at most; a packet with more is refused.
const MAX_EXT_HEADERS: usize = 8;

fn parse_v6(bytes: &[u8]) -> Result<Headers, ParseError> {
    let ip = Ipv6Packet::new(bytes).ok_or(ParseError::Truncated)?;
    let mut next = ip.get_next_header().0;
    let mut off = 40usize;
    let mut fragment = false;
    let mut walked = 0;
    loop {
        match next {
            // hop-by-hop, routing, destination options: (len + 1) * 8 bytes
            0 | 43 | 60 => {
                let h = bytes.get(off..off + 2).ok_or(ParseError::Truncated)?;
                next = h[0];
                off += (usize::from(h[1]) + 1) * 8;
            }
            // fragment header: 8 bytes; only the first fragment has the transport header
            44 => {
                let h = bytes.get(off..off + 4).ok_or(ParseError::Truncated)?;
                next = h[0];
                let frag_off = u16::from_be_bytes([h[2], h[3]]) >> 3;
                if frag_off != 0 {
                    fragment = true;
                }
                off += 8;
            }
            // authentication header: (len + 2) * 4 bytes
            51 => {
                let h = bytes.get(off..off + 2).ok_or(ParseError::Truncated)?;
                next = h[0];
                off += (usize::from(h[1]) + 2) * 4;
            }
            _ => break,
        }
        walked += 1;
        if walked > MAX_EXT_HEADERS {
            return Err(ParseError::ExtensionHeaders);
        }
        if fragment {
            break;
        }
    }
    let (sport, dport, tcp_flags) = if fragment {
        (0, 0, None)
    } else {
        // headers beyond the copied bytes: we know the protocol, not the ports
        transport(next, bytes.get(off..).unwrap_or(&[]))
    };
    Ok(Headers {
        key: FlowKey {
            family: Family::V6,
            src: IpAddr::V6(ip.get_source()),
            dst: IpAddr::V6(ip.get_destination()),
            proto: next,
            sport,
            dport,
        },
        tcp_flags,
        fragment,
    })
}

/// Ports (and TCP flags) from the start of a transport header; 0s when it is missing or the
/// protocol has no ports.
fn transport(proto: u8, l4: &[u8]) -> (u16, u16, Option<u8>) {
    match proto {
        PROTO_TCP => {
            if let Some(tcp) = TcpPacket::new(l4) {
                return (
                    tcp.get_source(),
                    tcp.get_destination(),
                    // the low 8 bits: CWR ECE URG ACK PSH RST SYN FIN
                    Some(tcp.get_flags()),
                );
            }
            let (s, d) = ports(l4);
            let flags = l4.get(13).copied();
            (s, d, flags)
        }
        PROTO_UDP | PROTO_SCTP | PROTO_UDPLITE => {
            let (s, d) = ports(l4);
            (s, d, None)
        }
        _ => (0, 0, None),
    }
}

fn ports(l4: &[u8]) -> (u16, u16) {
    match l4.get(..4) {
        Some(p) => (
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        ),
        None => (0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// A minimal IPv4 TCP SYN.
    pub(crate) fn v4_syn(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&40u16.to_be_bytes());
        p[8] = 64;
        p[9] = PROTO_TCP;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = TCP_SYN;
        p
    }

    /// IPv6 UDP; `ext` are extension headers, the first of type `first`.
    fn v6_udp(first: u8, ext: &[u8], sport: u16, dport: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[6] = if ext.is_empty() { PROTO_UDP } else { first };
        p[7] = 64;
        p[8..24].copy_from_slice(&Ipv6Addr::LOCALHOST.octets());
        p[24..40].copy_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(ext);
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0, 8, 0, 0]);
        p
    }

    #[test]
    fn ipv4_tcp_syn() {
        let h = parse(&v4_syn([10, 0, 0, 1], [192, 0, 2, 7], 40000, 443)).unwrap();
        assert_eq!(h.key.family, Family::V4);
        assert_eq!(h.key.src, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(h.key.dst, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)));
        assert_eq!(
            (h.key.proto, h.key.sport, h.key.dport),
            (PROTO_TCP, 40000, 443)
        );
        assert_eq!(h.tcp_flags, Some(TCP_SYN));
        assert!(!h.fragment);
    }

    #[test]
    fn ipv4_truncated_tcp_still_gives_ports() {
        let p = v4_syn([10, 0, 0, 1], [10, 0, 0, 2], 1, 2);
        let h = parse(&p[..24]).unwrap();
        assert_eq!((h.key.sport, h.key.dport, h.tcp_flags), (1, 2, None));
        let h = parse(&p[..21]).unwrap();
        assert_eq!((h.key.sport, h.key.dport), (0, 0));
    }

    #[test]
    fn ipv4_bad_headers() {
        assert_eq!(parse(&[]), Err(ParseError::Empty));
        assert_eq!(parse(&[0x45; 10]), Err(ParseError::Truncated));
        let mut p = v4_syn([1, 1, 1, 1], [2, 2, 2, 2], 1, 2);
        p[0] = 0x43;
        assert_eq!(parse(&p), Err(ParseError::BadHeaderLength(3)));
        p[0] = 0x4f; // 60-byte header, 40 bytes held
        assert_eq!(parse(&p), Err(ParseError::Truncated));
        p[0] = 0x55;
        assert_eq!(parse(&p), Err(ParseError::BadVersion(5)));
    }

    #[test]
    fn ipv4_non_first_fragment_has_no_ports() {
        let mut p = v4_syn([1, 1, 1, 1], [2, 2, 2, 2], 1, 2);
        p[6] = 0x00;
        p[7] = 0x10;
        let h = parse(&p).unwrap();
        assert!(h.fragment);
        assert_eq!((h.key.sport, h.key.dport, h.tcp_flags), (0, 0, None));
    }

    #[test]
    fn ipv6_udp_plain_and_behind_extension_headers() {
        let h = parse(&v6_udp(0, &[], 53, 5353)).unwrap();
        assert_eq!(h.key.family, Family::V6);
        assert_eq!(
            (h.key.proto, h.key.sport, h.key.dport),
            (PROTO_UDP, 53, 5353)
        );
        // hop-by-hop (8 bytes) -> destination options (16 bytes) -> udp
        let mut ext = vec![60, 0, 0, 0, 0, 0, 0, 0];
        ext.extend_from_slice(&[PROTO_UDP, 1]);
        ext.extend_from_slice(&[0; 14]);
        let h = parse(&v6_udp(0, &ext, 1000, 2000)).unwrap();
        assert_eq!(
            (h.key.proto, h.key.sport, h.key.dport),
            (PROTO_UDP, 1000, 2000)
        );
        // a non-first fragment
        let frag = [PROTO_UDP, 0, 0x00, 0x08, 0, 0, 0, 1];
        let h = parse(&v6_udp(44, &frag, 1, 2)).unwrap();
        assert!(h.fragment);
        assert_eq!((h.key.proto, h.key.sport), (PROTO_UDP, 0));
    }

    #[test]
    fn ipv6_extension_header_loop_is_bounded() {
        let mut ext = Vec::new();
        for _ in 0..20 {
            ext.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        }
        assert_eq!(
            parse(&v6_udp(0, &ext, 1, 2)),
            Err(ParseError::ExtensionHeaders)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz::fuzz_cases(4096)))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn arbitrary_ipv4_ish_never_panic(
            ihl in 0u8..16,
            body in proptest::collection::vec(any::<u8>(), 0..160),
        ) {
            let mut p = vec![0x40 | ihl];
            p.extend_from_slice(&body);
            if let Ok(h) = parse(&p) {
                prop_assert_eq!(h.key.family, Family::V4);
                prop_assert!(usize::from(ihl) * 4 <= p.len());
            }
        }

        #[test]
        fn arbitrary_ipv6_ish_never_panic(
            next in prop_oneof![Just(0u8), Just(43), Just(44), Just(51), Just(60), Just(6), Just(17), any::<u8>()],
            body in proptest::collection::vec(any::<u8>(), 0..160),
        ) {
            let mut p = vec![0x60, 0, 0, 0, 0, 0, next, 64];
            p.extend_from_slice(&body);
            let _ = parse(&p);
        }

        #[test]
        fn well_formed_tcp_roundtrips(src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), sp in any::<u16>(), dp in any::<u16>()) {
            let h = parse(&v4_syn(src, dst, sp, dp)).unwrap();
            prop_assert_eq!(h.key.src, IpAddr::V4(Ipv4Addr::from(src)));
            prop_assert_eq!(h.key.dst, IpAddr::V4(Ipv4Addr::from(dst)));
            prop_assert_eq!((h.key.sport, h.key.dport), (sp, dp));
        }
    }
}
