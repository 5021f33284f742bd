#!/usr/bin/env bash
# The GPU check, in one command of at most 9 minutes on one H100 or H200 with 16 cores, data generation,
# compiles and warm-ups included:
#   bash benchmarks/gpu_check.sh [--dry-run] [RESULTS_DIR]      (default RESULTS_DIR: $OUT, else /tmp/gpu_check)
# On your GPU server: `pip install -e '.[dali,ffcv]'` (with FFCV's apt packages, as the Makefile installs them),
# then run it from the repository. A loader whose library does not import is skipped, with the reason, and the
# others are still measured.
#
# Each part runs under its own time limit, in this order; the limits of the required parts add up to the
# 9-minute budget (540 s), and a part never runs past what is left of it (one that would start after it is
# reported as not run, and the check fails). The limits are estimates, scaled from the per-part times of an H100
# run of the check's first parts: steps.log records each part's time to re-budget from.
#   data      100 s  the gpu suite's 14,500 full-size ImageNet-like JPEGs (3,000 generated, the rest linked to
#                    them), converted full size and at 512 px
#   train     130 s  `benchmarks.run --suite gpu --only train`: ViT-B/16 bf16 compiled (default mode), batch 64,
#                    synthetic input against each loader, with a profile splitting each step into input wait and
#                    model time; then SimCLR (two views per image). Two compiles (a supervised and a SimCLR
#                    graph) of roughly 40-90 s each on an H100.
#   compile    80 s  benchmarks.train_step directly, synthetic input, batch 64: torch.compile's default mode
#                    against reduce-overhead (CUDA graphs), each with AdamW's default (foreach) and fused
#                    implementation. The default-mode graph is the train part's, found in inductor's cache; the
#                    CUDA-graph compile is the new one. Not max-autotune: its kernel search takes minutes.
#   batch256   50 s  benchmarks.train_step directly, batch 256, synthetic input against each loader (default
#                    mode: one compile of the batch-256 graph)
#   loaders   100 s  each loader alone at both stored sizes, and with two views: inside-epoch windows, two
#                    epoch boundaries and two starts at each of 0, 50 and 90 % of an epoch per row; at 512 px also
#                    RandAugment (rand-m9-mstd0.5-inc1) on against off, windows alternated, in-epoch only (+20 s:
#                    one more build, warm-up and three 1-s windows per loader)
#   resolution 40 s  benchmarks.resolution (`benchmarks.run --suite gpu --only resolution`): ViT-B/16 bf16 at
#                    batch 64 at each size of vit_b16_fast's ramp (128, 160, 192, 224 px) beside vit_b16_seed,
#                    and the projected ImageNet wall-clock of each; eager (5 compiles would take minutes), from
#                    synthetic input: 165 steps, the model builds and the imports
#   tests      40 s  tests/test_loaders_gpu.py (the loaders' GPU paths) and the GPU tests of tests/test_no_sync.py
#                    (no host-device sync per batch under torch.cuda.set_sync_debug_mode("error"))
# and then, only with time left (not run for lack of it is no failure; these were measured before and change
# least): scaling (each loader over 1, 2, 4, ... all cores, up to 90 s) and convert (the converter's images/s
# per core, up to 30 s) and checkpoint (what a mid-epoch checkpoint of ViT-B/16 costs training, up to 30 s,
# benchmarks/checkpoint.py). The order puts first what has never been measured on a GPU. train_step rewrites its
# record after every row, so a part that reaches its limit still returns the rows it measured.
# The records are packed into RESULTS_DIR/records.tar beside steps.log (every part's output, with each part's
# time: the figures to re-budget from) and environment.txt: three files, however many records.
# The tables are printed last. Unpack the records into benchmarks/results/, then run benchmarks.report.
# --dry-run is this same script with tiny sizes on the CPU (the suite's --dry-run; the tiny ViT, eager, for the
# compile part; the GPU tests skip themselves), so `make test` checks its plumbing. Its parts are bounded by a
# 900 s budget alone, not by the GPU's per-part limits.
set -uo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0; fi
dry=()
if [[ ${1:-} == --dry-run ]]; then dry=(--dry-run); shift; fi
results=${1:-${OUT:-/tmp/gpu_check}}
py=${PYTHON:-python3}
work=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
# the GPU's 9 minutes; a dry run on a busy 2-core CPU takes longer
budget=${GPU_CHECK_BUDGET_S:-$(( ${#dry[@]} ? 900 : 540 ))}
rm -rf "$work/records"  # records of this run only
mkdir -p "$results" "$work/records"
results=$(cd "$results" && pwd) work=$(cd "$work" && pwd)  # absolute: the script changes directory next
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1

failed=()
run_part() {  # run_part NAME SECONDS COMMAND...: runs it under min(SECONDS, what is left of the budget), logs it
  local name=$1 limit=$2; shift 2
  local left=$((budget - SECONDS))
  (( limit > left || ${#dry[@]} )) && limit=$left  # the limits are the GPU's; a CPU's dry run only has the budget
  echo "== $name (limit ${limit}s)" | tee -a "$results/steps.log"
  local start=$SECONDS
  if ! timeout "$limit" "$@" > >(tee -a "$results/steps.log") 2>&1; then failed+=("$name"); fi
  echo "== $name: $((SECONDS - start)) s" | tee -a "$results/steps.log"
}
step() {  # step NAME SECONDS COMMAND...: a required part; out of time, it is named as not run and fails the check
  if (( budget - SECONDS < 20 )); then
    echo "== $1: not run, out of time" | tee -a "$results/steps.log"; failed+=("$1"); return
  fi
  run_part "$@"
}
extra() {  # extra NAME SECONDS COMMAND...: runs only if all of SECONDS is left; skipped for time, it fails nothing
  if (( ${#dry[@]} )); then step "$@"; return; fi  # --dry-run checks every part's plumbing
  if (( budget - SECONDS < $2 )); then
    echo "== $1: not run, $2 s needed and $((budget - SECONDS)) s left (optional)" | tee -a "$results/steps.log"
    return
  fi
  run_part "$@"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
  echo "cores: $(nproc)"; git rev-parse --short HEAD 2>/dev/null
  "$py" -c 'from benchmarks.record import environment; import json; e = environment(); e.pop("diff")
print(json.dumps(e, indent=1))'
} 2>&1 | tee "$results/environment.txt"

suite=("$py" -m benchmarks.run --suite gpu "${dry[@]}" --results "$work/records" --work "$work")
# benchmarks.train_step on the data the suite's train part reads (benchmarks/run.py: <work>/<suite>/r512)
if (( ${#dry[@]} )); then
  data=$work/gpu-dry/r512
  train=("$py" -m benchmarks.train_step --data "$data" --results "$work/records" --preset tiny_cpu --device cpu
         --workers 1 --steps 2 --repeats 2 --warmup 1)
  modes=(none)  # plumbing only: the tiny ViT's compile takes ~50 s on a CPU
  small=8 large=(--batch-size 4 --kinds synthetic)  # the suite's train part runs every loader
else
  data=$work/gpu/r512
  # windows of 30 steps inside one epoch; the 10 warm-up steps hold the compile (the first row of a model) or
  # a loader's start
  train=("$py" -m benchmarks.train_step --data "$data" --results "$work/records" --preset vit_b16_seed
         --steps 30 --repeats 3 --warmup 10)
  modes=(default reduce-overhead)
  small=64 large=(--batch-size 256)  # every loader kind
fi

step data 100 "${suite[@]}" --only data
step train 130 "${suite[@]}" --only train
step compile 80 "${train[@]}" --kinds synthetic --batch-size "$small" --compile-mode "${modes[@]}" --fused false true
step batch256 50 "${train[@]}" "${large[@]}"
step loaders 100 "${suite[@]}" --only loaders
step resolution 40 "${suite[@]}" --only resolution
step tests 40 "$py" -m pytest -q -p no:cacheprovider tests/test_loaders_gpu.py tests/test_no_sync.py -k "gpu"
extra scaling 90 "${suite[@]}" --only scaling
extra convert 30 "${suite[@]}" --only convert
extra checkpoint 30 "$py" -m benchmarks.checkpoint --dir "$work/checkpoints" --results "$work/records" \
  $( (( ${#dry[@]} )) && echo --preset tiny_cpu --repeats 1)

tar -cf "$results/records.tar" -C "$work/records" .
echo
cat "$work"/records/*.md 2>/dev/null
echo "records: $results/records.tar ($(tar -tf "$results/records.tar" | grep -c json) JSON); took $SECONDS s"
if (( ${#failed[@]} )); then echo "FAILED or not run: ${failed[*]} (logs in $results/steps.log)"; exit 1; fi
echo "all steps passed"
