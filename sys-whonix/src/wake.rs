//! How tokio tasks (Tor streams, lookups) wake the router loop, which sleeps in epoll: one
//! byte on a socket pair, written only when the loop has not been woken since it last looked.
//!
//! The flag saves a system call per wake while the loop already has one pending. The order in
//! [`WakeRx::take`] is what makes it safe: the bytes are read first and the flag cleared after,
//! and the loop looks at its channels only after both. A task sends its message before it
//! calls [`Waker::wake`], so:
//! - a wake that finds the flag clear writes a byte, which the loop either reads in a later
//!   `take` (and then looks at the channels) or has still to read (the descriptor is readable);
//! - a wake that finds the flag set came after the `take` that cleared it last and before the
//!   one that will clear it next, whose channel look follows it and sees the message.
//!
//! Clearing first and reading after loses wakes: a wake between the two writes a byte the
//! read then swallows, the flag stays set with no byte behind it, and every later wake is
//! suppressed while the loop sleeps. A stream then stalls until its client sends something
//! (the likely cause of a rare first-fetch timeout the lab test met in CI before this order
//! was fixed).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The tasks' end: cheap to clone (in an `Arc`), callable from any thread.
#[derive(Debug)]
pub struct Waker {
    pending: Arc<AtomicBool>,
    tx: UnixStream,
}

/// The loop's end: a descriptor to poll, and [`WakeRx::take`] once it is readable.
#[derive(Debug)]
pub struct WakeRx {
    pending: Arc<AtomicBool>,
    rx: UnixStream,
}

/// A connected pair, both ends non-blocking.
pub fn pair() -> std::io::Result<(Arc<Waker>, WakeRx)> {
    let (rx, tx) = UnixStream::pair()?;
    rx.set_nonblocking(true)?;
    tx.set_nonblocking(true)?;
    let pending = Arc::new(AtomicBool::new(false));
    Ok((
        Arc::new(Waker {
            pending: pending.clone(),
            tx,
        }),
        WakeRx { pending, rx },
    ))
}

impl Waker {
    /// Call after the message is in its channel, never before.
    pub fn wake(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            // A full socket buffer (EAGAIN) leaves the descriptor readable: nothing lost.
            let _ = (&self.tx).write(&[1]);
        }
    }
}

impl WakeRx {
    /// Re-arms the wake-up; call before looking at the channels.
    pub fn take(&self) {
        let mut b = [0u8; 64];
        while matches!((&self.rx).read(&mut b), Ok(n) if n > 0) {}
        self.pending.store(false, Ordering::Release);
    }
}

impl AsRawFd for WakeRx {
    fn as_raw_fd(&self) -> RawFd {
        self.rx.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// Waits up to `ms` for a byte, as the loop's poll does; reads what is there (the loop's
    /// `take` would read it next anyway).
    fn readable(rx: &WakeRx, ms: u64) -> bool {
        let mut b = [0u8; 64];
        if ms == 0 {
            return (&rx.rx).read(&mut b).is_ok_and(|n| n > 0);
        }
        rx.rx.set_nonblocking(false).expect("blocking");
        rx.rx
            .set_read_timeout(Some(Duration::from_millis(ms)))
            .expect("timeout");
        let got = (&rx.rx).read(&mut b).is_ok_and(|n| n > 0);
        rx.rx.set_nonblocking(true).expect("non-blocking");
        got
    }

    #[test]
    fn a_wake_after_take_makes_the_descriptor_readable_again() {
        let (w, rx) = pair().expect("pair");
        assert!(!readable(&rx, 0));
        w.wake();
        w.wake();
        rx.take();
        assert!(!readable(&rx, 0), "take left the descriptor readable");
        w.wake();
        assert!(readable(&rx, 0), "the wake after take was lost");
    }

    /// The router loop's life: one task wakes it all the time (a busy bulk stream), another
    /// sends a message, waits for the loop to answer it, and sends the next (a stream that
    /// waits on its peer). The loop sleeps in poll between takes. With the old order (clear,
    /// then read), a busy task's wake between the two left the flag set with no byte behind
    /// it: every later wake was suppressed, and the waiting task's message sat unseen while
    /// the loop slept out its timeout. Here the loop must never sleep a whole second with a
    /// message waiting.
    #[test]
    fn no_wake_is_lost_while_a_busy_task_races_the_loop() {
        const ROUNDS: usize = 20_000;
        let (w, rx) = pair().expect("pair");
        let stop = Arc::new(AtomicBool::new(false));
        let busy = {
            let (w, stop) = (w.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    w.wake();
                }
            })
        };
        let (to_loop, msgs) = mpsc::channel::<usize>();
        let (to_task, acks) = mpsc::channel::<usize>();
        let waiting = std::thread::spawn(move || {
            for i in 0..ROUNDS {
                to_loop.send(i).expect("send");
                w.wake();
                if acks.recv_timeout(Duration::from_secs(10)) != Ok(i) {
                    return Err(i);
                }
            }
            Ok(())
        });
        let started = Instant::now();
        let mut answered = 0;
        while answered < ROUNDS {
            let woken = readable(&rx, 1000);
            rx.take();
            let mut got = 0;
            while let Ok(i) = msgs.try_recv() {
                to_task.send(i).expect("ack");
                got += 1;
            }
            assert!(
                woken || got == 0,
                "a wake was lost: a message waited while the loop slept a second \
                 (round {answered} of {ROUNDS})"
            );
            answered += got;
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "{answered} of {ROUNDS} rounds in two minutes"
            );
        }
        stop.store(true, Ordering::Relaxed);
        busy.join().expect("busy task");
        assert_eq!(waiting.join().expect("waiting task"), Ok(()));
    }
}
