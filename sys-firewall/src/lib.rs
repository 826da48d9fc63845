//! sys-firewall: each client qube's Qubes firewall rules, NAT and anti-spoofing, as the
//! shared engine ([`qubes_engine`]) does them, in two shells:
//!
//! - [`service`]: `sys-firewall run`, the engine on real interfaces (vif-backend devices,
//!   the shared runtime's configuration sources, control socket and host stack);
//! - [`replay`]: `sys-firewall replay`, a pcapng capture through the engine, byte-exact.

pub mod replay;
pub mod service;
