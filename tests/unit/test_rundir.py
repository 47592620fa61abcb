"""The run folder's commit protocol: only a marker that names every file with its size and sha256
commits a checkpoint; a torn or altered one is skipped, named, for the next older one."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from orchestrator.rundir import MARKER, STATE, RunDir


def make(tmp_path: Path, *steps: int) -> RunDir:
    run = RunDir(str(tmp_path / "run"))
    for step in steps:
        run.write_checkpoint(step, {STATE: f"state of step {step}".encode() * 100}, {"epoch": 0})
    return run


def test_a_marker_lists_every_file_with_size_and_hash(tmp_path: Path) -> None:
    run = make(tmp_path, 5)
    marker = json.loads((tmp_path / "run" / "checkpoints" / "step-00000005" / MARKER).read_text())
    assert marker["step"] == 5 and marker["files"][STATE]["size"] == len(b"state of step 5" * 100)
    assert len(marker["files"][STATE]["sha256"]) == 64
    assert run.read_checkpoint(run.latest()) == b"state of step 5" * 100


def test_a_marker_seen_before_its_file_is_complete_does_not_count(tmp_path: Path) -> None:
    """What a parallel copy (Ray's pyarrow copy_files) can show: the marker whole, state.pt still arriving."""
    run = make(tmp_path, 5, 10)
    state = tmp_path / "run" / "checkpoints" / "step-00000010" / STATE
    state.write_bytes(state.read_bytes()[:100])
    assert [c.step for c in run.committed()] == [5]


def test_a_checkpoint_whose_content_changed_is_skipped_for_the_next_older(tmp_path: Path,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    run = make(tmp_path, 5, 10)
    state = tmp_path / "run" / "checkpoints" / "step-00000010" / STATE
    state.write_bytes(bytes(reversed(state.read_bytes())))  # same size, other bytes
    with caplog.at_level(logging.WARNING):
        (checkpoint, data), *_ = run.newest_readable()
    assert checkpoint.step == 5 and data == b"state of step 5" * 100
    assert "skipping checkpoint" in caplog.text and "step-00000010" in caplog.text and "sha256" in caplog.text


def test_no_marker_no_checkpoint_and_prune_keeps_the_newest(tmp_path: Path) -> None:
    run = make(tmp_path, 2, 4, 6, 8)
    (tmp_path / "run" / "checkpoints" / "step-00000003").mkdir()  # a torn leftover older than the newest
    (tmp_path / "run" / "checkpoints" / "step-00000009").mkdir()  # an upload in flight
    run.prune(2)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step-00000006", "step-00000008", "step-00000009"]
    assert [c.step for c in run.committed()] == [6, 8]
