//! pcapng replay: feed a capture through the engine and write what it sends.
//!
//! The input is a pcapng capture whose interface names (the `if_name` option of each Interface
//! Description Block) say where each frame arrived: `eth0` for the uplink, `vif3.0` for a client.
//! The output is a pcapng capture with one interface per engine interface (uplink first) and one
//! packet per frame the engine emitted, on the interface it leaves by, stamped with the time of
//! the input packet that caused it.
//!
//! The engine is deterministic and the seed of its NAT port choice is fixed unless given, so a
//! replay's output is byte-for-byte reproducible: that is what the pcap corpus checks.
//!
//! # Configuration file
//!
//! The services' YAML format (`qubes_service_runtime::config_file`), with `seed` and `steps`:
//!
//! ```yaml
//! uplink:                 # the interface toward the netvm
//!   name: eth0            # default eth0
//!   mtu: 1500             # default 1500
//! qubesdb:                # the firewall qube's QubesDB keys, as dom0 writes them
//!   /qubes-ip: 10.137.0.6
//!   /qubes-gateway: 10.137.0.5
//!   /qubes-netvm-primary-dns: 10.139.1.1
//!   /qubes-firewall/10.137.0.10: ""
//!   /qubes-firewall/10.137.0.10/policy: drop
//!   /qubes-firewall/10.137.0.10/0000: action=accept
//! vifs:                   # the client vifs, in interface order
//!   - name: vif3.0
//!     ip: 10.137.0.10
//!     ip6: fd09:24ef:4179::a89:a     # optional
//!     mac: 00:16:3e:5e:6c:0a         # default 00:16:3e:5e:6c:00
//!     mtu: 1500                      # optional, default 1500
//! dns:                    # static answers to the engine's name lookups; other names fail
//!   web.example: {addrs: [198.18.0.10], ttl: 300}   # ttl in seconds, default 300
//! conntrack_max: 65536    # optional bound on tracked flows (default 65536, whatever the memory)
//! seed: 1                 # optional NAT seed (the --seed option wins over it)
//! steps:                  # optional changes during the capture
//!   - at_packet: 3        # before input packet 3 (0-based; the packet count = after the last)
//!     qubesdb:            # keys to set, or to remove with null
//!       /qubes-firewall/10.137.0.10/0000: action=drop
//!   - at_packet: 5
//!     tick_ns: 1704067230000000000   # run the engine's timers at this time (ns, capture clock)
//!   - at_packet: 7
//!     link_mtu: {eth0: 1400}         # the device's MTU changed, as netlink tells the service
//! ```
//!
//! A `link_mtu` step does what `sys-firewall run` does on an `RTM_NEWLINK` with a new MTU:
//! `Engine::set_mtu` with the effective MTU (the device's, lowered by a configured `mtu`),
//! without reconfiguring, so flows are kept; later configuration steps keep it.
//!
//! # Time
//!
//! The engine's clock is the capture's: nanoseconds since the Unix epoch, converted from each
//! interface's `if_tsresol` (default microseconds) and `if_tsoffset`. A packet older than the
//! previous one is handled at the previous one's time (the engine's clock never goes back) but
//! what it causes is still stamped with its own time. The output is written with `if_tsresol` 9
//! (nanoseconds), little-endian, so it is exact whatever the input's resolution.
//!
//! # Order of work for each input packet
//!
//! 1. the `steps` due before it (configuration changes, then the step's timer run),
//! 2. `Engine::tick` at the packet's time,
//! 3. `Engine::handle`: the frames it queued, then the frame itself if it is forwarded.
//!
//! After every engine call, each `Event::Resolve` is answered at once from `dns` (once per name
//! and call) and the frames that produces are written next.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::path::Path;

use qubes_engine::engine::Counters;
use qubes_engine::{Engine, Event, IfaceId, Instant, Outbox, Verdict};
pub use qubes_service_runtime::config_file::{
    ConfigFile as ReplayConfig, DnsEntry, Step, UplinkSection, VifEntry,
};
use qubes_service_runtime::ConfigError;

pub const DEFAULT_SEED: u64 = 0x5eed;

/// Most name lookups answered for one engine call (a guard against an engine that keeps asking).
const MAX_RESOLVES_PER_CALL: usize = 1024;

/// What a replay error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The configuration file.
    Config,
    /// The input capture.
    Input,
    /// The output capture.
    Output,
}

/// A replay that cannot be done: which file, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayError {
    pub kind: ErrorKind,
    /// The file at fault, when known.
    pub file: Option<String>,
    pub msg: String,
}

impl ReplayError {
    fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        ReplayError {
            kind,
            file: None,
            msg: msg.into(),
        }
    }

    /// A configuration error.
    pub fn config(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Config, msg)
    }

    /// An input capture error.
    pub fn input(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Input, msg)
    }

    /// An output capture error.
    pub fn output(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Output, msg)
    }

    /// A configuration file error, keeping the file it names.
    pub fn from_config(e: ConfigError) -> Self {
        let file = e.file().map(|f| f.display().to_string());
        ReplayError {
            kind: ErrorKind::Config,
            file,
            msg: e.message(),
        }
    }

    /// Names the file the error is about.
    pub fn in_file(mut self, file: &Path) -> Self {
        self.file = Some(file.display().to_string());
        self
    }
}

impl fmt::Display for ReplayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(file) => write!(f, "{file}: {}", self.msg),
            None => {
                let what = match self.kind {
                    ErrorKind::Config => "configuration",
                    ErrorKind::Input => "input capture",
                    ErrorKind::Output => "output capture",
                };
                write!(f, "{what}: {}", self.msg)
            }
        }
    }
}

impl std::error::Error for ReplayError {}

/// A frame the engine emitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitted {
    /// The time of the input packet (or timer step) that caused it, ns since the epoch.
    pub ts_ns: u64,
    pub iface: IfaceId,
    pub data: Vec<u8>,
}

/// An event the engine reported ([`Event::Resolve`] included; the replayer answers those).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// The input packet being handled (or about to be, for ticks and steps); `None` after the
    /// last one.
    pub packet: Option<usize>,
    pub event: Event,
}

/// Drives the engine packet by packet, collecting what it emits.
///
/// [`replay`] uses it for a whole capture; the corpus generator uses it to build inputs that
/// answer what the engine sent (a reply must go to the NAT port the engine chose).
#[derive(Debug)]
pub struct Replayer {
    cfg: ReplayConfig,
    engine: Engine,
    ifaces: Vec<(IfaceId, String)>,
    tree: BTreeMap<String, String>,
    /// The vif list as of the last step.
    vifs: Vec<VifEntry>,
    seed: u64,
    /// Steps in order of `at_packet` (stable), with their index in the file.
    steps: Vec<(usize, Step)>,
    next_step: usize,
    packets: usize,
    /// The engine's clock (never goes back).
    now: u64,
    /// The last input packet's time.
    last_ts: u64,
    out: Outbox,
    frames: Vec<Emitted>,
    events: Vec<EventRecord>,
    /// Device MTUs set by `link_mtu` steps, by interface name.
    link_mtu: BTreeMap<String, u16>,
}

impl Replayer {
    /// A fresh engine for this configuration. `seed` overrides the configuration's.
    pub fn new(cfg: &ReplayConfig, seed: Option<u64>) -> Result<Self, ReplayError> {
        cfg.check().map_err(ReplayError::from_config)?;
        let seed = seed.or(cfg.seed).unwrap_or(DEFAULT_SEED);
        let ec = cfg
            .engine_config(&cfg.qubesdb, seed)
            .map_err(ReplayError::from_config)?;
        let engine = Engine::new(ec).map_err(|e| ReplayError::config(e.to_string()))?;
        let ifaces = engine.ifaces();
        let mut steps: Vec<(usize, Step)> = cfg.steps.iter().cloned().enumerate().collect();
        steps.sort_by_key(|(_, s)| s.at_packet);
        Ok(Replayer {
            cfg: cfg.clone(),
            engine,
            ifaces,
            tree: cfg.qubesdb.clone(),
            vifs: cfg.vifs.clone(),
            seed,
            steps,
            next_step: 0,
            packets: 0,
            now: 0,
            last_ts: 0,
            out: Outbox::new(),
            frames: Vec::new(),
            events: Vec::new(),
            link_mtu: BTreeMap::new(),
        })
    }

    /// What the configuration allows on an interface (1500 where nothing is configured).
    fn configured_mtu(&self, name: &str) -> u16 {
        if name == self.cfg.uplink.name {
            return self.cfg.uplink.mtu;
        }
        self.vifs
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.mtu)
            .unwrap_or(qubes_engine::config::DEFAULT_MTU)
    }

    /// A `link_mtu` step: every name checked first, so a bad one changes nothing.
    fn set_link_mtus(&mut self, i: usize, mtus: &BTreeMap<String, u16>) -> Result<(), ReplayError> {
        let mut ids = Vec::with_capacity(mtus.len());
        for (name, &mtu) in mtus {
            let id = self.engine.iface_by_name(name).ok_or_else(|| {
                ReplayError::config(format!(
                    "steps[{i}]: link_mtu {name}: no such interface at this point"
                ))
            })?;
            ids.push((id, name.clone(), mtu));
        }
        for (id, name, mtu) in ids {
            self.link_mtu.insert(name.clone(), mtu);
            let want = crate::service::effective_mtu(self.configured_mtu(&name), Some(mtu));
            self.engine
                .set_mtu(id, want)
                .map_err(|e| ReplayError::config(format!("steps[{i}]: link_mtu: {e}")))?;
        }
        Ok(())
    }

    /// The engine's interfaces, uplink first.
    pub fn ifaces(&self) -> &[(IfaceId, String)] {
        &self.ifaces
    }

    /// The interface id of a name.
    pub fn iface_by_name(&self, name: &str) -> Option<IfaceId> {
        self.engine.iface_by_name(name)
    }

    /// The name of an interface id (empty if the engine has no such interface).
    pub fn iface_name(&self, id: IfaceId) -> &str {
        self.ifaces
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, n)| n.as_str())
            .unwrap_or("")
    }

    /// Input packets handled so far.
    pub fn packets(&self) -> usize {
        self.packets
    }

    /// Everything emitted so far, in order.
    pub fn frames(&self) -> &[Emitted] {
        &self.frames
    }

    /// Every event the engine reported so far.
    pub fn events(&self) -> &[EventRecord] {
        &self.events
    }

    /// The engine (for state inspection).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine's counters per interface, in interface order.
    pub fn counters(&self) -> Vec<Counters> {
        self.ifaces
            .iter()
            .map(|(i, _)| self.engine.counters(*i).copied().unwrap_or_default())
            .collect()
    }

    /// Runs the steps due before the next input packet (as [`Replayer::packet`] does first),
    /// so that a vif a step brings can be looked up for that packet.
    pub fn run_due_steps(&mut self, ts_ns: u64) -> Result<(), ReplayError> {
        self.run_steps(self.packets, ts_ns, Some(self.packets))
    }

    /// Handles one input packet that arrived on `iface` at `ts_ns`.
    pub fn packet(&mut self, ts_ns: u64, iface: IfaceId, data: &[u8]) -> Result<(), ReplayError> {
        if !self.ifaces.iter().any(|(i, _)| *i == iface) {
            return Err(ReplayError::input(format!(
                "packet {}: no engine interface {iface}",
                self.packets
            )));
        }
        let now = self.now.max(ts_ns);
        self.run_steps(self.packets, ts_ns, Some(self.packets))?;
        let now = now.max(self.now);
        self.now = now;
        self.last_ts = ts_ns;
        let cause = Some(self.packets);

        let mut out = std::mem::take(&mut self.out);
        out.clear();
        self.engine.tick(Instant::from_nanos(now), &mut out);
        let r = self.collect(&mut out, ts_ns, cause, None);
        self.out = out;
        r?;

        let mut frame = data.to_vec();
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let verdict = self
            .engine
            .handle(Instant::from_nanos(now), iface, &mut frame, &mut out);
        let fwd = match verdict {
            Verdict::Forward(to) => Some((to, frame)),
            Verdict::Consumed => None,
        };
        let r = self.collect(&mut out, ts_ns, cause, fwd);
        self.out = out;
        r?;
        self.packets += 1;
        Ok(())
    }

    /// Runs the steps due after the last packet; errors on steps beyond it.
    pub fn finish(&mut self) -> Result<(), ReplayError> {
        self.run_steps(self.packets, self.last_ts, None)?;
        if let Some((i, s)) = self.steps.get(self.next_step) {
            return Err(ReplayError::config(format!(
                "steps[{i}]: at_packet {} but the capture has only {} packets",
                s.at_packet, self.packets
            )));
        }
        Ok(())
    }

    fn run_steps(
        &mut self,
        before: usize,
        ts_ns: u64,
        cause: Option<usize>,
    ) -> Result<(), ReplayError> {
        while let Some((i, step)) = self.steps.get(self.next_step).cloned() {
            if step.at_packet > before {
                break;
            }
            self.next_step += 1;
            if let Some(lease) = &step.uplink {
                // What sys-net does when DHCP hands it another lease: the same configuration,
                // the uplink's address, router and upstream DNS replaced.
                self.cfg.uplink.address = Some(lease.address);
                self.cfg.uplink.router = Some(lease.router);
                self.cfg.uplink.dns.clone_from(&lease.dns);
            }
            if !step.qubesdb.is_empty() || step.vifs.is_some() || step.uplink.is_some() {
                for (k, v) in &step.qubesdb {
                    match v {
                        Some(v) => self.tree.insert(k.clone(), v.clone()),
                        None => self.tree.remove(k),
                    };
                }
                if let Some(v) = &step.vifs {
                    self.vifs.clone_from(v);
                }
                let mut cfg = self
                    .cfg
                    .engine_config_with(&self.tree, &self.vifs, self.seed)
                    .map_err(|e| ReplayError::config(format!("steps[{i}]: {}", e.message())))?;
                // Links keep the MTU their device has, as in the service.
                let dev = |n: &str| self.link_mtu.get(n).copied();
                cfg.uplink.mtu =
                    crate::service::effective_mtu(cfg.uplink.mtu, dev(&cfg.uplink.name));
                for c in &mut cfg.clients {
                    c.mtu = crate::service::effective_mtu(c.mtu, dev(&c.vif));
                }
                let now = self.now.max(ts_ns);
                self.now = now;
                let mut out = std::mem::take(&mut self.out);
                out.clear();
                let applied = self.engine.apply(Instant::from_nanos(now), cfg, &mut out);
                // A vif that went takes its device with it: one that comes back is a new
                // device, at its own MTU.
                let names: Vec<String> = self.engine.ifaces().into_iter().map(|(_, n)| n).collect();
                self.link_mtu.retain(|n, _| names.contains(n));
                // A vif that came is an interface of the output capture from now on; one
                // that went stays listed (its earlier frames name it).
                for (id, name) in self.engine.ifaces() {
                    if !self.ifaces.iter().any(|(i, _)| *i == id) {
                        self.ifaces.push((id, name));
                    }
                }
                let r = match applied {
                    Ok(()) => self.collect(&mut out, ts_ns, cause, None),
                    Err(e) => Err(ReplayError::config(format!(
                        "steps[{i}]: the engine refused the configuration: {e}"
                    ))),
                };
                self.out = out;
                r?;
            }
            if !step.link_mtu.is_empty() {
                self.set_link_mtus(i, &step.link_mtu)?;
            }
            if let Some(t) = step.tick_ns {
                if t < self.now {
                    return Err(ReplayError::config(format!(
                        "steps[{i}]: tick_ns {t} is before the time already reached ({})",
                        self.now
                    )));
                }
                self.now = t;
                let mut out = std::mem::take(&mut self.out);
                out.clear();
                self.engine.tick(Instant::from_nanos(t), &mut out);
                let r = self.collect(&mut out, t, cause, None);
                self.out = out;
                r?;
            }
        }
        Ok(())
    }

    fn check_iface(&self, iface: IfaceId) -> Result<(), ReplayError> {
        if self.ifaces.iter().any(|(i, _)| *i == iface) {
            Ok(())
        } else {
            Err(ReplayError::output(format!(
                "the engine emitted a frame on interface {iface}, which does not exist"
            )))
        }
    }

    /// Records what one engine call produced, then answers its name lookups.
    fn collect(
        &mut self,
        out: &mut Outbox,
        ts_ns: u64,
        cause: Option<usize>,
        forwarded: Option<(IfaceId, Vec<u8>)>,
    ) -> Result<(), ReplayError> {
        let mut pending = VecDeque::new();
        self.take(out, ts_ns, cause, &mut pending)?;
        if let Some((iface, data)) = forwarded {
            self.check_iface(iface)?;
            self.frames.push(Emitted { ts_ns, iface, data });
        }
        let mut answered: Vec<String> = Vec::new();
        while let Some(name) = pending.pop_front() {
            if answered.contains(&name) {
                continue;
            }
            if answered.len() >= MAX_RESOLVES_PER_CALL {
                return Err(ReplayError::output(format!(
                    "the engine asked for more than {MAX_RESOLVES_PER_CALL} names in one call"
                )));
            }
            let answer = self.cfg.dns.get(&name).map(|d| (d.addrs.clone(), d.ttl));
            out.clear();
            self.engine
                .dns_answer(Instant::from_nanos(self.now), &name, answer, out);
            answered.push(name);
            self.take(out, ts_ns, cause, &mut pending)?;
        }
        Ok(())
    }

    fn take(
        &mut self,
        out: &Outbox,
        ts_ns: u64,
        cause: Option<usize>,
        pending: &mut VecDeque<String>,
    ) -> Result<(), ReplayError> {
        for (iface, data) in out.frames() {
            self.check_iface(iface)?;
            self.frames.push(Emitted {
                ts_ns,
                iface,
                data: data.to_vec(),
            });
        }
        for ev in &out.events {
            if let Event::Resolve { name } = ev {
                pending.push_back(name.clone());
            }
            self.events.push(EventRecord {
                packet: cause,
                event: ev.clone(),
            });
        }
        Ok(())
    }

    /// The output capture of everything emitted so far.
    pub fn output_pcapng(&self) -> Result<Vec<u8>, ReplayError> {
        let names: Vec<String> = self.ifaces.iter().map(|(_, n)| n.clone()).collect();
        let mut packets = Vec::with_capacity(self.frames.len());
        for f in &self.frames {
            let idx = self
                .ifaces
                .iter()
                .position(|(i, _)| *i == f.iface)
                .ok_or_else(|| {
                    ReplayError::output(format!("no interface {} for a frame", f.iface))
                })?;
            packets.push(CapturePacket {
                iface: idx as u32,
                ts_ns: f.ts_ns,
                data: &f.data,
            });
        }
        write_capture(&names, &packets).map_err(|e| ReplayError::output(e.to_string()))
    }
}

pub use vif_backend::pcap::{read_capture, write_capture, CapturePacket, InputPacket, SNAPLEN};

/// Everything a replay produced.
#[derive(Debug, Clone)]
pub struct ReplayOutput {
    /// The engine's interfaces, uplink first (the output capture's interfaces, in order).
    pub ifaces: Vec<String>,
    /// Input packets replayed.
    pub packets: usize,
    /// The frames emitted, in output order.
    pub frames: Vec<Emitted>,
    /// The events the engine reported.
    pub events: Vec<EventRecord>,
    /// The engine's counters at the end, per interface (same order as `ifaces`).
    pub counters: Vec<Counters>,
    /// The output capture.
    pub pcapng: Vec<u8>,
}

/// Replays a pcapng capture and returns everything produced.
pub fn replay_capture(
    cfg: &ReplayConfig,
    input: &[u8],
    seed: Option<u64>,
) -> Result<ReplayOutput, ReplayError> {
    let packets = read_capture(input).map_err(|e| ReplayError::input(e.to_string()))?;
    let mut r = Replayer::new(cfg, seed)?;
    for (n, p) in packets.iter().enumerate() {
        r.run_due_steps(p.ts_ns)?;
        let iface = r.iface_by_name(&p.if_name).ok_or_else(|| {
            let known: Vec<&str> = r.ifaces().iter().map(|(_, n)| n.as_str()).collect();
            ReplayError::input(format!(
                "packet {n}: interface {:?} is neither the uplink nor a configured vif ({})",
                p.if_name,
                known.join(", ")
            ))
        })?;
        r.packet(p.ts_ns, iface, &p.data)?;
    }
    r.finish()?;
    Ok(ReplayOutput {
        ifaces: r.ifaces().iter().map(|(_, n)| n.clone()).collect(),
        packets: packets.len(),
        pcapng: r.output_pcapng()?,
        counters: r.counters(),
        frames: r.frames,
        events: r.events,
    })
}

/// Replays a pcapng capture (bytes) and returns the output capture (bytes).
pub fn replay(cfg: &ReplayConfig, input: &[u8], seed: Option<u64>) -> Result<Vec<u8>, ReplayError> {
    replay_capture(cfg, input, seed).map(|o| o.pcapng)
}

/// [`replay_capture`] from and to files; errors name the file at fault.
pub fn replay_files(
    config: &Path,
    input: &Path,
    output: &Path,
    seed: Option<u64>,
) -> Result<ReplayOutput, ReplayError> {
    let cfg = ReplayConfig::load(config).map_err(ReplayError::from_config)?;
    let bytes = std::fs::read(input)
        .map_err(|e| ReplayError::input(format!("cannot read: {e}")).in_file(input))?;
    let out = replay_capture(&cfg, &bytes, seed).map_err(|e| match e.kind {
        ErrorKind::Config => e.in_file(config),
        ErrorKind::Input => e.in_file(input),
        ErrorKind::Output => e.in_file(output),
    })?;
    std::fs::write(output, &out.pcapng)
        .map_err(|e| ReplayError::output(format!("cannot write: {e}")).in_file(output))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "\
qubesdb:
  /qubes-ip: 10.137.0.6
  /qubes-gateway: 10.137.0.5
  /qubes-firewall/10.137.0.10: \"\"
  /qubes-firewall/10.137.0.10/policy: drop
  /qubes-firewall/10.137.0.10/0000: action=accept
vifs:
  - {name: vif3.0, ip: 10.137.0.10, mac: \"00:16:3e:5e:6c:0a\"}
dns:
  web.example: {addrs: [198.18.0.10]}
";

    #[test]
    fn parses_the_documented_example() {
        let cfg = ReplayConfig::from_yaml(CONFIG).expect("valid");
        assert_eq!(cfg.uplink, UplinkSection::default());
        assert_eq!(cfg.vifs[0].mac, [0, 0x16, 0x3e, 0x5e, 0x6c, 0x0a]);
        assert_eq!(cfg.dns["web.example"].ttl, 300);
        assert_eq!(cfg.qubesdb["/qubes-firewall/10.137.0.10"], "");
        let ec = cfg.engine_config(&cfg.qubesdb, 7).expect("engine config");
        assert_eq!(ec.seed, 7);
        assert_eq!(ec.clients[0].rules.len(), 2);
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let e = ReplayConfig::from_yaml(&format!("{CONFIG}bogus: 1\n")).expect_err("unknown");
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = ReplayConfig::from_yaml(&CONFIG.replace("mac: ", "mack: ")).expect_err("field");
        assert!(e.to_string().contains("mack"), "{e}");
        let e = ReplayConfig::from_yaml(&CONFIG.replace("00:16:3e:5e:6c:0a", "00:16"))
            .expect_err("mac");
        assert!(e.to_string().contains("MAC"), "{e}");
        let e =
            ReplayConfig::from_yaml(&CONFIG.replace("/qubes-ip:", "qubes-ip:")).expect_err("key");
        assert!(e.to_string().contains("qubes-ip"), "{e}");
        let e = ReplayConfig::from_yaml(&format!("{CONFIG}steps:\n  - at_packet: 1\n"))
            .expect_err("empty step");
        assert!(e.to_string().contains("steps[0]"), "{e}");
        let cfg = ReplayConfig::from_yaml(&CONFIG.replace("  /qubes-ip: 10.137.0.6\n", ""))
            .expect("parses");
        let e = Replayer::new(&cfg, None).expect_err("no ip");
        assert!(e.to_string().contains("/qubes-ip"), "{e}");
    }

    #[test]
    fn step_values_may_be_null_and_scalars() {
        let cfg = ReplayConfig::from_yaml(&format!(
            "{CONFIG}steps:\n  - at_packet: 0\n    qubesdb:\n      /a: null\n      /b: 12\n      /c: true\n"
        ))
        .expect("valid");
        let q = &cfg.steps[0].qubesdb;
        assert_eq!(q["/a"], None);
        assert_eq!(q["/b"].as_deref(), Some("12"));
        assert_eq!(q["/c"].as_deref(), Some("true"));
    }

    #[test]
    fn replay_errors_name_the_packet_or_step() {
        let names = vec!["eth0".to_string(), "vif9.0".to_string()];
        let data = [0u8; 20];
        let cap = write_capture(
            &names,
            &[CapturePacket {
                iface: 1,
                ts_ns: 1,
                data: &data,
            }],
        )
        .expect("write");
        let cfg = ReplayConfig::from_yaml(CONFIG).expect("valid");
        let e = replay(&cfg, &cap, None).expect_err("unknown vif");
        assert!(e.to_string().contains("\"vif9.0\""), "{e}");

        let empty = write_capture(&names, &[]).expect("write");
        let cfg = ReplayConfig::from_yaml(&format!(
            "{CONFIG}steps:\n  - at_packet: 2\n    tick_ns: 5\n"
        ))
        .expect("valid");
        let e = replay(&cfg, &empty, None).expect_err("step beyond the capture");
        assert!(e.to_string().contains("steps[0]: at_packet 2"), "{e}");

        let cfg = ReplayConfig::from_yaml(&format!(
            "{CONFIG}steps:\n  - at_packet: 0\n    qubesdb: {{/qubes-ip: null}}\n"
        ))
        .expect("valid");
        let e = replay(&cfg, &empty, None).expect_err("step removes /qubes-ip");
        assert!(
            e.to_string().contains("steps[0]") && e.to_string().contains("/qubes-ip"),
            "{e}"
        );

        // Same input, same seed: same bytes.
        let cfg = ReplayConfig::from_yaml(CONFIG).expect("valid");
        assert_eq!(
            replay(&cfg, &empty, None).expect("replay"),
            replay(&cfg, &empty, None).expect("replay")
        );
    }

    #[test]
    fn link_mtu_steps_are_checked_by_name_and_value() {
        let names = vec!["eth0".to_string(), "vif3.0".to_string()];
        let empty = write_capture(&names, &[]).expect("write");
        let cfg = ReplayConfig::from_yaml(&format!(
            "{CONFIG}steps:\n  - at_packet: 0\n    link_mtu: {{vif7.0: 1400}}\n"
        ))
        .expect("valid");
        let e = replay(&cfg, &empty, None).expect_err("no such interface");
        assert!(e.to_string().contains("steps[0]: link_mtu vif7.0"), "{e}");
        let e = ReplayConfig::from_yaml(&format!(
            "{CONFIG}steps:\n  - at_packet: 0\n    link_mtu: {{eth0: 60}}\n"
        ))
        .expect_err("below 68");
        assert!(e.to_string().contains("link_mtu eth0: 60"), "{e}");
        let e = ReplayConfig::from_yaml(&format!("{CONFIG}uplink: {{mtu: 20}}\n"))
            .expect_err("below 68");
        assert!(e.to_string().contains("uplink.mtu 20"), "{e}");
        // A good one applies, and a configured lower MTU still caps it.
        let cfg = ReplayConfig::from_yaml(&format!(
            "{CONFIG}uplink: {{mtu: 1300}}\nsteps:\n  - at_packet: 0\n    link_mtu: {{eth0: 1400, vif3.0: 1280}}\n"
        ))
        .expect("valid");
        let mut r = Replayer::new(&cfg, None).expect("replayer");
        r.run_due_steps(1).expect("steps");
        assert_eq!(r.engine.mtu_of(qubes_engine::UPLINK), Some(1300));
        let vif = r.engine.iface_by_name("vif3.0").expect("vif");
        assert_eq!(r.engine.mtu_of(vif), Some(1280));
    }

    #[test]
    fn capture_round_trip_is_exact() {
        let names = vec!["eth0".to_string(), "vif3.0".to_string()];
        let a = [1u8, 2, 3, 4, 5];
        let b = [9u8; 61];
        let pkts = [
            CapturePacket {
                iface: 1,
                ts_ns: 1_704_067_200_000_000_001,
                data: &a,
            },
            CapturePacket {
                iface: 0,
                ts_ns: 1_704_067_200_123_456_789,
                data: &b,
            },
        ];
        let bytes = write_capture(&names, &pkts).expect("write");
        assert_eq!(bytes, write_capture(&names, &pkts).expect("write"));
        let back = read_capture(&bytes).expect("read");
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].if_name, "vif3.0");
        assert_eq!(back[0].ts_ns, 1_704_067_200_000_000_001);
        assert_eq!(back[0].data, a);
        assert_eq!(back[1].if_name, "eth0");
        assert_eq!(back[1].ts_ns, 1_704_067_200_123_456_789);
        assert_eq!(back[1].data, b);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_read_without_panicking(
            cut in 0usize..200,
            edits in proptest::collection::vec((0usize..200, proptest::num::u8::ANY), 0..8),
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
        ) {
            let names = vec!["eth0".to_string(), "vif3.0".to_string()];
            let data = [0x45u8; 30];
            let mut b = write_capture(
                &names,
                &[CapturePacket { iface: 1, ts_ns: 5, data: &data }],
            )
            .expect("write");
            for (at, v) in edits {
                if let Some(x) = b.get_mut(at) {
                    *x = v;
                }
            }
            b.truncate(b.len().min(cut.max(28)));
            b.extend_from_slice(&tail);
            let _ = read_capture(&b);
        }
    }

    #[test]
    fn bad_captures_are_errors_not_panics() {
        let names = vec!["eth0".to_string()];
        let data = [0u8; 20];
        let good = write_capture(
            &names,
            &[CapturePacket {
                iface: 0,
                ts_ns: 1,
                data: &data,
            }],
        )
        .expect("write");
        assert!(read_capture(&[]).is_err());
        assert!(read_capture(&[0xd4, 0xc3, 0xb2, 0xa1, 0, 0]).is_err());
        for cut in 0..good.len() {
            let _ = read_capture(&good[..cut]);
        }
        for i in 0..good.len() {
            for v in [0u8, 0xff, 0x80, 1] {
                let mut b = good.clone();
                b[i] = v;
                let _ = read_capture(&b);
            }
        }
        let mut no_name = good.clone();
        // The if_name option code (2) of the IDB, right after its 8-byte fixed part.
        let pos = 28 + 8 + 8;
        assert_eq!(no_name[pos], 2);
        no_name[pos] = 1; // becomes a comment
        let e = read_capture(&no_name).expect_err("unnamed");
        assert!(e.to_string().contains("no name"), "{e}");
    }
}
