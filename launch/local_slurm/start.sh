#!/usr/bin/env bash
# Install and start a single-node SLURM cluster on this machine (Debian/Ubuntu, as root).
#
# usage: sudo launch/local_slurm/start.sh
#        launch/local_slurm/start.sh --help    this text, nothing else
#
# For tests and trying the launchers: Debian's slurm-wlm and munge, with munged (as user munge), slurmctld and
# slurmd (as root) on this host, one partition "debug" holding this node with its CPUs and memory (from
# `slurmd -C`). ProctrackType=proctrack/linuxproc and TaskPlugin=task/none work inside containers (no cgroups
# needed); accounting is off, so `sacct` does not work (use `scontrol show job`).
#
# Idempotent: when the cluster already answers, it prints its state and returns at once. It writes
# /etc/slurm/slurm.conf only when that file is absent or was written by this script (FORCE=1 replaces another).
# Stop it with launch/local_slurm/stop.sh.
#
# environment:
#   PARTITION=debug      partition name
#   STATE_DIR=/var/lib/slurm   where slurmctld and slurmd keep their state
#   LOG_DIR=/var/log/slurm     daemon logs (read them when a job does not start)
#   FORCE=0              1: overwrite a slurm.conf this script did not write
#   NO_INSTALL=0         1: never call apt-get (fail if the packages are missing)
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

PARTITION=${PARTITION:-debug}
STATE_DIR=${STATE_DIR:-/var/lib/slurm}
LOG_DIR=${LOG_DIR:-/var/log/slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by launch/local_slurm/start.sh"

say() { echo "local_slurm: $*"; }
die() {
    echo "local_slurm: error: $*" >&2
    exit 1
}

node_state() { sinfo -h -N -o %T 2>/dev/null | head -n 1; }

cluster_answers() {
    command -v sinfo >/dev/null 2>&1 && timeout 10 scontrol ping 2>/dev/null | grep -q "is UP" &&
        [[ "$(node_state)" =~ ^(idle|mixed|allocated|completing) ]]
}

if cluster_answers; then
    say "already running: $(sinfo -h -N -o '%N %T %c CPUs %m MB' | head -n 1)"
    exit 0
fi

[[ $(id -u) -eq 0 ]] || die "run as root (it installs packages and starts daemons)"

# ---- packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    [[ ${NO_INSTALL:-0} == 1 ]] && die "slurm-wlm/munge are not installed and NO_INSTALL=1"
    command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and there is no apt-get to install them"
    say "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
fi

# ---- munge: a key, then munged as user munge
if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile /etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.2
    done
    munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# ---- slurm.conf from this machine's CPUs and memory
host=$(hostname -s)
getent hosts "$host" >/dev/null || die "the host name '$host' does not resolve: add it to /etc/hosts"
node_line=$(slurmd -C | head -n 1)
[[ $node_line == NodeName=* ]] || die "slurmd -C did not describe this node: $node_line"
cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node_line")
memory=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
if [[ -e $CONF ]] && ! grep -qF "$MARK" "$CONF" && [[ ${FORCE:-0} != 1 ]]; then
    die "$CONF exists and was not written by this script (FORCE=1 replaces it)"
fi
install -d /etc/slurm "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd" "$LOG_DIR"
cat >"$CONF.new" <<EOF
$MARK
# A single-node cluster for tests: munge auth, no accounting, no cgroups (works inside containers).
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$((memory / cpus))
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# Keep finished jobs in scontrol for 15 minutes (tests read their restart count and exit code).
MinJobAge=900
SchedulerParameters=sched_interval=2
$node_line State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$CONF.new" "$CONF"; then
    mv "$CONF.new" "$CONF"
    config_changed=1
else
    rm -f "$CONF.new"
    config_changed=0
fi

# ---- daemons (restarted when the config changed)
running() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_daemon() {
    if running "$1"; then
        kill "$(cat "$1")"
        for _ in $(seq 50); do running "$1" || break; sleep 0.2; done
    fi
}
if [[ $config_changed == 1 ]]; then
    stop_daemon /run/slurmd.pid
    stop_daemon /run/slurmctld.pid
fi
if ! running /run/slurmctld.pid; then
    say "starting slurmctld"
    slurmctld
fi
for _ in $(seq 100); do
    timeout 5 scontrol ping 2>/dev/null | grep -q "is UP" && break
    sleep 0.2
done
timeout 5 scontrol ping | grep -q "is UP" || die "slurmctld does not answer (see $LOG_DIR/slurmctld.log)"
if ! running /run/slurmd.pid; then
    say "starting slurmd"
    slurmd
fi

# ---- wait for the node to be usable (a node left DOWN/DRAIN by an earlier run is resumed)
for i in $(seq 150); do
    state=$(node_state)
    case $state in
    idle* | mixed* | allocated* | completing*) break ;;
    down* | drain*)
        if ((i % 10 == 1)); then scontrol update NodeName="$host" State=RESUME 2>/dev/null || true; fi
        ;;
    esac
    sleep 0.2
done
cluster_answers || die "node $host is '$(node_state)', not idle (see $LOG_DIR/slurmd.log, scontrol show node)"
say "running: $(sinfo -h -N -o '%N %T %c CPUs %m MB' | head -n 1), partition $PARTITION"
