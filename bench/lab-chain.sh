#!/usr/bin/env bash
# Issue 9 figures, in one run, side by side: the default chain (work -> sys-firewall -> sys-net
# -> world) built from our two services, and the same chain built from Linux kernel forwarding
# with the Qubes nftables layout. The two labs are measured alternately, ROUNDS rounds each
# (default 3), and the medians printed:
#   - TCP work -> world and world -> work (iperf3, iperf3 -R), one stream and 8 parallel;
#   - ping round-trip time work -> world (20 pings, the average);
#   - DHCP (ours only): time from the start of `sys-net run` to a bound lease, beside the
#     DISCOVER-to-ACK span in dnsmasq's own log (dnsmasq pings an address before offering it).
# Needs root (network namespaces). Timings are noisy on shared machines: read them as figures,
# not verdicts; pass/fail lives in the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-debian.sh
cargo build --release -q -p qubes-lab -p sys-firewall -p sys-net -p qubes-rules
LAB=target/release/qubes-lab
SECS=${SECS:-3}
ROUNDS=${ROUNDS:-3}

up() { # kind name
  "$LAB" up --name "$2" --firewall "$1" --netvm "$1" --no-matrix >/dev/null
}
iperf() { # name extra-args... -> Gbit/s
  local name=$1
  shift
  "$LAB" exec --name "$name" work -- iperf3 -c 198.18.0.10 -t "$SECS" -f g "$@" 2>&1 \
    | awk '/receiver/ {v=$(NF-2)} END {print v}'
}
rtt() { # name -> ms
  "$LAB" exec --name "$1" work -- ping -c 20 -i 0.05 -q -n 198.18.0.10 2>&1 \
    | awk -F/ '/rtt|round-trip/ {print $5}'
}
median() { sort -g | awk '{a[NR]=$1} END {if (NR == 0) print "?"; else print a[int((NR + 1) / 2)]}'; }

declare -A r
for round in $(seq 1 "$ROUNDS"); do
  for k in rust linux; do
    name="bc$k"
    up "$k" "$name"
    r[$k,up1]+="$(iperf "$name") "
    r[$k,down1]+="$(iperf "$name" -R) "
    r[$k,up8]+="$(iperf "$name" -P 8) "
    r[$k,down8]+="$(iperf "$name" -P 8 -R) "
    r[$k,rtt]+="$(rtt "$name") "
    if [ "$k" = rust ]; then
      # The service's own log has its start and the lease; dnsmasq's has the exchange.
      log=/run/qubes-lab/$name/sys-net.log
      t0=$(grep -m1 -o '^[^ ]*' "$log" | sed 's/\x1b\[[0-9;]*m//g')
      t1=$(grep -m1 'DHCP lease' "$log" | grep -o '^[^ ]*' | sed 's/\x1b\[[0-9;]*m//g')
      r[$k,dhcp]+="$(python3 -c "from datetime import datetime as d; f=lambda s: d.fromisoformat(s.rstrip('Z')); print(round((f('$t1')-f('$t0')).total_seconds(),3))" 2>/dev/null || echo '?') "
    fi
    "$LAB" down --name "$name" >/dev/null
  done
done

row() { printf '%-46s %-22s %-22s\n' "$@"; }
med() { echo "${r[$1]:-}" | tr ' ' '\n' | grep -v '^$' | median; }
echo
echo "the default chain, median of $ROUNDS alternating rounds (${SECS}s iperf3 runs):"
row "figure" "our two services" "Linux chain"
row "TCP work -> world, 1 stream (Gbit/s)" "$(med rust,up1)" "$(med linux,up1)"
row "TCP world -> work, 1 stream (Gbit/s)" "$(med rust,down1)" "$(med linux,down1)"
row "TCP work -> world, 8 streams (Gbit/s)" "$(med rust,up8)" "$(med linux,up8)"
row "TCP world -> work, 8 streams (Gbit/s)" "$(med rust,down8)" "$(med linux,down8)"
row "ping RTT work -> world (ms, avg of 20)" "$(med rust,rtt)" "$(med linux,rtt)"
row "sys-net run -> bound lease (s)" "$(med rust,dhcp)" "n/a (static address)"
echo "(the lease time includes dnsmasq's ping of the address before its offer, about 3 s)"
