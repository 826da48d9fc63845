//! The expectations language (tests/pcap/README.md): a parser and a checker.
//!
//! One fact per line; `#` starts a comment. The first comment is the scenario's description.
//!
//! ```text
//! [KIND] frames on IFACE OP N          frames on IFACE (of that kind) compared with N
//! no [KIND] frames on IFACE            the same with = 0
//! [KIND] frame I on IFACE: PREDICATES  the I-th (0-based) frame on IFACE (of that kind)
//! counter REASON on IFACE OP N         the engine's counter at the end of the replay
//! event client-blocked on IFACE OP N   ClientBlocked events for the interface
//! event flows-cut on IFACE OP N        flows cut on the interface (sum of the events' counts)
//! resolve NAME OP N                    Resolve events for the name
//! distinct $A $B ...                   the variables were bound to different values
//! ```
//!
//! OP is `=`, `>=` or `<=`. Predicates are kind words and `key value` pairs; a value `$name` binds
//! a variable on first use and must be equal on later uses; `inner` moves to the packet quoted in
//! an ICMP error. Besides, every emitted frame must decode cleanly (lengths and checksums).

use std::collections::BTreeMap;
use std::net::IpAddr;

use qubes_engine::config::{format_mac, parse_mac};
use qubes_engine::engine::{Event, Reason};
use sys_firewall::replay::ReplayOutput;

use super::frame::{canonical_flags, decode, Decoded};

/// Kind words: in predicates, and as the filter of `frames`/`frame` lines.
pub const KINDS: &[&str] = &[
    "arp",
    "arp-request",
    "arp-reply",
    "ip",
    "ipv4",
    "ipv6",
    "tcp",
    "udp",
    "icmp4",
    "icmp6",
    "ndp",
    "fragment",
    "other",
    "malformed",
];

/// Predicate keys.
pub const KEYS: &[&str] = &[
    "smac",
    "dmac",
    "len",
    "ethertype",
    "op",
    "sha",
    "spa",
    "tha",
    "tpa",
    "src",
    "dst",
    "ttl",
    "hlim",
    "id",
    "df",
    "mf",
    "fragoff",
    "iplen",
    "proto",
    "sport",
    "dport",
    "flags",
    "seq",
    "ack",
    "win",
    "paylen",
    "type",
    "code",
    "echo-id",
    "echo-seq",
    "mtu",
    "target",
    "naflags",
    "lladdr",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ge,
    Le,
}

impl Op {
    fn parse(s: &str) -> Result<Op, String> {
        match s {
            "=" => Ok(Op::Eq),
            ">=" => Ok(Op::Ge),
            "<=" => Ok(Op::Le),
            _ => Err(format!("{s:?} is not one of = >= <=")),
        }
    }

    fn holds(self, actual: u64, want: u64) -> bool {
        match self {
            Op::Eq => actual == want,
            Op::Ge => actual >= want,
            Op::Le => actual <= want,
        }
    }

    fn sym(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ge => ">=",
            Op::Le => "<=",
        }
    }
}

/// A predicate: a kind word, `inner`, or a key and its value (canonical, or a `$variable`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pred {
    Kind(String),
    Inner,
    Field(String, String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fact {
    Count {
        kind: Option<String>,
        iface: String,
        op: Op,
        n: u64,
    },
    Frame {
        kind: Option<String>,
        index: usize,
        iface: String,
        preds: Vec<Pred>,
    },
    Counter {
        reason: String,
        iface: String,
        op: Op,
        n: u64,
    },
    Event {
        what: String,
        iface: String,
        op: Op,
        n: u64,
    },
    Resolve {
        name: String,
        op: Op,
        n: u64,
    },
    Distinct(Vec<String>),
}

/// A fact as the file states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stated {
    /// Line number (1-based).
    pub line: usize,
    /// The line as written (trimmed).
    pub text: String,
    pub fact: Fact,
}

/// A parsed expect.txt.
#[derive(Debug, Clone, Default)]
pub struct Expectations {
    /// The first comment.
    pub about: String,
    /// The facts, in file order.
    pub facts: Vec<Stated>,
}

/// Canonical form of a predicate value, by key.
fn canonical(key: &str, v: &str) -> Result<String, String> {
    if v.starts_with('$') {
        if v.len() < 2 {
            return Err("empty variable name".into());
        }
        return Ok(v.to_string());
    }
    let bad = |what: &str| format!("{key}: {v:?} is not {what}");
    match key {
        "src" | "dst" | "spa" | "tpa" | "target" => v
            .parse::<IpAddr>()
            .map(|a| a.to_string())
            .map_err(|_| bad("an IP address")),
        "smac" | "dmac" | "sha" | "tha" | "lladdr" => parse_mac(v)
            .map(|m| format_mac(&m))
            .map_err(|_| bad("a MAC address")),
        "flags" => canonical_flags(v).ok_or_else(|| bad("TCP flags (letters of FSRPAUEC, or -)")),
        "naflags" => {
            if v == "-" {
                Ok(v.into())
            } else if !v.is_empty() && v.chars().all(|c| "RSO".contains(c)) {
                Ok("RSO".chars().filter(|c| v.contains(*c)).collect())
            } else {
                Err(bad("NA flags (letters of RSO, or -)"))
            }
        }
        "df" | "mf" => match v {
            "yes" | "no" => Ok(v.into()),
            _ => Err(bad("yes or no")),
        },
        "op" => match v {
            "request" | "reply" => Ok(v.into()),
            _ => v
                .parse::<u16>()
                .map(|n| n.to_string())
                .map_err(|_| bad("request or reply")),
        },
        "ethertype" => u16::from_str_radix(v.trim_start_matches("0x"), 16)
            .map(|n| format!("0x{n:04x}"))
            .map_err(|_| bad("a hex ethertype")),
        _ => v
            .parse::<u64>()
            .map(|n| n.to_string())
            .map_err(|_| bad("a number")),
    }
}

/// Parses predicates (the part after `:` of a frame line, or a frame description).
pub fn parse_preds(s: &str) -> Result<Vec<Pred>, String> {
    let mut out = Vec::new();
    let mut it = s.split_whitespace();
    while let Some(t) = it.next() {
        if t == "inner" {
            out.push(Pred::Inner);
        } else if KINDS.contains(&t) {
            out.push(Pred::Kind(t.to_string()));
        } else if KEYS.contains(&t) {
            let v = it.next().ok_or_else(|| format!("{t} needs a value"))?;
            out.push(Pred::Field(t.to_string(), canonical(t, v)?));
        } else {
            return Err(format!(
                "unknown word {t:?} (kinds: {}; keys: {})",
                KINDS.join(" "),
                KEYS.join(" ")
            ));
        }
    }
    Ok(out)
}

fn parse_n(s: Option<&str>) -> Result<u64, String> {
    let s = s.ok_or("missing number")?;
    s.parse().map_err(|_| format!("{s:?} is not a number"))
}

fn parse_line(line: &str) -> Result<Fact, String> {
    let (head, preds) = match line.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (line, None),
    };
    let w: Vec<&str> = head.split_whitespace().collect();
    let kind_ok = |k: &str| -> Result<Option<String>, String> {
        if KINDS.contains(&k) {
            Ok(Some(k.to_string()))
        } else {
            Err(format!("{k:?} is not a kind ({})", KINDS.join(" ")))
        }
    };
    let no_preds = || -> Result<(), String> {
        match preds {
            Some(_) => Err("unexpected ':'".into()),
            None => Ok(()),
        }
    };
    match w.as_slice() {
        ["no", "frames", "on", iface] => {
            no_preds()?;
            Ok(Fact::Count {
                kind: None,
                iface: iface.to_string(),
                op: Op::Eq,
                n: 0,
            })
        }
        ["no", k, "frames", "on", iface] => {
            no_preds()?;
            Ok(Fact::Count {
                kind: kind_ok(k)?,
                iface: iface.to_string(),
                op: Op::Eq,
                n: 0,
            })
        }
        ["frames", "on", iface, op, n] => {
            no_preds()?;
            Ok(Fact::Count {
                kind: None,
                iface: iface.to_string(),
                op: Op::parse(op)?,
                n: parse_n(Some(n))?,
            })
        }
        [k, "frames", "on", iface, op, n] => {
            no_preds()?;
            Ok(Fact::Count {
                kind: kind_ok(k)?,
                iface: iface.to_string(),
                op: Op::parse(op)?,
                n: parse_n(Some(n))?,
            })
        }
        ["frame", i, "on", iface] | [_, "frame", i, "on", iface] => {
            let kind = if w[0] == "frame" {
                None
            } else {
                kind_ok(w[0])?
            };
            let preds = preds.ok_or("a frame line needs ':' and predicates")?;
            Ok(Fact::Frame {
                kind,
                index: i
                    .parse()
                    .map_err(|_| format!("{i:?} is not a frame index"))?,
                iface: iface.to_string(),
                preds: parse_preds(preds)?,
            })
        }
        ["counter", reason, "on", iface, op, n] => {
            no_preds()?;
            if !Reason::ALL.iter().any(|r| r.name() == *reason) {
                let names: Vec<&str> = Reason::ALL.iter().map(|r| r.name()).collect();
                return Err(format!("{reason:?} is not a counter ({})", names.join(" ")));
            }
            Ok(Fact::Counter {
                reason: reason.to_string(),
                iface: iface.to_string(),
                op: Op::parse(op)?,
                n: parse_n(Some(n))?,
            })
        }
        ["event", what, "on", iface, op, n] => {
            no_preds()?;
            if !["client-blocked", "flows-cut"].contains(what) {
                return Err(format!("{what:?} is not client-blocked or flows-cut"));
            }
            Ok(Fact::Event {
                what: what.to_string(),
                iface: iface.to_string(),
                op: Op::parse(op)?,
                n: parse_n(Some(n))?,
            })
        }
        ["resolve", name, op, n] => {
            no_preds()?;
            Ok(Fact::Resolve {
                name: name.to_string(),
                op: Op::parse(op)?,
                n: parse_n(Some(n))?,
            })
        }
        ["distinct", vars @ ..] if vars.len() >= 2 => {
            no_preds()?;
            if let Some(v) = vars.iter().find(|v| !v.starts_with('$')) {
                return Err(format!("{v:?} is not a $variable"));
            }
            Ok(Fact::Distinct(vars.iter().map(|v| v.to_string()).collect()))
        }
        _ => Err("not a fact (see tests/pcap/README.md)".into()),
    }
}

/// Parses an expect.txt.
pub fn parse(text: &str) -> Result<Expectations, String> {
    let mut e = Expectations::default();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(c) = line.strip_prefix('#') {
            if e.about.is_empty() && e.facts.is_empty() {
                e.about = c.trim().to_string();
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        let fact = parse_line(line).map_err(|m| format!("line {}: {m}: {line}", i + 1))?;
        e.facts.push(Stated {
            line: i + 1,
            text: line.to_string(),
            fact,
        });
    }
    if e.about.is_empty() {
        return Err("the first line must be a '# description' comment".into());
    }
    if e.facts.is_empty() {
        return Err("no facts".into());
    }
    Ok(e)
}

fn has_kind(d: &Decoded, k: &str) -> bool {
    match k {
        "ip" => d.has("ipv4") || d.has("ipv6"),
        _ => d.has(k),
    }
}

/// Matches predicates against a decoded frame, binding variables.
pub fn match_preds(
    d: &Decoded,
    preds: &[Pred],
    vars: &mut BTreeMap<String, String>,
) -> Result<(), String> {
    let mut cur = d;
    let mut bind: Vec<(String, String)> = Vec::new();
    let mut at = "";
    for p in preds {
        let r = match_pred(cur, p, vars, &mut bind);
        if let Pred::Inner = p {
            cur = cur
                .inner
                .as_deref()
                .ok_or("expected a quoted packet, seen none (not an ICMP error)")?;
            at = "inner: ";
        }
        r.map_err(|m| format!("{at}{m}"))?;
    }
    vars.extend(bind);
    Ok(())
}

fn match_pred(
    cur: &Decoded,
    p: &Pred,
    vars: &BTreeMap<String, String>,
    bind: &mut Vec<(String, String)>,
) -> Result<(), String> {
    {
        match p {
            Pred::Inner => {}
            Pred::Kind(k) => {
                if !has_kind(cur, k) {
                    return Err(format!("expected {k}, seen not {k}"));
                }
            }
            Pred::Field(k, want) => {
                let got = cur
                    .get(k)
                    .or_else(|| match k.as_str() {
                        "ttl" => cur.get("hlim"),
                        "hlim" => cur.get("ttl"),
                        _ => None,
                    })
                    .ok_or_else(|| format!("expected {k} {want}, seen no {k}"))?;
                if let Some(name) = want.strip_prefix('$') {
                    let bound = vars
                        .get(name)
                        .cloned()
                        .or_else(|| bind.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()));
                    match bound {
                        Some(v) if v != got => {
                            return Err(format!(
                                "expected {k} ${name} (bound to {v}), seen {k} {got}"
                            ));
                        }
                        Some(_) => {}
                        None => bind.push((name.to_string(), got.to_string())),
                    }
                } else if want != got {
                    return Err(format!("expected {k} {want}, seen {k} {got}"));
                }
            }
        }
    }
    Ok(())
}

/// Frames of the output on one interface, decoded, with their index in the whole output.
pub fn frames_on(out: &ReplayOutput, iface: &str) -> Vec<(usize, Decoded)> {
    let Some(id) = out.ifaces.iter().position(|n| n == iface) else {
        return Vec::new();
    };
    out.frames
        .iter()
        .enumerate()
        .filter(|(_, f)| f.iface as usize == id)
        .map(|(i, f)| (i, decode(&f.data)))
        .collect()
}

fn iface_id(out: &ReplayOutput, iface: &str) -> Result<u32, String> {
    out.ifaces
        .iter()
        .position(|n| n == iface)
        .map(|i| i as u32)
        .ok_or_else(|| {
            format!(
                "expected an interface {iface}, seen only {}",
                out.ifaces.join(", ")
            )
        })
}

/// Whether a fact is positive: it pins something that happened, not only something that did
/// not. A frame that comes out, with at least one key field (`frame I on IFACE: ... key value`),
/// or a drop counter other than `accepted` that must be at least 1 (`counter spoofed on vif3.0 =
/// 2`, `... >= 1`): the reason nothing came out. Counts, `no ... frames`, events, lookups and
/// `distinct` are not.
pub fn is_positive(f: &Fact) -> bool {
    match f {
        Fact::Frame { preds, .. } => preds.iter().any(|p| matches!(p, Pred::Field(..))),
        Fact::Counter { reason, op, n, .. } => {
            reason != "accepted" && *n >= 1 && matches!(op, Op::Eq | Op::Ge)
        }
        _ => false,
    }
}

/// Fails unless the expectations state at least one positive fact ([`is_positive`]).
pub fn require_positive(e: &Expectations) -> Result<(), String> {
    if e.facts.iter().any(|s| is_positive(&s.fact)) {
        return Ok(());
    }
    Err(format!(
        "no positive fact: only {}; state a frame that comes out (`frame I on IFACE: KEY VALUE \
         ...`) or, if nothing may, the drop counter that explains it (`counter REASON on IFACE = \
         N`, N >= 1, not `accepted`)",
        e.facts
            .iter()
            .map(|s| format!("`{}`", s.text))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// Checks the facts against a replay; returns what failed (empty: all hold), one line each:
/// `line N: FACT: expected ..., seen ...`.
pub fn check(e: &Expectations, out: &ReplayOutput) -> Vec<String> {
    let mut fails = Vec::new();
    let mut vars = BTreeMap::new();
    for (i, f) in out.frames.iter().enumerate() {
        let d = decode(&f.data);
        if !d.problems.is_empty() {
            let iface = out.ifaces.get(f.iface as usize).map_or("?", String::as_str);
            fails.push(format!(
                "output frame {i} on {iface}: expected a well-formed frame, seen {}",
                d.describe()
            ));
        }
    }
    let compare = |op: Op, got: u64, n: u64| {
        if op.holds(got, n) {
            Ok(())
        } else {
            Err(format!("expected {} {n}, seen {got}", op.sym()))
        }
    };
    for st in &e.facts {
        let r: Result<(), String> = (|| match &st.fact {
            Fact::Count { kind, iface, op, n } => {
                iface_id(out, iface)?;
                let got = frames_on(out, iface)
                    .iter()
                    .filter(|(_, d)| kind.as_deref().is_none_or(|k| has_kind(d, k)))
                    .count() as u64;
                compare(*op, got, *n)
            }
            Fact::Frame {
                kind,
                index,
                iface,
                preds,
            } => {
                iface_id(out, iface)?;
                let list: Vec<(usize, Decoded)> = frames_on(out, iface)
                    .into_iter()
                    .filter(|(_, d)| kind.as_deref().is_none_or(|k| has_kind(d, k)))
                    .collect();
                let (_, d) = list.get(*index).ok_or_else(|| {
                    format!(
                        "expected a frame {index}, seen only {} such frame(s)",
                        list.len()
                    )
                })?;
                match_preds(d, preds, &mut vars)
                    .map_err(|m| format!("{m} (frame: {})", d.describe()))
            }
            Fact::Counter {
                reason,
                iface,
                op,
                n,
            } => {
                let id = iface_id(out, iface)? as usize;
                let r = Reason::ALL
                    .iter()
                    .find(|r| r.name() == reason)
                    .ok_or("unknown reason")?;
                compare(*op, out.counters.get(id).map_or(0, |c| c.get(*r)), *n)
            }
            Fact::Event { what, iface, op, n } => {
                let id = iface_id(out, iface)?;
                let got: u64 = out
                    .events
                    .iter()
                    .map(|ev| match (&ev.event, what.as_str()) {
                        (Event::ClientBlocked { iface, .. }, "client-blocked") if *iface == id => 1,
                        (Event::FlowsCut { iface, count }, "flows-cut") if *iface == id => {
                            *count as u64
                        }
                        _ => 0,
                    })
                    .sum();
                compare(*op, got, *n)
            }
            Fact::Resolve { name, op, n } => {
                let got = out
                    .events
                    .iter()
                    .filter(|ev| matches!(&ev.event, Event::Resolve { name: x } if x == name))
                    .count() as u64;
                compare(*op, got, *n)
            }
            Fact::Distinct(names) => {
                let mut seen: Vec<(&str, &str)> = Vec::new();
                for v in names {
                    let val = vars.get(&v[1..]).ok_or_else(|| {
                        format!("expected {v} bound by an earlier frame fact, seen it unbound")
                    })?;
                    if let Some((other, _)) = seen.iter().find(|(_, x)| *x == val.as_str()) {
                        return Err(format!(
                            "expected distinct values, seen {other} = {v} = {val}"
                        ));
                    }
                    seen.push((v, val));
                }
                Ok(())
            }
        })();
        if let Err(m) = r {
            fails.push(format!("line {}: {}: {m}", st.line, st.text));
        }
    }
    fails
}
