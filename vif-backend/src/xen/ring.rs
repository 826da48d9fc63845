//! The Xen shared ring: one producer-consumer ring of requests and responses in a shared
//! page, as `DEFINE_RING_TYPES` and the `RING_*` macros of `io/ring.h` lay it out
//! (github.com/xen-project/xen, `xen/include/public/io/ring.h`).
//!
//! ```text
//! offset  0  u32 req_prod    written by the front end
//! offset  4  u32 req_event   the back end wants an event once req_prod passes it
//! offset  8  u32 rsp_prod    written by the back end
//! offset 12  u32 rsp_event   the front end wants an event once rsp_prod passes it
//! offset 16  u8  pvt[4], __pad[44]
//! offset 64  entry ring[N]   N = largest power of two of entries that fit
//! ```
//!
//! Indices are free-running `u32` (`RING_IDX`); slot `i` is `ring[i & (N - 1)]`, so all
//! index arithmetic here wraps. Requests and responses share the slots: a response is
//! written over the request it answers.
//!
//! The page is shared with a peer that may be hostile and may rewrite any of it at any
//! moment. So nothing here holds a reference into it: every slot is copied out into the
//! caller's buffer before it is looked at (`RING_COPY_REQUEST`), and a producer index the
//! peer could not legitimately have written is an error ([`RingError`]) that the caller
//! answers by disconnecting the peer, never a loop over slots it made up.

use std::fmt;

use super::{OutOfRange, SharedPages, PAGE_SIZE};

/// The ring header's size: the four indices and the padding to 64 bytes
/// (`offsetof(struct sring, ring)` in `DEFINE_RING_TYPES`).
pub const HEADER_LEN: usize = 64;

const REQ_PROD: usize = 0;
const REQ_EVENT: usize = 4;
const RSP_PROD: usize = 8;
const RSP_EVENT: usize = 12;
/// `pvt` and `__pad`: zeroed by `SHARED_RING_INIT`.
const PAD: usize = 16;

/// The number of entries of `entry_size` bytes in a ring of `bytes` bytes including its
/// header: as many as fit, rounded down to a power of two (`__CONST_RING_SIZE`, `__RD32`),
/// so that an index is reduced to a slot with a mask. 0 if none fit.
pub const fn ring_size(bytes: usize, entry_size: usize) -> u32 {
    if entry_size == 0 || bytes <= HEADER_LEN {
        return 0;
    }
    let fit = (bytes - HEADER_LEN) / entry_size;
    if fit == 0 {
        return 0;
    }
    // `fit` is below 2^32 for any real mapping; clamp rather than truncate if not.
    let fit = if fit > u32::MAX as usize {
        u32::MAX
    } else {
        fit as u32
    };
    1 << (31 - fit.leading_zeros())
}

/// Where a ring lives in a mapping and the shape of its entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    base: usize,
    entry_size: usize,
    nr_ents: u32,
}

impl RingLayout {
    /// A ring of `bytes` bytes (header included) at `base` in the mapping, with entries of
    /// `entry_size` bytes: the union of the request and response types, 12 for netif TX
    /// and 8 for netif RX.
    pub fn new(base: usize, bytes: usize, entry_size: usize) -> Result<Self, RingError> {
        let nr_ents = ring_size(bytes, entry_size);
        // Index fields are loaded as aligned u32s.
        if nr_ents == 0 || !base.is_multiple_of(4) {
            return Err(RingError::BadLayout {
                base,
                bytes,
                entry_size,
            });
        }
        Ok(RingLayout {
            base,
            entry_size,
            nr_ents,
        })
    }

    /// A one-page ring at `base` (every netif ring is one page).
    pub fn one_page(base: usize, entry_size: usize) -> Result<Self, RingError> {
        Self::new(base, PAGE_SIZE, entry_size)
    }

    /// The number of slots (`RING_SIZE`).
    pub fn size(&self) -> u32 {
        self.nr_ents
    }

    /// Bytes per slot.
    pub fn entry_size(&self) -> usize {
        self.entry_size
    }

    /// The ring's offset in its mapping.
    pub fn base(&self) -> usize {
        self.base
    }

    /// The byte offset of the slot of free-running index `idx` (`RING_GET_REQUEST`).
    pub fn slot_offset(&self, idx: u32) -> usize {
        self.base + HEADER_LEN + (idx & (self.nr_ents - 1)) as usize * self.entry_size
    }

    fn end(&self) -> usize {
        self.base + HEADER_LEN + self.nr_ents as usize * self.entry_size
    }
}

/// What went wrong on a ring. Everything but [`RingError::Memory`] and
/// [`RingError::BadLayout`] that names a peer's index means the peer broke the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// No power-of-two number of entries fits, or the base is not 4-byte aligned.
    BadLayout {
        base: usize,
        bytes: usize,
        entry_size: usize,
    },
    /// The ring does not fit the mapping, or a slot access fell outside it.
    Memory(OutOfRange),
    /// A slot copy longer than an entry.
    EntryTooLarge { len: usize, entry_size: usize },
    /// The front end has no free request slot (`RING_FULL`): every slot holds a request
    /// or a response not yet consumed.
    Full,
    /// The back end has answered every request it consumed; another response would
    /// overwrite a request it has not read.
    NoRequestToAnswer,
    /// The front end published more requests than the ring holds beside the ones not yet
    /// answered (`RING_REQUEST_PROD_OVERFLOW`), or moved `req_prod` back behind requests
    /// we already consumed.
    RequestProdOverflow {
        req_prod: u32,
        req_cons: u32,
        rsp_prod_pvt: u32,
        size: u32,
    },
    /// The back end published more responses than there are requests outstanding
    /// (`RING_RESPONSE_PROD_OVERFLOW`, tightened to the requests we really pushed), or
    /// moved `rsp_prod` backwards.
    ResponseProdOverflow {
        rsp_prod: u32,
        rsp_cons: u32,
        req_prod_pvt: u32,
    },
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RingError::BadLayout {
                base,
                bytes,
                entry_size,
            } => write!(
                f,
                "no ring of {entry_size}-byte entries fits {bytes} bytes at offset {base}"
            ),
            RingError::Memory(e) => write!(f, "ring access: {e}"),
            RingError::EntryTooLarge { len, entry_size } => {
                write!(f, "{len} bytes do not fit a {entry_size}-byte ring slot")
            }
            RingError::Full => write!(f, "no free request slot on the ring"),
            RingError::NoRequestToAnswer => {
                write!(f, "a response with no consumed request to answer")
            }
            RingError::RequestProdOverflow {
                req_prod,
                req_cons,
                rsp_prod_pvt,
                size,
            } => write!(
                f,
                "peer's req_prod {req_prod} is impossible: consumed up to {req_cons}, \
                 answered up to {rsp_prod_pvt}, ring of {size}"
            ),
            RingError::ResponseProdOverflow {
                rsp_prod,
                rsp_cons,
                req_prod_pvt,
            } => write!(
                f,
                "peer's rsp_prod {rsp_prod} is impossible: consumed up to {rsp_cons}, \
                 requests pushed up to {req_prod_pvt}"
            ),
        }
    }
}

impl std::error::Error for RingError {}

impl From<OutOfRange> for RingError {
    fn from(e: OutOfRange) -> Self {
        RingError::Memory(e)
    }
}

/// The notification rule of `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY` and
/// `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`: having moved the producer from `old` to `new`,
/// the peer wants an event iff its event index is in `(old, new]`, which in wrapping
/// arithmetic is `new - event < new - old`.
pub fn needs_notify(old: u32, new: u32, event: u32) -> bool {
    new.wrapping_sub(event) < new.wrapping_sub(old)
}

fn check_fits(pages: &impl SharedPages, layout: &RingLayout) -> Result<(), RingError> {
    if layout.end() > pages.size() {
        return Err(RingError::Memory(OutOfRange {
            offset: layout.base,
            len: layout.end() - layout.base,
            size: pages.size(),
        }));
    }
    Ok(())
}

fn check_entry(layout: &RingLayout, len: usize) -> Result<(), RingError> {
    if len > layout.entry_size {
        return Err(RingError::EntryTooLarge {
            len,
            entry_size: layout.entry_size,
        });
    }
    Ok(())
}

/// The front end of a ring (`struct front_ring`): produces requests, consumes responses.
/// In netif that is netfront on both rings: TX requests carry frames out, RX requests post
/// empty buffers.
#[derive(Debug)]
pub struct FrontRing<P> {
    pages: P,
    layout: RingLayout,
    req_prod_pvt: u32,
    /// What we last stored in `req_prod`: kept here rather than re-read from the page, as
    /// the peer could rewrite it to skew our notification decision.
    req_prod_pushed: u32,
    rsp_cons: u32,
    /// `rsp_prod` as last loaded and checked; slots below it are safe to read.
    rsp_prod_seen: u32,
}

impl<P: SharedPages> FrontRing<P> {
    /// Initialises the shared header and attaches to it (`XEN_FRONT_RING_INIT`: the front
    /// end owns the page and is the one that initialises it).
    pub fn init(pages: P, layout: RingLayout) -> Result<Self, RingError> {
        Self::init_at(pages, layout, 0)
    }

    /// As [`FrontRing::init`], with every index starting at `start` instead of 0
    /// (`SHARED_RING_INIT` then `FRONT_RING_ATTACH` at `start`): a back end attaching
    /// reads where to start from the page. Tests use it to cross the `u32` wrap.
    pub fn init_at(pages: P, layout: RingLayout, start: u32) -> Result<Self, RingError> {
        check_fits(&pages, &layout)?;
        pages.zero(layout.base + PAD, HEADER_LEN - PAD)?;
        pages.store_u32(layout.base + REQ_EVENT, start.wrapping_add(1))?;
        pages.store_u32(layout.base + RSP_EVENT, start.wrapping_add(1))?;
        pages.store_u32(layout.base + RSP_PROD, start)?;
        pages.store_u32(layout.base + REQ_PROD, start)?;
        Ok(FrontRing {
            pages,
            layout,
            req_prod_pvt: start,
            req_prod_pushed: start,
            rsp_cons: start,
            rsp_prod_seen: start,
        })
    }

    pub fn layout(&self) -> &RingLayout {
        &self.layout
    }

    pub fn pages(&self) -> &P {
        &self.pages
    }

    /// The next request index to be written (`req_prod_pvt`).
    pub fn req_prod_pvt(&self) -> u32 {
        self.req_prod_pvt
    }

    /// The next response index to be consumed (`rsp_cons`).
    pub fn rsp_cons(&self) -> u32 {
        self.rsp_cons
    }

    /// Request slots free to write (`RING_FREE_REQUESTS`).
    pub fn free_requests(&self) -> u32 {
        self.layout
            .nr_ents
            .wrapping_sub(self.req_prod_pvt.wrapping_sub(self.rsp_cons))
    }

    /// Copies `req` (at most one entry; a shorter copy leaves the slot's tail as it was)
    /// into the next request slot, privately: the back end sees it after
    /// [`FrontRing::push_requests`]. Returns the request's index.
    pub fn write_request(&mut self, req: &[u8]) -> Result<u32, RingError> {
        check_entry(&self.layout, req.len())?;
        if self.free_requests() == 0 {
            return Err(RingError::Full);
        }
        let idx = self.req_prod_pvt;
        self.pages.write(self.layout.slot_offset(idx), req)?;
        self.req_prod_pvt = idx.wrapping_add(1);
        Ok(idx)
    }

    /// Publishes the written requests and says whether the back end must be notified
    /// (`RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`): the release store orders the slots before
    /// the index (`xen_wmb`), the fence orders the index before the read of `req_event`
    /// (`xen_mb`) so a back end going to sleep cannot miss both.
    pub fn push_requests(&mut self) -> Result<bool, RingError> {
        let old = self.req_prod_pushed;
        let new = self.req_prod_pvt;
        self.pages.store_u32(self.layout.base + REQ_PROD, new)?;
        self.req_prod_pushed = new;
        self.pages.fence();
        let event = self.pages.load_u32(self.layout.base + REQ_EVENT)?;
        Ok(needs_notify(old, new, event))
    }

    /// Loads and checks `rsp_prod`; the number of responses ready to consume
    /// (`RING_HAS_UNCONSUMED_RESPONSES`). A back end cannot answer requests we never
    /// pushed, so a count beyond them is [`RingError::ResponseProdOverflow`].
    pub fn unconsumed_responses(&mut self) -> Result<u32, RingError> {
        let rsp_prod = self.pages.load_u32(self.layout.base + RSP_PROD)?;
        let ready = rsp_prod.wrapping_sub(self.rsp_cons);
        if ready > self.req_prod_pushed.wrapping_sub(self.rsp_cons) {
            return Err(RingError::ResponseProdOverflow {
                rsp_prod,
                rsp_cons: self.rsp_cons,
                req_prod_pvt: self.req_prod_pvt,
            });
        }
        self.rsp_prod_seen = rsp_prod;
        Ok(ready)
    }

    /// Copies the next response into `dst` (at most one entry) and consumes it; `None` if
    /// the back end has published none. Returns the response's index, which is also the
    /// index of the request whose slot it took.
    pub fn next_response(&mut self, dst: &mut [u8]) -> Result<Option<u32>, RingError> {
        check_entry(&self.layout, dst.len())?;
        if self.rsp_cons == self.rsp_prod_seen && self.unconsumed_responses()? == 0 {
            return Ok(None);
        }
        let idx = self.rsp_cons;
        // The acquire load of rsp_prod orders this copy after the back end's writes.
        self.pages.read(self.layout.slot_offset(idx), dst)?;
        self.rsp_cons = idx.wrapping_add(1);
        Ok(Some(idx))
    }

    /// Before sleeping: whether responses are pending, asking for an event on the next
    /// one if not (`RING_FINAL_CHECK_FOR_RESPONSES`). Storing `rsp_event`, a full barrier,
    /// then re-checking closes the race with a back end that pushed between our last
    /// check and the store: it either sees the new event index, or we see its response.
    pub fn final_check_for_responses(&mut self) -> Result<bool, RingError> {
        if self.unconsumed_responses()? > 0 {
            return Ok(true);
        }
        self.pages
            .store_u32(self.layout.base + RSP_EVENT, self.rsp_cons.wrapping_add(1))?;
        self.pages.fence();
        Ok(self.unconsumed_responses()? > 0)
    }
}

/// The back end of a ring (`struct back_ring`): consumes requests, produces responses.
/// In netif that is netback on both rings.
#[derive(Debug)]
pub struct BackRing<P> {
    pages: P,
    layout: RingLayout,
    req_cons: u32,
    /// `req_prod` as last loaded and checked.
    req_prod_seen: u32,
    rsp_prod_pvt: u32,
    /// What we last stored in `rsp_prod` (see `FrontRing::req_prod_pushed`).
    rsp_prod_pushed: u32,
}

impl<P: SharedPages> BackRing<P> {
    /// Attaches to a ring the front end initialised, without initialising it
    /// (`BACK_RING_ATTACH`). It starts at the page's `rsp_prod`, as Linux netback does
    /// (`xenvif_map_frontend_data_rings`), so a reconnect resumes where the last back
    /// end stopped; a `req_prod` more than a ring ahead of that is refused.
    pub fn attach(pages: P, layout: RingLayout) -> Result<Self, RingError> {
        check_fits(&pages, &layout)?;
        let rsp_prod = pages.load_u32(layout.base + RSP_PROD)?;
        let mut ring = BackRing {
            pages,
            layout,
            req_cons: rsp_prod,
            req_prod_seen: rsp_prod,
            rsp_prod_pvt: rsp_prod,
            rsp_prod_pushed: rsp_prod,
        };
        ring.unconsumed_requests()?;
        Ok(ring)
    }

    pub fn layout(&self) -> &RingLayout {
        &self.layout
    }

    pub fn pages(&self) -> &P {
        &self.pages
    }

    /// The next request index to be consumed (`req_cons`).
    pub fn req_cons(&self) -> u32 {
        self.req_cons
    }

    /// The next response index to be written (`rsp_prod_pvt`).
    pub fn rsp_prod_pvt(&self) -> u32 {
        self.rsp_prod_pvt
    }

    /// Loads and checks `req_prod`; the number of requests ready to consume
    /// (`XEN_RING_NR_UNCONSUMED_REQUESTS`: `min(req_prod - req_cons,
    /// N - (req_cons - rsp_prod_pvt))`, the second term keeping us off slots whose
    /// responses the front end has not read yet).
    ///
    /// A front end can have at most N requests unanswered, so a `req_prod` further than N
    /// past `rsp_prod_pvt` (`RING_REQUEST_PROD_OVERFLOW`), or behind what we consumed, is
    /// [`RingError::RequestProdOverflow`]: the caller disconnects the peer.
    pub fn unconsumed_requests(&mut self) -> Result<u32, RingError> {
        let req_prod = self.pages.load_u32(self.layout.base + REQ_PROD)?;
        let n = self.layout.nr_ents;
        let outstanding = req_prod.wrapping_sub(self.rsp_prod_pvt);
        let consumed = self.req_cons.wrapping_sub(self.rsp_prod_pvt);
        if outstanding > n || outstanding < consumed {
            return Err(RingError::RequestProdOverflow {
                req_prod,
                req_cons: self.req_cons,
                rsp_prod_pvt: self.rsp_prod_pvt,
                size: n,
            });
        }
        self.req_prod_seen = req_prod;
        Ok(self.ready())
    }

    fn ready(&self) -> u32 {
        let req = self.req_prod_seen.wrapping_sub(self.req_cons);
        let rsp = self
            .layout
            .nr_ents
            .wrapping_sub(self.req_cons.wrapping_sub(self.rsp_prod_pvt));
        req.min(rsp)
    }

    /// Copies the next request into `dst` (at most one entry) and consumes it
    /// (`RING_COPY_REQUEST`): the copy is ours, so the front end cannot change it between
    /// our checks and our use. `None` if none is published. Returns the request's index.
    pub fn next_request(&mut self, dst: &mut [u8]) -> Result<Option<u32>, RingError> {
        check_entry(&self.layout, dst.len())?;
        if self.ready() == 0 && self.unconsumed_requests()? == 0 {
            return Ok(None);
        }
        let idx = self.req_cons;
        self.pages.read(self.layout.slot_offset(idx), dst)?;
        self.req_cons = idx.wrapping_add(1);
        Ok(Some(idx))
    }

    /// Copies `rsp` (at most one entry) into the next response slot, privately: it is
    /// the slot of the oldest request not yet answered, which netif RX relies on (the
    /// front end pairs an RX response with its request by ring position). Returns the
    /// response's index.
    pub fn write_response(&mut self, rsp: &[u8]) -> Result<u32, RingError> {
        check_entry(&self.layout, rsp.len())?;
        if self.rsp_prod_pvt == self.req_cons {
            return Err(RingError::NoRequestToAnswer);
        }
        let idx = self.rsp_prod_pvt;
        self.pages.write(self.layout.slot_offset(idx), rsp)?;
        self.rsp_prod_pvt = idx.wrapping_add(1);
        Ok(idx)
    }

    /// Publishes the written responses and says whether the front end must be notified
    /// (`RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`, orderings as in
    /// [`FrontRing::push_requests`]).
    pub fn push_responses(&mut self) -> Result<bool, RingError> {
        let old = self.rsp_prod_pushed;
        let new = self.rsp_prod_pvt;
        self.pages.store_u32(self.layout.base + RSP_PROD, new)?;
        self.rsp_prod_pushed = new;
        self.pages.fence();
        let event = self.pages.load_u32(self.layout.base + RSP_EVENT)?;
        Ok(needs_notify(old, new, event))
    }

    /// Before sleeping: whether requests are pending, asking for an event on the next one
    /// if not (`RING_FINAL_CHECK_FOR_REQUESTS`, with `req_event = req_cons + 1`, a full
    /// barrier and a re-check, as in [`FrontRing::final_check_for_responses`]).
    pub fn final_check_for_requests(&mut self) -> Result<bool, RingError> {
        if self.unconsumed_requests()? > 0 {
            return Ok(true);
        }
        self.pages
            .store_u32(self.layout.base + REQ_EVENT, self.req_cons.wrapping_add(1))?;
        self.pages.fence();
        Ok(self.unconsumed_requests()? > 0)
    }
}

/// An in-process [`SharedPages`] for tests of this module and of `netif`: words of
/// atomics, so two ring ends (or two threads) can share it without `unsafe`.
#[cfg(test)]
pub(crate) mod test_pages {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use crate::xen::{OutOfRange, SharedPages, PAGE_SIZE};

    #[derive(Clone, Debug)]
    pub struct TestPages(Arc<Vec<AtomicU32>>);

    impl TestPages {
        pub fn new(pages: usize) -> Self {
            TestPages(Arc::new(
                (0..pages * PAGE_SIZE / 4)
                    .map(|_| AtomicU32::new(0))
                    .collect(),
            ))
        }

        fn check(&self, offset: usize, len: usize) -> Result<(), OutOfRange> {
            match offset.checked_add(len) {
                Some(end) if end <= self.size() => Ok(()),
                _ => Err(OutOfRange {
                    offset,
                    len,
                    size: self.size(),
                }),
            }
        }

        /// The aligned word at `offset`, for the atomic operations.
        fn word(&self, offset: usize) -> Result<&AtomicU32, OutOfRange> {
            self.check(offset, 4)?;
            if !offset.is_multiple_of(4) {
                return Err(OutOfRange {
                    offset,
                    len: 4,
                    size: self.size(),
                });
            }
            Ok(&self.0[offset / 4])
        }
    }

    impl SharedPages for TestPages {
        fn size(&self) -> usize {
            self.0.len() * 4
        }

        fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfRange> {
            self.check(offset, dst.len())?;
            for (i, b) in dst.iter_mut().enumerate() {
                let at = offset + i;
                let w = self.0[at / 4].load(Ordering::Relaxed);
                *b = (w >> (8 * (at % 4))) as u8;
            }
            Ok(())
        }

        fn write(&self, offset: usize, src: &[u8]) -> Result<(), OutOfRange> {
            self.check(offset, src.len())?;
            for (i, &b) in src.iter().enumerate() {
                let at = offset + i;
                let shift = 8 * (at % 4);
                let word = &self.0[at / 4];
                word.fetch_and(!(0xff << shift), Ordering::Relaxed);
                word.fetch_or(u32::from(b) << shift, Ordering::Relaxed);
            }
            Ok(())
        }

        fn load_u32(&self, offset: usize) -> Result<u32, OutOfRange> {
            self.check(offset, 4)?;
            if !offset.is_multiple_of(4) {
                return Err(OutOfRange {
                    offset,
                    len: 4,
                    size: self.size(),
                });
            }
            Ok(self.0[offset / 4].load(Ordering::Acquire))
        }

        fn store_u32(&self, offset: usize, value: u32) -> Result<(), OutOfRange> {
            self.check(offset, 4)?;
            if !offset.is_multiple_of(4) {
                return Err(OutOfRange {
                    offset,
                    len: 4,
                    size: self.size(),
                });
            }
            self.0[offset / 4].store(value, Ordering::Release);
            Ok(())
        }

        fn fetch_or_u32(&self, offset: usize, bits: u32) -> Result<u32, OutOfRange> {
            Ok(self.word(offset)?.fetch_or(bits, Ordering::SeqCst))
        }

        fn fetch_and_u32(&self, offset: usize, mask: u32) -> Result<u32, OutOfRange> {
            Ok(self.word(offset)?.fetch_and(mask, Ordering::SeqCst))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_pages::TestPages;
    use super::*;

    const ENTRY: usize = 12;

    fn pair_at(start: u32) -> (FrontRing<TestPages>, BackRing<TestPages>, TestPages) {
        let pages = TestPages::new(1);
        let layout = RingLayout::one_page(0, ENTRY).expect("layout");
        let front = FrontRing::init_at(pages.clone(), layout, start).expect("init");
        let back = BackRing::attach(pages.clone(), layout).expect("attach");
        (front, back, pages)
    }

    fn entry(v: u32) -> [u8; ENTRY] {
        let mut e = [0u8; ENTRY];
        e[..4].copy_from_slice(&v.to_le_bytes());
        e[8..].copy_from_slice(&(!v).to_le_bytes());
        e
    }

    #[test]
    fn sizes_follow_ring_h() {
        // (4096 - 64) / 12 = 336 and / 8 = 504: both round down to 256.
        assert_eq!(ring_size(PAGE_SIZE, 12), 256);
        assert_eq!(ring_size(PAGE_SIZE, 8), 256);
        assert_eq!(ring_size(PAGE_SIZE, 16), 128);
        assert_eq!(ring_size(PAGE_SIZE, 4032), 1);
        assert_eq!(ring_size(PAGE_SIZE, 4033), 0);
        assert_eq!(ring_size(64, 8), 0);
        assert_eq!(ring_size(PAGE_SIZE, 0), 0);
        assert!(RingLayout::one_page(0, 5000).is_err());
        assert!(RingLayout::one_page(2, 8).is_err());
        let l = RingLayout::one_page(PAGE_SIZE, 12).expect("layout");
        assert_eq!(l.slot_offset(0), PAGE_SIZE + 64);
        assert_eq!(l.slot_offset(257), PAGE_SIZE + 64 + 12);
        // A ring past the end of its mapping is refused before any access.
        let pages = TestPages::new(1);
        assert!(matches!(
            FrontRing::init(pages, l),
            Err(RingError::Memory(_))
        ));
    }

    #[test]
    fn init_writes_the_header() {
        let pages = TestPages::new(1);
        pages.write(0, &[0xaa; 64]).expect("dirty");
        let layout = RingLayout::one_page(0, 8).expect("layout");
        let _front = FrontRing::init(pages.clone(), layout).expect("init");
        let mut h = [0u8; 64];
        pages.read(0, &mut h).expect("read");
        let mut want = [0u8; 64];
        want[4] = 1; // req_event
        want[12] = 1; // rsp_event
        assert_eq!(h, want);
    }

    #[test]
    fn requests_and_responses_flow() {
        let (mut front, mut back, _) = pair_at(0);
        assert_eq!(front.free_requests(), 256);
        for i in 0..3 {
            assert_eq!(front.write_request(&entry(i)).expect("write"), i);
        }
        let mut buf = [0u8; ENTRY];
        // Nothing is visible before the push.
        assert_eq!(back.next_request(&mut buf).expect("next"), None);
        // req_event is 1 (set by init): the first push notifies.
        assert!(front.push_requests().expect("push"));
        for i in 0..3 {
            assert_eq!(back.next_request(&mut buf).expect("next"), Some(i));
            assert_eq!(buf, entry(i));
        }
        assert_eq!(back.next_request(&mut buf).expect("next"), None);
        for i in 0..3 {
            back.write_response(&entry(100 + i)).expect("rsp");
        }
        assert_eq!(
            back.write_response(&entry(0)),
            Err(RingError::NoRequestToAnswer)
        );
        assert!(back.push_responses().expect("push"));
        assert_eq!(front.unconsumed_responses().expect("count"), 3);
        for i in 0..3 {
            assert_eq!(front.next_response(&mut buf).expect("next"), Some(i));
            assert_eq!(buf, entry(100 + i));
        }
        assert_eq!(front.next_response(&mut buf).expect("next"), None);
        assert_eq!(
            front.write_request(&[0u8; ENTRY + 1]),
            Err(RingError::EntryTooLarge {
                len: 13,
                entry_size: 12
            })
        );
    }

    #[test]
    fn fills_to_256_and_no_further() {
        let (mut front, mut back, _) = pair_at(0);
        for i in 0..256 {
            front.write_request(&entry(i)).expect("fits");
        }
        assert_eq!(front.free_requests(), 0);
        assert_eq!(front.write_request(&entry(0)), Err(RingError::Full));
        front.push_requests().expect("push");
        assert_eq!(back.unconsumed_requests().expect("count"), 256);
        let mut buf = [0u8; ENTRY];
        for i in 0..256 {
            assert_eq!(back.next_request(&mut buf).expect("next"), Some(i));
            assert_eq!(buf, entry(i));
        }
        // All consumed, none answered: the front end has no slot until it reads responses.
        back.write_response(&entry(7)).expect("rsp");
        back.push_responses().expect("push");
        assert_eq!(front.free_requests(), 0);
        front.next_response(&mut buf).expect("next");
        assert_eq!(front.free_requests(), 1);
        front.write_request(&entry(256)).expect("fits");
        front.push_requests().expect("push");
        assert_eq!(back.next_request(&mut buf).expect("next"), Some(256));
        assert_eq!(buf, entry(256));
    }

    #[test]
    fn wraps_past_u32_max() {
        let start = 0xffff_ff00;
        let (mut front, mut back, _) = pair_at(start);
        let mut buf = [0u8; ENTRY];
        let mut next = start;
        let mut expect_rsp = start;
        // 3000 messages in batches of 200: crosses 2^32 and every slot many times.
        for _ in 0..15 {
            for _ in 0..200 {
                front.write_request(&entry(next)).expect("write");
                next = next.wrapping_add(1);
            }
            front.push_requests().expect("push");
            while let Some(idx) = back.next_request(&mut buf).expect("next") {
                assert_eq!(buf, entry(idx));
                back.write_response(&entry(!idx)).expect("rsp");
            }
            back.push_responses().expect("push");
            while let Some(idx) = front.next_response(&mut buf).expect("next") {
                assert_eq!(idx, expect_rsp);
                assert_eq!(buf, entry(!idx));
                expect_rsp = expect_rsp.wrapping_add(1);
            }
            assert_eq!(front.free_requests(), 256);
        }
        assert_eq!(next, start.wrapping_add(3000));
        assert!(next < start, "the indices wrapped");
        assert_eq!(back.req_cons(), next);
        assert_eq!(front.rsp_cons(), next);
    }

    #[test]
    fn notify_formula() {
        // Event below the old producer: the peer asked for an event we already sent.
        assert!(!needs_notify(10, 15, 5));
        // Event at old: already passed by the previous push.
        assert!(!needs_notify(10, 15, 10));
        // Event just past old, inside, and at new: this push crosses it.
        assert!(needs_notify(10, 15, 11));
        assert!(needs_notify(10, 15, 13));
        assert!(needs_notify(10, 15, 15));
        // Event above new: the peer wants to hear later.
        assert!(!needs_notify(10, 15, 16));
        // Nothing pushed: never.
        assert!(!needs_notify(10, 10, 10));
        assert!(!needs_notify(10, 10, 11));
        // Across the wrap.
        assert!(needs_notify(0xffff_fffe, 2, 0xffff_ffff));
        assert!(needs_notify(0xffff_fffe, 2, 0));
        assert!(!needs_notify(0xffff_fffe, 2, 3));
        assert!(!needs_notify(0xffff_fffe, 2, 0xffff_fffe));
    }

    #[test]
    fn push_notifies_per_req_event() {
        let (mut front, mut back, pages) = pair_at(0);
        let mut buf = [0u8; ENTRY];
        let batch = |front: &mut FrontRing<TestPages>, n: u32| {
            for i in 0..n {
                front.write_request(&entry(i)).expect("write");
            }
            front.push_requests().expect("push")
        };
        // req_event = 1, push 0 -> 2: crosses.
        assert!(batch(&mut front, 2));
        // The back end has not re-armed: req_event still 1, push 2 -> 4 does not notify.
        assert!(!batch(&mut front, 2));
        // The back end drains and re-arms at req_cons + 1 = 5.
        while back.next_request(&mut buf).expect("next").is_some() {}
        assert!(!back.final_check_for_requests().expect("check"));
        assert_eq!(pages.load_u32(REQ_EVENT).expect("load"), 5);
        assert!(batch(&mut front, 1));
        // A batching back end that wants an event only from index 10 on.
        pages.store_u32(REQ_EVENT, 10).expect("store");
        assert!(!batch(&mut front, 3)); // 5 -> 8
        assert!(batch(&mut front, 3)); // 8 -> 11 crosses 10
                                       // Same rule on the response side.
        while back.next_request(&mut buf).expect("next").is_some() {}
        for _ in 0..11 {
            back.write_response(&entry(0)).expect("rsp");
        }
        // rsp_event = 1 from init.
        assert!(back.push_responses().expect("push"));
        while front.next_response(&mut buf).expect("next").is_some() {}
        assert!(!front.final_check_for_responses().expect("check"));
        assert_eq!(pages.load_u32(RSP_EVENT).expect("load"), 12);
    }

    type Hook = std::sync::Arc<std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>>;

    /// Pages that run a hook just before one store of an index: the peer acting in the
    /// window between a final check's first look and its arming store.
    #[derive(Clone)]
    struct HookPages {
        inner: TestPages,
        at: usize,
        hook: Hook,
    }

    impl fmt::Debug for HookPages {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("HookPages").field("at", &self.at).finish()
        }
    }

    impl SharedPages for HookPages {
        fn size(&self) -> usize {
            self.inner.size()
        }
        fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfRange> {
            self.inner.read(offset, dst)
        }
        fn write(&self, offset: usize, src: &[u8]) -> Result<(), OutOfRange> {
            self.inner.write(offset, src)
        }
        fn load_u32(&self, offset: usize) -> Result<u32, OutOfRange> {
            self.inner.load_u32(offset)
        }
        fn store_u32(&self, offset: usize, value: u32) -> Result<(), OutOfRange> {
            if offset == self.at {
                let hook = self.hook.lock().expect("hook lock").take();
                if let Some(hook) = hook {
                    hook();
                }
            }
            self.inner.store_u32(offset, value)
        }
        fn fetch_or_u32(&self, offset: usize, bits: u32) -> Result<u32, OutOfRange> {
            self.inner.fetch_or_u32(offset, bits)
        }
        fn fetch_and_u32(&self, offset: usize, mask: u32) -> Result<u32, OutOfRange> {
            self.inner.fetch_and_u32(offset, mask)
        }
    }

    #[test]
    fn final_check_closes_the_race() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let pages = TestPages::new(1);
        let layout = RingLayout::one_page(0, ENTRY).expect("layout");
        let mut front = FrontRing::init(pages.clone(), layout).expect("init");
        let hooked = HookPages {
            inner: pages.clone(),
            at: REQ_EVENT,
            hook: Arc::new(Mutex::new(None)),
        };
        let mut back = BackRing::attach(hooked.clone(), layout).expect("attach");
        let mut buf = [0u8; ENTRY];
        // Pending work is reported without touching the event index.
        front.write_request(&entry(1)).expect("write");
        assert!(front.push_requests().expect("push"));
        assert!(back.final_check_for_requests().expect("check"));
        assert_eq!(pages.load_u32(REQ_EVENT).expect("load"), 1);
        back.next_request(&mut buf).expect("next");
        // The race: the back end has looked and found nothing; before it arms req_event
        // the front end pushes, reads the stale req_event (1, already passed) and so does
        // not notify. The back end's re-check after arming must find the request, or the
        // request would sit there with both ends asleep.
        let notified = Arc::new(AtomicBool::new(true));
        let flag = Arc::clone(&notified);
        *hooked.hook.lock().expect("hook lock") = Some(Box::new(move || {
            front.write_request(&entry(2)).expect("write");
            flag.store(front.push_requests().expect("push"), Ordering::SeqCst);
        }));
        assert!(back.final_check_for_requests().expect("check"));
        assert!(!notified.load(Ordering::SeqCst), "the push did not notify");
        assert_eq!(back.next_request(&mut buf).expect("next"), Some(1));
        assert_eq!(buf, entry(2));
        assert!(!back.final_check_for_requests().expect("check"));
        assert_eq!(pages.load_u32(REQ_EVENT).expect("load"), 3);
    }

    #[test]
    fn hostile_request_producer_is_an_error() {
        let (mut front, mut back, pages) = pair_at(0xffff_fff0);
        let mut buf = [0u8; ENTRY];
        for i in 0..4 {
            front.write_request(&entry(i)).expect("write");
        }
        front.push_requests().expect("push");
        back.next_request(&mut buf).expect("next");
        // 256 unanswered is the most a front end can have: allowed.
        pages
            .store_u32(REQ_PROD, 0xffff_fff0u32.wrapping_add(256))
            .expect("store");
        assert_eq!(back.unconsumed_requests().expect("ok"), 255);
        // One more is a jump past the ring.
        pages
            .store_u32(REQ_PROD, 0xffff_fff0u32.wrapping_add(257))
            .expect("store");
        let err = back.unconsumed_requests();
        assert!(
            matches!(err, Err(RingError::RequestProdOverflow { size: 256, .. })),
            "{err:?}"
        );
        // Backwards behind what we consumed (but not behind what we answered).
        pages.store_u32(REQ_PROD, 0xffff_fff0).expect("store");
        assert!(matches!(
            back.unconsumed_requests(),
            Err(RingError::RequestProdOverflow { .. })
        ));
        // Far away, as random garbage would be.
        pages.store_u32(REQ_PROD, 0x1234_5678).expect("store");
        assert!(back.final_check_for_requests().is_err());
        // A back end attaching to a ring whose producer is already impossible refuses it.
        pages.store_u32(RSP_PROD, 0).expect("store");
        pages.store_u32(REQ_PROD, 300).expect("store");
        let layout = *back.layout();
        assert!(matches!(
            BackRing::attach(pages.clone(), layout),
            Err(RingError::RequestProdOverflow { req_prod: 300, .. })
        ));
    }

    #[test]
    fn hostile_response_producer_is_an_error() {
        let (mut front, mut back, pages) = pair_at(5);
        let mut buf = [0u8; ENTRY];
        for i in 0..2 {
            front.write_request(&entry(i)).expect("write");
        }
        front.push_requests().expect("push");
        // Written but not pushed: the back end cannot have answered it.
        front.write_request(&entry(2)).expect("write");
        while back.next_request(&mut buf).expect("next").is_some() {}
        pages.store_u32(RSP_PROD, 8).expect("store");
        assert!(matches!(
            front.next_response(&mut buf),
            Err(RingError::ResponseProdOverflow { rsp_prod: 8, .. })
        ));
        pages.store_u32(RSP_PROD, 4).expect("store");
        assert!(front.final_check_for_responses().is_err());
        pages.store_u32(RSP_PROD, 7).expect("store");
        assert_eq!(front.unconsumed_responses().expect("ok"), 2);
    }

    /// Two threads, each end sleeping only when its final check says so and woken only
    /// when the other's push says so: if a wakeup could be lost, this would hang (and
    /// fail on the timeout) rather than pass.
    #[test]
    fn no_lost_wakeups_across_threads() {
        use std::sync::mpsc;
        use std::time::Duration;
        const COUNT: u32 = 20_000;
        let (mut front, mut back, _) = pair_at(0xffff_0000);
        let (to_back, back_events) = mpsc::channel::<()>();
        let (to_front, front_events) = mpsc::channel::<()>();
        let wait = Duration::from_secs(10);
        let backend = std::thread::spawn(move || {
            let mut buf = [0u8; ENTRY];
            let mut seen = 0u32;
            while seen < COUNT {
                let mut any = false;
                while let Some(idx) = back.next_request(&mut buf).expect("next") {
                    assert_eq!(buf, entry(idx));
                    back.write_response(&entry(!idx)).expect("rsp");
                    seen += 1;
                    any = true;
                }
                if any && back.push_responses().expect("push") {
                    to_front.send(()).ok();
                }
                if seen < COUNT && !back.final_check_for_requests().expect("check") {
                    back_events.recv_timeout(wait).expect("lost wakeup (back)");
                }
            }
        });
        let mut buf = [0u8; ENTRY];
        let (mut sent, mut answered) = (0u32, 0u32);
        while answered < COUNT {
            let mut any = false;
            while sent < COUNT && front.free_requests() > 0 {
                front
                    .write_request(&entry(0xffff_0000u32.wrapping_add(sent)))
                    .expect("write");
                sent += 1;
                any = true;
            }
            if any && front.push_requests().expect("push") {
                to_back.send(()).ok();
            }
            while let Some(idx) = front.next_response(&mut buf).expect("next") {
                assert_eq!(buf, entry(!idx));
                answered += 1;
            }
            // Sleep only with nothing to send: a full ring, or everything sent.
            let can_send = sent < COUNT && front.free_requests() > 0;
            if answered < COUNT && !can_send && !front.final_check_for_responses().expect("check") {
                front_events
                    .recv_timeout(wait)
                    .expect("lost wakeup (front)");
            }
        }
        backend.join().expect("backend thread");
    }
}
