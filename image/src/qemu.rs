//! Booting an image under QEMU: software emulation (TCG; these machines have no usable KVM),
//! the serial console captured, virtio NICs on TAP devices, an optional configuration disk,
//! and QEMU's monitor for the ACPI power button.
//!
//! QEMU creates each TAP itself (`-netdev tap,ifname=...`) in the network namespace it runs
//! in; a caller then moves the TAP where it belongs (a client qube's namespace, the world's),
//! which keeps working because QEMU holds the TAP by its file descriptor, not by its name.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One virtio NIC: the host TAP device QEMU makes, and the guest's MAC.
#[derive(Debug, Clone)]
pub struct Nic {
    /// The TAP's name on the host (15 characters at most).
    pub tap: String,
    /// The guest NIC's MAC (`52:54:00:...`).
    pub mac: String,
}

/// What to boot and how.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The image directory (`vmlinuz`, `initramfs`).
    pub image: PathBuf,
    /// Guest memory in MiB (`-m`).
    pub memory_mib: u32,
    /// The kernel command line after `console=ttyS0`.
    pub cmdline: String,
    /// NICs in PCI order (the guest sees eth0, eth1, ... unless `ifname=` renames them).
    pub nics: Vec<Nic>,
    /// A raw disk for the guest (`/dev/vda`), read-only: a configuration disk.
    pub disk: Option<PathBuf>,
    /// The network namespace QEMU runs in (its TAPs appear there).
    pub netns: Option<String>,
    /// Where QEMU's monitor socket goes.
    pub monitor: PathBuf,
    /// The host end (a UNIX socket QEMU listens on) of the lab's virtio-serial port
    /// (`org.qubes-lab.0`, PID 1's `qubes.lab=1`).
    pub lab_port: Option<PathBuf>,
}

/// QEMU's arguments (after the program) for `spec`. The console is the serial port on
/// QEMU's stdout.
pub fn args(spec: &VmSpec) -> Vec<String> {
    let mut a: Vec<String> = [
        "-machine",
        "pc",
        "-accel",
        "tcg",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
    ]
    .map(String::from)
    .to_vec();
    a.push("-m".into());
    a.push(spec.memory_mib.to_string());
    a.push("-kernel".into());
    a.push(spec.image.join("vmlinuz").display().to_string());
    a.push("-initrd".into());
    a.push(spec.image.join("initramfs").display().to_string());
    a.push("-append".into());
    // panic=-1: a kernel panic reboots at once, which -no-reboot turns into QEMU exiting, so
    // nobody waits on a dead guest.
    a.push(format!("console=ttyS0 panic=-1 {}", spec.cmdline));
    a.push("-monitor".into());
    a.push(format!(
        "unix:{},server=on,wait=off",
        spec.monitor.display()
    ));
    for nic in &spec.nics {
        a.push("-netdev".into());
        // Ids after the TAP, so a NIC can be unplugged by name later (`device_del d-<tap>`).
        a.push(format!(
            "tap,id=n-{},ifname={},script=no,downscript=no",
            nic.tap, nic.tap
        ));
        a.push("-device".into());
        a.push(format!(
            "virtio-net-pci,netdev=n-{},mac={},id=d-{}",
            nic.tap, nic.mac, nic.tap
        ));
    }
    if let Some(disk) = &spec.disk {
        a.push("-drive".into());
        a.push(format!(
            "file={},format=raw,if=virtio,readonly=on",
            disk.display()
        ));
    }
    if let Some(port) = &spec.lab_port {
        a.push("-device".into());
        a.push("virtio-serial-pci".into());
        a.push("-chardev".into());
        a.push(format!(
            "socket,id=lab,path={},server=on,wait=off",
            port.display()
        ));
        a.push("-device".into());
        a.push("virtserialport,chardev=lab,name=org.qubes-lab.0".into());
    }
    a
}

/// One command on the human monitor of the QEMU listening at `socket`; what it printed.
pub fn monitor_command(socket: &Path, command: &str) -> io::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut s = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    s.set_read_timeout(Some(Duration::from_millis(300)))?;
    s.write_all(command.as_bytes())?;
    s.write_all(b"\n")?;
    // The monitor answers, then prompts "(qemu) " again; read until it goes quiet.
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let quiet_deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if String::from_utf8_lossy(&out).matches("(qemu)").count() >= 2
                    || Instant::now() > quiet_deadline
                {
                    break;
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// A running VM.
#[derive(Debug)]
pub struct Vm {
    child: Child,
    console: Arc<Mutex<Vec<u8>>>,
    monitor: PathBuf,
    started: Instant,
}

/// A configuration disk: the YAML padded with NUL bytes to a whole number of sectors (what
/// PID 1's `qubes.config=/dev/vda` reads up to the first NUL).
pub fn write_config_disk(path: &Path, yaml: &str) -> io::Result<()> {
    let mut data = yaml.as_bytes().to_vec();
    data.push(0);
    // At least 64 KiB: the kernel's partition scan reads past the first sectors and
    // complains about a disk smaller than that.
    let len = data.len().div_ceil(4096).max(16) * 4096;
    data.resize(len, 0);
    std::fs::write(path, data)
}

impl Vm {
    /// Starts QEMU. The console is collected from its stdout (`-serial stdio`).
    pub fn start(spec: &VmSpec) -> io::Result<Vm> {
        let mut cmd = match &spec.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
                c
            }
            None => Command::new("qemu-system-x86_64"),
        };
        let _ = std::fs::remove_file(&spec.monitor);
        cmd.args(args(spec));
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("qemu-system-x86_64: {e}")))?;
        let console = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let sink = Arc::clone(&console);
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut c) = sink.lock() {
                        c.extend_from_slice(&buf[..n]);
                    }
                }
            });
        }
        Ok(Vm {
            child,
            console,
            monitor: spec.monitor.clone(),
            started: Instant::now(),
        })
    }

    /// Everything the console (and QEMU's stderr) printed so far.
    pub fn console(&self) -> String {
        let c = self.console.lock().map(|c| c.clone()).unwrap_or_default();
        String::from_utf8_lossy(&c).into_owned()
    }

    /// Waits until the console shows `needle`; returns the time from QEMU's start. Fails with
    /// the console's end when time runs out or QEMU exits first.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<Duration, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.console().contains(needle) {
                return Ok(self.started.elapsed());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                if self.console().contains(needle) {
                    return Ok(self.started.elapsed());
                }
                return Err(format!(
                    "QEMU exited ({st}) before {needle:?}:\n{}",
                    self.tail()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no {needle:?} within {timeout:?}:\n{}",
                    self.tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the console has a whole line (ended by its newline) holding `needle`, and
    /// returns it. [`Self::wait_for`] returns as soon as the text is there, when the serial
    /// console, slow under emulation, may not have sent the rest of the line yet.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        self.wait_for(needle, timeout)?;
        loop {
            let console = self.console();
            let whole = console
                .split_inclusive('\n')
                .find(|l| l.ends_with('\n') && l.contains(needle));
            if let Some(line) = whole {
                return Ok(line.trim_end().to_string());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the line with {needle:?} did not end within {timeout:?}:\n{}",
                    self.tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The console's last 40 lines.
    pub fn tail(&self) -> String {
        let c = self.console();
        let lines: Vec<&str> = c.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// A command on QEMU's human monitor (e.g. `system_powerdown`, the ACPI power button).
    pub fn monitor(&self, command: &str) -> io::Result<()> {
        monitor_command(&self.monitor, command).map(|_| ())
    }

    /// Waits for QEMU to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// QEMU's process id (`ip netns exec` execs, so it is QEMU's own).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.monitor);
    }
}
