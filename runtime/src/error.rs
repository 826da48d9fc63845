//! The errors that stop a service or refuse a configuration, each saying what to do.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// A failure of a service qube daemon: what failed, on what, and the cause.
#[derive(Debug)]
pub enum ServiceError {
    /// The configuration (file or QubesDB tree) cannot be used; the running one is kept.
    Config(ConfigError),
    /// The QubesDB daemon could not be reached or answered badly.
    QubesDb { what: String, source: io::Error },
    /// An interface the service needs cannot be opened.
    Device { iface: String, source: io::Error },
    /// The uplink named in the configuration does not exist here.
    NoUplink { iface: String },
    /// The control socket could not be created or reached.
    Control { path: PathBuf, source: io::Error },
    /// Another system resource (signals, netlink, poll) failed.
    System {
        what: &'static str,
        source: io::Error,
    },
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceError::Config(e) => write!(f, "{e}"),
            ServiceError::QubesDb { what, source } => write!(
                f,
                "QubesDB: {what}: {source} (is qubesdb-daemon running, and is the socket path right?)"
            ),
            ServiceError::Device { iface, source } => write!(
                f,
                "cannot open {iface}: {source} (the service needs root, or CAP_NET_RAW and CAP_NET_ADMIN)"
            ),
            ServiceError::NoUplink { iface } => write!(
                f,
                "uplink {iface} does not exist in this network namespace (check the uplink name, \
                 or start the service in the qube's namespace)"
            ),
            ServiceError::Control { path, source } => write!(
                f,
                "control socket {}: {source} (is the service running? is another one using the path?)",
                path.display()
            ),
            ServiceError::System { what, source } => write!(f, "{what}: {source}"),
        }
    }
}

impl std::error::Error for ServiceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ServiceError::Config(e) => Some(e),
            ServiceError::QubesDb { source, .. }
            | ServiceError::Device { source, .. }
            | ServiceError::Control { source, .. }
            | ServiceError::System { source, .. } => Some(source),
            ServiceError::NoUplink { .. } => None,
        }
    }
}

impl From<ConfigError> for ServiceError {
    fn from(e: ConfigError) -> Self {
        ServiceError::Config(e)
    }
}

/// A configuration that cannot be used, naming the file, key or vif at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// The file cannot be read.
    Read { file: PathBuf, error: String },
    /// The YAML does not parse or does not fit the schema (serde's message has the line).
    Syntax {
        file: Option<PathBuf>,
        error: String,
    },
    /// A value is out of range or inconsistent.
    Invalid {
        file: Option<PathBuf>,
        error: String,
    },
    /// The QubesDB tree (or the tree from the file) does not make an engine configuration.
    Tree(qubes_engine::config::ConfigError),
}

impl ConfigError {
    /// Names the file the error is about.
    pub fn in_file(self, path: &std::path::Path) -> Self {
        match self {
            ConfigError::Syntax { error, .. } => ConfigError::Syntax {
                file: Some(path.to_path_buf()),
                error,
            },
            ConfigError::Invalid { error, .. } => ConfigError::Invalid {
                file: Some(path.to_path_buf()),
                error,
            },
            e => e,
        }
    }

    /// The message without the file name.
    pub fn message(&self) -> String {
        match self {
            ConfigError::Read { error, .. }
            | ConfigError::Syntax { error, .. }
            | ConfigError::Invalid { error, .. } => error.clone(),
            ConfigError::Tree(e) => e.to_string(),
        }
    }

    /// The file at fault, when there is one.
    pub fn file(&self) -> Option<&std::path::Path> {
        match self {
            ConfigError::Read { file, .. } => Some(file),
            ConfigError::Syntax { file, .. } | ConfigError::Invalid { file, .. } => file.as_deref(),
            ConfigError::Tree(_) => None,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.file() {
            Some(file) => write!(f, "{}: {}", file.display(), self.message()),
            None => write!(f, "configuration: {}", self.message()),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Tree(e) => Some(e),
            _ => None,
        }
    }
}

impl From<qubes_engine::config::ConfigError> for ConfigError {
    fn from(e: qubes_engine::config::ConfigError) -> Self {
        ConfigError::Tree(e)
    }
}
