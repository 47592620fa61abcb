"""The embedded dataset: real JPEGs whose class is learnable (shape, colour and texture by class).

Each image is drawn from its own seed, so the dataset is the same on every machine. The object's
box is kept in the stored path (``..._box<x0>-<y0>-<x1>-<y1>.jpg``) for checks such as Grad-CAM.
"""

from __future__ import annotations

import colorsys
import io
import re
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from orchestrator.data.manifest import ClassInfo
from orchestrator.data.sources import Item

SHAPES = ("circle", "square", "triangle", "cross", "ring")
BOX_PATTERN = re.compile(r"_box(\d+)-(\d+)-(\d+)-(\d+)")


def class_style(label: int, num_classes: int) -> tuple[str, tuple[int, int, int], bool]:
    """Shape, RGB colour and whether the object is striped, all determined by the class."""
    hue = (label * 0.618034) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.9, 0.95)
    return SHAPES[label % len(SHAPES)], (int(r * 255), int(g * 255), int(b * 255)), (label // len(SHAPES)) % 2 == 1


def draw(label: int, num_classes: int, size: int, seed: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One image of class ``label`` and the object's box, from ``seed``."""
    rng = np.random.default_rng(seed)
    background = rng.integers(60, 200, 3)
    pixels = np.clip(background + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    shape, colour, striped = class_style(label, num_classes)
    side = int(rng.uniform(0.35, 0.6) * size)
    x0, y0 = (int(v) for v in rng.integers(0, size - side, 2))
    box = (x0, y0, x0 + side, y0 + side)
    colour = tuple(int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in colour)
    canvas = ImageDraw.Draw(img)
    if shape == "circle":
        canvas.ellipse(box, fill=colour)
    elif shape == "square":
        canvas.rectangle(box, fill=colour)
    elif shape == "triangle":
        canvas.polygon([(x0, y0 + side), (x0 + side // 2, y0), (x0 + side, y0 + side)], fill=colour)
    elif shape == "cross":
        t = max(2, side // 4)
        canvas.rectangle((x0 + side // 2 - t, y0, x0 + side // 2 + t, y0 + side), fill=colour)
        canvas.rectangle((x0, y0 + side // 2 - t, x0 + side, y0 + side // 2 + t), fill=colour)
    else:
        canvas.ellipse(box, outline=colour, width=max(2, side // 6))
    if striped:
        for y in range(y0, y0 + side, 4):
            canvas.line((x0, y, x0 + side, y), fill=(0, 0, 0), width=1)
    return img, box


def box_from_path(path: str) -> tuple[int, int, int, int] | None:
    m = BOX_PATTERN.search(path)
    return tuple(int(v) for v in m.groups()) if m else None  # type: ignore[return-value]


class SynthSource:
    """A Source (see ``sources.py``) that draws images instead of reading them."""

    def __init__(self, classes: int = 10, train: int = 2000, val: int = 500, size: int = 64, seed: int = 0) -> None:
        if classes < 2 or train < 1 or val < 0 or size < 16:
            raise ValueError(f"synthetic dataset needs classes>=2, train>=1, val>=0, size>=16 (got {classes}, {train}, {val}, {size})")
        self.num_classes, self.counts, self.size, self.seed = classes, {"train": train, "val": val}, size, seed
        self.classes = [ClassInfo(index=i, wnid=f"synth{i:03d}", name=f"{class_style(i, classes)[0]}-{i}") for i in range(classes)]
        self.url = f"synth(classes={classes}, size={size}, seed={seed})"

    def splits(self, names: tuple[str, ...] | None = None) -> dict[str, list[list[Item]]]:
        approx = self.size * self.size * 3 // 4  # ~JPEG size at q=90, for shard packing only
        return {
            split: [[Item(key=f"{split}:{i}", label=i % self.num_classes, path="", size=approx)] for i in range(n)]
            for split, n in self.counts.items() if n > 0 and (names is None or split in names)
        }

    def read(self, items: list[Item]) -> list[tuple[bytes, int, str]]:
        out = []
        for it in items:
            split, index = it.key.split(":")
            seed = _seed(self.seed, split, int(index))
            img, box = draw(it.label, self.num_classes, self.size, seed)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            out.append((buf.getvalue(), it.label, f"{split}/{int(index):07d}_c{it.label}_box{box[0]}-{box[1]}-{box[2]}-{box[3]}.jpg"))
        return out


def _seed(seed: int, split: str, index: int) -> int:
    """Stable across processes and machines (``hash()`` of a str is salted per process)."""
    return (seed * 1_000_003 + (0 if split == "train" else 500_000_000) + index) & 0x7FFFFFFF


class SynthSegSource:
    """The embedded segmentation set: 1-3 shapes on a noise-textured background, masks exact.

    Mask values follow ADE20K's convention (``reduce_zero_label``): 0 is "other" (a one-pixel band on each
    shape's outline, where JPEG blurs the edge: ignored), 1 the background, ``k + 2`` shape class ``k``."""

    task = "segmentation"
    reduce_zero_label = True

    def __init__(self, shapes: int = 4, train: int = 600, val: int = 100, size: int = 64, seed: int = 0) -> None:
        if not 1 <= shapes <= len(SHAPES) or train < 1 or val < 0 or size < 32:
            raise ValueError(f"synthetic segmentation needs 1-{len(SHAPES)} shapes, train>=1, val>=0, size>=32 "
                             f"(got {shapes}, {train}, {val}, {size})")
        self.shapes, self.counts, self.size, self.seed = shapes, {"train": train, "val": val}, size, seed
        self.classes = [ClassInfo(index=0, wnid="synth-bg", name="background")] + [
            ClassInfo(index=k + 1, wnid=f"synth-{SHAPES[k]}", name=SHAPES[k]) for k in range(shapes)]
        self.url = f"synth-seg(shapes={shapes}, size={size}, seed={seed})"

    def splits(self, names: tuple[str, ...] | None = None) -> dict[str, list[list[Item]]]:
        approx = self.size * self.size  # JPEG + PNG, for shard packing only
        return {split: [[Item(key=f"{split}:{i}", label=-1, path="", size=approx)] for i in range(n)]
                for split, n in self.counts.items() if n > 0 and (names is None or split in names)}

    def read(self, items: list[Item]) -> list[tuple[bytes, bytes, str]]:
        out = []
        for it in items:
            split, index = it.key.split(":")
            img, mask = draw_scene(self.shapes, self.size, _seed(self.seed, split, int(index)))
            image_buf, mask_buf = io.BytesIO(), io.BytesIO()
            img.save(image_buf, format="JPEG", quality=95)
            mask.save(mask_buf, format="PNG")
            out.append((image_buf.getvalue(), mask_buf.getvalue(), f"{split}/{int(index):07d}.jpg"))
        return out


def draw_scene(shapes: int, size: int, seed: int) -> tuple[Image.Image, Image.Image]:
    """An image (``size`` wide, 3/4 as high) and its mask, from ``seed``."""
    rng = np.random.default_rng(seed)
    width, height = size, size * 3 // 4
    background = rng.integers(70, 190, 3)
    pixels = np.clip(background + rng.normal(0, 30, (height, width, 3)), 0, 255).astype(np.uint8)
    img, mask = Image.fromarray(pixels), Image.new("L", (width, height), 1)
    canvas, labels = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(0, shapes))
        side = int(rng.uniform(0.25, 0.5) * height)
        x0, y0 = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
        colour = tuple(int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in class_style(k, shapes)[1])
        for target, fill, outline in ((canvas, colour, colour), (labels, k + 2, 0)):
            _shape(target, SHAPES[k], x0, y0, side, fill, outline)
    return img, mask


def _shape(canvas: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, side: int, fill: Any, outline: Any) -> None:
    box = (x0, y0, x0 + side, y0 + side)
    if shape == "circle":
        canvas.ellipse(box, fill=fill, outline=outline)
    elif shape == "square":
        canvas.rectangle(box, fill=fill, outline=outline)
    elif shape == "triangle":
        canvas.polygon([(x0, y0 + side), (x0 + side // 2, y0), (x0 + side, y0 + side)], fill=fill, outline=outline)
    elif shape == "cross":
        t = max(2, side // 5)
        canvas.rectangle((x0 + side // 2 - t, y0, x0 + side // 2 + t, y0 + side), fill=fill, outline=outline)
        canvas.rectangle((x0, y0 + side // 2 - t, x0 + side, y0 + side // 2 + t), fill=fill, outline=outline)
    else:
        canvas.ellipse(box, fill=None, outline=outline if fill is None else fill, width=max(2, side // 5))
