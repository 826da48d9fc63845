//! End-to-end tests of the lab: each test brings up its own lab (a unique name, so tests run in
//! parallel), checks traffic inside it, and tears it down, also when it fails (a Drop guard).
//!
//! The sys-firewall under test is `$QUBES_LAB_FIREWALL` (`rust` or `linux`; default `rust`),
//! so the same tests judge the Linux kernel and our service; with `$QUBES_LAB_VM` set
//! (`sys-firewall`, passed on to `qubes-lab up`) our service runs as its image under QEMU. They
//! need root (network
//! namespaces): without it they fail under CI and otherwise report `NOT RUN: <test>: <why>`
//! (`testkit`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const LAB: &str = env!("CARGO_BIN_EXE_qubes-lab");
const WEB: &str = "198.18.0.10";

/// Whether the test can run; if not, `testkit` fails it under CI and reports it as not run
/// otherwise. libtest runs each test on a thread named after it, which names the test here.
fn can_run() -> bool {
    testkit::require_root(std::thread::current().name().unwrap_or("lab_e2e"))
}

/// The sys-firewall kind under test.
fn kind() -> String {
    std::env::var("QUBES_LAB_FIREWALL").unwrap_or_else(|_| "rust".to_string())
}

/// The sys-net kind under test (`$QUBES_LAB_NETVM`, passed on to `qubes-lab up` through its
/// environment): the same as the firewall's unless set, so the default run is the chain of
/// our two services and the baseline run the Linux chain.
fn netvm_kind() -> String {
    std::env::var("QUBES_LAB_NETVM").unwrap_or_else(|_| kind())
}

/// The workspace binaries the lab runs must sit next to qubes-lab: qvm-firewall always,
/// sys-firewall for `rust`. `cargo test --workspace` builds them; `cargo test -p qubes-lab` may
/// not, so build what is needed (once per test run; for sys-firewall always, so that it is not
/// stale).
fn ensure_binaries() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let dir = Path::new(LAB).parent().expect("target dir");
        let mut wanted: Vec<(&str, &str)> = Vec::new();
        if !dir.join("qvm-firewall").is_file() {
            wanted.push(("qubes-rules", "qvm-firewall"));
        }
        if kind() == "rust" {
            wanted.push(("sys-firewall", "sys-firewall"));
        }
        if netvm_kind() == "rust" {
            wanted.push(("sys-net", "sys-net"));
        }
        if !dir.join("sys-whonix").is_file() {
            wanted.push(("sys-whonix", "sys-whonix"));
        }
        if wanted.is_empty() {
            return;
        }
        let mut c = Command::new(env!("CARGO"));
        c.arg("build");
        for (package, bin) in &wanted {
            c.args(["-p", package, "--bin", bin]);
        }
        if dir.ends_with("release") {
            c.arg("--release");
        }
        if let Some(target) = dir.parent() {
            c.arg("--target-dir").arg(target);
        }
        c.current_dir(env!("CARGO_MANIFEST_DIR"));
        let st = c.status().expect("run cargo build");
        assert!(st.success(), "building {wanted:?} failed");
    });
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn output_text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A probe's line `STATUS MS DETAIL`.
#[derive(Debug)]
struct Outcome {
    status: String,
    ms: f64,
    detail: String,
}

impl Outcome {
    fn parse(line: &str) -> Outcome {
        let mut it = line.trim().splitn(3, ' ');
        let status = it.next().unwrap_or("").to_string();
        let ms = it.next().and_then(|m| m.parse().ok()).unwrap_or(f64::NAN);
        let detail = it.next().unwrap_or("").to_string();
        Outcome { status, ms, detail }
    }
}

/// A running lab, removed when dropped.
struct Lab {
    name: String,
    torn_down: bool,
}

impl Lab {
    /// A new lab with a unique name; None when the test is skipped.
    fn up() -> Option<Lab> {
        Self::up_with(&["--no-matrix"]).map(|(lab, _)| lab)
    }

    /// A lab without sys-whonix and its private Tor network (`--no-whonix`): the tests of the
    /// netvm chain do not wait for Tor. [`whonix_lab`] is the one that does.
    fn up_with(extra: &[&str]) -> Option<(Lab, String)> {
        let mut args = vec!["--no-whonix"];
        args.extend_from_slice(extra);
        Self::up_full(&args)
    }

    /// `up` with exactly these extra arguments; its stdout and stderr (progress) together.
    fn up_full(extra: &[&str]) -> Option<(Lab, String)> {
        if !can_run() {
            return None;
        }
        ensure_binaries();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("t{}x{n}", std::process::id());
        let lab = Lab {
            name,
            torn_down: false,
        };
        let out = lab.cmd_output(
            &["up", "--firewall", &kind(), "--netvm", &netvm_kind()],
            extra,
        );
        assert!(out.status.success(), "up failed: {}", output_text(&out));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Some((lab, text))
    }

    /// `qubes-lab SUB --name N REST...`.
    fn cmd_output(&self, sub: &[&str], rest: &[&str]) -> Output {
        Command::new(LAB)
            .args(sub)
            .args(["--name", &self.name])
            .args(rest)
            .stdin(Stdio::null())
            .output()
            .expect("run qubes-lab")
    }

    /// `qubes-lab SUB --name N REST...`, which must succeed; its stdout.
    fn cmd(&self, sub: &[&str], rest: &[&str]) -> String {
        let out = self.cmd_output(sub, rest);
        assert!(
            out.status.success(),
            "qubes-lab {sub:?} {rest:?} failed: {}",
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn ns(&self, qube: &str) -> String {
        format!("{}-{qube}", self.name)
    }

    /// A probe run inside a qube.
    fn probe(&self, qube: &str, args: &[&str]) -> Outcome {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(qube), LAB, "probe"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run probe");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let o = Outcome::parse(stdout.lines().next().unwrap_or(""));
        eprintln!("[{}] {qube}: probe {args:?} -> {o:?}", self.name);
        o
    }

    fn tcp(&self, qube: &str, dst: &str, timeout_ms: u64, http: bool) -> Outcome {
        let t = timeout_ms.to_string();
        let mut args = vec!["tcp", dst, "--timeout-ms", &t];
        if http {
            args.push("--http");
        }
        self.probe(qube, &args)
    }

    fn dns(&self, qube: &str, server: &str) -> Outcome {
        self.probe(
            qube,
            &[
                "dns",
                "web.test",
                "--server",
                server,
                "--timeout-ms",
                "2000",
            ],
        )
    }

    /// `qubes-lab firewall QUBE ARGS...`, which must succeed.
    fn firewall(&self, qube: &str, args: &[&str]) -> String {
        let mut rest = vec![qube];
        rest.extend_from_slice(args);
        self.cmd(&["firewall"], &rest)
    }

    /// A background process inside a namespace, its stdout lines on a channel.
    fn spawn_in(&self, ns: &str, args: &[&str]) -> Background {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, LAB])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn in namespace");
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Background { child, stdin, rx }
    }

    /// `down`, then checks that nothing of the lab is left.
    fn down(mut self) {
        self.torn_down = true;
        self.cmd(&["down"], &[]);
        assert_nothing_left(&self.name);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.torn_down {
            let _ = Command::new(LAB)
                .args(["down", "--name", &self.name])
                .stdin(Stdio::null())
                .output();
        }
    }
}

struct Background {
    child: Child,
    stdin: Option<ChildStdin>,
    rx: mpsc::Receiver<String>,
}

impl Background {
    fn line(&self, within: Duration) -> Option<String> {
        self.rx.recv_timeout(within).ok()
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}").expect("write to probe");
        stdin.flush().expect("flush");
    }

    /// Every line until the process exits (at most `within`).
    fn rest(mut self, within: Duration) -> Vec<String> {
        drop(self.stdin.take());
        let deadline = Instant::now() + within;
        let mut lines = Vec::new();
        while let Some(l) = self.line(deadline.saturating_duration_since(Instant::now())) {
            lines.push(l);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        lines
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn namespaces() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn assert_nothing_left(name: &str) {
    let prefix = format!("{name}-");
    let left: Vec<String> = namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    let state = PathBuf::from("/run/qubes-lab").join(name);
    assert!(!state.exists(), "{} left", state.display());
    if let Ok(entries) = std::fs::read_dir("/etc/netns") {
        let etc: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&prefix))
            .collect();
        assert!(etc.is_empty(), "/etc/netns entries left: {etc:?}");
    }
}

#[test]
fn work_reaches_the_world_over_http_and_resolves_names() {
    let Some(lab) = Lab::up() else { return };
    for server in ["10.139.1.1", "10.139.1.2"] {
        let d = lab.dns("work", server);
        assert_eq!(
            (d.status.as_str(), d.detail.as_str()),
            ("ok", WEB),
            "dns via {server}"
        );
    }
    let h = lab.tcp("work", "198.18.0.10:80", 3000, true);
    assert_eq!(h.status, "ok", "{h:?}");
    assert!(h.detail.contains("200"), "{h:?}");
    // A real client: curl, resolving web.test through the qube's resolv.conf (10.139.1.1).
    let out = lab.cmd_output(
        &["exec"],
        &["work", "--", "curl", "-sS", "-m", "5", "http://web.test/"],
    );
    assert!(out.status.success(), "curl: {}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("198.18.0.10:80"),
        "{}",
        output_text(&out)
    );
    let ping = lab.cmd_output(&["exec"], &["work", "--", "ping", "-c1", "-W2", "-n", WEB]);
    assert!(ping.status.success(), "ping: {}", output_text(&ping));
    lab.down();
}

#[test]
fn untrusted_is_refused_at_once_with_admin_prohibited() {
    let Some(lab) = Lab::up() else { return };
    // "At once" is a mechanism, not a timing: the connect is ended by the ICMP
    // admin-prohibited error (the probe reads it), not by its 5 s timeout. The time is printed
    // for the record; timings never decide a test on a shared machine.
    let r = lab.tcp("untrusted", "198.18.0.10:80", 5000, false);
    assert_eq!(r.status, "rejected", "{r:?}");
    assert!(r.detail.contains("admin-prohibited"), "{r:?}");
    eprintln!("refused in {} ms", r.ms);
    // What its rules allow: DNS and TCP 443.
    let d = lab.dns("untrusted", "10.139.1.1");
    assert_eq!(d.status, "ok", "{d:?}");
    let s = lab.tcp("untrusted", "198.18.0.10:443", 3000, true);
    assert_eq!(s.status, "ok", "{s:?}");
    let ping = lab.cmd_output(
        &["exec"],
        &["untrusted", "--", "ping", "-c1", "-W2", "-n", WEB],
    );
    assert!(
        !ping.status.success(),
        "ping got through: {}",
        output_text(&ping)
    );
    lab.down();
}

#[test]
fn spoofed_sources_go_nowhere() {
    let Some(lab) = Lab::up() else { return };
    let listener = lab.spawn_in(
        &lab.ns("world"),
        &[
            "probe",
            "udp-listen",
            "198.18.0.10:9999",
            "--duration-ms",
            "6000",
        ],
    );
    assert_eq!(
        listener.line(Duration::from_secs(5)).as_deref(),
        Some("listening 198.18.0.10:9999")
    );
    let spoof = |src: &str, payload: &str| {
        let out = lab.cmd_output(
            &["exec"],
            &[
                "untrusted",
                "--",
                LAB,
                "probe",
                "spoof",
                "--src",
                src,
                "--dst",
                "198.18.0.10:9999",
                "--payload",
                payload,
            ],
        );
        assert!(out.status.success(), "spoof: {}", output_text(&out));
    };
    // Another client's address, an outside address, the firewall's own address.
    spoof("10.137.0.11", "forged-client");
    spoof("198.18.0.99", "forged-outside");
    spoof("10.137.0.6", "forged-gateway");
    // With rules that accept everything, only the anti-spoofing stands in the way; the genuine
    // source (sent the same way) gets through, so the listener does hear what arrives.
    lab.firewall("untrusted", &["reset"]);
    spoof("10.137.0.11", "forged-after-reset");
    spoof("10.137.0.12", "genuine");
    let lines = listener.rest(Duration::from_secs(8));
    assert!(
        lines.iter().any(|l| l.ends_with(" genuine")),
        "the genuine datagram did not arrive: {lines:?}"
    );
    let forged: Vec<&String> = lines.iter().filter(|l| l.contains("forged")).collect();
    assert!(forged.is_empty(), "forged datagrams arrived: {forged:?}");
    lab.down();
}

#[test]
fn vault_has_no_network() {
    let Some(lab) = Lab::up() else { return };
    let links = lab.cmd(&["exec"], &["vault", "--", "ip", "-o", "link"]);
    let names: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(str::trim)
        .collect();
    assert_eq!(names, ["lo"], "{links}");
    let t = lab.tcp("vault", "198.18.0.10:80", 2000, false);
    assert_eq!(
        (t.status.as_str(), t.detail.as_str()),
        ("unreachable", "no route")
    );
    let d = lab.dns("vault", "10.139.1.1");
    assert_eq!(d.status, "unreachable", "{d:?}");
    lab.down();
}

#[test]
fn work_cannot_reach_personal() {
    let Some(lab) = Lab::up() else { return };
    let ready = PathBuf::from("/run/qubes-lab")
        .join(&lab.name)
        .join("personal-http.ready");
    let ready_s = ready.to_string_lossy().into_owned();
    let _server = lab.spawn_in(
        &lab.ns("personal"),
        &["serve-http", "10.137.0.11:80", "--ready-file", &ready_s],
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ready.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ready.exists(), "server in personal did not start");
    // The server answers inside personal...
    let own = lab.tcp("personal", "10.137.0.11:80", 2000, true);
    assert_eq!(own.status, "ok", "{own:?}");
    // ...but nothing gets there from the other qubes.
    for from in ["work", "untrusted"] {
        let o = lab.tcp(from, "10.137.0.11:80", 1500, false);
        assert!(
            o.status != "ok" && o.status != "refused",
            "{from} reached personal: {o:?}"
        );
    }
    let back = lab.tcp("personal", "10.137.0.10:80", 1500, false);
    assert!(back.status != "ok" && back.status != "refused", "{back:?}");
    lab.down();
}

#[test]
fn a_rule_change_cuts_an_open_connection() {
    let Some(lab) = Lab::up() else { return };
    let mut echo = lab.spawn_in(
        &lab.ns("work"),
        &["probe", "echo", "198.18.0.10:8080", "--timeout-ms", "1500"],
    );
    let first = echo.line(Duration::from_secs(5));
    assert_eq!(first.as_deref(), Some("connected"));
    echo.send("one");
    assert_eq!(
        echo.line(Duration::from_secs(5)).as_deref(),
        Some("echo ok one")
    );
    // Refuse the echo service, keep the rest.
    lab.firewall(
        "work",
        &[
            "add",
            "--before",
            "0",
            "drop",
            "dsthost=198.18.0.10",
            "proto=tcp",
            "dstports=8080",
        ],
    );
    echo.send("two");
    let after = echo.line(Duration::from_secs(5)).unwrap_or_default();
    assert!(
        after == "no answer" || after.starts_with("error"),
        "the open connection still works after the rule change: {after:?}"
    );
    let again = lab.tcp("work", "198.18.0.10:8080", 3000, false);
    assert_eq!(again.status, "rejected", "{again:?}");
    let web = lab.tcp("work", "198.18.0.10:80", 3000, true);
    assert_eq!(web.status, "ok", "{web:?}");
    // And back.
    lab.firewall("work", &["del", "--rule-no", "0"]);
    let back = lab.tcp("work", "198.18.0.10:8080", 3000, false);
    assert_eq!(back.status, "ok", "{back:?}");
    drop(echo);
    lab.down();
}

#[test]
fn an_open_connection_resumes_after_a_cut_is_undone_and_across_a_firewall_restart() {
    // Linux's `masquerade` keeps the client's port when it is free and conntrack picks a
    // connection up from its next ACK, so after a cut is undone, or the firewall restarts,
    // the client's retransmission reaches the server on the same mapping and the connection
    // goes on. A firewall that picks a new port makes the server answer with a reset.
    let Some(lab) = Lab::up() else { return };
    let mut echo = lab.spawn_in(
        &lab.ns("work"),
        &["probe", "echo", "198.18.0.10:8080", "--timeout-ms", "5000"],
    );
    assert_eq!(
        echo.line(Duration::from_secs(8)).as_deref(),
        Some("connected")
    );
    echo.send("one");
    assert_eq!(
        echo.line(Duration::from_secs(8)).as_deref(),
        Some("echo ok one")
    );
    lab.firewall(
        "work",
        &[
            "add",
            "--before",
            "0",
            "drop",
            "dsthost=198.18.0.10",
            "proto=tcp",
            "dstports=8080",
        ],
    );
    echo.send("two");
    let cut = echo.line(Duration::from_secs(8)).unwrap_or_default();
    assert!(
        cut == "no answer" || cut.starts_with("error"),
        "the rule did not cut the connection: {cut:?}"
    );
    lab.firewall("work", &["del", "--rule-no", "0"]);
    // "two" is still in the client's retransmission queue, so its echo comes back with the
    // echo of "three": the connection lives on and lost nothing.
    echo.send("three");
    let resumed = echo.line(Duration::from_secs(8)).unwrap_or_default();
    assert_eq!(
        resumed, "echo ok two three",
        "the connection did not resume once the cut was undone"
    );
    // The probe waited for the echo of "three" itself, so the connection is quiet when
    // the firewall restarts: no echo is on its way to be retransmitted by a server whose
    // timer backs off while the firewall (a VM's reboot) is down.
    lab.cmd(&["restart-firewall"], &[]);
    echo.send("four");
    let after = echo.line(Duration::from_secs(8)).unwrap_or_default();
    assert_eq!(
        after, "echo ok four",
        "the connection did not survive the firewall's restart"
    );
    drop(echo);
    lab.down();
}

#[test]
fn a_rule_change_made_while_the_firewall_is_down_is_enforced_when_it_returns() {
    // What `firewall list` shows must be what is enforced. With `rust` the service is stopped
    // (SIGTERM, as systemd would) and the change lands in its tree meanwhile; with `linux`
    // the agent has no daemon of its own in the lab, so the change is made just before the
    // restart: both must enforce the listed rules after `restart-firewall`.
    let Some(lab) = Lab::up() else { return };
    assert_eq!(
        lab.tcp("personal", "198.18.0.10:443", 3000, true).status,
        "ok"
    );
    if kind() == "rust" {
        let pid_file = format!("/run/qubes-lab/{}/sys-firewall.pid", lab.name);
        let pid = std::fs::read_to_string(&pid_file).expect("service pid file");
        let st = Command::new("kill")
            .args(["-TERM", pid.trim()])
            .status()
            .expect("kill");
        assert!(st.success());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{}", pid.trim())).exists() {
            assert!(Instant::now() < deadline, "the service did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    lab.firewall(
        "personal",
        &["add", "--before", "0", "drop", "proto=tcp", "dstports=443"],
    );
    let listed = lab.firewall("personal", &["list"]);
    assert!(listed.contains("443"), "the change is not listed: {listed}");
    lab.cmd(&["restart-firewall"], &[]);
    let r = lab.tcp("personal", "198.18.0.10:443", 3000, false);
    assert_eq!(
        r.status, "rejected",
        "the listed `drop tcp 443` is not enforced after the restart: {r:?}"
    );
    let h = lab.tcp("personal", "198.18.0.10:80", 3000, true);
    assert_eq!(h.status, "ok", "{h:?}");
    lab.down();
}

#[test]
fn refused_packets_get_a_handful_of_errors_not_one_each() {
    // A router limits the errors it sends (Linux: a burst of 6 per destination, then one per
    // second, net/ipv4/icmp.c `icmpv4_xrlim_allow`): 200 refused datagrams from untrusted get a
    // handful of admin-prohibited errors, not 200.
    let Some(lab) = Lab::up() else { return };
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.ns("untrusted"), LAB, "probe"])
        .args(["refused-burst", "198.18.0.10:9", "--count", "200"])
        .args(["--wait-ms", "500"])
        .stdin(Stdio::null())
        .output()
        .expect("run probe");
    let out = output_text(&out);
    let line = out.lines().find(|l| l.starts_with("sent ")).unwrap_or("");
    let nums: Vec<u32> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    eprintln!("[{}] {}: refused burst: {line}", lab.name, kind());
    let [sent, errors] = nums[..] else {
        panic!("no result from the probe: {out}")
    };
    assert_eq!(sent, 200, "{out}");
    assert!(
        (1..=12).contains(&errors),
        "200 refused datagrams got {errors} ICMP errors (a rate-limited router sends a handful)"
    );
    lab.down();
}

#[test]
fn rules_that_do_not_parse_block_only_that_client() {
    let Some(lab) = Lab::up() else { return };
    assert_eq!(lab.dns("untrusted", "10.139.1.1").status, "ok");
    // A rule without an action: the agent's "Rule 'proto=tcp' lack action".
    lab.cmd(&["qubesdb-write"], &["untrusted", "0000", "proto=tcp"]);
    let d = lab.dns("untrusted", "10.139.1.1");
    assert!(d.status != "ok", "untrusted still resolves: {d:?}");
    let s = lab.tcp("untrusted", "198.18.0.10:443", 3000, false);
    assert_eq!(s.status, "rejected", "{s:?}");
    for q in ["work", "personal"] {
        let h = lab.tcp(q, "198.18.0.10:80", 3000, true);
        assert_eq!(h.status, "ok", "{q}: {h:?}");
        assert_eq!(lab.dns(q, "10.139.1.1").status, "ok", "{q}");
    }
    // Rules pushed again from the store fix it.
    lab.firewall(
        "untrusted",
        &["add", "--before", "0", "accept", "proto=tcp", "dstports=80"],
    );
    let h = lab.tcp("untrusted", "198.18.0.10:80", 3000, true);
    assert_eq!(h.status, "ok", "{h:?}");
    lab.down();
}

#[test]
fn restarting_the_firewall_restores_enforcement_from_the_tree() {
    // For `rust` the service is stopped and started and must rebuild everything from its
    // configuration file; for `linux` the qubes-firewall agent is restarted (its tables are
    // deleted and rebuilt from the tree), which is what upstream's service restart does.
    let Some(lab) = Lab::up() else { return };
    lab.firewall(
        "untrusted",
        &["add", "--before", "0", "accept", "proto=tcp", "dstports=80"],
    );
    lab.cmd(&["restart-firewall"], &[]);
    let h = lab.tcp("untrusted", "198.18.0.10:80", 3000, true);
    assert_eq!(h.status, "ok", "the tree's rule is lost: {h:?}");
    let r = lab.tcp("untrusted", "198.18.0.10:22", 3000, false);
    assert_eq!(r.status, "rejected", "{r:?}");
    let w = lab.tcp("work", "198.18.0.10:80", 3000, true);
    assert_eq!(w.status, "ok", "{w:?}");
    let p = lab.tcp("work", "10.137.0.11:80", 1000, false);
    assert_eq!(p.status, "timeout", "{p:?}");
    lab.down();
}

#[test]
fn up_prints_the_expected_matrix() {
    let Some((lab, out)) = Lab::up_with(&[]) else {
        return;
    };
    let matrix = out
        .split_once("Connectivity checked live")
        .map(|(_, m)| m)
        .unwrap_or_else(|| panic!("no matrix in:\n{out}"));
    let row = |q: &str| -> Vec<bool> {
        let line = matrix
            .lines()
            .find(|l| l.starts_with(&format!("{q} ")))
            .unwrap_or_else(|| panic!("no row {q} in:\n{out}"));
        line.chars()
            .filter(|c| *c == '✓' || *c == '✗')
            .map(|c| c == '✓')
            .collect()
    };
    // ping, dns, http :80, :443, other qube
    assert_eq!(row("work"), [true, true, true, true, false], "{out}");
    assert_eq!(row("personal"), [true, true, true, true, false], "{out}");
    assert_eq!(row("untrusted"), [false, true, false, true, false], "{out}");
    assert_eq!(row("vault"), [false; 5], "{out}");
    lab.down();
}

#[test]
fn up_cleans_a_stale_lab_and_down_leaves_nothing() {
    let Some(lab) = Lab::up() else { return };
    let status = lab.cmd(&["status"], &[]);
    assert!(status.contains("serve-http"), "{status}");
    // A second `up` of the same name replaces the first.
    lab.cmd(
        &[
            "up",
            "--firewall",
            &kind(),
            "--netvm",
            &netvm_kind(),
            "--no-matrix",
        ],
        &[],
    );
    // A crash that lost the state directory: `up` still finds the old namespaces. The services
    // are still running and some keep writing there (arti's cache while it bootstraps), so a
    // single pass can meet a file created behind it: retry, as an operator's `rm -rf` would.
    let state_dir = PathBuf::from("/run/qubes-lab").join(&lab.name);
    let mut removed = std::fs::remove_dir_all(&state_dir);
    for _ in 0..50 {
        match &removed {
            Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
                std::thread::sleep(std::time::Duration::from_millis(20));
                removed = std::fs::remove_dir_all(&state_dir);
            }
            _ => break,
        }
    }
    removed.expect("rm state");
    lab.cmd(
        &[
            "up",
            "--firewall",
            &kind(),
            "--netvm",
            &netvm_kind(),
            "--no-matrix",
        ],
        &[],
    );
    let mut pids: Vec<u32> = ["world", "sys-firewall"]
        .iter()
        .flat_map(|q| {
            let out = Command::new("ip")
                .args(["netns", "pids", &lab.ns(q)])
                .output()
                .expect("ip netns pids");
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    // And every process the lab recorded, wherever it runs (the VM's relay runs in ours).
    let state = PathBuf::from(format!("/run/qubes-lab/{}", lab.name));
    for e in std::fs::read_dir(&state)
        .expect("the lab's state")
        .flatten()
    {
        if e.path().extension().is_some_and(|x| x == "pid") {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            pids.extend(text.trim().parse::<u32>().ok());
        }
    }
    assert!(!pids.is_empty());
    let name = lab.name.clone();
    lab.down();
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next())
            .unwrap_or("gone");
        assert!(
            matches!(state, "gone" | "Z" | "X"),
            "pid {pid} still runs ({state})"
        );
    }
    // `down` again is a no-op.
    let again = Command::new(LAB)
        .args(["down", "--name", &name])
        .output()
        .expect("down");
    assert!(again.status.success(), "{}", output_text(&again));
    // Nothing reached the host's own network namespace.
    let links = Command::new("ip")
        .args(["-o", "link"])
        .output()
        .expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(!links.contains(": wan0"), "{links}");
}

#[test]
fn dsthost_rules_are_resolved_by_the_firewall_itself() {
    // untrusted may use DNS and port 443 only. A rule naming web.test lets port 80 through once
    // the firewall has looked the name up (our service: its own DNS query through the uplink
    // from its own address; Linux: the agent's getaddrinfo in the firewall qube).
    let Some(lab) = Lab::up() else { return };
    assert_eq!(
        lab.tcp("untrusted", "198.18.0.10:80", 3000, true).status,
        "rejected"
    );
    lab.firewall(
        "untrusted",
        &["add", "--before", "0", "accept", "web.test", "tcp", "80"],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut last = lab.tcp("untrusted", "198.18.0.10:80", 3000, true);
    while last.status != "ok" && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        last = lab.tcp("untrusted", "198.18.0.10:80", 3000, true);
    }
    assert_eq!(last.status, "ok", "web.test was not resolved: {last:?}");
    // A name that does not resolve: our service fails closed for that accept rule only (it
    // matches nothing); upstream's agent blocks the whole client.
    lab.firewall(
        "untrusted",
        &[
            "add",
            "--before",
            "0",
            "accept",
            "nowhere.test",
            "tcp",
            "8080",
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    let r = lab.tcp("untrusted", "198.18.0.10:8080", 3000, false);
    assert_eq!(r.status, "rejected", "{r:?}");
    let web = lab.tcp("untrusted", "198.18.0.10:443", 3000, true);
    if kind() == "rust" {
        assert_eq!(web.status, "ok", "{web:?}");
    } else {
        assert_ne!(web.status, "ok", "upstream blocks the client: {web:?}");
    }
    lab.down();
}

#[test]
fn stopping_the_service_leaves_clients_without_forwarding() {
    if kind() != "rust" {
        eprintln!("not applicable to the Linux sys-firewall: stopping its agent leaves the kernel forwarding established flows, as upstream");
        return;
    }
    let Some(lab) = Lab::up() else { return };
    assert_eq!(lab.tcp("work", "198.18.0.10:80", 3000, true).status, "ok");
    let pid_file = format!("/run/qubes-lab/{}/sys-firewall.pid", lab.name);
    let pid = std::fs::read_to_string(&pid_file).expect("service pid file");
    let st = Command::new("kill")
        .args(["-TERM", pid.trim()])
        .status()
        .expect("kill");
    assert!(st.success());
    std::thread::sleep(Duration::from_millis(500));
    // Fail closed: the kernel does not forward for the clients.
    let h = lab.tcp("work", "198.18.0.10:80", 1000, true);
    assert_ne!(
        h.status, "ok",
        "traffic still flows with the service stopped: {h:?}"
    );
    lab.cmd(&["restart-firewall"], &[]);
    assert_eq!(lab.tcp("work", "198.18.0.10:80", 3000, true).status, "ok");
    lab.down();
}

/// Whether sys-firewall runs as its image under QEMU (`up --vm`, from the environment).
fn firewall_vm() -> bool {
    std::env::var_os("QUBES_LAB_VM").is_some_and(|v| !v.is_empty())
}

/// sys-firewall's client vifs: the links in its namespace, or, when it is a VM (its links are
/// inside the guest), the clients its service reports.
fn firewall_vifs(lab: &Lab) -> Vec<String> {
    if !firewall_vm() {
        return links(&lab.ns("sys-firewall"));
    }
    let out = lab.cmd_output(&["status"], &[]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("client "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The interfaces of a namespace (`ip -o link show`), without their `@peer` suffix.
fn links(ns: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show"])
        .output()
        .expect("ip link show");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

/// `qubes-lab SUB --name N REST...` must fail with a message containing `want`.
fn assert_fails(out: &Output, want: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(want),
        "expected a failure saying {want:?}: {}",
        output_text(out)
    );
}

/// How many times personal is stopped and started. The default topology's domids are 1 to 6,
/// so it comes back as vif7.0, vif8.0, vif9.0; a fourth start would give vif10.0, the first
/// name that sorts before work's vif3.0 as a string.
const RESTARTS: u32 = 4;

#[test]
fn restarting_a_qube_gives_it_the_next_vif_and_leaves_other_connections_alone() {
    // Qubes start and stop all day, and a restarted qube comes back with the next domid, so as
    // a new vifN.0. With `--firewall rust` this test fails at "work's connection" for as long
    // as the engine identifies clients by their position in the vif list, not by their vif.
    if !can_run() {
        return;
    }
    let nolab = Command::new(LAB)
        .args(["stop", "--name", &format!("t{}none", std::process::id())])
        .arg("personal")
        .stdin(Stdio::null())
        .output()
        .expect("run qubes-lab");
    assert_fails(&nolab, "is the lab up?");
    let Some(lab) = Lab::up() else { return };
    let fw = lab.ns("sys-firewall");
    assert_fails(&lab.cmd_output(&["stop"], &["nosuch"]), "no qube nosuch");
    assert_fails(
        &lab.cmd_output(&["stop"], &["sys-firewall"]),
        "provides network",
    );
    assert_fails(
        &lab.cmd_output(&["start"], &["personal"]),
        "already running",
    );
    // personal's own rules, to see them in force after each start: no TCP 443.
    lab.firewall(
        "personal",
        &["add", "--before", "0", "drop", "proto=tcp", "dstports=443"],
    );
    let personal_ok = |when: &str| {
        let h = lab.tcp("personal", "198.18.0.10:80", 3000, true);
        assert_eq!(
            h.status, "ok",
            "{when}: personal cannot reach the world: {h:?}"
        );
        assert!(h.detail.contains("200"), "{when}: {h:?}");
    };
    let refused_443 = |when: &str| {
        let r = lab.tcp("personal", "198.18.0.10:443", 3000, false);
        assert_eq!(
            r.status, "rejected",
            "{when}: personal's rule refusing TCP 443 is not in force: {r:?}"
        );
    };
    personal_ok("after up");
    refused_443("after up");
    // work's connection, open through all of it.
    let mut echo = lab.spawn_in(
        &lab.ns("work"),
        &["probe", "echo", "198.18.0.10:8080", "--timeout-ms", "3000"],
    );
    assert_eq!(
        echo.line(Duration::from_secs(5)).as_deref(),
        Some("connected")
    );
    echo.send("before");
    assert_eq!(
        echo.line(Duration::from_secs(5)).as_deref(),
        Some("echo ok before")
    );
    let mut vif = "vif4.0".to_string();
    for round in 1..=RESTARTS {
        assert!(
            firewall_vifs(&lab).contains(&vif),
            "no {vif} in {fw}: {:?}",
            firewall_vifs(&lab)
        );
        lab.cmd(&["stop"], &["personal"]);
        assert!(
            !firewall_vifs(&lab).contains(&vif),
            "round {round}: {vif} is still in {fw} after stop"
        );
        assert_eq!(
            links(&lab.ns("personal")),
            ["lo"],
            "round {round}: a halted qube has only lo"
        );
        let h = lab.tcp("personal", "198.18.0.10:80", 1000, true);
        assert_ne!(
            h.status, "ok",
            "round {round}: halted personal reached the world: {h:?}"
        );
        assert_fails(&lab.cmd_output(&["stop"], &["personal"]), "already halted");
        if round == RESTARTS {
            // Changed while halted: stored, and pushed by the start (dom0's domain-pre-spawn).
            let out = lab.cmd_output(&["firewall"], &["personal", "del", "--rule-no", "0"]);
            assert!(out.status.success(), "{}", output_text(&out));
        }
        lab.cmd(&["start"], &["personal"]);
        let next = format!("vif{}.0", 6 + round);
        let now = firewall_vifs(&lab);
        assert!(
            now.contains(&next) && !now.contains(&vif),
            "round {round}: expected {next} (the next domid) instead of {vif} in {fw}: {now:?}"
        );
        vif = next;
        let addr = Command::new("ip")
            .args([
                "-n",
                &lab.ns("personal"),
                "-o",
                "addr",
                "show",
                "dev",
                "eth0",
            ])
            .output()
            .expect("ip addr");
        let addr = String::from_utf8_lossy(&addr.stdout).into_owned();
        assert!(addr.contains("10.137.0.11/32"), "round {round}: {addr}");
        let link = Command::new("ip")
            .args([
                "-n",
                &lab.ns("personal"),
                "-o",
                "link",
                "show",
                "dev",
                "eth0",
            ])
            .output()
            .expect("ip link");
        let link = String::from_utf8_lossy(&link.stdout).into_owned();
        assert!(link.contains("00:16:3e:5e:6c:0b"), "round {round}: {link}");
        personal_ok(&format!("round {round}, after start"));
        if round < RESTARTS {
            refused_443(&format!("round {round}, after start"));
        } else {
            let s = lab.tcp("personal", "198.18.0.10:443", 3000, true);
            assert_eq!(
                s.status, "ok",
                "the rule removed while halted is still in force: {s:?}"
            );
        }
    }
    let status = lab.cmd(&["status"], &[]);
    assert!(
        status.contains(&format!("{vif} in sys-firewall")),
        "status does not show {vif}:\n{status}"
    );
    echo.send("after");
    assert_eq!(
        echo.line(Duration::from_secs(10)).as_deref(),
        Some("echo ok after"),
        "work's connection, opened before personal's restarts, no longer carries data"
    );
    drop(echo);
    personal_ok("at the end");
    lab.down();
}

/// `ping -c1 -W2 -n -M PMTUDISC -s SIZE dst` in a qube: (succeeded, stdout and stderr).
fn ping(lab: &Lab, qube: &str, pmtudisc: &str, size: u32, dst: &str) -> (bool, String) {
    let s = size.to_string();
    let out = lab.cmd_output(
        &["exec"],
        &[
            qube, "--", "ping", "-c1", "-W2", "-n", "-M", pmtudisc, "-s", &s, dst,
        ],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "[{}] {qube}: ping -M {pmtudisc} -s {size} {dst}:\n{text}",
        lab.name
    );
    (out.status.success(), text)
}

/// A TCP bulk transfer with the world's iperf3 (2 s; `reverse`: the world sends):
/// (megabytes received, Mbit/s), or the failure's text.
fn iperf(lab: &Lab, qube: &str, reverse: bool) -> Result<(f64, f64), String> {
    let mut args = vec![
        qube,
        "--",
        "timeout",
        "15",
        "iperf3",
        "-c",
        WEB,
        "-t",
        "2",
        "-f",
        "m",
        "--connect-timeout",
        "3000",
    ];
    if reverse {
        args.push("-R");
    }
    let out = lab.cmd_output(&["exec"], &args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text.lines().find(|l| l.trim_end().ends_with("receiver"));
    let parsed = line.and_then(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        let at = |unit: &str| {
            w.iter()
                .position(|x| *x == unit)
                .and_then(|i| w.get(i.wrapping_sub(1)))
                .and_then(|v| v.parse::<f64>().ok())
        };
        let mb = at("MBytes").or_else(|| at("GBytes").map(|g| g * 1024.0))?;
        Some((mb, at("Mbits/sec")?))
    });
    eprintln!(
        "[{}] {qube}: iperf3{}: {parsed:?}",
        lab.name,
        if reverse { " -R" } else { "" }
    );
    match (out.status.success(), parsed) {
        (true, Some(p)) => Ok(p),
        _ => Err(output_text(&out)),
    }
}

#[test]
fn a_1400_byte_link_gets_frag_needed_fragments_and_working_tcp() {
    // With the sys-firewall <-> sys-net link at 1400, a router answers DF packets that do not
    // fit with ICMP fragmentation needed carrying the MTU (RFC 1191 section 4), fragments the
    // others (RFC 791), and so TCP finds the path MTU and moves data. With a client's link at
    // 1400, a 1428-byte reply reaches the client as fragments.
    let Some(lab) = Lab::up() else { return };
    let mut echo = lab.spawn_in(
        &lab.ns("work"),
        &["probe", "echo", "198.18.0.10:8080", "--timeout-ms", "3000"],
    );
    assert_eq!(
        echo.line(Duration::from_secs(5)).as_deref(),
        Some("connected")
    );
    echo.send("before");
    assert_eq!(
        echo.line(Duration::from_secs(5)).as_deref(),
        Some("echo ok before")
    );
    lab.cmd(&["mtu"], &["sys-firewall", "1400"]);
    // The link changed under an open connection, which carries on.
    echo.send("after");
    assert_eq!(
        echo.line(Duration::from_secs(5)).as_deref(),
        Some("echo ok after"),
        "the connection opened before the MTU change"
    );
    drop(echo);

    // 1372 + 8 + 20 = 1400: fits.
    let (ok, text) = ping(&lab, "work", "do", 1372, WEB);
    assert!(ok, "a 1400-byte DF ping must pass: {text}");
    // 1500 bytes with DF: fragmentation needed from the firewall, with the next-hop MTU.
    let (ok, text) = ping(&lab, "work", "do", 1472, WEB);
    assert!(!ok, "a 1500-byte DF ping cannot pass a 1400 link: {text}");
    assert!(
        text.contains("From 10.137.0.6") && text.contains("Frag needed and DF set (mtu = 1400)"),
        "want frag-needed (mtu 1400) from sys-firewall: {text}"
    );
    // Now the sender knows: the kernel refuses locally, with the MTU it learned.
    let (ok, text) = ping(&lab, "work", "do", 1472, WEB);
    assert!(!ok && text.contains("mtu=1400"), "{text}");
    // Without DF the packet goes through, in fragments.
    let (ok, text) = ping(&lab, "work", "dont", 1472, WEB);
    assert!(
        ok,
        "a 1500-byte ping without DF must be fragmented, not lost: {text}"
    );
    for reverse in [false, true] {
        let (mb, _) = iperf(&lab, "work", reverse)
            .unwrap_or_else(|e| panic!("TCP across the 1400 link (reverse {reverse}): {e}"));
        // Not a speed test (bench/lab-hostile.sh measures): a transfer that stalls moves a
        // few KB (14 KB before MTU followed the links), one that works many MB even in a
        // debug build on a loaded machine.
        assert!(mb >= 1.0, "only {mb} MB in 2 s (reverse {reverse})");
    }

    // The client's own link at 1400.
    lab.cmd(&["mtu"], &["work", "1400"]);
    // 1428-byte request (fragmented by work) and 1428-byte reply: the reply must reach work
    // as fragments (Linux's echo replies carry no DF).
    let (ok, text) = ping(&lab, "work", "dont", 1400, WEB);
    assert!(ok, "a 1428-byte reply to a 1400 client must arrive: {text}");
    let (ok, text) = ping(&lab, "work", "do", 1372, WEB);
    assert!(ok, "{text}");
    let (mb, _) = iperf(&lab, "work", true).unwrap_or_else(|e| panic!("TCP to a 1400 client: {e}"));
    assert!(mb >= 1.0, "only {mb} MB in 2 s to the 1400 client");
    // Other clients keep their 1500.
    let (ok, text) = ping(&lab, "personal", "do", 1372, WEB);
    assert!(ok, "{text}");
    lab.down();
}

/// The `flows N of M` line of our service's status, in `qubes-lab status`.
fn table_fill(status: &str) -> Option<(usize, usize)> {
    let line = status
        .lines()
        .find_map(|l| l.trim().strip_prefix("flows "))?;
    let mut w = line.split_whitespace();
    let n = w.next()?.parse().ok()?;
    let max = w.nth(1)?.parse().ok()?;
    Some((n, max))
}

/// Tracker issue 8: two hostile qubes flood the connection table with half-open connections
/// (SYNs to a world port that answers, their own resets dropped, as a compromised qube can),
/// and work must still connect during the flood and right after. Our service runs with a
/// 1024-flow table, which two floods of 300 SYNs a second fill in under 2 s (the rate is what
/// a debug build of the service forwards with CPU to spare on a shared 2-core machine: the test
/// is about the table, not throughput); the Linux firewall keeps the kernel's nf_conntrack_max
/// (read-only in a namespace), so there the flood does not fill the table. Each attempt is a
/// fresh TCP connection (a new flow) or DNS query, with a 2 s timeout.
#[test]
fn work_keeps_connecting_while_two_qubes_flood_the_table() {
    // Under software emulation a connection through the VM takes over a second while it
    // forwards the flood, so the flood lasts long enough for five attempts there too.
    let flood_ms: u64 = if firewall_vm() { 15000 } else { 6000 };
    const TABLE: usize = 1024;
    let table = TABLE.to_string();
    let Some((lab, _)) = Lab::up_with(&["--no-matrix", "--conntrack-max", &table]) else {
        return;
    };
    let flooders = ["untrusted", "personal"];
    for q in flooders {
        // The qube's own kernel would answer each SYN-ACK with a reset (it has no socket for
        // the raw SYNs), closing the flow; a hostile qube suppresses them.
        for rule in [
            "add table ip flood",
            "add chain ip flood out { type filter hook output priority 0 ; }",
            "add rule ip flood out tcp flags rst drop",
        ] {
            let mut args = vec![q, "--", "nft"];
            args.extend(rule.split(' '));
            lab.cmd(&["exec"], &args);
        }
    }
    let dur = flood_ms.to_string();
    // untrusted may reach TCP 443 only, so both flood that port of the web server.
    let floods: Vec<Background> = flooders
        .iter()
        .map(|q| {
            lab.spawn_in(
                &lab.ns(q),
                &[
                    "probe",
                    "syn-flood",
                    "198.18.0.10:443",
                    "--rate",
                    "300",
                    "--duration-ms",
                    &dur,
                ],
            )
        })
        .collect();
    let start = Instant::now();
    // The table is full after about 1.7 s.
    std::thread::sleep(Duration::from_millis(2500));
    let mut during = (0u32, 0u32);
    let mut fills = Vec::new();
    while start.elapsed() < Duration::from_millis(flood_ms - 300) {
        let o = lab.tcp("work", "198.18.0.10:80", 2000, false);
        during.1 += 1;
        during.0 += u32::from(o.status == "ok");
        if during.1.is_multiple_of(4) {
            let d = lab.dns("work", "10.139.1.1");
            during.1 += 1;
            during.0 += u32::from(d.status == "ok");
        }
        if kind() == "rust" {
            fills.extend(table_fill(&lab.cmd(&["status"], &[])));
        }
    }
    let mut sent = Vec::new();
    for f in floods {
        sent.extend(f.rest(Duration::from_secs(10)));
    }
    // Right after the flood: the flooders' half-open flows are all still in the table.
    let mut after = (0u32, 0u32);
    for _ in 0..6 {
        let o = lab.tcp("work", "198.18.0.10:80", 2000, false);
        after.1 += 1;
        after.0 += u32::from(o.status == "ok");
    }
    let ping = lab.cmd_output(&["exec"], &["work", "--", "ping", "-c1", "-W2", "-n", WEB]);
    after.1 += 1;
    after.0 += u32::from(ping.status.success());
    eprintln!(
        "[{}] {}: flood {sent:?}; table {fills:?}; work during the flood {}/{}, right after {}/{}",
        lab.name,
        kind(),
        during.0,
        during.1,
        after.0,
        after.1
    );
    assert_eq!(sent.len(), 2, "both floods report: {sent:?}");
    if kind() == "rust" {
        // The flood did what it is for: the table was full while work connected.
        assert!(
            fills.iter().any(|&(n, max)| max == TABLE && n == max),
            "the table never filled: {fills:?}"
        );
    }
    assert!(
        during.1 >= 5,
        "too few attempts during the flood: {during:?}"
    );
    assert!(
        during.0 * 10 >= during.1 * 9,
        "work during the flood: {} of {} attempts succeeded",
        during.0,
        during.1
    );
    assert!(
        after.0 * 10 >= after.1 * 9,
        "work right after the flood: {} of {} attempts succeeded",
        after.0,
        after.1
    );
    lab.down();
}

/// `ip -n NS ARGS...`: its output, which must succeed.
fn ip_in(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .arg("-n")
        .arg(ns)
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip -n {ns} {args:?}: {}",
        output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `sys-net status:` part of `qubes-lab status`.
fn sysnet_status(lab: &Lab) -> String {
    let all = lab.cmd(&["status"], &[]);
    all.split("sys-net status:")
        .nth(1)
        .unwrap_or("")
        .to_string()
}

fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> Option<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = done() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} within {secs} s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Tracker issue 9: our sys-net at the root of the chain. Its address comes by DHCP from the
/// world's dnsmasq and is renewed at T1; the kernels of sys-net and sys-firewall hold none of
/// it and forward nothing; a new lease naming other DNS servers is followed without cutting
/// an open connection; a carrier pulled and restored brings the lease back; `kill -9` of
/// sys-net leaves nothing forwarding.
#[test]
fn sys_net_leases_renews_follows_the_lease_and_fails_closed() {
    if !can_run() {
        return;
    }
    if netvm_kind() != "rust" {
        eprintln!("not applicable to the Linux sys-net: its address is static, it runs no DHCP");
        return;
    }
    let Some(lab) = Lab::up() else { return };
    let st = sysnet_status(&lab);
    let lease = st
        .lines()
        .find_map(|l| l.trim().strip_prefix("dhcp Bound lease "))
        .unwrap_or_else(|| panic!("no lease: {st}"))
        .to_string();
    let addr = lease.split('/').next().unwrap_or("").to_string();
    assert!(addr.starts_with("198.18.0.1"), "{lease}");
    assert!(lease.contains("router 198.18.0.1 "), "{lease}");
    assert!(st.contains("dns 10.139.1.1 -> 198.18.0.53"), "{st}");

    // Renewed at T1 (10 s): dnsmasq answers a second time.
    let log = format!("/run/qubes-lab/{}/dnsmasq-dhcp.log", lab.name);
    wait_for("a DHCP renewal", 30, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (text.matches("DHCPACK(").count() >= 2).then_some(text)
    });

    // No kernel holds the lease or forwards for the clients.
    for q in ["sys-net", "sys-firewall"] {
        let addrs = ip_in(&lab.ns(q), &["-o", "-4", "addr", "show"]);
        assert!(
            !addrs.contains(&addr) && !addrs.contains("198.18."),
            "{q}'s kernel holds an uplink address: {addrs}"
        );
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.ns(q),
                "cat",
                "/proc/sys/net/ipv4/ip_forward",
            ])
            .output()
            .expect("read ip_forward");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "0",
            "{q} forwards"
        );
    }

    // A new lease names two DNS servers: new queries follow, the open connection stays.
    let mut echo = lab.spawn_in(
        &lab.ns("work"),
        &["probe", "echo", "198.18.0.10:8080", "--timeout-ms", "3000"],
    );
    assert_eq!(
        echo.line(Duration::from_secs(5)).as_deref(),
        Some("connected")
    );
    echo.send("before");
    assert_eq!(
        echo.line(Duration::from_secs(5)).as_deref(),
        Some("echo ok before")
    );
    let pid_file = format!("/run/qubes-lab/{}/dnsmasq-dhcp.pid", lab.name);
    let pid = std::fs::read_to_string(&pid_file).expect("dnsmasq-dhcp pid");
    let _ = Command::new("kill").args(["-TERM", pid.trim()]).status();
    std::thread::sleep(Duration::from_millis(300));
    let leases = format!("/run/qubes-lab/{}/dhcp.leases", lab.name);
    let mut dhcp = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns("world"),
            "dnsmasq",
            "--keep-in-foreground",
        ])
        .args([
            "--conf-file=/dev/null",
            "--port=0",
            "--interface=wan0",
            "--bind-interfaces",
        ])
        .args(["--dhcp-range=198.18.0.100,198.18.0.150,255.255.255.0,2m"])
        .args(["--dhcp-option=option:router,198.18.0.1"])
        .args(["--dhcp-option=option:dns-server,198.18.0.53,198.18.0.54"])
        .args(["--dhcp-option=58,10", "--dhcp-option=59,15"])
        .arg(format!("--dhcp-leasefile={leases}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("restart dnsmasq with other DNS servers");
    let st = wait_for("the new lease's DNS servers", 30, || {
        let st = sysnet_status(&lab);
        st.contains("dns 10.139.1.2 -> 198.18.0.54").then_some(st)
    });
    assert!(st.contains("dns 10.139.1.1 -> 198.18.0.53"), "{st}");
    assert!(
        st.contains(&format!("dhcp Bound lease {addr}/")),
        "the address moved: {st}"
    );
    echo.send("after");
    assert_eq!(
        echo.line(Duration::from_secs(5)).as_deref(),
        Some("echo ok after"),
        "the open connection did not survive the renewal"
    );
    drop(echo);

    // The carrier goes and comes back: DHCP again, and the world is reached again.
    ip_in(&lab.ns("world"), &["link", "set", "wan0", "down"]);
    std::thread::sleep(Duration::from_secs(1));
    ip_in(&lab.ns("world"), &["link", "set", "wan0", "up"]);
    wait_for("the uplink back after a carrier loss", 30, || {
        let o = lab.tcp("work", "198.18.0.10:80", 2000, true);
        (o.status == "ok").then_some(o.detail)
    });

    // kill -9: nothing forwards any more.
    let pid = std::fs::read_to_string(format!("/run/qubes-lab/{}/sys-net.pid", lab.name))
        .expect("sys-net pid");
    let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
    std::thread::sleep(Duration::from_millis(500));
    let o = lab.tcp("work", "198.18.0.10:80", 2000, true);
    assert_ne!(
        o.status, "ok",
        "work reaches the world with sys-net dead: {o:?}"
    );
    let _ = dhcp.kill();
    let _ = dhcp.wait();
    lab.down();
}

/// Tracker issue 11: sys-net as its image under QEMU (`up --vm sys-net`) in place of the
/// process. Its NIC is a TAP on the world's wire (bridged with the world's veth in its
/// namespace, which holds no address), its lease comes from the world's dnsmasq, and the
/// chain carries work's traffic through it; pulling the VM's power leaves work with no path
/// out.
#[test]
fn sys_net_as_its_image_leases_and_carries_the_chain() {
    if !can_run() {
        return;
    }
    if netvm_kind() != "rust" {
        eprintln!("not applicable to the Linux sys-net: `--vm sys-net` runs our sys-net's image");
        return;
    }
    let Some((lab, up)) = Lab::up_with(&["--vm", "sys-net"]) else {
        return;
    };
    assert!(up.contains("sys-net image under QEMU"), "{up}");
    let st = sysnet_status(&lab);
    let lease = st
        .lines()
        .find_map(|l| l.trim().strip_prefix("dhcp Bound lease "))
        .unwrap_or_else(|| panic!("no lease: {st}"))
        .to_string();
    assert!(lease.starts_with("198.18.0.1"), "{lease}");
    assert!(lease.contains("router 198.18.0.1 "), "{lease}");
    let dhcp_log = std::fs::read_to_string(format!("/run/qubes-lab/{}/dnsmasq-dhcp.log", lab.name))
        .unwrap_or_default();
    assert!(
        dhcp_log.contains("DHCPACK("),
        "dnsmasq acked no lease: {dhcp_log}"
    );
    // The namespace around the VM is the wire: it holds no address of the world.
    let addrs = ip_in(&lab.ns("sys-net"), &["-o", "-4", "addr", "show"]);
    assert!(
        !addrs.contains("198.18."),
        "sys-net's namespace holds {addrs}"
    );
    // The chain works through the VM: names, HTTP by address and by name.
    let d = lab.dns("work", "10.139.1.1");
    assert_eq!((d.status.as_str(), d.detail.as_str()), ("ok", WEB), "{d:?}");
    let h = lab.tcp("work", "198.18.0.10:80", 5000, true);
    assert_eq!(h.status, "ok", "{h:?}");
    assert!(h.detail.contains("200"), "{h:?}");
    let out = lab.cmd_output(
        &["exec"],
        &["work", "--", "curl", "-sS", "-m", "10", "http://web.test/"],
    );
    assert!(out.status.success(), "curl: {}", output_text(&out));
    // Pulling the power (QEMU runs under sys-net's pid file): nothing forwards.
    let pid = std::fs::read_to_string(format!("/run/qubes-lab/{}/sys-net.pid", lab.name))
        .expect("sys-net pid");
    let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
    std::thread::sleep(Duration::from_millis(500));
    let o = lab.tcp("work", "198.18.0.10:80", 2000, true);
    assert_ne!(
        o.status, "ok",
        "work reaches the world with the sys-net VM dead: {o:?}"
    );
    lab.down();
}

/// The relays of the lab's private Tor network (198.18.0.41 to .47, docs/lab.md) and the
/// ORPort they all use: the only place sys-whonix's uplink may lead.
const TOR_RELAYS: [&str; 7] = [
    "198.18.0.41",
    "198.18.0.42",
    "198.18.0.43",
    "198.18.0.44",
    "198.18.0.45",
    "198.18.0.46",
    "198.18.0.47",
];
const TOR_ORPORT: &str = "9001";

impl Lab {
    fn whonix_sock(&self) -> String {
        format!("/run/qubes-lab/{}/sys-whonix.sock", self.name)
    }

    /// `sys-whonix ARGS --control <the lab's socket>`, which must succeed; its stdout.
    fn whonix(&self, args: &[&str]) -> String {
        let bin = Path::new(LAB).with_file_name("sys-whonix");
        let out = Command::new(bin)
            .args(args)
            .args(["--control", &self.whonix_sock()])
            .output()
            .expect("run sys-whonix");
        assert!(
            out.status.success(),
            "sys-whonix {args:?}: {}",
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `curl` inside a qube: the HTTP code, or curl's exit code as `curl N`.
    fn curl(&self, qube: &str, url: &str, max_secs: u32) -> String {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(qube),
                "curl",
                "-s",
                "-o",
                "/dev/null",
            ])
            .args([
                "-w",
                "%{http_code}",
                "--max-time",
                &max_secs.to_string(),
                url,
            ])
            .output()
            .expect("run curl");
        let code = String::from_utf8_lossy(&out.stdout).trim().to_string();
        eprintln!(
            "[{}] {qube}: curl {url} -> {:?} {code}",
            self.name,
            out.status.code()
        );
        if out.status.success() {
            code
        } else {
            format!("curl {}", out.status.code().unwrap_or(-1))
        }
    }
}

impl Lab {
    /// Fails the test unless `curl` from `qube` gets HTTP 200, showing sys-whonix's status
    /// and the end of its log when it does not.
    fn assert_fetch(&self, qube: &str, url: &str, max_secs: u32) {
        let got = self.curl(qube, url, max_secs);
        if got != "200" {
            let status = self
                .whonix_status()
                .unwrap_or_else(|e| format!("(no status: {e})"));
            let log =
                std::fs::read_to_string(format!("/run/qubes-lab/{}/sys-whonix.log", self.name))
                    .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "{qube}: {url} gave {got}, not 200\nsys-whonix status:\n{status}\nits log \
                 ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }

    /// [`Lab::assert_fetch`], after up to `tries - 1` failed attempts.
    fn assert_fetch_retrying(&self, qube: &str, url: &str, max_secs: u32, tries: u32) {
        for attempt in 1..tries {
            let got = self.curl(qube, url, max_secs);
            if got == "200" {
                return;
            }
            // What the gateway saw, so that a failure CI meets once can be told apart later.
            let status = self
                .whonix_status()
                .unwrap_or_else(|e| format!("(no status: {e})"));
            eprintln!(
                "[{}] {qube}: attempt {attempt} of {tries} gave {got}; sys-whonix status:\n{status}",
                self.name
            );
        }
        self.assert_fetch(qube, url, max_secs);
    }

    fn whonix_status(&self) -> Result<String, String> {
        let bin = Path::new(LAB).with_file_name("sys-whonix");
        let out = Command::new(bin)
            .args(["status", "--control", &self.whonix_sock()])
            .output()
            .map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The circuits sys-whonix's status names for the open streams from `src` to `dst`
/// (`  stream 10.137.0.13:40312 -> 198.18.0.10:8080 circuit Circ 3.0 tcp Established`), once
/// `count` of them have one.
fn circuits(lab: &Lab, src: &str, dst: &str, count: usize) -> Vec<String> {
    let t0 = Instant::now();
    loop {
        let st = lab.whonix(&["status"]);
        let found: Vec<String> = st
            .lines()
            .filter(|l| {
                l.trim_start().starts_with(&format!("stream {src}:"))
                    && l.contains(&format!(" -> {dst} "))
            })
            .filter_map(|l| {
                l.split(" circuit ")
                    .nth(1)
                    .and_then(|r| r.split(" tcp ").next())
                    .filter(|c| !c.starts_with('('))
                    .map(str::to_string)
            })
            .collect();
        if found.len() >= count {
            return found;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "fewer than {count} streams with a circuit from {src} to {dst}:\n{st}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An echo connection through sys-whonix that has carried one line both ways.
fn open_echo(lab: &Lab, qube: &str, tag: &str) -> Background {
    let mut echo = lab.spawn_in(
        &lab.ns(qube),
        &["probe", "echo", "198.18.0.10:8080", "--timeout-ms", "30000"],
    );
    assert_eq!(
        echo.line(Duration::from_secs(30)).as_deref(),
        Some("connected"),
        "{qube}: echo {tag}"
    );
    echo.send(tag);
    assert_eq!(
        echo.line(Duration::from_secs(35)).as_deref(),
        Some(format!("echo ok {tag}").as_str()),
        "{qube}: echo {tag} through Tor"
    );
    echo
}

/// The `unsupported=` counter of a client vif in a service status.
fn unsupported(status: &str, vif: &str) -> u64 {
    status
        .lines()
        .skip_while(|l| !l.starts_with(&format!("client {vif} ")))
        .nth(1)
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("unsupported="))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A counter `NAME=N` of sys-whonix's gateway status line.
fn gateway_counter(status: &str, name: &str) -> u64 {
    status
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no counter {name} in {status}"))
}

/// The packets of a capture that match a pcap filter, one line each (`tcpdump -r`).
fn capture_lines(file: &Path, filter: &str) -> Vec<String> {
    let out = Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(file)
        .arg(filter)
        .output()
        .expect("run tcpdump -r");
    assert!(
        out.status.success(),
        "tcpdump -r {filter}: {}",
        output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// The default topology's sys-whonix and anon-whonix, with a second anonymous qube for the
/// isolation checks; a capture on sys-whonix's uplink runs from before the first stream to
/// after the restart. What Whonix promises, checked from the outside:
/// - anon-whonix fetches a world page by address and by name, and the world's DNS server
///   hears the name from a Tor exit, not from the lab's netvms;
/// - an MX query gets NOTIMP (C tor's DNSPort, which Whonix's leak tests expect);
/// - UDP, ICMP and IPv6 from anon-whonix go nowhere, and sys-whonix counts them;
/// - two anonymous qubes use different circuits, one qube the same one for its streams, and
///   another one after `sys-whonix new-identity`;
/// - with sys-whonix killed, anon-whonix has no path out; restarted, it works again;
/// - the capture holds only TCP between sys-whonix and the relays' ORPorts: no packet to the
///   web server, no DNS, nothing of anon-whonix's own.
#[test]
fn whonix_lab_carries_tcp_and_dns_over_tor_and_nothing_else() {
    if !can_run() {
        return;
    }
    if !testkit::tornet::TorNet::can_run("whonix_lab_carries_tcp_and_dns_over_tor_and_nothing_else")
    {
        return;
    }
    if Command::new("tcpdump").arg("--version").output().is_err() {
        testkit::not_run(
            "whonix_lab_carries_tcp_and_dns_over_tor_and_nothing_else",
            "tcpdump is not installed (scripts/setup-debian.sh installs it)",
        );
        return;
    }
    let topology = std::env::temp_dir().join(format!("lab-whonix-{}.yaml", std::process::id()));
    let text = format!(
        "{}  - name: anon-work\n    ip: 10.137.0.14\n    netvm: sys-whonix\n",
        include_str!("../topologies/default.yaml")
    );
    std::fs::write(&topology, text).expect("write topology");
    let up = Lab::up_full(&[
        "--no-matrix",
        "--topology",
        topology.to_str().expect("utf-8"),
    ]);
    let _ = std::fs::remove_file(&topology);
    let Some((lab, out)) = up else { return };
    // `up` showed the network's and the client's progress, and ended with Tor ready.
    assert!(
        out.contains("7 of 7 relays in the consensus, 7 bootstrapped")
            && out.contains("sys-whonix: tor ready"),
        "{out}"
    );
    assert!(out.contains("sys-whonix service: Tor gateway"), "{out}");

    let capture = PathBuf::from(format!("/run/qubes-lab/{}/uplink.pcap", lab.name));
    let mut tcpdump = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns("sys-whonix"),
            "tcpdump",
            "-i",
            "eth0",
            "-p",
        ])
        .args(["-n", "-U", "-w"])
        .arg(&capture)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tcpdump");
    // tcpdump says `listening on eth0` once the capture runs.
    let mut err = BufReader::new(tcpdump.stderr.take().expect("stderr"));
    let mut line = String::new();
    err.read_line(&mut line).expect("tcpdump's first line");
    assert!(line.contains("listening on eth0"), "tcpdump: {line}");

    // TCP by address, then by name: the name goes through Tor's resolve to the exits'
    // resolver, the world's DNS server, which logs who asked.
    // The first stream of a fresh seven-relay network may meet a circuit that fails to
    // build under CI's load (seen once: arti gave up, the client got its reset). A Tor
    // client retries; so does this one, twice, with more time than arti's own 60 s
    // request timeout. Every later fetch must work at the first try.
    lab.assert_fetch_retrying("anon-whonix", &format!("http://{WEB}/"), 90, 3);
    let dnsmasq_log = PathBuf::from(format!("/run/qubes-lab/{}/dnsmasq.log", lab.name));
    let asked_before = std::fs::read_to_string(&dnsmasq_log)
        .expect("the world's dnsmasq log")
        .lines()
        .count();
    let dns = lab.probe(
        "anon-whonix",
        &[
            "dns",
            "web.test",
            "--server",
            "10.139.1.1",
            "--timeout-ms",
            "10000",
        ],
    );
    assert_eq!(
        (dns.status.as_str(), dns.detail.as_str()),
        ("ok", WEB),
        "{dns:?}"
    );
    lab.assert_fetch("anon-whonix", "http://web.test/", 30);
    // The exits' resolver queries go out from the world's own addresses (tor does not bind
    // them to the exit's); what matters is that none came through sys-net's uplink.
    let dnsmasq = std::fs::read_to_string(&dnsmasq_log).expect("the world's dnsmasq log");
    let askers: Vec<&str> = dnsmasq
        .lines()
        .skip(asked_before)
        // tor asks in mixed case (0x20 randomisation: `weB.tEsT`).
        .filter(|l| l.to_ascii_lowercase().contains("query[a] web.test from "))
        .filter_map(|l| l.rsplit(' ').next())
        .collect();
    let world_own = |a: &str| TOR_RELAYS.contains(&a) || ["198.18.0.1", WEB].contains(&a);
    assert!(
        !askers.is_empty() && askers.iter().all(|a| world_own(a)),
        "web.test was asked by {askers:?}: not (only) by the world's Tor exits"
    );
    let mx = lab.probe(
        "anon-whonix",
        &["dns", "web.test", "--qtype", "MX", "--timeout-ms", "5000"],
    );
    assert_eq!(
        (mx.status.as_str(), mx.detail.as_str()),
        ("error", "NOTIMP"),
        "{mx:?}"
    );

    // UDP and ICMP go nowhere, and are counted.
    let before = lab.whonix(&["status"]);
    let listener = lab.spawn_in(
        &lab.ns("world"),
        &[
            "probe",
            "udp-listen",
            "198.18.0.10:9999",
            "--duration-ms",
            "4000",
        ],
    );
    assert_eq!(
        listener.line(Duration::from_secs(5)).as_deref(),
        Some("listening 198.18.0.10:9999")
    );
    // The probe's raw socket with the qube's own address: a plain datagram.
    let sent = lab.cmd_output(
        &["exec"],
        &[
            "anon-whonix",
            "--",
            LAB,
            "probe",
            "spoof",
            "--src",
            "10.137.0.13",
            "--dst",
            "198.18.0.10:9999",
            "--payload",
            "leak",
        ],
    );
    assert!(sent.status.success(), "udp: {}", output_text(&sent));
    let (ok, ping) = ping(&lab, "anon-whonix", "dont", 56, WEB);
    assert!(!ok, "a ping through sys-whonix got an answer: {ping}");
    let heard = listener.rest(Duration::from_secs(6));
    assert!(
        !heard.iter().any(|l| l.contains("leak")),
        "a datagram from anon-whonix reached the world: {heard:?}"
    );
    let after = lab.whonix(&["status"]);
    assert!(
        gateway_counter(&after, "udp") >= gateway_counter(&before, "udp") + 3,
        "{after}"
    );
    assert!(
        gateway_counter(&after, "icmp") > gateway_counter(&before, "icmp"),
        "{after}"
    );

    // IPv6: the lab's qubes have it off; anon-whonix gets it, and what it sends (neighbour
    // discovery, a datagram, a ping) is dropped by the engine as unsupported.
    let v6_before = unsupported(&lab.whonix(&["status"]), "vif8.0");
    lab.cmd(
        &["exec"],
        &[
            "anon-whonix",
            "--",
            LAB,
            "sysctl",
            "net/ipv6/conf/eth0/disable_ipv6=0",
        ],
    );
    let anon = lab.ns("anon-whonix");
    testkit::ip(&[
        "-n",
        &anon,
        "addr",
        "add",
        "fd09:24ef:4179::d/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    let v6 = Command::new("ip")
        .args(["netns", "exec", &anon, "bash", "-c"])
        .arg("echo leak > /dev/udp/fd09:24ef:4179::1/9999; ping -6 -c 2 -W 1 fd09:24ef:4179::1")
        .output()
        .expect("ipv6");
    assert!(!v6.status.success(), "an IPv6 ping got an answer");
    std::thread::sleep(Duration::from_millis(300));
    let st = lab.whonix(&["status"]);
    assert!(
        unsupported(&st, "vif8.0") > v6_before,
        "IPv6 not dropped: {st}"
    );

    // Isolation: each qube its own circuit; one qube's streams share one until
    // new-identity.
    let echo = "198.18.0.10:8080";
    let a1 = open_echo(&lab, "anon-whonix", "a1");
    let w1 = open_echo(&lab, "anon-work", "w1");
    let ca = circuits(&lab, "10.137.0.13", echo, 1);
    let cw = circuits(&lab, "10.137.0.14", echo, 1);
    assert_ne!(ca[0], cw[0], "two qubes share a circuit");
    let a2 = open_echo(&lab, "anon-whonix", "a2");
    let ca2 = circuits(&lab, "10.137.0.13", echo, 2);
    assert!(
        ca2.iter().all(|c| *c == ca[0]),
        "anon-whonix's streams: {ca2:?}"
    );
    lab.whonix(&["new-identity", "10.137.0.13"]);
    let a3 = open_echo(&lab, "anon-whonix", "a3");
    let ca3 = circuits(&lab, "10.137.0.13", echo, 3);
    let fresh: Vec<&String> = ca3.iter().filter(|c| **c != ca[0]).collect();
    assert_eq!(
        fresh.len(),
        1,
        "after new-identity: {ca3:?} (before: {})",
        ca[0]
    );
    assert_ne!(*fresh[0], cw[0], "the new circuit is anon-work's");
    drop((a1, a2, a3, w1));

    // A qube behind sys-whonix halted and started again (qvm-shutdown, qvm-start): the
    // service lets go of its vif and takes the new one, whose traffic is carried at once.
    lab.cmd(&["stop"], &["anon-work"]);
    let st = lab.whonix(&["status"]);
    assert!(
        !st.contains("client vif9.0 "),
        "vif9.0 still attached: {st}"
    );
    let started = lab.cmd(&["start"], &["anon-work"]);
    assert!(started.contains("vif10.0 in sys-whonix"), "{started}");
    lab.assert_fetch("anon-work", &format!("http://{WEB}/"), 30);

    // Killed: no path out (the kernel has no address on vif8.0 and does not forward).
    let pid = std::fs::read_to_string(format!("/run/qubes-lab/{}/sys-whonix.pid", lab.name))
        .expect("sys-whonix's pid file");
    let st = Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .expect("kill");
    assert!(st.success());
    std::thread::sleep(Duration::from_millis(300));
    let dead = lab.tcp("anon-whonix", &format!("{WEB}:80"), 3000, true);
    assert_eq!(dead.status, "timeout", "{dead:?}");
    // Nor into sys-whonix's kernel, which holds the gateway's address on its uplink: no
    // reset from it, nothing at all.
    let kernel = lab.tcp("anon-whonix", "10.137.0.8:22", 2000, false);
    assert_eq!(kernel.status, "timeout", "{kernel:?}");
    let dead_dns = lab.dns("anon-whonix", "10.139.1.1");
    assert_ne!(dead_dns.status, "ok", "{dead_dns:?}");
    // Restarted: it picks up again.
    lab.cmd(&["restart-whonix"], &[]);
    lab.assert_fetch("anon-whonix", &format!("http://{WEB}/"), 60);

    // The capture: Tor to the relays and nothing else.
    let _ = Command::new("kill")
        .args(["-INT", &tcpdump.id().to_string()])
        .status();
    let _ = tcpdump.wait();
    let relay_hosts = |dir: &str| {
        TOR_RELAYS
            .iter()
            .map(|r| format!("{dir} host {r}"))
            .collect::<Vec<_>>()
            .join(" or ")
    };
    let tor = format!(
        // pcap-filter's `and` and `or` bind alike, left to right: every group in brackets.
        "tcp and ((({}) and dst port {TOR_ORPORT}) or (({}) and src port {TOR_ORPORT}))",
        relay_hosts("dst"),
        relay_hosts("src")
    );
    let all = capture_lines(&capture, "ip");
    let to_relays = capture_lines(&capture, &format!("({tor}) and dst port {TOR_ORPORT}"));
    let from_relays = capture_lines(&capture, &format!("({tor}) and src port {TOR_ORPORT}"));
    eprintln!(
        "[{}] capture: {} IPv4 packets, {} to relays, {} from relays",
        lab.name,
        all.len(),
        to_relays.len(),
        from_relays.len()
    );
    // (The kernel's GRO hands tcpdump merged segments, so the counts are small.)
    assert!(
        !to_relays.is_empty() && !from_relays.is_empty(),
        "no Tor traffic both ways on the uplink: is the capture on the right link?"
    );
    let other = capture_lines(&capture, &format!("not arp and not ({tor})"));
    assert!(
        other.is_empty(),
        "sys-whonix's uplink carried more than Tor ({} of {} IPv4 packets are other):\n{}",
        other.len(),
        all.len(),
        other
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    lab.down();
}
