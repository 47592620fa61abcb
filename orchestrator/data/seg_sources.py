"""Segmentation sources for the shard writer: the ADEChallengeData2016 layout and Hugging Face-style Parquet.

Both give ``(image bytes, PNG mask bytes, path)`` rows; masks are stored exactly as read (no decode, no
re-encode), so they survive sharding bit for bit. ADE20K's mask value 0 is "other" and class ``k`` is value
``k + 1`` (``reduce_zero_label``). Class names come from ``--classes FILE`` (one per line), else the dataset's
``objectInfo150.txt``; without either, the count is the masks' largest label (a set of our own in ADE20K's
layout is not ADE20K) and the classes are named by index, or by mmsegmentation's ``ADE20KDataset`` names
when that count is ADE20K's 150.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from orchestrator import storage
from orchestrator.data.manifest import ClassInfo
from orchestrator.data.sources import IMAGE_EXTENSIONS, Item, is_parquet, parquet_files, row_group_blocks
from orchestrator.errors import DataError

ADE20K_CLASSES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence', 'desk',
    'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard',
    'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand', 'path',
    'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge', 'bookcase',
    'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove', 'palm',
    'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus', 'towel', 'light',
    'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth', 'television receiver', 'airplane',
    'dirt track', 'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle', 'buffet', 'poster',
    'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything', 'swimming pool', 'stool',
    'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank',
    'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen', 'blanket', 'sculpture',
    'hood', 'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor',
    'bulletin board', 'shower', 'radiator', 'glass', 'clock', 'flag',
)
log = logging.getLogger(__name__)
ADE_SPLITS = {"training": "train", "validation": "val"}
MASK_COLUMNS = ("mask", "annotation", "segmentation", "seg", "label")


def class_list(names: list[str] | tuple[str, ...]) -> list[ClassInfo]:
    return [ClassInfo(index=i, wnid=f"class{i:03d}", name=n) for i, n in enumerate(names)]


def object_info_names(fs: Any, root: str) -> list[str] | None:
    """Class names from the dataset's ``objectInfo150.txt`` (``Idx Ratio Train Val Name`` lines), if present."""
    path = storage.join(root, "objectInfo150.txt")
    if not fs.exists(path):
        return None
    rows = [line.split("\t") for line in fs.cat_file(path).decode().splitlines()[1:] if line.strip()]
    return [r[-1].split(";")[0].strip() for r in rows]


def class_names_file(url: str, options: dict[str, Any] | None = None) -> list[str]:
    """``--classes FILE``: one class name per line, in label order."""
    fs, path = storage.filesystem(url, options)
    if not fs.exists(path):
        raise DataError(f"--classes {url}: not found")
    names = [line.strip() for line in fs.cat_file(path).decode().splitlines() if line.strip()]
    if not names:
        raise DataError(f"--classes {url}: no class names (one per line)")
    return names


def largest_label(masks: Iterable[tuple[bytes, str]], reduce_zero_label: bool) -> tuple[int, int]:
    """(class count, largest raw value) of ``(PNG bytes, where)`` masks; 255 is ignored, and with
    ``reduce_zero_label`` value 0 is "other" and value k is class k - 1."""
    top = -1
    for data, where in masks:
        try:
            values = np.unique(np.asarray(Image.open(io.BytesIO(data))))
        except Exception as exc:  # noqa: BLE001 - PIL raises many unrelated types for bad bytes
            raise DataError(f"{where}: unreadable mask ({type(exc).__name__})") from None
        values = values[values != 255]
        top = max(top, int(values.max()) if values.size else -1)
    return (top if reduce_zero_label else top + 1), top


def seg_classes(url: str, classes_file: str | None, options: dict[str, Any] | None,
                masks: Iterable[tuple[bytes, str]], reduce_zero_label: bool) -> list[ClassInfo]:
    """The classes of a segmentation source: ``--classes FILE``'s names, checked against the masks' largest
    label; or counted from the masks, with one warning."""
    names = class_names_file(classes_file, options) if classes_file else None
    count, top = largest_label(masks, reduce_zero_label)
    if names is not None:
        if count > len(names):
            raise DataError(f"--classes {classes_file} names {len(names)} classes, but the masks of {url} have label {top} "
                            f"({count} classes{' after reduce_zero_label' if reduce_zero_label else ''})")
        return class_list(names)
    if count == len(ADE20K_CLASSES):
        log.warning("%s: no class names given; %d classes in the masks: taking ADE20K's names", url, count)
        return class_list(ADE20K_CLASSES)
    log.warning("%s: no objectInfo150.txt and no --classes FILE: %d classes found in the masks (largest label %d%s), "
                "named by index", url, count, top, ", reduce_zero_label" if reduce_zero_label else "")
    return class_list([str(i) for i in range(count)])


def mask_size_mismatch(image: bytes, mask: bytes) -> str | None:
    """Why an image and its mask cannot be a pair (unreadable, or another size), from their headers."""
    try:
        with Image.open(io.BytesIO(image)) as img, Image.open(io.BytesIO(mask)) as m:
            if img.size != m.size:
                return f"image is {img.size[0]}x{img.size[1]}, mask {m.size[0]}x{m.size[1]}"
            if m.mode not in ("L", "P", "I;16", "I"):
                return f"mask mode {m.mode} is not one value per pixel"
    except Exception as exc:  # noqa: BLE001 - PIL raises many unrelated types for bad bytes
        return f"unreadable ({type(exc).__name__})"
    return None


class ADESource:
    """``images/{training,validation}/*.jpg`` with ``annotations/{training,validation}/*.png`` of the same stem."""

    task = "segmentation"

    def __init__(self, url: str, options: dict[str, Any] | None = None, reduce_zero_label: bool = True,
                 classes_file: str | None = None) -> None:
        self.url, self.options, self.reduce_zero_label = url.rstrip("/"), options or {}, reduce_zero_label
        self.fs, self.root = storage.filesystem(self.url, self.options)
        if not self.fs.isdir(storage.join(self.root, "images")) or not self.fs.isdir(storage.join(self.root, "annotations")):
            raise DataError(f"{url}: expected the ADEChallengeData2016 layout (images/ and annotations/ folders)")
        info = object_info_names(self.fs, self.root)
        if info is not None and classes_file is None:  # ADE20K itself: its names, no need to read every mask
            self.classes = class_list(info)
        else:
            masks = [p for folder in ADE_SPLITS for p in self._masks(folder).values()]
            self.classes = seg_classes(url, classes_file, options, ((self.fs.cat_file(p), p) for p in masks),
                                       reduce_zero_label)

    def _masks(self, folder: str) -> dict[str, str]:
        found = storage.join(self.root, "annotations", folder)
        if not self.fs.isdir(found):
            return {}
        return {os.path.splitext(p.rsplit("/", 1)[-1])[0]: p for p in self.fs.find(found) if p.endswith(".png")}

    def splits(self, names: tuple[str, ...] | None = None) -> dict[str, list[list[Item]]]:
        """Items by split (``names``: only these, e.g. ``("val",)``)."""
        out = {}
        for folder, split in ADE_SPLITS.items():
            images_dir = storage.join(self.root, "images", folder)
            if (names is not None and split not in names) or not self.fs.isdir(images_dir):
                continue
            masks = self._masks(folder)
            blocks = []
            for path, info in sorted(self.fs.find(images_dir, detail=True).items()):
                if not path.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                stem = os.path.splitext(path.rsplit("/", 1)[-1])[0]
                if stem not in masks:
                    raise DataError(f"{path}: no annotation annotations/{folder}/{stem}.png")
                rel = path[len(self.root):].strip("/")
                blocks.append([Item(key=f"{path}|{masks[stem]}", label=-1, path=rel, size=info.get("size", 0))])
            out[split] = blocks
        if not out:
            raise DataError(f"{self.url}: no images/training or images/validation folder")
        return out

    def read(self, items: list[Item]) -> list[tuple[bytes, bytes, str]]:
        keys = [k for it in items for k in it.key.split("|")]
        data = self.fs.cat(keys, on_error="return")
        for k in keys:
            if isinstance(data[k], BaseException):
                raise DataError(f"{k}: cannot read ({data[k]})")
        return [(data[it.key.split("|")[0]], data[it.key.split("|")[1]], it.path) for it in items]


class SegParquetSource:
    """Parquet files with an ``image`` column and a mask column (``mask``/``annotation``/...), each an image
    struct ``{bytes, path}`` or plain bytes; the split is the file name's prefix (``train-*``, ``validation-*``)."""

    task = "segmentation"

    def __init__(self, url: str, options: dict[str, Any] | None = None, reduce_zero_label: bool = True,
                 classes_file: str | None = None) -> None:
        self.url, self.options, self.reduce_zero_label = url.rstrip("/"), options or {}, reduce_zero_label
        self.fs, root = storage.filesystem(self.url, self.options)
        self.files = parquet_files(self.fs, root, url)
        names = pq.ParquetFile(self.fs.open(self.files[0], "rb")).schema_arrow.names
        found = [c for c in MASK_COLUMNS if c in names]
        if "image" not in names or not found:
            raise DataError(f"{storage.unstrip(self.fs, self.files[0])}: expected an 'image' column and a mask column "
                            f"(one of {', '.join(MASK_COLUMNS)}); found {names}")
        self.mask_column = found[0]
        self.classes = seg_classes(url, classes_file, options, self._all_masks(), reduce_zero_label)

    def _all_masks(self) -> Iterable[tuple[bytes, str]]:
        for f in self.files:
            column = pq.read_table(self.fs.open(f, "rb"), columns=[self.mask_column]).column(0).to_pylist()
            for row, value in enumerate(column):
                where = f"{storage.unstrip(self.fs, f)} row {row}"
                yield _bytes(value, where, self.mask_column), where

    def splits(self, names: tuple[str, ...] | None = None) -> dict[str, list[list[Item]]]:
        found = row_group_blocks(self.fs, self.files)
        return {k: v for k, v in found.items() if names is None or k in names}

    def read(self, items: list[Item]) -> list[tuple[bytes, bytes, str]]:
        groups: dict[tuple[str, int], tuple[list[Any], list[Any]]] = {}
        out = []
        for it in items:
            f, g, r = it.key.rsplit("#", 2)
            if (f, int(g)) not in groups:
                table = pq.ParquetFile(self.fs.open(f, "rb")).read_row_group(int(g), columns=["image", self.mask_column])
                groups[(f, int(g))] = (table.column("image").to_pylist(), table.column(self.mask_column).to_pylist())
            images, masks = groups[(f, int(g))]
            image, mask = images[int(r)], masks[int(r)]
            where = f"{storage.unstrip(self.fs, f)} row group {g} row {r}"
            image_bytes, mask_bytes = _bytes(image, where, "image"), _bytes(mask, where, self.mask_column)
            out.append((image_bytes, mask_bytes, (image.get("path") if isinstance(image, dict) else None) or where))
        return out


def _bytes(value: Any, where: str, column: str) -> bytes:
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, bytes):
        raise DataError(f"{where}: column {column!r} holds no encoded image bytes")
    return value


def open_segmentation_source(url: str, options: dict[str, Any] | None = None, reduce_zero_label: bool = True,
                             classes_file: str | None = None) -> ADESource | SegParquetSource:
    """The ADEChallengeData2016 layout, or a folder/glob of Parquet files with a mask column."""
    fs, path = storage.filesystem(url, options)
    source = SegParquetSource if is_parquet(fs, path) else ADESource
    return source(url, options, reduce_zero_label, classes_file)
