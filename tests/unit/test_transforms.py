"""Transforms: timm's recipe, and Pillow 13's posterize range never kills a run."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from timm.data.auto_augment import NAME_TO_OP, rand_augment_transform

from orchestrator.data.randaugment import posterize
from orchestrator.data.transforms import (
    EvalCrop,
    TrainCrop,
    open_rgb,
    timm_eval_transform,
    timm_train_transform,
)


def test_pillow_rejects_zero_bits_which_timm_can_request() -> None:
    with pytest.raises(ValueError):
        ImageOps.posterize(Image.new("RGB", (4, 4)), 0)  # the upstream failure this module guards against


def test_zero_bits_posterize_keeps_no_bits() -> None:
    img = Image.new("RGB", (4, 4), (200, 100, 50))
    assert NAME_TO_OP["PosterizeIncreasing"] is posterize
    assert posterize(img, 0).getpixel((0, 0)) == (0, 0, 0)
    assert posterize(img, 3).getpixel((0, 0)) == (192, 96, 32)


def test_paper_randaugment_never_raises_over_a_long_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """About 3 in 1000 images ask for 0 bits at rand-m9-mstd0.5-inc1; the run must pass through them."""
    zero_bit_calls = []

    def counting(img: Image.Image, bits: int, **kw: object) -> Image.Image:
        zero_bit_calls.append(bits <= 0)
        return posterize(img, bits, **kw)

    monkeypatch.setitem(NAME_TO_OP, "PosterizeIncreasing", counting)
    aug = rand_augment_transform("rand-m9-mstd0.5-inc1", {"translate_const": 10, "img_mean": (124, 116, 104)})
    random.seed(0)
    np.random.seed(0)
    rng = np.random.default_rng(0)
    for _ in range(4000):
        aug(Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)))
    assert sum(zero_bit_calls) > 0, "the run must have exercised the 0-bit case"


def jpeg(width: int, height: int, seed: int = 0, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8))
    out = io.BytesIO()
    small.resize((width, height), Image.BICUBIC).save(out, format=fmt)
    return out.getvalue()


def test_train_and_eval_crops_give_uint8_images_of_the_recipe_size() -> None:
    for data in (jpeg(80, 60), jpeg(80, 60, fmt="PNG"), jpeg(1200, 900)):
        t = TrainCrop(48, "rand-m9-mstd0.5-inc1", "random")(data)
        e = EvalCrop(48, 0.875, "bicubic")(data)
        assert t.shape == e.shape == (48, 48, 3) and t.dtype == e.dtype == torch.uint8


def test_crop_boxes_flips_and_randaugment_ops_are_drawn_as_timms() -> None:
    """Seeded alike, this pipeline and timm's draw the same box, interpolation, flip and ops, image for image."""
    from timm.data.auto_augment import AugmentOp

    ours = TrainCrop(224, "rand-m9-mstd0.5-inc1", "random")
    rrc, flip, aa, *_ = timm_train_transform(224, "rand-m9-mstd0.5-inc1", 0.25, "random").transforms
    applied: list[str] = []
    original = AugmentOp.__call__

    def recording(op: AugmentOp, img: Image.Image) -> Image.Image:
        out = original(op, img)
        applied.append(op.name if out is not img else "-")
        return out

    tiny = Image.new("RGB", (8, 8))
    draws: dict[str, list[tuple]] = {"ours": [], "timm": []}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AugmentOp, "__call__", recording)
        for seed in range(2000):
            height, width = 300 + seed % 200, 500 - seed % 150
            for side in ("ours", "timm"):
                random.seed(seed)
                np.random.seed(seed)
                torch.manual_seed(seed)
                applied.clear()
                if side == "ours":
                    box = ours.box(height, width)
                    flipped = bool(torch.rand(1) < 0.5)
                    ops = ours.randaugment()  # drawn, not applied: the functions timm would call
                    applied[:] = [fn.__name__ for fn, *_ in ops]
                else:
                    box = (*rrc.get_params(_blank(width, height), rrc.scale, rrc.ratio),
                           random.choice(rrc.interpolation).value)
                    flipped = bool(torch.rand(1) < flip.p)
                    aa(tiny)
                    applied[:] = [NAME_TO_OP[name].__name__ for name in applied if name != "-"]
                draws[side].append((*box, flipped, tuple(applied)))
    assert draws["ours"] == draws["timm"]
    areas = [h * w / (300 + s % 200) / (500 - s % 150) for s, (_, _, h, w, *_r) in enumerate(draws["ours"])]
    assert 0.45 < float(np.mean(areas)) < 0.6  # scale (0.08, 1) drawn, not a constant box
    ops = {name for d in draws["ours"] for name in d[6]}
    assert len(ops) >= 15  # every RandAugment op was exercised


def _blank(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height))


def test_large_photos_decode_at_a_reduced_scale_that_still_covers_the_crop() -> None:
    crop = TrainCrop(160, None, "bilinear")
    random.seed(1)
    img, (top, left, h, w) = crop._decode_box(jpeg(1600, 1200), (1200, 1600), (100, 200, 800, 1000))
    assert img.shape[:2] == (300, 400)  # 1/4: the 800 x 1000 box is 200 x 250 there, still >= 160 (1/8 is not)
    assert (top, left, h, w) == (25, 50, 200, 250)


def test_eval_crop_matches_timms_eval_transform() -> None:
    data = jpeg(400, 300, seed=3)
    ours = EvalCrop(96, 0.875, "bicubic")(data).permute(2, 0, 1).float()
    normalised = timm_eval_transform(96, 0.875, "bicubic")(open_rgb(data))
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    pixels = (normalised * std + mean) * 255
    assert ours.shape == pixels.shape and (ours - pixels).abs().mean() < 1.0


def test_the_normalisation_constants_are_timms() -> None:
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from orchestrator.data import device

    assert (device.IMAGENET_DEFAULT_MEAN, device.IMAGENET_DEFAULT_STD) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
