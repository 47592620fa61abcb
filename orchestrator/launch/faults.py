"""Fault injection for the fault-tolerance tests: ``ORCHESTRATOR_INJECT_FAULT=raise|kill:STEP:RANK:MARKER``.

The fault fires once (the marker file records that it did) right after the checkpoint at STEP, on RANK.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

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
