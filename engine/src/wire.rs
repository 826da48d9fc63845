//! Views over packet bytes: typed headers, validation, the NAT rewrite and checksum
//! arithmetic.
//!
//! In the smoltcp style, [`Ipv4Header`] and [`Ipv6Header`] are views over a buffer, checked
//! once by `new_checked` and then read (and, over a mutable buffer, written) field by field;
//! [`Ipv4Repr`] and [`Ipv6Repr`] emit the headers of packets the engine builds. The engine
//! rewrites frames in place, so it checks a frame once ([`parse_ipv4`], [`parse_ipv6`]) into an
//! [`Ip`] (the offsets and fields it needs) and then changes fields at known offsets; every
//! address and port change goes through [`nat_rewrite`]. Checksums are updated incrementally
//! (RFC 1624) on the forwarding path and computed in full only for the frames the engine
//! builds itself. Reassembly (`frag`) reads IPv4 headers through the same [`Ipv4Header`].

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
/// DCCP (RFC 4340): ports and a checksum over the pseudo-header, like UDP.
pub const PROTO_DCCP: u8 = 33;
/// SCTP (RFC 9260): ports; its CRC32c does not cover the addresses.
pub const PROTO_SCTP: u8 = 132;
/// UDP-Lite (RFC 3828): UDP's header with a partial-coverage checksum over the pseudo-header.
pub const PROTO_UDPLITE: u8 = 136;

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

/// Why bytes are not a usable IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpError {
    Malformed,
    /// Well-formed but not handled (IPv6 extension headers).
    Unsupported,
}

/// An IPv4 header (RFC 791 section 3.1) over a buffer that starts with it.
#[derive(Debug, Clone, Copy)]
pub struct Ipv4Header<T: AsRef<[u8]>> {
    buf: T,
}

/// IPv4 flags/fragment-offset word: don't fragment, more fragments, the offset in 8 bytes.
pub const IPV4_DF: u16 = 0x4000;
pub const IPV4_MF: u16 = 0x2000;
pub const IPV4_OFFSET_MASK: u16 = 0x1fff;

impl<T: AsRef<[u8]>> Ipv4Header<T> {
    /// Checks what makes the fields safe to read: at least 20 bytes, version 4, a header
    /// length (IHL) of at least 20 bytes, and a total length that covers the header and fits
    /// the buffer (which may be longer: link-layer padding). The header checksum is not
    /// checked here ([`Ipv4Header::verify_checksum`]).
    pub fn new_checked(buf: T) -> Result<Self, IpError> {
        let h = Ipv4Header { buf };
        let b = h.buf.as_ref();
        if b.len() < 20 || b[0] >> 4 != 4 {
            return Err(IpError::Malformed);
        }
        let hlen = h.header_len();
        let total = h.total_len();
        if hlen < 20 || total < hlen || total > b.len() {
            return Err(IpError::Malformed);
        }
        Ok(h)
    }

    /// A view whose length, version and IHL the caller has checked (at least 20 bytes and
    /// the IHL within the buffer); the total length may be anything (a truncated quote).
    pub fn new_truncated(buf: T) -> Result<Self, IpError> {
        let h = Ipv4Header { buf };
        let b = h.buf.as_ref();
        if b.len() < 20 || b[0] >> 4 != 4 || h.header_len() < 20 || h.header_len() > b.len() {
            return Err(IpError::Malformed);
        }
        Ok(h)
    }

    pub fn into_inner(self) -> T {
        self.buf
    }

    /// IHL in bytes, options included.
    pub fn header_len(&self) -> usize {
        usize::from(self.buf.as_ref()[0] & 0x0f) * 4
    }

    pub fn total_len(&self) -> usize {
        usize::from(be16(self.buf.as_ref(), 2))
    }

    pub fn ident(&self) -> u16 {
        be16(self.buf.as_ref(), 4)
    }

    /// The flags/fragment-offset word.
    pub fn flags_frag(&self) -> u16 {
        be16(self.buf.as_ref(), 6)
    }

    pub fn dont_frag(&self) -> bool {
        self.flags_frag() & IPV4_DF != 0
    }

    pub fn more_frags(&self) -> bool {
        self.flags_frag() & IPV4_MF != 0
    }

    /// The fragment offset in bytes.
    pub fn frag_offset(&self) -> usize {
        usize::from(self.flags_frag() & IPV4_OFFSET_MASK) * 8
    }

    /// A fragment: more fragments set, or a non-zero offset.
    pub fn is_fragment(&self) -> bool {
        self.flags_frag() & (IPV4_MF | IPV4_OFFSET_MASK) != 0
    }

    pub fn ttl(&self) -> u8 {
        self.buf.as_ref()[8]
    }

    pub fn protocol(&self) -> u8 {
        self.buf.as_ref()[9]
    }

    pub fn src(&self) -> Ipv4Addr {
        let b = self.buf.as_ref();
        Ipv4Addr::new(b[12], b[13], b[14], b[15])
    }

    pub fn dst(&self) -> Ipv4Addr {
        let b = self.buf.as_ref();
        Ipv4Addr::new(b[16], b[17], b[18], b[19])
    }

    /// The header checksum is right (RFC 791: the one's complement sum over the header is 0).
    pub fn verify_checksum(&self) -> bool {
        checksum(&self.buf.as_ref()[..self.header_len()]) == 0
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Header<T> {
    pub fn set_total_len(&mut self, len: u16) {
        put16(self.buf.as_mut(), 2, len);
    }

    pub fn set_flags_frag(&mut self, v: u16) {
        put16(self.buf.as_mut(), 6, v);
    }

    /// Computes and stores the header checksum.
    pub fn fill_checksum(&mut self) {
        let hlen = self.header_len();
        let b = self.buf.as_mut();
        put16(b, 10, 0);
        let c = checksum(&b[..hlen]);
        put16(b, 10, c);
    }
}

/// An IPv4 header the engine builds (20 bytes, no options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Repr {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    pub ttl: u8,
    pub ident: u16,
    /// The type-of-service byte (0xc0: internetwork control, for ICMP errors, as Linux sends).
    pub tos: u8,
    pub dont_frag: bool,
    pub payload_len: usize,
}

impl Ipv4Repr {
    pub const HEADER_LEN: usize = 20;

    /// Writes the header, checksum included, into `buf[..20]`.
    pub fn emit(&self, buf: &mut [u8]) {
        let b = &mut buf[..Self::HEADER_LEN];
        b.fill(0);
        b[0] = 0x45;
        b[1] = self.tos;
        put16(b, 2, (Self::HEADER_LEN + self.payload_len) as u16);
        put16(b, 4, self.ident);
        put16(b, 6, if self.dont_frag { IPV4_DF } else { 0 });
        b[8] = self.ttl;
        b[9] = self.protocol;
        b[12..16].copy_from_slice(&self.src.octets());
        b[16..20].copy_from_slice(&self.dst.octets());
        let c = checksum(b);
        put16(b, 10, c);
    }
}

/// An IPv6 fixed header (RFC 8200 section 3) over a buffer that starts with it.
#[derive(Debug, Clone, Copy)]
pub struct Ipv6Header<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Ipv6Header<T> {
    /// Checks at least 40 bytes, version 6, and a payload length that fits the buffer.
    pub fn new_checked(buf: T) -> Result<Self, IpError> {
        let h = Ipv6Header { buf };
        let b = h.buf.as_ref();
        if b.len() < 40 || b[0] >> 4 != 6 || 40 + h.payload_len() > b.len() {
            return Err(IpError::Malformed);
        }
        Ok(h)
    }

    /// A view over at least 40 bytes of version 6; the payload may be cut short (a quote).
    pub fn new_truncated(buf: T) -> Result<Self, IpError> {
        let h = Ipv6Header { buf };
        let b = h.buf.as_ref();
        if b.len() < 40 || b[0] >> 4 != 6 {
            return Err(IpError::Malformed);
        }
        Ok(h)
    }

    pub fn payload_len(&self) -> usize {
        usize::from(be16(self.buf.as_ref(), 4))
    }

    pub fn next_header(&self) -> u8 {
        self.buf.as_ref()[6]
    }

    pub fn hop_limit(&self) -> u8 {
        self.buf.as_ref()[7]
    }

    pub fn src(&self) -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.buf.as_ref()[8..24]);
        Ipv6Addr::from(a)
    }

    pub fn dst(&self) -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.buf.as_ref()[24..40]);
        Ipv6Addr::from(a)
    }
}

/// An IPv6 header the engine builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Repr {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub next_header: u8,
    pub hop_limit: u8,
    pub payload_len: usize,
}

impl Ipv6Repr {
    pub const HEADER_LEN: usize = 40;

    /// Writes the header into `buf[..40]`.
    pub fn emit(&self, buf: &mut [u8]) {
        let b = &mut buf[..Self::HEADER_LEN];
        b.fill(0);
        b[0] = 0x60;
        put16(b, 4, self.payload_len as u16);
        b[6] = self.next_header;
        b[7] = self.hop_limit;
        b[8..24].copy_from_slice(&self.src.octets());
        b[24..40].copy_from_slice(&self.dst.octets());
    }
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

/// Checks the IPv4 header at `off` (RFC 791 3.1): version, IHL, total length within the buffer,
/// header checksum.
pub fn parse_ipv4(b: &[u8], off: usize) -> Result<Ip, IpError> {
    let h = Ipv4Header::new_checked(b.get(off..).ok_or(IpError::Malformed)?)?;
    if !h.verify_checksum() {
        return Err(IpError::Malformed);
    }
    Ok(ip_of_v4(&h, off, h.total_len()))
}

fn ip_of_v4(h: &Ipv4Header<&[u8]>, off: usize, len: usize) -> Ip {
    Ip {
        v6: false,
        off,
        hlen: h.header_len(),
        len,
        proto: h.protocol(),
        src: IpAddr::V4(h.src()),
        dst: IpAddr::V4(h.dst()),
        ttl: h.ttl(),
        fragment: h.is_fragment(),
        df: h.dont_frag(),
    }
}

fn ip_of_v6(h: &Ipv6Header<&[u8]>, off: usize, len: usize) -> Ip {
    Ip {
        v6: true,
        off,
        hlen: 40,
        len,
        proto: h.next_header(),
        src: IpAddr::V6(h.src()),
        dst: IpAddr::V6(h.dst()),
        ttl: h.hop_limit(),
        fragment: false,
        df: true,
    }
}

/// Checks the IPv6 header at `off` (RFC 8200 3): version, payload length within the buffer.
pub fn parse_ipv6(b: &[u8], off: usize) -> Result<Ip, IpError> {
    let h = Ipv6Header::new_checked(b.get(off..).ok_or(IpError::Malformed)?)?;
    // Extension headers (RFC 8200 4; AH, RFC 4302, is one too) are not walked: what follows
    // them is not where a tracker would look.
    if matches!(
        h.next_header(),
        0 | 43 | 44 | 51 | 60 | 135 | 139 | 140 | 253 | 254
    ) {
        return Err(IpError::Unsupported);
    }
    Ok(ip_of_v6(&h, off, 40 + h.payload_len()))
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

/// The source and destination ports of an IP protocol we track generically: SCTP, DCCP and
/// UDP-Lite carry them in their first 4 bytes, as Linux's trackers for them read them; any
/// other protocol (GRE, ESP, AH, IP-in-IP, ...) has none and gets zeros. `None`: a ported
/// protocol too short for its ports.
pub fn ports_of_other(b: &[u8], ip: &Ip) -> Option<(u16, u16)> {
    match ip.proto {
        PROTO_SCTP | PROTO_DCCP | PROTO_UDPLITE => {
            let t = ip.l4();
            (t + 4 <= ip.end()).then(|| (be16(b, t), be16(b, t + 2)))
        }
        _ => Some((0, 0)),
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
    let h = Ipv4Header::new_truncated(b.get(off..end)?).ok()?;
    let len = h.total_len().clamp(h.header_len(), end - off);
    Some(ip_of_v4(&h, off, len))
}

/// An IPv6 packet quoted at `off..end` (possibly truncated).
pub fn parse_ipv6_quoted(b: &[u8], off: usize, end: usize) -> Option<Ip> {
    let h = Ipv6Header::new_truncated(b.get(off..end)?).ok()?;
    let len = (40 + h.payload_len()).min(end - off);
    Some(ip_of_v6(&h, off, len))
}

/// Which address (and port) of a packet NAT changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatField {
    /// Source address and source port (or ICMP query id): a client's packet going out.
    Src,
    /// Destination address and port (or ICMP query id): a reply coming back.
    Dst,
}

/// How the transport checksum of the packet stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatCsum {
    /// Complete: updated incrementally (RFC 1624).
    Full,
    /// Offloaded: the field holds only the pseudo-header sum (`NEEDS_CSUM`), so address
    /// changes update that sum and port changes are left to whoever completes it.
    Partial,
    /// The packet quoted in an ICMP error, possibly cut short: fields past the quote's end
    /// are left alone, and a checksum is updated only when it is inside the quote (RFC 5508
    /// section 4.2: a NAT translates the embedded packet).
    Quoted,
}

/// The one NAT rewrite: sets `field`'s address to `addr` and, with `port`, its port (or the
/// ICMP query id), keeping the IPv4 header checksum and the transport checksum right.
pub fn nat_rewrite(
    b: &mut [u8],
    ip: &Ip,
    field: NatField,
    addr: IpAddr,
    port: Option<u16>,
    csum: NatCsum,
) {
    let (a_off, a_len) = match (ip.v6, field) {
        (false, NatField::Src) => (ip.off + 12, 4),
        (false, NatField::Dst) => (ip.off + 16, 4),
        (true, NatField::Src) => (ip.off + 8, 16),
        (true, NatField::Dst) => (ip.off + 24, 16),
    };
    let mut old = [0u8; 16];
    old[..a_len].copy_from_slice(&b[a_off..a_off + a_len]);
    let mut new = [0u8; 16];
    match addr {
        IpAddr::V4(a) => new[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => new.copy_from_slice(&a.octets()),
    }
    b[a_off..a_off + a_len].copy_from_slice(&new[..a_len]);
    if !ip.v6 {
        let c = csum_update(be16(b, ip.off + 10), &old[..4], &new[..4]);
        put16(b, ip.off + 10, c);
    }
    let t = ip.l4();
    let end = ip.end();
    // The port (or query id) field, the checksum field, and whether the checksum covers the
    // addresses (pseudo-header).
    let (port_off, csum_off, pseudo) = match ip.proto {
        PROTO_TCP => (if field == NatField::Src { t } else { t + 2 }, t + 16, true),
        PROTO_UDP => (if field == NatField::Src { t } else { t + 2 }, t + 6, true),
        PROTO_ICMP => (t + 4, t + 2, false),
        PROTO_ICMPV6 => (t + 4, t + 2, true),
        // Their checksums cover the pseudo-header; their ports are never translated.
        PROTO_DCCP | PROTO_UDPLITE => (t, t + 6, true),
        _ => return,
    };
    let mut old_port = None;
    if let Some(p) = port {
        if port_off + 2 > end {
            return;
        }
        old_port = Some(be16(b, port_off));
        put16(b, port_off, p);
    }
    if csum_off + 2 > end {
        return;
    }
    let mut c = be16(b, csum_off);
    if csum == NatCsum::Partial {
        // The field is the (uninverted) pseudo-header sum: RFC 1624 on its complement.
        if pseudo {
            let seed = !csum_update(!c, &old[..a_len], &new[..a_len]);
            put16(b, csum_off, seed);
        }
        return;
    }
    if ip.proto == PROTO_UDP && c == 0 && !ip.v6 {
        // An IPv4 UDP datagram without a checksum keeps none (RFC 768).
        return;
    }
    if pseudo {
        c = csum_update(c, &old[..a_len], &new[..a_len]);
    }
    if let (Some(o), Some(p)) = (old_port, port) {
        c = csum_update16(c, o, p);
    }
    if csum == NatCsum::Full && ip.proto == PROTO_UDP && c == 0 {
        // RFC 768: a computed zero is sent as all ones.
        c = 0xffff;
    }
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

    /// An IPv4 header written by hand from RFC 791 section 3.1 (not with this module).
    fn v4_header(total: u16, flags_frag: u16, proto: u8) -> Vec<u8> {
        let mut h = vec![
            0x45, 0, 0, 0, 0x12, 0x34, 0, 0, 64, proto, 0, 0, 10, 137, 0, 10, 198, 18, 0, 10,
        ];
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[6..8].copy_from_slice(&flags_frag.to_be_bytes());
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.resize(usize::from(total).max(20), 0xab);
        h
    }

    #[test]
    fn ipv4_view_checks_structure_and_reads_fields() {
        let p = v4_header(28, 0x2000 | 3, PROTO_UDP);
        let h = Ipv4Header::new_checked(&p[..]).expect("valid");
        assert_eq!(h.header_len(), 20);
        assert_eq!(h.total_len(), 28);
        assert_eq!(h.ident(), 0x1234);
        assert!(h.more_frags() && !h.dont_frag() && h.is_fragment());
        assert_eq!(h.frag_offset(), 24);
        assert_eq!(h.protocol(), PROTO_UDP);
        assert_eq!(h.src(), Ipv4Addr::new(10, 137, 0, 10));
        assert_eq!(h.dst(), Ipv4Addr::new(198, 18, 0, 10));
        assert!(h.verify_checksum());
        // Padding after the total length is allowed; a total beyond the buffer is not.
        let mut padded = p.clone();
        padded.extend_from_slice(&[0; 18]);
        assert!(Ipv4Header::new_checked(&padded[..]).is_ok());
        assert!(Ipv4Header::new_checked(&p[..27]).is_err());
        // Version 6, IHL below 5, a total shorter than the header: refused.
        for (i, v) in [(0usize, 0x65u8), (0, 0x44), (3, 19)] {
            let mut bad = p.clone();
            bad[i] = v;
            assert_eq!(
                Ipv4Header::new_checked(&bad[..]).map(|_| ()),
                Err(IpError::Malformed),
                "byte {i} = {v:#x}"
            );
        }
        // A flipped bit is caught by the checksum, not by the structure.
        let mut flipped = p.clone();
        flipped[8] ^= 1;
        let h = Ipv4Header::new_checked(&flipped[..]).expect("structure is fine");
        assert!(!h.verify_checksum());
        assert_eq!(parse_ipv4(&flipped, 0), Err(IpError::Malformed));
        // A quote may be cut anywhere after its header.
        let q = parse_ipv4_quoted(&p, 0, 22).expect("quote");
        assert_eq!((q.hlen, q.len), (20, 22));
    }

    #[test]
    fn emitted_headers_are_what_the_rfcs_lay_out() {
        let mut b = [0u8; 56];
        Ipv4Repr {
            src: Ipv4Addr::new(10, 137, 0, 6),
            dst: Ipv4Addr::new(10, 137, 0, 10),
            protocol: PROTO_ICMP,
            ttl: 64,
            ident: 7,
            tos: 0xc0,
            dont_frag: true,
            payload_len: 36,
        }
        .emit(&mut b);
        assert_eq!(
            &b[..12],
            &[0x45, 0xc0, 0, 56, 0, 7, 0x40, 0, 64, 1, b[10], b[11]]
        );
        assert_eq!(&b[12..20], &[10, 137, 0, 6, 10, 137, 0, 10]);
        assert_eq!(checksum(&b[..20]), 0, "header checksum filled");
        let mut h = Ipv4Header::new_checked(&mut b[..])
            .map_err(|_| ())
            .expect("own output");
        assert!(h.verify_checksum() && h.dont_frag());
        h.set_total_len(20);
        assert!(!h.verify_checksum());
        h.fill_checksum();
        assert!(h.verify_checksum());

        let mut b6 = [0u8; 40];
        let src: Ipv6Addr = "fd09:24ef:4179::a89:6".parse().expect("ip");
        let dst: Ipv6Addr = "fe80::1".parse().expect("ip");
        Ipv6Repr {
            src,
            dst,
            next_header: PROTO_ICMPV6,
            hop_limit: 255,
            payload_len: 32,
        }
        .emit(&mut b6);
        assert_eq!(&b6[..8], &[0x60, 0, 0, 0, 0, 32, 58, 255]);
        assert_eq!(&b6[8..24], &src.octets());
        assert_eq!(&b6[24..40], &dst.octets());
        assert!(Ipv6Header::new_checked(&b6[..]).is_err(), "payload missing");
        let mut full = b6.to_vec();
        full.resize(72, 0);
        let h = Ipv6Header::new_checked(&full[..]).expect("valid");
        assert_eq!(
            (h.payload_len(), h.next_header(), h.hop_limit()),
            (32, 58, 255)
        );
    }

    /// The NAT rewrite against a full recomputation: every mode ends with the checksums a
    /// sender would have computed for the rewritten packet.
    #[test]
    fn nat_rewrite_keeps_checksums_right() {
        // UDP/IPv4 from 10.137.0.10:40000 to 198.18.0.53:53 with a payload.
        let payload = b"a query of some length";
        let mut f = vec![0u8; ETH_LEN];
        f.extend(
            v4_header(28 + payload.len() as u16, 0, PROTO_UDP)
                .iter()
                .take(20),
        );
        f.extend_from_slice(&40000u16.to_be_bytes());
        f.extend_from_slice(&53u16.to_be_bytes());
        f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(payload);
        let full_udp = |f: &mut Vec<u8>| {
            let ip = parse_ipv4(f, ETH_LEN).expect("ipv4");
            put16(f, ip.l4() + 6, 0);
            let acc = pseudo_sum(&ip.src, &ip.dst, PROTO_UDP, ip.l4_len());
            let c = !fold(sum(&f[ip.l4()..ip.end()], acc));
            put16(f, ip.l4() + 6, c);
        };
        full_udp(&mut f);
        let ip = parse_ipv4(&f, ETH_LEN).expect("ipv4");
        let mut g = f.clone();
        nat_rewrite(
            &mut g,
            &ip,
            NatField::Src,
            "10.137.0.6".parse().expect("ip"),
            Some(61234),
            NatCsum::Full,
        );
        let ip2 = parse_ipv4(&g, ETH_LEN).expect("IPv4 header checksum still right");
        assert_eq!(ip2.src, "10.137.0.6".parse::<IpAddr>().expect("ip"));
        assert_eq!(be16(&g, ip2.l4()), 61234);
        assert!(
            parse_l4(&g, &ip2).is_some(),
            "UDP checksum right after the rewrite"
        );
        let mut want = g.clone();
        full_udp(&mut want);
        assert_eq!(g, want);
        // Back again on the destination side of the reply direction: the same bytes as a
        // packet addressed so from the start.
        let mut back = g.clone();
        nat_rewrite(
            &mut back,
            &ip2,
            NatField::Src,
            "10.137.0.10".parse().expect("ip"),
            Some(40000),
            NatCsum::Full,
        );
        assert_eq!(back, f);
        // Partial: only the pseudo-header part follows the address; completing it gives the
        // full checksum of the rewritten packet.
        let mut p = f.clone();
        let seed = fold(pseudo_sum(&ip.src, &ip.dst, PROTO_UDP, ip.l4_len()));
        put16(&mut p, ip.l4() + 6, seed);
        nat_rewrite(
            &mut p,
            &ip,
            NatField::Src,
            "10.137.0.6".parse().expect("ip"),
            Some(61234),
            NatCsum::Partial,
        );
        let c = !fold(sum(&p[ip.l4()..ip.end()], 0));
        put16(&mut p, ip.l4() + 6, c);
        assert_eq!(p, want);
        // Quoted and cut short before the checksum: the port changes, nothing past the end.
        let mut q = f.clone();
        let cut = ETH_LEN + 20 + 4;
        let qi = parse_ipv4_quoted(&q, ETH_LEN, cut).expect("quote");
        nat_rewrite(
            &mut q,
            &qi,
            NatField::Src,
            "10.137.0.6".parse().expect("ip"),
            Some(61234),
            NatCsum::Quoted,
        );
        assert_eq!(be16(&q, cut - 4), 61234);
        assert_eq!(&q[cut..], &f[cut..], "past the quote: untouched");
    }
}
