//! Engine throughput, new-flow rate, memory per flow and allocations per packet.
//!
//! `cargo bench -p qubes-engine --bench engine`. std-only timing (`Instant`, `black_box`), one
//! core, median of several rounds. Prints one table, configurations side by side:
//!
//! - established-flow forwarding of 64-byte and 1500-byte Ethernet frames (frame length as
//!   handed to the engine, no FCS; TCP/IPv4 with ACK|PSH and a payload that fills the frame), in
//!   both directions, over 4096 established flows (TCP handshake done through the engine first,
//!   so the flows are `Established` and assured) spread round-robin over the clients;
//! - new flows per second: every packet a TCP SYN with a 5-tuple never seen in that round, all
//!   accepted. The table is the default 65,536 flows; each round opens 50,000 flows (no eviction,
//!   no table growth), and between rounds, untimed, `tick` 121 s later expires them (SYN_SENT
//!   times out after 120 s) while the assured established flows stay;
//! - with 1 and 1,000 clients, and 10 and 10,000 rules per client. Rule sets are seeded
//!   and realistic: mostly `proto` + `dst4` prefix + `dstports`, accept and drop mixed, some
//!   port-22 drops inside the traffic's own /15, a few address-less rules; the last rule is the
//!   policy (`drop`). The traffic is accepted by the LAST numbered rule (the one just before the
//!   policy), `action=accept proto=tcp dst4=198.18.0.0/15 dstports=443-443`, so rule lookup is
//!   as deep as the rule set goes. Rules are compiled once per client; the 1,000 x 10,000 setup
//!   is estimated from a 10-client probe first and skipped if it would take over 120 s;
//! - conntrack memory per flow: `ConnTrack::bytes_per_flow`, and the measured RSS growth
//!   (`/proc/self/statm`) while a fresh engine fills 100,000 flows;
//! - allocations per packet, counted by a wrapping global allocator (target 0 on the
//!   established path).
//!
//! The engine rewrites a forwarded frame in place (MACs, addresses, ports, TTL, checksums), so
//! every packet first restores the frame's first 64 bytes (all the bytes the engine may touch:
//! Ethernet + IPv4 + TCP headers end at byte 54) from a pristine copy; that the rest is
//! untouched is checked once per frame. The restore is part of the timed loop, and its cost
//! (the same loop without `handle`) is reported on its own row.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use qubes_engine::config::{
    ClientConfig, EngineConfig, FragLimits, Mac, UplinkConfig, UplinkMode, DEFAULT_CONNTRACK_MAX,
    GATEWAY_MAC, VIRTUAL_DNS,
};
use qubes_engine::engine::{Engine, IfaceId, Outbox, Verdict, UPLINK};
use qubes_engine::Instant as EngineInstant;

// -------------------------------------------------------------------------------------------
// Counting allocator

/// Every allocation and reallocation the process makes.
static ALLOCS: AtomicU64 = AtomicU64::new(0);

/// The system allocator, counting calls.
struct Counting;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is `System`'s; the counter is a relaxed atomic and never allocates.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as is (see the impl).
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as is (see the impl).
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as is (see the impl).
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is (see the impl).
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.load(Ordering::Relaxed)
}

// -------------------------------------------------------------------------------------------
// Parameters

/// Timed rounds per measurement; the median is reported.
const ROUNDS: usize = 7;
/// Each timed round runs at least this long (whole passes over the flows).
const ROUND_TIME: Duration = Duration::from_millis(40);
/// Established flows, spread round-robin over the clients.
const FLOWS: usize = 4096;
/// New flows opened per round.
const NEW_PER_ROUND: usize = 50_000;
/// Flows filled for the RSS measurement.
const RSS_FLOWS: usize = 100_000;
/// Bytes restored before every packet: all headers the engine may rewrite.
const HDR: usize = 64;
/// Setup budget for a configuration (extrapolated from a probe for the largest one).
const SETUP_BUDGET: Duration = Duration::from_secs(120);
/// Clients in the probe that estimates the 1,000 x 10,000 setup.
const PROBE_CLIENTS: usize = 10;

const OUR_IP: [u8; 4] = [10, 137, 0, 6];
const NETVM_IP: [u8; 4] = [10, 137, 0, 5];
const OUR_MAC: Mac = [0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x06];
const NETVM_MAC: Mac = [0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x05];
/// The traffic's destinations: 198.18.0.0/15 (RFC 2544 benchmarking range).
const TRAFFIC_NET: u32 = 0xc612_0000;
const TRAFFIC_LEN: u32 = 15;
const TRAFFIC_ADDRS: u32 = 1 << (32 - TRAFFIC_LEN);
const TRAFFIC_PORT: u16 = 443;
/// `now` of the first packet: 1 s, in nanoseconds.
const T0: u64 = 1_000_000_000;
const SEC: u64 = 1_000_000_000;

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const TCP_PSH_ACK: u8 = 0x18;
const TCP_SYN_ACK: u8 = 0x12;

// -------------------------------------------------------------------------------------------
// Deterministic data

/// xorshift64*: the same rule sets and flows on every run.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

fn ip4(a: u32) -> String {
    let b = a.to_be_bytes();
    format!("{}.{}.{}.{}", b[0], b[1], b[2], b[3])
}

/// A random prefix that does not overlap the traffic's /15 (so it can never shadow the late
/// accept rule).
fn filler_prefix(rng: &mut Rng) -> (u32, u32) {
    loop {
        let len = rng.pick(&[8u32, 12, 16, 16, 20, 24, 24, 24, 28, 32, 32]);
        let addr = (rng.next() as u32) & (u32::MAX << (32 - len));
        let common = len.min(TRAFFIC_LEN);
        let shift = 32 - common;
        if addr >> shift != TRAFFIC_NET >> shift {
            return (addr, len);
        }
    }
}

/// One client's QubesDB rule entries: `rules` rules in all, the policy (`drop`) last; the
/// traffic (TCP to 198.18.0.0/15 port 443) is accepted by the last numbered rule.
fn rule_set(seed: u64, rules: usize) -> Vec<(String, String)> {
    const PORTS: [u16; 10] = [22, 25, 80, 110, 143, 993, 3306, 5432, 8080, 8443];
    let mut rng = Rng::new(seed);
    let mut v = Vec::with_capacity(rules);
    let numbered = rules - 1;
    for n in 0..numbered - 1 {
        let action = if rng.below(3) == 0 { "drop" } else { "accept" };
        let rule = match rng.below(100) {
            0..=69 => {
                let (a, l) = filler_prefix(&mut rng);
                let proto = rng.pick(&["tcp", "tcp", "udp"]);
                let p = rng.pick(&PORTS);
                let hi = if rng.below(4) == 0 { p + 10 } else { p };
                format!(
                    "action={action} proto={proto} dst4={}/{l} dstports={p}-{hi}",
                    ip4(a)
                )
            }
            70..=84 => {
                let (a, l) = filler_prefix(&mut rng);
                format!("action={action} dst4={}/{l}", ip4(a))
            }
            85..=94 => {
                // Inside the traffic's /15, other ports: the classifier's tree has a deeper node
                // there, which the traffic's lookups walk through.
                let net = TRAFFIC_NET | ((rng.below(512) as u32) << 8);
                format!("action=drop proto=tcp dst4={}/24 dstports=22-22", ip4(net))
            }
            _ => rng
                .pick(&[
                    "action=accept proto=icmp",
                    "action=accept specialtarget=dns",
                    "action=accept proto=udp dstports=123-123",
                    "action=drop proto=udp dstports=137-139",
                ])
                .to_string(),
        };
        v.push((format!("{n:04}"), rule));
    }
    v.push((
        format!("{:04}", numbered - 1),
        format!(
            "action=accept proto=tcp dst4={}/{TRAFFIC_LEN} dstports={TRAFFIC_PORT}-{TRAFFIC_PORT}",
            ip4(TRAFFIC_NET)
        ),
    ));
    v.push(("policy".to_string(), "drop".to_string()));
    v
}

fn client_ip(i: usize) -> [u8; 4] {
    (u32::from_be_bytes([10, 137, 0, 100]) + i as u32).to_be_bytes()
}

fn client_mac(i: usize) -> Mac {
    [0x00, 0x16, 0x3e, 0x5e, (i >> 8) as u8, i as u8]
}

fn config(clients: usize, rules: usize) -> EngineConfig {
    EngineConfig {
        mode: UplinkMode::Masquerade,
        client_gateway: None,
        client_gateway6: None,
        dns_redirect: Vec::new(),
        uplink: UplinkConfig {
            name: "eth0".into(),
            mac: OUR_MAC,
            ip: OUR_IP.into(),
            gateway: NETVM_IP.into(),
            ip6: None,
            gateway6: None,
            mtu: 1500,
        },
        dns: VIRTUAL_DNS.iter().map(|&a| a.into()).collect(),
        clients: (0..clients)
            .map(|i| ClientConfig {
                vif: format!("vif{}.0", i + 2),
                ip: client_ip(i).into(),
                ip6: None,
                mac: client_mac(i),
                mtu: 1500,
                rules: rule_set(i as u64 + 1, rules),
                rules6: Vec::new(),
                visible: None,
            })
            .collect(),
        conntrack_max: DEFAULT_CONNTRACK_MAX,
        seed: 42,
        frag: FragLimits::default(),
    }
}

// -------------------------------------------------------------------------------------------
// Frames

fn csum_add(mut acc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        acc += u32::from(*b) << 8;
    }
    acc
}

fn csum_fin(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// A TCP/IPv4 segment filling `buf` exactly (Ethernet 14 + IPv4 20 + TCP 20 + payload), with
/// correct IPv4 header and TCP checksums.
struct Tcp4 {
    dst_mac: Mac,
    src_mac: Mac,
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    flags: u8,
    /// Sequence and acknowledgement numbers: the client starts at 1000, the remote at 5000,
    /// and every later segment of a side carries the same numbers, so all of them stay inside
    /// the windows the engine tracks.
    seq: u32,
    ack: u32,
}

/// The client's initial sequence number in the bench's connections; the remote's is
/// `REMOTE_ISN`.
const CLIENT_ISN: u32 = 1000;
const REMOTE_ISN: u32 = 5000;

impl Tcp4 {
    fn write(&self, buf: &mut [u8]) {
        assert!(buf.len() >= 54 && buf.len() - 14 <= 65_535);
        let ip_len = (buf.len() - 14) as u16;
        buf[0..6].copy_from_slice(&self.dst_mac);
        buf[6..12].copy_from_slice(&self.src_mac);
        buf[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = &mut buf[14..34];
        ip.copy_from_slice(&[
            0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ]);
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        ip[12..16].copy_from_slice(&self.src);
        ip[16..20].copy_from_slice(&self.dst);
        let hc = csum_fin(csum_add(0, ip));
        ip[10..12].copy_from_slice(&hc.to_be_bytes());
        for (i, b) in buf[54..].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(7);
        }
        let t = &mut buf[34..54];
        t.fill(0);
        t[0..2].copy_from_slice(&self.sport.to_be_bytes());
        t[2..4].copy_from_slice(&self.dport.to_be_bytes());
        t[4..8].copy_from_slice(&self.seq.to_be_bytes());
        t[8..12].copy_from_slice(&self.ack.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = self.flags;
        t[14..16].copy_from_slice(&65_535u16.to_be_bytes());
        let seg_len = u32::from(ip_len) - 20;
        let mut acc = csum_add(0, &self.src);
        acc = csum_add(acc, &self.dst);
        acc += 6 + seg_len;
        let c = csum_fin(csum_add(acc, &buf[34..]));
        buf[50..52].copy_from_slice(&c.to_be_bytes());
    }

    fn frame(&self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.write(&mut v);
        v
    }
}

/// An ARP reply from the netvm, so the engine learns its MAC before the measurements.
fn netvm_arp_reply() -> Vec<u8> {
    let mut f = vec![0u8; 42];
    f[0..6].copy_from_slice(&OUR_MAC);
    f[6..12].copy_from_slice(&NETVM_MAC);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    f[22..28].copy_from_slice(&NETVM_MAC);
    f[28..32].copy_from_slice(&NETVM_IP);
    f[32..38].copy_from_slice(&OUR_MAC);
    f[38..42].copy_from_slice(&OUR_IP);
    f
}

// -------------------------------------------------------------------------------------------
// The bench engine

/// One established flow: its client, its 5-tuple and the NAT port the engine chose.
#[derive(Clone, Copy)]
struct Flow {
    client: usize,
    sport: u16,
    dst: [u8; 4],
    nat_port: u16,
}

struct Bench {
    engine: Engine,
    out: Outbox,
    now: u64,
    clients: usize,
    flows: Vec<Flow>,
}

fn iface(client: usize) -> IfaceId {
    client as IfaceId + 1
}

fn traffic_dst(k: usize) -> [u8; 4] {
    (TRAFFIC_NET + 1 + (k as u32 % (TRAFFIC_ADDRS - 2))).to_be_bytes()
}

impl Bench {
    fn new(engine: Engine, clients: usize) -> Self {
        let mut b = Bench {
            engine,
            out: Outbox::new(),
            now: T0,
            clients,
            flows: Vec::new(),
        };
        let mut arp = netvm_arp_reply();
        let v = b.handle(UPLINK, &mut arp);
        assert_eq!(v, Verdict::Consumed);
        assert!(b.engine.netvm_mac().1, "netvm MAC learned");
        b
    }

    fn handle(&mut self, iface: IfaceId, frame: &mut [u8]) -> Verdict {
        self.out.clear();
        let v = self.engine.handle(
            EngineInstant::from_nanos(self.now),
            iface,
            frame,
            &mut self.out,
        );
        self.now += 1;
        v
    }

    fn client_segment(&self, f: &Flow, flags: u8) -> Tcp4 {
        Tcp4 {
            dst_mac: GATEWAY_MAC,
            src_mac: client_mac(f.client),
            src: client_ip(f.client),
            dst: f.dst,
            sport: f.sport,
            dport: TRAFFIC_PORT,
            flags,
            seq: if flags == TCP_SYN {
                CLIENT_ISN
            } else {
                CLIENT_ISN + 1
            },
            ack: if flags == TCP_SYN { 0 } else { REMOTE_ISN + 1 },
        }
    }

    fn remote_segment(&self, f: &Flow, flags: u8) -> Tcp4 {
        Tcp4 {
            dst_mac: OUR_MAC,
            src_mac: NETVM_MAC,
            src: f.dst,
            dst: OUR_IP,
            sport: TRAFFIC_PORT,
            dport: f.nat_port,
            flags,
            seq: if flags == TCP_SYN_ACK {
                REMOTE_ISN
            } else {
                REMOTE_ISN + 1
            },
            ack: CLIENT_ISN + 1,
        }
    }

    /// Opens `FLOWS` TCP connections through the engine (SYN, SYN+ACK, ACK), round-robin over
    /// the clients, and learns their NAT ports.
    fn open_flows(&mut self) {
        for j in 0..FLOWS {
            let mut f = Flow {
                client: j % self.clients,
                sport: 10_000 + (j / self.clients) as u16,
                dst: traffic_dst(j.wrapping_mul(7919)),
                nat_port: 0,
            };
            let mut syn = self.client_segment(&f, TCP_SYN).frame(64);
            assert_eq!(
                self.handle(iface(f.client), &mut syn),
                Verdict::Forward(UPLINK)
            );
            f.nat_port = u16::from_be_bytes([syn[34], syn[35]]);
            let mut syn_ack = self.remote_segment(&f, TCP_SYN_ACK).frame(64);
            let v = self.handle(UPLINK, &mut syn_ack);
            assert_eq!(v, Verdict::Forward(iface(f.client)));
            let mut ack = self.client_segment(&f, TCP_ACK).frame(64);
            assert_eq!(
                self.handle(iface(f.client), &mut ack),
                Verdict::Forward(UPLINK)
            );
            self.flows.push(f);
        }
        let assured = self
            .engine
            .conntrack()
            .iter()
            .filter(|(_, f)| f.assured)
            .count();
        assert_eq!(
            assured, FLOWS,
            "every benchmark flow is established and assured"
        );
    }
}

/// The frames of one established-path measurement: one buffer per flow (back to back), the
/// pristine first `HDR` bytes of each, the interface each arrives on and where it must go.
struct FrameSet {
    size: usize,
    work: Vec<u8>,
    pristine: Vec<[u8; HDR]>,
    ifaces: Vec<IfaceId>,
    to: Vec<IfaceId>,
}

impl FrameSet {
    fn new(b: &Bench, size: usize, up: bool) -> Self {
        let mut set = FrameSet {
            size,
            work: vec![0u8; size * b.flows.len()],
            pristine: Vec::with_capacity(b.flows.len()),
            ifaces: Vec::with_capacity(b.flows.len()),
            to: Vec::with_capacity(b.flows.len()),
        };
        for (j, f) in b.flows.iter().enumerate() {
            let w = &mut set.work[j * size..(j + 1) * size];
            if up {
                b.client_segment(f, TCP_PSH_ACK).write(w);
                set.ifaces.push(iface(f.client));
                set.to.push(UPLINK);
            } else {
                b.remote_segment(f, TCP_PSH_ACK).write(w);
                set.ifaces.push(UPLINK);
                set.to.push(iface(f.client));
            }
            let mut h = [0u8; HDR];
            h.copy_from_slice(&w[..HDR]);
            set.pristine.push(h);
        }
        set
    }

    /// Every frame once, untimed: it is forwarded where it should go, and the engine touched
    /// nothing past the restored header bytes.
    fn check(&mut self, b: &mut Bench) {
        for j in 0..self.pristine.len() {
            let before = self.work[j * self.size..(j + 1) * self.size].to_vec();
            let w = &mut self.work[j * self.size..(j + 1) * self.size];
            w[..HDR].copy_from_slice(&self.pristine[j]);
            b.out.clear();
            let v = b.engine.handle(
                EngineInstant::from_nanos(b.now),
                self.ifaces[j],
                w,
                &mut b.out,
            );
            b.now += 1;
            assert_eq!(v, Verdict::Forward(self.to[j]), "flow {j} forwarded");
            assert_eq!(b.out.frame_count(), 0, "nothing else sent");
            assert_eq!(
                w[HDR..],
                before[HDR..],
                "engine wrote past the first {HDR} bytes"
            );
            assert_ne!(w[..HDR], self.pristine[j][..], "frame rewritten");
        }
    }

    /// One timed pass: restore, handle. Returns how many were forwarded where expected.
    fn pass(&mut self, b: &mut Bench) -> usize {
        let mut ok = 0;
        for (j, w) in self.work.chunks_exact_mut(self.size).enumerate() {
            w[..HDR].copy_from_slice(&self.pristine[j]);
            b.out.clear();
            let v = b.engine.handle(
                EngineInstant::from_nanos(b.now),
                self.ifaces[j],
                w,
                &mut b.out,
            );
            b.now += 1;
            ok += usize::from(black_box(v) == Verdict::Forward(self.to[j]));
        }
        ok
    }

    /// The same loop without the engine: the cost of the restore.
    fn pass_restore_only(&mut self) {
        for (j, w) in self.work.chunks_exact_mut(self.size).enumerate() {
            w[..HDR].copy_from_slice(&self.pristine[j]);
            black_box(&mut *w);
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// How many passes of `per_pass` packets make a round of at least `ROUND_TIME`, from one
/// (warm-up) pass.
fn calibrate(mut pass: impl FnMut()) -> usize {
    let t = Instant::now();
    pass();
    let one = t.elapsed().max(Duration::from_micros(1));
    (ROUND_TIME.as_nanos() / one.as_nanos()).max(1) as usize
}

struct Established {
    ns: f64,
    allocs: f64,
    restore_ns: f64,
}

/// The four established-path measurements (64 B and 1500 B, both directions). Rounds are
/// interleaved (round 1 of each, round 2 of each, ...) so a burst of load from elsewhere on the
/// machine spreads over all of them instead of skewing one.
fn measure_established(b: &mut Bench) -> [Established; 4] {
    let mut sets = [
        FrameSet::new(b, 64, true),
        FrameSet::new(b, 64, false),
        FrameSet::new(b, 1500, true),
        FrameSet::new(b, 1500, false),
    ];
    for s in &mut sets {
        s.check(b);
    }
    let mut bad = 0usize;
    let passes: Vec<usize> = sets
        .iter_mut()
        .map(|s| {
            calibrate(|| {
                s.pass(b);
            })
        })
        .collect();
    let mut ns = vec![Vec::with_capacity(ROUNDS); sets.len()];
    let mut restore = vec![Vec::with_capacity(ROUNDS); sets.len()];
    let mut alloc_count = vec![0u64; sets.len()];
    let mut packets = vec![0usize; sets.len()];
    for _ in 0..ROUNDS {
        for (i, s) in sets.iter_mut().enumerate() {
            let n = s.pristine.len() * passes[i];
            let a0 = allocs();
            let t = Instant::now();
            for _ in 0..passes[i] {
                bad += s.pristine.len() - s.pass(b);
            }
            let el = t.elapsed();
            alloc_count[i] += allocs() - a0;
            packets[i] += n;
            ns[i].push(el.as_nanos() as f64 / n as f64);
            let t = Instant::now();
            for _ in 0..passes[i] {
                s.pass_restore_only();
            }
            restore[i].push(t.elapsed().as_nanos() as f64 / n as f64);
        }
    }
    assert_eq!(bad, 0, "every measured packet was forwarded");
    std::array::from_fn(|i| Established {
        ns: median(std::mem::take(&mut ns[i])),
        allocs: alloc_count[i] as f64 / packets[i] as f64,
        restore_ns: median(std::mem::take(&mut restore[i])),
    })
}

struct NewFlows {
    ns: f64,
    allocs: f64,
}

/// New flows: `NEW_PER_ROUND` SYNs with fresh 5-tuples per round, all accepted by the late
/// rule; the flows are expired (untimed) between rounds.
fn measure_new_flows(b: &mut Bench) -> NewFlows {
    let mut frames = vec![0u8; NEW_PER_ROUND * 64];
    let mut ifaces = Vec::with_capacity(NEW_PER_ROUND);
    for (k, w) in frames.chunks_exact_mut(64).enumerate() {
        let client = k % b.clients;
        Tcp4 {
            dst_mac: GATEWAY_MAC,
            src_mac: client_mac(client),
            src: client_ip(client),
            dst: traffic_dst(k),
            sport: 33_333,
            dport: TRAFFIC_PORT,
            flags: TCP_SYN,
            seq: CLIENT_ISN,
            ack: 0,
        }
        .write(w);
        ifaces.push(iface(client));
    }
    let base = b.engine.conntrack().len();
    let mut work = [0u8; 64];
    let mut rounds = Vec::with_capacity(ROUNDS);
    let mut alloc_total = 0u64;
    // One untimed warm-up round, then the timed ones.
    for round in 0..=ROUNDS {
        let a0 = allocs();
        let t = Instant::now();
        let mut ok = 0usize;
        for (k, f) in frames.chunks_exact(64).enumerate() {
            work.copy_from_slice(f);
            b.out.clear();
            let v = b.engine.handle(
                EngineInstant::from_nanos(b.now),
                ifaces[k],
                &mut work,
                &mut b.out,
            );
            b.now += 1;
            ok += usize::from(black_box(v) == Verdict::Forward(UPLINK));
        }
        let el = t.elapsed();
        let a = allocs() - a0;
        assert_eq!(ok, NEW_PER_ROUND, "every new flow accepted and forwarded");
        assert_eq!(b.engine.conntrack().len(), base + NEW_PER_ROUND);
        if round > 0 {
            rounds.push(el.as_nanos() as f64 / NEW_PER_ROUND as f64);
            alloc_total += a;
        }
        // Untimed: the SYN_SENT flows time out (120 s), the established ones stay.
        b.now += 121 * SEC;
        b.out.clear();
        b.engine.tick(EngineInstant::from_nanos(b.now), &mut b.out);
        assert_eq!(b.engine.conntrack().len(), base, "new flows expired");
    }
    NewFlows {
        ns: median(rounds),
        allocs: alloc_total as f64 / (ROUNDS * NEW_PER_ROUND) as f64,
    }
}

// -------------------------------------------------------------------------------------------
// Memory

fn page_size() -> u64 {
    // Linux on the architectures Qubes runs on; statm counts in these pages.
    4096
}

/// Resident set size in bytes, from `/proc/self/statm`.
fn rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

struct Memory {
    bytes_per_flow: usize,
    max: usize,
    rss_per_flow: Option<f64>,
}

/// A fresh engine (1 client, 10 rules, room for `RSS_FLOWS`), RSS before and after opening
/// `RSS_FLOWS` flows; frames are built in one stack buffer so nothing else grows.
fn measure_memory() -> Memory {
    let mut cfg = config(1, 10);
    cfg.conntrack_max = RSS_FLOWS;
    let engine = Engine::new(cfg).expect("engine");
    let mut b = Bench::new(engine, 1);
    let mut frame = [0u8; 64];
    let before = rss();
    for k in 0..RSS_FLOWS {
        Tcp4 {
            dst_mac: GATEWAY_MAC,
            src_mac: client_mac(0),
            src: client_ip(0),
            dst: traffic_dst(k),
            sport: 40_000,
            dport: TRAFFIC_PORT,
            flags: TCP_SYN,
            seq: CLIENT_ISN,
            ack: 0,
        }
        .write(&mut frame);
        assert_eq!(b.handle(1, &mut frame), Verdict::Forward(UPLINK));
    }
    let after = rss();
    assert_eq!(b.engine.conntrack().len(), RSS_FLOWS);
    let rss_per_flow = match (before, after) {
        (Some(x), Some(y)) => Some(y.saturating_sub(x) as f64 / RSS_FLOWS as f64),
        _ => None,
    };
    let m = Memory {
        bytes_per_flow: b.engine.conntrack().bytes_per_flow(),
        max: b.engine.conntrack().max_flows(),
        rss_per_flow,
    };
    drop(b);
    m
}

// -------------------------------------------------------------------------------------------
// Configurations

struct Results {
    /// Generating the configuration (rule strings), and `Engine::new` (compiling the rules).
    gen: Duration,
    setup: Duration,
    est: [Established; 4],
    new: NewFlows,
    bytes_per_flow: usize,
}

enum Outcome {
    Done(Box<Results>),
    /// Short cell text, and the reason in full.
    Skipped(String, String),
}

fn build(clients: usize, rules: usize) -> (Engine, Duration, Duration) {
    let t = Instant::now();
    let cfg = config(clients, rules);
    let gen = t.elapsed();
    let t = Instant::now();
    let engine = Engine::new(cfg).expect("engine");
    (engine, gen, t.elapsed())
}

fn run_config(clients: usize, rules: usize) -> Outcome {
    if clients * rules > 1_000_000 {
        // Estimate from a probe before committing to the full setup.
        let r0 = rss();
        let (probe, gen, took) = build(PROBE_CLIENTS, rules);
        let grew = rss().zip(r0).map(|(a, b)| a.saturating_sub(b));
        drop(probe);
        let factor = clients as f64 / PROBE_CLIENTS as f64;
        let est = (gen + took).as_secs_f64() * factor;
        let mem = grew.map_or(String::new(), |g| {
            format!(", ~{:.1} GiB", g as f64 * factor / f64::from(1 << 30))
        });
        if est > SETUP_BUDGET.as_secs_f64() {
            return Outcome::Skipped(
                format!("skipped (setup ~{est:.0}s)"),
                format!(
                    "{clients} clients x {rules} rules: setup estimated at {est:.0} s{mem} from \
                     a {PROBE_CLIENTS}-client probe ({:.2} s Engine::new + {:.2} s generating \
                     the rule strings), over the {} s budget, so not measured",
                    took.as_secs_f64(),
                    gen.as_secs_f64(),
                    SETUP_BUDGET.as_secs()
                ),
            );
        }
        eprintln!(
            "  {clients} clients x {rules} rules: probe estimates {est:.1}s setup{mem}; building"
        );
    }
    // Once built, measured, however long the setup took: the figure is what matters.
    let (engine, gen, setup) = build(clients, rules);
    let mut b = Bench::new(engine, clients);
    b.open_flows();
    let est = measure_established(&mut b);
    let new = measure_new_flows(&mut b);
    Outcome::Done(Box::new(Results {
        gen,
        setup,
        est,
        new,
        bytes_per_flow: b.engine.conntrack().bytes_per_flow(),
    }))
}

/// Spins the core for a while so the first measurement does not run at a lower clock.
fn warm_up() {
    let t = Instant::now();
    let data = [0x5au8; 4096];
    let mut acc = 0u32;
    while t.elapsed() < Duration::from_millis(300) {
        acc = acc.wrapping_add(u32::from(csum_fin(csum_add(0, black_box(&data)))));
    }
    black_box(acc);
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

// -------------------------------------------------------------------------------------------
// Report

const LABEL: usize = 40;
const CELL: usize = 24;

fn row(label: &str, cells: &[String]) {
    let mut s = format!("{label:<LABEL$}");
    for c in cells {
        s.push_str(&format!("| {c:<w$}", w = CELL - 2));
    }
    println!("{}", s.trim_end());
}

fn rate(ns: f64) -> String {
    format!("{:>5.2} Mpps {:>6.1} ns", 1e3 / ns, ns)
}

/// Runs [`measure_memory`] in a fresh copy of this process, so the RSS it sees is the engine's
/// alone and the measurement leaves nothing behind (a heap that held 100,000 flows slowed the
/// next engine's forwarding measurably). Falls back to measuring here if that fails.
fn memory_in_child() -> Memory {
    let child = std::env::current_exe()
        .and_then(|exe| std::process::Command::new(exe).arg(RSS_CHILD_ARG).output());
    let parsed = child.ok().and_then(|o| {
        let s = String::from_utf8(o.stdout).ok()?;
        let mut it = s.split_whitespace();
        let bytes_per_flow = it.next()?.parse().ok()?;
        let max = it.next()?.parse().ok()?;
        let rss_per_flow = it.next()?.parse().ok();
        Some(Memory {
            bytes_per_flow,
            max,
            rss_per_flow,
        })
    });
    parsed.unwrap_or_else(measure_memory)
}

/// The argument that makes this program only measure memory and print it.
const RSS_CHILD_ARG: &str = "--rss-child";
/// The argument that runs one small configuration without printing figures (the test suite).
const SMOKE_ARG: &str = "--smoke";

fn main() {
    if std::env::args().any(|a| a == RSS_CHILD_ARG) {
        let m = measure_memory();
        let rss = m.rss_per_flow.map_or("-".to_string(), |r| r.to_string());
        println!("{} {} {rss}", m.bytes_per_flow, m.max);
        return;
    }
    if std::env::args().any(|a| a == SMOKE_ARG) {
        // The paths the figures are taken on must work: every measurement asserts that its
        // packets are forwarded, so a change that breaks them fails here, in the test suite,
        // and not first when someone measures.
        match run_config(1, 10) {
            Outcome::Done(_) => {
                println!("engine bench smoke: 1 client x 10 rules, all paths forward")
            }
            Outcome::Skipped(short, why) => panic!("engine bench smoke skipped: {short}: {why}"),
        }
        return;
    }
    let started = Instant::now();
    let configs: [(usize, usize); 4] = [(1, 10), (1, 10_000), (1_000, 10), (1_000, 10_000)];

    let load = load_average();
    eprintln!("memory: filling {RSS_FLOWS} flows (child process)");
    let mem = memory_in_child();
    warm_up();

    let mut results = Vec::new();
    for &(c, r) in &configs {
        eprintln!("{c} client(s) x {r} rules");
        results.push(run_config(c, r));
    }

    println!();
    println!(
        "sys-firewall engine, one core, median of {ROUNDS} rounds (>= {} ms each); \
         {FLOWS} established TCP flows round-robin over the clients;",
        ROUND_TIME.as_millis()
    );
    println!(
        "traffic accepted by the last numbered rule (just before the policy); \
         each packet restores {HDR} header bytes first (cost on its own row); \
         load average at start {load} on {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    let head1: Vec<String> = configs
        .iter()
        .map(|&(c, _)| format!("{c} client{}", if c == 1 { "" } else { "s" }))
        .collect();
    let head2: Vec<String> = configs.iter().map(|&(_, r)| format!("{r} rules")).collect();
    row("", &head1);
    row("", &head2);
    println!("{}", "-".repeat(LABEL + CELL * configs.len()));
    let cell = |f: &dyn Fn(&Results) -> String| -> Vec<String> {
        results
            .iter()
            .map(|o| match o {
                Outcome::Done(r) => f(r),
                Outcome::Skipped(short, _) => short.clone(),
            })
            .collect()
    };
    row(
        "setup: Engine::new (+ rule strings)",
        &cell(&|r| {
            format!(
                "{:.2} s (+{:.2} s)",
                r.setup.as_secs_f64(),
                r.gen.as_secs_f64()
            )
        }),
    );
    let names = [
        "established 64B client->uplink",
        "established 64B uplink->client",
        "established 1500B client->uplink",
        "established 1500B uplink->client",
    ];
    for (i, name) in names.iter().enumerate() {
        row(name, &cell(&|r| rate(r.est[i].ns)));
    }
    row(
        "  of which header restore (64B copy)",
        &cell(&|r| {
            let v: Vec<f64> = r.est.iter().map(|e| e.restore_ns).collect();
            let (lo, hi) = v
                .iter()
                .fold((f64::MAX, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            format!("{lo:.1}-{hi:.1} ns")
        }),
    );
    row(
        "new flows (64B TCP SYN, accepted)",
        &cell(&|r| format!("{:>5.2} M/s {:>7.1} ns", 1e3 / r.new.ns, r.new.ns)),
    );
    row(
        "allocations/packet, established",
        &cell(&|r| {
            let a = r.est.iter().map(|e| e.allocs).fold(0f64, f64::max);
            format!("{a:.4} (target 0)")
        }),
    );
    row(
        "allocations/packet, new flows",
        &cell(&|r| format!("{:.4}", r.new.allocs)),
    );
    row(
        "conntrack bytes/flow (65,536 max)",
        &cell(&|r| format!("{} B", r.bytes_per_flow)),
    );
    let rss_cell = mem
        .rss_per_flow
        .map_or("n/a (no /proc/self/statm)".to_string(), |b| {
            format!("{b:.1} B")
        });
    println!(
        "{:<LABEL$}| {} B estimated (ConnTrack::bytes_per_flow, max {}); measured RSS growth {} \
         per flow filling {RSS_FLOWS} flows (fresh process, 1 client)",
        "memory per tracked flow", mem.bytes_per_flow, mem.max, rss_cell,
    );
    println!();
    println!(
        "method: established = {FLOWS} flows opened by SYN/SYN+ACK/ACK through the engine, then \
         ACK|PSH segments; new flows = {NEW_PER_ROUND} SYNs with fresh 5-tuples per round into \
         the default {DEFAULT_CONNTRACK_MAX}-flow table, expired by tick(+121 s) between rounds \
         (untimed)"
    );
    for o in &results {
        if let Outcome::Skipped(_, why) = o {
            println!("skipped: {why}");
        }
    }
    if let Some(Outcome::Done(r)) = results.first() {
        let e = &r.est[0];
        let worst = results
            .iter()
            .filter_map(|o| match o {
                Outcome::Done(r) => Some(r.est[0].ns),
                Outcome::Skipped(..) => None,
            })
            .fold(0f64, f64::max);
        println!(
            "established 64B client->uplink: {:.2} Mpps (target >= 5 Mpps on one core) \
             [1 client, 10 rules, {:.1} ns/packet incl. {:.1} ns header restore; \
             {:.2} Mpps without it; slowest configuration {:.2} Mpps]",
            1e3 / e.ns,
            e.ns,
            e.restore_ns,
            1e3 / (e.ns - e.restore_ns),
            1e3 / worst,
        );
    }
    eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
}
