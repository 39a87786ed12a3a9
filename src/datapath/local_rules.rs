//! The local-stack rules of the userspace datapath.
//!
//! In the kernel datapath the bridge table marks a diverted packet with its rule's tag and
//! the `inet brdivert` table ([`compile::local_stack_table`]) does REDIRECT/TPROXY on that
//! mark. A frame written to a TAP cannot carry a mark, so the userspace datapath puts the tag
//! in the frame's source MAC ([`tag_mac`]) and this module adds, to the very same inet table,
//! a chain `tap_tag` on prerouting, before `mangle` and `dstnat`, that turns it back into the
//! mark: `iifname "<tap>" ether saddr <tag MAC> meta mark set … accept`, one rule per diverting
//! rule (`local` with `fwmark` sets the whole mark, as in the kernel datapath). Everything
//! after that is the kernel datapath's own rules, unchanged: one policy, one local-stack
//! ruleset, whichever datapath feeds it. Frames that reach the TAP without a tag MAC (ARP,
//! traffic to the bridge's own address) are never marked.

use std::path::Path;

use super::frame::tag_mac;
use crate::link;
use crate::nft::compile::{self, MANGLE_PRIORITY, Target};
use crate::nft::{
    BaseChain, Chain, ChainType, Hook, Match, Rule, Set, SetElem, SetKind, Stmt, Table,
};
use crate::nft::{Family, Ruleset, TABLE_NAME, netlink};
use crate::policy::{Action, Decide, Policy};
use crate::settings::Settings;

/// Priority of the tagging chain: after conntrack (-200), before mangle (-150, TPROXY).
pub const TAG_PRIORITY: i32 = MANGLE_PRIORITY - 10;

/// The inet table to apply in userspace mode: the kernel datapath's local-stack table plus
/// the `tap_tag` chain for local port `tap`.
pub fn userspace_local_table(policy: &Policy, target: &Target, tap: &str) -> Table {
    let mut t = compile::local_stack_table(policy, target);
    t.sets.push(Set {
        name: "local_port".into(),
        kind: SetKind::IfName,
        interval: false,
        elements: vec![SetElem::IfName(tap.to_string())],
        dynamic: None,
        keep: false,
    });
    let mut rules = Vec::new();
    for r in policy.rules.iter().filter(|r| r.action.diverts()) {
        let set = format!("{}_tag_mac", r.name);
        t.sets.push(Set {
            name: set.clone(),
            kind: SetKind::EtherAddr,
            interval: false,
            elements: vec![SetElem::Ether(tag_mac(r.tag))],
            dynamic: None,
            keep: false,
        });
        let l = target.layout();
        let mark = match r.action {
            Action::Local { fwmark: Some(m) } => Stmt::MarkSet(m),
            // decided inline by the datapath: the local-stack rules of a queue rule match the
            // tag and the divert verdict code, as after an NFQUEUE decision
            _ if r.decide == Decide::Queue => Stmt::MarkSetMasked {
                keep: !l.mask(),
                value: compile::divert_mark(&l, r),
            },
            _ => Stmt::MarkSetMasked {
                keep: !target.mark_mask,
                value: target.tag_mark(r.tag),
            },
        };
        rules.push(Rule {
            matches: vec![
                Match::IifName {
                    negate: false,
                    set: "local_port".into(),
                },
                Match::EtherSaddr { set },
            ],
            stmts: vec![mark, Stmt::Counter, Stmt::Accept],
            comment: Some(r.name.clone()),
        });
    }
    t.chains.insert(
        0,
        Chain {
            name: "tap_tag".into(),
            base: Some(BaseChain {
                kind: ChainType::Filter,
                hook: Hook::Prerouting,
                priority: TAG_PRIORITY,
            }),
            rules,
        },
    );
    t
}

/// The compile target in userspace mode: the TAP's MAC and the settings' mark bits (tag
/// and queue verdict bits, as `ops::target` makes them for the kernel datapath).
pub fn target(settings: &Settings, tap_mac: [u8; 6]) -> Target {
    crate::ops::target(settings, Some(tap_mac), None)
}

/// Everything userspace mode applies with nft: the one inet table.
pub fn ruleset(settings: &Settings, policy: &Policy, tap_mac: [u8; 6]) -> Ruleset {
    Ruleset {
        tables: vec![userspace_local_table(
            policy,
            &target(settings, tap_mac),
            &settings.bridge.name,
        )],
    }
}

/// Install (or replace, on reload) the local-stack side of userspace mode: TPROXY policy
/// routing when the policy uses TPROXY (kept on later reloads), then the inet table in one
/// transaction. Blocking (not from inside tokio); `state_dir` as `link` uses it.
pub fn install_at_blocking(
    settings: &Settings,
    policy: &Policy,
    tap_mac: [u8; 6],
    state_dir: &Path,
) -> anyhow::Result<()> {
    let t = target(settings, tap_mac);
    // As in the kernel datapath (`ops::install`): a policy without TPROXY keeps the routing,
    // since flows the datapath's flow table holds on an earlier TPROXY rule still need it;
    // `remove_at_blocking` takes it away.
    if policy.uses_tproxy() {
        link::setup_tproxy_routing_at_blocking(
            &settings.kernel,
            t.tproxy_mark(),
            t.mark_mask,
            state_dir,
        )?;
    }
    netlink::apply(&ruleset(settings, policy, tap_mac))?;
    Ok(())
}

/// [`install_at_blocking`] with the default state directory.
pub fn install_blocking(
    settings: &Settings,
    policy: &Policy,
    tap_mac: [u8; 6],
) -> anyhow::Result<()> {
    install_at_blocking(settings, policy, tap_mac, &link::state_dir())
}

/// Remove the inet table and the TPROXY routing (after the datapath stopped).
pub fn remove_at_blocking(settings: &Settings, state_dir: &Path) -> anyhow::Result<()> {
    let tables = netlink::delete_tables(&[Family::Inet], TABLE_NAME);
    link::teardown_tproxy_routing_at_blocking(&settings.kernel, state_dir)?;
    tables?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::render;

    #[test]
    fn tag_chain_marks_by_source_mac() {
        let p = crate::policy::test_policy(
            r#"
[[divert]]
name = "web"
proto = "tcp"
dport = [80]
action = "redirect"
port = 3129

[[divert]]
name = "vip"
dst = ["10.77.0.100"]
action = "local"
fwmark = 16

[[divert]]
name = "skip"
src = ["10.0.0.5"]
action = "pass"
"#,
        );
        let target = Target {
            bridge_mac: [2, 0, 0, 0, 0, 1],
            mark_mask: 0x00ff_0000,
            ..Default::default()
        };
        let t = userspace_local_table(&p, &target, "br0");
        assert_eq!(t.family, Family::Inet);
        let text = render::render(&crate::nft::Ruleset {
            tables: vec![t.clone()],
        });
        let web_tag = tag_mac(p.rules[0].tag);
        let web_mac = web_tag
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        assert!(text.contains("chain tap_tag"), "{text}");
        assert!(text.contains(&web_mac), "{text}");
        assert!(text.contains("meta mark set 0x00000010"), "{text}");
        assert!(text.contains("redirect to :3129"), "{text}");
        // the pass rule gets no tag rule
        assert_eq!(t.chains[0].rules.len(), 2);
        assert_eq!(
            t.chains[0].rules[0].stmts[0],
            Stmt::MarkSetMasked {
                keep: 0xff00_ffff,
                value: 0x0001_0000
            }
        );
    }

    /// A queue rule's frames reach the TAP only when the inline decision diverted them: the
    /// tag chain gives them the tag and the divert verdict code, which is what the
    /// local-stack rules of a queue rule match (`nft::compile::divert_mark`).
    #[test]
    fn queue_rules_get_the_divert_verdict_mark() {
        let p = crate::policy::test_policy(
            "[[divert]]\nname = \"web\"\nproto = \"tcp\"\ndport = [80]\n\
             action = \"redirect\"\nport = 3129\ndecide = \"queue\"\n",
        );
        let target = Target {
            mark_mask: 0x00ff_0000,
            ..Default::default()
        };
        let t = userspace_local_table(&p, &target, "br0");
        assert_eq!(
            t.chains[0].rules[0].stmts[0],
            Stmt::MarkSetMasked {
                keep: !0x03ff_0000,
                value: 0x0101_0000
            }
        );
        let dstnat = t.chains.iter().find(|c| c.name == "dstnat").unwrap();
        assert!(
            dstnat
                .rules
                .iter()
                .any(|r| r.matches.contains(&Match::Mark {
                    mask: 0x03ff_0000,
                    value: 0x0101_0000
                })),
            "{dstnat:?}"
        );
    }
}
