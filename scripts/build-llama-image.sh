#!/usr/bin/env bash
# Build a local Docker image with llama.cpp's llama-server (Debian sid package llama.cpp-tools),
# and a python3 with its standard library, which runs the tests' scripts/echo_server.py.
# No registry is reachable, so the image is a debootstrapped root filesystem fed to docker import.
# Usage: build-llama-image.sh [IMAGE]   (default: $SWAPCTL_LLAMA_IMAGE or swapctl/llama-server:sid)
set -euo pipefail

IMAGE=${1:-${SWAPCTL_LLAMA_IMAGE:-swapctl/llama-server:sid}}
SUITE=sid # the only suite on the mirror that packages llama.cpp-tools

"$(dirname "$0")/docker-engine.sh" >/dev/null
# What the tests need of python3 in the image (an image built before it was added lacks it).
PYTHON_CHECK='import email.parser, hashlib, http.server, json'
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    if docker run --rm --network none --entrypoint python3 "$IMAGE" -c "$PYTHON_CHECK" >/dev/null 2>&1; then
        echo "image $IMAGE: already built"
        exit 0
    fi
    echo "image $IMAGE: no python3 with http.server in it; building it again"
fi
t0=$EPOCHREALTIME

# Debian mirror URIs from the machine's apt sources, one-line and deb822 formats.
source_uris() {
    shopt -s nullglob
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        if [ -f "$f" ]; then
            sed -nE 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\2/p' "$f"
        fi
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        sed -nE 's/^URIs:[[:space:]]*//p' "$f" | tr -s '[:blank:]' '\n'
    done
}
MIRROR=
for uri in $(source_uris | grep -E '^https?://'); do
    if curl -fsI --max-time 10 "${uri%/}/dists/$SUITE/Release" >/dev/null; then
        MIRROR=${uri%/}
        break
    fi
done
[ -n "$MIRROR" ] || { echo "build-llama-image: no apt source serves dists/$SUITE" >&2; exit 1; }

if ! command -v debootstrap >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends debootstrap debian-archive-keyring >/dev/null
fi

WORK=$(mktemp -d /var/tmp/llama-image.XXXXXX)
ROOT=$WORK/rootfs
cleanup() {
    # debootstrap and our chroot steps may leave proc/sys/dev mounts: unmount, deepest first.
    awk -v r="$ROOT" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r |
        while read -r m; do umount -l "$m" || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "debootstrap $SUITE (minbase) ..."
debootstrap --variant=minbase "$SUITE" "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
    { tail -n 30 "$WORK/debootstrap.log" >&2; exit 1; }

# The mirror's sid Release file is past its Valid-Until date.
printf 'Acquire::Check-Valid-Until "false";\nAcquire::Check-Date "false";\n' \
    >"$ROOT/etc/apt/apt.conf.d/99no-valid-until"
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
# python3-minimal is the interpreter and a minimal standard library without http.server or
# json; libpython3-stdlib adds the rest (about 33 MB in all, .pyc files included).
echo "installing llama.cpp-tools python3-minimal libpython3-stdlib ..."
chroot "$ROOT" /bin/sh -ec '
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends llama.cpp-tools python3-minimal libpython3-stdlib
    apt-get clean
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/share/doc/* /usr/share/man/* /usr/share/info/* \
        /usr/share/locale/*
' >"$WORK/apt.log" 2>&1 || { tail -n 30 "$WORK/apt.log" >&2; exit 1; }
umount "$ROOT/proc"
: >"$ROOT/etc/resolv.conf" # docker provides its own; do not bake in the host's
# Keep the machine's mirror (sources, build logs) out of the image.
rm -rf "$ROOT/etc/apt/sources.list" "$ROOT"/var/log/*.log "$ROOT"/var/log/apt/*

echo "importing $IMAGE ..."
tar --numeric-owner -C "$ROOT" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'WORKDIR /' \
    --change 'EXPOSE 8080' \
    --change 'CMD ["llama-server", "--version"]' \
    - "$IMAGE" >/dev/null

size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
awk -v a="$t0" -v b="$EPOCHREALTIME" -v s="$size" -v i="$IMAGE" \
    'BEGIN { printf "image %s: built in %.1fs, %.0f MB\n", i, b - a, s / 1e6 }'
