//! netlink back end (temporary placeholder; replaced by the nft back-end branch).
use super::{Family, Ruleset};
pub fn apply(_rs: &Ruleset) -> anyhow::Result<()> {
    anyhow::bail!("netlink back end not merged yet")
}
pub fn delete_tables(_f: &[Family], _name: &str) -> anyhow::Result<()> {
    anyhow::bail!("netlink back end not merged yet")
}
