//! The read-through cache tier.
