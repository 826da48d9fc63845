//! `sys-firewall run`: the engine on real interfaces.
//!
//! One thread, one `poll(2)` loop over the devices (AF_PACKET sockets from vif-backend, or
//! with `--vifs xen` its netback and netfront devices over Xen rings), the
//! netlink link monitor, the control socket and the QubesDB connection, each found by its
//! token. Frames go through the engine; what the engine delivers locally goes to the host
//! stack, where the firewall's own DNS lookups for `dsthost` rules live.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant as Clock};

use qubes_engine::config::{format_mac, EngineConfig, NetvmUplink};
use qubes_engine::{Engine, Event, IfaceId, Instant, Outbox, Verdict, UPLINK};
use qubes_service_runtime::control::ControlServer;
use qubes_service_runtime::dhcp::{DhcpClient, DhcpConfig, DhcpEffect, Lease};
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
use vif_backend::xen::qubesdb::XenAccess;
use vif_backend::{offload, sys, Device, RxBurst, TxFrame};

/// Which router qube runs: where its uplink's address comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// sys-firewall: the uplink is `/qubes-ip` behind `/qubes-gateway`, as dom0 writes them
    /// for a qube with a netvm.
    Firewall,
    /// sys-net, the netvm at the end of the chain: the uplink's address, router and upstream
    /// DNS are static (the configuration's `uplink.address`) or learnt by DHCP; its clients'
    /// gateway is `/qubes-netvm-gateway`.
    Net,
    /// sys-whonix: nothing is forwarded. The engine ends every client packet its rules accept
    /// in a [`Terminator`] (the Tor gateway), and the uplink is left to the kernel, whose
    /// only traffic is the Tor client's own connections: no device is attached to it.
    Whonix,
}

/// What sys-whonix puts where sys-firewall's host stack is: it takes the client packets the
/// engine delivers locally ([`qubes_engine::config::UplinkMode::Terminate`]) and answers
/// through [`Engine::send_local`]. It runs in the service's loop; work it does elsewhere (a
/// Tor stream's data arriving) wakes the loop through [`Terminator::wake_fd`].
pub trait Terminator {
    /// The engine's configuration changed (clients came or went, addresses changed).
    fn configure(&mut self, now: Instant, cfg: &EngineConfig);
    /// Takes what the engine delivered locally in `delivered` and runs; what it sends lands in
    /// `out`. Called after every engine call and whenever the loop wakes.
    fn after_engine(
        &mut self,
        now: Instant,
        engine: &mut Engine,
        delivered: &Outbox,
        out: &mut Outbox,
    );
    /// A descriptor that turns readable when the terminator has work; the loop then calls
    /// [`Terminator::after_engine`] with nothing delivered.
    fn wake_fd(&self) -> std::os::fd::RawFd;
    /// How soon the terminator wants to run again with nothing new (its timers).
    fn poll_delay(&mut self, now: Instant) -> Option<Duration>;
    /// Lines for `status`.
    fn status(&self, now: Instant, engine: &Engine) -> String;
    /// A control-socket command the service itself does not know (`new-identity vif3.0`);
    /// `None`: not the terminator's either.
    fn command(&mut self, now: Instant, command: &str) -> Option<String>;
}

impl Role {
    /// The service's name, in logs and on the control socket.
    pub fn name(self) -> &'static str {
        match self {
            Role::Firewall => "sys-firewall",
            Role::Net => "sys-net",
            Role::Whonix => "sys-whonix",
        }
    }
}

/// How the service reaches its vifs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Vifs {
    /// Kernel interfaces by name, over AF_PACKET (netback's vifN.M in a Linux qube, veth
    /// ends in the lab).
    #[default]
    Kernel,
    /// The Xen rings themselves: each client vif a netback of ours, the uplink a netfront
    /// (`device/vif/0`), over these hypervisor interfaces; no kernel network driver.
    Xen(XenAccess),
}

/// `sys-firewall run` / `sys-net run` options.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub source: Source,
    /// The control socket (`status`, `reload`).
    pub control: PathBuf,
    pub role: Role,
    pub vifs: Vifs,
}

/// The XenStore directory of the uplink's netfront: a service qube's one network device.
pub const XEN_UPLINK_DEVICE: &str = "device/vif/0";

/// An attached device: a kernel interface's socket, or a Xen ring end.
#[derive(Debug)]
enum Attached {
    Kernel(PacketSocket),
    Xen(Box<dyn Device>),
}

impl Attached {
    fn dev(&mut self) -> &mut dyn Device {
        match self {
            Attached::Kernel(s) => s,
            Attached::Xen(d) => d.as_mut(),
        }
    }

    fn name(&self) -> &str {
        match self {
            Attached::Kernel(s) => s.name(),
            Attached::Xen(d) => d.name(),
        }
    }

    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        match self {
            Attached::Kernel(s) => s.raw_fd(),
            Attached::Xen(d) => d.raw_fd(),
        }
    }

    fn describe(&self) -> Option<String> {
        match self {
            Attached::Kernel(_) => None,
            Attached::Xen(d) => d.describe(),
        }
    }

    /// Still the device of interface `name`: a kernel interface that went and came back
    /// is a new netdev (another ifindex), to be opened again.
    fn is_current(&self) -> bool {
        match self {
            Attached::Kernel(s) => sys::if_index(s.name()) == Some(s.ifindex()),
            Attached::Xen(_) => true,
        }
    }
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
const TOKEN_TERMINATOR: Token = 4;
/// Devices are registered as `TOKEN_DEVICE + engine interface id`.
const TOKEN_DEVICE: Token = 1 << 32;

struct Service {
    role: Role,
    /// sys-net: the lease DHCP gave (none yet, or with static addressing).
    lease: Option<NetvmUplink>,
    /// sys-net without a static address: the DHCP client on the uplink.
    dhcp: Option<DhcpClient>,
    /// DHCP messages the engine handed over, waiting for the client.
    dhcp_inbox: Vec<Vec<u8>>,
    /// The uplink's carrier as netlink last said (DHCP restarts when it comes back).
    uplink_carrier: Option<bool>,
    engine: Engine,
    /// Devices by engine interface id (stable: a vif keeps its id while it exists).
    devices: BTreeMap<IfaceId, Attached>,
    vifs: Vifs,
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
    /// Each attached device's MTU as the kernel last told it (read at attach, then followed
    /// through netlink `RTM_NEWLINK`).
    link_mtu: BTreeMap<String, u16>,
    /// sys-whonix: where client traffic ends.
    terminator: Option<Box<dyn Terminator>>,
    /// With `--qubesdb-vchan`: the link to dom0's QubesDB, as last looked at.
    dom0_link: Option<Result<(), String>>,
    /// With `--vifs xen`: when vifs that could not be attached were last tried again (no
    /// netlink event will say when to, as it does for a kernel interface).
    last_attach_retry: Clock,
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
/// there are left out until it appears. Each link's MTU is the device's, lowered by a
/// configured one ([`effective_mtu`]). A table size the configuration gives
/// (`conntrack_max`, `/qubes-conntrack-max`) wins over `conntrack_default`.
fn engine_config(
    role: Role,
    d: &Desired,
    seed: u64,
    link_mtu: &BTreeMap<String, u16>,
    conntrack_default: usize,
    netvm: Option<&NetvmUplink>,
    vifs: &Vifs,
) -> Result<EngineConfig, ServiceError> {
    // A Xen vif is there once its source names it: the hotplug step saw its directory.
    let xen = matches!(vifs, Vifs::Xen(_));
    let mut cfg = d.engine_config_as(seed, |name| xen || sys::if_index(name).is_some(), netvm)?;
    cfg.uplink.mtu = effective_mtu(cfg.uplink.mtu, link_mtu.get(&cfg.uplink.name).copied());
    for c in &mut cfg.clients {
        c.mtu = effective_mtu(c.mtu, link_mtu.get(&c.vif).copied());
    }
    if d.conntrack_max.is_none() {
        cfg.conntrack_max = conntrack_default;
    }
    if role == Role::Whonix {
        cfg.mode = qubes_engine::config::UplinkMode::Terminate;
        // The virtual resolvers are the gateway's own (DNS through Tor), not redirected.
        cfg.dns_redirect.clear();
    }
    Ok(cfg)
}

/// A link carries what its device carries (the kernel's MTU: `ip link set mtu`, or what the
/// toolstack set, e.g. Xen's hotplug `set_mtu` from the backend's XenStore `mtu` key in
/// tools/hotplug/Linux/xen-network-common.sh), and no more than the configuration allows
/// (the YAML `mtu` keys, `/qubes-uplink-mtu`, `/qubes-vif/<vif>/mtu`; 1500 when none is
/// given). A device MTU below the IPv4 minimum is not believed: the configured one stays.
pub fn effective_mtu(configured: u16, device: Option<u16>) -> u16 {
    match device {
        Some(d) if d >= qubes_engine::frag::MIN_MTU => d.min(configured),
        _ => configured,
    }
}

/// The MTU a netlink message reports, as the engine holds it (a `u16`: IPv4 and IPv6
/// without jumbograms never carry more than 65535).
fn link_mtu_of(mtu: Option<u32>) -> Option<u16> {
    mtu.map(|m| u16::try_from(m).unwrap_or(u16::MAX))
}

/// Runs the service until SIGTERM/SIGINT.
pub fn run(opts: RunOptions) -> Result<(), ServiceError> {
    run_with(opts, None)
}

/// [`run`] with client traffic ending in `terminator` (sys-whonix, [`Role::Whonix`]).
pub fn run_with(
    opts: RunOptions,
    mut terminator: Option<Box<dyn Terminator>>,
) -> Result<(), ServiceError> {
    if (opts.role == Role::Whonix) != terminator.is_some() {
        return Err(ServiceError::Config(
            qubes_service_runtime::error::ConfigError::Invalid {
                file: None,
                error: "sys-whonix, and only it, runs with a terminator".into(),
            },
        ));
    }
    if let Vifs::Xen(access) = &opts.vifs {
        let refuse = |error: String| {
            Err(ServiceError::Config(
                qubes_service_runtime::error::ConfigError::Invalid { file: None, error },
            ))
        };
        if opts.role != Role::Firewall {
            return refuse(format!(
                "--vifs xen is sys-firewall's; {} attaches to kernel interfaces",
                opts.role.name()
            ));
        }
        match &opts.source {
            Source::QubesDbVchan { access: a, .. } if a == access => {}
            _ => {
                return refuse(
                    "--vifs xen needs --qubesdb-vchan: the client vifs are learnt from \
                     XenStore by its hotplug step, over the same Xen access"
                        .into(),
                )
            }
        }
    }
    let signals = Signals::install()?;
    let (source, desired) = ConfigSource::open(&opts.source)?;
    if opts.vifs == Vifs::Kernel && sys::if_index(&desired.uplink).is_none() {
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
    let netvm = netvm_uplink(opts.role, &desired, None);
    let cfg = engine_config(
        opts.role,
        &desired,
        seed,
        &BTreeMap::new(),
        conntrack_default,
        netvm.as_ref(),
        &opts.vifs,
    )?;
    let local = LocalServices::new(Instant::ZERO, &cfg, dns_servers(&desired.tree));
    if let Some(t) = terminator.as_mut() {
        t.configure(Instant::ZERO, &cfg);
    }
    let mut engine = Engine::new(cfg).map_err(|e| ServiceError::Config(e.into()))?;
    // sys-net without a static address asks DHCP (RFC 2131), with no host name: a netvm
    // says nothing about its user it need not say.
    let dhcp = (opts.role == Role::Net && desired.static_uplink.is_none()).then(|| {
        engine.set_dhcp_client(true);
        let mac = sys::if_mac(&desired.uplink).unwrap_or(qubes_engine::config::DEFAULT_QUBE_MAC);
        let mut cfg = DhcpConfig::new(mac, seed);
        cfg.hostname.clone_from(&desired.dhcp_hostname);
        DhcpClient::new(cfg, Instant::ZERO)
    });
    let control = ControlServer::bind(&opts.control, opts.role.name())?;
    let links = LinkMonitor::open().map_err(|source| ServiceError::System {
        what: "netlink link monitor",
        source,
    })?;
    let mut svc = Service {
        role: opts.role,
        lease: None,
        dhcp,
        dhcp_inbox: Vec::new(),
        uplink_carrier: None,
        engine,
        devices: BTreeMap::new(),
        vifs: opts.vifs.clone(),
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
        link_mtu: BTreeMap::new(),
        terminator,
        dom0_link: None,
        last_attach_retry: Clock::now(),
    };
    svc.sync_devices()?;
    svc.check_dom0_link();
    svc.control.publish()?;
    svc.flush();
    svc.report_handled();
    tracing::info!(
        generation = svc.generation,
        clients = svc.engine.config().clients.len(),
        "{} running",
        opts.role.name()
    );
    let result = svc.main_loop(&signals);
    svc.release_lease();
    tracing::info!("{} stopped; clients have no forwarding", opts.role.name());
    result
}

/// The uplink a netvm runs with: its static address, else its lease, else none yet (0.0.0.0:
/// the engine forwards nothing and answers net unreachable). `None` for sys-firewall.
fn netvm_uplink(role: Role, d: &Desired, lease: Option<&NetvmUplink>) -> Option<NetvmUplink> {
    if role != Role::Net {
        return None;
    }
    let mac = sys::if_mac(&d.uplink).unwrap_or(qubes_engine::config::DEFAULT_QUBE_MAC);
    let mut up = d
        .static_uplink
        .clone()
        .or_else(|| lease.cloned())
        .unwrap_or(NetvmUplink {
            ip: std::net::Ipv4Addr::UNSPECIFIED,
            router: std::net::Ipv4Addr::UNSPECIFIED,
            dns: Vec::new(),
            mac,
        });
    up.mac = mac;
    Some(up)
}

impl Service {
    fn now(&self) -> Instant {
        Instant::from_nanos(self.start.elapsed().as_nanos() as u64)
    }

    /// Opens devices for interfaces the engine has and closes those it no longer has.
    fn sync_devices(&mut self) -> Result<(), ServiceError> {
        let ifaces = self.engine.ifaces();
        // A device whose netdev went (or went and came back as a new one, with another
        // ifindex) is closed, and opened again below if its name is there.
        self.devices.retain(|id, dev| {
            ifaces
                .iter()
                .any(|(i, n)| i == id && n.as_str() == dev.name())
                && dev.is_current()
        });
        for (id, name) in &ifaces {
            if self.devices.contains_key(id) || (*id == UPLINK && self.role == Role::Whonix) {
                continue;
            }
            let opened = match &self.vifs {
                Vifs::Kernel => PacketSocket::open(name).map(|s| {
                    for knob in sys::quiet_kernel(name) {
                        tracing::warn!(iface = name.as_str(), knob, "could not set");
                    }
                    Attached::Kernel(s)
                }),
                Vifs::Xen(access) if *id == UPLINK => vif_backend::xen::device::open_netfront(
                    access,
                    XEN_UPLINK_DEVICE,
                    name,
                    vif_backend::xen::device::FRONTEND_KEYS_WAIT,
                )
                .map(Attached::Xen),
                Vifs::Xen(access) => {
                    vif_backend::xen::device::open_netback(access, name).map(Attached::Xen)
                }
            };
            match opened {
                Ok(mut s) => {
                    let mtu = s.dev().mtu();
                    tracing::info!(iface = name.as_str(), mtu, "attached");
                    match mtu {
                        Some(m) => self.link_mtu.insert(name.clone(), m),
                        None => self.link_mtu.remove(name),
                    };
                    self.devices.insert(*id, s);
                    if *id == UPLINK {
                        self.engine.uplink_link_changed();
                    }
                    self.follow_mtu(*id);
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
        self.link_mtu.retain(|n, _| names.iter().any(|m| m == n));
        Ok(())
    }

    /// What the configuration allows on an interface, before the device has its say.
    fn configured_mtu(&self, name: &str) -> u16 {
        if name == self.desired.uplink {
            return self.desired.uplink_mtu;
        }
        self.desired
            .vifs
            .iter()
            .find(|(v, _)| v.name == name)
            .and_then(|(_, m)| *m)
            .unwrap_or(qubes_engine::config::DEFAULT_MTU)
    }

    /// Brings the engine's MTU of one interface to the effective one. Flows stay: a link
    /// whose MTU changes carries the same connections, as with a kernel router.
    fn follow_mtu(&mut self, id: IfaceId) {
        let Some(name) = self.engine.iface_name(id).map(str::to_string) else {
            return;
        };
        let want = effective_mtu(
            self.configured_mtu(&name),
            self.link_mtu.get(&name).copied(),
        );
        if self.engine.mtu_of(id) == Some(want) {
            return;
        }
        match self.engine.set_mtu(id, want) {
            Ok(()) => {
                tracing::info!(iface = name.as_str(), mtu = want, "MTU");
                if id == UPLINK {
                    // The host stack's own packets (DNS lookups) must fit too.
                    self.local
                        .configure(self.engine.config(), dns_servers(&self.desired.tree));
                }
            }
            Err(e) => tracing::warn!(error = %e, "MTU not changed"),
        }
    }

    /// Re-reads the configuration and applies it; on error keeps the old one running.
    fn reload(&mut self, why: &str) -> Result<(), ServiceError> {
        let desired = self.source.reread()?;
        self.apply(desired, why)
    }

    fn apply(&mut self, desired: Desired, why: &str) -> Result<(), ServiceError> {
        let t0 = Clock::now();
        let seed = self.engine.config().seed;
        let netvm = netvm_uplink(self.role, &desired, self.lease.as_ref());
        let cfg = engine_config(
            self.role,
            &desired,
            seed,
            &self.link_mtu,
            self.conntrack_default,
            netvm.as_ref(),
            &self.vifs,
        )?;
        let now = self.now();
        self.engine
            .apply(now, cfg, &mut self.out)
            .map_err(|e| ServiceError::Config(e.into()))?;
        self.local
            .configure(self.engine.config(), dns_servers(&desired.tree));
        if let Some(t) = self.terminator.as_mut() {
            t.configure(now, self.engine.config());
        }
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
            let mut wait = if queued {
                Duration::ZERO
            } else {
                TICK.saturating_sub(last_tick.elapsed())
            };
            let now = self.now();
            if let Some(t) = self.terminator.as_mut() {
                poller.register(TOKEN_TERMINATOR, t.wake_fd());
                if let Some(d) = t.poll_delay(now) {
                    wait = wait.min(d);
                }
            }
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
                    TOKEN_TERMINATOR => {}
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
            if self.terminator.is_some() {
                // Woken or not: its streams and timers move on every round.
                self.flush();
            }
            if last_tick.elapsed() >= TICK {
                last_tick = Clock::now();
                let now = self.now();
                self.engine.tick(now, &mut self.out);
                self.flush();
                self.check_file();
                self.check_dom0_link();
                self.retry_xen_attach();
                self.dhcp_poll();
            }
            self.dhcp_receive();
        }
        Ok(())
    }

    /// With `--vifs xen`, tries again, once a second, the vifs whose device could not be
    /// opened (a backend directory not readable yet, a transient XenStore error).
    fn retry_xen_attach(&mut self) {
        if !matches!(self.vifs, Vifs::Xen(_))
            || self.last_attach_retry.elapsed() < Duration::from_secs(1)
            || self.devices.len() >= self.engine.ifaces().len()
        {
            return;
        }
        self.last_attach_retry = Clock::now();
        if let Err(e) = self.sync_devices() {
            tracing::warn!(error = %e, "attaching the Xen devices again");
        }
    }

    /// Notices the link to dom0's QubesDB ending. The rules in force stay in force (they
    /// only ever close what they allow, and nothing is opened without dom0): what is lost
    /// is dom0's changes, so it is said loudly, once, and in `status`.
    fn check_dom0_link(&mut self) {
        let Some(now) = self.source.qubesdb().and_then(|q| q.dom0_link()) else {
            return;
        };
        if let (Some(Ok(())) | None, Err(why)) = (&self.dom0_link, &now) {
            tracing::error!(
                reason = why.as_str(),
                "the link to dom0's QubesDB ended: the rules in force stay, but no change \
                 from dom0 (rules, clients) arrives until the service is restarted"
            );
        }
        self.dom0_link = Some(now);
    }

    /// Hands the DHCP client what came for it.
    fn dhcp_receive(&mut self) {
        if self.dhcp_inbox.is_empty() {
            return;
        }
        let inbox = std::mem::take(&mut self.dhcp_inbox);
        let now = self.now();
        let mut fx = Vec::new();
        if let Some(d) = self.dhcp.as_mut() {
            for m in &inbox {
                d.handle(now, m, &mut fx);
            }
        }
        self.dhcp_effects(fx);
    }

    /// The DHCP client's timers (retransmissions, T1, T2, expiry).
    fn dhcp_poll(&mut self) {
        let now = self.now();
        let mut fx = Vec::new();
        match self.dhcp.as_mut() {
            Some(d) => d.poll(now, &mut fx),
            None => return,
        }
        self.dhcp_effects(fx);
    }

    fn dhcp_effects(&mut self, fx: Vec<DhcpEffect>) {
        for e in fx {
            match e {
                DhcpEffect::Send { src, dst, payload } => {
                    self.engine.send_dhcp(src, dst, &payload, &mut self.out);
                }
                DhcpEffect::Bound(lease) => self.set_lease(Some(&lease)),
                DhcpEffect::Unbound => self.set_lease(None),
            }
        }
        self.flush();
    }

    /// A new lease (or none): the engine's uplink follows it, and QubesDB hears of it as
    /// Qubes' NetworkManager dispatcher tells it (`/qubes-netvm-external-ip`).
    fn set_lease(&mut self, lease: Option<&Lease>) {
        let mac = self.engine.config().uplink.mac;
        let up = lease.map(|l| NetvmUplink {
            ip: l.address,
            // Without a router option the server is the next hop (RFC 2132 3.5 leaves the
            // router optional; a server on the link is reachable).
            router: l.router.unwrap_or(l.server),
            dns: l.dns.clone(),
            mac,
        });
        if up == self.lease {
            return;
        }
        match &up {
            Some(u) => tracing::info!(
                address = %u.ip,
                router = %u.router,
                dns = ?u.dns,
                "DHCP lease"
            ),
            None => tracing::warn!("DHCP lease lost: nothing leaves until a new one"),
        }
        self.lease = up;
        if let Some(q) = self.source.qubesdb() {
            q.write_external_ip(self.lease.as_ref().map(|u| u.ip));
        }
        let desired = self.desired.clone();
        if let Err(e) = self.apply(desired, "DHCP lease") {
            tracing::error!(error = %e, "could not apply the lease");
        }
    }

    /// SIGTERM: give the lease back (RFC 2131 4.4.6) and leave nothing forwarding.
    fn release_lease(&mut self) {
        let mut fx = Vec::new();
        if let Some(d) = self.dhcp.as_mut() {
            d.release(&mut fx);
        }
        for e in fx {
            if let DhcpEffect::Send { src, dst, payload } = e {
                self.engine.send_dhcp(src, dst, &payload, &mut self.out);
            }
        }
        self.flush();
        if self.lease.is_some() {
            if let Some(q) = self.source.qubesdb() {
                q.write_external_ip(None);
            }
        }
    }

    /// Reads and handles up to [`BURST`] frames from one interface.
    fn pump(&mut self, iface: IfaceId, burst: &mut RxBurst, seg: &mut Vec<u8>) {
        burst.clear();
        let Some(dev) = self.devices.get_mut(&iface) else {
            return;
        };
        if let Err(e) = dev.dev().recv_burst(burst, BURST) {
            tracing::warn!(iface = dev.name(), error = %e, "receive failed");
            return;
        }
        for i in 0..burst.len() {
            let now = self.now();
            let Some((frame, meta)) = burst.frame_mut(i) else {
                break;
            };
            // sys-whonix's host stack takes wire-sized packets only: GSO super-frames from a
            // client's kernel (TSO over veth) are cut into segments here first.
            let for_engine = match meta.for_engine() {
                Some(o) if self.role == Role::Whonix && o.gso_size != 0 => None,
                o => o,
            };
            let verdict = match for_engine {
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
            if let Err(e) = dev.dev().send_burst(&[TxFrame { frame, offload }]) {
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
            self.dhcp_inbox
                .extend(done.dhcp_messages().map(|m| m.to_vec()));
            match self.terminator.as_mut() {
                Some(t) => t.after_engine(now, &mut self.engine, &done, &mut self.out),
                None => self
                    .local
                    .after_engine(now, &mut self.engine, &done, &mut self.out),
            }
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
        // The uplink's carrier: a DHCP client that saw it go starts over when it is back
        // (INIT-REBOOT with the address it had, RFC 2131 3.2).
        let uplink = self.desired.uplink.clone();
        for e in &events {
            let st = match e {
                LinkEvent::Changed(st) => Some(st),
                _ => None,
            };
            let gone = matches!(e, LinkEvent::Gone { name } if *name == uplink);
            if st.is_some_and(|s| s.name == uplink) || gone {
                let up = st.is_some_and(|s| s.up && s.carrier);
                let was = self.uplink_carrier.replace(up);
                if was == Some(up) {
                    continue;
                }
                self.engine.uplink_link_changed();
                let now = self.now();
                let mut fx = Vec::new();
                if let Some(d) = self.dhcp.as_mut() {
                    if up {
                        if was == Some(false) {
                            tracing::info!("uplink carrier back: DHCP again");
                            d.link_up(now, &mut fx);
                        }
                    } else {
                        tracing::warn!("uplink carrier lost");
                        d.link_down(now);
                    }
                }
                self.dhcp_effects(fx);
            }
        }
        // MTU changes of attached links are followed in place (no reconfiguration).
        for e in &events {
            if let LinkEvent::Changed(st) = e {
                let Some(id) = self.engine.iface_by_name(&st.name) else {
                    continue;
                };
                if !self.devices.contains_key(&id) {
                    continue;
                }
                if let Some(m) = link_mtu_of(st.mtu) {
                    if self.link_mtu.insert(st.name.clone(), m) != Some(m) {
                        self.follow_mtu(id);
                    }
                }
            }
        }
        let attached = |svc: &Self, n: &str| svc.devices.values().any(|d| d.name() == n);
        let relevant = events.iter().any(|e| match e {
            LinkEvent::Overrun => true,
            LinkEvent::Changed(s) => {
                (self.desired.vifs.iter().any(|(v, _)| v.name == s.name)
                    || s.name == self.desired.uplink)
                    && !attached(self, &s.name)
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
            let d = match q.desired() {
                Ok(d) => d,
                // A key with a bad value (an MTU that is not one, a vif without an address):
                // refused like any bad configuration, and the running one stays. Anything
                // else (QubesDB gone) still ends the service.
                Err(ServiceError::Config(e)) => {
                    tracing::error!(error = %e, "QubesDB change could not be applied");
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
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
                other => {
                    let now = self.now();
                    match self.terminator.as_mut().and_then(|t| t.command(now, other)) {
                        Some(answer) => answer,
                        None => format!("error unknown command {other:?} (status, reload)\n"),
                    }
                }
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
        match &self.dom0_link {
            Some(Ok(())) => s.push_str("qubesdb dom0 link up (vchan)\n"),
            Some(Err(why)) => s.push_str(&format!(
                "qubesdb dom0 link LOST: {why}; no changes from dom0 until restarted\n"
            )),
            None => {}
        }
        s.push_str(&format!(
            "uplink {} address {} mac {} mtu {} netvm {} mac {}{}\n",
            cfg.uplink.name,
            cfg.uplink.ip,
            format_mac(&cfg.uplink.mac),
            cfg.uplink.mtu,
            cfg.uplink.gateway,
            format_mac(&mac),
            if known { "" } else { " (not learned yet)" }
        ));
        if self.role == Role::Net {
            let how = if self.desired.static_uplink.is_some() {
                "static"
            } else if self.lease.is_some() {
                "dhcp"
            } else {
                "none (waiting for DHCP)"
            };
            s.push_str(&format!(
                "addressing {how} gateway-for-clients {}\n",
                cfg.client_gateway
                    .map_or("-".to_string(), |g| g.to_string())
            ));
            if let Some(d) = &self.dhcp {
                let now = self.now();
                let left = |t: Option<Instant>| match t {
                    Some(t) => format!(
                        "{}s",
                        t.as_nanos().saturating_sub(now.as_nanos()) / 1_000_000_000
                    ),
                    None => "never".to_string(),
                };
                match d.lease() {
                    Some(l) => s.push_str(&format!(
                        "dhcp {:?} lease {}/{} router {} server {} dns {} t1-in {} t2-in {} expires-in {}\n",
                        d.state(),
                        l.address,
                        l.prefix_len,
                        l.router.map_or("-".to_string(), |r| r.to_string()),
                        l.server,
                        l.dns.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(","),
                        left(l.t1()),
                        left(l.t2()),
                        left(l.expires()),
                    )),
                    None => s.push_str(&format!("dhcp {:?} no lease\n", d.state())),
                }
            }
            for r in &cfg.dns_redirect {
                s.push_str(&format!(
                    "dns {} -> {}\n",
                    r.virtual_ip,
                    r.upstream
                        .map_or("refused (no upstream)".to_string(), |u| u.to_string())
                ));
            }
        }
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
        if let Some(d) = self.devices.get(&UPLINK).and_then(Attached::describe) {
            s.push_str(&format!("  device {d}\n"));
        }
        for c in &cfg.clients {
            let Some(id) = self.engine.iface_by_name(&c.vif) else {
                continue;
            };
            let rules = c.rules.iter().filter(|(k, _)| k != "policy").count();
            let flows = ct.iter().filter(|(_, f)| f.key.client == id).count();
            s.push_str(&format!(
                "client {} address {}{}{} rules {} flows {} mtu {}{}\n",
                c.vif,
                c.ip,
                c.ip6.map(|a| format!(" {a}")).unwrap_or_default(),
                // The client's own view, when dom0 gave it fake addresses.
                c.visible
                    .map(|v| format!(" visible {} gateway {}", v.ip, v.gateway))
                    .unwrap_or_default(),
                rules,
                flows,
                c.mtu,
                match self.engine.blocked(id) {
                    Some(why) => format!(" BLOCKED: {why}"),
                    None => String::new(),
                }
            ));
            if let Some(cn) = self.engine.counters(id) {
                s.push_str(&format!("  counters {}\n", counters_line(cn)));
            }
            if let Some(d) = self.devices.get(&id).and_then(Attached::describe) {
                s.push_str(&format!("  device {d}\n"));
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
        if let Some(t) = &self.terminator {
            s.push_str(&t.status(self.now(), &self.engine));
        }
        s
    }
}

/// `sys-firewall status` / `reload` (or sys-net's): one request on the control socket.
pub fn control(
    socket: &std::path::Path,
    command: &str,
    role: Role,
) -> Result<String, ServiceError> {
    qubes_service_runtime::control::request(socket, command, role.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_mtu_counts_and_a_configured_one_may_lower_it() {
        assert_eq!(effective_mtu(1500, Some(1400)), 1400);
        assert_eq!(effective_mtu(1400, Some(1500)), 1400);
        assert_eq!(effective_mtu(1500, Some(9000)), 1500);
        assert_eq!(effective_mtu(1500, None), 1500);
        // A device claiming less than IPv4's minimum is not believed.
        assert_eq!(effective_mtu(1500, Some(0)), 1500);
        assert_eq!(link_mtu_of(Some(70_000)), Some(u16::MAX));
        assert_eq!(link_mtu_of(None), None);
    }
}
