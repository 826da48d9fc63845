//! What the router binaries' `run`, `status` and `reload` share: logging set up on stderr,
//! the configuration source chosen from the options, the service run, and its errors turned
//! into exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::service::{self, Role, RunOptions, Source};

/// `run`: logs on stderr (`RUST_LOG`, default info), the service until it is stopped. Exactly
/// one of `config` (a YAML file) and `qubesdb` (a daemon's socket, with the uplink named) is
/// given; clap makes sure of it, and a caller that does not gets exit code 2.
pub fn run(
    role: Role,
    config: Option<PathBuf>,
    qubesdb: Option<PathBuf>,
    uplink: String,
    control: PathBuf,
) -> ExitCode {
    init_logging();
    serve(role, config, qubesdb, uplink, control, None)
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
    qubesdb: Option<PathBuf>,
    uplink: String,
    control: PathBuf,
    terminator: Option<Box<dyn service::Terminator>>,
) -> ExitCode {
    let name = role.name();
    let source = match (config, qubesdb) {
        (Some(c), _) => Source::Yaml(c),
        (None, Some(socket)) => Source::QubesDb { socket, uplink },
        (None, None) => {
            eprintln!("{name} run: give --config FILE or --qubesdb [SOCKET]");
            return ExitCode::from(2);
        }
    };
    match service::run_with(
        RunOptions {
            source,
            control,
            role,
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
