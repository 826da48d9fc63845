#!/usr/bin/env bash
# Issue 8 figures (hostile traffic), in one run, side by side: our sys-firewall service and a
# Linux kernel sys-firewall with the Qubes nftables layout, in the same lab topology.
#   - with the sys-firewall <-> sys-net link at MTU 1400: a DF ping that does not fit (Linux
#     answers "frag needed, mtu = 1400") and TCP throughput from work (iperf3);
#   - 200 datagrams to a refused port from untrusted: how many ICMP errors come back (Linux
#     rate-limits them to a handful);
#   - two qubes flooding the connection table: how many of work's connections and queries
#     succeed during and right after the flood (the lab test of the same name).
# Needs root (network namespaces). Timings are noisy on shared machines: read them as figures,
# not verdicts; pass/fail lives in the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-debian.sh
cargo build --release -q -p qubes-lab -p sys-firewall -p qubes-rules
LAB=target/release/qubes-lab
SECS=${SECS:-3}

declare -A df tp burst flood

measure() { # kind
  local kind=$1 name=bh$1
  "$LAB" up --name "$name" --firewall "$kind" --netvm "$kind" --no-matrix >/dev/null
  "$LAB" mtu --name "$name" sys-firewall 1400 >/dev/null 2>&1 || true
  local p
  p=$("$LAB" exec --name "$name" work -- ping -c1 -W2 -n -M do -s 1472 198.18.0.10 2>&1 || true)
  df[$kind]=$(echo "$p" | grep -o 'mtu = [0-9]*' | head -1)
  df[$kind]=${df[$kind]:-"no answer"}
  tp[$kind]=$("$LAB" exec --name "$name" work -- iperf3 -c 198.18.0.10 -t "$SECS" -f g 2>&1 \
    | awk '/receiver/ {print $(NF-2)}' | tail -1 || true)
  burst[$kind]=$(ip netns exec "$name-untrusted" "$LAB" probe refused-burst 198.18.0.10:9 \
    --count 200 --wait-ms 500 2>/dev/null | awk '/^sent/ {print $4}' || true)
  "$LAB" down --name "$name" >/dev/null
}

flood_figure() { # kind
  QUBES_LAB_FIREWALL=$1 cargo test --release -q -p qubes-lab --test lab_e2e \
    work_keeps_connecting_while_two_qubes_flood_the_table -- --nocapture 2>&1 \
    | grep -o 'work during the flood [0-9]*/[0-9]*, right after [0-9]*/[0-9]*' | tail -1 \
    | sed 's/work during the flood /during /' || true
}

for k in rust linux; do
  measure "$k"
  flood[$k]=$(flood_figure "$k")
done

printf '\n%-52s %-26s %-26s\n' "figure" "sys-firewall (ours)" "Linux sys-firewall"
printf '%-52s %-26s %-26s\n' "DF ping 1500 B over a 1400 link: ICMP frag-needed" "${df[rust]}" "${df[linux]}"
printf '%-52s %-26s %-26s\n' "TCP work -> world over a 1400 link, ${SECS}s (Gbit/s)" "${tp[rust]:-?}" "${tp[linux]:-?}"
printf '%-52s %-26s %-26s\n' "ICMP errors for 200 refused datagrams" "${burst[rust]:-?}" "${burst[linux]:-?}"
printf '%-52s %-26s %-26s\n' "work while two qubes flood (ok of attempts)" "${flood[rust]:-?}" "${flood[linux]:-?}"
echo "(Linux's table cannot be shrunk inside a namespace, so its flood does not fill it)"
