"""Images for Grad-CAM: a folder of image files, or a shard dataset split (labels and class names from its manifest)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from orchestrator import storage
from orchestrator.data import manifest
from orchestrator.errors import DataError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".JPEG", ".JPG", ".PNG")


@dataclass
class Sample:
    name: str  # where it came from: the file, or shard#row (+ the stored path)
    image: Image.Image
    label: int | None = None
    path: str = ""  # the path stored with the image (synthetic data keeps the object box in it)


def open_image(data: bytes, where: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{where}: not a readable image ({exc})") from exc
    return image.convert("RGB")


def samples(src: str, num: int, options: dict[str, Any] | None = None) -> tuple[list[Sample], list[str] | None]:
    """The first ``num`` images of ``src`` and its class names (None for a plain folder)."""
    options = options or {}
    storage.check_reachable(src, options, "--images", "--storage-option")
    fs, path = storage.filesystem(src, options)
    if fs.isdir(path):
        files = sorted(f for f in fs.find(path) if f.endswith(EXTENSIONS))[:num]
        if files:
            return [Sample(name=f, image=open_image(fs.cat_file(f), storage.unstrip(fs, f)), path=f) for f in files], None
    elif not fs.exists(path):
        raise DataError(f"{src}: no such folder or dataset")
    try:
        m = manifest.load(src, options, verify=False)
    except DataError as exc:
        raise DataError(f"{src}: neither a folder of images ({', '.join(EXTENSIONS[:5])}) nor a shard dataset: {exc}") from exc
    return list(_from_shards(m, num, options)), [c.name for c in m.classes]


def _from_shards(m: manifest.Manifest, num: int, options: dict[str, Any]) -> Iterator[Sample]:
    seen = 0
    for index in range(len(m.shards)):
        url = m.shard_url(index)
        fs, path = storage.filesystem(url, options)
        try:
            table = pq.ParquetFile(fs.open(path, "rb")).read(columns=["image", "label"])
        except (OSError, ValueError) as exc:
            raise DataError(f"{url}: cannot read the shard ({exc})") from exc
        for row, (image, label) in enumerate(zip(table.column("image").to_pylist(), table.column("label").to_pylist(),
                                                 strict=True)):
            if seen == num:
                return
            where = f"{url} row {row}"
            yield Sample(name=where, image=open_image(image["bytes"], where), label=label, path=image.get("path") or "")
            seen += 1

