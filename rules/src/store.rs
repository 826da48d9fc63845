//! A directory laid out like dom0's `/var/lib/qubes`: `appvms/<qube>/firewall.xml`.
//!
//! This is what `qvm-firewall` edits when there is no qubesd to talk to (the lab, tests, a
//! management host). Writes are atomic (temporary file, fsync, rename) and serialised per qube
//! with a lock file, so a crash or a concurrent edit never leaves a half-written firewall.xml.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::rule::Rule;
use crate::xml;

/// Where `qvm-firewall` looks when neither `--store` nor `QUBES_FIREWALL_STORE` is given.
pub const DEFAULT_ROOT: &str = "/var/lib/qubes";

/// Something that went wrong reading or writing the store.
#[derive(Debug)]
pub enum StoreError {
    /// No `appvms/<name>` directory (or a name Qubes would not allow).
    NoSuchDomain(String),
    Io {
        path: PathBuf,
        source: io::Error,
    },
    /// firewall.xml exists but cannot be read as rules.
    Xml {
        path: PathBuf,
        source: xml::XmlError,
    },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::NoSuchDomain(name) => {
                write!(f, "no such domain: {}", crate::py::repr(name))
            }
            StoreError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            StoreError::Xml { path, source } => write!(f, "{}: {source}", path.display()),
        }
    }
}

impl std::error::Error for StoreError {}

/// A qube name as Qubes accepts it: a letter, then letters, digits, `_`, `.`, `-`; at most 31.
pub fn valid_qube_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic())
        && name.len() <= 31
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// The store rooted at a directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Held while a qube's rules are read, changed and written back.
#[derive(Debug)]
pub struct QubeLock {
    _file: File,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Store { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `appvms/<name>`, which must exist.
    pub fn qube_dir(&self, name: &str) -> Result<PathBuf, StoreError> {
        if !valid_qube_name(name) {
            return Err(StoreError::NoSuchDomain(name.to_string()));
        }
        let dir = self.root.join("appvms").join(name);
        if dir.is_dir() {
            Ok(dir)
        } else {
            Err(StoreError::NoSuchDomain(name.to_string()))
        }
    }

    /// Creates `appvms/<name>` (what creating a qube does for its directory).
    pub fn create_qube(&self, name: &str) -> Result<PathBuf, StoreError> {
        if !valid_qube_name(name) {
            return Err(StoreError::NoSuchDomain(name.to_string()));
        }
        let dir = self.root.join("appvms").join(name);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(dir)
    }

    /// The qubes in the store, sorted.
    pub fn qubes(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.root.join("appvms");
        let mut names = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(names),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err(&dir))?;
            if let Some(name) = entry.file_name().to_str() {
                if valid_qube_name(name) && entry.path().is_dir() {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    pub fn firewall_path(&self, name: &str) -> Result<PathBuf, StoreError> {
        Ok(self.qube_dir(name)?.join("firewall.xml"))
    }

    /// Serialises read-modify-write cycles on one qube's rules.
    pub fn lock(&self, name: &str) -> Result<QubeLock, StoreError> {
        let path = self.qube_dir(name)?.join(".firewall.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        file.lock().map_err(io_err(&path))?;
        Ok(QubeLock { _file: file })
    }

    /// `Firewall.load()`: the rules in firewall.xml, or dom0's default `[action=accept]` when
    /// there is no file.
    pub fn load(&self, name: &str) -> Result<Vec<Rule>, StoreError> {
        let path = self.firewall_path(name)?;
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![Rule::accept_all()]),
            Err(e) => return Err(io_err(&path)(e)),
        };
        xml::read(&text).map_err(|source| StoreError::Xml { path, source })
    }

    /// `Firewall.save()`: writes firewall.xml v2 (expired rules left out) atomically, mode 0664.
    pub fn save(&self, name: &str, rules: &[Rule], now: u64) -> Result<(), StoreError> {
        let path = self.firewall_path(name)?;
        let text = xml::write_v2(rules, now);
        write_atomic(&path, text.as_bytes())
    }
}

/// Writes `data` to `path` so that readers see either the old or the new content, never a mix.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("firewall.xml");
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    let result = (|| -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.set_permissions(fs::Permissions::from_mode(0o664))?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Ok(d) = File::open(dir) {
            // Makes the rename itself durable; failure here does not undo the write.
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qube_names() {
        for ok in ["work", "sys-firewall", "a", "disp1234", "my.qube_2"] {
            assert!(valid_qube_name(ok), "{ok}");
        }
        for bad in ["", "1abc", "../etc", "a/b", "-x", &"a".repeat(32)] {
            assert!(!valid_qube_name(bad), "{bad}");
        }
    }
}
