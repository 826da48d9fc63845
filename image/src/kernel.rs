//! The images' kernel: Debian's packaged amd64 kernel at a pinned version, fetched with apt and
//! checked against a pinned SHA-256 before anything of it is used.
//!
//! Debian's `linux-image-*-amd64` is PVH-capable (`CONFIG_XEN_PVH=y`, as Qubes boots service
//! qubes) and boots under QEMU as well. Its modules are plain `.ko` files; the package carries
//! no `modules.dep` (its postinst runs depmod), so the build runs `depmod -b` on the unpacked
//! tree. When Debian stops serving this version, `apt-get download` fails with a message saying
//! so: move [`PINNED`] to the new version and its hash (`apt-cache show` prints both).

use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// A kernel package pinned by version and hash.
#[derive(Debug, Clone, Copy)]
pub struct KernelPin {
    /// The Debian package (`linux-image-<release>`).
    pub package: &'static str,
    /// The package version apt must fetch.
    pub version: &'static str,
    /// `uname -r` of that kernel: the directory under /lib/modules and /boot's suffix.
    pub release: &'static str,
    /// SHA-256 of the `.deb`, as `apt-cache show` prints it.
    pub sha256: &'static str,
}

/// Debian 12's kernel 6.1.176-1 (bookworm main and bookworm-security).
pub const PINNED: KernelPin = KernelPin {
    package: "linux-image-6.1.0-50-amd64",
    version: "6.1.176-1",
    release: "6.1.0-50-amd64",
    sha256: "7b5597492a0a65aee61985a492e6bcc3f2cde830072a0e3b3d8c7e1b90279bd3",
};

/// An unpacked, verified kernel.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The pin it was made from.
    pub pin: KernelPin,
    /// The unpacked package's root.
    pub root: PathBuf,
}

impl Kernel {
    /// The bootable kernel image.
    pub fn vmlinuz(&self) -> PathBuf {
        self.root.join(format!("boot/vmlinuz-{}", self.pin.release))
    }

    /// `/lib/modules/<release>` of the unpacked package.
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join(format!("lib/modules/{}", self.pin.release))
    }
}

/// Why the kernel could not be had.
#[derive(Debug)]
pub enum KernelError {
    /// A command (apt-get, dpkg-deb, depmod) could not be run or failed.
    Command { what: String, detail: String },
    /// The downloaded package is not the pinned one.
    HashMismatch {
        file: PathBuf,
        want: String,
        got: String,
    },
    /// A file the package must contain is not there.
    Missing(PathBuf),
    /// Reading or writing under the cache failed.
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelError::Command { what, detail } => write!(f, "{what}: {detail}"),
            KernelError::HashMismatch { file, want, got } => write!(
                f,
                "{}: SHA-256 is {got}, the pinned package's is {want}; refusing to use it \
                 (delete the file to fetch it again)",
                file.display()
            ),
            KernelError::Missing(p) => write!(f, "the kernel package has no {}", p.display()),
            KernelError::Io { path, error } => write!(f, "{}: {error}", path.display()),
        }
    }
}

impl std::error::Error for KernelError {}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KernelError + '_ {
    move |error| KernelError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// SHA-256 of a file, lower-case hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// SHA-256 of bytes, lower-case hex.
pub fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn run(what: &str, cmd: &mut Command) -> Result<(), KernelError> {
    let out = cmd.output().map_err(|e| KernelError::Command {
        what: what.to_string(),
        detail: format!(
            "cannot run {:?}: {e} (scripts/setup-debian.sh installs it)",
            cmd.get_program()
        ),
    })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(KernelError::Command {
        what: what.to_string(),
        detail: format!("{} ({})", stderr.trim(), out.status),
    })
}

/// Fetches (or finds in `cache`), verifies and unpacks the pinned kernel. `progress` is told
/// each step.
pub fn prepare(
    pin: KernelPin,
    cache: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Kernel, KernelError> {
    fs::create_dir_all(cache).map_err(io(cache))?;
    // Builds running at once (tests in parallel) share the cache: one unpacks, the others
    // wait for it. The lock goes with the file when this returns.
    let lock_path = cache.join(".lock");
    let lock = fs::File::create(&lock_path).map_err(io(&lock_path))?;
    lock.lock().map_err(io(&lock_path))?;
    let deb = cache.join(format!("{}_{}_amd64.deb", pin.package, pin.version));
    if deb.exists() {
        progress(&format!("{} {} (cached)", pin.package, pin.version));
    } else {
        progress(&format!(
            "fetching {} {} with apt",
            pin.package, pin.version
        ));
        // apt-get download writes into the working directory; a partial file never gets the
        // final name, so an interrupted fetch is retried next time.
        run(
            &format!(
                "apt-get download {}={} (if Debian no longer serves this version, move the pin \
                 in image/src/kernel.rs)",
                pin.package, pin.version
            ),
            Command::new("apt-get")
                .arg("download")
                .arg("-q")
                .arg(format!("{}={}", pin.package, pin.version))
                .current_dir(cache),
        )?;
        if !deb.exists() {
            return Err(KernelError::Missing(deb));
        }
    }
    let got = sha256_file(&deb).map_err(io(&deb))?;
    if got != pin.sha256 {
        return Err(KernelError::HashMismatch {
            file: deb,
            want: pin.sha256.to_string(),
            got,
        });
    }
    progress(&format!("SHA-256 {got} matches the pin"));

    let root = cache.join(format!("{}_{}", pin.package, pin.version));
    let stamp = root.join(".unpacked");
    let kernel = Kernel {
        pin,
        root: root.clone(),
    };
    // The stamp holds the hash of the package it was unpacked from: a tree left half-written
    // by an interrupted run has none and is unpacked again.
    if fs::read_to_string(&stamp).ok().as_deref() != Some(pin.sha256) {
        progress("unpacking with dpkg-deb and running depmod");
        if root.exists() {
            fs::remove_dir_all(&root).map_err(io(&root))?;
        }
        run(
            "dpkg-deb -x",
            Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
        )?;
        run(
            "depmod -b",
            Command::new("depmod").arg("-b").arg(&root).arg(pin.release),
        )?;
        fs::write(&stamp, pin.sha256).map_err(io(&stamp))?;
    }
    for p in [kernel.vmlinuz(), kernel.modules_dir().join("modules.dep")] {
        if !p.exists() {
            return Err(KernelError::Missing(p));
        }
    }
    Ok(kernel)
}
