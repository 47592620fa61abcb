"""Segmentation transforms: (image bytes, PNG mask bytes) in, (uint8 HWC image, uint8 HW mask) out.

Training follows mmsegmentation 0.x's ADE20K pipeline step by step, with its random draws from NumPy's global
generator (which the reader seeds per sample): ``Resize`` of ``scale`` times a ratio from ``ratio_range``
(keep ratio), ``RandomCrop`` with ``cat_max_ratio``, ``RandomFlip``, ``PhotoMetricDistortion``, ``Pad`` (the
mask with the ignore index). Normalisation runs on the device. Two differences, both in the resampling kernel
only: images are resized with antialiased bilinear (Pillow's kernel; mmcv uses OpenCV's plain bilinear) and
hue is shifted in Pillow's HSV (256 steps; OpenCV's has 180), by the same fraction of the circle.

Evaluation returns the image and mask as stored; the device resizes the image for each test scale, and the
prediction is compared with the mask at its original size, as mmseg does.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN

from orchestrator.data.transforms import open_rgb, resize_hwc

MEAN_PIXEL = np.array([round(255 * m) for m in IMAGENET_DEFAULT_MEAN], dtype=np.uint8)  # pads to ~0 after normalising


def decode_mask(data: bytes, reduce_zero_label: bool, ignore_index: int = 255) -> np.ndarray:
    """The mask as uint8 class indices; ``reduce_zero_label``: 0 ("other") -> ignore, k -> k - 1 (mmseg's LoadAnnotations)."""
    mask = np.array(Image.open(io.BytesIO(data)))
    if mask.ndim != 2:
        raise ValueError(f"mask has shape {mask.shape}, expected one value per pixel")
    if mask.max(initial=0) > 255:
        raise ValueError(f"mask value {mask.max()} does not fit a uint8 class index")
    mask = mask.astype(np.uint8)
    if reduce_zero_label:
        mask = mask - np.uint8(1)  # 0 wraps to 255
        mask[mask == 255] = ignore_index
    return mask


def rescale_size(height: int, width: int, scale: tuple[float, float]) -> tuple[int, int]:
    """mmcv's ``rescale_size`` with keep ratio: the largest size with long side <= max(scale), short side <= min(scale)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def decode_pair(data: bytes, mask_bytes: bytes, reduce_zero_label: bool, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    image = np.array(open_rgb(data))
    mask = decode_mask(mask_bytes, reduce_zero_label, ignore_index)
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    return image, mask


class SegTrain:
    """Resize, RandomCrop (cat_max_ratio), RandomFlip, PhotoMetricDistortion, Pad: mmseg's ADE20K training pipeline."""

    def __init__(self, crop: int, scale: list[int], ratio_range: list[float], cat_max_ratio: float, photometric: bool,
                 reduce_zero_label: bool, ignore_index: int = 255) -> None:
        self.crop, self.scale, self.ratio_range = crop, scale, ratio_range
        self.cat_max_ratio, self.photometric = cat_max_ratio, photometric
        self.reduce_zero_label, self.ignore_index = reduce_zero_label, ignore_index

    def __call__(self, data: bytes, mask_bytes: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = decode_pair(data, mask_bytes, self.reduce_zero_label, self.ignore_index)
        lo, hi = self.ratio_range
        ratio = np.random.random_sample() * (hi - lo) + lo
        size = rescale_size(*mask.shape, (int(self.scale[0] * ratio), int(self.scale[1] * ratio)))
        image_t = resize_hwc(torch.from_numpy(image), size, "bilinear")
        mask_t = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None], size=size, mode="nearest")[0, 0]
        top, left = self.crop_box(mask_t.numpy())
        image_t = image_t[top:top + self.crop, left:left + self.crop]
        mask_t = mask_t[top:top + self.crop, left:left + self.crop]
        if np.random.rand() < 0.5:
            image_t, mask_t = image_t.flip(1), mask_t.flip(1)
        out = image_t.numpy()
        if self.photometric:
            out = photometric_distortion(out)
        return pad(out, mask_t.numpy(), self.crop, self.ignore_index)

    def crop_box(self, mask: np.ndarray) -> tuple[int, int]:
        """mmseg's RandomCrop: up to 10 draws until no class covers ``cat_max_ratio`` of the crop (ignore excluded)."""

        def draw() -> tuple[int, int]:
            return (np.random.randint(0, max(mask.shape[0] - self.crop, 0) + 1),
                    np.random.randint(0, max(mask.shape[1] - self.crop, 0) + 1))

        top, left = draw()
        if self.cat_max_ratio < 1:
            for _ in range(10):
                labels, counts = np.unique(mask[top:top + self.crop, left:left + self.crop], return_counts=True)
                counts = counts[labels != self.ignore_index]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                top, left = draw()
        return top, left


def pad(image: np.ndarray, mask: np.ndarray, size: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom/right to ``size``: the image with the mean pixel (0 once normalised, as mmseg pads after
    normalising), the mask with the ignore index."""
    h, w = mask.shape
    if h < size or w < size:
        image = np.concatenate([image, np.broadcast_to(MEAN_PIXEL, (h, size - w, 3))], axis=1) if w < size else image
        image = np.concatenate([image, np.broadcast_to(MEAN_PIXEL, (size - h, size, 3))], axis=0) if h < size else image
        mask = np.pad(mask, ((0, size - h), (0, size - w)), constant_values=ignore_index)
    return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(mask))


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, brightness: int = 32, contrast: tuple[float, float] = (0.5, 1.5),
                           saturation: tuple[float, float] = (0.5, 1.5), hue: int = 18) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on uint8 RGB: brightness, contrast (before or after), saturation, hue,
    each applied with probability 1/2, drawn in mmseg's order."""
    if np.random.randint(2):
        image = _convert(image, beta=np.random.uniform(-brightness, brightness))
    mode = np.random.randint(2)
    if mode == 1 and np.random.randint(2):
        image = _convert(image, alpha=np.random.uniform(*contrast))
    if np.random.randint(2):
        hsv = np.array(Image.fromarray(image).convert("HSV"))
        hsv[..., 1] = _convert(hsv[..., 1], alpha=np.random.uniform(*saturation))
        image = np.array(Image.fromarray(hsv, "HSV").convert("RGB"))
    if np.random.randint(2):
        hsv = np.array(Image.fromarray(image).convert("HSV"))
        shift = round(np.random.randint(-hue, hue) * 256 / 180)
        hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 256).astype(np.uint8)
        image = np.array(Image.fromarray(hsv, "HSV").convert("RGB"))
    if mode == 0 and np.random.randint(2):
        image = _convert(image, alpha=np.random.uniform(*contrast))
    return image


class SegEval:
    """The image and mask as stored (the device resizes for each test scale)."""

    def __init__(self, reduce_zero_label: bool, ignore_index: int = 255) -> None:
        self.reduce_zero_label, self.ignore_index = reduce_zero_label, ignore_index

    def __call__(self, data: bytes, mask_bytes: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = decode_pair(data, mask_bytes, self.reduce_zero_label, self.ignore_index)
        return torch.from_numpy(image), torch.from_numpy(mask)
