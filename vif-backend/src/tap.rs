//! A TAP device (Documentation/networking/tuntap.rst) with `IFF_VNET_HDR`: the userspace end
//! of a virtual NIC, as QEMU uses it for a guest's virtio-net and as tests use it for a qube.
//!
//! Frames carry the same virtio_net header as on AF_PACKET, so offloaded frames a service
//! forwards keep their offloads. The device is opened in the caller's network namespace.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::offload::{VnetHdr, VNET_HDR_LEN};
use crate::{Device, RxBurst, TxFrame, MAX_FRAME};

/// `TUNSETIFF`: `_IOW('T', 202, int)` (linux/if_tun.h).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `TUNSETOFFLOAD`: `_IOW('T', 208, unsigned int)` (linux/if_tun.h), and the offloads it
/// takes: what the reader of the TAP accepts from the kernel.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (linux/if.h).
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates (or attaches to) TAP device `name` in the current network namespace.
    pub fn open(name: &str) -> io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a usable interface name (1-15 characters, no '/')"),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        for (d, s) in req.name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        // SAFETY: `req` is a live, properly laid out `struct ifreq` for the whole call; the
        // kernel reads the name and flags and writes back the name, within its size.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }
}

impl Tap {
    /// Lets the kernel hand this TAP frames with their checksum left partial and TCP
    /// super-frames (TSO over IPv4 and IPv6), each described by its virtio_net header, as
    /// a virtio NIC with those features gets them. Without it the kernel finishes every
    /// frame first.
    pub fn enable_offload(&self) -> io::Result<()> {
        let flags = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the descriptor is our TAP's.
        let r =
            unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Device for Tap {
    fn name(&self) -> &str {
        &self.name
    }

    fn recv_burst(&mut self, burst: &mut RxBurst, max: usize) -> io::Result<usize> {
        let mut n = 0;
        while n < max {
            let buf = burst.reserve(VNET_HDR_LEN + MAX_FRAME);
            match self.file.read(buf) {
                Ok(len) if len >= VNET_HDR_LEN => {
                    let hdr = VnetHdr::parse(buf);
                    match hdr.and_then(|h| h.offload()) {
                        Some(offload) => {
                            buf.copy_within(VNET_HDR_LEN..len, 0);
                            burst.commit(len - VNET_HDR_LEN, offload);
                            n += 1;
                        }
                        None => burst.unreserve(),
                    }
                }
                Ok(_) => burst.unreserve(),
                Err(e) => {
                    burst.unreserve();
                    match e.kind() {
                        io::ErrorKind::WouldBlock => break,
                        io::ErrorKind::Interrupted => continue,
                        _ if n > 0 => break,
                        _ => return Err(e),
                    }
                }
            }
        }
        Ok(n)
    }

    fn send_burst(&mut self, frames: &[TxFrame<'_>]) -> io::Result<usize> {
        let mut buf = Vec::with_capacity(VNET_HDR_LEN + MAX_FRAME);
        for (i, f) in frames.iter().enumerate() {
            buf.clear();
            buf.extend_from_slice(&VnetHdr::from_offload(&f.offload).to_bytes());
            buf.extend_from_slice(f.frame);
            match self.file.write(&buf) {
                Ok(_) => {}
                // The queue is full: dropped, as a NIC would.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if i == 0 => return Err(e),
                Err(_) => return Ok(i),
            }
        }
        Ok(frames.len())
    }

    fn mtu(&self) -> Option<u16> {
        crate::sys::if_mtu(&self.name)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }
}
