#!/usr/bin/env bash
# Start a throwaway single-node Slurm (22.05, Debian packages) for tests/test_slurm.py:
# munged, MariaDB + slurmdbd (so `sacct` has Slurm's own job records), slurmctld and
# slurmd for one node "localhost" with every CPU, 90% of the memory and one fake GPU
# (type "fake"). Partitions: "hemocam" (default) and "hemocam-gpu", both that node, so a
# test can tell which partition a job asked for; accounts: root and "hemocam".
#
#   tests/slurm/start_slurm.sh [STATE_DIR]     (default /tmp/hemocam-slurm; root only)
#
# Everything the daemons write (state, spool, database, logs, pid files) goes under
# STATE_DIR; stop_slurm.sh STATE_DIR stops exactly the daemons started here.
# slurm.conf must sit at the default path /etc/slurm/slurm.conf: the jobstep plugin
# drops SLURM_CONF before its inner `srun`. A slurm.conf not written by this script is
# never overwritten (this must not clobber a real cluster's configuration): exit status 3.
set -euo pipefail

STATE=${1:-/tmp/hemocam-slurm}
HERE=$(cd "$(dirname "$0")" && pwd)
MARK="# hemocam-test-cluster (written by tests/slurm/start_slurm.sh)"
CONF_DIR=/etc/slurm
DB_PORT=${HEMOCAM_TEST_DB_PORT:-3307}
t0=$(date +%s)

die() { echo "start_slurm.sh: $*" >&2; exit 1; }
log() { echo "start_slurm.sh: $* (+$(( $(date +%s) - t0 ))s)"; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
for b in munged slurmctld slurmd slurmdbd sinfo sacct sacctmgr mariadbd mariadb-install-db; do
    command -v "$b" >/dev/null || die "$b not found: run tests/slurm/install_slurm.sh"
done
if [ -e "$CONF_DIR/slurm.conf" ] && ! head -n1 "$CONF_DIR/slurm.conf" | grep -qF "$MARK"; then
    echo "start_slurm.sh: $CONF_DIR/slurm.conf exists and was not written by this script; refusing to replace it" >&2
    exit 3
fi

# A test cluster still running from another state dir (recorded in our slurm.conf) holds
# the ports: stop it first.
if [ -e "$CONF_DIR/slurm.conf" ]; then
    old_state=$(sed -n 's|^StateSaveLocation=\(.*\)/ctld$|\1|p' "$CONF_DIR/slurm.conf")
    if [ -n "$old_state" ] && [ "$old_state" != "$STATE" ] && [ -e "$old_state/.hemocam-slurm" ]; then
        "$HERE/stop_slurm.sh" "$old_state" || true
    fi
fi
# A previous test cluster in the same state dir: stop it, then start from scratch.
if [ -d "$STATE" ] && [ -n "$(ls -A "$STATE")" ]; then
    [ -e "$STATE/.hemocam-slurm" ] || die "$STATE exists but is not a hemocam test-cluster state dir"
    "$HERE/stop_slurm.sh" "$STATE" || true
    rm -rf "$STATE"
fi
mkdir -p "$STATE"/{ctld,spool,munge,mysql}
touch "$STATE/.hemocam-slurm"
chmod 755 "$STATE"

# wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds.
wait_for() {
    local limit=$1 what=$2; shift 2
    local end=$(( $(date +%s) + limit ))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$end" ] || die "timed out after ${limit}s waiting for $what (logs: $STATE)"
        sleep 0.5
    done
}

# --- munge: reuse a working munged (e.g. the system's), else start our own.
if ! (munge -n | unmunge) >/dev/null 2>&1; then
    [ -s /etc/munge/munge.key ] || {
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
    }
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
    chown munge:munge "$STATE/munge"
    setsid runuser -u munge -- munged --pid-file="$STATE/munge/munged.pid" \
        --log-file="$STATE/munge/munged.log" </dev/null
    wait_for 20 munged bash -c 'munge -n | unmunge'
    log "munged up"
fi

# --- MariaDB for slurmdbd: a private data dir and TCP port, no system database touched.
chown mysql:mysql "$STATE/mysql"
mariadb-install-db --user=mysql --datadir="$STATE/mysql" --auth-root-authentication-method=socket \
    --skip-test-db >"$STATE/mariadb-install.log" 2>&1 || die "mariadb-install-db failed: $STATE/mariadb-install.log"
setsid mariadbd --no-defaults --user=mysql --datadir="$STATE/mysql" --bind-address=127.0.0.1 \
    --port="$DB_PORT" --socket="$STATE/mysql/mysqld.sock" --pid-file="$STATE/mysql/mariadb.pid" \
    --log-error="$STATE/mysql/mariadb.log" --innodb-buffer-pool-size=64M </dev/null >/dev/null 2>&1 &
wait_for 30 mariadb mariadb --no-defaults --socket="$STATE/mysql/mysqld.sock" -u root -e "SELECT 1"
mariadb --no-defaults --socket="$STATE/mysql/mysqld.sock" -u root <<SQL
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'hemocam';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'hemocam';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL
log "mariadb up"

# --- configuration
cpus=$(nproc)
mem_total=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
real_mem=$(( mem_total * 9 / 10 ))
mkdir -p "$CONF_DIR"
cat >"$CONF_DIR/slurm.conf" <<EOF
$MARK
ClusterName=hemocam
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
# No cgroups in a container without systemd.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu,gres/gpu:fake
# The plugin puts the rule name in the job comment; keep it in the accounting records.
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
# Finished jobs stay visible to squeue/scontrol for 5 minutes.
MinJobAge=300
ReturnToService=2
SchedulerType=sched/backfill
MpiDefault=none
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mem Gres=gpu:fake:1 State=UNKNOWN
PartitionName=hemocam Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=hemocam-gpu Nodes=localhost MaxTime=INFINITE State=UP
EOF
# A fake GPU: a count-only line marks the node invalid, so point it at /dev/null.
cat >"$CONF_DIR/gres.conf" <<EOF
$MARK
NodeName=localhost Name=gpu Type=fake File=/dev/null
EOF
cat >"$CONF_DIR/slurmdbd.conf" <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=$STATE/slurmdbd.log
PidFile=$STATE/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=hemocam
StorageLoc=slurm_acct_db
EOF
chmod 600 "$CONF_DIR/slurmdbd.conf"

# --- daemons (each forks into the background itself; setsid detaches it from this shell)
setsid slurmdbd </dev/null
wait_for 60 slurmdbd sacctmgr -n list cluster
sacctmgr -i add cluster hemocam >/dev/null
sacctmgr -i add account hemocam cluster=hemocam >/dev/null
sacctmgr -i add user root account=hemocam cluster=hemocam >/dev/null
log "slurmdbd up"
setsid slurmctld </dev/null
wait_for 30 slurmctld scontrol ping
setsid slurmd -N localhost </dev/null
node_idle() { [ "$(sinfo -h -N -n localhost -o %t | sort -u)" = "idle" ]; }
wait_for 60 "node localhost idle" node_idle
# sacct must answer (the executor plugin's status checks use it).
wait_for 30 sacct sacct -n -X
log "slurm up: node localhost, $cpus CPUs, ${real_mem} MB, gpu:fake:1, partitions hemocam hemocam-gpu, state $STATE"
