//! The gateway without a Tor network: frames from a client through the engine (Terminate mode)
//! and the gateway, and what comes back. What must hold before Tor is ready and for what Tor
//! never carries: resets at once, drops counted, DNS answered from the gateway itself where it
//! needs no exit (RFC 1035 answers; NOTIMP as C tor's DNSPort, SERVFAIL while Tor is not
//! ready), and one client's flood bounded without touching another.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use qubes_engine::config::{from_tree, UplinkMode, VifInfo, GATEWAY_MAC};
use qubes_engine::engine::{Engine, Outbox};
use qubes_engine::Instant;
use qubes_router::service::Terminator;
use sys_whonix::dns;
use sys_whonix::gateway::{Gateway, GatewayConfig, TorState};

const MAC1: [u8; 6] = [0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x30];
const MAC2: [u8; 6] = [0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x31];
const C1: [u8; 4] = [10, 137, 0, 30];
const C2: [u8; 4] = [10, 137, 0, 31];

struct Rig {
    engine: Engine,
    gw: Gateway,
    _rt: tokio::runtime::Runtime,
    t: u64,
}

impl Rig {
    fn new(max_streams: usize) -> Rig {
        let tree: BTreeMap<String, String> = [
            ("/qubes-ip", "10.137.0.20"),
            ("/qubes-gateway", "10.137.0.19"),
            ("/qubes-firewall/10.137.0.30/policy", "accept"),
            ("/qubes-firewall/10.137.0.31/policy", "accept"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let vifs = [
            VifInfo {
                name: "vif1.0".into(),
                ip: C1.into(),
                ip6: None,
                mac: MAC1,
            },
            VifInfo {
                name: "vif2.0".into(),
                ip: C2.into(),
                ip6: None,
                mac: MAC2,
            },
        ];
        let mut cfg = from_tree(&tree, &vifs, "eth0", 1500).expect("config");
        cfg.mode = UplinkMode::Terminate;
        cfg.dns_redirect.clear();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let gcfg = GatewayConfig {
            max_streams_per_client: max_streams,
            ..GatewayConfig::default()
        };
        let tor = Arc::new(Mutex::new(TorState::default()));
        let mut gw = Gateway::new(gcfg, tor, rt.handle().clone(), 1).expect("gateway");
        gw.configure(Instant::ZERO, &cfg);
        Rig {
            engine: Engine::new(cfg).expect("engine"),
            gw,
            _rt: rt,
            t: 1,
        }
    }

    /// One frame from vif `iface` (1 or 2): the frames that come back out of any vif.
    fn send(&mut self, iface: u32, mut frame: Vec<u8>) -> Vec<(u32, Vec<u8>)> {
        self.t += 1;
        let now = Instant::from_secs(self.t);
        let mut out = Outbox::new();
        let _ = self.engine.handle(now, iface, &mut frame, &mut out);
        let mut back = Outbox::new();
        self.gw.after_engine(now, &mut self.engine, &out, &mut back);
        out.frames()
            .chain(back.frames())
            .map(|(i, f)| (i, f.to_vec()))
            .collect()
    }

    fn status(&self) -> String {
        self.gw.status(Instant::ZERO, &self.engine)
    }
}

fn mac(c: [u8; 4]) -> [u8; 6] {
    if c == C1 {
        MAC1
    } else {
        MAC2
    }
}

fn syn(c: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(mac(c), GATEWAY_MAC)
        .ipv4(c, dst, 64)
        .tcp(sport, dport, 1000, 65535)
        .syn();
    let mut v = Vec::new();
    b.write(&mut v, &[]).expect("build");
    v
}

fn udp(c: [u8; 4], dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(mac(c), GATEWAY_MAC)
        .ipv4(c, dst, 64)
        .udp(40000, dport);
    let mut v = Vec::new();
    b.write(&mut v, payload).expect("build");
    v
}

/// (source, destination, TCP flags (SYN 0x02, RST 0x04, ACK 0x10) or 0, UDP payload).
fn parse(f: &[u8]) -> (String, String, u8, Vec<u8>) {
    let p = SlicedPacket::from_ethernet(f).expect("parse");
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!("not IPv4")
    };
    let (s, d) = (
        format!("{}", ip.header().source_addr()),
        format!("{}", ip.header().destination_addr()),
    );
    match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let flags = u8::from(t.syn()) << 1 | u8::from(t.rst()) << 2 | u8::from(t.ack()) << 4;
            (s, d, flags, Vec::new())
        }
        Some(TransportSlice::Udp(u)) => (s, d, 0, u.payload().to_vec()),
        _ => (s, d, 0, Vec::new()),
    }
}

fn counter(status: &str, name: &str) -> u64 {
    status
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {status}"))
}

#[test]
fn before_tor_is_ready_connections_are_reset_at_once_and_lookups_fail_fast() {
    let mut r = Rig::new(256);
    let back = r.send(1, syn(C1, [198, 18, 0, 10], 40000, 80));
    assert_eq!(back.len(), 1, "{back:?}");
    let (s, d, flags, _) = parse(&back[0].1);
    assert_eq!(back[0].0, 1, "into the client's own vif");
    assert_eq!((s.as_str(), d.as_str()), ("198.18.0.10", "10.137.0.30"));
    assert!(
        flags & 0x04 != 0,
        "a reset (RFC 9293 3.10.7.1), flags {flags:#x}"
    );
    assert_eq!(counter(&r.status(), "not-ready"), 1);
    assert!(r.status().contains("tor bootstrapping"));

    let q = dns::build_query(0x1234, "web.example", dns::TYPE_A);
    let back = r.send(1, udp(C1, [10, 139, 1, 1], 53, &q));
    assert_eq!(back.len(), 1);
    let (s, _, _, payload) = parse(&back[0].1);
    assert_eq!(s, "10.139.1.1", "from the resolver the client asked");
    assert_eq!(&payload[..2], &[0x12, 0x34]);
    assert_eq!(payload[3] & 0x0f, 2, "SERVFAIL while Tor is not ready");
}

#[test]
fn what_tor_never_carries_is_answered_here_or_dropped_and_counted() {
    let mut r = Rig::new(256);
    // MX: NOTIMP from the gateway itself, over UDP, from either virtual resolver.
    let q = dns::build_query(7, "web.example", dns::TYPE_MX);
    let back = r.send(2, udp(C2, [10, 139, 1, 2], 53, &q));
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].0, 2);
    let (s, d, _, payload) = parse(&back[0].1);
    assert_eq!((s.as_str(), d.as_str()), ("10.139.1.2", "10.137.0.31"));
    assert_eq!(payload[3] & 0x0f, 4, "NOTIMP");
    // An onion name: an address of the virtual range, with no Tor needed.
    let onion = "abcdefghijklmnopqrstuvwxyz234567abcdefghijklmnopqrstuvwx.onion";
    let back = r.send(
        1,
        udp(C1, [10, 139, 1, 1], 53, &dns::build_query(8, onion, 1)),
    );
    let (_, _, _, payload) = parse(&back[0].1);
    assert_eq!(payload[3] & 0x0f, 0);
    let a = &payload[payload.len() - 4..];
    assert_eq!(a[0], 10);
    assert!(a[1] >= 192, "{a:?} is in 10.192.0.0/10");
    // UDP elsewhere and ICMP: nothing comes back, nothing goes anywhere.
    assert!(r
        .send(1, udp(C1, [198, 18, 0, 10], 9999, b"leak"))
        .is_empty());
    assert!(r
        .send(1, udp(C1, [10, 139, 1, 1], 5353, b"mdns"))
        .is_empty());
    let b = PacketBuilder::ethernet2(MAC1, GATEWAY_MAC)
        .ipv4(C1, [198, 18, 0, 10], 64)
        .icmpv4_echo_request(1, 1);
    let mut ping = Vec::new();
    b.write(&mut ping, b"ping").expect("build");
    assert!(r.send(1, ping).is_empty());
    let st = r.status();
    assert_eq!(counter(&st, "udp"), 2);
    assert_eq!(counter(&st, "icmp"), 1);
    // Internal destinations and other ports of the resolvers: reset at once.
    for (dst, port) in [
        ([192, 168, 1, 1], 80),
        ([172, 16, 5, 5], 22),
        ([10, 139, 1, 1], 80),
    ] {
        let back = r.send(1, syn(C1, dst, 40001, port));
        assert_eq!(back.len(), 1);
        assert!(parse(&back[0].1).2 & 0x04 != 0, "reset for {dst:?}:{port}");
    }
    assert_eq!(counter(&r.status(), "private"), 3);
    // Loopback is not even a destination: the engine drops it before the gateway sees it.
    assert!(r.send(1, syn(C1, [127, 0, 0, 1], 40001, 22)).is_empty());
    assert_eq!(counter(&r.status(), "private"), 3);
    // DNS over TCP is accepted (SYN-ACK) even before Tor is ready.
    let back = r.send(1, syn(C1, [10, 139, 1, 1], 40002, 53));
    assert_eq!(back.len(), 1);
    assert_eq!(parse(&back[0].1).2 & 0x12, 0x12, "SYN-ACK");
    assert!(r
        .status()
        .contains("dns-tcp 10.137.0.30:40002 -> 10.139.1.1:53"));
}

#[test]
fn one_clients_flood_of_connections_is_bounded_and_another_client_still_connects() {
    let mut r = Rig::new(8);
    // DNS-over-TCP connections need no Tor: a flood of them fills client 1's share.
    for p in 0..20u16 {
        let back = r.send(1, syn(C1, [10, 139, 1, 1], 41000 + p, 53));
        let flags = parse(&back[0].1).2;
        if p < 8 {
            assert_eq!(flags & 0x12, 0x12, "connection {p} accepted");
        } else {
            assert!(flags & 0x04 != 0, "connection {p} past the bound reset");
        }
    }
    assert_eq!(counter(&r.status(), "limit"), 12);
    let back = r.send(2, syn(C2, [10, 139, 1, 1], 41000, 53));
    assert_eq!(parse(&back[0].1).2 & 0x12, 0x12, "client 2 unaffected");
    // A retransmitted SYN is the same connection, not a new one.
    let back = r.send(2, syn(C2, [10, 139, 1, 1], 41000, 53));
    assert!(!back.is_empty());
    assert!(r
        .status()
        .contains("tor-client vif2.0 address 10.137.0.31 identity 0 streams 1 "));
}
