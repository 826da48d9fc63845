//! XenStore: the [`Store`] that netback, netfront and the hotplug code use, a [`client`] for
//! it over any byte stream (a Unix socket to the emulation's server, or Linux's
//! `/dev/xen/xenbus`), and the in-repository [`server`] that stands in for xenstored.
//!
//! The semantics are those of Xen's `docs/misc/xenstore.txt` (xen-project/xen) and the
//! wire format is [`super::xs_wire`] (`xen/include/public/io/xs_wire.h`):
//!
//! - paths are `/`-separated, absolute or relative to the caller's `/local/domain/<domid>`;
//!   writing a node creates its missing parents, removing one removes its subtree;
//! - a watch fires once when set, then on every change at or below its path, carrying the
//!   token it was set with; events arrive between replies and are queued, never lost;
//! - a transaction sees a snapshot and commits atomically, or fails with
//!   [`StoreError::Conflict`] (`EAGAIN`) when something it used changed meanwhile, and is
//!   then retried from the start ([`Store::transaction`] does that loop);
//! - every node has permissions ([`Perm`]): an owner, a default for everyone else, and
//!   per-domain entries; dom0 may do anything.
//!
//! The trait is built for a single-threaded `poll(2)` loop: requests block until their
//! reply (xenstored answers promptly), while watch events are taken without blocking with
//! [`Store::next_event`] when [`Store::raw_fd`] polls readable, or waited for with
//! [`Store::wait_event`].

pub mod client;
pub mod server;
#[cfg(test)]
mod tests;
mod tree;

use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

pub use super::xs_wire::{Access, Errno, Perm, WatchEvent, WireError};
use super::DomId;

/// A transaction id (the header's `tx_id`); [`Tx::NONE`] (0) is "not in a transaction".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tx(pub u32);

impl Tx {
    /// Outside any transaction (`XBT_NULL`).
    pub const NONE: Tx = Tx(0);
}

impl fmt::Display for Tx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "transaction {}", self.0)
    }
}

/// Why a store operation failed. Each carries the operation and the path (or what stands
/// for it, such as the watch path) so that the message alone says what and where.
#[derive(Debug)]
pub enum StoreError {
    /// The store refused with one of the `xsd_errors` names: `ENOENT` for a missing node,
    /// `EACCES` for a permission, `E2BIG`/`ENOSPC` for a quota, `EINVAL` for a bad path.
    Refused {
        errno: Errno,
        op: &'static str,
        path: String,
    },
    /// A transaction could not commit because something it read or wrote changed since
    /// it started (`EAGAIN` on `XS_TRANSACTION_END`). Nothing of it was applied; start a
    /// new transaction and redo the work.
    Conflict { tx: Tx },
    /// The connection to the store failed (closed, or an I/O error).
    Io {
        op: &'static str,
        path: String,
        source: io::Error,
    },
    /// The store answered with something `xs_wire.h` does not allow (an unknown error
    /// name, a reply of the wrong type, a malformed payload), or a value that should be
    /// text is not.
    Protocol {
        op: &'static str,
        path: String,
        reason: String,
    },
}

impl StoreError {
    /// The xs error name, if the store refused (`EAGAIN` for a conflict).
    pub fn errno(&self) -> Option<Errno> {
        match self {
            StoreError::Refused { errno, .. } => Some(*errno),
            StoreError::Conflict { .. } => Some(Errno::EAGAIN),
            _ => None,
        }
    }

    /// Whether the node was missing (`ENOENT`), the one refusal callers often expect.
    pub fn is_not_found(&self) -> bool {
        self.errno() == Some(Errno::ENOENT)
    }

    /// Whether the node is not there for us: missing (`ENOENT`), or missing below a
    /// directory we may not read, which xenstored reports as `EACCES` (its
    /// `errno_from_parents`). A peer's key not yet written, or a peer's directory removed,
    /// reads either way.
    pub fn is_absent(&self) -> bool {
        self.is_not_found() || self.errno() == Some(Errno::EACCES)
    }

    /// Whether the transaction should be redone (`EAGAIN`).
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Refused { errno, op, path } => {
                write!(f, "xenstore {op} {path}: {errno} ({})", errno.describe())
            }
            StoreError::Conflict { tx } => write!(
                f,
                "xenstore {tx} conflicted with another change (EAGAIN): retry it"
            ),
            StoreError::Io { op, path, source } => {
                write!(f, "xenstore {op} {path}: connection failed: {source}")
            }
            StoreError::Protocol { op, path, reason } => {
                write!(f, "xenstore {op} {path}: bad reply: {reason}")
            }
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// How many times [`Store::transaction`] redoes a conflicting transaction before it
/// gives the conflict to its caller (a livelock should surface, not spin forever).
pub const TRANSACTION_ATTEMPTS: usize = 16;

/// A XenStore connection.
///
/// `tx` is [`Tx::NONE`] outside a transaction. Values are bytes, as on the wire; the
/// xenbus keys are decimal or short text, read with [`Store::read_string`].
pub trait Store: fmt::Debug {
    /// The value at `path` (`XS_READ`).
    fn read(&mut self, tx: Tx, path: &str) -> Result<Vec<u8>, StoreError>;

    /// Sets the value at `path`, creating it and any missing parents (`XS_WRITE`).
    fn write(&mut self, tx: Tx, path: &str, value: &[u8]) -> Result<(), StoreError>;

    /// Makes sure `path` exists, leaving an existing value alone (`XS_MKDIR`).
    fn mkdir(&mut self, tx: Tx, path: &str) -> Result<(), StoreError>;

    /// Removes `path` and everything below it; a missing `path` is fine, a missing
    /// parent is `ENOENT` (`XS_RM`).
    fn rm(&mut self, tx: Tx, path: &str) -> Result<(), StoreError>;

    /// The names (last components) of the children of `path` (`XS_DIRECTORY`).
    fn directory(&mut self, tx: Tx, path: &str) -> Result<Vec<String>, StoreError>;

    /// The permissions of `path`, owner first (`XS_GET_PERMS`).
    fn get_perms(&mut self, tx: Tx, path: &str) -> Result<Vec<Perm>, StoreError>;

    /// Replaces the permissions of `path`; the first entry is the owner (`XS_SET_PERMS`).
    fn set_perms(&mut self, tx: Tx, path: &str, perms: &[Perm]) -> Result<(), StoreError>;

    /// Watches `path` and everything below it; events carry `token` (`XS_WATCH`). The
    /// watch fires once straight away.
    fn watch(&mut self, path: &str, token: &str) -> Result<(), StoreError>;

    /// Removes a watch set with the same path and token (`XS_UNWATCH`). Events it raised
    /// before may still be queued.
    fn unwatch(&mut self, path: &str, token: &str) -> Result<(), StoreError>;

    /// `/local/domain/<domid>` as the store spells it (`XS_GET_DOMAIN_PATH`).
    fn get_domain_path(&mut self, domid: DomId) -> Result<String, StoreError>;

    /// Starts a transaction (`XS_TRANSACTION_START`).
    fn transaction_start(&mut self) -> Result<Tx, StoreError>;

    /// Commits (`commit`) or discards a transaction (`XS_TRANSACTION_END`). A commit that
    /// conflicts is [`StoreError::Conflict`], and nothing of it was applied.
    fn transaction_end(&mut self, tx: Tx, commit: bool) -> Result<(), StoreError>;

    /// A queued or arrived watch event, without blocking; `None` when there is none now.
    fn next_event(&mut self) -> Result<Option<WatchEvent>, StoreError>;

    /// Waits up to `timeout` for a watch event.
    fn wait_event(&mut self, timeout: Duration) -> Result<Option<WatchEvent>, StoreError>;

    /// Readable when bytes from the store have arrived, for `poll(2)`. Events already
    /// queued inside the connection do not make it readable: drain
    /// [`Store::next_event`] until `None` before polling again.
    fn raw_fd(&self) -> RawFd;

    /// The value at `path` as text (the xenbus keys are ASCII).
    fn read_string(&mut self, tx: Tx, path: &str) -> Result<String, StoreError> {
        let v = self.read(tx, path)?;
        String::from_utf8(v).map_err(|_| StoreError::Protocol {
            op: "read",
            path: path.to_owned(),
            reason: "value is not UTF-8 text".into(),
        })
    }

    /// Whether `path` exists (a read that is not `ENOENT`).
    fn exists(&mut self, tx: Tx, path: &str) -> Result<bool, StoreError> {
        match self.read(tx, path) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Runs `body` in a transaction and commits it, redoing the whole thing on a
    /// conflict up to [`TRANSACTION_ATTEMPTS`] times. An error from `body` aborts the
    /// transaction and is returned. `body` may run more than once, so it must only act
    /// through the store.
    fn transaction<T, F>(&mut self, mut body: F) -> Result<T, StoreError>
    where
        Self: Sized,
        F: FnMut(&mut Self, Tx) -> Result<T, StoreError>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let tx = self.transaction_start()?;
            let value = match body(self, tx) {
                Ok(v) => v,
                Err(e) => {
                    // The body's error is the one worth reporting; an abort failing
                    // after it means the connection is gone, which the next call shows.
                    let _ = self.transaction_end(tx, false);
                    return Err(e);
                }
            };
            match self.transaction_end(tx, true) {
                Ok(()) => return Ok(value),
                Err(e) if e.is_conflict() && attempt < TRANSACTION_ATTEMPTS => continue,
                Err(e) => return Err(e),
            }
        }
    }
}
