#!/usr/bin/env bash
# One-shot check on a GPU machine without network: installs the wheels of `make gpu-wheels` (.whl/) with
# `pip install --no-index --target`, runs the gpu test tier, then benchmarks/gpu_check.py, which prints JSON
# lines (model tokens/s and MFU, ours vs transformers, eager vs compiled; 50 DeepSpeed trainer steps per ZeRO
# stage and precision with the loss-scale trace; the loader's samples/s). Meant to finish within 8 minutes.
#
# usage: benchmarks/gpu_check.sh [--cpu-smoke]
#   --cpu-smoke   the same code at toy sizes on a CPU (CI; uses .venv/bin/python when there is one)
# environment: PYTHON (default python3, or .venv/bin/python with --cpu-smoke), GPU_TIER_TIMEOUT (s, 180),
#   CHECK_BUDGET (s for gpu_check.py's sections, 300), GPU_CHECK_DEPS (install target, .gpu-deps)
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0
case "${1:-}" in
  "") ;;
  --cpu-smoke) smoke=1 ;;
  -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "gpu_check.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
esac

if [[ $smoke == 1 && -x .venv/bin/python ]]; then
  PYTHON=${PYTHON:-.venv/bin/python}
fi
PYTHON=${PYTHON:-python3}
export PIPELINE_PROGRESS=0 PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
  deps=${GPU_CHECK_DEPS:-.gpu-deps}
  rm -rf "$deps"
  started=$SECONDS
  install=("$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target "$deps")
  version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [[ $smoke == 1 && $version != 3.12 ]]; then
    # The wheels are for the GPU machine's Python 3.12: install them for it (proves the set installs),
    # but run on this interpreter's own packages.
    "${install[@]}" --python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux2014_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 .whl/*.whl
    used=false
  else
    "${install[@]}" .whl/*.whl
    export PYTHONPATH="$PWD/$deps:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    used=true
  fi
  echo "{\"check\": \"install\", \"wheels\": $(find .whl -name '*.whl' | wc -l), \"used\": $used, \"seconds\": $((SECONDS - started))}"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
elif [[ $smoke == 0 ]]; then
  echo "gpu_check.sh: no wheels in .whl/ (run make gpu-wheels where there is network, and carry .whl/)" >&2
  exit 2
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

if [[ $smoke == 1 ]]; then
  export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu
else
  export DS_ACCELERATOR=cuda
fi

# The gpu tier (skipped without CUDA): its summary line as JSON.
started=$SECONDS
set +e
tier=$(timeout "${GPU_TIER_TIMEOUT:-180}" "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1)
rc=$?
set -e
summary=$(printf '%s\n' "$tier" | tail -n 1)
"$PYTHON" -c 'import json, sys; print(json.dumps({"check": "gpu_tier", "rc": int(sys.argv[1]),
    "summary": sys.argv[2], "seconds": int(sys.argv[3])}))' "$rc" "$summary" "$((SECONDS - started))"
if [[ $rc != 0 && $rc != 5 ]]; then  # 5: nothing collected/run
  printf '%s\n' "$tier" | tail -n 60 >&2
fi

args=(--budget-s "${CHECK_BUDGET:-300}")
[[ $smoke == 1 ]] && args+=(--cpu-smoke)
"$PYTHON" benchmarks/gpu_check.py "${args[@]}"
exit $(( rc != 0 && rc != 5 ))
