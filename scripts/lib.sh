#!/usr/bin/env bash
# scripts/lib.sh -- helpers shared by scripts/test, scripts/demo, scripts/bench
# and scripts/failover-drill.
#
# Source it, don't run it:   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Why this exists: every script here must work on a *fresh* Debian 12 machine
# (CI runs on one), so each one installs what it needs itself, picks its own
# free ports (several runs, or an unrelated redis, may already be listening)
# and synchronises on "the port accepts connections" rather than on sleeps,
# which are either too short on a loaded 2-core box or needlessly slow.
set -euo pipefail

# Sourcing twice is harmless but would reset the PID registry; don't.
if [[ -n "${KEYWARD_LIB_SH_LOADED:-}" ]]; then
    return 0
fi
KEYWARD_LIB_SH_LOADED=1

# nutcracker lives in /usr/sbin, which a non-root PATH (or a stripped CI
# environment) may lack; cargo lives in ~/.cargo/bin, which a non-login shell
# may lack. Add both so `command -v` and the test suite can find them.
case ":${PATH}:" in *:/usr/sbin:*) ;; *) PATH="${PATH}:/usr/sbin" ;; esac
case ":${PATH}:" in *:/sbin:*) ;; *) PATH="${PATH}:/sbin" ;; esac
if [[ -d "${HOME:-/root}/.cargo/bin" ]]; then
    case ":${PATH}:" in *:"${HOME:-/root}/.cargo/bin":*) ;; *) PATH="${HOME:-/root}/.cargo/bin:${PATH}" ;; esac
fi
export PATH

# Repository root: the parent of the directory holding this file.
KEYWARD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export KEYWARD_ROOT

# ---------------------------------------------------------------- logging --

# All diagnostics go to stderr so that stdout stays clean for results
# (scripts/bench prints its table on stdout).
log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

# ---------------------------------------------------------- installation --

# Commands that prove a Debian package is installed. A package not listed
# here is checked by a command of its own name.
_pkg_cmds() {
    case "$1" in
    redis-server) echo "redis-server" ;;
    redis-tools) echo "redis-cli redis-benchmark" ;;
    nutcracker) echo "nutcracker" ;;
    shellcheck) echo "shellcheck" ;;
    *) echo "$1" ;;
    esac
}

# Packages whose Debian postinst starts a system service we don't want: the
# stock redis-server would grab 6379 (and, like nutcracker's, keep running
# behind our backs). Value = service name.
_pkg_service() {
    case "$1" in
    redis-server) echo "redis-server" ;;
    nutcracker) echo "nutcracker" ;;
    *) echo "" ;;
    esac
}

_KEYWARD_APT_UPDATED=""

# Run a command as root: directly when we are root (CI is), else via sudo.
_as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run '$*' (not root and no sudo)"
    fi
}

# Stop and disable a service that a package install may have started.
# Errors are ignored: in a container there is usually no init system at all
# (and Docker's policy-rc.d already refused the start), which is fine.
_quiesce_service() {
    local svc="$1"
    [[ -n "$svc" ]] || return 0
    if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
        _as_root systemctl disable --now "$svc" >/dev/null 2>&1 || true
    elif [[ -x "/etc/init.d/$svc" ]] && _as_root "/etc/init.d/$svc" status >/dev/null 2>&1; then
        # sysvinit-style machine where the install did start it: stop only the
        # packaged instance (found by its pidfile under /run, so servers that
        # tests or other scripts started are never touched).
        _as_root "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
    fi
}

# ensure_pkgs pkg... -- install the Debian packages whose commands are
# missing. `apt-get update` runs once per script, and only if something is
# actually missing, so an already-provisioned machine needs no network.
ensure_pkgs() {
    local pkg cmd missing=()
    for pkg in "$@"; do
        for cmd in $(_pkg_cmds "$pkg"); do
            if ! command -v "$cmd" >/dev/null 2>&1; then
                missing+=("$pkg")
                break
            fi
        done
    done
    ((${#missing[@]})) || return 0

    command -v apt-get >/dev/null 2>&1 ||
        die "missing packages (${missing[*]}) and no apt-get to install them"
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if [[ -z "$_KEYWARD_APT_UPDATED" ]]; then
        _as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null >&2 ||
            die "apt-get update failed"
        _KEYWARD_APT_UPDATED=1
    fi
    # </dev/null: CI has no stdin and nothing here may prompt.
    _as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" </dev/null >&2 ||
        die "apt-get install ${missing[*]} failed"

    for pkg in "${missing[@]}"; do
        _quiesce_service "$(_pkg_service "$pkg")"
        for cmd in $(_pkg_cmds "$pkg"); do
            command -v "$cmd" >/dev/null 2>&1 ||
                die "package $pkg installed but command '$cmd' still not found"
        done
    done
}

# ------------------------------------------------------------------ ports --

# free_ports N -- print N distinct free TCP ports on 127.0.0.1, space
# separated. All N sockets are held open together while choosing, so the
# ports differ from each other (separate free_port calls could, rarely,
# return the same port twice). There is an unavoidable window between closing
# and the real server binding; callers that start a server check it came up.
free_ports() {
    local n="${1:-1}"
    if command -v python3 >/dev/null 2>&1; then
        python3 - "$n" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
        return
    fi
    # Fallback without python3: random ports below the Linux ephemeral range,
    # kept if nothing accepts on them and not already picked.
    local picked=() p tries=0
    while ((${#picked[@]} < n)); do
        ((tries++ < 1000)) || die "could not find $n free ports"
        p=$((20000 + RANDOM % 12000))
        [[ " ${picked[*]} " == *" $p "* ]] && continue
        if ! port_open "$p"; then
            picked+=("$p")
        fi
    done
    echo "${picked[*]}"
}

# free_port -- print one free TCP port on 127.0.0.1.
free_port() { free_ports 1; }

# port_open PORT -- true if 127.0.0.1:PORT accepts a TCP connection now.
# Uses bash's /dev/tcp so it works for any protocol (redis, HTTP admin).
port_open() {
    local port="$1"
    if command -v timeout >/dev/null 2>&1; then
        timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null
    else
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
    fi
}

# wait_port PORT [timeout_s] [pid] -- poll until 127.0.0.1:PORT accepts,
# failing after timeout_s (default 30). If pid is given and that process
# exits first, fail at once instead of waiting out the deadline.
wait_port() {
    local port="$1" timeout_s="${2:-30}" pid="${3:-}"
    local by=()
    [[ -z "$pid" ]] || by=(--pid "$pid")
    wait_until "${by[@]}" "$timeout_s" "127.0.0.1:$port accepts connections" port_open "$port"
}

# wait_until [--pid PID] TIMEOUT_S WHAT CMD... -- run CMD (quietly) every
# 0.1 s until it succeeds; fail with a log line naming WHAT after TIMEOUT_S
# seconds, or at once if process PID exits first. For conditions richer
# than "a port accepts": replication in sync, Sentinel discovery, /ready.
wait_until() {
    local pid=""
    if [[ "${1:-}" == --pid ]]; then
        pid="$2"
        shift 2
    fi
    local timeout_s="$1" what="$2"
    shift 2
    local deadline=$(($(date +%s) + timeout_s))
    while :; do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        if [[ -n "$pid" ]] && ! pid_alive "$pid"; then
            log "process $pid exited while waiting until $what"
            return 1
        fi
        if (($(date +%s) >= deadline)); then
            log "timed out after ${timeout_s}s waiting until $what"
            return 1
        fi
        sleep 0.1 # poll interval only; the deadline above decides
    done
}

# http_ok URL -- true if URL answers 2xx within 2 s (curl, no output).
http_ok() { curl -fsS -o /dev/null --max-time 2 "$1"; }

# -------------------------------------------------------------- processes --

# pid_alive PID -- true if PID exists and is not a zombie (an exited child
# that we have not reaped yet still answers `kill -0`).
pid_alive() {
    local pid="$1" state
    kill -0 "$pid" 2>/dev/null || return 1
    [[ -r "/proc/$pid/stat" ]] || return 0
    state="$(sed -E 's/^.*\) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)" || return 0
    [[ "$state" != "Z" ]]
}

# PIDs of background processes this script started; stop_tracked kills
# exactly these (by PID, never by name, so other servers are left alone).
KEYWARD_PIDS=()
track_pid() { KEYWARD_PIDS+=("$1"); }

# untrack_pid PID -- forget a tracked PID (e.g. a finished client run).
untrack_pid() {
    local pid keep=()
    for pid in "${KEYWARD_PIDS[@]}"; do
        [[ "$pid" == "$1" ]] || keep+=("$pid")
    done
    KEYWARD_PIDS=("${keep[@]}")
}

# run_tracked [--watch PID] CMD... -- run CMD in the background and wait
# for it, returning its status. Unlike a foreground command, this lets a
# trapped INT/TERM be handled at once (bash defers traps until a foreground
# child exits), and the child is tracked meanwhile so stop_tracked kills it
# on the way out. With --watch, CMD is stopped (and fails) if process PID
# dies first: redis-benchmark against a dead server hangs instead of failing.
run_tracked() {
    local watch="" pid rc=0
    if [[ "${1:-}" == --watch ]]; then
        watch="$2"
        shift 2
    fi
    "$@" &
    pid=$!
    track_pid "$pid"
    if [[ -n "$watch" ]]; then
        while pid_alive "$pid"; do
            if ! pid_alive "$watch"; then
                log "process $watch died; stopping: $*"
                kill -TERM "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.2 # poll interval of the watchdog, not a synchronisation
        done
    fi
    wait "$pid" || rc=$?
    untrack_pid "$pid"
    return "$rc"
}

# stop_tracked -- TERM every tracked PID (newest first), give them up to 5 s
# to exit, then KILL what is left, and reap them.
stop_tracked() {
    local i pid deadline
    ((${#KEYWARD_PIDS[@]})) || return 0
    for ((i = ${#KEYWARD_PIDS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${KEYWARD_PIDS[i]}" 2>/dev/null || true
    done
    deadline=$(($(date +%s) + 5))
    for pid in "${KEYWARD_PIDS[@]}"; do
        while pid_alive "$pid" && (($(date +%s) < deadline)); do
            sleep 0.05
        done
        if pid_alive "$pid"; then
            log "process $pid ignored SIGTERM; killing"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    KEYWARD_PIDS=()
}

# --------------------------------------------------------------- limits --

# raise_nofile [want] -- raise the open-files soft limit as far as allowed
# (tests open 10,000 connections; each is one fd at the client and one at
# the proxy). Tries to lift the hard limit first (works as root with
# CAP_SYS_RESOURCE), then sets soft = hard. Never fails; warns if short.
raise_nofile() {
    local want="${1:-65536}" hard
    hard="$(ulimit -Hn)"
    if [[ "$hard" != unlimited ]] && ((hard < want)); then
        ulimit -Hn "$want" 2>/dev/null || true
        hard="$(ulimit -Hn)"
    fi
    if [[ "$hard" == unlimited ]]; then
        # Linux rejects "unlimited" for RLIMIT_NOFILE; ask for a big number.
        ulimit -n 1048576 2>/dev/null || ulimit -n "$want" 2>/dev/null || true
    else
        ulimit -n "$hard" 2>/dev/null || ulimit -n "$want" 2>/dev/null || true
    fi
    local now
    now="$(ulimit -n)"
    if [[ "$now" != unlimited ]] && ((now < want)); then
        log "warning: open-files limit is $now (hard $(ulimit -Hn)), wanted >= $want"
    else
        log "open-files limit: $now"
    fi
}
