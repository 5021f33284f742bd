"""No host-device sync in a per-batch path (the loader contract, training/loop.py's principle 3).

On the CPU a sync cannot be observed, but its cause can: a tensor made from host data each batch
(`torch.tensor(IMAGENET_MEAN, device=images.device)` is a blocking copy from pageable memory on a GPU, which
waits for the stream). `host_tensors()` records every such call whose caller is this repository's pipelines/ or
training/ code, or kornia's, while batches after the first are read and while the trainer's per-batch functions
run. The first batch may make constants (made once, then cached).

On a GPU (skipped without one) the same paths run under `torch.cuda.set_sync_debug_mode("error")`, which raises
at any synchronizing CUDA call; and each loader's GPU batches are compared, as they arrive, with the CPU
loader's: a batch whose copy had not landed before the model read it would differ.
"""
import contextlib
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import ROOT
from pipelines import build_loader
from pipelines.contract import IMAGENET_MEAN, IMAGENET_STD, normalize
from test_pipelines import (BATCH, CPU, LIBRARY, TRAIN_SIZE, WORKERS, collect_garbage_at_the_end,  # noqa: F401
                            loader, needs)

pytestmark = pytest.mark.filterwarnings(r"ignore:Exception ignored in[\s\S]*numba/core/dispatcher\.py"
                                        r"[\s\S]*KeyError:pytest.PytestUnraisableExceptionWarning")

TORCH_DIR = str(Path(torch.__file__).parent)
WATCHED_PARTS = ("pipelines", "training")
HOST_FACTORIES = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}
COPIES = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.copy_}
BATCHES = 4  # read per loader: the first outside the recording, 3 inside


def watched_dirs() -> tuple[str, ...]:
    """This project's code, kornia's, and timm's data package (Mixup, RandomErasing: they run per batch)."""
    import kornia
    import timm
    return (*(str(ROOT / part) for part in WATCHED_PARTS), str(Path(kornia.__file__).parent),
            str(Path(timm.__file__).parent / "data"))


def caller() -> tuple[str, int]:
    """The file and line of the code that called torch: the nearest frame outside this file (the recorder) and
    outside torch's own package (its Python wrappers)."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename == __file__
                                 or frame.f_code.co_filename.startswith(TORCH_DIR)):
        frame = frame.f_back
    return (frame.f_code.co_filename, frame.f_lineno) if frame is not None else ("?", 0)


def blocking_host_copy(func, args, kwargs) -> bool:
    """A Tensor.to / .cuda / .copy_ that copies a host tensor to another device and waits for it."""
    if func is torch.Tensor.copy_:
        destination, source = args[0], args[1]
        non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
        return source.device.type == "cpu" and destination.device.type != "cpu" and not non_blocking
    source = args[0]
    if func is torch.Tensor.cuda:
        return source.device.type == "cpu" and not kwargs.get("non_blocking", False)
    options = {key: value for key, value in kwargs.items() if key != "copy"}  # _parse_to has no copy
    device, _, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **options)
    return source.device.type == "cpu" and device is not None and device.type != "cpu" and not non_blocking


class HostTensorMode(TorchFunctionMode):
    def __init__(self, calls: list, watched: tuple[str, ...]):
        super().__init__()
        self.calls, self.watched = calls, watched

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_FACTORIES or (func in COPIES and blocking_host_copy(func, args, kwargs)):
            self.record(func.__name__)
        return func(*args, **kwargs)

    def record(self, name: str) -> None:
        file, line = caller()
        if file.startswith(self.watched):
            self.calls.append(f"{name} at {file}:{line}")


@contextlib.contextmanager
def host_tensors():
    """Yields the list of host-data tensor creations and blocking host copies made by watched code inside the
    block. torch.from_numpy bypasses torch-function modes, so it is wrapped for the block's duration."""
    calls, watched = [], watched_dirs()
    mode = HostTensorMode(calls, watched)
    from_numpy = torch.from_numpy

    def recording_from_numpy(array):
        mode.record("from_numpy")
        return from_numpy(array)

    torch.from_numpy = recording_from_numpy
    try:
        with mode:
            yield calls
    finally:
        torch.from_numpy = from_numpy


def read_after_the_first(batches, count=BATCHES) -> list:
    """The host tensors made while reading batches 2..count of an iteration (each batch is touched, so that
    a lazily computed one is computed inside the recording)."""
    iterator = iter(batches)
    next(iterator)
    with host_tensors() as calls:
        for _ in range(count - 1):
            images, labels = next(iterator)
            for view in images if isinstance(images, tuple) else (images,):
                assert view.shape[0] == labels.shape[0]
    return calls


# --- the recorder itself ----------------------------------------------------------------------------------

OLD_NORMALIZE = '''
def normalize(images, dtype):
    scale = 255 if images.dtype == torch.uint8 else 1
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * scale
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * scale
    out = (images.float() - mean) / std
    return out.to(dtype).contiguous(memory_format=torch.channels_last)
'''


def test_the_recorder_catches_per_batch_constants():
    """A normalize that builds its mean and std per call (the form that synchronizes on a GPU), compiled as if
    it lived in pipelines/contract.py, is caught on every call; the same code outside the watched paths is
    not."""
    def compiled(filename):
        namespace = {"torch": torch, "IMAGENET_MEAN": IMAGENET_MEAN, "IMAGENET_STD": IMAGENET_STD}
        exec(compile(OLD_NORMALIZE, filename, "exec"), namespace)
        return namespace["normalize"]
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    for per_batch, expected in [(compiled(str(ROOT / "pipelines" / "contract.py")), 2),
                                (compiled(str(ROOT / "tests" / "elsewhere.py")), 0)]:
        with host_tensors() as calls:
            per_batch(images, torch.float32)
        assert len(calls) == expected, calls


# --- normalize ----------------------------------------------------------------------------------------------

def normalized_by_the_formula(images, dtype):
    scale = 255 if images.dtype == torch.uint8 else 1
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * scale
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * scale
    return ((images.float() - mean) / std).to(dtype)


def every_level(layout):
    """Every uint8 level in every channel, 2 x 3 x 32 x 32, in the layout FFCV (channels_last) or torchvision
    (contiguous NCHW) hands over."""
    images = torch.arange(256, dtype=torch.uint8).repeat(2 * 3 * 4).view(2, 3, 32, 32)
    images[:, 1] = images[:, 1].flip(-1)  # the channels differ
    return images.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else images


@pytest.mark.parametrize("source", ["uint8 channels_last", "uint8 nchw", "float nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_normalize_matches_the_formula(source, dtype):
    """(x - mean) / std: within float32 rounding (x * scale + bias rounds differently), and within the output
    dtype's rounding for bf16/fp16 (torch.testing's tolerances for that dtype)."""
    kind, layout = source.split()
    images = every_level("channels_last" if layout == "channels_last" else "nchw")
    if kind == "float":
        images = images.float() / 255
    out = normalize(images, dtype)
    assert out.dtype == dtype and out.shape == images.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, normalized_by_the_formula(images, dtype))


def test_normalize_makes_no_host_tensor_after_the_first_call():
    images = every_level("channels_last")
    normalize(images, torch.float32)
    normalize(images.float() / 255, torch.float32)
    with host_tensors() as calls:
        for dtype in (torch.float32, torch.bfloat16):
            normalize(images, dtype)
            normalize(images.float() / 255, dtype)
    assert calls == []


# --- the colour augmentation ----------------------------------------------------------------------------------

def coloured_batch(n=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 1, 1, generator=g) * 0.6 + 0.2 + torch.rand(n, 3, size, size, generator=g) * 0.2
    return images.clamp(0, 1).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("p", [None, 1.0], ids=["default p", "p=1"])
def test_colour_augment_makes_no_host_tensor(p):
    """Its generators included: the loader makes a batch's (batch_random) per batch."""
    from pipelines.device_augment import ColourAugment, batch_random
    augment = ColourAugment(32) if p is None else ColourAugment(32, jitter_p=p, gray_p=p, blur_p=p)
    images = coloured_batch()
    augment(images, batch_random(CPU, 0, 0, 0, 0))
    with host_tensors() as calls:
        for batch in range(1, 4):
            augment(images, batch_random(CPU, 0, 0, 0, batch))
    assert calls == []


@pytest.mark.parametrize("p", [None, 1.0], ids=["default p", "p=1"])
def test_colour_augment_reads_nothing_back_from_its_device(p):
    """On the meta device every read of a tensor's values raises (`.item()`, `.tolist()`, `bool()`): those are
    the reads that wait for the GPU on a CUDA batch. Built as the ffcv loader builds it, moved to the batch's
    device."""
    from pipelines.device_augment import ColourAugment, batch_random
    augment = ColourAugment(32) if p is None else ColourAugment(32, jitter_p=p, gray_p=p, blur_p=p)
    augment = augment.to("meta")
    images = torch.empty(8, 3, 32, 32, device="meta").contiguous(memory_format=torch.channels_last)
    out = augment(images, batch_random(CPU, 0, 0, 0, 0))  # meta has no generator; torch.rand takes the CPU's
    assert out.device.type == "meta" and out.shape == images.shape
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_colour_augment_follows_torchvision():
    """Each image, with the draws given, equals torchvision's ColorJitter steps in the drawn order, then its
    grayscale, then its Gaussian blur with the drawn sigma (reflected borders), where its gates are set; the
    images whose gates are not set pass through. The hue goes through HSV in both (1e-3 apart at most)."""
    from torchvision.transforms.v2 import functional as TF

    from pipelines.contract import TWO_VIEWS, blur_kernel_size
    from pipelines.device_augment import (BLUR_GATE, BRIGHTNESS, CONTRAST, DRAWS, GRAY_GATE, HUE, JITTER_GATE,
                                          SATURATION, SIGMA, ColourAugment)
    n, size, p = 16, 32, 0.5
    images = coloured_batch(n, size)
    draws = torch.rand(DRAWS, n, generator=torch.Generator().manual_seed(1))
    order = [2, 0, 3, 1]
    out = ColourAugment(size, jitter_p=p, gray_p=p, blur_p=p).augment(images, draws, order)
    steps = [lambda x, u: TF.adjust_brightness(x, 1 + TWO_VIEWS.brightness * (2 * u - 1)),
             lambda x, u: TF.adjust_contrast(x, 1 + TWO_VIEWS.contrast * (2 * u - 1)),
             lambda x, u: TF.adjust_saturation(x, 1 + TWO_VIEWS.saturation * (2 * u - 1)),
             lambda x, u: TF.adjust_hue(x, TWO_VIEWS.hue * (2 * u - 1))]
    rows = [BRIGHTNESS, CONTRAST, SATURATION, HUE]
    low, high = TWO_VIEWS.blur_sigma
    kernel = blur_kernel_size(size)
    for i in range(n):
        expected = images[i]
        u = draws[:, i].tolist()
        if u[JITTER_GATE] < p:
            for index in order:
                expected = steps[index](expected, u[rows[index]])
        if u[GRAY_GATE] < p:
            expected = TF.rgb_to_grayscale(expected, num_output_channels=3)
        if u[BLUR_GATE] < p:
            sigma = low + (high - low) * u[SIGMA]
            expected = TF.gaussian_blur(expected, [kernel, kernel], [sigma, sigma])
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-3, msg=f"image {i}")
    gates = draws[[JITTER_GATE, GRAY_GATE, BLUR_GATE]] < p
    assert gates.any(dim=0).sum() > 0 and (~gates.any(dim=0)).sum() > 0  # both kinds of image were checked


# --- the trainer's per-batch functions --------------------------------------------------------------------

def tiny_step(objective_name: str, device=CPU, precision: str = "fp32"):
    """The tiny_cpu preset's model, optimizer and schedule, for `objective_name`, on `device`; fp16 gets its
    GradScaler and the optimizer the trainer builds for it (training/optim.py: uses_fused)."""
    from training.config import load_config
    from training.loop import Step
    from training.objectives import build_network, build_objective
    from training.optim import build_optimizer, build_scheduler
    if objective_name == "deit":  # supervised with erasing and mixup/cutmix on the batch (tiny_cpu_deit)
        config = load_config("tiny_cpu_deit", ["data.ramp.start_size=0"])
    elif objective_name in ("mae", "colorize"):  # their tiny presets: the decoder sized for the tiny ViT
        config = load_config(f"tiny_cpu_{objective_name}")
    else:
        config = load_config("tiny_cpu", [f"train.objective={objective_name}"])
    torch.manual_seed(0)
    objective = build_objective(config, 8)
    model = build_network(config, objective, 8).to(device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config.optim, loss_scaling=precision == "fp16")
    scheduler = build_scheduler(optimizer, config.optim, steps_per_epoch=10, epochs=1)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return Step(model, optimizer, scheduler, scaler, contextlib.nullcontext, 1.0, objective), objective


def tiny_batches(views: int, count: int = BATCHES, device=CPU, n: int = 8):
    g = torch.Generator().manual_seed(0)

    def images():
        return torch.randn(n, 3, 32, 32, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    return [(images() if views == 1 else (images(), images()), torch.randint(0, 8, (n,), generator=g).to(device))
            for _ in range(count)]


@pytest.mark.parametrize("objective_name", ["supervised", "deit", "simclr", "rotation", "mae", "colorize"])
def test_train_step_makes_no_host_tensor(objective_name):
    from training.loop import train_step
    step, objective = tiny_step(objective_name)
    batches = tiny_batches(objective.views)
    train_step(step, *batches[0])
    with host_tensors() as calls:
        losses = [train_step(step, images, labels) for images, labels in batches[1:]]
    assert calls == []
    assert all(torch.isfinite(loss) for loss in losses)


def test_evaluate_makes_no_host_tensor():
    """The whole evaluation, its final reduction included: the counters stay on the device."""
    from training.loop import evaluate
    step, _ = tiny_step("supervised")
    batches = tiny_batches(1)
    with host_tensors() as calls:
        result = evaluate(step.model, batches, num_classes=8, autocast=contextlib.nullcontext)
    assert calls == []
    assert result["samples"] == sum(labels.numel() for _, labels in batches)
    assert 0 <= result["top1"] <= result["top5"] <= 1


def test_knn_makes_no_host_tensor():
    from training import knn
    from training.objectives import backbone_of
    step, _ = tiny_step("simclr")
    backbone = backbone_of(step.model)
    bank, queries = tiny_batches(1), tiny_batches(1, count=2)
    with host_tensors() as calls:
        result = knn.evaluate(backbone, bank, {"holdout": queries}, num_classes=8, k=5, temperature=0.07,
                              autocast=contextlib.nullcontext)
    assert calls == []
    assert result["holdout"]["samples"] == 2 * 8 and result["holdout"]["bank"] == BATCHES * 8


# --- the loaders on the CPU ---------------------------------------------------------------------------------

@pytest.mark.parametrize("views", [1, 2])
@pytest.mark.parametrize("kind", ["dali", "ffcv", "torchvision", "synthetic"])
def test_loaders_make_no_host_tensor_per_batch(converted, kind, views):
    batches = loader(converted[0], kind, views=views)
    assert read_after_the_first(batches) == []


def test_eval_loaders_make_no_host_tensor_per_batch(converted):
    """The eval path of the loaders that normalize in torch (contract.normalize)."""
    for kind in ("ffcv", "torchvision"):
        batches = loader(converted[0], kind, "holdout", train=False, batch_size=4)
        assert read_after_the_first(batches) == [], kind


# --- on a GPU --------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda", 0) if torch.cuda.is_available() else None


@contextlib.contextmanager
def syncs_are_errors():
    """Any synchronizing CUDA call inside the block raises RuntimeError (torch's sync debug mode)."""
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def gpu_loader(converted, kind, split="train", train=True, batch_size=BATCH, **kw):
    needs(kind)
    return build_loader(kind, converted[0], split, batch_size=batch_size, image_size=TRAIN_SIZE, train=train,
                        device=CUDA, dtype=torch.bfloat16, workers=WORKERS, **kw)


@needs_cuda
@pytest.mark.parametrize("views", [1, 2])
@pytest.mark.parametrize("kind", ["dali", "ffcv", "torchvision", "synthetic"])
def test_gpu_loaders_do_not_sync_per_batch(converted, kind, views):
    """Batches 2..4 read, and each touched on the device (as a model would), without one sync; then read back
    once, outside the mode, to check they are whole."""
    iterator = iter(gpu_loader(converted, kind, views=views))
    next(iterator)
    sums = []
    with syncs_are_errors():
        for _ in range(BATCHES - 1):
            images, labels = next(iterator)
            views_of = images if isinstance(images, tuple) else (images,)
            sums.append(torch.stack([view.float().sum() for view in views_of]).sum() + labels.sum())
    assert torch.isfinite(torch.stack(sums)).all()


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("objective_name", ["supervised", "deit", "simclr", "rotation", "mae", "colorize"])
def test_gpu_train_step_and_evaluation_do_not_sync(objective_name, precision):
    """Three steps, each after the loop's reseeding, then an evaluation's batches, in sync-debug "error" mode;
    the loss is read after the window (the loop's one read per log window) and the evaluation's reduction outside
    the mode. fp16 includes GradScaler's unscale, step and update."""
    from training.loop import train_step
    from training.precision import autocast_factory
    from training.randomness import seed_step
    step, objective = tiny_step(objective_name, CUDA, precision)
    step.autocast = autocast_factory(precision, CUDA)
    batches = tiny_batches(objective.views, device=CUDA)
    train_step(step, *batches[0])
    torch.cuda.synchronize()
    loss_sum = torch.zeros((), device=CUDA)
    with syncs_are_errors():
        for number, (images, labels) in enumerate(batches[1:], start=1):
            seed_step(0, 0, number)
            loss_sum += train_step(step, images, labels)
            step.scheduler.step_update(num_updates=1)
    assert torch.isfinite(loss_sum).item()
    if objective.supervised:
        evaluation_batches = SyncFreeList(tiny_batches(1, device=CUDA))
        from training.loop import evaluate
        result = evaluate(step.model, evaluation_batches, num_classes=8, autocast=step.autocast)
        assert result["samples"] == BATCHES * 8 and evaluation_batches.checked == BATCHES


class SyncFreeList:
    """Batches handed out with the sync debug mode on "error" from the first one until the iteration ends:
    evaluate's per-batch work runs inside the mode, its final reduction (after the loop) outside it."""

    def __init__(self, batches):
        self.batches, self.checked = batches, 0

    def __iter__(self):
        with syncs_are_errors():
            for batch in self.batches:
                yield batch
                self.checked += 1


def gpu_matches_cpu(converted, kind, split="holdout"):
    """Eval batches of `kind` on the GPU, each read back right as it arrives (on the current stream, as the
    model would read it), against the same loader's CPU batches. Eval has no randomness, and both paths
    decode on the CPU (FFCV: libjpeg-turbo; torchvision: PIL), so they agree up to normalize's rounding."""
    gpu = gpu_loader(converted, kind, split, train=False, batch_size=4)
    cpu = loader(converted[0], kind, split, train=False, batch_size=4, dtype=torch.bfloat16)
    compared = 0
    for (gpu_images, gpu_labels), (cpu_images, cpu_labels) in zip(gpu, cpu, strict=True):
        assert gpu_labels.cpu().tolist() == cpu_labels.tolist()
        torch.testing.assert_close(gpu_images.cpu(), cpu_images, rtol=0, atol=0.02)
        compared += 1
    return compared


@needs_cuda
@pytest.mark.parametrize("kind", ["ffcv", "torchvision"])
def test_gpu_batches_are_complete_when_handed_over(converted, kind):
    """FFCV copies each batch on a stream of its own (ToDevice non_blocking=True) and makes the consumer's
    current stream wait for it (EpochIterator.__next__: current_stream.wait_stream); torchvision copies from
    pinned memory on the current stream. Either way a batch read at once on the current stream is whole."""
    assert gpu_matches_cpu(converted, kind) == len(gpu_loader(converted, kind, "holdout", train=False,
                                                              batch_size=4))
