//! Kernel capability probing (placeholder until it lands).
