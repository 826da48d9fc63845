//! An in-memory pair of devices: what one sends, the other receives, in order. For tests
//! that drive a service's loop without a kernel, and for shells that need a device that is
//! not one (a service's host stack, a replay).

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

use crate::{Device, Offload, RxBurst, TxFrame};

type Queue = Arc<Mutex<VecDeque<(Vec<u8>, Offload)>>>;

/// One end of a [`pair`].
#[derive(Debug)]
pub struct MemoryDevice {
    name: String,
    rx: Queue,
    tx: Queue,
    /// Frames queued towards the peer at most; more are dropped, as a full NIC queue drops.
    capacity: usize,
    mtu: Option<u16>,
}

/// Two connected devices named `a` and `b`, each queue holding at most `capacity` frames.
pub fn pair(a: &str, b: &str, capacity: usize) -> (MemoryDevice, MemoryDevice) {
    let q1: Queue = Arc::default();
    let q2: Queue = Arc::default();
    (
        MemoryDevice {
            name: a.to_string(),
            rx: Arc::clone(&q1),
            tx: Arc::clone(&q2),
            capacity,
            mtu: None,
        },
        MemoryDevice {
            name: b.to_string(),
            rx: q2,
            tx: q1,
            capacity,
            mtu: None,
        },
    )
}

impl MemoryDevice {
    /// Sets the MTU the device reports.
    pub fn with_mtu(mut self, mtu: u16) -> Self {
        self.mtu = Some(mtu);
        self
    }

    /// Frames waiting to be received.
    pub fn pending(&self) -> usize {
        self.rx.lock().map_or(0, |q| q.len())
    }
}

fn poisoned() -> io::Error {
    io::Error::other("the peer of this memory device panicked")
}

impl Device for MemoryDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn recv_burst(&mut self, burst: &mut RxBurst, max: usize) -> io::Result<usize> {
        let mut q = self.rx.lock().map_err(|_| poisoned())?;
        let mut n = 0;
        while n < max {
            let Some((f, o)) = q.pop_front() else { break };
            burst.push(&f, o);
            n += 1;
        }
        Ok(n)
    }

    fn send_burst(&mut self, frames: &[TxFrame<'_>]) -> io::Result<usize> {
        let mut q = self.tx.lock().map_err(|_| poisoned())?;
        for f in frames {
            if q.len() < self.capacity {
                q.push_back((f.frame.to_vec(), f.offload));
            }
        }
        Ok(frames.len())
    }

    fn mtu(&self) -> Option<u16> {
        self.mtu
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_cross_in_order_with_their_metadata_and_overflow_drops() {
        let (mut a, mut b) = pair("vif3.0", "eth0", 2);
        let o = Offload {
            csum: crate::Csum::Verified,
            gso: None,
        };
        let sent = a
            .send_burst(&[
                TxFrame {
                    frame: b"one",
                    offload: o,
                },
                TxFrame {
                    frame: b"two",
                    offload: Offload::NONE,
                },
                TxFrame {
                    frame: b"three",
                    offload: Offload::NONE,
                },
            ])
            .expect("send");
        assert_eq!(sent, 3, "a full queue drops, it does not refuse");
        assert_eq!(b.pending(), 2);
        let mut burst = RxBurst::new();
        assert_eq!(b.recv_burst(&mut burst, 8).expect("recv"), 2);
        assert_eq!(burst.frame(0), Some((&b"one"[..], o)));
        assert_eq!(burst.frame(1), Some((&b"two"[..], Offload::NONE)));
        assert_eq!(a.pending(), 0, "nothing comes back to the sender");
        b.send(b"reply").expect("send");
        burst.clear();
        assert_eq!(a.recv_burst(&mut burst, 8).expect("recv"), 1);
        assert_eq!(burst.frame(0).map(|f| f.0), Some(&b"reply"[..]));
    }
}
