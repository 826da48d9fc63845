//! The images' figures, in one run (bench/images.sh builds the release binaries first):
//!
//! - each image's size: vmlinuz, initramfs, total, beside qubes-mirage-firewall's release
//!   unikernel (4,320,560 bytes for 0.9.5, mirage/qubes-mirage-firewall issue #230);
//! - time from QEMU's start to the service's ready line, beside the floor: a trivial /init
//!   (floor-init) on the same kernel, three rounds each, medians;
//! - the smallest guest memory (`-m`, MiB) with which each image boots and forwards, bisected;
//! - the service's resident memory inside the guest after it forwarded (VmRSS and its peak
//!   VmHWM, which PID 1 prints when it stops).
//!
//! QEMU runs in software emulation here (no KVM), so every time is several times what a real
//! Qubes machine takes; the ratio to the floor is the figure that carries over. Needs root
//! (namespaces, TAP devices). `--quick` does one round and skips the bisection.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qube_image::build::{self, Assembly, Built, ImageSpec, Service};
use qube_image::kernel;
use qube_image::qemu::{Vm, VmSpec};
use qube_image::testbed::{Bed, BedKind, BedSpec};

const MIRAGE_BYTES: u64 = 4_320_560;
const BOOT_WAIT: Duration = Duration::from_secs(120);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn mib(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / (1024.0 * 1024.0))
}

/// Boots the floor image; seconds to its line.
fn floor_boot(image: &Path, dir: &Path) -> Result<f64, String> {
    floor_boot_in(image, dir, 128)
}

fn floor_boot_in(image: &Path, dir: &Path, memory: u32) -> Result<f64, String> {
    let mut vm = Vm::start(&VmSpec {
        image: image.to_path_buf(),
        memory_mib: memory,
        cmdline: "quiet".into(),
        nics: vec![],
        disk: None,
        netns: None,
        monitor: dir.join("floor-monitor.sock"),
        lab_port: None,
    })
    .map_err(|e| e.to_string())?;
    let t = vm.wait_for("floor-init: /init reached", BOOT_WAIT)?;
    vm.wait_exit(Duration::from_secs(20));
    Ok(t.as_secs_f64())
}

/// What one boot of a service image showed.
#[derive(Debug, Default, Clone)]
struct Run {
    ready_s: f64,
    /// sys-net: to the DHCP lease.
    lease_s: Option<f64>,
    forwarded: bool,
    memory_line: Option<String>,
}

fn service_boot(kind: BedKind, image: &Path, memory: u32, lab: &Path) -> Result<Run, String> {
    let mut bed = Bed::start(&BedSpec {
        kind,
        image: image.to_path_buf(),
        memory_mib: memory,
        lab: lab.to_path_buf(),
        cmdline: "quiet".into(),
        tag: "b".into(),
        yaml: None,
        world: None,
    })?;
    let ready = match kind {
        BedKind::Firewall => "sys-firewall running",
        BedKind::Net => "sys-net running",
        BedKind::Whonix => "Tor ready",
    };
    let mut run = Run {
        ready_s: bed.vm.wait_for(ready, BOOT_WAIT)?.as_secs_f64(),
        ..Run::default()
    };
    if kind == BedKind::Net {
        run.lease_s = Some(
            bed.vm
                .wait_for("DHCP lease", Duration::from_secs(60))?
                .as_secs_f64(),
        );
    }
    run.forwarded = bed.fetch(8080, 10_000).contains("http 200");
    let _ = bed.vm.monitor("system_powerdown");
    bed.vm.wait_exit(Duration::from_secs(30));
    run.memory_line = bed
        .vm
        .console()
        .lines()
        .find(|l| l.contains("memory: VmRSS"))
        .map(|l| l.split("memory: ").nth(1).unwrap_or(l).to_string());
    Ok(run)
}

/// Whether the image boots and forwards in `memory` MiB.
fn works_in(kind: BedKind, image: &Path, memory: u32, lab: &Path) -> bool {
    let ok = matches!(service_boot(kind, image, memory, lab), Ok(r) if r.forwarded);
    eprintln!("  -m {memory}: {}", if ok { "forwards" } else { "fails" });
    ok
}

/// The smallest memory in [lo, hi] for which `works` holds, given that it holds for hi.
fn bisect(mut works: impl FnMut(u32) -> bool, mut lo: u32, mut hi: u32) -> u32 {
    while lo < hi {
        let mid = (lo + hi) / 2;
        if works(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    hi
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes --bench; the suite's `--no-run` never starts this.
    let quick = args.iter().any(|a| a == "--quick");
    let rounds = if quick { 1 } else { 3 };
    let ws = workspace();
    let bin = ws.join("target/release");
    let lab = bin.join("qubes-lab");
    for b in ["sys-firewall", "sys-net", "floor-init", "qubes-lab"] {
        if !bin.join(b).exists() {
            eprintln!(
                "figures: {} is missing: run bench/images.sh, which builds it",
                bin.join(b).display()
            );
            std::process::exit(1);
        }
    }
    let out = ws.join("target/images-figures");
    let k = kernel::prepare(
        kernel::PINNED,
        &ws.join("target/qube-image-cache"),
        &mut |m| eprintln!("kernel: {m}"),
    )
    .unwrap_or_else(|e| panic!("kernel: {e}"));
    let mut quiet = |_: &str| {};
    let mut images: Vec<(String, Built)> = Vec::new();
    for s in Service::ALL {
        if !bin.join(s.name()).exists() {
            eprintln!(
                "figures: no release {} binary; its image is left out",
                s.name()
            );
            continue;
        }
        let spec = ImageSpec {
            service: s,
            binary: bin.join(s.name()),
            config: None,
            out_dir: out.clone(),
        };
        let b = build::build(&spec, &k, &mut quiet).unwrap_or_else(|e| panic!("{s}: {e}"));
        images.push((s.name().to_string(), b));
    }
    let floor = build::assemble(
        &Assembly {
            name: "floor",
            binary: &bin.join("floor-init"),
            modules: &[],
            config: None,
            out_dir: &out,
        },
        &k,
        &mut quiet,
    )
    .unwrap_or_else(|e| panic!("floor: {e}"));

    println!(
        "== image sizes (Debian kernel {} {})",
        k.pin.package, k.pin.version
    );
    println!(
        "{:<14} {:>12} {:>12} {:>12} {:>16}",
        "image", "vmlinuz", "initramfs", "total", "initramfs in RAM"
    );
    for (name, b) in images
        .iter()
        .chain(std::iter::once(&("floor".to_string(), floor.clone())))
    {
        println!(
            "{:<14} {:>12} {:>12} {:>12} {:>16}",
            name,
            mib(b.vmlinuz_bytes),
            mib(b.initramfs_bytes),
            mib(b.vmlinuz_bytes + b.initramfs_bytes),
            mib(b.unpacked_bytes)
        );
    }
    println!(
        "{:<14} {:>12} {:>12} {:>12}   (qubes-mirage-firewall 0.9.5, one unikernel file)",
        "mirage-fw",
        mib(MIRAGE_BYTES),
        "-",
        mib(MIRAGE_BYTES)
    );

    let img = |name: &str| {
        images
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.dir.clone())
    };
    println!("\n== boot: QEMU start to the ready line, software emulation, -m 128, {rounds} rounds, medians");
    let floor_s: Vec<f64> = (0..rounds)
        .map(|_| floor_boot(&floor.dir, &out).unwrap_or_else(|e| panic!("floor: {e}")))
        .collect();
    let floor_m = median(floor_s.clone());
    println!(
        "{:<28} {:>8.2} s   rounds {:?}",
        "floor (trivial /init)", floor_m, floor_s
    );
    let mut rss = Vec::new();
    for (name, kind, line) in [
        ("sys-firewall", BedKind::Firewall, "sys-firewall running"),
        ("sys-net", BedKind::Net, "sys-net running"),
    ] {
        let Some(dir) = img(name) else { continue };
        let runs: Vec<Run> = (0..rounds)
            .map(|_| service_boot(kind, &dir, 128, &lab).unwrap_or_else(|e| panic!("{name}: {e}")))
            .collect();
        let ready = median(runs.iter().map(|r| r.ready_s).collect());
        println!(
            "{:<28} {:>8.2} s   {:+.1}% over the floor; rounds {:?}; forwarded {}/{}",
            format!("{name} ({line:?})"),
            ready,
            (ready / floor_m - 1.0) * 100.0,
            runs.iter()
                .map(|r| (r.ready_s * 100.0).round() / 100.0)
                .collect::<Vec<_>>(),
            runs.iter().filter(|r| r.forwarded).count(),
            runs.len()
        );
        if kind == BedKind::Net {
            let lease = median(runs.iter().filter_map(|r| r.lease_s).collect());
            println!("{:<28} {:>8.2} s", "sys-net to its DHCP lease", lease);
        }
        if let Some(m) = runs.last().and_then(|r| r.memory_line.clone()) {
            rss.push((name, m));
        }
    }

    println!("\n== resident memory of the service in the guest after forwarding (-m 128)");
    for (name, m) in &rss {
        println!("{name:<14} {m}");
    }

    if quick {
        println!("\n(--quick: memory bisection skipped)");
        return;
    }
    println!("\n== smallest guest memory that boots and forwards (bisected in [16, 128] MiB)");
    let t0 = Instant::now();
    for (name, kind) in [
        ("sys-firewall", BedKind::Firewall),
        ("sys-net", BedKind::Net),
    ] {
        let Some(dir) = img(name) else { continue };
        eprintln!("{name}:");
        if !works_in(kind, &dir, 128, &lab) {
            println!("{name:<14} does not forward even in 128 MiB");
            continue;
        }
        let m = bisect(|mem| works_in(kind, &dir, mem, &lab), 16, 128);
        let at_min = service_boot(kind, &dir, m, &lab)
            .ok()
            .and_then(|r| r.memory_line);
        println!(
            "{name:<14} {m} MiB (qubes-mirage-firewall: 32 MB); at {m} MiB: {}",
            at_min.unwrap_or_else(|| "?".into())
        );
    }
    // The kernel's own need: Debian's generic kernel reserves most of it before /init runs.
    let floor_min = bisect(
        |mem| {
            let ok = floor_boot_in(&floor.dir, &out, mem).is_ok();
            eprintln!(
                "  floor -m {mem}: {}",
                if ok { "reaches /init" } else { "fails" }
            );
            ok
        },
        16,
        128,
    );
    println!(
        "{:<14} {floor_min} MiB to reach a trivial /init on the same kernel",
        "floor"
    );
    eprintln!("bisection took {:.0} s", t0.elapsed().as_secs_f64());
}
