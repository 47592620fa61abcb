"""Worker batches through reused shared-memory slots: the batches torch's own path makes, a slot reused only
once the training process has copied it out, nothing left mapped after an epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from orchestrator.data import batch_ring
from orchestrator.data import manifest as mf
from orchestrator.data.reader import ReaderOptions, ShardDataset, ShardLoader, WithLabel
from orchestrator.data.transforms import TrainCrop


def sample(i: int) -> tuple[Any, ...]:
    """Shaped as the reader's: an image tensor, a label, a sample id, a flag; and bytes of varying length."""
    return torch.full((3, 4, 5), i, dtype=torch.int16), i % 7, i, i % 2, bytes(i % 3)


class Samples(IterableDataset):
    def __init__(self, n: int, batch_size: int, slots: int) -> None:
        self.n, self.batch_size, self.slots = n, batch_size, slots

    def mine(self, worker: int, workers: int) -> list[int]:
        return list(range(worker, self.n, workers))

    def __iter__(self):
        info = get_worker_info()
        return batch_ring.batches(map(sample, self.mine(info.id, info.num_workers)), self.batch_size, self.slots)


def expected(ids: list[int], batch_size: int) -> list[list[Any]]:
    """What torch's default_collate makes of these samples, ``batch_size`` at a time."""
    return [default_collate([sample(i) for i in ids[k:k + batch_size]]) for k in range(0, len(ids), batch_size)]


def assert_same(got: list[Any], want: list[Any]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if isinstance(w, torch.Tensor):
            assert g.dtype == w.dtype and torch.equal(g, w)
        else:
            assert g == w


def test_worker_batches_come_through_reused_slots_as_torch_collates_them() -> None:
    ds = Samples(50, 4, slots=3)
    raw, got = [], []
    for batch in DataLoader(ds, batch_size=None, collate_fn=batch_ring.as_is, num_workers=2,
                            prefetch_factor=2):
        raw.append(batch)
        got.append(batch_ring.received(batch))  # copied out at once, as the loader does
    assert len(raw) == 14 and all(isinstance(b, batch_ring.RingBatch) for b in raw)
    assert sum(b.flags is not None for b in raw) == 2  # each worker's pass sends its flags once
    assert sum(b.storage is not None for b in raw) <= 6  # and each of its at most 3 slots once: reused
    want = expected(ds.mine(0, 2), 4), expected(ds.mine(1, 2), 4)
    for k, batch in enumerate(got):  # the DataLoader takes the workers in turn
        assert_same(batch, want[k % 2][k // 2])


def test_a_slot_is_filled_again_only_after_the_training_process_copied_it_out() -> None:
    """Nothing is copied out while the loader runs: the worker fills its 2 slots, then falls back to torch's path
    for the rest instead of overwriting them, and the two slotted batches still hold their own samples."""
    ds = Samples(48, 4, slots=2)
    raw = list(DataLoader(ds, batch_size=None, collate_fn=batch_ring.as_is, num_workers=1, prefetch_factor=4))
    assert [isinstance(b, batch_ring.RingBatch) for b in raw] == [True, True] + [False] * 10
    for got, want in zip(map(batch_ring.received, raw), expected(ds.mine(0, 1), 4), strict=True):
        assert_same(got, want)


def maps_of_shared_memory() -> int:
    return sum("/torch_" in line for line in Path("/proc/self/maps").read_text().splitlines())


def test_the_reader_yields_the_same_batches_with_workers_and_unmaps_their_slots_after_each_epoch(
        synth_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def loader(workers: int) -> ShardLoader:
        ds = ShardDataset(mf.load(str(synth_dir / "train")), WithLabel(TrainCrop(32, "rand-m9-mstd0.5-inc1", "random")),
                          train=True, options=ReaderOptions(shuffle_buffer=32), global_batch=16)
        return ShardLoader(ds, 8, workers)

    slotted = []
    received = batch_ring.received
    monkeypatch.setattr(batch_ring, "received", lambda b: slotted.append(isinstance(b, batch_ring.RingBatch)) or received(b))
    parallel, alone = loader(2), loader(0)
    before = maps_of_shared_memory()
    try:
        for epoch in (0, 1):
            parallel.set_epoch(epoch)
            alone.set_epoch(epoch)
            got, want = list(parallel), list(alone)
            assert len(got) == len(want) == 40
            for g, w in zip(got, want, strict=True):
                assert_same(g, w)
            assert maps_of_shared_memory() == before  # the epoch's slots are gone from this process
    finally:
        parallel.close()
    assert slotted == ([True] * 40 + [False] * 40) * 2  # the workers' batches came through slots
