"""Run the loop in this process (or under torchrun): what unit tests and debugging use."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from orchestrator.launch.distributed import context_from_env
from orchestrator.recipe import Recipe
from orchestrator.train.context import StopRequested
from orchestrator.train.loop import train
from orchestrator.train.stop import interrupted


def run(recipe: Recipe, fresh: bool = False) -> dict[str, Any]:
    """Train in this process. SIGTERM or Ctrl-C: checkpoint at the next step, then raise Interrupted."""
    ctx = context_from_env(recipe, launcher="local")
    ctx.stop.install()
    try:
        if fresh:
            if ctx.is_main:
                ctx.run.set_aside()
            ctx.barrier()
        return train(recipe, ctx)
    except StopRequested as stop:
        raise interrupted(ctx.stop.received, stop.args[0], ctx.run.checkpoint_url(stop.args[0])) from None
    finally:
        ctx.stop.restore()
        if dist.is_initialized():
            dist.destroy_process_group()



def probe(recipe: Recipe, stamp: str, seconds: float) -> None:
    """``orchestrator.doctor`` in this process (or on every torchrun rank); rank 0 saves the figures."""
    from orchestrator import doctor

    ctx = context_from_env(recipe, launcher="local")
    try:
        doctor.probe_and_save(recipe, ctx, stamp, seconds)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
