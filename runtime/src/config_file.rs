//! The configuration file of the service qubes (and of `replay`): YAML, one schema.
//!
//! Every field but `qubesdb` is optional; unknown fields are rejected:
//!
//! ```yaml
//! uplink:                 # the interface toward the netvm
//!   name: eth0            # default eth0
//!   mtu: 1500             # default 1500
//!   address: 198.18.0.100 # sys-net only, static addressing: its own address (else DHCP);
//!   router: 198.18.0.1    #   the next hop, and the upstream DNS servers the virtual
//!   dns: [198.18.0.53]    #   resolvers are redirected to (none: DNS is refused at once)
//!   dhcp_hostname: net1   # sys-net with DHCP: a host name to send (default: none)
//! qubesdb:                # the qube's QubesDB keys, as dom0 writes them
//!   /qubes-ip: 10.137.0.6
//!   /qubes-gateway: 10.137.0.5
//!   /qubes-netvm-primary-dns: 10.139.1.1
//!   /qubes-firewall/10.137.0.10: ""
//!   /qubes-firewall/10.137.0.10/policy: drop
//!   /qubes-firewall/10.137.0.10/0000: action=accept
//! vifs:                   # the client vifs (XenStore's list, in Qubes)
//!   - name: vif3.0
//!     ip: 10.137.0.10
//!     ip6: fd09:24ef:4179::a89:a     # optional
//!     mac: 00:16:3e:5e:6c:0a         # default 00:16:3e:5e:6c:00
//!     mtu: 1500                      # optional, default 1500
//! dns:                    # static answers to the engine's name lookups
//!   web.example: {addrs: [198.18.0.10], ttl: 300}   # ttl in seconds, default 300
//! conntrack_max: 65536    # optional bound on tracked flows; the service defaults to one
//!                         # from memory as Linux (runtime `memory`), replay to 65536
//! seed: 1                 # replay only: the NAT seed (the --seed option wins over it)
//! tor:                    # sys-whonix only: its Tor client
//!   state_dir: /var/lib/sys-whonix/state     # defaults as shown
//!   cache_dir: /var/cache/sys-whonix
//!   isolate_dest_addr: false    # also isolate streams by destination address (Whonix's
//!   isolate_dest_port: false    #   IsolateDestAddr) and port (IsolateDestPort)
//!   trust_storage_permissions: false   # tests in temporary directories only
//!   network:                    # a private Tor network (tests); absent: the public one
//!     authorities: [<v3 identity, 40 hex digits>, ...]
//!     fallbacks:
//!       - {rsa_identity: <40 hex>, ed_identity: <base64>, orport: "198.18.0.20:5001"}
//! steps:                  # replay only: changes during the capture
//!   - at_packet: 3        # before input packet 3 (0-based; the packet count = after the last)
//!     qubesdb:            # keys to set, or to remove with null
//!       /qubes-firewall/10.137.0.10/0000: action=drop
//!   - at_packet: 5
//!     tick_ns: 1704067230000000000   # run the engine's timers at this time (ns, capture clock)
//!   - at_packet: 7
//!     link_mtu: {eth0: 1400}         # a link's own MTU changed (what netlink tells a service)
//!   - at_packet: 9                   # sys-net: the lease changed (a DHCP renewal)
//!     uplink: {address: 198.18.0.101, router: 198.18.0.1, dns: [198.18.0.54]}
//! ```
//!
//! `link_mtu` stands for the device: a service reads each link's MTU from the kernel and
//! follows its changes; the `mtu` keys above can only lower it (the effective MTU is the
//! smaller of the two, flows are kept).
//!
//! In a running service, names missing from `dns` are looked up through the uplink; in a
//! replay they fail to resolve. serde_yaml is used only here, so it can be swapped for a
//! maintained fork without touching callers.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use qubes_engine::config::{self, EngineConfig, Mac, VifInfo, DEFAULT_QUBE_MAC};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::error::ConfigError;

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        file: None,
        error: msg.into(),
    }
}

fn default_uplink_name() -> String {
    "eth0".to_string()
}

fn default_mtu() -> u16 {
    1500
}

fn default_ttl() -> u32 {
    300
}

fn default_mac() -> Mac {
    DEFAULT_QUBE_MAC
}

/// The `uplink` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkSection {
    #[serde(default = "default_uplink_name")]
    pub name: String,
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// sys-net with static addressing (and replays of sys-net): the uplink's own address.
    /// Without it, sys-net asks DHCP; sys-firewall never sets it (its address is `/qubes-ip`).
    #[serde(default)]
    pub address: Option<Ipv4Addr>,
    /// With `address`: the router behind the uplink.
    #[serde(default)]
    pub router: Option<Ipv4Addr>,
    /// With `address`: the upstream DNS servers the virtual resolvers are redirected to.
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    /// sys-net with DHCP: the host name to send (option 12). None by default: a netvm tells
    /// the network it is on nothing about its user that it need not.
    #[serde(default)]
    pub dhcp_hostname: Option<String>,
}

impl Default for UplinkSection {
    fn default() -> Self {
        UplinkSection {
            name: default_uplink_name(),
            mtu: default_mtu(),
            address: None,
            router: None,
            dns: Vec::new(),
            dhcp_hostname: None,
        }
    }
}

/// A replay step's new uplink lease (sys-net): what a DHCP renewal with other values gives.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseChange {
    pub address: Ipv4Addr,
    pub router: Ipv4Addr,
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
}

/// One entry of `vifs`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VifEntry {
    pub name: String,
    pub ip: Ipv4Addr,
    #[serde(default)]
    pub ip6: Option<Ipv6Addr>,
    #[serde(default = "default_mac", deserialize_with = "de_mac")]
    pub mac: Mac,
    #[serde(default)]
    pub mtu: Option<u16>,
}

/// One entry of `dns`: the answer to a name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsEntry {
    pub addrs: Vec<IpAddr>,
    /// Seconds.
    #[serde(default = "default_ttl")]
    pub ttl: u32,
}

fn default_state_dir() -> std::path::PathBuf {
    "/var/lib/sys-whonix/state".into()
}

fn default_cache_dir() -> std::path::PathBuf {
    "/var/cache/sys-whonix".into()
}

/// A relay of a private Tor network that a client asks for the directory first.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TorFallback {
    pub rsa_identity: String,
    pub ed_identity: String,
    /// `address:port` of its OR port.
    pub orport: String,
}

/// `tor.network`: a Tor network other than the public one.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TorNetworkSection {
    /// The directory authorities' v3 identities.
    pub authorities: Vec<String>,
    pub fallbacks: Vec<TorFallback>,
}

/// The `tor` section (sys-whonix).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TorSection {
    #[serde(default = "default_state_dir")]
    pub state_dir: std::path::PathBuf,
    #[serde(default = "default_cache_dir")]
    pub cache_dir: std::path::PathBuf,
    #[serde(default)]
    pub isolate_dest_addr: bool,
    #[serde(default)]
    pub isolate_dest_port: bool,
    #[serde(default)]
    pub trust_storage_permissions: bool,
    #[serde(default)]
    pub network: Option<TorNetworkSection>,
}

impl Default for TorSection {
    fn default() -> Self {
        TorSection {
            state_dir: default_state_dir(),
            cache_dir: default_cache_dir(),
            isolate_dest_addr: false,
            isolate_dest_port: false,
            trust_storage_permissions: false,
            network: None,
        }
    }
}

/// One entry of `steps`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Done just before this input packet (0-based); the packet count means after the last.
    pub at_packet: usize,
    /// QubesDB keys to set (a value) or remove (null).
    #[serde(default, deserialize_with = "de_qdb_changes")]
    pub qubesdb: BTreeMap<String, Option<String>>,
    /// Runs the engine's timers at this time (ns, the capture's clock).
    #[serde(default)]
    pub tick_ns: Option<u64>,
    /// Replaces the vif list (qubes started and stopped, as XenStore would show it).
    #[serde(default)]
    pub vifs: Option<Vec<VifEntry>>,
    /// Links whose device MTU changes (`ip link set mtu`, as netlink would report it), by
    /// interface name.
    #[serde(default)]
    pub link_mtu: BTreeMap<String, u16>,
    /// sys-net replays: the uplink's lease changes to this.
    #[serde(default)]
    pub uplink: Option<LeaseChange>,
}

/// The configuration file of a service, and of a replay (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub uplink: UplinkSection,
    #[serde(deserialize_with = "de_qdb")]
    pub qubesdb: BTreeMap<String, String>,
    #[serde(default)]
    pub vifs: Vec<VifEntry>,
    #[serde(default)]
    pub dns: BTreeMap<String, DnsEntry>,
    #[serde(default)]
    pub conntrack_max: Option<usize>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub steps: Vec<Step>,
    /// sys-whonix: its Tor client.
    #[serde(default)]
    pub tor: Option<TorSection>,
}

/// A QubesDB value: YAML scalars of any type are taken as their text.
struct QdbValue(Option<String>);

impl<'de> Deserialize<'de> for QdbValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = QdbValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a QubesDB value (a string, number or boolean; null to remove a key)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<QdbValue, E> {
                Ok(QdbValue(Some(v.to_string())))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<QdbValue, E> {
                Ok(QdbValue(Some(v.to_string())))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<QdbValue, E> {
                Ok(QdbValue(Some(v.to_string())))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<QdbValue, E> {
                Ok(QdbValue(Some(v.to_string())))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<QdbValue, E> {
                Ok(QdbValue(Some(v.to_string())))
            }
            fn visit_unit<E: de::Error>(self) -> Result<QdbValue, E> {
                Ok(QdbValue(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<QdbValue, E> {
                Ok(QdbValue(None))
            }
        }
        d.deserialize_any(V)
    }
}

fn check_qdb_key<E: de::Error>(k: &str) -> Result<(), E> {
    if k.starts_with('/') {
        Ok(())
    } else {
        Err(E::custom(format!(
            "QubesDB key {k:?} does not start with '/'"
        )))
    }
}

fn de_qdb<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let raw = BTreeMap::<String, QdbValue>::deserialize(d)?;
    let mut map = BTreeMap::new();
    for (k, v) in raw {
        check_qdb_key(&k)?;
        match v.0 {
            Some(v) => map.insert(k, v),
            None => {
                return Err(de::Error::custom(format!(
                    "QubesDB key {k} has no value (write \"\" for an empty one; null only \
                     removes keys in steps)"
                )))
            }
        };
    }
    Ok(map)
}

fn de_qdb_changes<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, Option<String>>, D::Error> {
    let raw = BTreeMap::<String, QdbValue>::deserialize(d)?;
    let mut map = BTreeMap::new();
    for (k, v) in raw {
        check_qdb_key(&k)?;
        map.insert(k, v.0);
    }
    Ok(map)
}

fn de_mac<'de, D: Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
    let s = String::deserialize(d)?;
    config::parse_mac(&s).map_err(de::Error::custom)
}

impl ConfigFile {
    /// Parses a configuration from YAML text.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let cfg: ConfigFile = serde_yaml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: None,
            error: e.to_string(),
        })?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Reads a configuration file; errors name the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            file: path.to_path_buf(),
            error: format!("cannot read: {e}"),
        })?;
        Self::from_yaml(&text).map_err(|e| e.in_file(path))
    }

    /// Checks what the schema cannot say.
    pub fn check(&self) -> Result<(), ConfigError> {
        for (i, s) in self.steps.iter().enumerate() {
            if s.qubesdb.is_empty()
                && s.tick_ns.is_none()
                && s.vifs.is_none()
                && s.link_mtu.is_empty()
                && s.uplink.is_none()
            {
                return Err(invalid(format!(
                    "steps[{i}] (at_packet {}) has nothing to do: give qubesdb, vifs, \
                     link_mtu, uplink or tick_ns",
                    s.at_packet
                )));
            }
            if s.uplink.is_some() && self.uplink.address.is_none() {
                return Err(invalid(format!(
                    "steps[{i}]: uplink: a lease change needs a netvm uplink (uplink.address)"
                )));
            }
            for (name, &mtu) in &s.link_mtu {
                if mtu < qubes_engine::frag::MIN_MTU {
                    return Err(invalid(format!(
                        "steps[{i}]: link_mtu {name}: {mtu} is below {} (RFC 791)",
                        qubes_engine::frag::MIN_MTU
                    )));
                }
            }
        }
        let mtus = std::iter::once(("uplink.mtu".to_string(), self.uplink.mtu)).chain(
            self.vifs
                .iter()
                .filter_map(|v| v.mtu.map(|m| (format!("vifs {}: mtu", v.name), m))),
        );
        for (what, mtu) in mtus {
            if mtu < qubes_engine::frag::MIN_MTU {
                return Err(invalid(format!(
                    "{what} {mtu} is below {} (RFC 791: every IPv4 link carries 68 bytes)",
                    qubes_engine::frag::MIN_MTU
                )));
            }
        }
        match (self.uplink.address, self.uplink.router) {
            (Some(_), None) => {
                return Err(invalid(
                    "uplink.address needs uplink.router (the next hop of the uplink)",
                ))
            }
            (None, Some(_)) => return Err(invalid("uplink.router without uplink.address")),
            _ => {}
        }
        if let Some(h) = &self.uplink.dhcp_hostname {
            // RFC 2132 3.14: at least one octet; RFC 1123 2.1 host names.
            let ok = !h.is_empty()
                && h.len() <= 63
                && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !h.starts_with('-');
            if !ok {
                return Err(invalid(format!(
                    "uplink.dhcp_hostname {h:?}: 1-63 letters, digits and '-', not starting \
                     with '-'"
                )));
            }
            if self.uplink.address.is_some() {
                return Err(invalid(
                    "uplink.dhcp_hostname with uplink.address: no DHCP then",
                ));
            }
        }
        if self.uplink.address.is_none() && !self.uplink.dns.is_empty() {
            return Err(invalid(
                "uplink.dns without uplink.address (only sys-net redirects DNS)",
            ));
        }
        if let Some(net) = self.tor.as_ref().and_then(|t| t.network.as_ref()) {
            if net.authorities.is_empty() || net.fallbacks.is_empty() {
                return Err(invalid(
                    "tor.network needs at least one authority and one fallback (leave \
                     tor.network out for the public Tor network)",
                ));
            }
            for a in &net.authorities {
                if a.len() != 40 || !a.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(invalid(format!(
                        "tor.network.authorities: {a:?} is not a v3 identity (40 hex digits)"
                    )));
                }
            }
            for f in &net.fallbacks {
                if f.orport.parse::<std::net::SocketAddr>().is_err() {
                    return Err(invalid(format!(
                        "tor.network.fallbacks: orport {:?} is not address:port",
                        f.orport
                    )));
                }
            }
        }
        if self.conntrack_max == Some(0) {
            return Err(invalid("conntrack_max must be at least 1"));
        }
        for (name, d) in &self.dns {
            if name.is_empty() {
                return Err(invalid("dns: empty name"));
            }
            if d.addrs.is_empty() {
                return Err(invalid(format!(
                    "dns: {name} has no addrs (leave a name out to make it fail to resolve)"
                )));
            }
        }
        Ok(())
    }

    /// The statically configured netvm uplink (`uplink.address`), if any. The MAC is Qubes'
    /// default; a service replaces it with its device's.
    pub fn netvm_uplink(&self) -> Option<config::NetvmUplink> {
        Some(config::NetvmUplink {
            ip: self.uplink.address?,
            router: self.uplink.router?,
            dns: self.uplink.dns.clone(),
            mac: DEFAULT_QUBE_MAC,
        })
    }

    /// The vif list as XenStore would give it.
    pub fn vif_infos(&self) -> Vec<VifInfo> {
        self.vifs
            .iter()
            .map(|v| VifInfo {
                name: v.name.clone(),
                ip: v.ip,
                ip6: v.ip6,
                mac: v.mac,
            })
            .collect()
    }

    /// The engine configuration for a QubesDB tree (the configured one, or one changed by steps).
    pub fn engine_config(
        &self,
        tree: &BTreeMap<String, String>,
        seed: u64,
    ) -> Result<EngineConfig, ConfigError> {
        self.engine_config_with(tree, &self.vifs, seed)
    }

    /// [`ConfigFile::engine_config`] with another vif list (a replay step's).
    pub fn engine_config_with(
        &self,
        tree: &BTreeMap<String, String>,
        vifs: &[VifEntry],
        seed: u64,
    ) -> Result<EngineConfig, ConfigError> {
        let infos: Vec<VifInfo> = vifs
            .iter()
            .map(|v| VifInfo {
                name: v.name.clone(),
                ip: v.ip,
                ip6: v.ip6,
                mac: v.mac,
            })
            .collect();
        let mut cfg = match self.netvm_uplink() {
            Some(up) => {
                config::from_tree_netvm(tree, &infos, &self.uplink.name, self.uplink.mtu, &up)?
            }
            None => config::from_tree(tree, &infos, &self.uplink.name, self.uplink.mtu)?,
        };
        for (client, vif) in cfg.clients.iter_mut().zip(vifs) {
            if let Some(mtu) = vif.mtu {
                client.mtu = mtu;
            }
        }
        if let Some(max) = self.conntrack_max {
            cfg.conntrack_max = max;
        }
        cfg.seed = seed;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TREE: &str = "qubesdb:\n  /qubes-netvm-gateway: 10.137.0.5\n";

    fn load(uplink: &str) -> Result<ConfigFile, ConfigError> {
        let c = ConfigFile::from_yaml(&format!("uplink: {uplink}\n{TREE}"))?;
        c.check().map(|()| c)
    }

    #[test]
    fn the_tor_section_defaults_to_the_public_network_and_a_private_one_is_checked() {
        let c = ConfigFile::from_yaml(&format!("tor: {{}}\n{TREE}")).expect("empty tor");
        let t = c.tor.expect("tor");
        assert_eq!(
            t.state_dir,
            std::path::Path::new("/var/lib/sys-whonix/state")
        );
        assert!(t.network.is_none() && !t.isolate_dest_addr && !t.isolate_dest_port);
        let fb = "{rsa_identity: AB, ed_identity: x, orport: \"198.18.0.20:5001\"}";
        let auth = "0123456789abcdef0123456789ABCDEF01234567";
        let ok = format!("tor: {{network: {{authorities: [{auth}], fallbacks: [{fb}]}}}}\n{TREE}");
        let t = ConfigFile::from_yaml(&ok)
            .expect("private")
            .tor
            .expect("tor");
        assert_eq!(
            t.network.expect("net").fallbacks[0].orport,
            "198.18.0.20:5001"
        );
        let bad_auth = ok.replace(auth, "nothex");
        let e = ConfigFile::from_yaml(&bad_auth).expect_err("bad authority");
        assert!(
            e.to_string().contains("\"nothex\" is not a v3 identity"),
            "{e}"
        );
        let bad_port = ok.replace("198.18.0.20:5001", "198.18.0.20");
        let e = ConfigFile::from_yaml(&bad_port).expect_err("bad orport");
        assert!(e.to_string().contains("is not address:port"), "{e}");
        let none = format!("tor: {{network: {{authorities: [], fallbacks: []}}}}\n{TREE}");
        let e = ConfigFile::from_yaml(&none).expect_err("empty network");
        assert!(e.to_string().contains("at least one authority"), "{e}");
        let e = ConfigFile::from_yaml(&format!("tor: {{bridges: 1}}\n{TREE}")).expect_err("x");
        assert!(e.to_string().contains("bridges"), "{e}");
    }

    #[test]
    fn a_netvm_uplink_is_all_or_nothing_and_errors_say_what_is_missing() {
        let c = load("{address: 198.18.0.100, router: 198.18.0.1, dns: [198.18.0.53]}")
            .expect("static");
        let up = c.netvm_uplink().expect("a netvm uplink");
        assert_eq!(up.ip, Ipv4Addr::new(198, 18, 0, 100));
        assert_eq!(up.dns, [Ipv4Addr::new(198, 18, 0, 53)]);
        let cfg = c.engine_config(&c.qubesdb, 1).expect("engine config");
        assert_eq!(cfg.client_gateway, Some(Ipv4Addr::new(10, 137, 0, 5)));
        for (bad, says) in [
            ("{address: 198.18.0.100}", "needs uplink.router"),
            ("{router: 198.18.0.1}", "router without uplink.address"),
            ("{dns: [198.18.0.53]}", "dns without uplink.address"),
            ("{dhcp_hostname: -x}", "dhcp_hostname"),
            ("{dhcp_hostname: 'a b'}", "dhcp_hostname"),
            (
                "{address: 198.18.0.100, router: 198.18.0.1, dhcp_hostname: n1}",
                "no DHCP then",
            ),
        ] {
            let e = load(bad).map(|_| ()).expect_err(bad).to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        // DHCP with a host name, and by default none.
        let c = load("{dhcp_hostname: net1}").expect("dhcp");
        assert!(c.netvm_uplink().is_none());
        assert_eq!(c.uplink.dhcp_hostname.as_deref(), Some("net1"));
        assert_eq!(
            load("{name: eth0}").expect("dhcp").uplink.dhcp_hostname,
            None
        );
    }
}
