"""The order of a training epoch: the same global batches, micro-batch by micro-batch, on every world size.

An epoch is laid out over ``P`` partitions (``data.partitions``), a number fixed by the recipe and data, never
by the cluster (MosaicML Streaming's "canonical nodes"):
  1. The row groups are permuted with ``(seed, epoch)`` and concatenated: the epoch's stream. Its first
     ``M * m`` samples are used: ``M = steps * K`` micro-batches of ``m`` samples, ``K`` per optimizer step
     (fewer samples than one global batch are left out; the permutation changes which).
  2. Partition ``p`` takes the next contiguous ``M_p * m`` samples of the stream (``M_p``: the ``j < M`` with
     ``j % P == p``) and shuffles them through a bounded buffer seeded by ``(seed, epoch, p)``.
  3. Global micro-batch ``j`` is micro-batch ``j // P`` of partition ``j % P``; optimizer step ``s`` is the
     micro-batches ``[s*K, (s+1)*K)``.
On ``W`` ranks (``W`` divides ``K`` and ``P``) rank ``r`` computes the micro-batches ``j = r (mod W)``: exactly
those of its own partitions ``p = r (mod W)``, so each sample is read by one rank, in whole row groups. Its
``n`` DataLoader workers (``n`` divides ``P / W``) own the rank's partitions ``q = w (mod n)``, and the
DataLoader's round robin over workers yields the rank's micro-batches in order. Every random draw is keyed by
the sample id or the micro-batch's place in the step, so a micro-batch is the same computation on any world size.
"""

from __future__ import annotations

from dataclasses import dataclass

# Partition counts with many divisors (2^a * 3): world sizes 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, ... fit.
CANDIDATES = (1, 2, 4, 8, 12, 24, 48, 96, 192, 384, 768)


def auto_partitions(num_samples: int, rows_per_group: float, micro_batches: int) -> int:
    """The largest candidate that leaves every partition at least two row groups and one micro-batch.

    Memory grows with ``P`` (each partition holds its shuffle buffer), so the default stops at 768."""
    fit = [p for p in CANDIDATES if p <= micro_batches and num_samples / p >= 2 * rows_per_group]
    return max(fit, default=1)


@dataclass(frozen=True)
class EpochOrder:
    num_samples: int
    micro_batch: int  # m: samples per forward/backward
    micro_per_step: int  # K: micro-batches per optimizer step
    partitions: int  # P

    @property
    def steps(self) -> int:
        return self.num_samples // (self.micro_batch * self.micro_per_step)

    @property
    def micro_batches(self) -> int:
        """M: the epoch's micro-batches over all ranks."""
        return self.steps * self.micro_per_step

    def partition_span(self, p: int) -> tuple[int, int]:
        """``[start, stop)`` of partition ``p`` in the epoch's stream (in samples)."""
        base, extra = divmod(self.micro_batches, self.partitions)
        first = p * base + min(p, extra)
        return first * self.micro_batch, (first + base + (1 if p < extra else 0)) * self.micro_batch

    def world_sizes(self) -> list[int]:
        """World sizes that read this exact order."""
        return [w for w in range(1, self.micro_per_step + 1) if self.micro_per_step % w == 0 and self.partitions % w == 0]

    def why_not(self, world: int) -> str | None:
        """Why ``world`` ranks cannot read this order (None when they can)."""
        if self.micro_per_step % world == 0 and self.partitions % world == 0:
            return None
        return (f"world size {world} cannot keep the sample order: each step is {self.micro_per_step} micro-batches "
                f"of {self.micro_batch} (batch.global_batch_size / batch.per_device_max) over {self.partitions} "
                f"partitions (data.partitions); both must be divisible by the world size. "
                f"World sizes that fit: {', '.join(map(str, self.world_sizes()))}")

    def workers(self, world: int, requested: int) -> int:
        """DataLoader workers per rank: the most, up to ``requested``, that divide the rank's partitions."""
        if requested == 0:
            return 0
        per_rank = self.partitions // world
        return max(n for n in range(1, min(requested, per_rank) + 1) if per_rank % n == 0)

    def schedule(self, rank: int, world: int, role: int, workers: int, start: int) -> list[tuple[int, int]]:
        """(partition, micro-batch within it) that worker ``role`` of ``workers`` yields, in order, from the
        rank's local micro-batch ``start`` on."""
        per_rank = self.partitions // world
        local = self.micro_batches // world
        first = start + (role - start) % workers
        return [(rank + (i % per_rank) * world, i // per_rank) for i in range(first, local, workers)]
