"""Fault injection for the fault-tolerance tests:
``ORCHESTRATOR_INJECT_FAULT=raise|kill|tear|stall|stall-collective:STEP:RANK:MARKER``.

The fault fires once (the marker file records that it did) on RANK: ``raise`` and ``kill`` right
after the checkpoint at STEP is committed; ``tear`` (rank 0) while that checkpoint is being
uploaded: half of ``state.pt`` is in storage, no marker, when the process is SIGKILLed. ``stall``
blocks the rank's data loading of the step after STEP forever; ``stall-collective`` blocks it just
before that step's gradient all-reduce (its last backward). Launchers hand the spec on
(``configure``); without that it is read from the environment.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from orchestrator.rundir import RunDir
from orchestrator.train.checkpoint import Snapshot

ENV = "ORCHESTRATOR_INJECT_FAULT"
_UNSET = "unset"
_configured: str | None = _UNSET


def configure(spec: str | None) -> None:
    global _configured
    _configured = spec


def _current() -> str | None:
    """The spec the launcher handed on, else the environment's (local, torchrun and Slurm processes)."""
    return os.environ.get(ENV) if _configured == _UNSET else _configured


def _fault() -> tuple[str, int, int, Path] | None:
    """(kind, step, rank, marker) of the spec, or None."""
    spec = _current()
    if not spec:
        return None
    kind, at, rank, marker = spec.split(":", 3)
    return kind, int(at), int(rank), Path(marker)


def armed(step: int) -> bool:
    """Whether a fault fires at this step (on some rank; it has not fired yet)."""
    fault = _fault()
    return fault is not None and fault[1] == step and not fault[3].exists()


def _fires(kinds: tuple[str, ...], step: int, rank: int) -> str | None:
    """The fault's kind if one of ``kinds`` fires now on ``rank`` (its marker is then written), else None."""
    fault = _fault()
    if fault is None or fault[0] not in kinds or not armed(step) or fault[2] != rank:
        return None
    fault[3].write_text(f"{fault[0]} at step {step} on rank {rank}\n")
    return fault[0]


def maybe_stall(kind: str, step: int, rank: int) -> None:
    """Block this thread forever if a ``kind`` fault is armed for ``step`` on ``rank`` (the watchdog ends it)."""
    if _fires((kind,), step, rank):
        threading.Event().wait()  # the injected stall: this frame is what the watchdog's stack file shows


def maybe_fail(step: int, rank: int) -> None:
    kind = _fires(("raise", "kill"), step, rank)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "raise":
        raise RuntimeError(f"injected fault at step {step} on rank {rank}")


def maybe_tear(run: RunDir, step: int, rank: int, snapshot: Snapshot) -> None:
    if not _fires(("tear",), step, rank):
        return
    name, data = next(iter(snapshot.files().items()))
    run.fs.makedirs(f"{run.path}/checkpoints/step-{step:08d}", exist_ok=True)
    with run.fs.open(f"{run.path}/checkpoints/step-{step:08d}/{name}", "wb") as f:
        f.write(data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)
