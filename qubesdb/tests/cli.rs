//! `qubesdb-daemon` and `qubesdb` as the lab and users run them.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

/// A daemon child process, killed when dropped.
struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn daemon(dir: &Path, load: Option<&str>) -> Daemon {
    let socket = dir.join("qubesdb.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qubesdb-daemon"));
    cmd.arg("--socket").arg(&socket);
    if let Some(text) = load {
        let file = dir.join("db.txt");
        std::fs::write(&file, text).expect("write load file");
        cmd.arg("--load").arg(&file);
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn daemon");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let first = lines.next().expect("a line").expect("read");
    assert!(
        first.starts_with("qubesdb-daemon: listening on "),
        "{first}"
    );
    // Keep draining its log so it never blocks on a full pipe.
    thread::spawn(move || for _ in lines {});
    let deadline = Instant::now() + WAIT;
    while UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "daemon not accepting");
        thread::sleep(Duration::from_millis(10));
    }
    Daemon { child, socket }
}

/// Runs `qubesdb --socket S args...`: (stdout, stderr, exit code).
fn qubesdb(d: &Daemon, args: &[&str]) -> (String, String, i32) {
    let out = Command::new(env!("CARGO_BIN_EXE_qubesdb"))
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .output()
        .expect("run qubesdb");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

const LOAD: &str = "\
# a firewall qube, as dom0 fills it
/name sys-firewall
/qubes-firewall/10.137.0.10 
/qubes-firewall/10.137.0.10/policy drop
/qubes-firewall/10.137.0.10/0000 action=accept proto=tcp dstports=443-443
";

#[test]
fn read_write_rm_list_multiread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = daemon(dir.path(), Some(LOAD));
    assert_eq!(
        qubesdb(&d, &["read", "/name"]),
        ("sys-firewall\n".into(), String::new(), 0)
    );
    assert_eq!(
        qubesdb(&d, &["read", "-f", "/name", "/qubes-firewall/10.137.0.10"]),
        (
            "/name = sys-firewall\n/qubes-firewall/10.137.0.10 = \n".into(),
            String::new(),
            0
        )
    );
    let (out, err, code) = qubesdb(&d, &["read", "/name", "/missing"]);
    assert_eq!((out.as_str(), code), ("sys-firewall\n", 1));
    assert_eq!(err, "qubesdb: read /missing: no such entry\n");
    assert_eq!(qubesdb(&d, &["-q", "read", "/missing"]).1, "");

    assert_eq!(
        qubesdb(&d, &["write", "/a", "1", "/b", "two words"]),
        (String::new(), String::new(), 0)
    );
    assert_eq!(qubesdb(&d, &["read", "/b"]).0, "two words\n");
    let (_, err, code) = qubesdb(&d, &["write", "/a", "1", "/b"]);
    assert_eq!(code, 1);
    assert!(err.contains("PATH VALUE pairs; got 3 arguments"), "{err}");
    let (_, err, code) = qubesdb(&d, &["write", "/dir/", "x"]);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "qubesdb: write /dir/: path ends with '/', which only RM, WATCH, MULTIREAD and LIST \
         take\n"
    );

    assert_eq!(
        qubesdb(&d, &["multiread", "/qubes-firewall/10.137.0.10/"]).0,
        "0000 = action=accept proto=tcp dstports=443-443\npolicy = drop\n"
    );
    assert_eq!(
        qubesdb(&d, &["list", "/qubes-firewall/"]).0,
        "10.137.0.10\n10.137.0.10/0000\n10.137.0.10/policy\n"
    );
    assert_eq!(
        qubesdb(&d, &["list", "-f", "/qubes-firewall/10.137.0.10/"]).0,
        "/qubes-firewall/10.137.0.10/0000\n/qubes-firewall/10.137.0.10/policy\n"
    );

    assert_eq!(qubesdb(&d, &["rm", "/qubes-firewall/10.137.0.10/"]).2, 0);
    assert_eq!(
        qubesdb(&d, &["list", "-f", "/qubes-firewall/"]).0,
        "/qubes-firewall/10.137.0.10\n"
    );
    let (_, err, code) = qubesdb(&d, &["rm", "/qubes-firewall/10.137.0.10/"]);
    assert_eq!(
        (err.as_str(), code),
        (
            "qubesdb: rm /qubes-firewall/10.137.0.10/: no such entry\n",
            1
        )
    );
}

#[test]
fn values_are_escaped_unless_raw() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = daemon(dir.path(), None);
    assert_eq!(qubesdb(&d, &["write", "/v", "a\tb\u{e9}"]).2, 0);
    assert_eq!(qubesdb(&d, &["read", "/v"]).0, "a\\x09b\\xc3\\xa9\n");
    assert_eq!(qubesdb(&d, &["read", "-r", "/v"]).0, "a\tb\u{e9}\n");
    assert_eq!(
        qubesdb(&d, &["multiread", "-f", "/"]).0,
        "/v = a\\x09b\\xc3\\xa9\n"
    );
}

#[test]
fn watch_prints_modified_paths() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = daemon(dir.path(), Some(LOAD));
    let mut watcher = Command::new(env!("CARGO_BIN_EXE_qubesdb"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["watch", "-n", "-1", "/qubes-firewall/", "/ready"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn watcher");
    let stdout = watcher.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.expect("line")).is_err() {
                break;
            }
        }
    });
    // The watches are in place once a write of /ready shows up.
    let deadline = Instant::now() + WAIT;
    loop {
        assert_eq!(qubesdb(&d, &["write", "/ready", "1"]).2, 0);
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(50)) {
            assert_eq!(line, "/ready");
            break;
        }
        assert!(Instant::now() < deadline, "watch never fired");
    }
    assert_eq!(qubesdb(&d, &["rm", "/qubes-firewall/10.137.0.10/"]).2, 0);
    assert_eq!(qubesdb(&d, &["write", "/name", "not watched"]).2, 0);
    assert_eq!(
        qubesdb(&d, &["write", "/qubes-firewall/10.137.0.10", ""]).2,
        0
    );
    let mut got = Vec::new();
    while got.len() < 2 {
        let line = rx.recv_timeout(WAIT).expect("watch output");
        if line != "/ready" {
            got.push(line);
        }
    }
    assert_eq!(
        got,
        [
            "/qubes-firewall/10.137.0.10/",
            "/qubes-firewall/10.137.0.10"
        ]
    );
    let _ = watcher.kill();
    let _ = watcher.wait();
    // -n 0: set the watches and exit.
    assert_eq!(
        qubesdb(&d, &["watch", "-n", "0", "/x"]),
        (String::new(), String::new(), 0)
    );
}

#[test]
fn read_wait_blocks_until_the_entry_exists() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = daemon(dir.path(), None);
    let reader = Command::new(env!("CARGO_BIN_EXE_qubesdb"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["read", "-w", "/late"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn reader");
    thread::sleep(Duration::from_millis(200));
    assert_eq!(qubesdb(&d, &["write", "/late", "here"]).2, 0);
    let out = reader.wait_with_output().expect("reader exits");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "here\n");
}

#[test]
fn daemon_load_errors_name_the_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.txt");
    std::fs::write(&file, "/ok 1\n/bad*key 2\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_qubesdb-daemon"))
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .arg("--load")
        .arg(&file)
        .output()
        .expect("run daemon");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "qubesdb-daemon: {}:2: key \"/bad*key\": path contains '*' at byte 4\n",
            file.display()
        )
    );
    assert!(
        !dir.path().join("s.sock").exists(),
        "nothing bound on a bad load"
    );
}

#[test]
fn no_daemon_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("none.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_qubesdb"))
        .arg("--socket")
        .arg(&socket)
        .args(["read", "/name"])
        .output()
        .expect("run qubesdb");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "qubesdb: cannot connect to QubesDB at {}: ",
            socket.display()
        )),
        "{err}"
    );
}

#[test]
fn help_explains() {
    for (bin, needle) in [
        (env!("CARGO_BIN_EXE_qubesdb"), "multiread"),
        (env!("CARGO_BIN_EXE_qubesdb-daemon"), "--load"),
    ] {
        let out = Command::new(bin).arg("--help").output().expect("help");
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(needle), "{text}");
        assert!(text.contains("/var/run/qubes/qubesdb.sock"), "{text}");
    }
}
