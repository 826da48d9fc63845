//! Decoding frames into the words of the expectations language.
//!
//! A decoded frame is a set of kind words (`arp`, `ipv4`, `tcp`, ...) and `key value` fields, in
//! the order `describe` prints them; the expectations checker matches predicates against the same
//! structure, so a description can be pasted into an expect.txt as is.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{ArpOperation, ArpPacket, Ethernet2Header, Ipv4Header, Ipv6Header, TcpHeader};
use qubes_engine::config::format_mac;

/// A decoded frame (or, for `inner`, the packet quoted in an ICMP error).
#[derive(Debug, Clone, Default)]
pub struct Decoded {
    pub kinds: Vec<&'static str>,
    pub fields: Vec<(&'static str, String)>,
    /// The packet quoted by an ICMP error.
    pub inner: Option<Box<Decoded>>,
    /// What is wrong with the frame (lengths, checksums); empty for a good frame.
    pub problems: Vec<String>,
    /// Where the IP packet starts and ends in the frame (for quoting it in ICMP errors).
    pub ip_range: Option<(usize, usize)>,
}

impl Decoded {
    pub fn has(&self, kind: &str) -> bool {
        self.kinds.contains(&kind)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn ip(&self, key: &str) -> Option<IpAddr> {
        self.get(key).and_then(|v| v.parse().ok())
    }

    pub fn num(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(|v| v.parse().ok())
    }

    fn kind(&mut self, k: &'static str) {
        self.kinds.push(k);
    }

    fn field(&mut self, k: &'static str, v: impl ToString) {
        self.fields.push((k, v.to_string()));
    }

    /// The one-line description: kinds, fields, then `inner` and the quoted packet's.
    pub fn describe(&self) -> String {
        let mut s: Vec<String> = self.kinds.iter().map(|k| k.to_string()).collect();
        for (k, v) in &self.fields {
            s.push(format!("{k} {v}"));
        }
        if let Some(i) = &self.inner {
            s.push("inner".into());
            s.push(i.describe());
        }
        for p in &self.problems {
            s.push(format!("[{p}]"));
        }
        s.join(" ")
    }
}

/// The Internet checksum of `data` added to `sum`.
pub fn checksum(data: &[u8], mut sum: u32) -> u16 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u32::from(*b) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut sum = 0u32;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            add(&s.octets());
            add(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            add(&s.octets());
            add(&d.octets());
        }
        _ => {}
    }
    sum + u32::from(proto) + len as u32
}

/// The transport checksum a packet should carry (computed with its checksum field zeroed).
pub fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, seg: &[u8], csum_at: usize) -> u16 {
    let mut copy = seg.to_vec();
    if copy.len() >= csum_at + 2 {
        copy[csum_at] = 0;
        copy[csum_at + 1] = 0;
    }
    let pseudo = if proto == 1 {
        0
    } else {
        pseudo_sum(src, dst, proto, seg.len())
    };
    checksum(&copy, pseudo)
}

fn mac(b: &[u8]) -> String {
    let mut m = [0u8; 6];
    m.copy_from_slice(&b[..6]);
    format_mac(&m)
}

/// TCP flags in a fixed order (F S R P A U E C), as expectations write them.
pub fn tcp_flags(h: &TcpHeader) -> String {
    let mut s = String::new();
    for (on, c) in [
        (h.fin, 'F'),
        (h.syn, 'S'),
        (h.rst, 'R'),
        (h.psh, 'P'),
        (h.ack, 'A'),
        (h.urg, 'U'),
        (h.ece, 'E'),
        (h.cwr, 'C'),
    ] {
        if on {
            s.push(c);
        }
    }
    if s.is_empty() {
        s.push('-');
    }
    s
}

/// Puts flag letters in the canonical order; `None` for anything else.
pub fn canonical_flags(s: &str) -> Option<String> {
    if s == "-" {
        return Some(s.to_string());
    }
    if s.is_empty() || !s.chars().all(|c| "FSRPAUEC".contains(c)) {
        return None;
    }
    Some("FSRPAUEC".chars().filter(|c| s.contains(*c)).collect())
}

/// Decodes an Ethernet frame.
pub fn decode(frame: &[u8]) -> Decoded {
    let mut d = Decoded::default();
    let (eth, payload) = match Ethernet2Header::from_slice(frame) {
        Ok(x) => x,
        Err(_) => {
            d.kind("malformed");
            d.field("len", frame.len());
            d.problems
                .push(format!("truncated Ethernet header ({} bytes)", frame.len()));
            return d;
        }
    };
    d.field("smac", format_mac(&eth.source));
    d.field("dmac", format_mac(&eth.destination));
    match eth.ether_type.0 {
        0x0806 => decode_arp(&mut d, payload),
        0x0800 | 0x86dd => {
            d.ip_range = Some((14, frame.len()));
            decode_ip(&mut d, payload, false, 14);
        }
        t => {
            d.kind("other");
            d.field("ethertype", format!("0x{t:04x}"));
        }
    }
    d.field("len", frame.len());
    d
}

fn decode_arp(d: &mut Decoded, p: &[u8]) {
    d.kind("arp");
    let arp = match ArpPacket::from_slice(p).map(|a| a.try_eth_ipv4()) {
        Ok(Ok(a)) => a,
        _ => {
            d.kind("malformed");
            d.problems.push("not an Ethernet/IPv4 ARP packet".into());
            return;
        }
    };
    if arp.operation == ArpOperation::REQUEST {
        d.kind("arp-request");
        d.field("op", "request");
    } else if arp.operation == ArpOperation::REPLY {
        d.kind("arp-reply");
        d.field("op", "reply");
    } else {
        d.field("op", arp.operation.0);
    }
    d.field("sha", format_mac(&arp.sender_mac));
    d.field("spa", Ipv4Addr::from(arp.sender_ipv4));
    d.field("tha", format_mac(&arp.target_mac));
    d.field("tpa", Ipv4Addr::from(arp.target_ipv4));
}

/// Decodes an IP packet. `quoted`: the packet is quoted in an ICMP error, so it may be cut short
/// and its checksums are not checked. `at`: its offset in the frame.
fn decode_ip(d: &mut Decoded, p: &[u8], quoted: bool, at: usize) {
    match p.first().map(|b| b >> 4) {
        Some(4) => decode_ipv4(d, p, quoted, at),
        Some(6) => decode_ipv6(d, p, quoted, at),
        _ => {
            d.kind("malformed");
            d.problems.push("not an IP packet".into());
        }
    }
}

fn decode_ipv4(d: &mut Decoded, p: &[u8], quoted: bool, at: usize) {
    d.kind("ipv4");
    let (h, _) = match Ipv4Header::from_slice(p) {
        Ok(x) => x,
        Err(e) => {
            d.kind("malformed");
            d.problems.push(format!("bad IPv4 header: {e}"));
            return;
        }
    };
    let src = IpAddr::V4(Ipv4Addr::from(h.source));
    let dst = IpAddr::V4(Ipv4Addr::from(h.destination));
    d.field("src", src);
    d.field("dst", dst);
    d.field("ttl", h.time_to_live);
    d.field("id", h.identification);
    d.field("df", if h.dont_fragment { "yes" } else { "no" });
    d.field("iplen", h.total_len);
    let hl = h.header_len();
    if !quoted {
        let stored = u16::from_be_bytes([p[10], p[11]]);
        if h.calc_header_checksum() != stored {
            d.problems.push("bad IPv4 header checksum".into());
        }
    }
    let total = usize::from(h.total_len);
    let end = if total > p.len() {
        if !quoted {
            d.problems.push(format!(
                "IPv4 total length {total} but only {} bytes",
                p.len()
            ));
        }
        p.len()
    } else {
        if !quoted {
            if let Some((s, _)) = d.ip_range {
                d.ip_range = Some((s, at + total));
            }
        }
        total
    };
    let proto: u8 = h.protocol.into();
    let off = h.fragment_offset.byte_offset();
    let fragment = h.more_fragments || off != 0;
    if fragment {
        d.kind("fragment");
        d.field("mf", if h.more_fragments { "yes" } else { "no" });
        d.field("fragoff", off);
    }
    let body = if hl <= end { &p[hl..end] } else { &[][..] };
    if off != 0 {
        d.field("proto", proto);
        d.field("paylen", body.len());
        return;
    }
    let check = !quoted && !fragment;
    decode_l4(d, proto, src, dst, body, check, quoted, false);
}

fn decode_ipv6(d: &mut Decoded, p: &[u8], quoted: bool, at: usize) {
    d.kind("ipv6");
    let (h, _) = match Ipv6Header::from_slice(p) {
        Ok(x) => x,
        Err(e) => {
            d.kind("malformed");
            d.problems.push(format!("bad IPv6 header: {e}"));
            return;
        }
    };
    let src = IpAddr::V6(Ipv6Addr::from(h.source));
    let dst = IpAddr::V6(Ipv6Addr::from(h.destination));
    d.field("src", src);
    d.field("dst", dst);
    d.field("hlim", h.hop_limit);
    let total = 40 + usize::from(h.payload_length);
    d.field("iplen", total);
    let end = if total > p.len() {
        if !quoted {
            d.problems.push(format!(
                "IPv6 payload length {} but only {} bytes",
                h.payload_length,
                p.len() - 40
            ));
        }
        p.len()
    } else {
        if !quoted {
            if let Some((s, _)) = d.ip_range {
                d.ip_range = Some((s, at + total));
            }
        }
        total
    };
    let proto: u8 = h.next_header.into();
    decode_l4(d, proto, src, dst, &p[40..end], !quoted, quoted, true);
}

#[allow(clippy::too_many_arguments)]
fn decode_l4(
    d: &mut Decoded,
    proto: u8,
    src: IpAddr,
    dst: IpAddr,
    seg: &[u8],
    check: bool,
    quoted: bool,
    v6: bool,
) {
    let be16 = |at: usize| -> Option<u16> {
        seg.get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    let be32 = |at: usize| -> Option<u32> {
        seg.get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let bad_sum = |d: &mut Decoded, what: &str, at: usize| {
        if check {
            let stored = be16(at).unwrap_or(0);
            let want = l4_checksum(src, dst, proto, seg, at);
            if stored != want && !(proto == 17 && !v6 && stored == 0) {
                d.problems.push(format!(
                    "bad {what} checksum 0x{stored:04x} (want 0x{want:04x})"
                ));
            }
        }
    };
    match proto {
        6 => {
            d.kind("tcp");
            if quoted {
                if let (Some(s), Some(t)) = (be16(0), be16(2)) {
                    d.field("sport", s);
                    d.field("dport", t);
                }
                if let Some(seq) = be32(4) {
                    d.field("seq", seq);
                }
                return;
            }
            match TcpHeader::from_slice(seg) {
                Ok((h, payload)) => {
                    d.field("sport", h.source_port);
                    d.field("dport", h.destination_port);
                    d.field("flags", tcp_flags(&h));
                    d.field("seq", h.sequence_number);
                    d.field("ack", h.acknowledgment_number);
                    d.field("win", h.window_size);
                    d.field("paylen", payload.len());
                    bad_sum(d, "TCP", 16);
                }
                Err(e) => {
                    d.kind("malformed");
                    d.problems.push(format!("bad TCP header: {e}"));
                }
            }
        }
        17 => {
            d.kind("udp");
            match (be16(0), be16(2), be16(4)) {
                (Some(s), Some(t), Some(len)) => {
                    d.field("sport", s);
                    d.field("dport", t);
                    if quoted {
                        return;
                    }
                    if seg.len() < 8 {
                        d.kind("malformed");
                        d.problems.push("truncated UDP header".into());
                        return;
                    }
                    d.field("paylen", seg.len() - 8);
                    if usize::from(len) != seg.len() && check {
                        d.problems
                            .push(format!("UDP length {len} but {} bytes", seg.len()));
                    }
                    bad_sum(d, "UDP", 6);
                }
                (Some(s), Some(t), None) if quoted => {
                    d.field("sport", s);
                    d.field("dport", t);
                }
                _ => {
                    d.kind("malformed");
                    d.problems.push("truncated UDP header".into());
                }
            }
        }
        1 | 58 => {
            let six = proto == 58;
            d.kind(if six { "icmp6" } else { "icmp4" });
            let (Some(&ty), Some(&code)) = (seg.first(), seg.get(1)) else {
                d.kind("malformed");
                d.problems.push("truncated ICMP header".into());
                return;
            };
            let is_ndp = six && (133..=137).contains(&ty);
            if is_ndp {
                d.kind("ndp");
            }
            d.field("type", ty);
            d.field("code", code);
            let echo = if six {
                ty == 128 || ty == 129
            } else {
                ty == 0 || ty == 8
            };
            let error = if six {
                (1..=4).contains(&ty)
            } else {
                matches!(ty, 3 | 4 | 5 | 11 | 12)
            };
            if echo {
                if let (Some(id), Some(sq)) = (be16(4), be16(6)) {
                    d.field("echo-id", id);
                    d.field("echo-seq", sq);
                }
            }
            if quoted {
                return;
            }
            if seg.len() < 8 {
                d.kind("malformed");
                d.problems.push("truncated ICMP header".into());
                return;
            }
            if (!six && ty == 3 && code == 4) || (six && ty == 2) {
                let mtu = if six {
                    be32(4).unwrap_or(0)
                } else {
                    u32::from(be16(6).unwrap_or(0))
                };
                d.field("mtu", mtu);
            }
            if is_ndp && (ty == 135 || ty == 136) {
                if let Some(t) = seg.get(8..24) {
                    let mut a = [0u8; 16];
                    a.copy_from_slice(t);
                    d.field("target", Ipv6Addr::from(a));
                }
                if ty == 136 {
                    let f = seg[4];
                    let mut s = String::new();
                    for (bit, c) in [(0x80, 'R'), (0x40, 'S'), (0x20, 'O')] {
                        if f & bit != 0 {
                            s.push(c);
                        }
                    }
                    if s.is_empty() {
                        s.push('-');
                    }
                    d.field("naflags", s);
                }
                let mut opts = seg.get(24..).unwrap_or(&[]);
                while opts.len() >= 8 {
                    let len = usize::from(opts[1]) * 8;
                    if len == 0 || len > opts.len() {
                        d.problems.push("bad NDP option length".into());
                        break;
                    }
                    if (opts[0] == 1 || opts[0] == 2) && len >= 8 {
                        d.field("lladdr", mac(&opts[2..8]));
                    }
                    opts = &opts[len..];
                }
            }
            if check {
                bad_sum(d, if six { "ICMPv6" } else { "ICMP" }, 2);
            }
            if error {
                let mut inner = Decoded::default();
                decode_ip(&mut inner, &seg[8..], true, 0);
                d.inner = Some(Box::new(inner));
            } else {
                d.field("paylen", seg.len() - 8);
            }
        }
        p => {
            d.field("proto", p);
            d.field("paylen", seg.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_rfc1071_example() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&data, 0), !0xddf2);
    }
}
