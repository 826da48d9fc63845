//! Building input frames, readably: `tcp(from_client(&C3), "10.137.0.10:40000",
//! "198.18.0.10:80").flags("S").frame()`.

use std::net::{IpAddr, SocketAddr};

use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, Ethernet2Header, IpNumber, Ipv4Header,
    Ipv6FlowLabel, Ipv6Header, TcpHeader, UdpHeader,
};
use qubes_engine::config::{parse_mac, Mac, GATEWAY_MAC};

use super::frame::{checksum, l4_checksum, Decoded};

/// Source and destination MAC of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2 {
    pub src: Mac,
    pub dst: Mac,
}

/// Parses a MAC written in a scenario.
pub fn mac(s: &str) -> Mac {
    parse_mac(s).expect("scenario MAC")
}

/// The firewall's own uplink MAC (`/qubes-mac`, Qubes' default).
pub const FW_MAC: &str = "00:16:3e:5e:6c:00";

/// A frame from the netvm to the firewall: the netvm side of a Xen vif has the netback MAC.
pub fn from_netvm() -> L2 {
    L2 {
        src: GATEWAY_MAC,
        dst: mac(FW_MAC),
    }
}

/// A frame from a client MAC to the gateway MAC.
pub fn from_mac(client_mac: &str) -> L2 {
    L2 {
        src: mac(client_mac),
        dst: GATEWAY_MAC,
    }
}

/// The transport part of a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: String,
        seq: u32,
        ack: u32,
        win: u16,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMPv4 or ICMPv6 (by the address family): type, code, bytes 4..8.
    Icmp {
        ty: u8,
        code: u8,
        rest: [u8; 4],
    },
    /// Another IP protocol, the payload as is.
    Raw(u8),
}

/// An IP packet in an Ethernet frame, built field by field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkt {
    pub l2: L2,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    pub df: bool,
    pub id: u16,
    pub l4: L4,
    pub payload: Vec<u8>,
}

fn sock(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|_| panic!("{s:?} is not address:port ([v6]:port for IPv6)"))
}

fn addr(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|_| panic!("{s:?} is not an IP address"))
}

fn pkt(l2: L2, src: IpAddr, dst: IpAddr, l4: L4) -> Pkt {
    assert_eq!(src.is_ipv4(), dst.is_ipv4(), "mixed address families");
    Pkt {
        l2,
        src,
        dst,
        ttl: 64,
        df: true,
        id: 0x1234,
        l4,
        payload: Vec::new(),
    }
}

/// A TCP segment (flags `S` unless changed).
pub fn tcp(l2: L2, from: &str, to: &str) -> Pkt {
    let (f, t) = (sock(from), sock(to));
    pkt(
        l2,
        f.ip(),
        t.ip(),
        L4::Tcp {
            sport: f.port(),
            dport: t.port(),
            flags: "S".into(),
            seq: 1000,
            ack: 0,
            win: 64240,
        },
    )
}

/// A UDP datagram.
pub fn udp(l2: L2, from: &str, to: &str) -> Pkt {
    let (f, t) = (sock(from), sock(to));
    let mut p = pkt(
        l2,
        f.ip(),
        t.ip(),
        L4::Udp {
            sport: f.port(),
            dport: t.port(),
        },
    );
    p.df = false;
    p
}

/// An ICMP message of any type (ICMPv6 for IPv6 addresses).
pub fn icmp(l2: L2, from: &str, to: &str, ty: u8, code: u8, rest: [u8; 4]) -> Pkt {
    pkt(l2, addr(from), addr(to), L4::Icmp { ty, code, rest })
}

/// An echo request (ping).
pub fn ping(l2: L2, from: &str, to: &str, id: u16, seq: u16) -> Pkt {
    let ty = if addr(from).is_ipv4() { 8 } else { 128 };
    let [a, b] = id.to_be_bytes();
    let [c, d] = seq.to_be_bytes();
    icmp(l2, from, to, ty, 0, [a, b, c, d]).payload(b"ping ping ping ping ")
}

/// An ICMP error quoting `quoted` (an IP packet; the first 28 bytes are quoted, as routers do
/// at least, or all of it if shorter).
pub fn icmp_error(
    l2: L2,
    from: &str,
    to: &str,
    ty: u8,
    code: u8,
    rest: [u8; 4],
    quoted: &[u8],
) -> Pkt {
    let n = quoted.len().min(28);
    icmp(l2, from, to, ty, code, rest).payload(&quoted[..n])
}

/// A protocol other than TCP/UDP/ICMP (e.g. 47, GRE).
pub fn raw_ip(l2: L2, from: &str, to: &str, proto: u8) -> Pkt {
    pkt(l2, addr(from), addr(to), L4::Raw(proto))
}

impl Pkt {
    pub fn flags(mut self, f: &str) -> Self {
        if let L4::Tcp { flags, .. } = &mut self.l4 {
            *flags = f.to_string();
        }
        self
    }

    pub fn seq(mut self, n: u32) -> Self {
        if let L4::Tcp { seq, .. } = &mut self.l4 {
            *seq = n;
        }
        self
    }

    pub fn ack(mut self, n: u32) -> Self {
        if let L4::Tcp { ack, .. } = &mut self.l4 {
            *ack = n;
        }
        self
    }

    pub fn ttl(mut self, t: u8) -> Self {
        self.ttl = t;
        self
    }

    pub fn df(mut self, on: bool) -> Self {
        self.df = on;
        self
    }

    pub fn id(mut self, id: u16) -> Self {
        self.id = id;
        self
    }

    pub fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }

    /// A payload of `n` bytes of filler text.
    pub fn payload_len(mut self, n: usize) -> Self {
        let text = b"The quick brown fox jumps over the lazy dog. ";
        self.payload = text.iter().copied().cycle().take(n).collect();
        self
    }

    fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::Icmp { .. } => {
                if self.src.is_ipv4() {
                    1
                } else {
                    58
                }
            }
            L4::Raw(p) => p,
        }
    }

    /// The transport header and payload, with a correct checksum.
    pub fn segment(&self) -> Vec<u8> {
        let mut seg = Vec::new();
        let csum_at = match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
                seq,
                ack,
                win,
            } => {
                let mut h = TcpHeader::new(*sport, *dport, *seq, *win);
                h.acknowledgment_number = *ack;
                h.fin = flags.contains('F');
                h.syn = flags.contains('S');
                h.rst = flags.contains('R');
                h.psh = flags.contains('P');
                h.ack = flags.contains('A');
                h.urg = flags.contains('U');
                seg.extend_from_slice(&h.to_bytes());
                Some(16)
            }
            L4::Udp { sport, dport } => {
                let h = UdpHeader {
                    source_port: *sport,
                    destination_port: *dport,
                    length: (8 + self.payload.len()) as u16,
                    checksum: 0,
                };
                seg.extend_from_slice(&h.to_bytes());
                Some(6)
            }
            L4::Icmp { ty, code, rest } => {
                seg.extend_from_slice(&[*ty, *code, 0, 0]);
                seg.extend_from_slice(rest);
                Some(2)
            }
            L4::Raw(_) => None,
        };
        seg.extend_from_slice(&self.payload);
        if let Some(at) = csum_at {
            let c = l4_checksum(self.src, self.dst, self.proto(), &seg, at);
            seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        seg
    }

    fn ip_header(&self, payload_len: usize) -> Vec<u8> {
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut h = Ipv4Header::new(
                    payload_len as u16,
                    self.ttl,
                    IpNumber(self.proto()),
                    s.octets(),
                    d.octets(),
                )
                .expect("IPv4 payload size");
                h.dont_fragment = self.df;
                h.identification = self.id;
                h.header_checksum = h.calc_header_checksum();
                h.to_bytes().to_vec()
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let h = Ipv6Header {
                    traffic_class: 0,
                    flow_label: Ipv6FlowLabel::ZERO,
                    payload_length: payload_len as u16,
                    next_header: IpNumber(self.proto()),
                    hop_limit: self.ttl,
                    source: s.octets(),
                    destination: d.octets(),
                };
                h.to_bytes().to_vec()
            }
            _ => panic!("mixed address families"),
        }
    }

    /// The IP packet.
    pub fn ip_packet(&self) -> Vec<u8> {
        let seg = self.segment();
        let mut p = self.ip_header(seg.len());
        p.extend_from_slice(&seg);
        p
    }

    /// The Ethernet frame.
    pub fn frame(&self) -> Vec<u8> {
        let et = if self.src.is_ipv4() { 0x0800 } else { 0x86dd };
        ether(self.l2, et, &self.ip_packet())
    }

    /// The IPv4 frame cut into fragments carrying `chunk` bytes of the IP payload each (a
    /// multiple of 8), in order.
    pub fn fragments(&self, chunk: usize) -> Vec<Vec<u8>> {
        assert!(
            chunk.is_multiple_of(8) && chunk > 0,
            "fragment size must be a multiple of 8"
        );
        let (IpAddr::V4(s), IpAddr::V4(d)) = (self.src, self.dst) else {
            panic!("only IPv4 is fragmented here");
        };
        let seg = self.segment();
        let parts: Vec<&[u8]> = seg.chunks(chunk).collect();
        let n = parts.len();
        parts
            .iter()
            .enumerate()
            .map(|(i, part)| {
                let mut h = Ipv4Header::new(
                    part.len() as u16,
                    self.ttl,
                    IpNumber(self.proto()),
                    s.octets(),
                    d.octets(),
                )
                .expect("fragment size");
                h.dont_fragment = false;
                h.more_fragments = i + 1 < n;
                h.fragment_offset =
                    etherparse::IpFragOffset::try_new((i * chunk / 8) as u16).expect("offset");
                h.identification = self.id;
                h.header_checksum = h.calc_header_checksum();
                let mut p = h.to_bytes().to_vec();
                p.extend_from_slice(part);
                ether(self.l2, 0x0800, &p)
            })
            .collect()
    }
}

/// An Ethernet frame around `payload`.
pub fn ether(l2: L2, ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let h = Ethernet2Header {
        source: l2.src,
        destination: l2.dst,
        ether_type: EtherType(ether_type),
    };
    let mut f = h.to_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

/// An ARP request `who has tpa? tell spa` (broadcast).
pub fn arp_request(sha: &str, spa: &str, tpa: &str) -> Vec<u8> {
    arp(
        ArpOperation::REQUEST,
        L2 {
            src: mac(sha),
            dst: [0xff; 6],
        },
        sha,
        spa,
        "00:00:00:00:00:00",
        tpa,
    )
}

/// An ARP reply `spa is at sha`, to `tha`.
pub fn arp_reply(sha: &str, spa: &str, tha: &str, tpa: &str) -> Vec<u8> {
    arp(
        ArpOperation::REPLY,
        L2 {
            src: mac(sha),
            dst: mac(tha),
        },
        sha,
        spa,
        tha,
        tpa,
    )
}

fn arp(op: ArpOperation, l2: L2, sha: &str, spa: &str, tha: &str, tpa: &str) -> Vec<u8> {
    let v4 = |s: &str| match addr(s) {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(_) => panic!("ARP is IPv4"),
    };
    let a = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        op,
        &mac(sha),
        &v4(spa),
        &mac(tha),
        &v4(tpa),
    )
    .expect("ARP packet");
    ether(l2, 0x0806, &a.to_bytes())
}

/// The solicited-node multicast address and MAC for an IPv6 address.
pub fn solicited_node(target: &str) -> (String, Mac) {
    let IpAddr::V6(t) = addr(target) else {
        panic!("NDP is IPv6")
    };
    let o = t.octets();
    let a = format!("ff02::1:ff{:02x}:{:02x}{:02x}", o[13], o[14], o[15]);
    (a, [0x33, 0x33, 0xff, o[13], o[14], o[15]])
}

/// A neighbour solicitation for `target` from `src` (`::` for duplicate address detection, which
/// carries no link-layer option), to the target's solicited-node address.
pub fn ndp_solicit(smac: &str, src: &str, target: &str) -> Vec<u8> {
    let (group, gmac) = solicited_node(target);
    let IpAddr::V6(t) = addr(target) else {
        panic!("NDP is IPv6")
    };
    let mut body = t.octets().to_vec();
    if src != "::" {
        body.extend_from_slice(&[1, 1]);
        body.extend_from_slice(&mac(smac));
    }
    icmp(
        L2 {
            src: mac(smac),
            dst: gmac,
        },
        src,
        &group,
        135,
        0,
        [0; 4],
    )
    .ttl(255)
    .payload(&body)
    .frame()
}

/// A reply to a frame the engine emitted: addresses, ports and MACs swapped; TCP gets flags `A`
/// and acknowledges the segment's sequence number + 1; an echo request gets its echo reply.
pub fn reply_to(seen: &Decoded) -> Result<Pkt, String> {
    let get_mac = |k: &str| -> Result<Mac, String> {
        seen.get(k)
            .and_then(|m| parse_mac(m).ok())
            .ok_or_else(|| format!("no {k} in {}", seen.describe()))
    };
    let get_ip = |k: &str| {
        seen.ip(k)
            .ok_or_else(|| format!("no {k} in {}", seen.describe()))
    };
    let get_n = |k: &str| {
        seen.num(k)
            .ok_or_else(|| format!("no {k} in {}", seen.describe()))
    };
    let l2 = L2 {
        src: get_mac("dmac")?,
        dst: get_mac("smac")?,
    };
    let (src, dst) = (get_ip("dst")?, get_ip("src")?);
    let l4 = if seen.has("tcp") {
        L4::Tcp {
            sport: get_n("dport")? as u16,
            dport: get_n("sport")? as u16,
            flags: "A".into(),
            seq: 5000,
            ack: (get_n("seq")? as u32).wrapping_add(1),
            win: 65160,
        }
    } else if seen.has("udp") {
        L4::Udp {
            sport: get_n("dport")? as u16,
            dport: get_n("sport")? as u16,
        }
    } else if seen.has("icmp4") || seen.has("icmp6") {
        let ty = get_n("type")?;
        let reply_ty = match ty {
            8 => 0,
            128 => 129,
            _ => return Err(format!("cannot reply to ICMP type {ty}")),
        };
        let [a, b] = (get_n("echo-id")? as u16).to_be_bytes();
        let [c, d] = (get_n("echo-seq")? as u16).to_be_bytes();
        L4::Icmp {
            ty: reply_ty,
            code: 0,
            rest: [a, b, c, d],
        }
    } else {
        return Err(format!("cannot reply to {}", seen.describe()));
    };
    let mut p = pkt(l2, src, dst, l4);
    if seen.has("icmp4") || seen.has("icmp6") {
        p = p.payload(b"ping ping ping ping ");
    }
    Ok(p)
}

/// The Internet checksum (re-exported for scenarios that corrupt frames on purpose).
pub fn inet_checksum(data: &[u8]) -> u16 {
    checksum(data, 0)
}
