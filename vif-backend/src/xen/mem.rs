//! Shared pages as memory: [`HeapPages`] in our own heap, [`MmapPages`] over a shared
//! mapping (a memfd of the emulation, a `/dev/xen/gntalloc` or `/dev/xen/gntdev` mapping).
//!
//! Both are accessed only as 32-bit atomics, whatever the caller asks for: a ring index is
//! one acquire load or release store, and a byte copy is a sequence of relaxed word loads
//! or stores. Why words and not `volatile` copies: in one process (both ring ends over
//! [`HeapPages`], or two mappings of one memfd) the other end is another thread, and only
//! atomic accesses make that race defined in Rust's memory model; volatile accesses do not.
//! Why only 32-bit words and never bytes for the edges: Rust does not allow racing atomic
//! accesses of different sizes to the same location, and the ring indices are 32-bit, so
//! every access to the pages has that one size. A partial word at either end of a write is
//! merged with `fetch_and` then `fetch_or`, which never clobbers the peer's bytes in the
//! same word and never loops (a compare-and-swap loop could be starved by a peer that
//! keeps writing the word).
//!
//! A peer in another domain is outside Rust's memory model altogether; what matters there
//! is that the compiler treats the memory as changing under us, which atomics guarantee,
//! and that the hardware accesses are aligned words, which they are.
//!
//! Limits: copies cost one atomic access per 4 bytes (plain `mov`s on x86 and arm64 for
//! relaxed loads and stores, but no `memcpy` vectorisation); a write to a read-only mapping
//! is refused as an [`OutOfRange`] with `size` 0, since the writable part of it is empty.
#![allow(unsafe_code)]

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::{OutOfRange, SharedPages, PAGE_SIZE};

const WORD: usize = 4;

/// Checks that `len` bytes at `offset` lie inside `size` bytes.
fn check(offset: usize, len: usize, size: usize) -> Result<(), OutOfRange> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(OutOfRange { offset, len, size }),
    }
}

/// Checks an aligned 32-bit access and gives its word index.
fn word_at(words: &[AtomicU32], offset: usize) -> Result<&AtomicU32, OutOfRange> {
    let size = words.len() * WORD;
    check(offset, WORD, size)?;
    if !offset.is_multiple_of(WORD) {
        // An unaligned index is a bug of ours or an unchecked value from the peer, and an
        // atomic cannot straddle two words anyway.
        return Err(OutOfRange {
            offset,
            len: WORD,
            size,
        });
    }
    words.get(offset / WORD).ok_or(OutOfRange {
        offset,
        len: WORD,
        size,
    })
}

fn read_words(words: &[AtomicU32], offset: usize, dst: &mut [u8]) -> Result<(), OutOfRange> {
    check(offset, dst.len(), words.len() * WORD)?;
    let mut done = 0;
    while done < dst.len() {
        let at = offset + done;
        let skip = at % WORD;
        let n = (WORD - skip).min(dst.len() - done);
        let w = words[at / WORD].load(Ordering::Relaxed).to_ne_bytes();
        dst[done..done + n].copy_from_slice(&w[skip..skip + n]);
        done += n;
    }
    Ok(())
}

fn write_words(words: &[AtomicU32], offset: usize, src: &[u8]) -> Result<(), OutOfRange> {
    check(offset, src.len(), words.len() * WORD)?;
    let mut done = 0;
    while done < src.len() {
        let at = offset + done;
        let skip = at % WORD;
        let n = (WORD - skip).min(src.len() - done);
        let word = &words[at / WORD];
        if n == WORD {
            let mut w = [0u8; WORD];
            w.copy_from_slice(&src[done..done + WORD]);
            word.store(u32::from_ne_bytes(w), Ordering::Relaxed);
        } else {
            let mut mask = [0u8; WORD];
            let mut value = [0u8; WORD];
            mask[skip..skip + n].fill(0xff);
            value[skip..skip + n].copy_from_slice(&src[done..done + n]);
            let mask = u32::from_ne_bytes(mask);
            word.fetch_and(!mask, Ordering::Relaxed);
            word.fetch_or(u32::from_ne_bytes(value), Ordering::Relaxed);
        }
        done += n;
    }
    Ok(())
}

fn pages_bytes(pages: usize) -> io::Result<usize> {
    pages
        .checked_mul(PAGE_SIZE)
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{pages} pages is not a size that can be shared"),
            )
        })
}

/// Pages in our own heap, for tests and for both ends of a ring in one process. Clones share
/// the same memory (as the two domains of a grant share a page).
#[derive(Clone)]
pub struct HeapPages {
    words: Arc<[AtomicU32]>,
    writable: bool,
}

impl HeapPages {
    /// `pages` zeroed pages.
    pub fn new(pages: usize) -> io::Result<Self> {
        let bytes = pages_bytes(pages)?;
        Ok(HeapPages {
            words: (0..bytes / WORD).map(|_| AtomicU32::new(0)).collect(),
            writable: true,
        })
    }

    /// The same memory, refusing writes: what a backend sees of a read-only grant.
    pub fn read_only(&self) -> Self {
        HeapPages {
            words: Arc::clone(&self.words),
            writable: false,
        }
    }

    fn writable_size(&self) -> usize {
        if self.writable {
            self.words.len() * WORD
        } else {
            0
        }
    }
}

impl fmt::Debug for HeapPages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeapPages")
            .field("size", &(self.words.len() * WORD))
            .field("writable", &self.writable)
            .finish()
    }
}

impl SharedPages for HeapPages {
    fn size(&self) -> usize {
        self.words.len() * WORD
    }

    fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfRange> {
        read_words(&self.words, offset, dst)
    }

    fn write(&self, offset: usize, src: &[u8]) -> Result<(), OutOfRange> {
        check(offset, src.len(), self.writable_size())?;
        write_words(&self.words, offset, src)
    }

    fn load_u32(&self, offset: usize) -> Result<u32, OutOfRange> {
        Ok(u32::from_le(
            word_at(&self.words, offset)?.load(Ordering::Acquire),
        ))
    }

    fn store_u32(&self, offset: usize, value: u32) -> Result<(), OutOfRange> {
        check(offset, WORD, self.writable_size())?;
        word_at(&self.words, offset)?.store(value.to_le(), Ordering::Release);
        Ok(())
    }

    fn fetch_or_u32(&self, offset: usize, bits: u32) -> Result<u32, OutOfRange> {
        check(offset, WORD, self.writable_size())?;
        let old = word_at(&self.words, offset)?.fetch_or(bits.to_le(), Ordering::SeqCst);
        Ok(u32::from_le(old))
    }

    fn fetch_and_u32(&self, offset: usize, mask: u32) -> Result<u32, OutOfRange> {
        check(offset, WORD, self.writable_size())?;
        let old = word_at(&self.words, offset)?.fetch_and(mask.to_le(), Ordering::SeqCst);
        Ok(u32::from_le(old))
    }
}

/// What to do after the pages are unmapped (an unmap ioctl, telling the emulated
/// hypervisor): the device or peer wants the mapping gone first.
type Release = Box<dyn FnOnce() + Send + Sync>;

/// Pages of a shared `mmap` (`MAP_SHARED`): a memfd, a gntalloc or a gntdev mapping.
/// Unmapped on drop, then the release action, if any, runs.
pub struct MmapPages {
    ptr: *mut libc::c_void,
    len: usize,
    writable: bool,
    release: Option<Release>,
}

// SAFETY: the mapping is only accessed through atomics (see `words`), which any thread may
// use concurrently, and the pointer is owned by this value alone (unmapped once, in drop).
unsafe impl Send for MmapPages {}
// SAFETY: as for Send: every access through `&self` is atomic.
unsafe impl Sync for MmapPages {}

impl MmapPages {
    /// Maps `pages` pages of `fd` at byte `offset` (a multiple of [`PAGE_SIZE`]), shared,
    /// read-write if `writable`.
    pub fn map_fd(
        fd: BorrowedFd<'_>,
        offset: u64,
        pages: usize,
        writable: bool,
    ) -> io::Result<Self> {
        let len = pages_bytes(pages)?;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mmap offset too large"))?;
        // SAFETY: a fresh mapping chosen by the kernel (no address given), so no existing
        // memory is affected; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot(writable),
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(MmapPages {
            ptr,
            len,
            writable,
            release: None,
        })
    }

    /// Maps one page from each `(fd, byte offset)` in turn, contiguously: the pages of a
    /// grant mapping come from as many files as granters' allocations. An address range is
    /// reserved first (`PROT_NONE`), then each page is mapped over its slot with
    /// `MAP_FIXED`, so nothing else can land in the range meanwhile.
    pub fn map_pages(pieces: &[(BorrowedFd<'_>, u64)], writable: bool) -> io::Result<Self> {
        let len = pages_bytes(pieces.len())?;
        // SAFETY: a fresh anonymous reservation chosen by the kernel; checked before use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // From here the reservation is owned, and unmapped by drop on any error.
        let pages = MmapPages {
            ptr: base,
            len,
            writable,
            release: None,
        };
        for (i, (fd, offset)) in pieces.iter().enumerate() {
            let off = libc::off_t::try_from(*offset).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "mmap offset too large")
            })?;
            let slot = base.cast::<u8>().wrapping_add(i * PAGE_SIZE).cast();
            // SAFETY: `slot` is page `i` of the reservation this function owns and nothing
            // else uses, so MAP_FIXED replaces only our own PROT_NONE page.
            let r = unsafe {
                libc::mmap(
                    slot,
                    PAGE_SIZE,
                    prot(writable),
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    fd.as_raw_fd(),
                    off,
                )
            };
            if r == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(pages)
    }

    /// Runs `release` after the pages are unmapped (on drop).
    pub fn on_release(mut self, release: impl FnOnce() + Send + Sync + 'static) -> Self {
        self.release = Some(Box::new(release));
        self
    }

    pub fn writable(&self) -> bool {
        self.writable
    }

    fn words(&self) -> &[AtomicU32] {
        // SAFETY: `ptr` is a page-aligned (so 4-byte aligned) mapping of `len` bytes, live
        // until drop, which needs `&mut self`, so it outlives the returned borrow. The
        // memory is only ever accessed through these atomics in this process (AtomicU32 has
        // interior mutability, so shared references to it may see it change); the peer's
        // writes are outside the Rust abstract machine. Loads from a read-only mapping are
        // allowed for a 32-bit atomic; stores are never issued to one (see `writable_size`).
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<AtomicU32>(), self.len / WORD) }
    }

    fn writable_size(&self) -> usize {
        if self.writable {
            self.len
        } else {
            0
        }
    }
}

fn prot(writable: bool) -> libc::c_int {
    if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    }
}

impl Drop for MmapPages {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by this value and is unmapped only here; no borrow
        // of `words` can outlive `&mut self`.
        unsafe { libc::munmap(self.ptr, self.len) };
        if let Some(release) = self.release.take() {
            release();
        }
    }
}

impl fmt::Debug for MmapPages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmapPages")
            .field("addr", &self.ptr)
            .field("size", &self.len)
            .field("writable", &self.writable)
            .finish()
    }
}

impl SharedPages for MmapPages {
    fn size(&self) -> usize {
        self.len
    }

    fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfRange> {
        read_words(self.words(), offset, dst)
    }

    fn write(&self, offset: usize, src: &[u8]) -> Result<(), OutOfRange> {
        check(offset, src.len(), self.writable_size())?;
        write_words(self.words(), offset, src)
    }

    fn load_u32(&self, offset: usize) -> Result<u32, OutOfRange> {
        Ok(u32::from_le(
            word_at(self.words(), offset)?.load(Ordering::Acquire),
        ))
    }

    fn store_u32(&self, offset: usize, value: u32) -> Result<(), OutOfRange> {
        check(offset, WORD, self.writable_size())?;
        word_at(self.words(), offset)?.store(value.to_le(), Ordering::Release);
        Ok(())
    }

    fn fetch_or_u32(&self, offset: usize, bits: u32) -> Result<u32, OutOfRange> {
        check(offset, WORD, self.writable_size())?;
        let old = word_at(self.words(), offset)?.fetch_or(bits.to_le(), Ordering::SeqCst);
        Ok(u32::from_le(old))
    }

    fn fetch_and_u32(&self, offset: usize, mask: u32) -> Result<u32, OutOfRange> {
        check(offset, WORD, self.writable_size())?;
        let old = word_at(self.words(), offset)?.fetch_and(mask.to_le(), Ordering::SeqCst);
        Ok(u32::from_le(old))
    }
}

/// A memfd of `pages` zeroed pages (for the emulation's grants and for tests), sealed
/// against shrinking and growing (`F_SEAL_SHRINK | F_SEAL_GROW`, then `F_SEAL_SEAL`): the
/// file is handed to another process, which maps it, and a granter that could shrink it
/// afterwards would turn the mapper's next access into a `SIGBUS`. A real grant cannot
/// vanish under a mapping either.
pub fn memfd(name: &str, pages: usize) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let len = pages_bytes(pages)?;
    let cname = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "memfd name has a NUL"))?;
    // SAFETY: `cname` is a valid NUL-terminated string for the call; the result is checked.
    let raw =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    let file = std::fs::File::from(fd);
    file.set_len(len as u64)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a descriptor we own, with an integer argument.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file.into())
}

/// Whether `fd` is a memfd sealed against shrinking, with at least `len` bytes: what the
/// emulated hypervisor accepts as grantable memory from a domain.
pub fn is_sealed_memfd(fd: BorrowedFd<'_>, len: u64) -> bool {
    // SAFETY: F_GET_SEALS on a descriptor the caller keeps open; no memory is passed.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
        return false;
    }
    let file = match fd.try_clone_to_owned() {
        Ok(owned) => std::fs::File::from(owned),
        Err(_) => return false,
    };
    match file.metadata() {
        Ok(m) => m.file_type().is_file() && m.len() >= len,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn exercise(p: &dyn SharedPages) {
        assert_eq!(p.size(), 2 * PAGE_SIZE);
        // Unaligned copies across words and across the page boundary.
        let data: Vec<u8> = (0..100u8).collect();
        p.write(PAGE_SIZE - 37, &data).expect("write across pages");
        let mut back = vec![0u8; 100];
        p.read(PAGE_SIZE - 37, &mut back)
            .expect("read across pages");
        assert_eq!(back, data);
        // A partial-word write leaves the other bytes of the word alone.
        p.write(8, &[1, 2, 3, 4, 5, 6, 7, 8]).expect("write");
        p.write(9, &[0xaa, 0xbb]).expect("partial write");
        let mut w = [0u8; 8];
        p.read(8, &mut w).expect("read");
        assert_eq!(w, [1, 0xaa, 0xbb, 4, 5, 6, 7, 8]);
        // Indices are little-endian.
        p.store_u32(16, 0x0403_0201).expect("store");
        let mut b = [0u8; 4];
        p.read(16, &mut b).expect("read");
        assert_eq!(b, [1, 2, 3, 4]);
        assert_eq!(p.load_u32(16).expect("load"), 0x0403_0201);
        // Everything outside is refused.
        let size = p.size();
        assert_eq!(
            p.read(size - 3, &mut [0; 4]),
            Err(OutOfRange {
                offset: size - 3,
                len: 4,
                size
            })
        );
        assert!(p.write(usize::MAX, &[1]).is_err());
        assert!(p.load_u32(size).is_err());
        assert!(p.load_u32(2).is_err(), "unaligned index");
        assert!(p.store_u32(size - 2, 0).is_err());
        assert!(p.zero(size - 10, 11).is_err());
        p.zero(PAGE_SIZE - 37, 100).expect("zero");
        p.read(PAGE_SIZE - 37, &mut back).expect("read");
        assert!(back.iter().all(|&b| b == 0));
        p.read(size, &mut [])
            .expect("an empty read at the end is in range");
        // Read-modify-writes return the old value and keep the other bits.
        p.store_u32(20, 0x0000_0101).expect("store");
        assert_eq!(p.fetch_or_u32(20, 0x0200_0000).expect("or"), 0x0000_0101);
        assert_eq!(p.fetch_and_u32(20, !0x0000_0100).expect("and"), 0x0200_0101);
        assert_eq!(p.load_u32(20).expect("load"), 0x0200_0001);
        let mut b = [0u8; 4];
        p.read(20, &mut b).expect("read");
        assert_eq!(b, [1, 0, 0, 2], "little-endian in memory");
        assert!(p.fetch_or_u32(22, 1).is_err(), "unaligned");
        assert!(p.fetch_and_u32(size, 1).is_err(), "outside");
    }

    #[test]
    fn heap_pages_copy_load_store_and_refuse_outside() {
        let p = HeapPages::new(2).expect("pages");
        exercise(&p);
        let ro = p.read_only();
        p.store_u32(0, 7).expect("store");
        assert_eq!(ro.load_u32(0).expect("shared memory"), 7);
        assert!(ro.write(0, &[1]).is_err());
        assert!(ro.store_u32(0, 1).is_err());
        assert!(HeapPages::new(0).is_err());
        assert!(HeapPages::new(usize::MAX).is_err());
    }

    #[test]
    fn mmap_pages_share_a_memfd() {
        let fd = memfd("test", 3).expect("memfd");
        let a = MmapPages::map_fd(fd.as_fd(), 0, 2, true).expect("map a");
        exercise(&a);
        // Pages 2 and 0 of the file, in that order, as one contiguous mapping.
        let b = MmapPages::map_pages(&[(fd.as_fd(), 2 * PAGE_SIZE as u64), (fd.as_fd(), 0)], true)
            .expect("map b");
        a.write(PAGE_SIZE, b"second page").expect("write");
        b.write(0, b"third").expect("write");
        a.store_u32(4, 99).expect("store");
        assert_eq!(b.load_u32(PAGE_SIZE + 4).expect("load"), 99);
        let c = MmapPages::map_fd(fd.as_fd(), PAGE_SIZE as u64, 2, false).expect("map c");
        let mut s = [0u8; 11];
        c.read(0, &mut s).expect("read");
        assert_eq!(&s, b"second page");
        c.read(PAGE_SIZE, &mut s[..5]).expect("read");
        assert_eq!(&s[..5], b"third");
        assert!(c.write(0, b"x").is_err(), "read-only mapping");
        assert!(c.store_u32(0, 1).is_err(), "read-only mapping");
        assert!(c.fetch_or_u32(0, 1).is_err(), "read-only mapping");
        assert!(c.fetch_and_u32(0, 0).is_err(), "read-only mapping");
        assert!(is_sealed_memfd(fd.as_fd(), 3 * PAGE_SIZE as u64));
        assert!(
            !is_sealed_memfd(fd.as_fd(), 4 * PAGE_SIZE as u64),
            "too small"
        );
        let plain = std::fs::File::from(fd.try_clone().expect("dup"));
        assert!(
            plain.set_len(PAGE_SIZE as u64).is_err(),
            "sealed against shrinking"
        );
    }

    #[test]
    fn mmap_pages_release_runs_after_unmap() {
        let fd = memfd("test", 1).expect("memfd");
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&done);
        let p = MmapPages::map_fd(fd.as_fd(), 0, 1, true)
            .expect("map")
            .on_release(move || flag.store(true, Ordering::SeqCst));
        assert!(!done.load(Ordering::SeqCst));
        drop(p);
        assert!(done.load(Ordering::SeqCst));
        // A page past the end of the file cannot be mapped over a reservation either way.
        assert!(MmapPages::map_fd(fd.as_fd(), 0, 0, true).is_err());
    }
}
