//! The TAP device against the real kernel: frames written to the device reach the kernel's
//! network stack as if a NIC received them, and the kernel's answers come back out of the
//! device with their virtio_net header, as QEMU sees them for a guest's virtio-net.
//!
//! The test runs itself a second time inside a network namespace it creates (`ip netns exec`),
//! so the TAP device, its address and the kernel's replies never touch the host's network.

use std::process::Command;
use std::time::{Duration, Instant};

use etherparse::{Icmpv4Type, NetSlice, SlicedPacket, TransportSlice};
use vif_backend::offload::{Csum, Offload};
use vif_backend::tap::Tap;
use vif_backend::{sys, Device, RxBurst, TxFrame};

const TAP: &str = "qtap0";
/// The kernel's side of the link (a netvm gateway, say) and the peer we play (a client qube).
const KERNEL_IP: [u8; 4] = [10, 137, 0, 1];
const PEER_IP: [u8; 4] = [10, 137, 0, 5];
const PEER_MAC: [u8; 6] = [0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x05];

#[test]
fn tap_device_exchanges_frames_with_the_kernel() {
    if testkit::netns_child().is_some() {
        child();
        return;
    }
    if !testkit::require_root("tap_device_exchanges_frames_with_the_kernel") {
        return;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        testkit::not_run(
            "tap_device_exchanges_frames_with_the_kernel",
            "/dev/net/tun is missing",
        );
        return;
    }
    testkit::run_in_own_netns("tap_device_exchanges_frames_with_the_kernel", "vbtap-", &[]);
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn child() {
    let mut tap = Tap::open(TAP).expect("open the TAP device");
    assert_eq!(tap.name(), TAP);
    run(Command::new("ip").args(["link", "set", TAP, "mtu", "1400", "up"]));
    run(Command::new("ip").args(["addr", "add", "10.137.0.1/24", "dev", TAP]));
    // The device reports the link's MTU as the kernel has it, not a configured figure.
    assert_eq!(tap.mtu(), Some(1400));
    assert!(
        sys::if_index(TAP).is_some(),
        "the TAP device has no ifindex"
    );
    let kernel_mac = read_mac(TAP);

    // ARP (RFC 826): who has 10.137.0.1? The kernel answers from its address on the TAP.
    send(&mut tap, &arp_request());
    let reply = recv_until(&mut tap, |f| f.len() >= 42 && f[12..14] == [0x08, 0x06]);
    assert_eq!(&reply[0..6], &PEER_MAC, "ARP reply not addressed to us");
    assert_eq!(
        &reply[6..12],
        &kernel_mac,
        "ARP reply not from the TAP's MAC"
    );
    assert_eq!(&reply[20..22], &[0, 2], "not an ARP reply");
    assert_eq!(&reply[22..28], &kernel_mac, "sender hardware address");
    assert_eq!(&reply[28..32], &KERNEL_IP, "sender protocol address");
    assert_eq!(&reply[38..42], &PEER_IP, "target protocol address");

    // ICMP echo (RFC 792) through the kernel's IPv4 stack: the reply comes back out of the
    // device, addressed to the MAC the kernel learnt from our ARP request.
    send(&mut tap, &echo_request(&kernel_mac, 0x5151, 7));
    let reply = recv_until(&mut tap, |f| f.len() >= 34 && f[12..14] == [0x08, 0x00]);
    assert_eq!(&reply[0..6], &PEER_MAC);
    let sliced = SlicedPacket::from_ethernet(&reply).expect("kernel's reply parses");
    let Some(NetSlice::Ipv4(ip)) = &sliced.net else {
        panic!("not IPv4: {sliced:?}")
    };
    assert_eq!(ip.header().source(), KERNEL_IP);
    assert_eq!(ip.header().destination(), PEER_IP);
    let Some(TransportSlice::Icmpv4(icmp)) = &sliced.transport else {
        panic!("not ICMP: {sliced:?}")
    };
    match icmp.icmp_type() {
        Icmpv4Type::EchoReply(e) => {
            assert_eq!((e.id, e.seq), (0x5151, 7), "echo id/seq not mirrored");
        }
        other => panic!("expected an echo reply, got {other:?}"),
    }
    assert_eq!(icmp.payload(), b"qubes tap echo payload");
    // The kernel filled in the checksums itself (no offload negotiated on this TAP).
    assert_eq!(checksum(&reply[14..34]), 0, "IPv4 header checksum");
    assert_eq!(checksum(&reply[34..]), 0, "ICMP checksum");

    // A frame shorter than an Ethernet header: the kernel may refuse it or drop it, as a NIC
    // would; either way the device keeps working afterwards.
    let short = [0u8; 8];
    let _ = tap.send_burst(&[TxFrame {
        frame: &short,
        offload: Offload::default(),
    }]);
    send(&mut tap, &echo_request(&kernel_mac, 0x5151, 8));
    let reply = recv_until(&mut tap, |f| {
        f.len() >= 42 && f[12..14] == [0x08, 0x00] && f[34] == 0 && f[40..42] == [0, 8]
    });
    assert_eq!(&reply[26..30], &KERNEL_IP);
}

fn read_mac(ifname: &str) -> [u8; 6] {
    let text = std::fs::read_to_string(format!("/sys/class/net/{ifname}/address"))
        .expect("read the TAP's MAC");
    let mut mac = [0u8; 6];
    for (d, part) in mac.iter_mut().zip(text.trim().split(':')) {
        *d = u8::from_str_radix(part, 16).expect("MAC octet");
    }
    mac
}

fn send(tap: &mut Tap, frame: &[u8]) {
    let n = tap
        .send_burst(&[TxFrame {
            frame,
            offload: Offload::default(),
        }])
        .expect("write to the TAP device");
    assert_eq!(n, 1);
}

/// Reads frames until one matches (the kernel may also send IPv6 or other chatter).
fn recv_until(tap: &mut Tap, want: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut burst = RxBurst::new();
    loop {
        burst.clear();
        let n = tap
            .recv_burst(&mut burst, 16)
            .expect("read from the TAP device");
        for i in 0..n {
            let (frame, offload) = burst.frame(i).expect("frame within the burst");
            if want(frame) {
                // Without TUNSETOFFLOAD the kernel never hands us a partial checksum.
                assert!(
                    !matches!(offload.csum, Csum::Partial { .. }),
                    "partial checksum on a TAP without offloads: {offload:?}"
                );
                assert!(offload.gso.is_none(), "GSO on a TAP without offloads");
                return frame.to_vec();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no matching frame from the kernel within 5 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn arp_request() -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&PEER_IP);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&KERNEL_IP);
    f
}

fn echo_request(dst_mac: &[u8; 6], id: u16, seq: u16) -> Vec<u8> {
    let payload = b"qubes tap echo payload";
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(payload);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&PEER_IP);
    ip.extend_from_slice(&KERNEL_IP);
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(dst_mac);
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

/// The Internet checksum (RFC 1071); 0 over a block that carries its own correct checksum.
fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from(c[0]) << 8
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
