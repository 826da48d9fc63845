#!/usr/bin/env bash
# Time to first byte and bulk throughput through sys-whonix beside a C tor gateway configured
# as Whonix-Gateway (TransPort/DnsPort with nftables REDIRECT), on one private Tor network, in
# one run: three rounds each, medians (sys-whonix/benches/gateway.rs). Needs root; installs
# what it needs. arti is built optimised but without LTO here, to keep the build short.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-debian.sh
export CARGO_PROFILE_BENCH_LTO=false CARGO_PROFILE_BENCH_CODEGEN_UNITS=16
exec cargo bench -p sys-whonix --bench gateway "$@"
