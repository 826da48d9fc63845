//! A blocking QubesDB client for the local socket (upstream `libqubesdb`'s `qdb_*` calls,
//! qubes-core-qubesdb `include/qubesdb.h`).
//!
//! `RESP_WATCH` messages may arrive at any time, even between the messages of a MULTIREAD
//! answer. Every call that waits for an answer queues the watch events it meets, in arrival
//! order, and [`Client::read_watch`] hands them out first (upstream's client library queues
//! them too, but hands them out newest first).
//!
//! To wait for events in a poll loop, poll [`Client::as_fd`] for readability and then call
//! `read_watch(Some(Duration::ZERO))` until it returns `Ok(None)`. Check
//! [`Client::pending_watches`] before polling: events met during a command are already
//! queued and will not make the socket readable.
//!
//! After an I/O error, a timeout or a protocol error the connection's state is unknown, so
//! the client refuses further calls ([`ClientError::Broken`]); connect again. (Upstream
//! reconnects silently and loses its watches.)

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::tree::{check_key, check_pattern, check_prefix, check_value, RequestError};
use crate::wire::{encode, Decoder, Message, MsgType, WireError};

/// The default socket of the daemon in a qube.
pub const DEFAULT_SOCKET: &str = "/var/run/qubes/qubesdb.sock";

/// What failed, on which socket, during which operation (e.g. `read /qubes-ip`).
#[derive(Debug)]
pub enum ClientError {
    /// The daemon's socket could not be connected to.
    Connect { socket: PathBuf, source: io::Error },
    /// The request was not sent: it would be refused (bad path or value).
    Invalid { op: String, error: RequestError },
    /// The daemon answered `RESP_ERROR`.
    Refused { op: String },
    /// Reading or writing the socket failed.
    Io {
        socket: PathBuf,
        op: String,
        source: io::Error,
    },
    /// The daemon closed the connection.
    Closed { socket: PathBuf, op: String },
    /// The daemon sent something this operation cannot take.
    Protocol {
        socket: PathBuf,
        op: String,
        detail: String,
    },
    /// No answer within the command timeout.
    TimedOut {
        socket: PathBuf,
        op: String,
        after: Duration,
    },
    /// An earlier failure left the connection in an unknown state.
    Broken { earlier: String },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect { socket, source } => write!(
                f,
                "cannot connect to QubesDB at {}: {source}",
                socket.display()
            ),
            ClientError::Invalid { op, error } => write!(f, "{op}: {error}"),
            ClientError::Refused { op } => {
                write!(f, "{op}: the daemon refused the request (RESP_ERROR)")
            }
            ClientError::Io { socket, op, source } => {
                write!(f, "{op}: I/O error on {}: {source}", socket.display())
            }
            ClientError::Closed { socket, op } => write!(
                f,
                "{op}: the daemon at {} closed the connection",
                socket.display()
            ),
            ClientError::Protocol { socket, op, detail } => write!(
                f,
                "{op}: protocol error from {}: {detail}",
                socket.display()
            ),
            ClientError::TimedOut { socket, op, after } => write!(
                f,
                "{op}: no answer from {} within {after:?}",
                socket.display()
            ),
            ClientError::Broken { earlier } => write!(
                f,
                "connection unusable after an earlier error ({earlier}); reconnect"
            ),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Connect { source, .. } | ClientError::Io { source, .. } => Some(source),
            ClientError::Invalid { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// A connection to a QubesDB daemon.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    socket: PathBuf,
    decoder: Decoder,
    events: VecDeque<String>,
    broken: Option<String>,
    timeout: Option<Duration>,
}

impl Client {
    /// Connects to the daemon listening on `socket`.
    pub fn connect(socket: impl AsRef<Path>) -> Result<Client, ClientError> {
        let socket = socket.as_ref().to_path_buf();
        let stream = match UnixStream::connect(&socket) {
            Ok(s) => s,
            Err(source) => return Err(ClientError::Connect { socket, source }),
        };
        Ok(Client {
            stream,
            socket,
            decoder: Decoder::new(),
            events: VecDeque::new(),
            broken: None,
            timeout: None,
        })
    }

    /// How long a command waits for its answer (`None`, the default: forever).
    pub fn set_command_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// The socket this client is connected to.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The value of `path`, `None` if there is no such entry.
    pub fn read(&mut self, path: &str) -> Result<Option<Vec<u8>>, ClientError> {
        let op = format!("read {path}");
        check(&op, check_key(path))?;
        let answer = self.command(&op, MsgType::CmdRead, path, &[])?;
        match answer.msg_type {
            MsgType::RespRead => Ok(Some(answer.data)),
            MsgType::RespErrorNoent => Ok(None),
            MsgType::RespError => Err(ClientError::Refused { op }),
            other => Err(self.unexpected(&op, other, "RESP_READ or RESP_ERROR_NOENT")),
        }
    }

    /// Sets `path` to `value`.
    pub fn write(&mut self, path: &str, value: &[u8]) -> Result<(), ClientError> {
        let op = format!("write {path}");
        check(&op, check_key(path).and_then(|()| check_value(value)))?;
        let answer = self.command(&op, MsgType::CmdWrite, path, value)?;
        self.ok_answer(&op, answer.msg_type).map(|_| ())
    }

    /// Removes `path`, or every entry under it if it ends with `/`; false if nothing matched.
    pub fn rm(&mut self, path: &str) -> Result<bool, ClientError> {
        let op = format!("rm {path}");
        check(&op, check_pattern(path))?;
        let answer = self.command(&op, MsgType::CmdRm, path, &[])?;
        self.ok_answer(&op, answer.msg_type)
    }

    /// Every entry whose path starts with `prefix` (a string prefix: `/a` also returns
    /// `/ab`), in path order; `""` returns the whole database in the daemon's dump order
    /// (reversed).
    pub fn multiread(&mut self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, ClientError> {
        let op = format!("multiread {prefix}");
        check(&op, check_prefix(prefix))?;
        let mut answer = self.command(&op, MsgType::CmdMultiread, prefix, &[])?;
        let mut entries = Vec::new();
        loop {
            match answer.msg_type {
                MsgType::RespMultiread if answer.path.is_empty() => {
                    if !answer.data.is_empty() {
                        return Err(self.protocol(
                            &op,
                            format!(
                                "the closing RESP_MULTIREAD carries {} bytes of data",
                                answer.data.len()
                            ),
                        ));
                    }
                    return Ok(entries);
                }
                MsgType::RespMultiread => entries.push((answer.path, answer.data)),
                MsgType::RespError if entries.is_empty() => {
                    return Err(ClientError::Refused { op })
                }
                other => return Err(self.unexpected(&op, other, "RESP_MULTIREAD")),
            }
            answer = self.answer(&op)?;
        }
    }

    /// The paths starting with `prefix`, in path order.
    pub fn list(&mut self, prefix: &str) -> Result<Vec<String>, ClientError> {
        let op = format!("list {prefix}");
        check(&op, check_prefix(prefix))?;
        let mut answer = self.command(&op, MsgType::CmdList, prefix, &[])?;
        let mut paths = Vec::new();
        loop {
            match answer.msg_type {
                MsgType::RespList if !answer.data.is_empty() => {
                    return Err(self.protocol(
                        &op,
                        format!("RESP_LIST carries {} bytes of data", answer.data.len()),
                    ));
                }
                MsgType::RespList if answer.path.is_empty() => return Ok(paths),
                MsgType::RespList => paths.push(answer.path),
                MsgType::RespError if paths.is_empty() => return Err(ClientError::Refused { op }),
                other => return Err(self.unexpected(&op, other, "RESP_LIST")),
            }
            answer = self.answer(&op)?;
        }
    }

    /// Registers a watch on `path` (a key, or a subtree if it ends with `/`; it need not
    /// exist). Events arrive through [`Client::read_watch`].
    pub fn watch(&mut self, path: &str) -> Result<(), ClientError> {
        let op = format!("watch {path}");
        check(&op, check_pattern(path))?;
        let answer = self.command(&op, MsgType::CmdWatch, path, &[])?;
        match answer.msg_type {
            MsgType::RespOk => Ok(()),
            MsgType::RespError => Err(ClientError::Refused { op }),
            other => Err(self.unexpected(&op, other, "RESP_OK")),
        }
    }

    /// Removes one watch registration on exactly `path`; false if there was none. Events
    /// already queued stay queued.
    pub fn unwatch(&mut self, path: &str) -> Result<bool, ClientError> {
        let op = format!("unwatch {path}");
        check(&op, check_pattern(path))?;
        let answer = self.command(&op, MsgType::CmdUnwatch, path, &[])?;
        self.ok_answer(&op, answer.msg_type)
    }

    /// Watch events received but not yet returned by [`Client::read_watch`].
    pub fn pending_watches(&self) -> usize {
        // A watch event that arrived in the same read as a command's reply is whole in the
        // decoder but not yet queued: the socket will not be readable for it again, so it
        // counts here, or a caller polling the socket would not see it until the next event.
        let buffered = matches!(
            crate::wire::decode_prefix(self.decoder.pending()),
            Ok(Some(_))
        );
        self.events.len() + usize::from(buffered)
    }

    /// The next watch event (the modified path): a queued one, or one read from the socket
    /// within `timeout` (`None`: wait forever; `Some(Duration::ZERO)`: only what is already
    /// there). `Ok(None)`: nothing arrived in time.
    pub fn read_watch(&mut self, timeout: Option<Duration>) -> Result<Option<String>, ClientError> {
        if let Some(path) = self.events.pop_front() {
            return Ok(Some(path));
        }
        self.usable()?;
        let op = "read watch event";
        let deadline = timeout.map(|t| Instant::now() + t);
        match self.receive(op, deadline, true)? {
            None => Ok(None),
            Some(m) if m.msg_type == MsgType::RespWatch => Ok(Some(m.path)),
            Some(m) => Err(self.protocol(
                op,
                format!(
                    "unsolicited {} {:?} while waiting for RESP_WATCH",
                    m.msg_type, m.path
                ),
            )),
        }
    }

    /// Sends a command and returns the first message of its answer.
    fn command(
        &mut self,
        op: &str,
        msg_type: MsgType,
        path: &str,
        data: &[u8],
    ) -> Result<Message, ClientError> {
        self.usable()?;
        let bytes = encode(msg_type, path, data).map_err(|e| ClientError::Invalid {
            op: op.to_string(),
            error: RequestError::Path(e),
        })?;
        if let Err(source) = self.stream.write_all(&bytes) {
            return Err(self.fail(ClientError::Io {
                socket: self.socket.clone(),
                op: op.to_string(),
                source,
            }));
        }
        self.answer(op)
    }

    /// The next message that is not a watch event, within the command timeout.
    fn answer(&mut self, op: &str) -> Result<Message, ClientError> {
        let deadline = self.timeout.map(|t| Instant::now() + t);
        match self.receive(op, deadline, false)? {
            Some(m) => Ok(m),
            None => Err(self.fail(ClientError::TimedOut {
                socket: self.socket.clone(),
                op: op.to_string(),
                after: self.timeout.unwrap_or_default(),
            })),
        }
    }

    /// The next message; watch events are queued and skipped unless `want_event`, in which
    /// case the first one is returned. `Ok(None)`: the deadline passed.
    fn receive(
        &mut self,
        op: &str,
        deadline: Option<Instant>,
        want_event: bool,
    ) -> Result<Option<Message>, ClientError> {
        loop {
            match self.decoder.next_message() {
                Ok(Some(m)) if m.msg_type == MsgType::RespWatch => {
                    if !m.data.is_empty() {
                        let detail = format!("RESP_WATCH carries {} bytes of data", m.data.len());
                        return Err(self.protocol(op, detail));
                    }
                    if want_event {
                        return Ok(Some(m));
                    }
                    self.events.push_back(m.path);
                    continue;
                }
                Ok(Some(m)) => return Ok(Some(m)),
                Ok(None) => {}
                Err(e) => return Err(self.wire(op, &e)),
            }
            if !self.fill(op, deadline)? {
                return Ok(None);
            }
        }
    }

    /// Reads more bytes into the decoder; false if the deadline passed first.
    fn fill(&mut self, op: &str, deadline: Option<Instant>) -> Result<bool, ClientError> {
        let mut buf = [0u8; 4096];
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let configured = match remaining {
            None => self
                .stream
                .set_nonblocking(false)
                .and_then(|()| self.stream.set_read_timeout(None)),
            Some(r) if r < Duration::from_millis(1) => self.stream.set_nonblocking(true),
            Some(r) => self
                .stream
                .set_nonblocking(false)
                .and_then(|()| self.stream.set_read_timeout(Some(r))),
        };
        if let Err(source) = configured {
            return Err(self.io(op, source));
        }
        let result = loop {
            match self.stream.read(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        let _ = self.stream.set_nonblocking(false);
        match result {
            Ok(0) => {
                let err = if self.decoder.pending().is_empty() {
                    ClientError::Closed {
                        socket: self.socket.clone(),
                        op: op.to_string(),
                    }
                } else {
                    ClientError::Protocol {
                        socket: self.socket.clone(),
                        op: op.to_string(),
                        detail: format!(
                            "connection closed in the middle of a message ({} bytes received)",
                            self.decoder.pending().len()
                        ),
                    }
                };
                Err(self.fail(err))
            }
            Ok(n) => {
                self.decoder.feed(&buf[..n]);
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(false)
            }
            Err(source) => Err(self.io(op, source)),
        }
    }

    /// RESP_OK: true; RESP_ERROR_NOENT: false; RESP_ERROR: refused.
    fn ok_answer(&mut self, op: &str, msg_type: MsgType) -> Result<bool, ClientError> {
        match msg_type {
            MsgType::RespOk => Ok(true),
            MsgType::RespErrorNoent => Ok(false),
            MsgType::RespError => Err(ClientError::Refused { op: op.to_string() }),
            other => Err(self.unexpected(op, other, "RESP_OK or RESP_ERROR_NOENT")),
        }
    }

    fn unexpected(&mut self, op: &str, got: MsgType, expected: &str) -> ClientError {
        self.protocol(op, format!("expected {expected}, got {got}"))
    }

    fn protocol(&mut self, op: &str, detail: String) -> ClientError {
        let err = ClientError::Protocol {
            socket: self.socket.clone(),
            op: op.to_string(),
            detail,
        };
        self.fail(err)
    }

    fn wire(&mut self, op: &str, e: &WireError) -> ClientError {
        self.protocol(op, format!("malformed message: {e}"))
    }

    fn io(&mut self, op: &str, source: io::Error) -> ClientError {
        let err = ClientError::Io {
            socket: self.socket.clone(),
            op: op.to_string(),
            source,
        };
        self.fail(err)
    }

    /// Fails if an earlier error left the connection in an unknown state.
    fn usable(&self) -> Result<(), ClientError> {
        match &self.broken {
            Some(earlier) => Err(ClientError::Broken {
                earlier: earlier.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Marks the connection unusable and returns `err`.
    fn fail(&mut self, err: ClientError) -> ClientError {
        self.broken = Some(err.to_string());
        err
    }
}

fn check(op: &str, result: Result<(), RequestError>) -> Result<(), ClientError> {
    result.map_err(|error| ClientError::Invalid {
        op: op.to_string(),
        error,
    })
}

impl AsFd for Client {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

impl AsRawFd for Client {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}
