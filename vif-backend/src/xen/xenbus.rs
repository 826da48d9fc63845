//! The xenbus handshake of a netif device, both sides: the states each end writes in
//! XenStore, the features each advertises, and the keys the frontend publishes for its
//! rings, from Xen's `xen/include/public/io/xenbus.h` (the states) and
//! `xen/include/public/io/netif.h` (the keys), as Linux's `drivers/net/xen-netback/xenbus.c`
//! and `drivers/net/xen-netfront.c` run it.
//!
//! This module negotiates and leaves the data to others: the backend side reports the
//! frontend's rings, event channel and features ([`FrontendRequest`]) for a netback to map,
//! and the frontend side reports the backend's features once both are connected.
//!
//! ```text
//!  toolstack   writes backend/vif/<fe>/<n> (frontend, frontend-id, mac, ...) and
//!              device/vif/<n> (backend, backend-id, mac, ...), both state 1
//!  backend     features, state 2 InitWait ──────────────┐
//!  frontend    sees InitWait: rings, event channel, features, state 4 Connected
//!  backend     sees 3/4: maps, state 4 Connected ───────┘
//!  frontend    5 Closing, 6 Closed   →  backend 5 Closing, 6 Closed
//!  frontend    1 Initialising again  →  backend 2 InitWait again (a reconnect, as Windows
//!              PV drivers do on every boot and driver reload)
//! ```
//!
//! The backend refuses, with the reason in its `error` key (Linux's `xenbus_dev_fatal`
//! writes `error/<dev>/error`; ours is the device's own `error` key) and state 5 Closing:
//! a frontend that asks for more than one queue (we advertise no `multi-queue-max-queues`,
//! so only one is allowed: netif.h), split event channels (not advertised), no `rx-copy`
//! (the only RX mode a userspace backend can serve; `feature-rx-flip` is long gone), and
//! any key that does not parse.

use std::fmt;
use std::time::Duration;

use super::xenstore::{Store, StoreError, Tx};
use super::{DomId, GrantRef, Port};

/// `enum xenbus_state` of `io/xenbus.h`, written in XenStore as a decimal string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum XenbusState {
    Unknown = 0,
    Initialising = 1,
    InitWait = 2,
    Initialised = 3,
    Connected = 4,
    Closing = 5,
    Closed = 6,
    Reconfiguring = 7,
    Reconfigured = 8,
}

impl XenbusState {
    /// The state a `state` key holds; `None` for anything but the nine numbers.
    pub fn parse(s: &str) -> Option<XenbusState> {
        use XenbusState::*;
        Some(match s.trim().parse::<u8>().ok()? {
            0 => Unknown,
            1 => Initialising,
            2 => InitWait,
            3 => Initialised,
            4 => Connected,
            5 => Closing,
            6 => Closed,
            7 => Reconfiguring,
            8 => Reconfigured,
            _ => return None,
        })
    }

    /// The decimal string for the `state` key.
    pub fn as_str(self) -> &'static str {
        ["0", "1", "2", "3", "4", "5", "6", "7", "8"][self as usize]
    }
}

impl fmt::Display for XenbusState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({self:?})", *self as u8)
    }
}

/// Why a handshake failed: the device is then refused (backend) or given up (frontend).
#[derive(Debug)]
pub enum HandshakeError {
    /// XenStore failed.
    Store(StoreError),
    /// The peer wrote something this end does not accept; the text says what and where.
    Refused(String),
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::Store(e) => write!(f, "{e}"),
            HandshakeError::Refused(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for HandshakeError {}

impl From<StoreError> for HandshakeError {
    fn from(e: StoreError) -> Self {
        HandshakeError::Store(e)
    }
}

/// What the backend offers (netif.h feature keys in the backend directory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendFeatures {
    /// `feature-sg`: frames over several slots.
    pub sg: bool,
    /// `feature-gso-tcpv4`: we take large TCPv4 frames from the frontend.
    pub gso_tcpv4: bool,
    /// `feature-gso-tcpv6`.
    pub gso_tcpv6: bool,
    /// `feature-ipv6-csum-offload`.
    pub ipv6_csum_offload: bool,
}

impl Default for BackendFeatures {
    fn default() -> Self {
        BackendFeatures {
            sg: true,
            gso_tcpv4: true,
            gso_tcpv6: true,
            ipv6_csum_offload: true,
        }
    }
}

/// What a frontend set up and asked for, read when it reports Initialised or Connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontendRequest {
    /// The frontend's domain.
    pub domid: DomId,
    pub tx_ring_ref: GrantRef,
    pub rx_ring_ref: GrantRef,
    /// The frontend's unbound port, to bind to.
    pub event_channel: Port,
    /// `feature-rx-notify`: it notifies when it posts RX buffers.
    pub rx_notify: bool,
    /// `feature-sg`: it takes frames over several RX slots.
    pub sg: bool,
    /// `feature-gso-tcpv4` / `v6`: it takes large TCP frames.
    pub gso_tcpv4: bool,
    pub gso_tcpv6: bool,
    /// IPv4 TCP/UDP checksum offload: on unless `feature-no-csum-offload` is 1.
    pub csum_offload: bool,
    /// `feature-ipv6-csum-offload`: off unless 1.
    pub ipv6_csum_offload: bool,
}

/// What the backend side asks its caller to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendAction {
    /// Nothing now.
    Wait,
    /// The frontend is ready: map its rings and bind its port, then call
    /// [`BackendHandshake::connected`].
    Connect(FrontendRequest),
    /// The frontend is closing or was refused: unmap and unbind now. The handshake goes on
    /// (a frontend may come back from Closed, as Windows' does).
    Disconnect,
    /// The frontend's directory is gone (its domain died or was destroyed): forget the vif.
    Gone,
    /// The frontend asked for something refused; the reason is in the device's `error` key
    /// and the backend is Closing. Unmap and unbind if it was connected.
    Refused(String),
}

fn flag(store: &mut impl Store, path: &str) -> Result<Option<bool>, HandshakeError> {
    match store.read_string(Tx::NONE, path) {
        Ok(v) => match v.trim() {
            "0" => Ok(Some(false)),
            "1" => Ok(Some(true)),
            other => Err(HandshakeError::Refused(format!(
                "{path} is {other:?}, neither 0 nor 1"
            ))),
        },
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn number(store: &mut impl Store, path: &str) -> Result<Option<u32>, HandshakeError> {
    match store.read_string(Tx::NONE, path) {
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| HandshakeError::Refused(format!("{path} is {v:?}, not a number"))),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn required(store: &mut impl Store, path: &str) -> Result<u32, HandshakeError> {
    number(store, path)?.ok_or_else(|| HandshakeError::Refused(format!("{path} is missing")))
}

/// A peer's `state`; a key not there is [`XenbusState::Unknown`], a bad one an error.
fn read_state(store: &mut impl Store, path: &str) -> Result<XenbusState, HandshakeError> {
    match store.read_string(Tx::NONE, path) {
        Ok(v) => XenbusState::parse(&v)
            .ok_or_else(|| HandshakeError::Refused(format!("{path} is {v:?}, not a xenbus state"))),
        Err(e) if e.is_absent() => Ok(XenbusState::Unknown),
        Err(e) => Err(e.into()),
    }
}

/// Whether `path` is there for us.
fn visible(store: &mut impl Store, path: &str) -> Result<bool, HandshakeError> {
    match store.read(Tx::NONE, path) {
        Ok(_) => Ok(true),
        Err(e) if e.is_absent() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The backend's side of one vif (`backend/vif/<frontend-domid>/<devid>`).
#[derive(Debug)]
pub struct BackendHandshake {
    dir: String,
    frontend: String,
    frontend_id: DomId,
    features: BackendFeatures,
    state: XenbusState,
    token: String,
}

impl BackendHandshake {
    /// Takes the device the toolstack wrote at `dir`: reads where its frontend is,
    /// advertises `features` and goes to InitWait in one transaction (as netback's
    /// `netback_probe` does), and watches the frontend's `state`.
    pub fn start(
        store: &mut impl Store,
        dir: &str,
        features: BackendFeatures,
    ) -> Result<BackendHandshake, HandshakeError> {
        let frontend = store
            .read_string(Tx::NONE, &format!("{dir}/frontend"))?
            .trim()
            .to_string();
        let frontend_id = required(store, &format!("{dir}/frontend-id"))?;
        let frontend_id = DomId::try_from(frontend_id).map_err(|_| {
            HandshakeError::Refused(format!("{dir}/frontend-id {frontend_id} is no domain id"))
        })?;
        if !frontend.starts_with('/') {
            return Err(HandshakeError::Refused(format!(
                "{dir}/frontend is {frontend:?}, not an absolute path"
            )));
        }
        let mut hs = BackendHandshake {
            dir: dir.to_string(),
            frontend,
            frontend_id,
            features,
            state: XenbusState::Initialising,
            token: format!("netback:{dir}"),
        };
        hs.advertise(store)?;
        store.watch(&format!("{}/state", hs.frontend), &hs.token)?;
        Ok(hs)
    }

    /// The backend directory.
    pub fn dir(&self) -> &str {
        &self.dir
    }

    /// The frontend's domain.
    pub fn frontend_id(&self) -> DomId {
        self.frontend_id
    }

    /// Our state as last written.
    pub fn state(&self) -> XenbusState {
        self.state
    }

    /// The watch token whose events belong to this handshake.
    pub fn token(&self) -> &str {
        &self.token
    }

    fn advertise(&mut self, store: &mut impl Store) -> Result<(), HandshakeError> {
        let dir = self.dir.clone();
        let f = self.features;
        let b = |v: bool| if v { "1" } else { "0" };
        store.transaction(|s, tx| {
            for (key, value) in [
                ("feature-sg", b(f.sg)),
                ("feature-gso-tcpv4", b(f.gso_tcpv4)),
                ("feature-gso-tcpv6", b(f.gso_tcpv6)),
                ("feature-ipv6-csum-offload", b(f.ipv6_csum_offload)),
                ("feature-rx-copy", "1"),
                ("feature-rx-flip", "0"),
                ("feature-split-event-channels", "0"),
                ("feature-multicast-control", "0"),
                ("state", XenbusState::InitWait.as_str()),
            ] {
                s.write(tx, &format!("{dir}/{key}"), value.as_bytes())?;
            }
            Ok(())
        })?;
        self.state = XenbusState::InitWait;
        Ok(())
    }

    fn set_state(&mut self, store: &mut impl Store, s: XenbusState) -> Result<(), HandshakeError> {
        store.write(
            Tx::NONE,
            &format!("{}/state", self.dir),
            s.as_str().as_bytes(),
        )?;
        self.state = s;
        Ok(())
    }

    /// To be called on every watch event with [`Self::token`] (and once after `start`):
    /// looks at the frontend's state and says what to do.
    pub fn on_event(&mut self, store: &mut impl Store) -> Result<BackendAction, HandshakeError> {
        let fe = match read_state(store, &format!("{}/state", self.frontend)) {
            Ok(s) => s,
            Err(HandshakeError::Refused(why)) => return self.refuse(store, &why),
            Err(e) => return Err(e),
        };
        use XenbusState::*;
        match fe {
            Initialised | Connected if self.state == InitWait => match self.read_request(store) {
                Ok(req) => Ok(BackendAction::Connect(req)),
                Err(HandshakeError::Refused(why)) => self.refuse(store, &why),
                Err(e) => Err(e),
            },
            Closing if self.state != Closing && self.state != Closed => {
                let was_connected = self.state == Connected;
                self.set_state(store, Closing)?;
                Ok(if was_connected {
                    BackendAction::Disconnect
                } else {
                    BackendAction::Wait
                })
            }
            Closed if self.state != Closed => {
                let was_connected = self.state == Connected;
                self.set_state(store, Closed)?;
                Ok(if was_connected {
                    BackendAction::Disconnect
                } else {
                    BackendAction::Wait
                })
            }
            // The frontend starts over after a close: offer the device again.
            Initialising | InitWait if matches!(self.state, Closing | Closed) => {
                self.advertise(store)?;
                Ok(BackendAction::Wait)
            }
            Unknown if !visible(store, &self.frontend)? => {
                if self.state != Closed {
                    let _ = self.set_state(store, Closed);
                }
                Ok(BackendAction::Gone)
            }
            _ => Ok(BackendAction::Wait),
        }
    }

    /// The rings are mapped and the port bound: tell the frontend.
    pub fn connected(&mut self, store: &mut impl Store) -> Result<(), HandshakeError> {
        self.set_state(store, XenbusState::Connected)
    }

    /// The backend gives up on the device with a reason (a bad mapping found after
    /// Connect, a hostile ring): `error` and Closing, as `xenbus_dev_fatal` does.
    pub fn fail(&mut self, store: &mut impl Store, why: &str) -> Result<(), HandshakeError> {
        store.write(Tx::NONE, &format!("{}/error", self.dir), why.as_bytes())?;
        self.set_state(store, XenbusState::Closing)
    }

    fn refuse(
        &mut self,
        store: &mut impl Store,
        why: &str,
    ) -> Result<BackendAction, HandshakeError> {
        self.fail(store, why)?;
        Ok(BackendAction::Refused(why.to_string()))
    }

    fn read_request(&self, store: &mut impl Store) -> Result<FrontendRequest, HandshakeError> {
        let fe = &self.frontend;
        if let Some(n) = number(store, &format!("{fe}/multi-queue-num-queues"))? {
            if n != 1 {
                return Err(HandshakeError::Refused(format!(
                    "the frontend asked for {n} queues ({fe}/multi-queue-num-queues); this \
                     backend serves one"
                )));
            }
        }
        if store.exists(Tx::NONE, &format!("{fe}/event-channel-tx"))?
            && !store.exists(Tx::NONE, &format!("{fe}/event-channel"))?
        {
            return Err(HandshakeError::Refused(format!(
                "the frontend split its event channels ({fe}/event-channel-tx), which this \
                 backend does not offer"
            )));
        }
        if flag(store, &format!("{fe}/request-rx-copy"))? != Some(true) {
            return Err(HandshakeError::Refused(format!(
                "the frontend did not ask for rx-copy ({fe}/request-rx-copy), the only \
                 receive mode this backend has"
            )));
        }
        let f = self.features;
        Ok(FrontendRequest {
            domid: self.frontend_id,
            tx_ring_ref: GrantRef(required(store, &format!("{fe}/tx-ring-ref"))?),
            rx_ring_ref: GrantRef(required(store, &format!("{fe}/rx-ring-ref"))?),
            event_channel: Port(required(store, &format!("{fe}/event-channel"))?),
            rx_notify: flag(store, &format!("{fe}/feature-rx-notify"))?.unwrap_or(false),
            sg: f.sg && flag(store, &format!("{fe}/feature-sg"))?.unwrap_or(false),
            gso_tcpv4: f.gso_tcpv4
                && flag(store, &format!("{fe}/feature-gso-tcpv4"))?.unwrap_or(false),
            gso_tcpv6: f.gso_tcpv6
                && flag(store, &format!("{fe}/feature-gso-tcpv6"))?.unwrap_or(false),
            csum_offload: !flag(store, &format!("{fe}/feature-no-csum-offload"))?.unwrap_or(false),
            ipv6_csum_offload: f.ipv6_csum_offload
                && flag(store, &format!("{fe}/feature-ipv6-csum-offload"))?.unwrap_or(false),
        })
    }
}

/// What the frontend publishes once its rings are granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontendRings {
    pub tx_ring_ref: GrantRef,
    pub rx_ring_ref: GrantRef,
    pub event_channel: Port,
    /// What the frontend takes: `feature-sg`, `feature-gso-tcpv4`, `feature-gso-tcpv6`.
    pub sg: bool,
    pub gso_tcpv4: bool,
    pub gso_tcpv6: bool,
}

/// What the backend offered, read once it is connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendOffer {
    pub domid: DomId,
    pub sg: bool,
    pub gso_tcpv4: bool,
    pub gso_tcpv6: bool,
    pub ipv6_csum_offload: bool,
}

/// What the frontend side asks its caller to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendAction {
    Wait,
    /// The backend waits for us: grant the rings, allocate the port, then
    /// [`FrontendHandshake::publish`].
    SetUp {
        backend: DomId,
    },
    /// The backend is connected: traffic may flow (not before, netfront's rule).
    Ready(BackendOffer),
    /// The backend is closing or gone: stop, release the rings.
    Disconnect,
}

/// The frontend's side of one vif (`device/vif/<devid>`), the uplink's.
#[derive(Debug)]
pub struct FrontendHandshake {
    dir: String,
    backend: String,
    backend_id: DomId,
    state: XenbusState,
    token: String,
}

impl FrontendHandshake {
    /// Takes the device the toolstack wrote at `dir`, waiting up to `wait` for its `backend`
    /// keys (mirage-net-xen 2.1.3: they may come after the directory), and watches the
    /// backend's `state`.
    pub fn start(
        store: &mut impl Store,
        dir: &str,
        wait: Duration,
    ) -> Result<FrontendHandshake, HandshakeError> {
        let start = std::time::Instant::now();
        let (backend, backend_id) = loop {
            let b = match store.read_string(Tx::NONE, &format!("{dir}/backend")) {
                Ok(v) => Some(v.trim().to_string()),
                Err(e) if e.is_not_found() => None,
                Err(e) => return Err(e.into()),
            };
            let id = number(store, &format!("{dir}/backend-id"))?;
            if let (Some(b), Some(id)) = (b, id) {
                break (b, id);
            }
            if start.elapsed() >= wait {
                return Err(HandshakeError::Refused(format!(
                    "{dir}/backend and backend-id did not appear within {} s",
                    wait.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let backend_id = DomId::try_from(backend_id).map_err(|_| {
            HandshakeError::Refused(format!("{dir}/backend-id {backend_id} is no domain id"))
        })?;
        let hs = FrontendHandshake {
            dir: dir.to_string(),
            backend,
            backend_id,
            state: XenbusState::Initialising,
            token: format!("netfront:{dir}"),
        };
        hs.reset_stale_backend(store, start, wait)?;
        store.write(
            Tx::NONE,
            &format!("{dir}/state"),
            XenbusState::Initialising.as_str().as_bytes(),
        )?;
        store.watch(&format!("{}/state", hs.backend), &hs.token)?;
        Ok(hs)
    }

    /// A backend still connected (or closing) from a previous instance of this frontend (a
    /// crashed or restarted process, a kexec'd kernel) holds the old rings: walk it through
    /// Closing and Closed first, waiting for each, as Linux's `xenbus_reset_state` does
    /// (drivers/xen/xenbus/xenbus_probe_frontend.c), so it offers the device afresh.
    fn reset_stale_backend(
        &self,
        store: &mut impl Store,
        start: std::time::Instant,
        wait: Duration,
    ) -> Result<(), HandshakeError> {
        use XenbusState::*;
        let be_state = format!("{}/state", self.backend);
        if !matches!(read_state(store, &be_state)?, Connected | Closing) {
            return Ok(());
        }
        for (ours, theirs) in [(Closing, [Closing, Closed]), (Closed, [Closed, Closed])] {
            store.write(
                Tx::NONE,
                &format!("{}/state", self.dir),
                ours.as_str().as_bytes(),
            )?;
            loop {
                let now = read_state(store, &be_state)?;
                if theirs.contains(&now) || now == Unknown {
                    break;
                }
                if start.elapsed() >= wait {
                    return Err(HandshakeError::Refused(format!(
                        "{be_state} stayed {now} while resetting a stale connection"
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn state(&self) -> XenbusState {
        self.state
    }

    /// To be called on every watch event with [`Self::token`].
    pub fn on_event(&mut self, store: &mut impl Store) -> Result<FrontendAction, HandshakeError> {
        use XenbusState::*;
        let be = read_state(store, &format!("{}/state", self.backend))?;
        match be {
            InitWait if self.state == Initialising => Ok(FrontendAction::SetUp {
                backend: self.backend_id,
            }),
            Connected if self.state == Connected => Ok(FrontendAction::Ready(self.offer(store)?)),
            Closing | Closed | Unknown if self.state != Closed => {
                let was = self.state;
                self.close(store)?;
                Ok(if was == Initialising {
                    FrontendAction::Wait
                } else {
                    FrontendAction::Disconnect
                })
            }
            _ => Ok(FrontendAction::Wait),
        }
    }

    /// What the backend advertises now. It wrote its features before InitWait (netback's
    /// probe does it in one transaction with the state), so at [`FrontendAction::SetUp`]
    /// they are already there: a frontend sizes what it sends from them.
    pub fn offer(&self, store: &mut impl Store) -> Result<BackendOffer, HandshakeError> {
        let b = &self.backend;
        Ok(BackendOffer {
            domid: self.backend_id,
            sg: flag(store, &format!("{b}/feature-sg"))?.unwrap_or(false),
            gso_tcpv4: flag(store, &format!("{b}/feature-gso-tcpv4"))?.unwrap_or(false),
            gso_tcpv6: flag(store, &format!("{b}/feature-gso-tcpv6"))?.unwrap_or(false),
            ipv6_csum_offload: flag(store, &format!("{b}/feature-ipv6-csum-offload"))?
                .unwrap_or(false),
        })
    }

    /// Writes the rings, the port and what we take in one transaction, then Connected.
    pub fn publish(
        &mut self,
        store: &mut impl Store,
        rings: FrontendRings,
    ) -> Result<(), HandshakeError> {
        let dir = self.dir.clone();
        let b = |v: bool| if v { "1" } else { "0" };
        store.transaction(|s, tx| {
            for (key, value) in [
                ("tx-ring-ref", rings.tx_ring_ref.0.to_string()),
                ("rx-ring-ref", rings.rx_ring_ref.0.to_string()),
                ("event-channel", rings.event_channel.0.to_string()),
                ("request-rx-copy", "1".into()),
                ("feature-rx-notify", "1".into()),
                ("feature-sg", b(rings.sg).into()),
                ("feature-gso-tcpv4", b(rings.gso_tcpv4).into()),
                ("feature-gso-tcpv6", b(rings.gso_tcpv6).into()),
                ("state", XenbusState::Connected.as_str().into()),
            ] {
                s.write(tx, &format!("{dir}/{key}"), value.as_bytes())?;
            }
            Ok(())
        })?;
        self.state = XenbusState::Connected;
        Ok(())
    }

    /// Closes our side: Closing, then Closed.
    pub fn close(&mut self, store: &mut impl Store) -> Result<(), HandshakeError> {
        for s in [XenbusState::Closing, XenbusState::Closed] {
            store.write(
                Tx::NONE,
                &format!("{}/state", self.dir),
                s.as_str().as_bytes(),
            )?;
        }
        self.state = XenbusState::Closed;
        Ok(())
    }

    /// Starts over after a close (Initialising), as a driver reload does.
    pub fn reopen(&mut self, store: &mut impl Store) -> Result<(), HandshakeError> {
        store.write(
            Tx::NONE,
            &format!("{}/state", self.dir),
            XenbusState::Initialising.as_str().as_bytes(),
        )?;
        self.state = XenbusState::Initialising;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xen::xenstore::client::Client;
    use crate::xen::xenstore::server::Server;
    use crate::xen::xenstore::{Access, Perm};
    use std::os::unix::net::UnixStream;

    const BACKEND: DomId = 3;
    const FRONTEND: DomId = 7;
    const BE_DIR: &str = "/local/domain/3/backend/vif/7/0";
    const FE_DIR: &str = "/local/domain/7/device/vif/0";
    const WAIT: Duration = Duration::from_secs(5);

    struct Env {
        be: Client<UnixStream>,
        fe: Client<UnixStream>,
        dom0: Client<UnixStream>,
        _server: Server,
        _dir: tempfile::TempDir,
    }

    /// What libxl does when it adds a vif: both directories at state 1, each owned by its
    /// domain and readable by the other.
    fn toolstack() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = Server::start(dir.path().join("xs")).expect("xenstored");
        let connect = |d| Client::connect(server.add_domain(d).expect("socket")).expect("client");
        let (mut dom0, be, fe) = (connect(0), connect(BACKEND), connect(FRONTEND));
        for (path, owner, peer, keys) in [
            (
                BE_DIR,
                BACKEND,
                FRONTEND,
                vec![
                    ("frontend", FE_DIR.to_string()),
                    ("frontend-id", FRONTEND.to_string()),
                    ("mac", "00:16:3e:5e:6c:07".into()),
                    ("handle", "0".into()),
                    ("online", "1".into()),
                    ("state", "1".into()),
                ],
            ),
            (
                FE_DIR,
                FRONTEND,
                BACKEND,
                vec![
                    ("backend", BE_DIR.to_string()),
                    ("backend-id", BACKEND.to_string()),
                    ("mac", "00:16:3e:5e:6c:07".into()),
                    ("handle", "0".into()),
                    ("state", "1".into()),
                ],
            ),
        ] {
            dom0.mkdir(Tx::NONE, path).expect("mkdir");
            dom0.set_perms(
                Tx::NONE,
                path,
                &[
                    Perm::new(Access::None, owner),
                    Perm::new(Access::Read, peer),
                ],
            )
            .expect("perms");
            for (k, v) in keys {
                let p = format!("{path}/{k}");
                dom0.write(Tx::NONE, &p, v.as_bytes()).expect("write");
                dom0.set_perms(
                    Tx::NONE,
                    &p,
                    &[
                        Perm::new(Access::None, owner),
                        Perm::new(Access::Read, peer),
                    ],
                )
                .expect("perms");
            }
        }
        Env {
            be,
            fe,
            dom0,
            _server: server,
            _dir: dir,
        }
    }

    fn rings(n: u32) -> FrontendRings {
        FrontendRings {
            tx_ring_ref: GrantRef(8 + n),
            rx_ring_ref: GrantRef(9 + n),
            event_channel: Port(5 + n),
            sg: true,
            gso_tcpv4: true,
            gso_tcpv6: false,
        }
    }

    /// Waits for a watch event with `token` on `store`.
    fn event(store: &mut Client<UnixStream>, token: &str) {
        let start = std::time::Instant::now();
        loop {
            assert!(start.elapsed() < WAIT, "no watch event for {token}");
            if let Some(ev) = store.wait_event(Duration::from_millis(100)).expect("event") {
                if ev.token == token {
                    return;
                }
            }
        }
    }

    fn state(store: &mut Client<UnixStream>, dir: &str) -> String {
        store
            .read_string(Tx::NONE, &format!("{dir}/state"))
            .expect("state")
    }

    /// Connects both sides from the toolstack's state 1.
    fn connect(env: &mut Env, be: &mut BackendHandshake, fe: &mut FrontendHandshake, n: u32) {
        assert_eq!(state(&mut env.fe, BE_DIR), "2", "the backend waits");
        assert_eq!(
            fe.on_event(&mut env.fe).expect("fe"),
            FrontendAction::SetUp { backend: BACKEND }
        );
        fe.publish(&mut env.fe, rings(n)).expect("publish");
        event(&mut env.be, be.token());
        let BackendAction::Connect(req) = be.on_event(&mut env.be).expect("be") else {
            panic!("the backend did not connect");
        };
        assert_eq!(
            (
                req.domid,
                req.tx_ring_ref,
                req.rx_ring_ref,
                req.event_channel
            ),
            (FRONTEND, GrantRef(8 + n), GrantRef(9 + n), Port(5 + n))
        );
        assert!(req.sg && req.gso_tcpv4 && !req.gso_tcpv6 && req.rx_notify);
        assert!(req.csum_offload && !req.ipv6_csum_offload);
        be.connected(&mut env.be).expect("connected");
        event(&mut env.fe, fe.token());
        let FrontendAction::Ready(offer) = fe.on_event(&mut env.fe).expect("fe") else {
            panic!("the frontend is not ready");
        };
        assert_eq!(offer.domid, BACKEND);
        assert!(offer.sg && offer.gso_tcpv4 && offer.gso_tcpv6 && offer.ipv6_csum_offload);
        assert_eq!(state(&mut env.dom0, BE_DIR), "4");
        assert_eq!(state(&mut env.dom0, FE_DIR), "4");
    }

    #[test]
    fn both_sides_connect_close_and_reconnect() {
        let mut env = toolstack();
        let mut be =
            BackendHandshake::start(&mut env.be, BE_DIR, BackendFeatures::default()).expect("be");
        let mut fe = FrontendHandshake::start(&mut env.fe, FE_DIR, WAIT).expect("fe");
        connect(&mut env, &mut be, &mut fe, 0);
        // The frontend closes (a driver unload): the backend disconnects and follows.
        fe.close(&mut env.fe).expect("close");
        event(&mut env.be, be.token());
        assert_eq!(
            be.on_event(&mut env.be).expect("be"),
            BackendAction::Disconnect
        );
        assert_eq!(state(&mut env.dom0, BE_DIR), "6");
        // And comes back, as Windows' drivers do: the backend offers the device again.
        fe.reopen(&mut env.fe).expect("reopen");
        event(&mut env.be, be.token());
        assert_eq!(be.on_event(&mut env.be).expect("be"), BackendAction::Wait);
        event(&mut env.fe, fe.token());
        connect(&mut env, &mut be, &mut fe, 10);
        // The frontend's domain goes away.
        env.dom0.rm(Tx::NONE, FE_DIR).expect("rm");
        event(&mut env.be, be.token());
        assert_eq!(be.on_event(&mut env.be).expect("be"), BackendAction::Gone);
    }

    #[test]
    fn what_the_backend_refuses_is_named_in_its_error_key() {
        for (key, value, want) in [
            ("multi-queue-num-queues", "4", "asked for 4 queues"),
            ("request-rx-copy", "0", "did not ask for rx-copy"),
            ("event-channel-tx", "9", "split its event channels"),
            ("tx-ring-ref", "x", "not a number"),
            ("feature-sg", "yes", "neither 0 nor 1"),
        ] {
            let mut env = toolstack();
            let mut be = BackendHandshake::start(&mut env.be, BE_DIR, BackendFeatures::default())
                .expect("be");
            let mut fe = FrontendHandshake::start(&mut env.fe, FE_DIR, WAIT).expect("fe");
            assert!(matches!(
                fe.on_event(&mut env.fe).expect("fe"),
                FrontendAction::SetUp { .. }
            ));
            fe.publish(&mut env.fe, rings(0)).expect("publish");
            if key == "event-channel-tx" {
                env.fe
                    .rm(Tx::NONE, &format!("{FE_DIR}/event-channel"))
                    .expect("rm");
            }
            env.fe
                .write(Tx::NONE, &format!("{FE_DIR}/{key}"), value.as_bytes())
                .expect("write");
            let action = be.on_event(&mut env.be).expect("be");
            let BackendAction::Refused(why) = action else {
                panic!("{key}={value}: not refused: {action:?}");
            };
            assert!(why.contains(want), "{key}={value}: {why}");
            let error = env
                .dom0
                .read_string(Tx::NONE, &format!("{BE_DIR}/error"))
                .expect("error key");
            assert!(error.contains(want), "{key}={value}: error key {error:?}");
            assert_eq!(state(&mut env.dom0, BE_DIR), "5", "{key}={value}");
        }
    }

    #[test]
    fn a_frontend_state_that_is_no_state_is_refused() {
        let mut env = toolstack();
        let mut be =
            BackendHandshake::start(&mut env.be, BE_DIR, BackendFeatures::default()).expect("be");
        env.fe
            .write(Tx::NONE, &format!("{FE_DIR}/state"), b"9")
            .expect("write");
        let action = be.on_event(&mut env.be).expect("be");
        assert!(
            matches!(&action, BackendAction::Refused(w) if w.contains("not a xenbus state")),
            "{action:?}"
        );
    }

    #[test]
    fn states_are_the_header_numbers() {
        for n in 0..=8u8 {
            let s = XenbusState::parse(&n.to_string()).expect("state");
            assert_eq!(s as u8, n);
            assert_eq!(s.as_str(), n.to_string());
        }
        assert_eq!(XenbusState::Connected as u8, 4);
        assert_eq!(XenbusState::parse("9"), None);
        assert_eq!(XenbusState::parse("-1"), None);
        assert_eq!(XenbusState::parse(""), None);
    }
}
