#!/usr/bin/env bash
# Submit preprocessing to SLURM: an array job of NUM_TASKS shard tasks (launch/slurm/shard.sbatch, one
# --task-index each), then the manifest merge (launch/slurm/merge.sbatch) as a job that starts only after every
# array task succeeded. Run it on a login node, from any directory: CONFIG and paths in the overrides are relative
# to it (the jobs run there), paths written in a preset to the repository.
#
# usage: launch/slurm/preprocess.sh [--dry-run] CONFIG --output DIR [--section.field=value ...]
#        launch/slurm/preprocess.sh --help
#   CONFIG and the overrides are those of `python -m pipeline shard`; --output (or --output.dir) is required
#   here, for the merge job. --dry-run prints the two sbatch commands instead of submitting them.
#
# environment:
#   NUM_TASKS=4          array tasks (machines); the output is byte-identical for any number
#   CPUS_PER_TASK=1      CPUs per task, also its --workers
#   SBATCH_ARGS=""       more sbatch options for both jobs, e.g. "--partition cpu --time 4:00:00 --mem 32G"
#                        (sbatch's own SBATCH_PARTITION, SBATCH_ACCOUNT, ... variables work too)
#   MERGE_ARGS=""        options of `pipeline merge`, e.g. --verify (re-hash every shard)
#   LOG_DIR=logs         job logs: LOG_DIR/shard-<array job>_<task>.out, LOG_DIR/merge-<job>.out (created)
#   PYTHON               interpreter for the jobs [default: <repo>/.venv/bin/python]
#
# example:
#   NUM_TASKS=16 CPUS_PER_TASK=8 launch/slurm/preprocess.sh configs/preprocess/bert-phase1.yaml \
#       --input /data/corpus --tokenizer /shared/tok --output /shared/shards-bert-128
# prints: submitted array job 1234 (16 tasks) and merge job 1235 (after 1234 succeeds)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=launch/common.sh
source "$REPO/launch/common.sh"

if wants_help "$@"; then
    usage "${BASH_SOURCE[0]}"
    exit 0
fi
case ${1:-} in
--dry-run) DRY_RUN=1 && shift ;;
esac
[[ $# -ge 1 ]] || die "usage: launch/slurm/preprocess.sh [--dry-run] CONFIG --output DIR [overrides...] (see --help)"
CONFIG=$1
shift
require_file "$CONFIG" "CONFIG"

# The output directory, from the overrides (the merge job needs it).
OUTPUT=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
    --output | --output.dir) OUTPUT=${args[i + 1]:-} ;;
    --output=* | --output.dir=*) OUTPUT=${args[i]#*=} ;;
    esac
done
[[ -n $OUTPUT ]] || die "pass --output DIR (the shard tasks write there and the merge job reads it)"
OUTPUT=$(realpath -m "$OUTPUT")

NUM_TASKS=${NUM_TASKS:-4}
CPUS_PER_TASK=${CPUS_PER_TASK:-1}
LOG_DIR=$(realpath -m "${LOG_DIR:-logs}") # sbatch opens the job logs before a job runs: they must exist
[[ $NUM_TASKS =~ ^[1-9][0-9]*$ ]] || die "NUM_TASKS must be a positive integer, got '$NUM_TASKS'"
read -ra extra <<<"${SBATCH_ARGS:-}"
read -ra merge_args <<<"${MERGE_ARGS:-}"
[[ ${DRY_RUN:-0} == 1 ]] || command -v sbatch >/dev/null || die "sbatch not found: is this a SLURM login node?"
[[ ${DRY_RUN:-0} == 1 ]] || mkdir -p "$LOG_DIR" # sbatch does not create the log directory

array=(sbatch --parsable --array="0-$((NUM_TASKS - 1))" --cpus-per-task="$CPUS_PER_TASK"
    --output="$LOG_DIR/%x-%A_%a.out" "${extra[@]}" "$REPO/launch/slurm/shard.sbatch" "$CONFIG" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
    run "${array[@]}"
    array_id=ARRAY_JOB_ID
else
    array_id=$("${array[@]}")
    array_id=${array_id%%;*} # "id;cluster" on multi-cluster setups
fi
merge=(sbatch --parsable --dependency="afterok:$array_id" --kill-on-invalid-dep=yes
    --output="$LOG_DIR/%x-%j.out" "${extra[@]}" "$REPO/launch/slurm/merge.sbatch" "$OUTPUT" "${merge_args[@]}")
if [[ ${DRY_RUN:-0} == 1 ]]; then
    run "${merge[@]}"
    exit 0
fi
merge_id=$("${merge[@]}")
merge_id=${merge_id%%;*}
echo "submitted array job $array_id ($NUM_TASKS tasks) and merge job $merge_id (after $array_id succeeds)"
echo "logs: $LOG_DIR/shard-${array_id}_<task>.out, $LOG_DIR/merge-$merge_id.out; output: $OUTPUT"
