//! A running lab's state directory, `/run/qubes-lab/<name>/`: what `up` made, so that the other
//! commands (and `down` after a crash) know it.
//!
//! ```text
//! lab.yaml                 name, firewall kind, namespaces, topology (written before anything
//!                          is created); then the domid counter, the domids of qubes started
//!                          since `up` and the halted qubes (`start`, `stop`)
//! store/appvms/<qube>/     the rule store qvm-firewall edits (firewall.xml)
//! <netvm>.yaml             each netvm's configuration: its QubesDB tree and vifs
//!                          (sys-firewall.yaml is what `sys-firewall run --config` reads)
//! <process>.pid, .log      background processes: dnsmasq, serve-http, iperf3, sys-firewall
//! control.sock             the sys-firewall service's control socket (--firewall rust)
//! <netvm>-agent.log        what the Linux qubes-firewall agent did (--firewall linux)
//! lock                     serialises edits of the configuration
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cmd::{err, io_err, Error, Result};
use crate::topology::{Topology, TopologySpec};

/// Where every lab keeps its state.
pub const STATE_ROOT: &str = "/run/qubes-lab";

/// Which sys-firewall the lab runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FirewallKind {
    /// The Linux kernel, set up as Qubes sets up its sys-firewall (nftables, routes, proxy ARP).
    Linux,
    /// Our userspace service, `sys-firewall run`.
    Rust,
}

impl FirewallKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FirewallKind::Linux => "linux",
            FirewallKind::Rust => "rust",
        }
    }
}

/// The paths of one lab's state directory.
#[derive(Debug, Clone)]
pub struct Paths {
    pub dir: PathBuf,
}

impl Paths {
    pub fn new(lab: &str) -> Self {
        Paths {
            dir: Path::new(STATE_ROOT).join(lab),
        }
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.join("lab.yaml")
    }

    pub fn store(&self) -> PathBuf {
        self.dir.join("store")
    }

    /// A netvm's configuration file.
    pub fn config(&self, netvm: &str) -> PathBuf {
        self.dir.join(format!("{netvm}.yaml"))
    }

    pub fn pid(&self, process: &str) -> PathBuf {
        self.dir.join(format!("{process}.pid"))
    }

    pub fn log(&self, process: &str) -> PathBuf {
        self.dir.join(format!("{process}.log"))
    }

    pub fn control_sock(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// The sys-net service's control socket (`--netvm rust`).
    pub fn net_control_sock(&self) -> PathBuf {
        self.dir.join("sys-net.sock")
    }

    pub fn lock_file(&self) -> PathBuf {
        self.dir.join("lock")
    }
}

/// Which sys-net (the netvm at the root) the lab runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NetvmKind {
    /// The Linux kernel as Qubes sets up a netvm: a static address in the world, nftables.
    #[default]
    Linux,
    /// Our service, `sys-net run`: its address by DHCP from the world's dnsmasq.
    Rust,
}

impl NetvmKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NetvmKind::Linux => "linux",
            NetvmKind::Rust => "rust",
        }
    }
}

/// What `up` records before it creates anything.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabState {
    pub name: String,
    pub firewall: FirewallKind,
    /// Absent in a state written before sys-net could be ours: Linux.
    #[serde(default)]
    pub netvm: NetvmKind,
    pub namespaces: Vec<String>,
    pub topology: TopologySpec,
    /// The domid the next `start` gives: Qubes' Xen hands them out in sequence and never
    /// reuses one (qubes-vmm-xen
    /// 1011-Always-allocate-domid-sequentially-and-do-not-reuse-.patch). Absent in a state
    /// written before `start` existed: one more than the topology's largest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_domid: Option<u32>,
    /// The domid of every qube started since `up` (the others have the topology's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub domids: BTreeMap<String, u32>,
    /// The qubes that are halted (`stop`).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub halted: BTreeSet<String>,
}

impl LabState {
    pub fn write(&self, paths: &Paths) -> Result<()> {
        let text = serde_yaml::to_string(self)
            .map_err(|e| Error(format!("cannot serialise the lab state: {e}")))?;
        write_atomic(&paths.state_file(), text.as_bytes())
    }

    pub fn read(paths: &Paths) -> Result<Self> {
        let path = paths.state_file();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return err(format!(
                    "no lab here: {} does not exist (is the lab up? `qubes-lab up`)",
                    path.display()
                ))
            }
            Err(e) => return Err(io_err("cannot read", &path)(e)),
        };
        serde_yaml::from_str(&text).map_err(|e| Error(format!("{}: {e}", path.display())))
    }

    /// The topology as it runs now: the domids of restarted qubes (so their `vif()` is the
    /// current one) and which qubes are halted.
    pub fn topology(&self) -> Result<Topology> {
        let mut topo = self.topology.resolve(&self.name)?;
        for q in &mut topo.qubes {
            if let Some(&d) = self.domids.get(&q.name) {
                q.domid = d;
            }
            q.running = !self.halted.contains(&q.name);
        }
        Ok(topo)
    }

    /// The domid the next `start` gives.
    pub fn next_domid(&self) -> Result<u32> {
        match self.next_domid {
            Some(d) => Ok(d),
            None => Ok(self
                .topology()?
                .qubes
                .iter()
                .map(|q| q.domid)
                .max()
                .unwrap_or(0)
                + 1),
        }
    }
}

/// Writes a file so that readers see the old or the new content, never a mix: a temporary
/// file in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    qubes_rules::store::write_atomic(path, data).map_err(|e| Error(e.to_string()))
}

/// An exclusive lock on the lab's configuration, held while it is edited.
#[derive(Debug)]
pub struct LabLock {
    _file: File,
}

pub fn lock(paths: &Paths) -> Result<LabLock> {
    let path = paths.lock_file();
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err("cannot open", &path))?;
    file.lock().map_err(io_err("cannot lock", &path))?;
    Ok(LabLock { _file: file })
}

/// Whether this process runs as root (every lab command but `exec` of the probes needs it).
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

pub fn need_root() -> Result<()> {
    if is_root() {
        Ok(())
    } else {
        err("the lab needs root (it creates network namespaces): run it as root")
    }
}
