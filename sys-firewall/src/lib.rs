//! sys-firewall: the router/firewall engine of the Qubes service qubes, and its shells.
//!
//! The heart is [`engine::Engine`], a deterministic packet processor with no I/O and no clock
//! of its own: it is handed a frame, the interface it arrived on and the time, and says what to
//! send. Everything else (the daemon loop, pcap replay, benchmarks, fuzzing) is a thin shell
//! around it, so a replay test is exact and the same code runs everywhere.

pub mod config;
pub mod conntrack;
pub mod dns;
pub mod engine;
pub mod frag;
pub mod offload;
pub mod qdb_source;
pub mod replay;
pub mod service;
pub mod sys;
pub mod wire;
