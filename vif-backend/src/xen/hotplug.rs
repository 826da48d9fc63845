//! The vif hotplug step a service qube does for itself: when the toolstack gives it a client
//! vif, check what the toolstack wrote, bring the interface up and tell netback it may
//! connect; when the vif goes away, bring the interface down.
//!
//! Upstream this is udev running `/etc/xen/scripts/vif-route-qubes` (QubesOS/qubes-core-agent-linux
//! `network/vif-route-qubes`, on top of xen-project/xen `tools/hotplug/Linux/vif-common.sh`
//! and `xen-hotplug-common.sh`). A qube booted from our image has neither udev nor those
//! scripts, and Linux's netback (`drivers/net/xen-netback/xenbus.c`) will not connect the
//! frontend until the hotplug step is done: its `hotplug_status_changed` watch waits for the
//! backend's `hotplug-status` to read `connected`, which the scripts' `success` function
//! writes. Without this module a client qube's network would never come up.
//!
//! What the toolstack (libxl) writes, in the service qube's own tree, per vif:
//! `backend/vif/<frontend-domid>/<devid>/` with `frontend`, `frontend-id`, `mac` (the
//! client's MAC), `handle`, `online` (`1`), `script`, `state`, and Qubes' `ip`
//! (`<ipv4> [<ipv6>]`, the client's addresses). Netback then creates the interface
//! `vif<domid>.<devid>`, possibly a little after the directory appears.
//!
//! [`Hotplug`] keeps one XenStore watch on `backend/vif` (relative: our own domain's tree).
//! Every event means "look again": it lists `backend/vif/*/*` and compares with what it knows
//! (the watch fires once when set, which is the initial scan). Each vif, including several of
//! one domain (an HVM qube's stubdomain has its own), goes through:
//!
//! - **online**: the name must be `vif<domid>.<devid>` in canonical decimal (else "Bad
//!   interface name", as vif-route-qubes refuses), `ip` and `mac` must parse; then, once the
//!   interface exists, it is set up and `hotplug-status` = `connected` is written
//!   ([`VifEvent::Added`]). A vif that cannot be brought up gets `hotplug-error` = the reason
//!   and `hotplug-status` = `error`, as the scripts' `fatal` writes ([`VifEvent::Refused`]),
//!   and stays refused until its directory goes away or goes offline;
//! - **pending**: the interface does not exist yet; retried on every [`Hotplug::poll`] until
//!   it appears, refused after [`LINK_TIMEOUT`];
//! - **offline**: the directory was removed, `online` became `0`, or the backend `state` is
//!   Closing (5) or Closed (6): the interface is set down if it is still there
//!   ([`VifEvent::Removed`]).
//!
//! The status keys are written in a transaction that first checks the directory still has
//! its `online` key: a XenStore write creates missing parents, so a blind write racing the
//! toolstack's removal would leave a stub directory behind.
//!
//! Paths in events and messages are relative to this domain's `/local/domain/<domid>`.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use super::xenstore::{Store, StoreError, Tx};
use super::DomId;

#[cfg(test)]
mod tests;

/// Where the toolstack puts this domain's vif backends (relative to `/local/domain/<us>`).
pub const WATCH_PATH: &str = "backend/vif";

/// The token of our one watch.
const TOKEN: &str = "vif-hotplug";

/// How long a vif may wait for netback to create its interface before it is refused.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(30);

/// How often pending vifs are looked at again while something waits on [`Hotplug::wait`].
pub const RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// Linux's `IFNAMSIZ` less its NUL: the longest interface name.
const MAX_IFNAME: usize = 15;

/// xenbus states (`io/xenbus.h`) that mean the backend is going away.
const XENBUS_CLOSING: &str = "5";
const XENBUS_CLOSED: &str = "6";

/// What happened to a vif.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VifEvent {
    /// The vif's interface is up and netback was told it may connect.
    Added {
        /// The interface, `vif<domid>.<devid>`.
        vif: String,
        domid: DomId,
        devid: u32,
        /// The client's IPv4 address (the first one in `ip`).
        ip: Ipv4Addr,
        /// The client's IPv6 address, if `ip` has one.
        ip6: Option<Ipv6Addr>,
        /// The client's MAC (`mac`).
        mac: [u8; 6],
    },
    /// A vif reported [`VifEvent::Added`] went offline; its interface was set down if it
    /// still existed.
    Removed { vif: String },
    /// A vif that will not be brought up: `path` is its backend directory, `reason` what was
    /// wrong (also written to its `hotplug-error`).
    Refused { path: String, reason: String },
}

/// The links the hotplug step acts on; [`KernelLinks`] for the kernel's, a fake in tests.
pub trait VifLinks {
    /// Sets the interface `name` administratively up or down.
    fn set_up(&mut self, name: &str, up: bool) -> io::Result<()>;
    /// Whether the interface `name` exists.
    fn exists(&self, name: &str) -> bool;
}

/// The kernel's links, over rtnetlink ([`crate::link::set_link_up`],
/// [`crate::link::link_exists`]), in the calling thread's network namespace.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelLinks;

impl VifLinks for KernelLinks {
    fn set_up(&mut self, name: &str, up: bool) -> io::Result<()> {
        crate::link::set_link_up(name, up)
    }

    fn exists(&self, name: &str) -> bool {
        // An error asking is "not there yet": the vif stays pending and is refused at the
        // timeout if it persists.
        crate::link::link_exists(name).unwrap_or(false)
    }
}

/// Why [`Hotplug`] itself failed (a single vif's trouble is a [`VifEvent::Refused`]).
#[derive(Debug)]
pub enum HotplugError {
    /// The XenStore connection failed, or refused setting the watch.
    Store(StoreError),
}

impl fmt::Display for HotplugError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HotplugError::Store(e) => write!(f, "vif hotplug: {e}"),
        }
    }
}

impl std::error::Error for HotplugError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HotplugError::Store(e) => Some(e),
        }
    }
}

impl From<StoreError> for HotplugError {
    fn from(e: StoreError) -> Self {
        HotplugError::Store(e)
    }
}

/// The links of a service that is the vifs' back end itself ([`super::device`]): there is
/// no kernel interface to wait for or bring up; the vif exists once its directory does.
#[derive(Debug, Default)]
pub struct UserspaceLinks;

impl VifLinks for UserspaceLinks {
    fn set_up(&mut self, _name: &str, _up: bool) -> io::Result<()> {
        Ok(())
    }

    fn exists(&self, _name: &str) -> bool {
        true
    }
}

/// A vif whose keys checked out.
#[derive(Clone, Debug)]
struct Vif {
    name: String,
    domid: DomId,
    devid: u32,
    ip: Ipv4Addr,
    ip6: Option<Ipv6Addr>,
    mac: [u8; 6],
}

#[derive(Debug)]
enum Track {
    /// Waiting for netback's interface since `since`.
    Pending { since: Instant, vif: Vif },
    /// Up and reported connected.
    Up { name: String },
    /// Refused; left alone until the directory goes away or offline.
    Refused,
}

/// What a backend directory asks for.
enum Wanted {
    Online,
    Offline,
    /// Keys missing or unreadable for now: nothing changes.
    NotReady,
}

/// The hotplug step over a [`Store`] connected as the service qube (see the module docs).
#[derive(Debug)]
pub struct Hotplug<S: Store> {
    store: S,
    /// By backend directory (`backend/vif/<d>/<n>`).
    known: BTreeMap<String, Track>,
    link_timeout: Duration,
    /// A watch event was taken by [`Hotplug::wait`]: rescan on the next poll.
    dirty: bool,
    /// The backend `state` key is ours (a userspace back end): a Closing or Closed there
    /// is a frontend's close and reconnect cycle, not the vif going away.
    state_is_ours: bool,
}

impl<S: Store> Hotplug<S> {
    /// Sets the watch on [`WATCH_PATH`]; the first [`Hotplug::poll`] does the initial scan.
    pub fn new(store: S) -> Result<Self, HotplugError> {
        Self::with_link_timeout(store, LINK_TIMEOUT)
    }

    /// [`Hotplug::new`] with another bound on waiting for an interface.
    pub fn with_link_timeout(mut store: S, link_timeout: Duration) -> Result<Self, HotplugError> {
        store.watch(WATCH_PATH, TOKEN)?;
        Ok(Hotplug {
            store,
            known: BTreeMap::new(),
            link_timeout,
            dirty: false,
            state_is_ours: false,
        })
    }

    /// [`Hotplug::new`] for a service that serves the vifs' rings itself (with
    /// [`UserspaceLinks`]): the vif lives while its directory is there and `online` is 1,
    /// whatever the `state` our own handshake writes.
    pub fn for_userspace_backend(store: S) -> Result<Self, HotplugError> {
        let mut h = Self::new(store)?;
        h.state_is_ours = true;
        Ok(h)
    }

    /// Readable when XenStore has sent something, for `poll(2)`. While
    /// [`Hotplug::retry_in`] is `Some`, poll with at most that timeout.
    pub fn raw_fd(&self) -> RawFd {
        self.store.raw_fd()
    }

    /// When [`Hotplug::poll`] should be called again even without XenStore activity:
    /// `Some` while a vif waits for its interface.
    pub fn retry_in(&self) -> Option<Duration> {
        self.known
            .values()
            .any(|t| matches!(t, Track::Pending { .. }))
            .then_some(RETRY_INTERVAL)
    }

    /// The interfaces that are up, by backend directory.
    pub fn connected(&self) -> impl Iterator<Item = (&str, &str)> {
        self.known.iter().filter_map(|(p, t)| match t {
            Track::Up { name } => Some((p.as_str(), name.as_str())),
            _ => None,
        })
    }

    /// Waits up to `timeout` (at most [`RETRY_INTERVAL`] while a vif is pending) for
    /// something for [`Hotplug::poll`] to do; returns whether there is.
    pub fn wait(&mut self, timeout: Duration) -> Result<bool, HotplugError> {
        if self.dirty {
            return Ok(true);
        }
        let pending = self.retry_in();
        let t = pending.map_or(timeout, |r| r.min(timeout));
        if let Some(ev) = self.store.wait_event(t)? {
            if ev.token == TOKEN {
                self.dirty = true;
            }
        }
        Ok(self.dirty || pending.is_some())
    }

    /// Takes the watch events that arrived, rescans if there were any, and retries the
    /// pending vifs; never blocks on anything but XenStore's replies.
    pub fn poll(&mut self, links: &mut impl VifLinks) -> Result<Vec<VifEvent>, HotplugError> {
        while let Some(ev) = self.store.next_event()? {
            if ev.token == TOKEN {
                self.dirty = true;
            }
        }
        let mut out = Vec::new();
        if std::mem::take(&mut self.dirty) {
            self.rescan(links, &mut out)?;
        }
        self.retry_pending(links, &mut out)?;
        Ok(out)
    }

    fn rescan(
        &mut self,
        links: &mut impl VifLinks,
        out: &mut Vec<VifEvent>,
    ) -> Result<(), HotplugError> {
        let mut present = Vec::new();
        for d in self.list(WATCH_PATH)? {
            let dpath = format!("{WATCH_PATH}/{d}");
            for n in self.list(&dpath)? {
                present.push((format!("{dpath}/{n}"), d.clone(), n));
            }
        }
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|k| !present.iter().any(|(p, _, _)| p == *k))
            .cloned()
            .collect();
        for path in gone {
            self.offline(&path, links, out);
        }
        for (path, d, n) in present {
            match self.wanted(&path)? {
                Wanted::NotReady => {}
                Wanted::Offline => self.offline(&path, links, out),
                Wanted::Online if self.known.contains_key(&path) => {}
                Wanted::Online => match self.check(&path, &d, &n)? {
                    Ok(vif) => {
                        self.known.insert(
                            path,
                            Track::Pending {
                                since: Instant::now(),
                                vif,
                            },
                        );
                    }
                    Err(reason) => self.refuse(&path, reason, out)?,
                },
            }
        }
        Ok(())
    }

    /// The children of `path`; none if it is missing or not ours to read.
    fn list(&mut self, path: &str) -> Result<Vec<String>, HotplugError> {
        match self.store.directory(Tx::NONE, path) {
            Ok(v) => Ok(v),
            Err(e) if e.errno().is_some() => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// A key's value; `None` if it is missing, unreadable or not text.
    fn key(&mut self, path: &str) -> Result<Option<String>, HotplugError> {
        match self.store.read_string(Tx::NONE, path) {
            Ok(v) => Ok(Some(v)),
            Err(e @ StoreError::Io { .. }) => Err(e.into()),
            Err(_) => Ok(None),
        }
    }

    fn wanted(&mut self, path: &str) -> Result<Wanted, HotplugError> {
        if !self.state_is_ours {
            let state = self.key(&format!("{path}/state"))?;
            if matches!(state.as_deref(), Some(XENBUS_CLOSING | XENBUS_CLOSED)) {
                return Ok(Wanted::Offline);
            }
        }
        Ok(match self.key(&format!("{path}/online"))?.as_deref() {
            Some("1") => Wanted::Online,
            Some("0") => Wanted::Offline,
            _ => Wanted::NotReady,
        })
    }

    /// The vif's name and keys, or why it will not be brought up.
    fn check(&mut self, path: &str, d: &str, n: &str) -> Result<Result<Vif, String>, HotplugError> {
        let name = format!("vif{d}.{n}");
        let Some((domid, devid)) = parse_vif_name(&name) else {
            return Ok(Err(format!("Bad interface name {name:?}")));
        };
        let ip_path = format!("{path}/ip");
        let (ip, ip6) = match self.key(&ip_path)? {
            None => return Ok(Err(format!("{ip_path}: missing"))),
            Some(v) => match parse_ip(&v) {
                Ok(a) => a,
                Err(why) => return Ok(Err(format!("{ip_path}: {why}"))),
            },
        };
        let mac_path = format!("{path}/mac");
        let mac = match self.key(&mac_path)? {
            None => return Ok(Err(format!("{mac_path}: missing"))),
            Some(v) => match parse_mac(&v) {
                Some(m) => m,
                None => return Ok(Err(format!("{mac_path}: malformed MAC {v:?}"))),
            },
        };
        Ok(Ok(Vif {
            name,
            domid,
            devid,
            ip,
            ip6,
            mac,
        }))
    }

    fn retry_pending(
        &mut self,
        links: &mut impl VifLinks,
        out: &mut Vec<VifEvent>,
    ) -> Result<(), HotplugError> {
        let pending: Vec<(String, Instant, Vif)> = self
            .known
            .iter()
            .filter_map(|(p, t)| match t {
                Track::Pending { since, vif } => Some((p.clone(), *since, vif.clone())),
                _ => None,
            })
            .collect();
        for (path, since, vif) in pending {
            if !links.exists(&vif.name) {
                if since.elapsed() >= self.link_timeout {
                    let reason = format!(
                        "interface {} did not appear within {} ms",
                        vif.name,
                        self.link_timeout.as_millis()
                    );
                    self.refuse(&path, reason, out)?;
                }
                continue;
            }
            match links.set_up(&vif.name, true) {
                Ok(()) => {}
                // Gone between the two calls: netback is tearing it down; look again later.
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => continue,
                Err(e) => {
                    self.refuse(&path, format!("setting {} up: {e}", vif.name), out)?;
                    continue;
                }
            }
            if self.write_status(&path, &[("hotplug-status", "connected")])? {
                self.known.insert(
                    path,
                    Track::Up {
                        name: vif.name.clone(),
                    },
                );
                out.push(VifEvent::Added {
                    vif: vif.name,
                    domid: vif.domid,
                    devid: vif.devid,
                    ip: vif.ip,
                    ip6: vif.ip6,
                    mac: vif.mac,
                });
            } else {
                // The directory went away meanwhile; its watch event will say so, and
                // nobody was told about this vif.
                let _ = links.set_up(&vif.name, false);
                self.known.remove(&path);
            }
        }
        Ok(())
    }

    /// Logs and reports why the vif at `path` is not brought up, and writes it where the
    /// toolstack looks (`fatal` in `xen-hotplug-common.sh`: `hotplug-error`, then
    /// `hotplug-status` = `error`).
    fn refuse(
        &mut self,
        path: &str,
        reason: String,
        out: &mut Vec<VifEvent>,
    ) -> Result<(), HotplugError> {
        eprintln!("vif hotplug: {path}: {reason}");
        self.write_status(
            path,
            &[
                ("hotplug-error", reason.as_str()),
                ("hotplug-status", "error"),
            ],
        )?;
        self.known.insert(path.to_owned(), Track::Refused);
        out.push(VifEvent::Refused {
            path: path.to_owned(),
            reason,
        });
        Ok(())
    }

    /// Writes `keys` under `path` in one transaction, only if the directory still has its
    /// `online` key (see the module docs); returns whether it did. A refusal from the
    /// store (the directory's permissions) is logged and counts as not written.
    fn write_status(&mut self, path: &str, keys: &[(&str, &str)]) -> Result<bool, HotplugError> {
        let online = format!("{path}/online");
        let r = self.store.transaction(|s, tx| {
            if !s.exists(tx, &online)? {
                return Ok(false);
            }
            for (k, v) in keys {
                s.write(tx, &format!("{path}/{k}"), v.as_bytes())?;
            }
            Ok(true)
        });
        match r {
            Ok(done) => Ok(done),
            Err(e @ StoreError::Io { .. }) => Err(e.into()),
            Err(e) => {
                eprintln!("vif hotplug: {path}: cannot write its hotplug status: {e}");
                Ok(false)
            }
        }
    }

    /// The "offline" step: forgets the vif at `path`; if it was up, sets its interface
    /// down (if it still exists) and reports it removed.
    fn offline(&mut self, path: &str, links: &mut impl VifLinks, out: &mut Vec<VifEvent>) {
        let Some(Track::Up { name }) = self.known.remove(path) else {
            return;
        };
        if links.exists(&name) {
            match links.set_up(&name, false) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
                Err(e) => eprintln!("vif hotplug: {path}: setting {name} down: {e}"),
            }
        }
        out.push(VifEvent::Removed { vif: name });
    }
}

/// The domid and devid of a netback interface name, `vif<domid>.<devid>` with both in
/// canonical decimal (`^vif(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)$`, vif-route-qubes' check),
/// the domid a [`DomId`], and the whole no longer than an interface name can be.
pub fn parse_vif_name(name: &str) -> Option<(DomId, u32)> {
    fn decimal(s: &str) -> bool {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'))
    }
    if name.len() > MAX_IFNAME {
        return None;
    }
    let (d, n) = name.strip_prefix("vif")?.split_once('.')?;
    if !decimal(d) || !decimal(n) {
        return None;
    }
    Some((d.parse().ok()?, n.parse().ok()?))
}

/// Qubes' `ip` key: space-separated addresses, of which the first IPv4 is the client's
/// address and the first IPv6 (if any) its IPv6 address. Anything that is not an address,
/// or no IPv4 at all, is malformed.
pub fn parse_ip(value: &str) -> Result<(Ipv4Addr, Option<Ipv6Addr>), String> {
    let mut v4 = None;
    let mut v6 = None;
    for word in value.split_whitespace() {
        if let Ok(a) = word.parse::<Ipv4Addr>() {
            v4.get_or_insert(a);
        } else if let Ok(a) = word.parse::<Ipv6Addr>() {
            v6.get_or_insert(a);
        } else {
            return Err(format!("{word:?} is not an IP address (in {value:?})"));
        }
    }
    match v4 {
        Some(a) => Ok((a, v6)),
        None => Err(format!("no IPv4 address in {value:?}")),
    }
}

/// A MAC as libxl writes it: six two-digit hex bytes separated by colons.
pub fn parse_mac(value: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = value.split(':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}
