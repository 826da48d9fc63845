//! IPv4 fragment reassembly with bounded memory, and fragmentation for egress.
//!
//! Both halves are pure: no clock, no I/O, no randomness, and no observable hash-map order, so a
//! replay gives the same output every time.
//!
//! # Reassembly ([`Reassembler`])
//!
//! Fragments are grouped by the RFC 791 section 3.2 key (source, destination, protocol,
//! identification). Each incomplete datagram keeps:
//!
//! * its fragments' payloads appended, in arrival order, to one `Vec<u8>` — so a lone fragment at
//!   a high offset costs its own size, not the size of everything before it;
//! * a `BTreeMap` from payload offset to (end, position in that buffer): the received ranges,
//!   disjoint by construction, found in O(log n) even for a stream of 8-byte fragments in
//!   adversarial order. Rather than RFC 815's hole list, completion is detected by counting:
//!   since the ranges never overlap and all lie inside `[0, total)`, the datagram is complete
//!   exactly when the first fragment is in, the last fragment has fixed the total, and the
//!   received byte count equals it;
//! * the first fragment's header and its first 8 payload bytes, which become the reassembled
//!   header and what an ICMP time-exceeded message quotes (RFC 792).
//!
//! Overlaps follow Linux since the FragmentSmack hardening (and RFC 5722 section 4 with erratum
//! 3089, written for IPv6): a fragment overlapping one already held drops the whole datagram.
//! An exact duplicate (same offset, same length, same bytes — a retransmission or a duplicating
//! link) is ignored and the datagram kept; a same-range fragment with different bytes is an
//! overlap. Linux ignores any fragment contained in what it holds without comparing bytes; this
//! is stricter, so no datagram is ever assembled from two different versions of a range.
//!
//! Memory is bounded by [`FragLimits`]: the bytes counted ([`Reassembler::held_bytes`]) are each
//! fragment's payload plus [`FRAGMENT_RECORD_BYTES`] of bookkeeping, plus the first fragment's
//! header and 8 payload bytes. Allocator slack (a `Vec` grows by doubling) is not counted, so real
//! usage stays within about twice that. When a fragment does not fit, the oldest datagrams (by
//! first-seen time, then arrival order) are evicted silently; a datagram that cannot fit even alone
//! is dropped with [`FragError::Limit`].
//!
//! Timeouts run from a datagram's first-seen fragment ([`FragLimits::timeout_ns`]: Linux
//! `ipfrag_time`, 30 s; RFC 791 section 3.2 suggests 15 s, RFC 1122 section 3.3.2 60 to 120 s).
//! [`Reassembler::push`] does not look at the clock: call [`Reassembler::expire`] with the same
//! `now` first, so an expired datagram is reported rather than completed late.
//!
//! # Fragmentation ([`fragment`])
//!
//! RFC 791 section 3.2 "An Example Fragmentation Procedure", generalised to a packet that is
//! itself a fragment: the pieces keep the original offset and identification, and only the last
//! piece keeps the original MF flag.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;

use crate::config::FragLimits;
use crate::wire;

/// Largest IPv4 packet: the total length field is 16 bits (RFC 791 section 3.1).
const MAX_PACKET: usize = 65_535;

/// The smallest MTU an IPv4 link may have: "Every internet module must be able to forward a
/// datagram of 68 octets without further fragmentation" (RFC 791 section 3.2; a 60-byte header
/// plus the minimum 8-byte fragment).
pub const MIN_MTU: u16 = 68;

/// Bookkeeping charged against [`FragLimits::max_bytes`] for each held fragment, besides its
/// payload (an approximation of its range record's share of the per-datagram map).
pub const FRAGMENT_RECORD_BYTES: usize = 16;

/// The minimum IPv4 header (RFC 791 section 3.1, IHL = 5).
const MIN_HEADER: usize = 20;

/// "More Fragments" in the flags/fragment-offset word (RFC 791 section 3.1).
const MF: u16 = wire::IPV4_MF;
/// "Don't Fragment".
const DF: u16 = wire::IPV4_DF;
/// The flag bits a fragment or a reassembled datagram inherits: reserved bit 0 and DF.
const KEEP_FLAGS: u16 = 0x8000 | DF;
/// Fragment offset, in units of 8 octets.
const OFFSET_MASK: u16 = wire::IPV4_OFFSET_MASK;

/// Payload bytes an ICMP error quotes after the IP header: "the first 64 bits of the original
/// datagram's data" (RFC 792).
const QUOTE_PAYLOAD: usize = 8;

/// Option type octet: bit 7 is the copied flag, "copied on fragmentation" (RFC 791 section 3.1).
const OPT_COPIED: u8 = 0x80;
/// End of Option List (type 0).
const OPT_EOL: u8 = 0;
/// No Operation (type 1).
const OPT_NOP: u8 = 1;

/// Why a fragment was refused, or a packet could not be fragmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FragError {
    /// Not a valid IPv4 packet or fragment (version, IHL, lengths, header checksum, a non-last
    /// fragment's size not a multiple of 8, an empty fragment), a fragment inconsistent with the
    /// datagram's known end, or for [`fragment`] a bad packet, an MTU below [`MIN_MTU`] or DF set.
    Malformed,
    /// The fragment overlaps one already held; the datagram was dropped.
    Overlap,
    /// The fragments describe a datagram longer than 65535 bytes; the datagram was dropped.
    TooLarge,
    /// The datagram does not fit in the reassembly limits even alone; it was dropped.
    Limit,
}

impl fmt::Display for FragError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FragError::Malformed => "malformed IPv4 fragment",
            FragError::Overlap => "overlapping IPv4 fragments",
            FragError::TooLarge => "IPv4 datagram longer than 65535 bytes",
            FragError::Limit => "IPv4 reassembly limit reached",
        })
    }
}

impl std::error::Error for FragError {}

/// The fields of an IPv4 header this module needs, read through the engine's one IPv4
/// header view ([`wire::Ipv4Header`]), so reassembly and forwarding agree on what a header is.
#[derive(Debug, Clone, Copy)]
struct Header {
    /// Header length in bytes (IHL * 4), options included.
    hlen: usize,
    /// Total length: header plus payload.
    total: usize,
    /// The flags/fragment-offset word.
    flags_off: u16,
}

impl Header {
    /// Checks version, IHL and total length (RFC 791 section 3.1); `packet` may be longer than
    /// the total length (link-layer padding), never shorter.
    fn parse(packet: &[u8]) -> Result<Header, FragError> {
        let h = wire::Ipv4Header::new_checked(packet).map_err(|_| FragError::Malformed)?;
        Ok(Header {
            hlen: h.header_len(),
            total: h.total_len(),
            flags_off: h.flags_frag(),
        })
    }

    fn more_fragments(&self) -> bool {
        self.flags_off & MF != 0
    }

    /// Fragment offset in bytes.
    fn offset(&self) -> usize {
        usize::from(self.flags_off & OFFSET_MASK) * 8
    }
}

/// The internet checksum (RFC 791 section 3.1, RFC 1071) of an IPv4 header: zero over a header
/// whose checksum field is right, the value to store when computed with the field zeroed.
fn header_checksum(header: &[u8]) -> u16 {
    wire::checksum(header)
}

/// Stores the right checksum in `header` (a whole IPv4 header, options included).
fn set_checksum(header: &mut [u8]) {
    header[10] = 0;
    header[11] = 0;
    let c = header_checksum(header);
    header[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Sets the total length and the flags/offset word of `packet`, then its checksum.
fn finish_header(packet: &mut [u8], hlen: usize, flags_off: u16) -> Result<(), FragError> {
    let total = u16::try_from(packet.len()).map_err(|_| FragError::TooLarge)?;
    packet[2..4].copy_from_slice(&total.to_be_bytes());
    packet[6..8].copy_from_slice(&flags_off.to_be_bytes());
    set_checksum(&mut packet[..hlen]);
    Ok(())
}

/// What identifies the fragments of one datagram: "the fragments of one datagram ... are
/// identified by ... source, destination, protocol, and identifier" (RFC 791 section 3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Key {
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    id: u16,
}

impl Key {
    /// The key of a packet [`Header::parse`] accepted (so at least 20 bytes long).
    fn of(packet: &[u8]) -> Key {
        Key {
            src: [packet[12], packet[13], packet[14], packet[15]],
            dst: [packet[16], packet[17], packet[18], packet[19]],
            proto: packet[9],
            id: u16::from_be_bytes([packet[4], packet[5]]),
        }
    }
}

/// A received payload range `[start, end)` (the map key is `start`), stored at `at..` in the
/// datagram's buffer.
#[derive(Debug, Clone, Copy)]
struct Piece {
    end: usize,
    at: usize,
}

/// The order datagrams are evicted in: first-seen time, then arrival sequence.
type Age = (u64, u64);

/// An incomplete datagram.
#[derive(Debug)]
struct Datagram {
    age: Age,
    /// The first fragment's header and up to [`QUOTE_PAYLOAD`] bytes of its payload; empty
    /// until the fragment with offset 0 arrives.
    head: Vec<u8>,
    /// Length of the header part of `head` (0 until the first fragment arrives).
    head_len: usize,
    /// Payload length, once the last fragment (MF clear) has arrived.
    len: Option<usize>,
    /// The highest payload end seen.
    max_end: usize,
    /// Payload bytes held (no two ranges overlap, so this counts distinct bytes).
    received: usize,
    pieces: BTreeMap<usize, Piece>,
    /// Fragment payloads in arrival order.
    data: Vec<u8>,
    /// What this datagram counts against [`FragLimits::max_bytes`].
    cost: usize,
}

/// How a fragment fits in a held datagram.
enum Admit {
    Insert,
    Duplicate,
    /// Refused; the datagram is to be dropped.
    Drop(FragError),
}

impl Datagram {
    fn new(age: Age) -> Self {
        Datagram {
            age,
            head: Vec::new(),
            head_len: 0,
            len: None,
            max_end: 0,
            received: 0,
            pieces: BTreeMap::new(),
            data: Vec::new(),
            cost: 0,
        }
    }

    /// Decides on the fragment carrying `payload` at `[start, end)`, with `hlen` its header
    /// length and `more` its MF flag.
    fn admit(&self, start: usize, payload: &[u8], more: bool, hlen: usize) -> Admit {
        let end = start + payload.len();
        // The last fragment fixes the length (RFC 791 section 3.2: "the total data length is
        // computed" from it): nothing may lie beyond it, and a second last fragment must agree.
        if let Some(len) = self.len {
            if end > len || (!more && end != len) {
                return Admit::Drop(FragError::Malformed);
            }
        }
        if !more && self.max_end > end {
            return Admit::Drop(FragError::Malformed);
        }
        // The reassembled datagram carries the first fragment's header.
        let head_len = if start == 0 { hlen } else { self.head_len };
        if head_len > 0 && head_len + end.max(self.max_end) > MAX_PACKET {
            return Admit::Drop(FragError::TooLarge);
        }
        // The range starting at or before `start`, then the first one after it.
        if let Some((&s, p)) = self.pieces.range(..=start).next_back() {
            if s == start && p.end == end {
                let same = self.data.get(p.at..p.at + payload.len()) == Some(payload);
                return if same {
                    Admit::Duplicate
                } else {
                    Admit::Drop(FragError::Overlap)
                };
            }
            if p.end > start {
                return Admit::Drop(FragError::Overlap);
            }
        }
        if let Some((&s, _)) = self
            .pieces
            .range((Bound::Excluded(start), Bound::Unbounded))
            .next()
        {
            if s < end {
                return Admit::Drop(FragError::Overlap);
            }
        }
        Admit::Insert
    }

    fn complete(&self) -> bool {
        self.head_len > 0 && self.len == Some(self.received)
    }
}

/// IPv4 reassembly (RFC 791 section 3.2 "An Example Reassembly Procedure") with bounded memory.
pub struct Reassembler {
    limits: FragLimits,
    datagrams: BTreeMap<Key, Datagram>,
    /// Eviction and expiry order.
    ages: BTreeMap<Age, Key>,
    /// Sum of the held datagrams' costs.
    held: usize,
    /// Arrival counter, to order datagrams first seen at the same time.
    seq: u64,
    /// The last reassembled datagram, reused across calls.
    out: Vec<u8>,
}

impl fmt::Debug for Reassembler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reassembler")
            .field("limits", &self.limits)
            .field("held_datagrams", &self.datagrams.len())
            .field("held_bytes", &self.held)
            .finish_non_exhaustive()
    }
}

impl Reassembler {
    /// An empty reassembler bounded by `limits`.
    pub fn new(limits: FragLimits) -> Self {
        Reassembler {
            limits,
            datagrams: BTreeMap::new(),
            ages: BTreeMap::new(),
            held: 0,
            seq: 0,
            out: Vec::new(),
        }
    }

    /// Takes one fragment: `packet` is a whole IPv4 packet (header with options, then payload;
    /// bytes past its total length, such as Ethernet padding, are ignored) with MF set or a
    /// non-zero fragment offset.
    ///
    /// Returns `Ok(Some(datagram))` when this fragment completes a datagram: a whole, valid IPv4
    /// packet with the first fragment's header (options included), MF and offset cleared (DF and
    /// the reserved bit as the first fragment had them), total length and checksum recomputed.
    /// The slice borrows an internal buffer that the next call reuses. `Ok(None)`: held, waiting
    /// for more, or an exact duplicate ignored. A packet that is not a fragment is checked and
    /// returned whole.
    ///
    /// Errors: [`FragError::Malformed`] for a packet that is not a valid fragment leaves held
    /// datagrams alone (its key cannot be trusted). Once the header is valid, a fragment that
    /// contradicts its datagram — overlap ([`FragError::Overlap`]), past or disagreeing with the
    /// end the last fragment set ([`FragError::Malformed`]), longer than 65535 bytes in all
    /// ([`FragError::TooLarge`]), too big for the limits ([`FragError::Limit`]) — drops that
    /// datagram.
    pub fn push(&mut self, now: u64, packet: &[u8]) -> Result<Option<&[u8]>, FragError> {
        let h = Header::parse(packet)?;
        let packet = &packet[..h.total];
        if header_checksum(&packet[..h.hlen]) != 0 {
            return Err(FragError::Malformed);
        }
        let more = h.more_fragments();
        let start = h.offset();
        if !more && start == 0 {
            self.out.clear();
            self.out.extend_from_slice(packet);
            return Ok(Some(&self.out));
        }
        let payload = &packet[h.hlen..];
        // Every fragment but the last carries a multiple of 8 bytes, since offsets count 8-byte
        // units (RFC 791 section 3.2); an empty one is nonsense (Linux drops those too).
        if payload.is_empty() || (more && !payload.len().is_multiple_of(8)) {
            return Err(FragError::Malformed);
        }
        let key = Key::of(packet);
        let end = start + payload.len();
        if h.hlen + end > MAX_PACKET {
            self.remove(&key);
            return Err(FragError::TooLarge);
        }
        if let Some(d) = self.datagrams.get(&key) {
            match d.admit(start, payload, more, h.hlen) {
                Admit::Insert => {}
                Admit::Duplicate => return Ok(None),
                Admit::Drop(e) => {
                    self.remove(&key);
                    return Err(e);
                }
            }
        }

        let quote = if start == 0 {
            h.hlen + payload.len().min(QUOTE_PAYLOAD)
        } else {
            0
        };
        let cost = payload.len() + FRAGMENT_RECORD_BYTES + quote;
        self.make_room(&key, cost)?;

        let d = match self.datagrams.entry(key) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => {
                let age = (now, self.seq);
                self.seq = self.seq.wrapping_add(1);
                self.ages.insert(age, key);
                v.insert(Datagram::new(age))
            }
        };
        d.pieces.insert(
            start,
            Piece {
                end,
                at: d.data.len(),
            },
        );
        d.data.extend_from_slice(payload);
        d.received += payload.len();
        d.max_end = d.max_end.max(end);
        if !more {
            d.len = Some(end);
        }
        if start == 0 {
            d.head_len = h.hlen;
            d.head.clear();
            d.head.extend_from_slice(&packet[..quote]);
        }
        d.cost += cost;
        self.held += cost;
        if !d.complete() {
            return Ok(None);
        }

        let Some(d) = self.remove(&key) else {
            return Ok(None);
        };
        self.out.clear();
        self.out.extend_from_slice(&d.head[..d.head_len]);
        for (&s, p) in &d.pieces {
            self.out
                .extend_from_slice(&d.data[p.at..p.at + (p.end - s)]);
        }
        let flags = u16::from_be_bytes([self.out[6], self.out[7]]) & KEEP_FLAGS;
        finish_header(&mut self.out, d.head_len, flags)?;
        Ok(Some(&self.out))
    }

    /// Drops the datagrams whose first fragment arrived `limits.timeout_ns` or more before
    /// `now`, oldest first. For each one whose first fragment (offset 0) had arrived, calls `f`
    /// with that fragment's IP header and first 8 payload bytes: what an ICMP "fragment
    /// reassembly time exceeded" (type 11 code 1) quotes (RFC 792). Without fragment zero no
    /// such message is sent (RFC 1122 section 3.3.2).
    pub fn expire(&mut self, now: u64, mut f: impl FnMut(&[u8])) {
        while let Some((&(seen, _), &key)) = self.ages.first_key_value() {
            if now.saturating_sub(seen) < self.limits.timeout_ns {
                break;
            }
            if let Some(d) = self.remove(&key) {
                if !d.head.is_empty() {
                    f(&d.head);
                }
            }
        }
    }

    /// Bytes counted against [`FragLimits::max_bytes`]: payloads, [`FRAGMENT_RECORD_BYTES`] per
    /// fragment, and each first fragment's header and 8 payload bytes.
    pub fn held_bytes(&self) -> usize {
        self.held
    }

    /// Incomplete datagrams held.
    pub fn held_datagrams(&self) -> usize {
        self.datagrams.len()
    }

    fn remove(&mut self, key: &Key) -> Option<Datagram> {
        let d = self.datagrams.remove(key)?;
        self.ages.remove(&d.age);
        self.held -= d.cost;
        Some(d)
    }

    /// Makes room for `cost` more bytes in the datagram `key` (new or held) by evicting the
    /// oldest other datagrams; drops `key`'s datagram if it cannot fit even alone.
    fn make_room(&mut self, key: &Key, cost: usize) -> Result<(), FragError> {
        let (existing, new) = match self.datagrams.get(key) {
            Some(d) => (d.cost, false),
            None => (0, true),
        };
        if existing + cost > self.limits.max_bytes || (new && self.limits.max_datagrams == 0) {
            self.remove(key);
            return Err(FragError::Limit);
        }
        while self.held + cost > self.limits.max_bytes
            || (new && self.datagrams.len() >= self.limits.max_datagrams)
        {
            // Not reached without a victim: with every other datagram gone, `held` is
            // `existing` and the count is 0 for a new one.
            let Some(&victim) = self.ages.values().find(|k| *k != key) else {
                return Err(FragError::Limit);
            };
            self.remove(&victim);
        }
        Ok(())
    }
}

/// The options of a non-first fragment: those with the copied flag, in order, padded with
/// End of Option List to a multiple of 4 bytes (RFC 791 section 3.1 option format, section 3.2
/// step "copy ... options with the copy flag set"). Errs on a truncated option.
fn copied_options(options: &[u8], into: &mut Vec<u8>) -> Result<(), FragError> {
    let mut i = 0;
    while let Some(&kind) = options.get(i) {
        match kind {
            OPT_EOL => break,
            OPT_NOP => i += 1,
            _ => {
                let len = usize::from(*options.get(i + 1).ok_or(FragError::Malformed)?);
                let opt = options
                    .get(i..i + len)
                    .filter(|_| len >= 2)
                    .ok_or(FragError::Malformed)?;
                if kind & OPT_COPIED != 0 {
                    into.extend_from_slice(opt);
                }
                i += len;
            }
        }
    }
    while !into.len().is_multiple_of(4) {
        into.push(OPT_EOL);
    }
    Ok(())
}

/// Splits a whole IPv4 packet into fragments of total length at most `mtu`, calling `emit` with
/// each: a complete IPv4 packet with a correct header checksum, in offset order (RFC 791
/// section 3.2).
///
/// The first fragment keeps the whole header; the others carry only the options with the copied
/// flag (RFC 791 section 3.1), so their header may be shorter. Every fragment but the last carries
/// a multiple of 8 payload bytes. Identification, TOS, TTL, protocol, addresses and DF/reserved
/// flags are kept. A packet that is already a fragment keeps its offset: the pieces start at it,
/// and the last piece keeps the packet's MF flag, so refragmenting a middle fragment yields
/// middle fragments.
///
/// A packet that fits is emitted unchanged (its first total-length bytes; padding beyond is left
/// out). The header checksum of the input is not verified; every new fragment's is computed.
///
/// Errors ([`FragError::Malformed`], nothing emitted): an `mtu` below [`MIN_MTU`], a packet whose
/// version, IHL, total length or options are invalid, DF set on a packet that needs splitting (the
/// caller should have sent ICMP "fragmentation needed"), an MF-flagged packet whose payload is not
/// a multiple of 8, or one whose end lies beyond 65535 bytes.
pub fn fragment(packet: &[u8], mtu: u16, mut emit: impl FnMut(&[u8])) -> Result<(), FragError> {
    if mtu < MIN_MTU {
        return Err(FragError::Malformed);
    }
    let h = Header::parse(packet)?;
    let packet = &packet[..h.total];
    let mtu = usize::from(mtu);
    if h.total <= mtu {
        emit(packet);
        return Ok(());
    }
    let more = h.more_fragments();
    let base = h.offset();
    let payload = &packet[h.hlen..];
    if h.flags_off & DF != 0
        || (more && !payload.len().is_multiple_of(8))
        || base + payload.len() > MAX_PACKET
    {
        return Err(FragError::Malformed);
    }
    let flags = h.flags_off & KEEP_FLAGS;

    // The header of every fragment but the first: fixed part, then the copied options.
    let mut rest_header = packet[..MIN_HEADER].to_vec();
    copied_options(&packet[MIN_HEADER..h.hlen], &mut rest_header)?;
    let rest_hlen = rest_header.len();
    // IHL; rest_hlen <= h.hlen <= 60, so it fits in 4 bits.
    rest_header[0] = 0x40 | (rest_hlen / 4) as u8;

    // With mtu >= 68 and a header of at most 60 bytes, each fragment carries at least 8 bytes.
    let mut buf = Vec::with_capacity(mtu);
    let mut done = 0;
    while done < payload.len() {
        let header = if done == 0 {
            &packet[..h.hlen]
        } else {
            &rest_header[..]
        };
        let room = (mtu - header.len()) & !7;
        let n = room.min(payload.len() - done);
        let last = done + n == payload.len();
        // base + done <= 65535 and is a multiple of 8, so the offset fits in 13 bits.
        let offset = ((base + done) / 8) as u16 & OFFSET_MASK;
        let mf = if !last || more { MF } else { 0 };
        buf.clear();
        buf.extend_from_slice(header);
        buf.extend_from_slice(&payload[done..done + n]);
        finish_header(&mut buf, header.len(), flags | mf | offset)?;
        emit(&buf);
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SRC: [u8; 4] = [10, 137, 0, 5];
    const DST: [u8; 4] = [93, 184, 216, 34];
    /// An experimental protocol number (RFC 3692), so etherparse parses no transport header.
    const PROTO: u8 = 253;

    /// LSRR (type 0x83, copied) with one address, padded by a NOP to 8 bytes.
    const LSRR: [u8; 8] = [0x83, 7, 4, 192, 0, 2, 1, OPT_NOP];
    /// What non-first fragments carry of [`LSRR`]: the option, then End of Option List padding.
    const LSRR_COPIED: [u8; 8] = [0x83, 7, 4, 192, 0, 2, 1, OPT_EOL];
    /// Record Route (type 7, not copied) with room for two addresses, padded by a NOP.
    const RR: [u8; 12] = [0x07, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, OPT_NOP];

    fn limits() -> FragLimits {
        FragLimits::default()
    }

    /// A whole IPv4 packet with a valid checksum.
    fn packet(id: u16, options: &[u8], payload: &[u8], flags_off: u16) -> Vec<u8> {
        assert_eq!(options.len() % 4, 0);
        let hlen = 20 + options.len();
        let mut p = vec![0u8; hlen];
        p[0] = 0x40 | (hlen / 4) as u8;
        p[1] = 0x10;
        p[2..4].copy_from_slice(&((hlen + payload.len()) as u16).to_be_bytes());
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[6..8].copy_from_slice(&flags_off.to_be_bytes());
        p[8] = 64;
        p[9] = PROTO;
        p[12..16].copy_from_slice(&SRC);
        p[16..20].copy_from_slice(&DST);
        p[20..].copy_from_slice(options);
        p.extend_from_slice(payload);
        set_checksum(&mut p[..hlen]);
        p
    }

    fn payload(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// A fragment of datagram `id` carrying `data` at byte `offset`.
    fn frag(id: u16, offset: usize, data: &[u8], more: bool) -> Vec<u8> {
        assert_eq!(offset % 8, 0);
        let fo = (offset / 8) as u16 | if more { MF } else { 0 };
        packet(id, &[], data, fo)
    }

    fn split(p: &[u8], mtu: u16) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        fragment(p, mtu, |f| v.push(f.to_vec())).expect("fragments");
        v
    }

    /// Checks a packet's header: etherparse parses it and the lengths agree, and the checksum
    /// verifies (summed here independently: etherparse does not keep the reserved flag bit, so
    /// its own checksum differs when that bit is set).
    fn check_valid(p: &[u8]) -> etherparse::Ipv4Header {
        let (hdr, _) = etherparse::Ipv4Header::from_slice(p).expect("etherparse parses the header");
        assert_eq!(usize::from(hdr.total_len), p.len());
        let hlen = usize::from(hdr.ihl()) * 4;
        let mut sum: u64 = 0;
        for i in (0..hlen).step_by(2) {
            sum += u64::from(p[i]) << 8 | u64::from(p[i + 1]);
        }
        assert_eq!(sum % 0xffff, 0, "header checksum");
        hdr
    }

    /// Pushes all `frags`; asserts only the last completes, and returns what it gave.
    fn push_all(r: &mut Reassembler, frags: &[Vec<u8>]) -> Vec<u8> {
        let (last, rest) = frags.split_last().expect("at least one fragment");
        for f in rest {
            assert_eq!(r.push(0, f), Ok(None));
        }
        r.push(0, last)
            .expect("last fragment accepted")
            .expect("last fragment completes")
            .to_vec()
    }

    #[test]
    fn in_order_reverse_and_shuffled() {
        let p = packet(7, &LSRR, &payload(4000, 1), 0);
        let frags = split(&p, 576);
        assert_eq!(frags.len(), 8);
        let mut r = Reassembler::new(limits());
        assert_eq!(push_all(&mut r, &frags), p);
        let mut rev = frags.clone();
        rev.reverse();
        assert_eq!(push_all(&mut r, &rev), p);
        let shuffled: Vec<Vec<u8>> = [3, 0, 6, 1, 7, 4, 2, 5]
            .iter()
            .map(|&i| frags[i].clone())
            .collect();
        assert_eq!(push_all(&mut r, &shuffled), p);
        assert_eq!(r.held_datagrams(), 0);
        assert_eq!(r.held_bytes(), 0);
    }

    #[test]
    fn reassembled_header_is_first_fragments() {
        // Reserved bit and non-copied options survive from the first fragment; MF/offset clear.
        let p = packet(9, &RR, &payload(100, 2), 0x8000);
        let f = split(&p, 68);
        let mut r = Reassembler::new(limits());
        let out = push_all(&mut r, &f);
        assert_eq!(out, p);
        check_valid(&out);
    }

    #[test]
    fn not_a_fragment_is_returned_whole() {
        let p = packet(1, &[], &payload(30, 0), DF);
        let mut padded = p.clone();
        padded.extend_from_slice(&[0; 6]);
        let mut r = Reassembler::new(limits());
        assert_eq!(r.push(0, &padded), Ok(Some(&p[..])));
        assert_eq!(r.held_datagrams(), 0);
    }

    #[test]
    fn fragment_fits_unchanged() {
        let p = packet(3, &RR, &payload(100, 3), DF);
        assert_eq!(split(&p, 1500), vec![p.clone()]);
        assert_eq!(split(&p, p.len() as u16), vec![p]);
    }

    #[test]
    fn fragment_options_and_sizes() {
        let mut opts = RR.to_vec();
        opts.extend_from_slice(&LSRR);
        let p = packet(4, &opts, &payload(1000, 4), 0);
        let f = split(&p, 100);
        // First: 40-byte header + 56; others: 28-byte header (LSRR only) + 72.
        assert_eq!(f[0].len(), 96);
        assert_eq!(&f[0][20..40], &opts[..]);
        for g in &f[1..] {
            assert_eq!(g[0], 0x47);
            assert_eq!(&g[20..28], &LSRR_COPIED);
        }
        assert!(f.iter().all(|g| g.len() <= 100));
        let total: usize = f.iter().map(|g| g.len() - usize::from(g[0] & 15) * 4).sum();
        assert_eq!(total, 1000);
        for g in &f {
            check_valid(g);
        }
    }

    #[test]
    fn refragment_middle_fragment() {
        // A middle fragment at offset 800 with MF: the pieces continue from 800 and all keep MF.
        let m = frag(5, 800, &payload(400, 5), true);
        let f = split(&m, 200);
        assert_eq!(f.len(), 3);
        let mut at = 800;
        for g in &f {
            let h = check_valid(g);
            assert!(h.more_fragments);
            assert_eq!(usize::from(h.fragment_offset.value()) * 8, at);
            at += g.len() - 20;
        }
        assert_eq!(at, 1200);
        // A last fragment: only the final piece has MF clear.
        let l = frag(5, 800, &payload(401, 5), false);
        let f = split(&l, 200);
        let mfs: Vec<bool> = f.iter().map(|g| check_valid(g).more_fragments).collect();
        assert_eq!(mfs, [true, true, false]);
    }

    #[test]
    fn fragment_rejects() {
        let p = packet(6, &[], &payload(200, 6), 0);
        let none = |_: &[u8]| panic!("emitted");
        assert_eq!(fragment(&p, 67, none), Err(FragError::Malformed));
        assert_eq!(fragment(&p, 0, none), Err(FragError::Malformed));
        let df = packet(6, &[], &payload(200, 6), DF);
        assert_eq!(fragment(&df, 100, none), Err(FragError::Malformed));
        assert_eq!(fragment(&p[..100], 100, none), Err(FragError::Malformed));
        assert_eq!(fragment(&[], 100, none), Err(FragError::Malformed));
        // MF with a payload not a multiple of 8.
        let odd = packet(6, &[], &payload(201, 6), MF);
        assert_eq!(fragment(&odd, 100, none), Err(FragError::Malformed));
        // A truncated option (length past the header).
        let bad = packet(6, &[0x83, 9, 4, 0], &payload(200, 6), 0);
        assert_eq!(fragment(&bad, 100, none), Err(FragError::Malformed));
        // Option length below 2.
        let bad = packet(6, &[0x83, 1, 0, 0], &payload(200, 6), 0);
        assert_eq!(fragment(&bad, 100, none), Err(FragError::Malformed));
        // A fragment whose end is past 65535.
        let far = packet(6, &[], &payload(200, 6), 8180);
        assert_eq!(fragment(&far, 100, none), Err(FragError::Malformed));
    }

    #[test]
    fn overlap_drops_datagram() {
        let mut r = Reassembler::new(limits());
        assert_eq!(r.push(0, &frag(1, 0, &payload(16, 0), true)), Ok(None));
        assert_eq!(r.push(0, &frag(1, 32, &payload(16, 0), true)), Ok(None));
        assert_eq!(r.held_datagrams(), 1);
        // Overlaps the start of the second piece.
        assert_eq!(
            r.push(0, &frag(1, 24, &payload(16, 0), true)),
            Err(FragError::Overlap)
        );
        assert_eq!((r.held_datagrams(), r.held_bytes()), (0, 0));

        // Overlapping the end of an earlier piece, and containing a piece.
        for (off, len) in [(8, 16), (16, 64), (0, 8)] {
            assert_eq!(r.push(0, &frag(2, 0, &payload(16, 0), true)), Ok(None));
            assert_eq!(r.push(0, &frag(2, 32, &payload(16, 0), true)), Ok(None));
            let e = r.push(0, &frag(2, off, &payload(len, 0), true));
            assert_eq!(e, Err(FragError::Overlap), "{off} {len}");
            assert_eq!(r.held_datagrams(), 0);
        }
        // Same range, different bytes.
        assert_eq!(r.push(0, &frag(3, 8, &payload(16, 0), true)), Ok(None));
        assert_eq!(
            r.push(0, &frag(3, 8, &payload(16, 1), true)),
            Err(FragError::Overlap)
        );
        assert_eq!(r.held_datagrams(), 0);
    }

    #[test]
    fn exact_duplicate_ignored() {
        let p = packet(8, &[], &payload(300, 8), 0);
        let f = split(&p, 100);
        let mut r = Reassembler::new(limits());
        assert_eq!(r.push(0, &f[0]), Ok(None));
        let held = r.held_bytes();
        assert_eq!(r.push(0, &f[0]), Ok(None));
        assert_eq!(r.held_bytes(), held);
        assert_eq!(push_all(&mut r, &f[1..]), p);
    }

    #[test]
    fn inconsistent_end_drops_datagram() {
        let mut r = Reassembler::new(limits());
        // Last fragment ends at 24; one beyond it is inconsistent.
        assert_eq!(r.push(0, &frag(1, 16, &payload(8, 0), false)), Ok(None));
        assert_eq!(
            r.push(0, &frag(1, 24, &payload(8, 0), true)),
            Err(FragError::Malformed)
        );
        assert_eq!(r.held_datagrams(), 0);
        // A last fragment ending before data already held.
        assert_eq!(r.push(0, &frag(2, 40, &payload(8, 0), true)), Ok(None));
        assert_eq!(
            r.push(0, &frag(2, 8, &payload(8, 0), false)),
            Err(FragError::Malformed)
        );
        assert_eq!(r.held_datagrams(), 0);
        // Two last fragments disagreeing.
        assert_eq!(r.push(0, &frag(3, 16, &payload(8, 0), false)), Ok(None));
        assert_eq!(
            r.push(0, &frag(3, 32, &payload(8, 0), false)),
            Err(FragError::Malformed)
        );
        assert_eq!(r.held_datagrams(), 0);
    }

    #[test]
    fn too_large() {
        let mut r = Reassembler::new(limits());
        assert_eq!(r.push(0, &frag(1, 0, &payload(8, 0), true)), Ok(None));
        // 65528 + 8 + 20 > 65535.
        assert_eq!(
            r.push(0, &frag(1, 65528, &payload(8, 0), false)),
            Err(FragError::TooLarge)
        );
        assert_eq!(r.held_datagrams(), 0);
        // Fits with a 20-byte header, not with the first fragment's 40-byte one.
        let last = frag(2, 65496, &payload(16, 0), false);
        assert_eq!(r.push(0, &last), Ok(None));
        let first = packet(
            2,
            &[
                0x83, 7, 4, 0, 0, 0, 0, 0, 0x83, 7, 4, 0, 0, 0, 0, 0, 1, 1, 1, 1,
            ],
            &payload(8, 0),
            MF,
        );
        assert_eq!(r.push(0, &first), Err(FragError::TooLarge));
        assert_eq!(r.held_datagrams(), 0);
    }

    #[test]
    fn malformed_rejected() {
        let mut r = Reassembler::new(limits());
        let good = frag(1, 0, &payload(16, 0), true);
        assert_eq!(r.push(0, &good), Ok(None));
        let held = (r.held_datagrams(), r.held_bytes());

        let mut bad_sum = good.clone();
        bad_sum[10] ^= 1;
        let mut v6 = good.clone();
        v6[0] = 0x65;
        set_checksum(&mut v6[..20]);
        let mut ihl4 = good.clone();
        ihl4[0] = 0x44;
        set_checksum(&mut ihl4[..20]);
        let mut ihl_big = good.clone();
        ihl_big[0] = 0x4f; // 60-byte header in a 36-byte packet
        set_checksum(&mut ihl_big[..20]);
        let mut long = good.clone();
        long[2..4].copy_from_slice(&100u16.to_be_bytes());
        set_checksum(&mut long[..20]);
        let mut short = good.clone();
        short[2..4].copy_from_slice(&19u16.to_be_bytes());
        set_checksum(&mut short[..20]);
        let cases = [
            bad_sum,
            v6,
            ihl4,
            ihl_big,
            long,
            short,
            good[..19].to_vec(),
            good[..30].to_vec(),
            Vec::new(),
            frag(1, 16, &payload(12, 0), true), // non-last, not a multiple of 8
            frag(1, 16, &[], true),             // empty
            frag(1, 16, &[], false),            // empty last
        ];
        for (i, c) in cases.iter().enumerate() {
            assert_eq!(r.push(0, c), Err(FragError::Malformed), "case {i}");
        }
        // The held datagram is untouched.
        assert_eq!((r.held_datagrams(), r.held_bytes()), held);
        assert_eq!(
            r.push(0, &frag(1, 16, &payload(5, 0), false))
                .expect("accepted")
                .map(<[u8]>::len),
            Some(41)
        );
    }

    #[test]
    fn byte_limit_evicts_oldest() {
        // A first fragment with 96 payload bytes costs 96 + record + 20-byte header + 8.
        let cost = 96 + FRAGMENT_RECORD_BYTES + 28;
        let mut r = Reassembler::new(FragLimits {
            max_bytes: 3 * cost,
            max_datagrams: 100,
            timeout_ns: 1000,
        });
        let first = |id: u16| frag(id, 0, &payload(96, id as u8), true);
        for id in 0..3u16 {
            assert_eq!(r.push(u64::from(id), &first(id)), Ok(None));
        }
        assert_eq!((r.held_datagrams(), r.held_bytes()), (3, 3 * cost));
        // A fourth evicts datagram 0, the oldest.
        assert_eq!(r.push(3, &first(3)), Ok(None));
        assert_eq!((r.held_datagrams(), r.held_bytes()), (3, 3 * cost));
        // Growing datagram 1 (now the oldest) evicts datagram 2, not itself.
        assert_eq!(r.push(4, &frag(1, 96, &payload(96, 0), true)), Ok(None));
        assert_eq!(r.held_datagrams(), 2);
        assert_eq!(r.held_bytes(), 2 * cost + 96 + FRAGMENT_RECORD_BYTES);
        // A datagram that cannot fit even alone is refused, evicting nothing.
        let big = frag(9, 0, &payload((3 * cost).next_multiple_of(8), 0), true);
        assert_eq!(r.push(5, &big), Err(FragError::Limit));
        assert_eq!(r.held_datagrams(), 2);
        let mut ids = Vec::new();
        r.expire(u64::MAX, |q| ids.push(u16::from_be_bytes([q[4], q[5]])));
        assert_eq!(ids, [1, 3]);

        // A held datagram that grows past the limit alone is dropped with Limit.
        assert_eq!(r.push(0, &first(1)), Ok(None));
        assert_eq!(r.push(0, &first(2)), Ok(None));
        let grow = frag(2, 96, &payload(2 * cost, 0), true);
        assert_eq!(r.push(1, &grow), Err(FragError::Limit));
        assert_eq!((r.held_datagrams(), r.held_bytes()), (1, cost));
    }

    #[test]
    fn eviction_order_is_first_seen() {
        let mut r = Reassembler::new(FragLimits {
            max_bytes: 1 << 20,
            max_datagrams: 2,
            timeout_ns: 100,
        });
        // Datagrams 1 and 2 with first fragments, so expiry can tell who is held.
        let first = |id| frag(id, 0, &payload(8, id as u8), true);
        assert_eq!(r.push(10, &first(1)), Ok(None));
        assert_eq!(r.push(20, &first(2)), Ok(None));
        // A later fragment of 1 does not make it younger.
        assert_eq!(r.push(30, &frag(1, 8, &payload(8, 0), true)), Ok(None));
        assert_eq!(r.push(40, &first(3)), Ok(None));
        assert_eq!(r.held_datagrams(), 2);
        let mut ids = Vec::new();
        r.expire(1000, |q| ids.push(u16::from_be_bytes([q[4], q[5]])));
        assert_eq!(ids, [2, 3]);
        assert_eq!((r.held_datagrams(), r.held_bytes()), (0, 0));
    }

    #[test]
    fn datagram_limit() {
        let mut r = Reassembler::new(FragLimits {
            max_bytes: 1 << 20,
            max_datagrams: 0,
            timeout_ns: 100,
        });
        assert_eq!(
            r.push(0, &frag(1, 0, &payload(8, 0), true)),
            Err(FragError::Limit)
        );
        let mut r = Reassembler::new(FragLimits {
            max_bytes: 1 << 20,
            max_datagrams: 1,
            timeout_ns: 100,
        });
        for id in 0..5 {
            assert_eq!(
                r.push(id, &frag(id as u16, 0, &payload(8, 0), true)),
                Ok(None)
            );
            assert_eq!(r.held_datagrams(), 1);
        }
        // Completing the one held still works.
        assert!(r
            .push(5, &frag(4, 8, &payload(3, 0), false))
            .expect("accepted")
            .is_some());
    }

    #[test]
    fn expiry() {
        let t = 30_000_000_000;
        let mut r = Reassembler::new(limits());
        let p = packet(1, &LSRR, &payload(100, 7), 0);
        let f = split(&p, 68);
        // Datagram 1: first fragment seen at 0. Datagram 2: only a later fragment, seen at 5.
        assert_eq!(r.push(0, &f[0]), Ok(None));
        assert_eq!(r.push(5, &frag(2, 64, &payload(8, 0), true)), Ok(None));
        assert_eq!(r.push(t - 1, &f[1]), Ok(None));
        let mut quotes = Vec::new();
        r.expire(t - 1, |q| quotes.push(q.to_vec()));
        assert!(quotes.is_empty());
        assert_eq!(r.held_datagrams(), 2);
        r.expire(t, |q| quotes.push(q.to_vec()));
        // Header (28 bytes) + first 8 payload bytes, exactly as the first fragment had them.
        assert_eq!(quotes, [f[0][..36].to_vec()]);
        assert_eq!(r.held_datagrams(), 1);
        r.expire(t + 5, |q| quotes.push(q.to_vec()));
        assert_eq!(quotes.len(), 1);
        assert_eq!((r.held_datagrams(), r.held_bytes()), (0, 0));
        // Time going backwards expires nothing and does not panic.
        assert_eq!(r.push(t * 2, &f[0]), Ok(None));
        r.expire(0, |_| panic!("expired"));
        assert_eq!(r.held_datagrams(), 1);
    }

    #[test]
    fn largest_datagram_in_smallest_fragments() {
        // 65535 bytes in the 48-byte pieces of a 68-byte MTU (1365 fragments), permuted
        // (557 is coprime to 1365).
        let p = packet(11, &[], &payload(65535 - 20, 11), 0);
        let mut f = split(&p, 68);
        assert_eq!(f.len(), 1365);
        let n = f.len();
        f = (0..n).map(|i| f[(i * 557) % n].clone()).collect();
        let mut r = Reassembler::new(limits());
        assert_eq!(push_all(&mut r, &f), p);
        // A 60-byte header of copied options (ten Router Alerts, RFC 2113: type 0x94, copied),
        // in every fragment: 8 payload bytes each.
        let opts = [[0x94, 4, 0, 0]; 10].concat();
        let p = packet(12, &opts, &payload(65535 - 60, 12), 0);
        let f = split(&p, 68);
        assert!(f.iter().all(|g| g.len() <= 68 && g[0] == 0x4f));
        assert_eq!(push_all(&mut r, &f), p);
    }

    #[test]
    fn display() {
        assert_eq!(FragError::Overlap.to_string(), "overlapping IPv4 fragments");
    }

    /// Options: none, copied LSRR, non-copied RR, or both.
    fn options() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(Vec::new()),
            Just(LSRR.to_vec()),
            Just(RR.to_vec()),
            Just([&RR[..], &LSRR[..]].concat()),
            Just([&LSRR[..], &RR[..]].concat()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// fragment() then push() of every piece, in a random order, gives back the packet.
        #[test]
        fn roundtrip(
            opts in options(),
            len in prop_oneof![0usize..3000, 0usize..=65000],
            mtu in prop_oneof![68u16..=100, 68u16..=1500],
            seed in any::<u64>(),
        ) {
            let len = len.min(65535 - 20 - opts.len());
            let p = packet(0x1234, &opts, &payload(len, seed as u8), 0);
            let mut frags = split(&p, mtu);
            let copied: Vec<u8> = if opts.contains(&0x83) { LSRR_COPIED.to_vec() } else { Vec::new() };
            let mut oracle = etherparse::defrag::IpDefragPool::<(), ()>::new();
            let mut oracle_out = None;
            let mut next = 0;
            for (i, f) in frags.iter().enumerate() {
                prop_assert!(f.len() <= usize::from(mtu));
                let h = check_valid(f);
                let hlen = usize::from(h.ihl()) * 4;
                prop_assert_eq!(usize::from(h.fragment_offset.value()) * 8, next);
                next += f.len() - hlen;
                if frags.len() > 1 {
                    prop_assert_eq!(h.more_fragments, i + 1 < frags.len());
                    if h.more_fragments {
                        prop_assert_eq!((f.len() - hlen) % 8, 0);
                    }
                    if i > 0 {
                        prop_assert_eq!(&f[20..hlen], &copied[..]);
                    }
                    let s = etherparse::SlicedPacket::from_ip(f).expect("etherparse slices the fragment");
                    if let Some(o) = oracle.process_sliced_packet(&s, (), ()).expect("etherparse defragments") {
                        oracle_out = Some(o.payload);
                    }
                }
            }
            prop_assert_eq!(next, len);
            if frags.len() > 1 {
                prop_assert_eq!(oracle_out.as_deref(), Some(&p[20 + opts.len()..]));
            }
            // Deterministic shuffle from the seed.
            let mut s = seed;
            for i in (1..frags.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                frags.swap(i, (s >> 33) as usize % (i + 1));
            }
            let mut r = Reassembler::new(limits());
            let out = push_all(&mut r, &frags);
            prop_assert_eq!(out, p);
            prop_assert_eq!((r.held_datagrams(), r.held_bytes()), (0, 0));
        }

        /// Refragmenting a fragment to a smaller MTU and reassembling everything still works.
        #[test]
        fn refragment_roundtrip(
            len in 100usize..5000,
            mtu1 in 200u16..=1500,
            mtu2 in 68u16..200,
        ) {
            let p = packet(77, &LSRR, &payload(len, 9), 0);
            let mut all = Vec::new();
            for f in split(&p, mtu1) {
                all.extend(split(&f, mtu2));
            }
            all.reverse();
            let mut r = Reassembler::new(limits());
            prop_assert_eq!(push_all(&mut r, &all), p);
        }

        /// Random and mutated fragments never panic and never exceed the limits.
        #[test]
        fn fuzz(
            ops in prop::collection::vec(
                (0u16..4, 0usize..40, 1usize..200, any::<bool>(),
                 prop::option::of((0usize..60, any::<u8>())), 0u64..50, any::<bool>()),
                1..200,
            ),
            max_bytes in 0usize..2000,
            max_datagrams in 0usize..4,
            raw in prop::collection::vec(any::<u8>(), 0..100),
        ) {
            let lim = FragLimits { max_bytes, max_datagrams, timeout_ns: 20 };
            let mut r = Reassembler::new(lim);
            let mut now = 0;
            let _ = r.push(now, &raw);
            let _ = fragment(&raw, 68, |_| {});
            for (id, off8, len, more, mutation, dt, fix) in ops {
                now += dt;
                let mut f = frag(id, off8 * 8, &payload(len, id as u8), more);
                if let Some((at, x)) = mutation {
                    if let Some(b) = f.get_mut(at) {
                        *b = x;
                    }
                    if fix && f.len() >= 20 && (f[0] & 15) == 5 {
                        set_checksum(&mut f[..20]);
                    }
                }
                let _ = r.push(now, &f);
                prop_assert!(r.held_bytes() <= max_bytes);
                prop_assert!(r.held_datagrams() <= max_datagrams);
                let _ = fragment(&f, 68 + (len as u16 % 100), |g| {
                    assert!(g.len() <= 68 + len % 100);
                });
                if dt % 7 == 0 {
                    r.expire(now, |q| assert!(q.len() >= 28 && q.len() <= 68));
                }
            }
            r.expire(u64::MAX, |_| {});
            prop_assert_eq!((r.held_datagrams(), r.held_bytes()), (0, 0));
        }

        /// Real fragments of a few datagrams, duplicated, dropped, reordered and corrupted:
        /// no panic, limits kept, and whatever completes is a valid packet of the right length.
        #[test]
        fn fuzz_mutated_fragments(
            lens in prop::collection::vec(1usize..3000, 1..4),
            mtu in 68u16..600,
            picks in prop::collection::vec(
                (any::<prop::sample::Index>(), prop::option::weighted(0.2, (any::<prop::sample::Index>(), any::<u8>())), any::<bool>()),
                1..300,
            ),
            max_bytes in prop_oneof![0usize..3000, Just(1usize << 20)],
            max_datagrams in 0usize..4,
        ) {
            let mut pool = Vec::new();
            for (i, &len) in lens.iter().enumerate() {
                let opts = if i % 2 == 0 { &LSRR[..] } else { &RR[..] };
                pool.extend(split(&packet(i as u16, opts, &payload(len, i as u8), 0), mtu));
            }
            let lim = FragLimits { max_bytes, max_datagrams, timeout_ns: 50 };
            let mut r = Reassembler::new(lim);
            for (now, (pick, mutation, fix)) in picks.into_iter().enumerate() {
                let mut f = pool[pick.index(pool.len())].clone();
                if let Some((at, x)) = mutation {
                    let at = at.index(f.len());
                    f[at] = x;
                    if fix && f.len() >= 20 {
                        let hlen = (usize::from(f[0] & 15) * 4).clamp(20, f.len());
                        set_checksum(&mut f[..hlen]);
                    }
                }
                if let Ok(Some(d)) = r.push(now as u64, &f) {
                    let h = Header::parse(d).expect("a valid header");
                    prop_assert_eq!(h.total, d.len());
                    prop_assert_eq!(header_checksum(&d[..h.hlen]), 0);
                    prop_assert_eq!(h.flags_off & (MF | OFFSET_MASK), 0);
                }
                prop_assert!(r.held_bytes() <= max_bytes);
                prop_assert!(r.held_datagrams() <= max_datagrams);
                r.expire(now as u64, |q| assert!((28..=68).contains(&q.len())));
            }
        }
    }
}
