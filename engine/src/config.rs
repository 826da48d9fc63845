//! What the engine is told: its own addresses, the client vifs and their rules.
//!
//! The engine never reads QubesDB or files itself. A shell builds an [`EngineConfig`], usually
//! with [`from_tree`] from the QubesDB key/value tree (the keys qubes-core-admin
//! `qubes/vm/mix/net.py` writes) plus the
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
/// A vif's MTU when nothing configures one: Ethernet's, and a Xen vif's default.
pub const DEFAULT_MTU: u16 = 1500;
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
    /// The addresses the client itself is configured with, when dom0's `net.fake-ip` makes
    /// them differ from the real ones (`/mapped-ip/<ip>/visible-ip` and `visible-gateway`):
    /// its traffic is translated on the vif, and its IPv6 dropped ([`Visible`]).
    pub visible: Option<Visible>,
}

/// A client's own view of its addressing, when it differs from the rest of the chain.
///
/// Upstream (qubes-core-agent-linux `network/vif-route-qubes`) sources
/// `network/vif-qubes-nat.sh` when both `/mapped-ip/<ip>/visible-ip` and `visible-gateway`
/// are set and the visible address differs from the real one; that script puts the vif in a
/// namespace whose nftables `antispoof` table rewrites the addresses statelessly and disables
/// IPv6 on the vif.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Visible {
    /// The address the client is configured with (`visible-ip`).
    pub ip: Ipv4Addr,
    /// The gateway the client is configured with (`visible-gateway`).
    pub gateway: Ipv4Addr,
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
    /// host stack and carried over Tor). Nothing from a client ever reaches the uplink, and
    /// fragments from clients are dropped (counted as unsupported), never reassembled.
    Terminate,
}

/// DNS redirection for one virtual resolver (upstream qubes-core-agent-linux
/// `network/qubes-setup-dnat-to-ns`): client queries to `virtual_ip` port 53 (UDP and TCP) go
/// to `upstream`, and the answers come back from `virtual_ip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsRedirect {
    pub virtual_ip: Ipv4Addr,
    /// `None`: no upstream resolver is known; queries are refused at once with ICMP port
    /// unreachable (upstream drops them, which leaves clients waiting for a timeout).
    pub upstream: Option<Ipv4Addr>,
}

/// Pairs the virtual resolvers with the upstream ones as the agent does:
/// `zip(virtual, cycle(upstream))`, so one upstream serves both virtual addresses; with none,
/// every virtual resolver refuses.
pub fn pair_dns(virtual_dns: &[Ipv4Addr], upstream: &[Ipv4Addr]) -> Vec<DnsRedirect> {
    virtual_dns
        .iter()
        .enumerate()
        .map(|(i, &v)| DnsRedirect {
            virtual_ip: v,
            upstream: (!upstream.is_empty()).then(|| upstream[i % upstream.len()]),
        })
        .collect()
}

/// Everything the engine needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    pub uplink: UplinkConfig,
    /// The address clients use as their gateway when it is not the uplink address: sys-net's
    /// `/qubes-netvm-gateway`, while its uplink address comes from DHCP. `None`: the uplink
    /// address, as for every Qubes 4 provider behind another one (a provider's gateway is its
    /// own visible IP, qubes-core-admin `qubes/vm/mix/net.py`).
    pub client_gateway: Option<Ipv4Addr>,
    /// The same for IPv6 (`/qubes-netvm-gateway6`); `None`: the uplink's IPv6 address.
    pub client_gateway6: Option<Ipv6Addr>,
    /// DNS redirection (sys-net); empty: queries to the virtual resolvers are forwarded as
    /// they are, to the netvm, which redirects them (sys-firewall).
    pub dns_redirect: Vec<DnsRedirect>,
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

/// A configuration that cannot be used, naming the key or vif at fault and what to write
/// instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// A key the service cannot do without is missing (`/qubes-ip`, `/qubes-gateway`).
    MissingKey {
        key: &'static str,
        why: &'static str,
    },
    /// A key's value is not an address of the kind the key holds.
    BadAddress { key: String, value: String },
    /// A MAC address that is not `aa:bb:cc:dd:ee:ff` (`key` names where it came from).
    BadMac { key: Option<String>, value: String },
    /// An interface name Linux would not accept (1-15 characters of `[A-Za-z0-9._-]`).
    BadIfname { what: &'static str, name: String },
    /// The same vif twice, or a vif that is also the uplink.
    DuplicateVif { name: String, also_uplink: bool },
    /// Two vifs (or a vif and the service itself) with one address.
    AddressInUse { vif: String, addr: Ipv4Addr },
    /// A `/mapped-ip/<ip>/...` value no client can be configured with (`why` says which rule
    /// it breaks).
    BadVisible {
        key: String,
        value: String,
        why: &'static str,
    },
    /// An interface MTU below the IPv4 minimum of 68 (RFC 791, "Fragmentation"): no packet
    /// could be fragmented to fit it.
    BadMtu { iface: String, mtu: u16 },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::MissingKey { key, why } => write!(f, "{key} is missing: {why}"),
            ConfigError::BadAddress { key, value } => {
                write!(f, "{key}: {value:?} is not a valid address")
            }
            ConfigError::BadMac { key, value } => {
                if let Some(k) = key {
                    write!(f, "{k}: ")?;
                }
                write!(f, "{value:?} is not a MAC address (want aa:bb:cc:dd:ee:ff)")
            }
            ConfigError::BadIfname { what, name } => {
                write!(f, "{what} {name:?} is not a valid interface name")
            }
            ConfigError::DuplicateVif { name, also_uplink } => {
                if *also_uplink {
                    write!(f, "vif {name} is also the uplink")
                } else {
                    write!(f, "vif {name} is listed twice")
                }
            }
            ConfigError::AddressInUse { vif, addr } => {
                write!(f, "vif {vif}: address {addr} is already in use")
            }
            ConfigError::BadVisible { key, value, why } => write!(f, "{key}: {value:?} {why}"),
            ConfigError::BadMtu { iface, mtu } => write!(
                f,
                "{iface}: MTU {mtu} is below {} (RFC 791: every IPv4 link carries 68 bytes)",
                crate::frag::MIN_MTU
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<Mac, ConfigError> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    let bad = || ConfigError::BadMac {
        key: None,
        value: s.to_string(),
    };
    if parts.len() != 6 {
        return Err(bad());
    }
    for (b, p) in mac.iter_mut().zip(&parts) {
        *b = match (p.len(), u8::from_str_radix(p, 16)) {
            (2, Ok(v)) => v,
            _ => return Err(bad()),
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
        Some(v) => v.parse().map(Some).map_err(|_| ConfigError::BadAddress {
            key: k.to_string(),
            value: v.to_string(),
        }),
    }
}

/// The uplink of the netvm at the end of the chain (sys-net): its address, router and DNS
/// servers come from DHCP or from static configuration, not from QubesDB (a netvm has no
/// netvm of its own, so dom0 writes no `/qubes-ip` for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetvmUplink {
    pub ip: Ipv4Addr,
    pub router: Ipv4Addr,
    /// Upstream DNS servers, in order.
    pub dns: Vec<Ipv4Addr>,
    /// The uplink device's MAC.
    pub mac: Mac,
}

/// [`from_tree`] for a netvm (sys-net): the uplink is `up`; the clients' gateway is
/// `/qubes-netvm-gateway` (and `-gateway6`), as dom0 writes it for a qube that provides
/// network; queries to the virtual resolvers (`/qubes-netvm-primary-dns`, `-secondary-dns`)
/// are redirected to `up.dns`, paired as the agent pairs them ([`pair_dns`]).
pub fn from_tree_netvm(
    tree: &BTreeMap<String, String>,
    vifs: &[VifInfo],
    uplink_name: &str,
    uplink_mtu: u16,
    up: &NetvmUplink,
) -> Result<EngineConfig, ConfigError> {
    let gateway: Ipv4Addr =
        parse_key(tree, "/qubes-netvm-gateway")?.ok_or(ConfigError::MissingKey {
            key: "/qubes-netvm-gateway",
            why: "the netvm's clients need a gateway address",
        })?;
    let gateway6: Option<Ipv6Addr> = parse_key(tree, "/qubes-netvm-gateway6")?;
    let mut t = tree.clone();
    // The uplink is ours, not dom0's: an address learnt by DHCP replaces anything the tree
    // might say, and IPv6 on the uplink is not configured here.
    t.insert("/qubes-ip".into(), up.ip.to_string());
    t.insert("/qubes-gateway".into(), up.router.to_string());
    t.insert("/qubes-mac".into(), format_mac(&up.mac));
    t.remove("/qubes-ip6");
    t.remove("/qubes-gateway6");
    let mut cfg = from_tree(&t, vifs, uplink_name, uplink_mtu)?;
    if let Some(c) = cfg.clients.iter().find(|c| c.ip == gateway) {
        return Err(ConfigError::AddressInUse {
            vif: c.vif.clone(),
            addr: gateway,
        });
    }
    cfg.client_gateway = Some(gateway);
    cfg.client_gateway6 = gateway6;
    let virtual_dns: Vec<Ipv4Addr> = cfg
        .dns
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        })
        .collect();
    cfg.dns_redirect = pair_dns(&virtual_dns, &up.dns);
    Ok(cfg)
}

/// The entries of `/qubes-firewall/<addr>/` with the prefix removed (`policy`, `0000`, ...).
pub fn firewall_entries(tree: &BTreeMap<String, String>, addr: &str) -> Vec<(String, String)> {
    let prefix = format!("/qubes-firewall/{addr}/");
    tree.range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
        .map(|(k, v)| (k[prefix.len()..].to_string(), v.clone()))
        .collect()
}

/// The client's own view of its addresses from `/mapped-ip/<ip>/visible-ip` and
/// `visible-gateway`, as `vif-route-qubes` decides whether to source `vif-qubes-nat.sh`:
/// only when both are set and the visible address is not the real one (`[ -n "$appvm_ip" ] &&
/// [ -n "$appvm_gw_ip" ] && [ "$appvm_ip" != "$netvm_ip" ]`). dom0 writes both keys for every
/// client (reference 4.2: `visible-ip` equal to the real address without `net.fake-ip`), so
/// the usual case is no translation. Values are checked even when they turn out not to be used,
/// so a typo is not silently ignored.
fn visible_of(
    tree: &BTreeMap<String, String>,
    real: Ipv4Addr,
) -> Result<Option<Visible>, ConfigError> {
    let read = |what: &str| -> Result<Option<Ipv4Addr>, ConfigError> {
        let k = format!("/mapped-ip/{real}/{what}");
        let Some(a) = parse_key::<Ipv4Addr>(tree, &k)? else {
            return Ok(None);
        };
        // A host cannot be configured with these (dom0 validates the features only as IPv4
        // addresses, qubes/vm/mix/net.py); translating to them would make packets no router
        // forwards.
        let why = if a.is_unspecified() {
            Some("is the unspecified address")
        } else if a.is_broadcast() || a.is_multicast() {
            Some("is not a unicast address")
        } else if a.is_loopback() {
            Some("is a loopback address")
        } else {
            None
        };
        match why {
            Some(why) => Err(ConfigError::BadVisible {
                key: k,
                value: a.to_string(),
                why,
            }),
            None => Ok(Some(a)),
        }
    };
    let ip = read("visible-ip")?;
    let gateway = read("visible-gateway")?;
    match (ip, gateway) {
        (Some(ip), Some(gateway)) if ip != real => {
            if ip == gateway {
                return Err(ConfigError::BadVisible {
                    key: format!("/mapped-ip/{real}/visible-gateway"),
                    value: gateway.to_string(),
                    why: "is the client's own visible address",
                });
            }
            Ok(Some(Visible { ip, gateway }))
        }
        _ => Ok(None),
    }
}

/// Builds the engine configuration from a QubesDB-shaped tree and the vif list.
///
/// Keys read (reference 4.2): `/qubes-ip`, `/qubes-gateway`, `/qubes-mac`, `/qubes-ip6`,
/// `/qubes-gateway6`, `/qubes-netvm-primary-dns`, `/qubes-netvm-secondary-dns` (default: the
/// virtual DNS 10.139.1.1 and 10.139.1.2), `/qubes-firewall/<client ip>/...` and
/// `/mapped-ip/<client ip>/visible-ip`, `visible-gateway` ([`Visible`]).
pub fn from_tree(
    tree: &BTreeMap<String, String>,
    vifs: &[VifInfo],
    uplink_name: &str,
    uplink_mtu: u16,
) -> Result<EngineConfig, ConfigError> {
    let ip: Ipv4Addr = parse_key(tree, "/qubes-ip")?.ok_or(ConfigError::MissingKey {
        key: "/qubes-ip",
        why: "the firewall needs its own address",
    })?;
    let gateway: Ipv4Addr = parse_key(tree, "/qubes-gateway")?.ok_or(ConfigError::MissingKey {
        key: "/qubes-gateway",
        why: "the firewall needs its netvm's address",
    })?;
    let mac = match key(tree, "/qubes-mac") {
        Some(m) => parse_mac(m).map_err(|_| ConfigError::BadMac {
            key: Some("/qubes-mac".into()),
            value: m.to_string(),
        })?,
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
        return Err(ConfigError::BadIfname {
            what: "uplink",
            name: uplink_name.to_string(),
        });
    }
    let mut clients = Vec::with_capacity(vifs.len());
    for v in vifs {
        if !valid_ifname(&v.name) {
            return Err(ConfigError::BadIfname {
                what: "vif",
                name: v.name.clone(),
            });
        }
        if v.name == uplink_name || clients.iter().any(|c: &ClientConfig| c.vif == v.name) {
            return Err(ConfigError::DuplicateVif {
                name: v.name.clone(),
                also_uplink: v.name == uplink_name,
            });
        }
        if clients.iter().any(|c: &ClientConfig| c.ip == v.ip) || v.ip == ip {
            return Err(ConfigError::AddressInUse {
                vif: v.name.clone(),
                addr: v.ip,
            });
        }
        clients.push(ClientConfig {
            vif: v.name.clone(),
            ip: v.ip,
            ip6: v.ip6,
            mac: v.mac,
            mtu: DEFAULT_MTU,
            rules: firewall_entries(tree, &v.ip.to_string()),
            rules6: v
                .ip6
                .map(|a| firewall_entries(tree, &a.to_string()))
                .unwrap_or_default(),
            visible: visible_of(tree, v.ip)?,
        });
    }
    Ok(EngineConfig {
        mode: UplinkMode::Masquerade,
        client_gateway: None,
        client_gateway6: None,
        dns_redirect: Vec::new(),
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

    #[test]
    fn virtual_resolvers_pair_as_the_agent_pairs_them() {
        let v = [VIRTUAL_DNS[0], VIRTUAL_DNS[1]];
        let a = Ipv4Addr::new(198, 18, 0, 53);
        let b = Ipv4Addr::new(198, 18, 0, 54);
        let c = Ipv4Addr::new(198, 18, 0, 55);
        let ups = |r: Vec<DnsRedirect>| r.into_iter().map(|r| r.upstream).collect::<Vec<_>>();
        assert_eq!(ups(pair_dns(&v, &[a, b])), [Some(a), Some(b)]);
        // zip(virtual, cycle(upstream)): one upstream serves both; extra upstreams are unused.
        assert_eq!(ups(pair_dns(&v, &[a])), [Some(a), Some(a)]);
        assert_eq!(ups(pair_dns(&v, &[a, b, c])), [Some(a), Some(b)]);
        assert_eq!(ups(pair_dns(&v, &[])), [None, None]);
        assert_eq!(pair_dns(&v, &[a])[1].virtual_ip, VIRTUAL_DNS[1]);
    }

    #[test]
    fn a_netvm_takes_its_uplink_from_the_lease_and_its_clients_gateway_from_the_tree() {
        let up = NetvmUplink {
            ip: Ipv4Addr::new(198, 18, 0, 100),
            router: Ipv4Addr::new(198, 18, 0, 1),
            dns: vec![Ipv4Addr::new(198, 18, 0, 53)],
            mac: [2, 0, 0, 0, 0, 1],
        };
        let vifs = [VifInfo {
            name: "vif6.0".into(),
            ip: Ipv4Addr::new(10, 137, 0, 6),
            ip6: None,
            mac: DEFAULT_QUBE_MAC,
        }];
        let missing = from_tree_netvm(&tree(&[]), &vifs, "eth0", 1500, &up);
        assert!(
            matches!(
                missing,
                Err(ConfigError::MissingKey {
                    key: "/qubes-netvm-gateway",
                    ..
                })
            ),
            "{missing:?}"
        );
        // A tree that says otherwise about the uplink does not win over the lease.
        let t = tree(&[
            ("/qubes-netvm-gateway", "10.137.0.5"),
            ("/qubes-ip", "10.137.0.99"),
        ]);
        let cfg = from_tree_netvm(&t, &vifs, "eth0", 1500, &up).expect("config");
        assert_eq!(cfg.uplink.ip, up.ip);
        assert_eq!(cfg.uplink.gateway, up.router);
        assert_eq!(cfg.uplink.mac, up.mac);
        assert_eq!(cfg.client_gateway, Some(Ipv4Addr::new(10, 137, 0, 5)));
        assert_eq!(cfg.dns_redirect.len(), 2);
        assert!(cfg
            .dns_redirect
            .iter()
            .all(|r| r.upstream == Some(up.dns[0])));
        // The gateway cannot also be a client's address.
        let t = tree(&[("/qubes-netvm-gateway", "10.137.0.6")]);
        let clash = from_tree_netvm(&t, &vifs, "eth0", 1500, &up);
        assert!(
            matches!(clash, Err(ConfigError::AddressInUse { .. })),
            "{clash:?}"
        );
    }

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
        assert!(
            matches!(
                e,
                ConfigError::MissingKey {
                    key: "/qubes-ip",
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "/qubes-ip is missing: the firewall needs its own address"
        );
        let e = from_tree(
            &tree(&[("/qubes-ip", "x"), ("/qubes-gateway", "10.137.0.5")]),
            &[],
            "eth0",
            1500,
        )
        .expect_err("bad ip");
        assert_eq!(e.to_string(), "/qubes-ip: \"x\" is not a valid address");
        let vif = |name: &str, ip: &str| VifInfo {
            name: name.into(),
            ip: ip.parse().expect("ip"),
            ip6: None,
            mac: DEFAULT_QUBE_MAC,
        };
        let good = tree(&[
            ("/qubes-ip", "10.137.0.6"),
            ("/qubes-gateway", "10.137.0.5"),
        ]);
        for (vifs, want) in [
            (
                vec![vif("vif3.0", "10.137.0.10"), vif("vif3.0", "10.137.0.11")],
                "vif vif3.0 is listed twice",
            ),
            (
                vec![vif("eth0", "10.137.0.10")],
                "vif eth0 is also the uplink",
            ),
            (
                vec![vif("vif3.0", "10.137.0.10"), vif("vif4.0", "10.137.0.10")],
                "vif vif4.0: address 10.137.0.10 is already in use",
            ),
            (
                vec![vif("vif 3", "10.137.0.10")],
                "vif \"vif 3\" is not a valid interface name",
            ),
        ] {
            let e = from_tree(&good, &vifs, "eth0", 1500).expect_err(want);
            assert_eq!(e.to_string(), want);
        }
        assert!(parse_mac("fe:ff:ff:ff:ff").is_err());
        assert_eq!(parse_mac("FE:ff:ff:ff:ff:ff"), Ok(GATEWAY_MAC));
    }
}
