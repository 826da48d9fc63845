//! `sys-whonix run` as a gateway, on real interfaces in namespaces the test creates, against a
//! private Tor network (testkit::tornet, Debian's tor):
//! - a "tor" namespace holds the network (authorities, relays, two exits on its loopback), a
//!   world web server at 198.18.0.10, the exits' DNS server (dnsmasq: web.example is
//!   198.18.0.10, both ways), and sys-whonix, whose uplink is that loopback;
//! - two anonymous client qubes, each in a namespace of its own behind a vif of sys-whonix.
//!   The kernel of the tor namespace has no address on the vifs and does not forward: whatever
//!   a client reaches, it reaches through the gateway, that is through Tor.
//!
//! The setup is in `common` (shared with the benchmark).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Setup, BODY, BULK, SYS_WHONIX};
use testkit::tornet::TorNet;

const NAME: &str = "clients_reach_the_world_only_through_tor_isolated_per_qube";

#[test]
fn clients_reach_the_world_only_through_tor_isolated_per_qube() {
    if common::child_role() {
        return;
    }
    if !TorNet::can_run(NAME) {
        return;
    }
    let (mut s, net) = Setup::new(
        "swg",
        &["--exact", NAME, "--nocapture", "--test-threads", "1"],
    );
    let udp_log = s.udp_log.clone();

    // Started before the network has a consensus: Tor cannot be ready, and a connection
    // is reset at once rather than left hanging.
    s.start_gateway();
    assert!(s.status().contains("tor bootstrapping"), "{}", s.status());
    let (code, _, err, secs) = s.curl("anon1", &["--max-time", "20", "http://198.18.0.10/"]);
    assert!(
        s.status().contains("tor bootstrapping"),
        "ready too soon for this check"
    );
    assert_eq!(code, 7, "refused before Tor is ready: {err}");
    assert!(secs < 5.0, "refused at once, not after {secs} s");
    assert!(s.counter("not-ready") >= 1);

    net.wait_consensus(Duration::from_secs(150))
        .expect("the network's first consensus");
    s.wait_ready(Duration::from_secs(180));

    // By address, then by name through the virtual resolver.
    let body = s.fetch("anon1", &["http://198.18.0.10/"]);
    assert_eq!(String::from_utf8_lossy(&body), BODY);
    let a = s.dns("anon1", "udp web.example 1");
    assert_eq!(a, "rcode 0 answers 198.18.0.10", "A over UDP");
    let a = s.dns("anon2", "tcp web.example 1");
    assert_eq!(a, "rcode 0 answers 198.18.0.10", "A over TCP");
    let body = s.fetch(
        "anon2",
        &[
            "--resolve",
            "web.example:80:198.18.0.10",
            "http://web.example/",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&body), BODY);
    let r = s.dns("anon1", "udp 10.0.18.198.in-addr.arpa 12");
    assert_eq!(
        r, "rcode 0 answers web.example",
        "PTR through Tor's reverse resolve"
    );
    assert_eq!(
        s.dns("anon1", "udp web.example 15"),
        "rcode 4 answers ",
        "MX: NOTIMP"
    );
    assert_eq!(
        s.dns("anon1", "udp nowhere.example 1"),
        "rcode 3 answers ",
        "NXDOMAIN"
    );
    // An onion name gets an address from the virtual range, the same on asking again.
    let onion = "abcdefghijklmnopqrstuvwxyz234567abcdefghijklmnopqrstuvwx.onion";
    let o1 = s.dns("anon1", &format!("udp {onion} 1"));
    assert!(o1.starts_with("rcode 0 answers 10."), "{o1}");
    let addr: std::net::Ipv4Addr = o1.rsplit(' ').next().expect("addr").parse().expect("ip");
    assert!(sys_whonix::onion::is_virtual(addr), "{addr}");
    assert_eq!(s.dns("anon1", &format!("udp {onion} 1")), o1);

    // Bulk both ways: every byte, in order, with the windows doing the pacing.
    let bulk = s.fetch("anon1", &["http://198.18.0.10/bulk"]);
    assert_eq!(bulk.len(), BULK);
    assert!(
        bulk.iter()
            .enumerate()
            .all(|(i, b)| *b == common::bulk_byte(i)),
        "bulk corrupted"
    );
    let up = s.dir.path().join("upload");
    std::fs::write(&up, vec![b'u'; 2 << 20]).expect("upload file");
    let counted = s.fetch(
        "anon2",
        &[
            "--data-binary",
            &format!("@{}", up.display()),
            "http://198.18.0.10/count",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&counted),
        format!("counted {}", 2 << 20)
    );

    // Refused at once: an internal destination. Then a port the exits allow where nothing
    // listens: the exit's connect is refused (END CONNREFUSED), and the client gets a reset,
    // not a hang. Not at once: arti tries other circuits until its request timeout
    // (`circuit_timing.request_timeout`, 60 s by default) before it gives up.
    let (code, _, err, secs) = s.curl("anon1", &["--max-time", "30", "http://192.168.7.7/"]);
    assert_eq!(code, 7, "internal destination refused: {err}");
    assert!(secs < 5.0);
    assert!(s.counter("private") >= 1);
    let (code, _, err, _) = s.curl("anon1", &["--max-time", "150", "http://198.18.0.10:8001/"]);
    assert!(
        matches!(code, 52 | 56),
        "reset when Tor cannot connect: {code} {err}\n{}\n{}",
        s.status(),
        s.log()
            .lines()
            .filter(|l| l.contains("sys_whonix") || l.contains("WARN"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(s.counter("tor-failed") >= 1);

    // UDP other than DNS and ICMP go nowhere, and are counted.
    let udp_before = s.counter("udp");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &s.ns("anon1"),
            "bash",
            "-c",
            "echo leak > /dev/udp/198.18.0.10/9999",
        ])
        .output()
        .expect("udp");
    assert!(out.status.success());
    let icmp_before = s.counter("icmp");
    let ping = Command::new("ip")
        .args([
            "netns",
            "exec",
            &s.ns("anon1"),
            "ping",
            "-c",
            "2",
            "-W",
            "1",
            "198.18.0.10",
        ])
        .output()
        .expect("ping");
    assert!(!ping.status.success(), "ICMP got an answer");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!udp_log.exists(), "a UDP datagram reached the world");
    assert!(s.counter("udp") > udp_before);
    assert!(s.counter("icmp") >= icmp_before + 2);

    // IPv6 goes nowhere either: the client has no IPv6 address in Qubes' keys, so the engine
    // drops it (counted as unsupported on the client's vif).
    let unsupported = |st: &str| -> u64 {
        st.lines()
            .skip_while(|l| !l.starts_with("client vif1.0 "))
            .nth(1)
            .and_then(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("unsupported="))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    };
    let v6_before = unsupported(&s.status());
    let anon1 = s.ns("anon1");
    common::ip(&[
        "-n",
        &anon1,
        "addr",
        "add",
        "fd09:24ef:4179::a89:1e/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    let out = Command::new("ip")
        .args(["netns", "exec", &anon1, "bash", "-c"])
        .arg("echo leak > /dev/udp/fd09:24ef:4179::1/9999; ping -6 -c 2 -W 1 fd09:24ef:4179::1")
        .output()
        .expect("ipv6");
    assert!(!out.status.success(), "an IPv6 ping got an answer");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        unsupported(&s.status()) > v6_before,
        "IPv6 not dropped by the engine: {}",
        s.status()
    );

    // Isolation: two qubes never share a circuit; one qube's streams share its circuit
    // until new-identity.
    s.hold("anon1", 41001);
    s.hold("anon2", 41002);
    let c1 = s.circuit_of("10.137.0.30", 41001);
    let c2 = s.circuit_of("10.137.0.31", 41002);
    assert_ne!(c1, c2, "two client qubes on one circuit");
    s.hold("anon1", 41003);
    assert_eq!(
        s.circuit_of("10.137.0.30", 41003),
        c1,
        "one qube, one circuit"
    );
    let out = Command::new(SYS_WHONIX)
        .args(["new-identity", "vif1.0", "--control"])
        .arg(s.control())
        .output()
        .expect("new-identity");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.hold("anon1", 41004);
    let c4 = s.circuit_of("10.137.0.30", 41004);
    assert_ne!(c4, c1, "new-identity gave the same circuit");
    assert_ne!(c4, c2);

    // With streams of both clients open, every Internet socket sys-whonix has is a TCP
    // connection to a relay's OR port: no DNS of its own, no connection to the web server,
    // nothing listening.
    let pid = s.gateway_pid().expect("running");
    let ss = Command::new("ip")
        .args(["netns", "exec", &s.ns("tor"), "ss", "-tunapH"])
        .output()
        .expect("ss");
    let ss = String::from_utf8_lossy(&ss.stdout).to_string();
    let ours: Vec<&str> = ss
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .collect();
    assert!(
        !ours.is_empty(),
        "no sockets of sys-whonix (pid {pid}) in: {ss}"
    );
    for l in &ours {
        let f: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(f[0], "tcp", "sys-whonix has a non-TCP socket: {l}");
        assert!(
            net.orports.iter().any(|p| p == f[5]),
            "sys-whonix talks to {} (not a relay's OR port): {l}",
            f[5]
        );
    }

    // Killed, the gateway leaves no path: the kernel has no address on the vif and does
    // not forward.
    s.kill_gateway();
    let (code, _, _, _) = s.curl("anon1", &["--max-time", "5", "http://198.18.0.10/"]);
    assert_ne!(code, 0, "a path out with sys-whonix dead");
    // Restarted, it picks up.
    s.start_gateway();
    s.wait_ready(Duration::from_secs(120));
    let body = s.fetch("anon2", &["http://198.18.0.10/"]);
    assert_eq!(String::from_utf8_lossy(&body), BODY);
    drop(net);
}
