//! `sys-net run` on real interfaces, in namespaces the test creates: a world (a router at
//! 198.18.0.1 and a DNS server, dnsmasq, at 198.18.0.53), sys-net with its uplink toward it and
//! one vif, and a client qube (sys-firewall's place) behind the vif. The kernel of the sys-net
//! namespace holds no address and forwards nothing: everything the client reaches, it reaches
//! through the service.
//!
//! The test runs itself again inside the client's namespace (`ip netns exec`) for what needs a
//! socket there (a DNS query).

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const SYS_NET: &str = env!("CARGO_BIN_EXE_sys-net");
const CHILD_ENV: &str = "SYS_NET_TEST_DNS_QUERY";
static COUNTER: AtomicU32 = AtomicU32::new(0);

use testkit::ip;

fn output(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("spawn");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The namespaces and processes of one test, removed on drop.
struct Lab {
    tag: String,
    dir: tempfile::TempDir,
    procs: Vec<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        for n in ["net", "world", "client"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(n)])
                .output();
        }
    }
}

impl Lab {
    fn ns(&self, which: &str) -> String {
        format!("{}-{which}", self.tag)
    }

    fn new() -> Lab {
        let tag = format!(
            "sn{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let lab = Lab {
            tag,
            dir: tempfile::tempdir().expect("tempdir"),
            procs: Vec::new(),
        };
        let (net, world, client) = (lab.ns("net"), lab.ns("world"), lab.ns("client"));
        for n in [&net, &world, &client] {
            ip(&["netns", "add", n]);
        }
        // sys-net's uplink, toward the world's router.
        ip(&[
            "-n", &net, "link", "add", "eth0", "type", "veth", "peer", "name", "weth0",
        ]);
        ip(&["-n", &net, "link", "set", "weth0", "netns", &world]);
        ip(&["-n", &world, "addr", "add", "198.18.0.1/24", "dev", "weth0"]);
        ip(&[
            "-n",
            &world,
            "addr",
            "add",
            "198.18.0.53/24",
            "dev",
            "weth0",
        ]);
        ip(&["-n", &world, "link", "set", "weth0", "up"]);
        ip(&["-n", &world, "link", "set", "lo", "up"]);
        // The client's vif, and its own end as setup-ip configures it.
        ip(&[
            "-n", &net, "link", "add", "vif6.0", "type", "veth", "peer", "name", "ceth0",
        ]);
        ip(&["-n", &net, "link", "set", "ceth0", "netns", &client]);
        ip(&[
            "-n",
            &client,
            "link",
            "set",
            "ceth0",
            "address",
            "00:16:3e:5e:6c:00",
            "name",
            "eth0",
        ]);
        ip(&["-n", &client, "addr", "add", "10.137.0.6/32", "dev", "eth0"]);
        ip(&["-n", &client, "link", "set", "eth0", "up"]);
        ip(&["-n", &client, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &client,
            "route",
            "add",
            "10.137.0.5",
            "dev",
            "eth0",
            "scope",
            "link",
        ]);
        ip(&[
            "-n",
            &client,
            "route",
            "add",
            "default",
            "via",
            "10.137.0.5",
            "dev",
            "eth0",
            "onlink",
        ]);
        for l in ["eth0", "vif6.0"] {
            ip(&["-n", &net, "link", "set", l, "up"]);
        }
        lab
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn start_dns(&mut self) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns("world"), "dnsmasq", "--no-daemon"])
            .args(["--conf-file=/dev/null", "--no-resolv", "--no-hosts"])
            .args([
                "--bind-interfaces",
                "--listen-address=198.18.0.53",
                "--port=53",
            ])
            .args(["--address=/web.test/198.18.0.10"])
            .arg(format!("--pid-file={}", self.path("dnsmasq.pid").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dnsmasq");
        self.procs.push(child);
    }

    /// dnsmasq as the world's DHCP server on the uplink's segment (DHCP only: DNS off), with
    /// a short T1 and T2 (options 58 and 59) so that a renewal happens within the test.
    fn start_dhcp(&mut self) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns("world"), "dnsmasq", "--no-daemon"])
            .args(["--conf-file=/dev/null", "--port=0", "--interface=weth0"])
            .args(["--bind-interfaces", "--log-dhcp"])
            .args(["--dhcp-range=198.18.0.100,198.18.0.150,255.255.255.0,2m"])
            .args(["--dhcp-option=option:router,198.18.0.1"])
            .args(["--dhcp-option=option:dns-server,198.18.0.53"])
            .args(["--dhcp-option=58,4", "--dhcp-option=59,7"])
            .arg(format!(
                "--dhcp-leasefile={}",
                self.path("leases").display()
            ))
            .arg(format!(
                "--log-facility={}",
                self.path("dnsmasq-dhcp.log").display()
            ))
            .arg(format!(
                "--pid-file={}",
                self.path("dnsmasq-dhcp.pid").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dnsmasq (DHCP)");
        self.procs.push(child);
    }

    fn wait_status(&self, what: &str, pred: impl Fn(&str) -> bool, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{what} within {secs} s; status:\n{s}\nlog:\n{}",
                std::fs::read_to_string(self.path("sys-net.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `sys-net run --qubesdb SOCK --uplink eth0`.
    fn start_qubesdb(&mut self, sock: &Path) -> usize {
        let control = self.path("control.sock");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns("net"),
                SYS_NET,
                "run",
                "--qubesdb",
            ])
            .arg(sock)
            .args(["--uplink", "eth0", "--control"])
            .arg(&control)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.path("sys-net.log")).expect("log"))
            .spawn()
            .expect("start sys-net");
        self.procs.push(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !control.exists() {
            assert!(Instant::now() < deadline, "sys-net did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.procs.len() - 1
    }

    fn start(&mut self, config: &str) -> usize {
        let cfg = self.path("sys-net.yaml");
        std::fs::write(&cfg, config).expect("write config");
        let control = self.path("control.sock");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns("net"), SYS_NET, "run", "--config"])
            .arg(&cfg)
            .arg("--control")
            .arg(&control)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.path("sys-net.log")).expect("log"))
            .spawn()
            .expect("start sys-net");
        self.procs.push(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !control.exists() {
            assert!(
                Instant::now() < deadline,
                "sys-net did not start: {}",
                std::fs::read_to_string(self.path("sys-net.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.procs.len() - 1
    }

    fn status(&self) -> String {
        output(
            Command::new(SYS_NET)
                .arg("status")
                .arg("--control")
                .arg(self.path("control.sock")),
        )
        .1
    }

    fn ping(&self, dst: &str) -> (bool, String) {
        output(Command::new("ip").args([
            "netns",
            "exec",
            &self.ns("client"),
            "ping",
            "-c1",
            "-W2",
            "-n",
            dst,
        ]))
    }

    /// A DNS query for web.test from the client to `server`, answered (or not) within 2 s.
    fn dns(&self, server: &str) -> String {
        let (_, text) = output(
            Command::new("ip")
                .args(["netns", "exec", &self.ns("client")])
                .arg(std::env::current_exe().expect("current_exe"))
                .args(["--exact", "dns_query_child", "--nocapture"])
                .env(CHILD_ENV, server),
        );
        text.lines()
            .find_map(|l| l.strip_prefix("DNS: "))
            .unwrap_or("no result")
            .to_string()
    }
}

const CONFIG: &str = "\
uplink: {name: eth0, address: 198.18.0.100, router: 198.18.0.1, dns: [198.18.0.53]}
qubesdb:
  /qubes-netvm-network: 10.137.0.5
  /qubes-netvm-gateway: 10.137.0.5
  /qubes-netvm-netmask: 255.255.255.255
  /qubes-netvm-primary-dns: 10.139.1.1
  /qubes-netvm-secondary-dns: 10.139.1.2
  /qubes-firewall/10.137.0.6: ''
  /qubes-firewall/10.137.0.6/policy: drop
  /qubes-firewall/10.137.0.6/0000: action=accept
vifs:
  - {name: vif6.0, ip: 10.137.0.6, mac: '00:16:3e:5e:6c:00'}
";

/// Not a test of its own: run inside the client's namespace by [`Lab::dns`].
#[test]
fn dns_query_child() {
    let Some(server) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let server = server.to_string_lossy().to_string();
    // A query for web.test A (RFC 1035 4.1), id 0x5151, recursion desired.
    let mut q = vec![0x51, 0x51, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["web", "test"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    sock.connect(format!("{server}:53")).expect("connect");
    sock.send(&q).expect("send");
    let mut buf = [0u8; 512];
    match sock.recv(&mut buf) {
        // The answer's address is the last 4 bytes of its only A record.
        Ok(n) if n >= 16 && buf[..2] == [0x51, 0x51] => {
            let a = &buf[n - 4..n];
            println!("DNS: answer {}.{}.{}.{}", a[0], a[1], a[2], a[3]);
        }
        Ok(n) => println!("DNS: bad answer of {n} bytes"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            println!("DNS: refused")
        }
        Err(e) => println!("DNS: error {e}"),
    }
}

#[test]
fn sys_net_serves_its_client_with_the_kernel_out_of_the_way() {
    if !testkit::require_root("sys_net_serves_its_client_with_the_kernel_out_of_the_way") {
        return;
    }
    if Command::new("dnsmasq").arg("--version").output().is_err() {
        testkit::not_run(
            "sys_net_serves_its_client_with_the_kernel_out_of_the_way",
            "dnsmasq is not installed (scripts/setup-debian.sh installs it)",
        );
        return;
    }
    let mut lab = Lab::new();
    lab.start_dns();
    let svc = lab.start(CONFIG);

    let status = lab.status();
    assert!(status.contains("addressing static"), "{status}");
    assert!(status.contains("dns 10.139.1.1 -> 198.18.0.53"), "{status}");
    assert!(status.contains("dns 10.139.1.2 -> 198.18.0.53"), "{status}");

    // The gateway answers, and the world is reached through NAT: the world has no route to
    // 10.137.0.0/16, so an answer means the source was sys-net's lease.
    let (ok, text) = lab.ping("10.137.0.5");
    assert!(ok, "ping of the gateway: {text}");
    let (ok, text) = lab.ping("198.18.0.1");
    assert!(ok, "ping of the world's router through sys-net: {text}");
    // Both virtual resolvers lead to the one upstream server.
    for server in ["10.139.1.1", "10.139.1.2"] {
        let mut answer = String::new();
        // dnsmasq may still be starting.
        for _ in 0..10 {
            answer = lab.dns(server);
            if answer.starts_with("answer") {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(answer, "answer 198.18.0.10", "query to {server}");
    }

    // The kernel of sys-net's namespace holds no address on the uplink or the vif, and does
    // not forward.
    for dev in ["eth0", "vif6.0"] {
        let (_, addrs) = output(Command::new("ip").args([
            "-n",
            &lab.ns("net"),
            "-o",
            "addr",
            "show",
            "dev",
            dev,
        ]));
        assert!(
            !addrs.contains("inet"),
            "the kernel holds an address on {dev}: {addrs}"
        );
    }
    let (_, fwd) = output(Command::new("ip").args([
        "netns",
        "exec",
        &lab.ns("net"),
        "cat",
        "/proc/sys/net/ipv4/ip_forward",
    ]));
    assert_eq!(fwd.trim(), "0", "the kernel forwards");

    // Killed outright, it leaves nothing forwarding.
    let child = &mut lab.procs[svc];
    let _ = Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let (ok, text) = lab.ping("198.18.0.1");
    assert!(!ok, "the world is still reached with sys-net dead: {text}");
    assert!(Path::new(&lab.path("sys-net.log")).exists());
}

#[test]
fn without_an_upstream_resolver_dns_is_refused_at_once() {
    if !testkit::require_root("without_an_upstream_resolver_dns_is_refused_at_once") {
        return;
    }
    let mut lab = Lab::new();
    lab.start(&CONFIG.replace("dns: [198.18.0.53]", "dns: []"));
    let status = lab.status();
    assert!(
        status.contains("dns 10.139.1.1 -> refused (no upstream)"),
        "{status}"
    );
    // Refused, not timed out: the client's socket gets ECONNREFUSED from the port
    // unreachable, where a drop would leave it waiting out its 2 s.
    let answer = lab.dns("10.139.1.1");
    assert_eq!(answer, "refused", "{}", lab.status());
}

#[test]
fn a_dhcp_lease_is_used_renewed_and_given_back() {
    let name = "a_dhcp_lease_is_used_renewed_and_given_back";
    if !testkit::require_root(name) {
        return;
    }
    if Command::new("dnsmasq").arg("--version").output().is_err() {
        testkit::not_run(
            name,
            "dnsmasq is not installed (scripts/setup-debian.sh installs it)",
        );
        return;
    }
    let mut lab = Lab::new();
    lab.start_dns();
    lab.start_dhcp();
    let svc = lab.start(&CONFIG.replace(
        "uplink: {name: eth0, address: 198.18.0.100, router: 198.18.0.1, dns: [198.18.0.53]}",
        "uplink: {name: eth0}",
    ));
    // dnsmasq pings an address before it offers it (about 3 s).
    let status = lab.wait_status("a lease", |s| s.contains("addressing dhcp"), 20);
    let lease_line = status
        .lines()
        .find(|l| l.starts_with("dhcp Bound lease "))
        .unwrap_or_else(|| panic!("no lease line: {status}"));
    let addr: std::net::Ipv4Addr = lease_line
        .split_whitespace()
        .nth(3)
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {lease_line}"));
    assert!(
        (100..=150).contains(&addr.octets()[3]) && addr.octets()[..3] == [198, 18, 0],
        "{lease_line}"
    );
    assert!(lease_line.contains("router 198.18.0.1"), "{lease_line}");
    assert!(status.contains("dns 10.139.1.1 -> 198.18.0.53"), "{status}");

    // The lease is in use: the world through NAT, DNS through the server DHCP named.
    let (ok, text) = lab.ping("198.18.0.1");
    assert!(ok, "ping through the leased uplink: {text}");
    assert_eq!(lab.dns("10.139.1.1"), "answer 198.18.0.10");

    // Renewed at T1 (4 s): dnsmasq answers a DHCPREQUEST from the leased address.
    let log = lab.path("dnsmasq-dhcp.log");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let acks = text.matches("DHCPACK(weth0)").count();
        if acks >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no renewal seen by dnsmasq:\n{text}\nstatus:\n{}",
            lab.status()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (ok, text) = lab.ping("198.18.0.1");
    assert!(ok, "the uplink after the renewal: {text}");

    // A clean stop gives the lease back.
    let pid = lab.procs[svc].id();
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = lab.procs[svc].wait();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("DHCPRELEASE(weth0)") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no release seen by dnsmasq:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_uplink_that_disappears_and_comes_back_is_picked_up_again() {
    let name = "an_uplink_that_disappears_and_comes_back_is_picked_up_again";
    if !testkit::require_root(name) {
        return;
    }
    let mut lab = Lab::new();
    lab.start(CONFIG);
    let (ok, text) = lab.ping("198.18.0.1");
    assert!(ok, "before: {text}");
    // The NIC goes away (a driver unloaded, a USB adapter pulled) and comes back as a new
    // netdev with the same name.
    let (net, world) = (lab.ns("net"), lab.ns("world"));
    ip(&["-n", &net, "link", "del", "eth0"]);
    std::thread::sleep(Duration::from_millis(500));
    let (ok, _) = lab.ping("198.18.0.1");
    assert!(!ok, "the world is reached with no uplink");
    ip(&[
        "-n", &net, "link", "add", "eth0", "type", "veth", "peer", "name", "weth0",
    ]);
    ip(&["-n", &net, "link", "set", "weth0", "netns", &world]);
    ip(&["-n", &world, "addr", "add", "198.18.0.1/24", "dev", "weth0"]);
    ip(&["-n", &world, "link", "set", "weth0", "up"]);
    ip(&["-n", &net, "link", "set", "eth0", "up"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, text) = lab.ping("198.18.0.1");
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the uplink was not picked up again: {text}\n{}\n{}",
            lab.status(),
            std::fs::read_to_string(lab.path("sys-net.log")).unwrap_or_default()
        );
    }
}

/// With QubesDB, sys-net tells dom0 its external address as Qubes' NetworkManager dispatcher
/// does (`/qubes-netvm-external-ip`: the address when the uplink is up, empty when down).
#[test]
fn the_external_address_is_written_to_qubesdb() {
    let name = "the_external_address_is_written_to_qubesdb";
    if !testkit::require_root(name) {
        return;
    }
    if Command::new("dnsmasq").arg("--version").output().is_err() {
        testkit::not_run(
            name,
            "dnsmasq is not installed (scripts/setup-debian.sh installs it)",
        );
        return;
    }
    let mut lab = Lab::new();
    lab.start_dhcp();
    let sock = lab.path("qubesdb.sock");
    let tree = qubesdb::tree::Tree::from_entries([
        ("/qubes-netvm-network", "10.137.0.5"),
        ("/qubes-netvm-gateway", "10.137.0.5"),
        ("/qubes-vif/vif6.0/ip", "10.137.0.6"),
        ("/qubes-vif/vif6.0/mac", "00:16:3e:5e:6c:00"),
        ("/qubes-firewall/10.137.0.6", ""),
        ("/qubes-firewall/10.137.0.6/policy", "accept"),
    ])
    .expect("tree");
    let _server = qubesdb::server::Server::bind(&sock)
        .expect("bind")
        .with_tree(tree)
        .spawn()
        .expect("qubesdb");
    let svc = lab.start_qubesdb(&sock);
    let mut c = qubesdb::client::Client::connect(&sock).expect("client");
    let read = |c: &mut qubesdb::client::Client| {
        c.read("/qubes-netvm-external-ip")
            .expect("read")
            .map(|v| String::from_utf8_lossy(&v).to_string())
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr = loop {
        if let Some(a) = read(&mut c).filter(|a| !a.is_empty()) {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "no external address written; status:\n{}\nlog:\n{}",
            lab.status(),
            std::fs::read_to_string(lab.path("sys-net.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(addr.starts_with("198.18.0.1"), "{addr}");
    assert!(
        lab.status().contains(&format!("lease {addr}/")),
        "{}",
        lab.status()
    );
    // A clean stop gives the lease back and says the uplink is down.
    let pid = lab.procs[svc].id();
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = lab.procs[svc].wait();
    assert_eq!(read(&mut c).as_deref(), Some(""));
}
