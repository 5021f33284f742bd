import shutil
import sys
from pathlib import Path

import pytest
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.convert.job import ConvertSettings, convert  # noqa: E402
from pipelines.convert.sample import add_quirks, make_sample  # noqa: E402


# The fast tier (`make test-fast`, `pytest -m fast`): every module of pipelines/, training/, benchmarks/ and
# tools/ run at least once, in under 3 minutes on 2 cores. An entry is a test file (all its tests) or
# file::test (all of its parametrized cases) or file::test[case] (one case). Chosen for coverage per second:
# the session fixtures (the sample trees and their conversion) once, no training beyond a few steps.
FAST = (
    # pipelines/convert, pipelines/formats, pipelines/processes (the session fixtures convert with 2 workers)
    "test_split.py",
    "test_images.py",
    "test_sources.py",
    "test_sample_generator.py",  # and tools/make_sample_imagenet.py
    "test_convert.py::test_every_input_is_converted_or_listed",
    "test_convert.py::test_plain_tar_and_webdataset_read_the_shards",
    "test_convert.py::test_rerun_with_same_settings_does_nothing",
    "test_convert.py::test_verify_passes_on_a_fresh_output",
    "test_convert.py::test_verify_catches_a_relabelled_sample",
    "test_convert.py::test_unknown_layout_from_the_cli",  # tools/convert_imagenet.py
    "test_convert.py::test_verify_explains_a_directory_without_manifest",  # tools/verify_dataset.py
    # pipelines/loaders (FFCV compiles its pipeline once per process, ~8 s), contract, rand_augment, device_augment
    "test_pipelines.py::test_train_batches_follow_the_contract[float32-dali]",
    "test_pipelines.py::test_train_batches_follow_the_contract[float32-ffcv]",
    "test_pipelines.py::test_train_batches_follow_the_contract[float32-torchvision]",
    "test_pipelines.py::test_train_batches_follow_the_contract[float32-synthetic]",
    "test_pipelines.py::test_eval_reads_every_sample_once_in_stored_order[val-dali]",
    "test_pipelines.py::test_eval_reads_every_sample_once_in_stored_order[val-ffcv]",
    "test_pipelines.py::test_eval_reads_every_sample_once_in_stored_order[val-torchvision]",
    "test_pipelines.py::test_unknown_kind_lists_the_kinds",
    "test_pipelines.py::test_bad_options_are_clear_errors",
    # the loaders' errors (errors.py): what a fault, an out-of-memory and a bug each say; options a reader ignores
    "test_dali_build.py::test_an_option_the_reader_ignores_is_refused_before_any_work",
    "test_dali_errors.py::test_a_damaged_jpeg_is_a_dataset_error_naming_its_file",
    "test_loader_errors.py::test_torchvision_device_side_faults",
    "test_process_cleanup.py::test_a_killed_converter_leaves_nothing",
    "test_rand_augment.py",
    "test_no_sync.py::test_normalize_matches_the_formula",
    "test_no_sync.py::test_colour_augment_follows_torchvision",
    "test_two_views.py::test_two_views_follow_the_contract[float32-dali]",
    "test_two_views.py::test_two_views_follow_the_contract[float32-torchvision]",
    # training/: the step, evaluation, k-NN, objectives, transfer, batch augmentation, config, and one short run
    # through training/run.py (run directory, progress, checkpoints)
    "test_no_sync.py::test_train_step_makes_no_host_tensor[supervised]",
    "test_no_sync.py::test_train_step_makes_no_host_tensor[mae]",
    "test_no_sync.py::test_train_step_makes_no_host_tensor[colorize]",
    "test_no_sync.py::test_evaluate_makes_no_host_tensor",
    "test_no_sync.py::test_knn_makes_no_host_tensor",
    "test_objectives.py::test_every_image_keeps_exactly_its_visible_share",
    "test_objectives.py::test_masks_differ_between_ranks_and_steps_and_repeat_from_seed_rank_step",
    "test_objectives.py::test_the_network_loss_is_the_masked_loss_of_its_own_prediction",
    "test_objectives.py::test_lab_matches_kornia_and_the_gray_input_keeps_only_the_luminance",
    "test_objectives.py::test_colorize_targets_are_the_images_ab_per_patch",
    "test_objectives.py::test_a_name_is_registered_once",
    "test_ssl.py::test_info_nce_equals_the_formula",
    "test_ssl.py::test_knn_votes_are_weighted_by_similarity",
    "test_ssl.py::test_rotation_labels_match_torch_rot90",
    "test_ssl.py::test_the_optimizer_gets_only_trainable_parameters",
    "test_ssl.py::test_a_linear_probe_keeps_the_backbone_in_eval_mode",
    "test_deit.py::test_mixed_targets_sum_to_one_and_match_the_mixed_pixels",
    "test_deit.py::test_erasing_is_per_image_at_its_probability_and_seeded_by_step",
    "test_training.py::test_compiled_evaluation_builds_two_graphs_and_is_never_the_training_module",
    "test_training.py::test_checkpoint_loads_into_timm",
    "test_training.py::test_bad_config_is_an_error_that_names_it",
    "test_training.py::test_missing_data_is_a_clear_error",
    "test_training.py::test_presets_hold_only_what_differs_from_the_defaults",
    "test_training.py::test_every_flag_sets_its_field",
    "test_training.py::test_a_saved_config_with_a_retired_field_still_loads",
    "test_run_safety.py::test_config_mistakes_stop_before_any_work",
    "test_run_safety.py::test_bad_resume_targets_stop_before_any_work",
    "test_run_safety.py::test_a_run_directory_in_use_is_refused",
    # benchmarks/ (convert.py runs only its --help here, in test_docs_match.py; the tools/ CLIs run in subprocesses)
    "test_benchmarks.py::test_checkpoint_benchmark_writes_real_checkpoints_and_projects_the_cost",
    "test_benchmarks.py::test_windows_stay_inside_an_epoch_and_the_boundary_reads_its_end",
    "test_benchmarks.py::test_loader_benchmark_times_the_epoch_boundary_and_mid_epoch_starts",
    "test_benchmarks.py::test_gpu_suite_refuses_without_a_gpu",
    "test_benchmarks.py::test_report_renders_the_recorded_results",
    "test_benchmarks.py::test_goals_say_by_how_much_and_what_the_profile_blames",
    "test_bench_augment_ramp.py::test_the_projection_is_the_hand_computation",
    "test_bench_augment_ramp.py::test_a_bad_rand_augment_is_refused_before_any_work",
    "test_train_bench.py::test_windows_never_cross_an_epoch",
    "test_train_bench.py::test_cpu_rows_have_no_peak_memory",
    "test_train_bench.py::test_a_record_carries_its_diff_and_the_gpu_fields",
    "test_train_bench.py::test_evaluation_benchmark_times_both_models_and_projects_the_epoch",
    "test_train_bench.py::test_the_smoke_check_names_every_way_a_run_goes_wrong",
    "test_bench_dali_feed.py::test_the_feed_benchmark_records_inline_against_read_ahead_warm_and_cold",
    # the docs against the code
    "test_docs_match.py",
)


def pytest_collection_modifyitems(config, items):
    matched = set()
    for item in items:
        file = Path(item.path).name
        keys = {file, f"{file}::{getattr(item, 'originalname', item.name)}", f"{file}::{item.name}"}
        if keys & set(FAST):
            item.add_marker(pytest.mark.fast)
            matched |= keys & set(FAST)
    # A renamed or removed test must not silently leave the tier: on a whole-suite `-m fast` run, every entry
    # whose file was collected has to match a test.
    if "fast" in (config.option.markexpr or "") and not any("::" in arg for arg in config.args):
        collected = {Path(item.path).name for item in items}
        stale = [entry for entry in FAST if entry not in matched and entry.split("::")[0] in collected]
        if stale:
            raise pytest.UsageError(f"tests/conftest.py's FAST names tests that do not exist: {', '.join(stale)}")


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


@pytest.fixture(scope="session")
def ssl_data(tmp_path_factory):
    """The self-supervised tests' sample: 8 classes x 40 images converted at 64 px (the tiny model trains at
    32 px): 288 train, 32 holdout, 48 val images."""
    root = tmp_path_factory.mktemp("ssl")
    make_sample(root / "tree", classes=8, per_class=40, val_per_class=6, seed=2, workers=2)
    out = root / "out"
    convert(root / "tree", out, ConvertSettings(formats=("dali",), max_resolution=64), workers=2, console=quiet())
    return out
