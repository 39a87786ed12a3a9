//! `action = "dr"` end to end (issue 4, part 2): the bridge forwards frames for the VIP
//! straight to one realserver by rewriting only the destination MAC (a hash of the client's
//! address and port picks it), and the realservers' replies are bridged back to the router.
//! Root only: without root the test prints a SKIP line and passes.
//!
//! Topology (the lab's): `up` is the router *and* the client; `c1` and `c2` are the
//! realservers (VIP on `lo`, default route via the router); `br` is the bridge (director)
//! running no service at all for the VIP.

use std::collections::BTreeMap;
use std::path::Path;

use brdivert::lab::{C1_MAC, C2_MAC, Lab, LabOptions, Ns, Proxy, find_program, is_root};

const BIN: &str = env!("CARGO_BIN_EXE_brdivert");
const VIP: &str = "10.77.0.100";
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
    allow_reuse_address = True
    daemon_threads = True
S((vip, 80), H).serve_forever()
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

fn rules() -> String {
    format!(
        "[[divert]]\nname = \"lvs-dr\"\nproto = \"tcp\"\ndport = 80\ndst = \"{VIP}\"\n\
         action = \"dr\"\nrealservers = [{{ mac = \"{C1_MAC}\" }}, {{ mac = \"{C2_MAC}\" }}]\n"
    )
}

#[test]
fn dr_spreads_connections_and_keeps_each_on_one_realserver() {
    if !is_root() {
        eprintln!("SKIP: lvs_dr needs root (network namespaces)");
        return;
    }
    for prog in ["ip", "nft", "python3"] {
        if find_program(prog).is_none() {
            eprintln!("SKIP: lvs_dr needs `{prog}`");
            return;
        }
    }
    let mut lab = Lab::with_options(LabOptions {
        proxy: Proxy::None,
        datapath: "kernel".into(),
        prefix: None,
    })
    .expect("building the lab");

    for (ns, name) in [(Ns::C1, "rs1"), (Ns::C2, "rs2")] {
        lab.exec_ok(
            ns,
            &["ip", "addr", "add", &format!("{VIP}/32"), "dev", "lo"],
        )
        .expect("VIP on the realserver's lo");
        lab.spawn(ns, name, &["python3", "-c", SERVICE_PY, name, VIP])
            .expect("realserver service");
        lab.wait_listening(ns, brdivert::lab::L4::Tcp, 80)
            .expect("realserver service listens");
    }
    lab.exec_ok(
        Ns::Up,
        &[
            "ip",
            "neigh",
            "replace",
            VIP,
            "lladdr",
            VIP_MAC,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    )
    .expect("router's neighbour entry for the VIP");

    lab.write_rules("lvs-dr", &rules()).expect("rules");
    if let Err(e) = lab.apply(Path::new(BIN)) {
        panic!("{e:#}");
    }

    let out = lab
        .exec(
            Ns::Up,
            &[
                "timeout",
                "20",
                "python3",
                "-c",
                CLIENT_PY,
                VIP,
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
        "one line per connection:\n{text}{}\nruleset:\n{ruleset}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut per_rs: BTreeMap<&str, usize> = BTreeMap::new();
    for l in &lines {
        let parts: Vec<&str> = l.split_whitespace().collect();
        assert!(
            parts.len() == 2 && parts[0] != "ERR",
            "connection failed: {l}\nall:\n{text}\nruleset:\n{ruleset}"
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
    // would have left an entry (bridged frames are not tracked without br_netfilter)
    let conntrack = lab
        .exec(Ns::Br, &["cat", "/proc/net/nf_conntrack"])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(
        !conntrack.contains(VIP),
        "VIP flows in the director's conntrack:\n{conntrack}"
    );
    eprintln!("connections per realserver: {per_rs:?}");
    // both realserver rules counted packets
    for mac in [C1_MAC, C2_MAC] {
        let line = ruleset
            .lines()
            .find(|l| l.contains(&format!("ether daddr set {mac}")))
            .unwrap_or_else(|| panic!("no dr rule for {mac}:\n{ruleset}"));
        assert!(
            !line.contains("counter packets 0 "),
            "dr rule for {mac} never matched: {line}"
        );
    }
}
