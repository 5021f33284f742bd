from collections import Counter

import pytest

from pipelines.convert.sources import SourceFile
from pipelines.convert.split import class_index, holdout_count, plan_splits


def files(counts: dict[str, int]) -> list[SourceFile]:
    return [SourceFile(f"train/{w}/{w}_{i}.JPEG", w, f"{w}_{i}.JPEG", ("file", f"/x/{w}_{i}"))
            for w, n in counts.items() for i in range(n)]


COUNTS = {"n02": 50, "n01": 31, "n03": 7, "n04": 2, "n05": 1}


def test_labels_are_ranks_of_sorted_wnids():
    assert class_index(["n03", "n01", "n02"]) == {"n01": 0, "n02": 1, "n03": 2}
    plan = plan_splits(files(COUNTS), None, list(COUNTS), 0.1, seed=0)
    for split in plan.values():
        for s in split:
            assert s.label == sorted(COUNTS).index(s.ref.split("/")[1])


def test_holdout_is_disjoint_and_covers_train():
    plan = plan_splits(files(COUNTS), None, list(COUNTS), 0.1, seed=0)
    train, holdout = {s.ref for s in plan["train"]}, {s.ref for s in plan["holdout"]}
    assert not train & holdout
    assert train | holdout == {f.ref for f in files(COUNTS)}


def test_holdout_is_stratified():
    plan = plan_splits(files(COUNTS), None, list(COUNTS), 0.1, seed=0)
    per_class = Counter(s.ref.split("/")[1] for s in plan["holdout"])
    assert per_class == {"n02": 5, "n01": 3, "n03": 1, "n04": 1}  # round(n/10), >= 1 from 2 images on
    assert holdout_count(1, 0.1) == 0 and holdout_count(2, 0.9) == 1 and holdout_count(10, 0.0) == 0


def test_plan_is_deterministic_and_seeded():
    a = plan_splits(files(COUNTS), None, list(COUNTS), 0.1, seed=0)
    b = plan_splits(list(reversed(files(COUNTS))), None, list(COUNTS), 0.1, seed=0)
    c = plan_splits(files(COUNTS), None, list(COUNTS), 0.1, seed=1)
    assert a == b
    assert [s.ref for s in a["holdout"]] != [s.ref for s in c["holdout"]]
    assert [s.ref for s in a["train"]] != [s.ref for s in c["train"]]


def test_holdout_choice_of_a_class_ignores_other_classes():
    a = plan_splits(files(COUNTS), None, list(COUNTS), 0.1, seed=0)
    more = dict(COUNTS, n00=40)
    b = plan_splits(files(more), None, list(more), 0.1, seed=0)
    assert {s.ref for s in a["holdout"]} <= {s.ref for s in b["holdout"]}


def test_train_order_mixes_classes_and_eval_order_is_sorted():
    plan = plan_splits(files(COUNTS), files({"n01": 3, "n02": 3}), list(COUNTS), 0.1, seed=0)
    first = [s.ref.split("/")[1] for s in plan["train"][:20]]
    assert len(set(first)) >= 3
    assert [s.label for s in plan["holdout"]] == sorted(s.label for s in plan["holdout"])
    assert [s.index for s in plan["val"]] == list(range(6))


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_fraction_is_respected(fraction):
    plan = plan_splits(files({"n01": 40}), None, ["n01"], fraction, seed=3)
    assert len(plan["holdout"]) == round(40 * fraction)
