//! The local port: a TAP device named after the bridge (`bridge.name`) that carries the
//! bridge's addresses. Frames written to it enter the host stack as if received on it; frames
//! the host sends out of it are read here and bridged like any port's.
//!
//! Opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and offloads (`TUNSETOFFLOAD`: checksum,
//! TSO4/6), so it speaks the same 10-byte vnet header as the AF_PACKET ports and super-frames
//! cross without segmentation. The device is not persistent: closing it removes it.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use ipnet::IpNet;

use super::frame::VNET_HDR_LEN;
use super::port::RxBatch;
use super::sys;

pub struct Tap {
    pub name: String,
    pub ifindex: i32,
    pub mac: [u8; 6],
    pub mtu: u32,
    fd: OwnedFd,
}

impl Tap {
    /// Create the TAP `name`, set its MTU, bring it up. Addresses: [`add_addresses`].
    pub fn create(name: &str, mtu: Option<u32>) -> io::Result<Tap> {
        let ctx =
            |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{what} {name:?}: {e}"));
        if sys::if_info(name).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "interface {name:?} already exists; in the userspace datapath bridge.name \
                     is the TAP local port brdivert creates (remove the old device first)"
                ),
            ));
        }
        let fd = sys::open_tun().map_err(|e| ctx("opening /dev/net/tun for", e))?;
        let raw = fd.as_raw_fd();
        let mut r = sys::IfReq::new(name)?;
        let flags = sys::IFF_TAP | sys::IFF_NO_PI | sys::IFF_VNET_HDR;
        r.data[..2].copy_from_slice(&flags.to_ne_bytes());
        sys::ifreq_ioctl(raw, sys::TUNSETIFF, &mut r).map_err(|e| ctx("creating TAP", e))?;
        let name = r.name();
        let hdr: libc::c_int = VNET_HDR_LEN as libc::c_int;
        sys::intptr_ioctl(raw, sys::TUNSETVNETHDRSZ, &hdr)
            .map_err(|e| ctx("TUNSETVNETHDRSZ", e))?;
        sys::int_ioctl(
            raw,
            sys::TUNSETOFFLOAD,
            (sys::TUN_F_CSUM | sys::TUN_F_TSO4 | sys::TUN_F_TSO6 | sys::TUN_F_TSO_ECN).into(),
        )
        .map_err(|e| ctx("TUNSETOFFLOAD", e))?;
        if let Some(m) = mtu {
            sys::set_mtu(&name, m).map_err(|e| ctx("setting the MTU of", e))?;
        }
        sys::set_up(&name).map_err(|e| ctx("bringing up", e))?;
        let info = sys::if_info(&name)?;
        Ok(Tap {
            name,
            ifindex: info.index,
            mac: info.mac,
            mtu: info.mtu,
            fd,
        })
    }

    /// Read what is queued now (one frame per read) without waiting; the caller waits for
    /// readiness on [`Tap::raw_fd`].
    pub fn recv_now(&self, b: &mut RxBatch) -> io::Result<usize> {
        b.n = 0;
        for i in 0..b.cap() {
            match sys::read(self.fd.as_raw_fd(), b.slot(i)) {
                Ok(len) if len >= VNET_HDR_LEN + 14 => {
                    b.frames[i] = (super::frame::HEADROOM, len);
                }
                Ok(_) => {
                    b.frames[i] = (super::frame::HEADROOM, 0);
                    b.bad += 1;
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    break;
                }
                Err(e) => return Err(e),
            }
            b.n = i + 1;
        }
        Ok(b.n)
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Write frames (each with its vnet header); how many were taken.
    pub fn send(&self, frames: &[&[u8]]) -> usize {
        frames
            .iter()
            .filter(|f| sys::write(self.fd.as_raw_fd(), f).is_ok())
            .count()
    }
}

/// Run `fut` on a helper thread with its own small tokio runtime, so rtnetlink works from
/// inside or outside tokio; the thread inherits the caller's network namespace.
fn block_on<T: Send>(fut: impl Future<Output = io::Result<T>> + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(move || -> io::Result<T> {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(fut)
        })
        .join()
        .map_err(|_| io::Error::other("netlink helper thread panicked"))?
    })
}

fn connect() -> io::Result<rtnetlink::Handle> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    Ok(handle)
}

/// The master device of `name`: its name and whether it is a kernel bridge.
/// (`/sys/class/net` is not used: it shows the namespace sysfs was mounted in.)
pub fn master_of(name: &str) -> io::Result<Option<(String, bool)>> {
    use futures::TryStreamExt;
    use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo};
    let name = name.to_string();
    block_on(async move {
        let h = connect()?;
        let nl_err = |e: rtnetlink::Error| io::Error::other(format!("rtnetlink: {e}"));
        let port = match h
            .link()
            .get()
            .match_name(name.clone())
            .execute()
            .try_next()
            .await
        {
            Ok(m) => m,
            // no such port: opening it says so, with its name
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == libc::ENODEV => None,
            Err(e) => return Err(nl_err(e)),
        };
        let Some(master) = port.and_then(|m| {
            m.attributes.iter().find_map(|a| match a {
                LinkAttribute::Controller(i) if *i != 0 => Some(*i),
                _ => None,
            })
        }) else {
            return Ok(None);
        };
        let Some(m) = h
            .link()
            .get()
            .match_index(master)
            .execute()
            .try_next()
            .await
            .map_err(nl_err)?
        else {
            return Ok(None);
        };
        let mut mname = format!("#{master}");
        let mut bridge = false;
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => mname = n.clone(),
                LinkAttribute::LinkInfo(infos) => {
                    bridge |= infos
                        .iter()
                        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge)));
                }
                _ => {}
            }
        }
        Ok(Some((mname, bridge)))
    })
}

/// Put the bridge's addresses on the TAP (rtnetlink, IPv6 without DAD).
pub fn add_addresses(ifindex: u32, addrs: &[IpNet]) -> io::Result<()> {
    if addrs.is_empty() {
        return Ok(());
    }
    let addrs = addrs.to_vec();
    block_on(async move {
        let handle = connect()?;
        for net in &addrs {
            let mut req = handle.address().add(ifindex, net.addr(), net.prefix_len());
            if net.addr().is_ipv6() {
                use netlink_packet_route::address::{
                    AddressAttribute, AddressFlags, AddressHeaderFlags,
                };
                let m = req.message_mut();
                m.header.flags |= AddressHeaderFlags::Nodad;
                m.attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            req.execute()
                .await
                .map_err(|e| io::Error::other(format!("adding address {net} to the TAP: {e}")))?;
        }
        Ok(())
    })
}
