//! Netback: the back end of one netif queue, serving a client qube's netfront (its `eth0`,
//! our `vif<domid>.<n>`), per `io/netif.h` (github.com/xen-project/xen,
//! `xen/include/public/io/netif.h`) over the rings of `io/ring.h`.
//!
//! The front end owns everything shared: it grants the TX and RX ring pages, the pages
//! its TX frames are in (read-only), and the empty pages it posts for RX (writable). We
//! map them with [`GrantImport`]:
//!
//! * TX (guest to us, [`Netback::poll_tx`]): the requests published on the TX ring are
//!   copied out in one batch and validated packet by packet with
//!   [`netif::assemble_tx`]; the data grants of every packet of the batch are mapped
//!   read-only in one [`GrantImport::map`] call (each map is a round trip to the
//!   hypervisor), the bytes copied into our own buffer and handed to the caller, and every
//!   slot answered (`NETIF_RSP_OKAY`, `NETIF_RSP_ERROR` for a malformed packet,
//!   `NETIF_RSP_DROPPED` for one we do not take, `NETIF_RSP_NULL` for extra-info slots).
//! * RX (us to the guest, [`Netback::send_rx`]): a frame takes one posted RX request per
//!   page, plus one for a GSO extra-info slot; the pages are mapped writable, filled from
//!   offset 0, and answered in the slots of the requests they used (netif.h: frontends
//!   "assume that responses always appear in the same ring slot as their corresponding
//!   request").
//!
//! Linux netback copies with `GNTTABOP_copy` instead of mapping; the transport traits
//! here have no grant copy, so a mapping per batch stands in for it (a persistent-grant
//! cache would remove the per-batch mapping; not done).
//!
//! Notifications follow `io/ring.h`: responses are pushed with
//! `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY` and the event channel signalled only if the
//! front end asked; before the caller sleeps, `RING_FINAL_CHECK_FOR_REQUESTS` re-arms
//! `req_event`. Both rings share one event channel (no `feature-split-event-channels`).
//!
//! The front end may be hostile. Every slot is copied before it is parsed, every index it
//! publishes is checked ([`BackRing`]), every fragment is checked to lie within its page
//! before any grant is mapped, and every copy goes through [`SharedPages`], bounded by the
//! mapping. What no correct front end does is a [`Disconnect`], returned from then on by
//! every call; nothing it writes can make this code panic or read outside what it granted.

use std::fmt;
use std::io;
use std::os::fd::RawFd;

use super::netif::{
    self, assemble_tx, plan_rx_meta, rx_requests_needed_meta, Disconnect, Features, Limits,
    PacketMeta, RxPlan, RxRequest, RxResponse, RxSlot, TxPacket, MAX_FRAME, NETIF_RSP_DROPPED,
    NETIF_RSP_ERROR, NETIF_RSP_NULL, NETIF_RSP_OKAY, RX_SLOT, TX_RING_SIZE, TX_SLOT,
};
use super::ring::{BackRing, RingError, RingLayout};
use super::{DomId, EventChannels, GrantImport, GrantRef, Port, SharedPages, PAGE_SIZE};

/// TX slots one [`Netback::poll_tx`] call takes at most (four rings' worth), so a front
/// end that keeps its ring full cannot starve the caller's other work.
const TX_BUDGET: u32 = 4 * TX_RING_SIZE;

#[cfg(test)]
thread_local! {
    /// Disconnects this thread's back ends logged, so a test can see each logged once.
    pub(crate) static DISCONNECTS_LOGGED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Counters of one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetbackStats {
    /// Frames handed to the caller by [`Netback::poll_tx`].
    pub tx_frames: u64,
    /// TX packets answered with errors: malformed but not fatal (netif::assemble_tx's
    /// dropped packets), or with a GSO type we did not offer.
    pub tx_dropped: u64,
    /// Frames written into the front end's RX buffers.
    pub rx_frames: u64,
    /// Frames [`Netback::send_rx`] could not deliver as they are (see
    /// [`Features::check`]); the caller should have finished them first.
    pub rx_refused: u64,
    /// Calls of [`Netback::send_rx`] that found too few buffers posted.
    pub rx_no_buffers: u64,
}

/// The back end of one netif queue; see the module documentation.
pub struct Netback<I: GrantImport, E: EventChannels> {
    grants: I,
    events: E,
    frontend: DomId,
    port: Port,
    features: Features,
    limits: Limits,
    tx: BackRing<I::Mapping>,
    rx: BackRing<I::Mapping>,
    dead: Option<Disconnect>,
    stats: NetbackStats,
    // Reused buffers, so the data path does not allocate once warmed up.
    tx_slots: Vec<[u8; TX_SLOT]>,
    packets: Vec<TxPacket>,
    refs: Vec<GrantRef>,
    /// One bit per TX request id: set while the id is in the batch being processed.
    ids: Vec<u64>,
    ids_used: Vec<u16>,
    frame: Vec<u8>,
    rx_reqs: Vec<RxRequest>,
    rx_plan: RxPlan,
    rx_refs: Vec<GrantRef>,
}

impl<I: GrantImport, E: EventChannels> fmt::Debug for Netback<I, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netback")
            .field("frontend", &self.frontend)
            .field("port", &self.port)
            .field("features", &self.features)
            .field("tx_req_cons", &self.tx.req_cons())
            .field("rx_req_cons", &self.rx.req_cons())
            .field("dead", &self.dead)
            .field("stats", &self.stats)
            .finish()
    }
}

fn ring_fault(ring: &str, e: RingError) -> Disconnect {
    Disconnect::new(format!("{ring} ring: {e}"))
}

impl<I: GrantImport, E: EventChannels> Netback<I, E> {
    /// Attaches to the rings domain `frontend` published (`tx-ring-ref`, `rx-ring-ref` in
    /// its XenStore directory), both mapped writable, signalling on `port`, a local port
    /// already bound to the front end's `event-channel`. `features` is what was negotiated;
    /// `rx_copy` must be among it. Refusals name what the front end gave.
    pub fn new(
        mut grants: I,
        events: E,
        frontend: DomId,
        tx_ring_ref: GrantRef,
        rx_ring_ref: GrantRef,
        port: Port,
        features: Features,
    ) -> Result<Self, Disconnect> {
        if !features.rx_copy {
            return Err(Disconnect::new(
                "front end did not request rx-copy (page flipping is not supported)",
            ));
        }
        let map = |grants: &mut I, r: GrantRef, what: &str| {
            grants
                .map(frontend, &[r], true)
                .map_err(|e| Disconnect::new(format!("{what} {r} from domain {frontend}: {e}")))
        };
        let tx_pages = map(&mut grants, tx_ring_ref, "tx-ring-ref")?;
        let rx_pages = map(&mut grants, rx_ring_ref, "rx-ring-ref")?;
        let layout = |entry| {
            RingLayout::one_page(0, entry).map_err(|e| Disconnect::new(format!("layout: {e}")))
        };
        let tx = BackRing::attach(tx_pages, layout(TX_SLOT)?).map_err(|e| ring_fault("TX", e))?;
        let rx = BackRing::attach(rx_pages, layout(RX_SLOT)?).map_err(|e| ring_fault("RX", e))?;
        Ok(Netback {
            grants,
            events,
            frontend,
            port,
            features,
            limits: Limits::default(),
            tx,
            rx,
            dead: None,
            stats: NetbackStats::default(),
            tx_slots: Vec::with_capacity(TX_RING_SIZE as usize),
            packets: Vec::new(),
            refs: Vec::with_capacity(TX_RING_SIZE as usize),
            ids: vec![0u64; 65_536 / 64],
            ids_used: Vec::with_capacity(TX_RING_SIZE as usize),
            frame: vec![0u8; MAX_FRAME],
            rx_reqs: Vec::with_capacity(netif::XEN_NETIF_NR_SLOTS_MIN),
            rx_plan: RxPlan::default(),
            rx_refs: Vec::with_capacity(netif::XEN_NETIF_NR_SLOTS_MIN),
        })
    }

    pub fn frontend(&self) -> DomId {
        self.frontend
    }

    pub fn port(&self) -> Port {
        self.port
    }

    pub fn features(&self) -> &Features {
        &self.features
    }

    pub fn stats(&self) -> &NetbackStats {
        &self.stats
    }

    /// Why the front end was disconnected, once it was.
    pub fn disconnected(&self) -> Option<&Disconnect> {
        self.dead.as_ref()
    }

    /// The event channel descriptor: readable when the front end signalled; then call
    /// [`Netback::handle_event`], [`Netback::poll_tx`], and retry queued RX frames.
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

    /// Whether TX requests are waiting (without arming an event).
    pub fn pending_tx(&mut self) -> Result<bool, Disconnect> {
        self.alive()?;
        let r = self
            .tx
            .unconsumed_requests()
            .map(|n| n > 0)
            .map_err(|e| ring_fault("TX", e));
        self.record(r)
    }

    /// RX requests posted and not yet used: how many pages the front end has given us.
    pub fn rx_buffers(&mut self) -> Result<u32, Disconnect> {
        self.alive()?;
        let r = self
            .rx
            .unconsumed_requests()
            .map_err(|e| ring_fault("RX", e));
        self.record(r)
    }

    /// Whether frames may be queued for later when [`Netback::send_rx`] finds no buffers:
    /// only if the front end notifies when it posts (`feature-rx-notify`); otherwise the
    /// caller drops, or polls.
    pub fn can_queue_rx(&self) -> bool {
        self.features.rx_notify
    }

    fn alive(&self) -> Result<(), Disconnect> {
        match &self.dead {
            Some(d) => Err(d.clone()),
            None => Ok(()),
        }
    }

    /// Keeps the first fatal error, and logs it then: once per front end, since every
    /// later call answers from `dead` in [`Netback::alive`] before it gets here. Nothing
    /// else reports a disconnect (the caller only sees the `Err`), and the reason is what
    /// the operator needs to tell a broken or hostile guest from a bug of ours.
    fn record<T>(&mut self, r: Result<T, Disconnect>) -> Result<T, Disconnect> {
        if let Err(e) = &r {
            if self.dead.is_none() {
                tracing::warn!(
                    frontend = self.frontend,
                    port = self.port.0,
                    reason = e.reason(),
                    "netback: front end disconnected"
                );
                #[cfg(test)]
                DISCONNECTS_LOGGED.with(|n| n.set(n.get() + 1));
                self.dead = Some(e.clone());
            }
        }
        r
    }

    fn notify(&mut self) -> Result<(), Disconnect> {
        self.events
            .notify(self.port)
            .map_err(|e| Disconnect::new(format!("event channel {}: {e}", self.port)))
    }

    /// Takes the frames the front end sent, calling `sink` with each frame and its
    /// metadata (in ring order), answers their requests, and returns how many frames were
    /// delivered. Stops when the ring is empty (having re-armed the event, so the next
    /// request notifies) or after a budget of slots (then [`Netback::pending_tx`] is
    /// true, and no event will come for what is already there).
    pub fn poll_tx(
        &mut self,
        sink: &mut impl FnMut(&[u8], &PacketMeta),
    ) -> Result<usize, Disconnect> {
        self.alive()?;
        let r = self.poll_tx_inner(sink);
        self.record(r)
    }

    fn poll_tx_inner(
        &mut self,
        sink: &mut impl FnMut(&[u8], &PacketMeta),
    ) -> Result<usize, Disconnect> {
        let mut delivered = 0;
        let mut budget = TX_BUDGET;
        loop {
            let n = self
                .tx
                .unconsumed_requests()
                .map_err(|e| ring_fault("TX", e))?;
            if n == 0 {
                if self
                    .tx
                    .final_check_for_requests()
                    .map_err(|e| ring_fault("TX", e))?
                {
                    continue;
                }
                break;
            }
            if budget == 0 {
                break;
            }
            budget = budget.saturating_sub(n);
            let first = self.tx.req_cons();
            self.tx_slots.clear();
            for _ in 0..n {
                let mut b = [0u8; TX_SLOT];
                match self.tx.next_request(&mut b) {
                    Ok(Some(_)) => self.tx_slots.push(b),
                    Ok(None) => break,
                    Err(e) => return Err(ring_fault("TX", e)),
                }
            }
            delivered += self.tx_batch(first, sink)?;
        }
        Ok(delivered)
    }

    /// One batch: the slots just consumed, starting at ring index `first`, all of them
    /// whole packets (a front end publishes a packet's slots together; one that ends past
    /// the producer is fatal, as in Linux netback's `xenvif_count_requests`).
    fn tx_batch(
        &mut self,
        first: u32,
        sink: &mut impl FnMut(&[u8], &PacketMeta),
    ) -> Result<usize, Disconnect> {
        let peer_gso = self.features.peer_gso();
        let mut npk = 0;
        let mut pos = 0;
        self.ids_used.clear();
        let result = (|| {
            while pos < self.tx_slots.len() {
                if self.packets.len() == npk {
                    self.packets.push(TxPacket::default());
                }
                let pkt = &mut self.packets[npk];
                let at = first.wrapping_add(pos as u32);
                assemble_tx(&self.tx_slots[pos..], &self.limits, pkt)
                    .map_err(|e| Disconnect::new(format!("TX packet at request {at}: {e}")))?;
                // An id comes back in its response, so the front end cannot have two
                // requests with one id unanswered: answers to this batch go out only
                // after all of it is read, so a repeat within it is an id reused in
                // flight.
                for r in &pkt.responses {
                    if r.status == NETIF_RSP_NULL {
                        continue;
                    }
                    let (word, bit) = (usize::from(r.id) / 64, 1u64 << (r.id % 64));
                    if self.ids[word] & bit != 0 {
                        return Err(Disconnect::new(format!(
                            "TX packet at request {at}: id {} reused while in flight",
                            r.id
                        )));
                    }
                    self.ids[word] |= bit;
                    self.ids_used.push(r.id);
                }
                if pkt.dropped.is_none() {
                    if let Some(g) = pkt.meta.gso {
                        // A GSO type not negotiated: well-formed, but not ours to take.
                        if !peer_gso_accepts(peer_gso, g.ty) {
                            pkt.pieces.clear();
                            for r in &mut pkt.responses {
                                if r.status == NETIF_RSP_OKAY {
                                    r.status = NETIF_RSP_DROPPED;
                                }
                            }
                        }
                    }
                }
                pos += pkt.slots.max(1);
                npk += 1;
            }
            Ok(())
        })();
        for &id in &self.ids_used {
            self.ids[usize::from(id) / 64] &= !(1u64 << (id % 64));
        }
        result?;

        // Every data page of the batch, once each, in one mapping.
        self.refs.clear();
        for pkt in &self.packets[..npk] {
            self.refs.extend(pkt.pieces.iter().map(|p| p.gref));
        }
        self.refs.sort_unstable();
        self.refs.dedup();
        let mapping = if self.refs.is_empty() {
            None
        } else {
            Some(
                self.grants
                    .map(self.frontend, &self.refs, false)
                    .map_err(|e| {
                        Disconnect::new(format!(
                            "TX data grants of requests {first}..{}: {e}",
                            first.wrapping_add(self.tx_slots.len() as u32)
                        ))
                    })?,
            )
        };

        let mut delivered = 0;
        for pkt in &self.packets[..npk] {
            // Dropped by assembly (answered ERROR) or by policy (DROPPED, no pieces).
            if pkt.dropped.is_some() || pkt.pieces.is_empty() {
                self.stats.tx_dropped += 1;
                continue;
            }
            let Some(map) = &mapping else {
                // Not dropped means at least one piece, so there is a mapping.
                return Err(Disconnect::new("internal: TX packet without a mapping"));
            };
            let mut at = 0;
            for p in &pkt.pieces {
                let len = usize::from(p.len);
                let page = self
                    .refs
                    .binary_search(&p.gref)
                    .map_err(|_| Disconnect::new("internal: TX piece of an unmapped grant"))?;
                let dst = self
                    .frame
                    .get_mut(at..at + len)
                    .ok_or_else(|| Disconnect::new("internal: TX packet over MAX_FRAME"))?;
                map.read(page * PAGE_SIZE + usize::from(p.offset), dst)
                    .map_err(|e| Disconnect::new(format!("TX data {}: {e}", p.gref)))?;
                at += len;
            }
            sink(&self.frame[..at], &pkt.meta);
            delivered += 1;
        }
        drop(mapping);
        self.stats.tx_frames += delivered as u64;

        for pkt in &self.packets[..npk] {
            for r in &pkt.responses {
                self.tx
                    .write_response(&r.to_bytes())
                    .map_err(|e| ring_fault("TX", e))?;
            }
        }
        if self.tx.push_responses().map_err(|e| ring_fault("TX", e))? {
            self.notify()?;
        }
        Ok(delivered)
    }

    /// Whether `frame` with `meta` can go to this front end as it is (see
    /// [`Features::check`]).
    pub fn accepts(&self, frame: &[u8], meta: &PacketMeta) -> bool {
        self.features.check(frame, meta).is_ok()
            && rx_requests_needed_meta(frame.len(), meta, self.features.peer_gso()).is_ok()
    }

    /// Delivers `frame` with `meta` into the RX buffers the front end posted: `Ok(true)`
    /// when it was taken, `Ok(false)` when too few buffers are posted now (nothing was
    /// consumed; the caller drops the frame or, if [`Netback::can_queue_rx`], queues it
    /// and retries after an event). A frame the front end did not negotiate (see
    /// [`Netback::accepts`]) is dropped and counted in [`NetbackStats::rx_refused`], and
    /// also returns `Ok(true)`.
    pub fn send_rx(&mut self, frame: &[u8], meta: &PacketMeta) -> Result<bool, Disconnect> {
        self.alive()?;
        if self.features.check(frame, meta).is_err() {
            self.stats.rx_refused += 1;
            return Ok(true);
        }
        let needed = match rx_requests_needed_meta(frame.len(), meta, self.features.peer_gso()) {
            Ok(n) => n as u32,
            Err(_) => {
                self.stats.rx_refused += 1;
                return Ok(true);
            }
        };
        let r = self.send_rx_inner(frame, meta, needed);
        self.record(r)
    }

    fn send_rx_inner(
        &mut self,
        frame: &[u8],
        meta: &PacketMeta,
        needed: u32,
    ) -> Result<bool, Disconnect> {
        let rx_fault = |e| ring_fault("RX", e);
        let mut have = self.rx.unconsumed_requests().map_err(rx_fault)?;
        if have < needed {
            // Ask for an event on the next post (and catch one that raced us).
            self.rx.final_check_for_requests().map_err(rx_fault)?;
            have = self.rx.unconsumed_requests().map_err(rx_fault)?;
            if have < needed {
                self.stats.rx_no_buffers += 1;
                return Ok(false);
            }
        }
        self.rx_reqs.clear();
        for _ in 0..needed {
            let mut b = [0u8; RX_SLOT];
            match self.rx.next_request(&mut b).map_err(rx_fault)? {
                Some(_) => self.rx_reqs.push(RxRequest::parse(&b)),
                None => return Err(Disconnect::new("RX ring: posted requests vanished")),
            }
        }
        let planned = plan_rx_meta(
            frame.len(),
            meta,
            self.features.peer_gso(),
            &self.rx_reqs,
            &mut self.rx_plan,
        );
        if planned.is_err() {
            // Checked above, so not expected; the consumed requests are answered all the
            // same, with errors, so the ring stays in step.
            for r in &self.rx_reqs {
                let rsp = RxResponse {
                    id: r.id,
                    offset: 0,
                    flags: 0,
                    status: NETIF_RSP_ERROR,
                };
                self.rx.write_response(&rsp.to_bytes()).map_err(rx_fault)?;
            }
            self.stats.rx_refused += 1;
        } else {
            self.rx_refs.clear();
            self.rx_refs
                .extend(self.rx_plan.copies.iter().map(|c| c.gref));
            let map = self
                .grants
                .map(self.frontend, &self.rx_refs, true)
                .map_err(|e| Disconnect::new(format!("RX buffer grants: {e}")))?;
            for (k, c) in self.rx_plan.copies.iter().enumerate() {
                let src = frame
                    .get(c.frame_offset..c.frame_offset + usize::from(c.len))
                    .ok_or_else(|| Disconnect::new("internal: RX copy past the frame"))?;
                map.write(k * PAGE_SIZE, src)
                    .map_err(|e| Disconnect::new(format!("RX buffer {}: {e}", c.gref)))?;
            }
            drop(map);
            for s in &self.rx_plan.responses {
                let b = match s {
                    RxSlot::Response(r) => r.to_bytes(),
                    RxSlot::Extra(e) => e.to_bytes(),
                };
                self.rx.write_response(&b).map_err(rx_fault)?;
            }
            self.stats.rx_frames += 1;
        }
        if self.rx.push_responses().map_err(rx_fault)? {
            self.notify()?;
        }
        Ok(true)
    }
}

fn peer_gso_accepts(peer: netif::PeerGso, ty: netif::GsoType) -> bool {
    match ty {
        netif::GsoType::TcpV4 => peer.tcpv4,
        netif::GsoType::TcpV6 => peer.tcpv6,
    }
}
