//! The pcap corpus: scenarios, how their files are built, and how a replay is checked.
//!
//! Shared by the generator (`examples/gen_corpus.rs`) and the test (`tests/pcap_corpus.rs`), so
//! the test can check that the stored inputs are exactly what the generator builds.
//!
//! A scenario is a Rust function over a [`Script`]: it declares the configuration, sends input
//! frames one at a time (each goes through the engine at once, so a later input can answer what
//! the engine sent, e.g. a reply to the NAT port it chose), and states expectations.

#![allow(dead_code)]

pub mod expect;
pub mod frame;
pub mod packets;
pub mod scenarios;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use sys_firewall::replay::{
    read_capture, replay_capture, write_capture, CapturePacket, ReplayConfig, ReplayOutput,
    Replayer,
};

use frame::{decode, Decoded};

/// Where the corpus lives: `tests/pcap/` at the top of the workspace.
pub fn corpus_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .unwrap_or(manifest)
        .join("tests")
        .join("pcap")
}

/// The corpus clock starts at 2024-01-01T00:00:00Z (ns since the epoch).
pub const T0_NS: u64 = 1_704_067_200_000_000_000;

/// Result type of scenario code.
pub type R<T = ()> = Result<T, String>;

/// A scenario: folder name and the function that builds it.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    pub name: &'static str,
    pub build: fn(&mut Script) -> R,
}

/// A client qube as a scenario declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    pub vif: &'static str,
    pub ip: &'static str,
    pub ip6: Option<&'static str>,
    pub mac: &'static str,
}

#[derive(Debug, Clone, Default)]
struct StepCfg {
    at: usize,
    qubesdb: Vec<(String, Option<String>)>,
    tick_ms: Option<u64>,
    /// The new vif list (qubes started or stopped), in list order.
    vifs: Option<Vec<Client>>,
    /// Links whose device MTU changes.
    link_mtu: Vec<(String, u16)>,
    /// sys-net: a new lease (address, router, upstream DNS).
    lease: Option<(String, String, Vec<String>)>,
}

/// A replay configuration under construction; rendered to config.yaml.
#[derive(Debug, Clone, Default)]
pub struct Cfg {
    uplink_mtu: Option<u16>,
    /// sys-net: the uplink's own address, router and upstream DNS (static addressing).
    netvm: Option<(String, String, Vec<String>)>,
    qubesdb: Vec<(String, String)>,
    vifs: Vec<(Client, Option<u16>)>,
    dns: Vec<(String, Vec<String>, u32)>,
    conntrack_max: Option<usize>,
    steps: Vec<StepCfg>,
}

/// The firewall's addresses (sys-firewall is qube 6, its netvm sys-net is qube 5).
pub const FW_IP: &str = "10.137.0.6";
pub const NETVM_IP: &str = "10.137.0.5";
pub const FW_IP6: &str = "fd09:24ef:4179::a89:6";
pub const NETVM_IP6: &str = "fd09:24ef:4179::a89:5";

impl Cfg {
    /// sys-firewall's QubesDB as dom0 writes it, without any client.
    pub fn new() -> Self {
        Cfg::default()
            .set("/qubes-ip", FW_IP)
            .set("/qubes-gateway", NETVM_IP)
            .set("/qubes-mac", packets::FW_MAC)
            .set("/qubes-netvm-primary-dns", "10.139.1.1")
            .set("/qubes-netvm-secondary-dns", "10.139.1.2")
    }

    /// sys-net's QubesDB as dom0 writes it for a netvm (no `/qubes-ip`: it has no netvm; its
    /// clients' gateway is `/qubes-netvm-gateway`), with the uplink at `address` behind
    /// `router` and the virtual resolvers redirected to `dns`.
    pub fn netvm(address: &str, router: &str, dns: &[&str]) -> Self {
        let mut c = Cfg::default()
            .set("/qubes-netvm-network", NETVM_IP)
            .set("/qubes-netvm-gateway", NETVM_IP)
            .set("/qubes-netvm-netmask", "255.255.255.255")
            .set("/qubes-netvm-primary-dns", "10.139.1.1")
            .set("/qubes-netvm-secondary-dns", "10.139.1.2");
        c.netvm = Some((
            address.to_string(),
            router.to_string(),
            dns.iter().map(|d| d.to_string()).collect(),
        ));
        c
    }

    /// sys-net: before input packet `at`, the lease changes (a DHCP renewal with new values).
    pub fn step_lease(mut self, at: usize, address: &str, router: &str, dns: &[&str]) -> Self {
        self.steps.push(StepCfg {
            at,
            qubesdb: Vec::new(),
            tick_ms: None,
            vifs: None,
            link_mtu: Vec::new(),
            lease: Some((
                address.to_string(),
                router.to_string(),
                dns.iter().map(|d| d.to_string()).collect(),
            )),
        });
        self
    }

    /// The netvm provides IPv6 (`/qubes-ip6`, `/qubes-gateway6`).
    pub fn ipv6(self) -> Self {
        self.set("/qubes-ip6", FW_IP6)
            .set("/qubes-gateway6", NETVM_IP6)
    }

    pub fn set(mut self, k: &str, v: &str) -> Self {
        match self.qubesdb.iter_mut().find(|(key, _)| key == k) {
            Some(e) => e.1 = v.to_string(),
            None => self.qubesdb.push((k.to_string(), v.to_string())),
        }
        self
    }

    pub fn unset(mut self, k: &str) -> Self {
        self.qubesdb.retain(|(key, _)| key != k);
        self
    }

    /// A client with dom0's default rules (policy drop, `0000` accept) for each of its addresses.
    pub fn client(self, c: &Client) -> Self {
        let mut s = self.vif(c);
        s = s.rules(c.ip, &["action=accept"]);
        if let Some(ip6) = c.ip6 {
            s = s.rules(ip6, &["action=accept"]);
        }
        s
    }

    /// A client whose IPv4 rules are these (policy drop; IPv6 gets the default rules).
    pub fn client_rules(self, c: &Client, rules: &[&str]) -> Self {
        let mut s = self.vif(c).rules(c.ip, rules);
        if let Some(ip6) = c.ip6 {
            s = s.rules(ip6, &["action=accept"]);
        }
        s
    }

    /// Only the vif, no QubesDB entries.
    pub fn vif(mut self, c: &Client) -> Self {
        self.vifs.push((*c, None));
        self
    }

    /// The configured MTU of a vif already added (the `mtu` of its `vifs` entry).
    pub fn vif_mtu(mut self, c: &Client, mtu: u16) -> Self {
        for v in self.vifs.iter_mut().filter(|(v, _)| v.vif == c.vif) {
            v.1 = Some(mtu);
        }
        self
    }

    fn entries(addr: &str, rules: &[&str]) -> Vec<(String, String)> {
        let base = format!("/qubes-firewall/{addr}");
        let mut v = vec![
            (base.clone(), String::new()),
            (format!("{base}/policy"), "drop".to_string()),
        ];
        for (i, r) in rules.iter().enumerate() {
            v.push((format!("{base}/{i:04}"), r.to_string()));
        }
        v
    }

    /// Replaces the firewall entries of an address, as dom0 writes them: the base key (the commit
    /// signal), `policy` drop and `0000`... for the rules.
    pub fn rules(mut self, addr: &str, rules: &[&str]) -> Self {
        let prefix = format!("/qubes-firewall/{addr}");
        self.qubesdb
            .retain(|(k, _)| k != &prefix && !k.starts_with(&format!("{prefix}/")));
        self.qubesdb.extend(Self::entries(addr, rules));
        self
    }

    /// A static DNS answer.
    pub fn dns(mut self, name: &str, addrs: &[&str], ttl: u32) -> Self {
        self.dns.push((
            name.to_string(),
            addrs.iter().map(|a| a.to_string()).collect(),
            ttl,
        ));
        self
    }

    pub fn conntrack_max(mut self, n: usize) -> Self {
        self.conntrack_max = Some(n);
        self
    }

    pub fn uplink_mtu(mut self, n: u16) -> Self {
        self.uplink_mtu = Some(n);
        self
    }

    /// The QubesDB keys as they stand before input packet `at` (base plus earlier steps).
    fn tree_at(&self, at: usize) -> Vec<(String, String)> {
        let mut t = self.qubesdb.clone();
        for s in self.steps.iter().filter(|s| s.at <= at) {
            for (k, v) in &s.qubesdb {
                t.retain(|(key, _)| key != k);
                if let Some(v) = v {
                    t.push((k.clone(), v.clone()));
                }
            }
        }
        t
    }

    /// Before input packet `at`, dom0 rewrites an address's rules: removes the old entries,
    /// writes the new ones, then the base key.
    pub fn step_rules(mut self, at: usize, addr: &str, rules: &[&str]) -> Self {
        let prefix = format!("/qubes-firewall/{addr}/");
        let new = Self::entries(addr, rules);
        let mut changes: Vec<(String, Option<String>)> = self
            .tree_at(at)
            .into_iter()
            .filter(|(k, _)| k.starts_with(&prefix) && !new.iter().any(|(n, _)| n == k))
            .map(|(k, _)| (k, None))
            .collect();
        changes.extend(new.into_iter().map(|(k, v)| (k, Some(v))));
        self.steps.push(StepCfg {
            at,
            qubesdb: changes,
            ..StepCfg::default()
        });
        self
    }

    /// Before input packet `at`, the vif list becomes `vifs` (in this order): qubes started
    /// or stopped, as XenStore shows dom0's hotplug.
    pub fn step_vifs(mut self, at: usize, vifs: &[&Client]) -> Self {
        self.steps.push(StepCfg {
            at,
            vifs: Some(vifs.iter().map(|c| **c).collect()),
            ..StepCfg::default()
        });
        self
    }

    /// Before input packet `at`, runs the engine's timers at `ms` after the capture start.
    pub fn step_tick(mut self, at: usize, ms: u64) -> Self {
        self.steps.push(StepCfg {
            at,
            tick_ms: Some(ms),
            ..StepCfg::default()
        });
        self
    }

    /// Before input packet `at`, the device MTU of link `iface` becomes `mtu` (`ip link set
    /// mtu`, which the service hears through netlink).
    pub fn step_link_mtu(mut self, at: usize, iface: &str, mtu: u16) -> Self {
        self.steps.push(StepCfg {
            at,
            link_mtu: vec![(iface.to_string(), mtu)],
            ..StepCfg::default()
        });
        self
    }

    /// config.yaml.
    pub fn render(&self, name: &str, about: &str) -> String {
        let q = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        let mut y = String::new();
        let _ = writeln!(y, "# {name}: {about}");
        let _ = writeln!(
            y,
            "# Generated by sys-firewall/examples/gen_corpus.rs from tests/corpus/scenarios.rs."
        );
        if self.uplink_mtu.is_some() || self.netvm.is_some() {
            let _ = writeln!(y, "uplink:\n  name: eth0");
            if let Some(mtu) = self.uplink_mtu {
                let _ = writeln!(y, "  mtu: {mtu}");
            }
            if let Some((a, r, dns)) = &self.netvm {
                let d: Vec<String> = dns.iter().map(|d| q(d)).collect();
                let _ = writeln!(
                    y,
                    "  address: {}\n  router: {}\n  dns: [{}]",
                    q(a),
                    q(r),
                    d.join(", ")
                );
            }
        }
        y.push_str("qubesdb:\n");
        for (k, v) in &self.qubesdb {
            let _ = writeln!(y, "  {}: {}", q(k), q(v));
        }
        let vif_list = |y: &mut String, indent: &str, vifs: &[(Client, Option<u16>)]| {
            for (c, mtu) in vifs {
                let _ = writeln!(y, "{indent}- name: {}", q(c.vif));
                let _ = writeln!(y, "{indent}  ip: {}", q(c.ip));
                if let Some(ip6) = c.ip6 {
                    let _ = writeln!(y, "{indent}  ip6: {}", q(ip6));
                }
                let _ = writeln!(y, "{indent}  mac: {}", q(c.mac));
                if let Some(m) = mtu {
                    let _ = writeln!(y, "{indent}  mtu: {m}");
                }
            }
        };
        if !self.vifs.is_empty() {
            y.push_str("vifs:\n");
            vif_list(&mut y, "  ", &self.vifs);
        }
        if !self.dns.is_empty() {
            y.push_str("dns:\n");
            for (n, addrs, ttl) in &self.dns {
                let a: Vec<String> = addrs.iter().map(|a| q(a)).collect();
                let _ = writeln!(
                    y,
                    "  {}:\n    addrs: [{}]\n    ttl: {ttl}",
                    q(n),
                    a.join(", ")
                );
            }
        }
        if let Some(n) = self.conntrack_max {
            let _ = writeln!(y, "conntrack_max: {n}");
        }
        if !self.steps.is_empty() {
            y.push_str("steps:\n");
            for s in &self.steps {
                let _ = writeln!(y, "  - at_packet: {}", s.at);
                if !s.qubesdb.is_empty() {
                    y.push_str("    qubesdb:\n");
                    for (k, v) in &s.qubesdb {
                        let v = v.as_deref().map_or("null".to_string(), q);
                        let _ = writeln!(y, "      {}: {v}", q(k));
                    }
                }
                if let Some(v) = &s.vifs {
                    let v: Vec<(Client, Option<u16>)> = v.iter().map(|c| (*c, None)).collect();
                    if v.is_empty() {
                        y.push_str("    vifs: []\n");
                    } else {
                        y.push_str("    vifs:\n");
                        vif_list(&mut y, "      ", &v);
                    }
                }
                if !s.link_mtu.is_empty() {
                    y.push_str("    link_mtu:\n");
                    for (n, m) in &s.link_mtu {
                        let _ = writeln!(y, "      {}: {m}", q(n));
                    }
                }
                if let Some((a, r, dns)) = &s.lease {
                    let d: Vec<String> = dns.iter().map(|d| q(d)).collect();
                    let _ = writeln!(
                        y,
                        "    uplink: {{address: {}, router: {}, dns: [{}]}}",
                        q(a),
                        q(r),
                        d.join(", ")
                    );
                }
                if let Some(ms) = s.tick_ms {
                    let _ = writeln!(
                        y,
                        "    tick_ns: {}  # {} s after the capture start",
                        T0_NS + ms * 1_000_000,
                        fmt_secs(ms * 1000)
                    );
                }
            }
        }
        y
    }
}

fn fmt_secs(us: u64) -> String {
    format!("{}.{:06}", us / 1_000_000, us % 1_000_000)
}

/// A frame the engine emitted, decoded, with its IP packet.
#[derive(Debug, Clone)]
pub struct Seen {
    pub d: Decoded,
    pub frame: Vec<u8>,
}

impl Seen {
    /// The IP packet in the frame (for quoting it in an ICMP error).
    pub fn ip(&self) -> R<Vec<u8>> {
        let (s, e) = self
            .d
            .ip_range
            .ok_or_else(|| format!("not an IP frame: {}", self.d.describe()))?;
        Ok(self.frame[s..e].to_vec())
    }
}

/// A scenario being built: the configuration, the inputs sent so far (through a live engine),
/// and the expectations.
#[derive(Debug)]
pub struct Script {
    pub name: String,
    about: String,
    cfg_yaml: String,
    replayer: Option<Replayer>,
    now_us: u64,
    inputs: Vec<(String, u64, Vec<u8>)>,
    expect: Vec<String>,
}

impl Script {
    fn new(name: &str) -> Self {
        Script {
            name: name.to_string(),
            about: String::new(),
            cfg_yaml: String::new(),
            replayer: None,
            now_us: 0,
            inputs: Vec::new(),
            expect: Vec::new(),
        }
    }

    /// The one-line description (must come before `config`).
    pub fn about(&mut self, s: &str) {
        self.about = s.to_string();
    }

    /// Sets the configuration and starts the engine.
    pub fn config(&mut self, cfg: Cfg) -> R {
        if self.about.is_empty() {
            return Err("call about() before config()".into());
        }
        self.cfg_yaml = cfg.render(&self.name, &self.about);
        let parsed = ReplayConfig::from_yaml(&self.cfg_yaml)
            .map_err(|e| format!("config.yaml: {e}\n{}", self.cfg_yaml))?;
        self.replayer = Some(Replayer::new(&parsed, None).map_err(|e| e.to_string())?);
        Ok(())
    }

    /// Moves the clock to `ms` after the capture start.
    pub fn at_ms(&mut self, ms: u64) {
        assert!(ms * 1000 >= self.now_us, "{}: time goes back", self.name);
        self.now_us = ms * 1000;
    }

    /// The number of the next input packet (0-based).
    pub fn next_packet(&self) -> usize {
        self.inputs.len()
    }

    /// Sends a frame on an interface now; the clock then moves 1 ms on.
    pub fn send(&mut self, iface: &str, frame: Vec<u8>) -> R {
        let r = self.replayer.as_mut().ok_or("config() first")?;
        let ts = T0_NS + self.now_us * 1000;
        // Steps due now may bring the vif this frame arrives on.
        r.run_due_steps(ts).map_err(|e| e.to_string())?;
        let id = r
            .iface_by_name(iface)
            .ok_or_else(|| format!("no interface {iface}"))?;
        r.packet(ts, id, &frame).map_err(|e| e.to_string())?;
        self.inputs.push((iface.to_string(), ts, frame));
        self.now_us += 1000;
        Ok(())
    }

    /// The last frame the engine sent on `iface` of this kind (a kind word of the expectations).
    pub fn last(&self, iface: &str, kind: &str) -> R<Seen> {
        let r = self.replayer.as_ref().ok_or("config() first")?;
        let id = r
            .iface_by_name(iface)
            .ok_or_else(|| format!("no interface {iface}"))?;
        r.frames()
            .iter()
            .rev()
            .filter(|f| f.iface == id)
            .map(|f| Seen {
                d: decode(&f.data),
                frame: f.data.clone(),
            })
            .find(|s| kind == "any" || s.d.has(kind) || (kind == "ip" && s.d.ip_range.is_some()))
            .ok_or_else(|| {
                format!(
                    "the engine sent no {kind} frame on {iface} so far (input packet {})",
                    self.inputs.len()
                )
            })
    }

    /// The `n`-th (0-based) frame the engine sent on `iface` of this kind, so far.
    pub fn nth(&self, iface: &str, kind: &str, n: usize) -> R<Seen> {
        let r = self.replayer.as_ref().ok_or("config() first")?;
        let id = r
            .iface_by_name(iface)
            .ok_or_else(|| format!("no interface {iface}"))?;
        r.frames()
            .iter()
            .filter(|f| f.iface == id)
            .map(|f| Seen {
                d: decode(&f.data),
                frame: f.data.clone(),
            })
            .filter(|s| kind == "any" || s.d.has(kind) || (kind == "ip" && s.d.ip_range.is_some()))
            .nth(n)
            .ok_or_else(|| {
                format!(
                    "the engine sent no {kind} frame {n} on {iface} so far (input packet {})",
                    self.inputs.len()
                )
            })
    }

    /// States a fact of the expectations language.
    pub fn expect(&mut self, line: &str) {
        self.expect.push(line.to_string());
    }
}

/// A built scenario: its three files, and the generator's own run of the engine.
#[derive(Debug)]
pub struct Built {
    pub name: String,
    pub config_yaml: String,
    pub in_pcapng: Vec<u8>,
    pub expect_txt: String,
    pub out: ReplayOutput,
}

/// A short description of an input packet for the expect.txt header.
fn short(d: &Decoded) -> String {
    const KEEP: &[&str] = &[
        "op",
        "spa",
        "tpa",
        "src",
        "dst",
        "ttl",
        "hlim",
        "df",
        "mf",
        "fragoff",
        "iplen",
        "sport",
        "dport",
        "flags",
        "type",
        "code",
        "echo-id",
        "target",
        "ethertype",
        "len",
    ];
    let mut s: Vec<String> = d.kinds.iter().map(|k| k.to_string()).collect();
    for (k, v) in &d.fields {
        if KEEP.contains(k) {
            s.push(format!("{k} {v}"));
        }
    }
    if let Some(i) = &d.inner {
        s.push(format!("inner {}", short(i)));
    }
    for p in &d.problems {
        s.push(format!("[{p}]"));
    }
    s.join(" ")
}

/// Runs a scenario's function: the configuration, the input capture and the expectations.
pub fn build(sc: &Scenario) -> R<Built> {
    let mut s = Script::new(sc.name);
    (sc.build)(&mut s).map_err(|e| format!("{}: {e}", sc.name))?;
    let mut r = s
        .replayer
        .take()
        .ok_or_else(|| format!("{}: no config()", sc.name))?;
    r.finish().map_err(|e| format!("{}: {e}", sc.name))?;
    let names: Vec<String> = r.ifaces().iter().map(|(_, n)| n.clone()).collect();
    let mut pkts = Vec::new();
    for (iface, ts, data) in &s.inputs {
        let idx = names
            .iter()
            .position(|n| n == iface)
            .ok_or_else(|| format!("{}: no interface {iface}", sc.name))?;
        pkts.push(CapturePacket {
            iface: idx as u32,
            ts_ns: *ts,
            data,
        });
    }
    let in_pcapng = write_capture(&names, &pkts).map_err(|e| e.to_string())?;

    let mut e = String::new();
    let _ = writeln!(e, "# {}", s.about);
    let _ = writeln!(
        e,
        "# Scenario {}, generated by sys-firewall/examples/gen_corpus.rs from \
         sys-firewall/tests/corpus/scenarios.rs.",
        sc.name
    );
    let _ = writeln!(e, "# Input packets (time after the capture start):");
    for (i, (iface, ts, data)) in s.inputs.iter().enumerate() {
        let _ = writeln!(
            e,
            "#   {i:2} {:>10}s {iface:7} {}",
            fmt_secs((ts - T0_NS) / 1000),
            short(&decode(data))
        );
    }
    e.push('\n');
    for l in &s.expect {
        let _ = writeln!(e, "{l}");
    }
    expect::parse(&e).map_err(|m| format!("{}: expect.txt: {m}", sc.name))?;

    let out = ReplayOutput {
        ifaces: names,
        packets: s.inputs.len(),
        pcapng: r.output_pcapng().map_err(|e| e.to_string())?,
        counters: r.counters(),
        frames: r.frames().to_vec(),
        events: r.events().to_vec(),
    };
    Ok(Built {
        name: sc.name.to_string(),
        config_yaml: s.cfg_yaml,
        in_pcapng,
        expect_txt: e,
        out,
    })
}

/// Replays a scenario folder as the test does: config.yaml + in.pcapng.
pub fn replay_dir(dir: &Path) -> R<ReplayOutput> {
    let cfg = ReplayConfig::load(&dir.join("config.yaml")).map_err(|e| e.to_string())?;
    let input = std::fs::read(dir.join("in.pcapng"))
        .map_err(|e| format!("{}: {e}", dir.join("in.pcapng").display()))?;
    replay_capture(&cfg, &input, None).map_err(|e| e.to_string())
}

/// Checks a replay against an expect.txt; the failures, one per line.
pub fn check_expectations(expect_txt: &str, out: &ReplayOutput) -> Vec<String> {
    match expect::parse(expect_txt) {
        Ok(e) => expect::check(&e, out),
        Err(m) => vec![format!("expect.txt: {m}")],
    }
}

/// The engine's non-zero counters and its events (other than drops), for failure reports.
pub fn summary(out: &ReplayOutput) -> String {
    let mut s = String::from("counters:");
    for (name, c) in out.ifaces.iter().zip(&out.counters) {
        for (r, n) in c.iter().filter(|(_, n)| *n > 0) {
            let _ = write!(s, " {}/{name}={n}", r.name());
        }
    }
    s.push_str("\nevents:");
    for e in &out.events {
        if !matches!(e.event, qubes_engine::engine::Event::Dropped { .. }) {
            let _ = write!(s, " {:?};", e.event);
        }
    }
    s
}

/// Lists a capture's frames, one line each: index, interface, time, description.
pub fn list_capture(bytes: &[u8]) -> R<Vec<(String, String)>> {
    let pkts = read_capture(bytes).map_err(|e| e.to_string())?;
    Ok(pkts
        .iter()
        .map(|p| {
            let key = format!("{} {}", p.if_name, hex(&p.data));
            let line = format!(
                "{:>10}s {:7} {}",
                fmt_secs(p.ts_ns.saturating_sub(T0_NS) / 1000),
                p.if_name,
                decode(&p.data).describe()
            );
            (key, line)
        })
        .collect())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A readable diff of two captures, frame by frame (`-` expected only, `+` produced only).
pub fn diff_captures(expected: &[u8], got: &[u8]) -> String {
    let (a, b) = match (list_capture(expected), list_capture(got)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) => return format!("the expected capture does not read: {e}"),
        (_, Err(e)) => return format!("the produced capture does not read: {e}"),
    };
    // Longest common subsequence on (interface, bytes).
    let (n, m) = (a.len(), b.len());
    let mut l = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            l[i][j] = if a[i].0 == b[j].0 {
                l[i + 1][j + 1] + 1
            } else {
                l[i + 1][j].max(l[i][j + 1])
            };
        }
    }
    let mut out = String::new();
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && a[i].0 == b[j].0 {
            let _ = writeln!(out, "  {:3} {}", j, b[j].1);
            i += 1;
            j += 1;
        } else if j < m && (i == n || l[i][j + 1] >= l[i + 1][j]) {
            let _ = writeln!(out, "+ {:3} {}", j, b[j].1);
            j += 1;
        } else {
            let _ = writeln!(out, "- {:3} {}", i, a[i].1);
            i += 1;
        }
    }
    if expected != got && a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.0 == y.0) {
        out.push_str("(same frames: the difference is in timestamps or capture metadata)\n");
    }
    out
}

/// Replays a built scenario from the bytes the generator would write (config.yaml and
/// in.pcapng), as the test replays the stored files.
pub fn replay_built(b: &Built) -> R<ReplayOutput> {
    let cfg = ReplayConfig::from_yaml(&b.config_yaml)
        .map_err(|e| format!("{}: config.yaml: {e}", b.name))?;
    replay_capture(&cfg, &b.in_pcapng, None).map_err(|e| format!("{}: {e}", b.name))
}

/// Everything that keeps a built scenario from being blessed, each line naming the scenario:
/// its expect.txt must parse and state a positive fact ([`expect::require_positive`]), the
/// replay of its files must be the generator's own run, and every fact must hold on that
/// replay. On success, the replay (whose capture is the scenario's out.pcapng).
pub fn verify(b: &Built) -> Result<ReplayOutput, Vec<String>> {
    let e =
        expect::parse(&b.expect_txt).map_err(|m| vec![format!("{}: expect.txt: {m}", b.name)])?;
    let mut problems = Vec::new();
    if let Err(m) = expect::require_positive(&e) {
        problems.push(format!("{}: {m}", b.name));
    }
    let out = replay_built(b).map_err(|m| vec![m])?;
    if out.pcapng != b.out.pcapng {
        problems.push(format!(
            "{}: replaying the generated files differs from the generator's own run:\n{}",
            b.name,
            diff_captures(&b.out.pcapng, &out.pcapng)
        ));
    }
    for f in expect::check(&e, &out) {
        problems.push(format!("{}: {f}", b.name));
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

fn write_if_changed(path: &Path, bytes: &[u8], written: &mut Vec<String>) -> R {
    if std::fs::read(path).ok().as_deref() == Some(bytes) {
        return Ok(());
    }
    std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    written.push(path.display().to_string());
    Ok(())
}

/// The generator: builds every scenario, verifies every one ([`verify`]), and only if all of
/// them pass writes each one's config.yaml, in.pcapng and expect.txt under `dir/<name>/` (and
/// with `bless` its out.pcapng), only files whose bytes change. Returns the files written; on
/// any problem, writes nothing at all and returns every problem found, one per line, each
/// naming its scenario (a failing fact with what was expected and what was seen).
pub fn generate(
    scenarios: &[Scenario],
    dir: &Path,
    bless: bool,
) -> Result<Vec<String>, Vec<String>> {
    let mut problems = Vec::new();
    let mut ready = Vec::new();
    for sc in scenarios {
        match build(sc) {
            Err(e) => problems.push(e),
            Ok(b) => match verify(&b) {
                Ok(out) => ready.push((b, out)),
                Err(p) => problems.extend(p),
            },
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut written = Vec::new();
    let mut write_all = || -> R {
        for (b, out) in &ready {
            let d = dir.join(&b.name);
            std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
            write_if_changed(
                &d.join("config.yaml"),
                b.config_yaml.as_bytes(),
                &mut written,
            )?;
            write_if_changed(&d.join("in.pcapng"), &b.in_pcapng, &mut written)?;
            write_if_changed(&d.join("expect.txt"), b.expect_txt.as_bytes(), &mut written)?;
            if bless {
                write_if_changed(&d.join("out.pcapng"), &out.pcapng, &mut written)?;
            }
        }
        Ok(())
    };
    write_all().map_err(|e| vec![e])?;
    Ok(written)
}
