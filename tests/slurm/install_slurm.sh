#!/usr/bin/env bash
# Install the Debian packages a throwaway single-node Slurm needs (tests/test_slurm.py).
# Idempotent: does nothing when every package is already installed. Root only.
# slurmdbd + mariadb-server give the test `sacct`, i.e. Slurm's own job records.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "install_slurm.sh: must run as root (apt-get)" >&2
    exit 1
fi

pkgs=(slurm-wlm slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
missing=()
for p in "${pkgs[@]}"; do
    if ! dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "install_slurm.sh: all packages present"
    exit 0
fi

# Keep the packages' init scripts from starting daemons during installation
# (start_slurm.sh starts them with the test configuration); only where no
# policy is in place already, and removed again afterwards.
created_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    created_policy=1
fi
trap '[ -n "$created_policy" ] && rm -f /usr/sbin/policy-rc.d' EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null
echo "install_slurm.sh: installed ${missing[*]}"
