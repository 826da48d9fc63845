//! Views over packet bytes: field offsets, validation and checksum arithmetic.
//!
//! The engine rewrites frames in place, so instead of parsing into owned structures it checks a
//! frame once ([`parse_ip`]) and then reads and writes fields at known offsets. Checksums are
//! updated incrementally (RFC 1624) on the forwarding path and computed in full only for the
//! frames the engine builds itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Ethernet II header length (IEEE 802.3 clause 3.1.1).
pub const ETH_LEN: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// Reads a big-endian u16.
#[inline]
pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline]
pub fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

pub fn ethertype(frame: &[u8]) -> u16 {
    be16(frame, 12)
}

/// Sets destination and source MAC.
#[inline]
pub fn set_macs(frame: &mut [u8], dst: &[u8; 6], src: &[u8; 6]) {
    frame[0..6].copy_from_slice(dst);
    frame[6..12].copy_from_slice(src);
}

/// Ones-complement sum of `data` (RFC 1071), not yet folded or inverted.
pub fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let v = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        let (s, carry) = acc.overflowing_add(v);
        acc = s + u64::from(carry);
    }
    let rest = chunks.remainder();
    let mut i = 0;
    while i + 1 < rest.len() {
        acc += u64::from(be16(rest, i));
        i += 2;
    }
    if i < rest.len() {
        acc += u64::from(rest[i]) << 8;
    }
    acc
}

/// Folds a 64-bit ones-complement sum to 16 bits.
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data, 0))
}

/// The pseudo-header sum for TCP/UDP/ICMPv6 (RFC 793 3.1, RFC 768, RFC 8200 8.1).
pub fn pseudo_sum(src: &IpAddr, dst: &IpAddr, proto: u8, len: usize) -> u64 {
    let mut acc = u64::from(proto) + len as u64;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            acc = sum(&s.octets(), acc);
            acc = sum(&d.octets(), acc);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            acc = sum(&s.octets(), acc);
            acc = sum(&d.octets(), acc);
        }
        _ => {}
    }
    acc
}

/// RFC 1624 eqn. 3: the checksum after a 16-bit word changed from `old` to `new`.
#[inline]
pub fn csum_update16(csum: u16, old: u16, new: u16) -> u16 {
    let acc = u64::from(!csum) + u64::from(!old) + u64::from(new);
    !fold(acc)
}

/// Incremental update for a changed run of bytes of even length (addresses).
#[inline]
pub fn csum_update(csum: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut acc = u64::from(!csum);
    let mut i = 0;
    while i + 1 < old.len() {
        acc += u64::from(!be16(old, i)) + u64::from(be16(new, i));
        i += 2;
    }
    !fold(acc)
}

/// An IP packet inside a frame, checked once: offsets are safe to use afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ip {
    pub v6: bool,
    /// Offset of the IP header in the frame.
    pub off: usize,
    /// IP header length (IPv6: 40; extension headers are not supported).
    pub hlen: usize,
    /// Whole IP packet length (header + payload).
    pub len: usize,
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// TTL / hop limit.
    pub ttl: u8,
    /// IPv4: more-fragments set or offset non-zero.
    pub fragment: bool,
    /// IPv4 DF.
    pub df: bool,
}

impl Ip {
    /// Offset of the transport header in the frame.
    pub fn l4(&self) -> usize {
        self.off + self.hlen
    }
    /// Transport length.
    pub fn l4_len(&self) -> usize {
        self.len - self.hlen
    }
    pub fn end(&self) -> usize {
        self.off + self.len
    }
}

/// Why a frame is not a usable IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpError {
    Malformed,
    /// Well-formed but not handled (IPv6 extension headers).
    Unsupported,
}

/// Checks the IPv4 header at `off` (RFC 791 3.1): version, IHL, total length within the buffer,
/// header checksum.
pub fn parse_ipv4(b: &[u8], off: usize) -> Result<Ip, IpError> {
    let h = b.get(off..).ok_or(IpError::Malformed)?;
    if h.len() < 20 || h[0] >> 4 != 4 {
        return Err(IpError::Malformed);
    }
    let hlen = usize::from(h[0] & 0x0f) * 4;
    let len = usize::from(be16(h, 2));
    if hlen < 20 || len < hlen || len > h.len() {
        return Err(IpError::Malformed);
    }
    if checksum(&h[..hlen]) != 0 {
        return Err(IpError::Malformed);
    }
    let frag = be16(h, 6);
    Ok(Ip {
        v6: false,
        off,
        hlen,
        len,
        proto: h[9],
        src: IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15])),
        dst: IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19])),
        ttl: h[8],
        fragment: frag & 0x3fff != 0,
        df: frag & 0x4000 != 0,
    })
}

/// Checks the IPv6 header at `off` (RFC 8200 3): version, payload length within the buffer.
pub fn parse_ipv6(b: &[u8], off: usize) -> Result<Ip, IpError> {
    let h = b.get(off..).ok_or(IpError::Malformed)?;
    if h.len() < 40 || h[0] >> 4 != 6 {
        return Err(IpError::Malformed);
    }
    let len = 40 + usize::from(be16(h, 4));
    if len > h.len() {
        return Err(IpError::Malformed);
    }
    let proto = h[6];
    let mut src = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&h[24..40]);
    if !matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_ICMPV6) {
        return Err(IpError::Unsupported);
    }
    Ok(Ip {
        v6: true,
        off,
        hlen: 40,
        len,
        proto,
        src: IpAddr::V6(Ipv6Addr::from(src)),
        dst: IpAddr::V6(Ipv6Addr::from(dst)),
        ttl: h[7],
        fragment: false,
        df: true,
    })
}

/// Transport ports (or ICMP query id) and flags, after checking the transport header and its
/// checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L4 {
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte; 0 for others.
    pub flags: u8,
    /// ICMP type and code (ICMP only).
    pub icmp_type: u8,
    pub icmp_code: u8,
}

/// Checks the transport header of `ip` in `b` (lengths, checksum) and reads its ports.
pub fn parse_l4(b: &[u8], ip: &Ip) -> Option<L4> {
    parse_l4_with(b, ip, true)
}

/// [`parse_l4`], verifying the checksum only when `verify`: a frame whose checksum the
/// sender's kernel left to be filled in, or that the receiving kernel already checked, says so
/// in its offload header (see offload.rs).
pub fn parse_l4_with(b: &[u8], ip: &Ip, verify: bool) -> Option<L4> {
    let t = &b[ip.l4()..ip.end()];
    let csum_ok = |acc: u64| !verify || fold(sum(t, acc)) == 0xffff;
    match ip.proto {
        PROTO_TCP => {
            if t.len() < 20 {
                return None;
            }
            let doff = usize::from(t[12] >> 4) * 4;
            if doff < 20 || doff > t.len() {
                return None;
            }
            if !csum_ok(pseudo_sum(&ip.src, &ip.dst, PROTO_TCP, t.len())) {
                return None;
            }
            Some(L4 {
                sport: be16(t, 0),
                dport: be16(t, 2),
                flags: t[13],
                icmp_type: 0,
                icmp_code: 0,
            })
        }
        PROTO_UDP => {
            if t.len() < 8 || usize::from(be16(t, 4)) != t.len() {
                return None;
            }
            let c = be16(t, 6);
            // IPv4 UDP may carry no checksum (RFC 768); IPv6 UDP must (RFC 8200 8.1).
            if (c != 0 || ip.v6) && !csum_ok(pseudo_sum(&ip.src, &ip.dst, PROTO_UDP, t.len())) {
                return None;
            }
            Some(L4 {
                sport: be16(t, 0),
                dport: be16(t, 2),
                flags: 0,
                icmp_type: 0,
                icmp_code: 0,
            })
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            if t.len() < 8 {
                return None;
            }
            let acc = if ip.v6 {
                pseudo_sum(&ip.src, &ip.dst, PROTO_ICMPV6, t.len())
            } else {
                0
            };
            if !csum_ok(acc) {
                return None;
            }
            Some(L4 {
                sport: be16(t, 4),
                dport: 0,
                flags: 0,
                icmp_type: t[0],
                icmp_code: t[1],
            })
        }
        _ => None,
    }
}

/// Offset of the transport checksum field inside the transport header, if the protocol has one
/// that covers the pseudo-header (and so changes when addresses change).
pub fn l4_csum_off(proto: u8) -> Option<usize> {
    match proto {
        PROTO_TCP => Some(16),
        PROTO_UDP => Some(6),
        PROTO_ICMPV6 => Some(2),
        _ => None,
    }
}

/// The IPv4 header of a packet that may be cut short (the quote in an ICMP error, the head of
/// a fragment): version and IHL checked, lengths clamped to what is there.
pub fn parse_ipv4_header_only(b: &[u8]) -> Result<Ip, IpError> {
    parse_ipv4_quoted(b, 0, b.len()).ok_or(IpError::Malformed)
}

/// An IPv4 packet quoted at `off..end` (possibly truncated).
pub fn parse_ipv4_quoted(b: &[u8], off: usize, end: usize) -> Option<Ip> {
    let h = b.get(off..end)?;
    if h.len() < 20 || h[0] >> 4 != 4 {
        return None;
    }
    let hlen = usize::from(h[0] & 0x0f) * 4;
    if hlen < 20 || hlen > h.len() {
        return None;
    }
    let len = usize::from(be16(h, 2)).clamp(hlen, h.len());
    let frag = be16(h, 6);
    Some(Ip {
        v6: false,
        off,
        hlen,
        len,
        proto: h[9],
        src: IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15])),
        dst: IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19])),
        ttl: h[8],
        fragment: frag & 0x3fff != 0,
        df: frag & 0x4000 != 0,
    })
}

/// An IPv6 packet quoted at `off..end` (possibly truncated).
pub fn parse_ipv6_quoted(b: &[u8], off: usize, end: usize) -> Option<Ip> {
    let h = b.get(off..end)?;
    if h.len() < 40 || h[0] >> 4 != 6 {
        return None;
    }
    let len = (40 + usize::from(be16(h, 4))).min(h.len());
    let mut src = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&h[24..40]);
    Some(Ip {
        v6: true,
        off,
        hlen: 40,
        len,
        proto: h[6],
        src: IpAddr::V6(Ipv6Addr::from(src)),
        dst: IpAddr::V6(Ipv6Addr::from(dst)),
        ttl: h[7],
        fragment: false,
        df: true,
    })
}

/// Rewrites the source address and port (or ICMP query id) of a quoted packet, fixing the
/// checksums that are inside the quote (RFC 5508 4.2: a NAT translates the embedded packet).
pub fn rewrite_quoted_src(b: &mut [u8], inner: &Ip, addr: IpAddr, port: u16) {
    let (a_off, a_len) = if inner.v6 {
        (inner.off + 8, 16)
    } else {
        (inner.off + 12, 4)
    };
    let mut old = [0u8; 16];
    old[..a_len].copy_from_slice(&b[a_off..a_off + a_len]);
    let mut new = [0u8; 16];
    match addr {
        IpAddr::V4(a) => new[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => new.copy_from_slice(&a.octets()),
    }
    b[a_off..a_off + a_len].copy_from_slice(&new[..a_len]);
    if !inner.v6 {
        let c = csum_update(be16(b, inner.off + 10), &old[..4], &new[..4]);
        put16(b, inner.off + 10, c);
    }
    let t = inner.l4();
    let end = inner.end();
    let (port_off, csum_off, pseudo) = match inner.proto {
        PROTO_TCP => (t, t + 16, true),
        PROTO_UDP => (t, t + 6, true),
        PROTO_ICMP => (t + 4, t + 2, false),
        PROTO_ICMPV6 => (t + 4, t + 2, true),
        _ => return,
    };
    if port_off + 2 > end {
        return;
    }
    let old_port = be16(b, port_off);
    put16(b, port_off, port);
    if csum_off + 2 > end {
        return;
    }
    let mut c = be16(b, csum_off);
    if inner.proto == PROTO_UDP && c == 0 && !inner.v6 {
        return;
    }
    if pseudo {
        c = csum_update(c, &old[..a_len], &new[..a_len]);
    }
    c = csum_update16(c, old_port, port);
    put16(b, csum_off, c);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_equals_full() {
        let mut data = [0u8; 20];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i * 37 + 11) as u8;
        }
        let c = checksum(&data);
        let mut changed = data;
        changed[4..8].copy_from_slice(&[10, 137, 0, 6]);
        let inc = csum_update(c, &data[4..8], &changed[4..8]);
        assert_eq!(inc, checksum(&changed));
        let inc16 = csum_update16(c, be16(&data, 8), 0x1234);
        let mut c2 = data;
        put16(&mut c2, 8, 0x1234);
        assert_eq!(inc16, checksum(&c2));
    }

    #[test]
    fn odd_lengths_sum_like_rfc1071() {
        assert_eq!(checksum(&[0x01]), !0x0100);
        assert_eq!(checksum(&[0x00, 0x01, 0xf2]), !(0x0001 + 0xf200));
    }
}
