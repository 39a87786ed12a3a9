use std::net::IpAddr;

use proptest::prelude::*;

use super::*;

fn policy(text: &str) -> Policy {
    crate::policy::test_policy(text)
}

fn spec(src: &str, dst: &str, proto: u8, dport: u16) -> FrameSpec {
    FrameSpec {
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
        vlan: None,
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        l4proto: proto,
        sport: 40000,
        dport,
    }
}

fn info(s: &FrameSpec) -> PacketInfo {
    parse_frame(&s.to_bytes()).unwrap()
}

#[test]
fn parse_round_trips_v4_v6_vlan() {
    for mut s in [
        spec("10.0.0.1", "10.0.0.2", 6, 80),
        spec("fd00::1", "fd00::2", 17, 53),
    ] {
        let p = info(&s);
        assert_eq!((p.src, p.dst, p.l4proto), (s.src, s.dst, s.l4proto));
        assert_eq!(p.ports, Some((40000, s.dport)));
        // FrameSpec's TCP header is a SYN; UDP has no flags
        assert_eq!(p.tcp_flags, if s.l4proto == 6 { 0x02 } else { 0 });
        assert_eq!(p.vlan, None);
        s.vlan = Some(42);
        let p = info(&s);
        assert_eq!(p.vlan, Some(42));
        assert_eq!(p.ports, Some((40000, s.dport)));
    }
}

#[test]
fn parse_refuses_short_and_bad() {
    let f = spec("10.0.0.1", "10.0.0.2", 6, 80).to_bytes();
    assert_eq!(parse_frame(&f[..13]), Err(NotIp::Truncated));
    assert_eq!(parse_frame(&f[..20]), Err(NotIp::Truncated));
    let mut bad = f.clone();
    bad[14] = 0x41; // IHL 1
    assert_eq!(parse_frame(&bad), Err(NotIp::BadIpHeader));
    // truncated L4: IP but no ports
    let mut short = f.clone();
    short.truncate(14 + 20 + 2);
    short[16..18].copy_from_slice(&22u16.to_be_bytes());
    assert_eq!(parse_frame(&short).unwrap().ports, None);
    let mut arp = f;
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_eq!(parse_frame(&arp), Err(NotIp::OtherEthertype(0x0806)));
}

#[test]
fn non_first_fragment_has_no_ports() {
    let mut f = spec("10.0.0.1", "10.0.0.2", 6, 80).to_bytes();
    f[14 + 6] = 0x00;
    f[14 + 7] = 0x10; // fragment offset 16
    assert_eq!(parse_frame(&f).unwrap().ports, None);
}

#[test]
fn first_match_wins_with_exemptions() {
    let p = policy(
        "[[divert]]\nname = \"web\"\nproto = \"tcp\"\ndport = [80, \"8080-8090\"]\nexcept_src = \"10.0.0.5\"\n\
         action = \"redirect\"\nport = 3129\n\
         [[divert]]\nname = \"ssh\"\nproto = \"tcp\"\ndport = 22\naction = \"drop\"\n\
         [[divert]]\nname = \"all-web\"\nfrom = \"eth1\"\nproto = \"tcp\"\ndport = 80\naction = \"pass\"\n",
    );
    let d = |src: &str, dport: u16, iif: &str| {
        classify(&p, iif, &info(&spec(src, "192.0.2.1", 6, dport)))
    };
    assert!(matches!(
        d("10.0.0.1", 80, "eth1"),
        Decision::Divert {
            rule: 0,
            tag: 1,
            ..
        }
    ));
    assert!(matches!(
        d("10.0.0.1", 8085, "eth0"),
        Decision::Divert { rule: 0, .. }
    ));
    // the exemption skips only "web": the next rule still sees the packet
    assert_eq!(d("10.0.0.5", 80, "eth1"), Decision::Pass { rule: 2 });
    assert_eq!(d("10.0.0.5", 80, "eth0"), Decision::Bridge);
    assert_eq!(d("10.0.0.1", 22, "eth0"), Decision::Drop { rule: 1 });
    assert_eq!(d("10.0.0.1", 443, "eth0"), Decision::Bridge);
    // udp/80 is not tcp/80
    assert_eq!(
        classify(&p, "eth1", &info(&spec("10.0.0.1", "192.0.2.1", 17, 80))),
        Decision::Bridge
    );
}

#[test]
fn families_and_prefixes() {
    let p = policy(
        "[[divert]]\nname = \"t6\"\nproto = \"tcp\"\ndport = 80\naction = \"tproxy\"\naddress = \"::1\"\nport = 3130\n\
         [[divert]]\nname = \"vip\"\ndst = [\"10.0.0.100\", \"2001:db8::/64\"]\nsrc_mac = \"02:00:00:00:00:01\"\naction = \"local\"\n",
    );
    let c = |s: FrameSpec| classify(&p, "eth0", &info(&s));
    // the IPv6 tproxy rule does not take IPv4
    assert_eq!(c(spec("10.0.0.1", "10.0.0.9", 6, 80)), Decision::Bridge);
    assert!(matches!(
        c(spec("fd00::1", "fd00::2", 6, 80)),
        Decision::Divert { rule: 0, .. }
    ));
    // proto-less VIP rule: any protocol, by destination and source MAC
    assert!(matches!(
        c(spec("10.0.0.1", "10.0.0.100", 1, 0)),
        Decision::Divert { rule: 1, .. }
    ));
    assert!(matches!(
        c(spec("fd00::1", "2001:db8::7", 17, 9)),
        Decision::Divert { rule: 1, .. }
    ));
    let mut other_mac = spec("10.0.0.1", "10.0.0.100", 6, 443);
    other_mac.src_mac = [2, 0, 0, 0, 0, 9];
    assert_eq!(c(other_mac), Decision::Bridge);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::fuzz::fuzz_cases(20_000)))]

    /// Arbitrary bytes never panic the parser or the classifier.
    #[test]
    fn arbitrary_frames_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let p = policy("[[divert]]\nname = \"w\"\nproto = \"tcp\"\ndport = 80\nsrc = \"10.0.0.0/8\"\naction = \"local\"\n");
        if let Ok(info) = parse_frame(&bytes) {
            let _ = classify(&p, "eth0", &info);
        }
    }

    /// Mutations of a valid frame (the interesting neighbourhood) never panic either, and a
    /// parsed frame's fields come from inside the buffer.
    #[test]
    fn mutated_frames_never_panic(
        v6 in any::<bool>(), vlan in any::<bool>(),
        flips in proptest::collection::vec((0usize..80, any::<u8>()), 0..6),
        cut in 0usize..100,
    ) {
        let mut s = if v6 { spec("fd00::1", "fd00::2", 6, 80) } else { spec("10.0.0.1", "10.0.0.2", 6, 80) };
        if vlan { s.vlan = Some(7); }
        let mut f = s.to_bytes();
        for (i, b) in flips { if i < f.len() { f[i] = b; } }
        f.truncate(cut.min(f.len()));
        let _ = parse_frame(&f);
    }
}

#[test]
fn ip_helpers() {
    let p = info(&spec("10.0.0.1", "10.0.0.2", 6, 80));
    assert_eq!(p.family(), Family::V4);
    assert!(matches!(p.src, IpAddr::V4(_)));
}

#[test]
fn vlan_rules_take_their_tags_and_others_only_untagged_frames() {
    let p = policy(
        "[[divert]]\nname = \"v\"\nvlan = [10, 30]\nproto = \"tcp\"\ndport = 22\naction = \"drop\"\n\
         [[divert]]\nname = \"u\"\nproto = \"tcp\"\ndport = 22\naction = \"pass\"\n",
    );
    let c = |vlan: Option<u16>| {
        let mut s = spec("10.0.0.1", "10.0.0.2", 6, 22);
        s.vlan = vlan;
        classify(&p, "eth0", &info(&s))
    };
    assert_eq!(c(Some(10)), Decision::Drop { rule: 0 });
    assert_eq!(c(Some(30)), Decision::Drop { rule: 0 });
    assert_eq!(c(None), Decision::Pass { rule: 1 });
    // a VLAN no rule names: bridged untouched
    assert_eq!(c(Some(20)), Decision::Bridge);
}

/// TCP flags are read only where the header has them: a header cut after the ports has
/// ports but no flags.
#[test]
fn tcp_flags_only_from_a_header_that_has_them() {
    let mut f = spec("10.0.0.1", "10.0.0.2", 6, 80).to_bytes();
    let p = parse_frame(&f).unwrap();
    assert_eq!(p.tcp_flags, 0x02);
    // cut the TCP header to 13 bytes (flags at offset 13) and fix the IP total length
    f.truncate(14 + 20 + 13);
    f[16..18].copy_from_slice(&(20u16 + 13).to_be_bytes());
    let p = parse_frame(&f).unwrap();
    assert_eq!((p.ports, p.tcp_flags), (Some((40000, 80)), 0));
}
