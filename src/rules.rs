//! Rule files (placeholder until it lands).
