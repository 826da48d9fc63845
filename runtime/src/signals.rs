//! The signals a service qube daemon answers: SIGTERM and SIGINT stop it (leaving clients
//! without forwarding: fail closed), SIGHUP re-reads the whole configuration (as the Qubes
//! agent does).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::ServiceError;

/// Flags set by the signal handlers, read by the event loop.
#[derive(Debug, Clone)]
pub struct Signals {
    term: Arc<AtomicBool>,
    hup: Arc<AtomicBool>,
}

impl Signals {
    pub fn install() -> Result<Self, ServiceError> {
        let s = Signals {
            term: Arc::new(AtomicBool::new(false)),
            hup: Arc::new(AtomicBool::new(false)),
        };
        for (sig, flag) in [
            (signal_hook::consts::SIGTERM, &s.term),
            (signal_hook::consts::SIGINT, &s.term),
            (signal_hook::consts::SIGHUP, &s.hup),
        ] {
            signal_hook::flag::register(sig, Arc::clone(flag)).map_err(|source| {
                ServiceError::System {
                    what: "installing a signal handler",
                    source,
                }
            })?;
        }
        Ok(s)
    }

    /// SIGTERM or SIGINT arrived.
    pub fn stop_requested(&self) -> bool {
        self.term.load(Ordering::Relaxed)
    }

    /// SIGHUP arrived since the last call.
    pub fn take_reload(&self) -> bool {
        self.hup.swap(false, Ordering::Relaxed)
    }
}
