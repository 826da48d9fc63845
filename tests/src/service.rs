//! Our services that serve client qubes in the lab, run in the background inside their qube's
//! namespace with `<state>/<process>.pid` and `<state>/<process>.log`:
//! - sys-firewall (`--firewall rust`): `sys-firewall run --config <state>/sys-firewall.yaml
//!   --control <state>/control.sock`;
//! - sys-whonix: `sys-whonix run --config <state>/sys-whonix.yaml --control
//!   <state>/sys-whonix.sock`, a client of the world's private Tor network.
//!
//! Configuration changes reach them by rewriting the YAML file atomically; they re-read the
//! file when it changes. [`Service::wait_applied`] is the one place that knows how to tell the
//! change was applied.

use std::path::PathBuf;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::cmd::{err, Cmd, Result};
use crate::procs;
use crate::state::{FirewallKind, Paths};
use crate::topology::{Qube, Role};

/// One of our services that serve client qubes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Firewall,
    Whonix,
}

impl Service {
    /// The service that runs in `netvm`, if one of ours does (sys-firewall only with
    /// `--firewall rust`).
    pub fn of(netvm: &Qube, kind: FirewallKind) -> Option<Service> {
        match netvm.role {
            Role::Firewall if kind == FirewallKind::Rust => Some(Service::Firewall),
            Role::Whonix => Some(Service::Whonix),
            _ => None,
        }
    }

    /// Its pid-file and log-file name, and its binary's name.
    pub fn process(self) -> &'static str {
        match self {
            Service::Firewall => "sys-firewall",
            Service::Whonix => "sys-whonix",
        }
    }

    /// The binary: `$QUBES_LAB_SYS_FIREWALL` (or `_SYS_WHONIX`), else next to qubes-lab, else
    /// PATH.
    pub fn binary(self) -> Result<PathBuf> {
        let env = match self {
            Service::Firewall => "QUBES_LAB_SYS_FIREWALL",
            Service::Whonix => "QUBES_LAB_SYS_WHONIX",
        };
        procs::workspace_binary(self.process(), env)
    }

    pub fn sock(self, paths: &Paths) -> PathBuf {
        match self {
            Service::Firewall => paths.control_sock(),
            Service::Whonix => paths.dir.join("sys-whonix.sock"),
        }
    }

    /// Starts the service for its qube `q` and waits until it is ready, or fails with the end
    /// of its log. Ready means: `status` answers. The services bind their control socket
    /// before they attach to the interfaces and answer requests only from their main loop, so
    /// an answer means the interfaces are attached and the configuration is applied (for
    /// sys-whonix, Tor may still be bootstrapping: [`Service::wait_tor_ready`]).
    pub fn start(self, paths: &Paths, q: &Qube) -> Result<()> {
        let bin = self.binary()?;
        let sock = self.sock(paths);
        let _ = std::fs::remove_file(&sock);
        let cmd = Cmd::in_ns(&q.ns, &bin)
            .arg("run")
            .arg("--config")
            .arg(paths.config(&q.name))
            .arg("--control")
            .arg(&sock);
        let mut child = procs::start(paths, self.process(), &cmd)?;
        procs::wait_ready(
            &format!("the {} service ({})", self.process(), cmd.display()),
            &mut child,
            &paths.log(self.process()),
            Duration::from_secs(10),
            || sock.exists() && self.status(paths).is_ok(),
        )
    }

    /// Stops the service (SIGTERM, then SIGKILL after 3 s).
    pub fn stop(self, paths: &Paths) -> Result<()> {
        procs::stop_named(paths, self.process())
    }

    pub fn running(self, paths: &Paths) -> bool {
        procs::read_pid(paths, self.process()).is_some_and(procs::alive)
    }

    /// `<service> status --control SOCK`: its output.
    pub fn status(self, paths: &Paths) -> Result<String> {
        Cmd::new(self.binary()?)
            .arg("status")
            .arg("--control")
            .arg(self.sock(paths))
            .run()
    }

    /// The `config-generation N` the service reports, if it reports one.
    pub fn config_generation(self, paths: &Paths) -> Option<u64> {
        self.status(paths)
            .ok()
            .and_then(|out| parse_generation(&out))
    }

    /// Waits until the service has applied the configuration written after it reported
    /// generation `before`: its generation must grow. When the service reported no
    /// generation (no `status` yet), a short sleep is all we can do (best effort).
    pub fn wait_applied(self, paths: &Paths, before: Option<u64>) -> Result<()> {
        wait_generation(self.process(), &paths.log(self.process()), before, || {
            self.config_generation(paths)
        })
    }

    /// Waits until the service reports a generation greater than `before` (when known) and a
    /// status for which `done` holds: how `start` and `stop` know the service follows a vif
    /// that came or went (the status lists `client <vif> address <ip> ...` for every attached
    /// client).
    pub fn wait_status(
        self,
        paths: &Paths,
        before: Option<u64>,
        what: &str,
        done: impl Fn(&str) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let out = self.status(paths).unwrap_or_default();
            let newer = match before {
                Some(b) => parse_generation(&out).is_some_and(|g| g > b),
                None => true,
            };
            if newer && done(&out) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return err(format!(
                    "{} did not {what} within 5 s (see {}); its status:\n{}",
                    self.process(),
                    paths.log(self.process()).display(),
                    crate::cmd::indent(out.trim_end())
                ));
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// sys-whonix: waits until its status says `tor ready`, printing each new bootstrap
    /// state it reports on stderr (`up` and `restart-whonix` show the progress this way).
    pub fn wait_tor_ready(self, paths: &Paths, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        let mut last = String::new();
        loop {
            let st = self.status(paths).unwrap_or_default();
            let line = st
                .lines()
                .find(|l| l.starts_with("tor "))
                .unwrap_or("")
                .to_string();
            if line == "tor ready" || line.starts_with("tor ready ") {
                eprintln!("{}: {line}", self.process());
                return Ok(());
            }
            // `tor bootstrapping bootstrap 8%: handshaking...; directory is ...`: shown when
            // the part before the directory's state changes, which carries the percentage.
            let step = line.split(';').next().unwrap_or("").to_string();
            if !step.is_empty() && step != last {
                eprintln!("{}: {line}", self.process());
                last = step;
            }
            if !self.running(paths) {
                return err(format!(
                    "{} stopped while Tor was bootstrapping (see {})",
                    self.process(),
                    paths.log(self.process()).display()
                ));
            }
            if Instant::now() >= deadline {
                return err(format!(
                    "{}'s Tor client was not ready within {} s (last state: {}; see {})",
                    self.process(),
                    within.as_secs(),
                    if last.is_empty() { "none" } else { &last },
                    paths.log(self.process()).display()
                ));
            }
            sleep(Duration::from_millis(250));
        }
    }
}

pub(crate) fn parse_generation(status: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        l.trim()
            .strip_prefix("config-generation ")
            .and_then(|n| n.trim().parse().ok())
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
