//! What the sys-whonix gateway test and benchmark share: namespaces with a private Tor
//! network (testkit::tornet, Debian's tor), a world web server at 198.18.0.10 and the exits'
//! DNS server (dnsmasq: web.example is 198.18.0.10, both ways), sys-whonix with its uplink on
//! that namespace's loopback, and two anonymous client qubes behind its vifs. The kernel of the
//! tor namespace has no address on the vifs and does not forward.
//!
//! The test binary runs itself again (`ip netns exec`) for the world's servers and for the
//! clients' DNS probes: [`child_role`] first thing in the test.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sys_whonix::dns;
use testkit::tornet::TorNet;

pub const SYS_WHONIX: &str = env!("CARGO_BIN_EXE_sys-whonix");
/// Set in the programs the test binary runs again: what to be.
const ROLE_ENV: &str = "SYS_WHONIX_TEST_ROLE";
pub const BODY: &str = "hello from the world through Tor";
pub const BULK: usize = 3 << 20;

pub use testkit::ip;

pub fn bulk_byte(i: usize) -> u8 {
    (i * 7 + i / 251) as u8
}

/// The world's servers, run inside the tor namespace: the web server on 198.18.0.10:80
/// (`/`: BODY, `/bulk`: BULK patterned bytes, `POST /count`: the number of body bytes read),
/// a server on :8000 that holds every connection open without answering (streams whose
/// circuit `status` shows), and a UDP sink on :9999 that reports what reaches it in a file.
fn serve_world(udp_log: &Path) {
    let web = TcpListener::bind("198.18.0.10:80").expect("bind :80");
    let hold = TcpListener::bind("198.18.0.10:8000").expect("bind :8000");
    let sink = UdpSocket::bind("198.18.0.10:9999").expect("bind udp :9999");
    let log = udp_log.to_path_buf();
    std::thread::spawn(move || {
        let mut b = [0u8; 2048];
        while let Ok(n) = sink.recv(&mut b) {
            let _ = std::fs::write(&log, format!("got {n} bytes"));
        }
    });
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in hold.incoming().flatten() {
            held.push(s);
        }
    });
    for s in web.incoming() {
        let Ok(mut s) = s else { continue };
        std::thread::spawn(move || {
            let mut req = Vec::new();
            let mut b = [0u8; 4096];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut b) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => req.extend_from_slice(&b[..n]),
                }
            }
            let head_end = req.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
            let head = String::from_utf8_lossy(&req[..head_end]).to_string();
            if head.starts_with("GET /bulk") {
                let body: Vec<u8> = (0..BULK).map(bulk_byte).collect();
                let _ = write!(s, "HTTP/1.0 200 OK\r\nContent-Length: {BULK}\r\n\r\n");
                let _ = s.write_all(&body);
            } else if head.starts_with("POST /count") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                let mut got = req.len() - head_end;
                while got < len {
                    match s.read(&mut b) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                }
                let text = format!("counted {got}");
                let _ = write!(
                    s,
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{text}",
                    text.len()
                );
            } else {
                let _ = write!(
                    s,
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{BODY}",
                    BODY.len()
                );
            }
            // The server ends its side; the client sees the FIN through Tor.
            let _ = s.shutdown(Shutdown::Write);
        });
    }
}

/// A DNS query from a client namespace: `udp|tcp NAME TYPE` -> prints `rcode N answers A,B`.
fn dns_probe(args: &str) {
    let mut it = args.split_whitespace();
    let (proto, name, qtype) = (
        it.next().expect("proto"),
        it.next().expect("name"),
        it.next().expect("type").parse::<u16>().expect("type"),
    );
    let q = dns::build_query(0x4242, name, qtype);
    let resp = if proto == "udp" {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s.send_to(&q, "10.139.1.1:53").expect("send");
        let mut b = [0u8; 1500];
        let n = s.recv(&mut b).expect("a DNS answer over UDP");
        b[..n].to_vec()
    } else {
        let mut s = TcpStream::connect_timeout(
            &"10.139.1.1:53".parse().expect("addr"),
            Duration::from_secs(10),
        )
        .expect("connect to the virtual resolver over TCP");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s.write_all(&(q.len() as u16).to_be_bytes()).expect("len");
        s.write_all(&q).expect("query");
        let mut len = [0u8; 2];
        s.read_exact(&mut len).expect("answer length");
        let mut b = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut b).expect("answer");
        b
    };
    assert_eq!(&resp[..2], &[0x42, 0x42], "the answer has the query's id");
    let rcode = resp[3] & 0x0f;
    let ancount = u16::from_be_bytes([resp[6], resp[7]]);
    // Skip the question (its name, type, class), then read each record (RFC 1035 4.1.3).
    let mut at = 12;
    while resp[at] != 0 {
        at += usize::from(resp[at]) + 1;
    }
    at += 5;
    let mut answers = Vec::new();
    for _ in 0..ancount {
        at += 2; // the name: a pointer
        let rtype = u16::from_be_bytes([resp[at], resp[at + 1]]);
        let rdlen = usize::from(u16::from_be_bytes([resp[at + 8], resp[at + 9]]));
        let rd = &resp[at + 10..at + 10 + rdlen];
        answers.push(match rtype {
            dns::TYPE_A => format!("{}.{}.{}.{}", rd[0], rd[1], rd[2], rd[3]),
            dns::TYPE_PTR => {
                let mut n = Vec::new();
                let mut i = 0;
                while rd[i] != 0 {
                    let l = usize::from(rd[i]);
                    n.push(String::from_utf8_lossy(&rd[i + 1..i + 1 + l]).to_string());
                    i += l + 1;
                }
                n.join(".")
            }
            t => format!("type{t}"),
        });
        at += 10 + rdlen;
    }
    println!("rcode {rcode} answers {}", answers.join(","));
}

/// The namespaces and processes of the test, removed on drop.
pub struct Setup {
    tag: String,
    pub dir: tempfile::TempDir,
    pub procs: Vec<Child>,
    gateway: Option<Child>,
    /// How the test binary runs itself again (the test's name for a libtest harness).
    rerun: Vec<String>,
    pub udp_log: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(g) = self.gateway.as_mut() {
            let _ = g.kill();
            let _ = g.wait();
        }
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        for n in ["tor", "anon1", "anon2", "ctor"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(n)])
                .output();
        }
    }
}

impl Setup {
    pub fn ns(&self, which: &str) -> String {
        format!("{}-{which}", self.tag)
    }

    pub fn control(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    pub fn status(&self) -> String {
        let out = Command::new(SYS_WHONIX)
            .args(["status", "--control"])
            .arg(self.control())
            .output()
            .expect("status");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn start_gateway(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("sys-whonix.log")).expect("log");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns("tor"),
                SYS_WHONIX,
                "run",
                "--config",
            ])
            .arg(self.dir.path().join("sys-whonix.yaml"))
            .arg("--control")
            .arg(self.control())
            .env("RUST_LOG", "info,sys_whonix=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start sys-whonix");
        self.gateway = Some(child);
        let t0 = Instant::now();
        while !self.status().contains("tor-client vif1.0") {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "sys-whonix did not come up: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The running sys-whonix's process id (`ip netns exec` execs it: the child is it).
    pub fn gateway_pid(&self) -> Option<u32> {
        self.gateway.as_ref().map(Child::id)
    }

    pub fn kill_gateway(&mut self) {
        if let Some(mut g) = self.gateway.take() {
            // `ip netns exec` execs the program: the child is sys-whonix itself.
            let _ = g.kill();
            let _ = g.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sys-whonix.log")).unwrap_or_default()
    }

    pub fn wait_ready(&self, within: Duration) {
        let t0 = Instant::now();
        loop {
            let st = self.status();
            if st.contains("tor ready") {
                return;
            }
            assert!(
                t0.elapsed() < within,
                "Tor not ready within {} s: {st}\n{}",
                within.as_secs(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `curl` in a client namespace: (exit code, stdout, stderr, seconds taken).
    pub fn curl(&self, client: &str, args: &[&str]) -> (i32, Vec<u8>, String, f64) {
        let t0 = Instant::now();
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(client), "curl", "-sS"])
            .args(args)
            .output()
            .expect("curl");
        (
            out.status.code().unwrap_or(-1),
            out.stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
            t0.elapsed().as_secs_f64(),
        )
    }

    /// A fetch that a network seconds old may turn away at first (an exit answering END
    /// MISC while it settles): tried again for up to two minutes.
    pub fn fetch(&self, client: &str, args: &[&str]) -> Vec<u8> {
        let t0 = Instant::now();
        loop {
            let mut a = vec!["--max-time", "60"];
            a.extend_from_slice(args);
            let (code, body, err, _) = self.curl(client, &a);
            if code == 0 {
                return body;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "{client}: curl {args:?} kept failing: {code} {err}\n{}\n{}",
                self.status(),
                self.log()
            );
            eprintln!("{client}: curl {args:?}: {code} {err}; again");
            std::thread::sleep(Duration::from_secs(3));
        }
    }

    pub fn dns(&self, client: &str, query: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(client)])
            .arg(std::env::current_exe().expect("exe"))
            .args(&self.rerun)
            .env(ROLE_ENV, format!("dns {query}"))
            .output()
            .expect("dns probe");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{client}: DNS {query}: {text}{}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.status(),
            self.log()
        );
        // The probe's line may follow the test harness's own on the same line.
        text.lines()
            .find_map(|l| l.find("rcode ").map(|i| l[i..].to_string()))
            .unwrap_or_default()
    }

    /// A connection held open to the world's :8000 from `client`, from source port `port`.
    pub fn hold(&mut self, client: &str, port: u16) {
        let p = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(client),
                "curl",
                "-s",
                "--max-time",
                "300",
            ])
            .args([
                "--local-port",
                &port.to_string(),
                "http://198.18.0.10:8000/",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("curl hold");
        self.procs.push(p);
    }

    /// The circuit the stream from `addr:port` is on, once it has one.
    pub fn circuit_of(&self, addr: &str, port: u16) -> String {
        let t0 = Instant::now();
        let needle = format!("stream {addr}:{port} -> ");
        loop {
            let st = self.status();
            if let Some(line) = st.lines().find(|l| l.contains(&needle)) {
                if let Some(c) = line
                    .split(" circuit ")
                    .nth(1)
                    .and_then(|r| r.split(" tcp ").next())
                    .filter(|c| !c.starts_with('('))
                {
                    return c.to_string();
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "no circuit for {addr}:{port}: {st}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    pub fn counter(&self, name: &str) -> u64 {
        let st = self.status();
        st.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no counter {name} in {st}"))
    }
}

pub fn client_ns(tor: &str, ns: &str, vif: &str, addr: &str, mac: &str) {
    ip(&["netns", "add", ns]);
    ip(&[
        "-n", tor, "link", "add", vif, "type", "veth", "peer", "name", "ceth0",
    ]);
    ip(&["-n", tor, "link", "set", "ceth0", "netns", ns]);
    ip(&["-n", tor, "link", "set", vif, "up"]);
    ip(&[
        "-n", ns, "link", "set", "ceth0", "address", mac, "name", "eth0",
    ]);
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{addr}/32"),
        "dev",
        "eth0",
    ]);
    ip(&["-n", ns, "link", "set", "eth0", "up"]);
    ip(&["-n", ns, "link", "set", "lo", "up"]);
    ip(&[
        "-n",
        ns,
        "route",
        "add",
        "10.137.0.20",
        "dev",
        "eth0",
        "scope",
        "link",
    ]);
    ip(&[
        "-n",
        ns,
        "route",
        "add",
        "default",
        "via",
        "10.137.0.20",
        "dev",
        "eth0",
        "onlink",
    ]);
}

fn config(net: &TorNet, dir: &Path) -> String {
    format!(
        "uplink: {{name: lo}}\n\
         qubesdb:\n  /qubes-ip: 10.137.0.20\n  /qubes-gateway: 10.137.0.19\n\
         \x20 /qubes-netvm-gateway: 10.137.0.20\n\
         \x20 /qubes-firewall/10.137.0.30: \"\"\n  /qubes-firewall/10.137.0.30/policy: accept\n\
         \x20 /qubes-firewall/10.137.0.31: \"\"\n  /qubes-firewall/10.137.0.31/policy: accept\n\
         vifs:\n  - {{name: vif1.0, ip: 10.137.0.30, mac: \"00:16:3e:5e:6c:30\"}}\n\
         \x20 - {{name: vif2.0, ip: 10.137.0.31, mac: \"00:16:3e:5e:6c:31\"}}\n\
         tor:\n  state_dir: {d}/arti/state\n  cache_dir: {d}/arti/cache\n\
         \x20 trust_storage_permissions: true\n\
         \x20 network: {}\n",
        net.network_yaml(),
        d = dir.display()
    )
}

/// In a program the test binary ran again: does its job and says so (true).
pub fn child_role() -> bool {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return false;
    };
    if let Some(log) = role.strip_prefix("serve ") {
        serve_world(Path::new(log));
    } else if let Some(q) = role.strip_prefix("dns ") {
        dns_probe(q);
    }
    true
}

impl Setup {
    /// The namespaces, the world's servers and the private Tor network, started; sys-whonix's
    /// configuration written (not started). `rerun`: the arguments that make the test binary
    /// run this test again.
    pub fn new(prefix: &str, rerun: &[&str]) -> (Setup, TorNet) {
        let dir = tempfile::tempdir().expect("tempdir");
        let udp_log = dir.path().join("udp-sink.log");
        let mut s = Setup {
            tag: format!("{prefix}{}", std::process::id()),
            dir,
            procs: Vec::new(),
            gateway: None,
            rerun: rerun.iter().map(|a| a.to_string()).collect(),
            udp_log,
        };
        let tor_ns = s.ns("tor");
        ip(&["netns", "add", &tor_ns]);
        ip(&["-n", &tor_ns, "link", "set", "lo", "up"]);
        ip(&["-n", &tor_ns, "addr", "add", "198.18.0.10/32", "dev", "lo"]);
        client_ns(
            &tor_ns,
            &s.ns("anon1"),
            "vif1.0",
            "10.137.0.30",
            "00:16:3e:5e:6c:30",
        );
        client_ns(
            &tor_ns,
            &s.ns("anon2"),
            "vif2.0",
            "10.137.0.31",
            "00:16:3e:5e:6c:31",
        );
        let world = Command::new("ip")
            .args(["netns", "exec", &tor_ns])
            .arg(std::env::current_exe().expect("exe"))
            .args(&s.rerun)
            .env(ROLE_ENV, format!("serve {}", s.udp_log.display()))
            .stdout(Stdio::null())
            .spawn()
            .expect("world servers");
        s.procs.push(world);
        let dnsmasq = Command::new("ip")
            .args([
                "netns",
                "exec",
                &tor_ns,
                "dnsmasq",
                "--no-daemon",
                "--conf-file=/dev/null",
            ])
            .args(["--no-resolv", "--no-hosts", "--bind-interfaces"])
            .args(["--listen-address=127.0.0.1", "--port=53"])
            .arg("--host-record=web.example,198.18.0.10")
            .arg(format!(
                "--pid-file={}",
                s.dir.path().join("dnsmasq.pid").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (scripts/setup-debian.sh installs dnsmasq-base)");
        s.procs.push(dnsmasq);
        let net = TorNet::start(&s.dir.path().join("net"), &tor_ns).expect("the private network");
        std::fs::write(
            s.dir.path().join("sys-whonix.yaml"),
            config(&net, s.dir.path()),
        )
        .expect("config");
        (s, net)
    }
}
