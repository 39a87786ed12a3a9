//! Reading brdivert's rule counters from the kernel: one `NFT_MSG_GETRULE` dump of the
//! `bridge brdivert` table over a plain `AF_NETLINK`/`NETLINK_NETFILTER` socket (the same raw
//! approach as `nft::netlink`), parsed for each rule's comment (`NFTA_RULE_USERDATA`,
//! libnftnl's TLV with type `NFTNL_UDATA_RULE_COMMENT`) and its `counter` expression.
//!
//! The compiler names rules by comment (see `nft::compile`): in each rule's own chain the
//! rule commented `NAME` applies the action (counted as "diverted"), rules commented
//! `NAME: except_src` / `NAME: except_dst` return exempted packets (counted as "exempted").
//! `NAME: down` (the health flip's bypass/drop rule) counts as "unhealthy". A comment
//! without `: ` that names no rule (the flow-pinning rule `pinned`) is kept under its own
//! name ([`PINNED`]), and so are the rule chains' pin lookups (`NAME: pinned`). Other comments (`NAME: reply`, `NAME: health`, the `inet` table's
//! rules) are not summed, so a packet is counted once.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::nft::TABLE_NAME;

/// Packets and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

impl std::ops::AddAssign for Count {
    fn add_assign(&mut self, o: Count) {
        self.packets = self.packets.saturating_add(o.packets);
        self.bytes = self.bytes.saturating_add(o.bytes);
    }
}

/// Per brdivert rule: what its action took and what its exemptions returned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RuleCounts {
    pub diverted: Count,
    pub exempted: Count,
    /// New flows bypassed or dropped while the rule's health target was down (rules
    /// commented `NAME: down`, from the health-flip compile shape).
    #[serde(default)]
    pub unhealthy: Count,
}

impl std::ops::AddAssign for RuleCounts {
    fn add_assign(&mut self, o: RuleCounts) {
        self.diverted += o.diverted;
        self.exempted += o.exempted;
        self.unhealthy += o.unhealthy;
    }
}

/// One kernel rule as the dump shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRule {
    pub chain: String,
    pub comment: Option<String>,
    pub counter: Option<Count>,
}

/// The comment of the flow-pinning rules (packets of established, pinned flows): alone at
/// the head of prerouting, `NAME: pinned` at the head of a rule's chain.
pub const PINNED: &str = "pinned";
/// The same for `dr` flows.
pub const DR_PINNED: &str = "dr pinned";

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_NEWRULE: u16 = 6;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;
const NFTNL_UDATA_RULE_COMMENT: u8 = 0;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NFPROTO_BRIDGE: u8 = 7;

/// Counters per brdivert rule name, from the kernel's `bridge brdivert` table. A missing
/// table reads as no counters.
pub fn read() -> io::Result<BTreeMap<String, RuleCounts>> {
    Ok(summarize(&dump_rules(NFPROTO_BRIDGE, TABLE_NAME)?))
}

/// Sum kernel rules into per-rule counts by their comments.
pub fn summarize(rules: &[KernelRule]) -> BTreeMap<String, RuleCounts> {
    let mut out: BTreeMap<String, RuleCounts> = BTreeMap::new();
    for r in rules {
        let (Some(comment), Some(c)) = (&r.comment, r.counter) else {
            continue;
        };
        if let Some((name, what)) = comment.split_once(": ") {
            if what.starts_with("except_") {
                out.entry(name.to_string()).or_default().exempted += c;
            } else if what == "down" {
                out.entry(name.to_string()).or_default().unhealthy += c;
            } else if what == PINNED || what == DR_PINNED {
                // a rule chain's pin lookups count with the rest of the pinned flows
                out.entry(what.to_string()).or_default().diverted += c;
            }
        } else {
            out.entry(comment.clone()).or_default().diverted += c;
        }
    }
    out
}

fn nla_align(n: usize) -> usize {
    (n + 3) & !3
}

/// Iterate the netlink attributes in `buf`: (type without flags, payload).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[nla_align(len).min(buf.len())..];
        Some((ty, payload))
    })
}

fn be_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// libnftnl user data: TLVs of (type u8, len u8, value).
fn udata_comment(mut b: &[u8]) -> Option<String> {
    while b.len() >= 2 {
        let (ty, len) = (b[0], b[1] as usize);
        let v = b.get(2..2 + len)?;
        if ty == NFTNL_UDATA_RULE_COMMENT {
            return Some(cstr(v));
        }
        b = &b[2 + len..];
    }
    None
}

fn counter_of(exprs: &[u8]) -> Option<Count> {
    for (ty, elem) in attrs(exprs) {
        if ty != NFTA_LIST_ELEM {
            continue;
        }
        let mut name = String::new();
        let mut data: &[u8] = &[];
        for (t, p) in attrs(elem) {
            match t {
                NFTA_EXPR_NAME => name = cstr(p),
                NFTA_EXPR_DATA => data = p,
                _ => {}
            }
        }
        if name == "counter" {
            let mut c = Count::default();
            for (t, p) in attrs(data) {
                match t {
                    NFTA_COUNTER_BYTES => c.bytes = be_u64(p).unwrap_or(0),
                    NFTA_COUNTER_PACKETS => c.packets = be_u64(p).unwrap_or(0),
                    _ => {}
                }
            }
            return Some(c);
        }
    }
    None
}

/// Parse the attributes of one `NFT_MSG_NEWRULE` (after the nfgenmsg header).
pub fn parse_rule(payload: &[u8]) -> KernelRule {
    let mut r = KernelRule {
        chain: String::new(),
        comment: None,
        counter: None,
    };
    for (ty, p) in attrs(payload) {
        match ty {
            NFTA_RULE_CHAIN => r.chain = cstr(p),
            NFTA_RULE_EXPRESSIONS => r.counter = counter_of(p),
            NFTA_RULE_USERDATA => r.comment = udata_comment(p),
            _ => {}
        }
    }
    r
}

/// `NFT_MSG_GETRULE` dump of one table.
pub fn dump_rules(family: u8, table: &str) -> io::Result<Vec<KernelRule>> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a pointer to a timeval of the right size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };

    let seq: u32 = 1;
    let mut msg = Vec::with_capacity(64);
    msg.extend_from_slice(&0u32.to_ne_bytes()); // length, patched below
    msg.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE).to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid
    msg.extend_from_slice(&[family, 0, 0, 0]); // nfgenmsg: family, version 0, res_id 0
    let name = format!("{table}\0");
    let alen = 4 + name.len();
    msg.extend_from_slice(&(alen as u16).to_ne_bytes());
    msg.extend_from_slice(&NFTA_RULE_TABLE.to_ne_bytes());
    msg.extend_from_slice(name.as_bytes());
    msg.resize(nla_align(msg.len()), 0);
    let total = msg.len() as u32;
    msg[..4].copy_from_slice(&total.to_ne_bytes());

    // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: sendto with a buffer and address we own, of the stated lengths.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }

    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        // SAFETY: recv into a buffer we own, of its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut b = &buf[..n as usize];
        while b.len() >= 16 {
            let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
            let ty = u16::from_ne_bytes([b[4], b[5]]);
            if len < 16 || len > b.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated netlink message",
                ));
            }
            let body = &b[16..len];
            match ty {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno = body
                        .get(..4)
                        .and_then(|e| e.try_into().ok())
                        .map(i32::from_ne_bytes)
                        .unwrap_or(0);
                    if errno == 0 {
                        return Ok(out);
                    }
                    if -errno == libc::ENOENT {
                        // no such table: nothing applied yet
                        return Ok(Vec::new());
                    }
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                t if t == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE => {
                    if let Some(attrs) = body.get(4..) {
                        out.push(parse_rule(attrs));
                    }
                }
                _ => {}
            }
            b = &b[nla_align(len).min(b.len())..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(payload);
        v.resize(nla_align(v.len()), 0);
        v
    }

    #[test]
    fn parses_comment_and_counter() {
        let mut data = attr(NFTA_COUNTER_BYTES, &1234u64.to_be_bytes());
        data.extend(attr(NFTA_COUNTER_PACKETS, &7u64.to_be_bytes()));
        let mut counter = attr(NFTA_EXPR_NAME, b"counter\0");
        counter.extend(attr(NFTA_EXPR_DATA | 0x8000, &data));
        let mut exprs = attr(NFTA_LIST_ELEM | 0x8000, &attr(NFTA_EXPR_NAME, b"meta\0"));
        exprs.extend(attr(NFTA_LIST_ELEM | 0x8000, &counter));
        let mut rule = attr(NFTA_RULE_TABLE, b"brdivert\0");
        rule.extend(attr(NFTA_RULE_CHAIN, b"rule-web\0"));
        rule.extend(attr(NFTA_RULE_EXPRESSIONS | 0x8000, &exprs));
        let mut ud = vec![NFTNL_UDATA_RULE_COMMENT, 4];
        ud.extend_from_slice(b"web\0");
        rule.extend(attr(NFTA_RULE_USERDATA, &ud));
        let r = parse_rule(&rule);
        assert_eq!(r.chain, "rule-web");
        assert_eq!(r.comment.as_deref(), Some("web"));
        assert_eq!(
            r.counter,
            Some(Count {
                packets: 7,
                bytes: 1234
            })
        );
    }

    #[test]
    fn summarize_by_comment() {
        let c = |p| {
            Some(Count {
                packets: p,
                bytes: p * 100,
            })
        };
        let k = |comment: &str, counter| KernelRule {
            chain: "x".into(),
            comment: Some(comment.into()),
            counter,
        };
        let rules = vec![
            k("web", None), // the jump in prerouting: no counter
            k("web: except_src", c(1)),
            k("web: except_dst", c(2)),
            k("web", c(10)),
            k("web", c(5)), // the IPv6 rule of the same policy rule
            k("web: reply", c(50)),
            k("vip", c(3)),
            k("vip: down", c(4)),
            k("vip: health", c(40)),
            k("pinned", c(9)),
            k("web: pinned", c(20)),
            k("vip: pinned", c(7)),
        ];
        let s = summarize(&rules);
        assert_eq!(s["web"].diverted.packets, 15);
        assert_eq!(s["web"].exempted.packets, 3);
        assert_eq!(s["web"].exempted.bytes, 300);
        assert_eq!(s["vip"].diverted.packets, 3);
        assert_eq!(s["vip"].unhealthy.packets, 4);
        assert_eq!(s[PINNED].diverted.packets, 9 + 20 + 7);
    }
}
