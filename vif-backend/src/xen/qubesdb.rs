//! QubesDB over vchan: a QubesDB daemon whose database is dom0's, kept in step over the
//! vchan on port 111, with no C daemon in the qube.
//!
//! Upstream, `qubesdb-daemon` in each qube connects a libxenvchan client to dom0's daemon
//! on port 111 (`vchan::QUBESDB_PORT`), copies dom0's database, and serves it to the qube's programs on
//! a local socket (qubes-core-qubesdb `daemon/db-daemon.c`). Here the same is three parts:
//!
//! - the daemon and its socket: `qubesdb::Server`, unchanged;
//! - the messages between the two daemons: `qubesdb::link`, pure;
//! - the bytes between them: a [`Vchan`], moved by a [`LinkDriver`] (this module), the only
//!   part that knows Xen.
//!
//! [`Agent::start`] is the qube's side: daemon, link, driver thread; it returns once dom0's
//! database has been copied, so a service reading the socket next sees its configuration
//! whole. [`Dom0Peer`] is dom0's side, for tests and the emulated lab: a daemon holding the
//! qube's configuration and a vchan server the qube connects to.

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ::qubesdb::link::LinkError;
use ::qubesdb::{LinkPort, LocalWriter, Server, ServerHandle, Tree};

use super::emul::Domain;
use super::hotplug::{Hotplug, HotplugError, KernelLinks, UserspaceLinks, VifEvent};
use super::linux::{Evtchn, Gntdev};
use super::vchan::{self, PeerState, Vchan, VchanError};
use super::xenstore::client as xs_client;
use super::xenstore::{Perm, Store, Tx};
use super::{DomId, EventChannels, GrantImport, GrantRef, Port, SharedPages};

/// Bytes queued for dom0 that it has not read before the link is given up: a dom0 that
/// stops reading must not make the qube's daemon grow without bound.
pub const MAX_PENDING: usize = 1 << 20;

/// How long one wait for the channel lasts before [`LinkDriver::run`] looks at its stop flag.
const POLL_SLICE: Duration = Duration::from_millis(200);

/// Why the link to the peer daemon ended.
#[derive(Debug)]
pub enum LinkDriverError {
    /// The vchan failed (closed by the peer, broken, or an event channel error).
    Vchan(VchanError),
    /// The peer's messages broke the QubesDB link protocol.
    Link(LinkError),
    /// The peer stopped reading while changes for it piled up.
    PeerNotReading { pending: usize },
    /// `poll(2)` on the event channel failed.
    Poll(io::Error),
    /// The initial copy of dom0's database did not complete in time.
    SyncTimeout(Duration),
    /// The local daemon could not be started.
    Daemon(::qubesdb::ServerError),
    /// The hypervisor's interfaces: a device, the emulation's sockets, or XenStore.
    Xen(String),
}

impl fmt::Display for LinkDriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkDriverError::Vchan(VchanError::Closed) => {
                write!(f, "the QubesDB vchan was closed by the peer")
            }
            LinkDriverError::Vchan(e) => write!(f, "the QubesDB vchan failed: {e}"),
            LinkDriverError::Link(e) => write!(f, "QubesDB link: {e}"),
            LinkDriverError::PeerNotReading { pending } => write!(
                f,
                "the peer QubesDB stopped reading: {pending} bytes of changes wait for it"
            ),
            LinkDriverError::Poll(e) => write!(f, "waiting on the QubesDB vchan: {e}"),
            LinkDriverError::SyncTimeout(t) => write!(
                f,
                "dom0's QubesDB did not send its database within {} s",
                t.as_secs()
            ),
            LinkDriverError::Daemon(e) => write!(f, "the local QubesDB daemon: {e}"),
            LinkDriverError::Xen(e) => write!(f, "QubesDB over vchan: {e}"),
        }
    }
}

impl std::error::Error for LinkDriverError {}

impl From<VchanError> for LinkDriverError {
    fn from(e: VchanError) -> Self {
        LinkDriverError::Vchan(e)
    }
}

/// Moves bytes between a daemon's [`LinkPort`] and a [`Vchan`] to the peer daemon.
pub struct LinkDriver<P: SharedPages, E: EventChannels> {
    vchan: Vchan<P>,
    events: E,
    port: LinkPort,
    /// Bytes for the peer that did not fit in the vchan yet.
    pending: Vec<u8>,
}

impl<P: SharedPages, E: EventChannels> fmt::Debug for LinkDriver<P, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkDriver")
            .field("vchan", &self.vchan)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl<P: SharedPages, E: EventChannels> LinkDriver<P, E> {
    pub fn new(vchan: Vchan<P>, events: E, port: LinkPort) -> Self {
        LinkDriver {
            vchan,
            events,
            port,
            pending: Vec::new(),
        }
    }

    /// Whether the peer's database has been copied in whole.
    pub fn synced(&self) -> bool {
        self.port.synced()
    }

    /// Asks the peer for its database (the qube's side).
    pub fn request_sync(&self) {
        self.port.request_sync();
    }

    /// Handles fired events, sends what waits and takes what arrived, without blocking.
    /// Returns whether anything moved.
    pub fn pump(&mut self) -> Result<bool, LinkDriverError> {
        let mut moved = false;
        while let Some(p) = self.events.pending().map_err(VchanError::Io)? {
            if p == self.vchan.port() {
                self.vchan.handle_event(&mut self.events)?;
            } else {
                // Not ours (the handle is this driver's alone): let it fire again.
                self.events.unmask(p).map_err(VchanError::Io)?;
            }
        }
        self.pending.extend(self.port.take_output());
        while !self.pending.is_empty() {
            let n = self.vchan.send(&mut self.events, &self.pending)?;
            if n == 0 {
                break;
            }
            self.pending.drain(..n);
            moved = true;
        }
        if self.pending.len() > MAX_PENDING {
            return Err(LinkDriverError::PeerNotReading {
                pending: self.pending.len(),
            });
        }
        let mut buf = [0u8; 4096];
        loop {
            let n = self.vchan.recv(&mut self.events, &mut buf)?;
            if n == 0 {
                break;
            }
            self.port
                .receive(&buf[..n])
                .map_err(LinkDriverError::Link)?;
            moved = true;
        }
        if self.vchan.state() == PeerState::Closed {
            return Err(LinkDriverError::Vchan(VchanError::Closed));
        }
        Ok(moved)
    }

    /// Waits up to `timeout` for the event channel or a local change.
    fn wait(&self, timeout: Duration) -> Result<(), LinkDriverError> {
        let fds = [self.events.raw_fd(), self.port.wake_fd().as_raw_fd()];
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        let mut ready = Vec::with_capacity(fds.len());
        crate::sys::poll_readable(&fds, ms, &mut ready).map_err(LinkDriverError::Poll)?;
        Ok(())
    }

    /// Pumps until the peer is synced or `timeout` passes.
    pub fn run_until_synced(&mut self, timeout: Duration) -> Result<(), LinkDriverError> {
        let start = Instant::now();
        loop {
            self.pump()?;
            if self.synced() {
                return Ok(());
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(LinkDriverError::SyncTimeout(timeout));
            }
            self.wait(left.min(POLL_SLICE))?;
        }
    }

    /// Pumps until the link ends or `stop` is set; then closes the vchan.
    pub fn run(mut self, stop: &AtomicBool) -> Result<(), LinkDriverError> {
        let result = loop {
            if stop.load(Ordering::Relaxed) {
                break Ok(());
            }
            if let Err(e) = self.pump() {
                break Err(e);
            }
            if let Err(e) = self.wait(POLL_SLICE) {
                break Err(e);
            }
        };
        let _ = self.vchan.close(&mut self.events);
        result
    }
}

/// A running link: the local daemon and the thread carrying its link (and, once started,
/// the vif hotplug thread).
#[derive(Debug)]
pub struct Agent {
    daemon: ServerHandle,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), LinkDriverError>>>,
    hotplug: Option<JoinHandle<Result<(), LinkDriverError>>>,
    /// Why the link ended, once [`Agent::link_ended`] saw it end.
    ended: Option<String>,
}

impl Agent {
    /// The qube's side: serves a QubesDB daemon on `socket`, copies dom0's database over
    /// `vchan` (a client on port `vchan::QUBESDB_PORT`), and returns once the copy is whole (or fails
    /// after `sync_timeout`). From then on a thread keeps the two in step.
    pub fn start<P, E>(
        socket: &Path,
        vchan: Vchan<P>,
        events: E,
        sync_timeout: Duration,
    ) -> Result<Agent, LinkDriverError>
    where
        P: SharedPages + 'static,
        E: EventChannels + Send + 'static,
    {
        let daemon = Server::bind(socket)
            .and_then(Server::spawn)
            .map_err(LinkDriverError::Daemon)?;
        let port = daemon.attach_link().map_err(LinkDriverError::Daemon)?;
        let mut driver = LinkDriver::new(vchan, events, port);
        driver.request_sync();
        driver.run_until_synced(sync_timeout)?;
        Ok(Self::spawn(daemon, driver))
    }

    fn spawn<P, E>(daemon: ServerHandle, driver: LinkDriver<P, E>) -> Agent
    where
        P: SharedPages + 'static,
        E: EventChannels + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("qubesdb-vchan".to_string())
            .spawn(move || driver.run(&flag))
            .ok();
        Agent {
            daemon,
            stop,
            thread,
            hotplug: None,
            ended: None,
        }
    }

    /// Runs the vif hotplug step beside the link, in the calling thread's network
    /// namespace: each client vif the toolstack adds under `backend/vif` is brought up,
    /// netback is told it may connect (`hotplug-status`), and the vif is published in the
    /// local daemon as `/qubes-vif/<vif>/{mac,ip6,ip}` (the keys the services read their
    /// vif list from; in a Linux qube, vif-route-qubes learns the same from XenStore). Those
    /// keys stay in the qube: dom0 does not hold them. A removed vif is brought down and its
    /// keys removed.
    ///
    /// With `userspace_backend` the service serves the vifs' rings itself
    /// ([`super::device::NetbackDevice`]): no kernel interface is waited for, and the
    /// backend `state` key, which its own handshake writes, does not take the vif away.
    pub fn start_hotplug(
        &mut self,
        access: &XenAccess,
        userspace_backend: bool,
    ) -> Result<(), LinkDriverError> {
        let writer = self.daemon.local_writer();
        let stop = Arc::clone(&self.stop);
        let spawned = match access {
            XenAccess::Linux => {
                let store = xs_client::Client::open_xenbus().map_err(|e| {
                    LinkDriverError::Xen(format!("cannot open {}: {e}", xs_client::XENBUS_DEVICE))
                })?;
                spawn_hotplug(store, writer, stop, userspace_backend)
            }
            XenAccess::Emulated { xenstore, .. } => {
                let store = xs_client::Client::connect(xenstore).map_err(|e| {
                    LinkDriverError::Xen(format!(
                        "cannot reach the XenStore server at {}: {e}",
                        xenstore.display()
                    ))
                })?;
                spawn_hotplug(store, writer, stop, userspace_backend)
            }
        };
        self.hotplug = Some(spawned?);
        Ok(())
    }

    /// The local daemon.
    pub fn daemon(&self) -> &ServerHandle {
        &self.daemon
    }

    /// Whether the link still runs.
    pub fn is_linked(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Why the link ended, once it has (`None` while it runs): dom0 closed the vchan, or
    /// its peer broke the protocol. The local daemon keeps serving what it holds.
    pub fn link_ended(&mut self) -> Option<&str> {
        if self.ended.is_none() && self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            self.ended = Some(match self.thread.take().map(JoinHandle::join) {
                Some(Ok(Ok(()))) | None => "stopped".to_string(),
                Some(Ok(Err(e))) => e.to_string(),
                Some(Err(_)) => "the link's thread panicked".to_string(),
            });
        }
        self.ended.as_deref()
    }

    /// Stops the link (closing the vchan) and the hotplug thread, and returns why the link
    /// had ended, if it had.
    pub fn stop(&mut self) -> Result<(), LinkDriverError> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.hotplug.take() {
            let _ = h.join();
        }
        match self.thread.take() {
            Some(t) => t.join().unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn spawn_hotplug<S: Store + Send + 'static>(
    store: S,
    writer: LocalWriter,
    stop: Arc<AtomicBool>,
    userspace_backend: bool,
) -> Result<JoinHandle<Result<(), LinkDriverError>>, LinkDriverError> {
    let hotplug = if userspace_backend {
        Hotplug::for_userspace_backend(store)
    } else {
        Hotplug::new(store)
    };
    let mut hotplug = hotplug.map_err(|e| LinkDriverError::Xen(format!("vif hotplug: {e}")))?;
    std::thread::Builder::new()
        .name("vif-hotplug".to_string())
        .spawn(move || {
            let xen = |e: HotplugError| LinkDriverError::Xen(format!("vif hotplug: {e}"));
            let (mut kernel, mut userspace) = (KernelLinks, UserspaceLinks);
            while !stop.load(Ordering::Relaxed) {
                let events = if userspace_backend {
                    hotplug.poll(&mut userspace)
                } else {
                    hotplug.poll(&mut kernel)
                };
                for event in events.map_err(xen)? {
                    publish_vif(&writer, &event);
                }
                hotplug.wait(POLL_SLICE).map_err(xen)?;
            }
            Ok(())
        })
        .map_err(|e| LinkDriverError::Xen(format!("cannot start the vif hotplug thread: {e}")))
}

/// A hotplug event as the local daemon's `/qubes-vif/<vif>/` keys: the MAC (and IPv6)
/// first and the IPv4 last, so that a reader never sees an address without its MAC.
fn publish_vif(writer: &LocalWriter, event: &VifEvent) {
    match event {
        VifEvent::Added {
            vif, ip, ip6, mac, ..
        } => {
            let mac = mac
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":");
            let mut keys = vec![("mac", mac)];
            if let Some(v6) = ip6 {
                keys.push(("ip6", v6.to_string()));
            }
            keys.push(("ip", ip.to_string()));
            for (k, v) in keys {
                if let Err(e) = writer.write_local(&format!("/qubes-vif/{vif}/{k}"), v.as_bytes()) {
                    eprintln!("vif hotplug: {vif}: cannot publish {k} {v}: {e}");
                }
            }
        }
        VifEvent::Removed { vif } => {
            let _ = writer.remove_local(&format!("/qubes-vif/{vif}/"));
        }
        VifEvent::Refused { path, reason } => {
            eprintln!("vif hotplug: {path}: refused: {reason}");
        }
    }
}

/// dom0's side of one qube's QubesDB link: a daemon holding the qube's entries, served to
/// the qube over a vchan server, and to dom0's tools (the test, the emulated toolstack) on
/// a local socket, so that a write there is pushed to the qube as dom0's `qubesdb-daemon`
/// pushes it.
#[derive(Debug)]
pub struct Dom0Peer {
    agent: Agent,
}

impl Dom0Peer {
    /// Serves `tree` on `socket` and over `vchan` (the server end, already published for
    /// the qube), carrying the link on a thread from now on.
    pub fn start<P, E>(
        socket: &Path,
        tree: Tree,
        vchan: Vchan<P>,
        events: E,
    ) -> Result<Dom0Peer, LinkDriverError>
    where
        P: SharedPages + 'static,
        E: EventChannels + Send + 'static,
    {
        let daemon = Server::bind(socket)
            .map(|s| s.with_tree(tree))
            .and_then(Server::spawn)
            .map_err(LinkDriverError::Daemon)?;
        let port = daemon.attach_link().map_err(LinkDriverError::Daemon)?;
        let driver = LinkDriver::new(vchan, events, port);
        Ok(Dom0Peer {
            agent: Agent::spawn(daemon, driver),
        })
    }

    /// dom0's daemon.
    pub fn daemon(&self) -> &ServerHandle {
        self.agent.daemon()
    }

    /// Whether the link still runs.
    pub fn is_linked(&self) -> bool {
        self.agent.is_linked()
    }

    /// Stops serving the qube (closing the vchan, as a dom0 daemon that exits does).
    pub fn stop(&mut self) -> Result<(), LinkDriverError> {
        self.agent.stop()
    }
}

/// Which hypervisor interfaces a qube reaches dom0 through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XenAccess {
    /// The Linux Xen devices (`/dev/xen/gntdev`, `/dev/xen/evtchn`, `/dev/xen/xenbus`): a
    /// real Qubes qube.
    Linux,
    /// The repository's emulation: the broker's socket (`emul::Hypervisor`), this domain's
    /// socket of the XenStore server (`xenstore::server`), and this domain's id.
    Emulated {
        hypervisor: PathBuf,
        xenstore: PathBuf,
        domid: DomId,
    },
}

impl std::str::FromStr for XenAccess {
    type Err = String;

    /// `xen` (the Linux devices), or `emul:<hypervisor socket>:<xenstore socket>:<domid>`.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "xen" {
            return Ok(XenAccess::Linux);
        }
        let usage = "give `xen` (the Linux Xen devices) or \
                     `emul:<hypervisor socket>:<xenstore socket>:<domid>` (the emulation)";
        let Some(rest) = s.strip_prefix("emul:") else {
            return Err(format!("{s:?}: {usage}"));
        };
        let parts: Vec<&str> = rest.split(':').collect();
        let [hv, xs, domid] = parts[..] else {
            return Err(format!("{s:?}: {usage}"));
        };
        let domid: DomId = domid
            .parse()
            .map_err(|_| format!("{s:?}: {domid:?} is not a domain id; {usage}"))?;
        if hv.is_empty() || xs.is_empty() {
            return Err(format!("{s:?}: empty socket path; {usage}"));
        }
        Ok(XenAccess::Emulated {
            hypervisor: PathBuf::from(hv),
            xenstore: PathBuf::from(xs),
            domid,
        })
    }
}

/// How long to wait for dom0's QubesDB daemon to publish the vchan and send the database.
pub const DOM0_WAIT: Duration = Duration::from_secs(30);

/// The qube's side, from nothing: finds the vchan dom0's daemon published for this domain
/// in XenStore (`/local/domain/0/data/vchan/<domid>/111`, waiting for it), connects to it,
/// and starts the [`Agent`] serving the database on `socket`.
pub fn connect_to_dom0(
    access: &XenAccess,
    socket: &Path,
    wait: Duration,
) -> Result<Agent, LinkDriverError> {
    let xen_err = |what: String| move |e: io::Error| LinkDriverError::Xen(format!("{what}: {e}"));
    match access {
        XenAccess::Linux => {
            let mut store = xs_client::Client::open_xenbus()
                .map_err(xen_err(format!("cannot open {}", xs_client::XENBUS_DEVICE)))?;
            let domid = own_domid(&mut store)?;
            let mut imports = Gntdev::open().map_err(xen_err("grant mapping".into()))?;
            let events = Evtchn::open().map_err(xen_err("event channels".into()))?;
            connect_with(&mut store, domid, &mut imports, events, socket, wait)
        }
        XenAccess::Emulated {
            hypervisor,
            xenstore,
            domid,
        } => {
            let mut store = xs_client::Client::connect(xenstore).map_err(xen_err(format!(
                "cannot reach the XenStore server at {}",
                xenstore.display()
            )))?;
            let domain = Domain::shared(hypervisor, *domid).map_err(xen_err(format!(
                "cannot reach the emulated hypervisor at {}",
                hypervisor.display()
            )))?;
            let mut imports = domain.grants();
            let events = domain.events().map_err(xen_err("event channels".into()))?;
            connect_with(&mut store, *domid, &mut imports, events, socket, wait)
        }
    }
}

/// This domain's id, as the toolstack writes it (`domid` under our `/local/domain/<id>`,
/// read relative to it).
fn own_domid(store: &mut impl Store) -> Result<DomId, LinkDriverError> {
    let v = store
        .read_string(Tx::NONE, "domid")
        .map_err(|e| LinkDriverError::Xen(format!("cannot learn our domain id: {e}")))?;
    v.trim()
        .parse()
        .map_err(|_| LinkDriverError::Xen(format!("xenstore domid is {v:?}, not a domain id")))
}

/// Reads a decimal key, `None` while it is not there for us: dom0's `data/vchan` directory
/// is not ours, so until dom0 publishes the key with our read permission it reads as absent
/// ([`super::xenstore::StoreError::is_absent`]).
fn read_number(store: &mut impl Store, path: &str) -> Result<Option<u32>, LinkDriverError> {
    match store.read_string(Tx::NONE, path) {
        Ok(v) => {
            v.trim().parse().map(Some).map_err(|_| {
                LinkDriverError::Xen(format!("xenstore {path} is {v:?}, not a number"))
            })
        }
        Err(e) if e.is_absent() => Ok(None),
        Err(e) => Err(LinkDriverError::Xen(e.to_string())),
    }
}

fn connect_with<S, I, E>(
    store: &mut S,
    domid: DomId,
    imports: &mut I,
    mut events: E,
    socket: &Path,
    wait: Duration,
) -> Result<Agent, LinkDriverError>
where
    S: Store,
    I: GrantImport,
    I::Mapping: 'static,
    E: EventChannels + Send + 'static,
{
    let dir = vchan::xenstore_dir(0, domid, vchan::QUBESDB_PORT);
    let (ring, port) = (
        format!("{dir}/{}", vchan::RING_REF_KEY),
        format!("{dir}/{}", vchan::EVENT_CHANNEL_KEY),
    );
    let token = "qubesdb-vchan";
    store
        .watch(&dir, token)
        .map_err(|e| LinkDriverError::Xen(e.to_string()))?;
    let start = Instant::now();
    let found = loop {
        if let (Some(r), Some(p)) = (read_number(store, &ring)?, read_number(store, &port)?) {
            break (r, p);
        }
        let left = wait.saturating_sub(start.elapsed());
        if left.is_zero() {
            let _ = store.unwatch(&dir, token);
            return Err(LinkDriverError::Xen(format!(
                "dom0's QubesDB published no vchan in {dir} within {} s",
                wait.as_secs()
            )));
        }
        store
            .wait_event(left.min(POLL_SLICE))
            .map_err(|e| LinkDriverError::Xen(e.to_string()))?;
    };
    let _ = store.unwatch(&dir, token);
    let vchan = Vchan::client(imports, &mut events, 0, GrantRef(found.0), Port(found.1))?;
    Agent::start(
        socket,
        vchan,
        events,
        wait.saturating_sub(start.elapsed()).max(POLL_SLICE),
    )
}

impl Dom0Peer {
    /// Publishes a vchan server's grant and port where the qube `client` looks for them,
    /// as libxenvchan's `init_xs_srv` does: both keys in one transaction, owned by dom0
    /// and readable by the client.
    pub fn publish(
        store: &mut impl Store,
        client: DomId,
        info: vchan::ServerInfo,
    ) -> Result<(), LinkDriverError> {
        let dir = vchan::xenstore_dir(0, client, vchan::QUBESDB_PORT);
        let perms = vchan::xenstore_permissions(0, client);
        let perms: Vec<Perm> = perms.iter().filter_map(|p| Perm::parse(p).ok()).collect();
        store
            .transaction(|s, tx| {
                for (key, value) in [
                    (vchan::RING_REF_KEY, info.ring_ref.0),
                    (vchan::EVENT_CHANNEL_KEY, info.event_port.0),
                ] {
                    let path = format!("{dir}/{key}");
                    s.write(tx, &path, value.to_string().as_bytes())?;
                    s.set_perms(tx, &path, &perms)?;
                }
                Ok(())
            })
            .map_err(|e| LinkDriverError::Xen(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xen::emul::{Domain, EmulEvents, Hypervisor};
    use crate::xen::mem::MmapPages;
    use crate::xen::vchan::ServerInfo;
    use ::qubesdb::wire::{encode, MsgType};
    use ::qubesdb::Client;

    const QUBE: DomId = 5;
    const WAIT: Duration = Duration::from_secs(10);

    /// dom0's vchan server for QUBE's QubesDB (a 4 KiB ring each way, libvchan's sizes for
    /// QubesDB are no larger).
    fn dom0_vchan(hv: &Path) -> (Vchan<MmapPages>, EmulEvents, ServerInfo) {
        let d0 = Domain::connect(hv, 0).expect("dom0");
        let mut g0 = d0.grants();
        let mut e0 = d0.events().expect("events");
        let (v, info) = Vchan::server(&mut g0, &mut e0, QUBE, 12, 12).expect("server");
        (v, e0, info)
    }

    fn qube_vchan(hv: &Path, info: ServerInfo) -> (Vchan<MmapPages>, EmulEvents) {
        let d = Domain::connect(hv, QUBE).expect("qube");
        let mut g = d.grants();
        let mut e = d.events().expect("events");
        let v = Vchan::client(&mut g, &mut e, 0, info.ring_ref, info.event_port).expect("client");
        (v, e)
    }

    fn client(socket: &Path) -> Client {
        let mut c = Client::connect(socket).expect("connect");
        c.set_command_timeout(Some(WAIT));
        c
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let start = Instant::now();
        while !f() {
            assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_qube_serves_dom0s_tree_over_vchan_and_follows_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hv = Hypervisor::serve(dir.path().join("hv.sock")).expect("broker");
        let (v0, e0, info) = dom0_vchan(hv.path());
        let tree = Tree::from_entries([
            ("/name", &b"sys-firewall"[..]),
            ("/qubes-ip", b"10.137.0.5"),
            ("/qubes-netvm-gateway", b"10.138.0.1"),
            ("/qubes-firewall/10.137.0.9", b""),
            ("/qubes-firewall/10.137.0.9/policy", b"drop"),
        ])
        .expect("tree");
        let mut dom0 =
            Dom0Peer::start(&dir.path().join("dom0.sock"), tree.clone(), v0, e0).expect("dom0");
        let (v, e) = qube_vchan(hv.path(), info);
        let socket = dir.path().join("qubesdb.sock");
        let mut agent = Agent::start(&socket, v, e, WAIT).expect("agent");
        // Start returned after the sync: the whole tree is there at once.
        assert_eq!(
            agent.daemon().snapshot().entries().collect::<Vec<_>>(),
            tree.entries().collect::<Vec<_>>()
        );
        let mut reader = client(&socket);
        assert_eq!(
            reader.read("/qubes-ip").expect("read").as_deref(),
            Some(&b"10.137.0.5"[..])
        );
        // dom0 commits new rules for a client; the qube's watcher sees each step.
        let mut watcher = client(&socket);
        watcher.watch("/qubes-firewall/").expect("watch");
        let mut admin = client(dom0.daemon().socket_path());
        admin.rm("/qubes-firewall/10.137.0.9/").expect("rm");
        admin
            .write("/qubes-firewall/10.137.0.9/0000", b"action=accept")
            .expect("write");
        admin
            .write("/qubes-firewall/10.137.0.9", b"")
            .expect("commit");
        let mut seen = Vec::new();
        while seen.len() < 3 {
            match watcher.read_watch(Some(WAIT)).expect("watch") {
                Some(p) => seen.push(p),
                None => panic!("only {seen:?} arrived"),
            }
        }
        assert_eq!(
            seen,
            [
                "/qubes-firewall/10.137.0.9/",
                "/qubes-firewall/10.137.0.9/0000",
                "/qubes-firewall/10.137.0.9"
            ]
        );
        // The qube reports them handled; dom0 gets it.
        reader
            .write("/qubes-firewall-handled/10.137.0.9", b"1")
            .expect("write");
        wait_until("the qube's write in dom0", || {
            dom0.daemon()
                .snapshot()
                .read("/qubes-firewall-handled/10.137.0.9")
                == Some(&b"1"[..])
        });
        // dom0's daemon goes away: the link ends, the qube keeps serving what it has.
        dom0.stop().expect("dom0 stop");
        wait_until("the link to end", || !agent.is_linked());
        assert!(matches!(
            agent.stop(),
            Err(LinkDriverError::Vchan(VchanError::Closed))
        ));
        assert_eq!(
            reader
                .read("/qubes-netvm-gateway")
                .expect("read")
                .as_deref(),
            Some(&b"10.138.0.1"[..])
        );
    }

    /// dom0's side written by hand from qubes-core-qubesdb `daemon/db-cmds.c`, over the raw
    /// vchan: the qube's first bytes are exactly `request_full_db_sync`'s header, and the
    /// entries and end marker dom0 sends are what the qube then serves.
    #[test]
    fn the_sync_is_upstreams_bytes_both_ways() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hv = Hypervisor::serve(dir.path().join("hv.sock")).expect("broker");
        let (mut v0, mut e0, info) = dom0_vchan(hv.path());
        let socket = dir.path().join("qubesdb.sock");
        let hv_path = hv.path().to_path_buf();
        let agent = std::thread::spawn(move || {
            let (v, e) = qube_vchan(&hv_path, info);
            Agent::start(&socket, v, e, WAIT)
        });
        // The request: type 2 (QDB_CMD_MULTIREAD), a NUL path, zero padding, data_len 0.
        let mut got = Vec::new();
        let start = Instant::now();
        while got.len() < 72 {
            assert!(start.elapsed() < WAIT, "no request: {got:?}");
            let mut buf = [0u8; 128];
            let n = v0.recv(&mut e0, &mut buf).expect("recv");
            got.extend_from_slice(&buf[..n]);
            if n == 0 {
                std::thread::sleep(Duration::from_millis(2));
                while let Some(_p) = e0.pending().expect("pending") {
                    v0.handle_event(&mut e0).expect("event");
                }
            }
        }
        let mut want = vec![2u8];
        want.extend([0u8; 71]);
        assert_eq!(got, want);
        // Two entries in reverse order (as dom0 dumps the whole tree), then the end marker.
        let mut answer = encode(MsgType::RespMultiread, "/qubes-ip", b"10.137.0.5").expect("e");
        answer.extend(encode(MsgType::RespMultiread, "/name", b"sys-net").expect("e"));
        answer.extend(encode(MsgType::RespMultiread, "", b"").expect("e"));
        let mut off = 0;
        while off < answer.len() {
            off += v0.send(&mut e0, &answer[off..]).expect("send");
        }
        let agent = agent.join().expect("agent thread").expect("agent");
        let mut c = client(agent.daemon().socket_path());
        assert_eq!(
            c.multiread("/").expect("multiread"),
            vec![
                ("/name".to_string(), b"sys-net".to_vec()),
                ("/qubes-ip".to_string(), b"10.137.0.5".to_vec())
            ]
        );
        v0.close(&mut e0).expect("close");
    }

    /// The whole path a booted qube takes: it starts before dom0 has published anything,
    /// finds dom0's vchan through XenStore once dom0's side publishes it, and serves the
    /// tree; another qube may not read where the vchan is.
    #[test]
    fn a_qube_finds_dom0s_vchan_in_xenstore_and_serves_the_tree() {
        use crate::xen::xenstore::server::Server as XenStored;
        let dir = tempfile::tempdir().expect("tempdir");
        let hv = Hypervisor::serve(dir.path().join("hv.sock")).expect("broker");
        let xs = XenStored::start(dir.path().join("xs")).expect("xenstored");
        let xs0 = xs.add_domain(0).expect("dom0 socket");
        let xs_qube = xs.add_domain(QUBE).expect("qube socket");
        let xs_other = xs.add_domain(7).expect("other socket");
        let access = XenAccess::Emulated {
            hypervisor: hv.path().to_path_buf(),
            xenstore: xs_qube,
            domid: QUBE,
        };
        let socket = dir.path().join("qubesdb.sock");
        let qube = {
            let socket = socket.clone();
            std::thread::spawn(move || connect_to_dom0(&access, &socket, WAIT))
        };
        std::thread::sleep(Duration::from_millis(100));
        let (v0, e0, info) = dom0_vchan(hv.path());
        let mut store0 = xs_client::Client::connect(&xs0).expect("dom0 xenstore");
        Dom0Peer::publish(&mut store0, QUBE, info).expect("publish");
        let tree = Tree::from_entries([("/qubes-ip", &b"10.137.0.5"[..])]).expect("tree");
        let _dom0 = Dom0Peer::start(&dir.path().join("dom0.sock"), tree, v0, e0).expect("dom0");
        let agent = qube.join().expect("qube thread").expect("agent");
        assert_eq!(
            client(&socket).read("/qubes-ip").expect("read").as_deref(),
            Some(&b"10.137.0.5"[..])
        );
        assert!(agent.is_linked());
        let mut other = xs_client::Client::connect(&xs_other).expect("other xenstore");
        let ring = format!(
            "{}/{}",
            vchan::xenstore_dir(0, QUBE, vchan::QUBESDB_PORT),
            vchan::RING_REF_KEY
        );
        let e = other
            .read(Tx::NONE, &ring)
            .expect_err("another qube read the ring ref");
        assert_eq!(e.errno(), Some(crate::xen::xenstore::Errno::EACCES), "{e}");
    }

    #[test]
    fn access_specs_parse_or_say_what_to_give() {
        assert_eq!("xen".parse::<XenAccess>(), Ok(XenAccess::Linux));
        assert_eq!(
            "emul:/run/hv.sock:/run/xs.5:5".parse::<XenAccess>(),
            Ok(XenAccess::Emulated {
                hypervisor: "/run/hv.sock".into(),
                xenstore: "/run/xs.5".into(),
                domid: 5
            })
        );
        for bad in [
            "",
            "kvm",
            "emul:a:b",
            "emul:a:b:c",
            "emul::b:5",
            "emul:a:b:70000",
        ] {
            let e = bad.parse::<XenAccess>().expect_err(bad);
            assert!(e.contains("emul:<hypervisor socket>"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_dom0_that_never_answers_fails_the_start_with_a_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hv = Hypervisor::serve(dir.path().join("hv.sock")).expect("broker");
        let (_v0, _e0, info) = dom0_vchan(hv.path());
        let (v, e) = qube_vchan(hv.path(), info);
        let err = Agent::start(
            &dir.path().join("qubesdb.sock"),
            v,
            e,
            Duration::from_millis(300),
        )
        .expect_err("started without dom0's tree");
        assert!(matches!(err, LinkDriverError::SyncTimeout(_)), "{err}");
        assert!(
            err.to_string().contains("did not send its database"),
            "{err}"
        );
    }
}
