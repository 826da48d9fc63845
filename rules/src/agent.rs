//! The netvm agent's view of a client's rules (`qubesagent/firewall.py`, reference 3.2).
//!
//! The agent does not re-validate rules with dom0's model: it splits the QubesDB strings into
//! key/value pairs and trusts them. [`read_rules`] reproduces that reading and its errors;
//! [`AgentRule::to_match`] is the stricter typed form that the classifier and the engine use.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::rule::{inet_pton4, inet_pton6, Action, DstPorts, Family, Proto};

/// A rule set that the agent refuses; the client then gets drop-all (fail closed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleParseError(pub String);

impl fmt::Display for RuleParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RuleParseError {}

impl RuleParseError {
    /// The agent's log line and desktop notification when a client's rules cannot be parsed
    /// (qubes-core-agent-linux `qubesagent/firewall.py`, `FirewallWorker.handle_addr`):
    /// `Failed to parse rules for {addr} ({err}), blocking traffic`. Both data planes say it.
    pub fn blocking_message(&self, addr: &str) -> String {
        format!("Failed to parse rules for {addr} ({self}), blocking traffic")
    }
}

fn perr<T>(msg: impl Into<String>) -> Result<T, RuleParseError> {
    Err(RuleParseError(msg.into()))
}

/// The rule options the agent knows (`supported_rule_opts`).
pub const SUPPORTED_OPTS: [&str; 8] = [
    "action",
    "proto",
    "dst4",
    "dst6",
    "dsthost",
    "dstports",
    "specialtarget",
    "icmptype",
];

/// One rule as the agent holds it: a Python dict of option to value, in insertion order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentRule {
    entries: Vec<(String, String)>,
}

impl AgentRule {
    /// A rule from key/value pairs; a repeated key overwrites the earlier value in place, as
    /// building a Python dict does.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let mut r = AgentRule::default();
        for (k, v) in pairs {
            r.insert(k.into(), v.into());
        }
        r
    }

    /// `{'action': policy}`, the rule the agent appends after the numbered ones.
    pub fn policy(action: &str) -> Self {
        Self::from_pairs([("action", action)])
    }

    fn insert(&mut self, k: String, v: String) {
        if let Some(slot) = self.entries.iter_mut().find(|(ek, _)| *ek == k) {
            slot.1 = v;
        } else {
            self.entries.push((k, v));
        }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn contains(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(k, _)| k.as_str())
    }

    /// Options the agent does not support, sorted (upstream prints a Python set, whose order
    /// is arbitrary).
    pub fn unsupported(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .keys()
            .filter(|k| !SUPPORTED_OPTS.contains(k))
            .collect();
        v.sort_unstable();
        v
    }

    /// The per-rule checks that `prepare_rules` makes before it writes anything, in its order.
    pub fn check(&self, family: Family) -> Result<(), RuleParseError> {
        let unsupported = self.unsupported();
        if !unsupported.is_empty() {
            let set: Vec<String> = unsupported.iter().map(|k| format!("'{k}'")).collect();
            return perr(format!(
                "Unsupported rule option(s): {{{}}}",
                set.join(", ")
            ));
        }
        if self.contains("dst4") && family == Family::V6 {
            return perr("IPv4 rule found for IPv6 address");
        }
        if self.contains("dst6") && family == Family::V4 {
            return perr("dst6 rule found for IPv4 address");
        }
        match self.get("action") {
            Some("accept") | Some("drop") => Ok(()),
            Some(other) => perr(format!("Invalid rule action {other}")),
            None => perr("Rule lacks action"),
        }
    }

    /// The typed form of this rule for one address family. Fails where the agent fails
    /// ([`AgentRule::check`]) and where the agent would hand nft a value it cannot load.
    pub fn to_match(&self, family: Family) -> Result<MatchRule, RuleParseError> {
        self.check(family)?;
        let action = match self.get("action") {
            Some("accept") => Action::Accept,
            _ => Action::Drop,
        };
        let proto = match self.get("proto") {
            None => None,
            Some("tcp") => Some(Proto::Tcp),
            Some("udp") => Some(Proto::Udp),
            Some("icmp") => Some(Proto::Icmp),
            Some(other) => return perr(format!("Unsupported protocol {other}")),
        };
        let dst = if let Some(v) = self.get("dst4") {
            let (a, p) = parse_net(v, 32, inet_pton4)
                .ok_or_else(|| RuleParseError(format!("Invalid dst4 value {v}")))?;
            Some(MatchDst::V4(a, p))
        } else if let Some(v) = self.get("dst6") {
            let (a, p) = parse_net(v, 128, inet_pton6)
                .ok_or_else(|| RuleParseError(format!("Invalid dst6 value {v}")))?;
            Some(MatchDst::V6(a, p))
        } else {
            self.get("dsthost").map(|h| MatchDst::Host(h.to_string()))
        };
        let dstports = match self.get("dstports") {
            None => None,
            Some(v) => Some(
                parse_ports(v)
                    .ok_or_else(|| RuleParseError(format!("Invalid dstports value {v}")))?,
            ),
        };
        let dns = match self.get("specialtarget") {
            None => false,
            Some("dns") => true,
            Some(other) => return perr(format!("Unsupported special target {other}")),
        };
        let icmptype = match self.get("icmptype") {
            None => None,
            Some(v) => Some(
                v.parse::<u8>()
                    .ok()
                    .filter(|_| v.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| RuleParseError(format!("Invalid icmptype value {v}")))?,
            ),
        };
        Ok(MatchRule {
            action,
            proto,
            dst,
            dstports,
            dns,
            icmptype,
        })
    }
}

fn parse_net<A>(v: &str, max: u8, parse: fn(&str) -> Option<A>) -> Option<(A, u8)> {
    match v.split_once('/') {
        None => parse(v).map(|a| (a, max)),
        Some((a, p)) => {
            if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let p: u8 = p.parse().ok()?;
            (p <= max).then_some(())?;
            parse(a).map(|a| (a, p))
        }
    }
}

fn parse_ports(v: &str) -> Option<DstPorts> {
    let num = |s: &str| -> Option<u16> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (lo, hi) = match v.split_once('-') {
        None => (num(v)?, num(v)?),
        Some((a, b)) => (num(a)?, num(b)?),
    };
    (lo <= hi).then_some(DstPorts { lo, hi })
}

/// A rule's destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MatchDst {
    V4(Ipv4Addr, u8),
    V6(Ipv6Addr, u8),
    /// A host name; its addresses come from a resolver.
    Host(String),
}

/// A typed agent rule: what a packet must look like to match.
///
/// Semantics follow the nft text the agent generates (reference 3.3): `dstports` without
/// `proto` means TCP or UDP; `dns` means "destination is a DNS server, port 53, TCP or UDP",
/// and with `dstports` other than 53 the rule is skipped entirely.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MatchRule {
    pub action: Action,
    pub proto: Option<Proto>,
    pub dst: Option<MatchDst>,
    pub dstports: Option<DstPorts>,
    pub dns: bool,
    pub icmptype: Option<u8>,
}

/// `read_rules(target)`: the entries under `/qubes-firewall/<target>/` to a rule list.
///
/// Keys may be full QubesDB paths or bare (`policy`, `0000`). The policy is appended as the last
/// rule. Where upstream crashes on a malformed rule string (`dict()` on an element without
/// exactly one `=`), this returns Python's message as a parse error, so the client is blocked
/// instead of the service dying.
pub fn read_rules<'a>(
    entries: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Vec<AgentRule>, RuleParseError> {
    // Sorted by key, a later entry with the same key winning, as the Python dict
    // comprehension and `sorted()` give.
    let mut map: std::collections::BTreeMap<&str, &str> = std::collections::BTreeMap::new();
    for (k, v) in entries {
        let key = if k.starts_with('/') {
            k.split('/').nth(3).unwrap_or("")
        } else {
            k
        };
        map.insert(key, v);
    }
    let Some(policy) = map.remove("policy") else {
        return perr("No 'policy' defined");
    };
    let mut rules = Vec::with_capacity(map.len() + 1);
    for (ruleno, rule) in map {
        if ruleno.len() != 4 || !ruleno.bytes().all(|b| b.is_ascii_digit()) {
            return perr(format!("Unexpected non-rule found: {ruleno}={rule}"));
        }
        let mut r = AgentRule::default();
        for (i, elem) in rule.split(' ').enumerate() {
            let parts: Vec<&str> = elem.split('=').collect();
            if parts.len() != 2 {
                return perr(format!(
                    "dictionary update sequence element #{i} has length {}; 2 is required",
                    parts.len()
                ));
            }
            r.insert(parts[0].to_string(), parts[1].to_string());
        }
        if !r.contains("action") {
            return perr(format!("Rule '{rule}' lack action"));
        }
        rules.push(r);
    }
    rules.push(AgentRule::policy(policy));
    Ok(rules)
}

/// `chain_for_addr`: the nft chain name for a client address.
pub fn chain_for_addr(addr: &str) -> String {
    format!("qbs-{}", addr.replace(['.', ':'], "-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(entries: &[(&str, &str)]) -> Result<Vec<AgentRule>, RuleParseError> {
        read_rules(entries.iter().copied())
    }

    #[test]
    fn upstream_read_rules_example() {
        let r = rules(&[
            ("/qubes-firewall/10.137.0.1/policy", "accept"),
            (
                "/qubes-firewall/10.137.0.1/0000",
                "proto=tcp dstports=80-80 action=drop",
            ),
            (
                "/qubes-firewall/10.137.0.1/0001",
                "proto=udp specialtarget=dns action=accept",
            ),
            ("/qubes-firewall/10.137.0.1/0002", "proto=udp action=drop"),
        ])
        .expect("valid");
        assert_eq!(r.len(), 4);
        assert_eq!(
            r[0],
            AgentRule::from_pairs([("proto", "tcp"), ("dstports", "80-80"), ("action", "drop")])
        );
        assert_eq!(r[3], AgentRule::policy("accept"));
    }

    #[test]
    fn read_rules_errors_are_upstreams() {
        assert_eq!(
            rules(&[("0000", "proto=tcp action=accept")]),
            Err(RuleParseError("No 'policy' defined".into()))
        );
        assert_eq!(
            rules(&[("policy", "drop"), ("0000", "proto=tcp")]),
            Err(RuleParseError("Rule 'proto=tcp' lack action".into()))
        );
        assert_eq!(
            rules(&[("policy", "drop"), ("10000", "action=accept")]),
            Err(RuleParseError(
                "Unexpected non-rule found: 10000=action=accept".into()
            ))
        );
    }

    #[test]
    fn chain_names() {
        assert_eq!(chain_for_addr("10.137.0.1"), "qbs-10-137-0-1");
        assert_eq!(
            chain_for_addr("fd09:24ef:4179:0000::3"),
            "qbs-fd09-24ef-4179-0000--3"
        );
        assert_eq!(chain_for_addr("2000::a"), "qbs-2000--a");
    }

    #[test]
    fn chain_names_keep_the_address_text() {
        // Upstream replaces '.' and ':' in the QubesDB text and nothing else: no
        // compression, no case folding, so each spelling of one address names its own chain.
        for (addr, chain) in [
            ("fd09:24ef:4179:0000::3", "qbs-fd09-24ef-4179-0000--3"),
            ("fd09:24ef:4179::3", "qbs-fd09-24ef-4179--3"),
            ("fd09:24ef:4179::a89:3", "qbs-fd09-24ef-4179--a89-3"),
            ("FD09:24EF:4179::A89:3", "qbs-FD09-24EF-4179--A89-3"),
            (
                "fd09:24ef:4179:0:0:0:a89:3",
                "qbs-fd09-24ef-4179-0-0-0-a89-3",
            ),
            ("::ffff:10.137.0.5", "qbs---ffff-10-137-0-5"),
            ("10.137.0.5", "qbs-10-137-0-5"),
        ] {
            assert_eq!(chain_for_addr(addr), chain, "{addr}");
        }
    }

    #[test]
    fn prepare_rules_checks() {
        let r = AgentRule::from_pairs([("action", "accept"), ("dpi", "NO")]);
        assert_eq!(
            r.check(Family::V4),
            Err(RuleParseError("Unsupported rule option(s): {'dpi'}".into()))
        );
        let r = AgentRule::from_pairs([("action", "reject")]);
        assert_eq!(
            r.check(Family::V4),
            Err(RuleParseError("Invalid rule action reject".into()))
        );
        let r = AgentRule::from_pairs([("action", "accept"), ("dst6", "a::b")]);
        assert!(r.check(Family::V4).is_err());
        let r = AgentRule::from_pairs([("action", "accept"), ("dst4", "3.3.3.3")]);
        assert!(r.check(Family::V6).is_err());
    }
}
