"""timm's RandAugment shear and translate ops with Pillow's exact pixels, at a third of the CPU.

Pillow resamples a bilinear or bicubic affine transform through its generic per-pixel engine
(``ImagingGenericTransform`` with ``bilinear_filter32RGB``/``bicubic_filter32RGB`` in ``Geometry.c``),
which for every pixel interpolates 2 (bilinear) or 4 (bicubic) rows and then blends them. For a
shear or translation along x the vertical blend weight is exactly 0.0, and along y the horizontal
one is, so Pillow's result is the 1-D interpolation along the other axis to the bit. ``_rows`` and
``_cols`` compute just that, compiled by numba, with Pillow's float64 operations in Pillow's order;
tests compare them with Pillow on random images, matrices and filters. Everything else (rotation,
other modes and filters) stays with Pillow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numba
import numpy as np
from PIL import Image
from timm.data import auto_augment
from timm.data.auto_augment import RandAugment

_FILTERS = {Image.Resampling.BILINEAR: False, Image.Resampling.BICUBIC: True}  # value: bicubic?


@numba.njit(cache=True, nogil=True, inline="always")
def _cubic(v1: float, v2: float, v3: float, v4: float, d: float) -> float:
    """Pillow's ``BICUBIC`` macro (a = -1), evaluated in its order."""
    p1 = v2
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return p1 + d * (p2 + d * (p3 + d * p4))


@numba.njit(cache=True, nogil=True, inline="always")
def _to_uint8(v: float, bicubic: bool) -> int:
    """Pillow's conversion back: truncation, clamped for bicubic (which overshoots)."""
    return int(min(max(v, 0.0), 255.0)) if bicubic else int(v)


@numba.njit(cache=True, nogil=True)
def _rows(src: np.ndarray, a: np.ndarray, bicubic: bool, fill: np.ndarray, out: np.ndarray) -> None:
    """Pillow's affine transform for a matrix that maps rows onto rows (a3 = 0, a4 = 1, a5 = 0).

    Pixels are read as float64 (exact for uint8; C promotes them to int, numba would keep them unsigned)."""
    ysize, xsize, bands = src.shape
    for y in range(out.shape[0]):
        yo = y + 0.5
        for x in range(out.shape[1]):
            xin = a[0] * (x + 0.5) + a[1] * yo + a[2]
            if xin < 0.0 or xin >= xsize or y >= ysize:
                out[y, x, :] = fill
                continue
            xin -= 0.5
            xi = int(math.floor(xin))
            dx = xin - xi
            c0, c1 = min(max(xi - 1, 0), xsize - 1), min(max(xi, 0), xsize - 1)
            c2, c3 = min(max(xi + 1, 0), xsize - 1), min(max(xi + 2, 0), xsize - 1)
            for b in range(bands):
                if bicubic:
                    v = _cubic(float(src[y, c0, b]), float(src[y, c1, b]), float(src[y, c2, b]), float(src[y, c3, b]), dx)
                else:
                    v = float(src[y, c1, b]) + (float(src[y, c2, b]) - float(src[y, c1, b])) * dx
                out[y, x, b] = _to_uint8(v, bicubic)


@numba.njit(cache=True, nogil=True)
def _cols(src: np.ndarray, a: np.ndarray, bicubic: bool, fill: np.ndarray, out: np.ndarray) -> None:
    """Pillow's affine transform for a matrix that maps columns onto columns (a0 = 1, a1 = 0, a2 = 0).
    A row outside the image repeats the one before it, as Pillow's filters do."""
    ysize, xsize, bands = src.shape
    for y in range(out.shape[0]):
        yo = y + 0.5
        for x in range(out.shape[1]):
            yin = a[3] * (x + 0.5) + a[4] * yo + a[5]
            if yin < 0.0 or yin >= ysize or x >= xsize:
                out[y, x, :] = fill
                continue
            yin -= 0.5
            yi = int(math.floor(yin))
            dy = yin - yi
            for b in range(bands):
                if bicubic:
                    v1 = float(src[min(max(yi - 1, 0), ysize - 1), x, b])
                    v2 = float(src[yi, x, b]) if yi >= 0 else v1
                    v3 = float(src[yi + 1, x, b]) if yi + 1 < ysize else v2
                    v4 = float(src[yi + 2, x, b]) if yi + 2 < ysize else v3
                    v = _cubic(v1, v2, v3, v4, dy)
                else:
                    v1 = float(src[max(yi, 0), x, b])
                    v2 = float(src[yi + 1, x, b]) if yi + 1 < ysize else v1
                    v = v1 + (v2 - v1) * dy
                out[y, x, b] = _to_uint8(v, bicubic)


def affine(img: Image.Image, matrix: Sequence[float], resample: int = Image.Resampling.NEAREST,
           fillcolor: Any = None) -> Image.Image:
    """``img.transform(img.size, Image.AFFINE, matrix, resample, fillcolor=fillcolor)``, the same pixels."""
    a = np.asarray(matrix[:6], np.float64)
    kernel = _rows if (a[3], a[4], a[5]) == (0, 1, 0) else _cols if (a[0], a[1], a[2]) == (1, 0, 0) else None
    fill = (0, 0, 0) if fillcolor is None else fillcolor  # Pillow fills with zeros without one
    rgb = isinstance(fill, tuple) and len(fill) == 3 and all(isinstance(c, int) for c in fill)
    if kernel is None or img.mode != "RGB" or resample not in _FILTERS or not rgb:
        return img.transform(img.size, Image.Transform.AFFINE, matrix, resample, fillcolor=fillcolor)
    src = np.asarray(img)
    out = np.empty_like(src)
    kernel(src, a, _FILTERS[resample], np.asarray(fill, np.uint8), out)
    return Image.fromarray(out)


def _op(matrix: Callable[[Image.Image, float], tuple[float, ...]]) -> Callable[..., Image.Image]:
    """A timm op ``(img, level, **kwargs)`` that draws the random interpolation where timm does."""
    def op(img: Image.Image, level: float, **kwargs: Any) -> Image.Image:
        auto_augment._check_args_tf(kwargs)
        return affine(img, matrix(img, level), **kwargs)
    return op


FAST_OPS = {  # timm's functions and their matrices (timm.data.auto_augment)
    auto_augment.shear_x: _op(lambda img, factor: (1, factor, 0, 0, 1, 0)),
    auto_augment.shear_y: _op(lambda img, factor: (1, 0, 0, factor, 1, 0)),
    auto_augment.translate_x_rel: _op(lambda img, pct: (1, 0, pct * img.size[0], 0, 1, 0)),
    auto_augment.translate_y_rel: _op(lambda img, pct: (1, 0, 0, 0, 1, pct * img.size[1])),
    auto_augment.translate_x_abs: _op(lambda img, pixels: (1, 0, pixels, 0, 1, 0)),
    auto_augment.translate_y_abs: _op(lambda img, pixels: (1, 0, 0, 0, 1, pixels)),
}


def fast_geometry(augment: RandAugment) -> RandAugment:
    """``augment`` with timm's shear and translate functions replaced by the ones above (in place)."""
    for op in augment.ops:
        op.aug_fn = FAST_OPS.get(op.aug_fn, op.aug_fn)
    return augment
