//! Daemon settings (`/etc/brdivert/brdivert.toml`), loaded with the `config` crate: the file,
//! then `BRDIVERT_*` environment overrides (`BRDIVERT_BRIDGE__NAME=br1`, lists comma-separated:
//! `BRDIVERT_BRIDGE__PORTS=eth0,eth1`).

use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

use crate::diag::{Diagnostic, Pos, Refused};

pub const DEFAULT_PATH: &str = "/etc/brdivert/brdivert.toml";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Rule files or glob patterns; relative paths are relative to the settings file.
    #[serde(default = "default_rules")]
    pub rules: Vec<String>,
    pub bridge: BridgeSettings,
    #[serde(default)]
    pub queue: QueueSettings,
    #[serde(default)]
    pub control: ControlSettings,
    #[serde(default)]
    pub metrics: MetricsSettings,
    #[serde(default)]
    pub kernel: KernelSettings,
    #[serde(default)]
    pub daemon: DaemonSettings,
    /// Directory of the settings file (rule paths are resolved against it). Not a key.
    #[serde(skip)]
    pub base_dir: PathBuf,
    #[serde(skip)]
    pub path: PathBuf,
}

fn default_rules() -> Vec<String> {
    vec!["/etc/brdivert/rules.d/*.toml".into()]
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Datapath {
    #[default]
    Kernel,
    Userspace,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BridgeSettings {
    /// Kernel bridge device (created if missing), or the TAP local port in userspace mode.
    #[serde(default = "default_bridge_name")]
    pub name: String,
    pub ports: Vec<String>,
    #[serde(default)]
    pub datapath: Datapath,
    /// The host's addresses on the segment (REDIRECT answers from the bridge's address).
    #[serde(default)]
    pub address: Vec<IpNet>,
    /// Userspace datapath: FDB entries that never age and never move to another port.
    #[serde(default)]
    pub static_fdb: Vec<StaticFdbEntry>,
    /// Userspace datapath: forwarding threads (the ports, the local port included, are dealt
    /// out among them); unset: one per port, at most one per CPU.
    #[serde(default)]
    pub threads: Option<usize>,
    /// Userspace datapath: microseconds a forwarding thread keeps polling its ports after the
    /// last frame before it sleeps; unset: 200 (see docs/performance.md), 0: sleep at once.
    #[serde(default)]
    pub busy_poll_us: Option<u64>,
}

/// `{ mac = "02:00:00:00:00:01", port = "eth1" }`: frames to `mac` always go out of `port`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StaticFdbEntry {
    pub mac: String,
    pub port: String,
}

impl BridgeSettings {
    /// The most [`BridgeSettings::busy_poll_us`] may say: polling longer than this after a
    /// frame buys nothing but CPU.
    pub const MAX_BUSY_POLL_US: u64 = 10_000;
    pub const MAX_THREADS: usize = 64;

    /// The static FDB entries as (MAC, port); entries whose MAC does not parse are left out
    /// (`Settings::load` refuses them).
    pub fn static_fdb_entries(&self) -> Vec<([u8; 6], String)> {
        self.static_fdb
            .iter()
            .filter_map(|e| Some((crate::policy::parse_mac(&e.mac)?, e.port.clone())))
            .collect()
    }
}

fn default_bridge_name() -> String {
    "br0".into()
}

/// NFQUEUE decisions (`decide = "queue"` rules; see docs/queue.md). Unused without such rules.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSettings {
    /// First NFQUEUE number.
    pub num: u16,
    /// Queues `num .. num + fanout`, one worker thread each; the kernel spreads flows over
    /// them by hash.
    pub fanout: u16,
    /// A full queue accepts packets (the flow is bridged undecided) instead of dropping them.
    pub fail_open: bool,
    /// Bits of the packet / conntrack mark that hold a decision (verdict code 1 divert,
    /// 2 bypass, 3 drop; 0 undecided). At least 2 contiguous bits, not overlapping
    /// `kernel.mark_mask`.
    pub verdict_mask: u32,
    /// New flows a second per source address (IPv6: per /64) that are decided `divert`;
    /// beyond it new flows are bypassed (bridged). 0 turns the limit off.
    pub rate: f64,
    /// Burst of new flows a source may open at once (the token bucket's depth).
    pub burst: f64,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            num: 0,
            fanout: 1,
            fail_open: true,
            verdict_mask: crate::queue::DEFAULT_VERDICT_MASK,
            rate: 0.0,
            burst: 200.0,
        }
    }
}

impl QueueSettings {
    /// The mark bits a decision uses, checked against `kernel.mark_mask`.
    pub fn layout(&self, kernel: &KernelSettings) -> anyhow::Result<crate::queue::MarkLayout> {
        crate::queue::MarkLayout::new(kernel.mark_mask, self.verdict_mask)
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ControlSettings {
    pub socket: PathBuf,
}

impl Default for ControlSettings {
    fn default() -> Self {
        ControlSettings {
            socket: "/run/brdivert/control.sock".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    pub listen: String,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            listen: "127.0.0.1:9477".into(),
        }
    }
}

/// How `brdivert run` behaves (not used by the one-shot commands).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonSettings {
    /// Remove brdivert's tables and links when the daemon stops (SIGTERM/SIGINT). Off by
    /// default: in the kernel datapath the kernel forwards and diverts on its own, so a
    /// daemon restart (upgrade, crash, `systemctl restart`) must not disturb traffic.
    /// `brdivert flush` removes everything explicitly.
    pub flush_on_exit: bool,
    /// Reload when the settings file or a rule file changes (polled, debounced).
    pub watch: bool,
    /// How often the watcher looks at the files, in milliseconds.
    pub watch_interval_ms: u64,
}

impl Default for DaemonSettings {
    fn default() -> Self {
        DaemonSettings {
            flush_on_exit: false,
            watch: true,
            watch_interval_ms: 500,
        }
    }
}

/// How brdivert uses shared kernel resources, so it can live beside other users of them.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct KernelSettings {
    /// Bits of the packet mark brdivert owns (must be contiguous). Each diverting rule gets a
    /// small number inside these bits; all other bits of the mark are left as they were.
    pub mark_mask: u32,
    /// Policy-routing table for TPROXY (`ip rule fwmark … lookup TABLE`, local default route).
    pub route_table: u32,
    /// Priority of that `ip rule`.
    pub rule_priority: u32,
    /// Keep br_netfilter (`net.bridge.bridge-nf-call-ip{,6}tables`) as it is instead of
    /// turning it off in brdivert's network namespace. Off is what TPROXY through a bridge
    /// needs: with it on, bridged packets cross the ip hooks a second time.
    pub keep_br_netfilter: bool,
}

impl Default for KernelSettings {
    fn default() -> Self {
        KernelSettings {
            mark_mask: 0x00ff_0000,
            route_table: 3129,
            rule_priority: 3129,
            keep_br_netfilter: false,
        }
    }
}

impl KernelSettings {
    /// Shift of the lowest bit of `mark_mask`.
    pub fn mark_shift(&self) -> u32 {
        self.mark_mask.trailing_zeros()
    }

    /// How many distinct non-zero tags fit in the mask.
    pub fn mark_capacity(&self) -> u32 {
        (self.mark_mask >> self.mark_shift()).min(u32::MAX - 1)
    }
}

impl Settings {
    /// Load `path` with `BRDIVERT_*` overrides and check it.
    pub fn load(path: &Path) -> Result<Settings, Refused> {
        let refuse =
            |what: String, fix: &str| Refused(vec![Diagnostic::error(path, Pos::NONE, what, fix)]);
        if !path.exists() {
            return Err(refuse(
                "settings file not found".into(),
                "create it (see docs/configuration.md) or pass another with -c FILE",
            ));
        }
        let built = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::default()
                    .separator("__")
                    .list_separator(",")
                    .with_list_parse_key("rules")
                    .with_list_parse_key("bridge.ports")
                    .with_list_parse_key("bridge.address")
                    .try_parsing(true)
                    .source(Some(setting_overrides(std::env::vars()))),
            )
            .build()
            .map_err(|e| refuse(e.to_string(), "fix the TOML syntax"))?;
        let mut s: Settings = built.try_deserialize().map_err(|e| {
            refuse(
                e.to_string(),
                "see docs/configuration.md for every key and its type",
            )
        })?;
        s.path = path.to_path_buf();
        s.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<(), Refused> {
        let mut errs = Vec::new();
        let mut err = |what: String, fix: &str| {
            errs.push(Diagnostic::error(&self.path, Pos::NONE, what, fix))
        };
        if !valid_ifname(&self.bridge.name) {
            err(
                format!(
                    "bridge.name {:?} is not a valid interface name",
                    self.bridge.name
                ),
                "use 1-15 characters, no '/', ':' or whitespace",
            );
        }
        if self.bridge.ports.is_empty() {
            err(
                "bridge.ports is empty".into(),
                "list the interfaces to bridge, e.g. [\"eth0\", \"eth1\"]",
            );
        }
        for (i, p) in self.bridge.ports.iter().enumerate() {
            if !valid_ifname(p) {
                err(
                    format!("bridge.ports[{i}] {p:?} is not a valid interface name"),
                    "use 1-15 characters, no '/', ':' or whitespace",
                );
            }
            if p == &self.bridge.name || self.bridge.ports[..i].contains(p) {
                err(
                    format!("bridge.ports[{i}] {p:?} is listed twice or is the bridge itself"),
                    "list each port once",
                );
            }
        }
        for (i, e) in self.bridge.static_fdb.iter().enumerate() {
            if self.bridge.datapath != Datapath::Userspace {
                err(
                    format!(
                        "bridge.static_fdb[{i}]: static FDB entries are for the userspace datapath"
                    ),
                    "on the kernel bridge add them with `bridge fdb add MAC dev PORT master static`, or set bridge.datapath = \"userspace\"",
                );
            }
            if crate::policy::parse_mac(&e.mac).is_none() {
                err(
                    format!(
                        "bridge.static_fdb[{i}].mac {:?} is not a MAC address",
                        e.mac
                    ),
                    "write six hex bytes, e.g. \"02:00:00:00:00:01\"",
                );
            }
            if !self.bridge.ports.contains(&e.port) {
                err(
                    format!(
                        "bridge.static_fdb[{i}].port {:?} is not one of bridge.ports ({})",
                        e.port,
                        self.bridge.ports.join(", ")
                    ),
                    "name one of bridge.ports",
                );
            }
        }
        let userspace_only = |key: &str| {
            (
                format!("bridge.{key} is for the userspace datapath"),
                "remove it, or set bridge.datapath = \"userspace\"".to_string(),
            )
        };
        if let Some(t) = self.bridge.threads {
            if self.bridge.datapath != Datapath::Userspace {
                let (what, fix) = userspace_only("threads");
                err(what, &fix);
            }
            if t == 0 || t > BridgeSettings::MAX_THREADS {
                err(
                    format!("bridge.threads = {t} is out of range"),
                    &format!(
                        "give 1 to {} (leave it out for one per port, at most one per CPU)",
                        BridgeSettings::MAX_THREADS
                    ),
                );
            }
        }
        if let Some(us) = self.bridge.busy_poll_us {
            if self.bridge.datapath != Datapath::Userspace {
                let (what, fix) = userspace_only("busy_poll_us");
                err(what, &fix);
            }
            if us > BridgeSettings::MAX_BUSY_POLL_US {
                err(
                    format!("bridge.busy_poll_us = {us} is out of range"),
                    &format!(
                        "give 0 (sleep at once) to {}",
                        BridgeSettings::MAX_BUSY_POLL_US
                    ),
                );
            }
        }
        let m = self.kernel.mark_mask;
        if m == 0
            || (m >> m.trailing_zeros()).count_ones()
                != 32 - (m >> m.trailing_zeros()).leading_zeros()
        {
            err(
                format!("kernel.mark_mask {m:#x} is not one contiguous run of bits"),
                "use e.g. 0x00ff0000",
            );
        }
        if let Err(e) = self.queue.layout(&self.kernel) {
            err(
                format!("queue.verdict_mask: {e:#}"),
                "use 2 or more contiguous bits outside kernel.mark_mask, e.g. 0x03000000 with the default mark_mask",
            );
        }
        if self.queue.fanout == 0
            || u32::from(self.queue.num) + u32::from(self.queue.fanout) > 65536
        {
            err(
                format!(
                    "queue.fanout {} from queue.num {} is not a valid range of queues",
                    self.queue.fanout, self.queue.num
                ),
                "use fanout >= 1 with num + fanout <= 65536",
            );
        }
        let usable = |v: f64, min: f64| v >= min && v.is_finite();
        if !usable(self.queue.rate, 0.0) || !usable(self.queue.burst, 1.0) {
            err(
                format!(
                    "queue.rate {} / queue.burst {} are not usable",
                    self.queue.rate, self.queue.burst
                ),
                "use rate >= 0 (0 = no limit) and burst >= 1",
            );
        }
        if self.kernel.route_table == 0 || (253..=255).contains(&self.kernel.route_table) {
            err(
                format!("kernel.route_table {} is reserved", self.kernel.route_table),
                "pick an unused table number such as 3129",
            );
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(Refused(errs))
        }
    }

    /// The rule files the `rules` patterns name, sorted, each once.
    pub fn rule_files(&self) -> Result<Vec<PathBuf>, Refused> {
        let mut out = Vec::new();
        for pat in &self.rules {
            let full = if Path::new(pat).is_absolute() {
                PathBuf::from(pat)
            } else {
                self.base_dir.join(pat)
            };
            let full_s = full.to_string_lossy().into_owned();
            if full_s.contains(['*', '?', '[']) {
                let paths = glob::glob(&full_s).map_err(|e| {
                    Refused(vec![Diagnostic::error(
                        &self.path,
                        Pos::NONE,
                        format!("bad rules pattern {pat:?}: {e}"),
                        "fix the glob pattern",
                    )])
                })?;
                let mut found: Vec<PathBuf> = paths.filter_map(Result::ok).collect();
                found.sort();
                out.extend(found);
            } else if full.exists() {
                out.push(full);
            } else {
                return Err(Refused(vec![Diagnostic::error(
                    &self.path,
                    Pos::NONE,
                    format!("rule file {} not found", full.display()),
                    "create it or fix the `rules` list",
                )]));
            }
        }
        // One order for all patterns together, each file once.
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// The `BRDIVERT_*` variables that override settings keys, keyed as `config` expects
/// (`BRDIVERT_BRIDGE__NAME` -> `bridge__name`). Only `BRDIVERT_RULES` and names with a `__`
/// section separator count: `BRDIVERT_CONFIG`, `BRDIVERT_LOG` and `BRDIVERT_STATE_DIR` are
/// the CLI's own and are not settings keys.
fn setting_overrides(vars: impl Iterator<Item = (String, String)>) -> config::Map<String, String> {
    vars.filter_map(|(k, v)| {
        let key = k.strip_prefix("BRDIVERT_")?;
        (key == "RULES" || key.contains("__")).then(|| (key.to_ascii_lowercase(), v))
    })
    .collect()
}

/// Linux interface names: 1..=15 bytes, no '/', ':' or whitespace, not "." or "..".
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// Load a settings file holding `text` (written to a temporary directory), for unit tests.
#[cfg(test)]
pub(crate) fn load_str(text: &str) -> Result<Settings, Refused> {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("brdivert.toml");
    std::fs::write(&p, text).expect("writing the settings file");
    Settings::load(&p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_in() {
        let s = load_str("[bridge]\nports = [\"a\", \"b\"]\n").unwrap();
        assert_eq!(s.bridge.name, "br0");
        assert_eq!(s.bridge.datapath, Datapath::Kernel);
        assert_eq!(s.kernel.mark_mask, 0x00ff_0000);
        assert_eq!(s.kernel.mark_shift(), 16);
        assert_eq!(s.kernel.mark_capacity(), 255);
        assert!(s.queue.fail_open);
    }

    #[test]
    fn unknown_key_refused() {
        let e = load_str("[bridge]\nports = [\"a\"]\nportz = 1\n").unwrap_err();
        assert!(e.to_string().contains("portz"), "{e}");
    }

    #[test]
    fn bad_values_refused() {
        let e = load_str("[bridge]\nname = \"a/b\"\nports = []\n[kernel]\nmark_mask = 0x0101\n")
            .unwrap_err();
        let s = e.to_string();
        assert!(s.contains("bridge.name"), "{s}");
        assert!(s.contains("bridge.ports is empty"), "{s}");
        assert!(s.contains("contiguous"), "{s}");
    }

    #[test]
    fn forwarding_threads_and_busy_poll() {
        let s = load_str(
            "[bridge]\nports = [\"eth0\"]\ndatapath = \"userspace\"\n\
             threads = 1\nbusy_poll_us = 0\n",
        )
        .expect("valid");
        assert_eq!(
            (s.bridge.threads, s.bridge.busy_poll_us),
            (Some(1), Some(0))
        );
        let s = load_str("[bridge]\nports = [\"eth0\"]\ndatapath = \"userspace\"\n").unwrap();
        assert_eq!((s.bridge.threads, s.bridge.busy_poll_us), (None, None));
        let e = load_str(
            "[bridge]\nports = [\"eth0\"]\ndatapath = \"userspace\"\n\
             threads = 0\nbusy_poll_us = 10001\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("bridge.threads = 0 is out of range"), "{e}");
        assert!(e.contains("give 1 to 64"), "{e}");
        assert!(
            e.contains("bridge.busy_poll_us = 10001 is out of range"),
            "{e}"
        );
        assert!(e.contains("give 0 (sleep at once) to 10000"), "{e}");
        let e = load_str("[bridge]\nports = [\"eth0\"]\nthreads = 2\nbusy_poll_us = 50\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bridge.threads is for the userspace datapath"),
            "{e}"
        );
        assert!(
            e.contains("bridge.busy_poll_us is for the userspace datapath"),
            "{e}"
        );
        assert!(e.contains("set bridge.datapath = \"userspace\""), "{e}");
        let e = load_str("[bridge]\nports = [\"eth0\"]\ndatapath = \"userspace\"\nthreads = -1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("threads"), "{e}");
    }

    #[test]
    fn static_fdb_entries() {
        let s = load_str(
            "[bridge]\nports = [\"eth0\", \"eth1\"]\ndatapath = \"userspace\"\n\
             static_fdb = [{ mac = \"02:00:00:00:00:01\", port = \"eth1\" }]\n",
        )
        .expect("valid");
        assert_eq!(
            s.bridge.static_fdb_entries(),
            vec![([2, 0, 0, 0, 0, 1], "eth1".to_string())]
        );
        let e = load_str(
            "[bridge]\nports = [\"eth0\", \"eth1\"]\n\
             static_fdb = [{ mac = \"02:00:00:00:01\", port = \"eth9\" }]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("static_fdb[0]: static FDB entries are for the userspace datapath"),
            "{e}"
        );
        assert!(e.contains("bridge fdb add"), "{e}");
        assert!(
            e.contains("static_fdb[0].mac \"02:00:00:00:01\" is not a MAC address"),
            "{e}"
        );
        assert!(
            e.contains("static_fdb[0].port \"eth9\" is not one of bridge.ports (eth0, eth1)"),
            "{e}"
        );
        let e = load_str(
            "[bridge]\nports = [\"eth0\"]\ndatapath = \"userspace\"\n\
             static_fdb = [{ mac = \"02:00:00:00:00:01\", port = \"eth0\", vlan = 3 }]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("vlan"), "unknown key named: {e}");
    }

    #[test]
    fn only_sectioned_env_vars_override() {
        let vars = [
            ("BRDIVERT_CONFIG", "/x.toml"),
            ("BRDIVERT_LOG", "debug"),
            ("BRDIVERT_STATE_DIR", "/tmp/s"),
            ("BRDIVERT_BRIDGE__NAME", "br1"),
            ("BRDIVERT_RULES", "/a.toml,/b.toml"),
            ("OTHER", "1"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let m = setting_overrides(vars.into_iter());
        let mut keys: Vec<_> = m.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, vec!["bridge__name", "rules"]);
    }

    #[test]
    fn rule_files_sorted_and_deduplicated_across_patterns() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["b.toml", "a.toml"] {
            std::fs::write(dir.path().join(f), "").unwrap();
        }
        let p = dir.path().join("brdivert.toml");
        std::fs::write(
            &p,
            "rules = [\"b.toml\", \"*.toml\"]\n[bridge]\nports = [\"x\"]\n",
        )
        .unwrap();
        let s = Settings::load(&p).unwrap();
        let names: Vec<_> = s
            .rule_files()
            .unwrap()
            .iter()
            .map(|f| f.file_name().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["a.toml", "b.toml", "brdivert.toml"]);
    }

    #[test]
    fn shipped_example_settings_load() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/brdivert.toml");
        let s = Settings::load(&p).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.bridge.ports, ["eth0", "eth1"]);
        assert!(!s.daemon.flush_on_exit);
    }

    #[test]
    fn missing_file_refused() {
        let e = Settings::load(Path::new("/nonexistent/brdivert.toml")).unwrap_err();
        assert!(e.to_string().contains("not found"));
    }

    #[test]
    fn queue_settings_checked() {
        let base = "[bridge]\nports = [\"a\", \"b\"]\n";
        let s = load_str(base).unwrap();
        assert_eq!((s.queue.fanout, s.queue.verdict_mask), (1, 0x0300_0000));
        let e = load_str(&format!("{base}[queue]\nverdict_mask = 0x00030000\n")).unwrap_err();
        assert!(
            e.to_string().contains("queue.verdict_mask") && e.to_string().contains("overlap"),
            "{e}"
        );
        let e = load_str(&format!("{base}[queue]\nverdict_mask = 0x01000000\n")).unwrap_err();
        assert!(e.to_string().contains("2 bits or more"), "{e}");
        let e = load_str(&format!("{base}[queue]\nnum = 65535\nfanout = 2\n")).unwrap_err();
        assert!(e.to_string().contains("queue.fanout 2"), "{e}");
        let e = load_str(&format!("{base}[queue]\nburst = 0.5\n")).unwrap_err();
        assert!(e.to_string().contains("queue.burst"), "{e}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(crate::fuzz::fuzz_cases(256)))]

        /// The shipped settings file with up to 4 characters replaced, inserted or deleted:
        /// never a panic; loaded, or refused naming the file, what is wrong and how to fix it.
        #[test]
        fn mutated_settings_files_are_loaded_or_refused(
            edits in crate::fuzz::edits(4),
        ) {
            let t = crate::fuzz::mutate(include_str!("../systemd/brdivert.toml"), &edits);
            let dir = tempfile::tempdir().map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            let p = dir.path().join("brdivert.toml");
            std::fs::write(&p, t)
                .map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            if let Err(Refused(diags)) = Settings::load(&p) {
                proptest::prop_assert!(!diags.is_empty());
                for d in &diags {
                    proptest::prop_assert_eq!(&d.file, &p);
                    proptest::prop_assert!(!d.what.is_empty() && !d.fix.is_empty(), "{:?}", d);
                }
            }
        }
    }
}
