//! The sys-whonix command: the router service loop (crate `qubes-router`) in its Tor gateway
//! role, with the gateway of this crate where forwarding would be.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use qubes_router::cli::XenAccess;
use qubes_router::service::Role;
use qubes_service_runtime::config_file::{ConfigFile, TorSection};
use sys_whonix::gateway::{Gateway, GatewayConfig, SharedTor, TorState};
use sys_whonix::tor::{Tor, TorSettings};

#[derive(Debug, Parser)]
#[command(
    name = "sys-whonix",
    version,
    about = "The sys-whonix service qube: the Tor gateway of anonymous qubes (embedded arti)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (the service qube's main job).
    Run(RunArgs),
    /// Print the running gateway's state: Tor bootstrap, clients, their streams and circuits, counters.
    Status(ControlArgs),
    /// Make the running gateway re-read its configuration (as SIGHUP does).
    Reload(ControlArgs),
    /// Give one client qube new circuits: its new streams never share a circuit with its old ones.
    NewIdentity(NewIdentityArgs),
}

const DEFAULT_CONTROL: &str = "/run/sys-whonix.sock";

const RUN_HELP: &str = "\
sys-whonix is the netvm of anonymous qubes (its netvm is sys-firewall). Every TCP connection
and DNS query of its clients goes through Tor, isolated per client qube; nothing else leaves.

  TCP               a client's connection to any public address and port is accepted by the
                    gateway itself (the kernel has no address on the vifs and forwards
                    nothing) and carried over a Tor stream; data, FIN and resets pass both
                    ways (Tor has no half-close: after the client's FIN the stream stays open
                    for the answer). Internal destinations (10/8, 127/8, 169.254/16,
                    172.16/12, 192.168/16, 100.64/10, 0/8, multicast) are reset at once, as is
                    everything before Tor is bootstrapped, and a connection Tor cannot make.
  DNS               the virtual resolvers (10.139.1.1, 10.139.1.2; UDP and TCP port 53) answer
                    A and AAAA through Tor's resolve, PTR through its reverse resolve, and
                    everything else NOTIMP, as C tor's DNSPort does.
  .onion            an A query for an onion name gets an address from 10.192.0.0/10 (Whonix's
                    VirtualAddrNetworkIPv4), one map per client qube; connecting to it
                    reaches the onion service.
  isolation         streams of different client qubes never share a circuit; with
                    tor.isolate_dest_addr / isolate_dest_port, neither do streams to different
                    destinations. `sys-whonix new-identity VIF|ADDRESS` rotates one client's.
  dropped           UDP other than DNS, ICMP, IPv6 and fragments from clients (counted in
                    `status`).

The uplink is the kernel's: its only traffic is the Tor client's own connections to relays.
The clients' gateway is /qubes-netvm-gateway; each client's Qubes firewall rules apply first.

Configuration, one of:
  --config FILE     YAML (as `sys-firewall replay --help` describes), with a `tor` section:
                      tor: {state_dir: DIR, cache_dir: DIR, isolate_dest_addr: false,
                            isolate_dest_port: false,
                            network: {authorities: [V3IDENT], fallbacks:
                              [{rsa_identity: HEX, ed_identity: B64, orport: ADDR:PORT}]}}
                    (no network: the public Tor network);
  --qubesdb SOCKET  a QubesDB daemon, with the uplink named by --uplink and the Tor client
                    by --tor-state / --tor-cache (public network).
  --qubesdb-vchan [xen|emul:...]
                    dom0's QubesDB over vchan (port 111), as in a qube booted from the
                    image: no qubesdb-daemon needed; the service serves dom0's tree on
                    --qubesdb's socket (default /var/run/qubes/qubesdb.sock) and reads it
                    there. Starts once dom0's whole tree has arrived (30 s at most).

Signals: SIGHUP re-reads the configuration; SIGTERM or SIGINT stops the gateway, after which
clients have no path anywhere (fail closed). Logs go to stderr (RUST_LOG=debug for more).";

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
    /// Tor state directory with --qubesdb
    #[arg(long, value_name = "DIR", default_value = "/var/lib/sys-whonix/state")]
    tor_state: PathBuf,
    /// Tor cache directory with --qubesdb
    #[arg(long, value_name = "DIR", default_value = "/var/cache/sys-whonix")]
    tor_cache: PathBuf,
    /// Control socket for `status`, `reload` and `new-identity`
    #[arg(long, value_name = "SOCKET", default_value = DEFAULT_CONTROL)]
    control: PathBuf,
}

#[derive(Debug, Args)]
struct ControlArgs {
    /// The running service's control socket
    #[arg(long, value_name = "SOCKET", default_value = DEFAULT_CONTROL)]
    control: PathBuf,
}

#[derive(Debug, Args)]
struct NewIdentityArgs {
    /// The client qube: its vif (vif3.0) or its address
    client: String,
    #[command(flatten)]
    control: ControlArgs,
}

fn main() -> ExitCode {
    // Booted as an image's /init: PID 1's duties, then the service, then power off.
    // Its Tor client's connections to relays use the kernel's sockets on the uplink.
    let duties = qubes_service_runtime::pid1::Duties {
        kernel_uplink: true,
    };
    qubes_service_runtime::pid1::run_if_init_with("sys-whonix", duties, |boot| {
        run_service(RunArgs {
            config: boot.file(),
            qubesdb: None,
            qubesdb_vchan: boot.qubesdb_vchan(),
            uplink: "eth0".into(),
            tor_state: "/var/lib/sys-whonix/state".into(),
            tor_cache: "/var/cache/sys-whonix".into(),
            control: DEFAULT_CONTROL.into(),
        })
    });
    match Cli::parse().command {
        Command::Run(args) => run_service(args),
        Command::Status(args) => control(&args, "status"),
        Command::Reload(args) => control(&args, "reload"),
        Command::NewIdentity(args) => {
            control(&args.control, &format!("new-identity {}", args.client))
        }
    }
}

/// Bootstraps the Tor client, again after a pause if it fails, and makes it the gateway's.
async fn bootstrap(settings: TorSettings, shared: SharedTor) {
    loop {
        let seen = shared.clone();
        let r = Tor::bootstrap(&settings, move |p| {
            tracing::info!(progress = p.as_str(), "Tor bootstrap");
            if let Ok(mut t) = seen.lock() {
                t.progress = p;
            }
        })
        .await;
        match r {
            Ok(tor) => {
                tracing::info!(
                    status = tor.status().as_str(),
                    "Tor ready: clients' connections are carried"
                );
                if let Ok(mut t) = shared.lock() {
                    t.progress = tor.status();
                    t.error = None;
                    t.tor = Some(tor);
                }
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "Tor bootstrap failed; trying again in 10 s");
                if let Ok(mut t) = shared.lock() {
                    t.error = Some(e.to_string());
                }
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        }
    }
}

fn run_service(args: RunArgs) -> ExitCode {
    qubes_router::cli::init_logging();
    let tor_section = match &args.config {
        Some(path) => match ConfigFile::load(path) {
            Ok(c) => c.tor.unwrap_or_default(),
            Err(e) => {
                eprintln!("sys-whonix run: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => TorSection {
            state_dir: args.tor_state.clone(),
            cache_dir: args.tor_cache.clone(),
            ..TorSection::default()
        },
    };
    let settings = TorSettings::from_section(&tor_section);
    if let Err(e) = settings.arti_config() {
        eprintln!("sys-whonix run: {e}");
        return ExitCode::FAILURE;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tor")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sys-whonix run: cannot start the Tor client's runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shared: SharedTor = Arc::new(Mutex::new(TorState {
        progress: "not started".into(),
        ..TorState::default()
    }));
    let gcfg = GatewayConfig {
        isolate_dest_addr: tor_section.isolate_dest_addr,
        isolate_dest_port: tor_section.isolate_dest_port,
        ..GatewayConfig::default()
    };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id());
    let gateway = match Gateway::new(gcfg, shared.clone(), rt.handle().clone(), seed) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("sys-whonix run: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.spawn(bootstrap(settings, shared));
    let code = qubes_router::cli::serve(
        Role::Whonix,
        args.config,
        qubes_router::cli::QubesDbAt::from_args(args.qubesdb, args.qubesdb_vchan),
        args.uplink,
        args.control,
        qubes_router::cli::Vifs::Kernel,
        Some(Box::new(gateway)),
    );
    // Streams die with the runtime; nothing is left that could carry a client.
    rt.shutdown_timeout(Duration::from_secs(2));
    code
}

fn control(args: &ControlArgs, command: &str) -> ExitCode {
    qubes_router::cli::control(Role::Whonix, &args.control, command)
}
