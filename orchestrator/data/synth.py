"""The embedded dataset: real JPEGs whose class is learnable (shape, colour and texture by class).

Each image is drawn from its own seed, so the dataset is the same on every machine. The object's
box is kept in the stored path (``..._box<x0>-<y0>-<x1>-<y1>.jpg``) for checks such as Grad-CAM.
"""

from __future__ import annotations

import colorsys
import io
import re

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

    def splits(self) -> dict[str, list[list[Item]]]:
        approx = self.size * self.size * 3 // 4  # ~JPEG size at q=90, for shard packing only
        return {
            split: [[Item(key=f"{split}:{i}", label=i % self.num_classes, path="", size=approx)] for i in range(n)]
            for split, n in self.counts.items() if n > 0
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
