//! The control socket: a Unix stream socket (mode 0600, its directory created, a stale
//! socket replaced) speaking one JSON line each way:
//!
//! ```text
//! -> {"cmd":"status"}          <- {"ok":true,"status":{…}}
//! -> {"cmd":"reload"}          <- {"ok":true,"reload":{"result":"ok"|"refused"|"failed",…}}
//! ```
//! Anything else is answered with `{"ok":false,"error":"…"}`.

use std::fmt::Write as _;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::counters::RuleCounts;
use super::{HealthInfo, ReloadResult, Shared};
use crate::ops::Failure;

/// Longest request line accepted.
const MAX_REQUEST: u64 = 4096;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Request {
    pub cmd: String,
    /// `allow` / `deny`: `add`, `del` or `list`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<String>,
    /// `allow` / `deny` `add` / `del`: an address or prefix
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<ReloadResult>,
    /// `allow` / `deny`: the list after the change
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleStatus {
    pub name: String,
    pub action: String,
    pub families: Vec<String>,
    pub counters: RuleCounts,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadCounts {
    pub ok: u64,
    pub refused: u64,
    pub failed: u64,
    pub last_success: Option<f64>,
}

/// One realserver of a `dr` rule in `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrRealserverStatus {
    /// Its address, else its MAC ([`crate::dr::realserver_id`]).
    pub realserver: String,
    /// Its MAC, given or learned; `None` while unknown (it then holds no buckets).
    pub mac: Option<String>,
    /// How many of the rule's [`crate::dr::DR_BUCKETS`] buckets it holds now: new flows
    /// hashing to them go to it.
    pub buckets: u32,
    /// Its health check's verdict; `None` when it has no check.
    pub up: Option<bool>,
}

/// A `dr` rule in `status`: its realservers' bucket shares now, and (userspace datapath)
/// the frames it forwarded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrStatus {
    pub rule: String,
    pub realservers: Vec<DrRealserverStatus>,
    /// Frames of this rule's flows the userspace datapath sent to a realserver (every frame,
    /// not only first ones) since the daemon started. `None` on the kernel datapath, whose
    /// rule counter counts the first packet of each flow (`diverted`) and the later ones
    /// under `dr pinned`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dr_forwarded: Option<u64>,
}

/// What `brdivert status` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub settings: String,
    pub bridge: String,
    pub uptime_seconds: f64,
    pub started: f64,
    pub rules: Vec<RuleStatus>,
    /// Packets of established flows handled by the flow-pinning rule (all rules together).
    #[serde(default)]
    pub pinned: super::counters::Count,
    /// Set when the kernel's counters could not be read (the totals then miss them).
    pub counters_error: Option<String>,
    pub health: Vec<HealthInfo>,
    /// `dr` rules: bucket shares per realserver, forwarded frames.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dr: Vec<DrStatus>,
    /// The userspace datapath's own counters (ports, verdicts, FDB); `None` on the kernel
    /// datapath.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userspace: Option<crate::datapath::Stats>,
    /// NFQUEUE decisions, while the policy has `decide = "queue"` rules.
    #[serde(default)]
    pub queue: Option<super::queue::QueueStatus>,
    pub last_reload: Option<ReloadResult>,
    pub reloads: ReloadCounts,
}

/// Bind the control socket: create its directory, replace a stale socket (one nobody
/// answers on), refuse when a daemon already listens, and restrict it to the owner.
pub fn bind(path: &Path) -> Result<UnixListener, Failure> {
    let ctx = |what: &str, e: io::Error| {
        Failure::Runtime(anyhow::anyhow!(
            "control socket {}: {what}: {e}",
            path.display()
        ))
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| ctx("creating its directory", e))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(Failure::Runtime(anyhow::anyhow!(
                "control socket {}: exists and is not a socket; remove it or set [control] socket",
                path.display()
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Failure::Runtime(anyhow::anyhow!(
                "control socket {}: another brdivert daemon is running (it answered)",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(|e| ctx("removing the stale socket", e))?;
    }
    // Bind with a umask that leaves only the owner's bits, so the socket is never
    // reachable by others, not even for a moment; nothing else creates files meanwhile
    // (this runs before the daemon's tasks start).
    // SAFETY: umask only changes the process's file mode mask.
    let old = unsafe { libc::umask(0o177) };
    let l = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let l = l.map_err(|e| ctx("binding", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| ctx("setting mode 0600", e))?;
    Ok(l)
}

pub async fn serve(l: UnixListener, shared: Arc<Shared>) {
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                let sh = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(s, sh).await {
                        tracing::debug!("control connection: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("control socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(s: UnixStream, shared: Arc<Shared>) -> io::Result<()> {
    let (r, mut w) = s.into_split();
    let mut line = String::new();
    let mut r = BufReader::new(r.take(MAX_REQUEST));
    tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request"))??;
    let resp = match serde_json::from_str::<Request>(line.trim()) {
        Err(e) => Response::error(format!("bad request: {e}")),
        Ok(req) => match req.cmd.as_str() {
            "status" => Response {
                status: Some(super::snapshot(&shared).await),
                ..Response::good()
            },
            "reload" => Response {
                reload: Some(super::reload(&shared, "control").await),
                ..Response::good()
            },
            "allow" | "deny" => {
                let kind = if req.cmd == "allow" {
                    super::queue::ListKind::Allow
                } else {
                    super::queue::ListKind::Deny
                };
                let op = req.op.as_deref().unwrap_or("list");
                match super::queue::change_list(&shared.lists, kind, op, req.prefix.as_deref()) {
                    Ok(l) => {
                        if op != "list" {
                            tracing::info!(list = req.cmd, op, prefix = ?req.prefix, "list changed");
                        }
                        Response {
                            list: Some(l),
                            ..Response::good()
                        }
                    }
                    Err(e) => Response::error(e),
                }
            }
            other => Response::error(format!("unknown command {other:?}")),
        },
    };
    let mut out = serde_json::to_string(&resp).map_err(io::Error::other)?;
    out.push('\n');
    w.write_all(out.as_bytes()).await?;
    w.shutdown().await
}

impl Response {
    fn good() -> Response {
        Response {
            ok: true,
            error: None,
            status: None,
            reload: None,
            list: None,
        }
    }

    fn error(msg: String) -> Response {
        Response {
            ok: false,
            error: Some(msg),
            ..Response::good()
        }
    }
}

/// Client side: send one request, read one response (blocking; for the CLI).
pub fn request(path: &Path, cmd: &str, timeout: Duration) -> io::Result<Response> {
    request_with(
        path,
        &Request {
            cmd: cmd.into(),
            ..Default::default()
        },
        timeout,
    )
}

/// Client side with a full request (`allow` / `deny`).
pub fn request_with(path: &Path, req: &Request, timeout: Duration) -> io::Result<Response> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let req = serde_json::to_string(req).map_err(io::Error::other)?;
    s.write_all(format!("{req}\n").as_bytes())?;
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(line.trim()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad answer from the daemon: {e}"),
        )
    })
}

fn when(t: f64) -> String {
    let secs = t as i64;
    let (d, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil date from days since the epoch (Howard Hinnant's algorithm), UTC
    let z = d + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `brdivert status` for people.
pub fn format_status(s: &Status) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "brdivert {} (pid {}), bridge {}, settings {}, up {:.0}s",
        s.version, s.pid, s.bridge, s.settings, s.uptime_seconds
    );
    let _ = writeln!(o, "rules ({}):", s.rules.len());
    for r in &s.rules {
        let c = &r.counters;
        let _ = writeln!(
            o,
            "  {:<16} {:<8} {:<10} diverted {} pkts {} bytes, exempted {} pkts {} bytes",
            r.name,
            r.action,
            r.families.join("+"),
            c.diverted.packets,
            c.diverted.bytes,
            c.exempted.packets,
            c.exempted.bytes
        );
        if c.unhealthy.packets > 0 {
            let _ = writeln!(
                o,
                "  {:<16} while unhealthy: {} pkts {} bytes bypassed/dropped",
                "", c.unhealthy.packets, c.unhealthy.bytes
            );
        }
    }
    if s.pinned.packets > 0 {
        let _ = writeln!(
            o,
            "  pinned flows: {} pkts {} bytes",
            s.pinned.packets, s.pinned.bytes
        );
    }
    if let Some(e) = &s.counters_error {
        let _ = writeln!(o, "  (kernel counters unreadable: {e})");
    }
    if !s.health.is_empty() {
        let _ = writeln!(o, "health:");
        for h in &s.health {
            let name = match &h.realserver {
                Some(rs) => format!("{} realserver {rs}", h.rule),
                None => h.rule.clone(),
            };
            let _ = writeln!(
                o,
                "  {:<16} {:<22} {} since {} ({} down, {} up transitions)",
                name,
                h.target,
                if h.up { "UP" } else { "DOWN" },
                when(h.since),
                h.to_down,
                h.to_up
            );
        }
    }
    if !s.dr.is_empty() {
        let _ = writeln!(
            o,
            "dr (buckets of {} each realserver holds now):",
            crate::dr::DR_BUCKETS
        );
        for d in &s.dr {
            match d.dr_forwarded {
                Some(n) => {
                    let _ = writeln!(o, "  {}: {n} frames forwarded to realservers", d.rule);
                }
                None => {
                    let _ = writeln!(o, "  {}:", d.rule);
                }
            }
            for rs in &d.realservers {
                let _ = writeln!(
                    o,
                    "    realserver {:<24} {:>3} buckets, MAC {}, {}",
                    rs.realserver,
                    rs.buckets,
                    rs.mac.as_deref().unwrap_or("unknown"),
                    match rs.up {
                        Some(true) => "health UP",
                        Some(false) => "health DOWN",
                        None => "not health-checked",
                    }
                );
            }
        }
    }
    if let Some(u) = &s.userspace {
        let _ = writeln!(
            o,
            "userspace datapath: diverted {}, passed by rules {}, dropped by rules {}, flooded {}, link-local dropped {}, dr forwarded {}; FDB {} entries ({} evicted)",
            u.diverted,
            u.passed,
            u.policy_dropped,
            u.flooded,
            u.link_local_dropped,
            u.dr_forwarded,
            u.fdb_entries,
            u.fdb_evicted
        );
        for p in &u.ports {
            let _ = writeln!(
                o,
                "  {:<16} rx {} frames {} bytes ({}; {} copied whole, {} bad, {} lost with the ring full), tx {} frames, {} errors, {} over the MTU",
                p.name,
                p.rx_frames,
                p.rx_bytes,
                if p.rx_ring { "ring" } else { "recvmmsg" },
                p.rx_copied,
                p.rx_bad,
                p.rx_full,
                p.tx_frames,
                p.tx_errors,
                p.mtu_dropped
            );
        }
    }
    if let Some(q) = &s.queue {
        let us = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v}us"));
        let _ = writeln!(
            o,
            "queue {}: {} packets; decided divert {}, bypass {}, drop {}; errors {}, queue drops {}; verdict latency p50 <= {}, p99 <= {}",
            if q.inline {
                "(inline, userspace datapath)".to_string()
            } else {
                format!("{:?}", q.queues)
            },
            q.packets,
            q.divert,
            q.bypass,
            q.drop,
            q.errors,
            q.queue_drops,
            us(q.latency_p50_us),
            us(q.latency_p99_us)
        );
        let _ = writeln!(o, "  allow: {:?}\n  deny: {:?}", q.allow, q.deny);
    }
    let _ = writeln!(
        o,
        "reloads: {} ok, {} refused, {} failed",
        s.reloads.ok, s.reloads.refused, s.reloads.failed
    );
    if let Some(r) = &s.last_reload {
        let _ = writeln!(
            o,
            "last reload: {} ({}, {}):",
            r.result,
            r.trigger,
            when(r.at)
        );
        for l in r.message.lines() {
            let _ = writeln!(o, "  {l}");
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_with(dr: Vec<DrStatus>) -> Status {
        Status {
            version: "0.1.0".into(),
            pid: 1,
            settings: "/etc/brdivert/brdivert.toml".into(),
            bridge: "br0".into(),
            uptime_seconds: 3.0,
            started: 0.0,
            rules: Vec::new(),
            pinned: Default::default(),
            counters_error: None,
            health: Vec::new(),
            dr,
            userspace: None,
            queue: None,
            last_reload: None,
            reloads: ReloadCounts {
                ok: 0,
                refused: 0,
                failed: 0,
                last_success: None,
            },
        }
    }

    /// The dr section: per rule its forwarded frames (userspace) and per realserver its
    /// buckets, MAC and health; the JSON round-trips and omits what is not there.
    #[test]
    fn status_shows_dr_buckets_and_forwarded_frames() {
        let rs = |id: &str, mac: Option<&str>, buckets, up| DrRealserverStatus {
            realserver: id.into(),
            mac: mac.map(str::to_string),
            buckets,
            up,
        };
        let s = status_with(vec![
            DrStatus {
                rule: "lvs-dr".into(),
                realservers: vec![
                    rs("10.0.0.31", Some("02:00:00:00:00:31"), 256, Some(true)),
                    rs("10.0.0.32", Some("02:00:00:00:00:32"), 0, Some(false)),
                    rs("2001:db8::33", None, 0, None),
                ],
                dr_forwarded: Some(1234),
            },
            DrStatus {
                rule: "kernel-dr".into(),
                realservers: vec![rs(
                    "02:00:00:00:00:41",
                    Some("02:00:00:00:00:41"),
                    256,
                    None,
                )],
                dr_forwarded: None,
            },
        ]);
        let text = format_status(&s);
        let want = "dr (buckets of 256 each realserver holds now):\n\
            \x20 lvs-dr: 1234 frames forwarded to realservers\n\
            \x20   realserver 10.0.0.31                256 buckets, MAC 02:00:00:00:00:31, health UP\n\
            \x20   realserver 10.0.0.32                  0 buckets, MAC 02:00:00:00:00:32, health DOWN\n\
            \x20   realserver 2001:db8::33               0 buckets, MAC unknown, not health-checked\n\
            \x20 kernel-dr:\n\
            \x20   realserver 02:00:00:00:00:41        256 buckets, MAC 02:00:00:00:00:41, not health-checked\n";
        assert!(text.contains(want), "{text}");
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"dr_forwarded\":1234"), "{json}");
        assert_eq!(json.matches("dr_forwarded").count(), 1, "{json}");
        let back: Status = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        // no dr rules: no section, no key
        let plain = status_with(Vec::new());
        assert!(!format_status(&plain).contains("dr ("));
        assert!(!serde_json::to_string(&plain).unwrap().contains("\"dr\""));
    }

    /// The userspace datapath's section: verdict totals, the FDB, a line per port; the JSON
    /// round-trips, and the kernel datapath's status has neither.
    #[test]
    fn status_shows_the_userspace_datapath_counters() {
        let mut s = status_with(Vec::new());
        s.userspace = Some(crate::datapath::Stats {
            ports: vec![crate::datapath::PortStats {
                name: "eth1".into(),
                rx_frames: 10,
                rx_bytes: 1500,
                tx_frames: 9,
                rx_ring: true,
                rx_copied: 2,
                rx_full: 5,
                ..Default::default()
            }],
            diverted: 4,
            flooded: 1,
            fdb_entries: 3,
            ..Default::default()
        });
        let text = format_status(&s);
        assert!(
            text.contains(
                "userspace datapath: diverted 4, passed by rules 0, dropped by rules 0, flooded 1, \
                 link-local dropped 0, dr forwarded 0; FDB 3 entries (0 evicted)\n\
                 \x20 eth1             rx 10 frames 1500 bytes (ring; 2 copied whole, 0 bad, \
                 5 lost with the ring full), tx 9 frames, 0 errors, 0 over the MTU\n"
            ),
            "{text}"
        );
        let json = serde_json::to_string(&s).unwrap();
        let back: Status = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        let kernel = status_with(Vec::new());
        assert!(!format_status(&kernel).contains("userspace datapath"));
        assert!(
            !serde_json::to_string(&kernel)
                .unwrap()
                .contains("userspace")
        );
    }

    #[test]
    fn dates() {
        assert_eq!(when(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(when(1_700_000_000.0), "2023-11-14T22:13:20Z");
    }

    #[tokio::test]
    async fn bind_is_0600_and_replaces_stale() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/control.sock");
        let l = bind(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // a live daemon: refused
        assert!(bind(&p).is_err());
        drop(l);
        // stale (nobody listens): replaced
        let _l = bind(&p).unwrap();
        // not a socket: left alone, refused
        let f = dir.path().join("file");
        std::fs::write(&f, "x").unwrap();
        assert!(bind(&f).is_err());
        assert!(f.exists());
    }
}
