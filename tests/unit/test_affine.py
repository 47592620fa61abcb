"""The compiled shear/translate give Pillow's pixels to the bit; RandAugment drawn then applied stays timm's."""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from orchestrator.data.affine import affine_array
from orchestrator.data.randaugment import MATRICES, RandAugmentDraws, apply
from orchestrator.data.transforms import TrainCrop, timm_train_transform

FILTERS = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)


def pillow(src: np.ndarray, matrix: tuple[float, ...], resample: int, fill: object) -> np.ndarray:
    img = Image.fromarray(src)
    return np.asarray(img.transform(img.size, Image.Transform.AFFINE, matrix, resample, fillcolor=fill))


@pytest.mark.parametrize("timm_op", list(MATRICES), ids=lambda f: f.__name__)
def test_each_op_gives_pillows_pixels(timm_op: Callable[..., Image.Image]) -> None:
    """Random sizes (1 to 80 px, where the edge rules matter most), levels past timm's range, both
    filters, with and without a fill colour: timm's op on Pillow and ``apply`` give the same bytes."""
    rng = np.random.default_rng(zlib.crc32(timm_op.__name__.encode()))
    for case in range(300):
        h, w = (int(v) for v in rng.integers(1, 81, 2))
        src = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        level = float(rng.uniform(-0.7, 0.7) if "abs" not in timm_op.__name__ else rng.uniform(-90, 90))
        kwargs = {
            "resample": FILTERS[case % 2],
            "fillcolor": None if case % 4 == 0 else tuple(int(c) for c in rng.integers(0, 256, 3)),
        }
        expected = np.asarray(timm_op(Image.fromarray(src), level, **kwargs))
        got = apply(src, [(timm_op, (level,), kwargs)])
        assert got.shape == expected.shape and np.array_equal(got, expected), (
            f"{timm_op.__name__} level={level} size={w}x{h} {kwargs}"
        )


def test_photo_sized_images_match_pillow_for_every_matrix_kind() -> None:
    src = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    for matrix in ((1, 0.3, 0, 0, 1, 0), (1, 0, -67.2, 0, 1, 0), (1, 0, 0, -0.3, 1, 0), (1, 0, 0, 0, 1, 100.5)):
        for resample in FILTERS:
            expected = pillow(src, matrix, resample, (124, 116, 104))
            assert np.array_equal(affine_array(src, matrix, resample, (124, 116, 104)), expected)


def test_what_the_kernels_do_not_cover_goes_to_pillow() -> None:
    src = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for matrix, resample, fill in (
        ((1, 0.2, 0, 0, 1, 0), Image.Resampling.NEAREST, None),  # another filter
        ((0.9, 0.2, 1, -0.2, 0.9, 2), Image.Resampling.BILINEAR, (1, 2, 3)),  # a rotation
        ((1, 0, 3.5, 0, 1, 0), Image.Resampling.BILINEAR, "red"),  # a colour name
    ):
        assert np.array_equal(affine_array(src, matrix, resample, fill), pillow(src, matrix, resample, fill))


def test_drawn_then_applied_randaugment_gives_timms_images() -> None:
    """The paper's RandAugment drawn by ``RandAugmentDraws`` and applied by ``apply``, and timm's own, seeded
    alike: the same pixels, and the same RNG state after (so the next image draws alike too)."""
    ours = RandAugmentDraws("rand-m9-mstd0.5-inc1", 48, "random")
    timm_aa = timm_train_transform(48, "rand-m9-mstd0.5-inc1", 0.25, "random").transforms[2]
    rng = np.random.default_rng(3)
    kinds = set()
    for seed in range(400):
        src = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
        random.seed(seed)
        np.random.seed(seed)
        ops = ours()
        got, after = apply(src, ops), (random.random(), np.random.random())
        kinds.update(fn.__name__ for fn, *_ in ops)
        random.seed(seed)
        np.random.seed(seed)
        expected = np.asarray(timm_aa(Image.fromarray(src)))
        assert np.array_equal(got, expected), f"seed {seed}: {[fn.__name__ for fn, *_ in ops]}"
        assert after == (random.random(), np.random.random())
    assert len(kinds) >= 13  # the fast path and Pillow's ops were both exercised
    assert TrainCrop(48, "rand-m9-mstd0.5-inc1", "random").randaugment is not None
