//! `sys-firewall run`: the engine attached to real interfaces.
//!
//! The service is a shell around [`Engine`]: it opens an AF_PACKET socket on the uplink and on
//! every client vif, feeds received frames to the engine and sends what it returns. It keeps the
//! kernel out of the way on those interfaces (no forwarding, no ARP answers, no IPv6), follows
//! vifs as they come and go (netlink link events), reloads its configuration when the YAML
//! file or the QubesDB tree changes, resolves `dsthost` names itself through the uplink, and
//! answers `status` and `reload` on a control socket. SIGHUP reloads; SIGTERM exits, which
//! leaves the clients without forwarding (fail closed: the kernel does not forward for them).

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::config::{self, format_mac, EngineConfig, VifInfo};
use crate::dns::{self, TYPE_A, TYPE_AAAA};
use crate::engine::{Engine, Event, IfaceId, Offload, Outbox, Reason, Verdict, UPLINK};
use crate::offload::{self, VNET_HDR_LEN};
use crate::qdb_source::QubesDbSource;
use crate::replay::{DnsEntry, ReplayConfig};
use crate::sys::{self, LinkEvent, LinkMonitor, PacketSocket};

/// Where the configuration comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A YAML file (the replay configuration format, without `steps`), re-read when it changes.
    Yaml(PathBuf),
    /// A QubesDB daemon's socket.
    QubesDb { socket: PathBuf, uplink: String },
}

/// `sys-firewall run` options.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub source: Source,
    /// The control socket (`status`, `reload`).
    pub control: PathBuf,
}

/// A failure that stops the service, with what to do about it.
#[derive(Debug)]
pub struct ServiceError(pub String);

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ServiceError {}

fn serr(msg: impl Into<String>) -> ServiceError {
    ServiceError(msg.into())
}

/// The largest frame we accept from an interface (jumbo frames are not used by Qubes vifs; a
/// bigger frame is an error from the kernel, not silently cut).
const FRAME_BUF: usize = 65_536;
/// Frames handled per interface before looking at the others, so one busy vif cannot starve
/// the rest.
const BURST: usize = 256;
/// Timer granularity.
const TICK: Duration = Duration::from_millis(100);
/// A DNS query is retried after this long, at most [`DNS_TRIES`] times.
const DNS_TIMEOUT: Duration = Duration::from_secs(2);
const DNS_TRIES: u32 = 3;

/// What a config source yields: the tree, the vifs and static DNS answers.
#[derive(Debug, Clone, Default)]
pub struct Desired {
    pub tree: BTreeMap<String, String>,
    pub vifs: Vec<(VifInfo, Option<u16>)>,
    pub uplink: String,
    pub uplink_mtu: u16,
    pub conntrack_max: Option<usize>,
    pub static_dns: BTreeMap<String, DnsEntry>,
}

#[derive(Debug)]
struct Lookup {
    name: String,
    qtype: u16,
    id: u16,
    port: u16,
    sent: Instant,
    tries: u32,
}

#[derive(Debug, Default)]
struct Pending {
    addrs: Vec<IpAddr>,
    ttl: u32,
    outstanding: u32,
}

/// Rate-limited drop logging: at most one line per interface per second, with the number of
/// drops it stands for.
#[derive(Debug, Default)]
struct DropLog {
    last: HashMap<IfaceId, (Instant, u64)>,
}

impl DropLog {
    fn note(&mut self, iface: IfaceId, name: &str, reason: Reason) {
        let now = Instant::now();
        let entry = self
            .last
            .entry(iface)
            .or_insert((now - Duration::from_secs(2), 0));
        entry.1 += 1;
        if now.duration_since(entry.0) >= Duration::from_secs(1) {
            tracing::info!(
                iface = name,
                reason = reason.name(),
                dropped = entry.1,
                "dropped frames (one line per second per interface)"
            );
            *entry = (now, 0);
        }
    }
}

struct Service {
    opts: RunOptions,
    engine: Engine,
    /// Sockets by interface name; `by_id` maps engine interface ids to them.
    sockets: BTreeMap<String, PacketSocket>,
    by_id: Vec<Option<String>>,
    links: LinkMonitor,
    control: UnixListener,
    qdb: Option<QubesDbSource>,
    desired: Desired,
    generation: u64,
    start: Instant,
    out: Outbox,
    lookups: Vec<Lookup>,
    pending: BTreeMap<String, Pending>,
    rng: u64,
    drops: DropLog,
    yaml_stamp: Option<(SystemTime, u64)>,
    last_yaml_check: Instant,
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        if f.read_exact(&mut b).is_ok() {
            return u64::from_le_bytes(b);
        }
    }
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ u64::from(std::process::id()) << 32
}

fn file_stamp(p: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Reads the YAML configuration file.
pub fn load_yaml(path: &Path) -> Result<Desired, ServiceError> {
    let cfg = ReplayConfig::load(path).map_err(|e| serr(e.to_string()))?;
    if !cfg.steps.is_empty() {
        return Err(serr(format!(
            "{}: `steps` is for replay only; a running service takes changes by editing the file",
            path.display()
        )));
    }
    Ok(Desired {
        tree: cfg.qubesdb.clone(),
        vifs: cfg
            .vifs
            .iter()
            .map(|v| {
                (
                    VifInfo {
                        name: v.name.clone(),
                        ip: v.ip,
                        ip6: v.ip6,
                        mac: v.mac,
                    },
                    v.mtu,
                )
            })
            .collect(),
        uplink: cfg.uplink.name.clone(),
        uplink_mtu: cfg.uplink.mtu,
        conntrack_max: cfg.conntrack_max,
        static_dns: cfg.dns.clone(),
    })
}

/// The engine configuration for what is wanted and what exists: vifs whose netdev is not
/// there are left out until it appears.
fn engine_config(d: &Desired, seed: u64) -> Result<EngineConfig, ServiceError> {
    let present: Vec<&(VifInfo, Option<u16>)> = d
        .vifs
        .iter()
        .filter(|(v, _)| sys::if_index(&v.name).is_some())
        .collect();
    let infos: Vec<VifInfo> = present.iter().map(|(v, _)| v.clone()).collect();
    let mut cfg = config::from_tree(&d.tree, &infos, &d.uplink, d.uplink_mtu)
        .map_err(|e| serr(format!("configuration: {e}")))?;
    for (client, (_, mtu)) in cfg.clients.iter_mut().zip(&present) {
        if let Some(m) = mtu {
            client.mtu = *m;
        }
    }
    if let Some(max) = d.conntrack_max {
        cfg.conntrack_max = max;
    }
    cfg.seed = seed;
    Ok(cfg)
}

/// Runs the service until SIGTERM/SIGINT.
pub fn run(opts: RunOptions) -> Result<(), ServiceError> {
    let term = Arc::new(AtomicBool::new(false));
    let hup = Arc::new(AtomicBool::new(false));
    for (sig, flag) in [
        (signal_hook::consts::SIGTERM, &term),
        (signal_hook::consts::SIGINT, &term),
        (signal_hook::consts::SIGHUP, &hup),
    ] {
        signal_hook::flag::register(sig, Arc::clone(flag))
            .map_err(|e| serr(format!("cannot install signal handler: {e}")))?;
    }
    let mut qdb = None;
    let desired = match &opts.source {
        Source::Yaml(p) => load_yaml(p)?,
        Source::QubesDb { socket, uplink } => {
            let mut s = QubesDbSource::connect(socket, uplink)?;
            let d = s.desired()?;
            qdb = Some(s);
            d
        }
    };
    if sys::if_index(&desired.uplink).is_none() {
        return Err(serr(format!(
            "uplink {} does not exist in this network namespace",
            desired.uplink
        )));
    }
    let seed = random_seed();
    let engine = Engine::new(engine_config(&desired, seed)?)
        .map_err(|e| serr(format!("configuration: {e}")))?;
    // Bound under a temporary name and renamed once the interfaces are attached, so that a
    // control socket that exists means a service that forwards.
    let pending_control = opts
        .control
        .with_file_name(format!(".sys-firewall-control.{}", std::process::id()));
    let _ = std::fs::remove_file(&pending_control);
    let control = UnixListener::bind(&pending_control).map_err(|e| {
        serr(format!(
            "cannot listen on control socket {}: {e}",
            opts.control.display()
        ))
    })?;
    control
        .set_nonblocking(true)
        .map_err(|e| serr(format!("control socket: {e}")))?;
    let links = LinkMonitor::open().map_err(|e| serr(format!("netlink: {e}")))?;
    let yaml_stamp = match &opts.source {
        Source::Yaml(p) => file_stamp(p),
        Source::QubesDb { .. } => None,
    };
    let mut svc = Service {
        opts,
        engine,
        sockets: BTreeMap::new(),
        by_id: Vec::new(),
        links,
        control,
        qdb,
        desired,
        generation: 1,
        start: Instant::now(),
        out: Outbox::new(),
        lookups: Vec::new(),
        pending: BTreeMap::new(),
        rng: seed ^ 0x9e37_79b9_7f4a_7c15,
        drops: DropLog::default(),
        yaml_stamp,
        last_yaml_check: Instant::now(),
    };
    svc.sync_sockets()?;
    std::fs::rename(&pending_control, &svc.opts.control).map_err(|e| {
        serr(format!(
            "cannot create control socket {}: {e}",
            svc.opts.control.display()
        ))
    })?;
    svc.flush();
    svc.report_handled();
    tracing::info!(
        generation = svc.generation,
        clients = svc.engine.config().clients.len(),
        "sys-firewall running"
    );
    let result = svc.main_loop(&term, &hup);
    let _ = std::fs::remove_file(&svc.opts.control);
    tracing::info!("sys-firewall stopped; clients have no forwarding");
    result
}

impl Service {
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn next_rand(&mut self) -> u64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Opens sockets for interfaces the engine has and closes those it no longer has.
    fn sync_sockets(&mut self) -> Result<(), ServiceError> {
        let ifaces = self.engine.ifaces();
        let wanted: Vec<&str> = ifaces.iter().map(|(_, n)| n.as_str()).collect();
        self.sockets
            .retain(|name, _| wanted.contains(&name.as_str()));
        for (id, name) in &ifaces {
            if self.sockets.contains_key(name) {
                continue;
            }
            match PacketSocket::open(name) {
                Ok(s) => {
                    for knob in sys::quiet_kernel(name) {
                        tracing::warn!(iface = name.as_str(), knob, "could not set");
                    }
                    tracing::info!(iface = name.as_str(), "attached");
                    self.sockets.insert(name.clone(), s);
                }
                Err(e) if *id == UPLINK => {
                    return Err(serr(format!(
                        "cannot open uplink {name}: {e} (run as root)"
                    )));
                }
                Err(e) => tracing::warn!(iface = name.as_str(), error = %e, "cannot attach"),
            }
        }
        self.by_id = vec![None; ifaces.len()];
        for (id, name) in ifaces {
            if let Some(slot) = self.by_id.get_mut(id as usize) {
                *slot = Some(name);
            }
        }
        Ok(())
    }

    /// Re-reads the configuration and applies it; on error keeps the old one running.
    fn reload(&mut self, why: &str) -> Result<(), String> {
        let desired = match &self.opts.source {
            Source::Yaml(p) => load_yaml(p).map_err(|e| e.0)?,
            Source::QubesDb { .. } => match &mut self.qdb {
                Some(q) => {
                    q.recommit_all();
                    q.desired().map_err(|e| e.0)?
                }
                None => return Err("no QubesDB connection".into()),
            },
        };
        self.apply(desired, why)
    }

    fn apply(&mut self, desired: Desired, why: &str) -> Result<(), String> {
        let t0 = Instant::now();
        let seed = self.engine.config().seed;
        let cfg = engine_config(&desired, seed).map_err(|e| e.0)?;
        let now = self.now();
        self.engine
            .apply(now, cfg, &mut self.out)
            .map_err(|e| e.to_string())?;
        self.desired = desired;
        self.generation += 1;
        self.sync_sockets().map_err(|e| e.0)?;
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
        if let Some(q) = &mut self.qdb {
            q.report_handled(self.engine.config());
        }
    }

    fn main_loop(&mut self, term: &AtomicBool, hup: &AtomicBool) -> Result<(), ServiceError> {
        let mut buf = vec![0u8; FRAME_BUF];
        let mut seg = Vec::with_capacity(FRAME_BUF);
        let mut ready = Vec::new();
        let mut last_tick = Instant::now();
        while !term.load(Ordering::Relaxed) {
            if hup.swap(false, Ordering::Relaxed) {
                if let Err(e) = self.reload("SIGHUP") {
                    tracing::error!(
                        error = e,
                        "reload failed; keeping the running configuration"
                    );
                }
            }
            let names: Vec<String> = self.sockets.keys().cloned().collect();
            let mut fds = vec![self.links.as_raw_fd(), self.control.as_raw_fd()];
            if let Some(q) = &self.qdb {
                fds.push(q.as_raw_fd());
            }
            let fixed = fds.len();
            fds.extend(
                names
                    .iter()
                    .filter_map(|n| self.sockets.get(n))
                    .map(|s| s.as_raw_fd()),
            );
            let queued = self.qdb.as_ref().is_some_and(|q| q.queued() > 0);
            let wait = if queued {
                Duration::ZERO
            } else {
                TICK.saturating_sub(last_tick.elapsed())
            };
            sys::poll_readable(&fds, wait.as_millis() as i32, &mut ready)
                .map_err(|e| serr(format!("poll: {e}")))?;
            for (i, name) in names.iter().enumerate() {
                if ready.get(fixed + i).copied().unwrap_or(false) {
                    self.pump(name, &mut buf, &mut seg);
                }
            }
            if ready.first().copied().unwrap_or(false) {
                self.link_events();
            }
            if ready.get(1).copied().unwrap_or(false) {
                self.control_requests();
            }
            let queued = self.qdb.as_ref().is_some_and(|q| q.queued() > 0);
            if fixed == 3 && (queued || ready.get(2).copied().unwrap_or(false)) {
                self.qubesdb_events()?;
            }
            if last_tick.elapsed() >= TICK {
                last_tick = Instant::now();
                let now = self.now();
                self.engine.tick(now, &mut self.out);
                self.flush();
                self.dns_timeouts();
                self.check_yaml();
            }
        }
        Ok(())
    }

    /// Reads and handles up to [`BURST`] frames from one interface.
    fn pump(&mut self, name: &str, buf: &mut [u8], seg: &mut Vec<u8>) {
        let Some(iface) = self.engine.iface_by_name(name) else {
            return;
        };
        for _ in 0..BURST {
            let (hdr, n) = match self.sockets.get(name).map(|s| s.recv(buf)) {
                Some(Ok(Some(r))) => r,
                Some(Ok(None)) | None => return,
                Some(Err(e)) => {
                    tracing::warn!(iface = name, error = %e, "receive failed");
                    return;
                }
            };
            let now = self.now();
            let frame = &mut buf[VNET_HDR_LEN..VNET_HDR_LEN + n];
            let verdict = match offload::pass_through(&hdr) {
                // Forwarded as it came: the kernel on the other side finishes the checksum and
                // cuts the segments, as it would have for a kernel router.
                Some(o) if o == Offload::NONE => {
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
                    let done = offload::finish(&hdr, frame, seg, |f| {
                        if let Verdict::Forward(to) = engine.handle(now, iface, f, out) {
                            forwards.push((to, f.to_vec()));
                        }
                    });
                    if let Err(e) = done {
                        tracing::debug!(iface = name, error = ?e, "frame with unusable offload header");
                    }
                    for (to, f) in &forwards {
                        self.send(*to, f);
                    }
                    Verdict::Consumed
                }
            };
            if let Verdict::Forward(to) = verdict {
                self.send_with(to, &hdr, frame);
            }
            if self.out.frame_count() > 0 || !self.out.events.is_empty() {
                self.flush();
            }
        }
    }

    /// Sends a forwarded frame with the offload header it came with.
    fn send_with(&self, to: IfaceId, hdr: &offload::VnetHdr, frame: &[u8]) {
        let Some(Some(name)) = self.by_id.get(to as usize) else {
            return;
        };
        if let Some(s) = self.sockets.get(name) {
            if let Err(e) = s.send_vnet(hdr, frame) {
                tracing::debug!(iface = name.as_str(), error = %e, "send failed");
            }
        }
    }

    fn send(&self, to: IfaceId, frame: &[u8]) {
        let Some(Some(name)) = self.by_id.get(to as usize) else {
            return;
        };
        if let Some(s) = self.sockets.get(name) {
            if let Err(e) = s.send(frame) {
                tracing::debug!(iface = name.as_str(), error = %e, "send failed");
            }
        }
    }

    /// Sends the outbox and acts on its events.
    fn flush(&mut self) {
        for (to, frame) in self.out.frames() {
            self.send(to, frame);
        }
        let events = std::mem::take(&mut self.out.events);
        self.out.clear();
        for ev in events {
            match ev {
                Event::Resolve { name } => self.resolve(name),
                Event::LocalUdp {
                    src,
                    sport,
                    dport,
                    payload,
                } => self.dns_reply(src, sport, dport, &payload),
                Event::Dropped { iface, reason } => {
                    let name = self.engine.iface_name(iface).unwrap_or("?").to_string();
                    self.drops.note(iface, &name, reason);
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
        if !self.out.events.is_empty() || self.out.frame_count() > 0 {
            // Answers given above may have produced more work (static DNS answers).
            self.flush();
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
        let relevant = events.iter().any(|e| match e {
            LinkEvent::Up(n) | LinkEvent::Gone(n) => {
                n.is_empty()
                    || self.desired.vifs.iter().any(|(v, _)| &v.name == n)
                        && (self.sockets.contains_key(n) != matches!(e, LinkEvent::Up(_)))
            }
        });
        if relevant {
            let desired = self.desired.clone();
            if let Err(e) = self.apply(desired, "vif appeared or went away") {
                tracing::error!(error = e, "could not follow link change");
            }
        }
    }

    fn check_yaml(&mut self) {
        let Source::Yaml(path) = &self.opts.source else {
            return;
        };
        if self.last_yaml_check.elapsed() < Duration::from_millis(200) {
            return;
        }
        self.last_yaml_check = Instant::now();
        let stamp = file_stamp(path);
        if stamp != self.yaml_stamp {
            self.yaml_stamp = stamp;
            if let Err(e) = self.reload("configuration file changed") {
                tracing::error!(
                    error = e,
                    "reload failed; keeping the running configuration"
                );
            }
        }
    }

    fn qubesdb_events(&mut self) -> Result<(), ServiceError> {
        let Some(q) = &mut self.qdb else {
            return Ok(());
        };
        let commit = q.poll_watches()?;
        if commit {
            let d = q.desired()?;
            if let Err(e) = self.apply(d, "QubesDB commit") {
                tracing::error!(error = e, "QubesDB change could not be applied");
            }
        }
        Ok(())
    }

    fn control_requests(&mut self) {
        loop {
            let stream = match self.control.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket");
                    return;
                }
            };
            if let Err(e) = self.control_request(stream) {
                tracing::debug!(error = %e, "control request");
            }
        }
    }

    fn control_request(&mut self, stream: UnixStream) -> io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        stream.set_write_timeout(Some(Duration::from_secs(1)))?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        let mut w = &stream;
        match line.trim() {
            "status" => w.write_all(self.status().as_bytes()),
            "reload" => match self.reload("control socket") {
                Ok(()) => writeln!(w, "ok config-generation {}", self.generation),
                Err(e) => writeln!(w, "error {e}"),
            },
            other => writeln!(w, "error unknown command {other:?} (status, reload)"),
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
        let counters_line = |c: &crate::engine::Counters| {
            c.iter()
                .filter(|(_, n)| *n > 0)
                .map(|(r, n)| format!("{}={n}", r.name()))
                .collect::<Vec<_>>()
                .join(" ")
        };
        if let Some(c) = self.engine.counters(UPLINK) {
            s.push_str(&format!("  counters {}\n", counters_line(c)));
        }
        for (i, c) in cfg.clients.iter().enumerate() {
            let id = i as IfaceId + 1;
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

    // --- the firewall's own DNS lookups -------------------------------------------------

    fn dns_servers(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = ["/qubes-primary-dns", "/qubes-secondary-dns"]
            .iter()
            .filter_map(|k| self.desired.tree.get(*k))
            .filter_map(|a| a.parse().ok())
            .collect();
        if v.is_empty() {
            v = config::VIRTUAL_DNS.iter().map(|a| IpAddr::V4(*a)).collect();
        }
        v
    }

    fn resolve(&mut self, name: String) {
        if let Some(e) = self.desired.static_dns.get(&name).cloned() {
            let now = self.now();
            self.engine
                .dns_answer(now, &name, Some((e.addrs, e.ttl)), &mut self.out);
            return;
        }
        if self.pending.contains_key(&name) {
            return;
        }
        let mut qtypes = vec![TYPE_A];
        if self.engine.config().uplink.ip6.is_some() {
            qtypes.push(TYPE_AAAA);
        }
        self.pending.insert(
            name.clone(),
            Pending {
                outstanding: qtypes.len() as u32,
                ttl: u32::MAX,
                ..Pending::default()
            },
        );
        for qtype in qtypes {
            self.send_query(name.clone(), qtype, 0);
        }
    }

    fn send_query(&mut self, name: String, qtype: u16, tries: u32) {
        let r = self.next_rand();
        let id = r as u16;
        let port = 49_152 + ((r >> 16) as u16 % 16_384);
        let servers = self.dns_servers();
        let server = servers[tries as usize % servers.len()];
        let Ok(q) = dns::build_query(id, &name, qtype) else {
            self.lookup_done(&name, None);
            return;
        };
        self.engine.open_local_port(port);
        let now = self.now();
        if !self
            .engine
            .send_local_udp(now, server, port, 53, &q, &mut self.out)
        {
            self.engine.close_local_port(port);
            self.lookup_done(&name, None);
            return;
        }
        self.lookups.push(Lookup {
            name,
            qtype,
            id,
            port,
            sent: Instant::now(),
            tries: tries + 1,
        });
    }

    fn dns_reply(&mut self, _src: IpAddr, sport: u16, dport: u16, payload: &[u8]) {
        if sport != 53 {
            return;
        }
        let Some(pos) = self.lookups.iter().position(|l| l.port == dport) else {
            return;
        };
        let l = &self.lookups[pos];
        let result = dns::parse_response(payload, l.id, l.qtype);
        if result == Err(dns::DnsError::NotOurs) {
            return;
        }
        let l = self.lookups.remove(pos);
        self.engine.close_local_port(l.port);
        match result {
            Ok((addrs, ttl)) => self.lookup_done(&l.name, Some((addrs, ttl))),
            Err(e) => {
                tracing::debug!(name = l.name.as_str(), error = %e, "DNS");
                self.lookup_done(&l.name, Some((Vec::new(), 0)));
            }
        }
    }

    /// One query of a name finished (`None`: failed outright, abandon the name).
    fn lookup_done(&mut self, name: &str, part: Option<(Vec<IpAddr>, u32)>) {
        let Some(p) = self.pending.get_mut(name) else {
            return;
        };
        match part {
            Some((addrs, ttl)) => {
                if !addrs.is_empty() {
                    p.ttl = p.ttl.min(ttl);
                }
                p.addrs.extend(addrs);
                p.outstanding = p.outstanding.saturating_sub(1);
            }
            None => p.outstanding = 0,
        }
        if p.outstanding > 0 {
            return;
        }
        let Some(p) = self.pending.remove(name) else {
            return;
        };
        let answer = (!p.addrs.is_empty()).then_some((p.addrs, p.ttl));
        if answer.is_none() {
            tracing::warn!(name, "name did not resolve; rules using it fail closed");
        }
        let now = self.now();
        self.engine.dns_answer(now, name, answer, &mut self.out);
        self.flush();
    }

    fn dns_timeouts(&mut self) {
        let mut expired = Vec::new();
        self.lookups.retain(|l| {
            if l.sent.elapsed() >= DNS_TIMEOUT {
                expired.push((l.name.clone(), l.qtype, l.port, l.tries));
                false
            } else {
                true
            }
        });
        for (name, qtype, port, tries) in expired {
            self.engine.close_local_port(port);
            if tries < DNS_TRIES {
                self.send_query(name, qtype, tries);
            } else {
                self.lookup_done(&name, Some((Vec::new(), 0)));
            }
        }
        self.flush();
    }
}

/// `sys-firewall status` / `reload`: one request on the control socket.
pub fn control(socket: &Path, command: &str) -> Result<String, ServiceError> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
        serr(format!(
            "cannot reach the service at {}: {e} (is `sys-firewall run` running?)",
            socket.display()
        ))
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| serr(e.to_string()))?;
    writeln!(s, "{command}").map_err(|e| serr(format!("sending {command}: {e}")))?;
    let mut out = String::new();
    use std::io::Read;
    s.read_to_string(&mut out)
        .map_err(|e| serr(format!("reading the answer: {e}")))?;
    Ok(out)
}
