"""Datasets the shard writer converts: ILSVRC-2012 / ImageFolder trees and Hugging Face-style Parquet.

A source lists, per split, *blocks* of items (an item is one image; a block is what is cheap to read
together: one file, or one Parquet row group) and reads the bytes of a list of items.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow.parquet as pq

from orchestrator import storage
from orchestrator.data.manifest import ClassInfo, check_schema
from orchestrator.errors import DataError

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VAL_LABEL_FILES = ("LOC_val_solution.csv", "val_labels.txt", "ILSVRC2012_val_labels.txt")


@dataclass(frozen=True)
class Item:
    key: str  # how the source finds the bytes: a file path, "file#rowgroup#row" or a synthetic seed
    label: int
    path: str  # stored in the shard's image.path column
    size: int  # approximate encoded size in bytes, for packing shards


class Source(Protocol):
    url: str
    classes: list[ClassInfo]

    def splits(self, names: tuple[str, ...] | None = None) -> dict[str, list[list[Item]]]:
        """Items by split name (train, val), in blocks; ``names``: only these (the others are not even listed)."""
        ...

    def read(self, items: list[Item]) -> list[tuple[bytes, Any, str]]:
        """Encoded bytes, target (a label; segmentation sources: the PNG mask's bytes) and stored path of each item."""
        ...


def natural_key(text: str) -> list[Any]:
    """timm's ordering of class folders (so class indices match timm's ImageFolder)."""
    from timm.data.readers.reader_image_folder import natural_key as timm_key

    return timm_key(text)


@functools.cache
def _timm_info(name: str) -> list[list[str]]:
    """The tab-separated lines of one of timm's ImageNet metadata files (``timm/data/_info``), read without importing
    timm: that loads torch and timm's models, 4.6 of the 54 CPU-seconds of converting ImageNet's downloads."""
    spec = importlib.util.find_spec("timm")
    folder = Path(next(iter(spec.submodule_search_locations or []), "")) if spec else Path()
    path = folder / "data" / "_info" / name
    if not path.is_file():  # another layout: ask timm itself
        from timm.data import ImageNetInfo

        info = ImageNetInfo("imagenet-1k")
        if name == "imagenet_synsets.txt":
            return [[w] for w in info.label_names()]
        return [[w, info.label_name_to_description(w)] for w in info.label_names()]
    return [line.split("\t") for line in path.read_text().splitlines() if line.strip()]


def imagenet_synsets() -> list[str]:
    """ImageNet-1K's 1,000 WNIDs in timm's (sorted) class order."""
    return [row[0] for row in _timm_info("imagenet_synsets.txt")]


def class_infos(wnids: list[str]) -> list[ClassInfo]:
    """Class index -> wnid and human name; names come from timm's ImageNet metadata when known."""
    names = {row[0]: row[1] for row in _timm_info("imagenet_synset_to_lemma.txt") if len(row) > 1}
    return [ClassInfo(index=i, wnid=w, name=names.get(w, w)) for i, w in enumerate(wnids)]


def kaggle_val_labels(text: str) -> dict[str, str]:
    """Image stem -> WNID from Kaggle's ``LOC_val_solution.csv`` (ImageId, PredictionString: its first WNID)."""
    rows = list(csv.reader(text.splitlines()))[1:]
    return {r[0]: r[1].split()[0] for r in rows if len(r) >= 2 and r[1].strip()}


class FolderSource:
    """ILSVRC-2012 layout (``train/<wnid>/*``, ``val/`` in class folders or flat + labels file), any ImageFolder,
    or a flat ILSVRC-2012 val folder alone with its labels file (the 1000 ImageNet classes, in timm's order)."""

    def __init__(self, url: str, options: dict[str, Any] | None = None, val_labels: str | None = None) -> None:
        self.url, self.options = url.rstrip("/"), options or {}
        self.fs, self.root = storage.filesystem(self.url, self.options)
        if not self.fs.isdir(self.root):
            raise DataError(f"{url}: source folder does not exist")
        self.val_labels = val_labels
        self.layout = "ilsvrc" if self.fs.isdir(storage.join(self.root, "train")) else "imagefolder"
        train_root = storage.join(self.root, "train") if self.layout == "ilsvrc" else self.root
        wnids = sorted((p.rsplit("/", 1)[-1] for p in self.fs.ls(train_root, detail=False) if self.fs.isdir(p)), key=natural_key)
        if not wnids and self._images(self.root, top=True):
            self.layout, wnids = "flat", imagenet_synsets()
        if not wnids:
            raise DataError(f"{train_root}: no class folders found (expected <root>/<class>/<image> files)")
        self.classes = class_infos(wnids)

    def splits(self, names: tuple[str, ...] | None = None) -> dict[str, list[list[Item]]]:
        """Items by split (``names``: only these, e.g. ``("val",)``: an evaluation need not list train/)."""
        if self.layout == "flat":
            return {"val": self._flat_val(self.root)}
        if self.layout == "imagefolder":
            return {"train": self._class_folders(self.root)}
        out = {"train": self._class_folders(storage.join(self.root, "train"))} if not names or "train" in names else {}
        for name in ("val", "validation"):
            val = storage.join(self.root, name)
            if self.fs.isdir(val) and (not names or "val" in names):
                subdirs = [p for p in self.fs.ls(val, detail=False) if self.fs.isdir(p)]
                out["val"] = self._class_folders(val) if subdirs else self._flat_val(val)
                break
        return out

    def _images(self, folder: str, top: bool = False) -> dict[str, int]:
        found = self.fs.find(folder, maxdepth=1 if top else None, detail=True)
        return {p: info.get("size", 0) for p, info in found.items() if p.lower().endswith(IMAGE_EXTENSIONS)}

    def _class_folders(self, folder: str) -> list[list[Item]]:
        index = {c.wnid: c.index for c in self.classes}
        blocks = []
        for path, size in sorted(self._images(folder).items()):
            wnid = path[len(folder) :].strip("/").split("/")[0]
            if wnid not in index:
                raise DataError(f"{path}: class folder {wnid!r} is not among the training classes")
            blocks.append([Item(key=path, label=index[wnid], path=path[len(self.root) :].strip("/"), size=size)])
        return blocks

    def _flat_val(self, folder: str) -> list[list[Item]]:
        labels = self._read_val_labels(folder)
        index = {c.wnid: c.index for c in self.classes}
        blocks = []
        for path, size in sorted(self._images(folder).items()):
            stem = os.path.splitext(path.rsplit("/", 1)[-1])[0]
            if stem not in labels:
                raise DataError(f"{path}: no ground-truth label for {stem!r} in the validation labels file")
            if labels[stem] not in index:
                raise DataError(f"{path}: label {labels[stem]!r} is not among the training classes")
            blocks.append([Item(key=path, label=index[labels[stem]], path=path[len(self.root) :].strip("/"), size=size)])
        return blocks

    def _read_val_labels(self, folder: str) -> dict[str, str]:
        """``LOC_val_solution.csv`` (ImageId, PredictionString) or lines of ``<file> <wnid>``."""
        beside = (self.root, folder, self.root.rsplit("/", 1)[0]) if self.layout == "flat" else (self.root, folder)
        candidates = [self.val_labels] if self.val_labels else [storage.join(d, n) for d in beside for n in VAL_LABEL_FILES]
        for cand in candidates:
            fs, path = storage.filesystem(cand, self.options) if "://" in cand else (self.fs, cand)
            if not fs.exists(path):
                continue
            text = fs.cat_file(path).decode()
            if path.endswith(".csv"):
                return kaggle_val_labels(text)
            pairs = (line.replace(",", " ").split() for line in text.splitlines() if line.strip())
            return {os.path.splitext(p[0])[0]: p[1] for p in pairs if len(p) >= 2}
        raise DataError(
            f"{folder}: flat validation folder needs a labels file ({', '.join(VAL_LABEL_FILES)} beside it, or --val-labels)"
        )

    def read(self, items: list[Item]) -> list[tuple[bytes, int, str]]:
        data = self.fs.cat([it.key for it in items], on_error="return")
        out = []
        for it in items:
            value = data[it.key]
            if isinstance(value, BaseException):
                raise DataError(f"{it.key}: cannot read ({value})")
            out.append((value, it.label, it.path))
        return out


class ParquetSource:
    """Hugging Face ``imagenet-1k``-style Parquet (``image`` struct{bytes, path}, ``label``), split by file prefix."""

    def __init__(self, url: str, options: dict[str, Any] | None = None, num_classes: int | None = None) -> None:
        self.url, self.options = url.rstrip("/"), options or {}
        self.fs, root = storage.filesystem(self.url, self.options)
        self.files = parquet_files(self.fs, root, url)
        labels: set[int] = set()
        for f in self.files:
            pf = pq.ParquetFile(self.fs.open(f, "rb"))
            check_schema(pf.schema_arrow, storage.unstrip(self.fs, f))
            labels.update(pf.read(columns=["label"]).column("label").unique().to_pylist())  # ints only: cheap
        n = num_classes or (max(labels) + 1 if labels else 0)
        self.classes = class_infos([f"class_{i}" for i in range(n)])

    def splits(self, names: tuple[str, ...] | None = None) -> dict[str, list[list[Item]]]:
        """Every split but ``test``: Hugging Face's ImageNet test split has no labels (all -1)."""
        found = row_group_blocks(self.fs, self.files)
        if "test" in found and names is None:
            log.warning("%s: the test split is left out: it is unlabelled (label -1)", self.url)
        return {name: blocks for name, blocks in found.items() if name != "test" and (names is None or name in names)}

    def read(self, items: list[Item]) -> list[tuple[bytes, int, str]]:
        """Reads each needed row group once (labels and paths come from the file, not the item)."""
        groups: dict[tuple[str, int], Any] = {}
        out = []
        for it in items:
            f, g, r = it.key.rsplit("#", 2)
            if (f, int(g)) not in groups:
                table = pq.ParquetFile(self.fs.open(f, "rb")).read_row_group(int(g), columns=["image", "label"])
                groups[(f, int(g))] = (table.column("image").to_pylist(), table.column("label").to_pylist())
            images, labels = groups[(f, int(g))]
            if labels[int(r)] is None or labels[int(r)] < 0:
                raise DataError(f"{storage.unstrip(self.fs, f)}: row group {g}, row {r} has label {labels[int(r)]} "
                                "(unlabelled, like Hugging Face's test split); only labelled splits can be sharded")
            image = images[int(r)]
            out.append((image["bytes"], int(labels[int(r)]), image.get("path") or ""))
        return out


def open_source(url: str, options: dict[str, Any] | None = None, val_labels: str | None = None) -> FolderSource | ParquetSource:
    """A folder of image folders, or a folder/glob of Parquet files."""
    fs, path = storage.filesystem(url, options)
    return ParquetSource(url, options) if is_parquet(fs, path) else FolderSource(url, options, val_labels)


def is_parquet(fs: Any, path: str) -> bool:
    """A glob, or a folder holding ``.parquet`` files (else a folder of images)."""
    return any(c in path for c in "*?[") or (fs.isdir(path) and bool(fs.glob(storage.join(path, "**/*.parquet"))))


def parquet_files(fs: Any, root: str, url: str) -> list[str]:
    """The ``.parquet`` files a glob matches, or those under a folder; refused (naming ``url``) when none."""
    files = sorted(fs.glob(root if any(c in root for c in "*?[") else storage.join(root, "**/*.parquet")))
    if not files:
        raise DataError(f"{url}: no .parquet files found")
    return files


def row_group_blocks(fs: Any, files: list[str]) -> dict[str, list[list[Item]]]:
    """Parquet files as splits (the file name's prefix: ``train-*``, ``validation-*``), one block per row
    group, so a row group is read once; items are ``file#group#row`` and ``read`` fills in their contents."""
    out: dict[str, list[list[Item]]] = defaultdict(list)
    for f in files:
        prefix = f.rsplit("/", 1)[-1].split("-")[0].split("_")[0].split(".")[0]
        split = {"validation": "val", "valid": "val", "training": "train"}.get(prefix, prefix)
        meta = pq.ParquetFile(fs.open(f, "rb")).metadata
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            size = rg.total_byte_size // max(rg.num_rows, 1)
            out[split].append([Item(key=f"{f}#{g}#{r}", label=-1, path="", size=size) for r in range(rg.num_rows)])
    return dict(out)
