"""Images per CPU-second of the full training transform: timm's ImageFolder on local disk (baseline)
versus this project's shard reader from a loopback S3 store (SeaweedFS), measured in the same run.

    .venv/bin/python bench/data_pipeline.py [--images 300]

Process CPU time (all threads, so s3fs's I/O thread counts) makes the figure hold on a loaded
machine. Both sides decode the same ~100 KB 500x375 JPEGs in this process (num_workers=0) and
apply the same augmentation to each image (see ContentSeeded); best of 3 alternating passes.
The last line is ``ratio=<reader / ImageFolder>``.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from timm.data import ImageDataset
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator.data import manifest as mf  # noqa: E402
from orchestrator.data.reader import ReaderOptions, ShardDataset, ShardLoader  # noqa: E402
from orchestrator.data.shard_writer import WriteOptions, write_dataset  # noqa: E402
from orchestrator.data.sources import open_source  # noqa: E402
from orchestrator.data.transforms import train_transform  # noqa: E402
from tests.services import S3Store  # noqa: E402


def photo_like(rng: np.random.Generator) -> bytes:
    """A 500x375 JPEG of about 100 KB: smooth structure plus fine noise, like a photo."""
    base = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
    noise = rng.normal(0, 14, (375, 500, 3))
    img = Image.fromarray(np.clip(np.asarray(base.filter(ImageFilter.GaussianBlur(2)), float) + noise, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=92)
    return out.getvalue()


class ContentSeeded:
    """The transform with RNGs seeded from the image itself, so both pipelines do identical augmentation
    work per image and the ratio measures the pipelines, not which random ops each side happened to draw."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, img: Image.Image):
        seed = zlib.crc32(img.crop((0, 0, 32, 32)).tobytes())
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)
        return self.transform(img)


def cpu_rate(loader, count: int) -> float:
    """Images per CPU-second over one pass (after the first batch, which pays start-up costs)."""
    it = iter(loader)
    seen = len(next(it)[0])
    start = time.process_time()
    n = 0
    for batch in it:
        n += len(batch[0])
    assert seen + n == count, f"expected {count} images, got {seen + n}"
    return n / (time.process_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    folder = tmp / "imagefolder"
    sizes = []
    for i in range(args.images):
        (folder / f"class{i % 10}").mkdir(parents=True, exist_ok=True)
        data = photo_like(rng)
        sizes.append(len(data))
        (folder / f"class{i % 10}" / f"{i:05d}.jpg").write_bytes(data)
    print(f"{args.images} JPEGs 500x375, mean {np.mean(sizes) / 1e3:.0f} KB")
    transform = ContentSeeded(train_transform(224, "rand-m9-mstd0.5-inc1", 0.25, "random"))

    store = S3Store(data_dir=tmp / "s3", log_path=tmp / "weed.log")
    store.data_dir.mkdir()
    store.start()
    try:
        url = f"{store.bucket('bench')}/shards"
        write_dataset(open_source(str(folder)), url, WriteOptions(shard_size_mb=8, rows_per_group=64), store.options)
        baseline = DataLoader(ImageDataset(str(folder), transform=transform), batch_size=args.batch, num_workers=0)
        ds = ShardDataset(mf.load(f"{url}/train", store.options), transform, train=True,
                          options=ReaderOptions(storage_options=store.options))
        reader = ShardLoader(ds, args.batch, 0)
        count = args.images // args.batch * args.batch
        rates = {"imagefolder_local": [], "shard_reader_s3": []}
        for epoch in range(3):  # alternate, keep the best of each, so neither side profits from warm-up order
            rates["imagefolder_local"].append(cpu_rate(baseline, args.images))
            reader.set_epoch(epoch)
            rates["shard_reader_s3"].append(cpu_rate(reader, count))
    finally:
        store.stop()
    a, b = max(rates["imagefolder_local"]), max(rates["shard_reader_s3"])
    print(f"baseline timm ImageFolder (local disk): {a:.1f} images/CPU-s")
    print(f"this reader (loopback S3 shards):      {b:.1f} images/CPU-s")
    print(f"ratio={b / a:.3f}")


if __name__ == "__main__":
    main()
