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
//! YAML, every field but `qubesdb` optional, unknown fields rejected:
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
//! conntrack_max: 65536    # optional bound on tracked flows
//! seed: 1                 # optional NAT seed (the --seed option wins over it)
//! steps:                  # optional changes during the capture
//!   - at_packet: 3        # before input packet 3 (0-based; the packet count = after the last)
//!     qubesdb:            # keys to set, or to remove with null
//!       /qubes-firewall/10.137.0.10/0000: action=drop
//!   - at_packet: 5
//!     tick_ns: 1704067230000000000   # run the engine's timers at this time (ns, capture clock)
//! ```
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

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::Duration;

use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use pcap_file::pcapng::blocks::section_header::SectionHeaderBlock;
use pcap_file::pcapng::{Block, PcapNgParser, PcapNgWriter};
use pcap_file::{DataLink, Endianness, PcapError};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::config::{self, EngineConfig, Mac, VifInfo, DEFAULT_QUBE_MAC};
use crate::engine::{Counters, Engine, Event, IfaceId, Outbox, Verdict};

/// The NAT seed when neither `--seed` nor the configuration gives one, so a capture replays the
/// same way every time.
pub const DEFAULT_SEED: u64 = 0x5eed;

/// Snapshot length written in the output's interface descriptions.
pub const SNAPLEN: u32 = 65_535;

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

fn default_uplink_name() -> String {
    "eth0".to_string()
}

fn default_mtu() -> u16 {
    1500
}

fn default_ttl() -> u32 {
    300
}

fn default_mac() -> Mac {
    DEFAULT_QUBE_MAC
}

/// The `uplink` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkSection {
    #[serde(default = "default_uplink_name")]
    pub name: String,
    #[serde(default = "default_mtu")]
    pub mtu: u16,
}

impl Default for UplinkSection {
    fn default() -> Self {
        UplinkSection {
            name: default_uplink_name(),
            mtu: default_mtu(),
        }
    }
}

/// One entry of `vifs`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VifEntry {
    pub name: String,
    pub ip: Ipv4Addr,
    #[serde(default)]
    pub ip6: Option<Ipv6Addr>,
    #[serde(default = "default_mac", deserialize_with = "de_mac")]
    pub mac: Mac,
    #[serde(default)]
    pub mtu: Option<u16>,
}

/// One entry of `dns`: the answer to a name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsEntry {
    pub addrs: Vec<IpAddr>,
    /// Seconds.
    #[serde(default = "default_ttl")]
    pub ttl: u32,
}

/// One entry of `steps`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Done just before this input packet (0-based); the packet count means after the last.
    pub at_packet: usize,
    /// QubesDB keys to set (a value) or remove (null).
    #[serde(default, deserialize_with = "de_qdb_changes")]
    pub qubesdb: BTreeMap<String, Option<String>>,
    /// Runs the engine's timers at this time (ns, the capture's clock).
    #[serde(default)]
    pub tick_ns: Option<u64>,
}

/// A replay configuration (see the module documentation for the file format).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayConfig {
    #[serde(default)]
    pub uplink: UplinkSection,
    #[serde(deserialize_with = "de_qdb")]
    pub qubesdb: BTreeMap<String, String>,
    #[serde(default)]
    pub vifs: Vec<VifEntry>,
    #[serde(default)]
    pub dns: BTreeMap<String, DnsEntry>,
    #[serde(default)]
    pub conntrack_max: Option<usize>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub steps: Vec<Step>,
}

/// A QubesDB value: YAML scalars of any type are taken as their text.
struct QdbValue(Option<String>);

impl<'de> Deserialize<'de> for QdbValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = QdbValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a QubesDB value (a string, number or boolean; null to remove a key)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<QdbValue, E> {
                Ok(QdbValue(Some(v.to_string())))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<QdbValue, E> {
                Ok(QdbValue(Some(v.to_string())))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<QdbValue, E> {
                Ok(QdbValue(Some(v.to_string())))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<QdbValue, E> {
                Ok(QdbValue(Some(v.to_string())))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<QdbValue, E> {
                Ok(QdbValue(Some(v.to_string())))
            }
            fn visit_unit<E: de::Error>(self) -> Result<QdbValue, E> {
                Ok(QdbValue(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<QdbValue, E> {
                Ok(QdbValue(None))
            }
        }
        d.deserialize_any(V)
    }
}

fn check_qdb_key<E: de::Error>(k: &str) -> Result<(), E> {
    if k.starts_with('/') {
        Ok(())
    } else {
        Err(E::custom(format!(
            "QubesDB key {k:?} does not start with '/'"
        )))
    }
}

fn de_qdb<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let raw = BTreeMap::<String, QdbValue>::deserialize(d)?;
    let mut map = BTreeMap::new();
    for (k, v) in raw {
        check_qdb_key(&k)?;
        match v.0 {
            Some(v) => map.insert(k, v),
            None => {
                return Err(de::Error::custom(format!(
                    "QubesDB key {k} has no value (write \"\" for an empty one; null only \
                     removes keys in steps)"
                )))
            }
        };
    }
    Ok(map)
}

fn de_qdb_changes<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, Option<String>>, D::Error> {
    let raw = BTreeMap::<String, QdbValue>::deserialize(d)?;
    let mut map = BTreeMap::new();
    for (k, v) in raw {
        check_qdb_key(&k)?;
        map.insert(k, v.0);
    }
    Ok(map)
}

fn de_mac<'de, D: Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
    let s = String::deserialize(d)?;
    config::parse_mac(&s).map_err(de::Error::custom)
}

impl ReplayConfig {
    /// Parses a configuration from YAML text.
    pub fn from_yaml(text: &str) -> Result<Self, ReplayError> {
        let cfg: ReplayConfig =
            serde_yaml::from_str(text).map_err(|e| ReplayError::config(e.to_string()))?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Reads a configuration file; errors name the file.
    pub fn load(path: &Path) -> Result<Self, ReplayError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ReplayError::config(format!("cannot read: {e}")).in_file(path))?;
        Self::from_yaml(&text).map_err(|e| e.in_file(path))
    }

    fn check(&self) -> Result<(), ReplayError> {
        for (i, s) in self.steps.iter().enumerate() {
            if s.qubesdb.is_empty() && s.tick_ns.is_none() {
                return Err(ReplayError::config(format!(
                    "steps[{i}] (at_packet {}) has nothing to do: give qubesdb or tick_ns",
                    s.at_packet
                )));
            }
        }
        if self.conntrack_max == Some(0) {
            return Err(ReplayError::config("conntrack_max must be at least 1"));
        }
        for (name, d) in &self.dns {
            if name.is_empty() {
                return Err(ReplayError::config("dns: empty name"));
            }
            if d.addrs.is_empty() {
                return Err(ReplayError::config(format!(
                    "dns: {name} has no addrs (leave a name out to make it fail to resolve)"
                )));
            }
        }
        Ok(())
    }

    /// The vif list as XenStore would give it.
    pub fn vif_infos(&self) -> Vec<VifInfo> {
        self.vifs
            .iter()
            .map(|v| VifInfo {
                name: v.name.clone(),
                ip: v.ip,
                ip6: v.ip6,
                mac: v.mac,
            })
            .collect()
    }

    /// The engine configuration for a QubesDB tree (the configured one, or one changed by steps).
    pub fn engine_config(
        &self,
        tree: &BTreeMap<String, String>,
        seed: u64,
    ) -> Result<EngineConfig, ReplayError> {
        let mut cfg =
            config::from_tree(tree, &self.vif_infos(), &self.uplink.name, self.uplink.mtu)
                .map_err(|e| ReplayError::config(e.0))?;
        for (client, vif) in cfg.clients.iter_mut().zip(&self.vifs) {
            if let Some(mtu) = vif.mtu {
                client.mtu = mtu;
            }
        }
        if let Some(max) = self.conntrack_max {
            cfg.conntrack_max = max;
        }
        cfg.seed = seed;
        Ok(cfg)
    }
}

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
}

impl Replayer {
    /// A fresh engine for this configuration. `seed` overrides the configuration's.
    pub fn new(cfg: &ReplayConfig, seed: Option<u64>) -> Result<Self, ReplayError> {
        cfg.check()?;
        let seed = seed.or(cfg.seed).unwrap_or(DEFAULT_SEED);
        let engine = Engine::new(cfg.engine_config(&cfg.qubesdb, seed)?)
            .map_err(|e| ReplayError::config(e.0))?;
        let ifaces = engine.ifaces();
        let mut steps: Vec<(usize, Step)> = cfg.steps.iter().cloned().enumerate().collect();
        steps.sort_by_key(|(_, s)| s.at_packet);
        Ok(Replayer {
            cfg: cfg.clone(),
            engine,
            ifaces,
            tree: cfg.qubesdb.clone(),
            seed,
            steps,
            next_step: 0,
            packets: 0,
            now: 0,
            last_ts: 0,
            out: Outbox::new(),
            frames: Vec::new(),
            events: Vec::new(),
        })
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
        self.engine.tick(now, &mut out);
        let r = self.collect(&mut out, ts_ns, cause, None);
        self.out = out;
        r?;

        let mut frame = data.to_vec();
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let verdict = self.engine.handle(now, iface, &mut frame, &mut out);
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
            if !step.qubesdb.is_empty() {
                for (k, v) in &step.qubesdb {
                    match v {
                        Some(v) => self.tree.insert(k.clone(), v.clone()),
                        None => self.tree.remove(k),
                    };
                }
                let cfg = self
                    .cfg
                    .engine_config(&self.tree, self.seed)
                    .map_err(|e| ReplayError::config(format!("steps[{i}]: {}", e.msg)))?;
                let now = self.now.max(ts_ns);
                self.now = now;
                let mut out = std::mem::take(&mut self.out);
                out.clear();
                let applied = self.engine.apply(now, cfg, &mut out);
                let r = match applied {
                    Ok(()) => self.collect(&mut out, ts_ns, cause, None),
                    Err(e) => Err(ReplayError::config(format!(
                        "steps[{i}]: the engine refused the configuration: {e}"
                    ))),
                };
                self.out = out;
                r?;
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
                self.engine.tick(t, &mut out);
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
            self.engine.dns_answer(self.now, &name, answer, out);
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
        write_capture(&names, &packets)
    }
}

/// One packet of an input capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputPacket {
    /// Nanoseconds since the Unix epoch.
    pub ts_ns: u64,
    /// The interface name it was captured on.
    pub if_name: String,
    pub data: Vec<u8>,
}

/// One packet to write with [`write_capture`].
#[derive(Debug, Clone, Copy)]
pub struct CapturePacket<'a> {
    /// Index into the interface list.
    pub iface: u32,
    pub ts_ns: u64,
    pub data: &'a [u8],
}

fn pcap_err(e: PcapError) -> String {
    match e {
        PcapError::IncompleteBuffer => "the file is cut short".to_string(),
        e => e.to_string(),
    }
}

/// Converts a raw pcapng timestamp to ns with the interface's `if_tsresol` and `if_tsoffset`.
fn timestamp_ns(raw: u128, tsresol: u8, offset_s: u64) -> Option<u64> {
    let ns: u128 = if tsresol & 0x80 == 0 {
        let exp = u32::from(tsresol);
        if exp <= 9 {
            raw.checked_mul(10u128.pow(9 - exp))?
        } else if exp - 9 <= 38 {
            raw / 10u128.pow(exp - 9)
        } else {
            0
        }
    } else {
        let n = u32::from(tsresol & 0x7f);
        raw.checked_mul(1_000_000_000)? >> n
    };
    let ns = ns.checked_add(u128::from(offset_s) * 1_000_000_000)?;
    u64::try_from(ns).ok()
}

/// Reads a pcapng capture: every Enhanced Packet Block with its interface name and time.
pub fn read_capture(bytes: &[u8]) -> Result<Vec<InputPacket>, ReplayError> {
    if bytes.len() >= 4 {
        let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if matches!(
            magic,
            [0xd4, 0xc3, 0xb2, 0xa1]
                | [0xa1, 0xb2, 0xc3, 0xd4]
                | [0x4d, 0x3c, 0xb2, 0xa1]
                | [0xa1, 0xb2, 0x3c, 0x4d]
        ) {
            return Err(ReplayError::input(
                "this is a classic pcap file; replay needs pcapng with interface names \
                 (e.g. editcap -F pcapng, then name the interfaces)",
            ));
        }
    }
    let (mut rest, mut parser) = PcapNgParser::new(bytes)
        .map_err(|e| ReplayError::input(format!("not a pcapng capture: {}", pcap_err(e))))?;
    let mut packets = Vec::new();
    let mut block_no = 1usize;
    while !rest.is_empty() {
        let (r, block) = parser
            .next_block(rest)
            .map_err(|e| ReplayError::input(format!("block {block_no}: {}", pcap_err(e))))?;
        rest = r;
        match block {
            Block::EnhancedPacket(epb) => {
                let idb = parser
                    .interfaces()
                    .get(epb.interface_id as usize)
                    .ok_or_else(|| {
                        ReplayError::input(format!(
                        "block {block_no}: packet on interface {} but the section describes {} \
                         interface(s)",
                        epb.interface_id,
                        parser.interfaces().len()
                    ))
                    })?;
                let mut name = None;
                let mut tsresol = 6u8;
                let mut offset = 0u64;
                for opt in &idb.options {
                    match opt {
                        InterfaceDescriptionOption::IfName(n) => name = Some(n.to_string()),
                        InterfaceDescriptionOption::IfTsResol(r) => tsresol = *r,
                        InterfaceDescriptionOption::IfTsOffset(o) => offset = *o,
                        _ => {}
                    }
                }
                let name = name.ok_or_else(|| {
                    ReplayError::input(format!(
                        "block {block_no}: interface {} has no name (if_name option); the name \
                         says where the packet arrived",
                        epb.interface_id
                    ))
                })?;
                if idb.linktype != DataLink::ETHERNET {
                    return Err(ReplayError::input(format!(
                        "block {block_no}: interface {name} has link type {:?}; only Ethernet \
                         is supported",
                        idb.linktype
                    )));
                }
                let ts_ns =
                    timestamp_ns(epb.timestamp.as_nanos(), tsresol, offset).ok_or_else(|| {
                        ReplayError::input(format!("block {block_no}: timestamp out of range"))
                    })?;
                packets.push(InputPacket {
                    ts_ns,
                    if_name: name,
                    data: epb.data.into_owned(),
                });
            }
            Block::SimplePacket(_) | Block::Packet(_) => {
                return Err(ReplayError::input(format!(
                    "block {block_no}: simple and obsolete packet blocks are not supported \
                     (they lack the interface or the time); use enhanced packet blocks"
                )));
            }
            _ => {}
        }
        block_no += 1;
    }
    Ok(packets)
}

/// Writes a pcapng capture: one little-endian section, one Ethernet interface per name (with
/// `if_name` and `if_tsresol` 9), and the packets. Byte-for-byte deterministic.
pub fn write_capture(
    ifaces: &[String],
    packets: &[CapturePacket<'_>],
) -> Result<Vec<u8>, ReplayError> {
    let err = |e: PcapError| ReplayError::output(pcap_err(e));
    let section = SectionHeaderBlock {
        endianness: Endianness::Little,
        ..Default::default()
    };
    let mut w = PcapNgWriter::with_section_header(Vec::new(), section).map_err(err)?;
    for name in ifaces {
        let idb = InterfaceDescriptionBlock {
            linktype: DataLink::ETHERNET,
            snaplen: SNAPLEN,
            options: vec![
                InterfaceDescriptionOption::IfName(Cow::Borrowed(name.as_str())),
                InterfaceDescriptionOption::IfTsResol(9),
            ],
        };
        w.write_block(&Block::InterfaceDescription(idb))
            .map_err(err)?;
    }
    for p in packets {
        let len = u32::try_from(p.data.len())
            .map_err(|_| ReplayError::output("a frame longer than 4 GiB"))?;
        let epb = EnhancedPacketBlock {
            interface_id: p.iface,
            timestamp: Duration::from_nanos(p.ts_ns),
            original_len: len,
            data: Cow::Borrowed(p.data),
            options: vec![],
        };
        w.write_block(&Block::EnhancedPacket(epb)).map_err(err)?;
    }
    Ok(w.into_inner())
}

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
    let packets = read_capture(input)?;
    let mut r = Replayer::new(cfg, seed)?;
    for (n, p) in packets.iter().enumerate() {
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
    let cfg = ReplayConfig::load(config)?;
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

    #[test]
    fn timestamps_follow_tsresol() {
        assert_eq!(timestamp_ns(5, 6, 0), Some(5_000));
        assert_eq!(timestamp_ns(5, 9, 0), Some(5));
        assert_eq!(timestamp_ns(5_000, 12, 0), Some(5));
        assert_eq!(timestamp_ns(1 << 20, 0x80 | 20, 1), Some(2_000_000_000));
        assert_eq!(timestamp_ns(u128::from(u64::MAX), 0, 0), None);
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
