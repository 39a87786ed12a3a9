//! The network-namespace lab: a throw-away topology for `brdivert lab up|down|demo` and the
//! end-to-end tests (one builder for both).
//!
//! ```text
//!   <p>-c1 (10.77.0.1, fd77::1) ──eth0═══port-c1─┐
//!   <p>-c2 (10.77.0.3, fd77::3) ──eth0═══port-c2─┤ <p>-br: bridge host, Squid (3128/3129/3130)
//!   <p>-up (10.77.0.2, fd77::2) ──eth0═══port-up─┘   br0 10.77.0.254/24 fd77::fe/64 (made by
//!          router + origin: HTTP 80, 8080; UDP echo 5353)   `brdivert apply`, not by the lab)
//! ```
//!
//! The lab creates the namespaces, the veths (ports without addresses), the origin and Squid,
//! and writes a settings file plus a `rules.d/` directory into its own directory; the bridge,
//! its address and every nftables rule come from `brdivert apply -c <settings>`. Dropping a
//! [`Lab`] kills every process it started and deletes its namespaces and directory, also
//! while unwinding from a panic.

use std::fs::{self, File};
use std::io::{self, Read as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

const ORIGIN_PY: &str = include_str!("origin.py");
const INTERCEPT_PY: &str = include_str!("intercept.py");
const SQUID_CONF: &str = include_str!("squid.conf");

/// Prefix of the lab that `brdivert lab up` builds (and `lab down` removes by default).
pub const DEFAULT_PREFIX: &str = "bdlab";

/// Bridge device name in the bridge namespace (created by `brdivert apply`).
pub const BRIDGE: &str = "br0";
/// Bridge port towards client 1 (in the bridge namespace).
pub const PORT_C1: &str = "port-c1";
/// Bridge port towards client 2.
pub const PORT_C2: &str = "port-c2";
/// Bridge port towards the uplink router / origin.
pub const PORT_UP: &str = "port-up";

pub const C1_V4: &str = "10.77.0.1";
pub const UP_V4: &str = "10.77.0.2";
pub const C2_V4: &str = "10.77.0.3";
pub const BR_V4: &str = "10.77.0.254";
pub const C1_V6: &str = "fd77::1";
pub const UP_V6: &str = "fd77::2";
pub const C2_V6: &str = "fd77::3";
pub const BR_V6: &str = "fd77::fe";
/// MAC addresses of the hosts (fixed so that tests can name them).
pub const C1_MAC: &str = "02:77:00:00:00:01";
pub const UP_MAC: &str = "02:77:00:00:00:02";
pub const C2_MAC: &str = "02:77:00:00:00:03";

/// Squid's ports in the bridge namespace.
pub const SQUID_FORWARD: u16 = 3128;
pub const SQUID_INTERCEPT: u16 = 3129;
pub const SQUID_TPROXY: u16 = 3130;
/// Origin ports in the uplink namespace.
pub const ORIGIN_HTTP: [u16; 2] = [80, 8080];
pub const ORIGIN_UDP_ECHO: u16 = 5353;

/// How long readiness polls wait at most.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The four namespaces of a lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ns {
    /// The bridge host (brdivert, Squid).
    Br,
    /// The uplink router and origin server.
    Up,
    /// Client 1.
    C1,
    /// Client 2 (the one tests exempt).
    C2,
}

impl Ns {
    pub const ALL: [Ns; 4] = [Ns::Br, Ns::Up, Ns::C1, Ns::C2];

    fn suffix(self) -> &'static str {
        match self {
            Ns::Br => "br",
            Ns::Up => "up",
            Ns::C1 => "c1",
            Ns::C2 => "c2",
        }
    }
}

/// What the lab runs as its proxy in the bridge namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxy {
    /// No proxy.
    None,
    /// Squid (fails if it is not installed).
    Squid,
    /// The small Python intercepting relay on port 3129 (IPv4, NAT intercept only).
    Fallback,
    /// Squid if installed, otherwise [`Proxy::Fallback`].
    SquidOrFallback,
}

#[derive(Debug, Clone)]
pub struct LabOptions {
    pub proxy: Proxy,
    /// `[bridge] datapath` written into the settings file ("kernel" or "userspace").
    pub datapath: String,
    /// Name prefix; `None` picks a unique `bd<pid%10000><n>`.
    pub prefix: Option<String>,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            proxy: Proxy::Squid,
            datapath: "kernel".into(),
            prefix: None,
        }
    }
}

/// A running lab. Dropping it tears everything down (unless [`Lab::keep`] was called).
pub struct Lab {
    prefix: String,
    dir: PathBuf,
    python: PathBuf,
    children: Vec<(String, Child)>,
    proxy: Proxy,
    keep: bool,
}

/// A background `curl` started by [`Lab::start_transfer`].
pub struct Transfer {
    child: Child,
    url: String,
}

impl Transfer {
    /// Waits for curl (bounded by its own `-m`) and returns the answer; an error if curl
    /// failed (reset, timeout, short body).
    pub fn finish(self) -> Result<HttpReply> {
        let out = self
            .child
            .wait_with_output()
            .with_context(|| format!("waiting for curl {}", self.url))?;
        if !out.status.success() {
            bail!(
                "curl {} failed ({}): {}",
                self.url,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        parse_http_reply(&out.stdout)
    }
}

/// One HTTP answer as curl saw it.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    /// First header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request as an origin (or the bridge-local service) saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct OriginHit {
    pub server: String,
    /// The peer address the server saw (IPv4-mapped addresses unmapped).
    pub peer: String,
    pub port: u16,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl OriginHit {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// True when running as root (the lab needs it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Find an executable in PATH or the sbin directories (`ip netns exec` keeps PATH).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// The lab directory that belongs to a prefix.
pub fn lab_dir(prefix: &str) -> PathBuf {
    std::env::temp_dir().join(format!("brdivert-lab-{prefix}"))
}

fn ns_name(prefix: &str, ns: Ns) -> String {
    format!("{prefix}-{}", ns.suffix())
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn unique_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let pid = std::process::id() % 10_000;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % 100;
        // fixed widths: `bd` + 4 + 2 digits, so different (pid, n) never spell the same name
        let p = format!("bd{pid:04}{n:02}");
        if !Ns::ALL.iter().any(|&ns| netns_exists(&ns_name(&p, ns))) && !lab_dir(&p).exists() {
            return p;
        }
    }
}

/// Run a command, fail with its stderr when it does not exit 0.
fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

/// Run `f` on a thread that has entered network namespace `ns` (by name, `/run/netns/NS`).
pub fn in_netns<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let file = File::open(Path::new("/run/netns").join(ns))
        .with_context(|| format!("opening network namespace {ns}"))?;
    let handle = std::thread::spawn(move || -> io::Result<T> {
        // SAFETY: setns on a valid namespace fd only changes this (short-lived) thread's
        // network namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        f()
    });
    handle
        .join()
        .map_err(|_| anyhow!("thread in namespace {ns} panicked"))?
        .with_context(|| format!("in namespace {ns}"))
}

/// Transport of a listening socket, for [`Lab::wait_listening`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp,
    Udp,
}

/// Ports with a listening (TCP) or bound (UDP) socket in the calling thread's namespace.
fn listening_ports(l4: L4) -> io::Result<Vec<u16>> {
    let (files, state) = match l4 {
        L4::Tcp => (["tcp", "tcp6"], "0A"),
        L4::Udp => (["udp", "udp6"], "07"),
    };
    let mut ports = Vec::new();
    for f in files {
        let mut text = String::new();
        match File::open(format!("/proc/thread-self/net/{f}")) {
            Ok(mut file) => file.read_to_string(&mut text)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 3
                && cols[3] == state
                && let Some(port) = cols[1]
                    .rsplit(':')
                    .next()
                    .and_then(|h| u16::from_str_radix(h, 16).ok())
            {
                ports.push(port);
            }
        }
    }
    Ok(ports)
}

fn parse_http_reply(raw: &[u8]) -> Result<HttpReply> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no header/body separator in curl output: {text:?}"))?;
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(HttpReply {
        status,
        headers,
        body: body.to_string(),
    })
}

fn parse_hit(line: &str) -> Option<OriginHit> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let s = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let headers = v
        .get("headers")
        .and_then(|h| h.as_object())
        .map(|h| {
            h.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    Some(OriginHit {
        server: s("server"),
        peer: s("peer"),
        port: v
            .get("port")
            .and_then(|p| p.as_u64())
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(0),
        path: s("path"),
        headers,
    })
}

impl Lab {
    /// Build a lab with the default options (Squid, kernel datapath, unique prefix).
    pub fn new() -> Result<Lab> {
        Lab::with_options(LabOptions::default())
    }

    pub fn with_options(opts: LabOptions) -> Result<Lab> {
        if !is_root() {
            bail!("the lab needs root (network namespaces, veths, nftables)");
        }
        for prog in ["ip", "nft"] {
            if find_program(prog).is_none() {
                bail!("the lab needs `{prog}` (install iproute2 / nftables)");
            }
        }
        let python = find_program("python3")
            .ok_or_else(|| anyhow!("the lab needs python3 for its origin server"))?;
        // BRDIVERT_LAB_NO_SQUID=1 pretends Squid is missing (to try the fallback relay)
        let squid_found = find_program("squid").is_some()
            && std::env::var_os("BRDIVERT_LAB_NO_SQUID").is_none_or(|v| v.is_empty() || v == "0");
        let proxy = match opts.proxy {
            Proxy::Squid if !squid_found => bail!("squid is not installed"),
            Proxy::SquidOrFallback if squid_found => Proxy::Squid,
            Proxy::SquidOrFallback => Proxy::Fallback,
            p => p,
        };
        let prefix = match opts.prefix {
            Some(p) => {
                if Ns::ALL.iter().any(|&ns| netns_exists(&ns_name(&p, ns))) {
                    bail!(
                        "a lab with prefix {p} exists already (remove it with `brdivert lab down {p}`)"
                    );
                }
                p
            }
            None => unique_prefix(),
        };
        let dir = lab_dir(&prefix);
        let mut lab = Lab {
            prefix,
            dir,
            python,
            children: Vec::new(),
            proxy,
            keep: false,
        };
        // from here on, Drop cleans up whatever was built if a step fails
        lab.build(&opts.datapath)?;
        Ok(lab)
    }

    fn build(&mut self, datapath: &str) -> Result<()> {
        if self.dir.exists() {
            fs::remove_dir_all(&self.dir).ok();
        }
        fs::create_dir_all(self.dir.join("logs"))?;
        fs::create_dir_all(self.dir.join("rules.d"))?;
        // Squid drops to its own user: it must reach the directory and write its logs
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o755))?;
        fs::set_permissions(self.dir.join("logs"), fs::Permissions::from_mode(0o777))?;
        fs::write(self.dir.join("origin.py"), ORIGIN_PY)?;
        fs::write(self.dir.join("intercept.py"), INTERCEPT_PY)?;
        fs::write(
            self.dir.join("hosts"),
            format!(
                "127.0.0.1 localhost\n::1 localhost\n{UP_V4} origin origin.lab\n{UP_V6} origin origin.lab\n"
            ),
        )?;
        fs::write(
            self.dir.join("squid.conf"),
            SQUID_CONF.replace("@DIR@", &self.dir.to_string_lossy()),
        )?;
        fs::write(self.settings_path(), self.settings_text(datapath))?;

        for ns in Ns::ALL {
            ip(&["netns", "add", &self.ns(ns)])?;
            ip(&["-n", &self.ns(ns), "link", "set", "lo", "up"])?;
        }
        let br = self.ns(Ns::Br);
        for (port, host, mac, v4, v6) in [
            (PORT_C1, Ns::C1, C1_MAC, C1_V4, C1_V6),
            (PORT_C2, Ns::C2, C2_MAC, C2_V4, C2_V6),
            (PORT_UP, Ns::Up, UP_MAC, UP_V4, UP_V6),
        ] {
            let h = self.ns(host);
            ip(&[
                "link", "add", "name", port, "netns", &br, "type", "veth", "peer", "name", "eth0",
                "netns", &h,
            ])?;
            // bridge ports carry no addresses, not even IPv6 link-local ones
            ip(&["-n", &br, "link", "set", port, "addrgenmode", "none"])?;
            ip(&["-n", &br, "link", "set", port, "up"])?;
            ip(&["-n", &h, "link", "set", "eth0", "address", mac])?;
            ip(&["-n", &h, "link", "set", "eth0", "up"])?;
            ip(&["-n", &h, "addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
            ip(&[
                "-n",
                &h,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            if host != Ns::Up {
                ip(&["-n", &h, "route", "add", "default", "via", UP_V4])?;
                ip(&["-n", &h, "-6", "route", "add", "default", "via", UP_V6])?;
            }
        }

        // the origin: HTTP on 80 and 8080, UDP echo on 5353
        let log = self.dir.join("origin.log").to_string_lossy().into_owned();
        let script = self.dir.join("origin.py").to_string_lossy().into_owned();
        let mut args = vec![script, "origin".into(), log, "::".into()];
        for p in ORIGIN_HTTP {
            args.extend(["--http".into(), p.to_string()]);
        }
        args.extend(["--udp".into(), ORIGIN_UDP_ECHO.to_string()]);
        let python = self.python.to_string_lossy().into_owned();
        let mut argv = vec![python.as_str()];
        argv.extend(args.iter().map(String::as_str));
        self.spawn(Ns::Up, "origin", &argv)?;
        for p in ORIGIN_HTTP {
            self.wait_listening(Ns::Up, L4::Tcp, p)?;
        }
        self.wait_listening(Ns::Up, L4::Udp, ORIGIN_UDP_ECHO)?;

        match self.proxy {
            Proxy::Squid => {
                let conf = self.dir.join("squid.conf").to_string_lossy().into_owned();
                // Squid names its shared-memory segments (/dev/shm, not per namespace) after
                // the service name: a lab's own name keeps parallel labs' Squids apart.
                let service = squid_service(&self.prefix);
                self.spawn(
                    Ns::Br,
                    "squid",
                    &["squid", "-N", "-n", &service, "-f", &conf],
                )?;
                for p in [SQUID_FORWARD, SQUID_INTERCEPT, SQUID_TPROXY] {
                    self.wait_listening(Ns::Br, L4::Tcp, p)
                        .with_context(|| format!("Squid cache.log:\n{}", self.squid_cache_log()))?;
                }
            }
            Proxy::Fallback | Proxy::SquidOrFallback => {
                let script = self.dir.join("intercept.py").to_string_lossy().into_owned();
                let log = self.squid_access_log_path().to_string_lossy().into_owned();
                let port = SQUID_INTERCEPT.to_string();
                self.spawn(Ns::Br, "intercept", &[&python, &script, &port, &log])?;
                self.wait_listening(Ns::Br, L4::Tcp, SQUID_INTERCEPT)?;
            }
            Proxy::None => {}
        }
        Ok(())
    }

    fn settings_text(&self, datapath: &str) -> String {
        format!(
            "# brdivert lab {prefix}: settings for `brdivert apply -c {path}`\n\
             rules = [\"rules.d/*.toml\"]\n\n\
             [bridge]\n\
             name = \"{BRIDGE}\"\n\
             ports = [\"{PORT_C1}\", \"{PORT_C2}\", \"{PORT_UP}\"]\n\
             datapath = \"{datapath}\"\n\
             address = [\"{BR_V4}/24\", \"{BR_V6}/64\"]\n",
            prefix = self.prefix,
            path = self.settings_path().display(),
        )
    }

    /// The lab's name prefix (namespaces are `<prefix>-br|up|c1|c2`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The lab's private directory (settings, rules.d/, logs/, squid.conf).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Full name of one of the lab's namespaces.
    pub fn ns(&self, ns: Ns) -> String {
        ns_name(&self.prefix, ns)
    }

    /// Which proxy runs in the bridge namespace (after resolving `SquidOrFallback`).
    pub fn proxy(&self) -> Proxy {
        self.proxy
    }

    /// The settings file for `brdivert … -c`.
    pub fn settings_path(&self) -> PathBuf {
        self.dir.join("brdivert.toml")
    }

    /// A VIP owned by the bridge host: `vip/32` on its `lo`, an HTTP service named "vip"
    /// bound to it on port 80, and c1 routing the VIP via the uplink router, so c1's frames
    /// for it carry the router's MAC and only a divert brings them to the bridge host.
    pub fn serve_vip_on_bridge_host(&mut self, vip: &str) -> Result<()> {
        self.exec_ok(
            Ns::Br,
            &["ip", "addr", "add", &format!("{vip}/32"), "dev", "lo"],
        )?;
        self.spawn_http(Ns::Br, "vip", vip, 80)?;
        self.exec_ok(
            Ns::C1,
            &["ip", "route", "add", &format!("{vip}/32"), "via", UP_V4],
        )?;
        Ok(())
    }

    /// A permanent neighbour entry on the router (`up`) for `ip` with `mac`.
    pub fn router_neighbour(&self, ip: &str, mac: &str) -> Result<()> {
        self.exec_ok(
            Ns::Up,
            &[
                "ip",
                "neigh",
                "replace",
                ip,
                "lladdr",
                mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        )?;
        Ok(())
    }

    /// Write `rules.d/<name>.toml` (replacing it) and return its path.
    pub fn write_rules(&self, name: &str, toml: &str) -> Result<PathBuf> {
        let p = self.dir.join("rules.d").join(format!("{name}.toml"));
        fs::write(&p, toml).with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    }

    /// Keep the lab when this value is dropped (for `brdivert lab up`).
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Command that runs `args` inside namespace `ns`.
    pub fn command(&self, ns: Ns, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(ns)]).args(args);
        c
    }

    /// Run `args` in namespace `ns` and return its output (whatever the exit status).
    pub fn exec(&self, ns: Ns, args: &[&str]) -> Result<Output> {
        self.command(ns, args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {args:?} in {}", self.ns(ns)))
    }

    /// The `prerouting` chain of `bridge brdivert` as `nft list` shows it (empty when there
    /// is none): which lookups every bridged frame meets.
    pub fn bridge_prerouting(&self) -> String {
        let table = self
            .exec_ok(Ns::Br, &["nft", "list", "table", "bridge", "brdivert"])
            .unwrap_or_default();
        table
            .split("chain prerouting")
            .nth(1)
            .and_then(|c| c.split("chain ").next())
            .unwrap_or_default()
            .to_string()
    }

    /// Like [`Lab::exec`] but fails unless the command exits 0; returns stdout.
    pub fn exec_ok(&self, ns: Ns, args: &[&str]) -> Result<String> {
        let out = run(&mut self.command(ns, args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Start a long-running process in `ns`; the lab kills it on drop. Output goes to
    /// `logs/<name>.out`.
    pub fn spawn(&mut self, ns: Ns, name: &str, args: &[&str]) -> Result<()> {
        let out = File::create(self.dir.join("logs").join(format!("{name}.out")))?;
        let err = out.try_clone()?;
        let child = self
            .command(ns, args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name} ({args:?})"))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    /// Start an extra HTTP service like the origin (answers with the peer it saw) bound to
    /// `bind` in `ns`, logging to `<name>.log` (read it with [`Lab::hits`]); waits until
    /// it listens.
    pub fn spawn_http(&mut self, ns: Ns, name: &str, bind: &str, port: u16) -> Result<()> {
        let python = self.python.to_string_lossy().into_owned();
        let script = self.dir.join("origin.py").to_string_lossy().into_owned();
        let log = self
            .dir
            .join(format!("{name}.log"))
            .to_string_lossy()
            .into_owned();
        let port_s = port.to_string();
        self.spawn(
            ns,
            name,
            &[&python, &script, name, &log, bind, "--http", &port_s],
        )?;
        self.wait_listening(ns, L4::Tcp, port)
    }

    /// Wait (≤ [`READY_TIMEOUT`]) until something listens on `port` in `ns`. Fails early
    /// if a process the lab started has exited.
    pub fn wait_listening(&mut self, ns: Ns, l4: L4, port: u16) -> Result<()> {
        let name = self.ns(ns);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if in_netns(&name, move || listening_ports(l4))?.contains(&port) {
                return Ok(());
            }
            for (n, c) in &mut self.children {
                if let Some(st) = c.try_wait()? {
                    let out = fs::read_to_string(self.dir.join("logs").join(format!("{n}.out")))
                        .unwrap_or_default();
                    bail!("{n} exited ({st}) before {name} listened on {l4:?}/{port}:\n{out}");
                }
            }
            if Instant::now() > deadline {
                bail!("nothing listens on {l4:?}/{port} in {name} after {READY_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `curl` from `ns` (5 s limit); the answer, or an error when curl got none.
    pub fn curl(&self, ns: Ns, url: &str) -> Result<HttpReply> {
        self.curl_with(ns, url, &[])
    }

    /// `curl` with extra arguments (e.g. `["-x", "http://10.77.0.254:3128"]`).
    pub fn curl_with(&self, ns: Ns, url: &str, extra: &[&str]) -> Result<HttpReply> {
        let mut args = vec![
            "curl",
            "-sS",
            "-i",
            "--connect-timeout",
            "3",
            "-m",
            "5",
            "-g",
        ];
        args.extend_from_slice(extra);
        args.push(url);
        let out = self.exec(ns, &args)?;
        if !out.status.success() {
            bail!(
                "curl {url} from {} failed ({}): {}",
                self.ns(ns),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        parse_http_reply(&out.stdout)
    }

    /// Requests the origin saw whose path is `path` (use a unique path per check).
    pub fn origin_saw(&self, path: &str) -> Vec<OriginHit> {
        self.hits("origin", path)
    }

    /// Requests a service started with [`Lab::spawn_http`] (or "origin") saw on `path`.
    pub fn hits(&self, name: &str, path: &str) -> Vec<OriginHit> {
        fs::read_to_string(self.dir.join(format!("{name}.log")))
            .unwrap_or_default()
            .lines()
            .filter_map(parse_hit)
            .filter(|h| h.path == path)
            .collect()
    }

    fn squid_access_log_path(&self) -> PathBuf {
        self.dir.join("logs").join("access.log")
    }

    /// Squid's access log so far (or the fallback relay's).
    pub fn squid_access_log(&self) -> String {
        fs::read_to_string(self.squid_access_log_path()).unwrap_or_default()
    }

    /// Squid's access log once it mentions `needle`, waiting up to 5 s: Squid writes the
    /// entry when it closes the transaction, which can be just after the client has its reply.
    pub fn squid_access_log_with(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.squid_access_log();
            if log.contains(needle) || Instant::now() >= deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Squid's cache.log so far (for failure messages).
    pub fn squid_cache_log(&self) -> String {
        fs::read_to_string(self.dir.join("logs").join("cache.log")).unwrap_or_default()
    }

    /// Run the brdivert binary inside the bridge namespace: `ip netns exec <p>-br BINARY ARGS`.
    /// brdivert keeps what it created in a state file; each lab gets its own state directory
    /// so that labs running side by side (all with a bridge named `br0`) never share one.
    pub fn brdivert(&self, binary: &Path, args: &[&str]) -> Result<Output> {
        let bin = binary.to_string_lossy().into_owned();
        let mut argv = vec![bin.as_str()];
        argv.extend_from_slice(args);
        self.command(Ns::Br, &argv)
            .env(crate::link::STATE_DIR_ENV, self.dir.join("state"))
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {argv:?} in {}", self.ns(Ns::Br)))
    }

    /// `brdivert apply -c <settings>`; fails (with its output) unless it exits 0.
    pub fn apply(&self, binary: &Path) -> Result<Output> {
        let settings = self.settings_path().to_string_lossy().into_owned();
        let out = self.brdivert(binary, &["apply", "-c", &settings])?;
        if !out.status.success() {
            bail!(
                "brdivert apply failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    /// MAC address of an interface in a namespace.
    pub fn mac(&self, ns: Ns, dev: &str) -> Result<String> {
        let out = ip(&["-n", &self.ns(ns), "-br", "link", "show", "dev", dev])?;
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        line.split_whitespace()
            .nth(2)
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no MAC in {line:?}"))
    }

    /// Send one UDP datagram from `ns` to `to` and return the echo (1 s limit).
    pub fn udp_echo(&self, ns: Ns, to: SocketAddr, payload: &[u8]) -> Result<Vec<u8>> {
        let payload = payload.to_vec();
        in_netns(&self.ns(ns), move || {
            let bind: SocketAddr = if to.is_ipv4() {
                "0.0.0.0:0".parse().map_err(io::Error::other)?
            } else {
                "[::]:0".parse().map_err(io::Error::other)?
            };
            let s = UdpSocket::bind(bind)?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.send_to(&payload, to)?;
            let mut buf = vec![0u8; 65536];
            let (n, _) = s.recv_from(&mut buf)?;
            buf.truncate(n);
            Ok(buf)
        })
    }

    /// Starts `curl` (at most 10 s) in the background: a long transfer to check later with
    /// [`Transfer::finish`].
    pub fn start_transfer(&self, ns: Ns, url: &str, extra: &[&str]) -> Result<Transfer> {
        let mut args = vec![
            "curl",
            "-sS",
            "-i",
            "--connect-timeout",
            "3",
            "-m",
            "10",
            "-g",
        ];
        args.extend_from_slice(extra);
        args.push(url);
        let child = self
            .command(ns, &args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting curl {url}"))?;
        Ok(Transfer {
            child,
            url: url.into(),
        })
    }

    /// Marks the health-checked rule `name` of the lab's policy down or up in the bridge
    /// namespace's kernel, as the daemon's health checker does.
    pub fn set_rule_health(&self, name: &str, up: bool) -> Result<()> {
        let (settings, policy) =
            crate::ops::load(&self.settings_path()).map_err(|e| anyhow!("{e:?}"))?;
        let key = crate::ops::health_key(&settings, &policy, name).map_err(|e| anyhow!("{e:?}"))?;
        in_netns(&self.ns(Ns::Br), move || {
            crate::nft::netlink::set_rule_health(key, up).map_err(io::Error::other)
        })
    }

    /// Whether a TCP connection from `ns` to `to` completes within 2 s.
    pub fn tcp_connects(&self, ns: Ns, to: SocketAddr) -> Result<bool> {
        in_netns(&self.ns(ns), move || {
            Ok(TcpStream::connect_timeout(&to, Duration::from_secs(2)).is_ok())
        })
    }

    /// `ping -c 1` from `ns`; true when it was answered.
    pub fn ping(&self, ns: Ns, addr: &str) -> Result<bool> {
        let out = self.exec(ns, &["ping", "-c", "1", "-W", "2", addr])?;
        Ok(out.status.success())
    }

    fn teardown(&mut self) {
        // processes we started: SIGTERM, a short grace, then SIGKILL
        for (_, c) in &mut self.children {
            // SAFETY: kill(2) on the pid of a child we have not reaped yet.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_millis(500);
        for (_, c) in &mut self.children {
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if matches!(c.try_wait(), Ok(None)) {
                c.kill().ok();
                c.wait().ok();
            }
        }
        self.children.clear();
        remove_lab(&self.prefix);
    }
}

/// The Squid service name of lab `prefix` (letters and digits only, as Squid wants).
fn squid_service(prefix: &str) -> String {
    let alnum: String = prefix.chars().filter(char::is_ascii_alphanumeric).collect();
    format!("brd{alnum}")
}

/// Segments a killed Squid of lab `prefix` left in /dev/shm (a clean exit removes them).
fn remove_squid_shm(prefix: &str) {
    let lead = format!("{}-", squid_service(prefix));
    if let Ok(dir) = fs::read_dir("/dev/shm") {
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().starts_with(&lead) {
                fs::remove_file(e.path()).ok();
            }
        }
    }
}

/// Kill whatever still runs in the lab's namespaces, delete them and the lab directory.
fn remove_lab(prefix: &str) -> bool {
    let mut found = false;
    for ns in Ns::ALL {
        let name = ns_name(prefix, ns);
        if !netns_exists(&name) {
            continue;
        }
        found = true;
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse::<libc::pid_t>().ok())
            {
                // SAFETY: kill(2) of a process that lives in the lab's namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status()
            .ok();
    }
    // every process of the lab is dead now (SIGKILLed Squids leave their segments behind)
    remove_squid_shm(prefix);
    let dir = lab_dir(prefix);
    if dir.exists() {
        found = true;
        fs::remove_dir_all(&dir).ok();
    }
    found
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.keep {
            self.teardown();
        }
    }
}

/// The rule file `demo` and `lab up` use: tcp/80 from the clients to Squid intercept.
pub const DEMO_RULES: &str = r#"# brdivert lab demo: web traffic from the clients goes to Squid (intercept, port 3129)
[[divert]]
name   = "web"
from   = ["port-c1", "port-c2"]
proto  = "tcp"
dport  = [80]
action = "redirect"
port   = 3129
"#;

/// A rule file the test suites use to check refusals: line 5 is bad (unknown action
/// `redirectt`, column 10).
pub const RULES_BAD: &str = r#"[[divert]]
name   = "broken"
proto  = "tcp"
dport  = [80]
action = "redirectt"
port   = 3129
"#;

/// Rules the test suites share: tcp/80 from the clients to Squid intercept, with the second
/// client (c2) exempt over IPv4 and IPv6.
pub const RULES_WEB_EXEMPT_C2: &str = r#"[[divert]]
name   = "web"
from   = ["port-c1", "port-c2"]
proto  = "tcp"
dport  = [80]
except_src = ["10.77.0.3", "fd77::3"]
action = "redirect"
port   = 3129
"#;

fn show_output(out: &Output) {
    for s in [&out.stdout, &out.stderr] {
        let t = String::from_utf8_lossy(s);
        for l in t.lines() {
            println!("    | {l}");
        }
    }
}

/// `brdivert lab demo`: build a lab, divert tcp/80 to Squid, show one diverted and one
/// bridged flow, tear down. Fails when what it saw is not what brdivert promises.
pub fn demo(binary: &Path) -> Result<()> {
    println!("== brdivert lab demo ==");
    let lab = Lab::with_options(LabOptions {
        proxy: Proxy::SquidOrFallback,
        ..LabOptions::default()
    })?;
    println!(
        "built lab {p}: namespaces {p}-c1 (client {C1_V4}), {p}-c2 (client {C2_V4}), \
         {p}-up (router/origin {UP_V4}), {p}-br (bridge host)",
        p = lab.prefix()
    );
    match lab.proxy() {
        Proxy::Squid => println!("Squid runs in {} (intercept port 3129)", lab.ns(Ns::Br)),
        _ => println!(
            "Squid is not installed: using the lab's small Python intercepting relay on \
             port 3129 instead (install squid for the real thing)"
        ),
    }
    let rules = lab.write_rules("demo", DEMO_RULES)?;
    println!(
        "\nsettings {}:\n{}",
        lab.settings_path().display(),
        fs::read_to_string(lab.settings_path())?
    );
    println!("rules {}:\n{DEMO_RULES}", rules.display());
    let settings = lab.settings_path().to_string_lossy().into_owned();
    println!(
        "$ ip netns exec {} {} apply -c {settings}",
        lab.ns(Ns::Br),
        binary.display()
    );
    let out = lab.brdivert(binary, &["apply", "-c", &settings])?;
    show_output(&out);
    if !out.status.success() {
        bail!("brdivert apply failed ({})", out.status);
    }
    println!("$ ip netns exec {} nft list ruleset", lab.ns(Ns::Br));
    show_output(&lab.exec(Ns::Br, &["nft", "list", "ruleset"])?);

    let mut problems = Vec::new();
    println!("\n-- 1. diverted: c1 -> http://{UP_V4}/demo-diverted (tcp/80)");
    let r = lab.curl(Ns::C1, &format!("http://{UP_V4}/demo-diverted"))?;
    let via = r.header("Via").unwrap_or("(none)").to_string();
    println!("   HTTP {} ; Via: {via}", r.status);
    let saw: Vec<String> = lab
        .origin_saw("/demo-diverted")
        .into_iter()
        .map(|h| h.peer)
        .collect();
    println!("   the origin saw the request come from: {saw:?}");
    let log: Vec<String> = lab
        .squid_access_log_with("/demo-diverted")
        .lines()
        .filter(|l| l.contains("/demo-diverted"))
        .map(str::to_string)
        .collect();
    println!("   proxy access log: {log:?}");
    if r.status != 200 || !via.contains("brdivert-lab") {
        problems.push("the diverted reply has no Via header from the lab proxy".to_string());
    }
    if saw != [BR_V4] {
        problems.push(format!(
            "the origin should have seen the bridge ({BR_V4}), saw {saw:?}"
        ));
    }
    if log.is_empty() {
        problems.push("the proxy's access log does not have the request".into());
    }

    println!("\n-- 2. bridged: c1 -> http://{UP_V4}:8080/demo-bridged (tcp/8080, no rule)");
    let r = lab.curl(Ns::C1, &format!("http://{UP_V4}:8080/demo-bridged"))?;
    let via = r.header("Via").map(str::to_string);
    println!(
        "   HTTP {} ; Via: {}",
        r.status,
        via.as_deref().unwrap_or("(none)")
    );
    let saw: Vec<String> = lab
        .origin_saw("/demo-bridged")
        .into_iter()
        .map(|h| h.peer)
        .collect();
    println!("   the origin saw the request come from: {saw:?}");
    if r.status != 200 || via.is_some() {
        problems.push("the bridged flow went through a proxy".into());
    }
    if saw != [C1_V4] {
        problems.push(format!(
            "the origin should have seen the client ({C1_V4}), saw {saw:?}"
        ));
    }

    println!("\ntearing down lab {}", lab.prefix());
    drop(lab);
    if problems.is_empty() {
        println!("demo OK: tcp/80 diverted to the proxy, tcp/8080 bridged untouched");
        Ok(())
    } else {
        bail!("demo FAILED:\n  {}", problems.join("\n  "))
    }
}

/// `brdivert lab up`: build the lab under [`DEFAULT_PREFIX`], apply the demo rules, leave it
/// running and print how to use and remove it. Returns the prefix.
pub fn up(binary: &Path) -> Result<String> {
    let mut lab = Lab::with_options(LabOptions {
        proxy: Proxy::SquidOrFallback,
        prefix: Some(DEFAULT_PREFIX.into()),
        ..LabOptions::default()
    })?;
    lab.write_rules("demo", DEMO_RULES)?;
    let applied = lab.apply(binary);
    lab.keep();
    let p = lab.prefix().to_string();
    let settings = lab.settings_path();
    println!("lab {p} is up (directory {})", lab.dir().display());
    println!("  namespaces: {p}-c1 ({C1_V4}, {C1_V6}), {p}-c2 ({C2_V4}, {C2_V6}),");
    println!(
        "              {p}-up (router/origin {UP_V4}, {UP_V6}; HTTP 80, 8080; UDP echo 5353),"
    );
    println!("              {p}-br (bridge host: {BRIDGE} {BR_V4}, {BR_V6}; proxy on 3128-3130)");
    match applied {
        Ok(_) => println!(
            "  applied {} (tcp/80 -> Squid intercept)",
            settings.display()
        ),
        Err(e) => println!("  WARNING: brdivert apply failed, the bridge is not set up:\n{e:#}"),
    }
    println!("try:");
    println!("  ip netns exec {p}-c1 curl -si http://{UP_V4}/        # diverted to Squid");
    println!("  ip netns exec {p}-c1 curl -si http://{UP_V4}:8080/   # bridged");
    println!("  ip netns exec {p}-br nft list ruleset");
    println!(
        "  edit {}/rules.d/*.toml, then: ip netns exec {p}-br {} apply -c {}",
        lab.dir().display(),
        binary.display(),
        settings.display()
    );
    println!("remove it with: brdivert lab down {p}");
    Ok(p)
}

/// `brdivert lab down [PREFIX]`: remove a lab left by `lab up` (kill its processes, delete
/// its namespaces and directory).
pub fn down(prefix: &str) -> Result<()> {
    if remove_lab(prefix) {
        println!("lab {prefix} removed");
        Ok(())
    } else {
        bail!("no lab with prefix {prefix} (namespaces {prefix}-br|up|c1|c2)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_curl_output() {
        let raw =
            b"HTTP/1.1 200 OK\r\nVia: 1.1 brdivert-lab (squid/5.7)\r\nX-A: b\r\n\r\n{\"x\":1}\n";
        let r = parse_http_reply(raw).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("via"), Some("1.1 brdivert-lab (squid/5.7)"));
        assert_eq!(r.body, "{\"x\":1}\n");
        assert!(parse_http_reply(b"garbage").is_err());
    }

    #[test]
    fn parses_origin_log() {
        let h = parse_hit(r#"{"headers": {"Via": "v"}, "local": "10.77.0.2", "path": "/p", "peer": "10.77.0.1", "port": 80, "server": "origin"}"#).unwrap();
        assert_eq!(h.peer, "10.77.0.1");
        assert_eq!(h.port, 80);
        assert_eq!(h.header("via"), Some("v"));
        assert!(parse_hit("nope").is_none());
    }

    #[test]
    fn prefixes_are_unique_and_short() {
        let a = unique_prefix();
        let b = unique_prefix();
        assert_ne!(a, b);
        assert!(ns_name(&a, Ns::Br).len() <= 15);
    }
}
