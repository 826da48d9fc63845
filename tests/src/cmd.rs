//! Running the system tools (`ip`, `nft`, `dnsmasq`, ...): every command's status is checked,
//! and a failure names the command line and carries what it printed on stderr.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

/// What went wrong, in words a user can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// `Err(Error(msg))`.
pub fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error(msg.into()))
}

/// An I/O error on a path, as `what PATH: error`.
pub fn io_err<'a>(what: &str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    let what = what.to_string();
    move |e| Error(format!("{what} {}: {e}", path.display()))
}

/// Adds context in front of an error message.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error(format!("{}: {e}", what())))
    }
}

/// A command line that remembers how to print itself.
#[derive(Debug)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
}

/// Quotes an argument for display when a shell would need it.
fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@+%".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Cmd {
            program: program.as_ref().to_os_string(),
            args: Vec::new(),
        }
    }

    /// `ip netns exec NS PROGRAM`: PROGRAM runs in the namespace, with the files of
    /// `/etc/netns/NS/` bind-mounted over `/etc/`.
    pub fn in_ns(ns: &str, program: impl AsRef<OsStr>) -> Self {
        Cmd::new("ip").args(["netns", "exec", ns]).arg(program)
    }

    /// `ip -n NS ARGS...`: an `ip` command for one namespace (no mount namespace needed).
    pub fn ip(ns: &str) -> Self {
        Cmd::new("ip").args(["-n", ns])
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_os_string());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// The command line as a shell would take it.
    pub fn display(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|a| shell_word(&a.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args);
        c
    }

    fn failure(&self, out: &Output) -> Error {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let said = if stderr.trim().is_empty() {
            stdout.trim().to_string()
        } else {
            stderr.trim().to_string()
        };
        let status = match out.status.code() {
            Some(c) => format!("exit status {c}"),
            None => "killed by a signal".to_string(),
        };
        if said.is_empty() {
            Error(format!("command failed ({status}): {}", self.display()))
        } else {
            Error(format!(
                "command failed ({status}): {}\n{}",
                self.display(),
                indent(&said)
            ))
        }
    }

    fn start_error(&self, e: io::Error) -> Error {
        Error(format!("cannot run {}: {e}", self.display()))
    }

    /// Runs the command to the end; its stdout on success, an error naming it otherwise.
    pub fn run(&self) -> Result<String> {
        self.run_input(None)
    }

    /// Runs the command with `input` on its stdin.
    pub fn run_stdin(&self, input: &str) -> Result<String> {
        self.run_input(Some(input))
    }

    fn run_input(&self, input: Option<&str>) -> Result<String> {
        let out = self.output(input)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(self.failure(&out))
        }
    }

    /// Runs the command and returns its output whatever its exit status.
    pub fn output(&self, input: Option<&str>) -> Result<Output> {
        let mut c = self.command();
        c.stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = c.spawn().map_err(|e| self.start_error(e))?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin
                .write_all(text.as_bytes())
                .map_err(|e| Error(format!("writing to {}: {e}", self.display())))?;
        }
        child
            .wait_with_output()
            .map_err(|e| Error(format!("waiting for {}: {e}", self.display())))
    }

    /// Starts the command in the background, in a process group of its own (so a Ctrl-C in
    /// the terminal that ran `up` does not reach it), stdout and stderr appended to `log`.
    pub fn spawn_logged(&self, log: &Path) -> Result<Child> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io_err("cannot open log file", log))?;
        let file2 = file
            .try_clone()
            .map_err(io_err("cannot open log file", log))?;
        let mut c = self.command();
        c.stdin(Stdio::null())
            .stdout(file)
            .stderr(file2)
            .process_group(0);
        c.spawn().map_err(|e| self.start_error(e))
    }
}

/// Indents every line by four spaces (for command output inside an error message).
pub fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether `program` can be found in PATH.
pub fn in_path(program: &str) -> bool {
    find_in_path(program).is_some()
}

/// The first `program` in PATH.
pub fn find_in_path(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_what_a_shell_would_split() {
        let c = Cmd::new("nft").args(["add", "element", "ip qubes", "a'b", ""]);
        assert_eq!(c.display(), "nft add element 'ip qubes' 'a'\\''b' ''");
    }

    #[test]
    fn failure_names_command_and_stderr() {
        let c = Cmd::new("sh").args(["-c", "echo oops >&2; exit 3"]);
        let e = c.run().expect_err("must fail");
        assert!(e.0.contains("exit status 3"), "{e}");
        assert!(e.0.contains("sh -c"), "{e}");
        assert!(e.0.contains("oops"), "{e}");
    }

    #[test]
    fn stdin_is_passed() {
        let out = Cmd::new("cat").run_stdin("hello\n").expect("cat works");
        assert_eq!(out, "hello\n");
    }
}
