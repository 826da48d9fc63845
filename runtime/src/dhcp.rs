//! A sans-IO DHCPv4 client (RFC 2131, options RFC 2132) for sys-net's uplink: it says what to
//! send and when, takes what came back, and reports leases; the caller moves the UDP payloads
//! (port 68 to port 67, through the host stack or a raw socket) and supplies the time (the
//! engine's [`Instant`]).
//!
//! The states are RFC 2131 figure 5's. Transaction ids come from a PRNG seeded by
//! [`DhcpConfig::seed`], a fresh one per exchange (RFC 2131 section 4.1); DISCOVER and the
//! REQUESTs of SELECTING and INIT-REBOOT are sent again after 4, 8, 16, 32, then 64 s, each
//! ±1 s at random (section 4.1); a lease is renewed from T1 and rebound from T2 (section
//! 4.4.5). The client sends no host name unless configured: a lease request should not tell
//! the network who we are.

pub mod wire;

use std::net::Ipv4Addr;
use std::time::Duration;

use qubes_engine::Instant;

use wire::{opt, MessageType, Repr, WireError, BOOTREPLY, BOOTREQUEST, FLAG_BROADCAST};

/// UDP ports (RFC 2131 section 4.1).
pub const CLIENT_PORT: u16 = 68;
pub const SERVER_PORT: u16 = 67;
/// Sends of a SELECTING or INIT-REBOOT REQUEST before starting again from INIT (RFC 2131
/// section 3.1 step 5 / 3.2 leave the number to us): 4 + 8 + 16 + 32 s, about a minute.
pub const REQUEST_TRIES: u32 = 4;
/// The longest retransmission wait (RFC 2131 section 4.1).
pub const MAX_BACKOFF: Duration = Duration::from_secs(64);
/// The shortest wait between retransmissions in RENEWING and REBINDING (RFC 2131 4.4.5).
pub const MIN_RENEW_WAIT: Duration = Duration::from_secs(60);
/// After a NAK or a failed exchange the client waits this long before a new DISCOVER, so a
/// server that NAKs everything is not answered by a flood.
pub const RESTART_DELAY: Duration = Duration::from_secs(2);
/// Lease time meaning "infinite" (RFC 2132 section 9.2).
pub const INFINITE: u32 = u32::MAX;

/// How the client presents itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpConfig {
    /// The uplink's MAC: `chaddr`, and the client identifier 0x01 + MAC (option 61).
    pub mac: [u8; 6],
    /// Option 12, only if set: `None` by default for privacy.
    pub hostname: Option<String>,
    /// Seeds transaction ids and retransmission jitter.
    pub seed: u64,
}

impl DhcpConfig {
    pub fn new(mac: [u8; 6], seed: u64) -> Self {
        DhcpConfig {
            mac,
            hostname: None,
            seed,
        }
    }
}

/// A lease the server granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    /// The first router of option 3.
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    /// The server identifier (option 54): where renewals go.
    pub server: Ipv4Addr,
    /// Seconds; [`INFINITE`] for a lease that never ends (then T1 and T2 are too).
    pub lease_secs: u32,
    pub t1_secs: u32,
    pub t2_secs: u32,
    /// When the REQUEST that got this lease was first sent: the lease runs from there (RFC
    /// 2131 section 4.4.1, so a slow answer cannot make it look longer than it is).
    pub acquired: Instant,
}

impl Lease {
    fn at(&self, secs: u32) -> Option<Instant> {
        (secs != INFINITE).then(|| self.acquired + Duration::from_secs(u64::from(secs)))
    }
    /// When renewing starts, `None` for an infinite lease.
    pub fn t1(&self) -> Option<Instant> {
        self.at(self.t1_secs)
    }
    /// When rebinding starts.
    pub fn t2(&self) -> Option<Instant> {
        self.at(self.t2_secs)
    }
    /// When the address must stop being used.
    pub fn expires(&self) -> Option<Instant> {
        self.at(self.lease_secs)
    }
    fn expired(&self, now: Instant) -> bool {
        self.expires().is_some_and(|e| now >= e)
    }
}

/// RFC 2131 figure 5's states, plus `Released` after [`DhcpClient::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DhcpState {
    Init,
    Selecting,
    Requesting,
    InitReboot,
    Rebooting,
    Bound,
    Renewing,
    Rebinding,
    Released,
}

/// What the client asks the caller to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DhcpEffect {
    /// Send this UDP payload from port 68 to port 67. `src` is 0.0.0.0 (or the leased address
    /// when renewing, rebinding or releasing), `dst` is 255.255.255.255 or the server (unicast
    /// in RENEWING and for the release).
    Send {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        payload: Vec<u8>,
    },
    /// A lease was obtained or renewed (possibly with changed DNS/router/address).
    Bound(Lease),
    /// The lease is gone (expiry, NAK, release): stop using the address.
    Unbound,
}

/// One request/reply exchange: its id, when it began (for `secs` and the lease start), and
/// when to send again.
#[derive(Debug, Clone, Copy)]
struct Exchange {
    xid: u32,
    started: Instant,
    next: Instant,
    sends: u32,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting until `at` to send a DISCOVER.
    Init {
        at: Instant,
    },
    Selecting(Exchange),
    Requesting {
        ex: Exchange,
        address: Ipv4Addr,
        server: Ipv4Addr,
    },
    /// Waiting to send a REQUEST for `address` (at once when the link is up).
    InitReboot {
        address: Ipv4Addr,
    },
    Rebooting {
        ex: Exchange,
        address: Ipv4Addr,
    },
    Bound,
    Renewing(Exchange),
    Rebinding(Exchange),
    Released,
}

/// The client. Create it, call [`DhcpClient::poll`] at once and whenever
/// [`DhcpClient::next_deadline`] passes, and hand it every UDP payload that arrives on port 68.
#[derive(Debug)]
pub struct DhcpClient {
    cfg: DhcpConfig,
    phase: Phase,
    lease: Option<Lease>,
    link_up: bool,
    rng: u64,
}

impl DhcpClient {
    /// A client in INIT, to DISCOVER at the first poll. RFC 2131 section 4.4.1 suggests first
    /// waiting 1 to 10 s to spread a whole site powering on at once; a qube's boot already
    /// spreads that, and a service waiting for its uplink should not wait for nothing.
    pub fn new(cfg: DhcpConfig, now: Instant) -> Self {
        let rng = cfg.seed ^ 0x6a09_e667_f3bc_c908;
        DhcpClient {
            cfg,
            phase: Phase::Init { at: now },
            lease: None,
            link_up: true,
            rng,
        }
    }

    /// A client in INIT-REBOOT asking again for `previous` (RFC 2131 section 3.2), e.g. an
    /// address remembered across a restart.
    pub fn with_previous(cfg: DhcpConfig, previous: Ipv4Addr, now: Instant) -> Self {
        let mut c = DhcpClient::new(cfg, now);
        c.phase = Phase::InitReboot { address: previous };
        c
    }

    pub fn state(&self) -> DhcpState {
        match self.phase {
            Phase::Init { .. } => DhcpState::Init,
            Phase::Selecting(_) => DhcpState::Selecting,
            Phase::Requesting { .. } => DhcpState::Requesting,
            Phase::InitReboot { .. } => DhcpState::InitReboot,
            Phase::Rebooting { .. } => DhcpState::Rebooting,
            Phase::Bound => DhcpState::Bound,
            Phase::Renewing(_) => DhcpState::Renewing,
            Phase::Rebinding(_) => DhcpState::Rebinding,
            Phase::Released => DhcpState::Released,
        }
    }

    /// The lease in use, if any (also while the link is down and it has not expired).
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    fn next_rand(&mut self) -> u64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// The wait after send number `sends` (from 1) of an exchange: 4 s doubling to 64 s,
    /// each randomized by a uniform ±1 s (RFC 2131 section 4.1).
    fn backoff(&mut self, sends: u32) -> Duration {
        let base = Duration::from_secs(4)
            .saturating_mul(1 << sends.saturating_sub(1).min(4))
            .min(MAX_BACKOFF);
        let jitter_ms = self.next_rand() % 2001;
        (base + Duration::from_millis(jitter_ms)).saturating_sub(Duration::from_secs(1))
    }

    fn exchange(&mut self, now: Instant) -> Exchange {
        Exchange {
            xid: self.next_rand() as u32,
            started: now,
            next: now,
            sends: 0,
        }
    }

    /// When [`DhcpClient::poll`] next has work: a retransmission, T1, T2 or expiry.
    pub fn next_deadline(&self) -> Option<Instant> {
        let expiry = self.lease.as_ref().and_then(Lease::expires);
        if !self.link_up {
            return expiry;
        }
        let l = self.lease.as_ref();
        let due = match self.phase {
            Phase::Init { at } => Some(at),
            Phase::Selecting(ex) | Phase::Requesting { ex, .. } | Phase::Rebooting { ex, .. } => {
                Some(ex.next)
            }
            // Sent at once on the poll after `with_previous` or `link_up`.
            Phase::InitReboot { .. } => Some(Instant::ZERO),
            Phase::Bound => l.and_then(Lease::t1),
            Phase::Renewing(ex) => Some(ex.next).into_iter().chain(l.and_then(Lease::t2)).min(),
            Phase::Rebinding(ex) => Some(ex.next),
            Phase::Released => None,
        };
        match (due, expiry) {
            (Some(d), Some(e)) => Some(d.min(e)),
            (d, e) => d.or(e),
        }
    }

    /// Timer work due at `now`: (re)transmissions, renewing at T1, rebinding at T2, expiry.
    pub fn poll(&mut self, now: Instant, out: &mut Vec<DhcpEffect>) {
        if matches!(self.phase, Phase::Released) {
            return;
        }
        // RFC 2131 section 4.4.5: at expiry the address goes, whatever is under way.
        if self.lease.as_ref().is_some_and(|l| l.expired(now)) {
            self.lease = None;
            out.push(DhcpEffect::Unbound);
            self.phase = Phase::Init { at: now };
        }
        if !self.link_up {
            return;
        }
        match self.phase {
            Phase::Init { at } if now >= at => {
                let mut ex = self.exchange(now);
                self.send_discover(now, &mut ex, out);
                self.phase = Phase::Selecting(ex);
            }
            Phase::Selecting(mut ex) if now >= ex.next => {
                self.send_discover(now, &mut ex, out);
                self.phase = Phase::Selecting(ex);
            }
            Phase::Requesting {
                mut ex,
                address,
                server,
            } if now >= ex.next => {
                if ex.sends >= REQUEST_TRIES {
                    // RFC 2131 section 3.1 step 5: no answer, start over.
                    self.phase = Phase::Init { at: now };
                    return self.poll(now, out);
                }
                self.send_request(now, &mut ex, Some(address), Some(server), None, out);
                self.phase = Phase::Requesting {
                    ex,
                    address,
                    server,
                };
            }
            Phase::InitReboot { address } => {
                let mut ex = self.exchange(now);
                self.send_request(now, &mut ex, Some(address), None, None, out);
                self.phase = Phase::Rebooting { ex, address };
            }
            Phase::Rebooting { mut ex, address } if now >= ex.next => {
                if ex.sends >= REQUEST_TRIES {
                    // RFC 2131 section 3.2: with no answer the client may keep using an
                    // unexpired lease it still has; otherwise it starts over.
                    self.phase = match &self.lease {
                        Some(l) if l.address == address => Phase::Bound,
                        _ => Phase::Init { at: now },
                    };
                    return self.poll(now, out);
                }
                self.send_request(now, &mut ex, Some(address), None, None, out);
                self.phase = Phase::Rebooting { ex, address };
            }
            Phase::Bound => {
                let Some(l) = self.lease.clone() else {
                    self.phase = Phase::Init { at: now };
                    return self.poll(now, out);
                };
                if l.t2().is_some_and(|t2| now >= t2) {
                    let mut ex = self.exchange(now);
                    self.send_rebind(now, &mut ex, &l, out);
                    self.phase = Phase::Rebinding(ex);
                } else if l.t1().is_some_and(|t1| now >= t1) {
                    let mut ex = self.exchange(now);
                    self.send_renew(now, &mut ex, &l, out);
                    self.phase = Phase::Renewing(ex);
                }
            }
            Phase::Renewing(mut ex) => {
                let Some(l) = self.lease.clone() else {
                    self.phase = Phase::Init { at: now };
                    return self.poll(now, out);
                };
                if l.t2().is_some_and(|t2| now >= t2) {
                    let mut ex = self.exchange(now);
                    self.send_rebind(now, &mut ex, &l, out);
                    self.phase = Phase::Rebinding(ex);
                } else if now >= ex.next {
                    self.send_renew(now, &mut ex, &l, out);
                    self.phase = Phase::Renewing(ex);
                }
            }
            Phase::Rebinding(mut ex) if now >= ex.next => {
                let Some(l) = self.lease.clone() else {
                    self.phase = Phase::Init { at: now };
                    return self.poll(now, out);
                };
                self.send_rebind(now, &mut ex, &l, out);
                self.phase = Phase::Rebinding(ex);
            }
            _ => {}
        }
    }

    /// The carrier went away: nothing is sent until it is back, and the lease is kept (it
    /// still expires on time, see [`DhcpClient::poll`]).
    pub fn link_down(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Released) {
            return;
        }
        self.link_up = false;
        self.phase = match &self.lease {
            Some(l) if !l.expired(now) => Phase::InitReboot { address: l.address },
            _ => match self.phase {
                // A remembered address not yet confirmed is still worth asking for.
                Phase::InitReboot { address } | Phase::Rebooting { address, .. } => {
                    Phase::InitReboot { address }
                }
                _ => Phase::Init { at: now },
            },
        };
    }

    /// The carrier is back: we may be on another network, so the lease is checked with an
    /// INIT-REBOOT REQUEST if it has not expired (RFC 2131 section 3.2), else it starts over.
    pub fn link_up(&mut self, now: Instant, out: &mut Vec<DhcpEffect>) {
        if matches!(self.phase, Phase::Released) {
            return;
        }
        self.link_up = true;
        match &self.lease {
            Some(l) if !l.expired(now) => {
                self.phase = Phase::InitReboot { address: l.address };
            }
            Some(_) => {
                self.lease = None;
                out.push(DhcpEffect::Unbound);
                self.phase = Phase::Init { at: now };
            }
            None => {
                if !matches!(self.phase, Phase::InitReboot { .. }) {
                    self.phase = Phase::Init { at: now };
                }
            }
        }
        self.poll(now, out);
    }

    /// Gives the lease back with a DHCPRELEASE unicast to the server (RFC 2131 section 4.4.6),
    /// on a clean exit. The client then does nothing more.
    pub fn release(&mut self, out: &mut Vec<DhcpEffect>) {
        if let Some(l) = self.lease.take() {
            let xid = self.next_rand() as u32;
            let mut m = self.message(xid, MessageType::Release);
            m.ciaddr = l.address;
            m.push(opt::SERVER_ID, &l.server.octets());
            out.push(DhcpEffect::Send {
                src: l.address,
                dst: l.server,
                payload: m.emit(),
            });
            out.push(DhcpEffect::Unbound);
        }
        self.phase = Phase::Released;
    }

    /// A UDP payload that arrived on port 68. Anything that is not a well-formed reply to our
    /// current exchange (our xid and chaddr, RFC 2131 section 4.1) is ignored.
    pub fn handle(&mut self, now: Instant, payload: &[u8], out: &mut Vec<DhcpEffect>) {
        if !self.link_up {
            return;
        }
        let reply = match Reply::parse(payload, self.cfg.mac) {
            Ok(r) => r,
            // Another client's reply on a shared segment is normal; anything else is worth
            // a line when debugging a network that gives no lease.
            Err(ReplyError::NotOurs) => return,
            Err(e) => {
                tracing::debug!(error = %e, "DHCP message ignored");
                return;
            }
        };
        match self.phase {
            Phase::Selecting(ex) if reply.xid == ex.xid && reply.kind == MessageType::Offer => {
                // Take the first acceptable offer (RFC 2131 section 4.4.1 lets us choose).
                let (Some(server), true) = (reply.server, usable(reply.yiaddr)) else {
                    return;
                };
                // The REQUEST keeps the offer's xid (RFC 2131 section 4.4.1, table 5); the
                // lease will run from its sending.
                let mut ex = Exchange {
                    xid: ex.xid,
                    started: now,
                    next: now,
                    sends: 0,
                };
                self.send_request(now, &mut ex, Some(reply.yiaddr), Some(server), None, out);
                self.phase = Phase::Requesting {
                    ex,
                    address: reply.yiaddr,
                    server,
                };
            }
            Phase::Requesting { ex, server, .. } if reply.xid == ex.xid => {
                // Only the server we selected answers a REQUEST naming it.
                if reply.server.is_some_and(|s| s != server) {
                    return;
                }
                self.answer(now, ex, &reply, out);
            }
            Phase::Rebooting { ex, .. } | Phase::Renewing(ex) | Phase::Rebinding(ex)
                if reply.xid == ex.xid =>
            {
                self.answer(now, ex, &reply, out);
            }
            _ => {}
        }
    }

    /// An ACK or NAK to one of our REQUESTs.
    fn answer(&mut self, now: Instant, ex: Exchange, reply: &Reply, out: &mut Vec<DhcpEffect>) {
        match reply.kind {
            MessageType::Ack => {
                let Some(lease) = reply.lease(ex.started, self.lease.as_ref()) else {
                    return;
                };
                self.lease = Some(lease.clone());
                self.phase = Phase::Bound;
                out.push(DhcpEffect::Bound(lease));
            }
            MessageType::Nak => {
                // RFC 2131 section 3.1 step 5, 3.2 step 4, 4.4.5: stop using the address and
                // start over.
                if self.lease.take().is_some() {
                    out.push(DhcpEffect::Unbound);
                }
                self.phase = Phase::Init {
                    at: now + RESTART_DELAY,
                };
            }
            _ => {}
        }
    }

    /// A request with the options every message of ours carries (RFC 2131 section 4.4.1
    /// table 5, RFC 2132 9.14): type, client identifier 0x01 + MAC.
    fn message(&self, xid: u32, kind: MessageType) -> Repr {
        let mut m = Repr::new(BOOTREQUEST, xid, self.cfg.mac);
        m.push(opt::MESSAGE_TYPE, &[kind.code()]);
        let mut id = vec![wire::HTYPE_ETHERNET];
        id.extend_from_slice(&self.cfg.mac);
        m.push(opt::CLIENT_ID, &id);
        m
    }

    /// The parameter request list and, only if configured, the host name.
    fn ask_parameters(&self, m: &mut Repr) {
        m.push(
            opt::PARAMETER_REQUEST_LIST,
            &[
                opt::SUBNET_MASK,
                opt::ROUTER,
                opt::DNS,
                opt::LEASE_TIME,
                opt::RENEWAL_TIME,
                opt::REBINDING_TIME,
            ],
        );
        if let Some(h) = &self.cfg.hostname {
            // RFC 2132 section 3.14: at least one byte (longer values are split on emit).
            if !h.is_empty() {
                m.push(opt::HOST_NAME, h.as_bytes());
            }
        }
    }

    /// `secs`: seconds since the exchange began (RFC 2131 table 5).
    fn secs(ex: &Exchange, now: Instant) -> u16 {
        u16::try_from(now.saturating_duration_since(ex.started).as_secs()).unwrap_or(u16::MAX)
    }

    fn send_discover(&mut self, now: Instant, ex: &mut Exchange, out: &mut Vec<DhcpEffect>) {
        let mut m = self.message(ex.xid, MessageType::Discover);
        m.secs = Self::secs(ex, now);
        // Without an address we cannot take unicast replies before we are configured: ask
        // the server to broadcast them (RFC 2131 section 4.1).
        m.flags = FLAG_BROADCAST;
        self.ask_parameters(&mut m);
        ex.sends += 1;
        ex.next = now + self.backoff(ex.sends);
        out.push(DhcpEffect::Send {
            src: Ipv4Addr::UNSPECIFIED,
            dst: Ipv4Addr::BROADCAST,
            payload: m.emit(),
        });
    }

    /// A REQUEST of SELECTING (address and server) or INIT-REBOOT (address only), broadcast
    /// from 0.0.0.0 with ciaddr zero (RFC 2131 section 4.3.2, table 5); or with `ciaddr`.
    fn send_request(
        &mut self,
        now: Instant,
        ex: &mut Exchange,
        requested: Option<Ipv4Addr>,
        server: Option<Ipv4Addr>,
        ciaddr: Option<Ipv4Addr>,
        out: &mut Vec<DhcpEffect>,
    ) {
        let mut m = self.message(ex.xid, MessageType::Request);
        m.secs = Self::secs(ex, now);
        if let Some(a) = requested {
            m.push(opt::REQUESTED_ADDRESS, &a.octets());
        }
        if let Some(s) = server {
            m.push(opt::SERVER_ID, &s.octets());
        }
        match ciaddr {
            Some(c) => m.ciaddr = c,
            None => m.flags = FLAG_BROADCAST,
        }
        self.ask_parameters(&mut m);
        ex.sends += 1;
        ex.next = now + self.backoff(ex.sends);
        out.push(DhcpEffect::Send {
            src: Ipv4Addr::UNSPECIFIED,
            dst: Ipv4Addr::BROADCAST,
            payload: m.emit(),
        });
    }

    /// RENEWING: unicast to the server from the leased address, ciaddr set, no 50/54; again
    /// after half the time left to T2 but at least 60 s (RFC 2131 section 4.4.5).
    fn send_renew(
        &mut self,
        now: Instant,
        ex: &mut Exchange,
        l: &Lease,
        out: &mut Vec<DhcpEffect>,
    ) {
        let payload = self.renewal(now, ex, l);
        ex.next = retransmit_at(now, l.t2());
        out.push(DhcpEffect::Send {
            src: l.address,
            dst: l.server,
            payload,
        });
    }

    /// REBINDING: the same REQUEST broadcast, for any server; again after half the time left
    /// to expiry but at least 60 s (RFC 2131 section 4.4.5).
    fn send_rebind(
        &mut self,
        now: Instant,
        ex: &mut Exchange,
        l: &Lease,
        out: &mut Vec<DhcpEffect>,
    ) {
        let payload = self.renewal(now, ex, l);
        ex.next = retransmit_at(now, l.expires());
        out.push(DhcpEffect::Send {
            src: l.address,
            dst: Ipv4Addr::BROADCAST,
            payload,
        });
    }

    fn renewal(&mut self, now: Instant, ex: &mut Exchange, l: &Lease) -> Vec<u8> {
        let mut m = self.message(ex.xid, MessageType::Request);
        m.secs = Self::secs(ex, now);
        m.ciaddr = l.address;
        self.ask_parameters(&mut m);
        ex.sends += 1;
        m.emit()
    }
}

/// The next renewal or rebinding retransmission: half way to `until`, at least
/// [`MIN_RENEW_WAIT`] ahead, and never past `until` (where the next phase takes over).
fn retransmit_at(now: Instant, until: Option<Instant>) -> Instant {
    let Some(until) = until else {
        return now + MIN_RENEW_WAIT;
    };
    let half = until.saturating_duration_since(now) / 2;
    (now + half.max(MIN_RENEW_WAIT)).min(until)
}

/// An address a server may give us: not 0.0.0.0, multicast, broadcast or loopback (and not
/// class E, which cannot be a host's).
fn usable(a: Ipv4Addr) -> bool {
    !(a.is_unspecified() || a.is_multicast() || a.is_broadcast() || a.is_loopback())
        && a.octets()[0] < 240
}

/// A server reply checked to be for us, with the options the client uses.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reply {
    kind: MessageType,
    xid: u32,
    yiaddr: Ipv4Addr,
    server: Option<Ipv4Addr>,
    mask: Option<Ipv4Addr>,
    routers: Vec<Ipv4Addr>,
    dns: Vec<Ipv4Addr>,
    lease_secs: Option<u32>,
    t1: Option<u32>,
    t2: Option<u32>,
}

/// Why a payload is not a reply for us.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ReplyError {
    Wire(WireError),
    NotReply(u8),
    NotOurs,
}

impl std::fmt::Display for ReplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplyError::Wire(e) => e.fmt(f),
            ReplyError::NotReply(op) => write!(f, "DHCP message with op {op}, not BOOTREPLY (2)"),
            ReplyError::NotOurs => write!(f, "DHCP reply for another client's chaddr"),
        }
    }
}

impl From<WireError> for ReplyError {
    fn from(e: WireError) -> Self {
        ReplyError::Wire(e)
    }
}

impl Reply {
    fn parse(payload: &[u8], mac: [u8; 6]) -> Result<Reply, ReplyError> {
        let m = wire::Message::new_checked(payload)?;
        if m.op() != BOOTREPLY {
            return Err(ReplyError::NotReply(m.op()));
        }
        if m.htype() != wire::HTYPE_ETHERNET || m.hlen() != 6 || m.chaddr()[..6] != mac {
            return Err(ReplyError::NotOurs);
        }
        let r = Repr::parse(payload)?;
        let kind = r.message_type()?;
        let get_addr = |code| {
            r.option(code)
                .map(|v| wire::addr_option(code, v))
                .transpose()
        };
        let get_u32 = |code| {
            r.option(code)
                .map(|v| wire::u32_option(code, v))
                .transpose()
        };
        let get_list = |code| {
            r.option(code)
                .map(|v| wire::addrs_option(code, v))
                .transpose()
                .map(Option::unwrap_or_default)
        };
        Ok(Reply {
            kind,
            xid: r.xid,
            yiaddr: r.yiaddr,
            server: get_addr(opt::SERVER_ID)?,
            mask: get_addr(opt::SUBNET_MASK)?,
            routers: get_list(opt::ROUTER)?,
            dns: get_list(opt::DNS)?,
            lease_secs: get_u32(opt::LEASE_TIME)?,
            t1: get_u32(opt::RENEWAL_TIME)?,
            t2: get_u32(opt::REBINDING_TIME)?,
        })
    }

    /// The lease an ACK grants, counted from `sent`; `None` when the ACK lacks what RFC 2131
    /// table 3 says it must carry (a usable yiaddr, the lease time, a server id or one we
    /// know from `current`) or its subnet mask is not one.
    fn lease(&self, sent: Instant, current: Option<&Lease>) -> Option<Lease> {
        if !usable(self.yiaddr) {
            return None;
        }
        let lease_secs = self.lease_secs?;
        let server = self.server.or(current.map(|l| l.server))?;
        let prefix_len = match self.mask {
            Some(m) => wire::prefix_of_mask(m).ok()?,
            // No mask: the address's class (RFC 2131 section 2 leaves it to us; what
            // clients have always done, RFC 791's address classes).
            None => match self.yiaddr.octets()[0] {
                0..=127 => 8,
                128..=191 => 16,
                _ => 24,
            },
        };
        let (t1_secs, t2_secs) = if lease_secs == INFINITE {
            (INFINITE, INFINITE)
        } else {
            // RFC 2131 section 4.4.5 defaults: T1 = 0.5, T2 = 0.875 of the lease; server
            // values that are out of order are replaced by the defaults.
            let d1 = lease_secs / 2;
            let d2 = (u64::from(lease_secs) * 7 / 8) as u32;
            match (self.t1, self.t2) {
                (Some(t1), Some(t2)) if t1 <= t2 && t2 <= lease_secs => (t1, t2),
                (Some(t1), None) if t1 <= d2 => (t1, d2),
                (None, Some(t2)) if d1 <= t2 && t2 <= lease_secs => (d1, t2),
                _ => (d1, d2),
            }
        };
        Some(Lease {
            address: self.yiaddr,
            prefix_len,
            router: self.routers.first().copied(),
            dns: self.dns.clone(),
            server,
            lease_secs,
            t1_secs,
            t2_secs,
            acquired: sent,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::wire::{offset, Message, COOKIE, HEADER_LEN, MIN_MESSAGE_LEN};
    use super::*;

    const MAC: [u8; 6] = [0x02, 0x16, 0x3e, 0x00, 0x00, 0x01];
    const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 120);
    const T0: Instant = Instant::from_secs(100);

    fn cfg(seed: u64) -> DhcpConfig {
        DhcpConfig::new(MAC, seed)
    }

    /// The messages sent, parsed back: (src, dst, message).
    fn sent(out: &[DhcpEffect]) -> Vec<(Ipv4Addr, Ipv4Addr, Repr)> {
        out.iter()
            .filter_map(|e| match e {
                DhcpEffect::Send { src, dst, payload } => Some((
                    *src,
                    *dst,
                    Repr::parse(payload).expect("we send what we parse"),
                )),
                _ => None,
            })
            .collect()
    }

    fn one_sent(out: &mut Vec<DhcpEffect>) -> (Ipv4Addr, Ipv4Addr, Repr) {
        let mut s = sent(out);
        assert_eq!(s.len(), 1, "one message sent: {out:?}");
        assert!(
            out.iter().all(|e| matches!(e, DhcpEffect::Send { .. })),
            "{out:?}"
        );
        out.clear();
        s.remove(0)
    }

    fn kind(m: &Repr) -> MessageType {
        m.message_type().expect("type")
    }

    /// A server's reply to `req`, as dnsmasq would write it.
    fn reply(req: &Repr, kind: MessageType, yiaddr: Ipv4Addr, lease: u32) -> Vec<u8> {
        let mut m = Repr::new(BOOTREPLY, req.xid, req.chaddr);
        m.yiaddr = yiaddr;
        m.flags = req.flags;
        m.push(opt::MESSAGE_TYPE, &[kind.code()]);
        m.push(opt::SERVER_ID, &SERVER.octets());
        if kind != MessageType::Nak {
            m.push(opt::LEASE_TIME, &lease.to_be_bytes());
            m.push(opt::SUBNET_MASK, &[255, 255, 255, 0]);
            m.push(opt::ROUTER, &SERVER.octets());
            m.push(opt::DNS, &[198, 18, 0, 53, 198, 18, 0, 54]);
        }
        m.emit()
    }

    /// Runs DISCOVER, OFFER, REQUEST, ACK; returns the client and its lease.
    fn bound(seed: u64, lease: u32) -> (DhcpClient, Lease) {
        let mut c = DhcpClient::new(cfg(seed), T0);
        let mut out = Vec::new();
        assert_eq!(c.next_deadline(), Some(T0));
        c.poll(T0, &mut out);
        let (_, _, d) = one_sent(&mut out);
        assert_eq!(kind(&d), MessageType::Discover);
        let t = T0 + Duration::from_millis(20);
        c.handle(t, &reply(&d, MessageType::Offer, ADDR, lease), &mut out);
        let (_, _, r) = one_sent(&mut out);
        assert_eq!(c.state(), DhcpState::Requesting);
        c.handle(t, &reply(&r, MessageType::Ack, ADDR, lease), &mut out);
        let [DhcpEffect::Bound(l)] = out.as_slice() else {
            panic!("bound: {out:?}")
        };
        (c, l.clone())
    }

    #[test]
    fn discover_bytes_sit_where_rfc_2131_figure_1_puts_them() {
        let mut c = DhcpClient::new(cfg(1), T0);
        let mut out = Vec::new();
        c.poll(T0, &mut out);
        let [DhcpEffect::Send {
            src,
            dst,
            payload: b,
        }] = out.as_slice()
        else {
            panic!("{out:?}")
        };
        assert_eq!((*src, *dst), (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST));
        assert_eq!(b.len(), MIN_MESSAGE_LEN);
        assert_eq!(HEADER_LEN, 236);
        assert_eq!(b[0], 1, "op BOOTREQUEST");
        assert_eq!(b[1], 1, "htype Ethernet");
        assert_eq!(b[2], 6, "hlen");
        assert_eq!(b[3], 0, "hops");
        let xid = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
        assert_eq!(Message::new_checked(b).expect("valid").xid(), xid);
        assert_eq!(&b[8..10], &[0, 0], "secs 0 on the first send");
        assert_eq!(&b[10..12], &[0x80, 0x00], "the BROADCAST flag");
        assert_eq!(
            &b[12..28],
            &[0; 16],
            "ciaddr, yiaddr, siaddr, giaddr all zero"
        );
        assert_eq!(&b[28..34], &MAC, "chaddr");
        assert_eq!(&b[34..44], &[0; 10], "chaddr padding");
        assert!(b[44..236].iter().all(|&x| x == 0), "sname and file empty");
        assert_eq!(&b[236..240], &[99, 130, 83, 99], "magic cookie");
        assert_eq!(&b[240..243], &[53, 1, 1], "DHCPDISCOVER first");
        assert_eq!(
            &b[243..252],
            &[61, 7, 1, 2, 0x16, 0x3e, 0, 0, 1],
            "client id"
        );
        assert_eq!(&b[252..260], &[55, 6, 1, 3, 6, 51, 58, 59], "parameters");
        assert_eq!(b[260], 255, "end");
        assert!(b[261..].iter().all(|&x| x == 0), "pad");
    }

    #[test]
    fn a_hand_written_offer_is_read_and_answered() {
        let mut c = DhcpClient::new(cfg(2), T0);
        let mut out = Vec::new();
        c.poll(T0, &mut out);
        let (_, _, d) = one_sent(&mut out);
        // An OFFER byte by byte (RFC 2131 figure 1), pads between options.
        let mut b = vec![0u8; 240];
        b[0] = 2;
        b[1] = 1;
        b[2] = 6;
        b[4..8].copy_from_slice(&d.xid.to_be_bytes());
        b[16..20].copy_from_slice(&[198, 18, 0, 120]);
        b[20..24].copy_from_slice(&[198, 18, 0, 1]);
        b[28..34].copy_from_slice(&MAC);
        b[236..240].copy_from_slice(&COOKIE);
        b.extend_from_slice(&[
            53, 1, 2, 0, 0, 54, 4, 198, 18, 0, 1, 51, 4, 0, 0, 0x0e, 0x10,
        ]);
        b.extend_from_slice(&[1, 4, 255, 255, 255, 0, 255, 0, 0, 0]);
        let m = Message::new_checked(&b).expect("valid");
        assert_eq!((m.op(), m.htype(), m.hlen(), m.hops()), (2, 1, 6, 0));
        assert_eq!(m.yiaddr(), ADDR);
        assert_eq!(m.siaddr(), SERVER);
        assert_eq!(m.giaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(m.option(opt::LEASE_TIME), Some(vec![0, 0, 0x0e, 0x10]));
        assert_eq!(m.option(opt::OVERLOAD), None);
        c.handle(T0, &b, &mut out);
        let (src, dst, r) = one_sent(&mut out);
        assert_eq!((src, dst), (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST));
        // RFC 2131 table 5, SELECTING: the offer's xid, ciaddr 0, options 50 and 54.
        assert_eq!(kind(&r), MessageType::Request);
        assert_eq!(r.xid, d.xid);
        assert_eq!(r.ciaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(r.option(opt::REQUESTED_ADDRESS), Some(&ADDR.octets()[..]));
        assert_eq!(r.option(opt::SERVER_ID), Some(&SERVER.octets()[..]));
        assert_eq!(r.flags, FLAG_BROADCAST);
    }

    #[test]
    fn messages_round_trip_and_long_options_are_split() {
        let mut m = Repr::new(BOOTREPLY, 0xdead_beef, MAC);
        m.secs = 7;
        m.flags = FLAG_BROADCAST;
        m.ciaddr = Ipv4Addr::new(1, 2, 3, 4);
        m.yiaddr = ADDR;
        m.siaddr = SERVER;
        m.giaddr = Ipv4Addr::new(10, 0, 0, 1);
        m.push(opt::MESSAGE_TYPE, &[5]);
        m.push(opt::DNS, &[9u8; 400]);
        m.push(opt::HOST_NAME, b"h");
        m.push(200, &[]);
        let b = m.emit();
        // 400 bytes of option 6 go out as 255 + 145 (RFC 3396).
        assert_eq!(&b[243..245], &[6, 255]);
        assert_eq!(&b[500..502], &[6, 145]);
        assert_eq!(Repr::parse(&b), Ok(m.clone()));
        let v = Message::new_checked(&b).expect("valid");
        assert_eq!(v.option(opt::DNS).map(|d| d.len()), Some(400));
        assert_eq!(v.option(200), Some(vec![]));
        assert_eq!(v.options().count(), 5);
        // The client's own messages parse back to what it meant.
        let (_, l) = bound(3, 3600);
        assert_eq!(l.prefix_len, 24);
    }

    #[test]
    fn masks_and_option_values_are_checked() {
        assert_eq!(
            wire::prefix_of_mask(Ipv4Addr::new(255, 255, 255, 0)),
            Ok(24)
        );
        assert_eq!(
            wire::prefix_of_mask(Ipv4Addr::new(255, 255, 255, 255)),
            Ok(32)
        );
        assert_eq!(wire::prefix_of_mask(Ipv4Addr::UNSPECIFIED), Ok(0));
        assert_eq!(
            wire::prefix_of_mask(Ipv4Addr::new(255, 0, 255, 0)),
            Err(WireError::BadSubnetMask(Ipv4Addr::new(255, 0, 255, 0)))
        );
        assert!(wire::addrs_option(6, &[1, 2, 3]).is_err());
        assert!(wire::addrs_option(6, &[]).is_err());
        assert!(wire::u32_option(51, &[0; 5]).is_err());
        assert_eq!(
            WireError::BadCookie([1, 2, 3, 4]).to_string(),
            "DHCP magic cookie is 1.2.3.4, not 99.130.83.99"
        );
        assert_eq!(
            WireError::OptionOverrun { code: 51, at: 250 }.to_string(),
            "DHCP option 51 at byte 250 runs past the end of the message"
        );
    }

    #[test]
    fn the_whole_life_of_a_lease() {
        let (mut c, l) = bound(4, 3600);
        let ack_at = T0 + Duration::from_millis(20);
        assert_eq!(l.address, ADDR);
        assert_eq!(l.prefix_len, 24);
        assert_eq!(l.router, Some(SERVER));
        assert_eq!(
            l.dns,
            vec![Ipv4Addr::new(198, 18, 0, 53), Ipv4Addr::new(198, 18, 0, 54)]
        );
        assert_eq!(l.server, SERVER);
        assert_eq!((l.lease_secs, l.t1_secs, l.t2_secs), (3600, 1800, 3150));
        // The lease runs from the REQUEST's sending (the OFFER came at T0 + 20 ms).
        assert_eq!(l.acquired, ack_at);
        assert_eq!(c.state(), DhcpState::Bound);
        let t1 = l.acquired + Duration::from_secs(1800);
        let t2 = l.acquired + Duration::from_secs(3150);
        assert_eq!(c.next_deadline(), Some(t1));
        let mut out = Vec::new();
        c.poll(Instant::from_nanos(t1.as_nanos() - 1), &mut out);
        assert!(out.is_empty());

        // T1: unicast from the address to the server, ciaddr set, no 50/54 (RFC 2131 4.3.2).
        c.poll(t1, &mut out);
        let (src, dst, r) = one_sent(&mut out);
        assert_eq!((src, dst), (ADDR, SERVER));
        assert_eq!(c.state(), DhcpState::Renewing);
        assert_eq!(kind(&r), MessageType::Request);
        assert_eq!(r.ciaddr, ADDR);
        assert_eq!(r.flags, 0);
        assert!(r.option(opt::REQUESTED_ADDRESS).is_none());
        assert!(r.option(opt::SERVER_ID).is_none());
        // Unanswered: again half way to T2 (675 s), then at least 60 s later, then T2.
        assert_eq!(c.next_deadline(), Some(t1 + Duration::from_secs(675)));
        let mut t = t1;
        let mut waits = Vec::new();
        while let Some(next) = c.next_deadline().filter(|&n| n < t2) {
            waits.push(next.saturating_duration_since(t).as_secs());
            t = next;
            c.poll(t, &mut out);
            let (src, dst, again) = one_sent(&mut out);
            assert_eq!((src, dst, again.xid), (ADDR, SERVER, r.xid));
        }
        assert_eq!(waits, vec![675, 337, 168, 84, 60]);
        assert_eq!(c.next_deadline(), Some(t2));

        // T2: broadcast, still from the address (RFC 2131 4.4.5).
        c.poll(t2, &mut out);
        let (src, dst, rb) = one_sent(&mut out);
        assert_eq!((src, dst), (ADDR, Ipv4Addr::BROADCAST));
        assert_eq!(c.state(), DhcpState::Rebinding);
        assert_ne!(rb.xid, r.xid, "a new exchange, a new xid");
        assert_eq!(rb.ciaddr, ADDR);
        // A late answer to the renewal is not this exchange's.
        c.handle(t2, &reply(&r, MessageType::Ack, ADDR, 3600), &mut out);
        assert!(out.is_empty());
        // The rebinding ACK gives a new lease, counted from the rebinding REQUEST.
        let t = t2 + Duration::from_secs(1);
        c.handle(t, &reply(&rb, MessageType::Ack, ADDR, 600), &mut out);
        let [DhcpEffect::Bound(l2)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!((l2.acquired, l2.lease_secs), (t2, 600));
        let expiry = t2 + Duration::from_secs(600);
        out.clear();

        // Nobody answers again: renew, rebind, then at expiry Unbound and a new DISCOVER.
        let mut kinds = Vec::new();
        while let Some(next) = c.next_deadline().filter(|&n| n < expiry) {
            c.poll(next, &mut out);
            kinds.extend(sent(&out).into_iter().map(|(_, d, _)| d));
            out.clear();
        }
        assert_eq!(kinds.first(), Some(&SERVER));
        assert_eq!(kinds.last(), Some(&Ipv4Addr::BROADCAST));
        assert_eq!(c.next_deadline(), Some(expiry));
        c.poll(expiry, &mut out);
        assert_eq!(out[0], DhcpEffect::Unbound);
        let s = sent(&out);
        assert_eq!(s.len(), 1);
        assert_eq!(kind(&s[0].2), MessageType::Discover);
        assert_eq!(c.state(), DhcpState::Selecting);
        assert_eq!(c.lease(), None);
    }

    #[test]
    fn server_timers_are_used_and_an_infinite_lease_never_renews() {
        let mut c = DhcpClient::new(cfg(5), T0);
        let mut out = Vec::new();
        c.poll(T0, &mut out);
        let (_, _, d) = one_sent(&mut out);
        c.handle(T0, &reply(&d, MessageType::Offer, ADDR, INFINITE), &mut out);
        let (_, _, r) = one_sent(&mut out);
        c.handle(T0, &reply(&r, MessageType::Ack, ADDR, INFINITE), &mut out);
        let [DhcpEffect::Bound(l)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!((l.t1_secs, l.t2_secs), (INFINITE, INFINITE));
        assert_eq!(c.next_deadline(), None);
        out.clear();
        c.poll(Instant::from_nanos(u64::MAX), &mut out);
        assert!(out.is_empty());

        let mut c = DhcpClient::new(cfg(6), T0);
        c.poll(T0, &mut out);
        let (_, _, d) = one_sent(&mut out);
        c.handle(T0, &reply(&d, MessageType::Offer, ADDR, 1000), &mut out);
        let (_, _, r) = one_sent(&mut out);
        let mut ack = Repr::parse(&reply(&r, MessageType::Ack, ADDR, 1000)).expect("ok");
        ack.push(opt::RENEWAL_TIME, &100u32.to_be_bytes());
        ack.push(opt::REBINDING_TIME, &200u32.to_be_bytes());
        c.handle(T0, &ack.emit(), &mut out);
        let [DhcpEffect::Bound(l)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!((l.t1_secs, l.t2_secs), (100, 200));
        assert_eq!(c.next_deadline(), Some(T0 + Duration::from_secs(100)));
    }

    #[test]
    fn a_nak_ends_the_lease_and_starts_over() {
        let (mut c, l) = bound(7, 3600);
        let mut out = Vec::new();
        let t1 = l.t1().expect("finite");
        c.poll(t1, &mut out);
        let (_, _, r) = one_sent(&mut out);
        c.handle(
            t1,
            &reply(&r, MessageType::Nak, Ipv4Addr::UNSPECIFIED, 0),
            &mut out,
        );
        assert_eq!(out, vec![DhcpEffect::Unbound]);
        out.clear();
        assert_eq!(c.state(), DhcpState::Init);
        assert_eq!(c.lease(), None);
        assert_eq!(c.next_deadline(), Some(t1 + RESTART_DELAY));
        c.poll(t1 + RESTART_DELAY, &mut out);
        let (_, _, d) = one_sent(&mut out);
        assert_eq!(kind(&d), MessageType::Discover);
        assert_ne!(d.xid, r.xid);

        // A NAK to the SELECTING REQUEST: no lease to withdraw, start over.
        let mut c = DhcpClient::new(cfg(8), T0);
        c.poll(T0, &mut out);
        let (_, _, d) = one_sent(&mut out);
        c.handle(T0, &reply(&d, MessageType::Offer, ADDR, 60), &mut out);
        let (_, _, r) = one_sent(&mut out);
        c.handle(
            T0,
            &reply(&r, MessageType::Nak, Ipv4Addr::UNSPECIFIED, 0),
            &mut out,
        );
        assert!(out.is_empty());
        assert_eq!(c.state(), DhcpState::Init);
    }

    #[test]
    fn a_link_flap_checks_the_lease_with_init_reboot() {
        let (mut c, l) = bound(9, 3600);
        let mut out = Vec::new();
        let t = T0 + Duration::from_secs(10);
        c.link_down(t);
        assert_eq!(c.state(), DhcpState::InitReboot);
        assert_eq!(
            c.lease(),
            Some(&l),
            "the lease is kept while the link is down"
        );
        assert_eq!(c.next_deadline(), l.expires());
        c.poll(t + Duration::from_secs(100), &mut out);
        assert!(out.is_empty(), "nothing is sent with the link down");
        let t = t + Duration::from_secs(200);
        c.link_up(t, &mut out);
        let (src, dst, r) = one_sent(&mut out);
        // RFC 2131 table 5, INIT-REBOOT: option 50, no 54, ciaddr 0, broadcast.
        assert_eq!((src, dst), (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST));
        assert_eq!(c.state(), DhcpState::Rebooting);
        assert_eq!(kind(&r), MessageType::Request);
        assert_eq!(r.option(opt::REQUESTED_ADDRESS), Some(&ADDR.octets()[..]));
        assert!(r.option(opt::SERVER_ID).is_none());
        assert_eq!(r.ciaddr, Ipv4Addr::UNSPECIFIED);
        // The network moved on: the server gives another address.
        let other = Ipv4Addr::new(198, 18, 0, 130);
        c.handle(t, &reply(&r, MessageType::Ack, other, 3600), &mut out);
        let [DhcpEffect::Bound(l2)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!((l2.address, l2.acquired), (other, t));
        out.clear();

        // Another flap onto a network that says no: Unbound, INIT.
        c.link_down(t);
        c.link_up(t, &mut out);
        let (_, _, r) = one_sent(&mut out);
        c.handle(
            t,
            &reply(&r, MessageType::Nak, Ipv4Addr::UNSPECIFIED, 0),
            &mut out,
        );
        assert_eq!(out, vec![DhcpEffect::Unbound]);
        assert_eq!(c.state(), DhcpState::Init);
        out.clear();

        // A flap onto a silent network: after the tries the unexpired lease is kept.
        let (mut c, l) = bound(10, 3600);
        c.link_down(T0);
        c.link_up(T0, &mut out);
        out.clear();
        while c.state() == DhcpState::Rebooting {
            let next = c.next_deadline().expect("retransmission");
            c.poll(next, &mut out);
        }
        assert_eq!(sent(&out).len(), REQUEST_TRIES as usize - 1);
        assert_eq!(c.state(), DhcpState::Bound);
        assert_eq!(c.lease(), Some(&l));

        // Down past the expiry: Unbound when it comes back, and a DISCOVER.
        let (mut c, l) = bound(11, 60);
        out.clear();
        c.link_down(T0);
        c.link_up(l.expires().expect("finite"), &mut out);
        assert_eq!(out[0], DhcpEffect::Unbound);
        assert_eq!(kind(&sent(&out)[0].2), MessageType::Discover);
    }

    #[test]
    fn with_previous_asks_for_the_old_address_first() {
        let mut c = DhcpClient::with_previous(cfg(12), ADDR, T0);
        assert_eq!(c.state(), DhcpState::InitReboot);
        let mut out = Vec::new();
        c.poll(T0, &mut out);
        let (src, dst, r) = one_sent(&mut out);
        assert_eq!((src, dst), (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST));
        assert_eq!(r.option(opt::REQUESTED_ADDRESS), Some(&ADDR.octets()[..]));
        assert!(r.option(opt::SERVER_ID).is_none());
        // Silence: after the tries, INIT (no lease to fall back on).
        while c.state() == DhcpState::Rebooting {
            let next = c.next_deadline().expect("retransmission");
            c.poll(next, &mut out);
        }
        assert_eq!(c.state(), DhcpState::Selecting);
        let s = sent(&out);
        assert_eq!(s.len(), REQUEST_TRIES as usize);
        assert_eq!(
            kind(&s[REQUEST_TRIES as usize - 1].2),
            MessageType::Discover
        );
    }

    #[test]
    fn release_is_unicast_to_the_server_and_ends_everything() {
        let (mut c, l) = bound(13, 3600);
        let mut out = Vec::new();
        c.release(&mut out);
        assert_eq!(out.last(), Some(&DhcpEffect::Unbound));
        let s = sent(&out);
        let (src, dst, m) = &s[0];
        assert_eq!((*src, *dst), (l.address, l.server));
        assert_eq!(kind(m), MessageType::Release);
        assert_eq!(m.ciaddr, ADDR);
        assert_eq!(m.option(opt::SERVER_ID), Some(&SERVER.octets()[..]));
        assert_eq!(c.state(), DhcpState::Released);
        assert_eq!(c.next_deadline(), None);
        out.clear();
        c.poll(Instant::from_secs(1 << 30), &mut out);
        c.link_up(T0, &mut out);
        assert!(out.is_empty());
    }

    /// The gaps between successive sends of one message, in ms.
    fn gaps(c: &mut DhcpClient, n: usize) -> Vec<u64> {
        let mut out = Vec::new();
        let mut last = None;
        let mut gaps = Vec::new();
        while gaps.len() < n {
            let t = c.next_deadline().expect("deadline");
            c.poll(t, &mut out);
            assert_eq!(sent(&out).len(), 1);
            out.clear();
            if let Some(l) = last {
                gaps.push(t.saturating_duration_since(l).as_millis() as u64);
            }
            last = Some(t);
        }
        gaps
    }

    #[test]
    fn retransmissions_back_off_within_rfc_2131_bounds() {
        for seed in 0..50 {
            let mut c = DhcpClient::new(cfg(seed), T0);
            let g = gaps(&mut c, 7);
            for (gap, base) in g.iter().zip([4u64, 8, 16, 32, 64, 64, 64]) {
                assert!(
                    (base * 1000 - 1000..=base * 1000 + 1000).contains(gap),
                    "seed {seed}: {g:?}"
                );
            }
        }
        // Randomized: two seeds do not wait alike.
        let a = gaps(&mut DhcpClient::new(cfg(1), T0), 3);
        let b = gaps(&mut DhcpClient::new(cfg(2), T0), 3);
        assert_ne!(a, b);
        // Deterministic: the same seed does.
        assert_eq!(a, gaps(&mut DhcpClient::new(cfg(1), T0), 3));

        // Unanswered REQUESTs: REQUEST_TRIES sends, then a new DISCOVER with a new xid.
        let mut c = DhcpClient::new(cfg(14), T0);
        let mut out = Vec::new();
        c.poll(T0, &mut out);
        let (_, _, d) = one_sent(&mut out);
        c.handle(T0, &reply(&d, MessageType::Offer, ADDR, 60), &mut out);
        out.clear();
        while c.state() == DhcpState::Requesting {
            let t = c.next_deadline().expect("deadline");
            c.poll(t, &mut out);
        }
        let s = sent(&out);
        assert_eq!(s.len(), REQUEST_TRIES as usize);
        assert!(s[..3]
            .iter()
            .all(|(_, _, m)| kind(m) == MessageType::Request));
        assert_eq!(kind(&s[3].2), MessageType::Discover);
        assert_ne!(s[3].2.xid, d.xid);
        // secs counts from the exchange's start: the third REQUEST goes 4 + 8 s (±2) in.
        assert!((11..=13).contains(&s[1].2.secs), "{}", s[1].2.secs);
    }

    #[test]
    fn no_host_name_unless_configured() {
        let mut out = Vec::new();
        let mut c = DhcpClient::new(cfg(15), T0);
        c.poll(T0, &mut out);
        assert!(sent(&out)[0].2.option(opt::HOST_NAME).is_none());
        out.clear();
        let mut named = cfg(15);
        named.hostname = Some("sys-net".into());
        let mut c = DhcpClient::new(named, T0);
        c.poll(T0, &mut out);
        assert_eq!(
            sent(&out)[0].2.option(opt::HOST_NAME),
            Some(&b"sys-net"[..])
        );
        assert_eq!(
            sent(&out)[0].2.option(opt::CLIENT_ID),
            Some(&[1, 2, 0x16, 0x3e, 0, 0, 1][..])
        );
    }

    #[test]
    fn offers_of_unusable_addresses_are_ignored() {
        for bad in [
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "127.0.0.1",
            "240.0.0.1",
        ] {
            let mut c = DhcpClient::new(cfg(16), T0);
            let mut out = Vec::new();
            c.poll(T0, &mut out);
            let (_, _, d) = one_sent(&mut out);
            let a: Ipv4Addr = bad.parse().expect("ip");
            c.handle(T0, &reply(&d, MessageType::Offer, a, 60), &mut out);
            assert!(out.is_empty(), "{bad}");
            assert_eq!(c.state(), DhcpState::Selecting);
        }
    }

    #[test]
    fn malformed_or_foreign_replies_change_nothing() {
        let mut c = DhcpClient::new(cfg(17), T0);
        let mut out = Vec::new();
        c.poll(T0, &mut out);
        let (_, _, d) = one_sent(&mut out);
        let good = reply(&d, MessageType::Offer, ADDR, 60);
        let mut bad: Vec<(&str, Vec<u8>)> = Vec::new();
        bad.push(("empty", vec![]));
        bad.push(("truncated header", good[..100].to_vec()));
        bad.push(("no cookie", good[..HEADER_LEN].to_vec()));
        let mut b = good.clone();
        b[offset::COOKIE] = 98;
        bad.push(("bad cookie", b));
        // Cut inside option 53's value, then just after a code byte.
        bad.push(("option past the end", good[..offset::OPTIONS + 2].to_vec()));
        bad.push(("length byte missing", good[..offset::OPTIONS + 1].to_vec()));
        let mut b = good[..offset::OPTIONS].to_vec();
        b.extend_from_slice(&[53, 1, 2]);
        bad.push(("no end option", b));
        let mut b = good[..offset::OPTIONS].to_vec();
        b.extend_from_slice(&[53, 1, 2, 54, 200, 1, 2, 3, 4, 255]);
        bad.push(("length beyond the end", b));
        let mut b = good.clone();
        b[offset::XID] ^= 1;
        bad.push(("wrong xid", b));
        let mut b = good.clone();
        b[offset::CHADDR + 5] ^= 1;
        bad.push(("wrong chaddr", b));
        let mut b = good.clone();
        b[offset::OP] = BOOTREQUEST;
        bad.push(("a request", b));
        let mut b = good.clone();
        b[offset::HLEN] = 16;
        bad.push(("other hardware", b));
        let mut r = Repr::parse(&good).expect("ok");
        r.options.retain(|(c, _)| *c != opt::SERVER_ID);
        bad.push(("offer without a server id", r.emit()));
        let mut r = Repr::parse(&good).expect("ok");
        r.options.retain(|(c, _)| *c != opt::MESSAGE_TYPE);
        bad.push(("no message type", r.emit()));
        let mut r = Repr::parse(&good).expect("ok");
        r.options[0].1 = vec![42];
        bad.push(("unknown message type", r.emit()));
        let mut r = Repr::parse(&good).expect("ok");
        r.push(opt::ROUTER, &[1, 2, 3]);
        bad.push(("router of 3 bytes", r.emit()));
        for (why, b) in &bad {
            c.handle(T0, b, &mut out);
            assert!(out.is_empty(), "{why}: {out:?}");
            assert_eq!(c.state(), DhcpState::Selecting, "{why}");
        }
        assert!(matches!(
            Message::new_checked(&bad[1].1),
            Err(WireError::Truncated { len: 100 })
        ));
        assert_eq!(
            Message::new_checked(&bad[3].1).err(),
            Some(WireError::BadCookie([98, 130, 83, 99]))
        );
        assert_eq!(
            Message::new_checked(&bad[7].1).err(),
            Some(WireError::OptionOverrun { code: 54, at: 243 })
        );
        assert_eq!(
            Message::new_checked(&bad[6].1).err(),
            Some(WireError::NoEnd)
        );
        // An overloaded message (option 52) is read for its options field alone.
        let mut r = Repr::parse(&good).expect("ok");
        r.push(opt::OVERLOAD, &[3]);
        c.handle(T0, &r.emit(), &mut out);
        assert_eq!(c.state(), DhcpState::Requesting);
        // An ACK with a broken mask, or no lease time, is no lease.
        let (_, _, req) = one_sent(&mut out);
        let mut r = Repr::parse(&reply(&req, MessageType::Ack, ADDR, 60)).expect("ok");
        for (c2, v) in r.options.iter_mut() {
            if *c2 == opt::SUBNET_MASK {
                *v = vec![255, 0, 255, 0];
            }
        }
        c.handle(T0, &r.emit(), &mut out);
        r.options
            .retain(|(c, _)| *c != opt::LEASE_TIME && *c != opt::SUBNET_MASK);
        c.handle(T0, &r.emit(), &mut out);
        assert!(out.is_empty());
        assert_eq!(c.state(), DhcpState::Requesting);
    }

    /// A tiny PRNG for the fuzz loops (splitmix64).
    fn fuzz_rng(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    #[test]
    fn random_and_mutated_bytes_never_panic() {
        let mut rng = 99u64;
        let mut c = DhcpClient::new(cfg(18), T0);
        let mut out = Vec::new();
        c.poll(T0, &mut out);
        let (_, _, d) = one_sent(&mut out);
        let good = reply(&d, MessageType::Offer, ADDR, 60);
        for i in 0..20_000 {
            let b: Vec<u8> = if i % 2 == 0 {
                let n = (fuzz_rng(&mut rng) % 600) as usize;
                let mut b: Vec<u8> = (0..n).map(|_| fuzz_rng(&mut rng) as u8).collect();
                // Often keep a valid cookie so the option walk is what gets exercised.
                if n >= offset::OPTIONS && i % 4 == 0 {
                    b[offset::COOKIE..offset::OPTIONS].copy_from_slice(&COOKIE);
                }
                b
            } else {
                let mut b = good.clone();
                for _ in 0..1 + fuzz_rng(&mut rng) % 4 {
                    let at = (fuzz_rng(&mut rng) as usize) % b.len();
                    if at >= offset::OPTIONS {
                        b[at] = fuzz_rng(&mut rng) as u8;
                    }
                }
                let cut = offset::OPTIONS + (fuzz_rng(&mut rng) as usize) % 80;
                b.truncate(cut.max(b.len() - (fuzz_rng(&mut rng) as usize % 3) * 40));
                b
            };
            let _ = Message::new_checked(&b).map(|m| m.options().count());
            let _ = Repr::parse(&b);
            let mut probe = DhcpClient::new(cfg(18), T0);
            probe.poll(T0, &mut out);
            out.clear();
            probe.handle(T0, &b, &mut out);
            // Whatever happened, it is one of the legal outcomes.
            assert!(out.len() <= 1, "{out:?}");
            out.clear();
        }
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_or_fail_cleanly(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..700)) {
            if let Ok(m) = Message::new_checked(&bytes) {
                let r = Repr::parse(&bytes).expect("a checked message parses");
                proptest::prop_assert_eq!(r.xid, m.xid());
            }
            let mut c = DhcpClient::new(cfg(19), T0);
            let mut out = Vec::new();
            c.poll(T0, &mut out);
            c.handle(T0, &bytes, &mut out);
        }
    }
}
