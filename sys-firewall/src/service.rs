//! `sys-firewall run`: the engine on real interfaces.
//!
//! One thread, one `poll(2)` loop over the devices (AF_PACKET sockets from vif-backend), the
//! netlink link monitor, the control socket and the QubesDB connection, each found by its
//! token. Frames go through the engine; what the engine delivers locally goes to the host
//! stack, where the firewall's own DNS lookups for `dsthost` rules live.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant as Clock};

use qubes_engine::config::{format_mac, EngineConfig};
use qubes_engine::{Engine, Event, IfaceId, Instant, Outbox, Verdict, UPLINK};
use qubes_service_runtime::control::ControlServer;
use qubes_service_runtime::droplog::DropLog;
use qubes_service_runtime::event_loop::{Poller, Token};
use qubes_service_runtime::local::{dns_servers, LocalServices};
use qubes_service_runtime::memory;
use qubes_service_runtime::signals::Signals;
pub use qubes_service_runtime::source::Source;
use qubes_service_runtime::source::{ConfigSource, Desired};
use qubes_service_runtime::ServiceError;
use vif_backend::afpacket::PacketSocket;
use vif_backend::link::{LinkEvent, LinkMonitor};
use vif_backend::{offload, sys, Device, RxBurst, TxFrame};

/// `sys-firewall run` options.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub source: Source,
    /// The control socket (`status`, `reload`).
    pub control: PathBuf,
}

/// Frames handled per interface before looking at the others, so one busy vif cannot starve
/// the rest.
const BURST: usize = 64;
/// Timer granularity.
const TICK: Duration = Duration::from_millis(100);
/// How often a YAML configuration file is checked for changes.
const FILE_CHECK: Duration = Duration::from_millis(200);

const TOKEN_LINKS: Token = 1;
const TOKEN_CONTROL: Token = 2;
const TOKEN_QUBESDB: Token = 3;
/// Devices are registered as `TOKEN_DEVICE + engine interface id`.
const TOKEN_DEVICE: Token = 1 << 32;

struct Service {
    engine: Engine,
    /// Devices by engine interface id (stable: a vif keeps its id while it exists).
    devices: BTreeMap<IfaceId, PacketSocket>,
    links: LinkMonitor,
    control: ControlServer,
    source: ConfigSource,
    desired: Desired,
    /// The connection table size when the configuration names none: from the machine's
    /// memory, as Linux's `nf_conntrack_max` (runtime `memory`).
    conntrack_default: usize,
    generation: u64,
    start: Clock,
    out: Outbox,
    local: LocalServices,
    drops: DropLog,
    last_file_check: Clock,
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        if f.read_exact(&mut b).is_ok() {
            return u64::from_le_bytes(b);
        }
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ u64::from(std::process::id()) << 32
}

/// The engine configuration for what is wanted and what exists: vifs whose netdev is not
/// there are left out until it appears. A table size the configuration gives
/// (`conntrack_max`, `/qubes-conntrack-max`) wins over `conntrack_default`.
fn engine_config(
    d: &Desired,
    seed: u64,
    conntrack_default: usize,
) -> Result<EngineConfig, ServiceError> {
    let mut cfg = d.engine_config(seed, |name| sys::if_index(name).is_some())?;
    if d.conntrack_max.is_none() {
        cfg.conntrack_max = conntrack_default;
    }
    Ok(cfg)
}

/// Runs the service until SIGTERM/SIGINT.
pub fn run(opts: RunOptions) -> Result<(), ServiceError> {
    let signals = Signals::install()?;
    let (source, desired) = ConfigSource::open(&opts.source)?;
    if sys::if_index(&desired.uplink).is_none() {
        return Err(ServiceError::NoUplink {
            iface: desired.uplink.clone(),
        });
    }
    let seed = random_seed();
    let (conntrack_default, ram) = memory::default_conntrack_max();
    match ram {
        Ok(bytes) => tracing::info!(
            mem_total = bytes,
            conntrack_default,
            "connection table size from memory, as Linux's nf_conntrack_max"
        ),
        Err(error) => tracing::warn!(
            %error,
            conntrack_default,
            "cannot read the memory size; default connection table size"
        ),
    }
    let cfg = engine_config(&desired, seed, conntrack_default)?;
    let local = LocalServices::new(Instant::ZERO, &cfg, dns_servers(&desired.tree));
    let engine = Engine::new(cfg).map_err(|e| ServiceError::Config(e.into()))?;
    let control = ControlServer::bind(&opts.control, "sys-firewall")?;
    let links = LinkMonitor::open().map_err(|source| ServiceError::System {
        what: "netlink link monitor",
        source,
    })?;
    let mut svc = Service {
        engine,
        devices: BTreeMap::new(),
        links,
        control,
        source,
        desired,
        conntrack_default,
        generation: 1,
        start: Clock::now(),
        out: Outbox::new(),
        local,
        drops: DropLog::new(),
        last_file_check: Clock::now(),
    };
    svc.sync_devices()?;
    svc.control.publish()?;
    svc.flush();
    svc.report_handled();
    tracing::info!(
        generation = svc.generation,
        clients = svc.engine.config().clients.len(),
        "sys-firewall running"
    );
    let result = svc.main_loop(&signals);
    tracing::info!("sys-firewall stopped; clients have no forwarding");
    result
}

impl Service {
    fn now(&self) -> Instant {
        Instant::from_nanos(self.start.elapsed().as_nanos() as u64)
    }

    /// Opens devices for interfaces the engine has and closes those it no longer has.
    fn sync_devices(&mut self) -> Result<(), ServiceError> {
        let ifaces = self.engine.ifaces();
        self.devices.retain(|id, dev| {
            ifaces
                .iter()
                .any(|(i, n)| i == id && n.as_str() == dev.name())
        });
        for (id, name) in &ifaces {
            if self.devices.contains_key(id) {
                continue;
            }
            match PacketSocket::open(name) {
                Ok(s) => {
                    for knob in sys::quiet_kernel(name) {
                        tracing::warn!(iface = name.as_str(), knob, "could not set");
                    }
                    tracing::info!(iface = name.as_str(), "attached");
                    self.devices.insert(*id, s);
                }
                Err(source) if *id == UPLINK => {
                    return Err(ServiceError::Device {
                        iface: name.clone(),
                        source,
                    });
                }
                Err(e) => tracing::warn!(iface = name.as_str(), error = %e, "cannot attach"),
            }
        }
        let names: Vec<String> = ifaces.into_iter().map(|(_, n)| n).collect();
        self.drops.retain(|n| names.iter().any(|m| m == n));
        Ok(())
    }

    /// Re-reads the configuration and applies it; on error keeps the old one running.
    fn reload(&mut self, why: &str) -> Result<(), ServiceError> {
        let desired = self.source.reread()?;
        self.apply(desired, why)
    }

    fn apply(&mut self, desired: Desired, why: &str) -> Result<(), ServiceError> {
        let t0 = Clock::now();
        let seed = self.engine.config().seed;
        let cfg = engine_config(&desired, seed, self.conntrack_default)?;
        let now = self.now();
        self.engine
            .apply(now, cfg, &mut self.out)
            .map_err(|e| ServiceError::Config(e.into()))?;
        self.local
            .configure(self.engine.config(), dns_servers(&desired.tree));
        self.desired = desired;
        self.generation += 1;
        self.sync_devices()?;
        self.flush();
        self.report_handled();
        tracing::info!(
            generation = self.generation,
            why,
            micros = t0.elapsed().as_micros() as u64,
            "configuration applied"
        );
        Ok(())
    }

    /// Tells QubesDB which clients' rules are in force (`/qubes-firewall-handled/<ip>`).
    fn report_handled(&mut self) {
        let cfg = self.engine.config().clone();
        if let Some(q) = self.source.qubesdb() {
            q.report_handled(&cfg);
        }
    }

    fn main_loop(&mut self, signals: &Signals) -> Result<(), ServiceError> {
        let mut burst = RxBurst::new();
        let mut seg = Vec::with_capacity(vif_backend::MAX_FRAME);
        let mut poller = Poller::new();
        let mut ready = Vec::new();
        let mut last_tick = Clock::now();
        while !signals.stop_requested() {
            if signals.take_reload() {
                if let Err(e) = self.reload("SIGHUP") {
                    tracing::error!(
                        error = %e,
                        "reload failed; keeping the running configuration"
                    );
                }
            }
            poller.clear();
            poller.register(TOKEN_LINKS, self.links.as_raw_fd());
            poller.register(TOKEN_CONTROL, self.control.as_raw_fd());
            let mut queued = false;
            if let Some(q) = self.source.qubesdb() {
                poller.register(TOKEN_QUBESDB, q.as_raw_fd());
                queued = q.queued() > 0;
            }
            for (id, dev) in &self.devices {
                if let Some(fd) = dev.raw_fd() {
                    poller.register(TOKEN_DEVICE + Token::from(*id), fd);
                }
            }
            let wait = if queued {
                Duration::ZERO
            } else {
                TICK.saturating_sub(last_tick.elapsed())
            };
            poller
                .wait(wait, &mut ready)
                .map_err(|source| ServiceError::System {
                    what: "poll",
                    source,
                })?;
            let mut qdb_ready = queued;
            for &t in &ready {
                match t {
                    TOKEN_LINKS => self.link_events(),
                    TOKEN_CONTROL => self.control_requests(),
                    TOKEN_QUBESDB => qdb_ready = true,
                    t if t >= TOKEN_DEVICE => {
                        if let Ok(id) = IfaceId::try_from(t - TOKEN_DEVICE) {
                            self.pump(id, &mut burst, &mut seg);
                        }
                    }
                    _ => {}
                }
            }
            if qdb_ready {
                self.qubesdb_events()?;
            }
            if last_tick.elapsed() >= TICK {
                last_tick = Clock::now();
                let now = self.now();
                self.engine.tick(now, &mut self.out);
                self.flush();
                self.check_file();
            }
        }
        Ok(())
    }

    /// Reads and handles up to [`BURST`] frames from one interface.
    fn pump(&mut self, iface: IfaceId, burst: &mut RxBurst, seg: &mut Vec<u8>) {
        burst.clear();
        let Some(dev) = self.devices.get_mut(&iface) else {
            return;
        };
        if let Err(e) = dev.recv_burst(burst, BURST) {
            tracing::warn!(iface = dev.name(), error = %e, "receive failed");
            return;
        }
        for i in 0..burst.len() {
            let now = self.now();
            let Some((frame, meta)) = burst.frame_mut(i) else {
                break;
            };
            let verdict = match meta.for_engine() {
                // Forwarded as it came: the kernel on the other side finishes the checksum and
                // cuts the segments, as it would have for a kernel router.
                Some(o) if o == qubes_engine::Offload::NONE => {
                    self.engine.handle(now, iface, frame, &mut self.out)
                }
                Some(o) => self
                    .engine
                    .handle_offloaded(now, iface, frame, o, &mut self.out),
                None => {
                    // A kind of offload we do not forward whole: finish it here.
                    let engine = &mut self.engine;
                    let out = &mut self.out;
                    let mut forwards: Vec<(IfaceId, Vec<u8>)> = Vec::new();
                    let done = offload::finish(&meta, frame, seg, |f| {
                        if let Verdict::Forward(to) = engine.handle(now, iface, f, out) {
                            forwards.push((to, f.to_vec()));
                        }
                    });
                    if let Err(e) = done {
                        tracing::debug!(iface, error = ?e, "frame with unusable offload header");
                    }
                    for (to, f) in &forwards {
                        self.send(*to, f, vif_backend::Offload::NONE);
                    }
                    Verdict::Consumed
                }
            };
            if let Verdict::Forward(to) = verdict {
                if let Some((frame, meta)) = burst.frame(i) {
                    self.send(to, frame, meta);
                }
            }
            if self.out.frame_count() > 0
                || !self.out.events.is_empty()
                || self.out.local_packets().next().is_some()
            {
                self.flush();
            }
        }
    }

    fn send(&mut self, to: IfaceId, frame: &[u8], offload: vif_backend::Offload) {
        if let Some(dev) = self.devices.get_mut(&to) {
            if let Err(e) = dev.send_burst(&[TxFrame { frame, offload }]) {
                tracing::debug!(iface = dev.name(), error = %e, "send failed");
            }
        }
    }

    /// Sends the outbox, acts on the engine's events and runs the host stack on what was
    /// delivered locally, until nothing more comes of it.
    fn flush(&mut self) {
        for _ in 0..8 {
            let mut done = std::mem::take(&mut self.out);
            for (to, frame) in done.frames() {
                self.send(to, frame, vif_backend::Offload::NONE);
            }
            let now = self.now();
            for ev in std::mem::take(&mut done.events) {
                self.event(now, ev);
            }
            self.local
                .after_engine(now, &mut self.engine, &done, &mut self.out);
            if self.out.frame_count() == 0
                && self.out.events.is_empty()
                && self.out.local_packets().next().is_none()
            {
                return;
            }
        }
    }

    fn event(&mut self, now: Instant, ev: Event) {
        match ev {
            Event::Resolve { name } => match self.desired.static_dns.get(&name).cloned() {
                Some(e) => {
                    self.engine
                        .dns_answer(now, &name, Some((e.addrs, e.ttl)), &mut self.out)
                }
                None => self.local.resolve(now, &name),
            },
            Event::Dropped { iface, reason } => {
                let name = self.engine.iface_name(iface).unwrap_or("?").to_string();
                self.drops.note(now, &name, reason);
            }
            Event::ClientBlocked { iface, error } => tracing::warn!(
                iface = self.engine.iface_name(iface).unwrap_or("?"),
                error,
                "client blocked"
            ),
            Event::FlowsCut { iface, count } => tracing::info!(
                iface = self.engine.iface_name(iface).unwrap_or("?"),
                count,
                "flows cut by new rules"
            ),
        }
    }

    fn link_events(&mut self) {
        let events = match self.links.events() {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "netlink");
                return;
            }
        };
        let attached = |svc: &Self, n: &str| svc.devices.values().any(|d| d.name() == n);
        let relevant = events.iter().any(|e| match e {
            LinkEvent::Overrun => true,
            LinkEvent::Changed(s) => {
                self.desired.vifs.iter().any(|(v, _)| v.name == s.name) && !attached(self, &s.name)
            }
            LinkEvent::Gone { name } => attached(self, name),
        });
        if relevant {
            let desired = self.desired.clone();
            if let Err(e) = self.apply(desired, "vif appeared or went away") {
                tracing::error!(error = %e, "could not follow link change");
            }
        }
    }

    fn check_file(&mut self) {
        if self.last_file_check.elapsed() < FILE_CHECK {
            return;
        }
        self.last_file_check = Clock::now();
        if self.source.file_changed() {
            if let Err(e) = self.reload("configuration file changed") {
                tracing::error!(
                    error = %e,
                    "reload failed; keeping the running configuration"
                );
            }
        }
    }

    fn qubesdb_events(&mut self) -> Result<(), ServiceError> {
        let Some(q) = self.source.qubesdb() else {
            return Ok(());
        };
        if q.poll_watches()? {
            let d = q.desired()?;
            if let Err(e) = self.apply(d, "QubesDB commit") {
                tracing::error!(error = %e, "QubesDB change could not be applied");
            }
        }
        Ok(())
    }

    fn control_requests(&mut self) {
        while let Some(req) = self.control.next_request() {
            let answer = match req.command() {
                "status" => self.status(),
                "reload" => match self.reload("control socket") {
                    Ok(()) => format!("ok config-generation {}\n", self.generation),
                    Err(e) => format!("error {e}\n"),
                },
                other => format!("error unknown command {other:?} (status, reload)\n"),
            };
            req.reply(&answer);
        }
    }

    /// The `status` text.
    fn status(&self) -> String {
        let cfg = self.engine.config();
        let mut s = String::new();
        let (mac, known) = self.engine.netvm_mac();
        s.push_str(&format!("config-generation {}\n", self.generation));
        s.push_str(&format!(
            "uplink {} address {} mac {} netvm {} mac {}{}\n",
            cfg.uplink.name,
            cfg.uplink.ip,
            format_mac(&cfg.uplink.mac),
            cfg.uplink.gateway,
            format_mac(&mac),
            if known { "" } else { " (not learned yet)" }
        ));
        let ct = self.engine.conntrack();
        s.push_str(&format!("flows {} of {}\n", ct.len(), ct.max_flows()));
        let counters_line = |c: &qubes_engine::engine::Counters| {
            c.iter()
                .filter(|(_, n)| *n > 0)
                .map(|(r, n)| format!("{}={n}", r.name()))
                .collect::<Vec<_>>()
                .join(" ")
        };
        if let Some(c) = self.engine.counters(UPLINK) {
            s.push_str(&format!("  counters {}\n", counters_line(c)));
        }
        for c in &cfg.clients {
            let Some(id) = self.engine.iface_by_name(&c.vif) else {
                continue;
            };
            let rules = c.rules.iter().filter(|(k, _)| k != "policy").count();
            let flows = ct.iter().filter(|(_, f)| f.key.client == id).count();
            s.push_str(&format!(
                "client {} address {}{} rules {} flows {}{}\n",
                c.vif,
                c.ip,
                c.ip6.map(|a| format!(" {a}")).unwrap_or_default(),
                rules,
                flows,
                match self.engine.blocked(id) {
                    Some(why) => format!(" BLOCKED: {why}"),
                    None => String::new(),
                }
            ));
            if let Some(cn) = self.engine.counters(id) {
                s.push_str(&format!("  counters {}\n", counters_line(cn)));
            }
        }
        let missing: Vec<&str> = self
            .desired
            .vifs
            .iter()
            .filter(|(v, _)| !cfg.clients.iter().any(|c| c.vif == v.name))
            .map(|(v, _)| v.name.as_str())
            .collect();
        if !missing.is_empty() {
            s.push_str(&format!("waiting for vifs {}\n", missing.join(" ")));
        }
        s
    }
}

/// `sys-firewall status` / `reload`: one request on the control socket.
pub fn control(socket: &std::path::Path, command: &str) -> Result<String, ServiceError> {
    qubes_service_runtime::control::request(socket, command, "sys-firewall")
}
