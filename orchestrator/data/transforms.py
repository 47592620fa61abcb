"""timm's train/eval transforms, with Pillow 13's posterize range fixed.

timm 1.0.31's ``PosterizeIncreasing`` can ask for 0 bits (``4 - int(level/10*4)`` at magnitude >= 10,
reached with ``mstd`` noise); Pillow >= 13 raises ``ValueError`` for bits outside 1..8, which killed
training within minutes. Older Pillow kept 0 bits, i.e. a black image; we keep exactly that meaning.
"""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageOps
from timm.data import auto_augment, create_transform


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize with ``bits_to_keep <= 0`` meaning "keep no bits" (a black image), as before Pillow 13."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return ImageOps.posterize(img, 1).point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    auto_augment.NAME_TO_OP[_name] = posterize


def train_transform(input_size: int, auto_augment_policy: str | None, re_prob: float, interpolation: str,
                    color_jitter: float | None = None) -> Any:
    """RandomResizedCrop + flip + RandAugment + normalise + random erasing (timm's ImageNet recipe)."""
    return create_transform(
        input_size, is_training=True, auto_augment=auto_augment_policy or None, re_prob=re_prob, re_mode="pixel",
        re_count=1, interpolation=interpolation, color_jitter=color_jitter,
    )


def eval_transform(input_size: int, crop_pct: float, interpolation: str) -> Any:
    """Resize to ``input_size / crop_pct`` then centre crop, as timm evaluates."""
    return create_transform(input_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation)
