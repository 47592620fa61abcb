"""data.decode: gpu, run on a CPU device: the CPU path's draws, close pixels, corrupt images, the loop."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from timm.data import auto_augment
from torch.utils.data import default_collate

from orchestrator import pretrain
from orchestrator import recipe as recipes
from orchestrator.data import gpu_decode
from orchestrator.data.gpu_decode import COLOUR_OPS, GEOMETRIC, DeviceCrop, TrainDraws
from orchestrator.data.transforms import TrainCrop
from orchestrator.errors import DataError, RecipeError
from tests.conftest import ROOT, smoke_recipe
from tests.unit.test_loop import RANDOM_EVERYTHING, weights

POLICY = "rand-m9-mstd0.5-inc1"
CPU = torch.device("cpu")


def photo(seed: int, width: int = 160, height: int = 120, fmt: str = "JPEG") -> bytes:
    """Smooth structure plus mild noise: interpolation differences stay small, as on photos."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8))
    img = base.resize((width, height), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    noisy = np.clip(np.asarray(img, float) + rng.normal(0, 4, (height, width, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(noisy).save(out, format=fmt, quality=92)
    return out.getvalue()


def seeded(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)


def device_batch(draws: TrainDraws, payloads: list[bytes], targets: list[int] | None = None) -> list:
    items = []
    for i, data in enumerate(payloads):
        seeded(i)
        items.append((draws(data), i if targets is None else targets[i], i, 0))
    return default_collate(items)


@pytest.mark.parametrize("policy", [None, POLICY])
def test_the_device_draws_as_the_cpu_path_and_gives_close_pixels(policy: str | None) -> None:
    """Seeded alike, every image gets the CPU path's box, interpolation, flip and ops (a different draw
    would differ by tens of levels); the pixels differ by interpolation rounding only. (Images under twice
    the output size: larger crops decode at a reduced DCT scale on the CPU path, at full size on the device.)"""
    jpegs = [photo(i, 120 + 3 * i, 100 + 2 * i) for i in range(24)]
    cpu = TrainCrop(96, policy, "random")
    expected = []
    for i, data in enumerate(jpegs):
        seeded(i)
        expected.append(cpu(data))
    batch = device_batch(TrainDraws(96, policy, "random"), jpegs)
    images, targets, ids, corrupt = DeviceCrop(96, CPU)(batch)
    assert images.shape == (24, 96, 96, 3) and images.dtype == torch.uint8
    assert targets.tolist() == ids.tolist() == list(range(24)) and corrupt.sum() == 0
    diffs = [float((a.int() - b.int()).abs().float().mean()) for a, b in zip(images, expected, strict=True)]
    assert max(diffs) < 3.0 and float(np.mean(diffs)) < 1.0, diffs
    ops_per_image = (batch[0][1][:, gpu_decode.HEAD::3] >= 0).sum(1)
    assert (ops_per_image.sum() > 10) if policy else (batch[0][1].shape[1] == gpu_decode.HEAD)


LEVELS = {
    auto_augment.rotate: 17.0, auto_augment.shear_x: 0.2, auto_augment.shear_y: -0.2,
    auto_augment.translate_x_rel: 0.2, auto_augment.translate_y_rel: -0.15,
    auto_augment.translate_x_abs: 12.0, auto_augment.translate_y_abs: -9.0,
    auto_augment.posterize: 3, auto_augment.solarize: 100, auto_augment.solarize_add: 60,
    auto_augment.color: 1.6, auto_augment.contrast: 0.4, auto_augment.brightness: 1.5, auto_augment.sharpness: 1.8,
}


@pytest.mark.parametrize("fn", gpu_decode.DEVICE_OPS, ids=lambda f: f"{f.__module__.split('.')[-1]}.{f.__name__}")
def test_each_device_op_does_what_pillows_op_does(fn: Callable[..., Image.Image]) -> None:
    """The same geometry and the same colour formula as timm's op on Pillow: directions, signs and fills."""
    img = Image.open(io.BytesIO(photo(5, 64, 64))).convert("RGB")
    tensor = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    fill = (124, 116, 104)
    level = LEVELS.get(fn, 2)
    for bicubic in (False, True) if fn in GEOMETRIC else (False,):
        resample = Image.Resampling.BICUBIC if bicubic else Image.Resampling.BILINEAR
        args = () if fn in (auto_augment.auto_contrast, auto_augment.equalize, auto_augment.invert) else (level,)
        expected = np.asarray(fn(img, *args, resample=resample, fillcolor=fill)).astype(int)
        other = torch.from_numpy(np.array(img.rotate(90))).permute(2, 0, 1)  # batched with another image and level
        if fn in GEOMETRIC:
            matrices = torch.tensor([gpu_decode._pillow_matrix(fn, level, 64, 64), (1, 0.3, 0, 0, 1, 0)])
            got = gpu_decode._warp(torch.stack([tensor, other]), matrices, bicubic, torch.tensor(fill, dtype=torch.float32))
        else:
            got = COLOUR_OPS[fn](torch.stack([tensor, other]), torch.tensor([float(level), 1.0]))
        assert got.shape == (2, 3, 64, 64) and got.dtype == torch.uint8
        diff = np.abs(got[0].permute(1, 2, 0).numpy().astype(int) - expected)
        assert diff.mean() < 2.5 and np.percentile(diff, 99) < 24, (fn.__name__, bicubic, diff.mean())


def test_undecodable_images_are_replaced_and_counted_and_other_formats_decode_in_the_worker() -> None:
    good, png = photo(1), photo(2, fmt="PNG")
    frame = good.index(b"\xff\xc0") + 12  # the first component's quantisation table: one the file does not define
    broken = good[:frame] + b"\x03" + good[frame + 1:]  # whole, and its header parses; it does not decode
    draws = TrainDraws(48, POLICY, "random")
    truncated = good[: len(good) // 2] + bytes(len(good) // 2)  # no end marker: decoded (and refused) in the worker,
    with pytest.raises(OSError, match="truncated"):  # which the reader counts as corrupt; nvJPEG might not refuse it
        draws(truncated)
    images, targets, ids, corrupt = DeviceCrop(48, CPU)(device_batch(draws, [good, broken, png], [7, 8, 9]))
    assert corrupt.tolist() == [0, 1, 0]
    assert ids.tolist() == [0, 0, 2] and targets.tolist() == [7, 7, 9]  # the good image before it, whole
    assert torch.equal(images[1], images[0])
    seeded(2)
    expected = TrainCrop(48, POLICY, "random")(png)
    assert (images[2].int() - expected.int()).abs().float().mean() < 3.0
    with pytest.raises(DataError, match="a whole micro-batch failed to decode"):
        DeviceCrop(48, CPU)(device_batch(draws, [broken, broken]))


def test_recipe_and_preflight_refuse_what_the_device_path_cannot_do(tmp_path: Path, synth_dir: Path) -> None:
    with pytest.raises(RecipeError, match="data.decode: 'tpu' is not cpu or gpu"):
        smoke_recipe(tmp_path, synth_dir, "data.decode=tpu")
    with pytest.raises(RecipeError, match="data.decode: gpu decoding replays RandAugment, not colour jitter"):
        smoke_recipe(tmp_path, synth_dir, "data.decode=gpu", "augment.auto_augment=null", "augment.color_jitter=0.4")
    with pytest.raises(RecipeError, match="data.decode: gpu decoding is for classification"):
        recipes.load(ROOT / "recipes" / "seg" / "smoke.yaml", ["data.decode=gpu"])
    from orchestrator.preflight import preflight

    recipe = smoke_recipe(tmp_path, synth_dir, "data.decode=gpu", "augment.auto_augment=rand-m9-t3a")
    with pytest.raises(RecipeError, match="no device version of RandAugment's desaturate"):
        preflight(recipe, "test.yaml", 1)


def test_a_gpu_decode_run_trains_on_the_device_path_and_resumes_bitwise(synth_dir: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    applied = []
    real = DeviceCrop.apply
    monkeypatch.setattr(DeviceCrop, "apply", lambda self, images, source, d: applied.append(len(source)) or
                        real(self, images, source, d))
    gpu = (*RANDOM_EVERYTHING, "data.decode=gpu")
    pretrain.train(smoke_recipe(tmp_path, synth_dir, *gpu, "run.name=straight", "run.max_steps=8"))
    assert sum(applied) == 8 * 32 and len(set(applied)) == 1, "every training image, a micro-batch at a time"
    for steps in (4, 8):
        pretrain.train(smoke_recipe(tmp_path, synth_dir, *gpu, "run.name=resumed", f"run.max_steps={steps}"))
    a, b = weights(tmp_path / "runs" / "straight"), weights(tmp_path / "runs" / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [r["train_loss"] for r in map(json.loads, (tmp_path / "runs" / "straight" / "metrics.jsonl").read_text()
                                           .splitlines()) if r["kind"] == "train"]
    assert losses and all(np.isfinite(losses))


def test_an_image_comes_out_the_same_alone_or_in_any_micro_batch() -> None:
    """The batched step gives each image what it gives that image alone (offsets, crops, op subsets, chunks)."""
    jpegs = [photo(i, 100 + 7 * i, 90 + 5 * i) for i in range(12)] + [photo(40, fmt="PNG")]
    draws = TrainDraws(64, POLICY, "random")
    batch = device_batch(draws, jpegs)
    together = DeviceCrop(64, CPU)(batch)[0]
    for k in (0, 5, 12):
        seeded(k)
        alone = DeviceCrop(64, CPU)(default_collate([(draws(jpegs[k]), k, k, 0)]))[0]
        assert torch.equal(together[k], alone[0]), k
    small = gpu_decode.BUDGET
    try:  # a budget of a few images per pass: the same pixels
        gpu_decode.BUDGET = 3 * 3 * 140 * 160
        assert torch.equal(DeviceCrop(64, CPU)(batch)[0], together)
    finally:
        gpu_decode.BUDGET = small


def test_the_device_step_launches_as_many_ops_for_64_images_as_for_16() -> None:
    """Kernel launches per micro-batch must not grow with its images (decoding aside): aten ops counted by
    torch.profiler, as bench/device_step.py does; a per-image step would grow 4x here."""
    from bench.device_step import ops_per_batch, step

    jpegs = [photo(i, 120 + i, 96 + i) for i in range(64)]
    run = step(CPU, 48, gpu_decode=True)
    small, large = (ops_per_batch(run, device_batch(TrainDraws(48, POLICY, "random"), jpegs[:n])) for n in (16, 64))
    assert large <= 1.25 * small, (small, large)
    run = step(CPU, 48, gpu_decode=False)
    images = [(torch.zeros(n, 48, 48, 3, dtype=torch.uint8), torch.zeros(n), torch.arange(n)) for n in (16, 64)]
    assert ops_per_batch(run, images[1]) == ops_per_batch(run, images[0])  # normalise and erase


def test_the_device_step_train_step_and_evaluation_never_wait_for_the_device(synth_dir: Path, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """What would make a CUDA host wait (``HostSyncs``, on this CPU): none in a steady-state micro-batch of the device
    step (both paths) or of the loop's whole train_step, and in an evaluation only its final tally; a reintroduced
    per-batch copy (the sharpness kernel made from Python data, a blocking copy of the targets) is caught."""
    from bench.device_step import evaluation_syncs, host_syncs_per_batch, step, train_step_syncs
    from orchestrator.train import tasks

    jpegs = [photo(i, 120 + i, 96 + i) for i in range(64)]
    gpu = device_batch(TrainDraws(48, POLICY, "random"), jpegs)  # 64 images: several draw Sharpness
    cpu = (torch.zeros(16, 48, 48, 3, dtype=torch.uint8), torch.zeros(16), torch.arange(16))
    assert host_syncs_per_batch(step(CPU, 48, gpu_decode=True), gpu) == []
    assert host_syncs_per_batch(step(CPU, 48, gpu_decode=False), cpu) == []
    sets = ["ema.decay=0.99", "run.name=syncs"]  # the gpu path's device step is counted above; here the whole step
    assert train_step_syncs(smoke_recipe(tmp_path, synth_dir, *sets)) == []
    events, batches = evaluation_syncs(smoke_recipe(tmp_path, synth_dir, *sets, "batch.global_batch_size=16",
                                                    "batch.per_device_max=16"))
    assert events == ["tolist(): reads a device value on the host"] and batches == 5

    with monkeypatch.context() as m:  # the kernel made per micro-batch again
        m.setattr(gpu_decode, "_sharpness_kernel", lambda where: torch.tensor(
            [[1 / 13] * 3, [1 / 13, 5 / 13, 1 / 13], [1 / 13] * 3], device=where).expand(3, 1, 3, 3))
        assert "torch.tensor(..., device=...): a tensor from Python data copied to the device" in \
            host_syncs_per_batch(step(CPU, 48, gpu_decode=True), gpu)
    blocking = tasks.Classification.train_batch
    monkeypatch.setattr(tasks.Classification, "train_batch", lambda self, images, targets, *rest: blocking(
        self, images, targets.to(rest[-1].device), *rest))
    assert "to: a blocking copy to the device (non_blocking=False)" in \
        train_step_syncs(smoke_recipe(tmp_path, synth_dir, *sets))
