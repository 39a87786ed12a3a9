//! TPROXY policy routing: `ip rule add fwmark MARK/MASK lookup TABLE priority PRIO` and
//! `ip route add local default dev lo table TABLE`, for IPv4 and IPv6.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use futures::TryStreamExt;
use netlink_packet_route::route::{
    RouteAttribute, RouteHeader, RouteMessage, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use super::error::{LinkError, errno};
use super::nl;
use super::state::{self, Family, RouteEntry, RoutingState, RuleEntry};
use crate::settings::KernelSettings;

const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

fn ip_version(f: Family) -> IpVersion {
    match f {
        Family::V4 => IpVersion::V4,
        Family::V6 => IpVersion::V6,
    }
}

fn fam_name(f: Family) -> &'static str {
    match f {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    }
}

fn rule_table(m: &RuleMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

fn rule_matches(m: &RuleMessage, want: &RuleEntry) -> bool {
    let mut mark = None;
    let mut mask = None;
    let mut prio = None;
    for a in &m.attributes {
        match a {
            RuleAttribute::FwMark(v) => mark = Some(*v),
            RuleAttribute::FwMask(v) => mask = Some(*v),
            RuleAttribute::Priority(v) => prio = Some(*v),
            _ => {}
        }
    }
    m.header.action == RuleAction::ToTable
        && rule_table(m) == want.table
        && mark == Some(want.mark)
        && mask.unwrap_or(u32::MAX) == want.mask
        && prio.unwrap_or(0) == want.priority
}

fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

fn route_matches(m: &RouteMessage, want: &RouteEntry, lo: u32) -> bool {
    let oif = m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    m.header.kind == RouteType::Local
        && m.header.destination_prefix_length == 0
        && route_table(m) == want.table
        && oif == Some(lo)
}

async fn find_rules(handle: &Handle, want: &RuleEntry) -> Result<Vec<RuleMessage>, LinkError> {
    let all: Vec<RuleMessage> = handle
        .rule()
        .get(ip_version(want.family))
        .execute()
        .try_collect()
        .await
        .map_err(|e| LinkError::netlink(format!("list {} rules", fam_name(want.family)), e))?;
    Ok(all.into_iter().filter(|m| rule_matches(m, want)).collect())
}

async fn find_routes(
    handle: &Handle,
    want: &RouteEntry,
    lo: u32,
) -> Result<Vec<RouteMessage>, LinkError> {
    let query = match want.family {
        Family::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
        Family::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
    };
    let all: Vec<RouteMessage> = handle
        .route()
        .get(query)
        .execute()
        .try_collect()
        .await
        .map_err(|e| LinkError::netlink(format!("list {} routes", fam_name(want.family)), e))?;
    Ok(all
        .into_iter()
        .filter(|m| route_matches(m, want, lo))
        .collect())
}

fn rule_desc(r: &RuleEntry) -> String {
    format!(
        "{} rule fwmark {:#x}/{:#x} lookup {} priority {}",
        fam_name(r.family),
        r.mark,
        r.mask,
        r.table,
        r.priority
    )
}

fn route_desc(r: &RouteEntry) -> String {
    format!(
        "{} route local default dev lo table {}",
        fam_name(r.family),
        r.table
    )
}

/// Add the rule unless an identical one exists; `true` if brdivert added it.
async fn ensure_rule(handle: &Handle, want: &RuleEntry) -> Result<bool, LinkError> {
    if !find_rules(handle, want).await?.is_empty() {
        return Ok(false);
    }
    let req = handle.rule().add().action(RuleAction::ToTable);
    let req = match want.family {
        Family::V4 => {
            let mut r = req.v4();
            push_rule_attrs(r.message_mut(), want);
            r.execute().await
        }
        Family::V6 => {
            let mut r = req.v6();
            push_rule_attrs(r.message_mut(), want);
            r.execute().await
        }
    };
    match req {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(LinkError::netlink(format!("add {}", rule_desc(want)), e)),
    }
}

fn push_rule_attrs(m: &mut RuleMessage, want: &RuleEntry) {
    // As iproute2 does: tables above 255 go in FRA_TABLE with the header field unspecified.
    m.header.table = if want.table > 255 {
        RouteHeader::RT_TABLE_UNSPEC
    } else {
        want.table as u8
    };
    m.attributes.push(RuleAttribute::Table(want.table));
    m.attributes.push(RuleAttribute::Priority(want.priority));
    m.attributes.push(RuleAttribute::FwMark(want.mark));
    m.attributes.push(RuleAttribute::FwMask(want.mask));
}

/// Add the route unless it exists; `true` if brdivert added it.
async fn ensure_route(handle: &Handle, want: &RouteEntry, lo: u32) -> Result<bool, LinkError> {
    if !find_routes(handle, want, lo).await?.is_empty() {
        return Ok(false);
    }
    let mut msg = match want.family {
        Family::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .output_interface(lo)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .build(),
        Family::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .output_interface(lo)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .build(),
    };
    msg.header.table = if want.table > 255 {
        RouteHeader::RT_TABLE_UNSPEC
    } else {
        want.table as u8
    };
    msg.attributes.push(RouteAttribute::Table(want.table));
    match handle.route().add(msg).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(LinkError::netlink(format!("add {}", route_desc(want)), e)),
    }
}

async fn remove_rule(handle: &Handle, entry: &RuleEntry) -> Result<(), LinkError> {
    for m in find_rules(handle, entry).await? {
        match handle.rule().del(m).execute().await {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(libc::ENOENT) => {}
            Err(e) => {
                return Err(LinkError::netlink(
                    format!("delete {}", rule_desc(entry)),
                    e,
                ));
            }
        }
    }
    Ok(())
}

async fn remove_route(handle: &Handle, entry: &RouteEntry, lo: u32) -> Result<(), LinkError> {
    for m in find_routes(handle, entry, lo).await? {
        match handle.route().del(m).execute().await {
            Ok(()) => {}
            Err(e) if matches!(errno(&e), Some(libc::ENOENT) | Some(libc::ESRCH)) => {}
            Err(e) => {
                return Err(LinkError::netlink(
                    format!("delete {}", route_desc(entry)),
                    e,
                ));
            }
        }
    }
    Ok(())
}

async fn loopback(handle: &Handle) -> Result<nl::LinkFacts, LinkError> {
    nl::link_by_name(handle, "lo")
        .await?
        .ok_or_else(|| LinkError::NoSuchLink { name: "lo".into() })
}

/// Install the TPROXY policy routing for IPv4 and IPv6 (idempotent), recording what was added
/// in `DIR/tproxy-<table>.json`. Entries recorded by an earlier call with another mark, mask
/// or priority are removed, so the kernel ends up with exactly the wanted ones.
pub async fn setup_tproxy_routing_at(
    kernel: &KernelSettings,
    mark: u32,
    mask: u32,
    dir: &Path,
) -> Result<(), LinkError> {
    let handle = nl::connect()?;
    let path = state::routing_state_path(dir, kernel.route_table);
    let mut st: RoutingState = state::load(&path)?.unwrap_or_default();
    let before = st.clone();
    let res = setup_routing_inner(&handle, kernel, mark, mask, &mut st).await;
    if st != before {
        let saved = if st.is_empty() {
            state::remove(&path)
        } else {
            state::save(&path, &st)
        };
        res?;
        saved
    } else {
        res
    }
}

async fn setup_routing_inner(
    handle: &Handle,
    kernel: &KernelSettings,
    mark: u32,
    mask: u32,
    st: &mut RoutingState,
) -> Result<(), LinkError> {
    let lo = loopback(handle).await?;
    if !lo.up {
        tracing::warn!("loopback is down; bringing it up (TPROXY delivers through lo)");
        nl::set_up(handle, &lo).await?;
    }
    for family in FAMILIES {
        match setup_family(handle, kernel, family, mark, mask, lo.index, st).await {
            Err(e) if family == Family::V6 && e.errno() == Some(libc::EAFNOSUPPORT) => {
                tracing::warn!("IPv6 is disabled in this kernel; no IPv6 TPROXY routing");
            }
            other => other?,
        }
    }
    Ok(())
}

async fn setup_family(
    handle: &Handle,
    kernel: &KernelSettings,
    family: Family,
    mark: u32,
    mask: u32,
    lo: u32,
    st: &mut RoutingState,
) -> Result<(), LinkError> {
    let rule = RuleEntry {
        family,
        mark,
        mask,
        table: kernel.route_table,
        priority: kernel.rule_priority,
    };
    // Our own stale rules of this table (another mark/mask/priority) go first.
    let stale: Vec<RuleEntry> = st
        .rules
        .iter()
        .filter(|r| r.family == family && **r != rule)
        .copied()
        .collect();
    for old in stale {
        remove_rule(handle, &old).await?;
        st.rules.retain(|r| *r != old);
    }
    if ensure_rule(handle, &rule).await? {
        tracing::info!("added {}", rule_desc(&rule));
        if !st.rules.contains(&rule) {
            st.rules.push(rule);
        }
    }
    let route = RouteEntry {
        family,
        table: kernel.route_table,
    };
    if ensure_route(handle, &route, lo).await? {
        tracing::info!("added {}", route_desc(&route));
        if !st.routes.contains(&route) {
            st.routes.push(route);
        }
    }
    Ok(())
}

/// Remove exactly the routing entries recorded in `DIR/tproxy-<table>.json` and the file.
/// No file: nothing to undo.
pub async fn teardown_tproxy_routing_at(
    kernel: &KernelSettings,
    dir: &Path,
) -> Result<(), LinkError> {
    let path = state::routing_state_path(dir, kernel.route_table);
    let Some(mut st) = state::load::<RoutingState>(&path)? else {
        return Ok(());
    };
    let handle = nl::connect()?;
    let res = teardown_routing_inner(&handle, &mut st).await;
    let saved = if st.is_empty() {
        state::remove(&path)
    } else {
        state::save(&path, &st)
    };
    res?;
    saved
}

async fn teardown_routing_inner(handle: &Handle, st: &mut RoutingState) -> Result<(), LinkError> {
    let mut first_err = None;
    for rule in st.rules.clone() {
        match remove_rule(handle, &rule).await {
            Ok(()) => {
                tracing::info!("removed {}", rule_desc(&rule));
                st.rules.retain(|r| *r != rule);
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if !st.routes.is_empty() {
        match loopback(handle).await {
            Ok(lo) => {
                for route in st.routes.clone() {
                    match remove_route(handle, &route, lo.index).await {
                        Ok(()) => {
                            tracing::info!("removed {}", route_desc(&route));
                            st.routes.retain(|r| *r != route);
                        }
                        Err(e) => {
                            first_err.get_or_insert(e);
                        }
                    }
                }
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
