#!/usr/bin/env bash
# Issue 11 figures, in one run (image/benches/figures.rs): each image's size beside
# qubes-mirage-firewall's; QEMU start to the service's ready line beside a trivial /init on the
# same kernel (three rounds, medians); the smallest guest memory each image boots and forwards
# in (bisected); the service's resident memory inside the guest. The images are built from
# release binaries, sys-whonix's too when it is built (add --whonix to build it: arti takes
# about ten minutes). Needs root; installs what it needs. `--quick`: one round, no bisection.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-debian.sh
pkgs=(-p sys-firewall -p sys-net -p qube-image -p qubes-lab)
args=()
for a in "$@"; do
  if [ "$a" = --whonix ]; then pkgs+=(-p sys-whonix); else args+=("$a"); fi
done
cargo build --release --locked "${pkgs[@]}"
exec cargo bench --locked -p qube-image --bench figures -- "${args[@]}"
