import shutil
import sys
from pathlib import Path

import pytest
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.convert.job import ConvertSettings, convert  # noqa: E402
from pipelines.convert.sample import add_quirks, make_sample  # noqa: E402


def quiet() -> Console:
    return Console(stderr=True, quiet=True)


@pytest.fixture(scope="session")
def clean_tree(tmp_path_factory):
    """4 classes x 12 train + 3 val, no quirks: small enough to convert many times."""
    root = tmp_path_factory.mktemp("clean") / "tree"
    wnids = make_sample(root, classes=4, per_class=12, val_per_class=3, seed=1, workers=2)
    return root, wnids


@pytest.fixture(scope="session")
def quirky_tree(tmp_path_factory):
    """6 classes x 30 train + 5 val, plus every quirky and broken kind of file."""
    root = tmp_path_factory.mktemp("quirky") / "tree"
    wnids = make_sample(root, classes=6, per_class=30, val_per_class=5, seed=0, workers=2)
    expected = add_quirks(root, wnids, seed=0)
    return root, wnids, expected


@pytest.fixture(scope="session")
def converted(quirky_tree, tmp_path_factory):
    """The quirky tree converted to both formats, shards of 40 samples."""
    root = quirky_tree[0]
    out = tmp_path_factory.mktemp("converted") / "out"
    manifest = convert(root, out, ConvertSettings(shard_size=40), workers=2, console=quiet())
    return out, manifest


@pytest.fixture
def damaged(converted, tmp_path):
    """A copy of the converted output, for tests that break it."""
    copy = tmp_path / "copy"
    shutil.copytree(converted[0], copy)
    return copy
