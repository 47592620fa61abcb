"""Streaming reader of Parquet shards: deterministic sharding, exact mid-epoch resume, fault tolerance.

How an epoch is laid out (train):
  1. The row groups of all shards are permuted with ``(seed, epoch)`` and concatenated: the epoch's stream.
  2. Rank r takes the contiguous slice ``[r*M, (r+1)*M)``, ``M = N // world_size``. The remainder
     (fewer than world_size samples) is dropped for this epoch; the permutation changes which ones.
  3. The rank's slice is split contiguously into one part per DataLoader worker (sizes differ by <= 1),
     and each worker shuffles its part through a bounded buffer seeded by ``(seed, epoch, rank, worker)``.
Every rank therefore yields the same number of batches, and reads whole row groups sequentially.
Validation keeps the natural order and splits all N samples (no drop), so each image is seen once.

Resume: the DataLoader takes one batch from each worker in turn, so the number of batches the
training loop consumed determines how many samples each worker produced and whose turn is next;
``ShardLoader`` records that count, a resumed worker skips exactly those samples without reading
or decoding them, and worker roles are rotated so the round continues with the right one.
Augmentation RNGs are seeded per sample from ``(seed, epoch, sample id)``, so a skipped prefix does
not change what follows.
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
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from orchestrator import storage
from orchestrator.data.device import sample_seed
from orchestrator.data.manifest import Manifest
from orchestrator.errors import DataError

log = logging.getLogger(__name__)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ReaderOptions:
    shuffle_buffer: int = 2048
    max_corrupt_fraction: float = 0.001
    retry: storage.RetryPolicy = storage.RetryPolicy()
    storage_options: dict[str, Any] | None = None


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


def round_robin_counts(consumed: int, per_worker: list[int]) -> tuple[list[int], int]:
    """Batches each worker produced after the DataLoader yielded ``consumed``, and whose turn is next.

    The DataLoader takes one batch from each worker in turn and skips exhausted workers.
    """
    produced = [0] * len(per_worker)
    w = 0
    for _ in range(consumed):
        while produced[w] >= per_worker[w]:
            w = (w + 1) % len(per_worker)
        produced[w] += 1
        w = (w + 1) % len(per_worker)
    for _ in range(len(per_worker)):
        if produced[w] < per_worker[w]:
            break
        w = (w + 1) % len(per_worker)
    return produced, w


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


class ShardDataset(IterableDataset):
    """Yields ``(transform(image bytes), label, sample_id, corrupt)`` for one rank; use it through ``ShardLoader``.

    ``transform`` decodes too (``transforms.TrainCrop``/``EvalCrop``); a decode error marks the image corrupt."""

    def __init__(self, manifest: Manifest, transform: Callable[[bytes], Any], *, train: bool,
                 rank: int = 0, world_size: int = 1, seed: int = 0, options: ReaderOptions = ReaderOptions(),
                 fraction: float = 1.0) -> None:
        self.manifest, self.transform, self.train = manifest, transform, train
        self.rank, self.world_size, self.seed, self.options = rank, world_size, seed, options
        # The global row-group table: (shard, row group, first sample id, rows).
        groups = []
        offset = 0
        for s, shard in enumerate(manifest.shards):
            for g, rows in enumerate(shard.row_groups):
                groups.append((s, g, offset, rows))
                offset += rows
        if fraction < 1.0:  # a fixed subset: the first row groups (the shard writer mixed the classes)
            groups = groups[:max(1, math.ceil(fraction * len(groups)))]
            offset = sum(g[3] for g in groups)
        self.groups = np.asarray(groups, dtype=np.int64).reshape(-1, 4)
        self.num_samples = offset
        if train and self.num_samples < world_size:
            raise DataError(f"{manifest.root}: {self.num_samples} samples cannot feed {world_size} ranks")
        self.epoch = 0
        self.batch_size = 1
        self.drop_last = train
        self.skip_batches = 0  # batches the loader already consumed this epoch (set by ShardLoader)

    # --- layout -------------------------------------------------------------------------------
    def rank_range(self) -> tuple[int, int]:
        if self.train:
            per_rank = self.num_samples // self.world_size
            return self.rank * per_rank, (self.rank + 1) * per_rank
        return split_evenly(0, self.num_samples, self.world_size, self.rank)

    def worker_sizes(self, num_workers: int) -> list[int]:
        a, b = self.rank_range()
        return [hi - lo for lo, hi in (split_evenly(a, b, num_workers, w) for w in range(num_workers))]

    def batches_per_worker(self, num_workers: int) -> list[int]:
        sizes = self.worker_sizes(num_workers)
        if self.drop_last:
            return [n // self.batch_size for n in sizes]
        return [-(-n // self.batch_size) for n in sizes]

    def _stream_groups(self) -> np.ndarray:
        if not self.train:
            return self.groups
        return self.groups[_rng(self.seed, self.epoch).permutation(len(self.groups))]

    def worker_items(self, worker: int, num_workers: int) -> np.ndarray:
        """``[n, 3]`` rows of (row-group index into self.groups, row in group, sample id) in yield order."""
        groups = self._stream_groups()
        a, b = split_evenly(*self.rank_range(), num_workers, worker)
        ends = np.cumsum(groups[:, 3])
        starts = ends - groups[:, 3]
        first, last = np.searchsorted(ends, a, side="right"), np.searchsorted(starts, b, side="left")
        parts = []
        order_index = _row_group_index(self.groups, groups[first:last])
        for k, (s0, g) in enumerate(zip(starts[first:last], groups[first:last], strict=True)):
            lo, hi = max(a - s0, 0), min(b - s0, g[3])
            rows = np.arange(lo, hi)
            parts.append(np.stack([np.full_like(rows, order_index[k]), rows, g[2] + rows], axis=1))
        items = np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)
        if self.train:
            items = items[shuffle_order(len(items), self.options.shuffle_buffer, _rng(self.seed, self.epoch, self.rank, worker))]
        return items

    # --- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[Any, int, int, int]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        produced, next_turn = round_robin_counts(self.skip_batches, self.batches_per_worker(num_workers))
        # A new DataLoader starts its round at process 0: rotate roles so the round continues where it stopped.
        worker = (worker + next_turn) % num_workers
        items = self.worker_items(worker, num_workers)
        yield from _WorkerStream(self, items, skip=produced[worker] * self.batch_size)


def _row_group_index(all_groups: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Position of each chosen (shard, group) row in ``all_groups`` (ids are increasing there)."""
    return np.searchsorted(all_groups[:, 2], chosen[:, 2])


class _WorkerStream:
    """Reads row groups lazily, decodes, transforms; replaces corrupt images so batch counts never change."""

    def __init__(self, ds: ShardDataset, items: np.ndarray, skip: int) -> None:
        self.ds, self.items, self.skip = ds, items, skip
        self.remaining = np.bincount(items[skip:, 0], minlength=len(ds.groups))
        self.cache: dict[int, tuple[list[bytes], list[int]]] = {}
        self.files: dict[int, pq.ParquetFile] = {}
        self.corrupt = 0

    def __iter__(self) -> Iterator[tuple[Any, int, int, int]]:
        last_good: tuple[bytes, int, int] | None = None
        pending = 0
        for group, row, sample_id in self.items[self.skip :]:
            data, label = self._row(int(group), int(row))
            image = self._decode(data, int(sample_id))
            if image is None:
                self._count_corrupt(int(group), int(row))
                if last_good is None:
                    pending += 1
                    continue
                yield self._decode(last_good[0], last_good[2]), last_good[1], last_good[2], 1
                continue
            last_good = (data, label, int(sample_id))
            yield image, label, int(sample_id), 0
            for _ in range(pending):  # corrupt images before the first good one
                yield self._decode(data, int(sample_id)), label, int(sample_id), 1
            pending = 0

    def _decode(self, data: bytes, sample_id: int) -> Any:
        """The transform of the image's bytes (None when they do not decode), its RNGs seeded per image."""
        seed = sample_seed(self.ds.seed, self.ds.epoch, sample_id)
        random.seed(seed)
        np.random.seed(seed)
        # CPU generator only: torch.manual_seed also queues a CUDA seeding that records a stack trace (~0.5 ms).
        torch.default_generator.manual_seed(seed)
        try:
            return self.ds.transform(data)
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

    def _row(self, group: int, row: int) -> tuple[bytes, int]:
        if group not in self.cache:
            self.cache[group] = self._read_group(group)
        images, labels = self.cache[group]
        data, label = images[row], labels[row]
        self.remaining[group] -= 1
        if self.remaining[group] == 0:
            del self.cache[group]
        return data, label

    def _read_group(self, group: int) -> tuple[list[bytes], list[int]]:
        shard, g = int(self.ds.groups[group, 0]), int(self.ds.groups[group, 1])
        url = self.ds.manifest.shard_url(shard)
        opts = self.ds.options

        def read() -> tuple[list[bytes], list[int]]:
            try:
                if shard not in self.files:
                    fs, path = storage.filesystem(url, opts.storage_options)
                    # One open shard per worker. Row groups are read as coalesced byte ranges (pre_buffer)
                    # straight from storage: fsspec's read-ahead cache only copied them once more.
                    self.files = {shard: pq.ParquetFile(fs.open(path, "rb", cache_type="none"), pre_buffer=True)}
                table = self.files[shard].read_row_group(g, columns=["image", "label"])
            except Exception:
                self.files.pop(shard, None)  # reopen on retry: the old handle may be stale
                raise
            return table.column("image").combine_chunks().field("bytes").to_pylist(), table.column("label").to_pylist()

        return storage.with_retries(read, f"reading {url} row group {g}", opts.retry, opts.storage_options)


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave SIGTERM and SIGINT to the training process. Slurm, Ctrl-C and ``kill``
    signal every process of the job or group; a worker that died of it would take the graceful stop
    (finish the step, checkpoint) down with it. The training process shuts its workers down itself,
    and they exit when it dies (torch's parent watchdog)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ShardLoader:
    """A DataLoader over a ShardDataset that remembers how many batches were consumed (for resume)."""

    def __init__(self, dataset: ShardDataset, batch_size: int, num_workers: int, pin_memory: bool = False) -> None:
        self.dataset, self.num_workers, self.pin_memory = dataset, num_workers, pin_memory
        dataset.batch_size = batch_size
        self.epoch = 0
        self.consumed = 0

    def __len__(self) -> int:
        return sum(self.dataset.batches_per_worker(max(1, self.num_workers)))

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["batches"])

    def __iter__(self) -> Iterator[Any]:
        ds = self.dataset
        if not ds.train:
            self.consumed = 0  # evaluation always reads the whole split
        ds.epoch, ds.skip_batches = self.epoch, self.consumed
        loader = DataLoader(ds, batch_size=ds.batch_size, num_workers=self.num_workers, drop_last=ds.drop_last,
                            pin_memory=self.pin_memory, persistent_workers=False, worker_init_fn=ignore_stop_signals,
                            prefetch_factor=4 if self.num_workers else None)
        for batch in loader:
            self.consumed += 1
            yield batch
