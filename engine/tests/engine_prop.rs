//! Property test: seeded random and mutated frames through the engine.
//!
//! Each case builds an engine with 2-3 clients, each with its own random QubesDB rule set (IPv4
//! and, for clients with an IPv6 address, IPv6), optionally IPv6 on the uplink, and plays a
//! random sequence of actions: valid TCP/UDP/ICMP/ARP/NDP/IPv6 frames and IPv4 fragments from
//! clients, replies, ICMP errors and fragments from the uplink (built from what the engine
//! actually sent), random bytes, and mutations of all of these (bit flips, truncation,
//! extension, overwritten bytes, wrong ethertypes and length fields, swapped interfaces), with
//! `tick`, `apply` (rule changes, IPv6 toggled, clients unplugged and plugged back) and
//! `dns_answer` in between.
//!
//! Checked for every frame the engine emits (forwarded in place or in the outbox):
//!
//! - no panic;
//! - well-formed: re-parsed with etherparse; IPv4 header checksum, TCP/UDP/ICMP/ICMPv6
//!   checksums (fragments reassembled first), TTL/hop limit at least 1;
//! - on the uplink, only: ARP from our address; NDP adverts and ICMP errors from our address
//!   to uplink hosts (never to a client, never quoting a client's packet); and client traffic
//!   from our address (NAT) that came in on that client's vif with that client's source
//!   address, that is TCP, UDP or an echo request, and that the client's CURRENT rules accept,
//!   evaluated by an independent first-match walk written here from the rule semantics
//!   (qubes-core-agent-linux `qubesagent/firewall.py`, rules/src/classifier.rs docs), not by the
//!   engine's classifier. Flows opened under old rules are cut when rules change, so "accepted
//!   by the current rules" covers both new and old flows;
//! - on a client vif, only frames for that client (its MAC and address): answers to its own
//!   frames (ARP, NDP, ICMP errors, echo replies from the gateway), replies to its own flows
//!   with its own port restored, ICMP errors about its own flows, and fragment-timeout errors
//!   about datagrams it sent. Nothing crosses from one client to another;
//! - for an intact new-flow candidate (own source, remote destination, TTL above 1, TCP, UDP or
//!   an ICMP query) the verdict exactly: rejected by rule if and only if the rules refuse it.
//!
//! The oracle checks the client's *current* rules rather than those in effect when the flow
//! was created: the engine cuts flows that new rules refuse, so every packet it still forwards
//! must be accepted by the rules of the moment, which implies the creation-time check.
//!
//! Deterministic: a fixed seed and 256 cases (a few seconds in debug mode). For a deeper run by
//! hand: `ENGINE_PROP_CASES=20000 ENGINE_PROP_SEED=7 cargo test --release -p sys-firewall
//! --test engine_prop`.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use etherparse::{ArpOperation, ArpPacketSlice, Ethernet2Slice, Ipv4Slice, Ipv6Slice};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use qubes_engine::config::{
    ClientConfig, EngineConfig, FragLimits, Mac, UplinkConfig, UplinkMode, GATEWAY_MAC,
};
use qubes_engine::engine::{Engine, IfaceId, Outbox, Reason, Verdict, UPLINK};
use qubes_engine::Instant;

// -------------------------------------------------------------------------------------------
// Addresses

const OUR_IP: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 6);
const NETVM_IP: Ipv4Addr = Ipv4Addr::new(10, 137, 0, 5);
const OUR_IP6: Ipv6Addr = Ipv6Addr::new(0xfd09, 0x24ef, 0x4179, 0, 0, 0, 0xa89, 6);
const NETVM_IP6: Ipv6Addr = Ipv6Addr::new(0xfd09, 0x24ef, 0x4179, 0, 0, 0, 0xa89, 5);
const OUR_MAC: Mac = [0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x06];
const NETVM_MAC: Mac = [0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x05];
const DNS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 139, 1, 1), Ipv4Addr::new(10, 139, 1, 2)];
const NAMES: [&str; 2] = ["a.example", "b.example"];
const MAX_CLIENTS: usize = 3;

fn client_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 137, 0, 10 + i as u8)
}

fn client_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd09, 0x24ef, 0x4179, 0, 0, 0, 0xa89, 0x10 + i as u16)
}

fn client_mac(i: usize) -> Mac {
    [0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x10 + i as u8]
}

fn client_ll6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfe80, 0, 0, 0, 0x0216, 0x3eff, 0xfe5e, 0x6c10 + i as u16)
}

/// Remote IPv4 addresses, then special ones (ours, clients', DNS, broadcast...).
const REMOTE4: [Ipv4Addr; 7] = [
    Ipv4Addr::new(198, 18, 0, 1),
    Ipv4Addr::new(198, 18, 0, 2),
    Ipv4Addr::new(198, 18, 1, 7),
    Ipv4Addr::new(198, 19, 255, 254),
    Ipv4Addr::new(203, 0, 113, 5),
    Ipv4Addr::new(8, 8, 8, 8),
    Ipv4Addr::new(1, 1, 1, 1),
];
const SPECIAL4: [Ipv4Addr; 10] = [
    DNS[0],
    DNS[1],
    OUR_IP,
    NETVM_IP,
    Ipv4Addr::new(10, 137, 0, 10),
    Ipv4Addr::new(10, 137, 0, 11),
    Ipv4Addr::new(255, 255, 255, 255),
    Ipv4Addr::new(224, 0, 0, 251),
    Ipv4Addr::new(127, 0, 0, 1),
    Ipv4Addr::new(0, 0, 0, 0),
];
const REMOTE6: [Ipv6Addr; 4] = [
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
    Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 5),
    Ipv6Addr::new(0x2a00, 0x1450, 0, 0, 0, 0, 0, 1),
    Ipv6Addr::new(0x2606, 0x4700, 0, 0, 0, 0, 0, 0x1111),
];
const SPECIAL6: [Ipv6Addr; 7] = [
    OUR_IP6,
    NETVM_IP6,
    Ipv6Addr::new(0xfd09, 0x24ef, 0x4179, 0, 0, 0, 0xa89, 0x10),
    Ipv6Addr::new(0xfd09, 0x24ef, 0x4179, 0, 0, 0, 0xa89, 0x11),
    Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
    Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1),
    Ipv6Addr::LOCALHOST,
];

fn dst4(sel: u8) -> Ipv4Addr {
    if sel < 220 {
        // Remote addresses and the DNS servers (`specialtarget=dns`).
        v4_of(sel)
    } else {
        SPECIAL4[usize::from(sel) % SPECIAL4.len()]
    }
}

fn dst6(sel: u8) -> Ipv6Addr {
    if sel < 220 {
        REMOTE6[usize::from(sel) % REMOTE6.len()]
    } else {
        SPECIAL6[usize::from(sel) % SPECIAL6.len()]
    }
}

/// Every address a rule or a name answer may name.
fn any_addr(sel: u8) -> IpAddr {
    let all4 = REMOTE4.len() + 2;
    let i = usize::from(sel) % (all4 + REMOTE6.len());
    if i < REMOTE4.len() {
        REMOTE4[i].into()
    } else if i < all4 {
        DNS[i - REMOTE4.len()].into()
    } else {
        REMOTE6[i - all4].into()
    }
}

// -------------------------------------------------------------------------------------------
// Checksums and frame building (independent of the engine's wire module)

fn sum16(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        acc += u64::from(*b) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u64 {
    let acc = u64::from(proto) + len as u64;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => sum16(&d.octets(), sum16(&s.octets(), acc)),
        (IpAddr::V6(s), IpAddr::V6(d)) => sum16(&d.octets(), sum16(&s.octets(), acc)),
        _ => acc,
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Client sequence numbers start at 0x1000_0000, the remote's at 0x2000_0000; every segment
/// of a side carries the same sequence number, and the remote acks the client's first byte,
/// so all of them stay inside the windows conntrack tracks.
const CLIENT_SEQ: u32 = 0x1000_0000;
const REMOTE_SEQ: u32 = 0x2000_0000;

fn tcp_seg(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    tcp_seg_seq(
        src, dst, sport, dport, flags, payload, CLIENT_SEQ, REMOTE_SEQ,
    )
}

/// A segment from a remote host to a client's flow.
fn tcp_seg_from_remote(
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    tcp_seg_seq(
        src, dst, sport, dport, flags, payload, REMOTE_SEQ, CLIENT_SEQ,
    )
}

#[allow(clippy::too_many_arguments)]
fn tcp_seg_seq(
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    flags: u8,
    payload: &[u8],
    seq: u32,
    ack: u32,
) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    put16(&mut t, 0, sport);
    put16(&mut t, 2, dport);
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    put16(&mut t, 14, 29_200);
    t.extend_from_slice(payload);
    let c = !fold(sum16(&t, pseudo(src, dst, 6, t.len())));
    put16(&mut t, 16, c);
    t
}

fn udp_dgram(
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    payload: &[u8],
    no_csum: bool,
) -> Vec<u8> {
    let mut t = vec![0u8; 8];
    put16(&mut t, 0, sport);
    put16(&mut t, 2, dport);
    put16(&mut t, 4, (8 + payload.len()) as u16);
    t.extend_from_slice(payload);
    if !(no_csum && src.is_ipv4()) {
        let c = match !fold(sum16(&t, pseudo(src, dst, 17, t.len()))) {
            0 => 0xffff,
            c => c,
        };
        put16(&mut t, 6, c);
    }
    t
}

fn icmp_msg(src: IpAddr, dst: IpAddr, ty: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut t = vec![ty, code, 0, 0];
    t.extend_from_slice(&rest);
    t.extend_from_slice(body);
    let acc = if src.is_ipv6() {
        pseudo(src, dst, 58, t.len())
    } else {
        0
    };
    let c = !fold(sum16(&t, acc));
    put16(&mut t, 2, c);
    t
}

/// An IPv4 header (20 bytes) with checksum, then `payload`.
#[allow(clippy::too_many_arguments)]
fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    ttl: u8,
    id: u16,
    df: bool,
    mf: bool,
    off8: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut h = vec![0x45, 0, 0, 0, 0, 0, 0, 0, ttl, proto, 0, 0];
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    put16(&mut h, 2, (20 + payload.len()) as u16);
    put16(&mut h, 4, id);
    let flags = (u16::from(df) << 14) | (u16::from(mf) << 13) | (off8 & 0x1fff);
    put16(&mut h, 6, flags);
    let c = !fold(sum16(&h, 0));
    put16(&mut h, 10, c);
    h.extend_from_slice(payload);
    h
}

/// The IPv4 packet with `words` 4-byte words of options (NOPs, end of list) inserted after
/// its 20-byte header; IPv6 and `words == 0` unchanged.
fn with_options(mut ip: Vec<u8>, words: u8) -> Vec<u8> {
    if words == 0 || ip.first() != Some(&0x45) {
        return ip;
    }
    let n = usize::from(words.min(10)) * 4;
    let mut opts = vec![1u8; n];
    opts[n - 1] = 0;
    ip.splice(20..20, opts);
    ip[0] = 0x40 | (5 + n / 4) as u8;
    let total = ip.len() as u16;
    put16(&mut ip, 2, total);
    put16(&mut ip, 10, 0);
    let c = !fold(sum16(&ip[..20 + n], 0));
    put16(&mut ip, 10, c);
    ip
}

fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, nh: u8, hop: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0, 0, 0, nh, hop];
    put16(&mut h, 4, payload.len() as u16);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

fn eth(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn arp(op: u16, sha: Mac, spa: Ipv4Addr, tha: Mac, tpa: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4];
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&sha);
    a.extend_from_slice(&spa.octets());
    a.extend_from_slice(&tha);
    a.extend_from_slice(&tpa.octets());
    a
}

fn payload_bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

/// An IP packet (IPv4 or IPv6) around an L4 message.
fn ip_packet(
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    ttl: u8,
    df: bool,
    id: u16,
    l4: &[u8],
) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(s, d, proto, ttl, id, df, false, 0, l4),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(s, d, proto, ttl, l4),
        _ => Vec::new(),
    }
}

fn ethertype_of(v6: bool) -> u16 {
    if v6 {
        0x86dd
    } else {
        0x0800
    }
}

/// Splits an IPv4 packet (20-byte header) into fragments of `unit` payload bytes (a multiple
/// of 8).
fn fragment4(packet: &[u8], unit: usize) -> Vec<Vec<u8>> {
    let Some(hdr) = packet.get(..20) else {
        return Vec::new();
    };
    let body = &packet[20..];
    let (src, dst) = (
        Ipv4Addr::new(hdr[12], hdr[13], hdr[14], hdr[15]),
        Ipv4Addr::new(hdr[16], hdr[17], hdr[18], hdr[19]),
    );
    let mut v = Vec::new();
    let mut off = 0;
    while off < body.len() || (off == 0 && body.is_empty()) {
        let end = (off + unit).min(body.len());
        let mf = end < body.len();
        v.push(ipv4(
            src,
            dst,
            hdr[9],
            hdr[8],
            be16(hdr, 4),
            false,
            mf,
            (off / 8) as u16,
            &body[off..end],
        ));
        if body.is_empty() {
            break;
        }
        off = end;
    }
    v
}

// -------------------------------------------------------------------------------------------
// Rules: generated structure, QubesDB strings, and the oracle

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum P {
    Tcp,
    Udp,
    Icmp,
    /// Any other IP protocol (only rules without a protocol, ports or DNS target match it).
    Other,
}

#[derive(Clone, Debug)]
enum RDst {
    /// Index into the address universe, prefix length, keep host bits in the text.
    V4(u8, u8, bool),
    V6(u8, u8),
    Host(u8),
}

#[derive(Clone, Debug)]
struct GRule {
    accept: bool,
    proto: Option<P>,
    dst: Option<RDst>,
    ports: Option<(u16, u16, bool)>,
    dns: bool,
    icmptype: Option<u8>,
}

/// Rule strings the agent refuses (the whole client is then blocked).
const BROKEN: [&str; 8] = [
    "action=reject",
    "action=accept proto=sctp",
    "action=accept foo=bar",
    "action=accept dstports=90-80",
    "action=accept  proto=tcp",
    "proto=tcp",
    "action=accept icmptype=300",
    "action=accept specialtarget=ntp",
];

#[derive(Clone, Debug)]
enum Entry {
    Rule(GRule),
    Broken(u8),
}

#[derive(Clone, Debug)]
struct RuleSet {
    /// (gap before this rule's number, rule).
    entries: Vec<(u8, Entry)>,
    /// `None`: no `policy` key (the agent refuses the set).
    policy: Option<bool>,
}

fn v4_of(sel: u8) -> Ipv4Addr {
    let all = REMOTE4.len() + DNS.len();
    let i = usize::from(sel) % all;
    if i < REMOTE4.len() {
        REMOTE4[i]
    } else {
        DNS[i - REMOTE4.len()]
    }
}

fn v6_of(sel: u8) -> Ipv6Addr {
    REMOTE6[usize::from(sel) % REMOTE6.len()]
}

fn mask4(a: Ipv4Addr, len: u8) -> u32 {
    let len = u32::from(len.min(32));
    u32::from(a)
        .checked_shr(32 - len)
        .unwrap_or(0)
        .checked_shl(32 - len)
        .unwrap_or(0)
}

fn mask6(a: Ipv6Addr, len: u8) -> u128 {
    let len = u32::from(len.min(128));
    u128::from(a)
        .checked_shr(128 - len)
        .unwrap_or(0)
        .checked_shl(128 - len)
        .unwrap_or(0)
}

impl GRule {
    fn text(&self) -> String {
        let mut s = format!("action={}", if self.accept { "accept" } else { "drop" });
        if let Some(p) = self.proto {
            s.push_str(match p {
                P::Tcp => " proto=tcp",
                P::Udp => " proto=udp",
                P::Icmp => " proto=icmp",
                P::Other => "",
            });
        }
        match &self.dst {
            None => {}
            Some(RDst::V4(sel, len, raw)) => {
                let a = v4_of(*sel);
                let shown = if *raw {
                    a
                } else {
                    Ipv4Addr::from(mask4(a, *len))
                };
                s.push_str(&format!(" dst4={shown}/{len}"));
            }
            Some(RDst::V6(sel, len)) => {
                let net = Ipv6Addr::from(mask6(v6_of(*sel), *len));
                s.push_str(&format!(" dst6={net}/{len}"));
            }
            Some(RDst::Host(n)) => s.push_str(&format!(" dsthost={}", NAMES[usize::from(*n) % 2])),
        }
        if let Some((lo, hi, short)) = self.ports {
            if short && lo == hi {
                s.push_str(&format!(" dstports={lo}"));
            } else {
                s.push_str(&format!(" dstports={lo}-{hi}"));
            }
        }
        if self.dns {
            s.push_str(" specialtarget=dns");
        }
        if let Some(t) = self.icmptype {
            s.push_str(&format!(" icmptype={t}"));
        }
        s
    }

    /// Whether this rule matches `(proto, dst, port)` (port: TCP/UDP port or ICMP type), from
    /// the documented semantics.
    fn matches(&self, names: &Names, proto: P, dst: IpAddr, port: u16) -> bool {
        if self.proto.is_some_and(|p| p != proto) {
            return false;
        }
        if (self.ports.is_some() || self.dns) && matches!(proto, P::Icmp | P::Other) {
            return false;
        }
        if let Some((lo, hi, _)) = self.ports {
            if port < lo || port > hi {
                return false;
            }
        }
        if self.dns {
            if self.ports.is_some_and(|(lo, hi, _)| (lo, hi) != (53, 53)) {
                return false;
            }
            if port != 53 || !DNS.iter().any(|d| IpAddr::V4(*d) == dst) {
                return false;
            }
        }
        if let Some(t) = self.icmptype {
            if proto != P::Icmp || port != u16::from(t) {
                return false;
            }
        }
        match (&self.dst, dst) {
            (None, _) => true,
            (Some(RDst::V4(sel, len, _)), IpAddr::V4(a)) => {
                mask4(a, *len) == mask4(v4_of(*sel), *len)
            }
            (Some(RDst::V6(sel, len)), IpAddr::V6(a)) => mask6(a, *len) == mask6(v6_of(*sel), *len),
            (Some(RDst::V4(..) | RDst::V6(..)), _) => false,
            (Some(RDst::Host(n)), a) => names.get(*n).is_some_and(|v| v.contains(&a)),
        }
    }
}

/// Name answers in effect: `None` until answered, and after a failure or an empty answer.
#[derive(Clone, Debug, Default)]
struct Names([Option<Vec<IpAddr>>; 2]);

impl Names {
    fn get(&self, n: u8) -> Option<&Vec<IpAddr>> {
        self.0[usize::from(n) % 2].as_ref()
    }
}

impl RuleSet {
    fn entries(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        let mut no = 0usize;
        for (gap, e) in &self.entries {
            no += usize::from(*gap);
            let text = match e {
                Entry::Rule(r) => r.text(),
                Entry::Broken(b) => BROKEN[usize::from(*b) % BROKEN.len()].to_string(),
            };
            v.push((format!("{no:04}"), text));
            no += 1;
        }
        if let Some(p) = self.policy {
            v.push(("policy".into(), if p { "accept" } else { "drop" }.into()));
        }
        v
    }

    fn valid_entries(&self) -> impl Iterator<Item = &GRule> {
        self.entries.iter().filter_map(|(_, e)| match e {
            Entry::Rule(r) => Some(r),
            Entry::Broken(_) => None,
        })
    }

    /// Whether the agent accepts this set for the family.
    fn valid(&self, v6: bool) -> bool {
        self.policy.is_some()
            && self.entries.iter().all(|(_, e)| match e {
                Entry::Broken(_) => false,
                Entry::Rule(r) => !matches!(
                    (&r.dst, v6),
                    (Some(RDst::V4(..)), true) | (Some(RDst::V6(..)), false)
                ),
            })
    }

    /// First match, policy last; a drop rule on an unresolved name refuses everything (fail
    /// closed, per family).
    fn accepts(&self, names: &Names, proto: P, dst: IpAddr, port: u16) -> bool {
        let rules = || {
            self.entries.iter().filter_map(|(_, e)| match e {
                Entry::Rule(r) => Some(r),
                Entry::Broken(_) => None,
            })
        };
        let unresolved_drop = rules()
            .any(|r| !r.accept && matches!(r.dst, Some(RDst::Host(n)) if names.get(n).is_none()));
        if unresolved_drop {
            return false;
        }
        for r in rules() {
            if r.matches(names, proto, dst, port) {
                return r.accept;
            }
        }
        self.policy == Some(true)
    }
}

// -------------------------------------------------------------------------------------------
// Scenario

#[derive(Clone, Debug)]
struct ClientSpec {
    ip6: bool,
    rules4: RuleSet,
    rules6: RuleSet,
}

impl ClientSpec {
    fn blocked(&self) -> bool {
        !self.rules4.valid(false) || (self.ip6 && !self.rules6.valid(true))
    }

    fn accepts(&self, names: &Names, proto: P, dst: IpAddr, port: u16) -> bool {
        if self.blocked() {
            return false;
        }
        let rs = if dst.is_ipv4() {
            &self.rules4
        } else {
            &self.rules6
        };
        rs.accepts(names, proto, dst, port)
    }
}

#[derive(Clone, Debug)]
enum Kind {
    Tcp(u8),
    Udp(bool),
    Echo,
    IcmpOther(u8, u8),
    /// Neighbour solicitation: target selector, source selector, hop limit 255.
    NdpNs(u8, u8, bool),
    /// ARP: operation, target selector, sender selector.
    Arp(u16, u8, u8),
    /// IPv6 with a fragment header.
    V6Frag,
    /// Another IP protocol number.
    Other(u8),
}

#[derive(Clone, Debug)]
struct Pkt {
    v6: bool,
    kind: Kind,
    dst: u8,
    sport: u16,
    dport: u16,
    payload: u16,
    ttl: u8,
    df: bool,
    /// 0: own address (mostly); 1: another client's; 2: a remote address.
    src: u8,
    id: u16,
    /// IPv4 options, in 4-byte words (NOPs then end of list).
    opts: u8,
}

#[derive(Clone, Debug)]
enum Up {
    /// A reply to a flow the engine sent out (index into what was seen).
    Reply {
        flow: u16,
        flags: u8,
        payload: u16,
        ttl: u8,
        df: bool,
    },
    /// An ICMP error about a packet the engine sent out.
    Error {
        flow: u16,
        ty: u8,
        code: u8,
        quote: u16,
        router: bool,
    },
    Unsolicited {
        v6: bool,
        src: u8,
        proto: u8,
        dport: u16,
        to_client: bool,
    },
    Arp {
        op: u16,
        spa: u8,
        tpa: u8,
    },
    Ndp {
        advert: bool,
        target: u8,
    },
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(u16, u8),
    Truncate(u16),
    Extend(Vec<u8>),
    Overwrite(u16, Vec<u8>),
    Ethertype(u16),
    /// IPv4 total length (header checksum fixed) or IPv6 payload length.
    IpLen(u16),
    /// UDP length / TCP data offset byte, without fixing checksums.
    L4Len(u16),
}

#[derive(Clone, Debug)]
struct FragPlan {
    /// Fragment payload is `8 * (unit + 1)` bytes.
    unit: u8,
    /// 0 in order, 1 reversed, 2 rotated by one, 3 first last.
    order: u8,
    dup: Option<u8>,
    drop: Option<u8>,
}

#[derive(Clone, Debug)]
enum Action {
    FromClient {
        who: u8,
        pkt: Pkt,
        /// 0..: own vif (mostly); 200..: the uplink; 230..: another client's vif.
        via: u8,
        mutation: Option<Mutation>,
    },
    FromUplink {
        up: Up,
        mutation: Option<Mutation>,
    },
    ClientFrags {
        who: u8,
        pkt: Pkt,
        plan: FragPlan,
    },
    UplinkFrags {
        up: Up,
        plan: FragPlan,
        spoof: Option<u8>,
    },
    Garbage {
        iface: u8,
        bytes: Vec<u8>,
    },
    Tick {
        ms: u32,
    },
    Apply {
        who: u8,
        rules4: Option<RuleSet>,
        rules6: Option<RuleSet>,
        toggle_ip6: bool,
    },
    Unplug {
        who: u8,
    },
    Replug,
    Dns {
        name: u8,
        answer: Option<Vec<u8>>,
        ttl: u32,
    },
}

#[derive(Clone, Debug)]
struct Scenario {
    uplink6: bool,
    uplink_mtu: u16,
    clients: Vec<ClientSpec>,
    actions: Vec<Action>,
}

// -------------------------------------------------------------------------------------------
// Strategies

fn arb_proto() -> impl Strategy<Value = Option<P>> {
    prop_oneof![
        3 => Just(None),
        4 => Just(Some(P::Tcp)),
        3 => Just(Some(P::Udp)),
        2 => Just(Some(P::Icmp)),
    ]
}

fn arb_port() -> impl Strategy<Value = u16> {
    prop_oneof![
        6 => prop::sample::select(vec![22u16, 53, 80, 443, 8080, 123, 0, 65535, 1024]),
        1 => any::<u16>(),
    ]
}

fn arb_rule(v6: bool) -> impl Strategy<Value = GRule> {
    let dst = prop_oneof![
        3 => Just(None),
        5 => (any::<u8>(), prop::sample::select(vec![0u8, 8, 15, 16, 24, 31, 32]), prop::bool::weighted(0.1))
            .prop_map(move |(s, l, raw)| if v6 {
                Some(RDst::V6(s, [0u8, 16, 32, 48, 64, 127, 128][usize::from(l) % 7]))
            } else {
                Some(RDst::V4(s, l, raw))
            }),
        1 => any::<u8>().prop_map(|n| Some(RDst::Host(n % 2))),
        // The other family's prefix: the agent refuses the set (rare).
        1 => prop::bool::weighted(0.1).prop_map(move |wrong| match (wrong, v6) {
            (true, true) => Some(RDst::V4(0, 24, false)),
            (true, false) => Some(RDst::V6(0, 32)),
            _ => None,
        }),
    ];
    let ports = prop_oneof![
        3 => Just(None),
        2 => (arb_port(), 0u16..100, any::<bool>()).prop_map(|(lo, w, short)| {
            let hi = lo.saturating_add(if w < 60 { 0 } else { w });
            Some((lo, hi, short))
        }),
    ];
    (
        prop::bool::weighted(0.65),
        arb_proto(),
        dst,
        ports,
        prop::bool::weighted(0.08),
        prop_oneof![8 => Just(None), 1 => prop::sample::select(vec![0u8, 3, 8, 11, 128, 129]).prop_map(Some)],
    )
        .prop_map(|(accept, proto, dst, ports, dns, icmptype)| GRule {
            accept,
            proto,
            dst,
            ports,
            dns,
            icmptype,
        })
}

fn arb_ruleset(v6: bool) -> impl Strategy<Value = RuleSet> {
    let entry = prop_oneof![
        60 => arb_rule(v6).prop_map(Entry::Rule),
        1 => any::<u8>().prop_map(Entry::Broken),
    ];
    (
        vec((prop_oneof![4 => Just(0u8), 1 => 1u8..5], entry), 0..8),
        prop_oneof![
            40 => any::<bool>().prop_map(Some),
            1 => Just(None),
        ],
    )
        .prop_map(|(entries, policy)| RuleSet { entries, policy })
}

fn arb_client() -> impl Strategy<Value = ClientSpec> {
    (
        prop::bool::weighted(0.6),
        arb_ruleset(false),
        arb_ruleset(true),
    )
        .prop_map(|(ip6, rules4, rules6)| ClientSpec {
            ip6,
            rules4,
            rules6,
        })
}

/// Linux's `tcp_valid_flags` (nf_conntrack_proto_tcp.c) over FIN, SYN, RST, ACK and URG.
fn tcp_valid_flags(f: u8) -> bool {
    matches!(
        f & 0x37,
        0x02 | 0x22 | 0x12 | 0x04 | 0x14 | 0x11 | 0x31 | 0x10 | 0x30
    )
}

/// `tcp_new`: from no state, a SYN (`sSS`) or an ACK (`sES`, loose pickup) opens a flow.
fn tcp_opens_flow(f: u8) -> bool {
    tcp_valid_flags(f) && matches!(f & 0x17, 0x02 | 0x10)
}

fn arb_tcp_flags() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => Just(0x02u8),
        4 => Just(0x10),
        3 => Just(0x18),
        1 => Just(0x11),
        1 => Just(0x04),
        1 => Just(0x12),
        1 => any::<u8>(),
    ]
}

fn arb_pkt() -> impl Strategy<Value = Pkt> {
    let kind = prop_oneof![
        30 => arb_tcp_flags().prop_map(Kind::Tcp),
        20 => prop::bool::weighted(0.1).prop_map(Kind::Udp),
        12 => Just(Kind::Echo),
        3 => (any::<u8>(), any::<u8>()).prop_map(|(t, c)| Kind::IcmpOther(t, c)),
        4 => (any::<u8>(), any::<u8>(), prop::bool::weighted(0.9)).prop_map(|(t, s, h)| Kind::NdpNs(t, s, h)),
        5 => (prop_oneof![5 => Just(1u16), 1 => Just(2u16), 1 => any::<u16>()], any::<u8>(), any::<u8>())
            .prop_map(|(op, t, s)| Kind::Arp(op, t, s)),
        1 => Just(Kind::V6Frag),
        1 => any::<u8>().prop_map(Kind::Other),
    ];
    (
        prop::bool::weighted(0.35),
        kind,
        any::<u8>(),
        prop_oneof![4 => prop::sample::select(vec![40000u16, 40001, 40002, 50000]), 1 => any::<u16>()],
        arb_port(),
        prop_oneof![6 => 0u16..64, 3 => 0u16..1500, 1 => 1400u16..3000],
        prop_oneof![10 => Just(64u8), 1 => 0u8..3],
        prop::bool::weighted(0.5),
        prop_oneof![20 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
        any::<u16>(),
        prop_oneof![8 => Just(0u8), 1 => 1u8..=10],
    )
        .prop_map(|(v6, kind, dst, sport, dport, payload, ttl, df, src, id, opts)| Pkt {
            v6,
            kind,
            dst,
            sport,
            dport,
            payload,
            ttl,
            df,
            src,
            id,
            opts,
        })
}

fn arb_up() -> impl Strategy<Value = Up> {
    prop_oneof![
        12 => (any::<u16>(), arb_tcp_flags(), prop_oneof![6 => 0u16..200, 1 => 1300u16..3000], prop_oneof![10 => Just(60u8), 1 => 0u8..3], any::<bool>())
            .prop_map(|(flow, flags, payload, ttl, df)| Up::Reply { flow, flags: flags | 0x10, payload, ttl, df }),
        4 => (any::<u16>(), prop::sample::select(vec![(3u8, 3u8), (3, 1), (3, 4), (11, 0), (3, 13), (4, 0), (12, 0)]), 0u16..600, any::<bool>())
            .prop_map(|(flow, (ty, code), quote, router)| Up::Error { flow, ty, code, quote, router }),
        3 => (any::<bool>(), any::<u8>(), prop::sample::select(vec![6u8, 17, 1, 58]), arb_port(), prop::bool::weighted(0.3))
            .prop_map(|(v6, src, proto, dport, to_client)| Up::Unsolicited { v6, src, proto, dport, to_client }),
        2 => (prop_oneof![Just(1u16), Just(2u16)], any::<u8>(), any::<u8>()).prop_map(|(op, spa, tpa)| Up::Arp { op, spa, tpa }),
        1 => (any::<bool>(), any::<u8>()).prop_map(|(advert, target)| Up::Ndp { advert, target }),
    ]
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<u16>(), 0u8..8).prop_map(|(p, b)| Mutation::Flip(p, b)),
        2 => any::<u16>().prop_map(Mutation::Truncate),
        2 => vec(any::<u8>(), 1..40).prop_map(Mutation::Extend),
        2 => (any::<u16>(), vec(any::<u8>(), 1..8)).prop_map(|(p, b)| Mutation::Overwrite(p, b)),
        1 => prop::sample::select(vec![0x0800u16, 0x86dd, 0x0806, 0x8100, 0x0000, 0xffff]).prop_map(Mutation::Ethertype),
        2 => any::<u16>().prop_map(Mutation::IpLen),
        1 => any::<u16>().prop_map(Mutation::L4Len),
    ]
}

fn arb_plan() -> impl Strategy<Value = FragPlan> {
    (
        0u8..60,
        0u8..4,
        prop::option::weighted(0.15, any::<u8>()),
        prop::option::weighted(0.2, any::<u8>()),
    )
        .prop_map(|(unit, order, dup, drop)| FragPlan {
            unit,
            order,
            dup,
            drop,
        })
}

fn arb_action() -> impl Strategy<Value = Action> {
    prop_oneof![
        40 => (any::<u8>(), arb_pkt(), prop_oneof![20 => 0u8..200, 1 => 200u8..230, 1 => 230u8..=255], prop::option::weighted(0.25, arb_mutation()))
            .prop_map(|(who, pkt, via, mutation)| Action::FromClient { who, pkt, via, mutation }),
        25 => (arb_up(), prop::option::weighted(0.25, arb_mutation()))
            .prop_map(|(up, mutation)| Action::FromUplink { up, mutation }),
        4 => (any::<u8>(), arb_pkt(), arb_plan()).prop_map(|(who, pkt, plan)| Action::ClientFrags { who, pkt, plan }),
        3 => (arb_up(), arb_plan(), prop::option::weighted(0.3, any::<u8>()))
            .prop_map(|(up, plan, spoof)| Action::UplinkFrags { up, plan, spoof }),
        2 => (any::<u8>(), vec(any::<u8>(), 0..120)).prop_map(|(iface, bytes)| Action::Garbage { iface, bytes }),
        5 => prop_oneof![5 => 0u32..2_000, 1 => 25_000u32..200_000].prop_map(|ms| Action::Tick { ms }),
        4 => (any::<u8>(), prop::option::weighted(0.8, arb_ruleset(false)), prop::option::weighted(0.7, arb_ruleset(true)), prop::bool::weighted(0.25))
            .prop_map(|(who, rules4, rules6, toggle_ip6)| Action::Apply { who, rules4, rules6, toggle_ip6 }),
        1 => any::<u8>().prop_map(|who| Action::Unplug { who }),
        1 => Just(Action::Replug),
        3 => (any::<u8>(), prop::option::weighted(0.8, vec(any::<u8>(), 0..4)), 0u32..100)
            .prop_map(|(name, answer, ttl)| Action::Dns { name, answer, ttl }),
    ]
}

fn arb_scenario() -> impl Strategy<Value = Scenario> {
    (
        prop::bool::weighted(0.6),
        prop::sample::select(vec![1500u16, 1500, 1400, 1280, 576]),
        vec(arb_client(), 2..=MAX_CLIENTS),
        vec(arb_action(), 1..250),
    )
        .prop_map(|(uplink6, uplink_mtu, clients, actions)| Scenario {
            uplink6,
            uplink_mtu,
            clients,
            actions,
        })
}

// -------------------------------------------------------------------------------------------
// The model the oracle checks against

/// Where a frame or a fragment came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Uplink,
    /// A client, by its index in the scenario (not its interface id, which moves).
    Client(usize),
}

/// Why the engine emitted a batch of frames.
#[derive(Clone, Copy, Debug)]
enum Origin<'a> {
    /// `handle` of this frame, as it was before the call, on this interface.
    Input(Source, &'a [u8]),
    Tick,
    Control,
}

/// Protocol class of a flow, for matching replies: 6, 17, or 1 for ICMP (v4 and v6).
fn pclass(proto: u8) -> u8 {
    match proto {
        58 => 1,
        p => p,
    }
}

/// A flow as seen leaving on the uplink.
#[derive(Clone, Debug)]
struct Seen {
    proto: u8,
    remote: IpAddr,
    rport: u16,
    nat: u16,
    /// ICMP: the query type; 0 otherwise.
    qtype: u8,
    /// The IP packet as sent (for quoting in ICMP errors).
    packet: Vec<u8>,
}

/// Reply key (class, remote, remote port, NAT port) -> (client, client's port, ICMP query
/// type or 0).
type FlowMap = HashMap<(u8, IpAddr, u16, u16), (usize, u16, u8)>;
/// Datagram key (src, dst, id, proto) of IPv4 first fragments -> where they came from, with
/// their L4 ports when present.
type HeadMap = HashMap<(IpAddr, IpAddr, u16, u8), Vec<(Source, Option<(u16, u16)>)>>;

#[derive(Debug, Default, Clone)]
struct Stats {
    cases: u64,
    frames_in: u64,
    up_forwarded: u64,
    up_fragments: u64,
    down_replies: u64,
    errors_translated: u64,
    icmp_to_clients: u64,
    arp_ndp_answers: u64,
    v6_forwarded: u64,
    blocked_clients: u64,
    rules_changes: u64,
    frag_timeouts: u64,
    /// New-flow candidates whose verdict the rules alone decide, checked exactly.
    rule_checks: u64,
}

struct Model {
    specs: Vec<ClientSpec>,
    /// Scenario indices of the clients in the configuration, in vif order.
    present: Vec<usize>,
    /// The engine's interface id of each present client: stable while it is present, fresh
    /// (never reused) when it comes back, as the engine promises.
    ids: BTreeMap<usize, IfaceId>,
    next_id: IfaceId,
    uplink6: bool,
    uplink_mtu: u16,
    names: Names,
    flows: FlowMap,
    seen: Vec<Seen>,
    heads: HeadMap,
    stats: Stats,
}

/// IPv4 fragments emitted in one batch with the same (iface, src, dst, id, proto): the pieces
/// (offset, more fragments, payload), the Ethernet destination and source, and the first
/// piece's IP header.
type FragGroup = (
    (IfaceId, IpAddr, IpAddr, u16, u8),
    Vec<(usize, bool, Vec<u8>)>,
    Mac,
    Mac,
    Vec<u8>,
);

/// A logical IP packet the engine emitted (fragments reassembled).
#[derive(Debug)]
struct OutPkt {
    iface: IfaceId,
    eth_dst: Mac,
    eth_src: Mac,
    v6: bool,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    fragmented: bool,
    /// The whole IP packet (reassembled if it was fragmented).
    packet: Vec<u8>,
    l4: Vec<u8>,
}

/// A minimal view of an IP frame, written here (not the engine's parser): what the input was.
#[derive(Debug, Clone, Copy)]
struct InView {
    v6: bool,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    id: u16,
    fragment: bool,
    first_fragment: bool,
    /// (source port, destination port) or (ICMP id, ICMP type) when the L4 header is there.
    ports: Option<(u16, u16)>,
}

fn in_view(frame: &[u8]) -> Option<InView> {
    if frame.len() < 14 {
        return None;
    }
    let et = be16(frame, 12);
    let ip = frame.get(14..)?;
    let (v6, src, dst, proto, hlen, id, fragment, first, end) = match et {
        0x0800 => {
            let h = ip.get(..20)?;
            let hlen = usize::from(h[0] & 15) * 4;
            let total = usize::from(be16(h, 2));
            let fl = be16(h, 6);
            (
                false,
                IpAddr::from([h[12], h[13], h[14], h[15]]),
                IpAddr::from([h[16], h[17], h[18], h[19]]),
                h[9],
                hlen,
                be16(h, 4),
                fl & 0x3fff != 0,
                fl & 0x1fff == 0,
                total.min(ip.len()),
            )
        }
        0x86dd => {
            let h = ip.get(..40)?;
            let mut s = [0u8; 16];
            s.copy_from_slice(&h[8..24]);
            let mut d = [0u8; 16];
            d.copy_from_slice(&h[24..40]);
            let end = (40 + usize::from(be16(h, 4))).min(ip.len());
            (
                true,
                IpAddr::from(s),
                IpAddr::from(d),
                h[6],
                40,
                0,
                false,
                true,
                end,
            )
        }
        _ => return None,
    };
    let l4 = ip.get(hlen..end.max(hlen)).unwrap_or(&[]);
    let ports = if !first {
        None
    } else {
        match proto {
            6 | 17 if l4.len() >= 4 => Some((be16(l4, 0), be16(l4, 2))),
            1 | 58 if l4.len() >= 8 => Some((be16(l4, 4), u16::from(l4[0]))),
            // SCTP, DCCP, UDP-Lite: ports first; other protocols have none.
            132 | 33 | 136 if l4.len() >= 4 => Some((be16(l4, 0), be16(l4, 2))),
            132 | 33 | 136 | 1 | 6 | 17 | 58 => None,
            _ => Some((0, 0)),
        }
    };
    Some(InView {
        v6,
        src,
        dst,
        proto,
        id,
        fragment,
        first_fragment: first,
        ports,
    })
}

/// The reply type of an ICMP query type that opens a flow (echo, and for IPv4 timestamp,
/// information and address mask), or `None` when the type does not open flows.
fn query_reply(v6: bool, ty: u8) -> Option<u8> {
    match (v6, ty) {
        (true, 128) => Some(129),
        (false, 8) => Some(0),
        (false, 13 | 15 | 17) => Some(ty + 1),
        _ => None,
    }
}

fn is_query_reply(v6: bool, ty: u8) -> bool {
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

/// The packet quoted in an ICMP error message (after the 8-byte ICMP header).
fn quoted(l4: &[u8]) -> Option<InView> {
    let q = l4.get(8..)?;
    let mut f = vec![0u8; 14];
    let v6 = q.first().is_some_and(|b| b >> 4 == 6);
    put16(&mut f, 12, ethertype_of(v6));
    f.extend_from_slice(q);
    in_view(&f)
}

impl Model {
    fn new(sc: &Scenario) -> Self {
        Model {
            specs: sc.clients.clone(),
            present: (0..sc.clients.len()).collect(),
            ids: (0..sc.clients.len())
                .map(|i| (i, i as IfaceId + 1))
                .collect(),
            next_id: sc.clients.len() as IfaceId + 1,
            uplink6: sc.uplink6,
            uplink_mtu: sc.uplink_mtu,
            names: Names::default(),
            flows: HashMap::new(),
            seen: Vec::new(),
            heads: HashMap::new(),
            stats: Stats::default(),
        }
    }

    fn config(&self) -> EngineConfig {
        EngineConfig {
            mode: UplinkMode::Masquerade,
            client_gateway: None,
            client_gateway6: None,
            dns_redirect: Vec::new(),
            uplink: UplinkConfig {
                name: "eth0".into(),
                mac: OUR_MAC,
                ip: OUR_IP,
                gateway: NETVM_IP,
                ip6: self.uplink6.then_some(OUR_IP6),
                gateway6: self.uplink6.then_some(NETVM_IP6),
                mtu: self.uplink_mtu,
            },
            dns: DNS.iter().map(|&a| a.into()).collect(),
            clients: self
                .present
                .iter()
                .map(|&i| {
                    let s = &self.specs[i];
                    ClientConfig {
                        vif: format!("vif{}.0", i + 2),
                        ip: client_ip(i),
                        ip6: s.ip6.then(|| client_ip6(i)),
                        mac: client_mac(i),
                        mtu: 1500,
                        rules: s.rules4.entries(),
                        rules6: s.rules6.entries(),
                        visible: None,
                    }
                })
                .collect(),
            conntrack_max: 64,
            seed: 7,
            frag: FragLimits {
                max_bytes: 64 << 10,
                max_datagrams: 16,
                timeout_ns: 30_000_000_000,
            },
        }
    }

    fn iface_of(&self, spec: usize) -> Option<IfaceId> {
        self.ids.get(&spec).copied()
    }

    fn spec_of(&self, iface: IfaceId) -> Option<usize> {
        self.ids
            .iter()
            .find(|(_, &id)| id == iface)
            .map(|(&spec, _)| spec)
    }

    /// The client at position `at` of the vif list goes away.
    fn unplug(&mut self, at: usize) {
        let spec = self.present.remove(at);
        self.ids.remove(&spec);
    }

    /// Clients come (back), each with a fresh interface id.
    fn replug(&mut self, specs: Vec<usize>) {
        for spec in specs {
            self.present.push(spec);
            self.ids.insert(spec, self.next_id);
            self.next_id += 1;
        }
    }

    fn source_of(&self, iface: IfaceId) -> Option<Source> {
        if iface == UPLINK {
            Some(Source::Uplink)
        } else {
            self.spec_of(iface).map(Source::Client)
        }
    }

    fn addr4(&self, spec: usize) -> IpAddr {
        client_ip(spec).into()
    }

    fn addr6(&self, spec: usize) -> Option<IpAddr> {
        self.specs[spec].ip6.then(|| client_ip6(spec).into())
    }

    fn is_client_addr(&self, a: IpAddr) -> bool {
        self.present
            .iter()
            .any(|&i| self.addr4(i) == a || self.addr6(i) == Some(a))
    }

    fn our(&self, v6: bool) -> Option<IpAddr> {
        if v6 {
            self.uplink6.then_some(IpAddr::V6(OUR_IP6))
        } else {
            Some(IpAddr::V4(OUR_IP))
        }
    }

    // ---------------------------------------------------------------------------------------
    // Building frames for actions

    fn client_frame(&self, spec: usize, p: &Pkt) -> Vec<u8> {
        let mac = client_mac(spec);
        let other = (spec + 1) % self.specs.len();
        if let Kind::Arp(op, t, s) = p.kind {
            let tpa = match t % 5 {
                0 | 1 => OUR_IP,
                2 => client_ip(spec),
                3 => REMOTE4[usize::from(t) % REMOTE4.len()],
                _ => NETVM_IP,
            };
            let spa = match s % 12 {
                0 => Ipv4Addr::UNSPECIFIED,
                1 => client_ip(other),
                _ => client_ip(spec),
            };
            return eth([0xff; 6], mac, 0x0806, &arp(op, mac, spa, [0; 6], tpa));
        }
        let v6 = p.v6;
        let src: IpAddr = match (p.src, v6) {
            (1, false) => client_ip(other).into(),
            (1, true) => client_ip6(other).into(),
            (2, false) => REMOTE4[0].into(),
            (2, true) => REMOTE6[0].into(),
            (_, false) => client_ip(spec).into(),
            (_, true) => client_ip6(spec).into(),
        };
        if let Kind::NdpNs(t, s, hop255) = p.kind {
            let target = match t % 5 {
                0 | 1 => OUR_IP6,
                2 => client_ip6(spec),
                3 => Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1),
                _ => REMOTE6[0],
            };
            let src: Ipv6Addr = match s % 6 {
                0 => client_ll6(spec),
                1 => Ipv6Addr::UNSPECIFIED,
                _ => client_ip6(spec),
            };
            let t16 = target.segments();
            let dst = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00 | (t16[6] & 0xff), t16[7]);
            let mut body = target.octets().to_vec();
            body.extend_from_slice(&[1, 1]);
            body.extend_from_slice(&mac);
            let m = icmp_msg(src.into(), dst.into(), 135, 0, [0; 4], &body);
            let hop = if hop255 { 255 } else { 64 };
            return eth(GATEWAY_MAC, mac, 0x86dd, &ipv6(src, dst, 58, hop, &m));
        }
        let dst: IpAddr = if v6 {
            dst6(p.dst).into()
        } else {
            dst4(p.dst).into()
        };
        let data = payload_bytes(usize::from(p.payload), p.dst);
        let (proto, l4) = match p.kind {
            Kind::Tcp(flags) => (6, tcp_seg(src, dst, p.sport, p.dport, flags, &data)),
            Kind::Udp(no_csum) => (17, udp_dgram(src, dst, p.sport, p.dport, &data, no_csum)),
            Kind::Echo => {
                // Mostly echo; for IPv4 also timestamp, information and address mask requests.
                let ty = if v6 {
                    128
                } else {
                    [8u8, 8, 8, 13, 15, 17][usize::from(p.id) % 6]
                };
                let mut rest = [0u8; 4];
                rest[..2].copy_from_slice(&p.sport.to_be_bytes());
                rest[2..].copy_from_slice(&p.id.to_be_bytes());
                (
                    if v6 { 58 } else { 1 },
                    icmp_msg(src, dst, ty, 0, rest, &data),
                )
            }
            Kind::IcmpOther(ty, code) => (
                if v6 { 58 } else { 1 },
                icmp_msg(src, dst, ty, code, [0; 4], &data),
            ),
            Kind::V6Frag => {
                let inner = udp_dgram(src, dst, p.sport, p.dport, &data, false);
                let mut fh = vec![17, 0, 0, 0];
                fh.extend_from_slice(&u32::from(p.id).to_be_bytes());
                fh.extend_from_slice(&inner);
                (44, fh)
            }
            Kind::Other(n) => (n, data.clone()),
            Kind::Arp(..) | Kind::NdpNs(..) => unreachable!("handled above"),
        };
        let (proto, l4) = if !v6 && proto == 44 {
            (17, udp_dgram(src, dst, p.sport, p.dport, &data, false))
        } else {
            (proto, l4)
        };
        let ip = with_options(ip_packet(src, dst, proto, p.ttl, p.df, p.id, &l4), p.opts);
        eth(GATEWAY_MAC, mac, ethertype_of(v6), &ip)
    }

    /// A frame from the uplink, or `None` when it needs a seen flow and there is none.
    fn uplink_frame(&self, up: &Up) -> Option<Vec<u8>> {
        let ip = match up {
            Up::Reply {
                flow,
                flags,
                payload,
                ttl,
                df,
            } => {
                let s = self.seen.get(usize::from(*flow) % self.seen.len().max(1))?;
                let our = self.our(s.remote.is_ipv6())?;
                let data = payload_bytes(usize::from(*payload), *flags);
                let l4 = match s.proto {
                    6 => tcp_seg_from_remote(s.remote, our, s.rport, s.nat, *flags, &data),
                    17 => udp_dgram(s.remote, our, s.rport, s.nat, &data, false),
                    132 | 33 | 136 => {
                        let mut l4 = data.clone();
                        l4.resize(l4.len().max(8), 0);
                        l4[..2].copy_from_slice(&s.rport.to_be_bytes());
                        l4[2..4].copy_from_slice(&s.nat.to_be_bytes());
                        l4
                    }
                    p if !matches!(p, 1 | 58) => data.clone(),
                    _ => {
                        let v6 = s.remote.is_ipv6();
                        let matching = query_reply(v6, s.qtype).unwrap_or(0);
                        // Now and then a reply of another query type with the flow's id.
                        let ty = match (v6, flags % 5) {
                            (false, 0) => [0u8, 14, 16, 18][usize::from(*flags / 5) % 4],
                            _ => matching,
                        };
                        let mut rest = [0u8; 4];
                        rest[..2].copy_from_slice(&s.nat.to_be_bytes());
                        icmp_msg(s.remote, our, ty, 0, rest, &data)
                    }
                };
                let proto = match (s.proto, s.remote.is_ipv6()) {
                    (1 | 58, true) => 58,
                    (1 | 58, false) => 1,
                    (p, _) => p,
                };
                ip_packet(s.remote, our, proto, *ttl, *df, u16::from(*flags), &l4)
            }
            Up::Error {
                flow,
                ty,
                code,
                quote,
                router,
            } => {
                let s = self.seen.get(usize::from(*flow) % self.seen.len().max(1))?;
                let v6 = s.remote.is_ipv6();
                let our = self.our(v6)?;
                let from: IpAddr = match (router, v6) {
                    (true, false) => Ipv4Addr::new(203, 0, 113, 254).into(),
                    (true, true) => Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1).into(),
                    (false, _) => s.remote,
                };
                let min = if v6 { 48 } else { 28 };
                let q = &s.packet[..usize::from(*quote)
                    .clamp(min, s.packet.len().max(min))
                    .min(s.packet.len())];
                let (t, c) = if v6 {
                    match ty {
                        3 => (1, *code % 7),
                        11 => (3, 0),
                        _ => (2, 0),
                    }
                } else {
                    (*ty, *code)
                };
                let mut rest = [0u8; 4];
                if (v6 && t == 2) || (!v6 && t == 3 && c == 4) {
                    rest[2..].copy_from_slice(&1280u16.to_be_bytes());
                }
                let l4 = icmp_msg(from, our, t, c, rest, q);
                ip_packet(from, our, if v6 { 58 } else { 1 }, 60, false, 99, &l4)
            }
            Up::Unsolicited {
                v6,
                src,
                proto,
                dport,
                to_client,
            } => {
                let v6 = *v6 && self.uplink6;
                let src: IpAddr = if v6 {
                    dst6(*src).into()
                } else {
                    dst4(*src).into()
                };
                let dst: IpAddr = match (to_client, v6) {
                    (true, false) => client_ip(0).into(),
                    (true, true) => client_ip6(0).into(),
                    (false, v6) => self.our(v6)?,
                };
                let data = payload_bytes(20, 1);
                let (p, l4) = match proto {
                    6 => (6, tcp_seg(src, dst, 443, *dport, 0x02, &data)),
                    17 => (17, udp_dgram(src, dst, 53, *dport, &data, false)),
                    _ if v6 => (58, icmp_msg(src, dst, 128, 0, [0, 1, 0, 1], &data)),
                    _ => (1, icmp_msg(src, dst, 8, 0, [0, 1, 0, 1], &data)),
                };
                ip_packet(src, dst, p, 60, false, 7, &l4)
            }
            Up::Arp { op, spa, tpa } => {
                let spa = if spa % 4 == 0 { REMOTE4[0] } else { NETVM_IP };
                let tpa = match tpa % 4 {
                    0 => client_ip(0),
                    1 => NETVM_IP,
                    _ => OUR_IP,
                };
                let tha = if *op == 2 { OUR_MAC } else { [0; 6] };
                return Some(eth(
                    [0xff; 6],
                    NETVM_MAC,
                    0x0806,
                    &arp(*op, NETVM_MAC, spa, tha, tpa),
                ));
            }
            Up::Ndp { advert, target } => {
                if !self.uplink6 {
                    return None;
                }
                let (ty, tgt, opt) = if *advert {
                    (136, NETVM_IP6, 2)
                } else if target % 3 == 0 {
                    (135, client_ip6(0), 1)
                } else {
                    (135, OUR_IP6, 1)
                };
                let mut body = tgt.octets().to_vec();
                body.extend_from_slice(&[opt, 1]);
                body.extend_from_slice(&NETVM_MAC);
                let rest = if *advert { [0x60, 0, 0, 0] } else { [0; 4] };
                let dst = Ipv6Addr::new(
                    0xff02,
                    0,
                    0,
                    0,
                    0,
                    1,
                    0xff00 | (tgt.segments()[6] & 0xff),
                    tgt.segments()[7],
                );
                let m = icmp_msg(NETVM_IP6.into(), dst.into(), ty, 0, rest, &body);
                return Some(eth(
                    OUR_MAC,
                    NETVM_MAC,
                    0x86dd,
                    &ipv6(NETVM_IP6, dst, 58, 255, &m),
                ));
            }
        };
        let v6 = ip.first().is_some_and(|b| b >> 4 == 6);
        Some(eth(OUR_MAC, NETVM_MAC, ethertype_of(v6), &ip))
    }

    /// Whether a present client's rules (of a family that parses) name `dsthost` `n`.
    fn name_in_use(&self, n: u8) -> bool {
        let uses = |rs: &RuleSet| {
            rs.valid_entries()
                .any(|r| matches!(r.dst, Some(RDst::Host(h)) if h % 2 == n % 2))
        };
        self.present.iter().any(|&i| {
            let s = &self.specs[i];
            (s.rules4.valid(false) && uses(&s.rules4))
                || (s.ip6 && s.rules6.valid(true) && uses(&s.rules6))
        })
    }

    /// Whether this (unmutated) packet from a present client is a TCP segment with a flag
    /// combination no TCP sends, which conntrack calls invalid whatever the rules say.
    fn invalid_expectation(&self, spec: usize, p: &Pkt) -> bool {
        let Kind::Tcp(f) = p.kind else { return false };
        p.src == 0
            && p.ttl > 1
            && p.dst < 220
            && (!p.v6 || (self.uplink6 && self.specs[spec].ip6))
            && !tcp_valid_flags(f)
    }

    /// Whether the client's rules accept this (unmutated) packet, when it is one whose fate
    /// the rules alone decide: from the client's own address to a remote address, TTL above
    /// 1, TCP, UDP or an ICMP query, IPv6 only where both sides have it. `None` otherwise.
    fn rule_expectation(&self, spec: usize, p: &Pkt) -> Option<bool> {
        if p.src != 0 || p.ttl <= 1 || p.dst >= 220 {
            return None;
        }
        if p.v6 && !(self.uplink6 && self.specs[spec].ip6) {
            return None;
        }
        let dst: IpAddr = if p.v6 {
            dst6(p.dst).into()
        } else {
            dst4(p.dst).into()
        };
        let (proto, port) = match p.kind {
            // Only a SYN or an ACK (loose pickup) can open a flow; the rest are invalid
            // before any rule sees them, or belong to a flow that may exist.
            Kind::Tcp(f) if !tcp_opens_flow(f) => return None,
            Kind::Tcp(_) => (P::Tcp, p.dport),
            Kind::Udp(_) => (P::Udp, p.dport),
            Kind::Echo => {
                let ty = if p.v6 {
                    128
                } else {
                    [8u8, 8, 8, 13, 15, 17][usize::from(p.id) % 6]
                };
                (P::Icmp, u16::from(ty))
            }
            _ => return None,
        };
        Some(self.specs[spec].accepts(&self.names, proto, dst, port))
    }

    // ---------------------------------------------------------------------------------------
    // Feeding the engine

    fn feed(
        &mut self,
        e: &mut Engine,
        out: &mut Outbox,
        now: u64,
        iface: IfaceId,
        mut frame: Vec<u8>,
    ) -> Result<(), String> {
        self.stats.frames_in += 1;
        let orig = frame.clone();
        let from = self.source_of(iface);
        if let (Some(v), Some(f)) = (in_view(&orig), from) {
            if v.fragment && v.first_fragment && !v.v6 {
                self.heads
                    .entry((v.src, v.dst, v.id, v.proto))
                    .or_default()
                    .push((f, v.ports));
            }
        }
        out.clear();
        let verdict = catch_unwind(AssertUnwindSafe(|| {
            e.handle(Instant::from_nanos(now), iface, &mut frame, out)
        }))
        .map_err(|p| {
            format!(
                "engine panicked in handle: {}\n  input on iface {iface}: {}",
                panic_text(&p),
                hex(&orig)
            )
        })?;
        let mut emitted: Vec<(IfaceId, Vec<u8>, bool)> = Vec::new();
        if let Verdict::Forward(to) = verdict {
            if frame.len() != orig.len() {
                return Err("forwarded frame changed length".into());
            }
            emitted.push((to, frame, true));
        }
        emitted.extend(out.frames().map(|(i, f)| (i, f.to_vec(), false)));
        let origin = match from {
            Some(f) => Origin::Input(f, &orig),
            // Unknown interface: nothing may come out.
            None => {
                return if emitted.is_empty() {
                    Ok(())
                } else {
                    Err(format!("frame on unknown iface {iface} produced output"))
                };
            }
        };
        self.check(origin, &emitted).map_err(|m| {
            format!(
                "{m}\n  input on iface {iface}: {}\n  verdict {verdict:?}",
                hex(&orig)
            )
        })
    }

    fn tick(&mut self, e: &mut Engine, out: &mut Outbox, now: u64) -> Result<(), String> {
        out.clear();
        catch_unwind(AssertUnwindSafe(|| e.tick(Instant::from_nanos(now), out)))
            .map_err(|p| format!("engine panicked in tick: {}", panic_text(&p)))?;
        let emitted: Vec<(IfaceId, Vec<u8>, bool)> =
            out.frames().map(|(i, f)| (i, f.to_vec(), false)).collect();
        self.check(Origin::Tick, &emitted)
    }

    fn control_output(&mut self, out: &Outbox) -> Result<(), String> {
        let emitted: Vec<(IfaceId, Vec<u8>, bool)> =
            out.frames().map(|(i, f)| (i, f.to_vec(), false)).collect();
        self.check(Origin::Control, &emitted)
    }

    // ---------------------------------------------------------------------------------------
    // The oracle

    /// Checks one batch of emitted frames.
    fn check(
        &mut self,
        origin: Origin<'_>,
        emitted: &[(IfaceId, Vec<u8>, bool)],
    ) -> Result<(), String> {
        let mut pkts: Vec<OutPkt> = Vec::new();
        let mut frags: Vec<FragGroup> = Vec::new();
        for (iface, frame, _) in emitted {
            let iface = *iface;
            if iface != UPLINK && self.spec_of(iface).is_none() {
                return Err(format!(
                    "frame sent on iface {iface}, which does not exist: {}",
                    hex(frame)
                ));
            }
            let ctx = |m: String| format!("{m}\n  emitted on iface {iface}: {}", hex(frame));
            let e = Ethernet2Slice::from_slice_without_fcs(frame)
                .map_err(|x| ctx(format!("bad Ethernet: {x}")))?;
            let mut eth_dst = [0u8; 6];
            eth_dst.copy_from_slice(&frame[0..6]);
            let mut eth_src = [0u8; 6];
            eth_src.copy_from_slice(&frame[6..12]);
            let payload = e.payload().payload;
            match e.ether_type().0 {
                0x0806 => {
                    let a = ArpPacketSlice::from_slice(payload)
                        .map_err(|x| ctx(format!("bad ARP: {x}")))?;
                    self.check_arp(origin, iface, &eth_src, &eth_dst, &a)
                        .map_err(ctx)?;
                }
                0x0800 => {
                    let ip = Ipv4Slice::from_slice(payload)
                        .map_err(|x| ctx(format!("bad IPv4: {x}")))?;
                    let h = ip.header();
                    if h.to_header().calc_header_checksum() != h.header_checksum() {
                        return Err(ctx("IPv4 header checksum wrong".into()));
                    }
                    if h.ttl() == 0 {
                        return Err(ctx("TTL 0 sent".into()));
                    }
                    let (src, dst) = (
                        IpAddr::V4(h.source_addr()),
                        IpAddr::V4(h.destination_addr()),
                    );
                    let proto = h.protocol().0;
                    let body = ip.payload().payload.to_vec();
                    let hdr = h.slice().to_vec();
                    if h.is_fragmenting_payload() {
                        let key = (iface, src, dst, h.identification(), proto);
                        let off = usize::from(h.fragments_offset().value()) * 8;
                        let piece = (off, h.more_fragments(), body);
                        match frags.iter_mut().find(|g| g.0 == key) {
                            Some(g) => g.1.push(piece),
                            None => frags.push((key, vec![piece], eth_dst, eth_src, hdr)),
                        }
                        continue;
                    }
                    let mut packet = hdr;
                    packet.extend_from_slice(&body);
                    pkts.push(OutPkt {
                        iface,
                        eth_dst,
                        eth_src,
                        v6: false,
                        src,
                        dst,
                        proto,
                        fragmented: false,
                        packet,
                        l4: body,
                    });
                }
                0x86dd => {
                    let ip = Ipv6Slice::from_slice(payload)
                        .map_err(|x| ctx(format!("bad IPv6: {x}")))?;
                    let h = ip.header();
                    if h.hop_limit() == 0 {
                        return Err(ctx("hop limit 0 sent".into()));
                    }
                    if !ip.extensions().is_empty() {
                        return Err(ctx("IPv6 extension headers sent".into()));
                    }
                    let body = ip.payload().payload.to_vec();
                    let mut packet = h.slice().to_vec();
                    packet.extend_from_slice(&body);
                    pkts.push(OutPkt {
                        iface,
                        eth_dst,
                        eth_src,
                        v6: true,
                        src: IpAddr::V6(h.source_addr()),
                        dst: IpAddr::V6(h.destination_addr()),
                        proto: h.next_header().0,
                        fragmented: false,
                        packet,
                        l4: body,
                    });
                }
                t => return Err(ctx(format!("unexpected ethertype {t:#06x}"))),
            }
        }
        for ((iface, src, dst, _, proto), mut pieces, eth_dst, eth_src, hdr) in frags {
            pieces.sort_by_key(|p| p.0);
            let mut body = Vec::new();
            let mut complete = false;
            for (off, more, data) in &pieces {
                if *off != body.len() {
                    return Err(format!(
                        "fragments emitted on iface {iface} leave a gap or overlap at {off} ({} bytes before)",
                        body.len()
                    ));
                }
                body.extend_from_slice(data);
                complete = !more;
            }
            if !complete {
                return Err(format!(
                    "fragments emitted on iface {iface} without the last one"
                ));
            }
            let mut packet = hdr;
            let hl = packet.len();
            packet.extend_from_slice(&body);
            let total = packet.len() as u16;
            put16(&mut packet, 2, total);
            put16(&mut packet, 6, 0);
            packet[10] = 0;
            packet[11] = 0;
            let c = !fold(sum16(&packet[..hl], 0));
            put16(&mut packet, 10, c);
            self.stats.up_fragments += u64::from(iface == UPLINK);
            pkts.push(OutPkt {
                iface,
                eth_dst,
                eth_src,
                v6: false,
                src,
                dst,
                proto,
                fragmented: true,
                packet,
                l4: body,
            });
        }
        for p in &pkts {
            check_l4(p)
                .map_err(|m| format!("{m}\n  packet on iface {}: {}", p.iface, hex(&p.packet)))?;
            let r = if p.iface == UPLINK {
                self.check_uplink(origin, p)
            } else {
                self.check_client(origin, p)
            };
            r.map_err(|m| format!("{m}\n  packet on iface {}: {}", p.iface, hex(&p.packet)))?;
        }
        Ok(())
    }

    fn check_arp(
        &mut self,
        origin: Origin<'_>,
        iface: IfaceId,
        eth_src: &Mac,
        eth_dst: &Mac,
        a: &ArpPacketSlice<'_>,
    ) -> Result<(), String> {
        let spa = a.sender_protocol_addr();
        let sha = a.sender_hw_addr();
        if iface == UPLINK {
            if sha != OUR_MAC || spa != OUR_IP.octets() || *eth_src != OUR_MAC {
                return Err("ARP on the uplink not from our MAC and address".into());
            }
            if a.operation() != ArpOperation::REQUEST && a.operation() != ArpOperation::REPLY {
                return Err("odd ARP operation on the uplink".into());
            }
            return Ok(());
        }
        let spec = self.spec_of(iface).ok_or("ARP to no client")?;
        if !matches!(origin, Origin::Input(Source::Client(s), _) if s == spec) {
            return Err("ARP to a client that did not ask".into());
        }
        if a.operation() != ArpOperation::REPLY
            || sha != GATEWAY_MAC
            || a.target_hw_addr() != client_mac(spec)
            || a.target_protocol_addr() != client_ip(spec).octets()
            || *eth_dst != client_mac(spec)
        {
            return Err("ARP to a client is not a reply to it from fe:ff:ff:ff:ff:ff".into());
        }
        self.stats.arp_ndp_answers += 1;
        Ok(())
    }

    fn check_uplink(&mut self, origin: Origin<'_>, p: &OutPkt) -> Result<(), String> {
        let Some(our) = self.our(p.v6) else {
            return Err("IPv6 on the uplink without an IPv6 address".into());
        };
        if p.src != our {
            return Err(format!("source {} on the uplink is not ours (NAT)", p.src));
        }
        if p.eth_src != OUR_MAC {
            return Err("uplink frame not from our MAC".into());
        }
        let icmp = (p.proto == 1 && !p.v6) || (p.proto == 58 && p.v6);
        let ty = if icmp { p.l4.first().copied() } else { None };
        if let Some(ty) = ty.filter(|&t| is_icmp_error(p.v6, t)) {
            if self.is_client_addr(p.dst) || p.dst == our {
                return Err("ICMP error sent to a client address on the uplink".into());
            }
            let q = quoted(&p.l4).ok_or("ICMP error without a quoted packet")?;
            if q.src != p.dst {
                return Err("ICMP error to someone other than the quoted packet's source".into());
            }
            let frag_timeout = !p.v6 && ty == 11 && p.l4.get(1) == Some(&1) && p.src == our;
            if frag_timeout {
                let froms = self.heads.get(&(q.src, q.dst, q.id, q.proto));
                if !froms.is_some_and(|v| v.iter().any(|(f, _)| *f == Source::Uplink)) {
                    return Err(format!(
                        "fragment timeout on the uplink quotes a datagram that did not come from the uplink (came from {froms:?})"
                    ));
                }
                self.stats.frag_timeouts += 1;
                return Ok(());
            }
            if q.dst != our {
                return Err("ICMP error on the uplink quotes a packet not addressed to us".into());
            }
            if let Origin::Input(Source::Client(spec), _) = origin {
                // A client's error about a packet it got through one of its flows: the quote
                // must be that flow's reply, as it came in, our address and NAT port.
                let (qs, qd) = q.ports.ok_or("client ICMP error forwarded without ports")?;
                let rport = if matches!(q.proto, 1 | 58) { 0 } else { qs };
                let owned = self
                    .flows
                    .get(&(pclass(q.proto), q.src, rport, qd))
                    .is_some_and(|v| v.0 == spec);
                if !owned {
                    return Err(format!(
                        "client {spec}'s ICMP error forwarded about a flow it does not own"
                    ));
                }
                self.stats.errors_translated += 1;
                return Ok(());
            }
            if !matches!(origin, Origin::Input(Source::Uplink, _)) {
                return Err(format!("ICMP error on the uplink caused by {origin:?}"));
            }
            return Ok(());
        }
        if p.v6 && ty == Some(136) {
            if !matches!(origin, Origin::Input(Source::Uplink, _)) {
                return Err("neighbour advert on the uplink not answering the uplink".into());
            }
            self.stats.arp_ndp_answers += 1;
            return Ok(());
        }
        // What is left must be a client's traffic, forwarded and NATed.
        let Origin::Input(Source::Client(spec), input) = origin else {
            return Err(format!(
                "IP packet on the uplink from {origin:?}: only clients' traffic may go out"
            ));
        };
        let iv = in_view(input).ok_or("forwarded a client frame that is not IP")?;
        let own = if iv.v6 {
            self.addr6(spec)
        } else {
            Some(self.addr4(spec))
        };
        if Some(iv.src) != own {
            return Err(format!(
                "forwarded a frame from client {spec} with source {} (spoofed)",
                iv.src
            ));
        }
        if iv.dst != p.dst || pclass(iv.proto) != pclass(p.proto) {
            return Err(
                "forwarded packet's destination or protocol differs from the client's".into(),
            );
        }
        let (proto, port, rport, nat) = match p.proto {
            6 | 17 if p.l4.len() >= 4 => (
                if p.proto == 6 { P::Tcp } else { P::Udp },
                be16(&p.l4, 2),
                be16(&p.l4, 2),
                be16(&p.l4, 0),
            ),
            1 | 58 if p.l4.len() >= 8 => {
                if query_reply(p.v6, p.l4[0]).is_none() {
                    return Err(format!("forwarded ICMP type {} from a client", p.l4[0]));
                }
                (P::Icmp, u16::from(p.l4[0]), 0, be16(&p.l4, 4))
            }
            1 | 58 | 6 | 17 => return Err(format!("forwarded a short {} packet", p.proto)),
            132 | 33 | 136 if p.l4.len() >= 4 => (P::Other, 0, be16(&p.l4, 2), be16(&p.l4, 0)),
            132 | 33 | 136 => return Err(format!("forwarded a short {} packet", p.proto)),
            _ => (P::Other, 0, 0, 0),
        };
        if !self.specs[spec].accepts(&self.names, proto, p.dst, port) {
            return Err(format!(
                "client {spec} sent {proto:?} to {} port/type {port}, which its rules refuse\n  rules4 {:?}\n  rules6 {:?}\n  names {:?}",
                p.dst,
                self.specs[spec].rules4.entries(),
                self.specs[spec].rules6.entries(),
                self.names
            ));
        }
        // The client's own port (or query id): from this frame, or from its first fragment.
        let client_port = match iv.ports {
            Some((sport, _)) if !iv.fragment && proto == P::Other => {
                // Generic tracking never translates ports.
                if sport != nat {
                    return Err("a generically tracked protocol's port was translated".into());
                }
                Some(sport)
            }
            Some((sport, dport)) if !iv.fragment => {
                if dport != port {
                    return Err("forwarded destination port differs from the client's".into());
                }
                Some(sport)
            }
            _ => self
                .heads
                .get(&(iv.src, iv.dst, iv.id, iv.proto))
                .and_then(|v| v.iter().rev().find(|(f, _)| *f == Source::Client(spec)))
                .and_then(|(_, ports)| ports.map(|p| p.0)),
        };
        let qtype = if proto == P::Icmp { p.l4[0] } else { 0 };
        if let Some(cp) = client_port {
            self.flows
                .insert((pclass(p.proto), p.dst, rport, nat), (spec, cp, qtype));
        }
        self.stats.up_forwarded += 1;
        self.stats.v6_forwarded += u64::from(p.v6);
        if self.seen.len() >= 64 {
            self.seen.remove(0);
        }
        self.seen.push(Seen {
            proto: p.proto,
            remote: p.dst,
            rport,
            nat,
            qtype,
            packet: p.packet.clone(),
        });
        Ok(())
    }

    fn check_client(&mut self, origin: Origin<'_>, p: &OutPkt) -> Result<(), String> {
        let spec = self.spec_of(p.iface).ok_or("no such client")?;
        if p.eth_dst != client_mac(spec) || p.eth_src != GATEWAY_MAC {
            return Err("frame to a client not addressed to its MAC from fe:ff:ff:ff:ff:ff".into());
        }
        let own = if p.v6 {
            self.addr6(spec)
        } else {
            Some(self.addr4(spec))
        };
        let icmp = (p.proto == 1 && !p.v6) || (p.proto == 58 && p.v6);
        let ty = if icmp { p.l4.first().copied() } else { None };
        let advert = p.v6 && ty == Some(136);
        let ll = matches!(p.dst, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80);
        if Some(p.dst) != own && !(advert && (ll || p.dst == IpAddr::V6(client_ll6(spec)))) {
            return Err(format!("packet to {} sent to client {spec}", p.dst));
        }
        let error = ty.filter(|&t| is_icmp_error(p.v6, t));
        // Fragment timeout: about a datagram this client sent.
        if !p.v6 && ty == Some(11) && p.l4.get(1) == Some(&1) && p.src == IpAddr::V4(OUR_IP) {
            let q = quoted(&p.l4).ok_or("ICMP error without a quote")?;
            let froms = self.heads.get(&(q.src, q.dst, q.id, q.proto));
            if !froms.is_some_and(|v| v.iter().any(|(f, _)| *f == Source::Client(spec))) {
                return Err(format!(
                    "fragment timeout sent to client {spec} about a datagram it did not send (from {froms:?})"
                ));
            }
            self.stats.frag_timeouts += 1;
            return Ok(());
        }
        match origin {
            Origin::Input(Source::Client(s), _) => {
                if s != spec {
                    return Err(format!(
                        "client {s}'s frame produced a packet to client {spec}"
                    ));
                }
                let ours = self.our(p.v6);
                let echo_reply = ty == Some(if p.v6 { 129 } else { 0 });
                if advert {
                    self.stats.arp_ndp_answers += 1;
                    Ok(())
                } else if (error.is_some() || echo_reply) && Some(p.src) == ours {
                    self.stats.icmp_to_clients += 1;
                    Ok(())
                } else {
                    Err(
                        "a client's frame produced something other than an answer from the gateway"
                            .into(),
                    )
                }
            }
            Origin::Input(Source::Uplink, input) => {
                if error.is_some() {
                    // A translated error about one of this client's flows.
                    let q = quoted(&p.l4).ok_or("ICMP error without a quote")?;
                    if Some(q.src) != own {
                        return Err("translated ICMP error quotes another source".into());
                    }
                    let (qsport, qdport) = q.ports.ok_or("translated ICMP error without ports")?;
                    let rport = if q.proto == 6 || q.proto == 17 {
                        qdport
                    } else {
                        0
                    };
                    let ok = self.flows.iter().any(|(k, v)| {
                        k.0 == pclass(q.proto)
                            && k.1 == q.dst
                            && k.2 == rport
                            && (v.0, v.1) == (spec, qsport)
                    });
                    if !ok {
                        return Err(format!(
                            "ICMP error about a flow client {spec} never opened"
                        ));
                    }
                    self.stats.errors_translated += 1;
                    return Ok(());
                }
                let (rport, cport) = match p.proto {
                    6 | 17 if p.l4.len() >= 4 => (be16(&p.l4, 0), be16(&p.l4, 2)),
                    1 | 58 if p.l4.len() >= 8 && is_query_reply(p.v6, p.l4[0]) => {
                        (0, be16(&p.l4, 4))
                    }
                    1 | 58 | 6 | 17 => {
                        return Err("something other than a reply came in from the uplink".into())
                    }
                    132 | 33 | 136 if p.l4.len() >= 4 => (be16(&p.l4, 0), be16(&p.l4, 2)),
                    132 | 33 | 136 => return Err("a short SCTP/DCCP/UDP-Lite reply".into()),
                    _ => (0, 0),
                };
                let iv = in_view(input).ok_or("uplink input not IP")?;
                let owner = match (iv.fragment, iv.ports) {
                    (false, Some((sport, dport))) => {
                        let (rp, nat) = if matches!(p.proto, 1 | 58) {
                            (0, sport)
                        } else {
                            (sport, dport)
                        };
                        self.flows.get(&(pclass(p.proto), p.src, rp, nat)).copied()
                    }
                    _ => self
                        .flows
                        .iter()
                        .find(|(k, v)| {
                            k.0 == pclass(p.proto)
                                && k.1 == p.src
                                && k.2 == rport
                                && v.0 == spec
                                && v.1 == cport
                        })
                        .map(|(_, v)| *v),
                };
                // An ICMP reply must answer the query that opened the flow (conntrack's ICMP
                // tuple has the type): an echo flow lets only echo replies back.
                let want = |q: u8| {
                    if matches!(p.proto, 1 | 58) {
                        query_reply(p.v6, q) == ty
                    } else {
                        true
                    }
                };
                match owner {
                    Some((o, port, q)) if o == spec && port == cport && want(q) => {
                        self.stats.down_replies += 1;
                        Ok(())
                    }
                    Some((o, port, q)) if o == spec && port == cport => Err(format!(
                        "ICMP type {} delivered to client {spec} through a flow its type {q} \
                         query opened (only type {:?} answers it)",
                        p.l4[0],
                        query_reply(p.v6, q)
                    )),
                    other => Err(format!(
                        "reply delivered to client {spec} port {cport}, but the flow belongs to {other:?}"
                    )),
                }
            }
            Origin::Tick | Origin::Control => {
                Err(format!("{origin:?} sent a packet to client {spec}"))
            }
        }
    }
}

/// The transport checksum of an emitted packet.
fn check_l4(p: &OutPkt) -> Result<(), String> {
    let ok = |acc: u64| fold(sum16(&p.l4, acc)) == 0xffff;
    let good = match (p.proto, p.v6) {
        (6, _) => p.l4.len() >= 20 && ok(pseudo(p.src, p.dst, 6, p.l4.len())),
        (17, v6) => {
            p.l4.len() >= 8
                && usize::from(be16(&p.l4, 4)) == p.l4.len()
                && ((!v6 && be16(&p.l4, 6) == 0) || ok(pseudo(p.src, p.dst, 17, p.l4.len())))
        }
        (1, false) => p.l4.len() >= 8 && ok(0),
        (58, true) => p.l4.len() >= 8 && ok(pseudo(p.src, p.dst, 58, p.l4.len())),
        (1 | 58, _) => false,
        // Tracked generically: nothing of theirs is checked or changed but the addresses.
        _ => true,
    };
    if good {
        Ok(())
    } else {
        Err(format!(
            "transport checksum (or length) wrong in emitted {} packet{}",
            p.proto,
            if p.fragmented {
                " (reassembled from fragments)"
            } else {
                ""
            }
        ))
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn mutate(frame: &mut Vec<u8>, m: &Mutation) {
    let n = frame.len().max(1);
    match m {
        Mutation::Flip(pos, bit) => {
            if let Some(b) = frame.get_mut(usize::from(*pos) % n) {
                *b ^= 1 << bit;
            }
        }
        Mutation::Truncate(len) => frame.truncate(usize::from(*len) % n),
        Mutation::Extend(bytes) => frame.extend_from_slice(bytes),
        Mutation::Overwrite(pos, bytes) => {
            let at = usize::from(*pos) % n;
            for (i, b) in bytes.iter().enumerate() {
                if let Some(x) = frame.get_mut(at + i) {
                    *x = *b;
                }
            }
        }
        Mutation::Ethertype(t) => {
            if frame.len() >= 14 {
                put16(frame, 12, *t);
            }
        }
        Mutation::IpLen(v) => {
            if frame.len() >= 34 && be16(frame, 12) == 0x0800 {
                put16(frame, 16, *v);
                put16(frame, 24, 0);
                let hl = (usize::from(frame[14] & 15) * 4).clamp(20, frame.len() - 14);
                let c = !fold(sum16(&frame[14..14 + hl], 0));
                put16(frame, 24, c);
            } else if frame.len() >= 54 && be16(frame, 12) == 0x86dd {
                put16(frame, 18, *v);
            }
        }
        Mutation::L4Len(v) => {
            let at = if be16(frame, 12) == 0x86dd { 54 } else { 34 };
            let proto = if at == 54 {
                frame.get(20)
            } else {
                frame.get(23)
            };
            match proto {
                Some(17) if frame.len() >= at + 6 => put16(frame, at + 4, *v),
                Some(6) if frame.len() >= at + 13 => frame[at + 12] = *v as u8,
                _ => {}
            }
        }
    }
}

fn order_pieces(mut pieces: Vec<Vec<u8>>, plan: &FragPlan) -> Vec<Vec<u8>> {
    match plan.order {
        1 => pieces.reverse(),
        2 if !pieces.is_empty() => pieces.rotate_left(1),
        3 if pieces.len() > 1 => {
            let first = pieces.remove(0);
            pieces.push(first);
        }
        _ => {}
    }
    if let Some(d) = plan.dup {
        if let Some(p) = pieces.get(usize::from(d) % pieces.len().max(1)).cloned() {
            pieces.push(p);
        }
    }
    if let Some(d) = plan.drop {
        if pieces.len() > 1 {
            pieces.remove(usize::from(d) % pieces.len());
        }
    }
    pieces
}

// -------------------------------------------------------------------------------------------
// Running a scenario

fn run(sc: &Scenario) -> Result<Stats, String> {
    let mut m = Model::new(sc);
    let mut e = Engine::new(m.config()).map_err(|x| format!("config refused: {x}"))?;
    let mut out = Outbox::new();
    let mut now: u64 = 1_000_000_000;
    m.stats.blocked_clients = m.specs.iter().filter(|s| s.blocked()).count() as u64;
    for (step, a) in sc.actions.iter().enumerate() {
        now += 1_000_000;
        let r = step_action(&mut m, &mut e, &mut out, &mut now, a);
        r.map_err(|msg| format!("step {step} ({a:?}):\n  {msg}"))?;
    }
    m.stats.cases = 1;
    Ok(m.stats)
}

fn step_action(
    m: &mut Model,
    e: &mut Engine,
    out: &mut Outbox,
    now: &mut u64,
    a: &Action,
) -> Result<(), String> {
    let nspecs = m.specs.len();
    match a {
        Action::FromClient {
            who,
            pkt,
            via,
            mutation,
        } => {
            let spec = usize::from(*who) % nspecs;
            let mut frame = m.client_frame(spec, pkt);
            if let Some(mu) = mutation {
                mutate(&mut frame, mu);
            }
            let iface = match via {
                0..=199 => m.iface_of(spec).unwrap_or(MAX_CLIENTS as IfaceId + 1),
                200..=229 => UPLINK,
                _ => m
                    .iface_of((spec + 1) % nspecs)
                    .unwrap_or(MAX_CLIENTS as IfaceId + 1),
            };
            // For an intact new-flow candidate the verdict is known exactly: rejected by rule
            // if and only if the client's rules refuse it.
            let expect = if mutation.is_none() && *via < 200 && m.present.contains(&spec) {
                m.rule_expectation(spec, pkt)
            } else {
                None
            };
            let expect_invalid = mutation.is_none()
                && *via < 200
                && m.present.contains(&spec)
                && m.invalid_expectation(spec, pkt);
            let count = |e: &Engine, r: Reason| e.counters(iface).map_or(0, |c| c.get(r));
            let (rej0, full0, inv0) = (
                count(e, Reason::RejectedByRule),
                count(e, Reason::TableFull),
                count(e, Reason::Invalid),
            );
            m.feed(e, out, *now, iface, frame)?;
            if expect_invalid && count(e, Reason::Invalid) == inv0 {
                return Err(format!(
                    "TCP flags {:#04x} are invalid in any state, but the engine did not count \
                     the segment invalid",
                    match pkt.kind {
                        Kind::Tcp(f) => f,
                        _ => 0,
                    }
                ));
            }
            let rejected = count(e, Reason::RejectedByRule) > rej0;
            m.stats.rule_checks += u64::from(expect.is_some());
            let full = count(e, Reason::TableFull) > full0;
            match expect {
                Some(accept) if !full && accept == rejected => Err(format!(
                    "the rules {} this packet but the engine {} it\n  rules4 {:?}\n  rules6 {:?}\n  names {:?}",
                    if accept { "accept" } else { "refuse" },
                    if rejected { "rejected" } else { "did not reject" },
                    m.specs[spec].rules4.entries(),
                    m.specs[spec].rules6.entries(),
                    m.names
                )),
                _ => Ok(()),
            }
        }
        Action::FromUplink { up, mutation } => {
            let Some(mut frame) = m.uplink_frame(up) else {
                return Ok(());
            };
            if let Some(mu) = mutation {
                mutate(&mut frame, mu);
            }
            m.feed(e, out, *now, UPLINK, frame)
        }
        Action::ClientFrags { who, pkt, plan } => {
            let spec = usize::from(*who) % nspecs;
            let mut p = pkt.clone();
            p.v6 = false;
            if matches!(p.kind, Kind::Arp(..) | Kind::NdpNs(..) | Kind::V6Frag) {
                p.kind = Kind::Udp(false);
            }
            p.payload = p.payload.max(16);
            p.opts = 0;
            let frame = m.client_frame(spec, &p);
            let Some(ip) = frame.get(14..) else {
                return Ok(());
            };
            let pieces = fragment4(ip, 8 * (usize::from(plan.unit) + 1));
            let iface = m.iface_of(spec).unwrap_or(MAX_CLIENTS as IfaceId + 1);
            for piece in order_pieces(pieces, plan) {
                *now += 1000;
                let f = eth(GATEWAY_MAC, client_mac(spec), 0x0800, &piece);
                m.feed(e, out, *now, iface, f)?;
            }
            Ok(())
        }
        Action::UplinkFrags { up, plan, spoof } => {
            let Some(frame) = m.uplink_frame(up) else {
                return Ok(());
            };
            if be16(&frame, 12) != 0x0800 || frame.len() < 34 {
                return Ok(());
            }
            let mut ip = frame[14..].to_vec();
            if let Some(s) = spoof {
                // A source that is a client's (or ours): the engine must not act on its behalf.
                let a = if s % 4 == 0 {
                    OUR_IP
                } else {
                    client_ip(usize::from(*s) % nspecs)
                };
                ip[12..16].copy_from_slice(&a.octets());
                put16(&mut ip, 10, 0);
                let c = !fold(sum16(&ip[..20], 0));
                put16(&mut ip, 10, c);
            }
            // Clear DF so the datagram may be fragmented.
            ip[6] &= !0x40;
            put16(&mut ip, 10, 0);
            let c = !fold(sum16(&ip[..20], 0));
            put16(&mut ip, 10, c);
            let pieces = fragment4(&ip, 8 * (usize::from(plan.unit) + 1));
            for piece in order_pieces(pieces, plan) {
                *now += 1000;
                let f = eth(OUR_MAC, NETVM_MAC, 0x0800, &piece);
                m.feed(e, out, *now, UPLINK, f)?;
            }
            Ok(())
        }
        Action::Garbage { iface, bytes } => {
            let iface = IfaceId::from(*iface % (MAX_CLIENTS as u8 + 2));
            m.feed(e, out, *now, iface, bytes.clone())
        }
        Action::Tick { ms } => {
            *now += u64::from(*ms) * 1_000_000;
            // The engine forgets answers for names no client's rules use (it asks again when
            // a rule needs one).
            for n in 0..NAMES.len() {
                if !m.name_in_use(n as u8) {
                    m.names.0[n] = None;
                }
            }
            m.tick(e, out, *now)
        }
        Action::Apply {
            who,
            rules4,
            rules6,
            toggle_ip6,
        } => {
            let spec = usize::from(*who) % nspecs;
            {
                let s = &mut m.specs[spec];
                // `None`: that family's rules stay as they are.
                if let Some(r) = rules4 {
                    s.rules4 = r.clone();
                }
                if let Some(r) = rules6 {
                    s.rules6 = r.clone();
                }
                if *toggle_ip6 {
                    s.ip6 = !s.ip6;
                }
            }
            m.stats.rules_changes += 1;
            out.clear();
            e.apply(Instant::from_nanos(*now), m.config(), out)
                .map_err(|x| format!("apply refused: {x}"))?;
            if m.present.contains(&spec)
                && m.specs[spec].blocked() != e.blocked(m.iface_of(spec).unwrap_or(0)).is_some()
            {
                return Err(format!(
                    "client {spec} blocked: engine {:?}, model {}; rules {:?} / {:?}",
                    e.blocked(m.iface_of(spec).unwrap_or(0)),
                    m.specs[spec].blocked(),
                    m.specs[spec].rules4.entries(),
                    m.specs[spec].rules6.entries()
                ));
            }
            let o = std::mem::take(out);
            let r = m.control_output(&o);
            *out = o;
            r
        }
        Action::Unplug { who } => {
            if m.present.len() <= 1 {
                return Ok(());
            }
            let at = usize::from(*who) % m.present.len();
            m.unplug(at);
            out.clear();
            e.apply(Instant::from_nanos(*now), m.config(), out)
                .map_err(|x| format!("apply refused: {x}"))?;
            let o = std::mem::take(out);
            let r = m.control_output(&o);
            *out = o;
            r
        }
        Action::Replug => {
            let missing: Vec<usize> = (0..nspecs).filter(|i| !m.present.contains(i)).collect();
            if missing.is_empty() {
                return Ok(());
            }
            m.replug(missing);
            out.clear();
            e.apply(Instant::from_nanos(*now), m.config(), out)
                .map_err(|x| format!("apply refused: {x}"))?;
            let o = std::mem::take(out);
            let r = m.control_output(&o);
            *out = o;
            r
        }
        Action::Dns { name, answer, ttl } => {
            let n = usize::from(*name) % NAMES.len();
            let addrs: Option<Vec<IpAddr>> = answer
                .as_ref()
                .map(|v| v.iter().map(|&s| any_addr(s)).collect());
            m.names.0[n] = addrs.clone().filter(|v| !v.is_empty());
            out.clear();
            e.dns_answer(
                Instant::from_nanos(*now),
                NAMES[n],
                addrs.map(|a| (a, *ttl)),
                out,
            );
            let o = std::mem::take(out);
            let r = m.control_output(&o);
            *out = o;
            r
        }
    }
}

// -------------------------------------------------------------------------------------------
// The tests

/// Fixed seed: the same 256 scenarios on every run.
const SEED: [u8; 32] = *b"sys-firewall engine_prop seed 01";

/// A number from the environment, for deeper runs by hand (module docs).
fn env_knob(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn random_and_mutated_frames_never_leak() {
    let config = Config {
        cases: env_knob("ENGINE_PROP_CASES").map_or(256, |n| n as u32),
        failure_persistence: None,
        max_shrink_iters: 2048,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(
        config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &{
            let mut seed = SEED;
            if let Some(n) = env_knob("ENGINE_PROP_SEED") {
                seed[24..].copy_from_slice(&n.to_le_bytes());
            }
            seed
        }),
    );
    let total = RefCell::new(Stats::default());
    let result = runner.run(&arb_scenario(), |sc| {
        let s = run(&sc).map_err(TestCaseError::fail)?;
        let mut t = total.borrow_mut();
        t.cases += s.cases;
        t.frames_in += s.frames_in;
        t.up_forwarded += s.up_forwarded;
        t.up_fragments += s.up_fragments;
        t.down_replies += s.down_replies;
        t.errors_translated += s.errors_translated;
        t.icmp_to_clients += s.icmp_to_clients;
        t.arp_ndp_answers += s.arp_ndp_answers;
        t.v6_forwarded += s.v6_forwarded;
        t.blocked_clients += s.blocked_clients;
        t.rules_changes += s.rules_changes;
        t.frag_timeouts += s.frag_timeouts;
        t.rule_checks += s.rule_checks;
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let t = total.into_inner();
    eprintln!("engine_prop: {t:?}");
    // The checks above only mean something if the paths were taken.
    assert!(t.up_forwarded > 500, "too little forwarded to judge: {t:?}");
    assert!(t.down_replies > 100, "too few replies: {t:?}");
    assert!(
        t.errors_translated > 5,
        "too few translated ICMP errors: {t:?}"
    );
    assert!(t.up_fragments > 5, "too few fragmented packets: {t:?}");
    assert!(t.v6_forwarded > 50, "too little IPv6: {t:?}");
    assert!(t.icmp_to_clients > 100 && t.arp_ndp_answers > 50, "{t:?}");
    assert!(t.rule_checks > 1000, "too few exact rule verdicts: {t:?}");
}

// -------------------------------------------------------------------------------------------
// Minimal cases for what the property test found

/// One client (10.137.0.10 on iface 1, accept all), no IPv6.
fn small_engine() -> (Model, Engine) {
    small_engine_with(
        false,
        RuleSet {
            entries: Vec::new(),
            policy: Some(true),
        },
    )
}

/// Two clients (10.137.0.10 on iface 1, 10.137.0.11 on iface 2) without IPv6, accepting all
/// IPv4, with `rules6` as their IPv6 rules; IPv6 on the uplink if `uplink6`.
fn small_engine_with(uplink6: bool, rules6: RuleSet) -> (Model, Engine) {
    let all = RuleSet {
        entries: Vec::new(),
        policy: Some(true),
    };
    let sc = Scenario {
        uplink6,
        uplink_mtu: 1500,
        clients: vec![
            ClientSpec {
                ip6: false,
                rules4: all.clone(),
                rules6: rules6.clone(),
            },
            ClientSpec {
                ip6: false,
                rules4: all,
                rules6,
            },
        ],
        actions: Vec::new(),
    };
    let m = Model::new(&sc);
    let e = Engine::new(m.config()).expect("engine");
    (m, e)
}

/// The first of several fragments of a UDP datagram `src` -> `dst`.
fn first_fragment(src: Ipv4Addr, dst: Ipv4Addr, eth_dst: Mac, eth_src: Mac) -> Vec<u8> {
    let l4 = udp_dgram(
        src.into(),
        dst.into(),
        40000,
        53,
        &payload_bytes(64, 3),
        false,
    );
    let ip = ipv4(src, dst, 17, 64, 0x1234, false, true, 0, &l4[..32]);
    eth(eth_dst, eth_src, 0x0800, &ip)
}

fn frames_of(out: &Outbox) -> Vec<(IfaceId, String)> {
    out.frames().map(|(i, f)| (i, hex(f))).collect()
}

/// Found by the property test: the uplink sends the first fragment of a datagram whose source
/// is a client's address (spoofed) and never the rest. When reassembly times out the engine
/// sends ICMP time exceeded (11/1) quoting it INTO that client's vif: traffic from the uplink
/// reaching a client without any flow, with 20+ attacker-chosen bytes (the engine drops
/// complete datagrams with that source as spoofed, but not incomplete ones).
#[test]
fn uplink_fragment_with_a_client_source_is_not_answered_into_the_client() {
    let (_, mut e) = small_engine();
    let mut out = Outbox::new();
    let mut f = first_fragment(client_ip(0), OUR_IP, OUR_MAC, NETVM_MAC);
    assert_eq!(
        e.handle(Instant::from_nanos(1_000_000_000), UPLINK, &mut f, &mut out),
        Verdict::Consumed
    );
    out.clear();
    e.tick(Instant::from_nanos(32_000_000_000), &mut out);
    let to_client: Vec<_> = frames_of(&out)
        .into_iter()
        .filter(|(i, _)| *i != UPLINK)
        .collect();
    assert!(
        to_client.is_empty(),
        "a spoofed fragment from the uplink made the engine send {to_client:?} to a client"
    );
}

/// Found by the property test: the same with our own address as the source: the engine sends
/// an ICMP error from our address to our address out of the uplink (Linux never sends ICMP
/// errors to a local address, nor on conntrack defragmentation timeouts).
#[test]
fn uplink_fragment_with_our_source_is_not_answered_to_ourselves() {
    let (_, mut e) = small_engine();
    let mut out = Outbox::new();
    let mut f = first_fragment(OUR_IP, OUR_IP, OUR_MAC, NETVM_MAC);
    assert_eq!(
        e.handle(Instant::from_nanos(1_000_000_000), UPLINK, &mut f, &mut out),
        Verdict::Consumed
    );
    out.clear();
    e.tick(Instant::from_nanos(32_000_000_000), &mut out);
    let sent = frames_of(&out);
    assert!(
        sent.is_empty(),
        "the engine sent {sent:?} for a fragment from our own address"
    );
}

/// Found by the property test: a client sends the first fragment of a datagram and is then
/// unplugged (or changes address). When reassembly times out the engine no longer finds the
/// source among the clients and sends the ICMP error, quoting up to 548 bytes of the client's
/// datagram, OUT OF THE UPLINK: client data leaves without any rule having accepted it.
#[test]
fn fragment_of_a_departed_client_is_not_quoted_to_the_uplink() {
    let (mut m, mut e) = small_engine();
    let mut out = Outbox::new();
    let mut f = first_fragment(client_ip(0), REMOTE4[0], GATEWAY_MAC, client_mac(0));
    assert_eq!(
        e.handle(Instant::from_nanos(1_000_000_000), 1, &mut f, &mut out),
        Verdict::Consumed
    );
    m.unplug(0);
    out.clear();
    e.apply(Instant::from_nanos(2_000_000_000), m.config(), &mut out)
        .expect("apply");
    out.clear();
    e.tick(Instant::from_nanos(32_000_000_000), &mut out);
    let up: Vec<_> = frames_of(&out)
        .into_iter()
        .filter(|(i, _)| *i == UPLINK)
        .collect();
    assert!(
        up.is_empty(),
        "a departed client's fragment was quoted to the uplink: {up:?}"
    );
}

/// Found by the property test: an ICMP flow lets back a reply of any query type, not only the
/// reply to the query that opened it. A client's timestamp request (type 13) opens a flow; an
/// echo reply (type 0) from the uplink with the flow's NAT id then reaches the client. Linux
/// conntrack's ICMP tuple has the type (the reply tuple of a timestamp request is type 14), so
/// there it matches no flow and is dropped.
#[test]
fn icmp_flow_lets_back_only_its_own_reply_type() {
    let (_, mut e) = small_engine();
    let mut out = Outbox::new();
    let (c, r) = (IpAddr::V4(client_ip(0)), IpAddr::V4(REMOTE4[0]));
    let req = icmp_msg(c, r, 13, 0, [0x12, 0x34, 0, 1], &[0; 12]);
    let mut f = eth(
        GATEWAY_MAC,
        client_mac(0),
        0x0800,
        &ip_packet(c, r, 1, 64, false, 1, &req),
    );
    assert_eq!(
        e.handle(Instant::from_nanos(1_000_000_000), 1, &mut f, &mut out),
        Verdict::Forward(UPLINK)
    );
    let nat = be16(&f, 14 + 20 + 4);
    let our = IpAddr::V4(OUR_IP);
    let mut rest = [0u8; 4];
    rest[..2].copy_from_slice(&nat.to_be_bytes());
    // The right reply type comes back ...
    let ok = icmp_msg(r, our, 14, 0, rest, &[0; 12]);
    let mut f = eth(
        OUR_MAC,
        NETVM_MAC,
        0x0800,
        &ip_packet(r, our, 1, 60, false, 2, &ok),
    );
    out.clear();
    assert_eq!(
        e.handle(Instant::from_nanos(1_001_000_000), UPLINK, &mut f, &mut out),
        Verdict::Forward(1)
    );
    // ... but an echo reply, which answers no request the client made, must not.
    let wrong = icmp_msg(r, our, 0, 0, rest, &[0; 12]);
    let mut f = eth(
        OUR_MAC,
        NETVM_MAC,
        0x0800,
        &ip_packet(r, our, 1, 60, false, 3, &wrong),
    );
    out.clear();
    let v = e.handle(Instant::from_nanos(1_002_000_000), UPLINK, &mut f, &mut out);
    assert_eq!(
        v,
        Verdict::Consumed,
        "an echo reply reached the client through a timestamp flow"
    );
}

/// A TCP SYN from client 0 (scenario index) to `dst` on iface 1.
fn syn_from_client0(dst: IpAddr) -> Vec<u8> {
    let src: IpAddr = if dst.is_ipv6() {
        client_ip6(0).into()
    } else {
        client_ip(0).into()
    };
    let t = tcp_seg(src, dst, 40000, 443, 0x02, &[]);
    let ip = ip_packet(src, dst, 6, 64, false, 1, &t);
    eth(GATEWAY_MAC, client_mac(0), ethertype_of(dst.is_ipv6()), &ip)
}

/// Found by the property test: a client that gains an IPv6 address while its rules stay the
/// same is not recompiled (`install` recompiles only when the rule entries change), so its
/// IPv6 classifier stays the empty one built while it had no IPv6 address: its IPv6 rules are
/// ignored and every IPv6 flow is refused until its rules change.
#[test]
fn client_gaining_ipv6_gets_its_ipv6_rules() {
    let accept_all = RuleSet {
        entries: Vec::new(),
        policy: Some(true),
    };
    let (mut m, mut e) = small_engine_with(true, accept_all);
    let mut out = Outbox::new();
    m.specs[0].ip6 = true;
    e.apply(Instant::from_nanos(1_000_000_000), m.config(), &mut out)
        .expect("apply");
    let mut f = syn_from_client0(REMOTE6[0].into());
    out.clear();
    let v = e.handle(Instant::from_nanos(1_001_000_000), 1, &mut f, &mut out);
    assert_eq!(
        v,
        Verdict::Forward(UPLINK),
        "IPv6 rules `policy=accept` refused a new IPv6 flow (counters {:?})",
        e.counters(1)
            .map(|c| c.iter().filter(|(_, n)| *n > 0).collect::<Vec<_>>())
    );
}

/// Found by the property test: the same path with IPv6 rules that do not parse. The client
/// gains an IPv6 address, its `/qubes-firewall/<ip6>/` entries are refused by the agent's
/// reading, yet the client is not blocked (docs/engine.md: "rules that do not parse: the
/// client is blocked entirely (both families)") and its IPv4 flows keep being accepted.
#[test]
fn client_gaining_ipv6_with_unparseable_ipv6_rules_is_blocked() {
    let broken = RuleSet {
        entries: vec![(0, Entry::Broken(0))],
        policy: Some(false),
    };
    let (mut m, mut e) = small_engine_with(true, broken);
    let mut out = Outbox::new();
    assert!(
        e.blocked(1).is_none(),
        "no IPv6 address yet: its IPv6 rules are not read"
    );
    m.specs[0].ip6 = true;
    e.apply(Instant::from_nanos(1_000_000_000), m.config(), &mut out)
        .expect("apply");
    assert!(
        e.blocked(1).is_some(),
        "client with unparseable IPv6 rules {:?} not blocked",
        m.specs[0].rules6.entries()
    );
    let mut f = syn_from_client0(REMOTE4[0].into());
    out.clear();
    assert_eq!(
        e.handle(Instant::from_nanos(1_001_000_000), 1, &mut f, &mut out),
        Verdict::Consumed
    );
}

// -------------------------------------------------------------------------------------------
// The oracle itself: it must catch what it is there to catch

/// Client 0's TCP SYN to 198.18.0.1, forwarded by an engine accepting everything: the frame
/// before and after.
fn forwarded_syn() -> (Model, Vec<u8>, Vec<u8>) {
    let (m, mut e) = small_engine();
    let mut out = Outbox::new();
    let input = syn_from_client0(REMOTE4[0].into());
    let mut f = input.clone();
    assert_eq!(
        e.handle(Instant::from_nanos(1_000_000_000), 1, &mut f, &mut out),
        Verdict::Forward(UPLINK)
    );
    (m, input, f)
}

#[test]
fn oracle_accepts_a_correct_forward() {
    let (mut m, input, out) = forwarded_syn();
    let r = m.check(
        Origin::Input(Source::Client(0), &input),
        &[(UPLINK, out, true)],
    );
    assert_eq!(r, Ok(()));
}

#[test]
fn oracle_catches_a_forward_the_rules_refuse() {
    let (mut m, input, out) = forwarded_syn();
    m.specs[0].rules4 = RuleSet {
        entries: Vec::new(),
        policy: Some(false),
    };
    let r = m.check(
        Origin::Input(Source::Client(0), &input),
        &[(UPLINK, out, true)],
    );
    assert!(r.is_err_and(|e| e.contains("rules refuse")));
}

#[test]
fn oracle_catches_missing_nat_bad_checksums_and_leaks() {
    let (mut m, input, out) = forwarded_syn();
    // Not NATed: the client's frame as it came.
    let r = m.check(
        Origin::Input(Source::Client(0), &input),
        &[(UPLINK, input.clone(), true)],
    );
    assert!(r.is_err_and(|e| e.contains("not ours")));
    // A transport checksum off by one.
    let mut bad = out.clone();
    bad[14 + 20 + 17] ^= 1;
    let r = m.check(
        Origin::Input(Source::Client(0), &input),
        &[(UPLINK, bad, true)],
    );
    assert!(r.is_err_and(|e| e.contains("checksum")));
    // The same packet claimed to come from the uplink, or from a tick.
    let r = m.check(
        Origin::Input(Source::Uplink, &input),
        &[(UPLINK, out.clone(), true)],
    );
    assert!(r.is_err());
    let r = m.check(Origin::Tick, &[(UPLINK, out.clone(), false)]);
    assert!(r.is_err());
    // Client 0's frame coming out on client 1's vif.
    let r = m.check(Origin::Input(Source::Client(0), &input), &[(2, out, false)]);
    assert!(r.is_err());
}

#[test]
fn oracle_catches_a_reply_to_the_wrong_client() {
    let (mut m, input, out) = forwarded_syn();
    m.check(
        Origin::Input(Source::Client(0), &input),
        &[(UPLINK, out.clone(), true)],
    )
    .expect("correct forward");
    let nat = be16(&out, 34);
    let (r, our) = (IpAddr::V4(REMOTE4[0]), IpAddr::V4(OUR_IP));
    let reply = eth(
        OUR_MAC,
        NETVM_MAC,
        0x0800,
        &ip_packet(
            r,
            our,
            6,
            60,
            false,
            5,
            &tcp_seg_from_remote(r, our, 443, nat, 0x12, &[]),
        ),
    );
    // What the engine should deliver to client 0, and the same delivered to client 1.
    let c0 = IpAddr::V4(client_ip(0));
    let good = eth(
        client_mac(0),
        GATEWAY_MAC,
        0x0800,
        &ip_packet(
            r,
            c0,
            6,
            59,
            false,
            5,
            &tcp_seg_from_remote(r, c0, 443, 40000, 0x12, &[]),
        ),
    );
    let r1 = m.check(Origin::Input(Source::Uplink, &reply), &[(1, good, true)]);
    assert_eq!(r1, Ok(()));
    let c1 = IpAddr::V4(client_ip(1));
    let wrong = eth(
        client_mac(1),
        GATEWAY_MAC,
        0x0800,
        &ip_packet(
            r,
            c1,
            6,
            59,
            false,
            5,
            &tcp_seg_from_remote(r, c1, 443, 40000, 0x12, &[]),
        ),
    );
    let r2 = m.check(Origin::Input(Source::Uplink, &reply), &[(2, wrong, true)]);
    assert!(r2.is_err_and(|e| e.contains("belongs to")));
}
