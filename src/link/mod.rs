//! Kernel datapath links over rtnetlink: the bridge, its ports and addresses, br_netfilter,
//! and the policy routing TPROXY needs.
//!
//! Everything brdivert changes is recorded in a small JSON state file (see [`state`]), so
//! [`teardown`] undoes exactly that and nothing else: a bridge the operator made survives, a
//! port that was already enslaved stays enslaved, an address that was already there stays.
//!
//! All functions act in the network namespace of the calling thread (the rtnetlink socket and
//! `/proc/sys/net` are resolved when used). The `*_blocking` wrappers build a current-thread
//! tokio runtime and must not be called from inside a tokio runtime (tokio panics if they
//! are); use the `async` functions there.
//!
//! Teardown leaves ports up: brdivert never records whether they were down before, and a
//! port left up without a master harms nothing.

mod error;
pub mod neigh;
mod nl;
mod routing;
pub mod state;

use std::future::Future;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use netlink_packet_route::link::BridgeStpState;
use rtnetlink::{Handle, LinkBridge, LinkUnspec};

pub use error::LinkError;
pub use state::{DEFAULT_STATE_DIR, STATE_DIR_ENV, state_dir};

use crate::settings::{Datapath, KernelSettings, Settings};
use error::errno;
use nl::LinkFacts;
use state::{BridgeState, SysctlValue};

/// The br_netfilter switches brdivert turns off unless `kernel.keep_br_netfilter` is set.
pub const BR_NETFILTER_SYSCTLS: [&str; 2] = [
    "/proc/sys/net/bridge/bridge-nf-call-iptables",
    "/proc/sys/net/bridge/bridge-nf-call-ip6tables",
];

/// The bridge as `setup` left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeInfo {
    pub ifindex: u32,
    pub mac: [u8; 6],
    /// brdivert created this bridge (now or in an earlier run) and `teardown` will delete it.
    pub created: bool,
}

// ---------------------------------------------------------------------------------------
// setup

/// Set up the kernel bridge from `settings`, recording changes under [`state_dir()`].
///
/// Checks that every port exists (one error naming all missing ones), creates the bridge if
/// missing (STP off, forward delay 0, default ageing), refuses a device of that name that is
/// not a bridge and a port enslaved to another master, enslaves the ports, brings ports and
/// bridge up, adds `bridge.address` (IPv6 with `nodad`), and unless
/// `kernel.keep_br_netfilter` turns br_netfilter off in this network namespace. Idempotent.
/// An existing bridge's own options (STP, delays) are left as the operator set them.
pub async fn setup(settings: &Settings) -> Result<BridgeInfo, LinkError> {
    setup_at(settings, &state_dir()).await
}

/// [`setup`] with an explicit state directory.
pub async fn setup_at(settings: &Settings, dir: &Path) -> Result<BridgeInfo, LinkError> {
    if settings.bridge.datapath == Datapath::Userspace {
        return Err(LinkError::UserspaceDatapath {
            name: settings.bridge.name.clone(),
        });
    }
    let handle = nl::connect()?;
    let path = state::bridge_state_path(dir, &settings.bridge.name);
    let mut st: BridgeState =
        state::load(&path)?.unwrap_or_else(|| BridgeState::new(&settings.bridge.name));
    let before = st.clone();
    // Record whatever was done even when a later step fails, so teardown can undo it.
    let res = setup_inner(&handle, settings, &mut st).await;
    if st != before {
        let saved = state::save(&path, &st);
        let info = res?;
        saved?;
        Ok(info)
    } else {
        res
    }
}

async fn setup_inner(
    handle: &Handle,
    settings: &Settings,
    st: &mut BridgeState,
) -> Result<BridgeInfo, LinkError> {
    let name = &settings.bridge.name;

    // 1. Every port must exist; name all the missing ones at once.
    let mut ports = Vec::new();
    let mut missing = Vec::new();
    for p in &settings.bridge.ports {
        match nl::link_by_name(handle, p).await? {
            Some(f) => ports.push(f),
            None => missing.push(p.clone()),
        }
    }
    if !missing.is_empty() {
        return Err(LinkError::MissingPorts {
            ports: missing,
            settings: settings.path.clone(),
        });
    }

    // 2. The bridge: reuse a bridge of that name, refuse anything else, create if missing.
    let bridge = match nl::link_by_name(handle, name).await? {
        Some(b) if !b.is_bridge() => {
            return Err(LinkError::NotABridge {
                name: name.clone(),
                kind: b.kind.unwrap_or_else(|| "device".into()),
                settings: settings.path.clone(),
            });
        }
        Some(b) => {
            if st.created_bridge && st.bridge_ifindex != Some(b.index) {
                tracing::warn!(
                    "bridge {name} is not the one brdivert created (index {} != {:?}); \
                     treating it as the operator's",
                    b.index,
                    st.bridge_ifindex
                );
                st.created_bridge = false;
                st.bridge_ifindex = None;
            }
            b
        }
        None => {
            create_bridge(handle, name).await?;
            let b = nl::link_by_name(handle, name)
                .await?
                .ok_or_else(|| LinkError::NoSuchLink { name: name.clone() })?;
            tracing::info!("created bridge {name} (index {})", b.index);
            st.created_bridge = true;
            st.bridge_ifindex = Some(b.index);
            // A recreated bridge starts empty: earlier records of ports/addresses are void.
            st.enslaved_ports.clear();
            st.addresses.clear();
            b
        }
    };

    // 3. Ports: refuse foreign masters, enslave, bring up.
    for port in &ports {
        match port.master {
            Some(m) if m == bridge.index => {}
            Some(m) => {
                return Err(LinkError::PortEnslavedElsewhere {
                    port: port.name.clone(),
                    master: nl::name_of(handle, m).await,
                    bridge: name.clone(),
                });
            }
            None => {
                handle
                    .link()
                    .change(
                        LinkUnspec::new_with_index(port.index)
                            .controller(bridge.index)
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(|e| {
                        LinkError::netlink(
                            format!("enslave port {:?} to bridge {name:?}", port.name),
                            e,
                        )
                    })?;
                tracing::info!("enslaved {} to {name}", port.name);
                if !st.enslaved_ports.contains(&port.name) {
                    st.enslaved_ports.push(port.name.clone());
                }
            }
        }
        nl::set_up(handle, port).await?;
    }
    nl::set_up(handle, &bridge).await?;

    // 4. Addresses.
    let present = nl::addresses_of(handle, &bridge).await?;
    for net in &settings.bridge.address {
        let have = present
            .iter()
            .any(|(ip, len, _)| *ip == net.addr() && *len == net.prefix_len());
        if have {
            continue;
        }
        if add_address(handle, &bridge, net).await? {
            tracing::info!("added address {net} to {name}");
            if !st.addresses.contains(net) {
                st.addresses.push(*net);
            }
        }
    }

    // 5. br_netfilter off in this namespace, remembering what it was.
    if !settings.kernel.keep_br_netfilter {
        for p in BR_NETFILTER_SYSCTLS {
            disable_sysctl(Path::new(p), st)?;
        }
    }

    let facts = nl::link_by_index(handle, bridge.index)
        .await?
        .ok_or_else(|| LinkError::NoSuchLink { name: name.clone() })?;
    Ok(BridgeInfo {
        ifindex: facts.index,
        mac: mac_of(&facts)?,
        created: st.created_bridge,
    })
}

/// br_netfilter for brdivert's bridge only: its own `nf_call_iptables` and
/// `nf_call_ip6tables` options (IFLA_BR_NF_CALL_IP*TABLES), which hold even while the
/// namespace-wide `bridge-nf-call-ip*tables` sysctls are off. `decide = "queue"` needs them
/// on: NFQUEUE and conntrack exist only in the IP hooks (docs/queue.md). Turning them on
/// records the previous values; turning them off (a policy without queue rules) and
/// [`teardown`] restore those. The bridge must exist ([`setup`] first).
pub async fn set_bridge_netfilter(settings: &Settings, on: bool) -> Result<(), LinkError> {
    let dir = state_dir();
    let name = &settings.bridge.name;
    let path = state::bridge_state_path(&dir, name);
    let mut st: BridgeState = state::load(&path)?.unwrap_or_else(|| BridgeState::new(name));
    let want = match (on, st.bridge_nf_call) {
        (true, _) => [true, true],
        (false, Some(prev)) => prev,
        (false, None) => return Ok(()),
    };
    if on && !Path::new("/proc/sys/net/bridge").exists() {
        return Err(LinkError::NoBrNetfilter {
            bridge: name.clone(),
        });
    }
    let handle = nl::connect()?;
    let facts = nl::link_by_name(&handle, name)
        .await?
        .ok_or_else(|| LinkError::NoSuchLink { name: name.clone() })?;
    if facts.nf_call != want {
        let msg = LinkBridge::new(name)
            .index(facts.index)
            .nf_call_iptables(want[0])
            .nf_call_ip6tables(want[1])
            .build();
        handle
            .link()
            .change(msg)
            .execute()
            .await
            .map_err(|e| LinkError::netlink(format!("set br_netfilter options of {name:?}"), e))?;
        tracing::info!(
            "bridge {name}: nf_call_iptables {}, nf_call_ip6tables {}",
            want[0] as u8,
            want[1] as u8
        );
    }
    let before = st.clone();
    if on {
        st.bridge_nf_call.get_or_insert(facts.nf_call);
    } else {
        st.bridge_nf_call = None;
    }
    if st != before {
        if st.is_empty() {
            state::remove(&path)?;
        } else {
            state::save(&path, &st)?;
        }
    }
    Ok(())
}

async fn create_bridge(handle: &Handle, name: &str) -> Result<(), LinkError> {
    let msg = LinkBridge::new(name)
        .stp_state(BridgeStpState::Disabled)
        .forward_delay(0)
        .build();
    match handle.link().add(msg).execute().await {
        Ok(()) => Ok(()),
        Err(e) => Err(LinkError::netlink(format!("create bridge {name:?}"), e)),
    }
}

/// Add one address; `Ok(false)` if the kernel says it is already there.
async fn add_address(handle: &Handle, link: &LinkFacts, net: &IpNet) -> Result<bool, LinkError> {
    let mut req = handle
        .address()
        .add(link.index, net.addr(), net.prefix_len());
    if net.addr().is_ipv6() {
        // No duplicate address detection: the address is usable at once (and tests don't
        // wait ~2 s for DAD).
        let m = req.message_mut();
        m.header.flags |= AddressHeaderFlags::Nodad;
        m.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    match req.execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(LinkError::netlink(
            format!("add address {net} to {:?}", link.name),
            e,
        )),
    }
}

fn read_sysctl(path: &Path) -> Result<String, LinkError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| LinkError::Sysctl {
            path: path.to_path_buf(),
            source,
        })
}

fn write_sysctl(path: &Path, value: &str) -> Result<(), LinkError> {
    std::fs::write(path, format!("{value}\n")).map_err(|source| LinkError::Sysctl {
        path: path.to_path_buf(),
        source,
    })
}

fn disable_sysctl(path: &Path, st: &mut BridgeState) -> Result<(), LinkError> {
    if !path.exists() {
        // br_netfilter is not loaded: nothing crosses the ip hooks twice.
        return Ok(());
    }
    let current = read_sysctl(path)?;
    if current == "0" {
        return Ok(());
    }
    write_sysctl(path, "0")?;
    tracing::info!("set {} to 0 (was {current})", path.display());
    if !st.br_netfilter.iter().any(|v| v.path == path) {
        st.br_netfilter.push(SysctlValue {
            path: path.to_path_buf(),
            previous: current,
        });
    }
    Ok(())
}

fn mac_of(link: &LinkFacts) -> Result<[u8; 6], LinkError> {
    let bytes = link.mac.as_deref().unwrap_or_default();
    <[u8; 6]>::try_from(bytes).map_err(|_| LinkError::BadMac {
        name: link.name.clone(),
        len: bytes.len(),
    })
}

// ---------------------------------------------------------------------------------------
// teardown

/// Undo what [`setup`] and [`setup_tproxy_routing`] recorded under [`state_dir()`]: delete
/// the bridge only if brdivert created it (else release the ports it enslaved and remove the
/// addresses it added), remove its routing entries, restore br_netfilter values, remove the
/// state files. No state file: nothing to undo. What could not be undone stays recorded and
/// the first error is returned, so teardown can be retried.
pub async fn teardown(settings: &Settings) -> Result<(), LinkError> {
    teardown_at(settings, &state_dir()).await
}

/// [`teardown`] with an explicit state directory.
pub async fn teardown_at(settings: &Settings, dir: &Path) -> Result<(), LinkError> {
    let bridge_res = teardown_bridge_at(&settings.bridge.name, dir).await;
    let routing_res = routing::teardown_tproxy_routing_at(&settings.kernel, dir).await;
    // the tables (and their pin maps) are gone
    let pins_res = state::remove(&state::pins_state_path(dir, &settings.bridge.name));
    bridge_res.and(routing_res).and(pins_res)
}

async fn teardown_bridge_at(name: &str, dir: &Path) -> Result<(), LinkError> {
    let path = state::bridge_state_path(dir, name);
    let Some(mut st) = state::load::<BridgeState>(&path)? else {
        return Ok(());
    };
    let handle = nl::connect()?;
    let res = teardown_bridge_inner(&handle, name, &mut st).await;
    let saved = if st.is_empty() {
        state::remove(&path)
    } else {
        state::save(&path, &st)
    };
    res?;
    saved
}

async fn teardown_bridge_inner(
    handle: &Handle,
    name: &str,
    st: &mut BridgeState,
) -> Result<(), LinkError> {
    let mut first_err: Option<LinkError> = None;
    let mut note = |r: Result<(), LinkError>| {
        if let Err(e) = r {
            tracing::warn!("teardown: {e}");
            first_err.get_or_insert(e);
        }
    };
    // If the bridge cannot even be looked up, keep its records for a retry but still
    // restore the sysctls.
    let lookup = match nl::link_by_name(handle, name).await {
        Ok(b) => Some(b),
        Err(e) => {
            note(Err(e));
            None
        }
    };
    if let Some(bridge) = lookup {
        if st.created_bridge {
            let deleted = match &bridge {
                Some(b)
                    if b.is_bridge()
                        && (st.bridge_ifindex.is_none() || st.bridge_ifindex == Some(b.index)) =>
                {
                    match handle.link().del(b.index).execute().await {
                        Ok(()) => {
                            tracing::info!("deleted bridge {name}");
                            true
                        }
                        Err(e) if errno(&e) == Some(libc::ENODEV) => true,
                        Err(e) => {
                            note(Err(LinkError::netlink(
                                format!("delete bridge {name:?}"),
                                e,
                            )));
                            false
                        }
                    }
                }
                Some(_) => {
                    tracing::warn!(
                        "{name} is no longer the bridge brdivert created; leaving it alone"
                    );
                    true
                }
                None => true,
            };
            if deleted {
                // Deleting the bridge released its ports and dropped its addresses.
                st.created_bridge = false;
                st.bridge_ifindex = None;
                st.enslaved_ports.clear();
                st.addresses.clear();
                st.bridge_nf_call = None;
            }
        } else if let Some(b) = &bridge {
            // The operator's bridge: its br_netfilter options as they were.
            if let Some(prev) = st.bridge_nf_call {
                let msg = LinkBridge::new(name)
                    .index(b.index)
                    .nf_call_iptables(prev[0])
                    .nf_call_ip6tables(prev[1])
                    .build();
                match handle.link().change(msg).execute().await {
                    Ok(()) => st.bridge_nf_call = None,
                    Err(e) => note(Err(LinkError::netlink(
                        format!("restore br_netfilter options of {name:?}"),
                        e,
                    ))),
                }
            }
            // The operator's bridge: take back only our addresses and our ports.
            // If the addresses cannot be listed, keep their records for a retry.
            let (present, pending) = match nl::addresses_of(handle, b).await {
                Ok(p) => (p, st.addresses.clone()),
                Err(e) => {
                    note(Err(e));
                    (Vec::new(), Vec::new())
                }
            };
            for net in pending {
                let found = present
                    .iter()
                    .find(|(ip, len, _)| *ip == net.addr() && *len == net.prefix_len());
                let r = match found {
                    Some((_, _, msg)) => match handle.address().del(msg.clone()).execute().await {
                        Ok(()) => Ok(()),
                        Err(e) if errno(&e) == Some(libc::EADDRNOTAVAIL) => Ok(()),
                        Err(e) => Err(LinkError::netlink(
                            format!("remove address {net} from {name:?}"),
                            e,
                        )),
                    },
                    None => Ok(()),
                };
                if r.is_ok() {
                    st.addresses.retain(|a| *a != net);
                }
                note(r);
            }
            for port in st.enslaved_ports.clone() {
                let r = release_port(handle, &port, b.index).await;
                if r.is_ok() {
                    st.enslaved_ports.retain(|p| *p != port);
                }
                note(r);
            }
        } else {
            // The bridge is gone: nothing of ours is left on it.
            st.enslaved_ports.clear();
            st.addresses.clear();
            st.bridge_nf_call = None;
        }
    }

    for v in st.br_netfilter.clone() {
        let r = if v.path.exists() {
            write_sysctl(&v.path, &v.previous)
        } else {
            Ok(())
        };
        if r.is_ok() {
            st.br_netfilter.retain(|x| *x != v);
        }
        note(r);
    }
    first_err.map_or(Ok(()), Err)
}

/// Release `port` from the bridge with index `bridge` if it is still enslaved to it.
async fn release_port(handle: &Handle, port: &str, bridge: u32) -> Result<(), LinkError> {
    let Some(p) = nl::link_by_name(handle, port).await? else {
        return Ok(());
    };
    if p.master != Some(bridge) {
        return Ok(());
    }
    handle
        .link()
        .change(LinkUnspec::new_with_index(p.index).nocontroller().build())
        .execute()
        .await
        .map_err(|e| LinkError::netlink(format!("release port {port:?} from its bridge"), e))?;
    tracing::info!("released {port}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// TPROXY routing

/// Has brdivert's TPROXY policy routing been installed (and not flushed)? Then flows pinned to
/// an earlier tproxy rule may still be running, whatever the current policy says.
pub fn tproxy_routing_recorded(kernel: &KernelSettings) -> bool {
    state::routing_state_path(&state_dir(), kernel.route_table).exists()
}

/// Install `ip rule fwmark MARK/MASK lookup TABLE priority PRIO` and
/// `ip route local default dev lo table TABLE` for IPv4 and IPv6 (table and priority from
/// `kernel`), idempotently, recording what was added under [`state_dir()`].
pub async fn setup_tproxy_routing(
    kernel: &KernelSettings,
    mark: u32,
    mask: u32,
) -> Result<(), LinkError> {
    routing::setup_tproxy_routing_at(kernel, mark, mask, &state_dir()).await
}

/// Remove exactly the routing entries [`setup_tproxy_routing`] added.
pub async fn teardown_tproxy_routing(kernel: &KernelSettings) -> Result<(), LinkError> {
    routing::teardown_tproxy_routing_at(kernel, &state_dir()).await
}

pub use routing::{setup_tproxy_routing_at, teardown_tproxy_routing_at};

// ---------------------------------------------------------------------------------------
// lookups

/// Does a link of this name exist in this network namespace? (Errors count as "no".)
pub async fn link_exists(name: &str) -> bool {
    match nl::connect() {
        Ok(h) => matches!(nl::link_by_name(&h, name).await, Ok(Some(_))),
        Err(_) => false,
    }
}

/// Interface index of `name`, `None` if there is no such link.
pub async fn ifindex(name: &str) -> Result<Option<u32>, LinkError> {
    let h = nl::connect()?;
    Ok(nl::link_by_name(&h, name).await?.map(|f| f.index))
}

/// The Ethernet address of `name` (a bridge, TAP or port).
pub async fn bridge_mac(name: &str) -> Result<[u8; 6], LinkError> {
    let h = nl::connect()?;
    let f = nl::link_by_name(&h, name)
        .await?
        .ok_or_else(|| LinkError::NoSuchLink {
            name: name.to_string(),
        })?;
    mac_of(&f)
}

/// Names of the ports enslaved to `bridge`, sorted.
pub async fn bridge_ports(bridge: &str) -> Result<Vec<String>, LinkError> {
    use futures::TryStreamExt;
    let h = nl::connect()?;
    let b = nl::link_by_name(&h, bridge)
        .await?
        .ok_or_else(|| LinkError::NoSuchLink {
            name: bridge.to_string(),
        })?;
    let all: Vec<_> = h
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| LinkError::netlink("list interfaces", e))?;
    let mut out: Vec<String> = all
        .iter()
        .map(nl::facts)
        .filter(|f| f.master == Some(b.index))
        .map(|f| f.name)
        .collect();
    out.sort();
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// blocking wrappers

/// Run `fut` to completion on a fresh current-thread runtime. Must not be called from inside
/// a tokio runtime.
fn block_on<T>(fut: impl Future<Output = Result<T, LinkError>>) -> Result<T, LinkError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| LinkError::Runtime { source })?
        .block_on(fut)
}

/// Blocking [`setup`]. Not from inside a tokio runtime.
pub fn setup_blocking(settings: &Settings) -> Result<BridgeInfo, LinkError> {
    block_on(setup(settings))
}

/// Blocking [`setup_at`]. Not from inside a tokio runtime.
pub fn setup_at_blocking(settings: &Settings, dir: &Path) -> Result<BridgeInfo, LinkError> {
    block_on(setup_at(settings, dir))
}

/// Blocking [`teardown`]. Not from inside a tokio runtime.
pub fn teardown_blocking(settings: &Settings) -> Result<(), LinkError> {
    block_on(teardown(settings))
}

/// Blocking [`teardown_at`]. Not from inside a tokio runtime.
pub fn teardown_at_blocking(settings: &Settings, dir: &Path) -> Result<(), LinkError> {
    block_on(teardown_at(settings, dir))
}

/// Blocking [`setup_tproxy_routing`]. Not from inside a tokio runtime.
pub fn setup_tproxy_routing_blocking(
    kernel: &KernelSettings,
    mark: u32,
    mask: u32,
) -> Result<(), LinkError> {
    block_on(setup_tproxy_routing(kernel, mark, mask))
}

/// Blocking [`setup_tproxy_routing_at`]. Not from inside a tokio runtime.
pub fn setup_tproxy_routing_at_blocking(
    kernel: &KernelSettings,
    mark: u32,
    mask: u32,
    dir: &Path,
) -> Result<(), LinkError> {
    block_on(setup_tproxy_routing_at(kernel, mark, mask, dir))
}

/// Blocking [`teardown_tproxy_routing`]. Not from inside a tokio runtime.
pub fn teardown_tproxy_routing_blocking(kernel: &KernelSettings) -> Result<(), LinkError> {
    block_on(teardown_tproxy_routing(kernel))
}

/// Blocking [`teardown_tproxy_routing_at`]. Not from inside a tokio runtime.
pub fn teardown_tproxy_routing_at_blocking(
    kernel: &KernelSettings,
    dir: &Path,
) -> Result<(), LinkError> {
    block_on(teardown_tproxy_routing_at(kernel, dir))
}

/// Blocking [`link_exists`]. Not from inside a tokio runtime.
pub fn link_exists_blocking(name: &str) -> bool {
    block_on(async { Ok(link_exists(name).await) }).unwrap_or(false)
}

/// Blocking [`bridge_mac`]. Not from inside a tokio runtime.
pub fn bridge_mac_blocking(name: &str) -> Result<[u8; 6], LinkError> {
    block_on(bridge_mac(name))
}

/// Blocking [`bridge_ports`]. Not from inside a tokio runtime.
pub fn bridge_ports_blocking(bridge: &str) -> Result<Vec<String>, LinkError> {
    block_on(bridge_ports(bridge))
}

/// Where the bridge state file for `bridge` lives under [`state_dir()`].
pub fn state_file(bridge: &str) -> PathBuf {
    state::bridge_state_path(&state_dir(), bridge)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_ports_message_names_all_and_the_file() {
        let e = LinkError::MissingPorts {
            ports: vec!["eth7".into(), "eth8".into()],
            settings: "/etc/brdivert/brdivert.toml".into(),
        };
        let s = e.to_string();
        assert!(s.contains("\"eth7\", \"eth8\""), "{s}");
        assert!(s.contains("/etc/brdivert/brdivert.toml"), "{s}");
    }

    #[test]
    fn mac_length_checked() {
        let mut f = LinkFacts {
            index: 1,
            name: "x".into(),
            kind: None,
            master: None,
            mac: Some(vec![1, 2, 3]),
            up: true,
            nf_call: [false; 2],
        };
        assert!(matches!(mac_of(&f), Err(LinkError::BadMac { len: 3, .. })));
        f.mac = Some(vec![2, 0, 0, 0, 0, 1]);
        assert_eq!(mac_of(&f).unwrap(), [2, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn sysctl_disable_records_previous_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nf");
        std::fs::write(&p, "1\n").unwrap();
        let mut st = BridgeState::new("br0");
        disable_sysctl(&p, &mut st).unwrap();
        disable_sysctl(&p, &mut st).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap().trim(), "0");
        assert_eq!(st.br_netfilter.len(), 1);
        assert_eq!(st.br_netfilter[0].previous, "1");
        // absent sysctl: nothing recorded
        disable_sysctl(&dir.path().join("absent"), &mut st).unwrap();
        assert_eq!(st.br_netfilter.len(), 1);
    }
}
