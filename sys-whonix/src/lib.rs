//! sys-whonix: the Tor gateway of anonymous qubes, with an embedded arti client.
//!
//! - [`tor`]: the Tor client (arti), its configuration (the public network, or a private one
//!   named by its authorities and fallback caches, for tests), bootstrap with progress, and
//!   streams and lookups on per-client isolation tokens;
//! - [`gateway`]: client TCP ended in smoltcp and carried over Tor, DNS through Tor, the rest
//!   dropped; run by the shared router loop (crate `qubes-router`, role sys-whonix) in place
//!   of forwarding;
//! - [`dns`] and [`onion`]: the virtual resolvers' messages and the per-client `.onion`
//!   address maps;
//! - [`wake`]: how the Tor side's tasks wake the router loop.

pub mod dns;
pub mod gateway;
pub mod onion;
pub mod tor;
pub mod wake;
