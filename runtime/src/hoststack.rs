//! The host stack: the service's own endpoints (its DNS lookups today; a DHCP client and
//! Tor-ended TCP next) on smoltcp, behind the engine's local delivery.
//!
//! The engine hands the host stack the IP packets addressed to ports it bound
//! ([`qubes_engine::Engine::bind_local`], [`qubes_engine::Outbox::local_packets`]) and sends
//! what the host stack builds ([`qubes_engine::Engine::send_local`]), so the service's own
//! traffic goes through the same checks, ARP and fragmentation as forwarded traffic, and NAT
//! never hands a client one of the service's ports. smoltcp runs with `Medium::Ip` over two
//! queues: no Ethernet, no ARP of its own; the engine does that.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use qubes_engine::conntrack::L4;
use qubes_engine::{Engine, Instant, Outbox};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::udp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint};

/// Datagrams buffered per UDP socket, each way.
const UDP_PACKETS: usize = 8;
/// Bytes buffered per UDP socket, each way.
const UDP_BYTES: usize = 8 * 1500;

/// The two queues smoltcp reads from and writes to: a `Medium::Ip` device whose packets are
/// the engine's local deliveries (in) and what [`Engine::send_local`] takes (out). sys-whonix's
/// gateway runs its own interface over one.
#[derive(Debug, Default)]
pub struct Queues {
    pub rx: VecDeque<Vec<u8>>,
    pub tx: Vec<Vec<u8>>,
    pub mtu: usize,
}

#[derive(Debug)]
pub struct Rx(Vec<u8>);
#[derive(Debug)]
pub struct Tx<'a>(&'a mut Vec<Vec<u8>>);

impl smoltcp::phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl smoltcp::phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push(buf);
        r
    }
}

impl Device for Queues {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(
        &mut self,
        _now: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let p = self.rx.pop_front()?;
        Some((Rx(p), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _now: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = self.mtu;
        c
    }
}

/// The engine's clock as smoltcp's.
pub fn smol_now(now: Instant) -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(i64::try_from(now.as_nanos() / 1000).unwrap_or(i64::MAX))
}

/// The service's host stack.
pub struct HostStack {
    iface: Interface,
    dev: Queues,
    sockets: SocketSet<'static>,
    udp: BTreeMap<u16, SocketHandle>,
}

impl std::fmt::Debug for HostStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostStack")
            .field("udp_ports", &self.udp.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl HostStack {
    /// A stack with our addresses (the uplink address the engine masquerades to) and the
    /// netvm as the default gateway.
    pub fn new(
        now: Instant,
        seed: u64,
        addr4: Ipv4Addr,
        gateway4: Ipv4Addr,
        addr6: Option<(Ipv6Addr, Ipv6Addr)>,
        mtu: u16,
    ) -> Self {
        let mut dev = Queues {
            mtu: usize::from(mtu),
            ..Queues::default()
        };
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = seed;
        let iface = Interface::new(config, &mut dev, smol_now(now));
        let mut s = HostStack {
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
            udp: BTreeMap::new(),
        };
        s.set_addresses(addr4, gateway4, addr6, mtu);
        s
    }

    /// Follows a change of our addresses (a new `/qubes-ip`, a DHCP lease).
    pub fn set_addresses(
        &mut self,
        addr4: Ipv4Addr,
        gateway4: Ipv4Addr,
        addr6: Option<(Ipv6Addr, Ipv6Addr)>,
        mtu: u16,
    ) {
        self.dev.mtu = usize::from(mtu);
        self.iface.update_ip_addrs(|a| {
            a.clear();
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(addr4), 32));
            if let Some((a6, _)) = addr6 {
                let _ = a.push(IpCidr::new(IpAddress::Ipv6(a6), 128));
            }
        });
        let routes = self.iface.routes_mut();
        routes.remove_default_ipv4_route();
        let _ = routes.add_default_ipv4_route(gateway4);
        routes.remove_default_ipv6_route();
        if let Some((_, gw6)) = addr6 {
            let _ = routes.add_default_ipv6_route(gw6);
        }
    }

    /// Opens a UDP socket on `port` and binds the port in the engine (NAT keeps off it,
    /// and packets to it come here). False if the port is taken.
    pub fn udp_open(&mut self, engine: &mut Engine, port: u16) -> bool {
        if port == 0 || self.udp.contains_key(&port) {
            return false;
        }
        let mut sock = udp::Socket::new(
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; UDP_PACKETS],
                vec![0; UDP_BYTES],
            ),
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; UDP_PACKETS],
                vec![0; UDP_BYTES],
            ),
        );
        if sock.bind(port).is_err() {
            return false;
        }
        self.udp.insert(port, self.sockets.add(sock));
        engine.bind_local(L4::Udp, port);
        true
    }

    /// Closes the UDP socket on `port` and gives the port back to NAT.
    pub fn udp_close(&mut self, engine: &mut Engine, port: u16) {
        if let Some(h) = self.udp.remove(&port) {
            self.sockets.remove(h);
            engine.unbind_local(L4::Udp, port);
        }
    }

    /// Queues a datagram from `port` to `to`. False if the socket is gone or full.
    pub fn udp_send(&mut self, port: u16, to: SocketAddr, payload: &[u8]) -> bool {
        let Some(&h) = self.udp.get(&port) else {
            return false;
        };
        let ep = IpEndpoint::new(IpAddress::from(to.ip()), to.port());
        self.sockets
            .get_mut::<udp::Socket>(h)
            .send_slice(payload, ep)
            .is_ok()
    }

    /// The next datagram received on `port`: sender and payload.
    pub fn udp_recv(&mut self, port: u16) -> Option<(SocketAddr, Vec<u8>)> {
        let &h = self.udp.get(&port)?;
        let sock = self.sockets.get_mut::<udp::Socket>(h);
        let (data, meta) = sock.recv().ok()?;
        let ip: IpAddr = meta.endpoint.addr.into();
        Some((SocketAddr::new(ip, meta.endpoint.port), data.to_vec()))
    }

    /// Takes the packets the engine delivered locally.
    pub fn ingress(&mut self, out: &Outbox) {
        for p in out.local_packets() {
            self.dev.rx.push_back(p.to_vec());
        }
    }

    /// Runs smoltcp at `now` and sends what it built through the engine. Returns true when
    /// anything was received or sent (callers then look at their sockets).
    pub fn poll(&mut self, now: Instant, engine: &mut Engine, out: &mut Outbox) -> bool {
        let had_input = !self.dev.rx.is_empty();
        self.iface
            .poll(smol_now(now), &mut self.dev, &mut self.sockets);
        let sent = !self.dev.tx.is_empty();
        for p in self.dev.tx.drain(..) {
            if let Err(e) = engine.send_local(now, &p, out) {
                tracing::debug!(error = %e, "host stack packet refused by the engine");
            }
        }
        had_input || sent
    }
}
