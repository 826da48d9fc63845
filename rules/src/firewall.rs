//! A qube's rule list as dom0 keeps it (`qubes.firewall.Firewall`), and what dom0 sends out:
//! the admin-API payloads (reference 2.1) and the QubesDB entries (reference 1.7).

use std::fmt;

use crate::rule::{Action, Family, Rule, RuleError};

/// The policy dom0 always writes: rules that match nothing are dropped (reference 1.5).
pub const POLICY: Action = Action::Drop;

/// Why an `admin.vm.firewall.Set` payload was refused. Nothing is saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetError {
    /// `ProtocolError("Rules contains non-ASCII characters")`.
    NonAscii,
    /// A line dom0 refused; `line` counts from 1.
    Rule { line: usize, error: RuleError },
}

impl SetError {
    /// dom0's message, without the line number.
    pub fn message(&self) -> &str {
        match self {
            SetError::NonAscii => "Rules contains non-ASCII characters",
            SetError::Rule { error, .. } => error.message(),
        }
    }
}

impl fmt::Display for SetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SetError::NonAscii => f.write_str(self.message()),
            SetError::Rule { line, error } => write!(f, "rule line {line}: {error}"),
        }
    }
}

impl std::error::Error for SetError {}

/// Python `str.splitlines()` for ASCII text.
pub fn splitlines(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\r' => {
                out.push(&s[start..i]);
                if bytes.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                start = i + 1;
            }
            b'\n' | b'\x0b' | b'\x0c' | b'\x1c' | b'\x1d' | b'\x1e' => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if start < bytes.len() {
        out.push(&s[start..]);
    }
    out
}

/// `admin.vm.firewall.Set`: every line is parsed before anything is kept (all or nothing).
pub fn parse_set_payload(payload: &str) -> Result<Vec<Rule>, SetError> {
    if !payload.is_ascii() {
        return Err(SetError::NonAscii);
    }
    splitlines(payload)
        .into_iter()
        .enumerate()
        .map(|(i, l)| Rule::from_api_str(l).map_err(|error| SetError::Rule { line: i + 1, error }))
        .collect()
}

/// `admin.vm.firewall.Get`: the `api_rule` of every rule that has not expired, one per line.
pub fn get_payload(rules: &[Rule], now: u64) -> String {
    let mut out = String::new();
    for r in rules {
        if let Some(line) = r.api_rule(now) {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

/// `Firewall.qdb_entries(addr_family)`: `policy` first, then `%04d` keys numbered by position
/// in the whole list, leaving gaps for expired rules and rules of the other family.
pub fn qubesdb_entries(rules: &[Rule], family: Family, now: u64) -> Vec<(String, String)> {
    let mut out = vec![("policy".to_string(), POLICY.as_str().to_string())];
    for (i, r) in rules.iter().enumerate() {
        if !r.in_family(family) {
            continue;
        }
        if let Some(line) = r.qubesdb_rule(now) {
            out.push((format!("{i:04}"), line));
        }
    }
    out
}

/// The earliest expiry still in the future: when dom0 would rewrite QubesDB next.
pub fn next_expiry(rules: &[Rule], now: u64) -> Option<u64> {
    rules
        .iter()
        .filter_map(|r| r.expire.as_ref())
        .map(|e| e.secs())
        .filter(|&s| s >= now)
        .min()
}

/// Reads one admin-API line the way `qubes-rules check` and dom0 do: a line with non-ASCII
/// characters is refused as the whole payload would be.
pub fn check_line(line: &str) -> Result<Rule, RuleError> {
    if !line.is_ascii() {
        return Err(RuleError::new("Rules contains non-ASCII characters"));
    }
    Rule::from_api_str(line)
}

/// Strips what a line-oriented reader leaves on a line: a trailing `\r` from CRLF input.
pub fn chomp(line: &str) -> &str {
    line.strip_suffix('\r').unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn rules(lines: &[&str]) -> Vec<Rule> {
        lines
            .iter()
            .map(|l| Rule::from_api_str(l).expect("valid"))
            .collect()
    }

    #[test]
    fn qdb_entries_verified_example() {
        let r = rules(&[
            "action=drop dst6=2001:db8::/32",
            "action=accept dst4=10.0.0.0/8 proto=tcp dstports=22",
            "action=drop proto=udp expire=1000",
            "action=accept specialtarget=dns",
            "action=accept dsthost=qubes-os.org comment=hi there",
            "action=drop",
        ]);
        let v4: Vec<(String, String)> = qubesdb_entries(&r, Family::V4, NOW);
        let want4 = [
            ("policy", "drop"),
            (
                "0001",
                "action=accept dst4=10.0.0.0/8 proto=tcp dstports=22-22",
            ),
            ("0003", "action=accept specialtarget=dns"),
            ("0004", "action=accept dsthost=qubes-os.org"),
            ("0005", "action=drop"),
        ];
        assert_eq!(
            v4,
            want4
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        );
        let v6 = qubesdb_entries(&r, Family::V6, NOW);
        assert_eq!(
            v6[1],
            ("0000".into(), "action=drop dst6=2001:db8::/32".into())
        );
        assert_eq!(v6.len(), 5);
    }

    #[test]
    fn qdb_entries_test_005() {
        let r = rules(&[
            "action=drop proto=icmp",
            "action=drop proto=tcp dstports=80",
            "action=accept proto=udp",
            "action=accept specialtarget=dns",
        ]);
        let got: Vec<String> = qubesdb_entries(&r, Family::V4, NOW)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        assert_eq!(
            got,
            [
                "policy=drop",
                "0000=action=drop proto=icmp",
                "0001=action=drop proto=tcp dstports=80-80",
                "0002=action=accept proto=udp",
                "0003=action=accept specialtarget=dns"
            ]
        );
    }

    #[test]
    fn get_payload_test_571() {
        let r = rules(&[
            "action=accept proto=tcp dstports=1-1024",
            "action=drop proto=icmp comment=No ICMP",
            "action=drop proto=udp expire=1499450306",
            "action=drop proto=udp expire=2099450306",
            "action=accept",
        ]);
        assert_eq!(
            get_payload(&r, NOW),
            "action=accept proto=tcp dstports=1-1024\n\
             action=drop proto=icmp comment=No ICMP\n\
             action=drop expire=2099450306 proto=udp\n\
             action=accept\n"
        );
    }

    #[test]
    fn set_is_all_or_nothing() {
        let e = parse_set_payload("action=accept\naction=reject\n").expect_err("invalid");
        assert_eq!(e.message(), "reject");
        assert!(matches!(e, SetError::Rule { line: 2, .. }));
        assert_eq!(
            parse_set_payload("action=accept comment=caf\u{e9}\n"),
            Err(SetError::NonAscii)
        );
        assert_eq!(
            parse_set_payload("action=accept\r\naction=drop").map(|v| v.len()),
            Ok(2)
        );
    }

    #[test]
    fn splitlines_like_python() {
        assert_eq!(splitlines("a\nb\r\nc\rd\x0be\n"), ["a", "b", "c", "d", "e"]);
        assert_eq!(splitlines("a\n\nb"), ["a", "", "b"]);
        assert!(splitlines("").is_empty());
    }
}
