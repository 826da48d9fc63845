//! `qube-image`: builds the service qubes' bootable images.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use clap::{Parser, Subcommand};
use qube_image::build::{self, ImageSpec, Service};
use qube_image::kernel;

const ABOUT: &str = "\
Builds bootable images of the service qubes in the layout Qubes dom0 expects for a qube's
kernel: <out>/<service>/vmlinuz (Debian's packaged kernel, pinned by version and SHA-256) and
<out>/<service>/initramfs (the service binary as /init, the libraries it links, the kernel
modules it needs; no shell), with SHA256SUMS beside them. Two builds of one commit are
byte-identical. The service, run as PID 1, takes its configuration from the kernel command
line (qubes.config=<file or disk>, qubesdb.<key>=<value>, ifname=<name>:<mac>, qubes.log=)
and from /etc/<service>.yaml in the image; see docs/install-qubes.md.";

#[derive(Debug, Parser)]
#[command(name = "qube-image", version, about = "Builds bootable service-qube images", long_about = ABOUT)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build the image of sys-firewall, sys-net, sys-whonix, or all three
    Build {
        /// sys-firewall, sys-net, sys-whonix or all
        #[arg(value_name = "SERVICE")]
        target: String,
        /// Where the images go (default: target/images in the workspace)
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Where the kernel package is kept between builds (default: target/qube-image-cache)
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Take the service binaries from DIR instead of building them with `cargo build --release`
        #[arg(long, value_name = "DIR")]
        binaries: Option<PathBuf>,
        /// Put FILE in the image as /etc/<service>.yaml (the default configuration)
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

fn workspace() -> PathBuf {
    // The tool lives in the workspace it builds images of.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn main() -> ExitCode {
    let Cmd::Build {
        target,
        out,
        cache,
        binaries,
        config,
    } = Cli::parse().command;
    let services: Vec<Service> = if target == "all" {
        Service::ALL.to_vec()
    } else if let Some(s) = Service::from_name(&target) {
        vec![s]
    } else {
        eprintln!(
            "qube-image: unknown service {target:?}: give sys-firewall, sys-net, sys-whonix or all"
        );
        return ExitCode::from(2);
    };
    let ws = workspace();
    let out = out.unwrap_or_else(|| ws.join("target/images"));
    let cache = cache.unwrap_or_else(|| ws.join("target/qube-image-cache"));
    let t0 = Instant::now();
    let steps = services.len() + 2;
    let mut step = 0;
    let say = |msg: &str| eprintln!("[{:>5.1}s] {msg}", t0.elapsed().as_secs_f64());

    step += 1;
    say(&format!("({step}/{steps}) kernel"));
    let kernel = match kernel::prepare(kernel::PINNED, &cache, &mut |m| say(&format!("  {m}"))) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("qube-image: kernel: {e}");
            return ExitCode::FAILURE;
        }
    };
    step += 1;
    let bin_dir = match binaries {
        Some(d) => {
            say(&format!(
                "({step}/{steps}) service binaries from {}",
                d.display()
            ));
            d
        }
        None => {
            say(&format!("({step}/{steps}) cargo build --release (the first build of sys-whonix compiles arti: minutes)"));
            let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            cmd.current_dir(&ws)
                .args(["build", "--release", "--locked"]);
            for s in &services {
                cmd.args(["-p", s.name(), "--bin", s.name()]);
            }
            match cmd.status() {
                Ok(st) if st.success() => {}
                Ok(st) => {
                    eprintln!("qube-image: cargo build failed ({st})");
                    return ExitCode::FAILURE;
                }
                Err(e) => {
                    eprintln!("qube-image: cannot run cargo: {e}");
                    return ExitCode::FAILURE;
                }
            }
            ws.join("target/release")
        }
    };
    for s in services {
        step += 1;
        say(&format!("({step}/{steps}) {s}"));
        let spec = ImageSpec {
            service: s,
            binary: bin_dir.join(s.name()),
            config: config.clone(),
            out_dir: out.clone(),
        };
        match build::build(&spec, &kernel, &mut |m| say(&format!("  {m}"))) {
            Ok(b) => println!(
                "{}: vmlinuz {} B + initramfs {} B = {} B ({} B unpacked); {}",
                b.dir.display(),
                b.vmlinuz_bytes,
                b.initramfs_bytes,
                b.vmlinuz_bytes + b.initramfs_bytes,
                b.unpacked_bytes,
                b.sha256
                    .iter()
                    .map(|(f, h)| format!("{f} {h}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Err(e) => {
                eprintln!("qube-image: {s}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
