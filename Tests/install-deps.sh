#!/usr/bin/env bash
# Installs what building and testing need on Debian 12, skipping what is already there.
# System: libsodium-dev, zlib1g-dev (linked by the product), libqrencode-dev (invite's QR code); iproute2,
# nftables (full-tunnel mode); zbar-tools (decodes the QR code in a test);
# curl, openssl, chromium, tcpdump, iperf3, iputils-ping, systemd (systemd-analyze verifies the units), haproxy
# (the balancer of Examples/ha-netns) (tests);
# python3 + venv.
# Python: pytest, python-socks, PySocks, noiseprotocol (the independent Noise peer), prometheus-client (parses
# the metrics endpoint), installed into a virtual
# environment of the project's own (.venv-tests), never into the system's Python (Debian refuses that:
# externally-managed-environment). Tests/run.sh runs pytest from it.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pkg in libsodium-dev zlib1g-dev libqrencode-dev zbar-tools pkg-config curl iproute2 nftables openssl chromium tcpdump iperf3 iputils-ping \
    systemd haproxy python3 python3-venv; do
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

VENV=.venv-tests
if ! "$VENV/bin/python" -c 'import pytest, python_socks, socks, noise, prometheus_client' 2>/dev/null; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "pytest>=7" "python-socks>=2.4" "PySocks>=1.7" "noiseprotocol==0.3.1" "prometheus-client>=0.17"
fi
