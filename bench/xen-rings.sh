#!/usr/bin/env bash
# Issue 12 figures for the Xen netif rings, in one run, side by side: frames/s and Gbit/s through
# a netfront-netback pair over the emulated hypervisor (both ways, 1514-byte frames and 64 KiB
# GSO TCPv4 super-frames), beside AF_PACKET over a veth pair for the same frames. Sender and
# receiver run in two processes; the receiver checks every frame and the table shows losses.
# Needs root for the veth pair (in a network namespace of its own, removed on exit); without
# it the AF_PACKET rows are skipped. SECS (default 2) is the time per row. Timings are noisy
# on shared machines: read them as figures, not verdicts.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-debian.sh
SECS=${SECS:-2}
cargo build --release -q --locked -p vif-backend --example ring_bench
BIN=${CARGO_TARGET_DIR:-target}/release/examples/ring_bench

ns_args=()
if [ "$(id -u)" = 0 ] && command -v ip >/dev/null; then
  NS=ringbench-$$-$RANDOM
  trap 'ip netns del "$NS" 2>/dev/null || true' EXIT
  ip netns add "$NS"
  ip netns exec "$NS" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
  ip -n "$NS" link add va type veth peer name vb
  ip -n "$NS" link set va up
  ip -n "$NS" link set vb up
  ns_args=(--netns "$NS")
fi
"$BIN" --secs "$SECS" "${ns_args[@]}"
