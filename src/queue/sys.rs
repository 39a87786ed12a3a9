//! Small OS wrappers the `nfq` crate does not offer: finding the netlink socket behind an
//! `nfq::Queue` (the crate keeps its fd private), socket options on it, `setns` for a
//! worker thread, and the kernel's per-queue counters.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

/// The kernel's view of one queue (a line of /proc/net/netfilter/nfnetlink_queue).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelQueue {
    pub num: u16,
    pub portid: u32,
    pub waiting: u64,
    pub copy_range: u32,
    pub dropped: u64,
    pub user_dropped: u64,
}

pub fn parse_proc_queues(text: &str) -> Vec<KernelQueue> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(KernelQueue {
                num: f.first()?.parse().ok()?,
                portid: f.get(1)?.parse().ok()?,
                waiting: f.get(2)?.parse().ok()?,
                copy_range: f.get(4)?.parse().ok()?,
                dropped: f.get(5)?.parse().ok()?,
                user_dropped: f.get(6)?.parse().ok()?,
            })
        })
        .collect()
}

/// The queues of the calling thread's network namespace.
pub fn kernel_queues() -> io::Result<Vec<KernelQueue>> {
    let text = fs::read_to_string("/proc/thread-self/net/netfilter/nfnetlink_queue")?;
    Ok(parse_proc_queues(&text))
}

fn getsockopt_int(fd: RawFd, level: libc::c_int, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid for writes of the sizes given; a bad fd just fails.
    let rc = unsafe { libc::getsockopt(fd, level, opt, (&raw mut v).cast(), &mut len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, opt: libc::c_int, v: &T) -> io::Result<()> {
    // SAFETY: v points to a live T of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (v as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn netlink_portid(fd: RawFd) -> io::Result<u32> {
    // SAFETY: an all-zero sockaddr_nl is valid.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    // SAFETY: sa and len are valid for writes of the sizes given.
    let rc = unsafe { libc::getsockname(fd, (&raw mut sa).cast(), &mut len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if i32::from(sa.nl_family) != libc::AF_NETLINK {
        return Err(io::Error::other("not a netlink socket"));
    }
    Ok(sa.nl_pid)
}

/// Inode of the network namespace a socket lives in (SIOCGSKNS).
fn socket_netns_ino(fd: RawFd) -> io::Result<u64> {
    // SAFETY: SIOCGSKNS takes no argument and returns a new fd (or -1).
    let ns = unsafe { libc::ioctl(fd, libc::SIOCGSKNS as _) };
    if ns < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ns is a fresh fd we own; File closes it.
    let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(ns) };
    Ok(f.metadata()?.ino())
}

/// Finds the fd of the NETLINK_NETFILTER socket bound to queue `num` in the calling
/// thread's network namespace: the queue's peer port id comes from /proc, the socket is
/// the one of this process with that port id in this namespace (port ids are unique per
/// namespace and protocol, so the match is exact even with other netfilter sockets open).
pub fn find_queue_fd(num: u16) -> io::Result<RawFd> {
    let portid = kernel_queues()?
        .into_iter()
        .find(|q| q.num == num)
        .map(|q| q.portid)
        .ok_or_else(|| io::Error::other(format!("queue {num} is not bound")))?;
    let my_ns = fs::metadata("/proc/thread-self/ns/net")?.ino();
    let mut found = Vec::new();
    for e in fs::read_dir("/proc/self/fd")? {
        let Ok(e) = e else { continue };
        let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<RawFd>().ok()) else {
            continue;
        };
        let is_socket = fs::read_link(e.path())
            .map(|t| t.to_string_lossy().starts_with("socket:"))
            .unwrap_or(false);
        if !is_socket {
            continue;
        }
        if getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN).ok() != Some(libc::AF_NETLINK)
            || getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL).ok()
                != Some(libc::NETLINK_NETFILTER)
            || netlink_portid(fd).ok() != Some(portid)
        {
            continue;
        }
        match socket_netns_ino(fd) {
            Ok(ino) if ino != my_ns => continue,
            _ => found.push(fd),
        }
    }
    match found[..] {
        [fd] => Ok(fd),
        [] => Err(io::Error::other(format!(
            "no socket of this process holds queue {num} (port id {portid})"
        ))),
        _ => Err(io::Error::other(format!(
            "several sockets match queue {num} (port id {portid})"
        ))),
    }
}

/// Receive buffer: SO_RCVBUFFORCE (needs CAP_NET_ADMIN, ignores rmem_max), else SO_RCVBUF.
pub fn set_rcvbuf(fd: RawFd, bytes: usize) -> io::Result<()> {
    let v = libc::c_int::try_from(bytes / 2).unwrap_or(libc::c_int::MAX / 2);
    // the kernel doubles the value it is given
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &v)
        .or_else(|_| setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &v))
}

pub fn rcvbuf(fd: RawFd) -> io::Result<usize> {
    getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF).map(|v| v.max(0) as usize)
}

/// A receive timeout, so a blocked `recv` wakes up to check for shutdown.
pub fn set_rcv_timeout(fd: RawFd, d: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(d.subsec_micros() as i32),
    };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)
}

/// Moves the calling thread into the network namespace `ns`.
pub fn setns_net(ns: &File) -> io::Result<()> {
    // SAFETY: affects only the calling thread; the fd is valid for the call.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_queue_lines() {
        let t = "    3  12345     0 2   128     7     9       42  1\n    4 4294963196 1 2 128 0 0 1 1\nbad\n";
        let q = parse_proc_queues(t);
        assert_eq!(q.len(), 2, "{q:?}");
        assert_eq!(q[1].portid, 4294963196);
        assert_eq!(
            q[0],
            KernelQueue {
                num: 3,
                portid: 12345,
                waiting: 0,
                copy_range: 128,
                dropped: 7,
                user_dropped: 9
            }
        );
    }
}
