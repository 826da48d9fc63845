#!/usr/bin/env bash
# Installs the system packages the build and the test suite need on Debian 12.
# Idempotent: packages already present are left alone. Needs root (CI runs as root).
set -euo pipefail

PKGS=(
  pkg-config libnftnl-dev libmnl-dev   # nftnl (kernel data plane)
  nftables iproute2                    # tests read back rulesets, create netns/veth
  dnsmasq-base iputils-ping iperf3     # the lab (qubes-lab): the world's DNS server, ping, iperf3
  conntrack procps curl                # the lab: conntrack purge (Linux sys-firewall), kill, tests
  tor                                  # sys-whonix and the lab: a private Tor network (tor, tor-gencert)
  tcpdump                              # the lab test of sys-whonix: a capture of its uplink
  qemu-system-x86 kmod binutils        # qube-image: boot tests under QEMU, depmod, strip
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup-debian: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "setup-debian: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Packages must not start their daemons: Debian's tor would join the public Tor network.
  # policy-rc.d (invoke-rc.d and deb-systemd-invoke ask it) says no while we install.
  own_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    own_policy=1
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ -n "$own_policy" ]; then
    rm -f /usr/sbin/policy-rc.d
  fi
fi
# The tests run their own tor processes only; a system tor service stays off.
if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled tor.service >/dev/null 2>&1; then
  systemctl disable --now tor.service >/dev/null 2>&1 || true
fi
