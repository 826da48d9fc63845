//! An offloaded frame through the engine and then through vif-backend's offload finishing:
//! the NAT rewrite keeps a partial checksum right.

use std::collections::BTreeMap;

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use qubes_engine::config::{from_tree, VifInfo, GATEWAY_MAC};
use qubes_engine::engine::{Engine, Offload, Outbox, Verdict, UPLINK};
use qubes_engine::{wire, Instant};
use vif_backend::offload;

const CLIENT_MAC: [u8; 6] = [0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x10];

fn engine(rules: &[(&str, &str)]) -> Engine {
    let mut tree: BTreeMap<String, String> = [
        ("/qubes-ip", "10.137.0.6"),
        ("/qubes-gateway", "10.137.0.5"),
        ("/qubes-mac", "00:16:3e:5e:6c:06"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in rules {
        tree.insert(format!("/qubes-firewall/10.137.0.10/{k}"), v.to_string());
    }
    let vifs = [VifInfo {
        name: "vif3.0".into(),
        ip: "10.137.0.10".parse().expect("ip"),
        ip6: None,
        mac: CLIENT_MAC,
    }];
    let mut cfg = from_tree(&tree, &vifs, "eth0", 1500).expect("config");
    cfg.seed = 7;
    Engine::new(cfg).expect("engine")
}

fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, syn: bool, ack: bool) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(CLIENT_MAC, GATEWAY_MAC)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 65535);
    if syn {
        b = b.syn();
    }
    if ack {
        b = b.ack(1);
    }
    let mut v = Vec::new();
    b.write(&mut v, b"hello").expect("build");
    v
}

/// A frame whose checksum the sender's kernel left to be finished (`NEEDS_CSUM`): the engine
/// updates the pseudo-header seed for the NAT rewrite, and finishing it afterwards gives the
/// right checksum for the rewritten packet.
#[test]
fn offloaded_partial_checksum_survives_nat() {
    let mut e = engine(&[("policy", "drop"), ("0000", "action=accept")]);
    let mut out = Outbox::new();
    let mut f = tcp([10, 137, 0, 10], [198, 18, 0, 10], 40000, 80, true, false);
    // Replace the full checksum by the seed a kernel leaves: the folded pseudo-header sum.
    let seed = wire::fold(wire::pseudo_sum(
        &"10.137.0.10".parse().expect("ip"),
        &"198.18.0.10".parse().expect("ip"),
        wire::PROTO_TCP,
        f.len() - 34,
    ));
    f[50..52].copy_from_slice(&seed.to_be_bytes());
    let off = Offload {
        partial_csum: true,
        ..Offload::NONE
    };
    assert_eq!(
        e.handle_offloaded(Instant::from_nanos(1), 1, &mut f, off, &mut out),
        Verdict::Forward(UPLINK)
    );
    offload::complete_checksum(&mut f, 34, 16).expect("finish");
    let p = SlicedPacket::from_ethernet(&f).expect("parse");
    let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(t))) = (&p.net, &p.transport) else {
        panic!("not tcp");
    };
    assert_eq!(ip.header().source_addr().to_string(), "10.137.0.6");
    let want = t
        .to_header()
        .calc_checksum_ipv4(&ip.header().to_header(), t.payload())
        .expect("csum");
    assert_eq!(t.checksum(), want);
}
