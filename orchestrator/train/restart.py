"""Where a restarted job resumes: one decision for every rank, and one read of the checkpoint from the store.

Rank 0 lists the run's checkpoints and reads the newest one that verifies (a torn, corrupt or unreadable one is
skipped, named, for the next older one), under the storage retry policy. Every other rank receives that choice and
its bytes; each node's copy is checked against the marker's sha256 by the rank that received it for the node. So
all ranks resume from the same step, or all of them stop with a line that names the ranks and the checkpoint; no
rank falls back alone (DDP would re-broadcast the weights, but not the optimizer, EMA, step and data position).

The store serves one copy per job, not one per rank: 256 ranks restarting from InceptionNeXt-B read 1.4 GB, not
356 GB. Across nodes the bytes travel over the training network (NCCL on InfiniBand: tens of GB/s, faster than a
download on every node); within a node through node-local disk (``ProcessGroup``). Composer broadcasts the resume
path; ``torch.distributed.checkpoint`` offers ``broadcast_from_rank0`` for the same reason.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import tempfile
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from orchestrator import faults, storage, weight_lookup
from orchestrator.errors import CheckpointError
from orchestrator.rundir import STATE, Checkpoint, RunDir
from orchestrator.train.context import Rank

log = logging.getLogger(__name__)
CHUNK = 64 * 2**20  # broadcast in pieces: on NCCL each goes through a device buffer of this size


class Group(Protocol):
    """The collectives a restart needs: the process group on a real job, threads in ``bench/scale_sim.py``."""

    rank: int
    world_size: int

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""

    def share_bytes(self, data: bytes | None, size: int) -> bytes:
        """Rank 0's ``data`` (``size`` bytes) on every rank."""

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""

    def fetched(self) -> bool:
        """After ``share_bytes``: whether this rank got them from another node (it checks them for its node;
        the node's other ranks read what it wrote to node-local disk)."""


class ProcessGroup:
    """``Group`` over torch.distributed (gloo on CPU, NCCL through ``device``); one rank alone without one.

    Bytes go from rank 0 to the first rank of every other node by a broadcast among those ranks alone, then to the
    rest of each node through a file on node-local disk (``TMPDIR``). At 8 ranks on one node (gloo, 256 MB,
    ``bench/scale_sim.py``) the file took 1.0 s where a broadcast to all 8 took 5.0 s."""

    def __init__(self, rank: Rank) -> None:
        self.rank, self.device, self.node, self.local_rank = rank.rank, rank.device, rank.node, rank.local_rank
        self.world_size = rank.world_size if rank.world_size > 1 and dist.is_initialized() else 1
        self._leaders: list[int] = [0]

    def share(self, value: Any) -> Any:
        box = [value]
        if self.world_size > 1:
            dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        if self.world_size == 1:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def share_bytes(self, data: bytes | None, size: int) -> bytes:
        if self.world_size == 1:
            assert data is not None
            return data
        self._leaders = leaders = node_leaders(self.gather((self.node, self.local_rank)))
        token = self.share(secrets.token_hex(8))  # this restart's files, apart from another job's on the node
        if len(set(leaders)) > 1:
            group = dist.new_group(sorted(set(leaders)))  # every rank takes part in making it
            if leaders[self.rank] == self.rank:
                data = self.broadcast(data, size, group)
            dist.destroy_process_group(group)
        path = Path(tempfile.gettempdir()) / f"inceptionnext-restart-{token}-{leaders[self.rank]}"
        if leaders[self.rank] == self.rank:
            assert data is not None
            with open(f"{path}.part", "wb") as f:
                f.write(data)
            os.replace(f"{path}.part", path)
        dist.barrier()
        if leaders[self.rank] != self.rank:
            data = path.read_bytes()
        dist.barrier()
        if leaders[self.rank] == self.rank:
            path.unlink()
        assert data is not None
        return data

    def fetched(self) -> bool:
        return self.rank != 0 and self._leaders[self.rank] == self.rank

    def broadcast(self, data: bytes | None, size: int, group: Any = None) -> bytes:
        """Rank 0's ``data`` to every rank of ``group`` over the process group, in pieces of ``CHUNK``."""
        out = data if self.rank == 0 else bytearray(size)
        with warnings.catch_warnings():  # rank 0's bytes are only read
            warnings.simplefilter("ignore", UserWarning)
            host = torch.frombuffer(out, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
        staging = torch.empty(min(CHUNK, size), dtype=torch.uint8, device=self.device) if self.device.type == "cuda" else None
        for at in range(0, size, CHUNK):
            piece = host[at:at + CHUNK]
            if staging is None:
                dist.broadcast(piece, src=0, group=group)
                continue
            on_device = staging[:len(piece)]
            if self.rank == 0:
                on_device.copy_(piece)
            dist.broadcast(on_device, src=0, group=group)
            if self.rank != 0:
                piece.copy_(on_device)
        return out if isinstance(out, bytes) else bytes(out)


def node_leaders(places: list[tuple[str, int]]) -> list[int]:
    """For each rank (given as (node, local rank)), the rank that fetches for its node: the first rank of its block,
    a block being ranks of one node up to a second local rank 0 (two launchers' "nodes" may share one machine)."""
    leaders, current, seen = [], {}, {}
    for rank, (node, local_rank) in enumerate(places):
        if node not in current or (local_rank == 0 and seen[node]):
            current[node], seen[node] = rank, False
        seen[node] |= local_rank == 0
        leaders.append(current[node])
    leaders[0] = 0
    return leaders


def newest(run: RunDir, group: Group) -> tuple[Checkpoint, bytes] | None:
    """The checkpoint every rank resumes from and its verified ``state.pt``, or None for a fresh run.
    Collective: every rank calls it."""
    chosen: tuple[str | None, Checkpoint | None] = (None, None)
    data = None
    if group.rank == 0:
        try:
            found = storage.with_retries(lambda: next(run.newest_readable(before_read=lambda c: _injected_fault(c, group.rank)), None),
                                         f"choosing the checkpoint to resume from in {run.checkpoints_url}",
                                         options=run.options)
        except Exception as exc:  # noqa: BLE001 - every rank raises it below
            chosen = (storage.one_line(exc), None)
        else:
            chosen = (None, found[0] if found else None)
            data = found[1] if found else None
    error, checkpoint = group.share(chosen)
    if error is not None:
        raise CheckpointError(f"rank 0 could not choose a checkpoint in {run.checkpoints_url}: {error}; no rank resumed")
    if checkpoint is None:
        return None
    received = group.share_bytes(data, checkpoint.meta["files"][STATE]["size"])
    problem = None
    if group.fetched() and hashlib.sha256(received).hexdigest() != checkpoint.meta["files"][STATE]["sha256"]:
        problem = f"rank {group.rank}: its copy does not match the sha256 in the marker"
    problems = [p for p in group.gather(problem) if p] if group.world_size > 1 else []
    if problems:
        raise CheckpointError(f"restart from {checkpoint.url} failed: {'; '.join(problems)}; every rank stops "
                              "(none resumes from another step)")
    if group.rank == 0:
        log.info("all %d ranks resume from %s (read once from the store, %.1f MB, shared with the other ranks)",
                 group.world_size, checkpoint.url, len(received) / 2**20)
    return checkpoint, received


def reader(rank: Rank) -> weight_lookup.Reader:
    """A weights reader (``weight_lookup.read``) that runs on rank 0 alone and hands its bytes to every rank (its
    failure too): evaluation and ``model.init`` on 256 ranks read the weights once, not 256 times."""
    group = ProcessGroup(rank)

    def read(url: str, options: dict[str, Any] | None) -> tuple[bytes, str]:
        head, data = None, None
        if group.rank == 0:
            try:
                data, name = weight_lookup.read(url, options)
                head = (None, name, len(data))
            except Exception as exc:
                group.share((storage.one_line(exc), None, 0))
                raise
        error, name, size = group.share(head)
        if error is not None:
            raise CheckpointError(f"rank 0 could not read {storage.redact(url)}: {error}")
        return group.share_bytes(data, size), name

    return read


def _injected_fault(checkpoint: Checkpoint, rank: int) -> None:
    """The ``unreadable`` fault: this rank's read of that checkpoint fails (as a flaky disk or store would)."""
    if faults.unreadable(checkpoint.step, rank):
        raise CheckpointError(f"{checkpoint.url}: injected read failure")
