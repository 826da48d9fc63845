//! Packet devices for the Qubes service qubes: the one place that touches the operating
//! system's packet interfaces, and the one crate of the project with `unsafe` code.
//!
//! Every service (sys-firewall, sys-net, sys-whonix) moves frames through the [`Device`]
//! trait and never sees what is behind it:
//!
//! | module | device |
//! |---|---|
//! | [`afpacket`] | an AF_PACKET socket on a kernel netdev (a vif, the uplink), with the virtio_net header |
//! | [`tap`] | a TAP device with `IFF_VNET_HDR` (QEMU's side of a NIC, or a test's) |
//! | [`pcap`] | a pcap/pcapng file read as input and written as output |
//! | [`memory`] | an in-memory pair of devices for tests |
//! | [`xen`] | the Xen transports (grant tables, event channels, XenStore) behind traits, with the Linux devices and an emulation |
//!
//! and beside them:
//!
//! | module | job |
//! |---|---|
//! | [`offload`] | receive metadata ([`Offload`]) and the virtio_net header it comes from; finishing checksums and segmenting GSO super-frames |
//! | [`link`] | netlink link events (appear, change, disappear; MTU and carrier) through netlink-packet-route |
//! | [`sys`] | the few other system calls the services need: `poll(2)`, interface indexes, kernel knobs |
//!
//! Devices move bursts of frames ([`RxBurst`], [`Device::send_burst`]) rather than one frame
//! a call, so batching system calls (recvmmsg, PACKET_MMAP rings, Xen rings) fits behind the
//! same trait.

pub mod afpacket;
pub mod link;
pub mod memory;
pub mod offload;
pub mod pcap;
pub mod sys;
pub mod tap;
pub mod xen;

use std::io;
use std::os::fd::RawFd;

pub use offload::{Csum, Gso, GsoKind, Offload};

/// The largest frame a device hands out (64 KiB GSO super-frames plus the Ethernet header).
pub const MAX_FRAME: usize = 65_550;

/// Received frames: one contiguous buffer, each frame with its offload metadata. Reused
/// across calls, so receiving does not allocate once warmed up, and does not clear memory
/// either: the buffer only ever grows (zeroed once, when it does), and `used` says how much
/// of it holds frames. Reserving room for a 64 KiB GSO super-frame per read would otherwise
/// cost a 64 KiB memset per frame received.
#[derive(Debug, Default)]
pub struct RxBurst {
    data: Vec<u8>,
    used: usize,
    frames: Vec<(usize, usize, Offload)>,
}

impl RxBurst {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn clear(&mut self) {
        self.used = 0;
        self.frames.clear();
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    fn room(&mut self, n: usize) -> &mut [u8] {
        let end = self.used + n;
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        &mut self.data[self.used..end]
    }

    /// Appends a received frame.
    pub fn push(&mut self, frame: &[u8], offload: Offload) {
        let start = self.used;
        self.room(frame.len()).copy_from_slice(frame);
        self.used += frame.len();
        self.frames.push((start, frame.len(), offload));
    }

    /// Space for one frame of at most `max` bytes at the end of the buffer, to be filled in
    /// place and then committed with [`RxBurst::commit`] (so a socket reads straight into it).
    /// Its bytes are whatever an earlier frame left there: the caller writes before it reads.
    pub fn reserve(&mut self, max: usize) -> &mut [u8] {
        self.room(max)
    }

    /// Keeps the first `len` bytes of the space [`RxBurst::reserve`] gave as a frame.
    pub fn commit(&mut self, len: usize, offload: Offload) {
        let start = self.used;
        let len = len.min(self.data.len() - start);
        self.used += len;
        self.frames.push((start, len, offload));
    }

    /// Gives back the space of a [`RxBurst::reserve`] that received nothing.
    pub fn unreserve(&mut self) {}

    /// Frame `i`, mutable (the engine rewrites forwarded frames in place).
    pub fn frame_mut(&mut self, i: usize) -> Option<(&mut [u8], Offload)> {
        let &(s, l, o) = self.frames.get(i)?;
        Some((&mut self.data[s..s + l], o))
    }

    pub fn frame(&self, i: usize) -> Option<(&[u8], Offload)> {
        let &(s, l, o) = self.frames.get(i)?;
        Some((&self.data[s..s + l], o))
    }
}

/// A frame to send, with the offloads still to do on it (as it was received, for a forwarded
/// frame; [`Offload::NONE`] for one the service built).
#[derive(Debug, Clone, Copy)]
pub struct TxFrame<'a> {
    pub frame: &'a [u8],
    pub offload: Offload,
}

/// A packet device: a vif, an uplink, a capture file, a test's peer.
pub trait Device: std::fmt::Debug {
    /// The interface name (`vif3.0`, `eth0`), as Qubes names it.
    fn name(&self) -> &str;

    /// Receives up to `max` waiting frames into `burst` (appending); returns how many. Never
    /// blocks: 0 means nothing is waiting now.
    fn recv_burst(&mut self, burst: &mut RxBurst, max: usize) -> io::Result<usize>;

    /// Sends frames; returns how many were taken. A full queue drops frames, as a NIC would;
    /// that is not an error.
    fn send_burst(&mut self, frames: &[TxFrame<'_>]) -> io::Result<usize>;

    /// Sends one finished frame.
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.send_burst(&[TxFrame {
            frame,
            offload: Offload::NONE,
        }])
        .map(|_| ())
    }

    /// Largest IP packet the link carries, if the device knows it.
    fn mtu(&self) -> Option<u16> {
        None
    }

    /// A descriptor that is readable when frames are waiting, for `poll(2)`; `None` for
    /// devices that are always ready or never are (files, memory).
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }

    /// A line for `status` about the device's own state, when it has more than a name (a
    /// Xen vif's handshake, connects and drops).
    fn describe(&self) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod rx_burst_tests {
    use super::*;

    #[test]
    fn frames_come_out_as_committed_and_the_buffer_stops_growing() {
        let mut b = RxBurst::new();
        let mut capacity = 0;
        for round in 0..3u8 {
            b.clear();
            // A read that got nothing, then two frames, read straight into the buffer.
            let _ = b.reserve(MAX_FRAME);
            b.unreserve();
            for (i, n) in [60usize, 1514].into_iter().enumerate() {
                let buf = b.reserve(MAX_FRAME);
                buf[..n].fill(round * 10 + i as u8);
                b.commit(n, Offload::default());
            }
            b.push(&[9; 42], Offload::default());
            assert_eq!(b.len(), 3);
            let (f0, _) = b.frame(0).expect("frame 0");
            assert_eq!((f0.len(), f0[0], f0[59]), (60, round * 10, round * 10));
            let (f1, _) = b.frame(1).expect("frame 1");
            assert_eq!((f1.len(), f1[0]), (1514, round * 10 + 1));
            assert_eq!(b.frame(2).expect("frame 2").0, &[9; 42]);
            if round == 0 {
                capacity = b.data.len();
            } else {
                // Warmed up: the same work neither grows nor clears the buffer again.
                assert_eq!(b.data.len(), capacity);
            }
        }
    }
}
