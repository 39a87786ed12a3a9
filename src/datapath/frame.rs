//! Frame handling between the ports: the `virtio_net_hdr` every frame carries (AF_PACKET with
//! `PACKET_VNET_HDR` and the TAP with `IFF_VNET_HDR` use the same 10-byte header, so frames
//! move between them unchanged), 802.1Q tags restored from `PACKET_AUXDATA`, and the frame
//! diverter's rewrite.

/// Size of `struct virtio_net_hdr` (no `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;
pub const VNET_F_NEEDS_CSUM: u8 = 1;
pub const VNET_GSO_NONE: u8 = 0;
/// Bytes kept free in front of every received frame so a VLAN tag can be put back in place.
pub const HEADROOM: usize = 4;
pub const ETH_HLEN: usize = 14;

/// The fields of a `virtio_net_hdr` (little-endian on the wire, as on every host brdivert
/// supports: legacy virtio headers are host-endian and both AF_PACKET and TAP use that).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let b = b.get(..VNET_HDR_LEN)?;
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    pub fn write(&self, b: &mut [u8]) {
        if b.len() < VNET_HDR_LEN {
            return;
        }
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }

    pub fn is_gso(&self) -> bool {
        self.gso_type != VNET_GSO_NONE
    }
}

/// Put a VLAN tag the kernel stripped (reported in `PACKET_AUXDATA`) back into the frame.
///
/// `buf[start..start + len]` holds the vnet header and the frame, with at least
/// [`HEADROOM`] free bytes before `start`. The header and both MAC addresses move 4 bytes
/// to the front, the tag goes in after them, and offsets in the vnet header that count from
/// the frame's start grow by 4. Returns the new `(start, len)`, or `None` when the frame is
/// too short or there is no headroom (the caller drops it).
pub fn restore_vlan(
    buf: &mut [u8],
    start: usize,
    len: usize,
    tpid: u16,
    tci: u16,
) -> Option<(usize, usize)> {
    if start < HEADROOM || len < VNET_HDR_LEN + 12 || start + len > buf.len() {
        return None;
    }
    let new_start = start - HEADROOM;
    buf.copy_within(start..start + VNET_HDR_LEN + 12, new_start);
    let tag_at = new_start + VNET_HDR_LEN + 12;
    buf[tag_at..tag_at + 2].copy_from_slice(&tpid.to_be_bytes());
    buf[tag_at + 2..tag_at + 4].copy_from_slice(&tci.to_be_bytes());
    let mut h = VnetHdr::parse(&buf[new_start..])?;
    if h.flags & VNET_F_NEEDS_CSUM != 0 {
        h.csum_start = h.csum_start.checked_add(4)?;
    }
    if h.hdr_len != 0 {
        h.hdr_len = h.hdr_len.saturating_add(4);
    }
    h.write(&mut buf[new_start..]);
    Some((new_start, len + HEADROOM))
}

/// First two bytes of the source MAC that carries a rule's tag to the local stack
/// (locally administered, unicast).
pub const TAG_MAC_PREFIX: [u8; 2] = [0x02, 0xbd];

/// The source MAC that tells the local stack "diverted by the rule with this tag": the TAP
/// cannot carry a packet mark, so the tag rides in the source address, and an nft rule on the
/// TAP's ingress turns it back into the mark (see `local_rules`).
pub fn tag_mac(tag: u32) -> [u8; 6] {
    let t = tag.to_be_bytes();
    [TAG_MAC_PREFIX[0], TAG_MAC_PREFIX[1], t[0], t[1], t[2], t[3]]
}

/// The frame diverter's move on an Ethernet frame: destination := the local port's MAC,
/// source := the rule's tag MAC. `false` if the frame is shorter than an Ethernet header.
pub fn divert_rewrite(frame: &mut [u8], local_mac: [u8; 6], tag: u32) -> bool {
    if frame.len() < ETH_HLEN {
        return false;
    }
    frame[..6].copy_from_slice(&local_mac);
    frame[6..12].copy_from_slice(&tag_mac(tag));
    true
}

/// Length of the L3 payload of a frame (after the Ethernet header and any 802.1Q tags), for
/// MTU checks.
pub fn l3_len(frame: &[u8]) -> usize {
    let mut off = 12;
    while let Some(t) = frame.get(off..off + 2) {
        let et = u16::from_be_bytes([t[0], t[1]]);
        if et == 0x8100 || et == 0x88a8 {
            off += 4;
        } else {
            break;
        }
    }
    frame.len().saturating_sub(off + 2)
}

pub fn is_multicast(mac: &[u8]) -> bool {
    mac.first().is_some_and(|b| b & 1 == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vnet_header_round_trips() {
        let h = VnetHdr {
            flags: VNET_F_NEEDS_CSUM,
            gso_type: 1,
            hdr_len: 66,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        let mut b = [0u8; VNET_HDR_LEN];
        h.write(&mut b);
        assert_eq!(b, [1, 1, 66, 0, 0xa8, 0x05, 34, 0, 16, 0]);
        assert_eq!(VnetHdr::parse(&b), Some(h));
        assert_eq!(VnetHdr::parse(&b[..9]), None);
    }

    #[test]
    fn vlan_restored_with_offsets_shifted() {
        // headroom, vnet header, dst, src, ethertype IPv4, 4 payload bytes
        let mut buf = vec![0u8; HEADROOM];
        let h = VnetHdr {
            flags: VNET_F_NEEDS_CSUM,
            gso_type: 1,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        let mut hb = [0u8; VNET_HDR_LEN];
        h.write(&mut hb);
        buf.extend_from_slice(&hb);
        buf.extend_from_slice(&[1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0x08, 0x00, 9, 9, 9, 9]);
        let len = buf.len() - HEADROOM;
        let (s, l) = restore_vlan(&mut buf, HEADROOM, len, 0x8100, 42).unwrap();
        assert_eq!((s, l), (0, len + 4));
        let f = &buf[s + VNET_HDR_LEN..s + l];
        assert_eq!(
            f,
            &[
                1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0x81, 0x00, 0, 42, 0x08, 0x00, 9, 9, 9, 9
            ]
        );
        let h2 = VnetHdr::parse(&buf[s..]).unwrap();
        assert_eq!(h2.csum_start, 38);
        assert_eq!(h2.hdr_len, 58);
        assert_eq!(h2.gso_size, 1448);
        // the tag is what classify sees
        assert_eq!(l3_len(f), 4);
    }

    #[test]
    fn vlan_restore_refuses_without_headroom_or_short() {
        let mut buf = vec![0u8; 40];
        assert_eq!(restore_vlan(&mut buf, 0, 30, 0x8100, 1), None);
        assert_eq!(restore_vlan(&mut buf, 4, 12, 0x8100, 1), None);
        assert_eq!(restore_vlan(&mut buf, 4, 40, 0x8100, 1), None);
    }

    #[test]
    fn divert_rewrites_both_macs() {
        let mut f = vec![9u8; 20];
        assert!(divert_rewrite(&mut f, [2, 0, 0, 0, 0, 0xfe], 0x0102));
        assert_eq!(&f[..6], &[2, 0, 0, 0, 0, 0xfe]);
        assert_eq!(&f[6..12], &[0x02, 0xbd, 0, 0, 1, 2]);
        assert_eq!(&f[12..], &[9; 8]);
        let mut short = vec![0u8; 13];
        assert!(!divert_rewrite(&mut short, [0; 6], 1));
    }

    #[test]
    fn multicast_bit() {
        assert!(is_multicast(&[0xff; 6]));
        assert!(is_multicast(&[0x01, 0, 0x5e, 0, 0, 1]));
        assert!(!is_multicast(&[0x02, 0, 0, 0, 0, 1]));
        assert!(!is_multicast(&[]));
    }
}
