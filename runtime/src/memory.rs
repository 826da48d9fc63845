//! The connection table's default size, from the machine's memory as Linux derives
//! `nf_conntrack_max`.
//!
//! Linux (net/netfilter/nf_conntrack_core.c, `nf_conntrack_init_start`, since 5.15's
//! "netfilter: conntrack: sanitize table size default settings") sizes the hash table at
//! 1/16384 of RAM in bucket heads (8 bytes on 64-bit): `RAM / 16384 / 8` buckets, set to
//! 262144 above 4 GiB (64-bit kernels) and to 65536 above 1 GiB, at least 1024; and with no
//! `hashsize` given, `nf_conntrack_max` is that bucket count (factor 1; older kernels used 4,
//! or 8 for a given size). So: 512 MiB gives 4096 flows, 1 GiB 8192, up to 4 GiB 65536, more
//! 262144. The engine is pure, so the service reads `/proc/meminfo` and passes the figure in.

use qubes_engine::config::DEFAULT_CONNTRACK_MAX;

const GIB: u64 = 1 << 30;

/// Linux's default `nf_conntrack_max` for a 64-bit machine with `ram` bytes of memory.
pub fn linux_conntrack_max(ram: u64) -> usize {
    // sizeof(struct hlist_head) on 64-bit.
    const BUCKET_HEAD: u64 = 8;
    let buckets = if ram > 4 * GIB {
        262_144
    } else if ram > GIB {
        65_536
    } else {
        ram / 16_384 / BUCKET_HEAD
    };
    buckets.max(1024) as usize
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes (the file gives kB, meaning KiB).
pub fn mem_total(meminfo: &str) -> Result<u64, String> {
    let line = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .ok_or("no MemTotal line")?;
    let mut words = line.split_whitespace();
    let kib: u64 = words
        .next()
        .ok_or("MemTotal has no value")?
        .parse()
        .map_err(|e| format!("MemTotal value: {e}"))?;
    match words.next() {
        Some("kB") => Ok(kib.saturating_mul(1024)),
        other => Err(format!("MemTotal unit {other:?}, expected \"kB\"")),
    }
}

/// The default connection table size for this machine: [`linux_conntrack_max`] of
/// `/proc/meminfo`'s `MemTotal`, or, when that cannot be read, [`DEFAULT_CONNTRACK_MAX`] and
/// why.
pub fn default_conntrack_max() -> (usize, Result<u64, String>) {
    let total = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| format!("/proc/meminfo: {e}"))
        .and_then(|t| mem_total(&t).map_err(|e| format!("/proc/meminfo: {e}")));
    match total {
        Ok(ram) => (linux_conntrack_max(ram), Ok(ram)),
        Err(e) => (DEFAULT_CONNTRACK_MAX, Err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn follows_linux_from_small_to_large_memory() {
        assert_eq!(linux_conntrack_max(64 * MIB), 1024);
        assert_eq!(linux_conntrack_max(256 * MIB), 2048);
        assert_eq!(linux_conntrack_max(400 * MIB), 3200);
        assert_eq!(linux_conntrack_max(512 * MIB), 4096);
        assert_eq!(linux_conntrack_max(GIB), 8192);
        assert_eq!(linux_conntrack_max(GIB + 1), 65_536);
        assert_eq!(linux_conntrack_max(4 * GIB), 65_536);
        assert_eq!(linux_conntrack_max(4 * GIB + 1), 262_144);
        assert_eq!(linux_conntrack_max(u64::MAX), 262_144);
        assert_eq!(linux_conntrack_max(0), 1024);
    }

    #[test]
    fn reads_mem_total() {
        let text = "MemTotal:       24576000 kB\nMemFree:        20000000 kB\n";
        assert_eq!(mem_total(text), Ok(24_576_000 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), Err("no MemTotal line".into()));
        assert!(mem_total("MemTotal: x kB\n")
            .expect_err("not a number")
            .starts_with("MemTotal value"));
        assert!(mem_total("MemTotal: 5 MB\n")
            .expect_err("not kB")
            .contains("MB"));
        // This machine's own file reads.
        let (max, ram) = default_conntrack_max();
        assert!(ram.is_ok(), "{ram:?}");
        assert!(max >= 1024);
    }
}
