//! The one-shot operations behind the CLI: check, render, apply, flush.
//!
//! Order matters for safety: settings and every rule file are validated before anything in
//! the kernel changes, so a refused file leaves the running rules in place.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use crate::diag::Refused;
use crate::link;
use crate::nft::compile::{self, QueueTarget, Target};
use crate::nft::{Family, QueueForm, Ruleset, TABLE_NAME, netlink, pins, render};
use crate::policy::{Action, Decide, Policy};
use crate::probe;
use crate::settings::{Datapath, Settings};

/// Why an operation failed, and so the exit code.
#[derive(Debug)]
pub enum Failure {
    /// Bad input (exit 2): nothing was changed.
    Input(Refused),
    /// The system refused or broke (exit 1).
    Runtime(anyhow::Error),
    /// Bad input found elsewhere (the daemon refused a reload), as text (exit 2).
    Refused(String),
}

impl Failure {
    pub fn exit_code(&self) -> i32 {
        match self {
            Failure::Input(_) | Failure::Refused(_) => 2,
            Failure::Runtime(_) => 1,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Input(r) => write!(f, "{r}"),
            Failure::Runtime(e) => write!(f, "error: {e:#}"),
            Failure::Refused(t) => write!(f, "{t}"),
        }
    }
}

impl From<Refused> for Failure {
    fn from(r: Refused) -> Self {
        Failure::Input(r)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Runtime(e)
    }
}

/// Settings and policy, validated together; warnings are printed to stderr.
pub fn load(settings_path: &std::path::Path) -> Result<(Settings, Policy), Failure> {
    let settings = Settings::load(settings_path)?;
    let policy = Policy::load(&settings)?;
    for w in policy
        .warnings
        .iter()
        .chain(&address_warnings(&settings, &policy))
    {
        eprintln!("{w}");
    }
    Ok((settings, policy))
}

/// REDIRECT answers from the bridge's own address of the packet's family: warn where a
/// redirect rule covers a family the bridge has no address of.
fn address_warnings(settings: &Settings, policy: &Policy) -> Vec<crate::diag::Diagnostic> {
    let has = |f: crate::policy::Family| {
        settings.bridge.address.iter().any(|a| match f {
            crate::policy::Family::V4 => a.addr().is_ipv4(),
            crate::policy::Family::V6 => a.addr().is_ipv6(),
        })
    };
    let mut out = Vec::new();
    for r in &policy.rules {
        if !matches!(r.action, Action::Redirect { .. }) {
            continue;
        }
        for f in r.families().into_iter().filter(|&f| !has(f)) {
            let fam = if f == crate::policy::Family::V4 {
                "IPv4"
            } else {
                "IPv6"
            };
            out.push(crate::diag::Diagnostic::warning(
                &r.origin.file,
                crate::diag::Pos { line: r.origin.line, column: 1 },
                format!("rule {:?} redirects {fam} but bridge.address has no {fam} address, so those flows cannot be answered", r.name),
                format!("add an {fam} address to bridge.address in {}, or limit the rule's dst/src to the other family", settings.path.display()),
            ));
        }
    }
    out
}

/// The compile target for this bridge: its MAC (when it exists), brdivert's mark bits and
/// the queue form the kernel takes (`None`: not probed / unavailable; rendered as native).
pub fn target(settings: &Settings, mac: Option<[u8; 6]>, form: Option<QueueForm>) -> Target {
    Target {
        bridge_mac: mac.unwrap_or([0; 6]),
        mark_mask: settings.kernel.mark_mask,
        queue: QueueTarget {
            num: settings.queue.num,
            fanout: settings.queue.fanout,
            form: form.unwrap_or(QueueForm::Native),
            verdict_mask: settings.queue.verdict_mask,
        },
        tproxy_replies: link::tproxy_routing_recorded(&settings.kernel),
        earlier_pins: pins::earlier_pins(&settings.bridge.name),
        bridge_addrs: settings.bridge.address.iter().map(|n| n.addr()).collect(),
        ..Default::default()
    }
}

/// The queue form for `policy` on this kernel: probed (in the current network namespace)
/// only when the policy has queue rules; an error when the kernel can queue in neither form
/// or br_netfilter is not loaded.
pub fn queue_form(settings: &Settings, policy: &Policy) -> Result<Option<QueueForm>, Failure> {
    if !policy.uses_queue() {
        return Ok(None);
    }
    queue_form_of(settings, &probe::probe()).map(Some)
}

fn queue_form_of(settings: &Settings, caps: &probe::Caps) -> Result<QueueForm, Failure> {
    let Some(form) = caps.queue_form() else {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "decide = \"queue\" rules need NFQUEUE in nftables: this kernel has neither native \
             `queue` (CONFIG_NFT_QUEUE) nor the xt NFQUEUE target through nft compat \
             (CONFIG_NFT_COMPAT, CONFIG_NETFILTER_XT_TARGET_NFQUEUE); load nft_queue or \
             xt_NFQUEUE + nft_compat, or remove decide = \"queue\" from the rules"
        )));
    };
    if caps.br_netfilter_ipv4.is_none() {
        return Err(Failure::Runtime(
            link::LinkError::NoBrNetfilter {
                bridge: settings.bridge.name.clone(),
            }
            .into(),
        ));
    }
    Ok(form)
}

/// `brdivert check`: validate, probe the kernel, print the plan.
pub fn check(settings_path: &std::path::Path) -> Result<String, Failure> {
    let (settings, policy) = load(settings_path)?;
    let caps = probe::probe();
    let mut out = String::new();
    let files = settings.rule_files()?;
    let _ = writeln!(out, "settings: {} ok", settings.path.display());
    for f in &files {
        let _ = writeln!(out, "rules: {} ok", f.display());
    }
    let _ = writeln!(
        out,
        "bridge {} ({} datapath), ports {}",
        settings.bridge.name,
        match settings.bridge.datapath {
            Datapath::Kernel => "kernel",
            Datapath::Userspace => "userspace",
        },
        settings.bridge.ports.join(", ")
    );
    if settings.bridge.datapath == Datapath::Userspace {
        let opts = crate::datapath::Options::from_settings(&settings);
        let _ = writeln!(
            out,
            "forwarding threads: {} for {} ports and the local port; busy poll {} us after two-way traffic",
            crate::datapath::forwarding_threads(opts.threads, settings.bridge.ports.len() + 1),
            settings.bridge.ports.len(),
            opts.spin.as_micros()
        );
    }
    let _ = writeln!(out, "kernel:\n{caps}");
    let form = if policy.uses_queue() {
        Some(queue_form_of(&settings, &caps)?)
    } else {
        None
    };
    let _ = writeln!(
        out,
        "plan ({} rules, first match wins):",
        policy.rules.len()
    );
    let t = target(&settings, None, form);
    for r in &policy.rules {
        let fams: Vec<&str> = r
            .families()
            .iter()
            .map(|f| match f {
                crate::policy::Family::V4 => "ipv4",
                crate::policy::Family::V6 => "ipv6",
            })
            .collect();
        let action = match r.action {
            Action::Redirect { port } => format!("redirect to local port {port}"),
            Action::Tproxy { addr, port } => {
                format!("tproxy to {}", compile::describe_tproxy(addr, port))
            }
            Action::Local { fwmark: Some(m) } => format!("deliver locally with fwmark {m:#x}"),
            Action::Local { fwmark: None } => "deliver locally".into(),
            Action::Dr => format!(
                "direct routing to {} realserver(s) by destination MAC",
                r.realservers.len()
            ),
            Action::Pass => "bridge untouched".into(),
            Action::Drop => "drop".into(),
        };
        let mark = if let Action::Local { fwmark: Some(_) } = r.action {
            String::new()
        } else if r.action.diverts() {
            format!(", mark {:#010x}/{:#010x}", t.tag_mark(r.tag), t.mark_mask)
        } else {
            String::new()
        };
        let decide = if r.decide == Decide::Queue {
            ", first packet of each new flow decided by the daemon (NFQUEUE)"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "  {} ({}): {action} [{}{mark}]{decide}",
            r.name,
            r.origin,
            fams.join("+")
        );
        for line in plan_details(r) {
            let _ = writeln!(out, "    {line}");
        }
    }
    if policy.uses_queue() {
        let q = &t.queue;
        let l = t.layout();
        let _ = writeln!(
            out,
            "queue: NFQUEUE {}{} ({}), bypass, fail_open {}; verdict bits {:#010x}, tag bits {:#010x}; \
             br_netfilter turned on for bridge {} only (nf_call_iptables/ip6tables)",
            q.num,
            if q.fanout > 1 {
                format!("-{}", u32::from(q.num) + u32::from(q.fanout) - 1)
            } else {
                String::new()
            },
            match q.form {
                QueueForm::Native => "native queue",
                QueueForm::XtCompat => "xt NFQUEUE through nft compat",
            },
            settings.queue.fail_open,
            l.verdict_mask(),
            l.tag_mask(),
            settings.bridge.name
        );
    }
    if policy.uses_tproxy() {
        let _ = writeln!(
            out,
            "policy routing: fwmark {:#x}/{:#x} lookup table {} (local default route)",
            t.tproxy_mark(),
            t.mark_mask,
            settings.kernel.route_table
        );
    }
    Ok(out)
}

/// What `check` lists under a rule: its health check and what happens while it is down, or
/// (a `dr` rule) each realserver: how its MAC is known, the buckets it owns while all are
/// up, and its health check.
pub fn plan_details(r: &crate::policy::DivertRule) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(h) = &r.health {
        let down = match r.on_unhealthy {
            crate::policy::OnUnhealthy::Bypass => "bridged to their destination",
            crate::policy::OnUnhealthy::Drop => "dropped",
        };
        out.push(format!(
            "health: {}; while down, new flows are {down}",
            describe_health(h)
        ));
    }
    let n = r.realservers.len();
    for (i, rs) in r.realservers.iter().enumerate() {
        // named by its address, else its MAC (as its health state is keyed)
        let mac = match (rs.address, rs.mac) {
            (Some(_), Some(m)) => format!(" (MAC {})", crate::policy::mac_text(&m)),
            (Some(_), None) => " (MAC learned from the neighbour table)".into(),
            (None, _) => String::new(),
        };
        // bucket b belongs to realserver b mod N while all are up (dr::dr_assignment)
        let owned = (0..crate::dr::DR_BUCKETS as usize)
            .filter(|b| b % n == i)
            .count();
        let health = match &rs.health {
            Some(h) => format!("health: {}", describe_health(h)),
            None => "no health check (takes new flows while its MAC is known)".into(),
        };
        out.push(format!(
            "realserver {}{mac}: {owned} of {} buckets while all are up; {health}",
            crate::dr::realserver_id(rs),
            crate::dr::DR_BUCKETS
        ));
    }
    out
}

/// `TCP connect 10.0.0.31:80 every 2s (timeout 1s), down after 3 failures, up after 2
/// successes`.
pub fn describe_health(h: &crate::policy::Health) -> String {
    format!(
        "TCP connect {} every {:?} (timeout {:?}), down after {} failure{}, up after {} success{}",
        h.connect,
        h.interval,
        h.timeout,
        h.fall,
        if h.fall == 1 { "" } else { "s" },
        h.rise,
        if h.rise == 1 { "" } else { "es" }
    )
}

/// `brdivert render`: the nft text `apply` would load.
pub fn render_text(settings_path: &std::path::Path) -> Result<String, Failure> {
    let (settings, policy) = load(settings_path)?;
    let mac = link::bridge_mac_blocking(&settings.bridge.name).ok();
    let mut out = String::new();
    if mac.is_none() {
        let _ = writeln!(
            out,
            "# bridge {} does not exist yet: apply uses its MAC where this shows 00:00:00:00:00:00",
            settings.bridge.name
        );
    }
    // render is for people: a kernel that cannot queue still shows the rules (native form)
    let form = queue_form(&settings, &policy).ok().flatten();
    // dr realservers given by address: what the neighbour table knows now (no probing)
    let mut t = target(&settings, mac, form);
    let wanted = dr_addresses(&policy);
    if !wanted.is_empty() {
        t.neighbours = block_on(async {
            link::neigh::resolve(&settings.bridge.name, &wanted, Duration::ZERO)
                .await
                .map_err(|e| Failure::Runtime(e.into()))
        })
        .unwrap_or_default();
        for a in wanted.iter().filter(|a| !t.neighbours.contains_key(a)) {
            let _ = writeln!(
                out,
                "# dr realserver {a}: no neighbour entry yet, so no buckets here; apply probes it first"
            );
        }
    }
    out.push_str(&render::render(&ruleset_with(&settings, &policy, &t)));
    Ok(out)
}

fn ruleset_with(settings: &Settings, policy: &Policy, t: &Target) -> Ruleset {
    let mac = Some(t.bridge_mac).filter(|m| *m != [0; 6]);
    match settings.bridge.datapath {
        Datapath::Kernel => compile::compile(policy, t),
        // What the daemon installs for its TAP local port (tag MACs -> marks); the TAP's
        // MAC is only known once it exists.
        Datapath::Userspace => {
            crate::datapath::local_rules::ruleset(settings, policy, mac.unwrap_or([0; 6]))
        }
    }
}

/// What [`install`] did.
#[derive(Debug, Clone)]
pub struct Installed {
    pub rules: usize,
    /// The bridge was created (not found).
    pub created: bool,
    pub mac: [u8; 6],
    /// MACs learned for `dr` realservers given by address.
    pub neighbours: BTreeMap<IpAddr, [u8; 6]>,
}

/// How long `install` waits for the neighbour table to learn `dr` realservers it probed.
pub const NEIGHBOUR_WAIT: Duration = Duration::from_secs(2);

/// The addresses of `dr` realservers whose MAC is not in the rule file.
pub fn dr_addresses(policy: &Policy) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = policy
        .rules
        .iter()
        .flat_map(|r| &r.realservers)
        .filter(|rs| rs.mac.is_none())
        .filter_map(|rs| rs.address)
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Warn about `dr` realservers (by address) the neighbour table could not resolve: they get
/// no buckets until a health check or reload learns them.
pub fn warn_unresolved(settings: &Settings, wanted: &[IpAddr], found: &BTreeMap<IpAddr, [u8; 6]>) {
    for a in wanted.iter().filter(|a| !found.contains_key(a)) {
        tracing::warn!(
            realserver = %a,
            "dr: no neighbour entry for realserver {a} on {} after probing; it gets no new flows until it resolves (check it is up on the segment and bridge.address covers its subnet, or give its mac)",
            settings.bridge.name
        );
    }
}

/// Refuse what the kernel-datapath install cannot do (before anything changes).
pub fn check_installable(settings: &Settings) -> Result<(), Refused> {
    if settings.bridge.datapath == Datapath::Userspace {
        return Err(Refused(vec![crate::diag::Diagnostic::error(
            &settings.path,
            crate::diag::Pos::NONE,
            "apply sets up the kernel datapath only: with bridge.datapath = \"userspace\" nothing would forward frames without the daemon",
            "run `brdivert run` (the daemon drives the userspace datapath), or set bridge.datapath = \"kernel\"",
        )]));
    }
    Ok(())
}

/// THE install path, shared by `brdivert apply` and the daemon (start and every reload):
/// validated settings + policy in, bridge and links set up, TPROXY routing made to match,
/// then every brdivert table replaced in one netlink transaction. Idempotent. The netlink
/// transaction is blocking and runs on tokio's blocking pool.
pub async fn install(settings: &Settings, policy: &Policy) -> Result<Installed, Failure> {
    install_with(settings, policy, &BTreeSet::new()).await
}

/// [`install`], with the `dr` realservers whose health checks say down (their keys, see
/// [`compile::dr_check_key`]: rule and realserver address or MAC) kept out of the bucket
/// maps from the first packet.
pub async fn install_with(
    settings: &Settings,
    policy: &Policy,
    dr_down: &BTreeSet<String>,
) -> Result<Installed, Failure> {
    check_installable(settings)?;
    let form = {
        let (s, p) = (settings.clone(), policy.clone());
        tokio::task::spawn_blocking(move || queue_form(&s, &p))
            .await
            .map_err(anyhow::Error::from)??
    };
    let info = link::setup(settings).await.map_err(anyhow::Error::from)?;
    // queue rules: br_netfilter on for this bridge only (off again, as it was, without them)
    link::set_bridge_netfilter(settings, policy.uses_queue())
        .await
        .map_err(anyhow::Error::from)?;
    let mut t = target(settings, Some(info.mac), form);
    let wanted = dr_addresses(policy);
    t.neighbours = link::neigh::resolve(&settings.bridge.name, &wanted, NEIGHBOUR_WAIT)
        .await
        .map_err(anyhow::Error::from)?;
    warn_unresolved(settings, &wanted, &t.neighbours);
    t.dr_down = dr_down.clone();
    let neighbours = t.neighbours.clone();
    // Routing before rules, so the first TPROXY'd packet already has its local route. A
    // policy without TPROXY keeps it: flows pinned to an earlier TPROXY rule still need it
    // (the tproxy mark is the whole mask, the same for every policy); `flush` removes it.
    if policy.uses_tproxy() {
        link::setup_tproxy_routing(&settings.kernel, t.tproxy_mark(), t.mark_mask)
            .await
            .map_err(anyhow::Error::from)?;
    }
    let compiling = std::time::Instant::now();
    let rs = ruleset_with(settings, policy, &t);
    tracing::debug!(
        "compiled in {:.1} ms",
        compiling.elapsed().as_secs_f64() * 1e3
    );
    tokio::task::spawn_blocking(move || netlink::apply(&rs))
        .await
        .map_err(anyhow::Error::from)?
        .map_err(anyhow::Error::from)?;
    // What this policy pins, once it is in force (a refused transaction leaves the running
    // policy, and the record, as they were): later policies keep the lookups its flows need
    // for the pins' lifetime.
    pins::record_applied(&settings.bridge.name, policy).map_err(anyhow::Error::from)?;
    Ok(Installed {
        rules: policy.rules.len(),
        created: info.created,
        mac: info.mac,
        neighbours,
    })
}

/// Run `fut` on a fresh current-thread runtime (the one-shot commands). Not from inside a
/// tokio runtime.
fn block_on<T>(fut: impl Future<Output = Result<T, Failure>>) -> Result<T, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)?
        .block_on(fut)
}

/// `brdivert apply`: set up the bridge and apply the rules once (kernel datapath).
pub fn apply(settings_path: &std::path::Path) -> Result<String, Failure> {
    let started = std::time::Instant::now();
    let (settings, policy) = load(settings_path)?;
    tracing::debug!(
        "settings and rule files loaded in {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    let info = block_on(install(&settings, &policy))?;
    tracing::debug!(
        "applied in {:.1} ms in all",
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(format!(
        "applied {} rules to bridge {} ({}; {} ports)",
        info.rules,
        settings.bridge.name,
        if info.created { "created" } else { "existing" },
        settings.bridge.ports.len()
    ))
}

/// Remove brdivert's tables and undo what [`install`] set up (links, routing). The daemon's
/// `flush_on_exit` uses this too.
pub async fn uninstall(settings: &Settings) -> Result<(), Failure> {
    // Undo the links even when the tables could not be removed; report the first failure.
    let tables = tokio::task::spawn_blocking(|| {
        netlink::delete_tables(&[Family::Bridge, Family::Inet], TABLE_NAME)
    })
    .await
    .map_err(anyhow::Error::from)?;
    let links = link::teardown(settings).await;
    tables.map_err(anyhow::Error::from)?;
    links.map_err(anyhow::Error::from)?;
    Ok(())
}

/// `brdivert flush`: remove brdivert's tables and undo what `apply` set up.
pub fn flush(settings_path: &std::path::Path) -> Result<String, Failure> {
    let settings = Settings::load(settings_path)?;
    block_on(uninstall(&settings))?;
    Ok(format!(
        "flushed brdivert's tables and links for bridge {}",
        settings.bridge.name
    ))
}

/// A `dr` realserver's health changed (or its MAC was learned again): rewrite the rule's
/// bucket map for the realservers now usable, in one transaction
/// ([`netlink::replace_map_elements`]). Pinned flows keep their realserver.
pub fn dr_flip(
    settings: &Settings,
    policy: &Policy,
    rule: &str,
    neighbours: &BTreeMap<IpAddr, [u8; 6]>,
    dr_down: &BTreeSet<String>,
) -> Result<(), Failure> {
    let r = policy
        .rules
        .iter()
        .find(|r| r.name == rule && r.action == Action::Dr)
        .ok_or_else(|| Failure::Runtime(anyhow::anyhow!("no dr rule {rule:?} in the policy")))?;
    let mut t = target(settings, None, None);
    t.neighbours = neighbours.clone();
    t.dr_down = dr_down.clone();
    netlink::replace_map_elements(&compile::dr_buckets(r, &t)).map_err(anyhow::Error::from)?;
    Ok(())
}

/// The `down`-set element of the health-checked rule `name` (its tag as a mark value), for
/// [`netlink::set_rule_health`].
pub fn health_key(settings: &Settings, policy: &Policy, name: &str) -> Result<u32, Failure> {
    let t = target(settings, None, None);
    compile::health_keys(policy, &t)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, k)| k)
        .ok_or_else(|| {
            Failure::Runtime(anyhow::anyhow!(
                "no rule {name:?} with a health check in the policy"
            ))
        })
}

/// Marks the health-checked rule `name` of the policy `settings_path` names up or down in
/// the kernel (one small transaction; see [`netlink::set_rule_health`]).
pub fn set_rule_health(
    settings_path: &std::path::Path,
    name: &str,
    up: bool,
) -> Result<(), Failure> {
    let (settings, policy) = load(settings_path)?;
    let key = health_key(&settings, &policy, name)?;
    netlink::set_rule_health(key, up).map_err(anyhow::Error::from)?;
    Ok(())
}
