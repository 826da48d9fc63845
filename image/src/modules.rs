//! Which kernel modules go into an image, and in which order PID 1 loads them.
//!
//! The dependencies come from `modules.dep` (depmod(8) output, `modules.dep(5)`): one line per
//! module, `path: dep dep ...`, where the list is the module's whole dependency closure. A
//! module must be loaded after all of its dependencies, so the load order is a depth-first
//! post-order over those lists, deterministic because it follows the order of the request and
//! of each line.

use std::collections::BTreeMap;
use std::fmt;

/// The modules every service image loads, by name (as `modinfo` names them, `-` and `_`
/// alike): the virtio NIC and disk (QEMU), the Xen network front and back ends (Qubes), and the
/// Xen disk (a configuration disk in Qubes), the ACPI power button with its input events (the "power off on request" of QEMU's
/// `system_powerdown`), and the virtio console for the lab's channel (`qubes.lab=1`). AF_PACKET, the 8250 serial console and devtmpfs are built into Debian's
/// kernel.
pub const SERVICE_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "xen-netfront",
    "xen-netback",
    "xen-blkfront",
    // /dev/xen/evtchn, gntdev and gntalloc: QubesDB over vchan, and `qubes.vifs=xen`'s rings
    "xen-evtchn",
    "xen-gntdev",
    "xen-gntalloc",
    "button",
    "evdev",
    "virtio_console",
];

/// A parsed `modules.dep`.
#[derive(Debug, Default)]
pub struct ModulesDep {
    /// module name (normalised) -> (path relative to the modules directory, dependency names)
    modules: BTreeMap<String, (String, Vec<String>)>,
}

/// What is wrong with a `modules.dep` or a request against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleError {
    /// A line that is not `path: deps`.
    BadLine { line: usize, text: String },
    /// A requested (or depended-on) module that the kernel does not ship.
    Unknown {
        name: String,
        wanted_by: Option<String>,
    },
}

impl fmt::Display for ModuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModuleError::BadLine { line, text } => {
                write!(f, "modules.dep line {line}: expected `path.ko: deps`, got {text:?}")
            }
            ModuleError::Unknown { name, wanted_by: None } => write!(
                f,
                "kernel module {name:?} is not in this kernel's modules.dep (built in, or misspelt?)"
            ),
            ModuleError::Unknown { name, wanted_by: Some(by) } => write!(
                f,
                "kernel module {name:?}, a dependency of {by:?}, is not in modules.dep"
            ),
        }
    }
}

impl std::error::Error for ModuleError {}

/// `virtio-net`, `virtio_net` and `kernel/.../virtio_net.ko` all name one module.
pub fn module_name(path_or_name: &str) -> String {
    let base = path_or_name.rsplit('/').next().unwrap_or(path_or_name);
    let base = base.split(".ko").next().unwrap_or(base);
    base.replace('-', "_")
}

impl ModulesDep {
    /// Parses the text of `modules.dep`.
    pub fn parse(text: &str) -> Result<Self, ModuleError> {
        let mut modules = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let Some((path, deps)) = line.split_once(':') else {
                return Err(ModuleError::BadLine {
                    line: i + 1,
                    text: line.to_string(),
                });
            };
            let path = path.trim();
            if !path.contains(".ko") || path.contains(char::is_whitespace) {
                return Err(ModuleError::BadLine {
                    line: i + 1,
                    text: line.to_string(),
                });
            }
            let deps = deps.split_whitespace().map(module_name).collect();
            modules.insert(module_name(path), (path.to_string(), deps));
        }
        Ok(ModulesDep { modules })
    }

    /// The modules to load for `wanted`, dependencies first, each once: (name, path).
    pub fn load_order(&self, wanted: &[&str]) -> Result<Vec<(String, String)>, ModuleError> {
        let mut order = Vec::new();
        for w in wanted {
            self.visit(&module_name(w), None, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        wanted_by: Option<&str>,
        order: &mut Vec<(String, String)>,
    ) -> Result<(), ModuleError> {
        if order.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        let Some((path, deps)) = self.modules.get(name) else {
            return Err(ModuleError::Unknown {
                name: name.to_string(),
                wanted_by: wanted_by.map(str::to_string),
            });
        };
        // The line lists the whole closure; modprobe(8) loads it from the end of the list.
        // Visiting each dependency's own line first gives the same guarantee without relying
        // on that ordering convention.
        for d in deps.iter().rev() {
            if self
                .modules
                .get(d)
                .is_some_and(|(_, dd)| dd.iter().any(|x| x == name))
            {
                continue; // a cycle is depmod's error to report; loading the rest still works
            }
            self.visit(d, Some(name), order)?;
        }
        order.push((name.to_string(), path.clone()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines as depmod wrote them for Debian's 6.1.0-50-amd64.
    const DEP: &str = "\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/xen-netfront.ko:
";

    #[test]
    fn dependencies_come_before_the_modules_that_need_them_and_only_once() {
        let dep = ModulesDep::parse(DEP).expect("test data");
        let order = dep
            .load_order(&["virtio_pci", "virtio-net", "xen-netfront"])
            .expect("test data");
        let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "virtio",
                "virtio_ring",
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
                "virtio_pci",
                "failover",
                "net_failover",
                "virtio_net",
                "xen_netfront"
            ]
        );
        assert_eq!(order[8].1, "kernel/drivers/net/xen-netfront.ko");
        for (i, (n, _)) in order.iter().enumerate() {
            let (_, deps) = &dep.modules[n];
            for d in deps {
                let j = names.iter().position(|x| x == d).expect("test data");
                assert!(j < i, "{d} must load before {n}");
            }
        }
    }

    #[test]
    fn an_unknown_module_is_named_with_who_wanted_it() {
        let dep = ModulesDep::parse("kernel/a.ko: kernel/b.ko\n").expect("test data");
        let e = dep.load_order(&["nope"]).expect_err("must fail");
        assert!(
            e.to_string().contains("\"nope\" is not in this kernel"),
            "{e}"
        );
        let e = dep.load_order(&["a"]).expect_err("must fail");
        assert_eq!(
            e,
            ModuleError::Unknown {
                name: "b".into(),
                wanted_by: Some("a".into())
            }
        );
    }

    #[test]
    fn a_malformed_line_is_reported_by_number() {
        let e = ModulesDep::parse("kernel/a.ko:\ngarbage\n").expect_err("must fail");
        assert_eq!(
            e,
            ModuleError::BadLine {
                line: 2,
                text: "garbage".into()
            }
        );
    }
}
