//! `qubesdb-daemon`: a QubesDB daemon on a local UNIX socket, for the lab and for tests
//! (upstream's daemon also talks to dom0 over vchan; this one serves local clients only).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use qubesdb::load::load_into;
use qubesdb::{Server, Tree, DEFAULT_SOCKET};

/// Serve a QubesDB database on a UNIX stream socket, speaking upstream's wire protocol
/// (72-byte header, then data), so upstream clients (qubesdb-read, python3-qubesdb, the
/// qubes-firewall agent) and our own `qubesdb` tool can use it.
#[derive(Parser, Debug)]
#[command(name = "qubesdb-daemon", version, after_help = AFTER_HELP)]
struct Cli {
    /// Where to listen. A stale socket file (nobody accepting) is replaced; a live one is an
    /// error.
    #[arg(long, short = 's', value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Pre-load entries from FILE: one `key value` per line (the key up to the first space,
    /// the value is the rest of the line, possibly empty); empty lines and lines starting
    /// with '#' are skipped. May be repeated; later entries win.
    #[arg(long, value_name = "FILE")]
    load: Vec<PathBuf>,
    /// Do not log refused commands and dropped clients to stderr.
    #[arg(long, short = 'q')]
    quiet: bool,
}

const AFTER_HELP: &str = "\
The daemon runs in the foreground until killed. Once the socket accepts connections it
prints `qubesdb-daemon: listening on PATH (N entries)` to stderr.

Example (a firewall qube's database as dom0 would fill it):
  qubes-rules qubesdb --family 4 --ip 10.137.0.10 < rules.txt > db.txt
  echo '/qubes-firewall/10.137.0.10 ' >> db.txt
  qubesdb-daemon --socket /tmp/lab/qubesdb.sock --load db.txt &
  qubesdb --socket /tmp/lab/qubesdb.sock multiread /qubes-firewall/";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut tree = Tree::new();
    for file in &cli.load {
        let shown = file.display().to_string();
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("qubesdb-daemon: cannot read {shown}: {e}");
                return ExitCode::from(1);
            }
        };
        if let Err(e) = load_into(&mut tree, &text, &shown) {
            eprintln!("qubesdb-daemon: {e}");
            return ExitCode::from(1);
        }
    }
    let count = tree.len();
    let server = match Server::bind(&cli.socket) {
        Ok(s) => s.with_tree(tree).verbose(!cli.quiet),
        Err(e) => {
            eprintln!("qubesdb-daemon: {e}");
            return ExitCode::from(1);
        }
    };
    eprintln!(
        "qubesdb-daemon: listening on {} ({count} entries)",
        cli.socket.display()
    );
    match server.serve() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qubesdb-daemon: {e}");
            ExitCode::from(1)
        }
    }
}
