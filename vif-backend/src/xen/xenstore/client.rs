//! A XenStore client over any byte stream that speaks `xs_wire.h` framing: a Unix socket
//! to this repository's [`super::server`] (or to a real xenstored's socket), or Linux's
//! `/dev/xen/xenbus`, which takes the same messages from user space and relays them to
//! xenstored over the domain's ring.
//!
//! One request is outstanding at a time: it goes out in one `write`, and messages are read
//! until the reply with its `req_id` comes back. Watch events (`XS_WATCH_EVENT`, `req_id`
//! 0) may arrive before that reply at any moment; they are queued in arrival order and
//! handed out by [`Store::next_event`]. An event identical (same path, same token) to one
//! still queued is not queued twice: a watch says "look again", so the second copy adds
//! nothing, and this is what bounds the queue when the caller is busy elsewhere.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{Perm, Store, StoreError, Tx, WatchEvent};
use crate::sys::poll_readable;
use crate::xen::xs_wire::{
    nul_strings, single_string, split_strings, write_payload, Decoder, Errno, Message, MsgType,
    WireError,
};
use crate::xen::DomId;

/// The Linux device that relays XenStore messages from user space (`xenbus_dev_frontend`).
pub const XENBUS_DEVICE: &str = "/dev/xen/xenbus";

/// A byte stream to a XenStore: readable, writable and pollable.
pub trait Stream: Read + Write + AsRawFd + fmt::Debug {}

impl<T: Read + Write + AsRawFd + fmt::Debug> Stream for T {}

/// A XenStore connection over `S` (see the module docs).
#[derive(Debug)]
pub struct Client<S> {
    stream: S,
    decoder: Decoder,
    events: VecDeque<WatchEvent>,
    queued: HashSet<WatchEvent>,
    next_req: u32,
    buf: Vec<u8>,
}

impl Client<UnixStream> {
    /// Connects to a XenStore Unix socket (the emulation's `xenstore.<domid>`).
    pub fn connect(path: impl AsRef<Path>) -> io::Result<Client<UnixStream>> {
        Ok(Client::new(UnixStream::connect(path)?))
    }
}

impl Client<File> {
    /// Opens [`XENBUS_DEVICE`], the guest kernel's XenStore connection.
    pub fn open_xenbus() -> io::Result<Client<File>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(XENBUS_DEVICE)?;
        Ok(Client::new(f))
    }
}

impl<S: Stream> Client<S> {
    /// A client over an already connected stream, left in blocking mode (non-blocking
    /// reads are done by polling first).
    pub fn new(stream: S) -> Client<S> {
        Client {
            stream,
            decoder: Decoder::new(),
            events: VecDeque::new(),
            queued: HashSet::new(),
            next_req: 1,
            buf: vec![0; 8192],
        }
    }

    /// The underlying stream.
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// Events waiting in the queue (already read from the stream).
    pub fn queued_events(&self) -> usize {
        self.events.len()
    }

    /// Sends one request and returns the payload of its reply, queueing the watch events
    /// that come before it.
    fn request(
        &mut self,
        op: &'static str,
        path: &str,
        kind: MsgType,
        tx: Tx,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, StoreError> {
        let req_id = self.next_req;
        // req_id is only matched against our own outstanding request, so wrapping is fine.
        self.next_req = self.next_req.wrapping_add(1);
        let bytes = Message::new(kind, req_id, tx.0, payload)
            .encode()
            .map_err(|_| StoreError::Refused {
                // Refused here rather than sent: xenstored kills a connection that sends
                // an oversize payload.
                errno: Errno::E2BIG,
                op,
                path: path.to_owned(),
            })?;
        let io_err = |source| StoreError::Io {
            op,
            path: path.to_owned(),
            source,
        };
        self.stream.write_all(&bytes).map_err(io_err)?;
        loop {
            let msg = match self.read_message(None) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => return Err(self.stream_error(e, op, path)),
            };
            if msg.kind() == Some(MsgType::WatchEvent) {
                self.queue_event(&msg, op, path)?;
                continue;
            }
            if msg.req_id != req_id {
                // A reply to an earlier request whose wait failed part-way (an I/O error
                // after the write); nobody is waiting for it any more.
                continue;
            }
            if msg.kind() == Some(MsgType::Error) {
                let name = single_string(&msg.payload).unwrap_or("");
                return Err(match Errno::from_name(name) {
                    Some(Errno::EAGAIN) if kind == MsgType::TransactionEnd => {
                        StoreError::Conflict { tx }
                    }
                    Some(errno) => StoreError::Refused {
                        errno,
                        op,
                        path: path.to_owned(),
                    },
                    None => StoreError::Protocol {
                        op,
                        path: path.to_owned(),
                        reason: format!("unknown error name {name:?}"),
                    },
                });
            }
            if msg.msg_type != kind as u32 {
                return Err(StoreError::Protocol {
                    op,
                    path: path.to_owned(),
                    reason: format!("reply of type {} to a {kind}", msg.msg_type),
                });
            }
            return Ok(msg.payload);
        }
    }

    /// The next whole message: waits for it without limit (`timeout` `None`), or up to
    /// `timeout` and then `Ok(None)`.
    fn read_message(&mut self, timeout: Option<Duration>) -> Result<Option<Message>, ReadError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut ready = Vec::with_capacity(1);
        loop {
            if let Some(m) = self.decoder.next_message().map_err(ReadError::Wire)? {
                return Ok(Some(m));
            }
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
                poll_readable(&[self.stream.as_raw_fd()], ms, &mut ready).map_err(ReadError::Io)?;
                if !ready.first().copied().unwrap_or(false) {
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                    // Interrupted by a signal: poll again for the time left.
                    continue;
                }
            }
            let n = match self.stream.read(&mut self.buf) {
                Ok(0) => {
                    return Err(ReadError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the store closed the connection",
                    )))
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ReadError::Io(e)),
            };
            self.decoder.feed(&self.buf[..n]);
        }
    }

    fn stream_error(&self, e: ReadError, op: &'static str, path: &str) -> StoreError {
        match e {
            ReadError::Io(source) => StoreError::Io {
                op,
                path: path.to_owned(),
                source,
            },
            ReadError::Wire(w) => StoreError::Protocol {
                op,
                path: path.to_owned(),
                reason: w.to_string(),
            },
        }
    }

    fn queue_event(
        &mut self,
        msg: &Message,
        op: &'static str,
        path: &str,
    ) -> Result<(), StoreError> {
        let ev = WatchEvent::from_payload(&msg.payload).map_err(|w| StoreError::Protocol {
            op,
            path: path.to_owned(),
            reason: format!("watch event: {w}"),
        })?;
        if self.queued.insert(ev.clone()) {
            self.events.push_back(ev);
        }
        Ok(())
    }

    fn pop_event(&mut self) -> Option<WatchEvent> {
        let ev = self.events.pop_front()?;
        self.queued.remove(&ev);
        Some(ev)
    }

    /// Reads what has arrived, up to `timeout`, until an event is queued.
    fn pump_events(&mut self, timeout: Duration) -> Result<Option<WatchEvent>, StoreError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ev) = self.pop_event() {
                return Ok(Some(ev));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_message(Some(left)) {
                Ok(Some(msg)) if msg.kind() == Some(MsgType::WatchEvent) => {
                    self.queue_event(&msg, "watch event", "")?;
                }
                // A late reply to an abandoned request: nothing waits for it.
                Ok(Some(_)) => {}
                Ok(None) => return Ok(None),
                Err(e) => return Err(self.stream_error(e, "watch event", "")),
            }
        }
    }
}

/// A failed read of the stream: the connection, or its framing.
#[derive(Debug)]
enum ReadError {
    Io(io::Error),
    Wire(WireError),
}

fn protocol(op: &'static str, path: &str, reason: impl fmt::Display) -> StoreError {
    StoreError::Protocol {
        op,
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

impl<S: Stream> Store for Client<S> {
    fn read(&mut self, tx: Tx, path: &str) -> Result<Vec<u8>, StoreError> {
        self.request("read", path, MsgType::Read, tx, nul_strings(&[path]))
    }

    fn write(&mut self, tx: Tx, path: &str, value: &[u8]) -> Result<(), StoreError> {
        self.request(
            "write",
            path,
            MsgType::Write,
            tx,
            write_payload(path, value),
        )
        .map(drop)
    }

    fn mkdir(&mut self, tx: Tx, path: &str) -> Result<(), StoreError> {
        self.request("mkdir", path, MsgType::Mkdir, tx, nul_strings(&[path]))
            .map(drop)
    }

    fn rm(&mut self, tx: Tx, path: &str) -> Result<(), StoreError> {
        self.request("rm", path, MsgType::Rm, tx, nul_strings(&[path]))
            .map(drop)
    }

    fn directory(&mut self, tx: Tx, path: &str) -> Result<Vec<String>, StoreError> {
        let reply = self.request(
            "directory",
            path,
            MsgType::Directory,
            tx,
            nul_strings(&[path]),
        )?;
        let names = split_strings(&reply).map_err(|e| protocol("directory", path, e))?;
        Ok(names.into_iter().map(str::to_owned).collect())
    }

    fn get_perms(&mut self, tx: Tx, path: &str) -> Result<Vec<Perm>, StoreError> {
        let reply = self.request(
            "get_perms",
            path,
            MsgType::GetPerms,
            tx,
            nul_strings(&[path]),
        )?;
        Perm::parse_list(&reply).map_err(|e| protocol("get_perms", path, e))
    }

    fn set_perms(&mut self, tx: Tx, path: &str, perms: &[Perm]) -> Result<(), StoreError> {
        let mut payload = nul_strings(&[path]);
        payload.extend_from_slice(&Perm::list_payload(perms));
        self.request("set_perms", path, MsgType::SetPerms, tx, payload)
            .map(drop)
    }

    fn watch(&mut self, path: &str, token: &str) -> Result<(), StoreError> {
        self.request(
            "watch",
            path,
            MsgType::Watch,
            Tx::NONE,
            nul_strings(&[path, token]),
        )
        .map(drop)
    }

    fn unwatch(&mut self, path: &str, token: &str) -> Result<(), StoreError> {
        self.request(
            "unwatch",
            path,
            MsgType::Unwatch,
            Tx::NONE,
            nul_strings(&[path, token]),
        )
        .map(drop)
    }

    fn get_domain_path(&mut self, domid: DomId) -> Result<String, StoreError> {
        let id = domid.to_string();
        let reply = self.request(
            "get_domain_path",
            &id,
            MsgType::GetDomainPath,
            Tx::NONE,
            nul_strings(&[&id]),
        )?;
        single_string(&reply)
            .map(str::to_owned)
            .map_err(|e| protocol("get_domain_path", &id, e))
    }

    fn transaction_start(&mut self) -> Result<Tx, StoreError> {
        let reply = self.request(
            "transaction_start",
            "",
            MsgType::TransactionStart,
            Tx::NONE,
            vec![0],
        )?;
        let id = single_string(&reply)
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
            .filter(|&id| id != 0)
            .ok_or_else(|| protocol("transaction_start", "", "transaction id is not a number"))?;
        Ok(Tx(id))
    }

    fn transaction_end(&mut self, tx: Tx, commit: bool) -> Result<(), StoreError> {
        let flag: &[u8] = if commit { b"T\0" } else { b"F\0" };
        self.request(
            "transaction_end",
            &tx.to_string(),
            MsgType::TransactionEnd,
            tx,
            flag.to_vec(),
        )
        .map(drop)
    }

    fn next_event(&mut self) -> Result<Option<WatchEvent>, StoreError> {
        self.pump_events(Duration::ZERO)
    }

    fn wait_event(&mut self, timeout: Duration) -> Result<Option<WatchEvent>, StoreError> {
        self.pump_events(timeout)
    }

    fn raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}
