#!/usr/bin/env bash
# Issue figures for the running service, in one run, side by side:
#   - TCP throughput (iperf3, 5 s) from work to the world through sys-firewall: our userspace
#     service vs a Linux kernel sys-firewall with the Qubes nftables layout, same topology;
#   - commit-to-enforced latency (QubesDB commit -> rules in force) at 10 and 1,000 rules.
# Needs root (network namespaces). Timings are noisy on shared machines: read them as figures,
# not verdicts.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-debian.sh
cargo build --release -q -p qubes-lab -p sys-firewall -p qubes-rules
LAB=target/release/qubes-lab
SECS=${SECS:-5}

throughput() { # kind -> Gbit/s
  local kind=$1 name=bench$1
  "$LAB" up --name "$name" --firewall "$kind" --netvm "$kind" --no-matrix >/dev/null
  local out
  out=$("$LAB" exec --name "$name" work -- iperf3 -c 198.18.0.10 -t "$SECS" -f g 2>&1 || true)
  "$LAB" down --name "$name" >/dev/null
  echo "$out" | awk '/receiver/ {print $(NF-2)}' | tail -1
}

rust_tp=$(throughput rust)
linux_tp=$(throughput linux)

lat=$(cargo test --release -q -p sys-firewall --test service_qubesdb commit_to_enforced -- --nocapture 2>&1 \
      | grep 'commit-to-enforced' || true)
lat10=$(echo "$lat" | awk '/at +10 rules/ {print $5}')
lat1000=$(echo "$lat" | awk '/at +1000 rules/ {print $5}')

printf '\n%-44s %-22s %-22s\n' "figure" "sys-firewall (ours)" "Linux sys-firewall"
printf '%-44s %-22s %-22s\n' "TCP work -> world, iperf3 ${SECS}s (Gbit/s)" "${rust_tp:-?}" "${linux_tp:-?}"
printf '%-44s %-22s %-22s\n' "commit-to-enforced, 10 rules (ms)" "${lat10:-?}" "n/a (nft -f per commit)"
printf '%-44s %-22s %-22s\n' "commit-to-enforced, 1,000 rules (ms)" "${lat1000:-?}" "n/a"
echo "target: commit-to-enforced <= 10 ms at 1,000 rules"
