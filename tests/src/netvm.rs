//! Linux qubes in namespaces, set up the way Qubes sets them up (upstream
//! qubes-core-agent-linux `network/`): the client side of a vif (`setup-ip`), the provider side
//! (`vif-route-qubes`), the static nftables of every networked VM, DNS redirection
//! (`qubes-setup-dnat-to-ns`), and the `qubes-firewall` agent that turns the QubesDB tree into
//! nftables chains (through `qubes_rules::nft`, byte-exact with upstream).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use qubes_rules::agent::{chain_for_addr, read_rules, AgentRule, RuleParseError};
use qubes_rules::classifier::{LinearScan, Packet, PacketProto, UnresolvedPolicy};
use qubes_rules::nft;
use qubes_rules::rule::Family;

use crate::cmd::{err, in_path, io_err, Cmd, Error, Result};
use crate::config::{NetvmConfig, Vif};
use crate::topology::{BACKEND_MAC, MAX_DOMID};

/// `/etc/qubes/qubes-antispoof.nft` (reference 4.5), verbatim.
pub const ANTISPOOF_NFT: &str = "\
#!/usr/sbin/nft -f
table ip qubes {
   set downstream {
      type ipv4_addr
   }

   set allowed {
      type ifname . ipv4_addr
   }

   chain prerouting {
      type filter hook prerouting priority raw; policy accept;
      iifgroup 2 goto antispoof
      ip saddr @downstream counter drop
   }

   chain antispoof {
      iifname . ip saddr @allowed accept
      counter drop
   }
}
";

/// `/etc/qubes/qubes-ipv4.nft` (reference 4.5), verbatim.
pub const IPV4_NFT: &str = "\
#!/usr/sbin/nft -f
table ip qubes {
   chain postrouting {
      type nat hook postrouting priority srcnat; policy accept;
      oifgroup 2 accept
      oif lo accept
      masquerade
   }

   chain input {
      type filter hook input priority filter; policy drop;
      jump custom-input
      ct state invalid counter drop
      iifgroup 2 meta l4proto udp udp dport 68 counter drop
      ct state related,established accept
      iifgroup 2 meta l4proto icmp accept
      iif lo accept
      iifgroup 2 counter reject with icmp type host-prohibited
      counter
   }

   chain forward {
      type filter hook forward priority filter; policy accept;
      jump custom-forward
      ct state invalid counter drop
      ct state related,established accept
      oifgroup 2 counter drop
   }

   # These chains are reserved for end-users.  Qubes OS itself will
   # never modify them.
   chain custom-input {}
   chain custom-forward {}
}
";

/// `/etc/netns/<ns>`: what `ip netns exec` bind-mounts over `/etc`.
pub fn etc_netns(ns: &str) -> PathBuf {
    Path::new("/etc/netns").join(ns)
}

/// Writes the namespace's `/etc/resolv.conf` (as setup-ip does for a qube with a netvm).
pub fn write_resolv_conf(ns: &str, servers: &[Ipv4Addr]) -> Result<()> {
    let dir = etc_netns(ns);
    fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
    let text: String = if servers.is_empty() {
        "# no network: this qube has no netvm\n".to_string()
    } else {
        servers
            .iter()
            .map(|s| format!("nameserver {s}\n"))
            .collect()
    };
    let path = dir.join("resolv.conf");
    fs::write(&path, text).map_err(io_err("cannot write", &path))
}

/// The `nameserver` lines of the namespace's resolv.conf, the agent's `dns_addresses()` and
/// the DNS redirection's upstream servers: IPv4 ones only (`line.split(' ')[1]`, reference
/// 3.3).
pub fn resolv_conf_servers(ns: &str) -> Vec<IpAddr> {
    let path = etc_netns(ns).join("resolv.conf");
    let text = fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("nameserver"))
        .filter_map(|l| l.split(' ').nth(1))
        .filter_map(|a| a.trim().parse::<IpAddr>().ok())
        .collect()
}

/// Writes sysctls inside a namespace, through `/proc/sys` (paths relative to it, e.g.
/// `net/ipv4/conf/vif3.0/proxy_arp`), with the hidden `qubes-lab sysctl` command.
pub fn sysctl(ns: &str, settings: &[(String, &str)]) -> Result<()> {
    if settings.is_empty() {
        return Ok(());
    }
    let exe = self_exe()?;
    let args: Vec<String> = settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
    Cmd::in_ns(ns, &exe).arg("sysctl").args(&args).run()?;
    Ok(())
}

/// The hidden `sysctl` command: `PATH=VALUE...` written to `/proc/sys/PATH`.
pub fn write_sysctls(settings: &[String]) -> Result<()> {
    for s in settings {
        let Some((k, v)) = s.split_once('=') else {
            return err(format!("sysctl: expected PATH=VALUE, got {s:?}"));
        };
        if k.split('/').any(|c| c == ".." || c.is_empty()) {
            return err(format!("sysctl: bad path {k:?}"));
        }
        let path = Path::new("/proc/sys").join(k);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io_err("sysctl: cannot open", &path))?;
        f.write_all(v.as_bytes())
            .map_err(io_err("sysctl: cannot write", &path))?;
    }
    Ok(())
}

/// This program, for running its hidden helpers inside namespaces.
pub fn self_exe() -> Result<PathBuf> {
    std::env::current_exe().map_err(|e| Error(format!("cannot find the qubes-lab executable: {e}")))
}

/// `nft -f -` inside a namespace.
pub fn nft(ns: &str, text: &str) -> Result<()> {
    Cmd::in_ns(ns, "nft").args(["-f", "-"]).run_stdin(text)?;
    Ok(())
}

/// A vif as netback makes it: the backend `vif` in the netvm's namespace with Qubes' backend
/// MAC, and its frontend, the qube's `eth0` with the qube's MAC (a veth pair).
pub fn add_vif_link(netvm_ns: &str, vif: &str, qube_ns: &str, qube_mac: &str) -> Result<()> {
    Cmd::new("ip")
        .args([
            "link",
            "add",
            vif,
            "netns",
            netvm_ns,
            "address",
            BACKEND_MAC,
        ])
        .args(["type", "veth", "peer", "name", "eth0", "netns", qube_ns])
        .args(["address", qube_mac])
        .run()?;
    Ok(())
}

/// `/usr/lib/qubes/setup-ip add eth0` without NetworkManager (reference 4.3): the client end
/// of a vif, with the qube's address, the gateway's permanent neighbour entry and the routes.
pub fn setup_ip(ns: &str, ip: Ipv4Addr, gateway: Ipv4Addr) -> Result<()> {
    let gw = gateway.to_string();
    Cmd::ip(ns)
        .args(["address", "replace", &format!("{ip}/32"), "dev", "eth0"])
        .run()?;
    Cmd::ip(ns)
        .args(["neighbour", "replace", "to", &gw, "dev", "eth0"])
        .args(["lladdr", BACKEND_MAC, "nud", "permanent"])
        .run()?;
    Cmd::ip(ns)
        .args(["link", "set", "dev", "eth0", "group", "1", "up"])
        .run()?;
    Cmd::ip(ns)
        .args([
            "route", "replace", "to", "unicast", &gw, "dev", "eth0", "scope", "link",
        ])
        .run()?;
    Cmd::ip(ns)
        .args(["route", "replace", "to", "unicast", "default", "via", &gw])
        .args(["dev", "eth0", "onlink"])
        .run()?;
    Ok(())
}

/// `/etc/xen/scripts/vif-route-qubes online` for one client (reference 4.4), except the
/// flowtable (offload is off in this kernel). `proxy_arp` is set by the caller (at `up`
/// together with the other sysctls).
pub fn vif_online(ns: &str, netvm_ip: Ipv4Addr, vif: &Vif, domid: u32) -> Result<()> {
    let ip = vif.ip.to_string();
    purge_vif_conntrack(ns, &ip);
    Cmd::ip(ns)
        .args(["neighbour", "add", "to", &ip, "dev", &vif.name])
        .args(["lladdr", &vif.mac, "nud", "permanent"])
        .run()?;
    nft(
        ns,
        &format!(
            "add element ip qubes allowed {{ \"{}\" . {ip} }}\nadd element ip qubes downstream {{ {ip} }}\n",
            vif.name
        ),
    )?;
    Cmd::ip(ns)
        .args(["link", "set", "dev", &vif.name, "group", "2", "up"])
        .run()?;
    let metric = MAX_DOMID.saturating_sub(domid).to_string();
    Cmd::ip(ns)
        .args(["route", "add", &ip, "dev", &vif.name, "metric", &metric])
        .run()?;
    Cmd::ip(ns)
        .args(["addr", "add", &format!("{netvm_ip}/32"), "dev", &vif.name])
        .run()?;
    Ok(())
}

/// `vif-route-qubes offline` for a client whose vif is gone already (the hotplug script runs
/// after netback removed the device, so the route, the neighbour entry and the address went
/// with it): the conntrack purge and the anti-spoofing set elements. Errors are ignored, as
/// upstream's `do_without_error`.
pub fn vif_offline(ns: &str, vif: &Vif) {
    let ip = vif.ip.to_string();
    purge_vif_conntrack(ns, &ip);
    for text in [
        format!(
            "delete element ip qubes allowed {{ \"{}\" . {ip} }}\n",
            vif.name
        ),
        format!("delete element ip qubes downstream {{ {ip} }}\n"),
    ] {
        let _ = nft(ns, &text);
    }
}

/// `vif-route-qubes`' `conntrack_purge -s ADDR` and `-d ADDR`, on `online` and `offline` alike:
/// no connection of an earlier life of that address survives. Skipped without the `conntrack`
/// tool; exit status 1 (nothing to delete) is no error.
fn purge_vif_conntrack(ns: &str, ip: &str) {
    if !in_path("conntrack") {
        return;
    }
    for dir in ["-s", "-d"] {
        let _ = Cmd::in_ns(ns, "conntrack")
            .args(["-D", dir, ip])
            .output(None);
    }
}

/// The `nft` input of `qubes-setup-dnat-to-ns` (reference 4.6): each virtual DNS address
/// paired with an upstream server, cycling through them; drop when there is none.
pub fn dnat_dns_text(virtual_dns: &[Ipv4Addr], upstream: &[Ipv4Addr]) -> String {
    let mut out = String::from(
        "add table ip qubes\nadd chain ip qubes dnat-dns\ndelete chain ip qubes dnat-dns\n\
         table ip qubes {\nchain dnat-dns {\n\
         type nat hook prerouting priority dstnat; policy accept;\n",
    );
    for (i, v) in virtual_dns.iter().enumerate() {
        for proto in ["udp", "tcp"] {
            match upstream.get(i % upstream.len().max(1)) {
                Some(real) => {
                    out.push_str(&format!("ip daddr {v} {proto} dport 53 dnat to {real}\n"))
                }
                None => out.push_str(&format!("ip daddr {v} {proto} dport 53 drop\n")),
            }
        }
    }
    out.push_str("}\n}\n");
    out
}

/// The virtual DNS addresses from the netvm's tree (`/qubes-netvm-primary-dns`, `-secondary-`).
fn virtual_dns(cfg: &NetvmConfig) -> Vec<Ipv4Addr> {
    ["/qubes-netvm-primary-dns", "/qubes-netvm-secondary-dns"]
        .iter()
        .filter_map(|k| cfg.get(k))
        .filter_map(|v| v.parse().ok())
        .collect()
}

/// Upstream DNS servers of a netvm: the IPv4 `nameserver`s of its resolv.conf.
fn upstream_dns(ns: &str) -> Vec<Ipv4Addr> {
    resolv_conf_servers(ns)
        .into_iter()
        .filter_map(|a| match a {
            IpAddr::V4(v) => Some(v),
            IpAddr::V6(_) => None,
        })
        .collect()
}

/// A Linux netvm's base: the static tables, `ip_forward`, proxy ARP on its vifs, DNS
/// redirection. Then the agent ([`agent_start`]) and the vifs ([`vif_online`]).
pub fn netvm_base(ns: &str, cfg: &NetvmConfig) -> Result<()> {
    nft(ns, ANTISPOOF_NFT)?;
    nft(ns, IPV4_NFT)?;
    let mut settings = vec![("net/ipv4/ip_forward".to_string(), "1")];
    for v in &cfg.vifs {
        settings.push((format!("net/ipv4/conf/{}/proxy_arp", v.name), "1"));
    }
    sysctl(ns, &settings)?;
    nft(ns, &dnat_dns_text(&virtual_dns(cfg), &upstream_dns(ns)))?;
    Ok(())
}

/// Brings a netvm's vifs online.
pub fn vifs_online(ns: &str, cfg: &NetvmConfig, domid_of: &dyn Fn(&Vif) -> u32) -> Result<()> {
    let own: Ipv4Addr = cfg
        .get("/qubes-netvm-gateway")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error("no /qubes-netvm-gateway in the netvm's tree".to_string()))?;
    for v in &cfg.vifs {
        vif_online(ns, own, v, domid_of(v))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The qubes-firewall agent

/// Name resolution for `dsthost` rules as the agent does it: `getaddrinfo` with the netvm's own
/// resolver, here `getent ahostsv4` run inside the netvm's namespace (so it asks 10.139.1.1,
/// which sys-net forwards to the world's DNS server). Answers are cached per agent run.
#[derive(Debug)]
pub struct NsResolver {
    ns: String,
    cache: RefCell<HashMap<(String, bool), Lookup>>,
}

/// A name's addresses, or the `gaierror` text.
type Lookup = std::result::Result<Vec<IpAddr>, String>;

impl NsResolver {
    pub fn new(ns: &str) -> Self {
        NsResolver {
            ns: ns.to_string(),
            cache: RefCell::new(HashMap::new()),
        }
    }

    fn lookup(&self, name: &str, v6: bool) -> Lookup {
        let key = (name.to_string(), v6);
        if let Some(hit) = self.cache.borrow().get(&key) {
            return hit.clone();
        }
        let answer = getent(&self.ns, name, v6);
        self.cache.borrow_mut().insert(key, answer.clone());
        answer
    }
}

/// `getent ahostsv4|ahostsv6 NAME` in a namespace, at most 6 s.
fn getent(ns: &str, name: &str, v6: bool) -> Lookup {
    let db = if v6 { "ahostsv6" } else { "ahostsv4" };
    let cmd = Cmd::in_ns(ns, "getent").args([db, "--", name]);
    let mut c = cmd.command();
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = c.spawn().map_err(|e| format!("cannot run getent: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(6);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("[Errno -3] Temporary failure in name resolution".to_string());
            }
            Err(e) => return Err(format!("getent: {e}")),
        }
    };
    let mut out = String::new();
    if let Some(mut so) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut so, &mut out);
    }
    match status.code() {
        Some(0) => {}
        Some(2) => return Err(nft::EAI_NONAME.to_string()),
        _ => return Err("[Errno -3] Temporary failure in name resolution".to_string()),
    }
    let mut addrs: Vec<IpAddr> = Vec::new();
    for line in out.lines() {
        if let Some(a) = line.split_whitespace().next().and_then(|a| a.parse().ok()) {
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
    }
    Ok(addrs)
}

impl nft::Resolver for NsResolver {
    fn resolve(&self, name: &str, family: Family) -> std::result::Result<Vec<IpAddr>, String> {
        self.lookup(name, family == Family::V6)
    }
}

/// The agent's log: `<state>/<netvm>-agent.log`, and the user's terminal for the messages
/// upstream sends as desktop notifications.
#[derive(Debug)]
pub struct AgentLog {
    pub path: PathBuf,
}

impl AgentLog {
    pub fn line(&self, msg: &str) {
        if let Ok(mut f) = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
        {
            let _ = writeln!(f, "{} {msg}", crate::config::now());
        }
    }

    /// A message upstream shows as a desktop notification.
    pub fn notify(&self, msg: &str) {
        self.line(msg);
        eprintln!("qubes-firewall: {msg}");
    }
}

/// `init()`, then every target and the connected IPs: the agent's start (reference 3.2).
pub fn agent_start(ns: &str, cfg: &NetvmConfig, log: &AgentLog) -> Result<()> {
    nft(ns, &nft::init_text())?;
    log.line("init: tables created");
    for target in cfg.firewall_targets() {
        agent_handle_addr(ns, cfg, &target, log)?;
    }
    agent_connected_ips(ns, cfg)?;
    Ok(())
}

/// A restart of the agent service: `cleanup()` on the clean stop, then the start.
pub fn agent_restart(ns: &str, cfg: &NetvmConfig, log: &AgentLog) -> Result<()> {
    nft(ns, &nft::cleanup_text())?;
    log.line("cleanup: tables deleted");
    agent_start(ns, cfg, log)
}

/// `update_connected_ips` for both families.
pub fn agent_connected_ips(ns: &str, cfg: &NetvmConfig) -> Result<()> {
    let v4 = nft::split_connected_ips(cfg.get("/connected-ips"));
    let v6 = nft::split_connected_ips(cfg.get("/connected-ips6"));
    nft(
        ns,
        &(nft::connected_ips_text(Family::V4, &v4) + &nft::connected_ips_text(Family::V6, &v6)),
    )
}

fn chain_exists(ns: &str, family: Family, chain: &str) -> Result<bool> {
    let out = Cmd::in_ns(ns, "nft")
        .args([
            "list",
            "chain",
            nft::family_keyword(family),
            nft::TABLE,
            chain,
        ])
        .output(None)?;
    Ok(out.status.success())
}

/// `handle_addr(addr)` (reference 3.2): read the client's rules from the tree, translate them,
/// load them; a parse failure blocks the client (drop-all) and is reported; then the
/// connections the new rules refuse are removed from conntrack.
pub fn agent_handle_addr(ns: &str, cfg: &NetvmConfig, addr: &str, log: &AgentLog) -> Result<()> {
    let family = if addr.contains(':') {
        Family::V6
    } else {
        Family::V4
    };
    let chain = chain_for_addr(addr);
    if !chain_exists(ns, family, &chain)? {
        nft(ns, &nft::create_chain_text(addr, family))?;
    }
    let dns = resolv_conf_servers(ns);
    let resolver = NsResolver::new(ns);
    let entries = cfg.firewall_entries(addr);
    let parsed: std::result::Result<(Vec<AgentRule>, String), RuleParseError> =
        read_rules(entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))).and_then(|rules| {
            let text = nft::prepare_rules(&chain, &rules, family, &dns, &resolver)?;
            Ok((rules, text))
        });
    let (rules, text) = match parsed {
        Ok(ok) => ok,
        Err(e) => {
            log.notify(&nft::parse_failure_message(addr, &e));
            let rules = nft::fallback_rules();
            let text = nft::prepare_rules(&chain, &rules, family, &dns, &resolver)
                .map_err(|e| Error(format!("drop-all rules for {addr}: {e}")))?;
            (rules, text)
        }
    };
    let applied = match nft(ns, &text) {
        Ok(()) => rules,
        Err(e) => {
            log.notify(&format!(
                "Failed to apply rules for {addr} (nft failed: {e}), blocking traffic"
            ));
            let rules = nft::fallback_rules();
            let text = nft::prepare_rules(&chain, &rules, family, &dns, &resolver)
                .map_err(|e| Error(format!("drop-all rules for {addr}: {e}")))?;
            if let Err(e2) = nft(ns, &text) {
                log.notify(&format!("Failed to block traffic for {addr}"));
                return Err(e2);
            }
            rules
        }
    };
    log.line(&format!("{addr}: {} rules applied", applied.len()));
    purge_conntrack(ns, addr, family, &applied, &dns, &resolver, log)
}

/// The agent's conntrack purge (core-agent-linux PR #399, reference 3.3): every tracked
/// connection from `addr` that the new rules block is deleted, so that its next packet is
/// judged again. Decided by `qubes_rules`' first-match walk (numeric port comparison, see
/// docs/compatibility.md). Needs `conntrack` (package conntrack); without it, skipped.
fn purge_conntrack(
    ns: &str,
    addr: &str,
    family: Family,
    rules: &[AgentRule],
    dns: &[IpAddr],
    resolver: &NsResolver,
    log: &AgentLog,
) -> Result<()> {
    if !in_path("conntrack") {
        log.line("conntrack not installed: established connections not purged");
        return Ok(());
    }
    let fam = match family {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    };
    let listing = Cmd::in_ns(ns, "conntrack")
        .args(["-L", "--family", fam, "--src", addr])
        .output(None)?;
    let text = String::from_utf8_lossy(&listing.stdout);
    let matches: std::result::Result<Vec<_>, _> =
        rules.iter().map(|r| r.to_match(family)).collect();
    let resolve =
        |name: &str| -> Option<Vec<IpAddr>> { nft::Resolver::resolve(resolver, name, family).ok() };
    let scan = match &matches {
        Ok(m) => Some(LinearScan::new(
            m,
            dns,
            &resolve,
            UnresolvedPolicy::BlockClient,
        )),
        Err(_) => None, // rules that do not translate: everything is blocked
    };
    for line in text.lines() {
        let mut tokens = line.split_whitespace();
        let Some(proto) = tokens.next() else {
            continue;
        };
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|t| t.strip_prefix(name).map(str::to_string))
        };
        let (Some(dst), Some(dport)) = (field("dst="), field("dport=")) else {
            continue; // no port (ICMP): never purged, as upstream
        };
        let (Ok(dst_ip), Ok(port)) = (dst.parse::<IpAddr>(), dport.parse::<u16>()) else {
            continue;
        };
        let pproto = match proto {
            "tcp" => PacketProto::Tcp,
            "udp" => PacketProto::Udp,
            _ => continue,
        };
        let blocked = scan
            .as_ref()
            .is_none_or(|s| s.lookup(Packet::new(pproto, dst_ip, port)).is_blocked());
        if blocked {
            // Exit status 1 when the entry vanished meanwhile: not an error.
            let _ = Cmd::in_ns(ns, "conntrack")
                .args(["-D", "--src", addr, "--dst", &dst, "--proto", proto])
                .args(["--dport", &dport])
                .output(None)?;
            log.line(&format!("purged {proto} {addr} -> {dst}:{dport}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dnat_dns_pairs_cyclically() {
        let v = [Ipv4Addr::new(10, 139, 1, 1), Ipv4Addr::new(10, 139, 1, 2)];
        let one = [Ipv4Addr::new(198, 18, 0, 53)];
        assert_eq!(
            dnat_dns_text(&v, &one),
            "add table ip qubes\nadd chain ip qubes dnat-dns\ndelete chain ip qubes dnat-dns\n\
             table ip qubes {\nchain dnat-dns {\n\
             type nat hook prerouting priority dstnat; policy accept;\n\
             ip daddr 10.139.1.1 udp dport 53 dnat to 198.18.0.53\n\
             ip daddr 10.139.1.1 tcp dport 53 dnat to 198.18.0.53\n\
             ip daddr 10.139.1.2 udp dport 53 dnat to 198.18.0.53\n\
             ip daddr 10.139.1.2 tcp dport 53 dnat to 198.18.0.53\n}\n}\n"
        );
        let identity = dnat_dns_text(&v, &v);
        assert!(identity.contains("ip daddr 10.139.1.2 tcp dport 53 dnat to 10.139.1.2\n"));
        let none = dnat_dns_text(&v, &[]);
        assert!(none.contains("ip daddr 10.139.1.1 udp dport 53 drop\n"));
    }

    #[test]
    fn sysctl_paths_are_checked() {
        assert!(write_sysctls(&["net/../x=1".to_string()]).is_err());
        assert!(write_sysctls(&["novalue".to_string()]).is_err());
    }
}
