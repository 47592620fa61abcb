"""What a training checkpoint holds, as bytes: the run folder (``orchestrator.rundir``) stores them.

``state.pt`` is a weights-only ``torch.save`` of tensors and plain containers: model, EMA,
optimizer, scheduler, loop counters and the reader's position. No RNG state is needed: every
random draw is reseeded from the run seed and the position in the sample order.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from orchestrator.rundir import STATE


def encode(state: dict[str, Any]) -> dict[str, bytes]:
    """The files of a checkpoint for ``state`` (``RunDir.write_checkpoint`` commits them)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return {STATE: buffer.getvalue()}


def decode(data: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
