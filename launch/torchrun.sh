#!/usr/bin/env bash
# Start one node's share of a training job with torchrun (clusters without SLURM; launch/slurm/*.sbatch run it
# once per node through srun).
#
# usage: launch/torchrun.sh [options] COMMAND CONFIG [--section.field=value ...]
#   COMMAND   train | finetune (a `python -m pipeline` command); CONFIG its YAML (or `--config CONFIG`); then
#             overrides.
#
# options (each also read from the environment variable named in brackets):
#   --nnodes N              nodes in the job [NNODES, default 1]
#   --node-rank R           this node's index [NODE_RANK, else SLURM_NODEID, else 0]; names its log folder and
#                           is passed to torchrun with RDZV_BACKEND=static (c10d assigns ranks at rendezvous)
#   --nproc-per-node P      ranks on this node [NPROC_PER_NODE, else the GPUs visible, else 1]
#   --rdzv-endpoint H:P     rendezvous host:port, the same on every node, reachable from all of them
#                           [RDZV_ENDPOINT, else MASTER_ADDR:MASTER_PORT; one node: a free local port]
#   --rdzv-id ID            job id shared by the nodes [RDZV_ID, default pipeline]
#   --max-restarts K        restarts of the worker group after a rank fails; each resumes from the newest
#                           checkpoint (--checkpoint.resume auto, the default) [MAX_RESTARTS, default 3]
#   --log-dir DIR           per-rank stdout/stderr under DIR/node<R>/ [LOG_DIR, default logs/torchrun]
#   --dry-run               print the torchrun command instead of running it [DRY_RUN=1]
#   -h, --help              this text (anywhere on the line: nothing else runs; `python -m pipeline COMMAND
#                           --help` lists the command's options)
# environment:
#   PYTHON                  the interpreter [default: <repo>/.venv/bin/python]
#   OMP_NUM_THREADS         threads per rank [default: this node's CPUs / ranks]
#   RDZV_BACKEND            c10d (default) or static
#   SHUTDOWN_TIMEOUT        seconds ranks get to checkpoint after SIGTERM/SIGUSR1 before SIGKILL [default 300]
#   TEE_RANKS               local ranks whose output is also copied to this script's output [default 0]
#   TORCH_DISABLE_SHARE_RDZV_TCP_STORE   set to 1 (torch 2.13 + gloo: restarted attempts cannot reconnect
#                           otherwise)
#
# Signals: SIGTERM and SIGUSR1 sent to torchrun are forwarded to the ranks, which write a checkpoint at the next
# optimizer step and exit; torchrun then exits non-zero (it was signalled) and the next start resumes.
#
# torchrun here is `python -m pipeline.train.torchrun`, torchrun itself except that a rank exiting with status 2
# (a config or data error: the same error on every attempt) ends the job at once with status 2, not restarted.
#
# examples:
#   launch/torchrun.sh --nproc-per-node 2 train configs/pretrain/debug.yaml --train.max_steps 50
#   # two machines, on each (node rank 0 and 1):
#   launch/torchrun.sh --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29400 --nproc-per-node 8 \
#       train configs/pretrain/bert-base-phase1.yaml --data.shards /shared/shards
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/common.sh
source "$REPO/launch/common.sh"

if wants_help "$@"; then
    usage "${BASH_SOURCE[0]}"
    exit 0
fi
while [[ $# -gt 0 ]]; do
    case $1 in
    --nnodes) NNODES=$2 && shift 2 ;;
    --node-rank) NODE_RANK=$2 && shift 2 ;;
    --nproc-per-node) NPROC_PER_NODE=$2 && shift 2 ;;
    --rdzv-endpoint) RDZV_ENDPOINT=$2 && shift 2 ;;
    --rdzv-id) RDZV_ID=$2 && shift 2 ;;
    --max-restarts) MAX_RESTARTS=$2 && shift 2 ;;
    --log-dir) LOG_DIR=$2 && shift 2 ;;
    --dry-run) DRY_RUN=1 && shift ;;
    --) shift && break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
    esac
done
[[ $# -ge 2 ]] || die "usage: launch/torchrun.sh [options] COMMAND CONFIG [overrides...] (see --help)"
COMMAND=$1
[[ $2 == --config ]] && shift # `train --config CONFIG ...` works too
CONFIG=${2:?CONFIG}
shift 2
[[ $COMMAND =~ ^(train|finetune)$ ]] || die "COMMAND must be train or finetune, got '$COMMAND'"
require_file "$CONFIG" "CONFIG"
setup_python

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
NPROC_PER_NODE=$(ranks_per_node)
RDZV_BACKEND=${RDZV_BACKEND:-c10d}
if [[ -z ${RDZV_ENDPOINT:-} && -n ${MASTER_ADDR:-} ]]; then
    RDZV_ENDPOINT=$MASTER_ADDR:${MASTER_PORT:-29400}
fi
[[ $NNODES == 1 || -n ${RDZV_ENDPOINT:-} ]] || die "--nnodes $NNODES needs --rdzv-endpoint HOST:PORT (or MASTER_ADDR)"
LOG_DIR=${LOG_DIR:-logs/torchrun}
cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / NPROC_PER_NODE > 0 ? cpus / NPROC_PER_NODE : 1))}
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

cmd=("$PYTHON" -m pipeline.train.torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE")
if [[ -z ${RDZV_ENDPOINT:-} ]]; then
    cmd+=(--standalone) # one node: c10d on a free local port
else
    cmd+=(--rdzv-backend "$RDZV_BACKEND" --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-pipeline}")
    [[ $RDZV_BACKEND == static ]] && cmd+=(--node-rank "$NODE_RANK")
fi
cmd+=(
    --max-restarts "${MAX_RESTARTS:-3}"
    # SIGUSR1 is SLURM's pre-emption warning: forward it to the ranks like SIGTERM (torchrun dies of it otherwise)
    --signals-to-handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    --shutdown-timeout "${SHUTDOWN_TIMEOUT:-300}"
    --log-dir "$LOG_DIR/node$NODE_RANK" --tee 3 --local-ranks-filter "${TEE_RANKS:-0}"
    -m pipeline "$COMMAND" --config "$CONFIG" "$@"
)
if [[ ${DRY_RUN:-0} == 1 ]]; then
    echo "OMP_NUM_THREADS=$OMP_NUM_THREADS TORCH_DISABLE_SHARE_RDZV_TCP_STORE=$TORCH_DISABLE_SHARE_RDZV_TCP_STORE" \
        "PYTHONPATH=$PYTHONPATH $(quote "${cmd[@]}")"
    exit 0
fi
mkdir -p "$LOG_DIR"
log "node $NODE_RANK of $NNODES: $NPROC_PER_NODE ranks, OMP_NUM_THREADS=$OMP_NUM_THREADS"
exec "${cmd[@]}"
