//! Xen: the transports a service qube talks to its peers over, and the protocols on them.
//!
//! In a Qubes qube the client vifs are netback devices, the uplink is a netfront device,
//! and QubesDB comes from dom0 over a vchan. All of that rests on three hypervisor
//! services, each behind a trait here so that the protocols above them run unchanged on
//! real Xen and on this repository's emulation:
//!
//! | trait | Xen service | Linux device | emulation |
//! |---|---|---|---|
//! | [`GrantExport`] | grant table, granting side (`grant_table.h`) | `/dev/xen/gntalloc` | memfd pages registered with the emulated hypervisor |
//! | [`GrantImport`] | grant table, mapping side | `/dev/xen/gntdev` | the same memfd, passed over a Unix socket and mapped |
//! | [`EventChannels`] | event channels (`event_channel.h`) | `/dev/xen/evtchn` | an eventfd pair per bound channel |
//! | [`xenstore::Store`] | XenStore (`io/xs_wire.h`) | `/dev/xen/xenbus` | the in-repository XenStore server, same wire format |
//! | [`vchan::Vchan`] (a protocol on the rows above) | libxenvchan (`tools/libs/vchan`) | the grant and event devices above | the same, over the emulated grants and events |
//!
//! Memory shared with another domain is never a Rust reference: the peer writes it while we
//! read, so every access goes through [`SharedPages`], as a copy into our own memory (which
//! is then parsed: a hostile peer cannot change a request between our check and our use)
//! or as one atomic load or store of a ring index.
//!
//! The protocols over those services:
//!
//! | module | protocol |
//! |---|---|
//! | [`ring`] | the shared request/response ring of `io/ring.h`, front and back ends |
//! | [`netif`] | the netif TX/RX slot layouts of `io/netif.h`, and a packet's slots planned and assembled |
//! | [`netback`] | the back end of a netif queue (a client's vif): TX frames taken from the frontend's granted pages, RX frames copied into the buffers it posted |
//! | [`netfront`] | the front end of a netif queue (the uplink): ring and buffer pages granted to the backend, frames sent and received over them |
//! | [`qubesdb`] | QubesDB over vchan: a local daemon kept in step with dom0's, and dom0's side for tests |
//! | [`xenbus`] | the xenbus handshake of a netif device, backend and frontend: states, features, ring keys, close and reconnect |
//! | [`xs_wire`] | the XenStore wire format: header, message types, error names, payload syntax |
//! | [`xenstore`] | the [`xenstore::Store`] trait, its client over a socket or `/dev/xen/xenbus`, and the emulation's server |
//! | [`hotplug`] | the vif hotplug step (`vif-route-qubes`' part): a client vif's `backend/vif` keys checked, its interface brought up, `hotplug-status` = `connected` for netback |
//!
//! and the implementations of the traits:
//!
//! | module | implementation |
//! |---|---|
//! | [`mem`] | [`SharedPages`] as memory: our own heap, or a shared `mmap` (memfd, gntalloc, gntdev), accessed only as 32-bit atomics |
//! | [`emul`] | an emulated hypervisor: a broker process or thread keeping the grant and event tables, domains in separate processes sharing memfd pages and signalling with eventfds |
//! | [`linux`] | the Linux Xen devices `/dev/xen/gntalloc`, `/dev/xen/gntdev` and `/dev/xen/evtchn` (ioctls of the Linux uapi headers `xen/gntalloc.h`, `xen/gntdev.h`, `xen/evtchn.h`) |

pub mod device;
pub mod emul;
pub mod hotplug;
pub mod linux;
pub mod mem;
pub mod netback;
#[cfg(test)]
mod netback_fuzz;
pub mod netfront;
pub mod netif;
#[cfg(test)]
mod netif_tests;
pub mod ring;

pub mod qubesdb;
pub mod vchan;
pub mod xenbus;

pub mod xenstore;
pub mod xs_wire;

use std::fmt;
use std::io;
use std::os::fd::RawFd;

/// The size of a Xen page, the unit of every grant (`XC_PAGE_SIZE`).
pub const PAGE_SIZE: usize = 4096;

/// A domain id (`domid_t` in `xen.h`). dom0 is 0.
pub type DomId = u16;

/// A grant reference (`grant_ref_t` in `grant_table.h`): names one page that its owner
/// granted to one other domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrantRef(pub u32);

/// An event channel port (`evtchn_port_t` in `event_channel.h`), local to the domain
/// that holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Port(pub u32);

impl fmt::Display for GrantRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gref {}", self.0)
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "port {}", self.0)
    }
}

/// An access outside the shared pages: the offset and length asked for, and the size of
/// the mapping. Ring code checks what a peer gives it before it touches memory, so this
/// is a bug of ours or a value from the peer that was not checked; either way it is an
/// error, never a read outside the mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfRange {
    pub offset: usize,
    pub len: usize,
    pub size: usize,
}

impl fmt::Display for OutOfRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes at offset {} are outside the {}-byte shared mapping",
            self.len, self.offset, self.size
        )
    }
}

impl std::error::Error for OutOfRange {}

/// Pages shared with another domain (granted by us, or mapped from the peer's grant).
///
/// The peer may write them at any moment, so they are only ever accessed through these
/// methods: byte copies in and out, and 32-bit atomic loads and stores with the ordering
/// `io/ring.h` needs (`virt_rmb`/`virt_wmb`/`virt_mb`). Offsets are bytes from the start of
/// the first page; the pages of one mapping are contiguous.
pub trait SharedPages: Send + Sync + fmt::Debug {
    /// The mapping's size in bytes (a multiple of [`PAGE_SIZE`]).
    fn size(&self) -> usize;

    /// Copies `dst.len()` bytes at `offset` out of the shared pages.
    fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfRange>;

    /// Copies `src` into the shared pages at `offset`.
    fn write(&self, offset: usize, src: &[u8]) -> Result<(), OutOfRange>;

    /// A little-endian `u32` at `offset` (4-byte aligned), loaded with acquire ordering:
    /// what the peer wrote before it stored this value is visible after the load (the
    /// `virt_rmb` after reading a producer index).
    fn load_u32(&self, offset: usize) -> Result<u32, OutOfRange>;

    /// Stores a little-endian `u32` at `offset` (4-byte aligned) with release ordering:
    /// everything written before it is visible to a peer that loads it (the `virt_wmb`
    /// before publishing a producer index).
    fn store_u32(&self, offset: usize, value: u32) -> Result<(), OutOfRange>;

    /// Atomically ORs `bits` into the little-endian `u32` at `offset` (4-byte aligned), with
    /// sequentially consistent ordering (a full barrier, as `__sync_fetch_and_or` is), and
    /// returns the previous value.
    ///
    /// Where both ends update one word (vchan's notify bytes: one side sets bits, the other
    /// clears them), a load and a store would lose the peer's update, and a lost request bit
    /// is a lost wakeup. libxenvchan uses `__sync` builtins on the byte; these work on the
    /// aligned word that holds it, which is atomic against the peer's byte-wide operation on
    /// x86 and Arm alike (the word is one unit of coherence).
    fn fetch_or_u32(&self, offset: usize, bits: u32) -> Result<u32, OutOfRange>;

    /// Atomically ANDs `mask` into the little-endian `u32` at `offset` (4-byte aligned),
    /// sequentially consistent, and returns the previous value.
    fn fetch_and_u32(&self, offset: usize, mask: u32) -> Result<u32, OutOfRange>;

    /// A full barrier (`virt_mb`): the store of an event index before the re-check of the
    /// producer that closes the lost-wakeup race in `RING_FINAL_CHECK_FOR_REQUESTS`.
    fn fence(&self) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    /// Fills `len` bytes at `offset` with zeros (a page handed back to a pool must not
    /// carry old data to the next peer that sees it).
    fn zero(&self, offset: usize, len: usize) -> Result<(), OutOfRange> {
        let zeros = [0u8; 256];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len());
            self.write(offset + done, &zeros[..n])?;
            done += n;
        }
        Ok(())
    }
}

/// The granting side of the grant table: a frontend owns every page it shares (its rings,
/// its TX data, its RX buffers, a vchan's ring pages) and grants each to the backend's
/// domain. Dropping the returned pages ends the grants' access
/// (`GNTTABOP_end_foreign_access`) and frees them.
pub trait GrantExport: fmt::Debug {
    type Pages: SharedPages;

    /// Allocates `count` zeroed, contiguous pages and grants each to `peer`, read-only
    /// unless `writable`. The references are in page order.
    fn grant(
        &mut self,
        peer: DomId,
        count: usize,
        writable: bool,
    ) -> io::Result<(Vec<GrantRef>, Self::Pages)>;
}

/// The mapping side of the grant table: a backend maps what its frontend granted
/// (`GNTTABOP_map_grant_ref`). Dropping the mapping unmaps it.
pub trait GrantImport: fmt::Debug {
    type Mapping: SharedPages;

    /// Maps the pages `peer` granted under `refs`, contiguously in that order; writable
    /// only if asked for and granted so (a read-only grant mapped writable is refused).
    fn map(&mut self, peer: DomId, refs: &[GrantRef], writable: bool) -> io::Result<Self::Mapping>;
}

/// A domain's event channels: one handle for all its ports, with one descriptor that
/// polls readable when any bound port has fired (as `/dev/xen/evtchn` behaves).
pub trait EventChannels: fmt::Debug {
    /// A new port that `remote` may bind to (`EVTCHNOP_alloc_unbound`); the frontend's
    /// side, its number written to XenStore for the backend.
    fn alloc_unbound(&mut self, remote: DomId) -> io::Result<Port>;

    /// Binds a local port to `remote`'s unbound `remote_port`
    /// (`EVTCHNOP_bind_interdomain`); the backend's side.
    fn bind_interdomain(&mut self, remote: DomId, remote_port: Port) -> io::Result<Port>;

    /// Signals the peer of a local port (`EVTCHNOP_send`).
    fn notify(&mut self, port: Port) -> io::Result<()>;

    /// A port that fired since the last call, if any; never blocks. A fired port is masked
    /// until [`EventChannels::unmask`], as with `/dev/xen/evtchn`, so a flooding peer costs
    /// one wakeup per unmask, not one per notification.
    fn pending(&mut self) -> io::Result<Option<Port>>;

    /// Lets a fired port fire again.
    fn unmask(&mut self, port: Port) -> io::Result<()>;

    /// Closes a local port (`EVTCHNOP_close`); the peer's notifications go nowhere after.
    fn unbind(&mut self, port: Port) -> io::Result<()>;

    /// Readable when [`EventChannels::pending`] has something, for `poll(2)`.
    fn raw_fd(&self) -> RawFd;
}
