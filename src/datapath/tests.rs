use std::collections::HashSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::frame::{VNET_F_NEEDS_CSUM, tag_mac};
use proptest::prelude::*;

use super::*;
use crate::classify::FrameSpec;

fn policy(text: &str) -> Policy {
    crate::policy::test_policy(text)
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

fn run(p: &Policy, flows: &mut FlowTable<Pin>, f: &mut [u8], iif: &str) -> Verdict {
    let at = Ingress {
        iif: 0,
        iif_name: iif,
        from_local: false,
        local_mac: LOCAL,
        now: Instant::now(),
    };
    let down = HashSet::new();
    let dr = DrBuckets::new();
    let rules = Rules {
        policy: p,
        down: &down,
        seq: 0,
        dr: &dr,
        queue: None,
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

/// `decide` agrees with `classify` on forward packets, and names the rule whose exemptions
/// returned the packet (web's `except_src`) only for a packet that reached them.
#[test]
fn decide_agrees_with_classify_forward() {
    let p = policy(RULES);
    for (src, dport, iif, exempted) in [
        ("10.0.0.1", 80, "p1", None),
        ("10.0.0.5", 80, "p1", Some(0)),
        // web takes only from p1: its exemptions are not reached from p2
        ("10.0.0.5", 80, "p2", None),
        ("10.0.0.5", 23, "p1", None),
        ("10.0.0.1", 23, "p2", None),
        ("10.0.0.1", 443, "p1", None),
    ] {
        let f = frame(src, "192.0.2.1", 1234, dport);
        let info = classify::parse_frame(&f[VNET_HDR_LEN..]).unwrap();
        assert_eq!(
            decide(&p, iif, &info),
            (classify::classify(&p, iif, &info), exempted),
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
    let dr = DrBuckets::new();
    let up = Rules {
        policy: &p,
        down: &none,
        seq: 0,
        dr: &dr,
        queue: None,
    };
    assert!(matches!(
        up.decide("p1", &i80).decision,
        Decision::Divert { .. }
    ));
    let down: HashSet<String> = ["web".to_string(), "strict".to_string()].into();
    let dn = Rules {
        policy: &p,
        down: &down,
        ..up
    };
    assert_eq!(
        dn.decide("p1", &i80),
        Pin {
            unhealthy: Some(0),
            ..Decision::Bridge.into()
        }
    );
    assert_eq!(
        dn.decide("p1", &i81),
        Pin {
            unhealthy: Some(1),
            ..Decision::Drop { rule: 1 }.into()
        }
    );
}

/// A rule's frames and L3 bytes are counted as taken by its action, or as unhealthy when
/// its flow was decided while the target was down, and as exempted for the rule whose
/// exemptions returned the flow; a frame no rule took or exempted counts nowhere.
/// Counted under the policy that decided the flow, by rule name, and flushed once.
#[test]
fn rule_hits_count_frames_and_bytes_by_action_and_unhealthy() {
    let p = Arc::new(policy(RULES));
    let mut hits = RuleHits::default();
    hits.track(7, &p);
    let web = Decision::Divert {
        rule: 0,
        tag: p.rules[0].tag,
        action: p.rules[0].action,
    };
    hits.count(7, &web.into(), 60);
    hits.count(7, &web.into(), 1500);
    let bypassed = Pin {
        unhealthy: Some(0),
        ..Decision::Bridge.into()
    };
    hits.count(7, &bypassed, 40);
    // exempted from web, then dropped by nope
    let exempted_then_dropped = Pin {
        exempted: Some(0),
        ..Decision::Drop { rule: 1 }.into()
    };
    hits.count(7, &exempted_then_dropped, 52);
    hits.count(7, &Decision::Bridge.into(), 99);
    // a policy this thread does not know (older than it keeps): not counted
    hits.count(3, &web.into(), 1000);
    let shared = Mutex::new(HashMap::new());
    hits.flush(&shared);
    hits.flush(&shared);
    let m = shared.into_inner().unwrap();
    let count = |packets, bytes| Count { packets, bytes };
    assert_eq!(
        m["web"],
        RuleCounts {
            diverted: count(2, 1560),
            unhealthy: count(1, 40),
            exempted: count(1, 52),
        }
    );
    assert_eq!(
        m["nope"],
        RuleCounts {
            diverted: count(1, 52),
            ..RuleCounts::default()
        }
    );
    assert_eq!(m.len(), 2);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::fuzz::fuzz_cases(2000)))]

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

/// `dr` rules are no longer refused: starting gets as far as opening the ports.
#[test]
fn userspace_takes_dr_rules() {
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
            static_fdb: Vec::new(),
            threads: None,
            busy_poll_us: None,
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
        Err(DatapathError::Port { port, .. }) => assert_eq!(port, "no-such-port"),
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("a port that does not exist was opened"),
    }
}

const QUEUE_RULES: &str = r#"
[[divert]]
name = "web"
proto = "tcp"
dport = [80]
action = "redirect"
port = 3129
decide = "queue"
health = { connect = "127.0.0.1:3129" }
"#;

/// One classified frame through `process_frame` with a queue decider.
fn run_with(
    p: &Policy,
    rules_down: &HashSet<String>,
    dr: &DrBuckets,
    queue: Option<&InlineDecider>,
    flows: &mut FlowTable<Pin>,
    f: &mut [u8],
) -> Verdict {
    let at = Ingress {
        iif: 0,
        iif_name: "p1",
        from_local: false,
        local_mac: LOCAL,
        now: Instant::now(),
    };
    let rules = Rules {
        policy: p,
        down: rules_down,
        seq: 0,
        dr,
        queue,
    };
    process_frame(f, &at, &rules, flows).0
}

/// `decide = "queue"` inline: the PolicyDecider sees the first frame of each new flow only;
/// its verdict (divert, bypass, drop) is pinned for the flow's later frames, and list
/// changes affect new flows only.
#[test]
fn queue_rules_are_decided_inline_once_per_flow_and_pinned() {
    use crate::queue::{Fallback, HealthFlag, ListsHandle, MarkLayout, PolicyDecider};
    let p = policy(QUEUE_RULES);
    let layout = MarkLayout::default();
    let lists = ListsHandle::default();
    let health = HealthFlag::new(true);
    let d = PolicyDecider::new(layout, lists.clone()).with_rule(
        p.rules[0].tag,
        health.clone(),
        Fallback::Bypass,
    );
    let q = InlineDecider::new(Arc::new(d), layout);
    let (none, dr) = (HashSet::new(), DrBuckets::new());
    let mut flows = FlowTable::new(Duration::from_secs(60), 100);
    let go = |src: &str, sport: u16, flows: &mut FlowTable<Pin>| {
        let mut f = frame(src, "192.0.2.1", sport, 80);
        run_with(&p, &none, &dr, Some(&q), flows, &mut f)
    };
    // flow 1: diverted; its three later frames are not decided again
    for _ in 0..4 {
        assert_eq!(go("10.0.0.1", 1, &mut flows), Verdict::Divert);
    }
    assert_eq!(q.stats().totals().packets, 1);
    // deny: a new flow is dropped, flow 1 keeps its path
    lists.update(|l| l.deny.insert("10.0.0.1/32".parse().unwrap()));
    assert_eq!(go("10.0.0.1", 2, &mut flows), Verdict::Skip);
    assert_eq!(go("10.0.0.1", 1, &mut flows), Verdict::Divert);
    // the drop is pinned too: lifting the deny does not re-decide flow 2
    lists.store(Default::default());
    assert_eq!(go("10.0.0.1", 2, &mut flows), Verdict::Skip);
    // allow: bypassed (bridged untouched), pinned
    lists.update(|l| l.allow.insert("10.0.0.0/24".parse().unwrap()));
    let mut f = frame("10.0.0.1", "192.0.2.1", 3, 80);
    let before = f.clone();
    assert_eq!(
        run_with(&p, &none, &dr, Some(&q), &mut flows, &mut f),
        Verdict::Forward
    );
    assert_eq!(f, before, "a bypassed frame is not rewritten");
    lists.store(Default::default());
    assert_eq!(go("10.0.0.1", 3, &mut flows), Verdict::Forward);
    // health is the decider's: down -> on_unhealthy (bypass) for new flows
    health.set(false);
    assert_eq!(go("10.0.0.1", 4, &mut flows), Verdict::Forward);
    assert_eq!(go("10.0.0.1", 1, &mut flows), Verdict::Divert);
    let t = q.stats().totals();
    assert_eq!(
        (t.packets, t.divert, t.bypass, t.drop),
        (4, 1, 2, 1),
        "one decision per flow"
    );
    // no decider (datapath without the daemon): bridged undecided, as the kernel's bypass
    assert_eq!(
        run_with(
            &p,
            &none,
            &dr,
            None,
            &mut FlowTable::new(Duration::from_secs(60), 100),
            &mut frame("10.0.0.9", "192.0.2.1", 1, 80)
        ),
        Verdict::Forward
    );
}

const DR_RULES: &str = r#"
[[divert]]
name = "vip"
proto = "tcp"
dport = [80]
dst = ["192.0.2.80"]
action = "dr"
realservers = [{ mac = "02:00:00:00:00:31" }, { mac = "02:00:00:00:00:32" }]
"#;

/// `dr`: only the destination MAC changes (to the realserver of the flow's bucket), the
/// frame is bridged (`Verdict::Dr`), the choice is pinned per flow; a bucket change (health)
/// moves new flows only.
#[test]
fn dr_rewrites_the_destination_mac_and_pins_the_realserver() {
    let p = policy(DR_RULES);
    let rs1 = [2, 0, 0, 0, 0, 0x31];
    let rs2 = [2, 0, 0, 0, 0, 0x32];
    let none = HashSet::new();
    let all_up = {
        let mut m = DrBuckets::new();
        m.insert(
            "vip".into(),
            crate::dr::bucket_macs(&p.rules[0], &Default::default(), &Default::default()),
        );
        m
    };
    let rs2_down = {
        let mut m = DrBuckets::new();
        let down = [crate::dr::dr_check_key("vip", &p.rules[0].realservers[1])].into();
        m.insert(
            "vip".into(),
            crate::dr::bucket_macs(&p.rules[0], &Default::default(), &down),
        );
        m
    };
    let mut flows = FlowTable::new(Duration::from_secs(60), 1000);
    let dst_of = |sport: u16, dr: &DrBuckets, flows: &mut FlowTable<Pin>| {
        let mut f = frame("10.0.0.1", "192.0.2.80", sport, 80);
        let before = f.clone();
        let v = run_with(&p, &none, dr, None, flows, &mut f);
        assert_eq!(v, Verdict::Dr);
        assert_eq!(&f[..VNET_HDR_LEN], &before[..VNET_HDR_LEN]);
        assert_eq!(
            &f[VNET_HDR_LEN + 6..],
            &before[VNET_HDR_LEN + 6..],
            "only the destination MAC changes"
        );
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&f[VNET_HDR_LEN..VNET_HDR_LEN + 6]);
        mac
    };
    let first: Vec<[u8; 6]> = (0..40)
        .map(|i| dst_of(1000 + i, &all_up, &mut flows))
        .collect();
    assert!(first.contains(&rs1) && first.contains(&rs2), "spread");
    // rs2 goes down: pinned flows stay, new flows all go to rs1
    for (i, mac) in first.iter().enumerate() {
        assert_eq!(dst_of(1000 + i as u16, &rs2_down, &mut flows), *mac);
    }
    for i in 0..40 {
        assert_eq!(dst_of(2000 + i, &rs2_down, &mut flows), rs1);
    }
    // back up: flows opened during the outage stay on rs1, new ones spread again
    for i in 0..40 {
        assert_eq!(dst_of(2000 + i, &all_up, &mut flows), rs1);
    }
    let after: Vec<[u8; 6]> = (0..40)
        .map(|i| dst_of(3000 + i, &all_up, &mut flows))
        .collect();
    assert!(after.contains(&rs2));
    // no MAC known: bridged untouched
    let mut f = frame("10.0.0.1", "192.0.2.80", 9, 80);
    let before = f.clone();
    assert_eq!(
        run_with(&p, &none, &DrBuckets::new(), None, &mut flows, &mut f),
        Verdict::Forward
    );
    assert_eq!(f, before);
}

#[test]
fn options_from_settings() {
    let load = |extra: &str| {
        let text = format!(
            "[bridge]\nports = [\"eth0\", \"eth1\"]\ndatapath = \"userspace\"\n{extra}\
             static_fdb = [{{ mac = \"02:00:00:00:00:01\", port = \"eth1\" }}]\n"
        );
        Options::from_settings(&crate::settings::load_str(&text).expect("valid settings"))
    };
    let o = load("");
    assert_eq!((o.threads, o.spin), (0, DEFAULT_SPIN));
    assert_eq!(o.static_fdb, vec![([2, 0, 0, 0, 0, 1], "eth1".to_string())]);
    let o = load("threads = 1\nbusy_poll_us = 0\n");
    assert_eq!((o.threads, o.spin), (1, Duration::ZERO));
    let o = load("busy_poll_us = 50\n");
    assert_eq!(o.spin, Duration::from_micros(50));
}

#[test]
fn forwarding_threads_follow_ports_and_cpus() {
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
    assert_eq!(forwarding_threads(0, 3), 3.min(cpus));
    assert_eq!(forwarding_threads(0, 1), 1);
    assert_eq!(forwarding_threads(2, 3), 2);
    assert_eq!(forwarding_threads(8, 3), 3, "never more threads than ports");
}

#[test]
fn busy_polling_needs_traffic_on_two_ports() {
    use super::received_on_two_ports as two;
    assert!(!two([0, 0, 0], 0), "nothing received yet");
    assert!(!two([7, 0, 0], 1), "one port only: a one-way stream");
    assert!(two([7, 9, 0], 1), "two ports within the window");
    assert!(two([7, 0, 3], 1), "a port and the local port");
    assert!(!two([7, 9, 0], 7), "one of the two before the window");
}
