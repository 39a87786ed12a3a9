//! Kernel capability probing (temporary placeholder; replaced by the nft back-end branch).
#[derive(Debug, Clone, Default)]
pub struct Caps {
    pub meta_broute: bool,
}
impl std::fmt::Display for Caps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "  (not probed)")
    }
}
pub fn probe() -> Caps {
    Caps::default()
}
