//! Realserver MACs from the bridge host's neighbour table (`dr` realservers given by
//! `address`). An address the table does not know yet is probed by sending it one UDP
//! datagram (port 9, discard): the kernel resolves it over ARP / ND on the bridge, where
//! `bridge.address` puts the host on the segment. The answer (or a silent drop) does not
//! matter, only the neighbour entry it leaves.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};

use super::error::LinkError;
use super::nl;

/// The MACs the neighbour table holds for `addrs` on the link `ifindex`, in usable states
/// (reachable, stale, delay, probe, permanent: a MAC the kernel has seen answer).
pub async fn read(ifindex: u32, addrs: &[IpAddr]) -> Result<BTreeMap<IpAddr, [u8; 6]>, LinkError> {
    let h = nl::connect()?;
    let mut out = BTreeMap::new();
    let mut stream = h.neighbours().get().execute();
    while let Some(msg) = stream
        .try_next()
        .await
        .map_err(|e| LinkError::netlink("list neighbours", e))?
    {
        if msg.header.ifindex != ifindex
            || !matches!(
                msg.header.state,
                NeighbourState::Reachable
                    | NeighbourState::Stale
                    | NeighbourState::Delay
                    | NeighbourState::Probe
                    | NeighbourState::Permanent
            )
        {
            continue;
        }
        let mut ip = None;
        let mut mac = None;
        for a in &msg.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                    ip = Some(IpAddr::V4(*v4))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                    ip = Some(IpAddr::V6(*v6))
                }
                NeighbourAttribute::LinkLayerAddress(l) => mac = <[u8; 6]>::try_from(&l[..]).ok(),
                _ => {}
            }
        }
        if let (Some(ip), Some(mac)) = (ip, mac)
            && addrs.contains(&ip)
        {
            out.insert(ip, mac);
        }
    }
    Ok(out)
}

/// [`read`], probing the addresses it lacks and waiting up to `wait` for their entries.
/// Addresses still unknown after that are left out (the caller says what that means).
pub async fn resolve(
    bridge: &str,
    addrs: &[IpAddr],
    wait: Duration,
) -> Result<BTreeMap<IpAddr, [u8; 6]>, LinkError> {
    if addrs.is_empty() {
        return Ok(BTreeMap::new());
    }
    let h = nl::connect()?;
    let Some(link) = nl::link_by_name(&h, bridge).await? else {
        return Ok(BTreeMap::new());
    };
    let deadline = Instant::now() + wait;
    let mut probed = false;
    loop {
        let found = read(link.index, addrs).await?;
        let missing: Vec<IpAddr> = addrs
            .iter()
            .copied()
            .filter(|a| !found.contains_key(a))
            .collect();
        if missing.is_empty() || Instant::now() >= deadline {
            return Ok(found);
        }
        if !probed {
            for a in &missing {
                probe(*a);
            }
            probed = true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One datagram to `addr`'s discard port, so the kernel resolves its MAC. Failures (no route,
/// no address of that family on the bridge) only mean the address stays unresolved.
fn probe(addr: IpAddr) {
    let any: IpAddr = match addr {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let bind = SocketAddr::new(any, 0);
    if let Ok(s) = UdpSocket::bind(bind) {
        let _ = s.send_to(b"brdivert neighbour probe", SocketAddr::new(addr, 9));
    }
}

/// Blocking [`resolve`]. Not from inside a tokio runtime (from `spawn_blocking` is fine).
pub fn resolve_blocking(
    bridge: &str,
    addrs: &[IpAddr],
    wait: Duration,
) -> Result<BTreeMap<IpAddr, [u8; 6]>, LinkError> {
    super::block_on(resolve(bridge, addrs, wait))
}
