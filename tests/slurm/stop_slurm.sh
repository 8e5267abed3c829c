#!/usr/bin/env bash
# Stop the test cluster that start_slurm.sh started in STATE_DIR (default /tmp/hemocam-slurm):
# only the daemons whose pid files lie there, then remove the configuration it wrote.
set -uo pipefail

STATE=${1:-/tmp/hemocam-slurm}
MARK="# hemocam-test-cluster (written by tests/slurm/start_slurm.sh)"
[ -e "$STATE/.hemocam-slurm" ] || { echo "stop_slurm.sh: no test cluster in $STATE"; exit 0; }

# stop PIDFILE: SIGTERM the process named in PIDFILE, wait up to 20 s, then SIGKILL.
stop() {
    local f=$1 pid
    [ -s "$f" ] || return 0
    pid=$(cat "$f")
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 40); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.5
    done
    kill -KILL "$pid" 2>/dev/null
}

# Jobs first, so that slurmd does not leave job steps behind.
command -v scancel >/dev/null && scancel --quiet --full --partition="${HEMOCAM_TEST_PARTITION:-hemocam}" 2>/dev/null
stop "$STATE/slurmd.pid"
stop "$STATE/slurmctld.pid"
stop "$STATE/slurmdbd.pid"
stop "$STATE/mysql/mariadb.pid"
stop "$STATE/munge/munged.pid"

for f in /etc/slurm/slurm.conf /etc/slurm/gres.conf /etc/slurm/slurmdbd.conf; do
    if [ -e "$f" ] && head -n1 "$f" | grep -qF "$MARK"; then
        rm -f "$f"
    fi
done
echo "stop_slurm.sh: stopped the test cluster in $STATE"
