#!/usr/bin/env bash
# Ensure Debian's container registry (package docker-registry, the distribution project's
# server) is installed: the pull tests serve images from it on 127.0.0.1. It is not started
# here (apt starts no services without systemd); each test session runs its own.
set -euo pipefail

if [ -x /usr/bin/docker-registry ]; then
    echo "docker-registry: installed"
    exit 0
fi
t0=$EPOCHREALTIME
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends docker-registry >/dev/null
echo "docker-registry: installed ($(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1fs", b - a }'))"
