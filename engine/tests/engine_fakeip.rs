//! Fake addresses (dom0's `net.fake-ip` / `net.fake-gateway`): the configuration keys, and the
//! translation on the packet path with every checksum checked by a full recomputation written
//! here from RFC 1071 / RFC 791 / RFC 793 / RFC 768 / RFC 792 (not with the engine's helpers).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use qubes_engine::config::{from_tree, ConfigError, VifInfo, Visible, GATEWAY_MAC};
use qubes_engine::engine::{Engine, Outbox, Reason, Verdict, UPLINK};
use qubes_engine::Instant;

const CLIENT_MAC: [u8; 6] = [0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x0a];
const OUR_MAC: [u8; 6] = [0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x00];
const REAL: [u8; 4] = [10, 137, 0, 10];
const OURS: [u8; 4] = [10, 137, 0, 6];
const VIS: [u8; 4] = [192, 168, 1, 128];
const VIS_GW: [u8; 4] = [192, 168, 1, 1];
const WEB: [u8; 4] = [198, 18, 0, 10];

fn tree(extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut t: BTreeMap<String, String> = [
        ("/qubes-ip", "10.137.0.6"),
        ("/qubes-gateway", "10.137.0.5"),
        ("/qubes-firewall/10.137.0.10", ""),
        ("/qubes-firewall/10.137.0.10/policy", "drop"),
        (
            "/qubes-firewall/10.137.0.10/0000",
            "action=drop proto=tcp dstports=25-25",
        ),
        ("/qubes-firewall/10.137.0.10/0001", "action=accept"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in extra {
        t.insert(k.to_string(), v.to_string());
    }
    t
}

fn vifs() -> [VifInfo; 1] {
    [VifInfo {
        name: "vif3.0".into(),
        ip: Ipv4Addr::from(REAL),
        ip6: None,
        mac: CLIENT_MAC,
    }]
}

const FAKE: [(&str, &str); 2] = [
    ("/mapped-ip/10.137.0.10/visible-ip", "192.168.1.128"),
    ("/mapped-ip/10.137.0.10/visible-gateway", "192.168.1.1"),
];

fn engine() -> Engine {
    let mut cfg = from_tree(&tree(&FAKE), &vifs(), "eth0", 1500).expect("config");
    cfg.seed = 7;
    Engine::new(cfg).expect("engine")
}

// ---- configuration -------------------------------------------------------------------------

#[test]
fn visible_addresses_are_read_from_mapped_ip() {
    let c = from_tree(&tree(&FAKE), &vifs(), "eth0", 1500).expect("config");
    assert_eq!(
        c.clients[0].visible,
        Some(Visible {
            ip: Ipv4Addr::from(VIS),
            gateway: Ipv4Addr::from(VIS_GW),
        })
    );
    // What dom0 writes for a client without the features, nothing, only one of the two keys
    // (vif-route-qubes needs both), a visible gateway alone: no translation.
    for extra in [
        &[
            ("/mapped-ip/10.137.0.10/visible-ip", "10.137.0.10"),
            ("/mapped-ip/10.137.0.10/visible-gateway", "10.137.0.6"),
        ][..],
        &[][..],
        &[("/mapped-ip/10.137.0.10/visible-ip", "192.168.1.128")][..],
        &[
            ("/mapped-ip/10.137.0.10/visible-ip", "10.137.0.10"),
            ("/mapped-ip/10.137.0.10/visible-gateway", "192.168.1.1"),
        ][..],
        &[
            ("/mapped-ip/10.137.0.10/visible-ip", ""),
            ("/mapped-ip/10.137.0.10/visible-gateway", "192.168.1.1"),
        ][..],
    ] {
        let c = from_tree(&tree(extra), &vifs(), "eth0", 1500).expect("config");
        assert_eq!(c.clients[0].visible, None, "{extra:?}");
    }
    // Another client's mapping does not apply.
    let c = from_tree(
        &tree(&[
            ("/mapped-ip/10.137.0.11/visible-ip", "192.168.1.128"),
            ("/mapped-ip/10.137.0.11/visible-gateway", "192.168.1.1"),
        ]),
        &vifs(),
        "eth0",
        1500,
    )
    .expect("config");
    assert_eq!(c.clients[0].visible, None);
}

#[test]
fn bad_visible_addresses_are_errors_naming_the_key() {
    let ip = "/mapped-ip/10.137.0.10/visible-ip";
    let gw = "/mapped-ip/10.137.0.10/visible-gateway";
    for (k, v, want) in [
        (
            ip,
            "192.168.1",
            format!("{ip}: \"192.168.1\" is not a valid address"),
        ),
        (
            gw,
            "fd09::1",
            format!("{gw}: \"fd09::1\" is not a valid address"),
        ),
        (
            ip,
            "0.0.0.0",
            format!("{ip}: \"0.0.0.0\" is the unspecified address"),
        ),
        (
            gw,
            "224.0.0.1",
            format!("{gw}: \"224.0.0.1\" is not a unicast address"),
        ),
        (
            ip,
            "255.255.255.255",
            format!("{ip}: \"255.255.255.255\" is not a unicast address"),
        ),
        (
            gw,
            "127.0.0.1",
            format!("{gw}: \"127.0.0.1\" is a loopback address"),
        ),
        (
            gw,
            "192.168.1.128",
            format!("{gw}: \"192.168.1.128\" is the client's own visible address"),
        ),
    ] {
        let mut t = tree(&FAKE);
        t.insert(k.to_string(), v.to_string());
        let e = from_tree(&t, &vifs(), "eth0", 1500).expect_err(v);
        assert_eq!(e.to_string(), want);
        match e {
            ConfigError::BadAddress { key, .. } | ConfigError::BadVisible { key, .. } => {
                assert_eq!(key, k)
            }
            other => panic!("{other:?}"),
        }
    }
    // A bad value is refused even where it would not be used (the visible address is the
    // real one): a typo must not pass silently.
    let e = from_tree(
        &tree(&[(ip, "10.137.0.10"), (gw, "x")]),
        &vifs(),
        "eth0",
        1500,
    )
    .expect_err("bad gateway");
    assert_eq!(e.to_string(), format!("{gw}: \"x\" is not a valid address"));
}

#[test]
fn a_refused_configuration_leaves_the_running_one() {
    let mut e = engine();
    let mut out = Outbox::new();
    let mut t = tree(&FAKE);
    t.insert(FAKE[1].0.into(), "bad".into());
    assert!(from_tree(&t, &vifs(), "eth0", 1500).is_err());
    // Nothing was applied: the client still has its view.
    assert_eq!(
        e.config().clients[0].visible.map(|v| v.gateway),
        Some(Ipv4Addr::from(VIS_GW))
    );
    let mut f = echo(VIS, VIS_GW, 8, 1, 1);
    e.handle(Instant::from_nanos(1), 1, &mut f, &mut out);
    assert_eq!(client_frames(&out).len(), 1);
}

// ---- frames, built and checked by hand -----------------------------------------------------

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for c in data.chunks(2) {
        acc += u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0));
    }
    acc
}

fn csum(data: &[u8], acc: u32) -> u16 {
    let mut a = sum16(data, acc);
    while a >> 16 != 0 {
        a = (a & 0xffff) + (a >> 16);
    }
    !(a as u16)
}

fn pseudo(ip: &[u8], proto: u8, len: usize) -> u32 {
    sum16(&ip[12..20], u32::from(proto) + len as u32)
}

/// An Ethernet/IPv4 frame with the transport `l4`, all checksums computed.
fn frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    l4: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = 20 + l4.len();
    let mut ip = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0x12,
        0x34,
        0x40,
        0,
        64,
        proto,
        0,
        0,
    ];
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = csum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut t = l4.to_vec();
    let off = match proto {
        6 => Some(16),
        17 => Some(6),
        1 => Some(2),
        _ => None,
    };
    if let Some(o) = off {
        t[o..o + 2].copy_from_slice(&[0, 0]);
        let acc = if proto == 1 {
            0
        } else {
            pseudo(&ip, proto, t.len())
        };
        let c = csum(&t, acc);
        t[o..o + 2].copy_from_slice(&c.to_be_bytes());
    }
    f.extend_from_slice(&ip);
    f.extend_from_slice(&t);
    f
}

fn from_client(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
    frame(CLIENT_MAC, GATEWAY_MAC, src, dst, proto, l4)
}

fn from_uplink(src: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
    frame(GATEWAY_MAC, OUR_MAC, src, OURS, proto, l4)
}

fn tcp(sport: u16, dport: u16, flags: u8, seq: u32, ack: u32) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&ack.to_be_bytes());
    t.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t.extend_from_slice(b"hello");
    t
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    t.extend_from_slice(&[0, 0]);
    t.extend_from_slice(payload);
    t
}

fn icmp(ty: u8, code: u8, rest: [u8; 4], data: &[u8]) -> Vec<u8> {
    let mut t = vec![ty, code, 0, 0];
    t.extend_from_slice(&rest);
    t.extend_from_slice(data);
    t
}

fn echo(src: [u8; 4], dst: [u8; 4], ty: u8, id: u16, seq: u16) -> Vec<u8> {
    let mut rest = [0u8; 4];
    rest[..2].copy_from_slice(&id.to_be_bytes());
    rest[2..].copy_from_slice(&seq.to_be_bytes());
    from_client(src, dst, 1, &icmp(ty, 0, rest, b"ping data"))
}

/// Every checksum of an emitted IPv4 frame, recomputed in full: the header, the transport
/// (TCP/UDP over the pseudo-header, ICMP over the message) and, in an ICMP error, the quoted
/// header's (and the quoted transport's when the quote is whole).
fn check_sums(f: &[u8]) {
    assert_eq!(&f[12..14], &[0x08, 0x00], "IPv4");
    let ip = &f[14..];
    let hl = usize::from(ip[0] & 15) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    assert_eq!(total, ip.len(), "IP length");
    assert_eq!(csum(&ip[..hl], 0), 0, "IPv4 header checksum");
    let t = &ip[hl..total];
    match ip[9] {
        6 => assert_eq!(csum(t, pseudo(ip, 6, t.len())), 0, "TCP checksum"),
        // An IPv4 UDP datagram may carry no checksum (RFC 768).
        17 if t[6..8] != [0, 0] => {
            assert_eq!(csum(t, pseudo(ip, 17, t.len())), 0, "UDP checksum")
        }
        1 => {
            assert_eq!(csum(t, 0), 0, "ICMP checksum");
            if [3, 4, 11, 12].contains(&t[0]) {
                let q = &t[8..];
                let qhl = usize::from(q[0] & 15) * 4;
                assert_eq!(csum(&q[..qhl], 0), 0, "quoted IPv4 header checksum");
                let qtotal = usize::from(u16::from_be_bytes([q[2], q[3]]));
                if qtotal == q.len() {
                    let qt = &q[qhl..];
                    match q[9] {
                        6 | 17 => assert_eq!(csum(qt, pseudo(q, q[9], qt.len())), 0, "quoted L4"),
                        1 => assert_eq!(csum(qt, 0), 0, "quoted ICMP"),
                        _ => {}
                    }
                }
            }
        }
        _ => {}
    }
}

fn addrs(f: &[u8]) -> ([u8; 4], [u8; 4]) {
    let mut s = [0u8; 4];
    let mut d = [0u8; 4];
    s.copy_from_slice(&f[26..30]);
    d.copy_from_slice(&f[30..34]);
    (s, d)
}

/// The packet an ICMP error quotes, from its IP header on.
fn quote(f: &[u8]) -> &[u8] {
    &f[14 + 20 + 8..]
}

fn client_frames(out: &Outbox) -> Vec<Vec<u8>> {
    out.frames()
        .filter(|(i, _)| *i == 1)
        .map(|(_, f)| f.to_vec())
        .collect()
}

fn uplink_ip_frames(out: &Outbox) -> Vec<Vec<u8>> {
    out.frames()
        .filter(|(i, f)| *i == UPLINK && f[12..14] == [0x08, 0x00])
        .map(|(_, f)| f.to_vec())
        .collect()
}

/// The frame the engine forwarded or sent: `f` itself when it forwarded it.
fn sent(v: Verdict, f: &[u8], out: &Outbox, to: u32) -> Vec<u8> {
    match v {
        Verdict::Forward(i) => {
            assert_eq!(i, to);
            f.to_vec()
        }
        Verdict::Consumed => {
            let fs: Vec<Vec<u8>> = out
                .frames()
                .filter(|(i, f)| *i == to && f[12..14] == [0x08, 0x00])
                .map(|(_, f)| f.to_vec())
                .collect();
            assert_eq!(fs.len(), 1, "one frame to {to}");
            fs[0].clone()
        }
    }
}

#[test]
fn tcp_and_udp_out_and_back_in_the_clients_view() {
    let mut e = engine();
    let mut out = Outbox::new();
    let mut n = 0;
    let mut at = || {
        n += 1;
        Instant::from_nanos(n)
    };
    for (proto, l4) in [
        (6u8, tcp(40000, 80, 0x02, 1000, 0)),
        (17, udp(40001, 53, b"query")),
    ] {
        out.clear();
        let mut f = from_client(VIS, WEB, proto, &l4);
        let v = e.handle(at(), 1, &mut f, &mut out);
        let up = sent(v, &f, &out, UPLINK);
        check_sums(&up);
        assert_eq!(addrs(&up), (OURS, WEB), "masqueraded from the real chain");
        let nat = u16::from_be_bytes([up[34], up[35]]);
        // The reply comes back to the client's visible address.
        let reply = match proto {
            6 => tcp(80, nat, 0x12, 5000, 1001),
            _ => udp(53, nat, b"an answer"),
        };
        out.clear();
        let mut r = from_uplink(WEB, proto, &reply);
        let v = e.handle(at(), UPLINK, &mut r, &mut out);
        let down = sent(v, &r, &out, 1);
        check_sums(&down);
        assert_eq!(addrs(&down), (WEB, VIS));
        let port = if proto == 6 { 40000 } else { 40001 };
        assert_eq!(u16::from_be_bytes([down[36], down[37]]), port);
    }
    // A UDP datagram without a checksum keeps none (RFC 768).
    let mut f = from_client(VIS, WEB, 17, &udp(40002, 53, b"no sum"));
    f[40..42].copy_from_slice(&[0, 0]);
    out.clear();
    let v = e.handle(at(), 1, &mut f, &mut out);
    let up = sent(v, &f, &out, UPLINK);
    assert_eq!(&up[40..42], &[0, 0]);
    check_sums(&up);
    assert_eq!(e.counters(1).expect("c").get(Reason::Accepted), 3);
}

#[test]
fn pings_of_the_world_and_of_the_visible_gateway() {
    let mut e = engine();
    let mut out = Outbox::new();
    let mut f = echo(VIS, WEB, 8, 77, 1);
    let v = e.handle(Instant::from_nanos(1), 1, &mut f, &mut out);
    let up = sent(v, &f, &out, UPLINK);
    check_sums(&up);
    assert_eq!(addrs(&up), (OURS, WEB));
    let id = u16::from_be_bytes([up[38], up[39]]);
    let mut rest = [0u8; 4];
    rest[..2].copy_from_slice(&id.to_be_bytes());
    rest[2..].copy_from_slice(&1u16.to_be_bytes());
    let mut r = from_uplink(WEB, 1, &icmp(0, 0, rest, b"ping data"));
    out.clear();
    let v = e.handle(Instant::from_nanos(2), UPLINK, &mut r, &mut out);
    let down = sent(v, &r, &out, 1);
    check_sums(&down);
    assert_eq!(addrs(&down), (WEB, VIS));
    assert_eq!(u16::from_be_bytes([down[38], down[39]]), 77);

    // The visible gateway answers from its own address.
    out.clear();
    let mut g = echo(VIS, VIS_GW, 8, 5, 9);
    assert_eq!(
        e.handle(Instant::from_nanos(3), 1, &mut g, &mut out),
        Verdict::Consumed
    );
    let fs = client_frames(&out);
    assert_eq!(fs.len(), 1);
    check_sums(&fs[0]);
    assert_eq!(addrs(&fs[0]), (VIS_GW, VIS));
    assert_eq!(fs[0][34], 0, "echo reply");
    assert!(uplink_ip_frames(&out).is_empty());

    // Our real address is not there under its own name.
    out.clear();
    let mut h = echo(VIS, OURS, 8, 5, 10);
    assert_eq!(
        e.handle(Instant::from_nanos(4), 1, &mut h, &mut out),
        Verdict::Consumed
    );
    assert_eq!(out.frame_count(), 0);
    assert_eq!(e.counters(1).expect("c").get(Reason::Local), 1);
}

#[test]
fn errors_to_the_client_name_only_its_view() {
    let mut e = engine();
    let mut out = Outbox::new();
    // A refused flow: admin-prohibited from the visible gateway, quoting the packet exactly as
    // the client sent it.
    let mut f = from_client(VIS, WEB, 6, &tcp(40000, 25, 0x02, 1, 0));
    let sent_bytes = f[14..].to_vec();
    assert_eq!(
        e.handle(Instant::from_nanos(1), 1, &mut f, &mut out),
        Verdict::Consumed
    );
    let fs = client_frames(&out);
    assert_eq!(fs.len(), 1);
    check_sums(&fs[0]);
    assert_eq!(addrs(&fs[0]), (VIS_GW, VIS));
    assert_eq!((fs[0][34], fs[0][35]), (3, 13));
    assert_eq!(quote(&fs[0]), &sent_bytes[..]);
    assert_eq!(e.counters(1).expect("c").get(Reason::RejectedByRule), 1);

    // TTL 1: time exceeded, likewise.
    out.clear();
    let mut f = from_client(VIS, WEB, 17, &udp(40000, 33434, b"trace"));
    f[22] = 1;
    f[24..26].copy_from_slice(&[0, 0]);
    let c = csum(&f[14..34], 0);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    let sent_bytes = f[14..].to_vec();
    e.handle(Instant::from_nanos(2), 1, &mut f, &mut out);
    let fs = client_frames(&out);
    assert_eq!(fs.len(), 1);
    check_sums(&fs[0]);
    assert_eq!(addrs(&fs[0]), (VIS_GW, VIS));
    assert_eq!(fs[0][34], 11);
    assert_eq!(quote(&fs[0]), &sent_bytes[..]);

    // TCP to the visible gateway: host-prohibited, quoting the gateway as the client named it.
    out.clear();
    let mut f = from_client(VIS, VIS_GW, 6, &tcp(40000, 22, 0x02, 1, 0));
    let sent_bytes = f[14..].to_vec();
    e.handle(Instant::from_nanos(3), 1, &mut f, &mut out);
    let fs = client_frames(&out);
    assert_eq!(fs.len(), 1);
    check_sums(&fs[0]);
    assert_eq!(addrs(&fs[0]), (VIS_GW, VIS));
    assert_eq!((fs[0][34], fs[0][35]), (3, 10));
    assert_eq!(quote(&fs[0]), &sent_bytes[..]);
}

#[test]
fn icmp_errors_about_a_flow_are_translated_both_ways() {
    let mut e = engine();
    let mut out = Outbox::new();
    let mut f = from_client(VIS, WEB, 17, &udp(40000, 53, b"query"));
    let v = e.handle(Instant::from_nanos(1), 1, &mut f, &mut out);
    let up = sent(v, &f, &out, UPLINK);
    // A router says the host is unreachable, quoting what left (IP header + 8 bytes).
    let quoted = up[14..14 + 28].to_vec();
    let mut err = from_uplink([198, 18, 0, 1], 1, &icmp(3, 1, [0; 4], &quoted));
    out.clear();
    assert_eq!(
        e.handle(Instant::from_nanos(2), UPLINK, &mut err, &mut out),
        Verdict::Consumed
    );
    let fs = client_frames(&out);
    assert_eq!(fs.len(), 1);
    check_sums(&fs[0]);
    assert_eq!(addrs(&fs[0]), ([198, 18, 0, 1], VIS));
    let q = quote(&fs[0]);
    assert_eq!(
        &q[12..16],
        &VIS,
        "quoted source: the client's visible address"
    );
    assert_eq!(&q[16..20], &WEB);
    assert_eq!(u16::from_be_bytes([q[20], q[21]]), 40000);

    // The client answers a reply with port unreachable, quoting it as it got it.
    let nat = u16::from_be_bytes([up[34], up[35]]);
    let mut r = from_uplink(WEB, 17, &udp(53, nat, b"an answer"));
    out.clear();
    let v = e.handle(Instant::from_nanos(3), UPLINK, &mut r, &mut out);
    let down = sent(v, &r, &out, 1);
    let mut pu = from_client(VIS, WEB, 1, &icmp(3, 3, [0; 4], &down[14..]));
    out.clear();
    assert_eq!(
        e.handle(Instant::from_nanos(4), 1, &mut pu, &mut out),
        Verdict::Consumed
    );
    let ups = uplink_ip_frames(&out);
    assert_eq!(ups.len(), 1);
    check_sums(&ups[0]);
    assert_eq!(addrs(&ups[0]), (OURS, WEB));
    let q = quote(&ups[0]);
    assert_eq!(&q[16..20], &OURS, "quoted destination: our address");
    assert_eq!(u16::from_be_bytes([q[22], q[23]]), nat);
}

#[test]
fn a_fragmented_datagram_is_translated_whole() {
    let mut e = engine();
    let mut out = Outbox::new();
    let payload = vec![0x5au8; 64];
    let whole = from_client(VIS, WEB, 17, &udp(40000, 9, &payload));
    // Two fragments of the 72-byte UDP datagram: 40 bytes (offset 0, MF), then 32.
    let l4 = &whole[34..];
    let frag = |data: &[u8], off: u16, mf: bool| {
        let mut f = whole[..34].to_vec();
        f.extend_from_slice(data);
        let total = (20 + data.len()) as u16;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        let ff = (off / 8) | if mf { 0x2000 } else { 0 };
        f[20..22].copy_from_slice(&ff.to_be_bytes());
        f[24..26].copy_from_slice(&[0, 0]);
        let c = csum(&f[14..34], 0);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f
    };
    let mut a = frag(&l4[..40], 0, true);
    let mut b = frag(&l4[40..], 40, false);
    e.handle(Instant::from_nanos(1), 1, &mut a, &mut out);
    e.handle(Instant::from_nanos(2), 1, &mut b, &mut out);
    let ups = uplink_ip_frames(&out);
    assert_eq!(ups.len(), 1, "reassembled and sent whole");
    check_sums(&ups[0]);
    assert_eq!(addrs(&ups[0]), (OURS, WEB));
}

#[test]
fn only_the_visible_address_may_send_and_ipv6_is_off() {
    let mut e = engine();
    let mut out = Outbox::new();
    // The real address is not the client's on this vif (upstream's antispoof chain passes
    // only the visible one).
    let mut f = from_client(REAL, WEB, 17, &udp(40000, 53, b"q"));
    assert_eq!(
        e.handle(Instant::from_nanos(1), 1, &mut f, &mut out),
        Verdict::Consumed
    );
    let mut g = from_client([192, 168, 1, 129], WEB, 17, &udp(40000, 53, b"q"));
    assert_eq!(
        e.handle(Instant::from_nanos(2), 1, &mut g, &mut out),
        Verdict::Consumed
    );
    assert_eq!(e.counters(1).expect("c").get(Reason::Spoofed), 2);
    // IPv6: an echo request to anywhere is dropped (upstream disables IPv6 on the vif).
    let mut v6 = Vec::new();
    v6.extend_from_slice(&GATEWAY_MAC);
    v6.extend_from_slice(&CLIENT_MAC);
    v6.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0, 8, 58, 64]);
    v6.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    v6.extend_from_slice(&[0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    v6.extend_from_slice(&[128, 0, 0, 0, 0, 1, 0, 1]);
    assert_eq!(
        e.handle(Instant::from_nanos(3), 1, &mut v6, &mut out),
        Verdict::Consumed
    );
    assert_eq!(out.frame_count(), 0);
    assert_eq!(e.counters(1).expect("c").get(Reason::Unsupported), 1);
}

fn arp_request(spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&tpa);
    f
}

#[test]
fn arp_answers_only_the_visible_gateway() {
    let mut e = engine();
    let mut out = Outbox::new();
    let mut f = arp_request(VIS, VIS_GW);
    e.handle(Instant::from_nanos(1), 1, &mut f, &mut out);
    let fs = client_frames(&out);
    assert_eq!(fs.len(), 1);
    let a = &fs[0];
    assert_eq!(&a[0..6], &CLIENT_MAC);
    assert_eq!(&a[20..22], &[0, 2], "reply");
    assert_eq!(&a[22..28], &GATEWAY_MAC);
    assert_eq!(&a[28..32], &VIS_GW);
    assert_eq!(&a[32..38], &CLIENT_MAC);
    assert_eq!(&a[38..42], &VIS);
    // Its own address (probe and gratuitous), our real address, another host, and ARP from
    // the real address: no answer.
    for (spa, tpa) in [
        ([0, 0, 0, 0], VIS),
        (VIS, VIS),
        (VIS, OURS),
        (VIS, REAL),
        (VIS, [192, 168, 1, 2]),
        (REAL, VIS_GW),
    ] {
        out.clear();
        let mut f = arp_request(spa, tpa);
        e.handle(Instant::from_nanos(2), 1, &mut f, &mut out);
        assert_eq!(out.frame_count(), 0, "{spa:?} asking for {tpa:?}");
    }
    assert_eq!(e.counters(1).expect("c").get(Reason::Spoofed), 1);
}

#[test]
fn a_changed_view_cuts_the_clients_flows() {
    let mut e = engine();
    let mut out = Outbox::new();
    let mut f = from_client(VIS, WEB, 17, &udp(40000, 53, b"query"));
    let v = e.handle(Instant::from_nanos(1), 1, &mut f, &mut out);
    let up = sent(v, &f, &out, UPLINK);
    let nat = u16::from_be_bytes([up[34], up[35]]);
    let mut t = tree(&FAKE);
    t.insert(FAKE[0].0.into(), "192.168.1.129".into());
    let cfg = from_tree(&t, &vifs(), "eth0", 1500).expect("config");
    out.clear();
    e.apply(Instant::from_nanos(2), cfg, &mut out)
        .expect("apply");
    let mut r = from_uplink(WEB, 17, &udp(53, nat, b"late"));
    assert_eq!(
        e.handle(Instant::from_nanos(3), UPLINK, &mut r, &mut out),
        Verdict::Consumed
    );
    assert_eq!(e.counters(UPLINK).expect("c").get(Reason::NoFlow), 1);
}
