//! The pcap corpus over Xen netif rings: every scenario of `tests/pcap/` gives the same output
//! when each of its frames travels over the shared-memory rings of the emulated hypervisor,
//! between real processes, as when it is handed to the engine directly.
//!
//! # What runs where
//!
//! * This process is the firewall qube (dom 1). It runs the emulated hypervisor's broker
//!   ([`Hypervisor::serve`], one per scenario, its socket in a temporary directory), the
//!   replay engine ([`Replayer`]), and one ring end per engine interface: a [`Netback`] for each
//!   client vif (the client's `eth0` is a netfront) and a [`Netfront`] for the uplink (the
//!   netvm's `vif1.0` is a netback).
//! * Each peer is a process of its own, this test binary run again with [`PEER_ENV`] naming the
//!   control socket (the test [`ring_peer`] returns at once without it). A peer is told which
//!   domain to be and which end to run: a client vif `vifN.M` is domain N running a
//!   [`Netfront`] toward dom 1; the uplink's peer is the netvm, domain [`NETVM_DOM`], running a
//!   [`Netback`] on the rings dom 1 granted. The ring references and the event channel port go
//!   over the control socket, standing in for XenStore. Peer processes are kept from one
//!   scenario to the next (each scenario attaches them to its own broker afresh); a scenario with
//!   two clients has two client processes and the netvm's.
//!
//! # What each scenario checks
//!
//! For each input packet, in the order [`sys_firewall::replay::replay_capture`] works: the steps
//! due before it, then the peer owning the packet's interface sends the frame over its ring; this
//! process takes it off the ring (`poll_tx` on a vif, `recv` on the uplink), checks the bytes are
//! the capture's and the metadata plain, and hands the bytes *from the ring* to the engine. Every
//! frame the engine emits (in steps, for packets, and at the end) is sent over the ring of the
//! interface it leaves by, and the peer reports what arrived. At the end:
//!
//! * the replay's output capture equals the scenario's stored `out.pcapng` byte for byte, and
//! * per interface, the frames the peer received, in order, are the frames the engine emitted
//!   there (bytes, with plain metadata), and nothing else.
//!
//! # Limits
//!
//! * No xenbus handshake: features are [`Features::ALL`] on both ends, as a current Linux pair
//!   negotiates, and the ring keys are passed directly. The handshake is tested in
//!   `vif-backend` (`xen::xenbus`).
//! * A frame shorter than an Ethernet header (14 bytes) cannot be described on a netif ring
//!   (netfront and netback refuse it, as netif.h's peers do). Scenario
//!   `61-malformed-truncated-ethernet` has such input frames: the peer's ring end refuses them
//!   (checked), and they are given to the engine directly, so the scenario still replays to its
//!   stored output; its other frames go over the rings. No other frame is bypassed (counted and
//!   checked).
//! * Frames carry no offload (every corpus frame is complete, its checksums filled in), so GSO
//!   and checksum offload over the rings are not exercised here (`xen::netif_tests` does).
//! * A vif a step brings or removes has its ring from the start of the scenario (its peer is
//!   attached at the start), as a qube's device would be connected before its first frame.
//! * In the sys-net scenarios (the firewall's role played by the netvm) the uplink is really a
//!   physical device; its frames go over a netif ring here all the same.
//! * Every scenario is run, whatever its number of client vifs (at most 3 in the corpus).

mod corpus;

use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sys_firewall::replay::{read_capture, ReplayConfig, Replayer};
use vif_backend::xen::emul::{Domain, EmulEvents, EmulGrants, Hypervisor};
use vif_backend::xen::netback::Netback;
use vif_backend::xen::netfront::Netfront;
use vif_backend::xen::netif::{Features, GsoInfo, GsoType, PacketMeta, ETH_HLEN};
use vif_backend::xen::{DomId, EventChannels, GrantRef, Port};

type Front = Netfront<EmulGrants, EmulEvents>;
type Back = Netback<EmulGrants, EmulEvents>;

/// The environment variable that makes [`ring_peer`] a peer: the control socket's path.
const PEER_ENV: &str = "SYS_FIREWALL_RING_PEER_CTL";
/// The name of the test a peer process runs.
const PEER_TEST: &str = "ring_peer";
/// The firewall qube's domain.
const FW_DOM: DomId = 1;
/// The netvm's domain (the uplink's back end).
const NETVM_DOM: DomId = 2;
/// The longest wait for a frame, an answer or a process.
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// The control protocol: length-prefixed messages, a tag byte and fields.

mod wire {
    use super::*;

    pub fn write_msg(s: &mut UnixStream, m: &[u8]) -> io::Result<()> {
        let len = u32::try_from(m.len()).map_err(io::Error::other)?;
        s.write_all(&len.to_le_bytes())?;
        s.write_all(m)
    }

    /// `None` at end of file (the other side is gone).
    pub fn read_msg(s: &mut UnixStream) -> io::Result<Option<Vec<u8>>> {
        let mut len = [0u8; 4];
        match s.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let mut m = vec![0u8; u32::from_le_bytes(len) as usize];
        s.read_exact(&mut m)?;
        Ok(Some(m))
    }

    #[derive(Debug, Default)]
    pub struct Enc(pub Vec<u8>);

    impl Enc {
        pub fn tag(t: u8) -> Self {
            Enc(vec![t])
        }
        pub fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        pub fn bytes(mut self, b: &[u8]) -> Self {
            self = self.u32(b.len() as u32);
            self.0.extend_from_slice(b);
            self
        }
        pub fn str(self, s: &str) -> Self {
            self.bytes(s.as_bytes())
        }
        pub fn meta(self, m: &PacketMeta) -> Self {
            let flags = u32::from(m.csum_blank) | u32::from(m.data_validated) << 1;
            let (ty, mss) = match m.gso {
                None => (0, 0),
                Some(GsoInfo {
                    ty: GsoType::TcpV4,
                    mss,
                }) => (1, mss),
                Some(GsoInfo {
                    ty: GsoType::TcpV6,
                    mss,
                }) => (2, mss),
            };
            self.u32(flags).u32(ty).u32(u32::from(mss))
        }
    }

    #[derive(Debug)]
    pub struct Dec<'a> {
        b: &'a [u8],
        at: usize,
    }

    impl<'a> Dec<'a> {
        pub fn new(b: &'a [u8]) -> Self {
            Dec { b, at: 0 }
        }
        pub fn tag(&mut self) -> Result<u8, String> {
            let t = *self.b.get(self.at).ok_or("empty message")?;
            self.at += 1;
            Ok(t)
        }
        pub fn u32(&mut self) -> Result<u32, String> {
            let s = self
                .b
                .get(self.at..self.at + 4)
                .ok_or("message too short")?;
            self.at += 4;
            Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        }
        pub fn bytes(&mut self) -> Result<&'a [u8], String> {
            let n = self.u32()? as usize;
            let s = self
                .b
                .get(self.at..self.at + n)
                .ok_or("message too short")?;
            self.at += n;
            Ok(s)
        }
        pub fn str(&mut self) -> Result<String, String> {
            Ok(String::from_utf8_lossy(self.bytes()?).into_owned())
        }
        pub fn meta(&mut self) -> Result<PacketMeta, String> {
            let flags = self.u32()?;
            let ty = self.u32()?;
            let mss = self.u32()? as u16;
            let gso = match ty {
                0 => None,
                1 => Some(GsoInfo {
                    ty: GsoType::TcpV4,
                    mss,
                }),
                2 => Some(GsoInfo {
                    ty: GsoType::TcpV6,
                    mss,
                }),
                t => return Err(format!("GSO type {t}")),
            };
            Ok(PacketMeta {
                csum_blank: flags & 1 != 0,
                data_validated: flags & 2 != 0,
                gso,
            })
        }
    }
}

use wire::{Dec, Enc};

/// Requests, parent to peer.
mod req {
    /// broker path, domid, backend domid: run a netfront; answered with [`super::rep::REFS`].
    pub const ATTACH_FRONT: u8 = 1;
    /// broker path, domid, frontend domid, tx-ring-ref, rx-ring-ref, event-channel: run a
    /// netback.
    pub const ATTACH_BACK: u8 = 2;
    /// frame: send it over the ring; answered with [`super::rep::SENT`].
    pub const SEND: u8 = 3;
    /// count: the frames received since the last drain, waiting until there are at least
    /// `count`; answered with [`super::rep::FRAMES`].
    pub const DRAIN: u8 = 4;
    /// Drop the ring end and the domain.
    pub const DETACH: u8 = 5;
}

/// Replies, peer to parent.
mod rep {
    pub const OK: u8 = 0;
    /// message
    pub const ERR: u8 = 1;
    /// tx-ring-ref, rx-ring-ref, event-channel
    pub const REFS: u8 = 2;
    /// refused (1: the ring end refused the frame, it was not sent)
    pub const SENT: u8 = 3;
    /// count, then per frame: bytes, meta
    pub const FRAMES: u8 = 4;
}

// ---------------------------------------------------------------------------------------------
// Both sides: a ring end and how to wait on it.

enum End {
    Front(Box<Front>),
    Back(Box<Back>),
}

impl End {
    fn raw_fd(&self) -> RawFd {
        match self {
            End::Front(f) => f.raw_fd(),
            End::Back(b) => b.raw_fd(),
        }
    }

    fn handle_event(&mut self) -> Result<(), String> {
        match self {
            End::Front(f) => f.handle_event(),
            End::Back(b) => b.handle_event(),
        }
        .map(|_| ())
        .map_err(|e| format!("event channel: {e}"))
    }

    /// Takes what arrived on the ring (TX requests on a netback, RX responses on a netfront).
    fn pump(&mut self, got: &mut Vec<(Vec<u8>, PacketMeta)>) -> Result<usize, String> {
        let mut sink = |f: &[u8], m: &PacketMeta| got.push((f.to_vec(), *m));
        match self {
            End::Front(f) => f.recv(&mut sink),
            End::Back(b) => b.poll_tx(&mut sink),
        }
        .map_err(|d| format!("disconnected: {}", d.reason()))
    }

    /// The frames refused so far when sending (not describable to the peer).
    fn refused(&self) -> u64 {
        match self {
            End::Front(f) => f.stats().tx_refused,
            End::Back(b) => b.stats().rx_refused,
        }
    }

    /// Sends one frame: `Ok(true)` if queued or refused (see [`End::refused`]), `Ok(false)`
    /// when the ring or the buffers are full now.
    fn try_send(&mut self, frame: &[u8]) -> Result<bool, String> {
        let meta = PacketMeta::default();
        match self {
            End::Front(f) => f.send(frame, &meta),
            End::Back(b) => b.send_rx(frame, &meta),
        }
        .map_err(|d| format!("disconnected: {}", d.reason()))
    }

    /// Waits a little for the peer's event, then takes it.
    fn wait(&mut self, ms: i32) -> Result<(), String> {
        let mut ready = Vec::new();
        vif_backend::sys::poll_readable(&[self.raw_fd()], ms, &mut ready)
            .map_err(|e| format!("poll: {e}"))?;
        self.handle_event()
    }

    /// Takes frames until there are at least `want` in `got` or [`WAIT`] passes, then once more
    /// (so that what was already there is not left behind).
    fn take_at_least(
        &mut self,
        want: usize,
        got: &mut Vec<(Vec<u8>, PacketMeta)>,
    ) -> Result<(), String> {
        let deadline = Instant::now() + WAIT;
        loop {
            self.pump(got)?;
            if got.len() >= want || Instant::now() > deadline {
                self.handle_event()?;
                self.pump(got)?;
                return Ok(());
            }
            self.wait(20)?;
        }
    }
}

fn features() -> Features {
    Features::ALL
}

// ---------------------------------------------------------------------------------------------
// The peer process.

/// A peer domain's process when [`PEER_ENV`] is set (this binary run again by the test); returns
/// at once otherwise.
#[test]
fn ring_peer() {
    let Some(ctl) = std::env::var_os(PEER_ENV) else {
        return;
    };
    let mut sock = UnixStream::connect(&ctl).expect("connect to the control socket");
    let mut peer = PeerState::default();
    // Until the parent closes the socket (it is done, or it died).
    while let Some(m) = wire::read_msg(&mut sock).expect("read a request") {
        let reply = match peer.handle(&m) {
            Ok(r) => r,
            Err(e) => Enc::tag(rep::ERR).str(&e),
        };
        if wire::write_msg(&mut sock, &reply.0).is_err() {
            break;
        }
    }
}

#[derive(Default)]
struct PeerState {
    /// Dropped before the domain.
    end: Option<End>,
    domain: Option<Domain>,
    /// Received and not yet reported.
    got: Vec<(Vec<u8>, PacketMeta)>,
}

impl PeerState {
    fn detach(&mut self) {
        self.end = None;
        self.domain = None;
        self.got.clear();
    }

    fn end(&mut self) -> Result<&mut End, String> {
        self.end.as_mut().ok_or_else(|| "not attached".to_string())
    }

    fn handle(&mut self, m: &[u8]) -> Result<Enc, String> {
        let mut d = Dec::new(m);
        match d.tag()? {
            req::ATTACH_FRONT => {
                self.detach();
                let broker = PathBuf::from(d.str()?);
                let domid = d.u32()? as DomId;
                let backend = d.u32()? as DomId;
                let dom = Domain::connect(&broker, domid).map_err(|e| format!("connect: {e}"))?;
                let events = dom.events().map_err(|e| format!("events: {e}"))?;
                let front = Netfront::new(dom.grants(), events, backend, features())
                    .map_err(|e| format!("netfront: {e}"))?;
                let reply = Enc::tag(rep::REFS)
                    .u32(front.tx_ring_ref().0)
                    .u32(front.rx_ring_ref().0)
                    .u32(front.event_port().0);
                self.end = Some(End::Front(Box::new(front)));
                self.domain = Some(dom);
                Ok(reply)
            }
            req::ATTACH_BACK => {
                self.detach();
                let broker = PathBuf::from(d.str()?);
                let domid = d.u32()? as DomId;
                let frontend = d.u32()? as DomId;
                let (tx, rx, port) = (d.u32()?, d.u32()?, d.u32()?);
                let dom = Domain::connect(&broker, domid).map_err(|e| format!("connect: {e}"))?;
                let mut events = dom.events().map_err(|e| format!("events: {e}"))?;
                let local = events
                    .bind_interdomain(frontend, Port(port))
                    .map_err(|e| format!("bind: {e}"))?;
                let back = Netback::new(
                    dom.grants(),
                    events,
                    frontend,
                    GrantRef(tx),
                    GrantRef(rx),
                    local,
                    features(),
                )
                .map_err(|e| format!("netback: {}", e.reason()))?;
                self.end = Some(End::Back(Box::new(back)));
                self.domain = Some(dom);
                Ok(Enc::tag(rep::OK))
            }
            req::SEND => {
                let frame = d.bytes()?.to_vec();
                let mut got = std::mem::take(&mut self.got);
                let r = send_frame(self.end()?, &frame, &mut got);
                self.got = got;
                Ok(Enc::tag(rep::SENT).u32(u32::from(r?)))
            }
            req::DRAIN => {
                let want = d.u32()? as usize;
                let mut got = std::mem::take(&mut self.got);
                self.end()?.take_at_least(want, &mut got)?;
                let mut reply = Enc::tag(rep::FRAMES).u32(got.len() as u32);
                for (f, m) in &got {
                    reply = reply.bytes(f).meta(m);
                }
                Ok(reply)
            }
            req::DETACH => {
                self.detach();
                Ok(Enc::tag(rep::OK))
            }
            t => Err(format!("unknown request {t}")),
        }
    }
}

/// Sends `frame` over `end`, waiting for room if the ring is full (taking what arrives in the
/// meantime into `got`); whether the ring end refused it.
fn send_frame(
    end: &mut End,
    frame: &[u8],
    got: &mut Vec<(Vec<u8>, PacketMeta)>,
) -> Result<bool, String> {
    let before = end.refused();
    let deadline = Instant::now() + WAIT;
    while !end.try_send(frame)? {
        if Instant::now() > deadline {
            return Err(format!(
                "no room on the ring for a {}-byte frame after {WAIT:?}",
                frame.len()
            ));
        }
        end.wait(20)?;
        end.pump(got)?;
    }
    Ok(end.refused() > before)
}

// ---------------------------------------------------------------------------------------------
// The parent: peer processes.

struct Peer {
    child: Child,
    sock: UnixStream,
}

impl Peer {
    fn call(&mut self, m: &Enc) -> Result<Vec<u8>, String> {
        wire::write_msg(&mut self.sock, &m.0).map_err(|e| format!("to peer: {e}"))?;
        let r = wire::read_msg(&mut self.sock)
            .map_err(|e| format!("from peer: {e}"))?
            .ok_or("the peer process closed its control socket")?;
        if r.first() == Some(&rep::ERR) {
            let mut d = Dec::new(&r);
            d.tag()?;
            return Err(format!("peer: {}", d.str()?));
        }
        Ok(r)
    }

    fn expect(&mut self, m: &Enc, tag: u8) -> Result<Vec<u8>, String> {
        let r = self.call(m)?;
        match r.first() {
            Some(&t) if t == tag => Ok(r),
            t => Err(format!("peer answered {t:?}, expected {tag}")),
        }
    }

    /// Sends `frame` from the peer over its ring; whether its ring end refused it.
    fn send(&mut self, frame: &[u8]) -> Result<bool, String> {
        let r = self.expect(&Enc::tag(req::SEND).bytes(frame), rep::SENT)?;
        let mut d = Dec::new(&r);
        d.tag()?;
        Ok(d.u32()? != 0)
    }

    /// The frames the peer received since the last drain (at least `want`, unless it timed
    /// out).
    fn drain(&mut self, want: usize) -> Result<Vec<(Vec<u8>, PacketMeta)>, String> {
        let r = self.expect(&Enc::tag(req::DRAIN).u32(want as u32), rep::FRAMES)?;
        let mut d = Dec::new(&r);
        d.tag()?;
        let n = d.u32()?;
        let mut v = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let f = d.bytes()?.to_vec();
            v.push((f, d.meta()?));
        }
        Ok(v)
    }

    fn stop(mut self) {
        // End of file on its control socket: the peer returns.
        drop(self.sock);
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The peer processes, started as needed and kept across scenarios.
struct Pool {
    dir: tempfile::TempDir,
    listener: UnixListener,
    peers: Vec<Peer>,
    started: usize,
}

impl Pool {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let listener = UnixListener::bind(dir.path().join("ctl.sock")).expect("control socket");
        listener.set_nonblocking(true).expect("non-blocking");
        Pool {
            dir,
            listener,
            peers: Vec::new(),
            started: 0,
        }
    }

    fn spawn(&mut self) -> Result<Peer, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let mut child = Command::new(exe)
            .args(["--exact", PEER_TEST, "--nocapture", "--test-threads=1"])
            .env(PEER_ENV, self.dir.path().join("ctl.sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawn a peer: {e}"))?;
        self.started += 1;
        let deadline = Instant::now() + WAIT;
        loop {
            match self.listener.accept() {
                Ok((sock, _)) => {
                    sock.set_nonblocking(false).map_err(|e| e.to_string())?;
                    // A stuck peer is an error, not a hung test.
                    sock.set_read_timeout(Some(WAIT * 3))
                        .map_err(|e| e.to_string())?;
                    return Ok(Peer { child, sock });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("accept: {e}")),
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!("a peer process exited at once: {st}"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("a peer process did not connect".into());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// At least `n` peers.
    fn ensure(&mut self, n: usize) -> Result<(), String> {
        while self.peers.len() < n {
            let p = self.spawn()?;
            self.peers.push(p);
        }
        Ok(())
    }

    fn stop_all(&mut self) {
        for p in self.peers.drain(..) {
            p.stop();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The parent: one scenario.

/// One engine interface's ring: our end, the peer process at the other, and the frames the
/// engine sent there and the peer reported.
struct Link {
    name: String,
    peer: usize,
    end: End,
    sent: Vec<Vec<u8>>,
    received: Vec<Vec<u8>>,
}

#[derive(Debug, Default)]
struct Counts {
    packets: usize,
    emitted: usize,
    bypassed: usize,
    clients: usize,
}

/// The domain of a client vif's front end: N for `vifN.M`, unless taken.
fn client_domid(name: &str, taken: &[DomId]) -> DomId {
    let parsed = name
        .strip_prefix("vif")
        .and_then(|r| r.split('.').next())
        .and_then(|n| n.parse::<DomId>().ok())
        .filter(|d| *d > NETVM_DOM && *d < 0x7ff0 && !taken.contains(d));
    parsed.unwrap_or_else(|| (100..).find(|d| !taken.contains(d)).unwrap_or(100))
}

/// Every vif name the scenario has at any point, in order of first appearance.
fn vif_names(cfg: &ReplayConfig) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let all = cfg
        .vifs
        .iter()
        .chain(cfg.steps.iter().filter_map(|s| s.vifs.as_ref()).flatten());
    for v in all {
        if !names.contains(&v.name) {
            names.push(v.name.clone());
        }
    }
    names
}

struct Run<'a> {
    r: Replayer,
    links: Vec<Link>,
    peers: &'a mut [Peer],
    /// Frames of the replay already sent over the rings.
    flushed: usize,
    counts: Counts,
}

impl Run<'_> {
    fn link_of(&self, name: &str) -> Result<usize, String> {
        self.links
            .iter()
            .position(|l| l.name == name)
            .ok_or_else(|| format!("no ring for interface {name:?}"))
    }

    /// What the peer of link `i` received since the last drain, waiting for `want` frames.
    fn drain(&mut self, i: usize, want: usize) -> Result<(), String> {
        let link = &mut self.links[i];
        let got = self.peers[link.peer].drain(want)?;
        for (n, (f, m)) in got.into_iter().enumerate() {
            if m != PacketMeta::default() {
                return Err(format!(
                    "{}: frame {} arrived with metadata {m:?}",
                    link.name,
                    link.received.len() + n
                ));
            }
            link.received.push(f);
        }
        Ok(())
    }

    /// Sends the frames the engine emitted since the last call over their rings.
    fn flush(&mut self) -> Result<(), String> {
        while self.flushed < self.r.frames().len() {
            let f = &self.r.frames()[self.flushed];
            let name = self.r.iface_name(f.iface).to_string();
            let data = f.data.clone();
            self.flushed += 1;
            self.counts.emitted += 1;
            let i = self.link_of(&name)?;
            let before = self.links[i].end.refused();
            let deadline = Instant::now() + WAIT;
            while !self.links[i].end.try_send(&data)? {
                // Full: the peer takes what is there, answering and posting buffers again.
                if Instant::now() > deadline {
                    return Err(format!("{name}: no room on the ring after {WAIT:?}"));
                }
                let pending = self.links[i].sent.len() - self.links[i].received.len();
                self.drain(i, pending)?;
                self.links[i].end.wait(20)?;
            }
            if self.links[i].end.refused() > before {
                return Err(format!(
                    "{name}: our ring end refused emitted frame {} ({} bytes)",
                    self.links[i].sent.len(),
                    data.len()
                ));
            }
            self.links[i].sent.push(data);
        }
        Ok(())
    }

    /// The peers take what was sent to them.
    fn drain_pending(&mut self) -> Result<(), String> {
        for i in 0..self.links.len() {
            let pending = self.links[i].sent.len() - self.links[i].received.len();
            if pending > 0 {
                self.drain(i, pending)?;
            }
        }
        Ok(())
    }

    /// Input packet `n`: from its peer over the ring, through the engine, out over the rings.
    fn packet(&mut self, n: usize, ts_ns: u64, if_name: &str, data: &[u8]) -> Result<(), String> {
        self.r.run_due_steps(ts_ns).map_err(|e| e.to_string())?;
        self.flush()?;
        let iface = self
            .r
            .iface_by_name(if_name)
            .ok_or_else(|| format!("packet {n}: no engine interface {if_name:?}"))?;
        let i = self.link_of(if_name)?;
        let refused = self.peers[self.links[i].peer].send(data)?;
        let mut got = Vec::new();
        let bytes = if refused {
            if data.len() >= ETH_HLEN {
                return Err(format!(
                    "packet {n} on {if_name}: the peer's ring end refused a {}-byte frame",
                    data.len()
                ));
            }
            // Not describable on a ring: nothing may arrive; the engine gets it directly.
            self.links[i].end.pump(&mut got)?;
            self.counts.bypassed += 1;
            data.to_vec()
        } else {
            self.links[i].end.take_at_least(1, &mut got)?;
            match got.pop() {
                Some((f, m)) => {
                    if m != PacketMeta::default() {
                        return Err(format!(
                            "packet {n} on {if_name}: arrived with metadata {m:?}"
                        ));
                    }
                    if f != data {
                        return Err(format!(
                            "packet {n} on {if_name}: {} bytes arrived, not the capture's {}",
                            f.len(),
                            data.len()
                        ));
                    }
                    f
                }
                None => {
                    return Err(format!(
                        "packet {n} on {if_name}: nothing arrived over the ring in {WAIT:?}"
                    ))
                }
            }
        };
        if !got.is_empty() {
            return Err(format!(
                "packet {n} on {if_name}: {} unexpected frames arrived over the ring",
                got.len()
            ));
        }
        self.r
            .packet(ts_ns, iface, &bytes)
            .map_err(|e| e.to_string())?;
        self.counts.packets += 1;
        self.flush()?;
        self.drain_pending()
    }
}

/// Attaches the rings of one scenario to the pool's peers (peer 0 the netvm, peer k the k-th
/// vif) over a broker at `broker`, as domain `fw` (the firewall).
fn attach(
    pool: &mut Pool,
    fw: &Domain,
    broker: &Path,
    uplink: &str,
    vifs: &[String],
) -> Result<Vec<Link>, String> {
    pool.ensure(1 + vifs.len())?;
    let broker_s = broker.to_string_lossy().to_string();
    let mut links = Vec::new();
    let events = fw.events().map_err(|e| format!("events: {e}"))?;
    let front = Netfront::new(fw.grants(), events, NETVM_DOM, features())
        .map_err(|e| format!("uplink netfront: {e}"))?;
    pool.peers[0].expect(
        &Enc::tag(req::ATTACH_BACK)
            .str(&broker_s)
            .u32(u32::from(NETVM_DOM))
            .u32(u32::from(FW_DOM))
            .u32(front.tx_ring_ref().0)
            .u32(front.rx_ring_ref().0)
            .u32(front.event_port().0),
        rep::OK,
    )?;
    links.push(Link {
        name: uplink.to_string(),
        peer: 0,
        end: End::Front(Box::new(front)),
        sent: Vec::new(),
        received: Vec::new(),
    });
    let mut taken = vec![FW_DOM, NETVM_DOM];
    for (k, name) in vifs.iter().enumerate() {
        let domid = client_domid(name, &taken);
        taken.push(domid);
        let r = pool.peers[k + 1].expect(
            &Enc::tag(req::ATTACH_FRONT)
                .str(&broker_s)
                .u32(u32::from(domid))
                .u32(u32::from(FW_DOM)),
            rep::REFS,
        )?;
        let mut d = Dec::new(&r);
        d.tag()?;
        let (tx, rx, port) = (d.u32()?, d.u32()?, d.u32()?);
        let mut events = fw.events().map_err(|e| format!("events: {e}"))?;
        let local = events
            .bind_interdomain(domid, Port(port))
            .map_err(|e| format!("{name}: bind: {e}"))?;
        let back = Netback::new(
            fw.grants(),
            events,
            domid,
            GrantRef(tx),
            GrantRef(rx),
            local,
            features(),
        )
        .map_err(|e| format!("{name}: netback: {}", e.reason()))?;
        links.push(Link {
            name: name.clone(),
            peer: k + 1,
            end: End::Back(Box::new(back)),
            sent: Vec::new(),
            received: Vec::new(),
        });
    }
    Ok(links)
}

fn run_scenario(pool: &mut Pool, dir: &Path, idx: usize) -> Result<Counts, String> {
    let cfg = ReplayConfig::load(&dir.join("config.yaml")).map_err(|e| e.to_string())?;
    let input = std::fs::read(dir.join("in.pcapng")).map_err(|e| format!("in.pcapng: {e}"))?;
    let stored = std::fs::read(dir.join("out.pcapng")).map_err(|e| format!("out.pcapng: {e}"))?;
    let packets = read_capture(&input).map_err(|e| format!("in.pcapng: {e}"))?;
    let r = Replayer::new(&cfg, None).map_err(|e| e.to_string())?;
    let uplink = r
        .ifaces()
        .first()
        .map(|(_, n)| n.clone())
        .ok_or("the engine has no interface")?;
    let vifs = vif_names(&cfg);

    let broker = pool.dir.path().join(format!("hv-{idx}.sock"));
    let hv = Hypervisor::serve(&broker).map_err(|e| format!("broker: {e}"))?;
    let fw = Domain::connect(hv.path(), FW_DOM).map_err(|e| format!("dom{FW_DOM}: {e}"))?;
    let links = attach(pool, &fw, hv.path(), &uplink, &vifs)?;
    let mut run = Run {
        r,
        links,
        peers: &mut pool.peers,
        flushed: 0,
        counts: Counts {
            clients: vifs.len(),
            ..Counts::default()
        },
    };
    for (n, p) in packets.iter().enumerate() {
        run.packet(n, p.ts_ns, &p.if_name, &p.data)?;
    }
    run.r.finish().map_err(|e| e.to_string())?;
    run.flush()?;
    run.drain_pending()?;
    // Anything more that came.
    for i in 0..run.links.len() {
        run.drain(i, 0)?;
    }

    let mut problems = Vec::new();
    let out = run.r.output_pcapng().map_err(|e| e.to_string())?;
    if out != stored {
        problems.push(format!(
            "the output differs from out.pcapng (- stored, + over rings):\n{}",
            corpus::diff_captures(&stored, &out)
        ));
    }
    for l in &run.links {
        let emitted: Vec<&[u8]> = run
            .r
            .frames()
            .iter()
            .filter(|f| run.r.iface_name(f.iface) == l.name)
            .map(|f| f.data.as_slice())
            .collect();
        let received: Vec<&[u8]> = l.received.iter().map(Vec::as_slice).collect();
        if received != emitted {
            let first = received
                .iter()
                .zip(&emitted)
                .position(|(a, b)| a != b)
                .unwrap_or(received.len().min(emitted.len()));
            problems.push(format!(
                "{}: the peer received {} frames, the engine emitted {} there; first \
                 difference at frame {first}",
                l.name,
                received.len(),
                emitted.len()
            ));
        }
    }
    // The peers let go first (their mappings of our grants), then our ends, then the broker.
    for p in run.peers.iter_mut() {
        if let Err(e) = p.expect(&Enc::tag(req::DETACH), rep::OK) {
            problems.push(format!("detach: {e}"));
        }
    }
    let counts = std::mem::take(&mut run.counts);
    drop(run);
    drop(fw);
    drop(hv);
    if problems.is_empty() {
        Ok(counts)
    } else {
        Err(problems.join("\n"))
    }
}

fn scenario_dirs() -> Vec<PathBuf> {
    let dir = corpus::corpus_dir();
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    v
}

#[test]
fn every_scenario_gives_the_same_output_over_rings() {
    let start = Instant::now();
    let mut pool = Pool::new();
    let dirs = scenario_dirs();
    let mut failures = Vec::new();
    let mut total = Counts::default();
    let mut two_clients = 0;
    for (idx, dir) in dirs.iter().enumerate() {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        match run_scenario(&mut pool, dir, idx) {
            Ok(c) => {
                total.packets += c.packets;
                total.emitted += c.emitted;
                total.bypassed += c.bypassed;
                if c.clients >= 2 {
                    two_clients += 1;
                }
            }
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                // A peer may be out of step after an error: start afresh.
                pool.stop_all();
            }
        }
    }
    let started = pool.started;
    pool.stop_all();
    eprintln!(
        "{} scenarios over rings in {:?}: {} input packets ({} shorter than an Ethernet \
         header given directly), {} frames emitted, {two_clients} scenarios with two or more \
         client processes, {started} peer processes started",
        dirs.len(),
        start.elapsed(),
        total.packets,
        total.bypassed,
        total.emitted,
    );
    assert!(
        failures.is_empty(),
        "{} of {} scenarios failed over rings:\n\n{}",
        failures.len(),
        dirs.len(),
        failures.join("\n\n")
    );
    assert!(dirs.len() >= 40, "only {} scenarios", dirs.len());
    assert!(
        two_clients >= 2,
        "scenarios with two clients: {two_clients}"
    );
    // Only scenario 61's two truncated Ethernet headers (10 and 13 bytes) cannot go on a ring.
    assert_eq!(total.bypassed, 2, "frames given to the engine directly");
}
