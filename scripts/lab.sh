#!/usr/bin/env bash
# The lab: the Qubes default netvm chain (sys-net, sys-firewall, work, personal, untrusted,
# vault, sys-whonix and anon-whonix) in network namespaces, with a private "world" of
# 198.18.0.0/24 behind sys-net that also runs a private Tor network for sys-whonix.
#
# Usage (as root, on Debian 12):
#   scripts/lab.sh [up options]        install packages, build, bring the lab up, print the matrix
#                                      (e.g. --firewall linux --netvm linux, --name lab2,
#                                      --no-whonix: without sys-whonix, nor arti to compile)
#   scripts/lab.sh down [--name N]     tear it down
#   scripts/lab.sh status|exec|firewall|matrix|restart-firewall|restart-whonix|stop|start|mtu ...
#                                      any other qubes-lab command
# See docs/lab.md.
set -euo pipefail
cd "$(dirname "$0")/.."

LAB=target/release/qubes-lab
cmd=up
case "${1:-}" in
  up|down|status|exec|firewall|matrix|restart-firewall|restart-whonix|stop|start|mtu|help|--help|-h)
    cmd=$1; shift ;;
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
packages=(-p qubes-lab -p qubes-rules -p sys-firewall -p sys-net)
# sys-whonix embeds arti: its first release build takes about a quarter of an hour on two
# cores. `up --no-whonix` does not need it, nor do the other commands unless it was built.
whonix=1
for a in "$@"; do
  if [ "$a" = --no-whonix ]; then whonix=; fi
done
if [ -n "$whonix" ] && { [ "$cmd" = up ] || [ -x target/release/sys-whonix ]; }; then
  packages+=(-p sys-whonix)
fi
cargo build --release --locked "${packages[@]}"

exec "$LAB" "$cmd" "$@"
