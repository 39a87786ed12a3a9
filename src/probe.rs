//! Kernel capability probing: what the running kernel's nf_tables offers, found by trying
//! each expression in a throw-away table (unique name, its own transaction, deleted
//! afterwards, in the current network namespace), plus the br_netfilter sysctls.
//!
//! A refused probe leaves nothing behind: the kernel rolls the whole transaction back.
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::nft::netlink;
use crate::nft::{
    BaseChain, Chain, ChainType, Family, Hook, IpFamily, L4, Match, QueueForm, Rule, Ruleset, Stmt,
    Table,
};

/// What the running kernel can do, as far as brdivert cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caps {
    /// `meta broute set 1` in a bridge prerouting chain (NFT_META_BRI_BROUTE,
    /// CONFIG_NFT_BRIDGE_META, kernel >= 5.19).
    pub meta_broute: bool,
    /// native nft `queue` (CONFIG_NFT_QUEUE)
    pub native_queue: bool,
    /// the xtables `NFQUEUE` target through nft compat in an inet table
    /// (CONFIG_NFT_COMPAT + CONFIG_NETFILTER_XT_TARGET_NFQUEUE)
    pub xt_nfqueue: bool,
    /// `tproxy ip|ip6 to …` (CONFIG_NFT_TPROXY)
    pub tproxy: bool,
    /// `socket transparent 1` (CONFIG_NFT_SOCKET)
    pub socket: bool,
    /// `net.bridge.bridge-nf-call-iptables`; None when br_netfilter is not loaded
    pub br_netfilter_ipv4: Option<bool>,
    /// `net.bridge.bridge-nf-call-ip6tables`; None when br_netfilter is not loaded
    pub br_netfilter_ipv6: Option<bool>,
}

impl Caps {
    /// The queue form brdivert uses: native when available, else xt compat, else none
    /// (`decide = "queue"` rules cannot be applied).
    pub fn queue_form(&self) -> Option<QueueForm> {
        if self.native_queue {
            Some(QueueForm::Native)
        } else if self.xt_nfqueue {
            Some(QueueForm::XtCompat)
        } else {
            None
        }
    }

    /// Whether diverting uses `meta broute set 1` instead of `meta pkttype set host` +
    /// `ether daddr set`.
    pub fn use_broute(&self) -> bool {
        self.meta_broute
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn sysctl_text(v: Option<bool>) -> &'static str {
    match v {
        None => "br_netfilter not loaded",
        Some(true) => "1",
        Some(false) => "0",
    }
}

impl fmt::Display for Caps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let divert = if self.meta_broute {
            "using meta broute set 1"
        } else {
            "using meta pkttype set host + ether daddr set"
        };
        writeln!(f, "meta broute: {} -> {divert}", yes_no(self.meta_broute))?;
        let queue = match self.queue_form() {
            Some(QueueForm::Native) => "using native queue",
            Some(QueueForm::XtCompat) => "using xt target NFQUEUE (nft compat)",
            None => "queue decisions unavailable",
        };
        writeln!(
            f,
            "native queue: {}, xt NFQUEUE: {} -> {queue}",
            yes_no(self.native_queue),
            yes_no(self.xt_nfqueue)
        )?;
        writeln!(
            f,
            "tproxy: {}{}",
            yes_no(self.tproxy),
            if self.tproxy {
                ""
            } else {
                " -> action = \"tproxy\" unavailable"
            }
        )?;
        writeln!(
            f,
            "socket: {}{}",
            yes_no(self.socket),
            if self.socket {
                ""
            } else {
                " -> tproxy return traffic matched by mark only"
            }
        )?;
        write!(
            f,
            "br_netfilter: bridge-nf-call-iptables {}, bridge-nf-call-ip6tables {}",
            sysctl_text(self.br_netfilter_ipv4),
            sysctl_text(self.br_netfilter_ipv6)
        )
    }
}

static PROBE_SEQ: AtomicU32 = AtomicU32::new(0);

/// Probes the kernel of the current network namespace. Needs CAP_NET_ADMIN; without it
/// every expression probe reports `false`.
pub fn probe() -> Caps {
    let prerouting = |priority| BaseChain {
        kind: ChainType::Filter,
        hook: Hook::Prerouting,
        priority,
    };
    let meta_broute = try_rule(
        Family::Bridge,
        prerouting(-200),
        Rule {
            matches: vec![],
            stmts: vec![Stmt::BrouteSet],
            comment: None,
        },
    );
    let queue = |form| Rule {
        matches: vec![],
        stmts: vec![Stmt::Queue {
            num: 0,
            fanout: 1,
            bypass: true,
            form,
        }],
        comment: None,
    };
    let native_queue = try_rule(Family::Inet, prerouting(-150), queue(QueueForm::Native));
    let xt_nfqueue = try_rule(Family::Inet, prerouting(-150), queue(QueueForm::XtCompat));
    let tproxy = try_rule(
        Family::Inet,
        prerouting(-150),
        Rule {
            matches: vec![Match::L4Proto(L4::Tcp)],
            stmts: vec![Stmt::Tproxy {
                family: IpFamily::V4,
                addr: None,
                port: 1,
            }],
            comment: None,
        },
    );
    let socket = try_rule(
        Family::Inet,
        prerouting(-150),
        Rule {
            matches: vec![Match::SocketTransparent],
            stmts: vec![Stmt::Accept],
            comment: None,
        },
    );
    Caps {
        meta_broute,
        native_queue,
        xt_nfqueue,
        tproxy,
        socket,
        br_netfilter_ipv4: read_bool_sysctl("/proc/sys/net/bridge/bridge-nf-call-iptables"),
        br_netfilter_ipv6: read_bool_sysctl("/proc/sys/net/bridge/bridge-nf-call-ip6tables"),
    }
}

/// Applies a table holding just `rule` in a base chain, then deletes it. True when the
/// kernel accepted it.
fn try_rule(family: Family, base: BaseChain, rule: Rule) -> bool {
    let n = PROBE_SEQ.fetch_add(1, Ordering::Relaxed);
    let name = format!("brdivert-probe-{}-{n}", std::process::id());
    let rs = Ruleset {
        tables: vec![Table {
            family,
            name: name.clone(),
            sets: vec![],
            chains: vec![Chain {
                name: "probe".into(),
                base: Some(base),
                rules: vec![rule],
            }],
        }],
    };
    match netlink::apply(&rs) {
        Ok(()) => {
            if let Err(e) = netlink::delete_tables(&[family], &name) {
                tracing::warn!("could not delete probe table {family:?} {name}: {e}");
            }
            true
        }
        Err(e) => {
            tracing::debug!("probe refused: {e}");
            false
        }
    }
}

fn read_bool_sysctl(path: &str) -> Option<bool> {
    let s = std::fs::read_to_string(path).ok()?;
    match s.trim() {
        "0" => Some(false),
        "" => None,
        _ => Some(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_says_which_form() {
        let c = Caps {
            meta_broute: false,
            native_queue: false,
            xt_nfqueue: true,
            tproxy: true,
            socket: true,
            br_netfilter_ipv4: None,
            br_netfilter_ipv6: Some(false),
        };
        let s = c.to_string();
        assert!(
            s.contains("meta broute: no -> using meta pkttype set host + ether daddr set"),
            "{s}"
        );
        assert!(
            s.contains("native queue: no, xt NFQUEUE: yes -> using xt target NFQUEUE"),
            "{s}"
        );
        assert!(
            s.contains("bridge-nf-call-iptables br_netfilter not loaded"),
            "{s}"
        );
        assert!(s.contains("bridge-nf-call-ip6tables 0"), "{s}");
        assert_eq!(c.queue_form(), Some(QueueForm::XtCompat));
        assert!(!c.use_broute());
    }
}
