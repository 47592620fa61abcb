"""The device half of the input pipeline: normalisation as timm's, random erasing drawn as timm's
``RandomErasing`` but keyed per image, so it is the same on any world size and after a resume."""

from __future__ import annotations

import random

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


def test_erasing_depends_on_the_image_key_only() -> None:
    """The same image erased alone or in another batch (another rank, another resume) gets the same rectangle."""
    batch = torch.zeros(3, 3, 32, 32)
    device.random_erase(batch, [11, 12, 13], 1.0)
    alone = torch.zeros(1, 3, 32, 32)
    device.random_erase(alone, [12], 1.0)
    assert torch.equal(batch[1], alone[0]) and alone.abs().sum() > 0
    assert not torch.equal(batch[0], batch[1])
    untouched = torch.zeros(2, 3, 32, 32)
    assert device.random_erase(untouched, [1, 2], 0.0).abs().sum() == 0
