#!/usr/bin/env bash
# The GPU check, in one command of at most 9 minutes on one H100 or H200 with 16 cores, data generation,
# compiles and warm-ups included:
#   bash benchmarks/gpu_check.sh [--dry-run] [RESULTS_DIR]      (default RESULTS_DIR: $OUT, else /tmp/gpu_check)
# On your GPU server: `pip install -e '.[dali,ffcv]'` (with FFCV's apt packages, as the Makefile installs them),
# then run it from the repository. A loader whose library does not import is skipped, with the reason, and the
# others are still measured.
#
# Each part runs under its own time limit, in this order, and never past what is left of the 9-minute budget
# (540 s). The required parts come first; their limits add up to 400 s, and one that cannot start for lack of
# time is reported as not run, and the check fails:
#   data      80 s  the gpu suite's 14,500 ImageNet-size JPEGs (3,000 generated, the rest linked to them),
#                   converted full size and at 512 px
#   smoke    140 s  benchmarks.smoke: the trainer end to end as a user runs it (training/run.py), deit_b16's recipe
#                   (RandAugment in the loader, mixup/cutmix, erasing, drop path, an EMA) at batch 128 with a
#                   160 -> 224 px ramp, 2 epochs of the 512-px data (~200 steps) and one evaluation, stopped at
#                   step 150 and --resumed to its end, through dali and then ffcv; it fails on any exception,
#                   NaN, recompile storm or a resumed run that ends elsewhere, and records images/s and input
#                   wait per size. Two cold ViT-B/16 compiles (the two sizes), the rest from inductor's cache.
#   gpu-tests 70 s  tests/test_lagged_stream.py (each loader's batches checksummed with the consumer's stream
#                   lagged against unlagged: no buffer reused while a queued read waits) and the train step and
#                   evaluation under torch.cuda.set_sync_debug_mode("error") for every objective and precision
#   train    110 s  `benchmarks.run --suite gpu --only train`: ViT-B/16 bf16 compiled (default mode), batch 64,
#                   synthetic input against each loader, with a profile splitting each step into input wait and
#                   model time (one cold compile)
# Then, only with time left (one skipped for time fails nothing), in this order:
#   dali-feed 60 s  benchmarks.dali_feed: the time the training thread spends inside the dali loader's next() per
#                   batch, the index reader's host work on that thread against on its read-ahead threads, from the
#                   page cache and cold, and what the read-ahead costs in memory and start-up
#   loaders  100 s  each loader alone at both stored sizes, and with two views: inside-epoch windows, epoch
#                   boundaries and mid-epoch starts; at 512 px also RandAugment on against off
#   compile   80 s  torch.compile's default mode against reduce-overhead (CUDA graphs), each with AdamW's default
#                   (foreach) and fused implementation, synthetic input, batch 64
#   resolution 40 s ViT-B/16 at each size of vit_b16_fast's ramp beside vit_b16_seed, eager, and the projected
#                   ImageNet wall-clock of each
#   evaluation 90 s benchmarks.evaluation: evaluation eager against compiled (model.compile_eval), the compile's
#                   seconds and the projected seconds per ImageNet epoch, with the EMA's second pass
#   simclr    70 s  `--only simclr`: the train part for SimCLR (two views per image; one more cold compile)
#   mae       80 s  `--only mae`: the train part for MAE, mae_vit_b16 at batch 64 (its encoder on a quarter of the
#                   patches, an 8-block decoder on all of them: one more cold compile, of the check's largest graph)
#   colorize  70 s  `--only colorize`: the train part for colorization, colorize_vit_b16 at batch 64 (the gray
#                   input and a*b* targets made on the GPU each step, outside the graph; one more cold compile)
#   batch256  50 s  the train part at batch 256, each loader (one more compile)
#   tests     60 s  the rest of the GPU tests: tests/test_loaders_gpu.py and the loaders under the sync check
#   scaling   90 s  each loader over 1, 2, 4, ... all cores
#   convert   30 s  the converter's images/s per core
#   checkpoint 30 s what a mid-epoch checkpoint of ViT-B/16 costs training (benchmarks/checkpoint.py)
# The limits are estimates from the per-part times of the first H100 runs (the loaders part's warm-ups, the GPU
# tests' 56 s for 13 tests); steps.log records each part's time, the figures to re-budget from.
#
# Every part's records are packed into RESULTS_DIR/records.tar as soon as the part ends (the file is replaced
# whole, never half-written), beside steps.log (every part's output, with each part's time) and environment.txt:
# three files however many records, and a check stopped at any moment returns what the finished parts measured.
# The benchmarks also rewrite their own record after every row, so a part cut short by its limit keeps its rows.
# The tables are printed last. Unpack the records into benchmarks/results/, then run benchmarks.report.
# --dry-run is this same script with tiny sizes on the CPU (the suite's --dry-run; the tiny ViT, eager; the GPU
# tests skip themselves), so `make test` checks its plumbing: it runs every part, bounded by a 900 s budget alone.
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
: > "$results/steps.log"

failed=()
pack() {  # the records so far into records.tar, replaced whole (a stop mid-write leaves the previous one)
  tar -cf "$results/records.tar.tmp" -C "$work/records" . && mv "$results/records.tar.tmp" "$results/records.tar"
}
run_part() {  # run_part NAME SECONDS COMMAND...: runs it under min(SECONDS, what is left of the budget), logs it
  local name=$1 limit=$2; shift 2
  local left=$((budget - SECONDS))
  (( limit > left || ${#dry[@]} )) && limit=$left  # the limits are the GPU's; a CPU's dry run only has the budget
  echo "== $name (limit ${limit}s)" | tee -a "$results/steps.log"
  local start=$SECONDS
  if ! timeout "$limit" "$@" > >(tee -a "$results/steps.log") 2>&1; then failed+=("$name"); fi
  echo "== $name: $((SECONDS - start)) s" | tee -a "$results/steps.log"
  pack
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
pack

suite=("$py" -m benchmarks.run --suite gpu "${dry[@]}" --results "$work/records" --work "$work")
# benchmarks.train_step on the data the suite's train part reads (benchmarks/run.py: <work>/<suite>/r512)
if (( ${#dry[@]} )); then
  data=$work/gpu-dry/r512
  train=("$py" -m benchmarks.train_step --data "$data" --results "$work/records" --preset tiny_cpu --device cpu
         --workers 1 --steps 2 --repeats 2 --warmup 1)
  modes=(none)  # plumbing only: the tiny ViT's compile takes ~50 s on a CPU
  small=8 large=(--batch-size 4 --kinds synthetic)  # the suite's train part runs every loader
  smoke=(--preset tiny_cpu_deit --batch-size 8 --ramp-start 24 --stop-at 7 --log-every 2 --device cpu)
  evaluation=(--preset tiny_cpu --backend eager --batches 2 --repeats 1)
  feed=(--feed-ahead 0 2 --batch-size 4 --image-size 32 --batches 3 --repeats 1 --starts 1 --step-ms 20 --device cpu)
else
  data=$work/gpu/r512
  # windows of 30 steps inside one epoch; the 10 warm-up steps hold the compile (the first row of a model) or
  # a loader's start
  train=("$py" -m benchmarks.train_step --data "$data" --results "$work/records" --preset vit_b16_seed
         --steps 30 --repeats 3 --warmup 10)
  modes=(default reduce-overhead)
  small=64 large=(--batch-size 256)  # every loader kind
  smoke=()  # its defaults: deit_b16 at batch 128, 160 -> 224 px, stopped at step 150 and resumed
  evaluation=()  # its defaults: vit_b16_seed, 40 batches of 64 and a smaller one, 3 passes
  feed=(--device cuda --batch-size 64)
fi

step data 80 "${suite[@]}" --only data
step smoke 140 "$py" -m benchmarks.smoke --data "$data" --work "$work/smoke" --results "$work/records" "${smoke[@]}"
step gpu-tests 70 "$py" -m pytest -q -p no:cacheprovider tests/test_lagged_stream.py \
  "tests/test_no_sync.py::test_gpu_train_step_and_evaluation_do_not_sync"
step train 110 "${suite[@]}" --only train
extra dali-feed 60 "$py" -m benchmarks.dali_feed --data "$data" --results "$work/records" "${feed[@]}"
extra loaders 100 "${suite[@]}" --only loaders
extra compile 80 "${train[@]}" --kinds synthetic --batch-size "$small" --compile-mode "${modes[@]}" --fused false true
extra resolution 40 "${suite[@]}" --only resolution
extra evaluation 90 "$py" -m benchmarks.evaluation --results "$work/records" "${evaluation[@]}"
extra simclr 70 "${suite[@]}" --only simclr
extra mae 80 "${suite[@]}" --only mae
extra colorize 70 "${suite[@]}" --only colorize
extra batch256 50 "${train[@]}" "${large[@]}"
extra tests 60 "$py" -m pytest -q -p no:cacheprovider tests/test_loaders_gpu.py tests/test_no_sync.py \
  -k "gpu and not gpu_train_step"
extra scaling 90 "${suite[@]}" --only scaling
extra convert 30 "${suite[@]}" --only convert
extra checkpoint 30 "$py" -m benchmarks.checkpoint --dir "$work/checkpoints" --results "$work/records" \
  $( (( ${#dry[@]} )) && echo --preset tiny_cpu --repeats 1)

pack
echo
cat "$work"/records/*.md 2>/dev/null
echo "records: $results/records.tar ($(tar -tf "$results/records.tar" | grep -c json) JSON); took $SECONDS s"
if (( ${#failed[@]} )); then echo "FAILED or not run: ${failed[*]} (logs in $results/steps.log)"; exit 1; fi
echo "all steps passed"
