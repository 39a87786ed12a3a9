//! The daemon's NFQUEUE side (`decide = "queue"` rules): one [`QueueEngine`] (its own OS
//! threads, never tokio) deciding with the existing [`PolicyDecider`] — dynamic allow/deny
//! lists (changed at run time over the control socket), target health (the health checker's
//! state) and a per-source new-flow rate limit (`[queue] rate`/`burst`).
//!
//! The decider is rebuilt on every reload (rule tags can change) and swapped in under a
//! lock the queue threads only read; the engine itself is restarted only when the queue
//! settings change.
//!
//! With `bridge.datapath = "userspace"` there is no NFQUEUE: the same swappable decider is
//! handed to the datapath as an [`InlineDecider`] (its forwarding threads call it for the
//! first frame of each new flow of a queue rule), and `status`/metrics read its counters.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::policy::{Decide, OnUnhealthy, Policy};
use crate::queue::{
    Decider, Fallback, HealthFlag, InlineDecider, ListsHandle, PacketInfo, PolicyDecider,
    PrefixSet, QueueConfig, QueueEngine, QueueStats, RateLimit, Verdict,
};
use crate::settings::Settings;

/// The decider the queue threads call: the current [`PolicyDecider`], swappable.
#[derive(Debug)]
struct Swap(RwLock<Arc<PolicyDecider>>);

impl Decider for Swap {
    fn decide(&self, pkt: &PacketInfo) -> Verdict {
        let d = match self.0.read() {
            Ok(g) => Arc::clone(&g),
            Err(p) => Arc::clone(&p.into_inner()),
        };
        d.decide(pkt)
    }
}

impl Swap {
    fn store(&self, d: PolicyDecider) {
        match self.0.write() {
            Ok(mut g) => *g = Arc::new(d),
            Err(p) => *p.into_inner() = Arc::new(d),
        }
    }
}

/// Who calls the decider.
enum Runner {
    /// Kernel datapath: NFQUEUE workers.
    Nfqueue {
        engine: QueueEngine,
        config: QueueConfig,
    },
    /// Userspace datapath: its forwarding threads, inline.
    Inline(Arc<InlineDecider>),
}

/// The running queue side.
pub struct Queue {
    runner: Runner,
    decider: Arc<Swap>,
    /// Health flags by rule name (the health checker's transitions set them).
    health: BTreeMap<String, HealthFlag>,
}

/// Which list a control command changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListKind {
    Allow,
    Deny,
}

fn queue_config(settings: &Settings) -> QueueConfig {
    QueueConfig {
        num: settings.queue.num,
        count: settings.queue.fanout,
        fail_open: settings.queue.fail_open,
        layout: ops_layout(settings),
        ..Default::default()
    }
}

/// The mark layout the compiled rules use (one place: `nft::compile::Target::layout`).
fn ops_layout(settings: &Settings) -> crate::queue::MarkLayout {
    crate::ops::target(settings, None, None).layout()
}

/// The decider for `policy`: one health policy per queue rule (tag), the rate limit if set.
fn build_decider(
    settings: &Settings,
    policy: &Policy,
    lists: &ListsHandle,
    up: &dyn Fn(&str) -> bool,
) -> (PolicyDecider, BTreeMap<String, HealthFlag>) {
    let mut d = PolicyDecider::new(ops_layout(settings), lists.clone());
    let mut flags = BTreeMap::new();
    for r in policy.rules.iter().filter(|r| r.decide == Decide::Queue) {
        let flag = HealthFlag::new(r.health.is_none() || up(&r.name));
        let fallback = match r.on_unhealthy {
            OnUnhealthy::Bypass => Fallback::Bypass,
            OnUnhealthy::Drop => Fallback::Drop,
        };
        d = d.with_rule(r.tag, flag.clone(), fallback);
        flags.insert(r.name.clone(), flag);
    }
    if settings.queue.rate > 0.0 {
        d = d.with_rate_limit(RateLimit {
            per_sec: settings.queue.rate,
            burst: settings.queue.burst,
            ..Default::default()
        });
    }
    (d, flags)
}

impl Queue {
    /// The userspace datapath's queue side: no NFQUEUE; the decider for `policy` wrapped as
    /// an [`InlineDecider`] for the datapath ([`Queue::inline_decider`]). Kept for the
    /// daemon's life ([`Queue::sync`] swaps its decider on reloads), so a reload that adds
    /// queue rules finds it in place.
    pub fn inline(
        settings: &Settings,
        policy: &Policy,
        lists: &ListsHandle,
        up: &dyn Fn(&str) -> bool,
    ) -> Queue {
        let (d, health) = build_decider(settings, policy, lists, up);
        let decider = Arc::new(Swap(RwLock::new(Arc::new(d))));
        let inline = Arc::new(InlineDecider::new(decider.clone(), ops_layout(settings)));
        Queue {
            runner: Runner::Inline(inline),
            decider,
            health,
        }
    }

    /// What the userspace datapath calls for new flows of queue rules (`None` on NFQUEUE).
    pub fn inline_decider(&self) -> Option<Arc<InlineDecider>> {
        match &self.runner {
            Runner::Inline(d) => Some(d.clone()),
            Runner::Nfqueue { .. } => None,
        }
    }

    /// Make the queue side match `policy`. Inline (userspace datapath): the decider is
    /// rebuilt and swapped in, always kept. NFQUEUE: `None` without queue rules (a running
    /// engine is stopped), else the engine running with a decider for this policy.
    /// Blocking (binds queues): call from a blocking thread.
    pub fn sync(
        current: Option<Queue>,
        settings: &Settings,
        policy: &Policy,
        lists: &ListsHandle,
        up: &dyn Fn(&str) -> bool,
    ) -> anyhow::Result<Option<Queue>> {
        let current = match current {
            Some(mut q) if matches!(q.runner, Runner::Inline(_)) => {
                let (d, health) = build_decider(settings, policy, lists, up);
                q.decider.store(d);
                q.health = health;
                return Ok(Some(q));
            }
            other => other,
        };
        if !policy.uses_queue() {
            if let Some(q) = current {
                q.stop();
                tracing::info!("no queue rules: NFQUEUE workers stopped");
            }
            return Ok(None);
        }
        let (d, health) = build_decider(settings, policy, lists, up);
        let config = queue_config(settings);
        match current {
            Some(mut q)
                if matches!(&q.runner, Runner::Nfqueue { engine, config: c }
                    if *c == config && engine.is_running()) =>
            {
                q.decider.store(d);
                q.health = health;
                Ok(Some(q))
            }
            other => {
                if let Some(q) = other {
                    q.stop();
                }
                let decider = Arc::new(Swap(RwLock::new(Arc::new(d))));
                let engine = QueueEngine::start(config.clone(), decider.clone())?;
                tracing::info!(queues = ?engine.queues(), "NFQUEUE workers started");
                Ok(Some(Queue {
                    runner: Runner::Nfqueue { engine, config },
                    decider,
                    health,
                }))
            }
        }
    }

    /// The health checker saw `rule`'s target go up or down.
    pub fn set_health(&self, rule: &str, up: bool) {
        if let Some(f) = self.health.get(rule) {
            f.set(up);
        }
    }

    /// Stop the NFQUEUE workers (inline: nothing runs of its own).
    pub fn stop(self) {
        if let Runner::Nfqueue { engine, .. } = self.runner {
            engine.stop();
        }
    }

    pub fn status(&self, lists: &ListsHandle) -> QueueStatus {
        let (s, queues, inline): (&QueueStats, Vec<u16>, bool) = match &self.runner {
            Runner::Nfqueue { engine, .. } => (engine.stats(), engine.queues().to_vec(), false),
            Runner::Inline(d) => (d.stats(), Vec::new(), true),
        };
        let t = s.totals();
        let l = lists.load();
        let us = |d: Option<std::time::Duration>| {
            d.map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        };
        QueueStatus {
            queues,
            inline,
            packets: t.packets,
            divert: t.divert,
            bypass: t.bypass,
            drop: t.drop,
            errors: t.parse_errors
                + t.mark_errors
                + t.decider_panics
                + t.recv_errors
                + t.verdict_errors,
            queue_drops: t.kernel_dropped + t.kernel_user_dropped,
            latency_p50_us: us(s.latency.p50()),
            latency_p99_us: us(s.latency.p99()),
            latency_count: s.latency.count(),
            latency_sum_seconds: s.latency.sum().as_secs_f64(),
            allow: l.allow.prefixes().iter().map(|p| p.to_string()).collect(),
            deny: l.deny.prefixes().iter().map(|p| p.to_string()).collect(),
        }
    }
}

/// Queue figures for `status` and metrics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueStatus {
    /// The NFQUEUE numbers bound (empty when `inline`).
    pub queues: Vec<u16>,
    /// Decided inline by the userspace datapath (no NFQUEUE; `packets` are first frames of
    /// new flows, `queue_drops` stays 0, latency is the decider's own time).
    #[serde(default)]
    pub inline: bool,
    /// Packets that reached the daemon (one per new flow of a queue rule).
    pub packets: u64,
    /// Flows decided, by verdict.
    pub divert: u64,
    pub bypass: u64,
    pub drop: u64,
    /// Packets answered bypass because of an error (parse, mark, decider, socket).
    pub errors: u64,
    /// Packets the kernel dropped or could not hand over (queue full, socket full).
    pub queue_drops: u64,
    /// Verdict latency quantiles (upper bound of the histogram bucket), microseconds.
    pub latency_p50_us: Option<u64>,
    pub latency_p99_us: Option<u64>,
    pub latency_count: u64,
    pub latency_sum_seconds: f64,
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

/// `brdivert allow|deny add|del|list PREFIX`: change a list (whole-value swap; the next
/// decision sees it). Lists live in the daemon's memory: a restart starts with empty lists.
pub fn change_list(
    lists: &ListsHandle,
    kind: ListKind,
    op: &str,
    prefix: Option<&str>,
) -> Result<Vec<String>, String> {
    let parse = || -> Result<IpNet, String> {
        let p = prefix.ok_or_else(|| format!("{op} needs a prefix"))?;
        p.parse::<IpNet>()
            .or_else(|_| p.parse::<std::net::IpAddr>().map(IpNet::from))
            .map(|n| n.trunc())
            .map_err(|_| format!("{p:?} is not an address or prefix (e.g. 10.0.0.0/8, fd00::1)"))
    };
    match op {
        "add" => {
            let p = parse()?;
            lists.update(|l| match kind {
                ListKind::Allow => l.allow.insert(p),
                ListKind::Deny => l.deny.insert(p),
            });
        }
        "del" => {
            let p = parse()?;
            lists.update(|l| {
                let set = match kind {
                    ListKind::Allow => &mut l.allow,
                    ListKind::Deny => &mut l.deny,
                };
                *set = PrefixSet::new(set.prefixes().into_iter().filter(|x| *x != p));
            });
        }
        "list" => {}
        other => {
            return Err(format!(
                "unknown list operation {other:?}: use add, del or list"
            ));
        }
    }
    let l = lists.load();
    let set = match kind {
        ListKind::Allow => &l.allow,
        ListKind::Deny => &l.deny,
    };
    Ok(set.prefixes().iter().map(|p| p.to_string()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_add_del_list() {
        let l = ListsHandle::default();
        assert_eq!(
            change_list(&l, ListKind::Deny, "add", Some("10.77.0.1")).unwrap(),
            vec!["10.77.0.1/32"]
        );
        change_list(&l, ListKind::Deny, "add", Some("10.1.2.3/8")).unwrap();
        assert!(l.load().deny.contains("10.9.9.9".parse().unwrap()));
        assert_eq!(
            change_list(&l, ListKind::Deny, "del", Some("10.0.0.0/8")).unwrap(),
            vec!["10.77.0.1/32"]
        );
        assert!(
            change_list(&l, ListKind::Allow, "list", None)
                .unwrap()
                .is_empty()
        );
        assert!(change_list(&l, ListKind::Allow, "add", Some("nonsense")).is_err());
        assert!(change_list(&l, ListKind::Allow, "add", None).is_err());
        assert!(change_list(&l, ListKind::Allow, "flip", None).is_err());
    }
}
