//! A netvm's configuration file (`<state>/<netvm>.yaml`): its uplink, the QubesDB tree dom0
//! would write into it, and its client vifs. `sys-firewall run --config` reads the one of the
//! pluggable sys-firewall; the Linux netvms' agent reads theirs the same way (docs/lab.md).
//!
//! ```yaml
//! uplink: { name: eth0, mtu: 1500 }
//! qubesdb:
//!   /qubes-ip: "10.137.0.6"
//!   /qubes-firewall/10.137.0.10: ""
//!   /qubes-firewall/10.137.0.10/policy: "drop"
//!   /qubes-firewall/10.137.0.10/0000: "action=accept"
//! vifs:
//!   - { name: vif3.0, ip: 10.137.0.10, mac: "00:16:3e:5e:6c:0a" }
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use qubes_rules::rule::Family;
use qubes_rules::Rule;
use serde::{Deserialize, Serialize};

use crate::cmd::{io_err, Error, Result};
use crate::state::write_atomic;
use crate::topology::{Qube, Role, Topology, VIRTUAL_DNS};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Uplink {
    pub name: String,
    pub mtu: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vif {
    pub name: String,
    pub ip: Ipv4Addr,
    pub mac: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetvmConfig {
    pub uplink: Uplink,
    pub qubesdb: BTreeMap<String, String>,
    pub vifs: Vec<Vif>,
    /// The service's connection table size (`up --conntrack-max`); none: its default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conntrack_max: Option<usize>,
    /// sys-whonix's Tor client: where it keeps its state, and the world's private network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tor: Option<TorConfig>,
}

/// The `tor:` section sys-whonix reads (docs/whonix.md): a client of the lab's private Tor
/// network, not the public one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TorConfig {
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub network: TorNetwork,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TorNetwork {
    /// The directory authorities' v3 identities.
    pub authorities: Vec<String>,
    pub fallbacks: Vec<TorFallback>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TorFallback {
    pub rsa_identity: String,
    pub ed_identity: String,
    pub orport: String,
}

/// The MTU of every lab link (veth default, and Xen's).
pub const MTU: u32 = 1500;

const NETMASK: &str = "255.255.255.255";

/// A YAML double-quoted scalar.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A key as a plain scalar when it is made of path characters, else quoted.
fn key(s: &str) -> String {
    let plain = s.starts_with('/')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b));
    if plain {
        s.to_string()
    } else {
        quoted(s)
    }
}

impl NetvmConfig {
    /// The file's text: flow style for the uplink and the vifs, one key per line for the tree,
    /// every tree value double-quoted.
    pub fn to_yaml(&self, header: &str) -> String {
        let mut out = String::new();
        for line in header.lines() {
            out.push_str(&format!("# {line}\n"));
        }
        out.push_str(&format!(
            "uplink: {{ name: {}, mtu: {} }}\n",
            quoted(&self.uplink.name),
            self.uplink.mtu
        ));
        if let Some(n) = self.conntrack_max {
            out.push_str(&format!("conntrack_max: {n}\n"));
        }
        out.push_str("qubesdb:\n");
        for (k, v) in &self.qubesdb {
            out.push_str(&format!("  {}: {}\n", key(k), quoted(v)));
        }
        if let Some(t) = &self.tor {
            out.push_str("tor:\n");
            out.push_str(&format!(
                "  state_dir: {}\n",
                quoted(&t.state_dir.to_string_lossy())
            ));
            out.push_str(&format!(
                "  cache_dir: {}\n",
                quoted(&t.cache_dir.to_string_lossy())
            ));
            out.push_str("  network:\n    authorities:\n");
            for a in &t.network.authorities {
                out.push_str(&format!("      - {}\n", quoted(a)));
            }
            out.push_str("    fallbacks:\n");
            for f in &t.network.fallbacks {
                out.push_str(&format!(
                    "      - {{ rsa_identity: {}, ed_identity: {}, orport: {} }}\n",
                    quoted(&f.rsa_identity),
                    quoted(&f.ed_identity),
                    quoted(&f.orport)
                ));
            }
        }
        if self.vifs.is_empty() {
            out.push_str("vifs: []\n");
        } else {
            out.push_str("vifs:\n");
            for v in &self.vifs {
                out.push_str(&format!(
                    "  - {{ name: {}, ip: {}, mac: {} }}\n",
                    quoted(&v.name),
                    v.ip,
                    quoted(&v.mac)
                ));
            }
        }
        out
    }

    pub fn parse(text: &str) -> Result<Self> {
        serde_yaml::from_str(text).map_err(|e| Error(e.to_string()))
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path).map_err(io_err("cannot read", path))?;
        Self::parse(&text).map_err(|e| Error(format!("{}: {e}", path.display())))
    }

    /// Replaces the file atomically (temporary file + rename): the service sees the old or the
    /// new configuration, never half of one.
    pub fn write(&self, path: &Path) -> Result<()> {
        let header = "written by qubes-lab: the QubesDB tree dom0 would write into this netvm \
                      (docs/lab.md)";
        write_atomic(path, self.to_yaml(header).as_bytes())
    }

    /// The entries under `/qubes-firewall/<ip>/`, with their full keys.
    pub fn firewall_entries(&self, ip: &str) -> Vec<(String, String)> {
        let prefix = format!("/qubes-firewall/{ip}/");
        self.qubesdb
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The client addresses that have rules: the agent's `list_targets()`.
    pub fn firewall_targets(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for k in self.qubesdb.keys() {
            if let Some(rest) = k.strip_prefix("/qubes-firewall/") {
                let target = rest.split('/').next().unwrap_or("");
                if !target.is_empty() && !out.iter().any(|t| t == target) {
                    out.push(target.to_string());
                }
            }
        }
        out
    }

    /// What dom0 does when a client's rules change (reference 1.7): remove its entries, write
    /// the new ones, then the base key `/qubes-firewall/<ip>` last, which is what the agent
    /// watches.
    pub fn set_firewall(&mut self, ip: &str, entries: &[(String, String)]) {
        let prefix = format!("/qubes-firewall/{ip}/");
        self.qubesdb.retain(|k, _| !k.starts_with(&prefix));
        for (k, v) in entries {
            self.qubesdb.insert(format!("{prefix}{k}"), v.clone());
        }
        self.qubesdb
            .insert(format!("/qubes-firewall/{ip}"), String::new());
    }

    /// Adds a client vif (replacing one of the same name), keeping the list in the order a
    /// QubesDB listing gives (our service reads `/qubes-vif/<name>/` in QubesDB mode): sorted
    /// by name as strings, so `vif10.0` comes before `vif3.0`.
    pub fn insert_vif(&mut self, vif: Vif) {
        self.vifs.retain(|v| v.name != vif.name);
        self.vifs.push(vif);
        self.vifs.sort_by(|a, b| a.name.cmp(&b.name));
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.qubesdb.get(key).map(String::as_str)
    }
}

/// The current UNIX time in seconds (rule expiry).
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The QubesDB entries of a client's rules, as dom0 writes them (`policy`, `0000`, ...).
pub fn rule_entries(rules: &[Rule]) -> Vec<(String, String)> {
    qubes_rules::firewall::qubesdb_entries(rules, Family::V4, now())
}

/// A netvm's configuration as dom0 would write it (reference 4.2, `create_qdb_entries`), with
/// the client rules taken from `rules_of`.
pub fn build(
    topo: &Topology,
    netvm: &Qube,
    rules_of: &dyn Fn(&Qube) -> Result<Vec<Rule>>,
) -> Result<NetvmConfig> {
    let mut db = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        db.insert(k.to_string(), v);
    };
    let own_ip = netvm
        .ip
        .ok_or_else(|| Error(format!("{} provides network but has no ip", netvm.name)))?
        .to_string();
    put("/name", netvm.name.clone());
    let vm_type = match (netvm.role, topo.netvm_of(netvm)) {
        (Role::Uplink, _) | (_, None) => "NetVM",
        _ => "ProxyVM",
    };
    put("/qubes-vm-type", vm_type.to_string());
    if let Some(up) = topo.netvm_of(netvm) {
        let gw = up
            .ip
            .ok_or_else(|| Error(format!("{} provides network but has no ip", up.name)))?;
        put("/qubes-mac", netvm.mac.clone());
        put("/qubes-ip", own_ip.clone());
        put("/qubes-netmask", NETMASK.to_string());
        put("/qubes-gateway", gw.to_string());
        put("/qubes-primary-dns", VIRTUAL_DNS[0].to_string());
        put("/qubes-secondary-dns", VIRTUAL_DNS[1].to_string());
    }
    put("/qubes-netvm-network", own_ip.clone());
    put("/qubes-netvm-gateway", own_ip.clone());
    put("/qubes-netvm-netmask", NETMASK.to_string());
    put("/qubes-netvm-primary-dns", VIRTUAL_DNS[0].to_string());
    put("/qubes-netvm-secondary-dns", VIRTUAL_DNS[1].to_string());
    let mut cfg = NetvmConfig {
        uplink: Uplink {
            name: "eth0".to_string(),
            mtu: MTU,
        },
        qubesdb: db,
        vifs: Vec::new(),
        conntrack_max: None,
        tor: None,
    };
    let mut connected = Vec::new();
    for c in topo.clients_of(netvm) {
        let (Some(ip), Some(vif)) = (c.ip, c.vif()) else {
            continue;
        };
        let ip_s = ip.to_string();
        connected.push(ip_s.clone());
        cfg.qubesdb
            .insert(format!("/mapped-ip/{ip_s}/visible-ip"), ip_s.clone());
        cfg.qubesdb
            .insert(format!("/mapped-ip/{ip_s}/visible-gateway"), own_ip.clone());
        let rules = rules_of(c)?;
        cfg.set_firewall(&ip_s, &rule_entries(&rules));
        cfg.insert_vif(Vif {
            name: vif,
            ip,
            mac: c.mac.clone(),
        });
    }
    cfg.qubesdb
        .insert("/connected-ips".to_string(), connected.join(" "));
    cfg.qubesdb
        .insert("/connected-ips6".to_string(), String::new());
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::TopologySpec;

    fn default_rules(q: &Qube) -> Result<Vec<Rule>> {
        Ok(q.rules.clone().unwrap_or_else(|| vec![Rule::accept_all()]))
    }

    #[test]
    fn sys_firewall_config_is_what_dom0_writes() {
        let topo = TopologySpec::default_spec()
            .and_then(|s| s.resolve("lab"))
            .expect("topology");
        let fw = topo.get("sys-firewall").expect("q");
        let cfg = build(&topo, fw, &default_rules).expect("config");
        let get = |k: &str| cfg.get(k).unwrap_or("<missing>").to_string();
        assert_eq!(get("/qubes-ip"), "10.137.0.6");
        assert_eq!(get("/qubes-gateway"), "10.137.0.5");
        assert_eq!(get("/qubes-mac"), "00:16:3e:5e:6c:06");
        assert_eq!(get("/qubes-vm-type"), "ProxyVM");
        // sys-whonix is one more client of sys-firewall.
        assert_eq!(
            get("/connected-ips"),
            "10.137.0.10 10.137.0.11 10.137.0.12 10.137.0.8"
        );
        assert_eq!(get("/qubes-firewall/10.137.0.10"), "");
        assert_eq!(get("/qubes-firewall/10.137.0.10/policy"), "drop");
        assert_eq!(get("/qubes-firewall/10.137.0.10/0000"), "action=accept");
        assert_eq!(
            get("/qubes-firewall/10.137.0.12/0000"),
            "action=accept specialtarget=dns"
        );
        assert_eq!(
            get("/qubes-firewall/10.137.0.12/0001"),
            "action=accept proto=tcp dstports=443-443"
        );
        assert_eq!(get("/qubes-firewall/10.137.0.12/0002"), "action=drop");
        assert_eq!(get("/mapped-ip/10.137.0.11/visible-gateway"), "10.137.0.6");
        assert_eq!(cfg.vifs.len(), 4);
        assert_eq!(cfg.vifs[0].name, "vif3.0");
        assert_eq!(cfg.vifs[0].mac, "00:16:3e:5e:6c:0a");
        assert_eq!(
            cfg.firewall_targets(),
            ["10.137.0.10", "10.137.0.11", "10.137.0.12", "10.137.0.8"]
        );
        let gw = build(&topo, topo.get("sys-whonix").expect("q"), &default_rules).expect("cfg");
        assert_eq!(gw.get("/qubes-ip"), Some("10.137.0.8"));
        assert_eq!(gw.get("/qubes-gateway"), Some("10.137.0.6"));
        assert_eq!(gw.get("/qubes-netvm-gateway"), Some("10.137.0.8"));
        assert_eq!(gw.get("/connected-ips"), Some("10.137.0.13"));
        assert_eq!(gw.vifs[0].name, "vif8.0");
        let net = build(&topo, topo.get("sys-net").expect("q"), &default_rules).expect("cfg");
        assert_eq!(net.get("/qubes-vm-type"), Some("NetVM"));
        assert_eq!(net.get("/qubes-ip"), None);
        assert_eq!(net.get("/connected-ips"), Some("10.137.0.6"));
        assert_eq!(net.vifs[0].name, "vif2.0");
    }

    #[test]
    fn yaml_round_trips_and_looks_like_the_documented_format() {
        let topo = TopologySpec::default_spec()
            .and_then(|s| s.resolve("lab"))
            .expect("topology");
        let cfg =
            build(&topo, topo.get("sys-firewall").expect("q"), &default_rules).expect("config");
        let text = cfg.to_yaml("a header");
        assert!(text.starts_with("# a header\nuplink: { name: \"eth0\", mtu: 1500 }\nqubesdb:\n"));
        assert!(text.contains("  /qubes-firewall/10.137.0.10: \"\"\n"));
        assert!(text.contains("  /qubes-firewall/10.137.0.10/policy: \"drop\"\n"));
        assert!(text
            .contains("  - { name: \"vif3.0\", ip: 10.137.0.10, mac: \"00:16:3e:5e:6c:0a\" }\n"));
        assert_eq!(NetvmConfig::parse(&text).expect("parses"), cfg);
        // The example of docs/lab.md parses too.
        let doc = "uplink: { name: eth0, mtu: 1500 }\nqubesdb:\n  /qubes-ip: 10.137.0.6\n  \
                   /qubes-mac: \"00:16:3e:5e:6c:06\"\n  /qubes-firewall/10.137.0.10: \"\"\n\
                   vifs:\n  - { name: vif3.0, ip: 10.137.0.10, mac: \"00:16:3e:5e:6c:10\" }\n";
        let parsed = NetvmConfig::parse(doc).expect("doc example");
        assert_eq!(parsed.get("/qubes-ip"), Some("10.137.0.6"));
        // `up --conntrack-max`: one more top-level key, the service's, kept through a rewrite.
        let mut small = cfg.clone();
        small.conntrack_max = Some(1024);
        let text = small.to_yaml("h");
        assert!(text.contains("\nconntrack_max: 1024\nqubesdb:\n"), "{text}");
        assert_eq!(NetvmConfig::parse(&text).expect("parses"), small);
        // sys-whonix's tor section, as sys-whonix reads it.
        let mut gw = cfg.clone();
        gw.tor = Some(TorConfig {
            state_dir: "/run/x/state".into(),
            cache_dir: "/run/x/cache".into(),
            network: TorNetwork {
                authorities: vec!["AB".repeat(20)],
                fallbacks: vec![TorFallback {
                    rsa_identity: "CD".repeat(20),
                    ed_identity: "edkey".into(),
                    orport: "198.18.0.41:9001".into(),
                }],
            },
        });
        let text = gw.to_yaml("h");
        assert!(
            text.contains("tor:\n  state_dir: \"/run/x/state\"\n"),
            "{text}"
        );
        assert!(text.contains("orport: \"198.18.0.41:9001\" }\n"), "{text}");
        assert_eq!(NetvmConfig::parse(&text).expect("parses"), gw);
        // The services' own reader takes it, checks included (40 hex digits per identity).
        let read = qubes_service_runtime::config_file::ConfigFile::from_yaml(&text)
            .expect("sys-whonix reads it");
        assert_eq!(
            read.tor.and_then(|t| t.network).map(|n| n.fallbacks.len()),
            Some(1)
        );
    }

    #[test]
    fn set_firewall_replaces_a_clients_entries() {
        let mut cfg = NetvmConfig {
            uplink: Uplink {
                name: "eth0".into(),
                mtu: 1500,
            },
            qubesdb: BTreeMap::new(),
            vifs: vec![],
            conntrack_max: None,
            tor: None,
        };
        let e = |k: &str, v: &str| (k.to_string(), v.to_string());
        cfg.set_firewall(
            "10.137.0.10",
            &[
                e("policy", "drop"),
                e("0000", "action=accept"),
                e("0001", "action=drop"),
            ],
        );
        cfg.set_firewall("10.137.0.11", &[e("policy", "drop")]);
        cfg.set_firewall(
            "10.137.0.10",
            &[e("policy", "drop"), e("0000", "action=drop")],
        );
        assert_eq!(
            cfg.firewall_entries("10.137.0.10"),
            [
                e("/qubes-firewall/10.137.0.10/0000", "action=drop"),
                e("/qubes-firewall/10.137.0.10/policy", "drop")
            ]
        );
        assert_eq!(cfg.firewall_entries("10.137.0.11").len(), 1);
    }

    #[test]
    fn vifs_are_kept_sorted_as_strings() {
        let mut cfg = NetvmConfig {
            uplink: Uplink {
                name: "eth0".into(),
                mtu: 1500,
            },
            qubesdb: BTreeMap::new(),
            vifs: vec![],
            conntrack_max: None,
            tor: None,
        };
        let vif = |name: &str, last: u8| Vif {
            name: name.to_string(),
            ip: Ipv4Addr::new(10, 137, 0, last),
            mac: format!("00:16:3e:5e:6c:{last:02x}"),
        };
        cfg.insert_vif(vif("vif3.0", 10));
        cfg.insert_vif(vif("vif5.0", 12));
        cfg.insert_vif(vif("vif10.0", 11));
        cfg.insert_vif(vif("vif5.0", 12));
        let names: Vec<&str> = cfg.vifs.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["vif10.0", "vif3.0", "vif5.0"]);
    }
}
