//! The Qubes OS per-qube firewall rule language, byte-compatible with upstream.
//!
//! One crate for everything dom0, `qvm-firewall` and the service qubes agree on:
//!
//! - [`rule`]: dom0's rule model and validation, and its QubesDB / admin-API / XML forms;
//! - [`firewall`]: a qube's rule list as dom0 keeps it: admin-API payloads, QubesDB entries;
//! - [`client`]: the admin client's model, used by `qvm-firewall` (its order, its table);
//! - [`store`]: a directory laid out like dom0's `/var/lib/qubes`;
//! - [`agent`]: the netvm agent's reading of QubesDB rule entries;
//! - [`xml`]: dom0's `firewall.xml` (v2 written byte-exact, v2 and v1 read);
//! - [`yaml`]: YAML rule files for people and the lab (docs/rule-files.md);
//! - [`nft`]: the agent's nftables text, byte-exact;
//! - [`classifier`]: a compiled first-match classifier for the userspace data plane;
//!
//! Reference: qubes-core-admin `qubes/firewall.py`, qubes-core-admin-client
//! `qubesadmin/firewall.py`, qubes-core-agent-linux `qubesagent/firewall.py`.

pub mod agent;
pub mod classifier;
pub mod client;
pub mod firewall;
pub mod nft;
pub mod py;
pub mod rule;
pub mod store;
pub mod xml;
#[cfg(feature = "yaml")]
pub mod yaml;

pub use agent::{AgentRule, MatchDst, MatchRule, RuleParseError};
pub use rule::{Action, DstAddr, DstHost, DstPorts, Expire, Family, Proto, Rule, RuleError};
