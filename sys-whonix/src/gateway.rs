//! The transparent Tor gateway: client TCP ended in our own stack (smoltcp, any-IP) and carried
//! over Tor, DNS answered through Tor, everything else dropped.
//!
//! The router loop's engine runs in [`UplinkMode::Terminate`](qubes_engine::config::UplinkMode):
//! it does ARP, anti-spoofing (a client's source address is pinned to its vif) and the client's
//! own rules, and hands every accepted IP packet to [`Gateway`] instead of forwarding it. Here:
//! - a TCP SYN gets a listener of its own, for exactly the address and port it was sent to,
//!   when the destination may be reached through Tor and the client is within its bounds;
//!   otherwise no listener, and smoltcp answers with a reset at once (RFC 9293 3.10.7.1). Once
//!   established, the connection is carried over an arti stream opened with
//!   `connect_with_prefs` on the client's isolation token;
//! - UDP and TCP to the virtual resolvers' port 53 are answered from Tor's resolve (A, AAAA),
//!   reverse resolve (PTR) and the client's onion map; other types get NOTIMP ([`crate::dns`]);
//! - everything else (other UDP, ICMP) is dropped and counted. IPv6 and fragments never get
//!   here: the engine drops them.
//!
//! Data moves through bounded channels both ways: the loop reads from a client's socket only
//! when the stream's channel has room, so a slow Tor stream leaves bytes in the socket's
//! receive buffer and the client's window closes (RFC 9293 3.8.6); the loop pulls from Tor only
//! when the socket's send buffer has room, so a slow client stops the arti reader, whose flow
//! control (SENDME) stops the exit. Memory per connection is two socket buffers and a few
//! chunks in flight.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arti_client::IsolationToken;
use qubes_engine::config::{EngineConfig, VIRTUAL_DNS};
use qubes_engine::{Engine, Instant, Outbox};
use qubes_router::service::Terminator;
use qubes_service_runtime::hoststack::{smol_now, Queues};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};
use tokio::sync::mpsc;

use crate::dns::{self, Answer, Lookup, Rcode};
use crate::onion::{self, OnionMap};
use crate::tor::Tor;
use crate::wake::{self, WakeRx, Waker};

/// Bytes moved per channel message.
const CHUNK: usize = 16 * 1024;
/// Messages in flight per direction per stream.
const CHANNEL: usize = 8;
/// TTL of the answers (C tor's DNSPort clips TTLs to a minute or so as well).
const DNS_TTL: u32 = 60;
/// A DNS-over-TCP message may not be longer than this (RFC 1035 4.2.2's length is 16 bits).
const DNS_TCP_MAX: usize = 2 + 65535;
/// A listener whose SYN smoltcp did not take (a bad checksum) is dropped after this long.
const LISTEN_GRACE: Duration = Duration::from_secs(5);
/// Idle connections in the handshake or in closing states are given up after this long.
const TCP_TIMEOUT: Duration = Duration::from_secs(120);

/// The gateway's bounds and isolation choices.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Isolate each destination address on circuits of its own (Whonix `IsolateDestAddr`).
    pub isolate_dest_addr: bool,
    /// Isolate each destination port (Whonix `IsolateDestPort`).
    pub isolate_dest_port: bool,
    /// Open connections (with DNS-over-TCP ones) per client qube.
    pub max_streams_per_client: usize,
    /// DNS lookups in flight per client qube.
    pub max_dns_per_client: usize,
    /// Onion names remembered per client qube.
    pub onion_names_per_client: usize,
    /// Each socket buffer, each way.
    pub socket_buffer: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            isolate_dest_addr: false,
            isolate_dest_port: false,
            max_streams_per_client: 256,
            max_dns_per_client: 64,
            onion_names_per_client: 4096,
            socket_buffer: 64 * 1024,
        }
    }
}

/// The Tor client as the loop sees it: absent until bootstrapped.
#[derive(Debug, Default)]
pub struct TorState {
    pub tor: Option<Tor>,
    /// arti's last bootstrap status line.
    pub progress: String,
    /// Why the last bootstrap attempt failed, if it did.
    pub error: Option<String>,
}

/// Shared between the loop and the bootstrap task.
pub type SharedTor = Arc<Mutex<TorState>>;

/// What a stream's task tells the loop.
#[derive(Debug)]
enum FromTor {
    /// The exit connected; the circuit it is on.
    Connected(String),
    Data(Vec<u8>),
    /// The stream ended cleanly (END DONE): the client gets a FIN after the data.
    Eof,
    /// Tor could not connect, or the stream ended with an error: the client gets a reset.
    Failed(String),
}

/// Where a client's connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Addr(SocketAddrV4),
    /// An onion service, mapped back from its virtual address.
    Onion(String, u16),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Addr(a) => write!(f, "{a}"),
            Target::Onion(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

#[derive(Debug)]
struct TorConn {
    target: Target,
    task: Option<tokio::task::JoinHandle<()>>,
    to_tor: Option<mpsc::Sender<Vec<u8>>>,
    from_tor: Option<mpsc::Receiver<FromTor>>,
    pending: Vec<u8>,
    pending_off: usize,
    circuit: Option<String>,
}

#[derive(Debug, Default)]
struct DnsConn {
    inbuf: Vec<u8>,
    out: Vec<u8>,
    jobs: usize,
}

#[derive(Debug)]
enum ConnKind {
    Tor(Box<TorConn>),
    Dns(DnsConn),
}

#[derive(Debug)]
struct Conn {
    client: Ipv4Addr,
    remote: SocketAddrV4,
    local: SocketAddrV4,
    created: Instant,
    /// Unique for the gateway's life: a socket handle is reused once its socket goes, and a
    /// late DNS answer must never reach the connection (or client) that took the handle over.
    serial: u64,
    kind: ConnKind,
}

/// One client qube.
#[derive(Debug)]
struct Client {
    vif: String,
    /// Rotated by `new-identity`.
    isolation: IsolationToken,
    identity: u32,
    /// Per destination, when destinations are isolated too.
    dest: HashMap<(Option<String>, Option<u16>), IsolationToken>,
    onion: OnionMap,
    streams: usize,
    dns_inflight: usize,
}

const DEST_TOKENS: usize = 1024;

impl Client {
    fn new(vif: &str, cfg: &GatewayConfig, seed: u32) -> Client {
        Client {
            vif: vif.to_string(),
            isolation: IsolationToken::new(),
            identity: 0,
            dest: HashMap::new(),
            onion: OnionMap::new(cfg.onion_names_per_client, seed),
            streams: 0,
            dns_inflight: 0,
        }
    }

    fn token_for(&mut self, cfg: &GatewayConfig, target: &Target) -> IsolationToken {
        if !cfg.isolate_dest_addr && !cfg.isolate_dest_port {
            return self.isolation;
        }
        let (host, port) = match target {
            Target::Addr(a) => (a.ip().to_string(), a.port()),
            Target::Onion(h, p) => (h.clone(), *p),
        };
        let key = (
            cfg.isolate_dest_addr.then_some(host),
            cfg.isolate_dest_port.then_some(port),
        );
        if self.dest.len() >= DEST_TOKENS && !self.dest.contains_key(&key) {
            // Bounded: forgetting a token only means the next stream there gets new circuits.
            self.dest.clear();
        }
        *self.dest.entry(key).or_insert_with(IsolationToken::new)
    }
}

/// What was refused or dropped, for `status`.
#[derive(Debug, Default, Clone)]
struct Counters {
    streams_opened: u64,
    refused_not_ready: u64,
    refused_private: u64,
    refused_limit: u64,
    tor_failed: u64,
    dropped_udp: u64,
    dropped_icmp: u64,
    dropped_other: u64,
    dns_answered: u64,
    dns_notimp: u64,
    dns_failed: u64,
}

/// Where a DNS answer goes.
#[derive(Debug, Clone, Copy)]
enum Reply {
    Udp {
        server: Ipv4Addr,
        to: IpEndpoint,
    },
    /// A DNS-over-TCP connection: its socket and [`Conn::serial`].
    Tcp(SocketHandle, u64),
}

#[derive(Debug)]
enum DnsResult {
    Addrs(Vec<IpAddr>),
    Names(Vec<String>),
    Failed { not_found: bool },
}

#[derive(Debug)]
struct DnsJob {
    query: dns::Query,
    reply: Reply,
    client: Ipv4Addr,
}

/// Addresses a Tor client never asks an exit for (tor `src/lib/net/address.c`
/// `tor_addr_is_internal_`, which C tor's client refuses for TransPort connections, plus
/// multicast and the reserved block, RFC 5771 and RFC 1112 4).
pub fn is_internal(a: Ipv4Addr) -> bool {
    let o = a.octets();
    a.is_unspecified()
        || o[0] == 0
        || o[0] == 10
        || o[0] == 127
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
        || (o[0] == 169 && o[1] == 254)
        || (o[0] == 172 && (o[1] & 0xf0) == 16)
        || (o[0] == 192 && o[1] == 168)
        || o[0] >= 224
}

/// The gateway, run by the router loop as its [`Terminator`].
pub struct Gateway {
    cfg: GatewayConfig,
    iface: Interface,
    dev: Queues,
    sockets: SocketSet<'static>,
    clients: BTreeMap<Ipv4Addr, Client>,
    conns: HashMap<SocketHandle, Conn>,
    by_tuple: HashMap<(SocketAddrV4, SocketAddrV4), SocketHandle>,
    dns_udp: Vec<(Ipv4Addr, SocketHandle)>,
    dns_jobs: HashMap<u64, DnsJob>,
    next_job: u64,
    next_serial: u64,
    job_tx: std::sync::mpsc::Sender<(u64, DnsResult)>,
    job_rx: std::sync::mpsc::Receiver<(u64, DnsResult)>,
    tor: SharedTor,
    rt: tokio::runtime::Handle,
    waker: Arc<Waker>,
    wake_rx: WakeRx,
    counters: Counters,
    seed: u32,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("clients", &self.clients.len())
            .field("conns", &self.conns.len())
            .finish_non_exhaustive()
    }
}

/// A parsed IPv4 packet header, as much as admission needs.
struct Ip4<'a> {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    l4: &'a [u8],
}

fn parse_ip4(p: &[u8]) -> Option<Ip4<'_>> {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return None;
    }
    let hlen = usize::from(p[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    if hlen < 20 || total < hlen || total > p.len() {
        return None;
    }
    Some(Ip4 {
        src: Ipv4Addr::new(p[12], p[13], p[14], p[15]),
        dst: Ipv4Addr::new(p[16], p[17], p[18], p[19]),
        proto: p[9],
        l4: &p[hlen..total],
    })
}

fn smol_duration(d: Duration) -> smoltcp::time::Duration {
    smoltcp::time::Duration::from_micros(d.as_micros() as u64)
}

impl Gateway {
    /// A gateway with no clients yet. `tor` becomes usable when its bootstrap finishes;
    /// until then connections are reset and lookups answered SERVFAIL.
    pub fn new(
        cfg: GatewayConfig,
        tor: SharedTor,
        rt: tokio::runtime::Handle,
        seed: u64,
    ) -> std::io::Result<Gateway> {
        let (waker, wake_rx) = wake::pair()?;
        let mut dev = Queues {
            mtu: usize::from(qubes_engine::config::DEFAULT_MTU),
            ..Queues::default()
        };
        let mut icfg = Config::new(HardwareAddress::Ip);
        icfg.random_seed = seed;
        let mut iface = Interface::new(icfg, &mut dev, smoltcp::time::Instant::ZERO);
        // Every address is ours: a connection is ended as whatever the client dialled.
        iface.set_any_ip(true);
        let (job_tx, job_rx) = std::sync::mpsc::channel();
        let mut g = Gateway {
            cfg,
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
            clients: BTreeMap::new(),
            conns: HashMap::new(),
            by_tuple: HashMap::new(),
            dns_udp: Vec::new(),
            dns_jobs: HashMap::new(),
            next_job: 0,
            next_serial: 0,
            job_tx,
            job_rx,
            tor,
            rt,
            waker,
            wake_rx,
            counters: Counters::default(),
            seed: seed as u32,
        };
        g.set_own_address(VIRTUAL_DNS[0]);
        for server in VIRTUAL_DNS {
            let mut s = udp::Socket::new(
                udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0; 32 * 1024]),
                udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0; 64 * 1024]),
            );
            s.bind(IpListenEndpoint {
                addr: Some(IpAddress::Ipv4(server)),
                port: 53,
            })
            .map_err(|e| std::io::Error::other(format!("DNS socket {server}: {e}")))?;
            let h = g.sockets.add(s);
            g.dns_udp.push((server, h));
        }
        Ok(g)
    }

    /// The waker tasks use.
    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }

    fn set_own_address(&mut self, a: Ipv4Addr) {
        // smoltcp sends only where it has a route; with any-IP the default route through our
        // own address makes every client reachable (the engine picks the vif).
        self.iface.update_ip_addrs(|addrs| {
            addrs.clear();
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(a), 32));
        });
        let routes = self.iface.routes_mut();
        routes.remove_default_ipv4_route();
        let _ = routes.add_default_ipv4_route(a);
    }

    fn tor(&self) -> Option<Tor> {
        self.tor.lock().ok().and_then(|t| t.tor.clone())
    }

    /// Decides what a SYN to `local` from `remote` gets: a listener (and which kind) or a reset.
    fn admit_syn(&mut self, now: Instant, remote: SocketAddrV4, local: SocketAddrV4) {
        let key = (remote, local);
        if self.by_tuple.contains_key(&key) {
            return; // a retransmitted SYN: the socket already has it
        }
        let Some(client) = self.clients.get_mut(remote.ip()) else {
            return;
        };
        if client.streams >= self.cfg.max_streams_per_client {
            self.counters.refused_limit += 1;
            return;
        }
        let dst = *local.ip();
        let kind = if VIRTUAL_DNS.contains(&dst) {
            if local.port() != 53 {
                self.counters.refused_private += 1;
                return;
            }
            ConnKind::Dns(DnsConn::default())
        } else {
            let target = if onion::is_virtual(dst) {
                match client.onion.name_of(dst) {
                    Some(name) => Target::Onion(name, local.port()),
                    None => {
                        self.counters.refused_private += 1;
                        return;
                    }
                }
            } else if is_internal(dst) || local.port() == 0 {
                self.counters.refused_private += 1;
                return;
            } else {
                Target::Addr(local)
            };
            if self.tor.lock().map(|t| t.tor.is_none()).unwrap_or(true) {
                self.counters.refused_not_ready += 1;
                return;
            }
            ConnKind::Tor(Box::new(TorConn {
                target,
                task: None,
                to_tor: None,
                from_tor: None,
                pending: Vec::new(),
                pending_off: 0,
                circuit: None,
            }))
        };
        let n = self.cfg.socket_buffer;
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; n]),
            tcp::SocketBuffer::new(vec![0; n]),
        );
        s.set_timeout(Some(smol_duration(TCP_TIMEOUT)));
        s.set_nagle_enabled(false);
        // The client's kernel sends at once when acknowledged at once; a delayed ACK (smoltcp's
        // default 10 ms) would pace every upload, and the vif has no latency to save.
        s.set_ack_delay(None);
        if s.listen(IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(dst)),
            port: local.port(),
        })
        .is_err()
        {
            return;
        }
        client.streams += 1;
        let h = self.sockets.add(s);
        self.next_serial += 1;
        self.by_tuple.insert(key, h);
        self.conns.insert(
            h,
            Conn {
                client: *remote.ip(),
                remote,
                local,
                created: now,
                serial: self.next_serial,
                kind,
            },
        );
    }

    /// Takes one packet the engine delivered: admitted into smoltcp, or dropped and counted.
    fn ingress(&mut self, now: Instant, p: &[u8]) {
        let Some(ip) = parse_ip4(p) else {
            self.counters.dropped_other += 1;
            return;
        };
        if !self.clients.contains_key(&ip.src) {
            self.counters.dropped_other += 1;
            return;
        }
        match ip.proto {
            6 if ip.l4.len() >= 20 => {
                let flags = ip.l4[13];
                let (syn, ack, rst) = (flags & 0x02 != 0, flags & 0x10 != 0, flags & 0x04 != 0);
                if syn && !ack && !rst {
                    let sport = u16::from_be_bytes([ip.l4[0], ip.l4[1]]);
                    let dport = u16::from_be_bytes([ip.l4[2], ip.l4[3]]);
                    self.admit_syn(
                        now,
                        SocketAddrV4::new(ip.src, sport),
                        SocketAddrV4::new(ip.dst, dport),
                    );
                }
                self.dev.rx.push_back(p.to_vec());
            }
            17 if ip.l4.len() >= 8 => {
                let dport = u16::from_be_bytes([ip.l4[2], ip.l4[3]]);
                if dport == 53 && VIRTUAL_DNS.contains(&ip.dst) {
                    self.dev.rx.push_back(p.to_vec());
                } else {
                    self.counters.dropped_udp += 1;
                }
            }
            1 => self.counters.dropped_icmp += 1,
            _ => self.counters.dropped_other += 1,
        }
    }

    /// Starts the Tor side of an established connection.
    fn start_stream(&mut self, h: SocketHandle) {
        let Some(tor) = self.tor() else {
            self.sockets.get_mut::<tcp::Socket>(h).abort();
            self.counters.refused_not_ready += 1;
            return;
        };
        let Some(conn) = self.conns.get_mut(&h) else {
            return;
        };
        let ConnKind::Tor(tc) = &mut conn.kind else {
            return;
        };
        let Some(client) = self.clients.get_mut(&conn.client) else {
            return;
        };
        let token = client.token_for(&self.cfg, &tc.target);
        let (up_tx, up_rx) = mpsc::channel(CHANNEL);
        let (down_tx, down_rx) = mpsc::channel(CHANNEL);
        tc.to_tor = Some(up_tx);
        tc.from_tor = Some(down_rx);
        let target = tc.target.clone();
        let waker = self.waker.clone();
        tc.task = Some(
            self.rt
                .spawn(relay(tor, target, token, up_rx, down_tx, waker)),
        );
        self.counters.streams_opened += 1;
    }

    /// Moves data for every connection; true if anything moved.
    fn service_conns(&mut self, now: Instant) -> bool {
        let mut moved = false;
        let handles: Vec<SocketHandle> = self.conns.keys().copied().collect();
        let mut dns_msgs: Vec<(Ipv4Addr, Reply, Vec<u8>)> = Vec::new();
        let mut to_start = Vec::new();
        let mut gone = Vec::new();
        for h in handles {
            let Some(conn) = self.conns.get_mut(&h) else {
                continue;
            };
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            match &mut conn.kind {
                ConnKind::Tor(tc) => {
                    if tc.task.is_none() {
                        if s.state() == tcp::State::Established {
                            to_start.push(h);
                        }
                    } else {
                        moved |= pump_tor(s, tc, &mut self.counters);
                    }
                }
                ConnKind::Dns(dc) => {
                    while s.can_recv() && dc.inbuf.len() < DNS_TCP_MAX {
                        let room = DNS_TCP_MAX - dc.inbuf.len();
                        let got = s
                            .recv(|b| {
                                let n = b.len().min(room);
                                (n, b[..n].to_vec())
                            })
                            .unwrap_or_default();
                        if got.is_empty() {
                            break;
                        }
                        dc.inbuf.extend_from_slice(&got);
                        moved = true;
                    }
                    while dc.inbuf.len() >= 2 {
                        let len = usize::from(u16::from_be_bytes([dc.inbuf[0], dc.inbuf[1]]));
                        if dc.inbuf.len() < 2 + len {
                            break;
                        }
                        let msg: Vec<u8> = dc.inbuf.drain(..2 + len).skip(2).collect();
                        dc.jobs += 1;
                        dns_msgs.push((conn.client, Reply::Tcp(h, conn.serial), msg));
                    }
                    if !dc.out.is_empty() && s.can_send() {
                        let n = s.send_slice(&dc.out).unwrap_or(0);
                        dc.out.drain(..n);
                        moved |= n > 0;
                    }
                    // The client has sent its FIN and has every answer it asked for.
                    if s.state() == tcp::State::CloseWait && dc.jobs == 0 && dc.out.is_empty() {
                        s.close();
                    }
                }
            }
            let stale = s.state() == tcp::State::Listen
                && now.as_nanos().saturating_sub(conn.created.as_nanos())
                    > LISTEN_GRACE.as_nanos() as u64;
            if matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) || stale {
                gone.push(h);
            }
        }
        for h in to_start {
            self.start_stream(h);
            moved = true;
        }
        for (client, reply, msg) in dns_msgs {
            self.query(client, &msg, reply);
        }
        for h in gone {
            self.remove(h);
            moved = true;
        }
        moved
    }

    fn remove(&mut self, h: SocketHandle) {
        if let Some(conn) = self.conns.remove(&h) {
            if let ConnKind::Tor(tc) = &conn.kind {
                if let Some(t) = &tc.task {
                    // Dropping the arti stream sends its END.
                    t.abort();
                }
            }
            self.by_tuple.remove(&(conn.remote, conn.local));
            if let Some(c) = self.clients.get_mut(&conn.client) {
                c.streams = c.streams.saturating_sub(1);
            }
        }
        self.sockets.remove(h);
    }

    fn service_dns_udp(&mut self) -> bool {
        let mut got = Vec::new();
        for &(server, h) in &self.dns_udp {
            let s = self.sockets.get_mut::<udp::Socket>(h);
            while let Ok((data, meta)) = s.recv() {
                got.push((server, meta.endpoint, data.to_vec()));
            }
        }
        let moved = !got.is_empty();
        for (server, from, msg) in got {
            let IpAddress::Ipv4(client) = from.addr else {
                continue;
            };
            if !self.clients.contains_key(&client) {
                continue;
            }
            self.query(client, &msg, Reply::Udp { server, to: from });
        }
        moved
    }

    fn reply(&mut self, reply: Reply, msg: Vec<u8>) {
        match reply {
            Reply::Udp { server, to } => {
                if let Some(&(_, h)) = self.dns_udp.iter().find(|(s, _)| *s == server) {
                    let _ = self.sockets.get_mut::<udp::Socket>(h).send_slice(&msg, to);
                }
            }
            Reply::Tcp(h, serial) => {
                if let Some(dc) = self.dns_conn(h, serial) {
                    dc.jobs = dc.jobs.saturating_sub(1);
                    // RFC 1035 4.2.2: a two-octet length; an answer too long for it is
                    // not sent (ours are far shorter: one question, a few records).
                    if let Ok(len) = u16::try_from(msg.len()) {
                        dc.out.extend_from_slice(&len.to_be_bytes());
                        dc.out.extend_from_slice(&msg);
                    }
                }
            }
        }
    }

    /// The DNS-over-TCP connection `h` still is, if it is the one numbered `serial`.
    fn dns_conn(&mut self, h: SocketHandle, serial: u64) -> Option<&mut DnsConn> {
        match self.conns.get_mut(&h) {
            Some(Conn {
                kind: ConnKind::Dns(dc),
                serial: s,
                ..
            }) if *s == serial => Some(dc),
            _ => None,
        }
    }

    /// Answers one DNS message from `client`: at once where it can, else through Tor.
    fn query(&mut self, client: Ipv4Addr, msg: &[u8], reply: Reply) {
        let q = match dns::parse_query(msg) {
            Ok(q) => q,
            Err(dns::ParseError::Format { id, opcode, rd }) => {
                self.counters.dns_failed += 1;
                self.reply(reply, dns::format_error(id, opcode, rd));
                return;
            }
            Err(dns::ParseError::NotAQuery) => {
                if let Reply::Tcp(h, serial) = reply {
                    if let Some(dc) = self.dns_conn(h, serial) {
                        dc.jobs = dc.jobs.saturating_sub(1);
                    }
                }
                return;
            }
        };
        let tor = self.tor();
        let Some(c) = self.clients.get_mut(&client) else {
            return;
        };
        let immediate = |rc: Rcode, a: &[Answer]| dns::response(&q, rc, a, DNS_TTL);
        let lookup = dns::lookup_for(&q);
        let now_answer = match &lookup {
            Lookup::Refuse(rc) => {
                if *rc == Rcode::NotImp {
                    self.counters.dns_notimp += 1;
                }
                Some(immediate(*rc, &[]))
            }
            Lookup::Forward { name, v6 } if onion::is_onion(name) => {
                // Onion names have no IPv6 virtual range here (the gateway carries no IPv6).
                if *v6 {
                    Some(immediate(Rcode::NoError, &[]))
                } else {
                    let a = c.onion.address_for(name);
                    Some(immediate(Rcode::NoError, &[Answer::Addr(IpAddr::V4(a))]))
                }
            }
            Lookup::Reverse(IpAddr::V4(a)) if onion::is_virtual(*a) => {
                Some(match c.onion.name_of(*a) {
                    Some(n) => immediate(Rcode::NoError, &[Answer::Ptr(n)]),
                    None => immediate(Rcode::NxDomain, &[]),
                })
            }
            _ => None,
        };
        if let Some(ans) = now_answer {
            self.counters.dns_answered += 1;
            self.reply(reply, ans);
            return;
        }
        if tor.is_none() || c.dns_inflight >= self.cfg.max_dns_per_client {
            self.counters.dns_failed += 1;
            let ans = immediate(Rcode::ServFail, &[]);
            self.reply(reply, ans);
            return;
        }
        let Some(tor) = tor else { return };
        c.dns_inflight += 1;
        let token = c.isolation;
        let id = self.next_job;
        self.next_job += 1;
        let tx = self.job_tx.clone();
        let waker = self.waker.clone();
        self.rt.spawn(async move {
            let r = match lookup {
                Lookup::Forward { name, .. } => match tor.resolve(&name, token).await {
                    Ok(a) => DnsResult::Addrs(a),
                    Err(e) => DnsResult::Failed {
                        not_found: e.is_not_found(),
                    },
                },
                Lookup::Reverse(a) => match tor.resolve_ptr(a, token).await {
                    Ok(n) => DnsResult::Names(n),
                    Err(e) => DnsResult::Failed {
                        not_found: e.is_not_found(),
                    },
                },
                Lookup::Refuse(_) => DnsResult::Failed { not_found: false },
            };
            let _ = tx.send((id, r));
            waker.wake();
        });
        self.dns_jobs.insert(
            id,
            DnsJob {
                query: q,
                reply,
                client,
            },
        );
    }

    fn collect_dns(&mut self) {
        while let Ok((id, r)) = self.job_rx.try_recv() {
            let Some(job) = self.dns_jobs.remove(&id) else {
                continue;
            };
            if let Some(c) = self.clients.get_mut(&job.client) {
                c.dns_inflight = c.dns_inflight.saturating_sub(1);
            }
            let ans = match r {
                DnsResult::Addrs(a) => {
                    let a: Vec<Answer> = a.into_iter().map(Answer::Addr).collect();
                    dns::response(&job.query, Rcode::NoError, &a, DNS_TTL)
                }
                DnsResult::Names(n) => {
                    let n: Vec<Answer> = n.into_iter().map(Answer::Ptr).collect();
                    dns::response(&job.query, Rcode::NoError, &n, DNS_TTL)
                }
                DnsResult::Failed { not_found } => {
                    let rc = if not_found {
                        Rcode::NxDomain
                    } else {
                        Rcode::ServFail
                    };
                    dns::response(&job.query, rc, &[], DNS_TTL)
                }
            };
            self.counters.dns_answered += 1;
            self.reply(job.reply, ans);
        }
    }

    fn client_by_name(&self, q: &str) -> Option<Ipv4Addr> {
        self.clients
            .iter()
            .find(|(ip, c)| c.vif == q || ip.to_string() == q)
            .map(|(ip, _)| *ip)
    }
}

/// Moves one Tor connection's data both ways; true if anything moved.
fn pump_tor(s: &mut tcp::Socket, tc: &mut TorConn, counters: &mut Counters) -> bool {
    let mut moved = false;
    // Tor to the client, as far as the socket's send buffer has room.
    loop {
        if tc.pending_off < tc.pending.len() {
            if !s.can_send() {
                break;
            }
            let n = s.send_slice(&tc.pending[tc.pending_off..]).unwrap_or(0);
            tc.pending_off += n;
            moved |= n > 0;
            if tc.pending_off < tc.pending.len() {
                break;
            }
        }
        let Some(rx) = tc.from_tor.as_mut() else {
            break;
        };
        match rx.try_recv() {
            Ok(FromTor::Connected(c)) => tc.circuit = Some(c),
            Ok(FromTor::Data(d)) => {
                tc.pending = d;
                tc.pending_off = 0;
            }
            Ok(FromTor::Eof) => {
                tc.from_tor = None;
                s.close();
                moved = true;
                break;
            }
            Ok(FromTor::Failed(why)) => {
                tracing::info!(target = %tc.target, why, "Tor stream failed: the client gets a reset");
                counters.tor_failed += 1;
                tc.from_tor = None;
                s.abort();
                moved = true;
                break;
            }
            Err(mpsc::error::TryRecvError::Empty) => break,
            Err(mpsc::error::TryRecvError::Disconnected) => {
                tc.from_tor = None;
                s.abort();
                moved = true;
                break;
            }
        }
    }
    // The client to Tor, once the exit has connected, as far as the channel has room;
    // what stays in the socket closes the client's window.
    if tc.circuit.is_some() {
        if let Some(tx) = tc.to_tor.as_ref() {
            while s.can_recv() {
                let Ok(permit) = tx.try_reserve() else { break };
                let chunk = s
                    .recv(|b| {
                        let n = b.len().min(CHUNK);
                        (n, b[..n].to_vec())
                    })
                    .unwrap_or_default();
                if chunk.is_empty() {
                    break;
                }
                permit.send(chunk);
                moved = true;
            }
        }
        // The client's FIN, once its data is taken: Tor has no half-close (a RELAY_END ends
        // both ways, tor-spec 6.3), so the stream stays open for the answer and only our
        // sending side ends.
        if !s.may_recv() && s.recv_queue() == 0 && tc.to_tor.take().is_some() {
            moved = true;
        }
    }
    moved
}

/// One stream's Tor side: connect, then copy both ways until either side ends.
async fn relay(
    tor: Tor,
    target: Target,
    token: IsolationToken,
    mut up_rx: mpsc::Receiver<Vec<u8>>,
    down_tx: mpsc::Sender<FromTor>,
    waker: Arc<Waker>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let r = match &target {
        Target::Addr(a) => tor.connect(SocketAddr::V4(*a), token).await,
        Target::Onion(h, p) => tor.connect_host(h, *p, token).await,
    };
    let stream = match r {
        Ok(s) => s,
        Err(e) => {
            let _ = down_tx.send(FromTor::Failed(e.to_string())).await;
            waker.wake();
            return;
        }
    };
    let circ = Tor::circuit_of(&stream).unwrap_or_else(|| "unknown".into());
    if down_tx.send(FromTor::Connected(circ)).await.is_err() {
        return;
    }
    waker.wake();
    let (mut reader, mut writer) = stream.split();
    let up_waker = waker.clone();
    let up = async move {
        while let Some(buf) = up_rx.recv().await {
            // The loop may be waiting for room in the channel.
            up_waker.wake();
            writer.write_all(&buf).await?;
            if up_rx.is_empty() {
                writer.flush().await?;
            }
        }
        writer.flush().await?;
        Ok::<_, std::io::Error>(writer)
    };
    let err_tx = down_tx.clone();
    let down_waker = waker.clone();
    let down = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let msg = match reader.read(&mut buf).await {
                Ok(0) => FromTor::Eof,
                Ok(n) => FromTor::Data(buf[..n].to_vec()),
                Err(e) => FromTor::Failed(e.to_string()),
            };
            let last = !matches!(msg, FromTor::Data(_));
            let sent = down_tx.send(msg).await.is_ok();
            down_waker.wake();
            if last || !sent {
                return;
            }
        }
    };
    tokio::pin!(up, down);
    let mut up_done = false;
    let mut _kept_writer = None;
    loop {
        tokio::select! {
            r = &mut up, if !up_done => {
                up_done = true;
                match r {
                    // Kept: dropping the writer could end the stream under the reader.
                    Ok(w) => _kept_writer = Some(w),
                    Err(e) => {
                        let _ = err_tx.send(FromTor::Failed(e.to_string())).await;
                        waker.wake();
                        return;
                    }
                }
            }
            () = &mut down => return,
        }
    }
}

impl Terminator for Gateway {
    fn configure(&mut self, _now: Instant, cfg: &EngineConfig) {
        let own = cfg.client_gateway.unwrap_or(cfg.uplink.ip);
        if !own.is_unspecified() {
            self.set_own_address(own);
        }
        self.dev.mtu = cfg
            .clients
            .iter()
            .map(|c| usize::from(c.mtu))
            .min()
            .unwrap_or(usize::from(qubes_engine::config::DEFAULT_MTU));
        let mut next = BTreeMap::new();
        for c in &cfg.clients {
            let kept = self.clients.remove(&c.ip).filter(|old| old.vif == c.vif);
            let seed = self.seed ^ u32::from(c.ip);
            next.insert(
                c.ip,
                kept.unwrap_or_else(|| Client::new(&c.vif, &self.cfg, seed)),
            );
        }
        // Clients that went (or whose address moved to another vif): their connections go.
        let gone: Vec<SocketHandle> = self
            .conns
            .iter()
            .filter(|(_, conn)| !next.contains_key(&conn.client))
            .map(|(h, _)| *h)
            .collect();
        self.clients = next;
        for h in gone {
            self.sockets.get_mut::<tcp::Socket>(h).abort();
            self.remove(h);
        }
    }

    fn after_engine(
        &mut self,
        now: Instant,
        engine: &mut Engine,
        delivered: &Outbox,
        out: &mut Outbox,
    ) {
        self.wake_rx.take();
        for p in delivered.local_packets() {
            self.ingress(now, p);
        }
        self.collect_dns();
        for _ in 0..32 {
            self.iface
                .poll(smol_now(now), &mut self.dev, &mut self.sockets);
            let mut moved = self.service_conns(now);
            moved |= self.service_dns_udp();
            self.iface
                .poll(smol_now(now), &mut self.dev, &mut self.sockets);
            let sent = !self.dev.tx.is_empty();
            for p in self.dev.tx.drain(..) {
                if let Err(e) = engine.send_local(now, &p, out) {
                    tracing::debug!(error = %e, "gateway packet refused by the engine");
                }
            }
            if !moved && !sent {
                break;
            }
        }
    }

    fn wake_fd(&self) -> RawFd {
        self.wake_rx.as_raw_fd()
    }

    fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        self.iface
            .poll_delay(smol_now(now), &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
    }

    fn status(&self, _now: Instant, _engine: &Engine) -> String {
        let mut s = String::new();
        match self.tor.lock() {
            Ok(t) => {
                let state = if t.tor.is_some() {
                    "ready"
                } else {
                    "bootstrapping"
                };
                s.push_str(&format!("tor {state} bootstrap {}\n", t.progress));
                if let Some(e) = &t.error {
                    s.push_str(&format!("tor last-error {e}\n"));
                }
            }
            Err(_) => s.push_str("tor unknown\n"),
        }
        let c = &self.counters;
        s.push_str(&format!(
            "gateway streams {} opened {} dns-in-flight {} isolate-dest-addr {} isolate-dest-port {}\n",
            self.conns.len(),
            c.streams_opened,
            self.dns_jobs.len(),
            self.cfg.isolate_dest_addr,
            self.cfg.isolate_dest_port,
        ));
        s.push_str(&format!(
            "  refused not-ready={} private={} limit={} tor-failed={} dropped udp={} icmp={} other={} dns answered={} notimp={} failed={}\n",
            c.refused_not_ready, c.refused_private, c.refused_limit, c.tor_failed,
            c.dropped_udp, c.dropped_icmp, c.dropped_other,
            c.dns_answered, c.dns_notimp, c.dns_failed,
        ));
        for (ip, cl) in &self.clients {
            s.push_str(&format!(
                "tor-client {} address {ip} identity {} streams {} onion-names {}\n",
                cl.vif,
                cl.identity,
                cl.streams,
                cl.onion.len()
            ));
            let mut lines: Vec<String> = self
                .conns
                .iter()
                .filter(|(_, conn)| conn.client == *ip)
                .map(|(h, conn)| {
                    let st = self.sockets.get::<tcp::Socket>(*h).state();
                    match &conn.kind {
                        ConnKind::Tor(tc) => format!(
                            "  stream {} -> {} circuit {} tcp {st}\n",
                            conn.remote,
                            tc.target,
                            tc.circuit.as_deref().unwrap_or("(connecting)")
                        ),
                        ConnKind::Dns(_) => {
                            format!("  dns-tcp {} -> {} tcp {st}\n", conn.remote, conn.local)
                        }
                    }
                })
                .collect();
            lines.sort();
            s.extend(lines);
        }
        s
    }

    fn command(&mut self, _now: Instant, command: &str) -> Option<String> {
        let rest = command.strip_prefix("new-identity")?;
        let who = rest.trim();
        if who.is_empty() {
            return Some("error new-identity needs a client: its vif or its address\n".into());
        }
        let Some(ip) = self.client_by_name(who) else {
            return Some(format!(
                "error new-identity: no client {who:?} (give a vif name or a client address)\n"
            ));
        };
        let c = self.clients.get_mut(&ip)?;
        c.isolation = IsolationToken::new();
        c.dest.clear();
        c.identity += 1;
        tracing::info!(vif = c.vif.as_str(), identity = c.identity, "new identity");
        Some(format!(
            "ok new-identity {} identity {} (new streams use new circuits)\n",
            c.vif, c.identity
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_those_tor_refuses() {
        for a in [
            "0.1.2.3",
            "10.1.2.3",
            "100.64.0.1",
            "127.0.0.1",
            "169.254.1.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(is_internal(a.parse().expect("ip")), "{a}");
        }
        for a in [
            "1.1.1.1",
            "100.128.0.1",
            "172.32.0.1",
            "198.18.0.10",
            "8.8.8.8",
        ] {
            assert!(!is_internal(a.parse().expect("ip")), "{a}");
        }
    }
}
