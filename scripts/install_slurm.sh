#!/usr/bin/env bash
# Debian's Slurm, munge and accounting (slurmdbd + MariaDB) for the Slurm tests; idempotent, needs root.
# Nothing starts on install: the test fixture (tests/slurm.py) runs every daemon under a temp dir.
set -euo pipefail
packages="slurmctld slurmd slurm-client slurmdbd munge mariadb-server"
missing=$(for p in $packages; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
[ -z "$missing" ] && exit 0
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
