//! `brdivert run` with `bridge.datapath = "userspace"`: the daemon owns the datapath's
//! forwarding threads (`crate::datapath`) and the local-stack rules of its TAP local port.
//! A reload swaps the compiled policy into the running datapath (established flows keep
//! their decision) and replaces the local-stack table in one transaction; a health flip tells
//! the datapath which rules are down, or (for `dr` realservers) recomputes the bucket
//! assignment. `decide = "queue"` rules are decided inline by the datapath's threads with the
//! daemon's decider ([`super::queue::Queue::inline`]). Unlike the kernel datapath, nothing
//! forwards once the daemon is gone: stopping stops bridging (systemd restarts it, see
//! docs/userspace.md).
//!
//! Every method blocks (netlink, thread joins): call them from `spawn_blocking`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::datapath::{Datapath, Options, local_rules};
use crate::ops::{self, Failure, Installed};
use crate::policy::Policy;
use crate::queue::InlineDecider;
use crate::settings::Settings;

pub struct Userspace {
    dp: Mutex<Option<Datapath>>,
    down: Mutex<HashSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data behind the lock: keep serving after a panic elsewhere.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// MACs of the policy's `dr` realservers given by address, from the TAP's neighbour table
/// (probing the missing ones, as the kernel datapath's install does: `bridge.address` must
/// cover their subnet). Unresolved ones get no buckets, with a warning.
fn learn_realservers(
    settings: &Settings,
    policy: &Policy,
) -> Result<BTreeMap<IpAddr, [u8; 6]>, Failure> {
    let wanted = ops::dr_addresses(policy);
    let found =
        crate::link::neigh::resolve_blocking(&settings.bridge.name, &wanted, ops::NEIGHBOUR_WAIT)
            .map_err(anyhow::Error::from)?;
    ops::warn_unresolved(settings, &wanted, &found);
    Ok(found)
}

impl Userspace {
    /// Open the ports, create the TAP, start forwarding (queue rules decided by `decider`),
    /// install the local-stack rules, learn the `dr` realservers' MACs.
    pub fn start(
        settings: &Settings,
        policy: &Policy,
        decider: Option<Arc<InlineDecider>>,
    ) -> Result<(Arc<Userspace>, Installed), Failure> {
        let opts = Options {
            decider,
            ..Options::from_settings(settings)
        };
        let dp = Datapath::start_with(settings, Arc::new(policy.clone()), opts)
            .map_err(anyhow::Error::from)?;
        let mac = dp.local_port().1;
        let neighbours = match local_rules::install_blocking(settings, policy, mac)
            .map_err(Failure::Runtime)
            .and_then(|()| learn_realservers(settings, policy))
        {
            Ok(n) => n,
            Err(e) => {
                dp.stop();
                return Err(e);
            }
        };
        dp.set_dr_state(neighbours.clone(), BTreeSet::new());
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
                neighbours,
            },
        ))
    }

    /// A validated new policy: the static FDB entries, local-stack rules (the new rules'
    /// tags must be known before frames carry them), the new `dr` realservers' MACs (with
    /// `dr_down`, the realservers whose checks say down), then the datapath's classifier.
    pub fn reload(
        &self,
        settings: &Settings,
        policy: &Policy,
        dr_down: &BTreeSet<String>,
    ) -> Result<Installed, Failure> {
        let guard = lock(&self.dp);
        let dp = guard.as_ref().ok_or_else(|| {
            Failure::Runtime(anyhow::anyhow!("the userspace datapath is stopped"))
        })?;
        let mac = dp.local_port().1;
        // first: the one step that can refuse the new settings, so a refusal changes nothing
        dp.set_static_fdb(&settings.bridge.static_fdb_entries())
            .map_err(|e| Failure::Runtime(e.into()))?;
        local_rules::install_blocking(settings, policy, mac).map_err(Failure::Runtime)?;
        let neighbours = learn_realservers(settings, policy)?;
        dp.set_dr_state(neighbours.clone(), dr_down.clone());
        dp.swap_policy(Arc::new(policy.clone()));
        Ok(Installed {
            rules: policy.rules.len(),
            created: false,
            mac,
            neighbours,
        })
    }

    /// The datapath's counters (ports, verdicts, FDB, frames each rule decided since the
    /// start by rule name; for a `dr` rule: the frames sent to its realservers); `None` once
    /// stopped.
    pub fn stats(&self) -> Option<crate::datapath::Stats> {
        lock(&self.dp).as_ref().map(|dp| dp.stats())
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

    /// A `dr` realserver changed health (or MAC): the datapath recomputes every `dr` rule's
    /// buckets from the same inputs the kernel datapath's bucket map is built from.
    fn set_dr(
        &self,
        _: &Settings,
        _: &Policy,
        _rule: &str,
        neighbours: &BTreeMap<IpAddr, [u8; 6]>,
        down: &BTreeSet<String>,
    ) -> anyhow::Result<()> {
        if let Some(dp) = lock(&self.dp).as_ref() {
            dp.set_dr_state(neighbours.clone(), down.clone());
        }
        Ok(())
    }
}
