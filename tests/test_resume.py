"""Interrupt the converter for real (kill -9 of its process group, or Ctrl-C) in the middle of a split,
rerun it with the same arguments, and compare with an uninterrupted run.

To interrupt at a known point without racing the converter, one input is replaced by a FIFO: reading it
blocks, so the run stalls with the shards before it finished and the shard holding it half-written.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, quiet
from pipelines.convert.job import ConvertSettings, convert
from test_convert import shard_samples

CONVERT = [sys.executable, str(ROOT / "tools/convert_imagenet.py")]
SETTINGS = ConvertSettings(shard_size=8)


@pytest.fixture(scope="module")
def reference(clean_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    return out, convert(clean_tree[0], out, SETTINGS, workers=1, console=quiet())


def stall_and_interrupt(tree, out, sig):
    """Start the CLI on `tree` with its last val image replaced by a FIFO; once the val split's first shard
    is recorded and its second is half-written, send `sig` to the whole process group."""
    wnid = sorted(p.name for p in (tree / "val").iterdir())[-1]
    victim = sorted((tree / "val" / wnid).iterdir())[-1]
    held_back = tree.parent / "held_back"  # outside the tree: it must not become an input itself
    victim.rename(held_back)
    os.mkfifo(victim)
    proc = subprocess.Popen(CONVERT + [str(tree), str(out), "--shard-size", "8", "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    partial = out / "dali" / "val" / "shard-000001.tar.tmp"
    deadline = time.time() + 120
    while not (partial.exists() and
               (out / ".work/records/val/shard-000000.json").exists()):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the converter never reached the stall point"
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)
    victim.unlink()
    held_back.rename(victim)
    return proc.returncode, stderr


def assert_same_as_reference(out, reference):
    ref_out, ref_manifest = reference
    dali = sorted(p.relative_to(out) for p in (out / "dali").rglob("*") if p.is_file())
    assert dali == sorted(p.relative_to(ref_out) for p in (ref_out / "dali").rglob("*") if p.is_file())
    for rel in dali:
        assert (out / rel).read_bytes() == (ref_out / rel).read_bytes(), rel
    from pipelines.formats.verify import verify
    assert verify(out) == []  # among others: each .beton holds the same labels and bytes as the shards
    manifest = __import__("json").loads((out / "manifest.json").read_text())
    assert manifest["splits"] == ref_manifest["splits"]
    assert {k: v for k, v in manifest["files"].items() if k.startswith("dali/")} == \
           {k: v for k, v in ref_manifest["files"].items() if k.startswith("dali/")}
    for split in ("train", "holdout", "val"):
        assert shard_samples(out, split) == shard_samples(ref_out, split)
    assert not (out / ".work").exists() and not list(out.rglob("*.tmp"))


def test_kill_9_then_rerun_gives_the_uninterrupted_output(clean_tree, reference, tmp_path):
    tree, out = tmp_path / "tree", tmp_path / "out"
    shutil.copytree(clean_tree[0], tree)
    code, _ = stall_and_interrupt(tree, out, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    assert (out / "dali/val/shard-000001.tar.tmp").exists()  # the partial output a rerun must discard
    kept = (out / "dali/train/shard-000000.tar").stat().st_mtime_ns
    rerun = subprocess.run(CONVERT + [str(tree), str(out), "--shard-size", "8", "--workers", "1"],
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr and "discarded 1 partial" in rerun.stderr
    assert (out / "dali/train/shard-000000.tar").stat().st_mtime_ns == kept  # finished shards are kept
    assert_same_as_reference(out, reference)


def test_ctrl_c_says_how_to_resume(clean_tree, reference, tmp_path):
    tree, out = tmp_path / "tree", tmp_path / "out"
    shutil.copytree(clean_tree[0], tree)
    code, stderr = stall_and_interrupt(tree, out, signal.SIGINT)
    assert code == 130 and "rerun the same command to resume" in stderr
    assert "Traceback" not in stderr
    convert(tree, out, SETTINGS, workers=1, console=quiet())
    assert_same_as_reference(out, reference)


def test_unfinished_output_with_other_settings_is_not_mixed(clean_tree, tmp_path):
    tree, out = tmp_path / "tree", tmp_path / "out"
    shutil.copytree(clean_tree[0], tree)
    stall_and_interrupt(tree, out, signal.SIGKILL)
    run = subprocess.run(CONVERT + [str(tree), str(out), "--shard-size", "8", "--workers", "1", "--seed", "3"],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "unfinished conversion made differently" in run.stderr
    assert "seed: 0 -> 3" in run.stderr


def test_shard_records_of_an_older_version_are_redone(clean_tree, reference, tmp_path):
    """A record without the longest stored side (written by a version that did not record it) does not count as
    done: its shard is converted again, and the output is the uninterrupted one, manifest included."""
    import json
    tree, out = tmp_path / "tree", tmp_path / "out"
    shutil.copytree(clean_tree[0], tree)
    stall_and_interrupt(tree, out, signal.SIGKILL)
    old = out / ".work/records/train/shard-000001.json"
    record = json.loads(old.read_text())
    del record["largest_side"]
    old.write_text(json.dumps(record))
    kept, redone = ((out / f"dali/train/shard-00000{k}.tar").stat().st_mtime_ns for k in (0, 1))
    convert(tree, out, SETTINGS, workers=1, console=quiet())
    assert (out / "dali/train/shard-000000.tar").stat().st_mtime_ns == kept
    assert (out / "dali/train/shard-000001.tar").stat().st_mtime_ns != redone
    assert_same_as_reference(out, reference)
