//! The netif ring as vif-backend [`Device`]s, so a service owns its Xen vifs the way it owns
//! an AF_PACKET socket: [`NetbackDevice`] is a client qube's vif (`vif<domid>.<devid>`, we
//! are the back end), [`NetfrontDevice`] the uplink (`device/vif/0`, we are the front end).
//!
//! Each device carries its whole life cycle: its own XenStore connection and watch, the
//! xenbus handshake ([`super::xenbus`]), and the ring end ([`Netback`], [`Netfront`]) once
//! the peer is connected. A peer that closes and comes back (Windows PV drivers do on every
//! boot) gets fresh rings; a peer that breaks the protocol is disconnected with the reason
//! logged and written to the device's `error` key, and may reconnect. Frames sent while no
//! peer is connected are dropped and counted, as a kernel vif whose carrier is down does.
//!
//! The service's loop polls one descriptor per device ([`Device::raw_fd`]): an epoll set
//! over the XenStore connection, the event channel, and an eventfd this module raises
//! itself while work is left (a TX budget ran out, RX frames wait for buffers), because the
//! rings give no new event for what is already on them.
//!
//! Offload crosses as netif describes it: a frame from a ring keeps its `csum_blank`,
//! `data_validated` and GSO metadata as an [`crate::Offload`]; a frame whose offload the peer
//! did not negotiate is finished here first ([`crate::offload::finish`]).
//!
//! The only `unsafe` here is the epoll set and its eventfd ([`Readiness`]).
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use super::emul::Domain;
use super::linux::{Evtchn, Gntalloc, Gntdev};
use super::netback::Netback;
use super::netfront::Netfront;
use super::netif::{Disconnect, Features, PacketMeta};
use super::qubesdb::XenAccess;
use super::xenbus::{
    BackendAction, BackendFeatures, BackendHandshake, FrontendAction, FrontendHandshake,
    FrontendRequest, FrontendRings, HandshakeError,
};
use super::xenstore::client::Client;
use super::xenstore::Store;
use super::{EventChannels, GrantExport, GrantImport};
use crate::offload;
use crate::{Device, RxBurst, TxFrame, MAX_FRAME};

/// Frames kept for a peer whose ring is full: netif.h lets a back end queue only for a
/// front end with `feature-rx-notify` (it will be woken when buffers come), and a front end
/// is woken by its TX answers. Past this, frames are dropped, as a full qdisc drops.
pub const QUEUE_FRAMES: usize = 256;

/// How long the uplink waits for the toolstack's `backend` keys in `device/vif/<n>`.
pub const FRONTEND_KEYS_WAIT: Duration = Duration::from_secs(10);

/// Where a device's grant and event-channel handles come from: a fresh set for every
/// connection, so a reconnect starts from nothing the last peer touched.
pub trait XenHandles: fmt::Debug {
    type Import: GrantImport;
    type Export: GrantExport;
    type Events: EventChannels;

    fn import(&mut self) -> io::Result<Self::Import>;
    fn export(&mut self) -> io::Result<Self::Export>;
    fn events(&mut self) -> io::Result<Self::Events>;
}

/// The Linux Xen devices: `/dev/xen/gntdev`, `/dev/xen/gntalloc`, `/dev/xen/evtchn`.
#[derive(Debug, Default)]
pub struct LinuxHandles;

impl XenHandles for LinuxHandles {
    type Import = Gntdev;
    type Export = Gntalloc;
    type Events = Evtchn;

    fn import(&mut self) -> io::Result<Gntdev> {
        Gntdev::open()
    }
    fn export(&mut self) -> io::Result<Gntalloc> {
        Gntalloc::open()
    }
    fn events(&mut self) -> io::Result<Evtchn> {
        Evtchn::open()
    }
}

/// A domain of the repository's emulated hypervisor.
#[derive(Debug)]
pub struct EmulHandles(pub Domain);

impl XenHandles for EmulHandles {
    type Import = super::emul::EmulGrants;
    type Export = super::emul::EmulGrants;
    type Events = super::emul::EmulEvents;

    fn import(&mut self) -> io::Result<Self::Import> {
        Ok(self.0.grants())
    }
    fn export(&mut self) -> io::Result<Self::Export> {
        Ok(self.0.grants())
    }
    fn events(&mut self) -> io::Result<Self::Events> {
        self.0.events()
    }
}

/// Counters of one Xen device, for `status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XenDeviceStats {
    /// Times the peer connected.
    pub connects: u64,
    /// Times it went: closed, broke the protocol, or its directory went.
    pub disconnects: u64,
    /// Frames received from the peer.
    pub rx_frames: u64,
    /// Frames handed to the peer.
    pub tx_frames: u64,
    /// Frames to send with no peer connected.
    pub dropped_no_peer: u64,
    /// Frames dropped because the peer's ring stayed full past [`QUEUE_FRAMES`].
    pub dropped_ring_full: u64,
    /// Frames with offload that could be neither passed nor finished.
    pub dropped_offload: u64,
}

/// An epoll set over a device's descriptors, plus an eventfd that keeps it readable while
/// the device has work left that no descriptor will announce.
#[derive(Debug)]
struct Readiness {
    epoll: OwnedFd,
    again: OwnedFd,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Readiness {
    fn new() -> io::Result<Self> {
        // SAFETY: plain syscalls returning new descriptors, owned at once.
        let epoll = unsafe { OwnedFd::from_raw_fd(cvt(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
        let again = unsafe {
            OwnedFd::from_raw_fd(cvt(libc::eventfd(
                0,
                libc::EFD_CLOEXEC | libc::EFD_NONBLOCK,
            ))?)
        };
        let r = Readiness { epoll, again };
        r.add(r.again.as_raw_fd())?;
        Ok(r)
    }

    fn add(&self, fd: RawFd) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: fd as u64,
        };
        // SAFETY: `ev` is a live epoll_event for the call; both descriptors are open.
        cvt(unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) })
            .map(drop)
    }

    fn remove(&self, fd: RawFd) {
        // SAFETY: removing a descriptor from our own epoll set; a stale one gives an error,
        // ignored (closing a descriptor removes it anyway).
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            );
        }
    }

    /// Keeps the set readable (or stops doing so).
    fn set_again(&self, on: bool) {
        let mut v: u64 = 1;
        let p = &mut v as *mut u64 as *mut libc::c_void;
        // SAFETY: an 8-byte read or write of our own eventfd into a live u64; EAGAIN (already
        // clear, or at the counter's limit) is what non-blocking mode is for.
        unsafe {
            if on {
                libc::write(self.again.as_raw_fd(), p, 8);
            } else {
                libc::read(self.again.as_raw_fd(), p, 8);
            }
        }
    }
}

fn store_io(e: impl fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// A connected ring end as a device's data path sees it: [`Netback`] (frames to the
/// frontend are its RX, from it its TX) or [`Netfront`] (the other way round).
trait RingEnd {
    fn raw_fd(&self) -> RawFd;
    fn handle_event(&mut self) -> io::Result<bool>;
    /// Whether the peer negotiated what `frame` needs as it is.
    fn accepts(&self, frame: &[u8], meta: &PacketMeta) -> bool;
    /// Hands a frame to the peer; `Ok(false)`: its ring is full now.
    fn put(&mut self, frame: &[u8], meta: &PacketMeta) -> Result<bool, Disconnect>;
    /// Whether a frame that found the ring full may wait for the peer's next event.
    fn may_queue(&self) -> bool;
    /// Takes what the peer sent, up to the ring end's own budget.
    fn take(&mut self, sink: &mut dyn FnMut(&[u8], &PacketMeta)) -> Result<usize, Disconnect>;
    /// Whether the budget left frames on the ring (no event will announce them).
    fn more(&mut self) -> Result<bool, Disconnect>;
}

impl<I: GrantImport, E: EventChannels> RingEnd for Netback<I, E> {
    fn raw_fd(&self) -> RawFd {
        Netback::raw_fd(self)
    }
    fn handle_event(&mut self) -> io::Result<bool> {
        Netback::handle_event(self)
    }
    fn accepts(&self, frame: &[u8], meta: &PacketMeta) -> bool {
        Netback::accepts(self, frame, meta)
    }
    fn put(&mut self, frame: &[u8], meta: &PacketMeta) -> Result<bool, Disconnect> {
        self.send_rx(frame, meta)
    }
    fn may_queue(&self) -> bool {
        // netif.h: without feature-rx-notify the back end "cannot safely queue packets".
        self.can_queue_rx()
    }
    fn take(&mut self, sink: &mut dyn FnMut(&[u8], &PacketMeta)) -> Result<usize, Disconnect> {
        self.poll_tx(&mut |f: &[u8], m: &PacketMeta| sink(f, m))
    }
    fn more(&mut self) -> Result<bool, Disconnect> {
        self.pending_tx()
    }
}

impl<G: GrantExport, E: EventChannels> RingEnd for Netfront<G, E> {
    fn raw_fd(&self) -> RawFd {
        Netfront::raw_fd(self)
    }
    fn handle_event(&mut self) -> io::Result<bool> {
        Netfront::handle_event(self)
    }
    fn accepts(&self, frame: &[u8], meta: &PacketMeta) -> bool {
        Netfront::accepts(self, frame, meta)
    }
    fn put(&mut self, frame: &[u8], meta: &PacketMeta) -> Result<bool, Disconnect> {
        self.send(frame, meta)
    }
    fn may_queue(&self) -> bool {
        // The back end's TX answers free the pages, and each answer is an event.
        true
    }
    fn take(&mut self, sink: &mut dyn FnMut(&[u8], &PacketMeta)) -> Result<usize, Disconnect> {
        self.recv(&mut |f: &[u8], m: &PacketMeta| sink(f, m))
    }
    fn more(&mut self) -> Result<bool, Disconnect> {
        self.pending_rx()
    }
}

/// What both devices do with frames once a peer is connected: the ring end, the frames
/// waiting for room on it, the counters. A `Disconnect` returned is the peer's fault, for
/// the device to act on with its handshake.
#[derive(Debug)]
struct DataPath<R> {
    end: Option<R>,
    /// Frames may flow: a netback once connected; a netfront once its back end says
    /// Connected (netfront's rule: nothing before).
    open: bool,
    queue: VecDeque<(Vec<u8>, PacketMeta)>,
    copy: Vec<u8>,
    scratch: Vec<u8>,
    ready: Readiness,
    stats: XenDeviceStats,
    last_disconnect: Option<String>,
}

impl<R: RingEnd> DataPath<R> {
    fn new(ready: Readiness) -> Self {
        DataPath {
            end: None,
            open: false,
            queue: VecDeque::new(),
            copy: Vec::with_capacity(MAX_FRAME),
            scratch: Vec::with_capacity(MAX_FRAME),
            ready,
            stats: XenDeviceStats::default(),
            last_disconnect: None,
        }
    }

    fn attach(&mut self, end: R) -> io::Result<()> {
        self.ready.add(end.raw_fd())?;
        self.end = Some(end);
        Ok(())
    }

    /// The traffic may flow now; counted as a connect.
    fn opened(&mut self) {
        self.open = self.end.is_some();
        if self.open {
            self.stats.connects += 1;
            // Frames may be on the ring already.
            self.ready.set_again(true);
        }
    }

    /// Drops the ring end; whether there was one (then `why` is kept and logged).
    fn detach(&mut self, iface: &str, why: &str) -> bool {
        self.queue.clear();
        let was_open = std::mem::take(&mut self.open);
        let Some(end) = self.end.take() else {
            return false;
        };
        self.ready.remove(end.raw_fd());
        if was_open {
            self.stats.disconnects += 1;
        }
        self.last_disconnect = Some(why.to_string());
        tracing::info!(iface, reason = why, "xen device disconnected");
        true
    }

    fn flush_queue(&mut self) -> Result<(), Disconnect> {
        let Some(end) = self.end.as_mut() else {
            return Ok(());
        };
        while let Some((frame, meta)) = self.queue.front() {
            if !end.put(frame, meta)? {
                return Ok(());
            }
            self.stats.tx_frames += 1;
            self.queue.pop_front();
        }
        Ok(())
    }

    fn deliver(&mut self, frame: &[u8], meta: &PacketMeta) -> Result<(), Disconnect> {
        let Some(end) = self.end.as_mut().filter(|_| self.open) else {
            self.stats.dropped_no_peer += 1;
            return Ok(());
        };
        if self.queue.is_empty() {
            if end.put(frame, meta)? {
                self.stats.tx_frames += 1;
                return Ok(());
            }
            if !end.may_queue() {
                self.stats.dropped_ring_full += 1;
                return Ok(());
            }
        }
        if self.queue.len() < QUEUE_FRAMES {
            self.queue.push_back((frame.to_vec(), *meta));
        } else {
            self.stats.dropped_ring_full += 1;
        }
        Ok(())
    }

    /// [`Device::recv_burst`] once the handshake is done with.
    fn recv(&mut self, burst: &mut RxBurst) -> Result<usize, Disconnect> {
        let Some(end) = self.end.as_mut() else {
            return Ok(0);
        };
        end.handle_event()
            .map_err(|e| Disconnect::new(format!("event channel: {e}")))?;
        self.flush_queue()?;
        let Some(end) = self.end.as_mut() else {
            return Ok(0);
        };
        let (mut n, mut bad) = (0usize, 0u64);
        let r = end.take(&mut |frame, meta| match meta.to_offload(frame) {
            Ok(o) => {
                burst.push(frame, o);
                n += 1;
            }
            Err(_) => bad += 1,
        });
        self.stats.rx_frames += n as u64;
        self.stats.dropped_offload += bad;
        r?;
        self.ready.set_again(end.more()?);
        Ok(n)
    }

    /// [`Device::send_burst`]: each frame as it is if the peer takes it so, else finished
    /// (checksum completed, super-frame cut) first.
    fn send(&mut self, frames: &[TxFrame<'_>]) -> Result<(), Disconnect> {
        for f in frames {
            let Some(end) = self.end.as_ref().filter(|_| self.open) else {
                self.stats.dropped_no_peer += 1;
                continue;
            };
            let meta = PacketMeta::from_offload(&f.offload)
                .ok()
                .filter(|m| end.accepts(f.frame, m));
            if let Some(m) = meta {
                self.deliver(f.frame, &m)?;
                continue;
            }
            let (mut copy, mut scratch) = (
                std::mem::take(&mut self.copy),
                std::mem::take(&mut self.scratch),
            );
            copy.clear();
            copy.extend_from_slice(f.frame);
            let mut fault = None;
            let done = offload::finish(&f.offload, &mut copy, &mut scratch, |seg| {
                if fault.is_none() {
                    fault = self.deliver(seg, &PacketMeta::default()).err();
                }
            });
            (self.copy, self.scratch) = (copy, scratch);
            if done.is_err() {
                self.stats.dropped_offload += 1;
            }
            if let Some(d) = fault {
                return Err(d);
            }
        }
        Ok(())
    }

    /// The `status` line's counters and last disconnect.
    fn describe(&self, head: String) -> String {
        let s = &self.stats;
        let mut d = format!(
            "{head}: connects {} disconnects {} rx {} tx {} dropped no-peer {} ring-full {} \
             offload {}",
            s.connects,
            s.disconnects,
            s.rx_frames,
            s.tx_frames,
            s.dropped_no_peer,
            s.dropped_ring_full,
            s.dropped_offload
        );
        if let Some(why) = &self.last_disconnect {
            d.push_str(&format!("; last disconnect: {why}"));
        }
        d
    }
}

/// Takes a XenStore connection's watch events; whether one was `token`'s.
fn watch_fired(store: &mut impl Store, token: &str) -> io::Result<bool> {
    let mut ours = false;
    while let Some(ev) = store.next_event().map_err(store_io)? {
        ours |= ev.token == token;
    }
    Ok(ours)
}

/// A client qube's vif with us as its back end: `backend/vif/<domid>/<devid>` in our
/// XenStore tree; see the module documentation.
pub struct NetbackDevice<S: Store, H: XenHandles> {
    name: String,
    store: S,
    hv: H,
    hs: BackendHandshake,
    data: DataPath<Netback<H::Import, H::Events>>,
}

impl<S: Store, H: XenHandles> fmt::Debug for NetbackDevice<S, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetbackDevice")
            .field("name", &self.name)
            .field("dir", &self.hs.dir())
            .field("state", &self.hs.state())
            .field("connected", &self.data.open)
            .field("stats", &self.data.stats)
            .finish()
    }
}

impl<S: Store, H: XenHandles> NetbackDevice<S, H> {
    /// Takes the device the toolstack wrote at `dir` (`backend/vif/<domid>/<devid>`,
    /// relative to our domain), advertising `features`, and serves it as interface `name`.
    pub fn open(
        mut store: S,
        hv: H,
        dir: &str,
        name: &str,
        features: BackendFeatures,
    ) -> io::Result<Self> {
        let hs = BackendHandshake::start(&mut store, dir, features)
            .map_err(|e| io::Error::other(format!("{dir}: {e}")))?;
        let ready = Readiness::new()?;
        ready.add(store.raw_fd())?;
        let mut dev = NetbackDevice {
            name: name.to_string(),
            store,
            hv,
            hs,
            data: DataPath::new(ready),
        };
        dev.step()?;
        Ok(dev)
    }

    pub fn stats(&self) -> &XenDeviceStats {
        &self.data.stats
    }

    /// Whether a frontend is connected now.
    pub fn is_connected(&self) -> bool {
        self.data.open
    }

    /// Why the last connection ended.
    pub fn last_disconnect(&self) -> Option<&str> {
        self.data.last_disconnect.as_deref()
    }

    fn step(&mut self) -> io::Result<()> {
        let iface = self.name.as_str();
        match self.hs.on_event(&mut self.store) {
            Ok(BackendAction::Wait) => Ok(()),
            Ok(BackendAction::Connect(req)) => self.connect(req),
            Ok(BackendAction::Disconnect) => {
                self.data.detach(iface, "the frontend closed");
                Ok(())
            }
            Ok(BackendAction::Gone) => {
                self.data
                    .detach(iface, "the frontend's XenStore directory is gone");
                Ok(())
            }
            Ok(BackendAction::Refused(why)) => {
                tracing::warn!(iface, reason = why.as_str(), "frontend refused");
                self.data.detach(iface, &why);
                Ok(())
            }
            Err(HandshakeError::Refused(why)) => {
                tracing::warn!(iface, reason = why.as_str(), "handshake");
                Ok(())
            }
            Err(HandshakeError::Store(e)) => Err(store_io(e)),
        }
    }

    fn connect(&mut self, req: FrontendRequest) -> io::Result<()> {
        self.data.detach(&self.name, "the frontend connected again");
        let features = Features {
            rx_copy: true,
            sg: req.sg,
            gso_tcpv4: req.gso_tcpv4,
            gso_tcpv6: req.gso_tcpv6,
            ipv4_csum: req.csum_offload,
            ipv6_csum: req.ipv6_csum_offload,
            rx_notify: req.rx_notify,
        };
        let handles = (|| {
            let mut events = self.hv.events()?;
            let port = events.bind_interdomain(req.domid, req.event_channel)?;
            Ok::<_, io::Error>((self.hv.import()?, events, port))
        })();
        let back = handles
            .map_err(|e| Disconnect::new(format!("event channel {}: {e}", req.event_channel)))
            .and_then(|(grants, events, port)| {
                Netback::new(
                    grants,
                    events,
                    req.domid,
                    req.tx_ring_ref,
                    req.rx_ring_ref,
                    port,
                    features,
                )
            });
        match back {
            Ok(back) => {
                self.data.attach(back)?;
                self.hs.connected(&mut self.store).map_err(store_io)?;
                self.data.opened();
                tracing::info!(
                    iface = self.name.as_str(),
                    frontend = req.domid,
                    sg = req.sg,
                    gso_tcpv4 = req.gso_tcpv4,
                    gso_tcpv6 = req.gso_tcpv6,
                    "netback connected"
                );
            }
            Err(d) => {
                tracing::warn!(
                    iface = self.name.as_str(),
                    reason = d.reason(),
                    "cannot connect the frontend"
                );
                self.data.last_disconnect = Some(d.reason().to_string());
                self.hs
                    .fail(&mut self.store, d.reason())
                    .map_err(store_io)?;
            }
        }
        Ok(())
    }

    /// The frontend broke the protocol (netback logged how): the ring is dropped, the
    /// reason written to `error`, and the device Closing (it may come back through
    /// Initialising).
    fn fault(&mut self, d: &Disconnect) {
        self.data.detach(&self.name, d.reason());
        if let Err(e) = self.hs.fail(&mut self.store, d.reason()) {
            tracing::warn!(iface = self.name.as_str(), error = %e, "cannot report the disconnect");
        }
    }
}

impl<S: Store, H: XenHandles> Device for NetbackDevice<S, H> {
    fn name(&self) -> &str {
        &self.name
    }

    /// Everything the frontend has sent, up to the ring's own budget (`max` is a hint:
    /// what a batch holds is what the ring had).
    fn recv_burst(&mut self, burst: &mut RxBurst, _max: usize) -> io::Result<usize> {
        self.data.ready.set_again(false);
        if watch_fired(&mut self.store, self.hs.token())? {
            self.step()?;
        }
        self.data.recv(burst).or_else(|d| {
            self.fault(&d);
            Ok(0)
        })
    }

    fn send_burst(&mut self, frames: &[TxFrame<'_>]) -> io::Result<usize> {
        if let Err(d) = self.data.send(frames) {
            self.fault(&d);
        }
        Ok(frames.len())
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.data.ready.epoll.as_raw_fd())
    }

    fn describe(&self) -> Option<String> {
        Some(self.data.describe(format!(
            "xen netback {} {} (frontend {})",
            self.hs.dir(),
            if self.data.open {
                "connected"
            } else {
                "waiting"
            },
            self.hs.frontend_id()
        )))
    }
}

/// The uplink with us as the front end: `device/vif/<n>` in our XenStore tree.
pub struct NetfrontDevice<S: Store, H: XenHandles> {
    name: String,
    store: S,
    hv: H,
    hs: FrontendHandshake,
    data: DataPath<Netfront<H::Export, H::Events>>,
}

impl<S: Store, H: XenHandles> fmt::Debug for NetfrontDevice<S, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetfrontDevice")
            .field("name", &self.name)
            .field("state", &self.hs.state())
            .field("connected", &self.data.open)
            .field("stats", &self.data.stats)
            .finish()
    }
}

impl<S: Store, H: XenHandles> NetfrontDevice<S, H> {
    /// Takes the device the toolstack wrote at `dir` (`device/vif/<n>`), waiting up to
    /// `wait` for its `backend` keys, and serves it as interface `name`.
    pub fn open(mut store: S, hv: H, dir: &str, name: &str, wait: Duration) -> io::Result<Self> {
        let hs = FrontendHandshake::start(&mut store, dir, wait)
            .map_err(|e| io::Error::other(format!("{dir}: {e}")))?;
        let ready = Readiness::new()?;
        ready.add(store.raw_fd())?;
        let mut dev = NetfrontDevice {
            name: name.to_string(),
            store,
            hv,
            hs,
            data: DataPath::new(ready),
        };
        dev.step()?;
        Ok(dev)
    }

    pub fn stats(&self) -> &XenDeviceStats {
        &self.data.stats
    }

    /// Whether the back end is connected and frames flow.
    pub fn is_connected(&self) -> bool {
        self.data.open
    }

    fn step(&mut self) -> io::Result<()> {
        let action = match self.hs.on_event(&mut self.store) {
            Ok(a) => a,
            Err(HandshakeError::Refused(why)) => {
                tracing::warn!(
                    iface = self.name.as_str(),
                    reason = why.as_str(),
                    "handshake"
                );
                return Ok(());
            }
            Err(HandshakeError::Store(e)) => return Err(store_io(e)),
        };
        match action {
            FrontendAction::SetUp { backend } => self.set_up(backend)?,
            FrontendAction::Ready(offer) => {
                self.data.opened();
                tracing::info!(
                    iface = self.name.as_str(),
                    backend = offer.domid,
                    sg = offer.sg,
                    gso_tcpv4 = offer.gso_tcpv4,
                    gso_tcpv6 = offer.gso_tcpv6,
                    "netfront connected"
                );
            }
            FrontendAction::Disconnect => {
                self.data.detach(&self.name, "the backend closed");
                self.hs.reopen(&mut self.store).map_err(store_io)?;
            }
            FrontendAction::Wait => {
                // Closed because the backend was: offer ourselves again for when it returns.
                if self.hs.state() == super::xenbus::XenbusState::Closed {
                    self.hs.reopen(&mut self.store).map_err(store_io)?;
                }
            }
        }
        Ok(())
    }

    fn set_up(&mut self, backend: super::DomId) -> io::Result<()> {
        self.data.detach(&self.name, "the backend started over");
        let offer = self.hs.offer(&mut self.store).map_err(store_io)?;
        let features = Features {
            rx_copy: true,
            sg: offer.sg,
            gso_tcpv4: offer.gso_tcpv4,
            gso_tcpv6: offer.gso_tcpv6,
            // IPv4 checksum offload is netif's default for a back end; IPv6 only if offered.
            ipv4_csum: true,
            ipv6_csum: offer.ipv6_csum_offload,
            rx_notify: true,
        };
        let front = Netfront::new(self.hv.export()?, self.hv.events()?, backend, features)?;
        let rings = FrontendRings {
            tx_ring_ref: front.tx_ring_ref(),
            rx_ring_ref: front.rx_ring_ref(),
            event_channel: front.event_port(),
            sg: true,
            gso_tcpv4: true,
            gso_tcpv6: true,
        };
        self.data.attach(front)?;
        self.hs.publish(&mut self.store, rings).map_err(store_io)?;
        Ok(())
    }

    /// The back end broke the protocol: we close, and start over when it does.
    fn fault(&mut self, d: &Disconnect) {
        tracing::warn!(
            iface = self.name.as_str(),
            reason = d.reason(),
            "backend disconnected"
        );
        self.data.detach(&self.name, d.reason());
        if let Err(e) = self.hs.close(&mut self.store) {
            tracing::warn!(iface = self.name.as_str(), error = %e, "cannot close the device");
        }
    }
}

impl<S: Store, H: XenHandles> Device for NetfrontDevice<S, H> {
    fn name(&self) -> &str {
        &self.name
    }

    fn recv_burst(&mut self, burst: &mut RxBurst, _max: usize) -> io::Result<usize> {
        self.data.ready.set_again(false);
        if watch_fired(&mut self.store, self.hs.token())? {
            self.step()?;
        }
        self.data.recv(burst).or_else(|d| {
            self.fault(&d);
            Ok(0)
        })
    }

    fn send_burst(&mut self, frames: &[TxFrame<'_>]) -> io::Result<usize> {
        if let Err(d) = self.data.send(frames) {
            self.fault(&d);
        }
        Ok(frames.len())
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.data.ready.epoll.as_raw_fd())
    }

    fn describe(&self) -> Option<String> {
        Some(self.data.describe(format!(
            "xen netfront {}",
            if self.data.open {
                "connected"
            } else {
                "waiting"
            }
        )))
    }
}

/// A client vif's interface name, `vif<domid>.<devid>`, as its backend directory
/// (`backend/vif/<domid>/<devid>`); `None` for any other name.
pub fn backend_dir_of(vif: &str) -> Option<String> {
    let (d, n) = vif.strip_prefix("vif")?.split_once('.')?;
    let canonical = |s: &str| {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'))
    };
    (canonical(d) && canonical(n) && d.parse::<u16>().is_ok() && n.parse::<u32>().is_ok())
        .then(|| format!("backend/vif/{d}/{n}"))
}

/// Opens a client vif's netback over `access`, for interface `vif` (`vif<domid>.<devid>`).
pub fn open_netback(access: &XenAccess, vif: &str) -> io::Result<Box<dyn Device>> {
    let dir = backend_dir_of(vif).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{vif:?} is not a Xen vif name (vif<domid>.<devid>)"),
        )
    })?;
    let features = BackendFeatures::default();
    Ok(match access {
        XenAccess::Linux => Box::new(NetbackDevice::open(
            Client::open_xenbus()?,
            LinuxHandles,
            &dir,
            vif,
            features,
        )?),
        XenAccess::Emulated {
            hypervisor,
            xenstore,
            domid,
        } => Box::new(NetbackDevice::open(
            Client::connect(xenstore)?,
            EmulHandles(Domain::shared(hypervisor, *domid)?),
            &dir,
            vif,
            features,
        )?),
    })
}

/// Opens the netfront at `dir` (`device/vif/<n>`) over `access`, as interface `name`.
pub fn open_netfront(
    access: &XenAccess,
    dir: &str,
    name: &str,
    wait: Duration,
) -> io::Result<Box<dyn Device>> {
    Ok(match access {
        XenAccess::Linux => Box::new(NetfrontDevice::open(
            Client::open_xenbus()?,
            LinuxHandles,
            dir,
            name,
            wait,
        )?),
        XenAccess::Emulated {
            hypervisor,
            xenstore,
            domid,
        } => Box::new(NetfrontDevice::open(
            Client::connect(xenstore)?,
            EmulHandles(Domain::shared(hypervisor, *domid)?),
            dir,
            name,
            wait,
        )?),
    })
}

/// Forwards frames both ways between two devices until `stop` is set: what stands between
/// a peer's ring and a kernel interface in the emulated qubes of the tests (a client qube's
/// netfront and its TAP `eth0`, a netvm's netback and its TAP `vif<domid>.0`). Offload
/// metadata crosses with each frame.
pub fn relay(
    a: &mut dyn Device,
    b: &mut dyn Device,
    stop: &std::sync::atomic::AtomicBool,
) -> io::Result<()> {
    let mut burst = RxBurst::new();
    let fd = |d: &dyn Device| {
        d.raw_fd().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} has no descriptor to wait on", d.name()),
            )
        })
    };
    let mut fds = [
        libc::pollfd {
            fd: fd(a)?,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: fd(b)?,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        // SAFETY: `fds` is a live array of two pollfd for the whole call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for from in [0usize, 1] {
            if fds[from].revents == 0 {
                continue;
            }
            let (src, dst): (&mut dyn Device, &mut dyn Device) = if from == 0 {
                (&mut *a, &mut *b)
            } else {
                (&mut *b, &mut *a)
            };
            burst.clear();
            src.recv_burst(&mut burst, 64)?;
            let frames: Vec<TxFrame<'_>> = (0..burst.len())
                .filter_map(|i| burst.frame(i))
                .map(|(frame, offload)| TxFrame { frame, offload })
                .collect();
            if !frames.is_empty() {
                dst.send_burst(&frames)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xen::emul::Hypervisor;
    use crate::xen::xenbus::XenbusState;
    use crate::xen::xenstore::server::Server as XenStored;
    use crate::xen::xenstore::{Access, Perm, Tx};
    use crate::xen::{DomId, SharedPages};
    use crate::Offload;

    const BACK: DomId = 1;
    const FRONT: DomId = 7;
    const BE_DIR: &str = "/local/domain/1/backend/vif/7/0";

    /// The toolstack's two directories of vif 7.0, as libxl writes them.
    fn add_vif(ts: &mut impl Store) {
        let fe = "/local/domain/7/device/vif/0";
        ts.transaction(|t, tx| {
            for (dir, owner, reader, keys) in [
                (
                    BE_DIR,
                    BACK,
                    FRONT,
                    vec![
                        ("frontend", fe.to_string()),
                        ("frontend-id", "7".into()),
                        ("mac", "00:16:3e:5e:6c:07".into()),
                        ("online", "1".into()),
                        ("state", "1".into()),
                    ],
                ),
                (
                    fe,
                    FRONT,
                    BACK,
                    vec![
                        ("backend", BE_DIR.to_string()),
                        ("backend-id", "1".into()),
                        ("mac", "00:16:3e:5e:6c:07".into()),
                        ("state", "1".into()),
                    ],
                ),
            ] {
                let perms = [
                    Perm::new(Access::None, owner),
                    Perm::new(Access::Read, reader),
                ];
                let mut p = String::new();
                for part in dir.trim_start_matches('/').split('/') {
                    p = format!("{p}/{part}");
                    if p.matches('/').count() >= 3 {
                        t.mkdir(tx, &p)?;
                        t.set_perms(tx, &p, &perms)?;
                    }
                }
                for (k, v) in keys {
                    t.write(tx, &format!("{dir}/{k}"), v.as_bytes())?;
                    t.set_perms(tx, &format!("{dir}/{k}"), &perms)?;
                }
            }
            Ok(())
        })
        .expect("the toolstack's transaction");
    }

    /// Runs the device once and returns what the frontend's handshake says, if its watch
    /// fired.
    fn turn(
        dev: &mut dyn Device,
        fs: &mut impl Store,
        hs: &mut FrontendHandshake,
        got: &mut Vec<Vec<u8>>,
    ) -> Option<FrontendAction> {
        let mut burst = RxBurst::new();
        dev.recv_burst(&mut burst, 64).expect("recv");
        got.extend(
            (0..burst.len())
                .filter_map(|i| burst.frame(i))
                .map(|(f, _)| f.to_vec()),
        );
        let mut ours = false;
        while let Some(ev) = fs.next_event().expect("events") {
            ours |= ev.token == hs.token();
        }
        std::thread::sleep(Duration::from_millis(2));
        ours.then(|| hs.on_event(fs).expect("frontend handshake"))
    }

    /// A frontend that breaks the ring protocol (a TX producer index past the ring) is
    /// disconnected by the device: the reason in its `error` key and its log, Closing; the
    /// same frontend then closes, starts over, connects a proper netfront and carries frames
    /// both ways: the cycle Windows frontends go through on every boot.
    #[test]
    fn a_hostile_frontend_is_disconnected_with_its_reason_and_may_come_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hv = Hypervisor::serve(dir.path().join("hv.sock")).expect("broker");
        let xs = XenStored::start(dir.path().join("xs")).expect("xenstored");
        let mut ts = Client::connect(xs.add_domain(0).expect("dom0")).expect("dom0 client");
        add_vif(&mut ts);
        let back_dom = Domain::connect(hv.path(), BACK).expect("dom1");
        let mut dev = NetbackDevice::open(
            Client::connect(xs.add_domain(BACK).expect("dom1")).expect("client"),
            EmulHandles(back_dom),
            "backend/vif/7/0",
            "vif7.0",
            BackendFeatures::default(),
        )
        .expect("netback device");
        assert_eq!(
            ts.read_string(Tx::NONE, &format!("{BE_DIR}/state"))
                .expect("state"),
            "2",
            "InitWait"
        );
        let front_dom = Domain::connect(hv.path(), FRONT).expect("dom7");
        let mut fs = Client::connect(xs.add_domain(FRONT).expect("dom7")).expect("client");
        let mut hs = FrontendHandshake::start(&mut fs, "device/vif/0", Duration::from_secs(5))
            .expect("frontend");
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        // Turns the device and the frontend's handshake until `$done` holds (`$a` is what
        // the handshake said this turn).
        macro_rules! until {
            ($what:expr, |$a:ident| $done:expr) => {
                loop {
                    assert!(std::time::Instant::now() < deadline, "timed out: {}", $what);
                    let $a = turn(&mut dev, &mut fs, &mut hs, &mut got);
                    if $done {
                        break;
                    }
                }
            };
        }
        // The hostile end: rings granted by hand.
        until!("SetUp", |a| matches!(a, Some(FrontendAction::SetUp { .. })));
        let mut grants = front_dom.grants();
        let mut events = front_dom.events().expect("events");
        let (tx_refs, tx_ring) = grants.grant(BACK, 1, true).expect("tx ring");
        let (rx_refs, _rx_ring) = grants.grant(BACK, 1, true).expect("rx ring");
        let port = events.alloc_unbound(BACK).expect("port");
        hs.publish(
            &mut fs,
            FrontendRings {
                tx_ring_ref: tx_refs[0],
                rx_ring_ref: rx_refs[0],
                event_channel: port,
                sg: true,
                gso_tcpv4: true,
                gso_tcpv6: true,
            },
        )
        .expect("publish");
        until!("connected", |_a| dev.is_connected());
        // req_prod (the shared ring's first word) 1000 slots ahead of what it consumed.
        tx_ring.store_u32(0, 1000).expect("scribble");
        events.notify(port).expect("notify");
        until!("the disconnect", |_a| !dev.is_connected());
        let why = dev.last_disconnect().expect("a reason").to_string();
        assert!(why.contains("TX ring"), "{why}");
        let error = ts
            .read_string(Tx::NONE, &format!("{BE_DIR}/error"))
            .expect("error key");
        assert_eq!(error, why);
        assert_eq!(
            ts.read_string(Tx::NONE, &format!("{BE_DIR}/state"))
                .expect("state"),
            XenbusState::Closing.as_str()
        );
        assert!(dev.describe().expect("status").contains("last disconnect"));
        // The frontend closes and starts over, properly this time.
        hs.close(&mut fs).expect("close");
        drop((tx_ring, _rx_ring, events));
        hs.reopen(&mut fs).expect("reopen");
        until!("SetUp again", |a| matches!(
            a,
            Some(FrontendAction::SetUp { .. })
        ));
        let mut front = Netfront::new(
            front_dom.grants(),
            front_dom.events().expect("events"),
            BACK,
            Features::ALL,
        )
        .expect("netfront");
        hs.publish(
            &mut fs,
            FrontendRings {
                tx_ring_ref: front.tx_ring_ref(),
                rx_ring_ref: front.rx_ring_ref(),
                event_channel: front.event_port(),
                sg: true,
                gso_tcpv4: true,
                gso_tcpv6: true,
            },
        )
        .expect("publish");
        until!("Ready", |a| matches!(a, Some(FrontendAction::Ready(_))));
        assert_eq!(dev.stats().connects, 2);
        let frame: Vec<u8> = (0..600u32).map(|i| (i * 7) as u8).collect();
        assert!(front.send(&frame, &PacketMeta::default()).expect("send"));
        until!("the frame", |_a| !got.is_empty());
        assert_eq!(got, vec![frame.clone()]);
        dev.send_burst(&[TxFrame {
            frame: &frame,
            offload: Offload::NONE,
        }])
        .expect("send");
        let mut back = Vec::new();
        while back.is_empty() {
            assert!(std::time::Instant::now() < deadline, "no frame back");
            front.handle_event().expect("events");
            front.recv(&mut |f, _| back.push(f.to_vec())).expect("recv");
        }
        assert_eq!(back, vec![frame]);
    }

    #[test]
    fn vif_names_map_to_their_backend_directories() {
        assert_eq!(
            backend_dir_of("vif10.0").as_deref(),
            Some("backend/vif/10/0")
        );
        assert_eq!(
            backend_dir_of("vif3.12").as_deref(),
            Some("backend/vif/3/12")
        );
        for bad in [
            "eth0",
            "vif10",
            "vif.0",
            "vif010.0",
            "vif10.01",
            "vif99999.0",
            "vif1.-1",
        ] {
            assert_eq!(backend_dir_of(bad), None, "{bad}");
        }
    }
}
