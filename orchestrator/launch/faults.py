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


def maybe_fail(step: int, rank: int) -> None:
    if not _spec:
        return
    kind, at, on_rank, marker = _spec.split(":", 3)
    if step != int(at) or rank != int(on_rank) or Path(marker).exists():
        return
    Path(marker).write_text(f"{kind} at step {step} on rank {rank}\n")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault at step {step} on rank {rank}")
