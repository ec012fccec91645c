#!/usr/bin/env bash
# Installs what building and testing need on Debian 12, skipping what is already there.
# System: libsodium-dev, zlib1g-dev (linked by the product); iproute2, nftables (full-tunnel mode);
# curl, openssl, chromium, tcpdump, iperf3, iputils-ping (tests); python3 + pip.
# Python: pytest, python-socks, PySocks, noiseprotocol (the independent Noise peer).
set -euo pipefail

need_apt=()
for pkg in libsodium-dev zlib1g-dev pkg-config curl iproute2 nftables openssl chromium tcpdump iperf3 iputils-ping \
    python3 python3-pip; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing packages: ${need_apt[*]} (run as root, or: sudo apt-get install ${need_apt[*]})" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

python3 - <<'PY' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check \
    "pytest>=7" "python-socks>=2.4" "PySocks>=1.7" "noiseprotocol==0.3.1"
import pytest, python_socks, socks, noise
PY
