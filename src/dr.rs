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

use crate::policy::DivertRule;

/// How many hash buckets a `dr` rule deals out to its realservers. Far more than realservers,
/// so that a dead realserver's share can be spread over all the others.
pub const DR_BUCKETS: u32 = 256;

/// Seed of the `dr` flow hash. Fixed, so a reload (or a restart) sends every connection to
/// the same realserver as before as long as the realserver list is unchanged.
pub const DR_HASH_SEED: u32 = 0x6272_6476; // "brdv"

/// The health-check key of realserver `i` (0-based) of `dr` rule `rule`: `rule/i+1`. Rule names
/// cannot hold '/', so [`parse_check_key`] splits it back.
pub fn dr_check_key(rule: &str, i: usize) -> String {
    format!("{rule}/{}", i + 1)
}

/// (rule name, realserver index) of a health-check key; no index for a rule's own check.
pub fn parse_check_key(key: &str) -> (&str, Option<usize>) {
    match key.split_once('/') {
        Some((rule, n)) => (rule, n.parse::<usize>().ok().and_then(|n| n.checked_sub(1))),
        None => (key, None),
    }
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

/// The MAC of each bucket of `dr` rule `r` ([`DR_BUCKETS`] entries): realservers with a known
/// MAC (given, or learned: `neighbours`) that are not `down` (health-check keys,
/// [`dr_check_key`]) take new flows. When every realserver with a MAC is down, they all keep
/// their buckets (a check failing everywhere is more likely the checker's own problem than
/// every realserver's); realservers without a MAC never get a bucket, and with no MAC known
/// at all every bucket is `None` (the rule's frames are bridged untouched).
pub fn bucket_macs(
    r: &DivertRule,
    neighbours: &BTreeMap<IpAddr, [u8; 6]>,
    down: &BTreeSet<String>,
) -> Vec<Option<[u8; 6]>> {
    let macs: Vec<Option<[u8; 6]>> = r
        .realservers
        .iter()
        .map(|rs| {
            rs.mac
                .or_else(|| rs.address.and_then(|a| neighbours.get(&a).copied()))
        })
        .collect();
    let up: Vec<bool> = (0..macs.len())
        .map(|i| macs[i].is_some() && !down.contains(&dr_check_key(&r.name, i)))
        .collect();
    let usable = if up.iter().any(|u| *u) {
        up
    } else {
        macs.iter().map(Option::is_some).collect()
    };
    dr_assignment(&usable)
        .into_iter()
        .map(|i| i.and_then(|i| macs[i]))
        .collect()
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

    #[test]
    fn check_keys_round_trip() {
        assert_eq!(parse_check_key(&dr_check_key("vip", 0)), ("vip", Some(0)));
        assert_eq!(parse_check_key("web"), ("web", None));
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
