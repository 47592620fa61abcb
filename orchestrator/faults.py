"""Fault injection for the fault-tolerance tests and the chaos run:
``ORCHESTRATOR_INJECT_FAULT=KIND:STEP:RANK:MARKER[,KIND:STEP:RANK:MARKER...]``.

Each fault fires once (its marker file records that it did) on RANK: ``raise`` and ``kill`` right
after the checkpoint at STEP is committed; ``flip`` then flips one bit of that committed checkpoint's
``state.pt`` in storage (silent corruption) before the SIGKILL; ``tear`` (rank 0) while that
checkpoint is being uploaded: half of ``state.pt`` is in storage, no marker, when the process is
SIGKILLed. ``stall`` blocks the rank's data loading of the step after STEP forever (in the training thread);
``stall-loader`` blocks the DataLoader worker that reads that step's first micro-batch (``data.num_workers`` > 0);
``stall-collective`` blocks it just before that step's gradient all-reduce (its last backward). ``unreadable``
makes RANK's read of the checkpoint at STEP fail when a restarted job reads it.
Launchers hand the spec on (``configure``); without that it is read from the environment. It sits below the
data, training and launch code it injects into, which each import it.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

from orchestrator.rundir import STATE, RunDir

ENV = "ORCHESTRATOR_INJECT_FAULT"
_UNSET = "unset"
_configured: str | None = _UNSET


def configure(spec: str | None) -> None:
    global _configured
    _configured = spec


def _current() -> str | None:
    """The spec the launcher handed on, else the environment's (local, torchrun and Slurm processes)."""
    return os.environ.get(ENV) if _configured == _UNSET else _configured


def _armed(step: int) -> list[tuple[str, int, Path]]:
    """(kind, rank, marker) of the spec's faults at ``step`` that have not fired yet."""
    found = []
    for fault in filter(None, (_current() or "").split(",")):
        kind, at, rank, marker = fault.split(":", 3)
        if int(at) == step and not Path(marker).exists():
            found.append((kind, int(rank), Path(marker)))
    return found


def armed(step: int) -> bool:
    """Whether a fault fires at this step (on some rank; it has not fired yet)."""
    return bool(_armed(step))


def _fires(kinds: tuple[str, ...], step: int, rank: int) -> str | None:
    """The kind of a fault of ``kinds`` that fires now on ``rank`` (its marker is then written), else None."""
    for kind, on, marker in _armed(step):
        if kind in kinds and on == rank:
            marker.write_text(f"{kind} at step {step} on rank {rank}\n")
            return kind
    return None


def maybe_stall(kind: str, step: int, rank: int) -> None:
    """Block this thread forever if a ``kind`` fault is armed for ``step`` on ``rank`` (the watchdog ends it)."""
    if _fires((kind,), step, rank):
        threading.Event().wait()  # the injected stall: this frame is what the watchdog's stack file shows


def unreadable(step: int, rank: int) -> bool:
    """Whether ``rank``'s read of the checkpoint at ``step`` is to fail (an ``unreadable`` fault)."""
    return _fires(("unreadable",), step, rank) is not None


def maybe_fail(run: RunDir, step: int, rank: int) -> None:
    """After the checkpoint at ``step`` is committed: raise, die, or corrupt it and die."""
    kind = _fires(("raise", "kill", "flip"), step, rank)
    if kind == "flip":
        path = f"{run.path}/checkpoints/step-{step:08d}/{STATE}"
        data = bytearray(run.fs.cat_file(path))
        data[len(data) // 2] ^= 0x10
        run.fs.pipe_file(path, bytes(data))
    if kind in ("kill", "flip"):
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "raise":
        raise RuntimeError(f"injected fault at step {step} on rank {rank}")


def maybe_tear(run: RunDir, step: int, rank: int, snapshot: Any) -> None:
    """``snapshot``: the ``train.checkpoint.Snapshot`` being saved (its first file is half written)."""
    if not _fires(("tear",), step, rank):
        return
    name, data = next(iter(snapshot.files().items()))
    run.fs.makedirs(f"{run.path}/checkpoints/step-{step:08d}", exist_ok=True)
    with run.fs.open(f"{run.path}/checkpoints/step-{step:08d}/{name}", "wb") as f:
        f.write(data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)
