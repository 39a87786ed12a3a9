//! The network-namespace lab (temporary placeholder; replaced by the lab branch).
use std::path::Path;
pub fn up(_exe: &Path) -> anyhow::Result<()> {
    anyhow::bail!("lab not merged yet")
}
pub fn down(_prefix: &str) -> anyhow::Result<()> {
    anyhow::bail!("lab not merged yet")
}
pub fn demo(_exe: &Path) -> anyhow::Result<()> {
    anyhow::bail!("lab not merged yet")
}
