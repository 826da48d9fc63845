//! The service's own DNS lookup end to end in memory: the engine asks for a `dsthost` name,
//! the resolver's query leaves the uplink as a real UDP/IPv4 frame from the firewall's own
//! address (through smoltcp and `Engine::send_local`), the server's answer comes back through
//! the engine's local delivery, and the client's rule then lets the traffic through. Client
//! traffic towards the same server never gets the resolver's port.

use std::collections::BTreeMap;

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use qubes_engine::config::{from_tree, VifInfo, GATEWAY_MAC};
use qubes_engine::{Engine, Event, Instant, Outbox, Reason, Verdict, UPLINK};
use qubes_service_runtime::local::{dns_servers, LocalServices};

const FW_MAC: [u8; 6] = [0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x06];
const CLIENT_MAC: [u8; 6] = [0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x0a];

fn tree() -> BTreeMap<String, String> {
    [
        ("/qubes-ip", "10.137.0.6"),
        ("/qubes-gateway", "10.137.0.5"),
        ("/qubes-mac", "00:16:3e:5e:6c:06"),
        ("/qubes-primary-dns", "10.139.1.1"),
        ("/qubes-netvm-primary-dns", "10.139.1.1"),
        ("/qubes-firewall/10.137.0.10", ""),
        ("/qubes-firewall/10.137.0.10/policy", "drop"),
        (
            "/qubes-firewall/10.137.0.10/0000",
            "action=accept dsthost=web.test proto=tcp dstports=80-80",
        ),
        (
            "/qubes-firewall/10.137.0.10/0001",
            "action=accept proto=udp",
        ),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn engine() -> Engine {
    let vifs = [VifInfo {
        name: "vif3.0".into(),
        ip: "10.137.0.10".parse().expect("ip"),
        ip6: None,
        mac: CLIENT_MAC,
    }];
    let mut cfg = from_tree(&tree(), &vifs, "eth0", 1500).expect("config");
    cfg.seed = 42;
    Engine::new(cfg).expect("engine")
}

fn syn(sport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .ipv4([10, 137, 0, 10], [198, 18, 0, 10], 64)
        .tcp(sport, 80, 1000, 65535)
        .syn();
    let mut f = Vec::new();
    b.write(&mut f, &[]).expect("build");
    f
}

/// The UDP datagrams the engine sent on the uplink: (source port, destination, payload).
fn uplink_udp(out: &Outbox) -> Vec<(u16, [u8; 4], u16, Vec<u8>)> {
    let mut v = Vec::new();
    for (iface, f) in out.frames() {
        if iface != UPLINK {
            continue;
        }
        let Ok(p) = SlicedPacket::from_ethernet(f) else {
            continue;
        };
        if let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(u))) = (&p.net, &p.transport) {
            assert_eq!(
                ip.header().source(),
                [10, 137, 0, 6],
                "from our own address"
            );
            // Checksums as the RFCs want them (etherparse recomputes the UDP one).
            let want = u
                .to_header()
                .calc_checksum_ipv4(&ip.header().to_header(), u.payload())
                .expect("udp checksum");
            assert_eq!(u.checksum(), want, "UDP checksum");
            v.push((
                u.source_port(),
                ip.header().destination(),
                u.destination_port(),
                u.payload().to_vec(),
            ));
        }
    }
    v
}

/// An answer to `query` (RFC 1035 4.1, written by hand): the question echoed, one A record.
fn answer(query: &[u8], addr: [u8; 4], ttl: u32) -> Vec<u8> {
    let qend = 12 + query[12..].iter().position(|&b| b == 0).expect("qname end") + 1 + 4;
    let mut m = query[..qend].to_vec();
    m[2] = 0x81;
    m[3] = 0x80;
    m[6..8].copy_from_slice(&1u16.to_be_bytes());
    m.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
    m.extend_from_slice(&ttl.to_be_bytes());
    m.extend_from_slice(&[0, 4]);
    m.extend_from_slice(&addr);
    m
}

fn from_dns(to_port: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(GATEWAY_MAC, FW_MAC)
        .ipv4([10, 139, 1, 1], [10, 137, 0, 6], 63)
        .udp(53, to_port);
    let mut f = Vec::new();
    b.write(&mut f, payload).expect("build");
    f
}

#[test]
fn dsthost_is_resolved_through_the_host_stack_and_applied() {
    let mut e = engine();
    let t = Instant::from_secs(1);
    let mut out = Outbox::new();
    e.tick(t, &mut out);
    let names: Vec<String> = out
        .events
        .iter()
        .filter_map(|ev| match ev {
            Event::Resolve { name } => Some(name.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(names, vec!["web.test".to_string()]);
    // Before the answer, the rule matches nothing: port 80 is refused.
    let mut f = syn(40000);
    out.clear();
    assert_eq!(e.handle(t, 1, &mut f, &mut out), Verdict::Consumed);
    assert_eq!(e.counters(1).expect("c").get(Reason::RejectedByRule), 1);

    let mut local = LocalServices::new(t, e.config(), dns_servers(&tree()));
    local.resolve(t, "web.test");
    let mut sent = Outbox::new();
    local.after_engine(t, &mut e, &Outbox::new(), &mut sent);
    let q = uplink_udp(&sent);
    assert_eq!(q.len(), 1, "one query (no IPv6): {q:?}");
    let (port, dst, dport, query) = &q[0];
    assert_eq!((*dst, *dport), ([10, 139, 1, 1], 53));
    assert!(*port >= 49152);

    // A forged answer from elsewhere is not taken; the real one is.
    let mut forged = from_dns(*port, &answer(query, [6, 6, 6, 6], 300));
    forged[26..30].copy_from_slice(&[10, 139, 1, 9]);
    let mut delivered = Outbox::new();
    let _ = e.handle(t, UPLINK, &mut forged, &mut delivered);
    // The answer comes as a Linux netvm sends it over a veth or a vif with offloads on: the
    // UDP checksum left partial (pseudo-header sum only) for the receiver to finish.
    let mut reply = from_dns(*port, &answer(query, [198, 18, 0, 10], 300));
    let udp_len = reply.len() - 34;
    let seed = qubes_engine::wire::fold(qubes_engine::wire::pseudo_sum(
        &"10.139.1.1".parse().expect("ip"),
        &"10.137.0.6".parse().expect("ip"),
        qubes_engine::wire::PROTO_UDP,
        udp_len,
    ));
    reply[40..42].copy_from_slice(&seed.to_be_bytes());
    let partial = qubes_engine::Offload {
        partial_csum: true,
        ..qubes_engine::Offload::NONE
    };
    assert_eq!(
        e.handle_offloaded(t, UPLINK, &mut reply, partial, &mut delivered),
        Verdict::Consumed
    );
    assert_eq!(
        delivered.local_packets().count(),
        1,
        "the answer goes to the host stack"
    );
    let mut after = Outbox::new();
    local.after_engine(t, &mut e, &delivered, &mut after);

    let mut f = syn(40001);
    out.clear();
    assert_eq!(
        e.handle(t, 1, &mut f, &mut out),
        Verdict::Forward(UPLINK),
        "web.test resolved to 198.18.0.10: port 80 is accepted now"
    );
}

#[test]
fn client_flows_never_get_a_port_the_host_stack_holds() {
    let mut e = engine();
    let t = Instant::from_secs(1);
    let mut local = LocalServices::new(t, e.config(), dns_servers(&tree()));
    local.resolve(t, "web.test");
    let mut sent = Outbox::new();
    local.after_engine(t, &mut e, &Outbox::new(), &mut sent);
    let (port, _, _, _) = uplink_udp(&sent)[0].clone();
    // Reserve almost every port but a handful, so the NAT port choice would collide with the
    // resolver's port by chance if reservations were ignored.
    for p in 1024..=u16::MAX {
        if p % 1000 != 7 {
            e.bind_local(qubes_engine::conntrack::L4::Udp, p);
        }
    }
    let mut nat_ports = Vec::new();
    for sport in 0..40u16 {
        let b = PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
            .ipv4([10, 137, 0, 10], [10, 139, 1, 1], 64)
            .udp(30000 + sport, 53);
        let mut f = Vec::new();
        b.write(&mut f, b"client query").expect("build");
        let mut out = Outbox::new();
        match e.handle(t, 1, &mut f, &mut out) {
            Verdict::Forward(UPLINK) => {
                let p = SlicedPacket::from_ethernet(&f).expect("parse");
                let Some(TransportSlice::Udp(u)) = p.transport else {
                    panic!("udp");
                };
                nat_ports.push(u.source_port());
            }
            v => {
                // Only the free ports are left; once they are used up the table says so.
                assert_eq!(v, Verdict::Consumed);
                assert!(e.counters(1).expect("c").get(Reason::TableFull) > 0);
            }
        }
    }
    assert!(!nat_ports.is_empty());
    for p in &nat_ports {
        assert_eq!(p % 1000, 7, "NAT chose a reserved port {p}");
        assert_ne!(*p, port, "NAT handed a client the resolver's port");
    }
    // And the client's DNS reply on its NAT port goes to the client, not the host stack.
    let mut reply = from_dns(nat_ports[0], b"client answer");
    reply[26..30].copy_from_slice(&[10, 139, 1, 1]);
    let mut out = Outbox::new();
    assert_eq!(
        e.handle(t, UPLINK, &mut reply, &mut out),
        Verdict::Forward(1)
    );
    assert_eq!(out.local_packets().count(), 0);
}
