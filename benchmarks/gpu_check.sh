#!/usr/bin/env bash
# The GPU check, in one command: validates the loaders' GPU paths (DALI's mixed decode, FFCV's ToDevice),
# measures each loader alone on full-size ImageNet-like JPEGs (--max-resolution 0), then trains ViT-B/16
# (bf16, compiled) from synthetic input and from each loader on the default conversion (--max-resolution 512).
#
#   bash benchmarks/gpu_check.sh [--dry-run] [RESULTS_DIR]      (default RESULTS_DIR: $OUT, else /tmp/gpu_check)
#
# It builds its own data on the machine (the sample generator at ImageNet size, then the converter), runs
# tests/test_loaders_gpu.py, then benchmarks/loaders.py and benchmarks/train_step.py, and prints the tables
# last. Each step has its own time limit, and a failed step is reported without stopping the rest. About
# 8 minutes on one H100 with 16 cores (the loaders took 4.3 of them on 2026-11-27).
# --dry-run is the same script on the CPU with tiny sizes: the GPU tests skip themselves and the benchmark
# runs on the CPU, so `make test` checks the script's plumbing.
# With DALI and FFCV carried to the machine as ../shared/device/README.md describes, source /tmp/gd/env.sh first.
set -uo pipefail
dry=0
if [[ ${1:-} == --dry-run ]]; then dry=1; shift; fi
results=${1:-${OUT:-/tmp/gpu_check}}
py=${PYTHON:-python3}
cores=$(nproc)
work=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
mkdir -p "$results" "$work"
results=$(cd "$results" && pwd) work=$(cd "$work" && pwd)  # absolute: the script changes directory next
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

if (( dry )); then
  classes=4 per_class=20 device=cpu workers="1" size=64 batches=3 repeats=2 warmup=2 hw_load=""
  train_args=(--preset tiny_cpu --batch-size 8 --steps 2 --repeats 2 --warmup 1 --workers 1)
else
  # 4,000 full-size images (3,600 train after the holdout): ~270 MB, a minute of decoding at the goal's rate.
  classes=100 per_class=40 device=cuda workers="8 $cores" size=224 batches=100 repeats=5 warmup=30 hw_load="0.0 0.9"
  # the plan's batch of 64, and 256 to fill the GPU; the first 20 steps hold the compile
  train_args=(--preset vit_b16_seed --batch-size 64 256 --steps 30 --repeats 3 --warmup 20)
fi
failed=()
# One log for all steps: at most 8 files come back from the GPU machine.
step() {  # step NAME SECONDS COMMAND...: runs it under a time limit, appends its output to $results/steps.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)" | tee -a "$results/steps.log"
  local start=$SECONDS
  if ! timeout "$limit" "$@" > >(tee -a "$results/steps.log") 2>&1; then failed+=("$name"); fi
  echo "== $name: $((SECONDS - start)) s" | tee -a "$results/steps.log"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
  echo "cores: $cores"; git rev-parse --short HEAD 2>/dev/null
  "$py" -c 'import torch, importlib.metadata as m
print("torch", torch.__version__, "cuda", torch.version.cuda)
for p in ("nvidia-dali-cuda130", "ffcv", "torchvision", "numba", "numpy"):
    try: print(p, m.version(p))
    except m.PackageNotFoundError: print(p, "not installed")'
} 2>&1 | tee "$results/environment.txt"

# FFCV's C part is carried to the GPU machine built for another Python; if it does not load, measure the rest.
formats=ffcv,dali kinds="dali ffcv torchvision synthetic"
if ! "$py" -c 'import ffcv.libffcv' 2>/dev/null; then
  echo "FFCV does not import here: converting and measuring without it"; formats=dali kinds="dali torchvision synthetic"
fi
step gpu-tests 240 "$py" -m pytest -q -p no:cacheprovider tests/test_loaders_gpu.py
if [[ ! -f $work/full/manifest.json ]]; then
  rm -rf "$work/src" "$work/full"
  step sample 120 "$py" tools/make_sample_imagenet.py "$work/src" --classes $classes --per-class $per_class \
    --val-per-class 0 --workers "$cores"
  step convert 180 "$py" tools/convert_imagenet.py "$work/src" "$work/full" --max-resolution 0 --workers "$cores" \
    --formats $formats
  step convert-512 120 "$py" tools/convert_imagenet.py "$work/src" "$work/r512" --workers "$cores" --formats $formats
fi
hw_args=()
[[ -n $hw_load ]] && hw_args=(--dali-hw-load $hw_load)
# shellcheck disable=SC2086  # word splitting of $kinds and $workers is intended
step loaders 300 "$py" -m benchmarks.loaders --data "$work/full" --kinds $kinds --device $device --workers $workers \
  --image-size $size --batches $batches --repeats $repeats --warmup $warmup --results "$results" "${hw_args[@]}"
# shellcheck disable=SC2086
step train 300 "$py" -m benchmarks.train_step --data "$work/r512" --kinds $kinds --device $device \
  --results "$results" "${train_args[@]}"

echo
cat "$results"/loaders-*.md "$results"/train_step-*.md 2>/dev/null
if (( ${#failed[@]} )); then echo "FAILED steps: ${failed[*]} (logs in $results)"; exit 1; fi
echo "all steps passed; results in $results"
