//! Flow pinning: where the bridge table looks a frame up in the pin maps, and the record that
//! decides it.
//!
//! A diverted flow is pinned (its 5-tuple → mark in `flows4/6`; a `dr` flow's 5-tuple →
//! realserver MAC in `dr_flows4/6`), so that it keeps its path when a reload or a health
//! change would now decide it differently. Every lookup costs every frame that meets it, so
//! a frame meets one only where a pinned flow can be:
//! - **In each rule's chain, first.** A rule's chain is entered by exactly the frames its jump
//!   takes (ingress ports, source MACs, VLANs, protocol and destination ports: its
//!   [`DivertRule::scope`]). The lookup comes before the rule's exemptions, health and action,
//!   so a pinned flow keeps its path whatever those say now.
//! - **At the head of prerouting, for every frame**, only while an earlier policy's diverting
//!   rule had a scope that no rule of the current policy has: its flows may be pinned yet
//!   reach no rule chain now. That lasts until the pins' timeout has passed since that
//!   policy was replaced (a later `apply` or reload drops the lookup).
//!
//! The record (`pins-<bridge>.json` in the state dir, removed by `flush`) keeps the scopes
//! of the policy applied now and of earlier ones, with when they were last in force.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::link::LinkError;
use crate::link::state;
use crate::policy::{Action, DivertRule, Policy};

/// Which pin maps a flow of a rule goes into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PinMap {
    /// `flows4/6`: diverted flows (redirect, tproxy, local), 5-tuple → mark.
    Flows,
    /// `dr_flows4/6`: `dr` flows, 5-tuple → realserver MAC.
    Dr,
}

impl PinMap {
    /// The pin maps `r`'s flows go into, if it pins any.
    pub fn of(r: &DivertRule) -> Option<PinMap> {
        if r.action == Action::Dr {
            Some(PinMap::Dr)
        } else if r.action.diverts() {
            Some(PinMap::Flows)
        } else {
            None
        }
    }
}

/// A pinning rule's scope ([`DivertRule::scope`]) and the maps its flows go into.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PinScope {
    pub map: PinMap,
    pub scope: String,
}

/// The scopes of `policy`'s rules that pin flows.
pub fn pin_scopes(policy: &Policy) -> BTreeSet<PinScope> {
    policy
        .rules
        .iter()
        .filter_map(|r| {
            Some(PinScope {
                map: PinMap::of(r)?,
                scope: r.scope(),
            })
        })
        .collect()
}

/// What the record says about flows earlier policies may have left pinned on a bridge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EarlierPins {
    /// Scopes of the policy in force and of policies replaced less than the pins' timeout
    /// ago, with when their flows' pins may have expired (seconds since the epoch).
    pub scopes: BTreeMap<PinScope, u64>,
    /// The record could not be read (or is of an older brdivert): any flow may be pinned.
    pub unknown: bool,
}

/// Which lookups of one pin map the ruleset needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinLookups {
    /// At the head of every rule's chain.
    pub in_rule_chains: bool,
    /// At the head of prerouting, for every frame.
    pub everywhere: bool,
}

impl PinLookups {
    /// Whether the map is used at all (and so must exist).
    pub fn any(&self) -> bool {
        self.in_rule_chains || self.everywhere
    }
}

/// The lookups of the divert and the `dr` pin maps that `policy` needs, given what earlier
/// policies may have pinned.
pub fn lookups(policy: &Policy, earlier: &EarlierPins) -> [PinLookups; 2] {
    let uncovered: Vec<PinMap> = uncovered(policy, earlier).map(|(s, _)| s.map).collect();
    [PinMap::Flows, PinMap::Dr].map(|map| {
        let pins_now = policy.rules.iter().any(|r| PinMap::of(r) == Some(map));
        let earlier_here = earlier.scopes.keys().any(|s| s.map == map);
        PinLookups {
            in_rule_chains: pins_now || earlier_here || earlier.unknown,
            everywhere: earlier.unknown || uncovered.contains(&map),
        }
    })
}

/// Earlier scopes that no rule of `policy` has: their flows reach no rule chain. (Each
/// rule's scope is computed once: it digests the rule's prefixes, maybe 10,000 VIPs.)
fn uncovered<'a>(
    policy: &Policy,
    earlier: &'a EarlierPins,
) -> impl Iterator<Item = (&'a PinScope, u64)> + 'a {
    let now: BTreeSet<String> = if earlier.scopes.is_empty() {
        BTreeSet::new()
    } else {
        policy.rules.iter().map(|r| r.scope()).collect()
    };
    earlier
        .scopes
        .iter()
        .filter(move |(s, _)| !now.contains(&s.scope))
        .map(|(s, until)| (s, *until))
}

/// When the lookups for every frame that `policy` needs now may go (seconds since the
/// epoch): when the last uncovered earlier scope's pins have expired. `None` when there are
/// none, or when the record is unreadable (they stay until the next apply).
pub fn everywhere_expires(policy: &Policy, earlier: &EarlierPins) -> Option<u64> {
    if earlier.unknown {
        return None;
    }
    uncovered(policy, earlier).map(|(_, expires)| expires).max()
}

/// The record file's content.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct PinsRecord {
    /// Scopes of the policy applied now.
    #[serde(default)]
    current: BTreeSet<PinScope>,
    /// Scopes of earlier policies and when each was last in force.
    #[serde(default)]
    earlier: Vec<EarlierScope>,
    /// The record of brdivert before scopes (when a diverting policy was last applied).
    #[serde(default, skip_serializing)]
    diverted_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct EarlierScope {
    #[serde(flatten)]
    scope: PinScope,
    /// seconds since the Unix epoch
    until: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl PinsRecord {
    /// The record as of `now`: the current scopes moved to `earlier`, stamped `now`, and
    /// earlier scopes older than `timeout` dropped.
    fn aged(mut self, now: u64, timeout: Duration) -> PinsRecord {
        let current = std::mem::take(&mut self.current);
        self.earlier.retain(|e| {
            !current.contains(&e.scope) && now.saturating_sub(e.until) < timeout.as_secs()
        });
        self.earlier.extend(
            current
                .into_iter()
                .map(|scope| EarlierScope { scope, until: now }),
        );
        self
    }
}

/// What `dir`'s record for `bridge` says earlier policies may have pinned, as of now.
pub fn earlier_pins_at(dir: &Path, bridge: &str, timeout: Duration) -> EarlierPins {
    let now = unix_now();
    match state::load::<PinsRecord>(&state::pins_state_path(dir, bridge)) {
        Ok(None) => EarlierPins::default(),
        Ok(Some(r)) => {
            let legacy = r
                .diverted_at
                .is_some_and(|at| now.saturating_sub(at) < timeout.as_secs());
            let r = r.aged(now, timeout);
            EarlierPins {
                scopes: r
                    .earlier
                    .into_iter()
                    .map(|e| (e.scope, e.until.saturating_add(timeout.as_secs())))
                    .collect(),
                unknown: legacy,
            }
        }
        Err(e) => {
            tracing::warn!("{e}; keeping every pin lookup");
            EarlierPins {
                unknown: true,
                ..Default::default()
            }
        }
    }
}

/// Record in `dir` that `policy` is applied to `bridge` now.
pub fn record_applied_at(
    dir: &Path,
    bridge: &str,
    policy: &Policy,
    timeout: Duration,
) -> Result<(), LinkError> {
    let path = state::pins_state_path(dir, bridge);
    let old = state::load::<PinsRecord>(&path)
        .ok()
        .flatten()
        .unwrap_or_default();
    let mut r = old.aged(unix_now(), timeout);
    r.current = pin_scopes(policy);
    if r.current.is_empty() && r.earlier.is_empty() {
        return state::remove(&path);
    }
    state::save(&path, &r)
}

/// How long a pin outlives its flow's last packet ([`super::compile::PIN_TIMEOUT_S`]).
const PIN_TIMEOUT: Duration = Duration::from_secs(super::compile::PIN_TIMEOUT_S);

/// [`earlier_pins_at`] in brdivert's state dir, with the pins' timeout.
pub fn earlier_pins(bridge: &str) -> EarlierPins {
    earlier_pins_at(&state::state_dir(), bridge, PIN_TIMEOUT)
}

/// [`record_applied_at`] in brdivert's state dir, with the pins' timeout.
pub fn record_applied(bridge: &str, policy: &Policy) -> Result<(), LinkError> {
    record_applied_at(&state::state_dir(), bridge, policy, PIN_TIMEOUT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_policy;

    const WEB80: &str = r#"[[divert]]
name = "web"
proto = "tcp"
dport = 80
action = "redirect"
port = 3129
"#;

    const WEB80_EXEMPT: &str = r#"[[divert]]
name = "web"
proto = "tcp"
dport = 80
except_src = ["10.0.0.5"]
action = "redirect"
port = 3129
"#;

    const WEB81: &str = r#"[[divert]]
name = "web"
proto = "tcp"
dport = 81
action = "redirect"
port = 3129
"#;

    const PASS80: &str = r#"[[divert]]
name = "p80"
proto = "tcp"
dport = 80
action = "pass"
"#;

    const TIMEOUT: Duration = Duration::from_secs(3 * 3600);

    #[test]
    fn scope_is_what_the_jump_tests() {
        let a = test_policy(WEB80);
        let b = test_policy(WEB80_EXEMPT);
        let c = test_policy(WEB81);
        let d = test_policy(PASS80);
        // exemptions, action and name are in the chain, not the jump
        assert_eq!(a.rules[0].scope(), b.rules[0].scope());
        assert_eq!(a.rules[0].scope(), d.rules[0].scope());
        assert_ne!(a.rules[0].scope(), c.rules[0].scope());
        // the rule's addresses are in its scope (its chain returns other frames first)
        let vip = |dst: &str| test_policy(&format!("{WEB80}dst = \"{dst}\"\n")).rules[0].scope();
        assert_eq!(vip("10.0.0.1"), vip("10.0.0.1"));
        assert_ne!(vip("10.0.0.1"), vip("10.0.0.2"));
        assert_ne!(vip("10.0.0.0"), vip("10.0.0.0/31"));
        assert_ne!(vip("10.0.0.1"), a.rules[0].scope());
    }

    #[test]
    fn lookups_follow_the_record() {
        let web80 = test_policy(WEB80);
        let none = EarlierPins::default();
        let [l, dr] = lookups(&web80, &none);
        assert!(l.in_rule_chains && !l.everywhere, "{l:?}");
        assert!(!dr.any());
        // the same scope, now exempting or passing: still only in the rule chains
        let earlier = EarlierPins {
            scopes: pin_scopes(&web80).into_iter().map(|s| (s, 100)).collect(),
            unknown: false,
        };
        for text in [WEB80_EXEMPT, PASS80] {
            let [l, _] = lookups(&test_policy(text), &earlier);
            assert!(l.in_rule_chains && !l.everywhere, "{text}: {l:?}");
        }
        assert_eq!(everywhere_expires(&test_policy(PASS80), &earlier), None);
        // another port: port-80 flows reach no rule chain now, until their pins expire
        let [l, _] = lookups(&test_policy(WEB81), &earlier);
        assert!(l.everywhere, "{l:?}");
        assert_eq!(everywhere_expires(&test_policy(WEB81), &earlier), Some(100));
        // an unreadable record keeps every lookup
        let unknown = EarlierPins {
            unknown: true,
            ..Default::default()
        };
        assert!(lookups(&test_policy(PASS80), &unknown)[0].everywhere);
    }

    #[test]
    fn record_ages_scopes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let web80 = test_policy(WEB80);
        let pass = test_policy(PASS80);
        assert_eq!(earlier_pins_at(d, "br0", TIMEOUT), EarlierPins::default());
        record_applied_at(d, "br0", &web80, TIMEOUT).expect("record");
        let scopes = |e: EarlierPins| e.scopes.into_keys().collect::<BTreeSet<_>>();
        assert_eq!(
            scopes(earlier_pins_at(d, "br0", TIMEOUT)),
            pin_scopes(&web80)
        );
        // replaced by a policy that pins nothing: web80's scope stays for the timeout
        record_applied_at(d, "br0", &pass, TIMEOUT).expect("record");
        let e = earlier_pins_at(d, "br0", TIMEOUT);
        let expires = e.scopes.values().copied().max().expect("a scope");
        assert!(expires >= unix_now() + TIMEOUT.as_secs() - 5, "{e:?}");
        assert_eq!(scopes(e), pin_scopes(&web80));
        // ... and is gone after it (a zero timeout: already expired)
        assert!(earlier_pins_at(d, "br0", Duration::ZERO).scopes.is_empty());
        record_applied_at(d, "br0", &pass, Duration::ZERO).expect("record");
        assert!(!state::pins_state_path(d, "br0").exists());
        // a record of the older format counts as unknown while recent
        std::fs::write(
            state::pins_state_path(d, "br0"),
            format!("{{\"diverted_at\": {}}}", unix_now()),
        )
        .expect("write");
        assert!(earlier_pins_at(d, "br0", TIMEOUT).unknown);
    }
}
