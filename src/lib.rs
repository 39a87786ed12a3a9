//! brdivert: a transparent bridge that diverts selected IP flows into the host's own stack.
//!
//! Data flows through the modules in this order (see docs/architecture.md):
//! `settings` + `rules` -> `policy` (validated model) -> `nft::compile` -> `nft::netlink`
//! (apply) / `nft::render` (text); `link` sets up the bridge, ports and policy routing;
//! `probe` says what the running kernel can do; `lab` builds the namespace lab.

pub mod classify;
pub mod cli;
pub mod datapath;
pub mod diag;
pub mod lab;
pub mod link;
pub mod nft;
pub mod ops;
pub mod policy;
pub mod probe;
pub mod rules;
pub mod settings;
