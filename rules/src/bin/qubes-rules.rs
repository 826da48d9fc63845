//! `qubes-rules`: check, convert and compile Qubes firewall rules from the command line.

use std::io::{self, BufRead, Read, Write};
use std::net::IpAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use qubes_rules::agent::{chain_for_addr, read_rules};
use qubes_rules::client::ClientRule;
use qubes_rules::firewall::{check_line, chomp, parse_set_payload, qubesdb_entries};
use qubes_rules::nft;
use qubes_rules::Family;

/// Check, convert and compile Qubes OS firewall rules, byte-compatible with dom0, qvm-firewall
/// and the netvm's qubes-firewall agent.
#[derive(Parser, Debug)]
#[command(name = "qubes-rules", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

const AFTER_HELP: &str = "\
Examples:
  echo 'action=accept proto=tcp dstports=443' | qubes-rules check
      ok action=accept proto=tcp dstports=443-443
  printf 'action=accept dsthost=qubes-os.org\\naction=drop\\n' | qubes-rules qubesdb --family 4
      policy drop
      0000 action=accept dsthost=qubes-os.org
      0001 action=drop
  ... | qubes-rules nft --family 4 --chain qbs-10-137-0-5 --dns 10.139.1.1,10.139.1.2 \\
        --resolve qubes-os.org=203.0.113.7";

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Validate admin-API rule lines from stdin as dom0 does.
    ///
    /// Prints one line per input line: `ok <normalised rule>`, `expired` (valid, but its
    /// expire time has passed) or `error <dom0's message>`. Exits 0 when no line is an error,
    /// 1 otherwise.
    Check {
        /// Which normalised form to print after `ok`: the admin-API form (what
        /// admin.vm.firewall.Get returns), the QubesDB form (what the netvm receives), or the
        /// client form (what `qvm-firewall --raw list` prints).
        #[arg(long, value_enum, default_value_t = Format::Api)]
        format: Format,
        /// Judge expiry at this UNIX time instead of now.
        #[arg(long, value_name = "SECS")]
        now: Option<u64>,
    },
    /// Turn a rule list (admin-API lines on stdin) into the QubesDB entries dom0 writes.
    ///
    /// Prints `key value` lines: `policy drop`, then `NNNN <rule>` numbered by position in
    /// the whole list, skipping expired rules and rules of the other address family. The input
    /// is taken as a whole: if any line is invalid nothing is printed and the exit status is 1.
    Qubesdb {
        /// Address family of the entries (4 or 6).
        #[arg(long, value_parser = parse_family)]
        family: Family,
        /// Print full paths `/qubes-firewall/ADDR/KEY` for the client with this address.
        #[arg(long, value_name = "ADDR")]
        ip: Option<IpAddr>,
        /// Judge expiry at this UNIX time instead of now.
        #[arg(long, value_name = "SECS")]
        now: Option<u64>,
    },
    /// Compile QubesDB entries (`key value` lines on stdin) into the nft text the netvm's
    /// qubes-firewall agent loads for one client.
    ///
    /// Keys may be bare (`policy`, `0000`) or full paths (`/qubes-firewall/10.137.0.5/0000`).
    /// Rules the agent cannot parse or apply block the client, as upstream: the error goes to
    /// stderr, the drop-all chain to stdout, and the exit status is 1.
    Nft {
        /// Address family of the chain (4 or 6).
        #[arg(long, value_parser = parse_family)]
        family: Family,
        /// Chain name, e.g. qbs-10-137-0-5. Default: derived from --ip.
        #[arg(long, required_unless_present = "ip")]
        chain: Option<String>,
        /// The client's address as dom0 wrote it in QubesDB (names the chain when --chain is
        /// not given). The text is kept as given, like the agent does: `fd09:24ef:4179:0000::3`
        /// names `qbs-fd09-24ef-4179-0000--3`, not the chain of its compressed form.
        #[arg(long, value_name = "ADDR", value_parser = parse_addr_text)]
        ip: Option<String>,
        /// The netvm's DNS servers (specialtarget=dns); only those of --family are used.
        /// Without any, the agent's set stays empty and DNS rules match nothing.
        #[arg(long, value_name = "ADDR[,ADDR]", value_delimiter = ',')]
        dns: Vec<IpAddr>,
        /// Answer for a dsthost name; repeat for more names or addresses. Names not given
        /// fail to resolve, which blocks the client as upstream does.
        #[arg(long, value_name = "NAME=ADDR", value_parser = parse_resolve)]
        resolve: Vec<(String, IpAddr)>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Api,
    Qdb,
    Client,
}

fn parse_family(s: &str) -> Result<Family, String> {
    Family::parse(s).ok_or_else(|| format!("address family must be 4 or 6, not {s:?}"))
}

/// An IP address, kept as the text given. The agent (qubes-core-agent-linux
/// qubesagent/firewall.py, `chain_for_addr`) builds chain names from the QubesDB key text
/// verbatim, so reformatting it (dropping `0000` groups, lower-casing) would name another chain.
fn parse_addr_text(s: &str) -> Result<String, String> {
    s.parse::<IpAddr>()
        .map(|_| s.to_string())
        .map_err(|_| format!("{s:?} is not an IP address"))
}

fn parse_resolve(s: &str) -> Result<(String, IpAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=ADDR, got {s:?}"))?;
    let addr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IP address (in {s:?})"))?;
    Ok((name.to_string(), addr))
}

fn now_or(now: Option<u64>) -> u64 {
    now.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    })
}

fn check(format: Format, now: u64) -> io::Result<bool> {
    let stdin = io::stdin();
    let mut input = stdin.lock();
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let mut all_ok = true;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if input.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
        }
        let text = String::from_utf8_lossy(&buf);
        let line = chomp(&text);
        match check_line(line) {
            Ok(rule) if rule.is_expired(now) => writeln!(out, "expired")?,
            Ok(rule) => {
                let text = match format {
                    Format::Api => rule.api_form(),
                    Format::Qdb => rule.qubesdb_form(),
                    Format::Client => ClientRule::parse(&rule.api_form())
                        .map(|c| c.rule())
                        .unwrap_or_else(|e| format!("(client refuses: {e})")),
                };
                writeln!(out, "ok {text}")?;
            }
            Err(e) => {
                all_ok = false;
                writeln!(out, "error {e}")?;
            }
        }
    }
    out.flush()?;
    Ok(all_ok)
}

fn read_stdin() -> io::Result<String> {
    let mut bytes = Vec::new();
    io::stdin().lock().read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn qubesdb(family: Family, ip: Option<IpAddr>, now: u64) -> io::Result<bool> {
    let input = read_stdin()?;
    let rules = match parse_set_payload(&input) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("qubes-rules: {e}; nothing printed");
            return Ok(false);
        }
    };
    let prefix = ip
        .map(|a| format!("/qubes-firewall/{a}/"))
        .unwrap_or_default();
    let mut out = String::new();
    for (k, v) in qubesdb_entries(&rules, family, now) {
        out.push_str(&format!("{prefix}{k} {v}\n"));
    }
    io::stdout().write_all(out.as_bytes())?;
    Ok(true)
}

fn nft_cmd(
    family: Family,
    chain: String,
    label: String,
    dns: &[IpAddr],
    resolve: Vec<(String, IpAddr)>,
) -> io::Result<bool> {
    let input = read_stdin()?;
    let entries: Vec<(&str, &str)> = input
        .lines()
        .map(chomp)
        .filter(|l| !l.is_empty())
        .map(|l| l.split_once(' ').unwrap_or((l, "")))
        .collect();
    let mut resolver = nft::StaticResolver::default();
    for (name, addr) in resolve {
        resolver.insert(&name, addr);
    }
    let result = read_rules(entries.iter().copied())
        .and_then(|rules| nft::prepare_rules(&chain, &rules, family, dns, &resolver));
    let (text, ok) = match result {
        Ok(text) => (text, true),
        Err(e) => {
            eprintln!("{}", nft::parse_failure_message(&label, &e));
            let fallback =
                nft::prepare_rules(&chain, &nft::fallback_rules(), family, dns, &resolver)
                    .map_err(|e| io::Error::other(e.to_string()))?;
            (fallback, false)
        }
    };
    io::stdout().write_all(text.as_bytes())?;
    Ok(ok)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Check { format, now } => check(format, now_or(now)),
        Cmd::Qubesdb { family, ip, now } => qubesdb(family, ip, now_or(now)),
        Cmd::Nft {
            family,
            chain,
            ip,
            dns,
            resolve,
        } => {
            let label = ip.clone().or_else(|| chain.clone());
            let chain = chain
                .or_else(|| ip.as_deref().map(chain_for_addr))
                .unwrap_or_default();
            nft_cmd(family, chain, label.unwrap_or_default(), &dns, resolve)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("qubes-rules: {e}");
            ExitCode::from(1)
        }
    }
}
