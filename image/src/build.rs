//! Assembling one image: `vmlinuz` as Debian ships it, and an initramfs holding the service
//! binary as `/init`, the shared libraries it links, its kernel modules with a load order, and
//! the mount points PID 1 needs. Nothing else goes in: no shell, no busybox, no modprobe.
//!
//! Layout inside the initramfs:
//!
//! ```text
//! /init                          the service binary (stripped)
//! /lib64/ld-linux-x86-64.so.2    the dynamic loader and the libraries `ldd` lists, at the
//! /lib/x86_64-linux-gnu/...      paths the binary asks for (glibc's default search path)
//! /lib/modules/<name>.ko         the modules, and in load-order one file name per line,
//! /lib/modules/load-order        dependencies first (the service's PID 1 loads them)
//! /etc/passwd, /etc/group        root alone (the Tor client looks its uid up)
//! /etc/<service>.yaml            the configuration, when the build is given one
//! /dev/console                   so the kernel can give /init a console
//! /proc /sys /run /tmp /var/...  empty mount points and state directories
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::{Compression, GzBuilder};

use crate::cpio::{Archive, BadName, Kind};
use crate::kernel::{sha256, Kernel};
use crate::modules::{ModuleError, ModulesDep, SERVICE_MODULES};

/// The service images the tool builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// sys-firewall (crate sys-firewall)
    SysFirewall,
    /// sys-net (crate sys-net)
    SysNet,
    /// sys-whonix (crate sys-whonix)
    SysWhonix,
}

impl Service {
    /// All of them, in the order `all` builds them.
    pub const ALL: [Service; 3] = [Service::SysFirewall, Service::SysNet, Service::SysWhonix];

    /// The binary's (and package's, and image directory's) name.
    pub fn name(self) -> &'static str {
        match self {
            Service::SysFirewall => "sys-firewall",
            Service::SysNet => "sys-net",
            Service::SysWhonix => "sys-whonix",
        }
    }

    /// Parses a name as the command line gives it.
    pub fn from_name(s: &str) -> Option<Service> {
        Service::ALL.into_iter().find(|x| x.name() == s)
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What one build needs.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Which service.
    pub service: Service,
    /// The service binary to put in as /init.
    pub binary: PathBuf,
    /// A configuration file to put in as /etc/<service>.yaml.
    pub config: Option<PathBuf>,
    /// Where `<service>/vmlinuz`, `initramfs` and `SHA256SUMS` go.
    pub out_dir: PathBuf,
}

/// The files of a built image.
#[derive(Debug, Clone)]
pub struct Built {
    /// `<out>/<service>/`
    pub dir: PathBuf,
    /// Size of vmlinuz in bytes.
    pub vmlinuz_bytes: u64,
    /// Size of the (compressed) initramfs.
    pub initramfs_bytes: u64,
    /// Size of the initramfs once unpacked (what it takes in the guest's RAM).
    pub unpacked_bytes: u64,
    /// The modules, in load order.
    pub modules: Vec<String>,
    /// The shared libraries put in.
    pub libraries: Vec<String>,
    /// SHA-256 of vmlinuz and of the initramfs.
    pub sha256: [(String, String); 2],
}

/// Why an image could not be built.
#[derive(Debug)]
pub enum BuildError {
    /// Reading an input or writing an output failed.
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A tool (strip, ldd) failed.
    Tool { what: String, detail: String },
    /// The modules could not be resolved.
    Modules(ModuleError),
    /// A path the archive cannot hold.
    Path(BadName),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::Io { path, error } => write!(f, "{}: {error}", path.display()),
            BuildError::Tool { what, detail } => write!(f, "{what}: {detail}"),
            BuildError::Modules(e) => e.fmt(f),
            BuildError::Path(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for BuildError {}

impl From<ModuleError> for BuildError {
    fn from(e: ModuleError) -> Self {
        BuildError::Modules(e)
    }
}

impl From<BadName> for BuildError {
    fn from(e: BadName) -> Self {
        BuildError::Path(e)
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |error| BuildError::Io {
        path: path.to_path_buf(),
        error,
    }
}

fn tool(what: &str, cmd: &mut Command) -> Result<Vec<u8>, BuildError> {
    let out = cmd.output().map_err(|e| BuildError::Tool {
        what: what.to_string(),
        detail: format!("cannot run {:?}: {e}", cmd.get_program()),
    })?;
    if !out.status.success() {
        return Err(BuildError::Tool {
            what: what.to_string(),
            detail: format!(
                "{} ({})",
                String::from_utf8_lossy(&out.stderr).trim(),
                out.status
            ),
        });
    }
    Ok(out.stdout)
}

/// The shared objects `ldd` says `binary` loads, by absolute path (the loader included, the
/// vDSO not). A static binary has none.
pub fn linked_libraries(binary: &Path) -> Result<Vec<String>, BuildError> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| BuildError::Tool {
            what: "ldd".into(),
            detail: e.to_string(),
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_ldd(&text).map_err(|detail| BuildError::Tool {
        what: format!("ldd {}", binary.display()),
        detail,
    })
}

/// Parses ldd(1) output: `name => /path (addr)`, `/path (addr)`, `linux-vdso.so.1 (addr)`.
pub fn parse_ldd(text: &str) -> Result<Vec<String>, String> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.contains("statically linked") || line.contains("not a dynamic") {
            continue;
        }
        if line.contains("=> not found") {
            return Err(format!("a library is missing: {line}"));
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim().split(' ').next().unwrap_or(""),
            None => line.split(' ').next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(path.to_string());
        } else if !path.starts_with("linux-vdso") && !path.is_empty() {
            return Err(format!("cannot read this ldd line: {line}"));
        }
    }
    Ok(libs)
}

/// Builds one service image from `kernel`. `progress` is told each step.
pub fn build(
    spec: &ImageSpec,
    kernel: &Kernel,
    progress: &mut dyn FnMut(&str),
) -> Result<Built, BuildError> {
    assemble(
        &Assembly {
            name: spec.service.name(),
            binary: &spec.binary,
            modules: SERVICE_MODULES,
            config: spec.config.as_deref(),
            out_dir: &spec.out_dir,
        },
        kernel,
        progress,
    )
}

/// Any image: `binary` as /init with `modules`, in `<out_dir>/<name>/`. Besides the services,
/// the figures build the floor with it: a trivial /init and no modules on the same kernel.
#[derive(Debug, Clone, Copy)]
pub struct Assembly<'a> {
    /// The image directory's name.
    pub name: &'a str,
    /// The program to run as /init.
    pub binary: &'a Path,
    /// Modules to put in and load, by name.
    pub modules: &'a [&'a str],
    /// A file to put in as /etc/<name>.yaml.
    pub config: Option<&'a Path>,
    /// The parent of the image directory.
    pub out_dir: &'a Path,
}

/// Builds the image an [`Assembly`] describes.
pub fn assemble(
    spec: &Assembly<'_>,
    kernel: &Kernel,
    progress: &mut dyn FnMut(&str),
) -> Result<Built, BuildError> {
    let name = spec.name;
    let dir = spec.out_dir.join(name);
    fs::create_dir_all(&dir).map_err(io(&dir))?;

    progress(&format!("{name}: stripping {}", spec.binary.display()));
    let stripped = dir.join(".init.stripped");
    tool(
        "strip",
        Command::new("strip")
            .arg("--strip-all")
            .arg("-o")
            .arg(&stripped)
            .arg(spec.binary),
    )?;
    let init = fs::read(&stripped).map_err(io(&stripped))?;
    let _ = fs::remove_file(&stripped);

    let libraries = linked_libraries(spec.binary)?;
    progress(&format!("{name}: libraries {}", libraries.join(" ")));

    let dep_path = kernel.modules_dir().join("modules.dep");
    let dep_text = fs::read_to_string(&dep_path).map_err(io(&dep_path))?;
    let order = ModulesDep::parse(&dep_text)?.load_order(spec.modules)?;
    progress(&format!(
        "{name}: {} modules ({})",
        order.len(),
        order
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    ));

    let mut files: Vec<(String, Kind)> = Vec::new();
    files.push((
        "init".into(),
        Kind::File {
            perm: 0o755,
            data: init,
        },
    ));
    for lib in &libraries {
        let data = fs::read(lib).map_err(io(Path::new(lib)))?;
        files.push((
            lib.trim_start_matches('/').to_string(),
            Kind::File { perm: 0o755, data },
        ));
    }
    let mut load_order = String::new();
    for (module, rel) in &order {
        let src = kernel.modules_dir().join(rel);
        let data = fs::read(&src).map_err(io(&src))?;
        let file = format!("{module}.ko");
        load_order.push_str(&file);
        load_order.push('\n');
        files.push((
            format!("lib/modules/{file}"),
            Kind::File { perm: 0o644, data },
        ));
    }
    files.push((
        "lib/modules/load-order".into(),
        Kind::File {
            perm: 0o644,
            data: load_order.into_bytes(),
        },
    ));
    // The only user there is: arti's storage-permission check (fs-mistrust) looks its uid up,
    // and glibc's built-in files NSS module reads these.
    files.push((
        "etc/passwd".into(),
        Kind::File {
            perm: 0o644,
            data: b"root:x:0:0:root:/run:/nonexistent\n".to_vec(),
        },
    ));
    files.push((
        "etc/group".into(),
        Kind::File {
            perm: 0o644,
            data: b"root:x:0:\n".to_vec(),
        },
    ));
    if let Some(cfg) = spec.config {
        let data = fs::read(cfg).map_err(io(cfg))?;
        files.push((format!("etc/{name}.yaml"), Kind::File { perm: 0o600, data }));
    }

    // Directories first (parents before children), then the device node, then the files.
    let mut dirs: BTreeSet<String> = [
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "etc",
        "lib",
        "lib/modules",
        "var",
        "var/lib",
        "var/cache",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    for (path, _) in &files {
        let mut p = path.as_str();
        while let Some((parent, _)) = p.rsplit_once('/') {
            dirs.insert(parent.to_string());
            p = parent;
        }
    }
    let mut archive = Archive::default();
    for d in &dirs {
        let perm = if d == "tmp" { 0o1777 } else { 0o755 };
        archive.add(d, Kind::Dir { perm })?;
    }
    archive.add(
        "dev/console",
        Kind::CharDev {
            perm: 0o600,
            major: 5,
            minor: 1,
        },
    )?;
    files.sort_by(|a, b| a.0.cmp(&b.0));
    for (path, kind) in files {
        archive.add(&path, kind)?;
    }
    let cpio = archive.to_bytes();
    progress(&format!(
        "{name}: initramfs {} bytes unpacked, compressing",
        cpio.len()
    ));

    // Level 6: a sys-whonix initramfs comes out 0.6% bigger than at level 9, three times
    // faster (the tests build several images a run).
    let mut gz = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::new(6));
    gz.write_all(&cpio).map_err(io(&dir))?;
    let initramfs = gz.finish().map_err(io(&dir))?;

    let vmlinuz_src = kernel.vmlinuz();
    let vmlinuz = fs::read(&vmlinuz_src).map_err(io(&vmlinuz_src))?;
    let sums = [
        ("vmlinuz".to_string(), sha256(&vmlinuz)),
        ("initramfs".to_string(), sha256(&initramfs)),
    ];
    write_atomic(&dir.join("vmlinuz"), &vmlinuz)?;
    write_atomic(&dir.join("initramfs"), &initramfs)?;
    let mut text = String::new();
    for (file, hash) in &sums {
        // sha256sum(1)'s format, so `sha256sum -c SHA256SUMS` checks the files.
        text.push_str(&format!("{hash}  {file}\n"));
    }
    write_atomic(&dir.join("SHA256SUMS"), text.as_bytes())?;
    progress(&format!(
        "{name}: wrote {} (vmlinuz {} bytes, initramfs {} bytes)",
        dir.display(),
        vmlinuz.len(),
        initramfs.len()
    ));
    Ok(Built {
        dir,
        vmlinuz_bytes: vmlinuz.len() as u64,
        initramfs_bytes: initramfs.len() as u64,
        unpacked_bytes: cpio.len() as u64,
        modules: order.into_iter().map(|(n, _)| n).collect(),
        libraries,
        sha256: sums,
    })
}

/// Writes `path` whole or not at all: a reader (dom0 copying the image) never sees half a file.
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), BuildError> {
    let tmp = path.with_extension("partial");
    fs::write(&tmp, data).map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_libraries_and_the_loader() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f84)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f84)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f84)\n";
        assert_eq!(
            parse_ldd(text).expect("test data"),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
        assert_eq!(
            parse_ldd("\tstatically linked\n").expect("test data"),
            Vec::<String>::new()
        );
        let e = parse_ldd("\tlibnftnl.so.11 => not found\n").expect_err("must fail");
        assert!(e.contains("libnftnl.so.11"), "{e}");
    }
}
