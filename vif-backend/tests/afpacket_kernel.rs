//! The AF_PACKET device against the real kernel, on a veth pair in a namespace the test
//! creates (it runs itself again inside it with `ip netns exec`).
//!
//! The kernel takes the 802.1Q tag off a received frame before packet sockets see it
//! (`skb_vlan_untag` in `__netif_receive_skb_core`) and reports it only in `PACKET_AUXDATA`.
//! The device must hand the frame on as it was on the wire, tag included, or a service would
//! forward a tagged frame as if it were untagged.

use std::process::Command;
use std::time::{Duration, Instant};

use vif_backend::afpacket::PacketSocket;
use vif_backend::offload::Offload;
use vif_backend::{Device, RxBurst, TxFrame};

const NAME: &str = "vlan_tags_survive_the_kernel_untagging_them";

#[test]
fn vlan_tags_survive_the_kernel_untagging_them() {
    if testkit::netns_child().is_some() {
        child();
        return;
    }
    if !testkit::require_root(NAME) {
        return;
    }
    testkit::run_in_own_netns(NAME, "vbpkt-", &[]);
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
    run(Command::new("ip").args(["link", "add", "va", "type", "veth", "peer", "name", "vb"]));
    for l in ["va", "vb"] {
        run(Command::new("ip").args(["link", "set", l, "up"]));
        // No IPv6 chatter of the kernel's own on the link.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{l}/disable_ipv6"), "1");
    }
    let mut a = PacketSocket::open("va").expect("open va");
    let mut b = PacketSocket::open("vb").expect("open vb");

    let payload: Vec<u8> = (0..46u8).collect();
    let mut plain = vec![
        0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x00, 0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x0a,
    ];
    plain.extend_from_slice(&[0x08, 0x00]);
    plain.extend_from_slice(&payload);
    // IEEE 802.1Q: TPID 0x8100, TCI priority 3 / VLAN 5, then the original ethertype.
    let mut tagged = plain[..12].to_vec();
    tagged.extend_from_slice(&[0x81, 0x00, 0x60, 0x05]);
    tagged.extend_from_slice(&plain[12..]);

    for f in [&tagged, &plain] {
        let n = a
            .send_burst(&[TxFrame {
                frame: f,
                offload: Offload::default(),
            }])
            .expect("send on va");
        assert_eq!(n, 1);
    }
    let got = recv_n(&mut b, 2);
    assert_eq!(got[0], tagged, "the tagged frame arrives with its tag");
    assert_eq!(got[1], plain, "an untagged frame arrives untouched");
}

fn recv_n(dev: &mut PacketSocket, n: usize) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    let mut burst = RxBurst::new();
    while got.len() < n {
        burst.clear();
        let k = dev.recv_burst(&mut burst, 16).expect("recv");
        for i in 0..k {
            let (f, _) = burst.frame(i).expect("frame");
            // Only the frames we sent: our test MAC as destination.
            if f.starts_with(&[0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x00]) {
                got.push(f.to_vec());
            }
        }
        assert!(Instant::now() < deadline, "got {} of {n} frames", got.len());
        std::thread::sleep(Duration::from_millis(5));
    }
    got
}
