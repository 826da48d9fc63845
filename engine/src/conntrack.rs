//! Connection tracking and source NAT for client flows.
//!
//! Every flow a client opens toward the uplink gets one entry here: the key as the client sent
//! it ([`FlowKey`]), the port (or ICMP query id) we rewrote its source to, and enough of a TCP
//! state machine to pick Linux's timeouts. Replies coming back on the uplink are matched by
//! their [`ReplyKey`] (remote address and port plus our translated port), which is how the
//! engine both lets them through and undoes the NAT.
//!
//! Like the rest of the engine the table is pure: no clock, no I/O, no hidden randomness. The
//! time is passed in as `now` (nanoseconds) and NAT ports come from a PRNG seeded at
//! construction, so a replay with the same seed makes exactly the same choices while a service
//! run (random seed) gets unpredictable ports.
//!
//! # Layout
//!
//! - Flows live in a slab (`Vec<Slot>`); a [`FlowId`] is the slot index. Freed slots go on a
//!   LIFO free list, so ids are a deterministic function of the call sequence. An id is only
//!   meaningful until its flow is removed (expired, evicted, cut): the slot is then reused.
//! - Two hash indexes map [`FlowKey`] and [`ReplyKey`] to ids. They are only ever probed, never
//!   iterated, so hash order can't leak into anything observable.
//! - A binary min-heap of timers, one per flow, indexed (each slot knows its heap position). A
//!   timer's deadline is a lower bound of the flow's `expires_at`: refreshing a flow (every
//!   packet) only writes `expires_at`, and [`ConnTrack::expire`] re-arms a timer it finds early.
//!   Only a shortened timeout (RST, FIN, TCP state changes) moves a timer, by a sift-up. So the
//!   hot path does no heap work, and `expire` costs O(log n) per removed or re-armed flow, each
//!   flow being re-armed at most once per timeout period.
//! - Per client, three intrusive FIFO lists of its flows by eviction class, oldest first:
//!   never replied; replied but not assured, or closing; assured. A flow moves (to the tail of
//!   its new list) only when its class changes, which the established path never does.
//!
//! # Sharing the table between clients
//!
//! Clients are untrusted and several may be hostile at once, so "evict the oldest unanswered
//! flow" is not enough: flows that were answered but never completed (a SYN flood against a
//! port that answers, the client suppressing its own resets) would fill the table for good.
//! While there is room anyone may create flows (the table is not partitioned). When it is
//! full, each *active* client (one holding flows, plus the one asking) has a fair share,
//! `max(reserve, max_flows / active)`, where the reserve is `max_flows / 64` clamped to
//! 1..=256, a floor for when there are very many clients:
//!
//! - a client at or above its share makes room from its own flows only: its oldest never
//!   replied flow, else its oldest replied-but-unassured or closing flow; its assured flows are
//!   kept and the new flow is refused ([`TableFull`]), as Linux's `early_drop` never drops an
//!   assured entry (net/netfilter/nf_conntrack_core.c);
//! - a client below its share takes the place of a flow of the client holding the most flows
//!   (lowest id on a tie), provided that client is over its share: its oldest never replied
//!   flow, else its oldest unassured or closing flow, else its oldest assured flow.
//!
//! So a client is never evicted from while it is within its share, and a client below its
//! share can always get a flow into a full table, however many clients flood it. Finding the
//! fullest client scans the active clients (a few dozen vifs at most), and only when the
//! table is full and a client below its share asks; everything else is O(1).
//!
//! # Hashing
//!
//! Clients are untrusted, and a client chooses most of a [`FlowKey`] (ports, destination, and
//! with IPv6 128 free bits of address). With an unkeyed hash such as FxHash it can precompute
//! keys that all land in one bucket chain and turn every lookup into a scan of the table, which
//! would stall forwarding for every other qube. So the indexes use a small keyed hash (a
//! folded 64x64->128 multiply per word, as in wyhash/foldhash) whose keys are derived from the
//! table's seed: as fast as FxHash for these two- and three-word keys, but collisions cannot be
//! computed offline. The hash never influences anything observable, so determinism is kept.
//!
//! # TCP state machine
//!
//! A simplified version of Linux's `nf_conntrack_proto_tcp.c`; flag validity and window
//! tracking are in [`crate::tcpwin`], checked by the engine before a packet is accounted here.
//! The flags byte is classified, first match wins: RST, SYN (with or without ACK), FIN, ACK,
//! none.
//!
//! | event                        | from                      | to                       |
//! |------------------------------|---------------------------|--------------------------|
//! | RST, either direction        | any state                 | `Close`                  |
//! | SYN (no ACK), original       | `TimeWait`, `Close`       | `SynSent`, flow reopened |
//! | SYN+ACK, reply               | `SynSent`                 | `SynRecv`                |
//! | FIN, either direction        | `Established`, `SynRecv`  | `FinWait` (records who)  |
//! | FIN from the other side      | `FinWait`, `CloseWait`    | `LastAck`                |
//! | ACK from the other side      | `FinWait`                 | `CloseWait`              |
//! | ACK, original                | `SynRecv`                 | `Established`            |
//! | ACK, either direction        | `LastAck`                 | `TimeWait`               |
//! | anything else                | any state                 | unchanged                |
//!
//! A flow is created (first packet, original direction) in `SynSent` for a SYN without ACK, in
//! `Close` for a RST, and otherwise by Linux's loose pickup (`nf_conntrack_tcp_loose=1`) of a
//! connection that was open before we started: `Established`, with the packet applied (so a
//! FIN starts it in `FinWait`). Creation accounts the first packet, so an `update` with the same
//! packet right after `create` changes nothing but `last_seen`.
//!
//! "The other side" is the direction that did not send the first FIN. A reopened flow (a new
//! SYN on a closed one, as when a client reuses its port) starts over as a new connection:
//! `replied`, `assured` cleared, `created` reset, NAT port kept.
//!
//! `replied` is set by the first reply-direction packet. TCP flows become `assured` once they
//! are `Established` and have seen a reply (Linux: `IPS_ASSURED` on entering ESTABLISHED with
//! `IPS_SEEN_REPLY`); UDP and ICMP flows once they have seen a reply. Assured flows are
//! evicted only to make room for a client below its fair share (above).
//!
//! Every packet of a flow sets `expires_at = now + timeout(state)`, with the timeouts below.
//! One deliberate addition to the plain state table: an `Established` flow that has never seen a
//! reply (only possible through loose pickup) gets [`TCP_TIMEOUT_UNACKNOWLEDGED`] (300 s)
//! instead of five days, so a client cannot park one-sided "connections" for days; the first
//! reply gives it the full ESTABLISHED timeout.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr};

use crate::tcpwin::{self, Segment, TcpWindows};

/// TCP flag bits, as in the TCP header's flags byte.
pub const TCP_FIN: u8 = 0x01;
/// See [`TCP_FIN`].
pub const TCP_SYN: u8 = 0x02;
/// See [`TCP_FIN`].
pub const TCP_RST: u8 = 0x04;
/// See [`TCP_FIN`].
pub const TCP_PSH: u8 = 0x08;
/// See [`TCP_FIN`].
pub const TCP_ACK: u8 = 0x10;

const SEC: u64 = 1_000_000_000;

/// `nf_conntrack_tcp_timeout_syn_sent`: 120 s.
pub const TCP_TIMEOUT_SYN_SENT: u64 = 120 * SEC;
/// `nf_conntrack_tcp_timeout_syn_recv`: 60 s.
pub const TCP_TIMEOUT_SYN_RECV: u64 = 60 * SEC;
/// `nf_conntrack_tcp_timeout_established`: 432000 s (5 days).
pub const TCP_TIMEOUT_ESTABLISHED: u64 = 432_000 * SEC;
/// `nf_conntrack_tcp_timeout_fin_wait`: 120 s.
pub const TCP_TIMEOUT_FIN_WAIT: u64 = 120 * SEC;
/// `nf_conntrack_tcp_timeout_close_wait`: 60 s.
pub const TCP_TIMEOUT_CLOSE_WAIT: u64 = 60 * SEC;
/// `nf_conntrack_tcp_timeout_last_ack`: 30 s.
pub const TCP_TIMEOUT_LAST_ACK: u64 = 30 * SEC;
/// `nf_conntrack_tcp_timeout_time_wait`: 120 s.
pub const TCP_TIMEOUT_TIME_WAIT: u64 = 120 * SEC;
/// `nf_conntrack_tcp_timeout_close`: 10 s.
pub const TCP_TIMEOUT_CLOSE: u64 = 10 * SEC;
/// `nf_conntrack_tcp_timeout_unacknowledged`: 300 s. Used here for an `Established` flow that
/// has never seen a reply (loose pickup), see the module docs.
pub const TCP_TIMEOUT_UNACKNOWLEDGED: u64 = 300 * SEC;
/// `nf_conntrack_udp_timeout`: 30 s, until the flow has seen a reply.
pub const UDP_TIMEOUT: u64 = 30 * SEC;
/// `nf_conntrack_udp_timeout_stream`: 120 s, once the flow has seen a reply.
pub const UDP_TIMEOUT_STREAM: u64 = 120 * SEC;
/// `nf_conntrack_icmp_timeout` and `nf_conntrack_icmpv6_timeout`: 30 s.
pub const ICMP_TIMEOUT: u64 = 30 * SEC;
/// `nf_conntrack_generic_timeout`: 600 s, for protocols without a tracker of their own.
pub const GENERIC_TIMEOUT: u64 = 600 * SEC;
/// GRE (nf_conntrack_proto_gre.c `GRE_TIMEOUT`, `GRE_STREAM_TIMEOUT`): 30 s, then 180 s once
/// replied.
pub const GRE_TIMEOUT: u64 = 30 * SEC;
/// See [`GRE_TIMEOUT`].
pub const GRE_TIMEOUT_STREAM: u64 = 180 * SEC;

/// The timeout of an [`L4::Other`] flow.
fn other_timeout(proto: u8, replied: bool) -> u64 {
    match (proto, replied) {
        (47, false) => GRE_TIMEOUT,
        (47, true) => GRE_TIMEOUT_STREAM,
        _ => GENERIC_TIMEOUT,
    }
}

/// Random NAT port draws before falling back to a scan of the whole range. With the range
/// 90% used, 16 draws all hit used ports with probability 0.9^16 = 18%; the scan then finds a
/// free port in a few steps on average, and proves exhaustion when there is none.
const NAT_RANDOM_TRIES: u32 = 16;

/// Table pre-sizing cap: memory for up to this many flows is reserved up front so the first
/// 65536 creates never reallocate; a larger `max_flows` grows by doubling.
const PRESIZE_CAP: usize = 65_536;

/// "No slot": end of a list, or no timer.
const NIL: u32 = u32::MAX;

/// The layer-4 protocol of a flow.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub enum L4 {
    Tcp,
    Udp,
    /// ICMPv4 or ICMPv6 query (echo); the query id takes the source port's place.
    Icmp,
    /// Any other IP protocol (GRE, ESP, AH, SCTP, IP-in-IP, 6in4, DCCP, ...), tracked as
    /// Linux's generic tracker does: by protocol and addresses. SCTP, DCCP and UDP-Lite keep
    /// their ports in the key (the first 4 bytes of their headers, see
    /// [`crate::wire::ports_of_other`]); their ports are never translated.
    Other(u8),
}

impl L4 {
    /// Two bits for the hashes; `Other` protocols share one (equality still tells them
    /// apart).
    fn tag(self) -> u64 {
        match self {
            L4::Tcp => 0,
            L4::Udp => 1,
            L4::Icmp => 2,
            L4::Other(_) => 3,
        }
    }
}

/// A flow as the client opened it (original direction, before NAT).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FlowKey {
    /// The client interface id.
    pub client: u32,
    pub l4: L4,
    /// The client's address.
    pub src: IpAddr,
    /// The remote address.
    pub dst: IpAddr,
    /// The client's source port, or the ICMP query id.
    pub sport: u16,
    /// The remote port; 0 for ICMP.
    pub dport: u16,
}

/// What comes back on the uplink, after our source NAT.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ReplyKey {
    pub l4: L4,
    /// The remote address; its family decides the table (IPv4 and IPv6 never match each other).
    pub remote: IpAddr,
    /// The remote port; 0 for ICMP.
    pub rport: u16,
    /// Our translated source port, or translated ICMP query id.
    pub nat_port: u16,
}

fn addr_bits(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u128::from(a.to_bits()),
        IpAddr::V6(a) => a.to_bits(),
    }
}

/// Hashes the fields packed into a few words (one hasher step each) rather than field by
/// field as `derive(Hash)` would (a dozen steps for the enum discriminants and address bytes).
/// Equal keys pack equally, so this agrees with the derived `Eq`.
impl Hash for FlowKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Interface ids are small, so the protocol can share the client's top bits.
        state.write_u64(
            ((u64::from(self.client) << 32)
                | (u64::from(self.sport) << 16)
                | u64::from(self.dport))
                ^ (self.l4.tag() << 62),
        );
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                state.write_u64((u64::from(s.to_bits()) << 32) | u64::from(d.to_bits()));
            }
            (s, d) => {
                state.write_u64(
                    (u64::from(s.is_ipv6()) << 2) | (u64::from(d.is_ipv6()) << 3) | (1 << 4),
                );
                state.write_u128(addr_bits(s));
                state.write_u128(addr_bits(d));
            }
        }
    }
}

/// Packed like [`FlowKey`]'s hash.
impl Hash for ReplyKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(
            self.l4.tag()
                | (u64::from(self.remote.is_ipv6()) << 2)
                | (u64::from(self.rport) << 16)
                | (u64::from(self.nat_port) << 32),
        );
        match self.remote {
            IpAddr::V4(a) => state.write_u64(u64::from(a.to_bits())),
            IpAddr::V6(a) => state.write_u128(a.to_bits()),
        }
    }
}

/// A tracked flow: an index into the table, valid until the flow is removed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct FlowId(pub u32);

/// The direction of a packet relative to its flow.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Dir {
    /// Client to remote, as the flow was opened.
    Original,
    /// Remote to client.
    Reply,
}

/// TCP connection states, named as in Linux conntrack. UDP and ICMP flows stay in `None`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum TcpState {
    None,
    SynSent,
    SynRecv,
    Established,
    FinWait,
    CloseWait,
    LastAck,
    TimeWait,
    Close,
}

/// A tracked flow.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Flow {
    pub key: FlowKey,
    /// Our translated source port (or ICMP query id) on the uplink.
    pub nat_port: u16,
    /// TCP state; `TcpState::None` for UDP and ICMP.
    pub tcp: TcpState,
    /// A reply-direction packet has been seen.
    pub replied: bool,
    /// The flow is a real two-way exchange; it is evicted only to make room for a client below
    /// its fair share (module docs).
    pub assured: bool,
    /// When the flow was created (or reopened, for TCP).
    pub created: u64,
    /// The last packet in either direction.
    pub last_seen: u64,
    /// The flow is gone at this time (absent for lookups at `now >= expires_at`).
    pub expires_at: u64,
    /// Where the flow really goes when it is not `key.dst`: a DNS query to a virtual resolver
    /// redirected to its upstream (sys-net, as `qubes-setup-dnat-to-ns` does). Replies come
    /// from here and are shown to the client as from `key.dst`.
    pub dnat: Option<Ipv4Addr>,
}

impl Flow {
    /// The remote end on the uplink: `key.dst`, or where DNS redirection sent the flow.
    pub fn remote(&self) -> IpAddr {
        self.dnat.map_or(self.key.dst, IpAddr::V4)
    }

    /// The key replies to this flow carry on the uplink. For ICMP the remote "port" is always
    /// 0, whatever the flow key's `dport` says.
    pub fn reply_key(&self) -> ReplyKey {
        ReplyKey {
            l4: self.key.l4,
            remote: self.remote(),
            rport: match self.key.l4 {
                L4::Icmp => 0,
                _ => self.key.dport,
            },
            nat_port: self.nat_port,
        }
    }
}

/// What [`ConnTrack::get`] returns for an id that is not live: an unreplied UDP flow between
/// unspecified addresses, expired at time 0.
pub static PLACEHOLDER_FLOW: Flow = Flow {
    key: FlowKey {
        client: u32::MAX,
        l4: L4::Udp,
        src: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        dst: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        sport: 0,
        dport: 0,
    },
    nat_port: 0,
    tcp: TcpState::None,
    replied: false,
    assured: false,
    created: 0,
    last_seen: 0,
    expires_at: 0,
    dnat: None,
};

/// No room for a new flow: the table is at `max_flows` and nothing may be evicted for this
/// client (module docs, "Sharing the table"), or every NAT port toward that remote address and
/// port is taken.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TableFull;

impl fmt::Display for TableFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection table full")
    }
}

impl std::error::Error for TableFull {}

/// splitmix64: tiny, fast and statistically good enough to pick ports; its whole state is the
/// seed, which is what makes replay exact.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-enough in `0..n` (`n <= 2^32`) by multiply-shift, no division.
    fn below(&mut self, n: u32) -> u32 {
        (((self.next_u64() >> 32) * u64::from(n)) >> 32) as u32
    }
}

fn folded_multiply(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

/// Keyed hasher for the indexes (see the module docs, "Hashing").
#[derive(Clone, Debug)]
struct KeyedState {
    k0: u64,
    k1: u64,
}

impl KeyedState {
    fn from_seed(seed: u64) -> Self {
        // A stream distinct from the NAT port stream, which starts at `seed` itself.
        let mut g = SplitMix64(seed ^ 0x6a09_e667_f3bc_c908);
        KeyedState {
            k0: g.next_u64(),
            k1: g.next_u64() | 1,
        }
    }
}

impl BuildHasher for KeyedState {
    type Hasher = KeyedHasher;

    fn build_hasher(&self) -> KeyedHasher {
        KeyedHasher {
            acc: self.k0,
            k: self.k1,
        }
    }
}

#[derive(Debug)]
struct KeyedHasher {
    acc: u64,
    k: u64,
}

impl Hasher for KeyedHasher {
    fn finish(&self) -> u64 {
        self.acc
    }

    fn write_u64(&mut self, x: u64) {
        self.acc = folded_multiply(self.acc ^ x, self.k);
    }

    fn write_u128(&mut self, x: u128) {
        self.write_u64(x as u64);
        self.write_u64((x >> 64) as u64);
    }

    fn write_u8(&mut self, x: u8) {
        self.write_u64(u64::from(x));
    }

    fn write_u16(&mut self, x: u16) {
        self.write_u64(u64::from(x));
    }

    fn write_u32(&mut self, x: u32) {
        self.write_u64(u64::from(x));
    }

    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.write_u64(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.write_u64(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 59));
        }
    }
}

/// One slab entry. A dead slot keeps its last flow's bytes; `live` says whether it counts.
#[derive(Clone, Debug)]
struct Slot {
    flow: Flow,
    /// Position of this flow's timer in `ConnTrack::timers`.
    heap_pos: u32,
    /// Links in its client's list for `class` while live; `next` chains the free list while
    /// dead.
    prev: u32,
    next: u32,
    /// Eviction class, the index of the client list the flow is on (see [`flow_class`]).
    class: u8,
    /// Who sent the first FIN (TCP only).
    fin_dir: Option<Dir>,
    live: bool,
    /// TCP window tracking (crate::tcpwin), both directions.
    win: TcpWindows,
}

/// Eviction classes, in the order a client's flows are given up: never replied.
const CLASS_UNREPLIED: u8 = 0;
/// Replied but not assured (a handshake never completed), or closing.
const CLASS_UNASSURED: u8 = 1;
/// Assured and not closing.
const CLASS_ASSURED: u8 = 2;

/// The eviction class of a flow (module docs, "Sharing the table").
fn flow_class(f: &Flow) -> u8 {
    use TcpState as S;
    if !f.replied {
        CLASS_UNREPLIED
    } else if !f.assured
        || matches!(
            f.tcp,
            S::FinWait | S::CloseWait | S::LastAck | S::TimeWait | S::Close
        )
    {
        // Closing connections are what Linux's `early_drop` prefers too (`tcp_can_early_drop`
        // in net/netfilter/nf_conntrack_proto_tcp.c).
        CLASS_UNASSURED
    } else {
        CLASS_ASSURED
    }
}

/// A FIFO of slot ids, linked through the slots' `prev`/`next`.
#[derive(Clone, Copy, Debug)]
struct List {
    head: u32,
    tail: u32,
}

const EMPTY_LIST: List = List {
    head: NIL,
    tail: NIL,
};

/// One client's share of the table: how many flows it holds, and its eviction lists by class.
#[derive(Clone, Copy, Debug)]
struct ClientFlows {
    n: u32,
    lists: [List; 3],
}

/// The floor of a client's fair share for a table of `max_flows` (module docs).
fn reserve_for(max_flows: usize) -> usize {
    (max_flows / 64).clamp(1, 256)
}

/// A heap entry: `at` is a lower bound of the flow's `expires_at`.
#[derive(Clone, Copy, Debug)]
struct Timer {
    at: u64,
    id: u32,
}

impl Timer {
    /// Ties broken by id, so the heap's shape depends on nothing but the call sequence.
    fn before(self, other: Timer) -> bool {
        (self.at, self.id) < (other.at, other.id)
    }
}

/// The connection-tracking and source-NAT table. See the module docs.
#[derive(Clone)]
pub struct ConnTrack {
    slots: Vec<Slot>,
    free_head: u32,
    len: usize,
    max_flows: usize,
    orig: HashMap<FlowKey, u32, KeyedState>,
    reply: HashMap<ReplyKey, u32, KeyedState>,
    timers: Vec<Timer>,
    rng: SplitMix64,
    /// Live flows per client and their eviction lists (client ids are ours, not a client's).
    /// A client's entry exists exactly while it holds flows.
    per_client: rustc_hash::FxHashMap<u32, ClientFlows>,
    /// The floor of a client's fair share (module docs).
    reserve: usize,
    /// Ports of our own address that the service's host stack uses (`(protocol, port)`),
    /// never handed out as NAT ports, whatever the remote.
    reserved: rustc_hash::FxHashSet<(L4, u16)>,
}

impl fmt::Debug for ConnTrack {
    /// A summary: the flows themselves are in [`ConnTrack::iter`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnTrack")
            .field("len", &self.len)
            .field("max_flows", &self.max_flows)
            .finish_non_exhaustive()
    }
}

/// TCP timeout for a state (see the constants for the sysctl names).
fn tcp_timeout(state: TcpState, replied: bool) -> u64 {
    match state {
        TcpState::SynSent => TCP_TIMEOUT_SYN_SENT,
        TcpState::SynRecv => TCP_TIMEOUT_SYN_RECV,
        TcpState::Established if replied => TCP_TIMEOUT_ESTABLISHED,
        TcpState::Established => TCP_TIMEOUT_UNACKNOWLEDGED,
        TcpState::FinWait => TCP_TIMEOUT_FIN_WAIT,
        TcpState::CloseWait => TCP_TIMEOUT_CLOSE_WAIT,
        TcpState::LastAck => TCP_TIMEOUT_LAST_ACK,
        TcpState::TimeWait => TCP_TIMEOUT_TIME_WAIT,
        TcpState::Close => TCP_TIMEOUT_CLOSE,
        // Not reachable for a TCP flow; treat like an unanswered opening.
        TcpState::None => TCP_TIMEOUT_SYN_SENT,
    }
}

/// The state a TCP flow starts in, and its first-FIN direction, from its first packet's flags.
/// The packet is accounted, so updating the new flow with the same packet changes nothing.
fn tcp_initial(flags: u8) -> (TcpState, Option<Dir>) {
    if flags & TCP_RST != 0 {
        (TcpState::Close, None)
    } else if flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        (TcpState::SynSent, None)
    } else {
        // Loose pickup (nf_conntrack_tcp_loose=1): a connection already in progress, which
        // this packet continues (a FIN closes it).
        let (st, fin_dir, _) = tcp_step(TcpState::Established, None, Dir::Original, flags);
        (st, fin_dir)
    }
}

/// One step of the TCP state machine (table in the module docs). Returns the new state, the
/// new first-FIN direction, and whether the flow was reopened by a new SYN.
fn tcp_step(
    state: TcpState,
    fin_dir: Option<Dir>,
    dir: Dir,
    flags: u8,
) -> (TcpState, Option<Dir>, bool) {
    use TcpState as S;
    let other_side = fin_dir.is_some_and(|d| d != dir);
    if flags & TCP_RST != 0 {
        return (S::Close, fin_dir, false);
    }
    if flags & TCP_SYN != 0 {
        let ack = flags & TCP_ACK != 0;
        return match (state, dir, ack) {
            (S::TimeWait | S::Close | S::None, Dir::Original, false) => (S::SynSent, None, true),
            (S::SynSent, Dir::Reply, true) => (S::SynRecv, fin_dir, false),
            _ => (state, fin_dir, false),
        };
    }
    if flags & TCP_FIN != 0 {
        return match state {
            S::Established | S::SynRecv => (S::FinWait, Some(dir), false),
            S::FinWait | S::CloseWait if other_side => (S::LastAck, fin_dir, false),
            _ => (state, fin_dir, false),
        };
    }
    if flags & TCP_ACK != 0 {
        return match state {
            S::SynRecv if dir == Dir::Original => (S::Established, fin_dir, false),
            S::FinWait if other_side => (S::CloseWait, fin_dir, false),
            S::LastAck => (S::TimeWait, fin_dir, false),
            _ => (state, fin_dir, false),
        };
    }
    (state, fin_dir, false)
}

/// The bucket count hashbrown (std's `HashMap`) settles on for `cap` entries: at most 7/8 full,
/// a power of two.
fn index_buckets(cap: usize) -> usize {
    if cap < 8 {
        if cap < 4 {
            4
        } else {
            8
        }
    } else {
        (cap.saturating_mul(8) / 7).next_power_of_two()
    }
}

impl ConnTrack {
    /// An empty table for at most `max_flows` flows (capped at `u32::MAX - 1`, the id space),
    /// choosing NAT ports from a PRNG seeded with `seed`. Storage for up to 65536 flows is
    /// reserved now, so creating flows does not allocate until the table outgrows that.
    pub fn new(max_flows: usize, seed: u64) -> Self {
        let max_flows = max_flows.min(NIL as usize - 1);
        let pre = max_flows.min(PRESIZE_CAP);
        let hasher = KeyedState::from_seed(seed);
        ConnTrack {
            slots: Vec::with_capacity(pre),
            free_head: NIL,
            len: 0,
            max_flows,
            orig: HashMap::with_capacity_and_hasher(pre, hasher.clone()),
            reply: HashMap::with_capacity_and_hasher(pre, hasher),
            timers: Vec::with_capacity(pre),
            rng: SplitMix64(seed),
            per_client: rustc_hash::FxHashMap::default(),
            reserve: reserve_for(max_flows),
            reserved: rustc_hash::FxHashSet::default(),
        }
    }

    /// Keeps `port` of protocol `l4` for the service's own use: NAT never picks it, so a
    /// client flow can never be handed an answer meant for the service (its DNS lookups, its
    /// DHCP client). Flows already on the port keep it until they end.
    pub fn reserve_port(&mut self, l4: L4, port: u16) {
        self.reserved.insert((l4, port));
    }

    /// Takes over the reserved ports of `old` (a table being replaced by a bigger one).
    pub fn inherit_reservations(&mut self, old: &ConnTrack) {
        self.reserved.clone_from(&old.reserved);
    }

    /// Gives a reserved port back to NAT.
    pub fn release_port(&mut self, l4: L4, port: u16) {
        self.reserved.remove(&(l4, port));
    }

    /// Whether the service holds `port` of `l4`.
    pub fn is_reserved(&self, l4: L4, port: u16) -> bool {
        !self.reserved.is_empty() && self.reserved.contains(&(l4, port))
    }

    fn live_slot(&self, id: u32) -> Option<&Slot> {
        self.slots.get(id as usize).filter(|s| s.live)
    }

    /// Starts window tracking for TCP flow `id` from the segment that opened it.
    pub fn tcp_open(&mut self, id: FlowId, seg: &Segment) {
        if let Some(s) = self.slots.get_mut(id.0 as usize).filter(|s| s.live) {
            s.win = tcpwin::open(seg);
        }
    }

    /// Whether `seg`, sent in direction `dir` of TCP flow `id`, is within the connection's
    /// windows ([`tcpwin::in_window`]); updates them when it is. False for an id not live.
    pub fn tcp_in_window(&mut self, id: FlowId, dir: Dir, seg: &Segment) -> bool {
        match self.slots.get_mut(id.0 as usize).filter(|s| s.live) {
            Some(s) => tcpwin::in_window(&mut s.win, s.flow.tcp, dir, seg),
            None => false,
        }
    }

    /// The flow the client opened with this key, unless it has expired (`expires_at <= now`),
    /// whether or not [`ConnTrack::expire`] has run since.
    pub fn lookup_original(&self, key: &FlowKey, now: u64) -> Option<FlowId> {
        let &id = self.orig.get(key)?;
        let s = self.live_slot(id)?;
        (s.flow.expires_at > now).then_some(FlowId(id))
    }

    /// The flow a packet arriving on the uplink answers, unless it has expired.
    pub fn lookup_reply(&self, key: &ReplyKey, now: u64) -> Option<FlowId> {
        let &id = self.reply.get(key)?;
        let s = self.live_slot(id)?;
        (s.flow.expires_at > now).then_some(FlowId(id))
    }

    /// Starts tracking a flow from its first (original-direction) packet, choosing its NAT
    /// port. `tcp_flags` is the TCP flags byte for TCP, ignored otherwise.
    ///
    /// If the key is already tracked and not expired, this is the same as
    /// [`ConnTrack::update`] on that flow (original direction) and returns its id; an expired
    /// flow with the key is replaced. When the table is full, due flows are expired first, then
    /// a flow is evicted as the module docs ("Sharing the table") say. Fails with [`TableFull`]
    /// when nothing may be evicted for this client, or when all NAT ports toward this remote
    /// address and port are taken (nothing is evicted then).
    pub fn create(
        &mut self,
        now: u64,
        key: FlowKey,
        tcp_flags: Option<u8>,
    ) -> Result<FlowId, TableFull> {
        self.create_to(now, key, None, tcp_flags)
    }

    /// [`ConnTrack::create`] for a flow redirected to `dnat` instead of `key.dst` (see
    /// [`Flow::dnat`]); the NAT port is chosen toward where the flow really goes.
    pub fn create_to(
        &mut self,
        now: u64,
        key: FlowKey,
        dnat: Option<Ipv4Addr>,
        tcp_flags: Option<u8>,
    ) -> Result<FlowId, TableFull> {
        if let Some(&id) = self.orig.get(&key) {
            if self.live_slot(id).is_some_and(|s| s.flow.expires_at > now) {
                self.update(FlowId(id), now, Dir::Original, tcp_flags);
                return Ok(FlowId(id));
            }
            self.remove_slot(id);
        }
        if self.len >= self.max_flows {
            self.expire(now);
        }
        let victim = if self.len >= self.max_flows {
            Some(self.choose_victim(key.client).ok_or(TableFull)?)
        } else {
            None
        };
        let remote = dnat.map_or(key.dst, IpAddr::V4);
        let nat_port = self.pick_nat_port(&key, remote)?;
        if let Some(v) = victim {
            // Its reply key differs from the one just chosen, which was free.
            self.remove_slot(v);
        }

        let (tcp, fin_dir, timeout) = match key.l4 {
            L4::Tcp => {
                let (st, fin_dir) = tcp_initial(tcp_flags.unwrap_or(0));
                (st, fin_dir, tcp_timeout(st, false))
            }
            L4::Udp => (TcpState::None, None, UDP_TIMEOUT),
            L4::Icmp => (TcpState::None, None, ICMP_TIMEOUT),
            L4::Other(p) => (TcpState::None, None, other_timeout(p, false)),
        };
        let flow = Flow {
            key,
            nat_port,
            tcp,
            replied: false,
            assured: false,
            created: now,
            last_seen: now,
            expires_at: now.saturating_add(timeout),
            dnat,
        };
        let id = self.alloc_slot(flow, fin_dir)?;
        self.orig.insert(key, id);
        self.reply.insert(flow.reply_key(), id);
        let pos = self.timers.len();
        self.timers.push(Timer {
            at: flow.expires_at,
            id,
        });
        self.set_heap_pos(pos);
        self.sift_up(pos);
        self.len += 1;
        self.per_client
            .entry(key.client)
            .or_insert(ClientFlows {
                n: 0,
                lists: [EMPTY_LIST; 3],
            })
            .n += 1;
        self.list_push_back(id, CLASS_UNREPLIED);
        Ok(FlowId(id))
    }

    /// A client's fair share of a full table when `active` clients hold (or ask for) flows.
    fn share(&self, active: usize) -> usize {
        self.reserve.max(self.max_flows / active.max(1))
    }

    /// Which flow to evict so that `client` may create one in the full table, if any (module
    /// docs, "Sharing the table").
    fn choose_victim(&self, client: u32) -> Option<u32> {
        let mine = self.per_client.get(&client);
        let active = self.per_client.len() + usize::from(mine.is_none());
        let share = self.share(active);
        if let Some(cf) = mine.filter(|cf| cf.n as usize >= share) {
            return [CLASS_UNREPLIED, CLASS_UNASSURED]
                .iter()
                .map(|&c| cf.lists[usize::from(c)].head)
                .find(|&h| h != NIL);
        }
        // The fullest other client; the key is total, so the result does not depend on the
        // map's iteration order.
        let (_, fullest) = self
            .per_client
            .iter()
            .filter(|(&c, _)| c != client)
            .max_by_key(|(&c, cf)| (cf.n, std::cmp::Reverse(c)))?;
        if fullest.n as usize <= share {
            return None;
        }
        fullest.lists.iter().map(|l| l.head).find(|&h| h != NIL)
    }

    /// A slot for a new flow: the most recently freed one, else a new one at the end.
    fn alloc_slot(&mut self, flow: Flow, fin_dir: Option<Dir>) -> Result<u32, TableFull> {
        let slot = Slot {
            flow,
            heap_pos: NIL,
            prev: NIL,
            next: NIL,
            class: CLASS_UNREPLIED,
            fin_dir,
            live: true,
            win: TcpWindows::default(),
        };
        if self.free_head != NIL {
            let id = self.free_head;
            let s = self.slots.get_mut(id as usize).ok_or(TableFull)?;
            self.free_head = s.next;
            *s = slot;
            Ok(id)
        } else {
            let id = u32::try_from(self.slots.len())
                .ok()
                .filter(|&i| i != NIL)
                .ok_or(TableFull)?;
            self.slots.push(slot);
            Ok(id)
        }
    }

    /// A NAT port not used by any flow toward the same remote address and port and protocol.
    ///
    /// The client's own port (or ICMP id) first, when it is free: Linux's `masquerade` (without
    /// `random`/`fully-random`, as Qubes writes it) keeps the source port unless that would
    /// clash (`get_unique_tuple` in nf_nat_core.c tries the original tuple first). So a flow
    /// that is cut (a rule change undone) or forgotten (the service restarted) and picked up
    /// again gets the same mapping, and the remote end sees one connection, as with Linux.
    /// Ports below 1024 are not kept: the uplink's privileged ports are not a client's to
    /// claim. Otherwise random draws, then a scan from a random point, which also proves
    /// exhaustion. [`L4::Other`] flows have no ports to translate: their own or nothing.
    fn pick_nat_port(&mut self, key: &FlowKey, remote: IpAddr) -> Result<u16, TableFull> {
        let (lo, n) = match key.l4 {
            L4::Icmp => (0u32, 65_536u32),
            L4::Tcp | L4::Udp => (1024, 64_512),
            L4::Other(_) => (u32::from(key.sport), 1),
        };
        let mut rk = ReplyKey {
            l4: key.l4,
            remote,
            rport: match key.l4 {
                L4::Icmp => 0,
                _ => key.dport,
            },
            nat_port: 0,
        };
        let free = |ct: &Self, rk: &ReplyKey| {
            !ct.reply.contains_key(rk) && !ct.is_reserved(rk.l4, rk.nat_port)
        };
        if u32::from(key.sport) >= lo && u32::from(key.sport) < lo + n {
            rk.nat_port = key.sport;
            if free(self, &rk) {
                return Ok(rk.nat_port);
            }
        }
        if matches!(key.l4, L4::Other(_)) {
            return Err(TableFull);
        }
        for _ in 0..NAT_RANDOM_TRIES {
            rk.nat_port = (lo + self.rng.below(n)) as u16;
            if free(self, &rk) {
                return Ok(rk.nat_port);
            }
        }
        let start = self.rng.below(n);
        for i in 0..n {
            rk.nat_port = (lo + (start + i) % n) as u16;
            if free(self, &rk) {
                return Ok(rk.nat_port);
            }
        }
        Err(TableFull)
    }

    /// Accounts a packet of flow `id` seen at `now` in direction `dir`: TCP state machine,
    /// `replied`/`assured`, `last_seen` and a fresh `expires_at` (module docs). Does nothing
    /// for an id that is not live. Never allocates.
    ///
    /// Updating a flow that is due but not yet expired revives it; the engine only updates
    /// flows a lookup just returned, so this does not arise.
    pub fn update(&mut self, id: FlowId, now: u64, dir: Dir, tcp_flags: Option<u8>) {
        let Some(slot) = self.slots.get_mut(id.0 as usize).filter(|s| s.live) else {
            return;
        };
        let old_expires_at = slot.flow.expires_at;
        let f = &mut slot.flow;
        f.last_seen = now;
        if dir == Dir::Reply {
            f.replied = true;
        }
        let mut reopened = false;
        let timeout = match f.key.l4 {
            L4::Tcp => {
                let old = f.tcp;
                let (st, fin_dir, reopen) =
                    tcp_step(old, slot.fin_dir, dir, tcp_flags.unwrap_or(0));
                f.tcp = st;
                slot.fin_dir = fin_dir;
                if reopen {
                    reopened = true;
                    f.replied = false;
                    f.assured = false;
                    f.created = now;
                } else if f.replied && (old == TcpState::Established || st == TcpState::Established)
                {
                    f.assured = true;
                }
                tcp_timeout(st, f.replied)
            }
            L4::Udp => {
                if f.replied {
                    f.assured = true;
                    UDP_TIMEOUT_STREAM
                } else {
                    UDP_TIMEOUT
                }
            }
            L4::Icmp => {
                if f.replied {
                    f.assured = true;
                }
                ICMP_TIMEOUT
            }
            L4::Other(p) => {
                if f.replied {
                    f.assured = true;
                }
                other_timeout(p, f.replied)
            }
        };
        let expires_at = now.saturating_add(timeout);
        f.expires_at = expires_at;
        let class = flow_class(f);
        let pos = slot.heap_pos as usize;

        // Eviction lists: a flow changing class goes to the tail of its new list; a reopened
        // flow is a new connection and goes (back) to the tail of the unreplied list.
        if reopened || class != slot.class {
            self.list_unlink(id.0);
            self.list_push_back(id.0, class);
        }

        // Timer: only an earlier deadline moves it (see module docs). The armed time is at most
        // the old `expires_at`, so a plain refresh doesn't even read the heap (a cache miss).
        if expires_at < old_expires_at {
            if let Some(t) = self.timers.get_mut(pos) {
                if expires_at < t.at {
                    t.at = expires_at;
                    self.sift_up(pos);
                }
            }
        }
    }

    /// The flow with this id, for an id a lookup or [`ConnTrack::create`] just returned.
    ///
    /// Never panics: for an id that is not live (removed, or never issued) it returns
    /// [`PLACEHOLDER_FLOW`], an inert flow that expired at time 0, so a bug in the caller
    /// degrades to dropping a packet rather than aborting the firewall. Use
    /// [`ConnTrack::try_get`] to tell the cases apart. Flows that are due but not yet expired
    /// are still returned: the lookups say whether a flow is current.
    pub fn get(&self, id: FlowId) -> &Flow {
        self.try_get(id).unwrap_or(&PLACEHOLDER_FLOW)
    }

    /// The flow with this id, if it is live (see [`ConnTrack::get`]).
    pub fn try_get(&self, id: FlowId) -> Option<&Flow> {
        self.live_slot(id.0).map(|s| &s.flow)
    }

    /// Stops tracking a flow (no-op for an id that is not live).
    pub fn remove(&mut self, id: FlowId) {
        self.remove_slot(id.0);
    }

    /// Removes every flow whose `expires_at <= now`; returns how many. Costs O(log n) per
    /// flow removed or timer re-armed, not a scan of the table.
    pub fn expire(&mut self, now: u64) -> usize {
        let mut removed = 0;
        while let Some(&top) = self.timers.first() {
            if top.at > now {
                break;
            }
            let Some(s) = self.live_slot(top.id) else {
                // Unreachable (timers only name live slots); drop the timer rather than spin.
                self.timer_remove(0);
                continue;
            };
            let due = s.flow.expires_at;
            if due <= now {
                self.remove_slot(top.id);
                removed += 1;
            } else if let Some(t) = self.timers.first_mut() {
                // Refreshed since the timer was armed: re-arm it at the real deadline.
                t.at = due;
                self.sift_down(0);
            }
        }
        removed
    }

    /// The earliest time at which [`ConnTrack::expire`] may have work (a lower bound, for the
    /// shell's timer); `None` when the table is empty.
    pub fn next_deadline(&self) -> Option<u64> {
        self.timers.first().map(|t| t.at)
    }

    /// Removes the flows for which `f` is false (flows a rule change no longer allows), in id
    /// order; returns how many.
    pub fn retain(&mut self, mut f: impl FnMut(&Flow) -> bool) -> usize {
        let mut removed = 0;
        for id in 0..self.slots.len() {
            let drop = match self.slots.get(id) {
                Some(s) if s.live => !f(&s.flow),
                _ => false,
            };
            if drop {
                self.remove_slot(id as u32);
                removed += 1;
            }
        }
        removed
    }

    /// Removes every flow of a client interface (it went away); returns how many.
    pub fn remove_client(&mut self, client: u32) -> usize {
        self.retain(|f| f.key.client != client)
    }

    /// Flows stored, including any that are due but not yet expired.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Live flows of one client (including due ones not yet expired).
    pub fn client_flows(&self, client: u32) -> usize {
        self.per_client.get(&client).map_or(0, |cf| cf.n as usize)
    }

    /// Clients holding flows.
    pub fn active_clients(&self) -> usize {
        self.per_client.len()
    }

    /// The fair share of a full table for each of the clients holding flows now (module docs,
    /// "Sharing the table"): what a client may keep when the table is full and others ask.
    pub fn fair_share(&self) -> usize {
        self.share(self.per_client.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bound given to [`ConnTrack::new`] (capped at `u32::MAX - 1`).
    pub fn max_flows(&self) -> usize {
        self.max_flows
    }

    /// Estimated memory per flow when the table is full, in bytes: the slab entry, the timer,
    /// and each index's share of its buckets (entry plus control byte) at hashbrown's real
    /// bucket count for `max_flows` entries, which is between 8/7 and 16/7 buckets per entry.
    pub fn bytes_per_flow(&self) -> usize {
        let n = self.max_flows.max(1);
        let buckets = index_buckets(n);
        let orig = std::mem::size_of::<(FlowKey, u32)>() + 1;
        let reply = std::mem::size_of::<(ReplyKey, u32)>() + 1;
        std::mem::size_of::<Slot>()
            + std::mem::size_of::<Timer>()
            + (buckets.saturating_mul(orig + reply)).div_ceil(n)
    }

    /// Every stored flow in id order (stable, whatever the hash), including flows that are due
    /// but not yet expired.
    pub fn iter(&self) -> impl Iterator<Item = (FlowId, &Flow)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.live)
            .map(|(i, s)| (FlowId(i as u32), &s.flow))
    }

    fn remove_slot(&mut self, id: u32) {
        let Some(s) = self.live_slot(id) else {
            return;
        };
        let flow = s.flow;
        let pos = s.heap_pos as usize;
        self.orig.remove(&flow.key);
        self.reply.remove(&flow.reply_key());
        self.timer_remove(pos);
        self.list_unlink(id);
        if let Some(s) = self.slots.get_mut(id as usize) {
            s.live = false;
            s.heap_pos = NIL;
            s.prev = NIL;
            s.next = self.free_head;
            self.free_head = id;
        }
        self.len -= 1;
        if let Some(cf) = self.per_client.get_mut(&flow.key.client) {
            cf.n -= 1;
            if cf.n == 0 {
                self.per_client.remove(&flow.key.client);
            }
        }
    }

    // --- per-client eviction lists (FIFO by entry into the class) ---

    /// Appends live slot `id` to its client's list for `class`.
    fn list_push_back(&mut self, id: u32, class: u8) {
        let Some(s) = self.slots.get_mut(id as usize) else {
            return;
        };
        let Some(list) = self
            .per_client
            .get_mut(&s.flow.key.client)
            .and_then(|cf| cf.lists.get_mut(usize::from(class)))
        else {
            return;
        };
        let tail = list.tail;
        s.prev = tail;
        s.next = NIL;
        s.class = class;
        list.tail = id;
        if tail == NIL {
            list.head = id;
        } else if let Some(t) = self.slots.get_mut(tail as usize) {
            t.next = id;
        }
    }

    /// Takes live slot `id` off its client's list.
    fn list_unlink(&mut self, id: u32) {
        let Some(s) = self.slots.get_mut(id as usize) else {
            return;
        };
        let (prev, next) = (s.prev, s.next);
        s.prev = NIL;
        s.next = NIL;
        let Some(list) = self
            .per_client
            .get_mut(&s.flow.key.client)
            .and_then(|cf| cf.lists.get_mut(usize::from(s.class)))
        else {
            return;
        };
        match self.slots.get_mut(prev as usize) {
            Some(p) => p.next = next,
            None => list.head = next,
        }
        match self.slots.get_mut(next as usize) {
            Some(n) => n.prev = prev,
            None => list.tail = prev,
        }
    }

    // --- timer heap (indexed binary min-heap) ---

    /// Tells the slot whose timer sits at `pos` where it is.
    fn set_heap_pos(&mut self, pos: usize) {
        if let Some(&t) = self.timers.get(pos) {
            if let Some(s) = self.slots.get_mut(t.id as usize) {
                s.heap_pos = pos as u32;
            }
        }
    }

    fn heap_swap(&mut self, a: usize, b: usize) {
        self.timers.swap(a, b);
        self.set_heap_pos(a);
        self.set_heap_pos(b);
    }

    fn sift_up(&mut self, mut pos: usize) {
        while pos > 0 {
            let parent = (pos - 1) / 2;
            if self.timers[pos].before(self.timers[parent]) {
                self.heap_swap(pos, parent);
                pos = parent;
            } else {
                break;
            }
        }
    }

    fn sift_down(&mut self, mut pos: usize) {
        let n = self.timers.len();
        loop {
            let l = 2 * pos + 1;
            if l >= n {
                break;
            }
            let r = l + 1;
            let child = if r < n && self.timers[r].before(self.timers[l]) {
                r
            } else {
                l
            };
            if self.timers[child].before(self.timers[pos]) {
                self.heap_swap(pos, child);
                pos = child;
            } else {
                break;
            }
        }
    }

    fn timer_remove(&mut self, pos: usize) {
        let Some(last) = self.timers.len().checked_sub(1) else {
            return;
        };
        if pos > last {
            return;
        }
        if pos != last {
            self.heap_swap(pos, last);
        }
        self.timers.pop();
        if pos < self.timers.len() {
            if pos > 0 && self.timers[pos].before(self.timers[(pos - 1) / 2]) {
                self.sift_up(pos);
            } else {
                self.sift_down(pos);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::net::Ipv6Addr;

    const S: u64 = SEC;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    fn key(l4: L4, client: u32, sport: u16, dst: IpAddr, dport: u16) -> FlowKey {
        FlowKey {
            client,
            l4,
            src: v4(10, 137, 0, client as u8),
            dst,
            sport,
            dport,
        }
    }

    fn tcp(sport: u16) -> FlowKey {
        key(L4::Tcp, 1, sport, v4(93, 184, 216, 34), 443)
    }

    fn udp(sport: u16) -> FlowKey {
        key(L4::Udp, 1, sport, v4(9, 9, 9, 9), 53)
    }

    /// Checks the internal invariants: indexes, timer heap, unreplied list, free list, len.
    fn check_invariants(ct: &ConnTrack) {
        let live: Vec<u32> = ct.iter().map(|(id, _)| id.0).collect();
        assert_eq!(live.len(), ct.len());
        let mut per: std::collections::BTreeMap<u32, usize> = Default::default();
        for (_, f) in ct.iter() {
            *per.entry(f.key.client).or_default() += 1;
        }
        for (client, n) in per {
            assert_eq!(ct.client_flows(client), n, "per-client count of {client}");
        }
        assert_eq!(ct.orig.len(), ct.len());
        assert_eq!(ct.reply.len(), ct.len());
        assert_eq!(ct.timers.len(), ct.len());
        for &id in &live {
            let s = &ct.slots[id as usize];
            assert_eq!(ct.orig.get(&s.flow.key), Some(&id));
            assert_eq!(ct.reply.get(&s.flow.reply_key()), Some(&id));
            let t = ct.timers[s.heap_pos as usize];
            assert_eq!(t.id, id);
            assert!(t.at <= s.flow.expires_at, "timer later than deadline");
        }
        for pos in 1..ct.timers.len() {
            assert!(
                !ct.timers[pos].before(ct.timers[(pos - 1) / 2]),
                "heap order"
            );
        }
        // Every live flow is on exactly one list: its client's, for its class.
        let mut listed = BTreeSet::new();
        assert_eq!(
            ct.per_client.keys().copied().collect::<BTreeSet<u32>>(),
            ct.iter()
                .map(|(_, f)| f.key.client)
                .collect::<BTreeSet<u32>>(),
            "client entries exist exactly while they hold flows"
        );
        for (&client, cf) in &ct.per_client {
            for (class, list) in cf.lists.iter().enumerate() {
                let (mut cur, mut prev) = (list.head, NIL);
                while cur != NIL {
                    let s = &ct.slots[cur as usize];
                    assert!(s.live);
                    assert_eq!(s.flow.key.client, client);
                    assert_eq!(usize::from(s.class), class);
                    assert_eq!(s.class, flow_class(&s.flow), "class of {cur}");
                    assert_eq!(s.prev, prev);
                    assert!(listed.insert(cur), "{cur} listed twice");
                    prev = cur;
                    cur = s.next;
                }
                assert_eq!(list.tail, prev);
            }
        }
        assert_eq!(listed, live.iter().copied().collect::<BTreeSet<u32>>());
        let mut free = 0;
        let mut cur = ct.free_head;
        while cur != NIL {
            assert!(!ct.slots[cur as usize].live);
            free += 1;
            cur = ct.slots[cur as usize].next;
        }
        assert_eq!(free + ct.len(), ct.slots.len());
    }

    fn flow(ct: &ConnTrack, id: FlowId) -> Flow {
        *ct.try_get(id).expect("live flow")
    }

    #[test]
    fn tcp_handshake_and_close_sequence() {
        let mut ct = ConnTrack::new(16, 1);
        let t0 = 1_000 * S;
        let id = ct.create(t0, tcp(40000), Some(TCP_SYN)).expect("room");
        let f = flow(&ct, id);
        assert_eq!(
            (f.tcp, f.replied, f.assured),
            (TcpState::SynSent, false, false)
        );
        assert_eq!(f.expires_at, t0 + 120 * S);
        assert_eq!((f.created, f.last_seen), (t0, t0));

        let steps: [(Dir, u8, TcpState, u64, bool); 7] = [
            (Dir::Reply, TCP_SYN | TCP_ACK, TcpState::SynRecv, 60, false),
            (Dir::Original, TCP_ACK, TcpState::Established, 432_000, true),
            (
                Dir::Original,
                TCP_ACK | TCP_PSH,
                TcpState::Established,
                432_000,
                true,
            ),
            (
                Dir::Original,
                TCP_FIN | TCP_ACK,
                TcpState::FinWait,
                120,
                true,
            ),
            (Dir::Reply, TCP_ACK, TcpState::CloseWait, 60, true),
            (Dir::Reply, TCP_FIN | TCP_ACK, TcpState::LastAck, 30, true),
            (Dir::Original, TCP_ACK, TcpState::TimeWait, 120, true),
        ];
        for (i, (dir, flags, state, secs, assured)) in steps.into_iter().enumerate() {
            let now = t0 + (i as u64 + 1) * S;
            ct.update(id, now, dir, Some(flags));
            let f = flow(&ct, id);
            assert_eq!(f.tcp, state, "step {i}");
            assert_eq!(f.expires_at, now + secs * S, "step {i}");
            assert_eq!(f.assured, assured, "step {i}");
            assert!(f.replied);
            assert_eq!(f.last_seen, now);
        }
        // The client reuses its port: the flow starts over as a new connection.
        let now = t0 + 20 * S;
        ct.update(id, now, Dir::Original, Some(TCP_SYN));
        let f = flow(&ct, id);
        assert_eq!(f.tcp, TcpState::SynSent);
        assert_eq!((f.replied, f.assured, f.created), (false, false, now));
        assert_eq!(f.expires_at, now + 120 * S);
        check_invariants(&ct);
    }

    #[test]
    fn fin_from_both_sides_without_close_wait() {
        let mut ct = ConnTrack::new(16, 1);
        let id = ct.create(0, tcp(1), Some(TCP_SYN)).expect("room");
        ct.update(id, 0, Dir::Reply, Some(TCP_SYN | TCP_ACK));
        ct.update(id, 0, Dir::Original, Some(TCP_ACK));
        // The remote closes first, then the client: simultaneous-ish close.
        ct.update(id, S, Dir::Reply, Some(TCP_FIN | TCP_ACK));
        assert_eq!(flow(&ct, id).tcp, TcpState::FinWait);
        // A retransmitted FIN or an ACK from the same side changes nothing.
        ct.update(id, S, Dir::Reply, Some(TCP_FIN | TCP_ACK));
        ct.update(id, S, Dir::Reply, Some(TCP_ACK));
        assert_eq!(flow(&ct, id).tcp, TcpState::FinWait);
        ct.update(id, 2 * S, Dir::Original, Some(TCP_FIN | TCP_ACK));
        assert_eq!(flow(&ct, id).tcp, TcpState::LastAck);
        assert_eq!(flow(&ct, id).expires_at, 32 * S);
        ct.update(id, 3 * S, Dir::Reply, Some(TCP_ACK));
        assert_eq!(flow(&ct, id).tcp, TcpState::TimeWait);
        assert_eq!(flow(&ct, id).expires_at, 123 * S);
    }

    #[test]
    fn rst_closes_from_every_state_and_shortens_the_timer() {
        let setups: [&[(Dir, u8)]; 7] = [
            &[],
            &[(Dir::Reply, TCP_SYN | TCP_ACK)],
            &[(Dir::Reply, TCP_SYN | TCP_ACK), (Dir::Original, TCP_ACK)],
            &[
                (Dir::Reply, TCP_SYN | TCP_ACK),
                (Dir::Original, TCP_ACK),
                (Dir::Original, TCP_FIN),
            ],
            &[
                (Dir::Reply, TCP_SYN | TCP_ACK),
                (Dir::Original, TCP_ACK),
                (Dir::Original, TCP_FIN),
                (Dir::Reply, TCP_ACK),
            ],
            &[
                (Dir::Reply, TCP_SYN | TCP_ACK),
                (Dir::Original, TCP_ACK),
                (Dir::Original, TCP_FIN),
                (Dir::Reply, TCP_FIN),
            ],
            &[
                (Dir::Reply, TCP_SYN | TCP_ACK),
                (Dir::Original, TCP_ACK),
                (Dir::Original, TCP_FIN),
                (Dir::Reply, TCP_FIN),
                (Dir::Original, TCP_ACK),
            ],
        ];
        for (i, steps) in setups.iter().enumerate() {
            for rst_dir in [Dir::Original, Dir::Reply] {
                let mut ct = ConnTrack::new(16, 7);
                let id = ct.create(0, tcp(2000), Some(TCP_SYN)).expect("room");
                for &(d, fl) in *steps {
                    ct.update(id, S, d, Some(fl));
                }
                ct.update(id, 2 * S, rst_dir, Some(TCP_RST | TCP_ACK));
                let f = flow(&ct, id);
                assert_eq!(f.tcp, TcpState::Close, "setup {i}");
                assert_eq!(f.expires_at, 12 * S, "setup {i}");
                assert!(ct.lookup_original(&tcp(2000), 12 * S - 1).is_some());
                assert_eq!(ct.lookup_original(&tcp(2000), 12 * S), None);
                // The timer was moved earlier, so expire finds it on time.
                assert_eq!(ct.next_deadline(), Some(12 * S));
                assert_eq!(ct.expire(12 * S - 1), 0);
                assert_eq!(ct.expire(12 * S), 1, "setup {i}");
                assert!(ct.is_empty());
                check_invariants(&ct);
            }
        }
    }

    #[test]
    fn first_packet_decides_the_initial_tcp_state() {
        let mut ct = ConnTrack::new(16, 1);
        let cases = [
            (Some(TCP_SYN), TcpState::SynSent, 120),
            (Some(TCP_ACK), TcpState::Established, 300),
            (Some(TCP_ACK | TCP_PSH), TcpState::Established, 300),
            (Some(TCP_FIN | TCP_ACK), TcpState::FinWait, 120),
            (Some(TCP_SYN | TCP_ACK), TcpState::Established, 300),
            (Some(TCP_RST), TcpState::Close, 10),
            (None, TcpState::Established, 300),
        ];
        for (i, (flags, state, secs)) in cases.into_iter().enumerate() {
            let id = ct.create(0, tcp(i as u16), flags).expect("room");
            let f = flow(&ct, id);
            assert_eq!((f.tcp, f.expires_at), (state, secs * S), "case {i}");
        }
    }

    #[test]
    fn loose_pickup_is_assured_by_the_first_reply() {
        let mut ct = ConnTrack::new(16, 1);
        let id = ct.create(0, tcp(5), Some(TCP_ACK)).expect("room");
        ct.update(id, S, Dir::Original, Some(TCP_ACK));
        let f = flow(&ct, id);
        assert_eq!(
            (f.tcp, f.assured, f.expires_at),
            (TcpState::Established, false, 301 * S)
        );
        ct.update(id, 2 * S, Dir::Reply, Some(TCP_ACK));
        let f = flow(&ct, id);
        assert!(f.replied && f.assured);
        assert_eq!(f.expires_at, 2 * S + 432_000 * S);
    }

    #[test]
    fn create_then_update_with_the_same_packet_is_idempotent() {
        // The engine creates a flow and then accounts the packet on it.
        for flags in [TCP_SYN, TCP_ACK, TCP_RST, TCP_FIN] {
            let mut ct = ConnTrack::new(4, 1);
            let id = ct.create(0, tcp(9), Some(flags)).expect("room");
            let before = flow(&ct, id);
            ct.update(id, 0, Dir::Original, Some(flags));
            assert_eq!(flow(&ct, id), before, "flags {flags:#x}");
        }
    }

    #[test]
    fn udp_timeout_grows_once_replied() {
        let mut ct = ConnTrack::new(16, 1);
        let id = ct.create(0, udp(5353), None).expect("room");
        assert_eq!(flow(&ct, id).expires_at, 30 * S);
        ct.update(id, 10 * S, Dir::Original, None);
        let f = flow(&ct, id);
        assert_eq!((f.expires_at, f.replied, f.assured), (40 * S, false, false));
        ct.update(id, 11 * S, Dir::Reply, None);
        let f = flow(&ct, id);
        assert_eq!((f.expires_at, f.replied, f.assured), (131 * S, true, true));
        ct.update(id, 12 * S, Dir::Original, None);
        assert_eq!(flow(&ct, id).expires_at, 132 * S);
        assert_eq!(flow(&ct, id).tcp, TcpState::None);
    }

    #[test]
    fn icmp_flows() {
        let mut ct = ConnTrack::new(16, 1);
        let k = key(L4::Icmp, 2, 0x1234, v4(1, 1, 1, 1), 0);
        let id = ct.create(5 * S, k, None).expect("room");
        let f = flow(&ct, id);
        assert_eq!(f.expires_at, 35 * S);
        let rk = f.reply_key();
        assert_eq!((rk.rport, rk.remote), (0, v4(1, 1, 1, 1)));
        assert_eq!(ct.lookup_reply(&rk, 6 * S), Some(id));
        ct.update(id, 6 * S, Dir::Reply, None);
        let f = flow(&ct, id);
        assert!(f.replied && f.assured);
        assert_eq!(f.expires_at, 36 * S);
        // The other family never matches.
        let rk6 = ReplyKey {
            remote: IpAddr::V6(Ipv4Addr::new(1, 1, 1, 1).to_ipv6_mapped()),
            ..rk
        };
        assert_eq!(ct.lookup_reply(&rk6, 6 * S), None);
    }

    #[test]
    fn lookups_miss_after_expiry_even_without_expire() {
        let mut ct = ConnTrack::new(16, 3);
        let id = ct.create(0, udp(1), None).expect("room");
        let rk = flow(&ct, id).reply_key();
        assert_eq!(ct.lookup_original(&udp(1), 30 * S - 1), Some(id));
        assert_eq!(ct.lookup_reply(&rk, 30 * S - 1), Some(id));
        assert_eq!(ct.lookup_original(&udp(1), 30 * S), None);
        assert_eq!(ct.lookup_reply(&rk, 30 * S), None);
        assert_eq!(ct.len(), 1, "still stored until expire()");
        // A new packet with the same key replaces the dead flow.
        let id2 = ct.create(31 * S, udp(1), None).expect("room");
        assert_eq!(ct.len(), 1);
        assert_eq!(flow(&ct, id2).created, 31 * S);
        assert_eq!(ct.lookup_original(&udp(1), 31 * S), Some(id2));
        check_invariants(&ct);
    }

    #[test]
    fn create_on_a_live_key_is_an_update() {
        let mut ct = ConnTrack::new(16, 3);
        let id = ct.create(0, udp(1), None).expect("room");
        let port = flow(&ct, id).nat_port;
        let again = ct.create(10 * S, udp(1), None).expect("room");
        assert_eq!(again, id);
        assert_eq!(ct.len(), 1);
        let f = flow(&ct, id);
        assert_eq!((f.nat_port, f.created, f.expires_at), (port, 0, 40 * S));
    }

    #[test]
    fn expire_removes_exactly_the_due_flows() {
        let mut ct = ConnTrack::new(10_000, 11);
        let mut rng = SplitMix64(99);
        for i in 0..3000u16 {
            let now = u64::from(i) * S / 10;
            let k = match i % 3 {
                0 => udp(i),
                1 => tcp(i),
                _ => key(L4::Icmp, 1, i, v4(8, 8, 8, 8), 0),
            };
            let flags = [TCP_SYN, TCP_ACK, TCP_RST][rng.below(3) as usize];
            let id = ct.create(now, k, Some(flags)).expect("room");
            // Refresh some (timer must be re-armed), answer some (longer), reset some (shorter).
            match rng.below(4) {
                0 => ct.update(id, now + 5 * S, Dir::Original, Some(TCP_ACK)),
                1 => ct.update(id, now + S, Dir::Reply, Some(TCP_SYN | TCP_ACK)),
                2 => ct.update(id, now + S, Dir::Reply, Some(TCP_RST)),
                _ => {}
            }
        }
        check_invariants(&ct);
        let mut now = 0;
        while !ct.is_empty() {
            now += 7 * S + u64::from(rng.below(1000)) * S / 10;
            let due = ct.iter().filter(|(_, f)| f.expires_at <= now).count();
            assert_eq!(ct.expire(now), due);
            assert!(ct.iter().all(|(_, f)| f.expires_at > now));
            check_invariants(&ct);
            if now > 10 * TCP_TIMEOUT_ESTABLISHED {
                panic!("flows never expired");
            }
        }
    }

    #[test]
    fn nat_ports_follow_the_seed() {
        let run = |seed: u64| -> Vec<u16> {
            let mut ct = ConnTrack::new(1000, seed);
            (0..200u16)
                .map(|i| {
                    let id = ct.create(0, udp(i), None).expect("room");
                    flow(&ct, id).nat_port
                })
                .collect()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
        let ports = run(7);
        assert!(ports.iter().all(|&p| p >= 1024));
    }

    #[test]
    fn fifty_thousand_flows_to_one_remote_get_unique_ports() {
        let mut ct = ConnTrack::new(100_000, 5);
        let mut seen = BTreeSet::new();
        let mut n = 0u32;
        for client in 1..=4u32 {
            for sport in 0..12_500u16 {
                let k = key(L4::Tcp, client, sport, v4(203, 0, 113, 7), 443);
                let id = ct.create(u64::from(n), k, Some(TCP_SYN)).expect("room");
                let f = flow(&ct, id);
                assert!(f.nat_port >= 1024);
                assert!(seen.insert(f.nat_port), "nat port reused");
                assert_eq!(ct.lookup_reply(&f.reply_key(), u64::from(n)), Some(id));
                n += 1;
            }
        }
        assert_eq!(ct.len(), 50_000);
        check_invariants(&ct);
    }

    #[test]
    fn nat_port_exhaustion_is_table_full() {
        let mut ct = ConnTrack::new(200_000, 5);
        let remote = v4(198, 51, 100, 1);
        let mut n = 0u32;
        'fill: for client in 1..=2u32 {
            for sport in 0..=u16::MAX {
                if n == 64_512 {
                    break 'fill;
                }
                ct.create(0, key(L4::Udp, client, sport, remote, 53), None)
                    .expect("a port is free");
                n += 1;
            }
        }
        let last = key(L4::Udp, 3, 1, remote, 53);
        assert_eq!(ct.create(0, last, None), Err(TableFull));
        assert_eq!(TableFull.to_string(), "connection table full");
        // Another remote port, another remote, or another protocol still has every port.
        assert!(ct.create(0, key(L4::Udp, 3, 1, remote, 54), None).is_ok());
        assert!(ct
            .create(0, key(L4::Udp, 3, 1, v4(198, 51, 100, 2), 53), None)
            .is_ok());
        assert!(ct.create(0, key(L4::Tcp, 3, 1, remote, 53), None).is_ok());
        assert_eq!(ct.len(), 64_515);
    }

    #[test]
    fn icmp_ids_use_the_whole_range() {
        let mut ct = ConnTrack::new(100_000, 5);
        let mut low = false;
        for id in 0..5_000u16 {
            let k = key(L4::Icmp, 1, id, v4(1, 1, 1, 1), 0);
            let fid = ct.create(0, k, None).expect("room");
            low |= flow(&ct, fid).nat_port < 1024;
        }
        assert!(low, "ICMP ids below 1024 are allowed");
    }

    #[test]
    fn eviction_takes_the_oldest_unreplied_and_spares_assured_flows() {
        let mut ct = ConnTrack::new(3, 1);
        let a = ct.create(0, udp(1), None).expect("room");
        let b = ct.create(S, udp(2), None).expect("room");
        let c = ct.create(2 * S, udp(3), None).expect("room");
        ct.update(a, 3 * S, Dir::Reply, None); // a is assured now
                                               // Full: b is the oldest unreplied.
        let d = ct.create(4 * S, udp(4), None).expect("evicts");
        assert_eq!(ct.lookup_original(&udp(2), 4 * S), None);
        assert!(ct.try_get(b).is_none() || b == d);
        assert_eq!(ct.lookup_original(&udp(1), 4 * S), Some(a));
        assert_eq!(ct.lookup_original(&udp(3), 4 * S), Some(c));
        // Then c, then d.
        ct.create(5 * S, udp(5), None).expect("evicts");
        assert_eq!(ct.lookup_original(&udp(3), 5 * S), None);
        ct.create(6 * S, udp(6), None).expect("evicts");
        assert_eq!(ct.lookup_original(&udp(4), 6 * S), None);
        check_invariants(&ct);
        // All assured: nothing may go.
        let ids: Vec<FlowId> = ct.iter().map(|(id, _)| id).collect();
        for id in ids {
            ct.update(id, 7 * S, Dir::Reply, None);
        }
        assert_eq!(ct.create(8 * S, udp(7), None), Err(TableFull));
        assert_eq!(ct.len(), 3);
        // A TCP flow whose SYN was answered but whose handshake never finished is not assured:
        // its own client's next flow takes its place (Linux's early_drop takes any entry that
        // is not assured), so half-open flows cannot fill the table for good.
        let mut ct = ConnTrack::new(1, 1);
        let t = ct.create(0, tcp(1), Some(TCP_SYN)).expect("room");
        ct.update(t, 0, Dir::Reply, Some(TCP_SYN | TCP_ACK));
        let u = ct.create(0, tcp(2), Some(TCP_SYN)).expect("evicts");
        assert_eq!(ct.lookup_original(&tcp(1), 0), None);
        // An established (assured) connection stays, and the new flow is refused.
        ct.update(u, 0, Dir::Reply, Some(TCP_SYN | TCP_ACK));
        ct.update(u, 0, Dir::Original, Some(TCP_ACK));
        assert!(flow(&ct, u).assured);
        assert_eq!(ct.create(0, tcp(3), Some(TCP_SYN)), Err(TableFull));
        // Once it is due, it is reclaimed instead.
        let later = TCP_TIMEOUT_ESTABLISHED;
        let e = ct
            .create(later, tcp(3), Some(TCP_SYN))
            .expect("expired one");
        assert_eq!(ct.len(), 1);
        assert_eq!(ct.lookup_original(&tcp(3), later), Some(e));
        check_invariants(&ct);
    }

    /// A TCP SYN of `client` to a port of `dst`.
    fn syn_key(client: u32, sport: u16, dst: u8) -> FlowKey {
        key(L4::Tcp, client, sport, v4(198, 18, 1, dst), 80)
    }

    /// `flooders` clients open half-open connections (SYN answered by SYN/ACK, never
    /// completed) round-robin, far more than the table holds, while a quiet client keeps 20
    /// established flows and opens 40 more during the flood: every one of its flows gets in
    /// and stays.
    fn flood_against_a_quiet_client(flooders: u32) {
        const MAX: usize = 1000;
        const QUIET: u32 = 100;
        let mut ct = ConnTrack::new(MAX, 3);
        let mut now = S;
        let mut quiet = Vec::new();
        for sport in 0..20u16 {
            let k = syn_key(QUIET, 1000 + sport, 1);
            let id = ct.create(now, k, Some(TCP_SYN)).expect("room");
            ct.update(id, now, Dir::Reply, Some(TCP_SYN | TCP_ACK));
            ct.update(id, now, Dir::Original, Some(TCP_ACK));
            assert!(flow(&ct, id).assured);
            quiet.push(k);
        }
        let per_flooder = 6_000u32;
        let total = per_flooder * flooders;
        let every = total / 40;
        for i in 0..total {
            now += 100_000; // 0.1 ms: nothing expires during the flood
            let client = 1 + i % flooders;
            let n = i / flooders;
            let k = syn_key(client, (n % 60_000) as u16, (n / 60_000) as u8 + 2);
            // A flooder may be refused nothing here: it always has half-open flows of its own
            // to give up.
            let id = ct
                .create(now, k, Some(TCP_SYN))
                .expect("flooder makes room from its own");
            ct.update(id, now, Dir::Reply, Some(TCP_SYN | TCP_ACK));
            if i % every == every - 1 {
                let k = syn_key(QUIET, 2000 + quiet.len() as u16, 1);
                ct.create(now, k, Some(TCP_SYN))
                    .expect("a client below its share always gets a flow");
                quiet.push(k);
            }
        }
        assert_eq!(quiet.len(), 60);
        for k in &quiet {
            assert!(
                ct.lookup_original(k, now).is_some(),
                "quiet flow {k:?} evicted"
            );
        }
        assert_eq!(ct.len(), MAX);
        assert_eq!(ct.client_flows(QUIET), 60);
        // The flooders share the rest evenly (round-robin, each evicting its own).
        let share = (MAX - 60) / flooders as usize;
        for c in 1..=flooders {
            let n = ct.client_flows(c);
            assert!(
                n.abs_diff(share) <= 1 + share / 50,
                "flooder {c} holds {n}, share {share}"
            );
        }
        check_invariants(&ct);
    }

    #[test]
    fn two_flooders_cannot_push_out_a_quiet_client() {
        flood_against_a_quiet_client(2);
    }

    #[test]
    fn ten_flooders_cannot_push_out_a_quiet_client() {
        flood_against_a_quiet_client(10);
    }

    #[test]
    fn a_client_within_its_share_is_never_evicted_for_another() {
        // Every flow is opened within 13 s and lives for 120 s: looked up at 100 s.
        const LATER: u64 = 100 * S;
        let mut ct = ConnTrack::new(8, 1);
        let mut now = 0;
        let mut open = |ct: &mut ConnTrack, client: u32, sport: u16| {
            now += S;
            ct.create(now, syn_key(client, sport, 1), Some(TCP_SYN))
        };
        for sport in 0..4 {
            open(&mut ct, 1, sport).expect("room");
            open(&mut ct, 2, sport).expect("room");
        }
        // Full, 4 each: client 1 is at its share (8 / 2) and gives up its own oldest.
        open(&mut ct, 1, 4).expect("own flow");
        assert_eq!(ct.lookup_original(&syn_key(1, 0, 1), LATER), None);
        assert_eq!((ct.client_flows(1), ct.client_flows(2)), (4, 4));
        // A third client's share is 8 / 3 = 2: it takes from the fullest (a tie: the lower
        // id), then from the other, then from itself.
        open(&mut ct, 3, 0).expect("from client 1");
        assert_eq!((ct.client_flows(1), ct.client_flows(2)), (3, 4));
        assert_eq!(ct.lookup_original(&syn_key(1, 1, 1), LATER), None);
        open(&mut ct, 3, 1).expect("from client 2");
        assert_eq!((ct.client_flows(1), ct.client_flows(2)), (3, 3));
        assert_eq!(ct.lookup_original(&syn_key(2, 0, 1), LATER), None);
        open(&mut ct, 3, 2).expect("from itself");
        assert_eq!(ct.client_flows(3), 2);
        assert_eq!(ct.lookup_original(&syn_key(3, 0, 1), LATER), None);
        assert_eq!(ct.fair_share(), 2);
        check_invariants(&ct);
    }

    #[test]
    fn the_reserve_is_kept_whatever_the_number_of_clients() {
        // 640 flows: a reserve of 10 per client; 64 clients with 10 each fill the table.
        let mut ct = ConnTrack::new(640, 1);
        for client in 1..=64u32 {
            for sport in 0..10 {
                ct.create(0, syn_key(client, sport, 1), Some(TCP_SYN))
                    .expect("room");
            }
        }
        assert_eq!(ct.len(), 640);
        // A 65th client's share would be 640 / 65 = 9, below the reserve: nobody is over 10,
        // so nobody loses a flow and the new one is refused.
        assert_eq!(
            ct.create(0, syn_key(65, 0, 1), Some(TCP_SYN)),
            Err(TableFull)
        );
        assert!((1..=64).all(|c| ct.client_flows(c) == 10));
        check_invariants(&ct);
    }

    #[test]
    fn eviction_order_unreplied_then_unassured_or_closing_then_assured() {
        let mut ct = ConnTrack::new(5, 1);
        let c1 = |sport| udp(sport);
        let a = ct.create(0, c1(1), None).expect("room");
        ct.update(a, 0, Dir::Reply, None); // assured
        let b = ct.create(0, c1(2), None).expect("room");
        ct.update(b, 0, Dir::Reply, None); // assured
        let c = ct.create(0, tcp(3), Some(TCP_SYN)).expect("room");
        let d = ct.create(0, tcp(4), Some(TCP_SYN)).expect("room");
        ct.update(d, S, Dir::Reply, Some(TCP_SYN | TCP_ACK)); // half-open: unassured
        ct.update(c, 2 * S, Dir::Reply, Some(TCP_SYN | TCP_ACK));
        ct.update(c, 2 * S, Dir::Original, Some(TCP_ACK)); // established, assured
        ct.update(c, 3 * S, Dir::Original, Some(TCP_FIN | TCP_ACK)); // closing
        let _e = ct.create(3 * S, c1(5), None).expect("room"); // unreplied
        let now = 4 * S;
        let gone = |ct: &ConnTrack, k: FlowKey| ct.lookup_original(&k, now).is_none();
        // Alone and at its share: its own unreplied flow goes first.
        ct.create(now, c1(6), None).expect("evicts e");
        assert!(gone(&ct, c1(5)));
        // Client 2 (share 5 / 2 = 2) takes from client 1: the unreplied f...
        let other = |sport| key(L4::Udp, 2, sport, v4(9, 9, 9, 9), 53);
        ct.create(now, other(1), None).expect("evicts f");
        assert!(gone(&ct, c1(6)));
        // ...then the oldest unassured or closing one: d (half-open since 1 s) before c
        // (closing since 3 s).
        ct.create(now, other(2), None).expect("evicts d");
        assert!(gone(&ct, tcp(4)) && !gone(&ct, tcp(3)));
        // Client 1 (3 flows, over its share of 2) gives up its own: c, not an assured one.
        let i = ct.create(now, c1(7), None).expect("evicts c");
        assert!(gone(&ct, tcp(3)));
        ct.update(i, now, Dir::Reply, None);
        // Only assured flows left: client 1 is refused rather than lose them.
        assert_eq!(ct.create(now, c1(8), None), Err(TableFull));
        assert!([1, 2, 7].iter().all(|&p| !gone(&ct, c1(p))));
        // A third client (share 5 / 3 = 1) takes client 1's oldest assured flow: a.
        let third = key(L4::Udp, 3, 1, v4(9, 9, 9, 9), 53);
        ct.create(now, third, None).expect("evicts a");
        assert!(gone(&ct, c1(1)) && !gone(&ct, c1(2)));
        check_invariants(&ct);
    }

    #[test]
    fn a_reopened_connection_is_evictable_again_in_creation_order() {
        let mut ct = ConnTrack::new(2, 1);
        let a = ct.create(0, tcp(1), Some(TCP_SYN)).expect("room");
        let _b = ct.create(S, tcp(2), Some(TCP_SYN)).expect("room");
        // a closes with a RST and is reopened: it is now newer than b.
        ct.update(a, 2 * S, Dir::Original, Some(TCP_RST));
        ct.update(a, 3 * S, Dir::Original, Some(TCP_SYN));
        ct.create(4 * S, tcp(3), Some(TCP_SYN)).expect("evicts");
        assert!(ct.lookup_original(&tcp(1), 4 * S).is_some());
        assert_eq!(ct.lookup_original(&tcp(2), 4 * S), None);
        check_invariants(&ct);
    }

    #[test]
    fn zero_capacity_table_refuses_everything() {
        let mut ct = ConnTrack::new(0, 1);
        assert_eq!(ct.create(0, udp(1), None), Err(TableFull));
        assert!(ct.is_empty());
    }

    #[test]
    fn retain_and_remove_client_keep_indexes_consistent() {
        let mut ct = ConnTrack::new(1000, 9);
        let mut keys = Vec::new();
        for client in 1..=3u32 {
            for sport in 0..50u16 {
                let l4 = [L4::Tcp, L4::Udp, L4::Icmp][usize::from(sport % 3)];
                let k = key(
                    l4,
                    client,
                    sport,
                    v4(192, 0, 2, sport as u8),
                    80 + sport % 2,
                );
                let id = ct.create(0, k, Some(TCP_SYN)).expect("room");
                keys.push((k, flow(&ct, id).reply_key()));
            }
        }
        assert_eq!(ct.remove_client(2), 50);
        assert_eq!(ct.remove_client(2), 0);
        check_invariants(&ct);
        for (k, rk) in &keys {
            let present = ct.lookup_original(k, 0);
            assert_eq!(present.is_some(), k.client != 2);
            assert_eq!(ct.lookup_reply(rk, 0), present);
        }
        let removed = ct.retain(|f| f.key.dport != 81);
        assert_eq!(removed, 50);
        check_invariants(&ct);
        for (k, rk) in &keys {
            let want = k.client != 2 && k.dport != 81;
            assert_eq!(ct.lookup_original(k, 0).is_some(), want);
            assert_eq!(ct.lookup_reply(rk, 0).is_some(), want);
        }
        // Freed slots are reused, indexes stay right.
        for sport in 1000..1100u16 {
            let k = key(L4::Udp, 4, sport, v4(192, 0, 2, 1), 53);
            let id = ct.create(0, k, None).expect("room");
            assert_eq!(ct.lookup_original(&k, 0), Some(id));
        }
        check_invariants(&ct);
        assert_eq!(ct.retain(|_| false), 150);
        assert!(ct.is_empty());
        check_invariants(&ct);
    }

    #[test]
    fn bad_ids_are_harmless() {
        let mut ct = ConnTrack::new(4, 1);
        let id = ct.create(0, udp(1), None).expect("room");
        ct.remove(id);
        for bad in [id, FlowId(3), FlowId(u32::MAX)] {
            assert_eq!(ct.try_get(bad), None);
            assert_eq!(ct.get(bad), &PLACEHOLDER_FLOW);
            ct.update(bad, S, Dir::Reply, Some(TCP_RST));
            ct.remove(bad);
        }
        assert!(ct.is_empty());
        assert_eq!(ct.expire(u64::MAX), 0);
        check_invariants(&ct);
    }

    #[test]
    fn times_near_the_end_of_the_clock_saturate() {
        let mut ct = ConnTrack::new(4, 1);
        let id = ct.create(u64::MAX - S, udp(1), None).expect("room");
        assert_eq!(flow(&ct, id).expires_at, u64::MAX);
        assert_eq!(ct.expire(u64::MAX - 1), 0);
        assert_eq!(ct.expire(u64::MAX), 1);
    }

    #[test]
    fn ipv6_flows() {
        let mut ct = ConnTrack::new(16, 1);
        let dst = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
        let mut k = key(L4::Tcp, 1, 5000, dst, 443);
        k.src = IpAddr::V6(Ipv6Addr::new(0xfd09, 0xa5a0, 0, 0, 0, 0, 0, 0x0a89));
        let id = ct.create(0, k, Some(TCP_SYN)).expect("room");
        let rk = flow(&ct, id).reply_key();
        assert_eq!(ct.lookup_reply(&rk, 1), Some(id));
        assert_eq!(ct.lookup_original(&k, 1), Some(id));
        let mut k4 = k;
        k4.src = v4(10, 137, 0, 1);
        assert_eq!(ct.lookup_original(&k4, 1), None);
    }

    #[test]
    fn bytes_per_flow_is_plausible() {
        let ct = ConnTrack::new(65_536, 1);
        let b = ct.bytes_per_flow();
        assert!((150..400).contains(&b), "{b}");
        assert!(ConnTrack::new(0, 1).bytes_per_flow() > 0);
    }

    #[test]
    fn iteration_is_by_id() {
        let mut ct = ConnTrack::new(16, 1);
        for i in 0..10 {
            ct.create(0, udp(i), None).expect("room");
        }
        ct.remove(FlowId(3));
        ct.remove(FlowId(7));
        let ids: Vec<u32> = ct.iter().map(|(id, _)| id.0).collect();
        assert_eq!(ids, [0, 1, 2, 4, 5, 6, 8, 9]);
        // The most recently freed slot is reused first.
        assert_eq!(ct.create(0, udp(100), None), Ok(FlowId(7)));
        assert_eq!(ct.create(0, udp(101), None), Ok(FlowId(3)));
        assert_eq!(ct.create(0, udp(102), None), Ok(FlowId(10)));
    }

    /// Differential test against a plain `Vec` model with its own (table-shaped) statement of
    /// the semantics: linear scans, no indexes, no heap, no lists.
    mod model {
        use super::*;
        use proptest::prelude::*;

        #[derive(Clone, Copy, Debug)]
        struct KeySpec {
            client: u32,
            l4: u8,
            dst: u8,
            v6: bool,
            sport: u16,
            dport: u16,
        }

        impl KeySpec {
            fn key(self) -> FlowKey {
                let l4 = [L4::Tcp, L4::Udp, L4::Icmp][usize::from(self.l4 % 3)];
                let (src, dst) = if self.v6 {
                    (
                        IpAddr::V6(Ipv6Addr::new(0xfd09, 0, 0, 0, 0, 0, 0, self.client as u16)),
                        IpAddr::V6(Ipv6Addr::new(
                            0x2001,
                            0xdb8,
                            0,
                            0,
                            0,
                            0,
                            0,
                            u16::from(self.dst),
                        )),
                    )
                } else {
                    (v4(10, 137, 0, self.client as u8), v4(192, 0, 2, self.dst))
                };
                FlowKey {
                    client: self.client,
                    l4,
                    src,
                    dst,
                    sport: self.sport,
                    dport: if l4 == L4::Icmp { 0 } else { self.dport },
                }
            }
        }

        #[derive(Clone, Debug)]
        enum Op {
            Create(KeySpec, u8),
            Update(usize, bool, u8),
            LookupOrig(KeySpec),
            LookupReplyOf(usize),
            LookupReply(KeySpec, u16),
            Remove(usize),
            RemoveBad(u32),
            Expire,
            RemoveClient(u32),
            Retain(u16),
            Advance(u64),
        }

        fn key_spec() -> impl Strategy<Value = KeySpec> {
            (
                1..4u32,
                0..3u8,
                0..3u8,
                prop::bool::weighted(0.2),
                0..5u16,
                0..3u16,
            )
                .prop_map(|(client, l4, dst, v6, sport, dport)| KeySpec {
                    client,
                    l4,
                    dst,
                    v6,
                    sport,
                    dport,
                })
        }

        fn flags() -> impl Strategy<Value = u8> {
            prop_oneof![
                Just(TCP_SYN),
                Just(TCP_SYN | TCP_ACK),
                Just(TCP_ACK),
                Just(TCP_ACK | TCP_PSH),
                Just(TCP_FIN | TCP_ACK),
                Just(TCP_FIN),
                Just(TCP_RST),
                Just(0u8),
                any::<u8>(),
            ]
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => (key_spec(), flags()).prop_map(|(k, f)| Op::Create(k, f)),
                6 => (any::<usize>(), any::<bool>(), flags()).prop_map(|(i, r, f)| Op::Update(i, r, f)),
                2 => key_spec().prop_map(Op::LookupOrig),
                2 => any::<usize>().prop_map(Op::LookupReplyOf),
                1 => (key_spec(), 1024..1100u16).prop_map(|(k, p)| Op::LookupReply(k, p)),
                1 => any::<usize>().prop_map(Op::Remove),
                1 => (0..64u32).prop_map(Op::RemoveBad),
                2 => Just(Op::Expire),
                1 => (1..4u32).prop_map(Op::RemoveClient),
                1 => (2..5u16).prop_map(Op::Retain),
                3 => prop_oneof![
                    4 => 0..5u64,
                    4 => 0..200u64,
                    1 => 250..600u64,
                    1 => 400_000..500_000u64,
                ]
                .prop_map(Op::Advance),
            ]
        }

        #[derive(Clone, Debug)]
        struct MFlow {
            id: FlowId,
            flow: Flow,
            fin: Option<Dir>,
            /// When the flow entered its eviction class (creation, a class change, a reopen):
            /// eviction takes the smallest of a class.
            seq: u64,
        }

        #[derive(Debug)]
        struct Model {
            flows: Vec<MFlow>,
            max: usize,
            seq: u64,
        }

        fn model_tcp(
            s: TcpState,
            fin: Option<Dir>,
            d: Dir,
            fl: u8,
        ) -> (TcpState, Option<Dir>, bool) {
            use TcpState::*;
            #[derive(PartialEq)]
            enum Ev {
                Rst,
                Syn,
                SynAck,
                Fin,
                Ack,
                Other,
            }
            let ev = if fl & TCP_RST != 0 {
                Ev::Rst
            } else if fl & TCP_SYN != 0 && fl & TCP_ACK != 0 {
                Ev::SynAck
            } else if fl & TCP_SYN != 0 {
                Ev::Syn
            } else if fl & TCP_FIN != 0 {
                Ev::Fin
            } else if fl & TCP_ACK != 0 {
                Ev::Ack
            } else {
                Ev::Other
            };
            let other = matches!(fin, Some(f) if f != d);
            match (ev, s, d) {
                (Ev::Rst, _, _) => (Close, fin, false),
                (Ev::Syn, TimeWait | Close, Dir::Original) => (SynSent, Option::None, true),
                (Ev::SynAck, SynSent, Dir::Reply) => (SynRecv, fin, false),
                (Ev::Fin, Established | SynRecv, _) => (FinWait, Some(d), false),
                (Ev::Fin, FinWait | CloseWait, _) if other => (LastAck, fin, false),
                (Ev::Ack, SynRecv, Dir::Original) => (Established, fin, false),
                (Ev::Ack, FinWait, _) if other => (CloseWait, fin, false),
                (Ev::Ack, LastAck, _) => (TimeWait, fin, false),
                _ => (s, fin, false),
            }
        }

        /// 0: never replied; 1: replied but not assured, or a closing TCP state; 2: the rest.
        fn model_class(f: &Flow) -> u8 {
            use TcpState::*;
            if !f.replied {
                0
            } else if !f.assured
                || matches!(f.tcp, FinWait | CloseWait | LastAck | TimeWait | Close)
            {
                1
            } else {
                2
            }
        }

        fn model_secs(f: &Flow) -> u64 {
            match (f.key.l4, f.tcp) {
                (L4::Udp, _) => {
                    if f.replied {
                        120
                    } else {
                        30
                    }
                }
                (L4::Icmp, _) => 30,
                (L4::Tcp, TcpState::SynSent) => 120,
                (L4::Tcp, TcpState::SynRecv) => 60,
                (L4::Tcp, TcpState::Established) => {
                    if f.replied {
                        432_000
                    } else {
                        300
                    }
                }
                (L4::Tcp, TcpState::FinWait) => 120,
                (L4::Tcp, TcpState::CloseWait) => 60,
                (L4::Tcp, TcpState::LastAck) => 30,
                (L4::Tcp, TcpState::TimeWait) => 120,
                (L4::Tcp, TcpState::Close) => 10,
                (L4::Tcp, TcpState::None) => panic!("TCP flow in state None"),
                (L4::Other(47), _) => {
                    if f.replied {
                        180
                    } else {
                        30
                    }
                }
                (L4::Other(_), _) => 600,
            }
        }

        impl Model {
            fn update(&mut self, i: usize, now: u64, d: Dir, fl: u8) {
                self.seq += 1;
                let seq = self.seq;
                let m = &mut self.flows[i];
                let class_before = model_class(&m.flow);
                let mut reopened = false;
                let f = &mut m.flow;
                f.last_seen = now;
                if d == Dir::Reply {
                    f.replied = true;
                }
                if f.key.l4 == L4::Tcp {
                    let old = f.tcp;
                    let (st, fin, reopen) = model_tcp(old, m.fin, d, fl);
                    f.tcp = st;
                    m.fin = fin;
                    if reopen {
                        f.replied = false;
                        f.assured = false;
                        f.created = now;
                        reopened = true;
                    } else if f.replied
                        && (old == TcpState::Established || st == TcpState::Established)
                    {
                        f.assured = true;
                    }
                } else if f.replied {
                    f.assured = true;
                }
                f.expires_at = now.saturating_add(model_secs(f) * S);
                if reopened || model_class(&m.flow) != class_before {
                    m.seq = seq;
                }
            }

            /// The flow to evict for a new flow of `client` in the full model table, by the
            /// rules of the module docs stated plainly: `Err(())` when there is none.
            fn victim(&self, client: u32) -> Result<usize, ()> {
                let count = |c: u32| self.flows.iter().filter(|f| f.flow.key.client == c).count();
                let mut clients: Vec<u32> = self.flows.iter().map(|f| f.flow.key.client).collect();
                clients.sort_unstable();
                clients.dedup();
                let active = clients.len() + usize::from(!clients.contains(&client));
                let share = (self.max / 64).clamp(1, 256).max(self.max / active);
                let oldest = |c: u32, classes: &[u8]| {
                    classes.iter().find_map(|&class| {
                        self.flows
                            .iter()
                            .enumerate()
                            .filter(|(_, f)| {
                                f.flow.key.client == c && model_class(&f.flow) == class
                            })
                            .min_by_key(|(_, f)| f.seq)
                            .map(|(i, _)| i)
                    })
                };
                if count(client) >= share {
                    return oldest(client, &[0, 1]).ok_or(());
                }
                let fullest = clients
                    .iter()
                    .copied()
                    .filter(|&c| c != client)
                    .max_by_key(|&c| (count(c), std::cmp::Reverse(c)))
                    .ok_or(())?;
                if count(fullest) <= share {
                    return Err(());
                }
                oldest(fullest, &[0, 1, 2]).ok_or(())
            }

            fn expire(&mut self, now: u64) -> usize {
                let before = self.flows.len();
                self.flows.retain(|m| m.flow.expires_at > now);
                before - self.flows.len()
            }

            fn find(&self, k: &FlowKey, now: u64) -> Option<FlowId> {
                let mut hits = self
                    .flows
                    .iter()
                    .filter(|m| m.flow.key == *k && m.flow.expires_at > now);
                let hit = hits.next().map(|m| m.id);
                assert!(hits.next().is_none());
                hit
            }

            fn find_reply(&self, k: &ReplyKey, now: u64) -> Option<FlowId> {
                let mut hits = self
                    .flows
                    .iter()
                    .filter(|m| m.flow.reply_key() == *k && m.flow.expires_at > now);
                let hit = hits.next().map(|m| m.id);
                assert!(hits.next().is_none());
                hit
            }

            fn index_of(&self, id: FlowId) -> Option<usize> {
                self.flows.iter().position(|m| m.id == id)
            }
        }

        fn run(max: usize, seed: u64, ops: Vec<Op>) {
            let mut ct = ConnTrack::new(max, seed);
            let mut m = Model {
                flows: Vec::new(),
                max,
                seq: 0,
            };
            let mut now = 1_000 * S;
            for op in ops {
                match op {
                    Op::Create(ks, fl) => {
                        let k = ks.key();
                        let tcp_flags = (k.l4 == L4::Tcp).then_some(fl);
                        let got = ct.create(now, k, tcp_flags);
                        if let Some(id) = m.find(&k, now) {
                            assert_eq!(got, Ok(id));
                            let i = m.index_of(id).expect("model flow");
                            m.update(i, now, Dir::Original, fl);
                        } else {
                            m.flows.retain(|f| f.flow.key != k);
                            if m.flows.len() >= m.max {
                                m.expire(now);
                            }
                            let victim = if m.flows.len() >= m.max {
                                match m.victim(k.client) {
                                    Ok(v) => Some(v),
                                    Err(()) => {
                                        assert_eq!(got, Err(TableFull));
                                        continue;
                                    }
                                }
                            } else {
                                None
                            };
                            if let Some(v) = victim {
                                m.flows.remove(v);
                            }
                            let id = got.expect("room");
                            assert!(m.index_of(id).is_none(), "id {id:?} still in use");
                            let real = *ct.get(id);
                            let lo = if k.l4 == L4::Icmp { 0 } else { 1024 };
                            assert!(real.nat_port >= lo);
                            let rk = real.reply_key();
                            assert!(m.flows.iter().all(|f| f.flow.reply_key() != rk));
                            let (tcp, fin) = if k.l4 != L4::Tcp {
                                (TcpState::None, None)
                            } else if fl & TCP_RST != 0 {
                                (TcpState::Close, None)
                            } else if fl & (TCP_SYN | TCP_ACK) == TCP_SYN {
                                (TcpState::SynSent, None)
                            } else if fl & TCP_SYN == 0 && fl & TCP_FIN != 0 {
                                (TcpState::FinWait, Some(Dir::Original))
                            } else {
                                (TcpState::Established, None)
                            };
                            let mut flow = Flow {
                                key: k,
                                nat_port: real.nat_port,
                                tcp,
                                replied: false,
                                assured: false,
                                created: now,
                                last_seen: now,
                                expires_at: 0,
                                dnat: None,
                            };
                            flow.expires_at = now + model_secs(&flow) * S;
                            m.seq += 1;
                            m.flows.push(MFlow {
                                id,
                                flow,
                                fin,
                                seq: m.seq,
                            });
                        }
                    }
                    Op::Update(pick, reply, fl) => {
                        if m.flows.is_empty() {
                            continue;
                        }
                        let i = pick % m.flows.len();
                        let id = m.flows[i].id;
                        let d = if reply { Dir::Reply } else { Dir::Original };
                        let tcp_flags = (m.flows[i].flow.key.l4 == L4::Tcp).then_some(fl);
                        ct.update(id, now, d, tcp_flags);
                        m.update(i, now, d, fl);
                    }
                    Op::LookupOrig(ks) => {
                        let k = ks.key();
                        assert_eq!(ct.lookup_original(&k, now), m.find(&k, now));
                    }
                    Op::LookupReplyOf(pick) => {
                        if m.flows.is_empty() {
                            continue;
                        }
                        let rk = m.flows[pick % m.flows.len()].flow.reply_key();
                        assert_eq!(ct.lookup_reply(&rk, now), m.find_reply(&rk, now));
                    }
                    Op::LookupReply(ks, port) => {
                        let f = ks.key();
                        let rk = ReplyKey {
                            l4: f.l4,
                            remote: f.dst,
                            rport: f.dport,
                            nat_port: port,
                        };
                        assert_eq!(ct.lookup_reply(&rk, now), m.find_reply(&rk, now));
                    }
                    Op::Remove(pick) => {
                        if m.flows.is_empty() {
                            continue;
                        }
                        let i = pick % m.flows.len();
                        ct.remove(m.flows[i].id);
                        m.flows.remove(i);
                    }
                    Op::RemoveBad(id) => {
                        if m.index_of(FlowId(id)).is_none() {
                            ct.remove(FlowId(id));
                            ct.update(FlowId(id), now, Dir::Reply, Some(TCP_ACK));
                            assert_eq!(ct.try_get(FlowId(id)), None);
                        }
                    }
                    Op::Expire => {
                        assert_eq!(ct.expire(now), m.expire(now));
                    }
                    Op::RemoveClient(c) => {
                        let before = m.flows.len();
                        m.flows.retain(|f| f.flow.key.client != c);
                        assert_eq!(ct.remove_client(c), before - m.flows.len());
                    }
                    Op::Retain(d) => {
                        let keep = |f: &Flow| !f.key.sport.is_multiple_of(d);
                        let before = m.flows.len();
                        m.flows.retain(|f| keep(&f.flow));
                        assert_eq!(ct.retain(keep), before - m.flows.len());
                    }
                    Op::Advance(secs) => now += secs * S,
                }
                let mut want: Vec<(FlowId, Flow)> =
                    m.flows.iter().map(|f| (f.id, f.flow)).collect();
                want.sort_by_key(|(id, _)| id.0);
                let got: Vec<(FlowId, Flow)> = ct.iter().map(|(id, f)| (id, *f)).collect();
                assert_eq!(got, want);
                check_invariants(&ct);
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn matches_the_model(
                max in 1..14usize,
                seed in any::<u64>(),
                ops in prop::collection::vec(op(), 1..250),
            ) {
                run(max, seed, ops);
            }
        }
    }
}
