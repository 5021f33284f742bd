"""Benchmark records -> benchmarks/report.md, with tables and PNG charts, each labelled with its hardware.

    python -m benchmarks.report [--results benchmarks/results] [--out benchmarks/report.md]
    python -m benchmarks.report --compare A B     # A, B: record files or folders; prints B / A per figure
    python -m benchmarks.report --readme README.md  # also fills README.md's headline table

For every (benchmark, machine) the newest record is reported. Per loader: images/s inside an epoch, the
epoch boundary (ms and batch-times), the first batch after a start at 0, 50 and 90 % of an epoch, and the
images/s projected over an ImageNet epoch; records measured before those figures show '-'. RandAugment cost
per loader: each loader's images/s with RandAugment on against off, measured side by side in one run
(benchmarks/loaders.py --rand-augment). The stored JPEGs against a real photo: bytes per pixel and Pillow's
decode ms per megapixel of each loader record's data beside the reference photo's (benchmarks/jpeg_stats.py), so
that loader figures from generated data can be read against photos'; records measured before have no row there.
Progressive resolution: training images/s at each size of a preset's ramp and the projected wall-clock of an
ImageNet run against the presets measured beside it (benchmarks/resolution.py). MAE and colorization: the images/s
their trainer consumes from synthetic input beside each loader's rate alone (the newest loader record of the same
machine, stored resolution and device), and whether that loader can feed it.
Charts (matplotlib): loader images/s per loader and stored resolution, images/s against workers (where each loader
saturates), and training real/synthetic.

`--readme` fills the README's short summary between its two markers: five headline figures (the fastest loader on a
GPU, DALI over the torchvision baseline, training with DALI over synthetic input, the progressive-resolution
projection and the converter), each with its hardware and record, and a link to the full report.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from benchmarks import goals, record
from pipelines.convert.job import ConvertSettings


def load(paths: list[Path]) -> list[dict]:
    """Every benchmark record (a JSON object with a "benchmark" key) in these files or folders."""
    records = []
    for path in paths:
        files = sorted(Path(path).glob("*.json")) if Path(path).is_dir() else [Path(path)]
        for file in files:
            data = json.loads(file.read_text())
            if isinstance(data, dict) and "benchmark" in data:
                records.append({**data, "_file": file.name})
    return records


def machine(r: dict) -> str:
    gpu = (r.get("gpu") or "").split(",")[0]
    return f"{gpu}, {r['cores']} cores" if gpu else f"{r['cpu']}, {r['cores']} cores, no GPU"


DEFAULT_STORED = f"{ConvertSettings.max_resolution} px"  # the converter's default cap, as resolution() names it


def resolution(r: dict) -> str:
    settings = r.get("settings", {})
    value = settings.get("max_resolution")
    if value is None:  # records written before the field: the dataset's manifest, or the GPU check's folder name
        data = str(settings.get("data", ""))
        manifest = Path(data) / "manifest.json"
        if data and manifest.is_file():
            value = json.loads(manifest.read_text())["settings"]["max_resolution"]
        else:
            value = 0 if data.endswith("/full") else 512 if data.endswith("r512") else None
    return "?" if value is None else "full size" if value == 0 else f"{value} px"


def objective(r: dict) -> str:
    """What a training record's step minimized ("" for the supervised default and for other benchmarks)."""
    value = r.get("settings", {}).get("objective", "supervised") if r["benchmark"] == "train_step" else ""
    return "" if value == "supervised" else value


def is_sweep(r: dict) -> bool:
    """A training record that compares torch.compile modes or AdamW implementations (gpu_check's compile part)."""
    return len({(row.get("compile_mode", "default"), bool(row.get("fused"))) for row in r.get("results", [])}) > 1


def train_variant(r: dict) -> str:
    """What sets a training record apart, so that each kind keeps its newest: the objective, the batch sizes
    and whether it is a compile sweep (e.g. "batch 64", "simclr, batch 32", "batch 64, compile sweep")."""
    batches = sorted({row["batch_size"] for row in r.get("results", [])} or set(r["settings"].get("batch_size") or []))
    parts = [objective(r)] if objective(r) else []
    parts += [f"batch {', '.join(map(str, batches))}"] if batches else []
    return ", ".join(parts + (["compile sweep"] if is_sweep(r) else []))


def fmt(value, spec: str = ",.0f") -> str:
    """A figure, or '-' where the record has none (records written before the benchmark took it)."""
    return "-" if value is None else format(value, spec)


def fmt_ms(value: float | None) -> str:
    """Milliseconds with the digits that matter: 1,234 / 12 / 3.4 / 0.012."""
    return fmt(value, ",.0f" if value is None or value >= 10 else ".1f" if value >= 1 else ".3f")


def median(row: dict, key: str, at: str | None = None) -> float | None:
    """row[key]["median"] (or row[key][at]["median"]), None where the record lacks it."""
    value = row.get(key)
    value = value.get(at) if at is not None and isinstance(value, dict) else value
    return value.get("median") if isinstance(value, dict) else None


EPOCH_HEADERS = ("epoch boundary ms (batch-times)", "first batch at 0/50/90 % ms", "ImageNet epoch images/s")


def epoch_columns(row: dict) -> list[str]:
    """A loader row's epoch figures, under EPOCH_HEADERS."""
    boundary = median(row, "epoch_boundary_ms")
    firsts = row.get("first_batch_ms")
    return [f"{fmt_ms(boundary)} ({fmt(row.get('epoch_boundary_batches'), '.1f')})" if boundary is not None else "-",
            "/".join(fmt_ms(median(row, "first_batch_ms", at)) for at in firsts) if firsts else "-",
            fmt(row.get("imagenet_epoch_images_per_s"))]


def figures(r: dict) -> dict[str, float]:
    """A record's headline figures by a name that identifies them across runs."""
    out = {}
    if r["benchmark"] == "loaders":
        for row in r["results"]:
            name = f"{row['label']}, {row['workers'] or '-'} workers, {resolution(r)}"
            out[f"loader {name}"] = row["images_per_s"]["median"]
            if "imagenet_epoch_images_per_s" in row:
                out[f"loader over an ImageNet epoch {name}"] = row["imagenet_epoch_images_per_s"]
    elif r["benchmark"] == "train_step":
        for row in r["results"]:
            what = f"train {objective(r) + ' ' if objective(r) else ''}{row['kind']}"
            out[f"{what}, batch {row['batch_size']}"] = row["images_per_s"]["median"]
    elif r["benchmark"] == "resolution":
        for row in r["results"]:
            name = f"train {row['preset']} at {row['size']} px, batch {row['batch_size']}, {row.get('precision', '?')}"
            out[name] = row["images_per_s"]["median"]
        for run in r.get("projection", []):
            out[f"projected ImageNet training of {run['preset']}, h"] = run["train_h"]
    elif r["benchmark"] == "checkpoint":
        out[f"checkpoint: training time lost per {r['preset']} checkpoint, s"] = r["blocked_s"]
    elif r["benchmark"] == "convert":
        for workers, row in r["results"].items():
            out[f"convert end to end per core, {workers} workers"] = row["total_images_per_s_per_core"]["median"]
    return out


def newest(records: list[dict]) -> dict[tuple[str, str, str], dict]:
    """The newest record per (benchmark, machine, stored resolution and device). Loader records are merged
    row by row: a later run that measured only some loaders replaces those rows and keeps the others."""
    latest: dict[tuple[str, str, str], dict] = {}
    for r in sorted(records, key=lambda r: r["date"]):
        if r["benchmark"] != "loaders":
            variant = train_variant(r) if r["benchmark"] == "train_step" else \
                r["settings"].get("device", "?") if r["benchmark"] == "resolution" else ""
            latest[(r["benchmark"], machine(r), variant)] = r
            continue
        key = ("loaders", machine(r), f"{resolution(r)} on {r['settings'].get('device', '?')}")
        merged = latest.get(key)
        rows = {(row["label"], row["workers"]): row for row in (merged["results"] if merged else [])}
        rows.update({(row["label"], row["workers"]): {**row, "_file": r["_file"], "_commit": r["commit"]}
                     for row in r["results"]})
        latest[key] = {**r, "results": list(rows.values())}
    return latest


def compare(a: list[dict], b: list[dict]) -> list[tuple[str, str, float, float, float]]:
    """(machine, figure, A, B, B/A) for every figure both sets have, machine by machine."""
    fa, fb = {}, {}
    for target, records in ((fa, a), (fb, b)):
        for r in newest(records).values():
            for name, value in figures(r).items():
                target[(machine(r), name)] = value
    return [(m, name, fa[m, name], fb[m, name], fb[m, name] / fa[m, name] if fa[m, name] else float("nan"))
            for (m, name) in sorted(fa.keys() & fb.keys())]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def _plt():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def chart_loaders(records: list[dict], path: Path, title: str) -> None:
    """Best images/s per loader (over workers), one bar per stored resolution."""
    plt = _plt()
    best: dict[str, dict[str, float]] = {}
    for r in records:
        for row in r["results"]:
            if row["kind"] == "synthetic" or row["options"] or row.get("views", 1) != 1 or row.get("rand_augment"):
                continue
            per_kind = best.setdefault(resolution(r), {})
            per_kind[row["kind"]] = max(per_kind.get(row["kind"], 0), row["images_per_s"]["median"])
    kinds = sorted({k for values in best.values() for k in values})
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(len(best), 1)
    for i, (res, values) in enumerate(sorted(best.items())):
        ax.bar([x + i * width for x in range(len(kinds))], [values.get(k, 0) for k in kinds], width, label=res)
    ax.set_xticks([x + width * (len(best) - 1) / 2 for x in range(len(kinds))], kinds)
    ax.set_ylabel("images/s (median)")
    ax.set_title(title, fontsize=9)
    ax.legend(title="stored")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def chart_scaling(r: dict, path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for kind in sorted({row["kind"] for row in r["results"] if row["kind"] != "synthetic"}):
        rows = sorted((row["workers"], row["images_per_s"]["median"]) for row in r["results"]
                      if row["kind"] == kind and not row["options"] and row.get("views", 1) == 1
                      and not row.get("rand_augment"))
        ax.plot([w for w, _ in rows], [v for _, v in rows], marker="o", label=kind)
    ax.set_xlabel("CPU workers (threads or processes)")
    ax.set_ylabel("images/s (median)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def chart_real_vs_synthetic(r: dict, path: Path, title: str) -> None:
    plt = _plt()
    rows = [row for row in r["results"] if "vs_synthetic" in row]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{row['kind']}\nbatch {row['batch_size']}" for row in rows]
    ax.bar(labels, [row["vs_synthetic"] for row in rows])
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("training images/s, real / synthetic")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(records: list[dict], out: Path) -> str:
    """report.md, with its PNGs in charts/ beside it; returns the markdown."""
    charts = out.parent / "charts"
    charts.mkdir(parents=True, exist_ok=True)
    latest = newest(records)
    lines = ["# Benchmark report", "", "Generated by `python -m benchmarks.report` from the records in "
             "`benchmarks/results/`: the newest per benchmark, machine and stored resolution. Medians of repeats; "
             "the records hold the spread, versions and settings.", ""]
    machines = sorted({m for (_, m, _) in latest})
    for m in machines:
        lines += [f"## {m}", ""]
        loader_records = [r for (b, mm, _), r in sorted(latest.items()) if b == "loaders" and mm == m]
        gpu_loaders = [r for r in loader_records if r["settings"].get("device") != "cpu"] if "no GPU" not in m else []
        verdicts = [v for r in loader_records
                    for v in goals.loader_verdicts(r, r["settings"].get("device") != "cpu", resolution(r))]
        for (b, mm, _), train in sorted(latest.items()):  # the goals are for supervised training, compiled
            if b == "train_step" and mm == m and not objective(train) and not is_sweep(train):
                verdicts += goals.train_verdicts(train)
        lines += goals.markdown(verdicts)
        if loader_records:
            lines += ["### Loaders alone", "",
                      "images/s: inside an epoch (windows that never cross an epoch boundary). Epoch boundary: from "
                      "the last batch of one epoch to the first of the next, in ms and in in-epoch batch intervals. "
                      "First batch: after set_epoch(epoch, k) at k = 0, 50 and 90 % of the epoch. ImageNet epoch: "
                      "the images/s those project to over 1,153,051 images at the record's batch size.", "",
                      f"| loader | workers | stored | on | images/s | vs torchvision | {' | '.join(EPOCH_HEADERS)} "
                      "| record |",
                      "|---|---:|---|---|---:|---:|---:|---:|---:|---|"]
            for r in loader_records:
                for row in r["results"]:
                    ratio = f"{row['vs_torchvision']:.2f}x" if row.get("vs_torchvision") else "-"
                    lines.append(f"| {row['label']} | {row['workers'] or '-'} | {resolution(r)} | "
                                 f"{r['settings'].get('device', '?')} | {row['images_per_s']['median']:,.0f} | "
                                 f"{ratio} | {' | '.join(epoch_columns(row))} | {row['_file']} "
                                 f"(commit {row['_commit']}) |")
            png = f"charts/loaders-{slug(m)}.png"
            chart_loaders(gpu_loaders or loader_records, out.parent / png, f"loaders alone - {m}")
            lines += ["", f"![loader images/s on {m}]({png})", ""]
            widest = max(loader_records, key=lambda r: len({row["workers"] for row in r["results"]}))
            if len({row["workers"] for row in widest["results"] if row["workers"]}) > 1:
                png = f"charts/scaling-{slug(m)}.png"
                chart_scaling(widest, out.parent / png, f"images/s against workers ({resolution(widest)}) - {m}")
                lines += [f"![worker scaling on {m}]({png})", ""]
            lines += rand_augment_section(loader_records)
            lines += jpeg_section(loader_records)
        for (b, mm, what), train in sorted(latest.items()):
            if b != "train_step" or mm != m:
                continue
            views = {"simclr": ", two views per image: images/s counts views",
                     "mae": mask_note(train)}.get(objective(train), "")
            lines += [f"### Training ({what}{views}): real input against synthetic", "",
                      "| loader | batch | compile | fused AdamW | images/s | vs synthetic | input wait | MFU | "
                      "peak GiB |", "|---|---:|---|---|---:|---:|---:|---:|---:|"]
            for row in train["results"]:
                vs = f"{row['vs_synthetic']:.3f}" if "vs_synthetic" in row else "-"
                mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else "-"
                compiled = row.get("compile_mode", "-" if train["settings"].get("no_compile") else "default")
                lines.append(f"| {row['kind']} | {row['batch_size']} | {compiled} | "
                             f"{'yes' if row.get('fused') else 'no'} | {row['images_per_s']['median']:,.1f} | {vs} | "
                             f"{row['input_wait']['median']:.1%} | {mfu} | {fmt(row.get('peak_memory_gib'), '.1f')} |")
            png = f"charts/real-vs-synthetic-{slug(m + ' ' + what)}.png"
            chart_real_vs_synthetic(train, out.parent / png, f"training {what} real / synthetic - {m}")
            lines += ["", f"record {train['_file']} (commit {train['commit']})", "",
                      f"![real over synthetic on {m}]({png})", ""]
            if objective(train) in FED:
                lines += feed_section(train, latest)
        for (b, mm, _), ramp in sorted(latest.items()):
            if b == "resolution" and mm == m:
                lines += resolution_section(ramp)
        convert = latest.get(("convert", m, ""))
        if convert:
            lines += ["### Converter", "", "| workers | end to end images/s per core |", "|---:|---:|"]
            for workers, row in convert["results"].items():
                lines.append(f"| {workers} | {row['total_images_per_s_per_core']['median']:,.0f} |")
            lines += ["", f"record {convert['_file']} (commit {convert['commit']})", ""]
        saved = latest.get(("checkpoint", m, ""))
        if saved:
            lines += ["### Mid-epoch checkpoints", "",
                      "The training state saved by training/checkpoint.py's Writer: the training thread waits for the "
                      "host copy; a side thread writes while training goes on, its steps slowed by the factor shown "
                      f"({saved['step_preset']} steps on {saved['device']}). Cost: the time training loses per "
                      "checkpoint, and its share of training time at the default interval.", "",
                      "| state | file | training waits | side-thread write | steps meanwhile | lost per checkpoint "
                      "| share at one every N min |", "|---|---:|---:|---:|---:|---:|---:|",
                      f"| {saved['preset']} | {saved['file_bytes'] / 1e9:.2f} GB | {saved['snapshot_s']['median']:.2f} s "
                      f"| {saved['write_s']['median']:.2f} s | x{saved['step_slowdown']:.2f} | {saved['blocked_s']:.2f} s "
                      f"| {saved['cost_share']:.2%} (N = {saved['interval_min']:g}) |",
                      "", f"record {saved['_file']} (commit {saved['commit']})", ""]
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text


FED = {"mae": "MAE", "colorize": "colorization"}  # objectives whose consumption is set beside the loaders alone


def mask_note(train: dict) -> str:
    """A MAE record's heading note: the share of patches its encoder sees."""
    ratio = train["settings"].get("config", {}).get("mae", {}).get("mask_ratio")
    return "" if ratio is None else f", mask ratio {ratio:g}: the encoder sees {1 - ratio:.0%} of the patches"


def feeding_loaders(train: dict, latest: dict) -> dict | None:
    """The newest loader record (merged row by row, as newest() keeps it) of a training record's machine, stored
    resolution and device: the loaders the training's own data was measured with."""
    device = str(train["settings"].get("device", "?")).split(":")[0]
    return latest.get(("loaders", machine(train), f"{resolution(train)} on {device}"))


def crop_note(train: dict, loaders: dict) -> str:
    """Which way a verdict leans when the loaders alone were timed at another crop size than the training's."""
    crop, size = loaders["settings"].get("image_size"), train["settings"].get("config", {}).get("data", {}).get(
        "image_size")
    if not crop or not size or crop == size:
        return ""
    smaller = size < crop
    return (f" The loaders alone were timed at {crop}-px crops and the training reads {size}-px ones: a "
            f"{'smaller' if smaller else 'larger'} crop costs a loader {'less' if smaller else 'more'} after the "
            f"decode, so '{'can feed' if smaller else 'cannot'}' holds at the training's size as well.")


FEED_HEADERS = ("loader", "workers", "loader alone images/s", "{name} from synthetic input images/s",
                "can it feed {name}?", "loader record")


def feed_section(train: dict, latest: dict) -> list[str]:
    """Can each loader alone feed this objective's training (markdown lines)? Its consumption rate, the images/s
    its step takes in from synthetic input (no loader competing for the device or the cores), beside each
    loader's plain rows alone; a loader can feed it when its rate alone is at least that."""
    name = FED[objective(train)]
    loaders = feeding_loaders(train, latest)
    synthetic = [row for row in train["results"] if row["kind"] == "synthetic"]
    title = f"### Can each loader alone feed {name}? ({train_variant(train)})"
    if not synthetic:
        return [title, "", f"No synthetic-input row in {train['_file']}: nothing to set the loaders beside.", ""]
    if not loaders:
        return [title, "", f"No loader record for {machine(train)}, {resolution(train)}, "
                           f"{train['settings'].get('device', '?')}: run benchmarks.loaders on the same data.", ""]
    rows = sorted((row for row in plain_rows(loaders) if row["kind"] != "synthetic"),
                  key=lambda row: (row["kind"], row["workers"] or 0))
    lines = [title, "",
             f"The images/s {name}'s trainer consumes from synthetic input (its step alone) against each loader's "
             f"images/s alone ({resolution(train)} JPEGs, {train['settings'].get('device', '?')}). A loader below it "
             f"would leave the step waiting, whatever else the machine does; one above it can feed it if the cores it "
             f"needs are free (the training rows above measure both together).{crop_note(train, loaders)}", "",
             "| " + " | ".join(h.format(name=name) for h in FEED_HEADERS) + " |", "|---|---:|---:|---:|---|---|"]
    for s_row in synthetic:
        need = s_row["images_per_s"]["median"]
        for row in rows:
            have = row["images_per_s"]["median"]
            verdict = f"can feed {name} ({have / need:.2f}x)" if have >= need else \
                f"cannot feed {name}: {have:,.0f} of {need:,.0f} images/s"
            lines.append(f"| {row['label']} | {row['workers'] or '-'} | {have:,.0f} | {need:,.0f} | {verdict} | "
                         f"{row.get('_file', loaders['_file'])} |")
    batches = ", ".join(f"batch {row['batch_size']}, compile {row.get('compile_mode', '-')}" for row in synthetic)
    return lines + ["", f"{name}: record {train['_file']} ({batches}); loaders alone at batch "
                        f"{loaders['settings'].get('batch_size', '?')}.", ""]


RAND_AUGMENT_HEADERS = ("loader", "workers", "RandAugment", "off images/s", "on images/s", "on spread (min-max)",
                        "on / off")


def rand_augment_table(rows: list[dict], extra: tuple[str, ...] = (), cells=lambda row: ()) -> list[str]:
    """On against off (markdown lines), one line per RandAugment row; `extra` columns from `cells(row)`."""
    lines = ["| " + " | ".join((*RAND_AUGMENT_HEADERS, *extra)) + " |",
             "|---|---:|---|---:|---:|---:|---:|" + "---|" * len(extra)]
    for r in rows:
        s, off = r["images_per_s"], r["rand_augment_off"]
        lines.append(f"| {off['label']} | {r['workers'] or '-'} | {r['rand_augment']} | {off['images_per_s']:,.0f} | "
                     f"{s['median']:,.0f} | {s['min']:,.0f}-{s['max']:,.0f} | {r['vs_rand_augment_off']:.2f}x |"
                     + "".join(f" {c} |" for c in cells(r)))
    return lines


SIZE_HEADERS = ("preset", "size px", "tokens", "batch", "precision", "images/s", "spread (min-max)", "vs final size",
                "step ms", "GFLOP per image", "achieved TFLOP/s", "MFU")


def resolution_table(rows: list[dict]) -> list[str]:
    """The per-size table (markdown lines), for this record's .md and the report."""
    lines = ["| " + " | ".join(SIZE_HEADERS) + " |", "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["images_per_s"]
        vs = f"{r['vs_final_size']:.2f}x" if r.get("vs_final_size") else "-"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        lines.append(f"| {r['preset']} | {r['size']} | {r['tokens'] or '-'} | {r['batch_size']} | "
                     f"{r.get('precision', '-')} | {s['median']:,.2f} | {s['min']:,.2f}-{s['max']:,.2f} | {vs} | "
                     f"{r['step_ms']['median']:,.0f} | {r['train_gflops_per_image']:.1f} | "
                     f"{r['achieved_tflops']:.3f} | {mfu} |")
    return lines


def projection_table(runs: list[dict]) -> list[str]:
    """The projected-run table (markdown lines): epochs at each size, hours, and the ratio to each other preset."""
    lines = ["| preset | epochs at size (px x epochs) | projected ImageNet training | "
             + " | ".join(f"vs {q['preset']}" for q in runs) + " |", "|---|---|---:|" + "---:|" * len(runs)]
    for r in runs:
        at = ", ".join(f"{s} x {c}" for s, c in r["epochs_at"].items())
        vs = " | ".join(f"{r['vs'][q['preset']]:.3f}" if q is not r else "-" for q in runs)
        lines.append(f"| {r['preset']} | {at} | {r['train_h']:,.1f} h | {vs} |")
    return lines


def rand_augment_section(loader_records: list[dict]) -> list[str]:
    """RandAugment on against off per loader (markdown lines; none without such rows). Each on row carries the off
    figure of its own run, so the ratio is side by side even where a later run replaced the off row."""
    rows = [(r, row) for r in loader_records for row in r["results"] if row.get("rand_augment")]
    if not rows:
        return []
    stored = {id(row): (resolution(r), r["settings"].get("device", "?")) for r, row in rows}
    return ["### RandAugment cost per loader", "",
            "In-epoch images/s of each loader with RandAugment on against off (train mode, the record's batch and "
            "crop size), both loaders built in one run and their windows alternated (benchmarks/loaders.py "
            "--rand-augment). RandAugment runs per sample on the device after the crop and flip: in DALI's graph "
            "for dali, in torch (pipelines/rand_augment.py) for ffcv and torchvision.", "",
            *rand_augment_table([row for _, row in rows], ("stored", "device", "record"),
                                lambda row: (*stored[id(row)], f"{row['_file']} (commit {row['_commit']})")), ""]


JPEG_HEADERS = ("stored", "JPEGs sampled", "bytes/pixel", "decode ms/MP", "reference bytes/pixel",
                "reference ms/MP", "decode vs reference", "record")


def jpeg_section(loader_records: list[dict]) -> list[str]:
    """The stored JPEGs' bytes per pixel and decode cost against the reference photo, one row per loader record
    that measured them (markdown lines; none without such records)."""
    measured = [r for r in loader_records if r.get("data_jpegs")]
    if not measured:
        return []
    first = measured[0]["data_jpegs"]
    lines = ["### Stored JPEGs against a real photo", "",
             f"How hard each loader record's JPEGs are to decode (benchmarks/jpeg_stats.py): bytes per pixel, and "
             f"Pillow's decode ms per megapixel on one core, beside the reference photo "
             f"({first['reference']['photo']} at quality {first['reference']['quality']}) timed in the same "
             f"repeats. ImageNet's train set: about {first['imagenet_bytes_per_pixel']} bytes/pixel.", "",
             "| " + " | ".join(JPEG_HEADERS) + " |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in measured:
        j, ref = r["data_jpegs"], r["data_jpegs"]["reference"]
        lines.append(f"| {resolution(r)} | {j['images']} | {j['bytes_per_pixel']:.3f} | "
                     f"{j['decode_ms_per_mp']['median']:.2f} | {ref['bytes_per_pixel']:.3f} | "
                     f"{ref['decode_ms_per_mp']['median']:.2f} | {j['decode_vs_reference']:.2f}x | {r['_file']} "
                     f"(commit {r['commit']}) |")
    return lines + [""]


def resolution_section(r: dict) -> list[str]:
    """Training images/s per size of a resolution ramp and the projected run (markdown lines)."""
    settings = r["settings"]
    lines = ["### Progressive resolution", "",
             f"Training images/s of the trainer's step (synthetic input made once on the device) at each size of "
             f"the ramp, on {settings.get('device', '?')}, median of {settings.get('repeats')} windows of "
             f"{settings.get('steps')} step(s), the sizes interleaved in each round (benchmarks/resolution.py). "
             f"The projection: each epoch of the preset at its size, {r['imagenet_train_images']:,} images "
             f"({r['imagenet_train_images_source']}) / images/s at that size, steps only.", "",
             *resolution_table(r["results"]), "", *projection_table(r.get("projection", [])), ""]
    if r.get("note"):
        lines += [f"Note: {r['note']}.", ""]
    return lines + [f"record {r['_file']} (commit {r['commit']})", ""]


README_START = "<!-- benchmarks.report: start (generated by python -m benchmarks.report --readme README.md) -->"
README_END = "<!-- benchmarks.report: end -->"


def plain_rows(r: dict) -> list[dict]:
    """A loader record's rows for the default train augmentation: no option variants, one view, no RandAugment."""
    return [row for row in r["results"] if not row.get("options") and row.get("views", 1) == 1
            and not row.get("rand_augment")]


def headlines(records: list[dict]) -> list[tuple[str, str, str, str]]:
    """(figure, value, hardware, record) for the README, from the newest records; a figure no record holds is
    left out rather than shown as a guess."""
    latest = newest(records)
    found = []

    def newest_of(benchmark: str, keep) -> tuple[tuple, dict] | None:
        kept = [(key, r) for key, r in latest.items() if key[0] == benchmark and keep(key, r)]
        return max(kept, key=lambda item: item[1]["date"]) if kept else None

    gpu = [(key, r, row) for key, r in latest.items() if key[0] == "loaders" and r["settings"].get("device") == "cuda"
           for row in plain_rows(r) if row["kind"] != "synthetic"]
    if gpu:
        key, r, row = max(gpu, key=lambda item: item[2]["images_per_s"]["median"])
        found.append((f"fastest loader alone ({row['kind']}, {row['workers']} workers, {resolution(r)} JPEGs, "
                      f"batch {r['settings']['batch_size']})", f"{row['images_per_s']['median']:,.0f} images/s",
                      key[1], row["_file"]))
    def dali_over_torchvision(key, r) -> bool:
        return any(row["kind"] == "dali" and row.get("vs_torchvision") for row in plain_rows(r))

    # at the size the converter stores by default, where a record has it: the figure a user's data gives
    dali = newest_of("loaders", lambda key, r: dali_over_torchvision(key, r) and resolution(r) == DEFAULT_STORED) \
        or newest_of("loaders", dali_over_torchvision)
    if dali:
        key, r = dali
        row = max((row for row in plain_rows(r) if row["kind"] == "dali" and row.get("vs_torchvision")),
                  key=lambda row: row["workers"] or 0)
        found.append((f"DALI loader over the torchvision baseline ({row['workers']} workers, {resolution(r)} JPEGs)",
                      f"{row['vs_torchvision']:.2f}x", key[1], row["_file"]))
    train = newest_of("train_step", lambda key, r: not objective(r) and not is_sweep(r)
                      and any(row["kind"] == "dali" and "vs_synthetic" in row for row in r["results"]))
    if train:
        key, r = train
        row = next(row for row in r["results"] if row["kind"] == "dali" and "vs_synthetic" in row)
        found.append((f"training with DALI over synthetic input ({r['settings']['preset']}, batch {row['batch_size']})",
                      f"{row['vs_synthetic']:.3f}", key[1], r["_file"]))
    ramp = newest_of("resolution", lambda key, r: any(run["vs"] for run in r.get("projection", [])))
    if ramp:
        key, r = ramp
        run = min((run for run in r["projection"] if run["vs"]), key=lambda run: min(run["vs"].values()))
        other, ratio = min(run["vs"].items(), key=lambda item: item[1])
        found.append((f"projected ImageNet wall-clock of {run['preset']} against {other} (steps only)",
                      f"{ratio:.3f}x", key[1], r["_file"]))
    convert = newest_of("convert", lambda key, r: bool(r["results"]))
    if convert:
        key, r = convert
        workers = max(r["results"], key=int)
        found.append((f"converter, end to end ({workers} workers)",
                      f"{r['results'][workers]['total_images_per_s_per_core']['median']:,.0f} images/s per core",
                      key[1], r["_file"]))
    return found


def summary(records: list[dict], report: str) -> str:
    """The README's block: the headline table and the link to the full report."""
    lines = ["| figure | measured | hardware | record |", "|---|---:|---|---|"]
    lines += [f"| {figure} | {value} | {hardware} | {file} |" for figure, value, hardware, file in headlines(records)]
    return "\n".join(lines + ["", f"Every table, chart and machine: [{report}]({report}). Medians of repeats; each "
                                  "record in benchmarks/results/ holds the spread, versions, settings and commit."])


def embed(records: list[dict], readme: Path, report: Path) -> None:
    """Replaces what stands between the README's two markers with the summary."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme}: no '{README_START}' ... '{README_END}' block to fill")
    body = summary(records, os.path.relpath(report, readme.parent))
    head, rest = text.split(README_START, 1)
    readme.write_text(head + README_START + "\n" + body + "\n" + README_END + rest.split(README_END, 1)[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=record.RESULTS)
    p.add_argument("--out", type=Path, default=record.RESULTS.parent / "report.md")
    p.add_argument("--compare", type=Path, nargs=2, metavar=("A", "B"))
    p.add_argument("--readme", type=Path, help="also fill this README's headline table")
    args = p.parse_args(argv)
    if args.compare:
        rows = compare(load([args.compare[0]]), load([args.compare[1]]))
        if not rows:
            print("no figure appears in both sets (same machine, same benchmark)")
            return 1
        print("| machine | figure | A | B | B / A |\n|---|---|---:|---:|---:|")
        for m, name, a, b, ratio in rows:
            print(f"| {m} | {name} | {a:,.1f} | {b:,.1f} | {ratio:.2f} |")
        return 0
    records = load([args.results])
    if not records:
        print(f"no benchmark records in {args.results}")
        return 1
    render(records, args.out)
    print(f"wrote {args.out} and its charts")
    if args.readme:
        embed(records, args.readme, args.out)
        print(f"updated the headline table of {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
