//! End-to-end tests with real peers in a namespace lab (`brdivert::lab`). Root only: without
//! root every test prints a SKIP line and passes.
//!
//! - `kernel::*` run the real binary (`brdivert apply -c <lab settings>`) and check traffic.
//! - `userspace::*` run the same checks (one `datapath_suite!` source) on the userspace
//!   datapath, started in-process in the lab's bridge namespace through the library API
//!   (`Datapath::start` + `local_rules::install_at_blocking`, the steps `brdivert run`
//!   takes), since `apply` refuses that datapath. In-process, a test can flip a rule's
//!   health directly (`Datapath::set_unhealthy`, what the daemon's checker calls) and read
//!   the datapath's counters; `tests/daemon.rs` covers the same datapath under the real
//!   `brdivert run` (start, reload, health, status, metrics, static FDB).

use std::net::SocketAddr;
use std::path::Path;

use brdivert::daemon::counters::RuleCounts;
use brdivert::settings::{Datapath as Kind, Settings};

use brdivert::lab::{
    BR_V4, BR_V6, BRIDGE, C1_MAC, C1_V4, C1_V6, C2_MAC, C2_V4, C2_V6, Lab, LabOptions, Ns, PORT_C1,
    PORT_C2, PORT_UP, Proxy, UP_MAC, UP_V4, UP_V6, find_program, is_root,
};

const BIN: &str = env!("CARGO_BIN_EXE_brdivert");
const VIP: &str = "10.77.0.100";

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// A lab for one test, or `None` (after printing why) when this machine cannot run it.
fn lab(datapath: &str, proxy: Proxy) -> Option<Lab> {
    if !is_root() {
        eprintln!("SKIP: end-to-end tests need root (network namespaces)");
        return None;
    }
    for prog in ["ip", "nft", "curl", "ping", "python3", "tcpdump"] {
        if find_program(prog).is_none() {
            eprintln!("SKIP: end-to-end tests need `{prog}`");
            return None;
        }
    }
    if proxy == Proxy::Squid && find_program("squid").is_none() {
        eprintln!("SKIP: this test needs squid");
        return None;
    }
    Some(
        Lab::with_options(LabOptions {
            proxy,
            datapath: datapath.into(),
            prefix: None,
        })
        .expect("building the lab"),
    )
}

/// Put the lab's rules in force: `brdivert apply` for the kernel datapath; for the userspace
/// datapath, what `brdivert run` does, in-process through the library (start the datapath in
/// the bridge namespace and install its local-stack rules, or swap the policy and reinstall
/// them when it already runs). Keep the returned guard alive for the test: dropping it stops
/// the datapath and removes what it installed.
#[must_use = "the userspace datapath stops when the guard is dropped"]
fn apply(lab: &Lab) -> Option<userspace_run::Running> {
    let settings = Settings::load(&lab.settings_path()).expect("lab settings");
    if settings.bridge.datapath == Kind::Userspace {
        return userspace_run::apply(lab, settings);
    }
    if let Err(e) = lab.apply(bin()) {
        panic!("{e:#}");
    }
    None
}

/// The userspace datapath for the suite, one per lab (keyed by the lab's prefix).
mod userspace_run {
    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    use brdivert::datapath::{Datapath, local_rules};
    use brdivert::lab::{Lab, Ns, in_netns};
    use brdivert::policy::Policy;
    use brdivert::settings::Settings;

    static RUNNING: Mutex<Option<HashMap<String, Datapath>>> = Mutex::new(None);

    pub struct Running {
        prefix: String,
        br_ns: String,
        settings: Settings,
        state_dir: PathBuf,
        cleanup: bool,
    }

    fn take(prefix: &str) -> Option<Datapath> {
        let mut g = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
        g.get_or_insert_with(HashMap::new).remove(prefix)
    }

    pub fn apply(lab: &Lab, settings: Settings) -> Option<Running> {
        let policy = Arc::new(Policy::load(&settings).unwrap_or_else(|e| panic!("{e}")));
        let br_ns = lab.ns(Ns::Br);
        let state_dir = lab.dir().join("state");
        let prefix = lab.prefix().to_string();
        let running = take(&prefix);
        let fresh = running.is_none();
        let dp = match running {
            Some(dp) => {
                dp.swap_policy(policy.clone());
                dp
            }
            None => {
                let (s, p) = (settings.clone(), policy.clone());
                in_netns(&br_ns, move || {
                    Datapath::start(&s, p).map_err(std::io::Error::other)
                })
                .unwrap_or_else(|e| panic!("starting the userspace datapath: {e:#}"))
            }
        };
        let mac = dp.local_port().1;
        let (s, p, d) = (settings.clone(), policy.clone(), state_dir.clone());
        in_netns(&br_ns, move || {
            local_rules::install_at_blocking(&s, &p, mac, &d).map_err(std::io::Error::other)
        })
        .unwrap_or_else(|e| panic!("installing the local-stack rules: {e:#}"));
        RUNNING
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(HashMap::new)
            .insert(prefix.clone(), dp);
        // not `then_some`: building a guard for a re-apply would stop the datapath on drop
        if !fresh {
            return None;
        }
        Some(Running {
            prefix,
            br_ns,
            settings,
            state_dir,
            cleanup: true,
        })
    }

    /// The health flip of the userspace datapath (the daemon's health checker calls the same
    /// `Datapath::set_unhealthy`): `rule` down or every rule up.
    pub fn set_health(lab: &Lab, rule: &str, up: bool) {
        let g = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
        let dp = g
            .as_ref()
            .and_then(|m| m.get(lab.prefix()))
            .expect("the userspace datapath runs for this lab");
        let mut down = std::collections::HashSet::new();
        if !up {
            down.insert(rule.to_string());
        }
        dp.set_unhealthy(down);
    }

    /// What `rule` took on the userspace datapath (its rows of `status`).
    pub fn taken(lab: &Lab, rule: &str) -> brdivert::daemon::counters::RuleCounts {
        let g = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
        let dp = g
            .as_ref()
            .and_then(|m| m.get(lab.prefix()))
            .expect("the userspace datapath runs for this lab");
        dp.stats()
            .rules
            .into_iter()
            .find(|(n, _)| n == rule)
            .map(|(_, t)| t)
            .unwrap_or_default()
    }

    impl Running {
        /// Stop the datapath only (as if the daemon died), leaving its rules for `flush`.
        pub fn kill(mut self) {
            self.cleanup = false;
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            if let Some(dp) = take(&self.prefix) {
                dp.stop();
            }
            if self.cleanup {
                let (s, d) = (self.settings.clone(), self.state_dir.clone());
                let _ = in_netns(&self.br_ns, move || {
                    local_rules::remove_at_blocking(&s, &d).map_err(std::io::Error::other)
                });
            }
        }
    }
}

fn nft_ruleset(lab: &Lab) -> String {
    lab.exec_ok(Ns::Br, &["nft", "-s", "list", "ruleset"])
        .expect("nft list ruleset")
}

// ---------------------------------------------------------------------------------------
// checks shared by the brdivert suite and the hand-made reference

/// tcp/80 from c1 goes through Squid intercept: Via header, access log, origin sees the bridge.
fn check_intercepted(lab: &Lab, ns: Ns, url_host: &str, path: &str, bridge_addr: &str) {
    let url = format!("http://{url_host}{path}");
    let r = lab.curl(ns, &url).unwrap_or_else(|e| {
        panic!(
            "{e:#}\nSquid cache.log:\n{}\nruleset:\n{}",
            lab.squid_cache_log(),
            nft_ruleset(lab)
        )
    });
    assert_eq!(r.status, 200, "{url}: {r:?}");
    let via = r.header("Via").unwrap_or_default();
    assert!(
        via.contains("brdivert-lab"),
        "{url}: no Via from the lab's Squid: {r:?}"
    );
    assert!(
        lab.squid_access_log_with(path).contains(path),
        "{url}: not in Squid's access log:\n{}",
        lab.squid_access_log()
    );
    let seen: Vec<String> = lab.origin_saw(path).into_iter().map(|h| h.peer).collect();
    assert_eq!(
        seen,
        [bridge_addr],
        "{url}: the origin should see the bridge host"
    );
}

/// The request reached the origin straight from the client, no proxy on the way.
fn check_bridged(lab: &Lab, ns: Ns, url_host: &str, path: &str, client_addr: &str) {
    let url = format!("http://{url_host}{path}");
    let r = lab.curl(ns, &url).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(r.status, 200, "{url}: {r:?}");
    assert_eq!(r.header("Via"), None, "{url}: went through a proxy: {r:?}");
    assert!(
        !lab.squid_access_log().contains(path),
        "{url}: Squid saw it"
    );
    let seen: Vec<String> = lab.origin_saw(path).into_iter().map(|h| h.peer).collect();
    assert_eq!(
        seen,
        [client_addr],
        "{url}: the origin should see the client"
    );
}

/// TPROXY: Squid handled it (Via, access log) and the origin saw the client's own address.
fn check_tproxied(lab: &Lab, ns: Ns, url_host: &str, path: &str, client_addr: &str) {
    let url = format!("http://{url_host}{path}");
    let r = lab.curl(ns, &url).unwrap_or_else(|e| {
        panic!(
            "{e:#}\nSquid cache.log:\n{}\nruleset:\n{}",
            lab.squid_cache_log(),
            nft_ruleset(lab)
        )
    });
    assert_eq!(r.status, 200, "{url}: {r:?}");
    assert!(
        r.header("Via").unwrap_or_default().contains("brdivert-lab"),
        "{url}: no Via from Squid: {r:?}"
    );
    assert!(
        lab.squid_access_log_with(path).contains(path),
        "{url}: not in Squid's access log"
    );
    let seen: Vec<String> = lab.origin_saw(path).into_iter().map(|h| h.peer).collect();
    assert_eq!(
        seen,
        [client_addr],
        "{url}: TPROXY keeps the client's address"
    );
    // the replies came back through the return-path divert, not because the router learnt
    // the bridge's MAC for the client's address (that would break the client's own flows)
    let client_mac = if ns == Ns::C1 { C1_MAC } else { C2_MAC };
    let neigh = lab
        .exec_ok(Ns::Up, &["ip", "neigh", "show", client_addr])
        .unwrap_or_default();
    assert!(
        neigh.contains(client_mac),
        "router's neighbour entry for {client_addr}: {neigh:?}"
    );
}

/// Service bound to the VIP on the bridge host's `lo`; c1 routes the VIP via the uplink
/// router, so its frames carry the router's MAC and only the divert brings them up.
fn setup_vip(lab: &mut Lab) {
    lab.serve_vip_on_bridge_host(VIP)
        .expect("VIP on the bridge host");
}

fn check_vip_local(lab: &Lab) {
    let r = lab
        .curl(Ns::C1, &format!("http://{VIP}/t-vip"))
        .unwrap_or_else(|e| panic!("{e:#}\nruleset:\n{}", nft_ruleset(lab)));
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("X-Lab-Server"),
        Some("vip"),
        "answered by the bridge host's service"
    );
    let seen: Vec<String> = lab
        .hits("vip", "/t-vip")
        .into_iter()
        .map(|h| h.peer)
        .collect();
    assert_eq!(seen, [C1_V4]);
    assert!(lab.origin_saw("/t-vip").is_empty());
    let neigh = lab
        .exec_ok(Ns::C1, &["ip", "neigh", "show", UP_V4])
        .unwrap_or_default();
    assert!(
        neigh.contains(UP_MAC),
        "c1 sent the VIP frames to the router's MAC: {neigh}"
    );
}

fn check_l2_bridged(lab: &Lab) {
    for (from, to) in [
        (Ns::C1, UP_V4),
        (Ns::C1, UP_V6),
        (Ns::C1, C2_V4),
        (Ns::C2, UP_V4),
        (Ns::C1, BR_V4),
        (Ns::C1, BR_V6),
    ] {
        assert!(
            lab.ping(from, to).expect("ping"),
            "ping {from:?} -> {to} failed"
        );
    }
    // ARP crossed the bridge: c1 learnt the router's real MAC
    let neigh = lab
        .exec_ok(Ns::C1, &["ip", "neigh", "show", UP_V4])
        .expect("ip neigh");
    assert!(neigh.contains(UP_MAC), "ARP for {UP_V4}: {neigh}");
    for to in [format!("{UP_V4}:5353"), format!("[{UP_V6}]:5353")] {
        let to: SocketAddr = to.parse().expect("address");
        let echo = lab
            .udp_echo(Ns::C1, to, b"brdivert-udp")
            .unwrap_or_else(|e| panic!("UDP echo {to}: {e:#}"));
        assert_eq!(echo, b"brdivert-udp");
    }
}

// ---------------------------------------------------------------------------------------
// rule files for the brdivert suite (design.md `## Rule files`)

/// tcp/80 from the clients to Squid intercept, c2 exempt (shared with the other lab suites).
const RULES_WEB: &str = brdivert::lab::RULES_WEB_EXEMPT_C2;

const RULES_TPROXY: &str = r#"[[divert]]
name    = "tp"
from    = ["port-c1", "port-c2"]
proto   = "tcp"
dport   = [8080]
except_src = ["10.77.0.3", "fd77::3"]
action  = "tproxy"
address = "127.0.0.1"
port    = 3130
"#;

const RULES_VIP: &str = r#"[[divert]]
name   = "vip"
dst    = ["10.77.0.100/32"]
action = "local"
"#;

/// Bridges tcp/8080 explicitly: a policy that diverts nothing.
const RULES_PASS_8080: &str = r#"[[divert]]
name   = "p8080"
proto  = "tcp"
dport  = [8080]
action = "pass"
"#;

/// RULES_WEB after a reload that stops diverting tcp/80.
const RULES_WEB_81: &str = r#"[[divert]]
name   = "web"
from   = ["port-c1", "port-c2"]
proto  = "tcp"
dport  = [81]
action = "redirect"
port   = 3129
"#;

/// RULES_WEB after a reload that exempts client 1 too: the same ports, so the same frames
/// reach the rule's chain (its scope), where the pinned flows are looked up first.
const RULES_WEB_EXEMPT_C1: &str = r#"[[divert]]
name   = "web"
from   = ["port-c1", "port-c2"]
proto  = "tcp"
dport  = [80]
except_src = ["10.77.0.1", "fd77::1", "10.77.0.3", "fd77::3"]
action = "redirect"
port   = 3129
"#;

/// RULES_WEB with a health check of Squid; `{ON}` is the failure policy.
const RULES_WEB_HEALTH: &str = r#"[[divert]]
name   = "web"
from   = ["port-c1", "port-c2"]
proto  = "tcp"
dport  = [80]
action = "redirect"
port   = 3129
health = { connect = "127.0.0.1:3129" }
on_unhealthy = "{ON}"
"#;

/// Tagged UDP to port 5353 in VLAN 20 is dropped; untagged tcp/80 goes to Squid (RULES_WEB).
const RULES_VLAN20_DROP: &str = r#"[[divert]]
name   = "vlan20-mdns"
vlan   = 20
proto  = "udp"
dport  = [5353]
action = "drop"
"#;

/// Line 5 is bad (unknown action).
const RULES_BAD: &str = brdivert::lab::RULES_BAD;

// ---------------------------------------------------------------------------------------
// the brdivert suite, per datapath

fn intercept_tcp80(dp: &str) {
    let Some(lab) = lab(dp, Proxy::Squid) else {
        return;
    };
    lab.write_rules("web", RULES_WEB).expect("rules");
    let _dp = apply(&lab);
    check_intercepted(&lab, Ns::C1, UP_V4, "/t-intercept", BR_V4);
}

fn other_port_bridged(dp: &str) {
    let Some(lab) = lab(dp, Proxy::Squid) else {
        return;
    };
    lab.write_rules("web", RULES_WEB).expect("rules");
    let _dp = apply(&lab);
    check_bridged(&lab, Ns::C1, &format!("{UP_V4}:8080"), "/t-8080", C1_V4);
    check_bridged(&lab, Ns::C1, &format!("[{UP_V6}]:8080"), "/t-8080-6", C1_V6);
}

fn except_src_bypasses(dp: &str) {
    let Some(lab) = lab(dp, Proxy::Squid) else {
        return;
    };
    lab.write_rules("web", RULES_WEB).expect("rules");
    let _dp = apply(&lab);
    check_bridged(&lab, Ns::C2, UP_V4, "/t-exempt", C2_V4);
    check_bridged(&lab, Ns::C2, &format!("[{UP_V6}]"), "/t-exempt-6", C2_V6);
    // counted as the rule's exemptions (IPv4 and IPv6 requests: more than one packet each)
    let c = rule_counts(&lab, dp, "web");
    assert!(
        c.exempted.packets >= 4 && c.exempted.bytes >= 40 * c.exempted.packets,
        "{c:?}"
    );
    assert_eq!(c.diverted.packets, 0, "nothing diverted yet: {c:?}");
    check_intercepted(&lab, Ns::C1, UP_V4, "/t-not-exempt", BR_V4);
}

fn intercept_ipv6(dp: &str) {
    let Some(lab) = lab(dp, Proxy::Squid) else {
        return;
    };
    lab.write_rules("web", RULES_WEB).expect("rules");
    let _dp = apply(&lab);
    check_intercepted(&lab, Ns::C1, &format!("[{UP_V6}]"), "/t-intercept-6", BR_V6);
}

fn tproxy_squid(dp: &str) {
    let Some(lab) = lab(dp, Proxy::Squid) else {
        return;
    };
    lab.write_rules("tp", RULES_TPROXY).expect("rules");
    let _dp = apply(&lab);
    check_tproxied(&lab, Ns::C1, &format!("{UP_V4}:8080"), "/t-tproxy", C1_V4);
    // the exempt client's replies must be bridged back, not diverted on the return path
    check_bridged(
        &lab,
        Ns::C2,
        &format!("{UP_V4}:8080"),
        "/t-tproxy-exempt",
        C2_V4,
    );
    check_bridged(&lab, Ns::C1, UP_V4, "/t-tproxy-80", C1_V4);
}

fn local_vip(dp: &str) {
    let Some(mut lab) = lab(dp, Proxy::None) else {
        return;
    };
    setup_vip(&mut lab);
    lab.write_rules("vip", RULES_VIP).expect("rules");
    let _dp = apply(&lab);
    check_vip_local(&lab);
    check_bridged(&lab, Ns::C1, UP_V4, "/t-vip-other", C1_V4);
}

/// 802.1Q frames cross the bridge with their tag and are matched by it: with RULES_WEB
/// (untagged tcp/80 to Squid) and a drop rule for VLAN 20 udp/5353, tagged frames sent raw
/// from c1 (this kernel has no VLAN interfaces) reach the router's port still tagged, except
/// the VLAN 20 ones the rule drops; a tagged tcp/80 SYN is not diverted. tcpdump on the
/// router shows the tags (libpcap puts the offloaded tag back).
fn vlan_tagged_frames(dp: &str) {
    let Some(lab) = lab(dp, Proxy::Squid) else {
        return;
    };
    lab.write_rules("web", RULES_WEB).expect("rules");
    lab.write_rules("vlan", RULES_VLAN20_DROP).expect("rules");
    let _dp = apply(&lab);
    let frame = |vlan: u16, l4proto: u8, sport: u16, dport: u16| {
        brdivert::classify::FrameSpec {
            src_mac: mac_bytes(C1_MAC),
            dst_mac: mac_bytes(UP_MAC),
            vlan: Some(vlan),
            src: C1_V4.parse().expect("addr"),
            dst: UP_V4.parse().expect("addr"),
            l4proto,
            sport,
            dport,
        }
        .to_bytes()
    };
    let frames = [
        frame(10, 6, 4001, 80),    // tagged web: bridged, not diverted
        frame(20, 17, 4002, 5353), // dropped by the VLAN 20 rule
        frame(10, 17, 4003, 5353), // VLAN 10: the drop rule is not for it
        frame(30, 17, 4004, 5353), // a VLAN no rule names
    ];
    let seen = sniff_while(&lab, Ns::Up, "vlan", || {
        let hex: Vec<String> = frames
            .iter()
            .map(|f| f.iter().map(|b| format!("{b:02x}")).collect())
            .collect();
        let send = format!(
            "import socket,time\ns=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\n\
             s.bind(('eth0',0))\nfor _ in range(3):\n    for h in {hex:?}:\n        \
             s.send(bytes.fromhex(h))\n    time.sleep(0.2)\n"
        );
        lab.exec_ok(Ns::C1, &["python3", "-c", &send])
            .expect("send tagged frames");
    });
    let line_for = |vlan: &str, port: &str| {
        seen.lines()
            .any(|l| l.contains(&format!("vlan {vlan},")) && l.contains(port))
    };
    assert!(line_for("10", ".4001 > "), "tagged SYN bridged:\n{seen}");
    assert!(line_for("10", ".4003 > "), "VLAN 10 udp bridged:\n{seen}");
    assert!(line_for("30", ".4004 > "), "VLAN 30 udp bridged:\n{seen}");
    assert!(
        !line_for("20", ".4002 > "),
        "VLAN 20 udp/5353 dropped:\n{seen}"
    );
    assert!(
        !lab.squid_access_log().contains(UP_V4),
        "Squid saw the tagged SYN: {}",
        lab.squid_access_log()
    );
}

fn mac_bytes(mac: &str) -> [u8; 6] {
    let mut out = [0u8; 6];
    for (o, h) in out.iter_mut().zip(mac.split(':')) {
        *o = u8::from_str_radix(h, 16).expect("lab MAC");
    }
    out
}

/// tcpdump on `eth0` of `ns` (filter `filter`, link headers shown) while `act` runs.
fn sniff_while(lab: &Lab, ns: Ns, filter: &str, act: impl FnOnce()) -> String {
    let dump = lab
        .command(
            ns,
            &[
                "timeout", "5", "tcpdump", "-i", "eth0", "-nn", "-e", "-l", filter,
            ],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tcpdump");
    // tcpdump says "listening on" once its capture is open
    std::thread::sleep(std::time::Duration::from_millis(1500));
    act();
    let out = dump.wait_with_output().expect("tcpdump");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn arp_icmp_udp_bridged(dp: &str) {
    let Some(lab) = lab(dp, Proxy::Squid) else {
        return;
    };
    lab.write_rules("web", RULES_WEB).expect("rules");
    lab.write_rules("tp", RULES_TPROXY).expect("rules");
    let _dp = apply(&lab);
    check_l2_bridged(&lab);
}

fn apply_idempotent(dp: &str) {
    let Some(lab) = lab(dp, Proxy::Squid) else {
        return;
    };
    lab.write_rules("web", RULES_WEB).expect("rules");
    lab.write_rules("tp", RULES_TPROXY).expect("rules");
    let _dp = apply(&lab);
    let state = |lab: &Lab| {
        (
            nft_ruleset(lab),
            lab.exec_ok(Ns::Br, &["ip", "rule"]).expect("ip rule"),
            lab.exec_ok(Ns::Br, &["ip", "-6", "rule"])
                .expect("ip -6 rule"),
            lab.exec_ok(Ns::Br, &["ip", "-br", "addr", "show", "dev", BRIDGE])
                .expect("ip addr"),
        )
    };
    let first = state(&lab);
    let _again = apply(&lab);
    let second = state(&lab);
    assert_eq!(first, second, "a second apply changed the state");
    check_intercepted(&lab, Ns::C1, UP_V4, "/t-idem", BR_V4);
    check_tproxied(&lab, Ns::C1, &format!("{UP_V4}:8080"), "/t-idem-tp", C1_V4);
}

fn bad_rules_refused(dp: &str) {
    let Some(lab) = lab(dp, Proxy::Squid) else {
        return;
    };
    lab.write_rules("web", RULES_WEB).expect("rules");
    let _dp = apply(&lab);
    let before = nft_ruleset(&lab);
    let bad = lab.write_rules("zz-bad", RULES_BAD).expect("rules");
    let settings = lab.settings_path().to_string_lossy().into_owned();
    let out = lab
        .brdivert(bin(), &["apply", "-c", &settings])
        .expect("running brdivert");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "bad input exits 2: {stderr}");
    let name = bad.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    // every `…zz-bad.toml:LINE:COLUMN` in the message; one of them must name line 5
    let positions: Vec<(u32, u32)> = stderr
        .match_indices(&format!("{name}:"))
        .filter_map(|(at, m)| {
            let mut pos = stderr[at + m.len()..].splitn(3, ':');
            let line = pos.next()?.parse().ok()?;
            let col = pos.next()?.trim().parse().ok()?;
            Some((line, col))
        })
        .collect();
    assert!(
        positions.iter().any(|&(line, col)| line == 5 && col > 0),
        "want {name}:5:COLUMN in: {stderr}"
    );
    assert_eq!(
        nft_ruleset(&lab),
        before,
        "a refused file changed the rules"
    );
    check_intercepted(&lab, Ns::C1, UP_V4, "/t-after-bad", BR_V4);
}

fn flush_leaves_no_trace(dp: &str) {
    let Some(lab) = lab(dp, Proxy::None) else {
        return;
    };
    lab.write_rules("tp", RULES_TPROXY).expect("rules");
    let running = apply(&lab);
    let rules = lab.exec_ok(Ns::Br, &["ip", "rule"]).expect("ip rule");
    assert!(
        rules.contains("lookup 3129"),
        "tproxy policy routing: {rules}"
    );
    // userspace: the daemon goes first (its TAP with it), flush removes what it left
    if let Some(r) = running {
        r.kill();
    }
    let settings = lab.settings_path().to_string_lossy().into_owned();
    let out = lab
        .brdivert(bin(), &["flush", "-c", &settings])
        .expect("running brdivert");
    assert!(
        out.status.success(),
        "flush: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tables = lab
        .exec_ok(Ns::Br, &["nft", "list", "tables"])
        .expect("nft");
    assert!(!tables.contains("brdivert"), "tables left: {tables}");
    let link = lab
        .exec(Ns::Br, &["ip", "link", "show", "dev", BRIDGE])
        .expect("ip");
    assert!(!link.status.success(), "bridge left behind");
    for fam in ["-4", "-6"] {
        let rules = lab.exec_ok(Ns::Br, &["ip", fam, "rule"]).expect("ip rule");
        assert!(!rules.contains("3129"), "ip {fam} rule left: {rules}");
        let routes = lab
            .exec_ok(Ns::Br, &["ip", fam, "route", "show", "table", "all"])
            .expect("ip route");
        assert!(
            !routes.contains("table 3129"),
            "ip {fam} routes left: {routes}"
        );
    }
    // the ports are still there, free again
    for p in [PORT_C1, PORT_C2, PORT_UP] {
        let l = lab
            .exec_ok(Ns::Br, &["ip", "-d", "link", "show", "dev", p])
            .expect("port");
        assert!(!l.contains("master"), "{p} still enslaved: {l}");
    }
}

/// The origin logged the request (it was sent before the body): bounded wait.
fn wait_origin_saw(lab: &Lab, path: &str) {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while lab.origin_saw(path).is_empty() {
        assert!(
            std::time::Instant::now() < until,
            "the origin never saw {path}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A long transfer finished whole, through Squid, and the origin saw `peer`.
fn check_transfer(lab: &Lab, t: brdivert::lab::Transfer, path: &str, peer: &str) {
    let r = t.finish().unwrap_or_else(|e| {
        panic!(
            "{e:#}\nruleset:\n{}\nSquid cache.log:\n{}",
            nft_ruleset(lab),
            lab.squid_cache_log()
        )
    });
    assert_eq!(r.status, 200, "{path}: {:?}", r.headers);
    assert!(
        r.header("Via").unwrap_or_default().contains("brdivert-lab"),
        "{path}: not through Squid: {:?}",
        r.headers
    );
    assert_eq!(r.body.len(), 30 * 1000, "{path}: short body");
    let seen: Vec<String> = lab.origin_saw(path).into_iter().map(|h| h.peer).collect();
    assert_eq!(seen, [peer], "{path}");
}

/// A reload that stops diverting a port keeps the established diverted flow (pinned) on its
/// path through Squid while a new connection to that port is bridged.
fn reload_keeps_established_flows(dp: &str) {
    let Some(lab) = lab(dp, Proxy::Squid) else {
        return;
    };
    lab.write_rules("web", RULES_WEB).expect("rules");
    let _running = apply(&lab);
    let path = "/slow/t-reload";
    let path6 = "/slow/t-reload-6";
    let t = lab
        .start_transfer(Ns::C1, &format!("http://{UP_V4}{path}"), &[])
        .expect("curl");
    let t6 = lab
        .start_transfer(Ns::C1, &format!("http://[{UP_V6}]{path6}"), &[])
        .expect("curl");
    wait_origin_saw(&lab, path);
    wait_origin_saw(&lab, path6);
    // the kernel datapath pins flows in the bridge table's maps (the userspace datapath in
    // its own flow table)
    let pinned_maps = if dp == "kernel" {
        vec![
            ("flows4", format!("{C1_V4} . {UP_V4} . tcp .")),
            ("flows6", format!("{C1_V6} . {UP_V6} . tcp .")),
        ]
    } else {
        Vec::new()
    };
    for (map, needle) in pinned_maps {
        let pins = lab
            .exec_ok(Ns::Br, &["nft", "list", "map", "bridge", "brdivert", map])
            .expect("nft");
        assert!(pins.contains(&needle), "flow not pinned: {pins}");
    }
    lab.write_rules("web", RULES_WEB_81).expect("rules");
    let _running = apply(&lab);
    if dp == "kernel" {
        // port-80 flows reach no rule's chain now: their pins are looked up for every frame
        assert!(
            lab.bridge_prerouting().contains("@flows4"),
            "{}",
            nft_ruleset(&lab)
        );
    }
    check_bridged(&lab, Ns::C1, UP_V4, "/t-after-reload", C1_V4);
    check_bridged(
        &lab,
        Ns::C1,
        &format!("[{UP_V6}]"),
        "/t-after-reload-6",
        C1_V6,
    );
    check_transfer(&lab, t, path, BR_V4);
    check_transfer(&lab, t6, path6, BR_V6);
}

/// A reload that exempts a client keeps its established diverted flow (pinned) on its path
/// through Squid, while its new connection is bridged. The rule's ports are unchanged, so the
/// kernel datapath looks the pins up only in the rule's chain (before the exemption), not
/// for every frame: this checks that placement.
fn reload_keeps_flows_of_exempted_clients(dp: &str) {
    let Some(lab) = lab(dp, Proxy::Squid) else {
        return;
    };
    lab.write_rules("web", RULES_WEB).expect("rules");
    let _running = apply(&lab);
    let path = "/slow/t-exempt-reload";
    let t = lab
        .start_transfer(Ns::C1, &format!("http://{UP_V4}{path}"), &[])
        .expect("curl");
    wait_origin_saw(&lab, path);
    lab.write_rules("web", RULES_WEB_EXEMPT_C1).expect("rules");
    let _running = apply(&lab);
    if dp == "kernel" {
        assert!(
            !lab.bridge_prerouting().contains("@flows4"),
            "pins looked up for every frame although the scope is unchanged:\n{}",
            nft_ruleset(&lab)
        );
    }
    check_bridged(&lab, Ns::C1, UP_V4, "/t-after-exempt-reload", C1_V4);
    check_transfer(&lab, t, path, BR_V4);
}

/// A reload from a TPROXY policy to one that diverts nothing (a `pass` rule for the same port)
/// keeps the established TPROXY flow whole: its packets are still pinned and its server
/// replies still go to the proxy (the kernel datapath keeps the pin and return-path lookups
/// while pins may exist and brdivert's TPROXY routing stays installed); the client's new
/// connection to the same server and port is bridged, replies included.
fn reload_keeps_tproxy_flows(dp: &str) {
    let Some(lab) = lab(dp, Proxy::Squid) else {
        return;
    };
    lab.write_rules("tp", RULES_TPROXY).expect("rules");
    let _running = apply(&lab);
    let path = "/slow/t-tproxy-reload";
    let t = lab
        .start_transfer(Ns::C1, &format!("http://{UP_V4}:8080{path}"), &[])
        .expect("curl");
    wait_origin_saw(&lab, path);
    lab.write_rules("tp", RULES_PASS_8080).expect("rules");
    let _running = apply(&lab);
    check_bridged(
        &lab,
        Ns::C1,
        &format!("{UP_V4}:8080"),
        "/t-after-tp-reload",
        C1_V4,
    );
    check_transfer(&lab, t, path, C1_V4);
}

/// Flip a rule's health on the datapath under test.
fn set_health(lab: &Lab, dp: &str, rule: &str, up: bool) {
    if dp == "kernel" {
        lab.set_rule_health(rule, up).expect("health flip");
    } else {
        userspace_run::set_health(lab, rule, up);
    }
}

/// `rule`'s counts as `brdivert status` shows them, from either datapath: the kernel's rule
/// counters (read over netlink in the bridge namespace) or what the userspace datapath
/// counted.
fn rule_counts(lab: &Lab, dp: &str, rule: &str) -> RuleCounts {
    if dp == "kernel" {
        let all = brdivert::lab::in_netns(&lab.ns(Ns::Br), brdivert::daemon::counters::read)
            .expect("reading the rule counters");
        all.get(rule).copied().unwrap_or_default()
    } else {
        userspace_run::taken(lab, rule)
    }
}

/// Health down (bypass): new flows are bridged, the established diverted flow keeps going
/// through Squid; up again: new flows are diverted again.
fn health_flip_bypass(dp: &str) {
    let Some(lab) = lab(dp, Proxy::Squid) else {
        return;
    };
    lab.write_rules("web", &RULES_WEB_HEALTH.replace("{ON}", "bypass"))
        .expect("rules");
    let _running = apply(&lab);
    check_intercepted(&lab, Ns::C1, UP_V4, "/t-health-up", BR_V4);
    let path = "/slow/t-health-established";
    let t = lab
        .start_transfer(Ns::C1, &format!("http://{UP_V4}{path}"), &[])
        .expect("curl");
    wait_origin_saw(&lab, path);
    set_health(&lab, dp, "web", false);
    let before = rule_counts(&lab, dp, "web");
    assert!(
        before.diverted.packets > 0,
        "diverted packets counted: {before:?}"
    );
    check_bridged(&lab, Ns::C1, UP_V4, "/t-health-down", C1_V4);
    // the bypassed flow counts as the rule's unhealthy packets, on both datapaths
    let after = rule_counts(&lab, dp, "web");
    assert!(
        after.unhealthy.packets > before.unhealthy.packets,
        "bypassed packets counted: {before:?} -> {after:?}"
    );
    set_health(&lab, dp, "web", true);
    check_intercepted(&lab, Ns::C1, UP_V4, "/t-health-up-again", BR_V4);
    check_transfer(&lab, t, path, BR_V4);
}

/// Health down (drop): new flows are refused; up again: diverted.
fn health_flip_drop(dp: &str) {
    let Some(lab) = lab(dp, Proxy::Squid) else {
        return;
    };
    lab.write_rules("web", &RULES_WEB_HEALTH.replace("{ON}", "drop"))
        .expect("rules");
    let _running = apply(&lab);
    let to: SocketAddr = format!("{UP_V4}:80").parse().expect("address");
    set_health(&lab, dp, "web", false);
    assert!(
        !lab.tcp_connects(Ns::C1, to).expect("connect"),
        "a new flow got through a rule that is down with on_unhealthy = drop"
    );
    let c = rule_counts(&lab, dp, "web");
    assert!(
        c.unhealthy.packets > 0,
        "the dropped SYNs count as unhealthy: {c:?}"
    );
    set_health(&lab, dp, "web", true);
    check_intercepted(&lab, Ns::C1, UP_V4, "/t-health-drop-up", BR_V4);
}

/// TPROXY replies are found by the diverted client's address (not by source port): while a
/// tproxied transfer runs from c1, the exempt c2 using the same source port is bridged both
/// ways.
fn tproxy_reply_only_diverted_clients(dp: &str) {
    let Some(lab) = lab(dp, Proxy::Squid) else {
        return;
    };
    lab.write_rules("tp", RULES_TPROXY).expect("rules");
    let _running = apply(&lab);
    let path = "/slow/t-tproxy-long";
    let t = lab
        .start_transfer(
            Ns::C1,
            &format!("http://{UP_V4}:8080{path}"),
            &["--local-port", "40123"],
        )
        .expect("curl");
    wait_origin_saw(&lab, path);
    let p2 = "/t-tproxy-same-port";
    let r = lab
        .curl_with(
            Ns::C2,
            &format!("http://{UP_V4}:8080{p2}"),
            &["--local-port", "40123"],
        )
        .unwrap_or_else(|e| panic!("{e:#}\nruleset:\n{}", nft_ruleset(&lab)));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Via"), None, "exempt client proxied: {r:?}");
    let seen: Vec<String> = lab.origin_saw(p2).into_iter().map(|h| h.peer).collect();
    assert_eq!(seen, [C2_V4]);
    check_transfer(&lab, t, path, C1_V4);
}

/// One `#[test]` per check for a datapath: `datapath_suite!(kernel)` makes `kernel::…`.
macro_rules! datapath_suite {
    ($dp:ident) => {
        mod $dp {
            datapath_suite!(@tests $dp: intercept_tcp80, other_port_bridged, except_src_bypasses,
                intercept_ipv6, tproxy_squid, local_vip, vlan_tagged_frames, arp_icmp_udp_bridged, apply_idempotent,
                bad_rules_refused, flush_leaves_no_trace, reload_keeps_established_flows,
                reload_keeps_flows_of_exempted_clients, reload_keeps_tproxy_flows,
                health_flip_bypass, health_flip_drop, tproxy_reply_only_diverted_clients);
        }
    };
    (@tests $dp:ident: $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                super::$name(stringify!($dp));
            }
        )*
    };
}

datapath_suite!(kernel);
datapath_suite!(userspace);

const RULES_VIP_SHIELD: &str = r#"[[divert]]
name       = "vip"
dst        = ["10.77.0.100"]
action     = "local"
arp_shield = true
"#;

/// The router resolves the VIP once (fresh neighbour entry) and returns the MAC it got, if any.
fn router_resolves_vip(lab: &Lab) -> Option<String> {
    lab.exec_ok(Ns::Up, &["ip", "neigh", "flush", "to", VIP])
        .expect("flush");
    lab.ping(Ns::Up, VIP).ok()?;
    let neigh = lab
        .exec_ok(Ns::Up, &["ip", "neigh", "show", VIP])
        .unwrap_or_default();
    let mut w = neigh.split_whitespace();
    w.by_ref().find(|t| *t == "lladdr")?;
    w.next().map(str::to_string)
}

/// c2 (the realserver) announces the VIP with a gratuitous ARP reply, as a realserver
/// bringing the VIP up on an interface would (arping -U -A).
fn send_garp_from_c2(lab: &Lab) {
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n\
         s.bind(('eth0', 0))\n\
         mac = bytes.fromhex('{}')\n\
         vip = socket.inet_aton('{VIP}')\n\
         f = b'\\xff' * 6 + mac + b'\\x08\\x06' + bytes([0, 1, 8, 0, 6, 4, 0, 2]) \
         + mac + vip + mac + vip\n\
         for _ in range(3):\n    s.send(f)\n",
        C2_MAC.replace(':', "")
    );
    lab.exec_ok(Ns::C2, &["python3", "-c", &script])
        .expect("gratuitous ARP from c2");
    std::thread::sleep(std::time::Duration::from_millis(200));
}

/// LVS "ARP problem" solved at the bridge: c2 plays a realserver holding the VIP on `lo` with
/// the default arp_ignore=0 (it answers ARP for the VIP on eth0), the bridge host (director)
/// holds it too. With `arp_shield`, the router's ARP for the VIP is answered by the director
/// only, every time, and the realserver never even hears the request.
///
/// A gratuitous ARP reply for the VIP from the realserver's port is dropped too.
///
/// Control (run first, printed, not asserted): with the same VIP rule but no shield, the
/// realserver hears every request and answers it (here the director's reply happened to
/// arrive first each time, so the router kept the bridge MAC — a race), and one gratuitous
/// ARP from the realserver moves the router's entry to the realserver's MAC
/// (02:77:00:00:00:03): VIP traffic would then bypass the director.
#[test]
fn kernel_arp_shield_router_resolves_vip_to_director() {
    let Some(lab) = lab("kernel", Proxy::None) else {
        return;
    };
    for (ns, dev) in [(Ns::Br, "lo"), (Ns::C2, "lo")] {
        lab.exec_ok(ns, &["ip", "addr", "add", &format!("{VIP}/32"), "dev", dev])
            .expect("VIP on lo");
    }
    lab.exec_ok(Ns::C2, &["sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=0"])
        .expect("arp_ignore");
    lab.exec_ok(
        Ns::C2,
        &["sysctl", "-qw", "net.ipv4.conf.eth0.arp_ignore=0"],
    )
    .expect("arp_ignore");
    // control: the same VIP rule without the shield
    lab.write_rules("vip", RULES_VIP).expect("rules");
    let _control = apply(&lab);
    let br_mac = lab.mac(Ns::Br, BRIDGE).expect("bridge MAC");
    let control: Vec<(Option<String>, bool)> = (0..5)
        .map(|_| {
            lab.exec_ok(Ns::C2, &["ip", "neigh", "flush", "to", UP_V4])
                .expect("flush");
            let got = router_resolves_vip(&lab);
            let heard = lab
                .exec_ok(Ns::C2, &["ip", "neigh", "show", UP_V4])
                .unwrap_or_default();
            (got, !heard.trim().is_empty())
        })
        .collect();
    send_garp_from_c2(&lab);
    let hijacked = lab
        .exec_ok(Ns::Up, &["ip", "neigh", "show", VIP])
        .unwrap_or_default();
    eprintln!("control (no shield): after c2's gratuitous ARP the router has {hijacked:?}");
    eprintln!(
        "control (no shield): (router's MAC for the VIP, realserver heard and answered) = \
         {control:?} (bridge {br_mac}, realserver {C2_MAC})"
    );

    lab.write_rules("vip", RULES_VIP_SHIELD).expect("rules");
    let _dp = apply(&lab);
    for i in 0..10 {
        lab.exec_ok(Ns::C2, &["ip", "neigh", "flush", "to", UP_V4])
            .expect("flush");
        let got = router_resolves_vip(&lab);
        assert_eq!(
            got.as_deref(),
            Some(br_mac.as_str()),
            "round {i}: the router's neighbour entry for the VIP\nruleset:\n{}",
            nft_ruleset(&lab)
        );
        // the realserver never heard the request (it would have learnt the router from it)
        let heard = lab
            .exec_ok(Ns::C2, &["ip", "neigh", "show", UP_V4])
            .unwrap_or_default();
        assert!(
            heard.trim().is_empty(),
            "round {i}: c2 saw ARP for the VIP: {heard}"
        );
    }
    // a gratuitous ARP reply for the VIP from the realserver's port (which would override
    // the router's entry) is dropped: the router's entry stays the director's
    send_garp_from_c2(&lab);
    let neigh = lab
        .exec_ok(Ns::Up, &["ip", "neigh", "show", VIP])
        .unwrap_or_default();
    assert!(
        neigh.contains(&br_mac),
        "after c2's gratuitous ARP: {neigh}"
    );
    // c2 with the default arp_announce = 0 resolves the router for a packet sourced from
    // the VIP: its request carries the VIP as sender. Turned into a probe by the shield, it
    // is answered (c2 learns the router) and the router does not learn the VIP from it.
    // (Without the rewrite — a plain drop — c2's entry stayed INCOMPLETE.)
    lab.exec_ok(Ns::C2, &["ip", "neigh", "flush", "to", UP_V4])
        .expect("flush");
    lab.exec(Ns::C2, &["ping", "-c", "1", "-W", "1", "-I", VIP, UP_V4])
        .ok();
    let c2_router = lab
        .exec_ok(Ns::C2, &["ip", "neigh", "show", UP_V4])
        .unwrap_or_default();
    assert!(
        c2_router.contains(UP_MAC),
        "c2 resolved the router from the VIP: {c2_router}"
    );
    let neigh = lab
        .exec_ok(Ns::Up, &["ip", "neigh", "show", VIP])
        .unwrap_or_default();
    assert!(
        !neigh.contains(C2_MAC),
        "the router learnt the VIP from c2's request: {neigh}"
    );
    // ordinary ARP still crosses the bridge
    assert!(
        lab.ping(Ns::Up, C2_V4).unwrap_or(false),
        "router reaches c2"
    );
    // and the shield rule is what answered: its counter saw every request
    let chain = prerouting_listing(&lab);
    let packets = |what: &str| rule_packets(&chain, what);
    assert!(packets("arp operation request arp daddr") >= 10, "{chain}");
    assert!(packets("arp saddr ip set 0.0.0.0") >= 1, "{chain}");
    assert!(packets("arp daddr ip @vip_dst4 counter") >= 3, "{chain}");
}

const VIP6: &str = "fd77::100";

const RULES_VIP6_SHIELD: &str = r#"[[divert]]
name       = "vip"
dst        = ["10.77.0.100", "fd77::100"]
action     = "local"
arp_shield = true
"#;

/// The router resolves the IPv6 VIP once (fresh neighbour entry) and returns the MAC it got.
fn router_resolves_vip6(lab: &Lab) -> Option<String> {
    lab.exec_ok(Ns::Up, &["ip", "-6", "neigh", "flush", "to", VIP6])
        .expect("flush");
    lab.ping(Ns::Up, VIP6).ok()?;
    let neigh = lab
        .exec_ok(Ns::Up, &["ip", "-6", "neigh", "show", VIP6])
        .unwrap_or_default();
    let mut w = neigh.split_whitespace();
    w.by_ref().find(|t| *t == "lladdr")?;
    w.next().map(str::to_string)
}

/// c2 (the realserver) announces the IPv6 VIP: an unsolicited neighbour advert with the
/// override flag and its MAC, to all nodes.
fn send_na_from_c2(lab: &Lab) {
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)\n\
         s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)\n\
         mac = bytes.fromhex('{}')\n\
         na = bytes([136, 0, 0, 0, 0x20, 0, 0, 0]) + socket.inet_pton(socket.AF_INET6, '{VIP6}') \
         + bytes([2, 1]) + mac\n\
         for _ in range(3):\n    s.sendto(na, ('ff02::1', 0, 0, socket.if_nametoindex('eth0')))\n",
        C2_MAC.replace(':', "")
    );
    lab.exec_ok(Ns::C2, &["python3", "-c", &script])
        .expect("neighbour advert from c2");
    std::thread::sleep(std::time::Duration::from_millis(200));
}

/// The IPv6 side of the shield: the director holds the VIP on the bridge device (Linux
/// answers NS only for addresses of the receiving interface), the realserver on `lo`. The
/// router's NS for the VIP reaches the director only and is answered with the bridge MAC;
/// the realserver's unsolicited override NA for the VIP is dropped.
///
/// Control (printed, not asserted): without the shield the realserver's NA moves the router's
/// entry to the realserver's MAC.
#[test]
fn kernel_nd_shield_router_resolves_vip6_to_director() {
    let Some(lab) = lab("kernel", Proxy::None) else {
        return;
    };
    lab.write_rules("vip", RULES_VIP).expect("rules");
    let _control = apply(&lab);
    lab.exec_ok(
        Ns::Br,
        &[
            "ip",
            "addr",
            "add",
            &format!("{VIP6}/128"),
            "dev",
            BRIDGE,
            "nodad",
        ],
    )
    .expect("VIP6 on the bridge");
    lab.exec_ok(
        Ns::C2,
        &[
            "ip",
            "addr",
            "add",
            &format!("{VIP6}/128"),
            "dev",
            "lo",
            "nodad",
        ],
    )
    .expect("VIP6 on lo");
    let br_mac = lab.mac(Ns::Br, BRIDGE).expect("bridge MAC");
    let first = router_resolves_vip6(&lab);
    send_na_from_c2(&lab);
    let hijacked = lab
        .exec_ok(Ns::Up, &["ip", "-6", "neigh", "show", VIP6])
        .unwrap_or_default();
    eprintln!(
        "control (no shield): router resolved {VIP6} to {first:?}, after c2's NA: {hijacked:?} \
         (bridge {br_mac}, realserver {C2_MAC})"
    );

    lab.write_rules("vip", RULES_VIP6_SHIELD).expect("rules");
    let _dp = apply(&lab);
    for i in 0..5 {
        let got = router_resolves_vip6(&lab);
        assert_eq!(
            got.as_deref(),
            Some(br_mac.as_str()),
            "round {i}: the router's neighbour entry for {VIP6}\nruleset:\n{}",
            nft_ruleset(&lab)
        );
    }
    send_na_from_c2(&lab);
    let neigh = lab
        .exec_ok(Ns::Up, &["ip", "-6", "neigh", "show", VIP6])
        .unwrap_or_default();
    assert!(
        neigh.contains(&br_mac),
        "after c2's neighbour advert: {neigh}"
    );
    // ordinary ND still crosses the bridge
    assert!(
        lab.ping(Ns::Up, C2_V6).unwrap_or(false),
        "router reaches c2"
    );
    let chain = prerouting_listing(&lab);
    let packets = |what: &str| rule_packets(&chain, what);
    assert!(packets("nd-neighbor-solicit") >= 5, "{chain}");
    assert!(packets("nd-neighbor-advert") >= 3, "{chain}");
}

/// `nft list chain bridge brdivert prerouting` in the lab's bridge namespace.
fn prerouting_listing(lab: &Lab) -> String {
    lab.exec_ok(
        Ns::Br,
        &["nft", "list", "chain", "bridge", "brdivert", "prerouting"],
    )
    .expect("nft list chain")
}

/// The packet counter of the first rule of `listing` whose text contains `what` (0 if none).
fn rule_packets(listing: &str, what: &str) -> u64 {
    listing
        .lines()
        .find(|l| l.contains(what))
        .and_then(|l| l.split("packets ").nth(1))
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0)
}
