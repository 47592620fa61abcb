"""``python -m orchestrator.data verify URL``: every shard of a dataset checked against its manifest, in parallel.

Per shard: it exists, its size and sha256 are the ones the manifest recorded when it was written, its footer has
the manifest's rows and row groups, and its labels are classes of the manifest. Per split: no class is empty, and
the totals are the expected ones: those given (``--expect train=N``), else ImageNet-1K's (1,281,167 train and
50,000 val images, 50 of each class in val) when the classes are its 1,000 synsets. One line per problem.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from orchestrator import storage
from orchestrator.data import manifest as mf
from orchestrator.data.sources import imagenet_synsets
from orchestrator.errors import DataError

IMAGENET_1K = {"train": 1_281_167, "val": 50_000}
IMAGENET_VAL_PER_CLASS = 50


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    shards: int = 0
    images: int = 0
    splits: list[str] = field(default_factory=list)


def split_urls(url: str, options: dict[str, Any] | None) -> list[str]:
    """``url`` itself when it holds a manifest, else its sub-folders that do (``train/``, ``val/``)."""
    fs, path = storage.filesystem(url, options)
    if fs.exists(storage.join(path, mf.MANIFEST)):
        return [url.rstrip("/")]
    found = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)
                   if fs.exists(storage.join(p, mf.MANIFEST))) if fs.isdir(path) else []
    if not found:
        raise DataError(f"{url}: no {mf.MANIFEST} in it or in its sub-folders (not a shard dataset)")
    return [storage.join(url, name) for name in found]


def verify(url: str, options: dict[str, Any] | None = None, expect: dict[str, int] | None = None,
           workers: int = 16) -> Report:
    report = Report()
    for split_url in split_urls(url, options):
        manifest = mf.load(split_url, options, verify=False)
        report.splits.append(manifest.split)
        report.shards += len(manifest.shards)
        classes = max(len(manifest.classes), 1)
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(check_shard, [manifest] * len(manifest.shards), range(len(manifest.shards)),
                                    [classes] * len(manifest.shards), [options] * len(manifest.shards)))
        counts = np.zeros(classes, dtype=np.int64)
        for problems, labels in results:
            report.problems += problems
            if labels is not None:
                counts += labels
        report.images += int(counts.sum())
        complete = all(labels is not None for _, labels in results)
        report.problems += check_split(manifest, split_url, counts, (expect or {}).get(manifest.split), complete)
    return report


def check_shard(manifest: mf.Manifest, i: int, classes: int, options: dict[str, Any] | None) -> tuple[list[str], np.ndarray | None]:
    """Problems of shard ``i``, and its images per class (None when it cannot be read)."""
    shard, url = manifest.shards[i], manifest.shard_url(i)
    fs, path = storage.filesystem(url, options)
    where = f"{url} (shard {i} of {manifest.split})"
    try:
        with fs.open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256")
            size = f.tell()
            f.seek(0)  # the same handle: reopening asked the store for the object again
            parquet = pq.ParquetFile(f)
            groups = [parquet.metadata.row_group(g).num_rows for g in range(parquet.metadata.num_row_groups)]
            labels = parquet.read(columns=["label"]).column("label").to_numpy()
    except FileNotFoundError:
        return [f"{where}: missing"], None
    except Exception as exc:  # noqa: BLE001 - a damaged footer raises pyarrow's many error types
        return [storage.redact(f"{where}: not a readable Parquet file ({type(exc).__name__}: {exc})", options)], None
    problems = []
    if shard.bytes and size != shard.bytes:
        problems.append(f"{where}: {size} bytes, the manifest says {shard.bytes}")
    if shard.sha256 and digest.hexdigest() != shard.sha256:
        problems.append(f"{where}: sha256 {digest.hexdigest()[:16]}... is not the manifest's {shard.sha256[:16]}...")
    if groups != shard.row_groups:
        problems.append(f"{where}: {sum(groups)} rows in {len(groups)} row groups, the manifest says {shard.rows} "
                        f"in {len(shard.row_groups)}")
    outside = np.flatnonzero((labels < 0) | (labels >= classes)) if manifest.task == "classification" else []
    if len(outside):
        problems.append(f"{where}: {len(outside)} labels outside 0..{classes - 1} (row {outside[0]}: "
                        f"{labels[outside[0]]})")
        labels = labels[(labels >= 0) & (labels < classes)]
    return problems, np.bincount(labels, minlength=classes)[:classes] if manifest.task == "classification" \
        else np.array([len(labels)] + [0] * (classes - 1))


def check_split(manifest: mf.Manifest, url: str, counts: np.ndarray, expected: int | None, complete: bool) -> list[str]:
    """Totals and per-class counts; ``complete``: every shard could be read (else the shards' own lines say why)."""
    problems = []
    imagenet = is_imagenet_1k(manifest)
    expected = expected if expected is not None else IMAGENET_1K.get(manifest.split) if imagenet else None
    if complete and manifest.num_samples != int(counts.sum()):
        problems.append(f"{url}: the shards hold {int(counts.sum())} readable images, the manifest lists {manifest.num_samples}")
    if expected is not None and manifest.num_samples != expected:
        problems.append(f"{url}: {manifest.num_samples} images, expected {expected}"
                        f"{' (ImageNet-1K ' + manifest.split + ')' if imagenet else ''}")
    if manifest.task == "classification" and manifest.classes:
        empty = [c for c in manifest.classes if counts[c.index] == 0]
        if empty:
            problems.append(f"{url}: {len(empty)} classes have no images (first: {empty[0].index} {empty[0].wnid})")
        if imagenet and manifest.split == "val":
            off = [c for c in manifest.classes if counts[c.index] != IMAGENET_VAL_PER_CLASS]
            if off:
                problems.append(f"{url}: {len(off)} classes do not have {IMAGENET_VAL_PER_CLASS} val images (first: "
                                f"{off[0].index} {off[0].wnid} with {counts[off[0].index]})")
    return problems


def is_imagenet_1k(manifest: mf.Manifest) -> bool:
    """The classes are ImageNet-1K's 1,000 synsets in timm's (sorted) order."""
    if len(manifest.classes) != 1000:
        return False
    return [c.wnid for c in manifest.classes] == imagenet_synsets()
