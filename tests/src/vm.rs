//! `up --vm sys-firewall` or `up --vm sys-net`: that qube as its image (qube-image) under QEMU
//! instead of a process, in the qube's namespace, wired with TAP devices where the process form
//! has veth pairs.
//!
//! - Each NIC's TAP is made by QEMU in the qube's namespace and then moved to where the other
//!   end of the link lives: sys-firewall's uplink TAP becomes `vifN.0` in the netvm above (as
//!   the backend side of a vif), a client's becomes that qube's `eth0`. QEMU holds each TAP by
//!   its descriptor, so the move keeps the link; when QEMU dies, every link of the qube goes
//!   with it, as a qube's vifs go with its domain.
//! - sys-net's uplink is its NIC on the world's wire: the TAP stays in sys-net's namespace,
//!   bridged there with the veth whose other end is the world's router port, as a physical
//!   NIC passed through to sys-net sits on the LAN. The world (its router address, dnsmasq)
//!   is unchanged, and the lease comes over the bridge.
//! - Clients that start later are hot-plugged (`netdev_add`, `device_add` on QEMU's monitor;
//!   the guest's PCI hotplug finds the NIC), and unplugged when they stop.
//! - The service's configuration, the NIC names, and its control socket travel over one
//!   virtio-serial port (runtime `pid1::lab`): a relay process on the host (`qubes-lab
//!   vm-relay`) pushes the configuration file whenever it changes, with the names of the vifs
//!   it lists, and answers on the usual control socket by asking the guest. So the rest of
//!   the lab (rule changes, status, counters) works unchanged.
//!
//! The guest's NICs have MACs made from their vif's domid (`52:54:00:10:<domid>`), so PID 1
//! can name a hot-plugged NIC from the vif list alone.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use qube_image::build::{self, ImageSpec, Service as ImageService};
use qube_image::qemu::{self, Nic, VmSpec};
use qubes_service_runtime::pid1::lab::{read_frame, write_frame};

use crate::cmd::{err, Cmd, Error, Result};
use crate::config::NetvmConfig;
use crate::netvm;
use crate::procs;
use crate::service::Service;
use crate::state::{NetvmKind, Paths};
use crate::sysnet;
use crate::topology::{Qube, Role, Topology, BACKEND_MAC};

/// The qube that runs as a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guest {
    /// sys-firewall (`--firewall rust`).
    Firewall,
    /// sys-net (`--netvm rust`).
    Net,
}

impl Guest {
    pub const ALL: [Guest; 2] = [Guest::Firewall, Guest::Net];

    /// The guest for a qube of this role, if one can run as a VM.
    pub fn of_role(role: Role) -> Option<Guest> {
        match role {
            Role::Firewall => Some(Guest::Firewall),
            Role::Uplink => Some(Guest::Net),
            _ => None,
        }
    }

    /// The service's name, which its files in the state directory start with.
    pub fn name(self) -> &'static str {
        match self {
            Guest::Firewall => "sys-firewall",
            Guest::Net => "sys-net",
        }
    }

    /// The pid-file name QEMU runs under: the service's own, so stopping or killing the
    /// service is pulling the VM's power.
    pub fn process(self) -> &'static str {
        match self {
            Guest::Firewall => Service::Firewall.process(),
            Guest::Net => sysnet::PROCESS,
        }
    }

    /// The relay's process name (its pid and log files).
    pub fn relay(self) -> String {
        format!("{}-relay", self.name())
    }

    /// The control socket the relay answers on: the service's usual one.
    pub fn sock(self, paths: &Paths) -> PathBuf {
        match self {
            Guest::Firewall => Service::Firewall.sock(paths),
            Guest::Net => paths.net_control_sock(),
        }
    }

    fn binary(self) -> Result<PathBuf> {
        match self {
            Guest::Firewall => Service::Firewall.binary(),
            Guest::Net => sysnet::binary(),
        }
    }

    fn image_service(self) -> ImageService {
        match self {
            Guest::Firewall => ImageService::SysFirewall,
            Guest::Net => ImageService::SysNet,
        }
    }

    /// Whether the service in the guest answers `status` through the relay.
    fn answers(self, paths: &Paths) -> bool {
        self.sock(paths).exists()
            && match self {
                Guest::Firewall => Service::Firewall.status(paths).is_ok(),
                Guest::Net => sysnet::status(paths).is_ok(),
            }
    }

    /// Whether QEMU runs.
    pub fn running(self, paths: &Paths) -> bool {
        procs::read_pid(paths, self.process()).is_some_and(procs::alive)
    }
}

const UPLINK_TAP: &str = "vmup";
/// The bridge joining sys-net's uplink TAP to the world's wire.
const UPLINK_BRIDGE: &str = "br-up";
/// The MAC of the wire's end in sys-net's namespace once it is a bridge port: the bridge
/// keeps its ports' own addresses for itself, so it must not be the guest NIC's.
const WIRE_MAC: &str = "02:00:00:00:fe:01";
/// Guest memory. A debug build of the service (what the tests use) needs more than a release
/// one; bench/images.sh measures the smallest.
const MEMORY_MIB: u32 = 256;
/// The guest boots under software emulation.
const READY_WAIT: Duration = Duration::from_secs(180);

/// The file that says this lab runs `guest` as a VM.
pub fn marker(paths: &Paths, guest: Guest) -> PathBuf {
    paths.dir.join(format!("{}.vm", guest.name()))
}

/// Whether the lab runs `guest` as a VM.
pub fn runs(paths: &Paths, guest: Guest) -> bool {
    marker(paths, guest).exists()
}

/// Whether the lab runs sys-firewall as a VM.
pub fn firewall_vm(paths: &Paths) -> bool {
    runs(paths, Guest::Firewall)
}

/// Whether the lab runs sys-net as a VM.
pub fn net_vm(paths: &Paths) -> bool {
    runs(paths, Guest::Net)
}

/// The VM a netvm of this role is, if the lab runs it as one.
pub fn guest_of(paths: &Paths, role: Role) -> Option<Guest> {
    Guest::of_role(role).filter(|&g| runs(paths, g))
}

fn monitor(paths: &Paths, guest: Guest) -> PathBuf {
    paths.dir.join(format!("{}.monitor", guest.name()))
}

fn port(paths: &Paths, guest: Guest) -> PathBuf {
    paths.dir.join(format!("{}.port", guest.name()))
}

fn domid_of_vif(vif: &str) -> Option<u32> {
    vif.strip_prefix("vif")?.strip_suffix(".0")?.parse().ok()
}

/// The guest NIC's MAC for a client vif (`vif<domid>.0`).
pub fn guest_mac(vif: &str) -> Option<String> {
    let d = domid_of_vif(vif)?;
    Some(format!(
        "52:54:00:10:{:02x}:{:02x}",
        (d >> 8) & 0xff,
        d & 0xff
    ))
}

fn tap_of(vif: &str) -> String {
    format!("vmt{}", domid_of_vif(vif).unwrap_or(0))
}

/// The `links` frame for a configuration: every vif it lists (the uplink is named on the
/// command line).
pub fn links_of(cfg: &NetvmConfig) -> String {
    let mut out = String::new();
    for v in &cfg.vifs {
        if let Some(mac) = guest_mac(&v.name) {
            out.push_str(&format!("{} {mac}\n", v.name));
        }
    }
    out
}

/// The image, built once per service binary: its directory.
fn image(guest: Guest) -> Result<PathBuf> {
    let binary = guest.binary()?;
    let cache = binary
        .parent()
        .and_then(Path::parent)
        .map(|t| t.join("qube-image-cache"))
        .unwrap_or_else(|| PathBuf::from("/var/tmp/qube-image-cache"));
    let hash = qube_image::kernel::sha256_file(&binary)
        .map_err(|e| Error(format!("{}: {e}", binary.display())))?;
    let out = cache.join("lab").join(&hash[..16]);
    let dir = out.join(guest.name());
    if dir.join("SHA256SUMS").exists() {
        return Ok(dir);
    }
    eprintln!(
        "qubes-lab: building the {} image from {}",
        guest.name(),
        binary.display()
    );
    let kernel = qube_image::kernel::prepare(qube_image::kernel::PINNED, &cache, &mut |m| {
        eprintln!("qubes-lab:   kernel: {m}")
    })
    .map_err(|e| Error(format!("the image's kernel: {e}")))?;
    let spec = ImageSpec {
        service: guest.image_service(),
        binary,
        config: None,
        out_dir: out,
    };
    build::build(&spec, &kernel, &mut |_| {})
        .map_err(|e| Error(format!("the {} image: {e}", guest.name())))?;
    Ok(dir)
}

fn link_exists(ns: &str, dev: &str) -> bool {
    Cmd::ip(ns)
        .args(["link", "show", "dev", dev])
        .output(None)
        .is_ok_and(|o| o.status.success())
}

fn wait_link(ns: &str, dev: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    while !link_exists(ns, dev) {
        if Instant::now() > deadline {
            return err(format!("QEMU made no TAP {dev} in {ns}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Moves a TAP QEMU made in `from` to `to` as `name` with `mac`, and brings it up.
fn move_tap(from: &str, tap: &str, to: &str, name: &str, mac: &str) -> Result<()> {
    wait_link(from, tap, Duration::from_secs(30))?;
    Cmd::ip(from)
        .args(["link", "set", tap, "netns", to])
        .run()?;
    Cmd::ip(to).args(["link", "set", tap, "name", name]).run()?;
    Cmd::ip(to)
        .args(["link", "set", name, "address", mac])
        .run()?;
    Cmd::ip(to).args(["link", "set", name, "up"]).run()?;
    Ok(())
}

/// Boots the qube `q` as `guest` with a NIC for its uplink and one for each vif in its list,
/// wires the NICs, sets up the clients' side, starts the relay, and waits until the service
/// answers (sys-net: and holds a DHCP lease).
pub fn start(
    topo: &Topology,
    netvm_kind: NetvmKind,
    paths: &Paths,
    q: &Qube,
    guest: Guest,
) -> Result<()> {
    let image = image(guest)?;
    let cfg = NetvmConfig::read(&paths.config(&q.name))?;
    // The uplink NIC has the qube's own MAC, as a Qubes frontend (or sys-net's real NIC) does.
    let mut cmdline = format!("quiet qubes.lab=1 ifname={}:{}", cfg.uplink.name, q.mac);
    let mut nics = vec![Nic {
        tap: UPLINK_TAP.into(),
        mac: q.mac.clone(),
    }];
    for v in &cfg.vifs {
        let mac = guest_mac(&v.name)
            .ok_or_else(|| Error(format!("vif {} is not named vif<domid>.0", v.name)))?;
        cmdline.push_str(&format!(" ifname={}:{mac}", v.name));
        nics.push(Nic {
            tap: tap_of(&v.name),
            mac,
        });
    }
    let spec = VmSpec {
        image,
        memory_mib: MEMORY_MIB,
        cmdline,
        nics,
        disk: None,
        netns: None,
        monitor: monitor(paths, guest),
        lab_port: Some(port(paths, guest)),
    };
    let _ = std::fs::remove_file(monitor(paths, guest));
    let _ = std::fs::remove_file(port(paths, guest));
    let sock = guest.sock(paths);
    let _ = std::fs::remove_file(&sock);
    let mut child = procs::start(
        paths,
        guest.process(),
        &Cmd::in_ns(&q.ns, "qemu-system-x86_64").args(qemu::args(&spec)),
    )?;
    match guest {
        Guest::Firewall => firewall_uplink(topo, netvm_kind, paths, q)?,
        Guest::Net => net_uplink(&q.ns)?,
    }
    // The clients: each one's TAP becomes its eth0. App qubes are set up here as before;
    // a netvm below (sys-firewall under sys-net) sets up its own eth0 when it starts, after.
    for v in &cfg.vifs {
        let Some(c) = topo
            .qubes
            .iter()
            .find(|c| c.vif().as_deref() == Some(v.name.as_str()))
        else {
            continue;
        };
        move_tap(&q.ns, &tap_of(&v.name), &c.ns, "eth0", &c.mac)?;
        if !c.provides_network() {
            let ip = c.ip.ok_or_else(|| Error(format!("{} has no ip", c.name)))?;
            netvm::setup_ip(&c.ns, ip, crate::lab::gateway(topo, c)?)?;
        }
    }
    let exe = std::env::current_exe()
        .map_err(|e| Error(format!("cannot find the qubes-lab executable: {e}")))?;
    procs::start(
        paths,
        &guest.relay(),
        &Cmd::new(exe)
            .arg("vm-relay")
            .arg("--port")
            .arg(port(paths, guest))
            .arg("--control")
            .arg(&sock)
            .arg("--config")
            .arg(paths.config(&q.name)),
    )?;
    procs::wait_ready(
        &format!("the {} VM (its console is the log)", guest.name()),
        &mut child,
        &paths.log(guest.process()),
        READY_WAIT,
        || guest.answers(paths),
    )?;
    if guest == Guest::Net {
        // dnsmasq pings an address before it offers it (about 3 s), and the guest is slow.
        sysnet::wait_lease(paths, Duration::from_secs(60))?;
    }
    Ok(())
}

/// sys-firewall's uplink: the backend side of its vif in the netvm above.
fn firewall_uplink(topo: &Topology, netvm_kind: NetvmKind, paths: &Paths, fw: &Qube) -> Result<()> {
    let up = topo
        .netvm_of(fw)
        .ok_or_else(|| Error(format!("{} has no netvm", fw.name)))?;
    let up_vif = fw
        .vif()
        .ok_or_else(|| Error(format!("{} has no vif", fw.name)))?;
    move_tap(&fw.ns, UPLINK_TAP, &up.ns, &up_vif, BACKEND_MAC)?;
    if netvm_kind != NetvmKind::Rust {
        // A Linux netvm's hotplug script runs when the vif appears.
        let up_cfg = NetvmConfig::read(&paths.config(&up.name))?;
        let gw = up_cfg
            .get("/qubes-netvm-gateway")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error(format!("no /qubes-netvm-gateway in {}'s tree", up.name)))?;
        let entry = up_cfg
            .vifs
            .iter()
            .find(|v| v.name == up_vif)
            .cloned()
            .ok_or_else(|| Error(format!("{up_vif} is not in {}'s vif list", up.name)))?;
        netvm::sysctl(
            &up.ns,
            &[(format!("net/ipv4/conf/{up_vif}/proxy_arp"), "1")],
        )?;
        netvm::vif_online(&up.ns, gw, &entry, fw.domid)?;
    }
    Ok(())
}

/// sys-net's uplink: its TAP and the world's wire (the veth `eth0`) on one bridge in its
/// namespace, which holds no address and forwards only between the two.
fn net_uplink(ns: &str) -> Result<()> {
    wait_link(ns, UPLINK_TAP, Duration::from_secs(30))?;
    if !link_exists(ns, UPLINK_BRIDGE) {
        Cmd::ip(ns)
            .args(["link", "add", UPLINK_BRIDGE, "type", "bridge"])
            .args(["forward_delay", "0", "stp_state", "0"])
            .run()?;
    }
    Cmd::ip(ns)
        .args(["link", "set", "eth0", "down", "address", WIRE_MAC])
        .run()?;
    for dev in ["eth0", UPLINK_TAP] {
        Cmd::ip(ns)
            .args(["link", "set", dev, "master", UPLINK_BRIDGE, "up"])
            .run()?;
    }
    Cmd::ip(ns)
        .args(["link", "set", UPLINK_BRIDGE, "up"])
        .run()?;
    Ok(())
}

/// Stops the VM (QEMU ends at once: the qube's power is cut) and the relay.
pub fn stop(paths: &Paths, guest: Guest) -> Result<()> {
    procs::stop_named(paths, guest.process())?;
    procs::stop_named(paths, &guest.relay())
}

/// Hot-plugs a NIC for `vif` into `guest` (the VM qube `netvm`) and makes its TAP `q`'s eth0.
pub fn plug(paths: &Paths, guest: Guest, netvm: &Qube, q: &Qube, vif: &str) -> Result<()> {
    let mac = guest_mac(vif).ok_or_else(|| Error(format!("vif {vif} is not vif<domid>.0")))?;
    let tap = tap_of(vif);
    let mon = monitor(paths, guest);
    for command in [
        format!("netdev_add tap,id=n-{tap},ifname={tap},script=no,downscript=no"),
        format!("device_add virtio-net-pci,netdev=n-{tap},mac={mac},id=d-{tap}"),
    ] {
        let out = qemu::monitor_command(&mon, &command)
            .map_err(|e| Error(format!("QEMU monitor {}: {e}", mon.display())))?;
        if out.contains("Error") || out.contains("error") {
            return err(format!("QEMU refused {command:?}: {}", out.trim()));
        }
    }
    move_tap(&netvm.ns, &tap, &q.ns, "eth0", &q.mac)
}

/// Sets the MTU of `guest`'s end of a link (`eth0`, `vifN.0`), through the relay.
pub fn set_guest_mtu(paths: &Paths, guest: Guest, link: &str, mtu: u16) -> Result<()> {
    let sock = guest.sock(paths);
    let reply = qubes_service_runtime::control::request(
        &sock,
        &format!("lab-mtu {link} {mtu}"),
        "qubes-lab",
    )
    .map_err(|e| Error(format!("the {} VM: {e}", guest.name())))?;
    if reply.trim() == "ok" {
        Ok(())
    } else {
        err(format!("the {} VM: {}", guest.name(), reply.trim()))
    }
}

/// Unplugs `vif`'s NIC; its TAP (the client's eth0) goes with it.
pub fn unplug(paths: &Paths, guest: Guest, vif: &str) -> Result<()> {
    let tap = tap_of(vif);
    let mon = monitor(paths, guest);
    for command in [format!("device_del d-{tap}"), format!("netdev_del n-{tap}")] {
        qemu::monitor_command(&mon, &command)
            .map_err(|e| Error(format!("QEMU monitor {}: {e}", mon.display())))?;
    }
    Ok(())
}

/// The hidden `vm-relay`: between the guest's lab port and the host's control socket and
/// configuration file (see the module comment). Runs until killed or QEMU goes away.
pub fn relay(port: &Path, control: &Path, config: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let stream = loop {
        match UnixStream::connect(port) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                return err(format!("the VM's lab port {}: {e}", port.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let mut w = stream
        .try_clone()
        .map_err(|e| Error(format!("lab port: {e}")))?;
    let (tx, rx) = mpsc::channel::<(String, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stream);
        while let Ok(Some(frame)) = read_frame(&mut r) {
            if tx.send(frame).is_err() {
                break;
            }
        }
        // The port closed: QEMU is gone, and so is everything this relay stood for.
        let _ = tx.send(("closed".to_string(), Vec::new()));
    });
    let _ = std::fs::remove_file(control);
    let listener =
        UnixListener::bind(control).map_err(|e| Error(format!("{}: {e}", control.display())))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error(format!("{}: {e}", control.display())))?;
    let mut pushed: Option<Vec<u8>> = None;
    let push = |w: &mut UnixStream, bytes: &[u8]| -> Result<()> {
        let cfg = NetvmConfig::read(config)?;
        write_frame(w, "links", links_of(&cfg).as_bytes())
            .and_then(|()| write_frame(w, "config", bytes))
            .map_err(|e| Error(format!("lab port: {e}")))
    };
    loop {
        // The guest says hello when it opens its port (at boot): it gets the file again.
        let mut hello = false;
        while let Ok((kind, _)) = rx.try_recv() {
            if kind == "closed" {
                let _ = std::fs::remove_file(control);
                return Ok(());
            }
            hello |= kind == "hello";
        }
        if let Ok(bytes) = std::fs::read(config) {
            if hello || pushed.as_ref() != Some(&bytes) {
                push(&mut w, &bytes)?;
                pushed = Some(bytes);
            }
        }
        match listener.accept() {
            Ok((client, _)) => {
                if let Err(e) = answer(client, &mut w, &rx) {
                    eprintln!("vm-relay: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(30));
            }
            Err(e) => return err(format!("{}: {e}", control.display())),
        }
    }
}

/// One control request: read from the host client, asked over the port, answered back.
fn answer(
    mut client: UnixStream,
    w: &mut UnixStream,
    rx: &mpsc::Receiver<(String, Vec<u8>)>,
) -> Result<()> {
    let io = |e: std::io::Error| Error(format!("control client: {e}"));
    client.set_nonblocking(false).map_err(io)?;
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    let mut line = String::new();
    BufReader::new((&client).take(4096))
        .read_line(&mut line)
        .map_err(io)?;
    // The lab's own requests to the guest (not the service's) start with `lab-`.
    let line = line.trim_end();
    let (kind, body) = match line.strip_prefix("lab-mtu ") {
        Some(rest) => ("mtu", rest),
        None => ("control", line),
    };
    write_frame(w, kind, body.as_bytes()).map_err(|e| Error(format!("lab port: {e}")))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let reply = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((kind, data)) if kind == "reply" => break data,
            Ok((kind, _)) if kind == "closed" => break b"error: the VM is gone\n".to_vec(),
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(_) => break b"error: the VM did not answer\n".to_vec(),
        }
    };
    client.write_all(&reply).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_macs_come_from_the_vifs_domid() {
        assert_eq!(guest_mac("vif7.0").as_deref(), Some("52:54:00:10:00:07"));
        assert_eq!(guest_mac("vif300.0").as_deref(), Some("52:54:00:10:01:2c"));
        assert_eq!(guest_mac("eth0"), None);
        assert_eq!(tap_of("vif12.0"), "vmt12");
    }
}
