//! The sys-net command: the router service loop (crate `qubes-router`) in its netvm role.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use qubes_router::cli::XenAccess;
use qubes_router::service::Role;

#[derive(Debug, Parser)]
#[command(
    name = "sys-net",
    version,
    about = "The sys-net service qube: the netvm at the end of the Qubes default chain"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the netvm on real interfaces (the service qube's main job).
    Run(RunArgs),
    /// Print the running service's state: addressing and DHCP lease (T1, T2, expiry), DNS redirection, clients, counters.
    Status(ControlArgs),
    /// Make the running service re-read its configuration (as SIGHUP does).
    Reload(ControlArgs),
}

/// Where the control socket is unless told otherwise.
const DEFAULT_CONTROL: &str = "/run/sys-net.sock";

const RUN_HELP: &str = "\
sys-net owns the uplink (a kernel netdev named by the configuration: a NIC, or any Ethernet
device) and serves the qubes attached to it (sys-firewall, and any qube whose netvm it is) on
their vifs, as a Qubes sys-net does, with the kernel out of the way: the kernel keeps no
address on the uplink or the vifs and forwards nothing; the uplink's address, ARP, NAT and the
downstream firewall live in this process. Needs root (CAP_NET_RAW and CAP_NET_ADMIN).

The uplink's address:
  static            the configuration's uplink section names it:
                      uplink: {name: eth0, address: 198.18.0.100, router: 198.18.0.1,
                               dns: [198.18.0.53, 198.18.0.54]}
  DHCP              without one, by DHCPv4 on the uplink (RFC 2131): discover, offer, request,
                    ack; renewal at T1 (unicast to the server), rebinding at T2, a new
                    discover after a NAK or at expiry, INIT-REBOOT with the address it had
                    when the carrier comes back, and a release when the service stops. No host
                    name is sent unless the configuration gives one (uplink.dhcp_hostname). The router and DNS servers come from the lease; a new lease
                    keeps every flow when the address stays, and moves NAT when it changes.
                    With QubesDB, /qubes-netvm-external-ip holds the leased address (empty
                    without one), as Qubes' NetworkManager dispatcher writes it.
  until a lease     nothing leaves: clients get ICMP net unreachable at once.

The clients' gateway is /qubes-netvm-gateway (dom0 writes it for a qube that provides network).
DNS to the virtual resolvers (/qubes-netvm-primary-dns, -secondary-dns; default 10.139.1.1 and
10.139.1.2) is redirected to the upstream servers, paired as the Qubes agent pairs them (one
upstream serves both); with none, queries are refused at once with ICMP port unreachable.
Everything from the clients leaves masqueraded to the uplink address; nothing from the uplink
gets in unless it belongs to a tracked flow. Each client's Qubes firewall rules
(/qubes-firewall/<ip>/...) apply as in sys-firewall.

Configuration, one of:
  --config FILE     YAML (as `sys-firewall replay --help` describes, with the uplink section
                    above), re-read whenever the file changes;
  --qubesdb SOCKET  a QubesDB daemon, with the uplink named by --uplink.
  --qubesdb-vchan [xen|emul:...]
                    dom0's QubesDB over vchan (port 111), as in a qube booted from the
                    image: no qubesdb-daemon needed; the service serves dom0's tree on
                    --qubesdb's socket (default /var/run/qubes/qubesdb.sock) and reads it
                    there. Starts once dom0's whole tree has arrived (30 s at most).

Signals: SIGHUP re-reads the configuration; SIGTERM or SIGINT stops the service, after which
nothing is forwarded (fail closed). Logs go to stderr (RUST_LOG=debug for more).";

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
    /// Control socket for `status` and `reload`
    #[arg(long, value_name = "SOCKET", default_value = DEFAULT_CONTROL)]
    control: PathBuf,
}

#[derive(Debug, Args)]
struct ControlArgs {
    /// The running service's control socket
    #[arg(long, value_name = "SOCKET", default_value = DEFAULT_CONTROL)]
    control: PathBuf,
}

fn main() -> ExitCode {
    // Booted as an image's /init: PID 1's duties, then the service, then power off.
    qubes_service_runtime::pid1::run_if_init("sys-net", |boot| {
        run_service(RunArgs {
            config: boot.file(),
            qubesdb: None,
            qubesdb_vchan: boot.qubesdb_vchan(),
            uplink: "eth0".into(),
            control: DEFAULT_CONTROL.into(),
        })
    });
    match Cli::parse().command {
        Command::Run(args) => run_service(args),
        Command::Status(args) => control(&args, "status"),
        Command::Reload(args) => control(&args, "reload"),
    }
}

fn run_service(args: RunArgs) -> ExitCode {
    qubes_router::cli::run(
        Role::Net,
        args.config,
        qubes_router::cli::QubesDbAt::from_args(args.qubesdb, args.qubesdb_vchan),
        args.uplink,
        args.control,
        qubes_router::cli::Vifs::Kernel,
    )
}

fn control(args: &ControlArgs, command: &str) -> ExitCode {
    qubes_router::cli::control(Role::Net, &args.control, command)
}
