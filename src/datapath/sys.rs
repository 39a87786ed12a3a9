//! Small `unsafe` wrappers around the Linux calls the datapath needs: AF_PACKET sockets and
//! their options, `recvmmsg`/`sendmmsg`, `poll`, interface ioctls and the TUN/TAP device.
//! Every `unsafe` block of the datapath lives here, each with its reason.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

pub const ETH_P_ALL: u16 = 0x0003;
pub const SOL_PACKET: libc::c_int = 263;
pub const PACKET_ADD_MEMBERSHIP: libc::c_int = 1;
pub const PACKET_RX_RING: libc::c_int = 5;
pub const PACKET_STATISTICS: libc::c_int = 6;
pub const PACKET_COPY_THRESH: libc::c_int = 7;
pub const PACKET_AUXDATA: libc::c_int = 8;
pub const PACKET_VERSION: libc::c_int = 10;
pub const PACKET_VNET_HDR: libc::c_int = 15;
pub const PACKET_QDISC_BYPASS: libc::c_int = 20;
pub const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
pub const PACKET_MR_PROMISC: libc::c_ushort = 1;
pub const TPACKET_V2: libc::c_int = 1;
pub const TP_STATUS_KERNEL: u32 = 0;
pub const TP_STATUS_USER: u32 = 1 << 0;
pub const TP_STATUS_COPY: u32 = 1 << 1;
pub const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
pub const TP_STATUS_VLAN_TPID_VALID: u32 = 1 << 6;

pub const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
pub const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
pub const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
pub const IFF_TAP: libc::c_short = 0x0002;
pub const IFF_NO_PI: libc::c_short = 0x1000;
pub const IFF_VNET_HDR: libc::c_short = 0x4000;
pub const TUN_F_CSUM: libc::c_uint = 0x01;
pub const TUN_F_TSO4: libc::c_uint = 0x02;
pub const TUN_F_TSO6: libc::c_uint = 0x04;
pub const TUN_F_TSO_ECN: libc::c_uint = 0x08;

/// `struct tpacket_auxdata` (linux/if_packet.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct TpacketAuxdata {
    pub tp_status: u32,
    pub tp_len: u32,
    pub tp_snaplen: u32,
    pub tp_mac: u16,
    pub tp_net: u16,
    pub tp_vlan_tci: u16,
    pub tp_vlan_tpid: u16,
}

/// `struct tpacket2_hdr` (linux/if_packet.h): the head of a frame in a TPACKET_V2 ring.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Tpacket2Hdr {
    pub tp_status: u32,
    pub tp_len: u32,
    pub tp_snaplen: u32,
    pub tp_mac: u16,
    pub tp_net: u16,
    pub tp_sec: u32,
    pub tp_nsec: u32,
    pub tp_vlan_tci: u16,
    pub tp_vlan_tpid: u16,
    pub tp_padding: [u8; 4],
}

/// `struct tpacket_req` (linux/if_packet.h): the shape of a TPACKET_V1/V2 ring.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct TpacketReq {
    pub tp_block_size: u32,
    pub tp_block_nr: u32,
    pub tp_frame_size: u32,
    pub tp_frame_nr: u32,
}

#[repr(C)]
struct PacketMreq {
    mr_ifindex: libc::c_int,
    mr_type: libc::c_ushort,
    mr_alen: libc::c_ushort,
    mr_address: [u8; 8],
}

/// `struct ifreq`: the name and a 24-byte union.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IfReq {
    pub name: [u8; libc::IFNAMSIZ],
    pub data: [u8; 24],
}

impl IfReq {
    pub fn new(name: &str) -> io::Result<IfReq> {
        let b = name.as_bytes();
        if b.is_empty() || b.len() >= libc::IFNAMSIZ || b.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad interface name {name:?}"),
            ));
        }
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..b.len()].copy_from_slice(b);
        Ok(r)
    }

    pub fn name(&self) -> String {
        CStr::from_bytes_until_nul(&self.name)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_ssize(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// `socket(AF_PACKET, SOCK_RAW, 0)`: receives nothing until bound with a protocol.
pub fn packet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; a non-negative result is a fresh fd we own.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    })?;
    // SAFETY: fd was just returned by socket() and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, v: &T) -> io::Result<()> {
    // SAFETY: `v` points to a live T of the size passed.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (v as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// `struct tpacket_stats` (linux/if_packet.h; TPACKET_V1/V2 and ring-less sockets).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct TpacketStats {
    tp_packets: u32,
    tp_drops: u32,
}

/// Frames the kernel dropped on this packet socket (its ring or receive queue was full)
/// since the last call: `PACKET_STATISTICS` hands the counts over and resets them.
pub fn take_packet_drops(fd: RawFd) -> io::Result<u32> {
    let mut st = TpacketStats::default();
    let mut len = std::mem::size_of::<TpacketStats>() as libc::socklen_t;
    // SAFETY: `st` is a live, writable TpacketStats and `len` says its size; the kernel
    // writes at most `len` bytes.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            SOL_PACKET,
            PACKET_STATISTICS,
            (&mut st as *mut TpacketStats).cast(),
            &mut len,
        )
    })?;
    Ok(st.tp_drops)
}

pub fn set_promisc(fd: RawFd, ifindex: i32) -> io::Result<()> {
    let m = PacketMreq {
        mr_ifindex: ifindex,
        mr_type: PACKET_MR_PROMISC,
        mr_alen: 0,
        mr_address: [0; 8],
    };
    setsockopt(fd, SOL_PACKET, PACKET_ADD_MEMBERSHIP, &m)
}

pub fn bind_packet(fd: RawFd, ifindex: i32) -> io::Result<()> {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = ETH_P_ALL.to_be();
    sa.sll_ifindex = ifindex;
    // SAFETY: sa is a valid sockaddr_ll and its size is passed.
    cvt(unsafe {
        libc::bind(
            fd,
            (&sa as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// `recvmmsg(MSG_DONTWAIT)`; `Ok(0)` when nothing is waiting.
pub fn recvmmsg(fd: RawFd, msgs: &mut [libc::mmsghdr]) -> io::Result<usize> {
    // SAFETY: every mmsghdr points to buffers owned by the caller that outlive the call.
    let r = unsafe {
        libc::recvmmsg(
            fd,
            msgs.as_mut_ptr(),
            msgs.len() as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(r as usize)
}

/// `sendmmsg`; how many were sent.
pub fn sendmmsg(fd: RawFd, msgs: &mut [libc::mmsghdr]) -> io::Result<usize> {
    // SAFETY: every mmsghdr points to buffers owned by the caller that outlive the call.
    let r = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), msgs.len() as libc::c_uint, 0) };
    cvt(r).map(|n| n as usize)
}

/// Wait until one of `fds` has what its `events` ask for (the caller sets `POLLIN`) or
/// `timeout` passes (an interrupted wait counts as a timeout).
pub fn poll_readable(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<()> {
    // SAFETY: `fds` is a valid array of pollfd of the given length.
    let r = unsafe {
        libc::poll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            timeout.as_millis() as libc::c_int,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of buf.len() bytes.
    cvt_ssize(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) })
}

pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for reads of buf.len() bytes.
    cvt_ssize(unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) })
}

/// An ioctl taking a `struct ifreq` on `fd`.
pub fn ifreq_ioctl(fd: RawFd, req: libc::c_ulong, ifr: &mut IfReq) -> io::Result<()> {
    // SAFETY: ifr is a valid, writable struct ifreq for the ioctls we pass.
    cvt(unsafe { libc::ioctl(fd, req as _, ifr as *mut IfReq) }).map(drop)
}

/// An ioctl taking an integer argument by value.
pub fn int_ioctl(fd: RawFd, req: libc::c_ulong, v: libc::c_ulong) -> io::Result<()> {
    // SAFETY: these ioctls take their argument by value.
    cvt(unsafe { libc::ioctl(fd, req as _, v) }).map(drop)
}

/// An ioctl taking a pointer to an int.
pub fn intptr_ioctl(fd: RawFd, req: libc::c_ulong, v: &libc::c_int) -> io::Result<()> {
    // SAFETY: v points to a live int.
    cvt(unsafe { libc::ioctl(fd, req as _, v as *const libc::c_int) }).map(drop)
}

/// An AF_INET datagram socket for interface ioctls.
pub fn ioctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; a non-negative result is a fresh fd we own.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd was just returned by socket().
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn open_tun() -> io::Result<OwnedFd> {
    // SAFETY: path is a NUL-terminated literal.
    let fd = cvt(unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    })?;
    // SAFETY: fd was just returned by open().
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Interface facts by ioctl.
pub struct IfInfo {
    pub index: i32,
    pub mtu: u32,
    pub mac: [u8; 6],
    pub flags: libc::c_short,
}

pub fn if_info(name: &str) -> io::Result<IfInfo> {
    let s = ioctl_socket()?;
    let fd = s.as_raw_fd();
    let mut r = IfReq::new(name)?;
    ifreq_ioctl(fd, libc::SIOCGIFINDEX, &mut r)?;
    let index = i32::from_ne_bytes([r.data[0], r.data[1], r.data[2], r.data[3]]);
    ifreq_ioctl(fd, libc::SIOCGIFMTU, &mut r)?;
    let mtu = u32::from_ne_bytes([r.data[0], r.data[1], r.data[2], r.data[3]]);
    ifreq_ioctl(fd, libc::SIOCGIFHWADDR, &mut r)?;
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&r.data[2..8]);
    ifreq_ioctl(fd, libc::SIOCGIFFLAGS, &mut r)?;
    let flags = libc::c_short::from_ne_bytes([r.data[0], r.data[1]]);
    Ok(IfInfo {
        index,
        mtu,
        mac,
        flags,
    })
}

/// Bring `name` up (IFF_UP), leaving its other flags.
pub fn set_up(name: &str) -> io::Result<()> {
    let s = ioctl_socket()?;
    let mut r = IfReq::new(name)?;
    ifreq_ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut r)?;
    let flags =
        libc::c_short::from_ne_bytes([r.data[0], r.data[1]]) | libc::IFF_UP as libc::c_short;
    r.data[..2].copy_from_slice(&flags.to_ne_bytes());
    ifreq_ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &mut r)
}

pub fn set_mtu(name: &str, mtu: u32) -> io::Result<()> {
    let s = ioctl_socket()?;
    let mut r = IfReq::new(name)?;
    r.data[..4].copy_from_slice(&(mtu as i32).to_ne_bytes());
    ifreq_ioctl(s.as_raw_fd(), libc::SIOCSIFMTU, &mut r)
}

/// The `PACKET_AUXDATA` control message of a received packet, if any.
pub fn auxdata(msg: &libc::msghdr) -> Option<TpacketAuxdata> {
    // SAFETY: msg was filled by recvmmsg with msg_control pointing to a buffer of
    // msg_controllen bytes; the CMSG_* macros stay inside it, and the data of a
    // SOL_PACKET/PACKET_AUXDATA message is a tpacket_auxdata (read unaligned).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            let h = &*c;
            if h.cmsg_level == SOL_PACKET
                && h.cmsg_type == PACKET_AUXDATA
                && h.cmsg_len as usize
                    >= libc::CMSG_LEN(std::mem::size_of::<TpacketAuxdata>() as u32) as usize
            {
                return Some(std::ptr::read_unaligned(
                    libc::CMSG_DATA(c).cast::<TpacketAuxdata>(),
                ));
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    None
}

/// A zeroed `mmsghdr` (plain data).
pub fn empty_mmsghdr() -> libc::mmsghdr {
    // SAFETY: mmsghdr is plain data; all-zero (null pointers, zero lengths) is valid.
    unsafe { std::mem::zeroed() }
}

/// Wait until `fd` can take more output or `timeout` passes.
pub fn poll_out(fd: RawFd, timeout: Duration) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) };
}

/// A socket's packet ring mapped `MAP_SHARED` (`PACKET_RX_RING`), unmapped on drop. Frames
/// are `frame_size` apart; each starts with a `struct tpacket2_hdr` whose first word, the
/// status, says whether the kernel or the user owns the frame.
pub struct RingMap {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY (Send): the mapping belongs to this value alone; moving it to another thread moves
// the ownership. Not Sync: reading a frame and handing it back must not race.
unsafe impl Send for RingMap {}

impl RingMap {
    pub fn map(fd: RawFd, len: usize) -> io::Result<RingMap> {
        // SAFETY: a fresh shared mapping of the socket's ring, of the length the ring was
        // set up with; nothing else refers to this address range.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(RingMap { ptr, len })
    }

    fn status_word(&self, off: usize) -> &std::sync::atomic::AtomicU32 {
        assert!(
            off.is_multiple_of(16) && off + 4 <= self.len,
            "ring offset {off} out of the map"
        );
        // SAFETY: in bounds (checked) and 16-byte aligned (frames are TPACKET_ALIGNMENT
        // multiples from a page-aligned base); the word is shared with the kernel, so it is
        // only ever accessed atomically here.
        unsafe { std::sync::atomic::AtomicU32::from_ptr(self.ptr.as_ptr().add(off).cast()) }
    }

    /// The status of the frame at `off`, read with acquire ordering: once it says the frame
    /// is the user's, the kernel's writes to the frame are visible.
    pub fn status(&self, off: usize) -> u32 {
        self.status_word(off)
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Hand the frame at `off` back to the kernel (release: reads of it come first).
    pub fn release(&self, off: usize) {
        self.status_word(off)
            .store(TP_STATUS_KERNEL, std::sync::atomic::Ordering::Release);
    }

    /// The header of the frame at `off`; `None` outside the map. Only for a frame the status
    /// says is the user's (see [`RingMap::bytes`]).
    pub fn header(&self, off: usize) -> Option<Tpacket2Hdr> {
        let b = self.bytes(off, std::mem::size_of::<Tpacket2Hdr>())?;
        // SAFETY: `b` holds exactly a Tpacket2Hdr's bytes, and it is plain data (any bit
        // pattern is valid); read unaligned, as `auxdata` reads its struct.
        Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<Tpacket2Hdr>()) })
    }

    /// `len` bytes at `off`; `None` outside the map. Only for a frame the status says is the
    /// user's: the kernel does not write it until it is released.
    pub fn bytes(&self, off: usize, len: usize) -> Option<&[u8]> {
        if off.checked_add(len)? > self.len {
            return None;
        }
        // SAFETY: in bounds (checked); the caller owns the frame (see above), so the kernel
        // does not write these bytes while the borrow lives.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(off), len) })
    }
}

impl Drop for RingMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
