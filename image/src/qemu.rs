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
        cmd.args(["-machine", "pc", "-accel", "tcg", "-smp", "1"])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .args(["-serial", "stdio"])
            .arg("-m")
            .arg(spec.memory_mib.to_string())
            .arg("-kernel")
            .arg(spec.image.join("vmlinuz"))
            .arg("-initrd")
            .arg(spec.image.join("initramfs"))
            .arg("-append")
            // panic=-1: a kernel panic reboots at once, which -no-reboot turns into QEMU
            // exiting, so a test never waits on a dead guest.
            .arg(format!("console=ttyS0 panic=-1 {}", spec.cmdline))
            .arg("-monitor")
            .arg(format!(
                "unix:{},server=on,wait=off",
                spec.monitor.display()
            ));
        for (i, nic) in spec.nics.iter().enumerate() {
            cmd.arg("-netdev")
                .arg(format!(
                    "tap,id=n{i},ifname={},script=no,downscript=no",
                    nic.tap
                ))
                .arg("-device")
                .arg(format!("virtio-net-pci,netdev=n{i},mac={}", nic.mac));
        }
        if let Some(disk) = &spec.disk {
            cmd.arg("-drive").arg(format!(
                "file={},format=raw,if=virtio,readonly=on",
                disk.display()
            ));
        }
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

    /// The console's last 40 lines.
    pub fn tail(&self) -> String {
        let c = self.console();
        let lines: Vec<&str> = c.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// A command on QEMU's human monitor (e.g. `system_powerdown`, the ACPI power button).
    pub fn monitor(&self, command: &str) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut s = loop {
            match UnixStream::connect(&self.monitor) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        s.write_all(command.as_bytes())?;
        s.write_all(b"\n")?;
        std::thread::sleep(Duration::from_millis(200));
        Ok(())
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
