//! The hotplug step against a scripted toolstack: dom0 writes the backend directories as
//! libxl does, over the in-repository XenStore server, and the service's [`Hotplug`] runs
//! as its own domain. Links are a fake recording calls, except in the one test that brings
//! a real veth up and down in a network namespace of its own (hence the `setns` below).
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::Command;

use super::*;
use crate::xen::xenstore::client::Client;
use crate::xen::xenstore::server::Server;
use crate::xen::xenstore::{Access, Perm};

/// The service qube's domid.
const SVC: DomId = 2;
const WAIT: Duration = Duration::from_secs(5);

/// Links as a map of name to up; records every call.
#[derive(Debug, Default)]
struct FakeLinks {
    links: BTreeMap<String, bool>,
    calls: Vec<(String, bool)>,
}

impl FakeLinks {
    fn with(names: &[&str]) -> FakeLinks {
        FakeLinks {
            links: names.iter().map(|n| (n.to_string(), false)).collect(),
            calls: Vec::new(),
        }
    }

    fn is_up(&self, name: &str) -> bool {
        self.links.get(name).copied().unwrap_or(false)
    }
}

impl VifLinks for FakeLinks {
    fn set_up(&mut self, name: &str, up: bool) -> io::Result<()> {
        self.calls.push((name.to_string(), up));
        match self.links.get_mut(name) {
            Some(state) => {
                *state = up;
                Ok(())
            }
            None => Err(io::Error::from_raw_os_error(libc::ENODEV)),
        }
    }

    fn exists(&self, name: &str) -> bool {
        self.links.contains_key(name)
    }
}

/// An emulated XenStore with dom0 (the toolstack) and the service qube connected.
struct World {
    _dir: tempfile::TempDir,
    _xs: Server,
    ts: Client<UnixStream>,
    svc_socket: std::path::PathBuf,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let xs = Server::start(dir.path().join("xs")).expect("xenstored");
        let ts_socket = xs.add_domain(0).expect("dom0 socket");
        let svc_socket = xs.add_domain(SVC).expect("service socket");
        let mut ts = Client::connect(&ts_socket).expect("dom0 connects");
        // libxl's domain_make: the domain's directory is dom0's, readable by the domain.
        let home = format!("/local/domain/{SVC}");
        ts.mkdir(Tx::NONE, &home).expect("mkdir home");
        ts.set_perms(
            Tx::NONE,
            &home,
            &[Perm::new(Access::None, 0), Perm::new(Access::Read, SVC)],
        )
        .expect("home perms");
        World {
            _dir: dir,
            _xs: xs,
            ts,
            svc_socket,
        }
    }

    fn hotplug(&self) -> Hotplug<Client<UnixStream>> {
        self.hotplug_with(LINK_TIMEOUT)
    }

    fn hotplug_with(&self, timeout: Duration) -> Hotplug<Client<UnixStream>> {
        let c = Client::connect(&self.svc_socket).expect("service connects");
        Hotplug::with_link_timeout(c, timeout).expect("hotplug")
    }

    fn backend(d: &str, n: &str) -> String {
        format!("/local/domain/{SVC}/backend/vif/{d}/{n}")
    }

    /// What libxl's `libxl__device_generic_add` and the vif's keys amount to: in one
    /// transaction, the backend directory owned by the service and readable by the
    /// frontend, the frontend's directory the other way round, and their keys.
    fn add_vif(&mut self, d: &str, n: &str, ip: &str, mac: &str) {
        let be = Self::backend(d, n);
        let fe = format!("/local/domain/{d}/device/vif/{n}");
        let fe_dom: DomId = d.parse().unwrap_or(99);
        self.ts
            .transaction(|s, tx| {
                s.mkdir(tx, &be)?;
                s.set_perms(
                    tx,
                    &be,
                    &[
                        Perm::new(Access::None, SVC),
                        Perm::new(Access::Read, fe_dom),
                    ],
                )?;
                s.mkdir(tx, &fe)?;
                s.set_perms(
                    tx,
                    &fe,
                    &[
                        Perm::new(Access::None, fe_dom),
                        Perm::new(Access::Read, SVC),
                    ],
                )?;
                for (k, v) in [
                    ("frontend", fe.as_str()),
                    ("frontend-id", d),
                    ("online", "1"),
                    ("state", "1"),
                    ("script", "/etc/xen/scripts/vif-route-qubes"),
                    ("mac", mac),
                    ("handle", n),
                    ("type", "vif"),
                    ("ip", ip),
                ] {
                    s.write(tx, &format!("{be}/{k}"), v.as_bytes())?;
                }
                for (k, v) in [
                    ("backend", be.as_str()),
                    ("backend-id", &SVC.to_string()),
                    ("state", "1"),
                    ("handle", n),
                    ("mac", mac),
                ] {
                    s.write(tx, &format!("{fe}/{k}"), v.as_bytes())?;
                }
                Ok(())
            })
            .expect("toolstack adds the vif");
    }

    fn set(&mut self, d: &str, n: &str, key: &str, value: &str) {
        let p = format!("{}/{key}", Self::backend(d, n));
        self.ts
            .write(Tx::NONE, &p, value.as_bytes())
            .expect("toolstack write");
    }

    fn remove_vif(&mut self, d: &str, n: &str) {
        self.ts
            .rm(Tx::NONE, &Self::backend(d, n))
            .expect("toolstack removes the vif");
    }

    /// A backend key as the toolstack reads it; `None` if missing.
    fn read(&mut self, d: &str, n: &str, key: &str) -> Option<String> {
        let p = format!("{}/{key}", Self::backend(d, n));
        match self.ts.read_string(Tx::NONE, &p) {
            Ok(v) => Some(v),
            Err(e) if e.is_not_found() => None,
            Err(e) => panic!("toolstack read {p}: {e}"),
        }
    }
}

/// Polls until `done` holds for the events so far, or fails after [`WAIT`].
fn poll_until(
    hp: &mut Hotplug<Client<UnixStream>>,
    links: &mut impl VifLinks,
    done: impl Fn(&[VifEvent]) -> bool,
) -> Vec<VifEvent> {
    let start = Instant::now();
    let mut all = Vec::new();
    loop {
        all.extend(hp.poll(links).expect("poll"));
        if done(&all) {
            return all;
        }
        assert!(
            start.elapsed() < WAIT,
            "gave up waiting; events so far: {all:?}"
        );
        hp.wait(Duration::from_millis(50)).expect("wait");
    }
}

/// Polls for a little while and returns what came (for "nothing happens" checks).
fn poll_for(
    hp: &mut Hotplug<Client<UnixStream>>,
    links: &mut impl VifLinks,
    d: Duration,
) -> Vec<VifEvent> {
    let start = Instant::now();
    let mut all = Vec::new();
    while start.elapsed() < d {
        hp.wait(Duration::from_millis(20)).expect("wait");
        all.extend(hp.poll(links).expect("poll"));
    }
    all
}

fn added(events: &[VifEvent], name: &str) -> bool {
    events
        .iter()
        .any(|e| matches!(e, VifEvent::Added { vif, .. } if vif == name))
}

fn removed(events: &[VifEvent], name: &str) -> bool {
    events.contains(&VifEvent::Removed {
        vif: name.to_string(),
    })
}

fn refused(events: &[VifEvent]) -> Vec<(String, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            VifEvent::Refused { path, reason } => Some((path.clone(), reason.clone())),
            _ => None,
        })
        .collect()
}

const MAC: &str = "00:16:3e:5e:6c:00";
const MAC_BYTES: [u8; 6] = [0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x00];

#[test]
fn a_vif_is_brought_up_and_reported_connected_to_the_toolstack() {
    let mut w = World::new();
    let mut links = FakeLinks::with(&["vif3.0"]);
    let mut hp = w.hotplug();
    assert!(poll_for(&mut hp, &mut links, Duration::from_millis(100)).is_empty());
    w.add_vif("3", "0", "10.137.0.12 fd09:24ef:4179::a89:c", MAC);
    let ev = poll_until(&mut hp, &mut links, |e| !e.is_empty());
    assert_eq!(
        ev,
        vec![VifEvent::Added {
            vif: "vif3.0".into(),
            domid: 3,
            devid: 0,
            ip: Ipv4Addr::new(10, 137, 0, 12),
            ip6: Some("fd09:24ef:4179::a89:c".parse().expect("v6")),
            mac: MAC_BYTES,
        }]
    );
    assert!(links.is_up("vif3.0"));
    assert_eq!(links.calls, vec![("vif3.0".to_string(), true)]);
    assert_eq!(
        w.read("3", "0", "hotplug-status").as_deref(),
        Some("connected")
    );
    assert_eq!(w.read("3", "0", "hotplug-error"), None);
    assert_eq!(
        hp.connected().collect::<Vec<_>>(),
        vec![("backend/vif/3/0", "vif3.0")]
    );
    // Our own write and netback-style writes in the directory fire the watch again; they
    // must not add the vif a second time.
    w.set("3", "0", "state", "4");
    assert!(poll_for(&mut hp, &mut links, Duration::from_millis(200)).is_empty());
    assert_eq!(links.calls.len(), 1);
}

#[test]
fn two_vifs_of_one_domain_are_independent_and_the_initial_scan_finds_the_first() {
    let mut w = World::new();
    // Present before the service starts: found by the watch's first firing.
    w.add_vif("3", "0", "10.137.0.12", MAC);
    let mut links = FakeLinks::with(&["vif3.0", "vif3.1"]);
    let mut hp = w.hotplug();
    let ev = poll_until(&mut hp, &mut links, |e| added(e, "vif3.0"));
    assert_eq!(ev.len(), 1, "{ev:?}");
    w.add_vif("3", "1", "10.137.0.13", "00:16:3e:5e:6c:01");
    let ev = poll_until(&mut hp, &mut links, |e| added(e, "vif3.1"));
    match &ev[..] {
        [VifEvent::Added {
            domid: 3,
            devid: 1,
            ip,
            ip6: None,
            mac,
            ..
        }] => {
            assert_eq!(*ip, Ipv4Addr::new(10, 137, 0, 13));
            assert_eq!(mac[5], 1);
        }
        other => panic!("expected vif3.1 added alone, got {other:?}"),
    }
    assert!(links.is_up("vif3.0") && links.is_up("vif3.1"));
    for n in ["0", "1"] {
        assert_eq!(
            w.read("3", n, "hotplug-status").as_deref(),
            Some("connected")
        );
    }
    w.remove_vif("3", "1");
    let ev = poll_until(&mut hp, &mut links, |e| removed(e, "vif3.1"));
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert!(
        links.is_up("vif3.0"),
        "the other vif of the domain stays up"
    );
    assert!(!links.is_up("vif3.1"));
}

#[test]
fn malformed_keys_and_names_are_refused_and_reported_as_errors() {
    let mut w = World::new();
    let mut links = FakeLinks::with(&["vif3.0", "vif4.0", "vif5.0", "vif6.0", "vif03.0"]);
    let mut hp = w.hotplug();
    w.add_vif("3", "0", "10.137.0.300", MAC);
    w.add_vif("4", "0", "10.137.0.14", "00:16:3e:5e:6c");
    w.add_vif("5", "0", "fd09::1", MAC);
    w.add_vif("03", "0", "10.137.0.15", MAC);
    w.add_vif("6", "0", "10.137.0.16", MAC);
    let ev = poll_until(&mut hp, &mut links, |e| {
        refused(e).len() == 4 && added(e, "vif6.0")
    });
    let r: BTreeMap<String, String> = refused(&ev).into_iter().collect();
    assert!(
        r["backend/vif/3/0"].starts_with("backend/vif/3/0/ip: "),
        "{r:?}"
    );
    assert!(r["backend/vif/3/0"].contains("10.137.0.300"), "{r:?}");
    assert!(
        r["backend/vif/4/0"].starts_with("backend/vif/4/0/mac: "),
        "{r:?}"
    );
    assert!(r["backend/vif/5/0"].contains("no IPv4"), "{r:?}");
    assert!(
        r["backend/vif/03/0"].contains("Bad interface name"),
        "{r:?}"
    );
    for (d, reason) in [("3", &r["backend/vif/3/0"]), ("4", &r["backend/vif/4/0"])] {
        assert_eq!(w.read(d, "0", "hotplug-status").as_deref(), Some("error"));
        assert_eq!(w.read(d, "0", "hotplug-error").as_ref(), Some(reason));
    }
    assert_eq!(
        w.read("03", "0", "hotplug-status").as_deref(),
        Some("error")
    );
    // Only the good one was touched.
    assert_eq!(links.calls, vec![("vif6.0".to_string(), true)]);
    // A refused vif is not retried on every event, and its removal reports nothing.
    w.set("3", "0", "state", "2");
    w.remove_vif("4", "0");
    assert!(poll_for(&mut hp, &mut links, Duration::from_millis(200)).is_empty());
    assert_eq!(links.calls.len(), 1);
}

#[test]
fn a_removed_directory_sets_the_link_down_and_reports_it() {
    let mut w = World::new();
    let mut links = FakeLinks::with(&["vif3.0"]);
    let mut hp = w.hotplug();
    w.add_vif("3", "0", "10.137.0.12", MAC);
    poll_until(&mut hp, &mut links, |e| added(e, "vif3.0"));
    w.remove_vif("3", "0");
    let ev = poll_until(&mut hp, &mut links, |e| removed(e, "vif3.0"));
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(
        links.calls,
        vec![("vif3.0".to_string(), true), ("vif3.0".to_string(), false)]
    );
    assert!(!links.is_up("vif3.0"));
    assert_eq!(hp.connected().count(), 0);
    // Nothing of the directory was recreated by our writes.
    assert!(!w
        .ts
        .exists(Tx::NONE, &World::backend("3", "0"))
        .expect("exists"));
    // The interface already gone (netback removed it first) is not an error.
    w.add_vif("3", "0", "10.137.0.12", MAC);
    poll_until(&mut hp, &mut links, |e| added(e, "vif3.0"));
    links.links.remove("vif3.0");
    w.remove_vif("3", "0");
    poll_until(&mut hp, &mut links, |e| removed(e, "vif3.0"));
}

#[test]
fn online_zero_and_a_closing_or_closed_backend_remove_the_vif() {
    let mut w = World::new();
    let mut links = FakeLinks::with(&["vif3.0", "vif4.0", "vif5.0"]);
    let mut hp = w.hotplug();
    for d in ["3", "4", "5"] {
        w.add_vif(d, "0", &format!("10.137.0.1{d}"), MAC);
    }
    poll_until(&mut hp, &mut links, |e| e.len() == 3);
    w.set("3", "0", "online", "0");
    let ev = poll_until(&mut hp, &mut links, |e| removed(e, "vif3.0"));
    assert_eq!(ev.len(), 1, "{ev:?}");
    w.set("4", "0", "state", "5");
    let ev = poll_until(&mut hp, &mut links, |e| removed(e, "vif4.0"));
    assert_eq!(ev.len(), 1, "{ev:?}");
    w.set("5", "0", "state", "6");
    let ev = poll_until(&mut hp, &mut links, |e| removed(e, "vif5.0"));
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert!(links.links.values().all(|up| !up), "{links:?}");
    // Not connected again while the directory stays offline.
    assert!(poll_for(&mut hp, &mut links, Duration::from_millis(200)).is_empty());
    assert_eq!(links.calls.iter().filter(|(_, up)| *up).count(), 3);
}

#[test]
fn a_vif_whose_interface_appears_late_is_connected_once_it_appears() {
    let mut w = World::new();
    let mut links = FakeLinks::default();
    let mut hp = w.hotplug();
    w.add_vif("3", "0", "10.137.0.12", MAC);
    assert!(poll_for(&mut hp, &mut links, Duration::from_millis(300)).is_empty());
    assert!(links.calls.is_empty());
    assert_eq!(w.read("3", "0", "hotplug-status"), None);
    assert_eq!(hp.retry_in(), Some(RETRY_INTERVAL));
    // Netback creates it: no XenStore change, the next poll connects it.
    links.links.insert("vif3.0".into(), false);
    let ev = hp.poll(&mut links).expect("poll");
    assert!(added(&ev, "vif3.0"), "{ev:?}");
    assert!(links.is_up("vif3.0"));
    assert_eq!(
        w.read("3", "0", "hotplug-status").as_deref(),
        Some("connected")
    );
    assert_eq!(hp.retry_in(), None);
}

#[test]
fn a_vif_whose_interface_never_appears_is_refused_after_the_timeout() {
    let mut w = World::new();
    let mut links = FakeLinks::default();
    let mut hp = w.hotplug_with(Duration::from_millis(300));
    w.add_vif("3", "0", "10.137.0.12", MAC);
    let start = Instant::now();
    let ev = poll_until(&mut hp, &mut links, |e| !refused(e).is_empty());
    assert!(start.elapsed() >= Duration::from_millis(300));
    let r = refused(&ev);
    assert_eq!(r[0].0, "backend/vif/3/0");
    assert!(r[0].1.contains("vif3.0 did not appear"), "{r:?}");
    assert_eq!(w.read("3", "0", "hotplug-status").as_deref(), Some("error"));
    // Appearing after it was given up changes nothing.
    links.links.insert("vif3.0".into(), false);
    assert!(poll_for(&mut hp, &mut links, Duration::from_millis(100)).is_empty());
    assert!(links.calls.is_empty());
}

#[test]
fn names_addresses_and_macs_parse_as_the_scripts_require() {
    assert_eq!(parse_vif_name("vif0.0"), Some((0, 0)));
    assert_eq!(parse_vif_name("vif32751.123456"), Some((32751, 123456)));
    for bad in [
        "vif",
        "vif3",
        "vif3.",
        "vif.0",
        "vif03.0",
        "vif3.00",
        "vif3.0.1",
        "vif-3.0",
        "vif+3.0",
        "eth3.0",
        "vif3.0 ",
        "vif99999.0",
        "vif32751.1234567",
        "vif1.4294967296",
        "vif٣.0",
    ] {
        assert_eq!(parse_vif_name(bad), None, "{bad:?}");
    }
    assert_eq!(
        parse_ip("10.137.0.12"),
        Ok((Ipv4Addr::new(10, 137, 0, 12), None))
    );
    assert_eq!(
        parse_ip("fd09::c 10.137.0.12 10.137.0.13"),
        Ok((
            Ipv4Addr::new(10, 137, 0, 12),
            Some("fd09::c".parse().expect("v6"))
        ))
    );
    for bad in [
        "",
        " ",
        "10.137.0",
        "10.137.0.12 junk",
        "fd09::c",
        "10.137.0.12/24",
    ] {
        assert!(parse_ip(bad).is_err(), "{bad:?}");
    }
    assert_eq!(parse_mac(MAC), Some(MAC_BYTES));
    assert_eq!(
        parse_mac("FE:ff:00:01:02:0a"),
        Some([0xfe, 0xff, 0, 1, 2, 10])
    );
    for bad in [
        "",
        "00:16:3e:5e:6c",
        "00:16:3e:5e:6c:00:01",
        "0:16:3e:5e:6c:00",
        "00:16:3e:5e:6c:+0",
        "00-16-3e-5e-6c-00",
        "00:16:3e:5e:6c:0g",
    ] {
        assert_eq!(parse_mac(bad), None, "{bad:?}");
    }
}

/// A network namespace made for one test, deleted when dropped (also when the test fails).
struct Netns(String);

impl Netns {
    fn new(prefix: &str) -> Netns {
        let name = format!("{prefix}{}", std::process::id());
        // A namespace left by an earlier, killed run of this process id.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        testkit::ip(&["netns", "add", &name]);
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Moves the calling thread into the named namespace (`ip netns` keeps it at
/// `/run/netns/<name>`); netlink sockets it opens afterwards are that namespace's.
fn enter_netns(name: &str) -> io::Result<()> {
    let f = File::open(format!("/run/netns/{name}"))?;
    // SAFETY: `f` is an open namespace file for the whole call; setns(2) reads only the
    // descriptor and the flag and changes the network namespace of this thread alone.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `ip` shows the link administratively up (`UP` among its flags), read with iproute2
/// rather than the code under test.
fn ip_says_up(ns: &str, name: &str) -> bool {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", name])
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip link show {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let flags = text
        .split_once('<')
        .and_then(|(_, r)| r.split_once('>'))
        .map(|(f, _)| f.to_string())
        .unwrap_or_default();
    flags.split(',').any(|f| f == "UP")
}

#[test]
fn kernel_links_bring_a_real_vif_up_and_down() {
    const NAME: &str = "kernel_links_bring_a_real_vif_up_and_down";
    if !testkit::require_root(NAME) {
        return;
    }
    let ns = Netns::new("vbhp-");
    testkit::ip(&[
        "-n", &ns.0, "link", "add", "vif7.0", "type", "veth", "peer", "name", "vif7p",
    ]);
    assert!(!ip_says_up(&ns.0, "vif7.0"));
    let mut w = World::new();
    let hp = w.hotplug();
    let nsname = ns.0.clone();
    // Our thread leaves the test's namespace; the hotplug runs there, XenStore's socket is a
    // path and reaches the server from any namespace.
    let (to_svc, from_test) = std::sync::mpsc::channel::<()>();
    let (to_test, from_svc) = std::sync::mpsc::channel::<Vec<VifEvent>>();
    let svc = std::thread::spawn(move || {
        let mut hp = hp;
        enter_netns(&nsname).expect("setns");
        let mut links = KernelLinks;
        assert!(links.exists("vif7.0"), "vif7.0 not seen in the namespace");
        assert!(!links.exists("vif7.1"));
        assert!(!links.exists("vif7.0-no"));
        let ev = poll_until(&mut hp, &mut links, |e| added(e, "vif7.0"));
        to_test.send(ev).expect("send");
        from_test.recv().expect("told to go on");
        let ev = poll_until(&mut hp, &mut links, |e| removed(e, "vif7.0"));
        to_test.send(ev).expect("send");
        // A name that is not there: the kernel says ENODEV.
        let e = links.set_up("vif7.1", true).expect_err("no vif7.1");
        assert_eq!(e.raw_os_error(), Some(libc::ENODEV), "{e}");
    });
    w.add_vif("7", "0", "10.137.0.17", MAC);
    let ev = from_svc.recv_timeout(WAIT * 2);
    let ev = match ev {
        Ok(ev) => ev,
        Err(_) => {
            let r = svc.join();
            panic!("the service thread gave no Added: {r:?}");
        }
    };
    assert!(added(&ev, "vif7.0"), "{ev:?}");
    assert!(ip_says_up(&ns.0, "vif7.0"), "vif7.0 not UP after Added");
    assert_eq!(
        w.read("7", "0", "hotplug-status").as_deref(),
        Some("connected")
    );
    w.remove_vif("7", "0");
    to_svc.send(()).expect("send");
    let ev = from_svc.recv_timeout(WAIT * 2);
    let r = svc.join();
    let ev = ev.unwrap_or_else(|_| panic!("the service thread gave no Removed: {r:?}"));
    assert!(r.is_ok(), "service thread panicked");
    assert!(removed(&ev, "vif7.0"), "{ev:?}");
    assert!(
        !ip_says_up(&ns.0, "vif7.0"),
        "vif7.0 still UP after Removed"
    );
}

#[test]
fn fake_links_refuse_what_is_not_there() {
    // The fake behaves as the kernel does where the tests rely on it.
    let mut l = FakeLinks::with(&["a"]);
    assert!(l.set_up("a", true).is_ok());
    assert_eq!(
        l.set_up("b", true).map_err(|e| e.raw_os_error()),
        Err(Some(libc::ENODEV))
    );
    assert_eq!(l.calls.len(), 2);
}
