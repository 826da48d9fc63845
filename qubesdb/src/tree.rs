//! The database: an ordered map of path to value, plus watch registrations. Pure, no I/O.
//!
//! Reference: the command semantics of upstream qubes-core-qubesdb `daemon/db-core.c` and `daemon/db-cmds.c`.
//!
//! [`Tree::handle`] turns one command into the messages to send: the answer (to the sender),
//! then the `RESP_WATCH` notifications (to the connections whose watches match), in the order
//! upstream sends them (answer first, then watches).
//!
//! Semantics, command by command:
//!
//! | command | path | answer |
//! |---|---|---|
//! | READ | a key (see [`check_key`]) | `RESP_READ` with the value, or `RESP_ERROR_NOENT` |
//! | WRITE | a key; value at most 3072 bytes without NUL | `RESP_OK`; fires watches |
//! | MULTIREAD | any prefix, `""` = everything | `RESP_MULTIREAD` (path, value) per entry whose path starts with the prefix, in path order, in reverse order for `""`; then one with empty path and no data |
//! | LIST | any prefix | `RESP_LIST` (path, no data) per entry, in path order; then an empty one |
//! | RM | a key, or a subtree `/a/b/` | `RESP_OK` if anything was removed (fires watches), `RESP_ERROR_NOENT` otherwise |
//! | WATCH | a key, or a subtree `/a/b/` (need not exist) | `RESP_OK`; registrations are counted, two identical ones fire twice |
//! | UNWATCH | as WATCH | `RESP_OK` removing one identical registration of this connection, `RESP_ERROR_NOENT` if none |
//!
//! Any other refusal (a bad path for the command, data on a command that takes none, an
//! answer type sent as a command) is `RESP_ERROR` with the command's path; [`Outcome::refused`]
//! says why. Values are bytes, never interpreted.
//!
//! A watch on `P/` matches every path starting with `P/`; a watch on `P` matches `P` only.
//! A write of `K` notifies matching watches with path `K`. A removal notifies, with the path
//! given to RM (`/a/b/` for a subtree), every watch that matches that path or any removed
//! entry. Each matching registration gets exactly one `RESP_WATCH` per modification.
//! (Upstream only tests the RM path, so an exact watch on `/a/b/c` misses `rm /a/b/`; we
//! notify it.)

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;

use crate::wire::{check_path, Message, MsgType, WireError, MAX_DATA};

/// Identifies a client connection (the daemon numbers them).
pub type ConnId = u64;

/// Why a command was refused (or a client refuses to send it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// The path breaks the wire rules (length, characters, leading `-`).
    Path(WireError),
    /// The command needs a path.
    EmptyPath,
    /// The command needs a path starting with `/`.
    NotAbsolute,
    /// A key (READ, WRITE) cannot end with `/`.
    TrailingSlash,
    /// A value is over [`MAX_DATA`] bytes.
    ValueTooLong { len: usize },
    /// A value holds a NUL byte (values are C strings upstream; its daemon refuses them).
    ValueHasNul { at: usize },
    /// A command other than WRITE carries data.
    UnexpectedData { msg_type: MsgType, len: usize },
    /// An answer type (`RESP_*`) was sent as a command.
    NotACommand(MsgType),
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::Path(e) => e.fmt(f),
            RequestError::EmptyPath => f.write_str("path is empty"),
            RequestError::NotAbsolute => f.write_str("path does not start with '/'"),
            RequestError::TrailingSlash => {
                f.write_str("path ends with '/', which only RM, WATCH, MULTIREAD and LIST take")
            }
            RequestError::ValueTooLong { len } => {
                write!(f, "value is {len} bytes, over QDB_MAX_DATA ({MAX_DATA})")
            }
            RequestError::ValueHasNul { at } => {
                write!(f, "value contains a NUL byte at byte {at}")
            }
            RequestError::UnexpectedData { msg_type, len } => {
                write!(f, "{msg_type} carries {len} bytes of data; it takes none")
            }
            RequestError::NotACommand(t) => write!(f, "{t} is an answer, not a command"),
        }
    }
}

impl std::error::Error for RequestError {}

/// Checks a key: a valid wire path, starting with `/`, not ending with `/` (READ, WRITE).
pub fn check_key(path: &str) -> Result<(), RequestError> {
    check_pattern(path)?;
    if path.ends_with('/') {
        return Err(RequestError::TrailingSlash);
    }
    Ok(())
}

/// Checks a key or subtree: a valid wire path starting with `/` (RM, WATCH, UNWATCH).
pub fn check_pattern(path: &str) -> Result<(), RequestError> {
    check_path(path.as_bytes()).map_err(RequestError::Path)?;
    if path.is_empty() {
        return Err(RequestError::EmptyPath);
    }
    if !path.starts_with('/') {
        return Err(RequestError::NotAbsolute);
    }
    Ok(())
}

/// Checks a MULTIREAD / LIST prefix: any valid wire path, the empty one included.
pub fn check_prefix(path: &str) -> Result<(), RequestError> {
    check_path(path.as_bytes()).map_err(RequestError::Path)
}

/// Checks a value to write: at most [`MAX_DATA`] bytes, no NUL.
pub fn check_value(value: &[u8]) -> Result<(), RequestError> {
    if value.len() > MAX_DATA {
        return Err(RequestError::ValueTooLong { len: value.len() });
    }
    if let Some(at) = value.iter().position(|&b| b == 0) {
        return Err(RequestError::ValueHasNul { at });
    }
    Ok(())
}

/// Whether a watch registered on `pattern` matches a modification of `path`.
pub fn watch_matches(pattern: &str, path: &str) -> bool {
    if pattern.ends_with('/') {
        path.starts_with(pattern)
    } else {
        path == pattern
    }
}

/// A `RESP_WATCH` to deliver: to which connection, and the modified path it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub conn: ConnId,
    pub path: String,
}

/// What one command produces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The answer, to the sender, in order.
    pub replies: Vec<Message>,
    /// `RESP_WATCH` messages to deliver after the answer.
    pub notifications: Vec<Notification>,
    /// Why the answer is `RESP_ERROR`, if it is.
    pub refused: Option<RequestError>,
}

impl Outcome {
    fn reply(message: Message) -> Outcome {
        Outcome {
            replies: vec![message],
            ..Outcome::default()
        }
    }

    fn refuse(path: &str, why: RequestError) -> Outcome {
        Outcome {
            replies: vec![Message::bare(MsgType::RespError, path)],
            notifications: Vec::new(),
            refused: Some(why),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Watch {
    conn: ConnId,
    pattern: String,
}

/// The database.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    entries: BTreeMap<String, Vec<u8>>,
    watches: Vec<Watch>,
}

impl Tree {
    pub fn new() -> Tree {
        Tree::default()
    }

    /// A tree holding `entries`, each checked as a WRITE would be; the first bad one is
    /// returned with its error.
    pub fn from_entries<I, K, V>(entries: I) -> Result<Tree, (String, RequestError)>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<Vec<u8>>,
    {
        let mut tree = Tree::new();
        for (k, v) in entries {
            let (k, v) = (k.into(), v.into());
            if let Err(e) = tree.write(&k, &v) {
                return Err((k, e));
            }
        }
        Ok(tree)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every entry, in path order.
    pub fn entries(&self) -> impl DoubleEndedIterator<Item = (&str, &[u8])> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// The value of `path`.
    pub fn read(&self, path: &str) -> Option<&[u8]> {
        self.entries.get(path).map(Vec::as_slice)
    }

    /// Sets `path` to `value`; returns the watch notifications.
    pub fn write(&mut self, path: &str, value: &[u8]) -> Result<Vec<Notification>, RequestError> {
        check_key(path)?;
        check_value(value)?;
        self.entries.insert(path.to_string(), value.to_vec());
        Ok(self.fire(path, &[path]))
    }

    /// Removes `path`, or every entry under it if it ends with `/`. Returns the removed paths
    /// (empty: nothing matched, nothing fired) and the watch notifications.
    pub fn remove(&mut self, path: &str) -> Result<(Vec<String>, Vec<Notification>), RequestError> {
        check_pattern(path)?;
        let removed: Vec<String> = if path.ends_with('/') {
            self.under(path).map(|(k, _)| k.to_string()).collect()
        } else if self.entries.contains_key(path) {
            vec![path.to_string()]
        } else {
            Vec::new()
        };
        if removed.is_empty() {
            return Ok((removed, Vec::new()));
        }
        for k in &removed {
            self.entries.remove(k);
        }
        let affected: Vec<&str> = removed.iter().map(String::as_str).collect();
        let notifications = self.fire(path, &affected);
        Ok((removed, notifications))
    }

    /// Entries whose path starts with `prefix` (string prefix, `/` or not), in path order.
    pub fn under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a [u8])> {
        self.entries
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// Registers a watch of `conn` on `pattern`.
    pub fn watch(&mut self, conn: ConnId, pattern: &str) -> Result<(), RequestError> {
        check_pattern(pattern)?;
        self.watches.push(Watch {
            conn,
            pattern: pattern.to_string(),
        });
        Ok(())
    }

    /// Removes one registration of `conn` on exactly `pattern`; false if there was none.
    pub fn unwatch(&mut self, conn: ConnId, pattern: &str) -> bool {
        match self
            .watches
            .iter()
            .position(|w| w.conn == conn && w.pattern == pattern)
        {
            Some(i) => {
                self.watches.remove(i);
                true
            }
            None => false,
        }
    }

    /// Number of watch registrations (all connections).
    pub fn watch_count(&self) -> usize {
        self.watches.len()
    }

    /// Forgets everything `conn` registered (it disconnected).
    pub fn disconnect(&mut self, conn: ConnId) {
        self.watches.retain(|w| w.conn != conn);
    }

    /// One notification with `path` per registration matching `path` or any `affected` path,
    /// in registration order.
    fn fire(&self, path: &str, affected: &[&str]) -> Vec<Notification> {
        self.watches
            .iter()
            .filter(|w| {
                watch_matches(&w.pattern, path)
                    || affected.iter().any(|a| watch_matches(&w.pattern, a))
            })
            .map(|w| Notification {
                conn: w.conn,
                path: path.to_string(),
            })
            .collect()
    }

    /// Executes one command from connection `conn`.
    pub fn handle(&mut self, conn: ConnId, msg: &Message) -> Outcome {
        let path = msg.path.as_str();
        if !msg.msg_type.is_command() {
            return Outcome::refuse(path, RequestError::NotACommand(msg.msg_type));
        }
        if msg.msg_type != MsgType::CmdWrite && !msg.data.is_empty() {
            let why = RequestError::UnexpectedData {
                msg_type: msg.msg_type,
                len: msg.data.len(),
            };
            return Outcome::refuse(path, why);
        }
        let result = match msg.msg_type {
            MsgType::CmdRead => self.handle_read(path),
            MsgType::CmdWrite => self.write(path, &msg.data).map(|notifications| Outcome {
                replies: vec![Message::bare(MsgType::RespOk, path)],
                notifications,
                refused: None,
            }),
            MsgType::CmdMultiread => self.handle_multiread(path),
            MsgType::CmdList => self.handle_list(path),
            MsgType::CmdRm => self.remove(path).map(|(removed, notifications)| {
                let answer = if removed.is_empty() {
                    MsgType::RespErrorNoent
                } else {
                    MsgType::RespOk
                };
                Outcome {
                    replies: vec![Message::bare(answer, path)],
                    notifications,
                    refused: None,
                }
            }),
            MsgType::CmdWatch => self
                .watch(conn, path)
                .map(|()| Outcome::reply(Message::bare(MsgType::RespOk, path))),
            MsgType::CmdUnwatch => check_pattern(path).map(|()| {
                let answer = if self.unwatch(conn, path) {
                    MsgType::RespOk
                } else {
                    MsgType::RespErrorNoent
                };
                Outcome::reply(Message::bare(answer, path))
            }),
            other => Err(RequestError::NotACommand(other)),
        };
        result.unwrap_or_else(|why| Outcome::refuse(path, why))
    }

    fn handle_read(&self, path: &str) -> Result<Outcome, RequestError> {
        check_key(path)?;
        Ok(Outcome::reply(match self.read(path) {
            Some(value) => Message::new(MsgType::RespRead, path, value.to_vec()),
            None => Message::bare(MsgType::RespErrorNoent, path),
        }))
    }

    fn handle_multiread(&self, prefix: &str) -> Result<Outcome, RequestError> {
        check_prefix(prefix)?;
        let entry = |(k, v): (&str, &[u8])| Message::new(MsgType::RespMultiread, k, v.to_vec());
        let mut replies: Vec<Message> = if prefix.is_empty() {
            // Upstream dumps the whole database backwards (its peer insertion-sorts).
            self.entries().rev().map(entry).collect()
        } else {
            self.under(prefix).map(entry).collect()
        };
        replies.push(Message::bare(MsgType::RespMultiread, ""));
        Ok(Outcome {
            replies,
            ..Outcome::default()
        })
    }

    fn handle_list(&self, prefix: &str) -> Result<Outcome, RequestError> {
        check_prefix(prefix)?;
        let mut replies: Vec<Message> = self
            .under(prefix)
            .map(|(k, _)| Message::bare(MsgType::RespList, k))
            .collect();
        replies.push(Message::bare(MsgType::RespList, ""));
        Ok(Outcome {
            replies,
            ..Outcome::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> Tree {
        Tree::from_entries([
            ("/a", "1"),
            ("/a/b", "2"),
            ("/a/c", "3"),
            ("/ab", "4"),
            ("/b", ""),
        ])
        .expect("valid entries")
    }

    fn paths(out: &Outcome) -> Vec<(MsgType, &str)> {
        out.replies
            .iter()
            .map(|m| (m.msg_type, m.path.as_str()))
            .collect()
    }

    #[test]
    fn multiread_is_a_string_prefix_and_the_dump_is_reversed() {
        let mut t = tree();
        let out = t.handle(1, &Message::bare(MsgType::CmdMultiread, "/a"));
        let got: Vec<&str> = out.replies.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(got, ["/a", "/a/b", "/a/c", "/ab", ""]);
        let out = t.handle(1, &Message::bare(MsgType::CmdMultiread, ""));
        let got: Vec<&str> = out.replies.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(got, ["/b", "/ab", "/a/c", "/a/b", "/a", ""]);
        assert_eq!(out.replies[0].data, b"");
        assert_eq!(out.replies[4].data, b"1");
    }

    #[test]
    fn rm_subtree_keeps_the_base_key() {
        let mut t = tree();
        let out = t.handle(1, &Message::bare(MsgType::CmdRm, "/a/"));
        assert_eq!(paths(&out), [(MsgType::RespOk, "/a/")]);
        let left: Vec<&str> = t.entries().map(|(k, _)| k).collect();
        assert_eq!(left, ["/a", "/ab", "/b"]);
        let out = t.handle(1, &Message::bare(MsgType::CmdRm, "/a/"));
        assert_eq!(paths(&out), [(MsgType::RespErrorNoent, "/a/")]);
    }

    #[test]
    fn watches_fire_once_per_registration() {
        let mut t = tree();
        t.watch(7, "/a/").expect("watch");
        t.watch(7, "/a/").expect("watch");
        t.watch(8, "/a/b").expect("watch");
        t.watch(9, "/a").expect("watch");
        let n = t.write("/a/b", b"x").expect("write");
        let got: Vec<ConnId> = n.iter().map(|n| n.conn).collect();
        assert_eq!(got, [7, 7, 8]);
        assert!(n.iter().all(|n| n.path == "/a/b"));
        let (_, n) = t.remove("/a/").expect("rm");
        let got: Vec<(ConnId, &str)> = n.iter().map(|n| (n.conn, n.path.as_str())).collect();
        assert_eq!(got, [(7, "/a/"), (7, "/a/"), (8, "/a/")]);
        assert!(t.unwatch(7, "/a/"));
        t.disconnect(7);
        assert_eq!(t.watch_count(), 2);
    }

    #[test]
    fn refusals_name_the_problem() {
        let mut t = tree();
        let out = t.handle(1, &Message::bare(MsgType::CmdRead, "/a/"));
        assert_eq!(paths(&out), [(MsgType::RespError, "/a/")]);
        assert_eq!(out.refused, Some(RequestError::TrailingSlash));
        let out = t.handle(1, &Message::new(MsgType::CmdWrite, "/x", b"a\0b".to_vec()));
        assert_eq!(out.refused, Some(RequestError::ValueHasNul { at: 1 }));
        let out = t.handle(1, &Message::new(MsgType::CmdRm, "/a", b"x".to_vec()));
        assert_eq!(
            out.refused.map(|e| e.to_string()).as_deref(),
            Some("CMD_RM carries 1 bytes of data; it takes none")
        );
        let out = t.handle(1, &Message::bare(MsgType::RespOk, "/a"));
        assert_eq!(
            out.refused,
            Some(RequestError::NotACommand(MsgType::RespOk))
        );
        assert_eq!(t, tree());
    }
}
