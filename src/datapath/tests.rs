use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use super::frame::{VNET_F_NEEDS_CSUM, tag_mac};
use proptest::prelude::*;

use super::*;
use crate::classify::FrameSpec;
use crate::policy::Context;
use crate::rules;

fn policy(text: &str) -> Policy {
    let f = rules::parse(Path::new("r.toml"), text.into()).unwrap();
    Policy::build(
        &[f],
        &Context {
            ports: None,
            mark_mask: 0x00ff_0000,
        },
    )
    .unwrap()
}

const LOCAL: [u8; 6] = [2, 0, 0, 0, 0, 0xfe];

fn frame(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    let spec = FrameSpec {
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
        vlan: None,
        src: src.parse::<IpAddr>().unwrap(),
        dst: dst.parse::<IpAddr>().unwrap(),
        l4proto: 6,
        sport,
        dport,
    };
    let mut b = vec![0u8; VNET_HDR_LEN];
    // a checksum-partial frame: the header must come through untouched
    VnetHdr {
        flags: VNET_F_NEEDS_CSUM,
        gso_type: 0,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 34,
        csum_offset: 16,
    }
    .write(&mut b);
    b.extend(spec.to_bytes());
    b
}

const RULES: &str = r#"
[[divert]]
name = "web"
from = ["p1"]
proto = "tcp"
dport = [80]
except_src = ["10.0.0.5"]
action = "redirect"
port = 3129

[[divert]]
name = "nope"
proto = "tcp"
dport = [23]
action = "drop"
"#;

fn run(p: &Policy, flows: &mut FlowTable, f: &mut [u8], iif: &str) -> Verdict {
    let at = Ingress {
        iif: 0,
        iif_name: iif,
        from_local: false,
        local_mac: LOCAL,
        now: Instant::now(),
    };
    let down = HashSet::new();
    let rules = Rules {
        policy: p,
        down: &down,
        seq: 0,
    };
    process_frame(f, &at, &rules, flows).0
}

#[test]
fn divert_rewrites_and_keeps_vnet_header() {
    let p = policy(RULES);
    let mut flows = FlowTable::new(Duration::from_secs(60), 100);
    let mut f = frame("10.0.0.1", "192.0.2.1", 40000, 80);
    let before = f.clone();
    assert_eq!(run(&p, &mut flows, &mut f, "p1"), Verdict::Divert);
    assert_eq!(&f[..VNET_HDR_LEN], &before[..VNET_HDR_LEN]);
    assert_eq!(&f[VNET_HDR_LEN..VNET_HDR_LEN + 6], &LOCAL);
    assert_eq!(
        &f[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12],
        &tag_mac(p.rules[0].tag)
    );
    assert_eq!(&f[VNET_HDR_LEN + 12..], &before[VNET_HDR_LEN + 12..]);
}

#[test]
fn exemptions_ports_and_drops() {
    let p = policy(RULES);
    let mut flows = FlowTable::new(Duration::from_secs(60), 100);
    let mut f = frame("10.0.0.5", "192.0.2.1", 40000, 80);
    assert_eq!(run(&p, &mut flows, &mut f, "p1"), Verdict::Forward);
    let mut f = frame("10.0.0.1", "192.0.2.1", 40000, 80);
    assert_eq!(run(&p, &mut flows, &mut f, "p2"), Verdict::Forward, "from");
    let mut f = frame("10.0.0.1", "192.0.2.1", 40001, 23);
    assert_eq!(run(&p, &mut flows, &mut f, "p2"), Verdict::Skip);
    // non-IP frames are bridged
    let mut arp = vec![0u8; VNET_HDR_LEN];
    arp.extend_from_slice(&[0xff; 6]);
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[0; 28]);
    assert_eq!(run(&p, &mut flows, &mut arp, "p1"), Verdict::Forward);
    // garbage does not panic
    let mut junk = vec![0xffu8; 5];
    assert_eq!(run(&p, &mut flows, &mut junk, "p1"), Verdict::Skip);
}

#[test]
fn link_local_groups_but_bpdus_stay() {
    let p = policy(RULES);
    let mut flows = FlowTable::new(Duration::from_secs(60), 100);
    let mut bpdu = vec![0u8; VNET_HDR_LEN];
    bpdu.extend_from_slice(&[0x01, 0x80, 0xc2, 0, 0, 0, 2, 0, 0, 0, 0, 1, 0, 38]);
    bpdu.extend_from_slice(&[0x42; 38]);
    assert_eq!(run(&p, &mut flows, &mut bpdu, "p1"), Verdict::Forward);
    let mut lacp = bpdu.clone();
    lacp[VNET_HDR_LEN + 5] = 0x02;
    assert_eq!(run(&p, &mut flows, &mut lacp, "p1"), Verdict::Skip);
}

#[test]
fn flows_keep_their_path_across_a_swap() {
    let old = policy(RULES);
    let new = policy("");
    let mut flows = FlowTable::new(Duration::from_secs(60), 100);
    let mut f = frame("10.0.0.1", "192.0.2.1", 40000, 80);
    assert_eq!(run(&old, &mut flows, &mut f, "p1"), Verdict::Divert);
    let mut f = frame("10.0.0.1", "192.0.2.1", 40000, 80);
    assert_eq!(
        run(&new, &mut flows, &mut f, "p1"),
        Verdict::Divert,
        "established"
    );
    let mut f = frame("10.0.0.1", "192.0.2.1", 40002, 80);
    assert_eq!(
        run(&new, &mut flows, &mut f, "p1"),
        Verdict::Forward,
        "new flow"
    );
}

#[test]
fn tproxy_replies_are_diverted() {
    let p = policy(
        r#"
[[divert]]
name = "tp"
from = ["p1"]
proto = "tcp"
dport = [80]
dst = ["192.0.2.0/24"]
except_src = ["10.0.0.5"]
action = "tproxy"
port = 3129
"#,
    );
    let mut flows = FlowTable::new(Duration::from_secs(60), 100);
    // origin's reply, arriving on the uplink
    let mut f = frame("192.0.2.1", "10.0.0.1", 80, 40000);
    assert_eq!(run(&p, &mut flows, &mut f, "p2"), Verdict::Divert);
    // not from the client side
    let mut f = frame("192.0.2.1", "10.0.0.1", 80, 40001);
    assert_eq!(run(&p, &mut flows, &mut f, "p1"), Verdict::Forward);
    // exempt client
    let mut f = frame("192.0.2.1", "10.0.0.5", 80, 40000);
    assert_eq!(run(&p, &mut flows, &mut f, "p2"), Verdict::Forward);
    // other origin
    let mut f = frame("198.51.100.1", "10.0.0.1", 80, 40000);
    assert_eq!(run(&p, &mut flows, &mut f, "p2"), Verdict::Forward);
}

#[test]
fn decide_agrees_with_classify_forward() {
    let p = policy(RULES);
    for (src, dport, iif) in [
        ("10.0.0.1", 80, "p1"),
        ("10.0.0.5", 80, "p1"),
        ("10.0.0.1", 23, "p2"),
        ("10.0.0.1", 443, "p1"),
    ] {
        let f = frame(src, "192.0.2.1", 1234, dport);
        let info = classify::parse_frame(&f[VNET_HDR_LEN..]).unwrap();
        assert_eq!(
            decide(&p, iif, &info),
            classify::classify(&p, iif, &info),
            "{src} {dport} {iif}"
        );
    }
}

#[test]
fn unhealthy_rules_bypass_or_drop() {
    let p = policy(
        r#"
[[divert]]
name = "web"
proto = "tcp"
dport = [80]
action = "redirect"
port = 3129
health = { connect = "127.0.0.1:3129" }

[[divert]]
name = "strict"
proto = "tcp"
dport = [81]
action = "redirect"
port = 3129
health = { connect = "127.0.0.1:3129" }
on_unhealthy = "drop"
"#,
    );
    let f80 = frame("10.0.0.1", "192.0.2.1", 1, 80);
    let f81 = frame("10.0.0.1", "192.0.2.1", 1, 81);
    let i80 = classify::parse_frame(&f80[VNET_HDR_LEN..]).unwrap();
    let i81 = classify::parse_frame(&f81[VNET_HDR_LEN..]).unwrap();
    let none = HashSet::new();
    let up = Rules {
        policy: &p,
        down: &none,
        seq: 0,
    };
    assert!(matches!(up.decide("p1", &i80), Decision::Divert { .. }));
    let down: HashSet<String> = ["web".to_string(), "strict".to_string()].into();
    let dn = Rules {
        policy: &p,
        down: &down,
        seq: 0,
    };
    assert_eq!(dn.decide("p1", &i80), Decision::Bridge);
    assert_eq!(dn.decide("p1", &i81), Decision::Drop { rule: 1 });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Arbitrary bytes as a received frame (vnet header + Ethernet): no panic, and a
    /// diverted frame only ever has its MAC addresses changed.
    #[test]
    fn arbitrary_frames_do_not_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let p = policy(RULES);
        let mut flows = FlowTable::new(Duration::from_secs(60), 100);
        let mut f = bytes.clone();
        let v = run(&p, &mut flows, &mut f, "p1");
        if v == Verdict::Divert {
            prop_assert_eq!(&f[..VNET_HDR_LEN], &bytes[..VNET_HDR_LEN]);
            prop_assert_eq!(&f[VNET_HDR_LEN + 12..], &bytes[VNET_HDR_LEN + 12..]);
        } else {
            prop_assert_eq!(f, bytes);
        }
    }

    #[test]
    fn vlan_restore_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..80),
        start in 0usize..90,
        len in 0usize..90,
        tci in any::<u16>(),
    ) {
        let mut b = bytes;
        let _ = frame::restore_vlan(&mut b, start, len, 0x8100, tci);
    }
}

/// Divert keeps GSO frames intact: the vnet header is not touched, only the MACs.
#[test]
fn divert_keeps_gso_header() {
    let p = policy(RULES);
    let mut flows = FlowTable::new(Duration::from_secs(60), 100);
    let mut f = frame("10.0.0.1", "192.0.2.1", 40000, 80);
    let gso = VnetHdr {
        flags: VNET_F_NEEDS_CSUM,
        gso_type: 1,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
    };
    gso.write(&mut f);
    assert_eq!(run(&p, &mut flows, &mut f, "p1"), Verdict::Divert);
    assert_eq!(VnetHdr::parse(&f), Some(gso));
}

fn arp(sender: [u8; 4], target: [u8; 4], vlan: bool) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&[2, 0, 0, 0, 0, 9]);
    if vlan {
        f.extend_from_slice(&[0x81, 0x00, 0, 7]);
    }
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&[2, 0, 0, 0, 0, 9]);
    f.extend_from_slice(&sender);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f
}

#[test]
fn arp_shield_keeps_vip_arp_off_the_bridge() {
    let p = policy(
        r#"
[[divert]]
name = "vip"
dst = ["10.77.0.100"]
action = "local"
arp_shield = true
"#,
    );
    let mut flows = FlowTable::new(Duration::from_secs(60), 100);
    let vip = [10, 77, 0, 100];
    let router = [10, 77, 0, 1];
    // the router asks for the VIP: only the bridge host hears it
    for vlan in [false, true] {
        let mut f = arp(router, vip, vlan);
        assert_eq!(
            run(&p, &mut flows, &mut f, "p1"),
            Verdict::Local,
            "vlan {vlan}"
        );
    }
    // a realserver answering / announcing the VIP: dropped
    let mut f = arp(vip, router, false);
    let op = f.len() - 21;
    f[op] = 2;
    assert_eq!(run(&p, &mut flows, &mut f, "p2"), Verdict::Skip);
    let mut f = arp(vip, vip, false);
    assert_eq!(run(&p, &mut flows, &mut f, "p2"), Verdict::Skip);
    // a realserver resolving the router from the VIP: bridged as a probe (sender 0.0.0.0)
    let mut f = arp(vip, router, false);
    assert_eq!(run(&p, &mut flows, &mut f, "p2"), Verdict::Forward);
    let spa = f.len() - 14;
    assert_eq!(f[spa..spa + 4], [0, 0, 0, 0]);
    // other ARP is bridged
    let mut f = arp(router, [10, 77, 0, 2], false);
    assert_eq!(run(&p, &mut flows, &mut f, "p1"), Verdict::Forward);
    // without arp_shield, VIP ARP is bridged as usual
    let plain = policy(
        r#"
[[divert]]
name = "vip"
dst = ["10.77.0.100"]
action = "local"
"#,
    );
    let mut f = arp(router, vip, false);
    assert_eq!(run(&plain, &mut flows, &mut f, "p1"), Verdict::Forward);
}

fn nd(icmp_type: u8, target: &str) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0x33, 0x33, 0xff, 0, 1, 0]);
    f.extend_from_slice(&[2, 0, 0, 0, 0, 9, 0x86, 0xdd]);
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 24, 58, 255]);
    f.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&[0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 1, 0]);
    f.extend_from_slice(&[icmp_type, 0, 0, 0, 0, 0, 0, 0]);
    let t: std::net::Ipv6Addr = target.parse().expect("address");
    f.extend_from_slice(&t.octets());
    f
}

#[test]
fn nd_shield_keeps_vip_nd_off_the_bridge() {
    let p = policy(
        r#"
[[divert]]
name = "vip"
dst = ["fd77::100"]
action = "local"
arp_shield = true
"#,
    );
    let mut flows = FlowTable::new(Duration::from_secs(60), 100);
    // NS for the VIP: the bridge host only; NA about it from a port: dropped
    let mut f = nd(135, "fd77::100");
    assert_eq!(run(&p, &mut flows, &mut f, "p1"), Verdict::Local);
    let mut f = nd(136, "fd77::100");
    assert_eq!(run(&p, &mut flows, &mut f, "p2"), Verdict::Skip);
    // ND about other addresses: not the shield's business
    let mut f = nd(135, "fd77::2");
    assert_ne!(run(&p, &mut flows, &mut f, "p1"), Verdict::Local);
    let mut f = nd(136, "fd77::2");
    assert_ne!(run(&p, &mut flows, &mut f, "p1"), Verdict::Skip);
}

/// `action = "dr"` is kernel datapath only: the userspace datapath refuses to start with it
/// (before opening any port) instead of diverting those flows to the local stack.
#[test]
fn userspace_refuses_dr() {
    use crate::settings::{BridgeSettings, Datapath as Kind, Settings};
    let p = policy(
        "[[divert]]\nname = \"vip\"\nproto = \"tcp\"\ndst = \"10.0.0.80\"\naction = \"dr\"\n\
         realservers = [{ mac = \"02:00:00:00:00:31\" }]\n",
    );
    let settings = Settings {
        rules: Vec::new(),
        bridge: BridgeSettings {
            name: "no-such-tap".into(),
            ports: vec!["no-such-port".into()],
            datapath: Kind::Userspace,
            address: Vec::new(),
        },
        queue: Default::default(),
        control: Default::default(),
        metrics: Default::default(),
        daemon: Default::default(),
        kernel: Default::default(),
        base_dir: std::path::PathBuf::new(),
        path: std::path::PathBuf::new(),
    };
    match Datapath::start(&settings, std::sync::Arc::new(p)) {
        Err(DatapathError::KernelOnly { rule }) => assert_eq!(rule, "vip"),
        Err(e) => panic!("wrong refusal: {e}"),
        Ok(_) => panic!("the userspace datapath started with a dr rule"),
    }
}
