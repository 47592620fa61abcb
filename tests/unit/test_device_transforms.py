"""The device half of the input pipeline: normalisation as timm's, random erasing drawn as timm's
``RandomErasing`` but keyed per image, so it is the same on any world size and after a resume."""

from __future__ import annotations

import random

import pytest
import torch
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import functional as F

from orchestrator.data import device


def test_normalize_matches_to_tensor_and_normalize() -> None:
    images = torch.randint(0, 256, (4, 24, 32, 3), dtype=torch.uint8)
    timm = torch.stack([F.normalize(F.to_tensor(i.numpy()), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
                        for i in images])
    for channels_last in (False, True):
        ours = device.normalize(images, torch.device("cpu"), channels_last)
        assert ours.shape == (4, 3, 24, 32) and ours.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        torch.testing.assert_close(ours, timm, rtol=0, atol=1e-5)


def test_erasing_draws_timms_rectangles() -> None:
    timm = RandomErasing(probability=0.5, mode="pixel", max_count=1, device="cpu")
    erased = 0
    for key in range(400):
        img = torch.zeros(3, 40, 56)
        random.seed(key)
        timm(img)
        rows, cols = img.abs().sum(0).nonzero(as_tuple=True)
        theirs = None if len(rows) == 0 else (int(rows.min()), int(cols.min()), int(rows.max() - rows.min() + 1),
                                               int(cols.max() - cols.min() + 1))
        assert device.erase_box(random.Random(key), 0.5, 40, 56) == theirs
        erased += theirs is not None
    assert 150 < erased < 250


@pytest.mark.parametrize("batched", [False, True])  # the CPU's per-image draws; the GPU's keyed noise
def test_erasing_depends_on_the_image_key_only(batched: bool) -> None:
    """The same image erased alone or in another batch (another rank, another resume) gets the same rectangle
    and noise, in either memory format; the noise is N(0, 1)."""
    batch = torch.zeros(3, 3, 32, 32)
    device.random_erase(batch, [11, 12, 13], 1.0, batched)
    alone = torch.zeros(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    device.random_erase(alone, [12], 1.0, batched)
    assert torch.equal(batch[1], alone[0]) and alone.abs().sum() > 0
    assert not torch.equal(batch[0], batch[1])
    rows, cols = batch[1].abs().sum(0).nonzero(as_tuple=True)  # exactly the drawn rectangle
    top, left, h, w = device.erase_box(random.Random(12 + device.ERASE_SALT), 1.0, 32, 32)
    assert (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1) == (top, left, top + h, left + w)
    many = torch.zeros(64, 3, 32, 32)
    device.random_erase(many, list(range(64)), 1.0, batched)
    values = many[many != 0]
    assert abs(float(values.mean())) < 0.05 and abs(float(values.std()) - 1) < 0.05
    untouched = torch.zeros(2, 3, 32, 32)
    assert device.random_erase(untouched, [1, 2], 0.0, batched).abs().sum() == 0
