#!/bin/sh
# Build the Containerfile and run it: a server container and an agent container (host network, loopback only),
# curl through them with --socks5-hostname, the health checks, the processes' user; then clean up.
#
#   sh packaging/container-test.sh            (as root: podman, debootstrap, curl, python3; docs/operating.md)
#
# No base image is pulled: the base is a Debian bookworm made here with debootstrap (python3, its venv module,
# pip), imported into podman and given to the Containerfile as --build-arg BASE. Everything lives under one
# directory of its own (VTUNNEL_CT_DIR, default a new one under /var/tmp), podman's storage too, and is removed
# at the end; VTUNNEL_CT_KEEP=1 keeps it. VTUNNEL_CT_BASE reuses a base made before: a rootfs directory, or its
# tar (the script leaves one at VTUNNEL_CT_DIR/base.tar with VTUNNEL_CT_KEEP=1). The base trusts the certificate
# authorities this host added (/usr/local/share/ca-certificates: a proxy's, where one stands between this host
# and the package registries), so the image's build reaches them as the host does. VTUNNEL_CT_STORAGE: podman's storage driver (default: overlay
# when it works here, else vfs). VTUNNEL_CT_MIRROR: the Debian mirror (default: the one apt uses here).
# Exit status: 0 all good, 1 a check failed, 77 a tool is missing.
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
say() { printf 'container-test: %s\n' "$*"; }
fail() { say "FAIL: $*"; exit 1; }

for tool in podman debootstrap curl python3; do
    command -v "$tool" >/dev/null 2>&1 || { say "missing: $tool"; exit 77; }
done
[ "$(id -u)" = 0 ] || { say "needs root (debootstrap, podman's storage)"; exit 77; }

DIR=${VTUNNEL_CT_DIR:-$(mktemp -d /var/tmp/vtunnel-ct.XXXXXX)}
mkdir -p "$DIR"
NAME=vtct$$
SERVER=$NAME-server
AGENT=$NAME-agent
IMAGE=localhost/$NAME:test
BASE_IMAGE=localhost/$NAME-base:bookworm
HTTP_PID=

RUNTIME=
LIMITS=
podman_() { podman --root "$DIR/storage" --runroot "$DIR/run" --storage-driver "$STORAGE" $RUNTIME "$@"; }

cleanup() {
    status=$?
    set +e
    if [ "$status" != 0 ] && [ -n "${STORAGE:-}" ]; then
        for c in "$SERVER" "$AGENT"; do
            say "--- logs of $c"
            podman_ logs "$c" 2>&1 | tail -n 30
        done
    fi
    [ -n "$HTTP_PID" ] && kill "$HTTP_PID" 2>/dev/null
    if [ -n "${STORAGE:-}" ]; then
        podman_ rm -f -t 0 "$SERVER" "$AGENT" >/dev/null 2>&1
        podman_ rmi -f "$IMAGE" "$BASE_IMAGE" >/dev/null 2>&1
        podman_ system reset -f >/dev/null 2>&1 || true
    fi
    if [ "${VTUNNEL_CT_KEEP:-0}" = 1 ]; then
        say "kept $DIR"
    else
        rm -rf "$DIR"
    fi
    exit "$status"
}
trap cleanup EXIT INT TERM

# podman's storage: overlay where the kernel lets this place mount it (not inside every sandbox), else vfs
if [ -n "${VTUNNEL_CT_STORAGE:-}" ]; then
    STORAGE=$VTUNNEL_CT_STORAGE
else
    STORAGE=overlay
    if ! podman_ info >/dev/null 2>&1; then
        STORAGE=vfs
        rm -rf "$DIR/storage" "$DIR/run"
    fi
fi
say "podman $(podman --version | awk '{print $3}'), storage $STORAGE, in $DIR"

# 1. the base: Debian bookworm with python3, made here
ROOTFS=
if [ -f "${VTUNNEL_CT_BASE:-}" ]; then
    say "base from $VTUNNEL_CT_BASE"
    cp "$VTUNNEL_CT_BASE" "$DIR/base.tar"
elif [ -d "${VTUNNEL_CT_BASE:-}" ]; then
    say "base from $VTUNNEL_CT_BASE"
    ROOTFS=$DIR/rootfs
    cp -a "$VTUNNEL_CT_BASE" "$ROOTFS"
else
    MIRROR=${VTUNNEL_CT_MIRROR:-$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)}
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
    say "debootstrap bookworm from $MIRROR"
    ROOTFS=$DIR/rootfs
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$ROOTFS" "$MIRROR" >"$DIR/debootstrap.log" 2>&1 \
        || { tail -n 20 "$DIR/debootstrap.log"; fail "debootstrap"; }
fi
if [ -n "$ROOTFS" ]; then
    if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
        cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
        chroot "$ROOTFS" update-ca-certificates >/dev/null 2>&1 || fail "update-ca-certificates in the base"
    fi
    rm -rf "$ROOTFS/var/cache/apt/archives/"*.deb "$ROOTFS/var/lib/apt/lists/"*
    tar -C "$ROOTFS" -cf "$DIR/base.tar" .
    rm -rf "$ROOTFS"
fi
# pip in a venv reads the system's authorities only when told to
podman_ import -q --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" "$DIR/base.tar" "$BASE_IMAGE" >/dev/null

# the OCI runtime: podman's default where it runs here; else runc with limits the process may set. Inside some
# sandboxes crun refuses a hybrid cgroup hierarchy, and raising RLIMIT_NOFILE / setting RLIMIT_NPROC to
# podman's defaults is not permitted (VTUNNEL_CT_RUNTIME=runc picks the second at once).
if [ "${VTUNNEL_CT_RUNTIME:-}" != runc ] && podman_ run --rm "$BASE_IMAGE" true >"$DIR/probe.log" 2>&1; then
    say "OCI runtime: podman's default"
else
    [ "${VTUNNEL_CT_RUNTIME:-}" = runc ] || say "podman's default runtime fails here: $(tail -n 1 "$DIR/probe.log")"
    command -v runc >/dev/null 2>&1 || { say "missing: runc"; exit 77; }
    RUNTIME="--runtime runc"
    LIMITS="--ulimit nofile=$(ulimit -Hn):$(ulimit -Hn) --ulimit nproc=4096:4096"
    podman_ run --rm $LIMITS "$BASE_IMAGE" true >"$DIR/probe.log" 2>&1 \
        || { cat "$DIR/probe.log"; fail "no OCI runtime runs a container here"; }
    say "OCI runtime: runc, $LIMITS"
fi

# 2. the image
say "building the Containerfile on it"
# the docker format: the OCI image format has no HEALTHCHECK (podman drops it with a warning)
podman_ build -q --format docker $LIMITS --build-arg "BASE=$BASE_IMAGE" -t "$IMAGE" -f "$ROOT/Containerfile" "$ROOT" >"$DIR/build.log" 2>&1 \
    || { tail -n 30 "$DIR/build.log"; fail "podman build"; }

# 3. a key, a config, an origin to fetch from, free loopback ports
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
TUNNEL=$(free_port); SOCKS=$(free_port); HTTP=$(free_port); SMETRICS=$(free_port); AMETRICS=$(free_port)
mkdir -p "$DIR/etc" "$DIR/www"
python3 -c 'import os, secrets; print(secrets.token_hex(32))' >"$DIR/etc/key"
chown 10001:10001 "$DIR/etc/key"
chmod 0600 "$DIR/etc/key"
cat >"$DIR/etc/server.toml" <<EOF
[server]
listen = ["tcp://127.0.0.1:$TUNNEL"]
psk_file = "/etc/vtunnel/key"
allow_private = true
EOF
head -c 1048576 /dev/urandom >"$DIR/www/blob"
python3 -m http.server --bind 127.0.0.1 --directory "$DIR/www" "$HTTP" >"$DIR/http.log" 2>&1 &
HTTP_PID=$!

# 4. the server (its default command, but the metrics on a free port) and the agent
podman_ run -d $LIMITS --name "$SERVER" --network host -v "$DIR/etc:/etc/vtunnel:ro" \
    -e "VTUNNEL_HEALTH_URL=http://127.0.0.1:$SMETRICS/metrics" "$IMAGE" \
    server --config /etc/vtunnel/server.toml --metrics "127.0.0.1:$SMETRICS" --log-format json >/dev/null
podman_ run -d $LIMITS --name "$AGENT" --network host -v "$DIR/etc:/etc/vtunnel:ro" \
    -e "VTUNNEL_HEALTH_URL=http://127.0.0.1:$AMETRICS/metrics" "$IMAGE" \
    agent --server "tcp://127.0.0.1:$TUNNEL" --psk-file /etc/vtunnel/key --socks "127.0.0.1:$SOCKS" \
    --metrics "127.0.0.1:$AMETRICS" --log-format json >/dev/null

# 5. through them
ok=
for _ in $(seq 1 60); do
    if curl -sf --max-time 10 --socks5-hostname "127.0.0.1:$SOCKS" -o "$DIR/got" "http://127.0.0.1:$HTTP/blob"; then
        ok=1
        break
    fi
    sleep 0.5
done
[ -n "$ok" ] || fail "curl through the agent and server containers"
cmp -s "$DIR/got" "$DIR/www/blob" || fail "the bytes that came back differ"
say "curl --socks5-hostname through agent and server containers: 1 MiB exact"

# 6. the health checks, and never root
for c in "$SERVER" "$AGENT"; do
    podman_ healthcheck run "$c" >"$DIR/health.log" 2>&1 || { cat "$DIR/health.log"; fail "$c: health check"; }
    uid=$(podman_ exec "$c" id -u)
    [ "$uid" = 10001 ] || fail "$c runs as uid $uid"
    pid=$(podman_ inspect -f '{{.State.Pid}}' "$c")
    host_uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
    [ "$host_uid" != 0 ] || fail "$c's process is root"
    say "$c: healthy, uid $uid"
done
say "ok"
