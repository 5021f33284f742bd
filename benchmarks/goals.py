"""The project's speed goals checked against the newest records: met or not, by how much, and what the
measurements blame when one is missed.

The blame comes from two measurements the benchmarks take beside the figures:
- the loaders record the **JPEG decode ceiling**: what one core decodes per second from the same stored
  JPEGs with PIL (libjpeg-turbo, as every CPU path here uses). A CPU loader near cores x that is decode-bound.
- the training benchmark's **profile** splits a step into the wait for its batch (input) and the model's own
  time; a model time above synthetic input's means the loader competes with the model for the GPU or cores.
"""
from __future__ import annotations

from dataclasses import dataclass

CPU_RATIO = 2.5  # dali and ffcv against torchvision, same stored images, this 2-core CPU (issue 5)
GPU_LOADER = {"dali": 10_000, "ffcv": 5_000}  # images/s alone at 224 px from full-size JPEGs, one H100
SYNTHETIC = 3_500  # ViT-B/16 bf16 compiled training images/s with synthetic input, one H100
VS_SYNTHETIC = {"dali": 0.97, "ffcv": 0.95}  # training images/s from the loader over synthetic


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
    """CPU: dali and ffcv over torchvision at the most workers. GPU: each loader's best from full-size JPEGs."""
    rows = [row for row in r["results"] if not row.get("options") and row.get("views", 1) == 1]
    out = []
    if not on_gpu:
        most = max((row["workers"] for row in rows), default=0)
        base = next((row for row in rows if row["kind"] == "torchvision" and row["workers"] == most), None)
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
    if resolution != "full size":
        return out
    for kind, target in GPU_LOADER.items():
        candidates = [row for row in rows if row["kind"] == kind]
        if not candidates:
            continue
        row = max(candidates, key=lambda row: row["images_per_s"]["median"])
        rate = row["images_per_s"]["median"]
        met = rate >= target
        share = ceiling_share(rate, row["workers"], r.get("decode_ceiling"))
        cpu = NO_CEILING if share is None else \
            f"CPU JPEG decode: it runs at {share:.0%} of what {row['workers']} cores decode with PIL"
        blame = "" if met else cpu if kind == "ffcv" else "GPU decode: see the hw_decoder_load rows"
        out.append(Verdict(f"{kind} alone, full-size JPEGs ({row['workers']} workers)", f"{target:,}",
                           f"{rate:,.0f}", met, "" if met else _short(rate, target), blame))
    return out


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
    """The H100 goals, per batch size; they do not apply to other machines."""
    if "H100" not in (r.get("gpu") or ""):
        return []
    out = []
    for batch in sorted({row["batch_size"] for row in r["results"]}):
        rows = {row["kind"]: row for row in r["results"] if row["batch_size"] == batch}
        synthetic = rows.get("synthetic")
        if synthetic:
            rate = synthetic["images_per_s"]["median"]
            met = rate >= SYNTHETIC
            mfu = f"model: MFU {synthetic['mfu']:.0%}" if synthetic.get("mfu") else "model"
            out.append(Verdict(f"training from synthetic input, batch {batch}", f"{SYNTHETIC:,}", f"{rate:,.0f}",
                               met, "" if met else _short(rate, SYNTHETIC), "" if met else mfu))
        for kind, target in VS_SYNTHETIC.items():
            row = rows.get(kind)
            if row is None or "vs_synthetic" not in row:
                continue
            met = row["vs_synthetic"] >= target
            out.append(Verdict(f"training from {kind} over synthetic, batch {batch}", f"{target}",
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
