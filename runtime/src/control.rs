//! The control socket: a UNIX stream socket taking one command line per connection and
//! answering with text (`status`, `reload`), and the client side the CLI uses.
//!
//! The server binds under a temporary name and is renamed into place by [`ControlServer::
//! publish`] once the service forwards, so a control socket that exists means a running
//! service; it is removed when the server is dropped.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::ServiceError;

/// Longest command line accepted.
const MAX_LINE: u64 = 4096;

/// The listening end.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    pending: PathBuf,
    path: PathBuf,
    published: bool,
}

impl ControlServer {
    /// Listens on a temporary name beside `path`.
    pub fn bind(path: &Path, service: &str) -> Result<Self, ServiceError> {
        let pending = path.with_file_name(format!(".{service}-control.{}", std::process::id()));
        let _ = std::fs::remove_file(&pending);
        let ctl = |source| ServiceError::Control {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(&pending).map_err(ctl)?;
        listener.set_nonblocking(true).map_err(ctl)?;
        Ok(ControlServer {
            listener,
            pending,
            path: path.to_path_buf(),
            published: false,
        })
    }

    /// Moves the socket to its real path.
    pub fn publish(&mut self) -> Result<(), ServiceError> {
        std::fs::rename(&self.pending, &self.path).map_err(|source| ServiceError::Control {
            path: self.path.clone(),
            source,
        })?;
        self.published = true;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next waiting request, if any. Reply with [`ControlRequest::reply`]; a request
    /// dropped unanswered closes the connection.
    pub fn next_request(&self) -> Option<ControlRequest> {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket");
                    return None;
                }
            };
            match read_command(&stream) {
                Ok(command) => return Some(ControlRequest { stream, command }),
                Err(e) => tracing::debug!(error = %e, "control request"),
            }
        }
    }
}

/// One command read from the control socket.
#[derive(Debug)]
pub struct ControlRequest {
    stream: UnixStream,
    command: String,
}

impl ControlRequest {
    /// The command line, trimmed.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// Sends the answer and closes the connection.
    pub fn reply(self, text: &str) {
        if let Err(e) = (&self.stream).write_all(text.as_bytes()) {
            tracing::debug!(error = %e, "control reply");
        }
    }
}

fn read_command(stream: &UnixStream) -> io::Result<String> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    let mut line = String::new();
    BufReader::new(stream.take(MAX_LINE)).read_line(&mut line)?;
    Ok(line.trim().to_string())
}

impl AsRawFd for ControlServer {
    fn as_raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(if self.published {
            &self.path
        } else {
            &self.pending
        });
    }
}

/// Sends one command to a running service and returns its answer.
pub fn request(socket: &Path, command: &str, program: &str) -> Result<String, ServiceError> {
    let ctl = |source| ServiceError::Control {
        path: socket.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(socket).map_err(|e| {
        ctl(io::Error::new(
            e.kind(),
            format!("{e}; is `{program} run` running with this --control path?"),
        ))
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(ctl)?;
    writeln!(s, "{command}").map_err(ctl)?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(ctl)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_server_answers_and_is_removed_when_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("svc.sock");
        let mut server = ControlServer::bind(&path, "svc").expect("bind");
        assert!(!path.exists(), "not published before the service is ready");
        assert!(request(&path, "status", "svc").is_err());
        server.publish().expect("publish");
        let p = path.clone();
        let client = std::thread::spawn(move || request(&p, "status", "svc"));
        // Serve until the client's one request has been answered.
        for _ in 0..500 {
            if let Some(req) = server.next_request() {
                let answer = format!("you said {}\n", req.command());
                req.reply(&answer);
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let answer = client.join().expect("client thread").expect("answer");
        assert_eq!(answer, "you said status\n");
        drop(server);
        assert!(!path.exists());
    }
}
