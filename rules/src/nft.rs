//! The netvm agent's nftables input (`qubesagent/firewall.py`, `NftablesWorker`).
//!
//! Every function here returns the exact text upstream feeds to `nft -f /dev/stdin`, byte for
//! byte (qubes-core-agent-linux `qubesagent/firewall.py`, `NftablesWorker`; its
//! `test_firewall.py` holds the samples). Nothing here runs `nft`;
//! the caller does, and maps a failure to `RuleApplyError('nft failed: ...')`.
//!
//! Upstream resolves `dsthost` names with `socket.getaddrinfo` in the middle of the translation;
//! here that is the [`Resolver`] trait, so the translation stays pure and testable
//! ([`StaticResolver`] for tests and fixtures).

use std::net::{IpAddr, Ipv6Addr};

use crate::agent::{chain_for_addr, AgentRule, RuleParseError};
use crate::py;
use crate::rule::Family;

/// The nft table the agent owns, in both the `ip` and the `ip6` family (reference 3.3).
pub const TABLE: &str = "qubes-firewall";

/// The `str(socket.gaierror)` text for `EAI_NONAME`: the name does not exist (reference 7.3).
pub const EAI_NONAME: &str = "[Errno -2] Name or service not known";

/// The `str(socket.gaierror)` text for `EAI_NODATA`: the name exists but has no address of the
/// requested family (glibc's answer to an `AF_INET6` lookup of a name without AAAA record).
pub const EAI_NODATA: &str = "[Errno -5] No address associated with hostname";

/// The nft family keyword of an address family: `ip` or `ip6` (`P` in the table of
/// reference 3.3).
pub fn family_keyword(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

/// The full-length mask upstream appends to a resolved address (`fullmask`, reference 3.3).
fn full_mask(family: Family) -> &'static str {
    match family {
        Family::V4 => "/32",
        Family::V6 => "/128",
    }
}

/// What a refused packet gets: the nft verdict of `action=drop` (reference 3.3 table).
fn reject_verdict(family: Family) -> &'static str {
    match family {
        Family::V4 => "reject with icmp type admin-prohibited",
        Family::V6 => "reject with icmpv6 type admin-prohibited",
    }
}

/// Name resolution for `dsthost` rules: upstream's
/// `socket.getaddrinfo(name, None, AF_INET or AF_INET6)` (reference 3.3, "DNS names").
pub trait Resolver {
    /// The addresses of `name` in `family`, in the resolver's order (duplicates allowed; the
    /// caller removes them).
    ///
    /// The error is the text Python prints for the `socket.gaierror`, e.g. [`EAI_NONAME`]
    /// (`[Errno -2] Name or service not known`); it ends up in
    /// `Failed to resolve {name}: {err}` (reference 3.3, 7.3).
    fn resolve(&self, name: &str, family: Family) -> Result<Vec<IpAddr>, String>;
}

/// A fixed name → addresses table, standing in for DNS in tests and offline fixtures (upstream's
/// tests mock `getaddrinfo` the same way, reference 3.4 and 7.3).
///
/// Lookups are exact (case-sensitive) string matches. Like glibc's `getaddrinfo`:
/// an unknown name fails with [`EAI_NONAME`]; a known name without an address of the requested
/// family fails with [`EAI_NODATA`]; otherwise the addresses of that family come back in
/// insertion order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StaticResolver {
    entries: Vec<(String, Vec<IpAddr>)>,
}

impl StaticResolver {
    /// An empty table: every name is unknown.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builder form of [`StaticResolver::insert`].
    pub fn with(mut self, name: impl Into<String>, addr: IpAddr) -> Self {
        self.insert(name, addr);
        self
    }

    /// Adds `addr` to the addresses of `name` (after the ones already there).
    pub fn insert(&mut self, name: impl Into<String>, addr: IpAddr) {
        let name = name.into();
        match self.entries.iter_mut().find(|(n, _)| *n == name) {
            Some((_, addrs)) => addrs.push(addr),
            None => self.entries.push((name, vec![addr])),
        }
    }
}

impl Resolver for StaticResolver {
    fn resolve(&self, name: &str, family: Family) -> Result<Vec<IpAddr>, String> {
        let Some((_, addrs)) = self.entries.iter().find(|(n, _)| n == name) else {
            return Err(EAI_NONAME.to_string());
        };
        let found: Vec<IpAddr> = addrs
            .iter()
            .copied()
            .filter(|a| addr_family(a) == family)
            .collect();
        if found.is_empty() {
            Err(EAI_NODATA.to_string())
        } else {
            Ok(found)
        }
    }
}

fn addr_family(addr: &IpAddr) -> Family {
    match addr {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

/// The DNS servers of one family, in order: what upstream's `dns_addresses(family)` yields from
/// the firewall VM's own `/etc/resolv.conf` (reference 3.3, "dns-addr content").
pub fn dns_servers(family: Family, servers: &[IpAddr]) -> Vec<IpAddr> {
    servers
        .iter()
        .copied()
        .filter(|a| addr_family(a) == family)
        .collect()
}

/// An address as glibc's `inet_ntop` writes it, which is what Python's `getaddrinfo` returns
/// (the `item[4][0]` of reference 3.3 "DNS names").
///
/// Rust's `Display` agrees except for the deprecated IPv4-compatible form (`::a.b.c.d`), which
/// glibc prints with a dotted quad.
pub fn ntop(addr: &IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => ntop6(a),
    }
}

fn ntop6(addr: &Ipv6Addr) -> String {
    let words = addr.segments();
    // The longest run of zero words (the first one on a tie), if at least two long.
    let (mut best_base, mut best_len) = (0usize, 0usize);
    let mut i = 0;
    while i < 8 {
        if words[i] == 0 {
            let start = i;
            while i < 8 && words[i] == 0 {
                i += 1;
            }
            if i - start > best_len {
                best_base = start;
                best_len = i - start;
            }
        } else {
            i += 1;
        }
    }
    let run = if best_len >= 2 {
        Some(best_base..best_base + best_len)
    } else {
        None
    };
    let mut out = String::with_capacity(39);
    for (i, w) in words.iter().enumerate() {
        if let Some(r) = &run {
            if r.contains(&i) {
                if i == r.start {
                    out.push(':');
                }
                continue;
            }
        }
        if i != 0 {
            out.push(':');
        }
        let embedded_v4 = run.as_ref().is_some_and(|r| {
            r.start == 0 && (r.len() == 6 || (r.len() == 5 && words[5] == 0xffff))
        });
        if i == 6 && embedded_v4 {
            let o = addr.octets();
            out.push_str(&format!("{}.{}.{}.{}", o[12], o[13], o[14], o[15]));
            return out;
        }
        out.push_str(&format!("{w:x}"));
    }
    if run.is_some_and(|r| r.end == 8) {
        out.push(':');
    }
    out
}

/// `init()`: creates both tables, `ip` then `ip6`, each with the `dns-addr` set, the empty
/// `qubes-forward` chain and the three base chains (reference 3.3, upstream test_006).
pub fn init_text() -> String {
    let mut out = String::new();
    for (family, addr_type) in [("ip", "ipv4_addr"), ("ip6", "ipv6_addr")] {
        out.push_str(&format!(
            "table {family} {TABLE} {{\n\
             \x20 set dns-addr {{\n\
             \x20   type {addr_type}\n\
             \x20 }}\n\
             \x20 chain qubes-forward {{\n\
             \x20 }}\n\
             \x20 chain forward {{\n\
             \x20   type filter hook forward priority 0;\n\
             \x20   policy drop;\n\
             \x20   ct state established,related accept\n\
             \x20   meta iifname != \"vif*\" accept\n\
             \x20   jump qubes-forward\n\
             \x20 }}\n\
             \x20 chain prerouting {{\n\
             \x20   type filter hook prerouting priority -300;\n\
             \x20   policy accept;\n\
             \x20 }}\n\
             \x20 chain postrouting {{\n\
             \x20   type filter hook postrouting priority -300;\n\
             \x20   policy accept;\n\
             \x20 }}\n\
             }}\n"
        ));
    }
    out
}

/// `cleanup()`: deletes both tables, run when the service stops (reference 3.3).
pub fn cleanup_text() -> String {
    format!("delete table ip {TABLE}\ndelete table ip6 {TABLE}\n")
}

/// `create_chain(addr, chain, family)`: the per-client chain and the `qubes-forward` jump to it
/// (reference 3.3). The chain name is [`chain_for_addr`]; `addr` is used verbatim.
///
/// Upstream emits this once per client and process lifetime, before the client's first
/// [`prepare_rules`] text; tracking that is the caller's job.
pub fn create_chain_text(addr: &str, family: Family) -> String {
    let p = family_keyword(family);
    let chain = chain_for_addr(addr);
    format!(
        "table {p} {TABLE} {{\n\
         \x20 chain {chain} {{\n\
         \x20 }}\n\
         \x20 chain qubes-forward {{\n\
         \x20   {p} saddr {addr} jump {chain}\n\
         \x20 }}\n\
         }}\n"
    )
}

/// How upstream's `get_connected_ips` splits the `/connected-ips` or `/connected-ips6` value:
/// Python's `str.split()`, on runs of white space, without empty items (reference 3.3).
/// A missing key is the same as an empty one.
pub fn split_connected_ips(value: Option<&str>) -> Vec<&str> {
    value
        .unwrap_or("")
        .split(|c: char| py::is_space(c) || (!c.is_ascii() && c.is_whitespace()))
        .filter(|s| !s.is_empty())
        .collect()
}

/// `update_connected_ips(family)`: anti-spoofing for the addresses of connected clients
/// (reference 3.3, upstream test_008/009/010).
///
/// Always flushes `prerouting` and `postrouting`; with addresses, adds one drop rule to each,
/// the addresses written `{a, b}` (no spaces inside the braces, unlike the other sets).
pub fn connected_ips_text(family: Family, ips: &[&str]) -> String {
    let p = family_keyword(family);
    let mut out = format!(
        "flush chain {p} {TABLE} prerouting\n\
         flush chain {p} {TABLE} postrouting\n"
    );
    if !ips.is_empty() {
        let set = format!("{{{}}}", ips.join(", "));
        out.push_str(&format!(
            "table {p} {TABLE} {{\n\
             \x20 chain prerouting {{\n\
             \x20   iifname != \"vif*\" {p} saddr {set} drop\n\
             \x20 }}\n\
             \x20 chain postrouting {{\n\
             \x20   oifname != \"vif*\" {p} daddr {set} drop\n\
             \x20 }}\n\
             }}\n"
        ));
    }
    out
}

/// The outcome of [`prepare_rules_with_dns`]: the nft input and the names it resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PreparedRules {
    /// The nft input, as [`prepare_rules`] returns it.
    pub text: String,
    /// Every `dsthost` name translated, in first-seen order, with its rendered addresses
    /// (`a/32`, `x/128`) in the order they appear in the rule. Upstream's second return value,
    /// which `update_dns_info` writes to `/dns/<src>/<name>` (reference 3.3).
    pub dns: Vec<(String, Vec<String>)>,
}

/// `prepare_rules(chain, rules, family)`: the nft input that refills the `dns-addr` set and
/// replaces the contents of one client chain (reference 3.3, samples 3.4).
///
/// `dns` are the firewall VM's own name servers; only those of `family` are used, and when
/// there are none the `add element` line is commented out. Each rule is translated per the
/// table of reference 3.3; the first rule that fails makes the whole call fail, and the caller
/// then applies [`fallback_rules`] (reference 3.2 `handle_addr`).
pub fn prepare_rules(
    chain: &str,
    rules: &[AgentRule],
    family: Family,
    dns: &[IpAddr],
    resolver: &dyn Resolver,
) -> Result<String, RuleParseError> {
    prepare_rules_with_dns(chain, rules, family, dns, resolver).map(|p| p.text)
}

/// [`prepare_rules`], also returning the resolved names (upstream's `(nft, ret_dns)` tuple,
/// reference 3.3 `update_dns_info`).
pub fn prepare_rules_with_dns(
    chain: &str,
    rules: &[AgentRule],
    family: Family,
    dns: &[IpAddr],
    resolver: &dyn Resolver,
) -> Result<PreparedRules, RuleParseError> {
    let p = family_keyword(family);
    let servers: Vec<String> = dns_servers(family, dns).iter().map(ntop).collect();
    let comment = if servers.is_empty() { "#" } else { "" };

    let mut lines: Vec<String> = Vec::new();
    let mut resolved: Vec<(String, Vec<String>)> = Vec::new();
    for rule in rules {
        translate_rule(rule, family, resolver, &mut lines, &mut resolved)?;
    }

    // Upstream's template is `'   {rules}\n'` with the rules joined by `'\n   '`; each rule
    // starts with a space, hence the 4-space indent (and a 3-space line if there is none).
    let text = format!(
        "flush set {p} {TABLE} dns-addr\n\
         {comment}add element {p} {TABLE} dns-addr {{ {servers} }}\n\
         flush chain {p} {TABLE} {chain}\n\
         table {p} {TABLE} {{\n\
         \x20 chain {chain} {{\n\
         \x20  {rules}\n\
         \x20 }}\n\
         }}\n",
        servers = servers.join(", "),
        rules = lines.join("\n   "),
    );
    Ok(PreparedRules {
        text,
        dns: resolved,
    })
}

/// One rule of [`prepare_rules`] to zero, one or two nft rule strings (each beginning with a
/// space), in the order of the reference 3.3 table.
fn translate_rule(
    rule: &AgentRule,
    family: Family,
    resolver: &dyn Resolver,
    lines: &mut Vec<String>,
    resolved: &mut Vec<(String, Vec<String>)>,
) -> Result<(), RuleParseError> {
    // Unsupported options, then dst4/dst6 against the family, then the action.
    rule.check(family)?;
    let action = match rule.get("action") {
        Some("accept") => "accept",
        Some("drop") => reject_verdict(family),
        Some(other) => return Err(RuleParseError(format!("Invalid rule action {other}"))),
        None => return Err(RuleParseError("Rule lacks action".to_string())),
    };
    let p = family_keyword(family);
    let mut nft = String::new();

    if let Some(proto) = rule.get("proto") {
        match family {
            Family::V4 => nft.push_str(&format!(" ip protocol {proto}")),
            Family::V6 => {
                let proto = if proto == "icmp" { "icmpv6" } else { proto };
                nft.push_str(&format!(" ip6 nexthdr {proto}"));
            }
        }
    }

    if let Some(dst) = rule.get("dst4") {
        nft.push_str(&format!(" ip daddr {dst}"));
    } else if let Some(dst) = rule.get("dst6") {
        nft.push_str(&format!(" ip6 daddr {dst}"));
    } else if let Some(host) = rule.get("dsthost") {
        let addrs = resolve_host(host, family, resolver)?;
        nft.push_str(&format!(" {p} daddr {{ {} }}", addrs.join(", ")));
        // A Python dict: a repeated name keeps its first position and takes the new value.
        match resolved.iter_mut().find(|(h, _)| h == host) {
            Some(slot) => slot.1 = addrs,
            None => resolved.push((host.to_string(), addrs)),
        }
    }

    let mut dstports = rule.get("dstports").map(collapse_ports);

    if rule.get("specialtarget") == Some("dns") {
        match dstports {
            None | Some("53") => dstports = Some("53"),
            // DNS on another port can never match: the rule is dropped, not refused.
            Some(_) => return Ok(()),
        }
        nft.push_str(&format!(" {p} daddr @dns-addr"));
    }

    if let Some(icmptype) = rule.get("icmptype") {
        match family {
            Family::V4 => nft.push_str(&format!(" icmp type {icmptype}")),
            Family::V6 => nft.push_str(&format!(" icmpv6 type {icmptype}")),
        }
    }

    match (dstports, rule.get("proto")) {
        // nft cannot say "tcp dport X or udp dport X" in one rule: two rules.
        (Some(ports), None) => {
            lines.push(format!("{nft} tcp dport {ports} {action}"));
            lines.push(format!("{nft} udp dport {ports} {action}"));
        }
        (Some(ports), Some(proto)) => lines.push(format!("{nft} {proto} dport {ports} {action}")),
        (None, _) => lines.push(format!("{nft} {action}")),
    }
    Ok(())
}

/// Upstream's `dstports` shortening: `a-a` becomes `a` (any value whose `-`-separated parts
/// are all equal becomes its first part); anything else stays verbatim.
fn collapse_ports(ports: &str) -> &str {
    let mut parts = ports.split('-');
    let first = parts.next().unwrap_or(ports);
    if parts.all(|p| p == first) {
        first
    } else {
        ports
    }
}

/// `dsthost` to the rendered, deduplicated address list: Python's IDNA encoding check, then the
/// resolver (reference 3.3 "DNS names", 7.3).
fn resolve_host(
    host: &str,
    family: Family,
    resolver: &dyn Resolver,
) -> Result<Vec<String>, RuleParseError> {
    if let Err(why) = idna_ascii_check(host) {
        return Err(RuleParseError(format!(
            "Invalid destination {host}: encoding with 'idna' codec failed (UnicodeError: {why})"
        )));
    }
    let addrs = resolver
        .resolve(host, family)
        .map_err(|e| RuleParseError(format!("Failed to resolve {host}: {e}")))?;
    let mask = full_mask(family);
    let mut out: Vec<String> = Vec::new();
    // getaddrinfo(AF_INET/AF_INET6) only returns that family; a resolver that returns other
    // addresses has them ignored rather than written into the wrong table.
    for a in addrs.iter().filter(|a| addr_family(a) == family) {
        let s = format!("{}{mask}", ntop(a));
        if !out.contains(&s) {
            out.push(s);
        }
    }
    if out.is_empty() {
        // getaddrinfo never succeeds with no address; `{  }` would only make nft fail later.
        return Err(RuleParseError(format!(
            "Failed to resolve {host}: {EAI_NODATA}"
        )));
    }
    Ok(out)
}

/// The label check of Python's `idna` codec on an ASCII name (the codec's fast path), which
/// `socket.getaddrinfo` runs before any lookup: every label but the last must be 1..=63
/// characters, the last at most 63 (it may be empty: a trailing dot).
///
/// Names with non-ASCII characters take the codec's nameprep/punycode path, which is not
/// reproduced: they go to the resolver unchanged.
fn idna_ascii_check(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || !name.is_ascii() {
        return Ok(());
    }
    let labels: Vec<&str> = name.split('.').collect();
    if let Some((last, rest)) = labels.split_last() {
        if rest.iter().any(|l| l.is_empty() || l.len() >= 64) {
            return Err("label empty or too long");
        }
        if last.len() >= 64 {
            return Err("label too long");
        }
    }
    Ok(())
}

/// The value `update_dns_info` writes to `/dns/<src>/<name>`: `str()` of the Python set of
/// rendered addresses, e.g. `{'93.184.215.14/32'}` (reference 3.3).
///
/// Upstream's set order is arbitrary; this keeps the given order.
pub fn dns_info_value(addrs: &[String]) -> String {
    if addrs.is_empty() {
        return "set()".to_string();
    }
    let items: Vec<String> = addrs.iter().map(|a| py::repr(a)).collect();
    format!("{{{}}}", items.join(", "))
}

/// The rules `handle_addr` applies when a client's rules cannot be parsed or applied:
/// `[{'action': 'drop'}]`, i.e. block everything (reference 3.2).
pub fn fallback_rules() -> Vec<AgentRule> {
    vec![AgentRule::policy("drop")]
}

/// The log line and desktop notification of `handle_addr` on a [`RuleParseError`]:
/// `Failed to parse rules for {addr} ({err}), blocking traffic` (reference 3.2).
pub fn parse_failure_message(addr: &str, err: &RuleParseError) -> String {
    err.blocking_message(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pairs: &[(&str, &str)]) -> AgentRule {
        AgentRule::from_pairs(pairs.iter().copied())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn dns4() -> Vec<IpAddr> {
        vec![ip("1.1.1.1"), ip("2.2.2.2")]
    }

    fn dns6() -> Vec<IpAddr> {
        vec![ip("2001::1"), ip("2001::2")]
    }

    /// The chain body lines of a `prepare_rules` text.
    fn body(text: &str) -> Vec<&str> {
        let lines: Vec<&str> = text.lines().collect();
        lines[5..lines.len() - 2].to_vec()
    }

    #[test]
    fn sample_1_test_002_prepare_rules4() {
        let rules = [
            rule(&[
                ("action", "accept"),
                ("proto", "tcp"),
                ("dstports", "80-80"),
                ("dst4", "1.2.3.0/24"),
            ]),
            rule(&[
                ("action", "accept"),
                ("proto", "udp"),
                ("dstports", "443-1024"),
                ("dsthost", "yum.qubes-os.org"),
            ]),
            rule(&[("action", "accept"), ("specialtarget", "dns")]),
            rule(&[
                ("action", "drop"),
                ("proto", "udp"),
                ("specialtarget", "dns"),
            ]),
            rule(&[("action", "drop"), ("proto", "icmp")]),
            rule(&[("action", "drop")]),
        ];
        let res = StaticResolver::new().with("yum.qubes-os.org", ip("193.219.28.150"));
        let expected = "flush set ip qubes-firewall dns-addr\n\
add element ip qubes-firewall dns-addr { 1.1.1.1, 2.2.2.2 }\n\
flush chain ip qubes-firewall chain\n\
table ip qubes-firewall {\n\
\x20 chain chain {\n\
\x20   ip protocol tcp ip daddr 1.2.3.0/24 tcp dport 80 accept\n\
\x20   ip protocol udp ip daddr { 193.219.28.150/32 } udp dport 443-1024 accept\n\
\x20   ip daddr @dns-addr tcp dport 53 accept\n\
\x20   ip daddr @dns-addr udp dport 53 accept\n\
\x20   ip protocol udp ip daddr @dns-addr udp dport 53 reject with icmp type admin-prohibited\n\
\x20   ip protocol icmp reject with icmp type admin-prohibited\n\
\x20   reject with icmp type admin-prohibited\n\
\x20 }\n\
}\n";
        let got = prepare_rules_with_dns("chain", &rules, Family::V4, &dns4(), &res)
            .expect("valid rules");
        assert_eq!(got.text, expected);
        assert_eq!(
            got.dns,
            vec![(
                "yum.qubes-os.org".to_string(),
                vec!["193.219.28.150/32".to_string()]
            )]
        );
        // Upstream's three negative checks of the same test.
        for (rules, fam) in [
            (vec![rule(&[("unknown", "xxx")])], Family::V4),
            (vec![rule(&[("dst6", "a::b")])], Family::V4),
            (vec![rule(&[("dst4", "3.3.3.3")])], Family::V6),
        ] {
            assert!(prepare_rules("chain", &rules, fam, &dns4(), &res).is_err());
        }
    }

    #[test]
    fn sample_2_test_003_prepare_rules6() {
        let rules = [
            rule(&[
                ("action", "accept"),
                ("proto", "tcp"),
                ("dstports", "80-80"),
                ("dst6", "a::b/128"),
            ]),
            rule(&[
                ("action", "accept"),
                ("proto", "tcp"),
                ("dsthost", "ripe.net"),
            ]),
            rule(&[("action", "accept"), ("specialtarget", "dns")]),
            rule(&[
                ("action", "drop"),
                ("proto", "udp"),
                ("specialtarget", "dns"),
            ]),
            rule(&[("action", "drop"), ("proto", "icmp"), ("icmptype", "128")]),
            rule(&[("action", "drop")]),
        ];
        let res = StaticResolver::new()
            .with("ripe.net", ip("193.0.11.51"))
            .with("ripe.net", ip("2001:67c:2e8:25::c100:b33"));
        let expected = "flush set ip6 qubes-firewall dns-addr\n\
add element ip6 qubes-firewall dns-addr { 2001::1, 2001::2 }\n\
flush chain ip6 qubes-firewall chain\n\
table ip6 qubes-firewall {\n\
\x20 chain chain {\n\
\x20   ip6 nexthdr tcp ip6 daddr a::b/128 tcp dport 80 accept\n\
\x20   ip6 nexthdr tcp ip6 daddr { 2001:67c:2e8:25::c100:b33/128 } accept\n\
\x20   ip6 daddr @dns-addr tcp dport 53 accept\n\
\x20   ip6 daddr @dns-addr udp dport 53 accept\n\
\x20   ip6 nexthdr udp ip6 daddr @dns-addr udp dport 53 reject with icmpv6 type admin-prohibited\n\
\x20   ip6 nexthdr icmpv6 icmpv6 type 128 reject with icmpv6 type admin-prohibited\n\
\x20   reject with icmpv6 type admin-prohibited\n\
\x20 }\n\
}\n";
        let all_dns: Vec<IpAddr> = dns4().into_iter().chain(dns6()).collect();
        let got = prepare_rules_with_dns("chain", &rules, Family::V6, &all_dns, &res)
            .expect("valid rules");
        assert_eq!(got.text, expected);
        assert_eq!(
            got.dns,
            vec![(
                "ripe.net".to_string(),
                vec!["2001:67c:2e8:25::c100:b33/128".to_string()]
            )]
        );
    }

    #[test]
    fn sample_3_default_qube() {
        let rules = [AgentRule::policy("accept"), AgentRule::policy("drop")];
        let chain = chain_for_addr("10.137.0.5");
        assert_eq!(chain, "qbs-10-137-0-5");
        let got = prepare_rules(&chain, &rules, Family::V4, &dns4(), &StaticResolver::new())
            .expect("valid rules");
        assert_eq!(
            got,
            "flush set ip qubes-firewall dns-addr\n\
add element ip qubes-firewall dns-addr { 1.1.1.1, 2.2.2.2 }\n\
flush chain ip qubes-firewall qbs-10-137-0-5\n\
table ip qubes-firewall {\n\
\x20 chain qbs-10-137-0-5 {\n\
\x20   accept\n\
\x20   reject with icmp type admin-prohibited\n\
\x20 }\n\
}\n"
        );
    }

    #[test]
    fn sample_4_gui_limit_outgoing() {
        let rules = [
            rule(&[("action", "accept"), ("dsthost", "example.com")]),
            rule(&[("action", "accept"), ("specialtarget", "dns")]),
            rule(&[("action", "accept"), ("proto", "icmp")]),
            rule(&[("action", "drop")]),
            AgentRule::policy("drop"),
        ];
        let res = StaticResolver::new().with("example.com", ip("93.184.215.14"));
        let got = prepare_rules("qbs-10-137-0-5", &rules, Family::V4, &dns4(), &res)
            .expect("valid rules");
        assert_eq!(
            body(&got),
            [
                "    ip daddr { 93.184.215.14/32 } accept",
                "    ip daddr @dns-addr tcp dport 53 accept",
                "    ip daddr @dns-addr udp dport 53 accept",
                "    ip protocol icmp accept",
                "    reject with icmp type admin-prohibited",
                "    reject with icmp type admin-prohibited",
            ]
        );
    }

    #[test]
    fn sample_5_dstports_without_proto() {
        let rules = [rule(&[
            ("action", "accept"),
            ("dst4", "10.0.0.0/8"),
            ("dstports", "1-1024"),
        ])];
        let got = prepare_rules("c", &rules, Family::V4, &dns4(), &StaticResolver::new())
            .expect("valid rules");
        assert_eq!(
            body(&got),
            [
                "    ip daddr 10.0.0.0/8 tcp dport 1-1024 accept",
                "    ip daddr 10.0.0.0/8 udp dport 1-1024 accept",
            ]
        );
    }

    #[test]
    fn sample_6_specialtarget_dns_ports() {
        let skipped = [
            rule(&[
                ("action", "accept"),
                ("specialtarget", "dns"),
                ("proto", "tcp"),
                ("dstports", "80-80"),
            ]),
            AgentRule::policy("drop"),
        ];
        let got = prepare_rules("c", &skipped, Family::V4, &dns4(), &StaticResolver::new())
            .expect("valid rules");
        assert_eq!(body(&got), ["    reject with icmp type admin-prohibited"]);

        let kept = [rule(&[
            ("action", "accept"),
            ("specialtarget", "dns"),
            ("proto", "udp"),
            ("dstports", "53-53"),
        ])];
        let got = prepare_rules("c", &kept, Family::V4, &dns4(), &StaticResolver::new())
            .expect("valid rules");
        assert_eq!(
            body(&got),
            ["    ip protocol udp ip daddr @dns-addr udp dport 53 accept"]
        );
    }

    #[test]
    fn sample_7_v6_without_nameserver() {
        let rules = [
            rule(&[("action", "accept"), ("proto", "icmp"), ("icmptype", "8")]),
            AgentRule::policy("drop"),
        ];
        let chain = chain_for_addr("fd09:24ef:4179::a89:5");
        let got = prepare_rules(&chain, &rules, Family::V6, &dns4(), &StaticResolver::new())
            .expect("valid rules");
        assert_eq!(
            got,
            "flush set ip6 qubes-firewall dns-addr\n\
#add element ip6 qubes-firewall dns-addr {  }\n\
flush chain ip6 qubes-firewall qbs-fd09-24ef-4179--a89-5\n\
table ip6 qubes-firewall {\n\
\x20 chain qbs-fd09-24ef-4179--a89-5 {\n\
\x20   ip6 nexthdr icmpv6 icmpv6 type 8 accept\n\
\x20   reject with icmpv6 type admin-prohibited\n\
\x20 }\n\
}\n"
        );
    }

    #[test]
    fn sample_8_parse_failure_fallback() {
        let got = prepare_rules(
            "qbs-10-137-0-5",
            &fallback_rules(),
            Family::V4,
            &dns4(),
            &StaticResolver::new(),
        )
        .expect("valid rules");
        assert_eq!(body(&got), ["    reject with icmp type admin-prohibited"]);
        assert_eq!(fallback_rules(), vec![AgentRule::policy("drop")]);
        let err = RuleParseError("No 'policy' defined".into());
        assert_eq!(
            parse_failure_message("10.137.0.5", &err),
            "Failed to parse rules for 10.137.0.5 (No 'policy' defined), blocking traffic"
        );
    }

    #[test]
    fn init_is_test_006() {
        let one = |fam: &str, ty: &str| {
            format!(
                "table {fam} qubes-firewall {{\n  set dns-addr {{\n    type {ty}\n  }}\n  \
                 chain qubes-forward {{\n  }}\n  chain forward {{\n    \
                 type filter hook forward priority 0;\n    policy drop;\n    \
                 ct state established,related accept\n    meta iifname != \"vif*\" accept\n    \
                 jump qubes-forward\n  }}\n  chain prerouting {{\n    \
                 type filter hook prerouting priority -300;\n    policy accept;\n  }}\n  \
                 chain postrouting {{\n    type filter hook postrouting priority -300;\n    \
                 policy accept;\n  }}\n}}\n"
            )
        };
        assert_eq!(
            init_text(),
            one("ip", "ipv4_addr") + &one("ip6", "ipv6_addr")
        );
        assert!(init_text().starts_with("table ip qubes-firewall {\n  set dns-addr {\n"));
    }

    #[test]
    fn cleanup_is_test_007() {
        assert_eq!(
            cleanup_text(),
            "delete table ip qubes-firewall\ndelete table ip6 qubes-firewall\n"
        );
    }

    #[test]
    fn create_chain_is_test_001() {
        assert_eq!(
            create_chain_text("10.137.0.1", Family::V4),
            "table ip qubes-firewall {\n  chain qbs-10-137-0-1 {\n  }\n  chain qubes-forward {\n    \
             ip saddr 10.137.0.1 jump qbs-10-137-0-1\n  }\n}\n"
        );
        assert_eq!(
            create_chain_text("fd09:24ef:4179:0000::3", Family::V6),
            "table ip6 qubes-firewall {\n  chain qbs-fd09-24ef-4179-0000--3 {\n  }\n  \
             chain qubes-forward {\n    ip6 saddr fd09:24ef:4179:0000::3 jump \
             qbs-fd09-24ef-4179-0000--3\n  }\n}\n"
        );
        // The address text is used verbatim in both the chain name and the saddr match.
        assert_eq!(
            create_chain_text("FD09::A89:3", Family::V6),
            "table ip6 qubes-firewall {\n  chain qbs-FD09--A89-3 {\n  }\n  \
             chain qubes-forward {\n    ip6 saddr FD09::A89:3 jump qbs-FD09--A89-3\n  }\n}\n"
        );
    }

    #[test]
    fn connected_ips_are_test_008_to_010() {
        let ips = split_connected_ips(Some("10.137.0.1 10.137.0.2"));
        assert_eq!(
            connected_ips_text(Family::V4, &ips),
            "flush chain ip qubes-firewall prerouting\n\
flush chain ip qubes-firewall postrouting\n\
table ip qubes-firewall {\n\
\x20 chain prerouting {\n\
\x20   iifname != \"vif*\" ip saddr {10.137.0.1, 10.137.0.2} drop\n\
\x20 }\n\
\x20 chain postrouting {\n\
\x20   oifname != \"vif*\" ip daddr {10.137.0.1, 10.137.0.2} drop\n\
\x20 }\n\
}\n"
        );
        let flush_only = "flush chain ip qubes-firewall prerouting\n\
                          flush chain ip qubes-firewall postrouting\n";
        assert_eq!(
            connected_ips_text(Family::V4, &split_connected_ips(Some(""))),
            flush_only
        );
        assert_eq!(
            connected_ips_text(Family::V4, &split_connected_ips(None)),
            flush_only
        );
        assert_eq!(
            connected_ips_text(Family::V6, &[]),
            "flush chain ip6 qubes-firewall prerouting\n\
             flush chain ip6 qubes-firewall postrouting\n"
        );
        assert_eq!(
            split_connected_ips(Some("  a\tb\n c ")),
            vec!["a", "b", "c"]
        );
    }

    #[test]
    fn resolve_errors() {
        let rules = [rule(&[
            ("action", "accept"),
            ("dsthost", "nonexistent.invalid"),
        ])];
        assert_eq!(
            prepare_rules("c", &rules, Family::V4, &dns4(), &StaticResolver::new()),
            Err(RuleParseError(
                "Failed to resolve nonexistent.invalid: [Errno -2] Name or service not known"
                    .into()
            ))
        );
        let res = StaticResolver::new().with("v4only.example", ip("192.0.2.1"));
        let rules = [rule(&[("action", "accept"), ("dsthost", "v4only.example")])];
        assert_eq!(
            prepare_rules("c", &rules, Family::V6, &dns6(), &res),
            Err(RuleParseError(
                "Failed to resolve v4only.example: [Errno -5] No address associated with hostname"
                    .into()
            ))
        );
        assert!(prepare_rules("c", &rules, Family::V4, &dns4(), &res).is_ok());
    }

    #[test]
    fn idna_errors() {
        let res = StaticResolver::new();
        let long = "a".repeat(64);
        for (name, why) in [
            ("a..b".to_string(), "label empty or too long"),
            (".example.com".to_string(), "label empty or too long"),
            (format!("{long}.com"), "label empty or too long"),
            (format!("www.{long}"), "label too long"),
        ] {
            let rules = [rule(&[("action", "accept"), ("dsthost", name.as_str())])];
            assert_eq!(
                prepare_rules("c", &rules, Family::V4, &dns4(), &res),
                Err(RuleParseError(format!(
                    "Invalid destination {name}: encoding with 'idna' codec failed \
                     (UnicodeError: {why})"
                ))),
                "{name}"
            );
        }
        // 63-character labels and a trailing dot pass the codec and reach the resolver.
        let ok63 = format!("{}.com.", "a".repeat(63));
        let res = StaticResolver::new().with(ok63.as_str(), ip("192.0.2.7"));
        let rules = [rule(&[("action", "accept"), ("dsthost", ok63.as_str())])];
        assert!(prepare_rules("c", &rules, Family::V4, &dns4(), &res).is_ok());
    }

    #[test]
    fn rule_check_errors_come_first() {
        let res = StaticResolver::new();
        let cases = [
            (
                rule(&[("action", "accept"), ("dpi", "NO")]),
                "Unsupported rule option(s): {'dpi'}",
            ),
            (rule(&[("action", "reject")]), "Invalid rule action reject"),
            (
                rule(&[("action", "accept"), ("dst6", "a::b")]),
                "dst6 rule found for IPv4 address",
            ),
            // The check runs before the name is looked up.
            (
                rule(&[("action", "reject"), ("dsthost", "unknown.invalid")]),
                "Invalid rule action reject",
            ),
        ];
        for (r, msg) in cases {
            assert_eq!(
                prepare_rules("c", &[r], Family::V4, &dns4(), &res),
                Err(RuleParseError(msg.into()))
            );
        }
        assert_eq!(
            prepare_rules(
                "c",
                &[rule(&[("action", "accept"), ("dst4", "3.3.3.3")])],
                Family::V6,
                &dns6(),
                &res
            ),
            Err(RuleParseError("IPv4 rule found for IPv6 address".into()))
        );
    }

    #[test]
    fn dsthost_dedup_and_order() {
        let res = StaticResolver::new()
            .with("multi.example", ip("192.0.2.2"))
            .with("multi.example", ip("192.0.2.1"))
            .with("multi.example", ip("192.0.2.2"))
            .with("multi.example", ip("2001:db8::1"));
        let rules = [rule(&[
            ("action", "drop"),
            ("proto", "tcp"),
            ("dsthost", "multi.example"),
            ("dstports", "443"),
        ])];
        let got =
            prepare_rules_with_dns("c", &rules, Family::V4, &dns4(), &res).expect("valid rules");
        assert_eq!(
            body(&got.text),
            [
                "    ip protocol tcp ip daddr { 192.0.2.2/32, 192.0.2.1/32 } tcp dport 443 \
              reject with icmp type admin-prohibited"
            ]
        );
        assert_eq!(
            dns_info_value(&got.dns[0].1),
            "{'192.0.2.2/32', '192.0.2.1/32'}"
        );
    }

    #[test]
    fn dsthost_resolved_even_when_dns_rule_is_skipped() {
        // Upstream resolves before it looks at specialtarget, so a failure still counts.
        let rules = [rule(&[
            ("action", "accept"),
            ("dsthost", "gone.invalid"),
            ("specialtarget", "dns"),
            ("dstports", "80"),
        ])];
        assert!(prepare_rules("c", &rules, Family::V4, &dns4(), &StaticResolver::new()).is_err());
    }

    #[test]
    fn ports_collapse_like_python() {
        assert_eq!(collapse_ports("80-80"), "80");
        assert_eq!(collapse_ports("80"), "80");
        assert_eq!(collapse_ports("80-81"), "80-81");
        assert_eq!(collapse_ports("53-53-53"), "53");
        assert_eq!(collapse_ports(""), "");
        assert_eq!(collapse_ports("-"), "");
        // `053` is not `53`: the DNS rule is skipped, as upstream compares strings.
        let rules = [rule(&[
            ("action", "accept"),
            ("specialtarget", "dns"),
            ("dstports", "053"),
        ])];
        let got = prepare_rules("c", &rules, Family::V4, &dns4(), &StaticResolver::new())
            .expect("valid rules");
        assert_eq!(body(&got), ["   "]);
    }

    #[test]
    fn empty_rule_list_keeps_upstream_template() {
        let got =
            prepare_rules("c", &[], Family::V4, &[], &StaticResolver::new()).expect("no rules");
        assert_eq!(
            got,
            "flush set ip qubes-firewall dns-addr\n\
             #add element ip qubes-firewall dns-addr {  }\n\
             flush chain ip qubes-firewall c\n\
             table ip qubes-firewall {\n  chain c {\n   \n  }\n}\n"
        );
    }

    #[test]
    fn dns_servers_by_family() {
        let all = [ip("10.139.1.1"), ip("fd00::1"), ip("10.139.1.2")];
        assert_eq!(
            dns_servers(Family::V4, &all),
            vec![ip("10.139.1.1"), ip("10.139.1.2")]
        );
        assert_eq!(dns_servers(Family::V6, &all), vec![ip("fd00::1")]);
    }

    #[test]
    fn ntop_matches_glibc() {
        for (a, s) in [
            ("::", "::"),
            ("::1", "::1"),
            ("1::", "1::"),
            ("2001:db8::1", "2001:db8::1"),
            ("2001:db8:0:1:0:0:0:1", "2001:db8:0:1::1"),
            ("2001:0:0:1:0:0:1:1", "2001::1:0:0:1:1"),
            ("1:0:1:1:1:1:1:1", "1:0:1:1:1:1:1:1"),
            ("::ffff:1.2.3.4", "::ffff:1.2.3.4"),
            ("::1.2.3.4", "::1.2.3.4"),
            ("::0.1.0.0", "::0.1.0.0"),
            ("::ffff:0:0", "::ffff:0.0.0.0"),
            ("fd09:24ef:4179::a89:5", "fd09:24ef:4179::a89:5"),
            ("1.2.3.4", "1.2.3.4"),
        ] {
            assert_eq!(ntop(&ip(a)), s, "{a}");
        }
    }

    #[test]
    fn static_resolver_contract() {
        let mut r = StaticResolver::new();
        r.insert("h", ip("2001:db8::2"));
        r.insert("h", ip("192.0.2.9"));
        r.insert("h", ip("2001:db8::1"));
        assert_eq!(r.resolve("h", Family::V4), Ok(vec![ip("192.0.2.9")]));
        assert_eq!(
            r.resolve("h", Family::V6),
            Ok(vec![ip("2001:db8::2"), ip("2001:db8::1")])
        );
        assert_eq!(r.resolve("x", Family::V4), Err(EAI_NONAME.to_string()));
    }

    #[test]
    fn odd_values_pass_through_verbatim() {
        // The agent trusts QubesDB; strange values reach nft, which then refuses them.
        let rules = [rule(&[
            ("action", "accept"),
            ("proto", "sctp"),
            ("specialtarget", "other"),
            ("dstports", ""),
            ("icmptype", "x"),
        ])];
        let got = prepare_rules("c", &rules, Family::V6, &dns6(), &StaticResolver::new())
            .expect("agent does not validate values");
        assert_eq!(
            body(&got),
            ["    ip6 nexthdr sctp icmpv6 type x sctp dport  accept"]
        );
        assert_eq!(dns_info_value(&[]), "set()");
    }
}
