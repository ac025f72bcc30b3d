//! Per-upstream metrics.
