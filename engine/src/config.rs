//! What the engine is told: its own addresses, the client vifs and their rules.
//!
//! The engine never reads QubesDB or files itself. A shell builds an [`EngineConfig`], usually
//! with [`from_tree`] from the QubesDB key/value tree (reference qubes-networking.md 4.2) plus the
//! vif list that Qubes keeps in XenStore, so the Qubes mode and the standalone mode run the same
//! code.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An Ethernet address.
pub type Mac = [u8; 6];

/// The MAC Xen netback uses on the backend side of every vif, and the one Qubes clients expect
/// for their gateway (reference 4.1).
pub const GATEWAY_MAC: Mac = [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff];

/// Qubes' default MAC for a qube's own interface (reference 4.1).
pub const DEFAULT_QUBE_MAC: Mac = [0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x00];

/// The virtual DNS servers every client is given (reference 4.1).
pub const VIRTUAL_DNS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 139, 1, 1), Ipv4Addr::new(10, 139, 1, 2)];

/// Linux `nf_conntrack_max`-like bound on tracked flows.
pub const DEFAULT_CONNTRACK_MAX: usize = 65_536;

/// The uplink: the interface toward the netvm (sys-net).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkConfig {
    /// Interface name, `eth0` in a Qubes service qube.
    pub name: String,
    /// Our MAC on the uplink (`/qubes-mac`).
    pub mac: Mac,
    /// Our address (`/qubes-ip`): the source of NATed traffic, and the gateway address clients
    /// use (Qubes 4: a provider's gateway is its own visible IP).
    pub ip: Ipv4Addr,
    /// The netvm's address (`/qubes-gateway`).
    pub gateway: Ipv4Addr,
    /// `/qubes-ip6`, when the netvm provides IPv6.
    pub ip6: Option<Ipv6Addr>,
    /// `/qubes-gateway6`.
    pub gateway6: Option<Ipv6Addr>,
    /// Largest IP packet the uplink carries.
    pub mtu: u16,
}

/// One client qube, attached through one vif.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// The backend interface name, `vifD.0`.
    pub vif: String,
    /// The client's address; traffic from the vif with any other source is spoofed.
    pub ip: Ipv4Addr,
    /// The client's IPv6 address; without one, its IPv6 traffic is dropped.
    pub ip6: Option<Ipv6Addr>,
    /// The client's MAC (its frontend `eth0`).
    pub mac: Mac,
    /// Largest IP packet the vif carries.
    pub mtu: u16,
    /// The entries under `/qubes-firewall/<ip>/` (`policy`, `0000`, ...), as QubesDB holds them.
    pub rules: Vec<(String, String)>,
    /// The entries under `/qubes-firewall/<ip6>/`, for IPv6 traffic.
    pub rules6: Vec<(String, String)>,
}

/// Bounds on IPv4 reassembly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragLimits {
    /// Bytes held in incomplete datagrams at most (Linux `ipfrag_high_thresh` is 4 MiB).
    pub max_bytes: usize,
    /// Incomplete datagrams at most.
    pub max_datagrams: usize,
    /// Time an incomplete datagram is kept (Linux `ipfrag_time`: 30 s).
    pub timeout_ns: u64,
}

impl Default for FragLimits {
    fn default() -> Self {
        FragLimits {
            max_bytes: 4 << 20,
            max_datagrams: 1024,
            timeout_ns: 30_000_000_000,
        }
    }
}

/// What the engine does with client traffic that its rules accept: the way out, chosen per
/// service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UplinkMode {
    /// Forward it to the uplink, source-NATed to the uplink address (which may change at run
    /// time): sys-firewall, and sys-net behind its DHCP lease.
    #[default]
    Masquerade,
    /// Forward nothing: deliver it to the host stack as it is, whatever its destination, and
    /// send the host stack's answers back to the client (sys-whonix: client TCP ended in the
    /// host stack and carried over Tor). Nothing from a client ever reaches the uplink.
    Terminate,
}

/// Everything the engine needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    pub uplink: UplinkConfig,
    /// The way out for accepted client traffic.
    pub mode: UplinkMode,
    /// The DNS servers clients are given (`/qubes-netvm-primary-dns`, `-secondary-dns`): what
    /// `specialtarget=dns` matches.
    pub dns: Vec<IpAddr>,
    pub clients: Vec<ClientConfig>,
    /// Most flows tracked at once.
    pub conntrack_max: usize,
    /// Seeds NAT port choice: random in service, fixed in replay so output is exact.
    pub seed: u64,
    pub frag: FragLimits,
}

/// A configuration that cannot be used, naming the key or vif at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn cerr<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<Mac, ConfigError> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return cerr(format!(
            "{s:?} is not a MAC address (want aa:bb:cc:dd:ee:ff)"
        ));
    }
    for (b, p) in mac.iter_mut().zip(&parts) {
        *b = match (p.len(), u8::from_str_radix(p, 16)) {
            (2, Ok(v)) => v,
            _ => {
                return cerr(format!(
                    "{s:?} is not a MAC address (want aa:bb:cc:dd:ee:ff)"
                ))
            }
        };
    }
    Ok(mac)
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(m: &Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A client vif as XenStore describes it: interface name, address(es), MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VifInfo {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ip6: Option<Ipv6Addr>,
    pub mac: Mac,
}

/// Interface names Qubes gives backends: `vif<domid>.<devid>` (reference 4.4); the lab and
/// tests may use other names, which only need to be valid Linux interface names.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn key<'a>(tree: &'a BTreeMap<String, String>, k: &str) -> Option<&'a str> {
    tree.get(k).map(String::as_str).filter(|v| !v.is_empty())
}

fn parse_key<T: std::str::FromStr>(
    tree: &BTreeMap<String, String>,
    k: &str,
) -> Result<Option<T>, ConfigError> {
    match key(tree, k) {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| ConfigError(format!("{k}: {v:?} is not a valid address"))),
    }
}

/// The entries of `/qubes-firewall/<addr>/` with the prefix removed (`policy`, `0000`, ...).
pub fn firewall_entries(tree: &BTreeMap<String, String>, addr: &str) -> Vec<(String, String)> {
    let prefix = format!("/qubes-firewall/{addr}/");
    tree.range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
        .map(|(k, v)| (k[prefix.len()..].to_string(), v.clone()))
        .collect()
}

/// Builds the engine configuration from a QubesDB-shaped tree and the vif list.
///
/// Keys read (reference 4.2): `/qubes-ip`, `/qubes-gateway`, `/qubes-mac`, `/qubes-ip6`,
/// `/qubes-gateway6`, `/qubes-netvm-primary-dns`, `/qubes-netvm-secondary-dns` (default: the
/// virtual DNS 10.139.1.1 and 10.139.1.2) and `/qubes-firewall/<client ip>/...`.
pub fn from_tree(
    tree: &BTreeMap<String, String>,
    vifs: &[VifInfo],
    uplink_name: &str,
    uplink_mtu: u16,
) -> Result<EngineConfig, ConfigError> {
    let ip: Ipv4Addr = parse_key(tree, "/qubes-ip")?.ok_or_else(|| {
        ConfigError("/qubes-ip is missing: the firewall needs its own address".into())
    })?;
    let gateway: Ipv4Addr = parse_key(tree, "/qubes-gateway")?.ok_or_else(|| {
        ConfigError("/qubes-gateway is missing: the firewall needs its netvm's address".into())
    })?;
    let mac = match key(tree, "/qubes-mac") {
        Some(m) => parse_mac(m).map_err(|e| ConfigError(format!("/qubes-mac: {e}")))?,
        None => DEFAULT_QUBE_MAC,
    };
    let ip6 = parse_key(tree, "/qubes-ip6")?;
    let gateway6 = parse_key(tree, "/qubes-gateway6")?;
    let mut dns: Vec<IpAddr> = Vec::new();
    for k in ["/qubes-netvm-primary-dns", "/qubes-netvm-secondary-dns"] {
        if let Some(a) = parse_key::<IpAddr>(tree, k)? {
            dns.push(a);
        }
    }
    if dns.is_empty() {
        dns = VIRTUAL_DNS.iter().map(|a| IpAddr::V4(*a)).collect();
    }
    if !valid_ifname(uplink_name) {
        return cerr(format!(
            "uplink {uplink_name:?} is not a valid interface name"
        ));
    }
    let mut clients = Vec::with_capacity(vifs.len());
    for v in vifs {
        if !valid_ifname(&v.name) {
            return cerr(format!("vif {:?} is not a valid interface name", v.name));
        }
        if v.name == uplink_name {
            return cerr(format!("vif {} is also the uplink", v.name));
        }
        if clients.iter().any(|c: &ClientConfig| c.vif == v.name) {
            return cerr(format!("vif {} is listed twice", v.name));
        }
        if clients.iter().any(|c: &ClientConfig| c.ip == v.ip) || v.ip == ip {
            return cerr(format!(
                "vif {}: address {} is already in use",
                v.name, v.ip
            ));
        }
        clients.push(ClientConfig {
            vif: v.name.clone(),
            ip: v.ip,
            ip6: v.ip6,
            mac: v.mac,
            mtu: 1500,
            rules: firewall_entries(tree, &v.ip.to_string()),
            rules6: v
                .ip6
                .map(|a| firewall_entries(tree, &a.to_string()))
                .unwrap_or_default(),
        });
    }
    Ok(EngineConfig {
        mode: UplinkMode::Masquerade,
        uplink: UplinkConfig {
            name: uplink_name.to_string(),
            mac,
            ip,
            gateway,
            ip6,
            gateway6,
            mtu: uplink_mtu,
        },
        dns,
        clients,
        conntrack_max: DEFAULT_CONNTRACK_MAX,
        seed: 0,
        frag: FragLimits::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn builds_from_qubesdb_keys() {
        let t = tree(&[
            ("/qubes-ip", "10.137.0.6"),
            ("/qubes-gateway", "10.137.0.5"),
            ("/qubes-firewall/10.137.0.10", ""),
            ("/qubes-firewall/10.137.0.10/policy", "drop"),
            ("/qubes-firewall/10.137.0.10/0000", "action=accept"),
            ("/qubes-firewall/10.137.0.100/policy", "drop"),
        ]);
        let vifs = [VifInfo {
            name: "vif3.0".into(),
            ip: "10.137.0.10".parse().expect("ip"),
            ip6: None,
            mac: DEFAULT_QUBE_MAC,
        }];
        let c = from_tree(&t, &vifs, "eth0", 1500).expect("valid");
        assert_eq!(c.uplink.ip, Ipv4Addr::new(10, 137, 0, 6));
        assert_eq!(c.dns.len(), 2);
        assert_eq!(
            c.clients[0].rules,
            vec![
                ("0000".to_string(), "action=accept".to_string()),
                ("policy".to_string(), "drop".to_string())
            ]
        );
    }

    #[test]
    fn errors_name_the_key() {
        let e = from_tree(
            &tree(&[("/qubes-gateway", "10.137.0.5")]),
            &[],
            "eth0",
            1500,
        )
        .expect_err("missing ip");
        assert!(e.0.contains("/qubes-ip"), "{e}");
        let e = from_tree(
            &tree(&[("/qubes-ip", "x"), ("/qubes-gateway", "10.137.0.5")]),
            &[],
            "eth0",
            1500,
        )
        .expect_err("bad ip");
        assert!(e.0.contains("/qubes-ip: \"x\""), "{e}");
        assert!(parse_mac("fe:ff:ff:ff:ff").is_err());
        assert_eq!(parse_mac("FE:ff:ff:ff:ff:ff"), Ok(GATEWAY_MAC));
    }
}
