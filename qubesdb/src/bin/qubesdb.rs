//! `qubesdb`: read, write, remove, list and watch QubesDB entries from the command line, like
//! upstream's `qubesdb-read`, `qubesdb-write`, `qubesdb-rm`, `qubesdb-multiread`,
//! `qubesdb-list` and `qubesdb-watch` (one `qubesdb-cmd` binary upstream).

use std::ffi::OsString;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use qubesdb::{Client, ClientError, DEFAULT_SOCKET};

/// Read, write, remove, list and watch QubesDB entries (the key/value store dom0 fills for
/// every qube), through the daemon's local socket.
#[derive(Parser, Debug)]
#[command(name = "qubesdb", version, after_help = AFTER_HELP)]
struct Cli {
    /// The daemon's socket.
    #[arg(long, short = 's', value_name = "PATH", default_value = DEFAULT_SOCKET, global = true)]
    socket: PathBuf,
    /// Do not print error messages (the exit status still tells).
    #[arg(long, short = 'q', global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Cmd,
}

const AFTER_HELP: &str = "\
Paths are at most 63 characters of a-z A-Z 0-9 - _ / . : @ and start with '/'. A path
ending in '/' names a subtree (rm, watch). Values are at most 3072 bytes and cannot contain
a NUL byte.

Values are printed as upstream qubesdb-read prints them: bytes outside 0x20-0x7f as \\xNN,
unless --raw is given.

Exit status: 0 when everything succeeded, 1 when anything failed (a missing entry included),
2 for a usage error.

Examples:
  qubesdb read /qubes-ip /qubes-gateway
  qubesdb write /qubes-firewall/10.137.0.10/policy drop /qubes-firewall/10.137.0.10 ''
  qubesdb multiread /qubes-firewall/10.137.0.10/
      policy = drop
      0000 = action=accept
  qubesdb watch -n -1 /qubes-firewall/        # print every modified path, forever
  qubesdb --socket /tmp/lab/qubesdb.sock list /";

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print the value of each PATH, one per line.
    Read {
        /// Print `PATH = VALUE`.
        #[arg(long, short = 'f')]
        full_path: bool,
        /// Print values as they are, unescaped.
        #[arg(long, short = 'r')]
        raw: bool,
        /// Wait until each PATH exists (an empty value counts).
        #[arg(long, short = 'w')]
        wait: bool,
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<String>,
    },
    /// Set each PATH to its VALUE (give pairs: PATH VALUE [PATH VALUE ...]).
    Write {
        #[arg(required = true, value_name = "PATH VALUE")]
        pairs: Vec<OsString>,
    },
    /// Remove each PATH, or every entry under it if it ends with '/'. Removing nothing is a
    /// failure.
    Rm {
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<String>,
    },
    /// Print `PATH = VALUE` for every entry whose path starts with PREFIX (a string prefix:
    /// `/a` also matches `/ab`). PREFIX is stripped from the printed paths unless --full-path.
    Multiread {
        /// Print full paths.
        #[arg(long, short = 'f')]
        full_path: bool,
        /// Print values as they are, unescaped.
        #[arg(long, short = 'r')]
        raw: bool,
        #[arg(required = true, value_name = "PREFIX")]
        prefixes: Vec<String>,
    },
    /// Print the paths starting with PREFIX (stripped unless --full-path), one per line.
    List {
        /// Print full paths.
        #[arg(long, short = 'f')]
        full_path: bool,
        #[arg(value_name = "PREFIX")]
        prefix: String,
    },
    /// Watch each PATH (a key, or a subtree if it ends with '/'; it need not exist) and print
    /// the path of each modification, one per line.
    Watch {
        /// Exit after N events; a negative N never exits, 0 exits once the watches are set.
        #[arg(
            short = 'n',
            long = "count",
            value_name = "N",
            default_value_t = 1,
            allow_negative_numbers = true
        )]
        count: i64,
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<String>,
    },
}

/// Upstream's escaping: bytes 0x20..=0x7f as is, others as `\xNN`.
fn escape(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    for &b in value {
        if (0x20..0x80).contains(&b) {
            out.push(b);
        } else {
            out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
        }
    }
    out
}

struct Out {
    stdout: io::Stdout,
    quiet: bool,
    failed: bool,
}

impl Out {
    fn line(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        let mut lock = self.stdout.lock();
        for p in parts {
            lock.write_all(p)?;
        }
        lock.write_all(b"\n")?;
        lock.flush()
    }

    fn fail(&mut self, msg: impl std::fmt::Display) {
        self.failed = true;
        if !self.quiet {
            eprintln!("qubesdb: {msg}");
        }
    }
}

fn value_bytes(value: &[u8], raw: bool) -> Vec<u8> {
    if raw {
        value.to_vec()
    } else {
        escape(value)
    }
}

fn strip<'a>(path: &'a str, prefix: &str, full_path: bool) -> &'a str {
    if full_path {
        path
    } else {
        path.strip_prefix(prefix).unwrap_or(path)
    }
}

/// Why a command stopped early.
enum Stop {
    /// The error was printed already.
    Reported,
    /// Stdout is gone (e.g. `| head -1`): stop quietly.
    StdoutClosed,
    Failed(String),
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Stop {
        if e.kind() == io::ErrorKind::BrokenPipe {
            Stop::StdoutClosed
        } else {
            Stop::Failed(format!("cannot write to stdout: {e}"))
        }
    }
}

impl From<ClientError> for Stop {
    fn from(e: ClientError) -> Stop {
        Stop::Failed(e.to_string())
    }
}

/// Prints a per-path error; stops the command when the connection cannot be used any more.
fn report(out: &mut Out, e: ClientError) -> Result<(), Stop> {
    out.fail(&e);
    match e {
        ClientError::Invalid { .. } | ClientError::Refused { .. } => Ok(()),
        _ => Err(Stop::Reported),
    }
}

/// Runs the command; per-path failures are recorded in `out`.
fn run(cmd: Cmd, client: &mut Client, out: &mut Out) -> Result<(), Stop> {
    match cmd {
        Cmd::Read {
            full_path,
            raw,
            wait,
            paths,
        } => {
            for path in paths {
                let value = if wait {
                    wait_for(client, &path)
                } else {
                    client.read(&path)
                };
                let value = match value {
                    Ok(v) => v,
                    Err(e) => {
                        report(out, e)?;
                        continue;
                    }
                };
                match value {
                    Some(v) if full_path => {
                        out.line(&[path.as_bytes(), b" = ", &value_bytes(&v, raw)])?
                    }
                    Some(v) => out.line(&[&value_bytes(&v, raw)])?,
                    None => out.fail(format_args!("read {path}: no such entry")),
                }
            }
        }
        Cmd::Write { pairs } => {
            if pairs.len() % 2 != 0 {
                out.fail(format_args!(
                    "write takes PATH VALUE pairs; got {} arguments (the last PATH has no VALUE)",
                    pairs.len()
                ));
                return Ok(());
            }
            for pair in pairs.chunks(2) {
                let Some(path) = pair[0].to_str() else {
                    out.fail(format_args!(
                        "write {}: path is not ASCII",
                        pair[0].to_string_lossy()
                    ));
                    continue;
                };
                if let Err(e) = client.write(path, pair[1].as_bytes()) {
                    report(out, e)?;
                }
            }
        }
        Cmd::Rm { paths } => {
            for path in paths {
                match client.rm(&path) {
                    Ok(true) => {}
                    Ok(false) => out.fail(format_args!("rm {path}: no such entry")),
                    Err(e) => report(out, e)?,
                }
            }
        }
        Cmd::Multiread {
            full_path,
            raw,
            prefixes,
        } => {
            for prefix in prefixes {
                match client.multiread(&prefix) {
                    Ok(entries) => {
                        for (path, value) in entries {
                            let shown = strip(&path, &prefix, full_path);
                            out.line(&[shown.as_bytes(), b" = ", &value_bytes(&value, raw)])?;
                        }
                    }
                    Err(e) => report(out, e)?,
                }
            }
        }
        Cmd::List { full_path, prefix } => match client.list(&prefix) {
            Ok(paths) => {
                for path in paths {
                    out.line(&[strip(&path, &prefix, full_path).as_bytes()])?;
                }
            }
            Err(e) => report(out, e)?,
        },
        Cmd::Watch { count, paths } => {
            for path in &paths {
                if let Err(e) = client.watch(path) {
                    out.fail(&e);
                    return Err(Stop::Reported);
                }
            }
            let mut left = count;
            while left != 0 {
                match client.read_watch(None)? {
                    Some(path) => out.line(&[path.as_bytes()])?,
                    None => continue,
                }
                if left > 0 {
                    left -= 1;
                }
            }
        }
    }
    Ok(())
}

/// Reads `path`, waiting for it to appear.
fn wait_for(client: &mut Client, path: &str) -> Result<Option<Vec<u8>>, ClientError> {
    client.watch(path)?;
    loop {
        if let Some(v) = client.read(path)? {
            client.unwatch(path)?;
            return Ok(Some(v));
        }
        client.read_watch(None)?;
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut out = Out {
        stdout: io::stdout(),
        quiet: cli.quiet,
        failed: false,
    };
    let mut client = match Client::connect(&cli.socket) {
        Ok(c) => c,
        Err(e) => {
            out.fail(e);
            return ExitCode::from(1);
        }
    };
    match run(cli.command, &mut client, &mut out) {
        Ok(()) => {}
        Err(Stop::Reported | Stop::StdoutClosed) => return ExitCode::from(1),
        Err(Stop::Failed(msg)) => {
            out.fail(msg);
            return ExitCode::from(1);
        }
    }
    if out.failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
