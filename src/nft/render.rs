//! nft text back end (owned by the nft back-end work; placeholder until it lands).
use super::Ruleset;

/// The ruleset as nft text, as `nft list table` prints it.
pub fn render(_rs: &Ruleset) -> String {
    todo!("nft::render")
}
