//! The daemon and the client over real UNIX sockets in a temporary directory: every command's
//! semantics (qubes-core-qubesdb `daemon/db-cmds.c`), watches, malformed input, and the
//! Qubes firewall commit sequence.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use qubesdb::wire::{encode, Decoder, Message, MsgType};
use qubesdb::{Client, ClientError, RequestError, Server, ServerHandle, Tree, WireError};
use tempfile::TempDir;

const WAIT: Duration = Duration::from_secs(5);

fn start(entries: &[(&str, &str)]) -> (TempDir, ServerHandle) {
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = Tree::from_entries(entries.iter().map(|(k, v)| (*k, v.as_bytes().to_vec())))
        .expect("valid entries");
    let handle = Server::bind(dir.path().join("qubesdb.sock"))
        .expect("bind")
        .with_tree(tree)
        .spawn()
        .expect("spawn");
    (dir, handle)
}

fn client(h: &ServerHandle) -> Client {
    let mut c = Client::connect(h.socket_path()).expect("connect");
    c.set_command_timeout(Some(WAIT));
    c
}

/// A client speaking raw bytes, to see exactly what the daemon sends.
struct Raw {
    stream: UnixStream,
    decoder: Decoder,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let stream = UnixStream::connect(path).expect("connect");
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        Raw {
            stream,
            decoder: Decoder::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    fn command(&mut self, t: MsgType, path: &str, data: &[u8]) {
        self.send(&encode(t, path, data).expect("encode"));
    }

    /// The next message, or None at end of stream (EOF or reset).
    fn next(&mut self) -> Option<Message> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(m) = self
                .decoder
                .next_message()
                .expect("daemon sends valid messages")
            {
                return Some(m);
            }
            match self.stream.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => self.decoder.feed(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("raw read: {e}"),
            }
        }
    }

    fn expect(&mut self) -> Message {
        self.next().expect("a message, not end of stream")
    }
}

fn kv(entries: &[(String, Vec<u8>)]) -> Vec<(&str, &str)> {
    entries
        .iter()
        .map(|(k, v)| (k.as_str(), std::str::from_utf8(v).expect("utf-8")))
        .collect()
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

const DB: &[(&str, &str)] = &[
    ("/qubes-ip", "10.137.0.6"),
    ("/qubes-firewall/10.137.0.1", ""),
    ("/qubes-firewall/10.137.0.1/policy", "drop"),
    ("/qubes-firewall/10.137.0.10", ""),
    ("/qubes-firewall/10.137.0.10/0000", "action=accept"),
    ("/qubes-firewall/10.137.0.10/policy", "drop"),
    ("/name", "sys-firewall"),
];

#[test]
fn read_write_and_missing_entries() {
    let (_dir, h) = start(DB);
    let mut c = client(&h);
    assert_eq!(
        c.read("/qubes-ip").expect("read"),
        Some(b"10.137.0.6".to_vec())
    );
    assert_eq!(c.read("/nope").expect("read"), None);
    c.write("/qubes-ip", b"10.137.0.7").expect("overwrite");
    assert_eq!(
        c.read("/qubes-ip").expect("read"),
        Some(b"10.137.0.7".to_vec())
    );
    c.write("/empty", b"").expect("empty value");
    assert_eq!(c.read("/empty").expect("read"), Some(Vec::new()));
    let big = vec![b'x'; 3072];
    c.write("/big", &big).expect("3072 bytes");
    assert_eq!(c.read("/big").expect("read"), Some(big));
    c.write("/bin", b"\x01\xff").expect("non-text bytes");
    assert_eq!(c.read("/bin").expect("read"), Some(b"\x01\xff".to_vec()));
}

#[test]
fn exact_answers_on_the_wire() {
    let (_dir, h) = start(DB);
    let mut r = Raw::connect(h.socket_path());
    r.command(MsgType::CmdRead, "/name", b"");
    assert_eq!(
        r.expect(),
        Message::new(MsgType::RespRead, "/name", b"sys-firewall".to_vec())
    );
    r.command(MsgType::CmdRead, "/missing", b"");
    assert_eq!(
        r.expect(),
        Message::bare(MsgType::RespErrorNoent, "/missing")
    );
    r.command(MsgType::CmdWrite, "/k", b"v");
    assert_eq!(r.expect(), Message::bare(MsgType::RespOk, "/k"));
    r.command(MsgType::CmdRm, "/k", b"");
    assert_eq!(r.expect(), Message::bare(MsgType::RespOk, "/k"));
    r.command(MsgType::CmdRm, "/k", b"");
    assert_eq!(r.expect(), Message::bare(MsgType::RespErrorNoent, "/k"));
    r.command(MsgType::CmdWatch, "/never/", b"");
    assert_eq!(r.expect(), Message::bare(MsgType::RespOk, "/never/"));
    r.command(MsgType::CmdUnwatch, "/never/", b"");
    assert_eq!(r.expect(), Message::bare(MsgType::RespOk, "/never/"));
    r.command(MsgType::CmdUnwatch, "/never/", b"");
    assert_eq!(
        r.expect(),
        Message::bare(MsgType::RespErrorNoent, "/never/")
    );
}

#[test]
fn multiread_with_and_without_trailing_slash() {
    let (_dir, h) = start(DB);
    let mut c = client(&h);
    let with = c
        .multiread("/qubes-firewall/10.137.0.1/")
        .expect("multiread");
    assert_eq!(kv(&with), [("/qubes-firewall/10.137.0.1/policy", "drop")]);
    // Without the slash it is a string prefix: 10.137.0.1 also matches 10.137.0.10.
    let without = c
        .multiread("/qubes-firewall/10.137.0.1")
        .expect("multiread");
    assert_eq!(
        kv(&without),
        [
            ("/qubes-firewall/10.137.0.1", ""),
            ("/qubes-firewall/10.137.0.1/policy", "drop"),
            ("/qubes-firewall/10.137.0.10", ""),
            ("/qubes-firewall/10.137.0.10/0000", "action=accept"),
            ("/qubes-firewall/10.137.0.10/policy", "drop"),
        ]
    );
    assert!(c.multiread("/nothing/").expect("multiread").is_empty());
}

#[test]
fn multiread_of_the_empty_path_dumps_everything_backwards() {
    let (_dir, h) = start(DB);
    let mut r = Raw::connect(h.socket_path());
    r.command(MsgType::CmdMultiread, "", b"");
    let mut got = Vec::new();
    loop {
        let m = r.expect();
        assert_eq!(m.msg_type, MsgType::RespMultiread);
        if m.path.is_empty() {
            assert!(m.data.is_empty(), "the end marker has data_len 0");
            break;
        }
        got.push((m.path, String::from_utf8(m.data).expect("utf-8")));
    }
    let mut expected: Vec<(String, String)> = DB
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    expected.sort();
    expected.reverse();
    assert_eq!(got, expected);
    let mut c = client(&h);
    let dump: Vec<String> = c
        .multiread("")
        .expect("dump")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(dump.first().map(String::as_str), Some("/qubes-ip"));
    assert_eq!(dump.last().map(String::as_str), Some("/name"));
}

#[test]
fn list_gives_paths_in_order() {
    let (_dir, h) = start(DB);
    let mut c = client(&h);
    assert_eq!(
        c.list("/qubes-firewall/10.137.0.10/").expect("list"),
        [
            "/qubes-firewall/10.137.0.10/0000",
            "/qubes-firewall/10.137.0.10/policy"
        ]
    );
    let all = c.list("").expect("list everything");
    let mut expected: Vec<&str> = DB.iter().map(|(k, _)| *k).collect();
    expected.sort();
    assert_eq!(all, expected, "LIST \"\" is in forward order");
    let mut r = Raw::connect(h.socket_path());
    r.command(MsgType::CmdList, "/name", b"");
    assert_eq!(r.expect(), Message::bare(MsgType::RespList, "/name"));
    assert_eq!(r.expect(), Message::bare(MsgType::RespList, ""));
}

#[test]
fn rm_of_a_key_and_of_a_subtree() {
    let (_dir, h) = start(DB);
    let mut c = client(&h);
    assert!(c.rm("/name").expect("rm key"));
    assert!(!c.rm("/name").expect("rm again"), "nothing left: NOENT");
    assert!(c.rm("/qubes-firewall/10.137.0.10/").expect("rm subtree"));
    assert_eq!(
        c.list("/qubes-firewall/").expect("list"),
        [
            "/qubes-firewall/10.137.0.1",
            "/qubes-firewall/10.137.0.1/policy",
            "/qubes-firewall/10.137.0.10",
        ],
        "the base key and the neighbour stay"
    );
    assert!(!c
        .rm("/qubes-firewall/10.137.0.10/")
        .expect("rm empty subtree"));
}

#[test]
fn watches_on_a_key_and_on_a_subtree() {
    let (_dir, h) = start(DB);
    let mut writer = client(&h);
    let mut w = client(&h);
    w.watch("/qubes-ip").expect("watch key");
    w.watch("/qubes-firewall/").expect("watch subtree");
    w.watch("/qubes-firewall/")
        .expect("second identical registration");
    w.watch("/not/yet/there").expect("watch a missing key");

    writer.write("/qubes-ip", b"10.137.0.9").expect("write");
    writer.write("/qubes-ipx", b"1").expect("not watched");
    writer
        .write("/qubes-firewall/10.137.0.10/0001", b"x")
        .expect("write");
    writer.write("/not/yet/there", b"now").expect("write");
    writer.rm("/qubes-firewall/10.137.0.1/").expect("rm");
    assert!(!writer.rm("/qubes-firewall/nothing").expect("rm nothing"));

    let mut got = Vec::new();
    for _ in 0..6 {
        got.extend(w.read_watch(Some(WAIT)).expect("event"));
    }
    assert_eq!(
        w.read_watch(Some(Duration::from_millis(100)))
            .expect("no more"),
        None
    );
    assert_eq!(
        got,
        [
            "/qubes-ip",
            "/qubes-firewall/10.137.0.10/0001",
            "/qubes-firewall/10.137.0.10/0001",
            "/not/yet/there",
            "/qubes-firewall/10.137.0.1/",
            "/qubes-firewall/10.137.0.1/",
        ],
        "one event per matching registration, path = the modified entry; no event for a \
         failed rm"
    );

    assert!(w.unwatch("/qubes-firewall/").expect("unwatch one"));
    writer.write("/qubes-firewall/a", b"1").expect("write");
    assert_eq!(
        w.read_watch(Some(WAIT)).expect("event").as_deref(),
        Some("/qubes-firewall/a"),
        "the other registration still fires"
    );
    assert!(w.unwatch("/qubes-firewall/").expect("unwatch the other"));
    assert!(!w.unwatch("/qubes-firewall/").expect("none left"));
    writer.write("/qubes-firewall/b", b"1").expect("write");
    writer.write("/qubes-ip", b"x").expect("write");
    assert_eq!(
        w.read_watch(Some(WAIT)).expect("event").as_deref(),
        Some("/qubes-ip")
    );
    assert_eq!(w.read_watch(Some(Duration::ZERO)).expect("poll"), None);
}

#[test]
fn an_exact_watch_fires_when_its_subtree_is_removed() {
    let (_dir, h) = start(DB);
    let mut writer = client(&h);
    let mut w = client(&h);
    w.watch("/qubes-firewall/10.137.0.10/policy")
        .expect("watch");
    writer.rm("/qubes-firewall/10.137.0.10/").expect("rm");
    assert_eq!(
        w.read_watch(Some(WAIT)).expect("event").as_deref(),
        Some("/qubes-firewall/10.137.0.10/")
    );
}

#[test]
fn a_writer_sees_its_own_watch_after_its_answer() {
    let (_dir, h) = start(&[]);
    let mut r = Raw::connect(h.socket_path());
    r.command(MsgType::CmdWatch, "/", b"");
    assert_eq!(r.expect(), Message::bare(MsgType::RespOk, "/"));
    r.command(MsgType::CmdWrite, "/k", b"v");
    assert_eq!(r.expect(), Message::bare(MsgType::RespOk, "/k"));
    assert_eq!(r.expect(), Message::bare(MsgType::RespWatch, "/k"));
}

#[test]
fn events_met_while_waiting_for_an_answer_are_queued() {
    let (_dir, h) = start(DB);
    let mut writer = client(&h);
    let mut w = client(&h);
    w.watch("/qubes-firewall/").expect("watch");
    writer.write("/qubes-firewall/x", b"1").expect("write");
    writer.write("/qubes-firewall/y", b"2").expect("write");
    // These events sit in w's socket before the answers below.
    assert_eq!(
        w.read("/name").expect("read"),
        Some(b"sys-firewall".to_vec())
    );
    let dump = w.multiread("/qubes-firewall/1").expect("multiread");
    assert_eq!(dump.len(), 5);
    assert_eq!(w.pending_watches(), 2);
    assert_eq!(
        w.read_watch(Some(Duration::ZERO))
            .expect("queued")
            .as_deref(),
        Some("/qubes-firewall/x")
    );
    assert_eq!(
        w.read_watch(Some(Duration::ZERO))
            .expect("queued")
            .as_deref(),
        Some("/qubes-firewall/y")
    );
    assert_eq!(w.read_watch(Some(Duration::ZERO)).expect("nothing"), None);
}

/// A peer that answers like a daemon allowed to interleave events with an answer, which the
/// spec permits ("at any time, even in the middle of a multi-message answer").
fn scripted_peer(script: Vec<Vec<u8>>) -> (TempDir, PathBuf, thread::JoinHandle<Vec<Message>>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("peer.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let peer = thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        let mut received = Vec::new();
        let mut decoder = Decoder::new();
        let mut buf = [0u8; 4096];
        for reply in script {
            // One command in, one scripted reply out.
            let command = loop {
                if let Some(m) = decoder.next_message().expect("client sends valid messages") {
                    break m;
                }
                let n = s.read(&mut buf).expect("read command");
                assert!(n > 0, "client hung up early");
                decoder.feed(&buf[..n]);
            };
            received.push(command);
            // Send in small pieces so the client sees partial messages too.
            for piece in reply.chunks(50) {
                s.write_all(piece).expect("write reply");
                s.flush().expect("flush");
            }
        }
        // Stay connected until the client hangs up.
        while s.read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
        received
    });
    (dir, path, peer)
}

fn msgs(list: &[(MsgType, &str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (t, p, d) in list {
        out.extend(encode(*t, p, d.as_bytes()).expect("encode"));
    }
    out
}

#[test]
fn watch_events_in_the_middle_of_a_multiread_answer() {
    use MsgType::{RespMultiread as M, RespOk, RespRead, RespWatch as W};
    let script = vec![
        msgs(&[(RespOk, "/qubes-firewall/", "")]),
        msgs(&[
            (M, "/qubes-firewall/10.137.0.10/0000", "action=accept"),
            (W, "/qubes-firewall/10.137.0.10/0001", ""),
            (M, "/qubes-firewall/10.137.0.10/policy", "drop"),
            (W, "/qubes-firewall/10.137.0.10", ""),
            (M, "", ""),
        ]),
        msgs(&[(W, "/qubes-ip", ""), (RespRead, "/name", "sys-firewall")]),
    ];
    let (_dir, path, peer) = scripted_peer(script);
    let mut c = Client::connect(&path).expect("connect");
    c.set_command_timeout(Some(WAIT));
    c.watch("/qubes-firewall/").expect("watch");
    let entries = c
        .multiread("/qubes-firewall/10.137.0.10/")
        .expect("multiread");
    assert_eq!(
        kv(&entries),
        [
            ("/qubes-firewall/10.137.0.10/0000", "action=accept"),
            ("/qubes-firewall/10.137.0.10/policy", "drop"),
        ],
        "events are not taken for entries"
    );
    assert_eq!(
        c.read("/name").expect("read"),
        Some(b"sys-firewall".to_vec())
    );
    let mut events = Vec::new();
    while let Some(e) = c.read_watch(Some(Duration::ZERO)).expect("queued") {
        events.push(e);
    }
    assert_eq!(
        events,
        [
            "/qubes-firewall/10.137.0.10/0001",
            "/qubes-firewall/10.137.0.10",
            "/qubes-ip"
        ],
        "queued in arrival order"
    );
    drop(c);
    let received = peer.join().expect("peer");
    let sent: Vec<(MsgType, &str)> = received
        .iter()
        .map(|m| (m.msg_type, m.path.as_str()))
        .collect();
    assert_eq!(
        sent,
        [
            (MsgType::CmdWatch, "/qubes-firewall/"),
            (MsgType::CmdMultiread, "/qubes-firewall/10.137.0.10/"),
            (MsgType::CmdRead, "/name"),
        ]
    );
}

#[test]
fn a_wrong_answer_is_a_protocol_error_and_breaks_the_client() {
    let script = vec![msgs(&[(MsgType::RespList, "/name", "")])];
    let (_dir, path, peer) = scripted_peer(script);
    let mut c = Client::connect(&path).expect("connect");
    let err = c
        .read("/name")
        .expect_err("RESP_LIST is not an answer to READ");
    assert_eq!(
        err.to_string(),
        format!(
            "read /name: protocol error from {}: expected RESP_READ or RESP_ERROR_NOENT, got \
             RESP_LIST",
            path.display()
        )
    );
    let err = c.read("/name").expect_err("broken");
    assert!(matches!(err, ClientError::Broken { .. }), "{err}");
    drop(c);
    peer.join().expect("peer");
}

#[test]
fn a_silent_daemon_times_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("silent.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let mut c = Client::connect(&path).expect("connect");
    let (_peer, _) = listener.accept().expect("accept");
    c.set_command_timeout(Some(Duration::from_millis(100)));
    let err = c.read("/x").expect_err("no answer");
    assert!(matches!(err, ClientError::TimedOut { .. }), "{err}");
    assert!(
        err.to_string().starts_with("read /x: no answer from"),
        "{err}"
    );
    assert!(matches!(c.read("/x"), Err(ClientError::Broken { .. })));
}

#[test]
fn the_client_refuses_bad_requests_before_sending() {
    let (_dir, h) = start(DB);
    let mut c = client(&h);
    let cases: Vec<(Result<(), ClientError>, &str)> = vec![
        (c.read("/a/").map(|_| ()), "read /a/: path ends with '/', which only RM, WATCH, MULTIREAD and LIST take"),
        (c.write("/a*b", b"v"), "write /a*b: path contains '*' at byte 2"),
        (c.write("/a", b"x\0y"), "write /a: value contains a NUL byte at byte 1"),
        (c.write("/a", &[b'v'; 3073]), "write /a: value is 3073 bytes, over QDB_MAX_DATA (3072)"),
        (c.rm("").map(|_| ()), "rm : path is empty"),
        (c.watch("qubes-ip"), "watch qubes-ip: path does not start with '/'"),
        (c.read(&format!("/{}", "a".repeat(63))).map(|_| ()), "read /aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa: path is 64 bytes long, more than the 63 that fit in the 64-byte field with its NUL"),
    ];
    for (result, text) in cases {
        let err = result.expect_err(text);
        assert!(matches!(err, ClientError::Invalid { .. }), "{err}");
        assert_eq!(err.to_string(), text);
    }
    // Still usable: nothing was sent.
    assert_eq!(
        c.read("/name").expect("read"),
        Some(b"sys-firewall".to_vec())
    );
}

#[test]
fn refused_commands_keep_the_connection() {
    let (_dir, h) = start(DB);
    let mut r = Raw::connect(h.socket_path());
    let refused = [
        (MsgType::CmdRead, "/qubes-firewall/", &b""[..]),
        (MsgType::CmdWrite, "/dir/", b"v"),
        (MsgType::CmdWrite, "relative", b"v"),
        (MsgType::CmdWrite, "/nul", b"a\0b"),
        (MsgType::CmdRm, "", b""),
        (MsgType::CmdRead, "/name", b"data"),
    ];
    for (t, path, data) in refused {
        r.command(t, path, data);
        assert_eq!(
            r.expect(),
            Message::bare(MsgType::RespError, path),
            "{t} {path:?}"
        );
    }
    r.command(MsgType::CmdRead, "/name", b"");
    assert_eq!(r.expect().data, b"sys-firewall");
    let mut c = client(&h);
    assert_eq!(c.read("/dir").expect("read"), None);
    assert_eq!(c.read("/nul").expect("read"), None);
}

#[test]
fn malformed_messages_get_resp_error_and_a_closed_connection() {
    let (_dir, h) = start(DB);
    let mut bystander = client(&h);
    let mut watcher = client(&h);
    watcher.watch("/qubes-ip").expect("watch");

    let header = |t: u8, path: &[u8], len: u32| {
        let mut b = vec![t];
        let mut field = [0u8; 64];
        field[..path.len()].copy_from_slice(path);
        b.extend_from_slice(&field);
        b.extend_from_slice(&[0, 0, 0]);
        b.extend_from_slice(&len.to_le_bytes());
        b
    };
    let mut no_nul = header(0, b"", 0);
    no_nul[1..65].fill(b'a');
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("unknown type", header(42, b"/qubes-ip", 0), "/qubes-ip"),
        ("bad char", header(0, b"/qubes ip", 0), ""),
        ("leading dash", header(0, b"-x", 0), ""),
        ("no NUL", no_nul, ""),
        (
            "oversize data_len",
            header(1, b"/qubes-ip", 5000),
            "/qubes-ip",
        ),
        (
            "an answer as a command",
            header(7, b"/qubes-ip", 0),
            "/qubes-ip",
        ),
    ];
    for (what, bytes, reply_path) in cases {
        let mut r = Raw::connect(h.socket_path());
        r.send(&bytes);
        assert_eq!(
            r.next(),
            Some(Message::bare(MsgType::RespError, reply_path)),
            "{what}"
        );
        assert_eq!(r.next(), None, "{what}: the daemon closes the connection");
        // Everybody else carries on.
        bystander
            .write("/qubes-ip", what.as_bytes())
            .expect("bystander write");
        assert_eq!(
            watcher.read_watch(Some(WAIT)).expect("event").as_deref(),
            Some("/qubes-ip"),
            "{what}"
        );
    }
    // A client hanging up in the middle of a message is just a hang-up.
    let mut r = Raw::connect(h.socket_path());
    r.send(&header(1, b"/half", 10)[..40]);
    drop(r);
    assert_eq!(
        bystander.read("/qubes-ip").expect("read"),
        Some(b"an answer as a command".to_vec())
    );
    wait_until("closed clients to be forgotten", || h.client_count() == 2);
}

#[test]
fn firewall_commit_sequence_end_to_end() {
    // dom0's reload_firewall_for_vm (reference 1.7): rm the subtree, write the entries,
    // then the empty write of the base key, which is the commit signal.
    let (_dir, h) = start(&[
        ("/qubes-firewall/10.137.0.10", ""),
        ("/qubes-firewall/10.137.0.10/policy", "drop"),
        ("/qubes-firewall/10.137.0.10/0000", "action=drop"),
        ("/qubes-firewall/10.137.0.10/0001", "action=accept"),
    ]);
    let mut dom0 = client(&h);
    let mut agent = client(&h);
    agent.watch("/qubes-firewall/").expect("watch");

    assert!(dom0.rm("/qubes-firewall/10.137.0.10/").expect("rm"));
    dom0.write("/qubes-firewall/10.137.0.10/policy", b"drop")
        .expect("policy");
    dom0.write(
        "/qubes-firewall/10.137.0.10/0000",
        b"action=accept proto=tcp dstports=443-443",
    )
    .expect("0000");
    dom0.write("/qubes-firewall/10.137.0.10", b"")
        .expect("commit");

    let mut events = Vec::new();
    while events.len() < 4 {
        match agent.read_watch(Some(WAIT)).expect("event") {
            Some(e) => events.push(e),
            None => panic!("only {events:?} arrived"),
        }
    }
    assert_eq!(
        events,
        [
            "/qubes-firewall/10.137.0.10/",
            "/qubes-firewall/10.137.0.10/policy",
            "/qubes-firewall/10.137.0.10/0000",
            "/qubes-firewall/10.137.0.10",
        ]
    );
    // On the commit event the agent re-reads the client's rules.
    let commit = events.last().expect("commit event");
    assert_eq!(agent.read(commit).expect("read"), Some(Vec::new()));
    let rules = agent.multiread(&format!("{commit}/")).expect("multiread");
    assert_eq!(
        kv(&rules),
        [
            (
                "/qubes-firewall/10.137.0.10/0000",
                "action=accept proto=tcp dstports=443-443"
            ),
            ("/qubes-firewall/10.137.0.10/policy", "drop"),
        ],
        "the old 0001 is gone"
    );
    assert_eq!(
        agent
            .read_watch(Some(Duration::from_millis(100)))
            .expect("none"),
        None
    );
}

#[test]
fn a_client_that_never_reads_its_events_is_dropped() {
    let (_dir, h) = start(&[]);
    let mut writer = client(&h);
    let mut idle = client(&h);
    idle.watch("/").expect("watch everything");
    // Far more events than the socket buffer and the daemon's queue hold together.
    for i in 0..20_000 {
        writer
            .write("/k", i.to_string().as_bytes())
            .expect("the daemon keeps serving");
    }
    wait_until("the idle client to be dropped", || h.client_count() == 1);
    // It gets what was delivered before the cut, then end of stream.
    let mut got = 0;
    let err = loop {
        match idle.read_watch(Some(WAIT)) {
            Ok(Some(_)) => got += 1,
            Ok(None) => panic!("stalled after {got} events"),
            Err(e) => break e,
        }
    };
    assert!(got > 0 && got < 20_000, "{got}");
    assert!(
        matches!(err, ClientError::Closed { .. } | ClientError::Io { .. }),
        "{err}"
    );
}

#[test]
fn shutdown_disconnects_clients_and_removes_the_socket() {
    let (_dir, h) = start(DB);
    let path = h.socket_path().to_path_buf();
    let mut c = client(&h);
    c.watch("/").expect("watch");
    h.shutdown().expect("shutdown");
    assert!(!path.exists());
    let err = c.read_watch(Some(WAIT)).expect_err("closed");
    assert!(matches!(err, ClientError::Closed { .. }), "{err}");
    assert!(matches!(
        Client::connect(&path),
        Err(ClientError::Connect { .. })
    ));
}

#[test]
fn bind_replaces_a_stale_socket_but_not_a_live_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("qubesdb.sock");
    drop(UnixListener::bind(&path).expect("bind"));
    assert!(path.exists(), "a dead daemon's socket file");
    let live = Server::bind(&path)
        .expect("stale socket replaced")
        .spawn()
        .expect("spawn");
    let err = Server::bind(&path).expect_err("live socket");
    assert_eq!(
        err.to_string(),
        format!(
            "cannot listen on {}: another daemon is accepting connections there",
            path.display()
        )
    );
    live.shutdown().expect("shutdown");
    let file = dir.path().join("plain");
    std::fs::write(&file, b"x").expect("write");
    let err = Server::bind(&file).expect_err("not a socket");
    assert!(
        err.to_string()
            .ends_with("the path exists and is not a socket"),
        "{err}"
    );
}

#[test]
fn disconnecting_drops_the_watches() {
    let (_dir, h) = start(&[]);
    let mut c = client(&h);
    c.watch("/a").expect("watch");
    c.watch("/b/").expect("watch");
    assert_eq!(h.snapshot().watch_count(), 2);
    drop(c);
    wait_until("watches to be dropped", || h.snapshot().watch_count() == 0);
}

#[test]
fn request_errors_are_typed() {
    let (_dir, h) = start(&[]);
    let mut c = client(&h);
    match c.write("/x/", b"") {
        Err(ClientError::Invalid { error, .. }) => assert_eq!(error, RequestError::TrailingSlash),
        other => panic!("{other:?}"),
    }
    match c.list("/bad path") {
        Err(ClientError::Invalid { error, .. }) => assert_eq!(
            error,
            RequestError::Path(WireError::PathBadChar { byte: b' ', at: 4 })
        ),
        other => panic!("{other:?}"),
    }
}
