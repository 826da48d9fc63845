//! The router/firewall engine shared by the Qubes service qubes (sys-firewall, sys-net,
//! sys-whonix): a deterministic packet processor with no I/O and no clock of its own.
//!
//! [`engine::Engine`] is handed a frame, the interface it arrived on and the time
//! ([`time::Instant`]), and says what to send. Everything else (the daemons' event loops,
//! pcap replay, benchmarks, fuzzing) is a shell around it, so a replay test is exact and the
//! same code runs in the service, in the image and under test.
//!
//! | module | job |
//! |---|---|
//! | [`wire`] | views over frame bytes: Ethernet, IPv4/IPv6, TCP/UDP/ICMP, checksums |
//! | [`conntrack`] | the flow table and NAT port choice (seeded, bounded, Linux timeouts) |
//! | [`frag`] | IPv4 reassembly with bounded memory, and fragmentation |
//! | [`tcpwin`] | TCP flag validity and window tracking, as Linux conntrack's |
//! | [`ratelimit`] | ICMP error rate limits, global and per destination, as Linux's |
//! | [`config`] | what the engine is told: uplink, clients, limits; built from the QubesDB tree |
//! | [`engine`] | the packet path: ARP/NDP, anti-spoofing, rules, NAT, ICMP, local delivery |
//! | [`time`] | the engine's typed monotonic time |

#![forbid(unsafe_code)]

pub mod config;
pub mod conntrack;
pub mod engine;
pub mod frag;
pub mod ratelimit;
pub mod tcpwin;
pub mod time;
pub mod wire;

pub use engine::{Engine, Event, IfaceId, MtuError, Offload, Outbox, Reason, Verdict, UPLINK};
pub use time::Instant;
