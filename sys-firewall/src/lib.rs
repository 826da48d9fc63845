//! sys-firewall: each client qube's Qubes firewall rules, NAT and anti-spoofing, as the
//! shared engine ([`qubes_engine`]) does them, in two shells:
//!
//! - [`service`]: `sys-firewall run`, the router service loop (crate `qubes-router`) in its
//!   firewall role: the engine on real interfaces;
//! - [`replay`]: `sys-firewall replay`, a pcapng capture through the engine, byte-exact.

pub mod replay;
pub use qubes_router::service;
