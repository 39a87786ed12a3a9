//! The userspace datapath in a namespace bed of its own: two hosts on two ports of a
//! brdivert bridge running in a third namespace, started with the library API. Root only:
//! without root every test prints a SKIP line and passes.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use brdivert::classify::FrameSpec;
use brdivert::datapath::{Datapath, Options, local_rules};
use brdivert::lab::{find_program, is_root};
use brdivert::nft::compile::Target;
use brdivert::nft::{Ruleset, netlink};
use brdivert::policy::{Context, Policy};
use brdivert::rules;
use brdivert::settings::{BridgeSettings, Datapath as Kind, Settings};

const TAP: &str = "ubr0";
const H1: &str = "10.88.0.1";
const H2: &str = "10.88.0.2";
const BR: &str = "10.88.0.254";
const H1_6: &str = "fd88::1";
const H2_6: &str = "fd88::2";
const VIP: &str = "10.77.0.100";

/// Namespaces `<p>-h1`, `<p>-h2`, `<p>-br`; veths h1:eth0 <-> br:p1, h2:eth0 <-> br:p2.
/// Everything (datapath, servers, namespaces, temp dir) goes on drop, also after a panic.
struct Bed {
    prefix: String,
    dp: Option<Datapath>,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Bed {
    fn ns(&self, n: &str) -> String {
        format!("{}-{n}", self.prefix)
    }

    fn exec(&self, ns: &str, args: &[&str]) -> Output {
        let ns = self.ns(ns);
        let mut v = vec!["ip", "netns", "exec", ns.as_str()];
        v.extend_from_slice(args);
        Command::new(v[0])
            .args(&v[1..])
            .stdin(Stdio::null())
            .output()
            .expect("ip netns exec")
    }

    fn ok(&self, ns: &str, args: &[&str]) -> String {
        let out = self.exec(ns, args);
        assert!(
            out.status.success(),
            "{ns}: {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn new() -> Option<Bed> {
        if !is_root() {
            eprintln!("SKIP: the userspace datapath test needs root");
            return None;
        }
        for p in ["ip", "ping", "curl", "python3"] {
            if find_program(p).is_none() {
                eprintln!("SKIP: needs `{p}`");
                return None;
            }
        }
        static N: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "ud{:04}{:02}",
            std::process::id() % 10_000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        let bed = Bed {
            prefix,
            dp: None,
            children: Vec::new(),
            dir: tempfile::tempdir().expect("temp dir"),
        };
        for n in ["h1", "h2", "br"] {
            sh(&["ip", "netns", "add", &bed.ns(n)]);
            bed.ok(n, &["ip", "link", "set", "lo", "up"]);
        }
        for (h, port, v4, v6) in [("h1", "p1", H1, H1_6), ("h2", "p2", H2, H2_6)] {
            let peer = format!("{}{port}", bed.prefix);
            sh(&[
                "ip",
                "link",
                "add",
                &peer,
                "netns",
                &bed.ns("br"),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &bed.ns(h),
            ]);
            bed.ok("br", &["ip", "link", "set", &peer, "name", port]);
            bed.ok(
                h,
                &["ip", "addr", "add", &format!("{v4}/24"), "dev", "eth0"],
            );
            bed.ok(
                h,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{v6}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            );
            bed.ok(h, &["ip", "link", "set", "eth0", "up"]);
        }
        Some(bed)
    }

    fn settings(&self) -> Settings {
        Settings {
            rules: Vec::new(),
            bridge: BridgeSettings {
                name: TAP.into(),
                ports: vec!["p1".into(), "p2".into()],
                datapath: Kind::Userspace,
                address: vec![
                    "10.88.0.254/24".parse().unwrap(),
                    "fd88::fe/64".parse().unwrap(),
                ],
                static_fdb: Vec::new(),
                threads: None,
                busy_poll_us: None,
            },
            queue: Default::default(),
            control: Default::default(),
            metrics: Default::default(),
            daemon: Default::default(),
            kernel: Default::default(),
            base_dir: PathBuf::new(),
            path: PathBuf::new(),
        }
    }

    /// Start the datapath in the bridge namespace and install its local-stack rules.
    fn start(&mut self, policy: Policy) {
        self.start_with(policy, Options::default());
    }

    fn start_with(&mut self, policy: Policy, opts: Options) {
        let settings = self.settings();
        let policy = Arc::new(policy);
        let p = policy.clone();
        let dp = in_netns(&self.ns("br"), move || {
            Datapath::start_with(&settings, p, opts).map_err(|e| e.to_string())
        })
        .expect("datapath starts");
        let target = Target {
            bridge_mac: dp.local_port().1,
            mark_mask: 0x00ff_0000,
            ..Default::default()
        };
        let table = local_rules::userspace_local_table(&policy, &target, TAP);
        in_netns(&self.ns("br"), move || {
            netlink::apply(&Ruleset {
                tables: vec![table],
            })
            .map_err(|e| e.to_string())
        })
        .expect("local-stack rules apply");
        self.dp = Some(dp);
    }

    /// `python3 -m http.server` in `ns` on `addr:port`, serving the bed's directory.
    fn serve(&mut self, ns: &str, addr: &str, port: u16) {
        let ns_name = self.ns(ns);
        let child = Command::new("ip")
            .args(["netns", "exec", &ns_name, "python3", "-m", "http.server"])
            .args(["--bind", addr, &port.to_string()])
            .arg("--directory")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("http.server");
        self.children.push(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let want = format!(":{port:04X} ");
        loop {
            let tcp = self.ok(ns, &["cat", "/proc/net/tcp", "/proc/net/tcp6"]);
            if tcp.lines().any(|l| l.contains(&want) && l.contains(" 0A ")) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "http.server in {ns} not listening"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn curl(&self, ns: &str, url: &str) -> Result<String, String> {
        let out = self.exec(ns, &["curl", "-sS", "-g", "-m", "10", url]);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn ping(&self, ns: &str, dst: &str) -> bool {
        self.exec(ns, &["ping", "-c", "2", "-i", "0.2", "-W", "2", dst])
            .status
            .success()
    }

    fn write_file(&self, name: &str, content: &[u8]) {
        std::fs::write(self.dir.path().join(name), content).expect("write");
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Some(dp) = self.dp.take() {
            dp.stop();
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in ["h1", "h2", "br"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(n)])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Run `f` on a thread inside network namespace `ns`; threads it starts stay there too.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let file = File::open(Path::new("/run/netns").join(ns)).map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd changes only this helper thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        f()
    })
    .join()
    .map_err(|_| "namespace thread panicked".to_string())?
}

fn policy(text: &str) -> Policy {
    let f = rules::parse(Path::new("test.toml"), text.into()).expect("rules parse");
    Policy::build(
        &[f],
        &Context {
            ports: Some(vec!["p1".into(), "p2".into()]),
            mark_mask: 0x00ff_0000,
        },
    )
    .expect("policy builds")
}

/// The default thread layout: one per port, at most one per CPU (with fewer CPUs than
/// ports, some thread serves two ports), polling for a while after two-way traffic.
#[test]
fn bridges_icmp_tcp_and_the_local_port() {
    bridges_icmp_tcp_and_the_local_port_with(Options::default());
}

/// All three ports on one thread, which sleeps as soon as they are empty.
#[test]
fn one_thread_without_busy_polling_bridges_too() {
    bridges_icmp_tcp_and_the_local_port_with(Options {
        threads: 1,
        spin: Duration::ZERO,
        ..Options::default()
    });
}

/// A thread per port (more threads than CPUs on a small box).
#[test]
fn a_thread_per_port_bridges_too() {
    bridges_icmp_tcp_and_the_local_port_with(Options {
        threads: 3,
        ..Options::default()
    });
}

/// The ports receive with `recvmmsg` instead of their mapped rings (the fallback where the
/// kernel refuses a ring).
#[test]
fn receiving_with_recvmmsg_bridges_too() {
    bridges_icmp_tcp_and_the_local_port_with(Options {
        rx_ring: false,
        ..Options::default()
    });
}

fn bridges_icmp_tcp_and_the_local_port_with(opts: Options) {
    let Some(mut bed) = Bed::new() else { return };
    let ring = opts.rx_ring;
    bed.start_with(policy(""), opts);
    assert!(bed.ping("h1", H2), "h1 -> h2 v4");
    assert!(bed.ping("h2", H1_6), "h2 -> h1 v6");
    assert!(bed.ping("h1", BR), "h1 -> the bridge's address on the TAP");
    assert!(bed.ping("h2", "fd88::fe"), "h2 -> the bridge's v6 address");

    // TCP, small and large (GSO super-frames and checksum offload through the bridge)
    bed.write_file("hello.txt", b"hello through brdivert\n");
    let big: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    bed.write_file("big.bin", &big);
    bed.serve("h2", "::", 8000);
    assert_eq!(
        bed.curl("h1", &format!("http://{H2}:8000/hello.txt"))
            .unwrap(),
        "hello through brdivert\n"
    );
    assert_eq!(
        bed.curl("h1", &format!("http://[{H2_6}]:8000/hello.txt"))
            .unwrap(),
        "hello through brdivert\n"
    );
    let t = Instant::now();
    let out = bed.ok(
        "h1",
        &[
            "curl",
            "-sS",
            "-m",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            &format!("http://{H2}:8000/big.bin"),
        ],
    );
    assert_eq!(
        out.trim(),
        big.len().to_string(),
        "whole file in {:?}",
        t.elapsed()
    );

    // 802.1Q: the receiving veth strips the tag into metadata; the datapath must put it back
    // (PACKET_AUXDATA). No 8021q module here, so: a tagged frame sent raw from h1, and
    // tcpdump (libpcap re-inserts the tag) watching h2's eth0.
    if find_program("tcpdump").is_some() {
        let frame = FrameSpec {
            src_mac: [2, 0x42, 0, 0, 0, 1],
            dst_mac: [0xff; 6],
            vlan: Some(42),
            src: "10.42.0.1".parse().unwrap(),
            dst: "10.42.0.2".parse().unwrap(),
            l4proto: 17,
            sport: 4242,
            dport: 4343,
        }
        .to_bytes();
        let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
        let ns = bed.ns("h2");
        let dump = Command::new("ip")
            .args([
                "netns", "exec", &ns, "timeout", "8", "tcpdump", "-i", "eth0",
            ])
            .args(["-nn", "-e", "-l", "-c", "1", "vlan 42 and udp port 4343"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump");
        std::thread::sleep(Duration::from_millis(1500));
        let send = format!(
            "import socket,time\ns=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\n\
             s.bind(('eth0',0))\nfor _ in range(5):\n    s.send(bytes.fromhex('{hex}'))\n    time.sleep(0.2)\n"
        );
        bed.ok("h1", &["python3", "-c", &send]);
        let out = dump.wait_with_output().expect("tcpdump");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("vlan 42") && text.contains("4343"),
            "tagged frame at h2: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let stats = bed.dp.as_ref().unwrap().stats();
    assert!(
        stats.ports[0].rx_frames > 0 && stats.ports[1].tx_frames > 0,
        "{stats:?}"
    );
    assert!(stats.fdb_entries >= 3, "{stats:?}");
    assert_eq!(stats.diverted, 0);
    // the ports received the way asked; with rings, the server's GSO super-frames of the
    // big download did not fit a slot and came whole from the socket
    assert!(
        stats.ports[..2].iter().all(|p| p.rx_ring == ring),
        "{stats:?}"
    );
    assert_eq!(stats.ports[1].rx_copied > 0, ring, "{stats:?}");
    assert_eq!(
        stats.ports[0].rx_bad + stats.ports[1].rx_bad,
        0,
        "{stats:?}"
    );

    // stop() joins the threads and takes the TAP away
    bed.dp.take().expect("running").stop();
    let gone = bed.exec("br", &["ip", "link", "show", "dev", TAP]);
    assert!(!gone.status.success(), "TAP left behind after stop()");
    assert!(!bed.ping("h1", H2), "nothing bridges once stopped");
}

#[test]
fn local_vip_and_redirect_reach_services_on_the_bridge_host() {
    let Some(mut bed) = Bed::new() else { return };
    bed.start(policy(&format!(
        r#"
[[divert]]
name = "vip"
dst = ["{VIP}"]
proto = "tcp"
dport = [8080]
action = "local"

[[divert]]
name = "web"
from = ["p1"]
proto = "tcp"
dport = [80]
except_src = ["10.88.0.99"]
action = "redirect"
port = 8080
"#
    )));
    // The VIP lives on the bridge host; h1 reaches it through h2 as its router, so only the
    // divert (not the destination MAC) can bring it to the bridge host.
    bed.ok(
        "br",
        &["ip", "addr", "add", &format!("{VIP}/32"), "dev", "lo"],
    );
    bed.ok(
        "h1",
        &["ip", "route", "add", &format!("{VIP}/32"), "via", H2],
    );
    bed.write_file("who.txt", b"the bridge host\n");
    bed.serve("br", "0.0.0.0", 8080);
    assert_eq!(
        bed.curl("h1", &format!("http://{VIP}:8080/who.txt"))
            .unwrap(),
        "the bridge host\n"
    );
    // REDIRECT: h1 asks h2 on port 80 (nothing listens there); the bridge host answers.
    assert_eq!(
        bed.curl("h1", &format!("http://{H2}:80/who.txt")).unwrap(),
        "the bridge host\n"
    );
    // From the other side `from` does not match: h2 -> h1:80 is bridged (and refused by h1).
    assert!(bed.curl("h2", &format!("http://{H1}:80/who.txt")).is_err());
    let stats = bed.dp.as_ref().unwrap().stats();
    assert!(stats.diverted > 0, "{stats:?}");
    for rule in ["vip", "web"] {
        // frames and their L3 bytes (at least an IPv4 and a TCP header each)
        assert!(
            stats.rules.iter().any(|(n, c)| n == rule
                && c.diverted.packets > 0
                && c.diverted.bytes >= 40 * c.diverted.packets),
            "{rule}: {stats:?}"
        );
    }
    // the nft tag rules counted the diverted packets
    let nft = bed.ok(
        "br",
        &["nft", "list", "chain", "inet", "brdivert", "tap_tag"],
    );
    assert!(!nft.contains("counter packets 0 "), "{nft}");
}

#[test]
fn swap_keeps_established_flows_and_refuses_enslaved_ports() {
    let Some(mut bed) = Bed::new() else { return };
    bed.start(policy(""));
    assert!(bed.ping("h1", H2));
    let big: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 241) as u8).collect();
    bed.write_file("slow.bin", &big);
    bed.serve("h2", "::", 8001);
    // An established flow: a rate-limited download that takes ~2 s.
    let url = format!("http://{H2}:8001/slow.bin");
    let ns = bed.ns("h1");
    let slow = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            "curl",
            "-sS",
            "-m",
            "20",
            "--limit-rate",
            "1500k",
        ])
        .args(["-o", "/dev/null", "-w", "%{size_download}", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl");
    std::thread::sleep(Duration::from_millis(500));
    // The new policy drops new flows to that port.
    bed.dp.as_ref().unwrap().swap_policy(Arc::new(policy(
        r#"
[[divert]]
name = "nope"
proto = "tcp"
dport = [8001]
action = "drop"
"#,
    )));
    let out = slow.wait_with_output().expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        big.len().to_string(),
        "the established download finished: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(bed.curl("h1", &url).is_err(), "a new flow is dropped");
    assert!(bed.ping("h1", H2), "other traffic still bridged");
    let stats = bed.dp.as_ref().unwrap().stats();
    assert!(stats.policy_dropped > 0, "{stats:?}");
    assert!(
        stats
            .rules
            .iter()
            .any(|(n, c)| n == "nope" && c.diverted.packets > 0),
        "{stats:?}"
    );
    assert_eq!(stats.policy_generation, 1);

    // A port enslaved to a kernel bridge is refused with a clear error.
    bed.ok("br", &["ip", "link", "add", "kbr", "type", "bridge"]);
    bed.ok(
        "br",
        &[
            "ip", "link", "add", "q1", "type", "veth", "peer", "name", "q2",
        ],
    );
    bed.ok("br", &["ip", "link", "set", "q1", "master", "kbr"]);
    let mut s = bed.settings();
    s.bridge.name = "ubr1".into();
    s.bridge.ports = vec!["q1".into(), "q2".into()];
    s.bridge.address.clear();
    let err = in_netns(&bed.ns("br"), move || {
        match Datapath::start(&s, Arc::new(policy(""))) {
            Ok(_) => Ok(String::new()),
            Err(e) => Ok(e.to_string()),
        }
    })
    .unwrap();
    assert!(err.contains("enslaved to kernel bridge \"kbr\""), "{err}");
    let mut s = bed.settings();
    s.bridge.name = "ubr2".into();
    s.bridge.ports = vec!["nope0".into()];
    s.bridge.address.clear();
    let err = in_netns(&bed.ns("br"), move || {
        match Datapath::start(&s, Arc::new(policy(""))) {
            Ok(_) => Ok(String::new()),
            Err(e) => Ok(e.to_string()),
        }
    })
    .unwrap();
    assert!(err.contains("no such port \"nope0\""), "{err}");
}

#[test]
fn arp_shield_answers_vip_arp_from_the_bridge_host_only() {
    let Some(mut bed) = Bed::new() else { return };
    bed.start(policy(&format!(
        r#"
[[divert]]
name = "vip"
dst = ["{VIP}"]
action = "local"
arp_shield = true
"#
    )));
    // h2 is a realserver that also holds the VIP (and would answer ARP for it)
    bed.ok(
        "h2",
        &["ip", "addr", "add", &format!("{VIP}/32"), "dev", "eth0"],
    );
    bed.ok(
        "br",
        &["ip", "addr", "add", &format!("{VIP}/32"), "dev", "lo"],
    );
    // h1 sees the VIP on its link, so it ARPs for it
    bed.ok(
        "h1",
        &["ip", "route", "add", &format!("{VIP}/32"), "dev", "eth0"],
    );
    assert!(bed.ping("h1", VIP), "the VIP answers");
    let neigh = bed.ok("h1", &["ip", "neigh", "show", VIP]);
    let tap_mac = bed.dp.as_ref().unwrap().local_port().1;
    let tap_mac: String = tap_mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    assert!(
        neigh.contains(&tap_mac),
        "h1 resolved the VIP to the bridge host ({tap_mac}): {neigh}"
    );
    // the realserver never heard the request (it would have learnt h1 from it)
    let heard = bed.ok("h2", &["ip", "neigh", "show", H1]);
    assert!(heard.trim().is_empty(), "h2 saw ARP for the VIP: {heard}");
}

/// The userspace ARP shield decides as the kernel datapath's shield rules do (no root needed).
#[test]
fn arp_shield_verdicts_match_the_kernel_rules() {
    use brdivert::datapath::{Verdict, arp_shield};
    let p = policy(
        "[[divert]]\nname = \"vip\"\ndst = [\"10.77.0.100\"]\naction = \"local\"\narp_shield = true\n",
    );
    let frame = |op: u8, spa: [u8; 4], tpa: [u8; 4]| {
        let mut f = vec![0xff; 6];
        f.extend([2, 0, 0, 0, 0, 3, 0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, op]);
        f.extend([2, 0, 0, 0, 0, 3]);
        f.extend(spa);
        f.extend([0; 6]);
        f.extend(tpa);
        f
    };
    let (vip, router, rs) = ([10, 77, 0, 100], [10, 77, 0, 2], [10, 77, 0, 3]);
    // gratuitous ARP for the VIP (request or reply): dropped
    assert_eq!(arp_shield(&p, &mut frame(1, vip, vip)), Some(Verdict::Skip));
    assert_eq!(arp_shield(&p, &mut frame(2, vip, vip)), Some(Verdict::Skip));
    // a reply claiming the VIP: dropped
    assert_eq!(
        arp_shield(&p, &mut frame(2, vip, router)),
        Some(Verdict::Skip)
    );
    // a request sourced from the VIP: turned into a probe, bridged
    let mut f = frame(1, vip, router);
    assert_eq!(arp_shield(&p, &mut f), Some(Verdict::Forward));
    assert_eq!(f[28..32], [0, 0, 0, 0], "sender address zeroed");
    // a request for the VIP: the bridge host only
    assert_eq!(
        arp_shield(&p, &mut frame(1, router, vip)),
        Some(Verdict::Local)
    );
    // other ARP: not the shield's business
    assert_eq!(arp_shield(&p, &mut frame(1, router, rs)), None);
}

/// A port whose ring is not read fills up: the kernel drops what does not fit, and
/// `take_drops` (`PACKET_STATISTICS`, the datapath's `rx_full`) hands that count over once.
#[test]
fn frames_dropped_with_the_ring_full_are_counted() {
    use brdivert::datapath::frame::VNET_HDR_LEN;
    use brdivert::datapath::port::{PacketPort, RxBatch, RxRing, TxBatch};
    let Some(bed) = Bed::new() else { return };
    bed.ok(
        "br",
        &[
            "ip", "link", "add", "f1", "type", "veth", "peer", "name", "f2",
        ],
    );
    const SENT: usize = RxRing::SLOTS + 1000;
    let (drops, again, kept) = in_netns(&bed.ns("br"), || {
        let err = |e: std::io::Error| e.to_string();
        let tx_port = PacketPort::open("f1").map_err(err)?;
        let rx_port = PacketPort::open("f2").map_err(err)?;
        let mut ring = RxRing::attach(&rx_port).map_err(err)?;
        // a broadcast UDP frame, behind its (empty) vnet header
        let mut frame = vec![0u8; VNET_HDR_LEN];
        frame.extend(
            FrameSpec {
                src_mac: [2, 0, 0, 0, 0, 1],
                dst_mac: [0xff; 6],
                vlan: None,
                src: "10.99.0.1".parse().map_err(|e| format!("{e}"))?,
                dst: "10.99.0.255".parse().map_err(|e| format!("{e}"))?,
                l4proto: 17,
                sport: 9,
                dport: 9,
            }
            .to_bytes(),
        );
        let mut tx = TxBatch::default();
        let batch = vec![frame.as_slice(); 100];
        let mut sent = 0;
        while sent < SENT {
            sent += tx_port.send(&mut tx, &batch[..100.min(SENT - sent)]);
        }
        // the veth hands frames over synchronously; the ring has filled by now
        let drops = rx_port.take_drops().map_err(err)?;
        let again = rx_port.take_drops().map_err(err)?;
        let mut b = RxBatch::new(64);
        let mut kept = 0;
        loop {
            match ring.recv(&rx_port, &mut b).map_err(err)? {
                0 => break,
                n => kept += n,
            }
        }
        Ok((drops, again, kept))
    })
    .expect("in the namespace");
    // IPv6 autoconfiguration may add a few frames of its own: ring capacity is the bound
    assert_eq!(kept, RxRing::SLOTS, "the ring kept what fit");
    assert!(
        drops as usize >= SENT - RxRing::SLOTS,
        "dropped {drops} of {SENT} with {} slots",
        RxRing::SLOTS
    );
    assert_eq!(again, 0, "the count was handed over and reset");
}
