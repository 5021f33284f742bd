"""training/run.py as one rank of a DDP run, watched or sabotaged from inside, for tests/test_ddp.py.

    python tests/ddp_probe.py [run.py arguments...]        (one process per rank: torchrun, or RANK/WORLD_SIZE set)

Environment:
- PROBE_DRAWS=DIR: after each step's seeding, appends to DIR/rank<R>.jsonl what the step drew: a digest of the
  batch-augmented inputs and targets (mixup, cutmix, erasing) and of torch's generator state (drop path).
- PROBE_NAN=R:S: rank R's loss becomes NaN at optimizer step S (0-based), on that rank only.
"""
import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import training.loop as loop  # noqa: E402
import training.objectives as objectives  # noqa: E402
import training.run as run  # noqa: E402

rank = int(os.environ.get("RANK", "0"))
current = {"step": -1}
real_seed_step = loop.seed_step


def seed_step(seed, step_rank, step):
    current["step"] = step
    real_seed_step(seed, step_rank, step)


loop.seed_step = seed_step

if os.environ.get("PROBE_DRAWS"):
    out = Path(os.environ["PROBE_DRAWS"]) / f"rank{rank}.jsonl"
    real_inputs = objectives.Supervised.inputs

    def inputs(self, images, labels):
        augmented, targets = real_inputs(self, images, labels)
        generator = hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]
        classes = torch.arange(targets.shape[-1], dtype=torch.float64) if targets.dim() == 2 else 1.0
        with out.open("a") as f:
            f.write(json.dumps({"step": current["step"], "rank": rank,
                                "inputs": float(augmented.double().abs().sum()),
                                "targets": float((targets.double() * classes).sum()), "generator": generator}) + "\n")
        return augmented, targets
    objectives.Supervised.inputs = inputs

if os.environ.get("PROBE_NAN"):
    nan_rank, nan_step = (int(v) for v in os.environ["PROBE_NAN"].split(":"))
    real_train_step = loop.train_step

    def train_step(step, images, labels):
        loss = real_train_step(step, images, labels)
        return loss * float("nan") if (rank, current["step"]) == (nan_rank, nan_step) else loss
    loop.train_step = train_step

if __name__ == "__main__":
    raise SystemExit(run.main(sys.argv[1:]))
