"""The compiled shear/translate ops give Pillow's pixels to the bit, and RandAugment stays timm's."""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image
from timm.data import auto_augment

from orchestrator.data.affine import FAST_OPS, affine
from orchestrator.data.transforms import TrainCrop, timm_train_transform

FILTERS = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)


@pytest.mark.parametrize("timm_op", list(FAST_OPS), ids=lambda f: f.__name__)
def test_each_op_gives_pillows_pixels_and_draws_as_timm(timm_op: Callable[..., Image.Image]) -> None:
    """Random sizes (1 to 80 px, where the edge rules matter most), levels past timm's range, both
    filters, with and without a fill colour; the random interpolation is drawn as timm draws it."""
    rng = np.random.default_rng(zlib.crc32(timm_op.__name__.encode()))
    for case in range(300):
        h, w = (int(v) for v in rng.integers(1, 81, 2))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        level = float(rng.uniform(-0.7, 0.7) if "abs" not in timm_op.__name__ else rng.uniform(-90, 90))
        kwargs = {"resample": FILTERS, "fillcolor": None if case % 4 == 0 else tuple(int(c) for c in rng.integers(0, 256, 3))}
        random.seed(case)
        expected = timm_op(img, level, **kwargs)
        after_timm = random.random()
        random.seed(case)
        got = FAST_OPS[timm_op](img, level, **kwargs)
        assert random.random() == after_timm, "the op must draw the interpolation as timm's does"
        assert got.size == expected.size and np.array_equal(np.asarray(got), np.asarray(expected)), (
            f"{timm_op.__name__} level={level} size={w}x{h} {kwargs}")


def test_photo_sized_images_match_pillow_for_every_matrix_kind() -> None:
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))
    for matrix in ((1, 0.3, 0, 0, 1, 0), (1, 0, -67.2, 0, 1, 0), (1, 0, 0, -0.3, 1, 0), (1, 0, 0, 0, 1, 100.5)):
        for resample in FILTERS:
            expected = img.transform(img.size, Image.Transform.AFFINE, matrix, resample, fillcolor=(124, 116, 104))
            assert np.array_equal(np.asarray(affine(img, matrix, resample, (124, 116, 104))), np.asarray(expected))


def test_what_the_kernels_do_not_cover_goes_to_pillow() -> None:
    rng = np.random.default_rng(2)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    for img, matrix, resample, fill in (
        (rgb.convert("L"), (1, 0.2, 0, 0, 1, 0), Image.Resampling.BICUBIC, 7),  # another mode
        (rgb, (1, 0.2, 0, 0, 1, 0), Image.Resampling.NEAREST, None),  # another filter
        (rgb, (0.9, 0.2, 1, -0.2, 0.9, 2), Image.Resampling.BILINEAR, (1, 2, 3)),  # a rotation
        (rgb, (1, 0, 3.5, 0, 1, 0), Image.Resampling.BILINEAR, "red"),  # a colour name
    ):
        expected = img.transform(img.size, Image.Transform.AFFINE, matrix, resample, fillcolor=fill)
        assert np.array_equal(np.asarray(affine(img, matrix, resample, fill)), np.asarray(expected))


def test_train_crops_randaugment_gives_timms_images() -> None:
    """The paper's RandAugment through TrainCrop and timm's own, seeded alike: the same pixels."""
    ours = TrainCrop(48, "rand-m9-mstd0.5-inc1", "random").augment
    timm_aa = timm_train_transform(48, "rand-m9-mstd0.5-inc1", 0.25, "random").transforms[2]
    replaced = [op for op in ours.ops if op.aug_fn is not auto_augment.NAME_TO_OP[op.name]]
    assert {op.name for op in replaced} == {"ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
    rng = np.random.default_rng(3)
    for seed in range(400):
        img = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
        outs = []
        for aug in (ours, timm_aa):
            random.seed(seed)
            np.random.seed(seed)
            outs.append(np.asarray(aug(img)))
        assert np.array_equal(*outs), f"seed {seed}"
