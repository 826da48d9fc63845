//! The DHCP client against the real dnsmasq: a lease, a renewal at T1 (unicast), a rebinding
//! at T2 (broadcast), INIT-REBOOT after a link flap, a NAK to a wrong remembered address, and
//! a release that dnsmasq takes out of its lease file.
//!
//! The test makes a network namespace of its own (its name has the process id) and runs itself
//! again inside it with `ip netns exec`; there a veth pair joins dnsmasq's end `dhcps`
//! (198.18.0.1/24) and the client's end `dhcpc` (no address), and the client's payloads go out
//! over an AF_PACKET socket on `dhcpc` in Ethernet/IPv4/UDP frames the test builds (and
//! answers ARP for the leased address, as the engine would). dnsmasq runs only in the
//! namespace and is killed on the way out, the namespace deleted.
//!
//! dnsmasq keeps real time and its shortest lease is two minutes, so the client's clock is
//! moved ahead (it takes any `Instant`) to reach T1 and T2 at once.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant as StdInstant};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use qubes_engine::Instant;
use qubes_service_runtime::dhcp::{DhcpClient, DhcpConfig, DhcpEffect, DhcpState, Lease};
use vif_backend::afpacket::PacketSocket;
use vif_backend::{Device, RxBurst};

const CHILD_ENV: &str = "QUBES_RUNTIME_DHCP_DNSMASQ_CHILD";
const NAME: &str = "dnsmasq_leases_renews_rebinds_and_releases";
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Lines of the child's stderr with this prefix are shown by the parent.
const REPORT: &str = "dhcp_dnsmasq:";

#[test]
fn dnsmasq_leases_renews_rebinds_and_releases() {
    if std::env::var_os(CHILD_ENV).is_some() {
        child();
        return;
    }
    if !testkit::require_root(NAME) {
        return;
    }
    if Command::new("dnsmasq").arg("--version").output().is_err() {
        testkit::not_run(
            NAME,
            "dnsmasq not found (scripts/setup-debian.sh installs it)",
        );
        return;
    }
    let ns = Netns::new(format!("dhcpt-{}", std::process::id()));
    let result = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(std::env::current_exe().expect("current_exe"))
        .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .expect("run the test inside the namespace");
    let stdout = String::from_utf8_lossy(&result.stdout);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        result.status.success(),
        "the test failed inside namespace {}:\n{stdout}\n{stderr}",
        ns.0
    );
    assert!(
        stdout.contains("1 passed"),
        "the child did not run the test:\n{stdout}"
    );
    // Past libtest's capture, so the figures show for a passing test.
    for l in stderr.lines().filter(|l| l.starts_with(REPORT)) {
        let _ = writeln!(std::io::stderr(), "{l}");
    }
}

/// The namespace, deleted when the test ends however it ends.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Self {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name]);
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// dnsmasq, killed when the test ends however it ends.
struct Dnsmasq {
    child: Child,
    log: PathBuf,
}

impl Dnsmasq {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mac_of(ifname: &str) -> [u8; 6] {
    let s = std::fs::read_to_string(format!("/sys/class/net/{ifname}/address")).expect("mac");
    let mut mac = [0u8; 6];
    for (m, h) in mac.iter_mut().zip(s.trim().split(':')) {
        *m = u8::from_str_radix(h, 16).expect("hex");
    }
    mac
}

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Waits until `f` holds, or panics after `secs` saying `what`.
fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let end = StdInstant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(StdInstant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Moves the client's payloads over the packet socket, with a clock that can be moved ahead.
struct Driver {
    sock: PacketSocket,
    mac: [u8; 6],
    server_mac: Option<[u8; 6]>,
    leased: Option<Ipv4Addr>,
    epoch: StdInstant,
    ahead: Duration,
    first_send: Option<StdInstant>,
    burst: RxBurst,
}

impl Driver {
    fn now(&self) -> Instant {
        let d = self.epoch.elapsed() + self.ahead;
        Instant::from_nanos(d.as_nanos() as u64)
    }

    /// Moves the clock to `t` (never back).
    fn jump_to(&mut self, t: Instant) {
        let now = self.now();
        self.ahead += t.saturating_duration_since(now);
    }

    fn send(&mut self, src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) {
        self.first_send.get_or_insert_with(StdInstant::now);
        let dst_mac = if dst == Ipv4Addr::BROADCAST {
            [0xff; 6]
        } else {
            self.server_mac
                .expect("the server's MAC, learned from its replies")
        };
        let b = PacketBuilder::ethernet2(self.mac, dst_mac)
            .ipv4(src.octets(), dst.octets(), 64)
            .udp(68, 67);
        let mut f = Vec::new();
        b.write(&mut f, payload).expect("build");
        self.sock.send(&f).expect("send");
    }

    /// Answers an ARP request for the leased address (RFC 826), so dnsmasq's unicast replies
    /// to a renewing client reach it.
    fn arp(&mut self, f: &[u8]) {
        let Some(leased) = self.leased else { return };
        if f.len() < 42 || f[12..14] != [0x08, 0x06] || f[20..22] != [0, 1] {
            return;
        }
        if f[38..42] != leased.octets() {
            return;
        }
        let mut r = Vec::with_capacity(42);
        r.extend_from_slice(&f[22..28]);
        r.extend_from_slice(&self.mac);
        r.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
        r.extend_from_slice(&self.mac);
        r.extend_from_slice(&leased.octets());
        r.extend_from_slice(&f[22..32]);
        self.sock.send(&r).expect("send arp");
    }

    /// Runs the client until it reports something other than a send, or `secs` pass.
    fn pump(&mut self, c: &mut DhcpClient, secs: u64, dnsmasq: &Dnsmasq) -> Vec<DhcpEffect> {
        self.pump_until(c, secs, dnsmasq, |_, reported| !reported.is_empty())
    }

    /// Runs the client until `done` holds, or `secs` pass.
    fn pump_until(
        &mut self,
        c: &mut DhcpClient,
        secs: u64,
        dnsmasq: &Dnsmasq,
        done: impl Fn(&DhcpClient, &[DhcpEffect]) -> bool,
    ) -> Vec<DhcpEffect> {
        let end = StdInstant::now() + Duration::from_secs(secs);
        let mut out = Vec::new();
        let mut reported = Vec::new();
        loop {
            let now = self.now();
            if c.next_deadline().is_some_and(|d| d <= now) {
                c.poll(now, &mut out);
            }
            self.burst.clear();
            let _ = self.sock.recv_burst(&mut self.burst, 64).expect("recv");
            let frames: Vec<Vec<u8>> = (0..self.burst.len())
                .filter_map(|i| self.burst.frame(i).map(|(f, _)| f.to_vec()))
                .collect();
            for f in frames {
                self.arp(&f);
                let Ok(p) = SlicedPacket::from_ethernet(&f) else {
                    continue;
                };
                let (Some(NetSlice::Ipv4(_)), Some(TransportSlice::Udp(u))) =
                    (&p.net, &p.transport)
                else {
                    continue;
                };
                if u.destination_port() != 68 {
                    continue;
                }
                self.server_mac = Some([f[6], f[7], f[8], f[9], f[10], f[11]]);
                c.handle(self.now(), u.payload(), &mut out);
            }
            for e in out.drain(..) {
                match e {
                    DhcpEffect::Send { src, dst, payload } => {
                        self.send(src, dst, &payload);
                    }
                    other => reported.push(other),
                }
            }
            if done(c, &reported) {
                return reported;
            }
            assert!(
                StdInstant::now() < end,
                "no lease news in {secs} s, client {:?}; dnsmasq says:\n{}",
                c.state(),
                dnsmasq.log()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn bound(&mut self, c: &mut DhcpClient, dnsmasq: &Dnsmasq) -> Lease {
        let e = self.pump(c, 30, dnsmasq);
        let [DhcpEffect::Bound(l)] = e.as_slice() else {
            panic!(
                "expected a lease, got {e:?}; dnsmasq says:\n{}",
                dnsmasq.log()
            )
        };
        self.leased = Some(l.address);
        l.clone()
    }
}

fn lease_file_has(path: &Path, mac: &[u8; 6]) -> Option<String> {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let mac = mac_text(mac);
    s.lines().find(|l| l.contains(&mac)).map(str::to_string)
}

fn child() {
    run(&["ip", "link", "set", "lo", "up"]);
    run(&[
        "ip", "link", "add", "dhcps", "type", "veth", "peer", "name", "dhcpc",
    ]);
    for l in ["dhcps", "dhcpc"] {
        // No IPv6 chatter of the kernel's own on the link.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{l}/disable_ipv6"), "1");
    }
    run(&["ip", "addr", "add", "198.18.0.1/24", "dev", "dhcps"]);
    run(&["ip", "link", "set", "dhcps", "up"]);
    run(&["ip", "link", "set", "dhcpc", "up"]);
    wait_for("dhcpc to come up", 10, || {
        std::fs::read_to_string("/sys/class/net/dhcpc/operstate").is_ok_and(|s| s.trim() == "up")
    });

    let dir = tempfile::tempdir().expect("tempdir");
    let leases = dir.path().join("leases");
    let log = dir.path().join("dnsmasq.log");
    let child = Command::new("dnsmasq")
        .args([
            "--no-daemon",
            "--conf-file=/dev/null",
            "--interface=dhcps",
            "--bind-interfaces",
            "--dhcp-range=198.18.0.100,198.18.0.150,255.255.255.0,2m",
            "--dhcp-option=option:router,198.18.0.1",
            "--dhcp-option=option:dns-server,198.18.0.53",
            "--log-dhcp",
            "--port=0",
        ])
        .arg(format!("--dhcp-leasefile={}", leases.display()))
        .arg(format!("--log-facility={}", log.display()))
        .arg(format!("--pid-file={}", dir.path().join("pid").display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start dnsmasq");
    let dnsmasq = Dnsmasq { child, log };
    // Ready when something listens on UDP port 67 (0x0043) in this namespace.
    wait_for("dnsmasq on port 67", 10, || {
        std::fs::read_to_string("/proc/net/udp").is_ok_and(|s| s.contains(":0043 "))
    });

    let mac = mac_of("dhcpc");
    let mut d = Driver {
        sock: PacketSocket::open("dhcpc").expect("open dhcpc"),
        mac,
        server_mac: None,
        leased: None,
        epoch: StdInstant::now(),
        ahead: Duration::ZERO,
        first_send: None,
        burst: RxBurst::new(),
    };
    let mut c = DhcpClient::new(DhcpConfig::new(mac, std::process::id().into()), d.now());

    // DISCOVER, OFFER, REQUEST, ACK.
    let l = d.bound(&mut c, &dnsmasq);
    let took = d.first_send.map(|t| t.elapsed()).unwrap_or_default();
    eprintln!("{REPORT} first DISCOVER to Bound with dnsmasq: {took:?}");
    let lo = Ipv4Addr::new(198, 18, 0, 100);
    let hi = Ipv4Addr::new(198, 18, 0, 150);
    assert!((lo..=hi).contains(&l.address), "{l:?}");
    assert_eq!(l.prefix_len, 24);
    assert_eq!(l.router, Some(SERVER));
    assert_eq!(l.dns, vec![Ipv4Addr::new(198, 18, 0, 53)]);
    assert_eq!(l.server, SERVER);
    assert_eq!(l.lease_secs, 120, "dnsmasq's 2m");
    assert_eq!((l.t1_secs, l.t2_secs), (60, 105));
    assert_eq!(c.state(), DhcpState::Bound);
    let line = lease_file_has(&leases, &mac).expect("dnsmasq recorded the lease");
    assert!(line.contains(&l.address.to_string()), "{line}");
    // No host name went out: dnsmasq records `*` for it.
    assert_eq!(line.split(' ').nth(3), Some("*"), "{line}");

    // Before offering, dnsmasq pinged the address (its ICMP check, the ~3 s above) while
    // nothing held it, which left a FAILED neighbour entry for it on `dhcps`; the kernel
    // drops unicast to such an entry for a while. On a real network T1 comes minutes later,
    // long after that entry is gone; here it comes at once, so the entry is flushed.
    run(&["ip", "neigh", "flush", "dev", "dhcps"]);

    // T1: a unicast REQUEST from the leased address, answered by an ACK.
    d.jump_to(l.t1().expect("finite"));
    let mut out = Vec::new();
    c.poll(d.now(), &mut out);
    let [DhcpEffect::Send { src, dst, payload }] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!((*src, *dst), (l.address, SERVER), "renewal is unicast");
    assert_eq!(c.state(), DhcpState::Renewing);
    d.send(*src, *dst, payload);
    out.clear();
    let renewed = d.bound(&mut c, &dnsmasq);
    assert_eq!(renewed.address, l.address);
    assert!(renewed.acquired > l.acquired);
    eprintln!("{REPORT} renewed at T1 (unicast): {}", renewed.address);

    // T2: a broadcast REQUEST, answered too.
    d.jump_to(renewed.t2().expect("finite"));
    c.poll(d.now(), &mut out);
    let [DhcpEffect::Send { src, dst, payload }] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(
        (*src, *dst),
        (l.address, Ipv4Addr::BROADCAST),
        "rebinding broadcasts"
    );
    assert_eq!(c.state(), DhcpState::Rebinding);
    d.send(*src, *dst, payload);
    out.clear();
    let rebound = d.bound(&mut c, &dnsmasq);
    assert_eq!(rebound.address, l.address);
    eprintln!("{REPORT} rebound at T2 (broadcast): {}", rebound.address);

    // The carrier goes and comes back: INIT-REBOOT asks for the address again, broadcast,
    // and dnsmasq confirms it.
    c.link_down(d.now());
    c.link_up(d.now(), &mut out);
    let [DhcpEffect::Send { src, dst, payload }] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!((*src, *dst), (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST));
    assert_eq!(c.state(), DhcpState::Rebooting);
    d.send(*src, *dst, payload);
    out.clear();
    let rebooted = d.bound(&mut c, &dnsmasq);
    assert_eq!(rebooted.address, l.address);
    eprintln!(
        "{REPORT} confirmed after a link flap (INIT-REBOOT): {}",
        rebooted.address
    );

    // The same client restarted, remembering an address that is not its lease: dnsmasq
    // knows the client, says no (a NAK, RFC 2131 section 4.3.2) and it starts over from INIT.
    // (A client dnsmasq has no record of gets silence, as the RFC wants of a server that is
    // not authoritative.)
    let wrong = if l.address == hi { lo } else { hi };
    let mut restarted = DhcpClient::with_previous(DhcpConfig::new(mac, 7), wrong, d.now());
    d.pump_until(&mut restarted, 15, &dnsmasq, |c, _| {
        c.state() == DhcpState::Init
    });
    assert!(dnsmasq.log().contains("DHCPNAK"), "{}", dnsmasq.log());
    eprintln!("{REPORT} a wrong remembered address ({wrong}) got a NAK");

    // Release: dnsmasq forgets the lease (still there until then).
    assert!(
        lease_file_has(&leases, &mac).is_some_and(|line| line.contains(&l.address.to_string())),
        "the lease survived the NAK to the wrong address"
    );
    c.release(&mut out);
    let mut unbound = false;
    for e in out.drain(..) {
        match e {
            DhcpEffect::Send { src, dst, payload } => {
                assert_eq!((src, dst), (l.address, SERVER), "release is unicast");
                d.send(src, dst, &payload);
            }
            DhcpEffect::Unbound => unbound = true,
            DhcpEffect::Bound(l) => panic!("bound on release: {l:?}"),
        }
    }
    assert!(unbound);
    assert_eq!(c.state(), DhcpState::Released);
    wait_for("dnsmasq to drop the released lease", 10, || {
        lease_file_has(&leases, &mac).is_none()
    });
    let log = dnsmasq.log();
    assert!(log.contains("DHCPRELEASE"), "{log}");
    eprintln!("{REPORT} released; dnsmasq's lease file no longer has it");
}
