//! Bridge ports over AF_PACKET: one `SOCK_RAW` socket per port, bound to it, promiscuous,
//! blind to its own transmissions (`PACKET_IGNORE_OUTGOING`), with `PACKET_VNET_HDR` (GSO/GRO
//! super-frames and checksum-partial frames pass intact) and `PACKET_AUXDATA` (VLAN tags the
//! kernel stripped are put back). Batched with `recvmmsg`/`sendmmsg`.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use super::frame::{HEADROOM, VNET_HDR_LEN, restore_vlan};
use super::sys;

/// The largest frame a port hands over: a 64 KiB GSO super-frame plus headers and a tag.
pub const MAX_FRAME: usize = 65536 + 64;
pub const BUF_LEN: usize = HEADROOM + VNET_HDR_LEN + MAX_FRAME;
const CMSG_LEN: usize = 64;

/// Receive buffers of one thread. Frame `i` is `bufs[i][start..start + len]`: the vnet
/// header, then the Ethernet frame (a zero `len` marks a frame to skip).
pub struct RxBatch {
    bufs: Vec<Vec<u8>>,
    pub frames: Vec<(usize, usize)>,
    pub n: usize,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    cmsgs: Vec<[u64; CMSG_LEN / 8]>,
    /// received frames that were cut short or could not be re-tagged
    pub bad: u64,
}

impl RxBatch {
    pub fn new(cap: usize) -> RxBatch {
        let cap = cap.max(1);
        RxBatch {
            bufs: (0..cap).map(|_| vec![0u8; BUF_LEN]).collect(),
            frames: vec![(0, 0); cap],
            n: 0,
            iovs: (0..cap)
                .map(|_| libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                })
                .collect(),
            hdrs: (0..cap).map(|_| sys::empty_mmsghdr()).collect(),
            cmsgs: vec![[0u64; CMSG_LEN / 8]; cap],
            bad: 0,
        }
    }

    pub fn cap(&self) -> usize {
        self.bufs.len()
    }

    /// Frame `i` with its vnet header.
    pub fn frame(&self, i: usize) -> &[u8] {
        let (s, l) = self.frames[i];
        &self.bufs[i][s..s + l]
    }

    pub fn frame_mut(&mut self, i: usize) -> &mut [u8] {
        let (s, l) = self.frames[i];
        &mut self.bufs[i][s..s + l]
    }

    /// Read buffer `i` (after the headroom), for devices read one frame at a time.
    pub fn slot(&mut self, i: usize) -> &mut [u8] {
        &mut self.bufs[i][HEADROOM..]
    }
}

/// Reusable `sendmmsg` vectors.
#[derive(Default)]
pub struct TxBatch {
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

// SAFETY (Send): the raw pointers inside are only set and used within one `send` call.
unsafe impl Send for TxBatch {}

pub struct PacketPort {
    pub name: String,
    pub ifindex: i32,
    pub mtu: u32,
    pub mac: [u8; 6],
    fd: OwnedFd,
}

/// Refuse a port enslaved to a kernel bridge (it would be bridged twice).
pub fn check_port(name: &str) -> io::Result<()> {
    if let Some((master, true)) = super::tap::master_of(name)? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "port {name:?} is enslaved to kernel bridge {master:?}; the userspace datapath \
                 needs free ports (ip link set {name} nomaster, or use datapath = \"kernel\")"
            ),
        ));
    }
    Ok(())
}

impl PacketPort {
    pub fn open(name: &str) -> io::Result<PacketPort> {
        let ctx =
            |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{what} {name:?}: {e}"));
        check_port(name)?;
        let info = sys::if_info(name).map_err(|e| ctx("no such port", e))?;
        if info.flags & libc::IFF_UP as libc::c_short == 0 {
            sys::set_up(name).map_err(|e| ctx("bringing up", e))?;
        }
        let fd = sys::packet_socket().map_err(|e| ctx("AF_PACKET socket for", e))?;
        let raw = fd.as_raw_fd();
        let one: libc::c_int = 1;
        sys::setsockopt(raw, sys::SOL_PACKET, sys::PACKET_VNET_HDR, &one)
            .map_err(|e| ctx("PACKET_VNET_HDR on", e))?;
        sys::setsockopt(raw, sys::SOL_PACKET, sys::PACKET_AUXDATA, &one)
            .map_err(|e| ctx("PACKET_AUXDATA on", e))?;
        sys::setsockopt(raw, sys::SOL_PACKET, sys::PACKET_IGNORE_OUTGOING, &one)
            .map_err(|e| ctx("PACKET_IGNORE_OUTGOING on", e))?;
        let bufsz: libc::c_int = 8 << 20;
        // Best effort: FORCE needs CAP_NET_ADMIN, the plain options are capped by sysctls.
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
            if sys::setsockopt(raw, libc::SOL_SOCKET, opt, &bufsz).is_err() {
                let plain = if opt == libc::SO_RCVBUFFORCE {
                    libc::SO_RCVBUF
                } else {
                    libc::SO_SNDBUF
                };
                let _ = sys::setsockopt(raw, libc::SOL_SOCKET, plain, &bufsz);
            }
        }
        // Transmit straight to the driver: the frames are already shaped for the wire, and
        // the qdisc's lock and queueing cost per frame.
        sys::setsockopt(raw, sys::SOL_PACKET, sys::PACKET_QDISC_BYPASS, &one)
            .map_err(|e| ctx("PACKET_QDISC_BYPASS on", e))?;
        sys::bind_packet(raw, info.index).map_err(|e| ctx("binding to", e))?;
        sys::set_promisc(raw, info.index).map_err(|e| ctx("promiscuous mode on", e))?;
        Ok(PacketPort {
            name: name.to_string(),
            ifindex: info.index,
            mtu: info.mtu,
            mac: info.mac,
            fd,
        })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Receive what is queued now (at most the batch's capacity) without waiting; the
    /// caller waits for readiness on [`PacketPort::raw_fd`].
    pub fn recv_now(&self, b: &mut RxBatch) -> io::Result<usize> {
        b.n = 0;
        let cap = b.cap();
        for i in 0..cap {
            b.iovs[i] = libc::iovec {
                iov_base: b.bufs[i][HEADROOM..].as_mut_ptr().cast(),
                iov_len: BUF_LEN - HEADROOM,
            };
            let h = &mut b.hdrs[i];
            *h = sys::empty_mmsghdr();
            h.msg_hdr.msg_iov = &mut b.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = b.cmsgs[i].as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = CMSG_LEN as _;
        }
        let n = sys::recvmmsg(self.raw_fd(), &mut b.hdrs[..cap])?;
        for i in 0..n {
            let len = b.hdrs[i].msg_len as usize;
            let truncated = b.hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            b.frames[i] = (HEADROOM, len);
            if truncated || len < VNET_HDR_LEN + 14 {
                b.frames[i] = (HEADROOM, 0);
                b.bad += 1;
                continue;
            }
            if let Some(aux) = sys::auxdata(&b.hdrs[i].msg_hdr)
                && aux.tp_status & sys::TP_STATUS_VLAN_VALID != 0
            {
                let tpid = if aux.tp_status & sys::TP_STATUS_VLAN_TPID_VALID != 0 {
                    aux.tp_vlan_tpid
                } else {
                    0x8100
                };
                match restore_vlan(&mut b.bufs[i], HEADROOM, len, tpid, aux.tp_vlan_tci) {
                    Some(f) => b.frames[i] = f,
                    None => {
                        b.frames[i] = (HEADROOM, 0);
                        b.bad += 1;
                    }
                }
            }
        }
        b.n = n;
        Ok(n)
    }

    /// Send frames (each with its vnet header); how many the kernel took.
    pub fn send(&self, tx: &mut TxBatch, frames: &[&[u8]]) -> usize {
        tx.iovs.clear();
        tx.hdrs.clear();
        for f in frames {
            tx.iovs.push(libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            });
        }
        for i in 0..frames.len() {
            let mut h = sys::empty_mmsghdr();
            h.msg_hdr.msg_iov = &mut tx.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            tx.hdrs.push(h);
        }
        let mut done = 0;
        let mut retries = 0;
        while done < frames.len() {
            match sys::sendmmsg(self.raw_fd(), &mut tx.hdrs[done..]) {
                Ok(0) => break,
                Ok(k) => done += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && retries < 64 => {
                    // The socket is non-blocking (for receiving); wait for room to send.
                    retries += 1;
                    sys::poll_out(self.raw_fd(), Duration::from_millis(10));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // This frame is refused (too big, device down): skip it, keep the rest.
                    done += 1;
                    retries = 0;
                }
            }
        }
        tx.hdrs.iter().take(done).filter(|h| h.msg_len > 0).count()
    }
}
