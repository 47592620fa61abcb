"""Training and evaluation transforms: encoded image bytes in, a uint8 HWC tensor out.

The reader's workers run ``TrainCrop``/``EvalCrop``; normalisation and random erasing run on the
training device (``orchestrator.data.device``), as timm's prefetcher does on CUDA. What differs from
timm's ``create_transform`` pipeline, and why (each step keeps timm's distribution):

- The RandomResizedCrop box (and the random interpolation) is drawn by timm's own ``get_params`` from
  the JPEG header's size, before decoding; flip and RandAugment are timm's own ops, drawn in timm's
  order, so a seeded draw gives timm's box, flip and ops exactly (tests compare them).
- JPEGs decode with libjpeg-turbo (simplejpeg), at the smallest DCT scale (1/2, 1/4, 1/8) whose
  decoded box still covers the output size, so a large photo is never decoded at full size.
- The crop is resized by torch's antialiased uint8 resampling (the same bilinear/bicubic kernels as
  Pillow's, 4x faster here).
- RandAugment's ops are drawn first, then applied (``randaugment``): timm's pixels, with shear and
  translate compiled and Pillow used only by the ops that need it.
- No float conversion in the workers: a uint8 image is 4x less to pass between processes.

Other formats (PNG, CMYK JPEG, ...) take Pillow's decoder and the same steps.
"""

from __future__ import annotations

import io
import math
import random
from typing import Any

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import ColorJitter

from orchestrator.data.randaugment import RandAugmentDraws, apply

SCALE, RATIO = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)  # timm's RandomResizedCrop defaults
MODES = ("bilinear", "bicubic")  # timm's "random" interpolation draws one of these


def open_rgb(data: bytes) -> Image.Image:
    """Pillow's decode, any format, as RGB."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() copies even when the mode matches


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG that libjpeg-turbo decodes to RGB directly, else None."""
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (h, w) if colorspace in ("Gray", "YCbCr", "RGB") else None


def resize_hwc(hwc: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """uint8 HWC -> uint8 HWC at ``size`` (h, w), antialiased (Pillow's kernels)."""
    # Channels-last in (a copy of just the crop) takes torch's vectorised uint8 path and comes out HWC.
    x = hwc.permute(2, 0, 1).unsqueeze(0).contiguous(memory_format=torch.channels_last)
    return F.interpolate(x, size=size, mode=mode, antialias=True)[0].permute(1, 2, 0)


def _shape_only(height: int, width: int) -> torch.Tensor:
    """What ``get_params`` reads of an image, its size, as a tensor that holds no pixels."""
    return torch.empty((1, 1, 1), dtype=torch.uint8).expand(1, height, width)


class TrainCrop:
    """RandomResizedCrop + flip + RandAugment (or colour jitter): bytes -> uint8 HWC ``size x size``."""

    def __init__(self, size: int, auto_augment_policy: str | None, interpolation: str,
                 color_jitter: float | None = None, hflip: float = 0.5) -> None:
        self.size, self.hflip = size, hflip
        self.modes = MODES if interpolation == "random" else (interpolation,)
        if self.modes[0] not in MODES:
            raise ValueError(f"train interpolation {interpolation!r}: expected random, bilinear or bicubic")
        self.randaugment = RandAugmentDraws(auto_augment_policy, size, interpolation) if auto_augment_policy else None
        self.jitter = ColorJitter(*(color_jitter,) * 3) if color_jitter and not auto_augment_policy else None

    def box(self, height: int, width: int) -> tuple[int, int, int, int, str]:
        """timm's crop box (top, left, h, w) and interpolation, drawn as timm draws them."""
        top, left, h, w = RandomResizedCropAndInterpolation.get_params(_shape_only(height, width), SCALE, RATIO)
        mode = random.choice(self.modes) if len(self.modes) > 1 else self.modes[0]
        return top, left, h, w, mode

    def __call__(self, data: bytes) -> torch.Tensor:
        header = jpeg_size(data)
        if header is None:
            img = torch.from_numpy(np.array(open_rgb(data)))
            top, left, h, w, mode = self.box(*img.shape[:2])
        else:
            top, left, h, w, mode = self.box(*header)
            img, (top, left, h, w) = self._decode_box(data, header, (top, left, h, w))
        out = resize_hwc(img[top:top + h, left:left + w], (self.size, self.size), mode)
        if torch.rand(1) < self.hflip:  # torchvision's RandomHorizontalFlip draw
            out = out.flip(1)
        if self.randaugment is not None:
            out = torch.from_numpy(apply(out.numpy(), self.randaugment()))
        elif self.jitter is not None:
            out = torch.from_numpy(np.array(self.jitter(Image.fromarray(out.numpy()))))
        return out.contiguous()

    def _decode_box(self, data: bytes, header: tuple[int, int], box: tuple[int, int, int, int]
                    ) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """Decode at the smallest DCT scale whose box still covers the output; the box in that scale."""
        height, width = header
        top, left, h, w = box
        factor = 1  # powers of two only: libjpeg-turbo's M/8 scales are slower than a full decode
        while factor < 8 and min(h, w) / (2 * factor) >= self.size:
            factor *= 2
        scaled = {"min_height": -(-height // factor), "min_width": -(-width // factor), "min_factor": factor}
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB", **(scaled if factor > 1 else {}))
        sy, sx = arr.shape[0] / height, arr.shape[1] / width
        if sy < 1 or sx < 1:
            t, le = round(top * sy), round(left * sx)
            box = (t, le, max(1, min(round(h * sy), arr.shape[0] - t)), max(1, min(round(w * sx), arr.shape[1] - le)))
        return torch.from_numpy(arr), box


class EvalCrop:
    """timm's evaluation geometry: shorter side to ``floor(size / crop_pct)``, centre crop ``size``."""

    def __init__(self, size: int, crop_pct: float, interpolation: str) -> None:
        self.size, self.scale, self.mode = size, math.floor(size / crop_pct), interpolation
        if interpolation not in MODES:
            raise ValueError(f"eval interpolation {interpolation!r}: expected bilinear or bicubic")

    def __call__(self, data: bytes) -> torch.Tensor:
        img = torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB") if jpeg_size(data)
                               else np.array(open_rgb(data)))
        h, w = img.shape[:2]
        # torchvision's Resize(int): the shorter side to ``scale``, the other int(scale * long / short).
        size = (self.scale, int(self.scale * w / h)) if h <= w else (int(self.scale * h / w), self.scale)
        out = resize_hwc(img, size, self.mode)
        top, left = int(round((size[0] - self.size) / 2.0)), int(round((size[1] - self.size) / 2.0))
        return out[top:top + self.size, left:left + self.size].contiguous()


def timm_train_transform(input_size: int, auto_augment_policy: str | None, re_prob: float, interpolation: str,
                         color_jitter: float | None = None, use_prefetcher: bool = False) -> Any:
    """timm's own ImageNet training transform on a PIL image (the reference the benchmark and tests compare with)."""
    return create_transform(
        input_size, is_training=True, auto_augment=auto_augment_policy or None, re_prob=re_prob, re_mode="pixel",
        re_count=1, interpolation=interpolation, color_jitter=color_jitter, use_prefetcher=use_prefetcher,
    )


def timm_eval_transform(input_size: int, crop_pct: float, interpolation: str) -> Any:
    """timm's evaluation transform on a PIL image: resize to ``input_size / crop_pct``, centre crop."""
    return create_transform(input_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation)
