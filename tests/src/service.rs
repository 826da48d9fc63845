//! Our sys-firewall service in the lab (`--firewall rust`): `sys-firewall run --config
//! <state>/sys-firewall.yaml --control <state>/control.sock` inside the sys-firewall namespace,
//! in the background, with `<state>/sys-firewall.pid` and `<state>/sys-firewall.log`.
//!
//! Configuration changes reach it by rewriting the YAML file atomically; it re-reads the file
//! when it changes. [`wait_applied`] is the one place that knows how to tell the change was
//! applied.

use std::path::PathBuf;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::cmd::{err, Cmd, Result};
use crate::procs;
use crate::state::Paths;
use crate::topology::Qube;

/// The pid-file and log-file name of the service.
pub const PROCESS: &str = "sys-firewall";

/// The sys-firewall binary: `$QUBES_LAB_SYS_FIREWALL`, else next to qubes-lab, else PATH.
pub fn binary() -> Result<PathBuf> {
    procs::workspace_binary("sys-firewall", "QUBES_LAB_SYS_FIREWALL")
}

/// Starts the service for the firewall qube `fw` and waits until it is ready, or fails with the
/// end of its log. Ready means: `sys-firewall status` answers. The service binds its control
/// socket before it attaches to the interfaces and answers requests only from its main loop,
/// so an answer means the interfaces are attached and the configuration is applied.
pub fn start(paths: &Paths, fw: &Qube) -> Result<()> {
    let bin = binary()?;
    let sock = paths.control_sock();
    let _ = std::fs::remove_file(&sock);
    let cmd = Cmd::in_ns(&fw.ns, &bin)
        .arg("run")
        .arg("--config")
        .arg(paths.config(&fw.name))
        .arg("--control")
        .arg(&sock);
    let mut child = procs::start(paths, PROCESS, &cmd)?;
    procs::wait_ready(
        &format!("the sys-firewall service ({})", cmd.display()),
        &mut child,
        &paths.log(PROCESS),
        Duration::from_secs(10),
        || sock.exists() && status(paths).is_ok(),
    )
}

/// Stops the service (SIGTERM, then SIGKILL after 3 s).
pub fn stop(paths: &Paths) -> Result<()> {
    procs::stop_named(paths, PROCESS)
}

/// `sys-firewall status --control SOCK`: its output.
pub fn status(paths: &Paths) -> Result<String> {
    Cmd::new(binary()?)
        .arg("status")
        .arg("--control")
        .arg(paths.control_sock())
        .run()
}

/// The `config-generation N` the service reports, if it reports one.
pub fn config_generation(paths: &Paths) -> Option<u64> {
    status(paths).ok().and_then(|out| parse_generation(&out))
}

pub(crate) fn parse_generation(status: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        l.trim()
            .strip_prefix("config-generation ")
            .and_then(|n| n.trim().parse().ok())
    })
}

/// Waits until the service has applied the configuration written after it reported
/// generation `before`: its generation must grow. When the service reported no generation
/// (no `status` yet), a short sleep is all we can do (best effort).
pub fn wait_applied(paths: &Paths, before: Option<u64>) -> Result<()> {
    wait_generation(PROCESS, &paths.log(PROCESS), before, || {
        config_generation(paths)
    })
}

/// Waits until `generation()` (a service's `config-generation`) is greater than `before`;
/// with no `before` (the service reported none), a short sleep is all that can be done.
pub(crate) fn wait_generation(
    service: &str,
    log: &std::path::Path,
    before: Option<u64>,
    generation: impl Fn() -> Option<u64>,
) -> Result<()> {
    let Some(before) = before else {
        sleep(Duration::from_millis(500));
        return Ok(());
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match generation() {
            Some(g) if g > before => return Ok(()),
            _ if Instant::now() >= deadline => {
                return err(format!(
                    "{service} did not apply the new configuration within 5 s \
                     (config-generation still {before}; see {})",
                    log.display()
                ))
            }
            _ => sleep(Duration::from_millis(20)),
        }
    }
}

/// Waits until the service reports a generation greater than `before` (when known) and a
/// status for which `done` holds: how `start` and `stop` know the service follows a vif that
/// came or went (the status lists `client <vif> address <ip> ...` for every attached client).
pub fn wait_status(
    paths: &Paths,
    before: Option<u64>,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = status(paths).unwrap_or_default();
        let newer = match before {
            Some(b) => parse_generation(&out).is_some_and(|g| g > b),
            None => true,
        };
        if newer && done(&out) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return err(format!(
                "sys-firewall did not {what} within 5 s (see {}); its status:\n{}",
                paths.log(PROCESS).display(),
                crate::cmd::indent(out.trim_end())
            ));
        }
        sleep(Duration::from_millis(20));
    }
}

/// Whether the service's status lists the client vif `vif` (attached and configured).
pub fn has_client(status: &str, vif: &str) -> bool {
    status
        .lines()
        .any(|l| l.strip_prefix("client ").and_then(|r| r.split(' ').next()) == Some(vif))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_line() {
        assert_eq!(
            parse_generation("uptime 3\nconfig-generation 17\n"),
            Some(17)
        );
        assert_eq!(parse_generation("config-generation x\n"), None);
        assert_eq!(parse_generation(""), None);
    }

    #[test]
    fn client_lines() {
        let st = "config-generation 3\nclient vif3.0 address 10.137.0.10 rules 1 flows 0\n  \
                  counters \nclient vif10.0 address 10.137.0.11 rules 1 flows 2\n\
                  waiting for vifs vif5.0\n";
        assert!(has_client(st, "vif3.0"));
        assert!(has_client(st, "vif10.0"));
        assert!(!has_client(st, "vif1.0"));
        assert!(!has_client(st, "vif5.0"));
    }
}
