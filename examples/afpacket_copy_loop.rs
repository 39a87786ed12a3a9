//! The floor of the AF_PACKET technique, for `bench/userspace.sh --configs ...,loop`: two
//! ports, no FDB, no classification, no TAP, no ring, no busy polling — each direction is
//! one thread that waits for frames on one port (`poll`), reads them with `recvmmsg` and
//! writes them unchanged, vnet header included, to the other port with `sendmmsg`. It uses
//! the datapath's own port I/O ([`PacketPort`]), so it shows what the AF_PACKET socket
//! pair costs by itself, and how much of the userspace datapath's gap to the kernel bridge
//! is the bridge's own work. It is what the "throw-away copy loop" was.
//!
//! `afpacket_copy_loop PORT_A PORT_B` runs until killed.

use std::time::Duration;

use anyhow::Context;
use brdivert::datapath::port::{PacketPort, RxBatch, TxBatch};

/// Frames per recvmmsg/sendmmsg, as the datapath's default batch.
const BATCH: usize = 64;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (a, b) = match (args.next(), args.next()) {
        (Some(a), Some(b)) => (a, b),
        _ => anyhow::bail!("usage: afpacket_copy_loop PORT_A PORT_B"),
    };
    // One socket per port, as in the datapath: each thread receives on its own port's and
    // sends on the other's (a second socket bound to a port would receive a clone of
    // every frame too, and nobody would read it).
    let (a, b) = (PacketPort::open(&a)?, PacketPort::open(&b)?);
    eprintln!("afpacket copy loop running ({} <-> {})", a.name, b.name);
    std::thread::scope(|s| {
        let a_to_b = s.spawn(|| copy(&a, &b));
        let b_to_a = copy(&b, &a);
        a_to_b
            .join()
            .map_err(|_| anyhow::anyhow!("a copy thread panicked"))??;
        b_to_a
    })
}

fn copy(from: &PacketPort, to: &PacketPort) -> anyhow::Result<()> {
    let mut rx = RxBatch::new(BATCH);
    let mut tx = TxBatch::default();
    loop {
        from.wait_readable(Duration::from_millis(100))
            .with_context(|| format!("waiting on {}", from.name))?;
        let n = from
            .recv_now(&mut rx)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            })
            .with_context(|| format!("receiving on {}", from.name))?;
        let frames: Vec<&[u8]> = (0..n)
            .map(|i| rx.frame(i))
            .filter(|f| !f.is_empty())
            .collect();
        to.send(&mut tx, &frames);
    }
}
