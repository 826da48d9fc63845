//! Frames per second and Gbit/s through a netif ring pair (our netfront and netback over the
//! repository's emulated hypervisor), with and without GSO, beside AF_PACKET over a veth pair
//! for the same frames, printed as one table. Run by `bench/xen-rings.sh` (root: the veth pair
//! lives in a network namespace the bench makes and removes).
//!
//! Each ring row has the sender and the receiver in two threads of this process, each its
//! own domain with its own connection to the broker: the pages are memfds each maps for
//! itself, and each side sleeps on its own event channel (an eventfd) when it cannot move,
//! as two domains do. The AF_PACKET rows run in a child process inside the namespace, the
//! sender on one veth end and the receiver on the other. Every row checks at the receiver
//! that the frames and bytes sent arrived, and says what was lost (AF_PACKET may drop when
//! the receiver's socket buffer is full; a ring never does, it makes the sender wait).

use std::process::Command;
use std::time::{Duration, Instant};

use vif_backend::afpacket::PacketSocket;
use vif_backend::offload::{Csum, Gso, GsoKind, Offload};
use vif_backend::xen::emul::{Domain, Hypervisor};
use vif_backend::xen::netback::Netback;
use vif_backend::xen::netfront::Netfront;
use vif_backend::xen::netif::{Features, GsoInfo, GsoType, PacketMeta};
use vif_backend::xen::EventChannels;
use vif_backend::{sys, Device, RxBurst, TxFrame};

/// The MSS of a 1500-byte MTU over IPv4 with TCP timestamps, as Linux segments.
const MSS: u16 = 1448;
/// A wire frame: Ethernet + IPv4 + TCP (20 + 12 bytes of options) + MSS.
const WIRE: usize = 14 + 20 + 32 + MSS as usize;
/// A GSO super-frame as Linux's TSO hands them out (45 segments, under 64 KiB of IP).
const SUPER: usize = 14 + 20 + 32 + 45 * MSS as usize;

const FRONT: u16 = 7;
const BACK: u16 = 0;

/// An Ethernet/IPv4/TCP frame of `len` bytes with consistent lengths.
fn tcp_frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    let ip_len = (len - 14) as u16;
    f[16..18].copy_from_slice(&ip_len.to_be_bytes());
    f[22] = 64;
    f[23] = 6;
    f[26..30].copy_from_slice(&[10, 137, 0, 10]);
    f[30..34].copy_from_slice(&[198, 18, 0, 10]);
    f[34..36].copy_from_slice(&40000u16.to_be_bytes());
    f[36..38].copy_from_slice(&80u16.to_be_bytes());
    f[46] = 0x80; // data offset 8 words (timestamps)
    f[47] = 0x10; // ACK
    for (i, b) in f[66..].iter_mut().enumerate() {
        *b = i as u8;
    }
    f
}

fn gso_meta() -> PacketMeta {
    PacketMeta {
        csum_blank: true,
        data_validated: true,
        gso: Some(GsoInfo {
            ty: GsoType::TcpV4,
            mss: MSS,
        }),
    }
}

struct Row {
    name: String,
    frames: u64,
    bytes: u64,
    lost: u64,
    secs: f64,
    gso: bool,
}

fn wait(fd: std::os::fd::RawFd) {
    let mut ready = Vec::new();
    let _ = sys::poll_readable(&[fd], 100, &mut ready);
}

/// Frames from netfront (the client's TX) to netback, or the other way (`to_front`).
fn ring_row(to_front: bool, gso: bool, secs: f64) -> Row {
    let dir = tempfile_dir();
    let hv = Hypervisor::serve(dir.join("hv.sock")).expect("broker");
    let d7 = Domain::connect(hv.path(), FRONT).expect("dom7");
    let d0 = Domain::connect(hv.path(), BACK).expect("dom0");
    let mut front = Netfront::new(
        d7.grants(),
        d7.events().expect("events"),
        BACK,
        Features::ALL,
    )
    .expect("netfront");
    let mut e0 = d0.events().expect("events");
    let port = e0
        .bind_interdomain(FRONT, front.event_port())
        .expect("bind");
    let mut back = Netback::new(
        d0.grants(),
        e0,
        FRONT,
        front.tx_ring_ref(),
        front.rx_ring_ref(),
        port,
        Features::ALL,
    )
    .expect("netback");
    let (frame, meta) = if gso {
        (tcp_frame(SUPER), gso_meta())
    } else {
        (tcp_frame(WIRE), PacketMeta::default())
    };
    let len = frame.len() as u64;
    let deadline = Duration::from_secs_f64(secs);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let start = Instant::now();
    let (sent, got, bytes) = if !to_front {
        let stop2 = stop.clone();
        let rx = std::thread::spawn(move || {
            let (mut n, mut b) = (0u64, 0u64);
            loop {
                let k = back
                    .poll_tx(&mut |f: &[u8], _: &PacketMeta| {
                        n += 1;
                        b += f.len() as u64;
                    })
                    .expect("poll_tx");
                if k == 0 && !back.pending_tx().expect("pending") {
                    if stop2.load(std::sync::atomic::Ordering::Acquire) {
                        // The sender is done; a last look after its final notification.
                        wait(back.raw_fd());
                        back.handle_event().expect("event");
                        let k = back
                            .poll_tx(&mut |f: &[u8], _: &PacketMeta| {
                                n += 1;
                                b += f.len() as u64;
                            })
                            .expect("poll_tx");
                        if k == 0 {
                            return (n, b);
                        }
                        continue;
                    }
                    wait(back.raw_fd());
                    back.handle_event().expect("event");
                }
            }
        });
        let mut sent = 0u64;
        while start.elapsed() < deadline {
            if front.send(&frame, &meta).expect("send") {
                sent += 1;
            } else {
                wait(front.raw_fd());
                front.handle_event().expect("event");
                front.tx_free().expect("reclaim");
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Release);
        let (n, b) = rx.join().expect("receiver");
        (sent, n, b)
    } else {
        let stop2 = stop.clone();
        let rx = std::thread::spawn(move || {
            let (mut n, mut b) = (0u64, 0u64);
            loop {
                let k = front
                    .recv(&mut |f: &[u8], _: &PacketMeta| {
                        n += 1;
                        b += f.len() as u64;
                    })
                    .expect("recv");
                if k == 0 && !front.pending_rx().expect("pending") {
                    if stop2.load(std::sync::atomic::Ordering::Acquire) {
                        wait(front.raw_fd());
                        front.handle_event().expect("event");
                        let k = front
                            .recv(&mut |f: &[u8], _: &PacketMeta| {
                                n += 1;
                                b += f.len() as u64;
                            })
                            .expect("recv");
                        if k == 0 {
                            return (n, b);
                        }
                        continue;
                    }
                    wait(front.raw_fd());
                    front.handle_event().expect("event");
                }
            }
        });
        let mut sent = 0u64;
        while start.elapsed() < deadline {
            if back.send_rx(&frame, &meta).expect("send_rx") {
                sent += 1;
            } else {
                wait(back.raw_fd());
                back.handle_event().expect("event");
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Release);
        let (n, b) = rx.join().expect("receiver");
        (sent, n, b)
    };
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(bytes, got * len, "a frame arrived with another length");
    drop(hv);
    let _ = std::fs::remove_dir_all(&dir);
    Row {
        name: format!(
            "{}, {}",
            if to_front {
                "netback -> netfront (ring, emulation)"
            } else {
                "netfront -> netback (ring, emulation)"
            },
            if gso {
                "GSO 64 KiB"
            } else {
                "1514-byte frames"
            }
        ),
        frames: got,
        bytes,
        lost: sent - got,
        secs,
        gso,
    }
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "ring-bench-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    ));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// In the namespace: AF_PACKET from veth end `a` to end `b`; prints `frames bytes lost secs`.
fn afpacket_child(gso: bool, secs: f64) {
    let mut tx = PacketSocket::open("rba").expect("AF_PACKET on rba");
    let mut rx = PacketSocket::open("rbb").expect("AF_PACKET on rbb");
    let (frame, offload) = if gso {
        (
            tcp_frame(SUPER),
            Offload {
                csum: Csum::Partial {
                    start: 34,
                    offset: 16,
                },
                gso: Some(Gso {
                    kind: GsoKind::TcpV4,
                    size: MSS,
                    hdr_len: 66,
                    ecn: false,
                }),
            },
        )
    } else {
        (tcp_frame(WIRE), Offload::NONE)
    };
    let len = frame.len() as u64;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let receiver = std::thread::spawn(move || {
        let mut burst = RxBurst::new();
        let (mut n, mut b) = (0u64, 0u64);
        let mut idle_since: Option<Instant> = None;
        loop {
            burst.clear();
            let k = rx.recv_burst(&mut burst, 64).expect("recv");
            for i in 0..burst.len() {
                if let Some((f, _)) = burst.frame(i) {
                    if f.len() as u64 == len {
                        n += 1;
                        b += f.len() as u64;
                    }
                }
            }
            if k == 0 {
                if stop2.load(std::sync::atomic::Ordering::Acquire) {
                    let t = *idle_since.get_or_insert_with(Instant::now);
                    if t.elapsed() > Duration::from_millis(300) {
                        return (n, b);
                    }
                }
                if let Some(fd) = rx.raw_fd() {
                    wait(fd);
                }
            } else {
                idle_since = None;
            }
        }
    });
    let batch: Vec<TxFrame<'_>> = (0..32)
        .map(|_| TxFrame {
            frame: &frame,
            offload,
        })
        .collect();
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_secs_f64(secs) {
        match tx.send_burst(&batch) {
            Ok(k) => sent += k as u64,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("send: {e}"),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Release);
    let (n, b) = receiver.join().expect("receiver");
    println!("{n} {b} {} {secs}", sent.saturating_sub(n));
}

fn afpacket_row(gso: bool, secs: f64) -> Row {
    let ns = format!("ring-bench-{}", std::process::id());
    let ip = |args: &[&str]| {
        let ok = Command::new("ip")
            .args(args)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip {}", args.join(" "));
    };
    ip(&["netns", "add", &ns]);
    let result = std::panic::catch_unwind(|| {
        ip(&[
            "-n", &ns, "link", "add", "rba", "type", "veth", "peer", "name", "rbb",
        ]);
        ip(&["-n", &ns, "link", "set", "rba", "up"]);
        ip(&["-n", &ns, "link", "set", "rbb", "up"]);
        let out = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(std::env::current_exe().expect("exe"))
            .args([
                "--afpacket-child",
                if gso { "gso" } else { "plain" },
                &secs.to_string(),
            ])
            .output()
            .expect("child");
        assert!(
            out.status.success(),
            "AF_PACKET child: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let v: Vec<f64> = text
            .split_whitespace()
            .map(|w| w.parse().expect("number"))
            .collect();
        (v[0] as u64, v[1] as u64, v[2] as u64, v[3])
    });
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    let (frames, bytes, lost, secs) = result.expect("AF_PACKET row");
    Row {
        name: format!(
            "AF_PACKET over veth, {}",
            if gso {
                "GSO 64 KiB (vnet_hdr)"
            } else {
                "1514-byte frames"
            }
        ),
        frames,
        bytes,
        lost,
        secs,
        gso,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--afpacket-child") {
        let secs = args[3].parse().expect("seconds");
        afpacket_child(args[2] == "gso", secs);
        return;
    }
    let secs: f64 = std::env::var("SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let mut rows = Vec::new();
    for gso in [false, true] {
        rows.push(ring_row(false, gso, secs));
        rows.push(ring_row(true, gso, secs));
        rows.push(afpacket_row(gso, secs));
    }
    println!(
        "\n{:<50} {:>12} {:>9} {:>16} {:>8}",
        "path (same frames)", "frames/s", "Gbit/s", "wire frames/s", "lost"
    );
    for r in &rows {
        let fps = r.frames as f64 / r.secs;
        let gbps = r.bytes as f64 * 8.0 / r.secs / 1e9;
        let wire = if r.gso {
            format!("{:.0}", r.bytes as f64 / WIRE as f64 / r.secs)
        } else {
            "-".to_string()
        };
        println!(
            "{:<50} {:>12.0} {:>9.2} {:>16} {:>8}",
            r.name, fps, gbps, wire, r.lost
        );
    }
    println!(
        "\n{WIRE}-byte wire frames (MSS {MSS}); GSO super-frames of {SUPER} bytes (45 segments). \
         Ring rows: two threads, each its own domain over the emulated hypervisor. {secs} s each."
    );
}
