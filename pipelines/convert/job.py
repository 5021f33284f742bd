"""The conversion: scan SRC, plan the splits, decode every image once, write shards, betons and manifest.

Crash safety comes from the unit of work, the shard. Shard k of a split always holds the planned samples
[k × shard_size, (k+1) × shard_size) minus the rejected ones, so it is the same whichever run writes it.
A shard is written under a temporary name and renamed when complete, and its record (counts, checksums,
rejects) is written last, in `.work/records/`. A rerun keeps every recorded shard, discards temporary files,
and redoes the rest. The manifest is written after everything else; `.work/` is removed after it.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import multiprocessing
import os
import platform
import shutil
import signal
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

from .. import processes
from ..formats.beton import write_beton
from ..formats.files import atomic_write_bytes, remove_tmp_files, sha256_file
from .images import BadImage, prepare_image
from ..formats.layout import (FORMAT_VERSION, FORMATS, MANIFEST, REJECTED, WORK, beton_path, dali_split_dir,
                     index_name, records_dir, sample_key, shard_name, staging_split_dir)
from ..formats.manifest import dumps
from .sources import ScannedSource, detect_and_scan, read_bytes
from .split import PlannedSample, plan_splits
from ..formats.webdataset import ShardWriter


class ConvertError(Exception):
    """The conversion cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class ConvertSettings:
    """Everything that decides the output. A rerun with other settings never mixes into an existing OUT."""
    formats: tuple[str, ...] = FORMATS
    max_resolution: int = 512  # longer side cap; ~4x fewer pixels to decode than full-size ImageNet
    jpeg_quality: int = 90
    holdout_fraction: float = 0.10
    seed: int = 0
    shard_size: int = 1000  # samples per shard: ~50 MB at 512 px, the size webdataset recommends

    def check(self) -> None:
        bad = [f for f in self.formats if f not in FORMATS]
        if not self.formats:
            raise ConvertError(f"--formats: empty; choose one or both of {','.join(FORMATS)}")
        if bad:
            raise ConvertError(f"--formats: unknown {bad}; choose from {','.join(FORMATS)}")
        if self.max_resolution < 0:
            raise ConvertError("--max-resolution must be 0 (keep the size) or a positive number of pixels")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConvertError("--jpeg-quality must be between 1 and 100")
        if not 0 <= self.holdout_fraction < 1:
            raise ConvertError("--holdout-fraction must be at least 0 and below 1")
        if self.shard_size < 1:
            raise ConvertError("--shard-size must be at least 1")


@dataclass
class Context:
    out: Path
    settings: ConvertSettings
    workers: int
    strict: bool
    console: Console
    progress: Progress | None = None
    pool: multiprocessing.pool.Pool | None = field(default=None, repr=False)
    stop: threading.Event = field(default_factory=threading.Event)

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt


# ---------------------------------------------------------------- worker side

def _start_worker() -> None:
    """A pool worker's first act: it dies with the converter, however that ends (processes.tie_to_parent).
    Ctrl-C goes to the whole process group; the parent alone handles it, so workers ignore it (no tracebacks)."""
    processes.tie_to_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _prepare(job: tuple) -> tuple | str:
    """Runs in a worker: read and prepare one input. Returns (jpeg, copied, longer side in pixels) or the
    reject reason."""
    location, max_resolution, quality = job
    try:
        data = read_bytes(location)
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    try:
        image = prepare_image(data, max_resolution, quality)
    except BadImage as e:
        return str(e)
    except Exception as e:  # an unexpected decoder failure rejects this file, with its reason, not the run
        return f"decoder error: {type(e).__name__}: {e}"
    return image.jpeg, image.copied, max(image.width, image.height)


def _beton_process(shards: list[tuple[Path, Path]], beton: Path, workers: int) -> None:
    """Runs write_beton in a child. Stopped (SIGTERM from the parent, or Ctrl-C), it stops FFCV's writer
    processes too, so none is left writing to the discarded temporary file. It dies with the converter, and
    FFCV's writer processes with it, however the converter ends (processes.tie_to_parent)."""
    processes.tie_to_parent()
    processes.forks_tied_to_parents()

    def stop(signum, _frame):
        for child in multiprocessing.active_children():
            child.terminate()
        os._exit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    write_beton(shards, beton, workers)


@contextmanager
def _ctrl_c_stops_at_safe_points(ctx: Context) -> Iterator[None]:
    """Ctrl-C sets a flag that the parent checks between results (ctx.check_stop), instead of raising
    KeyboardInterrupt wherever the main thread happens to be: inside multiprocessing's or rich's locks,
    or in numba's compiler, which swallows it. A second Ctrl-C interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(_signum, _frame):
        if ctx.stop.is_set():
            raise KeyboardInterrupt
        ctx.stop.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


BATCH = 8  # images per worker task: messaging costs less than per image, and Ctrl-C still waits < 0.2 s


def _prepare_batch(jobs: list[tuple]) -> list[tuple | str]:
    return [_prepare(job) for job in jobs]


def _results(ctx: Context, jobs: list[tuple]) -> Iterator[tuple | str]:
    """The workers' results in job order (so shards come out deterministic), checking for Ctrl-C while
    waiting: imap with a timeout, over batches, since a chunked imap cannot wait with a timeout."""
    batches = ctx.pool.imap(_prepare_batch, (jobs[i:i + BATCH] for i in range(0, len(jobs), BATCH)))
    while True:
        ctx.check_stop()
        try:
            yield from batches.next(timeout=0.2)
        except multiprocessing.TimeoutError:
            pass
        except StopIteration:
            return


# ---------------------------------------------------------------- progress

class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} img/s" if task.speed else "… img/s", style="progress.data.speed")


def make_progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                    RateColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console, speed_estimate_period=10)


# ---------------------------------------------------------------- OUT state

OWNED = {"dali", "ffcv", WORK, MANIFEST, REJECTED, MANIFEST + ".tmp", REJECTED + ".tmp"}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _differences(a, b, f"{prefix}{key}.")
        elif key == "plan_sha256" and a != b:
            diffs.append("the source's files or their split changed")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a} -> {b}")
    return diffs


def _clear(out: Path) -> None:
    for name in OWNED:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _prepare_out(out: Path, identity: dict, overwrite: bool) -> str:
    """Returns 'complete' (nothing to do), 'resume' or 'fresh'; refuses to touch what it must not."""
    manifest, plan = out / MANIFEST, out / WORK / "plan.json"
    if manifest.is_file():
        old = json.loads(manifest.read_text()).get("identity", {})
        if old == identity:
            return "complete"
        if not overwrite:
            raise ConvertError(f"{out} already holds a complete conversion made differently "
                               f"({'; '.join(_differences(old, identity))}). Pass --overwrite to replace it, "
                               "or choose another OUT.")
        _clear(out)
    elif plan.is_file():
        old = json.loads(plan.read_text())
        if old == identity:
            return "resume"
        if not overwrite:
            raise ConvertError(f"{out} holds an unfinished conversion made differently "
                               f"({'; '.join(_differences(old, identity))}). Rerun with its settings to "
                               "finish it, or pass --overwrite to start again.")
        _clear(out)
    elif out.exists():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OWNED)
        if foreign:
            raise ConvertError(f"{out} is not empty ({', '.join(foreign[:5])}) and is not a conversion "
                               "output; choose an empty or new directory.")
        _clear(out)  # outputs of a run killed before it wrote its plan: nothing in them is trusted
    atomic_write_bytes(plan, json.dumps(identity, indent=1).encode())
    return "fresh"


def _identity(source: ScannedSource, plan: dict[str, list[PlannedSample]], settings: ConvertSettings) -> dict:
    digest = hashlib.sha256()
    for split, samples in plan.items():
        for s in samples:
            digest.update(f"{split}\t{s.index}\t{s.label}\t{s.ref}\n".encode("utf-8", "surrogateescape"))
    return {"settings": {**asdict(settings), "formats": list(settings.formats)},
            "source": {"layout": source.layout, "path": str(source.root)},
            "plan_sha256": digest.hexdigest()}


# ---------------------------------------------------------------- shards

def _shard_dir(ctx: Context, split: str) -> Path:
    return dali_split_dir(ctx.out, split) if "dali" in ctx.settings.formats else staging_split_dir(ctx.out, split)


def _load_record(ctx: Context, split: str, k: int) -> dict | None:
    """A shard counts as done only if its record exists, holds every field this version records (a run of an
    older version recorded no largest_side) and its files have the recorded sizes."""
    path = records_dir(ctx.out, split) / f"shard-{k:06d}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if "largest_side" not in record:
        return None
    if record["samples"]:
        directory = _shard_dir(ctx, split)
        for name, size in ((record["tar"], record["tar_bytes"]), (record["index"], record["index_bytes"])):
            if not (directory / name).is_file() or (directory / name).stat().st_size != size:
                return None
    return record


def _write_shard(ctx: Context, split: str, k: int, chunk: list[PlannedSample], results: Iterator, task) -> dict:
    directory = _shard_dir(ctx, split)
    writer = ShardWriter(directory / shard_name(k), directory / index_name(k))
    rejected, labels, copied, largest_side = [], Counter(), 0, 0
    for sample in chunk:
        result = next(results)
        if isinstance(result, str):
            rejected.append({"path": sample.ref, "split": split, "reason": result})
            if ctx.strict:
                raise ConvertError(f"--strict: {sample.ref}: {result}")
        else:
            writer.add(sample_key(sample.index), sample.label, result[0])
            labels[sample.label] += 1
            copied += result[1]
            largest_side = max(largest_side, result[2])
        ctx.progress.advance(task)
    record = {"shard": k, "samples": 0, "tar": None, "index": None, "tar_bytes": 0, "index_bytes": 0}
    if not labels:  # a shard whose inputs were all rejected is not written: DALI rejects empty indexes
        writer.abort()
    else:
        info = writer.commit()
        record.update(samples=info.samples, tar=shard_name(k), index=index_name(k), tar_bytes=info.tar_bytes,
                      tar_sha256=info.tar_sha256, index_bytes=info.index_bytes, index_sha256=info.index_sha256)
    record.update(copied=copied, largest_side=largest_side,
                  label_counts={str(c): n for c, n in sorted(labels.items())}, rejected=rejected)
    atomic_write_bytes(records_dir(ctx.out, split) / f"shard-{k:06d}.json", json.dumps(record).encode())
    return record


def _convert_split(ctx: Context, split: str, samples: list[PlannedSample]) -> list[dict]:
    size = ctx.settings.shard_size
    chunks = [samples[i:i + size] for i in range(0, len(samples), size)]
    records = {k: r for k in range(len(chunks)) if (r := _load_record(ctx, split, k)) is not None}
    todo = [k for k in range(len(chunks)) if k not in records]
    task = ctx.progress.add_task(split, total=len(samples),
                                 completed=sum(len(chunks[k]) for k in records))
    if todo:
        s = ctx.settings
        results = _results(ctx, [(sample.location, s.max_resolution, s.jpeg_quality)
                                 for k in todo for sample in chunks[k]])
        for k in todo:
            records[k] = _write_shard(ctx, split, k, chunks[k], results, task)
    return [records[k] for k in range(len(chunks))]


def _write_betons(ctx: Context, records: dict[str, list[dict]]) -> None:
    """One process per split, side by side. FFCV's writer sleeps 0.1 s between progress checks and spends
    most of a small split's time there; side by side, the splits' waits overlap (0.8 s -> 0.3 s for the
    700-image sample). On ImageNet the train .beton dominates and uses all --workers."""
    import ffcv.writer  # noqa: F401  imported once here (~10 s of numba set-up), inherited by the forks
    ctx.check_stop()
    running = []
    try:
        for split, recs in records.items():
            beton = beton_path(ctx.out, split)
            shards = [(_shard_dir(ctx, split) / r["tar"], _shard_dir(ctx, split) / r["index"])
                      for r in recs if r["samples"]]
            if shards and not beton.exists():  # it exists only if a previous run finished it
                ctx.console.print(f"writing {beton.relative_to(ctx.out)} from {len(shards)} shard(s), "
                                  "no re-decoding")
                process = multiprocessing.Process(target=_beton_process, args=(shards, beton, ctx.workers))
                process.start()
                running.append((process, beton))
        for process, beton in running:
            while process.is_alive():
                ctx.check_stop()
                process.join(timeout=0.2)
            if process.exitcode != 0:
                raise ConvertError(f"writing {beton} failed (exit code {process.exitcode}, error above); "
                                   "rerun the same command to retry: the shards are kept")
    finally:
        for process, _ in running:
            if process.is_alive():
                process.terminate()
                process.join()


# ---------------------------------------------------------------- manifest

def _versions() -> dict:
    """Versions of what wrote the output, read from package metadata (importing FFCV would take ~10 s)."""
    versions = {"python": platform.python_version()}
    for package in ("pillow", "numpy", "ffcv"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _split_summary(ctx: Context, split: str, planned: int, records: list[dict], num_classes: int) -> dict:
    per_class = [0] * num_classes
    for r in records:
        for label, n in r["label_counts"].items():
            per_class[int(label)] += n
    samples = sum(r["samples"] for r in records)
    copied = sum(r["copied"] for r in records)
    summary = {"samples": samples, "inputs": planned, "copied": copied, "reencoded": samples - copied,
               "rejected": sum(len(r["rejected"]) for r in records), "per_class": per_class,
               # the longest side of any stored image, in pixels (0: none stored), for decoders that preallocate
               "largest_side": max((r["largest_side"] for r in records), default=0)}
    if "dali" in ctx.settings.formats:
        summary["dali"] = {"dir": f"dali/{split}",
                           "shards": [[r["tar"], r["index"]] for r in records if r["samples"]]}
    if "ffcv" in ctx.settings.formats:
        summary["ffcv"] = f"ffcv/{split}.beton" if samples else None
    return summary


def _finish(ctx: Context, source: ScannedSource, identity: dict, plan: dict, records: dict, clock: dict) -> dict:
    out, formats = ctx.out, ctx.settings.formats
    rejected = [r.as_dict() for r in source.rejected] + [x for split in records for r in records[split]
                                                         for x in r["rejected"]]
    atomic_write_bytes(out / REJECTED, "".join(json.dumps(r) + "\n" for r in rejected).encode())
    files = {}
    for split, recs in records.items():
        if "dali" in formats:
            for r in recs:
                if r["samples"]:
                    files[f"dali/{split}/{r['tar']}"] = {"bytes": r["tar_bytes"], "sha256": r["tar_sha256"],
                                                         "samples": r["samples"]}
                    files[f"dali/{split}/{r['index']}"] = {"bytes": r["index_bytes"], "sha256": r["index_sha256"]}
        beton = beton_path(out, split)
        if "ffcv" in formats and beton.exists():
            files[f"ffcv/{split}.beton"] = {"bytes": beton.stat().st_size, "sha256": sha256_file(beton),
                                            "samples": sum(r["samples"] for r in recs)}
    files[REJECTED] = {"bytes": (out / REJECTED).stat().st_size, "sha256": sha256_file(out / REJECTED)}
    wnids = sorted(source.train_wnids)
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "identity": identity,
        "settings": identity["settings"],
        "source": {**identity["source"], "notes": source.notes},
        "num_classes": len(wnids),
        "classes": [{"index": i, "wnid": w, "name": source.class_names.get(w)} for i, w in enumerate(wnids)],
        "splits": {split: _split_summary(ctx, split, len(plan[split]), recs, len(wnids))
                   for split, recs in records.items()},
        "files": files,
        "rejected": rejected,
        "versions": _versions(),
        # Seconds spent by the run that finished the output (a resumed run times only its own part).
        "timing": {"workers": ctx.workers, "scan_s": clock["scanned"] - clock["start"],
                   "shards_s": clock["shards"] - clock["scanned"], "betons_s": clock["betons"] - clock["shards"],
                   "total_s": time.perf_counter() - clock["start"]},
    }
    atomic_write_bytes(out / MANIFEST, dumps(manifest))
    shutil.rmtree(out / WORK, ignore_errors=True)
    return manifest


# ---------------------------------------------------------------- entry point

def convert(src: Path, out: Path, settings: ConvertSettings, *, workers: int | None = None,
            strict: bool = False, overwrite: bool = False, console: Console | None = None) -> dict:
    """Convert SRC into OUT; returns the manifest. Raises ConvertError (or SourceError) with the reason,
    and KeyboardInterrupt after Ctrl-C, once the finished shards are safely recorded."""
    settings.check()
    if workers is not None and workers < 1:
        raise ConvertError("--workers must be at least 1")
    console = console or Console(stderr=True)
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out} is a file; OUT must be a new or empty directory, or a previous output")
    ctx = Context(out, settings, workers or os.cpu_count() or 1, strict, console)
    with _ctrl_c_stops_at_safe_points(ctx):
        return _convert(ctx, Path(src), overwrite)


def _convert(ctx: Context, src: Path, overwrite: bool) -> dict:
    console, settings, out = ctx.console, ctx.settings, ctx.out
    clock = {"start": time.perf_counter()}

    def scanning(n: int) -> None:
        ctx.check_stop()
        status.update(f"scanning {src}: {n:,} files")

    with console.status(f"scanning {src}") as status:
        source = detect_and_scan(src, scanning)
    if ctx.strict and source.rejected:
        first = source.rejected[0]
        raise ConvertError(f"--strict: {first.ref}: {first.reason}")
    plan = plan_splits(source.train, source.val, source.train_wnids, settings.holdout_fraction, settings.seed)
    counts = ", ".join(f"{split} {len(s):,}" for split, s in plan.items())
    console.print(f"{source.layout} layout at {source.root}: {len(source.train_wnids)} classes; {counts}")
    for note in source.notes:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)

    identity = _identity(source, plan, settings)
    state = _prepare_out(out, identity, overwrite)
    if state == "complete":
        shutil.rmtree(out / WORK, ignore_errors=True)  # a run killed after writing its manifest
        console.print(f"{out} is already complete with these settings; nothing to do.")
        return json.loads((out / MANIFEST).read_text())
    if state == "resume":
        stale = remove_tmp_files(out)
        console.print(f"resuming the unfinished conversion in {out} (discarded {stale} partial files)")

    records = {}
    clock["scanned"] = time.perf_counter()
    # fork only while this process runs one thread; else a forkserver (a process that called DALI, FFCV or
    # torch first: their threads' locks would be copied held into forked children). pipelines/processes.py has
    # the costs.
    ctx.pool = processes.context([__name__]).Pool(ctx.workers, initializer=_start_worker)
    try:
        with make_progress(console) as ctx.progress:
            for split, samples in plan.items():
                records[split] = _convert_split(ctx, split, samples)
    finally:
        ctx.pool.terminate()
        ctx.pool.join()
    clock["shards"] = time.perf_counter()

    if "ffcv" in settings.formats:
        _write_betons(ctx, records)
    clock["betons"] = time.perf_counter()

    ctx.check_stop()
    manifest = _finish(ctx, source, identity, plan, records, clock)
    _print_summary(console, out, manifest)
    return manifest


def _print_summary(console: Console, out: Path, manifest: dict) -> None:
    splits = manifest["splits"]
    samples = sum(s["samples"] for s in splits.values())
    copied = sum(s["copied"] for s in splits.values())
    per_split = " · ".join(f"{name} {s['samples']:,}" for name, s in splits.items())
    reasons = sorted(Counter(r["reason"].split(":")[0] for r in manifest["rejected"]).items(),
                     key=lambda kv: (-kv[1], kv[0]))
    rejected = len(manifest["rejected"])
    line = (f"converted {samples:,} images ({per_split}): {copied:,} stored byte for byte, "
            f"{samples - copied:,} re-encoded; {rejected:,} rejected")
    if rejected:
        line += f", listed in {out / REJECTED} (" + "; ".join(f"{n} × {r}" for r, n in reasons) + ")"
    console.print(line)
