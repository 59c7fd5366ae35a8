#!/usr/bin/env bash
# Install everything pointsman and its tests need on a fresh Debian 12 machine (run as root or
# with sudo): the real peers used by the interop tests, a C compiler and Python headers for the
# compiled connection engine (optional: without them the pure-Python engine is used), then a
# virtualenv with the package.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(gcc libc6-dev python3-dev haproxy nginx libnginx-mod-stream redis-server openssl socat wrk iperf3 dnsutils dnsmasq-base prometheus chromium etcd-server bird2 iproute2 nftables python3-nftables conntrack)

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})) && command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e ".[test]"
