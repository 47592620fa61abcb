"""What runs on the training device: uint8 NHWC batches to normalised float NCHW, and random erasing.

As timm's CUDA prefetcher does, and on CPU too, so every device runs the same code. Random erasing
follows timm's ``RandomErasing`` (mode "pixel", one rectangle) draw for draw, but each image's draws
come from its own generator keyed by ``(seed, epoch, sample id)``: the same image is erased the
same way on any world size and after any resume.
"""

from __future__ import annotations

import math
import random

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

ERASE_SALT = 1 << 40  # keeps an image's erasing draws apart from its worker-side augmentation draws


def sample_seed(seed: int, epoch: int, sample_id: int) -> int:
    """The per-image seed of the augmentation, in the workers and here alike."""
    return (seed * 1_000_003 + epoch * 7919 + sample_id) & 0x7FFFFFFF


def normalize(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 NHWC (from the loader) -> float32 NCHW on ``device``, ImageNet mean/std as timm's."""
    n, h, w, c = images.shape
    x = torch.empty((n, c, h, w), device=device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x.copy_(images.to(device, non_blocking=True).permute(0, 3, 1, 2))  # one pass: transpose and convert
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1) * 255
    inv_std = 1 / (torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1) * 255)
    return x.sub_(mean).mul_(inv_std)


def erase_box(rng: random.Random, probability: float, height: int, width: int,
              min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3) -> tuple[int, int, int, int] | None:
    """timm's ``RandomErasing._erase`` draws (count 1): (top, left, h, w) of the rectangle, or None."""
    if rng.random() > probability:
        return None
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(10):
        target_area = rng.uniform(min_area, max_area) * height * width
        aspect = math.exp(rng.uniform(*log_aspect))
        h, w = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if w < width and h < height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    return None


def random_erase(x: torch.Tensor, keys: list[int], probability: float) -> torch.Tensor:
    """Erase one rectangle per image with ``probability`` (in place), filled with N(0, 1) noise as timm's
    "pixel" mode; ``keys`` are the images' ``sample_seed``s."""
    if probability <= 0:
        return x
    _, c, height, width = x.shape
    for i, key in enumerate(keys):
        rng = random.Random(key + ERASE_SALT)
        box = erase_box(rng, probability, height, width)
        if box is not None:
            top, left, h, w = box
            noise = torch.randn((c, h, w), generator=torch.Generator().manual_seed(key + ERASE_SALT))
            x[i, :, top:top + h, left:left + w] = noise.to(x.device, x.dtype)
    return x
