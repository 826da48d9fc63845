//! `qubes-lab`: the Qubes default netvm chain in Linux network namespaces (docs/lab.md).

mod cmd;
mod config;
mod dns;
mod lab;
mod lifecycle;
mod matrix;
mod netvm;
mod probe;
mod procs;
mod server;
mod service;
mod state;
mod sysnet;
mod topology;
mod vm;
mod world;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::state::{FirewallKind, NetvmKind};

const ABOUT: &str = "\
The Qubes default netvm chain in Linux network namespaces: sys-net, sys-firewall, the app
qubes work, personal and untrusted, vault without network, sys-whonix (the Tor gateway,
behind sys-firewall) with anon-whonix behind it, and a world of 198.18.0.0/24 behind
sys-net (a web server at 198.18.0.10, a DNS server at 198.18.0.53 that knows web.test, and a
private Tor network of seven relays at 198.18.0.41-47). Each qube is a namespace
<name>-<qube>; each vif a veth pair named as Qubes names them. `stop QUBE` and `start QUBE`
halt and start a qube as dom0 does: a restarted qube comes back with the next domid, so a
new vifN.0, with the same address, MAC and rules. Needs root. See docs/lab.md.";

#[derive(Debug, Parser)]
#[command(name = "qubes-lab", version, about = "The Qubes netvm chain in network namespaces", long_about = ABOUT)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct NameArg {
    /// The lab's name: it prefixes every namespace (<name>-<qube>)
    #[arg(long, value_name = "N", default_value = "lab")]
    name: String,
}

#[derive(Debug, Args)]
struct UpArgs {
    #[command(flatten)]
    name: NameArg,
    /// A topology file (YAML, docs/lab.md); default: the Qubes default, built in
    #[arg(long, value_name = "FILE")]
    topology: Option<PathBuf>,
    /// Which sys-firewall runs: the Linux kernel set up as Qubes does, or our service
    #[arg(long, value_enum, env = "QUBES_LAB_FIREWALL", default_value = "rust")]
    firewall: FirewallKind,
    /// Which sys-net runs: the Linux kernel as a Qubes netvm (static address), or our
    /// service (its address by DHCP from the world's dnsmasq)
    #[arg(long, value_enum, env = "QUBES_LAB_NETVM", default_value = "rust")]
    netvm: NetvmKind,
    /// Do not check and print the connectivity matrix at the end
    #[arg(long)]
    no_matrix: bool,
    /// When something fails, keep what was built (default: remove it)
    #[arg(long)]
    keep_on_error: bool,
    /// Our service's connection table size (its `conntrack_max`; default: from memory, as
    /// Linux). The Linux firewall keeps the kernel's nf_conntrack_max
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    conntrack_max: Option<u32>,
    /// Leave out sys-whonix, the qubes behind it (anon-whonix) and the private Tor network:
    /// `up` is then done in seconds instead of the minute or two Tor's first consensus and
    /// bootstrap take
    #[arg(long)]
    no_whonix: bool,
    /// Run this qube's service as its bootable image under QEMU instead of as a process
    /// (qube-image; software emulation, so its boot takes seconds): sys-firewall (with
    /// --firewall rust) or sys-net (with --netvm rust)
    #[arg(long, value_name = "QUBE", env = "QUBES_LAB_VM")]
    vm: Option<String>,
}

#[derive(Debug, Args)]
struct ExecArgs {
    #[command(flatten)]
    name: NameArg,
    /// The qube (or `world`)
    qube: String,
    /// The command, after `--`
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<String>,
}

#[derive(Debug, Args)]
struct QubeArgs {
    #[command(flatten)]
    name: NameArg,
    /// The qube (one that provides no network: work, personal, untrusted, vault)
    qube: String,
}

const STOP_HELP: &str = "\
As qvm-shutdown: the qube's processes are stopped; its backend vif vifD.0 disappears from its
netvm's namespace (the veth pair is deleted, so the qube keeps only lo); a Linux netvm runs
vif-route-qubes offline (conntrack purge, anti-spoofing set elements), our service lets go
of the vif; the vif leaves the netvm's vif list. Like dom0, the lab leaves the netvm's
QubesDB tree as it is (/connected-ips lists every client, running or not; the
/qubes-firewall/<ip> entries stay). The namespace stays: `start` brings the qube back.
Netvms cannot be stopped.";

const START_HELP: &str = "\
As qvm-start: the qube gets the next domid (Qubes' Xen never reuses one), so a new backend
vif vif<domid>.0, with the same address and MAC as before. Before the vif appears, the netvm's
tree is written as dom0's domain-pre-spawn does (/connected-ips, /mapped-ip/<ip>/..., and the
qube's rules from the store, committed with the empty write of /qubes-firewall/<ip>); then the
vif is created and brought online (vif-route-qubes online in a Linux netvm; our service
attaches it, and the command waits until its status lists the new vif), and the qube's eth0 is
configured (setup-ip). Rules changed with `firewall` while the qube was halted apply now.";

#[derive(Debug, Args)]
struct FirewallArgs {
    #[command(flatten)]
    name: NameArg,
    /// The qube whose rules to show or change
    qube: String,
    /// qvm-firewall's arguments after VMNAME: list, add [--before N] RULE..., del ..., reset
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    args: Vec<String>,
}

const MTU_HELP: &str = "\
Sets the MTU of the link between QUBE and its netvm on both ends, as `ip link set mtu` would
on a real vif: the qube's eth0 and its backend vifD.0 in the netvm (for sys-firewall: its eth0
and vif2.0 in sys-net). The link then carries at most MTU bytes per IP packet in both
directions. A Linux netvm follows at once (the kernel uses the link MTU); our service follows
the netlink change without losing flows. A qube restarted with `start` gets a new vif at the
default 1500, as a new Xen vif does. MTU is 68 (the IPv4 minimum) to 65535.";

#[derive(Debug, Args)]
struct MtuArgs {
    #[command(flatten)]
    name: NameArg,
    /// The qube whose link to its netvm changes (sys-firewall, work, personal, ...)
    qube: String,
    /// The new MTU (68-65535)
    #[arg(value_parser = clap::value_parser!(u16).range(68..))]
    mtu: u16,
}

#[derive(Debug, Args)]
struct QubesdbWriteArgs {
    #[command(flatten)]
    name: NameArg,
    /// The client qube whose netvm's tree to edit
    qube: String,
    /// The key: absolute (`/connected-ips`) or relative to `/qubes-firewall/<ip>/` (`0000`)
    key: String,
    /// The value (omit with --delete)
    value: Option<String>,
    /// Remove the key instead
    #[arg(long, conflicts_with = "value")]
    delete: bool,
}

#[derive(Debug, Args)]
struct ServeHttpArgs {
    /// Addresses to answer plain HTTP on
    #[arg(value_name = "ADDR:PORT")]
    http: Vec<SocketAddr>,
    /// Addresses to echo TCP on (connections stay open)
    #[arg(long, value_name = "ADDR:PORT")]
    echo: Vec<SocketAddr>,
    /// Created once every address is bound
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum ProbeCommand {
    /// TCP connect (and with --http, GET /)
    Tcp {
        dst: SocketAddrV4,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        #[arg(long)]
        http: bool,
    },
    /// One DNS query over UDP (type A unless --qtype)
    Dns {
        name: String,
        #[arg(long, default_value = "10.139.1.1")]
        server: Ipv4Addr,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// The query type: A, AAAA, MX, PTR, TXT, or a number
        #[arg(long, default_value = "A", value_parser = dns::parse_qtype)]
        qtype: u16,
    },
    /// UDP datagrams with a forged source address, through a raw socket
    Spoof {
        #[arg(long)]
        src: Ipv4Addr,
        #[arg(long)]
        dst: SocketAddrV4,
        #[arg(long, default_value = "spoofed")]
        payload: String,
        #[arg(long, default_value_t = 3)]
        count: u32,
    },
    /// Print the UDP datagrams arriving on ADDR:PORT for a while
    UdpListen {
        addr: SocketAddrV4,
        #[arg(long, default_value_t = 3000)]
        duration_ms: u64,
    },
    /// TCP SYNs from new source ports at a steady rate, through a raw socket (a SYN flood)
    SynFlood {
        dst: SocketAddrV4,
        /// SYNs per second
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        rate: u32,
        #[arg(long, default_value_t = 3000)]
        duration_ms: u64,
    },
    /// COUNT UDP datagrams to a destination the qube's rules refuse, as fast as they go; then
    /// counts the ICMP errors that come back about them within WAIT_MS (a router limits them)
    RefusedBurst {
        dst: SocketAddrV4,
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        count: u32,
        #[arg(long, default_value_t = 1000)]
        wait_ms: u64,
    },
    /// A TCP connection that stays open: each stdin line is sent and its echo awaited
    Echo {
        dst: SocketAddrV4,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Bring a lab up (removing a stale one of the same name first) and print its connectivity
    Up(UpArgs),
    /// Remove a lab: processes, namespaces, /etc/netns entries, state (idempotent)
    Down(NameArg),
    /// Show a lab's qubes, namespaces, addresses, processes and the service's status
    Status(NameArg),
    /// Run a command inside a qube's namespace (or the world's), exit status passed through
    Exec(ExecArgs),
    /// qvm-firewall on the lab's rule store; changes are pushed to the running sys-firewall
    Firewall(FirewallArgs),
    /// Check and print the connectivity matrix of a running lab
    Matrix(NameArg),
    /// Restart the sys-firewall (the service, or the Linux qubes-firewall agent)
    RestartFirewall(NameArg),
    /// Restart the sys-whonix service and wait until its Tor client is ready
    RestartWhonix(NameArg),
    /// Halt a qube as qvm-shutdown does: its vif disappears from its netvm
    #[command(after_long_help = STOP_HELP)]
    Stop(QubeArgs),
    /// Start a halted qube as qvm-start does: the next domid, a new vifN.0, same IP, MAC, rules
    #[command(after_long_help = START_HELP)]
    Start(QubeArgs),
    /// Set the MTU of a qube's link to its netvm, on both ends of the veth pair
    #[command(after_long_help = MTU_HELP)]
    Mtu(MtuArgs),
    /// Write a raw key into a client's netvm's QubesDB tree (tests)
    #[command(hide = true)]
    QubesdbWrite(QubesdbWriteArgs),
    /// The world's web server
    #[command(hide = true)]
    ServeHttp(ServeHttpArgs),
    /// Network probes, run inside a namespace
    #[command(hide = true, subcommand)]
    Probe(ProbeCommand),
    /// Write /proc/sys/PATH=VALUE (inside a namespace)
    #[command(hide = true)]
    Sysctl { settings: Vec<String> },
    /// Between a service VM's lab port and its control socket and configuration file
    #[command(hide = true)]
    VmRelay {
        #[arg(long)]
        port: PathBuf,
        #[arg(long)]
        control: PathBuf,
        #[arg(long)]
        config: PathBuf,
    },
}

fn code(n: i32) -> ExitCode {
    ExitCode::from(u8::try_from(n.clamp(0, 255)).unwrap_or(1))
}

fn run(cli: Cli) -> cmd::Result<ExitCode> {
    let ms = Duration::from_millis;
    match cli.command {
        Command::Up(a) => {
            lab::up(&lab::UpOptions {
                name: a.name.name,
                topology: a.topology,
                firewall: a.firewall,
                netvm: a.netvm,
                matrix: !a.no_matrix,
                keep_on_error: a.keep_on_error,
                conntrack_max: a.conntrack_max.map(|n| n as usize),
                no_whonix: a.no_whonix,
                vm: a.vm,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Down(a) => lab::down(&a.name, true).map(|_| ExitCode::SUCCESS),
        Command::Status(a) => lab::status(&a.name).map(|_| ExitCode::SUCCESS),
        Command::Exec(a) => lab::exec(&a.name.name, &a.qube, &a.cmd).map(code),
        Command::Firewall(a) => lab::firewall(&a.name.name, &a.qube, &a.args).map(code),
        Command::Matrix(a) => lab::matrix(&a.name).map(|_| ExitCode::SUCCESS),
        Command::RestartFirewall(a) => lab::restart_firewall(&a.name).map(|_| ExitCode::SUCCESS),
        Command::RestartWhonix(a) => lab::restart_whonix(&a.name).map(|_| ExitCode::SUCCESS),
        Command::Mtu(a) => lab::set_mtu(&a.name.name, &a.qube, a.mtu).map(|_| ExitCode::SUCCESS),
        Command::Stop(a) => lifecycle::stop(&a.name.name, &a.qube).map(|_| ExitCode::SUCCESS),
        Command::Start(a) => lifecycle::start(&a.name.name, &a.qube).map(|_| ExitCode::SUCCESS),
        Command::QubesdbWrite(a) => {
            let value =
                if a.delete {
                    None
                } else {
                    Some(a.value.ok_or_else(|| {
                        cmd::Error("qubesdb-write: a VALUE, or --delete".to_string())
                    })?)
                };
            lab::qubesdb_write(&a.name.name, &a.qube, &a.key, value.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::ServeHttp(a) => {
            server::serve(&a.http, &a.echo, a.ready_file.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Probe(p) => {
            let ok = match p {
                ProbeCommand::Tcp {
                    dst,
                    timeout_ms,
                    http,
                } => {
                    let o = probe::tcp(dst, ms(timeout_ms), http);
                    println!("{}", o.line());
                    o.ok()
                }
                ProbeCommand::Dns {
                    name,
                    server,
                    timeout_ms,
                    qtype,
                } => {
                    let o = probe::dns(&name, server, qtype, ms(timeout_ms));
                    println!("{}", o.line());
                    o.ok()
                }
                ProbeCommand::Spoof {
                    src,
                    dst,
                    payload,
                    count,
                } => {
                    probe::spoof(src, dst, &payload, count)?;
                    true
                }
                ProbeCommand::UdpListen { addr, duration_ms } => {
                    probe::udp_listen(addr, ms(duration_ms))?;
                    true
                }
                ProbeCommand::SynFlood {
                    dst,
                    rate,
                    duration_ms,
                } => {
                    probe::syn_flood(dst, rate, ms(duration_ms))?;
                    true
                }
                ProbeCommand::RefusedBurst {
                    dst,
                    count,
                    wait_ms,
                } => {
                    probe::refused_burst(dst, count, ms(wait_ms))?;
                    true
                }
                ProbeCommand::Echo { dst, timeout_ms } => probe::echo(dst, ms(timeout_ms))?,
            };
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::VmRelay {
            port,
            control,
            config,
        } => vm::relay(&port, &control, &config).map(|_| ExitCode::SUCCESS),
        Command::Sysctl { settings } => {
            netvm::write_sysctls(&settings)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("qubes-lab: error: {e}");
            ExitCode::from(1)
        }
    }
}
