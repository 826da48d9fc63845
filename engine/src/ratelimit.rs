//! ICMP error rate limiting, as Linux limits the errors a router sends.
//!
//! A router that answers every refused or expired packet with an error is an amplifier and a
//! reflector: a hostile qube sending 500 packets to a refused port would have 500 errors sent
//! back, and from the uplink side anyone could make us send errors to an address of their
//! choice. Linux limits twice, and so do we:
//!
//! - a global budget of `icmp_msgs_per_sec` (1000) with a burst of `icmp_msgs_burst` (50),
//!   shared by IPv4 and IPv6 (net/ipv4/icmp.c `icmp_global_allow`);
//! - a token bucket per destination (net/ipv4/inetpeer.c `inet_peer_xrlim_allow`): one error
//!   per `icmp_ratelimit` (1000 ms), with a burst of `XRLIM_BURST_FACTOR` (6) and a new
//!   destination starting with a full bucket. For IPv6 (net/ipv6/icmp.c `icmpv6_xrlim_allow`)
//!   the interval is `icmpv6_time` (1000 ms) toward a host route, as the Qubes vif routes to
//!   clients are, and a sixteenth of it toward a destination behind the default route
//!   (`tmo >>= (128 - plen) >> 5`).
//!
//! What Linux leaves unlimited stays unlimited: fragmentation-needed and packet-too-big
//! (path MTU discovery must not be starved, `icmpv4_mask_allow` / `icmpv6_mask_allow`), and
//! echo replies, which are not errors and are not built through here.
//!
//! The per-destination table is bounded: when it is full, destinations whose bucket has
//! refilled (indistinguishable from new ones) are forgotten; if none has, the error is not
//! sent. Errors are never owed, so failing toward silence is safe.

use std::net::IpAddr;

use rustc_hash::FxHashMap;

const MS: u64 = 1_000_000;
/// `icmp_ratelimit` and `icmpv6_time`: 1000 ms (HZ).
pub const PEER_INTERVAL: u64 = 1000 * MS;
/// `XRLIM_BURST_FACTOR`.
pub const PEER_BURST: u64 = 6;
/// `icmp_msgs_per_sec`: one message per millisecond.
pub const GLOBAL_INTERVAL: u64 = MS;
/// `icmp_msgs_burst`.
pub const GLOBAL_BURST: u64 = 50;
/// Destinations remembered at once.
pub const MAX_PEERS: usize = 4096;

/// A token bucket in nanoseconds of credit: each message costs `interval`.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: u64,
    last: u64,
}

impl Bucket {
    fn full(now: u64, interval: u64, burst: u64) -> Self {
        Bucket {
            tokens: interval * burst,
            last: now,
        }
    }

    /// `inet_peer_xrlim_allow`: credit accrues with time up to `burst` messages' worth.
    fn allow(&mut self, now: u64, interval: u64, burst: u64) -> bool {
        let elapsed = now.saturating_sub(self.last);
        self.last = now.max(self.last);
        self.tokens = self.tokens.saturating_add(elapsed).min(interval * burst);
        if self.tokens >= interval {
            self.tokens -= interval;
            true
        } else {
            false
        }
    }

    fn refilled(&self, now: u64, interval: u64, burst: u64) -> bool {
        self.tokens.saturating_add(now.saturating_sub(self.last)) >= interval * burst
    }
}

/// The limiter: the global budget and one bucket per destination.
#[derive(Debug)]
pub struct IcmpLimiter {
    global: Bucket,
    peers: FxHashMap<IpAddr, (Bucket, u64)>,
    max_peers: usize,
    /// Errors not sent because of a limit.
    suppressed: u64,
}

impl Default for IcmpLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl IcmpLimiter {
    pub fn new() -> Self {
        Self::with_max_peers(MAX_PEERS)
    }

    /// A limiter that remembers at most `max_peers` destinations.
    pub fn with_max_peers(max_peers: usize) -> Self {
        IcmpLimiter {
            global: Bucket::full(0, GLOBAL_INTERVAL, GLOBAL_BURST),
            peers: FxHashMap::default(),
            max_peers,
            suppressed: 0,
        }
    }

    /// Whether an ICMP error may be sent to `dst` at `now` (ns). `on_host_route`: `dst` is
    /// reached by a host route (a client), which matters for IPv6's interval.
    pub fn allow(&mut self, now: u64, dst: IpAddr, on_host_route: bool) -> bool {
        let ok = self.check(now, dst, on_host_route);
        if !ok {
            self.suppressed += 1;
        }
        ok
    }

    fn check(&mut self, now: u64, dst: IpAddr, on_host_route: bool) -> bool {
        if !self.global.allow(now, GLOBAL_INTERVAL, GLOBAL_BURST) {
            return false;
        }
        let interval = match dst {
            IpAddr::V6(_) if !on_host_route => PEER_INTERVAL >> 4,
            _ => PEER_INTERVAL,
        };
        if !self.peers.contains_key(&dst) && self.peers.len() >= self.max_peers {
            self.peers
                .retain(|_, (b, iv)| !b.refilled(now, *iv, PEER_BURST));
            if self.peers.len() >= self.max_peers {
                return false;
            }
        }
        let (bucket, _) = self
            .peers
            .entry(dst)
            .or_insert_with(|| (Bucket::full(now, interval, PEER_BURST), interval));
        bucket.allow(now, interval, PEER_BURST)
    }

    /// Errors withheld so far.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }

    /// Destinations currently remembered.
    pub fn peers(&self) -> usize {
        self.peers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn a(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn a_burst_of_six_then_one_per_second_per_destination() {
        let mut l = IcmpLimiter::new();
        let t0 = 100 * S;
        let sent = (0..500)
            .filter(|i| l.allow(t0 + i * MS, a("10.137.0.10"), true))
            .count();
        // 500 refused packets within half a second: the burst and nothing more.
        assert_eq!(sent, 6);
        assert_eq!(l.suppressed(), 494);
        // Another destination has its own bucket.
        assert!(l.allow(t0 + 500 * MS, a("10.137.0.11"), true));
        // One second later, exactly one more.
        assert!(l.allow(t0 + 1500 * MS, a("10.137.0.10"), true));
        assert!(!l.allow(t0 + 1501 * MS, a("10.137.0.10"), true));
    }

    #[test]
    fn ipv6_beyond_the_default_route_refills_sixteen_times_faster() {
        let mut l = IcmpLimiter::new();
        let t0 = 10 * S;
        let dst = a("2001:db8::1");
        for i in 0..6 {
            assert!(l.allow(t0 + i, dst, false));
        }
        assert!(!l.allow(t0 + 6, dst, false));
        assert!(l.allow(t0 + 6 + PEER_INTERVAL / 16, dst, false));
        // A client (host route) waits the full second.
        let c = a("fd09:24ef:4179::a89:a");
        for i in 0..6 {
            assert!(l.allow(t0 + i, c, true));
        }
        assert!(!l.allow(t0 + 100 * MS, c, true));
    }

    #[test]
    fn the_global_budget_caps_many_destinations() {
        let mut l = IcmpLimiter::new();
        let t0 = 5 * S;
        let sent = (0..1000u32)
            .filter(|&i| {
                let d = IpAddr::V4(std::net::Ipv4Addr::from(0xc612_0000 + i));
                l.allow(t0, d, false)
            })
            .count();
        assert_eq!(sent as u64, GLOBAL_BURST);
        // A millisecond later the global budget has one more.
        assert!(l.allow(t0 + MS, a("198.18.1.1"), false));
    }

    #[test]
    fn the_table_stays_bounded_and_forgets_refilled_destinations() {
        let mut l = IcmpLimiter::with_max_peers(8);
        let mut now = S;
        for i in 0..20u32 {
            now += GLOBAL_INTERVAL; // keep the global budget out of the way
            let d = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert_eq!(l.allow(now, d, false), i < 8, "destination {i}");
            assert!(l.peers() <= 8);
        }
        // Every remembered destination is recent: a new one is refused rather than tracked.
        now += GLOBAL_INTERVAL;
        assert!(!l.allow(now, a("192.0.2.1"), false));
        // Once their buckets have refilled they are forgotten and new ones are served.
        now += PEER_INTERVAL * PEER_BURST;
        assert!(l.allow(now, a("192.0.2.1"), false));
        assert_eq!(l.peers(), 1);
    }
}
