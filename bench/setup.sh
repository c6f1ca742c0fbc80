#!/bin/sh
# Installs the native tools the benchmark harness drives, when they are missing:
#   kcptun (kcptun-client / kcptun-server), the reference tunnel;
#   shadowsocks-libev (ss-local / ss-server), the reference SOCKS5 proxy of the socks5-bulk scenario;
#   nftables + iproute2 (+ ethtool to turn veth offloads off), for loss emulation inside network namespaces
#   the harness creates.
# Safe to run again: it only installs what is absent. Needs root (or sudo) and apt-get (Debian/Ubuntu).
set -eu

need=""
command -v kcptun-client >/dev/null 2>&1 || need="$need kcptun"
command -v kcptun-server >/dev/null 2>&1 || case "$need" in *kcptun*) ;; *) need="$need kcptun" ;; esac
command -v ss-local >/dev/null 2>&1 || need="$need shadowsocks-libev"
command -v nft >/dev/null 2>&1 || need="$need nftables"
command -v ip >/dev/null 2>&1 || need="$need iproute2"
command -v ethtool >/dev/null 2>&1 || need="$need ethtool"

if [ -z "$need" ]; then
    echo "bench/setup.sh: kcptun, shadowsocks-libev, nftables, iproute2 and ethtool are already installed"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "bench/setup.sh: apt-get not found; install these yourself:$need" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "bench/setup.sh: not root and no sudo; install these yourself:$need" >&2
        exit 1
    fi
fi

echo "bench/setup.sh: installing:$need"
$SUDO apt-get update -q
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $need
