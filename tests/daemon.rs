//! The daemon (`brdivert run`) in the namespace lab, with real Squid, origin and curl. Root
//! only: without root (or without the lab's programs) every lab test prints SKIP and passes.
//!
//! The daemon runs in the lab's bridge namespace (`ip netns exec`), with the lab's own state
//! directory, control socket and a `NOTIFY_SOCKET` this test binds, so READY/RELOADING are
//! observed as systemd would observe them.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use brdivert::daemon::control::Status;
use brdivert::daemon::metrics::parse_exposition;
use brdivert::lab::{
    BR_V4, BRIDGE, C2_MAC, C2_V4, L4, Lab, LabOptions, Ns, PORT_C1, Proxy, UP_V4, find_program,
    in_netns, is_root,
};

const BIN: &str = env!("CARGO_BIN_EXE_brdivert");
const METRICS_PORT: u16 = 9477;

/// tcp/80 from the clients to Squid intercept, c2 exempt (shared with the other lab suites).
const RULES_WEB: &str = brdivert::lab::RULES_WEB_EXEMPT_C2;

/// Two valid rule sets that both divert tcp/80 and tcp/8000 (the long transfer) and differ
/// elsewhere.
const RULES_A: &str = r#"[[divert]]
name   = "web"
from   = ["port-c1", "port-c2"]
proto  = "tcp"
dport  = [80, 8000]
action = "redirect"
port   = 3129

[[divert]]
name   = "other"
proto  = "tcp"
dport  = [8081]
action = "pass"
"#;

const RULES_B: &str = r#"[[divert]]
name   = "web"
from   = ["port-c1", "port-c2"]
proto  = "tcp"
dport  = [80, 8000]
action = "redirect"
port   = 3129

[[divert]]
name   = "vip"
dst    = ["10.77.0.100/32"]
action = "local"
"#;

/// Line 5 is bad (unknown action).
const RULES_BAD: &str = brdivert::lab::RULES_BAD;

fn lab() -> Option<Lab> {
    lab_on("kernel")
}

fn lab_on(datapath: &str) -> Option<Lab> {
    if !is_root() {
        eprintln!("SKIP: daemon lab tests need root (network namespaces)");
        return None;
    }
    for prog in ["ip", "nft", "curl", "python3", "squid"] {
        if find_program(prog).is_none() {
            eprintln!("SKIP: daemon lab tests need `{prog}`");
            return None;
        }
    }
    Some(
        Lab::with_options(LabOptions {
            proxy: Proxy::Squid,
            datapath: datapath.into(),
            prefix: None,
        })
        .expect("building the lab"),
    )
}

/// A daemon run in the lab's bridge namespace; SIGKILLed on drop (before the lab goes).
struct Daemon {
    child: Option<Child>,
    notify: UnixDatagram,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Add the daemon's sections to the lab's settings (once per lab).
    fn configure(lab: &Lab, extra: &str) -> PathBuf {
        let socket = lab.dir().join("run").join("control.sock");
        let settings = lab.settings_path();
        let mut text = std::fs::read_to_string(&settings).expect("settings");
        text.push_str(&format!(
            "\n[control]\nsocket = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:{METRICS_PORT}\"\n\n[daemon]\nwatch_interval_ms = 200\n{extra}",
            socket.display()
        ));
        std::fs::write(&settings, text).expect("settings");
        socket
    }

    fn start(lab: &Lab, socket: &Path, name: &str) -> Daemon {
        Daemon::start_with(lab, socket, name, &[])
    }

    fn start_with(lab: &Lab, socket: &Path, name: &str, env: &[(&str, &str)]) -> Daemon {
        let notify_path = lab.dir().join(format!("notify-{name}.sock"));
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
        notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let log = lab.dir().join("logs").join(format!("daemon-{name}.out"));
        let out = std::fs::File::create(&log).expect("log");
        let err = out.try_clone().expect("log");
        let settings = lab.settings_path().to_string_lossy().into_owned();
        let child = lab
            .command(Ns::Br, &[BIN, "run", "-c", &settings])
            .env(brdivert::link::STATE_DIR_ENV, lab.dir().join("state"))
            .env("NOTIFY_SOCKET", &notify_path)
            .env("BRDIVERT_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawning brdivert run");
        let mut d = Daemon {
            child: Some(child),
            notify,
            socket: socket.to_path_buf(),
            log,
        };
        d.wait_notify("READY=1", Duration::from_secs(20));
        d
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait for a notification containing `what`; returns every message seen.
    fn wait_notify(&mut self, what: &str, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(n) = self.notify.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                let hit = m.lines().any(|l| l == what);
                seen.push(m);
                if hit {
                    return seen;
                }
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                // it may have sent `what` just before exiting: drain what is queued
                while let Ok(n) = self.notify.recv(&mut buf) {
                    let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let hit = m.lines().any(|l| l == what);
                    seen.push(m);
                    if hit {
                        return seen;
                    }
                }
                panic!(
                    "brdivert run exited ({st}) before {what} (saw {seen:?}):\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {what} from brdivert run within {limit:?} (saw {seen:?}):\n{}",
                self.log()
            );
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) of our own, not yet reaped child.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// Wait (bounded) for the daemon to exit; its exit status.
    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        let c = self.child.as_mut().expect("running");
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit in {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ctl(&self, args: &[&str]) -> Output {
        let sock = self.socket.to_string_lossy().into_owned();
        let mut a = args.to_vec();
        a.extend(["--socket", &sock]);
        Command::new(BIN)
            .args(&a)
            .stdin(Stdio::null())
            .output()
            .expect("running brdivert")
    }

    fn status(&self) -> Status {
        let out = self.ctl(&["status", "--json"]);
        assert!(out.status.success(), "status: {}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// tcp/80 from c1 went through Squid (Via header; the origin saw the bridge's address).
fn intercepted(lab: &Lab, path: &str) {
    let r = lab
        .curl(Ns::C1, &format!("http://{UP_V4}{path}"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.header("Via").unwrap_or_default().contains("brdivert-lab"),
        "{path}: not through Squid: {r:?}"
    );
    let seen: Vec<String> = lab.origin_saw(path).into_iter().map(|h| h.peer).collect();
    assert_eq!(seen, [BR_V4], "{path}");
}

fn scrape(lab: &Lab) -> String {
    in_netns(&lab.ns(Ns::Br), || {
        let mut s = TcpStream::connect(("127.0.0.1", METRICS_PORT))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .expect("scrape")
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tables(lab: &Lab) -> String {
    lab.exec_ok(Ns::Br, &["nft", "list", "tables"])
        .unwrap_or_default()
}

#[test]
fn daemon_lifecycle() {
    let Some(lab) = lab() else { return };
    lab.write_rules("web", RULES_WEB).expect("rules");
    let socket = Daemon::configure(&lab, "");
    let mut d = Daemon::start(&lab, &socket, "1");

    // intercept works through the daemon's install
    intercepted(&lab, "/d-first");

    // the daemon's netlink counter dump agrees with what nft lists
    let ours = in_netns(&lab.ns(Ns::Br), brdivert::daemon::counters::read).expect("read");
    let listing = lab
        .exec_ok(Ns::Br, &["nft", "list", "table", "bridge", "brdivert"])
        .expect("nft list");
    let mut nft_web = 0u64;
    for line in listing.lines().filter(|l| l.contains("comment \"web\"")) {
        let w: Vec<&str> = line.split_whitespace().collect();
        if let Some(i) = w.iter().position(|&x| x == "packets") {
            nft_web += w
                .get(i + 1)
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    assert!(nft_web > 0, "{listing}");
    assert_eq!(ours["web"].diverted.packets, nft_web, "{listing}");

    // control socket: 0600
    let mode = std::fs::metadata(&socket)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    // status: rules, counters, last reload
    let out = d.ctl(&["status"]);
    assert!(out.status.success(), "{}", text(&out));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("web") && s.contains("redirect"), "{s}");
    assert!(s.contains("last reload: ok (start"), "{s}");
    let st = d.status();
    assert_eq!(st.pid as i32, d.pid());
    let web = st.rules.iter().find(|r| r.name == "web").expect("web");
    assert_eq!(web.families, ["ipv4", "ipv6"]);
    let diverted = web.counters.diverted;
    assert!(
        diverted.packets > 0 && diverted.bytes >= 40 * diverted.packets,
        "frames and their L3 bytes: {st:?}"
    );
    assert!(web.counters.diverted.bytes > 0, "{st:?}");

    // metrics parse as Prometheus text and show the rule
    let resp = scrape(&lab);
    let (head, body) = resp.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let samples = parse_exposition(body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    let diverted = samples
        .iter()
        .find(|(s, _)| {
            s == "brdivert_rule_diverted_packets_total{rule=\"web\",action=\"redirect\"}"
        })
        .unwrap_or_else(|| panic!("no web counter:\n{body}"));
    assert!(diverted.1 > 0.0, "{body}");
    assert!(body.contains("brdivert_build_info{version="), "{body}");

    // a bad file through `reload`: exit 2, position in the output and in status, rules stay
    lab.write_rules("zz-bad", RULES_BAD).expect("rules");
    let out = d.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let all = text(&out);
    assert!(all.contains("zz-bad.toml:5:"), "{all}");
    let st = d.status();
    let last = st.last_reload.clone().expect("last reload");
    assert_eq!(last.result, "refused");
    assert!(last.message.contains("zz-bad.toml:5:"), "{last:?}");
    assert!(
        d.log().contains("zz-bad.toml:5:"),
        "not logged:\n{}",
        d.log()
    );
    intercepted(&lab, "/d-after-refused");
    std::fs::remove_file(lab.dir().join("rules.d/zz-bad.toml")).expect("rm");

    // SIGHUP picks up a new valid file
    lab.write_rules("web", RULES_B).expect("rules");
    d.signal(libc::SIGHUP);
    d.wait_notify("RELOADING=1", Duration::from_secs(10));
    d.wait_notify("READY=1", Duration::from_secs(10));
    wait_until("SIGHUP reload", Duration::from_secs(10), || {
        let st = d.status();
        st.rules.iter().any(|r| r.name == "vip")
            && st
                .last_reload
                .is_some_and(|r| r.ok() && r.trigger == "SIGHUP")
    });
    intercepted(&lab, "/d-after-hup");

    // a changed file alone reloads (watcher, debounced)
    lab.write_rules("web", RULES_A).expect("rules");
    wait_until("file-change reload", Duration::from_secs(10), || {
        let st = d.status();
        st.rules.iter().any(|r| r.name == "other")
            && st
                .last_reload
                .is_some_and(|r| r.ok() && r.trigger == "file")
    });
    // counters survived the reloads: at least what was counted before them
    let st = d.status();
    let web2 = st.rules.iter().find(|r| r.name == "web").expect("web");
    assert!(
        web2.counters.diverted.packets >= web.counters.diverted.packets,
        "{web:?} then {web2:?}"
    );

    // SIGTERM: clean stop, STOPPING, kernel rules kept (default), traffic still diverted
    d.signal(libc::SIGTERM);
    d.wait_notify("STOPPING=1", Duration::from_secs(10));
    let st = d.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "{st}: {}", d.log());
    assert!(!socket.exists(), "control socket left behind");
    assert!(tables(&lab).contains("brdivert"), "{}", tables(&lab));
    intercepted(&lab, "/d-after-stop");
    let out = d.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));

    // restart over a stale socket, then SIGKILL: the kernel keeps diverting and bridging
    std::os::unix::net::UnixListener::bind(&socket).expect("stale socket");
    let mut d2 = Daemon::start(&lab, &socket, "2");
    assert!(d2.status().rules.iter().any(|r| r.name == "other"));
    d2.signal(libc::SIGKILL);
    d2.wait_exit(Duration::from_secs(10));
    intercepted(&lab, "/d-after-kill");
    assert!(
        lab.ping(Ns::C1, UP_V4).expect("ping"),
        "bridging after SIGKILL"
    );
}

#[test]
fn flush_on_exit_and_watchdog() {
    let Some(lab) = lab() else { return };
    lab.write_rules("web", RULES_WEB).expect("rules");
    let socket = Daemon::configure(&lab, "flush_on_exit = true\n");
    // also: the watchdog is fed at half of WATCHDOG_USEC
    let mut d = Daemon::start_with(&lab, &socket, "f", &[("WATCHDOG_USEC", "400000")]);
    assert!(tables(&lab).contains("brdivert"));
    let t = Instant::now();
    d.wait_notify("WATCHDOG=1", Duration::from_secs(5));
    d.wait_notify("WATCHDOG=1", Duration::from_secs(5));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    d.signal(libc::SIGTERM);
    assert!(
        d.wait_exit(Duration::from_secs(10)).success(),
        "{}",
        d.log()
    );
    assert!(!tables(&lab).contains("brdivert"), "{}", tables(&lab));
}

/// UDP sender/receiver with sequence numbers: sends to the origin's echo every 2 ms until
/// STOPFILE exists, then waits for the last echoes and prints a JSON summary.
const UDP_SEQ_PY: &str = r#"
import json, os, socket, struct, sys, threading, time
host, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
s.connect((host, port))
s.settimeout(0.2)
got = set()
done = threading.Event()
def rx():
    while not done.is_set():
        try:
            d = s.recv(2048)
        except socket.timeout:
            continue
        except OSError:
            continue
        if len(d) >= 8:
            got.add(struct.unpack("!Q", d[:8])[0])
t = threading.Thread(target=rx, daemon=True)
t.start()
n = 0
while not os.path.exists(stop):
    s.send(struct.pack("!Q", n) + b"brdivert-seq")
    n += 1
    time.sleep(0.002)
time.sleep(1.5)
done.set()
t.join()
missing = [i for i in range(n) if i not in got]
print(json.dumps({"sent": n, "received": len(got), "missing": len(missing), "first_missing": missing[:10]}), flush=True)
"#;

/// A slow HTTP server (the test's own, so the lab's origin stays as it is): `GET /slow/N`
/// answers 16 KiB every 50 ms for N seconds.
const SLOW_PY: &str = r#"
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        try:
            secs = float(self.path.split("/")[2])
        except (IndexError, ValueError):
            secs = 5.0
        n = max(1, int(secs * 20))
        chunk = b"x" * 16384
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n * len(chunk)))
        self.end_headers()
        for _ in range(n):
            self.wfile.write(chunk)
            self.wfile.flush()
            time.sleep(0.05)
    def log_message(self, *a):
        pass
ThreadingHTTPServer.allow_reuse_address = True
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"#;

const SLOW_PORT: u16 = 8000;

#[test]
fn reload_under_load() {
    let Some(mut lab) = lab() else { return };
    let slow = lab.dir().join("slow.py");
    std::fs::write(&slow, SLOW_PY).expect("slow.py");
    lab.spawn(
        Ns::Up,
        "slow",
        &["python3", &slow.to_string_lossy(), &SLOW_PORT.to_string()],
    )
    .expect("slow server");
    lab.wait_listening(Ns::Up, L4::Tcp, SLOW_PORT)
        .expect("slow server listens");
    lab.write_rules("web", RULES_A).expect("rules");
    let socket = Daemon::configure(&lab, "");
    let d = Daemon::start(&lab, &socket, "load");

    // a long TCP transfer through Squid (tcp/8000 is diverted by both rule sets)
    let secs = 12;
    let expect_bytes = secs * 20 * 16384;
    let curl_out = lab.dir().join("logs").join("curl-slow.out");
    let mut curl = lab
        .command(
            Ns::C1,
            &[
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-D",
                &lab.dir().join("logs/curl-slow.headers").to_string_lossy(),
                "-w",
                "%{http_code} %{size_download}",
                "-m",
                "90",
                &format!("http://{UP_V4}:{SLOW_PORT}/slow/{secs}"),
            ],
        )
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&curl_out).expect("out"))
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl");
    struct KillOnDrop(Option<Child>);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            if let Some(c) = self.0.as_mut() {
                c.kill().ok();
                c.wait().ok();
            }
        }
    }

    // a bridged UDP stream with sequence numbers
    let script = lab.dir().join("udp_seq.py");
    std::fs::write(&script, UDP_SEQ_PY).expect("script");
    let stop = lab.dir().join("udp.stop");
    let udp = lab
        .command(
            Ns::C1,
            &[
                "python3",
                &script.to_string_lossy(),
                UP_V4,
                "5353",
                &stop.to_string_lossy(),
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("udp");
    let mut udp = KillOnDrop(Some(udp));
    std::thread::sleep(Duration::from_secs(1));
    let before = d.status();
    // Diverted packets of the rule: its first packets plus, once pinned, the flow-pinning
    // rule's (every later packet of a diverted flow is counted there).
    let diverted = |s: &Status| {
        s.rules
            .iter()
            .find(|r| r.name == "web")
            .map_or(0, |r| r.counters.diverted.packets)
            + s.pinned.packets
    };
    let web_before = diverted(&before);

    let started = Instant::now();
    let mut refused = 0;
    for i in 0..100 {
        if i == 50 {
            lab.write_rules("zz-bad", RULES_BAD).expect("rules");
            let out = d.ctl(&["reload"]);
            assert_eq!(out.status.code(), Some(2), "bad file: {}", text(&out));
            assert!(text(&out).contains("zz-bad.toml:5:"), "{}", text(&out));
            refused += 1;
            std::fs::remove_file(lab.dir().join("rules.d/zz-bad.toml")).expect("rm");
        }
        lab.write_rules("web", if i % 2 == 0 { RULES_B } else { RULES_A })
            .expect("rules");
        let out = d.ctl(&["reload"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "reload {i}: {}\ndaemon log:\n{}",
            text(&out),
            d.log()
        );
    }
    let took = started.elapsed();
    eprintln!("100 reloads (+1 refused) in {took:?}");
    assert_eq!(refused, 1);
    if let Some(st) = curl.try_wait().expect("curl") {
        let mut err = String::new();
        if let Some(mut e) = curl.stderr.take() {
            e.read_to_string(&mut err).ok();
        }
        panic!(
            "the transfer must still run while the reloads happen (they took {took:?}); curl \
             ended ({st}): {err} {}\nSquid cache.log:\n{}\ndaemon log:\n{}",
            std::fs::read_to_string(&curl_out).unwrap_or_default(),
            lab.squid_cache_log(),
            d.log()
        );
    }
    let after = d.status();
    assert!(after.reloads.ok >= 100, "{:?}", after.reloads);
    assert!(after.reloads.refused >= 1, "{:?}", after.reloads);
    let web_after = diverted(&after);
    assert!(
        web_after > web_before,
        "counters survive reloads: {web_before} then {web_after}"
    );

    // the transfer completes, unbroken, through Squid
    let deadline = Instant::now() + Duration::from_secs(90);
    let st = loop {
        if let Some(st) = curl.try_wait().expect("curl") {
            break st;
        }
        assert!(Instant::now() < deadline, "transfer did not finish");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    if let Some(mut e) = curl.stderr.take() {
        e.read_to_string(&mut err).ok();
    }
    let out = std::fs::read_to_string(&curl_out).unwrap_or_default();
    assert!(st.success(), "curl failed ({st}): {err} {out}");
    assert_eq!(out.trim(), format!("200 {expect_bytes}"), "{err}");
    let headers =
        std::fs::read_to_string(lab.dir().join("logs/curl-slow.headers")).unwrap_or_default();
    assert!(
        headers.contains("brdivert-lab"),
        "not through Squid: {headers}"
    );

    // no UDP sequence number missing
    std::fs::write(&stop, "").expect("stop");
    let udp_child = udp.0.take().expect("udp");
    let out = udp_child.wait_with_output().expect("udp result");
    let summary: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    eprintln!("UDP: {summary}");
    assert!(summary["sent"].as_u64().unwrap_or(0) > 1000, "{summary}");
    assert_eq!(summary["missing"].as_u64(), Some(0), "{summary}");
}

#[test]
fn systemd_unit_verifies() {
    let Some(analyze) = find_program("systemd-analyze") else {
        eprintln!("SKIP: systemd-analyze not installed");
        return;
    };
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/brdivert.service"
    ))
    .expect("unit");
    for want in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WatchdogSec=",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.contains(want), "unit lacks {want}");
    }
    // verify a copy whose ExecStart names a binary that exists (this test's brdivert)
    let dir = tempfile::tempdir().expect("tmp");
    let copy = dir.path().join("brdivert.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/brdivert", BIN)).expect("copy");
    let out = Command::new(analyze)
        .args(["verify", &copy.to_string_lossy()])
        .output()
        .expect("systemd-analyze");
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("brdivert.service:"),
        "warnings about the unit: {all}"
    );
}

#[test]
fn health_state_in_status_and_metrics() {
    let Some(lab) = lab() else { return };
    let rules = |target: &str| {
        format!(
            "{RULES_WEB}health = {{ connect = \"{target}\", interval = \"200ms\", timeout = \"100ms\", fall = 2, rise = 1 }}\n"
        )
    };
    // nothing listens on port 1: the target goes down after `fall` checks
    lab.write_rules("web", &rules("127.0.0.1:1"))
        .expect("rules");
    let socket = Daemon::configure(&lab, "");
    let d = Daemon::start(&lab, &socket, "health");
    wait_until("target down", Duration::from_secs(10), || {
        d.status().health.iter().any(|h| h.rule == "web" && !h.up)
    });
    let out = d.ctl(&["status"]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("DOWN"), "{s}");
    let resp = scrape(&lab);
    let body = resp.split_once("\r\n\r\n").map(|x| x.1).unwrap_or_default();
    let samples = parse_exposition(body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    let get = |k: &str| samples.iter().find(|(s, _)| s == k).map(|x| x.1);
    assert_eq!(
        get("brdivert_health_up{rule=\"web\",target=\"127.0.0.1:1\"}"),
        Some(0.0),
        "{body}"
    );
    assert_eq!(
        get("brdivert_health_transitions_total{rule=\"web\",target=\"127.0.0.1:1\",to=\"down\"}"),
        Some(1.0),
        "{body}"
    );
    // reload with a target that answers (Squid): the restarted checker starts down and
    // comes up after `rise`
    lab.write_rules("web", &rules("127.0.0.1:3129"))
        .expect("rules");
    let out = d.ctl(&["reload"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until("target up", Duration::from_secs(10), || {
        d.status()
            .health
            .iter()
            .any(|h| h.rule == "web" && h.up && h.to_up == 1 && h.target == "127.0.0.1:3129")
    });
}

/// `brdivert run` drives the userspace datapath: it bridges and diverts through its TAP local
/// port, reloads swap the policy (a bad file is refused), health is reported, and stopping
/// removes the TAP (nothing forwards without the daemon in this mode).
#[test]
fn userspace_datapath_under_the_daemon() {
    let Some(lab) = lab_on("userspace") else {
        return;
    };
    lab.write_rules("web", RULES_WEB).expect("rules");
    let socket = Daemon::configure(&lab, "");
    let mut d = Daemon::start(&lab, &socket, "u1");

    intercepted(&lab, "/u-first");
    let tap = lab
        .exec(Ns::Br, &["ip", "-d", "link", "show", "dev", "br0"])
        .expect("ip");
    assert!(
        String::from_utf8_lossy(&tap.stdout).contains("tun type tap"),
        "br0 is the datapath's TAP: {}",
        String::from_utf8_lossy(&tap.stdout)
    );
    // bridged traffic still flows (port 8080 has no rule)
    let r = lab
        .curl(Ns::C1, &format!("http://{UP_V4}:8080/u-bridged"))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", d.log()));
    assert_eq!(r.header("Via"), None, "{r:?}");

    // status and metrics count what the datapath did: the rule's packets (its own count,
    // this datapath has no nft rule counters), the verdicts, every port's frames and how
    // they were received
    let st = d.status();
    let web = st.rules.iter().find(|r| r.name == "web").expect("web row");
    let diverted = web.counters.diverted;
    assert!(
        diverted.packets > 0 && diverted.bytes >= 40 * diverted.packets,
        "frames and their L3 bytes: {st:?}"
    );
    let u = st
        .userspace
        .as_ref()
        .expect("status has the userspace section");
    assert!(u.diverted > 0 && u.fdb_entries >= 2, "{u:?}");
    let port = |name: &str| u.ports.iter().find(|p| p.name == name).expect(name);
    for name in ["port-c1", "port-up"] {
        let p = port(name);
        assert!(p.rx_ring && p.rx_frames > 0 && p.tx_frames > 0, "{p:?}");
    }
    assert!(
        port("br0").rx_frames > 0,
        "the TAP carried Squid's replies: {u:?}"
    );
    let shown = text(&d.ctl(&["status"]));
    assert!(shown.contains("userspace datapath: diverted"), "{shown}");
    let resp = scrape(&lab);
    let m = resp.split_once("\r\n\r\n").map(|x| x.1).unwrap_or_default();
    let samples = parse_exposition(m).unwrap_or_else(|e| panic!("{e}\n{m}"));
    assert!(
        samples
            .iter()
            .any(|(s, v)| s == "brdivert_userspace_frames_total{what=\"diverted\"}" && *v > 0.0),
        "{m}"
    );

    // a refused reload keeps the running policy
    lab.write_rules("zz-bad", "[[divert]]\nname = \"bad\"\naction = \"nope\"\n")
        .expect("rules");
    let out = d.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    intercepted(&lab, "/u-after-bad");

    // a valid reload that stops diverting port 80: new flows are bridged
    std::fs::remove_file(lab.dir().join("rules.d").join("zz-bad.toml")).expect("rm");
    lab.write_rules("web", &RULES_WEB.replace("dport  = [80]", "dport  = [81]"))
        .expect("rules");
    let out = d.ctl(&["reload"]);
    assert!(out.status.success(), "{}", text(&out));
    let r = lab
        .curl(Ns::C1, &format!("http://{UP_V4}/u-after-reload"))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", d.log()));
    assert_eq!(r.header("Via"), None, "port 80 no longer diverted: {r:?}");

    // stopping stops the datapath and removes the TAP
    d.signal(libc::SIGTERM);
    let st = d.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "{st}: {}", d.log());
    let gone = lab
        .exec(Ns::Br, &["ip", "link", "show", "dev", "br0"])
        .expect("ip");
    assert!(!gone.status.success(), "TAP left behind after stop");
}

/// `decide = "queue"`: tcp/80 from the clients, first packet of each new flow decided by the
/// daemon over NFQUEUE (this kernel: the xt NFQUEUE target through nft compat).
const RULES_QUEUE: &str = r#"[[divert]]
name   = "web"
from   = ["port-c1", "port-c2"]
proto  = "tcp"
dport  = [80]
action = "redirect"
port   = 3129
decide = "queue"
"#;

/// The origin saw exactly `peer` for `path` (bridged: the client; diverted: the bridge).
fn origin_peer(lab: &Lab, path: &str, peer: &str) {
    let seen: Vec<String> = lab.origin_saw(path).into_iter().map(|h| h.peer).collect();
    assert_eq!(seen, [peer], "{path}");
}

fn queue_status(d: &Daemon) -> brdivert::daemon::queue::QueueStatus {
    d.status()
        .queue
        .expect("queue stats in status while queue rules are loaded")
}

#[test]
fn queue_decisions_end_to_end() {
    let Some(lab) = lab() else { return };
    lab.write_rules("web", RULES_QUEUE).expect("rules");
    let socket = Daemon::configure(&lab, "");
    let mut d = Daemon::start(&lab, &socket, "q1");

    // three new flows: each diverted to Squid, each queued exactly once (its first packet)
    for i in 0..3 {
        intercepted(&lab, &format!("/q-divert-{i}"));
    }
    let q = queue_status(&d);
    assert_eq!(
        q.packets,
        3,
        "one queued packet per flow: {q:?}\n{}",
        d.log()
    );
    assert_eq!((q.divert, q.bypass, q.drop), (3, 0, 0), "{q:?}");
    assert!(q.latency_p50_us.is_some() && q.latency_count == 3, "{q:?}");
    let m = scrape(&lab);
    assert!(
        m.contains("brdivert_queue_flows_decided_total{verdict=\"divert\"} 3"),
        "{m}"
    );
    // other ports stay bridged (br_netfilter is on for the bridge now)
    let r = lab
        .curl(Ns::C1, &format!("http://{UP_V4}:8080/q-other"))
        .expect("bridged 8080");
    assert_eq!(r.status, 200);
    origin_peer(&lab, "/q-other", brdivert::lab::C1_V4);

    // deny list: new flows from c1 are dropped; allow list: bridged, not diverted
    let out = d.ctl(&["deny", "add", brdivert::lab::C1_V4]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        lab.curl_with(Ns::C1, &format!("http://{UP_V4}/q-denied"), &["-m", "2"])
            .is_err(),
        "denied client got through"
    );
    assert!(lab.origin_saw("/q-denied").is_empty());
    assert!(
        d.ctl(&["deny", "del", brdivert::lab::C1_V4])
            .status
            .success()
    );
    assert!(d.ctl(&["allow", "add", "10.77.0.0/24"]).status.success());
    let out = d.ctl(&["allow", "list"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "10.77.0.0/24");
    let r = lab
        .curl(Ns::C1, &format!("http://{UP_V4}/q-allowed"))
        .expect("allowed");
    assert_eq!(r.status, 200);
    assert!(r.header("Via").is_none(), "allowed flow went through Squid");
    origin_peer(&lab, "/q-allowed", brdivert::lab::C1_V4);
    assert!(d.ctl(&["allow", "del", "10.77.0.0/24"]).status.success());
    let q = queue_status(&d);
    assert!(q.drop >= 1 && q.bypass == 1, "{q:?}");

    // a long download diverted, then the daemon SIGKILLed: it finishes (the verdict is in
    // the ct mark), and new flows are bridged (the queue rule's bypass)
    let path = "/slow/q-long";
    let t = lab
        .start_transfer(Ns::C1, &format!("http://{UP_V4}{path}"), &[])
        .expect("transfer");
    wait_until(
        "the long transfer reached the origin",
        Duration::from_secs(5),
        || !lab.origin_saw(path).is_empty(),
    );
    d.signal(libc::SIGKILL);
    d.wait_exit(Duration::from_secs(5));
    let r = lab
        .curl(Ns::C1, &format!("http://{UP_V4}/q-bypassed"))
        .expect("bridged while the daemon is gone");
    assert_eq!(r.status, 200);
    assert!(r.header("Via").is_none(), "{r:?}");
    origin_peer(&lab, "/q-bypassed", brdivert::lab::C1_V4);
    let r = t.finish().expect("the diverted download finished");
    assert_eq!(r.status, 200);
    assert!(r.header("Via").unwrap_or_default().contains("brdivert-lab"));
    assert_eq!(r.body.len(), 30 * 1000, "short body");
    origin_peer(&lab, path, BR_V4);

    // restarted: decisions resume
    let d = Daemon::start(&lab, &socket, "q2");
    intercepted(&lab, "/q-resumed");
    let q = queue_status(&d);
    assert_eq!((q.packets, q.divert), (1, 1), "{q:?}");
}

/// The VIP of [`queue_local_vip_end_to_end`], on the bridge host's `lo`.
const VIP: &str = "10.77.0.100";

/// `local` with `decide = "queue"`: tcp/80 to the VIP, first packet of each flow decided by
/// the daemon, the rest of the flow handed to the bridge host by the `q_divert` bridge chain.
const RULES_QUEUE_VIP: &str = r#"[[divert]]
name   = "vip"
proto  = "tcp"
dport  = [80]
dst    = ["10.77.0.100/32"]
action = "local"
decide = "queue"
"#;

/// The `q_divert` rule's packet counter (frames handed to the host on a divert verdict).
fn q_divert_packets(lab: &Lab) -> u64 {
    let out = lab
        .exec_ok(
            Ns::Br,
            &["nft", "list", "chain", "bridge", "brdivert", "q_divert"],
        )
        .expect("nft list chain q_divert");
    let line = out
        .lines()
        .find(|l| l.contains("comment \"vip: divert\""))
        .unwrap_or_else(|| panic!("no vip divert rule in q_divert:\n{out}"));
    let mut words = line.split_whitespace();
    words
        .find(|w| *w == "packets")
        .and_then(|_| words.next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no packet counter in {line:?}"))
}

#[test]
fn queue_local_vip_end_to_end() {
    let Some(mut lab) = lab() else { return };
    // the VIP is served on the bridge host; c1 sends VIP frames to the router's MAC
    lab.serve_vip_on_bridge_host(VIP)
        .expect("VIP on the bridge host");
    lab.write_rules("vip", RULES_QUEUE_VIP).expect("rules");
    let socket = Daemon::configure(&lab, "");
    let d = Daemon::start(&lab, &socket, "qv");

    // three flows, each answered by the bridge host's VIP service, each queued once
    for i in 0..3 {
        let path = format!("/qv-{i}");
        let r = lab
            .curl(Ns::C1, &format!("http://{VIP}{path}"))
            .unwrap_or_else(|e| panic!("{e:#}\n{}", d.log()));
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            r.header("X-Lab-Server"),
            Some("vip"),
            "answered by the bridge host's service: {r:?}"
        );
        let seen: Vec<String> = lab.hits("vip", &path).into_iter().map(|h| h.peer).collect();
        assert_eq!(seen, [brdivert::lab::C1_V4], "{path}");
        assert!(
            lab.origin_saw(&path).is_empty(),
            "{path} reached the origin"
        );
    }
    let neigh = lab
        .exec_ok(Ns::C1, &["ip", "neigh", "show", UP_V4])
        .unwrap_or_default();
    assert!(
        neigh.contains(brdivert::lab::UP_MAC),
        "c1 sent the VIP frames to the router's MAC: {neigh}"
    );
    let q = queue_status(&d);
    assert_eq!(
        q.packets,
        3,
        "one queued packet per flow: {q:?}\n{}",
        d.log()
    );
    assert_eq!(
        (q.divert, q.bypass, q.drop, q.errors),
        (3, 0, 0, 0),
        "{q:?}"
    );
    // every client packet of those flows (SYN, ACK, request, ACKs, FIN: more than 3) went
    // up through q_divert, but only the SYNs reached the daemon
    let diverted = q_divert_packets(&lab);
    assert!(diverted > 3 * 3, "q_divert counted {diverted} packets");

    // the verdict is what diverts: an allow-listed VIP is bypassed, i.e. bridged to the
    // router, which does not hold the VIP, so the bridge host's service never sees it
    assert!(d.ctl(&["allow", "add", VIP]).status.success());
    let r = lab.curl_with(Ns::C1, &format!("http://{VIP}/qv-allowed"), &["-m", "2"]);
    assert!(
        r.as_ref()
            .map_or(true, |r| r.header("X-Lab-Server") != Some("vip")),
        "a bypassed flow was answered by the bridge host: {r:?}"
    );
    assert!(lab.hits("vip", "/qv-allowed").is_empty());
    assert_eq!(
        q_divert_packets(&lab),
        diverted,
        "a bypassed flow was diverted"
    );
    let q = queue_status(&d);
    assert_eq!((q.divert, q.bypass), (3, 1), "{q:?}");
    assert!(d.ctl(&["allow", "del", VIP]).status.success());

    // and diverted again once it is off the list
    let r = lab
        .curl(Ns::C1, &format!("http://{VIP}/qv-again"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(r.header("X-Lab-Server"), Some("vip"), "{r:?}");
    assert_eq!(queue_status(&d).divert, 4);
}

/// `decide = "queue"` on the userspace datapath: no NFQUEUE; the datapath's threads ask the
/// daemon's decider (the same `PolicyDecider`: lists, health, rate limit) for the first frame
/// of each new flow and pin the verdict in their flow table. Checked through `status --json`:
/// one decision per flow (retransmitted SYNs of a dropped flow included), diverted per
/// decision, deny/allow change new flows only.
#[test]
fn queue_decisions_inline_on_the_userspace_datapath() {
    let Some(lab) = lab_on("userspace") else {
        return;
    };
    lab.write_rules("web", RULES_QUEUE).expect("rules");
    let socket = Daemon::configure(&lab, "");
    let d = Daemon::start(&lab, &socket, "uq1");

    // three new flows: each diverted to Squid, each decided exactly once
    for i in 0..3 {
        intercepted(&lab, &format!("/uq-divert-{i}"));
    }
    let q = queue_status(&d);
    assert!(q.inline && q.queues.is_empty(), "{q:?}");
    assert_eq!(
        (q.packets, q.divert, q.bypass, q.drop),
        (3, 3, 0, 0),
        "one decision per flow: {q:?}\n{}",
        d.log()
    );
    assert_eq!(q.latency_count, 3, "{q:?}");
    let m = scrape(&lab);
    assert!(
        m.contains("brdivert_queue_flows_decided_total{verdict=\"divert\"} 3"),
        "{m}"
    );
    // other ports are bridged and never decided
    let r = lab
        .curl(Ns::C1, &format!("http://{UP_V4}:8080/uq-other"))
        .expect("bridged 8080");
    assert_eq!(r.status, 200);
    origin_peer(&lab, "/uq-other", brdivert::lab::C1_V4);
    assert_eq!(queue_status(&d).packets, 3);

    // deny: a new flow from c1 is dropped; its retransmitted SYNs follow the pinned drop
    let out = d.ctl(&["deny", "add", brdivert::lab::C1_V4]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        lab.curl_with(Ns::C1, &format!("http://{UP_V4}/uq-denied"), &["-m", "3"])
            .is_err(),
        "denied client got through"
    );
    assert!(lab.origin_saw("/uq-denied").is_empty());
    let q = queue_status(&d);
    assert_eq!(
        (q.packets, q.drop),
        (4, 1),
        "the denied flow was decided once: {q:?}"
    );
    assert!(
        d.ctl(&["deny", "del", brdivert::lab::C1_V4])
            .status
            .success()
    );
    // allow: bridged straight to the origin, not through Squid
    assert!(d.ctl(&["allow", "add", "10.77.0.0/24"]).status.success());
    let r = lab
        .curl(Ns::C1, &format!("http://{UP_V4}/uq-allowed"))
        .expect("allowed");
    assert_eq!(r.status, 200);
    assert!(r.header("Via").is_none(), "allowed flow went through Squid");
    origin_peer(&lab, "/uq-allowed", brdivert::lab::C1_V4);
    assert!(d.ctl(&["allow", "del", "10.77.0.0/24"]).status.success());
    // lists empty again: new flows are diverted again
    intercepted(&lab, "/uq-again");
    let q = queue_status(&d);
    assert_eq!(
        (q.packets, q.divert, q.bypass, q.drop),
        (6, 4, 1, 1),
        "{q:?}\n{}",
        d.log()
    );
    let out = d.ctl(&["status"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("queue (inline, userspace datapath)"),
        "{}",
        text(&out)
    );
}

/// After a reload that changed which frames the rules select, every frame meets the pin
/// lookup until the earlier policy's pins have expired; then the daemon installs the running
/// policy again (trigger "pin timeout"), without that lookup. The record here says an
/// earlier policy (port 81) was replaced 3 h minus 4 s ago.
#[test]
fn pin_lookups_for_every_frame_expire() {
    let Some(lab) = lab() else { return };
    lab.write_rules("web", RULES_WEB).expect("rules");
    let socket = Daemon::configure(&lab, "");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let until = now + 4 - brdivert::nft::compile::PIN_TIMEOUT_S;
    let record = format!(
        r#"{{"current": [], "earlier": [{{"map": "flows", "scope": "tcp/81 of an earlier policy", "until": {until}}}]}}"#
    );
    let state = lab.dir().join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    std::fs::write(
        brdivert::link::state::pins_state_path(&state, BRIDGE),
        record,
    )
    .expect("pin record");
    let d = Daemon::start(&lab, &socket, "pins");
    assert!(
        lab.bridge_prerouting().contains("@flows4"),
        "{}",
        lab.bridge_prerouting()
    );
    intercepted(&lab, "/d-pins-before");
    wait_until(
        "the per-frame pin lookup dropped",
        Duration::from_secs(15),
        || !lab.bridge_prerouting().contains("@flows4"),
    );
    let s = d.status();
    let last = s.last_reload.expect("a reload");
    assert_eq!(
        (last.result.as_str(), last.trigger.as_str()),
        ("ok", "pin timeout")
    );
    // the rule's chain still looks pinned flows up, and intercept still works
    intercepted(&lab, "/d-pins-after");
    let t = lab
        .exec_ok(
            Ns::Br,
            &["nft", "list", "chain", "bridge", "brdivert", "rule_web"],
        )
        .expect("nft");
    assert!(t.contains("web: pinned"), "{t}");
}

/// `bridge.static_fdb` reaches the userspace datapath under `brdivert run`: client 2's MAC
/// pinned to client 1's own port sends client 1's frames for it back where they came from,
/// which the datapath drops (no hairpin), whatever client 2's own frames would teach the FDB.
/// A reload takes the entry away (client 2 is reachable again, learnt) and brings it back.
#[test]
fn static_fdb_entries_from_the_settings() {
    let Some(lab) = lab_on("userspace") else {
        return;
    };
    lab.write_rules("web", RULES_WEB).expect("rules");
    let settings = lab.settings_path();
    let original = std::fs::read_to_string(&settings).expect("settings");
    let entry =
        format!("[bridge]\nstatic_fdb = [{{ mac = \"{C2_MAC}\", port = \"{PORT_C1}\" }}]\n");
    assert!(original.contains("[bridge]\n"), "{original}");
    let pinned = original.replacen("[bridge]\n", &entry, 1);
    std::fs::write(&settings, &pinned).expect("settings");
    let socket = Daemon::configure(&lab, "");
    let d = Daemon::start(&lab, &socket, "fdb");
    let ping = |dst: &str| {
        lab.exec(Ns::C1, &["ping", "-c", "2", "-W", "1", dst])
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    assert!(
        ping(UP_V4),
        "client 1 reaches the router through the datapath"
    );
    assert!(
        !ping(C2_V4),
        "frames for client 2 went out of its static port anyway"
    );

    let reload = |what: &str| {
        let out = d.ctl(&["reload"]);
        assert!(out.status.success(), "reload ({what}): {}", text(&out));
        let last = d.status().last_reload.expect("last reload");
        assert!(last.ok(), "reload ({what}): {last:?}");
    };
    // Daemon::configure added its own keys to the file: take the entry out of that text
    let configured = std::fs::read_to_string(&settings).expect("settings");
    assert!(configured.contains(&entry), "{configured}");
    std::fs::write(&settings, configured.replacen(&entry, "[bridge]\n", 1)).expect("settings");
    reload("entry removed");
    assert!(
        ping(C2_V4),
        "client 2 unreachable after its static entry was removed"
    );
    assert!(
        !d.log().contains("static_fdb changed"),
        "the change should apply, not wait for a restart:\n{}",
        d.log()
    );
    std::fs::write(&settings, &configured).expect("settings");
    reload("entry back");
    assert!(
        !ping(C2_V4),
        "the static entry did not come back with the reload"
    );
}
