#!/usr/bin/env bash
# The lab: the Qubes default netvm chain (sys-net, sys-firewall, work, personal, untrusted,
# vault) in network namespaces, with a private "world" of 198.18.0.0/24 behind sys-net.
#
# Usage (as root, on Debian 12):
#   scripts/lab.sh [up options]        install packages, build, bring the lab up, print the matrix
#                                      (e.g. --firewall linux --netvm linux, --name lab2)
#   scripts/lab.sh down [--name N]     tear it down
#   scripts/lab.sh status|exec|firewall|matrix|restart-firewall ...   any other qubes-lab command
# See docs/lab.md.
set -euo pipefail
cd "$(dirname "$0")/.."

LAB=target/release/qubes-lab
cmd=up
case "${1:-}" in
  up|down|status|exec|firewall|matrix|restart-firewall|help|--help|-h) cmd=$1; shift ;;
esac

if [ "$cmd" = down ] && [ -x "$LAB" ]; then
  exec "$LAB" down "$@"          # no need to build to tear down
fi

if [ "$cmd" = up ]; then
  ./scripts/setup-debian.sh
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "lab.sh: no Rust toolchain; install one with rustup (Rust >= 1.92)" >&2
  exit 1
fi
cargo build --release --locked -p qubes-lab -p qubes-rules -p sys-firewall -p sys-net

exec "$LAB" "$cmd" "$@"
