//! The compiled classifier against the first-match walk: same verdict, same rule index, on random
//! rule lists and packets aimed at what the rules name.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;
use qubes_rules::classifier::{Classifier, LinearScan, Packet, PacketProto, UnresolvedPolicy};
use qubes_rules::{Action, DstPorts, MatchDst, MatchRule, Proto};

/// Addresses that rules and packets cluster around, so prefixes nest and packets hit them.
const V4_POOL: [u32; 6] = [
    0x0a00_0001,
    0x0a00_0100,
    0x0a01_0203,
    0xc0a8_0101,
    0x0101_0101,
    0xffff_ffff,
];
const V6_POOL: [u128; 5] = [
    0x2001_0db8_0000_0000_0000_0000_0000_0001,
    0x2001_0db8_0000_0000_0000_0000_0001_0000,
    0x2001_0000_0000_0000_0000_0000_0000_0001,
    1,
    0xfe80_0000_0000_0000_0000_0000_0000_0000,
];
const PIVOTS: [u16; 12] = [0, 1, 7, 8, 52, 53, 54, 80, 443, 1024, 65534, 65535];
const NAMES: [&str; 4] = ["a.example", "b.example", "c.example", "d.example"];

fn near_v4() -> impl Strategy<Value = u32> {
    (0..V4_POOL.len(), 0u32..=12, any::<u32>())
        .prop_map(|(i, bits, r)| V4_POOL[i] ^ (r & ((1u64 << bits) - 1) as u32))
}

fn near_v6() -> impl Strategy<Value = u128> {
    (0..V6_POOL.len(), 0u32..=12, any::<u128>())
        .prop_map(|(i, bits, r)| V6_POOL[i] ^ (r & ((1u128 << bits) - 1)))
}

fn near_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        3 => near_v4().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        2 => near_v6().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
    ]
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![
        2 => proptest::sample::select(PIVOTS.to_vec()),
        1 => any::<u16>(),
        1 => 0u16..100,
    ]
}

fn prefix_len(max: u8) -> impl Strategy<Value = u8> {
    prop_oneof![1 => 0..=max, 2 => max.saturating_sub(8)..=max, 1 => Just(max)]
}

fn dst() -> impl Strategy<Value = Option<MatchDst>> {
    prop_oneof![
        3 => Just(None),
        3 => (near_v4(), prefix_len(32)).prop_map(|(a, l)| Some(MatchDst::V4(Ipv4Addr::from(a), l))),
        2 => (near_v6(), prefix_len(128)).prop_map(|(a, l)| Some(MatchDst::V6(Ipv6Addr::from(a), l))),
        2 => proptest::sample::select(NAMES.to_vec()).prop_map(|n| Some(MatchDst::Host(n.to_string()))),
    ]
}

fn match_rule() -> impl Strategy<Value = MatchRule> {
    let proto = prop_oneof![
        2 => Just(None),
        2 => Just(Some(Proto::Tcp)),
        2 => Just(Some(Proto::Udp)),
        1 => Just(Some(Proto::Icmp)),
    ];
    let ports = prop_oneof![
        3 => Just(None),
        2 => (port(), port()).prop_map(|(a, b)| Some(DstPorts { lo: a.min(b), hi: a.max(b) })),
        1 => port().prop_map(|p| Some(DstPorts { lo: p, hi: p })),
        1 => Just(Some(DstPorts { lo: 53, hi: 53 })),
    ];
    let icmptype = prop_oneof![6 => Just(None), 1 => (0u8..10).prop_map(Some), 1 => any::<u8>().prop_map(Some)];
    (
        any::<bool>(),
        proto,
        dst(),
        ports,
        prop::bool::weighted(0.15),
        icmptype,
    )
        .prop_map(|(accept, proto, dst, dstports, dns, icmptype)| MatchRule {
            action: if accept { Action::Accept } else { Action::Drop },
            proto,
            dst,
            dstports,
            dns,
            // icmptype mostly with proto icmp, as dom0 writes it; sometimes anywhere.
            icmptype: icmptype.filter(|_| proto == Some(Proto::Icmp) || dstports.is_none()),
        })
}

fn resolution() -> impl Strategy<Value = Option<Vec<IpAddr>>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(Vec::new())),
        14 => prop::collection::vec(near_ip(), 1..4).prop_map(Some),
    ]
}

fn packet_proto() -> impl Strategy<Value = PacketProto> {
    prop_oneof![
        3 => Just(PacketProto::Tcp),
        3 => Just(PacketProto::Udp),
        2 => Just(PacketProto::Icmp),
        2 => proptest::sample::select(vec![1u8, 6, 17, 58, 47, 0]).prop_map(PacketProto::Other),
        1 => any::<u8>().prop_map(PacketProto::Other),
    ]
}

fn random_packet() -> impl Strategy<Value = Packet> {
    (packet_proto(), near_ip(), port()).prop_map(|(proto, dst, port)| Packet { proto, dst, port })
}

#[derive(Debug, Clone)]
struct Case {
    rules: Vec<MatchRule>,
    names: Vec<Option<Vec<IpAddr>>>,
    dns: Vec<IpAddr>,
    skip_accept: bool,
    packets: Vec<Packet>,
    seeds: Vec<(u64, PacketProto)>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(match_rule(), 0..300),
        any::<bool>(),
        prop::collection::vec(resolution(), NAMES.len()),
        prop::collection::vec(near_ip(), 0..4),
        any::<bool>(),
        prop::collection::vec(random_packet(), 64),
        prop::collection::vec((any::<u64>(), packet_proto()), 160),
    )
        .prop_map(
            |(mut rules, policy, names, dns, skip_accept, packets, seeds)| {
                if policy {
                    rules.push(MatchRule {
                        action: if rules.len() & 1 == 0 {
                            Action::Drop
                        } else {
                            Action::Accept
                        },
                        proto: None,
                        dst: None,
                        dstports: None,
                        dns: false,
                        icmptype: None,
                    });
                }
                Case {
                    rules,
                    names,
                    dns,
                    skip_accept,
                    packets,
                    seeds,
                }
            },
        )
}

/// A packet aimed at a rule: an address in its destination (a boundary of a prefix, or a host
/// or DNS address) and a port at or next to its range.
fn aimed(
    case: &Case,
    resolve: &HashMap<&str, Vec<IpAddr>>,
    seed: u64,
    proto: PacketProto,
) -> Option<Packet> {
    let rule = case
        .rules
        .get((seed % case.rules.len().max(1) as u64) as usize)?;
    let pick = (seed >> 16) as usize;
    let dst = if rule.dns && pick & 1 == 0 && !case.dns.is_empty() {
        case.dns[pick / 2 % case.dns.len()]
    } else {
        match &rule.dst {
            None => *case.dns.get(pick % case.dns.len().max(1))?,
            Some(MatchDst::V4(a, l)) => {
                let host = 32 - u32::from(*l).min(32);
                let mask = ((1u64 << host) - 1) as u32;
                let base = u32::from(*a) & !mask;
                let a = match pick % 4 {
                    0 => base,
                    1 => base | mask,
                    2 => (base | mask).wrapping_add(1),
                    _ => base.wrapping_sub(1),
                };
                IpAddr::V4(Ipv4Addr::from(a))
            }
            Some(MatchDst::V6(a, l)) => {
                let host = 128 - u32::from(*l).min(128);
                let mask = 1u128.checked_shl(host).map_or(u128::MAX, |m| m - 1);
                let base = u128::from(*a) & !mask;
                let a = match pick % 4 {
                    0 => base,
                    1 => base | mask,
                    2 => (base | mask).wrapping_add(1),
                    _ => base.wrapping_sub(1),
                };
                IpAddr::V6(Ipv6Addr::from(a))
            }
            Some(MatchDst::Host(n)) => {
                let addrs = resolve.get(n.as_str())?;
                *addrs.get(pick % addrs.len().max(1))?
            }
        }
    };
    let port = match (rule.dstports, rule.icmptype, rule.dns) {
        (_, _, true) if pick % 3 < 2 => 53,
        (Some(p), _, _) => match (seed >> 40) % 4 {
            0 => p.lo,
            1 => p.hi,
            2 => p.lo.wrapping_sub(1),
            _ => p.hi.wrapping_add(1),
        },
        (None, Some(t), _) => u16::from(t) + (seed >> 40) as u16 % 2,
        _ => (seed >> 40) as u16,
    };
    let proto = match (rule.proto, (seed >> 60) % 2) {
        (Some(Proto::Tcp), 0) => PacketProto::Tcp,
        (Some(Proto::Udp), 0) => PacketProto::Udp,
        (Some(Proto::Icmp), 0) => PacketProto::Icmp,
        _ => proto,
    };
    Some(Packet { proto, dst, port })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn compiled_equals_linear(case in case()) {
        let map: HashMap<&str, Option<Vec<IpAddr>>> =
            NAMES.iter().copied().zip(case.names.iter().cloned()).collect();
        let resolved: HashMap<&str, Vec<IpAddr>> = map
            .iter()
            .filter_map(|(k, v)| v.clone().map(|v| (*k, v)))
            .collect();
        let resolver = |name: &str| map.get(name).cloned().flatten();
        let policy = if case.skip_accept {
            UnresolvedPolicy::SkipAccept
        } else {
            UnresolvedPolicy::BlockClient
        };
        let compiled = Classifier::compile(&case.rules, &case.dns, &resolver, policy);
        let linear = LinearScan::new(&case.rules, &case.dns, &resolver, policy);
        prop_assert_eq!(compiled.unresolved(), linear.unresolved());
        prop_assert_eq!(compiled.is_drop_all(), linear.is_drop_all());
        let aimed_packets = case
            .seeds
            .iter()
            .filter_map(|&(seed, proto)| aimed(&case, &resolved, seed, proto));
        for p in case.packets.iter().copied().chain(aimed_packets) {
            prop_assert_eq!(compiled.lookup(p), linear.lookup(p), "packet {:?}", p);
        }
    }
}
