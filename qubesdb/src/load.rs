//! Pre-load files for the daemon: one `key value` entry per line.
//!
//! The format is what `qubes-rules qubesdb --ip ADDR` prints (docs/qubesdb.md):
//!
//! - the key runs up to the first space; the value is the rest of the line, kept as is
//!   (it may be empty and may contain spaces; a line holding only a key is an empty value);
//! - empty lines and lines starting with `#` are skipped;
//! - keys are checked as a WRITE would check them (qubes-core-qubesdb `daemon/db-cmds.c`);
//!   a later line for the same key wins.
//!
//! Values cannot contain a newline (nor NUL, which QubesDB refuses anyway).

use std::fmt;

use crate::tree::{check_key, check_value, RequestError, Tree};

/// A bad line in a pre-load file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// The file name, as given.
    pub source: String,
    /// 1-based line number.
    pub line: usize,
    pub key: String,
    pub error: RequestError,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: key {:?}: {}",
            self.source, self.line, self.key, self.error
        )
    }
}

impl std::error::Error for LoadError {}

/// The entries of a pre-load file, in file order. `source` names the file in errors.
pub fn parse_entries(text: &str, source: &str) -> Result<Vec<(String, Vec<u8>)>, LoadError> {
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once(' ').unwrap_or((line, ""));
        let checked = check_key(key).and_then(|()| check_value(value.as_bytes()));
        if let Err(error) = checked {
            return Err(LoadError {
                source: source.to_string(),
                line: i + 1,
                key: key.to_string(),
                error,
            });
        }
        entries.push((key.to_string(), value.as_bytes().to_vec()));
    }
    Ok(entries)
}

/// Writes the entries of a pre-load file into `tree` (watches are not fired: the daemon has
/// no clients yet when it loads).
pub fn load_into(tree: &mut Tree, text: &str, source: &str) -> Result<usize, LoadError> {
    let entries = parse_entries(text, source)?;
    let count = entries.len();
    for (key, value) in entries {
        // Already checked by parse_entries; a failure here would be the same error.
        tree.write(&key, &value).map_err(|error| LoadError {
            source: source.to_string(),
            line: 0,
            key: key.clone(),
            error,
        })?;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::WireError;

    #[test]
    fn lines_split_at_the_first_space() {
        let text = "# comment\n\n/qubes-firewall/10.137.0.10 \n/qubes-firewall/10.137.0.10/0000 \
                    action=accept proto=tcp dstports=22-22\n/name\n";
        let e = parse_entries(text, "f").expect("valid");
        assert_eq!(
            e,
            [
                ("/qubes-firewall/10.137.0.10".to_string(), b"".to_vec()),
                (
                    "/qubes-firewall/10.137.0.10/0000".to_string(),
                    b"action=accept proto=tcp dstports=22-22".to_vec()
                ),
                ("/name".to_string(), b"".to_vec()),
            ]
        );
    }

    #[test]
    fn bad_keys_say_where() {
        let err = parse_entries("/ok 1\n/bad*key 2\n", "db.txt").expect_err("bad key");
        assert_eq!(err.line, 2);
        assert_eq!(
            err.error,
            RequestError::Path(WireError::PathBadChar { byte: b'*', at: 4 })
        );
        assert_eq!(
            err.to_string(),
            "db.txt:2: key \"/bad*key\": path contains '*' at byte 4"
        );
        let err = parse_entries("/dir/ x\n", "db.txt").expect_err("trailing slash");
        assert_eq!(err.error, RequestError::TrailingSlash);
    }
}
