#!/usr/bin/env bash
# The body of launch/slurm/pretrain.sbatch and finetune.sbatch (see their usage), run as the job's batch shell:
#   torchrun_job.sh COMMAND [--dry-run] CONFIG [overrides...]
#
# 1. From the allocation: the nodes (`scontrol show hostnames`), the rendezvous at the first one, the ranks per
#    node (launch/common.sh: ranks_per_node).
# 2. One srun task per node runs launch/torchrun.sh, which starts that node's ranks (c10d rendezvous, id = job id).
# 3. SIGUSR1/SIGTERM to this shell (sbatch --signal=B:USR1@T, scancel --signal=USR1 --batch) are forwarded to
#    srun, which hands them to torchrun on every node, which hands them to the ranks: they checkpoint at the next
#    optimizer step and exit. After a signal in REQUEUE_SIGNALS the job requeues itself (scontrol requeue); the
#    next start resumes from that checkpoint in the same MLflow run.
# 4. Exit status 2 (a config or data error, which torchrun does not restart either) is never requeued.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=launch/common.sh
source "$REPO/launch/common.sh"

COMMAND=${1:?COMMAND (train or finetune)}
shift
SBATCH_FILE="$REPO/launch/slurm/$([[ $COMMAND == train ]] && echo pretrain || echo "$COMMAND").sbatch"
if wants_help "$@"; then
    usage "$SBATCH_FILE"
    exit 0
fi
while [[ $# -gt 0 ]]; do
    case $1 in
    --dry-run) DRY_RUN=1 && shift ;;
    *) break ;;
    esac
done
[[ $# -ge 1 ]] || die "usage: sbatch $(basename "$SBATCH_FILE") CONFIG [--section.field=value ...] (see --help)"
CONFIG=$1
shift
require_file "$CONFIG" "CONFIG"
if [[ -z ${SLURM_JOB_ID:-} ]]; then
    [[ ${DRY_RUN:-0} == 1 ]] || die "not inside a SLURM job: submit with sbatch (or look with --dry-run)"
    # What the real job will be called: sbatch's SBATCH_JOB_NAME, else the script's #SBATCH --job-name.
    header_name=$(sed -n 's/^#SBATCH --job-name=\([^ ]*\).*/\1/p' "$SBATCH_FILE" | head -n 1)
    SLURM_JOB_ID=0 SLURM_JOB_NAME=${SBATCH_JOB_NAME:-${header_name:-$COMMAND}}
    SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-$(hostname -s)} SLURM_JOB_NUM_NODES=${SLURM_JOB_NUM_NODES:-1}
    SLURM_CPUS_ON_NODE=${SLURM_CPUS_ON_NODE:-$(nproc)}
    LAUNCH_NAME=$SLURM_JOB_NAME
    log "dry run outside SLURM: job '$SLURM_JOB_NAME' (id 0 stands for the job id) on $SLURM_JOB_NUM_NODES node(s)" \
        "with this machine's $SLURM_CPUS_ON_NODE CPUs. The nodes and ranks per node of a real job come from its" \
        "allocation, unknown until sbatch grants it: NPROC_PER_NODE, else its GPUs per node, else" \
        "--ntasks-per-node (this script's header: 1); preview one with NPROC_PER_NODE, SLURM_GPUS_ON_NODE or" \
        "SLURM_NTASKS_PER_NODE, and SLURM_JOB_NUM_NODES with SLURM_JOB_NODELIST"
    : "${SLURM_NTASKS_PER_NODE:=$(sed -n 's/^#SBATCH --ntasks-per-node=\([0-9]*\).*/\1/p' "$SBATCH_FILE" | head -n 1)}"
fi
setup_python
if command -v scontrol >/dev/null; then
    mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
else
    HOSTS=("$SLURM_JOB_NODELIST")
fi
NNODES=${SLURM_JOB_NUM_NODES:-${#HOSTS[@]}}
NPROC=$(ranks_per_node)
# The first node hosts the rendezvous; a port from the job id keeps two jobs sharing a node apart.
MASTER_ADDR=${MASTER_ADDR:-${HOSTS[0]}}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
JOB_LOG_DIR=${LOG_DIR:-logs}/${SLURM_JOB_NAME}-${SLURM_JOB_ID}
ATTEMPT=${SLURM_RESTART_COUNT:-0}
REQUEUE_SIGNALS=${REQUEUE_SIGNALS:-USR1}
MAX_REQUEUES=${MAX_REQUEUES:-20}

node_cmd=(
    "$REPO/launch/torchrun.sh" --nnodes "$NNODES" --nproc-per-node "$NPROC"
    --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID" --log-dir "$JOB_LOG_DIR"
    -- "$COMMAND" "$CONFIG" "$@"
)
# One task per node with all of the node's CPUs (the ranks are torchrun's children, not srun tasks): the fewest
# any node has, from SLURM_JOB_CPUS_PER_NODE ("64(x3),32").
cpus=$SLURM_CPUS_ON_NODE
IFS=, read -ra per_node <<<"${SLURM_JOB_CPUS_PER_NODE:-$cpus}"
for entry in "${per_node[@]}"; do
    n=${entry%%(*}
    if ((n < cpus)); then cpus=$n; fi
done
step=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="$cpus"
    --kill-on-bad-exit=1 "${node_cmd[@]}")

if [[ ${DRY_RUN:-0} == 1 ]]; then
    echo "# job $SLURM_JOB_ID ($SLURM_JOB_NAME): $NNODES node(s) (${HOSTS[*]}) x $NPROC ranks =" \
        "$((NNODES * NPROC)) ranks; rendezvous $MASTER_ADDR:$MASTER_PORT; logs $JOB_LOG_DIR"
    quote "${step[@]}"
    echo "# on each node (node rank = SLURM_NODEID):"
    NODE_RANK=0 SLURM_CPUS_ON_NODE=$SLURM_CPUS_ON_NODE "${node_cmd[0]}" --dry-run "${node_cmd[@]:1}"
    echo "# after SIGUSR1/SIGTERM: forward to srun; after SIG${REQUEUE_SIGNALS}: scontrol requeue $SLURM_JOB_ID"
    exit 0
fi

signal_name="" interrupted=0 srun_pid=""
# shellcheck disable=SC2317  # called by the traps below
on_signal() {
    signal_name=$1 interrupted=1
    log "SIG$1: forwarding to the ranks (checkpoint at the next optimizer step, then exit; torchrun then ends" \
        "with a SignalException traceback, as expected)"
    if [[ -n $srun_pid ]]; then kill -s "$1" "$srun_pid" 2>/dev/null || true; fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

mkdir -p "$JOB_LOG_DIR"
log "job $SLURM_JOB_ID start $((ATTEMPT + 1)) (SLURM_RESTART_COUNT=$ATTEMPT): $NNODES node(s) x $NPROC ranks," \
    "rendezvous $MASTER_ADDR:$MASTER_PORT, per-rank logs in $JOB_LOG_DIR"
log "+ $(quote "${step[@]}")"
"${step[@]}" &
srun_pid=$!
if [[ -n $signal_name ]]; then kill -s "$signal_name" "$srun_pid" 2>/dev/null || true; fi

# `wait` returns early when a trapped signal arrives: wait again until srun itself has ended.
while :; do
    interrupted=0 rc=0
    wait "$srun_pid" || rc=$?
    [[ $interrupted == 1 ]] || break
    if ! kill -0 "$srun_pid" 2>/dev/null; then
        # srun ended around the signal: collect its status unless the wait above already did (127).
        rc2=0
        wait "$srun_pid" 2>/dev/null || rc2=$?
        [[ $rc2 == 127 ]] || rc=$rc2
        break
    fi
done

if [[ $rc == 2 ]]; then
    log "srun exited with status 2: an error in the config or the data (shown above), the same at every start:" \
        "not requeued"
    exit 2
fi
if [[ -n $signal_name && " $REQUEUE_SIGNALS " == *" $signal_name "* ]]; then
    if ((ATTEMPT < MAX_REQUEUES)); then
        log "srun ended ($rc) after SIG$signal_name: requeueing job $SLURM_JOB_ID; the next start resumes from" \
            "the newest checkpoint"
        trap - USR1 TERM
        scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed (is the job requeueable?)"
        sleep 60 # SLURM ends this script during the sleep (SIGTERM)
        die "scontrol requeue $SLURM_JOB_ID did not take effect (is the job requeueable? sbatch --requeue)"
    fi
    log "not requeued: the job was already requeued $ATTEMPT times (MAX_REQUEUES=$MAX_REQUEUES)"
fi
if [[ $rc == 0 ]]; then
    log "done"
else
    log "srun exited with status $rc"
fi
exit "$rc"
