//! Time to first byte and bulk throughput of a fetch through sys-whonix, beside the same fetch
//! through a C tor gateway configured as Whonix-Gateway configures it (TransPort :9040 and
//! DnsPort :5300 on the internal address, nftables REDIRECT of every client SYN and of UDP 53;
//! Whonix `tor-service-defaults-torrc.anondist` and `whonix-gw-firewall`), on the same private
//! Tor network, from client qubes in namespaces of their own. Three rounds each, alternating,
//! medians printed side by side, and arti alone on the same network (a fetch straight from its
//! stream, no gateway) to tell the gateway's cost from arti's.
//!
//! `bash bench/whonix-gateway.sh` runs it (root, tor and dnsmasq needed). Nothing here is a
//! pass/fail check: the machines are shared and noisy.

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{ip, Setup, BULK};

const ROUNDS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One fetch of /bulk from `ns`: (seconds to the first byte, Mbit/s after it).
fn fetch(ns: &str) -> Option<(f64, f64)> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "curl",
            "-sS",
            "--max-time",
            "120",
            "-o",
            "/dev/null",
        ])
        .args(["-w", "%{time_starttransfer} %{time_total} %{size_download}"])
        .arg("http://198.18.0.10/bulk")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let v: Vec<f64> = text
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    if !out.status.success() || v.len() != 3 || v[2] as usize != BULK {
        eprintln!(
            "fetch from {ns} failed: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    Some((v[0], v[2] * 8.0 / (v[1] - v[0]).max(1e-6) / 1e6))
}

fn fetch_retrying(ns: &str) -> (f64, f64) {
    for _ in 0..20 {
        if let Some(r) = fetch(ns) {
            return r;
        }
        std::thread::sleep(Duration::from_secs(3));
    }
    panic!("no fetch through {ns}");
}

/// A C tor client in the tor namespace as Whonix-Gateway runs it, serving a client qube in
/// namespace `ctor` behind the kernel's `cvif` (10.152.152.10; the client is .11).
fn start_c_tor_gateway(s: &Setup, net: &testkit::tornet::TorNet) -> std::path::PathBuf {
    let tor_ns = s.ns("tor");
    let client = s.ns("ctor");
    ip(&["netns", "add", &client]);
    ip(&[
        "-n", &tor_ns, "link", "add", "cvif", "type", "veth", "peer", "name", "ceth0",
    ]);
    ip(&["-n", &tor_ns, "link", "set", "ceth0", "netns", &client]);
    ip(&[
        "-n",
        &tor_ns,
        "addr",
        "add",
        "10.152.152.10/24",
        "dev",
        "cvif",
    ]);
    ip(&["-n", &tor_ns, "link", "set", "cvif", "up"]);
    ip(&["-n", &client, "link", "set", "ceth0", "name", "eth0"]);
    ip(&[
        "-n",
        &client,
        "addr",
        "add",
        "10.152.152.11/24",
        "dev",
        "eth0",
    ]);
    ip(&["-n", &client, "link", "set", "eth0", "up"]);
    ip(&["-n", &client, "link", "set", "lo", "up"]);
    ip(&[
        "-n",
        &client,
        "route",
        "add",
        "default",
        "via",
        "10.152.152.10",
    ]);
    let rules =
        "table inet whonix {\n chain prerouting {\n  type nat hook prerouting priority dstnat;\n  \
                 iifname \"cvif\" udp dport 53 redirect to :5300\n  \
                 iifname \"cvif\" tcp flags & (fin|syn|rst|ack) == syn redirect to :9040\n }\n}\n";
    let nft = s.dir.path().join("whonix.nft");
    std::fs::write(&nft, rules).expect("nft rules");
    let out = Command::new("ip")
        .args(["netns", "exec", &tor_ns, "nft", "-f"])
        .arg(&nft)
        .output()
        .expect("nft");
    assert!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = s.dir.path().join("ctor");
    std::fs::create_dir_all(&d).expect("dir");
    let log = d.join("notice.log");
    let torrc = format!(
        "TestingTorNetwork 1\nDataDirectory {d}\nRunAsDaemon 1\nPidFile {d}/tor.pid\nSandbox 0\n\
         Log notice file {log}\nSocksPort 0\nClientOnly 1\n\
         TransPort 10.152.152.10:9040\nDNSPort 10.152.152.10:5300\n\
         VirtualAddrNetworkIPv4 10.192.0.0/10\nAutomapHostsOnResolve 1\n\
         %include {auths}\n",
        d = d.display(),
        log = log.display(),
        auths = net.dir.join("dirauths.conf").display()
    );
    std::fs::write(d.join("torrc"), torrc).expect("torrc");
    let out = Command::new("ip")
        .args(["netns", "exec", &tor_ns, "tor", "-f"])
        .arg(d.join("torrc"))
        .output()
        .expect("tor");
    assert!(
        out.status.success(),
        "C tor: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    d
}

/// Set in the copy of this program that runs arti alone in the tor namespace: the sys-whonix
/// configuration file whose `tor` section to use.
const ARTI_ENV: &str = "SYS_WHONIX_BENCH_ARTI";

/// arti alone, with no gateway around it: the same fetches straight from a `DataStream`, so
/// the table shows what the gateway adds and what is arti's. Prints one `arti TTFB RATE` line
/// per round.
fn arti_alone(config: &str) {
    use sys_whonix::tor::{Tor, TorSettings};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cfg = qubes_service_runtime::config_file::ConfigFile::load(std::path::Path::new(config))
        .expect("config");
    let mut t = cfg.tor.expect("tor section");
    assert!(t.network.is_some(), "a private network");
    let dir = std::path::Path::new(config).with_extension("arti-alone");
    t.state_dir = dir.join("state");
    t.cache_dir = dir.join("cache");
    let settings = TorSettings::from_section(&t);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let tor = Tor::bootstrap(&settings, |_| {}).await.expect("bootstrap");
        let token = arti_client::IsolationToken::new();
        let mut done = 0;
        let mut attempts = 0;
        while done < ROUNDS + 1 && attempts < 20 {
            attempts += 1;
            let t0 = Instant::now();
            let Ok(mut st) = tor
                .connect("198.18.0.10:80".parse().expect("addr"), token)
                .await
            else {
                tokio::time::sleep(Duration::from_secs(3)).await;
                continue;
            };
            st.write_all(b"GET /bulk HTTP/1.0\r\nHost: 198.18.0.10\r\n\r\n")
                .await
                .expect("write");
            st.flush().await.expect("flush");
            let mut buf = vec![0u8; 64 * 1024];
            let n = st.read(&mut buf).await.expect("read");
            let first = t0.elapsed().as_secs_f64();
            let mut total = n;
            loop {
                match st.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
            let rest = t0.elapsed().as_secs_f64() - first;
            if total < BULK {
                continue;
            }
            // The first fetch warms up, as for the gateways.
            if done > 0 {
                println!(
                    "arti {first} {}",
                    (total as f64) * 8.0 / rest.max(1e-6) / 1e6
                );
            }
            done += 1;
        }
    });
}

fn main() {
    if common::child_role() {
        return;
    }
    if let Ok(config) = std::env::var(ARTI_ENV) {
        arti_alone(&config);
        return;
    }
    if !testkit::require_root("sys-whonix gateway benchmark") {
        std::process::exit(1);
    }
    let (mut s, net) = Setup::new("swb", &[]);
    s.start_gateway();
    net.wait_consensus(Duration::from_secs(150))
        .expect("consensus");
    s.wait_ready(Duration::from_secs(180));
    let ctor = start_c_tor_gateway(&s, &net);
    let t0 = Instant::now();
    while !std::fs::read_to_string(ctor.join("notice.log"))
        .unwrap_or_default()
        .contains("Bootstrapped 100%")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "C tor did not bootstrap"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (ours, theirs) = (s.ns("anon1"), s.ns("ctor"));
    // Warm-up: circuits built, the exits settled.
    fetch_retrying(&ours);
    fetch_retrying(&theirs);
    let (mut o, mut c) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        o.push(fetch_retrying(&ours));
        c.push(fetch_retrying(&theirs));
    }
    let alone = Command::new("ip")
        .args(["netns", "exec", &s.ns("tor")])
        .arg(std::env::current_exe().expect("exe"))
        .env(ARTI_ENV, s.dir.path().join("sys-whonix.yaml"))
        .output()
        .expect("arti alone");
    let a: Vec<(f64, f64)> = String::from_utf8_lossy(&alone.stdout)
        .lines()
        .filter_map(|l| {
            let v: Vec<f64> = l
                .strip_prefix("arti ")?
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            (v.len() == 2).then(|| (v[0], v[1]))
        })
        .collect();
    let ttfb = |v: &[(f64, f64)]| median(v.iter().map(|x| x.0 * 1000.0).collect());
    let rate = |v: &[(f64, f64)]| median(v.iter().map(|x| x.1).collect());
    println!(
        "fetch of {} MiB from the world, through the private Tor network, median of {ROUNDS}:",
        BULK >> 20
    );
    println!("{:<44} {:>12} {:>14}", "gateway", "TTFB ms", "bulk Mbit/s");
    println!(
        "{:<44} {:>12.1} {:>14.1}",
        "sys-whonix (arti, smoltcp)",
        ttfb(&o),
        rate(&o)
    );
    println!(
        "{:<44} {:>12.1} {:>14.1}",
        "C tor TransPort/DnsPort (Whonix-Gateway)",
        ttfb(&c),
        rate(&c)
    );
    let show = |v: &[(f64, f64)]| {
        v.iter()
            .map(|(t, r)| format!("{:.1} ms {r:.1} Mbit/s", t * 1000.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if a.is_empty() {
        println!(
            "arti alone: no result ({})",
            String::from_utf8_lossy(&alone.stderr)
        );
    } else {
        println!(
            "{:<44} {:>12.1} {:>14.1}",
            "arti alone, no gateway (request to body)",
            ttfb(&a),
            rate(&a)
        );
    }
    println!(
        "rounds: sys-whonix {}; C tor {}; arti alone {}",
        show(&o),
        show(&c),
        show(&a)
    );
    if let Ok(pid) = std::fs::read_to_string(ctor.join("tor.pid")) {
        let _ = Command::new("kill").arg(pid.trim()).status();
    }
    drop(net);
}
