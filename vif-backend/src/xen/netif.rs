//! Xen netif: the slot layouts of the TX and RX rings and how one packet spreads over
//! slots, per `io/netif.h` (github.com/xen-project/xen, `xen/include/public/io/netif.h`).
//!
//! Both rings are one-page [`ring`](super::ring)s of 256 slots. On the TX ring the front
//! end sends: a packet is a first request (`size` = the whole packet), optional extra-info
//! slots, then further requests while `NETTXF_more_data`. On the RX ring the front end
//! posts empty pages and the back end answers each with a response that says how many
//! bytes it put there. This module turns between those slots and a packet's pieces and
//! its [`Offload`], for both ends, without touching grants: the caller copies the bytes.
//!
//! Every slot a peer wrote is parsed from a copy and checked before anything is planned
//! from it; what a hostile peer could get wrong is an [`AssemblyError`], never a panic or
//! a piece reaching outside its page.

use std::fmt;

use super::ring::ring_size;
use super::{GrantRef, PAGE_SIZE};
use crate::offload::{Csum, Gso, GsoKind, Offload};

/// Bytes per TX ring slot: the union of `netif_tx_request` (12) and `netif_tx_response`.
pub const TX_SLOT: usize = 12;
/// Bytes per RX ring slot: `netif_rx_request` and `netif_rx_response` are both 8.
pub const RX_SLOT: usize = 8;
/// Slots of the TX ring: `__CONST_RING_SIZE(netif_tx, 4096)`.
pub const TX_RING_SIZE: u32 = ring_size(PAGE_SIZE, TX_SLOT);
/// Slots of the RX ring: `__CONST_RING_SIZE(netif_rx, 4096)`.
pub const RX_RING_SIZE: u32 = ring_size(PAGE_SIZE, RX_SLOT);

/// The slots per packet a back end must accept from any front end
/// (`XEN_NETIF_NR_SLOTS_MIN`, the old Linux `MAX_SKB_FRAGS`).
pub const XEN_NETIF_NR_SLOTS_MIN: usize = 18;
/// The largest packet a TX request can describe: its first `size` is 16 bits
/// (`XEN_NETIF_MAX_TX_SIZE`).
pub const XEN_NETIF_MAX_TX_SIZE: usize = 0xffff;
/// An Ethernet header; shorter packets are dropped (Linux netback, "Bad packet size").
pub const ETH_HLEN: usize = 14;
/// The largest frame either direction carries: a 64 KiB GSO super-frame and its Ethernet
/// header.
pub const MAX_FRAME: usize = 65_535 + ETH_HLEN;

/// `NETTXF_*`: flags of a TX request.
pub const NETTXF_CSUM_BLANK: u16 = 1 << 0;
pub const NETTXF_DATA_VALIDATED: u16 = 1 << 1;
pub const NETTXF_MORE_DATA: u16 = 1 << 2;
pub const NETTXF_EXTRA_INFO: u16 = 1 << 3;

/// `NETRXF_*`: flags of an RX response. The checksum bits are swapped against TX.
pub const NETRXF_DATA_VALIDATED: u16 = 1 << 0;
pub const NETRXF_CSUM_BLANK: u16 = 1 << 1;
pub const NETRXF_MORE_DATA: u16 = 1 << 2;
pub const NETRXF_EXTRA_INFO: u16 = 1 << 3;
/// Deprecated (a GSO descriptor before the data); never sent here, refused if received.
pub const NETRXF_GSO_PREFIX: u16 = 1 << 4;

/// `NETIF_RSP_*`: response statuses. An RX status above 0 is a byte count instead.
pub const NETIF_RSP_OKAY: i16 = 0;
/// The answer to a TX slot that held an extra-info descriptor.
pub const NETIF_RSP_NULL: i16 = 1;
pub const NETIF_RSP_ERROR: i16 = -1;
pub const NETIF_RSP_DROPPED: i16 = -2;

/// `XEN_NETIF_EXTRA_TYPE_*`.
pub const XEN_NETIF_EXTRA_TYPE_NONE: u8 = 0;
pub const XEN_NETIF_EXTRA_TYPE_GSO: u8 = 1;
pub const XEN_NETIF_EXTRA_TYPE_MCAST_ADD: u8 = 2;
pub const XEN_NETIF_EXTRA_TYPE_MCAST_DEL: u8 = 3;
pub const XEN_NETIF_EXTRA_TYPE_HASH: u8 = 4;
const XEN_NETIF_EXTRA_TYPE_MAX: u8 = 5;
/// `XEN_NETIF_EXTRA_FLAG_MORE`: another extra-info slot follows.
pub const XEN_NETIF_EXTRA_FLAG_MORE: u8 = 1 << 0;

/// `XEN_NETIF_GSO_TYPE_*`.
pub const XEN_NETIF_GSO_TYPE_NONE: u8 = 0;
pub const XEN_NETIF_GSO_TYPE_TCPV4: u8 = 1;
pub const XEN_NETIF_GSO_TYPE_TCPV6: u8 = 2;

/// Extra-info slots one packet may carry: each type once at most, so a chain longer than
/// the number of types never ends legitimately.
pub const MAX_EXTRAS: usize = (XEN_NETIF_EXTRA_TYPE_MAX - 1) as usize;

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// `struct netif_tx_request` (netif.h "tx request data"), 12 bytes little-endian:
///
/// ```text
/// 0 gref u32 | 4 offset u16 | 6 flags u16 | 8 id u16 | 10 size u16
/// ```
///
/// `size` is the whole packet's in its first request, the fragment's in the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxRequest {
    pub gref: GrantRef,
    pub offset: u16,
    pub flags: u16,
    pub id: u16,
    pub size: u16,
}

impl TxRequest {
    pub const LEN: usize = 12;

    pub fn parse(b: &[u8; TX_SLOT]) -> Self {
        TxRequest {
            gref: GrantRef(le32(b, 0)),
            offset: le16(b, 4),
            flags: le16(b, 6),
            id: le16(b, 8),
            size: le16(b, 10),
        }
    }

    pub fn to_bytes(&self) -> [u8; TX_SLOT] {
        let mut b = [0u8; TX_SLOT];
        b[0..4].copy_from_slice(&self.gref.0.to_le_bytes());
        b[4..6].copy_from_slice(&self.offset.to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..10].copy_from_slice(&self.id.to_le_bytes());
        b[10..12].copy_from_slice(&self.size.to_le_bytes());
        b
    }
}

/// `struct netif_tx_response` (netif.h "tx response"): `id u16, status i16` in the first
/// 4 bytes of a 12-byte slot; the rest is written as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxResponse {
    pub id: u16,
    pub status: i16,
}

impl TxResponse {
    pub fn parse(b: &[u8; TX_SLOT]) -> Self {
        TxResponse {
            id: le16(b, 0),
            status: le16(b, 2) as i16,
        }
    }

    pub fn to_bytes(&self) -> [u8; TX_SLOT] {
        let mut b = [0u8; TX_SLOT];
        b[0..2].copy_from_slice(&self.id.to_le_bytes());
        b[2..4].copy_from_slice(&self.status.to_le_bytes());
        b
    }
}

/// `struct netif_rx_request` (netif.h "rx request"), 8 bytes:
/// `0 id u16 | 2 pad u16 | 4 gref u32`. The page behind `gref` is granted writable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxRequest {
    pub id: u16,
    pub gref: GrantRef,
}

impl RxRequest {
    pub fn parse(b: &[u8; RX_SLOT]) -> Self {
        RxRequest {
            id: le16(b, 0),
            gref: GrantRef(le32(b, 4)),
        }
    }

    pub fn to_bytes(&self) -> [u8; RX_SLOT] {
        let mut b = [0u8; RX_SLOT];
        b[0..2].copy_from_slice(&self.id.to_le_bytes());
        b[4..8].copy_from_slice(&self.gref.0.to_le_bytes());
        b
    }
}

/// `struct netif_rx_response` (netif.h "rx response"), 8 bytes:
/// `0 id u16 | 2 offset u16 | 4 flags u16 | 6 status i16`. A status above 0 is the bytes
/// in this slot's page (every slot's own, the first's included), below 0 an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxResponse {
    pub id: u16,
    pub offset: u16,
    pub flags: u16,
    pub status: i16,
}

impl RxResponse {
    pub fn parse(b: &[u8; RX_SLOT]) -> Self {
        RxResponse {
            id: le16(b, 0),
            offset: le16(b, 2),
            flags: le16(b, 4),
            status: le16(b, 6) as i16,
        }
    }

    pub fn to_bytes(&self) -> [u8; RX_SLOT] {
        let mut b = [0u8; RX_SLOT];
        b[0..2].copy_from_slice(&self.id.to_le_bytes());
        b[2..4].copy_from_slice(&self.offset.to_le_bytes());
        b[4..6].copy_from_slice(&self.flags.to_le_bytes());
        b[6..8].copy_from_slice(&self.status.to_le_bytes());
        b
    }
}

/// `struct netif_extra_info` (netif.h "extra info"), 8 bytes, overlaying a TX request or
/// an RX response slot: `0 type u8 | 1 flags u8 | 2 type-specific [u8; 6]`. For
/// `XEN_NETIF_EXTRA_TYPE_GSO` the specific part is `size u16 (the MSS) | type u8 | pad u8 |
/// features u16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtraInfo {
    pub kind: u8,
    pub flags: u8,
    pub data: [u8; 6],
}

/// The `u.gso` member of an extra-info slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GsoExtra {
    pub size: u16,
    pub gso_type: u8,
    pub features: u16,
}

impl ExtraInfo {
    pub const LEN: usize = 8;

    /// Parses the first 8 bytes of a slot; `None` if there are fewer.
    pub fn parse(b: &[u8]) -> Option<Self> {
        let b = b.get(..Self::LEN)?;
        let mut data = [0u8; 6];
        data.copy_from_slice(&b[2..8]);
        Some(ExtraInfo {
            kind: b[0],
            flags: b[1],
            data,
        })
    }

    pub fn to_bytes(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = self.kind;
        b[1] = self.flags;
        b[2..8].copy_from_slice(&self.data);
        b
    }

    /// The slot on the TX ring: the 8 bytes, then zeros ("padding for tx").
    pub fn to_tx_slot(&self) -> [u8; TX_SLOT] {
        let mut b = [0u8; TX_SLOT];
        b[..8].copy_from_slice(&self.to_bytes());
        b
    }

    /// A GSO descriptor, the last of its chain.
    pub fn gso(g: GsoExtra) -> Self {
        let mut data = [0u8; 6];
        data[0..2].copy_from_slice(&g.size.to_le_bytes());
        data[2] = g.gso_type;
        data[4..6].copy_from_slice(&g.features.to_le_bytes());
        ExtraInfo {
            kind: XEN_NETIF_EXTRA_TYPE_GSO,
            flags: 0,
            data,
        }
    }

    /// `XEN_NETIF_EXTRA_FLAG_MORE`.
    pub fn more(&self) -> bool {
        self.flags & XEN_NETIF_EXTRA_FLAG_MORE != 0
    }

    /// The GSO member, if this is a GSO descriptor.
    pub fn as_gso(&self) -> Option<GsoExtra> {
        (self.kind == XEN_NETIF_EXTRA_TYPE_GSO).then(|| GsoExtra {
            size: le16(&self.data, 0),
            gso_type: self.data[2],
            features: le16(&self.data, 4),
        })
    }
}

/// The segmentation netif can describe: TCP only (`XEN_NETIF_GSO_TYPE_TCPV4`/`TCPV6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GsoType {
    TcpV4,
    TcpV6,
}

/// A GSO super-frame as netif describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GsoInfo {
    pub ty: GsoType,
    /// Payload bytes per segment (the descriptor's `size`).
    pub mss: u16,
}

impl GsoInfo {
    fn extra(&self) -> ExtraInfo {
        ExtraInfo::gso(GsoExtra {
            size: self.mss,
            gso_type: match self.ty {
                GsoType::TcpV4 => XEN_NETIF_GSO_TYPE_TCPV4,
                GsoType::TcpV6 => XEN_NETIF_GSO_TYPE_TCPV6,
            },
            features: 0,
        })
    }
}

/// What the peer's GSO features (`feature-gso-tcpv4`, `feature-gso-tcpv6` in XenStore)
/// say it accepts: without them, no super-frame may be sent to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PeerGso {
    pub tcpv4: bool,
    pub tcpv6: bool,
}

impl PeerGso {
    fn accepts(&self, ty: GsoType) -> bool {
        match ty {
            GsoType::TcpV4 => self.tcpv4,
            GsoType::TcpV6 => self.tcpv6,
        }
    }
}

/// A packet's offload state in netif's terms: the two checksum flags and a GSO extra.
/// Netif carries no checksum offsets or header length; those come from the frame itself
/// (as Linux netback's `checksum_setup` finds them), in [`PacketMeta::to_offload`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PacketMeta {
    /// The transport checksum holds only the pseudo-header sum.
    pub csum_blank: bool,
    /// The checksum is known good (or will be made good: `csum_blank` implies it).
    pub data_validated: bool,
    pub gso: Option<GsoInfo>,
}

/// Why offload metadata does not translate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaError {
    /// A GSO kind netif cannot describe (UDP); the frame must be segmented first.
    UnsupportedGso(GsoKind),
    /// GSO with a segment size of 0.
    ZeroMss,
    /// `csum_blank` or GSO on a frame without a TCP/UDP header we can find (IPv4 or IPv6
    /// over untagged Ethernet, not a fragment); Linux netback drops these too.
    NoTransportHeader,
    /// A TCPv4 GSO descriptor on an IPv6 frame, or the reverse.
    GsoMismatch,
}

impl fmt::Display for MetaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaError::UnsupportedGso(k) => write!(f, "netif cannot describe {k:?} GSO"),
            MetaError::ZeroMss => write!(f, "GSO with a segment size of 0"),
            MetaError::NoTransportHeader => {
                write!(f, "checksum or GSO offload without a TCP/UDP header")
            }
            MetaError::GsoMismatch => write!(f, "GSO type does not match the IP version"),
        }
    }
}

impl std::error::Error for MetaError {}

impl PacketMeta {
    /// The netif description of a frame's offload. A partial checksum sets both flags, a
    /// verified one `data_validated` (as Linux netfront and netback map `CHECKSUM_PARTIAL`
    /// and `CHECKSUM_UNNECESSARY`).
    pub fn from_offload(o: &Offload) -> Result<Self, MetaError> {
        let (csum_blank, data_validated) = match o.csum {
            Csum::Partial { .. } => (true, true),
            Csum::Verified => (false, true),
            Csum::Complete => (false, false),
        };
        let gso = match o.gso {
            None => None,
            Some(g) => {
                let ty = match g.kind {
                    GsoKind::TcpV4 => GsoType::TcpV4,
                    GsoKind::TcpV6 => GsoType::TcpV6,
                    k => return Err(MetaError::UnsupportedGso(k)),
                };
                if g.size == 0 {
                    return Err(MetaError::ZeroMss);
                }
                Some(GsoInfo { ty, mss: g.size })
            }
        };
        Ok(PacketMeta {
            csum_blank,
            data_validated,
            gso,
        })
    }

    /// The project's [`Offload`] for an assembled `frame` with this metadata: checksum
    /// offsets and the GSO header length found from the frame's headers.
    pub fn to_offload(&self, frame: &[u8]) -> Result<Offload, MetaError> {
        let l4 = if self.csum_blank || self.gso.is_some() {
            Some(l4_info(frame).ok_or(MetaError::NoTransportHeader)?)
        } else {
            None
        };
        let csum = match l4 {
            Some(l4) if self.csum_blank => Csum::Partial {
                start: l4.start,
                offset: l4.csum_offset,
            },
            _ if self.data_validated => Csum::Verified,
            _ => Csum::Complete,
        };
        let gso = match (self.gso, l4) {
            (Some(g), Some(l4)) => {
                if !l4.tcp {
                    return Err(MetaError::NoTransportHeader);
                }
                if l4.v6 != (g.ty == GsoType::TcpV6) {
                    return Err(MetaError::GsoMismatch);
                }
                Some(Gso {
                    kind: match g.ty {
                        GsoType::TcpV4 => GsoKind::TcpV4,
                        GsoType::TcpV6 => GsoKind::TcpV6,
                    },
                    size: g.mss,
                    hdr_len: l4.hdr_end,
                    ecn: false,
                })
            }
            _ => None,
        };
        Ok(Offload { csum, gso })
    }

    fn tx_flags(&self) -> u16 {
        let mut f = 0;
        if self.csum_blank {
            f |= NETTXF_CSUM_BLANK | NETTXF_DATA_VALIDATED;
        }
        if self.data_validated {
            f |= NETTXF_DATA_VALIDATED;
        }
        f
    }

    fn rx_flags(&self) -> u16 {
        let mut f = 0;
        if self.csum_blank {
            f |= NETRXF_CSUM_BLANK | NETRXF_DATA_VALIDATED;
        }
        if self.data_validated {
            f |= NETRXF_DATA_VALIDATED;
        }
        f
    }
}

/// Where a frame's transport header is: what netif leaves for the receiver to find.
#[derive(Clone, Copy, Debug)]
struct L4 {
    start: u16,
    csum_offset: u16,
    hdr_end: u16,
    v6: bool,
    tcp: bool,
}

/// Finds the TCP or UDP header of an untagged Ethernet frame with IPv4 (not a fragment)
/// or IPv6 (through hop-by-hop, routing and destination options headers).
fn l4_info(f: &[u8]) -> Option<L4> {
    let be16 = |at: usize| Some(u16::from_be_bytes([*f.get(at)?, *f.get(at + 1)?]));
    let ip = ETH_HLEN;
    let (start, proto, v6) = match be16(12)? {
        0x0800 => {
            let vihl = *f.get(ip)?;
            let ihl = usize::from(vihl & 0x0f) * 4;
            // More-fragments or an offset: the transport header is not (all) here.
            if vihl >> 4 != 4 || ihl < 20 || be16(ip + 6)? & 0x3fff != 0 {
                return None;
            }
            (ip + ihl, *f.get(ip + 9)?, false)
        }
        0x86dd => {
            if *f.get(ip)? >> 4 != 6 {
                return None;
            }
            let mut next = *f.get(ip + 6)?;
            let mut at = ip + 40;
            // Each header is at least 8 bytes and bounds-checked, so this ends.
            while matches!(next, 0 | 43 | 60) {
                next = *f.get(at)?;
                at += (usize::from(*f.get(at + 1)?) + 1) * 8;
            }
            (at, next, true)
        }
        _ => return None,
    };
    let (csum_offset, hdr_end, tcp) = match proto {
        6 => {
            let doff = usize::from(*f.get(start + 12)? >> 4) * 4;
            if doff < 20 {
                return None;
            }
            (16, start + doff, true)
        }
        17 => (6, start + 8, false),
        _ => return None,
    };
    if hdr_end > f.len() {
        return None;
    }
    Some(L4 {
        start: u16::try_from(start).ok()?,
        csum_offset,
        hdr_end: u16::try_from(hdr_end).ok()?,
        v6,
        tcp,
    })
}

/// Bounds on one packet's slots. The slot limit is never below
/// [`XEN_NETIF_NR_SLOTS_MIN`], which every peer may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    max_slots: usize,
    max_frame: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_slots: XEN_NETIF_NR_SLOTS_MIN,
            max_frame: MAX_FRAME,
        }
    }
}

impl Limits {
    /// At most `max_slots` data slots (raised to 18 if lower) and `max_frame` bytes per
    /// packet (e.g. MTU + 14 for a peer not offered GSO).
    pub fn new(max_slots: usize, max_frame: usize) -> Self {
        Limits {
            max_slots: max_slots.max(XEN_NETIF_NR_SLOTS_MIN),
            max_frame,
        }
    }

    pub fn max_slots(&self) -> usize {
        self.max_slots
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }
}

/// What is wrong with a packet's slots; `slot` counts from the packet's first slot.
///
/// [`AssemblyError::is_fatal`] ones are returned as errors: the packet's end cannot be
/// trusted, or the peer did what no correct peer does, so the caller disconnects it (as
/// Linux netback's `xenvif_fatal_tx_err`). The others leave the packet's extent known;
/// they are reported in the packet's `dropped`, its slots are answered with errors, and
/// the ring goes on (`xenvif_tx_err`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AssemblyError {
    /// The packet continues past the `have` slots given. A peer publishes whole packets,
    /// so with every published slot given this is a protocol violation.
    Incomplete { slot: usize, have: usize },
    /// A fragment reaching past its 4096-byte page.
    OffsetBeyondPage {
        slot: usize,
        offset: u16,
        len: usize,
    },
    /// More data slots than the limit.
    TooManySlots { slot: usize, limit: usize },
    /// An extra-info type netif does not define.
    UnknownExtraType { slot: usize, kind: u8 },
    /// A second extra-info slot of one type.
    DuplicateExtra { slot: usize, kind: u8 },
    /// An extra-info chain still going after one slot of each type.
    ExtraChainTooLong { slot: usize, limit: usize },
    /// A GSO descriptor with an unknown type or a segment size of 0.
    BadGso {
        slot: usize,
        gso_type: u8,
        size: u16,
    },
    /// A response flag this end never asked for (`NETRXF_gso_prefix`).
    BadFlags { slot: usize, flags: u16 },
    /// TX: the first request's total is less than the later fragments add up to.
    FirstSmallerThanRest { total: usize, rest: usize },
    /// TX: a fragment of 0 bytes (first included: its size derived as 0).
    ZeroSizeFragment { slot: usize },
    /// Less than an Ethernet header.
    TooShort { total: usize },
    /// Over the frame limit.
    TooLarge { total: usize, limit: usize },
    /// RX: the back end answered a slot with an error status.
    ErrorStatus { slot: usize, status: i16 },
}

impl AssemblyError {
    /// Whether the peer must be disconnected rather than the packet dropped.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            AssemblyError::Incomplete { .. }
                | AssemblyError::OffsetBeyondPage { .. }
                | AssemblyError::TooManySlots { .. }
                | AssemblyError::UnknownExtraType { .. }
                | AssemblyError::DuplicateExtra { .. }
                | AssemblyError::ExtraChainTooLong { .. }
                | AssemblyError::BadGso { .. }
                | AssemblyError::BadFlags { .. }
        )
    }
}

impl fmt::Display for AssemblyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            AssemblyError::Incomplete { slot, have } => {
                write!(
                    f,
                    "slot {slot}: packet continues past the {have} slots published"
                )
            }
            AssemblyError::OffsetBeyondPage { slot, offset, len } => write!(
                f,
                "slot {slot}: {len} bytes at offset {offset} reach past the {PAGE_SIZE}-byte page"
            ),
            AssemblyError::TooManySlots { slot, limit } => {
                write!(f, "slot {slot}: more than {limit} data slots in one packet")
            }
            AssemblyError::UnknownExtraType { slot, kind } => {
                write!(f, "slot {slot}: unknown extra-info type {kind}")
            }
            AssemblyError::DuplicateExtra { slot, kind } => {
                write!(f, "slot {slot}: second extra-info slot of type {kind}")
            }
            AssemblyError::ExtraChainTooLong { slot, limit } => {
                write!(f, "slot {slot}: extra-info chain longer than {limit}")
            }
            AssemblyError::BadGso {
                slot,
                gso_type,
                size,
            } => write!(
                f,
                "slot {slot}: bad GSO descriptor (type {gso_type}, size {size})"
            ),
            AssemblyError::BadFlags { slot, flags } => {
                write!(f, "slot {slot}: unexpected flags {flags:#x}")
            }
            AssemblyError::FirstSmallerThanRest { total, rest } => write!(
                f,
                "slot 0: total size {total} is less than the {rest} bytes of the later fragments"
            ),
            AssemblyError::ZeroSizeFragment { slot } => {
                write!(f, "slot {slot}: fragment of 0 bytes")
            }
            AssemblyError::TooShort { total } => {
                write!(
                    f,
                    "slot 0: packet of {total} bytes is shorter than an Ethernet header"
                )
            }
            AssemblyError::TooLarge { total, limit } => {
                write!(
                    f,
                    "slot 0: packet of {total} bytes is over the limit of {limit}"
                )
            }
            AssemblyError::ErrorStatus { slot, status } => {
                write!(f, "slot {slot}: error status {status}")
            }
        }
    }
}

impl std::error::Error for AssemblyError {}

/// Parses the extra-info chain starting at `slots[i]` into `meta`; the index after it.
fn parse_extras<const N: usize>(
    slots: &[[u8; N]],
    mut i: usize,
    meta: &mut PacketMeta,
) -> Result<usize, AssemblyError> {
    let first = i;
    let mut seen = 0u8;
    loop {
        if i - first >= MAX_EXTRAS {
            return Err(AssemblyError::ExtraChainTooLong {
                slot: i,
                limit: MAX_EXTRAS,
            });
        }
        let e =
            slots
                .get(i)
                .and_then(|s| ExtraInfo::parse(s))
                .ok_or(AssemblyError::Incomplete {
                    slot: i,
                    have: slots.len(),
                })?;
        if e.kind == XEN_NETIF_EXTRA_TYPE_NONE || e.kind >= XEN_NETIF_EXTRA_TYPE_MAX {
            return Err(AssemblyError::UnknownExtraType {
                slot: i,
                kind: e.kind,
            });
        }
        if seen & (1 << e.kind) != 0 {
            return Err(AssemblyError::DuplicateExtra {
                slot: i,
                kind: e.kind,
            });
        }
        seen |= 1 << e.kind;
        if let Some(g) = e.as_gso() {
            let ty = match g.gso_type {
                XEN_NETIF_GSO_TYPE_TCPV4 => Some(GsoType::TcpV4),
                XEN_NETIF_GSO_TYPE_TCPV6 => Some(GsoType::TcpV6),
                _ => None,
            };
            match ty {
                Some(ty) if g.size > 0 => meta.gso = Some(GsoInfo { ty, mss: g.size }),
                _ => {
                    return Err(AssemblyError::BadGso {
                        slot: i,
                        gso_type: g.gso_type,
                        size: g.size,
                    })
                }
            }
        }
        // Multicast and hash extras are valid but mean nothing to us: skipped.
        i += 1;
        if !e.more() {
            return Ok(i);
        }
    }
}

/// One piece of a packet in a granted page: `len` bytes at `offset` of the page `gref`
/// names. Always within the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub gref: GrantRef,
    pub offset: u16,
    pub len: u16,
}

/// A packet the front end sent on the TX ring, as the back end plans to take it in.
/// Reused across packets, so planning does not allocate once warmed up.
#[derive(Clone, Debug, Default)]
pub struct TxPacket {
    /// Where the bytes are, in packet order; empty if `dropped`.
    pub pieces: Vec<Piece>,
    /// One per slot in slot order, to write to the ring as they are: `OKAY` per data slot
    /// (`ERROR` if dropped), `NULL` per extra-info slot.
    pub responses: Vec<TxResponse>,
    pub meta: PacketMeta,
    /// The packet's size (the first request's `size`).
    pub len: usize,
    /// Slots the packet took.
    pub slots: usize,
    /// Why the packet is dropped, if it is; its slots still get their responses.
    pub dropped: Option<AssemblyError>,
}

impl TxPacket {
    /// Marks the packet failed after planning (a grant copy failed): every data slot is
    /// answered `ERROR`, as netback does when `GNTTABOP_copy` fails.
    pub fn fail(&mut self) {
        for r in &mut self.responses {
            if r.status == NETIF_RSP_OKAY {
                r.status = NETIF_RSP_ERROR;
            }
        }
    }

    fn clear(&mut self) {
        self.pieces.clear();
        self.responses.clear();
        self.meta = PacketMeta::default();
        self.len = 0;
        self.slots = 0;
        self.dropped = None;
    }
}

fn check_in_page(slot: usize, offset: u16, len: usize) -> Result<(), AssemblyError> {
    if usize::from(offset) + len > PAGE_SIZE {
        return Err(AssemblyError::OffsetBeyondPage { slot, offset, len });
    }
    Ok(())
}

/// Back end, TX ring: plans the packet at the start of `slots` (copies of consumed
/// requests, in ring order) into `out`, per netif.h "Guest transmit": a first request
/// whose `size` is the packet's, extra-info slots while `XEN_NETIF_EXTRA_FLAG_MORE`, and
/// further requests while `NETTXF_more_data`. The first fragment's own size is the total
/// less the others', as in Linux netback (`xenvif_count_requests`).
///
/// `Err` is a fatal error; `out.dropped` a dropped packet whose `out.slots` are answered
/// by `out.responses` all the same. On success the caller copies `out.pieces`, delivers
/// the frame with `out.meta`, writes `out.responses` and moves on `out.slots` slots.
pub fn assemble_tx(
    slots: &[[u8; TX_SLOT]],
    limits: &Limits,
    out: &mut TxPacket,
) -> Result<(), AssemblyError> {
    out.clear();
    let first = TxRequest::parse(
        slots
            .first()
            .ok_or(AssemblyError::Incomplete { slot: 0, have: 0 })?,
    );
    out.responses.push(TxResponse {
        id: first.id,
        status: NETIF_RSP_OKAY,
    });
    out.meta = PacketMeta {
        csum_blank: first.flags & NETTXF_CSUM_BLANK != 0,
        data_validated: first.flags & (NETTXF_DATA_VALIDATED | NETTXF_CSUM_BLANK) != 0,
        gso: None,
    };
    let mut i = 1;
    if first.flags & NETTXF_EXTRA_INFO != 0 {
        i = parse_extras(slots, i, &mut out.meta)?;
        // Extra slots carry no id; the front end skips NULL responses by status.
        for _ in 1..i {
            out.responses.push(TxResponse {
                id: 0,
                status: NETIF_RSP_NULL,
            });
        }
    }
    // The first piece's length is known only at the end.
    out.pieces.push(Piece {
        gref: first.gref,
        offset: first.offset,
        len: 0,
    });
    let mut dropped = None;
    let mut rest = 0usize;
    let mut more = first.flags & NETTXF_MORE_DATA != 0;
    while more {
        if out.pieces.len() >= limits.max_slots {
            return Err(AssemblyError::TooManySlots {
                slot: i,
                limit: limits.max_slots,
            });
        }
        let r = TxRequest::parse(slots.get(i).ok_or(AssemblyError::Incomplete {
            slot: i,
            have: slots.len(),
        })?);
        check_in_page(i, r.offset, usize::from(r.size))?;
        if r.size == 0 {
            dropped.get_or_insert(AssemblyError::ZeroSizeFragment { slot: i });
        }
        rest += usize::from(r.size);
        out.pieces.push(Piece {
            gref: r.gref,
            offset: r.offset,
            len: r.size,
        });
        out.responses.push(TxResponse {
            id: r.id,
            status: NETIF_RSP_OKAY,
        });
        more = r.flags & NETTXF_MORE_DATA != 0;
        i += 1;
    }
    let total = usize::from(first.size);
    match total.checked_sub(rest) {
        Some(first_len) => {
            check_in_page(0, first.offset, first_len)?;
            out.pieces[0].len = first_len as u16;
            if first_len == 0 && out.pieces.len() > 1 {
                dropped.get_or_insert(AssemblyError::ZeroSizeFragment { slot: 0 });
            }
        }
        None => {
            check_in_page(0, first.offset, 0)?;
            dropped.get_or_insert(AssemblyError::FirstSmallerThanRest { total, rest });
        }
    }
    if total < ETH_HLEN {
        dropped.get_or_insert(AssemblyError::TooShort { total });
    }
    if total > limits.max_frame {
        dropped.get_or_insert(AssemblyError::TooLarge {
            total,
            limit: limits.max_frame,
        });
    }
    out.len = total;
    out.slots = i;
    if dropped.is_some() {
        out.dropped = dropped;
        out.pieces.clear();
        out.fail();
    }
    Ok(())
}

/// One of the front end's TX buffers: `len` bytes free at `offset` in a page granted
/// (read-only) as `gref`; `id` comes back in the response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxBuffer {
    pub gref: GrantRef,
    pub id: u16,
    pub offset: u16,
    pub len: u16,
}

/// One slot of the TX ring as the front end writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxSlot {
    Request(TxRequest),
    Extra(ExtraInfo),
}

impl TxSlot {
    pub fn to_bytes(&self) -> [u8; TX_SLOT] {
        match self {
            TxSlot::Request(r) => r.to_bytes(),
            TxSlot::Extra(e) => e.to_tx_slot(),
        }
    }
}

/// Frame bytes `frame_offset..frame_offset + len` go into buffer `buffer` at its offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FramePiece {
    pub buffer: usize,
    pub frame_offset: usize,
    pub len: u16,
}

/// A frame the front end is to send: what to copy where, and the slots to write.
#[derive(Clone, Debug, Default)]
pub struct TxPlan {
    pub pieces: Vec<FramePiece>,
    /// In ring order; write them all, then push once (the back end expects a packet's
    /// slots to arrive together).
    pub slots: Vec<TxSlot>,
    /// Buffers used, from the first given.
    pub buffers: usize,
}

/// Why a frame cannot be planned onto a ring (the frame's or the caller's problem, not a
/// peer's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanError {
    /// A frame shorter than an Ethernet header.
    TooShort { len: usize },
    /// Larger than the protocol carries.
    TooLarge { len: usize, limit: usize },
    /// More data slots than a peer must accept ([`XEN_NETIF_NR_SLOTS_MIN`]); use larger
    /// buffers, or segment.
    TooManySlots { needed: usize, limit: usize },
    /// TX: the buffers given hold only `room` of the frame's `len` bytes.
    NotEnoughBuffers { len: usize, room: usize },
    /// RX: fewer requests posted than the frame needs: wait for the front end to post.
    NotEnough { needed: usize, have: usize },
    /// A TX buffer that is empty or not within its page.
    BadBuffer { index: usize, offset: u16, len: u16 },
    /// A GSO frame for a peer that did not ask for that GSO type; segment it first.
    GsoNotAccepted { ty: GsoType },
    /// Offload netif cannot describe.
    Meta(MetaError),
    /// A frame of more than one page for a peer without `feature-sg`.
    NoScatterGather { len: usize },
    /// A partial checksum for a peer that does not take checksum offload for this IP
    /// version (`feature-no-csum-offload`, `feature-ipv6-csum-offload`), or on a frame
    /// that is neither IPv4 nor IPv6; complete the checksum first.
    CsumNotAccepted { ethertype: u16 },
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PlanError::TooShort { len } => write!(f, "frame of {len} bytes is too short"),
            PlanError::TooLarge { len, limit } => {
                write!(f, "frame of {len} bytes is over the limit of {limit}")
            }
            PlanError::TooManySlots { needed, limit } => {
                write!(
                    f,
                    "frame needs {needed} slots, over the {limit} a peer must take"
                )
            }
            PlanError::NotEnoughBuffers { len, room } => {
                write!(f, "frame of {len} bytes, buffers for {room}")
            }
            PlanError::NotEnough { needed, have } => {
                write!(f, "frame needs {needed} requests, {have} posted")
            }
            PlanError::BadBuffer { index, offset, len } => {
                write!(
                    f,
                    "buffer {index}: {len} bytes at offset {offset} is not in a page"
                )
            }
            PlanError::GsoNotAccepted { ty } => write!(f, "peer does not accept {ty:?} GSO"),
            PlanError::Meta(e) => e.fmt(f),
            PlanError::NoScatterGather { len } => {
                write!(f, "frame of {len} bytes needs feature-sg, not negotiated")
            }
            PlanError::CsumNotAccepted { ethertype } => write!(
                f,
                "peer does not take checksum offload for ethertype {ethertype:#06x}"
            ),
        }
    }
}

impl std::error::Error for PlanError {}

impl From<MetaError> for PlanError {
    fn from(e: MetaError) -> Self {
        PlanError::Meta(e)
    }
}

fn plan_meta(offload: &Offload, peer: PeerGso) -> Result<PacketMeta, PlanError> {
    let meta = PacketMeta::from_offload(offload)?;
    check_meta(&meta, peer)
}

fn check_meta(meta: &PacketMeta, peer: PeerGso) -> Result<PacketMeta, PlanError> {
    if let Some(g) = meta.gso {
        if !peer.accepts(g.ty) {
            return Err(PlanError::GsoNotAccepted { ty: g.ty });
        }
        if g.mss == 0 {
            return Err(PlanError::Meta(MetaError::ZeroMss));
        }
    }
    Ok(*meta)
}

/// Front end, TX ring: plans a frame of `len` bytes with `offload` over `buffers` (each
/// filled in turn), per netif.h "Guest transmit": the first request's `size` is the whole
/// frame's, a GSO descriptor follows it if the frame is a super-frame (and the back end
/// takes that GSO type), and every request but the last has `NETTXF_more_data`.
pub fn plan_tx(
    len: usize,
    offload: &Offload,
    backend: PeerGso,
    buffers: &[TxBuffer],
    out: &mut TxPlan,
) -> Result<(), PlanError> {
    out.pieces.clear();
    out.slots.clear();
    out.buffers = 0;
    let meta = PacketMeta::from_offload(offload)?;
    plan_tx_meta(len, &meta, backend, buffers, out)
}

/// As [`plan_tx`], for a frame whose offload is already in netif's terms (a frame that
/// came in on a netif ring, or whose [`PacketMeta`] the caller made).
pub fn plan_tx_meta(
    len: usize,
    meta: &PacketMeta,
    backend: PeerGso,
    buffers: &[TxBuffer],
    out: &mut TxPlan,
) -> Result<(), PlanError> {
    out.pieces.clear();
    out.slots.clear();
    out.buffers = 0;
    if len < ETH_HLEN {
        return Err(PlanError::TooShort { len });
    }
    if len > XEN_NETIF_MAX_TX_SIZE {
        return Err(PlanError::TooLarge {
            len,
            limit: XEN_NETIF_MAX_TX_SIZE,
        });
    }
    let meta = check_meta(meta, backend)?;
    let mut done = 0;
    for (index, b) in buffers.iter().enumerate() {
        if done == len {
            break;
        }
        if b.len == 0 || usize::from(b.offset) + usize::from(b.len) > PAGE_SIZE {
            return Err(PlanError::BadBuffer {
                index,
                offset: b.offset,
                len: b.len,
            });
        }
        let n = usize::from(b.len).min(len - done);
        out.pieces.push(FramePiece {
            buffer: index,
            frame_offset: done,
            len: n as u16,
        });
        done += n;
    }
    if done < len {
        return Err(PlanError::NotEnoughBuffers { len, room: done });
    }
    let n = out.pieces.len();
    if n > XEN_NETIF_NR_SLOTS_MIN {
        return Err(PlanError::TooManySlots {
            needed: n,
            limit: XEN_NETIF_NR_SLOTS_MIN,
        });
    }
    out.buffers = n;
    for (k, p) in out.pieces.iter().enumerate() {
        let b = buffers[p.buffer];
        let mut flags = if k + 1 < n { NETTXF_MORE_DATA } else { 0 };
        let size = if k == 0 {
            flags |= meta.tx_flags();
            if meta.gso.is_some() {
                flags |= NETTXF_EXTRA_INFO;
            }
            len as u16
        } else {
            p.len
        };
        out.slots.push(TxSlot::Request(TxRequest {
            gref: b.gref,
            offset: b.offset,
            flags,
            id: b.id,
            size,
        }));
        if k == 0 {
            if let Some(g) = meta.gso {
                out.slots.push(TxSlot::Extra(g.extra()));
            }
        }
    }
    Ok(())
}

/// One slot of the RX ring as the back end writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxSlot {
    Response(RxResponse),
    Extra(ExtraInfo),
}

impl RxSlot {
    pub fn to_bytes(&self) -> [u8; RX_SLOT] {
        match self {
            RxSlot::Response(r) => r.to_bytes(),
            RxSlot::Extra(e) => e.to_bytes(),
        }
    }
}

/// Frame bytes `frame_offset..frame_offset + len` go to offset 0 of the page `gref`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxCopy {
    pub gref: GrantRef,
    pub frame_offset: usize,
    pub len: u16,
}

/// A frame the back end is to deliver on the RX ring.
#[derive(Clone, Debug, Default)]
pub struct RxPlan {
    pub copies: Vec<RxCopy>,
    /// One per request used, in the order the requests were consumed, so each lands in
    /// its request's ring slot (netif.h: Linux netfront pairs them by position).
    pub responses: Vec<RxSlot>,
    /// Requests used, from the first given; a GSO descriptor takes one whose page stays
    /// unwritten.
    pub requests: usize,
}

impl RxPlan {
    /// Marks the frame failed after planning (a grant copy failed): every data response
    /// gets `NETIF_RSP_ERROR`, and the front end drops the frame.
    pub fn fail(&mut self) {
        for s in &mut self.responses {
            if let RxSlot::Response(r) = s {
                r.status = NETIF_RSP_ERROR;
            }
        }
    }
}

/// RX requests a frame of `len` bytes with `offload` takes: one per page, and one more for
/// a GSO descriptor.
pub fn rx_requests_needed(
    len: usize,
    offload: &Offload,
    frontend: PeerGso,
) -> Result<usize, PlanError> {
    let meta = PacketMeta::from_offload(offload)?;
    rx_requests_needed_meta(len, &meta, frontend)
}

/// As [`rx_requests_needed`], for a frame whose offload is in netif's terms.
pub fn rx_requests_needed_meta(
    len: usize,
    meta: &PacketMeta,
    frontend: PeerGso,
) -> Result<usize, PlanError> {
    if len < ETH_HLEN {
        return Err(PlanError::TooShort { len });
    }
    if len > MAX_FRAME {
        return Err(PlanError::TooLarge {
            len,
            limit: MAX_FRAME,
        });
    }
    let meta = check_meta(meta, frontend)?;
    Ok(len.div_ceil(PAGE_SIZE) + usize::from(meta.gso.is_some()))
}

/// Back end, RX ring: plans a frame of `len` bytes with `offload` into the front end's
/// posted `requests` (in the order consumed), per netif.h "Guest receive": a page per
/// request at offset 0, each response's status its own byte count, `NETRXF_more_data` on
/// all but the last, and for a super-frame `NETRXF_extra_info` on the first with the GSO
/// descriptor in the next slot. Checksum flags go on the first response.
pub fn plan_rx(
    len: usize,
    offload: &Offload,
    frontend: PeerGso,
    requests: &[RxRequest],
    out: &mut RxPlan,
) -> Result<(), PlanError> {
    out.copies.clear();
    out.responses.clear();
    out.requests = 0;
    let meta = plan_meta(offload, frontend)?;
    plan_rx_meta(len, &meta, frontend, requests, out)
}

/// As [`plan_rx`], for a frame whose offload is in netif's terms.
pub fn plan_rx_meta(
    len: usize,
    meta: &PacketMeta,
    frontend: PeerGso,
    requests: &[RxRequest],
    out: &mut RxPlan,
) -> Result<(), PlanError> {
    out.copies.clear();
    out.responses.clear();
    out.requests = 0;
    let needed = rx_requests_needed_meta(len, meta, frontend)?;
    if requests.len() < needed {
        return Err(PlanError::NotEnough {
            needed,
            have: requests.len(),
        });
    }
    let meta = check_meta(meta, frontend)?;
    let pages = len.div_ceil(PAGE_SIZE);
    let mut reqs = requests.iter();
    for k in 0..pages {
        let Some(r) = reqs.next() else {
            return Err(PlanError::NotEnough {
                needed,
                have: requests.len(),
            });
        };
        let frame_offset = k * PAGE_SIZE;
        let n = (len - frame_offset).min(PAGE_SIZE) as u16;
        let mut flags = if k + 1 < pages { NETRXF_MORE_DATA } else { 0 };
        if k == 0 {
            flags |= meta.rx_flags();
            if meta.gso.is_some() {
                flags |= NETRXF_EXTRA_INFO;
            }
        }
        out.copies.push(RxCopy {
            gref: r.gref,
            frame_offset,
            len: n,
        });
        out.responses.push(RxSlot::Response(RxResponse {
            id: r.id,
            offset: 0,
            flags,
            status: n as i16,
        }));
        if k == 0 {
            if let Some(g) = meta.gso {
                // Takes the next request's slot; its page goes unused.
                reqs.next();
                out.responses.push(RxSlot::Extra(g.extra()));
            }
        }
    }
    out.requests = needed;
    Ok(())
}

/// One piece of a received frame: `len` bytes at `offset` in the page of the request
/// answered in slot `slot` (counted from the frame's first slot). Always within the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxFragment {
    pub slot: usize,
    pub id: u16,
    pub offset: u16,
    pub len: u16,
}

/// A frame the back end delivered on the RX ring, as the front end assembles it.
#[derive(Clone, Debug, Default)]
pub struct RxPacket {
    /// In frame order; empty if `dropped`.
    pub fragments: Vec<RxFragment>,
    pub meta: PacketMeta,
    /// The sum of the fragments.
    pub len: usize,
    /// Slots the frame took. Every one of their requests' pages is free again, the
    /// extra-info slots' (which carry no id: the request in that ring position) too.
    pub slots: usize,
    pub dropped: Option<AssemblyError>,
}

/// Front end, RX ring: assembles the frame at the start of `slots` (copies of consumed
/// responses in ring order) into `out`. The frame's size is the sum of every slot's
/// status, the first's included (netif.h "Guest receive"). `Err` is fatal, `out.dropped`
/// a dropped frame, as for [`assemble_tx`].
pub fn assemble_rx(
    slots: &[[u8; RX_SLOT]],
    limits: &Limits,
    out: &mut RxPacket,
) -> Result<(), AssemblyError> {
    out.fragments.clear();
    out.meta = PacketMeta::default();
    out.len = 0;
    out.slots = 0;
    out.dropped = None;
    let mut dropped = None;
    let mut i = 0;
    let mut data = 0;
    let mut more = true;
    while more {
        if data >= limits.max_slots {
            return Err(AssemblyError::TooManySlots {
                slot: i,
                limit: limits.max_slots,
            });
        }
        let r = RxResponse::parse(slots.get(i).ok_or(AssemblyError::Incomplete {
            slot: i,
            have: slots.len(),
        })?);
        if r.flags & NETRXF_GSO_PREFIX != 0 {
            return Err(AssemblyError::BadFlags {
                slot: i,
                flags: r.flags,
            });
        }
        let slot = i;
        i += 1;
        data += 1;
        if slot == 0 {
            out.meta.csum_blank = r.flags & NETRXF_CSUM_BLANK != 0;
            out.meta.data_validated = r.flags & (NETRXF_DATA_VALIDATED | NETRXF_CSUM_BLANK) != 0;
            if r.flags & NETRXF_EXTRA_INFO != 0 {
                i = parse_extras(slots, i, &mut out.meta)?;
            }
        }
        more = r.flags & NETRXF_MORE_DATA != 0;
        if r.status < 0 {
            dropped.get_or_insert(AssemblyError::ErrorStatus {
                slot,
                status: r.status,
            });
            continue;
        }
        let n = r.status as u16;
        if usize::from(r.offset) + usize::from(n) > PAGE_SIZE {
            // Not trusted, but the extent is known: drop, as Linux netfront does.
            dropped.get_or_insert(AssemblyError::OffsetBeyondPage {
                slot,
                offset: r.offset,
                len: usize::from(n),
            });
            continue;
        }
        out.len += usize::from(n);
        out.fragments.push(RxFragment {
            slot,
            id: r.id,
            offset: r.offset,
            len: n,
        });
    }
    if out.len < ETH_HLEN {
        dropped.get_or_insert(AssemblyError::TooShort { total: out.len });
    }
    if out.len > limits.max_frame {
        dropped.get_or_insert(AssemblyError::TooLarge {
            total: out.len,
            limit: limits.max_frame,
        });
    }
    out.slots = i;
    if dropped.is_some() {
        out.dropped = dropped;
        out.fragments.clear();
    }
    Ok(())
}

/// What a netif connection negotiated over XenStore, as the data path needs it. Both
/// ends take the same struct: each flag is on only if the peer that must act on it
/// advertised it (and, where the other side must also agree, both did). Per netif.h:
///
/// * `rx_copy`: `feature-rx-copy` (back end) and `request-rx-copy` (front end). The back
///   end copies into the front end's RX pages; the old page-flipping mode is not
///   implemented, so both ends refuse to run without it.
/// * `sg`: `feature-sg`. Without it a packet is one slot, so at most one page, each way.
/// * `gso_tcpv4`, `gso_tcpv6`: `feature-gso-tcpv4`/`-tcpv6` ("neither frontends nor
///   backends are assumed to be capable unless the flags are present"): the receiving
///   side takes TCP super-frames with a GSO extra-info slot.
/// * `ipv4_csum`: IPv4 TCP/UDP checksum offload, on unless the front end wrote
///   `feature-no-csum-offload = 1` ("If it is missing then the feature is assumed to be
///   on"): `csum_blank` frames may be sent.
/// * `ipv6_csum`: `feature-ipv6-csum-offload` ("If it is missing then the feature is
///   assumed to be off").
/// * `rx_notify`: `feature-rx-notify`: the front end notifies when it posts RX buffers.
///   Without it the back end cannot count on being woken when buffers appear (netif.h:
///   "the backend will assume that it cannot safely queue packets").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    pub rx_copy: bool,
    pub sg: bool,
    pub gso_tcpv4: bool,
    pub gso_tcpv6: bool,
    pub ipv4_csum: bool,
    pub ipv6_csum: bool,
    pub rx_notify: bool,
}

impl Default for Features {
    /// What a peer that wrote nothing but the required `request-rx-copy` gets: checksum
    /// offload for IPv4 (netif.h's default), nothing else.
    fn default() -> Self {
        Features {
            rx_copy: true,
            sg: false,
            gso_tcpv4: false,
            gso_tcpv6: false,
            ipv4_csum: true,
            ipv6_csum: false,
            rx_notify: false,
        }
    }
}

impl Features {
    /// Everything this implementation does (what a current Linux netfront and netback
    /// negotiate).
    pub const ALL: Features = Features {
        rx_copy: true,
        sg: true,
        gso_tcpv4: true,
        gso_tcpv6: true,
        ipv4_csum: true,
        ipv6_csum: true,
        rx_notify: true,
    };

    /// The GSO types the receiving side takes.
    pub fn peer_gso(&self) -> PeerGso {
        PeerGso {
            tcpv4: self.gso_tcpv4,
            tcpv6: self.gso_tcpv6,
        }
    }

    /// Whether `frame` with `meta` may be sent over a connection with these features:
    /// its size fits one page without `sg`, its GSO type was negotiated, and a blank
    /// checksum goes only where checksum offload for its IP version was. A refused frame
    /// must be finished (segmented, checksummed) by the caller first.
    pub fn check(&self, frame: &[u8], meta: &PacketMeta) -> Result<(), PlanError> {
        if !self.sg && frame.len() > PAGE_SIZE {
            return Err(PlanError::NoScatterGather { len: frame.len() });
        }
        if let Some(g) = meta.gso {
            if !self.sg {
                return Err(PlanError::NoScatterGather { len: frame.len() });
            }
            if !self.peer_gso().accepts(g.ty) {
                return Err(PlanError::GsoNotAccepted { ty: g.ty });
            }
        }
        if meta.csum_blank {
            let ethertype = match frame {
                [_, _, _, _, _, _, _, _, _, _, _, _, a, b, ..] => u16::from_be_bytes([*a, *b]),
                _ => 0,
            };
            let ok = match ethertype {
                0x0800 => self.ipv4_csum,
                0x86dd => self.ipv6_csum,
                _ => false,
            };
            if !ok {
                return Err(PlanError::CsumNotAccepted { ethertype });
            }
        }
        Ok(())
    }
}

/// Why a netif peer was disconnected: what it did that no correct peer does (a producer
/// index past the ring, a fragment past its page, too many slots, an id reused while in
/// flight, a grant that does not map), or the transport failing under us. Once returned,
/// the device returns it from every call; the caller tears the connection down (XenStore
/// state `Closing`), as Linux netback does on `xenvif_fatal_tx_err`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disconnect {
    reason: String,
}

impl Disconnect {
    pub fn new(reason: impl Into<String>) -> Self {
        Disconnect {
            reason: reason.into(),
        }
    }

    /// What the peer did, in words.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for Disconnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "netif peer disconnected: {}", self.reason)
    }
}

impl std::error::Error for Disconnect {}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::xen::ring::test_pages::TestPages;
    use crate::xen::ring::{BackRing, FrontRing, RingLayout};

    /// An Ethernet/IPv4/TCP (or IPv6/TCP) frame of `len` bytes with a patterned payload.
    fn tcp_frame(v6: bool, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len];
        if v6 {
            f[12..14].copy_from_slice(&[0x86, 0xdd]);
            f[14] = 0x60;
            f[20] = 6;
            f[54 + 12] = 0x50;
        } else {
            f[12..14].copy_from_slice(&[0x08, 0x00]);
            f[14] = 0x45;
            f[23] = 6;
            f[34 + 12] = 0x50;
        }
        let start = if v6 { 74 } else { 54 };
        for (i, b) in f[start..].iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        f
    }

    fn req(gref: u32, offset: u16, flags: u16, id: u16, size: u16) -> [u8; TX_SLOT] {
        TxRequest {
            gref: GrantRef(gref),
            offset,
            flags,
            id,
            size,
        }
        .to_bytes()
    }

    fn extra(kind: u8, flags: u8) -> [u8; TX_SLOT] {
        let mut e = ExtraInfo::gso(GsoExtra {
            size: 1448,
            gso_type: XEN_NETIF_GSO_TYPE_TCPV4,
            features: 0,
        });
        e.kind = kind;
        e.flags = flags;
        e.to_tx_slot()
    }

    fn tx(slots: &[[u8; TX_SLOT]]) -> Result<TxPacket, AssemblyError> {
        let mut p = TxPacket::default();
        assemble_tx(slots, &Limits::default(), &mut p).map(|()| p)
    }

    const PARTIAL: Csum = Csum::Partial {
        start: 34,
        offset: 16,
    };

    #[test]
    fn encodings_are_byte_exact() {
        let r = TxRequest {
            gref: GrantRef(0x1122_3344),
            offset: 0x0102,
            flags: NETTXF_MORE_DATA | NETTXF_CSUM_BLANK,
            id: 7,
            size: 1514,
        };
        let b = [
            0x44, 0x33, 0x22, 0x11, // gref
            0x02, 0x01, // offset
            0x05, 0x00, // flags: more_data (4) | csum_blank (1)
            0x07, 0x00, // id
            0xea, 0x05, // size 1514
        ];
        assert_eq!(r.to_bytes(), b);
        assert_eq!(TxRequest::parse(&b), r);

        let rsp = TxResponse {
            id: 0x0a0b,
            status: NETIF_RSP_ERROR,
        };
        let b = [0x0b, 0x0a, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(rsp.to_bytes(), b);
        assert_eq!(TxResponse::parse(&b), rsp);
        assert_eq!(
            TxResponse {
                id: 1,
                status: NETIF_RSP_DROPPED
            }
            .to_bytes()[..4],
            [1, 0, 0xfe, 0xff]
        );

        let rx = RxRequest {
            id: 0x0102,
            gref: GrantRef(0xa0b0_c0d0),
        };
        let b = [0x02, 0x01, 0, 0, 0xd0, 0xc0, 0xb0, 0xa0];
        assert_eq!(rx.to_bytes(), b);
        assert_eq!(RxRequest::parse(&b), rx);

        let rr = RxResponse {
            id: 3,
            offset: 0x10,
            flags: NETRXF_MORE_DATA | NETRXF_DATA_VALIDATED,
            status: 4096,
        };
        let b = [3, 0, 0x10, 0, 0x05, 0, 0x00, 0x10];
        assert_eq!(rr.to_bytes(), b);
        assert_eq!(RxResponse::parse(&b), rr);
        let err = RxResponse::parse(&[0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(err.status, NETIF_RSP_ERROR);

        let mut e = ExtraInfo::gso(GsoExtra {
            size: 1448,
            gso_type: XEN_NETIF_GSO_TYPE_TCPV6,
            features: 0x0304,
        });
        e.flags = XEN_NETIF_EXTRA_FLAG_MORE;
        let b = [1, 1, 0xa8, 0x05, 2, 0, 0x04, 0x03];
        assert_eq!(e.to_bytes(), b);
        assert_eq!(ExtraInfo::parse(&b), Some(e));
        assert!(e.more());
        assert_eq!(
            e.as_gso(),
            Some(GsoExtra {
                size: 1448,
                gso_type: 2,
                features: 0x0304
            })
        );
        assert_eq!(e.to_tx_slot()[8..], [0, 0, 0, 0]);
        assert_eq!(ExtraInfo::parse(&b[..7]), None);
        assert_eq!(TX_RING_SIZE, 256);
        assert_eq!(RX_RING_SIZE, 256);
    }

    #[test]
    fn single_slot_packet() {
        let p = tx(&[req(5, 100, NETTXF_CSUM_BLANK, 9, 1000)]).expect("valid");
        assert_eq!(p.dropped, None);
        assert_eq!(p.slots, 1);
        assert_eq!(p.len, 1000);
        assert_eq!(
            p.pieces,
            [Piece {
                gref: GrantRef(5),
                offset: 100,
                len: 1000
            }]
        );
        assert_eq!(
            p.responses,
            [TxResponse {
                id: 9,
                status: NETIF_RSP_OKAY
            }]
        );
        assert!(p.meta.csum_blank && p.meta.data_validated);
        let o = p.meta.to_offload(&tcp_frame(false, 1000)).expect("tcp");
        assert_eq!(o.csum, PARTIAL);
        assert_eq!(o.gso, None);
        // Only the first packet of the slots is taken.
        let p = tx(&[req(1, 0, 0, 1, 60), req(2, 0, 0, 2, 60)]).expect("valid");
        assert_eq!(p.slots, 1);
        let p = tx(&[req(1, 0, NETTXF_DATA_VALIDATED, 1, 60)]).expect("valid");
        assert_eq!(
            p.meta
                .to_offload(&[0u8; 60])
                .expect("no headers needed")
                .csum,
            Csum::Verified
        );
    }

    #[test]
    fn multi_slot_packet_derives_the_first_size() {
        let p = tx(&[
            req(1, 0, NETTXF_MORE_DATA, 10, 5000),
            req(2, 2048, NETTXF_MORE_DATA, 11, 2048),
            req(3, 0, 0, 12, 904),
        ])
        .expect("valid");
        assert_eq!(p.dropped, None);
        assert_eq!(p.slots, 3);
        let lens: Vec<_> = p
            .pieces
            .iter()
            .map(|x| (x.gref.0, x.offset, x.len))
            .collect();
        assert_eq!(lens, [(1, 0, 2048), (2, 2048, 2048), (3, 0, 904)]);
        let ids: Vec<_> = p.responses.iter().map(|r| (r.id, r.status)).collect();
        assert_eq!(ids, [(10, 0), (11, 0), (12, 0)]);
    }

    #[test]
    fn packet_with_gso_extra() {
        let p = tx(&[
            req(
                1,
                0,
                NETTXF_CSUM_BLANK | NETTXF_EXTRA_INFO | NETTXF_MORE_DATA,
                1,
                6000,
            ),
            extra(XEN_NETIF_EXTRA_TYPE_GSO, 0),
            req(2, 0, 0, 2, 1904),
        ])
        .expect("valid");
        assert_eq!(p.slots, 3);
        assert_eq!(
            p.meta.gso,
            Some(GsoInfo {
                ty: GsoType::TcpV4,
                mss: 1448
            })
        );
        let st: Vec<_> = p.responses.iter().map(|r| (r.id, r.status)).collect();
        assert_eq!(
            st,
            [
                (1, NETIF_RSP_OKAY),
                (0, NETIF_RSP_NULL),
                (2, NETIF_RSP_OKAY)
            ]
        );
        assert_eq!(p.pieces[0].len, 4096);
        let o = p.meta.to_offload(&tcp_frame(false, 6000)).expect("tcp");
        assert_eq!(
            o,
            Offload {
                csum: PARTIAL,
                gso: Some(Gso {
                    kind: GsoKind::TcpV4,
                    size: 1448,
                    hdr_len: 54,
                    ecn: false
                })
            }
        );
        // A TCPv4 descriptor on an IPv6 frame is refused.
        assert_eq!(
            p.meta.to_offload(&tcp_frame(true, 6000)),
            Err(MetaError::GsoMismatch)
        );
        // Multicast and hash extras are skipped, answered NULL.
        let p = tx(&[
            req(1, 0, NETTXF_EXTRA_INFO, 1, 60),
            extra(XEN_NETIF_EXTRA_TYPE_MCAST_ADD, XEN_NETIF_EXTRA_FLAG_MORE),
            extra(XEN_NETIF_EXTRA_TYPE_HASH, 0),
        ])
        .expect("valid");
        assert_eq!(p.slots, 3);
        assert_eq!(p.meta.gso, None);
        assert_eq!(p.responses.len(), 3);
    }

    fn fatal(slots: &[[u8; TX_SLOT]]) -> AssemblyError {
        let e = tx(slots).expect_err("fatal");
        assert!(e.is_fatal(), "{e:?}");
        e
    }

    fn dropped(slots: &[[u8; TX_SLOT]], limits: &Limits) -> AssemblyError {
        let mut p = TxPacket::default();
        assemble_tx(slots, limits, &mut p).expect("dropped, not fatal");
        let e = p.dropped.expect("dropped");
        assert!(!e.is_fatal(), "{e:?}");
        assert!(p.pieces.is_empty());
        assert_eq!(p.slots, slots.len());
        assert_eq!(p.responses.len(), slots.len());
        assert!(p
            .responses
            .iter()
            .all(|r| r.status == NETIF_RSP_ERROR || r.status == NETIF_RSP_NULL));
        e
    }

    #[test]
    fn hostile_tx_packets() {
        let d = Limits::default();
        // A later fragment past its page.
        let e = fatal(&[req(1, 0, NETTXF_MORE_DATA, 1, 300), req(2, 4000, 0, 2, 200)]);
        assert_eq!(
            e,
            AssemblyError::OffsetBeyondPage {
                slot: 1,
                offset: 4000,
                len: 200
            }
        );
        assert!(e.to_string().contains("slot 1"), "{e}");
        assert!(e.to_string().contains("offset 4000"), "{e}");
        // The first fragment past its page, its size derived.
        assert_eq!(
            fatal(&[req(1, 4000, NETTXF_MORE_DATA, 1, 300), req(2, 0, 0, 2, 100)]),
            AssemblyError::OffsetBeyondPage {
                slot: 0,
                offset: 4000,
                len: 200
            }
        );
        // An offset past the page even with nothing in it.
        assert!(matches!(
            fatal(&[req(1, 5000, NETTXF_MORE_DATA, 1, 10), req(2, 0, 0, 2, 100)]),
            AssemblyError::OffsetBeyondPage { slot: 0, .. }
        ));
        // A total smaller than the rest.
        let e = dropped(
            &[req(1, 0, NETTXF_MORE_DATA, 1, 100), req(2, 0, 0, 2, 200)],
            &d,
        );
        assert_eq!(
            e,
            AssemblyError::FirstSmallerThanRest {
                total: 100,
                rest: 200
            }
        );
        assert!(e.to_string().contains("100") && e.to_string().contains("200"));
        // Zero-size fragments, later and first (derived).
        assert_eq!(
            dropped(
                &[
                    req(1, 0, NETTXF_MORE_DATA, 1, 100),
                    req(2, 0, NETTXF_MORE_DATA, 2, 0),
                    req(3, 0, 0, 3, 50)
                ],
                &d
            ),
            AssemblyError::ZeroSizeFragment { slot: 1 }
        );
        assert_eq!(
            dropped(
                &[req(1, 0, NETTXF_MORE_DATA, 1, 100), req(2, 0, 0, 2, 100)],
                &d
            ),
            AssemblyError::ZeroSizeFragment { slot: 0 }
        );
        // Too short, too large for the configured limit.
        assert_eq!(
            dropped(&[req(1, 0, 0, 1, 13)], &d),
            AssemblyError::TooShort { total: 13 }
        );
        assert_eq!(
            dropped(&[req(1, 0, 0, 1, 1515)], &Limits::new(18, 1514)),
            AssemblyError::TooLarge {
                total: 1515,
                limit: 1514
            }
        );
        // More slots than the limit; a larger limit takes them; a smaller one is raised.
        let mut many = vec![req(1, 0, NETTXF_MORE_DATA, 0, 19 * 100)];
        for i in 1..19 {
            let flags = if i < 18 { NETTXF_MORE_DATA } else { 0 };
            many.push(req(1, 0, flags, i, 100));
        }
        let e = fatal(&many);
        assert_eq!(
            e,
            AssemblyError::TooManySlots {
                slot: 18,
                limit: 18
            }
        );
        assert!(e.to_string().contains("slot 18"));
        let mut p = TxPacket::default();
        assemble_tx(&many, &Limits::new(19, MAX_FRAME), &mut p).expect("19 allowed");
        assert_eq!(p.slots, 19);
        assert_eq!(
            Limits::new(4, MAX_FRAME).max_slots(),
            XEN_NETIF_NR_SLOTS_MIN
        );
        // Unknown extra types.
        for kind in [XEN_NETIF_EXTRA_TYPE_NONE, 5, 0xff] {
            assert_eq!(
                fatal(&[req(1, 0, NETTXF_EXTRA_INFO, 1, 60), extra(kind, 0)]),
                AssemblyError::UnknownExtraType { slot: 1, kind }
            );
        }
        // An extra chain that does not end: more types than exist, a repeat, or the end
        // of the published slots.
        let mut chain = vec![req(1, 0, NETTXF_EXTRA_INFO, 1, 60)];
        for kind in 1..=4 {
            chain.push(extra(kind, XEN_NETIF_EXTRA_FLAG_MORE));
        }
        chain.push(extra(1, 0));
        assert_eq!(
            fatal(&chain),
            AssemblyError::ExtraChainTooLong { slot: 5, limit: 4 }
        );
        assert_eq!(
            fatal(&[
                req(1, 0, NETTXF_EXTRA_INFO, 1, 60),
                extra(1, XEN_NETIF_EXTRA_FLAG_MORE),
                extra(1, 0)
            ]),
            AssemblyError::DuplicateExtra { slot: 2, kind: 1 }
        );
        assert_eq!(
            fatal(&[
                req(1, 0, NETTXF_EXTRA_INFO, 1, 60),
                extra(1, XEN_NETIF_EXTRA_FLAG_MORE)
            ]),
            AssemblyError::Incomplete { slot: 2, have: 2 }
        );
        // Data promised and missing.
        assert_eq!(
            fatal(&[req(1, 0, NETTXF_MORE_DATA, 1, 60)]),
            AssemblyError::Incomplete { slot: 1, have: 1 }
        );
        assert_eq!(fatal(&[]), AssemblyError::Incomplete { slot: 0, have: 0 });
        // Bad GSO descriptors: an unknown type, a zero MSS.
        let mut g = ExtraInfo::gso(GsoExtra {
            size: 1448,
            gso_type: 3,
            features: 0,
        });
        assert_eq!(
            fatal(&[req(1, 0, NETTXF_EXTRA_INFO, 1, 60), g.to_tx_slot()]),
            AssemblyError::BadGso {
                slot: 1,
                gso_type: 3,
                size: 1448
            }
        );
        g.data = [0, 0, 1, 0, 0, 0];
        assert!(matches!(
            fatal(&[req(1, 0, NETTXF_EXTRA_INFO, 1, 60), g.to_tx_slot()]),
            AssemblyError::BadGso { size: 0, .. }
        ));
    }

    /// xorshift64*: a fixed seed, so a failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn fuzzed_tx_slots_never_panic_or_leave_the_page() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let mut p = TxPacket::default();
        let limits = Limits::default();
        let (mut ok, mut drops, mut fatals) = (0, 0, 0);
        for _ in 0..20_000 {
            let n = 1 + rng.below(30) as usize;
            let slots: Vec<[u8; TX_SLOT]> = (0..n)
                .map(|_| {
                    let mut b = [0u8; TX_SLOT];
                    for x in &mut b {
                        *x = rng.next() as u8;
                    }
                    // Bias towards plausible values so the deep paths are reached.
                    if rng.below(2) == 0 {
                        b[4..6].copy_from_slice(&(rng.below(4200) as u16).to_le_bytes());
                        b[6..8].copy_from_slice(&(rng.below(16) as u16).to_le_bytes());
                        b[10..12].copy_from_slice(&(rng.below(5000) as u16).to_le_bytes());
                    }
                    if rng.below(3) == 0 {
                        b[0] = rng.below(6) as u8;
                        b[1] = rng.below(2) as u8;
                        b[4] = rng.below(4) as u8;
                    }
                    b
                })
                .collect();
            // Take packets off the slots as a back end would, until one is fatal.
            let mut at = 0;
            while at < slots.len() {
                match assemble_tx(&slots[at..], &limits, &mut p) {
                    Err(e) => {
                        assert!(e.is_fatal());
                        let _ = e.to_string();
                        fatals += 1;
                        break;
                    }
                    Ok(()) => {
                        assert!(p.slots >= 1 && at + p.slots <= slots.len());
                        assert_eq!(p.responses.len(), p.slots);
                        match p.dropped {
                            Some(e) => {
                                assert!(!e.is_fatal() && p.pieces.is_empty());
                                drops += 1;
                            }
                            None => {
                                let mut sum = 0;
                                for piece in &p.pieces {
                                    assert!(piece.len > 0);
                                    assert!(
                                        usize::from(piece.offset) + usize::from(piece.len)
                                            <= PAGE_SIZE
                                    );
                                    sum += usize::from(piece.len);
                                }
                                assert_eq!(sum, p.len);
                                assert!(p.len >= ETH_HLEN && p.len <= MAX_FRAME);
                                assert!(p.pieces.len() <= limits.max_slots());
                                ok += 1;
                            }
                        }
                        at += p.slots;
                    }
                }
            }
        }
        assert!(
            ok > 100 && drops > 100 && fatals > 100,
            "{ok} {drops} {fatals}"
        );
    }

    #[test]
    fn fuzzed_rx_slots_never_panic_or_leave_the_page() {
        let mut rng = Rng(0x0dd_ba11_cafe_f00d);
        let mut p = RxPacket::default();
        let limits = Limits::default();
        let (mut ok, mut other) = (0, 0);
        for _ in 0..20_000 {
            let n = 1 + rng.below(24) as usize;
            let slots: Vec<[u8; RX_SLOT]> = (0..n)
                .map(|_| {
                    let mut b = [0u8; RX_SLOT];
                    for x in &mut b {
                        *x = rng.next() as u8;
                    }
                    if rng.below(2) == 0 {
                        b[2..4].copy_from_slice(&(rng.below(200) as u16).to_le_bytes());
                        b[4..6].copy_from_slice(&(rng.below(16) as u16).to_le_bytes());
                        b[6..8].copy_from_slice(&(rng.below(4200) as i16).to_le_bytes());
                    }
                    b
                })
                .collect();
            match assemble_rx(&slots, &limits, &mut p) {
                Ok(()) if p.dropped.is_none() => {
                    let mut sum = 0;
                    for f in &p.fragments {
                        assert!(f.slot < p.slots);
                        assert!(usize::from(f.offset) + usize::from(f.len) <= PAGE_SIZE);
                        sum += usize::from(f.len);
                    }
                    assert_eq!(sum, p.len);
                    assert!(p.slots <= slots.len());
                    ok += 1;
                }
                Ok(()) => other += 1,
                Err(e) => {
                    assert!(e.is_fatal());
                    other += 1;
                }
            }
        }
        assert!(ok > 100 && other > 100, "{ok} {other}");
    }

    /// Grants as a test sees them: a page per reference.
    #[derive(Default)]
    struct Grants(HashMap<u32, Vec<u8>>);

    impl Grants {
        fn page(&mut self, gref: GrantRef) -> &mut Vec<u8> {
            self.0.entry(gref.0).or_insert_with(|| vec![0u8; PAGE_SIZE])
        }
    }

    fn tx_rings() -> (FrontRing<TestPages>, BackRing<TestPages>) {
        let pages = TestPages::new(1);
        let layout = RingLayout::one_page(0, TX_SLOT).expect("layout");
        let front = FrontRing::init_at(pages.clone(), layout, 0xffff_fffe).expect("init");
        let back = BackRing::attach(pages, layout).expect("attach");
        (front, back)
    }

    #[test]
    fn frontend_tx_to_backend_assembly() {
        let (mut front, mut back) = tx_rings();
        let mut grants = Grants::default();
        let gso = Offload {
            csum: PARTIAL,
            gso: Some(Gso {
                kind: GsoKind::TcpV4,
                size: 1448,
                hdr_len: 54,
                ecn: false,
            }),
        };
        let csum = Offload {
            csum: PARTIAL,
            gso: None,
        };
        let backend = PeerGso {
            tcpv4: true,
            tcpv6: false,
        };
        let cases = [
            (60, Offload::NONE, 2048u16),
            (1514, csum, 2048),
            (5000, csum, 2048),
            (9014, gso, 4096),
            (65_535, gso, 4096),
        ];
        let mut plan = TxPlan::default();
        let mut pkt = TxPacket::default();
        for (case, &(len, offload, block)) in cases.iter().enumerate() {
            let frame = tcp_frame(false, len);
            // Blocks of `block` bytes, two per page for 2048 as mirage's pool does.
            let buffers: Vec<TxBuffer> = (0..40u16)
                .map(|i| TxBuffer {
                    gref: GrantRef(1000 * case as u32 + u32::from(i) / 2),
                    id: i,
                    offset: if block == 2048 { (i % 2) * 2048 } else { 0 },
                    len: block,
                })
                .map(|mut b| {
                    if block == 4096 {
                        b.gref.0 = 1000 * case as u32 + u32::from(b.id);
                    }
                    b
                })
                .collect();
            plan_tx(len, &offload, backend, &buffers, &mut plan).expect("plan");
            assert_eq!(plan.buffers, len.div_ceil(usize::from(block)));
            for p in &plan.pieces {
                let b = buffers[p.buffer];
                let page = grants.page(b.gref);
                let at = usize::from(b.offset);
                page[at..at + usize::from(p.len)]
                    .copy_from_slice(&frame[p.frame_offset..p.frame_offset + usize::from(p.len)]);
            }
            for s in &plan.slots {
                front.write_request(&s.to_bytes()).expect("slot");
            }
            front.push_requests().expect("push");

            let mut slots = Vec::new();
            let mut buf = [0u8; TX_SLOT];
            while back.next_request(&mut buf).expect("next").is_some() {
                slots.push(buf);
            }
            assert_eq!(slots.len(), plan.slots.len());
            assemble_tx(&slots, &Limits::default(), &mut pkt).expect("assemble");
            assert_eq!(pkt.dropped, None);
            assert_eq!(pkt.slots, slots.len());
            let mut got = Vec::new();
            for p in &pkt.pieces {
                let page = grants.page(p.gref);
                let at = usize::from(p.offset);
                got.extend_from_slice(&page[at..at + usize::from(p.len)]);
            }
            assert!(got == frame, "case {case}: the frame comes through");
            assert_eq!(
                pkt.meta.to_offload(&got).expect("meta"),
                offload,
                "case {case}"
            );

            for r in &pkt.responses {
                back.write_response(&r.to_bytes()).expect("rsp");
            }
            back.push_responses().expect("push");
            let mut ids = Vec::new();
            while front.next_response(&mut buf).expect("next").is_some() {
                let r = TxResponse::parse(&buf);
                if r.status != NETIF_RSP_NULL {
                    assert_eq!(r.status, NETIF_RSP_OKAY);
                    ids.push(r.id);
                }
            }
            let want: Vec<u16> = (0..plan.buffers as u16).collect();
            assert_eq!(ids, want, "case {case}: every buffer comes back");
        }
    }

    #[test]
    fn tx_planning_refuses_what_it_cannot_send() {
        let bufs: Vec<TxBuffer> = (0..30)
            .map(|i| TxBuffer {
                gref: GrantRef(i),
                id: i as u16,
                offset: 0,
                len: 2048,
            })
            .collect();
        let mut plan = TxPlan::default();
        let gso = Offload {
            csum: PARTIAL,
            gso: Some(Gso {
                kind: GsoKind::TcpV4,
                size: 1448,
                hdr_len: 54,
                ecn: false,
            }),
        };
        let none = PeerGso::default();
        assert_eq!(
            plan_tx(9000, &gso, none, &bufs, &mut plan),
            Err(PlanError::GsoNotAccepted { ty: GsoType::TcpV4 })
        );
        let udp = Offload {
            gso: gso.gso.map(|g| Gso {
                kind: GsoKind::UdpL4,
                ..g
            }),
            ..gso
        };
        assert_eq!(
            plan_tx(9000, &udp, none, &bufs, &mut plan),
            Err(PlanError::Meta(MetaError::UnsupportedGso(GsoKind::UdpL4)))
        );
        assert_eq!(
            plan_tx(40_000, &Offload::NONE, none, &bufs, &mut plan),
            Err(PlanError::TooManySlots {
                needed: 20,
                limit: 18
            })
        );
        assert_eq!(
            plan_tx(5000, &Offload::NONE, none, &bufs[..2], &mut plan),
            Err(PlanError::NotEnoughBuffers {
                len: 5000,
                room: 4096
            })
        );
        assert_eq!(
            plan_tx(10, &Offload::NONE, none, &bufs, &mut plan),
            Err(PlanError::TooShort { len: 10 })
        );
        assert!(matches!(
            plan_tx(70_000, &Offload::NONE, none, &bufs, &mut plan),
            Err(PlanError::TooLarge { .. })
        ));
        let bad = [TxBuffer {
            gref: GrantRef(1),
            id: 1,
            offset: 3000,
            len: 2048,
        }];
        assert_eq!(
            plan_tx(100, &Offload::NONE, none, &bad, &mut plan),
            Err(PlanError::BadBuffer {
                index: 0,
                offset: 3000,
                len: 2048
            })
        );
        // The flags of a single-slot frame with a verified checksum.
        plan_tx(
            60,
            &Offload {
                csum: Csum::Verified,
                gso: None,
            },
            none,
            &bufs,
            &mut plan,
        )
        .expect("plan");
        assert_eq!(
            plan.slots,
            [TxSlot::Request(TxRequest {
                gref: GrantRef(0),
                offset: 0,
                flags: NETTXF_DATA_VALIDATED,
                id: 0,
                size: 60
            })]
        );
    }

    #[test]
    fn backend_rx_to_frontend_assembly() {
        let pages = TestPages::new(1);
        let layout = RingLayout::one_page(0, RX_SLOT).expect("layout");
        let mut front = FrontRing::init_at(pages.clone(), layout, 0xffff_fff0).expect("init");
        let mut back = BackRing::attach(pages, layout).expect("attach");
        let mut grants = Grants::default();
        let frontend = PeerGso {
            tcpv4: true,
            tcpv6: true,
        };
        // The front end's record of what it posted, by ring index.
        let mut posted: HashMap<u32, RxRequest> = HashMap::new();
        let mut next_id = 100u16;
        let mut post = |front: &mut FrontRing<TestPages>, posted: &mut HashMap<u32, RxRequest>| {
            while front.free_requests() > 0 && posted.len() < 32 {
                let r = RxRequest {
                    id: next_id,
                    gref: GrantRef(5000 + u32::from(next_id)),
                };
                next_id += 1;
                let idx = front.write_request(&r.to_bytes()).expect("post");
                posted.insert(idx, r);
            }
            front.push_requests().expect("push");
        };
        let gso6 = Offload {
            csum: Csum::Partial {
                start: 54,
                offset: 16,
            },
            gso: Some(Gso {
                kind: GsoKind::TcpV6,
                size: 1428,
                hdr_len: 74,
                ecn: false,
            }),
        };
        let cases = [
            (
                false,
                1514,
                Offload {
                    csum: Csum::Verified,
                    gso: None,
                },
            ),
            (false, 4096, Offload::NONE),
            (true, 9000, gso6),
            (true, MAX_FRAME, gso6),
        ];
        let mut plan = RxPlan::default();
        let mut pkt = RxPacket::default();
        for (case, &(v6, len, offload)) in cases.iter().enumerate() {
            post(&mut front, &mut posted);
            let frame = tcp_frame(v6, len);
            // Back end: take the requests, plan, copy, answer in order.
            let needed = rx_requests_needed(len, &offload, frontend).expect("needed");
            let mut requests = Vec::new();
            let mut buf = [0u8; RX_SLOT];
            while requests.len() < needed {
                back.next_request(&mut buf).expect("next").expect("posted");
                requests.push(RxRequest::parse(&buf));
            }
            plan_rx(len, &offload, frontend, &requests, &mut plan).expect("plan");
            assert_eq!(plan.requests, needed);
            assert_eq!(plan.responses.len(), needed);
            for c in &plan.copies {
                grants.page(c.gref)[..usize::from(c.len)]
                    .copy_from_slice(&frame[c.frame_offset..c.frame_offset + usize::from(c.len)]);
            }
            for r in &plan.responses {
                back.write_response(&r.to_bytes()).expect("rsp");
            }
            back.push_responses().expect("push");
            // Front end: take the responses, assemble, find each page by ring position.
            let first = front.rsp_cons();
            let mut slots = Vec::new();
            while front.next_response(&mut buf).expect("next").is_some() {
                slots.push(buf);
            }
            assemble_rx(&slots, &Limits::default(), &mut pkt).expect("assemble");
            assert_eq!(pkt.dropped, None, "case {case}");
            assert_eq!(pkt.slots, slots.len());
            assert_eq!(pkt.len, len);
            let mut got = Vec::new();
            for f in &pkt.fragments {
                let r = posted[&first.wrapping_add(f.slot as u32)];
                assert_eq!(r.id, f.id, "responses are in their requests' slots");
                let at = usize::from(f.offset);
                got.extend_from_slice(&grants.page(r.gref)[at..at + usize::from(f.len)]);
            }
            assert!(got == frame, "case {case}: the frame comes through");
            assert_eq!(
                pkt.meta.to_offload(&got).expect("meta"),
                offload,
                "case {case}"
            );
            for k in 0..pkt.slots {
                posted.remove(&first.wrapping_add(k as u32));
            }
        }
    }

    #[test]
    fn rx_planning_and_hostile_rx_responses() {
        let reqs: Vec<RxRequest> = (0..4)
            .map(|i| RxRequest {
                id: i,
                gref: GrantRef(u32::from(i)),
            })
            .collect();
        let mut plan = RxPlan::default();
        let gso = Offload {
            csum: PARTIAL,
            gso: Some(Gso {
                kind: GsoKind::TcpV4,
                size: 1448,
                hdr_len: 54,
                ecn: false,
            }),
        };
        assert_eq!(
            plan_rx(9000, &gso, PeerGso::default(), &reqs, &mut plan),
            Err(PlanError::GsoNotAccepted { ty: GsoType::TcpV4 })
        );
        let v4 = PeerGso {
            tcpv4: true,
            tcpv6: false,
        };
        assert_eq!(
            plan_rx(9000, &gso, v4, &reqs[..3], &mut plan),
            Err(PlanError::NotEnough { needed: 4, have: 3 })
        );
        plan_rx(9000, &gso, v4, &reqs, &mut plan).expect("plan");
        let first =
            NETRXF_MORE_DATA | NETRXF_EXTRA_INFO | NETRXF_CSUM_BLANK | NETRXF_DATA_VALIDATED;
        assert_eq!(
            plan.responses,
            [
                RxSlot::Response(RxResponse {
                    id: 0,
                    offset: 0,
                    flags: first,
                    status: 4096
                }),
                RxSlot::Extra(ExtraInfo::gso(GsoExtra {
                    size: 1448,
                    gso_type: XEN_NETIF_GSO_TYPE_TCPV4,
                    features: 0
                })),
                RxSlot::Response(RxResponse {
                    id: 2,
                    offset: 0,
                    flags: NETRXF_MORE_DATA,
                    status: 4096
                }),
                RxSlot::Response(RxResponse {
                    id: 3,
                    offset: 0,
                    flags: 0,
                    status: 808
                }),
            ]
        );
        let grefs: Vec<u32> = plan.copies.iter().map(|c| c.gref.0).collect();
        assert_eq!(
            grefs,
            [0, 2, 3],
            "the descriptor's request page is not written"
        );
        plan.fail();
        assert!(plan.responses.iter().all(|s| match s {
            RxSlot::Response(r) => r.status == NETIF_RSP_ERROR,
            RxSlot::Extra(_) => true,
        }));

        let rsp = |offset: u16, flags: u16, status: i16| {
            RxResponse {
                id: 1,
                offset,
                flags,
                status,
            }
            .to_bytes()
        };
        let mut p = RxPacket::default();
        let l = Limits::default();
        let drop = |slots: &[[u8; RX_SLOT]], p: &mut RxPacket| {
            assemble_rx(slots, &l, p).expect("not fatal");
            assert!(p.fragments.is_empty());
            assert_eq!(p.slots, slots.len());
            p.dropped.expect("dropped")
        };
        assert_eq!(
            drop(&[rsp(0, NETRXF_MORE_DATA, 100), rsp(0, 0, -1)], &mut p),
            AssemblyError::ErrorStatus {
                slot: 1,
                status: -1
            }
        );
        assert_eq!(
            drop(&[rsp(4000, 0, 200)], &mut p),
            AssemblyError::OffsetBeyondPage {
                slot: 0,
                offset: 4000,
                len: 200
            }
        );
        assert_eq!(
            drop(&[rsp(0, 0, 10)], &mut p),
            AssemblyError::TooShort { total: 10 }
        );
        assert_eq!(
            assemble_rx(&[rsp(0, NETRXF_GSO_PREFIX, 100)], &l, &mut p),
            Err(AssemblyError::BadFlags {
                slot: 0,
                flags: NETRXF_GSO_PREFIX
            })
        );
        assert_eq!(
            assemble_rx(&[rsp(0, NETRXF_MORE_DATA, 100)], &l, &mut p),
            Err(AssemblyError::Incomplete { slot: 1, have: 1 })
        );
        let mut bad_extra = [0u8; RX_SLOT];
        bad_extra[0] = 9;
        assert_eq!(
            assemble_rx(&[rsp(0, NETRXF_EXTRA_INFO, 100), bad_extra], &l, &mut p),
            Err(AssemblyError::UnknownExtraType { slot: 1, kind: 9 })
        );
        let long: Vec<[u8; RX_SLOT]> = (0..19).map(|_| rsp(0, NETRXF_MORE_DATA, 100)).collect();
        assert_eq!(
            assemble_rx(&long, &l, &mut p),
            Err(AssemblyError::TooManySlots {
                slot: 18,
                limit: 18
            })
        );
    }

    #[test]
    fn offload_translation() {
        let m = PacketMeta::from_offload(&Offload {
            csum: PARTIAL,
            gso: None,
        })
        .expect("meta");
        assert!(m.csum_blank && m.data_validated);
        assert_eq!(m.tx_flags(), NETTXF_CSUM_BLANK | NETTXF_DATA_VALIDATED);
        assert_eq!(m.rx_flags(), NETRXF_CSUM_BLANK | NETRXF_DATA_VALIDATED);
        // csum_blank on a frame with no transport header cannot become an Offload.
        assert_eq!(m.to_offload(&[0u8; 60]), Err(MetaError::NoTransportHeader));
        // UDP over IPv6 behind a hop-by-hop header.
        let mut f = vec![0u8; 100];
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        f[14] = 0x60;
        f[20] = 0; // hop-by-hop
        f[54] = 17; // then UDP
        f[55] = 0; // 8 bytes
        assert_eq!(
            m.to_offload(&f).expect("udp").csum,
            Csum::Partial {
                start: 62,
                offset: 6
            }
        );
        // An IPv4 fragment has no transport header to offload.
        let mut f = tcp_frame(false, 100);
        f[20] = 0x20; // more fragments
        assert_eq!(m.to_offload(&f), Err(MetaError::NoTransportHeader));
        let zero = Offload {
            csum: PARTIAL,
            gso: Some(Gso {
                kind: GsoKind::TcpV4,
                size: 0,
                hdr_len: 54,
                ecn: false,
            }),
        };
        assert_eq!(PacketMeta::from_offload(&zero), Err(MetaError::ZeroMss));
    }
}
