"""Transforms: timm's recipe, and Pillow 13's posterize range never kills a run."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from timm.data.auto_augment import NAME_TO_OP, rand_augment_transform

from orchestrator.data.transforms import eval_transform, posterize, train_transform


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


def test_train_and_eval_transforms_give_the_recipe_size() -> None:
    img = Image.new("RGB", (80, 60), (10, 200, 30))
    t = train_transform(48, "rand-m9-mstd0.5-inc1", 0.25, "random")(img)
    e = eval_transform(48, 0.875, "bicubic")(img)
    assert t.shape == e.shape == torch.Size([3, 48, 48])
