//! What the router binaries' `run`, `status` and `reload` share: logging set up on stderr,
//! the configuration source chosen from the options, the service run, and its errors turned
//! into exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

pub use crate::service::Vifs;
use crate::service::{self, Role, RunOptions, Source};
pub use vif_backend::xen::qubesdb::XenAccess;

/// Where QubesDB is, for `run` without `--config`.
#[derive(Debug, Clone)]
pub enum QubesDbAt {
    /// A running daemon's socket (a Linux qube's `qubesdb-daemon`).
    Socket(PathBuf),
    /// dom0's daemon over vchan: our own daemon is served on `socket` and kept in step.
    Vchan { access: XenAccess, socket: PathBuf },
}

impl QubesDbAt {
    /// From the binaries' `--qubesdb [SOCKET]` and `--qubesdb-vchan [ACCESS]`: with the
    /// latter, the socket (default [`qubesdb::DEFAULT_SOCKET`]) is where our daemon serves.
    pub fn from_args(socket: Option<PathBuf>, vchan: Option<XenAccess>) -> Option<QubesDbAt> {
        match (socket, vchan) {
            (s, Some(access)) => Some(QubesDbAt::Vchan {
                access,
                socket: s.unwrap_or_else(|| PathBuf::from(qubesdb::DEFAULT_SOCKET)),
            }),
            (Some(s), None) => Some(QubesDbAt::Socket(s)),
            (None, None) => None,
        }
    }
}

/// `run`: logs on stderr (`RUST_LOG`, default info), the service until it is stopped. Exactly
/// one of `config` (a YAML file) and `qubesdb` (a daemon's socket, or dom0's over vchan, with
/// the uplink named) is given; clap makes sure of it, and a caller that does not gets exit
/// code 2.
pub fn run(
    role: Role,
    config: Option<PathBuf>,
    qubesdb: Option<QubesDbAt>,
    uplink: String,
    control: PathBuf,
    vifs: Vifs,
) -> ExitCode {
    init_logging();
    serve(role, config, qubesdb, uplink, control, vifs, None)
}

/// Logs on stderr, filtered by `RUST_LOG` (default info).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// [`run`] without setting up logging, with client traffic ending in `terminator`
/// (sys-whonix).
pub fn serve(
    role: Role,
    config: Option<PathBuf>,
    qubesdb: Option<QubesDbAt>,
    uplink: String,
    control: PathBuf,
    vifs: Vifs,
    terminator: Option<Box<dyn service::Terminator>>,
) -> ExitCode {
    let name = role.name();
    let source = match (config, qubesdb) {
        (Some(c), _) => Source::Yaml(c),
        (None, Some(QubesDbAt::Socket(socket))) => Source::QubesDb { socket, uplink },
        (None, Some(QubesDbAt::Vchan { access, socket })) => Source::QubesDbVchan {
            userspace_vifs: matches!(vifs, Vifs::Xen(_)),
            access,
            socket,
            uplink,
        },
        (None, None) => {
            eprintln!("{name} run: give --config FILE, --qubesdb [SOCKET] or --qubesdb-vchan");
            return ExitCode::from(2);
        }
    };
    match service::run_with(
        RunOptions {
            source,
            control,
            role,
            vifs,
        },
        terminator,
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name} run: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `status` / `reload`: one request on the running service's control socket.
pub fn control(role: Role, socket: &std::path::Path, command: &str) -> ExitCode {
    match service::control(socket, command, role) {
        Ok(text) => {
            print!("{text}");
            if text.starts_with("error") {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("{} {command}: {e}", role.name());
            ExitCode::FAILURE
        }
    }
}
