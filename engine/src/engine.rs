//! The engine: a sys-firewall as a pure function of (time, interface, frame).
//!
//! It does what a Linux sys-firewall does for its clients (upstream qubes-core-agent-linux
//! `network/vif-route-qubes` and `qubesagent/firewall.py`): answers ARP/NDP for the gateway,
//! drops spoofed sources, applies each client's Qubes rules to new flows (rejecting with ICMP
//! admin-prohibited as the agent's nft chain does), tracks connections and masquerades them to
//! its own address, and handles TTL, MTU, fragments and ICMP errors like a router. It never does
//! I/O and never reads a clock: the shell passes `now` (a monotonic [`Instant`]) and sends what
//! the engine returns.
//!
//! Forwarded frames are rewritten in place ([`Verdict::Forward`]); anything the engine builds
//! itself (ARP and NDP answers, ICMP errors, reassembled or fragmented packets) goes to the
//! [`Outbox`], which keeps its buffers across calls. The forwarding path does not allocate.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use qubes_rules::agent::{read_rules, MatchDst, MatchRule};
use qubes_rules::classifier::{Classifier, Packet, PacketProto, UnresolvedPolicy};
use qubes_rules::{Action, Family};
use rustc_hash::FxHashMap;

use crate::config::{
    ClientConfig, ConfigError, EngineConfig, Mac, UplinkMode, Visible, GATEWAY_MAC,
};
use crate::conntrack::{ConnTrack, Dir, FlowKey, ReplyKey, L4 as Proto4};
use crate::frag::{self, Reassembler};
use crate::ratelimit::IcmpLimiter;
use crate::tcpwin;
use crate::time::Instant;
use crate::wire::{self, Ip, IpError, Ipv4Repr, Ipv6Repr, NatCsum, NatField, ETH_LEN};

/// An interface: 0 is the uplink; a client vif has a stable id of its own.
///
/// A vif keeps its id for as long as it is in the configuration, wherever it sits in the vif
/// list, and flows belong to that id: qubes starting and stopping around it never disturb it.
/// Ids are never reused: a vif that goes away and comes back (a restarted qube, which in
/// Qubes comes back with a new domid and so a new `vifN.0` name anyway) gets a fresh one, so
/// nothing of the old one (flows, fragments) can reach it. The first configuration's vifs
/// get 1, 2, ... in list order.
pub type IfaceId = u32;

/// The uplink's interface id.
pub const UPLINK: IfaceId = 0;

/// What happened to the frame passed to [`Engine::handle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The frame was rewritten in place (same length) and must be sent on this interface.
    Forward(IfaceId),
    /// The frame must not be sent; anything to send instead is in the [`Outbox`].
    Consumed,
}

/// What the kernel left undone on a frame read from an AF_PACKET socket with its virtio_net
/// header: the engine then forwards it as it is, without recomputing what the kernel will.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offload {
    /// The transport checksum field holds only the pseudo-header sum (`NEEDS_CSUM`); address
    /// rewrites update that sum, and the receiving side computes the rest.
    pub partial_csum: bool,
    /// The kernel already verified the transport checksum (`DATA_VALID`).
    pub csum_valid: bool,
    /// A GSO super-frame: segments of this many payload bytes are what go on the wire.
    pub gso_size: u16,
}

impl Offload {
    /// A finished, wire-sized frame: everything is checked.
    pub const NONE: Offload = Offload {
        partial_csum: false,
        csum_valid: false,
        gso_size: 0,
    };
}

/// What became of a frame: the counter it lands in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Forwarded (or answered, for ARP/NDP and pings of the gateway).
    Accepted,
    /// A new flow the client's rules refuse; answered with ICMP admin-prohibited.
    RejectedByRule,
    /// Source address not the client's (or, from the uplink, a client's or ours).
    Spoofed,
    /// From the uplink and not part of a tracked flow (no inbound connections).
    NoFlow,
    /// Truncated, bad lengths, bad checksums, unknown ethertype.
    Malformed,
    /// The connection table is full of flows it must not evict.
    TableFull,
    /// From one client to another.
    ClientToClient,
    /// TTL or hop limit ran out; answered with ICMP time exceeded.
    TtlExceeded,
    /// Too big for the next link with DF (or IPv6); answered with ICMP.
    TooBig,
    /// Well-formed but not something a sys-firewall forwards (IPv6 without an address, IPv6
    /// extension headers, ICMP messages that are neither queries nor errors, broadcast).
    Unsupported,
    /// Addressed to the firewall itself and not something it serves (Linux rejects it with
    /// host-prohibited).
    Local,
    /// Not valid for the state of its connection (conntrack's `ct state invalid`, which the
    /// Qubes forward chain drops): a TCP flag combination no stack sends, a new flow that does
    /// not start with a SYN (or an ACK, loose pickup), a segment outside the window.
    Invalid,
    /// An IP frame whose destination MAC is not ours: another host's unicast (Linux drops
    /// `PACKET_OTHERHOST` in `ip_rcv`), or broadcast/multicast, which only the firewall's own
    /// services may take (`ip_forward` forwards `PACKET_HOST` frames only).
    NotForUs,
    /// A DNS query to a virtual resolver that has no upstream resolver (sys-net without a
    /// lease or configured servers): refused at once with ICMP port unreachable.
    NoUpstreamDns,
    /// The uplink has no address (sys-net before its first lease, or after it expired):
    /// nothing can leave; answered with ICMP net unreachable, as a router without a route.
    NoUplink,
}

impl Reason {
    pub const ALL: [Reason; 15] = [
        Reason::Accepted,
        Reason::RejectedByRule,
        Reason::Spoofed,
        Reason::NoFlow,
        Reason::Malformed,
        Reason::TableFull,
        Reason::ClientToClient,
        Reason::TtlExceeded,
        Reason::TooBig,
        Reason::Unsupported,
        Reason::Local,
        Reason::Invalid,
        Reason::NotForUs,
        Reason::NoUpstreamDns,
        Reason::NoUplink,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Reason::Accepted => "accepted",
            Reason::RejectedByRule => "rejected-by-rule",
            Reason::Spoofed => "spoofed",
            Reason::NoFlow => "no-flow",
            Reason::Malformed => "malformed",
            Reason::TableFull => "table-full",
            Reason::ClientToClient => "client-to-client",
            Reason::TtlExceeded => "ttl-exceeded",
            Reason::TooBig => "too-big",
            Reason::Unsupported => "unsupported",
            Reason::Local => "local",
            Reason::Invalid => "invalid",
            Reason::NotForUs => "not-for-us",
            Reason::NoUpstreamDns => "no-upstream-dns",
            Reason::NoUplink => "no-uplink",
        }
    }
}

/// Frame counts by [`Reason`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters([u64; Reason::ALL.len()]);

impl Counters {
    pub fn get(&self, r: Reason) -> u64 {
        self.0[r as usize]
    }
    fn bump(&mut self, r: Reason) {
        self.0[r as usize] += 1;
    }
    /// `(reason, count)` for every reason.
    pub fn iter(&self) -> impl Iterator<Item = (Reason, u64)> + '_ {
        Reason::ALL.iter().map(|&r| (r, self.get(r)))
    }
}

/// Something the shell should know or do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Resolve this name and call [`Engine::dns_answer`].
    Resolve { name: String },
    /// A frame was dropped (for logging, rate-limited by the shell).
    Dropped { iface: IfaceId, reason: Reason },
    /// A client's rules could not be used; it is blocked until they can (fail closed).
    ClientBlocked { iface: IfaceId, error: String },
    /// Flows cut because new rules refuse them.
    FlowsCut { iface: IfaceId, count: usize },
}

/// Frames and events produced by one engine call. Reused across calls, so it stops allocating
/// once warmed up.
#[derive(Debug, Default)]
pub struct Outbox {
    data: Vec<u8>,
    frames: Vec<(IfaceId, usize, usize)>,
    local: Vec<(usize, usize)>,
    dhcp: Vec<(usize, usize)>,
    pub events: Vec<Event>,
}

impl Outbox {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn clear(&mut self) {
        self.data.clear();
        self.frames.clear();
        self.local.clear();
        self.dhcp.clear();
        self.events.clear();
    }

    /// Appends a DHCP message (the UDP payload) for the service's DHCP client
    /// ([`Engine::set_dhcp_client`]).
    pub fn push_dhcp(&mut self, payload: &[u8]) {
        let start = self.data.len();
        self.data.extend_from_slice(payload);
        self.dhcp.push((start, payload.len()));
    }

    /// The DHCP messages that came for the service's DHCP client, in order.
    pub fn dhcp_messages(&self) -> impl Iterator<Item = &[u8]> {
        self.dhcp.iter().map(|&(s, l)| &self.data[s..s + l])
    }

    /// Appends an IP packet for the service's host stack ([`Engine::bind_local`]).
    pub fn push_local(&mut self, packet: &[u8]) {
        let start = self.data.len();
        self.data.extend_from_slice(packet);
        self.local.push((start, packet.len()));
    }

    /// The IP packets (no Ethernet header) delivered to the host stack, in order.
    pub fn local_packets(&self) -> impl Iterator<Item = &[u8]> {
        self.local.iter().map(|&(s, l)| &self.data[s..s + l])
    }

    /// Appends a frame to send.
    pub fn push_frame(&mut self, iface: IfaceId, frame: &[u8]) {
        let start = self.data.len();
        self.data.extend_from_slice(frame);
        self.frames.push((iface, start, frame.len()));
    }

    /// The frames, in the order they were produced.
    pub fn frames(&self) -> impl Iterator<Item = (IfaceId, &[u8])> {
        self.frames
            .iter()
            .map(|&(i, s, l)| (i, &self.data[s..s + l]))
    }

    pub fn frame_count(&self) -> usize {
        self.frames.len()
    }
}

/// Why [`Engine::send_local`] refused a packet from the host stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalSendError {
    /// Not a whole IPv4 or IPv6 packet (bad header, lengths, a fragment).
    Malformed,
    /// Its source is not our address of that family (or we have none).
    NotOurAddress,
    /// A TCP or UDP source port the host stack did not bind.
    PortNotBound,
    /// Addressed to a client qube in masquerade mode: the service's own traffic goes to the
    /// uplink only.
    ToClient,
    /// To a client, from a client's address: the host stack may not speak for a client.
    ClientSource,
    /// Bigger than the uplink's MTU and not fragmentable.
    TooBig,
}

impl std::fmt::Display for LocalSendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LocalSendError::Malformed => "not a whole, unfragmented IP packet",
            LocalSendError::NotOurAddress => "its source is not the service's own address",
            LocalSendError::PortNotBound => "its source port is not bound for local use",
            LocalSendError::ToClient => "it is addressed to a client qube",
            LocalSendError::ClientSource => "its source is a client qube's address",
            LocalSendError::TooBig => "it does not fit the uplink's MTU",
        })
    }
}

impl std::error::Error for LocalSendError {}

/// Why [`Engine::set_mtu`] refused (and changed nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MtuError {
    /// No interface has this id (a vif that went away).
    NoSuchIface { iface: IfaceId },
    /// Below the IPv4 minimum of 68 bytes (RFC 791).
    TooSmall { iface: String, mtu: u16 },
}

impl std::fmt::Display for MtuError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MtuError::NoSuchIface { iface } => write!(f, "no interface has id {iface}"),
            MtuError::TooSmall { iface, mtu } => write!(
                f,
                "{iface}: MTU {mtu} is below {} (RFC 791: every IPv4 link carries 68 bytes)",
                frag::MIN_MTU
            ),
        }
    }
}

impl std::error::Error for MtuError {}

/// How long a failed name lookup waits before it is retried.
const RESOLVE_RETRY_NS: u64 = 30_000_000_000;
/// Shortest time an answer is trusted, whatever its TTL says.
const MIN_TTL_NS: u64 = 1_000_000_000;
/// How often the netvm's MAC is asked for while unknown.
const ARP_RETRY_NS: u64 = 1_000_000_000;
/// ICMPv4 errors quote at most this much of the offending packet (RFC 1812 4.3.2.3: the error
/// must not exceed 576 bytes).
const ICMP4_ERROR_MAX: usize = 576;
/// ICMPv6 errors must fit the IPv6 minimum MTU (RFC 4443 2.4 (c)).
const ICMP6_ERROR_MAX: usize = 1280;
/// The IPv6 minimum link MTU (RFC 8200 section 5).
const IPV6_MIN_MTU: u16 = 1280;

/// A packet against the next link's MTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Size {
    Fits,
    /// IPv4 without DF: fragment it.
    Fragment,
    /// Refuse with ICMP fragmentation needed / packet too big carrying this MTU.
    TooBig(u16),
}

/// RFC 791's reassembly key: source, destination, protocol, identification.
type FragKey = (IpAddr, IpAddr, u8, u16);

fn frag_key(ip_header: &[u8]) -> Option<FragKey> {
    let ip = wire::parse_ipv4_header_only(ip_header).ok()?;
    Some((ip.src, ip.dst, ip.proto, wire::be16(ip_header, 4)))
}

#[derive(Debug, Clone)]
struct NameEntry {
    addrs: Option<Vec<IpAddr>>,
    /// When the answer runs out, or when to retry a failure.
    refresh_at: u64,
    requested: bool,
}

#[derive(Debug)]
struct Client {
    /// Its stable interface id.
    id: IfaceId,
    cfg: ClientConfig,
    /// Why the client is blocked, if its rules could not be used.
    blocked: Option<String>,
    class4: Classifier,
    class6: Classifier,
    names: Vec<String>,
    counters: Counters,
}

impl Client {
    /// A client with no rules compiled yet (everything refused).
    fn new(id: IfaceId, cfg: ClientConfig) -> Self {
        let none = |_: &str| None;
        Client {
            id,
            cfg,
            blocked: None,
            class4: Classifier::compile(&[], &[], &none, UnresolvedPolicy::SkipAccept),
            class6: Classifier::compile(&[], &[], &none, UnresolvedPolicy::SkipAccept),
            names: Vec::new(),
            counters: Counters::default(),
        }
    }
}

/// The engine.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    clients: Vec<Client>,
    /// Client interface id to its index in `clients`.
    by_id: FxHashMap<IfaceId, usize>,
    /// The next client interface id to hand out.
    next_id: IfaceId,
    by_ip4: FxHashMap<Ipv4Addr, usize>,
    by_ip6: FxHashMap<Ipv6Addr, usize>,
    conntrack: ConnTrack,
    frags: Reassembler,
    netvm_mac: Mac,
    netvm_mac_known: bool,
    arp_sent_at: Option<u64>,
    /// Frames waiting for the router's MAC (a netvm's uplink, where the next hop is a real
    /// host and no default MAC reaches it): sent once ARP answers, as Linux's neighbour
    /// queue (`unres_qlen`) holds them.
    arp_pending: Vec<Vec<u8>>,
    netvm_mac6: Mac,
    netvm_mac6_known: bool,
    names: BTreeMap<String, NameEntry>,
    uplink_counters: Counters,
    /// Events from building the engine, handed out with the first call that has an outbox.
    deferred: Vec<Event>,
    /// The offload state of the frame being handled ([`Engine::handle_offloaded`]).
    offload: Offload,
    /// The frame being handled came to a broadcast or multicast MAC: the firewall's own
    /// services (NDP, pings of the gateway) may take it, forwarding may not.
    link_group: bool,
    /// The time of the frame or tick being handled, for what needs it deep in the path.
    now: u64,
    /// The service runs a DHCP client on the uplink (sys-net).
    dhcp_client: bool,
    icmp_limit: IcmpLimiter,
    /// Where each held IPv4 datagram came in (`None`: the uplink; else the client), so
    /// a reassembly timeout is answered back through that interface and nowhere else.
    frag_ingress: BTreeMap<FragKey, (Option<IfaceId>, u64)>,
    ip_id: u16,
    scratch: Vec<u8>,
    build: Vec<u8>,
}

impl Engine {
    pub fn new(config: EngineConfig) -> Result<Self, ConfigError> {
        let mut e = Engine {
            conntrack: ConnTrack::new(config.conntrack_max, config.seed),
            frags: Reassembler::new(config.frag),
            cfg: config.clone(),
            clients: Vec::new(),
            by_id: FxHashMap::default(),
            next_id: 1,
            by_ip4: FxHashMap::default(),
            by_ip6: FxHashMap::default(),
            netvm_mac: GATEWAY_MAC,
            netvm_mac_known: false,
            arp_sent_at: None,
            arp_pending: Vec::new(),
            netvm_mac6: GATEWAY_MAC,
            netvm_mac6_known: false,
            names: BTreeMap::new(),
            uplink_counters: Counters::default(),
            deferred: Vec::new(),
            frag_ingress: BTreeMap::new(),
            offload: Offload::NONE,
            link_group: false,
            now: 0,
            dhcp_client: false,
            icmp_limit: IcmpLimiter::new(),
            ip_id: (config.seed as u16) ^ 0x5a5a,
            scratch: Vec::with_capacity(65_536),
            build: Vec::with_capacity(2048),
        };
        let mut out = Outbox::new();
        e.install(config, &mut out)?;
        e.deferred = out.events;
        Ok(e)
    }

    /// Interface id of an interface name.
    pub fn iface_by_name(&self, name: &str) -> Option<IfaceId> {
        if name == self.cfg.uplink.name {
            return Some(UPLINK);
        }
        self.clients
            .iter()
            .find(|c| c.cfg.vif == name)
            .map(|c| c.id)
    }

    /// Name of an interface id.
    pub fn iface_name(&self, id: IfaceId) -> Option<&str> {
        if id == UPLINK {
            return Some(&self.cfg.uplink.name);
        }
        self.client(id).map(|c| c.cfg.vif.as_str())
    }

    /// All interfaces, uplink first.
    pub fn ifaces(&self) -> Vec<(IfaceId, String)> {
        let mut v = vec![(UPLINK, self.cfg.uplink.name.clone())];
        for c in &self.clients {
            v.push((c.id, c.cfg.vif.clone()));
        }
        v
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Counters of one interface.
    pub fn counters(&self, iface: IfaceId) -> Option<&Counters> {
        if iface == UPLINK {
            Some(&self.uplink_counters)
        } else {
            self.client(iface).map(|c| &c.counters)
        }
    }

    /// Why a client is blocked, if it is.
    pub fn blocked(&self, iface: IfaceId) -> Option<&str> {
        self.client(iface).and_then(|c| c.blocked.as_deref())
    }

    /// The connection table (for status output).
    pub fn conntrack(&self) -> &ConnTrack {
        &self.conntrack
    }

    /// The netvm's MAC, and whether it was learned (else the Xen default is used).
    pub fn netvm_mac(&self) -> (Mac, bool) {
        (self.netvm_mac, self.netvm_mac_known)
    }

    /// Hands out events produced while the engine was built (name lookups, blocked clients).
    fn undefer(&mut self, out: &mut Outbox) {
        if !self.deferred.is_empty() {
            out.events.append(&mut self.deferred);
        }
    }

    fn client(&self, id: IfaceId) -> Option<&Client> {
        self.by_id.get(&id).map(|&i| &self.clients[i])
    }

    // ---------------------------------------------------------------------------------------
    // Configuration

    /// Replaces the configuration. Clients whose rules changed get new classifiers, and their
    /// flows that the new rules refuse are cut; flows of clients that are gone are dropped.
    pub fn apply(
        &mut self,
        _now: Instant,
        config: EngineConfig,
        out: &mut Outbox,
    ) -> Result<(), ConfigError> {
        self.undefer(out);
        Self::check_mtus(&config)?;
        // A NAT mapping is our address and a port: the flows of a family whose uplink address
        // moved cannot go on (the remote end would see another source). Nothing else about
        // the uplink is part of a mapping, so its MTU, the netvm's address or our MAC may
        // change under open flows (Linux keeps conntrack entries across `ip link set mtu`, and
        // a DHCP renewal that keeps the address keeps every connection).
        let (old, new) = (&self.cfg.uplink, &config.uplink);
        let (v4_moved, v6_moved) = (old.ip != new.ip, old.ip6 != new.ip6);
        if v4_moved || v6_moved {
            self.conntrack.retain(|f| {
                if f.key.dst.is_ipv4() {
                    !v4_moved
                } else {
                    !v6_moved
                }
            });
        }
        // A new netvm (or router) has to be found again.
        if old.gateway != new.gateway || old.name != new.name {
            self.netvm_mac = GATEWAY_MAC;
            self.netvm_mac_known = false;
            self.arp_sent_at = None;
            self.arp_pending.clear();
        }
        if old.gateway6 != new.gateway6 || old.name != new.name {
            self.netvm_mac6 = GATEWAY_MAC;
            self.netvm_mac6_known = false;
        }
        if config.conntrack_max != self.cfg.conntrack_max {
            let mut ct = ConnTrack::new(config.conntrack_max, config.seed);
            ct.inherit_reservations(&self.conntrack);
            std::mem::swap(&mut ct, &mut self.conntrack);
        }
        self.install(config, out)
    }

    /// Every link must carry at least the IPv4 minimum, or fragmenting to it is impossible.
    fn check_mtus(config: &EngineConfig) -> Result<(), ConfigError> {
        let links = std::iter::once((&config.uplink.name, config.uplink.mtu))
            .chain(config.clients.iter().map(|c| (&c.vif, c.mtu)));
        for (name, mtu) in links {
            if mtu < frag::MIN_MTU {
                return Err(ConfigError::BadMtu {
                    iface: name.clone(),
                    mtu,
                });
            }
        }
        Ok(())
    }

    /// Changes one interface's MTU at run time (the link's MTU changed, or its configured
    /// limit did). Flows, NAT mappings, held fragments and learned MACs all stay: only the
    /// size checks of packets handled from now on change. An error changes nothing.
    pub fn set_mtu(&mut self, iface: IfaceId, mtu: u16) -> Result<(), MtuError> {
        let name = self
            .iface_name(iface)
            .ok_or(MtuError::NoSuchIface { iface })?
            .to_string();
        if mtu < frag::MIN_MTU {
            return Err(MtuError::TooSmall { iface: name, mtu });
        }
        if iface == UPLINK {
            self.cfg.uplink.mtu = mtu;
        } else if let Some(&i) = self.by_id.get(&iface) {
            self.clients[i].cfg.mtu = mtu;
            if let Some(c) = self.cfg.clients.iter_mut().find(|c| c.vif == name) {
                c.mtu = mtu;
            }
        }
        Ok(())
    }

    /// The MTU of an interface, if it exists.
    pub fn mtu_of(&self, iface: IfaceId) -> Option<u16> {
        self.iface_name(iface)?;
        Some(self.mtu(iface))
    }

    fn install(&mut self, config: EngineConfig, out: &mut Outbox) -> Result<(), ConfigError> {
        Self::check_mtus(&config)?;
        let mut seen = std::collections::BTreeSet::new();
        for c in &config.clients {
            if !seen.insert(c.vif.as_str()) {
                return Err(ConfigError::DuplicateVif {
                    name: c.vif.clone(),
                    also_uplink: false,
                });
            }
        }
        let old: Vec<Client> = std::mem::take(&mut self.clients);
        let mut by_vif: BTreeMap<String, Client> =
            old.into_iter().map(|c| (c.cfg.vif.clone(), c)).collect();
        let mut clients = Vec::with_capacity(config.clients.len());
        // Flows of clients that are gone, or whose address changed (a different client to
        // its flows), are cut; everyone else keeps their id and their flows.
        let mut cut: rustc_hash::FxHashSet<IfaceId> = rustc_hash::FxHashSet::default();
        for cc in &config.clients {
            match by_vif.remove(&cc.vif) {
                Some(mut prev) => {
                    // A changed view (fake addresses) is a reconnection for the client: upstream
                    // applies it only when the vif comes up, after purging its conntrack
                    // entries (vif-route-qubes `conntrack_purge`).
                    if prev.cfg.ip != cc.ip
                        || prev.cfg.ip6 != cc.ip6
                        || prev.cfg.visible != cc.visible
                    {
                        cut.insert(prev.id);
                    }
                    // A client gaining or losing IPv6 needs its IPv6 rules (re)read too.
                    let rules_changed = prev.cfg.rules != cc.rules
                        || prev.cfg.rules6 != cc.rules6
                        || prev.cfg.ip6 != cc.ip6;
                    prev.cfg = cc.clone();
                    if rules_changed {
                        self.compile(&mut prev, out);
                    }
                    clients.push(prev);
                }
                None => {
                    let id = self.next_id;
                    self.next_id = self.next_id.checked_add(1).unwrap_or(1).max(1);
                    let mut c = Client::new(id, cc.clone());
                    self.compile(&mut c, out);
                    clients.push(c);
                }
            }
        }
        for gone in by_vif.into_values() {
            cut.insert(gone.id);
        }
        self.cfg = config;
        self.clients = clients;
        self.reindex();
        if !cut.is_empty() {
            self.conntrack.retain(|f| !cut.contains(&f.key.client));
        }
        self.cut_refused(out);
        Ok(())
    }

    fn reindex(&mut self) {
        self.by_id = self
            .clients
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id, i))
            .collect();
        self.by_ip4 = self
            .clients
            .iter()
            .enumerate()
            .map(|(i, c)| (c.cfg.ip, i))
            .collect();
        self.by_ip6 = self
            .clients
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.cfg.ip6.map(|a| (a, i)))
            .collect();
    }

    /// (Re)builds a client's classifiers from its QubesDB rule entries.
    fn compile(&mut self, c: &mut Client, out: &mut Outbox) {
        let id = c.id;
        c.blocked = None;
        c.names.clear();
        let mut rules: [Vec<MatchRule>; 2] = [Vec::new(), Vec::new()];
        for (fam, entries, slot) in [
            (Family::V4, &c.cfg.rules, 0usize),
            (Family::V6, &c.cfg.rules6, 1usize),
        ] {
            if fam == Family::V6 && c.cfg.ip6.is_none() {
                continue;
            }
            let parsed = read_rules(entries.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .and_then(|rs| {
                    rs.iter()
                        .map(|r| r.to_match(fam))
                        .collect::<Result<Vec<_>, _>>()
                });
            match parsed {
                Ok(r) => rules[slot] = r,
                Err(e) => {
                    let addr = if fam == Family::V4 {
                        c.cfg.ip.to_string()
                    } else {
                        c.cfg.ip6.map(|a| a.to_string()).unwrap_or_default()
                    };
                    let msg = e.blocking_message(&addr);
                    c.blocked = Some(msg.clone());
                    out.events.push(Event::ClientBlocked {
                        iface: id,
                        error: msg,
                    });
                }
            }
        }
        for r in rules.iter().flatten() {
            if let Some(MatchDst::Host(n)) = &r.dst {
                if !c.names.contains(n) {
                    c.names.push(n.clone());
                }
            }
        }
        let names = &self.names;
        let resolve = |n: &str| names.get(n).and_then(|e| e.addrs.clone());
        c.class4 = Classifier::compile(
            &rules[0],
            &self.cfg.dns,
            &resolve,
            UnresolvedPolicy::SkipAccept,
        );
        c.class6 = Classifier::compile(
            &rules[1],
            &self.cfg.dns,
            &resolve,
            UnresolvedPolicy::SkipAccept,
        );
        let wanted: Vec<String> = c
            .class4
            .unresolved()
            .iter()
            .chain(c.class6.unresolved())
            .cloned()
            .collect();
        for n in wanted {
            let e = self.names.entry(n.clone()).or_insert(NameEntry {
                addrs: None,
                refresh_at: 0,
                requested: false,
            });
            if !e.requested && e.addrs.is_none() {
                e.requested = true;
                out.events.push(Event::Resolve { name: n });
            }
        }
    }

    /// Cuts flows that their client's current rules refuse.
    fn cut_refused(&mut self, out: &mut Outbox) {
        let clients = &self.clients;
        let by_id = &self.by_id;
        let mut cut: BTreeMap<u32, usize> = BTreeMap::new();
        self.conntrack.retain(|f| {
            let Some(c) = by_id.get(&f.key.client).map(|&i| &clients[i]) else {
                return false;
            };
            let ok = c.blocked.is_none() && {
                let (proto, port) = match f.key.l4 {
                    Proto4::Tcp => (PacketProto::Tcp, f.key.dport),
                    Proto4::Udp => (PacketProto::Udp, f.key.dport),
                    // The flow's key holds the ICMP type of the request that opened it.
                    Proto4::Icmp => (PacketProto::Icmp, f.key.dport),
                    Proto4::Other(p) => (PacketProto::Other(p), 0),
                };
                let class = if f.key.dst.is_ipv4() {
                    &c.class4
                } else {
                    &c.class6
                };
                class.lookup(Packet::new(proto, f.key.dst, port)).action == Action::Accept
            };
            if !ok {
                *cut.entry(f.key.client).or_default() += 1;
            }
            ok
        });
        for (iface, count) in cut {
            out.events.push(Event::FlowsCut { iface, count });
        }
    }

    /// An answer (addresses and TTL in seconds), or a failure (`None`), for a name the engine
    /// asked about. Clients using the name are recompiled; flows the new answer refuses are cut.
    pub fn dns_answer(
        &mut self,
        now: Instant,
        name: &str,
        answer: Option<(Vec<IpAddr>, u32)>,
        out: &mut Outbox,
    ) {
        let now = now.as_nanos();
        self.undefer(out);
        let entry = self.names.entry(name.to_string()).or_insert(NameEntry {
            addrs: None,
            refresh_at: 0,
            requested: false,
        });
        entry.requested = false;
        match answer {
            Some((addrs, ttl)) if !addrs.is_empty() => {
                entry.addrs = Some(addrs);
                entry.refresh_at = now + (u64::from(ttl) * 1_000_000_000).max(MIN_TTL_NS);
            }
            _ => {
                // Fail closed: a name that does not resolve matches nothing for accept rules
                // and blocks the client for drop rules (classifier SkipAccept).
                entry.addrs = None;
                entry.refresh_at = now + RESOLVE_RETRY_NS;
            }
        }
        let users: Vec<usize> = self
            .clients
            .iter()
            .enumerate()
            .filter(|(_, c)| c.names.iter().any(|n| n == name))
            .map(|(i, _)| i)
            .collect();
        for i in users {
            let placeholder = Client::new(self.clients[i].id, self.clients[i].cfg.clone());
            let mut c = std::mem::replace(&mut self.clients[i], placeholder);
            self.compile(&mut c, out);
            self.clients[i] = c;
        }
        self.cut_refused(out);
    }

    /// Timer work due at `now`: idle flows expire, stale fragments are dropped (with ICMP time
    /// exceeded when the first fragment had come), names whose TTL ran out are re-resolved, and
    /// the netvm's MAC is asked for while unknown.
    pub fn tick(&mut self, now: Instant, out: &mut Outbox) {
        let now = now.as_nanos();
        self.now = now;
        self.undefer(out);
        self.conntrack.expire(now);
        self.expire_frags(now, out);
        // Names no client uses any more are forgotten rather than refreshed forever.
        let clients = &self.clients;
        self.names
            .retain(|n, _| clients.iter().any(|c| c.names.iter().any(|m| m == n)));
        for (name, e) in self.names.iter_mut() {
            if !e.requested && e.refresh_at != 0 && e.refresh_at <= now {
                e.requested = true;
                out.events.push(Event::Resolve { name: name.clone() });
            }
        }
        if !self.netvm_mac_known && self.arp_sent_at.is_some_and(|t| now >= t + ARP_RETRY_NS) {
            self.send_arp_request(now, out);
        }
    }

    fn expire_frags(&mut self, now: u64, out: &mut Outbox) {
        if self.frags.held_datagrams() == 0 {
            // Datagrams evicted for space leave their ingress behind; nothing is held now.
            self.frag_ingress.clear();
            return;
        }
        let horizon = self.cfg.frag.timeout_ns.saturating_mul(2);
        self.frag_ingress
            .retain(|_, (_, seen)| now.saturating_sub(*seen) <= horizon);
        let mut expired_heads: Vec<Vec<u8>> = Vec::new();
        self.frags
            .expire(now, |head| expired_heads.push(head.to_vec()));
        for head in expired_heads {
            self.frag_timeout(&head, out);
        }
    }

    /// ICMP "fragment reassembly time exceeded" (RFC 792, type 11 code 1) to whoever sent the
    /// fragments, when they were a client or came from the uplink.
    fn frag_timeout(&mut self, head: &[u8], out: &mut Outbox) {
        let Some(key) = frag_key(head) else {
            return;
        };
        let Some((ingress, _)) = self.frag_ingress.remove(&key) else {
            return;
        };
        match ingress {
            // Back into the vif it came from, if that client is still there with that address.
            Some(id) => {
                let Some(&i) = self.by_id.get(&id) else {
                    return;
                };
                if IpAddr::V4(self.clients[i].cfg.ip) != key.0 {
                    return;
                }
                self.icmp4_error(self.clients[i].id, head, 11, 1, 0, out);
            }
            None => {
                if self.client_by_ip(&key.0).is_some() || Some(key.0) == self.our_ip(false) {
                    return;
                }
                self.icmp4_error(UPLINK, head, 11, 1, 0, out);
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // The packet path

    /// [`Engine::handle`] for a frame whose checksum or segmentation the kernel left undone.
    /// A forwarded frame keeps its offload state: the shell sends it with the same virtio_net
    /// header, and the kernel finishes it.
    pub fn handle_offloaded(
        &mut self,
        now: Instant,
        iface: IfaceId,
        frame: &mut [u8],
        offload: Offload,
        out: &mut Outbox,
    ) -> Verdict {
        self.offload = offload;
        let v = self.handle(now, iface, frame, out);
        self.offload = Offload::NONE;
        v
    }

    /// The length the packet has on the wire: a GSO super-frame goes out as segments of
    /// `gso_size` payload bytes behind its headers.
    fn wire_len(&self, frame: &[u8], ip: &Ip) -> usize {
        if self.offload.gso_size == 0 {
            return ip.len;
        }
        let t = ip.l4();
        let l4h = match ip.proto {
            wire::PROTO_TCP => frame.get(t + 12).map_or(20, |o| usize::from(o >> 4) * 4),
            _ => 8,
        };
        (ip.hlen + l4h + usize::from(self.offload.gso_size)).min(ip.len)
    }

    /// The transport header, checked. Another IP protocol has no header we check: its ports
    /// (SCTP, DCCP, UDP-Lite) or zeros ([`wire::ports_of_other`]).
    fn transport(&self, frame: &[u8], ip: &Ip) -> Result<wire::L4, Reason> {
        match wire::parse_l4_with(frame, ip, self.verify_csum()) {
            Some(l4) => Ok(l4),
            None if matches!(
                ip.proto,
                wire::PROTO_TCP | wire::PROTO_UDP | wire::PROTO_ICMP | wire::PROTO_ICMPV6
            ) =>
            {
                Err(Reason::Malformed)
            }
            None => {
                let (sport, dport) = wire::ports_of_other(frame, ip).ok_or(Reason::Malformed)?;
                Ok(wire::L4 {
                    sport,
                    dport,
                    flags: 0,
                    icmp_type: 0,
                    icmp_code: 0,
                })
            }
        }
    }

    /// How the transport checksum of the frame being handled stands, for NAT.
    fn nat_csum(&self) -> NatCsum {
        if self.offload.partial_csum {
            NatCsum::Partial
        } else {
            NatCsum::Full
        }
    }

    fn verify_csum(&self) -> bool {
        !(self.offload.partial_csum || self.offload.csum_valid)
    }

    /// Handles one frame that arrived on `iface` at `now` (nanoseconds, monotonic).
    pub fn handle(
        &mut self,
        now: Instant,
        iface: IfaceId,
        frame: &mut [u8],
        out: &mut Outbox,
    ) -> Verdict {
        let now = now.as_nanos();
        self.now = now;
        self.undefer(out);
        let ci = if iface == UPLINK {
            None
        } else {
            match self.by_id.get(&iface) {
                Some(&i) => Some(i),
                None => return Verdict::Consumed,
            }
        };
        let (verdict, reason) = self.dispatch(now, ci, frame, out);
        let counters = match ci {
            Some(i) => &mut self.clients[i].counters,
            None => &mut self.uplink_counters,
        };
        counters.bump(reason);
        if reason != Reason::Accepted {
            out.events.push(Event::Dropped { iface, reason });
        }
        verdict
    }

    fn dispatch(
        &mut self,
        now: u64,
        ci: Option<usize>,
        frame: &mut [u8],
        out: &mut Outbox,
    ) -> (Verdict, Reason) {
        if frame.len() < ETH_LEN {
            return (Verdict::Consumed, Reason::Malformed);
        }
        // Ours is the gateway MAC on client vifs (what our ARP and NDP answers give) and the
        // uplink's own MAC there. A frame to another host's unicast MAC is not ours to take,
        // whatever it carries (Linux: `PACKET_OTHERHOST`, dropped by `arp_rcv` and `ip_rcv`).
        let dst_mac = &frame[..6];
        self.link_group = dst_mac[0] & 1 == 1;
        let ours: &Mac = match ci {
            Some(_) => &GATEWAY_MAC,
            None => &self.cfg.uplink.mac,
        };
        if !self.link_group && dst_mac != ours {
            return (Verdict::Consumed, Reason::NotForUs);
        }
        let parsed = match wire::ethertype(frame) {
            wire::ETHERTYPE_ARP => return (Verdict::Consumed, self.arp(now, ci, frame, out)),
            wire::ETHERTYPE_IPV4 => wire::parse_ipv4(frame, ETH_LEN),
            wire::ETHERTYPE_IPV6 => wire::parse_ipv6(frame, ETH_LEN),
            _ => return (Verdict::Consumed, Reason::Malformed),
        };
        let ip = match parsed {
            Ok(ip) => ip,
            Err(IpError::Malformed) => return (Verdict::Consumed, Reason::Malformed),
            Err(IpError::Unsupported) => return (Verdict::Consumed, Reason::Unsupported),
        };
        if ci.is_none() && self.dhcp_client && !ip.fragment && ip.proto == wire::PROTO_UDP {
            // To the DHCP client (RFC 2131 4.1): a server sends to the address it offers, or
            // to broadcast, before that address is ours, so neither the IP destination nor
            // the NAT path decides; the client checks what it gets (xid, chaddr).
            // The ports first (cheap, and most UDP is not DHCP), the checksum only then; one
            // the server's kernel left to offload is not wrong (offload.rs).
            let t = ip.l4();
            let dhcp_ports =
                ip.end() >= t + 8 && wire::be16(frame, t) == 67 && wire::be16(frame, t + 2) == 68;
            if dhcp_ports && wire::parse_l4_with(frame, &ip, self.verify_csum()).is_some() {
                out.push_dhcp(&frame[t + 8..ip.end()]);
                return (Verdict::Consumed, Reason::Accepted);
            }
        }
        if ip.fragment {
            if ci.is_some() && self.cfg.mode == UplinkMode::Terminate {
                // The host stack ends client traffic and no client stack fragments TCP: a
                // fragment from a client can only be an attempt at the reassembler or at a
                // rule's view of ports, and Tor carries nothing else (Whonix drops them too).
                return (Verdict::Consumed, Reason::Unsupported);
            }
            if self.link_group {
                // Only forwarding reassembles, and nothing sent to a group is forwarded.
                return (Verdict::Consumed, Reason::NotForUs);
            }
            return (
                Verdict::Consumed,
                self.fragment_in(now, ci, frame, &ip, out),
            );
        }
        let (verdict, reason) = match ci {
            Some(c) => self.client_frame(now, c, frame, ip, out, true),
            None => self.uplink_frame(now, frame, ip, out, true),
        };
        match verdict {
            // Bytes after the IP total length (Ethernet padding, or junk) are not part of the
            // packet: a router sends the packet alone (Linux trims in `ip_rcv_core` /
            // `ipv6_rcv`, RFC 791 3.1 Total Length).
            Verdict::Forward(to) if frame.len() > ip.end() => {
                out.push_frame(to, &frame[..ip.end()]);
                (Verdict::Consumed, reason)
            }
            v => (v, reason),
        }
    }

    /// Holds an IPv4 fragment; once the datagram is complete it goes through the normal path
    /// (rules apply to whole datagrams, as Linux conntrack defragments first).
    fn fragment_in(
        &mut self,
        now: u64,
        ci: Option<usize>,
        frame: &[u8],
        ip: &Ip,
        out: &mut Outbox,
    ) -> Reason {
        // Spoofed fragments are dropped before they take reassembly memory.
        match ci {
            Some(c) => {
                // A client with fake addresses sends from its visible one; the datagram is
                // translated once whole (client_frame), so its transport checksum follows.
                let cfg = &self.clients[c].cfg;
                let own = cfg.visible.map_or(cfg.ip, |v| v.ip);
                if ip.src != IpAddr::V4(own) {
                    return Reason::Spoofed;
                }
            }
            None => {
                if self.client_by_ip(&ip.src).is_some() || Some(ip.src) == self.our_ip(false) {
                    return Reason::Spoofed;
                }
            }
        }
        // A stale partial datagram must not be completed by a late fragment.
        self.expire_frags(now, out);
        let packet = &frame[ip.off..ip.end()];
        let key = frag_key(packet);
        let datagram = match self.frags.push(now, packet) {
            Ok(Some(d)) => d,
            Ok(None) => {
                if let Some(k) = key {
                    let vif = ci.map(|c| self.clients[c].id);
                    self.frag_ingress.entry(k).or_insert((vif, now));
                }
                // Held until the rest arrives: not a drop.
                return Reason::Accepted;
            }
            Err(_) => {
                if let Some(k) = key {
                    self.frag_ingress.remove(&k);
                }
                return Reason::Malformed;
            }
        };
        if let Some(k) = key {
            self.frag_ingress.remove(&k);
        }
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        buf.extend_from_slice(&frame[..ETH_LEN]);
        buf.extend_from_slice(datagram);
        let reason = match wire::parse_ipv4(&buf, ETH_LEN) {
            Ok(ip) => {
                let (v, r) = match ci {
                    Some(c) => self.client_frame(now, c, &mut buf, ip, out, false),
                    None => self.uplink_frame(now, &mut buf, ip, out, false),
                };
                if let Verdict::Forward(to) = v {
                    self.send_ip(to, &buf, out);
                }
                r
            }
            Err(_) => Reason::Malformed,
        };
        self.scratch = buf;
        reason
    }

    /// Sends a whole (possibly reassembled) IPv4 frame, fragmenting it when it does not fit.
    fn send_ip(&mut self, to: IfaceId, buf: &[u8], out: &mut Outbox) {
        let mtu = self.mtu(to);
        let ip_len = buf.len() - ETH_LEN;
        if ip_len <= usize::from(mtu) {
            out.push_frame(to, buf);
            return;
        }
        let mut eth = [0u8; ETH_LEN];
        eth.copy_from_slice(&buf[..ETH_LEN]);
        let mut pieces = std::mem::take(&mut self.build);
        let _ = frag::fragment(&buf[ETH_LEN..], mtu, |piece| {
            pieces.clear();
            pieces.extend_from_slice(&eth);
            pieces.extend_from_slice(piece);
            out.push_frame(to, &pieces);
        });
        self.build = pieces;
    }

    /// What a router does with a packet of `wire_len` bytes for a link of `mtu` (Linux
    /// `ip_forward` / `ip6_forward`).
    fn size_verdict(ip: &Ip, wire_len: usize, mtu: u16) -> Size {
        if ip.v6 {
            // IPv6 is never fragmented by routers and every IPv6 link carries 1280 bytes
            // (RFC 8200 section 5); Linux `ip6_forward` raises a smaller MTU to 1280 before
            // comparing, and that is what packet too big reports (RFC 4443 3.2).
            let mtu = mtu.max(IPV6_MIN_MTU);
            if wire_len > usize::from(mtu) {
                return Size::TooBig(mtu);
            }
            return Size::Fits;
        }
        if wire_len <= usize::from(mtu) {
            Size::Fits
        } else if ip.df {
            // RFC 1191 section 4: fragmentation needed, with the next-hop MTU.
            Size::TooBig(mtu)
        } else {
            // RFC 791: a datagram without DF is fragmented to fit.
            Size::Fragment
        }
    }

    fn mtu(&self, iface: IfaceId) -> u16 {
        if iface == UPLINK {
            self.cfg.uplink.mtu
        } else {
            self.client(iface).map_or(1500, |c| c.cfg.mtu)
        }
    }

    fn our_ip(&self, v6: bool) -> Option<IpAddr> {
        if v6 {
            self.cfg.uplink.ip6.map(IpAddr::V6)
        } else {
            Some(IpAddr::V4(self.cfg.uplink.ip))
        }
    }

    /// The clients' gateway address ([`EngineConfig::client_gateway`]).
    fn client_gw(&self, v6: bool) -> Option<IpAddr> {
        if v6 {
            self.cfg
                .client_gateway6
                .or(self.cfg.uplink.ip6)
                .map(IpAddr::V6)
        } else {
            Some(IpAddr::V4(
                self.cfg.client_gateway.unwrap_or(self.cfg.uplink.ip),
            ))
        }
    }

    /// Where DNS redirection sends a client's packet, if it is a query to a virtual
    /// resolver: `Some(Some(upstream))`, or `Some(None)` when that resolver has no upstream.
    fn dns_redirect(&self, ip: &Ip, l4: &wire::L4) -> Option<Option<Ipv4Addr>> {
        if self.cfg.dns_redirect.is_empty()
            || l4.dport != 53
            || !matches!(ip.proto, wire::PROTO_UDP | wire::PROTO_TCP)
        {
            return None;
        }
        let IpAddr::V4(dst) = ip.dst else { return None };
        self.cfg
            .dns_redirect
            .iter()
            .find(|r| r.virtual_ip == dst)
            .map(|r| r.upstream)
    }

    fn client_by_ip(&self, a: &IpAddr) -> Option<usize> {
        match a {
            IpAddr::V4(a) => self.by_ip4.get(a).copied(),
            IpAddr::V6(a) => self.by_ip6.get(a).copied(),
        }
    }

    /// A frame from client `c`. `in_place`: the frame is the caller's buffer (else a scratch
    /// buffer the caller sends itself).
    fn client_frame(
        &mut self,
        now: u64,
        c: usize,
        frame: &mut [u8],
        ip: Ip,
        out: &mut Outbox,
        in_place: bool,
    ) -> (Verdict, Reason) {
        let id = self.clients[c].id;
        let consumed = |r| (Verdict::Consumed, r);
        let mut ip = ip;
        if let Some(vis) = self.clients[c].cfg.visible {
            ip = match self.translate_from_visible(c, vis, frame, &ip) {
                Ok(ip) => ip,
                Err(r) => return consumed(r),
            };
        }
        let client = &self.clients[c];
        if ip.v6 {
            let Some(own6) = client.cfg.ip6 else {
                return consumed(Reason::Unsupported);
            };
            if ip.proto == wire::PROTO_ICMPV6 {
                if let Some(r) = self.ndp_from_client(c, frame, &ip, out) {
                    return consumed(r);
                }
            }
            if ip.src != IpAddr::V6(own6) {
                return consumed(Reason::Spoofed);
            }
            if self.cfg.uplink.ip6.is_none() {
                return consumed(Reason::Unsupported);
            }
        } else if ip.src != IpAddr::V4(client.cfg.ip) {
            return consumed(Reason::Spoofed);
        }
        let l4 = match self.transport(frame, &ip) {
            Ok(l4) => l4,
            Err(r) => return consumed(r),
        };
        // To the firewall itself: its gateway address, or its uplink address where the two
        // differ (sys-net).
        if Some(ip.dst) == self.client_gw(ip.v6) || Some(ip.dst) == self.our_ip(ip.v6) {
            return consumed(self.local_from_client(c, frame, &ip, &l4, out));
        }
        if is_special(&ip.dst) {
            return consumed(Reason::Unsupported);
        }
        if self.link_group {
            return consumed(Reason::NotForUs);
        }
        if self.client_by_ip(&ip.dst).is_some() {
            // As on Linux: the client's own rules judge first (a refused destination gets
            // admin-prohibited), then new traffic into a vif is dropped silently
            // (`oifgroup 2 drop`).
            let allowed = self.client_accepts(c, &ip, &l4);
            if !allowed {
                self.icmp_error(id, frame, &ip, IcmpKind::AdminProhibited, out);
                return consumed(Reason::RejectedByRule);
            }
            return consumed(Reason::ClientToClient);
        }
        if self.cfg.mode == UplinkMode::Terminate {
            return consumed(self.terminate_from_client(c, frame, &ip, &l4, out));
        }
        if ip.ttl <= 1 {
            self.icmp_error(id, frame, &ip, IcmpKind::TimeExceeded, out);
            return consumed(Reason::TtlExceeded);
        }
        if !ip.v6 && self.cfg.uplink.ip.is_unspecified() {
            self.icmp_error(id, frame, &ip, IcmpKind::NetUnreachable, out);
            return consumed(Reason::NoUplink);
        }
        let (l4p, sport, dport) = match ip.proto {
            wire::PROTO_TCP => (Proto4::Tcp, l4.sport, l4.dport),
            wire::PROTO_UDP => (Proto4::Udp, l4.sport, l4.dport),
            wire::PROTO_ICMP | wire::PROTO_ICMPV6 => {
                if is_icmp_error(ip.v6, l4.icmp_type) {
                    // About a packet the client got through one of its flows: related, so
                    // accepted whatever the rules say (the agent's `ct state
                    // established,related accept` comes first), and translated.
                    return consumed(self.icmp_error_from_client(now, c, frame, &ip, out));
                }
                if !is_icmp_query(ip.v6, l4.icmp_type) {
                    // Other messages from a client are not flows it may open.
                    return consumed(Reason::Unsupported);
                }
                // Conntrack's ICMP tuple has the type: an echo flow does not let a
                // timestamp request through.
                (Proto4::Icmp, l4.sport, u16::from(l4.icmp_type))
            }
            p => (Proto4::Other(p), l4.sport, l4.dport),
        };
        let key = FlowKey {
            client: id,
            l4: l4p,
            src: ip.src,
            dst: ip.dst,
            sport,
            dport,
        };
        let tcp_flags = (l4p == Proto4::Tcp).then_some(l4.flags);
        let seg = match tcp_flags {
            Some(flags) if !tcpwin::valid_flags(flags) => return consumed(Reason::Invalid),
            Some(_) => tcp_segment(frame, &ip),
            None => None,
        };
        let wire_len = self.wire_len(frame, &ip);
        let size = Self::size_verdict(&ip, wire_len, self.cfg.uplink.mtu);
        let flow = match self.conntrack.lookup_original(&key, now) {
            Some(f) => {
                if let Some(seg) = &seg {
                    if !self.conntrack.tcp_in_window(f, Dir::Original, seg) {
                        return consumed(Reason::Invalid);
                    }
                }
                f
            }
            None => {
                if tcp_flags.is_some_and(|f| !tcpwin::may_open(f)) {
                    // Conntrack finds these invalid before any rule sees them.
                    return consumed(Reason::Invalid);
                }
                let allowed = self.client_accepts(c, &ip, &l4);
                if !allowed {
                    self.icmp_error(id, frame, &ip, IcmpKind::AdminProhibited, out);
                    return consumed(Reason::RejectedByRule);
                }
                // Refused before it is tracked: a packet that never leaves opens no flow
                // (Linux drops the unconfirmed conntrack entry with the packet).
                if let Size::TooBig(mtu) = size {
                    self.icmp_error(id, frame, &ip, IcmpKind::TooBig(mtu), out);
                    return consumed(Reason::TooBig);
                }
                // The table shares itself out: however many clients flood it, one below its
                // fair share still gets a flow (conntrack module docs).
                let dnat = match self.dns_redirect(&ip, &l4) {
                    Some(None) => {
                        self.icmp_error(id, frame, &ip, IcmpKind::PortUnreachable, out);
                        return consumed(Reason::NoUpstreamDns);
                    }
                    Some(Some(upstream)) => Some(upstream),
                    None => None,
                };
                match self.conntrack.create_to(now, key, dnat, tcp_flags) {
                    Ok(f) => {
                        if let Some(seg) = &seg {
                            self.conntrack.tcp_open(f, seg);
                        }
                        f
                    }
                    Err(_) => return consumed(Reason::TableFull),
                }
            }
        };
        if let Size::TooBig(mtu) = size {
            self.icmp_error(id, frame, &ip, IcmpKind::TooBig(mtu), out);
            return consumed(Reason::TooBig);
        }
        self.conntrack.update(flow, now, Dir::Original, tcp_flags);
        let (nat_port, dnat) = {
            let f = self.conntrack.get(flow);
            (f.nat_port, f.dnat)
        };
        let Some(our) = self.our_ip(ip.v6) else {
            return consumed(Reason::Unsupported);
        };
        if !self.netvm_mac_known && self.arp_sent_at.is_none() {
            self.send_arp_request(now, out);
        }
        // The netvm has one MAC on this link: until NDP tells us otherwise, IPv6 goes where
        // ARP said IPv4 goes.
        let dst_mac = if ip.v6 && self.netvm_mac6_known {
            self.netvm_mac6
        } else {
            self.netvm_mac
        };
        wire::set_macs(frame, &dst_mac, &self.cfg.uplink.mac);
        let port = (!matches!(l4p, Proto4::Other(_))).then_some(nat_port);
        wire::nat_rewrite(frame, &ip, NatField::Src, our, port, self.nat_csum());
        if let Some(upstream) = dnat {
            let csum = self.nat_csum();
            wire::nat_rewrite(frame, &ip, NatField::Dst, IpAddr::V4(upstream), None, csum);
        }
        decrement_ttl(frame, &ip);
        if !self.netvm_mac_known
            && self.cfg.client_gateway.is_some()
            && size != Size::Fragment
            && self.offload.gso_size == 0
        {
            // Behind a netvm's uplink the next hop is a real router: nothing reaches it
            // before ARP has found it.
            self.hold_for_arp(&frame[..ip.end()], &ip);
            return consumed(Reason::Accepted);
        }
        if !in_place {
            return (Verdict::Forward(UPLINK), Reason::Accepted);
        }
        if size == Size::Fragment {
            return self.fragment_out(UPLINK, frame, &ip, out);
        }
        (Verdict::Forward(UPLINK), Reason::Accepted)
    }

    /// Most frames held for ARP (Linux's default `unres_qlen_bytes` holds about as much).
    const ARP_PENDING_MAX: usize = 64;

    fn hold_for_arp(&mut self, frame: &[u8], ip: &Ip) {
        if self.arp_pending.len() >= Self::ARP_PENDING_MAX {
            self.arp_pending.remove(0);
        }
        let mut f = frame.to_vec();
        if self.offload.partial_csum {
            // A held frame goes out later as a finished frame, with no offload header to
            // have the checksum the sender's kernel left undone completed: complete it now.
            finish_partial_csum(&mut f[ip.off..], ip.hlen, ip.proto);
        }
        self.arp_pending.push(f);
    }

    /// A packet from client `c`, which has fake addresses: translated to the real ones before
    /// anything else looks at it, so spoofing checks, rules, flows and NAT work on the real
    /// view as for any client.
    ///
    /// Upstream (vif-qubes-nat.sh, chain `antispoof` on the client's side of the namespace):
    /// `ip saddr $appvm_ip ip saddr set $netvm_ip fwd to $netns_netvm_if`, policy drop: only
    /// IPv4 from the visible address passes, with the real address as its source, and IPv6 is
    /// disabled on the vif (`disable_ipv6`). Beyond upstream, which rewrites only that source
    /// (and, back, only the destination), the visible gateway becomes ours and an ICMP
    /// error's quoted packet is translated too, so that pings of the gateway are answered and
    /// ICMP errors name the flows the client knows (RFC 5508 REQ-3 for a NAT's ICMP errors);
    /// `to_visible` undoes all of it toward the client. Our real address is not reachable
    /// under another name: answering it would show the client the address it is not meant to
    /// see (what upstream's optional `undetectable_netvm_ips` is for).
    #[cold]
    fn translate_from_visible(
        &self,
        c: usize,
        vis: Visible,
        frame: &mut [u8],
        ip: &Ip,
    ) -> Result<Ip, Reason> {
        if ip.v6 {
            return Err(Reason::Unsupported);
        }
        if ip.src != IpAddr::V4(vis.ip) {
            return Err(Reason::Spoofed);
        }
        // "Ours" is the clients' gateway: the uplink address in sys-firewall, the
        // `/qubes-netvm-gateway` in sys-net.
        let our = self.cfg.client_gateway.unwrap_or(self.cfg.uplink.ip);
        let real = self.clients[c].cfg.ip;
        if ip.dst == IpAddr::V4(our) && vis.gateway != our {
            return Err(Reason::Local);
        }
        Ok(map_addrs(
            frame,
            ip,
            &[(vis.ip, real), (vis.gateway, our)],
            self.nat_csum(),
        ))
    }

    /// A frame the engine built for interface `iface` (an ICMP error, an echo reply, a host
    /// stack packet): for a client with fake addresses, its real address becomes its visible
    /// one and our address its visible gateway, in the packet and in the one an ICMP error
    /// quotes, so the client never sees either real address (see `translate_from_visible`).
    fn to_visible(&self, iface: IfaceId, f: &mut [u8]) {
        let Some(client) = self.client(iface) else {
            return;
        };
        let Some(vis) = client.cfg.visible else {
            return;
        };
        if f.len() < ETH_LEN || wire::ethertype(f) != wire::ETHERTYPE_IPV4 {
            return;
        }
        let Ok(ip) = wire::parse_ipv4(f, ETH_LEN) else {
            return;
        };
        let our = self.cfg.client_gateway.unwrap_or(self.cfg.uplink.ip);
        let map = [(client.cfg.ip, vis.ip), (our, vis.gateway)];
        map_addrs(f, &ip, &map, NatCsum::Full);
    }

    /// An IPv4 packet without DF too big for the next link: fragmented (Linux ip_forward does).
    fn fragment_out(
        &mut self,
        to: IfaceId,
        frame: &[u8],
        ip: &Ip,
        out: &mut Outbox,
    ) -> (Verdict, Reason) {
        if self.offload.gso_size != 0 {
            // A GSO super-frame would have to be segmented before it is fragmented; Linux
            // only builds them for TCP, which always sets DF, so this is never a real
            // sender's packet.
            return (Verdict::Consumed, Reason::TooBig);
        }
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        buf.extend_from_slice(&frame[..ip.end()]);
        if self.offload.partial_csum {
            // No kernel finishes the checksum of a fragment (the transport header is in the
            // first one only), so it is finished here, as the kernel's own
            // `skb_checksum_help` does before `ip_fragment`.
            finish_partial_csum(&mut buf[ip.off..], ip.hlen, ip.proto);
        }
        self.send_ip(to, &buf, out);
        self.scratch = buf;
        (Verdict::Consumed, Reason::Accepted)
    }

    /// Whether client `c`'s rules accept a new flow like this packet (always false for a
    /// blocked client).
    fn client_accepts(&self, c: usize, ip: &Ip, l4: &wire::L4) -> bool {
        let client = &self.clients[c];
        if client.blocked.is_some() {
            return false;
        }
        let (pp, port) = match ip.proto {
            wire::PROTO_TCP => (PacketProto::Tcp, l4.dport),
            wire::PROTO_UDP => (PacketProto::Udp, l4.dport),
            wire::PROTO_ICMP | wire::PROTO_ICMPV6 => (PacketProto::Icmp, u16::from(l4.icmp_type)),
            p => (PacketProto::Other(p), 0),
        };
        let class = if ip.v6 {
            &client.class6
        } else {
            &client.class4
        };
        class.lookup(Packet::new(pp, ip.dst, port)).action == Action::Accept
    }

    /// [`UplinkMode::Terminate`]: what the client's rules accept goes to the host stack as it
    /// is (any destination: the host stack ends it), what they refuse is rejected as in
    /// masquerade mode. Nothing goes to the uplink.
    fn terminate_from_client(
        &mut self,
        c: usize,
        frame: &[u8],
        ip: &Ip,
        l4: &wire::L4,
        out: &mut Outbox,
    ) -> Reason {
        if !self.client_accepts(c, ip, l4) {
            let id = self.clients[c].id;
            self.icmp_error(id, frame, ip, IcmpKind::AdminProhibited, out);
            return Reason::RejectedByRule;
        }
        if self.offload.gso_size != 0 {
            // The host stack takes wire-sized packets: a shell in this mode finishes GSO
            // super-frames before handing them over (vif_backend::offload::finish).
            return Reason::Unsupported;
        }
        self.deliver_local(frame, ip, out);
        Reason::Accepted
    }

    /// Traffic addressed to the firewall's own address from a client: pings are answered,
    /// DHCP is ignored, everything else is rejected with host-prohibited (the Linux input
    /// chain of reference 4.5).
    fn local_from_client(
        &mut self,
        c: usize,
        frame: &[u8],
        ip: &Ip,
        l4: &wire::L4,
        out: &mut Outbox,
    ) -> Reason {
        let id = self.clients[c].id;
        let echo_req = if ip.v6 { 128 } else { 8 };
        if matches!(ip.proto, wire::PROTO_ICMP | wire::PROTO_ICMPV6) {
            if l4.icmp_type == echo_req {
                self.echo_reply(id, frame, ip, out);
                return Reason::Accepted;
            }
            return Reason::Local;
        }
        if ip.proto == wire::PROTO_UDP && l4.dport == 68 {
            return Reason::Local;
        }
        self.icmp_error(id, frame, ip, IcmpKind::HostProhibited, out);
        Reason::Local
    }

    /// A frame from the uplink.
    fn uplink_frame(
        &mut self,
        now: u64,
        frame: &mut [u8],
        ip: Ip,
        out: &mut Outbox,
        in_place: bool,
    ) -> (Verdict, Reason) {
        let consumed = |r| (Verdict::Consumed, r);
        if ip.v6 && ip.proto == wire::PROTO_ICMPV6 {
            if let Some(r) = self.ndp_from_uplink(frame, &ip, out) {
                return consumed(r);
            }
        }
        if self.client_by_ip(&ip.src).is_some() || Some(ip.src) == self.our_ip(ip.v6) {
            return consumed(Reason::Spoofed);
        }
        let Some(our) = self.our_ip(ip.v6) else {
            return consumed(Reason::Unsupported);
        };
        if ip.dst != our {
            return consumed(Reason::NoFlow);
        }
        if self.link_group {
            return consumed(Reason::NotForUs);
        }
        let l4 = match self.transport(frame, &ip) {
            Ok(l4) => l4,
            Err(r) => return consumed(r),
        };
        let (l4p, rport, nat_port, icmp_err) = match ip.proto {
            wire::PROTO_TCP => (Proto4::Tcp, l4.sport, l4.dport, false),
            wire::PROTO_UDP => (Proto4::Udp, l4.sport, l4.dport, false),
            wire::PROTO_ICMP | wire::PROTO_ICMPV6 => {
                if is_icmp_query_reply(ip.v6, l4.icmp_type) {
                    (Proto4::Icmp, 0, l4.sport, false)
                } else if is_icmp_error(ip.v6, l4.icmp_type) {
                    (Proto4::Icmp, 0, 0, true)
                } else {
                    return consumed(Reason::NoFlow);
                }
            }
            p => (Proto4::Other(p), l4.sport, l4.dport, false),
        };
        if icmp_err {
            if !ip.v6 && l4.icmp_type == 5 {
                // A redirect tells a host on the sender's link to use another router; our
                // clients are not on that link, and a hostile netvm must not steer them
                // (Linux never forwards one as related: `icmp_error` in
                // nf_conntrack_proto_icmp.c, and hosts ignore foreign ones, RFC 1122 3.2.2.2).
                return consumed(Reason::NoFlow);
            }
            return consumed(self.icmp_error_from_uplink(now, frame, &ip, out));
        }
        let rkey = ReplyKey {
            l4: l4p,
            remote: ip.src,
            rport,
            nat_port,
        };
        if l4p == Proto4::Tcp && !tcpwin::valid_flags(l4.flags) {
            return consumed(Reason::Invalid);
        }
        let Some(flow) = self.conntrack.lookup_reply(&rkey, now) else {
            if matches!(l4p, Proto4::Tcp | Proto4::Udp) && self.conntrack.is_reserved(l4p, nat_port)
            {
                // For the service's own endpoints: the host stack takes it from here.
                self.deliver_local(frame, &ip, out);
                return consumed(Reason::Accepted);
            }
            return consumed(Reason::NoFlow);
        };
        let key = self.conntrack.get(flow).key;
        // An ICMP flow lets back only the reply to the query that opened it.
        if l4p == Proto4::Icmp && Some(l4.icmp_type) != icmp_reply_type(ip.v6, key.dport) {
            return consumed(Reason::NoFlow);
        }
        let Some(client) = self.client(key.client) else {
            return consumed(Reason::NoFlow);
        };
        let (client_mac, client_mtu) = (client.cfg.mac, client.cfg.mtu);
        // A client with fake addresses gets its replies at its visible address
        // (vif-qubes-nat.sh, chain `reverse`: `ip daddr $netvm_ip ip daddr set $appvm_ip`).
        let client_addr = match client.cfg.visible {
            Some(v) if !ip.v6 => IpAddr::V4(v.ip),
            _ => key.src,
        };
        if l4p == Proto4::Tcp {
            let in_window = tcp_segment(frame, &ip)
                .is_some_and(|seg| self.conntrack.tcp_in_window(flow, Dir::Reply, &seg));
            if !in_window {
                return consumed(Reason::Invalid);
            }
        }
        if ip.ttl <= 1 {
            self.icmp_error(UPLINK, frame, &ip, IcmpKind::TimeExceeded, out);
            return consumed(Reason::TtlExceeded);
        }
        let wire_len = self.wire_len(frame, &ip);
        let size = Self::size_verdict(&ip, wire_len, client_mtu);
        if let Size::TooBig(mtu) = size {
            // Quoted as it arrived (before the NAT is undone): the sender must recognise
            // its own packet (RFC 1191 section 4, RFC 4443 3.2).
            self.icmp_error(UPLINK, frame, &ip, IcmpKind::TooBig(mtu), out);
            return consumed(Reason::TooBig);
        }
        let tcp_flags = (l4p == Proto4::Tcp).then_some(l4.flags);
        self.conntrack.update(flow, now, Dir::Reply, tcp_flags);
        wire::set_macs(frame, &client_mac, &GATEWAY_MAC);
        let port = (!matches!(l4p, Proto4::Other(_))).then_some(key.sport);
        wire::nat_rewrite(frame, &ip, NatField::Dst, key.src, port, self.nat_csum());
        if self.conntrack.get(flow).dnat.is_some() {
            // From the virtual resolver the client asked, not the upstream one.
            let csum = self.nat_csum();
            wire::nat_rewrite(frame, &ip, NatField::Src, key.dst, None, csum);
        }
        wire::nat_rewrite(
            frame,
            &ip,
            NatField::Dst,
            client_addr,
            port,
            self.nat_csum(),
        );
        decrement_ttl(frame, &ip);
        let to = key.client;
        if in_place && size == Size::Fragment {
            return self.fragment_out(to, frame, &ip, out);
        }
        (Verdict::Forward(to), Reason::Accepted)
    }

    /// An ICMP error from the uplink about one of our flows: rewritten so the client sees it
    /// about its own packet (RFC 5508 REQ-3 for NAT behaviour), then sent to the client.
    fn icmp_error_from_uplink(
        &mut self,
        now: u64,
        frame: &[u8],
        ip: &Ip,
        out: &mut Outbox,
    ) -> Reason {
        let inner_off = ip.l4() + 8;
        let inner = match if ip.v6 {
            wire::parse_ipv6_quoted(frame, inner_off, ip.end())
        } else {
            wire::parse_ipv4_quoted(frame, inner_off, ip.end())
        } {
            Some(i) => i,
            None => return Reason::Malformed,
        };
        // The quoted packet is one we sent: from our address to the remote.
        if Some(inner.src) != self.our_ip(ip.v6) {
            return Reason::NoFlow;
        }
        let t = inner.l4();
        // The quote must hold the whole offending IP header and the first 8 bytes of its
        // transport header (RFC 792; RFC 1812 4.3.2.3), which is what the flow is found by:
        // anything shorter cannot be matched honestly (Linux: `nf_ct_get_tuplepr` fails).
        if t + 8 > ip.end() {
            return Reason::Malformed;
        }
        let (l4p, rport, nat_port) = match inner.proto {
            wire::PROTO_TCP => (Proto4::Tcp, wire::be16(frame, t + 2), wire::be16(frame, t)),
            wire::PROTO_UDP => (Proto4::Udp, wire::be16(frame, t + 2), wire::be16(frame, t)),
            wire::PROTO_ICMP | wire::PROTO_ICMPV6 => (Proto4::Icmp, 0, wire::be16(frame, t + 4)),
            p => {
                let Some((sport, dport)) = wire::ports_of_other(frame, &inner) else {
                    return Reason::Malformed;
                };
                (Proto4::Other(p), dport, sport)
            }
        };
        let Some(flow) = self.conntrack.lookup_reply(
            &ReplyKey {
                l4: l4p,
                remote: inner.dst,
                rport,
                nat_port,
            },
            now,
        ) else {
            return Reason::NoFlow;
        };
        let (key, dnat) = {
            let f = self.conntrack.get(flow);
            (f.key, f.dnat)
        };
        let Some(client) = self.client(key.client) else {
            return Reason::NoFlow;
        };
        if ip.ttl <= 1 {
            return Reason::TtlExceeded;
        }
        let client_mac = client.cfg.mac;
        let mut buf = std::mem::take(&mut self.build);
        buf.clear();
        buf.extend_from_slice(&frame[..ip.end()]);
        wire::set_macs(&mut buf, &client_mac, &GATEWAY_MAC);
        // Outer destination: our address -> the client's; inner source likewise, with the
        // client's own port or query id back.
        let port = (!matches!(l4p, Proto4::Other(_))).then_some(key.sport);
        wire::nat_rewrite(
            &mut buf,
            &inner,
            NatField::Src,
            key.src,
            port,
            NatCsum::Quoted,
        );
        if dnat.is_some() {
            // The quoted query went to the virtual resolver, as far as the client knows.
            wire::nat_rewrite(
                &mut buf,
                &inner,
                NatField::Dst,
                key.dst,
                None,
                NatCsum::Quoted,
            );
        }
        // The ICMP checksum is recomputed in full below.
        wire::nat_rewrite(&mut buf, ip, NatField::Dst, key.src, None, NatCsum::Full);
        decrement_ttl(&mut buf, ip);
        // The ICMP checksum covers the rewritten quote: recompute it in full.
        let l4o = ip.l4();
        wire::put16(&mut buf, l4o + 2, 0);
        let acc = if ip.v6 {
            wire::pseudo_sum(&ip.src, &key.src, wire::PROTO_ICMPV6, ip.l4_len())
        } else {
            0
        };
        let c = !wire::fold(wire::sum(&buf[l4o..ip.end()], acc));
        wire::put16(&mut buf, l4o + 2, c);
        self.to_visible(key.client, &mut buf);
        out.push_frame(key.client, &buf);
        self.build = buf;
        Reason::Accepted
    }

    /// An ICMP error from client `c` about a packet it received through one of its flows (a
    /// port unreachable for a UDP reply, say): translated as a NAT must (RFC 5508 REQ-3: the
    /// outer source and the quoted packet's destination become ours, with the flow's NAT
    /// port) and sent to the uplink, as Linux forwards it as related to the flow.
    fn icmp_error_from_client(
        &mut self,
        now: u64,
        c: usize,
        frame: &[u8],
        ip: &Ip,
        out: &mut Outbox,
    ) -> Reason {
        if self.cfg.mode == UplinkMode::Terminate {
            return Reason::Unsupported;
        }
        let inner_off = ip.l4() + 8;
        let Some(inner) = (if ip.v6 {
            wire::parse_ipv6_quoted(frame, inner_off, ip.end())
        } else {
            wire::parse_ipv4_quoted(frame, inner_off, ip.end())
        }) else {
            return Reason::Malformed;
        };
        let client = &self.clients[c];
        let (id, client_ip) = (
            client.id,
            match ip.src {
                IpAddr::V4(_) => IpAddr::V4(client.cfg.ip),
                a => a,
            },
        );
        // The quoted packet came to the client: from a remote to the client's address.
        if inner.dst != client_ip {
            return Reason::Unsupported;
        }
        let t = inner.l4();
        if t + 8 > ip.end() {
            return Reason::Malformed;
        }
        let (l4p, cport, rport) = match inner.proto {
            wire::PROTO_TCP => (Proto4::Tcp, wire::be16(frame, t + 2), wire::be16(frame, t)),
            wire::PROTO_UDP => (Proto4::Udp, wire::be16(frame, t + 2), wire::be16(frame, t)),
            wire::PROTO_ICMP | wire::PROTO_ICMPV6 => return Reason::Unsupported,
            p => {
                let Some((sport, dport)) = wire::ports_of_other(frame, &inner) else {
                    return Reason::Malformed;
                };
                (Proto4::Other(p), dport, sport)
            }
        };
        let key = FlowKey {
            client: id,
            l4: l4p,
            src: client_ip,
            dst: inner.src,
            sport: cport,
            dport: rport,
        };
        let Some(flow) = self.conntrack.lookup_original(&key, now) else {
            return Reason::NoFlow;
        };
        if ip.ttl <= 1 {
            return Reason::TtlExceeded;
        }
        let Some(our) = self.our_ip(ip.v6) else {
            return Reason::Unsupported;
        };
        let (nat_port, dnat) = {
            let f = self.conntrack.get(flow);
            (f.nat_port, f.dnat)
        };
        let dst_mac = if ip.v6 && self.netvm_mac6_known {
            self.netvm_mac6
        } else {
            self.netvm_mac
        };
        let mut buf = std::mem::take(&mut self.build);
        buf.clear();
        buf.extend_from_slice(&frame[..ip.end()]);
        wire::set_macs(&mut buf, &dst_mac, &self.cfg.uplink.mac);
        let port = (!matches!(l4p, Proto4::Other(_))).then_some(nat_port);
        wire::nat_rewrite(&mut buf, &inner, NatField::Dst, our, port, NatCsum::Quoted);
        if let Some(upstream) = dnat {
            // About a DNS answer redirection made look as if from the virtual resolver: the
            // upstream one sent it, and is the one to hear of it.
            let up = IpAddr::V4(upstream);
            wire::nat_rewrite(&mut buf, &inner, NatField::Src, up, None, NatCsum::Quoted);
            wire::nat_rewrite(&mut buf, ip, NatField::Dst, up, None, NatCsum::Full);
        }
        wire::nat_rewrite(&mut buf, ip, NatField::Src, our, None, NatCsum::Full);
        decrement_ttl(&mut buf, ip);
        let l4o = ip.l4();
        wire::put16(&mut buf, l4o + 2, 0);
        let acc = if ip.v6 {
            wire::pseudo_sum(&our, &ip.dst, wire::PROTO_ICMPV6, ip.l4_len())
        } else {
            0
        };
        let c = !wire::fold(wire::sum(&buf[l4o..ip.end()], acc));
        wire::put16(&mut buf, l4o + 2, c);
        out.push_frame(UPLINK, &buf);
        self.build = buf;
        Reason::Accepted
    }

    // ---------------------------------------------------------------------------------------
    // The firewall's own traffic

    /// The uplink's link went away or came back (a new netdev, a carrier lost and found): the
    /// netvm or router behind it may be another host now, so its MAC is found again by ARP
    /// (Linux flushes the neighbours of a device that goes down).
    pub fn uplink_link_changed(&mut self) {
        self.netvm_mac = GATEWAY_MAC;
        self.netvm_mac_known = false;
        self.netvm_mac6 = GATEWAY_MAC;
        self.netvm_mac6_known = false;
        self.arp_sent_at = None;
    }

    /// Whether the service runs a DHCP client on the uplink: DHCP messages to port 68 that
    /// arrive there go to [`Outbox::dhcp_messages`], and [`Engine::send_dhcp`] sends.
    pub fn set_dhcp_client(&mut self, on: bool) {
        self.dhcp_client = on;
    }

    /// Sends a DHCP client message (RFC 2131 4.1: UDP from port 68 to port 67) on the uplink:
    /// from `src` (0.0.0.0 until an address is leased) to `dst` (255.255.255.255, or the server
    /// when renewing), to the Ethernet broadcast address unless `dst` is the router whose MAC
    /// ARP found.
    pub fn send_dhcp(&mut self, src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8], out: &mut Outbox) {
        let udp_len = 8 + payload.len();
        let total = Ipv4Repr::HEADER_LEN + udp_len;
        let dst_mac = if dst == self.cfg.uplink.gateway && self.netvm_mac_known {
            self.netvm_mac
        } else {
            [0xff; 6]
        };
        let mut f = std::mem::take(&mut self.build);
        f.clear();
        f.resize(ETH_LEN + total, 0);
        wire::set_macs(&mut f, &dst_mac, &self.cfg.uplink.mac);
        wire::put16(&mut f, 12, wire::ETHERTYPE_IPV4);
        let id = self.next_ip_id();
        Ipv4Repr {
            src,
            dst,
            protocol: wire::PROTO_UDP,
            ttl: 64,
            ident: id,
            tos: 0,
            dont_frag: false,
            payload_len: udp_len,
        }
        .emit(&mut f[ETH_LEN..]);
        let u = ETH_LEN + Ipv4Repr::HEADER_LEN;
        wire::put16(&mut f, u, 68);
        wire::put16(&mut f, u + 2, 67);
        wire::put16(&mut f, u + 4, udp_len as u16);
        f[u + 8..].copy_from_slice(payload);
        let acc = wire::pseudo_sum(&IpAddr::V4(src), &IpAddr::V4(dst), wire::PROTO_UDP, udp_len);
        let c = match !wire::fold(wire::sum(&f[u..], acc)) {
            0 => 0xffff,
            c => c,
        };
        wire::put16(&mut f, u + 6, c);
        out.push_frame(UPLINK, &f);
        self.build = f;
    }

    /// Delivers packets to `port` of our own address (protocol `l4`) that belong to no
    /// forwarded flow to the host stack ([`Outbox::local_packets`]), and keeps NAT off that
    /// port. The service's own endpoints (its DNS lookups, a DHCP client) bind this way.
    pub fn bind_local(&mut self, l4: crate::conntrack::L4, port: u16) {
        self.conntrack.reserve_port(l4, port);
    }

    /// Hands an IP packet to the host stack. A checksum the sender's kernel left partial
    /// (offloaded) is completed first: the host stack checks checksums, and no kernel will
    /// finish this one.
    fn deliver_local(&mut self, frame: &[u8], ip: &Ip, out: &mut Outbox) {
        let packet = &frame[ip.off..ip.end()];
        if !self.offload.partial_csum {
            out.push_local(packet);
            return;
        }
        let mut buf = std::mem::take(&mut self.build);
        buf.clear();
        buf.extend_from_slice(packet);
        finish_partial_csum(&mut buf, ip.hlen, ip.proto);
        out.push_local(&buf);
        self.build = buf;
    }

    /// Undoes [`Engine::bind_local`].
    pub fn unbind_local(&mut self, l4: crate::conntrack::L4, port: u16) {
        self.conntrack.release_port(l4, port);
    }

    /// Sends an IP packet the host stack built (the service's own traffic: its DNS
    /// lookups, its DHCP client) out of the uplink, toward the netvm. The packet must come
    /// from our address and, for TCP and UDP, from a port bound with [`Engine::bind_local`],
    /// so the host stack can never speak for a client or take a client's NAT port. A packet
    /// bigger than the uplink's MTU is fragmented (IPv4 without DF) or refused.
    pub fn send_local(
        &mut self,
        now: Instant,
        packet: &[u8],
        out: &mut Outbox,
    ) -> Result<(), LocalSendError> {
        let now = now.as_nanos();
        self.now = now;
        self.undefer(out);
        let mut f = std::mem::take(&mut self.build);
        f.clear();
        f.extend_from_slice(&[0u8; ETH_LEN]);
        f.extend_from_slice(packet);
        let r = self.send_local_frame(now, &mut f, out);
        self.build = f;
        r
    }

    /// [`UplinkMode::Terminate`]: the host stack answers a client as whatever it talked to.
    /// It may use any source but a client's own address (one client is never shown another's).
    fn send_local_to_client(
        &mut self,
        ci: usize,
        f: &mut [u8],
        ip: &Ip,
        out: &mut Outbox,
    ) -> Result<(), LocalSendError> {
        if self.cfg.mode != UplinkMode::Terminate {
            return Err(LocalSendError::ToClient);
        }
        if self.client_by_ip(&ip.src).is_some() {
            return Err(LocalSendError::ClientSource);
        }
        let (id, mac, mtu) = {
            let c = &self.clients[ci];
            (c.id, c.cfg.mac, c.cfg.mtu)
        };
        if let Size::TooBig(_) = Self::size_verdict(ip, ip.len, mtu) {
            return Err(LocalSendError::TooBig);
        }
        wire::set_macs(f, &mac, &GATEWAY_MAC);
        self.to_visible(id, f);
        self.send_ip(id, f, out);
        Ok(())
    }

    fn send_local_frame(
        &mut self,
        now: u64,
        f: &mut [u8],
        out: &mut Outbox,
    ) -> Result<(), LocalSendError> {
        let v6 = match f.get(ETH_LEN).map(|b| b >> 4) {
            Some(4) => false,
            Some(6) => true,
            _ => return Err(LocalSendError::Malformed),
        };
        wire::put16(
            f,
            12,
            if v6 {
                wire::ETHERTYPE_IPV6
            } else {
                wire::ETHERTYPE_IPV4
            },
        );
        let ip = match if v6 {
            wire::parse_ipv6(f, ETH_LEN)
        } else {
            wire::parse_ipv4(f, ETH_LEN)
        } {
            Ok(ip) if ip.end() == f.len() => ip,
            _ => return Err(LocalSendError::Malformed),
        };
        if ip.fragment {
            return Err(LocalSendError::Malformed);
        }
        if let Some(ci) = self.client_by_ip(&ip.dst) {
            return self.send_local_to_client(ci, f, &ip, out);
        }
        if Some(ip.src) != self.our_ip(v6) {
            return Err(LocalSendError::NotOurAddress);
        }
        let l4 = match ip.proto {
            wire::PROTO_TCP => Some(Proto4::Tcp),
            wire::PROTO_UDP => Some(Proto4::Udp),
            _ => None,
        };
        if let Some(l4) = l4 {
            let sport = f
                .get(ip.l4()..ip.l4() + 2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
                .ok_or(LocalSendError::Malformed)?;
            if !self.conntrack.is_reserved(l4, sport) {
                return Err(LocalSendError::PortNotBound);
            }
        }
        if let Size::TooBig(_) = Self::size_verdict(&ip, ip.len, self.cfg.uplink.mtu) {
            return Err(LocalSendError::TooBig);
        }
        if !self.netvm_mac_known && self.arp_sent_at.is_none() {
            self.send_arp_request(now, out);
        }
        let dst_mac = if v6 && self.netvm_mac6_known {
            self.netvm_mac6
        } else {
            self.netvm_mac
        };
        wire::set_macs(f, &dst_mac, &self.cfg.uplink.mac);
        self.send_ip(UPLINK, f, out);
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // ARP and NDP

    /// ARP (RFC 826). Clients get fe:ff:ff:ff:ff:ff for any address but their own (Xen
    /// netback's proxy-ARP behaviour in Qubes); on the uplink we answer for our address and
    /// learn the netvm's MAC. We never ARP toward clients: their MACs are configured.
    fn arp(&mut self, now: u64, ci: Option<usize>, frame: &[u8], out: &mut Outbox) -> Reason {
        let Some(a) = frame.get(ETH_LEN..ETH_LEN + 28) else {
            return Reason::Malformed;
        };
        // Ethernet/IPv4 ARP only.
        if wire::be16(a, 0) != 1 || wire::be16(a, 2) != 0x0800 || a[4] != 6 || a[5] != 4 {
            return Reason::Malformed;
        }
        let op = wire::be16(a, 6);
        let mut sha = [0u8; 6];
        sha.copy_from_slice(&a[8..14]);
        let spa = Ipv4Addr::new(a[14], a[15], a[16], a[17]);
        let tpa = Ipv4Addr::new(a[24], a[25], a[26], a[27]);
        match ci {
            Some(c) => {
                let client = &self.clients[c].cfg;
                if let Some(vis) = client.visible {
                    return self.arp_visible(c, vis, op, spa, tpa, out);
                }
                if spa != client.ip && !spa.is_unspecified() {
                    return Reason::Spoofed;
                }
                if op != 1 {
                    // Replies and other operations from clients mean nothing to us.
                    return Reason::Unsupported;
                }
                if tpa == client.ip || spa.is_unspecified() {
                    // Duplicate-address probes and gratuitous ARP for its own address.
                    return Reason::Unsupported;
                }
                if tpa.is_unspecified()
                    || tpa.is_loopback()
                    || tpa.is_multicast()
                    || tpa.is_broadcast()
                {
                    // No host has these addresses on a link: Linux's `arp_process` never
                    // answers for multicast or loopback targets, nor proxies for addresses it
                    // has no unicast route to.
                    return Reason::Unsupported;
                }
                let (mac, ip) = (client.mac, client.ip);
                self.arp_reply(self.clients[c].id, GATEWAY_MAC, tpa, mac, ip, out);
                Reason::Accepted
            }
            None => {
                if spa == self.cfg.uplink.gateway && sha != [0; 6] && sha[0] & 1 == 0 {
                    self.netvm_mac = sha;
                    self.netvm_mac_known = true;
                    for mut f in std::mem::take(&mut self.arp_pending) {
                        wire::set_macs(&mut f, &sha, &self.cfg.uplink.mac);
                        out.push_frame(UPLINK, &f);
                    }
                }
                if op == 1 && tpa == self.cfg.uplink.ip {
                    let mac = self.cfg.uplink.mac;
                    self.arp_reply(UPLINK, mac, tpa, sha, spa, out);
                    return Reason::Accepted;
                }
                let _ = now;
                if op == 2 && spa == self.cfg.uplink.gateway {
                    return Reason::Accepted;
                }
                Reason::Unsupported
            }
        }
    }

    /// ARP from a client with fake addresses. Upstream the vif is in its own namespace whose
    /// only address on the client's side is the visible gateway (vif-qubes-nat.sh: `ip addr
    /// add "$appvm_gw_ip" dev "$netns_appvm_if"`, no proxy ARP there), and its ingress chain
    /// lets through only ARP sent from the visible address (`arp saddr ip $appvm_ip accept`,
    /// policy drop). So only a who-has for the visible gateway is answered; probes and
    /// gratuitous ARP for the client's own address are not.
    fn arp_visible(
        &mut self,
        c: usize,
        vis: Visible,
        op: u16,
        spa: Ipv4Addr,
        tpa: Ipv4Addr,
        out: &mut Outbox,
    ) -> Reason {
        if spa.is_unspecified() {
            return Reason::Unsupported;
        }
        if spa != vis.ip {
            return Reason::Spoofed;
        }
        if op != 1 || tpa != vis.gateway {
            return Reason::Unsupported;
        }
        let (id, mac) = (self.clients[c].id, self.clients[c].cfg.mac);
        self.arp_reply(id, GATEWAY_MAC, vis.gateway, mac, vis.ip, out);
        Reason::Accepted
    }

    fn arp_reply(
        &mut self,
        iface: IfaceId,
        our_mac: Mac,
        our_ip: Ipv4Addr,
        to_mac: Mac,
        to_ip: Ipv4Addr,
        out: &mut Outbox,
    ) {
        let mut f = [0u8; ETH_LEN + 28];
        wire::set_macs(&mut f, &to_mac, &our_mac);
        wire::put16(&mut f, 12, wire::ETHERTYPE_ARP);
        f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
        f[22..28].copy_from_slice(&our_mac);
        f[28..32].copy_from_slice(&our_ip.octets());
        f[32..38].copy_from_slice(&to_mac);
        f[38..42].copy_from_slice(&to_ip.octets());
        out.push_frame(iface, &f);
    }

    /// Who-has the netvm, on the uplink.
    fn send_arp_request(&mut self, now: u64, out: &mut Outbox) {
        self.arp_sent_at = Some(now);
        let mut f = [0u8; ETH_LEN + 28];
        wire::set_macs(&mut f, &[0xff; 6], &self.cfg.uplink.mac);
        wire::put16(&mut f, 12, wire::ETHERTYPE_ARP);
        f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f[22..28].copy_from_slice(&self.cfg.uplink.mac);
        f[28..32].copy_from_slice(&self.cfg.uplink.ip.octets());
        f[38..42].copy_from_slice(&self.cfg.uplink.gateway.octets());
        out.push_frame(UPLINK, &f);
    }

    /// NDP from a client (RFC 4861): neighbour solicitations for anything but the client's own
    /// address are answered with fe:ff:ff:ff:ff:ff, like ARP; router solicitations and other
    /// NDP are ignored (Qubes configures clients statically). `None`: not NDP.
    fn ndp_from_client(
        &mut self,
        c: usize,
        frame: &[u8],
        ip: &Ip,
        out: &mut Outbox,
    ) -> Option<Reason> {
        let t = ip.l4();
        let ty = *frame.get(t)?;
        if !(133..=137).contains(&ty) {
            return None;
        }
        if ip.ttl != 255 || wire::parse_l4(frame, ip).is_none() {
            return Some(Reason::Malformed);
        }
        if ty != 135 || ip.l4_len() < 24 {
            return Some(Reason::Unsupported);
        }
        let mut target = [0u8; 16];
        target.copy_from_slice(&frame[t + 8..t + 24]);
        let target = Ipv6Addr::from(target);
        let client = &self.clients[c].cfg;
        let IpAddr::V6(src) = ip.src else {
            return Some(Reason::Malformed);
        };
        if Some(target) == client.ip6 || src.is_unspecified() {
            return Some(Reason::Unsupported);
        }
        if src != client.ip6.unwrap_or(Ipv6Addr::UNSPECIFIED) && !is_link_local(&src) {
            return Some(Reason::Spoofed);
        }
        let mac = client.mac;
        self.neighbour_advert(self.clients[c].id, GATEWAY_MAC, target, mac, src, out);
        Some(Reason::Accepted)
    }

    /// NDP on the uplink: answer for our address, learn the netvm's MAC.
    fn ndp_from_uplink(&mut self, frame: &[u8], ip: &Ip, out: &mut Outbox) -> Option<Reason> {
        let t = ip.l4();
        let ty = *frame.get(t)?;
        if !(133..=137).contains(&ty) {
            return None;
        }
        if ip.ttl != 255 || wire::parse_l4(frame, ip).is_none() || ip.l4_len() < 24 {
            return Some(Reason::Malformed);
        }
        let mut target = [0u8; 16];
        target.copy_from_slice(&frame[t + 8..t + 24]);
        let target = Ipv6Addr::from(target);
        let IpAddr::V6(src) = ip.src else {
            return Some(Reason::Malformed);
        };
        let lladdr = ndp_lladdr(frame, t + 24, ip.end(), if ty == 135 { 1 } else { 2 });
        match ty {
            135 if Some(target) == self.cfg.uplink.ip6 => {
                if Some(src) == self.cfg.uplink.gateway6 {
                    if let Some(m) = lladdr {
                        self.netvm_mac6 = m;
                        self.netvm_mac6_known = true;
                    }
                }
                let mut to_mac = [0u8; 6];
                to_mac.copy_from_slice(&frame[6..12]);
                let mac = self.cfg.uplink.mac;
                self.neighbour_advert(UPLINK, mac, target, lladdr.unwrap_or(to_mac), src, out);
                Some(Reason::Accepted)
            }
            136 if Some(target) == self.cfg.uplink.gateway6 => {
                if let Some(m) = lladdr {
                    self.netvm_mac6 = m;
                    self.netvm_mac6_known = true;
                }
                Some(Reason::Accepted)
            }
            _ => Some(Reason::Unsupported),
        }
    }

    /// A solicited neighbour advertisement for `target` (RFC 4861 4.4, 7.2.4).
    fn neighbour_advert(
        &mut self,
        iface: IfaceId,
        our_mac: Mac,
        target: Ipv6Addr,
        to_mac: Mac,
        to: Ipv6Addr,
        out: &mut Outbox,
    ) {
        let mut f = [0u8; ETH_LEN + 40 + 32];
        wire::set_macs(&mut f, &to_mac, &our_mac);
        wire::put16(&mut f, 12, wire::ETHERTYPE_IPV6);
        let ip = ETH_LEN;
        Ipv6Repr {
            src: target,
            dst: to,
            next_header: wire::PROTO_ICMPV6,
            // RFC 4861 section 7.1.2: neighbour discovery is sent with hop limit 255.
            hop_limit: 255,
            payload_len: 32,
        }
        .emit(&mut f[ip..]);
        let t = ip + 40;
        f[t] = 136;
        // Router, Solicited, Override: we are the clients' router.
        f[t + 4] = 0xe0;
        f[t + 8..t + 24].copy_from_slice(&target.octets());
        f[t + 24] = 2;
        f[t + 25] = 1;
        f[t + 26..t + 32].copy_from_slice(&our_mac);
        let acc = wire::pseudo_sum(&IpAddr::V6(target), &IpAddr::V6(to), wire::PROTO_ICMPV6, 32);
        let c = !wire::fold(wire::sum(&f[t..t + 32], acc));
        wire::put16(&mut f, t + 2, c);
        out.push_frame(iface, &f);
    }

    // ---------------------------------------------------------------------------------------
    // Packets the engine builds

    fn next_ip_id(&mut self) -> u16 {
        self.ip_id = self.ip_id.wrapping_add(1);
        self.ip_id
    }

    /// An ICMP error about the packet in `frame`, sent back out of `iface` to its source.
    fn icmp_error(
        &mut self,
        iface: IfaceId,
        frame: &[u8],
        ip: &Ip,
        kind: IcmpKind,
        out: &mut Outbox,
    ) {
        if ip.v6 {
            self.icmp6_error(iface, frame, ip, kind, out);
        } else {
            let (ty, code, mtu) = match kind {
                IcmpKind::AdminProhibited => (3, 13, 0),
                IcmpKind::HostProhibited => (3, 10, 0),
                IcmpKind::PortUnreachable => (3, 3, 0),
                IcmpKind::NetUnreachable => (3, 0, 0),
                IcmpKind::TimeExceeded => (11, 0, 0),
                IcmpKind::TooBig(m) => (3, 4, m),
            };
            let quoted = frame[ip.off..ip.end()].to_vec();
            self.icmp4_error(iface, &quoted, ty, code, mtu, out);
        }
    }

    /// Builds an ICMPv4 error (RFC 792) quoting `quoted` (an IP packet) from our address.
    fn icmp4_error(
        &mut self,
        iface: IfaceId,
        quoted: &[u8],
        ty: u8,
        code: u8,
        mtu: u16,
        out: &mut Outbox,
    ) {
        let Ok(q) = wire::parse_ipv4_header_only(quoted) else {
            return;
        };
        // Never answer an ICMP error with an error (RFC 1122 3.2.2).
        if q.proto == wire::PROTO_ICMP {
            if let Some(&t) = quoted.get(q.hlen) {
                if is_icmp_error(false, t) {
                    return;
                }
            }
        }
        let IpAddr::V4(dst) = q.src else { return };
        // Path MTU discovery is never starved (Linux `icmpv4_mask_allow`).
        let pmtu = ty == 3 && code == 4;
        if !pmtu && !self.icmp_limit.allow(self.now, q.src, iface != UPLINK) {
            return;
        }
        let (to_mac, from_mac) = if iface == UPLINK {
            (self.netvm_mac, self.cfg.uplink.mac)
        } else {
            match self.client(iface) {
                Some(c) => (c.cfg.mac, GATEWAY_MAC),
                None => return,
            }
        };
        let qlen = quoted.len().min(ICMP4_ERROR_MAX - 28);
        let total = 28 + qlen;
        let id = self.next_ip_id();
        // From our address on the link it goes out by: the clients' gateway toward a client.
        let src = if iface == UPLINK {
            self.cfg.uplink.ip
        } else {
            self.cfg.client_gateway.unwrap_or(self.cfg.uplink.ip)
        };
        let mut f = std::mem::take(&mut self.build);
        f.clear();
        f.resize(ETH_LEN + total, 0);
        wire::set_macs(&mut f, &to_mac, &from_mac);
        wire::put16(&mut f, 12, wire::ETHERTYPE_IPV4);
        let o = ETH_LEN;
        Ipv4Repr {
            src,
            dst,
            protocol: wire::PROTO_ICMP,
            ttl: 64,
            ident: id,
            tos: 0xc0,
            dont_frag: false,
            payload_len: total - Ipv4Repr::HEADER_LEN,
        }
        .emit(&mut f[o..]);
        let t = o + 20;
        f[t] = ty;
        f[t + 1] = code;
        wire::put16(&mut f, t + 6, mtu);
        f[t + 8..t + 8 + qlen].copy_from_slice(&quoted[..qlen]);
        let c = wire::checksum(&f[t..]);
        wire::put16(&mut f, t + 2, c);
        self.to_visible(iface, &mut f);
        out.push_frame(iface, &f);
        self.build = f;
    }

    /// Builds an ICMPv6 error (RFC 4443) quoting the packet in `frame`.
    fn icmp6_error(
        &mut self,
        iface: IfaceId,
        frame: &[u8],
        ip: &Ip,
        kind: IcmpKind,
        out: &mut Outbox,
    ) {
        let our = if iface == UPLINK {
            self.cfg.uplink.ip6
        } else {
            self.cfg.client_gateway6.or(self.cfg.uplink.ip6)
        };
        let Some(our) = our else {
            return;
        };
        if ip.proto == wire::PROTO_ICMPV6 {
            if let Some(&t) = frame.get(ip.l4()) {
                if is_icmp_error(true, t) {
                    return;
                }
            }
        }
        let IpAddr::V6(dst) = ip.src else { return };
        let (ty, code, mtu): (u8, u8, u32) = match kind {
            IcmpKind::AdminProhibited | IcmpKind::HostProhibited => (1, 1, 0),
            IcmpKind::PortUnreachable => (1, 4, 0),
            IcmpKind::NetUnreachable => (1, 0, 0),
            IcmpKind::TimeExceeded => (3, 0, 0),
            IcmpKind::TooBig(m) => (2, 0, u32::from(m)),
        };
        // Packet-too-big is never limited (Linux `icmpv6_mask_allow`).
        if ty != 2 && !self.icmp_limit.allow(self.now, ip.src, iface != UPLINK) {
            return;
        }
        let (to_mac, from_mac) = if iface == UPLINK {
            (self.netvm_mac6, self.cfg.uplink.mac)
        } else {
            match self.client(iface) {
                Some(c) => (c.cfg.mac, GATEWAY_MAC),
                None => return,
            }
        };
        let quoted = &frame[ip.off..ip.end()];
        let qlen = quoted.len().min(ICMP6_ERROR_MAX - 48);
        let plen = 8 + qlen;
        let mut f = std::mem::take(&mut self.build);
        f.clear();
        f.resize(ETH_LEN + 40 + plen, 0);
        wire::set_macs(&mut f, &to_mac, &from_mac);
        wire::put16(&mut f, 12, wire::ETHERTYPE_IPV6);
        let o = ETH_LEN;
        Ipv6Repr {
            src: our,
            dst,
            next_header: wire::PROTO_ICMPV6,
            hop_limit: 64,
            payload_len: plen,
        }
        .emit(&mut f[o..]);
        let t = o + 40;
        f[t] = ty;
        f[t + 1] = code;
        f[t + 4..t + 8].copy_from_slice(&mtu.to_be_bytes());
        f[t + 8..t + 8 + qlen].copy_from_slice(&quoted[..qlen]);
        let acc = wire::pseudo_sum(&IpAddr::V6(our), &IpAddr::V6(dst), wire::PROTO_ICMPV6, plen);
        let c = !wire::fold(wire::sum(&f[t..], acc));
        wire::put16(&mut f, t + 2, c);
        out.push_frame(iface, &f);
        self.build = f;
    }

    /// Answers a client's ping of the gateway address.
    fn echo_reply(&mut self, iface: IfaceId, frame: &[u8], ip: &Ip, out: &mut Outbox) {
        let Some(client) = self.client(iface) else {
            return;
        };
        let mac = client.cfg.mac;
        let mut f = std::mem::take(&mut self.build);
        f.clear();
        f.extend_from_slice(&frame[..ip.end()]);
        wire::set_macs(&mut f, &mac, &GATEWAY_MAC);
        let o = ip.off;
        let t = ip.l4();
        if ip.v6 {
            let (s, d) = (ip.src, ip.dst);
            let mut src = [0u8; 16];
            src.copy_from_slice(&frame[o + 8..o + 24]);
            f[o + 8..o + 24].copy_from_slice(&frame[o + 24..o + 40]);
            f[o + 24..o + 40].copy_from_slice(&src);
            f[o + 7] = 64;
            f[t] = 129;
            wire::put16(&mut f, t + 2, 0);
            let acc = wire::pseudo_sum(&d, &s, wire::PROTO_ICMPV6, ip.l4_len());
            let c = !wire::fold(wire::sum(&f[t..ip.end()], acc));
            wire::put16(&mut f, t + 2, c);
        } else {
            let mut src = [0u8; 4];
            src.copy_from_slice(&frame[o + 12..o + 16]);
            f[o + 12..o + 16].copy_from_slice(&frame[o + 16..o + 20]);
            f[o + 16..o + 20].copy_from_slice(&src);
            f[o + 8] = 64;
            wire::put16(&mut f, o + 10, 0);
            let hc = wire::checksum(&f[o..o + ip.hlen]);
            wire::put16(&mut f, o + 10, hc);
            f[t] = 0;
            wire::put16(&mut f, t + 2, 0);
            let c = wire::checksum(&f[t..ip.end()]);
            wire::put16(&mut f, t + 2, c);
            self.to_visible(iface, &mut f);
        }
        out.push_frame(iface, &f);
        self.build = f;
    }
}

#[derive(Debug, Clone, Copy)]
enum IcmpKind {
    AdminProhibited,
    HostProhibited,
    PortUnreachable,
    NetUnreachable,
    TimeExceeded,
    TooBig(u16),
}

/// Replaces each address of `map` (from, to) found as the source or destination of the IPv4
/// packet `ip` in `frame`, and of the packet an ICMP error quotes, keeping every checksum
/// right incrementally (a checksum that was wrong stays wrong, so checking it afterwards
/// still catches it). Returns `ip` with its new addresses. Fragments are left alone: only
/// whole datagrams are translated (their transport header is in the first fragment only).
fn map_addrs(frame: &mut [u8], ip: &Ip, map: &[(Ipv4Addr, Ipv4Addr); 2], csum: NatCsum) -> Ip {
    let look = |a: IpAddr| {
        map.iter()
            .find(|(from, _)| IpAddr::V4(*from) == a)
            .map(|&(_, to)| IpAddr::V4(to))
    };
    let mut now = *ip;
    if ip.v6 || ip.fragment {
        return now;
    }
    if let Some(to) = look(ip.src) {
        wire::nat_rewrite(frame, ip, NatField::Src, to, None, csum);
        now.src = to;
    }
    if let Some(to) = look(ip.dst) {
        wire::nat_rewrite(frame, ip, NatField::Dst, to, None, csum);
        now.dst = to;
    }
    let t = ip.l4();
    if ip.proto != wire::PROTO_ICMP || t + 8 > ip.end() || !is_icmp_error(false, frame[t]) {
        return now;
    }
    let Some(inner) = wire::parse_ipv4_quoted(frame, t + 8, ip.end()) else {
        return now;
    };
    let (isrc, idst) = (look(inner.src), look(inner.dst));
    if isrc.is_none() && idst.is_none() {
        return now;
    }
    // What the quote's rewrite may touch: its header, and its transport checksum (TCP's ends
    // 18 bytes in). The outer ICMP checksum covers those bytes, so it follows their sum; the
    // span starts 8 bytes into the ICMP message, on a 16-bit boundary.
    let span = inner.off..(inner.l4() + 18).min(inner.end());
    let before = wire::fold(wire::sum(&frame[span.clone()], 0));
    if let Some(to) = isrc {
        wire::nat_rewrite(frame, &inner, NatField::Src, to, None, NatCsum::Quoted);
    }
    if let Some(to) = idst {
        wire::nat_rewrite(frame, &inner, NatField::Dst, to, None, NatCsum::Quoted);
    }
    // An offloaded ICMPv4 checksum is summed over the message later (it has no
    // pseudo-header part), so only a complete one needs updating.
    if csum != NatCsum::Partial {
        let after = wire::fold(wire::sum(&frame[span], 0));
        let c = wire::csum_update16(wire::be16(frame, t + 2), before, after);
        wire::put16(frame, t + 2, c);
    }
    now
}

/// ICMP queries that conntrack tracks as flows (Linux nf_conntrack_proto_icmp: echo,
/// timestamp, information and address mask requests; ICMPv6 echo).
/// The TCP segment of a packet whose transport header was checked ([`wire::parse_l4_with`]).
fn tcp_segment(frame: &[u8], ip: &Ip) -> Option<tcpwin::Segment> {
    let t = frame.get(ip.l4()..ip.end())?;
    let doff = usize::from(*t.get(12)? >> 4) * 4;
    tcpwin::Segment::parse(t, t.len().saturating_sub(doff))
}

/// ICMP queries that conntrack tracks as flows (Linux nf_conntrack_proto_icmp: echo,
/// timestamp, information and address mask requests; ICMPv6 echo).
fn is_icmp_query(v6: bool, ty: u8) -> bool {
    if v6 {
        ty == 128
    } else {
        matches!(ty, 8 | 13 | 15 | 17)
    }
}

/// The reply type to an ICMP query type.
fn icmp_reply_type(v6: bool, request: u16) -> Option<u8> {
    match (v6, request) {
        (false, 8) => Some(0),
        (false, 13) => Some(14),
        (false, 15) => Some(16),
        (false, 17) => Some(18),
        (true, 128) => Some(129),
        _ => None,
    }
}

/// The replies to [`is_icmp_query`] types.
fn is_icmp_query_reply(v6: bool, ty: u8) -> bool {
    if v6 {
        ty == 129
    } else {
        matches!(ty, 0 | 14 | 16 | 18)
    }
}

fn is_icmp_error(v6: bool, ty: u8) -> bool {
    if v6 {
        ty < 128
    } else {
        matches!(ty, 3 | 4 | 5 | 11 | 12)
    }
}

fn is_link_local(a: &Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

/// Broadcast, multicast and other addresses a router does not forward to.
fn is_special(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => {
            a.is_broadcast() || a.is_multicast() || a.is_unspecified() || a.is_loopback()
        }
        IpAddr::V6(a) => {
            a.is_multicast() || a.is_unspecified() || a.is_loopback() || is_link_local(a)
        }
    }
}

/// The link-layer address option of type `want` in NDP options at `from..end` (RFC 4861 4.6.1).
fn ndp_lladdr(frame: &[u8], mut from: usize, end: usize, want: u8) -> Option<Mac> {
    while from + 2 <= end {
        let ty = frame[from];
        let len = usize::from(frame[from + 1]) * 8;
        if len == 0 || from + len > end {
            return None;
        }
        if ty == want && len >= 8 {
            let mut m = [0u8; 6];
            m.copy_from_slice(&frame[from + 2..from + 8]);
            return Some(m);
        }
        from += len;
    }
    None
}

/// TTL / hop limit minus one, with the IPv4 header checksum updated.
/// Completes a transport checksum the sender's kernel left partial (offloaded): the field
/// holds the pseudo-header sum, so summing the transport bytes with it gives the full
/// checksum (RFC 1071), as hardware would. `packet` starts at the IP header.
fn finish_partial_csum(packet: &mut [u8], hlen: usize, proto: u8) {
    let Some(field) = wire::l4_csum_off(proto) else {
        return;
    };
    if hlen + field + 2 > packet.len() {
        return;
    }
    let c = !wire::fold(wire::sum(&packet[hlen..], 0));
    // UDP sends a computed zero as all ones (RFC 768).
    let c = if proto == wire::PROTO_UDP && c == 0 {
        0xffff
    } else {
        c
    };
    wire::put16(packet, hlen + field, c);
}

fn decrement_ttl(frame: &mut [u8], ip: &Ip) {
    if ip.v6 {
        frame[ip.off + 7] = frame[ip.off + 7].wrapping_sub(1);
    } else {
        let o = ip.off;
        let old = wire::be16(frame, o + 8);
        frame[o + 8] = frame[o + 8].wrapping_sub(1);
        let new = wire::be16(frame, o + 8);
        let c = wire::csum_update16(wire::be16(frame, o + 10), old, new);
        wire::put16(frame, o + 10, c);
    }
}
