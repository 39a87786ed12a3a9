//! The network-namespace lab (placeholder until it lands).
