"""Streaming reader of Parquet shards: a world-size-independent order, exact mid-epoch resume, fault tolerance.

Training epochs follow ``order.EpochOrder`` (partitions of a permuted row-group stream, read by the ranks and
DataLoader workers that own them), so a run resumed on another world size or worker count reads the same
micro-batches. Validation keeps the natural order and splits all N samples (no drop), so each image is seen once.

Resume: the loader records how many micro-batches the whole world consumed this epoch; a resumed worker skips
exactly those without reading or decoding them, and worker roles are rotated so the DataLoader's round robin
continues with the right one. Augmentation RNGs are seeded per sample from ``(seed, epoch, sample id)``, so a
skipped prefix does not change what follows.
"""

from __future__ import annotations

import logging
import math
import random
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from fsspec.spec import AbstractBufferedFile
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from orchestrator import faults, storage
from orchestrator.data import batch_ring, worker_stacks
from orchestrator.data.device import sample_seed
from orchestrator.data.manifest import Manifest
from orchestrator.data.order import EpochOrder, auto_partitions
from orchestrator.data.shard_cache import ShardCache
from orchestrator.errors import DataError

log = logging.getLogger(__name__)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ReaderOptions:
    shuffle_buffer: int = 2048
    max_corrupt_fraction: float = 0.001
    retry: storage.RetryPolicy = storage.RetryPolicy()
    storage_options: dict[str, Any] | None = None
    cache_dir: str | None = None  # node-local shard cache (``shard_cache``), None: read from storage
    cache_limit_bytes: int = 0


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([k & 0xFFFFFFFF for k in key])


MIN_CORRUPT = 3  # corrupt images always tolerated, however small the split or the fraction


def corrupt_budget(fraction: float, samples: int) -> float:
    """Corrupt images allowed among ``samples``: the same whatever the world size or worker count."""
    return max(fraction * samples, MIN_CORRUPT)


def split_evenly(start: int, stop: int, parts: int, index: int) -> tuple[int, int]:
    """The ``index``-th of ``parts`` contiguous pieces of ``[start, stop)``; sizes differ by at most one."""
    n = stop - start
    base, extra = divmod(n, parts)
    a = start + index * base + min(index, extra)
    return a, a + base + (1 if index < extra else 0)


def _nearest(bounds: np.ndarray, x: int) -> int:
    """The value of sorted ``bounds`` nearest ``x`` (ties: the lower); monotone in ``x``, so cuts never cross."""
    i = int(np.searchsorted(bounds, x))
    if i == len(bounds) or (i > 0 and x - bounds[i - 1] <= bounds[i] - x):
        return int(bounds[i - 1])
    return int(bounds[i])


def shuffle_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The output order of a bounded shuffle buffer fed ``0..n-1`` (only indices: nothing is read)."""
    if buffer <= 1:
        return np.arange(n)
    draws = rng.random(n)
    buf: list[int] = []
    out: list[int] = []
    for i in range(n):
        buf.append(i)
        if len(buf) >= buffer:
            j = int(draws[i] * len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            out.append(buf.pop())
    rng.shuffle(buf)
    out.extend(buf)
    return np.asarray(out, dtype=np.int64)


def select_groups(manifest: Manifest, fraction: float = 1.0) -> np.ndarray:
    """The global row-group table ``[shard, row group, first sample id, rows]``; ``fraction < 1`` keeps the
    first row groups (a fixed subset: the shard writer mixed the classes)."""
    groups = []
    offset = 0
    for s, shard in enumerate(manifest.shards):
        for g, rows in enumerate(shard.row_groups):
            groups.append((s, g, offset, rows))
            offset += rows
    if fraction < 1.0:
        groups = groups[:max(1, math.ceil(fraction * len(groups)))]
    return np.asarray(groups, dtype=np.int64).reshape(-1, 4)


def epoch_order(groups: np.ndarray, micro_batch: int, global_batch: int, partitions: int | None) -> EpochOrder:
    """The training order of these row groups; ``partitions`` None picks ``auto_partitions``."""
    num_samples = int(groups[:, 3].sum())
    micro_per_step = global_batch // micro_batch
    if partitions is None:
        micro_batches = num_samples // global_batch * micro_per_step
        partitions = auto_partitions(num_samples, num_samples / max(len(groups), 1), micro_batches)
    return EpochOrder(num_samples, micro_batch, micro_per_step, partitions)


def checked_order(groups: np.ndarray, micro_batch: int, global_batch: int, partitions: int | None,
                  worlds: list[int], where: str) -> EpochOrder:
    """``epoch_order``, refused (naming ``where``) when it holds no step or a world size cannot read it."""
    order = epoch_order(groups, micro_batch, global_batch, partitions)
    if order.steps == 0:
        raise DataError(f"{where}: {order.num_samples} samples hold no global batch of {global_batch}")
    for world in worlds:
        if (why := order.why_not(world)) is not None:
            raise DataError(f"{where}: {why}")
    return order


class _Shared:
    """An int field of ``ShardDataset._position``, the shared-memory tensor that persistent workers read."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __get__(self, ds: ShardDataset, owner: type | None = None) -> int:
        return int(ds._position[self.index])

    def __set__(self, ds: ShardDataset, value: int) -> None:
        ds._position[self.index] = value


class ShardDataset(IterableDataset):
    """Yields ``(*transform(image bytes, target), sample_id, corrupt)`` for one rank; use it through ``ShardLoader``.

    The target is the label, or for a segmentation manifest the mask's PNG bytes. ``transform`` decodes too
    (``WithLabel(transforms.TrainCrop)``, ``seg_transforms.SegTrain``, ...); a decode error marks the sample corrupt.
    ``global_batch`` (default: one micro-batch per rank) and ``partitions`` define the training order."""

    def __init__(self, manifest: Manifest, transform: Callable[[bytes, Any], tuple[Any, Any]], *, train: bool,
                 rank: int = 0, world_size: int = 1, seed: int = 0, options: ReaderOptions = ReaderOptions(),
                 fraction: float = 1.0, global_batch: int | None = None, partitions: int | None = None) -> None:
        self.manifest, self.transform, self.train = manifest, transform, train
        self.rank, self.world_size, self.seed, self.options = rank, world_size, seed, options
        self.groups = select_groups(manifest, fraction)
        self.num_samples = int(self.groups[:, 3].sum())
        self.global_batch, self.partitions = global_batch, partitions
        # (epoch, this rank's micro-batches the loader already consumed this epoch), set by ShardLoader: in shared
        # memory, so DataLoader workers that persist across epochs read the current values
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()
        # Each shard's Parquet footer, read once per process: a persistent worker opens a shard again each time
        # its partitions come back to it (a row group in most epochs at ImageNet's size), without asking the store.
        self.footers: dict[int, pq.FileMetaData] = {}
        self.batch_size = 1

    epoch = _Shared(0)
    skip_batches = _Shared(1)

    @property
    def order(self) -> EpochOrder:
        if not self.train:
            raise TypeError("validation has no training order")
        gbs = self.global_batch or self.batch_size * self.world_size
        return checked_order(self.groups, self.batch_size, gbs, self.partitions, [self.world_size], self.manifest.root)

    # --- layout -------------------------------------------------------------------------------
    def val_span(self, worker: int, num_workers: int) -> tuple[int, int]:
        """Validation: this worker's contiguous part of this rank's contiguous part of all samples, both cut at the
        row-group boundary nearest an even split. A row group is read whole, so cutting inside one reads it twice:
        50,000 images in groups of 100 on 256 ranks x 10 workers read 6.0x their bytes cut evenly, 1.0x cut at groups
        (some ranks then evaluate a group more than others, which costs far less than reading; none waits on
        another per batch)."""
        bounds = np.concatenate([[0], np.cumsum(self.groups[:, 3])])
        a, b = (_nearest(bounds, x) for x in split_evenly(0, self.num_samples, self.world_size, self.rank))
        a, b = (_nearest(bounds, x) for x in split_evenly(a, b, num_workers, worker))
        return int(a), int(b)

    def _stream_slice(self, groups: np.ndarray, a: int, b: int) -> np.ndarray:
        """``[n, 3]`` rows of (row-group index into self.groups, row in group, sample id) for stream ``[a, b)``."""
        ends = np.cumsum(groups[:, 3])
        starts = ends - groups[:, 3]
        first, last = np.searchsorted(ends, a, side="right"), np.searchsorted(starts, b, side="left")
        order_index = np.searchsorted(self.groups[:, 2], groups[first:last, 2])  # ids increase in self.groups
        parts = []
        for k, (s0, g) in enumerate(zip(starts[first:last], groups[first:last], strict=True)):
            rows = np.arange(max(a - s0, 0), min(b - s0, g[3]))
            parts.append(np.stack([np.full_like(rows, order_index[k]), rows, g[2] + rows], axis=1))
        return np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)

    def partition_items(self, p: int, order: EpochOrder, stream: np.ndarray) -> np.ndarray:
        """Partition ``p`` of this epoch's ``stream`` (its permuted row groups) in yield order (rows as in
        ``_stream_slice``)."""
        items = self._stream_slice(stream, *order.partition_span(p))
        return items[shuffle_order(len(items), self.options.shuffle_buffer, _rng(self.seed, self.epoch, p))]

    def worker_items(self, role: int, num_workers: int, start: int = 0) -> np.ndarray:
        """What worker ``role`` of ``num_workers`` yields, from this rank's micro-batch ``start`` on."""
        if not self.train:
            return self._stream_slice(self.groups, *self.val_span(role, num_workers))
        m, order = self.batch_size, self.order
        stream = self.groups[_rng(self.seed, self.epoch).permutation(len(self.groups))]
        parts: dict[int, np.ndarray] = {}
        out = []
        for p, t in order.schedule(self.rank, self.world_size, role, num_workers, start):
            if p not in parts:
                parts[p] = self.partition_items(p, order, stream)
            out.append(parts[p][t * m:(t + 1) * m])
        return np.concatenate(out) if out else np.zeros((0, 3), dtype=np.int64)

    # --- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[Any, int, int, int]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        start = self.skip_batches if self.train else 0
        # A new DataLoader starts its round at process 0: rotate roles so the round continues where it stopped.
        items = self.worker_items((worker + start) % num_workers, num_workers, start)
        steps = (start + worker, num_workers, self.order) if self.train else None
        yield from _WorkerStream(self, items, steps)


class _WorkerStream:
    """Reads row groups lazily, decodes, transforms; replaces corrupt images so batch counts never change.

    A corrupt image is replaced by a good one of its own micro-batch (the one before it, or the first), so
    the replacement is the same on any world size or worker count."""

    MAX_OPEN = 4  # open shards per worker: its partitions interleave, each reading its own shard

    def __init__(self, ds: ShardDataset, items: np.ndarray, steps: tuple[int, int, EpochOrder] | None = None) -> None:
        self.ds, self.items = ds, items
        self.epoch = ds.epoch  # read once: the dataset keeps it in shared memory, a tensor read per sample
        self.steps = steps  # training: (this worker's first micro-batch of the rank, its stride, the order)
        self.remaining = np.bincount(items[:, 0], minlength=len(ds.groups))
        self.cache: dict[int, tuple[list[bytes | None], list[int]]] = {}
        self.files: dict[int, pq.ParquetFile] = {}
        self.shard_cache: ShardCache | None = None
        self.corrupt = 0

    def __iter__(self) -> Iterator[tuple[Any, int, int, int]]:
        m = self.ds.batch_size
        for k, lo in enumerate(range(0, len(self.items), m)):
            if self.steps is not None:
                self._maybe_stall(k)
            batch = []
            for group, row, sample_id in self.items[lo:lo + m]:
                data, target = self._row(int(group), int(row))
                out = self._decode(data, target, int(sample_id))
                if out is None:
                    self._count_corrupt(int(group), int(row))
                batch.append((data, target, out, int(sample_id)))
            good = [k for k, b in enumerate(batch) if b[2] is not None]
            for k, (_, _, out, sample_id) in enumerate(batch):
                if out is not None:
                    yield *out, sample_id, 0
                    continue
                if not good:
                    raise DataError(f"{self.ds.manifest.root}: a whole batch of corrupt images (sample ids "
                                    f"{[b[3] for b in batch]}); the warnings above name each shard and row")
                data, target, _, sample_id = batch[max((g for g in good if g < k), default=good[0])]
                yield *self._decode(data, target, sample_id), sample_id, 1

    def _maybe_stall(self, k: int) -> None:
        """The ``stall-loader`` fault (``orchestrator.faults``): block here, in this worker, at its step."""
        assert self.steps is not None
        first, stride, order = self.steps
        per_rank_step = order.micro_per_step // self.ds.world_size
        step = self.epoch * order.steps + (first + k * stride) // per_rank_step
        faults.maybe_stall("stall-loader", step, self.ds.rank)

    def _decode(self, data: bytes, target: Any, sample_id: int) -> tuple[Any, Any] | None:
        """The transform of the sample (None when it does not decode), its RNGs seeded per sample."""
        seed = sample_seed(self.ds.seed, self.epoch, sample_id)
        random.seed(seed)
        np.random.seed(seed)
        # CPU generator only: torch.manual_seed also queues a CUDA seeding that records a stack trace (~0.5 ms).
        torch.default_generator.manual_seed(seed)
        try:
            return self.ds.transform(data, target)
        except DECODE_ERRORS:
            return None

    def _count_corrupt(self, group: int, row: int) -> None:
        self.corrupt += 1
        shard, g = int(self.ds.groups[group, 0]), int(self.ds.groups[group, 1])
        row_in_shard = int(sum(self.ds.manifest.shards[shard].row_groups[:g])) + row
        where = f"shard {self.ds.manifest.shard_url(shard)} row {row_in_shard}"
        allowed = corrupt_budget(self.ds.options.max_corrupt_fraction, self.ds.num_samples)
        log.warning("corrupt image skipped: %s (%d so far in this worker)", where, self.corrupt)
        if self.corrupt > allowed:  # a backstop: the loop checks the sum over all ranks and workers
            raise DataError(
                f"{where}: corrupt image; {self.corrupt} of the split's {self.ds.num_samples} samples are corrupt in "
                f"one worker alone, more than data.max_corrupt_fraction={self.ds.options.max_corrupt_fraction}"
            )

    def _row(self, group: int, row: int) -> tuple[bytes, Any]:
        if group not in self.cache:
            self.cache[group] = self._read_group(group)
        images, labels = self.cache[group]
        data, label = images[row], labels[row]
        assert data is not None
        images[row] = None  # each row is read once: free its bytes now, not when the whole group is done
        self.remaining[group] -= 1
        if self.remaining[group] == 0:
            del self.cache[group]
        return data, label

    def _read_group(self, group: int) -> tuple[list[bytes], list[Any]]:
        shard, g = int(self.ds.groups[group, 0]), int(self.ds.groups[group, 1])
        url = self.ds.manifest.shard_url(shard)
        opts = self.ds.options
        segmentation = self.ds.manifest.task == "segmentation"

        def read() -> tuple[list[bytes], list[Any]]:
            try:
                if shard not in self.files:
                    if len(self.files) >= self.MAX_OPEN:
                        self.files.pop(next(iter(self.files)))
                    footers = self.ds.footers
                    self.files[shard] = open_shard(url, opts.storage_options, self._cached(shard),
                                                   self.ds.manifest.shards[shard].bytes, footers.get(shard))
                    footers[shard] = self.files[shard].metadata
                table = self.files[shard].read_row_group(g, columns=["image", "mask" if segmentation else "label"])
            except Exception:
                self.files.pop(shard, None)  # reopen on retry: the old handle may be stale
                raise
            images = table.column("image").combine_chunks().field("bytes").to_pylist()
            if segmentation:
                return images, table.column("mask").combine_chunks().field("bytes").to_pylist()
            return images, table.column("label").to_pylist()

        return storage.with_retries(read, f"reading {url} row group {g}", opts.retry, opts.storage_options)

    def _cached(self, shard: int) -> str | None:
        """The node-local copy of ``shard`` (fetched now if it is not there), or None without a cache."""
        opts = self.ds.options
        if opts.cache_dir is None:
            return None
        if self.shard_cache is None:
            self.shard_cache = ShardCache(opts.cache_dir, opts.cache_limit_bytes, opts.storage_options)
        found = self.shard_cache.local(self.ds.manifest.shard_url(shard), self.ds.manifest.shards[shard])
        return str(found) if found is not None else None


def open_shard(url: str, storage_options: dict[str, Any] | None, local: str | None = None, size: int = 0,
               metadata: pq.FileMetaData | None = None) -> pq.ParquetFile:
    """A shard as the reader opens it: row groups are read as coalesced byte ranges (pre_buffer) straight from
    storage (fsspec's read-ahead cache only copied them once more), or from its ``local`` copy. With its ``size``
    (the manifest's) and its footer's ``metadata`` already known, opening asks the store nothing."""
    if local is not None:
        return pq.ParquetFile(local, pre_buffer=True, metadata=metadata)
    fs, path = storage.filesystem(url, storage_options)
    if size <= 0:  # a manifest without sizes
        return pq.ParquetFile(fs.open(path, "rb", cache_type="none"), pre_buffer=True, metadata=metadata)
    f = fs.open(path, "rb", cache_type="none", size=size)
    if isinstance(f, AbstractBufferedFile):
        # s3fs asks for the object's details (a HEAD) at the first read, for an ETag check that an immutable,
        # sha256-recorded shard does not need
        f.details = {"name": path, "size": size, "type": "file"}
    return pq.ParquetFile(f, pre_buffer=True, metadata=metadata)


class WithLabel:
    """A classification transform (bytes -> image) as a reader transform: ``(bytes, label) -> (image, label)``."""

    def __init__(self, transform: Callable[[bytes], Any]) -> None:
        self.transform = transform

    def __call__(self, data: bytes, label: Any) -> tuple[Any, Any]:
        return self.transform(data), label


class _Batches(IterableDataset):
    """The dataset's samples as micro-batches, collated in the worker through ``batch_ring``'s reused slots."""

    def __init__(self, dataset: ShardDataset, slots: int) -> None:
        self.dataset, self.slots = dataset, slots

    def __iter__(self) -> Iterator[Any]:
        return batch_ring.batches(iter(self.dataset), self.dataset.batch_size, self.slots)


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave SIGTERM and SIGINT to the training process. Slurm, Ctrl-C and ``kill``
    signal every process of the job or group; a worker that died of it would take the graceful stop
    (finish the step, checkpoint) down with it. The training process shuts its workers down itself,
    and they exit when it dies (torch's parent watchdog)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker_stacks.register()  # the stall watchdog can ask for this worker's stacks


PREFETCH = 4  # batches each DataLoader worker prepares ahead


class ShardLoader:
    """A DataLoader over a ShardDataset that remembers how many micro-batches the world consumed (for resume).

    Training uses as many of ``num_workers`` as divide the rank's partitions (``EpochOrder.workers``). The workers
    persist across epochs (forking them again each epoch cost a pause per epoch and per evaluation); ``close`` ends
    them."""

    def __init__(self, dataset: ShardDataset, batch_size: int, num_workers: int, pin_memory: bool = False,
                 on_batch: Callable[[Any], Any] | None = None) -> None:
        self.dataset, self.pin_memory, self.on_batch = dataset, pin_memory, on_batch  # on_batch: in this process
        dataset.batch_size = batch_size
        self.num_workers = dataset.order.workers(dataset.world_size, num_workers) if dataset.train else num_workers
        if self.num_workers != num_workers:
            log.info("data.num_workers=%d: using %d, the most that divide this rank's %d partitions",
                     num_workers, self.num_workers, dataset.order.partitions // dataset.world_size)
        self.epoch = 0
        self.consumed = 0  # this rank's micro-batches
        self.progress: Callable[[], None] | None = None  # called per batch (the stall watchdog)
        self._loader: DataLoader | None = None

    def __len__(self) -> int:
        ds = self.dataset
        if ds.train:
            return ds.order.micro_batches // ds.world_size
        workers = max(1, self.num_workers)
        return sum(-(-(hi - lo) // ds.batch_size) for lo, hi in (ds.val_span(w, workers) for w in range(workers)))

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def state_dict(self) -> dict[str, int]:
        """Where the epoch stands, in world-size-free terms, and the order it follows."""
        order = self.dataset.order
        return {"epoch": self.epoch, "micro_batches": self.consumed * self.dataset.world_size,
                "partitions": order.partitions, "micro_batch": order.micro_batch, "world_size": self.dataset.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        world = self.dataset.world_size
        if state["micro_batches"] % world:
            raise DataError(f"the checkpoint stopped after {state['micro_batches']} micro-batches of epoch "
                            f"{state['epoch']}, which {world} ranks cannot split")
        self.epoch, self.consumed = int(state["epoch"]), int(state["micro_batches"]) // world

    def __iter__(self) -> Iterator[Any]:
        ds = self.dataset
        if not ds.train:
            self.consumed = 0  # evaluation always reads the whole split
        ds.epoch, ds.skip_batches = self.epoch, self.consumed
        if self._loader is None:
            workers = self.num_workers
            self._loader = DataLoader(_Batches(ds, PREFETCH + 1), batch_size=None, collate_fn=batch_ring.as_is,
                                      num_workers=workers, pin_memory=self.pin_memory, persistent_workers=workers > 0,
                                      worker_init_fn=ignore_stop_signals, prefetch_factor=PREFETCH if workers else None)
        for batch in self._loader:
            batch = batch_ring.received(batch)
            self.consumed += 1
            if self.progress is not None:
                self.progress()
            yield batch if self.on_batch is None else self.on_batch(batch)
        batch_ring.forget(self._worker_pids())

    def _worker_pids(self) -> list[int]:
        iterator = getattr(self._loader, "_iterator", None)
        return [w.pid for w in getattr(iterator, "_workers", [])]

    def close(self) -> None:
        """End the persistent workers (they also end with this loader, or with the process)."""
        batch_ring.forget(self._worker_pids())
        if (iterator := getattr(self._loader, "_iterator", None)) is not None:
            iterator._shutdown_workers()  # torch's own shutdown of a persistent iterator
        self._loader = None
