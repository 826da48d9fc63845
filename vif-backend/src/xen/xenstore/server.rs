//! The in-repository XenStore server: the emulation's stand-in for xenstored.
//!
//! It keeps the store of Xen's `docs/misc/xenstore.txt` (xen-project/xen) — a tree of
//! nodes with values and permissions, watches, snapshot transactions — and speaks the
//! `xen/include/public/io/xs_wire.h` wire format on Unix sockets, so the same
//! [`super::client::Client`] talks to it and to Linux's `/dev/xen/xenbus`.
//!
//! **Domain ids come from the socket, not from the peer.** The server listens on one
//! socket per domain, `<dir>/xenstore.<domid>`, made by [`Server::add_domain`]; whoever
//! connects to it acts as that domain. That is the emulation's (and the tests') stand-in
//! for xenstored knowing which ring a message came in on; anyone who can open the socket
//! file is that domain, so this is for tests and the emulated toolstack only, never a
//! security boundary on a real system.
//!
//! Behaviour, as `xenstore.txt` and C xenstored have it:
//! - writing or `mkdir` creates missing parents (inheriting the parent's permissions,
//!   owned by the creating domain unless that is dom0); `rm` removes a subtree, and is an
//!   error only if the parent is missing; the root cannot be removed;
//! - a watch fires once when set (reply first, then the event), then for every change at
//!   or below its path, and for the removal of a node above it (reporting its own path);
//!   an event goes only to the connection that set the watch, and only if its domain may
//!   read the changed node; relative watches report relative paths;
//! - a transaction works on a snapshot of the whole store. At commit, every node it read
//!   or wrote (and the parents whose child lists it changed) must still be as it found
//!   them, else `EAGAIN` and nothing is applied; otherwise its writes are applied at once
//!   and their watches fire then, not before;
//! - permissions: dom0 may do anything, a node's owner (first entry) may do anything,
//!   other domains get their own entry or else the first entry's letter; only the owner
//!   (or dom0) changes permissions and only dom0 changes the owner (`EPERM`). A missing
//!   node under one the caller may not read is `EACCES`, not `ENOENT`, so existence does
//!   not leak;
//! - `XS_GET_DOMAIN_PATH` answers `/local/domain/<id>`, `XS_IS_DOMAIN_INTRODUCED` says
//!   whether the domain has a socket, `XS_RESET_WATCHES` drops the caller's watches and
//!   transactions; the domain-management and control messages (`XS_INTRODUCE`,
//!   `XS_RELEASE`, `XS_CONTROL`, ...) and the optional `XS_DIRECTORY_PART` and feature and
//!   quota messages are `ENOSYS`, as `xenstore.txt` allows.
//!
//! Memory is bounded by [`Limits`]: payloads by `XENSTORE_PAYLOAD_MAX` (a longer header
//! closes the connection, as xenstored does), watches per connection (`E2BIG`, Xen's
//! default 128), transactions per connection and nodes per transaction (`ENOSPC`), nodes
//! owned per domain other than dom0 (`ENOSPC`; `xs_wire.h` has no `EQUOTA`), and messages
//! queued for a connection that does not read them (the connection is closed). The
//! number of connections is not limited: only the emulation's own processes connect.
//!
//! A connection that breaks the framing (a header announcing more than the maximum
//! payload) is closed with a logged reason; a well-framed request with a bad payload
//! (no NUL, a path that is not UTF-8 or not valid) gets `EINVAL`, as from xenstored.
//! Neither touches other connections.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::fs;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::tree::{self, allowed, domain_path, is_child, resolve, Change, Tree};
use crate::sys::poll_readable;
use crate::xen::xs_wire::{
    nul_strings, single_string, split_first, split_strings, Decoder, Errno, Message, MsgType, Perm,
    WatchEvent, XENSTORE_PAYLOAD_MAX,
};
use crate::xen::DomId;

/// The server's bounds (see the module docs). [`Limits::default`] has Xen's defaults where
/// Xen has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Watches one connection may hold (`E2BIG` beyond; C xenstored's default is 128).
    pub watches_per_connection: usize,
    /// Transactions open at once on one connection (`ENOSPC` beyond; xenstored: 10).
    pub transactions_per_connection: usize,
    /// Nodes one transaction may touch: read, write or remove (`ENOSPC` beyond;
    /// xenstored: 1024).
    pub nodes_per_transaction: usize,
    /// Nodes a domain other than dom0 may own (`ENOSPC` beyond; xenstored: 1000).
    pub nodes_per_domain: usize,
    /// Replies and events queued for one connection; a connection this far behind is not
    /// reading and is closed rather than buffered without end.
    pub queued_messages: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            watches_per_connection: 128,
            transactions_per_connection: 10,
            nodes_per_transaction: 1024,
            nodes_per_domain: 1000,
            queued_messages: 1024,
        }
    }
}

/// A connection's number, unique for the server's life.
type ConnId = u64;

/// Messages to send, each to its connection, in order.
type Outbox = Vec<(ConnId, Message)>;

#[derive(Debug)]
struct Watch {
    /// Canonical absolute path, or an `@` special path.
    path: String,
    token: String,
    /// Set with a relative path: events report paths relative to the domain's base.
    relative: bool,
}

#[derive(Debug)]
struct Conn {
    domid: DomId,
    watches: Vec<Watch>,
}

/// A change to the store, kept by a transaction for its commit.
#[derive(Clone, Debug)]
enum Op {
    Write(String, Vec<u8>),
    Mkdir(String),
    Rm(String),
    SetPerms(String, Vec<Perm>),
}

impl Op {
    fn path(&self) -> &str {
        match self {
            Op::Write(p, _) | Op::Mkdir(p) | Op::Rm(p) | Op::SetPerms(p, _) => p,
        }
    }
}

#[derive(Debug)]
struct Transaction {
    conn: ConnId,
    domid: DomId,
    snapshot: Tree,
    /// Every node the transaction depended on, with its generation when first used.
    accessed: HashMap<String, Option<u64>>,
    ops: Vec<Op>,
}

/// The store and its connections' state, without any I/O: requests in, messages out.
#[derive(Debug)]
struct Core {
    tree: Tree,
    conns: HashMap<ConnId, Conn>,
    txs: HashMap<u32, Transaction>,
    next_tx: u32,
    introduced: BTreeSet<DomId>,
    limits: Limits,
}

const OK: &[u8] = b"OK\0";

fn einval<E>(_: E) -> Errno {
    Errno::EINVAL
}

impl Core {
    fn new(limits: Limits) -> Core {
        Core {
            tree: Tree::new(),
            conns: HashMap::new(),
            txs: HashMap::new(),
            next_tx: 1,
            introduced: BTreeSet::new(),
            limits,
        }
    }

    fn connect(&mut self, id: ConnId, domid: DomId) {
        self.conns.insert(
            id,
            Conn {
                domid,
                watches: Vec::new(),
            },
        );
    }

    fn disconnect(&mut self, id: ConnId) {
        self.conns.remove(&id);
        self.txs.retain(|_, t| t.conn != id);
    }

    /// A domain got its socket: `@introduceDomain` fires for dom0's watchers (the only
    /// ones privileged to hear it without a permission grant).
    fn introduce(&mut self, domid: DomId, out: &mut Outbox) {
        self.introduced.insert(domid);
        for (id, c) in &self.conns {
            for w in c
                .watches
                .iter()
                .filter(|w| c.domid == 0 && w.path == "@introduceDomain")
            {
                out.push((*id, event(&w.path, &w.token)));
            }
        }
    }

    /// Answers one request: the reply, then any watch events it caused, go to `out`.
    fn handle(&mut self, conn: ConnId, msg: &Message, out: &mut Outbox) {
        let Some(domid) = self.conns.get(&conn).map(|c| c.domid) else {
            return;
        };
        let mut events = Vec::new();
        let reply = match self.dispatch(conn, domid, msg, &mut events) {
            Ok(payload) if payload.len() <= XENSTORE_PAYLOAD_MAX => Message {
                msg_type: msg.msg_type,
                req_id: msg.req_id,
                tx_id: msg.tx_id,
                payload,
            },
            // A directory too long for one message (DIRECTORY_PART is not offered).
            Ok(_) => error_reply(msg, Errno::E2BIG),
            Err(errno) => error_reply(msg, errno),
        };
        out.push((conn, reply));
        out.extend(events);
    }

    fn dispatch(
        &mut self,
        conn: ConnId,
        domid: DomId,
        msg: &Message,
        events: &mut Outbox,
    ) -> Result<Vec<u8>, Errno> {
        let kind = msg.kind().ok_or(Errno::ENOSYS)?;
        let tx = msg.tx_id;
        let p = &msg.payload[..];
        match kind {
            MsgType::Read => {
                let path = resolve(single_string(p).map_err(einval)?, domid, false)?;
                let t = self.view(conn, tx, &path, false)?;
                Ok(readable(t, &path, domid)?.value.clone())
            }
            MsgType::Directory => {
                let path = resolve(single_string(p).map_err(einval)?, domid, false)?;
                let t = self.view(conn, tx, &path, false)?;
                let node = readable(t, &path, domid)?;
                Ok(nul_strings(&node.children.keys().collect::<Vec<_>>()))
            }
            MsgType::GetPerms => {
                let path = resolve(single_string(p).map_err(einval)?, domid, false)?;
                let t = self.view(conn, tx, &path, false)?;
                Ok(Perm::list_payload(&readable(t, &path, domid)?.perms))
            }
            MsgType::Write => {
                let (path, value) = split_first(p).map_err(einval)?;
                let path = resolve(path, domid, false)?;
                self.mutate(conn, domid, tx, Op::Write(path, value.to_vec()), events)?;
                Ok(OK.to_vec())
            }
            MsgType::Mkdir => {
                let path = resolve(single_string(p).map_err(einval)?, domid, false)?;
                self.mutate(conn, domid, tx, Op::Mkdir(path), events)?;
                Ok(OK.to_vec())
            }
            MsgType::Rm => {
                let path = resolve(single_string(p).map_err(einval)?, domid, false)?;
                self.mutate(conn, domid, tx, Op::Rm(path), events)?;
                Ok(OK.to_vec())
            }
            MsgType::SetPerms => {
                let (path, rest) = split_first(p).map_err(einval)?;
                let path = resolve(path, domid, false)?;
                let perms = Perm::parse_list(rest).map_err(einval)?;
                self.mutate(conn, domid, tx, Op::SetPerms(path, perms), events)?;
                Ok(OK.to_vec())
            }
            MsgType::Watch => self.watch(conn, domid, p, events),
            MsgType::Unwatch => {
                let v = split_strings(p).map_err(einval)?;
                let [given, token, ..] = v.as_slice() else {
                    return Err(Errno::EINVAL);
                };
                let path = resolve(given, domid, true)?;
                let c = self.conns.get_mut(&conn).ok_or(Errno::EINVAL)?;
                let before = c.watches.len();
                c.watches.retain(|w| !(w.path == path && w.token == *token));
                if c.watches.len() == before {
                    return Err(Errno::ENOENT);
                }
                Ok(OK.to_vec())
            }
            MsgType::ResetWatches => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.watches.clear();
                }
                self.txs.retain(|_, t| t.conn != conn);
                Ok(OK.to_vec())
            }
            MsgType::TransactionStart => {
                // Not inside another transaction (C xenstored: EBUSY).
                if tx != 0 {
                    return Err(Errno::EBUSY);
                }
                let open = self.txs.values().filter(|t| t.conn == conn).count();
                if open >= self.limits.transactions_per_connection {
                    return Err(Errno::ENOSPC);
                }
                let id = self.fresh_tx_id();
                self.txs.insert(
                    id,
                    Transaction {
                        conn,
                        domid,
                        snapshot: self.tree.clone(),
                        accessed: HashMap::new(),
                        ops: Vec::new(),
                    },
                );
                Ok(nul_strings(&[id.to_string()]))
            }
            MsgType::TransactionEnd => {
                let commit = match single_string(p).map_err(einval)? {
                    "T" => true,
                    "F" => false,
                    _ => return Err(Errno::EINVAL),
                };
                if self.txs.get(&tx).map(|t| t.conn) != Some(conn) {
                    return Err(Errno::ENOENT);
                }
                let t = self.txs.remove(&tx).ok_or(Errno::ENOENT)?;
                if commit {
                    self.commit(t, events)?;
                }
                Ok(OK.to_vec())
            }
            MsgType::GetDomainPath => {
                let id: DomId = single_string(p).map_err(einval)?.parse().map_err(einval)?;
                Ok(nul_strings(&[domain_path(id)]))
            }
            MsgType::IsDomainIntroduced => {
                let id: DomId = single_string(p).map_err(einval)?.parse().map_err(einval)?;
                Ok(if self.introduced.contains(&id) {
                    b"T\0"
                } else {
                    b"F\0"
                }
                .to_vec())
            }
            // Only the server sends these.
            MsgType::WatchEvent | MsgType::Error => Err(Errno::EINVAL),
            MsgType::Control
            | MsgType::Introduce
            | MsgType::Release
            | MsgType::Resume
            | MsgType::SetTarget
            | MsgType::DirectoryPart
            | MsgType::GetFeature
            | MsgType::SetFeature
            | MsgType::GetQuota
            | MsgType::SetQuota
            | MsgType::Invalid => Err(Errno::ENOSYS),
        }
    }

    fn fresh_tx_id(&mut self) -> u32 {
        loop {
            let id = self.next_tx;
            self.next_tx = self.next_tx.wrapping_add(1);
            if id != 0 && !self.txs.contains_key(&id) {
                return id;
            }
        }
    }

    /// The tree a request with `tx` sees: the live one, or the transaction's snapshot
    /// after recording what the request depends on. Someone else's transaction id is as
    /// unknown as a closed one (`ENOENT`).
    fn view(&mut self, conn: ConnId, tx: u32, path: &str, removal: bool) -> Result<&Tree, Errno> {
        if tx == 0 {
            return Ok(&self.tree);
        }
        let limit = self.limits.nodes_per_transaction;
        let t = self
            .txs
            .get_mut(&tx)
            .filter(|t| t.conn == conn)
            .ok_or(Errno::ENOENT)?;
        record(t, path, removal, limit)?;
        Ok(&t.snapshot)
    }

    fn mutate(
        &mut self,
        conn: ConnId,
        domid: DomId,
        tx: u32,
        op: Op,
        events: &mut Outbox,
    ) -> Result<(), Errno> {
        let limits = self.limits;
        if tx == 0 {
            check(&self.tree, &op, domid, &limits)?;
            let changes = apply(&mut self.tree, &op, domid);
            self.fire(&changes, events);
            return Ok(());
        }
        let t = self
            .txs
            .get_mut(&tx)
            .filter(|t| t.conn == conn)
            .ok_or(Errno::ENOENT)?;
        if t.ops.len() >= limits.nodes_per_transaction {
            return Err(Errno::ENOSPC);
        }
        record(
            t,
            op.path(),
            matches!(op, Op::Rm(_)),
            limits.nodes_per_transaction,
        )?;
        check(&t.snapshot, &op, domid, &limits)?;
        apply(&mut t.snapshot, &op, domid);
        t.ops.push(op);
        Ok(())
    }

    /// Applies a transaction if nothing it depended on changed since it used it. The
    /// checks were made against the snapshot, on exactly the nodes compared here, so the
    /// replay on the live tree does what it did there.
    fn commit(&mut self, t: Transaction, events: &mut Outbox) -> Result<(), Errno> {
        let conflict = t
            .accessed
            .iter()
            .any(|(path, gen)| self.tree.gen_of(path) != *gen);
        if conflict {
            return Err(Errno::EAGAIN);
        }
        let mut changes = Vec::new();
        for op in &t.ops {
            changes.extend(apply(&mut self.tree, op, t.domid));
        }
        self.fire(&changes, events);
        Ok(())
    }

    fn watch(
        &mut self,
        conn: ConnId,
        domid: DomId,
        p: &[u8],
        events: &mut Outbox,
    ) -> Result<Vec<u8>, Errno> {
        // `<wpath>|<token>|`, optionally followed by a depth, which is not offered
        // (XENSTORE_SERVER_FEATURE_WATCHDEPTH) and so ignored.
        let v = split_strings(p).map_err(einval)?;
        let [given, token, ..] = v.as_slice() else {
            return Err(Errno::EINVAL);
        };
        let path = resolve(given, domid, true)?;
        let limit = self.limits.watches_per_connection;
        let c = self.conns.get_mut(&conn).ok_or(Errno::EINVAL)?;
        if c.watches
            .iter()
            .any(|w| w.path == path && w.token == *token)
        {
            return Err(Errno::EEXIST);
        }
        if c.watches.len() >= limit {
            return Err(Errno::E2BIG);
        }
        c.watches.push(Watch {
            path,
            token: (*token).to_owned(),
            relative: !given.starts_with('/') && !given.starts_with('@'),
        });
        // The first firing, with the path as given (xenstored does the same, after its
        // reply: `handle` puts the reply first).
        events.push((conn, event(given, token)));
        Ok(OK.to_vec())
    }

    /// Queues the watch events for `changes`.
    fn fire(&self, changes: &[Change], out: &mut Outbox) {
        for (id, c) in &self.conns {
            for w in &c.watches {
                for ch in changes {
                    let epath = if is_child(&ch.path, &w.path) {
                        &ch.path
                    } else if ch.removed && is_child(&w.path, &ch.path) {
                        // A removal above the watch reports the watched path itself.
                        &w.path
                    } else {
                        continue;
                    };
                    if !allowed(&ch.perms, c.domid, false) {
                        continue;
                    }
                    let shown = if w.relative {
                        let base = format!("{}/", domain_path(c.domid));
                        epath.strip_prefix(&base).unwrap_or(epath)
                    } else {
                        epath
                    };
                    out.push((*id, event(shown, &w.token)));
                }
            }
        }
    }
}

fn event(path: &str, token: &str) -> Message {
    let ev = WatchEvent {
        path: path.to_owned(),
        token: token.to_owned(),
    };
    Message::new(MsgType::WatchEvent, 0, 0, ev.to_payload())
}

fn error_reply(req: &Message, errno: Errno) -> Message {
    Message::new(
        MsgType::Error,
        req.req_id,
        req.tx_id,
        nul_strings(&[errno.as_str()]),
    )
}

/// Notes what an operation on `path` depends on, the first time the transaction uses it.
fn record(t: &mut Transaction, path: &str, removal: bool, limit: usize) -> Result<(), Errno> {
    for (p, gen) in t.snapshot.footprint(path, removal) {
        if !t.accessed.contains_key(&p) {
            if t.accessed.len() >= limit {
                return Err(Errno::ENOSPC);
            }
            t.accessed.insert(p, gen);
        }
    }
    Ok(())
}

/// The error for a missing `path`: `ENOENT`, unless `domid` may not read the deepest
/// node that does exist above it, whose children would then give away what it holds.
fn missing(t: &Tree, path: &str, domid: DomId) -> Errno {
    let (_, above) = t.deepest(path);
    if allowed(&above.perms, domid, false) {
        Errno::ENOENT
    } else {
        Errno::EACCES
    }
}

fn readable<'t>(t: &'t Tree, path: &str, domid: DomId) -> Result<&'t tree::Node, Errno> {
    match t.get(path) {
        Some(n) if allowed(&n.perms, domid, false) => Ok(n),
        Some(_) => Err(Errno::EACCES),
        None => Err(missing(t, path, domid)),
    }
}

/// Whether `domid` may do `op` on `t`, and whether its quota allows the nodes it adds.
fn check(t: &Tree, op: &Op, domid: DomId, limits: &Limits) -> Result<(), Errno> {
    match op {
        Op::Write(path, _) | Op::Mkdir(path) => {
            if let Some(n) = t.get(path) {
                return if allowed(&n.perms, domid, true) {
                    Ok(())
                } else {
                    Err(Errno::EACCES)
                };
            }
            let (_, above) = t.deepest(path);
            if !allowed(&above.perms, domid, true) {
                return Err(Errno::EACCES);
            }
            if domid != 0 && t.count_owned(domid) + t.missing(path) > limits.nodes_per_domain {
                return Err(Errno::ENOSPC);
            }
            Ok(())
        }
        Op::Rm(path) => {
            if path == "/" {
                return Err(Errno::EINVAL);
            }
            match t.get(path) {
                Some(n) if allowed(&n.perms, domid, true) => Ok(()),
                Some(_) => Err(Errno::EACCES),
                // Removing what is not there is fine, if the parent is.
                None => match t.get(tree::parent(path)) {
                    Some(_) => Ok(()),
                    None => Err(missing(t, path, domid)),
                },
            }
        }
        Op::SetPerms(path, perms) => {
            let n = t.get(path).ok_or_else(|| missing(t, path, domid))?;
            if domid == 0 {
                return Ok(());
            }
            if n.perms.first().map(|p| p.domid) != Some(domid) {
                return Err(Errno::EACCES);
            }
            if perms.first().map(|p| p.domid) != Some(domid) {
                return Err(Errno::EPERM);
            }
            Ok(())
        }
    }
}

/// Performs a checked `op` on `t`, returning what changed for the watches.
fn apply(t: &mut Tree, op: &Op, domid: DomId) -> Vec<Change> {
    match op {
        Op::Write(path, value) => t.write(path, value, domid),
        Op::Mkdir(path) => t.mkdir(path, domid),
        Op::Rm(path) => {
            if t.get(path).is_some() {
                t.remove(path)
            } else {
                Vec::new()
            }
        }
        Op::SetPerms(path, perms) => t.set_perms(path, perms),
    }
}

/// What the server's threads share.
#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    state: Mutex<State>,
    stopping: AtomicBool,
    next_conn: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Polled by every accept loop next to its listener; readable (at end of file) once
    /// [`Shared::wake_tx`] is dropped, which is how [`Server`]'s drop stops them. Waking
    /// them by connecting to their sockets would fail once the socket files are gone.
    wake_rx: UnixStream,
    wake_tx: Mutex<Option<UnixStream>>,
}

#[derive(Debug)]
struct State {
    core: Core,
    links: HashMap<ConnId, Link>,
    listeners: HashMap<DomId, PathBuf>,
}

/// Where a connection's messages go: its writer thread's queue, and the socket, to shut
/// it down when the connection must end.
#[derive(Debug)]
struct Link {
    queue: SyncSender<Message>,
    socket: UnixStream,
}

impl Shared {
    /// The state, even if a thread panicked holding it: the store is updated by whole
    /// operations, so what a panic left is still a consistent store.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn spawn(&self, name: String, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let h = thread::Builder::new().name(name).spawn(f)?;
        let mut threads = self
            .threads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Finished connections' threads are reaped here, so the list stays as long as
        // the set of live ones.
        let (done, live): (Vec<_>, Vec<_>) = threads.drain(..).partition(|h| h.is_finished());
        *threads = live;
        threads.push(h);
        drop(threads);
        for h in done {
            let _ = h.join();
        }
        Ok(())
    }
}

impl State {
    /// Hands out `out`. A connection whose queue is full is not reading: it is shut down
    /// (its reader then cleans up) rather than buffered for without end.
    fn deliver(&mut self, out: Outbox) {
        for (id, msg) in out {
            let Some(link) = self.links.get(&id) else {
                continue;
            };
            match link.queue.try_send(msg) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                Err(TrySendError::Full(_)) => {
                    let domid = self.core.conns.get(&id).map(|c| c.domid);
                    eprintln!(
                        "xenstore: connection {id} (dom{}) closed: not reading its replies and events",
                        domid.unwrap_or(0)
                    );
                    let _ = link.socket.shutdown(Shutdown::Both);
                }
            }
        }
    }
}

/// A running server; stopped (threads joined, sockets removed) when dropped.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    /// Starts a server keeping its sockets in `dir` (created if missing), with
    /// [`Limits::default`]. It has no sockets until [`Server::add_domain`].
    pub fn start(dir: impl AsRef<Path>) -> io::Result<Server> {
        Server::start_with_limits(dir, Limits::default())
    }

    /// [`Server::start`] with other bounds.
    pub fn start_with_limits(dir: impl AsRef<Path>, limits: Limits) -> io::Result<Server> {
        fs::create_dir_all(dir.as_ref())?;
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        Ok(Server {
            shared: Arc::new(Shared {
                dir: dir.as_ref().to_path_buf(),
                state: Mutex::new(State {
                    core: Core::new(limits),
                    links: HashMap::new(),
                    listeners: HashMap::new(),
                }),
                stopping: AtomicBool::new(false),
                next_conn: AtomicU64::new(1),
                threads: Mutex::new(Vec::new()),
                wake_rx,
                wake_tx: Mutex::new(Some(wake_tx)),
            }),
        })
    }

    /// Whether a thread panicked while holding the store (the tests' check that no input
    /// makes the server panic: requests are handled under that lock).
    #[cfg(test)]
    pub(super) fn panicked(&self) -> bool {
        self.shared.state.is_poisoned()
    }

    /// The socket of `domid`: `<dir>/xenstore.<domid>`.
    pub fn socket_path(&self, domid: DomId) -> PathBuf {
        self.shared.dir.join(format!("xenstore.{domid}"))
    }

    /// Opens the socket through which connections act as `domid` (see the module docs:
    /// the socket is the identity) and returns its path; a second call for the same
    /// domain returns the same path. `@introduceDomain` fires.
    pub fn add_domain(&self, domid: DomId) -> io::Result<PathBuf> {
        let path = self.socket_path(domid);
        let mut st = self.shared.lock();
        if st.listeners.contains_key(&domid) {
            return Ok(path);
        }
        // A socket file left by an earlier run would make bind fail.
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(&path)?;
        // Accepted only when poll says a connection is there; non-blocking so that one
        // that went away in between does not stall the loop.
        listener.set_nonblocking(true)?;
        let shared = Arc::clone(&self.shared);
        self.shared
            .spawn(format!("xenstore-accept-{domid}"), move || {
                accept_loop(&shared, domid, &listener)
            })?;
        st.listeners.insert(domid, path.clone());
        let mut out = Vec::new();
        st.core.introduce(domid, &mut out);
        st.deliver(out);
        Ok(path)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Set before the sweep below: a connection that registers after the sweep sees
        // it and shuts itself (`serve_connection`), so no reader is left blocked.
        self.shared.stopping.store(true, Ordering::SeqCst);
        let listeners: Vec<PathBuf> = {
            let st = self.shared.lock();
            for link in st.links.values() {
                let _ = link.socket.shutdown(Shutdown::Both);
            }
            st.listeners.values().cloned().collect()
        };
        // Wakes each accept loop, which then sees `stopping`.
        drop(
            self.shared
                .wake_tx
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
        // Until none is left: an accept loop may spawn one more connection thread
        // while this drains.
        loop {
            let threads: Vec<JoinHandle<()>> = self
                .shared
                .threads
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .drain(..)
                .collect();
            if threads.is_empty() {
                break;
            }
            for h in threads {
                let _ = h.join();
            }
        }
        for path in &listeners {
            let _ = fs::remove_file(path);
        }
    }
}

/// Runs a server in `dir` with a socket for each of `domids` until the process ends.
pub fn serve_forever(dir: impl AsRef<Path>, domids: &[DomId]) -> io::Result<Infallible> {
    let server = Server::start(dir)?;
    for &d in domids {
        server.add_domain(d)?;
    }
    loop {
        thread::park();
    }
}

fn accept_loop(shared: &Arc<Shared>, domid: DomId, listener: &UnixListener) {
    let fds = [listener.as_raw_fd(), shared.wake_rx.as_raw_fd()];
    let mut ready = Vec::with_capacity(fds.len());
    loop {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        if let Err(e) = poll_readable(&fds, -1, &mut ready) {
            eprintln!("xenstore: poll on the dom{domid} socket failed: {e}");
            thread::sleep(Duration::from_millis(50));
            continue;
        }
        if shared.stopping.load(Ordering::SeqCst) || ready.get(1).copied().unwrap_or(false) {
            return;
        }
        if !ready.first().copied().unwrap_or(false) {
            continue;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("xenstore: accept on the dom{domid} socket failed: {e}");
                // Out of descriptors, most likely: give the others a moment to close.
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if let Err(e) = stream.set_nonblocking(false) {
            eprintln!("xenstore: dom{domid} connection dropped: {e}");
            continue;
        }
        let id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
        let sh = Arc::clone(shared);
        if let Err(e) = shared.spawn(format!("xenstore-conn-{id}"), move || {
            serve_connection(&sh, id, domid, stream)
        }) {
            eprintln!("xenstore: no thread for a dom{domid} connection: {e}");
        }
    }
}

/// How long a write to a peer may block before the peer counts as gone: one that takes
/// none of its replies and events for this long is not coming back for them.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection: this thread reads and answers requests; a second one writes what is
/// queued for it, so that a slow reader never blocks the store (see [`State::deliver`]).
fn serve_connection(shared: &Arc<Shared>, id: ConnId, domid: DomId, stream: UnixStream) {
    let writer = stream
        .try_clone()
        .and_then(|w| w.set_write_timeout(Some(WRITE_TIMEOUT)).map(|()| w));
    let (Ok(writer), Ok(socket)) = (writer, stream.try_clone()) else {
        eprintln!("xenstore: connection {id} (dom{domid}) dropped: cannot clone its socket");
        return;
    };
    let (queue, rx) = {
        let st = shared.lock();
        mpsc::sync_channel(st.core.limits.queued_messages)
    };
    let writer_thread = match thread::Builder::new()
        .name(format!("xenstore-write-{id}"))
        .spawn(move || write_loop(writer, rx))
    {
        Ok(h) => h,
        Err(e) => {
            eprintln!("xenstore: connection {id} (dom{domid}) dropped: no writer thread: {e}");
            return;
        }
    };
    {
        let mut st = shared.lock();
        if shared.stopping.load(Ordering::SeqCst) {
            // The server's shutdown sweep may already have run: end here.
            let _ = socket.shutdown(Shutdown::Both);
        }
        st.core.connect(id, domid);
        st.links.insert(id, Link { queue, socket });
    }
    let reason = read_loop(shared, id, stream);
    if let Some(reason) = &reason {
        eprintln!("xenstore: connection {id} (dom{domid}) closed: {reason}");
    }
    {
        let mut st = shared.lock();
        st.core.disconnect(id);
        if let Some(link) = st.links.remove(&id) {
            // A peer that broke the protocol is cut off at once, as xenstored does. One
            // that closed its side still gets the replies already queued for it (a client
            // may half-close after its last request).
            if reason.is_some() {
                let _ = link.socket.shutdown(Shutdown::Both);
            }
        }
    }
    // The queue's sender went with the link, so the writer ends once it has sent what
    // was queued (or at once, the socket being shut; or after WRITE_TIMEOUT for a peer
    // that takes nothing).
    let _ = writer_thread.join();
}

/// Reads requests until the peer closes (`None`) or breaks the protocol (the reason).
fn read_loop(shared: &Shared, id: ConnId, mut stream: UnixStream) -> Option<String> {
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Some(format!("read failed: {e}")),
        };
        decoder.feed(&buf[..n]);
        loop {
            match decoder.next_message() {
                Ok(Some(msg)) => {
                    let mut st = shared.lock();
                    let mut out = Vec::new();
                    st.core.handle(id, &msg, &mut out);
                    st.deliver(out);
                }
                Ok(None) => break,
                Err(e) => return Some(format!("malformed message: {e}")),
            }
        }
    }
}

fn write_loop(mut stream: UnixStream, rx: Receiver<Message>) {
    let mut bytes = Vec::new();
    for msg in rx {
        bytes.clear();
        // Every message the core makes is within the limit (replies are checked).
        if msg.encode_into(&mut bytes).is_err() {
            continue;
        }
        if stream.write_all(&bytes).is_err() {
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    }
}
