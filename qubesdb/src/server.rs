//! A QubesDB daemon on a UNIX stream socket (the local interface of upstream `qubesdb-daemon`,
//! qubes-core-qubesdb `include/qubesdb.h`, `daemon/db-cmds.c`). The vchan itself is not here (see [`LinkPort`]).
//!
//! Threads: one accepts connections; each connection has a reader (decodes commands and runs
//! them on the shared [`Tree`]) and a writer (drains that connection's outgoing queue).
//! A command's answer and the watch notifications it causes are queued while the tree lock is
//! held, so every connection sees modifications in the order they happened, and an answer is
//! never split by a notification (clients must still cope with that: upstream allows it).
//!
//! Robustness:
//!
//! - a message that does not decode (bad type, path, `data_len`) or is not a command gets
//!   `RESP_ERROR` (with its path when the path field is valid, else the empty path), and that
//!   connection is closed after the answer is flushed; other connections are not affected;
//! - a well-formed command that is refused (e.g. READ of `/a/`) gets `RESP_ERROR` and the
//!   connection stays open (see [`crate::tree`]);
//! - a client that does not read its notifications fills its queue ([`QUEUE_LEN`] items);
//!   it is then disconnected rather than allowed to stall the daemon. A write blocked for
//!   [`WRITE_TIMEOUT`] also disconnects it;
//! - nothing here panics on input; a poisoned lock is recovered (the tree is always
//!   consistent between statements).
//!
//! A daemon may also hold one link to a peer daemon (a qube's to dom0's, over vchan):
//! [`ServerHandle::attach_link`]. Writes and removals its local clients make are then sent
//! to the peer, in the order the tree saw them, and what the peer sends is applied to the
//! tree and fires local watches like a client's change (see [`crate::link`]).

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::link::{Link, LinkError, Received};
use crate::tree::{ConnId, Tree};
use crate::wire::{salvage_path, Decoder, Message, MsgType};

/// Outgoing items (a whole answer, or one notification) queued per connection before the
/// daemon gives up on a client that does not read.
pub const QUEUE_LEN: usize = 1024;
/// How long one socket write may block before the client is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// A daemon failure: what was being done, on which socket, and the OS error.
#[derive(Debug)]
pub struct ServerError {
    pub what: String,
    pub source: io::Error,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.source)
    }
}

impl std::error::Error for ServerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

fn server_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ServerError {
    let what = what.into();
    move |source| ServerError { what, source }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Conn {
    queue: SyncSender<Vec<u8>>,
    /// A handle on the socket, to shut it down from another thread.
    stream: UnixStream,
}

/// The link to a peer daemon: its protocol state, and the writing end of the socket pair
/// that tells the link's driver there is output.
struct LinkSlot {
    link: Link,
    wake: UnixStream,
}

struct Shared {
    tree: Mutex<Tree>,
    conns: Mutex<HashMap<ConnId, Conn>>,
    /// Locked after `tree` when both are needed, never before.
    link: Mutex<Option<LinkSlot>>,
    next_id: AtomicU64,
    stopping: AtomicBool,
    verbose: AtomicBool,
}

impl Shared {
    /// Sends a local client's successful write or removal to the peer daemon, if linked.
    /// Called with the tree locked, so the peer gets changes in the tree's order.
    fn forward(&self, message: &Message) {
        let mut slot = lock(&self.link);
        let Some(slot) = slot.as_mut() else {
            return;
        };
        match message.msg_type {
            MsgType::CmdWrite => slot.link.forward_write(&message.path, &message.data),
            MsgType::CmdRm => slot.link.forward_remove(&message.path),
            _ => return,
        }
        if slot.link.has_output() {
            // One byte is enough to wake the driver; a full socket already wakes it.
            let _ = (&slot.wake).write(&[1]);
        }
    }

    fn log(&self, msg: fmt::Arguments<'_>) {
        if self.verbose.load(Ordering::Relaxed) {
            eprintln!("qubesdb-daemon: {msg}");
        }
    }

    /// Queues `bytes` for `conn`; a client whose queue is full or whose writer is gone is
    /// shut down (its reader then cleans up).
    fn deliver(&self, conns: &HashMap<ConnId, Conn>, conn: ConnId, bytes: Vec<u8>) {
        let Some(c) = conns.get(&conn) else {
            return;
        };
        match c.queue.try_send(bytes) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.log(format_args!(
                    "client {conn}: {QUEUE_LEN} messages queued and not read; disconnecting"
                ));
                let _ = c.stream.shutdown(Shutdown::Both);
            }
            Err(TrySendError::Disconnected(_)) => {
                let _ = c.stream.shutdown(Shutdown::Both);
            }
        }
    }
}

fn encode_all(messages: &[Message], shared: &Shared) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        if let Err(e) = m.encode_into(&mut out) {
            // The tree only produces validated paths and values; log rather than panic.
            shared.log(format_args!(
                "cannot encode {} {:?}: {e}",
                m.msg_type, m.path
            ));
        }
    }
    out
}

/// A bound, not yet serving, daemon.
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    socket_path: PathBuf,
    shared: Arc<Shared>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("stopping", &self.stopping.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Listens on `path`. A stale socket file left by a dead daemon is replaced; a live one
    /// (something accepts connections) or a file that is not a socket is an error.
    pub fn bind(path: impl AsRef<Path>) -> Result<Server, ServerError> {
        let path = path.as_ref();
        let shown = path.display();
        let listener = match UnixListener::bind(path) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                let meta = std::fs::symlink_metadata(path)
                    .map_err(server_err(format!("cannot inspect existing {shown}")))?;
                if !meta.file_type().is_socket() {
                    return Err(ServerError {
                        what: format!("cannot listen on {shown}"),
                        source: io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            "the path exists and is not a socket",
                        ),
                    });
                }
                if UnixStream::connect(path).is_ok() {
                    return Err(ServerError {
                        what: format!("cannot listen on {shown}"),
                        source: io::Error::new(
                            io::ErrorKind::AddrInUse,
                            "another daemon is accepting connections there",
                        ),
                    });
                }
                std::fs::remove_file(path)
                    .map_err(server_err(format!("cannot remove stale socket {shown}")))?;
                UnixListener::bind(path).map_err(server_err(format!("cannot listen on {shown}")))?
            }
            Err(e) => {
                return Err(ServerError {
                    what: format!("cannot listen on {shown}"),
                    source: e,
                })
            }
        };
        Ok(Server {
            listener,
            socket_path: path.to_path_buf(),
            shared: Arc::new(Shared {
                tree: Mutex::new(Tree::new()),
                conns: Mutex::new(HashMap::new()),
                link: Mutex::new(None),
                next_id: AtomicU64::new(1),
                stopping: AtomicBool::new(false),
                verbose: AtomicBool::new(false),
            }),
        })
    }

    /// Starts from `tree` instead of an empty database.
    pub fn with_tree(self, tree: Tree) -> Server {
        *lock(&self.shared.tree) = tree;
        self
    }

    /// Logs refused commands and dropped clients to stderr.
    pub fn verbose(self, on: bool) -> Server {
        self.shared.verbose.store(on, Ordering::Relaxed);
        self
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Serves on the calling thread until the process ends.
    pub fn serve(self) -> Result<(), ServerError> {
        accept_loop(&self.listener, &self.shared);
        Ok(())
    }

    /// Serves on a background thread; the handle stops it.
    pub fn spawn(self) -> Result<ServerHandle, ServerError> {
        let identity = std::fs::metadata(&self.socket_path)
            .map(|m| (m.dev(), m.ino()))
            .ok();
        let shared = Arc::clone(&self.shared);
        let listener = self.listener;
        let thread_shared = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name("qubesdb-accept".to_string())
            .spawn(move || accept_loop(&listener, &thread_shared))
            .map_err(server_err("cannot start the accept thread"))?;
        Ok(ServerHandle {
            socket_path: self.socket_path,
            identity,
            shared,
            thread: Some(thread),
        })
    }
}

/// A daemon serving in the background.
#[derive(Debug)]
pub struct ServerHandle {
    socket_path: PathBuf,
    /// (device, inode) of the socket file we created, so we only remove our own.
    identity: Option<(u64, u64)>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// A copy of the current database (with its watch registrations).
    pub fn snapshot(&self) -> Tree {
        lock(&self.shared.tree).clone()
    }

    /// Number of connected clients.
    pub fn client_count(&self) -> usize {
        lock(&self.shared.conns).len()
    }

    /// A handle for writes this qube makes itself, which stay local (see [`LocalWriter`]).
    pub fn local_writer(&self) -> LocalWriter {
        LocalWriter {
            shared: Arc::clone(&self.shared),
        }
    }

    /// [`LocalWriter::write_local`] on this daemon.
    pub fn write_local(&self, path: &str, value: &[u8]) -> Result<(), crate::RequestError> {
        self.local_writer().write_local(path, value)
    }

    /// [`LocalWriter::remove_local`] on this daemon.
    pub fn remove_local(&self, path: &str) -> Result<bool, crate::RequestError> {
        self.local_writer().remove_local(path)
    }

    /// Attaches the link to a peer daemon; its driver moves bytes between the returned
    /// [`LinkPort`] and the peer (over vchan in a qube). One link at a time: a second is
    /// refused until the first is dropped.
    pub fn attach_link(&self) -> Result<LinkPort, ServerError> {
        let (wake, woken) =
            UnixStream::pair().map_err(server_err("cannot create the link's wake socket"))?;
        for s in [&wake, &woken] {
            s.set_nonblocking(true).map_err(server_err(
                "cannot make the link's wake socket non-blocking",
            ))?;
        }
        let mut slot = lock(&self.shared.link);
        if slot.is_some() {
            return Err(ServerError {
                what: "cannot attach a second link to the peer daemon".to_string(),
                source: io::Error::new(io::ErrorKind::AlreadyExists, "one is attached"),
            });
        }
        *slot = Some(LinkSlot {
            link: Link::new(),
            wake,
        });
        Ok(LinkPort {
            shared: Arc::clone(&self.shared),
            woken,
        })
    }

    /// Stops accepting, disconnects every client, waits for all threads and removes the
    /// socket file.
    pub fn shutdown(mut self) -> Result<(), ServerError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), ServerError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the blocking accept() with a connection of our own.
        if let Err(e) = UnixStream::connect(&self.socket_path) {
            return Err(ServerError {
                what: format!(
                    "cannot wake the accept loop through {} (socket file removed?)",
                    self.socket_path.display()
                ),
                source: e,
            });
        }
        if thread.join().is_err() {
            self.shared
                .log(format_args!("the accept thread panicked during shutdown"));
        }
        let ours = std::fs::metadata(&self.socket_path)
            .map(|m| Some((m.dev(), m.ino())) == self.identity)
            .unwrap_or(false);
        if ours {
            std::fs::remove_file(&self.socket_path).map_err(server_err(format!(
                "cannot remove {}",
                self.socket_path.display()
            )))?;
        }
        Ok(())
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Writes to a running daemon that fire its watches like a client's but are not sent to
/// the peer daemon: for what this qube learns itself and dom0 does not hold (the vif list
/// from XenStore's hotplug, in a qube whose QubesDB comes over vchan).
#[derive(Debug, Clone)]
pub struct LocalWriter {
    shared: Arc<Shared>,
}

impl LocalWriter {
    /// Writes `path`, firing watches.
    pub fn write_local(&self, path: &str, value: &[u8]) -> Result<(), crate::RequestError> {
        let mut tree = lock(&self.shared.tree);
        let notifications = tree.write(path, value)?;
        self.deliver(&notifications);
        Ok(())
    }

    /// Removes `path` (a key, or a subtree ending in `/`); whether anything was there.
    pub fn remove_local(&self, path: &str) -> Result<bool, crate::RequestError> {
        let mut tree = lock(&self.shared.tree);
        let (removed, notifications) = tree.remove(path)?;
        self.deliver(&notifications);
        Ok(!removed.is_empty())
    }

    fn deliver(&self, notifications: &[crate::tree::Notification]) {
        let conns = lock(&self.shared.conns);
        for n in notifications {
            let event = encode_all(
                &[Message::bare(MsgType::RespWatch, n.path.clone())],
                &self.shared,
            );
            self.shared.deliver(&conns, n.conn, event);
        }
    }
}

/// The daemon's end of its link to a peer daemon, for the driver that carries the bytes.
///
/// The driver calls [`LinkPort::request_sync`] once the channel is up (on the qube's side),
/// sends what [`LinkPort::take_output`] gives, passes what arrives to
/// [`LinkPort::receive`], and polls [`LinkPort::wake_fd`] beside its channel: it becomes
/// readable when a local client's change waits to be sent. Dropping the port detaches the
/// link; local changes are then no longer sent anywhere.
#[derive(Debug)]
pub struct LinkPort {
    shared: Arc<Shared>,
    woken: UnixStream,
}

impl LinkPort {
    fn with_link<T>(&self, f: impl FnOnce(&mut Link) -> T) -> Option<T> {
        lock(&self.shared.link)
            .as_mut()
            .map(|slot| f(&mut slot.link))
    }

    /// Asks the peer for its whole database (the qube's side).
    pub fn request_sync(&self) {
        self.with_link(Link::request_sync);
    }

    /// Whether the peer's database has been copied in whole.
    pub fn synced(&self) -> bool {
        self.with_link(|l| l.synced()).unwrap_or(false)
    }

    /// Bytes to send to the peer, in order; also clears the wake descriptor.
    pub fn take_output(&self) -> Vec<u8> {
        let mut buf = [0u8; 64];
        while matches!((&self.woken).read(&mut buf), Ok(n) if n > 0) {}
        self.with_link(Link::take_output).unwrap_or_default()
    }

    /// Applies bytes from the peer to the database and delivers the watch notifications
    /// they cause to local clients. An error means the link must be closed (see
    /// [`crate::link`]); what came before the bad message was applied.
    pub fn receive(&self, bytes: &[u8]) -> Result<Received, LinkError> {
        let mut tree = lock(&self.shared.tree);
        let got = {
            let mut slot = lock(&self.shared.link);
            match slot.as_mut() {
                Some(slot) => slot.link.receive(bytes, &mut tree)?,
                None => return Ok(Received::default()),
            }
        };
        for why in &got.refused {
            self.shared.log(format_args!("link: refused {why}"));
        }
        let conns = lock(&self.shared.conns);
        for n in &got.notifications {
            let event = encode_all(
                &[Message::bare(MsgType::RespWatch, n.path.clone())],
                &self.shared,
            );
            self.shared.deliver(&conns, n.conn, event);
        }
        Ok(got)
    }

    /// Readable when local changes wait in [`LinkPort::take_output`].
    pub fn wake_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.woken.as_fd()
    }
}

impl Drop for LinkPort {
    fn drop(&mut self) {
        *lock(&self.shared.link) = None;
    }
}

fn accept_loop(listener: &UnixListener, shared: &Arc<Shared>) {
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    for incoming in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        match incoming {
            Ok(stream) => {
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                let conn_shared = Arc::clone(shared);
                let spawned = thread::Builder::new()
                    .name(format!("qubesdb-client-{id}"))
                    .spawn(move || run_connection(&conn_shared, id, stream));
                match spawned {
                    Ok(handle) => workers.push(handle),
                    Err(e) => shared.log(format_args!("client {id}: cannot start thread: {e}")),
                }
                workers.retain(|w| !w.is_finished());
            }
            Err(e) => {
                shared.log(format_args!("accept failed: {e}"));
                // E.g. out of file descriptors: do not spin.
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
    for conn in lock(&shared.conns).values() {
        let _ = conn.stream.shutdown(Shutdown::Both);
    }
    for w in workers {
        let _ = w.join();
    }
}

fn run_connection(shared: &Arc<Shared>, id: ConnId, stream: UnixStream) {
    let (queue, outgoing) = sync_channel::<Vec<u8>>(QUEUE_LEN);
    let clones = stream
        .try_clone()
        .and_then(|w| Ok((w, stream.try_clone()?)));
    let (writer_stream, control) = match clones {
        Ok(c) => c,
        Err(e) => {
            shared.log(format_args!("client {id}: cannot clone socket: {e}"));
            return;
        }
    };
    let _ = writer_stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let writer = match thread::Builder::new()
        .name(format!("qubesdb-writer-{id}"))
        .spawn(move || write_loop(writer_stream, &outgoing))
    {
        Ok(w) => w,
        Err(e) => {
            shared.log(format_args!("client {id}: cannot start writer: {e}"));
            return;
        }
    };
    lock(&shared.conns).insert(
        id,
        Conn {
            queue,
            stream: control,
        },
    );
    if !shared.stopping.load(Ordering::SeqCst) {
        read_loop(shared, id, stream);
    }
    lock(&shared.tree).disconnect(id);
    // Dropping the queue's sender lets the writer flush what is queued and exit.
    lock(&shared.conns).remove(&id);
    let _ = writer.join();
}

fn write_loop(mut stream: UnixStream, outgoing: &Receiver<Vec<u8>>) {
    for bytes in outgoing {
        if stream.write_all(&bytes).is_err() {
            break;
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}

fn read_loop(shared: &Shared, id: ConnId, mut stream: UnixStream) {
    let mut decoder = Decoder::new();
    let mut buf = [0u8; 4096];
    loop {
        loop {
            match decoder.next_message() {
                Ok(Some(message)) => {
                    if !execute(shared, id, &message) {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    shared.log(format_args!(
                        "client {id}: malformed message ({e}); answering RESP_ERROR and closing"
                    ));
                    let path = salvage_path(decoder.pending());
                    send_error_and_close(shared, id, &path);
                    return;
                }
            }
        }
        match stream.read(&mut buf) {
            Ok(0) => {
                if !decoder.pending().is_empty() {
                    shared.log(format_args!(
                        "client {id}: closed in the middle of a message ({} bytes)",
                        decoder.pending().len()
                    ));
                }
                return;
            }
            Ok(n) => decoder.feed(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn send_error_and_close(shared: &Shared, id: ConnId, path: &str) {
    let reply = encode_all(&[Message::bare(MsgType::RespError, path)], shared);
    let conns = lock(&shared.conns);
    shared.deliver(&conns, id, reply);
}

/// Runs one message; false when the connection must be closed.
fn execute(shared: &Shared, id: ConnId, message: &Message) -> bool {
    if !message.msg_type.is_command() {
        shared.log(format_args!(
            "client {id}: sent {} {:?}, which is not a command; answering RESP_ERROR and closing",
            message.msg_type, message.path
        ));
        send_error_and_close(shared, id, &message.path);
        return false;
    }
    let mut tree = lock(&shared.tree);
    let outcome = tree.handle(id, message);
    if let Some(why) = &outcome.refused {
        shared.log(format_args!(
            "client {id}: refused {} {:?}: {why}",
            message.msg_type, message.path
        ));
    }
    if matches!(message.msg_type, MsgType::CmdWrite | MsgType::CmdRm)
        && outcome.replies.first().map(|r| r.msg_type) == Some(MsgType::RespOk)
    {
        shared.forward(message);
    }
    let conns = lock(&shared.conns);
    shared.deliver(&conns, id, encode_all(&outcome.replies, shared));
    for n in outcome.notifications {
        let event = encode_all(&[Message::bare(MsgType::RespWatch, n.path)], shared);
        shared.deliver(&conns, n.conn, event);
    }
    true
}
