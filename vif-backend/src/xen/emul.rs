//! An emulated hypervisor: separate processes share real pages (memfd) and signal each
//! other (eventfd) through the same [`GrantExport`], [`GrantImport`] and [`EventChannels`]
//! traits as on Xen, so the ring and vchan protocols run unchanged between processes of
//! one Linux machine.
//!
//! The [`Hypervisor`] is a broker on a Unix seqpacket socket. It keeps what Xen keeps: the
//! grant table (which domain granted which page to which other domain, writable or not;
//! `xen/include/public/grant_table.h`) and the event channel table (which port is offered
//! to which domain, which ports are bound together; `event_channel.h`). A domain connects
//! with [`Domain::connect`], naming its domid, and gets
//!
//! * [`EmulGrants`]: granting makes a sealed memfd of the pages, maps it, and registers it
//!   with the broker, which hands out grant references (from 8 up, as Xen reserves the
//!   first `GNTTAB_NR_RESERVED_ENTRIES`); dropping the pages ends the access. Mapping asks
//!   the broker for each reference, which checks it as `GNTTABOP_map_grant_ref` does
//!   (the reference exists and was not revoked, it is owned by the domain named, granted to
//!   the caller, and writable if a writable mapping is asked for) and passes the memfd
//!   (`SCM_RIGHTS`) and the page's offset in it; the pages are mapped contiguously.
//! * [`EmulEvents`]: every local port has a receive eventfd made by the broker; the
//!   descriptor to poll ([`EventChannels::raw_fd`]) is an epoll set over them.
//!   `alloc_unbound` also gets, already, the eventfd the binding port will receive on, and
//!   `bind_interdomain` gets the allocator's, so [`EventChannels::notify`] is one `write(2)`
//!   to the peer's eventfd with no broker hop, on both sides. Notifications sent on an
//!   offered port before anyone binds it are dropped at bind time (Xen's `evtchn_send`
//!   drops them for an `ECS_UNBOUND` port).
//!
//! Every request is checked, and refusals are `io::Error`s that name the reference or port
//! and the domains involved. A client that sends anything malformed is disconnected, and,
//! as when a domain dies, its grants are revoked and its ports closed. The broker never
//! blocks on a client: the sockets are non-blocking and a client that does not read its
//! replies is disconnected.
//!
//! What is not emulated: ending access to a page that the peer still has mapped succeeds
//! here (the peer's mapping stays valid until it unmaps; Xen would keep the grant busy),
//! there is no unmap notification (`SET_UNMAP_NOTIFY`), and the broker trusts the domid a
//! client names when it connects (the emulation isolates processes of one user, it is not a
//! security boundary against them; it is one against malformed requests).
#![allow(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::mem::{self, MmapPages};
use super::{DomId, EventChannels, GrantExport, GrantImport, GrantRef, Port, PAGE_SIZE};
use crate::sys::cvt;

/// Domids from here up are Xen's special ones (`DOMID_FIRST_RESERVED` in `xen.h`), never a
/// domain.
pub const DOMID_FIRST_RESERVED: DomId = 0x7ff0;

/// The most pages one [`GrantExport::grant`] call may share (a vchan ring of order 20 is
/// 256 pages).
pub const MAX_GRANT_PAGES: usize = 1024;

/// The most pages one domain may have granted at once, and the most ports it may hold: a
/// client cannot make the broker run out of descriptors or memory for the others.
const MAX_GRANTED_PAGES: usize = 64 * 1024;
const MAX_PORTS: usize = 1024;

/// The first grant reference handed out (`GNTTAB_NR_RESERVED_ENTRIES` in
/// `grant_table.h`: references 0 to 7 are reserved for the toolstack).
const FIRST_REF: u32 = 8;

/// A request: operation and three arguments, little-endian `u32`s.
const REQUEST_LEN: usize = 16;
/// A reply: status, count, `count` values, then an error message.
const REPLY_MAX: usize = 8 + 4 * MAX_GRANT_PAGES + 1024;
/// Descriptors in one message, at most.
const MAX_FDS: usize = 2;

mod op {
    pub const HELLO: u32 = 1;
    pub const GRANT: u32 = 2;
    pub const END_ACCESS: u32 = 3;
    pub const MAP: u32 = 4;
    pub const ALLOC_UNBOUND: u32 = 5;
    pub const BIND_INTERDOMAIN: u32 = 6;
    pub const UNBIND: u32 = 7;
}

fn kind_code(kind: io::ErrorKind) -> u32 {
    match kind {
        io::ErrorKind::NotFound => 1,
        io::ErrorKind::PermissionDenied => 2,
        io::ErrorKind::InvalidInput => 3,
        io::ErrorKind::AlreadyExists => 4,
        io::ErrorKind::NotConnected => 5,
        io::ErrorKind::OutOfMemory => 6,
        _ => 7,
    }
}

fn code_kind(code: u32) -> io::ErrorKind {
    match code {
        1 => io::ErrorKind::NotFound,
        2 => io::ErrorKind::PermissionDenied,
        3 => io::ErrorKind::InvalidInput,
        4 => io::ErrorKind::AlreadyExists,
        5 => io::ErrorKind::NotConnected,
        6 => io::ErrorKind::OutOfMemory,
        _ => io::ErrorKind::Other,
    }
}

fn error(kind: io::ErrorKind, msg: String) -> io::Error {
    io::Error::new(kind, msg)
}

fn encode_request(op: u32, a: u32, b: u32, c: u32) -> [u8; REQUEST_LEN] {
    let mut m = [0u8; REQUEST_LEN];
    for (i, v) in [op, a, b, c].into_iter().enumerate() {
        m[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    m
}

fn word(b: &[u8], i: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[4 * i..4 * i + 4]);
    u32::from_le_bytes(w)
}

fn encode_reply(result: &io::Result<Vec<u32>>) -> Vec<u8> {
    let mut m = Vec::new();
    match result {
        Ok(values) => {
            m.extend_from_slice(&0u32.to_le_bytes());
            m.extend_from_slice(&(values.len() as u32).to_le_bytes());
            for v in values {
                m.extend_from_slice(&v.to_le_bytes());
            }
        }
        Err(e) => {
            m.extend_from_slice(&kind_code(e.kind()).to_le_bytes());
            m.extend_from_slice(&0u32.to_le_bytes());
            let text = e.to_string();
            let mut end = text.len().min(1000);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            m.extend_from_slice(&text.as_bytes()[..end]);
        }
    }
    m
}

/// Parses a reply from the broker (which is trusted no more than it must be: a short or
/// inconsistent reply is an error, not a panic).
fn decode_reply(b: &[u8]) -> io::Result<Vec<u32>> {
    let bad = || {
        error(
            io::ErrorKind::InvalidData,
            "malformed reply from the emulated hypervisor".into(),
        )
    };
    if b.len() < 8 {
        return Err(bad());
    }
    let status = word(b, 0);
    let count = word(b, 1) as usize;
    if status != 0 {
        let msg = String::from_utf8_lossy(&b[8..]).into_owned();
        return Err(error(code_kind(status), msg));
    }
    if count > MAX_GRANT_PAGES || b.len() != 8 + 4 * count {
        return Err(bad());
    }
    Ok((0..count).map(|i| word(b, 2 + i)).collect())
}

// ---------------------------------------------------------------------------------------
// Sockets and descriptors.

/// A Unix socket address for `path`.
fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data, for which all zeros is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(error(
            io::ErrorKind::InvalidInput,
            format!(
                "{} cannot be a Unix socket path (empty, a NUL, or over {} bytes)",
                path.display(),
                addr.sun_path.len() - 1
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

fn seqpacket(flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: a plain system call with no pointers; the result is checked.
    let raw = cvt(unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | flags,
            0,
        )
    })?;
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn listen_at(path: &Path) -> io::Result<OwnedFd> {
    let (addr, len) = sockaddr(path)?;
    let fd = seqpacket(libc::SOCK_NONBLOCK)?;
    // SAFETY: `addr` is a valid sockaddr_un of which `len` bytes are used, live for the call.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    })
    .map_err(|e| {
        error(
            e.kind(),
            format!("binding the emulated hypervisor to {}: {e}", path.display()),
        )
    })?;
    // SAFETY: a plain system call on a socket we own.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), 64) })?;
    Ok(fd)
}

fn connect_to(path: &Path) -> io::Result<OwnedFd> {
    let (addr, len) = sockaddr(path)?;
    let fd = seqpacket(0)?;
    // SAFETY: `addr` is a valid sockaddr_un of which `len` bytes are used, live for the call.
    cvt(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    })
    .map_err(|e| {
        error(
            e.kind(),
            format!(
                "connecting to the emulated hypervisor at {}: {e}",
                path.display()
            ),
        )
    })?;
    Ok(fd)
}

/// Room for the control message of [`MAX_FDS`] descriptors, aligned for `cmsghdr`.
type ControlBuf = [u64; 8];

/// Sends one message with `fds` attached. `flags` adds to `MSG_NOSIGNAL` (a closed peer is
/// an `EPIPE`, not a signal).
fn send_msg(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
    flags: libc::c_int,
) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(error(
            io::ErrorKind::InvalidInput,
            "too many descriptors".into(),
        ));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut control: ControlBuf = [0; 8];
    // SAFETY: msghdr is plain old data, for which all zeros is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let bytes = (fds.len() * std::mem::size_of::<libc::c_int>()) as libc::c_uint;
        // SAFETY: CMSG_SPACE and CMSG_LEN are arithmetic on their argument.
        let (space, len) = unsafe { (libc::CMSG_SPACE(bytes), libc::CMSG_LEN(bytes)) };
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: `msg_control` points at `control`, which has room for `space` bytes
        // (CMSG_SPACE of two ints is 24 bytes, `control` is 64), so CMSG_FIRSTHDR is a
        // header inside it and its data has room for `fds.len()` ints, written unaligned.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = len as _;
            let out = libc::CMSG_DATA(c).cast::<libc::c_int>();
            for (i, fd) in fds.iter().enumerate() {
                out.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: `msg` points at `iov` (over `data`) and `control`, all live for the call;
        // the kernel only reads them.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL | flags) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n as usize != data.len() {
            return Err(error(
                io::ErrorKind::WriteZero,
                "short seqpacket send".into(),
            ));
        }
        return Ok(());
    }
}

/// Receives one message into `buf`, and its descriptors into `fds` (each owned, so closed
/// whatever happens next). 0 is the end of the connection. A message or control data that
/// did not fit is an `InvalidData` error.
fn recv_msg(sock: BorrowedFd<'_>, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control: ControlBuf = [0; 8];
    // SAFETY: msghdr is plain old data, for which all zeros is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of::<ControlBuf>() as _;
    let n = loop {
        // SAFETY: `msg` points at `iov` (over `buf`) and `control`, live for the call, with
        // their true lengths; the kernel writes within them.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        break n as usize;
    };
    // SAFETY: the kernel wrote `msg_controllen` bytes of well-formed control headers into
    // `control`; CMSG_FIRSTHDR/CMSG_NXTHDR stay within them, and each SCM_RIGHTS header's
    // data holds (cmsg_len - CMSG_LEN(0)) / 4 descriptors, now ours, read unaligned.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                let bytes = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                for i in 0..bytes / std::mem::size_of::<libc::c_int>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(error(
            io::ErrorKind::InvalidData,
            "message or descriptors truncated".into(),
        ));
    }
    Ok(n)
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: a plain system call; the result is checked.
    let raw = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Empties an eventfd (non-blocking): what was signalled before now is forgotten.
fn drain(fd: &OwnedFd) {
    let mut b = [0u8; 8];
    // SAFETY: `b` has room for the 8 bytes an eventfd read gives; the descriptor is live and
    // non-blocking, so this returns at once (EAGAIN when it was empty).
    let _ = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
}

// ---------------------------------------------------------------------------------------
// The broker.

/// One page of a grant: whose it is, who may map it, how, and where it lives.
#[derive(Debug)]
struct GrantEntry {
    owner: DomId,
    grantee: DomId,
    writable: bool,
    file: Arc<OwnedFd>,
    offset: u64,
}

#[derive(Debug)]
enum Link {
    /// Made by `alloc_unbound`. `peer_recv` is the receive eventfd of the port that will
    /// bind to it, made now so the allocator can notify with no broker hop; `bound` is
    /// that port once bound.
    Offered {
        peer_recv: Arc<OwnedFd>,
        bound: Option<u32>,
    },
    /// Made by `bind_interdomain` to the remote's offered port; `None` once the remote
    /// closed it (notifications go nowhere, as on Xen).
    Bound { remote_port: Option<u32> },
}

#[derive(Debug)]
struct PortEntry {
    remote: DomId,
    recv: Arc<OwnedFd>,
    link: Link,
}

#[derive(Debug)]
struct Client {
    sock: OwnedFd,
    domid: Option<DomId>,
}

/// The grant and event channel tables.
#[derive(Debug, Default)]
struct Tables {
    grants: HashMap<u32, GrantEntry>,
    /// References that were revoked, with their owner and grantee, to say so when they are
    /// used (references are never reused).
    revoked: HashMap<u32, (DomId, DomId)>,
    next_ref: u32,
    ports: HashMap<(DomId, u32), PortEntry>,
    next_port: HashMap<DomId, u32>,
    connected: HashSet<DomId>,
}

/// What a request did: values and descriptors for the reply, or an error for it.
type Outcome = io::Result<(Vec<u32>, Vec<Arc<OwnedFd>>)>;

/// A request that breaks the protocol: the client is disconnected.
#[derive(Debug)]
struct Garbage;

impl Tables {
    fn granted_by(&self, dom: DomId) -> usize {
        self.grants.values().filter(|g| g.owner == dom).count()
    }

    fn ports_of(&self, dom: DomId) -> usize {
        self.ports.keys().filter(|(d, _)| *d == dom).count()
    }

    fn grant(
        &mut self,
        caller: DomId,
        peer: u32,
        count: u32,
        writable: u32,
        file: OwnedFd,
    ) -> Result<Outcome, Garbage> {
        let writable = match writable {
            0 => false,
            1 => true,
            _ => return Err(Garbage),
        };
        let peer = domid(peer)?;
        let count = count as usize;
        if count == 0 || count > MAX_GRANT_PAGES {
            return Ok(Err(error(
                io::ErrorKind::InvalidInput,
                format!("domain {caller} asked to grant {count} pages (1 to {MAX_GRANT_PAGES})"),
            )));
        }
        if self.granted_by(caller) + count > MAX_GRANTED_PAGES {
            return Ok(Err(error(
                io::ErrorKind::OutOfMemory,
                format!("domain {caller} has {MAX_GRANTED_PAGES} pages granted already"),
            )));
        }
        if !mem::is_sealed_memfd(file.as_fd(), (count * PAGE_SIZE) as u64) {
            return Ok(Err(error(
                io::ErrorKind::InvalidInput,
                format!(
                    "domain {caller} offered a descriptor that is not a memfd of {count} pages sealed against shrinking"
                ),
            )));
        }
        if self.next_ref.checked_add(count as u32).is_none() {
            return Ok(Err(error(
                io::ErrorKind::OutOfMemory,
                "grant references exhausted".into(),
            )));
        }
        let file = Arc::new(file);
        let mut refs = Vec::with_capacity(count);
        for i in 0..count {
            let r = self.next_ref;
            self.next_ref += 1;
            self.grants.insert(
                r,
                GrantEntry {
                    owner: caller,
                    grantee: peer,
                    writable,
                    file: Arc::clone(&file),
                    offset: (i * PAGE_SIZE) as u64,
                },
            );
            refs.push(r);
        }
        Ok(Ok((refs, Vec::new())))
    }

    fn revoke(&mut self, r: u32) {
        if let Some(g) = self.grants.remove(&r) {
            self.revoked.insert(r, (g.owner, g.grantee));
        }
    }

    fn end_access(&mut self, caller: DomId, r: u32) -> Outcome {
        match self.grants.get(&r) {
            Some(g) if g.owner == caller => {
                self.revoke(r);
                Ok((Vec::new(), Vec::new()))
            }
            Some(g) => Err(error(
                io::ErrorKind::PermissionDenied,
                format!(
                    "domain {caller} cannot end gref {r}: it belongs to domain {}",
                    g.owner
                ),
            )),
            None => Err(error(
                io::ErrorKind::NotFound,
                format!("domain {caller} ended gref {r}, which is not granted"),
            )),
        }
    }

    fn map(&self, caller: DomId, peer: u32, r: u32, writable: u32) -> Result<Outcome, Garbage> {
        let writable = match writable {
            0 => false,
            1 => true,
            _ => return Err(Garbage),
        };
        let peer = domid(peer)?;
        let g = match self.grants.get(&r) {
            Some(g) => g,
            None => {
                let msg = match self.revoked.get(&r) {
                    Some((owner, grantee)) => format!(
                        "gref {r} of domain {owner} (granted to domain {grantee}) was revoked; domain {caller} cannot map it"
                    ),
                    None => format!("gref {r} does not exist (domain {caller} asked for it from domain {peer})"),
                };
                return Ok(Err(error(io::ErrorKind::NotFound, msg)));
            }
        };
        if g.owner != peer {
            return Ok(Err(error(
                io::ErrorKind::PermissionDenied,
                format!(
                    "gref {r} belongs to domain {}, not domain {peer} (asked by domain {caller})",
                    g.owner
                ),
            )));
        }
        if g.grantee != caller {
            return Ok(Err(error(
                io::ErrorKind::PermissionDenied,
                format!(
                    "gref {r} of domain {} is granted to domain {}, not domain {caller}",
                    g.owner, g.grantee
                ),
            )));
        }
        if writable && !g.writable {
            return Ok(Err(error(
                io::ErrorKind::PermissionDenied,
                format!(
                    "gref {r} of domain {} is read-only; domain {caller} asked to map it writable",
                    g.owner
                ),
            )));
        }
        let off = g.offset;
        Ok(Ok((
            vec![off as u32, (off >> 32) as u32],
            vec![Arc::clone(&g.file)],
        )))
    }

    fn new_port(&mut self, dom: DomId) -> io::Result<u32> {
        if self.ports_of(dom) >= MAX_PORTS {
            return Err(error(
                io::ErrorKind::OutOfMemory,
                format!("domain {dom} has {MAX_PORTS} event channels already"),
            ));
        }
        let next = self.next_port.entry(dom).or_insert(1);
        let port = *next;
        *next = next.checked_add(1).ok_or_else(|| {
            error(
                io::ErrorKind::OutOfMemory,
                format!("domain {dom} ran out of port numbers"),
            )
        })?;
        Ok(port)
    }

    fn alloc_unbound(&mut self, caller: DomId, remote: u32) -> Result<Outcome, Garbage> {
        let remote = domid(remote)?;
        let made = (|| {
            let recv = Arc::new(eventfd()?);
            let peer_recv = Arc::new(eventfd()?);
            let port = self.new_port(caller)?;
            self.ports.insert(
                (caller, port),
                PortEntry {
                    remote,
                    recv: Arc::clone(&recv),
                    link: Link::Offered {
                        peer_recv: Arc::clone(&peer_recv),
                        bound: None,
                    },
                },
            );
            Ok((vec![port], vec![recv, peer_recv]))
        })();
        Ok(made)
    }

    fn bind_interdomain(
        &mut self,
        caller: DomId,
        remote: u32,
        rport: u32,
    ) -> Result<Outcome, Garbage> {
        let remote = domid(remote)?;
        let (peer_recv, their_recv) = match self.ports.get(&(remote, rport)) {
            None => {
                return Ok(Err(error(
                    io::ErrorKind::NotFound,
                    format!("domain {remote} has no port {rport} (domain {caller} tried to bind it)"),
                )))
            }
            Some(p) if p.remote != caller => {
                return Ok(Err(error(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "port {rport} of domain {remote} was allocated for domain {}, not domain {caller}",
                        p.remote
                    ),
                )))
            }
            Some(PortEntry {
                link: Link::Offered { bound: Some(q), .. },
                ..
            }) => {
                return Ok(Err(error(
                    io::ErrorKind::AlreadyExists,
                    format!("port {rport} of domain {remote} is already bound to port {q} of domain {caller}"),
                )))
            }
            Some(PortEntry {
                link: Link::Bound { .. },
                ..
            }) => {
                return Ok(Err(error(
                    io::ErrorKind::AlreadyExists,
                    format!("port {rport} of domain {remote} is itself bound, not offered for binding"),
                )))
            }
            Some(PortEntry {
                recv,
                link: Link::Offered { peer_recv, .. },
                ..
            }) => (Arc::clone(peer_recv), Arc::clone(recv)),
        };
        let port = match self.new_port(caller) {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        // What the allocator sent before anyone was bound is dropped, as Xen drops events
        // sent on an unbound port.
        drain(&peer_recv);
        if let Some(PortEntry {
            link: Link::Offered { bound, .. },
            ..
        }) = self.ports.get_mut(&(remote, rport))
        {
            *bound = Some(port);
        }
        self.ports.insert(
            (caller, port),
            PortEntry {
                remote,
                recv: Arc::clone(&peer_recv),
                link: Link::Bound {
                    remote_port: Some(rport),
                },
            },
        );
        Ok(Ok((vec![port], vec![peer_recv, their_recv])))
    }

    fn unbind(&mut self, caller: DomId, port: u32) -> Outcome {
        let Some(entry) = self.ports.remove(&(caller, port)) else {
            return Err(error(
                io::ErrorKind::NotFound,
                format!("domain {caller} has no port {port} to unbind"),
            ));
        };
        match entry.link {
            // The binder goes: the offered port can be bound again (ECS_UNBOUND on Xen).
            Link::Bound {
                remote_port: Some(q),
            } => {
                if let Some(PortEntry {
                    link: Link::Offered { bound, .. },
                    ..
                }) = self.ports.get_mut(&(entry.remote, q))
                {
                    *bound = None;
                }
            }
            // The allocator goes: its binder is left bound to nothing.
            Link::Offered { bound: Some(q), .. } => {
                if let Some(PortEntry {
                    link: Link::Bound { remote_port },
                    ..
                }) = self.ports.get_mut(&(entry.remote, q))
                {
                    *remote_port = None;
                }
            }
            _ => {}
        }
        Ok((Vec::new(), Vec::new()))
    }

    /// A domain went away: its grants are revoked and its ports closed.
    fn forget(&mut self, dom: DomId) {
        let refs: Vec<u32> = self
            .grants
            .iter()
            .filter(|(_, g)| g.owner == dom)
            .map(|(r, _)| *r)
            .collect();
        for r in refs {
            self.revoke(r);
        }
        let ports: Vec<u32> = self
            .ports
            .keys()
            .filter(|(d, _)| *d == dom)
            .map(|(_, p)| *p)
            .collect();
        for p in ports {
            let _ = self.unbind(dom, p);
        }
        self.connected.remove(&dom);
    }
}

fn domid(v: u32) -> Result<DomId, Garbage> {
    match DomId::try_from(v) {
        Ok(d) if d < DOMID_FIRST_RESERVED => Ok(d),
        _ => Err(Garbage),
    }
}

/// The emulated hypervisor: a broker on a Unix seqpacket socket, keeping the grant and
/// event channel tables of every domain that connects. Run it in a thread of the process
/// with [`Hypervisor::serve`], or as a process of its own with [`Hypervisor::bind`] and
/// [`Hypervisor::run`].
#[derive(Debug)]
pub struct Hypervisor {
    listener: OwnedFd,
    path: PathBuf,
    tables: Tables,
    clients: Vec<Client>,
}

/// A broker running in a thread: stopped, and its socket removed, on drop.
#[derive(Debug)]
pub struct HypervisorHandle {
    path: PathBuf,
    stop: File,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl HypervisorHandle {
    /// The socket domains connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for HypervisorHandle {
    fn drop(&mut self) {
        let _ = (&self.stop).write(&1u64.to_ne_bytes());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Hypervisor {
    /// Listens on `path` (which must not exist yet).
    pub fn bind(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        Ok(Hypervisor {
            listener: listen_at(&path)?,
            path,
            tables: Tables {
                next_ref: FIRST_REF,
                ..Tables::default()
            },
            clients: Vec::new(),
        })
    }

    /// Listens on `path` and serves in a new thread until the handle is dropped.
    pub fn serve(path: impl AsRef<Path>) -> io::Result<HypervisorHandle> {
        let hv = Self::bind(path)?;
        let path = hv.path.clone();
        let stop = File::from(eventfd()?);
        let stop_rx = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("xen-emul-hypervisor".into())
            .spawn(move || hv.run_until(Some(stop_rx)))?;
        Ok(HypervisorHandle {
            path,
            stop,
            thread: Some(thread),
        })
    }

    /// Serves forever (for a broker process of its own).
    pub fn run(self) -> io::Result<()> {
        self.run_until(None)
    }

    fn run_until(mut self, stop: Option<File>) -> io::Result<()> {
        let mut ready = Vec::new();
        let mut buf = vec![0u8; 256];
        loop {
            let mut fds = Vec::with_capacity(self.clients.len() + 2);
            fds.push(stop.as_ref().map_or(-1, |s| s.as_raw_fd()));
            fds.push(self.listener.as_raw_fd());
            fds.extend(self.clients.iter().map(|c| c.sock.as_raw_fd()));
            crate::sys::poll_readable(&fds, -1, &mut ready)?;
            if ready.first() == Some(&true) {
                return Ok(());
            }
            // Clients first (their indices are those of this poll), newcomers after.
            let mut gone = Vec::new();
            for i in 0..self.clients.len() {
                if ready.get(i + 2) == Some(&true) && !self.serve_one(i, &mut buf) {
                    gone.push(i);
                }
            }
            for i in gone.into_iter().rev() {
                let c = self.clients.remove(i);
                if let Some(d) = c.domid {
                    self.tables.forget(d);
                }
            }
            if ready.get(1) == Some(&true) {
                self.accept();
            }
        }
    }

    fn accept(&mut self) {
        // SAFETY: no address is asked for (null pointers are allowed); the result is checked.
        let raw = unsafe {
            libc::accept4(
                self.listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            )
        };
        if raw >= 0 {
            self.clients.push(Client {
                // SAFETY: `raw` is a fresh descriptor nothing else owns.
                sock: unsafe { OwnedFd::from_raw_fd(raw) },
                domid: None,
            });
        }
    }

    /// Handles one message of client `i`; false if it is to be disconnected.
    fn serve_one(&mut self, i: usize, buf: &mut [u8]) -> bool {
        let mut fds = Vec::new();
        let n = match recv_msg(self.clients[i].sock.as_fd(), buf, &mut fds) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        };
        let outcome = match self.request(i, &buf[..n], fds) {
            Ok(outcome) => outcome,
            Err(Garbage) => return false,
        };
        let (result, files) = match outcome {
            Ok((values, files)) => (Ok(values), files),
            Err(e) => (Err(e), Vec::new()),
        };
        let reply = encode_reply(&result);
        let borrowed: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
        // A client that does not read its replies is dropped rather than waited for.
        send_msg(
            self.clients[i].sock.as_fd(),
            &reply,
            &borrowed,
            libc::MSG_DONTWAIT,
        )
        .is_ok()
    }

    fn request(&mut self, i: usize, msg: &[u8], mut fds: Vec<OwnedFd>) -> Result<Outcome, Garbage> {
        if msg.len() != REQUEST_LEN {
            return Err(Garbage);
        }
        let (opc, a, b, c) = (word(msg, 0), word(msg, 1), word(msg, 2), word(msg, 3));
        let with_fd = opc == op::GRANT;
        if fds.len() != usize::from(with_fd) {
            return Err(Garbage);
        }
        let Some(caller) = self.clients[i].domid else {
            if opc != op::HELLO || b != 0 || c != 0 {
                return Err(Garbage);
            }
            let dom = domid(a)?;
            if !self.tables.connected.insert(dom) {
                return Ok(Err(error(
                    io::ErrorKind::AlreadyExists,
                    format!("domain {dom} is already connected to the emulated hypervisor"),
                )));
            }
            self.clients[i].domid = Some(dom);
            return Ok(Ok((Vec::new(), Vec::new())));
        };
        let t = &mut self.tables;
        match opc {
            op::GRANT => match fds.pop() {
                Some(file) => t.grant(caller, a, b, c, file),
                None => Err(Garbage),
            },
            op::END_ACCESS if b == 0 && c == 0 => Ok(t.end_access(caller, a)),
            op::MAP => t.map(caller, a, b, c),
            op::ALLOC_UNBOUND if b == 0 && c == 0 => t.alloc_unbound(caller, a),
            op::BIND_INTERDOMAIN if c == 0 => t.bind_interdomain(caller, a, b),
            op::UNBIND if b == 0 && c == 0 => Ok(t.unbind(caller, a)),
            _ => Err(Garbage),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Domains.

/// A domain's connection to the broker: one request and its reply at a time.
#[derive(Debug)]
struct Conn {
    domid: DomId,
    sock: Mutex<OwnedFd>,
}

impl Conn {
    fn call(
        &self,
        req: [u8; REQUEST_LEN],
        fd: Option<BorrowedFd<'_>>,
        want_fds: usize,
    ) -> io::Result<(Vec<u32>, Vec<OwnedFd>)> {
        let sock = self.sock.lock().map_err(|_| {
            error(
                io::ErrorKind::Other,
                "emulated hypervisor connection poisoned".into(),
            )
        })?;
        let gone = |e: io::Error| {
            error(
                e.kind(),
                format!(
                    "domain {}: the emulated hypervisor connection failed: {e}",
                    self.domid
                ),
            )
        };
        let attach: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        send_msg(sock.as_fd(), &req, &attach, 0).map_err(gone)?;
        let mut buf = vec![0u8; REPLY_MAX];
        let mut fds = Vec::new();
        let n = recv_msg(sock.as_fd(), &mut buf, &mut fds).map_err(gone)?;
        if n == 0 {
            return Err(error(
                io::ErrorKind::BrokenPipe,
                format!(
                    "domain {}: the emulated hypervisor closed the connection",
                    self.domid
                ),
            ));
        }
        let values = decode_reply(&buf[..n])?;
        if fds.len() != want_fds {
            return Err(error(
                io::ErrorKind::InvalidData,
                format!(
                    "the emulated hypervisor sent {} descriptors, not {want_fds}",
                    fds.len()
                ),
            ));
        }
        Ok((values, fds))
    }

    fn call_one(&self, req: [u8; REQUEST_LEN], want_fds: usize) -> io::Result<(u32, Vec<OwnedFd>)> {
        let (values, fds) = self.call(req, None, want_fds)?;
        match values[..] {
            [v] => Ok((v, fds)),
            _ => Err(error(
                io::ErrorKind::InvalidData,
                "malformed reply from the emulated hypervisor".into(),
            )),
        }
    }
}

/// A domain connected to the emulated hypervisor. Clones share the connection.
#[derive(Clone, Debug)]
pub struct Domain {
    conn: Arc<Conn>,
}

impl Domain {
    /// Connects to the broker at `path` as domain `domid` (one connection per domid).
    pub fn connect(path: impl AsRef<Path>, domid: DomId) -> io::Result<Self> {
        if domid >= DOMID_FIRST_RESERVED {
            return Err(error(
                io::ErrorKind::InvalidInput,
                format!(
                    "domid {domid} is reserved (DOMID_FIRST_RESERVED is {DOMID_FIRST_RESERVED})"
                ),
            ));
        }
        let conn = Conn {
            domid,
            sock: Mutex::new(connect_to(path.as_ref())?),
        };
        conn.call(encode_request(op::HELLO, u32::from(domid), 0, 0), None, 0)?;
        Ok(Domain {
            conn: Arc::new(conn),
        })
    }

    /// This process's one connection as `domid` to the broker at `path`, made on first use
    /// and shared after: the broker takes one connection per domain, as a real domain has
    /// one grant table and one set of event channels whatever the number of its devices.
    pub fn shared(path: impl AsRef<Path>, domid: DomId) -> io::Result<Self> {
        static SHARED: Mutex<Vec<(PathBuf, DomId, Domain)>> = Mutex::new(Vec::new());
        let path = path.as_ref();
        let mut all = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, _, d)) = all.iter().find(|(p, id, _)| p == path && *id == domid) {
            return Ok(d.clone());
        }
        let d = Domain::connect(path, domid)?;
        all.push((path.to_path_buf(), domid, d.clone()));
        Ok(d)
    }

    pub fn id(&self) -> DomId {
        self.conn.domid
    }

    /// The domain's grant table, both sides.
    pub fn grants(&self) -> EmulGrants {
        EmulGrants {
            conn: Arc::clone(&self.conn),
        }
    }

    /// A new event channel handle (like opening `/dev/xen/evtchn`); its ports are closed
    /// when it is dropped.
    pub fn events(&self) -> io::Result<EmulEvents> {
        // SAFETY: a plain system call; the result is checked.
        let raw = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        Ok(EmulEvents {
            conn: Arc::clone(&self.conn),
            // SAFETY: `raw` is a fresh descriptor nothing else owns.
            epoll: unsafe { OwnedFd::from_raw_fd(raw) },
            ports: HashMap::new(),
        })
    }

    #[cfg(test)]
    fn send_raw(&self, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let sock = self
            .conn
            .sock
            .lock()
            .map_err(|_| error(io::ErrorKind::Other, "poisoned".into()))?;
        let attach: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        send_msg(sock.as_fd(), bytes, &attach, 0)
    }
}

/// Grants of an emulated domain: [`GrantExport`] over sealed memfds registered with the
/// broker, [`GrantImport`] over the memfds it passes back.
#[derive(Clone, Debug)]
pub struct EmulGrants {
    conn: Arc<Conn>,
}

impl GrantExport for EmulGrants {
    type Pages = MmapPages;

    fn grant(
        &mut self,
        peer: DomId,
        count: usize,
        writable: bool,
    ) -> io::Result<(Vec<GrantRef>, MmapPages)> {
        if count == 0 || count > MAX_GRANT_PAGES {
            return Err(error(
                io::ErrorKind::InvalidInput,
                format!("cannot grant {count} pages (1 to {MAX_GRANT_PAGES})"),
            ));
        }
        let file = mem::memfd("xen-emul-grant", count)?;
        let pages = MmapPages::map_fd(file.as_fd(), 0, count, true)?;
        let (values, _) = self.conn.call(
            encode_request(
                op::GRANT,
                u32::from(peer),
                count as u32,
                u32::from(writable),
            ),
            Some(file.as_fd()),
            0,
        )?;
        let refs: Vec<GrantRef> = values.into_iter().map(GrantRef).collect();
        let conn = Arc::clone(&self.conn);
        let ended = refs.clone();
        let pages = pages.on_release(move || {
            for r in ended {
                // The broker gone means the grant is gone with it.
                let _ = conn.call(encode_request(op::END_ACCESS, r.0, 0, 0), None, 0);
            }
        });
        if refs.len() != count {
            return Err(error(
                io::ErrorKind::InvalidData,
                format!(
                    "the emulated hypervisor gave {} refs for {count} pages",
                    refs.len()
                ),
            ));
        }
        Ok((refs, pages))
    }
}

impl GrantImport for EmulGrants {
    type Mapping = MmapPages;

    fn map(&mut self, peer: DomId, refs: &[GrantRef], writable: bool) -> io::Result<MmapPages> {
        if refs.is_empty() || refs.len() > MAX_GRANT_PAGES {
            return Err(error(
                io::ErrorKind::InvalidInput,
                format!("cannot map {} grants (1 to {MAX_GRANT_PAGES})", refs.len()),
            ));
        }
        let mut files = Vec::with_capacity(refs.len());
        for r in refs {
            let (values, mut fds) = self.conn.call(
                encode_request(op::MAP, u32::from(peer), r.0, u32::from(writable)),
                None,
                1,
            )?;
            let (Some(fd), &[lo, hi]) = (fds.pop(), &values[..]) else {
                return Err(error(
                    io::ErrorKind::InvalidData,
                    "malformed map reply".into(),
                ));
            };
            let offset = u64::from(lo) | (u64::from(hi) << 32);
            if !offset.is_multiple_of(PAGE_SIZE as u64) {
                return Err(error(
                    io::ErrorKind::InvalidData,
                    format!("{r}: unaligned offset {offset}"),
                ));
            }
            files.push((fd, offset));
        }
        let pieces: Vec<(BorrowedFd<'_>, u64)> =
            files.iter().map(|(f, o)| (f.as_fd(), *o)).collect();
        MmapPages::map_pages(&pieces, writable)
    }
}

/// One local port: where it is signalled, where its peer is, and whether it is masked.
#[derive(Debug)]
struct LocalPort {
    recv: File,
    send: File,
    masked: bool,
}

/// Event channels of an emulated domain, over eventfds (see the module documentation).
#[derive(Debug)]
pub struct EmulEvents {
    conn: Arc<Conn>,
    epoll: OwnedFd,
    ports: HashMap<u32, LocalPort>,
}

impl EmulEvents {
    fn ctl(&self, op: libc::c_int, port: u32, fd: RawFd, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events,
            u64: u64::from(port),
        };
        // SAFETY: `ev` is a valid epoll_event for the call; both descriptors are ours.
        cvt(unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) }).map(|_| ())
    }

    /// Takes a port the broker made, with its receive and send eventfds.
    fn adopt(&mut self, port: u32, mut fds: Vec<OwnedFd>) -> io::Result<Port> {
        let (Some(send), Some(recv)) = (fds.pop(), fds.pop()) else {
            return Err(error(
                io::ErrorKind::InvalidData,
                "malformed port reply".into(),
            ));
        };
        let local = LocalPort {
            recv: File::from(recv),
            send: File::from(send),
            masked: false,
        };
        if let Err(e) = self.ctl(
            libc::EPOLL_CTL_ADD,
            port,
            local.recv.as_raw_fd(),
            libc::EPOLLIN as u32,
        ) {
            let _ = self
                .conn
                .call(encode_request(op::UNBIND, port, 0, 0), None, 0);
            return Err(e);
        }
        self.ports.insert(port, local);
        Ok(Port(port))
    }

    fn local(&mut self, port: Port) -> io::Result<&mut LocalPort> {
        let dom = self.conn.domid;
        self.ports.get_mut(&port.0).ok_or_else(|| {
            error(
                io::ErrorKind::NotFound,
                format!("domain {dom} has no {port}"),
            )
        })
    }
}

impl EventChannels for EmulEvents {
    fn alloc_unbound(&mut self, remote: DomId) -> io::Result<Port> {
        let (port, fds) = self.conn.call_one(
            encode_request(op::ALLOC_UNBOUND, u32::from(remote), 0, 0),
            2,
        )?;
        self.adopt(port, fds)
    }

    fn bind_interdomain(&mut self, remote: DomId, remote_port: Port) -> io::Result<Port> {
        let (port, fds) = self.conn.call_one(
            encode_request(op::BIND_INTERDOMAIN, u32::from(remote), remote_port.0, 0),
            2,
        )?;
        self.adopt(port, fds)
    }

    fn notify(&mut self, port: Port) -> io::Result<()> {
        let local = self.local(port)?;
        match (&local.send).write(&1u64.to_ne_bytes()) {
            Ok(_) => Ok(()),
            // The counter is full: the peer has plenty pending already.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn pending(&mut self) -> io::Result<Option<Port>> {
        // Each round either reports a port or finds a ready one empty (which epoll then
        // stops reporting), so this ends.
        for _ in 0..=self.ports.len() {
            let mut ev = libc::epoll_event { events: 0, u64: 0 };
            // SAFETY: `ev` has room for the one event asked for; the timeout is 0.
            let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), &mut ev, 1, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Ok(None);
            }
            let Ok(port) = u32::try_from(ev.u64) else {
                continue;
            };
            let Some(local) = self.ports.get_mut(&port) else {
                continue;
            };
            let mut b = [0u8; 8];
            match (&local.recv).read(&mut b) {
                Ok(_) => {
                    local.masked = true;
                    let fd = local.recv.as_raw_fd();
                    // Masked: still in the set, waiting for nothing.
                    self.ctl(libc::EPOLL_CTL_MOD, port, fd, 0)?;
                    return Ok(Some(Port(port)));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    fn unmask(&mut self, port: Port) -> io::Result<()> {
        let local = self.local(port)?;
        if local.masked {
            local.masked = false;
            let fd = local.recv.as_raw_fd();
            // Level-triggered: a notification that came while masked fires now.
            self.ctl(libc::EPOLL_CTL_MOD, port.0, fd, libc::EPOLLIN as u32)?;
        }
        Ok(())
    }

    fn unbind(&mut self, port: Port) -> io::Result<()> {
        let local = self.local(port)?;
        let fd = local.recv.as_raw_fd();
        let _ = self.ctl(libc::EPOLL_CTL_DEL, port.0, fd, 0);
        self.ports.remove(&port.0);
        self.conn
            .call(encode_request(op::UNBIND, port.0, 0, 0), None, 0)
            .map(|_| ())
    }

    fn raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl Drop for EmulEvents {
    fn drop(&mut self) {
        for port in std::mem::take(&mut self.ports).into_keys() {
            let _ = self
                .conn
                .call(encode_request(op::UNBIND, port, 0, 0), None, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xen::vchan::{PeerState, Vchan, VchanError};
    use crate::xen::SharedPages;
    use std::time::{Duration, Instant};

    const D0: DomId = 0;
    const D7: DomId = 7;
    const D9: DomId = 9;

    fn broker() -> (tempfile::TempDir, HypervisorHandle) {
        let dir = tempfile::tempdir().expect("tempdir");
        let hv = Hypervisor::serve(dir.path().join("hv.sock")).expect("serve");
        (dir, hv)
    }

    fn readable(fd: RawFd, timeout_ms: i32) -> bool {
        let mut ready = Vec::new();
        crate::sys::poll_readable(&[fd], timeout_ms, &mut ready).expect("poll");
        ready.first() == Some(&true)
    }

    /// Waits up to 10 s for a pending port.
    fn wait_pending(ev: &mut EmulEvents) -> Port {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(p) = ev.pending().expect("pending") {
                return p;
            }
            assert!(Instant::now() < deadline, "no event within 10 s");
            readable(ev.raw_fd(), 100);
        }
    }

    fn refused(r: io::Result<impl std::fmt::Debug>, kind: io::ErrorKind, words: &[&str]) {
        let e = r.expect_err("must be refused");
        assert_eq!(e.kind(), kind, "{e}");
        let text = e.to_string();
        for w in words {
            assert!(text.contains(w), "{text:?} does not name {w:?}");
        }
    }

    #[test]
    fn grants_share_memory_between_domains() {
        let (_dir, hv) = broker();
        let d0 = Domain::connect(hv.path(), D0).expect("dom0");
        let d7 = Domain::connect(hv.path(), D7).expect("dom7");
        assert_eq!(d7.id(), D7);
        let (refs, pages) = d0.grants().grant(D7, 3, true).expect("grant");
        assert_eq!(refs.len(), 3);
        assert!(refs.iter().all(|r| r.0 >= FIRST_REF), "{refs:?}");
        // Mapped in another order than granted: page by page, contiguous.
        let order = [refs[2], refs[0]];
        let map = d7.grants().map(D0, &order, true).expect("map");
        assert_eq!(map.size(), 2 * PAGE_SIZE);
        pages
            .write(2 * PAGE_SIZE + 10, b"third page")
            .expect("write");
        pages.store_u32(4, 0xdead_beef).expect("store");
        let mut b = [0u8; 10];
        map.read(10, &mut b).expect("read");
        assert_eq!(&b, b"third page");
        assert_eq!(map.load_u32(PAGE_SIZE + 4).expect("load"), 0xdead_beef);
        map.write(PAGE_SIZE + 100, b"back").expect("write back");
        let mut b = [0u8; 4];
        pages.read(100, &mut b).expect("read");
        assert_eq!(&b, b"back");
        assert_eq!(map.fetch_or_u32(PAGE_SIZE + 4, 1).expect("or"), 0xdead_beef);
        assert_eq!(pages.load_u32(4).expect("load"), 0xdead_beef | 1);
        // Granted pages start zeroed.
        let mut z = vec![1u8; PAGE_SIZE];
        pages.read(PAGE_SIZE, &mut z).expect("read");
        assert!(z.iter().all(|&b| b == 0));
    }

    #[test]
    fn broker_refuses_bad_maps() {
        let (_dir, hv) = broker();
        let d0 = Domain::connect(hv.path(), D0).expect("dom0");
        let d7 = Domain::connect(hv.path(), D7).expect("dom7");
        let d9 = Domain::connect(hv.path(), D9).expect("dom9");
        refused(
            Domain::connect(hv.path(), D7),
            io::ErrorKind::AlreadyExists,
            &["domain 7"],
        );
        refused(
            Domain::connect(hv.path(), DOMID_FIRST_RESERVED),
            io::ErrorKind::InvalidInput,
            &["reserved"],
        );
        let (rw, _rw_pages) = d0.grants().grant(D7, 1, true).expect("grant rw");
        let (ro, ro_pages) = d0.grants().grant(D7, 1, false).expect("grant ro");
        let gref = |r: GrantRef| format!("gref {}", r.0);
        // Granted to 7, asked for by 9.
        refused(
            d9.grants().map(D0, &rw, false),
            io::ErrorKind::PermissionDenied,
            &[&gref(rw[0]), "domain 7", "domain 9"],
        );
        // Owned by 0, asked for as 9's.
        refused(
            d7.grants().map(D9, &rw, false),
            io::ErrorKind::PermissionDenied,
            &[&gref(rw[0]), "domain 0", "domain 9"],
        );
        // Read-only, mapped writable; read-only is fine, and refuses writes.
        refused(
            d7.grants().map(D0, &ro, true),
            io::ErrorKind::PermissionDenied,
            &[&gref(ro[0]), "read-only", "domain 7"],
        );
        let ro_map = d7.grants().map(D0, &ro, false).expect("read-only map");
        ro_pages.write(0, b"x").expect("owner writes");
        let mut b = [0u8; 1];
        ro_map.read(0, &mut b).expect("read");
        assert_eq!(&b, b"x");
        assert!(ro_map.write(0, b"y").is_err());
        // Unknown.
        refused(
            d7.grants().map(D0, &[GrantRef(999_999)], false),
            io::ErrorKind::NotFound,
            &["gref 999999", "does not exist"],
        );
        // Revoked: the pages dropped. A mapping made before stays usable.
        drop(ro_pages);
        refused(
            d7.grants().map(D0, &ro, false),
            io::ErrorKind::NotFound,
            &[&gref(ro[0]), "revoked", "domain 0", "domain 7"],
        );
        ro_map.read(0, &mut b).expect("an existing mapping stays");
        // One bad page refuses the whole mapping.
        refused(
            d7.grants().map(D0, &[rw[0], ro[0]], false),
            io::ErrorKind::NotFound,
            &["revoked"],
        );
        assert!(d7.grants().map(D0, &[], false).is_err());
        assert!(d0.grants().grant(D7, 0, true).is_err());
        assert!(d0.grants().grant(D7, MAX_GRANT_PAGES + 1, true).is_err());
    }

    #[test]
    fn broker_refuses_bad_binds() {
        let (_dir, hv) = broker();
        let d0 = Domain::connect(hv.path(), D0).expect("dom0");
        let d7 = Domain::connect(hv.path(), D7).expect("dom7");
        let d9 = Domain::connect(hv.path(), D9).expect("dom9");
        let mut e0 = d0.events().expect("events");
        let mut e7 = d7.events().expect("events");
        let mut e9 = d9.events().expect("events");
        let p = e0.alloc_unbound(D7).expect("alloc");
        refused(
            e9.bind_interdomain(D0, p),
            io::ErrorKind::PermissionDenied,
            &[&format!("port {}", p.0), "domain 0", "domain 7", "domain 9"],
        );
        refused(
            e7.bind_interdomain(D0, Port(4242)),
            io::ErrorKind::NotFound,
            &["port 4242", "domain 0"],
        );
        let q = e7.bind_interdomain(D0, p).expect("bind");
        refused(
            e7.bind_interdomain(D0, p),
            io::ErrorKind::AlreadyExists,
            &["already bound"],
        );
        // A bound port is not offered.
        refused(
            e0.bind_interdomain(D7, q),
            io::ErrorKind::AlreadyExists,
            &["not offered"],
        );
        refused(
            e7.notify(Port(77)),
            io::ErrorKind::NotFound,
            &["port 77", "domain 7"],
        );
        refused(e7.unbind(Port(77)), io::ErrorKind::NotFound, &["port 77"]);
        // The binder leaves: the offered port can be bound again.
        e7.unbind(q).expect("unbind");
        let q2 = e7.bind_interdomain(D0, p).expect("rebind");
        e0.notify(p).expect("notify");
        assert_eq!(wait_pending(&mut e7), q2);
        // The allocator leaves: the binder's notifications go nowhere, without error.
        e0.unbind(p).expect("unbind");
        e7.notify(q2).expect("notify a closed peer");
        refused(
            e7.bind_interdomain(D0, p),
            io::ErrorKind::NotFound,
            &["no port"],
        );
    }

    #[test]
    fn a_fired_port_stays_masked_until_unmasked() {
        let (_dir, hv) = broker();
        let d0 = Domain::connect(hv.path(), D0).expect("dom0");
        let d7 = Domain::connect(hv.path(), D7).expect("dom7");
        let mut e0 = d0.events().expect("events");
        let mut e7 = d7.events().expect("events");
        let p = e0.alloc_unbound(D7).expect("alloc");
        // Sent before anyone is bound: dropped, as Xen does.
        e0.notify(p).expect("notify unbound");
        let q = e7.bind_interdomain(D0, p).expect("bind");
        assert_eq!(e7.pending().expect("pending"), None);
        assert!(!readable(e0.raw_fd(), 0));
        e7.notify(q).expect("notify");
        e7.notify(q).expect("notify");
        assert!(readable(e0.raw_fd(), 1000));
        assert_eq!(e0.pending().expect("pending"), Some(p));
        assert_eq!(
            e0.pending().expect("pending"),
            None,
            "two notifies, one report"
        );
        assert!(!readable(e0.raw_fd(), 0), "masked");
        e0.unmask(p).expect("unmask");
        assert_eq!(e0.pending().expect("pending"), None, "nothing new");
        // Pending and masked at once: reported only at unmask.
        assert_eq!(e0.pending().expect("pending"), None);
        e7.notify(q).expect("notify");
        assert_eq!(e0.pending().expect("pending"), Some(p));
        e7.notify(q).expect("notify while masked");
        assert_eq!(e0.pending().expect("pending"), None);
        assert!(!readable(e0.raw_fd(), 0));
        e0.unmask(p).expect("unmask");
        assert!(readable(e0.raw_fd(), 1000));
        assert_eq!(e0.pending().expect("pending"), Some(p));
        e0.unmask(p).expect("unmask");
        // The other way, and two ports told apart.
        e0.notify(p).expect("notify");
        assert_eq!(wait_pending(&mut e7), q);
        let p2 = e7.alloc_unbound(D0).expect("alloc");
        let q2 = e0.bind_interdomain(D7, p2).expect("bind");
        e0.notify(q2).expect("notify");
        assert_eq!(wait_pending(&mut e7), p2);
        assert_eq!(e7.pending().expect("pending"), None);
    }

    #[test]
    fn garbage_disconnects_and_revokes() {
        let (_dir, hv) = broker();
        let d7 = Domain::connect(hv.path(), D7).expect("dom7");
        let bad_requests: [&[u8]; 5] = [
            b"",
            b"short",
            &encode_request(99, 0, 0, 0),
            &encode_request(op::HELLO, 5, 0, 0),
            &encode_request(op::MAP, 0, 8, 2),
        ];
        for (i, bad) in bad_requests.iter().enumerate() {
            let d5 = Domain::connect(hv.path(), 5).expect("dom5");
            let (refs, pages) = d5.grants().grant(D7, 1, true).expect("grant");
            let mut e5 = d5.events().expect("events");
            let p = e5.alloc_unbound(D7).expect("alloc");
            d7.grants()
                .map(5, &refs, true)
                .expect("mapped while 5 is up");
            d5.send_raw(bad, None).expect("send");
            // The broker hangs up; whatever 5 asks next fails cleanly.
            let e = d5.grants().grant(D7, 1, true).expect_err("disconnected");
            assert!(e.to_string().contains("domain 5"), "{i}: {e}");
            refused(
                d7.grants().map(5, &refs, true),
                io::ErrorKind::NotFound,
                &["revoked"],
            );
            let mut e7 = d7.events().expect("events");
            refused(
                e7.bind_interdomain(5, p),
                io::ErrorKind::NotFound,
                &["domain 5"],
            );
            drop((pages, e5, d5));
        }
        // A descriptor where none belongs, and a grant of something that is not a memfd.
        let d5 = Domain::connect(hv.path(), 5).expect("dom5");
        let file = mem::memfd("x", 1).expect("memfd");
        d5.send_raw(&encode_request(op::UNBIND, 1, 0, 0), Some(file.as_fd()))
            .expect("send");
        assert!(d5.grants().grant(D7, 1, true).is_err());
        drop(d5);
        let d5 = Domain::connect(hv.path(), 5).expect("dom5 again");
        let (r, w) = std::io::pipe().expect("pipe");
        drop(w);
        let reply = d5.conn.call(
            encode_request(op::GRANT, u32::from(D7), 1, 1),
            Some(r.as_fd()),
            0,
        );
        refused(reply, io::ErrorKind::InvalidInput, &["not a memfd"]);
        // The broker still serves everyone.
        let (refs, _pages) = d5.grants().grant(D7, 1, false).expect("grant");
        d7.grants().map(5, &refs, false).expect("map");
        // A raw client sending noise before saying who it is.
        let raw = connect_to(hv.path()).expect("connect");
        send_msg(raw.as_fd(), &[0xff; 16], &[], 0).expect("send");
        let mut buf = [0u8; 64];
        let mut fds = Vec::new();
        assert_eq!(
            recv_msg(raw.as_fd(), &mut buf, &mut fds).expect("recv"),
            0,
            "hung up"
        );
    }

    /// Moves `total` bytes each way over a vchan; `events` waits for the port.
    fn vchan_pump(
        v: &mut Vchan<MmapPages>,
        ev: &mut EmulEvents,
        seed: u8,
        peer_seed: u8,
        total: usize,
    ) {
        let pattern = |seed: u8, i: usize| (i as u8).wrapping_mul(31).wrapping_add(seed);
        let (mut sent, mut got) = (0usize, 0usize);
        let mut buf = vec![0u8; 3000];
        let deadline = Instant::now() + Duration::from_secs(30);
        while sent < total || got < total {
            assert!(
                Instant::now() < deadline,
                "vchan stalled: sent {sent}, got {got}"
            );
            let mut progress = false;
            if sent < total {
                let chunk: Vec<u8> = (sent..total.min(sent + 1500))
                    .map(|i| pattern(seed, i))
                    .collect();
                let n = v.send(ev, &chunk).expect("send");
                sent += n;
                progress |= n > 0;
            }
            if got < total {
                let n = v.recv(ev, &mut buf).expect("recv");
                for (k, &b) in buf[..n].iter().enumerate() {
                    assert_eq!(b, pattern(peer_seed, got + k), "byte {}", got + k);
                }
                got += n;
                progress |= n > 0;
            }
            if !progress {
                readable(ev.raw_fd(), 200);
                while let Some(port) = ev.pending().expect("pending") {
                    assert_eq!(port, v.port());
                    v.handle_event(ev).expect("event");
                }
            }
        }
    }

    #[test]
    fn vchan_runs_over_the_emulation_in_two_threads() {
        let (_dir, hv) = broker();
        let path = hv.path().to_path_buf();
        let d0 = Domain::connect(&path, D0).expect("dom0");
        let mut g0 = d0.grants();
        let mut e0 = d0.events().expect("events");
        // Left ring 8 KiB (own pages), right ring in the shared page.
        let (mut server, info) = Vchan::server(&mut g0, &mut e0, D7, 13, 11).expect("server");
        let client = std::thread::spawn(move || {
            let d7 = Domain::connect(&path, D7).expect("dom7");
            let mut g7 = d7.grants();
            let mut e7 = d7.events().expect("events");
            let mut c = Vchan::client(&mut g7, &mut e7, D0, info.ring_ref, info.event_port)
                .expect("client");
            vchan_pump(&mut c, &mut e7, 2, 1, 100_000);
            c.close(&mut e7).expect("close");
        });
        vchan_pump(&mut server, &mut e0, 1, 2, 100_000);
        client.join().expect("client thread");
        // The client's close is seen.
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.state() != PeerState::Closed {
            assert!(Instant::now() < deadline, "close not seen");
            readable(e0.raw_fd(), 100);
            while e0.pending().expect("pending").is_some() {}
        }
        let mut b = [0u8; 8];
        assert!(matches!(
            server.recv(&mut e0, &mut b),
            Err(VchanError::Closed)
        ));
        server.close(&mut e0).expect("close");
    }

    // -----------------------------------------------------------------------------------
    // Domains in separate processes: the test binary runs itself again as the child
    // domain, in the ignored test `child_domain`, told what to do by the environment.

    const ROLE: &str = "XEN_EMUL_CHILD_ROLE";
    const SOCK: &str = "XEN_EMUL_SOCKET";
    const REFS: &str = "XEN_EMUL_REFS";
    const PORT: &str = "XEN_EMUL_PORT";
    const CHILD_TEST: &str = "xen::emul::tests::child_domain";

    fn run_child(role: &str, sock: &Path, refs: &str, port: Port) -> std::process::Child {
        std::process::Command::new(std::env::current_exe().expect("current exe"))
            .args([
                "--exact",
                CHILD_TEST,
                "--nocapture",
                "--ignored",
                "--test-threads=1",
            ])
            .env(ROLE, role)
            .env(SOCK, sock)
            .env(REFS, refs)
            .env(PORT, port.0.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn child domain")
    }

    fn child_succeeded(child: std::process::Child) {
        let out = child.wait_with_output().expect("child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "child domain failed ({}):\n{stdout}\n{stderr}",
            out.status
        );
    }

    #[test]
    #[ignore = "the child domain of the two-process tests; does nothing when run alone"]
    fn child_domain() {
        let Ok(role) = std::env::var(ROLE) else {
            return;
        };
        let var = |k: &str| std::env::var(k).expect("child environment");
        let sock = PathBuf::from(var(SOCK));
        let port = Port(var(PORT).parse().expect("port"));
        let refs: Vec<GrantRef> = var(REFS)
            .split(',')
            .map(|r| GrantRef(r.parse().expect("ref")))
            .collect();
        let d7 = Domain::connect(&sock, D7).expect("child connects");
        let mut g7 = d7.grants();
        let mut e7 = d7.events().expect("events");
        match role.as_str() {
            "pages" => {
                let map = g7.map(D0, &refs, true).expect("child maps");
                let mut b = [0u8; 14];
                map.read(0, &mut b).expect("read");
                assert_eq!(&b, b"hello from d0!");
                let mut page = vec![0u8; PAGE_SIZE];
                map.read(PAGE_SIZE, &mut page).expect("read");
                assert!(page.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
                let q = e7.bind_interdomain(D0, port).expect("bind");
                map.write(2048, b"reply from d7").expect("write");
                map.store_u32(PAGE_SIZE - 4, 1).expect("flag");
                e7.notify(q).expect("notify");
                assert_eq!(wait_pending(&mut e7), q);
                let mut b = [0u8; 15];
                map.read(3000, &mut b).expect("read");
                assert_eq!(&b, b"second from d0!");
            }
            "vchan" => {
                let mut c = Vchan::client(&mut g7, &mut e7, D0, refs[0], port).expect("client");
                vchan_pump(&mut c, &mut e7, 2, 1, 200_000);
                c.close(&mut e7).expect("close");
            }
            "die" => {
                // Grant, offer a port, say so, and wait to be killed.
                let (refs, pages) = g7.grant(D0, 1, true).expect("grant");
                pages.write(0, b"from a dying domain").expect("write");
                let p = e7.alloc_unbound(D0).expect("alloc");
                println!("GRANTED {} {}", refs[0].0, p.0);
                std::thread::sleep(Duration::from_secs(60));
            }
            other => panic!("unknown child role {other}"),
        }
    }

    #[test]
    fn two_processes_share_a_grant_and_notify() {
        let (_dir, hv) = broker();
        let d0 = Domain::connect(hv.path(), D0).expect("dom0");
        let (refs, pages) = d0.grants().grant(D7, 2, true).expect("grant");
        pages.write(0, b"hello from d0!").expect("write");
        let pattern: Vec<u8> = (0..PAGE_SIZE).map(|i| (i % 251) as u8).collect();
        pages.write(PAGE_SIZE, &pattern).expect("write");
        let mut e0 = d0.events().expect("events");
        let p = e0.alloc_unbound(D7).expect("alloc");
        let list = format!("{},{}", refs[0].0, refs[1].0);
        let child = run_child("pages", hv.path(), &list, p);
        assert_eq!(wait_pending(&mut e0), p);
        assert_eq!(pages.load_u32(PAGE_SIZE - 4).expect("flag"), 1);
        let mut b = [0u8; 13];
        pages.read(2048, &mut b).expect("read");
        assert_eq!(&b, b"reply from d7");
        pages.write(3000, b"second from d0!").expect("write");
        e0.notify(p).expect("notify");
        child_succeeded(child);
    }

    #[test]
    fn a_killed_domain_loses_its_grants_and_ports() {
        use std::io::BufRead;
        let (_dir, hv) = broker();
        let d0 = Domain::connect(hv.path(), D0).expect("dom0");
        let mut e0 = d0.events().expect("events");
        let mut child = run_child("die", hv.path(), "0", Port(0));
        let stdout = child.stdout.take().expect("stdout");
        let line = std::io::BufReader::new(stdout)
            .lines()
            .map(|l| l.expect("child output"))
            .find_map(|l| l.split_once("GRANTED ").map(|(_, rest)| rest.to_string()))
            .expect("the child granted");
        // (libtest may have printed the test's name on the same line.)
        let mut words = line.split(' ').map(|w| w.parse::<u32>().expect("number"));
        let (r, p) = (
            GrantRef(words.next().expect("ref")),
            Port(words.next().expect("port")),
        );
        let map = d0.grants().map(D7, &[r], true).expect("map while alive");
        child.kill().expect("kill");
        child.wait().expect("reap");
        // The broker sees the hang-up asynchronously.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match d0.grants().map(D7, &[r], true) {
                Ok(_) => assert!(Instant::now() < deadline, "grant not revoked"),
                Err(e) => {
                    assert!(e.to_string().contains("revoked"), "{e}");
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        refused(
            e0.bind_interdomain(D7, p),
            io::ErrorKind::NotFound,
            &["no port"],
        );
        // What was mapped stays readable, and domain 7 may come back.
        let mut b = [0u8; 19];
        map.read(0, &mut b).expect("read");
        assert_eq!(&b, b"from a dying domain");
        Domain::connect(hv.path(), D7).expect("reconnect");
    }

    #[test]
    fn vchan_runs_between_two_processes() {
        let (_dir, hv) = broker();
        let d0 = Domain::connect(hv.path(), D0).expect("dom0");
        let mut g0 = d0.grants();
        let mut e0 = d0.events().expect("events");
        // Both rings with pages of their own (4 and 16 KiB).
        let (mut server, info) = Vchan::server(&mut g0, &mut e0, D7, 12, 14).expect("server");
        let child = run_child(
            "vchan",
            hv.path(),
            &info.ring_ref.0.to_string(),
            info.event_port,
        );
        vchan_pump(&mut server, &mut e0, 1, 2, 200_000);
        child_succeeded(child);
        server.close(&mut e0).expect("close");
    }
}
