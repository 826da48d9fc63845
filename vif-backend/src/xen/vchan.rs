//! vchan: a pair of byte streams between two domains over granted pages and one event
//! channel, byte-compatible with Xen's libxenvchan.
//!
//! In Qubes, QubesDB reaches a qube from dom0 over a vchan on port [`QUBESDB_PORT`] (the
//! qube is the client, dom0 the server) and qrexec uses port [`QREXEC_PORT`]. Whatever is
//! on the other end is the C library (`tools/libs/vchan` in xen-project/xen, wrapped by
//! Qubes' `libvchan`), so the shared page here is laid out and driven exactly as that
//! library does it; the OCaml implementation in mirage/ocaml-vchan (`lib/vchan.ml`,
//! `lib/vchan_wire.ml`) is a second, independent reading of the same protocol.
//!
//! # The shared page
//!
//! The server grants one page, `struct vchan_interface` from xen-project/xen
//! `xen/include/public/io/libxenvchan.h` (see [`wire`] for every offset):
//!
//! ```text
//!  0  left.cons   u32   client -> server ring ("left"): the server reads it
//!  4  left.prod   u32
//!  8  right.cons  u32   server -> client ring ("right"): the client reads it
//! 12  right.prod  u32
//! 16  left_order  u16   ring sizes, 1 << order bytes
//! 18  right_order u16
//! 20  cli_live    u8    0 closed, 1 connected, 2 not yet connected (set by the server)
//! 21  srv_live    u8    0 closed, 1 live
//! 22  cli_notify  u8    what the *server* asked the client to notify it about
//! 23  srv_notify  u8    what the *client* asked the server to notify it about
//! 24  grants[]    u32   grant refs of rings that live outside this page, left's first
//! ```
//!
//! A ring of order 10 lives inside the shared page at offset 1024, one of order 11 at
//! offset 2048; larger rings (orders 12 to 20) are separately granted pages whose
//! references are listed in `grants[]` (`init_gnt_srv` and `init_gnt_cli` in
//! `tools/libs/vchan/init.c`). The server then publishes the shared page's grant and its
//! event channel in XenStore under [`xenstore_dir`] (`init_xs_srv`); that part is the
//! caller's, since XenStore is a separate module: [`Vchan::server`] returns the values in
//! [`ServerInfo`].
//!
//! # Notifications
//!
//! Each side sets bits in the *peer's* notify byte to ask for an event
//! ([`wire::NOTIFY_WRITE`]: "tell me when you have written", [`wire::NOTIFY_READ`]: "tell
//! me when you have read"), and after writing or reading clears the matching bit in *its
//! own* byte and signals the event channel only if the bit was set (`request_notify` and
//! `send_notify` in `tools/libs/vchan/io.c`). So a reader that is not waiting costs the
//! writer no system call, and a reader that is waiting is told exactly once. A side asks
//! only when it is about to run dry: [`Vchan::recv`] asks for `NOTIFY_WRITE` when the ring
//! holds less than it wanted, [`Vchan::send`] asks for `NOTIFY_READ` when the data does not
//! all fit, and both re-read the index after asking, which closes the race with a peer
//! that moved it in between. The rule for a poll loop follows: keep calling `recv` until
//! it returns 0 and `send` until it takes less than offered, and an event will come when
//! there is more to do.
//!
//! Both sides change both notify bytes (one sets bits, the other clears them), so the
//! updates must be atomic read-modify-writes (libxenvchan uses `__sync_or_and_fetch` and
//! `__sync_fetch_and_and`), which [`SharedPages::fetch_or_u32`] and
//! [`SharedPages::fetch_and_u32`] provide.
//!
//! # A hostile peer
//!
//! Everything in shared memory may change at any moment. Our own indices are kept in
//! private copies (the peer writing them only confuses itself), the peer's indices are
//! loaded once per operation and checked (`prod - cons` never above the ring size, else
//! the channel is [`VchanError::Broken`] for good, where libxenvchan silently locks the
//! ring up), positions are masked to the ring before any copy, and the ring orders and
//! the grant list are checked once at setup (and, being copied then, cannot change after).

use std::fmt;
use std::io;

use super::{
    DomId, EventChannels, GrantExport, GrantImport, GrantRef, OutOfRange, Port, SharedPages,
    PAGE_SIZE,
};

/// The vchan port QubesDB is served on (dom0 is the server, each qube a client).
pub const QUBESDB_PORT: u32 = 111;

/// The vchan port of qrexec's control connection.
pub const QREXEC_PORT: u32 = 512;

/// The XenStore key, under [`xenstore_dir`], holding the shared page's grant reference in
/// decimal.
pub const RING_REF_KEY: &str = "ring-ref";

/// The XenStore key, under [`xenstore_dir`], holding the server's event channel port in
/// decimal.
pub const EVENT_CHANNEL_KEY: &str = "event-channel";

/// The XenStore directory a vchan server publishes its [`RING_REF_KEY`] and
/// [`EVENT_CHANNEL_KEY`] in: `/local/domain/<server>/data/vchan/<client>/<port>`
/// (the path documented in xen-project/xen `tools/include/libxenvchan.h`, and the one
/// Qubes' `libvchan_server_init` builds).
///
/// libxenvchan writes both keys in one transaction, each with the permissions
/// [`xenstore_permissions`] gives, and removes the directory when the server closes
/// (`init_xs_srv` and `close_xs_srv` in `tools/libs/vchan/init.c`).
pub fn xenstore_dir(server: DomId, client: DomId, port: u32) -> String {
    format!("/local/domain/{server}/data/vchan/{client}/{port}")
}

/// The permissions of both XenStore keys, in the wire form of `XS_SET_PERMS`: the server
/// owns them and others get nothing (`n<server>`), the client may read (`r<client>`), as
/// `init_xs_srv` in xen-project/xen `tools/libs/vchan/init.c` sets them.
pub fn xenstore_permissions(server: DomId, client: DomId) -> [String; 2] {
    [format!("n{server}"), format!("r{client}")]
}

/// The shared page's layout (`struct vchan_interface` in xen-project/xen
/// `xen/include/public/io/libxenvchan.h`) as byte offsets, the ring placement rules of
/// `tools/libs/vchan/init.c`, and accessors that go through [`SharedPages`].
pub mod wire {
    use super::{GrantRef, OutOfRange, SharedPages, VchanError, PAGE_SIZE};

    /// `struct ring_shared left`: the client-to-server ring's indices.
    pub const LEFT: usize = 0;
    /// `struct ring_shared right`: the server-to-client ring's indices.
    pub const RIGHT: usize = 8;
    /// `ring_shared.cons`, from the start of a `ring_shared`: bytes consumed so far.
    pub const CONS: usize = 0;
    /// `ring_shared.prod`, from the start of a `ring_shared`: bytes produced so far.
    pub const PROD: usize = 4;
    /// `uint16_t left_order`.
    pub const LEFT_ORDER: usize = 16;
    /// `uint16_t right_order`.
    pub const RIGHT_ORDER: usize = 18;
    /// `uint8_t cli_live`: 0 closed, 1 connected, 2 the server waits for a client.
    pub const CLI_LIVE: usize = 20;
    /// `uint8_t srv_live`: 0 closed, 1 live.
    pub const SRV_LIVE: usize = 21;
    /// `uint8_t cli_notify`: bits the server set, asking the client to notify.
    pub const CLI_NOTIFY: usize = 22;
    /// `uint8_t srv_notify`: bits the client set, asking the server to notify.
    pub const SRV_NOTIFY: usize = 23;
    /// `uint32_t grants[]`: refs of the out-of-page rings, all of left's pages then right's.
    pub const GRANTS: usize = 24;
    /// The size of the fixed header, up to `grants[]`.
    pub const HEADER_LEN: usize = GRANTS;
    /// The aligned word holding the live and notify bytes, for the atomic operations.
    pub const FLAGS_WORD: usize = 20;

    /// `VCHAN_NOTIFY_WRITE`: "notify me when you have written" (a reader's request).
    pub const NOTIFY_WRITE: u8 = 0x1;
    /// `VCHAN_NOTIFY_READ`: "notify me when you have read" (a writer's request).
    pub const NOTIFY_READ: u8 = 0x2;

    /// `cli_live` while the server waits for its client (`init_gnt_srv`).
    pub const LIVE_WAITING: u8 = 2;
    /// A live byte of a connected side.
    pub const LIVE: u8 = 1;
    /// A live byte of a side that closed (or, on real Xen, died: the grant's unmap
    /// notification clears it).
    pub const DEAD: u8 = 0;

    /// `SMALL_RING_SHIFT`: the smallest ring, which lives in the shared page.
    pub const MIN_ORDER: u8 = 10;
    /// `MAX_RING_SHIFT`: beyond this the grant list no longer fits the shared page.
    pub const MAX_ORDER: u8 = 20;
    /// Where an order-10 ring lives in the shared page (`SMALL_RING_OFFSET`).
    pub const SMALL_RING_OFFSET: usize = 1024;
    /// Where an order-11 ring lives in the shared page (`LARGE_RING_OFFSET`).
    pub const LARGE_RING_OFFSET: usize = 2048;
    /// `PAGE_SHIFT`: rings of this order and up are pages of their own.
    pub const PAGE_SHIFT: u8 = 12;

    /// Where a ring of `order` lives: `Some(offset)` in the shared page for orders 10 and
    /// 11, `None` for a ring in pages of its own.
    pub fn in_page_offset(order: u8) -> Option<usize> {
        match order {
            10 => Some(SMALL_RING_OFFSET),
            11 => Some(LARGE_RING_OFFSET),
            _ => None,
        }
    }

    /// How many pages of its own a ring of `order` takes (0 for an in-page ring).
    pub fn ring_pages(order: u8) -> usize {
        if order >= PAGE_SHIFT {
            1usize << (order - PAGE_SHIFT)
        } else {
            0
        }
    }

    /// Checks a pair of ring orders as libxenvchan's client does (`init_gnt_cli`), plus
    /// the check it leaves out, and returns the number of entries of `grants[]`.
    ///
    /// Each order must be in 10..=20; the two may not be the same in-page order (both
    /// rings would be the same bytes); and `grants[]` must end before any in-page ring
    /// starts. libxenvchan's own server never breaks the last rule (it puts a ring of order
    /// 10 only beside one of order 11), but a hostile one could pick 10 and 20, whose 256
    /// grants run into the ring at 1024: refused, so that the ring's data can never be read
    /// as grant references or the other way round.
    pub fn check_orders(left: u16, right: u16) -> Result<usize, VchanError> {
        let order = |o: u16| match u8::try_from(o) {
            Ok(o) if (MIN_ORDER..=MAX_ORDER).contains(&o) => Ok(o),
            _ => Err(VchanError::BadOrder { order: o }),
        };
        let (left, right) = (order(left)?, order(right)?);
        if left == right && left < PAGE_SHIFT {
            return Err(VchanError::SameInPageRing { order: left });
        }
        let grants = ring_pages(left) + ring_pages(right);
        let end = GRANTS + 4 * grants;
        for ring in [in_page_offset(left), in_page_offset(right)]
            .into_iter()
            .flatten()
        {
            if end > ring {
                return Err(VchanError::GrantsOverlapRing {
                    grants_end: end,
                    ring_offset: ring,
                });
            }
        }
        if end > PAGE_SIZE {
            return Err(VchanError::GrantsOverlapRing {
                grants_end: end,
                ring_offset: PAGE_SIZE,
            });
        }
        Ok(grants)
    }

    /// The ring orders libxenvchan's server picks for rings of at least `left_min` and
    /// `right_min` bytes (`libxenvchan_server_init`): both in the shared page when they fit
    /// 1024 and 2048 bytes (either way round), else one in-page order-11 ring where that is
    /// enough, else the smallest power of two from a page up. `None` above 1 MiB.
    pub fn orders_for(left_min: usize, right_min: usize) -> Option<(u8, u8)> {
        const SMALL: usize = 1 << MIN_ORDER;
        const LARGE: usize = 1 << (MIN_ORDER + 1);
        if left_min > 1 << MAX_ORDER || right_min > 1 << MAX_ORDER {
            return None;
        }
        // `min_order` in init.c: a page at least, so a large request gets its own pages.
        let min_order = |size: usize| {
            let mut order = PAGE_SHIFT;
            while size > 1usize << order {
                order += 1;
            }
            order
        };
        let (mut left, mut right) = (min_order(left_min), min_order(right_min));
        if left_min <= SMALL && right_min <= LARGE {
            (left, right) = (MIN_ORDER, MIN_ORDER + 1);
        } else if left_min <= LARGE && right_min <= SMALL {
            (left, right) = (MIN_ORDER + 1, MIN_ORDER);
        } else if left_min <= LARGE {
            left = MIN_ORDER + 1;
        } else if right_min <= LARGE {
            right = MIN_ORDER + 1;
        }
        Some((left, right))
    }

    /// The fixed header of the shared page, as values.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Header {
        pub left_cons: u32,
        pub left_prod: u32,
        pub right_cons: u32,
        pub right_prod: u32,
        pub left_order: u16,
        pub right_order: u16,
        pub cli_live: u8,
        pub srv_live: u8,
        pub cli_notify: u8,
        pub srv_notify: u8,
    }

    impl Header {
        /// The header's bytes as they sit in the page (little-endian, as on every
        /// architecture Xen runs vchan on).
        pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
            let mut b = [0u8; HEADER_LEN];
            b[LEFT + CONS..][..4].copy_from_slice(&self.left_cons.to_le_bytes());
            b[LEFT + PROD..][..4].copy_from_slice(&self.left_prod.to_le_bytes());
            b[RIGHT + CONS..][..4].copy_from_slice(&self.right_cons.to_le_bytes());
            b[RIGHT + PROD..][..4].copy_from_slice(&self.right_prod.to_le_bytes());
            b[LEFT_ORDER..][..2].copy_from_slice(&self.left_order.to_le_bytes());
            b[RIGHT_ORDER..][..2].copy_from_slice(&self.right_order.to_le_bytes());
            b[CLI_LIVE] = self.cli_live;
            b[SRV_LIVE] = self.srv_live;
            b[CLI_NOTIFY] = self.cli_notify;
            b[SRV_NOTIFY] = self.srv_notify;
            b
        }

        /// The header from its bytes.
        pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Self {
            let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
            let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
            Self {
                left_cons: u32_at(LEFT + CONS),
                left_prod: u32_at(LEFT + PROD),
                right_cons: u32_at(RIGHT + CONS),
                right_prod: u32_at(RIGHT + PROD),
                left_order: u16_at(LEFT_ORDER),
                right_order: u16_at(RIGHT_ORDER),
                cli_live: b[CLI_LIVE],
                srv_live: b[SRV_LIVE],
                cli_notify: b[CLI_NOTIFY],
                srv_notify: b[SRV_NOTIFY],
            }
        }

        /// Copies the header out of the shared page: one snapshot, parsed afterwards, so
        /// the fields are consistent with each other whatever the peer does meanwhile.
        pub fn read(page: &impl SharedPages) -> Result<Self, OutOfRange> {
            let mut b = [0u8; HEADER_LEN];
            page.read(0, &mut b)?;
            Ok(Self::from_bytes(&b))
        }

        /// Writes the header into the shared page.
        pub fn write(&self, page: &impl SharedPages) -> Result<(), OutOfRange> {
            page.write(0, &self.to_bytes())
        }
    }

    /// Reads `count` entries of `grants[]`.
    pub fn read_grants(page: &impl SharedPages, count: usize) -> Result<Vec<GrantRef>, OutOfRange> {
        let mut raw = vec![0u8; 4 * count];
        page.read(GRANTS, &mut raw)?;
        Ok(raw
            .chunks_exact(4)
            .map(|c| GrantRef(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect())
    }

    /// Writes `grants` as `grants[]`.
    pub fn write_grants(page: &impl SharedPages, grants: &[GrantRef]) -> Result<(), OutOfRange> {
        let raw: Vec<u8> = grants.iter().flat_map(|g| g.0.to_le_bytes()).collect();
        page.write(GRANTS, &raw)
    }

    /// The shift of a byte of the flags word within the little-endian `u32`; only the four
    /// bytes of that word ([`CLI_LIVE`] to [`SRV_NOTIFY`]) have one.
    fn shift(byte_offset: usize) -> Result<u32, OutOfRange> {
        match byte_offset.checked_sub(FLAGS_WORD) {
            Some(i @ 0..=3) => Ok(8 * i as u32),
            _ => Err(OutOfRange {
                offset: byte_offset,
                len: 1,
                size: 4,
            }),
        }
    }

    /// One of the live or notify bytes, loaded with acquire ordering (as part of its word,
    /// since the trait loads words).
    pub fn load_flag(page: &impl SharedPages, byte_offset: usize) -> Result<u8, OutOfRange> {
        Ok((page.load_u32(FLAGS_WORD)? >> shift(byte_offset)?) as u8)
    }

    /// Stores one of the live or notify bytes as a one-byte copy, as libxenvchan's plain
    /// assignments do: a byte store leaves the other three bytes of the word, which the
    /// peer may be changing, alone.
    pub fn store_flag(
        page: &impl SharedPages,
        byte_offset: usize,
        value: u8,
    ) -> Result<(), OutOfRange> {
        shift(byte_offset)?;
        page.write(byte_offset, &[value])
    }

    /// Atomically sets `bits` in one of the notify bytes (`__sync_or_and_fetch`).
    pub fn set_bits(
        page: &impl SharedPages,
        byte_offset: usize,
        bits: u8,
    ) -> Result<u8, OutOfRange> {
        let shift = shift(byte_offset)?;
        let old = page.fetch_or_u32(FLAGS_WORD, u32::from(bits) << shift)?;
        Ok((old >> shift) as u8)
    }

    /// Atomically clears `bits` in one of the notify bytes and returns the byte as it was
    /// (`__sync_fetch_and_and` with `~bits`).
    pub fn clear_bits(
        page: &impl SharedPages,
        byte_offset: usize,
        bits: u8,
    ) -> Result<u8, OutOfRange> {
        let shift = shift(byte_offset)?;
        let old = page.fetch_and_u32(FLAGS_WORD, !(u32::from(bits) << shift))?;
        Ok((old >> shift) as u8)
    }
}

/// Which ring a [`VchanError::Broken`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The ring we read (the peer produces).
    Read,
    /// The ring we write (the peer consumes).
    Write,
}

/// What a peer did that broke the channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The indices of a ring claim more data than it can hold: the peer wrote a producer
    /// or consumer index it could not legitimately have reached.
    Indices {
        ring: Direction,
        prod: u32,
        cons: u32,
        size: u32,
    },
    /// An access to the shared pages failed (a mapping smaller than promised).
    Memory(OutOfRange),
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Indices { ring, prod, cons, size } => write!(
                f,
                "the {} ring's indices (prod {prod}, cons {cons}) claim {} bytes in a {size}-byte ring",
                match ring {
                    Direction::Read => "read",
                    Direction::Write => "write",
                },
                prod.wrapping_sub(*cons)
            ),
            Fault::Memory(e) => write!(f, "{e}"),
        }
    }
}

/// Why a vchan could not be set up or used.
#[derive(Debug)]
pub enum VchanError {
    /// The peer closed (and, for reads, everything it sent has been read), or we did.
    Closed,
    /// The peer broke the protocol; the channel is unusable from now on, and every later
    /// call says so again.
    Broken(Fault),
    /// A ring order outside 10..=20 (`SMALL_RING_SHIFT` to `MAX_RING_SHIFT`).
    BadOrder { order: u16 },
    /// Both rings have the same in-page order, so they would be the same bytes.
    SameInPageRing { order: u8 },
    /// The grant list of these orders would run into an in-page ring (or off the page).
    GrantsOverlapRing {
        grants_end: usize,
        ring_offset: usize,
    },
    /// A grant reference or event port of 0, which libxenvchan's client refuses (XenStore
    /// held no number, or the server failed to set up).
    Unset,
    /// A mapping or grant smaller than the ring it is to hold (a transport bug).
    MappingTooSmall { size: usize, needed: usize },
    /// The grant table or the event channels failed.
    Io(io::Error),
}

impl fmt::Display for VchanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VchanError::Closed => write!(f, "the vchan is closed"),
            VchanError::Broken(fault) => write!(f, "the vchan peer broke the protocol: {fault}"),
            VchanError::BadOrder { order } => {
                write!(
                    f,
                    "vchan ring order {order} is outside {}..={}",
                    wire::MIN_ORDER,
                    wire::MAX_ORDER
                )
            }
            VchanError::SameInPageRing { order } => {
                write!(
                    f,
                    "both vchan rings have order {order}, which would put them on the same bytes"
                )
            }
            VchanError::GrantsOverlapRing {
                grants_end,
                ring_offset,
            } => write!(
                f,
                "the vchan grant list ends at byte {grants_end}, past a ring at byte {ring_offset}"
            ),
            VchanError::Unset => write!(f, "vchan grant reference or event channel 0"),
            VchanError::MappingTooSmall { size, needed } => {
                write!(
                    f,
                    "a vchan mapping of {size} bytes where {needed} are needed"
                )
            }
            VchanError::Io(e) => write!(f, "vchan: {e}"),
        }
    }
}

impl std::error::Error for VchanError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            VchanError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for VchanError {
    fn from(e: io::Error) -> Self {
        VchanError::Io(e)
    }
}

impl From<OutOfRange> for VchanError {
    fn from(e: OutOfRange) -> Self {
        VchanError::Broken(Fault::Memory(e))
    }
}

impl From<VchanError> for io::Error {
    fn from(e: VchanError) -> Self {
        match e {
            VchanError::Io(e) => e,
            VchanError::Closed => io::Error::new(io::ErrorKind::BrokenPipe, e),
            VchanError::Broken(_) => io::Error::new(io::ErrorKind::InvalidData, e),
            _ => io::Error::new(io::ErrorKind::InvalidInput, e),
        }
    }
}

/// What the server publishes in XenStore under [`xenstore_dir`] for its client to find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerInfo {
    /// The shared page's grant, written in decimal as [`RING_REF_KEY`].
    pub ring_ref: GrantRef,
    /// The server's unbound event port, written in decimal as [`EVENT_CHANNEL_KEY`].
    pub event_port: Port,
}

/// Which end of the vchan this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Granted the pages; reads left, writes right.
    Server,
    /// Mapped them; writes left, reads right.
    Client,
}

/// The peer as the shared page shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerState {
    /// The server's view before its client has connected (`cli_live` 2).
    Waiting,
    /// Both ends are up.
    Connected,
    /// The peer closed or died (its live byte is 0), or the channel is broken.
    Closed,
}

/// The state of the channel after an event, from [`Vchan::handle_event`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Readiness {
    /// Bytes [`Vchan::recv`] can take now.
    pub data_ready: usize,
    /// Bytes [`Vchan::send`] can put now.
    pub buffer_space: usize,
    /// The peer's state.
    pub peer: PeerState,
}

/// One ring: where its bytes are, how large it is, and where its indices are.
#[derive(Debug)]
struct Ring<P> {
    /// The ring's own pages, or `None` for a ring inside the shared page.
    pages: Option<P>,
    /// The ring's first byte in `pages` (or in the shared page).
    base: usize,
    /// The ring holds `1 << order` bytes. Our copy: the one in the page can change.
    order: u8,
    /// The `ring_shared` holding the ring's indices ([`wire::LEFT`] or [`wire::RIGHT`]).
    indices: usize,
}

impl<P> Ring<P> {
    fn size(&self) -> u32 {
        1u32 << self.order
    }
}

/// One end of a vchan: two rings of bytes, one each way, over pages of type `P` (granted
/// by the server, mapped by the client) and one event channel.
///
/// Non-blocking throughout: [`Vchan::send`] and [`Vchan::recv`] move what they can and
/// return, and the event channel ([`Vchan::port`], on the domain's [`EventChannels`]) says
/// when to call them again; pass its firing to [`Vchan::handle_event`]. The event channel
/// handle is passed into each call that may notify, since one handle serves every
/// channel of the domain.
#[derive(Debug)]
pub struct Vchan<P: SharedPages> {
    role: Role,
    /// The shared page (`struct vchan_interface`).
    shared: P,
    read: Ring<P>,
    write: Ring<P>,
    /// Our event port.
    port: Port,
    /// Our consumer index on the read ring, kept privately: the copy in the page is for the
    /// peer, which could otherwise make us re-read or skip data by changing it.
    rd_cons: u32,
    /// Our producer index on the write ring, kept privately likewise.
    wr_prod: u32,
    /// Set for good when the peer breaks the protocol.
    broken: Option<Fault>,
    /// Set once we have closed; the live byte in the page is 0 from then on.
    closed: bool,
}

impl<P: SharedPages> Vchan<P> {
    /// Sets up the server end towards client domain `peer`, with a ring of `1 << left_order`
    /// bytes from the client and one of `1 << right_order` bytes to it, as
    /// `libxenvchan_server_init` in xen-project/xen `tools/libs/vchan/init.c` does: an
    /// unbound event port for `peer`, one granted page initialised as `init_gnt_srv` does
    /// (zeroed, the orders, `cli_live` 2, `srv_live` 1, `cli_notify` = [`wire::NOTIFY_WRITE`]
    /// so that the client's first data wakes us), and for orders 12 and up the ring's own
    /// granted pages, listed in `grants[]`, left's first.
    ///
    /// [`wire::orders_for`] turns minimum sizes into orders as libxenvchan does. The caller
    /// publishes the returned [`ServerInfo`] in XenStore under [`xenstore_dir`]; the client
    /// announces itself with an event, after which [`Vchan::state`] is
    /// [`PeerState::Connected`]. Data sent before that waits in the ring.
    ///
    /// Unlike libxenvchan, the right ring's pages (which the client only reads, and maps
    /// read-only) are granted read-only: the client cannot scribble on what we send.
    pub fn server<G, E>(
        grants: &mut G,
        events: &mut E,
        peer: DomId,
        left_order: u8,
        right_order: u8,
    ) -> Result<(Self, ServerInfo), VchanError>
    where
        G: GrantExport<Pages = P>,
        E: EventChannels,
    {
        wire::check_orders(u16::from(left_order), u16::from(right_order))?;
        // The event port first, as init.c does: it is part of what the client needs.
        let port = events.alloc_unbound(peer)?;
        match Self::server_pages(grants, events, peer, port, left_order, right_order) {
            Ok(done) => Ok(done),
            Err(e) => {
                // The pages, if any, went with the error; the port must go too.
                let _ = events.unbind(port);
                Err(e)
            }
        }
    }

    fn server_pages<G, E>(
        grants: &mut G,
        events: &mut E,
        peer: DomId,
        port: Port,
        left_order: u8,
        right_order: u8,
    ) -> Result<(Self, ServerInfo), VchanError>
    where
        G: GrantExport<Pages = P>,
        E: EventChannels,
    {
        // init_evt_srv unmasks the new port straight away.
        events.unmask(port)?;
        let (refs, shared) = grants.grant(peer, 1, true)?;
        let ring_ref = *refs.first().ok_or(VchanError::MappingTooSmall {
            size: 0,
            needed: PAGE_SIZE,
        })?;
        if shared.size() < PAGE_SIZE {
            return Err(VchanError::MappingTooSmall {
                size: shared.size(),
                needed: PAGE_SIZE,
            });
        }
        // memset(ring, 0, PAGE_SIZE): a grant comes zeroed, but this costs nothing and does
        // not rely on it.
        shared.zero(0, PAGE_SIZE)?;

        let mut listed = Vec::new();
        let mut ring = |order: u8, indices: usize, writable: bool| -> Result<Ring<P>, VchanError> {
            match wire::in_page_offset(order) {
                Some(base) => Ok(Ring {
                    pages: None,
                    base,
                    order,
                    indices,
                }),
                None => {
                    let (refs, pages) = grants.grant(peer, wire::ring_pages(order), writable)?;
                    let needed = 1usize << order;
                    if pages.size() < needed || refs.len() != wire::ring_pages(order) {
                        return Err(VchanError::MappingTooSmall {
                            size: pages.size(),
                            needed,
                        });
                    }
                    listed.extend(refs);
                    Ok(Ring {
                        pages: Some(pages),
                        base: 0,
                        order,
                        indices,
                    })
                }
            }
        };
        // The client writes left and only reads right.
        let read = ring(left_order, wire::LEFT, true)?;
        let write = ring(right_order, wire::RIGHT, false)?;

        wire::Header {
            left_order: u16::from(left_order),
            right_order: u16::from(right_order),
            cli_live: wire::LIVE_WAITING,
            srv_live: wire::LIVE,
            cli_notify: wire::NOTIFY_WRITE,
            ..wire::Header::default()
        }
        .write(&shared)?;
        wire::write_grants(&shared, &listed)?;

        let vchan = Vchan {
            role: Role::Server,
            shared,
            read,
            write,
            port,
            rd_cons: 0,
            wr_prod: 0,
            broken: None,
            closed: false,
        };
        Ok((
            vchan,
            ServerInfo {
                ring_ref,
                event_port: port,
            },
        ))
    }

    /// Connects the client end to the vchan that domain `server` published as `ring_ref`
    /// and `event_port` (read from XenStore under [`xenstore_dir`]), as
    /// `libxenvchan_client_init` in xen-project/xen `tools/libs/vchan/init.c` does: binds
    /// the event port, maps the shared page, checks the orders ([`wire::check_orders`]),
    /// maps the rings that have pages of their own (the one we write writable, the one we
    /// read read-only), sets `cli_live` to 1 and `srv_notify` to [`wire::NOTIFY_WRITE`]
    /// (so the server's first data wakes us), and notifies the server.
    ///
    /// The indices already in the page are taken as they are, so a client can reconnect to
    /// a server that is still up (libxenvchan allows it; it is on the caller to make sure
    /// only one client is connected at a time).
    pub fn client<I, E>(
        imports: &mut I,
        events: &mut E,
        server: DomId,
        ring_ref: GrantRef,
        event_port: Port,
    ) -> Result<Self, VchanError>
    where
        I: GrantImport<Mapping = P>,
        E: EventChannels,
    {
        if ring_ref.0 == 0 || event_port.0 == 0 {
            return Err(VchanError::Unset);
        }
        let port = events.bind_interdomain(server, event_port)?;
        match Self::client_pages(imports, events, server, ring_ref, port) {
            Ok(vchan) => Ok(vchan),
            Err(e) => {
                let _ = events.unbind(port);
                Err(e)
            }
        }
    }

    fn client_pages<I, E>(
        imports: &mut I,
        events: &mut E,
        server: DomId,
        ring_ref: GrantRef,
        port: Port,
    ) -> Result<Self, VchanError>
    where
        I: GrantImport<Mapping = P>,
        E: EventChannels,
    {
        events.unmask(port)?;
        let shared = imports.map(server, &[ring_ref], true)?;
        if shared.size() < PAGE_SIZE {
            return Err(VchanError::MappingTooSmall {
                size: shared.size(),
                needed: PAGE_SIZE,
            });
        }
        // One snapshot of the header: the orders are checked and used from this copy only.
        let header = wire::Header::read(&shared)?;
        let count = wire::check_orders(header.left_order, header.right_order)?;
        let grants = wire::read_grants(&shared, count)?;
        // check_orders accepted them, so they are 10..=20.
        let left_order = header.left_order as u8;
        let right_order = header.right_order as u8;

        let mut next = grants.as_slice();
        let mut ring = |order: u8, indices: usize, writable: bool| -> Result<Ring<P>, VchanError> {
            match wire::in_page_offset(order) {
                Some(base) => Ok(Ring {
                    pages: None,
                    base,
                    order,
                    indices,
                }),
                None => {
                    let (mine, rest) = next.split_at(wire::ring_pages(order).min(next.len()));
                    next = rest;
                    let pages = imports.map(server, mine, writable)?;
                    let needed = 1usize << order;
                    if pages.size() < needed {
                        return Err(VchanError::MappingTooSmall {
                            size: pages.size(),
                            needed,
                        });
                    }
                    Ok(Ring {
                        pages: Some(pages),
                        base: 0,
                        order,
                        indices,
                    })
                }
            }
        };
        // Left's pages come first in grants[], and left is the ring we write.
        let write = ring(left_order, wire::LEFT, true)?;
        let read = ring(right_order, wire::RIGHT, false)?;

        let vchan = Vchan {
            role: Role::Client,
            // Our own indices as the page has them: a fresh server's zeros, or where a
            // previous client left off. They are checked like any index at first use.
            wr_prod: header.left_prod,
            rd_cons: header.right_cons,
            shared,
            read,
            write,
            port,
            broken: None,
            closed: false,
        };
        wire::store_flag(&vchan.shared, wire::CLI_LIVE, wire::LIVE)?;
        wire::store_flag(&vchan.shared, wire::SRV_NOTIFY, wire::NOTIFY_WRITE)?;
        // Wake the server: it learns that we are connected.
        events.notify(vchan.port)?;
        Ok(vchan)
    }

    /// Which end this is.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Our event port: when the domain's [`EventChannels::pending`] returns it, call
    /// [`Vchan::handle_event`].
    pub fn port(&self) -> Port {
        self.port
    }

    /// The sizes of the ring we read and the ring we write, in bytes.
    pub fn ring_sizes(&self) -> (usize, usize) {
        (self.read.size() as usize, self.write.size() as usize)
    }

    /// The peer's fault, if it broke the channel.
    pub fn fault(&self) -> Option<Fault> {
        self.broken
    }

    /// The peer's live byte.
    fn peer_live(&self) -> Result<u8, OutOfRange> {
        let byte = match self.role {
            Role::Server => wire::CLI_LIVE,
            Role::Client => wire::SRV_LIVE,
        };
        wire::load_flag(&self.shared, byte)
    }

    /// The peer's state (`libxenvchan_is_open`: 0 closed, 2 waiting on the server, any
    /// other value open, as libxenvchan reads it). A broken channel reads as closed.
    pub fn state(&self) -> PeerState {
        if self.broken.is_some() || self.closed {
            return PeerState::Closed;
        }
        match self.peer_live() {
            Ok(wire::DEAD) | Err(_) => PeerState::Closed,
            Ok(wire::LIVE_WAITING) if self.role == Role::Server => PeerState::Waiting,
            Ok(_) => PeerState::Connected,
        }
    }

    /// Whether the peer is open, in libxenvchan's sense: connected, or (on the server) not
    /// yet connected. Data it sent before closing can still be read after this is false.
    pub fn is_open(&self) -> bool {
        self.state() != PeerState::Closed
    }

    /// The error for a channel we may no longer use.
    fn usable(&self) -> Result<(), VchanError> {
        match self.broken {
            Some(fault) => Err(VchanError::Broken(fault)),
            None if self.closed => Err(VchanError::Closed),
            None => Ok(()),
        }
    }

    /// Records a fault for good and returns it as the error.
    fn fail(&mut self, fault: Fault) -> VchanError {
        self.broken = Some(fault);
        VchanError::Broken(fault)
    }

    /// The notify byte holding the requests *we* make of the peer (the peer's name).
    fn request_byte(&self) -> usize {
        match self.role {
            Role::Server => wire::CLI_NOTIFY,
            Role::Client => wire::SRV_NOTIFY,
        }
    }

    /// The notify byte holding the requests the *peer* makes of us (our name).
    fn our_byte(&self) -> usize {
        match self.role {
            Role::Server => wire::SRV_NOTIFY,
            Role::Client => wire::CLI_NOTIFY,
        }
    }

    /// `request_notify`: asks the peer for an event on `bit`. The atomic operation is a full
    /// barrier, which orders the request before the caller's re-read of the index.
    fn request_notify(&mut self, bit: u8) -> Result<(), VchanError> {
        let byte = self.request_byte();
        if let Err(e) = wire::set_bits(&self.shared, byte, bit) {
            return Err(self.fail(Fault::Memory(e)));
        }
        self.shared.fence();
        Ok(())
    }

    /// `send_notify`: after publishing an index, signals the peer if it asked for `bit`,
    /// clearing the request so it is answered once. The fence orders our index store before
    /// the load of the request: otherwise a peer that asked and then re-read the old index
    /// could be missed by us and wait forever.
    fn send_notify(&mut self, events: &mut impl EventChannels, bit: u8) -> Result<(), VchanError> {
        self.shared.fence();
        let byte = self.our_byte();
        match wire::clear_bits(&self.shared, byte, bit) {
            Ok(prev) if prev & bit != 0 => Ok(events.notify(self.port)?),
            Ok(_) => Ok(()),
            Err(e) => Err(self.fail(Fault::Memory(e))),
        }
    }

    /// `raw_get_data_ready`, checked: the bytes in the read ring.
    fn raw_data_ready(&mut self) -> Result<u32, VchanError> {
        let prod = match self.shared.load_u32(self.read.indices + wire::PROD) {
            Ok(prod) => prod,
            Err(e) => return Err(self.fail(Fault::Memory(e))),
        };
        let ready = prod.wrapping_sub(self.rd_cons);
        let size = self.read.size();
        if ready > size {
            return Err(self.fail(Fault::Indices {
                ring: Direction::Read,
                prod,
                cons: self.rd_cons,
                size,
            }));
        }
        Ok(ready)
    }

    /// `raw_get_buffer_space`, checked: the free bytes in the write ring.
    fn raw_buffer_space(&mut self) -> Result<u32, VchanError> {
        let cons = match self.shared.load_u32(self.write.indices + wire::CONS) {
            Ok(cons) => cons,
            Err(e) => return Err(self.fail(Fault::Memory(e))),
        };
        let used = self.wr_prod.wrapping_sub(cons);
        let size = self.write.size();
        if used > size {
            return Err(self.fail(Fault::Indices {
                ring: Direction::Write,
                prod: self.wr_prod,
                cons,
                size,
            }));
        }
        Ok(size - used)
    }

    /// Bytes waiting to be read. Like `libxenvchan_data_ready`, also asks the peer to
    /// notify us when it writes more, since a caller asking is about to wait on the answer.
    pub fn data_ready(&mut self) -> Result<usize, VchanError> {
        self.usable()?;
        self.request_notify(wire::NOTIFY_WRITE)?;
        Ok(self.raw_data_ready()? as usize)
    }

    /// Bytes that can be sent now. Like `libxenvchan_buffer_space`, also asks the peer to
    /// notify us when it reads.
    pub fn buffer_space(&mut self) -> Result<usize, VchanError> {
        self.usable()?;
        self.request_notify(wire::NOTIFY_READ)?;
        Ok(self.raw_buffer_space()? as usize)
    }

    /// Sends as much of `data` as fits and returns how much that was
    /// (`libxenvchan_write`, non-blocking). When it is less than `data.len()` the peer has
    /// been asked to notify us when it reads, so an event will say when to try again.
    /// Fails with [`VchanError::Closed`] once the peer has closed (nobody would read it).
    pub fn send(
        &mut self,
        events: &mut impl EventChannels,
        data: &[u8],
    ) -> Result<usize, VchanError> {
        self.usable()?;
        if !self.is_open() {
            return Err(VchanError::Closed);
        }
        if data.is_empty() {
            return Ok(0);
        }
        // fast_get_buffer_space: ask for a READ event only when it will not all fit, then
        // look again in case the peer read in between.
        let mut space = self.raw_buffer_space()? as usize;
        if space < data.len() {
            self.request_notify(wire::NOTIFY_READ)?;
            space = self.raw_buffer_space()? as usize;
        }
        let n = space.min(data.len());
        if n == 0 {
            return Ok(0);
        }
        // The acquire load of the peer's cons orders our writes after it: we never write
        // bytes it may still be reading.
        if let Err(e) = self.copy_in(self.wr_prod, &data[..n]) {
            return Err(self.fail(Fault::Memory(e)));
        }
        // n is at most the ring size, a u32.
        self.wr_prod = self.wr_prod.wrapping_add(n as u32);
        // Release: the data is visible before the index that covers it.
        if let Err(e) = self
            .shared
            .store_u32(self.write.indices + wire::PROD, self.wr_prod)
        {
            return Err(self.fail(Fault::Memory(e)));
        }
        self.send_notify(events, wire::NOTIFY_WRITE)?;
        Ok(n)
    }

    /// Reads what is waiting, up to `buf.len()` bytes, and returns how much
    /// (`libxenvchan_read`, non-blocking). 0 means nothing is there now, and then the peer
    /// has been asked to notify us when it writes. Once the peer has closed and its data
    /// has all been read this fails with [`VchanError::Closed`] (the end of the stream).
    pub fn recv(
        &mut self,
        events: &mut impl EventChannels,
        buf: &mut [u8],
    ) -> Result<usize, VchanError> {
        self.usable()?;
        if buf.is_empty() {
            return Ok(0);
        }
        // fast_get_data_ready: ask for a WRITE event only when we are about to drain the
        // ring, then look again in case the peer wrote in between.
        let mut ready = self.raw_data_ready()? as usize;
        if ready < buf.len() {
            self.request_notify(wire::NOTIFY_WRITE)?;
            ready = self.raw_data_ready()? as usize;
        }
        if ready == 0 {
            return if self.is_open() {
                Ok(0)
            } else {
                Err(VchanError::Closed)
            };
        }
        let n = ready.min(buf.len());
        // The acquire load of the peer's prod orders our reads of the data after it.
        if let Err(e) = self.copy_out(self.rd_cons, &mut buf[..n]) {
            return Err(self.fail(Fault::Memory(e)));
        }
        self.rd_cons = self.rd_cons.wrapping_add(n as u32);
        // Release: our reads of the data are done before the peer may overwrite it.
        if let Err(e) = self
            .shared
            .store_u32(self.read.indices + wire::CONS, self.rd_cons)
        {
            return Err(self.fail(Fault::Memory(e)));
        }
        self.send_notify(events, wire::NOTIFY_READ)?;
        Ok(n)
    }

    /// To be called when the domain's event channels report [`Vchan::port`] pending:
    /// unmasks the port (`libxenvchan_wait`) and reports what can be done now, without
    /// asking the peer for anything (that happens in [`Vchan::recv`] and [`Vchan::send`]
    /// when they run dry, so an idle direction costs the peer no notifications).
    pub fn handle_event(
        &mut self,
        events: &mut impl EventChannels,
    ) -> Result<Readiness, VchanError> {
        self.usable()?;
        events.unmask(self.port)?;
        let data_ready = self.raw_data_ready()? as usize;
        let buffer_space = self.raw_buffer_space()? as usize;
        Ok(Readiness {
            data_ready,
            buffer_space,
            peer: self.state(),
        })
    }

    /// Closes this end (`libxenvchan_close`): our live byte to 0, then an event so the peer
    /// sees it, then the port is unbound and the pages released (ending the grants on the
    /// server, unmapping them on the client). The peer can still read what we sent.
    ///
    /// Always notifies, as libxenvchan does: the peer cannot have asked for this event.
    pub fn close(mut self, events: &mut impl EventChannels) -> Result<(), VchanError> {
        let live = self.own_live_byte();
        let stored = wire::store_flag(&self.shared, live, wire::DEAD);
        self.closed = true;
        let notified = events.notify(self.port);
        let unbound = events.unbind(self.port);
        stored?;
        notified?;
        unbound?;
        Ok(())
    }

    fn own_live_byte(&self) -> usize {
        match self.role {
            Role::Server => wire::SRV_LIVE,
            Role::Client => wire::CLI_LIVE,
        }
    }

    /// Copies `data` into the write ring at stream position `pos`, in two pieces when it
    /// wraps. `pos` is masked to the ring and `data` is at most the ring's size, so both
    /// pieces are inside the ring.
    fn copy_in(&self, pos: u32, data: &[u8]) -> Result<(), OutOfRange> {
        let ring = &self.write;
        let pages = ring.pages.as_ref().unwrap_or(&self.shared);
        let size = ring.size() as usize;
        let real = (pos as usize) & (size - 1);
        let first = (size - real).min(data.len());
        pages.write(ring.base + real, &data[..first])?;
        if first < data.len() {
            pages.write(ring.base, &data[first..])?;
        }
        Ok(())
    }

    /// Copies out of the read ring at stream position `pos`, in two pieces when it wraps.
    fn copy_out(&self, pos: u32, buf: &mut [u8]) -> Result<(), OutOfRange> {
        let ring = &self.read;
        let pages = ring.pages.as_ref().unwrap_or(&self.shared);
        let size = ring.size() as usize;
        let real = (pos as usize) & (size - 1);
        let first = (size - real).min(buf.len());
        let (head, tail) = buf.split_at_mut(first);
        pages.read(ring.base + real, head)?;
        if !tail.is_empty() {
            pages.read(ring.base, tail)?;
        }
        Ok(())
    }
}

impl<P: SharedPages> Drop for Vchan<P> {
    /// An end dropped without [`Vchan::close`] still marks itself dead, as the grant's
    /// unmap notification (`xengntshr_share_page_notify`, `xengnttab_map_grant_ref_notify`
    /// in init.c) does on real Xen for a process that dies; there is no event handle here
    /// to notify with, so the peer sees it at its next look.
    fn drop(&mut self) {
        if !self.closed {
            let _ = wire::store_flag(&self.shared, self.own_live_byte(), wire::DEAD);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Both ends in one process, over a safe in-process grant table and event channels.

    use super::*;
    use std::collections::{BTreeMap, HashMap};
    use std::os::fd::RawFd;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    const WORDS: usize = PAGE_SIZE / 4;

    type Page = Arc<Vec<AtomicU32>>;

    /// Pages as atomic words: contiguous in offset, each page shared by `Arc` between the
    /// granting and the mapping side.
    #[derive(Debug)]
    struct TestPages {
        pages: Vec<Page>,
        writable: bool,
    }

    impl TestPages {
        fn check(&self, offset: usize, len: usize) -> Result<(), OutOfRange> {
            let size = self.size();
            match offset.checked_add(len) {
                Some(end) if end <= size => Ok(()),
                _ => Err(OutOfRange { offset, len, size }),
            }
        }

        fn word(&self, index: usize) -> &AtomicU32 {
            &self.pages[index / WORDS][index % WORDS]
        }

        fn aligned(&self, offset: usize) -> Result<&AtomicU32, OutOfRange> {
            self.check(offset, 4)?;
            assert_eq!(offset % 4, 0, "unaligned atomic at {offset}");
            Ok(self.word(offset / 4))
        }

        fn assert_writable(&self) {
            assert!(self.writable, "write to a read-only mapping");
        }
    }

    impl SharedPages for TestPages {
        fn size(&self) -> usize {
            self.pages.len() * PAGE_SIZE
        }

        fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfRange> {
            self.check(offset, dst.len())?;
            let mut i = 0;
            while i < dst.len() {
                let at = offset + i;
                let word = self.word(at / 4).load(Ordering::Relaxed).to_le_bytes();
                let skip = at % 4;
                let n = (4 - skip).min(dst.len() - i);
                dst[i..i + n].copy_from_slice(&word[skip..skip + n]);
                i += n;
            }
            Ok(())
        }

        fn write(&self, offset: usize, src: &[u8]) -> Result<(), OutOfRange> {
            self.check(offset, src.len())?;
            self.assert_writable();
            let mut i = 0;
            while i < src.len() {
                let at = offset + i;
                let skip = at % 4;
                let n = (4 - skip).min(src.len() - i);
                let word = self.word(at / 4);
                if n == 4 {
                    word.store(
                        u32::from_le_bytes([src[i], src[i + 1], src[i + 2], src[i + 3]]),
                        Ordering::Relaxed,
                    );
                } else {
                    // A partial word must not clobber the bytes beside it, which the peer
                    // may be changing: a compare-and-swap loop.
                    let _ = word.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                        let mut b = old.to_le_bytes();
                        b[skip..skip + n].copy_from_slice(&src[i..i + n]);
                        Some(u32::from_le_bytes(b))
                    });
                }
                i += n;
            }
            Ok(())
        }

        fn load_u32(&self, offset: usize) -> Result<u32, OutOfRange> {
            Ok(self.aligned(offset)?.load(Ordering::Acquire))
        }

        fn store_u32(&self, offset: usize, value: u32) -> Result<(), OutOfRange> {
            self.assert_writable();
            self.aligned(offset)?.store(value, Ordering::Release);
            Ok(())
        }

        fn fetch_or_u32(&self, offset: usize, bits: u32) -> Result<u32, OutOfRange> {
            self.assert_writable();
            Ok(self.aligned(offset)?.fetch_or(bits, Ordering::SeqCst))
        }

        fn fetch_and_u32(&self, offset: usize, mask: u32) -> Result<u32, OutOfRange> {
            self.assert_writable();
            Ok(self.aligned(offset)?.fetch_and(mask, Ordering::SeqCst))
        }
    }

    #[derive(Debug)]
    struct Grant {
        owner: DomId,
        peer: DomId,
        writable: bool,
        page: Page,
    }

    #[derive(Debug)]
    struct Chan {
        remote: DomId,
        remote_port: Option<u32>,
        pending: bool,
        masked: bool,
    }

    /// The toy hypervisor: grants and event channels of every domain.
    #[derive(Debug, Default)]
    struct Hyper {
        next_gref: u32,
        grants: HashMap<u32, Grant>,
        next_port: u32,
        ports: BTreeMap<(DomId, u32), Chan>,
        /// Notifications sent, by sending domain and port.
        sent: HashMap<(DomId, u32), usize>,
    }

    /// One domain's handle on the toy hypervisor, for grants and events alike.
    #[derive(Debug, Clone)]
    struct Dom {
        id: DomId,
        hv: Arc<Mutex<Hyper>>,
    }

    impl Dom {
        fn hv(&self) -> std::sync::MutexGuard<'_, Hyper> {
            self.hv.lock().expect("hypervisor lock")
        }

        fn sent(&self, port: Port) -> usize {
            self.hv().sent.get(&(self.id, port.0)).copied().unwrap_or(0)
        }

        /// Takes the pending event of `port`, if any, without masking it (what a test
        /// asserting on events wants).
        fn take_pending(&self, port: Port) -> bool {
            let mut hv = self.hv();
            match hv.ports.get_mut(&(self.id, port.0)) {
                Some(chan) => std::mem::take(&mut chan.pending),
                None => false,
            }
        }
    }

    fn domains(a: DomId, b: DomId) -> (Dom, Dom) {
        let hv = Arc::new(Mutex::new(Hyper {
            next_gref: 8,
            next_port: 1,
            ..Hyper::default()
        }));
        (
            Dom {
                id: a,
                hv: hv.clone(),
            },
            Dom { id: b, hv },
        )
    }

    fn err(kind: io::ErrorKind, what: &str) -> io::Error {
        io::Error::new(kind, what.to_string())
    }

    impl GrantExport for Dom {
        type Pages = TestPages;

        fn grant(
            &mut self,
            peer: DomId,
            count: usize,
            writable: bool,
        ) -> io::Result<(Vec<GrantRef>, TestPages)> {
            let mut hv = self.hv();
            let mut refs = Vec::new();
            let mut pages = Vec::new();
            for _ in 0..count {
                let page: Page = Arc::new((0..WORDS).map(|_| AtomicU32::new(0)).collect());
                let gref = hv.next_gref;
                hv.next_gref += 1;
                hv.grants.insert(
                    gref,
                    Grant {
                        owner: self.id,
                        peer,
                        writable,
                        page: page.clone(),
                    },
                );
                refs.push(GrantRef(gref));
                pages.push(page);
            }
            // The granting side may always write its own pages.
            Ok((
                refs,
                TestPages {
                    pages,
                    writable: true,
                },
            ))
        }
    }

    impl GrantImport for Dom {
        type Mapping = TestPages;

        fn map(&mut self, peer: DomId, refs: &[GrantRef], writable: bool) -> io::Result<TestPages> {
            let hv = self.hv();
            let mut pages = Vec::new();
            for r in refs {
                let g = hv
                    .grants
                    .get(&r.0)
                    .ok_or_else(|| err(io::ErrorKind::NotFound, "no such grant"))?;
                if g.owner != peer || g.peer != self.id {
                    return Err(err(io::ErrorKind::PermissionDenied, "grant not for us"));
                }
                if writable && !g.writable {
                    return Err(err(io::ErrorKind::PermissionDenied, "read-only grant"));
                }
                pages.push(g.page.clone());
            }
            Ok(TestPages { pages, writable })
        }
    }

    impl EventChannels for Dom {
        fn alloc_unbound(&mut self, remote: DomId) -> io::Result<Port> {
            let mut hv = self.hv();
            let port = hv.next_port;
            hv.next_port += 1;
            hv.ports.insert(
                (self.id, port),
                Chan {
                    remote,
                    remote_port: None,
                    pending: false,
                    masked: false,
                },
            );
            Ok(Port(port))
        }

        fn bind_interdomain(&mut self, remote: DomId, remote_port: Port) -> io::Result<Port> {
            let mut hv = self.hv();
            let port = hv.next_port;
            match hv.ports.get_mut(&(remote, remote_port.0)) {
                Some(chan) if chan.remote == self.id && chan.remote_port.is_none() => {
                    chan.remote_port = Some(port);
                }
                _ => return Err(err(io::ErrorKind::NotFound, "no unbound port")),
            }
            hv.next_port += 1;
            hv.ports.insert(
                (self.id, port),
                Chan {
                    remote,
                    remote_port: Some(remote_port.0),
                    pending: false,
                    masked: false,
                },
            );
            Ok(Port(port))
        }

        fn notify(&mut self, port: Port) -> io::Result<()> {
            let mut hv = self.hv();
            let chan = hv
                .ports
                .get(&(self.id, port.0))
                .ok_or_else(|| err(io::ErrorKind::NotFound, "port"))?;
            let target = chan.remote_port.map(|p| (chan.remote, p));
            *hv.sent.entry((self.id, port.0)).or_default() += 1;
            if let Some(chan) = target.and_then(|t| hv.ports.get_mut(&t)) {
                chan.pending = true;
            }
            Ok(())
        }

        fn pending(&mut self) -> io::Result<Option<Port>> {
            let mut hv = self.hv();
            for ((dom, port), chan) in hv.ports.iter_mut() {
                if *dom == self.id && chan.pending && !chan.masked {
                    chan.pending = false;
                    chan.masked = true;
                    return Ok(Some(Port(*port)));
                }
            }
            Ok(None)
        }

        fn unmask(&mut self, port: Port) -> io::Result<()> {
            if let Some(chan) = self.hv().ports.get_mut(&(self.id, port.0)) {
                chan.masked = false;
            }
            Ok(())
        }

        fn unbind(&mut self, port: Port) -> io::Result<()> {
            self.hv().ports.remove(&(self.id, port.0));
            Ok(())
        }

        fn raw_fd(&self) -> RawFd {
            -1
        }
    }

    const SERVER: DomId = 0;
    const CLIENT: DomId = 7;

    /// A connected pair: (server, server's domain, client, client's domain, info).
    fn pair(left: u8, right: u8) -> (Vchan<TestPages>, Dom, Vchan<TestPages>, Dom, ServerInfo) {
        let (mut sd, mut cd) = domains(SERVER, CLIENT);
        let (server, info) =
            Vchan::server(&mut sd.clone(), &mut sd, CLIENT, left, right).expect("server");
        let client = Vchan::client(
            &mut cd.clone(),
            &mut cd,
            SERVER,
            info.ring_ref,
            info.event_port,
        )
        .expect("client");
        (server, sd, client, cd, info)
    }

    fn shared_page_bytes(cd: &Dom, info: &ServerInfo) -> Vec<u8> {
        let page = cd
            .clone()
            .map(SERVER, &[info.ring_ref], false)
            .expect("map");
        let mut bytes = vec![0u8; PAGE_SIZE];
        page.read(0, &mut bytes).expect("read");
        bytes
    }

    #[test]
    fn server_page_is_byte_exact_for_in_page_rings() {
        let (mut sd, cd) = domains(SERVER, CLIENT);
        let (server, info) =
            Vchan::server(&mut sd.clone(), &mut sd, CLIENT, 10, 11).expect("server");
        assert_eq!(server.ring_sizes(), (1024, 2048));
        let page = shared_page_bytes(&cd, &info);
        // What init_gnt_srv leaves: zeros, left_order 10 and right_order 11 as u16 LE at
        // 16 and 18, cli_live 2, srv_live 1, cli_notify NOTIFY_WRITE, srv_notify 0.
        let mut expected = vec![0u8; PAGE_SIZE];
        expected[16] = 10;
        expected[18] = 11;
        expected[20] = 2;
        expected[21] = 1;
        expected[22] = 0x1;
        assert_eq!(page, expected);
        assert_eq!(server.state(), PeerState::Waiting);
        assert!(server.is_open());
        assert_eq!(
            xenstore_dir(0, 7, QUBESDB_PORT),
            "/local/domain/0/data/vchan/7/111"
        );
        assert_eq!(
            xenstore_permissions(0, 7),
            ["n0".to_string(), "r7".to_string()]
        );
    }

    #[test]
    fn client_connect_sets_live_and_notify_and_wakes_server() {
        let (server, sd, client, cd, info) = pair(10, 11);
        let page = shared_page_bytes(&cd, &info);
        assert_eq!(&page[16..24], &[10, 0, 11, 0, 1, 1, 1, 1]);
        assert!(
            sd.take_pending(server.port()),
            "the server is woken by the connect"
        );
        assert_eq!(server.state(), PeerState::Connected);
        assert_eq!(client.state(), PeerState::Connected);
        assert_eq!(client.ring_sizes(), (2048, 1024));
    }

    #[test]
    fn header_round_trips_through_bytes() {
        let h = wire::Header {
            left_cons: 1,
            left_prod: 0x0203_0405,
            right_cons: 6,
            right_prod: 0xffff_fff0,
            left_order: 12,
            right_order: 20,
            cli_live: 2,
            srv_live: 1,
            cli_notify: 3,
            srv_notify: 2,
        };
        let b = h.to_bytes();
        assert_eq!(&b[4..8], &[5, 4, 3, 2]);
        assert_eq!(wire::Header::from_bytes(&b), h);
    }

    #[test]
    fn orders_are_checked() {
        assert!(matches!(
            wire::check_orders(9, 11),
            Err(VchanError::BadOrder { order: 9 })
        ));
        assert!(matches!(
            wire::check_orders(10, 21),
            Err(VchanError::BadOrder { order: 21 })
        ));
        assert!(matches!(
            wire::check_orders(10, 0x10a),
            Err(VchanError::BadOrder { .. })
        ));
        assert!(matches!(
            wire::check_orders(10, 10),
            Err(VchanError::SameInPageRing { order: 10 })
        ));
        assert!(matches!(
            wire::check_orders(11, 11),
            Err(VchanError::SameInPageRing { order: 11 })
        ));
        assert!(matches!(
            wire::check_orders(10, 20),
            Err(VchanError::GrantsOverlapRing { .. })
        ));
        assert_eq!(wire::check_orders(10, 11).expect("ok"), 0);
        assert_eq!(wire::check_orders(12, 12).expect("ok"), 2);
        assert_eq!(wire::check_orders(11, 20).expect("ok"), 256);
        assert_eq!(wire::check_orders(20, 20).expect("ok"), 512);
        assert_eq!(wire::check_orders(10, 19).expect("ok"), 128);
        let (mut sd, _) = domains(SERVER, CLIENT);
        assert!(Vchan::server(&mut sd.clone(), &mut sd, CLIENT, 10, 10).is_err());
        assert!(Vchan::server(&mut sd.clone(), &mut sd, CLIENT, 21, 12).is_err());
        // libxenvchan_server_init's choices.
        assert_eq!(wire::orders_for(1024, 2048), Some((10, 11)));
        assert_eq!(wire::orders_for(2048, 1024), Some((11, 10)));
        assert_eq!(wire::orders_for(2000, 5000), Some((11, 13)));
        assert_eq!(wire::orders_for(65536, 100), Some((16, 11)));
        assert_eq!(wire::orders_for(65536, 65537), Some((16, 17)));
        assert_eq!(wire::orders_for(1 << 21, 1), None);
    }

    /// A deterministic byte stream and a random-ish chunk size source.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn stream_byte(seed: u64, pos: u64) -> u8 {
        (pos.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed).rotate_left((pos % 61) as u32) as u8
    }

    fn fnv(hash: &mut u64, bytes: &[u8]) {
        for &b in bytes {
            *hash ^= u64::from(b);
            *hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// One direction of a transfer: what was sent and received so far, with running hashes.
    struct Flow {
        seed: u64,
        total: u64,
        sent: u64,
        received: u64,
        sent_hash: u64,
        recv_hash: u64,
    }

    impl Flow {
        fn new(seed: u64, total: u64) -> Self {
            Flow {
                seed,
                total,
                sent: 0,
                received: 0,
                sent_hash: 0xcbf2_9ce4_8422_2325,
                recv_hash: 0xcbf2_9ce4_8422_2325,
            }
        }

        fn step(
            &mut self,
            rng: &mut Rng,
            tx: &mut Vchan<TestPages>,
            txd: &mut Dom,
            rx: &mut Vchan<TestPages>,
            rxd: &mut Dom,
        ) {
            if self.sent < self.total {
                let want = (1 + rng.below(5000)).min((self.total - self.sent) as usize);
                let chunk: Vec<u8> = (0..want as u64)
                    .map(|i| stream_byte(self.seed, self.sent + i))
                    .collect();
                let n = tx.send(txd, &chunk).expect("send");
                fnv(&mut self.sent_hash, &chunk[..n]);
                self.sent += n as u64;
            }
            let mut buf = vec![0u8; 1 + rng.below(5000)];
            let n = rx.recv(rxd, &mut buf).expect("recv");
            for (i, &b) in buf[..n].iter().enumerate() {
                assert_eq!(
                    b,
                    stream_byte(self.seed, self.received + i as u64),
                    "byte {}",
                    self.received + i as u64
                );
            }
            fnv(&mut self.recv_hash, &buf[..n]);
            self.received += n as u64;
        }

        fn done(&self) -> bool {
            self.received == self.total
        }
    }

    fn transfer_both_ways(left: u8, right: u8, total: u64) {
        let (mut server, mut sd, mut client, mut cd, _) = pair(left, right);
        let mut rng = Rng(0x1234_5678_9abc_def1 ^ (u64::from(left) << 8) ^ u64::from(right));
        let mut down = Flow::new(1, total);
        let mut up = Flow::new(2, total + 12345);
        let mut steps = 0u64;
        while !(down.done() && up.done()) {
            down.step(&mut rng, &mut server, &mut sd, &mut client, &mut cd);
            up.step(&mut rng, &mut client, &mut cd, &mut server, &mut sd);
            steps += 1;
            assert!(steps < 10_000_000, "no progress");
        }
        assert_eq!(down.sent_hash, down.recv_hash);
        assert_eq!(up.sent_hash, up.recv_hash);
        assert_eq!(server.fault(), None);
        assert_eq!(client.fault(), None);
    }

    #[test]
    fn indices_wrap_past_u32_max() {
        // A server whose indices are just short of 2^32, as after 4 GiB of traffic: set
        // before the client connects, which takes its own indices from the page.
        let (mut sd, mut cd) = domains(SERVER, CLIENT);
        let (mut server, info) =
            Vchan::server(&mut sd.clone(), &mut sd, CLIENT, 10, 11).expect("server");
        let start = u32::MAX - 700;
        server.rd_cons = start;
        server.wr_prod = start;
        for at in [wire::LEFT, wire::RIGHT] {
            for field in [wire::CONS, wire::PROD] {
                server.shared.store_u32(at + field, start).expect("store");
            }
        }
        let mut client = Vchan::client(
            &mut cd.clone(),
            &mut cd,
            SERVER,
            info.ring_ref,
            info.event_port,
        )
        .expect("client");
        let mut rng = Rng(7);
        let mut down = Flow::new(3, 300_000);
        let mut up = Flow::new(4, 300_000);
        while !(down.done() && up.done()) {
            down.step(&mut rng, &mut server, &mut sd, &mut client, &mut cd);
            up.step(&mut rng, &mut client, &mut cd, &mut server, &mut sd);
        }
        assert_eq!(down.sent_hash, down.recv_hash);
        assert_eq!(up.sent_hash, up.recv_hash);
        assert!(
            server.rd_cons < start && server.wr_prod < start,
            "the indices wrapped"
        );
    }

    #[test]
    fn data_both_ways_with_wraparound_over_megabytes() {
        transfer_both_ways(10, 11, 4 << 20);
    }

    #[test]
    fn larger_orders_in_separate_pages() {
        transfer_both_ways(13, 15, 2 << 20);
        transfer_both_ways(11, 12, 1 << 20);
        transfer_both_ways(16, 10, 1 << 20);
    }

    #[test]
    fn larger_orders_list_grants_left_first() {
        let (mut sd, cd) = domains(SERVER, CLIENT);
        let (server, info) =
            Vchan::server(&mut sd.clone(), &mut sd, CLIENT, 13, 12).expect("server");
        assert_eq!(server.ring_sizes(), (8192, 4096));
        let page = shared_page_bytes(&cd, &info);
        let grants: Vec<u32> = page[24..24 + 12]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        // The shared page took the first reference; left's two pages then right's one.
        let r = info.ring_ref.0;
        assert_eq!(grants, vec![r + 1, r + 2, r + 3]);
        assert!(page[36..].iter().all(|&b| b == 0), "nothing after grants[]");
        assert_eq!(&page[16..24], &[13, 0, 12, 0, 2, 1, 1, 0]);
        let hv = sd.hv();
        assert!(
            hv.grants[&(r + 1)].writable && hv.grants[&(r + 2)].writable,
            "left: the client writes it"
        );
        assert!(
            !hv.grants[&(r + 3)].writable,
            "right: the client only reads it"
        );
    }

    #[test]
    fn client_refuses_a_bad_page() {
        for (left, right) in [(9u16, 11u16), (10, 10), (21, 11), (10, 20), (11, 0xffff)] {
            let (mut sd, mut cd) = domains(SERVER, CLIENT);
            let (refs, page) = sd.grant(CLIENT, 1, true).expect("grant");
            let port = sd.alloc_unbound(CLIENT).expect("port");
            wire::Header {
                left_order: left,
                right_order: right,
                cli_live: 2,
                srv_live: 1,
                ..Default::default()
            }
            .write(&page)
            .expect("write");
            let r = Vchan::client(&mut cd.clone(), &mut cd, SERVER, refs[0], port);
            assert!(r.is_err(), "orders {left}/{right} accepted");
            // Refused before announcing itself: the live byte is untouched.
            assert_eq!(wire::load_flag(&page, wire::CLI_LIVE).expect("load"), 2);
        }
        let (_, mut cd) = domains(SERVER, CLIENT);
        assert!(matches!(
            Vchan::client(&mut cd.clone(), &mut cd, SERVER, GrantRef(0), Port(3)),
            Err(VchanError::Unset)
        ));
    }

    #[test]
    fn send_when_full_returns_zero_and_recovers() {
        let (mut server, mut sd, mut client, mut cd, _) = pair(10, 11);
        sd.take_pending(server.port());
        // The client writes left, a 1024-byte ring.
        let data = vec![0xa5u8; 1500];
        assert_eq!(client.send(&mut cd, &data).expect("send"), 1024);
        assert_eq!(client.send(&mut cd, &data).expect("send"), 0);
        assert_eq!(client.buffer_space().expect("space"), 0);
        // The client asked to be told when the server reads.
        let before = sd.sent(server.port());
        let mut buf = vec![0u8; 300];
        assert_eq!(server.recv(&mut sd, &mut buf).expect("recv"), 300);
        assert_eq!(
            sd.sent(server.port()),
            before + 1,
            "the full writer is notified"
        );
        assert!(cd.take_pending(client.port()));
        let r = client.handle_event(&mut cd).expect("event");
        assert_eq!(r.buffer_space, 300);
        assert_eq!(client.send(&mut cd, &data).expect("send"), 300);
        // Further reads without the writer asking again do not notify.
        let mut rest = vec![0u8; 2048];
        let sent = sd.sent(server.port());
        assert_eq!(server.recv(&mut sd, &mut rest[..100]).expect("recv"), 100);
        assert_eq!(
            sd.sent(server.port()),
            sent + 1,
            "the second send was short too, and asked"
        );
        assert_eq!(server.recv(&mut sd, &mut rest[..100]).expect("recv"), 100);
        assert_eq!(sd.sent(server.port()), sent + 1, "no request, no event");
        assert_eq!(server.recv(&mut sd, &mut rest).expect("recv"), 824);
        assert_eq!(server.recv(&mut sd, &mut rest).expect("recv"), 0);
    }

    #[test]
    fn blocked_reader_is_woken_and_idle_reader_is_not_flooded() {
        let (mut server, mut sd, mut client, mut cd, _) = pair(10, 11);
        let port = server.port();
        // The client's connect asked for NOTIFY_WRITE: the first send wakes it, once.
        server.send(&mut sd, b"hello").expect("send");
        assert_eq!(sd.sent(port), 1);
        assert!(cd.take_pending(client.port()));
        for _ in 0..50 {
            server.send(&mut sd, b"more").expect("send");
        }
        assert_eq!(
            sd.sent(port),
            1,
            "a reader that did not ask again is not notified"
        );
        assert!(!cd.take_pending(client.port()));
        // Drain: recv returning less than asked re-arms the request.
        let mut buf = vec![0u8; 4096];
        assert_eq!(client.recv(&mut cd, &mut buf).expect("recv"), 205);
        assert_eq!(client.recv(&mut cd, &mut buf).expect("recv"), 0);
        server.send(&mut sd, b"x").expect("send");
        assert_eq!(sd.sent(port), 2, "the blocked reader is woken");
        // Through the event channel as a poll loop sees it: pending, then handle_event.
        assert_eq!(cd.pending().expect("pending"), Some(client.port()));
        assert_eq!(cd.pending().expect("pending"), None, "masked until handled");
        let r = client.handle_event(&mut cd).expect("event");
        assert_eq!(r.data_ready, 1);
        assert_eq!(r.peer, PeerState::Connected);
        // data_ready asks for notification, like libxenvchan_data_ready.
        assert_eq!(client.recv(&mut cd, &mut buf[..1]).expect("recv"), 1);
        assert_eq!(client.data_ready().expect("ready"), 0);
        server.send(&mut sd, b"y").expect("send");
        assert_eq!(sd.sent(port), 3);
        assert_eq!(cd.pending().expect("pending"), Some(client.port()));
    }

    #[test]
    fn server_close_is_seen_by_client_after_its_data() {
        let (mut server, mut sd, mut client, mut cd, _) = pair(10, 11);
        server.send(&mut sd, b"last words").expect("send");
        cd.take_pending(client.port());
        server.close(&mut sd).expect("close");
        assert!(cd.take_pending(client.port()), "close notifies");
        assert!(!client.is_open());
        assert_eq!(client.state(), PeerState::Closed);
        let mut buf = [0u8; 64];
        assert_eq!(client.recv(&mut cd, &mut buf).expect("recv"), 10);
        assert_eq!(&buf[..10], b"last words");
        assert!(matches!(
            client.recv(&mut cd, &mut buf),
            Err(VchanError::Closed)
        ));
        assert!(matches!(
            client.send(&mut cd, b"x"),
            Err(VchanError::Closed)
        ));
    }

    #[test]
    fn client_close_is_seen_by_server() {
        let (mut server, mut sd, client, mut cd, info) = pair(12, 13);
        sd.take_pending(server.port());
        client.close(&mut cd).expect("close");
        assert!(sd.take_pending(server.port()), "close notifies");
        assert_eq!(shared_page_bytes(&cd, &info)[wire::CLI_LIVE], 0);
        assert!(!server.is_open());
        let r = server.handle_event(&mut sd).expect("event");
        assert_eq!(r.peer, PeerState::Closed);
        let mut buf = [0u8; 8];
        assert!(matches!(
            server.recv(&mut sd, &mut buf),
            Err(VchanError::Closed)
        ));
        assert!(matches!(
            server.send(&mut sd, b"x"),
            Err(VchanError::Closed)
        ));
    }

    #[test]
    fn dropped_end_marks_itself_dead() {
        let (server, _sd, client, _cd, _) = pair(10, 11);
        drop(server);
        assert!(!client.is_open());
    }

    #[test]
    fn hostile_prod_index_breaks_the_channel() {
        let (mut server, mut sd, _client, cd, info) = pair(10, 11);
        // The client's domain scribbles left.prod far past anything it could have sent.
        let page = cd.clone().map(SERVER, &[info.ring_ref], true).expect("map");
        page.store_u32(wire::LEFT + wire::PROD, 5000)
            .expect("store");
        let mut buf = [0u8; 16];
        match server.recv(&mut sd, &mut buf) {
            Err(VchanError::Broken(Fault::Indices {
                ring: Direction::Read,
                prod: 5000,
                cons: 0,
                size: 1024,
            })) => {}
            other => panic!("expected a broken channel, got {other:?}"),
        }
        // Sticky, whatever the peer does next.
        page.store_u32(wire::LEFT + wire::PROD, 0).expect("store");
        assert!(matches!(
            server.recv(&mut sd, &mut buf),
            Err(VchanError::Broken(_))
        ));
        assert!(matches!(
            server.send(&mut sd, b"x"),
            Err(VchanError::Broken(_))
        ));
        assert!(matches!(server.data_ready(), Err(VchanError::Broken(_))));
        assert!(!server.is_open());
        let msg = VchanError::Broken(server.fault().expect("fault")).to_string();
        assert!(msg.contains("5000"), "{msg}");
    }

    #[test]
    fn hostile_cons_index_breaks_the_writer() {
        let (mut server, mut sd, _client, cd, info) = pair(10, 11);
        let page = cd.clone().map(SERVER, &[info.ring_ref], true).expect("map");
        // right.cons ahead of what the server produced: prod - cons wraps to ~4 GiB.
        page.store_u32(wire::RIGHT + wire::CONS, 10).expect("store");
        assert!(matches!(
            server.send(&mut sd, b"data"),
            Err(VchanError::Broken(Fault::Indices {
                ring: Direction::Write,
                ..
            }))
        ));
        // And a peer that rewinds our own index in the page changes nothing for us.
        let (mut server, mut sd, mut client, mut cd, info) = pair(10, 11);
        let page = cd.clone().map(SERVER, &[info.ring_ref], true).expect("map");
        server.send(&mut sd, b"abc").expect("send");
        page.store_u32(wire::RIGHT + wire::PROD, 1).expect("store");
        let mut buf = [0u8; 8];
        assert_eq!(client.recv(&mut cd, &mut buf).expect("recv"), 1);
        server.send(&mut sd, b"def").expect("send");
        assert_eq!(
            client.recv(&mut cd, &mut buf).expect("recv"),
            5,
            "the server's prod is its own"
        );
        assert_eq!(&buf[..5], b"bcdef");
    }

    #[test]
    fn both_ends_in_threads() {
        let (mut server, sd, mut client, cd, _) = pair(12, 11);
        let total: u64 = 3 << 20;
        let writer = std::thread::spawn(move || {
            let mut sd = sd;
            let mut pos = 0u64;
            let mut rng = Rng(99);
            while pos < total {
                let want = (1 + rng.below(3000)).min((total - pos) as usize);
                let chunk: Vec<u8> = (0..want as u64).map(|i| stream_byte(5, pos + i)).collect();
                let n = server.send(&mut sd, &chunk).expect("send");
                pos += n as u64;
                if n == 0 {
                    std::thread::yield_now();
                }
            }
            server
        });
        let mut cd = cd;
        let mut pos = 0u64;
        let mut buf = vec![0u8; 2500];
        while pos < total {
            let n = client.recv(&mut cd, &mut buf).expect("recv");
            for (i, &b) in buf[..n].iter().enumerate() {
                assert_eq!(b, stream_byte(5, pos + i as u64));
            }
            pos += n as u64;
            if n == 0 {
                std::thread::yield_now();
            }
        }
        let server = writer.join().expect("writer");
        assert_eq!(server.fault(), None);
    }
}
