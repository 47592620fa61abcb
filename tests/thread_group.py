"""Ranks as threads of one process, for ``orchestrator.train.restart.Group``: the unit tests and ``bench/scale_sim.py``
run the real restart code with 256 "ranks" where 256 processes (each with torch loaded) would not fit in memory.
Rank 0's bytes are handed over by reference, so the transport costs nothing here: what is measured is the store."""

from __future__ import annotations

import threading
from collections.abc import Callable
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

    def run(self, fn: Callable[[ThreadGroup], Any], group: type[ThreadGroup] | None = None) -> list[Any]:
        """``fn(group)`` on every rank at once: what each returned, or the exception it raised."""
        out: list[Any] = [None] * self.world_size

        def rank(r: int) -> None:
            try:
                out[r] = fn((group or ThreadGroup)(self, r))
            except Exception as exc:  # noqa: BLE001 - the caller looks at it
                out[r] = exc

        threads = [threading.Thread(target=rank, args=(r,)) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

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
