//! Two daemons joined by their link, as a qube's QubesDB and dom0's are over vchan: the bytes
//! between the two [`LinkPort`]s are carried by a test thread instead of a vchan. Clients on
//! real UNIX sockets see dom0's database in the qube, dom0's changes arrive with their watch
//! events, and the qube's own writes reach dom0 (qubes-core-qubesdb `daemon/db-cmds.c`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use qubesdb::link::LinkError;
use qubesdb::wire::{encode, MsgType};
use qubesdb::{Client, LinkPort, Server, ServerHandle, Tree};
use tempfile::TempDir;

const WAIT: Duration = Duration::from_secs(5);

fn daemon(dir: &TempDir, name: &str, entries: &[(&str, &str)]) -> ServerHandle {
    let tree = Tree::from_entries(entries.iter().map(|(k, v)| (*k, v.as_bytes().to_vec())))
        .expect("valid entries");
    Server::bind(dir.path().join(name))
        .expect("bind")
        .with_tree(tree)
        .spawn()
        .expect("spawn")
}

fn client(h: &ServerHandle) -> Client {
    let mut c = Client::connect(h.socket_path()).expect("connect");
    c.set_command_timeout(Some(WAIT));
    c
}

/// Carries bytes both ways until stopped; the first link error ends it and is returned.
fn carry(a: LinkPort, b: LinkPort, stop: Arc<AtomicBool>) -> thread::JoinHandle<Option<LinkError>> {
    thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let to_b = a.take_output();
            let to_a = b.take_output();
            if let Err(e) = b.receive(&to_b) {
                return Some(e);
            }
            if let Err(e) = a.receive(&to_a) {
                return Some(e);
            }
            if to_a.is_empty() && to_b.is_empty() {
                thread::sleep(Duration::from_millis(2));
            }
        }
        None
    })
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_qube_daemon_follows_dom0_and_sends_back_its_own_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dom0 = daemon(
        &dir,
        "dom0.sock",
        &[
            ("/qubes-ip", "10.137.0.5"),
            ("/qubes-netvm-gateway", "10.138.0.1"),
            ("/qubes-firewall/10.137.0.9", ""),
            ("/qubes-firewall/10.137.0.9/policy", "drop"),
        ],
    );
    let qube = daemon(&dir, "qube.sock", &[]);
    let (dom0_port, qube_port) = (
        dom0.attach_link().expect("link"),
        qube.attach_link().expect("link"),
    );
    assert!(qube.attach_link().is_err(), "a second link was accepted");
    qube_port.request_sync();
    let stop = Arc::new(AtomicBool::new(false));
    // Watch before the sync: the copied entries fire watches as they arrive.
    let mut watcher = client(&qube);
    watcher.watch("/qubes-firewall/").expect("watch");
    let carrier = carry(dom0_port, qube_port, Arc::clone(&stop));
    let mut reader = client(&qube);
    wait_for("the sync", || {
        reader
            .read("/qubes-firewall/10.137.0.9/policy")
            .ok()
            .flatten()
            .is_some()
    });
    assert_eq!(
        qube.snapshot().entries().collect::<Vec<_>>(),
        dom0.snapshot().entries().collect::<Vec<_>>(),
        "the qube's database is not dom0's"
    );
    while watcher
        .read_watch(Some(Duration::ZERO))
        .expect("drain")
        .is_some()
    {}

    // dom0 changes a client's rules (the commit sequence of qubes-core-admin firewall.py):
    // the qube's watcher sees each step, in order.
    let mut admin = client(&dom0);
    admin.rm("/qubes-firewall/10.137.0.9/").expect("rm");
    admin
        .write(
            "/qubes-firewall/10.137.0.9/0000",
            b"action=accept proto=tcp dstports=443-443",
        )
        .expect("write");
    admin
        .write("/qubes-firewall/10.137.0.9", b"")
        .expect("commit");
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match watcher.read_watch(Some(WAIT)).expect("watch event") {
            Some(p) => seen.push(p),
            None => panic!("only {seen:?} arrived"),
        }
    }
    assert_eq!(
        seen,
        [
            "/qubes-firewall/10.137.0.9/",
            "/qubes-firewall/10.137.0.9/0000",
            "/qubes-firewall/10.137.0.9"
        ]
    );
    assert_eq!(
        reader
            .read("/qubes-firewall/10.137.0.9/0000")
            .expect("read")
            .as_deref(),
        Some(&b"action=accept proto=tcp dstports=443-443"[..])
    );
    assert_eq!(
        reader
            .read("/qubes-firewall/10.137.0.9/policy")
            .expect("read"),
        None
    );

    // The qube reports the rules handled, as the firewall agent does; dom0 gets it.
    reader
        .write("/qubes-firewall-handled/10.137.0.9", b"1")
        .expect("write");
    let mut dom0_reader = client(&dom0);
    wait_for("the qube's write in dom0", || {
        dom0_reader
            .read("/qubes-firewall-handled/10.137.0.9")
            .ok()
            .flatten()
            .as_deref()
            == Some(&b"1"[..])
    });
    stop.store(true, Ordering::Relaxed);
    assert_eq!(carrier.join().expect("carrier"), None);
}

#[test]
fn a_peer_breaking_the_protocol_ends_the_link_and_leaves_the_database_as_it_was() {
    let dir = tempfile::tempdir().expect("tempdir");
    let qube = daemon(&dir, "qube.sock", &[("/qubes-ip", "10.137.0.5")]);
    let port = qube.attach_link().expect("link");
    port.request_sync();
    let _ = port.take_output();
    // A sync entry with a NUL in its value: the link ends, nothing is stored.
    let bad = encode(MsgType::RespMultiread, "/qubes-ip", b"10.137.0.6\0x").expect("enc");
    assert!(matches!(
        port.receive(&bad),
        Err(LinkError::BadSyncEntry { .. })
    ));
    assert!(!port.synced());
    assert_eq!(
        client(&qube).read("/qubes-ip").expect("read").as_deref(),
        Some(&b"10.137.0.5"[..])
    );
    // Once detached, local writes go nowhere and another link can be attached.
    drop(port);
    client(&qube).write("/x", b"1").expect("write");
    let again = qube.attach_link().expect("reattach");
    assert!(
        again.take_output().is_empty(),
        "a write made while detached was queued"
    );
}

#[test]
fn local_writes_fire_watches_and_stay_local() {
    let dir = tempfile::tempdir().expect("tempdir");
    let qube = daemon(&dir, "qube.sock", &[]);
    let port = qube.attach_link().expect("link");
    port.request_sync();
    let _ = port.take_output();
    let mut watcher = client(&qube);
    watcher.watch("/qubes-vif/").expect("watch");
    qube.write_local("/qubes-vif/vif7.0/ip", b"10.137.0.7")
        .expect("write");
    assert_eq!(
        watcher.read_watch(Some(WAIT)).expect("event").as_deref(),
        Some("/qubes-vif/vif7.0/ip")
    );
    assert!(qube.remove_local("/qubes-vif/vif7.0/").expect("rm"));
    assert_eq!(
        watcher.read_watch(Some(WAIT)).expect("event").as_deref(),
        Some("/qubes-vif/vif7.0/")
    );
    assert!(
        port.take_output().is_empty(),
        "a local write was sent to the peer"
    );
    assert!(qube.write_local("relative", b"x").is_err());
}
