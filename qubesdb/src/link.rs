//! The link between a qube's QubesDB and dom0's: the messages the two daemons exchange over
//! their vchan (port 111), pure, bytes in and bytes out.
//!
//! Reference: qubes-core-qubesdb `daemon/db-cmds.c` (`verify_hdr` with `vchan` set,
//! `handle_vchan_data`, `handle_vchan_multiread_resp`, `request_full_db_sync`) and
//! mirage-qubes `lib/db.ml`. Upstream runs the same code at both ends; so does this module.
//!
//! The exchange:
//!
//! 1. When the vchan is up, the qube's daemon sends `CMD_MULTIREAD` with an empty path
//!    ([`Link::request_sync`]).
//! 2. dom0 answers with one `RESP_MULTIREAD` (path, value) per entry, then one with an empty
//!    path: the qube's database now equals dom0's ([`LinkEvent::Synced`]). A second
//!    `CMD_MULTIREAD` on one link is refused and ends the link, as upstream does.
//! 3. From then on each side sends the other every change its local clients make:
//!    `CMD_WRITE` (with the value) and `CMD_RM` (a trailing `/` removes a subtree), and the
//!    receiver applies it, fires its watches and answers `RESP_OK` (or `RESP_ERROR`).
//!
//! The link is trusted no more than a local client: the peer is dom0 in Qubes, but a qube's
//! daemon must not be crashed or confused by any bytes. What ends the link (upstream
//! disconnects the vchan; we return a [`LinkError`] and the caller closes it):
//!
//! - a header that does not decode (type, path, `data_len`);
//! - `data_len` of 3072 or more (the vchan limit is `>= QDB_MAX_DATA`, one byte stricter
//!   than the local socket's);
//! - a type not allowed on the link: `CMD_READ`, `CMD_LIST`, `CMD_WATCH`, `CMD_UNWATCH`,
//!   `RESP_ERROR_NOENT`, `RESP_READ`, `RESP_LIST`, `RESP_WATCH`;
//! - `RESP_MULTIREAD` that was not asked for, or that carries a value with a NUL;
//! - `CMD_RM` of something that does not exist (the databases have diverged);
//! - `RESP_ERROR` with data; a second `CMD_MULTIREAD`.
//!
//! What is answered with `RESP_ERROR` and survived: `CMD_WRITE` of a value holding a NUL or
//! of a path that is not a key, `CMD_RM` with data, `CMD_MULTIREAD` with data.

use std::fmt;

use crate::tree::{Notification, Tree};
use crate::wire::{Decoder, Message, MsgType, WireError, MAX_DATA};

/// What a message from the peer did to the local database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// The peer wrote `path`.
    Written(String),
    /// The peer removed `path` (a key, or a subtree ending in `/`).
    Removed(String),
    /// The initial copy of the peer's database is complete.
    Synced,
}

/// Why the link must be closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkError {
    /// The bytes do not decode as a QubesDB message.
    Wire(WireError),
    /// A message type the link does not carry.
    NotOnLink(MsgType),
    /// `data_len` at or over the link's limit.
    TooLong { path: String, len: usize },
    /// `RESP_MULTIREAD` when no sync was asked for.
    UnrequestedSync(String),
    /// A sync entry that cannot be stored (its value holds a NUL, or its path is no key).
    BadSyncEntry { path: String, why: String },
    /// `CMD_RM` of a path the local database does not have.
    RemovedMissing(String),
    /// `RESP_ERROR` carrying data.
    ErrorWithData(String),
    /// `CMD_MULTIREAD` after the peer already had its copy.
    SecondSync,
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::Wire(e) => write!(f, "malformed message from the peer: {e}"),
            LinkError::NotOnLink(t) => {
                write!(
                    f,
                    "the peer sent {t}, which the QubesDB link does not carry"
                )
            }
            LinkError::TooLong { path, len } => write!(
                f,
                "the peer sent {len} bytes for {path:?}; the link carries at most {}",
                MAX_DATA - 1
            ),
            LinkError::UnrequestedSync(p) => {
                write!(
                    f,
                    "the peer sent a database entry ({p:?}) no sync asked for"
                )
            }
            LinkError::BadSyncEntry { path, why } => {
                write!(
                    f,
                    "the peer's database entry {path:?} cannot be stored: {why}"
                )
            }
            LinkError::RemovedMissing(p) => write!(
                f,
                "the peer removed {p:?}, which this database does not have: the two have diverged"
            ),
            LinkError::ErrorWithData(p) => {
                write!(f, "the peer's RESP_ERROR for {p:?} carries data")
            }
            LinkError::SecondSync => {
                write!(
                    f,
                    "the peer asked for a second copy of the database on one link"
                )
            }
        }
    }
}

impl std::error::Error for LinkError {}

/// What [`Link::receive`] produced: changes made to the local database (with the watch
/// notifications to deliver to local clients), and messages refused but survived.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Received {
    pub events: Vec<LinkEvent>,
    pub notifications: Vec<Notification>,
    /// Messages answered with `RESP_ERROR`, each with why.
    pub refused: Vec<String>,
    /// `RESP_ERROR` answers the peer sent (to our forwarded changes), by path.
    pub peer_errors: Vec<String>,
}

/// One end of the link.
#[derive(Debug, Default)]
pub struct Link {
    decoder: Decoder,
    out: Vec<u8>,
    /// We sent `CMD_MULTIREAD` and the end marker has not come.
    sync_requested: bool,
    /// The peer has its copy of our database (it asked, we sent it).
    peer_synced: bool,
    /// Our copy of the peer's database is complete.
    synced: bool,
}

impl Link {
    pub fn new() -> Link {
        Link::default()
    }

    /// Asks the peer for its whole database (the qube's side, once the vchan is up).
    pub fn request_sync(&mut self) {
        self.queue(&Message::bare(MsgType::CmdMultiread, ""));
        self.sync_requested = true;
    }

    /// Whether our copy of the peer's database is complete.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// Whether changes made here are sent to the peer: once it has its copy (it asked), or
    /// once we asked for ours (the qube's side; upstream forwards from then on too).
    pub fn forwarding(&self) -> bool {
        self.peer_synced || self.sync_requested || self.synced
    }

    /// Sends a local client's write to the peer, if the link forwards.
    pub fn forward_write(&mut self, path: &str, value: &[u8]) {
        if self.forwarding() {
            self.queue(&Message::new(MsgType::CmdWrite, path, value));
        }
    }

    /// Sends a local client's removal to the peer, if the link forwards.
    pub fn forward_remove(&mut self, path: &str) {
        if self.forwarding() {
            self.queue(&Message::bare(MsgType::CmdRm, path));
        }
    }

    /// Bytes waiting to be sent to the peer; the caller sends them all.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Whether anything waits to be sent.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Feeds bytes from the peer and runs every whole message against `tree`. On an error
    /// the link must be closed; what came before it was applied (as upstream, message by
    /// message), and nothing after it is looked at.
    pub fn receive(&mut self, bytes: &[u8], tree: &mut Tree) -> Result<Received, LinkError> {
        self.decoder.feed(bytes);
        let mut got = Received::default();
        while let Some(msg) = self.decoder.next_message().map_err(LinkError::Wire)? {
            self.run(&msg, tree, &mut got)?;
        }
        Ok(got)
    }

    fn queue(&mut self, msg: &Message) {
        // Paths and values here come from the tree or were checked by it; a message that
        // does not encode is dropped rather than sent half-formed.
        let _ = msg.encode_into(&mut self.out);
    }

    fn answer(&mut self, t: MsgType, path: &str) {
        self.queue(&Message::bare(t, path));
    }

    fn run(&mut self, msg: &Message, tree: &mut Tree, got: &mut Received) -> Result<(), LinkError> {
        let path = msg.path.as_str();
        if msg.data.len() >= MAX_DATA {
            return Err(LinkError::TooLong {
                path: msg.path.clone(),
                len: msg.data.len(),
            });
        }
        match msg.msg_type {
            MsgType::CmdWrite => match tree.write(path, &msg.data) {
                Ok(n) => {
                    got.notifications.extend(n);
                    got.events.push(LinkEvent::Written(msg.path.clone()));
                    self.answer(MsgType::RespOk, path);
                }
                Err(why) => {
                    got.refused.push(format!("write {path:?}: {why}"));
                    self.answer(MsgType::RespError, path);
                }
            },
            MsgType::CmdRm => {
                if !msg.data.is_empty() {
                    got.refused
                        .push(format!("rm {path:?} with {} bytes of data", msg.data.len()));
                    self.answer(MsgType::RespError, path);
                    return Ok(());
                }
                match tree.remove(path) {
                    Ok((removed, _)) if removed.is_empty() => {
                        self.answer(MsgType::RespErrorNoent, path);
                        return Err(LinkError::RemovedMissing(msg.path.clone()));
                    }
                    Ok((_, n)) => {
                        got.notifications.extend(n);
                        got.events.push(LinkEvent::Removed(msg.path.clone()));
                        self.answer(MsgType::RespOk, path);
                    }
                    Err(why) => {
                        got.refused.push(format!("rm {path:?}: {why}"));
                        self.answer(MsgType::RespError, path);
                    }
                }
            }
            MsgType::CmdMultiread => {
                if self.peer_synced {
                    self.answer(MsgType::RespError, path);
                    return Err(LinkError::SecondSync);
                }
                if !msg.data.is_empty() {
                    got.refused.push(format!(
                        "multiread {path:?} with {} bytes of data",
                        msg.data.len()
                    ));
                    self.answer(MsgType::RespError, path);
                    return Ok(());
                }
                // The answer is the local daemon's MULTIREAD answer: entries (in reverse
                // order for the whole tree, as upstream sends it), then the empty end marker.
                let outcome = tree.handle(u64::MAX, msg);
                for reply in &outcome.replies {
                    self.queue(reply);
                }
                self.peer_synced = true;
            }
            MsgType::RespMultiread => {
                if !self.sync_requested {
                    return Err(LinkError::UnrequestedSync(msg.path.clone()));
                }
                if path.is_empty() {
                    self.sync_requested = false;
                    self.synced = true;
                    got.events.push(LinkEvent::Synced);
                    return Ok(());
                }
                let n = tree
                    .write(path, &msg.data)
                    .map_err(|why| LinkError::BadSyncEntry {
                        path: msg.path.clone(),
                        why: why.to_string(),
                    })?;
                got.notifications.extend(n);
                got.events.push(LinkEvent::Written(msg.path.clone()));
            }
            MsgType::RespOk => {}
            MsgType::RespError => {
                if !msg.data.is_empty() {
                    return Err(LinkError::ErrorWithData(msg.path.clone()));
                }
                got.peer_errors.push(msg.path.clone());
            }
            other => return Err(LinkError::NotOnLink(other)),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::encode;

    fn tree(entries: &[(&str, &str)]) -> Tree {
        Tree::from_entries(entries.iter().map(|(k, v)| (*k, v.as_bytes()))).expect("tree")
    }

    /// Runs both ends until neither has output; returns what each received.
    fn pump(a: &mut Link, ta: &mut Tree, b: &mut Link, tb: &mut Tree) -> (Received, Received) {
        let (mut ra, mut rb) = (Received::default(), Received::default());
        for _ in 0..16 {
            let to_b = a.take_output();
            let to_a = b.take_output();
            if to_a.is_empty() && to_b.is_empty() {
                break;
            }
            let gb = b.receive(&to_b, tb).expect("b receives");
            let ga = a.receive(&to_a, ta).expect("a receives");
            rb.events.extend(gb.events);
            ra.events.extend(ga.events);
        }
        (ra, rb)
    }

    #[test]
    fn sync_request_is_the_upstream_bytes() {
        let mut vm = Link::new();
        vm.request_sync();
        // type 2, 64 zero path bytes, 3 padding, data_len 0 (db-cmds.c request_full_db_sync).
        let mut want = vec![2u8];
        want.extend([0u8; 71]);
        assert_eq!(vm.take_output(), want);
    }

    #[test]
    fn the_qube_gets_dom0s_database_and_then_its_changes() {
        let mut dom0_tree = tree(&[
            ("/qubes-ip", "10.137.0.5"),
            ("/qubes-vm-type", "NetVM"),
            ("/name", "sys-firewall"),
        ]);
        let mut vm_tree = Tree::new();
        let (mut dom0, mut vm) = (Link::new(), Link::new());
        assert!(!vm.forwarding());
        vm.request_sync();
        let (_, got) = pump(&mut dom0, &mut dom0_tree, &mut vm, &mut vm_tree);
        assert!(vm.synced());
        assert_eq!(got.events.last(), Some(&LinkEvent::Synced));
        assert_eq!(
            vm_tree.entries().collect::<Vec<_>>(),
            dom0_tree.entries().collect::<Vec<_>>()
        );
        // dom0 changes a key and removes a subtree; the qube follows, and answers RESP_OK.
        dom0_tree
            .write("/qubes-firewall/10.137.0.9/0000", b"action=drop")
            .expect("w");
        vm_tree
            .write("/qubes-firewall/10.137.0.9/0000", b"action=drop")
            .expect("w");
        dom0.forward_write("/qubes-ip", b"10.137.0.6");
        dom0.forward_remove("/qubes-firewall/");
        let (back, got) = pump(&mut dom0, &mut dom0_tree, &mut vm, &mut vm_tree);
        assert_eq!(
            got.events,
            vec![
                LinkEvent::Written("/qubes-ip".into()),
                LinkEvent::Removed("/qubes-firewall/".into())
            ]
        );
        assert!(back.events.is_empty());
        assert_eq!(vm_tree.read("/qubes-ip"), Some(&b"10.137.0.6"[..]));
        assert!(vm_tree.under("/qubes-firewall/").next().is_none());
        // The qube's own write goes to dom0.
        vm.forward_write("/qubes-firewall-handled/10.137.0.9", b"1");
        let (back, _) = pump(&mut dom0, &mut dom0_tree, &mut vm, &mut vm_tree);
        assert_eq!(
            back.events,
            vec![LinkEvent::Written(
                "/qubes-firewall-handled/10.137.0.9".into()
            )]
        );
        assert_eq!(
            dom0_tree.read("/qubes-firewall-handled/10.137.0.9"),
            Some(&b"1"[..])
        );
    }

    #[test]
    fn the_answers_are_the_upstream_messages() {
        let mut t = tree(&[("/a", "1")]);
        let mut link = Link::new();
        let got = link
            .receive(&encode(MsgType::CmdWrite, "/b", b"2").expect("enc"), &mut t)
            .expect("write");
        assert_eq!(got.events, vec![LinkEvent::Written("/b".into())]);
        let mut want = encode(MsgType::RespOk, "/b", b"").expect("enc");
        // A NUL in a value is answered RESP_ERROR and the link survives (handle_write).
        link.receive(
            &encode(MsgType::CmdWrite, "/c", b"x\0y").expect("enc"),
            &mut t,
        )
        .expect("survives");
        want.extend(encode(MsgType::RespError, "/c", b"").expect("enc"));
        assert_eq!(link.take_output(), want);
        assert_eq!(t.read("/c"), None);
    }

    #[test]
    fn what_ends_the_link() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (encode(MsgType::CmdRead, "/a", b"").expect("e"), "READ"),
            (encode(MsgType::CmdWatch, "/a", b"").expect("e"), "WATCH"),
            (
                encode(MsgType::RespWatch, "/a", b"").expect("e"),
                "RESP_WATCH",
            ),
            (
                encode(MsgType::RespErrorNoent, "/a", b"").expect("e"),
                "NOENT",
            ),
            (
                encode(MsgType::RespMultiread, "/a", b"1").expect("e"),
                "unrequested",
            ),
            (
                encode(MsgType::CmdRm, "/missing", b"").expect("e"),
                "rm missing",
            ),
            (
                encode(MsgType::RespError, "/a", b"x").expect("e"),
                "error with data",
            ),
            (
                encode(MsgType::CmdWrite, "/a", &[b'x'; MAX_DATA]).expect("e"),
                "3072 bytes",
            ),
            (vec![99u8; 72], "bad type"),
        ];
        for (bytes, what) in cases {
            let mut t = tree(&[("/a", "1")]);
            let before = t.clone();
            let mut link = Link::new();
            let r = link.receive(&bytes, &mut t);
            assert!(r.is_err(), "{what}: the link survived: {r:?}");
            assert_eq!(t, before, "{what}: the database changed");
        }
        // A second MULTIREAD on one link.
        let mut t = tree(&[("/a", "1")]);
        let mut link = Link::new();
        let m = encode(MsgType::CmdMultiread, "", b"").expect("e");
        link.receive(&m, &mut t).expect("first");
        assert_eq!(link.receive(&m, &mut t), Err(LinkError::SecondSync));
    }

    #[test]
    fn messages_split_anywhere_are_the_same_messages() {
        let mut bytes = Vec::new();
        for i in 0..20 {
            bytes.extend(
                encode(
                    MsgType::CmdWrite,
                    &format!("/k{i}"),
                    format!("v{i}").as_bytes(),
                )
                .expect("e"),
            );
        }
        for step in [1usize, 7, 71, 72, 73, 500] {
            let mut t = Tree::new();
            let mut link = Link::new();
            let mut events = 0;
            for chunk in bytes.chunks(step) {
                events += link.receive(chunk, &mut t).expect("receive").events.len();
            }
            assert_eq!(events, 20, "chunks of {step}");
            assert_eq!(t.len(), 20);
        }
    }

    #[test]
    fn seeded_garbage_never_panics_and_never_writes_bad_entries() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2000 {
            let mut t = tree(&[("/a", "1"), ("/b/c", "2")]);
            let mut link = Link::new();
            if next() % 2 == 0 {
                link.request_sync();
            }
            let mut msg = encode(
                MsgType::ALL[(next() % 14) as usize],
                ["/a", "/b/", "", "/b/c", "/new"][(next() % 5) as usize],
                &vec![b'v'; (next() % 8) as usize],
            )
            .expect("e");
            // Flip a few bytes anywhere, header included.
            for _ in 0..(next() % 4) {
                let i = (next() as usize) % msg.len();
                msg[i] = next() as u8;
            }
            let _ = link.receive(&msg, &mut t);
            for (k, v) in t.entries() {
                assert!(crate::tree::check_key(k).is_ok(), "bad key {k:?}");
                assert!(!v.contains(&0), "NUL in {k:?}");
            }
        }
    }
}
