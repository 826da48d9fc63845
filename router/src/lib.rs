//! The service loop of the router qubes: the engine ([`qubes_engine`]) on real interfaces
//! (vif-backend devices), fed by the shared runtime's configuration sources, with link events,
//! the control socket and the host stack. sys-firewall and sys-net are thin binaries over
//! [`service::run`], differing in their [`service::Role`]: where the uplink's address comes
//! from.

pub mod cli;
pub mod service;
