"""What runs on the training device: uint8 NHWC batches to normalised float NCHW, and random erasing.

As timm's CUDA prefetcher does, and on CPU too, so every device runs the same code. Random erasing
follows timm's ``RandomErasing`` (mode "pixel", one rectangle) draw for draw, but each image's draws
come from its own generator keyed by ``(seed, epoch, sample id)``: the same image is erased the
same way on any world size and after any resume. The rectangles are drawn on the host; on a GPU the
noise is made on the device by a counter-based generator (a hash of the image's key and the element's
place in its rectangle), so a micro-batch is erased by a fixed handful of kernels, with no per-image copy.
"""

from __future__ import annotations

import math
import random

import torch

from orchestrator.data.host_syncs import HostSyncs

# timm's IMAGENET_DEFAULT_MEAN and _STD (tests/unit/test_transforms.py checks them against timm's). Not imported
# from timm: importing any of timm loads its models and torchvision, seconds of every command's startup.
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

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


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` (made on the host, so pageable) on ``device`` without the host waiting: pinned first on CUDA, then an
    asynchronous copy. ``host_syncs.HostSyncs`` takes this path on the CPU too, to check it."""
    if device.type == "cuda" or HostSyncs.active:
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


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


def random_erase(x: torch.Tensor, keys: list[int], probability: float, batched: bool | None = None) -> torch.Tensor:
    """Erase one rectangle per image with ``probability`` (in place), filled with N(0, 1) noise as timm's
    "pixel" mode; ``keys`` are the images' ``sample_seed``s. An image's noise depends on its key and its
    rectangle only. ``batched`` (default: on a GPU) makes the noise with ``keyed_normal`` for all erased
    images at once, a fixed handful of kernels per micro-batch; otherwise (the CPU, where a kernel is a
    function call and hashing costs more than drawing) each rectangle is drawn from the image's own
    generator. The two give different noise values, of the same distribution."""
    if probability <= 0:
        return x
    _, c, height, width = x.shape
    boxes = []
    for i, key in enumerate(keys):
        box = erase_box(random.Random(key + ERASE_SALT), probability, height, width)
        if box is not None:
            boxes.append((i, *box, key + ERASE_SALT))
    if not boxes:  # decided on the host: nothing to erase
        return x
    if not (x.device.type == "cuda" if batched is None else batched):
        for i, top, left, h, w, key in boxes:
            noise = torch.randn((c, h, w), generator=torch.Generator().manual_seed(key))
            x[i, :, top:top + h, left:left + w] = noise.to(x.device, x.dtype)
        return x
    _scatter_keyed_noise(x, boxes)
    return x


def _scatter_keyed_noise(x: torch.Tensor, boxes: list[tuple[int, ...]]) -> None:
    """``keyed_normal`` noise into each (index, top, left, h, w, key) rectangle of ``x``: one window of the
    largest rectangle's size per erased image, scattered into place (positions past an image's own rectangle
    repeat its edge, so they write the same value twice)."""
    c = x.shape[1]
    host = torch.tensor(boxes, dtype=torch.float64)
    hmax, wmax = int(host[:, 3].max()), int(host[:, 4].max())
    p = to_device(host, x.device)
    index, top, left, h, w, key = (p[:, i].long().view(-1, 1, 1, 1) for i in range(6))
    dy = torch.minimum(torch.arange(hmax, device=x.device).view(1, 1, hmax, 1), h - 1)
    dx = torch.minimum(torch.arange(wmax, device=x.device).view(1, 1, 1, wmax), w - 1)
    channel = torch.arange(c, device=x.device).view(1, c, 1, 1)
    noise = keyed_normal(key, (channel * h + dy) * w + dx).to(x.dtype)
    s = x.stride()
    target = index * s[0] + channel * s[1] + (top + dy) * s[2] + (left + dx) * s[3]
    flat = x.as_strided((x.numel(),), (1,))  # dense (contiguous or channels_last): strides index its storage
    flat.index_put_((target.reshape(-1),), noise.reshape(-1))


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
    first = _hash32(seed ^ ((counter * 0x9E3779B1) & _M32))
    second = _hash32(first ^ 0x85EBCA6B)
    u1 = (first.float() + 1) * 2.0**-32
    u2 = second.float() * 2.0**-32
    return torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
