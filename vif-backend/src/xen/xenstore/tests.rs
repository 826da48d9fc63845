//! The server and the client together, over real Unix sockets in a temporary directory.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::client::Client;
use super::server::{Limits, Server};
use super::{Access, Errno, Perm, Store, StoreError, Tx, WatchEvent};
use crate::xen::xs_wire::{
    nul_strings, single_string, Decoder, Header, Message, MsgType, HEADER_LEN, XENSTORE_PAYLOAD_MAX,
};
use crate::xen::DomId;

const WAIT: Duration = Duration::from_secs(5);

/// A server in a temporary directory. The server is declared first so that it is dropped
/// (and stopped) before the directory with its sockets goes.
struct Env {
    server: Server,
    _dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env::with_limits(Limits::default())
    }

    fn with_limits(limits: Limits) -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = Server::start_with_limits(dir.path().join("xs"), limits).expect("server");
        Env { server, _dir: dir }
    }

    fn client(&self, domid: DomId) -> Client<UnixStream> {
        let path = self.server.add_domain(domid).expect("domain socket");
        Client::connect(path).expect("connect")
    }

    /// What a toolstack does for a new domain: its home, owned by it, readable by no one
    /// else.
    fn home(&self, dom0: &mut Client<UnixStream>, domid: DomId) {
        let home = format!("/local/domain/{domid}");
        dom0.mkdir(Tx::NONE, &home).expect("mkdir home");
        dom0.set_perms(Tx::NONE, &home, &[Perm::new(Access::None, domid)])
            .expect("own home");
    }
}

fn errno(r: Result<impl std::fmt::Debug, StoreError>) -> Errno {
    match r {
        Err(e) => e.errno().unwrap_or_else(|| panic!("not an xs error: {e}")),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

fn ev(path: &str, token: &str) -> WatchEvent {
    WatchEvent {
        path: path.into(),
        token: token.into(),
    }
}

fn next(c: &mut Client<UnixStream>) -> Option<WatchEvent> {
    c.wait_event(WAIT).expect("event wait")
}

/// No event arrives within a short while (for "this must not fire").
fn quiet(c: &mut Client<UnixStream>) -> Option<WatchEvent> {
    c.wait_event(Duration::from_millis(150))
        .expect("event wait")
}

#[test]
fn write_read_directory_rm_and_parents() {
    let env = Env::new();
    let mut c = env.client(0);
    c.write(Tx::NONE, "/a/b/c", b"hello").expect("write");
    assert_eq!(c.read(Tx::NONE, "/a/b/c").expect("read"), b"hello");
    assert_eq!(c.read(Tx::NONE, "/a/b").expect("parent made"), b"");
    c.write(Tx::NONE, "/a/b/d", &[0, 1, 255])
        .expect("binary value");
    assert_eq!(c.read(Tx::NONE, "/a/b/d").expect("read"), [0, 1, 255]);
    assert_eq!(c.directory(Tx::NONE, "/a/b").expect("dir"), ["c", "d"]);
    assert_eq!(c.directory(Tx::NONE, "/").expect("root"), ["a"]);

    c.write(Tx::NONE, "/a/b", b"x")
        .expect("value on a node with children");
    c.mkdir(Tx::NONE, "/a/b")
        .expect("mkdir of an existing node");
    assert_eq!(
        c.read(Tx::NONE, "/a/b").expect("kept"),
        b"x",
        "mkdir keeps the value"
    );
    c.mkdir(Tx::NONE, "/m/n").expect("mkdir makes parents");
    assert!(c.exists(Tx::NONE, "/m").expect("exists"));

    c.rm(Tx::NONE, "/a/b").expect("rm subtree");
    assert_eq!(errno(c.read(Tx::NONE, "/a/b/c")), Errno::ENOENT);
    assert!(c.directory(Tx::NONE, "/a").expect("dir").is_empty());
    c.rm(Tx::NONE, "/a/gone")
        .expect("rm of a missing node under an existing one");
    assert_eq!(errno(c.rm(Tx::NONE, "/nope/gone")), Errno::ENOENT);
    assert_eq!(errno(c.rm(Tx::NONE, "/")), Errno::EINVAL);
    assert_eq!(errno(c.directory(Tx::NONE, "/nope")), Errno::ENOENT);
    for bad in ["/a/", "/a//b", "/a b", ""] {
        assert_eq!(errno(c.write(Tx::NONE, bad, b"")), Errno::EINVAL, "{bad:?}");
    }
    assert_eq!(
        c.get_domain_path(7).expect("domain path"),
        "/local/domain/7"
    );
}

#[test]
fn the_error_says_what_and_where() {
    let env = Env::new();
    let mut c = env.client(0);
    let e = c
        .read(Tx::NONE, "/local/domain/0/name")
        .expect_err("missing");
    let text = e.to_string();
    assert!(
        text.contains("ENOENT") && text.contains("/local/domain/0/name"),
        "{text}"
    );
    assert!(e.is_not_found());
}

#[test]
fn relative_paths_are_below_the_domain_home() {
    let env = Env::new();
    let mut dom0 = env.client(0);
    env.home(&mut dom0, 5);
    let mut d5 = env.client(5);
    d5.write(Tx::NONE, "device/vif/0/state", b"1")
        .expect("relative write");
    assert_eq!(
        dom0.read_string(Tx::NONE, "/local/domain/5/device/vif/0/state")
            .expect("read"),
        "1"
    );
    d5.watch("device", "rel").expect("relative watch");
    assert_eq!(next(&mut d5), Some(ev("device", "rel")));
    dom0.write(Tx::NONE, "/local/domain/5/device/vif/0/state", b"4")
        .expect("write");
    assert_eq!(
        next(&mut d5),
        Some(ev("device/vif/0/state", "rel")),
        "reported relative"
    );
}

#[test]
fn watches_fire_at_once_on_changes_below_and_stop_on_unwatch() {
    let env = Env::new();
    let mut a = env.client(0);
    let mut b = env.client(0);
    a.watch("/backend/vif", "tok-1").expect("watch");
    assert_eq!(
        next(&mut a),
        Some(ev("/backend/vif", "tok-1")),
        "fires once when set"
    );
    assert_eq!(a.next_event().expect("poll"), None);

    b.write(Tx::NONE, "/backend/vif", b"")
        .expect("write of the path itself");
    assert_eq!(next(&mut a), Some(ev("/backend/vif", "tok-1")));
    b.write(Tx::NONE, "/backend/vif/5/0/state", b"2")
        .expect("write below");
    assert_eq!(next(&mut a), Some(ev("/backend/vif/5/0/state", "tok-1")));
    b.rm(Tx::NONE, "/backend/vif/5/0/state").expect("rm below");
    assert_eq!(next(&mut a), Some(ev("/backend/vif/5/0/state", "tok-1")));
    b.mkdir(Tx::NONE, "/backend/vif/5/0/state")
        .expect("mkdir below");
    assert_eq!(next(&mut a), Some(ev("/backend/vif/5/0/state", "tok-1")));
    b.set_perms(Tx::NONE, "/backend/vif/5", &[Perm::new(Access::Read, 0)])
        .expect("set perms below");
    assert_eq!(next(&mut a), Some(ev("/backend/vif/5", "tok-1")));
    assert_eq!(quiet(&mut a), None, "one event per change");
    b.write(Tx::NONE, "/backend/vif-other", b"x")
        .expect("a sibling by prefix only");
    assert_eq!(
        quiet(&mut a),
        None,
        "/backend/vif-other is not below /backend/vif"
    );

    // Two watches on one path with different tokens each fire.
    a.watch("/backend/vif/5", "tok-2").expect("second watch");
    assert_eq!(next(&mut a), Some(ev("/backend/vif/5", "tok-2")));
    assert_eq!(errno(a.watch("/backend/vif/5", "tok-2")), Errno::EEXIST);
    b.write(Tx::NONE, "/backend/vif/5/0/state", b"4")
        .expect("write");
    let mut got = vec![next(&mut a), next(&mut a)];
    got.sort_by(|x, y| {
        x.as_ref()
            .map(|e| &e.token)
            .cmp(&y.as_ref().map(|e| &e.token))
    });
    assert_eq!(
        got,
        [
            Some(ev("/backend/vif/5/0/state", "tok-1")),
            Some(ev("/backend/vif/5/0/state", "tok-2"))
        ]
    );

    // Removing a node above a watch reports the watched path.
    b.rm(Tx::NONE, "/backend").expect("rm above");
    let mut got = vec![next(&mut a), next(&mut a)];
    got.sort_by(|x, y| {
        x.as_ref()
            .map(|e| &e.token)
            .cmp(&y.as_ref().map(|e| &e.token))
    });
    assert_eq!(
        got,
        [
            Some(ev("/backend/vif", "tok-1")),
            Some(ev("/backend/vif/5", "tok-2"))
        ]
    );

    a.unwatch("/backend/vif", "tok-1").expect("unwatch");
    a.unwatch("/backend/vif/5", "tok-2").expect("unwatch");
    assert_eq!(errno(a.unwatch("/backend/vif", "tok-1")), Errno::ENOENT);
    b.write(Tx::NONE, "/backend/vif/5/0/state", b"5")
        .expect("write");
    assert_eq!(quiet(&mut a), None, "no events after unwatch");
    assert_eq!(
        quiet(&mut b),
        None,
        "events go only to the watcher's connection"
    );
}

#[test]
fn events_arriving_during_a_request_are_queued_not_lost() {
    let env = Env::new();
    let mut a = env.client(0);
    let mut b = env.client(0);
    a.watch("/w", "t").expect("watch");
    assert_eq!(next(&mut a), Some(ev("/w", "t")));
    b.write(Tx::NONE, "/w/x", b"1").expect("write");
    b.write(Tx::NONE, "/w/y", b"2").expect("write");
    // The events are on a's socket before the reply to this read.
    assert_eq!(a.read(Tx::NONE, "/w/x").expect("read"), b"1");
    assert_eq!(
        a.queued_events(),
        2,
        "both events were read while waiting for the reply"
    );
    assert_eq!(a.next_event().expect("poll"), Some(ev("/w/x", "t")));
    assert_eq!(a.next_event().expect("poll"), Some(ev("/w/y", "t")));
    assert_eq!(a.next_event().expect("poll"), None);
}

#[test]
fn transactions_commit_atomically_and_abort_discards() {
    let env = Env::new();
    let mut a = env.client(0);
    let mut b = env.client(0);
    b.watch("/dev", "w").expect("watch");
    assert_eq!(next(&mut b), Some(ev("/dev", "w")));

    let tx = a.transaction_start().expect("start");
    assert_ne!(tx, Tx::NONE);
    a.write(tx, "/dev/ring-ref", b"8").expect("tx write");
    a.write(tx, "/dev/event-channel", b"9").expect("tx write");
    assert_eq!(
        a.read(tx, "/dev/ring-ref").expect("own write visible"),
        b"8"
    );
    assert_eq!(
        errno(b.read(Tx::NONE, "/dev/ring-ref")),
        Errno::ENOENT,
        "not before commit"
    );
    assert_eq!(quiet(&mut b), None, "no events before commit");
    a.transaction_end(tx, true).expect("commit");
    assert_eq!(
        b.read(Tx::NONE, "/dev/ring-ref").expect("after commit"),
        b"8"
    );
    assert_eq!(
        b.read(Tx::NONE, "/dev/event-channel")
            .expect("after commit"),
        b"9"
    );
    let mut got = vec![next(&mut b), next(&mut b)];
    got.sort_by(|x, y| {
        x.as_ref()
            .map(|e| &e.path)
            .cmp(&y.as_ref().map(|e| &e.path))
    });
    assert_eq!(
        got,
        [
            Some(ev("/dev/event-channel", "w")),
            Some(ev("/dev/ring-ref", "w"))
        ]
    );

    let tx = a.transaction_start().expect("start");
    a.write(tx, "/dev/ring-ref", b"100").expect("tx write");
    a.rm(tx, "/dev/event-channel").expect("tx rm");
    a.transaction_end(tx, false).expect("abort");
    assert_eq!(b.read(Tx::NONE, "/dev/ring-ref").expect("kept"), b"8");
    assert!(b.exists(Tx::NONE, "/dev/event-channel").expect("kept"));
    assert_eq!(
        errno(a.transaction_end(tx, true)),
        Errno::ENOENT,
        "ended is gone"
    );
    assert_eq!(errno(a.read(Tx(9999), "/dev")), Errno::ENOENT, "unknown tx");
}

#[test]
fn a_transaction_sees_a_snapshot_and_a_conflict_is_eagain() {
    let env = Env::new();
    let mut a = env.client(0);
    let mut b = env.client(0);
    a.write(Tx::NONE, "/counter", b"0").expect("init");

    let tx = a.transaction_start().expect("start");
    assert_eq!(a.read(tx, "/counter").expect("read"), b"0");
    b.write(Tx::NONE, "/counter", b"5")
        .expect("intervening write");
    assert_eq!(
        a.read(tx, "/counter").expect("snapshot"),
        b"0",
        "the snapshot holds"
    );
    a.write(tx, "/counter", b"1").expect("tx write");
    let e = a.transaction_end(tx, true).expect_err("conflict");
    assert!(e.is_conflict(), "{e}");
    assert_eq!(e.errno(), Some(Errno::EAGAIN));
    assert_eq!(
        b.read(Tx::NONE, "/counter").expect("read"),
        b"5",
        "nothing applied"
    );

    // A change elsewhere is no conflict.
    let tx = a.transaction_start().expect("start");
    a.write(tx, "/counter", b"6").expect("tx write");
    b.write(Tx::NONE, "/unrelated", b"x").expect("other write");
    a.transaction_end(tx, true).expect("commits");
    assert_eq!(b.read(Tx::NONE, "/counter").expect("read"), b"6");

    // Two transactions creating the same node: the second to commit loses, and none of
    // its other changes land either.
    let t1 = a.transaction_start().expect("start");
    let t2 = b.transaction_start().expect("start");
    assert_ne!(t1, t2);
    a.write(t1, "/new/node", b"a").expect("write");
    b.write(t2, "/new/node", b"b").expect("write");
    b.write(t2, "/elsewhere", b"b").expect("write");
    b.rm(t2, "/unrelated").expect("rm");
    a.transaction_end(t1, true).expect("first commits");
    assert!(b
        .transaction_end(t2, true)
        .expect_err("second")
        .is_conflict());
    assert_eq!(a.read(Tx::NONE, "/new/node").expect("read"), b"a");
    assert_eq!(
        errno(a.read(Tx::NONE, "/elsewhere")),
        Errno::ENOENT,
        "all or nothing"
    );
    assert!(
        a.exists(Tx::NONE, "/unrelated").expect("exists"),
        "all or nothing"
    );
    assert_eq!(
        errno(b.transaction_end(t2, false)),
        Errno::ENOENT,
        "a failed end ends it"
    );

    // A transaction that only reads conflicts too when what it read changed: its view
    // was not a consistent one.
    let t = a.transaction_start().expect("start");
    assert!(a
        .directory(t, "/new")
        .expect("dir")
        .contains(&"node".to_owned()));
    b.write(Tx::NONE, "/new/other", b"x")
        .expect("a new child changes the directory");
    assert!(a
        .transaction_end(t, true)
        .expect_err("stale directory")
        .is_conflict());

    // Someone else's transaction cannot be used.
    let t = a.transaction_start().expect("start");
    assert_eq!(errno(b.read(t, "/new/node")), Errno::ENOENT);
    assert_eq!(errno(b.transaction_end(t, true)), Errno::ENOENT);
    a.transaction_end(t, true).expect("still a's");
}

#[test]
fn concurrent_increments_under_retry_lose_nothing() {
    let env = Env::new();
    let mut init = env.client(0);
    init.write(Tx::NONE, "/count", b"0").expect("init");
    let path = env.server.add_domain(0).expect("socket");
    let rounds = 40;
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&path).expect("connect");
                let mut conflicts = 0usize;
                for _ in 0..rounds {
                    // Store::transaction gives up after TRANSACTION_ATTEMPTS conflicts in a
                    // row, which three tight loops on two cores can reach by bad luck; the
                    // point here is that no increment is lost, so keep going.
                    loop {
                        let r = c.transaction(|c, tx| {
                            let n: u32 = c.read_string(tx, "/count")?.parse().expect("number");
                            c.write(tx, "/count", (n + 1).to_string().as_bytes())
                        });
                        match r {
                            Ok(()) => break,
                            Err(e) if e.is_conflict() => conflicts += 1,
                            Err(e) => panic!("increment failed: {e}"),
                        }
                        assert!(conflicts < 10_000, "livelock");
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    assert_eq!(init.read_string(Tx::NONE, "/count").expect("read"), "120");
}

#[test]
fn permissions_are_enforced() {
    let env = Env::new();
    let mut dom0 = env.client(0);
    env.home(&mut dom0, 5);
    env.home(&mut dom0, 7);
    let mut d5 = env.client(5);

    dom0.write(Tx::NONE, "/secret", b"s").expect("write");
    dom0.set_perms(Tx::NONE, "/secret", &[Perm::new(Access::None, 0)])
        .expect("n0");
    assert_eq!(errno(d5.read(Tx::NONE, "/secret")), Errno::EACCES);
    assert_eq!(errno(d5.directory(Tx::NONE, "/secret")), Errno::EACCES);
    assert_eq!(errno(d5.get_perms(Tx::NONE, "/secret")), Errno::EACCES);
    assert_eq!(
        dom0.read(Tx::NONE, "/secret").expect("dom0 reads anything"),
        b"s"
    );
    let mut other_dom0 = env.client(0);
    assert_eq!(
        other_dom0
            .read(Tx::NONE, "/secret")
            .expect("any dom0 connection"),
        b"s"
    );
    assert_eq!(
        errno(d5.read(Tx::NONE, "/secret/below")),
        Errno::EACCES,
        "no leak"
    );
    dom0.set_perms(
        Tx::NONE,
        "/secret",
        &[Perm::new(Access::None, 0), Perm::new(Access::Read, 5)],
    )
    .expect("n0 r5");
    assert_eq!(d5.read(Tx::NONE, "/secret").expect("readable now"), b"s");
    assert_eq!(
        errno(d5.write(Tx::NONE, "/secret", b"x")),
        Errno::EACCES,
        "read only"
    );
    assert_eq!(errno(d5.rm(Tx::NONE, "/secret")), Errno::EACCES);

    // Another domain's home is closed; its own is open, and what it makes is its own.
    assert_eq!(
        errno(d5.write(Tx::NONE, "/local/domain/7/x", b"1")),
        Errno::EACCES
    );
    assert_eq!(errno(d5.read(Tx::NONE, "/local/domain/7")), Errno::EACCES);
    d5.write(Tx::NONE, "/local/domain/5/data/x", b"1")
        .expect("own home");
    assert_eq!(
        d5.get_perms(Tx::NONE, "/local/domain/5/data/x")
            .expect("perms"),
        [Perm::new(Access::None, 5)]
    );
    assert_eq!(
        errno(d5.write(Tx::NONE, "/top", b"1")),
        Errno::EACCES,
        "/ is n0"
    );

    // The owner changes the permissions, but only dom0 changes the owner.
    d5.set_perms(
        Tx::NONE,
        "/local/domain/5/data/x",
        &[Perm::new(Access::None, 5), Perm::new(Access::Read, 7)],
    )
    .expect("owner sets perms");
    assert_eq!(
        errno(d5.set_perms(
            Tx::NONE,
            "/local/domain/5/data/x",
            &[Perm::new(Access::None, 7)]
        )),
        Errno::EPERM
    );
    assert_eq!(
        errno(d5.set_perms(Tx::NONE, "/secret", &[Perm::new(Access::Both, 5)])),
        Errno::EACCES,
        "not the owner"
    );
    let mut d7 = env.client(7);
    assert_eq!(
        d7.read(Tx::NONE, "/local/domain/5/data/x").expect("r7"),
        b"1"
    );

    // Watch events are only for what the watcher may read.
    d5.watch("/secret", "s").expect("watch");
    assert_eq!(next(&mut d5), Some(ev("/secret", "s")));
    d5.watch("/local/domain/7", "other").expect("watch");
    assert_eq!(next(&mut d5), Some(ev("/local/domain/7", "other")));
    dom0.write(Tx::NONE, "/local/domain/7/private", b"p")
        .expect("write");
    dom0.write(Tx::NONE, "/secret", b"t").expect("write");
    assert_eq!(next(&mut d5), Some(ev("/secret", "s")));
    assert_eq!(quiet(&mut d5), None, "nothing from dom7's closed home");
}

#[test]
fn quotas_refuse_instead_of_growing() {
    let env = Env::with_limits(Limits {
        watches_per_connection: 3,
        transactions_per_connection: 2,
        nodes_per_transaction: 4,
        nodes_per_domain: 5,
        ..Limits::default()
    });
    let mut dom0 = env.client(0);
    env.home(&mut dom0, 5);
    let mut d5 = env.client(5);
    for i in 0..3 {
        d5.watch(&format!("/w{i}"), "t").expect("within quota");
        assert!(next(&mut d5).is_some());
    }
    assert_eq!(errno(d5.watch("/w3", "t")), Errno::E2BIG);

    let t1 = d5.transaction_start().expect("1");
    let _t2 = d5.transaction_start().expect("2");
    assert_eq!(errno(d5.transaction_start()), Errno::ENOSPC);
    d5.transaction_end(t1, false).expect("abort frees a slot");
    let t3 = d5.transaction_start().expect("again");
    let mut last = Ok(());
    for i in 0..20 {
        last = d5.write(t3, &format!("/local/domain/5/t{i}"), b"x");
        if last.is_err() {
            break;
        }
    }
    assert_eq!(errno(last), Errno::ENOSPC, "nodes per transaction");

    // dom5 owns its home already (1 node); 4 more fit.
    d5.write(Tx::NONE, "/local/domain/5/a/b/c", b"x")
        .expect("3 nodes");
    d5.write(Tx::NONE, "/local/domain/5/d", b"x")
        .expect("1 node");
    assert_eq!(
        errno(d5.write(Tx::NONE, "/local/domain/5/e", b"x")),
        Errno::ENOSPC
    );
    d5.rm(Tx::NONE, "/local/domain/5/a")
        .expect("rm frees quota");
    d5.write(Tx::NONE, "/local/domain/5/e", b"x")
        .expect("fits again");
    dom0.write(Tx::NONE, "/big/1/2/3/4/5/6/7", b"x")
        .expect("dom0 has no quota");
}

/// Sends raw bytes on a fresh connection and returns what came back (until close or a
/// whole reply).
fn raw_exchange(env: &Env, bytes: &[u8]) -> (UnixStream, Decoder) {
    let path = env.server.add_domain(0).expect("socket");
    let mut s = UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    s.write_all(bytes).expect("send");
    (s, Decoder::new())
}

fn raw_reply(s: &mut UnixStream, d: &mut Decoder) -> Option<Message> {
    let mut buf = [0u8; 512];
    loop {
        if let Some(m) = d.next_message().expect("server framing") {
            return Some(m);
        }
        match s.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => d.feed(&buf[..n]),
            Err(e) => panic!("no reply and no close: {e}"),
        }
    }
}

#[test]
fn bad_payloads_get_einval_and_unknown_types_enosys() {
    let env = Env::new();
    let cases: [(u32, &[u8], &str); 5] = [
        (MsgType::Write as u32, b"/no-nul-anywhere", "EINVAL"),
        (MsgType::Read as u32, b"/\xff\xfe\0", "EINVAL"),
        (MsgType::Watch as u32, b"/only-path\0", "EINVAL"),
        (20, b"", "ENOSYS"),
        (MsgType::WatchEvent as u32, b"/a\0t\0", "EINVAL"),
    ];
    for (t, payload, want) in cases {
        let m = Message {
            msg_type: t,
            req_id: 42,
            tx_id: 0,
            payload: payload.to_vec(),
        };
        let (mut s, mut d) = raw_exchange(&env, &m.encode().expect("small"));
        let r = raw_reply(&mut s, &mut d).expect("a reply");
        assert_eq!(r.kind(), Some(MsgType::Error), "type {t}");
        assert_eq!(r.req_id, 42);
        assert_eq!(r.payload, nul_strings(&[want]), "type {t}");
    }
}

#[test]
fn a_malformed_header_closes_only_that_connection() {
    let env = Env::new();
    let mut good = env.client(0);
    good.watch("/g", "t").expect("watch");
    assert!(next(&mut good).is_some());
    let h = Header {
        msg_type: MsgType::Write as u32,
        req_id: 1,
        tx_id: 0,
        len: 5000,
    };
    let (mut s, mut d) = raw_exchange(&env, &h.to_bytes());
    assert_eq!(raw_reply(&mut s, &mut d), None, "closed without a reply");
    good.write(Tx::NONE, "/g/x", b"1")
        .expect("others unaffected");
    assert_eq!(next(&mut good), Some(ev("/g/x", "t")));

    // A request spelt out byte by byte from xs_wire.h gets its reply.
    let mut req = vec![2, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0];
    req.extend_from_slice(b"/g/x\0");
    assert_eq!(req.len(), HEADER_LEN + 5);
    let (mut s, mut d) = raw_exchange(&env, &req);
    let r = raw_reply(&mut s, &mut d).expect("reply");
    assert_eq!(
        (r.kind(), r.req_id, r.payload.as_slice()),
        (Some(MsgType::Read), 7, &b"1"[..])
    );
}

#[test]
fn dropping_the_server_ends_its_connections_and_removes_sockets() {
    let env = Env::new();
    let mut c = env.client(3);
    let path = env.server.socket_path(3);
    assert!(path.exists());
    let Env { server, _dir } = env;
    drop(server);
    assert!(!path.exists(), "socket removed");
    let e = c.read(Tx::NONE, "/x").expect_err("server gone");
    assert!(matches!(e, StoreError::Io { .. }), "{e}");
}

#[test]
fn introduce_domain_watch_and_is_introduced() {
    let env = Env::new();
    let mut dom0 = env.client(0);
    dom0.watch("@introduceDomain", "intro")
        .expect("special watch");
    assert_eq!(next(&mut dom0), Some(ev("@introduceDomain", "intro")));
    env.server.add_domain(9).expect("add");
    assert_eq!(next(&mut dom0), Some(ev("@introduceDomain", "intro")));
}

/// A fresh raw connection as `domid`.
fn raw(env: &Env, domid: DomId) -> UnixStream {
    let path = env.server.add_domain(domid).expect("socket");
    let s = UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    s
}

/// Everything the server sends until it closes the connection, as messages.
fn read_to_end(s: &mut UnixStream) -> Vec<Message> {
    let mut d = Decoder::new();
    let mut buf = [0u8; 4096];
    let mut out = Vec::new();
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => d.feed(&buf[..n]),
            Err(e) => panic!("the server neither replied nor closed: {e}"),
        }
        while let Some(m) = d.next_message().expect("the server's framing is valid") {
            out.push(m);
        }
    }
    assert_eq!(d.buffered(), 0, "no partial message at the end");
    out
}

#[test]
fn replies_are_byte_exact() {
    let env = Env::new();
    let mut s = raw(&env, 0);
    // Each request written out by hand from xs_wire.h: type, req_id, tx_id, len (each a
    // little-endian uint32_t), then the payload.
    let mut req = Vec::new();
    // XS_WRITE (11), req_id 1, "/x\0" "v"
    req.extend_from_slice(&[
        11, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, b'/', b'x', 0, b'v',
    ]);
    // XS_READ (2), req_id 2, "/x\0"
    req.extend_from_slice(&[
        2, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, b'/', b'x', 0,
    ]);
    // XS_READ (2), req_id 0x01020304, tx_id 0, "/y\0": missing
    req.extend_from_slice(&[
        2, 0, 0, 0, 4, 3, 2, 1, 0, 0, 0, 0, 3, 0, 0, 0, b'/', b'y', 0,
    ]);
    // XS_WATCH (4), req_id 5, "/x\0tk\0"
    req.extend_from_slice(&[4, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0]);
    req.extend_from_slice(b"/x\0tk\0");
    // XS_DIRECTORY (1), req_id 6, "/\0"
    req.extend_from_slice(&[1, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, b'/', 0]);
    // XS_READ (2), req_id 7, tx_id 77 (no such transaction)
    req.extend_from_slice(&[
        2, 0, 0, 0, 7, 0, 0, 0, 77, 0, 0, 0, 3, 0, 0, 0, b'/', b'x', 0,
    ]);
    // Type 20 (XS_RESTRICT, removed), req_id 8, no payload
    req.extend_from_slice(&[20, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    s.write_all(&req).expect("send");
    s.shutdown(std::net::Shutdown::Write).expect("half-close");

    let mut want: Vec<u8> = Vec::new();
    // XS_WRITE reply "OK\0"
    want.extend_from_slice(&[
        11, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, b'O', b'K', 0,
    ]);
    // XS_READ reply: the value, no NUL
    want.extend_from_slice(&[2, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, b'v']);
    // XS_ERROR (16) "ENOENT\0", req_id echoed
    want.extend_from_slice(&[16, 0, 0, 0, 4, 3, 2, 1, 0, 0, 0, 0, 7, 0, 0, 0]);
    want.extend_from_slice(b"ENOENT\0");
    // XS_WATCH reply, then the first firing: XS_WATCH_EVENT (15), req_id 0, "/x\0tk\0"
    want.extend_from_slice(&[
        4, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, b'O', b'K', 0,
    ]);
    want.extend_from_slice(&[15, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0]);
    want.extend_from_slice(b"/x\0tk\0");
    // XS_DIRECTORY reply "x\0"
    want.extend_from_slice(&[1, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, b'x', 0]);
    // XS_ERROR "ENOENT\0" with tx_id 77 echoed
    want.extend_from_slice(&[16, 0, 0, 0, 7, 0, 0, 0, 77, 0, 0, 0, 7, 0, 0, 0]);
    want.extend_from_slice(b"ENOENT\0");
    // XS_ERROR "ENOSYS\0"
    want.extend_from_slice(&[16, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0]);
    want.extend_from_slice(b"ENOSYS\0");

    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("replies until close");
    assert_eq!(got, want);
}

#[test]
fn transaction_replies_on_the_wire() {
    let env = Env::new();
    let mut s = raw(&env, 0);
    // XS_TRANSACTION_START (6), req_id 1, "\0"
    s.write_all(&[6, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0])
        .expect("send");
    let mut d = Decoder::new();
    let start = raw_reply(&mut s, &mut d).expect("reply");
    assert_eq!(
        (start.kind(), start.req_id, start.tx_id),
        (Some(MsgType::TransactionStart), 1, 0)
    );
    let (id, rest) = start.payload.split_at(start.payload.len() - 1);
    assert_eq!(rest, [0], "the id is NUL-terminated");
    let id: u32 = std::str::from_utf8(id)
        .expect("ascii")
        .parse()
        .expect("decimal");
    assert_ne!(id, 0);

    let tx = id.to_le_bytes();
    let mut req = Vec::new();
    // XS_WRITE in the transaction; reply echoes the tx_id.
    req.extend_from_slice(&[
        11, 0, 0, 0, 2, 0, 0, 0, tx[0], tx[1], tx[2], tx[3], 4, 0, 0, 0,
    ]);
    req.extend_from_slice(b"/t\0v");
    // XS_TRANSACTION_START inside it: EBUSY.
    req.extend_from_slice(&[
        6, 0, 0, 0, 3, 0, 0, 0, tx[0], tx[1], tx[2], tx[3], 1, 0, 0, 0, 0,
    ]);
    // XS_TRANSACTION_END with "X\0": EINVAL, the transaction stays.
    req.extend_from_slice(&[
        7, 0, 0, 0, 4, 0, 0, 0, tx[0], tx[1], tx[2], tx[3], 2, 0, 0, 0,
    ]);
    req.extend_from_slice(b"X\0");
    // XS_TRANSACTION_END "T" without its NUL: EINVAL (xenstored's onearg wants it).
    req.extend_from_slice(&[
        7, 0, 0, 0, 5, 0, 0, 0, tx[0], tx[1], tx[2], tx[3], 1, 0, 0, 0,
    ]);
    req.extend_from_slice(b"T");
    // XS_TRANSACTION_END "T\0": commit.
    req.extend_from_slice(&[
        7, 0, 0, 0, 6, 0, 0, 0, tx[0], tx[1], tx[2], tx[3], 2, 0, 0, 0,
    ]);
    req.extend_from_slice(b"T\0");
    s.write_all(&req).expect("send");
    s.shutdown(std::net::Shutdown::Write).expect("half-close");
    let replies = read_to_end(&mut s);
    let summary: Vec<(u32, u32, u32, Vec<u8>)> = replies
        .into_iter()
        .map(|m| (m.msg_type, m.req_id, m.tx_id, m.payload))
        .collect();
    assert_eq!(
        summary,
        [
            (11, 2, id, b"OK\0".to_vec()),
            (16, 3, id, b"EBUSY\0".to_vec()),
            (16, 4, id, b"EINVAL\0".to_vec()),
            (16, 5, id, b"EINVAL\0".to_vec()),
            (7, 6, id, b"OK\0".to_vec()),
        ]
    );
    let mut c = env.client(0);
    assert_eq!(c.read(Tx::NONE, "/t").expect("committed"), b"v");
}

/// A small xorshift generator: deterministic, so a failure reproduces from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Up to `max - 1` random bytes.
    fn some_bytes(&mut self, max: u64) -> Vec<u8> {
        let n = self.below(max) as usize;
        self.bytes(n)
    }

    /// A path-like string, mostly valid, sometimes not: from an alphabet that cannot spell
    /// the fuzz test's own `/keep` node.
    fn path(&mut self) -> Vec<u8> {
        const ALPHABET: &[u8] = b"abc01/-_@/";
        let mut p = Vec::new();
        match self.below(8) {
            0 => {}
            1 => p.push(b'@'),
            2 => p.extend_from_slice(b"/local/domain/5/"),
            _ => p.push(b'/'),
        }
        for _ in 0..self.below(12) {
            let i = self.below(ALPHABET.len() as u64) as usize;
            p.push(ALPHABET[i]);
        }
        match self.below(20) {
            0 => p.push(0xff),
            1 => p.push(b' '),
            2 => p.extend_from_slice("\u{e9}".as_bytes()),
            _ => {}
        }
        p
    }

    /// A payload shaped like a request's: strings, NUL-separated (or not), of the kinds
    /// requests carry, and now and then random bytes or the largest allowed payload.
    fn payload(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        match self.below(30) {
            0 => return self.bytes(XENSTORE_PAYLOAD_MAX),
            1 => {
                let mut p = b"/big\0".to_vec();
                p.resize(XENSTORE_PAYLOAD_MAX, b'v');
                return p;
            }
            2 => return self.some_bytes(64),
            _ => {}
        }
        for _ in 0..self.below(5) {
            let part: Vec<u8> = match self.below(8) {
                0..=2 => self.path(),
                3 => ["T", "F", "", "X"][self.below(4) as usize].into(),
                4 => {
                    ["r5", "b0", "n7", "w65535", "x1", "r70000", "b"][self.below(7) as usize].into()
                }
                5 => self.below(70_000).to_string().into_bytes(),
                6 => b"tok".to_vec(),
                _ => self.some_bytes(8),
            };
            out.extend_from_slice(&part);
            if self.below(6) != 0 {
                out.push(0);
            }
        }
        out
    }

    /// Mostly the payload that a request of type `t` takes, with random parts.
    fn payload_for(&mut self, t: u32) -> Vec<u8> {
        if self.below(4) == 0 {
            return self.payload();
        }
        let mut p = self.path();
        p.push(0);
        match t {
            1..=3 | 12 | 13 => p,
            11 => {
                let v = self.some_bytes(16);
                p.extend_from_slice(&v);
                p
            }
            14 => {
                for _ in 0..1 + self.below(3) {
                    let letter = b"nrwbx"[self.below(5) as usize];
                    p.push(letter);
                    p.extend_from_slice(self.below(8).to_string().as_bytes());
                    p.push(0);
                }
                p
            }
            4 | 5 => {
                p.extend_from_slice(b"tok\0");
                p
            }
            6 => vec![0],
            7 => [&b"T\0"[..], b"F\0"][self.below(2) as usize].to_vec(),
            10 | 17 => format!("{}\0", self.below(8)).into_bytes(),
            _ => self.payload(),
        }
    }

    fn header(&mut self, req_id: u32, len: u32) -> Header {
        let msg_type = match self.below(10) {
            0 => self.next() as u32,
            1 => 0xffff,
            _ => self.below(28) as u32,
        };
        let tx_id = match self.below(6) {
            0 => self.below(8) as u32,
            1 => self.next() as u32,
            _ => 0,
        };
        Header {
            msg_type,
            req_id,
            tx_id,
            len,
        }
    }
}

/// Random bytes, random headers and random well-framed requests at the server, from dom0
/// and from a guest: every well-framed request gets exactly one reply (its own type or
/// `XS_ERROR` with a name from `xs_wire.h`, its `req_id` and `tx_id` echoed, in order),
/// a bad header ends only that connection, nothing panics, and a bystander's watch and
/// data keep working throughout.
#[test]
fn fuzzed_connections_never_break_the_server() {
    let env = Env::new();
    let mut dom0 = env.client(0);
    env.home(&mut dom0, 5);
    let mut watcher = env.client(0);
    watcher.watch("/keep", "k").expect("watch");
    assert_eq!(next(&mut watcher), Some(ev("/keep", "k")));
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    // Replies by outcome, to check that the fuzz reaches the store and not only the
    // parsers: (successes, errors).
    let (mut succeeded, mut refused) = (0usize, 0usize);

    for round in 0..800u32 {
        let domid = if rng.below(2) == 0 { 0 } else { 5 };
        let mut s = raw(&env, domid);
        let mode = rng.below(4);
        let mut stream = Vec::new();
        // The well-framed requests, in order: (type, req_id, tx_id).
        let mut sent = Vec::new();
        if mode == 0 {
            stream = rng.some_bytes(400);
        } else {
            for i in 0..1 + rng.below(6) as u32 {
                let mut h = rng.header(i + 1, 0);
                let payload = rng.payload_for(h.msg_type);
                h.len = payload.len() as u32;
                stream.extend_from_slice(&h.to_bytes());
                stream.extend_from_slice(&payload);
                sent.push((h.msg_type, h.req_id, h.tx_id));
            }
            if mode == 3 {
                let len =
                    XENSTORE_PAYLOAD_MAX as u32 + 1 + rng.below(u64::from(u32::MAX / 2)) as u32;
                let h = rng.header(99, len);
                stream.extend_from_slice(&h.to_bytes());
                stream.extend_from_slice(&rng.some_bytes(64));
            }
        }
        // In pieces of random size, so that messages straddle reads.
        let mut pos = 0;
        while pos < stream.len() {
            let end = (pos + 1 + rng.below(700) as usize).min(stream.len());
            if s.write_all(&stream[pos..end]).is_err() {
                // Closed on us after a bad header: fine, that is the rule.
                break;
            }
            pos = end;
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
        let replies: Vec<Message> = read_to_end(&mut s)
            .into_iter()
            .filter(|m| !(m.kind() == Some(MsgType::WatchEvent) && m.req_id == 0))
            .collect();
        if mode != 0 {
            if mode == 3 {
                assert!(replies.len() <= sent.len(), "round {round}");
            } else {
                assert_eq!(replies.len(), sent.len(), "round {round}: one reply each");
            }
            for (m, &(t, req_id, tx_id)) in replies.iter().zip(&sent) {
                assert_eq!((m.req_id, m.tx_id), (req_id, tx_id), "round {round}");
                if m.kind() == Some(MsgType::Error) {
                    let name = single_string(&m.payload).expect("NUL-terminated name");
                    assert!(Errno::from_name(name).is_some(), "round {round}: {name:?}");
                    refused += 1;
                } else {
                    assert_eq!(m.msg_type, t, "round {round}: reply of the request's type");
                    succeeded += 1;
                }
            }
        }
        assert!(!env.server.panicked(), "round {round}: the server panicked");

        if round % 20 == 0 {
            let v = round.to_string();
            dom0.write(Tx::NONE, "/keep/x", v.as_bytes())
                .expect("bystander write");
            assert_eq!(dom0.read_string(Tx::NONE, "/keep/x").expect("read"), v);
            assert_eq!(
                next(&mut watcher),
                Some(ev("/keep/x", "k")),
                "round {round}"
            );
        }
    }
    eprintln!("fuzz: {succeeded} requests succeeded, {refused} refused");
    assert!(
        succeeded > 50 && refused > 50,
        "{succeeded} succeeded, {refused} refused"
    );
    let mut late = env.client(5);
    assert_eq!(
        late.get_domain_path(5).expect("still serving"),
        "/local/domain/5"
    );
    assert_eq!(quiet(&mut watcher), None, "the fuzz never touched /keep");
}
