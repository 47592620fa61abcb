"""One restart decision for every rank (``orchestrator.train.restart``), ranks as threads over a local run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orchestrator import faults
from orchestrator.errors import CheckpointError
from orchestrator.rundir import STATE, RunDir
from orchestrator.train import restart
from tests.thread_group import ThreadGroup, ThreadWorld


def resume_on_threads(run: RunDir, ranks: int, group: type[ThreadGroup] = ThreadGroup) -> list[Any]:
    """What each rank's ``restart.newest`` gave: (step, bytes), or the exception it raised."""
    def rank(g: ThreadGroup) -> Any:
        found = restart.newest(run, g)
        return (found[0].step, found[1]) if found else None

    return ThreadWorld(ranks, timeout=30).run(rank, group)


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    run = RunDir(str(tmp_path / "run"))
    for step in (2, 4):
        run.write_checkpoint(step, {STATE: f"state of step {step}".encode() * 1000}, {})
    return run


@pytest.mark.parametrize("failing_rank, step", [(0, 2), (1, 4)])
def test_every_rank_resumes_from_the_checkpoint_rank_0_could_read(run: RunDir, tmp_path: Path, failing_rank: int,
                                                                   step: int) -> None:
    faults.configure(f"unreadable:4:{failing_rank}:{tmp_path / 'fired'}")
    try:
        got = resume_on_threads(run, 3)
    finally:
        faults.configure(None)
    assert got == [(step, f"state of step {step}".encode() * 1000)] * 3
    assert (tmp_path / "fired").exists() == (failing_rank == 0)  # only rank 0 reads from the store


class BadCopy(ThreadGroup):
    """Rank 2's copy arrives with one byte flipped."""

    def share_bytes(self, data: bytes | None, size: int) -> bytes:
        got = super().share_bytes(data, size)
        return got[:10] + bytes([got[10] ^ 1]) + got[11:] if self.rank == 2 else got


def test_a_rank_whose_copy_is_bad_stops_every_rank_with_its_name(run: RunDir) -> None:
    got = resume_on_threads(run, 3, BadCopy)
    assert all(isinstance(g, CheckpointError) for g in got), got
    assert "rank 2: its copy does not match the sha256" in str(got[0]) and "step-00000004" in str(got[0])


def test_a_fresh_run_resumes_nowhere(tmp_path: Path) -> None:
    assert resume_on_threads(RunDir(str(tmp_path / "new")), 2) == [None, None]


def test_each_node_fetches_once_through_its_first_rank() -> None:
    # Two launchers' nodes on one machine (torchrun --nnodes=2 here), then a node whose local rank 0 is not first.
    assert restart.node_leaders([("a", 0), ("a", 1), ("a", 0), ("a", 1)]) == [0, 0, 2, 2]
    assert restart.node_leaders([("a", 0), ("b", 1), ("b", 0), ("a", 1)]) == [0, 1, 1, 0]
