//! `brdivert run` with `bridge.datapath = "userspace"`: the daemon owns the datapath's
//! forwarding threads (`crate::datapath`) and the local-stack rules of its TAP local port.
//! A reload swaps the compiled policy into the running datapath (established flows keep
//! their decision) and replaces the local-stack table in one transaction; a health flip tells
//! the datapath which rules are down. Unlike the kernel datapath, nothing forwards once the
//! daemon is gone: stopping stops bridging (systemd restarts it, see docs/userspace.md).
//!
//! Every method blocks (netlink, thread joins): call them from `spawn_blocking`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::datapath::{Datapath, local_rules};
use crate::ops::{Failure, Installed};
use crate::policy::Policy;
use crate::settings::Settings;

pub struct Userspace {
    dp: Mutex<Option<Datapath>>,
    down: Mutex<HashSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data behind the lock: keep serving after a panic elsewhere.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Userspace {
    /// Open the ports, create the TAP, start forwarding, install the local-stack rules.
    pub fn start(
        settings: &Settings,
        policy: &Policy,
    ) -> Result<(Arc<Userspace>, Installed), Failure> {
        let dp =
            Datapath::start(settings, Arc::new(policy.clone())).map_err(anyhow::Error::from)?;
        let mac = dp.local_port().1;
        if let Err(e) = local_rules::install_blocking(settings, policy, mac) {
            dp.stop();
            return Err(Failure::Runtime(e));
        }
        let u = Arc::new(Userspace {
            dp: Mutex::new(Some(dp)),
            down: Mutex::new(HashSet::new()),
        });
        Ok((
            u,
            Installed {
                rules: policy.rules.len(),
                created: true,
                mac,
                neighbours: Default::default(),
            },
        ))
    }

    /// A validated new policy: local-stack rules first (the new rules' tags must be known
    /// before frames carry them), then the datapath's classifier.
    pub fn reload(&self, settings: &Settings, policy: &Policy) -> Result<Installed, Failure> {
        let guard = lock(&self.dp);
        let dp = guard.as_ref().ok_or_else(|| {
            Failure::Runtime(anyhow::anyhow!("the userspace datapath is stopped"))
        })?;
        let mac = dp.local_port().1;
        local_rules::install_blocking(settings, policy, mac).map_err(Failure::Runtime)?;
        dp.swap_policy(Arc::new(policy.clone()));
        Ok(Installed {
            rules: policy.rules.len(),
            created: false,
            mac,
            neighbours: Default::default(),
        })
    }

    /// Stop forwarding, remove the TAP (with the threads) and the local-stack rules.
    pub fn stop(&self, settings: &Settings) -> anyhow::Result<()> {
        if let Some(dp) = lock(&self.dp).take() {
            dp.stop();
        }
        local_rules::remove_at_blocking(settings, &crate::link::state_dir())
    }
}

impl super::HealthFlip for Userspace {
    fn set(&self, _: &Settings, _: &Policy, rule: &str, up: bool) -> anyhow::Result<()> {
        let down = {
            let mut d = lock(&self.down);
            if up {
                d.remove(rule);
            } else {
                d.insert(rule.to_string());
            }
            d.clone()
        };
        if let Some(dp) = lock(&self.dp).as_ref() {
            dp.set_unhealthy(down);
        }
        Ok(())
    }
}
