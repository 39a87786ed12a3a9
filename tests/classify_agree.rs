//! `classify` (the policy in Rust) and the kernel datapath (the policy compiled to nftables)
//! agree on every frame of a generated corpus: each frame is injected into a bridge port over
//! AF_PACKET, and the per-rule counters of `bridge brdivert` say which rule (if any) took it.
//! Needs root; skips with a message otherwise.

#[path = "common/netns_rt.rs"]
mod netns_rt;

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use brdivert::classify::{Decision, FrameSpec, classify, parse_frame};
use brdivert::policy::{Context, Policy};
use netns_rt::{Netns, netns_or_skip};

const PORTS: [&str; 3] = ["p0", "p1", "p2"];

const RULES: &str = r#"
[[divert]]
name       = "web"
from       = ["p0", "p1"]
proto      = "tcp"
dport      = [80, "8080-8090"]
src        = ["10.1.0.0/16", "fd01::/32"]
except_src = ["10.1.0.5", "fd01::5"]
except_dst = ["10.2.0.9"]
action     = "redirect"
port       = 3129

[[divert]]
name   = "ssh"
proto  = "tcp"
dport  = 22
dst    = ["10.2.0.0/24"]
action = "drop"

[[divert]]
name    = "dns"
proto   = "udp"
dport   = 53
src_mac = ["02:00:00:00:00:01"]
action  = "pass"

[[divert]]
name   = "vip"
dst    = ["10.2.0.100", "fd02::100"]
action = "local"

[[divert]]
name   = "v10"
vlan   = [10, 30]
dst    = ["10.4.0.1", "fd04::1"]
action = "pass"

[[divert]]
name   = "web6"
from   = "p2"
proto  = "tcp"
dport  = [80, 443]
dst    = ["fd02::/64"]
action = "local"
"#;

/// A small deterministic generator (no external RNG): xorshift64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[(self.next() % v.len() as u64) as usize]
    }
}

fn corpus(n: usize) -> Vec<(&'static str, FrameSpec)> {
    let v4_src = ["10.1.0.1", "10.1.0.5", "10.3.0.1"];
    let v4_dst = ["10.2.0.9", "10.2.0.1", "10.2.0.100", "10.4.0.1"];
    let v6_src = ["fd01::1", "fd01::5", "fd03::1"];
    let v6_dst = ["fd02::100", "fd02::1", "fd04::1"];
    let protos = [6u8, 17, 1];
    let dports = [22u16, 53, 80, 443, 8085, 8091];
    let macs = [[2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]];
    // untagged, a VLAN a rule names, one no rule names (802.1Q tags in the frame)
    let vlans = [None, None, Some(10), Some(20)];
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    (0..n)
        .map(|i| {
            let (src, dst): (IpAddr, IpAddr) = if rng.next().is_multiple_of(2) {
                (
                    rng.pick(&v4_src).parse().unwrap(),
                    rng.pick(&v4_dst).parse().unwrap(),
                )
            } else {
                (
                    rng.pick(&v6_src).parse().unwrap(),
                    rng.pick(&v6_dst).parse().unwrap(),
                )
            };
            let spec = FrameSpec {
                src_mac: *rng.pick(&macs),
                dst_mac: [2, 0, 0, 0, 0, 0x99],
                vlan: *rng.pick(&vlans),
                src,
                dst,
                l4proto: *rng.pick(&protos),
                // one flow per frame: a repeated 5-tuple would hit the pinned-flow map
                sport: 40000 + i as u16,
                dport: *rng.pick(&dports),
            };
            (*rng.pick(&PORTS), spec)
        })
        .collect()
}

/// Main-rule packet counters by rule name (the rules whose comment is exactly the name).
fn counters(ns: &Netns) -> std::collections::HashMap<String, u64> {
    let (ok, out, err) = ns.nft(&["-j", "list", "table", "bridge", "brdivert"]);
    assert!(ok, "nft -j list: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("nft json");
    let mut m = std::collections::HashMap::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let Some(rule) = item.get("rule") else {
            continue;
        };
        let Some(comment) = rule["comment"].as_str() else {
            continue;
        };
        let packets = rule["expr"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|e| e.get("counter").and_then(|c| c["packets"].as_u64()));
        // Rule-file rules only: not their exemption/health rules ("name: …") nor the
        // pinned-flow rules, which this corpus (one frame per flow) never hits.
        if let Some(p) = packets
            && !comment.contains(':')
            && comment != "pinned"
            && comment != "tproxy reply"
        {
            *m.entry(comment.to_string()).or_insert(0) += p;
        }
    }
    m
}

/// An AF_PACKET socket sending on `ifname` (in the calling thread's namespace).
fn packet_socket(ifname: &str) -> (i32, libc::sockaddr_ll) {
    // SAFETY: plain socket(2) call; the fd is owned by the caller.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    let name = std::ffi::CString::new(ifname).expect("name");
    // SAFETY: name is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(index > 0, "no interface {ifname}");
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = index as i32;
    addr.sll_halen = 6;
    (fd, addr)
}

fn send(fd: i32, addr: &libc::sockaddr_ll, frame: &[u8]) {
    // SAFETY: frame and addr are valid for the duration of the call.
    let n = unsafe {
        libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(
        n,
        frame.len() as isize,
        "sendto: {}",
        std::io::Error::last_os_error()
    );
}

#[test]
fn classify_agrees_with_kernel_datapath() {
    let Some(ns) = netns_or_skip("classify_agrees_with_kernel_datapath") else {
        return;
    };
    let ip = |args: &[&str]| {
        let st = Command::new("ip")
            .arg("-n")
            .arg(&ns.name)
            .args(args)
            .status()
            .expect("ip");
        assert!(st.success(), "ip {args:?}");
    };
    for (i, p) in PORTS.iter().enumerate() {
        let outer = format!("in{i}");
        ip(&["link", "add", &outer, "type", "veth", "peer", "name", p]);
        ip(&["link", "set", &outer, "up"]);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("rules.toml"), RULES).expect("rules");
    let settings = dir.path().join("brdivert.toml");
    std::fs::write(
        &settings,
        "rules = [\"rules.toml\"]\n[bridge]\nname = \"br0\"\nports = [\"p0\", \"p1\", \"p2\"]\n\
         address = [\"10.2.0.254/24\", \"fd02::fe/64\"]\n",
    )
    .expect("settings");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            env!("CARGO_BIN_EXE_brdivert"),
            "apply",
            "-c",
        ])
        .arg(&settings)
        .env("BRDIVERT_STATE_DIR", dir.path().join("state"))
        .output()
        .expect("brdivert apply");
    assert!(
        out.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let file = brdivert::rules::parse(Path::new("rules.toml"), RULES.into()).expect("rules parse");
    let policy = Policy::build(
        &[file],
        &Context {
            ports: Some(PORTS.iter().map(|p| p.to_string()).collect()),
            mark_mask: 0x00ff_0000,
        },
    )
    .expect("rules validate");

    let frames = corpus(300);
    let mut seen = std::collections::HashMap::<&str, usize>::new();
    ns.run(|| {
        let socks: Vec<_> = (0..PORTS.len())
            .map(|i| packet_socket(&format!("in{i}")))
            .collect();
        let mut before = counters(&ns);
        for (iif, spec) in &frames {
            let frame = spec.to_bytes();
            let info = parse_frame(&frame).expect("generated frames parse");
            let want = classify(&policy, iif, &info);
            let i = PORTS.iter().position(|p| p == iif).expect("port");
            send(socks[i].0, &socks[i].1, &frame);
            let after = counters(&ns);
            let hit: Vec<&String> = after
                .iter()
                .filter(|(k, v)| before.get(*k).copied().unwrap_or(0) != **v)
                .map(|(k, _)| k)
                .collect();
            let kernel = match hit.as_slice() {
                [] => None,
                [one] => Some(one.as_str()),
                many => panic!("one frame counted by several rules {many:?}: {spec:?}"),
            };
            let rust = match want {
                Decision::Divert { rule, .. }
                | Decision::Pass { rule }
                | Decision::Drop { rule } => Some(policy.rules[rule].name.as_str()),
                Decision::Bridge => None,
            };
            assert_eq!(
                kernel, rust,
                "disagree on {spec:?} from {iif}: kernel {kernel:?}, classify {want:?}"
            );
            *seen.entry(rust.unwrap_or("bridge")).or_default() += 1;
            before = after;
        }
        for (fd, _) in socks {
            // SAFETY: fd was returned by socket() above and is closed once.
            unsafe { libc::close(fd) };
        }
    });
    // The corpus must exercise every rule and the no-match case, or the test proves little.
    for name in ["web", "ssh", "dns", "vip", "v10", "web6", "bridge"] {
        assert!(
            seen.get(name).copied().unwrap_or(0) > 0,
            "corpus never hit {name}: {seen:?}"
        );
    }
}
