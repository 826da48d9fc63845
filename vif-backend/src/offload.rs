//! What the sender's kernel left undone on a frame, and finishing it.
//!
//! Linux devices opened with the virtio_net header (AF_PACKET `PACKET_VNET_HDR`, TAP
//! `IFF_VNET_HDR`) hand every frame over with a `struct virtio_net_hdr` (virtio spec 1.2
//! section 5.1.6, `include/uapi/linux/virtio_net.h`) saying whether its transport checksum
//! still has to be computed (`NEEDS_CSUM`: left to the "hardware") and whether it is a GSO
//! super-frame to be cut into segments. Veth pairs and Xen netfront both produce such frames
//! whenever the client's stack has offloads on, which is the default.
//!
//! Devices describe that as [`Offload`] (flags, not the virtio struct), which a service
//! forwards with the frame (so the kernel on the other side finishes it, as for a kernel
//! router) or finishes here with [`finish`].

use qubes_engine::wire::{self, be16, put16};

/// The state of a frame's transport checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Csum {
    /// Complete in the frame (or none is needed); nothing known about it.
    #[default]
    Complete,
    /// The field at `start + offset` holds only the pseudo-header sum; the checksum over
    /// everything from `start` on is still to be computed (`VIRTIO_NET_HDR_F_NEEDS_CSUM`).
    Partial { start: u16, offset: u16 },
    /// Complete, and already verified by the kernel (`VIRTIO_NET_HDR_F_DATA_VALID`).
    Verified,
}

/// Kinds of segmentation offload (`VIRTIO_NET_HDR_GSO_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsoKind {
    TcpV4,
    TcpV6,
    /// UDP segmentation (`GSO_UDP_L4`): each segment a datagram of its own.
    UdpL4,
    /// UDP fragmentation offload (`GSO_UDP`, UFO): one datagram cut into IP fragments.
    Ufo,
}

/// A GSO super-frame: segments of `size` payload bytes are what go on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gso {
    pub kind: GsoKind,
    pub size: u16,
    /// Length of the headers before the payload, as the sender gave it.
    pub hdr_len: u16,
    /// `VIRTIO_NET_HDR_GSO_ECN`: the sender set CWR on the super-frame.
    pub ecn: bool,
}

/// Receive (and send) metadata of a frame: what the sender's kernel left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offload {
    pub csum: Csum,
    pub gso: Option<Gso>,
}

impl Offload {
    /// A finished, wire-sized frame.
    pub const NONE: Offload = Offload {
        csum: Csum::Complete,
        gso: None,
    };

    /// The engine's view when the frame can be forwarded as it is: a partial checksum, a
    /// verified one, or a TCP/UDP GSO super-frame (which the kernel segments on the way out).
    /// `None`: an offload the engine does not forward whole (UFO, GSO without a partial
    /// checksum), to be finished with [`finish`] first.
    pub fn for_engine(&self) -> Option<qubes_engine::Offload> {
        let partial = matches!(self.csum, Csum::Partial { .. });
        let gso_size = match self.gso {
            None => 0,
            // The kernel cannot segment a super-frame whose checksum is not partial.
            Some(g) if g.kind != GsoKind::Ufo && partial => g.size,
            Some(_) => return None,
        };
        Some(qubes_engine::Offload {
            partial_csum: partial,
            csum_valid: self.csum == Csum::Verified,
            gso_size,
        })
    }
}

/// `struct virtio_net_hdr` in the legacy layout AF_PACKET and TAP use (10 bytes, fields in
/// the host's byte order: little-endian on the hosts we run on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

pub(crate) const VNET_HDR_LEN: usize = 10;
const F_NEEDS_CSUM: u8 = 1;
const F_DATA_VALID: u8 = 2;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_UDP: u8 = 3;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
const GSO_ECN: u8 = 0x80;

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Option<Self> {
        let h = b.get(..VNET_HDR_LEN)?;
        let le = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        Some(VnetHdr {
            flags: h[0],
            gso_type: h[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        })
    }

    pub fn to_bytes(self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }

    /// The metadata of a received header; `None` for a GSO type the virtio spec does not
    /// define (the frame is dropped rather than guessed at).
    pub fn offload(&self) -> Option<Offload> {
        let csum = if self.flags & F_NEEDS_CSUM != 0 {
            Csum::Partial {
                start: self.csum_start,
                offset: self.csum_offset,
            }
        } else if self.flags & F_DATA_VALID != 0 {
            Csum::Verified
        } else {
            Csum::Complete
        };
        let kind = match self.gso_type & !GSO_ECN {
            GSO_NONE => None,
            GSO_TCPV4 => Some(GsoKind::TcpV4),
            GSO_TCPV6 => Some(GsoKind::TcpV6),
            GSO_UDP_L4 => Some(GsoKind::UdpL4),
            GSO_UDP => Some(GsoKind::Ufo),
            _ => return None,
        };
        Some(Offload {
            csum,
            gso: kind.map(|kind| Gso {
                kind,
                size: self.gso_size,
                hdr_len: self.hdr_len,
                ecn: self.gso_type & GSO_ECN != 0,
            }),
        })
    }

    /// The header to send a frame with: the same offloads still to do. `DATA_VALID` is a
    /// receive-side flag and is not sent back.
    pub fn from_offload(o: &Offload) -> VnetHdr {
        let mut h = VnetHdr::default();
        if let Csum::Partial { start, offset } = o.csum {
            h.flags = F_NEEDS_CSUM;
            h.csum_start = start;
            h.csum_offset = offset;
        }
        if let Some(g) = o.gso {
            h.gso_type = match g.kind {
                GsoKind::TcpV4 => GSO_TCPV4,
                GsoKind::TcpV6 => GSO_TCPV6,
                GsoKind::UdpL4 => GSO_UDP_L4,
                GsoKind::Ufo => GSO_UDP,
            } | if g.ecn { GSO_ECN } else { 0 };
            h.gso_size = g.size;
            h.hdr_len = g.hdr_len;
        }
        h
    }
}

/// Why a frame could not be made wire-ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffloadError {
    /// Offsets that do not fit the frame.
    Malformed,
    /// A GSO kind we do not segment (UFO).
    Unsupported,
}

/// Computes a checksum the sender left to the hardware (`NEEDS_CSUM`): the field holds the
/// pseudo-header sum; the checksum covers everything from `csum_start` on.
pub fn complete_checksum(
    frame: &mut [u8],
    start: usize,
    offset: usize,
) -> Result<(), OffloadError> {
    let field = start + offset;
    if start >= frame.len() || field + 2 > frame.len() {
        return Err(OffloadError::Malformed);
    }
    let c = !wire::fold(wire::sum(&frame[start..], 0));
    put16(frame, field, c);
    Ok(())
}

/// Makes `frame` wire-ready and calls `emit` with each resulting frame: the frame itself (its
/// checksum completed if needed), or the segments of a GSO super-frame.
pub fn finish(
    offload: &Offload,
    frame: &mut [u8],
    scratch: &mut Vec<u8>,
    mut emit: impl FnMut(&mut [u8]),
) -> Result<(), OffloadError> {
    match offload.gso {
        None => {
            if let Csum::Partial { start, offset } = offload.csum {
                complete_checksum(frame, usize::from(start), usize::from(offset))?;
            }
            emit(frame);
            Ok(())
        }
        Some(g) if g.kind != GsoKind::Ufo => segment(frame, g.size, scratch, emit),
        Some(_) => Err(OffloadError::Unsupported),
    }
}

/// Cuts a TCP or UDP (GSO_UDP_L4) super-frame into segments of `mss` payload bytes, each with
/// its own lengths, IPv4 id, TCP sequence number and flags, and checksums.
fn segment(
    frame: &[u8],
    mss: u16,
    scratch: &mut Vec<u8>,
    mut emit: impl FnMut(&mut [u8]),
) -> Result<(), OffloadError> {
    let mss = usize::from(mss);
    if mss == 0 || frame.len() < wire::ETH_LEN + 20 {
        return Err(OffloadError::Malformed);
    }
    let v6 = match wire::ethertype(frame) {
        wire::ETHERTYPE_IPV4 => false,
        wire::ETHERTYPE_IPV6 => true,
        _ => return Err(OffloadError::Malformed),
    };
    let ip = wire::ETH_LEN;
    let (ihl, proto) = if v6 {
        if frame.len() < ip + 40 {
            return Err(OffloadError::Malformed);
        }
        (40, frame[ip + 6])
    } else {
        (usize::from(frame[ip] & 0x0f) * 4, frame[ip + 9])
    };
    let l4 = ip + ihl;
    let l4h = match proto {
        wire::PROTO_TCP => {
            let off = frame.get(l4 + 12).ok_or(OffloadError::Malformed)?;
            usize::from(off >> 4) * 4
        }
        wire::PROTO_UDP => 8,
        _ => return Err(OffloadError::Malformed),
    };
    let hdrs = l4 + l4h;
    if ihl < 20 || l4h < 8 || hdrs > frame.len() {
        return Err(OffloadError::Malformed);
    }
    let payload = &frame[hdrs..];
    let n = payload.len().div_ceil(mss).max(1);
    let seq0 = if proto == wire::PROTO_TCP {
        u32::from_be_bytes([frame[l4 + 4], frame[l4 + 5], frame[l4 + 6], frame[l4 + 7]])
    } else {
        0
    };
    let id0 = if v6 { 0 } else { be16(frame, ip + 4) };
    for i in 0..n {
        let chunk = &payload[(i * mss).min(payload.len())..((i + 1) * mss).min(payload.len())];
        scratch.clear();
        scratch.extend_from_slice(&frame[..hdrs]);
        scratch.extend_from_slice(chunk);
        let seg = scratch.as_mut_slice();
        let ip_len = seg.len() - ip;
        if v6 {
            put16(seg, ip + 4, (ip_len - 40) as u16);
        } else {
            put16(seg, ip + 2, ip_len as u16);
            put16(seg, ip + 4, id0.wrapping_add(i as u16));
            put16(seg, ip + 10, 0);
            let hc = wire::checksum(&seg[ip..ip + ihl]);
            put16(seg, ip + 10, hc);
        }
        let src_dst = if v6 {
            (ip + 8, ip + 24, 16)
        } else {
            (ip + 12, ip + 16, 4)
        };
        let (csum_off, l4_len) = if proto == wire::PROTO_TCP {
            let seq = seq0.wrapping_add((i * mss) as u32);
            seg[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
            // FIN and PSH belong to the last segment, CWR to the first (RFC 3168 6.1.2).
            if i + 1 < n {
                seg[l4 + 13] &= !0x09;
            }
            if i > 0 {
                seg[l4 + 13] &= !0x80;
            }
            (l4 + 16, seg.len() - l4)
        } else {
            let ulen = seg.len() - l4;
            put16(seg, l4 + 4, ulen as u16);
            (l4 + 6, ulen)
        };
        put16(seg, csum_off, 0);
        let mut acc = u64::from(proto) + l4_len as u64;
        acc = wire::sum(&seg[src_dst.0..src_dst.0 + src_dst.2], acc);
        acc = wire::sum(&seg[src_dst.1..src_dst.1 + src_dst.2], acc);
        let mut c = !wire::fold(wire::sum(&seg[l4..], acc));
        if proto == wire::PROTO_UDP && c == 0 {
            c = 0xffff;
        }
        put16(seg, csum_off, c);
        emit(seg);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet/IPv4/TCP frame with `payload`, checksum as the sender's kernel leaves it
    /// for offload (pseudo-header sum only).
    fn partial_tcp(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20];
        put16(&mut f, 12, wire::ETHERTYPE_IPV4);
        f[14] = 0x45;
        put16(&mut f, 16, (40 + payload.len()) as u16);
        put16(&mut f, 18, 0x1000);
        f[20] = 0x40;
        f[22] = 64;
        f[23] = wire::PROTO_TCP;
        f[26..30].copy_from_slice(&[10, 137, 0, 10]);
        f[30..34].copy_from_slice(&[198, 18, 0, 10]);
        let hc = wire::checksum(&f[14..34]);
        put16(&mut f, 24, hc);
        put16(&mut f, 34, 40000);
        put16(&mut f, 36, 80);
        f[38..42].copy_from_slice(&1000u32.to_be_bytes());
        f[46] = 0x50;
        f[47] = 0x18; // PSH ACK
        put16(&mut f, 48, 65535);
        f.extend_from_slice(payload);
        let pseudo = wire::pseudo_sum(
            &"10.137.0.10".parse().expect("ip"),
            &"198.18.0.10".parse().expect("ip"),
            wire::PROTO_TCP,
            20 + payload.len(),
        );
        put16(&mut f, 50, wire::fold(pseudo));
        f
    }

    fn tcp_ok(f: &[u8]) -> bool {
        let ip = wire::parse_ipv4(f, 14).expect("ipv4");
        wire::parse_l4(f, &ip).is_some()
    }

    #[test]
    fn completes_partial_checksum() {
        let mut f = partial_tcp(b"hello world");
        assert!(!tcp_ok(&f));
        let hdr = Offload {
            csum: Csum::Partial {
                start: 34,
                offset: 16,
            },
            gso: None,
        };
        let mut scratch = Vec::new();
        let mut out = Vec::new();
        finish(&hdr, &mut f, &mut scratch, |s| out.push(s.to_vec())).expect("finish");
        assert_eq!(out.len(), 1);
        assert!(tcp_ok(&out[0]));
    }

    #[test]
    fn segments_tcp_super_frame() {
        let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let mut f = partial_tcp(&payload);
        let hdr = Offload {
            csum: Csum::Partial {
                start: 34,
                offset: 16,
            },
            gso: Some(Gso {
                kind: GsoKind::TcpV4,
                size: 1448,
                hdr_len: 54,
                ecn: false,
            }),
        };
        let mut scratch = Vec::new();
        let mut out = Vec::new();
        finish(&hdr, &mut f, &mut scratch, |s| out.push(s.to_vec())).expect("finish");
        assert_eq!(out.len(), 3);
        let mut joined = Vec::new();
        for (i, s) in out.iter().enumerate() {
            assert!(tcp_ok(s), "segment {i} checksums");
            let seq = u32::from_be_bytes([s[38], s[39], s[40], s[41]]);
            assert_eq!(seq, 1000 + (i as u32) * 1448);
            assert_eq!(s[47] & 0x08 != 0, i == 2, "PSH only on the last");
            joined.extend_from_slice(&s[54..]);
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn bad_offsets_are_errors() {
        let mut f = partial_tcp(b"x");
        let hdr = Offload {
            csum: Csum::Partial {
                start: 60,
                offset: 16,
            },
            gso: None,
        };
        assert_eq!(
            finish(&hdr, &mut f, &mut Vec::new(), |_| {}),
            Err(OffloadError::Malformed)
        );
    }

    #[test]
    fn virtio_header_round_trips_through_the_metadata() {
        // A TCPv6 super-frame with ECN and a partial checksum, as a Linux guest sends it.
        let raw = [
            F_NEEDS_CSUM,
            GSO_TCPV6 | GSO_ECN,
            74,
            0,
            0xa8,
            0x05,
            54,
            0,
            16,
            0,
        ];
        let h = VnetHdr::parse(&raw).expect("10 bytes");
        let o = h.offload().expect("known GSO type");
        assert_eq!(
            o,
            Offload {
                csum: Csum::Partial {
                    start: 54,
                    offset: 16
                },
                gso: Some(Gso {
                    kind: GsoKind::TcpV6,
                    size: 1448,
                    hdr_len: 74,
                    ecn: true
                }),
            }
        );
        assert_eq!(VnetHdr::from_offload(&o).to_bytes(), raw);
        // DATA_VALID is a receive-side promise: it is read, never sent back.
        let valid = VnetHdr::parse(&[F_DATA_VALID, 0, 0, 0, 0, 0, 0, 0, 0, 0]).expect("hdr");
        let o = valid.offload().expect("plain");
        assert_eq!(o.csum, Csum::Verified);
        assert_eq!(VnetHdr::from_offload(&o).to_bytes(), [0u8; VNET_HDR_LEN]);
        // An undefined GSO type is refused, not guessed at.
        assert!(VnetHdr::parse(&[0, 7, 0, 0, 0, 0, 0, 0, 0, 0])
            .expect("hdr")
            .offload()
            .is_none());
        assert!(VnetHdr::parse(&[0; 9]).is_none());
    }

    #[test]
    fn engine_view_forwards_only_what_a_kernel_can_finish() {
        let partial = Csum::Partial {
            start: 34,
            offset: 16,
        };
        let tso = Gso {
            kind: GsoKind::TcpV4,
            size: 1448,
            hdr_len: 54,
            ecn: false,
        };
        assert_eq!(
            Offload::NONE.for_engine(),
            Some(qubes_engine::Offload::NONE)
        );
        let e = Offload {
            csum: partial,
            gso: Some(tso),
        }
        .for_engine()
        .expect("TSO with a partial checksum is forwarded whole");
        assert!(e.partial_csum && e.gso_size == 1448);
        // GSO whose checksum is not partial, and UFO, are finished by the shell.
        let no_csum = Offload {
            csum: Csum::Complete,
            gso: Some(tso),
        };
        assert_eq!(no_csum.for_engine(), None);
        let ufo = Offload {
            csum: partial,
            gso: Some(Gso {
                kind: GsoKind::Ufo,
                ..tso
            }),
        };
        assert_eq!(ufo.for_engine(), None);
    }
}
