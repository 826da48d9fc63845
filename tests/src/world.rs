//! The world: a namespace behind the uplink qube that plays the internet, with addresses in
//! 198.18.0.0/24 only: a router address, a web server, a DNS server, and, for sys-whonix, a
//! private Tor network. Nothing in it leads to the host's own network.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use testkit::tornet::TorNet;

use crate::cmd::{err, in_path, Cmd, Error, Result};
use crate::netvm::{self_exe, write_resolv_conf};
use crate::probe::Outcome;
use crate::procs;
use crate::state::Paths;
use crate::topology::world::{
    DNS_IP, ECHO_PORT, HTTP_PORTS, IFNAME, IPERF_PORT, PREFIX_LEN, ROUTER_IP, TOR_FIRST_RELAY,
    WEB_IP, WEB_NAME,
};
use crate::topology::{world_ns, Topology};

/// Processes the world runs: (pid-file name, what it is).
pub const PROCESSES: [(&str, &str); 3] = [
    ("dnsmasq", "DNS server 198.18.0.53 (web.test)"),
    ("serve-http", "HTTP 198.18.0.10:80,443, echo :8080"),
    ("iperf3", "iperf3 server 198.18.0.10:5201"),
];

/// The world's DHCP range for sys-net's uplink (`--netvm rust`): clear of the router, web and
/// DNS addresses.
pub const DHCP_RANGE: (&str, &str) = ("198.18.0.100", "198.18.0.150");
/// The lease dnsmasq gives, and T1 and T2 (DHCP options 58 and 59): short, so that renewals
/// happen while the tests run. dnsmasq's shortest lease is two minutes; T1 and T2 it sends as
/// told.
pub const DHCP_LEASE: &str = "2m";
pub const DHCP_T1_SECS: u32 = 10;
pub const DHCP_T2_SECS: u32 = 15;

/// Starts dnsmasq as the DHCP server of the uplink segment (DHCP only, its DNS off): the
/// router and the DNS server it hands out are the world's own.
pub fn dhcp_up(topo: &Topology, paths: &Paths) -> Result<()> {
    let ns = world_ns(&topo.lab);
    procs::start(
        paths,
        "dnsmasq-dhcp",
        &Cmd::in_ns(&ns, "dnsmasq").args([
            "--keep-in-foreground".to_string(),
            "--conf-file=/dev/null".to_string(),
            "--port=0".to_string(),
            format!("--interface={IFNAME}"),
            "--bind-interfaces".to_string(),
            format!(
                "--dhcp-range={},{},255.255.255.0,{DHCP_LEASE}",
                DHCP_RANGE.0, DHCP_RANGE.1
            ),
            format!("--dhcp-option=option:router,{ROUTER_IP}"),
            format!("--dhcp-option=option:dns-server,{DNS_IP}"),
            format!("--dhcp-option=58,{DHCP_T1_SECS}"),
            format!("--dhcp-option=59,{DHCP_T2_SECS}"),
            format!(
                "--dhcp-leasefile={}",
                paths.dir.join("dhcp.leases").display()
            ),
            "--log-dhcp".to_string(),
            "--log-facility=-".to_string(),
            format!(
                "--pid-file={}",
                paths.dir.join("dnsmasq-dhcp.daemon-pid").display()
            ),
        ]),
    )?;
    Ok(())
}

/// Addresses, then the servers; returns once the web and DNS servers answer.
pub fn up(topo: &Topology, paths: &Paths) -> Result<()> {
    let ns = world_ns(&topo.lab);
    for a in [ROUTER_IP, WEB_IP, DNS_IP] {
        Cmd::ip(&ns)
            .args(["addr", "add", &format!("{a}/{PREFIX_LEN}"), "dev", IFNAME])
            .run()?;
    }
    Cmd::ip(&ns).args(["link", "set", IFNAME, "up"]).run()?;
    write_resolv_conf(&ns, &[DNS_IP])?;

    let exe = self_exe()?;
    let ready: PathBuf = paths.dir.join("serve-http.ready");
    let _ = std::fs::remove_file(&ready);
    let mut web = procs::start(
        paths,
        "serve-http",
        &Cmd::in_ns(&ns, &exe)
            .arg("serve-http")
            .args(HTTP_PORTS.map(|p| format!("{WEB_IP}:{p}")))
            .args(["--echo", &format!("{WEB_IP}:{ECHO_PORT}")])
            .arg("--ready-file")
            .arg(&ready),
    )?;

    let mut dnsmasq = procs::start(
        paths,
        "dnsmasq",
        &Cmd::in_ns(&ns, "dnsmasq").args([
            "--keep-in-foreground".to_string(),
            "--conf-file=/dev/null".to_string(),
            "--no-resolv".to_string(),
            "--no-hosts".to_string(),
            format!("--listen-address={DNS_IP}"),
            "--bind-interfaces".to_string(),
            format!("--address=/{WEB_NAME}/{WEB_IP}"),
            "--local=/test/".to_string(),
            "--log-facility=-".to_string(),
            "--log-queries".to_string(),
            format!(
                "--pid-file={}",
                paths.dir.join("dnsmasq.daemon-pid").display()
            ),
        ]),
    )?;

    if in_path("iperf3") {
        let pid_file = paths.pid("iperf3");
        Cmd::in_ns(&ns, "iperf3")
            .args(["-s", "-D", "-B", &WEB_IP.to_string()])
            .args(["-p", &IPERF_PORT.to_string()])
            .arg("-I")
            .arg(&pid_file)
            .arg("--logfile")
            .arg(paths.log("iperf3"))
            .run()?;
    }

    procs::wait_ready(
        "the world's web server (qubes-lab serve-http)",
        &mut web,
        &paths.log("serve-http"),
        Duration::from_secs(5),
        || ready.exists(),
    )?;
    let exe_s = exe.clone();
    let ns_s = ns.clone();
    procs::wait_ready(
        "the world's DNS server (dnsmasq)",
        &mut dnsmasq,
        &paths.log("dnsmasq"),
        Duration::from_secs(5),
        move || dns_answers(&ns_s, &exe_s),
    )?;
    Ok(())
}

fn dns_answers(ns: &str, exe: &std::path::Path) -> bool {
    let started = Instant::now();
    let out = Cmd::in_ns(ns, exe)
        .args(["probe", "dns", WEB_NAME, "--server", &DNS_IP.to_string()])
        .args(["--timeout-ms", "300"])
        .output(None);
    let ok = out
        .ok()
        .and_then(|o| Outcome::parse(&String::from_utf8_lossy(&o.stdout)))
        .is_some_and(|o| o.ok());
    if !ok {
        // Do not spin faster than the probe's own timeout.
        let spent = started.elapsed();
        if spent < Duration::from_millis(100) {
            std::thread::sleep(Duration::from_millis(100) - spent);
        }
    }
    ok
}

/// The world's private Tor network (testkit::tornet: Debian's tor in TestingTorNetwork mode),
/// one address per relay from [`TOR_FIRST_RELAY`], the exits resolving through the world's
/// DNS server. Its files are under `<state>/tor-net/`; the relays are daemons of the world's
/// namespace, so `down` stops them with everything else there.
pub fn tor_up(topo: &Topology, paths: &Paths) -> Result<TorNet> {
    let ns = world_ns(&topo.lab);
    for a in TorNet::addresses(TOR_FIRST_RELAY) {
        Cmd::ip(&ns)
            .args(["addr", "add", &format!("{a}/{PREFIX_LEN}"), "dev", IFNAME])
            .run()?;
    }
    TorNet::start_on(&paths.dir.join("tor-net"), &ns, TOR_FIRST_RELAY, DNS_IP)
        .map_err(|e| Error(format!("starting the private Tor network: {e}")))
}

/// Waits until the private network's consensus lists all its relays and all of them have
/// bootstrapped from it, printing on stderr how far it is as that changes (the first consensus
/// takes 30 to 60 s).
pub fn wait_tor_consensus(net: &TorNet, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    let total = testkit::tornet::NICKNAMES.len();
    let mut last = None;
    loop {
        let now = (net.relays_in_consensus(), net.relays_bootstrapped());
        if last != Some(now) {
            eprintln!(
                "private Tor network: {} of {total} relays in the consensus, {} bootstrapped",
                now.0, now.1
            );
            last = Some(now);
        }
        if now.0 >= total && now.1 >= total {
            return Ok(());
        }
        if Instant::now() >= deadline {
            // The testkit's own message carries the end of the first authority's log.
            return net
                .wait_consensus(Duration::ZERO)
                .map_err(|e| Error(format!("the private Tor network: {e}")));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Fails unless the tools the world needs are installed.
pub fn check_tools() -> Result<()> {
    let missing: Vec<&str> = ["ip", "nft", "dnsmasq", "ping"]
        .into_iter()
        .filter(|p| !in_path(p))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        err(format!(
            "missing tools: {} (run scripts/setup-debian.sh: packages iproute2 nftables \
             dnsmasq-base iputils-ping)",
            missing.join(", ")
        ))
    }
}
