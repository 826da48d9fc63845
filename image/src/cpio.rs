//! The initramfs archive: "newc" cpio, the only format the kernel unpacks
//! (Linux `Documentation/driver-api/early-userspace/buffer-format.rst`).
//!
//! Every header field is 8 hex digits; the header (110 bytes) plus the NUL-terminated name is
//! padded to a multiple of four, and so is the file data. The archive ends with an entry named
//! `TRAILER!!!`. To make two builds byte-identical, entries carry no time (mtime 0), no owner
//! (uid and gid 0) and inode numbers that count up in the order entries are added.

use std::fmt;

/// What an entry is, with its permission bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory (`S_IFDIR`).
    Dir { perm: u32 },
    /// A regular file (`S_IFREG`) and its bytes.
    File { perm: u32, data: Vec<u8> },
    /// A character device node (`S_IFCHR`): /dev/console must exist before devtmpfs is
    /// mounted, or the kernel starts /init with no console ("unable to open an initial console").
    CharDev { perm: u32, major: u32, minor: u32 },
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;
const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";

/// An archive being built; entries keep the order they are added in.
#[derive(Debug, Default)]
pub struct Archive {
    entries: Vec<(String, Kind)>,
}

/// A name the archive cannot hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadName(pub String);

impl fmt::Display for BadName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "initramfs path {:?}: must be relative (no leading /), without empty, . or .. parts, and free of NUL",
            self.0
        )
    }
}

impl std::error::Error for BadName {}

impl Archive {
    /// Adds an entry at `path` (relative to the root, e.g. `lib/modules/virtio.ko`).
    pub fn add(&mut self, path: &str, kind: Kind) -> Result<(), BadName> {
        let ok = !path.is_empty()
            && !path.starts_with('/')
            && !path.contains('\0')
            && path
                .split('/')
                .all(|p| !p.is_empty() && p != "." && p != "..")
            && path != TRAILER;
        if !ok {
            return Err(BadName(path.to_string()));
        }
        self.entries.push((path.to_string(), kind));
        Ok(())
    }

    /// Whether `path` was added.
    pub fn contains(&self, path: &str) -> bool {
        self.entries.iter().any(|(p, _)| p == path)
    }

    /// The entries' paths, in order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(p, _)| p.as_str())
    }

    /// The archive's bytes (uncompressed).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, (path, kind)) in self.entries.iter().enumerate() {
            // Inode 0 is avoided: some unpackers treat it as "no inode".
            let ino = i as u32 + 1;
            write_entry(&mut out, ino, path, kind);
        }
        write_entry(
            &mut out,
            0,
            TRAILER,
            &Kind::File {
                perm: 0,
                data: Vec::new(),
            },
        );
        // The kernel accepts any length; 512-byte blocks are what cpio(1) writes.
        while !out.len().is_multiple_of(512) {
            out.push(0);
        }
        out
    }
}

fn write_entry(out: &mut Vec<u8>, ino: u32, name: &str, kind: &Kind) {
    let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match kind {
        Kind::Dir { perm } => (S_IFDIR | perm, 2, &[], (0, 0)),
        Kind::File { perm, data } => (S_IFREG | perm, 1, data, (0, 0)),
        Kind::CharDev { perm, major, minor } => (S_IFCHR | perm, 1, &[], (*major, *minor)),
    };
    let mode = if name == TRAILER { 0 } else { mode };
    let nlink = if name == TRAILER { 1 } else { nlink };
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        data.len() as u32,
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0, // check (only the "070702" format has one)
    ];
    out.extend_from_slice(MAGIC.as_bytes());
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a newc archive back the way the kernel's `init/initramfs.c` does, independently
    /// of the writer: (name, mode, rdev, data) per entry, the trailer excluded.
    type Entry = (String, u32, (u32, u32), Vec<u8>);

    fn parse(bytes: &[u8]) -> Vec<Entry> {
        let mut at = 0;
        let mut out = Vec::new();
        loop {
            assert_eq!(&bytes[at..at + 6], b"070701", "magic at offset {at}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&bytes[at + 6 + 8 * i..at + 14 + 8 * i])
                    .expect("test data");
                u32::from_str_radix(s, 16).expect("test data")
            };
            let (mode, size, rdev, namesize) =
                (field(1), field(6), (field(9), field(10)), field(11));
            assert_eq!(field(5), 0, "mtime");
            let name_at = at + 110;
            let name = std::str::from_utf8(&bytes[name_at..name_at + namesize as usize - 1])
                .expect("test data")
                .to_string();
            assert_eq!(bytes[name_at + namesize as usize - 1], 0, "name NUL");
            let data_at = (name_at + namesize as usize).div_ceil(4) * 4;
            let data = bytes[data_at..data_at + size as usize].to_vec();
            at = (data_at + size as usize).div_ceil(4) * 4;
            if name == "TRAILER!!!" {
                assert!(bytes[at..].iter().all(|&b| b == 0));
                assert_eq!(bytes.len() % 512, 0);
                return out;
            }
            out.push((name, mode, rdev, data));
        }
    }

    #[test]
    fn entries_round_trip_through_a_newc_reader() {
        let mut a = Archive::default();
        a.add("dev", Kind::Dir { perm: 0o755 }).expect("test data");
        a.add(
            "dev/console",
            Kind::CharDev {
                perm: 0o600,
                major: 5,
                minor: 1,
            },
        )
        .expect("test data");
        a.add(
            "init",
            Kind::File {
                perm: 0o755,
                data: b"\x7fELF12345".to_vec(),
            },
        )
        .expect("test data");
        a.add(
            "e",
            Kind::File {
                perm: 0o644,
                data: Vec::new(),
            },
        )
        .expect("test data");
        let got = parse(&a.to_bytes());
        assert_eq!(
            got,
            vec![
                ("dev".into(), 0o040755, (0, 0), vec![]),
                ("dev/console".into(), 0o020600, (5, 1), vec![]),
                ("init".into(), 0o100755, (0, 0), b"\x7fELF12345".to_vec()),
                ("e".into(), 0o100644, (0, 0), vec![]),
            ]
        );
    }

    #[test]
    fn the_same_entries_give_the_same_bytes() {
        let build = || {
            let mut a = Archive::default();
            a.add(
                "a",
                Kind::File {
                    perm: 0o644,
                    data: vec![1, 2, 3],
                },
            )
            .expect("test data");
            a.to_bytes()
        };
        assert_eq!(build(), build());
    }

    #[test]
    fn names_that_escape_the_root_are_refused() {
        let mut a = Archive::default();
        for bad in ["/init", "a/../b", "", "a//b", "./x", "TRAILER!!!", "a\0b"] {
            let e = a
                .add(bad, Kind::Dir { perm: 0o755 })
                .expect_err("must fail");
            assert!(e.to_string().contains("initramfs path"), "{bad}: {e}");
        }
        assert_eq!(a.paths().count(), 0);
    }
}
