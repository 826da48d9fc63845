//! The few system calls the services need besides their devices: `poll(2)`, interface
//! indexes and MTUs from sysfs, and the kernel knobs that keep the kernel off an interface the
//! service owns.
//!
//! Each `unsafe` block is a single libc call on memory that the block owns, and the reason it
//! is sound is written beside it.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;

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

pub(crate) fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub(crate) fn setsockopt<T>(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
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

/// The MTU of interface `name`, read from sysfs.
/// The MAC of interface `name` (sysfs `address`), if it exists and has one.
pub fn if_mac(name: &str) -> Option<[u8; 6]> {
    if name.contains('/') || name.is_empty() {
        return None;
    }
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/address")).ok()?;
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split(':');
    for d in mac.iter_mut() {
        *d = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub fn if_mtu(name: &str) -> Option<u16> {
    if name.contains('/') || name.is_empty() {
        return None;
    }
    let mtu: u32 = std::fs::read_to_string(format!("/sys/class/net/{name}/mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(u16::try_from(mtu).unwrap_or(u16::MAX))
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
