#!/usr/bin/env bash
# Stop the single-node cluster of launch/local_slurm/start.sh: slurmd, slurmctld, then munged (by their pid
# files). Jobs still running are killed with their daemons; the configuration and packages stay.
#
# usage: sudo launch/local_slurm/stop.sh
#        launch/local_slurm/stop.sh --help    this text, nothing else
set -euo pipefail
for arg in "$@"; do
    case $arg in
    -h | --help)
        sed -n '2,/^[^#]/p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "local_slurm: error: unknown argument '$arg' (see --help)" >&2
        exit 2
        ;;
    esac
done

stop() {
    local name=$1 pid
    pid=$(cat "$2" 2>/dev/null) || return 0
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        echo "local_slurm: stopped $name"
    fi
}
stop slurmd /run/slurmd.pid
stop slurmctld /run/slurmctld.pid
stop munged /run/munge/munged.pid
