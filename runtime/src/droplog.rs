//! Rate-limited drop logging: at most one line per interface per second, with the number of
//! drops it stands for, so a flooding client cannot flood the log too.

use std::collections::HashMap;
use std::time::Duration;

use qubes_engine::{Instant, Reason};

/// Per-interface drop counts since the last line.
#[derive(Debug, Default)]
pub struct DropLog {
    last: HashMap<String, (Option<Instant>, u64)>,
}

impl DropLog {
    pub fn new() -> Self {
        Self::default()
    }

    /// Notes a drop at `now`; returns the line to log, if one is due, as
    /// `(iface, reason, drops since the last line)`.
    pub fn note(&mut self, now: Instant, iface: &str, reason: Reason) -> Option<(String, u64)> {
        let entry = self.last.entry(iface.to_string()).or_insert((None, 0));
        entry.1 += 1;
        let due = entry
            .0
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1));
        if !due {
            return None;
        }
        let n = entry.1;
        *entry = (Some(now), 0);
        tracing::info!(
            iface,
            reason = reason.name(),
            dropped = n,
            "dropped frames (one line per second per interface)"
        );
        Some((iface.to_string(), n))
    }

    /// Forgets interfaces that are gone.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.last.retain(|k, _| keep(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interface_per_second_counting_the_rest() {
        let mut d = DropLog::new();
        let t = Instant::from_secs(10);
        assert_eq!(
            d.note(t, "vif3.0", Reason::Spoofed),
            Some(("vif3.0".into(), 1))
        );
        for i in 1..100 {
            assert_eq!(
                d.note(t + Duration::from_millis(i * 5), "vif3.0", Reason::Spoofed),
                None
            );
        }
        // Another interface is not held back by the first one's flood.
        assert!(d.note(t, "vif4.0", Reason::NoFlow).is_some());
        assert_eq!(
            d.note(t + Duration::from_secs(1), "vif3.0", Reason::Spoofed),
            Some(("vif3.0".into(), 100))
        );
    }
}
