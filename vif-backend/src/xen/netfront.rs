//! Netfront: the front end of one netif queue, the uplink of a service qube whose
//! upstream is another qube's netback (sys-firewall's `eth0` towards sys-net), per
//! `io/netif.h` (github.com/xen-project/xen, `xen/include/public/io/netif.h`) over the
//! rings of `io/ring.h`.
//!
//! The front end owns all the memory: it allocates and grants, with [`GrantExport`],
//!
//! * the TX and RX ring pages, writable, whose references it publishes as `tx-ring-ref`
//!   and `rx-ring-ref`, with the event channel it allocates as `event-channel`
//!   ([`Netfront::tx_ring_ref`], [`Netfront::rx_ring_ref`], [`Netfront::event_port`]);
//! * a pool of one page per TX ring slot, read-only to the back end: a frame is copied
//!   into as many as it needs (one per slot, several only with `feature-sg`) and described
//!   by TX requests ([`netif::plan_tx_meta`]): the first with the frame's size and the
//!   checksum flags, a GSO extra-info slot after it for a super-frame, `NETTXF_more_data`
//!   on all but the last. A page comes back to the pool with the response carrying its
//!   request's id;
//! * a pool of one page per RX ring slot, writable, all posted as RX requests. The back
//!   end answers each in its request's ring slot (netif.h: "responses always appear in
//!   the same ring slot as their corresponding request", which is how the page of an
//!   extra-info slot, which has no id, is found), so the page of a response is found by
//!   its ring position, and is posted again once its frame is copied out.
//!
//! The back end is another domain and may be hostile too: responses are copied before
//! they are parsed, checked with [`netif::assemble_rx`] and the ring's index checks, and a
//! TX response for an id not in flight disconnects it.

use std::fmt;
use std::io;
use std::os::fd::RawFd;

use super::netif::{
    self, assemble_rx, plan_tx_meta, Disconnect, Features, Limits, PacketMeta, RxPacket, RxRequest,
    TxBuffer, TxPlan, TxResponse, MAX_FRAME, NETIF_RSP_NULL, NETIF_RSP_OKAY, RX_RING_SIZE, RX_SLOT,
    TX_RING_SIZE, TX_SLOT, XEN_NETIF_MAX_TX_SIZE,
};
use super::ring::{FrontRing, RingError, RingLayout};
use super::{DomId, EventChannels, GrantExport, GrantRef, Port, SharedPages, PAGE_SIZE};

/// RX slots one [`Netfront::recv`] call takes at most.
const RX_BUDGET: u32 = 4 * RX_RING_SIZE;

/// Counters of one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetfrontStats {
    /// Frames written to the TX ring.
    pub tx_frames: u64,
    /// TX requests the back end answered with an error status (`NETIF_RSP_ERROR`,
    /// `NETIF_RSP_DROPPED`).
    pub tx_errors: u64,
    /// Frames [`Netfront::send`] could not describe to this back end (see
    /// [`Features::check`]); dropped.
    pub tx_refused: u64,
    /// Frames handed to the caller by [`Netfront::recv`].
    pub rx_frames: u64,
    /// Frames the back end delivered malformed (not fatally) or with error statuses;
    /// dropped.
    pub rx_dropped: u64,
}

/// The front end of one netif queue; see the module documentation.
pub struct Netfront<G: GrantExport, E: EventChannels> {
    /// Kept for the life of the pages it granted.
    grants: G,
    events: E,
    backend: DomId,
    port: Port,
    features: Features,
    limits: Limits,
    tx_ring_ref: GrantRef,
    rx_ring_ref: GrantRef,
    tx: FrontRing<G::Pages>,
    rx: FrontRing<G::Pages>,
    tx_pool: G::Pages,
    tx_refs: Vec<GrantRef>,
    tx_free: Vec<u16>,
    tx_in_flight: Vec<bool>,
    rx_pool: G::Pages,
    rx_refs: Vec<GrantRef>,
    /// The RX buffer posted in each ring slot (index `& (RX_RING_SIZE - 1)`).
    rx_posted: Vec<u16>,
    dead: Option<Disconnect>,
    stats: NetfrontStats,
    // Reused buffers.
    tx_bufs: Vec<TxBuffer>,
    tx_plan: TxPlan,
    rx_slots: Vec<[u8; RX_SLOT]>,
    rx_pkt: RxPacket,
    frame: Vec<u8>,
}

impl<G: GrantExport, E: EventChannels> fmt::Debug for Netfront<G, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netfront")
            .field("grants", &self.grants)
            .field("backend", &self.backend)
            .field("port", &self.port)
            .field("tx_ring_ref", &self.tx_ring_ref)
            .field("rx_ring_ref", &self.rx_ring_ref)
            .field("features", &self.features)
            .field("tx_free", &self.tx_free.len())
            .field("dead", &self.dead)
            .field("stats", &self.stats)
            .finish()
    }
}

fn ring_fault(ring: &str, e: RingError) -> Disconnect {
    Disconnect::new(format!("{ring} ring: {e}"))
}

fn ring_io(e: RingError) -> io::Error {
    io::Error::other(e.to_string())
}

impl<G: GrantExport, E: EventChannels> Netfront<G, E> {
    /// Grants the rings and buffer pools to domain `backend`, allocates the event channel
    /// for it, and posts every RX buffer. `features` is what was negotiated with the back
    /// end (`rx_copy` is required). The back end is told nothing here: the caller
    /// publishes [`Netfront::tx_ring_ref`], [`Netfront::rx_ring_ref`] and
    /// [`Netfront::event_port`] in XenStore.
    pub fn new(
        mut grants: G,
        mut events: E,
        backend: DomId,
        features: Features,
    ) -> io::Result<Self> {
        if !features.rx_copy {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "netfront needs rx-copy (page flipping is not supported)",
            ));
        }
        let (tx_ring_refs, tx_ring_pages) = grants.grant(backend, 1, true)?;
        let (rx_ring_refs, rx_ring_pages) = grants.grant(backend, 1, true)?;
        let tx_n = TX_RING_SIZE as usize;
        let rx_n = RX_RING_SIZE as usize;
        let (tx_refs, tx_pool) = grants.grant(backend, tx_n, false)?;
        let (rx_refs, rx_pool) = grants.grant(backend, rx_n, true)?;
        let (Some(&tx_ring_ref), Some(&rx_ring_ref)) = (tx_ring_refs.first(), rx_ring_refs.first())
        else {
            return Err(io::Error::other("a ring grant gave no reference"));
        };
        if tx_refs.len() != tx_n || rx_refs.len() != rx_n {
            return Err(io::Error::other("a pool grant gave too few references"));
        }
        let tx = FrontRing::init(
            tx_ring_pages,
            RingLayout::one_page(0, TX_SLOT).map_err(ring_io)?,
        )
        .map_err(ring_io)?;
        let rx = FrontRing::init(
            rx_ring_pages,
            RingLayout::one_page(0, RX_SLOT).map_err(ring_io)?,
        )
        .map_err(ring_io)?;
        let port = events.alloc_unbound(backend)?;
        let mut front = Netfront {
            grants,
            events,
            backend,
            port,
            features,
            limits: Limits::default(),
            tx_ring_ref,
            rx_ring_ref,
            tx,
            rx,
            tx_pool,
            tx_refs,
            // Popped from the end: ids go out from 0 up.
            tx_free: (0..tx_n as u16).rev().collect(),
            tx_in_flight: vec![false; tx_n],
            rx_pool,
            rx_refs,
            rx_posted: vec![0; rx_n],
            dead: None,
            stats: NetfrontStats::default(),
            tx_bufs: Vec::with_capacity(netif::XEN_NETIF_NR_SLOTS_MIN),
            tx_plan: TxPlan::default(),
            rx_slots: Vec::with_capacity(rx_n),
            rx_pkt: RxPacket::default(),
            frame: vec![0u8; MAX_FRAME],
        };
        for buf in 0..rx_n as u16 {
            front.post_rx(buf).map_err(ring_io)?;
        }
        // Not notified: the back end reads the ring when it connects.
        front.rx.push_requests().map_err(ring_io)?;
        Ok(front)
    }

    /// The TX ring's grant, for `tx-ring-ref`.
    pub fn tx_ring_ref(&self) -> GrantRef {
        self.tx_ring_ref
    }

    /// The RX ring's grant, for `rx-ring-ref`.
    pub fn rx_ring_ref(&self) -> GrantRef {
        self.rx_ring_ref
    }

    /// The unbound port for the back end to bind, for `event-channel`.
    pub fn event_port(&self) -> Port {
        self.port
    }

    pub fn backend(&self) -> DomId {
        self.backend
    }

    pub fn features(&self) -> &Features {
        &self.features
    }

    pub fn stats(&self) -> &NetfrontStats {
        &self.stats
    }

    /// Why the back end was disconnected, once it was.
    pub fn disconnected(&self) -> Option<&Disconnect> {
        self.dead.as_ref()
    }

    /// The event channel descriptor: readable when the back end signalled.
    pub fn raw_fd(&self) -> RawFd {
        self.events.raw_fd()
    }

    /// Takes the pending notifications and unmasks the port; whether ours fired.
    pub fn handle_event(&mut self) -> io::Result<bool> {
        let mut fired = false;
        while let Some(p) = self.events.pending()? {
            fired |= p == self.port;
            self.events.unmask(p)?;
        }
        Ok(fired)
    }

    /// Whether received frames are waiting (without arming an event).
    pub fn pending_rx(&mut self) -> Result<bool, Disconnect> {
        self.alive()?;
        let r = self
            .rx
            .unconsumed_responses()
            .map(|n| n > 0)
            .map_err(|e| ring_fault("RX", e));
        self.record(r)
    }

    /// TX pages free now (after taking the back end's answers).
    pub fn tx_free(&mut self) -> Result<usize, Disconnect> {
        self.alive()?;
        let r = self.reclaim_tx();
        self.record(r)?;
        Ok(self.tx_free.len())
    }

    fn alive(&self) -> Result<(), Disconnect> {
        match &self.dead {
            Some(d) => Err(d.clone()),
            None => Ok(()),
        }
    }

    fn record<T>(&mut self, r: Result<T, Disconnect>) -> Result<T, Disconnect> {
        if let Err(e) = &r {
            self.dead.get_or_insert_with(|| e.clone());
        }
        r
    }

    fn notify(&mut self) -> Result<(), Disconnect> {
        self.events
            .notify(self.port)
            .map_err(|e| Disconnect::new(format!("event channel {}: {e}", self.port)))
    }

    /// Writes (privately) an RX request for buffer `buf`, remembering its ring slot.
    fn post_rx(&mut self, buf: u16) -> Result<(), RingError> {
        let req = RxRequest {
            id: buf,
            gref: self.rx_refs[usize::from(buf)],
        };
        let idx = self.rx.write_request(&req.to_bytes())?;
        self.rx_posted[(idx & (RX_RING_SIZE - 1)) as usize] = buf;
        Ok(())
    }

    /// Takes the TX responses published so far: each frees the page of its id.
    fn reclaim_tx(&mut self) -> Result<(), Disconnect> {
        let mut b = [0u8; TX_SLOT];
        while self
            .tx
            .next_response(&mut b)
            .map_err(|e| ring_fault("TX", e))?
            .is_some()
        {
            let r = TxResponse::parse(&b);
            if r.status == NETIF_RSP_NULL {
                continue;
            }
            let id = usize::from(r.id);
            if !self.tx_in_flight.get(id).copied().unwrap_or(false) {
                return Err(Disconnect::new(format!(
                    "TX response for id {} that is not in flight",
                    r.id
                )));
            }
            self.tx_in_flight[id] = false;
            self.tx_free.push(r.id);
            if r.status != NETIF_RSP_OKAY {
                self.stats.tx_errors += 1;
            }
        }
        Ok(())
    }

    /// Whether `frame` with `meta` can go to this back end as it is (see
    /// [`Features::check`]).
    pub fn accepts(&self, frame: &[u8], meta: &PacketMeta) -> bool {
        self.features.check(frame, meta).is_ok()
            && (netif::ETH_HLEN..=XEN_NETIF_MAX_TX_SIZE).contains(&frame.len())
    }

    /// Sends `frame` with `meta`: `Ok(true)` when it was queued on the TX ring,
    /// `Ok(false)` when there are not enough free pages or slots now (retry after an
    /// event: one is asked for). A frame the back end did not negotiate (see
    /// [`Netfront::accepts`]) is dropped, counted in [`NetfrontStats::tx_refused`], and
    /// also returns `Ok(true)`.
    pub fn send(&mut self, frame: &[u8], meta: &PacketMeta) -> Result<bool, Disconnect> {
        self.alive()?;
        let r = self.send_inner(frame, meta);
        self.record(r)
    }

    fn send_inner(&mut self, frame: &[u8], meta: &PacketMeta) -> Result<bool, Disconnect> {
        self.reclaim_tx()?;
        if !self.accepts(frame, meta) {
            self.stats.tx_refused += 1;
            return Ok(true);
        }
        let pages = frame.len().div_ceil(PAGE_SIZE);
        let slots = pages + usize::from(meta.gso.is_some());
        let room = |f: &Self| f.tx_free.len() >= pages && f.tx.free_requests() as usize >= slots;
        if !room(self) {
            // Ask for an event on the next answer, then look once more (it may have
            // come in between).
            self.tx
                .final_check_for_responses()
                .map_err(|e| ring_fault("TX", e))?;
            self.reclaim_tx()?;
            if !room(self) {
                return Ok(false);
            }
        }
        self.tx_bufs.clear();
        for _ in 0..pages {
            let Some(id) = self.tx_free.pop() else {
                return Err(Disconnect::new("internal: TX pool ran dry"));
            };
            self.tx_bufs.push(TxBuffer {
                gref: self.tx_refs[usize::from(id)],
                id,
                offset: 0,
                len: PAGE_SIZE as u16,
            });
        }
        let planned = plan_tx_meta(
            frame.len(),
            meta,
            self.features.peer_gso(),
            &self.tx_bufs,
            &mut self.tx_plan,
        );
        if planned.is_err() {
            // Checked by `accepts`, so not expected: give the pages back.
            self.tx_free.extend(self.tx_bufs.iter().rev().map(|b| b.id));
            self.stats.tx_refused += 1;
            return Ok(true);
        }
        for p in &self.tx_plan.pieces {
            let b = self.tx_bufs[p.buffer];
            let src = &frame[p.frame_offset..p.frame_offset + usize::from(p.len)];
            self.tx_pool
                .write(usize::from(b.id) * PAGE_SIZE + usize::from(b.offset), src)
                .map_err(|e| Disconnect::new(format!("TX pool: {e}")))?;
        }
        for b in &self.tx_bufs {
            self.tx_in_flight[usize::from(b.id)] = true;
        }
        for s in &self.tx_plan.slots {
            self.tx
                .write_request(&s.to_bytes())
                .map_err(|e| ring_fault("TX", e))?;
        }
        if self.tx.push_requests().map_err(|e| ring_fault("TX", e))? {
            self.notify()?;
        }
        self.stats.tx_frames += 1;
        Ok(true)
    }

    /// Takes the frames the back end delivered, calling `sink` with each frame and its
    /// metadata, posts their pages again, and returns how many frames were delivered.
    /// Stops when the ring is empty (having re-armed the event) or after a budget of
    /// slots (then [`Netfront::pending_rx`] is true). TX answers are taken too.
    pub fn recv(&mut self, sink: &mut impl FnMut(&[u8], &PacketMeta)) -> Result<usize, Disconnect> {
        self.alive()?;
        let r = self.reclaim_tx().and_then(|()| self.recv_inner(sink));
        self.record(r)
    }

    fn recv_inner(
        &mut self,
        sink: &mut impl FnMut(&[u8], &PacketMeta),
    ) -> Result<usize, Disconnect> {
        let rx_fault = |e| ring_fault("RX", e);
        let mut delivered = 0;
        let mut budget = RX_BUDGET;
        loop {
            let n = self.rx.unconsumed_responses().map_err(rx_fault)?;
            if n == 0 {
                if self.rx.final_check_for_responses().map_err(rx_fault)? {
                    continue;
                }
                break;
            }
            if budget == 0 {
                break;
            }
            budget = budget.saturating_sub(n);
            let first = self.rx.rsp_cons();
            self.rx_slots.clear();
            for _ in 0..n {
                let mut b = [0u8; RX_SLOT];
                match self.rx.next_response(&mut b).map_err(rx_fault)? {
                    Some(_) => self.rx_slots.push(b),
                    None => break,
                }
            }
            // A back end publishes a frame's responses together, so a frame running past
            // the producer is fatal.
            let mut pos = 0;
            while pos < self.rx_slots.len() {
                let at = first.wrapping_add(pos as u32);
                assemble_rx(&self.rx_slots[pos..], &self.limits, &mut self.rx_pkt)
                    .map_err(|e| Disconnect::new(format!("RX frame at response {at}: {e}")))?;
                let pkt = &self.rx_pkt;
                if pkt.dropped.is_some() {
                    self.stats.rx_dropped += 1;
                } else {
                    let mut len = 0;
                    for f in &pkt.fragments {
                        let slot = at.wrapping_add(f.slot as u32) & (RX_RING_SIZE - 1);
                        let buf = usize::from(self.rx_posted[slot as usize]);
                        let n = usize::from(f.len);
                        let dst = self
                            .frame
                            .get_mut(len..len + n)
                            .ok_or_else(|| Disconnect::new("internal: RX frame over MAX_FRAME"))?;
                        self.rx_pool
                            .read(buf * PAGE_SIZE + usize::from(f.offset), dst)
                            .map_err(|e| Disconnect::new(format!("RX pool: {e}")))?;
                        len += n;
                    }
                    sink(&self.frame[..len], &pkt.meta);
                    delivered += 1;
                    self.stats.rx_frames += 1;
                }
                pos += pkt.slots.max(1);
            }
            // Every slot's page is free again, the extra-info slots' too.
            for k in 0..self.rx_slots.len() {
                let slot = first.wrapping_add(k as u32) & (RX_RING_SIZE - 1);
                let buf = self.rx_posted[slot as usize];
                self.post_rx(buf).map_err(rx_fault)?;
            }
            if self.rx.push_requests().map_err(rx_fault)? {
                self.notify()?;
            }
        }
        Ok(delivered)
    }
}
