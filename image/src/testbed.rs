//! A service image under QEMU between two network namespaces, for the boot tests and the
//! figures (bench/images.sh): the VM's uplink TAP stays in a "world" namespace (the netvm
//! above it, and a web server), its vif TAP is moved into a "client" namespace and becomes
//! that qube's `eth0`, set up as Qubes sets up a client. The configuration reaches the guest
//! on a disk (`qubes.config=/dev/vda`), the NICs get their Qubes names from `ifname=`.
//!
//! Everything it makes (namespaces `qi<tag><name><pid>`, a scratch directory, the servers it
//! starts, QEMU) goes away when the [`Bed`] is dropped.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::qemu::{write_config_disk, Nic, Vm, VmSpec};

/// The guest NICs' MACs: uplink, then the vif.
pub const UPLINK_MAC: &str = "52:54:00:00:00:01";
/// See [`UPLINK_MAC`].
pub const VIF_MAC: &str = "52:54:00:00:00:02";
/// The client qube's own MAC (Qubes' 00:16:3e prefix), as its configuration names it.
pub const CLIENT_MAC: &str = "00:16:3e:5e:6c:0a";
/// Qubes' backend MAC: a client reaches its gateway at this address.
pub const BACKEND_MAC: &str = "fe:ff:ff:ff:ff:ff";

/// sys-firewall's QubesDB, as dom0 writes it for a ProxyVM behind sys-net (10.137.0.5), with
/// one client, 10.137.0.10, allowed TCP port 8080 and nothing else.
pub const FIREWALL_YAML: &str = "\
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

/// sys-net (10.137.0.5), addressed by DHCP, with one client, sys-firewall's 10.137.0.6, whose
/// rules accept everything.
pub const NET_YAML: &str = "\
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

/// The web server's address in the world.
pub const WEB: &str = "198.18.0.10";

/// Which service the bed is wired for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BedKind {
    /// sys-firewall: the world is sys-net at 10.137.0.5; client 10.137.0.10 on vif3.0.
    Firewall,
    /// sys-net: the world is the NIC's segment (198.18.0.1, dnsmasq handing out leases);
    /// client sys-firewall 10.137.0.6 on vif2.0.
    Net,
    /// sys-whonix (10.137.0.8): the world is sys-firewall at 10.137.0.6 and whatever the
    /// caller put in it (a private Tor network); client anon-whonix 10.137.0.13 on vif8.0.
    /// The configuration is the caller's ([`BedSpec::yaml`]).
    Whonix,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct BedSpec {
    /// Which wiring.
    pub kind: BedKind,
    /// The image directory.
    pub image: PathBuf,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// The `qubes-lab` binary (its web server and probes).
    pub lab: PathBuf,
    /// Extra kernel command line.
    pub cmdline: String,
    /// Distinguishes the namespaces of beds that run at once in one process.
    pub tag: String,
    /// The configuration, instead of the kind's own.
    pub yaml: Option<String>,
    /// A world namespace the caller made and keeps (its servers already running there),
    /// instead of a new one.
    pub world: Option<String>,
}

/// A running bed.
#[derive(Debug)]
pub struct Bed {
    /// The guest.
    pub vm: Vm,
    /// The world namespace.
    pub world: String,
    /// The client namespace.
    pub client: String,
    /// The scratch directory (dnsmasq's leases are `dhcp.leases` here).
    pub dir: PathBuf,
    lab: PathBuf,
    namespaces: Vec<String>,
    procs: Vec<Child>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Bed {
    /// Makes the namespaces, boots the image and wires it. Returns once the NICs are in place
    /// and the world's servers run; the guest may still be booting ([`Vm::wait_for`]).
    pub fn start(spec: &BedSpec) -> Result<Bed, String> {
        let pid = std::process::id();
        let world = spec
            .world
            .clone()
            .unwrap_or_else(|| format!("qi{}w{pid}", spec.tag));
        let client = format!("qi{}c{pid}", spec.tag);
        let dir = std::env::temp_dir().join(format!("qube-image-bed-{}-{pid}", spec.tag));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut namespaces = Vec::new();
        let mine: Vec<&String> = match spec.world {
            Some(_) => vec![&client],
            None => vec![&world, &client],
        };
        for ns in mine {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            ip(&["netns", "add", ns])?;
            namespaces.push(ns.clone());
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let (own_yaml, vif, up_tap, vif_tap) = match spec.kind {
            BedKind::Firewall => (FIREWALL_YAML, "vif3.0", "fwup", "fwvif"),
            BedKind::Net => (NET_YAML, "vif2.0", "netup", "netvif"),
            BedKind::Whonix => ("", "vif8.0", "whxup", "whxvif"),
        };
        let yaml = spec.yaml.as_deref().unwrap_or(own_yaml);
        let disk = dir.join("config.disk");
        write_config_disk(&disk, yaml).map_err(|e| format!("{}: {e}", disk.display()))?;
        let vm = Vm::start(&VmSpec {
            image: spec.image.clone(),
            memory_mib: spec.memory_mib,
            cmdline: format!(
                "qubes.config=/dev/vda ifname=eth0:{UPLINK_MAC} ifname={vif}:{VIF_MAC} {}",
                spec.cmdline
            ),
            nics: vec![
                Nic {
                    tap: up_tap.into(),
                    mac: UPLINK_MAC.into(),
                },
                Nic {
                    tap: vif_tap.into(),
                    mac: VIF_MAC.into(),
                },
            ],
            disk: Some(disk),
            netns: Some(world.clone()),
            monitor: dir.join("monitor.sock"),
            lab_port: None,
        })
        .map_err(|e| e.to_string())?;
        let mut bed = Bed {
            vm,
            world: world.clone(),
            client: client.clone(),
            dir: dir.clone(),
            lab: spec.lab.clone(),
            namespaces,
            procs: Vec::new(),
        };
        wait_link(&world, up_tap)?;
        let world_addr = match spec.kind {
            BedKind::Firewall => "10.137.0.5/24",
            BedKind::Net => "198.18.0.1/24",
            BedKind::Whonix => "10.137.0.6/24",
        };
        ip(&["-n", &world, "address", "add", world_addr, "dev", up_tap])?;
        ip(&[
            "-n",
            &world,
            "address",
            "add",
            &format!("{WEB}/32"),
            "dev",
            up_tap,
        ])?;
        ip(&["-n", &world, "link", "set", up_tap, "up"])?;
        wait_link(&world, vif_tap)?;
        // QEMU holds the TAP by its descriptor: it keeps working in another namespace.
        ip(&["-n", &world, "link", "set", vif_tap, "netns", &client])?;
        ip(&["-n", &client, "link", "set", vif_tap, "name", "eth0"])?;
        let (addr, gw): (Ipv4Addr, Ipv4Addr) = match spec.kind {
            BedKind::Firewall => ([10, 137, 0, 10].into(), [10, 137, 0, 6].into()),
            BedKind::Net => ([10, 137, 0, 6].into(), [10, 137, 0, 5].into()),
            BedKind::Whonix => ([10, 137, 0, 13].into(), [10, 137, 0, 8].into()),
        };
        client_side(&client, addr, gw)?;
        if spec.kind == BedKind::Net {
            let child = Command::new("ip")
                .args(["netns", "exec", &world, "dnsmasq", "--keep-in-foreground"])
                .args(["--conf-file=/dev/null", "--port=0", "--bind-interfaces"])
                .arg(format!("--interface={up_tap}"))
                .arg("--dhcp-range=198.18.0.100,198.18.0.150,255.255.255.0,2m")
                .arg("--dhcp-option=option:router,198.18.0.1")
                .arg("--dhcp-option=option:dns-server,198.18.0.53")
                .arg(format!(
                    "--dhcp-leasefile={}",
                    dir.join("dhcp.leases").display()
                ))
                .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("dnsmasq: {e}"))?;
            bed.procs.push(child);
        }
        let ready = dir.join("http.ready");
        let child = Command::new("ip")
            .args(["netns", "exec", &world])
            .arg(&spec.lab)
            .arg("serve-http")
            .arg(format!("{WEB}:8080"))
            .arg(format!("{WEB}:8081"))
            .arg("--ready-file")
            .arg(&ready)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("qubes-lab serve-http: {e}"))?;
        bed.procs.push(child);
        wait_file(&ready, "the web server")?;
        Ok(bed)
    }

    /// `qubes-lab probe ARGS` from the client qube: its one-line outcome
    /// (`ok ...`, `rejected ... icmp admin-prohibited from ...`, `timeout ...`).
    pub fn probe(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.client])
            .arg(&self.lab)
            .arg("probe")
            .args(args)
            .output();
        match out {
            Ok(o) => String::from_utf8_lossy(&o.stdout).trim().to_string(),
            Err(e) => format!("error {e}"),
        }
    }

    /// A GET of the world's web page from the client (`ok ... http 200 OK` when it works).
    pub fn fetch(&self, port: u16, timeout_ms: u64) -> String {
        let dst = format!("{WEB}:{port}");
        let t = timeout_ms.to_string();
        self.probe(&["tcp", &dst, "--http", "--timeout-ms", &t])
    }
}

impl Drop for Bed {
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

fn wait_link(ns: &str, dev: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let there = Command::new("ip")
            .args(["-n", ns, "link", "show", dev])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if there {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("QEMU made no TAP {dev} in {ns}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_file(path: &Path, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(format!("{what} did not start"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A client qube's side of its vif, as Qubes' setup-ip leaves it: the /32 address, the
/// gateway on-link at the backend MAC, the default route through it.
fn client_side(ns: &str, addr: Ipv4Addr, gw: Ipv4Addr) -> Result<(), String> {
    let (a, g) = (format!("{addr}/32"), gw.to_string());
    ip(&["-n", ns, "link", "set", "eth0", "address", CLIENT_MAC])?;
    ip(&["-n", ns, "address", "add", &a, "dev", "eth0"])?;
    ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n",
        ns,
        "neighbour",
        "replace",
        "to",
        &g,
        "dev",
        "eth0",
        "lladdr",
        BACKEND_MAC,
        "nud",
        "permanent",
    ])?;
    ip(&["-n", ns, "route", "add", &g, "dev", "eth0", "scope", "link"])?;
    ip(&[
        "-n", ns, "route", "add", "default", "via", &g, "dev", "eth0", "onlink",
    ])
}
