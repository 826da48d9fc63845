//! Frames per second and Gbit/s through a netfront-netback pair over the emulated
//! hypervisor, both ways, with and without GSO, beside AF_PACKET over a veth pair for the
//! same frames. Run by `bench/xen-rings.sh`, which makes the veth pair in a network
//! namespace of its own and passes it as `--netns NAME` (without it the AF_PACKET rows are
//! skipped).
//!
//! Every row runs its sender and its receiver in two processes of their own (this binary run
//! again as `child ...`); the emulated hypervisor's broker is a thread of the parent. The
//! sender sends for a fixed time, then tells the receiver over a Unix datagram socket how
//! many frames and bytes it sent; the receiver checks every frame (length, IPv4 total
//! length, TCP sequence, offload metadata, and on every 1024th frame the IPv4 and TCP
//! checksums) and reports what it got, so a lost or damaged frame shows in the table.
//! Timings are figures on a shared machine, not verdicts.

use std::error::Error;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vif_backend::afpacket::PacketSocket;
use vif_backend::xen::emul::{Domain, EmulEvents, EmulGrants, Hypervisor};
use vif_backend::xen::netback::Netback;
use vif_backend::xen::netfront::Netfront;
use vif_backend::xen::netif::{Features, GsoInfo, GsoType, PacketMeta};
use vif_backend::xen::{DomId, EventChannels, GrantRef, Port};
use vif_backend::{Csum, Device, Gso, GsoKind, Offload, RxBurst, TxFrame};

type Res<T> = Result<T, Box<dyn Error>>;

const FRONT: DomId = 7;
const BACK: DomId = 0;

const ETH_HLEN: usize = 14;
const IP_HLEN: usize = 20;
/// TCP header with the timestamp option (NOP, NOP, TS), as Linux sends it.
const TCP_HLEN: usize = 32;
const HDRS: usize = ETH_HLEN + IP_HLEN + TCP_HLEN;
/// The segment payload of a 1500-byte MTU with timestamps: 1514-byte wire frames.
const MSS: usize = 1448;
/// Segments in a GSO super-frame: 45 x 1448 = 65160 payload bytes, a 65226-byte frame.
const GSO_SEGS: usize = 45;
const ISN: u32 = 0x1000_0000;
const SRC_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const DST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
const SRC_IP: [u8; 4] = [10, 137, 0, 1];
const DST_IP: [u8; 4] = [10, 137, 0, 2];
const SPORT: u16 = 40_000;
const DPORT: u16 = 5201;
/// AF_PACKET over veth drops silently when the receiver falls behind (the backlog or its
/// socket buffer fills): its sender keeps at most this many frame bytes unacknowledged,
/// the size of netfront's TX page pool (256 pages).
const AFP_WINDOW_BYTES: usize = 256 * 4096;

// ---------------------------------------------------------------------------------------
// Frames

fn sum16(data: &[u8], mut s: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        s += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        s += u32::from(*b) << 8;
    }
    s
}

fn fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn pseudo_sum(tcp_len: usize) -> u32 {
    let s = sum16(&SRC_IP, 0);
    let s = sum16(&DST_IP, s);
    s + 6 + tcp_len as u32
}

/// RFC 1624 eqn. 3: the checksum after one 16-bit word changed from `old` to `new`.
fn csum_update(hc: u16, old: u16, new: u16) -> u16 {
    !fold(u32::from(!hc) + u32::from(!old) + u32::from(new))
}

/// What one row sends: 1514-byte frames with complete checksums, or 64 KiB GSO TCPv4
/// super-frames with the TCP checksum left partial (the pseudo-header sum in the field), as
/// a Linux guest hands them to its netfront or a veth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Plain,
    Gso,
}

impl Shape {
    fn parse(s: &str) -> Res<Self> {
        match s {
            "plain" => Ok(Shape::Plain),
            "gso" => Ok(Shape::Gso),
            _ => Err(format!("unknown shape {s}").into()),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Shape::Plain => "plain",
            Shape::Gso => "gso",
        }
    }

    fn segs(self) -> usize {
        match self {
            Shape::Plain => 1,
            Shape::Gso => GSO_SEGS,
        }
    }

    fn payload(self) -> usize {
        self.segs() * MSS
    }

    fn frame_len(self) -> usize {
        HDRS + self.payload()
    }

    fn meta(self) -> PacketMeta {
        match self {
            Shape::Plain => PacketMeta::default(),
            Shape::Gso => PacketMeta {
                csum_blank: true,
                data_validated: true,
                gso: Some(GsoInfo {
                    ty: GsoType::TcpV4,
                    mss: MSS as u16,
                }),
            },
        }
    }

    fn offload(self) -> Offload {
        match self {
            Shape::Plain => Offload::NONE,
            Shape::Gso => Offload {
                csum: Csum::Partial {
                    start: (ETH_HLEN + IP_HLEN) as u16,
                    offset: 16,
                },
                gso: Some(Gso {
                    kind: GsoKind::TcpV4,
                    size: MSS as u16,
                    hdr_len: HDRS as u16,
                    ecn: false,
                }),
            },
        }
    }

    /// The first frame (sequence number `ISN`), headers and checksums filled in.
    fn build(self) -> Vec<u8> {
        let payload = self.payload();
        let mut f = vec![0u8; HDRS + payload];
        f[0..6].copy_from_slice(&DST_MAC);
        f[6..12].copy_from_slice(&SRC_MAC);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = ETH_HLEN;
        f[ip] = 0x45;
        f[ip + 2..ip + 4].copy_from_slice(&((IP_HLEN + TCP_HLEN + payload) as u16).to_be_bytes());
        f[ip + 4..ip + 6].copy_from_slice(&1u16.to_be_bytes());
        f[ip + 6] = 0x40; // DF
        f[ip + 8] = 64;
        f[ip + 9] = 6;
        f[ip + 12..ip + 16].copy_from_slice(&SRC_IP);
        f[ip + 16..ip + 20].copy_from_slice(&DST_IP);
        let c = !fold(sum16(&f[ip..ip + IP_HLEN], 0));
        f[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
        let t = ip + IP_HLEN;
        f[t..t + 2].copy_from_slice(&SPORT.to_be_bytes());
        f[t + 2..t + 4].copy_from_slice(&DPORT.to_be_bytes());
        f[t + 4..t + 8].copy_from_slice(&ISN.to_be_bytes());
        f[t + 8..t + 12].copy_from_slice(&1u32.to_be_bytes());
        f[t + 12] = ((TCP_HLEN / 4) as u8) << 4;
        f[t + 13] = 0x18; // PSH, ACK
        f[t + 14..t + 16].copy_from_slice(&0xffffu16.to_be_bytes());
        f[t + 20..t + 24].copy_from_slice(&[1, 1, 8, 10]);
        f[t + 24..t + 28].copy_from_slice(&0x0102_0304u32.to_be_bytes());
        f[t + 28..t + 32].copy_from_slice(&0x0a0b_0c0du32.to_be_bytes());
        for (i, b) in f[HDRS..].iter_mut().enumerate() {
            *b = (i as u32).wrapping_mul(2_654_435_761) as u8 ^ (i >> 8) as u8;
        }
        let tcp_len = TCP_HLEN + payload;
        let c = match self {
            Shape::Plain => !fold(sum16(&f[t..], pseudo_sum(tcp_len))),
            Shape::Gso => fold(pseudo_sum(tcp_len)),
        };
        f[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
        f
    }
}

const SEQ_AT: usize = ETH_HLEN + IP_HLEN + 4;
const TCP_CSUM_AT: usize = ETH_HLEN + IP_HLEN + 16;

fn be16(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

fn be32(f: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([f[at], f[at + 1], f[at + 2], f[at + 3]])
}

/// Sets the TCP sequence number, keeping a complete checksum right (a partial one does not
/// cover it).
fn set_seq(f: &mut [u8], shape: Shape, seq: u32) {
    let old = be32(f, SEQ_AT);
    f[SEQ_AT..SEQ_AT + 4].copy_from_slice(&seq.to_be_bytes());
    if shape == Shape::Plain {
        let mut c = be16(f, TCP_CSUM_AT);
        c = csum_update(c, (old >> 16) as u16, (seq >> 16) as u16);
        c = csum_update(c, old as u16, seq as u16);
        f[TCP_CSUM_AT..TCP_CSUM_AT + 2].copy_from_slice(&c.to_be_bytes());
    }
}

/// What the receiver saw.
#[derive(Debug)]
struct Verifier {
    shape: Shape,
    frames: u64,
    bytes: u64,
    /// Frames of the wrong length, headers, checksums or metadata.
    bad: u64,
    /// Frames whose sequence number was not the next one (a gap or a reordering).
    out_of_seq: u64,
    next_seq: u32,
    last: Instant,
}

impl Verifier {
    fn new(shape: Shape) -> Self {
        Verifier {
            shape,
            frames: 0,
            bytes: 0,
            bad: 0,
            out_of_seq: 0,
            next_seq: ISN,
            last: Instant::now(),
        }
    }

    /// Whether `f` is one of ours (AF_PACKET also sees whatever else the kernel sends).
    fn ours(f: &[u8]) -> bool {
        f.len() >= HDRS
            && f[12..14] == [0x08, 0x00]
            && f[ETH_HLEN + 9] == 6
            && be16(f, ETH_HLEN + IP_HLEN + 2) == DPORT
    }

    fn check(&mut self, f: &[u8], meta_ok: bool) {
        self.frames += 1;
        self.bytes += f.len() as u64;
        self.last = Instant::now();
        let shape = self.shape;
        let mut ok = meta_ok
            && f.len() == shape.frame_len()
            && Self::ours(f)
            && usize::from(be16(f, ETH_HLEN + 2)) == f.len() - ETH_HLEN;
        if ok && self.frames % 1024 == 1 {
            let ip_ok = fold(sum16(&f[ETH_HLEN..ETH_HLEN + IP_HLEN], 0)) == 0xffff;
            let tcp = &f[ETH_HLEN + IP_HLEN..];
            let tcp_ok = match shape {
                Shape::Plain => fold(sum16(tcp, pseudo_sum(tcp.len()))) == 0xffff,
                Shape::Gso => be16(f, TCP_CSUM_AT) == fold(pseudo_sum(tcp.len())),
            };
            ok = ip_ok && tcp_ok && f[HDRS..] == shape.build()[HDRS..];
        }
        if !ok {
            self.bad += 1;
        }
        if f.len() >= HDRS {
            let seq = be32(f, SEQ_AT);
            if seq != self.next_seq {
                self.out_of_seq += 1;
            }
            self.next_seq = seq.wrapping_add(shape.payload() as u32);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Children: one end of a row each

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn wait_readable(fds: &[RawFd], ms: i32) -> Res<Vec<bool>> {
    let mut ready = Vec::new();
    vif_backend::sys::poll_readable(fds, ms, &mut ready)?;
    Ok(ready)
}

fn read_line(r: &mut impl BufRead) -> Res<String> {
    let mut l = String::new();
    if r.read_line(&mut l)? == 0 {
        return Err("unexpected end of input".into());
    }
    Ok(l.trim().to_string())
}

/// What the sender tells the receiver when it is done.
#[derive(Debug, Clone, Copy, Default)]
struct Sent {
    frames: u64,
    bytes: u64,
    start_us: u64,
    /// Frames the sending end refused (not negotiated): counted as sent and lost.
    refused: u64,
}

impl Sent {
    fn encode(&self) -> String {
        format!(
            "done {} {} {} {}",
            self.frames, self.bytes, self.start_us, self.refused
        )
    }

    fn decode(s: &str) -> Option<Self> {
        let w: Vec<u64> = s
            .strip_prefix("done ")?
            .split(' ')
            .filter_map(|x| x.parse().ok())
            .collect();
        match w[..] {
            [frames, bytes, start_us, refused] => Some(Sent {
                frames,
                bytes,
                start_us,
                refused,
            }),
            _ => None,
        }
    }
}

/// The sending loop: `try_send(frame)` returns whether the frame was taken (false: full,
/// wait on `fd`, then `after_wait`).
fn send_loop(
    shape: Shape,
    secs: f64,
    fd: RawFd,
    mut try_send: impl FnMut(&[u8]) -> Res<bool>,
    mut after_wait: impl FnMut() -> Res<()>,
) -> Res<Sent> {
    let mut frame = shape.build();
    let start = Instant::now();
    let start_us = now_us();
    let stop = start + Duration::from_secs_f64(secs);
    let give_up = stop + Duration::from_secs(10);
    let mut sent = Sent {
        start_us,
        ..Sent::default()
    };
    let mut seq = ISN;
    loop {
        if sent.frames.is_multiple_of(32) && Instant::now() >= stop {
            break;
        }
        set_seq(&mut frame, shape, seq);
        while !try_send(&frame)? {
            if Instant::now() > give_up {
                return Err(format!("stalled after {} frames", sent.frames).into());
            }
            wait_readable(&[fd], 100)?;
            after_wait()?;
        }
        sent.frames += 1;
        sent.bytes += frame.len() as u64;
        seq = seq.wrapping_add(shape.payload() as u32);
    }
    Ok(sent)
}

/// The receiving loop: `poll(v)` takes what is waiting, returns how many it took and
/// whether more is waiting without an event; `after_wait` runs after a wait on `fd`.
fn recv_loop(
    ctl: &UnixDatagram,
    fd: RawFd,
    v: &mut Verifier,
    mut poll: impl FnMut(&mut Verifier) -> Res<(usize, bool)>,
    mut after_wait: impl FnMut() -> Res<()>,
) -> Res<Sent> {
    ctl.set_nonblocking(true)?;
    let mut done: Option<Sent> = None;
    let mut buf = [0u8; 128];
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        let (n, more) = poll(v)?;
        if n > 0 || more {
            continue;
        }
        if let Some(s) = done {
            // Everything in, or nothing for 2 s since the sender finished.
            if v.frames >= s.frames.saturating_sub(s.refused)
                || v.last.elapsed() > Duration::from_secs(2)
            {
                return Ok(s);
            }
        } else if Instant::now() > give_up {
            return Err("the sender never finished".into());
        }
        let ready = wait_readable(&[fd, ctl.as_raw_fd()], 100)?;
        if ready.first() == Some(&true) {
            after_wait()?;
        }
        if ready.get(1) == Some(&true) {
            if let Ok(n) = ctl.recv(&mut buf) {
                done = Sent::decode(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    }
}

fn report(v: &Verifier, sent: &Sent, rx_start_us: u64, rx_start: Instant) {
    // The receiver's clock for the last frame, on the wall clock both processes share.
    let last_us = rx_start_us + v.last.duration_since(rx_start).as_micros() as u64;
    let elapsed_us = last_us.saturating_sub(sent.start_us);
    println!(
        "result {} {} {} {} {} {} {} {}",
        sent.frames, sent.bytes, sent.refused, v.frames, v.bytes, v.bad, v.out_of_seq, elapsed_us
    );
}

struct ChildArgs {
    end: String,
    role: String,
    shape: Shape,
    secs: f64,
    dir: PathBuf,
    rest: Vec<String>,
}

fn child(args: &[String]) -> Res<()> {
    let [end, role, shape, secs, dir, rest @ ..] = args else {
        return Err("child: end role shape secs dir ...".into());
    };
    let a = ChildArgs {
        end: end.clone(),
        role: role.clone(),
        shape: Shape::parse(shape)?,
        secs: secs.parse()?,
        dir: PathBuf::from(dir),
        rest: rest.to_vec(),
    };
    let stdin = std::io::stdin();
    let mut stdin = stdin.lock();
    let rx_sock = a.dir.join("rx.sock");
    let ctl = if a.role == "recv" {
        UnixDatagram::bind(&rx_sock)?
    } else {
        let p = a.dir.join("tx.sock");
        UnixDatagram::bind(p)?
    };
    let rx_start = Instant::now();
    let rx_start_us = now_us();
    match a.end.as_str() {
        "front" => child_front(&a, &ctl, &rx_sock, &mut stdin, rx_start, rx_start_us)?,
        "back" => child_back(&a, &ctl, &rx_sock, &mut stdin, rx_start, rx_start_us)?,
        "afp" => child_afp(&a, &ctl, &rx_sock, &mut stdin, rx_start, rx_start_us)?,
        e => return Err(format!("unknown end {e}").into()),
    }
    Ok(())
}

/// Stays until the parent has both ends' answers: our grants and ports live as long as our
/// end does, so it is dropped only after this.
fn wait_quit(stdin: &mut impl BufRead) -> Res<()> {
    std::io::stdout().flush()?;
    let _ = read_line(stdin);
    Ok(())
}

fn tell_done(ctl: &UnixDatagram, rx_sock: &Path, sent: &Sent) -> Res<()> {
    ctl.send_to(sent.encode().as_bytes(), rx_sock)?;
    println!("sent {} {}", sent.frames, sent.bytes);
    Ok(())
}

fn child_front(
    a: &ChildArgs,
    ctl: &UnixDatagram,
    rx_sock: &Path,
    stdin: &mut impl BufRead,
    rx_start: Instant,
    rx_start_us: u64,
) -> Res<()> {
    let sock = a.rest.first().ok_or("front: hypervisor socket")?;
    let d7 = Domain::connect(sock, FRONT)?;
    let front: Netfront<EmulGrants, EmulEvents> =
        Netfront::new(d7.grants(), d7.events()?, BACK, Features::ALL)?;
    println!(
        "refs {} {} {}",
        front.tx_ring_ref().0,
        front.rx_ring_ref().0,
        front.event_port().0
    );
    std::io::stdout().flush()?;
    let fd = front.raw_fd();
    let front = std::cell::RefCell::new(front);
    if a.role == "send" {
        read_line(stdin)?; // go
        let meta = a.shape.meta();
        let mut sent = send_loop(
            a.shape,
            a.secs,
            fd,
            |f| Ok(front.borrow_mut().send(f, &meta)?),
            || {
                front.borrow_mut().handle_event()?;
                Ok(())
            },
        )?;
        let f = front.borrow();
        sent.refused = f.stats().tx_refused;
        tell_done(ctl, rx_sock, &sent)?;
    } else {
        let mut v = Verifier::new(a.shape);
        let want = a.shape.meta();
        let sent = recv_loop(
            ctl,
            fd,
            &mut v,
            |v| {
                let mut f = front.borrow_mut();
                let n = f.recv(&mut |fr: &[u8], m: &PacketMeta| v.check(fr, *m == want))?;
                let more = n > 0 || f.pending_rx()?;
                Ok((n, more))
            },
            || {
                front.borrow_mut().handle_event()?;
                Ok(())
            },
        )?;
        report(&v, &sent, rx_start_us, rx_start);
    }
    wait_quit(stdin)
}

fn child_back(
    a: &ChildArgs,
    ctl: &UnixDatagram,
    rx_sock: &Path,
    stdin: &mut impl BufRead,
    rx_start: Instant,
    rx_start_us: u64,
) -> Res<()> {
    let [sock, tx, rx, port, ..] = &a.rest[..] else {
        return Err("back: socket tx-ref rx-ref port".into());
    };
    let d0 = Domain::connect(sock, BACK)?;
    let mut e0 = d0.events()?;
    let port = e0.bind_interdomain(FRONT, Port(port.parse()?))?;
    let back: Netback<EmulGrants, EmulEvents> = Netback::new(
        d0.grants(),
        e0,
        FRONT,
        GrantRef(tx.parse()?),
        GrantRef(rx.parse()?),
        port,
        Features::ALL,
    )?;
    println!("ready");
    std::io::stdout().flush()?;
    let fd = back.raw_fd();
    let back = std::cell::RefCell::new(back);
    if a.role == "send" {
        read_line(stdin)?; // go
        let meta = a.shape.meta();
        let mut sent = send_loop(
            a.shape,
            a.secs,
            fd,
            |f| Ok(back.borrow_mut().send_rx(f, &meta)?),
            || {
                back.borrow_mut().handle_event()?;
                Ok(())
            },
        )?;
        sent.refused = back.borrow().stats().rx_refused;
        tell_done(ctl, rx_sock, &sent)?;
    } else {
        let mut v = Verifier::new(a.shape);
        let want = a.shape.meta();
        let sent = recv_loop(
            ctl,
            fd,
            &mut v,
            |v| {
                let mut b = back.borrow_mut();
                let n = b.poll_tx(&mut |fr: &[u8], m: &PacketMeta| v.check(fr, *m == want))?;
                let more = n > 0 || b.pending_tx()?;
                Ok((n, more))
            },
            || {
                back.borrow_mut().handle_event()?;
                Ok(())
            },
        )?;
        report(&v, &sent, rx_start_us, rx_start);
    }
    wait_quit(stdin)
}

fn child_afp(
    a: &ChildArgs,
    ctl: &UnixDatagram,
    rx_sock: &Path,
    stdin: &mut impl BufRead,
    rx_start: Instant,
    rx_start_us: u64,
) -> Res<()> {
    let ifname = a.rest.first().ok_or("afp: interface")?;
    let mut sock = PacketSocket::open(ifname)?;
    let fd = sock.as_raw_fd();
    let tx_sock = a.dir.join("tx.sock");
    println!("ready");
    std::io::stdout().flush()?;
    if a.role == "send" {
        read_line(stdin)?; // go
        ctl.set_read_timeout(Some(Duration::from_millis(100)))?;
        let offload = a.shape.offload();
        let window = (AFP_WINDOW_BYTES / a.shape.frame_len()).max(1) as u64;
        let mut sent_n = 0u64;
        let mut acked = 0u64;
        let mut buf = [0u8; 64];
        let ctl_fd = ctl.as_raw_fd();
        let sent = send_loop(
            a.shape,
            a.secs,
            ctl_fd,
            |f| {
                // Frames the receiver has not seen yet: wait for its acknowledgements.
                while sent_n - acked >= window {
                    match ctl.recv(&mut buf) {
                        Ok(n) => {
                            let s = String::from_utf8_lossy(&buf[..n]);
                            if let Some(k) = s.strip_prefix("ack ").and_then(|k| k.parse().ok()) {
                                acked = acked.max(k);
                            }
                        }
                        // Nothing for 100 ms: frames were lost; go on (the receiver's
                        // count shows them).
                        Err(_) => acked = sent_n,
                    }
                }
                let n = sock.send_burst(&[TxFrame { frame: f, offload }])?;
                sent_n += n as u64;
                Ok(n == 1)
            },
            || Ok(()),
        )?;
        tell_done(ctl, rx_sock, &sent)?;
    } else {
        let mut v = Verifier::new(a.shape);
        let mut burst = RxBurst::new();
        let gso = a.shape.offload().gso.map(|g| (g.kind, g.size));
        let mut acked = 0u64;
        let sent = recv_loop(
            ctl,
            fd,
            &mut v,
            |v| {
                burst.clear();
                let n = sock.recv_burst(&mut burst, 64)?;
                for i in 0..n {
                    if let Some((f, o)) = burst.frame(i) {
                        if Verifier::ours(f) {
                            v.check(f, o.gso.map(|g| (g.kind, g.size)) == gso);
                        }
                    }
                }
                if v.frames != acked {
                    acked = v.frames;
                    let _ = ctl.send_to(format!("ack {acked}").as_bytes(), &tx_sock);
                }
                Ok((n, n > 0))
            },
            || Ok(()),
        )?;
        report(&v, &sent, rx_start_us, rx_start);
    }
    wait_quit(stdin)
}

// ---------------------------------------------------------------------------------------
// The parent: rows, children, the table

#[derive(Debug, Clone, Copy)]
enum Link {
    FrontToBack,
    BackToFront,
    Veth,
}

#[derive(Debug)]
struct Row {
    label: String,
    path: Link,
    shape: Shape,
}

#[derive(Debug)]
struct Outcome {
    sent: u64,
    sent_bytes: u64,
    refused: u64,
    got: u64,
    got_bytes: u64,
    bad: u64,
    out_of_seq: u64,
    elapsed: f64,
}

#[derive(Debug)]
struct Kid {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Kid {
    fn spawn(netns: Option<&str>, args: &[String]) -> Res<Kid> {
        let exe = std::env::current_exe()?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let mut child = cmd
            .arg("child")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        Ok(Kid {
            child,
            stdin,
            stdout,
        })
    }

    fn line(&mut self, want: &str) -> Res<String> {
        let l = read_line(&mut self.stdout)?;
        if !l.starts_with(want) {
            return Err(format!("child said {l:?}, not {want}").into());
        }
        Ok(l)
    }

    fn say(&mut self, s: &str) -> Res<()> {
        writeln!(self.stdin, "{s}")?;
        self.stdin.flush()?;
        Ok(())
    }

    fn finish(mut self) -> Res<()> {
        let _ = self.say("quit");
        let st = self.child.wait()?;
        if !st.success() {
            return Err(format!("child exited with {st}").into());
        }
        Ok(())
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        // Only a child still running (one whose row failed) is killed; it is ours.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn run_row(row: &Row, secs: f64, hv_sock: &Path, netns: Option<&str>) -> Res<Outcome> {
    let dir = std::env::temp_dir().join(format!(
        "ring-bench-{}-{}-{}",
        std::process::id(),
        row.shape.name(),
        now_us()
    ));
    std::fs::create_dir_all(&dir)?;
    let r = run_row_in(row, secs, hv_sock, netns, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn run_row_in(
    row: &Row,
    secs: f64,
    hv_sock: &Path,
    netns: Option<&str>,
    dir: &Path,
) -> Res<Outcome> {
    let base = |end: &str, role: &str| -> Vec<String> {
        vec![
            end.into(),
            role.into(),
            row.shape.name().into(),
            secs.to_string(),
            dir.display().to_string(),
        ]
    };
    let hv = hv_sock.display().to_string();
    let (mut sender, mut receiver) = match row.path {
        Link::FrontToBack | Link::BackToFront => {
            let f2b = matches!(row.path, Link::FrontToBack);
            let (fr, br) = if f2b {
                ("send", "recv")
            } else {
                ("recv", "send")
            };
            let mut a = base("front", fr);
            a.push(hv.clone());
            let mut front = Kid::spawn(None, &a)?;
            let refs = front.line("refs ")?;
            let mut a = base("back", br);
            a.push(hv);
            a.extend(refs.split(' ').skip(1).map(String::from));
            let mut back = Kid::spawn(None, &a)?;
            back.line("ready")?;
            if f2b {
                (front, back)
            } else {
                (back, front)
            }
        }
        Link::Veth => {
            let ns = netns.ok_or("no netns")?;
            let mut a = base("afp", "recv");
            a.push("vb".into());
            let mut rx = Kid::spawn(Some(ns), &a)?;
            rx.line("ready")?;
            let mut a = base("afp", "send");
            a.push("va".into());
            let mut tx = Kid::spawn(Some(ns), &a)?;
            tx.line("ready")?;
            (tx, rx)
        }
    };
    sender.say("go")?;
    sender.line("sent ")?;
    let res = receiver.line("result ")?;
    sender.finish()?;
    receiver.finish()?;
    let w: Vec<u64> = res
        .split(' ')
        .skip(1)
        .map(|x| x.parse())
        .collect::<Result<_, _>>()?;
    let [sent, sent_bytes, refused, got, got_bytes, bad, out_of_seq, elapsed_us] = w[..] else {
        return Err(format!("bad result line {res:?}").into());
    };
    Ok(Outcome {
        sent,
        sent_bytes,
        refused,
        got,
        got_bytes,
        bad,
        out_of_seq,
        elapsed: elapsed_us as f64 / 1e6,
    })
}

fn fmt_rate(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else {
        format!("{:.1} k", x / 1e3)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("child") {
        if let Err(e) = child(&args[1..]) {
            eprintln!("ring_bench child {}: {e}", args[1..].join(" "));
            std::process::exit(1);
        }
        return;
    }
    match parent(&args) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("ring_bench: {e}");
            std::process::exit(2);
        }
    }
}

fn parent(args: &[String]) -> Res<bool> {
    let mut secs = 2.0;
    let mut netns = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--secs" => secs = it.next().ok_or("--secs S")?.parse()?,
            "--netns" => netns = Some(it.next().ok_or("--netns NAME")?.clone()),
            _ => {
                return Err(format!("usage: ring_bench [--secs S] [--netns NAME]; got {a}").into())
            }
        }
    }
    let hv_dir = std::env::temp_dir().join(format!("ring-bench-hv-{}", std::process::id()));
    std::fs::create_dir_all(&hv_dir)?;
    let r = run_all(secs, netns.as_deref(), &hv_dir);
    let _ = std::fs::remove_dir_all(&hv_dir);
    r
}

fn run_all(secs: f64, netns: Option<&str>, hv_dir: &Path) -> Res<bool> {
    let hv = Hypervisor::serve(hv_dir.join("hv.sock"))?;
    let plain = "1514 B frames";
    let gso = "64 KiB GSO TCPv4 (mss 1448)";
    let mut rows = Vec::new();
    for (p, name) in [
        (Link::FrontToBack, "netfront->netback (emulation)"),
        (Link::BackToFront, "netback->netfront (emulation)"),
    ] {
        for (shape, what) in [(Shape::Plain, plain), (Shape::Gso, gso)] {
            rows.push(Row {
                label: format!("{name}, {what}"),
                path: p,
                shape,
            });
        }
    }
    if netns.is_some() {
        rows.push(Row {
            label: format!("AF_PACKET over veth, {plain}"),
            path: Link::Veth,
            shape: Shape::Plain,
        });
        rows.push(Row {
            label: "AF_PACKET over veth, vnet_hdr GSO 64 KiB (mss 1448)".into(),
            path: Link::Veth,
            shape: Shape::Gso,
        });
    }
    println!(
        "ring_bench: {secs} s per row; sender and receiver in two separate processes, the \
         emulated hypervisor's broker a thread of the parent; every frame Ethernet/IPv4/TCP, \
         checked at the receiver"
    );
    if netns.is_none() {
        println!("(no --netns: AF_PACKET rows skipped)");
    }
    let w = 64;
    println!(
        "\n{:<w$} {:>10} {:>10} {:>6} {:>11} {:>8} {:>14}",
        "path", "sent", "received", "lost", "frames/s", "Gbit/s", "wire frames/s"
    );
    let mut all_ok = true;
    for row in &rows {
        match run_row(row, secs, hv.path(), netns) {
            Ok(o) => {
                let fps = o.got as f64 / o.elapsed;
                let gbit = o.got_bytes as f64 * 8.0 / o.elapsed / 1e9;
                let wire = match row.shape {
                    Shape::Plain => "-".to_string(),
                    Shape::Gso => fmt_rate(fps * GSO_SEGS as f64),
                };
                let lost = o.sent.saturating_sub(o.got);
                println!(
                    "{:<w$} {:>10} {:>10} {:>6} {:>11} {:>8.2} {:>14}",
                    row.label,
                    o.sent,
                    o.got,
                    lost,
                    fmt_rate(fps),
                    gbit,
                    wire
                );
                let bytes_ok = o.sent_bytes == o.got_bytes;
                if lost > 0 || !bytes_ok || o.bad > 0 || o.out_of_seq > 0 || o.refused > 0 {
                    all_ok = false;
                    println!(
                        "  ! {lost} frames lost, {} bytes sent / {} received, {} damaged, \
                         {} out of sequence, {} refused by the sender",
                        o.sent_bytes, o.got_bytes, o.bad, o.out_of_seq, o.refused
                    );
                }
            }
            Err(e) => {
                all_ok = false;
                println!("{:<w$} failed: {e}", row.label);
            }
        }
    }
    println!(
        "\nGbit/s counts frame bytes from the Ethernet header on (a super-frame's own bytes); \
         wire frames/s is super-frames/s x {GSO_SEGS} segments of 1514 B."
    );
    if all_ok {
        println!("every frame sent was received, in order, intact");
    }
    Ok(all_ok)
}
