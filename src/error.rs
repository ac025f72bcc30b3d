//! Errors shared by the parts of the crate.
//!
//! Each part keeps its own error enum next to its code (for example
//! [`crate::cache::BuildError`]); this module holds the ones that cross parts.

use std::time::Duration;

/// A configuration value that a builder refused.
///
/// Builders validate in `build()` and return this error instead of
/// panicking on a zero capacity, a zero TTL, a missing primary and the like.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A size or count that must be positive was zero.
    #[error("`{field}` must be greater than zero; set it to at least 1")]
    Zero {
        /// The builder setting that was zero.
        field: &'static str,
    },
    /// A duration that must be positive was zero.
    #[error("`{field}` must be a positive duration, got {value:?}")]
    ZeroDuration {
        /// The builder setting that was zero.
        field: &'static str,
        /// The value given.
        value: Duration,
    },
    /// A value was outside the range the setting accepts.
    #[error("`{field}` is out of range: {reason}")]
    OutOfRange {
        /// The builder setting.
        field: &'static str,
        /// What the accepted range is.
        reason: String,
    },
}
