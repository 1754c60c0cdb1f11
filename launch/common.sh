# Shared by the launch scripts (sourced, not run): logging, the Python that runs the pipeline, dry runs.
# shellcheck shell=bash
#
# Needs REPO (the repository root) set by the caller. Environment it reads:
#   PYTHON    the interpreter (default: $REPO/.venv/bin/python, made by `make venv`)
#   DRY_RUN   1: print the commands instead of running them (the scripts' --dry-run sets it)

LAUNCH_NAME=${LAUNCH_NAME:-${SLURM_JOB_NAME:-$(basename "${BASH_SOURCE[1]:-launch}")}}

log() { echo "[$LAUNCH_NAME $(date +%H:%M:%S)] $*" >&2; }

die() {
    echo "$LAUNCH_NAME: error: $*" >&2
    exit 2
}

# Print a script's leading comment block (its usage) without the #SBATCH lines.
usage() {
    sed -n '2,/^[^#]/p' "$1" | grep -v '^#SBATCH' | grep '^#' | sed 's/^# \{0,1\}//'
}

# True when any argument asks for help: the scripts then print their usage and do nothing else.
wants_help() {
    local arg
    for arg in "$@"; do
        [[ $arg == -h || $arg == --help ]] && return 0
    done
    return 1
}

# The interpreter and import path: jobs must run this checkout's code with the project's environment.
setup_python() {
    export PYTHON=${PYTHON:-$REPO/.venv/bin/python}
    if [[ ${DRY_RUN:-0} != 1 ]]; then
        [[ -x $PYTHON ]] || command -v "$PYTHON" >/dev/null ||
            die "no Python at $PYTHON: run \`make venv\` in $REPO or set PYTHON=/path/to/python"
    fi
    [[ ${PYTHONPATH:-} == "$REPO" || ${PYTHONPATH:-} == "$REPO":* ]] || export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1 # log lines reach the job's output file as they are written
}

# Shell-quoted command line, as it would be typed.
quote() {
    local out="" arg
    for arg in "$@"; do
        if [[ $arg =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+="$arg "; else out+="$(printf '%q' "$arg") "; fi
    done
    echo "${out% }"
}

# Run a command, or with DRY_RUN=1 print it (to stdout, so that tests and users can capture it).
run() {
    if [[ ${DRY_RUN:-0} == 1 ]]; then
        quote "$@"
    else
        log "+ $(quote "$@")"
        "$@"
    fi
}

require_file() {
    [[ -f $1 ]] || die "$2: no such file: $1"
}

# Ranks to start on this node: NPROC_PER_NODE, else the GPUs of the allocation (SLURM_GPUS_ON_NODE or
# CUDA_VISIBLE_DEVICES), else the tasks per node asked of SLURM (CPU partitions: --ntasks-per-node), else 1.
ranks_per_node() {
    if [[ -n ${NPROC_PER_NODE:-} ]]; then
        echo "$NPROC_PER_NODE"
    elif [[ ${SLURM_GPUS_ON_NODE:-0} -gt 0 ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n ${CUDA_VISIBLE_DEVICES:-} && $CUDA_VISIBLE_DEVICES != -1 ]]; then
        local devices
        IFS=, read -ra devices <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#devices[@]}"
    elif [[ -n ${SLURM_NTASKS_PER_NODE:-} ]]; then
        echo "${SLURM_NTASKS_PER_NODE%%(*}" # "2(x3)" on heterogeneous allocations: the first count
    else
        echo 1
    fi
}
