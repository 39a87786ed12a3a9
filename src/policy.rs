//! The validated policy model (placeholder until it lands).
