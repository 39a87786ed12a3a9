//! A repeatable timing of loading the bench policy (issue 2: apply of a 10,000-VIP policy in
//! at most 15 ms). Ignored by default, and only meaningful in release:
//!
//! `cargo test --release --lib policy::bench -- --ignored --nocapture`
//!
//! (`BRDIVERT_BENCH_N` sets the number of rounds, 60 by default.)
//!
//! The rule file has the shape of `bench/kernel_lib.py gen-vips FILE 10000 100` (one `local`
//! rule, 10,000 scattered /32 VIPs in `dst`, 100 `except_src`); set
//! `BRDIVERT_BENCH_RULES=FILE` to time that very file instead.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::*;

/// Same shape as `gen_vips` in bench/kernel_lib.py: sorted, scattered, never-adjacent /32s
/// (even offsets) from 100.64.0.0/10, exemptions from 198.18.0.0/15.
fn gen_vips(n_vips: usize, n_except: usize) -> String {
    let mut seed = 2u64;
    let mut offsets = |span: u32, n: usize| {
        let mut v = std::collections::BTreeSet::new();
        while v.len() < n {
            // xorshift: deterministic and dependency-free
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            v.insert(2 + 2 * (seed % u64::from(span / 2 - 2)) as u32);
        }
        v
    };
    let fmt = |base: u32, offs: &std::collections::BTreeSet<u32>| {
        let mut s = String::new();
        for o in offs {
            let _ = writeln!(s, "  \"{}\",", std::net::Ipv4Addr::from(base + o));
        }
        s
    };
    let vips = fmt(0x6440_0000, &offsets(1 << 22, n_vips));
    let ex = fmt(0xc612_0000, &offsets(1 << 17, n_except));
    format!(
        "# generated: {n_vips} VIP /32s, {n_except} exempted sources\n\
         [[divert]]\nname = \"vips\"\naction = \"local\"\n\
         dst = [\n{vips}]\nexcept_src = [\n{ex}]\n"
    )
}

/// CPU time of this thread: the machine is shared, and wall time swings with the other load.
fn cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill in.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Times `f` in thread CPU time.
fn cpu<T>(out: &mut Vec<Duration>, f: impl FnOnce() -> T) -> T {
    let t = cpu_now();
    let v = f();
    out.push(cpu_now() - t);
    v
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[test]
#[ignore = "timing; run in release with --ignored --nocapture"]
fn load_10k_vips() {
    let n: usize = std::env::var("BRDIVERT_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let dir = tempfile::tempdir().unwrap();
    let rules_path = dir.path().join("rules-vips.toml");
    match std::env::var_os("BRDIVERT_BENCH_RULES") {
        Some(p) => std::fs::copy(p, &rules_path).map(drop),
        None => std::fs::write(&rules_path, gen_vips(10_000, 100)),
    }
    .unwrap();
    let settings_path = dir.path().join("brdivert.toml");
    std::fs::write(
        &settings_path,
        "rules = [\"rules-vips.toml\"]\n[bridge]\nports = [\"eth0\", \"eth1\"]\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(&rules_path).unwrap();
    let ctx = Context {
        ports: Some(vec!["eth0".into(), "eth1".into()]),
        mark_mask: 0x00ff_0000,
    };

    let (mut parse, mut build, mut settings, mut load, mut wall) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..n {
        let f = cpu(&mut parse, || rules::parse(&rules_path, text.clone())).unwrap();
        let p = cpu(&mut build, || Policy::build(std::slice::from_ref(&f), &ctx)).unwrap();
        assert_eq!(
            p.rules[0].dst.restricts(Family::V4).unwrap().v4.len(),
            10_000
        );
        assert_eq!(p.rules[0].except_src.v4.len(), 100);

        cpu(&mut settings, || Settings::load(&settings_path)).unwrap();
        // the whole of what `apply` does before it touches the kernel
        let t = Instant::now();
        let (_, p) = cpu(&mut load, || crate::ops::load(&settings_path)).unwrap();
        wall.push(t.elapsed());
        assert_eq!(p.rules.len(), 1);
    }
    println!(
        "load_10k_vips, median of {n}, thread CPU time: rules::parse {:.2} ms, \
         Policy::build {:.2} ms, Settings::load {:.2} ms, ops::load {:.2} ms (wall {:.2} ms)",
        ms(median(parse)),
        ms(median(build)),
        ms(median(settings)),
        ms(median(load)),
        ms(median(wall))
    );
}
