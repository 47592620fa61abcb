"""What runs on the training device: uint8 NHWC batches to normalised float NCHW, and random erasing.

As timm's CUDA prefetcher does, and on CPU too, so every device runs the same code. Random erasing
follows timm's ``RandomErasing`` (mode "pixel", one rectangle) draw for draw, but each image's draws
come from its own generator keyed by ``(seed, epoch, sample id)``: the same image is erased the
same way on any world size and after any resume. The rectangles are drawn on the host; the noise is
made on the device by a counter-based generator (a hash of the image's key and the element's place in
its rectangle), so a micro-batch is erased by a fixed handful of kernels, with no per-image copy.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

ERASE_SALT = 1 << 40  # keeps an image's erasing draws apart from its worker-side augmentation draws


def sample_seed(seed: int, epoch: int, sample_id: int) -> int:
    """The per-image seed of the augmentation, in the workers and here alike."""
    return (seed * 1_000_003 + epoch * 7919 + sample_id) & 0x7FFFFFFF


_CONSTANTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_inv_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device: a host-to-device copy per batch would wait for the device."""
    if device not in _CONSTANTS:
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1) * 255
        _CONSTANTS[device] = mean, 1 / (torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1) * 255)
    return _CONSTANTS[device]


def normalize(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 NHWC (from the loader) -> float32 NCHW on ``device``, ImageNet mean/std as timm's."""
    n, h, w, c = images.shape
    x = torch.empty((n, c, h, w), device=device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x.copy_(images.to(device, non_blocking=True).permute(0, 3, 1, 2))  # one pass: transpose and convert
    mean, inv_std = _mean_inv_std(device)
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
    "pixel" mode; ``keys`` are the images' ``sample_seed``s. The noise of an image depends on its key and
    its rectangle only (``keyed_normal``)."""
    if probability <= 0:
        return x
    n, c, height, width = x.shape
    boxes = np.zeros((n, 5))
    for i, key in enumerate(keys):
        box = erase_box(random.Random(key + ERASE_SALT), probability, height, width)
        boxes[i] = (*(box or (0, 0, 0, 0)), key + ERASE_SALT)
    if not boxes[:, 2].any():  # decided on the host: nothing to erase
        return x
    host = torch.from_numpy(boxes)
    p = (host.pin_memory() if x.device.type == "cuda" else host).to(x.device, non_blocking=True)
    top, left, h, w, key = (p[:, i].long().view(n, 1, 1, 1) for i in range(5))
    dy = torch.arange(height, device=x.device).view(1, 1, height, 1) - top
    dx = torch.arange(width, device=x.device).view(1, 1, 1, width) - left
    inside = (dy >= 0) & (dy < h) & (dx >= 0) & (dx < w)
    counter = (torch.arange(c, device=x.device).view(1, c, 1, 1) * h + dy) * w + dx
    return x.copy_(torch.where(inside, keyed_normal(key, counter).to(x.dtype), x))


_M32 = 0xFFFFFFFF


def _hash32(v: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) on int64 tensors holding values below 2**32."""
    v = v ^ (v >> 16)
    v = (v * 0x7FEB352D) & _M32
    v = v ^ (v >> 15)
    v = (v * 0x846CA68B) & _M32
    return v ^ (v >> 16)


def keyed_normal(key: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """Standard normal float32 noise that is a function of (``key``, ``counter``) alone (int64 tensors,
    broadcast together): Box-Muller on two hashed 32-bit uniforms. Any device, any batch, the same values."""
    seed = _hash32((key & _M32) ^ _hash32((key >> 32) & _M32))
    counter = (counter & _M32) * 2
    u1 = (_hash32(seed ^ _hash32(counter & _M32)).float() + 1) * 2.0**-32
    u2 = _hash32(seed ^ _hash32((counter + 1) & _M32)).float() * 2.0**-32
    return torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
