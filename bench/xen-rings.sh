#!/usr/bin/env bash
# Issue 12's figures, in one run, side by side: frames per second and Gbit/s through a netif
# ring pair (our netfront and netback over the repository's emulated hypervisor), with and
# without GSO, beside AF_PACKET over a veth pair for the same frames (1514-byte TCP frames,
# and 64 KiB TSO super-frames described by their netif GSO slot / virtio_net header).
# Needs root (the veth pair lives in a namespace the bench makes and removes). SECS=N sets
# each row's length (default 3). Timings are noisy on shared machines: figures, not verdicts.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-debian.sh
cargo build --release -q --locked -p vif-backend --example ring_bench
exec target/release/examples/ring_bench
