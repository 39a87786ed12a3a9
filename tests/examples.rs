//! `brdivert check` accepts every example rule file (and refuses a broken one with exit 2).

use std::path::Path;
use std::process::Command;

fn check(rules: &Path) -> std::process::Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = dir.path().join("brdivert.toml");
    std::fs::write(
        &settings,
        format!(
            "rules = [{:?}]\n[bridge]\nname = \"brx0\"\nports = [\"eth0\", \"eth1\"]\naddress = [\"10.0.0.254/24\"]\n",
            rules.display().to_string()
        ),
    )
    .expect("write settings");
    Command::new(env!("CARGO_BIN_EXE_brdivert"))
        .args(["check", "-c"])
        .arg(&settings)
        .output()
        .expect("run brdivert")
}

#[test]
fn every_example_passes_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let mut n = 0;
    for e in std::fs::read_dir(&root).expect("rules/") {
        let p = e.expect("entry").path();
        if p.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        let out = check(&p);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{} refused: {}{}",
            p.display(),
            text,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("plan ("), "{text}");
        n += 1;
    }
    assert!(n >= 3);
}

#[test]
fn broken_file_exits_2_with_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[divert]]\nname = \"web\"\nproto = \"tcp\"\ndport = 99999\naction = \"pass\"\n",
    )
    .expect("write");
    let out = check(&bad);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:4:9: error: port 99999 is out of range",
            bad.display()
        )),
        "{err}"
    );
}

#[test]
fn missing_settings_exits_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_brdivert"))
        .args(["check", "-c", "/nonexistent/brdivert.toml"])
        .output()
        .expect("run brdivert");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn redirect_without_bridge_address_of_its_family_warns() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/squid-intercept.toml");
    let out = check(&p);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // the test settings give the bridge an IPv4 address only
    assert!(
        err.contains("warning: rule \"web\" redirects IPv6 but bridge.address has no IPv6 address"),
        "{err}"
    );
    assert!(!err.contains("redirects IPv4"), "{err}");
}

/// `action = "dr"` and `decide = "queue"` run on the userspace datapath too: `check` accepts
/// the dr example with `datapath = "userspace"` (it used to refuse it at the rule).
#[test]
fn dr_accepted_with_userspace_datapath() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/lvs-dr-on-bridge.toml");
    let settings = dir.path().join("brdivert.toml");
    std::fs::write(
        &settings,
        format!(
            "rules = [{:?}]\n[bridge]\nname = \"brx0\"\nports = [\"eth0\", \"eth1\"]\ndatapath = \"userspace\"\n\
             threads = 1\nbusy_poll_us = 75\n",
            rules.display().to_string()
        ),
    )
    .expect("write settings");
    let out = Command::new(env!("CARGO_BIN_EXE_brdivert"))
        .args(["check", "-c"])
        .arg(&settings)
        .output()
        .expect("run brdivert");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("kernel datapath only"), "{err}");
    // the forwarding threads and busy poll the settings ask for
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "forwarding threads: 1 for 2 ports and the local port; busy poll 75 us after two-way traffic"
        ),
        "{text}"
    );
}

/// `check` lists each `dr` realserver under its rule: named by its address (else its MAC),
/// its buckets while all are up, and its health check (target, interval, timeout, fall,
/// rise); a diverting rule's own health check too.
#[test]
fn check_lists_dr_realservers_and_health_checks() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/lvs-dr-on-bridge.toml");
    let out = check(&p);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for rs in ["02:00:00:00:00:31", "02:00:00:00:00:32"] {
        assert!(
            text.contains(&format!(
                "\n    realserver {rs}: 128 of 256 buckets while all are up; no health check (takes new flows while its MAC is known)\n"
            )),
            "{text}"
        );
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("dr.toml");
    std::fs::write(
        &rules,
        r#"[[divert]]
name        = "lvs-dr"
proto       = "tcp"
dport       = [80, 443]
dst         = ["10.0.0.81", "2001:db8::81"]
action      = "dr"
realservers = [
  { mac = "02:00:00:00:00:31", health = { connect = "10.0.0.31:80", interval = "500ms", fall = 1 } },
  { address = "10.0.0.32", health = { timeout = "300ms", rise = 1 } },
  { address = "2001:db8::33", mac = "02:00:00:00:00:33" },
]

[[divert]]
name = "vip"
proto = "tcp"
dport = 80
dst = "10.0.0.80"
action = "local"
health = { connect = "10.0.0.80:80" }
on_unhealthy = "drop"
"#,
    )
    .expect("write rules");
    let out = check(&rules);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = [
        "  lvs-dr (",
        "    realserver 02:00:00:00:00:31: 86 of 256 buckets while all are up; health: TCP connect 10.0.0.31:80 every 500ms (timeout 1s), down after 1 failure, up after 2 successes",
        "    realserver 10.0.0.32 (MAC learned from the neighbour table): 85 of 256 buckets while all are up; health: TCP connect 10.0.0.32:80 every 2s (timeout 300ms), down after 3 failures, up after 1 success",
        "    realserver 2001:db8::33 (MAC 02:00:00:00:00:33): 85 of 256 buckets while all are up; no health check (takes new flows while its MAC is known)",
        "  vip (",
        "    health: TCP connect 10.0.0.80:80 every 2s (timeout 1s), down after 3 failures, up after 2 successes; while down, new flows are dropped",
    ];
    // in this order, each right under the one before
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with(want[0]))
        .unwrap_or_else(|| panic!("no lvs-dr rule line:\n{text}"));
    for (i, w) in want.iter().enumerate().skip(1) {
        let got = lines.get(at + i).copied().unwrap_or_default();
        if w.ends_with('(') {
            assert!(got.starts_with(w), "line {i}: {got:?}, want {w:?}\n{text}");
        } else {
            assert_eq!(got, *w, "line {i}\n{text}");
        }
    }
}
