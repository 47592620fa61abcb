"""Batches from DataLoader workers through reused slots of shared memory, not a new segment per batch.

torch's own path (``default_collate`` in a worker) puts every tensor of every batch in a new shared-memory
segment: the worker creates it (``posix_fallocate``), faults in its pages while filling it, hands its file
descriptor over a socket handshake, one per tensor (images, labels, ids, flags: four per batch), and both
processes tear it down once the batch is freed. For 224 px images that is 0.27 CPU-ms per image, a tenth of
decoding and augmenting it (``bench/data_pipeline.py``'s hand-over line; timm's loader pays it alike).

Here a worker stacks a batch's tensors into a slot that it keeps for the pass over its data and sends to
the training process once, with the first batch that uses it; the batch's integers (labels, sample ids,
corrupt flags) travel inline with the slot's number. The training process copies the tensors out (into
pinned memory when the loader pins) and marks the slot free in a shared flag, so the worker fills it
again: 0.09-0.11 CPU-ms per image. A worker makes slots as it needs them, up to ``slots`` (what the DataLoader
lets it prepare ahead, plus the batch being copied out); with none free (a consumer that holds batches
back) a batch takes torch's own path. Each pass makes new slots and ``forget`` drops the last pass's, so
between epochs, as during validation, a loader holds no slots.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import count, islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info
from torch.utils.data._utils.pin_memory import pin_memory as pin_any

ALIGN = 64  # each tensor's offset in a slot, in bytes: any dtype can view it
_passes = count()


@dataclass
class Field:
    """One field of a batch: ``ints`` (row ``row`` of the batch's int64 array), ``slot`` (a stacked tensor at
    ``offset`` in the slot) or ``value`` (collated by torch)."""

    kind: str
    row: int = 0
    offset: int = 0
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.uint8
    value: Any = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def view(self, slot: torch.Tensor) -> torch.Tensor:
        return slot[self.offset:self.offset + self.nbytes].view(self.dtype).view(self.shape)


@dataclass
class Slots:
    """A worker's slots for one pass: the free flags (shared, one per slot) and the slots made so far."""

    flags: torch.Tensor
    made: dict[int, torch.Tensor] = field(default_factory=dict)


# The training process's view of each worker's current pass: worker pid -> (pass, slots).
_MAPPED: dict[int, tuple[int, Slots]] = {}


@dataclass
class RingBatch:
    """A batch as it leaves a worker; ``received`` (or the loader's pinning thread) turns it into the list
    ``default_collate`` would have made."""

    pid: int
    pass_id: int
    slot: int
    fields: list[Field]
    ints: np.ndarray
    flags: torch.Tensor | None = None  # with the pass's first batch
    storage: torch.Tensor | None = None  # with the first batch in this slot

    def materialize(self, pin: bool = False) -> list[Any]:
        if self.flags is not None:
            _MAPPED[self.pid] = (self.pass_id, Slots(self.flags))
        pass_id, slots = _MAPPED.get(self.pid, (None, None))
        if pass_id != self.pass_id or slots is None:
            raise RuntimeError(f"a batch from DataLoader worker {self.pid} is in slots of its pass {self.pass_id}, "
                               f"which this process does not hold (it holds {pass_id})")
        if self.storage is not None:
            slots.made[self.slot] = self.storage
        slot = slots.made[self.slot]
        out: list[Any] = []
        for f in self.fields:
            if f.kind == "ints":
                t = torch.from_numpy(self.ints[f.row])
                out.append(t.pin_memory() if pin else t)
            elif f.kind == "slot":
                out.append(torch.empty(f.shape, dtype=f.dtype, pin_memory=pin).copy_(f.view(slot)))
            else:
                out.append(pin_any(f.value) if pin else f.value)
        slots.flags.numpy()[self.slot] = 0  # copied out: the worker may fill the slot again
        return out

    def pin_memory(self) -> list[Any]:
        """Called by the DataLoader's pinning thread: the batch, copied straight into pinned memory."""
        return self.materialize(pin=True)


def received(batch: Any) -> Any:
    """A batch as the training process gets it from the DataLoader: a ``RingBatch`` copied out."""
    return batch.materialize() if isinstance(batch, RingBatch) else batch


def forget(pids: Iterable[int]) -> None:
    """Drop this process's view of these workers' slots (their pass is over; the next one makes new slots)."""
    for pid in pids:
        _MAPPED.pop(pid, None)


class Collator:
    """A worker's ``collate_fn`` for one pass over its data (``close`` drops the pass's slots)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.mine: Slots | None = None
        self.pass_id = -1

    def __call__(self, samples: list[tuple[Any, ...]]) -> Any:
        if get_worker_info() is None:  # in the training process itself: nothing to hand over
            return default_collate(samples)
        columns = list(zip(*samples, strict=True))
        fields, rows, size = [], 0, 0
        for column in columns:
            if all(type(x) is int for x in column):
                fields.append(Field("ints", row=rows))
                rows += 1
            elif all(isinstance(x, torch.Tensor) for x in column) and len({(x.shape, x.dtype) for x in column}) == 1:
                fields.append(Field("slot", offset=size, shape=(len(column), *column[0].shape), dtype=column[0].dtype))
                size += -(-fields[-1].nbytes // ALIGN) * ALIGN
            else:
                fields.append(Field("value"))
        first = self.mine is None
        got = self._take(size) if size else None
        if got is None:
            return default_collate(samples)
        slot, new = got
        assert self.mine is not None
        for f, column in zip(fields, columns, strict=True):
            if f.kind == "slot":
                torch.stack(column, out=f.view(self.mine.made[slot]))
            elif f.kind == "value":
                f.value = default_collate(column)
        ints = np.array([c for f, c in zip(fields, columns, strict=True) if f.kind == "ints"], dtype=np.int64)
        return RingBatch(os.getpid(), self.pass_id, slot, fields, ints.reshape(rows, len(samples)),
                         flags=self.mine.flags if first else None, storage=self.mine.made[slot] if new else None)

    def _take(self, size: int) -> tuple[int, bool] | None:
        """A free slot of at least ``size`` bytes (marked taken) and whether it is new, or None."""
        if self.mine is None:
            self.mine, self.pass_id = Slots(torch.zeros(self.slots, dtype=torch.uint8).share_memory_()), next(_passes)
        flags, made = self.mine.flags.numpy(), self.mine.made
        free = [k for k in made if flags[k] == 0 and made[k].numel() >= size]
        if free:
            flags[free[0]] = 1
            return free[0], False
        if len(made) == self.slots:
            return None
        k = len(made)
        made[k] = torch.empty(size, dtype=torch.uint8).share_memory_()
        flags[k] = 1
        return k, True

    def close(self) -> None:
        self.mine = None


def as_is(batch: Any) -> Any:
    """The DataLoader's ``collate_fn`` over ``batches`` (whose items are batches already): its default,
    ``default_convert``, would turn their tuples into lists."""
    return batch


def batches(samples: Iterator[tuple[Any, ...]], batch_size: int, slots: int) -> Iterator[Any]:
    """``samples`` collated ``batch_size`` at a time (the last batch may be short), through one pass's slots."""
    collate = Collator(slots)
    try:
        while chunk := list(islice(samples, batch_size)):
            yield collate(chunk)
    finally:
        collate.close()
