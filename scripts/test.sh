#!/usr/bin/env bash
# The whole test suite, as CI runs it: system packages, formatting, lints, every test.
# Usage: scripts/test.sh            (run as root on Debian 12: tests create network namespaces)
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup-debian.sh

if ! command -v cargo >/dev/null 2>&1; then
  echo "test.sh: no Rust toolchain; install one with rustup (Rust >= 1.89)" >&2
  exit 1
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test (the lab runs our sys-firewall service)"
cargo test --workspace --locked
echo "== the lab's end-to-end tests again, against the Linux kernel sys-firewall (the baseline)"
QUBES_LAB_FIREWALL=linux cargo test --locked -p qubes-lab --test lab_e2e
echo "== benchmarks build"
cargo bench --workspace --locked --no-run
