//! Every validation error path, with its position.

use std::path::Path;

use super::*;
use crate::rules;

fn ctx() -> Context {
    Context {
        ports: Some(vec!["eth0".into(), "eth1".into(), "eth2".into()]),
        mark_mask: 0x00ff_0000,
    }
}

fn build(text: &str) -> Result<Policy, Refused> {
    let f = rules::parse(Path::new("r.toml"), text.into())?;
    Policy::build(&[f], &ctx())
}

/// The single error for `text`, as printed.
fn error(text: &str) -> String {
    let e = build(text).expect_err("should be refused");
    let errs: Vec<_> = e.0.iter().filter(|d| d.is_error()).collect();
    assert_eq!(errs.len(), 1, "expected one error, got: {e}");
    errs[0].to_string()
}

fn rule(extra: &str) -> String {
    format!(
        "[[divert]]\nname = \"web\"\nproto = \"tcp\"\ndport = 80\naction = \"redirect\"\nport = 3129\n{extra}"
    )
}

#[test]
fn minimal_redirect() {
    let p = build(&rule("")).unwrap();
    let r = &p.rules[0];
    assert_eq!(r.action, Action::Redirect { port: 3129 });
    assert_eq!(r.dport, vec![PortRange { lo: 80, hi: 80 }]);
    assert_eq!(r.tag, 1);
    assert_eq!(r.families(), vec![Family::V4, Family::V6]);
    assert_eq!(r.origin.line, 1);
    assert!(p.warnings.is_empty());
}

#[test]
fn full_rule_from_design() {
    let text = r#"
[[divert]]
name    = "web"
from    = ["eth1"]
proto   = "tcp"
dport   = [80, "8080-8090"]
dst     = ["0.0.0.0/0", "::/0"]
src     = ["10.0.0.0/8"]
except_src = ["10.0.0.5"]
except_dst = ["192.0.2.0/24"]
action  = "redirect"
port    = 3129
health  = { connect = "127.0.0.1:3129", interval = "2s", fall = 3, rise = 2 }
on_unhealthy = "bypass"
"#;
    let p = build(text).unwrap();
    let r = &p.rules[0];
    assert_eq!(r.from, vec!["eth1"]);
    assert_eq!(
        r.dport,
        vec![
            PortRange { lo: 80, hi: 80 },
            PortRange { lo: 8080, hi: 8090 }
        ]
    );
    // src lists only IPv4, so the rule is IPv4 only
    assert_eq!(r.families(), vec![Family::V4]);
    assert!(
        r.dst.restricts(Family::V4).is_none(),
        "0.0.0.0/0 is no restriction"
    );
    assert_eq!(r.except_src.v4, vec!["10.0.0.5/32".parse().unwrap()]);
    let h = r.health.as_ref().unwrap();
    assert_eq!(h.connect, "127.0.0.1:3129".parse().unwrap());
    assert_eq!(h.interval, Duration::from_secs(2));
    assert_eq!((h.fall, h.rise), (3, 2));
}

#[test]
fn prefixes_merge() {
    let p = build(&rule(
        "dst = [\"10.0.0.0/8\", \"10.1.0.0/16\", \"10.0.0.1\", \"2001:db8::/32\"]\n",
    ))
    .unwrap();
    let AddrMatch::Only(d) = &p.rules[0].dst else {
        panic!()
    };
    assert_eq!(d.v4, vec!["10.0.0.0/8".parse().unwrap()]);
    assert_eq!(d.v6, vec!["2001:db8::/32".parse().unwrap()]);
}

#[test]
fn ports_merge() {
    let m = merge_ports(vec![
        PortRange { lo: 90, hi: 95 },
        PortRange { lo: 80, hi: 80 },
        PortRange { lo: 81, hi: 85 },
        PortRange { lo: 94, hi: 100 },
    ]);
    assert_eq!(
        m,
        vec![PortRange { lo: 80, hi: 85 }, PortRange { lo: 90, hi: 100 }]
    );
}

#[test]
fn bad_prefix() {
    let e = error(&rule("dst = [\"10.0.0.0/33\"]\n"));
    assert!(e.starts_with("r.toml:7:8: error: dst:"), "{e}");
}

#[test]
fn host_bits_set() {
    let e = error(&rule("src = [\"10.0.0.1/8\"]\n"));
    assert!(
        e.contains("r.toml:7:8") && e.contains("host bits") && e.contains("10.0.0.0/8"),
        "{e}"
    );
}

#[test]
fn port_out_of_range() {
    let e = error(
        "[[divert]]\nname = \"a\"\nproto = \"tcp\"\ndport = [80, 70000]\naction = \"pass\"\n",
    );
    assert!(
        e.starts_with("r.toml:4:14: error: port 70000 is out of range"),
        "{e}"
    );
    let e = error("[[divert]]\nname = \"a\"\nproto = \"tcp\"\ndport = 0\naction = \"pass\"\n");
    assert!(e.starts_with("r.toml:4:9:"), "{e}");
}

#[test]
fn backwards_range() {
    let e =
        error("[[divert]]\nname = \"a\"\nproto = \"tcp\"\ndport = \"90-80\"\naction = \"pass\"\n");
    assert!(e.contains("r.toml:4:9") && e.contains("backwards"), "{e}");
}

#[test]
fn target_port_out_of_range() {
    let e = error(
        "[[divert]]\nname = \"a\"\nproto = \"tcp\"\ndport = 80\naction = \"redirect\"\nport = 65536\n",
    );
    assert!(e.starts_with("r.toml:6:8: error: port 65536"), "{e}");
}

#[test]
fn empty_name() {
    let e = error("[[divert]]\nname = \"\"\nproto = \"tcp\"\naction = \"pass\"\n");
    assert!(e.starts_with("r.toml:2:8: error: rule name \"\""), "{e}");
}

#[test]
fn duplicate_name() {
    let text = format!(
        "{}{}",
        rule(""),
        rule("").replace("dport = 80", "dport = 81")
    );
    let e = error(&text);
    assert!(
        e.starts_with("r.toml:8:8: error: rule name \"web\" is already used at r.toml:1"),
        "{e}"
    );
}

#[test]
fn port_missing_for_redirect_and_tproxy() {
    for act in ["redirect", "tproxy"] {
        let e = error(&format!(
            "[[divert]]\nname = \"a\"\nproto = \"tcp\"\naction = \"{act}\"\n"
        ));
        assert!(
            e.starts_with("r.toml:4:10:") && e.contains("needs port"),
            "{e}"
        );
    }
}

#[test]
fn redirect_needs_proto() {
    let e =
        error("[[divert]]\nname = \"a\"\ndst = \"10.0.0.1\"\naction = \"redirect\"\nport = 1\n");
    assert!(
        e.starts_with("r.toml:4:10:") && e.contains("needs proto"),
        "{e}"
    );
}

#[test]
fn dport_needs_proto() {
    let e = error("[[divert]]\nname = \"a\"\ndport = 80\ndst = \"10.0.0.1\"\naction = \"pass\"\n");
    assert!(e.starts_with("r.toml:3:9: error: dport needs proto"), "{e}");
}

#[test]
fn tproxy_family_mismatch() {
    let e = error(
        "[[divert]]\nname = \"t\"\nproto = \"tcp\"\ndst = [\"0.0.0.0/0\", \"::/0\"]\naction = \"tproxy\"\nport = 3130\naddress = \"127.0.0.1\"\n",
    );
    assert!(
        e.starts_with("r.toml:7:11:") && e.contains("IPv4 but dst lists IPv6"),
        "{e}"
    );
}

#[test]
fn tproxy_address_sets_family() {
    let p = build("[[divert]]\nname = \"t\"\nproto = \"tcp\"\naction = \"tproxy\"\nport = 3130\naddress = \"::1\"\n").unwrap();
    assert_eq!(p.rules[0].families(), vec![Family::V6]);
    assert!(p.uses_tproxy());
}

#[test]
fn fwmark_without_local() {
    let e = error(&rule("fwmark = 16\n"));
    assert!(
        e.starts_with("r.toml:7:10:") && e.contains("fwmark only applies"),
        "{e}"
    );
}

#[test]
fn fwmark_in_our_bits() {
    let e = error(
        "[[divert]]\nname = \"v\"\ndst = \"10.0.0.100\"\naction = \"local\"\nfwmark = 0x10000\n",
    );
    assert!(
        e.starts_with("r.toml:5:10:") && e.contains("mark_mask"),
        "{e}"
    );
}

#[test]
fn local_with_fwmark() {
    let p =
        build("[[divert]]\nname = \"v\"\ndst = \"10.0.0.100\"\naction = \"local\"\nfwmark = 16\n")
            .unwrap();
    assert_eq!(p.rules[0].action, Action::Local { fwmark: Some(16) });
    assert_eq!(p.rules[0].families(), vec![Family::V4]);
}

#[test]
fn unknown_action_proto_decide_on_unhealthy() {
    let e = error("[[divert]]\nname = \"a\"\nproto = \"tcp\"\naction = \"divert\"\n");
    assert!(
        e.starts_with("r.toml:4:10: error: action \"divert\""),
        "{e}"
    );
    let e = error("[[divert]]\nname = \"a\"\nproto = \"sctp\"\naction = \"pass\"\n");
    assert!(e.starts_with("r.toml:3:9: error: proto \"sctp\""), "{e}");
    let e = error(&rule("decide = \"maybe\"\n"));
    assert!(e.starts_with("r.toml:7:10: error: decide \"maybe\""), "{e}");
    let e = error(&rule(
        "health = { connect = \"127.0.0.1:1\" }\non_unhealthy = \"panic\"\n",
    ));
    assert!(
        e.starts_with("r.toml:8:16: error: on_unhealthy \"panic\""),
        "{e}"
    );
}

#[test]
fn on_unhealthy_needs_health() {
    let e = error(&rule("on_unhealthy = \"drop\"\n"));
    assert!(
        e.starts_with("r.toml:7:16:") && e.contains("without a health check"),
        "{e}"
    );
}

#[test]
fn health_errors() {
    let e = error(&rule("health = { connect = \"localhost\" }\n"));
    assert!(
        e.starts_with("r.toml:7:22:") && e.contains("ADDR:PORT"),
        "{e}"
    );
    let e = error(&rule(
        "health = { connect = \"127.0.0.1:1\", interval = \"soon\" }\n",
    ));
    assert!(
        e.starts_with("r.toml:7:48:") && e.contains("interval"),
        "{e}"
    );
    let e = error(&rule("health = { connect = \"127.0.0.1:1\", fall = 0 }\n"));
    assert!(e.starts_with("r.toml:7:44:") && e.contains("fall"), "{e}");
    let e = error(&rule("health = { connect = \"127.0.0.1:1\", bogus = 1 }\n"));
    assert!(e.contains("r.toml:7:") && e.contains("bogus"), "{e}");
}

#[test]
fn health_on_pass_refused() {
    let e = error(
        "[[divert]]\nname = \"a\"\nproto = \"tcp\"\naction = \"pass\"\nhealth = { connect = \"127.0.0.1:1\" }\n",
    );
    assert!(e.starts_with("r.toml:5:10:"), "{e}");
}

#[test]
fn queue_on_drop_refused() {
    let e =
        error("[[divert]]\nname = \"a\"\nproto = \"tcp\"\naction = \"drop\"\ndecide = \"queue\"\n");
    assert!(e.starts_with("r.toml:5:10:"), "{e}");
}

#[test]
fn port_and_address_on_wrong_action() {
    let e = error("[[divert]]\nname = \"a\"\nproto = \"tcp\"\naction = \"pass\"\nport = 1\n");
    assert!(
        e.starts_with("r.toml:5:8:") && e.contains("port only applies"),
        "{e}"
    );
    let e = error(&rule("address = \"127.0.0.1\"\n"));
    assert!(
        e.starts_with("r.toml:7:11:") && e.contains("address only applies"),
        "{e}"
    );
    let e = error(
        "[[divert]]\nname = \"a\"\nproto = \"tcp\"\naction = \"tproxy\"\nport = 1\naddress = \"nowhere\"\n",
    );
    assert!(
        e.starts_with("r.toml:6:11:") && e.contains("not an IP"),
        "{e}"
    );
}

#[test]
fn from_must_be_a_bridge_port() {
    let e = error(&rule("from = [\"eth1\", \"wlan0\"]\n"));
    assert!(
        e.starts_with("r.toml:7:17: error: \"wlan0\" is not a port of the bridge"),
        "{e}"
    );
    let e = error(&rule("from = [\"a/b\"]\n"));
    assert!(
        e.starts_with("r.toml:7:9:") && e.contains("interface name"),
        "{e}"
    );
    let e = error(&rule("from = []\n"));
    assert!(e.starts_with("r.toml:7:8:") && e.contains("empty"), "{e}");
}

#[test]
fn bad_mac() {
    let e = error(&rule(
        "src_mac = [\"02:00:00:00:00:01\", \"02:00:00:00:00\"]\n",
    ));
    assert!(e.starts_with("r.toml:7:33:") && e.contains("MAC"), "{e}");
    let p = build(&rule("src_mac = \"02-00-00-00-00-0A\"\n")).unwrap();
    assert_eq!(p.rules[0].src_mac, vec![[2, 0, 0, 0, 0, 10]]);
}

#[test]
fn arp_shield_only_on_local() {
    let e = error(&rule("arp_shield = true\n"));
    assert!(e.starts_with("r.toml:7:14:"), "{e}");
}

#[test]
fn empty_lists_refused() {
    let e = error(&rule("dst = []\n"));
    assert!(e.starts_with("r.toml:7:7:") && e.contains("empty"), "{e}");
    let e = error("[[divert]]\nname = \"a\"\nproto = \"tcp\"\ndport = []\naction = \"pass\"\n");
    assert!(e.starts_with("r.toml:4:9:") && e.contains("empty"), "{e}");
}

#[test]
fn families_must_meet() {
    let e = error(&rule("src = \"10.0.0.0/8\"\ndst = \"2001:db8::/32\"\n"));
    assert!(
        e.starts_with("r.toml:1:1:") && e.contains("never match"),
        "{e}"
    );
}

#[test]
fn match_everything_refused() {
    let e = error("[[divert]]\nname = \"a\"\naction = \"drop\"\n");
    assert!(
        e.starts_with("r.toml:1:1:") && e.contains("every IP packet"),
        "{e}"
    );
}

#[test]
fn shadowed_rule_warns() {
    let text = format!(
        "{}{}",
        rule(""),
        rule("from = \"eth1\"\n").replace("name = \"web\"", "name = \"web2\"")
    );
    let p = build(&text).unwrap();
    assert_eq!(p.warnings.len(), 1);
    let w = p.warnings[0].to_string();
    assert!(
        w.starts_with("r.toml:7:1: warning: rule \"web2\" never matches: rule \"web\" (r.toml:1)"),
        "{w}"
    );
    // an exemption in the earlier rule lets traffic through: no warning
    let text = format!(
        "{}{}",
        rule("except_src = \"10.0.0.5\"\n"),
        rule("").replace("name = \"web\"", "name = \"web2\"")
    );
    assert!(build(&text).unwrap().warnings.is_empty());
}

#[test]
fn tproxy_families_do_not_shadow() {
    let r = |name: &str, addr: &str| {
        format!(
            "[[divert]]\nname = \"{name}\"\nproto = \"tcp\"\ndport = 80\naction = \"tproxy\"\nport = 3130\naddress = \"{addr}\"\n"
        )
    };
    let p = build(&format!("{}{}", r("t4", "127.0.0.1"), r("t6", "::1"))).unwrap();
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}

#[test]
fn empty_src_mac_refused() {
    let e = error(&rule("src_mac = []\n"));
    assert!(e.starts_with("r.toml:7:11:") && e.contains("empty"), "{e}");
}

#[test]
fn tags_only_for_diverting_rules() {
    let text = "[[divert]]\nname = \"p\"\nproto = \"tcp\"\ndport = 22\naction = \"pass\"\n\
                [[divert]]\nname = \"r\"\nproto = \"tcp\"\ndport = 80\naction = \"redirect\"\nport = 1\n";
    let p = build(text).unwrap();
    assert_eq!((p.rules[0].tag, p.rules[1].tag), (0, 1));
}

#[test]
fn too_many_rules_for_mask() {
    let mut text = String::new();
    for i in 0..3 {
        text += &format!(
            "[[divert]]\nname = \"r{i}\"\nproto = \"tcp\"\ndport = {}\naction = \"local\"\n",
            80 + i
        );
    }
    let f = rules::parse(Path::new("r.toml"), text).unwrap();
    let ctx = Context {
        ports: None,
        mark_mask: 0x3,
    };
    let e = Policy::build(&[f], &ctx).unwrap_err().to_string();
    assert!(
        e.contains("do not fit in kernel.mark_mask 0x3 (2 at most)"),
        "{e}"
    );
}

#[test]
fn errors_in_several_rules_all_reported() {
    let text = "[[divert]]\nname = \"a\"\nproto = \"icmp\"\naction = \"pass\"\n[[divert]]\nname = \"b\"\nproto = \"tcp\"\naction = \"nope\"\n";
    let e = build(text).unwrap_err();
    assert_eq!(e.0.len(), 2, "{e}");
}

#[test]
fn durations() {
    assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
    assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
    assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
    assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
    assert_eq!(parse_duration("2"), None);
    assert_eq!(parse_duration("s"), None);
}

#[test]
fn arp_shield_needs_vips() {
    let vip = |dst: &str| {
        format!("[[divert]]\nname = \"vip\"\n{dst}action = \"local\"\narp_shield = true\n")
    };
    for ok in [
        "dst = [\"10.0.0.100\", \"2001:db8::100\"]\n",
        "dst = \"10.0.0.96/28\"\n",
        "dst = \"2001:db8::100\"\n",
    ] {
        let p = build(&vip(ok)).unwrap();
        assert!(p.rules[0].arp_shield, "{ok}");
    }
    // no dst, every address, or an IPv6 prefix: refused at arp_shield
    for (dst, what) in [
        ("", "dst addresses"),
        ("dst = \"0.0.0.0/0\"\n", "dst addresses"),
        ("dst = [\"10.0.0.1\", \"2001:db8::/64\"]\n", "/128"),
    ] {
        let e = error(&vip(dst));
        let line = 4 + usize::from(!dst.is_empty());
        assert!(e.starts_with(&format!("r.toml:{line}:14:")), "{dst}: {e}");
        assert!(e.contains(what), "{e}");
    }
}

fn dr(extra: &str) -> String {
    format!(
        "[[divert]]\nname = \"vip\"\nproto = \"tcp\"\ndport = 80\ndst = \"10.0.0.80\"\naction = \"dr\"\n{extra}"
    )
}

#[test]
fn dr_with_realservers() {
    let p = build(&dr(
        "realservers = [{ mac = \"02:00:00:00:00:31\" }, { mac = \"02-00-00-00-00-32\" }]\n",
    ))
    .unwrap();
    let r = &p.rules[0];
    assert_eq!(r.action, Action::Dr);
    let macs: Vec<_> = r.realservers.iter().map(|rs| rs.mac).collect();
    assert_eq!(
        macs,
        vec![Some([2, 0, 0, 0, 0, 0x31]), Some([2, 0, 0, 0, 0, 0x32])]
    );
    assert!(r.realservers.iter().all(|rs| rs.health.is_none()));
    // not a divert: no tag, no mark bits
    assert_eq!(r.tag, 0);
    assert!(!r.action.diverts());
    assert_eq!(r.families(), vec![Family::V4]);
}

#[test]
fn dr_needs_realservers() {
    let e = error(&dr(""));
    assert!(e.starts_with("r.toml:6:10: error:"), "{e}");
    assert!(e.contains("needs realservers"), "{e}");
}

#[test]
fn dr_realservers_empty() {
    let e = error(&dr("realservers = []\n"));
    assert!(e.starts_with("r.toml:7:15: error:"), "{e}");
    assert!(e.contains("empty list"), "{e}");
}

#[test]
fn dr_realserver_bad_mac() {
    let e = error(&dr(
        "realservers = [{ mac = \"02:00:00:00:00:31\" }, { mac = \"nope\" }]\n",
    ));
    assert!(e.starts_with("r.toml:7:55: error:"), "{e}");
    assert!(e.contains("\"nope\" is not a MAC address"), "{e}");
}

#[test]
fn dr_realserver_multicast_mac() {
    let e = error(&dr("realservers = [{ mac = \"01:00:5e:00:00:01\" }]\n"));
    assert!(e.starts_with("r.toml:7:24: error:"), "{e}");
    assert!(e.contains("not a unicast MAC"), "{e}");
}

#[test]
fn dr_realserver_twice() {
    let e = error(&dr(
        "realservers = [{ mac = \"02:00:00:00:00:31\" }, { mac = \"02:00:00:00:00:31\" }]\n",
    ));
    assert!(e.starts_with("r.toml:7:55: error:"), "{e}");
    assert!(e.contains("listed twice"), "{e}");
}

#[test]
fn dr_realserver_unknown_key() {
    let f = rules::parse(
        Path::new("r.toml"),
        dr("realservers = [{ mac = \"02:00:00:00:00:31\", ip = \"10.0.0.31\" }]\n"),
    );
    let e = f.expect_err("unknown key").to_string();
    assert!(e.contains("r.toml:7:"), "{e}");
    assert!(e.contains("ip"), "{e}");
}

#[test]
fn dr_too_many_realservers() {
    let list: Vec<String> = (0..=MAX_REALSERVERS)
        .map(|i| {
            format!(
                "{{ mac = \"02:00:00:00:{:02x}:{:02x}\" }}",
                i / 256,
                i % 256
            )
        })
        .collect();
    let e = error(&dr(&format!("realservers = [{}]\n", list.join(", "))));
    assert!(e.starts_with("r.toml:7:15: error:"), "{e}");
    assert!(e.contains("at most"), "{e}");
}

#[test]
fn dr_needs_proto_and_vips() {
    let e = error(
        "[[divert]]\nname = \"vip\"\ndst = \"10.0.0.80\"\naction = \"dr\"\n\
         realservers = [{ mac = \"02:00:00:00:00:31\" }]\n",
    );
    assert!(e.starts_with("r.toml:4:10: error:"), "{e}");
    assert!(e.contains("needs proto"), "{e}");
    let e = error(
        "[[divert]]\nname = \"vip\"\nproto = \"tcp\"\naction = \"dr\"\n\
         realservers = [{ mac = \"02:00:00:00:00:31\" }]\n",
    );
    assert!(e.starts_with("r.toml:4:10: error:"), "{e}");
    assert!(e.contains("VIPs as dst"), "{e}");
}

#[test]
fn realservers_only_on_dr() {
    let e = error(&rule("realservers = [{ mac = \"02:00:00:00:00:31\" }]\n"));
    assert!(e.starts_with("r.toml:7:15: error:"), "{e}");
    assert!(e.contains("only apply to action = \"dr\""), "{e}");
}

#[test]
fn dr_refuses_health_and_queue() {
    let e = error(&dr(
        "realservers = [{ mac = \"02:00:00:00:00:31\" }]\nhealth = { connect = \"10.0.0.31:80\" }\n",
    ));
    assert!(e.starts_with("r.toml:8:10: error:"), "{e}");
    assert!(e.contains("checks each realserver"), "{e}");
    let e = error(&dr(
        "realservers = [{ mac = \"02:00:00:00:00:31\" }]\ndecide = \"queue\"\n",
    ));
    assert!(e.contains("needs a diverting action"), "{e}");
}

#[test]
fn dr_realserver_by_address_with_health() {
    let p = build(&dr("realservers = [\n  { address = \"10.0.0.31\", health = { interval = \"1s\", fall = 2 } },\n  \
         { mac = \"02:00:00:00:00:32\", health = { connect = \"10.0.0.32:8080\", rise = 5 } },\n  \
         { address = \"2001:db8::33\", mac = \"02:00:00:00:00:33\" },\n]\n"))
    .unwrap();
    let rs = &p.rules[0].realservers;
    assert_eq!(rs.len(), 3);
    assert_eq!(rs[0].address, Some("10.0.0.31".parse().unwrap()));
    assert_eq!(rs[0].mac, None);
    let h = rs[0].health.as_ref().unwrap();
    // connect defaults to address:first dport
    assert_eq!(h.connect, "10.0.0.31:80".parse().unwrap());
    assert_eq!((h.interval, h.fall, h.rise), (Duration::from_secs(1), 2, 2));
    let h = rs[1].health.as_ref().unwrap();
    assert_eq!(h.connect, "10.0.0.32:8080".parse().unwrap());
    assert_eq!((h.fall, h.rise), (3, 5));
    assert_eq!(rs[2].mac, Some([2, 0, 0, 0, 0, 0x33]));
    assert_eq!(rs[2].describe(), "2001:db8::33");
    assert_eq!(rs[1].describe(), "02:00:00:00:00:32");
}

#[test]
fn dr_realserver_needs_mac_or_address() {
    let e = error(&dr("realservers = [{ mac = \"02:00:00:00:00:31\" }, {}]\n"));
    assert!(e.starts_with("r.toml:7:47: error:"), "{e}");
    assert!(e.contains("needs a mac or an address"), "{e}");
}

#[test]
fn dr_realserver_bad_address() {
    let e = error(&dr("realservers = [{ address = \"10.0.0.300\" }]\n"));
    assert!(e.starts_with("r.toml:7:28: error:"), "{e}");
    assert!(e.contains("not an IP address"), "{e}");
    let e = error(&dr("realservers = [{ address = \"224.0.0.1\" }]\n"));
    assert!(e.starts_with("r.toml:7:28: error:"), "{e}");
    assert!(e.contains("not a unicast host address"), "{e}");
    let e = error(&dr(
        "realservers = [{ address = \"10.0.0.31\" }, { address = \"10.0.0.31\" }]\n",
    ));
    assert!(e.starts_with("r.toml:7:55: error:"), "{e}");
    assert!(e.contains("listed twice"), "{e}");
}

#[test]
fn dr_realserver_health_needs_connect_without_address() {
    let e = error(&dr(
        "realservers = [{ mac = \"02:00:00:00:00:31\", health = { fall = 2 } }]\n",
    ));
    assert!(e.starts_with("r.toml:7:54: error:"), "{e}");
    assert!(e.contains("health needs connect"), "{e}");
    // and a rule-level health table without connect, at the table
    let e = error(&rule("health = { fall = 2 }\n"));
    assert!(e.starts_with("r.toml:7:10: error:"), "{e}");
    assert!(e.contains("health needs connect"), "{e}");
}

#[test]
fn dr_realserver_bad_health_values() {
    let e = error(&dr(
        "realservers = [{ address = \"10.0.0.31\", health = { interval = \"soon\" } }]\n",
    ));
    assert!(e.starts_with("r.toml:7:63: error:"), "{e}");
    assert!(
        e.contains("health.interval \"soon\" is not a duration"),
        "{e}"
    );
    let e = error(&dr(
        "realservers = [{ address = \"10.0.0.31\", health = { connect = \"10.0.0.31\" } }]\n",
    ));
    assert!(e.starts_with("r.toml:7:62: error:"), "{e}");
    assert!(e.contains("is not ADDR:PORT"), "{e}");
}

#[test]
fn queue_with_tproxy_refused_at_the_tproxy_action() {
    let e = error(
        "[[divert]]\nname = \"q\"\nproto = \"tcp\"\ndport = 80\naction = \"redirect\"\nport = 3129\n\
         decide = \"queue\"\n\
         [[divert]]\nname = \"tp\"\nproto = \"tcp\"\ndport = 8080\naction = \"tproxy\"\nport = 3130\n",
    );
    assert!(e.starts_with("r.toml:12:10:"), "{e}");
    assert!(
        e.contains("cannot be combined with decide = \"queue\" (rule \"q\" at r.toml:7:10)"),
        "{e}"
    );
    assert!(e.contains("use action = \"redirect\""), "{e}");
    // either alone is fine
    assert!(build(&rule("decide = \"queue\"\n")).is_ok());
}

/// A `pass` rule for tcp/22 (line 5: `action`), with `extra` lines from line 6.
fn pass_rule(extra: &str) -> String {
    format!("[[divert]]\nname = \"ssh\"\nproto = \"tcp\"\ndport = 22\naction = \"pass\"\n{extra}")
}

#[test]
fn vlan_ids() {
    for (text, col) in [
        ("vlan = [10, 4095]\n", 13),
        ("vlan = 0\n", 8),
        ("vlan = [-1]\n", 9),
        ("vlan = [70000]\n", 9),
    ] {
        let e = error(&pass_rule(text));
        assert!(
            e.starts_with(&format!("r.toml:6:{col}:")) && e.contains("VLAN id 1-4094"),
            "{text}: {e}"
        );
    }
    let e = error(&pass_rule("vlan = []\n"));
    assert!(e.starts_with("r.toml:6:8:") && e.contains("empty"), "{e}");
    let e = error(&pass_rule("vlan = \"10\"\n"));
    assert!(e.starts_with("r.toml:6:8:"), "{e}");
    let p = build(&pass_rule("vlan = [20, 10, 20]\n")).unwrap();
    assert_eq!(p.rules[0].vlan, vec![10, 20]);
    assert!(build(&pass_rule("")).unwrap().rules[0].vlan.is_empty());
}

#[test]
fn vlan_with_a_diverting_action_refused() {
    let e = error(&rule("vlan = [10, 20]\n"));
    assert!(
        e.starts_with("r.toml:7:8:")
            && e.contains("\"redirect\" cannot take VLAN-tagged frames")
            && e.contains("use vlan with pass, drop or dr"),
        "{e}"
    );
    assert!(build(&pass_rule("vlan = 10\n")).is_ok());
    let drop = pass_rule("vlan = 10\n").replace("\"pass\"", "\"drop\"");
    assert!(build(&drop).is_ok());
}

#[test]
fn vlan_shadowing() {
    let two = |a: &str, b: &str| {
        format!(
            "{}{}",
            pass_rule(a),
            pass_rule(b).replace("name = \"ssh\"", "name = \"ssh2\"")
        )
    };
    let warnings = |a: &str, b: &str| build(&two(a, b)).unwrap().warnings.len();
    // VLANs [10, 20] shadow [20]; untagged shadows untagged
    assert_eq!(warnings("vlan = [10, 20]\n", "vlan = 20\n"), 1);
    assert_eq!(warnings("", ""), 1);
    // untagged and tagged never overlap; nor do different VLANs
    assert_eq!(warnings("", "vlan = 10\n"), 0);
    assert_eq!(warnings("vlan = 10\n", ""), 0);
    assert_eq!(warnings("vlan = 10\n", "vlan = 20\n"), 0);
}

#[test]
fn bad_items_of_a_long_list_each_at_its_own_position() {
    // a long multi-line list, with a comment holding quotes, and bad items on lines 1004
    // and 2008 (two errors, reported in list order)
    let mut dst = String::from("dst = [ # \"VIPs\", ']'\n");
    for i in 0..2000u32 {
        let [_, _, a, b] = i.to_be_bytes();
        dst.push_str(&format!("  \"10.1.{a}.{b}\",\n"));
        if i == 995 {
            dst.push_str("  'nonsense', # here\n");
        }
        if i == 1998 {
            dst.push_str("  \"\"\"10.2.0.1/8\"\"\",\n");
        }
    }
    dst.push_str("]\n");
    let e = build(&rule(&dst)).expect_err("should be refused");
    let errs: Vec<String> = e.0.iter().map(ToString::to_string).collect();
    assert_eq!(errs.len(), 2, "{e}");
    assert!(
        errs[0].starts_with("r.toml:1004:3: error: dst: \"nonsense\" is not an address or prefix"),
        "{}",
        errs[0]
    );
    assert!(
        errs[1].starts_with("r.toml:2008:3: error: dst: \"10.2.0.1/8\" has host bits set"),
        "{}",
        errs[1]
    );
}

#[test]
fn long_address_lists_merge() {
    let p = build(&rule(
        "dst = [\"10.0.0.3\", \"10.0.0.1\", \"10.0.0.2\", \"10.0.0.0\", \"::2\", \"::1\"]\n",
    ))
    .unwrap();
    let AddrMatch::Only(d) = &p.rules[0].dst else {
        panic!("dst")
    };
    assert_eq!(d.v4, vec!["10.0.0.0/30".parse().unwrap()]);
    assert_eq!(
        d.v6,
        vec!["::1/128".parse().unwrap(), "::2/128".parse().unwrap()]
    );
}

mod aggregate {
    use super::*;
    use proptest::prelude::*;

    /// Nets bunched into a small space, so that overlaps, neighbours and duplicates are common,
    /// next to the same nets shifted far apart (the fast path's case).
    fn v4_nets() -> impl Strategy<Value = Vec<Ipv4Net>> {
        let net = (0u32..64, 26u8..=32, any::<bool>()).prop_map(|(a, len, far)| {
            let base = if far { a << 24 } else { 0x0a00_0000 | a };
            Ipv4Net::new(base.into(), len).unwrap().trunc()
        });
        proptest::collection::vec(net, 0..12)
    }

    fn v6_nets() -> impl Strategy<Value = Vec<Ipv6Net>> {
        let net = (0u128..64, 122u8..=128, any::<bool>()).prop_map(|(a, len, far)| {
            let base = if far { a << 120 } else { a };
            Ipv6Net::new(base.into(), len).unwrap().trunc()
        });
        proptest::collection::vec(net, 0..12)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn v4_same_as_ipnet(nets in v4_nets()) {
            prop_assert_eq!(aggregate_v4(nets.clone()), Ipv4Net::aggregate(&nets));
        }

        #[test]
        fn v6_same_as_ipnet(nets in v6_nets()) {
            prop_assert_eq!(aggregate_v6(nets.clone()), Ipv6Net::aggregate(&nets));
        }
    }

    #[test]
    fn edges_of_the_address_space() {
        for t in [
            &["255.255.255.255/32", "0.0.0.0/32"][..],
            &["255.255.255.254/32", "255.255.255.255/32"],
            &["0.0.0.0/0", "10.0.0.0/8"],
            &["10.0.0.0/8", "10.0.0.0/8"],
        ] {
            let nets: Vec<Ipv4Net> = t.iter().map(|n| n.parse().unwrap()).collect();
            assert_eq!(
                aggregate_v4(nets.clone()),
                Ipv4Net::aggregate(&nets),
                "{t:?}"
            );
        }
        let last: Ipv6Net = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"
            .parse()
            .unwrap();
        let nets = vec![last, "::/128".parse().unwrap()];
        assert_eq!(aggregate_v6(nets.clone()), Ipv6Net::aggregate(&nets));
    }
}

/// Rule files as they come from disk, fuzzed through the whole load (TOML with spans, then
/// validation): the shipped examples mutated, and soups of TOML tokens and rule keys. Never
/// a panic; a refusal names the file and, where it has a position, one inside the text, and
/// says what is wrong and how to fix it.
mod file_fuzz {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::{Index, select};

    const SHIPPED: [&str; 6] = [
        include_str!("../../rules/squid-intercept.toml"),
        include_str!("../../rules/squid-intercept-queue.toml"),
        include_str!("../../rules/squid-tproxy.toml"),
        include_str!("../../rules/vip-local-fwmark.toml"),
        include_str!("../../rules/lvs-dr-bridge.toml"),
        include_str!("../../rules/lvs-dr-on-bridge.toml"),
    ];

    const TOKENS: &[&str] = &[
        "[[divert]]\n",
        "[[divert.realservers]]\n",
        "\n",
        " = ",
        ", ",
        "[",
        "]",
        "{",
        "}",
        "#",
        "name",
        "from",
        "proto",
        "dport",
        "dst",
        "src",
        "except_src",
        "except_dst",
        "src_mac",
        "vlan",
        "action",
        "port",
        "address",
        "fwmark",
        "decide",
        "arp_shield",
        "health",
        "on_unhealthy",
        "realservers",
        "connect",
        "interval",
        "timeout",
        "fall",
        "rise",
        "mac",
        "\"a\"",
        "\"redirect\"",
        "\"tproxy\"",
        "\"local\"",
        "\"pass\"",
        "\"drop\"",
        "\"dr\"",
        "\"queue\"",
        "\"bypass\"",
        "\"tcp\"",
        "\"udp\"",
        "\"10.0.0.0/8\"",
        "\"10.0.0.1\"",
        "\"fd00::/8\"",
        "\"::1\"",
        "\"eth0\"",
        "\"02:00:00:00:00:01\"",
        "\"80-90\"",
        "\"1s\"",
        "\"127.0.0.1:3129\"",
        "0",
        "1",
        "80",
        "3129",
        "4095",
        "65536",
        "-1",
        "0x10000",
        "true",
        "1.5",
        "\"\u{e9}\"",
    ];

    fn check(text: &str) -> Result<(), TestCaseError> {
        // ports: None skips the `from` names check, so the shipped files load as they are
        let ctx = Context {
            ports: None,
            mark_mask: 0x00ff_0000,
        };
        let loaded = rules::parse(Path::new("t.toml"), text.to_string())
            .and_then(|f| Policy::build(&[f], &ctx).map(drop));
        let Err(Refused(diags)) = loaded else {
            return Ok(());
        };
        prop_assert!(!diags.is_empty());
        let lines: Vec<&str> = text.split('\n').collect();
        for d in &diags {
            prop_assert_eq!(&d.file, Path::new("t.toml"));
            prop_assert!(!d.what.is_empty() && !d.fix.is_empty(), "{:?}", d);
            if d.line > 0 {
                let line = lines.get(d.line - 1);
                prop_assert!(
                    line.is_some(),
                    "line {} of {}: {:?}",
                    d.line,
                    lines.len(),
                    d
                );
                let chars = line.map_or(0, |l| l.chars().count());
                prop_assert!(
                    d.column >= 1 && d.column <= chars + 1,
                    "column {} of {}: {:?}",
                    d.column,
                    chars,
                    d
                );
            }
        }
        Ok(())
    }

    #[test]
    fn shipped_rule_files_load() {
        for text in SHIPPED {
            let f = rules::parse(Path::new("t.toml"), text.to_string()).expect("parses");
            let ctx = Context {
                ports: None,
                mark_mask: 0x00ff_0000,
            };
            Policy::build(&[f], &ctx).expect("builds");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::fuzz::fuzz_cases(512)))]

        /// A shipped file with up to 4 characters replaced, inserted or deleted, then maybe
        /// cut short.
        #[test]
        fn mutated_rule_files_are_loaded_or_refused_with_a_position(
            which in 0..SHIPPED.len(),
            edits in crate::fuzz::edits(4),
            cut in proptest::option::of(any::<Index>()),
        ) {
            let mut t = crate::fuzz::mutate(SHIPPED[which], &edits);
            if let Some(at) = cut {
                t.truncate(t.floor_char_boundary(at.index(t.len() + 1)));
            }
            check(&t)?;
        }

        /// Soups of the rule files' own tokens: keys, values of every type, brackets.
        #[test]
        fn token_soups_are_loaded_or_refused_with_a_position(
            tokens in proptest::collection::vec(select(TOKENS), 0..40),
        ) {
            check(&format!("[[divert]]\n{}", tokens.concat()))?;
        }
    }
}
