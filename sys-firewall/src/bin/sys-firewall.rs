//! The sys-firewall command: thin shells around the engine.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use sys_firewall::replay;

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
    /// Replay a pcapng capture through the engine and write what it sends.
    Replay(ReplayArgs),
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
  conntrack_max: 65536              # optional
  seed: 1                           # optional
  steps:                            # optional changes before input packet N (0-based)
    - {at_packet: 3, qubesdb: {/qubes-firewall/10.137.0.10/0000: action=drop}}
    - {at_packet: 5, tick_ns: 1704067230000000000}   # run timers at this time

Set a key to null in a step to remove it. See tests/pcap/README.md for more.";

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
    match Cli::parse().command {
        Command::Replay(args) => run_replay(&args),
    }
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
