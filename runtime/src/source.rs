//! Where a service's configuration comes from, and what it yields: the QubesDB-shaped tree,
//! the vif list (XenStore's, in Qubes), and the uplink. The YAML file and the QubesDB daemon
//! both produce a [`Desired`], so the standalone mode and the Qubes mode run the same code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use qubes_engine::config::{self, EngineConfig, NetvmUplink, VifInfo};

use crate::config_file::{ConfigFile, DnsEntry};
use crate::error::{ConfigError, ServiceError};
use crate::qubesdb_source::QubesDbSource;
use vif_backend::xen::qubesdb::{connect_to_dom0, XenAccess, DOM0_WAIT};

/// Where the configuration comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A YAML file, re-read when it changes.
    Yaml(PathBuf),
    /// A QubesDB daemon's socket; the uplink is named on the command line (in Qubes it is
    /// the qube's `eth0`).
    QubesDb { socket: PathBuf, uplink: String },
    /// dom0's QubesDB over vchan, as a qube booted from an image has it (no C daemon): a
    /// QubesDB daemon of our own is started on `socket`, kept in step with dom0's, and read
    /// as [`Source::QubesDb`] is.
    QubesDbVchan {
        access: XenAccess,
        socket: PathBuf,
        uplink: String,
        /// The service serves the vifs' Xen rings itself (`--vifs xen`): the hotplug step
        /// waits for no kernel interface and leaves the backend `state` to its handshake.
        userspace_vifs: bool,
    },
}

/// What a configuration source yields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub tree: BTreeMap<String, String>,
    /// The client vifs, each with the MTU its source gave (if any).
    pub vifs: Vec<(VifInfo, Option<u16>)>,
    pub uplink: String,
    pub uplink_mtu: u16,
    pub conntrack_max: Option<usize>,
    /// Static answers to name lookups (YAML `dns`); other names go to the resolver.
    pub static_dns: BTreeMap<String, DnsEntry>,
    /// sys-net with static addressing (YAML `uplink.address`, `router`, `dns`).
    pub static_uplink: Option<NetvmUplink>,
    /// sys-net with DHCP: the host name to send, if any (YAML `uplink.dhcp_hostname`).
    pub dhcp_hostname: Option<String>,
    /// sys-whonix: its Tor client (YAML `tor`).
    pub tor: Option<crate::config_file::TorSection>,
}

impl Desired {
    /// Reads a service's YAML configuration file. `steps` are refused: a running service
    /// takes changes by editing the file.
    pub fn from_yaml_file(path: &Path) -> Result<Desired, ConfigError> {
        let cfg = ConfigFile::load(path)?;
        if !cfg.steps.is_empty() {
            return Err(ConfigError::Invalid {
                file: Some(path.to_path_buf()),
                error: "`steps` is for replay only; a running service takes changes by \
                        editing the file"
                    .into(),
            });
        }
        Ok(Desired {
            tree: cfg.qubesdb.clone(),
            vifs: cfg
                .vifs
                .iter()
                .map(|v| {
                    (
                        VifInfo {
                            name: v.name.clone(),
                            ip: v.ip,
                            ip6: v.ip6,
                            mac: v.mac,
                        },
                        v.mtu,
                    )
                })
                .collect(),
            uplink: cfg.uplink.name.clone(),
            uplink_mtu: cfg.uplink.mtu,
            conntrack_max: cfg.conntrack_max,
            static_dns: cfg.dns.clone(),
            static_uplink: cfg.netvm_uplink(),
            dhcp_hostname: cfg.uplink.dhcp_hostname.clone(),
            tor: cfg.tor.clone(),
        })
    }

    /// The engine configuration for what is wanted, with only the vifs for which `present`
    /// says yes (a vif whose netdev is not there yet is left out until it appears).
    pub fn engine_config(
        &self,
        seed: u64,
        present: impl Fn(&str) -> bool,
    ) -> Result<EngineConfig, ConfigError> {
        self.engine_config_as(seed, present, None)
    }

    /// [`Desired::engine_config`] for a netvm (sys-net) whose uplink is `netvm`: its lease,
    /// or its static address.
    pub fn engine_config_as(
        &self,
        seed: u64,
        present: impl Fn(&str) -> bool,
        netvm: Option<&NetvmUplink>,
    ) -> Result<EngineConfig, ConfigError> {
        let here: Vec<&(VifInfo, Option<u16>)> =
            self.vifs.iter().filter(|(v, _)| present(&v.name)).collect();
        let infos: Vec<VifInfo> = here.iter().map(|(v, _)| v.clone()).collect();
        let mut cfg = match netvm {
            Some(up) => {
                config::from_tree_netvm(&self.tree, &infos, &self.uplink, self.uplink_mtu, up)?
            }
            None => config::from_tree(&self.tree, &infos, &self.uplink, self.uplink_mtu)?,
        };
        for (client, (_, mtu)) in cfg.clients.iter_mut().zip(&here) {
            if let Some(m) = mtu {
                client.mtu = *m;
            }
        }
        if let Some(max) = self.conntrack_max {
            cfg.conntrack_max = max;
        }
        cfg.seed = seed;
        Ok(cfg)
    }
}

/// A connected configuration source.
#[derive(Debug)]
pub enum ConfigSource {
    Yaml {
        path: PathBuf,
        stamp: Option<(SystemTime, u64)>,
    },
    QubesDb(Box<QubesDbSource>),
}

fn file_stamp(p: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl ConfigSource {
    /// Opens the source and reads the configuration as it stands.
    pub fn open(source: &Source) -> Result<(ConfigSource, Desired), ServiceError> {
        match source {
            Source::Yaml(p) => {
                let d = Desired::from_yaml_file(p)?;
                Ok((
                    ConfigSource::Yaml {
                        path: p.clone(),
                        stamp: file_stamp(p),
                    },
                    d,
                ))
            }
            Source::QubesDb { socket, uplink } => {
                let mut q = QubesDbSource::connect(socket, uplink)?;
                let d = q.desired()?;
                Ok((ConfigSource::QubesDb(Box::new(q)), d))
            }
            Source::QubesDbVchan {
                access,
                socket,
                uplink,
                userspace_vifs,
            } => {
                if let Some(dir) = socket.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| ServiceError::QubesDb {
                        what: format!("cannot create {}", dir.display()),
                        source: e,
                    })?;
                }
                // Returns once dom0's whole database is here: the first read below sees
                // the configuration complete, not half-synced.
                let xen_err = |what: &str| {
                    let what = what.to_string();
                    move |e: vif_backend::xen::qubesdb::LinkDriverError| ServiceError::QubesDb {
                        what,
                        source: std::io::Error::other(e.to_string()),
                    }
                };
                let mut agent = connect_to_dom0(access, socket, DOM0_WAIT)
                    .map_err(xen_err("QubesDB from dom0"))?;
                // On Xen the client vifs are in XenStore, not in dom0's QubesDB: the hotplug
                // step publishes each in our daemon, where the vif list is read from.
                agent
                    .start_hotplug(access, *userspace_vifs)
                    .map_err(xen_err("the vif hotplug step"))?;
                let mut q = QubesDbSource::connect(socket, uplink)?.keeping(agent);
                let d = q.desired()?;
                Ok((ConfigSource::QubesDb(Box::new(q)), d))
            }
        }
    }

    /// Reads everything again, as the agent does on SIGHUP: every client's rules count as
    /// committed.
    pub fn reread(&mut self) -> Result<Desired, ServiceError> {
        match self {
            ConfigSource::Yaml { path, stamp } => {
                *stamp = file_stamp(path);
                Ok(Desired::from_yaml_file(path)?)
            }
            ConfigSource::QubesDb(q) => {
                q.recommit_all();
                q.desired()
            }
        }
    }

    /// A file whose modification time or size changed since it was last read.
    pub fn file_changed(&self) -> bool {
        match self {
            ConfigSource::Yaml { path, stamp } => file_stamp(path) != *stamp,
            ConfigSource::QubesDb(_) => false,
        }
    }

    /// The QubesDB source, if that is what this is.
    pub fn qubesdb(&mut self) -> Option<&mut QubesDbSource> {
        match self {
            ConfigSource::QubesDb(q) => Some(q),
            ConfigSource::Yaml { .. } => None,
        }
    }
}
