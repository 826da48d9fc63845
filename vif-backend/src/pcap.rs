//! pcapng captures: reading one into frames named by interface, writing one, and a
//! [`PcapDevice`] that plays a capture's frames of one interface and records what is sent.
//!
//! Format: the pcapng draft (draft-ietf-opsawg-pcapng), Enhanced Packet Blocks with each
//! interface's `if_name`, `if_tsresol` and `if_tsoffset`. Classic pcap is refused: it has no
//! interface names, and the name says where a frame arrived.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::time::Duration;

use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use pcap_file::pcapng::blocks::section_header::SectionHeaderBlock;
use pcap_file::pcapng::{Block, PcapNgParser, PcapNgWriter};
use pcap_file::{DataLink, Endianness};

use crate::{Device, Offload, RxBurst, TxFrame};

/// Snapshot length written in interface descriptions.
pub const SNAPLEN: u32 = 65_535;

/// A capture that cannot be read or written, saying where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcapError(String);

impl PcapError {
    fn new(msg: impl Into<String>) -> Self {
        PcapError(msg.into())
    }
}

impl fmt::Display for PcapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PcapError {}

/// One packet of an input capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputPacket {
    /// Nanoseconds since the Unix epoch.
    pub ts_ns: u64,
    /// The interface name it was captured on.
    pub if_name: String,
    pub data: Vec<u8>,
}

/// One packet to write with [`write_capture`].
#[derive(Debug, Clone, Copy)]
pub struct CapturePacket<'a> {
    /// Index into the interface list.
    pub iface: u32,
    pub ts_ns: u64,
    pub data: &'a [u8],
}

fn pcap_err(e: pcap_file::PcapError) -> String {
    match e {
        pcap_file::PcapError::IncompleteBuffer => "the file is cut short".to_string(),
        e => e.to_string(),
    }
}

/// Converts a raw pcapng timestamp to ns with the interface's `if_tsresol` and `if_tsoffset`.
fn timestamp_ns(raw: u128, tsresol: u8, offset_s: u64) -> Option<u64> {
    let ns: u128 = if tsresol & 0x80 == 0 {
        let exp = u32::from(tsresol);
        if exp <= 9 {
            raw.checked_mul(10u128.pow(9 - exp))?
        } else if exp - 9 <= 38 {
            raw / 10u128.pow(exp - 9)
        } else {
            0
        }
    } else {
        let n = u32::from(tsresol & 0x7f);
        raw.checked_mul(1_000_000_000)? >> n
    };
    let ns = ns.checked_add(u128::from(offset_s) * 1_000_000_000)?;
    u64::try_from(ns).ok()
}

/// Reads a pcapng capture: every Enhanced Packet Block with its interface name and time.
pub fn read_capture(bytes: &[u8]) -> Result<Vec<InputPacket>, PcapError> {
    if bytes.len() >= 4 {
        let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if matches!(
            magic,
            [0xd4, 0xc3, 0xb2, 0xa1]
                | [0xa1, 0xb2, 0xc3, 0xd4]
                | [0x4d, 0x3c, 0xb2, 0xa1]
                | [0xa1, 0xb2, 0x3c, 0x4d]
        ) {
            return Err(PcapError::new(
                "this is a classic pcap file; replay needs pcapng with interface names \
                 (e.g. editcap -F pcapng, then name the interfaces)",
            ));
        }
    }
    let (mut rest, mut parser) = PcapNgParser::new(bytes)
        .map_err(|e| PcapError::new(format!("not a pcapng capture: {}", pcap_err(e))))?;
    let mut packets = Vec::new();
    let mut block_no = 1usize;
    while !rest.is_empty() {
        let (r, block) = parser
            .next_block(rest)
            .map_err(|e| PcapError::new(format!("block {block_no}: {}", pcap_err(e))))?;
        rest = r;
        match block {
            Block::EnhancedPacket(epb) => {
                let idb = parser
                    .interfaces()
                    .get(epb.interface_id as usize)
                    .ok_or_else(|| {
                        PcapError::new(format!(
                        "block {block_no}: packet on interface {} but the section describes {} \
                         interface(s)",
                        epb.interface_id,
                        parser.interfaces().len()
                    ))
                    })?;
                let mut name = None;
                let mut tsresol = 6u8;
                let mut offset = 0u64;
                for opt in &idb.options {
                    match opt {
                        InterfaceDescriptionOption::IfName(n) => name = Some(n.to_string()),
                        InterfaceDescriptionOption::IfTsResol(r) => tsresol = *r,
                        InterfaceDescriptionOption::IfTsOffset(o) => offset = *o,
                        _ => {}
                    }
                }
                let name = name.ok_or_else(|| {
                    PcapError::new(format!(
                        "block {block_no}: interface {} has no name (if_name option); the name \
                         says where the packet arrived",
                        epb.interface_id
                    ))
                })?;
                if idb.linktype != DataLink::ETHERNET {
                    return Err(PcapError::new(format!(
                        "block {block_no}: interface {name} has link type {:?}; only Ethernet \
                         is supported",
                        idb.linktype
                    )));
                }
                let ts_ns =
                    timestamp_ns(epb.timestamp.as_nanos(), tsresol, offset).ok_or_else(|| {
                        PcapError::new(format!("block {block_no}: timestamp out of range"))
                    })?;
                packets.push(InputPacket {
                    ts_ns,
                    if_name: name,
                    data: epb.data.into_owned(),
                });
            }
            Block::SimplePacket(_) | Block::Packet(_) => {
                return Err(PcapError::new(format!(
                    "block {block_no}: simple and obsolete packet blocks are not supported \
                     (they lack the interface or the time); use enhanced packet blocks"
                )));
            }
            _ => {}
        }
        block_no += 1;
    }
    Ok(packets)
}

/// Writes a pcapng capture: one little-endian section, one Ethernet interface per name (with
/// `if_name` and `if_tsresol` 9), and the packets. Byte-for-byte deterministic.
pub fn write_capture(
    ifaces: &[String],
    packets: &[CapturePacket<'_>],
) -> Result<Vec<u8>, PcapError> {
    let err = |e: pcap_file::PcapError| PcapError::new(pcap_err(e));
    let section = SectionHeaderBlock {
        endianness: Endianness::Little,
        ..Default::default()
    };
    let mut w = PcapNgWriter::with_section_header(Vec::new(), section).map_err(err)?;
    for name in ifaces {
        let idb = InterfaceDescriptionBlock {
            linktype: DataLink::ETHERNET,
            snaplen: SNAPLEN,
            options: vec![
                InterfaceDescriptionOption::IfName(Cow::Borrowed(name.as_str())),
                InterfaceDescriptionOption::IfTsResol(9),
            ],
        };
        w.write_block(&Block::InterfaceDescription(idb))
            .map_err(err)?;
    }
    for p in packets {
        let len =
            u32::try_from(p.data.len()).map_err(|_| PcapError::new("a frame longer than 4 GiB"))?;
        let epb = EnhancedPacketBlock {
            interface_id: p.iface,
            timestamp: Duration::from_nanos(p.ts_ns),
            original_len: len,
            data: Cow::Borrowed(p.data),
            options: vec![],
        };
        w.write_block(&Block::EnhancedPacket(epb)).map_err(err)?;
    }
    Ok(w.into_inner())
}

/// A device over a capture: it receives the frames captured on its interface, in order,
/// and records the frames sent to it with the time [`PcapDevice::set_time`] last gave.
#[derive(Debug)]
pub struct PcapDevice {
    name: String,
    input: VecDeque<Vec<u8>>,
    sent: Vec<(u64, Vec<u8>)>,
    now_ns: u64,
}

impl PcapDevice {
    /// The device for interface `name`, playing the packets of `capture` captured on it.
    pub fn new(name: &str, capture: &[InputPacket]) -> Self {
        PcapDevice {
            name: name.to_string(),
            input: capture
                .iter()
                .filter(|p| p.if_name == name)
                .map(|p| p.data.clone())
                .collect(),
            sent: Vec::new(),
            now_ns: 0,
        }
    }

    /// The timestamp recorded with frames sent from now on.
    pub fn set_time(&mut self, ts_ns: u64) {
        self.now_ns = ts_ns;
    }

    /// What was sent: `(timestamp, frame)` in order.
    pub fn sent(&self) -> &[(u64, Vec<u8>)] {
        &self.sent
    }
}

impl Device for PcapDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn recv_burst(&mut self, burst: &mut RxBurst, max: usize) -> io::Result<usize> {
        let mut n = 0;
        while n < max {
            let Some(f) = self.input.pop_front() else {
                break;
            };
            burst.push(&f, Offload::NONE);
            n += 1;
        }
        Ok(n)
    }

    fn send_burst(&mut self, frames: &[TxFrame<'_>]) -> io::Result<usize> {
        for f in frames {
            self.sent.push((self.now_ns, f.frame.to_vec()));
        }
        Ok(frames.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_capture_reads_back_and_plays_per_interface() {
        let names = vec!["eth0".to_string(), "vif3.0".to_string()];
        let frames: [&[u8]; 3] = [b"uplink frame", b"client frame", b"second client frame"];
        let packets = [
            CapturePacket {
                iface: 0,
                ts_ns: 1_000,
                data: frames[0],
            },
            CapturePacket {
                iface: 1,
                ts_ns: 2_500_000_001,
                data: frames[1],
            },
            CapturePacket {
                iface: 1,
                ts_ns: 3_000_000_000,
                data: frames[2],
            },
        ];
        let bytes = write_capture(&names, &packets).expect("write");
        assert_eq!(
            write_capture(&names, &packets).expect("write"),
            bytes,
            "deterministic"
        );
        let read = read_capture(&bytes).expect("read");
        assert_eq!(read.len(), 3);
        assert_eq!(
            (read[1].ts_ns, read[1].if_name.as_str()),
            (2_500_000_001, "vif3.0")
        );
        let mut dev = PcapDevice::new("vif3.0", &read);
        let mut burst = RxBurst::new();
        assert_eq!(dev.recv_burst(&mut burst, 8).expect("recv"), 2);
        assert_eq!(burst.frame(1).map(|f| f.0), Some(frames[2]));
        dev.set_time(7);
        dev.send(b"out").expect("send");
        assert_eq!(dev.sent(), &[(7, b"out".to_vec())]);
    }

    #[test]
    fn timestamps_follow_tsresol() {
        assert_eq!(timestamp_ns(5, 6, 0), Some(5_000));
        assert_eq!(timestamp_ns(5, 9, 0), Some(5));
        assert_eq!(timestamp_ns(5_000, 12, 0), Some(5));
        assert_eq!(timestamp_ns(1 << 20, 0x80 | 20, 1), Some(2_000_000_000));
        assert_eq!(timestamp_ns(u128::from(u64::MAX), 0, 0), None);
    }

    #[test]
    fn classic_pcap_and_garbage_are_refused_with_a_reason() {
        let classic = [0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        let e = read_capture(&classic).expect_err("classic pcap");
        assert!(e.to_string().contains("classic pcap"), "{e}");
        assert!(read_capture(b"not a capture at all").is_err());
        let names = vec!["eth0".to_string()];
        let bytes = write_capture(
            &names,
            &[CapturePacket {
                iface: 0,
                ts_ns: 5,
                data: b"x",
            }],
        )
        .expect("write");
        for cut in 1..bytes.len() {
            let _ = read_capture(&bytes[..cut]);
        }
    }
}
