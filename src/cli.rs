//! Command line (placeholder until it lands).
pub fn main() -> i32 {
    0
}
