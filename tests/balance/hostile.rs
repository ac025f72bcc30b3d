//! Hostile or odd requests.
