//! The record of what brdivert changed, so `teardown` undoes exactly that and nothing else.
//!
//! Two small JSON files in the state directory (`/run/brdivert` unless `BRDIVERT_STATE_DIR` or
//! an explicit directory says otherwise):
//! - `state-<bridge>.json`: the bridge, ports, addresses and br_netfilter values;
//! - `tproxy-<table>.json`: the policy-routing entries for TPROXY (they belong to the routing
//!   table, not to a bridge, and `setup_tproxy_routing` is called without one).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::error::LinkError;

/// Environment variable naming the state directory.
pub const STATE_DIR_ENV: &str = "BRDIVERT_STATE_DIR";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/run/brdivert";

/// The state directory: `$BRDIVERT_STATE_DIR` if set and non-empty, else `/run/brdivert`.
pub fn state_dir() -> PathBuf {
    match std::env::var_os(STATE_DIR_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(DEFAULT_STATE_DIR),
    }
}

/// `DIR/state-<bridge>.json`.
pub fn bridge_state_path(dir: &Path, bridge: &str) -> PathBuf {
    dir.join(format!("state-{bridge}.json"))
}

/// `DIR/pins-<bridge>.json`.
pub fn pins_state_path(dir: &Path, bridge: &str) -> PathBuf {
    dir.join(format!("pins-{bridge}.json"))
}

/// `DIR/tproxy-<table>.json`.
pub fn routing_state_path(dir: &Path, table: u32) -> PathBuf {
    dir.join(format!("tproxy-{table}.json"))
}

/// A sysctl value brdivert overwrote, and what it was before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysctlValue {
    pub path: PathBuf,
    pub previous: String,
}

/// What `setup` changed for one bridge.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BridgeState {
    pub bridge: String,
    /// brdivert created the bridge device (teardown deletes it).
    pub created_bridge: bool,
    /// Index of the bridge brdivert created; teardown deletes only a bridge with this index.
    pub bridge_ifindex: Option<u32>,
    /// Ports brdivert enslaved (they were not enslaved before).
    pub enslaved_ports: Vec<String>,
    /// Addresses brdivert added to the bridge.
    pub addresses: Vec<IpNet>,
    /// br_netfilter sysctls brdivert changed, with their previous values.
    pub br_netfilter: Vec<SysctlValue>,
    /// The bridge's own `nf_call_iptables` / `nf_call_ip6tables` before brdivert turned them
    /// on for queue rules (an existing bridge only; teardown sets them back).
    pub bridge_nf_call: Option<[bool; 2]>,
}

impl BridgeState {
    pub fn new(bridge: &str) -> Self {
        BridgeState {
            bridge: bridge.to_string(),
            ..Default::default()
        }
    }

    /// Nothing left to undo.
    pub fn is_empty(&self) -> bool {
        !self.created_bridge
            && self.enslaved_ports.is_empty()
            && self.addresses.is_empty()
            && self.br_netfilter.is_empty()
            && self.bridge_nf_call.is_none()
    }
}

/// IP family of a routing entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    V4,
    V6,
}

/// `ip rule add fwmark MARK/MASK lookup TABLE priority PRIORITY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleEntry {
    pub family: Family,
    pub mark: u32,
    pub mask: u32,
    pub table: u32,
    pub priority: u32,
}

/// `ip route add local default dev lo table TABLE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteEntry {
    pub family: Family,
    pub table: u32,
}

/// What `setup_tproxy_routing` added.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RoutingState {
    pub rules: Vec<RuleEntry>,
    pub routes: Vec<RouteEntry>,
}

impl RoutingState {
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.routes.is_empty()
    }
}

/// Read a state file; `Ok(None)` when it does not exist.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, LinkError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(LinkError::StateIo {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| LinkError::StateParse {
            path: path.to_path_buf(),
            source,
        })
}

/// Write a state file atomically (temporary file + rename), creating the directory.
pub fn save<T: Serialize>(path: &Path, value: &T) -> Result<(), LinkError> {
    let io_err = |source| LinkError::StateIo {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io_err)?;
    }
    let mut text = serde_json::to_string_pretty(value).map_err(|source| LinkError::StateParse {
        path: path.to_path_buf(),
        source,
    })?;
    text.push('\n');
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, text).map_err(io_err)?;
    fs::rename(&tmp, path).map_err(io_err)
}

/// Remove a state file; a missing file is fine.
pub fn remove(path: &Path) -> Result<(), LinkError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(LinkError::StateIo {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let p = bridge_state_path(dir.path(), "br9");
        assert_eq!(load::<BridgeState>(&p).unwrap(), None);
        let mut s = BridgeState::new("br9");
        assert!(s.is_empty());
        s.created_bridge = true;
        s.bridge_ifindex = Some(7);
        s.enslaved_ports.push("eth0".into());
        s.addresses.push("10.0.0.1/24".parse().unwrap());
        s.br_netfilter.push(SysctlValue {
            path: "/proc/sys/x".into(),
            previous: "1".into(),
        });
        save(&p, &s).unwrap();
        assert_eq!(load::<BridgeState>(&p).unwrap(), Some(s));
        remove(&p).unwrap();
        remove(&p).unwrap();
    }

    #[test]
    fn corrupt_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = routing_state_path(dir.path(), 3129);
        fs::write(&p, "{not json").unwrap();
        let e = load::<RoutingState>(&p).unwrap_err();
        assert!(e.to_string().contains("corrupt"), "{e}");
    }
}
