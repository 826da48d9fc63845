//! The engine's DHCP client port (sys-net): DHCP messages to UDP port 68 on the uplink reach
//! the service whatever their IP destination, and the service's messages leave as RFC 2131
//! 4.1 says (UDP 68 -> 67, broadcast until a server is known); with no DHCP client, neither.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use qubes_engine::config::{from_tree_netvm, NetvmUplink, VifInfo, DEFAULT_QUBE_MAC};
use qubes_engine::engine::{Engine, Outbox, Reason, UPLINK};
use qubes_engine::Instant;

const OUR_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x64];
const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

fn engine(leased: bool) -> Engine {
    let tree: BTreeMap<String, String> = [
        ("/qubes-netvm-gateway", "10.137.0.5"),
        ("/qubes-firewall/10.137.0.6/policy", "accept"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let up = NetvmUplink {
        ip: if leased {
            Ipv4Addr::new(198, 18, 0, 100)
        } else {
            Ipv4Addr::UNSPECIFIED
        },
        router: if leased {
            Ipv4Addr::new(198, 18, 0, 1)
        } else {
            Ipv4Addr::UNSPECIFIED
        },
        dns: vec![],
        mac: OUR_MAC,
    };
    let vifs = [VifInfo {
        name: "vif6.0".into(),
        ip: Ipv4Addr::new(10, 137, 0, 6),
        ip6: None,
        mac: DEFAULT_QUBE_MAC,
    }];
    Engine::new(from_tree_netvm(&tree, &vifs, "eth0", 1500, &up).expect("config")).expect("engine")
}

/// A DHCPOFFER-like message from the server: UDP 67 -> 68 to `dst` at `dst_mac`.
fn offer(dst: [u8; 4], dst_mac: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(SERVER_MAC, dst_mac)
        .ipv4([198, 18, 0, 1], dst, 64)
        .udp(67, 68);
    let mut f = Vec::new();
    b.write(&mut f, payload).expect("build");
    f
}

#[test]
fn offers_reach_the_dhcp_client_before_the_address_is_ours() {
    let payload = b"\x02\x01\x06\x00 an offer";
    for (dst, mac) in [
        ([255, 255, 255, 255], [0xff; 6]),
        ([198, 18, 0, 100], OUR_MAC),
    ] {
        let mut e = engine(false);
        e.set_dhcp_client(true);
        let mut out = Outbox::new();
        let mut f = offer(dst, mac, payload);
        e.handle(Instant::from_nanos(1), UPLINK, &mut f, &mut out);
        let got: Vec<&[u8]> = out.dhcp_messages().collect();
        assert_eq!(got, [&payload[..]], "to {dst:?}");
        assert_eq!(out.frame_count(), 0);
    }
    // Without a DHCP client the same offer is nobody's.
    let mut e = engine(false);
    let mut out = Outbox::new();
    let mut f = offer([255, 255, 255, 255], [0xff; 6], payload);
    e.handle(Instant::from_nanos(1), UPLINK, &mut f, &mut out);
    assert_eq!(out.dhcp_messages().count(), 0);
    assert!(e.counters(UPLINK).expect("uplink").get(Reason::Accepted) == 0);
    // Another host's unicast stays another host's, DHCP or not.
    let mut e = engine(false);
    e.set_dhcp_client(true);
    let mut out = Outbox::new();
    let mut f = offer([198, 18, 0, 100], [0x02, 0, 0, 0, 0, 0x99], payload);
    e.handle(Instant::from_nanos(1), UPLINK, &mut f, &mut out);
    assert_eq!(out.dhcp_messages().count(), 0);
}

#[test]
fn client_messages_leave_as_rfc_2131_says() {
    let mut e = engine(false);
    e.set_dhcp_client(true);
    let mut out = Outbox::new();
    let msg = b"\x01\x01\x06\x00 a discover";
    e.send_dhcp(Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, msg, &mut out);
    let frames: Vec<(u32, &[u8])> = out.frames().collect();
    assert_eq!(frames.len(), 1);
    let (iface, f) = frames[0];
    assert_eq!(iface, UPLINK);
    assert_eq!(&f[..6], &[0xff; 6], "broadcast");
    assert_eq!(&f[6..12], &OUR_MAC);
    let p = SlicedPacket::from_ethernet(f).expect("parses");
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!("not IPv4")
    };
    assert_eq!(ip.header().source(), [0, 0, 0, 0]);
    assert_eq!(ip.header().destination(), [255, 255, 255, 255]);
    assert_eq!(
        ip.header().to_header().calc_header_checksum(),
        ip.header().header_checksum()
    );
    let Some(TransportSlice::Udp(u)) = &p.transport else {
        panic!("not UDP")
    };
    assert_eq!((u.source_port(), u.destination_port()), (68, 67));
    assert_eq!(u.payload(), msg);
    let want = u
        .to_header()
        .calc_checksum_ipv4(&ip.header().to_header(), u.payload())
        .expect("checksum");
    assert_eq!(u.checksum(), want, "UDP checksum");

    // Renewing, to the router whose MAC ARP found: unicast from the leased address.
    let mut e = engine(true);
    e.set_dhcp_client(true);
    let mut out = Outbox::new();
    let mut arp = vec![0u8; 42];
    arp[..6].copy_from_slice(&OUR_MAC);
    arp[6..12].copy_from_slice(&SERVER_MAC);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    arp[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    arp[22..28].copy_from_slice(&SERVER_MAC);
    arp[28..32].copy_from_slice(&[198, 18, 0, 1]);
    arp[32..38].copy_from_slice(&OUR_MAC);
    arp[38..42].copy_from_slice(&[198, 18, 0, 100]);
    e.handle(Instant::from_nanos(1), UPLINK, &mut arp, &mut out);
    out.clear();
    e.send_dhcp(
        Ipv4Addr::new(198, 18, 0, 100),
        Ipv4Addr::new(198, 18, 0, 1),
        msg,
        &mut out,
    );
    let (_, f) = out.frames().next().expect("a frame");
    assert_eq!(&f[..6], &SERVER_MAC, "to the server's MAC");
}

#[test]
fn without_an_address_nothing_leaves_and_clients_hear_so() {
    let mut e = engine(false);
    let mut out = Outbox::new();
    let b = PacketBuilder::ethernet2(DEFAULT_QUBE_MAC, [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff])
        .ipv4([10, 137, 0, 6], [198, 18, 0, 10], 64)
        .udp(40000, 53);
    let mut f = Vec::new();
    b.write(&mut f, b"q").expect("build");
    let vif = e.iface_by_name("vif6.0").expect("vif");
    e.handle(Instant::from_nanos(1), vif, &mut f, &mut out);
    assert_eq!(e.counters(vif).expect("vif").get(Reason::NoUplink), 1);
    let frames: Vec<(u32, &[u8])> = out.frames().collect();
    assert_eq!(frames.len(), 1, "one answer, nothing on the uplink");
    assert_eq!(frames[0].0, vif);
    let p = SlicedPacket::from_ethernet(frames[0].1).expect("parses");
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!("not IPv4")
    };
    // Net unreachable (RFC 792: type 3 code 0), from the clients' gateway.
    assert_eq!(ip.header().source(), [10, 137, 0, 5]);
    assert_eq!(&ip.payload().payload[..2], &[3, 0]);
}

/// A frame held for the router's ARP answer leaves later as a finished frame: a checksum the
/// client's kernel left to offload (`NEEDS_CSUM`) is completed before it is held, or the
/// server would drop the packet.
#[test]
fn a_frame_held_for_arp_leaves_with_its_checksum_finished() {
    use qubes_engine::engine::Offload;
    let mut e = engine(true);
    let mut out = Outbox::new();
    let b = PacketBuilder::ethernet2(DEFAULT_QUBE_MAC, [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff])
        .ipv4([10, 137, 0, 6], [198, 18, 0, 10], 64)
        .udp(40000, 9999);
    let mut f = Vec::new();
    b.write(&mut f, b"offloaded payload").expect("build");
    // As the sender's kernel leaves it: only the pseudo-header sum in the checksum field.
    let udp_len = (f.len() - 34) as u32;
    let mut acc: u32 = 0;
    for w in [[10u8, 137], [0, 6], [198, 18], [0, 10]] {
        acc += u32::from(u16::from_be_bytes(w));
    }
    acc += 17 + udp_len;
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    f[40..42].copy_from_slice(&(acc as u16).to_be_bytes());
    let vif = e.iface_by_name("vif6.0").expect("vif");
    let partial = Offload {
        partial_csum: true,
        ..Offload::NONE
    };
    e.handle_offloaded(Instant::from_nanos(1), vif, &mut f, partial, &mut out);
    // Held: only the ARP request leaves.
    assert!(out.frames().all(|(_, f)| f[12..14] == [0x08, 0x06]));
    let mut arp = vec![0u8; 42];
    arp[..6].copy_from_slice(&OUR_MAC);
    arp[6..12].copy_from_slice(&SERVER_MAC);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    arp[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    arp[22..28].copy_from_slice(&SERVER_MAC);
    arp[28..32].copy_from_slice(&[198, 18, 0, 1]);
    arp[32..38].copy_from_slice(&OUR_MAC);
    arp[38..42].copy_from_slice(&[198, 18, 0, 100]);
    out.clear();
    e.handle(Instant::from_nanos(2), UPLINK, &mut arp, &mut out);
    let (_, sent) = out
        .frames()
        .find(|(_, f)| f[12..14] == [0x08, 0x00])
        .expect("the held frame leaves once the router is known");
    assert_eq!(&sent[..6], &SERVER_MAC);
    let p = SlicedPacket::from_ethernet(sent).expect("parses");
    let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(u))) = (&p.net, &p.transport) else {
        panic!("not UDP/IPv4")
    };
    assert_eq!(ip.header().source(), [198, 18, 0, 100]);
    let want = u
        .to_header()
        .calc_checksum_ipv4(&ip.header().to_header(), u.payload())
        .expect("checksum");
    assert_eq!(u.checksum(), want, "the UDP checksum is finished");
}
