"""The shard manifest (one per split) and start-up validation of a dataset URL.

A dataset URL is a ``manifest.json``, a folder holding one, or a folder/glob of Hugging Face
``imagenet-1k``-style Parquet files read in place (a manifest is then built from their footers).
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator import __version__, storage
from orchestrator.errors import DataError
from orchestrator.recipe import TASKS

log = logging.getLogger(__name__)

FORMAT = "inceptionnext-shards/1"
MANIFEST = "manifest.json"
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema([("image", IMAGE_TYPE), ("label", pa.int64())])
# Segmentation shards add the PNG mask (one byte per pixel: the class, 0 = "other" when reduce_zero_label);
# their label column holds -1.
SEG_SCHEMA = pa.schema([("image", IMAGE_TYPE), ("mask", IMAGE_TYPE), ("label", pa.int64())])


@dataclass
class ShardInfo:
    url: str  # relative to the manifest's folder, or absolute
    rows: int
    row_groups: list[int]
    bytes: int = 0
    sha256: str | None = None


@dataclass
class ClassInfo:
    index: int
    wnid: str
    name: str


@dataclass
class Manifest:
    split: str
    shards: list[ShardInfo]
    classes: list[ClassInfo] = field(default_factory=list)
    root: str = ""  # folder the relative shard URLs resolve against (not serialised)
    seed: int | None = None
    source: str | None = None
    task: str = "classification"  # or segmentation: the shards hold a mask column
    reduce_zero_label: bool = False  # segmentation: mask value 0 is "other" (ignored), class k is value k + 1 (ADE20K)
    tool_version: str = __version__
    format: str = FORMAT

    @property
    def num_samples(self) -> int:
        return sum(s.rows for s in self.shards)

    def shard_url(self, index: int) -> str:
        url = self.shards[index].url
        return url if "://" in url or url.startswith("/") else storage.join(self.root, url)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("root")
        data["num_samples"] = self.num_samples
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str, root: str, where: str) -> Manifest:
        try:
            data: dict[str, Any] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: manifest is not valid JSON ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DataError(f"{where}: not a shard manifest (expected format {FORMAT!r}, got {data.get('format')!r})")
        try:
            shards = [ShardInfo(**s) for s in data["shards"]]
            classes = [ClassInfo(**c) for c in data.get("classes", [])]
            manifest = cls(
                split=data["split"], shards=shards, classes=classes, root=root, seed=data.get("seed"),
                source=data.get("source"), tool_version=data.get("tool_version", "?"),
                task=data.get("task", "classification"), reduce_zero_label=bool(data.get("reduce_zero_label", False)),
            )
        except (KeyError, TypeError) as exc:
            raise DataError(f"{where}: manifest is missing or has a malformed field ({exc})") from exc
        for i, shard in enumerate(shards):
            if sum(shard.row_groups) != shard.rows:
                raise DataError(f"{where}: shard {i} ({shard.url}) row groups sum to {sum(shard.row_groups)}, rows={shard.rows}")
        if not shards:
            raise DataError(f"{where}: manifest lists no shards")
        if manifest.task not in TASKS:
            raise DataError(f"{where}: task {manifest.task!r} is not one of {', '.join(TASKS)}")
        return manifest


def check_schema(schema: pa.Schema, where: str, task: str = "classification") -> None:
    """Fail unless ``schema`` has ``image: struct<bytes, path>`` and an integer ``label`` (and, for
    segmentation, a ``mask`` like ``image``)."""
    problems = []
    for column in ("image", "mask") if task == "segmentation" else ("image",):
        if column not in schema.names or not pa.types.is_struct(schema.field(column).type):
            problems.append(f"column {column!r} (struct<bytes: binary, path: string>) is missing")
        elif schema.field(column).type.get_field_index("bytes") < 0:
            problems.append(f"column {column!r} has no 'bytes' field (type {schema.field(column).type})")
    if "label" not in schema.names or not pa.types.is_integer(schema.field("label").type):
        problems.append("integer column 'label' is missing")
    if problems:
        raise DataError(f"{where}: schema mismatch: {'; '.join(problems)}; found {schema}")


def load(url: str, options: dict[str, Any] | None = None, verify: bool = True) -> Manifest:
    """Resolve a dataset URL to a Manifest; with ``verify``, check every shard exists and has the schema."""
    fs, path = storage.filesystem(url, options)
    try:
        if path.endswith(".json"):
            manifest = _read_manifest(fs, path, url.rsplit("/", 1)[0])
        elif fs.isdir(path) and fs.exists(storage.join(path, MANIFEST)):
            manifest = _read_manifest(fs, storage.join(path, MANIFEST), url)
        else:
            manifest = _manifest_from_parquet(fs, path, url, options)
    except (OSError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(storage.redact(f"{url}: cannot read dataset: {type(exc).__name__}: {exc}", options)) from exc
    if verify:
        _verify_shards(manifest, options)
    return manifest


def _read_manifest(fs: Any, path: str, root: str) -> Manifest:
    if not fs.exists(path):
        raise DataError(f"{storage.unstrip(fs, path)}: manifest not found")
    with fs.open(path, "rb") as f:
        return Manifest.from_json(f.read().decode(), root=root, where=storage.unstrip(fs, path))


def _manifest_from_parquet(fs: Any, path: str, url: str, options: dict[str, Any] | None) -> Manifest:
    """Hugging Face-style Parquet read in place: row counts come from the footers."""
    pattern = path if any(c in path for c in "*?[") else storage.join(path, "*.parquet")
    files = sorted(fs.glob(pattern))
    if not files:
        raise DataError(f"{url}: no {MANIFEST} and no .parquet files found (expected a shard folder or Parquet files)")
    shards, task = [], "classification"
    for f in files:
        pf = pq.ParquetFile(fs.open(f, "rb"))
        meta = pf.metadata
        if "mask" in pf.schema_arrow.names:
            task = "segmentation"
        rgs = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        shards.append(ShardInfo(url=storage.unstrip(fs, f), rows=meta.num_rows, row_groups=rgs, bytes=fs.size(f)))
    split = files[0].rsplit("/", 1)[-1].split("-")[0]
    log.info("%s: read %d Parquet files in place (%d rows)", url, len(files), sum(s.rows for s in shards))
    return Manifest(split=split, shards=shards, root=url, source=url, task=task)


def _verify_shards(manifest: Manifest, options: dict[str, Any] | None) -> None:
    """Every shard exists, has the schema and the manifest's row groups; checked concurrently."""

    def check(i: int) -> None:
        url = manifest.shard_url(i)
        fs, path = storage.filesystem(url, options)
        if not fs.exists(path):
            raise DataError(f"shard {i}: {url} is listed in the manifest but does not exist")
        with fs.open(path, "rb") as f:
            try:
                pf = pq.ParquetFile(f)
            except (pa.ArrowException, OSError) as exc:
                raise DataError(f"shard {i}: {url} is not a readable Parquet file ({exc})") from exc
            check_schema(pf.schema_arrow, f"shard {i}: {url}", manifest.task)
            rgs = [pf.metadata.row_group(j).num_rows for j in range(pf.metadata.num_row_groups)]
        if rgs != manifest.shards[i].row_groups:
            raise DataError(f"shard {i}: {url} has row groups {rgs[:8]}..., the manifest says {manifest.shards[i].row_groups[:8]}...")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(check, range(len(manifest.shards))))


def write(manifest: Manifest, url: str, options: dict[str, Any] | None = None) -> None:
    """Write ``manifest.json`` into the folder ``url`` (last, so a half-written dataset has none)."""
    fs, path = storage.filesystem(url, options)
    with fs.open(storage.join(path, MANIFEST), "wb") as f:
        f.write(manifest.to_json().encode())
