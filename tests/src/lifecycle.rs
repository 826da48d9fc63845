//! `stop QUBE` and `start QUBE`: a qube halts and starts again as dom0 and Xen do it
//! (docs/lab.md, "Starting and stopping qubes").
//!
//! `stop` (`qvm-shutdown`): the qube's processes end; its vif goes away with the domain (netback
//! removes the backend `vifD.0`, and with the veth pair the qube's `eth0`); the netvm runs
//! `vif-route-qubes offline` (a Linux netvm) or notices the vif gone (our service); the vif
//! leaves the netvm's vif list (what XenStore holds). Dom0 leaves the netvm's QubesDB alone on
//! a client's shutdown: `/connected-ips` names every client, running or not, and the
//! `/qubes-firewall/<ip>` entries stay (qubes-core-admin qubes/vm/mix/net.py has no
//! `domain-shutdown` handler for the client side; `reload_connected_ips` lists all
//! `connected_vms`). The namespace stays, with only `lo`: the qube is halted.
//!
//! `start` (`qvm-start`): the next domid (never reused), so a new `vif<domid>.0`; dom0's
//! `domain-pre-spawn` handler writes the netvm's tree (`reload_connected_ips`,
//! `set_mapped_ip_info_for_vm`, `reload_firewall_for_vm`: the rules from the store, committed);
//! then the vif appears in the vif list and as a device, the netvm brings it online
//! (`vif-route-qubes online`, or our service attaches it), and the qube configures its `eth0`
//! (`setup-ip`). Same address and MAC as before.

use qubes_rules::store::Store;

use crate::cmd::{err, Cmd, Context, Error, Result};
use crate::config::{self, NetvmConfig, Vif};
use crate::lab::{agent_log, existing_namespaces, gateway, load};
use crate::netvm;
use crate::procs;
use crate::service::{self, Service};
use crate::state::{self, LabLock, LabState, Paths};
use crate::topology::{Qube, Topology, MAX_DOMID};
use crate::vm;

/// The lab, locked, and the qube, checked: it exists, provides no network, and its namespace
/// is there.
fn prepare(name: &str, qube: &str, verb: &str) -> Result<(LabLock, LabState, Topology, Paths)> {
    state::need_root()?;
    // The first load says "no lab here" clearly; the second, under the lock, is the truth.
    let (_, _, paths) = load(name)?;
    let lock = state::lock(&paths)?;
    let (state, topo, paths) = load(name)?;
    let q = topo.get(qube)?;
    if q.provides_network() {
        let clients: Vec<&str> = topo.clients_of(q).map(|c| c.name.as_str()).collect();
        return err(format!(
            "cannot {verb} {qube}: it provides network (to {}); the lab starts and stops only \
             qubes that provide none",
            if clients.is_empty() {
                "no qube yet".to_string()
            } else {
                clients.join(", ")
            }
        ));
    }
    if !existing_namespaces()?.contains(&q.ns) {
        return err(format!(
            "the namespace {} of {qube} does not exist: the lab is broken (`qubes-lab up --name \
             {name}` builds it again)",
            q.ns
        ));
    }
    Ok((lock, state, topo, paths))
}

fn link_exists(ns: &str, ifname: &str) -> bool {
    Cmd::ip(ns)
        .args(["link", "show", "dev", ifname])
        .output(None)
        .is_ok_and(|o| o.status.success())
}

/// `stop QUBE`: the qube halts (see the module comment).
pub fn stop(name: &str, qube: &str) -> Result<()> {
    let (_lock, mut state, topo, paths) = prepare(name, qube, "stop")?;
    let q = topo.get(qube)?;
    if !q.running {
        return err(format!(
            "{qube} is already halted (`qubes-lab start --name {name} {qube}` starts it)"
        ));
    }
    // A halted qube runs nothing.
    let pids = procs::ns_pids(&q.ns)?;
    procs::stop(&pids, std::time::Duration::from_secs(3))
        .context(|| format!("stopping the processes of {qube}"))?;
    let mut done = format!("{qube} halted (domid {})", q.domid);
    if let (Some(netvm), Some(vif)) = (topo.netvm_of(q), q.vif()) {
        remove_vif(&state, &paths, netvm, &vif).context(|| format!("removing {vif}"))?;
        done.push_str(&format!(", {vif} removed from {}", netvm.name));
    }
    state.halted.insert(q.name.clone());
    state.write(&paths)?;
    if !pids.is_empty() {
        done.push_str(&format!(", {} processes stopped", pids.len()));
    }
    println!("{done}");
    Ok(())
}

/// The vif goes away: the device (and the veth pair with it), the netvm's reaction, the vif
/// list. Tolerates a vif already gone (a `stop` that failed half-way can be repeated).
fn remove_vif(state: &LabState, paths: &Paths, netvm: &Qube, vif: &str) -> Result<()> {
    if let Some(g) = vm::guest_of(paths, netvm.role) {
        // Unplugged from the VM (its TAP, the qube's eth0, goes with it); a VM that is not
        // running has nothing to unplug.
        if g.running(paths) {
            vm::unplug(paths, g, vif)?;
        }
    } else if link_exists(&netvm.ns, vif) {
        Cmd::ip(&netvm.ns).args(["link", "del", "dev", vif]).run()?;
    }
    let path = paths.config(&netvm.name);
    let mut cfg = NetvmConfig::read(&path)?;
    let gone: Vec<Vif> = cfg.vifs.iter().filter(|v| v.name == vif).cloned().collect();
    cfg.vifs.retain(|v| v.name != vif);
    if let Some(svc) = Service::of(netvm, state.firewall) {
        let running = svc.running(paths);
        let before = if running {
            svc.config_generation(paths)
        } else {
            None
        };
        cfg.write(&path)?;
        if running {
            svc.wait_status(paths, before, &format!("let go of {vif}"), |s| {
                !service::has_client(s, vif)
            })?;
        }
    } else {
        for v in &gone {
            netvm::vif_offline(&netvm.ns, v);
        }
        cfg.write(&path)?;
    }
    Ok(())
}

/// `start QUBE`: the qube starts with the next domid (see the module comment).
pub fn start(name: &str, qube: &str) -> Result<()> {
    let (_lock, mut state, topo, paths) = prepare(name, qube, "start")?;
    let q = topo.get(qube)?;
    if q.running {
        let vif = q.vif().map(|v| format!(", {v}")).unwrap_or_default();
        return err(format!(
            "{qube} is already running (domid {}{vif}; `qubes-lab stop --name {name} {qube}` \
             halts it)",
            q.domid
        ));
    }
    let netvm = topo.netvm_of(q);
    if let Some(n) = netvm {
        if let Some(svc) = Service::of(n, state.firewall).filter(|s| !s.running(&paths)) {
            let restart = match svc {
                Service::Firewall => "restart-firewall",
                Service::Whonix => "restart-whonix",
            };
            return err(format!(
                "cannot start {qube}: its netvm's {} service is not running (see {}; \
                 `qubes-lab {restart}` starts it)",
                svc.process(),
                paths.log(svc.process()).display()
            ));
        }
    }
    let domid = state.next_domid()?;
    if domid > MAX_DOMID {
        return err(format!(
            "cannot start {qube}: domid {domid} too large (vif-route-qubes refuses domids above \
             {MAX_DOMID}; `qubes-lab up` starts the count again)"
        ));
    }
    // The domid is used up even if the start fails, as in Xen.
    state.next_domid = Some(domid + 1);
    state.write(&paths)?;
    let mut q = q.clone();
    q.domid = domid;
    let mut done = format!("{qube} started (domid {domid}");
    if let Some(netvm) = netvm {
        let vif = q
            .vif()
            .ok_or_else(|| Error(format!("{qube} has a netvm but no vif")))?;
        if let Err(e) = add_vif(&state, &topo, &paths, netvm, &q, &vif) {
            // Leave it halted, without the half-made vif.
            if let Err(e2) = remove_vif(&state, &paths, netvm, &vif) {
                return Err(Error(format!(
                    "starting {qube}: {e}\nand removing {vif} again failed too: {e2}"
                )));
            }
            return Err(Error(format!("starting {qube}: {e}")));
        }
        done.push_str(&format!(", {vif} in {}", netvm.name));
    }
    state.domids.insert(q.name.clone(), domid);
    state.halted.remove(&q.name);
    state.write(&paths)?;
    println!("{done})");
    Ok(())
}

/// A new vif for `q`: the netvm's tree as dom0 writes it before the domain spawns, the vif list,
/// the device, the netvm's side of it, and the qube's `eth0`.
fn add_vif(
    state: &LabState,
    topo: &Topology,
    paths: &Paths,
    netvm: &Qube,
    q: &Qube,
    vif: &str,
) -> Result<()> {
    let ip = q.ip.ok_or_else(|| Error(format!("{} has no ip", q.name)))?;
    let ip_s = ip.to_string();
    let own_ip = netvm
        .ip
        .ok_or_else(|| Error(format!("{} has no ip", netvm.name)))?
        .to_string();
    let rules = Store::new(paths.store())
        .load(&q.name)
        .map_err(|e| Error(format!("rule store: {e}")))?;
    let path = paths.config(&netvm.name);
    let mut cfg = NetvmConfig::read(&path)?;
    // domain-pre-spawn: reload_connected_ips (every client, running or not: the same list
    // as at `up`), set_mapped_ip_info_for_vm, reload_firewall_for_vm.
    let connected: Vec<String> = topo
        .clients_of(netvm)
        .filter_map(|c| c.ip.map(|a| a.to_string()))
        .collect();
    cfg.qubesdb
        .insert("/connected-ips".to_string(), connected.join(" "));
    cfg.qubesdb
        .insert("/connected-ips6".to_string(), String::new());
    cfg.qubesdb
        .insert(format!("/mapped-ip/{ip_s}/visible-ip"), ip_s.clone());
    cfg.qubesdb
        .insert(format!("/mapped-ip/{ip_s}/visible-gateway"), own_ip);
    cfg.set_firewall(&ip_s, &config::rule_entries(&rules));
    // The vif in the vif list (XenStore's backend entries come before the device).
    let entry = Vif {
        name: vif.to_string(),
        ip,
        mac: q.mac.clone(),
    };
    cfg.insert_vif(entry.clone());
    let service = Service::of(netvm, state.firewall);
    let before = service.and_then(|s| s.config_generation(paths));
    cfg.write(&path)?;
    if service.is_none() {
        let log = agent_log(paths, netvm);
        netvm::agent_connected_ips(&netvm.ns, &cfg)?;
        netvm::agent_handle_addr(&netvm.ns, &cfg, &ip_s, &log)?;
    }
    let guest = vm::guest_of(paths, netvm.role);
    let in_vm = guest.is_some();
    if let Some(g) = guest {
        // A NIC hot-plugged into the VM; its TAP becomes the qube's eth0.
        vm::plug(paths, g, netvm, q, vif)?;
    } else {
        // The device: netback's backend in the netvm, the frontend `eth0` in the qube.
        netvm::add_vif_link(&netvm.ns, vif, &q.ns, &q.mac)?;
    }
    if let Some(svc) = service {
        if !in_vm {
            Cmd::ip(&netvm.ns).args(["link", "set", vif, "up"]).run()?;
        }
        svc.wait_status(paths, before, &format!("attach {vif}"), |s| {
            service::has_client(s, vif)
        })?;
    } else {
        netvm::sysctl(
            &netvm.ns,
            &[(format!("net/ipv4/conf/{vif}/proxy_arp"), "1")],
        )?;
        let gw = cfg
            .get("/qubes-netvm-gateway")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error("no /qubes-netvm-gateway in the netvm's tree".to_string()))?;
        netvm::vif_online(&netvm.ns, gw, &entry, q.domid)?;
    }
    netvm::setup_ip(&q.ns, ip, gateway(topo, q)?)
}
