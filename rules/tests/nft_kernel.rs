//! The agent's nft text (`qubes_rules::nft`, upstream qubes-core-agent-linux `qubesagent/firewall.py`) loaded into a
//! real kernel.
//!
//! Each test makes its own network namespace (`qr-nft-<pid>-<n>`, removed by a drop guard even
//! when the test panics) and runs every `nft` command through `ip netns exec`, so the host's own
//! ruleset is never read or changed. The assertions are on what `nft list` prints back, which
//! is nft's normalised form, not the input text (checked against nftables 1.0.6).
//!
//! Needs root, `ip` (iproute2) and `nft` (nftables). Without them the tests fail under CI and
//! otherwise report `NOT RUN: <test>: <reason>` (`testkit`).

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use qubes_rules::agent::chain_for_addr;
use qubes_rules::nft::{
    cleanup_text, connected_ips_text, create_chain_text, fallback_rules, init_text, prepare_rules,
    StaticResolver,
};
use qubes_rules::{AgentRule, Family};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A network namespace of our own; deleted on drop.
struct Netns {
    name: String,
    ip: PathBuf,
    nft: PathBuf,
}

impl Drop for Netns {
    fn drop(&mut self) {
        let res = Command::new(&self.ip)
            .args(["netns", "del", &self.name])
            .output();
        match res {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: ip netns del {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("warning: ip netns del {} failed: {e}", self.name),
        }
    }
}

/// Finds an executable in `PATH` or in the sbin directories a non-root `PATH` often lacks.
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A fresh namespace for `test`, or `None` when the machine cannot provide one (reported by
/// `testkit`: a failure under CI, `NOT RUN` otherwise).
fn netns(test: &str) -> Option<Netns> {
    if !testkit::require_root(test) {
        return None;
    }
    let tools = find_tool("ip")
        .ok_or("`ip` (iproute2) not found")
        .and_then(|ip| Ok((ip, find_tool("nft").ok_or("`nft` (nftables) not found")?)));
    let (ip, nft) = match tools {
        Ok(tools) => tools,
        Err(reason) => {
            testkit::not_run(test, reason);
            return None;
        }
    };
    let name = format!(
        "qr-nft-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    );
    let out = Command::new(&ip)
        .args(["netns", "add", &name])
        .output()
        .expect("run ip netns add");
    if !out.status.success() {
        testkit::not_run(
            test,
            &format!(
                "`ip netns add {name}` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        );
        return None;
    }
    Some(Netns { name, ip, nft })
}

impl Netns {
    /// `ip netns exec NS nft <args>`, with `stdin` fed to it.
    fn run_nft(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = Command::new(&self.ip)
            .args(["netns", "exec", &self.name])
            .arg(&self.nft)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ip netns exec nft");
        let mut pipe = child.stdin.take().expect("stdin is piped");
        let input = stdin.to_string();
        let writer = std::thread::spawn(move || pipe.write_all(input.as_bytes()));
        let out = child.wait_with_output().expect("wait for nft");
        writer
            .join()
            .expect("stdin writer thread")
            .expect("write nft input");
        out
    }

    /// `nft -f -`, the way the agent loads text; panics with nft's complaint if refused.
    fn load(&self, text: &str) {
        let out = self.run_nft(&["-f", "-"], text);
        assert!(
            out.status.success(),
            "nft refused the input ({}):\n{}\n--- input ---\n{text}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `nft <args>` stdout; `Err(stderr)` on failure.
    fn list(&self, args: &[&str]) -> Result<String, String> {
        let out = self.run_nft(args, "");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn table(&self, family: &str) -> String {
        self.list(&["list", "table", family, "qubes-firewall"])
            .unwrap_or_else(|e| panic!("nft list table {family} qubes-firewall: {e}"))
    }

    /// The rules of one chain as `nft list chain` prints them, trimmed, without the chain's
    /// `type ... hook` line.
    fn chain_rules(&self, family: &str, chain: &str) -> Vec<String> {
        let text = self
            .list(&["list", "chain", family, "qubes-firewall", chain])
            .unwrap_or_else(|e| panic!("nft list chain {family} {chain}: {e}"));
        text.lines()
            .filter(|l| l.starts_with("\t\t"))
            .map(|l| l.trim().to_string())
            .filter(|l| !l.starts_with("type filter hook"))
            .collect()
    }

    /// The element list of the `dns-addr` set, as printed (`""` when empty).
    fn dns_set(&self, family: &str) -> String {
        let text = self
            .list(&["list", "set", family, "qubes-firewall", "dns-addr"])
            .unwrap_or_else(|e| panic!("nft list set {family} dns-addr: {e}"));
        text.lines()
            .find_map(|l| l.trim().strip_prefix("elements = "))
            .unwrap_or("")
            .to_string()
    }
}

fn rule(pairs: &[(&str, &str)]) -> AgentRule {
    AgentRule::from_pairs(pairs.iter().copied())
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// The firewall VM's name servers: Qubes' virtual DNS and one IPv6 server.
fn dns() -> Vec<IpAddr> {
    vec![
        ip("10.139.1.1"),
        ip("10.139.1.2"),
        ip("fd09:24ef:4179::a89:1"),
    ]
}

fn resolver() -> StaticResolver {
    StaticResolver::new()
        .with("yum.qubes-os.org", ip("193.219.28.150"))
        .with("ripe.net", ip("193.0.11.51"))
        .with("ripe.net", ip("2001:67c:2e8:25::c100:b33"))
        .with("example.com", ip("93.184.215.14"))
        .with("example.com", ip("93.184.216.34"))
        .with("example.com", ip("2606:2800:21f:cb07:6820:80da:af6b:8b2c"))
}

const V4_CLIENT: &str = "10.137.0.5";
const V6_CLIENT: &str = "fd09:24ef:4179::a89:5";

fn v4(rules: &[AgentRule]) -> String {
    prepare_rules(
        &chain_for_addr(V4_CLIENT),
        rules,
        Family::V4,
        &dns(),
        &resolver(),
    )
    .expect("v4 rules translate")
}

fn v6(rules: &[AgentRule]) -> String {
    prepare_rules(
        &chain_for_addr(V6_CLIENT),
        rules,
        Family::V6,
        &dns(),
        &resolver(),
    )
    .expect("v6 rules translate")
}

/// Upstream test_002's rules (reference 3.4 sample 1) plus ports without proto.
fn mixed_rules4() -> Vec<AgentRule> {
    vec![
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
        rule(&[("action", "drop"), ("proto", "icmp"), ("icmptype", "8")]),
        rule(&[
            ("action", "accept"),
            ("dst4", "10.0.0.0/8"),
            ("dstports", "443-443"),
        ]),
        rule(&[("action", "drop")]),
    ]
}

/// Upstream test_003's rules (reference 3.4 sample 2).
fn mixed_rules6() -> Vec<AgentRule> {
    vec![
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
    ]
}

/// The GUI's "limit outgoing connections" rules (reference 3.4 sample 4).
fn limit_outgoing() -> Vec<AgentRule> {
    vec![
        rule(&[("action", "accept"), ("dsthost", "example.com")]),
        rule(&[("action", "accept"), ("specialtarget", "dns")]),
        rule(&[("action", "accept"), ("proto", "icmp")]),
        rule(&[("action", "drop")]),
        AgentRule::policy("drop"),
    ]
}

fn lines(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn whole_session_in_one_transaction() {
    let Some(ns) = netns("whole_session_in_one_transaction") else {
        return;
    };
    let v4_chain = chain_for_addr(V4_CLIENT);
    let v6_chain = chain_for_addr(V6_CLIENT);
    let mut text = init_text();
    text += &create_chain_text(V4_CLIENT, Family::V4);
    text += &create_chain_text(V6_CLIENT, Family::V6);
    text += &connected_ips_text(Family::V4, &[V4_CLIENT, "10.137.0.6"]);
    text += &connected_ips_text(Family::V6, &[V6_CLIENT]);
    text += &v4(&mixed_rules4());
    text += &v6(&mixed_rules6());
    ns.load(&text);

    let t4 = ns.table("ip");
    for needle in [
        "type filter hook forward priority filter; policy drop;",
        "ct state established,related accept",
        "iifname != \"vif*\" accept",
        "jump qubes-forward",
        "ip saddr 10.137.0.5 jump qbs-10-137-0-5",
        "iifname != \"vif*\" ip saddr { 10.137.0.5, 10.137.0.6 } drop",
        "oifname != \"vif*\" ip daddr { 10.137.0.5, 10.137.0.6 } drop",
        "type filter hook prerouting priority raw; policy accept;",
        "elements = { 10.139.1.1, 10.139.1.2 }",
    ] {
        assert!(t4.contains(needle), "missing {needle:?} in:\n{t4}");
    }
    assert_eq!(
        ns.chain_rules("ip", &v4_chain),
        lines(&[
            "ip daddr 1.2.3.0/24 tcp dport 80 accept",
            "ip daddr 193.219.28.150 udp dport 443-1024 accept",
            "ip daddr @dns-addr tcp dport 53 accept",
            "ip daddr @dns-addr udp dport 53 accept",
            "ip daddr @dns-addr udp dport 53 reject with icmp admin-prohibited",
            "icmp type echo-request reject with icmp admin-prohibited",
            "ip daddr 10.0.0.0/8 tcp dport 443 accept",
            "ip daddr 10.0.0.0/8 udp dport 443 accept",
            "reject with icmp admin-prohibited",
        ])
    );

    let t6 = ns.table("ip6");
    for needle in [
        "ip6 saddr fd09:24ef:4179::a89:5 jump qbs-fd09-24ef-4179--a89-5",
        "iifname != \"vif*\" ip6 saddr fd09:24ef:4179::a89:5 drop",
        "oifname != \"vif*\" ip6 daddr fd09:24ef:4179::a89:5 drop",
        "elements = { fd09:24ef:4179::a89:1 }",
    ] {
        assert!(t6.contains(needle), "missing {needle:?} in:\n{t6}");
    }
    assert_eq!(
        ns.chain_rules("ip6", &v6_chain),
        lines(&[
            "ip6 daddr a::b tcp dport 80 accept",
            "ip6 nexthdr tcp ip6 daddr 2001:67c:2e8:25::c100:b33 accept",
            "ip6 daddr @dns-addr tcp dport 53 accept",
            "ip6 daddr @dns-addr udp dport 53 accept",
            "ip6 daddr @dns-addr udp dport 53 reject with icmpv6 admin-prohibited",
            "icmpv6 type echo-request reject with icmpv6 admin-prohibited",
            "reject with icmpv6 admin-prohibited",
        ])
    );

    ns.load(&cleanup_text());
    assert_eq!(ns.list(&["list", "tables"]).expect("nft list tables"), "");
    assert!(ns.list(&["list", "table", "ip", "qubes-firewall"]).is_err());
    assert!(ns
        .list(&["list", "table", "ip6", "qubes-firewall"])
        .is_err());
}

/// The agent's own sequence: `init`, then per client `create_chain` once and `prepare_rules`
/// on every change, each a separate `nft -f` run. Reloading must replace the chain and the
/// `dns-addr` set, not append to them.
#[test]
fn agent_sequence_replaces_rules_on_reload() {
    let Some(ns) = netns("agent_sequence_replaces_rules_on_reload") else {
        return;
    };
    let v4_chain = chain_for_addr(V4_CLIENT);
    let v6_chain = chain_for_addr(V6_CLIENT);
    ns.load(&init_text());
    ns.load(&create_chain_text(V4_CLIENT, Family::V4));
    ns.load(&create_chain_text(V6_CLIENT, Family::V6));
    ns.load(&connected_ips_text(Family::V4, &[V4_CLIENT]));
    ns.load(&connected_ips_text(Family::V6, &[]));

    // A default qube (reference 3.4 sample 3).
    let default = [AgentRule::policy("accept"), AgentRule::policy("drop")];
    ns.load(&v4(&default));
    assert_eq!(
        ns.chain_rules("ip", &v4_chain),
        lines(&["accept", "reject with icmp admin-prohibited"])
    );

    // Limit outgoing connections (sample 4), twice: the second load must not duplicate.
    for _ in 0..2 {
        ns.load(&v4(&limit_outgoing()));
        assert_eq!(
            ns.chain_rules("ip", &v4_chain),
            lines(&[
                "ip daddr { 93.184.215.14, 93.184.216.34 } accept",
                "ip daddr @dns-addr tcp dport 53 accept",
                "ip daddr @dns-addr udp dport 53 accept",
                "ip protocol icmp accept",
                "reject with icmp admin-prohibited",
                "reject with icmp admin-prohibited",
            ])
        );
        assert_eq!(ns.dns_set("ip"), "{ 10.139.1.1, 10.139.1.2 }");
    }
    ns.load(&v6(&limit_outgoing()));
    assert_eq!(
        ns.chain_rules("ip6", &v6_chain),
        lines(&[
            "ip6 daddr 2606:2800:21f:cb07:6820:80da:af6b:8b2c accept",
            "ip6 daddr @dns-addr tcp dport 53 accept",
            "ip6 daddr @dns-addr udp dport 53 accept",
            "ip6 nexthdr ipv6-icmp accept",
            "reject with icmpv6 admin-prohibited",
            "reject with icmpv6 admin-prohibited",
        ])
    );

    // The prerouting/postrouting drops follow /connected-ips, and an empty list clears them.
    assert!(ns
        .table("ip")
        .contains("iifname != \"vif*\" ip saddr 10.137.0.5 drop"));
    ns.load(&connected_ips_text(Family::V4, &[]));
    assert_eq!(ns.chain_rules("ip", "prerouting"), Vec::<String>::new());
    assert_eq!(ns.chain_rules("ip", "postrouting"), Vec::<String>::new());

    // A parse failure blocks everything (reference 3.2, sample 8).
    ns.load(&v4(&fallback_rules()));
    assert_eq!(
        ns.chain_rules("ip", &v4_chain),
        lines(&["reject with icmp admin-prohibited"])
    );

    // Ports without proto, a DNS rule on the wrong port (skipped) and on 53-53.
    let ports = [
        rule(&[
            ("action", "accept"),
            ("dst4", "192.168.0.0/16"),
            ("dstports", "1-1024"),
        ]),
        rule(&[
            ("action", "accept"),
            ("specialtarget", "dns"),
            ("proto", "tcp"),
            ("dstports", "80-80"),
        ]),
        rule(&[
            ("action", "accept"),
            ("specialtarget", "dns"),
            ("proto", "udp"),
            ("dstports", "53-53"),
        ]),
        rule(&[("action", "drop"), ("proto", "tcp"), ("dstports", "25-25")]),
        AgentRule::policy("accept"),
    ];
    ns.load(&v4(&ports));
    assert_eq!(
        ns.chain_rules("ip", &v4_chain),
        lines(&[
            "ip daddr 192.168.0.0/16 tcp dport 1-1024 accept",
            "ip daddr 192.168.0.0/16 udp dport 1-1024 accept",
            "ip daddr @dns-addr udp dport 53 accept",
            "tcp dport 25 reject with icmp admin-prohibited",
            "accept",
        ])
    );

    // No IPv6 name server: the `add element` line is commented out and the set stays empty
    // (reference 3.4 sample 7).
    let v4_only_dns = [ip("10.139.1.1")];
    let icmp = [
        rule(&[("action", "accept"), ("proto", "icmp"), ("icmptype", "8")]),
        AgentRule::policy("drop"),
    ];
    let text = prepare_rules(&v6_chain, &icmp, Family::V6, &v4_only_dns, &resolver())
        .expect("v6 rules translate");
    assert!(text.contains("#add element ip6 qubes-firewall dns-addr {  }\n"));
    ns.load(&text);
    assert_eq!(ns.dns_set("ip6"), "");
    assert_eq!(
        ns.chain_rules("ip6", &v6_chain),
        lines(&[
            "icmpv6 type 8 accept",
            "reject with icmpv6 admin-prohibited",
        ])
    );

    // Every rule skipped: upstream's template leaves a blank line, which nft accepts.
    let none = [rule(&[
        ("action", "accept"),
        ("specialtarget", "dns"),
        ("dstports", "443"),
    ])];
    ns.load(&v4(&none));
    assert_eq!(ns.chain_rules("ip", &v4_chain), Vec::<String>::new());

    ns.load(&cleanup_text());
    assert_eq!(ns.list(&["list", "tables"]).expect("nft list tables"), "");
}

/// What the agent generates for a value nft cannot take must be refused by nft (the agent then
/// reports `RuleApplyError` and falls back to drop-all), never silently half-applied.
#[test]
fn nft_refuses_bad_values_atomically() {
    let Some(ns) = netns("nft_refuses_bad_values_atomically") else {
        return;
    };
    let v4_chain = chain_for_addr(V4_CLIENT);
    ns.load(&init_text());
    ns.load(&create_chain_text(V4_CLIENT, Family::V4));
    ns.load(&v4(&[AgentRule::policy("accept")]));

    let bad = [
        rule(&[("action", "accept"), ("dst4", "1.2.3.0/24")]),
        rule(&[("action", "accept"), ("dst4", "999.1.1.1")]),
    ];
    let out = ns.run_nft(&["-f", "-"], &v4(&bad));
    assert!(!out.status.success(), "nft took an invalid address");
    // The failed transaction left the previous rules in place.
    assert_eq!(ns.chain_rules("ip", &v4_chain), lines(&["accept"]));

    ns.load(&cleanup_text());
}
