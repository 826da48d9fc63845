//! The images boot and work: each one under QEMU (software emulation), its virtio NICs on TAP
//! devices in network namespaces the test creates, traffic from a client namespace through
//! the VM to a world namespace; and two builds give the same bytes.
//!
//! The images are built from the binaries of the profile the test was built in (the debug
//! ones under `cargo test`); bench/images.sh measures the release images.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use qube_image::build::{self, ImageSpec, Service};
use qube_image::kernel;
use qube_image::qemu::{write_config_disk, Nic, Vm, VmSpec};

/// target/<profile>
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_path_buf()
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// Builds the binaries the test runs (a no-op when cargo already has them).
fn ensure_binaries(packages: &[&str]) {
    let release = profile_dir().ends_with("release");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace()).args(["build", "--locked"]);
    if release {
        cmd.arg("--release");
    }
    for p in packages {
        cmd.args(["-p", p]);
    }
    let st = cmd.status().expect("run cargo build");
    assert!(st.success(), "cargo build {packages:?} failed");
}

fn image(service: Service, out: &Path) -> build::Built {
    let cache = workspace().join("target/qube-image-cache");
    let k = kernel::prepare(kernel::PINNED, &cache, &mut |m| eprintln!("kernel: {m}"))
        .unwrap_or_else(|e| panic!("kernel: {e}"));
    let spec = ImageSpec {
        service,
        binary: profile_dir().join(service.name()),
        config: None,
        out_dir: out.to_path_buf(),
    };
    build::build(&spec, &k, &mut |m| eprintln!("{m}")).unwrap_or_else(|e| panic!("build: {e}"))
}

fn can_run(test: &str) -> bool {
    if !testkit::require_root(test) {
        return false;
    }
    for tool in [
        "qemu-system-x86_64",
        "apt-get",
        "dpkg-deb",
        "depmod",
        "strip",
        "ldd",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            testkit::not_run(
                test,
                &format!("{tool} is not installed (scripts/setup-debian.sh)"),
            );
            return false;
        }
    }
    true
}

fn ip(args: &[&str]) {
    testkit::ip(args);
}

/// Namespaces and files of one test, removed however it ends.
struct Scratch {
    namespaces: Vec<String>,
    dir: PathBuf,
    procs: Vec<std::process::Child>,
}

impl Scratch {
    fn new(tag: &str, names: &[&str]) -> Scratch {
        let pid = std::process::id();
        let namespaces: Vec<String> = names.iter().map(|n| format!("qi{tag}{n}{pid}")).collect();
        for ns in &namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let dir = std::env::temp_dir().join(format!("qube-image-{tag}-{pid}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch {
            namespaces,
            dir,
            procs: Vec::new(),
        }
    }

    fn ns(&self, i: usize) -> &str {
        &self.namespaces[i]
    }

    /// Starts `qubes-lab` (the lab's servers and probes) in a namespace, in the background.
    fn spawn_lab(&mut self, ns: &str, args: &[&str]) {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(profile_dir().join("qubes-lab"))
            .args(args)
            .spawn()
            .expect("start qubes-lab");
        self.procs.push(child);
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `qubes-lab probe ...` inside `ns`; its one-line outcome.
fn probe(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(profile_dir().join("qubes-lab"))
        .arg("probe")
        .args(args)
        .output()
        .expect("run qubes-lab probe");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Waits for QEMU to have made `tap` in `ns`, then moves it into `to` as `name`.
fn move_tap(ns: &str, tap: &str, to: &str, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Command::new("ip")
        .args(["-n", ns, "link", "show", tap])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "QEMU made no TAP {tap} in {ns}");
        std::thread::sleep(Duration::from_millis(50));
    }
    if ns != to {
        ip(&["-n", ns, "link", "set", tap, "netns", to]);
    }
    if tap != name {
        ip(&["-n", to, "link", "set", tap, "name", name]);
    }
}

/// A client qube's side of a vif, as Qubes sets it up: its /32 address, the gateway on-link
/// with Qubes' backend MAC, the default route through it.
fn client_side(ns: &str, dev: &str, mac: &str, addr: Ipv4Addr, gw: Ipv4Addr) {
    let (a, g) = (format!("{addr}/32"), gw.to_string());
    ip(&["-n", ns, "link", "set", dev, "address", mac]);
    ip(&["-n", ns, "address", "add", &a, "dev", dev]);
    ip(&["-n", ns, "link", "set", dev, "up"]);
    ip(&[
        "-n",
        ns,
        "neighbour",
        "replace",
        "to",
        &g,
        "dev",
        dev,
        "lladdr",
        "fe:ff:ff:ff:ff:ff",
        "nud",
        "permanent",
    ]);
    ip(&["-n", ns, "route", "add", &g, "dev", dev, "scope", "link"]);
    ip(&[
        "-n", ns, "route", "add", "default", "via", &g, "dev", dev, "onlink",
    ]);
}

fn wait_for_file(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

const UPLINK_MAC: &str = "52:54:00:00:00:01";
const VIF_MAC: &str = "52:54:00:00:00:02";
const CLIENT_MAC: &str = "00:16:3e:5e:6c:0a";
const BOOT: Duration = Duration::from_secs(180);

/// The sys-firewall qube's QubesDB, as dom0 writes it for a ProxyVM behind sys-net
/// (10.137.0.5) with one client, 10.137.0.10, allowed TCP port 8080 only.
const FIREWALL_YAML: &str = "\
uplink: {name: eth0}
qubesdb:
  /name: sys-firewall
  /qubes-vm-type: ProxyVM
  /qubes-ip: 10.137.0.6
  /qubes-netmask: 255.255.255.255
  /qubes-gateway: 10.137.0.5
  /qubes-primary-dns: 10.139.1.1
  /qubes-secondary-dns: 10.139.1.2
  /qubes-netvm-network: 10.137.0.6
  /qubes-netvm-gateway: 10.137.0.6
  /qubes-netvm-netmask: 255.255.255.255
  /qubes-netvm-primary-dns: 10.139.1.1
  /qubes-netvm-secondary-dns: 10.139.1.2
  /qubes-firewall/10.137.0.10: ''
  /qubes-firewall/10.137.0.10/policy: drop
  /qubes-firewall/10.137.0.10/0000: action=accept proto=tcp dstports=8080-8080
vifs:
  - {name: vif3.0, ip: 10.137.0.10, mac: '00:16:3e:5e:6c:0a'}
";

#[test]
fn sys_firewall_image_forwards_rejects_and_powers_off_on_the_power_button() {
    const NAME: &str = "sys_firewall_image_forwards_rejects_and_powers_off_on_the_power_button";
    if !can_run(NAME) {
        return;
    }
    ensure_binaries(&["sys-firewall", "qubes-lab"]);
    let mut s = Scratch::new("f", &["w", "c"]);
    let (world, client) = (s.ns(0).to_string(), s.ns(1).to_string());
    let built = image(Service::SysFirewall, &s.dir);
    let disk = s.dir.join("config.disk");
    write_config_disk(&disk, FIREWALL_YAML).expect("config disk");

    let mut vm = Vm::start(&VmSpec {
        image: built.dir.clone(),
        memory_mib: 128,
        cmdline: format!(
            "quiet qubes.config=/dev/vda ifname=eth0:{UPLINK_MAC} ifname=vif3.0:{VIF_MAC}"
        ),
        nics: vec![
            Nic {
                tap: "fwup".into(),
                mac: UPLINK_MAC.into(),
            },
            Nic {
                tap: "fwvif".into(),
                mac: VIF_MAC.into(),
            },
        ],
        disk: Some(disk),
        netns: Some(world.clone()),
        monitor: s.dir.join("monitor.sock"),
    })
    .expect("start QEMU");
    // The world stands in for sys-net (10.137.0.5) and holds the web server.
    move_tap(&world, "fwup", &world, "fwup");
    ip(&[
        "-n",
        &world,
        "address",
        "add",
        "10.137.0.5/24",
        "dev",
        "fwup",
    ]);
    ip(&[
        "-n",
        &world,
        "address",
        "add",
        "198.18.0.10/32",
        "dev",
        "fwup",
    ]);
    ip(&["-n", &world, "link", "set", "fwup", "up"]);
    move_tap(&world, "fwvif", &client, "eth0");
    client_side(
        &client,
        "eth0",
        CLIENT_MAC,
        "10.137.0.10".parse().expect("test data"),
        "10.137.0.6".parse().expect("test data"),
    );
    let ready = s.dir.join("http.ready");
    let r = ready.display().to_string();
    s.spawn_lab(
        &world,
        &[
            "serve-http",
            "198.18.0.10:8080",
            "198.18.0.10:8081",
            "--ready-file",
            &r,
        ],
    );
    wait_for_file(&ready, "the web server");

    let t = vm
        .wait_for("sys-firewall running", BOOT)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("sys-firewall ready {t:?} after QEMU started");
    let console = vm.console();
    assert!(console.contains("links up: eth0 lo vif3.0"), "{console}");
    assert!(console.contains("configuration from /dev/vda"), "{console}");

    let ok = probe(
        &client,
        &["tcp", "198.18.0.10:8080", "--http", "--timeout-ms", "10000"],
    );
    assert!(
        ok.starts_with("ok ") && ok.contains("http 200"),
        "allowed port: {ok}\n{}",
        vm.tail()
    );
    let refused = probe(
        &client,
        &["tcp", "198.18.0.10:8081", "--timeout-ms", "10000"],
    );
    assert!(
        refused.starts_with("rejected ")
            && refused.contains("icmp admin-prohibited from 10.137.0.6"),
        "refused port: {refused}\n{}",
        vm.tail()
    );

    vm.monitor("system_powerdown").expect("QEMU monitor");
    let st = vm.wait_exit(Duration::from_secs(60));
    let console = vm.console();
    assert!(st.is_some(), "the guest did not power off:\n{}", vm.tail());
    assert!(
        console.contains("power button pressed: stopping"),
        "{console}"
    );
    assert!(console.contains("sys-firewall: stopped"), "{console}");
    assert!(console.contains("reboot: Power down"), "{console}");
    assert!(!console.contains("Kernel panic"), "{console}");
}

/// sys-net (10.137.0.5) with one client, sys-firewall's address 10.137.0.6, whose rules accept.
const NET_YAML: &str = "\
uplink: {name: eth0}
qubesdb:
  /name: sys-net
  /qubes-vm-type: NetVM
  /qubes-netvm-network: 10.137.0.5
  /qubes-netvm-gateway: 10.137.0.5
  /qubes-netvm-netmask: 255.255.255.255
  /qubes-netvm-primary-dns: 10.139.1.1
  /qubes-netvm-secondary-dns: 10.139.1.2
  /qubes-firewall/10.137.0.6: ''
  /qubes-firewall/10.137.0.6/policy: accept
vifs:
  - {name: vif2.0, ip: 10.137.0.6, mac: '00:16:3e:5e:6c:0a'}
";

#[test]
fn sys_net_image_takes_its_lease_from_dnsmasq_and_carries_a_client() {
    const NAME: &str = "sys_net_image_takes_its_lease_from_dnsmasq_and_carries_a_client";
    if !can_run(NAME) {
        return;
    }
    if Command::new("sh")
        .args(["-c", "command -v dnsmasq"])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        testkit::not_run(NAME, "dnsmasq is not installed (scripts/setup-debian.sh)");
        return;
    }
    ensure_binaries(&["sys-net", "qubes-lab"]);
    let mut s = Scratch::new("n", &["w", "c"]);
    let (world, client) = (s.ns(0).to_string(), s.ns(1).to_string());
    let built = image(Service::SysNet, &s.dir);
    let disk = s.dir.join("config.disk");
    write_config_disk(&disk, NET_YAML).expect("config disk");
    let mut vm = Vm::start(&VmSpec {
        image: built.dir.clone(),
        memory_mib: 128,
        cmdline: format!(
            "quiet qubes.config=/dev/vda ifname=eth0:{UPLINK_MAC} ifname=vif2.0:{VIF_MAC}"
        ),
        nics: vec![
            Nic {
                tap: "netup".into(),
                mac: UPLINK_MAC.into(),
            },
            Nic {
                tap: "netvif".into(),
                mac: VIF_MAC.into(),
            },
        ],
        disk: Some(disk),
        netns: Some(world.clone()),
        monitor: s.dir.join("monitor.sock"),
    })
    .expect("start QEMU");
    move_tap(&world, "netup", &world, "netup");
    ip(&[
        "-n",
        &world,
        "address",
        "add",
        "198.18.0.1/24",
        "dev",
        "netup",
    ]);
    ip(&[
        "-n",
        &world,
        "address",
        "add",
        "198.18.0.10/32",
        "dev",
        "netup",
    ]);
    ip(&["-n", &world, "link", "set", "netup", "up"]);
    move_tap(&world, "netvif", &client, "eth0");
    client_side(
        &client,
        "eth0",
        CLIENT_MAC,
        "10.137.0.6".parse().expect("test data"),
        "10.137.0.5".parse().expect("test data"),
    );
    let leases = s.dir.join("dhcp.leases");
    let dnsmasq = Command::new("ip")
        .args([
            "netns",
            "exec",
            &world,
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
        ])
        .args(["--port=0", "--interface=netup", "--bind-interfaces"])
        .args(["--dhcp-range=198.18.0.100,198.18.0.150,255.255.255.0,2m"])
        .args([
            "--dhcp-option=option:router,198.18.0.1",
            "--dhcp-option=option:dns-server,198.18.0.53",
        ])
        .arg(format!("--dhcp-leasefile={}", leases.display()))
        .arg(format!(
            "--pid-file={}",
            s.dir.join("dnsmasq.pid").display()
        ))
        .args(["--log-dhcp", "--log-facility=-"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start dnsmasq");
    s.procs.push(dnsmasq);
    let ready = s.dir.join("http.ready");
    let r = ready.display().to_string();
    s.spawn_lab(
        &world,
        &["serve-http", "198.18.0.10:8080", "--ready-file", &r],
    );
    wait_for_file(&ready, "the web server");

    vm.wait_for("sys-net running", BOOT)
        .unwrap_or_else(|e| panic!("{e}"));
    let t = vm
        .wait_for("DHCP lease", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("sys-net leased {t:?} after QEMU started");
    let console = vm.console();
    let lease_line = console
        .lines()
        .find(|l| l.contains("DHCP lease"))
        .unwrap_or_default()
        .to_string();
    assert!(lease_line.contains("router=198.18.0.1"), "{lease_line}");
    let leased = std::fs::read_to_string(&leases).unwrap_or_default();
    let addr = leased
        .lines()
        .find(|l| l.contains(UPLINK_MAC))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or_else(|| panic!("dnsmasq leased nothing to {UPLINK_MAC}: {leased:?}"))
        .to_string();
    assert!(
        lease_line.contains(&format!("address={addr}")),
        "dnsmasq gave {addr}: {lease_line}"
    );

    let ok = probe(
        &client,
        &["tcp", "198.18.0.10:8080", "--http", "--timeout-ms", "10000"],
    );
    assert!(
        ok.starts_with("ok ") && ok.contains("http 200"),
        "client through sys-net: {ok}\n{}",
        vm.tail()
    );

    vm.monitor("system_powerdown").expect("QEMU monitor");
    assert!(
        vm.wait_exit(Duration::from_secs(60)).is_some(),
        "no power off:\n{}",
        vm.tail()
    );
    assert!(vm.console().contains("reboot: Power down"));
}

#[test]
fn two_builds_of_an_image_are_byte_identical() {
    const NAME: &str = "two_builds_of_an_image_are_byte_identical";
    for tool in ["apt-get", "dpkg-deb", "depmod", "strip", "ldd"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            testkit::not_run(
                NAME,
                &format!("{tool} is not installed (scripts/setup-debian.sh)"),
            );
            return;
        }
    }
    ensure_binaries(&["sys-firewall"]);
    let dir = std::env::temp_dir().join(format!("qube-image-repro-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let a = image(Service::SysFirewall, &dir.join("a"));
    let b = image(Service::SysFirewall, &dir.join("b"));
    for f in ["vmlinuz", "initramfs", "SHA256SUMS"] {
        let (x, y) = (
            std::fs::read(a.dir.join(f)).expect("test data"),
            std::fs::read(b.dir.join(f)).expect("test data"),
        );
        assert!(x == y, "{f} differs between two builds");
    }
    assert_eq!(a.sha256, b.sha256);
    // SHA256SUMS checks the files it sits beside.
    let check = Command::new("sha256sum")
        .arg("-c")
        .arg("SHA256SUMS")
        .current_dir(&a.dir)
        .output()
        .expect("test data");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    // The initramfs holds what the image needs and nothing else.
    let files = initramfs_files(&a.dir.join("initramfs"));
    let mut want: Vec<String> = vec!["init".into(), "lib/modules/load-order".into()];
    want.extend(
        a.libraries
            .iter()
            .map(|l| l.trim_start_matches('/').to_string()),
    );
    want.extend(a.modules.iter().map(|m| format!("lib/modules/{m}.ko")));
    want.sort();
    assert_eq!(files, want);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The regular files in a gzip'd newc initramfs, read as the kernel reads it.
fn initramfs_files(path: &Path) -> Vec<String> {
    use std::io::Read;
    let mut cpio = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).expect("test data"))
        .read_to_end(&mut cpio)
        .expect("test data");
    let mut files = Vec::new();
    let mut at = 0;
    loop {
        let field = |i: usize| {
            let s = std::str::from_utf8(&cpio[at + 6 + 8 * i..at + 14 + 8 * i]).expect("test data");
            u32::from_str_radix(s, 16).expect("test data") as usize
        };
        assert_eq!(&cpio[at..at + 6], b"070701");
        let (mode, size, namesize) = (field(1), field(6), field(11));
        let name =
            String::from_utf8(cpio[at + 110..at + 110 + namesize - 1].to_vec()).expect("test data");
        if name == "TRAILER!!!" {
            break;
        }
        if mode & 0o170000 == 0o100000 {
            files.push(name);
        }
        let data = (at + 110 + namesize).div_ceil(4) * 4;
        at = (data + size).div_ceil(4) * 4;
    }
    files.sort();
    files
}
