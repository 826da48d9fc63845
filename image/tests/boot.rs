//! The images boot and work: each one under QEMU (software emulation), its virtio NICs on TAP
//! devices in network namespaces the test creates, traffic from a client namespace through
//! the VM to a world namespace; and two builds give the same bytes.
//!
//! The images are built from the binaries of the profile the test was built in (the debug
//! ones under `cargo test`); bench/images.sh measures the release images.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use qube_image::build::{self, ImageSpec, Service};
use qube_image::kernel;
use qube_image::testbed::{Bed, BedKind, BedSpec, UPLINK_MAC};

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

/// Builds the binaries the test runs when they are missing. `cargo test --workspace` (the
/// suite) has built them, fresh, before any test runs; building them again here would not be a
/// no-op: `cargo build -p ...` resolves features differently from `cargo test --workspace` and
/// recompiles half the dependency tree (minutes of CI). Run alone (`cargo test -p
/// qube-image`), the test uses whatever binaries the last build left: it says which.
fn ensure_binaries(packages: &[&str]) {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !profile_dir().join(p).is_file())
        .collect();
    for p in packages.iter().filter(|p| !missing.contains(p)) {
        let age = std::fs::metadata(profile_dir().join(p))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .map(|d| d.as_secs())
            .unwrap_or(0);
        eprintln!(
            "using {} (built {age} s ago)",
            profile_dir().join(p).display()
        );
    }
    if missing.is_empty() {
        return;
    }
    let packages = missing;
    let release = profile_dir().ends_with("release");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace()).args(["build", "--locked"]);
    if release {
        cmd.arg("--release");
    }
    for p in &packages {
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

const BOOT: Duration = Duration::from_secs(180);

fn bed(kind: BedKind, image: &Path, tag: &str) -> Bed {
    Bed::start(&BedSpec {
        kind,
        image: image.to_path_buf(),
        memory_mib: 128,
        lab: profile_dir().join("qubes-lab"),
        cmdline: "quiet".into(),
        tag: tag.into(),
        yaml: None,
        world: None,
    })
    .unwrap_or_else(|e| panic!("test bed: {e}"))
}

#[test]
fn sys_firewall_image_forwards_rejects_and_powers_off_on_the_power_button() {
    const NAME: &str = "sys_firewall_image_forwards_rejects_and_powers_off_on_the_power_button";
    if !can_run(NAME) {
        return;
    }
    ensure_binaries(&["sys-firewall", "qubes-lab"]);
    let out = scratch("fw");
    let built = image(Service::SysFirewall, &out);
    let mut bed = bed(BedKind::Firewall, &built.dir, "f");

    let t = bed
        .vm
        .wait_for("sys-firewall running", BOOT)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("sys-firewall ready {t:?} after QEMU started");
    let console = bed.vm.console();
    assert!(console.contains("links up: eth0 lo vif3.0"), "{console}");
    assert!(console.contains("configuration from /dev/vda"), "{console}");

    // The client's one rule: TCP 8080 accepted, everything else dropped with a reject.
    let ok = bed.fetch(8080, 10_000);
    assert!(
        ok.starts_with("ok ") && ok.contains("http 200"),
        "allowed port: {ok}\n{}",
        bed.vm.tail()
    );
    let refused = bed.probe(&["tcp", "198.18.0.10:8081", "--timeout-ms", "10000"]);
    assert!(
        refused.starts_with("rejected ")
            && refused.contains("icmp admin-prohibited from 10.137.0.6"),
        "refused port: {refused}\n{}",
        bed.vm.tail()
    );

    bed.vm.monitor("system_powerdown").expect("QEMU monitor");
    let st = bed.vm.wait_exit(Duration::from_secs(60));
    let console = bed.vm.console();
    assert!(
        st.is_some(),
        "the guest did not power off:\n{}",
        bed.vm.tail()
    );
    assert!(
        console.contains("power button pressed: stopping"),
        "{console}"
    );
    assert!(console.contains("sys-firewall: memory: VmRSS"), "{console}");
    assert!(console.contains("sys-firewall: stopped"), "{console}");
    assert!(console.contains("reboot: Power down"), "{console}");
    assert!(!console.contains("Kernel panic"), "{console}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn sys_net_image_takes_its_lease_from_dnsmasq_and_carries_a_client() {
    const NAME: &str = "sys_net_image_takes_its_lease_from_dnsmasq_and_carries_a_client";
    if !can_run(NAME) {
        return;
    }
    if !have("dnsmasq") {
        testkit::not_run(NAME, "dnsmasq is not installed (scripts/setup-debian.sh)");
        return;
    }
    ensure_binaries(&["sys-net", "qubes-lab"]);
    let out = scratch("net");
    let built = image(Service::SysNet, &out);
    let mut bed = bed(BedKind::Net, &built.dir, "n");

    bed.vm
        .wait_for("sys-net running", BOOT)
        .unwrap_or_else(|e| panic!("{e}"));
    let t = bed
        .vm
        .wait_for("DHCP lease", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("sys-net leased {t:?} after QEMU started");
    // The whole line: under emulation its end may come a while after its start.
    let lease_line = bed
        .vm
        .wait_for_line("DHCP lease", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(lease_line.contains("router=198.18.0.1"), "{lease_line}");
    // dnsmasq's lease file: "<expiry> <mac> <address> <hostname> <client-id>".
    let leased = std::fs::read_to_string(bed.dir.join("dhcp.leases")).unwrap_or_default();
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

    let ok = bed.fetch(8080, 10_000);
    assert!(
        ok.starts_with("ok ") && ok.contains("http 200"),
        "client through sys-net: {ok}\n{}",
        bed.vm.tail()
    );

    bed.vm.monitor("system_powerdown").expect("QEMU monitor");
    assert!(
        bed.vm.wait_exit(Duration::from_secs(60)).is_some(),
        "no power off:\n{}",
        bed.vm.tail()
    );
    assert!(bed.vm.console().contains("reboot: Power down"));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn two_builds_of_an_image_are_byte_identical() {
    const NAME: &str = "two_builds_of_an_image_are_byte_identical";
    for tool in ["apt-get", "dpkg-deb", "depmod", "strip", "ldd"] {
        if !have(tool) {
            testkit::not_run(
                NAME,
                &format!("{tool} is not installed (scripts/setup-debian.sh)"),
            );
            return;
        }
    }
    ensure_binaries(&["sys-firewall"]);
    let dir = scratch("repro");
    let a = image(Service::SysFirewall, &dir.join("a"));
    let b = image(Service::SysFirewall, &dir.join("b"));
    for f in ["vmlinuz", "initramfs", "SHA256SUMS"] {
        let x = std::fs::read(a.dir.join(f)).expect("first build");
        let y = std::fs::read(b.dir.join(f)).expect("second build");
        assert!(x == y, "{f} differs between two builds");
    }
    assert_eq!(a.sha256, b.sha256);
    // SHA256SUMS checks the files it sits beside.
    let check = Command::new("sha256sum")
        .arg("-c")
        .arg("SHA256SUMS")
        .current_dir(&a.dir)
        .output()
        .expect("sha256sum");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    // The initramfs holds what the image needs and nothing else.
    let files = initramfs_files(&a.dir.join("initramfs"));
    let mut want: Vec<String> = ["init", "lib/modules/load-order", "etc/passwd", "etc/group"]
        .map(String::from)
        .to_vec();
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

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qube-image-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
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

/// sys-whonix's QubesDB behind sys-firewall (10.137.0.6), with anon-whonix (10.137.0.13) as
/// its client, and the private Tor network's authorities and fallbacks.
fn whonix_yaml(net: &testkit::tornet::TorNet) -> String {
    format!(
        "uplink: {{name: eth0}}\n\
         qubesdb:\n  /name: sys-whonix\n  /qubes-vm-type: ProxyVM\n\
         \x20 /qubes-ip: 10.137.0.8\n  /qubes-netmask: 255.255.255.255\n\
         \x20 /qubes-gateway: 10.137.0.6\n  /qubes-netvm-gateway: 10.137.0.8\n\
         \x20 /qubes-netvm-primary-dns: 10.139.1.1\n  /qubes-netvm-secondary-dns: 10.139.1.2\n\
         \x20 /qubes-firewall/10.137.0.13: \"\"\n  /qubes-firewall/10.137.0.13/policy: accept\n\
         vifs:\n  - {{name: vif8.0, ip: 10.137.0.13, mac: \"00:16:3e:5e:6c:0a\"}}\n\
         tor:\n  network: {}\n",
        net.network_yaml(),
    )
}

/// The world namespace of the sys-whonix test: the relays' addresses on its loopback (the VM
/// reaches them through its uplink TAP), removed when dropped.
struct World(String);

impl Drop for World {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

#[test]
fn sys_whonix_image_bootstraps_on_a_private_tor_network_and_carries_a_fetch() {
    const NAME: &str = "sys_whonix_image_bootstraps_on_a_private_tor_network_and_carries_a_fetch";
    if !can_run(NAME) || !testkit::tornet::TorNet::can_run(NAME) {
        return;
    }
    ensure_binaries(&["sys-whonix", "qubes-lab"]);
    let out = scratch("whx");
    let built = image(Service::SysWhonix, &out);
    let world = World(format!("qixw{}", std::process::id()));
    let _ = Command::new("ip").args(["netns", "del", &world.0]).output();
    testkit::ip(&["netns", "add", &world.0]);
    testkit::ip(&["-n", &world.0, "link", "set", "lo", "up"]);
    let first: std::net::Ipv4Addr = "198.18.0.41".parse().expect("address");
    for a in testkit::tornet::TorNet::addresses(first) {
        testkit::ip(&[
            "-n",
            &world.0,
            "address",
            "add",
            &format!("{a}/32"),
            "dev",
            "lo",
        ]);
    }
    let net = testkit::tornet::TorNet::start_on(
        &out.join("tor-net"),
        &world.0,
        first,
        "198.18.0.53".parse().expect("address"),
    )
    .unwrap_or_else(|e| panic!("private Tor network: {e}"));
    let mut bed = Bed::start(&BedSpec {
        kind: BedKind::Whonix,
        image: built.dir.clone(),
        memory_mib: 512,
        lab: profile_dir().join("qubes-lab"),
        cmdline: "quiet".into(),
        tag: "x".into(),
        yaml: Some(whonix_yaml(&net)),
        world: Some(world.0.clone()),
    })
    .unwrap_or_else(|e| panic!("test bed: {e}"));
    net.wait_consensus(Duration::from_secs(150))
        .unwrap_or_else(|e| panic!("consensus: {e}"));
    bed.vm
        .wait_for("eth0 10.137.0.8/32 via 10.137.0.6", BOOT)
        .unwrap_or_else(|e| panic!("{e}"));
    let t = bed
        .vm
        .wait_for("Tor ready", Duration::from_secs(400))
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("sys-whonix: Tor ready {t:?} after QEMU started");
    assert!(
        bed.vm.console().contains("Tor bootstrap"),
        "{}",
        bed.vm.tail()
    );
    // The private network's consensus is fresh for 20 s and valid for 40 (testkit's voting
    // interval, not Tor's hour). Under full emulation, with other VMs booting beside it, arti in the guest
    // can fall behind it for a while, and then has no usable guard until the next one lands:
    // a fetch gets three tries. Every answer is in the message if all fail.
    let mut answers = Vec::new();
    for _ in 0..3 {
        let ok = bed.fetch(8080, 60_000);
        let good = ok.starts_with("ok ") && ok.contains("http 200");
        answers.push(ok);
        if good {
            break;
        }
    }
    assert!(
        answers
            .last()
            .is_some_and(|ok| ok.starts_with("ok ") && ok.contains("http 200")),
        "fetch through sys-whonix: {answers:?}\n{}",
        bed.vm.tail()
    );
    // UDP other than DNS goes nowhere: the world's port 8080 answers TCP only, so look for
    // no reply at all rather than a reject.
    let udp = bed.probe(&[
        "dns",
        "web.test",
        "--server",
        "198.18.0.10",
        "--timeout-ms",
        "2000",
    ]);
    assert!(udp.starts_with("timeout"), "UDP to the world: {udp}");
    bed.vm.monitor("system_powerdown").expect("QEMU monitor");
    assert!(
        bed.vm.wait_exit(Duration::from_secs(60)).is_some(),
        "no power off:\n{}",
        bed.vm.tail()
    );
    drop(bed);
    drop(net);
    let _ = std::fs::remove_dir_all(&out);
}
