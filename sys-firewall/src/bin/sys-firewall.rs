//! The sys-firewall command: thin shells around the engine.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use qubes_router::cli::XenAccess;
use sys_firewall::replay;
use sys_firewall::service::Role;

#[derive(Debug, Parser)]
#[command(
    name = "sys-firewall",
    version,
    about = "The sys-firewall service qube: a router/firewall for Qubes client qubes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the firewall on real interfaces (the service qube's main job).
    Run(RunArgs),
    /// Print the running service's state: clients, rules, flows, counters.
    Status(ControlArgs),
    /// Make the running service re-read its configuration (as SIGHUP does).
    Reload(ControlArgs),
    /// Replay a pcapng capture through the engine and write what it sends.
    Replay(ReplayArgs),
}

/// Where the control socket is unless told otherwise.
const DEFAULT_CONTROL: &str = "/run/sys-firewall.sock";

const RUN_HELP: &str = "\
The service attaches to the uplink and to every client vif named in its configuration with
AF_PACKET sockets (in Qubes the kernel's netback creates vifN.M; anywhere else they can be veth
ends), and forwards between them in userspace. It keeps the kernel out of the way on those
interfaces (no forwarding, no ARP answers, no IPv6), so give them no IP addresses: the service
answers ARP for its own address itself. Vifs that appear or disappear later are noticed
(netlink link events), and so are MTU changes: each link's MTU is the device's, read at attach
and followed without losing flows, lowered by a configured `mtu` (YAML `uplink.mtu` and a
vif's `mtu`; /qubes-uplink-mtu and /qubes-vif/<name>/mtu in QubesDB), 1500 at most when none
is configured. Needs root (CAP_NET_RAW and CAP_NET_ADMIN).

Configuration, one of:
  --config FILE     the YAML format of `sys-firewall replay --help` (uplink, qubesdb, vifs,
                    dns answers), re-read whenever the file changes;
  --qubesdb SOCKET  a QubesDB daemon: the same keys, rules applied on Qubes' commit signal
                    (the empty write of /qubes-firewall/<ip>), /qubes-firewall-handled/<ip>
                    bumped after; the vif list under /qubes-vif/<name>/{ip,mac,ip6,mtu}.
  --qubesdb-vchan [xen|emul:...]
                    dom0's QubesDB over vchan (port 111), as in a qube booted from the
                    image: no qubesdb-daemon needed; the service serves dom0's tree on
                    --qubesdb's socket (default /var/run/qubes/qubesdb.sock) and reads it
                    there. Starts once dom0's whole tree has arrived (30 s at most).

Signals: SIGHUP re-reads the configuration; SIGTERM or SIGINT stops the service, after which
the clients have no forwarding at all (fail closed).

With --vifs xen (and --qubesdb-vchan) the service is the Xen back end of its client vifs and
the front end of its uplink, with no kernel network driver: each client vif the toolstack adds
under backend/vif/<domid>/<devid> in XenStore is served as a netback (the xenbus handshake,
rx-copy, scatter-gather, GSO and checksum offload; one queue), the uplink is the netfront of
device/vif/0. A frontend that breaks the ring protocol is disconnected with the reason in the
log, in `status` and in its device's `error` key; it may connect again. `status` shows each
device's state and counters. Logs go to stderr (RUST_LOG=debug for
more); dropped frames are logged at most once per second per interface.";

#[derive(Debug, Args)]
#[command(after_long_help = RUN_HELP)]
struct RunArgs {
    /// YAML configuration file (re-read on change)
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = ["qubesdb", "qubesdb_vchan"],
        required_unless_present_any = ["qubesdb", "qubesdb_vchan"]
    )]
    config: Option<PathBuf>,
    /// QubesDB daemon socket (default /var/run/qubes/qubesdb.sock)
    #[arg(long, value_name = "SOCKET", num_args = 0..=1, default_missing_value = "/var/run/qubes/qubesdb.sock")]
    qubesdb: Option<PathBuf>,
    /// dom0's QubesDB over vchan, with no qubesdb-daemon in the qube: `xen` (the default, the
    /// Linux Xen devices) or `emul:HYPERVISOR:XENSTORE:DOMID` (the repository's emulation).
    /// The service serves it on --qubesdb's socket (default /var/run/qubes/qubesdb.sock)
    #[arg(long, value_name = "ACCESS", num_args = 0..=1, default_missing_value = "xen")]
    qubesdb_vchan: Option<XenAccess>,
    /// Uplink interface name when the configuration comes from QubesDB
    #[arg(long, default_value = "eth0")]
    uplink: String,
    /// How the vifs are reached: `kernel` interfaces over AF_PACKET, or `xen` rings served
    /// by the service itself (needs --qubesdb-vchan, whose Xen access it uses)
    #[arg(
        long,
        value_enum,
        default_value = "kernel",
        requires_if("xen", "qubesdb_vchan")
    )]
    vifs: VifsKind,
    /// Control socket for `status` and `reload`
    #[arg(long, value_name = "SOCKET", default_value = DEFAULT_CONTROL)]
    control: PathBuf,
}

/// `--vifs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum VifsKind {
    Kernel,
    Xen,
}

#[derive(Debug, Args)]
struct ControlArgs {
    /// The running service's control socket
    #[arg(long, value_name = "SOCKET", default_value = DEFAULT_CONTROL)]
    control: PathBuf,
}

const REPLAY_HELP: &str = "\
Each input packet arrived on the interface its pcapng interface is named after (the if_name
option): the uplink (eth0) or a client vif (vif3.0, ...). Every frame the engine emits is
written on the interface it leaves by, stamped with the time of the input packet that caused
it. The output has one interface per engine interface, uplink first, nanosecond timestamps.
Without --seed the configuration's seed, else a fixed default, seeds the NAT port choice, so
a replay is byte-for-byte repeatable.

The configuration (YAML; only qubesdb is required, unknown fields are errors):

  uplink: {name: eth0, mtu: 1500}
  qubesdb:                          # the firewall qube's QubesDB keys
    /qubes-ip: 10.137.0.6
    /qubes-gateway: 10.137.0.5
    /qubes-netvm-primary-dns: 10.139.1.1
    /qubes-firewall/10.137.0.10: \"\"
    /qubes-firewall/10.137.0.10/policy: drop
    /qubes-firewall/10.137.0.10/0000: action=accept
  vifs:                             # client vifs: name, address(es), MAC
    - {name: vif3.0, ip: 10.137.0.10, ip6: fd09:24ef:4179::a89:a, mac: 00:16:3e:5e:6c:0a}
  dns:                              # answers to dsthost lookups; other names fail
    web.example: {addrs: [198.18.0.10], ttl: 300}
  conntrack_max: 65536              # optional; default from memory, as Linux
  seed: 1                           # optional
  steps:                            # optional changes before input packet N (0-based)
    - {at_packet: 3, qubesdb: {/qubes-firewall/10.137.0.10/0000: action=drop}}
    - {at_packet: 5, tick_ns: 1704067230000000000}   # run timers at this time
    - {at_packet: 7, link_mtu: {eth0: 1400}}         # a device's MTU changes (netlink)

Set a key to null in a step to remove it. A link's MTU is the smaller of its configured mtu
and its link_mtu; a link_mtu step keeps flows. See tests/pcap/README.md for more.";

#[derive(Debug, Args)]
#[command(after_long_help = REPLAY_HELP)]
struct ReplayArgs {
    /// The configuration: QubesDB keys, client vifs, DNS answers (YAML)
    #[arg(long, value_name = "CONFIG.yaml")]
    config: PathBuf,
    /// The input capture (pcapng, interfaces named eth0, vif3.0, ...)
    #[arg(long = "in", value_name = "IN.pcapng")]
    input: PathBuf,
    /// Where to write the output capture (pcapng)
    #[arg(long = "out", value_name = "OUT.pcapng")]
    output: PathBuf,
    /// Seed for the NAT port choice (default: the configuration's, else a fixed one)
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
}

fn main() -> ExitCode {
    // Booted as an image's /init: PID 1's duties, then the service, then power off.
    qubes_service_runtime::pid1::run_if_init("sys-firewall", |boot| {
        run_service(RunArgs {
            config: boot.file(),
            qubesdb: None,
            qubesdb_vchan: boot.qubesdb_vchan(),
            uplink: "eth0".into(),
            vifs: if boot.xen_vifs() {
                VifsKind::Xen
            } else {
                VifsKind::Kernel
            },
            control: DEFAULT_CONTROL.into(),
        })
    });
    match Cli::parse().command {
        Command::Run(args) => run_service(args),
        Command::Status(args) => control(&args, "status"),
        Command::Reload(args) => control(&args, "reload"),
        Command::Replay(args) => run_replay(&args),
    }
}

fn run_service(args: RunArgs) -> ExitCode {
    let vifs = match (args.vifs, &args.qubesdb_vchan) {
        (VifsKind::Kernel, _) => qubes_router::cli::Vifs::Kernel,
        (VifsKind::Xen, Some(access)) => qubes_router::cli::Vifs::Xen(access.clone()),
        (VifsKind::Xen, None) => {
            eprintln!(
                "sys-firewall run: --vifs xen needs --qubesdb-vchan [ACCESS]: the client vifs \
                 are learnt from XenStore, over the same Xen access"
            );
            return ExitCode::from(2);
        }
    };
    qubes_router::cli::run(
        Role::Firewall,
        args.config,
        qubes_router::cli::QubesDbAt::from_args(args.qubesdb, args.qubesdb_vchan),
        args.uplink,
        args.control,
        vifs,
    )
}

fn control(args: &ControlArgs, command: &str) -> ExitCode {
    qubes_router::cli::control(Role::Firewall, &args.control, command)
}

fn run_replay(args: &ReplayArgs) -> ExitCode {
    match replay::replay_files(&args.config, &args.input, &args.output, args.seed) {
        Ok(out) => {
            eprintln!(
                "sys-firewall replay: {} packets in, {} frames out to {}",
                out.packets,
                out.frames.len(),
                args.output.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sys-firewall replay: {e}");
            ExitCode::FAILURE
        }
    }
}
