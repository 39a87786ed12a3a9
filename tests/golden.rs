//! Golden files: the nft text each example rule file compiles to.
//! Regenerate after an intended change with `BRDIVERT_BLESS=1 cargo test --test golden`
//! and review the diff.

use std::path::{Path, PathBuf};

use brdivert::nft::compile::{Target, compile};
use brdivert::nft::render::render;
use brdivert::policy::{Context, Policy};
use brdivert::rules;

fn examples() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut v: Vec<PathBuf> = std::fs::read_dir(root.join("rules"))
        .expect("rules/ exists")
        .map(|e| e.expect("readable").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    assert!(v.len() >= 3, "the example rule files are missing");
    v
}

fn rendered(path: &Path) -> String {
    let file = rules::read(path).unwrap_or_else(|e| panic!("{e}"));
    let ctx = Context {
        ports: Some(vec!["eth0".into(), "eth1".into()]),
        mark_mask: 0x00ff_0000,
    };
    let policy = Policy::build(&[file], &ctx).unwrap_or_else(|e| panic!("{e}"));
    let target = Target {
        bridge_mac: [0x02, 0, 0, 0, 0, 0xfe],
        mark_mask: 0x00ff_0000,
        queue: Default::default(),
    };
    render(&compile(&policy, &target))
}

fn check_golden(name: &str, got: &str) {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("BRDIVERT_BLESS").is_some() {
        std::fs::write(&golden, got).expect("write golden file");
        return;
    }
    let want = std::fs::read_to_string(&golden)
        .unwrap_or_else(|_| panic!("{} missing: run with BRDIVERT_BLESS=1", golden.display()));
    assert_eq!(
        got, want,
        "render of {name} changed; if intended, re-bless and review"
    );
}

#[test]
fn examples_render_as_golden() {
    for p in examples() {
        let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
        check_golden(&format!("{stem}.nft"), &rendered(&p));
    }
}
