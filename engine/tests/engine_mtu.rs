//! Link MTUs as a router must honour them: fragmentation needed with the next-hop MTU
//! (RFC 1191 section 4), fragmentation of IPv4 without DF (RFC 791), packet too big for IPv6
//! (RFC 4443 3.2), and MTUs that change at run time without disturbing flows.

use std::collections::BTreeMap;

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use qubes_engine::config::{
    from_tree, ConfigError, EngineConfig, FragLimits, VifInfo, GATEWAY_MAC,
};
use qubes_engine::engine::{Engine, MtuError, Offload, Outbox, Reason, Verdict, UPLINK};
use qubes_engine::frag::Reassembler;
use qubes_engine::Instant;

const CLIENT_MAC: [u8; 6] = [0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x10];
const OUR_MAC: [u8; 6] = [0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x06];
const CLIENT: [u8; 4] = [10, 137, 0, 10];
const OUR_IP: [u8; 4] = [10, 137, 0, 6];
const WORLD: [u8; 4] = [198, 18, 0, 10];
const CLIENT6: [u8; 16] = [
    0xfd, 0x09, 0x24, 0xef, 0x41, 0x79, 0, 0, 0, 0, 0, 0, 0x0a, 0x89, 0, 0x0a,
];
const WORLD6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];
const VIF: u32 = 1;

fn config(v6: bool) -> EngineConfig {
    let mut tree: BTreeMap<String, String> = [
        ("/qubes-ip", "10.137.0.6"),
        ("/qubes-gateway", "10.137.0.5"),
        ("/qubes-mac", "00:16:3e:5e:6c:06"),
        ("/qubes-firewall/10.137.0.10/policy", "accept"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let mut ip6 = None;
    if v6 {
        tree.insert("/qubes-ip6".into(), "fd09:24ef:4179::a89:6".into());
        tree.insert("/qubes-gateway6".into(), "fd09:24ef:4179::a89:5".into());
        tree.insert(
            "/qubes-firewall/fd09:24ef:4179::a89:a/policy".into(),
            "accept".into(),
        );
        ip6 = Some("fd09:24ef:4179::a89:a".parse().expect("ip6"));
    }
    let vifs = [VifInfo {
        name: "vif3.0".into(),
        ip: "10.137.0.10".parse().expect("ip"),
        ip6,
        mac: CLIENT_MAC,
    }];
    let mut cfg = from_tree(&tree, &vifs, "eth0", 1500).expect("config");
    cfg.seed = 7;
    cfg
}

fn engine() -> Engine {
    Engine::new(config(false)).expect("engine")
}

/// A UDP frame with `payload` bytes; `df` sets Don't Fragment (IPv4 header checksum redone).
fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: usize, df: bool) -> Vec<u8> {
    let (smac, dmac) = if src == CLIENT {
        (CLIENT_MAC, GATEWAY_MAC)
    } else {
        (GATEWAY_MAC, OUR_MAC)
    };
    let mut v = Vec::new();
    let data: Vec<u8> = (0..payload).map(|i| i as u8).collect();
    PacketBuilder::ethernet2(smac, dmac)
        .ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut v, &data)
        .expect("build");
    if df {
        v[20] |= 0x40;
    } else {
        v[20] &= !0x40;
    }
    v[24] = 0;
    v[25] = 0;
    let mut sum = 0u32;
    for c in v[14..34].chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    v[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    v
}

fn udp6(src: [u8; 16], dst: [u8; 16], payload: usize) -> Vec<u8> {
    let mut v = Vec::new();
    let data = vec![7u8; payload];
    PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .ipv6(src, dst, 64)
        .udp(5000, 7)
        .write(&mut v, &data)
        .expect("build");
    v
}

/// Opens a UDP flow from the client and returns its NAT port.
fn open_flow(e: &mut Engine, out: &mut Outbox) -> u16 {
    let mut f = udp(CLIENT, WORLD, 5000, 7, 10, false);
    assert_eq!(
        e.handle(Instant::from_nanos(1), VIF, &mut f, out),
        Verdict::Forward(UPLINK)
    );
    out.clear();
    let p = SlicedPacket::from_ethernet(&f).expect("parse");
    match p.transport {
        Some(TransportSlice::Udp(u)) => u.source_port(),
        _ => panic!("not udp"),
    }
}

/// (type, code, the 16-bit or 32-bit MTU field, destination) of an ICMP error frame.
fn icmp(frame: &[u8]) -> (u8, u8, u32, String) {
    let p = SlicedPacket::from_ethernet(frame).expect("parse");
    let dst = match &p.net {
        Some(NetSlice::Ipv4(ip)) => ip.header().destination_addr().to_string(),
        Some(NetSlice::Ipv6(ip)) => ip.header().destination_addr().to_string(),
        _ => panic!("not ip"),
    };
    match p.transport {
        Some(TransportSlice::Icmpv4(i)) => {
            let h = i.bytes5to8();
            (
                i.type_u8(),
                i.code_u8(),
                u32::from(u16::from_be_bytes([h[2], h[3]])),
                dst,
            )
        }
        Some(TransportSlice::Icmpv6(i)) => (
            i.type_u8(),
            i.code_u8(),
            u32::from_be_bytes(i.bytes5to8()),
            dst,
        ),
        _ => panic!("not icmp"),
    }
}

/// Reassembles fragments (IP packets behind Ethernet) and checks each fits `mtu`.
fn reassemble(frames: &[Vec<u8>], mtu: usize) -> Vec<u8> {
    assert!(
        frames.len() >= 2,
        "expected fragments, got {}",
        frames.len()
    );
    let mut r = Reassembler::new(FragLimits::default());
    let mut whole = None;
    for f in frames {
        assert!(f.len() - 14 <= mtu, "fragment of {} > {mtu}", f.len() - 14);
        if let Some(p) = r.push(0, &f[14..]).expect("fragment") {
            whole = Some(p.to_vec());
        }
    }
    whole.expect("reassembled")
}

/// The UDP checksum of an IPv4 packet verifies.
fn udp_checksum_ok(packet: &[u8]) -> bool {
    let hl = usize::from(packet[0] & 0xf) * 4;
    let mut sum = 0u32;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            let w = if c.len() == 2 {
                [c[0], c[1]]
            } else {
                [c[0], 0]
            };
            sum += u32::from(u16::from_be_bytes(w));
        }
    };
    add(&packet[12..20]);
    add(&[0, 17]);
    add(&((packet.len() - hl) as u16).to_be_bytes());
    add(&packet[hl..]);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

fn frames_on(out: &Outbox, iface: u32) -> Vec<Vec<u8>> {
    out.frames()
        .filter(|(i, _)| *i == iface)
        .map(|(_, f)| f.to_vec())
        .collect()
}

#[test]
fn df_packet_bigger_than_uplink_gets_frag_needed_with_its_mtu() {
    let mut e = engine();
    let mut out = Outbox::new();
    e.set_mtu(UPLINK, 1400).expect("mtu");
    // 1428 bytes on the wire: within the client's 1500, above the uplink's 1400.
    let mut f = udp(CLIENT, WORLD, 5000, 7, 1400, true);
    assert_eq!(
        e.handle(Instant::from_nanos(1), VIF, &mut f, &mut out),
        Verdict::Consumed
    );
    let back = frames_on(&out, VIF);
    assert_eq!(back.len(), 1);
    assert_eq!(icmp(&back[0]), (3, 4, 1400, "10.137.0.10".into()));
    assert!(frames_on(&out, UPLINK).iter().all(|f| f[12..14] == [8, 6]));
    assert_eq!(e.counters(VIF).expect("c").get(Reason::TooBig), 1);
    assert_eq!(
        e.conntrack().len(),
        0,
        "a packet that never left opens no flow"
    );
    // Exactly the MTU fits.
    out.clear();
    let mut f = udp(CLIENT, WORLD, 5000, 7, 1372, true);
    assert_eq!(
        e.handle(Instant::from_nanos(2), VIF, &mut f, &mut out),
        Verdict::Forward(UPLINK)
    );
}

#[test]
fn packet_without_df_is_fragmented_to_the_uplink_mtu() {
    let mut e = engine();
    let mut out = Outbox::new();
    e.set_mtu(UPLINK, 1400).expect("mtu");
    let mut f = udp(CLIENT, WORLD, 5000, 7, 1400, false);
    assert_eq!(
        e.handle(Instant::from_nanos(1), VIF, &mut f, &mut out),
        Verdict::Consumed
    );
    let frags: Vec<Vec<u8>> = frames_on(&out, UPLINK)
        .into_iter()
        .filter(|f| f[12..14] == [8, 0])
        .collect();
    let whole = reassemble(&frags, 1400);
    assert_eq!(whole.len(), 1428);
    assert_eq!(&whole[12..16], &OUR_IP, "NATed before fragmenting");
    assert!(udp_checksum_ok(&whole));
    assert_eq!(e.counters(VIF).expect("c").get(Reason::Accepted), 1);
}

#[test]
fn offloaded_checksum_is_finished_before_fragmenting() {
    let mut e = engine();
    let mut out = Outbox::new();
    e.set_mtu(UPLINK, 1400).expect("mtu");
    let mut f = udp(CLIENT, WORLD, 5000, 7, 1400, false);
    // What a sender's kernel hands over with NEEDS_CSUM: only the pseudo-header sum.
    let ip = &f[14..];
    let mut sum = 0u32;
    for c in [
        &ip[12..14],
        &ip[14..16],
        &ip[16..18],
        &ip[18..20],
        &[0u8, 17][..],
        &ip[24..26],
    ] {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    f[14 + 26..14 + 28].copy_from_slice(&(sum as u16).to_be_bytes());
    let o = Offload {
        partial_csum: true,
        ..Offload::NONE
    };
    assert_eq!(
        e.handle_offloaded(Instant::from_nanos(1), VIF, &mut f, o, &mut out),
        Verdict::Consumed
    );
    let frags: Vec<Vec<u8>> = frames_on(&out, UPLINK)
        .into_iter()
        .filter(|f| f[12..14] == [8, 0])
        .collect();
    assert!(udp_checksum_ok(&reassemble(&frags, 1400)));
}

#[test]
fn big_reply_to_a_small_client_link_is_fragmented_or_refused() {
    let mut e = engine();
    let mut out = Outbox::new();
    let nat = open_flow(&mut e, &mut out);
    e.set_mtu(VIF, 1400).expect("mtu");
    assert_eq!(e.mtu_of(VIF), Some(1400));
    // Without DF: the 1428-byte reply reaches the client as fragments of at most 1400.
    let mut r = udp(WORLD, OUR_IP, 7, nat, 1400, false);
    assert_eq!(
        e.handle(Instant::from_nanos(2), UPLINK, &mut r, &mut out),
        Verdict::Consumed
    );
    let whole = reassemble(&frames_on(&out, VIF), 1400);
    assert_eq!(whole.len(), 1428);
    assert_eq!(&whole[16..20], &CLIENT, "NAT undone before fragmenting");
    assert!(udp_checksum_ok(&whole));
    // With DF: fragmentation needed (MTU 1400) back to the sender, about its own packet.
    out.clear();
    let mut r = udp(WORLD, OUR_IP, 7, nat, 1400, true);
    assert_eq!(
        e.handle(Instant::from_nanos(3), UPLINK, &mut r, &mut out),
        Verdict::Consumed
    );
    assert!(frames_on(&out, VIF).is_empty());
    let up = frames_on(&out, UPLINK);
    assert_eq!(up.len(), 1);
    assert_eq!(icmp(&up[0]), (3, 4, 1400, "198.18.0.10".into()));
    // The quoted header is the one the sender sent: to our address and the NAT port.
    let q = &up[0][14 + 28..];
    assert_eq!(&q[16..20], &OUR_IP);
    assert_eq!(u16::from_be_bytes([q[22], q[23]]), nat);
    assert_eq!(e.counters(UPLINK).expect("c").get(Reason::TooBig), 1);
}

#[test]
fn ipv6_too_big_reports_the_link_mtu_but_never_below_1280() {
    let mut e = Engine::new(config(true)).expect("engine");
    let mut out = Outbox::new();
    e.set_mtu(UPLINK, 1400).expect("mtu");
    let mut f = udp6(CLIENT6, WORLD6, 1400 - 40 - 8 + 28);
    assert_eq!(
        e.handle(Instant::from_nanos(1), VIF, &mut f, &mut out),
        Verdict::Consumed
    );
    let back = frames_on(&out, VIF);
    assert_eq!(back.len(), 1);
    assert_eq!(icmp(&back[0]), (2, 0, 1400, "fd09:24ef:4179::a89:a".into()));
    // An MTU below IPv6's minimum: Linux ip6_forward compares against (and reports) 1280.
    out.clear();
    e.set_mtu(UPLINK, 1000).expect("mtu");
    let mut f = udp6(CLIENT6, WORLD6, 1400 - 48);
    e.handle(Instant::from_nanos(2), VIF, &mut f, &mut out);
    assert_eq!(icmp(&frames_on(&out, VIF)[0]).2, 1280);
    out.clear();
    let mut f = udp6(CLIENT6, WORLD6, 1280 - 48);
    assert_eq!(
        e.handle(Instant::from_nanos(3), VIF, &mut f, &mut out),
        Verdict::Forward(UPLINK)
    );
}

#[test]
fn set_mtu_keeps_flows_and_refuses_bad_values_without_change() {
    let mut e = engine();
    let mut out = Outbox::new();
    let nat = open_flow(&mut e, &mut out);
    assert_eq!(e.conntrack().len(), 1);
    e.set_mtu(UPLINK, 1400).expect("mtu");
    e.set_mtu(VIF, 1280).expect("mtu");
    assert_eq!(e.conntrack().len(), 1);
    assert_eq!(
        e.set_mtu(UPLINK, 67),
        Err(MtuError::TooSmall {
            iface: "eth0".into(),
            mtu: 67
        })
    );
    assert_eq!(
        e.set_mtu(99, 1400),
        Err(MtuError::NoSuchIface { iface: 99 })
    );
    assert_eq!((e.mtu_of(UPLINK), e.mtu_of(VIF)), (Some(1400), Some(1280)));
    assert_eq!(e.config().uplink.mtu, 1400);
    assert_eq!(e.config().clients[0].mtu, 1280);
    // The flow still carries replies.
    let mut r = udp(WORLD, OUR_IP, 7, nat, 10, false);
    assert_eq!(
        e.handle(Instant::from_nanos(2), UPLINK, &mut r, &mut out),
        Verdict::Forward(VIF)
    );
}

#[test]
fn apply_with_only_an_mtu_changed_keeps_flows() {
    let mut e = engine();
    let mut out = Outbox::new();
    open_flow(&mut e, &mut out);
    let mut cfg = config(false);
    cfg.uplink.mtu = 1400;
    cfg.clients[0].mtu = 1400;
    e.apply(Instant::from_nanos(2), cfg.clone(), &mut out)
        .expect("apply");
    assert_eq!(e.conntrack().len(), 1);
    assert_eq!((e.mtu_of(UPLINK), e.mtu_of(VIF)), (Some(1400), Some(1400)));
    // A changed address still starts over.
    cfg.uplink.ip = "10.137.0.7".parse().expect("ip");
    e.apply(Instant::from_nanos(3), cfg, &mut out)
        .expect("apply");
    assert_eq!(e.conntrack().len(), 0);
}

#[test]
fn an_mtu_below_68_is_refused_by_name() {
    let mut cfg = config(false);
    cfg.clients[0].mtu = 60;
    match Engine::new(cfg.clone()) {
        Err(ConfigError::BadMtu { iface, mtu }) => {
            assert_eq!((iface.as_str(), mtu), ("vif3.0", 60))
        }
        other => panic!("want BadMtu, got {other:?}"),
    }
    let mut e = engine();
    let before = e.config().clone();
    let mut out = Outbox::new();
    assert!(e.apply(Instant::from_nanos(1), cfg, &mut out).is_err());
    assert_eq!(e.config(), &before, "nothing half-applied");
}
