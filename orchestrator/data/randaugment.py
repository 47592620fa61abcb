"""timm's RandAugment in two steps: draw the ops, then apply them.

``RandAugmentDraws`` runs timm's own RandAugment object with each op's function replaced by a recorder,
so the draws are timm's call for call (the op choice, each op's probability and magnitude, the
geometric ops' random interpolation) and come out as a list of ``(timm function, level arguments,
keyword arguments)``. Drawing first lets ``apply`` work on arrays: it runs the compiled shear and
translate (``affine``) on the array and converts to Pillow only for the ops that need it (none at all
for a quarter of the images, where no op fires), with timm's pixels to the bit. ``data.decode: gpu``
replays the same draws on the device (``gpu_decode``).

timm 1.0.31's ``PosterizeIncreasing`` can ask for 0 bits, which Pillow >= 13 refuses; ``posterize``
keeps the old meaning (a black image).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from timm.data import auto_augment
from timm.data.auto_augment import rand_augment_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN
from timm.data.transforms import str_to_pil_interp

from orchestrator.data import affine


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize with ``bits_to_keep <= 0`` meaning "keep no bits" (a black image), as before Pillow 13."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return ImageOps.posterize(img, 1).point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    auto_augment.NAME_TO_OP[_name] = posterize

Op = tuple[Callable[..., Image.Image], tuple[Any, ...], dict[str, Any]]  # timm's function, level args, kwargs
GEOMETRIC = (auto_augment.rotate, auto_augment.shear_x, auto_augment.shear_y, auto_augment.translate_x_rel,
             auto_augment.translate_y_rel, auto_augment.translate_x_abs, auto_augment.translate_y_abs)
# The affine matrix (Pillow's output-to-input map) of timm's shear and translate ops, from the image size.
MATRICES: dict[Callable[..., Any], Callable[[int, int, float], tuple[float, ...]]] = {
    auto_augment.shear_x: lambda w, h, factor: (1, factor, 0, 0, 1, 0),
    auto_augment.shear_y: lambda w, h, factor: (1, 0, 0, factor, 1, 0),
    auto_augment.translate_x_rel: lambda w, h, pct: (1, 0, pct * w, 0, 1, 0),
    auto_augment.translate_y_rel: lambda w, h, pct: (1, 0, 0, 0, 1, pct * h),
    auto_augment.translate_x_abs: lambda w, h, pixels: (1, 0, pixels, 0, 1, 0),
    auto_augment.translate_y_abs: lambda w, h, pixels: (1, 0, 0, 0, 1, pixels),
}


def randaugment_params(size: int, interpolation: str) -> dict[str, Any]:
    """timm's hyper-parameters for its RandAugment (``transforms_imagenet_train``)."""
    params: dict[str, Any] = {"translate_const": int(size * 0.45),
                              "img_mean": tuple(min(255, round(255 * x)) for x in IMAGENET_DEFAULT_MEAN)}
    if interpolation != "random":
        params["interpolation"] = str_to_pil_interp(interpolation)
    return params


class _Recorder:
    """Stands in for an op's function: makes the draw the function itself makes (the geometric ops draw
    their interpolation, as timm's ``_check_args_tf``) and records the call instead of applying it."""

    def __init__(self, fn: Callable[..., Image.Image], log: list[Op]) -> None:
        self.fn, self.log = fn, log

    def __call__(self, img: Image.Image, *level: Any, **kwargs: Any) -> Image.Image:
        if self.fn in GEOMETRIC:
            auto_augment._check_args_tf(kwargs)
        self.log.append((self.fn, level, kwargs))
        return img


class RandAugmentDraws:
    """``draws()`` -> the ops timm's RandAugment (``policy``) applies to the next image, in order."""

    def __init__(self, policy: str, size: int, interpolation: str) -> None:
        self.augment = rand_augment_transform(policy, randaugment_params(size, interpolation))
        self.layers: int = self.augment.num_layers
        self.functions = [op.aug_fn for op in self.augment.ops]
        self._log: list[Op] = []
        for op in self.augment.ops:
            op.aug_fn = _Recorder(op.aug_fn, self._log)
        self._proxy = Image.new("RGB", (1, 1))  # what the recorders are handed; they never look at it
        affine.warm()  # built before the DataLoader forks its workers: they inherit the loaded kernel

    def __call__(self) -> list[Op]:
        self._log.clear()
        self.augment(self._proxy)
        return list(self._log)


def apply(img: np.ndarray, ops: list[Op]) -> np.ndarray:
    """``ops`` applied to a uint8 HWC array: timm's pixels; Pillow only for the ops that need it."""
    current: np.ndarray | Image.Image = img
    for fn, level, kwargs in ops:
        matrix = MATRICES.get(fn)
        if matrix is not None:  # affine_array hands what its kernel does not cover to Pillow
            src = np.asarray(current)
            current = affine.affine_array(src, matrix(src.shape[1], src.shape[0], *level), kwargs["resample"],
                                          kwargs.get("fillcolor"))
        else:
            current = fn(current if isinstance(current, Image.Image) else Image.fromarray(current), *level, **kwargs)
    return np.array(current) if isinstance(current, Image.Image) else current
