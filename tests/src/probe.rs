//! The probes: small network clients run inside a qube's namespace (hidden `qubes-lab probe`
//! commands), each printing one line `STATUS MILLISECONDS DETAIL`:
//!
//! | status | meaning |
//! |---|---|
//! | `ok` | reached (TCP connected / HTTP answered / DNS answered) |
//! | `refused` | the destination answered no (TCP reset, ICMP port unreachable) |
//! | `rejected` | an ICMP error from the way (e.g. `icmp admin-prohibited from 10.137.0.6`) |
//! | `unreachable` | no route, or an unreachable error without ICMP seen |
//! | `timeout` | no answer in time |
//! | `error` | anything else (malformed answer, ...) |
//!
//! To name the ICMP error behind a failed connect, a probe also opens a raw ICMP socket and
//! looks for the destination-unreachable message that quotes its packet.

use std::io::{self, BufRead, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::cmd::{Error, Result};
use crate::dns;

/// What a probe found.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub status: String,
    pub ms: f64,
    pub detail: String,
}

impl Outcome {
    fn new(status: &str, started: Instant, detail: impl Into<String>) -> Self {
        Outcome {
            status: status.to_string(),
            ms: started.elapsed().as_secs_f64() * 1000.0,
            detail: detail.into(),
        }
    }

    pub fn ok(&self) -> bool {
        self.status == "ok"
    }

    /// `STATUS MS DETAIL`.
    pub fn line(&self) -> String {
        format!("{} {:.3} {}", self.status, self.ms, self.detail)
    }

    pub fn parse(line: &str) -> Option<Outcome> {
        let mut it = line.trim().splitn(3, ' ');
        let status = it.next()?.to_string();
        let ms = it.next()?.parse().ok()?;
        let detail = it.next().unwrap_or("").to_string();
        Some(Outcome { status, ms, detail })
    }
}

/// ICMP type 3 code names (as nft and ping spell them).
pub fn unreach_code_name(code: u8) -> String {
    match code {
        0 => "net-unreachable".into(),
        1 => "host-unreachable".into(),
        2 => "prot-unreachable".into(),
        3 => "port-unreachable".into(),
        4 => "frag-needed".into(),
        9 => "net-prohibited".into(),
        10 => "host-prohibited".into(),
        13 => "admin-prohibited".into(),
        n => format!("unreachable code {n}"),
    }
}

/// A raw ICMP socket that sees the ICMP errors coming to this namespace (root only; without
/// it the probes still work, just without naming the ICMP message).
struct IcmpWatch(Option<Socket>);

/// An ICMP error about one of our packets.
struct IcmpError {
    from: Ipv4Addr,
    kind: u8,
    code: u8,
}

impl IcmpError {
    fn describe(&self) -> String {
        match self.kind {
            3 => format!("icmp {} from {}", unreach_code_name(self.code), self.from),
            11 => format!("icmp ttl-exceeded from {}", self.from),
            t => format!("icmp type {t} code {} from {}", self.code, self.from),
        }
    }
}

impl IcmpWatch {
    fn open() -> Self {
        let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
            .ok()
            .filter(|s| s.set_nonblocking(true).is_ok());
        IcmpWatch(sock)
    }

    /// The first ICMP error quoting a packet to `dst` (`proto`, destination port `dport`),
    /// waiting at most `wait` for it.
    fn find(&self, dst: Ipv4Addr, proto: u8, dport: u16, wait: Duration) -> Option<IcmpError> {
        let sock = self.0.as_ref()?;
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 2048];
        loop {
            match (&*sock).read(&mut buf) {
                Ok(n) => {
                    if let Some(e) = parse_icmp_error(&buf[..n], dst, proto, dport) {
                        return Some(e);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(_) => return None,
            }
        }
    }
}

fn parse_icmp_error(pkt: &[u8], dst: Ipv4Addr, proto: u8, dport: u16) -> Option<IcmpError> {
    let ihl = usize::from(pkt.first()? & 0x0f) * 4;
    if pkt.len() < ihl + 8 + 20 || pkt[9] != 1 {
        return None;
    }
    let from = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
    let icmp = &pkt[ihl..];
    let (kind, code) = (icmp[0], icmp[1]);
    if kind != 3 && kind != 11 {
        return None;
    }
    let q = &icmp[8..];
    let qihl = usize::from(q[0] & 0x0f) * 4;
    if q.len() < qihl + 4 || q[9] != proto {
        return None;
    }
    let qdst = Ipv4Addr::new(q[16], q[17], q[18], q[19]);
    let qport = u16::from_be_bytes([q[qihl + 2], q[qihl + 3]]);
    (qdst == dst && qport == dport).then_some(IcmpError { from, kind, code })
}

/// What a failed connect or receive means, with the ICMP error behind it when one came.
fn classify(
    e: &io::Error,
    watch: &IcmpWatch,
    dst: SocketAddrV4,
    proto: u8,
    started: Instant,
    timeout: Duration,
) -> Outcome {
    use io::ErrorKind as K;
    match e.kind() {
        K::TimedOut | K::WouldBlock => Outcome::new(
            "timeout",
            started,
            format!("no answer in {} ms", timeout.as_millis()),
        ),
        _ => {
            // The time is when the error came, not when we finished looking for its ICMP.
            let at = |status: &str, detail: String| Outcome::new(status, started, detail);
            let failed = at("", String::new());
            let icmp = watch.find(*dst.ip(), proto, dst.port(), Duration::from_millis(50));
            let o = match (e.kind(), icmp) {
                (K::ConnectionRefused, Some(i)) => at("refused", i.describe()),
                (K::ConnectionRefused, None) => at("refused", "tcp reset".into()),
                (_, Some(i)) => at("rejected", i.describe()),
                (K::NetworkUnreachable, None) => at("unreachable", "no route".into()),
                (K::HostUnreachable, None) => at("unreachable", "host unreachable".into()),
                (_, None) => at("error", e.to_string()),
            };
            Outcome { ms: failed.ms, ..o }
        }
    }
}

/// `probe tcp ADDR:PORT`: connect (and with `http`, GET / and read the status line).
pub fn tcp(dst: SocketAddrV4, timeout: Duration, http: bool) -> Outcome {
    let watch = IcmpWatch::open();
    let started = Instant::now();
    let mut stream = match TcpStream::connect_timeout(&SocketAddr::V4(dst), timeout) {
        Ok(s) => s,
        Err(e) => return classify(&e, &watch, dst, 6, started, timeout),
    };
    if !http {
        return Outcome::new("ok", started, "connected");
    }
    let remaining = timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(1));
    let _ = stream.set_read_timeout(Some(remaining));
    let req = format!(
        "GET / HTTP/1.0\r\nHost: {}\r\nUser-Agent: qubes-lab\r\n\r\n",
        dst.ip()
    );
    if let Err(e) = stream.write_all(req.as_bytes()) {
        return Outcome::new("error", started, format!("send: {e}"));
    }
    let mut resp = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                resp.extend_from_slice(&buf[..n]);
                if resp.len() > 64 * 1024 {
                    break;
                }
            }
            Err(e) => {
                if resp.is_empty() {
                    return classify(&e, &watch, dst, 6, started, timeout);
                }
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&resp);
    let status_line = text.lines().next().unwrap_or("").trim().to_string();
    match status_line.split_once(' ') {
        Some((proto, rest)) if proto.starts_with("HTTP/") => {
            let st = if rest.starts_with("200") {
                "ok"
            } else {
                "error"
            };
            Outcome::new(st, started, format!("http {rest}"))
        }
        _ => Outcome::new("error", started, format!("not HTTP: {status_line:?}")),
    }
}

/// `probe dns NAME --server IP`: one A query over UDP.
pub fn dns(name: &str, server: Ipv4Addr, qtype: u16, timeout: Duration) -> Outcome {
    let watch = IcmpWatch::open();
    let started = Instant::now();
    let dst = SocketAddrV4::new(server, 53);
    let sock = match UdpSocket::bind("0.0.0.0:0") {
        Ok(s) => s,
        Err(e) => return Outcome::new("error", started, format!("bind: {e}")),
    };
    if let Err(e) = sock.connect(dst) {
        return classify(&e, &watch, dst, 17, started, timeout);
    }
    let id = (std::process::id() as u16) ^ (started.elapsed().subsec_nanos() as u16);
    let q = match dns::query(id, name, qtype) {
        Ok(q) => q,
        Err(e) => return Outcome::new("error", started, e),
    };
    if let Err(e) = sock.send(&q) {
        return classify(&e, &watch, dst, 17, started, timeout);
    }
    let mut buf = [0u8; 1500];
    loop {
        let remaining = timeout.saturating_sub(started.elapsed());
        if remaining.is_zero() {
            return Outcome::new(
                "timeout",
                started,
                format!("no answer in {} ms", timeout.as_millis()),
            );
        }
        let _ = sock.set_read_timeout(Some(remaining));
        match sock.recv(&mut buf) {
            Ok(n) => match dns::parse_answer(id, &buf[..n]) {
                Err(e) if e == "answer to another query" => continue,
                Err(e) => return Outcome::new("error", started, e),
                Ok(ans) if qtype != dns::TYPE_A => {
                    return Outcome::new("ok", started, format!("{} records", ans.records))
                }
                Ok(ans) if ans.a.is_empty() => {
                    return Outcome::new("error", started, "no A record")
                }
                Ok(ans) => {
                    let list: Vec<String> = ans.a.iter().map(Ipv4Addr::to_string).collect();
                    return Outcome::new("ok", started, list.join(","));
                }
            },
            Err(e) => return classify(&e, &watch, dst, 17, started, timeout),
        }
    }
}

/// The Internet checksum.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4/UDP packet from `src` to `dst` (any source: this is how a forged packet looks).
pub fn udp_packet(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0x51, 0xab, 0x40, 0, 64, 17, 0, 0]); // id, DF, ttl 64, udp
    p.extend_from_slice(&src.ip().octets());
    p.extend_from_slice(&dst.ip().octets());
    let ck = checksum(&p[..20]);
    p[10..12].copy_from_slice(&ck.to_be_bytes());
    let mut udp = Vec::with_capacity(udp_len);
    udp.extend_from_slice(&src.port().to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(12 + udp_len);
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
    pseudo.extend_from_slice(&udp);
    let uck = match checksum(&pseudo) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&uck.to_be_bytes());
    p.extend_from_slice(&udp);
    p
}

/// An IPv4/TCP SYN from `src` to `dst` (no options, window 64240).
pub fn tcp_syn_packet(src: SocketAddrV4, dst: SocketAddrV4, seq: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    p.extend_from_slice(&[0x45, 0, 0, 40]); // version, IHL, total length 40
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]); // id, DF, ttl 64, tcp
    p.extend_from_slice(&src.ip().octets());
    p.extend_from_slice(&dst.ip().octets());
    let ck = checksum(&p[..20]);
    p[10..12].copy_from_slice(&ck.to_be_bytes());
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&src.port().to_be_bytes());
    tcp.extend_from_slice(&dst.port().to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0, 0x50, 0x02]); // ack 0, data offset 5, SYN
    tcp.extend_from_slice(&64240u16.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    let tck = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&tck.to_be_bytes());
    p.extend_from_slice(&tcp);
    p
}

/// `probe syn-flood`: TCP SYNs to `dst` from this namespace's own address (the one routed
/// toward `dst`), a new source port each (1024 upward, wrapping), `rate` per second for
/// `duration`, through a raw IP socket; prints `sent N SYNs from SRC to DST in MS ms`. Each
/// SYN opens a flow in the firewall; with the namespace's own resets dropped (the caller's
/// nftables rule), the server's SYN-ACKs leave them half-open.
pub fn syn_flood(dst: SocketAddrV4, rate: u32, duration: Duration) -> Result<()> {
    let route = UdpSocket::bind("0.0.0.0:0").map_err(|e| Error(format!("udp socket: {e}")))?;
    route
        .connect(dst)
        .map_err(|e| Error(format!("no route to {dst}: {e}")))?;
    let src = match route.local_addr() {
        Ok(SocketAddr::V4(a)) => *a.ip(),
        Ok(a) => return Err(Error(format!("source address {a} is not IPv4"))),
        Err(e) => return Err(Error(format!("source address toward {dst}: {e}"))),
    };
    let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255)))
        .map_err(|e| Error(format!("raw socket: {e} (needs root)")))?;
    let to = SockAddr::from(SocketAddrV4::new(*dst.ip(), 0));
    let start = Instant::now();
    let mut sent: u64 = 0;
    while start.elapsed() < duration {
        // Paced: catch up with rate x elapsed, then sleep a millisecond.
        let due = (start.elapsed().as_secs_f64() * f64::from(rate)) as u64;
        while sent < due {
            let port = 1024 + (sent % 64_512) as u16;
            let pkt = tcp_syn_packet(SocketAddrV4::new(src, port), dst, 0x5eed_0000 ^ sent as u32);
            match sock.send_to(&pkt, &to) {
                Ok(_) => {}
                // ENOBUFS (105), a full queue: the way is slower than the flood; skip this one.
                Err(e)
                    if e.raw_os_error() == Some(105) || e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Error(format!("send {src}:{port} -> {dst}: {e}"))),
            }
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    println!(
        "sent {sent} SYNs from {src} to {dst} in {} ms",
        start.elapsed().as_millis()
    );
    Ok(())
}

/// `probe spoof`: sends UDP datagrams with any source address through a raw IP socket
/// (`IPPROTO_RAW`, the header is ours), routed like any packet of the namespace.
pub fn spoof(src: Ipv4Addr, dst: SocketAddrV4, payload: &str, count: u32) -> Result<()> {
    let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255)))
        .map_err(|e| Error(format!("raw socket: {e} (needs root)")))?;
    let pkt = udp_packet(SocketAddrV4::new(src, 40000), dst, payload.as_bytes());
    let to = SockAddr::from(SocketAddrV4::new(*dst.ip(), 0));
    for _ in 0..count {
        sock.send_to(&pkt, &to)
            .map_err(|e| Error(format!("send {src} -> {dst}: {e}")))?;
    }
    println!("sent {count} from {src} to {dst}: {payload}");
    Ok(())
}

/// `probe udp-listen`: prints `listening ADDR`, then `from SRC PAYLOAD` for every datagram,
/// for `duration`.
pub fn udp_listen(addr: SocketAddrV4, duration: Duration) -> Result<()> {
    let sock = UdpSocket::bind(addr).map_err(|e| Error(format!("bind {addr}: {e}")))?;
    let mut out = io::stdout();
    let _ = writeln!(out, "listening {addr}");
    let _ = out.flush();
    let deadline = Instant::now() + duration;
    let mut buf = [0u8; 2048];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            break;
        }
        let _ = sock.set_read_timeout(Some(remaining));
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                let _ = writeln!(out, "from {from} {}", String::from_utf8_lossy(&buf[..n]));
                let _ = out.flush();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(e) => return Err(Error(format!("recv: {e}"))),
        }
    }
    let _ = writeln!(out, "done");
    Ok(())
}

/// `probe refused-burst`: sends `count` UDP datagrams to `dst` from one socket, then counts
/// the ICMP errors about them (type 3 quoting UDP to `dst`) that arrive by `wait` after the
/// last. Prints `sent N errors K`.
pub fn refused_burst(dst: SocketAddrV4, count: u32, wait: Duration) -> Result<()> {
    let watch = IcmpWatch::open();
    let Some(raw) = watch.0.as_ref() else {
        return Err(Error(
            "cannot open a raw ICMP socket (needs CAP_NET_RAW)".into(),
        ));
    };
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| Error(format!("udp socket: {e}")))?;
    let mut sent = 0u32;
    for i in 0..count {
        // Unconnected: the errors the kernel would turn into ECONNREFUSED on a connected
        // socket are not consumed here, only read from the raw socket.
        if sock.send_to(&i.to_be_bytes(), dst).is_ok() {
            sent += 1;
        }
    }
    let deadline = Instant::now() + wait;
    let mut errors = 0u32;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        match (&*raw).read(&mut buf) {
            Ok(n) => {
                if parse_icmp_error(&buf[..n], *dst.ip(), 17, dst.port())
                    .is_some_and(|e| e.kind == 3)
                {
                    errors += 1;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(Error(format!("raw ICMP socket: {e}"))),
        }
    }
    println!("sent {sent} errors {errors}");
    Ok(())
}

/// `probe echo`: connects, prints `connected`; then sends every line of stdin and prints
/// `echo ok LINE`, `no answer` (its echo not back within the timeout) or `error ...` for each.
/// Each line waits for its own echo; echoes of earlier lines that come with it are printed on
/// the same line (`echo ok two three`).
pub fn echo(dst: SocketAddrV4, timeout: Duration) -> Result<bool> {
    let started = Instant::now();
    let mut out = io::stdout();
    let watch = IcmpWatch::open();
    let mut stream = match TcpStream::connect_timeout(&SocketAddr::V4(dst), timeout) {
        Ok(s) => s,
        Err(e) => {
            let o = classify(&e, &watch, dst, 6, started, timeout);
            let _ = writeln!(out, "error {}", o.line());
            return Ok(false);
        }
    };
    let _ = writeln!(out, "connected");
    let _ = out.flush();
    let _ = stream.set_read_timeout(Some(timeout));
    let stdin = io::stdin();
    for line in stdin.lock().lines() {
        let line = line.map_err(|e| Error(format!("stdin: {e}")))?;
        let msg = format!("{line}\n");
        if let Err(e) = stream.write_all(msg.as_bytes()) {
            let _ = writeln!(out, "error send: {e}");
            let _ = out.flush();
            continue;
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        let result = loop {
            match stream.read(&mut buf) {
                Ok(0) => break format!("error closed after {} bytes", got.len()),
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    // Reading until this line's own echo: stopping at any line end would
                    // leave a late echo of an earlier line to answer this one, and every
                    // line after would be answered one behind.
                    if got.ends_with(msg.as_bytes()) {
                        // Lines held back by a stalled connection come together: one
                        // output line for all of them.
                        let text = String::from_utf8_lossy(&got).trim_end().replace('\n', " ");
                        break format!("echo ok {text}");
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break "no answer".to_string()
                }
                Err(e) => break format!("error recv: {e}"),
            }
        };
        let _ = writeln!(out, "{result}");
        let _ = out.flush();
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_lines_round_trip() {
        let o = Outcome {
            status: "rejected".into(),
            ms: 0.25,
            detail: "icmp admin-prohibited from 10.137.0.6".into(),
        };
        assert_eq!(
            o.line(),
            "rejected 0.250 icmp admin-prohibited from 10.137.0.6"
        );
        assert_eq!(Outcome::parse(&o.line()), Some(o));
        assert_eq!(
            Outcome::parse("ok 1.5"),
            Some(Outcome {
                status: "ok".into(),
                ms: 1.5,
                detail: String::new()
            })
        );
        assert_eq!(Outcome::parse("garbage"), None);
    }

    #[test]
    fn forged_packet_is_well_formed() {
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 137, 0, 11), 40000);
        let dst = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 10), 9999);
        let p = udp_packet(src, dst, b"hi");
        assert_eq!(p.len(), 30);
        assert_eq!(checksum(&p[..20]), 0, "IP header checksum verifies");
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&p[12..20]);
        pseudo.extend_from_slice(&[0, 17, 0, 10]);
        pseudo.extend_from_slice(&p[20..]);
        assert_eq!(checksum(&pseudo), 0, "UDP checksum verifies");
    }

    #[test]
    fn icmp_errors_are_matched_to_our_packet() {
        // An ICMP admin-prohibited from 10.137.0.6 quoting a TCP SYN to 198.18.0.10:80.
        let mut pkt = vec![
            0x45, 0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0, 10, 137, 0, 6, 10, 137, 0, 12,
        ];
        pkt.extend_from_slice(&[3, 13, 0, 0, 0, 0, 0, 0]);
        pkt.extend_from_slice(&[0x45, 0, 0, 60, 0, 0, 0x40, 0, 64, 6, 0, 0]);
        pkt.extend_from_slice(&[10, 137, 0, 12, 198, 18, 0, 10]);
        pkt.extend_from_slice(&[0x9c, 0x40, 0, 80, 0, 0, 0, 0]);
        let dst = Ipv4Addr::new(198, 18, 0, 10);
        let e = parse_icmp_error(&pkt, dst, 6, 80).expect("matches");
        assert_eq!(e.describe(), "icmp admin-prohibited from 10.137.0.6");
        assert!(parse_icmp_error(&pkt, dst, 6, 443).is_none());
        assert!(parse_icmp_error(&pkt, dst, 17, 80).is_none());
        assert!(parse_icmp_error(&pkt[..30], dst, 6, 80).is_none());
    }
}
