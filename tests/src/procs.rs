//! Background processes of a lab: started with a pid file and a log file in the state
//! directory; stopped by pid (never by name), and on `down` every process left in the lab's
//! namespaces is stopped too, so a crashed `up` leaves nothing behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::cmd::{err, find_in_path, io_err, Cmd, Error, Result};
use crate::state::Paths;

/// Starts `cmd` in the background with `<state>/<name>.log` and `<state>/<name>.pid`.
pub fn start(paths: &Paths, name: &str, cmd: &Cmd) -> Result<Child> {
    let child = cmd.spawn_logged(&paths.log(name))?;
    let pid_path = paths.pid(name);
    fs::write(&pid_path, format!("{}\n", child.id())).map_err(io_err("cannot write", &pid_path))?;
    Ok(child)
}

/// The pid in `<state>/<name>.pid`.
pub fn read_pid(paths: &Paths, name: &str) -> Option<u32> {
    fs::read_to_string(paths.pid(name))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Whether a process runs (a zombie does not count).
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // `pid (comm) S ...`: the state follows the last ')'.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// The command name of a process, for messages.
pub fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".to_string())
}

fn signal(pids: &[u32], sig: &str) {
    if pids.is_empty() {
        return;
    }
    let args: Vec<String> = pids.iter().map(u32::to_string).collect();
    // Processes that are gone meanwhile make kill fail: that is fine.
    let _ = Cmd::new("kill")
        .arg(format!("-{sig}"))
        .args(&args)
        .output(None);
}

/// Stops processes by pid: SIGTERM, up to `grace` to exit, then SIGKILL. Err if any survives.
pub fn stop(pids: &[u32], grace: Duration) -> Result<()> {
    let live: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    if live.is_empty() {
        return Ok(());
    }
    signal(&live, "TERM");
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && live.iter().any(|&p| alive(p)) {
        sleep(Duration::from_millis(20));
    }
    let left: Vec<u32> = live.iter().copied().filter(|&p| alive(p)).collect();
    if left.is_empty() {
        return Ok(());
    }
    signal(&left, "KILL");
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && left.iter().any(|&p| alive(p)) {
        sleep(Duration::from_millis(20));
    }
    let stuck: Vec<String> = left
        .iter()
        .filter(|&&p| alive(p))
        .map(|p| format!("{p} ({})", comm(*p)))
        .collect();
    if stuck.is_empty() {
        Ok(())
    } else {
        err(format!("processes do not exit: {}", stuck.join(", ")))
    }
}

/// Stops the process of `<state>/<name>.pid`, if it runs.
pub fn stop_named(paths: &Paths, name: &str) -> Result<()> {
    match read_pid(paths, name) {
        Some(pid) => stop(&[pid], Duration::from_secs(3)),
        None => Ok(()),
    }
}

/// The processes of a lab's pid files that still run in some network namespace other than
/// ours with the expected command name: what `down` stops besides the processes it finds in the
/// lab's namespaces (in case a namespace was deleted under a running process).
pub fn recorded_pids(paths: &Paths, expected: &[(&str, &str)]) -> Vec<u32> {
    let own_ns = fs::read_link("/proc/self/ns/net").ok();
    expected
        .iter()
        .filter_map(|(name, comm_name)| {
            let pid = read_pid(paths, name)?;
            let ns = fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
            (alive(pid) && Some(&ns) != own_ns.as_ref() && comm(pid) == *comm_name).then_some(pid)
        })
        .collect()
}

/// The processes inside a network namespace (`ip netns pids`).
pub fn ns_pids(ns: &str) -> Result<Vec<u32>> {
    let out = Cmd::new("ip").args(["netns", "pids", ns]).run()?;
    Ok(out
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// The last `n` lines of a log file, for error messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

/// Waits until `ready()` holds, failing early when `child` exits; the error carries the
/// child's log.
pub fn wait_ready(
    what: &str,
    child: &mut Child,
    log: &Path,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return err(format!(
                "{what} exited ({status}) before it was ready; its log {}:\n{}",
                log.display(),
                crate::cmd::indent(&log_tail(log, 20))
            ));
        }
        if Instant::now() >= deadline {
            return err(format!(
                "{what} not ready after {} s; its log {}:\n{}",
                timeout.as_secs(),
                log.display(),
                crate::cmd::indent(&log_tail(log, 20))
            ));
        }
        sleep(Duration::from_millis(25));
    }
}

/// A program of this workspace: `$ENV_VAR` if set, else next to the qubes-lab executable
/// (target/release or target/debug), else in PATH.
pub fn workspace_binary(name: &str, env_var: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()
        .map_err(|e| Error(format!("cannot find the qubes-lab executable: {e}")))?;
    if let Some(dir) = exe.parent() {
        let beside = dir.join(name);
        if beside.is_file() {
            return Ok(beside);
        }
        // Integration tests run from target/<profile>/deps.
        if let Some(up) = dir.parent() {
            let p = up.join(name);
            if dir.ends_with("deps") && p.is_file() {
                return Ok(p);
            }
        }
    }
    find_in_path(name).ok_or_else(|| {
        Error(format!(
            "cannot find {name}: not next to {} and not in PATH (build it: cargo build \
             --release -p {}; or set {env_var})",
            exe.display(),
            if name == "qvm-firewall" {
                "qubes-rules"
            } else {
                name
            }
        ))
    })
}
