//! `up --vm sys-firewall`: sys-firewall as its image (qube-image) under QEMU instead of a
//! process, in the sys-firewall qube's namespace, wired with TAP devices where the process form
//! has veth pairs.
//!
//! - Each NIC's TAP is made by QEMU in the sys-firewall namespace and then moved to where the
//!   other end of the link lives: the uplink's becomes `vifN.0` in the netvm above (as the
//!   backend side of a vif), a client's becomes that qube's `eth0`. QEMU holds each TAP by its
//!   descriptor, so the move keeps the link; when QEMU dies, every link of the qube goes with
//!   it, as a qube's vifs go with its domain.
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
use crate::topology::{Qube, Topology, BACKEND_MAC};

/// The relay's process name (its pid and log files).
pub const RELAY: &str = "sys-firewall-relay";
const UPLINK_TAP: &str = "vmup";
/// Guest memory. A debug build of the service (what the tests use) needs more than a release
/// one; bench/images.sh measures the smallest.
const MEMORY_MIB: u32 = 256;
/// The guest boots under software emulation.
const READY_WAIT: Duration = Duration::from_secs(180);

/// The file that says this lab runs sys-firewall as a VM.
pub fn marker(paths: &Paths) -> PathBuf {
    paths.dir.join("sys-firewall.vm")
}

/// Whether the lab runs sys-firewall as a VM.
pub fn enabled(paths: &Paths) -> bool {
    marker(paths).exists()
}

fn monitor(paths: &Paths) -> PathBuf {
    paths.dir.join("sys-firewall.monitor")
}

fn port(paths: &Paths) -> PathBuf {
    paths.dir.join("sys-firewall.port")
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
fn image() -> Result<PathBuf> {
    let binary = Service::Firewall.binary()?;
    let cache = binary
        .parent()
        .and_then(Path::parent)
        .map(|t| t.join("qube-image-cache"))
        .unwrap_or_else(|| PathBuf::from("/var/tmp/qube-image-cache"));
    let hash = qube_image::kernel::sha256_file(&binary)
        .map_err(|e| Error(format!("{}: {e}", binary.display())))?;
    let out = cache.join("lab").join(&hash[..16]);
    let dir = out.join("sys-firewall");
    if dir.join("SHA256SUMS").exists() {
        return Ok(dir);
    }
    eprintln!(
        "qubes-lab: building the sys-firewall image from {}",
        binary.display()
    );
    let kernel = qube_image::kernel::prepare(qube_image::kernel::PINNED, &cache, &mut |m| {
        eprintln!("qubes-lab:   kernel: {m}")
    })
    .map_err(|e| Error(format!("the image's kernel: {e}")))?;
    let spec = ImageSpec {
        service: ImageService::SysFirewall,
        binary,
        config: None,
        out_dir: out,
    };
    build::build(&spec, &kernel, &mut |_| {})
        .map_err(|e| Error(format!("the sys-firewall image: {e}")))?;
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

/// Boots the sys-firewall VM with a NIC for each vif in its list, wires the NICs, sets up the
/// clients' side, starts the relay, and waits until the service answers.
pub fn start(topo: &Topology, netvm_kind: NetvmKind, paths: &Paths, fw: &Qube) -> Result<()> {
    let image = image()?;
    let cfg = NetvmConfig::read(&paths.config(&fw.name))?;
    // The uplink NIC has the qube's own MAC, as a Qubes frontend does.
    let mut cmdline = format!("quiet qubes.lab=1 ifname={}:{}", cfg.uplink.name, fw.mac);
    let mut nics = vec![Nic {
        tap: UPLINK_TAP.into(),
        mac: fw.mac.clone(),
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
        monitor: monitor(paths),
        lab_port: Some(port(paths)),
    };
    let _ = std::fs::remove_file(monitor(paths));
    let _ = std::fs::remove_file(port(paths));
    let sock = Service::Firewall.sock(paths);
    let _ = std::fs::remove_file(&sock);
    // The pid file is QEMU's under the service's name: stopping or killing "sys-firewall"
    // is pulling the VM's power.
    let mut child = procs::start(
        paths,
        Service::Firewall.process(),
        &Cmd::in_ns(&fw.ns, "qemu-system-x86_64").args(qemu::args(&spec)),
    )?;
    // The uplink: the backend side of sys-firewall's vif in the netvm above.
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
    // The clients: each one's TAP becomes its eth0, set up as before.
    for v in &cfg.vifs {
        let Some(q) = topo
            .qubes
            .iter()
            .find(|q| q.vif().as_deref() == Some(v.name.as_str()))
        else {
            continue;
        };
        move_tap(&fw.ns, &tap_of(&v.name), &q.ns, "eth0", &q.mac)?;
        let ip = q.ip.ok_or_else(|| Error(format!("{} has no ip", q.name)))?;
        netvm::setup_ip(&q.ns, ip, crate::lab::gateway(topo, q)?)?;
    }
    let exe = std::env::current_exe()
        .map_err(|e| Error(format!("cannot find the qubes-lab executable: {e}")))?;
    procs::start(
        paths,
        RELAY,
        &Cmd::new(exe)
            .arg("vm-relay")
            .arg("--port")
            .arg(port(paths))
            .arg("--control")
            .arg(&sock)
            .arg("--config")
            .arg(paths.config(&fw.name)),
    )?;
    procs::wait_ready(
        "the sys-firewall VM (its console is the log)",
        &mut child,
        &paths.log(Service::Firewall.process()),
        READY_WAIT,
        || sock.exists() && Service::Firewall.status(paths).is_ok(),
    )
}

/// Stops the VM (QEMU ends at once: the qube's power is cut) and the relay.
pub fn stop(paths: &Paths) -> Result<()> {
    procs::stop_named(paths, Service::Firewall.process())?;
    procs::stop_named(paths, RELAY)
}

/// Hot-plugs a NIC for `vif` and makes its TAP `q`'s eth0.
pub fn plug(paths: &Paths, fw: &Qube, q: &Qube, vif: &str) -> Result<()> {
    let mac = guest_mac(vif).ok_or_else(|| Error(format!("vif {vif} is not vif<domid>.0")))?;
    let tap = tap_of(vif);
    let mon = monitor(paths);
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
    move_tap(&fw.ns, &tap, &q.ns, "eth0", &q.mac)
}

/// Sets the MTU of the guest's end of a link (`eth0`, `vifN.0`), through the relay.
pub fn set_guest_mtu(paths: &Paths, link: &str, mtu: u16) -> Result<()> {
    let sock = Service::Firewall.sock(paths);
    let reply = qubes_service_runtime::control::request(
        &sock,
        &format!("lab-mtu {link} {mtu}"),
        "qubes-lab",
    )
    .map_err(|e| Error(format!("the sys-firewall VM: {e}")))?;
    if reply.trim() == "ok" {
        Ok(())
    } else {
        err(format!("the sys-firewall VM: {}", reply.trim()))
    }
}

/// Unplugs `vif`'s NIC; its TAP (the client's eth0) goes with it.
pub fn unplug(paths: &Paths, vif: &str) -> Result<()> {
    let tap = tap_of(vif);
    let mon = monitor(paths);
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
