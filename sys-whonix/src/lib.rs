//! sys-whonix: the Tor gateway of anonymous qubes, with an embedded arti client.
//!
//! This crate grows in steps (tracker issue 10). Today it holds [`tor`]: the Tor client, its
//! configuration (the public network, or a private one named by its authorities and fallback
//! caches, for tests), bootstrap with progress reporting, and streams with per-client
//! isolation.

pub mod tor;
