"""The project's speed goals checked against the newest records: met or not, by how much, and what the
measurements blame when one is missed.

The blame comes from three measurements the benchmarks take beside the figures:
- the loaders record the **JPEG decode ceiling**: what one core decodes per second from the same stored
  JPEGs with PIL (libjpeg-turbo, as every CPU path here uses). A CPU loader near cores x that is decode-bound.
- the training benchmark's **profile** splits a step into the wait for its batch (input) and the model's own
  time; a model time above synthetic input's means the loader competes with the model for the GPU or cores.
- the loaders' **epoch measurements**: an epoch boundary as long as a fresh start at batch 0 is a start that
  overlaps nothing; a start at 90 % of an epoch whose extra time per skipped batch nears a batch-time reads
  the skipped batches instead of seeking.
"""
from __future__ import annotations

from dataclasses import dataclass

# A 2-core CPU, every real loader, the same stored images
CPU_RATIO = 2.5  # dali and ffcv against torchvision
CPU_EPOCH_START = 2.0  # an epoch boundary costs at most 2 in-epoch batch intervals
CPU_RESUME = 2.0  # the first batch after set_epoch(e, 90 % of the epoch) takes at most 2x the one at batch 0

# Hopper: compute capability 9.0 (H100, H200), 16 cores
HOPPER_CAPABILITY = (9, 0)
HOPPER_NAMES = ("H100", "H200")  # records without a capability
HOPPER_PEAK_TFLOPS = 989  # dense bf16 with fp32 accumulate, SXM: the same for H100 and H200
HOPPER_CORES = 16
GPU_LOADER = {"dali": 10_000, "ffcv": 5_000}  # images/s alone at 224 px from full-size JPEGs
# ffcv alone from 512-px JPEGs: 5,500 images/s on 16 cores, 344 per core (FFCV's paper reports 326 per vCPU)
FFCV_512_PER_CORE = 5_500 / HOPPER_CORES
TRAIN_BATCH = 64  # the training goals' batch size
# ViT-B/16 bf16 compiled with synthetic input: 4,000 images/s x ~105 GFLOP per training image is 420 TFLOP/s,
# about 43 % MFU at the 989 TFLOP/s peak
SYNTHETIC = 4_000
VS_SYNTHETIC = {"dali": 0.99, "ffcv": 0.97}  # training images/s from the loader over synthetic


@dataclass
class Verdict:
    goal: str
    target: str
    measured: str
    met: bool
    short_by: str  # "" when met
    blame: str  # "" when met


def _short(value: float, target: float) -> str:
    return f"{1 - value / target:.0%} ({value:,.2f} of {target:,.2f})" if target < 10 else \
        f"{1 - value / target:.0%} ({target - value:,.0f} images/s)"


def _over(value: float, limit: float, what: str) -> str:
    """By how much a figure exceeds its upper bound."""
    return f"{value / limit - 1:.0%} over ({value:.2f} against at most {limit:.2f} {what})"


def hopper(r: dict) -> bool:
    """Whether a record was measured on a Hopper GPU: by its compute capability ("9.0" or [9, 0]), or by the
    GPU's name in records that have none."""
    capability = r.get("gpu_compute_capability")
    if capability is not None:
        parts = capability.split(".") if isinstance(capability, str) else capability
        return tuple(int(x) for x in parts) == HOPPER_CAPABILITY
    return any(name in (r.get("gpu") or "") for name in HOPPER_NAMES)


def ceiling_share(rate: float, workers: int, ceiling: dict | None) -> float | None:
    """A loader's images/s as a share of what `workers` cores decode, or None if the record has no ceiling."""
    return rate / (ceiling["images_per_s_per_core"]["median"] * workers) if ceiling else None


NO_CEILING = "no decode ceiling in this record (measured before the benchmark took one)"


def cpu_ratio_blame(kind: str, rate: float, base: float, workers: int, ceiling: dict | None) -> str:
    mine, theirs = ceiling_share(rate, workers, ceiling), ceiling_share(base, workers, ceiling)
    if mine is None:
        return NO_CEILING
    per_core = ceiling["images_per_s_per_core"]["median"]
    head = (f"JPEG decode: one core decodes {per_core:,.0f} of these images/s (PIL, full decode); torchvision runs "
            f"at {theirs:.0%} of {workers} cores' worth and {kind} at {mine:.0%}")
    if CPU_RATIO * theirs > 1:
        return f"{head}, so {CPU_RATIO}x torchvision would be {CPU_RATIO * theirs:.0%} of what the cores can decode"
    return f"{head}: {kind}'s own overhead, not the decode, keeps it from {CPU_RATIO}x"


def loader_verdicts(r: dict, on_gpu: bool, resolution: str) -> list[Verdict]:
    """CPU: dali and ffcv over torchvision at the most workers, and every real loader's epoch start and
    mid-epoch start there. Hopper GPUs: each loader's best from full-size JPEGs, and ffcv's from 512-px ones."""
    # the goals are for the plain train augmentation: not the option variants, two views or RandAugment
    rows = [row for row in r["results"] if not row.get("options") and row.get("views", 1) == 1
            and not row.get("rand_augment")]
    if not on_gpu:
        return cpu_ratio_verdicts(r, rows, resolution) + epoch_verdicts(rows, resolution)
    if not hopper(r):
        return []
    if resolution == "full size":
        return [gpu_loader_verdict(r, rows, kind, target, "full-size JPEGs") for kind, target in GPU_LOADER.items()
                if any(row["kind"] == kind for row in rows)]
    if resolution == "512 px" and any(row["kind"] == "ffcv" for row in rows):
        return [gpu_loader_verdict(r, rows, "ffcv", round(FFCV_512_PER_CORE * r["cores"]), "512-px JPEGs")]
    return []


def cpu_ratio_verdicts(r: dict, rows: list[dict], resolution: str) -> list[Verdict]:
    most = max((row["workers"] for row in rows), default=0)
    base = next((row for row in rows if row["kind"] == "torchvision" and row["workers"] == most), None)
    out = []
    for kind in ("dali", "ffcv"):
        row = next((row for row in rows if row["kind"] == kind and row["workers"] == most), None)
        if not (row and base):
            continue
        ratio = row["images_per_s"]["median"] / base["images_per_s"]["median"]
        met = ratio >= CPU_RATIO
        blame = cpu_ratio_blame(kind, row["images_per_s"]["median"], base["images_per_s"]["median"], most,
                                r.get("decode_ceiling"))
        out.append(Verdict(f"{kind} over torchvision, {most} workers, {resolution}", f"{CPU_RATIO}x",
                           f"{ratio:.2f}x", met, "" if met else _short(ratio, CPU_RATIO), "" if met else blame))
    return out


def epoch_verdicts(rows: list[dict], resolution: str) -> list[Verdict]:
    """Every real loader at the most workers: the epoch boundary in batch-times, and the first batch at 90 %
    of an epoch over the one at 0. Records measured before the benchmark took them get no verdict."""
    most = max((row["workers"] for row in rows), default=0)
    out = []
    for row in rows:
        if row["kind"] == "synthetic" or row["workers"] != most or "epoch_boundary_batches" not in row:
            continue
        where = f"{most} workers, {resolution}"
        times, boundary = row["epoch_boundary_batches"], row["epoch_boundary_ms"]["median"]
        met = times <= CPU_EPOCH_START
        out.append(Verdict(f"{row['kind']} epoch start, {where}", f"<= {CPU_EPOCH_START:g} batch-times",
                           f"{times:.1f} ({boundary:,.0f} ms)", met,
                           "" if met else _over(times, CPU_EPOCH_START, "batch-times"),
                           "" if met else epoch_start_blame(row)))
        ratio = row["first_batch_90_over_0"]
        first = row["first_batch_ms"]
        met = ratio <= CPU_RESUME
        out.append(Verdict(f"{row['kind']} first batch at 90 % of an epoch over at 0, {where}",
                           f"<= {CPU_RESUME:g}x", f"{ratio:.2f}x ({first['90']['median']:,.0f} against "
                           f"{first['0']['median']:,.0f} ms)", met, "" if met else _over(ratio, CPU_RESUME, "x"),
                           "" if met else resume_blame(row)))
    return out


def epoch_start_blame(row: dict) -> str:
    """A boundary about as long as a fresh start at batch 0 is a start that the loader does not overlap with
    the end of the previous epoch."""
    boundary, interval = row["epoch_boundary_ms"]["median"], row["steady_batch_ms"]
    start = row["first_batch_ms"]["0"]["median"]
    if boundary >= 0.8 * start:
        return (f"epoch set-up: the boundary ({boundary:,.0f} ms) costs what a start at batch 0 does ({start:,.0f} "
                f"ms, {start / interval:.1f} batch-times): the next epoch's pipeline is built and filled only after "
                f"the last batch, overlapping nothing")
    return (f"epoch set-up, partly overlapped: the boundary ({boundary:,.0f} ms) is below a start at batch 0 "
            f"({start:,.0f} ms), yet {boundary - interval:,.0f} ms above one batch-time ({interval:,.0f} ms)")


def resume_blame(row: dict) -> str:
    """The extra time of a start at 90 % over one at 0, per skipped batch: near a batch-time, the skipped
    batches are read; far below it, the seek's own walk (index, shuffle) costs it."""
    first, interval = row["first_batch_ms"], row["steady_batch_ms"]
    skipped = row["first_batch_at"]["90"] - row["first_batch_at"]["0"]
    extra = first["90"]["median"] - first["0"]["median"]
    per_batch = extra / max(skipped, 1)
    if per_batch >= 0.5 * interval:
        return (f"no seek: the {skipped} skipped batches cost {per_batch:,.1f} ms each, {per_batch / interval:.0%} "
                f"of an in-epoch batch ({interval:,.1f} ms): they are read, not skipped")
    return (f"the seek itself: {extra:,.0f} ms more than at batch 0 over {skipped} skipped batches "
            f"({per_batch:,.2f} ms each, {per_batch / interval:.0%} of an in-epoch batch), not their decoding")


def gpu_loader_verdict(r: dict, rows: list[dict], kind: str, target: int, stored: str) -> Verdict:
    row = max((row for row in rows if row["kind"] == kind), key=lambda row: row["images_per_s"]["median"])
    rate = row["images_per_s"]["median"]
    met = rate >= target
    share = ceiling_share(rate, row["workers"], r.get("decode_ceiling"))
    cpu = NO_CEILING if share is None else \
        f"CPU JPEG decode: it runs at {share:.0%} of what {row['workers']} cores decode with PIL"
    blame = "" if met else cpu if kind == "ffcv" else "GPU decode: see the hw_decoder_load rows"
    return Verdict(f"{kind} alone, {stored} ({row['workers']} workers, {r['cores']} cores)", f"{target:,}",
                   f"{rate:,.0f}", met, "" if met else _short(rate, target), blame)


def step_blame(row: dict, synthetic: dict | None) -> str:
    profile, base = row.get("profile"), (synthetic or {}).get("profile")
    if not isinstance(profile, dict) or not isinstance(base, dict):
        return f"input wait {row['input_wait']['median']:.0%} of the step time (no profile in this record)"
    extra = profile["step_ms"] - base["step_ms"]
    if profile["input_ms"] >= extra:
        return (f"input: each step waits {profile['input_ms']:.1f} ms for its batch "
                f"(model {profile['step_ms']:.1f} ms)")
    return (f"contention: the model step takes {extra:.1f} ms longer than with synthetic input "
            f"({profile['step_ms']:.1f} against {base['step_ms']:.1f} ms): the loader competes for the GPU or "
            f"the cores; the wait for the batch is {profile['input_ms']:.1f} ms")


def train_verdicts(r: dict) -> list[Verdict]:
    """The Hopper goals, at their batch size (TRAIN_BATCH); they do not apply to other machines."""
    if not hopper(r):
        return []
    rows = {row["kind"]: row for row in r["results"] if row["batch_size"] == TRAIN_BATCH}
    out = []
    synthetic = rows.get("synthetic")
    if synthetic:
        rate = synthetic["images_per_s"]["median"]
        met = rate >= SYNTHETIC
        mfu = f"model: MFU {synthetic['mfu']:.0%}" if synthetic.get("mfu") else "model"
        out.append(Verdict(f"training from synthetic input, batch {TRAIN_BATCH}",
                           f"{SYNTHETIC:,} (43% MFU at {HOPPER_PEAK_TFLOPS} TFLOP/s)", f"{rate:,.0f}", met,
                           "" if met else _short(rate, SYNTHETIC), "" if met else mfu))
    for kind, target in VS_SYNTHETIC.items():
        row = rows.get(kind)
        if row is None or "vs_synthetic" not in row:
            continue
        met = row["vs_synthetic"] >= target
        out.append(Verdict(f"training from {kind} over synthetic, batch {TRAIN_BATCH}", f"{target}",
                           f"{row['vs_synthetic']:.3f}", met, "" if met else _short(row["vs_synthetic"], target),
                           "" if met else step_blame(row, synthetic)))
    return out


def markdown(verdicts: list[Verdict]) -> list[str]:
    if not verdicts:
        return []
    lines = ["### Goals", "", "| goal | target | measured | met | short by | what the measurements blame |",
             "|---|---:|---:|---|---|---|"]
    for v in verdicts:
        lines.append(f"| {v.goal} | {v.target} | {v.measured} | {'yes' if v.met else '**no**'} | {v.short_by} | "
                     f"{v.blame} |")
    return lines + [""]
