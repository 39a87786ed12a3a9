//! `action = "dr"` end to end (issue 4, part 2): the bridge forwards frames for the VIP
//! straight to one realserver by rewriting only the destination MAC (a hash of the client's
//! address and port picks it), and the realservers' replies are bridged back to the router.
//! Every check runs on both datapaths from one source (`dr_tests!`): the kernel bridge (bucket
//! map) and the userspace datapath (the same buckets in Rust, under `brdivert run`).
//! Root only: without root the test prints a SKIP line and passes.
//!
//! Topology (the lab's): `up` is the router *and* the client; `c1` and `c2` are the
//! realservers (VIP on `lo`, default route via the router); `br` is the bridge (director)
//! running no service at all for the VIP. The spread check runs over IPv4 and IPv6 (the lab's
//! fd77::/64 segment; the realservers' IPv6 default route is the router too).

use std::collections::BTreeMap;
use std::path::Path;

use brdivert::lab::{
    C1_MAC, C1_V4, C2_MAC, C2_V4, C2_V6, Lab, LabOptions, Ns, Proxy, UP_MAC, UP_V6, find_program,
    is_root,
};

const BIN: &str = env!("CARGO_BIN_EXE_brdivert");
const VIP: &str = "10.77.0.100";
/// The IPv6 VIP, on the lab's IPv6 segment (fd77::/64) as the IPv4 one is on its subnet.
const VIP6: &str = "fd77::100";
/// The router's neighbour entry for the VIP: a MAC nobody has. Without the dr rule the bridge
/// would flood such frames and no realserver would take them (not their MAC).
const VIP_MAC: &str = "02:77:00:00:00:80";
const CONNECTIONS: usize = 40;

/// A line service: answers every line it receives with its own name.
const SERVICE_PY: &str = r#"
import socket, socketserver, sys
name, vip = sys.argv[1], sys.argv[2]
class H(socketserver.StreamRequestHandler):
    def handle(self):
        for _ in self.rfile:
            self.wfile.write((name + "\n").encode())
            self.wfile.flush()
class S(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True
    def server_bind(self):
        # one socket for both families (the IPv4 and the IPv6 VIP)
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
S(("::", 80), H).serve_forever()
"#;

/// The client: N connections, two request/response rounds on each; prints one line per
/// connection: `name1 name2` (or `ERR <what>`).
const CLIENT_PY: &str = r#"
import socket, sys
vip, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    try:
        s = socket.create_connection((vip, 80), timeout=2)
        f = s.makefile("rwb")
        got = []
        for _ in range(2):
            f.write(b"hello\n"); f.flush()
            got.append(f.readline().decode().strip())
        s.close()
        print(" ".join(got), flush=True)
    except Exception as e:
        print("ERR", repr(e), flush=True)
"#;

/// The VIP and rs2's address of one IP family's check.
#[derive(Debug, Clone, Copy)]
struct Fam {
    vip: &'static str,
    /// the VIP as /proc/net/nf_conntrack prints it (IPv6: every group, 4 digits)
    vip_conntrack: &'static str,
    prefix_len: u8,
    rs2: &'static str,
    /// how the kernel dr rule of this family matches the VIP
    nft_daddr: &'static str,
}

const V4: Fam = Fam {
    vip: VIP,
    vip_conntrack: VIP,
    prefix_len: 32,
    rs2: C2_V4,
    nft_daddr: "ip daddr @lvs-dr_dst4",
};

/// rs2 given by its IPv6 address: its MAC is learned by neighbour discovery.
const V6: Fam = Fam {
    vip: VIP6,
    vip_conntrack: "fd77:0000:0000:0000:0000:0000:0000:0100",
    prefix_len: 128,
    rs2: C2_V6,
    nft_daddr: "ip6 daddr @lvs-dr_dst6",
};

/// rs1 by its MAC, rs2 by its address (its MAC learned from the bridge's neighbour table).
fn rules(f: Fam) -> String {
    format!(
        "[[divert]]\nname = \"lvs-dr\"\nproto = \"tcp\"\ndport = 80\ndst = \"{}\"\n\
         action = \"dr\"\nrealservers = [{{ mac = \"{C1_MAC}\" }}, {{ address = \"{}\" }}]\n",
        f.vip, f.rs2
    )
}

/// Both datapaths, one source: `dr_tests!(kernel)` and `dr_tests!(userspace)`.
macro_rules! dr_tests {
    ($dp:ident) => {
        mod $dp {
            #[test]
            fn dr_spreads_connections_and_keeps_each_on_one_realserver() {
                super::dr_spreads_connections_and_keeps_each_on_one_realserver(
                    stringify!($dp),
                    super::V4,
                );
            }

            #[test]
            fn dr_over_ipv6_spreads_connections_and_keeps_each_on_one_realserver() {
                super::dr_spreads_connections_and_keeps_each_on_one_realserver(
                    stringify!($dp),
                    super::V6,
                );
            }

            #[test]
            fn dr_health_moves_new_flows_only() {
                super::dr_health_moves_new_flows_only(stringify!($dp));
            }
        }
    };
}

dr_tests!(kernel);
dr_tests!(userspace);

/// A lab on `datapath`, or `None` (SKIP printed) without root or the programs.
fn lab_on(datapath: &str) -> Option<Lab> {
    if !is_root() {
        eprintln!("SKIP: lvs_dr needs root (network namespaces)");
        return None;
    }
    for prog in ["ip", "nft", "python3"] {
        if find_program(prog).is_none() {
            eprintln!("SKIP: lvs_dr needs `{prog}`");
            return None;
        }
    }
    Some(
        Lab::with_options(LabOptions {
            proxy: Proxy::None,
            datapath: datapath.into(),
            prefix: None,
        })
        .expect("building the lab"),
    )
}

/// `brdivert run` in the lab's bridge namespace (control socket and metrics of its own),
/// killed on drop; returned once it answers `status` (installed, MACs learned).
struct Daemon {
    procs: KillOnDrop,
    socket: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl Daemon {
    fn start(lab: &Lab) -> Daemon {
        use std::process::Stdio;
        use std::time::{Duration, Instant};
        let settings = lab.settings_path();
        let socket = lab.dir().join("control.sock");
        let mut text = std::fs::read_to_string(&settings).expect("settings");
        text.push_str(&format!(
            "\n[control]\nsocket = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:19479\"\n",
            socket.display()
        ));
        std::fs::write(&settings, text).expect("settings");
        let log = lab.dir().join("daemon.log");
        let out = std::fs::File::create(&log).expect("log");
        let err = out.try_clone().expect("log");
        let child = lab
            .command(Ns::Br, &[BIN, "run", "-c", &settings.to_string_lossy()])
            .env(brdivert::link::STATE_DIR_ENV, lab.dir().join("state"))
            .env("BRDIVERT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("brdivert run");
        let mut d = Daemon {
            procs: KillOnDrop(vec![child]),
            socket,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let st = std::process::Command::new(BIN)
                .args(["status", "--socket", &d.socket.to_string_lossy()])
                .stdin(Stdio::null())
                .output()
                .expect("brdivert status");
            if st.status.success() {
                return d;
            }
            if let Ok(Some(exit)) = d.procs.0[0].try_wait() {
                panic!("brdivert run exited ({exit}):\n{}", d.log());
            }
            assert!(Instant::now() < deadline, "daemon not up:\n{}", d.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `brdivert status --json`: the dr rule `lvs-dr`'s row.
    fn dr_status(&self) -> brdivert::daemon::control::DrStatus {
        let json = self.ask(&["status", "--json"]);
        let st: brdivert::daemon::control::Status =
            serde_json::from_str(&json).unwrap_or_else(|e| panic!("status --json: {e}:\n{json}"));
        st.dr
            .into_iter()
            .find(|d| d.rule == "lvs-dr")
            .unwrap_or_else(|| panic!("no dr row in status:\n{json}"))
    }

    /// (realserver, buckets) of `lvs-dr` in `status --json`, sorted by realserver.
    fn bucket_shares(&self) -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> = self
            .dr_status()
            .realservers
            .into_iter()
            .map(|r| (r.realserver, r.buckets))
            .collect();
        v.sort();
        v
    }

    /// `brdivert <args> --socket …`: its stdout, panicking (with the daemon's log) on failure.
    fn ask(&self, args: &[&str]) -> String {
        let out = std::process::Command::new(BIN)
            .args(args)
            .args(["--socket", &self.socket.to_string_lossy()])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("brdivert client");
        assert!(
            out.status.success(),
            "brdivert {args:?}: {}{}\nlog:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The spread check of one family (`V4`, `V6`): the realservers hold the VIP on `lo` and keep
/// the router as their gateway (the lab's default routes, IPv4 and IPv6); the router reaches
/// the VIP through a permanent neighbour entry.
fn dr_spreads_connections_and_keeps_each_on_one_realserver(datapath: &str, fam: Fam) {
    let Some(mut lab) = lab_on(datapath) else {
        return;
    };
    let kernel = datapath == "kernel";
    let vip = fam.vip;

    for (ns, name) in [(Ns::C1, "rs1"), (Ns::C2, "rs2")] {
        lab.exec_ok(
            ns,
            &[
                "ip",
                "addr",
                "add",
                &format!("{vip}/{}", fam.prefix_len),
                "dev",
                "lo",
            ],
        )
        .expect("VIP on the realserver's lo");
        if fam.vip == VIP6 {
            // A realserver may solicit the router from the VIP (its reply's source), and the
            // router's NA then goes to the VIP's MAC, not back to the realserver: the first
            // connection stalls for seconds of ND retries. Real realservers know their
            // router from its advertisements; here the entry is given.
            lab.exec_ok(
                ns,
                &[
                    "ip",
                    "-6",
                    "neigh",
                    "replace",
                    UP_V6,
                    "lladdr",
                    UP_MAC,
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ],
            )
            .expect("the realserver's neighbour entry for the router");
        }
        lab.spawn(ns, name, &["python3", "-c", SERVICE_PY, name, vip])
            .expect("realserver service");
        lab.wait_listening(ns, brdivert::lab::L4::Tcp, 80)
            .expect("realserver service listens");
    }
    lab.router_neighbour(vip, VIP_MAC)
        .expect("router's neighbour entry for the VIP");

    lab.write_rules("lvs-dr", &rules(fam)).expect("rules");
    // the kernel datapath by `apply`; the userspace one needs the daemon
    let daemon = if kernel {
        if let Err(e) = lab.apply(Path::new(BIN)) {
            panic!("{e:#}");
        }
        None
    } else {
        Some(Daemon::start(&lab))
    };
    let daemon_log = || daemon.as_ref().map(Daemon::log).unwrap_or_default();

    let out = lab
        .exec(
            Ns::Up,
            &[
                "timeout",
                "20",
                "python3",
                "-c",
                CLIENT_PY,
                vip,
                &CONNECTIONS.to_string(),
            ],
        )
        .expect("client");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let ruleset = lab
        .exec(Ns::Br, &["nft", "list", "table", "bridge", "brdivert"])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        CONNECTIONS,
        "one line per connection:\n{text}{}\nruleset:\n{ruleset}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon_log()
    );
    let mut per_rs: BTreeMap<&str, usize> = BTreeMap::new();
    for l in &lines {
        let parts: Vec<&str> = l.split_whitespace().collect();
        assert!(
            parts.len() == 2 && parts[0] != "ERR",
            "connection failed: {l}\nall:\n{text}\nruleset:\n{ruleset}\n{}",
            daemon_log()
        );
        assert_eq!(parts[0], parts[1], "a connection changed realserver: {l}");
        assert!(parts[0] == "rs1" || parts[0] == "rs2", "unknown answer {l}");
        *per_rs.entry(parts[0]).or_default() += 1;
    }
    assert_eq!(
        per_rs.len(),
        2,
        "connections spread over both realservers: {per_rs:?}"
    );

    // the director's IP stack never saw the VIP traffic: the inet brdivert table's nat chain
    // turns conntrack on in the bridge namespace, so a VIP packet taken up to the local stack
    // (the kernel bridge's host side, or the userspace datapath's TAP) would have left an
    // entry (bridged frames are not tracked without br_netfilter)
    let conntrack = lab
        .exec(Ns::Br, &["cat", "/proc/net/nf_conntrack"])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(
        !conntrack.contains(fam.vip_conntrack),
        "VIP flows in the director's conntrack:\n{conntrack}"
    );
    eprintln!("{datapath} {vip}: connections per realserver: {per_rs:?}");
    if let Some(d) = &daemon {
        // both realservers answered: rs2's MAC was learned through the TAP's neighbour table;
        // status shows each holding half the buckets, and the frames the datapath forwarded
        let row = d.dr_status();
        let shares: Vec<(&str, u32)> = row
            .realservers
            .iter()
            .map(|r| (r.realserver.as_str(), r.buckets))
            .collect();
        assert_eq!(shares, [(C1_MAC, 128), (fam.rs2, 128)], "{row:?}");
        // two request/response rounds per connection: at least 4 frames each towards them
        let forwarded = row.dr_forwarded.unwrap_or(0);
        assert!(
            forwarded >= 4 * CONNECTIONS as u64,
            "dr_forwarded {forwarded} after {CONNECTIONS} connections: {row:?}"
        );
        let text = d.ask(&["status"]);
        assert!(
            text.contains(&format!(
                "  lvs-dr: {forwarded} frames forwarded to realservers"
            )) && text.contains(&format!(
                "realserver {:<24} 128 buckets, MAC {C2_MAC}",
                fam.rs2
            )),
            "{text}"
        );
        eprintln!("{text}");
    }
    if !kernel {
        return;
    }
    // the bucket map holds both MACs (rs2's learned from the neighbour table), and the
    // connections were pinned
    for mac in [C1_MAC, C2_MAC] {
        assert!(
            ruleset.contains(&format!(": {mac}")),
            "{mac} not in the buckets:\n{ruleset}"
        );
    }
    let dr_rule = ruleset
        .lines()
        .find(|l| l.contains("map @lvs-dr_buckets") && l.contains(fam.nft_daddr))
        .unwrap_or_else(|| panic!("no dr rule:\n{ruleset}"));
    assert!(
        !dr_rule.contains("counter packets 0 "),
        "dr rule never matched: {dr_rule}"
    );
}

/// The interactive client for the health test: one command per stdin line, one answer line.
/// `open` opens a connection and keeps it (answers `<index> <realserver>`); `send I` sends a
/// line on kept connection I (answers the realserver's name, or `ERR`); `burst N` makes N
/// short connections (answers their realservers, space separated).
const SESSION_PY: &str = r#"
import socket, sys
vip = sys.argv[1]
kept = []
def one(s):
    f = s.makefile("rwb")
    f.write(b"hello\n"); f.flush()
    return f.readline().decode().strip() or "EOF"
for line in sys.stdin:
    cmd = line.split()
    try:
        if cmd[0] == "open":
            s = socket.create_connection((vip, 80), timeout=2)
            kept.append(s)
            print(len(kept) - 1, one(s), flush=True)
        elif cmd[0] == "send":
            print(one(kept[int(cmd[1])]), flush=True)
        elif cmd[0] == "burst":
            names = []
            for _ in range(int(cmd[1])):
                try:
                    s = socket.create_connection((vip, 80), timeout=2)
                    names.append(one(s)); s.close()
                except Exception:
                    names.append("ERR")
            print(" ".join(names), flush=True)
    except Exception as e:
        print("ERR", repr(e).replace(" ", "_"), flush=True)
"#;

struct Session {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Session {
    fn ask(&mut self, cmd: &str) -> String {
        use std::io::{BufRead, Write};
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{cmd}").expect("write to client");
        stdin.flush().expect("flush");
        let mut line = String::new();
        self.out.read_line(&mut line).expect("client answer");
        line.trim().to_string()
    }
}

/// Kills what it holds on drop (also when an assertion fails), before the lab goes.
struct KillOnDrop(Vec<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Health: under `brdivert run`, killing rs2's service moves new connections to rs1 within
/// interval × fall + 1 s; a connection established on rs1 keeps working; restarting rs2's
/// service brings it back after `rise` checks, while connections made during the outage stay
/// where they are (pinned). Both realservers are given by address (MACs learned).
fn dr_health_moves_new_flows_only(datapath: &str) {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let Some(lab) = lab_on(datapath) else {
        return;
    };
    let kernel = datapath == "kernel";
    let mut procs = KillOnDrop(Vec::new());
    let service = |lab: &Lab, ns: Ns, name: &str| {
        lab.command(ns, &["python3", "-c", SERVICE_PY, name, VIP])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("realserver service")
    };
    for (ns, name) in [(Ns::C1, "rs1"), (Ns::C2, "rs2")] {
        lab.exec_ok(
            ns,
            &["ip", "addr", "add", &format!("{VIP}/32"), "dev", "lo"],
        )
        .expect("VIP on lo");
        procs.0.push(service(&lab, ns, name));
    }
    lab.router_neighbour(VIP, VIP_MAC)
        .expect("router's neighbour entry for the VIP");
    // interval 500ms, fall 2, rise 2
    let health = "health = { interval = \"500ms\", timeout = \"300ms\", fall = 2, rise = 2 }";
    let health_rules = |order: [&str; 2]| {
        format!(
            "[[divert]]\nname = \"lvs-dr\"\nproto = \"tcp\"\ndport = 80\ndst = \"{VIP}\"\n\
             action = \"dr\"\nrealservers = [\n  {{ address = \"{}\", {health} }},\n  \
             {{ address = \"{}\", {health} }},\n]\n",
            order[0], order[1]
        )
    };
    lab.write_rules("lvs-dr", &health_rules([C1_V4, C2_V4]))
        .expect("rules");
    let daemon = Daemon::start(&lab);
    let daemon_log = || daemon.log();
    // kernel: the bucket map (userspace: its buckets are not visible from outside; the
    // first burst below shows both realservers took flows)
    let buckets = |lab: &Lab| {
        if !kernel {
            return String::new();
        }
        lab.exec(
            Ns::Br,
            &["nft", "list", "map", "bridge", "brdivert", "lvs-dr_buckets"],
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while kernel && !(buckets(&lab).contains(C1_MAC) && buckets(&lab).contains(C2_MAC)) {
        assert!(
            Instant::now() < deadline,
            "daemon did not install both realservers:\n{}\n{}",
            buckets(&lab),
            daemon_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let mut child = lab
        .command(Ns::Up, &["python3", "-u", "-c", SESSION_PY, VIP])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("client");
    let out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut s = Session { child, out };
    let burst = |s: &mut Session, n: usize| -> Vec<String> {
        s.ask(&format!("burst {n}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let first = burst(&mut s, 20);
    assert!(
        first.iter().any(|n| n == "rs1") && first.iter().any(|n| n == "rs2"),
        "both realservers answer at first: {first:?}"
    );
    // one kept connection on each realserver
    let mut on: BTreeMap<String, String> = BTreeMap::new();
    for _ in 0..40 {
        if on.len() == 2 {
            break;
        }
        let a = s.ask("open");
        let mut it = a.split_whitespace();
        if let (Some(i), Some(name)) = (it.next(), it.next())
            && name.starts_with("rs")
        {
            on.entry(name.to_string()).or_insert(i.to_string());
        }
    }
    assert_eq!(on.len(), 2, "kept connections on both: {on:?}");

    // rs2's service dies; within interval x fall + 1 s new flows only reach rs1
    let mut rs2 = procs.0.remove(1);
    let _ = rs2.kill();
    let _ = rs2.wait();
    std::thread::sleep(Duration::from_millis(500 * 2 + 1000));
    let during = burst(&mut s, 20);
    assert!(
        during.iter().all(|n| n == "rs1"),
        "new connections after rs2 died: {during:?}\nbuckets:\n{}\nlog:\n{}",
        buckets(&lab),
        daemon_log()
    );
    if kernel {
        assert!(!buckets(&lab).contains(C2_MAC), "{}", buckets(&lab));
    }
    // status: rs2 holds no bucket now, rs1 all of them
    let down_shares = vec![(C1_V4.to_string(), 256), (C2_V4.to_string(), 0)];
    assert_eq!(daemon.bucket_shares(), down_shares);
    // the established connection on rs1 is untouched
    assert_eq!(s.ask(&format!("send {}", on["rs1"])), "rs1");
    // connections opened during the outage (on rs1, some from rs2's buckets)
    let mut outage = Vec::new();
    for _ in 0..10 {
        let a = s.ask("open");
        let mut it = a.split_whitespace();
        let (i, name) = (it.next().unwrap_or("").to_string(), it.next().unwrap_or(""));
        assert_eq!(name, "rs1", "{a}");
        outage.push(i);
    }
    // a reload that reorders the realservers keeps rs2 down: its health is keyed by its
    // address, not by its place in the list (an index key handed rs2's "down" to rs1)
    lab.write_rules("lvs-dr", &health_rules([C2_V4, C1_V4]))
        .expect("rules");
    let reloaded = daemon.ask(&["reload"]);
    let reordered = burst(&mut s, 10);
    assert!(
        reordered.iter().all(|n| n == "rs1"),
        "new connections after a reload that reordered the realservers (rs2 still down): \
         {reordered:?}\n{reloaded}\nbuckets:\n{}\nlog:\n{}",
        buckets(&lab),
        daemon_log()
    );
    if kernel {
        assert!(!buckets(&lab).contains(C2_MAC), "{}", buckets(&lab));
    }
    assert_eq!(daemon.bucket_shares(), down_shares);

    // rs2 comes back: after rise checks it takes new flows again
    procs.0.insert(1, service(&lab, Ns::C2, "rs2"));
    std::thread::sleep(Duration::from_millis(500 * 2 + 1500));
    let after = burst(&mut s, 30);
    assert!(
        after.iter().any(|n| n == "rs2") && after.iter().all(|n| n == "rs1" || n == "rs2"),
        "rs2 back after rise: {after:?}\nbuckets:\n{}\nlog:\n{}",
        buckets(&lab),
        daemon_log()
    );
    assert_eq!(
        daemon.bucket_shares(),
        [(C1_V4.to_string(), 128), (C2_V4.to_string(), 128)]
    );
    // and nothing established moved: the rs1 connection and those of the outage (pinned)
    assert_eq!(s.ask(&format!("send {}", on["rs1"])), "rs1");
    for i in &outage {
        assert_eq!(
            s.ask(&format!("send {i}")),
            "rs1",
            "outage connection {i} moved"
        );
    }
    eprintln!("{datapath}: first {first:?}\nduring {during:?}\nafter {after:?}");
}
