//! `sys-firewall run --qubesdb` against a real QubesDB daemon, in a network namespace of its
//! own: the commit protocol, /qubes-firewall-handled, rules that do not parse, vifs that come
//! and go, status and SIGTERM; over an emulated Xen (the repository's hypervisor broker and
//! XenStore server), dom0's QubesDB over vchan, the vif hotplug step, and `--vifs xen`
//! (clients over our netback, the uplink over our netfront). Also measures the commit-to-enforced time at 10 and 1,000 rules
//! (printed, not asserted: timings never decide a test).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use qubesdb::client::Client;
use qubesdb::server::Server;
use qubesdb::tree::Tree;

static COUNTER: AtomicU32 = AtomicU32::new(0);

use testkit::ip;

/// A network namespace removed on drop, with the service process killed first.
struct Lab {
    ns: String,
    dir: tempfile::TempDir,
    service: Option<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut c) = self.service.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

impl Lab {
    fn new() -> Lab {
        let ns = format!(
            "sfq-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let lab = Lab {
            ns: ns.clone(),
            dir: tempfile::tempdir().expect("tempdir"),
            service: None,
        };
        ip(&["netns", "add", &ns]);
        // No dummy interfaces without kernel modules: veth pairs inside the namespace.
        ip(&[
            "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        lab.add_vif("vif3.0");
        lab
    }

    fn add_vif(&self, name: &str) {
        let peer = format!("{name}p");
        ip(&[
            "-n", &self.ns, "link", "add", name, "type", "veth", "peer", "name", &peer,
        ]);
        ip(&["-n", &self.ns, "link", "set", name, "up"]);
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn start(&mut self, qdb: &Path) {
        self.start_with(&[std::ffi::OsStr::new("--qubesdb"), qdb.as_os_str()]);
    }

    /// Starts the service with these source options.
    fn start_with(&mut self, source: &[&std::ffi::OsStr]) {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                env!("CARGO_BIN_EXE_sys-firewall"),
                "run",
            ])
            .args(source)
            .arg("--control")
            .arg(self.path("control.sock"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.path("service.log")).expect("log file"))
            .spawn()
            .expect("start sys-firewall");
        self.service = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.path("control.sock").exists() {
            assert!(Instant::now() < deadline, "service did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn status(&self) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_sys-firewall"))
            .arg("status")
            .arg("--control")
            .arg(self.path("control.sock"))
            .output()
            .expect("status");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_status(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{s}\nthe service's log:\n{}",
                std::fs::read_to_string(self.path("service.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

const CLIENT: &str = "10.137.0.10";

fn base_tree() -> Tree {
    Tree::from_entries([
        ("/qubes-ip", "10.137.0.6"),
        ("/qubes-gateway", "10.137.0.5"),
        ("/qubes-vif/vif3.0/ip", CLIENT),
        ("/qubes-vif/vif3.0/mac", "00:16:3e:5e:6c:10"),
        ("/qubes-firewall/10.137.0.10", ""),
        ("/qubes-firewall/10.137.0.10/policy", "drop"),
        ("/qubes-firewall/10.137.0.10/0000", "action=accept"),
    ])
    .expect("tree")
}

fn handled(c: &mut Client) -> u64 {
    c.read(&format!("/qubes-firewall-handled/{CLIENT}"))
        .expect("read")
        .map(|v| String::from_utf8_lossy(&v).parse().unwrap_or(0))
        .unwrap_or(0)
}

/// dom0's reload_firewall_for_vm: rm the subtree, write the entries, then the empty write of
/// the base key that commits (reference 1.7).
fn push_rules(c: &mut Client, rules: &[String]) -> Instant {
    c.rm(&format!("/qubes-firewall/{CLIENT}/")).expect("rm");
    c.write(&format!("/qubes-firewall/{CLIENT}/policy"), b"drop")
        .expect("policy");
    for (i, r) in rules.iter().enumerate() {
        c.write(&format!("/qubes-firewall/{CLIENT}/{i:04}"), r.as_bytes())
            .expect("rule");
    }
    let t0 = Instant::now();
    c.write(&format!("/qubes-firewall/{CLIENT}"), b"")
        .expect("commit");
    t0
}

fn wait_handled(c: &mut Client, want: u64) -> Duration {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(10);
    while handled(c) < want {
        assert!(
            Instant::now() < deadline,
            "service never reported handled {want}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    start.elapsed()
}

#[test]
fn commit_protocol_handled_blocking_and_vifs() {
    if !testkit::require_root("commit_protocol_handled_blocking_and_vifs") {
        return;
    }
    let mut lab = Lab::new();
    let sock = lab.path("qubesdb.sock");
    let server = Server::bind(&sock)
        .expect("bind")
        .with_tree(base_tree())
        .spawn()
        .expect("qubesdb");
    lab.start(&sock);
    let mut c = Client::connect(&sock).expect("client");

    // Startup: the rules in the tree are in force and reported.
    wait_handled(&mut c, 1);
    let s = lab.status();
    assert!(
        s.contains("client vif3.0 address 10.137.0.10 rules 1"),
        "{s}"
    );

    // Entries written without the commit are not applied yet.
    c.write(
        &format!("/qubes-firewall/{CLIENT}/0001"),
        b"action=drop proto=udp",
    )
    .expect("write");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        lab.status().contains("rules 1 "),
        "uncommitted rules must wait"
    );
    assert_eq!(handled(&mut c), 1);

    // The commit applies them and bumps the handled counter.
    let rules: Vec<String> = vec!["action=accept proto=tcp dstports=443-443".into(); 3];
    push_rules(&mut c, &rules);
    wait_handled(&mut c, 2);
    assert!(lab.status().contains("rules 3 "), "{}", lab.status());

    // SIGHUP re-reads every client's rules, committed or not, as the agent's reload does.
    c.write(
        &format!("/qubes-firewall/{CLIENT}/0003"),
        b"action=drop proto=udp",
    )
    .expect("write");
    let pid = lab.service.as_ref().expect("service").id();
    let _ = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status();
    wait_handled(&mut c, 3);
    assert!(lab.status().contains("rules 4 "), "{}", lab.status());

    // `sys-firewall reload` does the same through the control socket.
    let out = Command::new(env!("CARGO_BIN_EXE_sys-firewall"))
        .arg("reload")
        .arg("--control")
        .arg(lab.path("control.sock"))
        .output()
        .expect("reload");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.starts_with("ok config-generation "), "{text}");
    wait_handled(&mut c, 4);

    // Rules that do not parse block the client (fail closed).
    push_rules(&mut c, &["proto=tcp".to_string()]);
    wait_handled(&mut c, 5);
    let s = lab.status();
    assert!(s.contains("BLOCKED"), "{s}");
    assert!(s.contains("lack action"), "{s}");

    // A vif that goes away is detached; when it comes back it is attached again.
    ip(&["-n", &lab.ns, "link", "del", "vif3.0"]);
    lab.wait_status("vif3.0 to be waited for", |s| {
        s.contains("waiting for vifs vif3.0")
    });
    lab.add_vif("vif3.0");
    lab.wait_status("vif3.0 to be attached", |s| s.contains("client vif3.0"));

    // SIGTERM stops the service cleanly.
    let mut child = lab.service.take().expect("service");
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().expect("wait");
    assert!(status.success(), "exit status {status}");
    drop(c);
    server.shutdown().expect("shutdown");
}

#[test]
fn commit_to_enforced_latency() {
    if !testkit::require_root("commit_to_enforced_latency") {
        return;
    }
    let mut lab = Lab::new();
    let sock = lab.path("qubesdb.sock");
    let server = Server::bind(&sock)
        .expect("bind")
        .with_tree(base_tree())
        .spawn()
        .expect("qubesdb");
    lab.start(&sock);
    let mut c = Client::connect(&sock).expect("client");
    wait_handled(&mut c, 1);
    let mut want = 1;
    let mut report = Vec::new();
    for n in [10usize, 1000] {
        let rules: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    "action=accept dst4=198.{}.{}.0/24 proto=tcp dstports={}-{}",
                    18 + (i / 250) % 2,
                    i % 250,
                    1000 + i,
                    1000 + i
                )
            })
            .collect();
        let mut samples = Vec::new();
        for _ in 0..5 {
            want += 1;
            let t0 = push_rules(&mut c, &rules);
            wait_handled(&mut c, want);
            samples.push(t0.elapsed());
        }
        samples.sort();
        report.push((n, samples[samples.len() / 2]));
        assert!(lab.status().contains(&format!("rules {n} ")));
    }
    for (n, d) in &report {
        eprintln!(
            "commit-to-enforced at {n:>5} rules: {:.2} ms (median of 5; target 10 ms at 1,000)",
            d.as_secs_f64() * 1000.0
        );
    }
    drop(c);
    server.shutdown().expect("shutdown");
}

/// The `mtu N` of a status line that starts with `prefix`.
fn status_mtu(status: &str, prefix: &str) -> Option<u16> {
    let line = status.lines().find(|l| l.starts_with(prefix))?;
    let w: Vec<&str> = line.split_whitespace().collect();
    w.windows(2)
        .find(|p| p[0] == "mtu")
        .and_then(|p| p[1].parse().ok())
}

#[test]
fn link_mtus_are_read_followed_and_lowered_by_keys() {
    if !testkit::require_root("link_mtus_are_read_followed_and_lowered_by_keys") {
        return;
    }
    let mut lab = Lab::new();
    // A device MTU below 1500 before the service starts: read at attach.
    ip(&["-n", &lab.ns, "link", "set", "vif3.0", "mtu", "1450"]);
    let sock = lab.path("qubesdb.sock");
    let server = Server::bind(&sock)
        .expect("bind")
        .with_tree(base_tree())
        .spawn()
        .expect("qubesdb");
    lab.start(&sock);
    let mut c = Client::connect(&sock).expect("client");
    wait_handled(&mut c, 1);
    lab.wait_status("the vif's MTU read at attach", |s| {
        status_mtu(s, "client vif3.0") == Some(1450) && status_mtu(s, "uplink eth0") == Some(1500)
    });
    // Changes follow netlink, flows or not.
    ip(&["-n", &lab.ns, "link", "set", "eth0", "mtu", "1400"]);
    lab.wait_status("the uplink's MTU change", |s| {
        status_mtu(s, "uplink eth0") == Some(1400)
    });
    // A configured key lowers it; a reload keeps the device's value where it is lower.
    c.write("/qubes-vif/vif3.0/mtu", b"1300").expect("write");
    lab.wait_status("the configured vif MTU", |s| {
        status_mtu(s, "client vif3.0") == Some(1300) && status_mtu(s, "uplink eth0") == Some(1400)
    });
    // A key cannot raise it above the device's.
    c.write("/qubes-uplink-mtu", b"9000").expect("write");
    c.write("/qubes-vif/vif3.0/mtu", b"9000").expect("write");
    lab.wait_status("the device's MTU as the limit", |s| {
        status_mtu(s, "client vif3.0") == Some(1450) && status_mtu(s, "uplink eth0") == Some(1400)
    });
    // A bad value is refused and the running configuration stays.
    c.write("/qubes-vif/vif3.0/mtu", b"60").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_sys-firewall"))
        .arg("reload")
        .arg("--control")
        .arg(lab.path("control.sock"))
        .output()
        .expect("reload");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("/qubes-vif/vif3.0/mtu"), "{text}");
    let s = lab.status();
    assert_eq!(status_mtu(&s, "client vif3.0"), Some(1450), "{s}");
    if let Some(mut child) = lab.service.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
    drop(c);
    server.shutdown().expect("shutdown");
}

/// The firewall qube's domain id in the emulated Xen.
const FIREWALL_DOMID: u16 = 6;

/// An emulated dom0 for the firewall qube (the repository's hypervisor broker and XenStore
/// server, and a QubesDB daemon serving a tree over a vchan on port 111, published in
/// XenStore as libxenvchan does), and the `--qubesdb-vchan` value that reaches it.
struct EmulatedDom0 {
    /// dom0's XenStore connection: the toolstack's.
    toolstack: vif_backend::xen::xenstore::client::Client<std::os::unix::net::UnixStream>,
    qubesdb: vif_backend::xen::qubesdb::Dom0Peer,
    access: String,
    xenstored: vif_backend::xen::xenstore::server::Server,
    hypervisor: vif_backend::xen::emul::HypervisorHandle,
}

impl EmulatedDom0 {
    fn start(lab: &Lab, tree: Tree) -> EmulatedDom0 {
        use vif_backend::xen::emul::{Domain, Hypervisor};
        use vif_backend::xen::qubesdb::Dom0Peer;
        use vif_backend::xen::vchan::Vchan;
        use vif_backend::xen::xenstore::client::Client as XsClient;
        use vif_backend::xen::xenstore::server::Server as XenStored;

        let hv = Hypervisor::serve(lab.path("hv.sock")).expect("hypervisor");
        let xs = XenStored::start(lab.path("xs")).expect("xenstored");
        let xs0 = xs.add_domain(0).expect("dom0's xenstore socket");
        let xs_fw = xs
            .add_domain(FIREWALL_DOMID)
            .expect("the qube's xenstore socket");
        let d0 = Domain::connect(hv.path(), 0).expect("dom0");
        let (mut g0, mut e0) = (d0.grants(), d0.events().expect("events"));
        let (vchan, info) = Vchan::server(&mut g0, &mut e0, FIREWALL_DOMID, 12, 12).expect("vchan");
        let mut toolstack = XsClient::connect(&xs0).expect("dom0 xenstore client");
        Dom0Peer::publish(&mut toolstack, FIREWALL_DOMID, info).expect("publish");
        let qubesdb = Dom0Peer::start(&lab.path("dom0-qubesdb.sock"), tree, vchan, e0)
            .expect("dom0's QubesDB");
        let access = format!(
            "emul:{}:{}:{FIREWALL_DOMID}",
            hv.path().display(),
            xs_fw.display()
        );
        EmulatedDom0 {
            toolstack,
            qubesdb,
            access,
            xenstored: xs,
            hypervisor: hv,
        }
    }

    /// Where the peer process of domain `domid` logs.
    fn peer_log(&self, domid: u16) -> PathBuf {
        self.hypervisor
            .path()
            .with_file_name(format!("peer-{domid}.log"))
    }

    /// The logs of the peers of these domains, for failure messages.
    fn peer_logs(&self, domids: &[u16]) -> String {
        domids
            .iter()
            .map(|d| {
                format!(
                    "peer {d}:\n{}",
                    std::fs::read_to_string(self.peer_log(*d)).unwrap_or_default()
                )
            })
            .collect()
    }

    /// Starts the service on dom0's QubesDB over vchan, serving it on `qubesdb.sock`.
    fn start_service(&self, lab: &mut Lab) {
        let ours = lab.path("qubesdb.sock");
        lab.start_with(&[
            "--qubesdb".as_ref(),
            ours.as_os_str(),
            "--qubesdb-vchan".as_ref(),
            self.access.as_ref(),
        ]);
    }
}

/// Tracker issue 12: the configuration's third source. dom0 is emulated (the repository's
/// hypervisor broker and XenStore server, a QubesDB daemon with a vchan server on port 111
/// published in XenStore as libxenvchan does); the service, given only `--qubesdb-vchan`,
/// finds the vchan, copies dom0's tree into a daemon of its own, applies it, and reports
/// each commit handled, which reaches dom0 back over the vchan.
#[test]
fn qubesdb_over_vchan_from_an_emulated_dom0() {
    if !testkit::require_root("qubesdb_over_vchan_from_an_emulated_dom0") {
        return;
    }
    let mut lab = Lab::new();
    let mut dom0 = EmulatedDom0::start(&lab, base_tree());
    dom0.start_service(&mut lab);
    // dom0's side: the service's first report arrives over the vchan.
    let mut c = Client::connect(dom0.qubesdb.daemon().socket_path()).expect("dom0 client");
    wait_handled(&mut c, 1);
    let s = lab.status();
    assert!(
        s.contains("client vif3.0 address 10.137.0.10 rules 1"),
        "{s}"
    );
    // dom0 commits new rules: pushed over the vchan, applied, reported back.
    push_rules(
        &mut c,
        &vec!["action=accept proto=tcp dstports=443-443".into(); 3],
    );
    wait_handled(&mut c, 2);
    let s = lab.wait_status("the new rules", |s| s.contains("rules 3 "));
    assert!(
        s.contains("client vif3.0 address 10.137.0.10 rules 3"),
        "{s}"
    );
    // The service's own daemon holds dom0's tree, for the qube's other programs.
    let mut local = Client::connect(lab.path("qubesdb.sock")).expect("our daemon");
    assert_eq!(
        local.read("/qubes-ip").expect("read").as_deref(),
        Some(&b"10.137.0.6"[..])
    );
    let s = lab.status();
    assert!(s.contains("qubesdb dom0 link up (vchan)"), "{s}");
    // dom0's side goes (its daemon stopped): said in status, and the rules stay in force.
    dom0.qubesdb.stop().expect("stop dom0's side");
    let s = lab.wait_status("the lost link", |s| s.contains("qubesdb dom0 link LOST"));
    assert!(
        s.contains("client vif3.0 address 10.137.0.10 rules 3"),
        "{s}"
    );
    let log = std::fs::read_to_string(lab.path("service.log")).unwrap_or_default();
    assert!(log.contains("the link to dom0's QubesDB ended"), "{log}");
}

/// Tracker issue 12, the vif hotplug step: with its QubesDB over vchan, the service learns
/// its clients from XenStore as a Qubes netvm does. The toolstack (dom0, scripted) writes a
/// client's `backend/vif/<domid>/<devid>` with Qubes' `ip` key; the service brings the kernel's
/// vif up, tells netback it may connect (`hotplug-status` = `connected`), and enforces the
/// client's rules from dom0's tree; when the toolstack removes the directory, the client goes.
#[test]
fn clients_come_from_xenstore_hotplug_with_qubesdb_over_vchan() {
    use vif_backend::xen::xenstore::{Access, Perm, Store, Tx};

    if !testkit::require_root("clients_come_from_xenstore_hotplug_with_qubesdb_over_vchan") {
        return;
    }
    let mut lab = Lab::new();
    lab.add_vif("vif10.0");
    // dom0's tree as Qubes writes it for a firewall qube: no vif list, that is XenStore's.
    let tree = Tree::from_entries([
        ("/qubes-ip", "10.137.0.6"),
        ("/qubes-gateway", "10.137.0.5"),
        ("/qubes-firewall/10.137.0.10", ""),
        ("/qubes-firewall/10.137.0.10/policy", "drop"),
        ("/qubes-firewall/10.137.0.10/0000", "action=accept"),
    ])
    .expect("tree");
    let mut dom0 = EmulatedDom0::start(&lab, tree);
    dom0.start_service(&mut lab);
    let toolstack = &mut dom0.toolstack;
    let s = lab.status();
    assert!(
        !s.contains("client vif10.0"),
        "a client before the toolstack added it:\n{s}"
    );
    // libxl adds the client's vif in the firewall qube's backend tree, owned by the
    // firewall qube and readable by the client.
    let dir = format!("/local/domain/{FIREWALL_DOMID}/backend/vif/10/0");
    let perms = [
        Perm::new(Access::None, FIREWALL_DOMID),
        Perm::new(Access::Read, 10),
    ];
    let home = format!("/local/domain/{FIREWALL_DOMID}");
    // In one transaction, as libxl__device_generic_add writes a device.
    toolstack
        .transaction(|t, tx| {
            for p in [
                home.clone(),
                format!("{home}/backend"),
                format!("{home}/backend/vif"),
                format!("{home}/backend/vif/10"),
                dir.clone(),
            ] {
                t.mkdir(tx, &p)?;
                t.set_perms(tx, &p, &perms)?;
            }
            for (k, v) in [
                ("frontend", "/local/domain/10/device/vif/0"),
                ("frontend-id", "10"),
                ("mac", "00:16:3e:5e:6c:10"),
                ("handle", "0"),
                ("online", "1"),
                ("state", "1"),
                ("ip", "10.137.0.10"),
            ] {
                let key = format!("{dir}/{k}");
                t.write(tx, &key, v.as_bytes())?;
                t.set_perms(tx, &key, &perms)?;
            }
            Ok(())
        })
        .expect("the toolstack's transaction");
    let s = lab.wait_status("the hotplugged client", |s| {
        s.contains("client vif10.0 address 10.137.0.10")
    });
    assert!(
        s.contains("client vif10.0 address 10.137.0.10 rules 1"),
        "{s}"
    );
    let status = toolstack
        .read_string(Tx::NONE, &format!("{dir}/hotplug-status"))
        .expect("hotplug-status");
    assert_eq!(status, "connected");
    let link = std::process::Command::new("ip")
        .args(["-n", &lab.ns, "-o", "link", "show", "vif10.0"])
        .output()
        .expect("ip link");
    assert!(
        String::from_utf8_lossy(&link.stdout).contains("UP"),
        "{}",
        String::from_utf8_lossy(&link.stdout)
    );
    // The toolstack removes it (the client qube stopped): the client goes.
    toolstack.rm(Tx::NONE, &dir).expect("rm");
    lab.wait_status("the client to go", |s| !s.contains("client vif10.0"));
}

/// The peer side of a Xen vif, in a process of its own (this test binary again, started by
/// [`XenPeer::start`]): a client qube's netfront relayed to a TAP `eth0` in its namespace, or
/// the netvm's netback relayed to a TAP `vif<domid>.0` in the world's. Does nothing unless
/// started so (the variable below names its role).
#[test]
fn xen_peer_process() {
    let Ok(spec) = std::env::var("SFQ_XEN_PEER") else {
        return;
    };
    use vif_backend::xen::device::{open_netback, open_netfront, relay};
    use vif_backend::xen::qubesdb::XenAccess;
    let parts: Vec<&str> = spec.split(' ').collect();
    let [role, access, what, tap] = parts[..] else {
        panic!("SFQ_XEN_PEER {spec:?}: want ROLE ACCESS DIR|VIF TAP");
    };
    let access: XenAccess = access.parse().expect("access");
    // The device first, the TAP after: the TAP appearing tells the test the device is open.
    // A restarted peer may find the emulated hypervisor still holding its predecessor's
    // connection for a moment (a domain has one): it tries again for a while.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut dev = loop {
        let dev = match role {
            "front" => open_netfront(&access, what, "eth0", Duration::from_secs(10)),
            "back" => open_netback(&access, what),
            other => panic!("role {other:?}"),
        };
        match dev {
            Ok(d) => break d,
            Err(e) if Instant::now() < deadline => {
                eprintln!("the Xen device: {e}; again");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("the Xen device: {e}"),
        }
    };
    let mut tap = vif_backend::tap::Tap::open(tap).expect("tap");
    // The qube's kernel sends as a virtio NIC's would: checksums left partial and TCP
    // super-frames, which the ring carries with their netif offload metadata.
    tap.enable_offload().expect("TAP offloads");
    let stop = std::sync::atomic::AtomicBool::new(false);
    relay(dev.as_mut(), &mut tap, &stop).expect("relay");
}

/// A peer process of [`xen_peer_process`], killed on drop.
struct XenPeer(Child);

impl XenPeer {
    /// Starts a peer in namespace `ns` as domain `domid`: `front` on `device/vif/0`, or
    /// `back` for vif `what`; waits for its TAP.
    fn start(
        dom0: &EmulatedDom0,
        ns: &str,
        domid: u16,
        role: &str,
        what: &str,
        tap: &str,
    ) -> XenPeer {
        let xs = dom0
            .xenstored
            .add_domain(domid)
            .expect("the peer's xenstore socket");
        let access = format!(
            "emul:{}:{}:{domid}",
            dom0.hypervisor.path().display(),
            xs.display()
        );
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "xen_peer_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SFQ_XEN_PEER", format!("{role} {access} {what} {tap}"))
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dom0.peer_log(domid))
                    .expect("the peer's log"),
            )
            .spawn()
            .expect("start the peer");
        let peer = XenPeer(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !Command::new("ip")
            .args(["-n", ns, "link", "show", tap])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            assert!(
                Instant::now() < deadline,
                "the peer's TAP {tap} did not appear in {ns}:\n{}",
                dom0.peer_logs(&[domid])
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        peer
    }
}

impl Drop for XenPeer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A namespace removed on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let ns = format!(
            "sfx-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &ns]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        Netns(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Writes a device's two directories as libxl does, in one transaction: the backend's in
/// the backend domain's tree (owned by it, readable by the frontend) and the frontend's in
/// the frontend's (owned by it, readable by the backend).
fn toolstack_adds_vif(
    ts: &mut impl vif_backend::xen::xenstore::Store,
    backend: u16,
    frontend: u16,
    mac: &str,
    ip: &str,
    with_frontend_key: bool,
) {
    use vif_backend::xen::xenstore::{Access, Perm};
    let be = format!("/local/domain/{backend}/backend/vif/{frontend}/0");
    let fe = format!("/local/domain/{frontend}/device/vif/0");
    ts.transaction(|t, tx| {
        for (dir, owner, reader, parents, keys) in [
            (
                &be,
                backend,
                frontend,
                vec![
                    format!("/local/domain/{backend}"),
                    format!("/local/domain/{backend}/backend"),
                    format!("/local/domain/{backend}/backend/vif"),
                    format!("/local/domain/{backend}/backend/vif/{frontend}"),
                ],
                vec![
                    ("frontend", fe.clone()),
                    ("frontend-id", frontend.to_string()),
                    ("mac", mac.to_string()),
                    ("handle", "0".into()),
                    ("online", "1".into()),
                    ("state", "1".into()),
                    ("ip", ip.to_string()),
                ],
            ),
            (
                &fe,
                frontend,
                backend,
                vec![
                    format!("/local/domain/{frontend}"),
                    format!("/local/domain/{frontend}/device"),
                    format!("/local/domain/{frontend}/device/vif"),
                ],
                vec![
                    ("backend", be.clone()),
                    ("backend-id", backend.to_string()),
                    ("mac", mac.to_string()),
                    ("handle", "0".into()),
                    ("state", "1".into()),
                ],
            ),
        ] {
            let perms = [
                Perm::new(Access::None, owner),
                Perm::new(Access::Read, reader),
            ];
            for p in parents.iter().chain([dir]) {
                t.mkdir(tx, p)?;
                t.set_perms(tx, p, &perms)?;
            }
            for (k, v) in keys {
                if k == "frontend" && !with_frontend_key {
                    continue;
                }
                let key = format!("{dir}/{k}");
                t.write(tx, &key, v.as_bytes())?;
                t.set_perms(tx, &key, &perms)?;
            }
        }
        Ok(())
    })
    .expect("the toolstack's transaction");
}

/// A client qube's `eth0` as Qubes sets it up: its MAC and address, the gateway (the
/// firewall's address) on the link, and the default route through it.
fn client_eth0(ns: &str, addr: &str, mac: &str) {
    let addr = format!("{addr}/32");
    for c in [
        ["link", "set", "eth0", "address", mac].as_slice(),
        &["link", "set", "eth0", "up"],
        &["addr", "add", &addr, "dev", "eth0"],
        &["route", "add", "10.137.0.6", "dev", "eth0"],
        &[
            "route",
            "add",
            "default",
            "via",
            "10.137.0.6",
            "dev",
            "eth0",
        ],
    ] {
        let mut args = vec!["-n", ns];
        args.extend_from_slice(c);
        ip(&args);
    }
}

fn in_ns(ns: &str, cmd: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()
        .expect("ip netns exec")
}

/// Tracker issue 12: `sys-firewall run --vifs xen`, the firewall as the Xen back end of its
/// clients and the front end of its uplink, with no kernel network driver between. Every
/// other domain is a process of its own over the emulated hypervisor: two client qubes
/// (netfronts, each relayed to a TAP `eth0` in its namespace, where the kernel's ping and
/// iperf3 run) and the netvm (a netback relayed to a TAP in the world's namespace). The
/// toolstack (dom0, scripted) adds the devices in XenStore. Checked: a device that cannot be
/// opened yet (its backend directory incomplete) is tried again until it can; the xenbus
/// handshake connects all three; the accepted client reaches the world (ICMP, and a TCP bulk transfer
/// whose offloaded frames cross four rings); the other client's refused destination is
/// answered admin-prohibited; a client that comes back as a new process (a restarted
/// frontend finding its old connection) is reset and reconnected, and carries traffic again.
#[test]
fn xen_vifs_carry_clients_over_netback_and_the_uplink_over_netfront() {
    if !testkit::require_root("xen_vifs_carry_clients_over_netback_and_the_uplink_over_netfront") {
        return;
    }
    const NETVM: u16 = 5;
    const A: u16 = 10;
    const B: u16 = 11;
    let mut lab = Lab::new();
    let tree = Tree::from_entries([
        ("/qubes-ip", "10.137.0.6"),
        ("/qubes-gateway", "10.137.0.5"),
        ("/qubes-firewall/10.137.0.10", ""),
        ("/qubes-firewall/10.137.0.10/policy", "drop"),
        ("/qubes-firewall/10.137.0.10/0000", "action=accept"),
        ("/qubes-firewall/10.137.0.11", ""),
        ("/qubes-firewall/10.137.0.11/policy", "accept"),
        (
            "/qubes-firewall/10.137.0.11/0000",
            "action=drop dst4=198.18.0.10/32",
        ),
    ])
    .expect("tree");
    let mut dom0 = EmulatedDom0::start(&lab, tree);
    // The world: the netvm's end of the firewall's uplink, and a host beyond it.
    let world = Netns::new("w");
    toolstack_adds_vif(
        &mut dom0.toolstack,
        NETVM,
        FIREWALL_DOMID,
        "00:16:3e:5e:6c:06",
        "10.137.0.6",
        true,
    );
    let _netvm = XenPeer::start(&dom0, &world.0, NETVM, "back", "vif6.0", "vif6.0");
    for c in [
        "link set vif6.0 up",
        "addr add 10.137.0.5/32 dev vif6.0",
        "route add 10.137.0.6/32 dev vif6.0",
        "addr add 198.18.0.10/32 dev lo",
    ] {
        let mut args = vec!["-n", world.0.as_str()];
        args.extend(c.split(' '));
        ip(&args);
    }
    let ours = lab.path("qubesdb.sock");
    lab.start_with(&[
        "--qubesdb".as_ref(),
        ours.as_os_str(),
        "--qubesdb-vchan".as_ref(),
        dom0.access.as_ref(),
        "--vifs".as_ref(),
        "xen".as_ref(),
    ]);
    let clients: Vec<(u16, &str, &str, Netns)> = vec![
        (A, "10.137.0.10", "00:16:3e:5e:6c:0a", Netns::new("a")),
        (B, "10.137.0.11", "00:16:3e:5e:6c:0b", Netns::new("b")),
    ];
    let mut peers = Vec::new();
    for (domid, addr, mac, ns) in &clients {
        // Client B's backend directory lacks its `frontend` key for a while: the service
        // cannot open the device, and tries again until it can (no netlink event will say).
        let complete = *domid != B;
        toolstack_adds_vif(
            &mut dom0.toolstack,
            FIREWALL_DOMID,
            *domid,
            mac,
            addr,
            complete,
        );
        if !complete {
            lab.wait_status("client B listed, its device not open", |s| {
                s.contains("client vif11.0 ") && !s.contains("backend/vif/11/0")
            });
            std::thread::sleep(Duration::from_millis(1500));
            let log = std::fs::read_to_string(lab.path("service.log")).unwrap_or_default();
            assert!(log.contains("cannot attach"), "{log}");
            use vif_backend::xen::xenstore::Store as _;
            dom0.toolstack
                .write(
                    vif_backend::xen::xenstore::Tx::NONE,
                    &format!("/local/domain/{FIREWALL_DOMID}/backend/vif/{B}/0/frontend"),
                    format!("/local/domain/{B}/device/vif/0").as_bytes(),
                )
                .expect("the frontend key");
        }
        peers.push(XenPeer::start(
            &dom0,
            &ns.0,
            *domid,
            "front",
            "device/vif/0",
            "eth0",
        ));
        client_eth0(&ns.0, addr, mac);
    }
    let connected = |s: &str, vif: &str| {
        s.lines()
            .skip_while(|l| !l.starts_with(&format!("client {vif} ")))
            .take(4)
            .any(|l| l.contains("xen netback") && l.contains(" connected"))
    };
    let s = lab.wait_status("all three devices connected", |s| {
        connected(s, "vif10.0")
            && connected(s, "vif11.0")
            && s.lines()
                .any(|l| l.contains("device xen netfront connected"))
    });
    assert!(
        s.contains("client vif10.0 address 10.137.0.10 rules 1"),
        "{s}"
    );
    let ping = |ns: &str| {
        let mut last = None;
        for _ in 0..5 {
            let o = in_ns(ns, &["ping", "-n", "-c", "1", "-W", "2", "198.18.0.10"]);
            let ok = o.status.success();
            last = Some(o);
            if ok {
                break;
            }
        }
        last.expect("ran")
    };
    let a = ping(&clients[0].3 .0);
    assert!(
        a.status.success(),
        "client A's ping through the rings failed:\n{}\n{}\nthe service's log:\n{}",
        String::from_utf8_lossy(&a.stdout),
        lab.status(),
        std::fs::read_to_string(lab.path("service.log")).unwrap_or_default()
    );
    let b = in_ns(
        &clients[1].3 .0,
        &["ping", "-n", "-c", "1", "-W", "2", "198.18.0.10"],
    );
    let b_out = String::from_utf8_lossy(&b.stdout);
    assert!(
        !b.status.success(),
        "client B reached a refused destination:\n{b_out}"
    );
    assert!(
        b_out.contains("Packet filtered"),
        "client B was not told admin-prohibited:\n{b_out}"
    );
    // A TCP bulk transfer: the clients' kernels hand their TAPs super-frames, which cross
    // the client's ring, the firewall, the uplink's ring and the netvm's TAP whole.
    let mut server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &world.0,
            "iperf3",
            "-s",
            "-1",
            "-B",
            "198.18.0.10",
            "-p",
            "5201",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(300));
    let t = in_ns(
        &clients[0].3 .0,
        &[
            "iperf3",
            "-c",
            "198.18.0.10",
            "-p",
            "5201",
            "-n",
            "16M",
            "--connect-timeout",
            "3000",
        ],
    );
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        t.status.success(),
        "the TCP transfer through the rings failed:\n{}{}\n{}",
        String::from_utf8_lossy(&t.stdout),
        String::from_utf8_lossy(&t.stderr),
        lab.status()
    );
    // 16 MiB in wire-sized segments would be over 11,000 frames each way; super-frames
    // (GSO, with their netif extra-info slot) crossed the client's ring and the uplink's
    // whole.
    let after_bulk = lab.status();
    let frames = |dev: &str, dir: &str| -> u64 {
        let line = after_bulk
            .lines()
            .find(|l| l.contains(dev))
            .unwrap_or_else(|| panic!("no {dev} line:\n{after_bulk}"));
        let mut words = line.split_whitespace();
        words.find(|w| *w == dir);
        words.next().and_then(|n| n.parse().ok()).expect("a count")
    };
    let wire = 16 * 1024 * 1024 / 1448;
    assert!(
        frames("backend/vif/10/0 connected", "rx") < wire / 4
            && frames("xen netfront connected", "tx") < wire / 4,
        "the transfer crossed the rings in wire-sized frames:\n{after_bulk}"
    );
    // Client A's domain restarts its frontend (a new process, as after a crash or a
    // driver reload): it finds its old connection, resets it, and connects afresh.
    let before = lab.status();
    drop(peers.remove(0));
    peers.insert(
        0,
        XenPeer::start(&dom0, &clients[0].3 .0, A, "front", "device/vif/0", "eth0"),
    );
    client_eth0(&clients[0].3 .0, clients[0].1, clients[0].2);
    lab.wait_status("client A's second connection", |s| {
        s.lines()
            .any(|l| l.contains("backend/vif/10/0 connected") && l.contains("connects 2"))
    });
    let a = ping(&clients[0].3 .0);
    assert!(
        a.status.success(),
        "client A's ping after its reconnect failed:\nbefore:\n{before}\nafter:\n{}\n\
         the service's log:\n{}\n{}",
        lab.status(),
        std::fs::read_to_string(lab.path("service.log")).unwrap_or_default(),
        dom0.peer_logs(&[A, NETVM])
    );
}

/// `--vifs xen` learns the vifs from XenStore through `--qubesdb-vchan`: without it the
/// service refuses to start (exit 2, saying what is missing) rather than fall back to kernel
/// interfaces the operator did not ask for.
#[test]
fn vifs_xen_without_qubesdb_vchan_is_refused() {
    for source in [
        ["--config", "/dev/null"],
        ["--qubesdb", "/nonexistent.sock"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_sys-firewall"))
            .arg("run")
            .args(source)
            .args(["--vifs", "xen", "--control", "/nonexistent/control.sock"])
            .output()
            .expect("sys-firewall");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{source:?}: {err}");
        assert!(err.contains("--qubesdb-vchan"), "{source:?}: {err}");
    }
}
