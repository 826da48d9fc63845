//! Our sys-net service in the lab (`--netvm rust`): `sys-net run --config <state>/sys-net.yaml
//! --control <state>/sys-net.sock` inside the sys-net namespace, in the background, with
//! `<state>/sys-net.pid` and `<state>/sys-net.log`. Its uplink address comes by DHCP from the
//! world's dnsmasq (crate::world), so `start` waits for a lease as well as for the service.

use std::path::PathBuf;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::cmd::{err, Cmd, Result};
use crate::procs;
use crate::state::Paths;
use crate::topology::Qube;

/// The pid-file and log-file name of the service.
pub const PROCESS: &str = "sys-net";

/// The sys-net binary: `$QUBES_LAB_SYS_NET`, else next to qubes-lab, else PATH.
pub fn binary() -> Result<PathBuf> {
    procs::workspace_binary("sys-net", "QUBES_LAB_SYS_NET")
}

/// Starts the service for the netvm `q` and waits until it answers `status` and holds a DHCP
/// lease (dnsmasq checks an address with a ping before offering it: about 3 s).
pub fn start(paths: &Paths, q: &Qube) -> Result<()> {
    let bin = binary()?;
    let sock = paths.net_control_sock();
    let _ = std::fs::remove_file(&sock);
    let cmd = Cmd::in_ns(&q.ns, &bin)
        .arg("run")
        .arg("--config")
        .arg(paths.config(&q.name))
        .arg("--control")
        .arg(&sock);
    let mut child = procs::start(paths, PROCESS, &cmd)?;
    procs::wait_ready(
        &format!("the sys-net service ({})", cmd.display()),
        &mut child,
        &paths.log(PROCESS),
        Duration::from_secs(10),
        || sock.exists() && status(paths).is_ok(),
    )?;
    wait_lease(paths, Duration::from_secs(20))
}

/// Waits until the service reports a DHCP lease.
pub fn wait_lease(paths: &Paths, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let st = status(paths).unwrap_or_default();
        if st.lines().any(|l| l.starts_with("addressing dhcp")) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return err(format!(
                "sys-net got no DHCP lease within {} s (see {} and the world's dnsmasq log {}); \
                 its status:\n{}",
                within.as_secs(),
                paths.log(PROCESS).display(),
                paths.log("dnsmasq-dhcp").display(),
                crate::cmd::indent(st.trim_end())
            ));
        }
        sleep(Duration::from_millis(100));
    }
}

/// `sys-net status --control SOCK`: its output.
pub fn status(paths: &Paths) -> Result<String> {
    Cmd::new(binary()?)
        .arg("status")
        .arg("--control")
        .arg(paths.net_control_sock())
        .run()
}

/// The `config-generation N` the service reports, if it reports one.
pub fn config_generation(paths: &Paths) -> Option<u64> {
    status(paths)
        .ok()
        .and_then(|out| crate::service::parse_generation(&out))
}

/// Waits until the service applied a configuration written after generation `before`.
pub fn wait_applied(paths: &Paths, before: Option<u64>) -> Result<()> {
    crate::service::wait_generation(PROCESS, &paths.log(PROCESS), before, || {
        config_generation(paths)
    })
}
