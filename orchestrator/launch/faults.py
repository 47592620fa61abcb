"""Fault injection for the fault-tolerance tests: ``ORCHESTRATOR_INJECT_FAULT=raise|kill|tear:STEP:RANK:MARKER``.

The fault fires once (the marker file records that it did) on RANK: ``raise`` and ``kill`` right
after the checkpoint at STEP is committed; ``tear`` (rank 0) while that checkpoint is being
uploaded: half of ``state.pt`` is in storage, no marker, when the process is SIGKILLed.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from orchestrator.rundir import RunDir

ENV = "ORCHESTRATOR_INJECT_FAULT"
_spec: str | None = None


def configure(spec: str | None) -> None:
    global _spec
    _spec = spec


def armed(step: int) -> bool:
    """Whether a fault fires at this step (on some rank; it has not fired yet)."""
    if not _spec:
        return False
    _kind, at, _rank, marker = _spec.split(":", 3)
    return step == int(at) and not Path(marker).exists()


def maybe_fail(step: int, rank: int) -> None:
    if not armed(step) or rank != int(_spec.split(":", 3)[2]):
        return
    kind, _at, _on_rank, marker = _spec.split(":", 3)
    Path(marker).write_text(f"{kind} at step {step} on rank {rank}\n")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault at step {step} on rank {rank}")


def maybe_tear(run: RunDir, step: int, rank: int, files: dict[str, bytes]) -> None:
    if not armed(step) or rank != int(_spec.split(":", 3)[2]) or not _spec.startswith("tear:"):
        return
    Path(_spec.split(":", 3)[3]).write_text(f"tear at step {step} on rank {rank}\n")
    name, data = next(iter(files.items()))
    run.fs.makedirs(f"{run.path}/checkpoints/step-{step:08d}", exist_ok=True)
    with run.fs.open(f"{run.path}/checkpoints/step-{step:08d}/{name}", "wb") as f:
        f.write(data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)
