"""``data.decode: gpu``: JPEG decode, crop, resize, flip and RandAugment on the training device.

The workers make every random draw exactly as the CPU path does (timm's crop box and interpolation, the
flip, RandAugment's ops, levels and interpolations, keyed per sample), record them instead of applying
them, and ship the JPEG undecoded (``TrainDraws``). ``DeviceCrop`` then decodes a whole micro-batch on the
training device with torchvision's ``decode_jpeg`` (nvJPEG on CUDA; libjpeg-turbo on a CPU device, which
is how the tests run this path) and replays the draws with tensor ops. The distribution is the CPU
path's draw for draw; the pixels are close to it, not equal: resizing and the geometric ops interpolate
in float (``grid_sample``'s bicubic is a = -0.75, Pillow's a = -1), and the colour ops are
torchvision's versions of Pillow's (the same formulas, rounded differently). The CPU path stays the
reference and the default.

What the device cannot decode is handled as on the CPU: images that are not plain JPEGs (PNG, CMYK)
are decoded by Pillow in the worker and shipped as pixels; a JPEG that fails to decode is replaced by
the good image before it in its micro-batch (its draws, label and id too) and counted as corrupt.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from timm.data import auto_augment
from torchvision.io import ImageReadMode, decode_jpeg

from orchestrator.data import randaugment, transforms
from orchestrator.data.randaugment import GEOMETRIC, RandAugmentDraws
from orchestrator.errors import DataError, RecipeError

log = logging.getLogger(__name__)

JPEG, PIXELS = 0, 1  # payload kinds
HEAD = 9  # kind, height, width, top, left, h, w, bicubic, flip; then (op, level, bicubic) per RandAugment layer


def _pillow_matrix(op: Callable[..., Any], level: float, width: int, height: int) -> tuple[float, ...]:
    """The output-to-input affine matrix Pillow applies for a geometric op (as in timm's and Pillow's code)."""
    if op is auto_augment.rotate:  # Pillow's rotate about the centre
        rad = -math.radians(level % 360.0)
        a, b, d, e = math.cos(rad), math.sin(rad), -math.sin(rad), math.cos(rad)
        cx, cy = width / 2, height / 2
        return a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy
    return randaugment.MATRICES[op](width, height, level)


def _warp(img: torch.Tensor, matrix: tuple[float, ...], bicubic: bool, fill: torch.Tensor) -> torch.Tensor:
    """Pillow's affine transform of a uint8 CHW image, by ``grid_sample``: the same geometry (pixel centres
    mapped by ``matrix``, edges clamped, ``fill`` where the source point lies outside), float interpolation."""
    _, h, w = img.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=img.device, dtype=torch.float32) + 0.5,
                            torch.arange(w, device=img.device, dtype=torch.float32) + 0.5, indexing="ij")
    a = matrix
    xin, yin = a[0] * xs + a[1] * ys + a[2], a[3] * xs + a[4] * ys + a[5]
    grid = torch.stack((2 * xin / w - 1, 2 * yin / h - 1), dim=-1)[None]
    out = F.grid_sample(img[None].float(), grid, mode="bicubic" if bicubic else "bilinear", padding_mode="border",
                        align_corners=False)[0]
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    return torch.where(inside, out.round().clamp(0, 255), fill.view(-1, 1, 1)).to(torch.uint8)


def _posterize(img: torch.Tensor, bits: int) -> torch.Tensor:
    """``randaugment.posterize``: 0 bits or fewer keep nothing."""
    return img if bits >= 8 else torch.zeros_like(img) if bits <= 0 else TF.posterize(img, int(bits))


def _solarize_add(img: torch.Tensor, add: int, thresh: int = 128) -> torch.Tensor:
    return torch.where(img < thresh, (img.int() + add).clamp(0, 255).to(torch.uint8), img)


# timm's op functions -> the same op on a uint8 CHW tensor, given the op's level.
COLOUR_OPS: dict[Callable[..., Any], Callable[[torch.Tensor, float], torch.Tensor]] = {
    auto_augment.auto_contrast: lambda img, _: TF.autocontrast(img),
    auto_augment.equalize: lambda img, _: TF.equalize(img),
    auto_augment.invert: lambda img, _: TF.invert(img),
    randaugment.posterize: lambda img, bits: _posterize(img, int(bits)),
    auto_augment.posterize: lambda img, bits: _posterize(img, int(bits)),
    auto_augment.solarize: lambda img, thresh: TF.solarize(img, int(thresh)),
    auto_augment.solarize_add: lambda img, add: _solarize_add(img, int(add)),
    auto_augment.color: lambda img, factor: TF.adjust_saturation(img, factor),
    auto_augment.contrast: lambda img, factor: TF.adjust_contrast(img, factor),
    auto_augment.brightness: lambda img, factor: TF.adjust_brightness(img, factor),
    auto_augment.sharpness: lambda img, factor: TF.adjust_sharpness(img, factor),
}
DEVICE_OPS = (*GEOMETRIC, *COLOUR_OPS)  # an op's place here is its id in the draws


class TrainDraws:
    """Worker side: bytes -> (payload bytes, draws), making ``TrainCrop``'s draws in its order."""

    def __init__(self, size: int, auto_augment_policy: str | None, interpolation: str, hflip: float = 0.5) -> None:
        self.crop = transforms.TrainCrop(size, None, interpolation, hflip=hflip)
        self.randaugment = RandAugmentDraws(auto_augment_policy, size, interpolation) if auto_augment_policy else None
        for fn in self.randaugment.functions if self.randaugment else ():
            if fn not in DEVICE_OPS:
                raise RecipeError(f"data.decode: gpu has no device version of RandAugment's {fn.__name__} "
                                  "(augment.auto_augment); use data.decode: cpu")

    def __call__(self, data: bytes) -> tuple[bytes, torch.Tensor]:
        header = transforms.jpeg_size(data)
        if header is None:  # not a plain JPEG: Pillow decodes it here, as the CPU path does
            pixels = np.array(transforms.open_rgb(data))
            kind, (height, width), data = PIXELS, pixels.shape[:2], pixels.tobytes()
        else:
            kind, (height, width) = JPEG, header
        top, left, h, w, mode = self.crop.box(height, width)
        flip = bool(torch.rand(1) < self.crop.hflip)
        ops: list[float] = []
        if self.randaugment is not None:
            for fn, level, kwargs in self.randaugment():
                ops += [DEVICE_OPS.index(fn), float(level[0]) if level else 0.0,
                        fn in GEOMETRIC and kwargs["resample"] == Image.Resampling.BICUBIC]
            ops += [-1, 0, 0] * (self.randaugment.layers - len(ops) // 3)
        draws = [kind, height, width, top, left, h, w, mode == "bicubic", flip, *ops]
        return data, torch.tensor(draws, dtype=torch.float64)


class DeviceCrop:
    """Device side: a micro-batch of ``TrainDraws`` outputs -> uint8 NHWC images on ``device``."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.size, self.device = size, device
        self.fill = torch.tensor(randaugment.randaugment_params(size, "random")["img_mean"], dtype=torch.float32,
                                 device=device)

    def __call__(self, batch: Any) -> Any:
        (payloads, draws), targets, ids, corrupt = batch
        images = self.decode(payloads, draws)
        good = [k for k, img in enumerate(images) if img is not None]
        if not good:
            raise DataError(f"a whole micro-batch failed to decode on {self.device} (sample ids {ids.tolist()})")
        targets, ids, corrupt = targets.clone(), ids.clone(), corrupt.clone()
        for k in set(range(len(images))) - set(good):  # as the reader: the good image before it, or the first
            g = max((j for j in good if j < k), default=good[0])
            log.warning("sample %d did not decode on %s: replaced by sample %d", int(ids[k]), self.device, int(ids[g]))
            images[k], draws[k], targets[k], ids[k], corrupt[k] = images[g], draws[g], targets[g], ids[g], 1
        out = torch.stack([self.apply(img, d) for img, d in zip(images, draws.tolist(), strict=True)])
        return out.permute(0, 2, 3, 1), targets, ids, corrupt

    def decode(self, payloads: tuple[bytes, ...], draws: torch.Tensor) -> list[torch.Tensor | None]:
        """Every image as uint8 CHW on the device (None where it does not decode); the JPEGs in one batched call."""
        images: list[torch.Tensor | None] = [None] * len(payloads)
        jpegs = [k for k in range(len(payloads)) if draws[k, 0] == JPEG]
        for k in set(range(len(payloads))) - set(jpegs):
            h, w = int(draws[k, 1]), int(draws[k, 2])
            images[k] = torch.frombuffer(bytearray(payloads[k]), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1).to(self.device)
        data = [torch.frombuffer(bytearray(payloads[k]), dtype=torch.uint8) for k in jpegs]
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device) if data else []
        except RuntimeError:  # one bad image fails the batch: find it
            decoded = [self._decode_one(d) for d in data]
        for k, img in zip(jpegs, decoded, strict=True):
            images[k] = img
        return images

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return None

    def apply(self, img: torch.Tensor, draws: list[float]) -> torch.Tensor:
        """Crop, resize, flip and the recorded RandAugment ops, in the CPU path's order."""
        top, left, h, w, bicubic, flip = (int(v) for v in draws[3:HEAD])
        crop = img[None, :, top:top + h, left:left + w].float()
        out = F.interpolate(crop, size=(self.size, self.size), mode="bicubic" if bicubic else "bilinear",
                            antialias=True, align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        if flip:
            out = out.flip(-1)
        for i in range(HEAD, len(draws), 3):
            index, level, op_bicubic = int(draws[i]), draws[i + 1], bool(draws[i + 2])
            if index < 0:
                break
            fn = DEVICE_OPS[index]
            if fn in GEOMETRIC:
                out = _warp(out, _pillow_matrix(fn, level, self.size, self.size), op_bicubic, self.fill)
            else:
                out = COLOUR_OPS[fn](out, level)
        return out
