//! The configuration tree from a QubesDB daemon, with Qubes' commit protocol.
//!
//! dom0 changes a client's rules by removing `/qubes-firewall/<ip>/`, writing the new entries
//! and then writing the base key `/qubes-firewall/<ip>` (empty): that last write is the commit
//! signal; writes below it are ignored until then (qubes-core-admin `qubes/firewall.py`, qubes-core-agent-linux `qubesagent/firewall.py`).
//! After applying, the service increments `/qubes-firewall-handled/<ip>`, as the Linux agent
//! does. Everything else in the tree (our addresses, DNS, the vif list) applies when written.
//!
//! The vif list, which Qubes keeps in XenStore, is read from `/qubes-vif/<name>/ip`, `mac`,
//! and optionally `ip6` and `mtu` (our convention; see docs/lab.md). Upstream Qubes has no
//! MTU key in QubesDB at all: qubes-core-agent-linux `network/vif-route-qubes` leaves the vif
//! at the kernel's MTU, and Xen's `mtu` key in the vif's XenStore backend directory (libxl,
//! applied by `set_mtu` in xen tools/hotplug/Linux/xen-network-common.sh) is what a toolstack
//! sets. `mtu` here stands for that key; `/qubes-uplink-mtu` for the uplink's. Either can only
//! lower the link's own MTU, which the service reads from the device.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::time::Duration;

use qubes_engine::config::{parse_mac, EngineConfig, VifInfo};
use qubesdb::client::Client;

use crate::error::ServiceError;
use crate::source::Desired;

/// `/qubes-vif/<name>/`: ip, mac, ip6, mtu as read.
type VifKeys = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// An MTU key's value: a number from 68 (the IPv4 minimum, RFC 791) to 65535.
fn parse_mtu(key: &str, v: &str) -> Result<u16, ServiceError> {
    match v.trim().parse::<u16>() {
        Ok(m) if m >= qubes_engine::frag::MIN_MTU => Ok(m),
        _ => Err(bad(format!(
            "{key}: {v:?} is not an MTU (a number from {} to 65535)",
            qubes_engine::frag::MIN_MTU
        ))),
    }
}

/// A QubesDB connection and the committed rule snapshots.
#[derive(Debug)]
pub struct QubesDbSource {
    client: Client,
    uplink: String,
    /// `/qubes-firewall/<addr>/...` entries as of each address's last commit.
    committed: BTreeMap<String, Vec<(String, String)>>,
    /// Addresses committed since the last `report_handled`.
    to_report: BTreeSet<String>,
    started: bool,
    /// The link to dom0 when this daemon is our own (QubesDB over vchan): it runs as long
    /// as the source does.
    agent: Option<vif_backend::xen::qubesdb::Agent>,
}

fn err(what: &str, e: impl std::fmt::Display) -> ServiceError {
    ServiceError::QubesDb {
        what: what.to_string(),
        source: std::io::Error::other(e.to_string()),
    }
}

fn bad(msg: String) -> ServiceError {
    ServiceError::Config(crate::error::ConfigError::Invalid {
        file: None,
        error: msg,
    })
}

impl QubesDbSource {
    pub fn connect(socket: &Path, uplink: &str) -> Result<Self, ServiceError> {
        let mut client = Client::connect(socket)
            .map_err(|e| err(&format!("connect {}", socket.display()), e))?;
        client.watch("/").map_err(|e| err("watch /", e))?;
        Ok(QubesDbSource {
            client,
            uplink: uplink.to_string(),
            committed: BTreeMap::new(),
            to_report: BTreeSet::new(),
            started: false,
            agent: None,
        })
    }

    /// Keeps `agent` (the link to dom0 feeding this daemon) running with the source.
    pub fn keeping(mut self, agent: vif_backend::xen::qubesdb::Agent) -> Self {
        self.agent = Some(agent);
        self
    }

    /// The link to dom0's QubesDB when we carry it (`--qubesdb-vchan`): `Some(Ok(()))` while
    /// it runs, `Some(Err(why))` once it ended; `None` for a daemon that is not ours.
    pub fn dom0_link(&mut self) -> Option<Result<(), String>> {
        let a = self.agent.as_mut()?;
        Some(match a.link_ended() {
            None => Ok(()),
            Some(why) => Err(why.to_string()),
        })
    }

    fn read_tree(&mut self) -> Result<BTreeMap<String, String>, ServiceError> {
        Ok(self
            .client
            .multiread("/")
            .map_err(|e| err("read /", e))?
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect())
    }

    /// Takes the current rule entries of `addr` as committed.
    fn commit(&mut self, tree: &BTreeMap<String, String>, addr: &str) {
        let prefix = format!("/qubes-firewall/{addr}/");
        let entries: Vec<(String, String)> = tree
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.committed.insert(addr.to_string(), entries);
        self.to_report.insert(addr.to_string());
    }

    /// Takes every client's current entries as committed on the next [`Self::desired`]: what
    /// the agent does on SIGHUP (it re-reads all targets).
    pub fn recommit_all(&mut self) {
        self.started = false;
    }

    /// The configuration as it stands: the tree with each client's rules as last committed.
    pub fn desired(&mut self) -> Result<Desired, ServiceError> {
        let tree = self.read_tree()?;
        if !self.started {
            // At start every target present counts as committed, as the agent handles all
            // targets before watching.
            self.started = true;
            let addrs: BTreeSet<String> = tree
                .keys()
                .filter_map(|k| k.strip_prefix("/qubes-firewall/"))
                .filter_map(|rest| rest.split('/').next())
                .filter(|a| !a.is_empty())
                .map(str::to_string)
                .collect();
            for a in addrs {
                self.commit(&tree, &a);
            }
        }
        let mut t: BTreeMap<String, String> = tree
            .iter()
            .filter(|(k, _)| !k.starts_with("/qubes-firewall/"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for entries in self.committed.values() {
            t.extend(entries.iter().cloned());
        }
        let mut vifs: BTreeMap<String, VifKeys> = BTreeMap::new();
        for (k, v) in &tree {
            let Some(rest) = k.strip_prefix("/qubes-vif/") else {
                continue;
            };
            let Some((name, field)) = rest.split_once('/') else {
                continue;
            };
            let e = vifs.entry(name.to_string()).or_default();
            match field {
                "ip" => e.0 = Some(v.clone()),
                "mac" => e.1 = Some(v.clone()),
                "ip6" => e.2 = Some(v.clone()).filter(|s| !s.is_empty()),
                "mtu" => e.3 = Some(v.clone()),
                _ => {}
            }
        }
        let mut list = Vec::new();
        for (name, (ip, mac, ip6, mtu)) in vifs {
            let ip = ip
                .ok_or_else(|| bad(format!("/qubes-vif/{name}/ip is missing")))?
                .parse()
                .map_err(|_| bad(format!("/qubes-vif/{name}/ip is not an IPv4 address")))?;
            let mac = parse_mac(mac.as_deref().unwrap_or("00:16:3e:5e:6c:00"))
                .map_err(|e| bad(format!("/qubes-vif/{name}/mac: {e}")))?;
            let ip6 =
                match ip6 {
                    Some(s) => Some(s.parse().map_err(|_| {
                        bad(format!("/qubes-vif/{name}/ip6 is not an IPv6 address"))
                    })?),
                    None => None,
                };
            let mtu = match mtu {
                Some(m) => Some(parse_mtu(&format!("/qubes-vif/{name}/mtu"), &m)?),
                None => None,
            };
            list.push((VifInfo { name, ip, ip6, mac }, mtu));
        }
        let uplink_mtu = match tree.get("/qubes-uplink-mtu") {
            Some(m) => parse_mtu("/qubes-uplink-mtu", m)?,
            None => qubes_engine::config::DEFAULT_MTU,
        };
        Ok(Desired {
            tree: t,
            vifs: list,
            uplink: self.uplink.clone(),
            uplink_mtu,
            conntrack_max: tree
                .get("/qubes-conntrack-max")
                .and_then(|m| m.parse().ok()),
            static_dns: BTreeMap::new(),
            // In Qubes a netvm's address comes from DHCP, never from QubesDB.
            static_uplink: None,
            dhcp_hostname: None,
            // sys-whonix under QubesDB takes its Tor settings from its command line.
            tor: None,
        })
    }

    /// Watch events already read from the socket (poll does not see them).
    pub fn queued(&self) -> usize {
        self.client.pending_watches()
    }

    /// Reads the watch events that have arrived. True when something that matters changed: a
    /// rule commit, or any key outside the firewall subtrees.
    pub fn poll_watches(&mut self) -> Result<bool, ServiceError> {
        let mut changed = false;
        let mut commits = Vec::new();
        while let Some(path) = self
            .client
            .read_watch(Some(Duration::ZERO))
            .map_err(|e| err("read watch", e))?
        {
            if path.starts_with("/qubes-firewall-handled/") || path.starts_with("/dns/") {
                continue;
            }
            if let Some(rest) = path.strip_prefix("/qubes-firewall/") {
                if !rest.is_empty() && !rest.contains('/') {
                    commits.push(rest.to_string());
                    changed = true;
                }
                continue;
            }
            changed = true;
        }
        if !commits.is_empty() {
            let tree = self.read_tree()?;
            for a in commits {
                self.commit(&tree, &a);
            }
        }
        Ok(changed)
    }

    /// Writes `/qubes-netvm-external-ip` as Qubes' NetworkManager dispatcher
    /// (`30-qubes-external-ip` in qubes-core-agent-linux) does: the uplink's address when it
    /// comes up, empty when it goes down.
    pub fn write_external_ip(&mut self, addr: Option<std::net::Ipv4Addr>) {
        let value = addr.map(|a| a.to_string()).unwrap_or_default();
        if let Err(e) = self
            .client
            .write("/qubes-netvm-external-ip", value.as_bytes())
        {
            tracing::warn!(error = %e, "could not write /qubes-netvm-external-ip");
        }
    }

    /// Increments `/qubes-firewall-handled/<addr>` for each address committed since the last
    /// call whose client is in the applied configuration.
    pub fn report_handled(&mut self, cfg: &EngineConfig) {
        let addrs: Vec<String> = std::mem::take(&mut self.to_report).into_iter().collect();
        for a in addrs {
            let known = cfg
                .clients
                .iter()
                .any(|c| c.ip.to_string() == a || c.ip6.map(|x| x.to_string()) == Some(a.clone()));
            if !known {
                // Not attached yet: report once its vif is there.
                self.to_report.insert(a);
                continue;
            }
            let key = format!("/qubes-firewall-handled/{a}");
            let n = match self.client.read(&key) {
                Ok(Some(v)) => String::from_utf8_lossy(&v)
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0),
                _ => 0,
            };
            if let Err(e) = self.client.write(&key, (n + 1).to_string().as_bytes()) {
                tracing::warn!(key, error = %e, "could not report handled rules");
            }
        }
    }
}

impl AsRawFd for QubesDbSource {
    fn as_raw_fd(&self) -> RawFd {
        self.client.as_raw_fd()
    }
}
