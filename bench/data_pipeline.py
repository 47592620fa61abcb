"""Images per CPU-second of the training input pipeline: this project's shard reader from a loopback
S3 store (SeaweedFS) against timm's ImageFolder on local disk, measured in the same run.

    .venv/bin/python bench/data_pipeline.py [--images 320] [--size 224]

Both sides decode the same ~100 KB 500x375 JPEGs in this process (num_workers=0) and draw the
paper's augmentation (RandomResizedCrop with random bilinear/bicubic, flip, rand-m9-mstd0.5-inc1,
normalise, random erasing 0.25) with the same seed per image (see ``Seeds``), so both do the same
augmentation work. Process CPU time counts every thread (s3fs's I/O thread too); each figure is the
best of 3 passes, in which the sides take turns batch by batch (this machine's speed drifts by 10-20%
from minute to minute; turns make the drift cost both sides alike). Printed, in order:

- decode only (Pillow and libjpeg-turbo via simplejpeg): the floor on this CPU;
- CPU ms per image of each stage of this reader's transform, and of timm's;
- ``worker_ratio``: the DataLoader workers' share alone, with normalisation and erasing left to the
  training device on both sides (timm's ``use_prefetcher=True`` transform and ``fast_collate``);
- ``cores_per_gpu_at_1000``: CPU cores this reader's workers need to feed 1,000 images/s;
- ``data.decode: gpu``: the workers' images per CPU-second when they only draw (decode, crop and
  RandAugment on the device), and the device step's images/s and CPU ms per image on the device this
  machine has (CUDA if present, else the CPU, where it is only a correctness path);
- shards re-encoded with ``--max-side`` (not part of the ratio): the whole pipeline against the originals;
- with ``--workers N`` DataLoader workers on each side (the workers-only transforms), persisting over
  ``--epochs`` epochs as in training, every worker process's CPU counted (whole passes, the sides alternating):
  images per CPU-second over the epochs, and, with passes of one epoch, the workers' start-up and the steady
  state (CPU = start-up + epochs x per epoch). ``parallel_worker_ratio`` is the steady state's, this reader
  against timm: a training epoch of ImageNet is 1.28M images, so the start-up (once per run) is no share of it;
  here, at 320 images, it is a tenth;
- the hand-over of ready images from the workers to the training process, CPU microseconds per image: through
  the reader's reused shared-memory slots (``orchestrator/data/batch_ring.py``) and through torch's own path, a
  new shared-memory segment per tensor per batch (which timm's loader takes);
- the same for MosaicML Streaming and litdata (``bench/data_peers.py``: their shards in the same store, timm's
  transform, their loaders' own caching and prefetching): ``streaming_ratio`` and ``litdata_ratio``, this reader's
  steady state against each (after ``bash scripts/install_peers.sh``);
- ``ratio=<reader / timm>`` for the whole pipeline on CPU (normalisation and erasing here too);
- last, the headline ``worker_ratio=<reader / timm>`` of the workers alone against timm with
  ``use_prefetcher`` (how timm's train.py runs by default).

The ``data.decode: gpu`` line counts the training process's CPU per image too: cores per GPU at 1,000
images/s = the workers' share + the device step's CPU in the training process (on a CPU-only machine the
device step's CPU includes its arithmetic, so that sum is an upper bound there).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import simplejpeg
import torch
from PIL import Image, ImageFilter
from timm.data import ImageDataset
from timm.data.loader import fast_collate
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator import storage  # noqa: E402
from orchestrator.data import batch_ring, device  # noqa: E402
from orchestrator.data import manifest as mf  # noqa: E402
from orchestrator.data.gpu_decode import DeviceCrop, TrainDraws  # noqa: E402
from orchestrator.data.randaugment import apply  # noqa: E402
from orchestrator.data.reader import PREFETCH, ReaderOptions, ShardDataset, ShardLoader  # noqa: E402
from orchestrator.data.shard_writer import WriteOptions, reencode, write_dataset  # noqa: E402
from orchestrator.data.sources import open_source  # noqa: E402
from orchestrator.data.transforms import TrainCrop, open_rgb, resize_hwc, timm_train_transform  # noqa: E402
from tests.services import S3Store, scratch  # noqa: E402

POLICY, RE_PROB = "rand-m9-mstd0.5-inc1", 0.25


def photo_like(rng: np.random.Generator) -> bytes:
    """A 500x375 JPEG of about 100 KB: smooth structure plus fine noise, like a photo."""
    base = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
    noise = rng.normal(0, 14, (375, 500, 3))
    img = Image.fromarray(np.clip(np.asarray(base.filter(ImageFilter.GaussianBlur(2)), float) + noise, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=92)
    return out.getvalue()


def reseed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)


class Seeds:
    """One seed per image, found from its pixels (timm's side gets a PIL image) or its bytes (ours), so
    both sides draw the same crop, flip and RandAugment ops for it."""

    def __init__(self) -> None:
        self.by_bytes: dict[int, int] = {}

    @staticmethod
    def of_bytes(data: bytes) -> int:
        return zlib.crc32(data[-4096:])  # the tail is entropy-coded data: unique, and as cheap as timm's key

    def add(self, data: bytes) -> None:
        self.by_bytes[self.of_bytes(data)] = self.of_pixels(open_rgb(data))

    @staticmethod
    def of_pixels(img: Image.Image) -> int:
        return zlib.crc32(img.crop((0, 0, 32, 32)).tobytes())

    def timm(self, transform: Callable[[Image.Image], Any]) -> Callable[[Image.Image], Any]:
        def seeded(img: Image.Image) -> Any:
            reseed(self.of_pixels(img))
            return transform(img)
        return seeded

    def ours(self, transform: Callable[[bytes], Any]) -> Callable[[bytes, int], Any]:
        def seeded(data: bytes, label: int) -> Any:
            reseed(self.by_bytes[self.of_bytes(data)])
            return transform(data), label
        return seeded


def paired_rates(sides: dict[str, tuple[Iterable[Any], Callable[[Any], Any]]], passes: int) -> dict[str, float]:
    """Images per CPU-second of each ``(loader, after)`` side, best of ``passes``. Within a pass the sides take
    turns batch by batch, so a slow or busy stretch of this shared machine costs them alike; each pass's first
    batch (start-up) is not counted."""
    best = dict.fromkeys(sides, 0.0)
    for epoch in range(passes):
        for loader, _ in sides.values():
            if isinstance(loader, ShardLoader):
                loader.set_epoch(epoch)  # a new epoch: the loader would resume the finished one (and read nothing)
        iters = {k: iter(loader) for k, (loader, _) in sides.items()}
        cpu, seen = dict.fromkeys(sides, 0.0), dict.fromkeys(sides, 0)
        for k, it in iters.items():
            sides[k][1](next(it))
        while iters:
            for k, (_, after) in sides.items():
                start = time.process_time()
                batch = next(iters[k], None)
                if batch is None:  # the loaders hold the same number of batches
                    assert all(next(it, None) is None for it in iters.values()), f"{k} ended before the others"
                    iters = {}
                    break
                seen[k] += len(after(batch)[1])  # the labels: every side yields (images, labels, ...)
                cpu[k] += time.process_time() - start
        best = {k: max(best[k], seen[k] / cpu[k]) for k in sides}
    return best


def cpu_of(fn: Callable[[], Any]) -> float:
    """CPU-seconds of ``fn``: this process's and its reaped children's (worker processes, once joined)."""
    before, cpu = resource.getrusage(resource.RUSAGE_CHILDREN), time.process_time()
    fn()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() - cpu + (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def parallel_cpu(sides: dict[str, Callable[[], Any]], passes: int, epochs: int) -> dict[str, float]:
    """CPU-seconds of a whole pass of ``epochs`` epochs over each side's loader with worker processes that persist
    across the epochs (as in training: timm's ``create_loader`` keeps them, and so does this reader), ended with
    the pass: the workers' CPU (reaped children) and this process's. The sides alternate pass by pass; the best
    (least) of ``passes``."""
    def run(make: Callable[[], Any]) -> None:
        loader = make()
        for epoch in range(epochs):
            if isinstance(loader, ShardLoader):
                loader.set_epoch(epoch)
            for _batch in loader:
                pass
        if isinstance(loader, ShardLoader):
            loader.close()
        elif getattr(loader, "_iterator", None) is not None:
            loader._iterator._shutdown_workers()  # joined, so reaped: their CPU is in RUSAGE_CHILDREN

    best = dict.fromkeys(sides, float("inf"))
    for _ in range(passes):
        for name, make in sides.items():
            best[name] = min(best[name], cpu_of(lambda make=make: run(make)))
    return best


class ReadyImages(IterableDataset):
    """``n`` ready uint8 images of the bench's size, with their integers, batched through ``slots`` slots a
    worker (0: torch's own path)."""

    def __init__(self, n: int, size: int, batch: int, slots: int) -> None:
        self.n, self.size, self.batch, self.slots = n, size, batch, slots

    def __iter__(self) -> Any:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        image = torch.zeros(self.size, self.size, 3, dtype=torch.uint8)
        samples = ((image.clone(), i % 1000, i, 0) for i in range(worker, self.n, workers))
        return batch_ring.batches(samples, self.batch, self.slots)


def handover_us(size: int, batch: int, workers: int, passes: int = 3) -> dict[str, float]:
    """CPU microseconds per image to hand ready images from ``workers`` workers to this process (the workers'
    CPU and this process's, less the same pass's images made and collated in this process), best of ``passes``."""
    n = 100 * batch
    def run(slots: int, workers: int) -> None:
        for b in DataLoader(ReadyImages(n, size, batch, slots), batch_size=None, collate_fn=batch_ring.as_is,
                            num_workers=workers, prefetch_factor=PREFETCH if workers else None):
            batch_ring.received(b)

    best = {"slots": float("inf"), "torch": float("inf"), "in_process": float("inf")}
    for _ in range(passes):
        for name, slots, w in (("slots", PREFETCH + 1, workers), ("torch", 0, workers), ("in_process", 0, 0)):
            best[name] = min(best[name], cpu_of(lambda slots=slots, w=w: run(slots, w)))
    return {k: 1e6 * (best[k] - best["in_process"]) / n for k in ("slots", "torch")}


def on_device(batch: Any) -> Any:
    """This reader's device step, here on the CPU: normalise, erase (keys from the sample ids)."""
    images, labels, ids, corrupt = batch
    x = device.normalize(images, torch.device("cpu"), channels_last=False)
    return device.random_erase(x, [device.sample_seed(0, 0, i) for i in ids.tolist()], RE_PROB), labels


def per_image_ms(fn: Callable[[Any], Any], items: list[Any]) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for item in items:
            fn(item)
        best = min(best, time.process_time() - start)
    return 1e3 * best / len(items)


def interleaved_ms(stages: dict[str, tuple[Callable[[Any], Any], list[Any]]]) -> dict[str, float]:
    """CPU ms per item of each ``(fn, items)`` stage (equal-length items), best of 3 passes; within a pass the
    stages take turns item by item, as the loaders do in ``paired_rates``."""
    n = len(next(iter(stages.values()))[1])
    best = dict.fromkeys(stages, float("inf"))
    for _ in range(3):
        spent = dict.fromkeys(stages, 0.0)
        for i in range(n):
            for name, (fn, items) in stages.items():
                start = time.process_time()
                fn(items[i])
                spent[name] += time.process_time() - start
        best = {k: min(best[k], 1e3 * spent[k] / n) for k in stages}
    return best


def stages(jpegs: list[bytes], size: int) -> None:
    """CPU ms per image of each stage, on the same images (crop boxes and ops drawn as in training)."""
    crop = TrainCrop(size, POLICY, "random")
    decoded = [torch.from_numpy(simplejpeg.decode_jpeg(j)) for j in jpegs]
    reseed(0)
    boxes = [crop.box(*d.shape[:2]) for d in decoded]
    crops = [resize_hwc(d[t:t + h, le:le + w], (size, size), m) for d, (t, le, h, w, m) in zip(decoded, boxes, strict=True)]
    batch = torch.stack(crops[:32])
    timm_tf = timm_train_transform(size, POLICY, RE_PROB, "random")
    rrc, flip, aa, to_tensor, norm, erase = timm_tf.transforms
    images = [open_rgb(j) for j in jpegs]
    reseed(0)
    cropped = [rrc(im) for im in images]
    tensors = [to_tensor(c) for c in cropped]
    ours = {
        "decode (simplejpeg)": (lambda j: simplejpeg.decode_jpeg(j, colorspace="RGB"), jpegs),
        "crop + resize (torch uint8)": (lambda i: resize_hwc(decoded[i][boxes[i][0]:boxes[i][0] + boxes[i][2],
                                                                        boxes[i][1]:boxes[i][1] + boxes[i][3]],
                                                             (size, size), boxes[i][4]), list(range(len(jpegs)))),
        "RandAugment (drawn, applied; Pillow where needed)": (lambda c: apply(c.numpy(), crop.randaugment()), crops),
    }
    timm_stages = {
        "decode (Pillow)": (open_rgb, jpegs),
        "RandomResizedCrop (Pillow)": (rrc, images),
        "flip": (flip, cropped),
        "RandAugment": (aa, cropped),
        "ToTensor": (to_tensor, cropped),
        "Normalize": (norm, tensors),
        "RandomErasing": (erase, [norm(t) for t in tensors]),
    }
    ms = interleaved_ms({**{("ours", k): v for k, v in ours.items()}, **{("timm", k): v for k, v in timm_stages.items()}})
    ours_ms = {k: ms[("ours", k)] for k in ours}
    ours_ms["normalize (device)"] = per_image_ms(lambda b: device.normalize(b, torch.device("cpu"), False), [batch]) / 32
    ours_ms["random erasing (device)"] = per_image_ms(lambda x: device.random_erase(x, list(range(32)), RE_PROB),
                                                      [device.normalize(batch, torch.device("cpu"), False)]) / 32
    timm_ms = {k: ms[("timm", k)] for k in timm_stages}
    for name, ms in (("this reader", ours_ms), ("timm", timm_ms)):
        print(f"{name} CPU ms per image: " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items())
              + f"; sum {sum(ms.values()):.2f}")


def device_step(batches: list[Any], size: int) -> tuple[float, float, str]:
    """``data.decode: gpu``'s device step over ``batches`` (best of 2): images/s, and CPU ms per image spent
    by this process; on CUDA when there is one."""
    where = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    crop = DeviceCrop(size, where)
    best = (0.0, float("inf"))
    for _ in range(2):
        start, cpu = time.perf_counter(), time.process_time()
        n = sum(len(crop(batch)[0]) for batch in batches)
        if where.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        best = (max(best[0], n / wall), min(best[1], 1e3 * cpu / n))
    return best[0], best[1], torch.cuda.get_device_name() if where.type == "cuda" else "cpu"


def read_ms(manifest: mf.Manifest, options: dict[str, Any]) -> float:
    """CPU ms per image to read every row group's images and labels as the reader does (each shard opened once,
    each row group's columns read as coalesced ranges)."""
    def read_all(_: None) -> None:
        for s in range(len(manifest.shards)):
            fs, path = storage.filesystem(manifest.shard_url(s), options)
            file = pq.ParquetFile(fs.open(path, "rb", cache_type="none"), pre_buffer=True)
            for g in range(file.num_row_groups):
                file.read_row_group(g, ["image", "label"]).column("image").combine_chunks().field("bytes").to_pylist()

    return per_image_ms(read_all, [None]) / manifest.num_samples


def peer_rates(folder: Path, store: S3Store, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """MosaicML Streaming's and litdata's CPU-seconds in the parallel configuration (``bench/data_peers.py``, in a
    child process with ``.peers/`` first on its path); none where ``scripts/install_peers.sh`` has not run."""
    peers = Path(__file__).resolve().parents[1] / ".peers"
    if not peers.is_dir():
        print("streaming, litdata: not measured (install them with: bash scripts/install_peers.sh)")
        return {}
    o = store.options
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("data_peers.py")), "--folder", str(folder), "--bucket",
         f"{store.bucket('bench')}/peers", "--endpoint", o["endpoint_url"], "--key", o["key"], "--secret", o["secret"],
         "--size", str(args.size), "--batch", str(args.batch), "--workers", str(args.workers), "--epochs", str(args.epochs)],
        env={**os.environ, "PYTHONPATH": str(peers)}, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--max-side", type=int, default=320, help="shorter side of the re-encoded shards")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="DataLoader workers of the parallel run")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the parallel run (its workers persist across them)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    tmp = scratch("bench-data-")
    folder = tmp / "imagefolder"
    seeds, jpegs = Seeds(), []
    for i in range(args.images):
        (folder / f"class{i % 10}").mkdir(parents=True, exist_ok=True)
        data = photo_like(rng)
        jpegs.append(data)
        seeds.add(data)
        (folder / f"class{i % 10}" / f"{i:05d}.jpg").write_bytes(data)
    print(f"{args.images} JPEGs 500x375, mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} KB, output {args.size} px")
    decode = interleaved_ms({"Pillow": (open_rgb, jpegs), "simplejpeg": (simplejpeg.decode_jpeg, jpegs)})
    print(f"decode only: Pillow {1e3 / decode['Pillow']:.0f} images/CPU-s, "
          f"simplejpeg {1e3 / decode['simplejpeg']:.0f} images/CPU-s")
    stages(jpegs[:100], args.size)

    store = S3Store(data_dir=tmp / "s3", log_path=tmp / "weed.log")
    store.data_dir.mkdir()
    store.start()
    try:
        url = f"{store.bucket('bench')}/shards"
        write_dataset(open_source(str(folder)), url, WriteOptions(shard_size_mb=8, rows_per_group=64), store.options)
        write_dataset(open_source(str(folder)), f"{url}-small", WriteOptions(shard_size_mb=8, rows_per_group=64,
                                                                              max_side=args.max_side), store.options)
        manifest = mf.load(f"{url}/train", store.options)
        print(f"this reader CPU ms per image: S3 read (s3fs, pyarrow) {read_ms(manifest, store.options):.2f}")
        full = timm_train_transform(args.size, POLICY, RE_PROB, "random")
        workers_only = timm_train_transform(args.size, POLICY, RE_PROB, "random", use_prefetcher=True)
        def reader(transform: Any = None, found: mf.Manifest = manifest, workers: int = 0) -> ShardLoader:
            ds = ShardDataset(found, seeds.ours(transform or TrainCrop(args.size, POLICY, "random")), train=True,
                              options=ReaderOptions(storage_options=store.options))
            return ShardLoader(ds, args.batch, workers)

        def timm_side(transform: Any, **kw: Any) -> DataLoader:
            return DataLoader(ImageDataset(str(folder), transform=seeds.timm(transform)), batch_size=args.batch,
                              drop_last=True, **kw)

        def fetched(batch: Any) -> Any:  # the loader's work alone: the batch as the DataLoader yields it
            return batch

        best = paired_rates({
            "timm": (timm_side(full), fetched),
            "reader": (reader(), on_device),
            "timm_workers": (timm_side(workers_only, collate_fn=fast_collate), fetched),
            "reader_workers": (reader(), fetched),
        }, passes=3)
        for jpeg in jpegs:  # a re-encoded image draws with its original's seed
            seeds.by_bytes[seeds.of_bytes(reencode(jpeg, args.max_side))] = seeds.by_bytes[seeds.of_bytes(jpeg)]
        others = paired_rates({
            "reader": (reader(), on_device),
            "max_side": (reader(found=mf.load(f"{url}-small/train", store.options)), on_device),
            "gpu_workers": (reader(TrainDraws(args.size, POLICY, "random")), fetched),
        }, passes=2)
        gpu_batches = list(reader(TrainDraws(args.size, POLICY, "random")))
        parallel_sides = {
            "timm_workers": lambda: timm_side(workers_only, collate_fn=fast_collate, num_workers=args.workers,
                                              persistent_workers=True),
            "reader_workers": lambda: reader(workers=args.workers),
        }
        one_epoch = parallel_cpu(parallel_sides, passes=3, epochs=1)
        many = parallel_cpu(parallel_sides, passes=3, epochs=args.epochs)
        peers = peer_rates(folder, store, args)
    finally:
        store.stop()
    handover = handover_us(args.size, args.batch, args.workers)
    device_rate, device_cpu_ms, where = device_step(gpu_batches, args.size)
    print(f"timm ImageFolder (local disk), whole pipeline:  {best['timm']:.1f} images/CPU-s")
    print(f"this reader (loopback S3), whole pipeline:      {best['reader']:.1f} images/CPU-s")
    print(f"workers only: timm (use_prefetcher) {best['timm_workers']:.1f}, this reader {best['reader_workers']:.1f} images/CPU-s")
    print(f"cores_per_gpu_at_1000={1000 / best['reader_workers']:.2f}")
    gpu_cores = 1000 / others["gpu_workers"] + device_cpu_ms
    print(f"data.decode gpu: workers {others['gpu_workers']:.0f} images/CPU-s "
          f"({others['gpu_workers'] / best['reader_workers']:.1f}x the cpu path's); device step on {where}: "
          f"{device_rate:.0f} images/s, {device_cpu_ms:.2f} CPU ms per image in the training process; "
          f"cores per GPU at 1000 images/s, workers and training process: {gpu_cores:.2f}"
          + (" (an upper bound: the device here is the CPU)" if where == "cpu" else ""))
    print(f"--max-side {args.max_side} shards (not in the ratio): {others['max_side']:.1f} images/CPU-s, "
          f"{others['max_side'] / others['reader']:.2f}x the same reader on the originals")
    print(f"hand-over from {args.workers} workers, CPU us per image: through reused slots {handover['slots']:.0f}, "
          f"through torch's own path {handover['torch']:.0f}")
    images = args.images // args.batch * args.batch  # both sides drop the last partial batch
    for name, r in peers.items():
        assert r["images_per_epoch"] == images, f"{name} yields {r['images_per_epoch']} images an epoch, not {images}"
        many[name], one_epoch[name] = r["cpu_s"], r["one_epoch_cpu_s"]
    rate = {k: images * args.epochs / v for k, v in many.items()}
    per_epoch = {k: (many[k] - one_epoch[k]) / (args.epochs - 1) for k in many}  # CPU = start-up + epochs x per_epoch
    steady = {k: images / per_epoch[k] for k in many}
    start_up = {k: one_epoch[k] - per_epoch[k] for k in many}
    print(f"{args.workers} DataLoader workers, their CPU counted, {args.epochs} epochs of {images} images (images/CPU-s; "
          "start-up CPU-s; an epoch after the first, the steady state of a long run):")
    for k, name in (("timm_workers", "timm (use_prefetcher)"), ("reader_workers", "this reader"),
                    *((p, p) for p in peers)):
        print(f"  {name:<22} {rate[k]:7.1f} over {args.epochs} epochs, start-up {start_up[k]:.2f}, steady {steady[k]:7.1f}")
    print(f"over {args.epochs} epochs, start-up included: {args.workers}-worker ratio "
          f"{rate['reader_workers'] / rate['timm_workers']:.3f}"
          + "".join(f", against {p} {rate['reader_workers'] / rate[p]:.3f}" for p in peers))
    for p in peers:
        print(f"{p}_ratio={steady['reader_workers'] / steady[p]:.3f}")
    print(f"parallel_worker_ratio={steady['reader_workers'] / steady['timm_workers']:.3f}")
    print(f"ratio={best['reader'] / best['timm']:.3f}")
    print(f"worker_ratio={best['reader_workers'] / best['timm_workers']:.3f}")


if __name__ == "__main__":
    main()
