#!/usr/bin/env bash
# Ensure a Docker engine answers on /var/run/docker.sock (installs and starts dockerd if needed).
set -euo pipefail

SOCK=/var/run/docker.sock
LOG=/var/log/swapctl-dockerd.log

ping_ok() {
    [ "$(curl -s --max-time 2 --unix-socket "$SOCK" http://x/_ping 2>/dev/null || true)" = OK ]
}

# True if PID $1 is a live (not zombie) dockerd. /proc/PID/stat reads "PID (comm) STATE ...".
alive_dockerd() {
    [[ "$(cat "/proc/$1/stat" 2>/dev/null || true)" =~ ^[0-9]+\ \(dockerd\)\ [^Z] ]]
}

# PID of a running dockerd, if any (found via /proc; pgrep may be missing on a fresh machine).
running_dockerd() {
    local p
    for p in /proc/[0-9]*; do
        alive_dockerd "${p#/proc/}" && { echo "${p#/proc/}"; return 0; }
    done
    return 1
}

# Poll /_ping for up to $2 seconds; fail early if dockerd $1 has died.
wait_ping() {
    local pid=$1 secs=$2 i
    for ((i = 0; i < secs * 5; i++)); do
        ping_ok && return 0
        alive_dockerd "$pid" || return 1
        sleep 0.2
    done
    return 1
}

# dockerd refuses to start while the PID in its pid file exists, and a killed daemon lingers
# for a moment (exiting or as a zombie): wait for it, then drop a stale pid file.
clear_pidfile() {
    local old i
    old=$(cat /var/run/docker.pid 2>/dev/null) || return 0
    for ((i = 0; i < 100; i++)); do
        [ -e "/proc/$old" ] || return 0
        grep -q '(dockerd)' "/proc/$old/stat" 2>/dev/null || break
        sleep 0.2
    done
    rm -f /var/run/docker.pid
}

start_dockerd() {
    clear_pidfile
    (
        # Close every inherited fd above 2: a held lock fd (e.g. from flock in CI) must not
        # leak into the long-lived daemon.
        for fd in $(seq 3 255); do eval "exec ${fd}>&-"; done
        # Not a process-group leader here, so setsid does not fork: $! is dockerd itself.
        exec setsid nohup dockerd </dev/null >>"$LOG" 2>&1
    ) &
    DOCKERD_PID=$!
}

elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1fs", b - a }'; }

ping_ok && { echo "docker engine: already running"; exit 0; }

t0=$EPOCHREALTIME

if pid=$(running_dockerd); then
    # Already starting (or slow): wait for it rather than starting a second daemon.
    wait_ping "$pid" 60 && { echo "docker engine: up (existing dockerd $pid)"; exit 0; }
    if alive_dockerd "$pid"; then
        echo "docker-engine: dockerd $pid is running but $SOCK does not answer; see $LOG" >&2
        exit 1
    fi
    # It was exiting (e.g. just killed): start a fresh one below.
fi

pkgs=()
command -v dockerd >/dev/null || pkgs+=(docker.io ca-certificates)
command -v curl >/dev/null || pkgs+=(curl)
if [ ${#pkgs[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    # docker.io depends on containerd, runc, iptables and tini (used by --init).
    apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null
fi

for attempt in 1 2; do
    start_dockerd
    pid=$DOCKERD_PID
    if wait_ping "$pid" 60; then
        echo "docker engine: up (dockerd $pid, $(elapsed "$t0"))"
        exit 0
    fi
    # After a kill -9 of a previous daemon the first start can fail once: stop ours, retry.
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 50); do alive_dockerd "$pid" || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    echo "docker-engine: start attempt $attempt failed (see $LOG)" >&2
done
echo "docker-engine: dockerd did not answer on $SOCK; last log lines:" >&2
tail -n 20 "$LOG" >&2 || true
exit 1
