//! Tests of [`Netfront`] and [`Netback`] over the emulated hypervisor: frames both ways
//! between a frontend domain (7) and a backend domain (0), backpressure, and a hostile
//! frontend writing its TX ring by hand.

use std::time::{Duration, Instant};

use super::emul::{Domain, EmulEvents, EmulGrants, Hypervisor, HypervisorHandle};
use super::mem::MmapPages;
use super::netback::Netback;
use super::netfront::Netfront;
use super::netif::{
    assemble_tx, ExtraInfo, Features, GsoExtra, GsoInfo, GsoType, Limits, PacketMeta, TxPacket,
    TxRequest, TxResponse, NETIF_RSP_ERROR, NETIF_RSP_NULL, NETIF_RSP_OKAY, NETTXF_CSUM_BLANK,
    NETTXF_DATA_VALIDATED, NETTXF_EXTRA_INFO, NETTXF_MORE_DATA, TX_RING_SIZE, TX_SLOT,
    XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6,
};
use super::ring::HEADER_LEN;
use super::{DomId, EventChannels, GrantExport, GrantRef, SharedPages, PAGE_SIZE};

const FRONT: DomId = 7;
const BACK: DomId = 0;

type Front = Netfront<EmulGrants, EmulEvents>;
type Back = Netback<EmulGrants, EmulEvents>;

fn broker() -> (tempfile::TempDir, HypervisorHandle) {
    let dir = tempfile::tempdir().expect("tempdir");
    let hv = Hypervisor::serve(dir.path().join("hv.sock")).expect("serve");
    (dir, hv)
}

/// A connected pair: the front end made first (as its XenStore keys come first), then the
/// back end from what it would publish.
fn pair(hv: &HypervisorHandle, front_f: Features, back_f: Features) -> (Front, Back) {
    let d7 = Domain::connect(hv.path(), FRONT).expect("dom7");
    let d0 = Domain::connect(hv.path(), BACK).expect("dom0");
    let front =
        Netfront::new(d7.grants(), d7.events().expect("events"), BACK, front_f).expect("netfront");
    let mut e0 = d0.events().expect("events");
    let port = e0
        .bind_interdomain(FRONT, front.event_port())
        .expect("bind");
    let back = Netback::new(
        d0.grants(),
        e0,
        FRONT,
        front.tx_ring_ref(),
        front.rx_ring_ref(),
        port,
        back_f,
    )
    .expect("netback");
    (front, back)
}

/// An Ethernet/IPv4/TCP or IPv6/TCP frame of `len` bytes, its payload patterned by `seed`.
fn tcp_frame(v6: bool, len: usize, seed: u32) -> Vec<u8> {
    let mut f = vec![0u8; len];
    if v6 {
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        if len > 74 {
            f[14] = 0x60;
            f[20] = 6;
            f[54 + 12] = 0x50;
        }
    } else {
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        if len > 54 {
            f[14] = 0x45;
            f[23] = 6;
            f[34 + 12] = 0x50;
        }
    }
    let start = if v6 { 74 } else { 54 }.min(len);
    for (i, b) in f[start..].iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) as u8 ^ (i >> 8) as u8;
    }
    f
}

/// Frame `i` of a mixed workload: small and large, one page and many, GSO super-frames
/// up to 64 KiB, the three checksum states. `max` caps the size (TX takes 65535).
fn workload(i: usize, max: usize) -> (Vec<u8>, PacketMeta) {
    const SIZES: [usize; 12] = [
        60, 64, 1514, 4096, 4097, 8192, 9000, 20_000, 40_000, 65_535, 100, 12_345,
    ];
    let len = SIZES[i % SIZES.len()].min(max);
    let v6 = (i / 3) % 2 == 1;
    let frame = tcp_frame(v6, len, i as u32);
    let meta = match (len > 1514, i % 3) {
        (true, _) => PacketMeta {
            csum_blank: true,
            data_validated: true,
            gso: Some(GsoInfo {
                ty: if v6 { GsoType::TcpV6 } else { GsoType::TcpV4 },
                mss: 1400 + (i % 48) as u16,
            }),
        },
        (false, 0) => PacketMeta::default(),
        (false, 1) => PacketMeta {
            csum_blank: false,
            data_validated: true,
            gso: None,
        },
        _ => PacketMeta {
            csum_blank: true,
            data_validated: true,
            gso: None,
        },
    };
    (frame, meta)
}

type Got = Vec<(Vec<u8>, PacketMeta)>;

fn check_same(what: &str, got: &Got, want: &Got) {
    assert_eq!(got.len(), want.len(), "{what}: frame count");
    for (k, ((gf, gm), (wf, wm))) in got.iter().zip(want).enumerate() {
        assert_eq!(gf.len(), wf.len(), "{what}: frame {k} length");
        assert!(gf == wf, "{what}: frame {k} bytes differ");
        assert_eq!(gm, wm, "{what}: frame {k} metadata");
    }
}

#[test]
fn frames_both_ways_in_one_thread() {
    const N: usize = 700;
    let (_dir, hv) = broker();
    let (mut front, mut back) = pair(&hv, Features::ALL, Features::ALL);
    let to_back: Got = (0..N).map(|i| workload(i, 65_535)).collect();
    let to_front: Got = (0..N).map(|i| workload(i + 5, 65_535)).collect();
    let (mut sent_b, mut sent_f) = (0, 0);
    let (mut got_b, mut got_f): (Got, Got) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(120);
    while got_b.len() < N || got_f.len() < N {
        assert!(Instant::now() < deadline, "stalled");
        while sent_b < N {
            let (f, m) = &to_back[sent_b];
            if !front.send(f, m).expect("send") {
                break;
            }
            sent_b += 1;
        }
        back.poll_tx(&mut |f: &[u8], m: &PacketMeta| got_b.push((f.to_vec(), *m)))
            .expect("poll_tx");
        while sent_f < N {
            let (f, m) = &to_front[sent_f];
            if !back.send_rx(f, m).expect("send_rx") {
                break;
            }
            sent_f += 1;
        }
        front
            .recv(&mut |f: &[u8], m: &PacketMeta| got_f.push((f.to_vec(), *m)))
            .expect("recv");
        // Answers left on the ring are taken by the next send or recv.
        while front.handle_event().expect("event") {}
        while back.handle_event().expect("event") {}
    }
    check_same("front to back", &got_b, &to_back);
    check_same("back to front", &got_f, &to_front);
    assert_eq!(back.stats().tx_dropped, 0);
    assert_eq!(back.stats().rx_refused, 0);
    assert_eq!(front.stats().tx_refused, 0);
    assert_eq!(front.stats().rx_dropped, 0);
    assert_eq!(front.stats().tx_errors, 0);
    // Far more slots than the ring has went through, both ways.
    assert!(back.stats().tx_frames as u32 > 2 * TX_RING_SIZE);
    assert!(back.stats().rx_frames as u32 > 2 * TX_RING_SIZE);
}

fn wait_readable(fd: std::os::fd::RawFd, ms: i32) -> bool {
    let mut ready = Vec::new();
    crate::sys::poll_readable(&[fd], ms, &mut ready).expect("poll");
    ready.first() == Some(&true)
}

/// Each end in its own thread, sleeping on its event channel whenever it cannot move:
/// a lost wakeup shows as a 10 s wait and fails the test.
#[test]
fn frames_both_ways_in_two_threads_woken_by_events() {
    const N: usize = 1500;
    let (_dir, hv) = broker();
    let (mut front, mut back) = pair(&hv, Features::ALL, Features::ALL);
    let to_back: Got = (0..N).map(|i| workload(i * 7, 65_535)).collect();
    let to_front: Got = (0..N).map(|i| workload(i * 5 + 1, 65_535)).collect();
    let want_b = to_back.clone();
    let want_f = to_front.clone();
    let backend = std::thread::spawn(move || {
        let mut got: Got = Vec::new();
        let mut sent = 0;
        while got.len() < N || sent < N {
            let n = back
                .poll_tx(&mut |f: &[u8], m: &PacketMeta| got.push((f.to_vec(), *m)))
                .expect("poll_tx");
            let mut moved = n > 0;
            while sent < N {
                let (f, m) = &to_front[sent];
                if !back.send_rx(f, m).expect("send_rx") {
                    break;
                }
                sent += 1;
                moved = true;
            }
            if !moved && !back.pending_tx().expect("pending") {
                assert!(
                    wait_readable(back.raw_fd(), 10_000),
                    "backend: lost wakeup (got {}, sent {sent})",
                    got.len()
                );
                back.handle_event().expect("event");
            }
        }
        got
    });
    let mut got: Got = Vec::new();
    let mut sent = 0;
    while got.len() < N || sent < N {
        let n = front
            .recv(&mut |f: &[u8], m: &PacketMeta| got.push((f.to_vec(), *m)))
            .expect("recv");
        let mut moved = n > 0;
        while sent < N {
            let (f, m) = &to_back[sent];
            if !front.send(f, m).expect("send") {
                break;
            }
            sent += 1;
            moved = true;
        }
        if !moved && !front.pending_rx().expect("pending") {
            assert!(
                wait_readable(front.raw_fd(), 10_000),
                "frontend: lost wakeup (got {}, sent {sent})",
                got.len()
            );
            front.handle_event().expect("event");
        }
    }
    let got_b = backend.join().expect("backend thread");
    check_same("front to back", &got_b, &want_b);
    check_same("back to front", &got, &want_f);
}

#[test]
fn backpressure_loses_nothing() {
    let (_dir, hv) = broker();
    let (mut front, mut back) = pair(&hv, Features::ALL, Features::ALL);
    let small: Got = (0..300)
        .map(|i| (tcp_frame(false, 60 + i, i as u32), PacketMeta::default()))
        .collect();
    // RX: the front end posted one page per slot; with nobody receiving, 256 frames fit.
    assert_eq!(back.rx_buffers().expect("buffers"), 256);
    for (f, m) in &small[..254] {
        assert!(back.send_rx(f, m).expect("send_rx"));
    }
    // Two pages left: a three-page frame waits, and takes nothing from the ring.
    let big = tcp_frame(true, 9000, 99);
    assert!(!back.send_rx(&big, &PacketMeta::default()).expect("send_rx"));
    assert_eq!(back.rx_buffers().expect("buffers"), 2);
    for (f, m) in &small[254..256] {
        assert!(back.send_rx(f, m).expect("send_rx"));
    }
    let (f, m) = &small[256];
    assert!(!back.send_rx(f, m).expect("send_rx"), "no buffers posted");
    assert_eq!(back.rx_buffers().expect("buffers"), 0);
    assert_eq!(back.stats().rx_no_buffers, 2);
    let mut got: Got = Vec::new();
    let n = front
        .recv(&mut |f: &[u8], m: &PacketMeta| got.push((f.to_vec(), *m)))
        .expect("recv");
    assert_eq!(n, 256);
    check_same("first 256", &got, &small[..256].to_vec());
    // Reposted: the rest goes through.
    assert_eq!(back.rx_buffers().expect("buffers"), 256);
    for (f, m) in &small[256..] {
        assert!(back.send_rx(f, m).expect("send_rx"));
    }
    assert!(back.send_rx(&big, &PacketMeta::default()).expect("send_rx"));
    got.clear();
    front
        .recv(&mut |f: &[u8], m: &PacketMeta| got.push((f.to_vec(), *m)))
        .expect("recv");
    let mut rest = small[256..].to_vec();
    rest.push((big, PacketMeta::default()));
    check_same("the rest", &got, &rest);

    // TX: with the back end not polling, the ring (and the page pool) fill up.
    let mut queued = 0;
    while front
        .send(&small[queued % 300].0, &PacketMeta::default())
        .expect("send")
    {
        queued += 1;
        assert!(queued <= 256, "more queued than the ring holds");
    }
    assert_eq!(queued, 256);
    assert_eq!(front.tx_free().expect("free"), 0);
    got.clear();
    let n = back
        .poll_tx(&mut |f: &[u8], m: &PacketMeta| got.push((f.to_vec(), *m)))
        .expect("poll_tx");
    assert_eq!(n, 256);
    for (k, (f, _)) in got.iter().enumerate() {
        assert!(*f == small[k % 300].0, "TX frame {k}");
    }
    assert_eq!(front.tx_free().expect("free"), 256);
    assert!(front
        .send(&small[0].0, &PacketMeta::default())
        .expect("send"));
}

#[test]
fn frames_the_peer_did_not_negotiate_are_refused() {
    let (_dir, hv) = broker();
    // A front end that took nothing but rx-copy: one page, IPv4 checksum offload only.
    let (mut front, mut back) = pair(&hv, Features::default(), Features::default());
    let gso = PacketMeta {
        csum_blank: true,
        data_validated: true,
        gso: Some(GsoInfo {
            ty: GsoType::TcpV4,
            mss: 1448,
        }),
    };
    let blank = PacketMeta {
        csum_blank: true,
        data_validated: true,
        gso: None,
    };
    let big = tcp_frame(false, 9000, 1);
    let v6 = tcp_frame(true, 1000, 2);
    let v4 = tcp_frame(false, 1000, 3);
    assert!(!back.accepts(&big, &gso));
    assert!(!back.accepts(&big, &PacketMeta::default()));
    assert!(!back.accepts(&v6, &blank));
    assert!(back.accepts(&v4, &blank));
    for (f, m) in [(&big, &gso), (&big, &PacketMeta::default()), (&v6, &blank)] {
        assert!(back.send_rx(f, m).expect("send_rx"));
        assert!(front.send(f, m).expect("send"));
    }
    assert_eq!(back.stats().rx_refused, 3);
    assert_eq!(front.stats().tx_refused, 3);
    assert!(back.send_rx(&v4, &blank).expect("send_rx"));
    assert!(front.send(&v4, &blank).expect("send"));
    let mut got: Got = Vec::new();
    front
        .recv(&mut |f: &[u8], m: &PacketMeta| got.push((f.to_vec(), *m)))
        .expect("recv");
    check_same("RX", &got, &vec![(v4.clone(), blank)]);
    got.clear();
    back.poll_tx(&mut |f: &[u8], m: &PacketMeta| got.push((f.to_vec(), *m)))
        .expect("poll_tx");
    check_same("TX", &got, &vec![(v4, blank)]);
}

// ---------------------------------------------------------------------------------------
// A hostile front end: the test grants the rings and data pages itself and writes the TX
// ring by hand.

const DATA_PAGES: usize = 4;

struct Hostile {
    _dir: tempfile::TempDir,
    _hv: HypervisorHandle,
    d0: Domain,
    e7: EmulEvents,
    tx_ring: MmapPages,
    tx_ref: GrantRef,
    rx_ring: MmapPages,
    rx_ref: GrantRef,
    data_refs: Vec<GrantRef>,
    /// What the data pages hold (written once, never changed).
    data: Vec<u8>,
    front_port: Option<super::Port>,
}

fn data_byte(i: usize) -> u8 {
    ((i as u32).wrapping_mul(2_654_435_761) >> 13) as u8
}

impl Hostile {
    fn new() -> Self {
        let (dir, hv) = broker();
        let d7 = Domain::connect(hv.path(), FRONT).expect("dom7");
        let d0 = Domain::connect(hv.path(), BACK).expect("dom0");
        let mut g7 = d7.grants();
        let (tx_refs, tx_ring) = g7.grant(BACK, 1, true).expect("grant");
        let (rx_refs, rx_ring) = g7.grant(BACK, 1, true).expect("grant");
        let (data_refs, pages) = g7.grant(BACK, DATA_PAGES, false).expect("grant");
        let data: Vec<u8> = (0..DATA_PAGES * PAGE_SIZE).map(data_byte).collect();
        pages.write(0, &data).expect("fill");
        // The mapping is only ours; the grants stay for the test's life.
        std::mem::forget(pages);
        Hostile {
            _dir: dir,
            _hv: hv,
            d0,
            e7: d7.events().expect("events"),
            tx_ring,
            tx_ref: tx_refs[0],
            rx_ring,
            rx_ref: rx_refs[0],
            data_refs,
            data,
            front_port: None,
        }
    }

    /// Resets both rings to start at `start` and attaches a new back end.
    fn backend(&mut self, start: u32) -> Back {
        if let Some(p) = self.front_port.take() {
            self.e7.unbind(p).expect("unbind");
        }
        for ring in [&self.tx_ring, &self.rx_ring] {
            ring.zero(0, HEADER_LEN).expect("zero");
            ring.store_u32(4, start.wrapping_add(1)).expect("req_event");
            ring.store_u32(12, start.wrapping_add(1))
                .expect("rsp_event");
            ring.store_u32(8, start).expect("rsp_prod");
            ring.store_u32(0, start).expect("req_prod");
        }
        let front_port = self.e7.alloc_unbound(BACK).expect("alloc");
        self.front_port = Some(front_port);
        let mut e0 = self.d0.events().expect("events");
        let port = e0.bind_interdomain(FRONT, front_port).expect("bind");
        Netback::new(
            self.d0.grants(),
            e0,
            FRONT,
            self.tx_ref,
            self.rx_ref,
            port,
            Features::ALL,
        )
        .expect("netback")
    }

    fn slot(&self, idx: u32, b: &[u8; TX_SLOT]) {
        let at = HEADER_LEN + (idx % TX_RING_SIZE) as usize * TX_SLOT;
        self.tx_ring.write(at, b).expect("slot");
    }

    fn response(&self, idx: u32) -> TxResponse {
        let at = HEADER_LEN + (idx % TX_RING_SIZE) as usize * TX_SLOT;
        let mut b = [0u8; TX_SLOT];
        self.tx_ring.read(at, &mut b).expect("slot");
        TxResponse::parse(&b)
    }

    fn publish(&self, prod: u32) {
        self.tx_ring.store_u32(0, prod).expect("req_prod");
    }

    /// The contents of a page the front end granted, as the back end would see it now.
    fn page(&self, r: GrantRef) -> Option<Vec<u8>> {
        if let Some(k) = self.data_refs.iter().position(|&d| d == r) {
            return Some(self.data[k * PAGE_SIZE..(k + 1) * PAGE_SIZE].to_vec());
        }
        let ring = if r == self.tx_ref {
            &self.tx_ring
        } else if r == self.rx_ref {
            &self.rx_ring
        } else {
            return None;
        };
        let mut p = vec![0u8; PAGE_SIZE];
        ring.read(0, &mut p).expect("read");
        Some(p)
    }
}

fn req(gref: GrantRef, offset: u16, flags: u16, id: u16, size: u16) -> [u8; TX_SLOT] {
    TxRequest {
        gref,
        offset,
        flags,
        id,
        size,
    }
    .to_bytes()
}

fn poll(back: &mut Back) -> Result<Got, super::netif::Disconnect> {
    let mut got: Got = Vec::new();
    back.poll_tx(&mut |f: &[u8], m: &PacketMeta| got.push((f.to_vec(), *m)))
        .map(|_| got)
}

fn disconnected(r: Result<Got, super::netif::Disconnect>, words: &[&str]) {
    let e = r.expect_err("must disconnect");
    for w in words {
        assert!(
            e.reason().contains(w),
            "{:?} does not name {w:?}",
            e.reason()
        );
    }
}

#[test]
fn hostile_frontend_targeted_cases() {
    let mut h = Hostile::new();
    let d = h.data_refs[0];

    // A good packet, then its answer.
    let mut back = h.backend(0);
    h.slot(0, &req(d, 100, 0, 42, 60));
    h.publish(1);
    let got = poll(&mut back).expect("good");
    assert_eq!(got.len(), 1);
    assert!(got[0].0 == h.data[100..160]);
    assert_eq!(
        h.response(0),
        TxResponse {
            id: 42,
            status: NETIF_RSP_OKAY
        }
    );

    // Sizes over 65535 in all: the fragments add up to more than the first says.
    // Dropped, answered with errors, and the ring goes on.
    let mut i = 1;
    h.slot(i, &req(d, 0, NETTXF_MORE_DATA, 1, 65_535));
    for k in 0..17u16 {
        let flags = if k < 16 { NETTXF_MORE_DATA } else { 0 };
        h.slot(i + 1 + u32::from(k), &req(d, 0, flags, 2 + k, 4096));
    }
    h.slot(i + 18, &req(d, 0, 0, 100, 60));
    h.publish(i + 19);
    let got = poll(&mut back).expect("dropped, not fatal");
    assert_eq!(got.len(), 1, "only the good packet after it");
    for k in 0..18 {
        assert_eq!(h.response(i + k).status, NETIF_RSP_ERROR);
    }
    assert_eq!(h.response(i + 18).status, NETIF_RSP_OKAY);
    assert_eq!(back.stats().tx_dropped, 1);
    i += 19;

    // An id reused in flight.
    h.slot(i, &req(d, 0, 0, 7, 60));
    h.slot(i + 1, &req(d, 0, 0, 7, 60));
    h.publish(i + 2);
    disconnected(poll(&mut back), &["id 7", "reused"]);
    // And from then on, the same answer to everything.
    disconnected(poll(&mut back), &["id 7"]);
    assert!(back.send_rx(&[0u8; 60], &PacketMeta::default()).is_err());

    // A fragment past its page.
    let mut back = h.backend(0xffff_fff0);
    h.slot(0xffff_fff0, &req(d, 4000, 0, 1, 200));
    h.publish(0xffff_fff1);
    disconnected(poll(&mut back), &["offset 4000", "past the 4096-byte page"]);

    // More than XEN_NETIF_NR_SLOTS_MIN slots.
    let mut back = h.backend(5);
    h.slot(5, &req(d, 0, NETTXF_MORE_DATA, 0, 1900));
    for k in 1..19u32 {
        let flags = if k < 18 { NETTXF_MORE_DATA } else { 0 };
        h.slot(5 + k, &req(d, 0, flags, k as u16, 100));
    }
    h.publish(5 + 19);
    disconnected(poll(&mut back), &["more than 18"]);

    // A grant that does not exist.
    let mut back = h.backend(0);
    h.slot(0, &req(GrantRef(999_999), 0, 0, 1, 60));
    h.publish(1);
    disconnected(poll(&mut back), &["gref 999999"]);

    // A producer past the ring, and one gone backwards.
    let mut back = h.backend(0);
    h.publish(TX_RING_SIZE + 1);
    disconnected(poll(&mut back), &["req_prod 257"]);
    let mut back = h.backend(100);
    h.slot(100, &req(d, 0, 0, 1, 60));
    h.publish(101);
    poll(&mut back).expect("good");
    h.publish(100);
    disconnected(poll(&mut back), &["req_prod 100"]);

    // A packet cut off at the producer.
    let mut back = h.backend(0);
    h.slot(0, &req(d, 0, NETTXF_MORE_DATA, 1, 200));
    h.publish(1);
    disconnected(poll(&mut back), &["continues past"]);

    // Extra-info garbage.
    let mut back = h.backend(0);
    h.slot(0, &req(d, 0, NETTXF_EXTRA_INFO, 1, 60));
    let mut junk = [0u8; TX_SLOT];
    junk[0] = 77;
    h.slot(1, &junk);
    h.publish(2);
    disconnected(poll(&mut back), &["extra-info type 77"]);
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What a correct back end must do with the slots `cons..prod` as they are in `ring` (the
/// TX ring page): disconnect (`None`), or deliver exactly these frames.
fn expected(h: &Hostile, ring: &[u8], cons: u32, prod: u32) -> Option<Got> {
    let n = prod.wrapping_sub(cons);
    if n > TX_RING_SIZE {
        return None;
    }
    let slots: Vec<[u8; TX_SLOT]> = (0..n)
        .map(|k| {
            let at = HEADER_LEN + (cons.wrapping_add(k) % TX_RING_SIZE) as usize * TX_SLOT;
            let mut b = [0u8; TX_SLOT];
            b.copy_from_slice(&ring[at..at + TX_SLOT]);
            b
        })
        .collect();
    let mut pos = 0;
    let mut ids = std::collections::HashSet::new();
    let mut frames = Vec::new();
    let mut pkt = TxPacket::default();
    while pos < slots.len() {
        assemble_tx(&slots[pos..], &Limits::default(), &mut pkt).ok()?;
        for r in &pkt.responses {
            if r.status != NETIF_RSP_NULL && !ids.insert(r.id) {
                return None;
            }
        }
        pos += pkt.slots;
        if pkt.dropped.is_some() {
            continue;
        }
        let mut f = Vec::new();
        for p in &pkt.pieces {
            let page = h.page(p.gref)?;
            let at = usize::from(p.offset);
            f.extend_from_slice(&page[at..at + usize::from(p.len)]);
        }
        frames.push((f, pkt.meta));
    }
    Some(frames)
}

/// Writes one plausible packet (sometimes spoiled) at `at`; returns the slots written.
fn craft(h: &Hostile, rng: &mut XorShift, at: u32, next_id: &mut u16, room: u32) -> u32 {
    let mut slots: Vec<[u8; TX_SLOT]> = Vec::new();
    let len = 14 + rng.below(3 * PAGE_SIZE as u64) as usize;
    let mut pieces = Vec::new();
    let mut left = len;
    while left > 0 {
        let page = rng.below(DATA_PAGES as u64) as usize;
        let off = if rng.below(2) == 0 {
            0
        } else {
            rng.below(PAGE_SIZE as u64) as usize
        };
        let n = left.min(1 + rng.below((PAGE_SIZE - off) as u64) as usize);
        pieces.push((h.data_refs[page], off as u16, n as u16));
        left -= n;
    }
    let gso = rng.below(3) == 0;
    let mut csum = match rng.below(3) {
        0 => 0,
        1 => NETTXF_DATA_VALIDATED,
        _ => NETTXF_CSUM_BLANK | NETTXF_DATA_VALIDATED,
    };
    if gso {
        csum |= NETTXF_EXTRA_INFO;
    }
    for (k, &(gref, off, n)) in pieces.iter().enumerate() {
        let mut flags = if k + 1 < pieces.len() {
            NETTXF_MORE_DATA
        } else {
            0
        };
        let size = if k == 0 {
            flags |= csum;
            len as u16
        } else {
            n
        };
        let id = *next_id;
        *next_id = next_id.wrapping_add(1);
        slots.push(req(gref, off, flags, id, size));
        if k == 0 && gso {
            slots.push(
                ExtraInfo::gso(GsoExtra {
                    size: 1 + rng.below(1500) as u16,
                    gso_type: if rng.below(2) == 0 {
                        XEN_NETIF_GSO_TYPE_TCPV4
                    } else {
                        XEN_NETIF_GSO_TYPE_TCPV6
                    },
                    features: 0,
                })
                .to_tx_slot(),
            );
        }
    }
    // Spoil it, a third of the time.
    if rng.below(3) == 0 {
        let s = rng.below(slots.len() as u64) as usize;
        let field = rng.below(7);
        let mut r = TxRequest::parse(&slots[s]);
        match field {
            0 => r.gref = GrantRef(rng.next() as u32),
            1 => r.gref = [h.tx_ref, h.rx_ref][rng.below(2) as usize],
            2 => r.offset = rng.next() as u16,
            3 => r.size = rng.next() as u16,
            4 => r.flags = rng.next() as u16,
            5 => r.id = next_id.wrapping_sub(1 + rng.below(3) as u16),
            _ => r.flags ^= NETTXF_MORE_DATA,
        }
        slots[s] = r.to_bytes();
    }
    let n = (slots.len() as u32).min(room);
    for (k, s) in slots.iter().take(n as usize).enumerate() {
        h.slot(at.wrapping_add(k as u32), s);
    }
    n
}

#[test]
fn hostile_frontend_fuzz_never_panics_or_leaks() {
    const ROUNDS: usize = 3000;
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut h = Hostile::new();
    let mut start = 0u32;
    let mut back = h.backend(start);
    let mut cons = start;
    let mut next_id = 0u16;
    let (mut disconnects, mut frames, mut delivered_rounds) = (0, 0, 0);
    for round in 0..ROUNDS {
        let mut prod = cons;
        let packets = 1 + rng.below(4);
        for _ in 0..packets {
            let room = TX_RING_SIZE - prod.wrapping_sub(cons);
            if rng.below(4) == 0 {
                // Raw garbage slots.
                let n = (1 + rng.below(6) as u32).min(room);
                for k in 0..n {
                    let mut b = [0u8; TX_SLOT];
                    for x in b.iter_mut() {
                        *x = rng.next() as u8;
                    }
                    h.slot(prod.wrapping_add(k), &b);
                }
                prod = prod.wrapping_add(n);
            } else {
                prod = prod.wrapping_add(craft(&h, &mut rng, prod, &mut next_id, room));
            }
        }
        // Scribble on the other header words now and then: a back end trusts none.
        if rng.below(8) == 0 {
            let word = [4usize, 8, 12][rng.below(3) as usize];
            h.tx_ring
                .store_u32(word, rng.next() as u32)
                .expect("scribble");
        }
        prod = match rng.below(16) {
            0 => rng.next() as u32,
            1 => cons.wrapping_add(TX_RING_SIZE + 1 + rng.below(1000) as u32),
            2 => cons.wrapping_sub(1 + rng.below(5) as u32),
            _ => prod,
        };
        h.publish(prod);
        let mut ring = vec![0u8; PAGE_SIZE];
        h.tx_ring.read(0, &mut ring).expect("snapshot");
        let want = expected(&h, &ring, cons, prod);
        let got = poll(&mut back);
        match (want, got) {
            (None, Err(e)) => {
                assert!(!e.reason().is_empty());
                disconnects += 1;
                start = rng.next() as u32;
                back = h.backend(start);
                cons = start;
            }
            (Some(want), Ok(got)) => {
                check_same(&format!("round {round}"), &got, &want);
                frames += got.len();
                delivered_rounds += usize::from(!got.is_empty());
                cons = prod;
            }
            (None, Ok(got)) => {
                panic!(
                    "round {round}: expected a disconnect, got {} frames",
                    got.len()
                )
            }
            (Some(want), Err(e)) => panic!(
                "round {round}: disconnected ({}) where {} frames were due",
                e.reason(),
                want.len()
            ),
        }
    }
    // The fuzz exercised both outcomes, many times.
    assert!(disconnects > ROUNDS / 10, "{disconnects} disconnects");
    assert!(
        delivered_rounds > ROUNDS / 10,
        "{delivered_rounds} rounds delivered"
    );
    assert!(frames > ROUNDS / 5, "{frames} frames");
}
