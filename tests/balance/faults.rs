//! Killed, restarted and black-holed origins.
