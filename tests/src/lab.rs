//! The lab commands: up, down, status, exec, firewall, matrix, restart-firewall and the
//! QubesDB helper (start and stop are in `lifecycle`).

use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use qubes_rules::store::Store;
use qubes_rules::Rule;
use testkit::tornet::TorNet;

use crate::cmd::{err, io_err, Cmd, Context, Error, Result};
use crate::config::{self, NetvmConfig, TorConfig, TorFallback, TorNetwork};
use crate::matrix;
use crate::netvm::{self, AgentLog};
use crate::procs;
use crate::service::Service;
use crate::state::{self, FirewallKind, LabState, NetvmKind, Paths};
use crate::sysnet;
use crate::topology::world::{self as w, DNS_IP, ROUTER_IP, UPLINK_IP};
use crate::topology::{check_lab_name, world_ns, Qube, Role, Topology, TopologySpec, VIRTUAL_DNS};
use crate::vm;
use crate::world;

/// What `up` is asked for.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub name: String,
    pub topology: Option<PathBuf>,
    pub firewall: FirewallKind,
    /// Which sys-net runs.
    pub netvm: NetvmKind,
    pub matrix: bool,
    pub keep_on_error: bool,
    /// Our service's connection table size (`conntrack_max`); none: its default, from memory.
    pub conntrack_max: Option<usize>,
    /// Leave out the whonix qube, the qubes behind it and the private Tor network.
    pub no_whonix: bool,
    /// The qube whose service runs as a VM (`sys-firewall`), if any.
    pub vm: Option<String>,
}

/// sys-whonix's kernel takes nothing from a client vif: only its uplink (the Tor client's
/// relay connections) and loopback reach it, in IP, IPv6 and ARP, and it forwards nothing.
const WHONIX_GUARD: &str = "\
table inet whonix-guard {
    chain input {
        type filter hook input priority -300; policy drop;
        iifname \"lo\" accept
        iifname \"eth0\" accept
    }
    chain forward {
        type filter hook forward priority -300; policy drop;
    }
}
table arp whonix-guard {
    chain input {
        type filter hook input priority 0; policy drop;
        iifname \"eth0\" accept
    }
}
";

/// How long `up` waits for the private Tor network's first consensus, and then for
/// sys-whonix's Tor client to be ready.
const TOR_CONSENSUS_WAIT: Duration = Duration::from_secs(150);
const TOR_READY_WAIT: Duration = Duration::from_secs(120);

fn load_spec(path: Option<&Path>) -> Result<TopologySpec> {
    match path {
        None => TopologySpec::default_spec(),
        Some(p) => {
            let text = fs::read_to_string(p).map_err(io_err("cannot read topology", p))?;
            TopologySpec::parse(&text).context(|| p.display().to_string())
        }
    }
}

/// Brings a lab up: cleans a stale lab of the same name, builds everything, prints a summary
/// and the connectivity matrix.
pub fn up(o: &UpOptions) -> Result<()> {
    check_lab_name(&o.name)?;
    state::need_root()?;
    world::check_tools()?;
    let mut spec = load_spec(o.topology.as_deref())?;
    if o.no_whonix {
        spec = spec.without_whonix();
    }
    let topo = spec.resolve(&o.name)?;
    if o.firewall == FirewallKind::Rust && topo.firewall().is_some() {
        Service::Firewall.binary()?;
    }
    let vm_guest = match &o.vm {
        Some(q) => Some(vm_guest(&topo, q, o)?),
        None => None,
    };
    if let Some(w) = topo.whonix() {
        Service::Whonix.binary().context(|| {
            format!(
                "{} runs sys-whonix (`up --no-whonix` leaves it out)",
                w.name
            )
        })?;
        if !TorNet::available() {
            return err(format!(
                "{} needs the world's private Tor network, and tor is not installed \
                 (scripts/setup-debian.sh installs it; `up --no-whonix` leaves sys-whonix out)",
                w.name
            ));
        }
    }
    down(&o.name, false).context(|| format!("cleaning the old lab {}", o.name))?;
    let paths = Paths::new(&o.name);
    fs::create_dir_all(&paths.dir).map_err(io_err("cannot create", &paths.dir))?;
    LabState {
        name: o.name.clone(),
        firewall: o.firewall,
        netvm: o.netvm,
        namespaces: topo.namespaces(),
        next_domid: Some(topo.qubes.iter().map(|q| q.domid).max().unwrap_or(0) + 1),
        domids: Default::default(),
        halted: Default::default(),
        topology: spec,
    }
    .write(&paths)?;
    if let Some(g) = vm_guest {
        let m = vm::marker(&paths, g);
        fs::write(&m, format!("{} runs as a VM\n", g.name()))
            .map_err(io_err("cannot write", &m))?;
    }
    if o.conntrack_max.is_some() && o.firewall == FirewallKind::Linux {
        // net.netfilter.nf_conntrack_max is read-only in a namespace other than the initial
        // one (and on older kernels one global value): the lab never changes the host's.
        eprintln!(
            "note: --conntrack-max applies to our service only; the Linux firewall keeps the \
             kernel's nf_conntrack_max ({})",
            fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|e| format!("unreadable: {e}"))
        );
    }
    if o.netvm == NetvmKind::Rust {
        sysnet::binary()?;
    }
    if let Err(e) = build(&topo, &paths, o.firewall, o.netvm, o.conntrack_max) {
        if o.keep_on_error {
            return Err(Error(format!(
                "{e}\n(the partial lab is kept: `qubes-lab down --name {}` removes it)",
                o.name
            )));
        }
        if let Err(e2) = down(&o.name, false) {
            return Err(Error(format!("{e}\nand cleaning up failed too: {e2}")));
        }
        return Err(e);
    }
    print!("{}", summary(&topo, &paths, o.firewall, o.netvm));
    if o.matrix {
        println!();
        print!("{}", matrix_text(&topo, o.firewall)?);
    }
    Ok(())
}

/// The VM `up --vm QUBE` asks for, checked: sys-firewall with our firewall, or sys-net with
/// our sys-net, and QEMU installed.
fn vm_guest(topo: &Topology, q: &str, o: &UpOptions) -> Result<vm::Guest> {
    let qube = topo.get(q)?;
    let guest = vm::Guest::of_role(qube.role).ok_or_else(|| {
        Error(format!(
            "--vm {q}: only the firewall qube ({}) and the uplink qube ({}) can run as VMs",
            topo.firewall().map_or("none", |f| f.name.as_str()),
            topo.uplink().map_or("none", |u| u.name.as_str()),
        ))
    })?;
    match guest {
        vm::Guest::Firewall if o.firewall != FirewallKind::Rust => {
            return err(format!(
                "--vm {q} runs our sys-firewall's image: it needs --firewall rust"
            ));
        }
        vm::Guest::Net if o.netvm != NetvmKind::Rust => {
            return err(format!(
                "--vm {q} runs our sys-net's image: it needs --netvm rust"
            ));
        }
        _ => {}
    }
    if Cmd::new("qemu-system-x86_64")
        .arg("--version")
        .run()
        .is_err()
    {
        return err(
            "--vm needs qemu-system-x86_64 (scripts/setup-debian.sh installs it)".to_string(),
        );
    }
    Ok(guest)
}

fn matrix_text(topo: &Topology, kind: FirewallKind) -> Result<String> {
    let rows = matrix::check(topo)?;
    Ok(format!(
        "Connectivity checked live from each qube (✓ reached, ✗ not; sys-firewall: {}; \
         dns via {}; other qube: tcp port 80):\n{}",
        kind.as_str(),
        VIRTUAL_DNS[0],
        matrix::render(&rows)
    ))
}

fn build(
    topo: &Topology,
    paths: &Paths,
    kind: FirewallKind,
    netvm_kind: NetvmKind,
    conntrack_max: Option<usize>,
) -> Result<()> {
    // Namespaces, IPv4 only.
    for ns in topo.namespaces() {
        Cmd::new("ip").args(["netns", "add", &ns]).run()?;
        Cmd::ip(&ns).args(["link", "set", "lo", "up"]).run()?;
        netvm::sysctl(
            &ns,
            &[
                ("net/ipv6/conf/all/disable_ipv6".to_string(), "1"),
                ("net/ipv6/conf/default/disable_ipv6".to_string(), "1"),
            ],
        )?;
    }
    // Links: the uplink qube's eth0 to the world, and one vif per qube with a netvm.
    let uplink = topo
        .uplink()
        .ok_or_else(|| Error("the topology has no uplink qube".into()))?;
    Cmd::new("ip")
        .args([
            "link",
            "add",
            "eth0",
            "netns",
            &uplink.ns,
            "address",
            &uplink.mac,
        ])
        .args([
            "type",
            "veth",
            "peer",
            "name",
            w::IFNAME,
            "netns",
            &world_ns(&topo.lab),
        ])
        .run()?;
    // The qube that runs as a VM, whose NICs are TAPs wired when it boots (vm::start).
    let vm_qube = topo
        .qubes
        .iter()
        .find(|q| vm::guest_of(paths, q.role).is_some())
        .map(|q| q.name.clone());
    for q in &topo.qubes {
        let (Some(netvm), Some(vif)) = (topo.netvm_of(q), q.vif()) else {
            continue;
        };
        if vm_qube
            .as_deref()
            .is_some_and(|f| f == q.name || f == netvm.name)
        {
            // The VM's NICs are TAPs, wired when it boots (vm::start).
            continue;
        }
        netvm::add_vif_link(&netvm.ns, &vif, &q.ns, &q.mac)?;
    }
    // The rule store, and each netvm's configuration (its QubesDB tree).
    let store = Store::new(paths.store());
    let now = config::now();
    for q in &topo.qubes {
        store
            .create_qube(&q.name)
            .map_err(|e| Error(format!("rule store: {e}")))?;
        if let Some(rules) = &q.rules {
            store
                .save(&q.name, rules, now)
                .map_err(|e| Error(format!("rule store: {e}")))?;
        }
    }
    let rules_of = |q: &Qube| -> Result<Vec<Rule>> {
        store
            .load(&q.name)
            .map_err(|e| Error(format!("rule store: {e}")))
    };
    for p in topo.qubes.iter().filter(|q| q.provides_network()) {
        let mut cfg = config::build(topo, p, &rules_of)?;
        if kind == FirewallKind::Rust && p.role == Role::Firewall {
            cfg.conntrack_max = conntrack_max;
        }
        cfg.write(&paths.config(&p.name))?;
    }
    // DNS configuration of every namespace.
    for q in &topo.qubes {
        match q.role {
            Role::Uplink => netvm::write_resolv_conf(&q.ns, &[DNS_IP])?,
            Role::Isolated => netvm::write_resolv_conf(&q.ns, &[])?,
            _ => netvm::write_resolv_conf(&q.ns, &VIRTUAL_DNS)?,
        }
    }
    world::up(topo, paths)?;
    if netvm_kind == NetvmKind::Rust {
        world::dhcp_up(topo, paths)?;
    }
    // The Tor network's first consensus takes longest: started now, waited for once the
    // netvms below sys-whonix are up.
    let mut tor_net = match topo.whonix() {
        Some(_) => Some(world::tor_up(topo, paths)?),
        None => None,
    };
    // Netvms from the root down, then the app qubes.
    let mut providers: Vec<&Qube> = topo.qubes.iter().filter(|q| q.provides_network()).collect();
    providers.sort_by_key(|q| depth(topo, q));
    for p in providers {
        if p.role == Role::Whonix {
            if let Some(net) = tor_net.take() {
                whonix_prepare(paths, p, &net)?;
                // The relays are the world's daemons from here on (`down` stops them).
                net.detach();
            }
        }
        netvm_up(topo, paths, kind, netvm_kind, p).context(|| format!("setting up {}", p.name))?;
    }
    for q in topo.qubes.iter().filter(|q| q.role == Role::App) {
        let gw = gateway(topo, q)?;
        let ip = q.ip.ok_or_else(|| Error(format!("{} has no ip", q.name)))?;
        netvm::setup_ip(&q.ns, ip, gw).context(|| format!("setting up {}", q.name))?;
    }
    if topo.whonix().is_some() {
        Service::Whonix
            .wait_tor_ready(paths, TOR_READY_WAIT)
            .context(|| "sys-whonix".to_string())?;
    }
    Ok(())
}

/// Before sys-whonix starts: its Tor client's directories (private, as arti wants them), the
/// private network in its configuration, and the network's first consensus.
fn whonix_prepare(paths: &Paths, q: &Qube, net: &TorNet) -> Result<()> {
    let base = paths.dir.join("sys-whonix");
    let (state_dir, cache_dir) = (base.join("state"), base.join("cache"));
    for d in [&base, &state_dir, &cache_dir] {
        fs::create_dir_all(d).map_err(io_err("cannot create", d))?;
        fs::set_permissions(d, fs::Permissions::from_mode(0o700))
            .map_err(io_err("cannot make private", d))?;
    }
    let path = paths.config(&q.name);
    let mut cfg = NetvmConfig::read(&path)?;
    cfg.tor = Some(TorConfig {
        state_dir,
        cache_dir,
        network: TorNetwork {
            authorities: net.authorities.clone(),
            fallbacks: net
                .fallbacks
                .iter()
                .map(|f| TorFallback {
                    rsa_identity: f.rsa_identity.clone(),
                    ed_identity: f.ed_identity.clone(),
                    orport: f.orport.clone(),
                })
                .collect(),
        },
    });
    cfg.write(&path)?;
    world::wait_tor_consensus(net, TOR_CONSENSUS_WAIT)
}

fn depth(topo: &Topology, q: &Qube) -> usize {
    let mut d = 0;
    let mut cur = topo.netvm_of(q);
    while let Some(n) = cur {
        d += 1;
        cur = topo.netvm_of(n);
    }
    d
}

pub(crate) fn gateway(topo: &Topology, q: &Qube) -> Result<Ipv4Addr> {
    topo.netvm_of(q)
        .and_then(|n| n.ip)
        .ok_or_else(|| Error(format!("{} has no netvm with an address", q.name)))
}

pub(crate) fn agent_log(paths: &Paths, netvm: &Qube) -> AgentLog {
    AgentLog {
        path: paths.log(&format!("{}-agent", netvm.name)),
    }
}

/// One netvm: Linux as Qubes sets it up, or (the firewall qube with `--firewall rust`) just its
/// links up, without addresses: the service answers ARP itself.
fn netvm_up(
    topo: &Topology,
    paths: &Paths,
    kind: FirewallKind,
    netvm_kind: NetvmKind,
    p: &Qube,
) -> Result<()> {
    let mut cfg = NetvmConfig::read(&paths.config(&p.name))?;
    if vm::firewall_vm(paths) {
        // The firewall VM's uplink vif is a TAP that appears when the VM boots (vm::start
        // brings it online then).
        if let Some(fw_vif) = topo.firewall().and_then(|f| f.vif()) {
            cfg.vifs.retain(|v| v.name != fw_vif);
        }
    }
    if p.role == Role::Uplink && netvm_kind == NetvmKind::Rust && vm::net_vm(paths) {
        return vm::start(topo, netvm_kind, paths, p, vm::Guest::Net);
    }
    if p.role == Role::Uplink && netvm_kind == NetvmKind::Rust {
        // Our sys-net: links up without addresses; its address comes by DHCP.
        Cmd::ip(&p.ns).args(["link", "set", "eth0", "up"]).run()?;
        for v in &cfg.vifs {
            Cmd::ip(&p.ns).args(["link", "set", &v.name, "up"]).run()?;
        }
        return sysnet::start(paths, p);
    }
    if p.role == Role::Firewall && kind == FirewallKind::Rust && vm::firewall_vm(paths) {
        return vm::start(topo, netvm_kind, paths, p, vm::Guest::Firewall);
    }
    if p.role == Role::Firewall && kind == FirewallKind::Rust {
        Cmd::ip(&p.ns).args(["link", "set", "eth0", "up"]).run()?;
        for v in &cfg.vifs {
            Cmd::ip(&p.ns).args(["link", "set", &v.name, "up"]).run()?;
        }
        // Started before the netvms below it, whose agents may resolve names through it.
        return Service::Firewall.start(paths, p);
    }
    if p.role == Role::Whonix {
        // The kernel holds sys-whonix's uplink (eth0 with its address and default route, as
        // Qubes' setup-ip leaves it) for the Tor client's connections to relays. The client
        // vifs are up without addresses: the service answers on them, the kernel never
        // routes between them and the uplink (forwarding is off in a new namespace).
        let ip = p.ip.ok_or_else(|| Error(format!("{} has no ip", p.name)))?;
        netvm::setup_ip(&p.ns, ip, gateway(topo, p)?)?;
        // The kernel owns an address on eth0, and Linux delivers a packet for any of its
        // addresses whichever link it came in on, and answers ARP for it there too. So a
        // client that sends to the gateway's own address would reach the kernel's sockets
        // through its vif once the service is gone. The service reads its vifs through
        // AF_PACKET, before netfilter: this guard takes nothing from it.
        netvm::nft(&p.ns, WHONIX_GUARD)?;
        for v in &cfg.vifs {
            Cmd::ip(&p.ns).args(["link", "set", &v.name, "up"]).run()?;
        }
        return Service::Whonix.start(paths, p);
    }
    if p.role == Role::Uplink {
        // The NIC: an address in the world, a default route to its router.
        Cmd::ip(&p.ns)
            .args([
                "addr",
                "add",
                &format!("{UPLINK_IP}/{}", w::PREFIX_LEN),
                "dev",
                "eth0",
            ])
            .run()?;
        Cmd::ip(&p.ns).args(["link", "set", "eth0", "up"]).run()?;
        Cmd::ip(&p.ns)
            .args([
                "route",
                "add",
                "default",
                "via",
                &ROUTER_IP.to_string(),
                "dev",
                "eth0",
            ])
            .run()?;
    } else {
        let ip = p.ip.ok_or_else(|| Error(format!("{} has no ip", p.name)))?;
        netvm::setup_ip(&p.ns, ip, gateway(topo, p)?)?;
    }
    netvm::netvm_base(&p.ns, &cfg)?;
    netvm::agent_start(&p.ns, &cfg, &agent_log(paths, p))?;
    let domid_of = |v: &config::Vif| {
        topo.qubes
            .iter()
            .find(|q| q.vif().as_deref() == Some(v.name.as_str()))
            .map(|q| q.domid)
            .unwrap_or(0)
    };
    netvm::vifs_online(&p.ns, &cfg, &domid_of)
}

/// The qubes this lab runs as VMs.
fn vm_flags(paths: &Paths) -> Vec<vm::Guest> {
    vm::Guest::ALL
        .into_iter()
        .filter(|&g| vm::runs(paths, g))
        .collect()
}

fn summary(topo: &Topology, paths: &Paths, kind: FirewallKind, netvm: NetvmKind) -> String {
    let mut out = format!(
        "lab {} is up (sys-firewall: {}, sys-net: {}, state in {})\n",
        topo.lab,
        kind.as_str(),
        netvm.as_str(),
        paths.dir.display()
    );
    out.push_str(&qube_table(topo, kind, netvm, &vm_flags(paths), None));
    out
}

/// The qubes with their namespaces, addresses, netvms and vifs; with `present`, whether each
/// namespace exists.
fn qube_table(
    topo: &Topology,
    kind: FirewallKind,
    netvm: NetvmKind,
    vms: &[vm::Guest],
    present: Option<&[String]>,
) -> String {
    let firewall_vm = vms.contains(&vm::Guest::Firewall);
    let net_vm = vms.contains(&vm::Guest::Net);
    let mut rows: Vec<Vec<String>> = vec![vec![
        "qube".into(),
        "namespace".into(),
        "ip".into(),
        "netvm".into(),
        "vif".into(),
        "mac".into(),
        "runs".into(),
    ]];
    for q in &topo.qubes {
        let runs = match q.role {
            Role::Uplink => match netvm {
                NetvmKind::Linux => format!("Linux netvm, eth0 {UPLINK_IP} to the world"),
                NetvmKind::Rust if net_vm => {
                    "sys-net image under QEMU (qube-image), eth0 by DHCP from the world".to_string()
                }
                NetvmKind::Rust => "sys-net service, eth0 by DHCP from the world".to_string(),
            },
            Role::Firewall => match kind {
                FirewallKind::Linux => "Linux sys-firewall (nftables)".to_string(),
                FirewallKind::Rust if firewall_vm => {
                    "sys-firewall image under QEMU (qube-image)".to_string()
                }
                FirewallKind::Rust => "sys-firewall service".to_string(),
            },
            Role::Whonix => "sys-whonix service: Tor gateway (embedded arti)".to_string(),
            Role::LinuxProxy => "Linux proxy netvm".to_string(),
            Role::App => "app qube".to_string(),
            Role::Isolated => "no network".to_string(),
        };
        let runs = if q.running {
            runs
        } else {
            format!("HALTED ({runs})")
        };
        let mut ns = q.ns.clone();
        if let Some(p) = present {
            if !p.contains(&q.ns) {
                ns.push_str(" (MISSING)");
            }
        }
        rows.push(vec![
            q.name.clone(),
            ns,
            q.ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
            topo.netvm_of(q)
                .map(|n| n.name.clone())
                .unwrap_or_else(|| "-".into()),
            q.vif()
                .map(|v| {
                    let netvm = topo.netvm_of(q).map(|n| n.name.as_str()).unwrap_or("?");
                    if q.running {
                        format!("{v} in {netvm}")
                    } else {
                        format!("- (was {v} in {netvm})")
                    }
                })
                .unwrap_or_else(|| "-".into()),
            if q.role == Role::Isolated {
                "-".into()
            } else {
                q.mac.clone()
            },
            runs,
        ]);
    }
    let wns = world_ns(&topo.lab);
    let mut wname = wns.clone();
    if let Some(p) = present {
        if !p.contains(&wns) {
            wname.push_str(" (MISSING)");
        }
    }
    rows.push(vec![
        "world".into(),
        wname,
        format!("{ROUTER_IP}, {}, {DNS_IP}", w::WEB_IP),
        "-".into(),
        format!(
            "{} (peer of {} eth0)",
            w::IFNAME,
            topo.uplink().map(|u| u.name.as_str()).unwrap_or("?")
        ),
        "-".into(),
        format!(
            "web {}:80,443 (+echo :{}), dns {DNS_IP} ({} -> {}){}",
            w::WEB_IP,
            w::ECHO_PORT,
            w::WEB_NAME,
            w::WEB_IP,
            if topo.whonix().is_some() {
                let relays = TorNet::addresses(w::TOR_FIRST_RELAY);
                format!(
                    ", private Tor network {}-{} port {}",
                    relays[0],
                    relays[relays.len() - 1],
                    w::TOR_ORPORT
                )
            } else {
                String::new()
            }
        ),
    ]);
    render_table(&rows)
}

fn render_table(rows: &[Vec<String>]) -> String {
    let ncol = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..ncol)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            line.push_str(c);
            if i + 1 < r.len() {
                line.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The namespaces that exist (`ip netns list`).
pub fn existing_namespaces() -> Result<Vec<String>> {
    let out = Cmd::new("ip").args(["netns", "list"]).run()?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// The background processes of a lab: pid-file name and command name.
const RECORDED: [(&str, &str); 9] = [
    ("dnsmasq", "dnsmasq"),
    ("serve-http", "qubes-lab"),
    ("iperf3", "iperf3"),
    ("sys-firewall", "sys-firewall"),
    ("sys-whonix", "sys-whonix"),
    (sysnet::PROCESS, "sys-net"),
    ("dnsmasq-dhcp", "dnsmasq"),
    // sys-firewall or sys-net as a VM (`up --vm`): QEMU under the service's name
    ("sys-firewall", "qemu-system-x86"),
    (sysnet::PROCESS, "qemu-system-x86"),
];

/// Removes a lab: stops every process in its namespaces, deletes the namespaces, their
/// /etc/netns directories and the state directory. Idempotent; works from the state file, or,
/// when that is gone, from the default topology's names.
pub fn down(name: &str, verbose: bool) -> Result<()> {
    check_lab_name(name)?;
    state::need_root()?;
    let paths = Paths::new(name);
    let mut candidates: Vec<String> = LabState::read(&paths)
        .map(|s| s.namespaces)
        .unwrap_or_default();
    for ns in TopologySpec::default_spec()?.resolve(name)?.namespaces() {
        if !candidates.contains(&ns) {
            candidates.push(ns);
        }
    }
    let existing = existing_namespaces()?;
    let ours: Vec<&String> = candidates.iter().filter(|c| existing.contains(c)).collect();
    let mut problems: Vec<String> = Vec::new();
    let mut pids = Vec::new();
    for ns in &ours {
        match procs::ns_pids(ns) {
            Ok(p) => pids.extend(p),
            Err(e) => problems.push(e.to_string()),
        }
    }
    for pid in procs::recorded_pids(&paths, &RECORDED) {
        if !pids.contains(&pid) {
            pids.push(pid);
        }
    }
    // The VM's relay runs in our own namespace, which recorded_pids leaves out (it also ends
    // by itself once QEMU is gone).
    for g in vm::Guest::ALL {
        if let Some(pid) = procs::read_pid(&paths, &g.relay())
            .filter(|&p| procs::alive(p) && procs::comm(p) == "qubes-lab" && !pids.contains(&p))
        {
            pids.push(pid);
        }
    }
    if let Err(e) = procs::stop(&pids, Duration::from_secs(3)) {
        problems.push(e.to_string());
    }
    for ns in &ours {
        if let Err(e) = Cmd::new("ip").args(["netns", "del", ns]).run() {
            problems.push(e.to_string());
        }
    }
    for ns in &candidates {
        let dir = netvm::etc_netns(ns);
        if dir.exists() {
            if let Err(e) = fs::remove_dir_all(&dir) {
                problems.push(format!("cannot remove {}: {e}", dir.display()));
            }
        }
    }
    if paths.dir.exists() {
        if let Err(e) = fs::remove_dir_all(&paths.dir) {
            problems.push(format!("cannot remove {}: {e}", paths.dir.display()));
        }
    }
    let after = existing_namespaces()?;
    let left: Vec<&String> = candidates.iter().filter(|c| after.contains(c)).collect();
    if !left.is_empty() {
        problems.push(format!(
            "namespaces still there: {}",
            left.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let prefix = format!("{name}-");
    let strangers: Vec<&String> = after
        .iter()
        .filter(|n| n.starts_with(&prefix) && !candidates.contains(n))
        .collect();
    if !strangers.is_empty() {
        eprintln!(
            "qubes-lab: left alone (not recorded as part of lab {name}): {}",
            strangers
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if verbose {
        if ours.is_empty() {
            println!("lab {name}: nothing to remove");
        } else {
            println!(
                "lab {name} removed: {} namespaces, {} processes",
                ours.len(),
                pids.len()
            );
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        err(problems.join("\n"))
    }
}

pub(crate) fn load(name: &str) -> Result<(LabState, Topology, Paths)> {
    check_lab_name(name)?;
    let paths = Paths::new(name);
    let state = LabState::read(&paths)?;
    let topo = state.topology()?;
    Ok((state, topo, paths))
}

/// `status`: the qubes, namespaces, processes, and the service's own status.
pub fn status(name: &str) -> Result<()> {
    let (state, topo, paths) = load(name)?;
    let existing = existing_namespaces()?;
    println!(
        "lab {name}: sys-firewall {}, sys-net {}, state in {}, next domid {}",
        state.firewall.as_str(),
        state.netvm.as_str(),
        paths.dir.display(),
        state.next_domid()?
    );
    print!(
        "{}",
        qube_table(
            &topo,
            state.firewall,
            state.netvm,
            &vm_flags(&paths),
            Some(&existing)
        )
    );
    println!("\nprocesses:");
    let mut names: Vec<(&str, String)> = world::PROCESSES
        .iter()
        .map(|(n, what)| (*n, what.to_string()))
        .collect();
    if state.firewall == FirewallKind::Rust {
        let what = if vm::firewall_vm(&paths) {
            "the sys-firewall VM (QEMU; its console is the log)"
        } else {
            "the sys-firewall service"
        };
        names.push((Service::Firewall.process(), what.to_string()));
    }
    let relays: Vec<(vm::Guest, String)> = vm::Guest::ALL
        .into_iter()
        .filter(|&g| vm::runs(&paths, g))
        .map(|g| (g, g.relay()))
        .collect();
    for (g, relay) in &relays {
        names.push((
            relay.as_str(),
            format!(
                "the {} VM's lab port relay (control socket, configuration)",
                g.name()
            ),
        ));
    }
    if topo.whonix().is_some() {
        names.push((
            Service::Whonix.process(),
            "the sys-whonix service (Tor gateway)".to_string(),
        ));
    }
    if state.netvm == NetvmKind::Rust {
        let what = if vm::net_vm(&paths) {
            "the sys-net VM (QEMU; its console is the log)"
        } else {
            "the sys-net service"
        };
        names.push((sysnet::PROCESS, what.to_string()));
        names.push((
            "dnsmasq-dhcp",
            "DHCP server of the uplink segment".to_string(),
        ));
    }
    for (n, what) in names {
        let line = match procs::read_pid(&paths, n) {
            Some(pid) if procs::alive(pid) => format!("running, pid {pid}"),
            Some(pid) => format!("NOT RUNNING (pid {pid} gone)"),
            None => "not started".to_string(),
        };
        println!(
            "  {n:<13} {line:<22} {what} (log {})",
            paths.log(n).display()
        );
    }
    for ns in topo.namespaces() {
        if existing.contains(&ns) {
            let pids = procs::ns_pids(&ns)?;
            if !pids.is_empty() {
                let list: Vec<String> = pids
                    .iter()
                    .map(|p| format!("{p} {}", procs::comm(*p)))
                    .collect();
                println!("  in {ns}: {}", list.join(", "));
            }
        }
    }
    let mut services = Vec::new();
    if state.firewall == FirewallKind::Rust {
        services.push(Service::Firewall);
    }
    if topo.whonix().is_some() {
        services.push(Service::Whonix);
    }
    for svc in services {
        println!("\n{} status:", svc.process());
        match svc.status(&paths) {
            Ok(out) => print!("{}", crate::cmd::indent(&out) + "\n"),
            Err(e) => println!("{}", crate::cmd::indent(&e.to_string())),
        }
    }
    if state.netvm == NetvmKind::Rust {
        println!("\nsys-net status:");
        match sysnet::status(&paths) {
            Ok(out) => print!("{}", crate::cmd::indent(&out) + "\n"),
            Err(e) => println!("{}", crate::cmd::indent(&e.to_string())),
        }
    }
    Ok(())
}

/// The namespace of a qube of the lab, or of `world`.
fn namespace_of(topo: &Topology, qube: &str) -> Result<String> {
    if qube == "world" {
        Ok(world_ns(&topo.lab))
    } else {
        Ok(topo.get(qube)?.ns.clone())
    }
}

/// `exec QUBE -- CMD...`: the command's exit status (128 + signal when killed).
pub fn exec(name: &str, qube: &str, cmd: &[String]) -> Result<i32> {
    let (_, topo, _) = load(name)?;
    let ns = namespace_of(&topo, qube)?;
    if !existing_namespaces()?.contains(&ns) {
        return err(format!("namespace {ns} does not exist (is the lab up?)"));
    }
    let Some((program, args)) = cmd.split_first() else {
        return err("exec: no command given (qubes-lab exec QUBE -- CMD...)");
    };
    let status = Command::new("ip")
        .args(["netns", "exec", &ns, program])
        .args(args)
        .status()
        .map_err(|e| Error(format!("cannot run ip netns exec {ns} {program}: {e}")))?;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

/// `firewall QUBE ARGS...`: qvm-firewall on the lab's store; when the rules changed, they are
/// pushed to the netvm that enforces them. Returns qvm-firewall's exit status.
pub fn firewall(name: &str, qube: &str, args: &[String]) -> Result<i32> {
    let (_, topo, paths) = load(name)?;
    topo.get(qube)?;
    let qvm = procs::workspace_binary("qvm-firewall", "QUBES_LAB_QVM_FIREWALL")?;
    let _lock = state::lock(&paths)?;
    // Again under the lock: a `start` or `stop` may have run meanwhile.
    let (state, topo, paths) = load(name)?;
    let q = topo.get(qube)?;
    let xml = paths
        .store()
        .join("appvms")
        .join(&q.name)
        .join("firewall.xml");
    let before = fs::read(&xml).ok();
    let status = Command::new(&qvm)
        .arg("--store")
        .arg(paths.store())
        .arg(&q.name)
        .args(args)
        .status()
        .map_err(|e| Error(format!("cannot run {}: {e}", qvm.display())))?;
    if !status.success() {
        return Ok(status.code().unwrap_or(1));
    }
    if fs::read(&xml).ok() != before {
        if q.running {
            push(&topo, &paths, (state.firewall, state.netvm), q)?;
        } else if topo.netvm_of(q).is_some() {
            // dom0's firewall-changed handler reloads only running qubes; domain-pre-spawn
            // pushes the rules when it starts.
            eprintln!(
                "qubes-lab: {} is halted: its rules are stored and reach its netvm when it                  starts (`qubes-lab start {}`)",
                q.name, q.name
            );
        }
    }
    Ok(0)
}

/// Computes a qube's QubesDB entries from the store (as dom0 does on a rule change) and
/// writes them into its netvm's tree.
fn push(topo: &Topology, paths: &Paths, kind: (FirewallKind, NetvmKind), q: &Qube) -> Result<()> {
    let Some(netvm) = topo.netvm_of(q) else {
        eprintln!(
            "qubes-lab: {} has no netvm: its rules are kept, and enforced nowhere (as in Qubes)",
            q.name
        );
        return Ok(());
    };
    let ip =
        q.ip.ok_or_else(|| Error(format!("{} has no ip", q.name)))?
            .to_string();
    let rules = Store::new(paths.store())
        .load(&q.name)
        .map_err(|e| Error(format!("rule store: {e}")))?;
    let entries = config::rule_entries(&rules);
    update_tree(paths, kind, netvm, &ip, |cfg| {
        cfg.set_firewall(&ip, &entries)
    })
}

/// Edits a netvm's tree and makes the netvm act on it: the service re-reads its file (and we
/// wait until it reports the change applied); a Linux netvm's agent handles the client's
/// address (`handle_addr`) and the connected IPs.
fn update_tree(
    paths: &Paths,
    (kind, netvm_kind): (FirewallKind, NetvmKind),
    netvm: &Qube,
    client_ip: &str,
    edit: impl FnOnce(&mut NetvmConfig),
) -> Result<()> {
    let path = paths.config(&netvm.name);
    let mut cfg = NetvmConfig::read(&path)?;
    if netvm.role == Role::Uplink && netvm_kind == NetvmKind::Rust {
        // Our sys-net re-reads its file as sys-firewall does.
        let running = procs::read_pid(paths, sysnet::PROCESS).is_some_and(procs::alive);
        let before = if running {
            sysnet::config_generation(paths)
        } else {
            None
        };
        edit(&mut cfg);
        cfg.write(&path)?;
        return if running {
            sysnet::wait_applied(paths, before)
        } else {
            Ok(())
        };
    }
    let service = Service::of(netvm, kind);
    // The tree is dom0's (QubesDB), not the service's: it changes whether or not the service
    // runs, and a service that starts later reads it as it then is. Refusing the change here
    // would leave the rule store, which qvm-firewall has already changed, and the tree the
    // service enforces saying different things.
    let running = service.is_some_and(|s| s.running(paths));
    let before = match service {
        Some(s) if running => s.config_generation(paths),
        _ => None,
    };
    edit(&mut cfg);
    cfg.write(&path)?;
    if let Some(svc) = service {
        if running {
            return svc.wait_applied(paths, before);
        }
        let restart = match svc {
            Service::Firewall => "restart-firewall",
            Service::Whonix => "restart-whonix",
        };
        eprintln!(
            "qubes-lab: the {} service is not running (see {}); the change is in its tree \
             and takes effect when it starts (`qubes-lab {restart}`)",
            svc.process(),
            paths.log(svc.process()).display()
        );
        Ok(())
    } else {
        let log = agent_log(paths, netvm);
        netvm::agent_handle_addr(&netvm.ns, &cfg, client_ip, &log)?;
        netvm::agent_connected_ips(&netvm.ns, &cfg)
    }
}

/// The hidden `qubesdb-write QUBE KEY [VALUE]`: writes (or with `delete`, removes) a key in the
/// tree of QUBE's netvm, then the base key `/qubes-firewall/<ip>` (dom0's commit), and lets the
/// netvm act on it. A KEY without a leading `/` is relative to `/qubes-firewall/<ip>/`.
pub fn qubesdb_write(name: &str, qube: &str, key: &str, value: Option<&str>) -> Result<()> {
    let (state, topo, paths) = load(name)?;
    let q = topo.get(qube)?;
    let netvm = topo
        .netvm_of(q)
        .ok_or_else(|| Error(format!("{qube} has no netvm: there is no tree to write")))?;
    let ip =
        q.ip.ok_or_else(|| Error(format!("{qube} has no ip")))?
            .to_string();
    let full = if key.starts_with('/') {
        key.to_string()
    } else {
        format!("/qubes-firewall/{ip}/{key}")
    };
    let _lock = state::lock(&paths)?;
    update_tree(&paths, (state.firewall, state.netvm), netvm, &ip, |cfg| {
        match value {
            Some(v) => {
                cfg.qubesdb.insert(full.clone(), v.to_string());
            }
            None => {
                cfg.qubesdb.remove(&full);
            }
        }
        cfg.qubesdb
            .insert(format!("/qubes-firewall/{ip}"), String::new());
    })
}

/// `restart-firewall`: the service is stopped and started again (it must restore everything
/// from its configuration); with `--firewall linux`, the qubes-firewall agent is restarted
/// (`cleanup()` deletes its tables, the start rebuilds them from the tree).
pub fn restart_firewall(name: &str) -> Result<()> {
    let (state, topo, paths) = load(name)?;
    let fw = topo
        .firewall()
        .ok_or_else(|| Error("the topology has no firewall qube".to_string()))?;
    let _lock = state::lock(&paths)?;
    match state.firewall {
        FirewallKind::Rust if vm::firewall_vm(&paths) => {
            vm::stop(&paths, vm::Guest::Firewall)?;
            vm::start(&topo, state.netvm, &paths, fw, vm::Guest::Firewall)?;
            println!("sys-firewall VM restarted");
        }
        FirewallKind::Rust => {
            Service::Firewall.stop(&paths)?;
            Service::Firewall.start(&paths, fw)?;
            println!("sys-firewall service restarted");
        }
        FirewallKind::Linux => {
            let cfg = NetvmConfig::read(&paths.config(&fw.name))?;
            netvm::agent_restart(&fw.ns, &cfg, &agent_log(&paths, fw))?;
            println!("qubes-firewall agent of {} restarted", fw.name);
        }
    }
    Ok(())
}

/// `restart-whonix`: sys-whonix is stopped (if it still runs) and started again from its
/// configuration, and the command waits until its Tor client is ready. Its Tor state and
/// cache stay, as they would across a reboot of the qube.
pub fn restart_whonix(name: &str) -> Result<()> {
    let (_, topo, paths) = load(name)?;
    let q = topo
        .whonix()
        .ok_or_else(|| Error(format!("lab {name} has no whonix qube")))?;
    let _lock = state::lock(&paths)?;
    Service::Whonix.stop(&paths)?;
    Service::Whonix.start(&paths, q)?;
    Service::Whonix.wait_tor_ready(&paths, TOR_READY_WAIT)?;
    println!("sys-whonix service restarted, Tor ready");
    Ok(())
}

/// `matrix`: the connectivity matrix of a running lab.
pub fn matrix(name: &str) -> Result<()> {
    let (state, topo, _) = load(name)?;
    print!("{}", matrix_text(&topo, state.firewall)?);
    Ok(())
}

/// `mtu QUBE MTU`: both ends of the qube's link to its netvm get the new MTU. A veth pair
/// carries what the sender's MTU allows and the receiver drops what exceeds its own, so one
/// end alone would not make a 1400-byte link.
pub fn set_mtu(name: &str, qube: &str, mtu: u16) -> Result<()> {
    state::need_root()?;
    let (state, topo, paths) = load(name)?;
    let q = topo.get(qube)?;
    let (Some(netvm), Some(vif)) = (topo.netvm_of(q), q.vif()) else {
        return err(format!("{qube} has no netvm, so no link to set an MTU on"));
    };
    if !q.running {
        return err(format!(
            "{qube} is halted: it has no link (`qubes-lab start {qube}`)"
        ));
    }
    let mtu_s = mtu.to_string();
    // The netvm's end first: until the qube's end follows, the qube may still send bigger
    // packets, which the smaller end then drops, as a real link with mismatched ends does.
    // With sys-firewall as a VM, its ends of its links are inside the guest.
    if let Some(g) = vm::guest_of(&paths, netvm.role) {
        vm::set_guest_mtu(&paths, g, &vif, mtu)?;
    } else {
        Cmd::ip(&netvm.ns)
            .args(["link", "set", "dev", &vif, "mtu", &mtu_s])
            .run()?;
    }
    if let Some(g) = vm::guest_of(&paths, q.role) {
        vm::set_guest_mtu(&paths, g, "eth0", mtu)?;
    } else {
        Cmd::ip(&q.ns)
            .args(["link", "set", "dev", "eth0", "mtu", &mtu_s])
            .run()?;
    }
    // Our service follows netlink; wait until its status shows the new MTU, so that what
    // runs next meets it (a Linux sys-firewall uses the link MTU at once).
    if state.firewall == FirewallKind::Rust {
        let line = if q.role == Role::Firewall {
            Some("uplink ".to_string())
        } else if netvm.role == Role::Firewall {
            Some(format!("client {vif} "))
        } else {
            None
        };
        if let Some(prefix) = line {
            let want = mtu.to_string();
            Service::Firewall.wait_status(&paths, None, &format!("follow MTU {mtu}"), |st| {
                st.lines().filter(|l| l.starts_with(&prefix)).any(|l| {
                    let w: Vec<&str> = l.split_whitespace().collect();
                    w.windows(2).any(|p| p[0] == "mtu" && p[1] == want)
                })
            })?;
        }
    }
    println!("{qube}: eth0 and {vif} in {} have MTU {mtu}", netvm.name);
    Ok(())
}
