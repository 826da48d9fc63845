//! The Qubes OS per-qube firewall rule language, byte-compatible with upstream.
//!
//! One crate for everything dom0, `qvm-firewall` and the service qubes agree on:
//!
//! - [`rule`]: dom0's rule model and validation, and its QubesDB / admin-API / XML forms;
//! - [`agent`]: the netvm agent's reading of QubesDB rule entries;
//!
//! Reference: shared/reference/qubes-networking.md sections 1-3 and 7.

pub mod agent;
pub mod py;
pub mod rule;

pub use agent::{AgentRule, MatchDst, MatchRule, RuleParseError};
pub use rule::{Action, DstAddr, DstHost, DstPorts, Expire, Family, Proto, Rule, RuleError};
