//! Upstreams added and removed at run time through the handle.
