//! `qvm-firewall`: edit a qube's firewall rules with upstream's grammar and output, on a store
//! laid out like dom0's `/var/lib/qubes` (`appvms/<qube>/firewall.xml`).

use std::io::Write;
use std::process::ExitCode;

use qubes_rules::client::{rules_table, ClientRule};
use qubes_rules::firewall::{get_payload, parse_set_payload};
use qubes_rules::py;
use qubes_rules::store::{Store, StoreError, DEFAULT_ROOT};

const USAGE: &str =
    "usage: qvm-firewall [--verbose] [--quiet] [--help] [--store DIR] [--reload] [--raw]
                    VMNAME {add,del,list,reset} ...";

const HELP: &str = r#"
Manage a qube's firewall rules (compatible with Qubes OS qvm-firewall).

positional arguments:
  VMNAME                name of the qube
  {add,del,list,reset}  action to perform (default: list)
    add [--before N] RULE...
                        add a rule, at the end or before rule number N
    del [--rule-no N] [RULE...]
                        remove rule number N, or the first rule equal to RULE
    list                list rules
    reset               replace all rules with the default (accept everything)

options:
  --help, -h            show this help message and exit
  --verbose, -v         increase verbosity
  --quiet, -q           decrease verbosity
  --store DIR           the rule store: a directory laid out like dom0's
                        /var/lib/qubes, rules in appvms/VMNAME/firewall.xml
                        (default: $QUBES_FIREWALL_STORE, else /var/lib/qubes)
  --reload, -r          force reload of rules even when unchanged (as upstream,
                        only acted upon by `list`; every command reads
                        firewall.xml afresh, so in a store it changes nothing)
  --raw                 output rules as raw strings, instead of nice table
  --version             show the version and exit

Rules can be given as positional arguments:
    <action> [<dsthost> [<proto> [<dstports>|<icmptype>]]]

And as keyword arguments:
    action=<action> [specialtarget=dns] [dsthost=<dsthost>]
    [proto=<proto>] [dstports=<dstports>] [icmptype=<icmptype>]
    [expire=<expire>] [comment=<text>]

Both formats, positional and keyword arguments, can be used
interchangeably. A comment is one argument: 'comment=Allow LAN'.

Available rules:
    action:        accept or drop
    dst4           synonym for dsthost
    dst6           synonym for dsthost
    dsthost        IP, network or hostname
                     (e.g. 10.5.3.2, 192.168.0.0/16,
                     www.example.com, fd00::/8)
    dstports       port or port range
                     (e.g. 443 or 1200-1400)
    icmptype       icmp type number (e.g. 8 for echo requests)
    proto          icmp, tcp or udp
    specialtarget  only the value dns is currently supported,
                     it matches the configured dns servers of
                     a VM
    expire         a rule is automatically removed at given time, given as
                     seconds since 1/1/1970, or +seconds (e.g. +300 for rule
                     expire in 5 minutes)
    comment        free text: letters, digits, spaces and :;,./-_[]

Exit status: 0 on success, 1 when the rules are refused (nothing is written;
the message is the one dom0 gives), 2 on a command-line error.

Environment: QUBES_FIREWALL_STORE (default store), QUBES_FIREWALL_NOW (UNIX
time to use as "now", for reproducible output).
"#;

/// How the command failed, and so what it prints and returns.
enum Failure {
    /// argparse-style: usage, `qvm-firewall: error: <msg>`, exit 2.
    Usage(String),
    /// `Error: <msg>`, exit 1; nothing was written.
    Refused(String),
}

type Res<T> = Result<T, Failure>;

fn usage<T>(msg: impl Into<String>) -> Res<T> {
    Err(Failure::Usage(msg.into()))
}

fn refused<T>(msg: impl Into<String>) -> Res<T> {
    Err(Failure::Refused(msg.into()))
}

#[derive(Debug, PartialEq)]
enum Command {
    Add {
        before: Option<i64>,
        rule: Vec<String>,
    },
    Del {
        rule_no: Option<i64>,
        rule: Vec<String>,
    },
    List,
    Reset,
}

struct Args {
    store: Option<String>,
    reload: bool,
    raw: bool,
    vm: String,
    command: Command,
}

/// Outcome of argument parsing that does not run a command.
enum Early {
    Help,
    Version,
}

/// Matches `arg` against long options, allowing unambiguous prefixes as argparse does.
fn long_opt<'a>(arg: &str, options: &[&'a str]) -> Res<Option<&'a str>> {
    let name = arg.split_once('=').map_or(arg, |(n, _)| n);
    if let Some(o) = options.iter().find(|o| **o == name) {
        return Ok(Some(o));
    }
    let matches: Vec<&&str> = options.iter().filter(|o| o.starts_with(name)).collect();
    match matches.len() {
        0 => Ok(None),
        1 => Ok(Some(matches[0])),
        _ => {
            let list: Vec<&str> = matches.iter().map(|s| **s).collect();
            usage(format!(
                "ambiguous option: {name} could match {}",
                list.join(", ")
            ))
        }
    }
}

/// The value of an option: `--opt=value` or the next argument.
fn opt_value(arg: &str, opt: &str, rest: &mut std::slice::Iter<'_, String>) -> Res<String> {
    if let Some((_, v)) = arg.split_once('=') {
        return Ok(v.to_string());
    }
    match rest.next() {
        Some(v) if !v.starts_with('-') || is_negative_number(v) => Ok(v.clone()),
        _ => usage(format!("argument {opt}: expected one argument")),
    }
}

fn is_negative_number(s: &str) -> bool {
    s.strip_prefix('-')
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

fn int_arg(opt: &str, v: &str) -> Res<i64> {
    match py::int(v) {
        Ok(i) if i.magnitude <= i64::MAX as u128 => {
            let m = i.magnitude as i64;
            Ok(if i.negative { -m } else { m })
        }
        _ => usage(format!(
            "argument {opt}: invalid int value: {}",
            py::repr(v)
        )),
    }
}

fn parse_args(argv: &[String]) -> Res<Result<Args, Early>> {
    const GLOBAL: [&str; 7] = [
        "--help",
        "--verbose",
        "--quiet",
        "--store",
        "--reload",
        "--raw",
        "--version",
    ];
    let mut store = None;
    let (mut reload, mut raw) = (false, false);
    let mut positionals: Vec<String> = Vec::new();
    let mut it = argv.iter();
    // Global options come before the command; once the command is seen, the rest is its own.
    while let Some(arg) = it.next() {
        if positionals.len() >= 2 {
            positionals.push(arg.clone());
            positionals.extend(it.by_ref().cloned());
            break;
        }
        if arg == "--" {
            positionals.extend(it.by_ref().cloned());
            break;
        }
        if arg.starts_with("--") {
            match long_opt(arg, &GLOBAL)? {
                Some("--help") => return Ok(Err(Early::Help)),
                Some("--version") => return Ok(Err(Early::Version)),
                Some("--verbose") | Some("--quiet") => {}
                Some("--store") => store = Some(opt_value(arg, "--store", &mut it)?),
                Some("--reload") => reload = true,
                Some("--raw") => raw = true,
                _ => return usage(format!("unrecognized arguments: {arg}")),
            }
        } else if arg.starts_with('-') && arg.len() > 1 && !is_negative_number(arg) {
            for c in arg[1..].chars() {
                match c {
                    'h' => return Ok(Err(Early::Help)),
                    'v' | 'q' => {}
                    'r' => reload = true,
                    _ => return usage(format!("unrecognized arguments: {arg}")),
                }
            }
        } else {
            positionals.push(arg.clone());
        }
    }
    let mut pos = positionals.into_iter();
    let Some(vm) = pos.next() else {
        return usage("the following arguments are required: VMNAME");
    };
    let rest: Vec<String> = pos.collect();
    let command = match rest.first().map(String::as_str) {
        None | Some("list") => {
            if rest.len() > 1 {
                return usage(format!("unrecognized arguments: {}", rest[1..].join(" ")));
            }
            Command::List
        }
        Some("reset") => {
            if rest.len() > 1 {
                return usage(format!("unrecognized arguments: {}", rest[1..].join(" ")));
            }
            Command::Reset
        }
        Some(cmd @ ("add" | "del")) => {
            let opt = if cmd == "add" {
                "--before"
            } else {
                "--rule-no"
            };
            let mut number = None;
            let mut rule = Vec::new();
            let mut it = rest[1..].iter();
            while let Some(arg) = it.next() {
                if arg == "--" {
                    rule.extend(it.by_ref().cloned());
                    break;
                }
                if arg.starts_with("--") {
                    match long_opt(arg, &[opt, "--help"])? {
                        Some("--help") => return Ok(Err(Early::Help)),
                        Some(_) => number = Some(int_arg(opt, &opt_value(arg, opt, &mut it)?)?),
                        None => return usage(format!("unrecognized arguments: {arg}")),
                    }
                } else if arg == "-h" {
                    return Ok(Err(Early::Help));
                } else if arg.starts_with('-') && arg.len() > 1 && !is_negative_number(arg) {
                    return usage(format!("unrecognized arguments: {arg}"));
                } else {
                    rule.push(arg.clone());
                }
            }
            if cmd == "add" {
                if rule.is_empty() {
                    return usage("the following arguments are required: rule");
                }
                Command::Add {
                    before: number,
                    rule,
                }
            } else {
                if rule.is_empty() && number.is_none() {
                    return usage("del needs a rule or --rule-no");
                }
                Command::Del {
                    rule_no: number,
                    rule,
                }
            }
        }
        Some(other) => {
            return usage(format!(
                "argument command: invalid choice: {} (choose from 'add', 'del', 'list', 'reset')",
                py::repr(other)
            ))
        }
    };
    Ok(Ok(Args {
        store,
        reload,
        raw,
        vm,
        command,
    }))
}

/// `RuleAction`: positional and `key=value` tokens to one client rule (reference 2.2).
fn rule_action(values: &[String], now: u64) -> Res<ClientRule> {
    let mut assumed = vec!["action", "dsthost", "proto", "dstports", "icmptype"];
    const ALLOWED: [&str; 8] = [
        "action",
        "dsthost",
        "proto",
        "dstports",
        "icmptype",
        "specialtarget",
        "comment",
        "expire",
    ];
    let mut kwargs: Vec<(String, String)> = Vec::new();
    for opt in values {
        let parts: Vec<&str> = opt.split('=').collect();
        let (key, mut value) = match parts.as_slice() {
            [k, v] => (k.to_string(), v.to_string()),
            [v] => match assumed.first() {
                Some(k) => (k.to_string(), v.to_string()),
                None => return usage(format!("too many positional rule elements: {opt}")),
            },
            _ => return usage(format!("invalid rule description: {opt}")),
        };
        if value.is_empty() {
            return usage(format!("invalid rule description: {opt}"));
        }
        let key = match key.as_str() {
            "dst4" | "dst6" => "dsthost".to_string(),
            _ => key,
        };
        if !ALLOWED.contains(&key.as_str()) {
            return usage(format!("Invalid rule element: {opt}"));
        }
        if key == "expire" {
            if let Some(delta) = value.strip_prefix('+') {
                let d = py::int(delta).map_err(Failure::Refused)?;
                if d.negative || d.magnitude > u128::from(u32::MAX) {
                    return refused(format!("expire offset out of range: {value}"));
                }
                value = (now + d.magnitude as u64).to_string();
            }
        }
        if let Some(slot) = kwargs.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = value.clone();
        } else {
            kwargs.push((key.clone(), value.clone()));
        }
        assumed.retain(|k| *k != key);
        if key == "proto" && (value == "tcp" || value == "udp") {
            assumed.retain(|k| *k != "icmptype");
        } else if key == "proto" && value == "icmp" {
            assumed.retain(|k| *k != "dstports");
        }
    }
    ClientRule::from_kwargs(kwargs).map_err(|e| Failure::Refused(e.0))
}

/// A Python list index as `list.pop(n)` takes it (negative counts from the end).
fn py_index(n: i64, len: usize) -> Option<usize> {
    let len = len as i64;
    let i = if n < 0 { n + len } else { n };
    (0..len).contains(&i).then_some(i as usize)
}

/// A Python `list.insert(n, x)` position (clamped, negative counts from the end).
fn py_insert_pos(n: i64, len: usize) -> usize {
    let len = len as i64;
    let i = if n < 0 { (n + len).max(0) } else { n.min(len) };
    i as usize
}

fn now() -> u64 {
    if let Some(n) = std::env::var("QUBES_FIREWALL_NOW")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return n;
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn store_err(e: StoreError) -> Failure {
    match e {
        StoreError::NoSuchDomain(_) => Failure::Usage(e.to_string()),
        other => Failure::Refused(other.to_string()),
    }
}

/// `Firewall.load_rules()` as the client sees it: dom0's Get payload parsed by the client.
fn client_rules(store: &Store, vm: &str, now: u64) -> Res<Vec<ClientRule>> {
    let rules = store.load(vm).map_err(store_err)?;
    get_payload(&rules, now)
        .lines()
        .map(|l| ClientRule::parse(l).map_err(|e| Failure::Refused(e.0)))
        .collect()
}

/// `save_rules()`: the client's Set payload, validated by dom0 as a whole, then written.
fn save_rules(store: &Store, vm: &str, rules: &[ClientRule], now: u64) -> Res<()> {
    let payload: String = rules.iter().map(|r| r.rule() + "\n").collect();
    let parsed = parse_set_payload(&payload).map_err(|e| Failure::Refused(e.message().into()))?;
    store.save(vm, &parsed, now).map_err(store_err)
}

fn run(args: Args, out: &mut impl Write) -> Res<()> {
    let root = args
        .store
        .or_else(|| std::env::var("QUBES_FIREWALL_STORE").ok())
        .unwrap_or_else(|| DEFAULT_ROOT.to_string());
    let store = Store::new(root);
    let now = now();
    store.qube_dir(&args.vm).map_err(store_err)?;
    let write_err = |e: std::io::Error| Failure::Refused(format!("writing output: {e}"));
    match args.command {
        Command::List => {
            let rules = client_rules(&store, &args.vm, now)?;
            let text = if args.raw {
                rules.iter().map(|r| r.rule() + "\n").collect()
            } else {
                rules_table(&rules, i128::from(now))
            };
            out.write_all(text.as_bytes()).map_err(write_err)?;
            // --reload: upstream fires admin.vm.firewall.Reload here; a store has no netvm to
            // notify, and the next reader sees firewall.xml as it is.
            let _ = args.reload;
        }
        Command::Add { before, rule } => {
            let new = rule_action(&rule, now)?;
            let _lock = store.lock(&args.vm).map_err(store_err)?;
            let mut rules = client_rules(&store, &args.vm, now)?;
            match before {
                Some(n) => rules.insert(py_insert_pos(n, rules.len()), new),
                None => rules.push(new),
            }
            save_rules(&store, &args.vm, &rules, now)?;
        }
        Command::Del { rule_no, rule } => {
            let _lock = store.lock(&args.vm).map_err(store_err)?;
            let mut rules = client_rules(&store, &args.vm, now)?;
            if let Some(n) = rule_no {
                let Some(i) = py_index(n, rules.len()) else {
                    return refused(format!(
                        "no rule number {n} (the qube has {} rules, numbered from 0)",
                        rules.len()
                    ));
                };
                rules.remove(i);
            } else {
                let target = rule_action(&rule, now)?.rule();
                let Some(i) = rules.iter().position(|r| r.rule() == target) else {
                    return refused(format!("no such rule: {target}"));
                };
                rules.remove(i);
            }
            save_rules(&store, &args.vm, &rules, now)?;
        }
        Command::Reset => {
            let _lock = store.lock(&args.vm).map_err(store_err)?;
            let rules =
                vec![ClientRule::parse("action=accept").map_err(|e| Failure::Refused(e.0))?];
            save_rules(&store, &args.vm, &rules, now)?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let stdout = std::io::stdout();
    let result = match parse_args(&argv) {
        Ok(Err(Early::Help)) => {
            println!("{USAGE}\n{HELP}");
            return ExitCode::SUCCESS;
        }
        Ok(Err(Early::Version)) => {
            println!("qvm-firewall {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Ok(Ok(args)) => run(args, &mut stdout.lock()),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("{USAGE}\nqvm-firewall: error: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Refused(msg)) => {
            eprintln!("Error: {msg}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(tokens: &[&str]) -> String {
        let v: Vec<String> = tokens.iter().map(|s| s.to_string()).collect();
        match rule_action(&v, 1000) {
            Ok(r) => r.rule(),
            Err(Failure::Usage(m)) => format!("usage: {m}"),
            Err(Failure::Refused(m)) => format!("refused: {m}"),
        }
    }

    #[test]
    fn rule_action_upstream_examples() {
        assert_eq!(
            rule(&["accept", "127.0.0.1", "tcp", "80"]),
            "action=accept proto=tcp dst4=127.0.0.1/32 dstports=80-80"
        );
        assert_eq!(
            rule(&["accept", "127.0.0.1", "icmp", "8"]),
            "action=accept proto=icmp dst4=127.0.0.1/32 icmptype=8"
        );
        assert_eq!(
            rule(&["dsthost=127.0.0.1", "accept", "dstports=443", "tcp"]),
            "action=accept proto=tcp dst4=127.0.0.1/32 dstports=443-443"
        );
        for k in ["dst4", "dst6", "dsthost"] {
            assert_eq!(
                rule(&["accept", &format!("{k}=127.0.0.1")]),
                "action=accept dst4=127.0.0.1/32"
            );
        }
        assert_eq!(
            rule(&["accept", "expire=+100"]),
            "action=accept expire=1100"
        );
        assert_eq!(
            rule(&["accept", "192.168.0.0/24", "comment=Allow LAN"]),
            "action=accept dst4=192.168.0.0/24 comment=Allow LAN"
        );
    }

    #[test]
    fn rule_action_errors() {
        for k in ["dsthost=", "dstports=", "icmptype="] {
            assert_eq!(
                rule(&["accept", k]),
                format!("usage: invalid rule description: {k}")
            );
        }
        assert_eq!(
            rule(&["accept", "comment=a=b"]),
            "usage: invalid rule description: comment=a=b"
        );
        assert_eq!(
            rule(&["accept", "foo=bar"]),
            "usage: Invalid rule element: foo=bar"
        );
        assert_eq!(
            rule(&["accept", "1.2.3.4/99"]),
            "refused: netmask for IPv4 must be <= 32"
        );
    }

    #[test]
    fn python_list_positions() {
        assert_eq!(py_index(-1, 3), Some(2));
        assert_eq!(py_index(3, 3), None);
        assert_eq!(py_insert_pos(10, 3), 3);
        assert_eq!(py_insert_pos(-1, 3), 2);
        assert_eq!(py_insert_pos(-10, 3), 0);
    }
}
