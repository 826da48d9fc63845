//! `sys-firewall run --qubesdb` against a real QubesDB daemon, in a network namespace of its
//! own: the commit protocol, /qubes-firewall-handled, rules that do not parse, vifs that come
//! and go, status and SIGTERM. Also measures the commit-to-enforced time at 10 and 1,000 rules
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
    _xenstored: vif_backend::xen::xenstore::server::Server,
    _hypervisor: vif_backend::xen::emul::HypervisorHandle,
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
            _xenstored: xs,
            _hypervisor: hv,
        }
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
    let dom0 = EmulatedDom0::start(&lab, base_tree());
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
