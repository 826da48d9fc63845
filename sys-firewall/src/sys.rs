//! The Linux system calls the service needs that std does not offer: AF_PACKET sockets, poll
//! and a netlink link-event socket.
//!
//! This is the only module with `unsafe` code. Each block is a single libc call on memory that
//! the block owns, and the reason it is sound is written beside it.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::offload::{VnetHdr, VNET_HDR_LEN};

/// `PACKET_VNET_HDR` (linux/if_packet.h).
const PACKET_VNET_HDR: libc::c_int = 15;

/// `ETH_P_ALL` in network byte order, as `socket(2)` and `sockaddr_ll` want it.
fn eth_p_all_be() -> u16 {
    (libc::ETH_P_ALL as u16).to_be()
}

/// The kernel's interface index of `name`, read from sysfs (no system call needed).
pub fn if_index(name: &str) -> Option<i32> {
    if name.contains('/') || name.is_empty() {
        return None;
    }
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a live reference to a `T` and the length passed is exactly its size;
    // the kernel only reads that many bytes.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    cvt(r).map(|_| ())
}

/// A raw Ethernet socket bound to one interface, in promiscuous mode, non-blocking.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
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
        // Our own transmissions must not come back to us as input (Linux >= 4.20; older
        // kernels are handled by the pkttype check in recv).
        let _ = setsockopt(fd.as_raw_fd(), libc::SOL_PACKET, 23, &one);
        // A larger receive buffer absorbs bursts while the engine is busy.
        let rcvbuf: libc::c_int = 4 << 20;
        let _ = setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, &rcvbuf);
        Ok(PacketSocket { fd, ifindex })
    }

    pub fn ifindex(&self) -> i32 {
        self.ifindex
    }

    /// One received frame, `None` when nothing is waiting. The frame is written to
    /// `buf[VNET_HDR_LEN..VNET_HDR_LEN + n]` after its virtio_net_hdr; frames we sent ourselves
    /// are skipped; a frame longer than `buf` is reported as an error rather than silently cut.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<(VnetHdr, usize)>> {
        loop {
            // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` is valid for `buf.len()` writable bytes, `sll`/`len` describe a
            // writable sockaddr_ll; the kernel writes at most those sizes.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                    (&mut sll as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
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
            return Ok(Some((hdr, n - VNET_HDR_LEN)));
        }
    }

    /// Sends one finished frame (no offloads asked of the kernel). A full socket buffer drops
    /// the frame, as a NIC queue would.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        self.send_raw(&[0u8; VNET_HDR_LEN], frame)
    }

    /// Sends a frame with offloads left to the kernel (a partial checksum, GSO).
    pub fn send_vnet(&self, hdr: &VnetHdr, frame: &[u8]) -> io::Result<()> {
        self.send_raw(&hdr.to_bytes(), frame)
    }

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

impl AsRawFd for PacketSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Waits until one of `fds` is readable or `timeout_ms` passes. Returns, per fd, whether it is
/// readable (or in error, which the next read reports).
pub fn poll_readable(fds: &[RawFd], timeout_ms: i32, ready: &mut Vec<bool>) -> io::Result<()> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structures for the whole call.
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    ready.clear();
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            ready.resize(fds.len(), false);
            return Ok(());
        }
        return Err(e);
    }
    ready.extend(pfds.iter().map(|p| p.revents != 0));
    Ok(())
}

/// A link appeared (or changed) or went away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    Up(String),
    Gone(String),
}

/// Netlink route socket subscribed to link events (RTMGRP_LINK, rtnetlink(7)).
#[derive(Debug)]
pub struct LinkMonitor {
    fd: OwnedFd,
}

impl LinkMonitor {
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2) call with constant arguments; the result is checked.
        let raw = cvt(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        })?;
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain old data; all-zero is a valid value.
        let mut snl: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        snl.nl_family = libc::AF_NETLINK as u16;
        snl.nl_groups = libc::RTMGRP_LINK as u32;
        // SAFETY: `snl` is a valid sockaddr_nl and the length is its size.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&snl as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })?;
        Ok(LinkMonitor { fd })
    }

    /// Link events waiting on the socket.
    pub fn events(&self) -> io::Result<Vec<LinkEvent>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 16384];
        loop {
            // SAFETY: `buf` is valid for `buf.len()` writable bytes.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(out),
                    io::ErrorKind::Interrupted => continue,
                    // ENOBUFS: events were lost; the caller rescans all links.
                    _ if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        out.push(LinkEvent::Up(String::new()));
                        continue;
                    }
                    _ => return Err(e),
                }
            }
            parse_link_messages(&buf[..n as usize], &mut out);
        }
    }
}

impl AsRawFd for LinkMonitor {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// RTM_NEWLINK / RTM_DELLINK messages to events (netlink(7), rtnetlink(7)): nlmsghdr (16
/// bytes), ifinfomsg (16 bytes), then rtattrs; IFLA_IFNAME (3) carries the name.
pub fn parse_link_messages(mut b: &[u8], out: &mut Vec<LinkEvent>) {
    const RTM_NEWLINK: u16 = 16;
    const RTM_DELLINK: u16 = 17;
    const IFLA_IFNAME: u16 = 3;
    while b.len() >= 16 {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let ty = u16::from_ne_bytes([b[4], b[5]]);
        if len < 16 || len > b.len() {
            return;
        }
        let msg = &b[16..len];
        if (ty == RTM_NEWLINK || ty == RTM_DELLINK) && msg.len() >= 16 {
            let mut attrs = &msg[16..];
            while attrs.len() >= 4 {
                let alen = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
                let aty = u16::from_ne_bytes([attrs[2], attrs[3]]);
                if alen < 4 || alen > attrs.len() {
                    break;
                }
                if aty == IFLA_IFNAME {
                    let v = &attrs[4..alen];
                    let name = String::from_utf8_lossy(v.split(|&c| c == 0).next().unwrap_or(v))
                        .into_owned();
                    out.push(if ty == RTM_NEWLINK {
                        LinkEvent::Up(name)
                    } else {
                        LinkEvent::Gone(name)
                    });
                    break;
                }
                let step = (alen + 3) & !3;
                attrs = attrs.get(step..).unwrap_or(&[]);
            }
        }
        let step = (len + 3) & !3;
        b = b.get(step..).unwrap_or(&[]);
    }
}

/// Keeps the kernel out of the way on an interface the engine owns: no forwarding, no ARP
/// answers, no IPv6 (no link-local address, no NDP, no router advertisements). Best effort per
/// knob; returns the knobs that could not be set.
pub fn quiet_kernel(ifname: &str) -> Vec<String> {
    let mut failed = Vec::new();
    for (path, value) in [
        (format!("/proc/sys/net/ipv4/conf/{ifname}/forwarding"), "0"),
        (format!("/proc/sys/net/ipv4/conf/{ifname}/arp_ignore"), "8"),
        (format!("/proc/sys/net/ipv4/conf/{ifname}/proxy_arp"), "0"),
        (
            format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"),
            "1",
        ),
        (format!("/proc/sys/net/ipv6/conf/{ifname}/forwarding"), "0"),
    ] {
        if std::fs::write(&path, value).is_err() {
            failed.push(path);
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_newlink_and_dellink() {
        let mut msg = Vec::new();
        for (ty, name) in [(16u16, "vif3.0"), (17u16, "vif4.0")] {
            let mut attr = Vec::new();
            let nlen = name.len() + 1 + 4;
            attr.extend_from_slice(&(nlen as u16).to_ne_bytes());
            attr.extend_from_slice(&3u16.to_ne_bytes());
            attr.extend_from_slice(name.as_bytes());
            attr.push(0);
            while attr.len() % 4 != 0 {
                attr.push(0);
            }
            let total = 16 + 16 + attr.len();
            msg.extend_from_slice(&(total as u32).to_ne_bytes());
            msg.extend_from_slice(&ty.to_ne_bytes());
            msg.extend_from_slice(&[0u8; 10]);
            msg.extend_from_slice(&[0u8; 16]);
            msg.extend_from_slice(&attr);
        }
        let mut out = Vec::new();
        parse_link_messages(&msg, &mut out);
        assert_eq!(
            out,
            vec![
                LinkEvent::Up("vif3.0".into()),
                LinkEvent::Gone("vif4.0".into())
            ]
        );
        // Truncated input never panics.
        for cut in 0..msg.len() {
            let mut o = Vec::new();
            parse_link_messages(&msg[..cut], &mut o);
        }
    }
}
