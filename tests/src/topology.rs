//! The lab's topology: which qubes exist, their netvms and addresses (docs/lab.md,
//! "Topology files"). The default is topologies/default.yaml, built in.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use qubes_rules::store::valid_qube_name;
use qubes_rules::Rule;
use serde::{Deserialize, Serialize};

use crate::cmd::{err, Error, Result};

/// The built-in topology: the Qubes default.
pub const DEFAULT_TOPOLOGY: &str = include_str!("../topologies/default.yaml");

/// The MAC Xen netback gives the backend end of every vif, and the one clients expect for
/// their gateway (reference 4.1).
pub const BACKEND_MAC: &str = "fe:ff:ff:ff:ff:ff";

/// The largest domid a vif may have: `vif-route-qubes` refuses larger ones (`domid N too
/// large`; 32752 is DOMID_FIRST_RESERVED - 1 in Xen's public/xen.h).
pub const MAX_DOMID: u32 = 32752;

/// The virtual DNS servers of every qube with a netvm (reference 4.1).
pub const VIRTUAL_DNS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 139, 1, 1), Ipv4Addr::new(10, 139, 1, 2)];

/// The world: the "internet" behind the uplink qube, 198.18.0.0/24 only.
pub mod world {
    use std::net::Ipv4Addr;

    /// The uplink qube's address on the world link (its `eth0`).
    pub const UPLINK_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    /// The world's router address: the uplink qube's default gateway.
    pub const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    /// The web server (HTTP on 80 and 443, echo on 8080, iperf3 on 5201).
    pub const WEB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
    /// The DNS server (dnsmasq), the uplink qube's resolver.
    pub const DNS_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 53);
    pub const PREFIX_LEN: u8 = 24;
    /// The name the DNS server answers with [`WEB_IP`].
    pub const WEB_NAME: &str = "web.test";
    /// The world's end of the uplink qube's `eth0`.
    pub const IFNAME: &str = "wan0";
    pub const HTTP_PORTS: [u16; 2] = [80, 443];
    /// A TCP echo service that keeps connections open (for rule-change tests).
    pub const ECHO_PORT: u16 = 8080;
    pub const IPERF_PORT: u16 = 5201;
    /// The first of the private Tor network's seven relays (three directory authorities, two
    /// middles, two exits), at consecutive addresses up to 198.18.0.47.
    pub const TOR_FIRST_RELAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 41);
    /// Every relay's ORPort: all a Tor client ever connects to.
    pub const TOR_ORPORT: u16 = 9001;
}

/// One qube as a topology file describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QubeSpec {
    pub name: String,
    /// The qube's netvm; none: the qube has no network (or is the uplink qube).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netvm: Option<String>,
    /// Its address (required for qubes with a netvm and for netvms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// Its MAC; default `00:16:3e:5e:6c:XX`, XX the last byte of the address in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Its Xen domain id, which names its backend vif (`vif<domid>.0`); default: its position
    /// in the list, counting from 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domid: Option<u32>,
    /// Attached to the world: the netvm at the root (sys-net).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub uplink: bool,
    /// Runs the pluggable sys-firewall (`--firewall linux|rust`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub firewall: bool,
    /// Runs sys-whonix, the Tor gateway: its clients reach the world only through the lab's
    /// private Tor network.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub whonix: bool,
    /// Its firewall rules in the YAML rule-file form (docs/rule-files.md: the list under
    /// `rules:`); none: dom0's default, accept everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<serde_yaml::Value>,
}

/// A topology file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologySpec {
    pub qubes: Vec<QubeSpec>,
}

/// What a qube does in the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The netvm at the root, attached to the world; a Linux netvm (until sys-net has its own
    /// service).
    Uplink,
    /// The pluggable sys-firewall: Linux like Qubes, or our service.
    Firewall,
    /// sys-whonix: our Tor gateway service, with the world's private Tor network.
    Whonix,
    /// Another netvm with a netvm of its own: a Linux ProxyVM.
    LinuxProxy,
    /// A qube with a netvm that provides no network.
    App,
    /// No netvm, no uplink: no network at all (vault).
    Isolated,
}

/// A qube of the resolved topology.
#[derive(Debug, Clone, PartialEq)]
pub struct Qube {
    pub name: String,
    /// Its network namespace: `<lab>-<name>`.
    pub ns: String,
    pub ip: Option<Ipv4Addr>,
    pub mac: String,
    pub domid: u32,
    /// Index of its netvm in [`Topology::qubes`].
    pub netvm: Option<usize>,
    pub role: Role,
    /// Its rules (validated by dom0's checks), when the topology gives some.
    pub rules: Option<Vec<Rule>>,
    /// False while it is halted (`qubes-lab stop`): no vif, no processes.
    pub running: bool,
}

impl Qube {
    /// Whether other qubes use it as their netvm (or it is a netvm by role).
    pub fn provides_network(&self) -> bool {
        matches!(
            self.role,
            Role::Uplink | Role::Firewall | Role::Whonix | Role::LinuxProxy
        )
    }

    /// The backend end of its vif, in its netvm's namespace: `vif<domid>.0`.
    pub fn vif(&self) -> Option<String> {
        self.netvm.map(|_| format!("vif{}.0", self.domid))
    }
}

/// A resolved topology for a named lab.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    pub lab: String,
    pub qubes: Vec<Qube>,
}

/// A lab name: a letter then letters and digits, at most 20; it prefixes every namespace
/// (`<name>-<qube>`), so it has no `-` (a lab `a` must not own `a-b`'s namespaces).
pub fn check_lab_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && name.len() <= 20
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        err(format!(
            "invalid lab name {name:?}: a lower-case letter, then lower-case letters and digits, \
             at most 20"
        ))
    }
}

/// The world's namespace.
pub fn world_ns(lab: &str) -> String {
    format!("{lab}-world")
}

/// The namespace of a qube.
pub fn qube_ns(lab: &str, qube: &str) -> String {
    format!("{lab}-{qube}")
}

/// Whether an address is one the lab may give a qube (Qubes' 10.137/10.138 ranges only).
fn qubes_address(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    o[0] == 10 && (o[1] == 137 || o[1] == 138) && o[3] != 0 && o[3] != 255
}

fn check_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
        && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0)
}

impl TopologySpec {
    pub fn parse(text: &str) -> Result<Self> {
        serde_yaml::from_str(text).map_err(|e| Error(format!("invalid topology: {e}")))
    }

    pub fn default_spec() -> Result<Self> {
        Self::parse(DEFAULT_TOPOLOGY)
    }

    /// The topology without its whonix qube and every qube whose network goes through it
    /// (`up --no-whonix`). The qubes that stay keep the domids, so the vif names, they have
    /// in the full topology.
    pub fn without_whonix(&self) -> Self {
        let mut gone: BTreeSet<&str> = self
            .qubes
            .iter()
            .filter(|q| q.whonix)
            .map(|q| q.name.as_str())
            .collect();
        // Clients of clients too; a netvm named after a qube that appears later in the list
        // needs another round, hence the loop until nothing changes.
        loop {
            let more: Vec<&str> = self
                .qubes
                .iter()
                .filter(|q| !gone.contains(q.name.as_str()))
                .filter(|q| q.netvm.as_deref().is_some_and(|n| gone.contains(n)))
                .map(|q| q.name.as_str())
                .collect();
            if more.is_empty() {
                break;
            }
            gone.extend(more);
        }
        let qubes = self
            .qubes
            .iter()
            .enumerate()
            .filter(|(_, q)| !gone.contains(q.name.as_str()))
            .map(|(i, q)| QubeSpec {
                domid: Some(q.domid.unwrap_or(i as u32 + 1)),
                ..q.clone()
            })
            .collect();
        TopologySpec { qubes }
    }

    /// The topology of lab `lab`, checked: names, netvms, addresses, rules.
    pub fn resolve(&self, lab: &str) -> Result<Topology> {
        check_lab_name(lab)?;
        let specs = &self.qubes;
        if specs.is_empty() {
            return err("invalid topology: no qubes");
        }
        let mut names = BTreeSet::new();
        for q in specs {
            if !valid_qube_name(&q.name) || q.name == "world" {
                return err(format!(
                    "invalid topology: bad qube name {:?} (a letter, then letters, digits, \
                     '_', '.', '-', at most 31; 'world' is taken)",
                    q.name
                ));
            }
            if !names.insert(q.name.as_str()) {
                return err(format!("invalid topology: qube {} twice", q.name));
            }
        }
        let index = |name: &str| specs.iter().position(|q| q.name == name);
        let mut qubes = Vec::with_capacity(specs.len());
        let mut ips = BTreeSet::new();
        let mut domids = BTreeSet::new();
        for (i, q) in specs.iter().enumerate() {
            let netvm = match &q.netvm {
                None => None,
                Some(n) => Some(index(n).ok_or_else(|| {
                    Error(format!(
                        "invalid topology: {}: netvm {n} is not in the topology",
                        q.name
                    ))
                })?),
            };
            let used_as_netvm = specs.iter().any(|o| o.netvm.as_deref() == Some(&q.name));
            let role = match (q.uplink, q.firewall, q.whonix) {
                (true, false, false) => Role::Uplink,
                (false, true, false) => Role::Firewall,
                (false, false, true) => Role::Whonix,
                (false, false, false) if used_as_netvm => Role::LinuxProxy,
                (false, false, false) if netvm.is_some() => Role::App,
                (false, false, false) => Role::Isolated,
                _ => {
                    return err(format!(
                        "invalid topology: {}: uplink, firewall and whonix exclude each other",
                        q.name
                    ))
                }
            };
            match role {
                Role::Uplink if netvm.is_some() => {
                    return err(format!(
                        "invalid topology: {}: the uplink qube has no netvm",
                        q.name
                    ))
                }
                Role::Firewall | Role::Whonix | Role::LinuxProxy if netvm.is_none() => {
                    return err(format!(
                        "invalid topology: {} provides network but has no netvm (only the \
                         uplink qube may)",
                        q.name
                    ))
                }
                _ => {}
            }
            let needs_ip = role != Role::Isolated;
            let ip = match (q.ip, needs_ip) {
                (Some(ip), _) => {
                    if !qubes_address(ip) {
                        return err(format!(
                            "invalid topology: {}: {ip} is not a Qubes address \
                             (10.137.x.y or 10.138.x.y)",
                            q.name
                        ));
                    }
                    if !ips.insert(ip) {
                        return err(format!("invalid topology: address {ip} twice"));
                    }
                    Some(ip)
                }
                (None, true) => {
                    return err(format!("invalid topology: {} needs an ip", q.name));
                }
                (None, false) => None,
            };
            let domid = q.domid.unwrap_or(i as u32 + 1);
            if domid == 0 || domid > MAX_DOMID {
                return err(format!(
                    "invalid topology: {}: domid {domid} out of range",
                    q.name
                ));
            }
            if !domids.insert(domid) {
                return err(format!("invalid topology: domid {domid} twice"));
            }
            let mac = match &q.mac {
                Some(m) => {
                    let m = m.to_ascii_lowercase();
                    if !check_mac(&m) {
                        return err(format!("invalid topology: {}: bad mac {m}", q.name));
                    }
                    m
                }
                None => format!(
                    "00:16:3e:5e:6c:{:02x}",
                    ip.map(|a| a.octets()[3]).unwrap_or(0)
                ),
            };
            let rules = match &q.rules {
                None => None,
                Some(value) => Some(parse_rules(&q.name, value)?),
            };
            qubes.push(Qube {
                name: q.name.clone(),
                ns: qube_ns(lab, &q.name),
                ip,
                mac,
                domid,
                netvm,
                role,
                rules,
                running: true,
            });
        }
        // Loops, and netvms that are not netvms.
        for q in &qubes {
            let mut seen = BTreeSet::new();
            let mut cur = q.netvm;
            while let Some(n) = cur {
                if !seen.insert(n) {
                    return err("invalid topology: Loops in network are unsupported");
                }
                cur = qubes[n].netvm;
            }
        }
        let uplinks = qubes.iter().filter(|q| q.role == Role::Uplink).count();
        if uplinks != 1 {
            return err(format!(
                "invalid topology: exactly one qube has uplink: true (found {uplinks})"
            ));
        }
        if qubes.iter().filter(|q| q.role == Role::Firewall).count() > 1 {
            return err("invalid topology: at most one qube has firewall: true");
        }
        if qubes.iter().filter(|q| q.role == Role::Whonix).count() > 1 {
            return err("invalid topology: at most one qube has whonix: true");
        }
        Ok(Topology {
            lab: lab.to_string(),
            qubes,
        })
    }
}

/// A `rules:` list in the YAML rule-file form, read by `qubes_rules::yaml`.
fn parse_rules(qube: &str, value: &serde_yaml::Value) -> Result<Vec<Rule>> {
    let mut doc = serde_yaml::Mapping::new();
    doc.insert("rules".into(), value.clone());
    let text = serde_yaml::to_string(&doc)
        .map_err(|e| Error(format!("invalid topology: {qube}: rules: {e}")))?;
    qubes_rules::yaml::read(&text)
        .map_err(|e| Error(format!("invalid topology: {qube}: rules: {e}")))
}

impl Topology {
    pub fn get(&self, name: &str) -> Result<&Qube> {
        self.qubes.iter().find(|q| q.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.qubes.iter().map(|q| q.name.as_str()).collect();
            Error(format!(
                "no qube {name} in lab {} (qubes: {})",
                self.lab,
                known.join(", ")
            ))
        })
    }

    pub fn netvm_of(&self, q: &Qube) -> Option<&Qube> {
        q.netvm.map(|i| &self.qubes[i])
    }

    /// The qubes whose netvm is `provider`, in topology order.
    pub fn clients_of<'a>(&'a self, provider: &'a Qube) -> impl Iterator<Item = &'a Qube> + 'a {
        self.qubes
            .iter()
            .filter(move |q| self.netvm_of(q).is_some_and(|n| n.name == provider.name))
    }

    pub fn uplink(&self) -> Option<&Qube> {
        self.qubes.iter().find(|q| q.role == Role::Uplink)
    }

    pub fn firewall(&self) -> Option<&Qube> {
        self.qubes.iter().find(|q| q.role == Role::Firewall)
    }

    pub fn whonix(&self) -> Option<&Qube> {
        self.qubes.iter().find(|q| q.role == Role::Whonix)
    }

    /// Whether `q`'s network goes through the whonix qube: it reaches the world over Tor only.
    pub fn behind_whonix(&self, q: &Qube) -> bool {
        let mut cur = self.netvm_of(q);
        while let Some(n) = cur {
            if n.role == Role::Whonix {
                return true;
            }
            cur = self.netvm_of(n);
        }
        false
    }

    /// Every namespace of the lab: one per qube, then the world's.
    pub fn namespaces(&self) -> Vec<String> {
        let mut v: Vec<String> = self.qubes.iter().map(|q| q.ns.clone()).collect();
        v.push(world_ns(&self.lab));
        v
    }

    /// The qubes that provide no network: the rows of the connectivity matrix.
    pub fn end_qubes(&self) -> impl Iterator<Item = &Qube> {
        self.qubes
            .iter()
            .filter(|q| matches!(q.role, Role::App | Role::Isolated))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_topology_is_the_qubes_default() {
        let t = TopologySpec::default_spec()
            .and_then(|s| s.resolve("lab"))
            .expect("default topology resolves");
        let row = |n: &str| {
            let q = t.get(n).expect("qube");
            (
                q.ns.clone(),
                q.ip.map(|i| i.to_string()),
                q.vif(),
                q.role,
                q.mac.clone(),
            )
        };
        assert_eq!(
            row("sys-net"),
            (
                "lab-sys-net".into(),
                Some("10.137.0.5".into()),
                None,
                Role::Uplink,
                "00:16:3e:5e:6c:05".into()
            )
        );
        assert_eq!(row("sys-firewall").2.as_deref(), Some("vif2.0"));
        assert_eq!(row("sys-firewall").3, Role::Firewall);
        assert_eq!(row("work").2.as_deref(), Some("vif3.0"));
        assert_eq!(row("personal").2.as_deref(), Some("vif4.0"));
        assert_eq!(row("untrusted").2.as_deref(), Some("vif5.0"));
        assert_eq!(row("work").4, "00:16:3e:5e:6c:0a");
        assert_eq!(row("vault").3, Role::Isolated);
        assert_eq!(row("vault").1, None);
        assert_eq!(
            t.get("untrusted").expect("q").rules.as_ref().map(Vec::len),
            Some(3)
        );
        assert_eq!(t.get("work").expect("q").rules, None);
        assert_eq!(t.namespaces().last().map(String::as_str), Some("lab-world"));
        // Qubes' Whonix pair: sys-whonix behind sys-firewall, anon-whonix behind sys-whonix.
        assert_eq!(row("sys-whonix").3, Role::Whonix);
        assert_eq!(row("sys-whonix").2.as_deref(), Some("vif7.0"));
        assert_eq!(
            t.netvm_of(t.get("sys-whonix").expect("q"))
                .map(|n| n.name.as_str()),
            Some("sys-firewall")
        );
        assert_eq!(row("anon-whonix").3, Role::App);
        assert!(t.behind_whonix(t.get("anon-whonix").expect("q")));
        assert!(!t.behind_whonix(t.get("sys-whonix").expect("q")));
        assert!(!t.behind_whonix(t.get("work").expect("q")));
        assert_eq!(row("anon-whonix").2.as_deref(), Some("vif8.0"));
        assert_eq!(
            t.netvm_of(t.get("anon-whonix").expect("q"))
                .map(|n| n.name.as_str()),
            Some("sys-whonix")
        );
        let ends: Vec<&str> = t.end_qubes().map(|q| q.name.as_str()).collect();
        assert_eq!(
            ends,
            ["work", "personal", "untrusted", "vault", "anon-whonix"]
        );
    }

    #[test]
    fn without_whonix_drops_the_gateway_and_everything_behind_it() {
        let spec = TopologySpec::parse(
            "qubes:\n\
             - {name: net, ip: 10.137.0.1, uplink: true}\n\
             - {name: anon2, ip: 10.137.0.9, netvm: proxy}\n\
             - {name: gw, ip: 10.137.0.2, netvm: net, whonix: true}\n\
             - {name: proxy, ip: 10.137.0.3, netvm: gw}\n\
             - {name: app, ip: 10.137.0.4, netvm: net}\n",
        )
        .expect("parses");
        let t = spec.without_whonix().resolve("x").expect("resolves");
        let names: Vec<&str> = t.qubes.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(names, ["net", "app"]);
        // app keeps vif5.0, the vif it has in the full topology.
        assert_eq!(t.get("app").expect("q").vif().as_deref(), Some("vif5.0"));
        let full = TopologySpec::default_spec().expect("default");
        let t = full.without_whonix().resolve("x").expect("resolves");
        assert!(t.whonix().is_none());
        assert_eq!(t.qubes.len(), full.qubes.len() - 2);
    }

    #[test]
    fn bad_topologies_are_refused() {
        let cases = [
            ("qubes: []", "no qubes"),
            (
                "qubes: [{name: a, ip: 10.137.0.1}]",
                "exactly one qube has uplink",
            ),
            (
                "qubes: [{name: n, ip: 10.137.0.1, uplink: true}, {name: a, netvm: n}]",
                "a needs an ip",
            ),
            (
                "qubes: [{name: n, ip: 192.168.1.1, uplink: true}]",
                "not a Qubes address",
            ),
            (
                "qubes: [{name: n, ip: 10.137.0.1, uplink: true}, {name: a, netvm: x}]",
                "netvm x is not in the topology",
            ),
            (
                "qubes: [{name: n, ip: 10.137.0.1, uplink: true, bogus: 1}]",
                "unknown field",
            ),
            (
                "qubes: [{name: n, ip: 10.137.0.1, uplink: true}, \
                 {name: a, ip: 10.137.0.2, netvm: n, rules: [{action: maybe}]}]",
                "rules",
            ),
            (
                "qubes: [{name: n, ip: 10.137.0.1, uplink: true}, \
                 {name: a, ip: 10.137.0.2, netvm: b}, {name: b, ip: 10.137.0.3, netvm: a}]",
                "Loops",
            ),
            (
                "qubes: [{name: n, ip: 10.137.0.1, uplink: true, whonix: true}]",
                "exclude each other",
            ),
            (
                "qubes: [{name: n, ip: 10.137.0.1, uplink: true}, \
                 {name: w, ip: 10.137.0.2, whonix: true}]",
                "provides network but has no netvm",
            ),
            (
                "qubes: [{name: n, ip: 10.137.0.1, uplink: true}, \
                 {name: w, ip: 10.137.0.2, netvm: n, whonix: true}, \
                 {name: v, ip: 10.137.0.3, netvm: n, whonix: true}]",
                "at most one qube has whonix",
            ),
        ];
        for (text, want) in cases {
            let got = TopologySpec::parse(text).and_then(|s| s.resolve("x"));
            match got {
                Ok(_) => panic!("accepted: {text}"),
                Err(e) => assert!(e.0.contains(want), "{text}: {e}"),
            }
        }
    }

    #[test]
    fn lab_names() {
        assert!(check_lab_name("lab").is_ok());
        assert!(check_lab_name("t12345601").is_ok());
        for bad in ["", "1ab", "a-b", "Lab", "a_b", "abcdefghijklmnopqrstu"] {
            assert!(check_lab_name(bad).is_err(), "{bad}");
        }
    }
}
