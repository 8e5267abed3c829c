#!/usr/bin/env bash
# Stop the test cluster that start_slurm.sh started in STATE_DIR (default /tmp/hemocam-slurm):
# only the daemons whose pid files lie there, then remove the configuration it wrote.
set -uo pipefail

STATE=${1:-/tmp/hemocam-slurm}
MARK="# hemocam-test-cluster (written by tests/slurm/start_slurm.sh)"
[ -e "$STATE/.hemocam-slurm" ] || { echo "stop_slurm.sh: no test cluster in $STATE"; exit 0; }

# stop PIDFILE...: SIGTERM the processes named in the pid files, wait up to 20 s for
# them to exit, then SIGKILL what is left.
stop() {
    local f pid pids=()
    for f in "$@"; do
        [ -s "$f" ] || continue
        pid=$(cat "$f")
        kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    done
    for _ in $(seq 100); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" -eq 0 ] && return 0
        sleep 0.2
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
}

# Jobs first, so that slurmd does not leave job steps behind (only while our slurmctld
# runs: scancel would otherwise retry for a long while).
if [ -s "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
    for p in hemocam hemocam-gpu; do
        timeout 10 scancel --quiet --full --partition="$p" 2>/dev/null
    done
fi
stop "$STATE/slurmd.pid" "$STATE/slurmctld.pid"
stop "$STATE/slurmdbd.pid"
stop "$STATE/mysql/mariadb.pid" "$STATE/munge/munged.pid"

# The configuration, if it is this cluster's (another test cluster may have replaced it).
if grep -qx "StateSaveLocation=$STATE/ctld" /etc/slurm/slurm.conf 2>/dev/null; then
    for f in /etc/slurm/slurm.conf /etc/slurm/gres.conf /etc/slurm/slurmdbd.conf; do
        if [ -e "$f" ] && head -n1 "$f" | grep -qF "$MARK"; then
            rm -f "$f"
        fi
    done
fi
echo "stop_slurm.sh: stopped the test cluster in $STATE"
