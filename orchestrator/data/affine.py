"""Pillow's affine transform for shear and translate, the same pixels at a third of the CPU.

Pillow resamples a bilinear or bicubic affine transform through its generic per-pixel engine
(``ImagingGenericTransform`` with ``bilinear_filter32RGB``/``bicubic_filter32RGB`` in ``Geometry.c``),
which for every pixel interpolates 2 (bilinear) or 4 (bicubic) rows and then blends them. For a
shear or translation along x the vertical blend weight is exactly 0.0, and along y the horizontal
one is, so Pillow's result is the 1-D interpolation along the other axis to the bit. ``_rows``
computes just that, compiled by numba, with Pillow's float64 operations in Pillow's order (columns
go through it transposed); tests compare it with Pillow on random images, matrices and filters.
Everything else (rotation, other filters) stays with Pillow: numba's 2-D bicubic was no faster
than Pillow's C.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numba
import numpy as np
from PIL import Image

FILTERS = {Image.Resampling.BILINEAR: False, Image.Resampling.BICUBIC: True}  # value: bicubic?


@numba.njit(cache=True, nogil=True, inline="always")
def _cubic(v1: float, v2: float, v3: float, v4: float, d: float) -> float:
    """Pillow's ``BICUBIC`` macro (a = -1), evaluated in its order."""
    p1 = v2
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return p1 + d * (p2 + d * (p3 + d * p4))


@numba.njit(cache=True, nogil=True)
def _rows(src: np.ndarray, a: np.ndarray, bicubic: bool, fill: np.ndarray, out: np.ndarray) -> None:
    """Pillow's affine transform of uint8 HWC RGB ``src`` into ``out`` for a matrix that maps rows onto rows
    (a3 = 0, a4 = 1, a5 = 0). Per output row: each pixel's source position and its four taps, clamped to
    the image as Pillow's XCLIP does; then the pixels. Values are read through a float64 table: exact for
    uint8 (C promotes them to int; numba's arithmetic would keep them unsigned)."""
    ysize, xsize, _ = src.shape
    n = out.shape[1]
    taps, ds, inside = np.empty((n, 4), np.int64), np.empty(n), np.empty(n, np.bool_)
    lut = np.arange(256).astype(np.float64)
    for y in range(out.shape[0]):
        yo = y + 0.5
        for x in range(n):
            xin = a[0] * (x + 0.5) + a[1] * yo + a[2]
            inside[x] = not (xin < 0.0 or xin >= xsize or y >= ysize)
            xin -= 0.5
            xi = int(math.floor(xin))
            ds[x] = xin - xi
            for k in range(4):
                taps[x, k] = min(max(xi - 1 + k, 0), xsize - 1)
        row, orow = src[min(y, ysize - 1)], out[y]
        for x in range(n):
            if not inside[x]:
                for b in range(3):
                    orow[x, b] = fill[b]
                continue
            t0, t1, t2, t3, d = taps[x, 0], taps[x, 1], taps[x, 2], taps[x, 3], ds[x]
            if bicubic:  # clamped: bicubic overshoots
                for b in range(3):
                    v = _cubic(lut[row[t0, b]], lut[row[t1, b]], lut[row[t2, b]], lut[row[t3, b]], d)
                    orow[x, b] = int(min(max(v, 0.0), 255.0))
            else:
                for b in range(3):
                    lo = lut[row[t1, b]]
                    orow[x, b] = int(lo + (lut[row[t2, b]] - lo) * d)


def _covers(resample: int, fillcolor: Any) -> bool:
    """Whether ``affine_array`` computes this filter and fill itself (else it hands the image to Pillow)."""
    rgb = fillcolor is None or (isinstance(fillcolor, tuple) and len(fillcolor) == 3
                                and all(isinstance(c, int) for c in fillcolor))
    return resample in FILTERS and rgb


def affine_array(src: np.ndarray, matrix: Sequence[float], resample: int, fillcolor: Any = None) -> np.ndarray:
    """``Image.fromarray(src).transform(size, Image.AFFINE, matrix, resample, fillcolor=fillcolor)`` as a uint8
    HWC array, the same pixels; compiled for shear and translate, Pillow's own for anything else."""
    a = np.asarray(matrix[:6], np.float64)
    rows, columns = (a[3], a[4], a[5]) == (0, 1, 0), (a[0], a[1], a[2]) == (1, 0, 0)
    if not (rows or columns) or src.ndim != 3 or src.shape[2] != 3 or not _covers(resample, fillcolor):
        img = Image.fromarray(src)
        return np.array(img.transform(img.size, Image.Transform.AFFINE, matrix, resample, fillcolor=fillcolor))
    out = np.empty_like(src)
    fill = np.asarray(fillcolor or (0, 0, 0), np.uint8)  # Pillow fills with zeros without a colour
    if rows:
        _rows(src, a, FILTERS[resample], fill, out)
    else:  # columns onto columns: the same on the transposed image (Pillow's vertical pass clamps rows alike)
        _rows(src.transpose(1, 0, 2), np.array([a[4], a[3], a[5], 0, 1, 0]), FILTERS[resample], fill,
              out.transpose(1, 0, 2))
    return out


def warm() -> None:
    """Load the compiled kernel (numba's cache) for both layouts it is called with, here: a DataLoader worker
    forked after this inherits it, where each worker loaded it again before (0.3 CPU-s each; 80 a node at 10
    workers per GPU)."""
    src = np.zeros((2, 2, 3), np.uint8)
    for matrix in ((1, 0.1, 0, 0, 1, 0), (1, 0, 0, 0.1, 1, 0)):  # rows onto rows, columns onto columns
        affine_array(src, matrix, Image.Resampling.BILINEAR)

