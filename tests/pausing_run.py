"""training/run.py, paused at a known point so that a test can kill -9 it there without racing it.

    python tests/pausing_run.py POINT N MARKER [run.py arguments...]

The Nth time the run reaches POINT it writes the file MARKER and sleeps until it is killed:
- step:     inside an optimizer step (after the update, before the step is counted);
- evaluate: inside an evaluation, after its first batch;
- write:    inside a checkpoint write, half of the file's bytes written and synced;
- publish:  after a checkpoint's temporary file is complete, before the renames that make it last.pt.
"""
import io
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import training.checkpoint as checkpoint  # noqa: E402
import training.loop as loop  # noqa: E402
import training.run as run  # noqa: E402

point, nth, marker = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
calls = {"n": 0}


def reached() -> bool:
    calls["n"] += 1
    return calls["n"] == nth


def pause() -> None:
    marker.write_text(f"{point} {nth}\n")
    while True:
        time.sleep(60)


def wrap(original, before=None, after=None):
    def wrapped(*args, **kwargs):
        if before and reached():
            before(*args, **kwargs)
        result = original(*args, **kwargs)
        if after and reached():
            pause()
        return result
    return wrapped


if point == "step":
    loop.train_step = wrap(loop.train_step, after=True)
elif point == "evaluate":
    real_evaluate = loop.evaluate

    def evaluate(model, batches, **kwargs):
        pausing = reached()

        def batches_then_pause():
            for index, batch in enumerate(batches):
                if pausing and index == 1:
                    pause()
                yield batch
        return real_evaluate(model, batches_then_pause(), **kwargs)
    run.evaluate = evaluate
elif point == "write":
    real_save = torch.save

    def half_then_pause(state, f):
        if not reached():
            return real_save(state, f)
        data = io.BytesIO()
        real_save(state, data)
        f.write(data.getvalue()[: len(data.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        pause()
    checkpoint.torch.save = half_then_pause
elif point == "publish":
    checkpoint._publish = wrap(checkpoint._publish, before=lambda *a: pause())
else:
    raise SystemExit(f"unknown point {point}")

if __name__ == "__main__":
    raise SystemExit(run.main(sys.argv[4:]))
