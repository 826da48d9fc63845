//! The engine's time: a monotonic instant the shell hands in with every call.
//!
//! The engine never reads a clock. A daemon passes the time since it started (from its own
//! monotonic clock), a replay passes the capture's timestamps, a test passes whatever it
//! likes; the same inputs give the same outputs. An [`Instant`] is a count of nanoseconds
//! from an origin the shell chooses, so two instants from different shells do not compare.

use std::fmt;
use std::ops::{Add, AddAssign};
use std::time::Duration;

/// A point on the shell's monotonic clock, in nanoseconds from the shell's origin.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant(u64);

impl Instant {
    /// The shell's origin.
    pub const ZERO: Instant = Instant(0);

    pub const fn from_nanos(ns: u64) -> Self {
        Instant(ns)
    }

    pub const fn from_millis(ms: u64) -> Self {
        Instant(ms.saturating_mul(1_000_000))
    }

    pub const fn from_secs(s: u64) -> Self {
        Instant(s.saturating_mul(1_000_000_000))
    }

    /// Nanoseconds since the origin.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Time since `earlier`, zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// This instant plus `d`, saturating at the end of time.
    pub fn saturating_add(self, d: Duration) -> Instant {
        Instant(
            self.0
                .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        )
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;
    fn add(self, d: Duration) -> Instant {
        self.saturating_add(d)
    }
}

impl AddAssign<Duration> for Instant {
    fn add_assign(&mut self, d: Duration) {
        *self = self.saturating_add(d);
    }
}

impl fmt::Debug for Instant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{:09}s",
            self.0 / 1_000_000_000,
            self.0 % 1_000_000_000
        )
    }
}

impl fmt::Display for Instant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates_and_orders() {
        let t = Instant::from_secs(2);
        assert_eq!(t.as_nanos(), 2_000_000_000);
        assert_eq!(
            t + Duration::from_millis(5),
            Instant::from_nanos(2_005_000_000)
        );
        assert_eq!(
            Instant::from_nanos(u64::MAX - 1) + Duration::from_secs(1),
            Instant::from_nanos(u64::MAX)
        );
        assert_eq!(
            Instant::from_secs(1).saturating_duration_since(Instant::from_secs(3)),
            Duration::ZERO
        );
        assert_eq!(
            Instant::from_secs(3).saturating_duration_since(Instant::from_secs(1)),
            Duration::from_secs(2)
        );
        assert!(Instant::from_millis(999) < Instant::from_secs(1));
        assert_eq!(format!("{:?}", Instant::from_millis(1500)), "1.500000000s");
    }
}
