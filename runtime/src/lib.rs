//! What the service qube daemons (sys-firewall, sys-net, sys-whonix) share around the
//! engine: where configuration comes from, how a running service is asked and told things,
//! its event loop's pieces, and its own network endpoints.
//!
//! | module | job |
//! |---|---|
//! | [`config_file`] | the YAML configuration file: one schema for the services and replay |
//! | [`source`] | configuration sources (YAML file, QubesDB) feeding one [`source::Desired`] |
//! | [`qubesdb_source`] | the QubesDB daemon with Qubes' commit protocol and the handled counter |
//! | [`control`] | the control socket: server and client |
//! | [`signals`] | SIGTERM/SIGINT stop, SIGHUP reloads |
//! | [`event_loop`] | `poll(2)` over descriptors found by token |
//! | [`droplog`] | rate-limited drop logging |
//! | [`hoststack`] | the host stack (smoltcp) behind the engine's local delivery |
//! | [`dhcp`] | a sans-IO DHCPv4 client for the uplink, driven by the engine's time |
//! | [`resolver`] | a sans-IO stub resolver driven by the engine's time |
//! | [`local`] | the engine, host stack and resolver wired together |
//! | [`memory`] | the connection table's default size from the machine's memory, as Linux's |
//! | [`pid1`] | PID 1 in an image: mounts, modules, NICs up, the command line, power off |
//! | [`error`] | the errors that stop a service or refuse a configuration |

pub mod config_file;
pub mod control;
pub mod dhcp;
pub mod droplog;
pub mod error;
pub mod event_loop;
pub mod hoststack;
pub mod local;
pub mod memory;
pub mod pid1;
pub mod qubesdb_source;
pub mod resolver;
pub mod signals;
pub mod source;

pub use error::{ConfigError, ServiceError};
