"""Ranks as threads of one process, for ``orchestrator.train.restart.Group``: the unit tests and ``bench/scale_sim.py``
run the real restart code with 256 "ranks" where 256 processes (each with torch loaded) would not fit in memory.
Rank 0's bytes are handed over by reference, so the transport costs nothing here: what is measured is the store."""

from __future__ import annotations

import threading
from typing import Any


class ThreadWorld:
    """``per_node`` consecutive ranks form a node; the first of each checks what it receives."""

    def __init__(self, world_size: int, timeout: float = 600.0, per_node: int = 1) -> None:
        self.world_size, self.per_node = world_size, per_node
        self.barrier = threading.Barrier(world_size, timeout=timeout)
        self._slot: Any = None
        self._gathered: list[Any] = [None] * world_size

    def group(self, rank: int) -> ThreadGroup:
        return ThreadGroup(self, rank)

    def abort(self) -> None:
        """A rank failed: the others' next collective raises instead of waiting for it forever."""
        self.barrier.abort()


class ThreadGroup:
    def __init__(self, world: ThreadWorld, rank: int) -> None:
        self.world, self.rank, self.world_size = world, rank, world.world_size

    def share(self, value: Any) -> Any:
        if self.rank == 0:
            self.world._slot = value
        self.world.barrier.wait()
        out = self.world._slot
        self.world.barrier.wait()  # everyone has read it before rank 0 may write the next one
        return out

    def share_bytes(self, data: bytes | None, size: int) -> bytes:
        return self.share(data)

    def fetched(self) -> bool:
        return self.rank != 0 and self.rank % self.world.per_node == 0

    def gather(self, value: Any) -> list[Any]:
        self.world._gathered[self.rank] = value
        self.world.barrier.wait()
        out = list(self.world._gathered)
        self.world.barrier.wait()
        return out
