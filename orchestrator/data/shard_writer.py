"""Convert a source into Parquet shards plus a manifest per split; re-runs skip verified shards.

Plan: blocks (one image, or one source row group) are permuted with the seed and packed into
shards of about ``shard_size_mb``; rows are shuffled inside each shard, so every shard mixes classes.
Each finished shard leaves a progress record (rows, row groups, size, sha256, plan digest) under
``<split>/_progress/`` the moment it is done, whatever happens to the others; a re-run trusts a shard only if its
record, plan digest and size still match. ``python -m orchestrator.data verify`` checks the sha256 later.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import simplejpeg
from PIL import Image
from tqdm import tqdm

from orchestrator import storage
from orchestrator.data import manifest as mf
from orchestrator.data.seg_sources import mask_size_mismatch
from orchestrator.data.sources import Item, Source
from orchestrator.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteOptions:
    shard_size_mb: float = 256.0
    rows_per_group: int = 128
    max_side: int | None = None  # re-encode images whose shorter side exceeds this
    seed: int = 0
    workers: int = 1


@dataclass
class WriteReport:
    written: int = 0  # shards written in this run
    reused: int = 0  # verified shards kept from an earlier run
    skipped_images: int = 0  # unreadable source images left out


def plan_shards(blocks: list[list[Item]], shard_bytes: float, seed: int) -> list[list[Item]]:
    """Seeded permutation of blocks packed greedily into shards, rows shuffled inside each shard."""
    rng = np.random.default_rng(seed)
    shards: list[list[Item]] = [[]]
    size = 0
    for b in rng.permutation(len(blocks)):
        block_size = sum(it.size for it in blocks[b])
        if shards[-1] and size + block_size > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(blocks[b])
        size += block_size
    return [[shard[i] for i in rng.permutation(len(shard))] for shard in shards if shard]


def plan_digest(items: list[Item]) -> str:
    return hashlib.sha256("\n".join(it.key for it in items).encode()).hexdigest()[:16]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def reencode(data: bytes, max_side: int) -> bytes:
    """Downscale so the shorter side is ``max_side`` (JPEG q=90); smaller images are kept byte-identical."""
    with Image.open(io.BytesIO(data)) as img:
        if min(img.size) <= max_side:
            return data
        scale = max_side / min(img.size)
        img = img.convert("RGB").resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=90)
        return out.getvalue()


def is_image(data: bytes) -> bool:
    """Cheap header check (full decode happens at training time): libjpeg-turbo reads a JPEG's header (1.5 us);
    anything else must be a format PIL identifies (its Python marker scan took 21-26 us a JPEG, about a quarter of
    the converter's CPU when every image went through it)."""
    try:
        simplejpeg.decode_jpeg_header(data)
        return True
    except ValueError:
        pass
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        return True
    except Exception:  # noqa: BLE001 - PIL raises many unrelated types for bad bytes
        return False


def _write_shard(source: Source, items: list[Item], url: str, opts: WriteOptions, options: dict[str, Any]) -> dict[str, Any]:
    """Write one shard (local temp file, then upload or rename) and return its progress record."""
    rows = source.read(items)
    segmentation = getattr(source, "task", "classification") == "segmentation"
    images, targets, skipped = [], [], 0
    for (data, target, path), item in zip(rows, items, strict=True):
        if segmentation:
            problem = mask_size_mismatch(data, target)
        else:
            problem = None if is_image(data) else "unreadable"
        if problem:
            log.warning("skipping %s: %s", item.key, problem)
            skipped += 1
            continue
        if segmentation:  # masks are stored as read; the image is kept as is too (resizing would misalign them)
            images.append({"bytes": data, "path": path})
            targets.append({"bytes": target, "path": path.rsplit(".", 1)[0] + ".png"})
        else:
            images.append({"bytes": reencode(data, opts.max_side) if opts.max_side else data, "path": path})
            targets.append(target)
    columns = {"image": pa.array(images, type=mf.IMAGE_TYPE)}
    if segmentation:
        columns |= {"mask": pa.array(targets, type=mf.IMAGE_TYPE), "label": pa.array([-1] * len(targets), type=pa.int64())}
    else:
        columns["label"] = pa.array(targets, type=pa.int64())
    table = pa.table(columns)
    fs, path = storage.filesystem(url, options)
    with tempfile.NamedTemporaryFile(suffix=".parquet", delete=False) as tmp:
        local = tmp.name
    try:
        pq.write_table(table, local, row_group_size=opts.rows_per_group, compression="none")
        with open(local, "rb") as f:
            digest = hashlib.file_digest(f, "sha256")
        meta = pq.ParquetFile(local).metadata
        if storage.is_local(fs):
            fs.put_file(local, path + ".tmp")
            fs.mv(path + ".tmp", path)  # atomic rename: a crash never leaves a half shard under its name
        else:
            fs.put_file(local, path)  # object stores publish an object only once it is complete
        return {
            "rows": meta.num_rows,
            "row_groups": [meta.row_group(i).num_rows for i in range(meta.num_row_groups)],
            "bytes": os.path.getsize(local),
            "sha256": digest.hexdigest(),
            "skipped": skipped,
        }
    finally:
        os.unlink(local)


def _verified(fs: Any, split_path: str, index: int, digest: str) -> dict[str, Any] | None:
    """The progress record of shard ``index`` if the shard is complete and belongs to this plan."""
    record_path = storage.join(split_path, "_progress", f"{index:05d}.json")
    shard_path = storage.join(split_path, shard_name(index))
    if not fs.exists(record_path) or not fs.exists(shard_path):
        return None
    record = json.loads(fs.cat_file(record_path))
    if record.get("plan") != digest or fs.size(shard_path) != record.get("bytes"):
        return None
    return record


# Runs ``write(*args)`` for each shard index elsewhere (``launch.shard_tasks``): yields (index, record or exception).
Tasks = Callable[[Callable[..., dict[str, Any]], dict[int, tuple[Any, ...]]], Iterator[tuple[int, Any]]]


def write_split(source: Source, split: str, blocks: list[list[Item]], dest: str, opts: WriteOptions,
                options: dict[str, Any], report: WriteReport, tasks: Tasks | None = None) -> mf.Manifest:
    split_url = storage.join(dest, split)
    fs, split_path = storage.filesystem(split_url, options)
    fs.makedirs(storage.join(split_path, "_progress"), exist_ok=True)
    plan = plan_shards(blocks, opts.shard_size_mb * 2**20, opts.seed)
    digests = [plan_digest(items) for items in plan]
    records: dict[int, dict[str, Any]] = {}
    todo = []
    for i, digest in enumerate(digests):
        record = _verified(fs, split_path, i, digest)
        if record is None:
            todo.append(i)
        else:
            records[i] = record
    report.reused += len(records)
    total = sum(len(items) for items in plan)
    bar = tqdm(total=total, unit="img", desc=f"{split}", initial=sum(len(plan[i]) for i in records), disable=None)
    log.info("%s: %d images in %d shards (%d already verified)", split, total, len(plan), len(records))

    def finished() -> Iterator[tuple[int, dict[str, Any] | Exception]]:
        """Each shard as it is done (or its error): the others go on, and each is recorded when it is done."""
        args = [(source, plan[i], storage.join(split_url, shard_name(i)), opts, options) for i in todo]
        if tasks is not None:
            yield from tasks(_write_shard, dict(zip(todo, args, strict=True)))
            return
        if opts.workers <= 1:
            for i, a in zip(todo, args, strict=True):
                try:
                    yield i, _write_shard(*a)
                except Exception as exc:  # noqa: BLE001 - reported with the others' after the last shard
                    yield i, exc
            return
        with ProcessPoolExecutor(opts.workers) as pool:
            futures = {pool.submit(_write_shard, *a): i for i, a in zip(todo, args, strict=True)}
            for fut in as_completed(futures):
                try:
                    yield futures[fut], fut.result()
                except Exception as exc:  # noqa: BLE001 - as above
                    yield futures[fut], exc

    failed: dict[int, Exception] = {}
    for i, record in finished():
        if isinstance(record, Exception):
            failed[i] = record
            log.error("%s: %s failed: %s", split, shard_name(i), storage.one_line(record))
            continue
        record["plan"] = digests[i]
        with fs.open(storage.join(split_path, "_progress", f"{i:05d}.json"), "wb") as f:
            f.write(json.dumps(record).encode())
        records[i] = record
        report.written += 1
        report.skipped_images += record["skipped"]
        bar.update(len(plan[i]))
        if bar.disable:
            log.info("%s: shard %d/%d written (%d rows)", split, len(records), len(plan), record["rows"])
    bar.close()
    if failed:
        named = ", ".join(f"{shard_name(i)}: {storage.one_line(e)}" for i, e in sorted(failed.items())[:3])
        raise DataError(f"{split_url}: {len(failed)} shard(s) failed ({named}{', ...' if len(failed) > 3 else ''}); the "
                        f"{len(records)} others are recorded, and the same command redoes only the failed ones")
    shards = [mf.ShardInfo(url=shard_name(i), rows=r["rows"], row_groups=r["row_groups"], bytes=r["bytes"], sha256=r["sha256"])
              for i, r in sorted(records.items())]
    manifest = mf.Manifest(split=split, shards=shards, classes=source.classes, root=split_url, seed=opts.seed,
                           source=storage.redact(getattr(source, "url", type(source).__name__), options),
                           task=getattr(source, "task", "classification"),
                           reduce_zero_label=getattr(source, "reduce_zero_label", False))
    mf.write(manifest, split_url, options)
    return manifest


def write_dataset(source: Source, dest: str, opts: WriteOptions, options: dict[str, Any] | None = None,
                  splits: tuple[str, ...] | None = None, tasks: Tasks | None = None) -> WriteReport:
    """Shard every split of ``source`` (``splits``: only these) into ``dest/<split>/`` and write each split's
    manifest last; ``tasks``: the shards are written by them (a Ray cluster's), else here (``opts.workers``)."""
    report = WriteReport()
    found = source.splits(splits)
    if missing := [name for name in splits or () if name not in found]:
        raise DataError(f"{source.url}: no {' or '.join(missing)} split here (--split {' '.join(splits or ())})")
    for split, blocks in found.items():
        manifest = write_split(source, split, blocks, dest, opts, options or {}, report, tasks)
        log.info("%s: wrote %s (%d samples, %d shards)", split, storage.join(dest, split), manifest.num_samples, len(manifest.shards))
    return report
