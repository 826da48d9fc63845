//! PID 1 duties, for a service booted as the only program of an image (`qube-image`): the
//! kernel runs the service binary as `/init` from the initramfs, with nothing else there.
//!
//! What a Linux init must do and the service does here, in order:
//! 1. mount `/proc`, `/sys` and `/dev` (devtmpfs), which the kernel leaves unmounted for an
//!    initramfs (`init/do_mounts.c`);
//! 2. read the kernel command line (`/proc/cmdline`) for its own keys, ignoring the rest
//!    (Qubes appends Linux options unless the qube has `no-default-kernelopts`):
//!    - `qubes.config=PATH`: the YAML configuration, a file in the image (default
//!      `/etc/<service>.yaml`) or a block device (`/dev/vdb`, `/dev/xvdb`) whose bytes are the
//!      YAML, padded with NUL bytes (no filesystem, so no filesystem module);
//!    - `qubesdb.<KEY>=<VALUE>`: a QubesDB key set over the file's (`qubesdb./qubes-ip=...`);
//!    - `ifname=<NAME>:<MAC>`: the NIC with that MAC is renamed (dracut.cmdline(7)'s key), so
//!      a configuration written for `eth0` and `vif3.0` works on a VM's NICs;
//!    - `qubes.log=<FILTER>`: the log filter (as `RUST_LOG`);
//!    - `qubes.lab=1`: run as a lab VM ([`lab`]): configuration, NIC names and the control
//!      socket over a virtio-serial port;
//!    - `qubes.qubesdb=vchan`: no configuration file; the service reads dom0's QubesDB over
//!      vchan, as a Qubes qube booted from the image has it ([`BootConfig::QubesDbVchan`]);
//!    - `qubes.vifs=xen` (with `qubes.qubesdb=vchan`): the service serves its Xen vifs' rings
//!      itself (sys-firewall's `run --vifs xen`); the kernel's netfront and netback modules
//!      are then not loaded, so they do not take the devices first;
//! 3. load the image's kernel modules by `finit_module(2)`, in the order the image lists them
//!    (`/lib/modules/load-order`, dependencies first); a module for hardware that is not
//!    there (the Xen front and back ends under QEMU) refuses with `ENODEV`, which is noted;
//! 4. bring every NIC up (nothing else in the image would);
//! 5. reap orphaned children (any process whose parent dies becomes PID 1's);
//! 6. power off, never exit: when the service stops (SIGTERM, which the kernel delivers to
//!    PID 1 only because the service handles it), when the ACPI power button is pressed
//!    (QEMU's `system_powerdown`, read from the input events), when the kernel's orderly
//!    power-off runs (`/proc/sys/kernel/poweroff_cmd` is pointed at `/init poweroff`, which
//!    signals PID 1; Xen's `control/shutdown`, i.e. `qvm-shutdown`, takes this path), and on a
//!    fatal error or a panic, after printing it. PID 1 exiting would panic the kernel
//!    ("Attempted to kill init!").

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Where the image keeps its modules and their load order.
pub const MODULES_DIR: &str = "/lib/modules";

/// The command line keys PID 1 reads (everything else on it is left alone).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootArgs {
    /// `qubes.config=`
    pub config: Option<String>,
    /// `qubesdb.<KEY>=<VALUE>`, in order.
    pub qubesdb: Vec<(String, String)>,
    /// `ifname=<NAME>:<MAC>`: (name, MAC lower-case).
    pub ifnames: Vec<(String, String)>,
    /// `qubes.log=`
    pub log: Option<String>,
    /// `qubes.lab=1`: the configuration, NIC names and control requests come over the lab's
    /// virtio-serial port ([`LAB_PORT`]) instead of a file or disk.
    pub lab: bool,
    /// `qubes.qubesdb=vchan`: the configuration is dom0's QubesDB, over vchan.
    pub qubesdb_vchan: bool,
    /// `qubes.vifs=xen`: the service is its vifs' Xen back and front end.
    pub xen_vifs: bool,
}

/// Where the booted service takes its configuration from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootConfig {
    /// The YAML file PID 1 wrote (from the image, a disk, or the lab's port, with the
    /// command line's `qubesdb.` keys over it).
    File(PathBuf),
    /// dom0's QubesDB over vchan (`qubes.qubesdb=vchan`), through the Linux Xen devices;
    /// with `xen_vifs` (`qubes.vifs=xen`) the vifs' rings are the service's too.
    QubesDbVchan { xen_vifs: bool },
}

impl BootConfig {
    /// The configuration file, for `run --config`.
    pub fn file(&self) -> Option<PathBuf> {
        match self {
            BootConfig::File(p) => Some(p.clone()),
            BootConfig::QubesDbVchan { .. } => None,
        }
    }

    /// Whether the service serves its vifs' Xen rings itself (`run --vifs xen`).
    pub fn xen_vifs(&self) -> bool {
        matches!(self, BootConfig::QubesDbVchan { xen_vifs: true })
    }

    /// The hypervisor access for `run --qubesdb-vchan`.
    pub fn qubesdb_vchan(&self) -> Option<vif_backend::xen::qubesdb::XenAccess> {
        match self {
            BootConfig::File(_) => None,
            BootConfig::QubesDbVchan { .. } => Some(vif_backend::xen::qubesdb::XenAccess::Linux),
        }
    }
}

/// A command line key that is malformed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootError(pub String);

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BootError {}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Parses the kernel command line. Quoting follows the kernel's `next_arg()`
/// (`lib/cmdline.c`): double quotes group, and are dropped.
pub fn parse_cmdline(cmdline: &str) -> Result<BootArgs, BootError> {
    let mut args = BootArgs::default();
    for word in split_cmdline(cmdline) {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        match key {
            "qubes.config" => {
                if !value.starts_with('/') {
                    return Err(BootError(format!(
                        "qubes.config={value}: must be an absolute path (a file in the image \
                         or a block device such as /dev/vdb)"
                    )));
                }
                args.config = Some(value.to_string());
            }
            "qubes.log" => args.log = Some(value.to_string()),
            "qubes.lab" => args.lab = value == "1",
            "qubes.qubesdb" => {
                if value != "vchan" {
                    return Err(BootError(format!(
                        "qubes.qubesdb={value}: the only source is `vchan` (dom0's QubesDB); \
                         for a file give qubes.config=PATH"
                    )));
                }
                args.qubesdb_vchan = true;
            }
            "qubes.vifs" => match value {
                "xen" => args.xen_vifs = true,
                "kernel" => args.xen_vifs = false,
                _ => {
                    return Err(BootError(format!(
                        "qubes.vifs={value}: `xen` (the service serves the Xen rings) or \
                         `kernel` (the kernel's netfront and netback, the default)"
                    )))
                }
            },
            "ifname" => {
                let Some((name, mac)) = value.split_once(':') else {
                    return Err(BootError(format!(
                        "ifname={value}: expected ifname=<name>:<MAC>"
                    )));
                };
                if name.is_empty() || name.len() > 15 || name.contains('/') || !is_mac(mac) {
                    return Err(BootError(format!(
                        "ifname={value}: expected a name of 1 to 15 characters, then a MAC \
                         such as 52:54:00:12:34:56"
                    )));
                }
                args.ifnames
                    .push((name.to_string(), mac.to_ascii_lowercase()));
            }
            k if k.starts_with("qubesdb.") => {
                let db_key = &k["qubesdb.".len()..];
                if !db_key.starts_with('/') {
                    return Err(BootError(format!(
                        "{word}: a QubesDB key starts with / (qubesdb./qubes-ip=10.137.0.6)"
                    )));
                }
                args.qubesdb.push((db_key.to_string(), value.to_string()));
            }
            _ => {}
        }
    }
    Ok(args)
}

fn split_cmdline(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// The configuration the service is to run with: the file (or disk) the command line names,
/// with its `qubesdb` keys overlaid, as YAML text. Trailing NUL bytes (a disk's padding) are
/// cut at the first NUL.
pub fn merge_config(
    raw: &[u8],
    source: &str,
    overlay: &[(String, String)],
) -> Result<String, BootError> {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let text = std::str::from_utf8(&raw[..end])
        .map_err(|e| BootError(format!("{source}: the configuration is not UTF-8 ({e})")))?;
    if overlay.is_empty() {
        return Ok(text.to_string());
    }
    let mut doc: serde_yaml::Value = if text.trim().is_empty() {
        serde_yaml::Value::Mapping(Default::default())
    } else {
        serde_yaml::from_str(text).map_err(|e| BootError(format!("{source}: {e}")))?
    };
    let Some(map) = doc.as_mapping_mut() else {
        return Err(BootError(format!(
            "{source}: the configuration is not a YAML mapping"
        )));
    };
    let db = map
        .entry("qubesdb".into())
        .or_insert_with(|| serde_yaml::Value::Mapping(Default::default()));
    let Some(db) = db.as_mapping_mut() else {
        return Err(BootError(format!("{source}: qubesdb is not a mapping")));
    };
    for (k, v) in overlay {
        db.insert(k.as_str().into(), v.as_str().into());
    }
    serde_yaml::to_string(&doc).map_err(|e| BootError(format!("{source}: {e}")))
}

/// Whether this process is PID 1.
pub fn is_init() -> bool {
    std::process::id() == 1
}

/// What `main` of a service binary does first. As PID 1 it boots ([`boot`]), runs `service`
/// with the configuration file it made, and powers off when that returns; it never returns
/// itself. Run as `/init poweroff` by the kernel's orderly power-off, it signals PID 1 and
/// exits. Otherwise it returns at once and `main` goes on as a normal command.
pub fn run_if_init(service: &str, run: impl FnOnce(BootConfig) -> ExitCode) {
    run_if_init_with(service, Duties::default(), run)
}

/// Duties beyond the common ones, per service.
#[derive(Debug, Clone, Copy, Default)]
pub struct Duties {
    /// Give the uplink its address and default route from the configuration's QubesDB
    /// (`/qubes-ip`, `/qubes-netmask`, `/qubes-gateway`), as Qubes' setup-ip does in a Linux
    /// qube: for a service whose own connections go through the kernel (sys-whonix's Tor
    /// client). Reverse-path filtering is then made strict everywhere, so that a packet a
    /// client sends on its vif to that address is dropped by the kernel (the route back to
    /// its source is not the vif), not delivered to the kernel's sockets.
    pub kernel_uplink: bool,
}

/// [`run_if_init`] with service-specific [`Duties`].
pub fn run_if_init_with(service: &str, duties: Duties, run: impl FnOnce(BootConfig) -> ExitCode) {
    let args: Vec<String> = std::env::args().collect();
    if !is_init() {
        if args.len() == 2 && args[1] == "poweroff" && same_program_as_init() {
            // Only when PID 1 runs this very program (an image's /init), so that
            // `sys-firewall poweroff` typed on an ordinary system cannot signal its init.
            let _ = kill(Pid::from_raw(1), Signal::SIGTERM);
            std::process::exit(0);
        }
        return;
    }
    install_panic_hook(service);
    match boot(service, duties) {
        Ok(config) => {
            let code = run(config);
            console(&format!("{service}: {}", memory_report()));
            console(&format!("{service}: stopped ({code:?}); powering off"));
        }
        Err(e) => console(&format!("{service}: fatal: {e}; powering off")),
    }
    power_off()
}

/// The service's resident memory now and at its peak (`VmRSS`, `VmHWM` of proc(5)'s
/// `/proc/self/status`) and the guest's (`MemTotal`, `MemAvailable` of `/proc/meminfo`).
pub fn memory_report() -> String {
    let field = |text: &str, key: &str| -> String {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("?")
            .to_string()
    };
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    format!(
        "memory: VmRSS {} kB, VmHWM {} kB; guest MemTotal {} kB, MemAvailable {} kB",
        field(&status, "VmRSS:"),
        field(&status, "VmHWM:"),
        field(&meminfo, "MemTotal:"),
        field(&meminfo, "MemAvailable:")
    )
}

fn same_program_as_init() -> bool {
    match (
        fs::canonicalize("/proc/1/exe"),
        fs::canonicalize("/proc/self/exe"),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn console(msg: &str) {
    eprintln!("{msg}");
}

fn install_panic_hook(service: &str) {
    let service = service.to_string();
    std::panic::set_hook(Box::new(move |info| {
        console(&format!("{service}: panic: {info}; powering off"));
        power_off();
    }));
}

/// Syncs and powers the machine off; never returns (if the kernel refuses, it waits forever
/// rather than exit and panic the kernel).
pub fn power_off() -> ! {
    nix::unistd::sync();
    let e = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    console(&format!("power off failed: {e:?}"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Steps 1 to 5 of the module docs; returns the configuration file to run with.
pub fn boot(service: &str, duties: Duties) -> Result<BootConfig, BootError> {
    let t0 = Instant::now();
    mount_fs("proc", "/proc", "proc")?;
    mount_fs("sysfs", "/sys", "sysfs")?;
    mount_fs("devtmpfs", "/dev", "devtmpfs")?;
    let cmdline = fs::read_to_string("/proc/cmdline")
        .map_err(|e| BootError(format!("/proc/cmdline: {e}")))?;
    let args = parse_cmdline(&cmdline)?;
    // Set before the service starts logging or any thread exists.
    std::env::set_var("RUST_LOG", args.log.as_deref().unwrap_or("info"));
    std::env::set_var("NO_COLOR", "1");
    console(&format!(
        "{service}: PID 1, kernel {}",
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    ));

    let t_modules = Instant::now();
    if args.xen_vifs && !args.qubesdb_vchan {
        return Err(BootError(
            "qubes.vifs=xen learns the vifs from XenStore with dom0's QubesDB: add \
             qubes.qubesdb=vchan"
                .to_string(),
        ));
    }
    // With qubes.vifs=xen the service is the vifs' front and back end: the kernel's drivers
    // would bind the devices first.
    let skip: &[&str] = if args.xen_vifs {
        &["xen-netfront", "xen-netback"]
    } else {
        &[]
    };
    let (loaded, absent) = load_modules(Path::new(MODULES_DIR), on_xen(), skip)?;
    console(&format!(
        "{service}: {} modules loaded in {} ms{}",
        loaded.len(),
        t_modules.elapsed().as_millis(),
        if absent.is_empty() {
            String::new()
        } else {
            format!(
                " ({}: not on Xen, or no such device here)",
                absent.join(", ")
            )
        }
    ));
    // The kernel's orderly power-off (Xen's control/shutdown) runs this command.
    let _ = fs::write("/proc/sys/kernel/poweroff_cmd", "/init poweroff");
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(reap_children)
        .map_err(|e| BootError(format!("cannot start the reaper thread: {e}")))?;
    start_power_button_watch();

    let links = bring_links_up(&args.ifnames)?;
    console(&format!("{service}: links up: {}", links.join(" ")));

    if args.qubesdb_vchan {
        if args.lab || args.config.is_some() || !args.qubesdb.is_empty() {
            return Err(BootError(
                "qubes.qubesdb=vchan takes the whole configuration from dom0: drop \
                 qubes.config, qubes.lab and the qubesdb. keys"
                    .to_string(),
            ));
        }
        if duties.kernel_uplink {
            return Err(BootError(format!(
                "{service} gives its kernel the uplink's address at boot, from a \
                 configuration file: qubes.qubesdb=vchan is not supported for it yet \
                 (give qubes.config)"
            )));
        }
        console(&format!(
            "{service}: configuration from dom0's QubesDB over vchan, boot took {} ms",
            t0.elapsed().as_millis()
        ));
        return Ok(BootConfig::QubesDbVchan {
            xen_vifs: args.xen_vifs,
        });
    }
    let mut lab_port = None;
    let (source, text) = if args.lab {
        let (port, first) = lab::open(Duration::from_secs(30))?;
        lab_port = Some(port);
        let source = format!("the lab's port {LAB_PORT}");
        let text = merge_config(&first, &source, &args.qubesdb)?;
        (source, text)
    } else {
        let source = args
            .config
            .clone()
            .unwrap_or_else(|| format!("/etc/{service}.yaml"));
        let raw = read_config(&source)?;
        let text = merge_config(&raw, &source, &args.qubesdb)?;
        (source, text)
    };
    if duties.kernel_uplink {
        let (name, index, addr, prefix, gw) = kernel_uplink(&text)?;
        vif_backend::link::set_uplink_ipv4(index, addr, prefix, gw)
            .map_err(|e| BootError(format!("{name}: address {addr}/{prefix} via {gw}: {e}")))?;
        for conf in ["all", "default"] {
            let p = format!("/proc/sys/net/ipv4/conf/{conf}/rp_filter");
            fs::write(&p, "1").map_err(|e| BootError(format!("{p}: {e}")))?;
        }
        console(&format!(
            "{service}: {name} {addr}/{prefix} via {gw}, strict reverse-path filter"
        ));
    }
    let out = PathBuf::from(format!("/run/{service}.yaml"));
    fs::write(&out, text).map_err(|e| BootError(format!("{}: {e}", out.display())))?;
    if let Some(port) = lab_port {
        let (config, control) = (out.clone(), PathBuf::from(format!("/run/{service}.sock")));
        let overlay = args.qubesdb.clone();
        std::thread::Builder::new()
            .name("lab-port".into())
            .spawn(move || lab::serve(port, &config, &control, &overlay))
            .map_err(|e| BootError(format!("cannot start the lab port's thread: {e}")))?;
    }
    console(&format!(
        "{service}: configuration from {source}{}, boot took {} ms",
        if args.qubesdb.is_empty() {
            String::new()
        } else {
            format!(
                " and {} qubesdb keys of the command line",
                args.qubesdb.len()
            )
        },
        t0.elapsed().as_millis()
    ));
    Ok(BootConfig::File(out))
}

/// The uplink's name, index, address, prefix length and gateway from the configuration.
fn kernel_uplink(
    text: &str,
) -> Result<(String, u32, std::net::Ipv4Addr, u8, std::net::Ipv4Addr), BootError> {
    let doc: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| BootError(format!("configuration: {e}")))?;
    let name = doc["uplink"]["name"].as_str().unwrap_or("eth0").to_string();
    let key = |k: &str| -> Result<std::net::Ipv4Addr, BootError> {
        doc["qubesdb"][k]
            .as_str()
            .ok_or_else(|| {
                BootError(format!(
                    "configuration: {k} is missing (the uplink needs it)"
                ))
            })?
            .parse()
            .map_err(|e| BootError(format!("configuration: {k}: {e}")))
    };
    let (addr, gw) = (key("/qubes-ip")?, key("/qubes-gateway")?);
    let prefix = match doc["qubesdb"]["/qubes-netmask"].as_str() {
        Some(m) => {
            let m: std::net::Ipv4Addr = m
                .parse()
                .map_err(|e| BootError(format!("configuration: /qubes-netmask: {e}")))?;
            u32::from(m).count_ones() as u8
        }
        None => 32,
    };
    let index = fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| BootError(format!("the uplink {name} is not there")))?;
    Ok((name, index, addr, prefix, gw))
}

fn mount_fs(source: &str, target: &str, fstype: &str) -> Result<(), BootError> {
    let _ = fs::create_dir_all(target);
    match mount(
        Some(source),
        target,
        Some(fstype),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        None::<&str>,
    ) {
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(e) => Err(BootError(format!("mount {fstype} on {target}: {e}"))),
    }
}

/// Whether the guest runs on Xen (`/sys/hypervisor/type`, which the kernel fills only then).
fn on_xen() -> bool {
    fs::read_to_string("/sys/hypervisor/type").is_ok_and(|t| t.trim() == "xen")
}

/// Loads the modules `dir/load-order` lists; off Xen, the Xen drivers (`xen_*`) are not even
/// tried (they would refuse with ENODEV, after the kernel had relocated them). Returns
/// (loaded, skipped or refused with ENODEV).
fn load_modules(
    dir: &Path,
    xen: bool,
    skip: &[&str],
) -> Result<(Vec<String>, Vec<String>), BootError> {
    let list = dir.join("load-order");
    let text = match fs::read_to_string(&list) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((vec![], vec![])),
        Err(e) => return Err(BootError(format!("{}: {e}", list.display()))),
    };
    let (mut loaded, mut absent) = (Vec::new(), Vec::new());
    for file in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = dir.join(file);
        let name = file.trim_end_matches(".ko").to_string();
        let base = name.rsplit('/').next().unwrap_or(&name).replace('_', "-");
        if skip.contains(&base.as_str()) {
            continue;
        }
        if !xen && name.starts_with("xen_") {
            absent.push(name);
            continue;
        }
        let f = fs::File::open(&path).map_err(|e| BootError(format!("{}: {e}", path.display())))?;
        match nix::kmod::finit_module(&f, c"", nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) | Err(Errno::EEXIST) => loaded.push(name),
            Err(Errno::ENODEV) => absent.push(name),
            Err(e) => return Err(BootError(format!("loading module {name}: {e}"))),
        }
    }
    Ok((loaded, absent))
}

fn reap_children() {
    loop {
        match nix::sys::wait::waitpid(Pid::from_raw(-1), None) {
            Ok(_) | Err(Errno::EINTR) => {}
            // No children now; look again later (a thread blocking in waitpid would take the
            // exit status of a child the service itself waits for: the services start none).
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

/// `struct input_event` on 64-bit Linux (linux/input.h): timeval (16), type, code (u16 each),
/// value (i32).
const INPUT_EVENT_LEN: usize = 24;
const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;

fn start_power_button_watch() {
    // devtmpfs creates the nodes asynchronously after the button module's probe.
    for _ in 0..20 {
        let Ok(dir) = fs::read_dir("/dev/input") else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("event") {
                continue;
            }
            let Ok(f) = fs::File::open(entry.path()) else {
                continue;
            };
            let _ = std::thread::Builder::new()
                .name(format!("input-{name}"))
                .spawn(move || watch_power_key(f));
        }
        return;
    }
}

fn watch_power_key(mut f: fs::File) {
    let mut ev = [0u8; INPUT_EVENT_LEN];
    while f.read_exact(&mut ev).is_ok() {
        let ty = u16::from_ne_bytes([ev[16], ev[17]]);
        let code = u16::from_ne_bytes([ev[18], ev[19]]);
        let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
        if ty == EV_KEY && code == KEY_POWER && value == 1 {
            console("power button pressed: stopping");
            let _ = kill(Pid::this(), Signal::SIGTERM);
        }
    }
}

/// Renames NICs as `ifname=` asks, then brings every link up. Returns the link names.
fn bring_links_up(ifnames: &[(String, String)]) -> Result<Vec<String>, BootError> {
    let mut by_mac: BTreeMap<String, (String, u32)> = BTreeMap::new();
    let mut names = Vec::new();
    let dir =
        fs::read_dir("/sys/class/net").map_err(|e| BootError(format!("/sys/class/net: {e}")))?;
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let read = |f: &str| fs::read_to_string(entry.path().join(f)).unwrap_or_default();
        let Ok(index) = read("ifindex").trim().parse::<u32>() else {
            continue;
        };
        by_mac.insert(
            read("address").trim().to_ascii_lowercase(),
            (name.clone(), index),
        );
        names.push((name, index));
    }
    for (want, mac) in ifnames {
        let Some((old, index)) = by_mac.get(mac) else {
            return Err(BootError(format!(
                "ifname={want}:{mac}: no NIC has that MAC"
            )));
        };
        vif_backend::link::set_link(*index, Some(want), false)
            .map_err(|e| BootError(format!("renaming {old} to {want}: {e}")))?;
        for n in names.iter_mut().filter(|(_, i)| i == index) {
            n.0 = want.clone();
        }
    }
    names.sort();
    let mut up = Vec::new();
    for (name, index) in names {
        vif_backend::link::set_link(index, None, true)
            .map_err(|e| BootError(format!("bringing {name} up: {e}")))?;
        up.push(name);
    }
    Ok(up)
}

/// Reads the configuration: a file, or a block device (waited for: its driver may still be
/// probing).
fn read_config(source: &str) -> Result<Vec<u8>, BootError> {
    let path = Path::new(source);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::metadata(path) {
            Ok(m) if m.file_type().is_block_device() || m.is_file() => break,
            Ok(_) => {
                return Err(BootError(format!(
                    "{source}: neither a file nor a block device"
                )))
            }
            Err(_) if source.starts_with("/dev/") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(BootError(format!(
                    "no configuration: {source}: {e} (give qubes.config=<file or disk> on the \
                     kernel command line, or build the image with --config)"
                )))
            }
        }
    }
    let mut f = fs::File::open(path).map_err(|e| BootError(format!("{source}: {e}")))?;
    let mut buf = Vec::new();
    // A disk is read up to the configuration's end (the first NUL), at most 16 MiB.
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = f
            .read(&mut chunk)
            .map_err(|e| BootError(format!("{source}: {e}")))?;
        if n == 0 {
            break;
        }
        if let Some(z) = chunk[..n].iter().position(|&b| b == 0) {
            buf.extend_from_slice(&chunk[..z]);
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 16 << 20 {
            return Err(BootError(format!(
                "{source}: no NUL within 16 MiB: not a configuration disk"
            )));
        }
    }
    Ok(buf)
}

/// The virtio-serial port name of the lab channel (`-device virtserialport,name=...`).
pub const LAB_PORT: &str = "org.qubes-lab.0";

/// The lab channel: when the lab (`qubes-lab up --vm`) runs a service as a VM, one
/// virtio-serial port carries what the process form gets from files and sockets on the host.
///
/// Frames both ways are a header line `<kind> <length>\n` and `length` bytes. From the guest:
/// `hello` (the port is open, so send the configuration: the guest's driver drops what
/// arrives before), `reply`. From the host:
/// `config` (the whole YAML; written to the service's file, which it re-reads on change),
/// `links` (lines `<name> <mac>`: the NIC with that MAC gets that name and is brought up, now
/// and whenever it appears, as vifs are hot-plugged), `mtu` (`<name> <mtu>`: the guest's end
/// of a link changes its MTU, as the lab's `mtu` command does to both ends of a veth pair;
/// answered by a `reply`), `control` (one control-socket command;
/// answered with a `reply` frame holding the service's answer). The host sends one request at
/// a time, so replies need no ids.
pub mod lab {
    use std::collections::BTreeMap;
    use std::fs;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use super::{console, BootError, LAB_PORT};

    /// The largest frame accepted (a configuration with many rules is well below it).
    const MAX_FRAME: usize = 16 << 20;

    /// Reads one frame: (kind, bytes). `None` at the end of the stream.
    pub fn read_frame(r: &mut impl BufRead) -> std::io::Result<Option<(String, Vec<u8>)>> {
        let mut header = String::new();
        if r.read_line(&mut header)? == 0 {
            return Ok(None);
        }
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
        let (kind, len) = header
            .trim_end()
            .split_once(' ')
            .ok_or_else(|| bad("frame header without a length"))?;
        let len: usize = len
            .parse()
            .map_err(|_| bad("frame length is not a number"))?;
        if len > MAX_FRAME {
            return Err(bad("frame longer than 16 MiB"));
        }
        let mut data = vec![0u8; len];
        r.read_exact(&mut data)?;
        Ok(Some((kind.to_string(), data)))
    }

    /// Writes one frame.
    pub fn write_frame(w: &mut impl Write, kind: &str, data: &[u8]) -> std::io::Result<()> {
        let mut buf = format!("{kind} {}\n", data.len()).into_bytes();
        buf.extend_from_slice(data);
        w.write_all(&buf)?;
        w.flush()
    }

    /// The port's device, found by its name in sysfs (there is no udev to make the
    /// `/dev/virtio-ports/<name>` link).
    fn find_port() -> Option<String> {
        for e in fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
            let name = fs::read_to_string(e.path().join("name")).unwrap_or_default();
            if name.trim() == LAB_PORT {
                return Some(format!("/dev/{}", e.file_name().to_string_lossy()));
            }
        }
        None
    }

    /// Opens the port and waits for the first configuration (and applies `links` frames that
    /// come before it).
    pub fn open(wait: Duration) -> Result<(fs::File, Vec<u8>), BootError> {
        let deadline = Instant::now() + wait;
        let path = loop {
            if let Some(p) = find_port().filter(|p| Path::new(p).exists()) {
                break p;
            }
            if Instant::now() > deadline {
                return Err(BootError(format!(
                    "qubes.lab=1 but no virtio-serial port named {LAB_PORT} within {wait:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let port = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| BootError(format!("{path}: {e}")))?;
        let mut r = BufReader::new(
            port.try_clone()
                .map_err(|e| BootError(format!("{path}: {e}")))?,
        );
        let mut w = port
            .try_clone()
            .map_err(|e| BootError(format!("{path}: {e}")))?;
        // The host discards nothing, but the guest's driver drops what arrives before the port
        // is open: the lab sends the configuration when it hears this (and when it connects).
        let _ = write_frame(&mut w, "hello", b"");
        let mut last_hello = Instant::now();
        loop {
            if last_hello.elapsed() > Duration::from_secs(1) {
                let _ = write_frame(&mut w, "hello", b"");
                last_hello = Instant::now();
            }
            match read_frame(&mut r) {
                Ok(Some((kind, data))) if kind == "config" => {
                    console(&format!(
                        "lab: configuration received ({} bytes)",
                        data.len()
                    ));
                    return Ok((port, data));
                }
                Ok(Some((kind, data))) if kind == "links" => apply_links(&parse_links(&data)),
                Ok(Some((kind, _))) => {
                    console(&format!("lab: {kind} before any configuration: ignored"))
                }
                // Nobody on the host end yet: reads return nothing until the lab connects.
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Ok(None) => {
                    return Err(BootError(format!(
                        "{path}: no configuration from the lab within {wait:?}"
                    )))
                }
                Err(e) => return Err(BootError(format!("{path}: {e}"))),
            }
        }
    }

    fn parse_links(data: &[u8]) -> BTreeMap<String, String> {
        String::from_utf8_lossy(data)
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(name, mac)| (mac.trim().to_ascii_lowercase(), name.to_string()))
            .collect()
    }

    /// Renames and brings up the NICs the map names (mac -> name), when they are there.
    fn apply_links(map: &BTreeMap<String, String>) {
        let Ok(dir) = fs::read_dir("/sys/class/net") else {
            return;
        };
        for e in dir.flatten() {
            let cur = e.file_name().to_string_lossy().into_owned();
            let read = |f: &str| fs::read_to_string(e.path().join(f)).unwrap_or_default();
            let Some(want) = map.get(read("address").trim()) else {
                continue;
            };
            let Ok(index) = read("ifindex").trim().parse::<u32>() else {
                continue;
            };
            let flags =
                u32::from_str_radix(read("flags").trim().trim_start_matches("0x"), 16).unwrap_or(0);
            if &cur == want && flags & 1 == 1 {
                continue;
            }
            let rename = (&cur != want).then_some(want.as_str());
            match vif_backend::link::set_link(index, rename, true) {
                Ok(()) => console(&format!("lab: {cur} is {want}, up")),
                Err(e) => console(&format!("lab: {cur} as {want}: {e}")),
            }
        }
    }

    /// Serves the port for the life of the service.
    pub fn serve(port: fs::File, config: &Path, control: &Path, overlay: &[(String, String)]) {
        let links: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
        let watched = Arc::clone(&links);
        // Hot-plugged NICs appear at any time; a light poll names them.
        let _ = std::thread::Builder::new()
            .name("lab-links".into())
            .spawn(move || loop {
                if let Ok(map) = watched.lock() {
                    apply_links(&map);
                }
                std::thread::sleep(Duration::from_millis(100));
            });
        let Ok(mut w) = port.try_clone() else { return };
        let mut r = BufReader::new(port);
        loop {
            let (kind, data) = match read_frame(&mut r) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    // The host end is not connected: a read returns nothing until it is.
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                Err(e) => {
                    console(&format!("lab: the port: {e}"));
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            };
            match kind.as_str() {
                "config" => match super::merge_config(&data, "the lab's configuration", overlay) {
                    Ok(text) => {
                        let tmp = config.with_extension("yaml.new");
                        if fs::write(&tmp, text)
                            .and_then(|()| fs::rename(&tmp, config))
                            .is_err()
                        {
                            console("lab: cannot write the configuration");
                        }
                    }
                    Err(e) => console(&format!("lab: {e}")),
                },
                "links" => {
                    let map = parse_links(&data);
                    apply_links(&map);
                    if let Ok(mut l) = links.lock() {
                        *l = map;
                    }
                }
                "mtu" => {
                    let reply = set_mtu(&String::from_utf8_lossy(&data));
                    if write_frame(&mut w, "reply", reply.as_bytes()).is_err() {
                        console("lab: cannot answer on the port");
                    }
                }
                "control" => {
                    let reply = ask(control, &data);
                    if write_frame(&mut w, "reply", reply.as_bytes()).is_err() {
                        console("lab: cannot answer on the port");
                    }
                }
                other => console(&format!("lab: unknown frame {other:?} ignored")),
            }
        }
    }

    /// `<name> <mtu>`: that link's MTU; `ok` or `error: ...`.
    fn set_mtu(req: &str) -> String {
        let mut w = req.split_whitespace();
        let (Some(name), Some(Ok(mtu))) = (w.next(), w.next().map(str::parse::<u32>)) else {
            return format!("error: expected <link> <mtu>, got {req:?}\n");
        };
        let index = fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        let Some(index) = index else {
            return format!("error: no link {name} in the guest\n");
        };
        match vif_backend::link::set_mtu(index, mtu) {
            Ok(()) => "ok\n".to_string(),
            Err(e) => format!("error: {name} mtu {mtu}: {e}\n"),
        }
    }

    /// One control request to the service's socket; its answer, or an `error: ...` line.
    fn ask(control: &Path, command: &[u8]) -> String {
        let mut s = match UnixStream::connect(control) {
            Ok(s) => s,
            Err(e) => {
                return format!("error: the service's control socket: {e} (still starting?)\n")
            }
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let mut line = command.to_vec();
        if !line.ends_with(b"\n") {
            line.push(b'\n');
        }
        if let Err(e) = s.write_all(&line) {
            return format!("error: {e}\n");
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = String::new();
        match s.read_to_string(&mut out) {
            Ok(_) => out,
            Err(e) => format!("error: {e}\n"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_keys_are_read_and_the_rest_left_alone() {
        let a = parse_cmdline(
            "console=ttyS0 root=/dev/mapper/dmroot ro nomodeset qubes.config=/dev/vdb \
             ifname=vif3.0:52:54:00:AB:cd:02 qubesdb./qubes-ip=10.137.0.6 \
             \"qubesdb./name=a b\" qubes.log=debug quiet",
        )
        .expect("test data");
        assert_eq!(a.config.as_deref(), Some("/dev/vdb"));
        assert_eq!(
            a.ifnames,
            [("vif3.0".to_string(), "52:54:00:ab:cd:02".to_string())]
        );
        assert_eq!(
            a.qubesdb,
            [
                ("/qubes-ip".to_string(), "10.137.0.6".to_string()),
                ("/name".to_string(), "a b".to_string())
            ]
        );
        assert_eq!(a.log.as_deref(), Some("debug"));
        assert!(!a.qubesdb_vchan);
        let q = parse_cmdline("root=/dev/xvda qubes.qubesdb=vchan").expect("test data");
        assert!(q.qubesdb_vchan && q.config.is_none() && !q.xen_vifs);
        let x = parse_cmdline("qubes.qubesdb=vchan qubes.vifs=xen").expect("test data");
        assert!(x.qubesdb_vchan && x.xen_vifs);
    }

    #[test]
    fn lab_frames_round_trip_and_bad_headers_are_refused() {
        let mut buf = Vec::new();
        lab::write_frame(&mut buf, "config", b"qubesdb: {}\n").expect("test data");
        lab::write_frame(&mut buf, "control", b"").expect("test data");
        let mut r = std::io::BufReader::new(&buf[..]);
        assert_eq!(
            lab::read_frame(&mut r).expect("test data"),
            Some(("config".into(), b"qubesdb: {}\n".to_vec()))
        );
        assert_eq!(
            lab::read_frame(&mut r).expect("test data"),
            Some(("control".into(), vec![]))
        );
        assert_eq!(lab::read_frame(&mut r).expect("test data"), None);
        for bad in ["config\n", "config x\n", "config 99999999999\n"] {
            let mut r = std::io::BufReader::new(bad.as_bytes());
            assert!(lab::read_frame(&mut r).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn malformed_keys_are_named() {
        for (line, want) in [
            (
                "qubes.config=vdb",
                "qubes.config=vdb: must be an absolute path",
            ),
            ("ifname=eth0", "ifname=eth0: expected ifname=<name>:<MAC>"),
            ("ifname=eth0:52:54", "ifname=eth0:52:54: expected a name"),
            ("qubesdb.qubes-ip=1", "a QubesDB key starts with /"),
            ("qubes.qubesdb=socket", "the only source is `vchan`"),
        ] {
            let e = parse_cmdline(line).expect_err("must fail").to_string();
            assert!(e.contains(want), "{line}: {e}");
        }
    }

    #[test]
    fn a_disk_configuration_ends_at_its_padding_and_takes_the_overlay() {
        let mut raw = b"qubesdb:\n  /qubes-ip: 10.137.0.5\n  /qubes-gateway: 10.137.0.1\n".to_vec();
        raw.resize(4096, 0);
        let text = merge_config(&raw, "/dev/vdb", &[]).expect("test data");
        assert!(text.ends_with("10.137.0.1\n"));
        let text = merge_config(
            &raw,
            "/dev/vdb",
            &[
                ("/qubes-ip".into(), "10.137.0.9".into()),
                ("/name".into(), "fw".into()),
            ],
        )
        .expect("test data");
        let v: serde_yaml::Value = serde_yaml::from_str(&text).expect("test data");
        assert_eq!(v["qubesdb"]["/qubes-ip"].as_str(), Some("10.137.0.9"));
        assert_eq!(v["qubesdb"]["/qubes-gateway"].as_str(), Some("10.137.0.1"));
        assert_eq!(v["qubesdb"]["/name"].as_str(), Some("fw"));
        let text = merge_config(b"", "/dev/vdb", &[("/qubes-ip".into(), "1.2.3.4".into())])
            .expect("test data");
        assert!(text.contains("/qubes-ip: 1.2.3.4"), "{text}");
        let e = merge_config(b"- a\n", "/dev/vdb", &[("/a".into(), "b".into())])
            .expect_err("must fail");
        assert!(e.to_string().contains("not a YAML mapping"), "{e}");
    }
}
