#!/usr/bin/env bash
# The GPU check, in one command of at most 8 minutes on one H100, compile and warm-up included:
#   bash benchmarks/gpu_check.sh [--dry-run] [RESULTS_DIR]      (default RESULTS_DIR: $OUT, else /tmp/gpu_check)
#
# It runs `python -m benchmarks.run --suite gpu` part by part, each under its own time limit and all within
# the 8-minute budget (a part that would start after it is reported as not run):
#   data     3,000 generated ImageNet-size JPEGs, converted full size and at the default 512 px (~1.5 min)
#   train    ViT-B/16 bf16 compiled, batch 64 and 256, synthetic input against each loader, with a profile
#            splitting each step into input wait and model time (~2.5 min, the compile included)
#   loaders  each loader alone at both stored sizes (~1 min)
#   scaling  each loader alone over 1, 2, 4, ... all cores, full size (~1.5 min)
#   tests    tests/test_loaders_gpu.py: the loaders' GPU paths (~1 min)
#   convert  the converter's images/s per core (~0.5 min)
# The order puts first what has never been measured. The records are packed into RESULTS_DIR/records.tar
# beside steps.log (every part's output) and environment.txt: the GPU machine returns at most 8 files.
# The tables are printed last. Unpack the records into benchmarks/results/, then run benchmarks.report.
# --dry-run is this same script with the suite's --dry-run (tiny sizes, on the CPU; the GPU tests skip
# themselves), so `make test` checks its plumbing.
# With DALI and FFCV carried to the machine as ../shared/device/README.md describes, source /tmp/gd/env.sh first.
# kornia (FFCV's two-view colour augmentation) is not on the GPU machine either: carry the wheels in .whl
# (kornia and kornia_rs for cp312, ../shared/device/README.md's wheel recipe) and the script installs them.
set -uo pipefail
dry=()
if [[ ${1:-} == --dry-run ]]; then dry=(--dry-run); shift; fi
results=${1:-${OUT:-/tmp/gpu_check}}
py=${PYTHON:-python3}
work=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
budget=${GPU_CHECK_BUDGET_S:-480}
rm -rf "$work/records"  # records of this run only
mkdir -p "$results" "$work/records"
results=$(cd "$results" && pwd) work=$(cd "$work" && pwd)  # absolute: the script changes directory next
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
if ! "$py" -c 'import kornia' 2>/dev/null && compgen -G '.whl/*.whl' >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

failed=()
step() {  # step NAME SECONDS COMMAND...: runs it under min(SECONDS, what is left of the budget), logs it
  local name=$1 limit=$2; shift 2
  local left=$((budget - SECONDS))
  if (( left < 20 )); then echo "== $name: not run, out of time" | tee -a "$results/steps.log"; failed+=("$name"); return; fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit}s)" | tee -a "$results/steps.log"
  local start=$SECONDS
  if ! timeout "$limit" "$@" > >(tee -a "$results/steps.log") 2>&1; then failed+=("$name"); fi
  echo "== $name: $((SECONDS - start)) s" | tee -a "$results/steps.log"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
  echo "cores: $(nproc)"; git rev-parse --short HEAD 2>/dev/null
  "$py" -c 'from benchmarks.record import environment; import json; print(json.dumps(environment(), indent=1))'
} 2>&1 | tee "$results/environment.txt"

suite=("$py" -m benchmarks.run --suite gpu "${dry[@]}" --results "$work/records" --work "$work")
step data 150 "${suite[@]}" --only data
step train 200 "${suite[@]}" --only train
step loaders 90 "${suite[@]}" --only loaders
step scaling 120 "${suite[@]}" --only scaling
step tests 90 "$py" -m pytest -q -p no:cacheprovider tests/test_loaders_gpu.py
step convert 60 "${suite[@]}" --only convert

tar -cf "$results/records.tar" -C "$work/records" .
echo
cat "$work"/records/*.md 2>/dev/null
echo "records: $results/records.tar ($(tar -tf "$results/records.tar" | grep -c json) JSON); took $SECONDS s"
if (( ${#failed[@]} )); then echo "FAILED or not run: ${failed[*]} (logs in $results/steps.log)"; exit 1; fi
echo "all steps passed"
