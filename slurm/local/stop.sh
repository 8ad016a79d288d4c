#!/usr/bin/env bash
# Stop the local single-node Slurm started by start.sh (best effort,
# idempotent): slurmd, slurmctld, slurmdbd, MariaDB, munged.
set -euo pipefail

if [[ $EUID -ne 0 ]]; then
    echo "slurm/local/stop.sh must run as root" >&2
    exit 1
fi

RUN_DIR=/run/slurm

# stop_daemon NAME PIDFILE: TERM the daemon (found by its pid file, else by
# its exact process name) and wait up to 20 s before KILL.
stop_daemon() {
    local name=$1 pidfile=$2 pids="" i
    if [[ -s "$pidfile" ]]; then
        pids=$(cat "$pidfile")
        # Ignore a stale pid file whose pid is now something else.
        if [[ "$(ps -o comm= -p "$pids" 2>/dev/null || true)" != "$name" ]]; then
            pids=""
        fi
    fi
    [[ -n "$pids" ]] || pids=$(pgrep -x "$name" || true)
    if [[ -z "$pids" ]]; then
        rm -f "$pidfile"
        return 0
    fi
    echo "slurm: stopping $name ($(echo "$pids" | tr '\n' ' '| sed 's/ $//'))" >&2
    # shellcheck disable=SC2086  # several pids
    kill $pids 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do
        pgrep -x "$name" >/dev/null || { rm -f "$pidfile"; return 0; }
        sleep 0.5
    done
    echo "slurm: $name did not stop in 20s: killing it" >&2
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
    rm -f "$pidfile"
}

stop_daemon slurmd "$RUN_DIR/slurmd.pid"
stop_daemon slurmctld "$RUN_DIR/slurmctld.pid"
stop_daemon slurmdbd "$RUN_DIR/slurmdbd.pid"
stop_daemon mariadbd /run/mysqld/mysqld.pid
stop_daemon munged /run/munge/munged.pid
echo "slurm: stopped"
