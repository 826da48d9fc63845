//! An AF_PACKET socket on a kernel netdev (packet(7)): how a service owns a vif or an uplink
//! that the kernel drives, with the virtio_net header so offloaded frames pass whole.
//!
//! Each `unsafe` block is a single libc call on memory that the block owns, and the reason it
//! is sound is written beside it.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::offload::{VnetHdr, VNET_HDR_LEN};
use crate::sys::{cvt, if_index, setsockopt};
use crate::{Device, RxBurst, TxFrame, MAX_FRAME};

/// `PACKET_VNET_HDR` (linux/if_packet.h).
const PACKET_VNET_HDR: libc::c_int = 15;
/// `PACKET_AUXDATA` (linux/if_packet.h): a `struct tpacket_auxdata` control message per frame.
const PACKET_AUXDATA: libc::c_int = 8;
/// `TP_STATUS_VLAN_VALID`, `TP_STATUS_VLAN_TPID_VALID` (linux/if_packet.h).
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
const TP_STATUS_VLAN_TPID_VALID: u32 = 1 << 6;
/// `ETH_P_8021Q`.
const ETH_P_8021Q: u16 = 0x8100;
/// Bytes of control-message buffer: one `tpacket_auxdata` (20 bytes) with its cmsghdr.
const CMSG_SPACE: usize = 64;

/// `ETH_P_ALL` in network byte order, as `socket(2)` and `sockaddr_ll` want it.
fn eth_p_all_be() -> u16 {
    (libc::ETH_P_ALL as u16).to_be()
}

/// A raw Ethernet socket bound to one interface, in promiscuous mode, non-blocking.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
    name: String,
}

impl PacketSocket {
    pub fn open(ifname: &str) -> io::Result<Self> {
        let ifindex = if_index(ifname).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no interface {ifname}"))
        })?;
        // SAFETY: plain socket(2) call with constant arguments; the result is checked.
        let raw = cvt(unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::c_int::from(eth_p_all_be()),
            )
        })?;
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = eth_p_all_be();
        sll.sll_ifindex = ifindex;
        // SAFETY: `sll` is a valid sockaddr_ll and the length is its size.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })?;
        // Frames for fe:ff:ff:ff:ff:ff and any other address must reach us.
        // SAFETY: packet_mreq is plain old data; all-zero is a valid value.
        let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
        mreq.mr_ifindex = ifindex;
        mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
        setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_ADD_MEMBERSHIP,
            &mreq,
        )?;
        // Frames come with a virtio_net_hdr saying which offloads the sender left undone
        // (partial checksums, GSO super-frames); see offload.rs.
        let one: libc::c_int = 1;
        setsockopt(fd.as_raw_fd(), libc::SOL_PACKET, PACKET_VNET_HDR, &one)?;
        // The kernel strips a VLAN tag on receive (`skb_vlan_untag`) and reports it only in
        // auxdata; without it a tagged frame would look untagged and be forwarded with its tag
        // silently removed.
        setsockopt(fd.as_raw_fd(), libc::SOL_PACKET, PACKET_AUXDATA, &one)?;
        // Our own transmissions must not come back to us as input (Linux >= 4.20; older
        // kernels are handled by the pkttype check in recv).
        let _ = setsockopt(fd.as_raw_fd(), libc::SOL_PACKET, 23, &one);
        // A larger receive buffer absorbs bursts while the engine is busy.
        let rcvbuf: libc::c_int = 4 << 20;
        let _ = setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, &rcvbuf);
        Ok(PacketSocket {
            fd,
            ifindex,
            name: ifname.to_string(),
        })
    }

    pub fn ifindex(&self) -> i32 {
        self.ifindex
    }

    /// One received frame, `None` when nothing is waiting. The frame is written to
    /// `buf[VNET_HDR_LEN..VNET_HDR_LEN + n]` after its virtio_net_hdr; frames we sent ourselves
    /// are skipped; a frame longer than `buf` is reported as an error rather than silently cut.
    /// A VLAN tag the kernel took off is put back in front of the ethertype (IEEE 802.1Q), as
    /// the frame was on the wire, so that the engine sees it and drops it.
    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<(VnetHdr, usize)>> {
        loop {
            // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // u64 elements: cmsghdr needs its natural alignment.
            let mut cbuf = [0u64; CMSG_SPACE / 8];
            // SAFETY: msghdr is plain old data; all-zero is a valid value.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_name = (&mut sll as *mut libc::sockaddr_ll).cast();
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = CMSG_SPACE;
            // SAFETY: `msg` describes `sll`, one iovec over `buf` and `cbuf`, all alive and
            // writable for the call; the kernel writes at most the sizes given.
            let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_TRUNC) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(None),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            if sll.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let n = n as usize;
            if n > buf.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("frame of {n} bytes exceeds the {} byte buffer", buf.len()),
                ));
            }
            let Some(hdr) = VnetHdr::parse(&buf[..n]) else {
                continue;
            };
            let mut n = n;
            if let Some((tpid, tci)) = vlan_of(&msg) {
                let at = VNET_HDR_LEN + 12;
                if n < at || n + 4 > buf.len() {
                    continue;
                }
                buf.copy_within(at..n, at + 4);
                buf[at..at + 2].copy_from_slice(&tpid.to_be_bytes());
                buf[at + 2..at + 4].copy_from_slice(&tci.to_be_bytes());
                n += 4;
            }
            return Ok(Some((hdr, n - VNET_HDR_LEN)));
        }
    }

    /// Sends one frame behind its virtio_net header. A full socket buffer drops the frame, as
    /// a NIC queue would.
    fn send_raw(&self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> io::Result<()> {
        let mut iov = [
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut libc::c_void,
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            },
        ];
        // SAFETY: msghdr is plain old data; all-zero is a valid value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len();
        // SAFETY: `msg` points at two iovecs describing `hdr` and `frame`, both alive and
        // readable for the call; the kernel does not write through them.
        let n = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }
}

/// The VLAN tag the kernel reported in a `PACKET_AUXDATA` control message, if any.
fn vlan_of(msg: &libc::msghdr) -> Option<(u16, u16)> {
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/CMSG_NXTHDR only walk within
    // `msg_control..msg_control + msg_controllen`, and each header's data is read with an
    // unaligned read of at most `cmsg_len` bytes.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            let h = &*c;
            if h.cmsg_level == libc::SOL_PACKET && h.cmsg_type == PACKET_AUXDATA {
                let data = libc::CMSG_DATA(c);
                let avail =
                    (h.cmsg_len as usize).saturating_sub(data.offset_from(c.cast()) as usize);
                if avail < 20 {
                    return None;
                }
                let mut aux = [0u8; 20];
                std::ptr::copy_nonoverlapping(data, aux.as_mut_ptr(), 20);
                // struct tpacket_auxdata: tp_status, tp_len, tp_snaplen (u32), tp_mac, tp_net,
                // tp_vlan_tci, tp_vlan_tpid (u16), host byte order.
                let status = u32::from_ne_bytes([aux[0], aux[1], aux[2], aux[3]]);
                if status & TP_STATUS_VLAN_VALID == 0 {
                    return None;
                }
                let tci = u16::from_ne_bytes([aux[16], aux[17]]);
                let tpid = if status & TP_STATUS_VLAN_TPID_VALID != 0 {
                    u16::from_ne_bytes([aux[18], aux[19]])
                } else {
                    ETH_P_8021Q
                };
                return Some((tpid, tci));
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    None
}

impl AsRawFd for PacketSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Device for PacketSocket {
    fn name(&self) -> &str {
        &self.name
    }

    fn recv_burst(&mut self, burst: &mut RxBurst, max: usize) -> io::Result<usize> {
        let mut n = 0;
        while n < max {
            let buf = burst.reserve(VNET_HDR_LEN + MAX_FRAME);
            match self.recv(buf) {
                Ok(Some((hdr, len))) => {
                    let Some(offload) = hdr.offload() else {
                        // A GSO type virtio does not define: nothing we could forward.
                        burst.unreserve();
                        continue;
                    };
                    // The frame follows the header; move it to where the burst expects it.
                    buf.copy_within(VNET_HDR_LEN..VNET_HDR_LEN + len, 0);
                    burst.commit(len, offload);
                    n += 1;
                }
                Ok(None) => {
                    burst.unreserve();
                    break;
                }
                Err(e) => {
                    burst.unreserve();
                    if n > 0 {
                        break;
                    }
                    return Err(e);
                }
            }
        }
        Ok(n)
    }

    fn send_burst(&mut self, frames: &[TxFrame<'_>]) -> io::Result<usize> {
        for (i, f) in frames.iter().enumerate() {
            let hdr = VnetHdr::from_offload(&f.offload).to_bytes();
            if let Err(e) = self.send_raw(&hdr, f.frame) {
                if i == 0 {
                    return Err(e);
                }
                return Ok(i);
            }
        }
        Ok(frames.len())
    }

    fn mtu(&self) -> Option<u16> {
        crate::sys::if_mtu(&self.name)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }
}
