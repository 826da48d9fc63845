//! Helpers shared by the workspace's tests: a test that cannot run here never passes silently;
//! and [`tornet`], a private Tor network, which the lab (`qubes-lab`) runs in its world too.
//!
//! Tests that need root (network namespaces, nft, AF_PACKET) start with
//!
//! ```no_run
//! # fn t() {
//! if !testkit::require_root("my_test") {
//!     return;
//! }
//! # }
//! ```
//!
//! When the machine cannot run the test:
//! - under CI (`CI` set to anything but empty, `0` or `false`) the test fails, saying why;
//! - otherwise it prints `NOT RUN: <test>: <why>` on stderr (past libtest's capture, so it shows
//!   for passing tests too), appends `<test binary> <test>: <why>` to the not-run file, and the
//!   test returns early (it passes, but it is counted).
//!
//! The not-run file is `$TESTKIT_NOT_RUN_FILE` if set, else `not-run.txt` in the cargo target
//! directory (`$CARGO_TARGET_DIR` or `target/`). It is only appended to; `scripts/test.sh` clears
//! it at its start and prints the count and the lines at its end.

pub mod tornet;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Whether this process can run a test that needs root: effective uid 0, the capabilities to
/// make network namespaces (`CAP_SYS_ADMIN`, `CAP_NET_ADMIN`), network namespace support and
/// iproute2's `ip` in `PATH`. If not, reports the test as not run (see [`not_run`]) and returns
/// false; the test should then return at once.
#[track_caller]
pub fn require_root(test: &str) -> bool {
    match missing_root() {
        None => true,
        Some(why) => {
            not_run(test, &why);
            false
        }
    }
}

/// Runs iproute2's `ip` with `args` (a test's namespace and link setup); a failure fails the
/// test, naming the command and what `ip` said.
#[track_caller]
pub fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Reports that `test` cannot run here because of `why`: under CI this panics (the test
/// fails); otherwise it prints `NOT RUN: <test>: <why>` on stderr and records it in the
/// not-run file. For needs beyond [`require_root`]'s, e.g. a missing tool.
#[track_caller]
pub fn not_run(test: &str, why: &str) {
    if in_ci() {
        panic!("{test} cannot run under CI: {why}");
    }
    // Straight to the process's stderr: libtest captures `eprintln!` of passing tests.
    let _ = writeln!(std::io::stderr(), "NOT RUN: {test}: {why}");
    let line = format!("{} {test}: {why}\n", test_binary());
    let Some(file) = not_run_file() else { return };
    // One write of one line in append mode: concurrent tests do not interleave lines.
    let res = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = res {
        let _ = writeln!(
            std::io::stderr(),
            "testkit: cannot record in {}: {e}",
            file.display()
        );
    }
}

/// `CI` set to anything but empty, `0` or `false` (any case).
fn in_ci() -> bool {
    is_ci_value(std::env::var("CI").ok().as_deref())
}

fn is_ci_value(v: Option<&str>) -> bool {
    v.is_some_and(|v| !matches!(v.to_ascii_lowercase().as_str(), "" | "0" | "false"))
}

/// Why root-only tests cannot run here, if they cannot.
fn missing_root() -> Option<String> {
    let status = match std::fs::read_to_string("/proc/self/status") {
        Ok(s) => s,
        Err(e) => return Some(format!("cannot read /proc/self/status: {e}")),
    };
    if let Some(why) = missing_root_in(&status) {
        return Some(why);
    }
    if !Path::new("/proc/self/ns/net").exists() {
        return Some("no network namespace support (/proc/self/ns/net missing)".into());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if !std::env::split_paths(&path).any(|d| d.join("ip").is_file()) {
        return Some("`ip` (iproute2) not found in PATH".into());
    }
    None
}

/// The uid and capability part of [`missing_root`], from `/proc/self/status` text.
fn missing_root_in(status: &str) -> Option<String> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or("")
    };
    // `Uid: real effective saved fs`.
    match field("Uid:").split_whitespace().nth(1) {
        Some("0") => {}
        Some(uid) => return Some(format!("needs root (running as uid {uid})")),
        None => return Some("cannot read the effective uid from /proc/self/status".into()),
    }
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    let cap_eff = field("CapEff:");
    let caps = u64::from_str_radix(cap_eff, 16).unwrap_or(0);
    for (bit, name) in [
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    ] {
        if caps & (1 << bit) == 0 {
            return Some(format!(
                "root without {name} (CapEff {cap_eff}): cannot make network namespaces"
            ));
        }
    }
    None
}

/// The running test binary's name, e.g. `nft_kernel`.
fn test_binary() -> String {
    let exe = std::env::current_exe().unwrap_or_default();
    binary_name(&exe)
}

/// A test binary's file name without cargo's `-<16 hex digits>` suffix.
fn binary_name(exe: &Path) -> String {
    let stem = exe
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    match stem.rsplit_once('-') {
        Some((name, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            name.to_string()
        }
        _ => stem,
    }
}

/// `$TESTKIT_NOT_RUN_FILE`, else `not-run.txt` in the target directory.
fn not_run_file() -> Option<PathBuf> {
    if let Some(f) = std::env::var_os("TESTKIT_NOT_RUN_FILE").filter(|f| !f.is_empty()) {
        return Some(PathBuf::from(f));
    }
    default_file(&std::env::current_exe().ok()?)
}

/// Test binaries live in `<target>/<profile>/deps/`; anything else: next to the binary.
fn default_file(exe: &Path) -> Option<PathBuf> {
    let dir = exe.parent()?;
    let target = if dir.file_name()? == "deps" {
        dir.parent()?.parent()?
    } else {
        dir
    };
    Some(target.join("not-run.txt"))
}

/// The environment variable that tells a test it runs as [`run_in_own_netns`]'s child; its
/// value is the namespace's name.
pub const NETNS_CHILD_ENV: &str = "TESTKIT_NETNS_CHILD";

/// In the child [`run_in_own_netns`] starts: the namespace it runs in.
pub fn netns_child() -> Option<String> {
    std::env::var(NETNS_CHILD_ENV).ok()
}

/// Runs test `test` of the current test binary again, alone, inside a network namespace of
/// its own (`<prefix><pid>`, made after `ip` commands `setup` as `ip` arguments, each with
/// `{ns}` standing for the name), and removes the namespace after. Panics with the child's
/// output if it failed, or if it did not run the test (a filter matching nothing would pass).
/// The child finds itself with [`netns_child`].
#[track_caller]
pub fn run_in_own_netns(test: &str, prefix: &str, setup: &[&[&str]]) {
    use std::process::Command;
    let ns = format!("{prefix}{}", std::process::id());
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    let ip = |args: Vec<String>| {
        let out = Command::new("ip").args(&args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ip(vec!["netns".into(), "add".into(), ns.clone()]);
    for args in setup {
        ip(args.iter().map(|a| a.replace("{ns}", &ns)).collect());
    }
    let result = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(std::env::current_exe().expect("current_exe"))
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(NETNS_CHILD_ENV, &ns)
        .output()
        .expect("run the test inside the namespace");
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        result.status.success(),
        "the test failed inside namespace {ns}:\n{stdout}\n{}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(
        stdout.contains("1 passed"),
        "the child did not run the test:\n{stdout}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ci_values() {
        for (v, ci) in [
            (None, false),
            (Some(""), false),
            (Some("0"), false),
            (Some("False"), false),
            (Some("true"), true),
            (Some("1"), true),
        ] {
            assert_eq!(is_ci_value(v), ci, "{v:?}");
        }
    }

    #[test]
    fn root_needs_uid_0_and_the_capabilities() {
        let status = |uid: &str, caps: &str| format!("Name:\tx\nUid:\t{uid}\nCapEff:\t{caps}\n");
        assert_eq!(
            missing_root_in(&status("0\t0\t0\t0", "000001ffffffffff")),
            None
        );
        assert_eq!(
            missing_root_in(&status("0\t1000\t0\t0", "0000000000000000")),
            Some("needs root (running as uid 1000)".into())
        );
        assert_eq!(
            missing_root_in(&status("0\t0\t0\t0", "0000000000001000")),
            Some(
                "root without CAP_SYS_ADMIN (CapEff 0000000000001000): cannot make network \
                 namespaces"
                    .into()
            )
        );
        assert!(missing_root_in("").is_some());
    }

    #[test]
    fn binary_names_and_default_file() {
        let exe = Path::new("/t/debug/deps/nft_kernel-0123456789abcdef");
        assert_eq!(binary_name(exe), "nft_kernel");
        assert_eq!(binary_name(Path::new("/x/lab-e2e")), "lab-e2e");
        assert_eq!(default_file(exe), Some(PathBuf::from("/t/not-run.txt")));
        assert_eq!(
            default_file(Path::new("/x/y/tool")),
            Some(PathBuf::from("/x/y/not-run.txt"))
        );
    }
}
