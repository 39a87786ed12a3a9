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
    /// frames too big for a receive ring's slot, read whole from the socket instead
    pub copied: u64,
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
            copied: 0,
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

    /// Frame `i` arrived as `len` bytes (vnet header included) after the headroom of its
    /// buffer: record it, or mark it to skip when it was cut short (`whole` false) or too
    /// short to be Ethernet; put back the VLAN tag (TPID, TCI) the kernel stripped.
    fn settle(&mut self, i: usize, len: usize, whole: bool, vlan: Option<(u16, u16)>) {
        self.frames[i] = (HEADROOM, len);
        if !whole || len < VNET_HDR_LEN + 14 {
            self.frames[i] = (HEADROOM, 0);
            self.bad += 1;
            return;
        }
        if let Some((tpid, tci)) = vlan {
            match restore_vlan(&mut self.bufs[i], HEADROOM, len, tpid, tci) {
                Some(f) => self.frames[i] = f,
                None => {
                    self.frames[i] = (HEADROOM, 0);
                    self.bad += 1;
                }
            }
        }
    }

    /// Read buffer `i` (after the headroom), for devices read one frame at a time.
    pub fn slot(&mut self, i: usize) -> &mut [u8] {
        &mut self.bufs[i][HEADROOM..]
    }
}

/// The TPID of a tag the kernel stripped: as reported when the kernel says it is valid, or
/// 802.1Q.
fn vlan_tpid(status: u32, tpid: u16) -> u16 {
    if status & sys::TP_STATUS_VLAN_TPID_VALID != 0 {
        tpid
    } else {
        0x8100
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

    /// Frames the kernel dropped for want of room in this socket's ring or receive queue
    /// since the last call (the datapath fell behind).
    pub fn take_drops(&self) -> io::Result<u64> {
        sys::take_packet_drops(self.raw_fd()).map(u64::from)
    }

    /// Wait until a frame is queued or `timeout` passes (for callers that do not poll
    /// several descriptors themselves).
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<()> {
        let mut fds = [libc::pollfd {
            fd: self.raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        sys::poll_readable(&mut fds, timeout)
    }

    /// Receive what is queued now (at most the batch's capacity) without waiting; the
    /// caller waits for readiness on [`PacketPort::raw_fd`].
    pub fn recv_now(&self, b: &mut RxBatch) -> io::Result<usize> {
        let n = self.recv_into(b, 0, b.cap())?;
        b.n = n;
        Ok(n)
    }

    /// `recvmmsg` into batch slots `first..first + count`; how many frames arrived.
    fn recv_into(&self, b: &mut RxBatch, first: usize, count: usize) -> io::Result<usize> {
        let slots = first..first + count;
        for i in slots.clone() {
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
        let n = sys::recvmmsg(self.raw_fd(), &mut b.hdrs[slots])?;
        for i in first..first + n {
            let len = b.hdrs[i].msg_len as usize;
            let whole = b.hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC == 0;
            let vlan = sys::auxdata(&b.hdrs[i].msg_hdr)
                .filter(|aux| aux.tp_status & sys::TP_STATUS_VLAN_VALID != 0)
                .map(|aux| (vlan_tpid(aux.tp_status, aux.tp_vlan_tpid), aux.tp_vlan_tci));
            b.settle(i, len, whole, vlan);
        }
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

/// A port's receive ring (`PACKET_RX_RING`, TPACKET_V2): the kernel copies each frame into
/// the next free slot of a ring mapped into this process, so receiving costs no system call
/// and a thread can see whether frames wait by reading a status word. Slots hold an
/// MTU-sized frame; a bigger one (a GSO super-frame) is queued on the socket whole
/// (`PACKET_COPY_THRESH`) and its slot only says so (`TP_STATUS_COPY`): it is read with
/// `recvmmsg` in its turn. Owned by the one thread that receives on the port.
///
/// TPACKET_V3 packs frames tighter but hands a block over only when it is full or its timer
/// (at least a millisecond) runs out: too slow for a bridge.
pub struct RxRing {
    map: sys::RingMap,
    /// the next slot to read
    next: usize,
}

impl RxRing {
    /// Slot size: a 1500-byte-MTU frame with a tag, the vnet header and the kernel's
    /// headers (tpacket2_hdr, sockaddr_ll: the frame starts 76 bytes in).
    pub const SLOT: usize = 2048;
    /// Slots: 8 MiB per port, as the socket buffer it replaces.
    pub const SLOTS: usize = 4096;
    const BLOCK: usize = 64 * 1024;

    /// Give `port` a receive ring. Before any frame is forwarded: frames queued on the
    /// socket so far are dropped by the kernel.
    pub fn attach(port: &PacketPort) -> io::Result<RxRing> {
        let fd = port.raw_fd();
        let ctx = |what: &str, e: io::Error| {
            io::Error::new(e.kind(), format!("{what} on {:?}: {e}", port.name))
        };
        sys::setsockopt(fd, sys::SOL_PACKET, sys::PACKET_VERSION, &sys::TPACKET_V2)
            .map_err(|e| ctx("PACKET_VERSION TPACKET_V2", e))?;
        let one: libc::c_int = 1;
        sys::setsockopt(fd, sys::SOL_PACKET, sys::PACKET_COPY_THRESH, &one)
            .map_err(|e| ctx("PACKET_COPY_THRESH", e))?;
        let req = sys::TpacketReq {
            tp_block_size: Self::BLOCK as u32,
            tp_block_nr: (Self::SLOTS * Self::SLOT / Self::BLOCK) as u32,
            tp_frame_size: Self::SLOT as u32,
            tp_frame_nr: Self::SLOTS as u32,
        };
        sys::setsockopt(fd, sys::SOL_PACKET, sys::PACKET_RX_RING, &req)
            .map_err(|e| ctx("PACKET_RX_RING", e))?;
        let map = sys::RingMap::map(fd, Self::SLOTS * Self::SLOT)
            .map_err(|e| ctx("mapping the receive ring", e))?;
        Ok(RxRing { map, next: 0 })
    }

    /// Take what is waiting (at most the batch's capacity) into `b`, without waiting, and
    /// hand the slots back to the kernel.
    pub fn recv(&mut self, port: &PacketPort, b: &mut RxBatch) -> io::Result<usize> {
        b.n = 0;
        let mut n = 0;
        // a run of frames waiting whole on the socket: batch slots copies.0.. (copies.1 of
        // them), read with one recvmmsg when the run ends
        let mut copies = (0, 0);
        while n < b.cap() {
            let off = self.next * Self::SLOT;
            let status = self.map.status(off);
            if status & sys::TP_STATUS_USER == 0 {
                break;
            }
            if status & sys::TP_STATUS_COPY != 0 {
                // the whole frame waits on the socket, in the same order as the slots
                if copies.1 == 0 {
                    copies.0 = n;
                }
                copies.1 += 1;
            } else {
                Self::recv_copies(port, b, &mut copies)?;
                self.copy_out(off, status, b, n);
            }
            self.map.release(off);
            self.next = (self.next + 1) % Self::SLOTS;
            n += 1;
        }
        Self::recv_copies(port, b, &mut copies)?;
        b.n = n;
        Ok(n)
    }

    /// Read a run of frames that wait whole on the socket into their batch slots.
    fn recv_copies(
        port: &PacketPort,
        b: &mut RxBatch,
        (first, count): &mut (usize, usize),
    ) -> io::Result<()> {
        if *count == 0 {
            return Ok(());
        }
        b.copied += *count as u64;
        let got = port.recv_into(b, *first, *count)?;
        for i in *first + got..*first + *count {
            // announced by its slot but not on the socket: lost
            b.frames[i] = (HEADROOM, 0);
            b.bad += 1;
        }
        *count = 0;
        Ok(())
    }

    /// Copy the frame in the slot at `off` (vnet header and frame) into batch slot `i`.
    fn copy_out(&self, off: usize, status: u32, b: &mut RxBatch, i: usize) {
        let h = self.map.header(off).unwrap_or_default();
        let (len, snaplen, mac) = (
            h.tp_len as usize,
            h.tp_snaplen as usize,
            usize::from(h.tp_mac),
        );
        let whole = snaplen == len && mac >= VNET_HDR_LEN;
        let bytes = VNET_HDR_LEN + snaplen;
        let src = whole
            .then(|| self.map.bytes(off + mac - VNET_HDR_LEN, bytes))
            .flatten()
            .filter(|_| mac + snaplen <= Self::SLOT && bytes <= BUF_LEN - HEADROOM);
        let Some(src) = src else {
            b.settle(i, 0, false, None);
            return;
        };
        b.bufs[i][HEADROOM..HEADROOM + bytes].copy_from_slice(src);
        let vlan = (status & sys::TP_STATUS_VLAN_VALID != 0)
            .then(|| (vlan_tpid(status, h.tp_vlan_tpid), h.tp_vlan_tci));
        b.settle(i, bytes, true, vlan);
    }
}
