"""Checkpoints that a crash, a kill -9 or a full disk cannot leave half-written.

A checkpoint holds the model's state dict under timm's key names (so `timm.create_model(name,
num_classes=N, checkpoint_path=...)` or `load_state_dict(ckpt["model"])` works), the optimizer, scheduler and
GradScaler states, the position (completed epochs, the batch reached in the current epoch, the optimizer
step), the torch RNG states, the best holdout figures so far and the resolved config, plus a CRC32 of all its
tensor bytes: torch.load reads a file with flipped bytes in a tensor without complaint, and the CRC catches it.

Writing: a temporary file, fsync, then a rename, so `last.pt` is at every moment either the old complete
checkpoint or the new one. The one it replaces stays as `previous.pt` (a hard link, no copy), the fallback
when `last.pt` was damaged after it was written. Writer does the serializing on a side thread from a host copy,
so training goes on while a ViT-B/16 checkpoint (1.0 GB with AdamW's moments) goes to disk.
"""
from __future__ import annotations

import os
import shutil
import threading
import zlib
from pathlib import Path

import torch

from pipelines.formats.files import commit, tmp_path

LAST, PREVIOUS, BEST = "last.pt", "previous.pt", "best.pt"
# What a resume needs; a checkpoint without them (a best.pt, a model-only file) cannot continue a run.
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "position", "best", "rng", "config", "num_classes")


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written or read; the message names the file."""


def _tensors(value):
    """The tensors of a nested state in a fixed order (dict insertion order survives torch.save and load)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def crc32(state: dict) -> int:
    """CRC32 of every tensor's bytes (about 1 GB/s: 1 s for ViT-B/16 with AdamW, on the writer's thread)."""
    crc = 0
    for tensor in _tensors(state):
        data = tensor.detach().contiguous().reshape(-1)
        if data.numel():
            crc = zlib.crc32(data.view(torch.uint8).numpy(), crc)
    return crc


def snapshot(value):
    """A host copy of a nested state, so that training can go on changing the original while it is written. For
    GPU tensors this is the device-to-host copy torch.save would make anyway."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: snapshot(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(item) for item in value)
    return value


class _Recorded:
    """A file whose first write error is kept: torch.save reports a failed write as a RuntimeError of its zip
    writer ("unexpected pos ..."), and the OSError behind it (ENOSPC, EFBIG, EROFS) is what names the cause."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.file.flush()

    def fileno(self) -> int:
        return self.file.fileno()


def _publish(tmp: Path, path: Path, keep_previous: bool) -> None:
    """The renames that make a fully written and synced `tmp` the checkpoint `path`: the current `path` becomes
    previous.pt first, then `tmp` replaces it and the directory is synced (files.commit), so that the renames
    themselves survive a power cut."""
    if keep_previous and path.exists():
        previous = path.with_name(PREVIOUS)
        link = tmp_path(previous)
        link.unlink(missing_ok=True)
        try:
            os.link(path, link)  # previous.pt becomes the current last.pt before last.pt is replaced
        except OSError:  # a filesystem without hard links
            shutil.copyfile(path, link)
        os.replace(link, previous)
    commit(tmp, path)


def write(path: Path, state: dict, *, keep_previous: bool = False) -> None:
    """Writes `state` (host tensors) to `path` atomically. Raises CheckpointError naming the file when the disk
    refuses (full, read-only, quota); the checkpoint that was there is left as it was."""
    tmp = tmp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)  # what a killed write left (it may even be a FIFO or a link)
        payload = {**state, "crc32": crc32(state)}
        with open(tmp, "wb") as raw:
            f = _Recorded(raw)
            try:
                torch.save(payload, f)
            except RuntimeError:
                if f.error is None:
                    raise
                raise f.error from None
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the bytes do (a crash would leave a stub)
        _publish(tmp, path, keep_previous)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        kept = f"{path} is unchanged" if path.exists() else f"no checkpoint was at {path} before"
        raise CheckpointError(f"could not write the checkpoint {path}: {e.strerror or e} ({kept})") from None


def load(path: Path, required: tuple[str, ...] = ()) -> dict:
    """Reads a checkpoint with weights_only=True and checks it: not empty, readable, its CRC (when it has one)
    and the `required` keys. Raises CheckpointError naming the file and what is wrong with it."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): a write that never finished")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and weights_only errors all mean: torn or not a checkpoint
        raise CheckpointError(f"{path} cannot be read ({size:,} bytes; truncated, or not a checkpoint: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} is not a checkpoint of training/run.py (it holds a {type(saved).__name__})")
    if "crc32" in saved:
        stored = saved.pop("crc32")
        if crc32(saved) != stored:
            raise CheckpointError(f"{path} is corrupt: its tensors' CRC32 differs from the one saved with them")
    missing = [key for key in required if key not in saved]
    if missing:
        raise CheckpointError(f"{path} cannot continue a run: it has no {', '.join(missing)} (a best.pt or a "
                              "model-only file; --resume takes a run directory or its checkpoints/last.pt)")
    return saved


class Writer:
    """Checkpoints written one at a time on a side thread. `save` copies the state to host memory on the
    caller's thread (the only part training waits for), and the thread computes the CRC, serializes, syncs and
    renames. A failed write is raised on the training thread by the next `check`, `save` or `wait`."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, path: Path, state: dict, *, keep_previous: bool = False) -> None:
        self.wait()  # one write at a time: a second 1 GB copy in host memory is not worth it
        copy = snapshot(state)
        self._thread = threading.Thread(target=self._write, args=(path, copy, keep_previous),
                                        name="checkpoint-writer")
        self._thread.start()

    def _write(self, path: Path, state: dict, keep_previous: bool) -> None:
        try:
            write(path, state, keep_previous=keep_previous)
        except BaseException as e:  # raised on the training thread
            self._error = e

    @property
    def busy(self) -> bool:
        """Whether a write is still running."""
        return self._thread is not None and self._thread.is_alive()

    def check(self) -> None:
        """Raises the error of a write that has failed, without waiting for one still running."""
        if self._thread is not None and not self.busy:
            self.wait()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def find(given: str, flag: str = "--resume", names: tuple[str, ...] = (LAST,)) -> Path:
    """`given` is a checkpoint file, or a run directory: its checkpoints/<the first of `names` that exists>.
    --init prefers best.pt, then last.pt."""
    path = Path(given)
    if path.is_dir():
        candidates = [path / "checkpoints" / name for name in names]
        path = next((c for c in candidates if c.is_file()), candidates[-1])
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {given}: no checkpoint at {path} (pass a .pt file from a run's "
                                "checkpoints/ or the run directory)")
    return path


def newest_complete(run_dir: Path, say) -> tuple[Path, dict] | None:
    """The newest checkpoint of a run directory that loads and passes its checks: last.pt, else previous.pt,
    saying why last.pt was passed over. None when the run has none yet; CheckpointError when every one there is
    damaged."""
    folder = Path(run_dir) / "checkpoints"
    found = [folder / name for name in (LAST, PREVIOUS) if (folder / name).is_file()]
    errors = []
    for path in found:
        try:
            saved = load(path, RESUME_KEYS)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if errors:
            say(f"{errors[0]}; resuming from {path} (step {saved['position']['step']}) instead")
        return path, saved
    if errors:
        raise CheckpointError("; ".join(errors) + ". No complete checkpoint is left: start the run again with "
                              f"--resume {run_dir} after moving these away")
    return None


def rng_state() -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
