#!/usr/bin/env bash
# Set up pointsman from this clone in ./.venv (an editable install: edits take effect at once).
#
#   bash scripts/setup.sh            pointsman and its runtime dependencies, nothing else
#   bash scripts/setup.sh --kernel   + Debian nftables, python3-nftables, conntrack (kernel data plane),
#                                    clang, libbpf-dev (kernel.datapath: tc builds its BPF program)
#   bash scripts/setup.sh --engine   + a C compiler and Python headers, so the install builds the
#                                    compiled connection engine (else the pure-Python one runs)
#   bash scripts/setup.sh --bgp      + ExaBGP in the venv (VIP announcement, docs/bgp.md)
#   bash scripts/setup.sh --peers    + every Debian package the tests use as a real peer
#   bash scripts/setup.sh --test     + the test tools (pytest, ruff, mypy, ...), ExaBGP, the peers
#                                    and the compiler (the tests run both engines)
#
# Debian packages need root or sudo; every apt call waits up to 10 minutes for the dpkg lock (a new
# cloud VM often runs unattended-upgrades) instead of failing. Without the scripts,
# `pip install .` or `pipx install .` installs pointsman and its runtime dependencies the same way.
set -euo pipefail
cd "$(dirname "$0")/.."

KERNEL_PACKAGES=(nftables python3-nftables conntrack clang libbpf-dev)
ENGINE_PACKAGES=(gcc libc6-dev python3-dev)
PEER_PACKAGES=(haproxy nginx libnginx-mod-stream redis-server openssl socat wrk iperf3 dnsutils
               dnsmasq-base prometheus prometheus-alertmanager chromium etcd-server bird2 iproute2 "${KERNEL_PACKAGES[@]}")
LOCK_WAIT=600  # seconds

debs=()
extras=()
for arg in "$@"; do
    case "$arg" in
        --kernel) debs+=("${KERNEL_PACKAGES[@]}") ;;
        --engine) debs+=("${ENGINE_PACKAGES[@]}") ;;
        --bgp) extras+=(bgp) ;;
        --peers) debs+=("${PEER_PACKAGES[@]}") ;;
        --test) debs+=("${PEER_PACKAGES[@]}" "${ENGINE_PACKAGES[@]}"); extras+=(test) ;;
        -h|--help) sed -n '2,16s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "setup: unknown option $arg (try --help)" >&2; exit 2 ;;
    esac
done

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# apt-get with the dpkg lock waited for. DPkg::Lock::Timeout covers the dpkg lock; `update` takes
# the lists lock, which apt does not wait for, so a busy lock is retried until the same deadline.
apt_get() {
    local deadline=$((SECONDS + LOCK_WAIT)) err said=""
    err=$(mktemp)
    until $SUDO env DEBIAN_FRONTEND=noninteractive \
            apt-get -o DPkg::Lock::Timeout=$LOCK_WAIT -qq "$@" 2>"$err" >/dev/null; do
        if grep -q "Could not get lock" "$err" && ((SECONDS < deadline)); then
            [ -n "$said" ] || echo "setup: apt is busy (another apt, or unattended-upgrades); waiting" >&2
            said=1
            sleep 5
            continue
        fi
        cat "$err" >&2
        rm -f "$err"
        return 1
    done
    rm -f "$err"
}

install_debs() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    if ! command -v apt-get >/dev/null; then
        echo "setup: not a Debian system: install ${missing[*]} yourself" >&2
        return 1
    fi
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    apt_get update
    apt_get install -y --no-install-recommends "${missing[@]}"
}

PYTHON=${PYTHON:-python3}
needed=()
command -v "$PYTHON" >/dev/null || needed+=(python3)
# Debian splits venv (and the ensurepip it needs) out of python3: the one package a plain
# install may need.
"$PYTHON" -c "import ensurepip, venv" 2>/dev/null || needed+=(python3-venv)
install_debs "${needed[@]}" "${debs[@]}"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "setup: pointsman needs Python 3.11 or newer; $PYTHON is $("$PYTHON" -V 2>&1)" >&2
    exit 1
}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
spec="."
if ((${#extras[@]})); then
    spec=".[$(IFS=,; echo "${extras[*]}")]"
fi
# --no-compile: bytecode is written on first import, for the modules used (pip would compile all
# of every dependency up front, a quarter of the install time).
.venv/bin/python -m pip install -qq --disable-pip-version-check --no-compile -e "$spec"
