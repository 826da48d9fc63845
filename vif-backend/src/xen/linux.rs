//! The transport traits over the Linux Xen devices, for a service qube running as a Xen
//! guest: [`Gntalloc`] (`/dev/xen/gntalloc`, [`GrantExport`]), [`Gntdev`]
//! (`/dev/xen/gntdev`, [`GrantImport`]) and [`Evtchn`] (`/dev/xen/evtchn`,
//! [`EventChannels`]). These are what libxengnttab, libxengntshr and libxenevtchn use
//! (xen-project/xen `tools/libs/gnttab/linux.c`, `tools/libs/evtchn/linux.c`).
//!
//! The ioctl numbers and argument layouts are those of the Linux uapi headers
//! `include/uapi/xen/gntalloc.h`, `include/uapi/xen/gntdev.h` and `include/uapi/xen/evtchn.h`.
//! Every ioctl there is `_IOC(_IOC_NONE, type, nr, sizeof(struct))`, which is
//! `size << 16 | type << 8 | nr` in the generic encoding (`include/uapi/asm-generic/ioctl.h`,
//! `_IOC_NONE` 0) used by x86 and arm64, the architectures Xen guests run on here; the
//! tests check every number against that formula worked by hand, and every struct's size
//! and field offsets against the header.
//!
//! Opening a device on a machine that is not a Xen guest fails with an error naming the
//! device and saying that Xen is needed.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use super::mem::MmapPages;
use super::{DomId, EventChannels, GrantExport, GrantImport, GrantRef, Port};

pub const GNTALLOC_PATH: &str = "/dev/xen/gntalloc";
pub const GNTDEV_PATH: &str = "/dev/xen/gntdev";
pub const EVTCHN_PATH: &str = "/dev/xen/evtchn";

/// `_IOC(_IOC_NONE, ty, nr, size)` (`include/uapi/asm-generic/ioctl.h`: direction bits 30
/// and up, 0 for none; size bits 16 to 29; type bits 8 to 15; number bits 0 to 7).
const fn ioc_none(ty: u8, nr: u8, size: usize) -> libc::c_ulong {
    ((size as libc::c_ulong) << 16) | ((ty as libc::c_ulong) << 8) | nr as libc::c_ulong
}

/// `struct ioctl_gntalloc_alloc_gref` (`xen/gntalloc.h`): `count` pages granted to
/// `domid`; the kernel fills `index` (the mmap offset) and `count` grant references from
/// `gref_ids` on, the array growing past the struct.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IoctlGntallocAllocGref {
    pub domid: u16,
    pub flags: u16,
    pub count: u32,
    pub index: u64,
    pub gref_ids: [u32; 1],
}

/// `GNTALLOC_FLAG_WRITABLE` (`xen/gntalloc.h`).
pub const GNTALLOC_FLAG_WRITABLE: u16 = 1;

/// `struct ioctl_gntalloc_dealloc_gref` (`xen/gntalloc.h`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IoctlGntallocDeallocGref {
    pub index: u64,
    pub count: u32,
}

/// `struct ioctl_gntdev_grant_ref` (`xen/gntdev.h`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IoctlGntdevGrantRef {
    pub domid: u32,
    pub gref: u32,
}

/// `struct ioctl_gntdev_map_grant_ref` (`xen/gntdev.h`): `count` references, the array
/// growing past the struct; the kernel fills `index` (the mmap offset).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IoctlGntdevMapGrantRef {
    pub count: u32,
    pub pad: u32,
    pub index: u64,
    pub refs: [IoctlGntdevGrantRef; 1],
}

/// `struct ioctl_gntdev_unmap_grant_ref` (`xen/gntdev.h`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IoctlGntdevUnmapGrantRef {
    pub index: u64,
    pub count: u32,
    pub pad: u32,
}

/// `struct ioctl_evtchn_bind_interdomain` (`xen/evtchn.h`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IoctlEvtchnBindInterdomain {
    pub remote_domain: libc::c_uint,
    pub remote_port: libc::c_uint,
}

/// `struct ioctl_evtchn_bind_unbound_port` (`xen/evtchn.h`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IoctlEvtchnBindUnboundPort {
    pub remote_domain: libc::c_uint,
}

/// `struct ioctl_evtchn_unbind` and `struct ioctl_evtchn_notify` (`xen/evtchn.h`), both
/// one port.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct IoctlEvtchnPort {
    pub port: libc::c_uint,
}

use std::mem::size_of;

/// `IOCTL_GNTALLOC_ALLOC_GREF`: `_IOC(_IOC_NONE, 'G', 5, sizeof(struct ioctl_gntalloc_alloc_gref))`.
pub const IOCTL_GNTALLOC_ALLOC_GREF: libc::c_ulong =
    ioc_none(b'G', 5, size_of::<IoctlGntallocAllocGref>());
/// `IOCTL_GNTALLOC_DEALLOC_GREF`: `_IOC(_IOC_NONE, 'G', 6, sizeof(struct ioctl_gntalloc_dealloc_gref))`.
pub const IOCTL_GNTALLOC_DEALLOC_GREF: libc::c_ulong =
    ioc_none(b'G', 6, size_of::<IoctlGntallocDeallocGref>());
/// `IOCTL_GNTDEV_MAP_GRANT_REF`: `_IOC(_IOC_NONE, 'G', 0, sizeof(struct ioctl_gntdev_map_grant_ref))`.
pub const IOCTL_GNTDEV_MAP_GRANT_REF: libc::c_ulong =
    ioc_none(b'G', 0, size_of::<IoctlGntdevMapGrantRef>());
/// `IOCTL_GNTDEV_UNMAP_GRANT_REF`: `_IOC(_IOC_NONE, 'G', 1, sizeof(struct ioctl_gntdev_unmap_grant_ref))`.
pub const IOCTL_GNTDEV_UNMAP_GRANT_REF: libc::c_ulong =
    ioc_none(b'G', 1, size_of::<IoctlGntdevUnmapGrantRef>());
/// `IOCTL_EVTCHN_BIND_INTERDOMAIN`: `_IOC(_IOC_NONE, 'E', 1, sizeof(struct ioctl_evtchn_bind_interdomain))`.
pub const IOCTL_EVTCHN_BIND_INTERDOMAIN: libc::c_ulong =
    ioc_none(b'E', 1, size_of::<IoctlEvtchnBindInterdomain>());
/// `IOCTL_EVTCHN_BIND_UNBOUND_PORT`: `_IOC(_IOC_NONE, 'E', 2, sizeof(struct ioctl_evtchn_bind_unbound_port))`.
pub const IOCTL_EVTCHN_BIND_UNBOUND_PORT: libc::c_ulong =
    ioc_none(b'E', 2, size_of::<IoctlEvtchnBindUnboundPort>());
/// `IOCTL_EVTCHN_UNBIND`: `_IOC(_IOC_NONE, 'E', 3, sizeof(struct ioctl_evtchn_unbind))`.
pub const IOCTL_EVTCHN_UNBIND: libc::c_ulong = ioc_none(b'E', 3, size_of::<IoctlEvtchnPort>());
/// `IOCTL_EVTCHN_NOTIFY`: `_IOC(_IOC_NONE, 'E', 4, sizeof(struct ioctl_evtchn_notify))`.
pub const IOCTL_EVTCHN_NOTIFY: libc::c_ulong = ioc_none(b'E', 4, size_of::<IoctlEvtchnPort>());

/// The most pages one call grants or maps (bounds the argument buffers).
pub const MAX_PAGES: usize = 1024;

/// Opens a Xen device, or says clearly why not: on a machine that is not a Xen guest
/// (or without the driver loaded) the node is missing or refuses to open.
fn open_device(path: &Path, nonblocking: bool) -> io::Result<File> {
    let flags = libc::O_CLOEXEC | if nonblocking { libc::O_NONBLOCK } else { 0 };
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot open {}: {e}; this needs Xen (a kernel running as a Xen domain, with the Xen grant and event channel drivers, which create /dev/xen)",
                    path.display()
                ),
            )
        })
}

fn count_ok(count: usize) -> io::Result<u32> {
    if count == 0 || count > MAX_PAGES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{count} pages: 1 to {MAX_PAGES} per call"),
        ));
    }
    Ok(count as u32)
}

/// One ioctl whose argument is `arg`; the kernel reads and may write `size_of::<T>()`
/// bytes of it, or more for the variable-length requests, whose buffers are sized for it.
///
/// # Safety
/// `arg` must point at memory of at least the size the ioctl `req` reads and writes.
unsafe fn ioctl<T>(fd: RawFd, req: libc::c_ulong, arg: *mut T) -> io::Result<libc::c_int> {
    // SAFETY: the caller guarantees `arg` is large enough for `req`.
    crate::sys::cvt(unsafe { libc::ioctl(fd, req as _, arg) })
}

/// Words for a variable-length argument: a header struct of `header` bytes followed by
/// `extra` bytes, 8-byte aligned, zeroed.
fn arg_buffer(header: usize, extra: usize) -> Vec<u64> {
    vec![0u64; (header + extra).div_ceil(8)]
}

fn put_u32(buf: &mut [u64], byte: usize, v: u32) {
    let w = &mut buf[byte / 8];
    let mut b = w.to_ne_bytes();
    b[byte % 8..byte % 8 + 4].copy_from_slice(&v.to_ne_bytes());
    *w = u64::from_ne_bytes(b);
}

fn get_u32(buf: &[u64], byte: usize) -> u32 {
    let b = buf[byte / 8].to_ne_bytes();
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[byte % 8..byte % 8 + 4]);
    u32::from_ne_bytes(v)
}

/// `/dev/xen/gntalloc`: pages of ours granted to another domain.
#[derive(Debug, Clone)]
pub struct Gntalloc {
    file: Arc<File>,
}

impl Gntalloc {
    pub fn open() -> io::Result<Self> {
        Self::open_at(Path::new(GNTALLOC_PATH))
    }

    pub fn open_at(path: &Path) -> io::Result<Self> {
        Ok(Gntalloc {
            file: Arc::new(open_device(path, false)?),
        })
    }
}

fn dealloc(file: &File, index: u64, count: u32) -> io::Result<()> {
    let mut arg = IoctlGntallocDeallocGref { index, count };
    // SAFETY: `arg` is the whole ioctl_gntalloc_dealloc_gref the request reads.
    unsafe { ioctl(file.as_raw_fd(), IOCTL_GNTALLOC_DEALLOC_GREF, &mut arg) }.map(|_| ())
}

impl GrantExport for Gntalloc {
    type Pages = MmapPages;

    /// `IOCTL_GNTALLOC_ALLOC_GREF`, then `mmap` at the returned index; on drop `munmap`
    /// then `IOCTL_GNTALLOC_DEALLOC_GREF` (the kernel ends the foreign access, and frees the
    /// pages once the peer has unmapped them).
    fn grant(
        &mut self,
        peer: DomId,
        count: usize,
        writable: bool,
    ) -> io::Result<(Vec<GrantRef>, MmapPages)> {
        let n = count_ok(count)?;
        let header = std::mem::offset_of!(IoctlGntallocAllocGref, gref_ids);
        let mut buf = arg_buffer(header, 4 * count.max(1));
        let mut head = IoctlGntallocAllocGref {
            domid: peer,
            flags: if writable { GNTALLOC_FLAG_WRITABLE } else { 0 },
            count: n,
            ..Default::default()
        };
        put_u32(
            &mut buf,
            0,
            u32::from(head.domid) | (u32::from(head.flags) << 16),
        );
        put_u32(&mut buf, 4, head.count);
        // SAFETY: `buf` holds the header and `count` gref slots, all the kernel writes
        // (it copies the fixed part in and `count` u32s out at `gref_ids`).
        unsafe {
            ioctl(
                self.file.as_raw_fd(),
                IOCTL_GNTALLOC_ALLOC_GREF,
                buf.as_mut_ptr(),
            )
        }?;
        head.index = buf[std::mem::offset_of!(IoctlGntallocAllocGref, index) / 8];
        let refs: Vec<GrantRef> = (0..count)
            .map(|i| GrantRef(get_u32(&buf, header + 4 * i)))
            .collect();
        // Our own pages: always mapped writable.
        let pages = match MmapPages::map_fd(self.file.as_fd(), head.index, count, true) {
            Ok(p) => p,
            Err(e) => {
                let _ = dealloc(&self.file, head.index, n);
                return Err(e);
            }
        };
        let file = Arc::clone(&self.file);
        let index = head.index;
        Ok((
            refs,
            pages.on_release(move || {
                let _ = dealloc(&file, index, n);
            }),
        ))
    }
}

/// `/dev/xen/gntdev`: another domain's grants mapped into ours.
#[derive(Debug, Clone)]
pub struct Gntdev {
    file: Arc<File>,
}

impl Gntdev {
    pub fn open() -> io::Result<Self> {
        Self::open_at(Path::new(GNTDEV_PATH))
    }

    pub fn open_at(path: &Path) -> io::Result<Self> {
        Ok(Gntdev {
            file: Arc::new(open_device(path, false)?),
        })
    }
}

fn unmap(file: &File, index: u64, count: u32) -> io::Result<()> {
    let mut arg = IoctlGntdevUnmapGrantRef {
        index,
        count,
        pad: 0,
    };
    // SAFETY: `arg` is the whole ioctl_gntdev_unmap_grant_ref the request reads.
    unsafe { ioctl(file.as_raw_fd(), IOCTL_GNTDEV_UNMAP_GRANT_REF, &mut arg) }.map(|_| ())
}

impl GrantImport for Gntdev {
    type Mapping = MmapPages;

    /// `IOCTL_GNTDEV_MAP_GRANT_REF`, then `mmap` at the returned index (read-only unless
    /// `writable`: the kernel maps the grants `GNTMAP_readonly` for a read-only mapping,
    /// and Xen refuses a writable map of a read-only grant); on drop `munmap` then
    /// `IOCTL_GNTDEV_UNMAP_GRANT_REF`, in the order the header asks for.
    fn map(&mut self, peer: DomId, refs: &[GrantRef], writable: bool) -> io::Result<MmapPages> {
        let n = count_ok(refs.len())?;
        let header = std::mem::offset_of!(IoctlGntdevMapGrantRef, refs);
        let entry = size_of::<IoctlGntdevGrantRef>();
        let mut buf = arg_buffer(header, entry * refs.len());
        put_u32(
            &mut buf,
            std::mem::offset_of!(IoctlGntdevMapGrantRef, count),
            n,
        );
        for (i, r) in refs.iter().enumerate() {
            let at = header + entry * i;
            put_u32(
                &mut buf,
                at + std::mem::offset_of!(IoctlGntdevGrantRef, domid),
                u32::from(peer),
            );
            put_u32(
                &mut buf,
                at + std::mem::offset_of!(IoctlGntdevGrantRef, gref),
                r.0,
            );
        }
        // SAFETY: `buf` holds the header and `count` grant_ref entries, all the kernel
        // reads; it writes only `index`, inside the header.
        unsafe {
            ioctl(
                self.file.as_raw_fd(),
                IOCTL_GNTDEV_MAP_GRANT_REF,
                buf.as_mut_ptr(),
            )
        }?;
        let index = buf[std::mem::offset_of!(IoctlGntdevMapGrantRef, index) / 8];
        match MmapPages::map_fd(self.file.as_fd(), index, refs.len(), writable) {
            Ok(pages) => {
                let file = Arc::clone(&self.file);
                Ok(pages.on_release(move || {
                    let _ = unmap(&file, index, n);
                }))
            }
            Err(e) => {
                let _ = unmap(&self.file, index, n);
                Err(io::Error::new(
                    e.kind(),
                    format!("mapping {} grants of domain {peer}: {e}", refs.len()),
                ))
            }
        }
    }
}

/// `/dev/xen/evtchn`: this domain's event channels, one descriptor for all of them.
///
/// `read` yields fired ports as `u32`s, each masked by the kernel until it is written back
/// (`evtchn_read` and `evtchn_write` in `drivers/xen/evtchn.c`), which is the masking
/// [`EventChannels::pending`] documents.
#[derive(Debug)]
pub struct Evtchn {
    file: File,
}

impl Evtchn {
    pub fn open() -> io::Result<Self> {
        Self::open_at(Path::new(EVTCHN_PATH))
    }

    pub fn open_at(path: &Path) -> io::Result<Self> {
        Ok(Evtchn {
            file: open_device(path, true)?,
        })
    }

    fn port_ioctl(&self, req: libc::c_ulong, port: Port) -> io::Result<()> {
        let mut arg = IoctlEvtchnPort { port: port.0 };
        // SAFETY: `arg` is the whole one-port struct the request reads.
        unsafe { ioctl(self.file.as_raw_fd(), req, &mut arg) }.map(|_| ())
    }
}

fn port_of(r: libc::c_int) -> Port {
    // A successful bind returns the new port, which is not negative (cvt checked).
    Port(r as u32)
}

impl EventChannels for Evtchn {
    fn alloc_unbound(&mut self, remote: DomId) -> io::Result<Port> {
        let mut arg = IoctlEvtchnBindUnboundPort {
            remote_domain: libc::c_uint::from(remote),
        };
        // SAFETY: `arg` is the whole ioctl_evtchn_bind_unbound_port the request reads.
        unsafe {
            ioctl(
                self.file.as_raw_fd(),
                IOCTL_EVTCHN_BIND_UNBOUND_PORT,
                &mut arg,
            )
        }
        .map(port_of)
    }

    fn bind_interdomain(&mut self, remote: DomId, remote_port: Port) -> io::Result<Port> {
        let mut arg = IoctlEvtchnBindInterdomain {
            remote_domain: libc::c_uint::from(remote),
            remote_port: remote_port.0,
        };
        // SAFETY: `arg` is the whole ioctl_evtchn_bind_interdomain the request reads.
        unsafe {
            ioctl(
                self.file.as_raw_fd(),
                IOCTL_EVTCHN_BIND_INTERDOMAIN,
                &mut arg,
            )
        }
        .map(port_of)
    }

    fn notify(&mut self, port: Port) -> io::Result<()> {
        self.port_ioctl(IOCTL_EVTCHN_NOTIFY, port)
    }

    fn pending(&mut self) -> io::Result<Option<Port>> {
        let mut b = [0u8; 4];
        match (&self.file).read(&mut b) {
            Ok(4) => Ok(Some(Port(u32::from_ne_bytes(b)))),
            Ok(n) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{EVTCHN_PATH} returned {n} bytes, not a port"),
            )),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn unmask(&mut self, port: Port) -> io::Result<()> {
        (&self.file).write_all(&port.0.to_ne_bytes())
    }

    fn unbind(&mut self, port: Port) -> io::Result<()> {
        self.port_ioctl(IOCTL_EVTCHN_UNBIND, port)
    }

    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Whether this machine has the Xen devices (a Xen guest with the drivers loaded).
pub fn available() -> bool {
    [GNTALLOC_PATH, GNTDEV_PATH, EVTCHN_PATH]
        .iter()
        .all(|p| Path::new(p).exists())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn struct_layouts_match_the_uapi_headers() {
        // gntalloc.h: u16 domid, u16 flags, u32 count, u64 index, u32 gref_ids[1] -> 20
        // bytes, padded to the u64's alignment: 24.
        assert_eq!(size_of::<IoctlGntallocAllocGref>(), 24);
        assert_eq!(offset_of!(IoctlGntallocAllocGref, domid), 0);
        assert_eq!(offset_of!(IoctlGntallocAllocGref, flags), 2);
        assert_eq!(offset_of!(IoctlGntallocAllocGref, count), 4);
        assert_eq!(offset_of!(IoctlGntallocAllocGref, index), 8);
        assert_eq!(offset_of!(IoctlGntallocAllocGref, gref_ids), 16);
        // u64 index, u32 count -> 12, padded: 16.
        assert_eq!(size_of::<IoctlGntallocDeallocGref>(), 16);
        assert_eq!(offset_of!(IoctlGntallocDeallocGref, count), 8);
        // gntdev.h
        assert_eq!(size_of::<IoctlGntdevGrantRef>(), 8);
        assert_eq!(offset_of!(IoctlGntdevGrantRef, gref), 4);
        assert_eq!(size_of::<IoctlGntdevMapGrantRef>(), 24);
        assert_eq!(offset_of!(IoctlGntdevMapGrantRef, pad), 4);
        assert_eq!(offset_of!(IoctlGntdevMapGrantRef, index), 8);
        assert_eq!(offset_of!(IoctlGntdevMapGrantRef, refs), 16);
        assert_eq!(size_of::<IoctlGntdevUnmapGrantRef>(), 16);
        assert_eq!(offset_of!(IoctlGntdevUnmapGrantRef, count), 8);
        // evtchn.h: unsigned ints.
        assert_eq!(size_of::<IoctlEvtchnBindInterdomain>(), 8);
        assert_eq!(offset_of!(IoctlEvtchnBindInterdomain, remote_port), 4);
        assert_eq!(size_of::<IoctlEvtchnBindUnboundPort>(), 4);
        assert_eq!(size_of::<IoctlEvtchnPort>(), 4);
    }

    #[test]
    fn ioctl_numbers_match_the_ioc_encoding() {
        // size << 16 | type << 8 | nr, with 'G' = 0x47 and 'E' = 0x45, worked by hand.
        assert_eq!(IOCTL_GNTALLOC_ALLOC_GREF, 0x0018_4705);
        assert_eq!(IOCTL_GNTALLOC_DEALLOC_GREF, 0x0010_4706);
        assert_eq!(IOCTL_GNTDEV_MAP_GRANT_REF, 0x0018_4700);
        assert_eq!(IOCTL_GNTDEV_UNMAP_GRANT_REF, 0x0010_4701);
        assert_eq!(IOCTL_EVTCHN_BIND_INTERDOMAIN, 0x0008_4501);
        assert_eq!(IOCTL_EVTCHN_BIND_UNBOUND_PORT, 0x0004_4502);
        assert_eq!(IOCTL_EVTCHN_UNBIND, 0x0004_4503);
        assert_eq!(IOCTL_EVTCHN_NOTIFY, 0x0004_4504);
    }

    #[test]
    fn argument_buffers_put_fields_where_the_structs_have_them() {
        let mut buf = arg_buffer(16, 4 * 3);
        assert_eq!(buf.len(), 4);
        put_u32(&mut buf, 4, 0x1234_5678);
        put_u32(&mut buf, 20, 9);
        assert_eq!(get_u32(&buf, 4), 0x1234_5678);
        assert_eq!(get_u32(&buf, 20), 9);
        assert_eq!(get_u32(&buf, 16), 0);
        let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(&bytes[4..8], &0x1234_5678u32.to_ne_bytes());
    }

    fn says_xen_is_needed(e: io::Error, path: &str) {
        let text = e.to_string();
        assert!(text.contains(path), "{text}");
        assert!(text.contains("needs Xen"), "{text}");
    }

    #[test]
    fn opening_without_xen_is_a_clear_error() {
        // A path that is surely missing, whatever this machine is.
        let missing = "/nonexistent-xen-test/dev/xen/evtchn";
        let e = Evtchn::open_at(Path::new(missing)).expect_err("missing device");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        says_xen_is_needed(e, missing);
        says_xen_is_needed(
            Gntalloc::open_at(Path::new("/nonexistent-xen-test/gntalloc")).expect_err("missing"),
            "/nonexistent-xen-test/gntalloc",
        );
        says_xen_is_needed(
            Gntdev::open_at(Path::new("/nonexistent-xen-test/gntdev")).expect_err("missing"),
            "/nonexistent-xen-test/gntdev",
        );
        // And the real paths, where this machine lacks them (it is not a Xen guest).
        if !Path::new(EVTCHN_PATH).exists() {
            says_xen_is_needed(Evtchn::open().expect_err("no evtchn"), EVTCHN_PATH);
        }
        if !Path::new(GNTALLOC_PATH).exists() {
            says_xen_is_needed(Gntalloc::open().expect_err("no gntalloc"), GNTALLOC_PATH);
        }
        if !Path::new(GNTDEV_PATH).exists() {
            says_xen_is_needed(Gntdev::open().expect_err("no gntdev"), GNTDEV_PATH);
        }
    }

    #[test]
    fn counts_are_checked_before_any_ioctl() {
        assert!(count_ok(0).is_err());
        assert!(count_ok(MAX_PAGES + 1).is_err());
        assert_eq!(count_ok(3).expect("ok"), 3);
    }
}
