//! rtnetlink link setup against the real kernel, each test in its own network namespace.
//! Needs root; skipped (with a message) otherwise.

#[path = "common/netns_link.rs"]
mod netns_link;

use std::path::{Path, PathBuf};

use brdivert::link::{self, LinkError};
use brdivert::settings::{BridgeSettings, Datapath, KernelSettings, Settings};
use netns_link::{Netns, root_or_skip};

const NF4: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";
const NF6: &str = "/proc/sys/net/bridge/bridge-nf-call-ip6tables";

fn settings(name: &str, ports: &[&str], addrs: &[&str]) -> Settings {
    Settings {
        rules: vec![],
        bridge: BridgeSettings {
            name: name.into(),
            ports: ports.iter().map(|s| s.to_string()).collect(),
            datapath: Datapath::Kernel,
            address: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            static_fdb: Vec::new(),
            threads: None,
            busy_poll_us: None,
        },
        queue: Default::default(),
        control: Default::default(),
        metrics: Default::default(),
        kernel: KernelSettings {
            // keep the host-wide default out of the way of other tests
            keep_br_netfilter: true,
            ..Default::default()
        },
        daemon: Default::default(),
        base_dir: PathBuf::from("/etc/brdivert"),
        path: PathBuf::from("/etc/brdivert/brdivert.toml"),
    }
}

/// A namespace with veth pairs a0–a1 and b0–b1.
fn ns_with_ports() -> Netns {
    let ns = Netns::new();
    ns.veth("a0", "a1");
    ns.veth("b0", "b1");
    ns
}

fn master_of(ns: &Netns, dev: &str) -> Option<String> {
    let out = ns.ip(&format!("-o link show dev {dev}"));
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w == "master" {
            return words.next().map(str::to_string);
        }
    }
    None
}

fn has_flag_up(ns: &Netns, dev: &str) -> bool {
    let out = ns.ip(&format!("-o link show dev {dev}"));
    out.split(['<', '>'])
        .nth(1)
        .is_some_and(|flags| flags.split(',').any(|f| f == "UP"))
}

fn link_present(ns: &Netns, dev: &str) -> bool {
    ns.ip("-o link show").lines().any(|l| {
        l.split(':')
            .nth(1)
            .map(|n| n.trim().split('@').next() == Some(dev))
            .unwrap_or(false)
    })
}

fn addrs_of(ns: &Netns, dev: &str) -> Vec<String> {
    ns.ip(&format!("-o addr show dev {dev}"))
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.find(|x| *x == "inet" || *x == "inet6")?;
            w.next().map(str::to_string)
        })
        .collect()
}

fn state_path(dir: &Path, bridge: &str) -> PathBuf {
    dir.join(format!("state-{bridge}.json"))
}

#[test]
fn setup_creates_bridge_enslaves_ports_adds_addresses_and_is_idempotent() {
    if !root_or_skip("setup_creates_bridge") {
        return;
    }
    let ns = ns_with_ports();
    let dir = tempfile::tempdir().unwrap();
    let s = settings("brt0", &["a0", "b0"], &["10.9.0.1/24", "fd00:9::1/64"]);

    let info = ns.run(|| link::setup_at_blocking(&s, dir.path())).unwrap();
    assert!(info.created);
    assert_eq!(master_of(&ns, "a0").as_deref(), Some("brt0"));
    assert_eq!(master_of(&ns, "b0").as_deref(), Some("brt0"));
    assert!(has_flag_up(&ns, "a0") && has_flag_up(&ns, "b0") && has_flag_up(&ns, "brt0"));
    let addrs = addrs_of(&ns, "brt0");
    assert!(addrs.contains(&"10.9.0.1/24".to_string()), "{addrs:?}");
    assert!(addrs.contains(&"fd00:9::1/64".to_string()), "{addrs:?}");
    let detail = ns.ip("-d link show dev brt0");
    assert!(detail.contains("stp_state 0"), "{detail}");
    assert!(detail.contains("forward_delay 0"), "{detail}");
    // IPv6 added nodad: not tentative
    let v6 = ns.ip("-6 -o addr show dev brt0");
    let ours = v6
        .lines()
        .find(|l| l.contains("fd00:9::1/64"))
        .unwrap_or("");
    assert!(
        ours.contains("nodad") && !ours.contains("tentative"),
        "{v6}"
    );
    // MAC and index agree with the kernel
    let mac = info
        .mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    assert!(ns.ip("link show dev brt0").contains(&mac));
    let mac2 = ns.run(|| link::bridge_mac_blocking("brt0")).unwrap();
    assert_eq!(mac2, info.mac);
    assert!(ns.run(|| link::link_exists_blocking("brt0")));
    assert!(!ns.run(|| link::link_exists_blocking("nonesuch0")));
    assert_eq!(
        ns.run(|| link::bridge_ports_blocking("brt0")).unwrap(),
        vec!["a0".to_string(), "b0".to_string()]
    );
    let state1 = std::fs::read_to_string(state_path(dir.path(), "brt0")).unwrap();
    assert!(state1.contains("\"created_bridge\": true"), "{state1}");

    // Twice: nothing changes.
    let info2 = ns.run(|| link::setup_at_blocking(&s, dir.path())).unwrap();
    assert_eq!(info2, info);
    assert_eq!(addrs_of(&ns, "brt0"), addrs);
    let state2 = std::fs::read_to_string(state_path(dir.path(), "brt0")).unwrap();
    assert_eq!(state1, state2);

    // Teardown: the bridge goes, ports are free, state file gone.
    ns.run(|| link::teardown_at_blocking(&s, dir.path()))
        .unwrap();
    assert!(!link_present(&ns, "brt0"));
    assert_eq!(master_of(&ns, "a0"), None);
    assert_eq!(master_of(&ns, "b0"), None);
    assert!(!state_path(dir.path(), "brt0").exists());
    // And again: nothing to undo.
    ns.run(|| link::teardown_at_blocking(&s, dir.path()))
        .unwrap();
}

#[test]
fn missing_ports_named_in_one_error() {
    if !root_or_skip("missing_ports_named_in_one_error") {
        return;
    }
    let ns = ns_with_ports();
    let dir = tempfile::tempdir().unwrap();
    let s = settings("brt0", &["a0", "nope1", "nope2"], &[]);
    let err = ns
        .run(|| link::setup_at_blocking(&s, dir.path()))
        .unwrap_err();
    assert!(matches!(err, LinkError::MissingPorts { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("nope1") && msg.contains("nope2"), "{msg}");
    assert!(!msg.contains("\"a0\""), "{msg}");
    assert!(msg.contains("/etc/brdivert/brdivert.toml"), "{msg}");
    // Nothing was touched.
    assert!(!link_present(&ns, "brt0"));
    assert!(!state_path(dir.path(), "brt0").exists());
}

#[test]
fn existing_non_bridge_device_refused() {
    if !root_or_skip("existing_non_bridge_device_refused") {
        return;
    }
    let ns = ns_with_ports();
    // a veth (dummy needs a module CI may lack)
    ns.ip("link add brt0 type veth peer name brt0p");
    let dir = tempfile::tempdir().unwrap();
    let s = settings("brt0", &["a0", "b0"], &[]);
    let err = ns
        .run(|| link::setup_at_blocking(&s, dir.path()))
        .unwrap_err();
    assert!(matches!(err, LinkError::NotABridge { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("brt0") && msg.contains("veth"), "{msg}");
    assert_eq!(master_of(&ns, "a0"), None);
}

#[test]
fn port_enslaved_to_another_master_refused() {
    if !root_or_skip("port_enslaved_to_another_master_refused") {
        return;
    }
    let ns = ns_with_ports();
    ns.ip("link add other0 type bridge");
    ns.ip("link set a0 master other0");
    let dir = tempfile::tempdir().unwrap();
    let s = settings("brt0", &["a0", "b0"], &[]);
    let err = ns
        .run(|| link::setup_at_blocking(&s, dir.path()))
        .unwrap_err();
    assert!(
        matches!(err, LinkError::PortEnslavedElsewhere { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("a0") && msg.contains("other0"), "{msg}");
    assert_eq!(master_of(&ns, "a0").as_deref(), Some("other0"));
    // Whatever setup did before refusing is recorded and undone by teardown.
    ns.run(|| link::teardown_at_blocking(&s, dir.path()))
        .unwrap();
    assert!(!link_present(&ns, "brt0"));
    assert_eq!(master_of(&ns, "a0").as_deref(), Some("other0"));
}

#[test]
fn teardown_keeps_preexisting_bridge_port_and_address() {
    if !root_or_skip("teardown_keeps_preexisting_bridge_port_and_address") {
        return;
    }
    let ns = ns_with_ports();
    ns.ip("link add brt0 type bridge");
    ns.ip("link set a0 master brt0");
    ns.ip("addr add 10.8.0.1/24 dev brt0");
    let dir = tempfile::tempdir().unwrap();
    let s = settings("brt0", &["a0", "b0"], &["10.8.0.1/24", "10.8.0.2/24"]);

    let info = ns.run(|| link::setup_at_blocking(&s, dir.path())).unwrap();
    assert!(!info.created);
    assert_eq!(master_of(&ns, "b0").as_deref(), Some("brt0"));
    let addrs = addrs_of(&ns, "brt0");
    assert!(addrs.contains(&"10.8.0.2/24".to_string()), "{addrs:?}");
    assert!(has_flag_up(&ns, "brt0"));

    ns.run(|| link::teardown_at_blocking(&s, dir.path()))
        .unwrap();
    assert!(link_present(&ns, "brt0"), "operator's bridge must survive");
    assert_eq!(master_of(&ns, "a0").as_deref(), Some("brt0"));
    assert_eq!(master_of(&ns, "b0"), None);
    let addrs = addrs_of(&ns, "brt0");
    assert!(addrs.contains(&"10.8.0.1/24".to_string()), "{addrs:?}");
    assert!(!addrs.contains(&"10.8.0.2/24".to_string()), "{addrs:?}");
    assert!(!state_path(dir.path(), "brt0").exists());
}

#[test]
fn tproxy_routing_added_idempotently_and_removed_exactly() {
    if !root_or_skip("tproxy_routing_added_idempotently_and_removed_exactly") {
        return;
    }
    let ns = Netns::new();
    // Something of the operator's in the same table: must survive.
    ns.ip("route add local default dev lo table 3129");
    ns.ip("rule add fwmark 0x1 lookup 3129 priority 100");
    let dir = tempfile::tempdir().unwrap();
    let kernel = KernelSettings::default();
    let (mark, mask) = (0x0001_0000, 0x00ff_0000);

    for _ in 0..2 {
        ns.run(|| link::setup_tproxy_routing_at_blocking(&kernel, mark, mask, dir.path()))
            .unwrap();
    }
    let want_rule = "3129:\tfrom all fwmark 0x10000/0xff0000 lookup 3129";
    for fam in ["-4", "-6"] {
        let rules = ns.ip(&format!("{fam} rule show"));
        assert_eq!(rules.matches(want_rule).count(), 1, "{fam}: {rules}");
        let routes = ns.ip(&format!("{fam} route show table 3129"));
        assert!(routes.contains("local default dev lo"), "{fam}: {routes}");
        assert_eq!(routes.lines().count(), 1, "{fam}: {routes}");
    }

    ns.run(|| link::teardown_tproxy_routing_at_blocking(&kernel, dir.path()))
        .unwrap();
    for fam in ["-4", "-6"] {
        let rules = ns.ip(&format!("{fam} rule show"));
        assert!(!rules.contains("0x10000/0xff0000"), "{fam}: {rules}");
    }
    assert!(ns.ip("-4 rule show").contains("fwmark 0x1 lookup 3129"));
    // the operator's IPv4 route stays, ours (IPv6) is gone
    assert!(
        ns.ip("-4 route show table 3129")
            .contains("local default dev lo")
    );
    assert_eq!(ns.ip("-6 route show table 3129").trim(), "");
    assert!(!dir.path().join("tproxy-3129.json").exists());
}

#[test]
fn tproxy_routing_follows_a_new_mark_and_teardown_removes_it() {
    if !root_or_skip("tproxy_routing_follows_a_new_mark") {
        return;
    }
    let ns = ns_with_ports();
    let dir = tempfile::tempdir().unwrap();
    let s = settings("brt0", &["a0", "b0"], &[]);
    let kernel = KernelSettings {
        route_table: 200,
        rule_priority: 90,
        ..Default::default()
    };
    ns.run(|| link::setup_tproxy_routing_at_blocking(&kernel, 0x100, 0xf00, dir.path()))
        .unwrap();
    ns.run(|| link::setup_tproxy_routing_at_blocking(&kernel, 0x200, 0xf00, dir.path()))
        .unwrap();
    let rules = ns.ip("rule show");
    assert!(!rules.contains("0x100/0xf00"), "{rules}");
    assert!(
        rules.contains("90:\tfrom all fwmark 0x200/0xf00 lookup 200"),
        "{rules}"
    );

    // teardown(settings) removes routing too (here: its table from settings.kernel)
    let s = Settings { kernel, ..s };
    ns.run(|| link::setup_at_blocking(&s, dir.path())).unwrap();
    ns.run(|| link::teardown_at_blocking(&s, dir.path()))
        .unwrap();
    assert!(!ns.ip("rule show").contains("lookup 200"));
    assert!(!ns.ip("-6 rule show").contains("lookup 200"));
    assert_eq!(ns.ip("route show table 200").trim(), "");
    assert!(!link_present(&ns, "brt0"));
}

#[test]
fn br_netfilter_turned_off_and_restored() {
    if !root_or_skip("br_netfilter_turned_off_and_restored") {
        return;
    }
    let ns = ns_with_ports();
    let present = ns.run(|| Path::new(NF4).exists());
    if !present {
        eprintln!(
            "SKIP br_netfilter_turned_off_and_restored: br_netfilter is not loaded \
             (modprobe br_netfilter to run it)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings("brt0", &["a0", "b0"], &[]);
    s.kernel.keep_br_netfilter = false;
    let read = |p: &str| std::fs::read_to_string(p).unwrap().trim().to_string();

    ns.run(|| {
        std::fs::write(NF4, "1").unwrap();
        std::fs::write(NF6, "1").unwrap();
    });
    ns.run(|| link::setup_at_blocking(&s, dir.path())).unwrap();
    assert_eq!(ns.run(|| (read(NF4), read(NF6))), ("0".into(), "0".into()));
    // second setup must not record 0 as the "previous" value
    ns.run(|| link::setup_at_blocking(&s, dir.path())).unwrap();
    ns.run(|| link::teardown_at_blocking(&s, dir.path()))
        .unwrap();
    assert_eq!(ns.run(|| (read(NF4), read(NF6))), ("1".into(), "1".into()));

    // keep_br_netfilter = true leaves them alone
    s.kernel.keep_br_netfilter = true;
    ns.run(|| link::setup_at_blocking(&s, dir.path())).unwrap();
    assert_eq!(ns.run(|| (read(NF4), read(NF6))), ("1".into(), "1".into()));
    ns.run(|| link::teardown_at_blocking(&s, dir.path()))
        .unwrap();
}

#[test]
fn userspace_datapath_refused() {
    let mut s = settings("brt0", &["a0"], &[]);
    s.bridge.datapath = Datapath::Userspace;
    let dir = tempfile::tempdir().unwrap();
    let err = link::setup_at_blocking(&s, dir.path()).unwrap_err();
    assert!(
        matches!(err, LinkError::UserspaceDatapath { .. }),
        "{err:?}"
    );
}

#[test]
fn teardown_leaves_a_bridge_replaced_by_someone_else() {
    if !root_or_skip("teardown_leaves_a_bridge_replaced_by_someone_else") {
        return;
    }
    let ns = ns_with_ports();
    let dir = tempfile::tempdir().unwrap();
    let s = settings("brt0", &["a0", "b0"], &["10.7.0.1/24"]);
    let info = ns.run(|| link::setup_at_blocking(&s, dir.path())).unwrap();
    assert!(info.created);
    // Someone deletes brdivert's bridge and makes their own of the same name.
    ns.ip("link del brt0");
    ns.ip("link add brt0 type bridge");
    ns.ip("link set a0 master brt0");
    ns.run(|| link::teardown_at_blocking(&s, dir.path()))
        .unwrap();
    assert!(
        link_present(&ns, "brt0"),
        "the new owner's bridge must survive"
    );
    assert_eq!(master_of(&ns, "a0").as_deref(), Some("brt0"));
    assert!(!state_path(dir.path(), "brt0").exists());
}
