//! policy -> nft model (placeholder until it lands).
