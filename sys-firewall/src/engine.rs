//! The engine: API types. (Implementation in progress.)

use std::net::IpAddr;

use crate::config::{ConfigError, EngineConfig};

/// An interface: 0 is the uplink, 1.. are the client vifs in configuration order.
pub type IfaceId = u32;

/// The uplink's interface id.
pub const UPLINK: IfaceId = 0;

/// What happened to the frame passed to [`Engine::handle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The frame was rewritten in place (same length) and must be sent on this interface.
    Forward(IfaceId),
    /// The frame must not be sent; anything to send instead is in the [`Outbox`].
    Consumed,
}

/// Why a frame was dropped (also the counter names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Accepted and forwarded (not a drop; counted with the others).
    Accepted,
    RejectedByRule,
    Spoofed,
    NoFlow,
    Malformed,
    TableFull,
    ClientToClient,
    TtlExceeded,
    TooBig,
    Unsupported,
    ClientBlocked,
    Local,
}

/// Something the shell should know or do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Resolve this name and call [`Engine::dns_answer`].
    Resolve { name: String },
    /// A frame was dropped (for logging, rate-limited by the shell).
    Dropped { iface: IfaceId, reason: Reason },
}

/// Frames and events produced by one engine call. Reused across calls, so it stops allocating
/// once warmed up.
#[derive(Debug, Default)]
pub struct Outbox {
    data: Vec<u8>,
    frames: Vec<(IfaceId, usize, usize)>,
    pub events: Vec<Event>,
}

impl Outbox {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn clear(&mut self) {
        self.data.clear();
        self.frames.clear();
        self.events.clear();
    }

    /// Appends a frame to send.
    pub fn push_frame(&mut self, iface: IfaceId, frame: &[u8]) {
        let start = self.data.len();
        self.data.extend_from_slice(frame);
        self.frames.push((iface, start, frame.len()));
    }

    /// The frames, in the order they were produced.
    pub fn frames(&self) -> impl Iterator<Item = (IfaceId, &[u8])> {
        self.frames
            .iter()
            .map(|&(i, s, l)| (i, &self.data[s..s + l]))
    }

    pub fn frame_count(&self) -> usize {
        self.frames.len()
    }
}

/// The engine.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
}

impl Engine {
    pub fn new(config: EngineConfig) -> Result<Self, ConfigError> {
        Ok(Engine { config })
    }

    /// Interface id of an interface name.
    pub fn iface_by_name(&self, name: &str) -> Option<IfaceId> {
        if name == self.config.uplink.name {
            return Some(UPLINK);
        }
        self.config
            .clients
            .iter()
            .position(|c| c.vif == name)
            .map(|i| i as IfaceId + 1)
    }

    /// Name of an interface id.
    pub fn iface_name(&self, id: IfaceId) -> Option<&str> {
        if id == UPLINK {
            return Some(&self.config.uplink.name);
        }
        self.config
            .clients
            .get(id as usize - 1)
            .map(|c| c.vif.as_str())
    }

    /// All interfaces, uplink first.
    pub fn ifaces(&self) -> Vec<(IfaceId, String)> {
        let mut v = vec![(UPLINK, self.config.uplink.name.clone())];
        for (i, c) in self.config.clients.iter().enumerate() {
            v.push((i as IfaceId + 1, c.vif.clone()));
        }
        v
    }

    /// Handles one frame that arrived on `iface` at `now` (nanoseconds, monotonic).
    pub fn handle(&mut self, now: u64, iface: IfaceId, frame: &mut [u8], out: &mut Outbox) -> Verdict {
        let _ = (now, iface, frame, out);
        Verdict::Consumed
    }

    /// Timer work due at `now`.
    pub fn tick(&mut self, now: u64, out: &mut Outbox) {
        let _ = (now, out);
    }

    /// An answer (or a failure: `None`) for a name the engine asked about.
    pub fn dns_answer(&mut self, now: u64, name: &str, answer: Option<(Vec<IpAddr>, u32)>, out: &mut Outbox) {
        let _ = (now, name, answer, out);
    }

    /// Replaces the configuration; flows the new rules refuse are cut.
    pub fn apply(&mut self, now: u64, config: EngineConfig, out: &mut Outbox) -> Result<(), ConfigError> {
        let _ = (now, out);
        self.config = config;
        Ok(())
    }
}
