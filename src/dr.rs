//! `action = "dr"`: which realserver takes a new flow. One place for both datapaths: the
//! kernel datapath writes [`bucket_macs`] into a bucket map (`nft::compile::dr_buckets`) and
//! hashes flows with nft's `jhash`; the userspace datapath keeps the same per-bucket MACs
//! and hashes with [`bucket_of`] (a different hash function, the same buckets and the same
//! health moves).
//!
//! - A flow's client address and port pick one of [`DR_BUCKETS`] buckets; bucket *b*
//!   belongs to realserver *b mod N* ([`dr_assignment`]).
//! - A realserver that is down (its health check) or whose MAC is unknown gives its buckets
//!   to the others, round robin; the buckets of usable realservers never move, so only new
//!   flows that hash to a dead realserver's buckets go elsewhere. (Established flows are
//!   pinned by each datapath: `dr_flows4/6` in the kernel, the flow table in userspace.)

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::policy::{DivertRule, Health, Realserver};

/// How many hash buckets a `dr` rule deals out to its realservers. Far more than realservers,
/// so that a dead realserver's share can be spread over all the others.
pub const DR_BUCKETS: u32 = 256;

/// Seed of the `dr` flow hash. Fixed, so a reload (or a restart) sends every connection to
/// the same realserver as before as long as the realserver list is unchanged.
pub const DR_HASH_SEED: u32 = 0x6272_6476; // "brdv"

/// A realserver's identity in health-check keys and in `status`: its address when the rule
/// gives one, else its MAC. Stable across reloads that reorder, add or remove other
/// realservers (an index would hand one realserver's health to another). A rule lists every
/// address and every MAC once, so no two realservers of a rule share an identity, and neither
/// an address nor a MAC (`02:00:00:00:00:31`) can contain '/'.
pub fn realserver_id(rs: &Realserver) -> String {
    match (rs.address, rs.mac) {
        (Some(a), _) => a.to_string(),
        (None, Some(m)) => crate::policy::mac_text(&m),
        // refused by the policy; never a valid address or MAC, so never down
        (None, None) => "?".into(),
    }
}

/// The health-check key of realserver `rs` of `dr` rule `rule`: `rule/<id>`
/// ([`realserver_id`], e.g. `lvs-dr/10.0.0.31`). Rule names cannot hold '/', so
/// [`parse_check_key`] splits it back.
pub fn dr_check_key(rule: &str, rs: &Realserver) -> String {
    format!("{rule}/{}", realserver_id(rs))
}

/// (rule name, realserver identity) of a health-check key; no identity for a rule's own check.
pub fn parse_check_key(key: &str) -> (&str, Option<&str>) {
    match key.split_once('/') {
        Some((rule, id)) => (rule, Some(id)),
        None => (key, None),
    }
}

/// The realserver of `dr` rule `r` whose identity is `id` ([`realserver_id`]).
pub fn find_realserver<'a>(r: &'a DivertRule, id: &str) -> Option<&'a Realserver> {
    r.realservers.iter().find(|rs| realserver_id(rs) == id)
}

/// The health checks of `dr` rule `r`'s realservers: (check key, the check), in list order.
pub fn realserver_checks(r: &DivertRule) -> impl Iterator<Item = (String, &Health)> {
    r.realservers
        .iter()
        .filter_map(|rs| Some((dr_check_key(&r.name, rs), rs.health.as_ref()?)))
}

/// Which realserver each bucket goes to (index into `usable`'s list), given which
/// realservers can take new flows. Bucket `b` belongs to realserver `b mod N`; while its
/// owner is unusable, the k-th such orphaned bucket goes to the k-th usable realserver
/// (round robin). So the buckets of usable realservers never move, and a realserver that
/// becomes usable again gets exactly its own buckets back. With none usable: `None` for
/// every bucket.
pub fn dr_assignment(usable: &[bool]) -> Vec<Option<usize>> {
    let n = usable.len();
    let ok: Vec<usize> = (0..n).filter(|&i| usable[i]).collect();
    let mut k = 0;
    (0..DR_BUCKETS as usize)
        .map(|b| {
            if n == 0 || ok.is_empty() {
                return None;
            }
            let owner = b % n;
            if usable[owner] {
                Some(owner)
            } else {
                k += 1;
                Some(ok[(k - 1) % ok.len()])
            }
        })
        .collect()
}

/// The MAC of each realserver of `dr` rule `r`: given in the rule, or learned for its address
/// (`neighbours`); `None` while unknown.
pub fn realserver_macs(
    r: &DivertRule,
    neighbours: &BTreeMap<IpAddr, [u8; 6]>,
) -> Vec<Option<[u8; 6]>> {
    r.realservers
        .iter()
        .map(|rs| {
            rs.mac
                .or_else(|| rs.address.and_then(|a| neighbours.get(&a).copied()))
        })
        .collect()
}

/// The realserver (index into `r.realservers`) of each bucket of `dr` rule `r`
/// ([`DR_BUCKETS`] entries): realservers with a known MAC (given, or learned: `neighbours`)
/// that are not `down` (health-check keys, [`dr_check_key`]) take new flows. When every
/// realserver with a MAC is down, they all keep their buckets (a check failing everywhere is
/// more likely the checker's own problem than every realserver's); realservers without a MAC
/// never get a bucket, and with no MAC known at all every bucket is `None` (the rule's frames
/// are bridged untouched).
pub fn bucket_owners(
    r: &DivertRule,
    neighbours: &BTreeMap<IpAddr, [u8; 6]>,
    down: &BTreeSet<String>,
) -> Vec<Option<usize>> {
    let macs = realserver_macs(r, neighbours);
    let up: Vec<bool> = r
        .realservers
        .iter()
        .zip(&macs)
        .map(|(rs, mac)| mac.is_some() && !down.contains(&dr_check_key(&r.name, rs)))
        .collect();
    let usable = if up.iter().any(|u| *u) {
        up
    } else {
        macs.iter().map(Option::is_some).collect()
    };
    dr_assignment(&usable)
}

/// The MAC of each bucket of `dr` rule `r` ([`bucket_owners`]' realserver's MAC).
pub fn bucket_macs(
    r: &DivertRule,
    neighbours: &BTreeMap<IpAddr, [u8; 6]>,
    down: &BTreeSet<String>,
) -> Vec<Option<[u8; 6]>> {
    let macs = realserver_macs(r, neighbours);
    bucket_owners(r, neighbours, down)
        .into_iter()
        .map(|i| i.and_then(|i| macs[i]))
        .collect()
}

/// How many of the [`DR_BUCKETS`] buckets each realserver of `dr` rule `r` holds
/// ([`bucket_owners`]), in list order.
pub fn bucket_shares(
    r: &DivertRule,
    neighbours: &BTreeMap<IpAddr, [u8; 6]>,
    down: &BTreeSet<String>,
) -> Vec<u32> {
    let mut n = vec![0u32; r.realservers.len()];
    for i in bucket_owners(r, neighbours, down).into_iter().flatten() {
        if let Some(c) = n.get_mut(i) {
            *c += 1;
        }
    }
    n
}

/// The userspace datapath's bucket of a flow from `src` port `sport`: FNV-1a over the
/// address bytes and the port, seeded with [`DR_HASH_SEED`], then a final avalanche, mod
/// [`DR_BUCKETS`]. Not the kernel's `jhash` (so the same client may land on a different
/// realserver in the two datapaths); stable across restarts and reloads.
pub fn bucket_of(src: IpAddr, sport: u16) -> usize {
    let mut h: u32 = 0x811c_9dc5 ^ DR_HASH_SEED;
    let mut eat = |b: u8| {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    };
    match src {
        IpAddr::V4(a) => a.octets().into_iter().for_each(&mut eat),
        IpAddr::V6(a) => a.octets().into_iter().for_each(&mut eat),
    }
    sport.to_be_bytes().into_iter().for_each(&mut eat);
    // murmur3's finaliser: FNV's low bits alone mix poorly for `mod 256`
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    (h % DR_BUCKETS) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dr_assignment_moves_only_the_dead_realservers_buckets() {
        let all = dr_assignment(&[true, true, true]);
        assert_eq!(all.len(), DR_BUCKETS as usize);
        assert!(all.iter().enumerate().all(|(b, i)| *i == Some(b % 3)));
        let one_down = dr_assignment(&[true, false, true]);
        for (b, (was, now)) in all.iter().zip(&one_down).enumerate() {
            if *was == Some(1) {
                assert_ne!(*now, Some(1), "bucket {b} still on the dead realserver");
            } else {
                assert_eq!(was, now, "bucket {b} of a healthy realserver moved");
            }
        }
        // the orphans are shared out evenly
        let to0 = (0..DR_BUCKETS as usize)
            .filter(|&b| b % 3 == 1 && one_down[b] == Some(0))
            .count();
        let to2 = (0..DR_BUCKETS as usize)
            .filter(|&b| b % 3 == 1 && one_down[b] == Some(2))
            .count();
        assert!(to0.abs_diff(to2) <= 1, "{to0} vs {to2}");
        assert!(dr_assignment(&[false, false]).iter().all(Option::is_none));
        assert!(dr_assignment(&[]).iter().all(Option::is_none));
    }

    fn dr_policy(realservers: &str) -> crate::policy::Policy {
        crate::policy::test_policy(&format!(
            "[[divert]]\nname = \"vip\"\nproto = \"tcp\"\ndport = 80\ndst = \"192.0.2.80\"\n\
             action = \"dr\"\nrealservers = [{realservers}]\n"
        ))
    }

    #[test]
    fn check_keys_name_the_realserver_and_round_trip() {
        let p = dr_policy(
            "{ mac = \"02:00:00:00:00:31\" }, { address = \"2001:db8::32\", mac = \"02:00:00:00:00:32\" }",
        );
        let r = &p.rules[0];
        let k0 = dr_check_key("vip", &r.realservers[0]);
        let k1 = dr_check_key("vip", &r.realservers[1]);
        assert_eq!(k0, "vip/02:00:00:00:00:31");
        // the address when given (an IPv6 address's ':' are fine, only '/' splits)
        assert_eq!(k1, "vip/2001:db8::32");
        assert_eq!(parse_check_key(&k1), ("vip", Some("2001:db8::32")));
        assert_eq!(
            find_realserver(r, parse_check_key(&k0).1.unwrap()),
            Some(&r.realservers[0])
        );
        assert_eq!(find_realserver(r, "10.0.0.1"), None);
        assert_eq!(parse_check_key("web"), ("web", None));
    }

    /// A reload that reorders the realservers keeps each one's down state: the key names the
    /// realserver, not its place in the list (index keys moved rs1's "down" to rs2).
    #[test]
    fn reordering_realservers_keeps_down_state_on_the_right_realserver() {
        let rs1 = "{ mac = \"02:00:00:00:00:31\", health = { connect = \"192.0.2.31:80\" } }";
        let rs2 = "{ address = \"192.0.2.32\", health = {} }";
        let before = dr_policy(&format!("{rs1}, {rs2}"));
        let after = dr_policy(&format!("{rs2}, {rs1}"));
        let mac2 = [2, 0, 0, 0, 0, 0x32];
        let neighbours: BTreeMap<IpAddr, [u8; 6]> = [("192.0.2.32".parse().unwrap(), mac2)].into();
        // rs1's checker (the daemon keys it as realserver_checks says) reports down
        let (k1, _) = realserver_checks(&before.rules[0])
            .next()
            .expect("rs1's check");
        let down: BTreeSet<String> = [k1].into();
        for p in [&before, &after] {
            let r = &p.rules[0];
            let macs = bucket_macs(r, &neighbours, &down);
            assert!(
                macs.iter().all(|m| *m == Some(mac2)),
                "rs1 is down, rs2 takes every bucket, whatever the order: {:?}",
                &macs[..4]
            );
            let shares = bucket_shares(r, &neighbours, &down);
            let at2 = r
                .realservers
                .iter()
                .position(|rs| rs.mac.is_none())
                .unwrap();
            assert_eq!(shares[at2], DR_BUCKETS);
            assert_eq!(shares.iter().sum::<u32>(), DR_BUCKETS);
        }
        // the daemon's checkers are keyed the same in both orders, so they keep running
        let keys = |p: &crate::policy::Policy| -> BTreeSet<String> {
            realserver_checks(&p.rules[0]).map(|(k, _)| k).collect()
        };
        assert_eq!(keys(&before), keys(&after));
        // all up: an even split
        let shares = bucket_shares(&after.rules[0], &neighbours, &BTreeSet::new());
        assert_eq!(shares, vec![DR_BUCKETS / 2, DR_BUCKETS / 2]);
    }

    #[test]
    fn flow_hash_is_stable_and_spreads() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(bucket_of(a, 40000), bucket_of(a, 40000));
        // consecutive client ports (one client, many connections) spread over the buckets
        let mut seen = [0u32; DR_BUCKETS as usize];
        for p in 0..4096u16 {
            seen[bucket_of(a, 32768 + p)] += 1;
        }
        let used = seen.iter().filter(|&&n| n > 0).count();
        assert!(used > 240, "only {used} buckets used");
        assert!(seen.iter().all(|&n| n < 48), "{:?}", seen.iter().max());
        // both halves of a two-realserver split get work from few connections
        let even = (0..40u16)
            .filter(|p| bucket_of(a, 50000 + p).is_multiple_of(2))
            .count();
        assert!((5..=35).contains(&even), "{even} of 40 even");
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert!(bucket_of(v6, 1) < DR_BUCKETS as usize);
    }
}
