//! The event loop's wait: descriptors registered under tokens the caller chooses, and one
//! `poll(2)` that says which tokens are ready. Sources are found by token, never by their
//! position in a list, so adding or removing a device does not move the others.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use vif_backend::sys::poll_readable;

/// What a registered descriptor is, in the caller's terms.
pub type Token = u64;

/// A set of descriptors to wait on.
#[derive(Debug, Default)]
pub struct Poller {
    fds: Vec<RawFd>,
    tokens: Vec<Token>,
    ready: Vec<bool>,
}

impl Poller {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets every registration (the caller registers what it has each round).
    pub fn clear(&mut self) {
        self.fds.clear();
        self.tokens.clear();
    }

    pub fn register(&mut self, token: Token, fd: RawFd) {
        self.fds.push(fd);
        self.tokens.push(token);
    }

    /// Waits until a descriptor is readable or `timeout` passes; returns the ready tokens
    /// (none on timeout or on a signal).
    pub fn wait(&mut self, timeout: Duration, ready: &mut Vec<Token>) -> io::Result<()> {
        ready.clear();
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        poll_readable(&self.fds, ms, &mut self.ready)?;
        ready.extend(
            self.tokens
                .iter()
                .zip(&self.ready)
                .filter(|(_, &r)| r)
                .map(|(&t, _)| t),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn reports_ready_descriptors_by_token() {
        let (mut a, b) = UnixStream::pair().expect("pair");
        let (_c, d) = UnixStream::pair().expect("pair");
        let mut p = Poller::new();
        p.register(7, d.as_raw_fd());
        p.register(42, b.as_raw_fd());
        let mut ready = Vec::new();
        p.wait(Duration::ZERO, &mut ready).expect("poll");
        assert!(ready.is_empty());
        a.write_all(b"x").expect("write");
        p.wait(Duration::from_secs(5), &mut ready).expect("poll");
        assert_eq!(ready, vec![42]);
    }
}
