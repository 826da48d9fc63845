//! Bootable service-qube images in the layout Qubes dom0 expects for a qube's kernel
//! (`/var/lib/qubes/vm-kernels/<name>/vmlinuz` and `initramfs`; QubesOS/qubes-core-admin
//! `qubes/storage/kernels.py`): Debian's packaged kernel, pinned, and an initramfs whose
//! `/init` is the service binary itself, with its libraries and kernel modules and nothing else.
//!
//! | module | job |
//! |---|---|
//! | [`kernel`] | the pinned kernel package: fetch with apt, check SHA-256, unpack, depmod |
//! | [`modules`] | which modules, in which order (from `modules.dep`) |
//! | [`cpio`] | the initramfs archive ("newc" cpio), deterministic |
//! | [`build`] | one image: strip, libraries, modules, archive, gzip, SHA256SUMS |
//! | [`qemu`] | booting an image under QEMU (tests, the lab, the figures) |
//! | [`testbed`] | an image under QEMU between a world and a client namespace (tests, figures) |
//!
//! Builds are reproducible: the archive carries no times, owners or build paths, gzip's
//! header no time, and entries are in a fixed order, so two builds of one commit are
//! byte-identical.

pub mod build;
pub mod cpio;
pub mod kernel;
pub mod modules;
pub mod qemu;
pub mod testbed;
