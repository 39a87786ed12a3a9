//! Prometheus metrics over a minimal HTTP/1.1 responder: `GET /metrics` answers the text
//! exposition format (version 0.0.4), one request per connection.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::Shared;
use super::control::Status;
use crate::ops::Failure;

pub async fn bind(listen: &str) -> Result<TcpListener, Failure> {
    TcpListener::bind(listen)
        .await
        .map_err(|e| Failure::Runtime(anyhow::anyhow!("metrics.listen {listen}: binding: {e}")))
}

pub async fn serve(l: TcpListener, shared: Arc<Shared>) {
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                let sh = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(s, sh).await {
                        tracing::debug!("metrics connection: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("metrics accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(mut s: TcpStream, shared: Arc<Shared>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.len() > 8192 {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if head.is_err() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&buf);
    let mut first = text.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (code, ctype, body) = if method != "GET" && method != "HEAD" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        )
    } else if path == "/metrics" {
        let st = super::snapshot(&shared).await;
        (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(&st),
        )
    } else if path == "/" {
        ("200 OK", "text/plain", "brdivert: see /metrics\n".into())
    } else {
        ("404 Not Found", "text/plain", "not found\n".into())
    };
    let mut resp = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        resp.push_str(&body);
    }
    s.write_all(resp.as_bytes()).await?;
    s.shutdown().await
}

/// Escape a label value (backslash, double quote, newline).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}");
    let _ = writeln!(o, "# TYPE {name} {kind}");
}

/// The exposition text for one status snapshot.
pub fn render(st: &Status) -> String {
    let mut o = String::new();
    family(
        &mut o,
        "brdivert_build_info",
        "gauge",
        "Build information (always 1).",
    );
    let _ = writeln!(
        o,
        "brdivert_build_info{{version=\"{}\"}} 1",
        esc(&st.version)
    );
    family(
        &mut o,
        "brdivert_start_time_seconds",
        "gauge",
        "Unix time the daemon started.",
    );
    let _ = writeln!(o, "brdivert_start_time_seconds {:.3}", st.started);
    type Pick = fn(&super::counters::RuleCounts) -> u64;
    let per_rule: [(&str, &str, Pick); 6] = [
        (
            "brdivert_rule_diverted_packets_total",
            "Packets the rule's action took (diverted; for pass/drop rules: passed/dropped).",
            |c| c.diverted.packets,
        ),
        (
            "brdivert_rule_diverted_bytes_total",
            "Bytes the rule's action took.",
            |c| c.diverted.bytes,
        ),
        (
            "brdivert_rule_exempted_packets_total",
            "Packets the rule's except_src/except_dst lists exempted.",
            |c| c.exempted.packets,
        ),
        (
            "brdivert_rule_exempted_bytes_total",
            "Bytes the rule's exemptions exempted.",
            |c| c.exempted.bytes,
        ),
        (
            "brdivert_rule_unhealthy_packets_total",
            "Packets of new flows bypassed or dropped while the rule's target was down.",
            |c| c.unhealthy.packets,
        ),
        (
            "brdivert_rule_unhealthy_bytes_total",
            "Bytes of those.",
            |c| c.unhealthy.bytes,
        ),
    ];
    for (name, help, pick) in per_rule {
        family(&mut o, name, "counter", help);
        for r in &st.rules {
            let _ = writeln!(
                o,
                "{name}{{rule=\"{}\",action=\"{}\"}} {}",
                esc(&r.name),
                esc(&r.action),
                pick(&r.counters)
            );
        }
    }
    family(
        &mut o,
        "brdivert_pinned_packets_total",
        "counter",
        "Packets of established flows kept on their path by flow pinning (all rules).",
    );
    let _ = writeln!(o, "brdivert_pinned_packets_total {}", st.pinned.packets);
    family(
        &mut o,
        "brdivert_pinned_bytes_total",
        "counter",
        "Bytes of those.",
    );
    let _ = writeln!(o, "brdivert_pinned_bytes_total {}", st.pinned.bytes);
    family(
        &mut o,
        "brdivert_health_up",
        "gauge",
        "1 when the rule's health-check target is up, 0 when down.",
    );
    for h in &st.health {
        let _ = writeln!(
            o,
            "brdivert_health_up{{rule=\"{}\",target=\"{}\"}} {}",
            esc(&h.rule),
            esc(&h.target),
            u8::from(h.up)
        );
    }
    family(
        &mut o,
        "brdivert_health_transitions_total",
        "counter",
        "Health state changes per target, by the state changed to.",
    );
    for h in &st.health {
        for (to, n) in [("down", h.to_down), ("up", h.to_up)] {
            let _ = writeln!(
                o,
                "brdivert_health_transitions_total{{rule=\"{}\",target=\"{}\",to=\"{to}\"}} {n}",
                esc(&h.rule),
                esc(&h.target)
            );
        }
    }
    family(
        &mut o,
        "brdivert_dr_buckets",
        "gauge",
        "Hash buckets (of 256) of a dr rule the realserver holds now; new flows hashing to them go to it.",
    );
    for d in &st.dr {
        for rs in &d.realservers {
            let _ = writeln!(
                o,
                "brdivert_dr_buckets{{rule=\"{}\",realserver=\"{}\"}} {}",
                esc(&d.rule),
                esc(&rs.realserver),
                rs.buckets
            );
        }
    }
    if st.dr.iter().any(|d| d.dr_forwarded.is_some()) {
        family(
            &mut o,
            "brdivert_dr_forwarded_frames_total",
            "counter",
            "Frames of a dr rule's flows the userspace datapath sent to a realserver.",
        );
        for d in &st.dr {
            if let Some(n) = d.dr_forwarded {
                let _ = writeln!(
                    o,
                    "brdivert_dr_forwarded_frames_total{{rule=\"{}\"}} {n}",
                    esc(&d.rule)
                );
            }
        }
    }
    if let Some(u) = &st.userspace {
        userspace_metrics(&mut o, u);
    }
    family(
        &mut o,
        "brdivert_reloads_total",
        "counter",
        "Reloads by result: ok, refused (bad input, nothing changed), failed (system error).",
    );
    for (res, n) in [
        ("ok", st.reloads.ok),
        ("refused", st.reloads.refused),
        ("failed", st.reloads.failed),
    ] {
        let _ = writeln!(o, "brdivert_reloads_total{{result=\"{res}\"}} {n}");
    }
    family(
        &mut o,
        "brdivert_last_reload_success_timestamp_seconds",
        "gauge",
        "Unix time of the last successful (re)load, the start included.",
    );
    let _ = writeln!(
        o,
        "brdivert_last_reload_success_timestamp_seconds {:.3}",
        st.reloads.last_success.unwrap_or(st.started)
    );
    family(
        &mut o,
        "brdivert_last_reload_ok",
        "gauge",
        "1 when the last reload succeeded, 0 when it was refused or failed.",
    );
    let _ = writeln!(
        o,
        "brdivert_last_reload_ok {}",
        u8::from(st.last_reload.as_ref().is_none_or(|r| r.ok()))
    );
    family(
        &mut o,
        "brdivert_counters_readable",
        "gauge",
        "1 when the kernel's rule counters could be read for this scrape.",
    );
    let _ = writeln!(
        o,
        "brdivert_counters_readable {}",
        u8::from(st.counters_error.is_none())
    );
    if let Some(q) = &st.queue {
        queue_metrics(&mut o, q);
    }
    o
}

/// The userspace datapath's own counters: per port, per verdict, the FDB.
fn userspace_metrics(o: &mut String, u: &crate::datapath::Stats) {
    let ports = &u.ports;
    port_family(
        o,
        ("brdivert_userspace_port_frames_total", "counter"),
        "Frames a port of the userspace datapath received (rx) or sent (tx); the local port (TAP) is one of them.",
        ports,
        Some("direction"),
        |p| vec![("rx", p.rx_frames), ("tx", p.tx_frames)],
    );
    port_family(
        o,
        ("brdivert_userspace_port_rx_bytes_total", "counter"),
        "Bytes (Ethernet frames, GSO super-frames whole) a port received.",
        ports,
        None,
        |p| vec![("", p.rx_bytes)],
    );
    port_family(
        o,
        ("brdivert_userspace_port_dropped_frames_total", "counter"),
        "Frames lost at a port, by reason: rx_full (the kernel dropped them, the port's receive ring was full: the datapath fell behind), rx_bad (cut short, or a tag that could not be restored), tx_error (the kernel refused to send), mtu (bigger than the outgoing port's MTU).",
        ports,
        Some("reason"),
        |p| {
            vec![
                ("rx_full", p.rx_full),
                ("rx_bad", p.rx_bad),
                ("tx_error", p.tx_errors),
                ("mtu", p.mtu_dropped),
            ]
        },
    );
    port_family(
        o,
        ("brdivert_userspace_port_rx_copied_frames_total", "counter"),
        "Frames too big for a slot of the port's receive ring (GSO super-frames, jumbo frames), read whole from its socket.",
        ports,
        None,
        |p| vec![("", p.rx_copied)],
    );
    port_family(
        o,
        ("brdivert_userspace_port_rx_ring", "gauge"),
        "1 when the port receives through a mapped ring, 0 when with recvmmsg (the kernel refused the ring).",
        ports,
        None,
        |p| vec![("", u64::from(p.rx_ring))],
    );
    family(
        o,
        "brdivert_userspace_frames_total",
        "counter",
        "Frames by what the userspace datapath did with them: diverted to the local port, passed or dropped by a rule, flooded (unknown destination), link_local_dropped (IEEE link-local groups but STP), dr_forwarded (to a realserver).",
    );
    for (what, n) in [
        ("diverted", u.diverted),
        ("passed", u.passed),
        ("policy_dropped", u.policy_dropped),
        ("flooded", u.flooded),
        ("link_local_dropped", u.link_local_dropped),
        ("dr_forwarded", u.dr_forwarded),
    ] {
        let _ = writeln!(o, "brdivert_userspace_frames_total{{what=\"{what}\"}} {n}");
    }
    for (name, kind, help, n) in [
        (
            "brdivert_userspace_fdb_entries",
            "gauge",
            "MAC addresses the userspace datapath's FDB holds now.",
            u.fdb_entries as u64,
        ),
        (
            "brdivert_userspace_fdb_evicted_total",
            "counter",
            "FDB entries pushed out because the table was full.",
            u.fdb_evicted,
        ),
    ] {
        family(o, name, kind, help);
        let _ = writeln!(o, "{name} {n}");
    }
}

/// One family (name, type) with samples per port: `values` gives each port's numbers, each
/// with its value of the label `label` (a single unlabelled number when `label` is `None`).
fn port_family(
    o: &mut String,
    (name, kind): (&str, &str),
    help: &str,
    ports: &[crate::datapath::PortStats],
    label: Option<&str>,
    values: impl Fn(&crate::datapath::PortStats) -> Vec<(&'static str, u64)>,
) {
    family(o, name, kind, help);
    for p in ports {
        for (v, n) in values(p) {
            let extra = label.map_or(String::new(), |l| format!(",{l}=\"{v}\""));
            let _ = writeln!(o, "{name}{{port=\"{}\"{extra}}} {n}", esc(&p.name));
        }
    }
}

/// NFQUEUE decisions (only while the policy has queue rules).
fn queue_metrics(o: &mut String, q: &super::queue::QueueStatus) {
    family(
        o,
        "brdivert_queue_packets_total",
        "counter",
        "Packets the daemon decided (the first packet of each new flow of a queue rule; over NFQUEUE, or inline in the userspace datapath).",
    );
    let _ = writeln!(o, "brdivert_queue_packets_total {}", q.packets);
    family(
        o,
        "brdivert_queue_flows_decided_total",
        "counter",
        "New flows decided by the daemon, by verdict.",
    );
    for (v, n) in [("divert", q.divert), ("bypass", q.bypass), ("drop", q.drop)] {
        let _ = writeln!(
            o,
            "brdivert_queue_flows_decided_total{{verdict=\"{v}\"}} {n}"
        );
    }
    family(
        o,
        "brdivert_queue_errors_total",
        "counter",
        "Queued packets answered bypass because of an error (parse, mark, decider, socket).",
    );
    let _ = writeln!(o, "brdivert_queue_errors_total {}", q.errors);
    family(
        o,
        "brdivert_queue_drops_total",
        "counter",
        "Packets the kernel dropped or could not hand to the daemon (queue or socket full).",
    );
    let _ = writeln!(o, "brdivert_queue_drops_total {}", q.queue_drops);
    family(
        o,
        "brdivert_queue_verdict_latency_seconds",
        "gauge",
        "Verdict latency quantiles (upper bound of the histogram bucket holding them).",
    );
    for (quant, v) in [("0.5", q.latency_p50_us), ("0.99", q.latency_p99_us)] {
        if let Some(us) = v {
            let _ = writeln!(
                o,
                "brdivert_queue_verdict_latency_seconds{{quantile=\"{quant}\"}} {}",
                us as f64 / 1e6
            );
        }
    }
    family(
        o,
        "brdivert_queue_list_prefixes",
        "gauge",
        "Prefixes in the dynamic allow/deny lists.",
    );
    let _ = writeln!(
        o,
        "brdivert_queue_list_prefixes{{list=\"allow\"}} {}",
        q.allow.len()
    );
    let _ = writeln!(
        o,
        "brdivert_queue_list_prefixes{{list=\"deny\"}} {}",
        q.deny.len()
    );
}

/// Check `text` is Prometheus text exposition: `# HELP`/`# TYPE` lines, and samples
/// `name{labels} value` with valid names, quoted labels and a float value. Returns the
/// samples as (name with labels, value).
pub fn parse_exposition(text: &str) -> Result<Vec<(String, f64)>, String> {
    fn valid_name(n: &str) -> bool {
        let mut cs = n.chars();
        cs.next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && cs.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    let mut out = Vec::new();
    let mut typed = std::collections::HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let bad = |why: &str| format!("line {}: {why}: {line:?}", i + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut w = rest.splitn(3, ' ');
            match (w.next(), w.next(), w.next()) {
                (Some("HELP"), Some(n), _) if valid_name(n) => {}
                (Some("TYPE"), Some(n), Some(t))
                    if valid_name(n)
                        && ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) =>
                {
                    if !typed.insert(n.to_string()) {
                        return Err(bad("second TYPE for a metric"));
                    }
                }
                _ => return Err(bad("bad HELP/TYPE line")),
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| bad("no value"))?;
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().map_err(|_| bad("value is not a number"))?,
        };
        let name = match series.split_once('{') {
            None => series,
            Some((name, labels)) => {
                let labels = labels
                    .strip_suffix('}')
                    .ok_or_else(|| bad("unclosed labels"))?;
                // label="value" pairs, values quoted with \\ \" \n escapes
                let mut rest = labels;
                while !rest.is_empty() {
                    let (k, after) = rest.split_once("=\"").ok_or_else(|| bad("bad label"))?;
                    if !valid_name(k) {
                        return Err(bad("bad label name"));
                    }
                    let mut end = None;
                    let mut esc = false;
                    for (j, c) in after.char_indices() {
                        match (esc, c) {
                            (true, _) => esc = false,
                            (false, '\\') => esc = true,
                            (false, '"') => {
                                end = Some(j);
                                break;
                            }
                            _ => {}
                        }
                    }
                    let end = end.ok_or_else(|| bad("unterminated label value"))?;
                    rest = &after[end + 1..];
                    rest = rest.strip_prefix(',').unwrap_or(rest);
                }
                name
            }
        };
        if !valid_name(name) {
            return Err(bad("bad metric name"));
        }
        out.push((series.to_string(), v));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::HealthInfo;
    use super::super::control::{ReloadCounts, RuleStatus};
    use super::*;

    #[test]
    fn render_parses() {
        let st = Status {
            version: "0.1.0".into(),
            pid: 1,
            settings: "/etc/brdivert/brdivert.toml".into(),
            bridge: "br0".into(),
            uptime_seconds: 3.0,
            started: 1_700_000_000.0,
            rules: vec![RuleStatus {
                name: "we\"b".into(),
                action: "redirect".into(),
                families: vec!["ipv4".into()],
                counters: Default::default(),
            }],
            pinned: Default::default(),
            counters_error: None,
            health: vec![HealthInfo {
                rule: "web".into(),
                realserver: None,
                target: "127.0.0.1:3129".into(),
                up: false,
                to_down: 1,
                to_up: 0,
                since: 0.0,
            }],
            dr: vec![crate::daemon::control::DrStatus {
                rule: "lvs-dr".into(),
                realservers: vec![crate::daemon::control::DrRealserverStatus {
                    realserver: "10.0.0.31".into(),
                    mac: Some("02:00:00:00:00:31".into()),
                    buckets: 256,
                    up: Some(true),
                }],
                dr_forwarded: Some(42),
            }],
            userspace: Some(crate::datapath::Stats {
                ports: vec![crate::datapath::PortStats {
                    name: "eth1".into(),
                    rx_frames: 7,
                    rx_ring: true,
                    rx_copied: 2,
                    mtu_dropped: 1,
                    rx_full: 6,
                    ..Default::default()
                }],
                diverted: 3,
                fdb_entries: 4,
                ..Default::default()
            }),
            queue: Some(crate::daemon::queue::QueueStatus {
                queues: vec![0],
                packets: 3,
                divert: 2,
                bypass: 1,
                latency_p50_us: Some(5),
                latency_p99_us: Some(50),
                allow: vec!["10.0.0.0/8".into()],
                ..Default::default()
            }),
            last_reload: None,
            reloads: ReloadCounts {
                ok: 2,
                refused: 1,
                failed: 0,
                last_success: Some(1_700_000_001.0),
            },
        };
        let text = render(&st);
        let samples = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(
            samples
                .iter()
                .any(|(s, v)| s == "brdivert_reloads_total{result=\"refused\"}" && *v == 1.0)
        );
        assert!(samples.iter().any(|(s, _)| s.contains("we\\\"b")));
        assert!(samples.contains(&(
            "brdivert_queue_flows_decided_total{verdict=\"divert\"}".to_string(),
            2.0
        )));
        assert!(samples.contains(&(
            "brdivert_queue_verdict_latency_seconds{quantile=\"0.99\"}".to_string(),
            50e-6
        )));
        assert!(samples.contains(&(
            "brdivert_dr_buckets{rule=\"lvs-dr\",realserver=\"10.0.0.31\"}".to_string(),
            256.0
        )));
        assert!(samples.contains(&(
            "brdivert_dr_forwarded_frames_total{rule=\"lvs-dr\"}".to_string(),
            42.0
        )));
        for (series, v) in [
            (
                "brdivert_userspace_port_frames_total{port=\"eth1\",direction=\"rx\"}",
                7.0,
            ),
            (
                "brdivert_userspace_port_dropped_frames_total{port=\"eth1\",reason=\"mtu\"}",
                1.0,
            ),
            (
                "brdivert_userspace_port_dropped_frames_total{port=\"eth1\",reason=\"rx_full\"}",
                6.0,
            ),
            (
                "brdivert_userspace_port_rx_copied_frames_total{port=\"eth1\"}",
                2.0,
            ),
            ("brdivert_userspace_port_rx_ring{port=\"eth1\"}", 1.0),
            ("brdivert_userspace_frames_total{what=\"diverted\"}", 3.0),
            ("brdivert_userspace_fdb_entries", 4.0),
        ] {
            assert!(
                samples.contains(&(series.to_string(), v)),
                "{series} {v} missing:\n{text}"
            );
        }
        assert!(parse_exposition("bad line").is_err());
        assert!(parse_exposition("x{a=\"1} 2").is_err());
    }
}
