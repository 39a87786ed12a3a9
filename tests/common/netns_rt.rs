//! A throw-away network namespace per test: created with `ip netns add`, deleted on drop (also
//! when the test panics). Netlink work runs on a thread that has `setns`ed into it.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Returns None (after saying why) when the test cannot run here.
pub fn netns_or_skip(test: &str) -> Option<Netns> {
    if !is_root() {
        eprintln!("skipping {test}: needs root (network namespaces, nftables)");
        return None;
    }
    Some(Netns::new())
}

pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("brd-rt-{}-{n}", std::process::id());
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip netns add");
        assert!(st.success(), "ip netns add {name} failed");
        Netns { name }
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = File::open(&path).expect("open netns");
                // SAFETY: setns on this thread only; the fd is valid for the call.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("netns thread panicked")
        })
    }

    /// `nft ARGS…` inside the namespace: (success, stdout, stderr).
    pub fn nft(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft"])
            .args(args)
            .output()
            .expect("run nft");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `nft list table FAMILY NAME`, panicking if it fails.
    pub fn list(&self, family: &str, name: &str) -> String {
        let (ok, out, err) = self.nft(&["list", "table", family, name]);
        assert!(ok, "nft list table {family} {name}: {err}");
        out
    }

    /// `nft list ruleset`.
    pub fn ruleset(&self) -> String {
        let (ok, out, err) = self.nft(&["list", "ruleset"]);
        assert!(ok, "nft list ruleset: {err}");
        out
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
