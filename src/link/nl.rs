//! Small rtnetlink helpers: connect, look links up, read addresses.

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoBridge, InfoData, InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::{Handle, LinkUnspec};

use super::error::{LinkError, errno};

/// Open an rtnetlink socket in the calling thread's network namespace and drive it on the
/// current tokio runtime.
pub(crate) fn connect() -> Result<Handle, LinkError> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|source| LinkError::Socket { source })?;
    tokio::spawn(conn);
    Ok(handle)
}

/// What brdivert needs to know about one link.
#[derive(Debug, Clone)]
pub(crate) struct LinkFacts {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND` ("bridge", "veth", ...); `None` for plain hardware devices.
    pub kind: Option<String>,
    /// Index of the master device, if enslaved.
    pub master: Option<u32>,
    pub mac: Option<Vec<u8>>,
    pub up: bool,
    /// A bridge's `nf_call_iptables` and `nf_call_ip6tables` options.
    pub nf_call: [bool; 2],
}

impl LinkFacts {
    pub fn is_bridge(&self) -> bool {
        self.kind.as_deref() == Some("bridge")
    }

    pub fn from_msg(msg: &LinkMessage) -> LinkFacts {
        let mut facts = LinkFacts {
            index: msg.header.index,
            name: String::new(),
            kind: None,
            master: None,
            mac: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            nf_call: [false; 2],
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => facts.name = n.clone(),
                LinkAttribute::Controller(m) if *m != 0 => facts.master = Some(*m),
                LinkAttribute::Address(a) => facts.mac = Some(a.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => facts.kind = Some(kind_name(k)),
                            LinkInfo::Data(InfoData::Bridge(opts)) => {
                                for o in opts {
                                    match o {
                                        InfoBridge::NfCallIpTables(v) => facts.nf_call[0] = *v,
                                        InfoBridge::NfCallIp6Tables(v) => facts.nf_call[1] = *v,
                                        _ => {}
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        facts
    }
}

fn kind_name(k: &InfoKind) -> String {
    k.to_string()
}

/// Look a link up by name; `Ok(None)` when no such link exists.
pub(crate) async fn link_by_name(
    handle: &Handle,
    name: &str,
) -> Result<Option<LinkFacts>, LinkError> {
    let mut stream = handle.link().get().match_name(name.to_string()).execute();
    match stream.try_next().await {
        Ok(Some(msg)) => Ok(Some(LinkFacts::from_msg(&msg))),
        Ok(None) => Ok(None),
        Err(e) if matches!(errno(&e), Some(libc::ENODEV)) => Ok(None),
        Err(e) => Err(LinkError::netlink(format!("look up interface {name:?}"), e)),
    }
}

/// Look a link up by index; `Ok(None)` when no such link exists.
pub(crate) async fn link_by_index(
    handle: &Handle,
    index: u32,
) -> Result<Option<LinkFacts>, LinkError> {
    let mut stream = handle.link().get().match_index(index).execute();
    match stream.try_next().await {
        Ok(Some(msg)) => Ok(Some(LinkFacts::from_msg(&msg))),
        Ok(None) => Ok(None),
        Err(e) if matches!(errno(&e), Some(libc::ENODEV)) => Ok(None),
        Err(e) => Err(LinkError::netlink(format!("look up interface #{index}"), e)),
    }
}

/// Name of the link with this index, or `#index` if it cannot be found.
pub(crate) async fn name_of(handle: &Handle, index: u32) -> String {
    match link_by_index(handle, index).await {
        Ok(Some(f)) if !f.name.is_empty() => f.name,
        _ => format!("#{index}"),
    }
}

/// Bring a link up (no-op if it already is).
pub(crate) async fn set_up(handle: &Handle, link: &LinkFacts) -> Result<(), LinkError> {
    if link.up {
        return Ok(());
    }
    handle
        .link()
        .change(LinkUnspec::new_with_index(link.index).up().build())
        .execute()
        .await
        .map_err(|e| LinkError::netlink(format!("bring interface {:?} up", link.name), e))
}

/// The addresses on one interface, each with its message (for deletion).
pub(crate) async fn addresses_of(
    handle: &Handle,
    link: &LinkFacts,
) -> Result<Vec<(IpAddr, u8, AddressMessage)>, LinkError> {
    let msgs: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(link.index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| LinkError::netlink(format!("list addresses of {:?}", link.name), e))?;
    let mut out = Vec::new();
    for m in msgs {
        // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the same or the peer
        // (point-to-point). IPv6 usually only carries IFA_ADDRESS.
        let local = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let addr = local.or_else(|| {
            m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        });
        if let Some(ip) = addr {
            out.push((ip, m.header.prefix_len, m));
        }
    }
    Ok(out)
}

/// Facts of a dumped link message.
pub(crate) fn facts(msg: &LinkMessage) -> LinkFacts {
    LinkFacts::from_msg(msg)
}
