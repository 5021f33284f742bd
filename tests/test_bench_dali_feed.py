"""benchmarks/dali_feed.py at its --dry-run sizes: the record holds every configuration in both cache states with
consistent figures, says how cold the cold windows were, and the start-up and memory of each configuration."""
import json

import pytest

pytest.importorskip("nvidia.dali")

from benchmarks import dali_feed  # noqa: E402


def test_the_feed_benchmark_records_inline_against_read_ahead_warm_and_cold(converted, tmp_path):
    assert dali_feed.main(["--data", str(converted[0]), "--dry-run", "--results", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("dali_feed-*.json")
    record = json.loads(path.read_text())
    settings = record["settings"]
    assert settings["feed_ahead"] == [0, 2] and settings["dry_run"] and record["commit"] and record["cpu"]
    rows = {(row["feed_ahead"], row["cache"]): row for row in record["results"]}
    assert set(rows) == {(0, "warm"), (0, "cold"), (2, "warm"), (2, "cold")}
    for row in rows.values():
        for name in ("next_ms", "p90_ms", "max_ms", "next_cpu_ms"):
            figure = row[name]
            assert len(figure["repeats"]) == settings["repeats"] and figure["min"] <= figure["median"] <= figure["max"]
        assert 0 < row["next_ms"]["median"] <= row["p90_ms"]["median"] <= row["max_ms"]["median"]
        # the training thread cannot compute for longer than it spends inside next()
        assert row["next_cpu_ms"]["median"] <= row["max_ms"]["median"] * 1.05
    cold = record["cold"]
    assert cold["resident_after_drop"]["max"] < 0.05, cold  # the drop did empty the page cache of the shards
    assert cold["pread_cold_ms"] > 0 and cold["pread_warm_ms"] > 0 and cold["jpeg_mb"]["median"] > 0
    startup = {row["feed_ahead"]: row for row in record["startup"]}
    assert set(startup) == {0, 2}
    assert startup[0]["ahead_mb"] == 0 < startup[2]["ahead_mb"]
    assert all(row["first_batch_s"]["median"] > 0 and row["seek_s"]["median"] > 0 for row in startup.values())
    assert startup[0]["threads_added"] < startup[2]["threads_added"]
    assert record["pipeline_batch_ms"] > 0 and settings["step_ms"] == 20.0


def test_the_feed_benchmark_refuses_a_window_longer_than_an_epoch(converted, tmp_path):
    with pytest.raises(SystemExit, match="lower --batches or --batch-size"):
        dali_feed.main(["--data", str(converted[0]), "--batches", "1000", "--results", str(tmp_path)])
