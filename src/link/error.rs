//! [`LinkError`]: what went wrong, on which interface, and how to fix it.

use std::io;
use std::path::PathBuf;

/// A failure of the link layer (bridge, ports, addresses, policy routing, sysctls, state file).
///
/// Every message names the object concerned and ends with a hint on how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(
        "bridge port(s) {} not found (listed in bridge.ports of {}); create the interface(s), \
         fix their names in the settings file, or override with BRDIVERT_BRIDGE__PORTS",
        quoted(.ports),
        .settings.display()
    )]
    MissingPorts {
        ports: Vec<String>,
        settings: PathBuf,
    },

    #[error(
        "device {name:?} exists but is a {kind}, not a bridge (bridge.name in {}); pick another \
         bridge.name or delete the device (ip link del {name})",
        .settings.display()
    )]
    NotABridge {
        name: String,
        kind: String,
        settings: PathBuf,
    },

    #[error(
        "port {port:?} is already enslaved to {master:?}, not to bridge {bridge:?}; release it \
         first (ip link set {port} nomaster) or remove it from bridge.ports"
    )]
    PortEnslavedElsewhere {
        port: String,
        master: String,
        bridge: String,
    },

    #[error(
        "bridge {name:?} is configured for the userspace datapath; the kernel bridge setup does \
         not apply (the userspace datapath creates a TAP of that name instead)"
    )]
    UserspaceDatapath { name: String },

    #[error("interface {name:?} not found; check the name with `ip link`")]
    NoSuchLink { name: String },

    #[error(
        "interface {name:?} has no usable Ethernet address (got {len} bytes); is it an \
         Ethernet-like device?"
    )]
    BadMac { name: String, len: usize },

    #[error("{op}: {}; {}", errno_text(.source), hint(.source))]
    Netlink {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },

    #[error("cannot open an rtnetlink socket: {source}; brdivert needs Linux with CAP_NET_ADMIN")]
    Socket {
        #[source]
        source: io::Error,
    },

    #[error("cannot start the tokio runtime for a blocking link call: {source}")]
    Runtime {
        #[source]
        source: io::Error,
    },

    #[error(
        "decide = \"queue\" rules need br_netfilter (the IP hooks for bridged frames), and it \
         is not loaded; run `modprobe br_netfilter` (brdivert turns it on for bridge {bridge} \
         only)"
    )]
    NoBrNetfilter { bridge: String },

    #[error(
        "sysctl {}: {source}; run as root, or set kernel.keep_br_netfilter = true to leave \
         br_netfilter alone",
        .path.display()
    )]
    Sysctl {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "state file {}: {source}; check that the directory is writable (set BRDIVERT_STATE_DIR \
         to use another one)",
        .path.display()
    )]
    StateIo {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "state file {} is corrupt: {source}; inspect it, undo what it lists by hand if needed, \
         then delete it",
        .path.display()
    )]
    StateParse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl LinkError {
    pub(crate) fn netlink(op: impl Into<String>, source: rtnetlink::Error) -> Self {
        LinkError::Netlink {
            op: op.into(),
            source,
        }
    }

    /// The positive errno of a kernel refusal, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            LinkError::Netlink { source, .. } => errno(source),
            _ => None,
        }
    }
}

/// The positive errno a netlink request failed with, if the kernel answered with an error.
pub(crate) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => match m.raw_code() {
            0 => None,
            c => Some(c.abs()),
        },
        _ => None,
    }
}

fn errno_text(e: &rtnetlink::Error) -> String {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io().to_string(),
        other => other.to_string(),
    }
}

fn hint(e: &rtnetlink::Error) -> &'static str {
    match errno(e) {
        Some(libc::EPERM) | Some(libc::EACCES) => "run brdivert as root or with CAP_NET_ADMIN",
        Some(libc::EOPNOTSUPP) | Some(libc::EAFNOSUPPORT) => {
            "the running kernel lacks this feature (bridge / IPv6 / policy routing support)"
        }
        Some(libc::ENODEV) => "the interface vanished meanwhile; check `ip link` and retry",
        Some(libc::EBUSY) => "another program holds the device; check `ip -d link` for a master",
        Some(libc::ELOOP) => "a port cannot be the bridge itself or one of its uppers",
        Some(libc::ENETDOWN) => "bring the interface up (ip link set DEV up) and retry",
        _ => "see `ip -d link`, `ip addr`, `ip rule` and `dmesg` for details",
    }
}

fn quoted(items: &[String]) -> String {
    items
        .iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}
