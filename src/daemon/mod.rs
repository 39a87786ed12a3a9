//! `brdivert run`: the daemon. It installs the policy exactly like `brdivert apply` (one
//! shared code path, [`crate::ops::install`]), then serves on a small tokio runtime:
//!
//! - signals: SIGHUP reloads; SIGTERM/SIGINT stop (rules kept unless
//!   `[daemon] flush_on_exit = true`, see [`crate::settings::DaemonSettings`]);
//! - reloads from SIGHUP, `brdivert reload` (control socket) and changed files
//!   ([`watch`]); each is validated first and swapped in one netlink transaction;
//! - the control socket ([`control`]) for `status` and `reload`;
//! - Prometheus metrics ([`metrics`]);
//! - health checks ([`health`]) of diverting rules' targets;
//! - `sd_notify` READY / RELOADING / STOPPING / WATCHDOG ([`notify`]).
//!
//! Per-rule counters survive reloads: just before each swap the kernel's counters are read
//! ([`counters`]) and added to running totals kept here.

pub mod control;
pub mod counters;
pub mod health;
pub mod metrics;
pub mod notify;
pub mod queue;
pub mod userspace;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;

use crate::dr::{find_realserver, parse_check_key, realserver_checks};
use crate::ops::{self, Failure};
use crate::policy::{Family, Health, Policy};
use crate::settings::Settings;
use counters::RuleCounts;
use health::{Connector, HealthSink, TcpConnector};
use notify::Notifier;

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The outcome of one (re)load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadResult {
    /// "ok", "refused" (bad input, nothing changed) or "failed" (the system refused; the
    /// running rules stay, as the swap is one transaction).
    pub result: String,
    pub message: String,
    /// Unix time.
    pub at: f64,
    /// "start", "SIGHUP", "control" or "file".
    pub trigger: String,
}

impl ReloadResult {
    pub fn ok(&self) -> bool {
        self.result == "ok"
    }
}

/// Health of one rule's target, as status and metrics show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthInfo {
    pub rule: String,
    /// A `dr` realserver's check: the realserver (its address, else its MAC;
    /// [`crate::dr::realserver_id`]). `None` for a rule's own target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realserver: Option<String>,
    pub target: String,
    pub up: bool,
    /// Transitions to down and to up since the daemon started.
    pub to_down: u64,
    pub to_up: u64,
    /// Unix time of the last transition (or of the first check's start).
    pub since: f64,
}

/// What the kernel does when a rule's health changes. The daemon calls it on every
/// transition and, after each swap (which installs every rule diverting), again for each
/// rule whose target is down. [`NftFlip`] is the kernel datapath's (one `down`-set element
/// flip per transition); tests use their own.
pub trait HealthFlip: Send + Sync + 'static {
    fn set(&self, settings: &Settings, policy: &Policy, rule: &str, up: bool)
    -> anyhow::Result<()>;

    /// A `dr` rule's realservers changed health (or MAC): rewrite its buckets (the kernel's
    /// bucket map, or the userspace datapath's buckets).
    fn set_dr(
        &self,
        _settings: &Settings,
        _policy: &Policy,
        rule: &str,
        _neighbours: &BTreeMap<IpAddr, [u8; 6]>,
        _down: &BTreeSet<String>,
    ) -> anyhow::Result<()> {
        anyhow::bail!("dr rule {rule:?}: this datapath has no dr buckets")
    }
}

/// The kernel datapath's flip: one element of the bridge table's `down` set (the rule's
/// tag), added or removed in one small transaction. New flows of the rule then bypass or
/// drop per `on_unhealthy`; pinned flows keep their path.
pub struct NftFlip;

impl HealthFlip for NftFlip {
    fn set(
        &self,
        settings: &Settings,
        policy: &Policy,
        rule: &str,
        up: bool,
    ) -> anyhow::Result<()> {
        let key = ops::health_key(settings, policy, rule).map_err(|f| anyhow::anyhow!("{f}"))?;
        crate::nft::netlink::set_rule_health(key, up)?;
        Ok(())
    }

    fn set_dr(
        &self,
        settings: &Settings,
        policy: &Policy,
        rule: &str,
        neighbours: &BTreeMap<IpAddr, [u8; 6]>,
        down: &BTreeSet<String>,
    ) -> anyhow::Result<()> {
        ops::dr_flip(settings, policy, rule, neighbours, down).map_err(|f| anyhow::anyhow!("{f}"))
    }
}

/// Health-check keys of the `dr` realservers that are down now.
fn dr_down(st: &State) -> BTreeSet<String> {
    dr_down_of(&st.health)
}

fn dr_down_of(health: &BTreeMap<String, HealthInfo>) -> BTreeSet<String> {
    health
        .iter()
        .filter(|(k, h)| !h.up && parse_check_key(k).1.is_some())
        .map(|(k, _)| k.clone())
        .collect()
}

/// Mutable daemon state (behind a std mutex, held only briefly, never across an await).
pub struct State {
    pub settings: Settings,
    pub policy: Policy,
    /// Counter totals of the kernel rules that earlier swaps replaced.
    pub base: BTreeMap<String, RuleCounts>,
    pub last_reload: Option<ReloadResult>,
    pub reloads_ok: u64,
    pub reloads_refused: u64,
    pub reloads_failed: u64,
    pub last_success: Option<f64>,
    /// Health by check key: a rule's name, or `rule/<address or MAC>` for a realserver of a
    /// dr rule ([`crate::dr::dr_check_key`]).
    pub health: BTreeMap<String, HealthInfo>,
    /// MACs learned for dr realservers given by address (at each install, and again when one
    /// comes back up).
    pub neighbours: BTreeMap<IpAddr, [u8; 6]>,
    health_tasks: HashMap<String, (Health, JoinHandle<()>)>,
    /// The files as they were at the last (re)load, for the watcher.
    pub fingerprint: watch::Fingerprint,
}

/// Everything the daemon's tasks share.
pub struct Shared {
    pub config: PathBuf,
    pub notifier: Notifier,
    pub started: f64,
    pub started_mono: Instant,
    state: Mutex<State>,
    /// Serializes reloads (and status reads of the kernel counters against swaps).
    reload_lock: tokio::sync::Mutex<()>,
    connector: Arc<dyn Connector>,
    flip: Arc<dyn HealthFlip>,
    /// The userspace datapath, when `bridge.datapath = "userspace"` (else the kernel forwards).
    userspace: Option<Arc<userspace::Userspace>>,
    /// NFQUEUE workers, while the policy has `decide = "queue"` rules.
    queue: Mutex<Option<queue::Queue>>,
    /// The dynamic allow/deny lists of queue decisions (`brdivert allow|deny …`).
    pub lists: crate::queue::ListsHandle,
}

/// Make the NFQUEUE side match the installed policy (start, re-decide, stop); blocking
/// part on tokio's blocking pool.
async fn sync_queue(shared: &Arc<Shared>) -> Result<(), Failure> {
    let (settings, policy, up) = {
        let st = shared.state();
        let up: HashMap<String, bool> = st.health.iter().map(|(k, v)| (k.clone(), v.up)).collect();
        (st.settings.clone(), st.policy.clone(), up)
    };
    let sh = shared.clone();
    tokio::task::spawn_blocking(move || {
        let mut slot = sh.queue.lock().unwrap_or_else(|p| p.into_inner());
        let current = slot.take();
        let next = queue::Queue::sync(current, &settings, &policy, &sh.lists, &|r: &str| {
            up.get(r).copied().unwrap_or(true)
        });
        match next {
            Ok(q) => {
                *slot = q;
                Ok(())
            }
            Err(e) => Err(Failure::Runtime(e.context(
                "starting the NFQUEUE workers (new flows of queue rules are bridged undecided meanwhile)",
            ))),
        }
    })
    .await
    .map_err(anyhow::Error::from)?
}

/// Install a validated policy on the datapath the daemon runs: the kernel's (one
/// transaction, [`ops::install`]) or its own userspace datapath (swap + local-stack rules).
async fn install(
    userspace: Option<Arc<userspace::Userspace>>,
    settings: &Settings,
    policy: &Policy,
    dr_down: &BTreeSet<String>,
) -> Result<ops::Installed, Failure> {
    match userspace {
        None => ops::install_with(settings, policy, dr_down).await,
        Some(u) => {
            let (s, p, down) = (settings.clone(), policy.clone(), dr_down.clone());
            tokio::task::spawn_blocking(move || u.reload(&s, &p, &down))
                .await
                .map_err(anyhow::Error::from)?
        }
    }
}

/// What a reload may not change: the datapath the daemon started with.
fn check_reloadable(running: &Settings, new: &Settings) -> Result<(), Failure> {
    if running.bridge.datapath != new.bridge.datapath {
        return Err(Failure::Input(crate::diag::Refused(vec![
            crate::diag::Diagnostic::error(
                &new.path,
                crate::diag::Pos::NONE,
                "bridge.datapath changed; a reload cannot move the bridge between datapaths",
                "restart the daemon (systemctl restart brdivert) to switch datapaths",
            ),
        ])));
    }
    Ok(())
}

impl Shared {
    pub fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sink health checkers report to.
struct Sink(std::sync::Weak<Shared>);

impl HealthSink for Sink {
    fn initial(&self, rule: &str, target: SocketAddr, up: bool) {
        let Some(sh) = self.0.upgrade() else { return };
        let mut st = sh.state();
        let e = st.health.entry(rule.to_string()).or_insert(HealthInfo {
            rule: parse_check_key(rule).0.to_string(),
            realserver: parse_check_key(rule).1.map(str::to_string),
            target: target.to_string(),
            up,
            to_down: 0,
            to_up: 0,
            since: unix_now(),
        });
        // a restarted checker (changed parameters) starts from the state it had
        e.target = target.to_string();
        e.up = up;
    }

    fn transition(&self, rule: &str, target: SocketAddr, up: bool) {
        let Some(sh) = self.0.upgrade() else { return };
        if up {
            tracing::info!(rule, %target, "health: target is up again; new flows are diverted");
        } else {
            tracing::warn!(rule, %target, "health: target is down; new flows follow on_unhealthy");
        }
        let (settings, policy) = {
            let mut st = sh.state();
            if let Some(h) = st.health.get_mut(rule) {
                h.up = up;
                h.since = unix_now();
                if up {
                    h.to_up += 1;
                } else {
                    h.to_down += 1;
                }
            }
            (st.settings.clone(), st.policy.clone())
        };
        if let Some(q) = sh.queue.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            q.set_health(rule, up);
        }
        let flip = sh.flip.clone();
        if let (rule, Some(id)) = parse_check_key(rule) {
            let (rule, id) = (rule.to_string(), id.to_string());
            let sh = sh.clone();
            tokio::spawn(async move {
                // a realserver back up may have a new MAC (replaced box): learn it again
                let addr = policy
                    .rules
                    .iter()
                    .find(|r| r.name == rule)
                    .and_then(|r| find_realserver(r, &id))
                    .filter(|rs| rs.mac.is_none())
                    .and_then(|rs| rs.address);
                if let (true, Some(a)) = (up, addr) {
                    match crate::link::neigh::resolve(
                        &settings.bridge.name,
                        &[a],
                        ops::NEIGHBOUR_WAIT,
                    )
                    .await
                    {
                        Ok(found) => sh.state().neighbours.extend(found),
                        Err(e) => tracing::warn!(rule, "dr: re-learning {a}: {e}"),
                    }
                }
                let (neighbours, down) = {
                    let st = sh.state();
                    (st.neighbours.clone(), dr_down(&st))
                };
                let _ = tokio::task::spawn_blocking(move || {
                    if let Err(e) = flip.set_dr(&settings, &policy, &rule, &neighbours, &down) {
                        tracing::error!(rule, "dr health flip failed: {e:#}");
                    }
                })
                .await;
            });
            return;
        }
        let rule = rule.to_string();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = flip.set(&settings, &policy, &rule, up) {
                tracing::error!(rule, "health flip failed: {e:#}");
            }
        });
    }
}

/// (Re)start health checkers to match the policy: unchanged checks keep running (and their
/// state), changed ones restart, removed ones stop.
fn sync_health(shared: &Arc<Shared>, st: &mut State) {
    let wanted: HashMap<String, Health> = st
        .policy
        .rules
        .iter()
        .filter(|r| r.action.diverts())
        .filter_map(|r| r.health.clone().map(|h| (r.name.clone(), h)))
        .chain(st.policy.rules.iter().flat_map(|r| {
            // keyed by the realserver's identity: a reorder keeps its checker and state
            realserver_checks(r).map(|(k, h)| (k, h.clone()))
        }))
        .collect();
    st.health_tasks.retain(|name, (h, task)| {
        let keep = wanted.get(name) == Some(h);
        if !keep {
            task.abort();
        }
        keep
    });
    st.health.retain(|name, _| wanted.contains_key(name));
    for (name, h) in wanted {
        if st.health_tasks.contains_key(&name) {
            continue;
        }
        let sink: Arc<dyn HealthSink> = Arc::new(Sink(Arc::downgrade(shared)));
        let up = st.health.get(&name).is_none_or(|i| i.up);
        let task = tokio::spawn(health::run_checker(
            name.clone(),
            h.clone(),
            up,
            shared.connector.clone(),
            sink,
        ));
        st.health_tasks.insert(name, (h, task));
    }
}

/// Log a refusal line by line and keep it for status.
fn refused_message(r: &crate::diag::Refused) -> String {
    r.to_string()
}

/// Reload: validate, read counters, swap in one transaction, record the result.
/// The trigger of a re-install of the running settings and policy (no files read): the
/// lookups of pinned flows for every frame that an earlier policy needed have expired.
pub const PINS_EXPIRED: &str = "pin timeout";

/// Kernel datapath: after a reload that changed which frames the rules select, every frame
/// meets the pin lookup until the earlier policy's pins have expired (see `nft::pins`).
/// Then the running policy is installed again, which drops that lookup; without this it
/// would stay until the next reload.
async fn expire_pin_lookups(shared: Arc<Shared>) {
    const CHECK_EVERY: u64 = 600;
    loop {
        let (bridge, policy) = {
            let st = shared.state();
            (st.settings.bridge.name.clone(), st.policy.clone())
        };
        let expires = tokio::task::spawn_blocking(move || {
            crate::nft::pins::everywhere_expires(&policy, &crate::nft::pins::earlier_pins(&bridge))
        })
        .await
        .ok()
        .flatten();
        let now = unix_now() as u64;
        let wait = expires.map_or(CHECK_EVERY, |at| at.saturating_sub(now) + 1);
        tokio::time::sleep(std::time::Duration::from_secs(wait.min(CHECK_EVERY))).await;
        if expires.is_some_and(|at| unix_now() as u64 >= at) {
            let r = reload(&shared, PINS_EXPIRED).await;
            if r.result != "ok" {
                // keep the lookups (harmless) and try again later, not every second
                tokio::time::sleep(std::time::Duration::from_secs(CHECK_EVERY)).await;
            }
        }
    }
}

pub async fn reload(shared: &Arc<Shared>, trigger: &str) -> ReloadResult {
    let _guard = shared.reload_lock.lock().await;
    if let Err(e) = shared.notifier.reloading() {
        tracing::debug!("sd_notify RELOADING: {e}");
    }
    let path = shared.config.clone();
    let loaded = if trigger == PINS_EXPIRED {
        // the running settings and policy again, not whatever the files say now
        let st = shared.state();
        Ok((
            st.fingerprint.clone(),
            Ok((st.settings.clone(), st.policy.clone())),
        ))
    } else {
        tokio::task::spawn_blocking(move || {
            let fp = watch::fingerprint(&path);
            let r = ops::load(&path);
            (fp, r)
        })
        .await
    };
    let (fp, loaded) = match loaded {
        Ok(x) => x,
        Err(e) => (
            watch::Fingerprint::default(),
            Err(Failure::Runtime(anyhow::anyhow!("reload task: {e}"))),
        ),
    };
    let loaded = loaded.and_then(|(s, p)| {
        check_reloadable(&shared.state().settings, &s)?;
        Ok((s, p))
    });
    let result = match loaded {
        Err(Failure::Input(r)) => {
            let msg = refused_message(&r);
            for line in msg.lines() {
                tracing::error!(trigger, "reload refused, running rules kept: {line}");
            }
            let mut st = shared.state();
            st.reloads_refused += 1;
            st.fingerprint = fp;
            ReloadResult {
                result: "refused".into(),
                message: msg,
                at: unix_now(),
                trigger: trigger.into(),
            }
        }
        Err(Failure::Runtime(e)) => failed(shared, trigger, fp, e),
        Err(Failure::Refused(t)) => failed(shared, trigger, fp, anyhow::anyhow!("{t}")),
        Ok((settings, policy)) => {
            let counts = match tokio::task::spawn_blocking(counters::read).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::warn!(
                        "reading rule counters before the swap: {e}; this generation's counts are lost"
                    );
                    BTreeMap::new()
                }
                Err(e) => {
                    tracing::warn!("reading rule counters: {e}");
                    BTreeMap::new()
                }
            };
            // dr realservers down now stay out of the new bucket maps (same rule, same address
            // or MAC, wherever the new list puts them)
            let down = dr_down(&shared.state());
            match install(shared.userspace.clone(), &settings, &policy, &down).await {
                Err(Failure::Input(r)) => {
                    let mut st = shared.state();
                    st.reloads_refused += 1;
                    st.fingerprint = fp;
                    ReloadResult {
                        result: "refused".into(),
                        message: refused_message(&r),
                        at: unix_now(),
                        trigger: trigger.into(),
                    }
                }
                Err(Failure::Runtime(e)) => failed(shared, trigger, fp, e),
                Err(Failure::Refused(t)) => failed(shared, trigger, fp, anyhow::anyhow!("{t}")),
                Ok(info) => {
                    let states: Vec<(String, bool)>;
                    let policy_now = policy.clone();
                    let msg = format!(
                        "applied {} rules to bridge {}",
                        info.rules, settings.bridge.name
                    );
                    {
                        let mut st = shared.state();
                        for (k, v) in counts {
                            *st.base.entry(k).or_default() += v;
                        }
                        warn_unreloadable(&st.settings, &settings);
                        st.settings = settings.clone();
                        st.policy = policy;
                        st.neighbours = info.neighbours.clone();
                        st.reloads_ok += 1;
                        st.last_success = Some(unix_now());
                        st.fingerprint = fp;
                        sync_health(shared, &mut st);
                        // Every health-checked rule of the new policy, with its state (up
                        // until a check says otherwise).
                        states = st
                            .policy
                            .rules
                            .iter()
                            .filter(|r| r.health.is_some())
                            .map(|r| {
                                let up = st
                                    .health
                                    .values()
                                    .find(|h| h.rule == r.name)
                                    .is_none_or(|h| h.up);
                                (r.name.clone(), up)
                            })
                            .collect();
                    }
                    // The `down` set survives swaps but tags follow rule order, so a reorder
                    // moves them: set every health-checked rule's element explicitly.
                    let flip = shared.flip.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        for (rule, up) in states {
                            if let Err(e) = flip.set(&settings, &policy_now, &rule, up) {
                                tracing::error!(rule, "health flip after reload: {e:#}");
                            }
                        }
                    })
                    .await;
                    if let Err(e) = sync_queue(shared).await {
                        tracing::error!("{e}");
                    }
                    tracing::info!(trigger, "reload ok: {msg}");
                    ReloadResult {
                        result: "ok".into(),
                        message: msg,
                        at: unix_now(),
                        trigger: trigger.into(),
                    }
                }
            }
        }
    };
    shared.state().last_reload = Some(result.clone());
    if let Err(e) = shared.notifier.ready() {
        tracing::debug!("sd_notify READY: {e}");
    }
    let _ = shared.notifier.status(&format!(
        "last reload {} ({}): {}",
        result.result,
        result.trigger,
        result.message.lines().next().unwrap_or_default()
    ));
    result
}

fn failed(
    shared: &Arc<Shared>,
    trigger: &str,
    fp: watch::Fingerprint,
    e: anyhow::Error,
) -> ReloadResult {
    let msg = format!("{e:#}");
    tracing::error!(trigger, "reload failed, running rules kept: {msg}");
    let mut st = shared.state();
    st.reloads_failed += 1;
    st.fingerprint = fp;
    ReloadResult {
        result: "failed".into(),
        message: msg,
        at: unix_now(),
        trigger: trigger.into(),
    }
}

/// Settings a reload cannot change while running (they take effect at the next start).
fn warn_unreloadable(old: &Settings, new: &Settings) {
    for key in unreloadable_changes(old, new) {
        tracing::warn!("{key} changed: takes effect when the daemon restarts");
    }
}

/// The keys that differ between `old` and `new` and that only a restart applies.
fn unreloadable_changes(old: &Settings, new: &Settings) -> Vec<&'static str> {
    let (o, n) = (&old.bridge, &new.bridge);
    // the userspace datapath opens its ports and creates its TAP (name, addresses) at start
    let userspace = n.datapath == crate::settings::Datapath::Userspace;
    [
        ("control.socket", old.control != new.control),
        ("bridge.threads", o.threads != n.threads),
        ("bridge.busy_poll_us", o.busy_poll_us != n.busy_poll_us),
        ("bridge.ports", userspace && o.ports != n.ports),
        ("bridge.name", userspace && o.name != n.name),
        ("bridge.address", userspace && o.address != n.address),
        ("metrics.listen", old.metrics != new.metrics),
        (
            "daemon.watch",
            old.daemon.watch != new.daemon.watch
                || old.daemon.watch_interval_ms != new.daemon.watch_interval_ms,
        ),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}

/// Per rule: name, action, families and counters (base + the kernel's current counts).
pub fn rule_rows(st: &State, kernel: &BTreeMap<String, RuleCounts>) -> Vec<control::RuleStatus> {
    st.policy
        .rules
        .iter()
        .map(|r| {
            let mut c = st.base.get(&r.name).copied().unwrap_or_default();
            if let Some(k) = kernel.get(&r.name) {
                c += *k;
            }
            rule_row(r, c)
        })
        .collect()
}

/// The rule rows on the userspace datapath: what each rule took (per rule name, since the
/// daemon started) stands for the kernel's rule counters: frames its action took as
/// `diverted`, frames of flows decided while its target was down as `unhealthy`, frames of
/// flows its exemptions returned as `exempted`.
fn userspace_rule_rows(
    policy: &Policy,
    taken: &BTreeMap<String, RuleCounts>,
) -> Vec<control::RuleStatus> {
    policy
        .rules
        .iter()
        .map(|r| rule_row(r, taken.get(&r.name).copied().unwrap_or_default()))
        .collect()
}

fn rule_row(r: &crate::policy::DivertRule, counters: RuleCounts) -> control::RuleStatus {
    control::RuleStatus {
        name: r.name.clone(),
        action: r.action.keyword().into(),
        families: r
            .families()
            .iter()
            .map(|f| match f {
                Family::V4 => "ipv4".to_string(),
                Family::V6 => "ipv6".to_string(),
            })
            .collect(),
        counters,
    }
}

/// Per `dr` rule of `policy`: each realserver's share of the buckets now (computed from the
/// inputs the datapath's buckets are built from: the MACs learned, the health checks that
/// say down; [`crate::dr::bucket_shares`]), its MAC and health; `forwarded` is the userspace
/// datapath's frames per rule name (`None`: kernel datapath).
pub fn dr_rows(
    policy: &Policy,
    neighbours: &BTreeMap<IpAddr, [u8; 6]>,
    health: &BTreeMap<String, HealthInfo>,
    forwarded: Option<&BTreeMap<String, u64>>,
) -> Vec<control::DrStatus> {
    let down = dr_down_of(health);
    policy
        .rules
        .iter()
        .filter(|r| r.action == crate::policy::Action::Dr)
        .map(|r| {
            let shares = crate::dr::bucket_shares(r, neighbours, &down);
            let macs = crate::dr::realserver_macs(r, neighbours);
            control::DrStatus {
                rule: r.name.clone(),
                realservers: r
                    .realservers
                    .iter()
                    .zip(shares)
                    .zip(macs)
                    .map(|((rs, buckets), mac)| control::DrRealserverStatus {
                        realserver: crate::dr::realserver_id(rs),
                        mac: mac.as_ref().map(crate::policy::mac_text),
                        buckets,
                        up: health
                            .get(&crate::dr::dr_check_key(&r.name, rs))
                            .map(|h| h.up)
                            .or(rs.health.as_ref().map(|_| true)),
                    })
                    .collect(),
                dr_forwarded: forwarded.map(|f| f.get(&r.name).copied().unwrap_or(0)),
            }
        })
        .collect()
}

/// Current kernel counters, read with reloads held off (so a swap cannot happen between
/// reading them and adding the base).
pub async fn snapshot(shared: &Arc<Shared>) -> control::Status {
    let _guard = shared.reload_lock.lock().await;
    let (kernel, err) = match tokio::task::spawn_blocking(counters::read).await {
        Ok(Ok(c)) => (c, None),
        Ok(Err(e)) => (BTreeMap::new(), Some(e.to_string())),
        Err(e) => (BTreeMap::new(), Some(e.to_string())),
    };
    // the userspace datapath's counters: what each rule took (a dr rule's: frames sent to
    // realservers) stands in for the kernel's rule counters, which it has none of
    let userspace = shared.userspace.as_ref().and_then(|u| u.stats());
    let taken: Option<BTreeMap<String, RuleCounts>> = shared.userspace.as_ref().map(|_| {
        userspace
            .iter()
            .flat_map(|s| s.rules.iter().cloned())
            .collect()
    });
    let forwarded: Option<BTreeMap<String, u64>> = taken.as_ref().map(|t| {
        t.iter()
            .map(|(name, t)| (name.clone(), t.diverted.packets))
            .collect()
    });
    let st = shared.state();
    let mut pinned = st
        .base
        .get(counters::PINNED)
        .map(|c| c.diverted)
        .unwrap_or_default();
    if let Some(k) = kernel.get(counters::PINNED) {
        pinned += k.diverted;
    }
    control::Status {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        settings: st.settings.path.display().to_string(),
        bridge: st.settings.bridge.name.clone(),
        uptime_seconds: shared.started_mono.elapsed().as_secs_f64(),
        started: shared.started,
        rules: match &taken {
            Some(taken) => userspace_rule_rows(&st.policy, taken),
            None => rule_rows(&st, &kernel),
        },
        pinned,
        counters_error: err,
        health: st.health.values().cloned().collect(),
        dr: dr_rows(&st.policy, &st.neighbours, &st.health, forwarded.as_ref()),
        userspace,
        // (the userspace datapath's inline decider stays in place without queue rules)
        queue: shared
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|_| st.policy.uses_queue())
            .map(|q| q.status(&shared.lists)),
        last_reload: st.last_reload.clone(),
        reloads: control::ReloadCounts {
            ok: st.reloads_ok,
            refused: st.reloads_refused,
            failed: st.reloads_failed,
            last_success: st.last_success,
        },
    }
}

/// `brdivert run`.
pub fn run(config: &Path) -> Result<String, Failure> {
    // Validate before anything else: a bad file is exit 2 and changes nothing.
    let (settings, policy) = ops::load(config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("brdivert")
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)?;
    rt.block_on(serve(config, settings, policy))
}

async fn serve(config: &Path, settings: Settings, policy: Policy) -> Result<String, Failure> {
    // Handlers first: an early SIGHUP must not kill the daemon (its default action).
    let mut sighup = signal(SignalKind::hangup()).map_err(anyhow::Error::from)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(anyhow::Error::from)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(anyhow::Error::from)?;
    let notifier = Notifier::from_env();
    let fp = watch::fingerprint(config);
    // The control socket first: a daemon already serving it means this one must not touch
    // the kernel.
    let control_path = settings.control.socket.clone();
    let control_listener = control::bind(&control_path)?;
    let lists = crate::queue::ListsHandle::default();
    let started = async {
        let metrics_listener = metrics::bind(&settings.metrics.listen).await?;
        let (userspace, installed, inline) = match settings.bridge.datapath {
            crate::settings::Datapath::Kernel => {
                (None, ops::install(&settings, &policy).await?, None)
            }
            crate::settings::Datapath::Userspace => {
                // queue rules are decided inline: the decider exists before the first frame
                let q = queue::Queue::inline(&settings, &policy, &lists, &|_| true);
                let d = q.inline_decider();
                let (s, p) = (settings.clone(), policy.clone());
                let (u, i) =
                    tokio::task::spawn_blocking(move || userspace::Userspace::start(&s, &p, d))
                        .await
                        .map_err(anyhow::Error::from)??;
                (Some(u), i, Some(q))
            }
        };
        Ok::<_, Failure>((metrics_listener, userspace, installed, inline))
    }
    .await;
    let (metrics_listener, userspace, installed, inline) = match started {
        Ok(x) => x,
        Err(e) => {
            let _ = std::fs::remove_file(&control_path);
            return Err(e);
        }
    };
    let msg = format!(
        "applied {} rules to bridge {} ({})",
        installed.rules,
        settings.bridge.name,
        if installed.created {
            "created"
        } else {
            "existing"
        }
    );
    tracing::info!("{msg}");
    let now = unix_now();
    let shared = Arc::new(Shared {
        config: config.to_path_buf(),
        notifier,
        started: now,
        started_mono: Instant::now(),
        state: Mutex::new(State {
            settings: settings.clone(),
            policy,
            base: BTreeMap::new(),
            last_reload: Some(ReloadResult {
                result: "ok".into(),
                message: msg,
                at: now,
                trigger: "start".into(),
            }),
            reloads_ok: 0,
            reloads_refused: 0,
            reloads_failed: 0,
            last_success: Some(now),
            health: BTreeMap::new(),
            neighbours: installed.neighbours.clone(),
            health_tasks: HashMap::new(),
            fingerprint: fp,
        }),
        reload_lock: tokio::sync::Mutex::new(()),
        connector: Arc::new(TcpConnector),
        flip: match &userspace {
            Some(u) => u.clone() as Arc<dyn HealthFlip>,
            None => Arc::new(NftFlip),
        },
        userspace,
        queue: Mutex::new(inline),
        lists,
    });
    {
        let mut st = shared.state();
        sync_health(&shared, &mut st);
    }
    if let Err(e) = sync_queue(&shared).await {
        let _ = std::fs::remove_file(&control_path);
        return Err(e);
    }

    let mut tasks: Vec<JoinHandle<()>> = vec![
        tokio::spawn(control::serve(control_listener, shared.clone())),
        tokio::spawn(metrics::serve(metrics_listener, shared.clone())),
    ];
    if shared.userspace.is_none() {
        tasks.push(tokio::spawn(expire_pin_lookups(shared.clone())));
    }
    if settings.daemon.watch {
        tasks.push(tokio::spawn(watch::run(
            shared.clone(),
            std::time::Duration::from_millis(settings.daemon.watch_interval_ms.max(50)),
        )));
    }
    if let Some(every) = notify::watchdog_interval() {
        let sh = shared.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if let Err(e) = sh.notifier.watchdog() {
                    tracing::debug!("sd_notify WATCHDOG: {e}");
                }
            }
        }));
    }
    if let Err(e) = shared.notifier.ready() {
        tracing::warn!("sd_notify READY: {e}");
    }
    let _ = shared.notifier.status("running");
    tracing::info!(
        control = %settings.control.socket.display(),
        metrics = %settings.metrics.listen,
        "brdivert daemon ready"
    );

    let why = loop {
        tokio::select! {
            _ = sighup.recv() => {
                let sh = shared.clone();
                tokio::spawn(async move { reload(&sh, "SIGHUP").await; });
            }
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
        }
    };
    tracing::info!("{why}: stopping");
    let _ = shared.notifier.stopping();
    // let a reload in progress finish its transaction, then hold reloads off
    let _guard = shared.reload_lock.lock().await;
    for t in &tasks {
        t.abort();
    }
    let settings = {
        let mut st = shared.state();
        for (_, (_, t)) in st.health_tasks.drain() {
            t.abort();
        }
        st.settings.clone()
    };
    // unbind the queues; the rules' bypass lets new flows through undecided meanwhile
    let q = shared
        .queue
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(q) = q {
        tokio::task::spawn_blocking(move || q.stop())
            .await
            .map_err(anyhow::Error::from)?;
    }
    let _ = std::fs::remove_file(&control_path);
    if let Some(u) = shared.userspace.clone() {
        // Nothing forwards without the daemon in this mode: stop it all, leave no TAP behind.
        let s = settings.clone();
        tokio::task::spawn_blocking(move || u.stop(&s))
            .await
            .map_err(anyhow::Error::from)??;
        return Ok("stopped the userspace datapath".into());
    }
    if settings.daemon.flush_on_exit {
        ops::uninstall(&settings).await?;
        Ok("stopped; flushed brdivert's tables and links (daemon.flush_on_exit)".into())
    } else {
        tracing::info!(
            "kernel rules kept (the kernel keeps forwarding and diverting); `brdivert flush` removes them"
        );
        Ok(String::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(text: &str) -> Settings {
        crate::settings::load_str(text).unwrap_or_else(|e| panic!("{e}"))
    }

    /// What a reload only warns about: the userspace datapath's ports, TAP name and
    /// addresses (fixed at start), never its static FDB entries (replaced by the reload);
    /// on the kernel datapath a reload sets them up again (`link::setup`).
    #[test]
    fn unreloadable_changes_by_datapath() {
        let base = "[bridge]\nports = [\"a\", \"b\"]\naddress = [\"10.0.0.1/24\"]\n";
        for (datapath, fixed_at_start) in [("kernel", false), ("userspace", true)] {
            let old = settings(&format!("{base}datapath = \"{datapath}\"\n"));
            assert!(unreloadable_changes(&old, &old.clone()).is_empty());
            let mut new = old.clone();
            new.bridge.ports.push("c".into());
            new.bridge.name = "br9".into();
            new.bridge.address.clear();
            let want: Vec<&str> = if fixed_at_start {
                vec!["bridge.ports", "bridge.name", "bridge.address"]
            } else {
                vec![]
            };
            assert_eq!(unreloadable_changes(&old, &new), want, "{datapath}");
        }
        let old = settings(&format!("{base}datapath = \"userspace\"\n"));
        let mut new = old.clone();
        new.bridge.threads = Some(1);
        new.bridge.busy_poll_us = Some(0);
        new.bridge.static_fdb = vec![crate::settings::StaticFdbEntry {
            mac: "02:00:00:00:00:01".into(),
            port: "a".into(),
        }];
        assert_eq!(
            unreloadable_changes(&old, &new),
            vec!["bridge.threads", "bridge.busy_poll_us"]
        );
    }

    fn info(key: &str, up: bool) -> HealthInfo {
        HealthInfo {
            rule: parse_check_key(key).0.into(),
            realserver: parse_check_key(key).1.map(str::to_string),
            target: "192.0.2.1:80".into(),
            up,
            to_down: 0,
            to_up: 0,
            since: 0.0,
        }
    }

    /// `status`'s dr rows: the bucket shares follow the health state and the MACs learned,
    /// keyed by realserver (so a reordered list shows the same realserver down).
    #[test]
    fn dr_rows_show_bucket_shares_by_health_and_mac() {
        let rules = |order: [&str; 2]| {
            crate::policy::test_policy(&format!(
                "[[divert]]\nname = \"vip\"\nproto = \"tcp\"\ndport = 80\ndst = \"192.0.2.80\"\n\
                 action = \"dr\"\nrealservers = [{}, {}]\n",
                order[0], order[1]
            ))
        };
        let rs1 = "{ mac = \"02:00:00:00:00:31\", health = { connect = \"192.0.2.31:80\" } }";
        let rs2 = "{ address = \"192.0.2.32\", health = {} }";
        let p = rules([rs1, rs2]);
        let mac2 = [2, 0, 0, 0, 0, 0x32];
        let neighbours: BTreeMap<IpAddr, [u8; 6]> = [("192.0.2.32".parse().unwrap(), mac2)].into();
        let mut health = BTreeMap::new();
        for rs in &p.rules[0].realservers {
            let k = crate::dr::dr_check_key("vip", rs);
            health.insert(k.clone(), info(&k, true));
        }
        let forwarded: BTreeMap<String, u64> = [("vip".to_string(), 7)].into();
        let rows = dr_rows(&p, &neighbours, &health, Some(&forwarded));
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].dr_forwarded, Some(7));
        let shares: Vec<(String, u32, Option<bool>)> = rows[0]
            .realservers
            .iter()
            .map(|r| (r.realserver.clone(), r.buckets, r.up))
            .collect();
        assert_eq!(
            shares,
            vec![
                ("02:00:00:00:00:31".into(), 128, Some(true)),
                ("192.0.2.32".into(), 128, Some(true)),
            ]
        );
        assert_eq!(
            rows[0].realservers[1].mac.as_deref(),
            Some("02:00:00:00:00:32")
        );
        // rs2 down, and the list reordered: rs2 still the one without buckets
        health.insert("vip/192.0.2.32".into(), info("vip/192.0.2.32", false));
        let p = rules([rs2, rs1]);
        let rows = dr_rows(&p, &neighbours, &health, None);
        assert_eq!(rows[0].dr_forwarded, None);
        let r = &rows[0].realservers;
        assert_eq!(
            (r[0].realserver.as_str(), r[0].buckets, r[0].up),
            ("192.0.2.32", 0, Some(false))
        );
        assert_eq!((r[1].buckets, r[1].up), (256, Some(true)));
        // rs2's MAC unknown: no buckets, shown without a MAC
        let rows = dr_rows(&p, &BTreeMap::new(), &BTreeMap::new(), None);
        let r = &rows[0].realservers;
        assert_eq!((r[0].buckets, r[0].mac.as_deref()), (0, None));
        assert_eq!(r[1].buckets, 256);
    }
}
