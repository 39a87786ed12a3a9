//! brdivert: a transparent bridge that diverts selected IP flows into the host's own stack.
//!
//! Data flows through the modules in this order (see docs/architecture.md):
//! `settings` + `rules` -> `policy` (validated model) -> `nft::compile` -> `nft::netlink`
//! (apply) / `nft::render` (text); `link` sets up the bridge, ports and policy routing;
//! `probe` says what the running kernel can do; `lab` builds the namespace lab.
//! `classify` evaluates the same policy in Rust for `datapath` (the userspace datapath);
//! `daemon` (`brdivert run`) serves reloads, health, status and metrics; `queue` is the
//! NFQUEUE engine.

pub mod classify;
pub mod cli;
pub mod daemon;
pub mod datapath;
pub mod diag;
pub mod dr;
pub mod lab;
pub mod link;
pub mod nft;
pub mod ops;
pub mod policy;
pub mod probe;
pub mod queue;
pub mod rules;
pub mod settings;

#[cfg(test)]
pub(crate) mod fuzz;
