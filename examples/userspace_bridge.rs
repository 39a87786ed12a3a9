//! Run the userspace datapath from a settings file until SIGINT/SIGTERM, with its
//! local-stack rules: what `brdivert run` does for the datapath, without the control plane.
//! Used by `bench/userspace.sh`; prints the counters on exit.
//!
//! `cargo run --release --example userspace_bridge -- /etc/brdivert/brdivert.toml`

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use brdivert::datapath::{Datapath, Options, local_rules};
use brdivert::policy::Policy;
use brdivert::settings::Settings;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let path: PathBuf = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .context("usage: userspace_bridge SETTINGS.toml")?;
    let settings = Settings::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let policy = Arc::new(Policy::load(&settings).map_err(|e| anyhow::anyhow!("{e}"))?);
    // Experiment knobs: BRDIVERT_BATCH (frames per recvmmsg/sendmmsg, default 64),
    // BRDIVERT_THREADS and BRDIVERT_SPIN_US (over the settings' [bridge] threads and
    // busy_poll_us), BRDIVERT_RX_RING=0 (receive with recvmmsg, not the mapped ring).
    let mut opts = Options::from_settings(&settings);
    if let Some(b) = env_number("BRDIVERT_BATCH") {
        opts.batch = b as usize;
    }
    if let Some(t) = env_number("BRDIVERT_THREADS") {
        opts.threads = t as usize;
    }
    if let Some(us) = env_number("BRDIVERT_SPIN_US") {
        opts.spin = std::time::Duration::from_micros(us);
    }
    if let Some(r) = env_number("BRDIVERT_RX_RING") {
        opts.rx_ring = r != 0;
    }
    let dp = Datapath::start_with(&settings, policy.clone(), opts)?;
    local_rules::install_blocking(&settings, &policy, dp.local_port().1)?;
    eprintln!("userspace datapath running ({:?})", dp.local_port());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        anyhow::Ok(())
    })?;
    let stats = dp.stats();
    dp.stop();
    local_rules::remove_at_blocking(&settings, &brdivert::link::state_dir())?;
    eprintln!("{stats:#?}");
    Ok(())
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}
