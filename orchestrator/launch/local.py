"""Run the loop in this process (or under torchrun): what unit tests and debugging use."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from orchestrator.launch.distributed import context_from_env
from orchestrator.recipe import Recipe
from orchestrator.train.loop import train


def run(recipe: Recipe, fresh: bool = False) -> dict[str, Any]:
    ctx = context_from_env(recipe, launcher="local")
    try:
        if fresh:
            if ctx.is_main:
                ctx.run.set_aside()
            ctx.barrier()
        return train(recipe, ctx)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
