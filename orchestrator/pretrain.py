"""``python -m orchestrator.pretrain RECIPE [--set k=v ...] [--launcher ray|local] [--print-config] [--fresh]``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from orchestrator import cli, launch
from orchestrator import recipe as recipes
from orchestrator.errors import RecipeError
from orchestrator.launch.job import Job
from orchestrator.preflight import finished, preflight, world_sizes_for
from orchestrator.rundir import RunDir
from orchestrator.train import trackers

log = logging.getLogger("orchestrator")


def training(recipe: recipes.Recipe, fresh: bool = False) -> Job:
    """The training run of ``recipe`` as a launcher ``Job`` (resumable; trackers' settings go to every rank);
    ``fresh`` first moves an existing run of the name aside. (The loop, torch and timm are imported here, not at
    the top: ``--print-config`` and bad input are answered without them.)"""
    from orchestrator.train import loop

    return Job(loop.on_rank, recipe, env=trackers.job_environment(recipe), resumable=True,
               setup=RunDir.of(recipe).set_aside if fresh else None)


def train(recipe: recipes.Recipe, where: str = "local", fresh: bool = False) -> dict[str, Any]:
    """Train ``recipe`` under ``where`` (``local`` or ``ray``); the last metrics ({} on a torchrun rank but 0)."""
    return launch.run(training(recipe, fresh), where) or {}


ENTRY = {"classification": "orchestrator.pretrain (or orchestrator.finetune)", "segmentation": "orchestrator.segment"}


def main(argv: list[str] | None = None, prog: str = "orchestrator.pretrain", require_init: bool = False,
         doc: str = "ImageNet pretraining of InceptionNeXt from a recipe.", task: str = "classification") -> int:
    """The command line of every recipe-running entry point (pretrain, finetune, segment)."""
    p = cli.parser(prog, doc)
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/b.yaml")
    cli.add_set(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe as JSON and exit")
    p.add_argument("--launcher", choices=("ray", "local"), default="ray",
                   help="ray: Ray Train on the current or a new local cluster (default); local: this process / torchrun")
    p.add_argument("--fresh", action="store_true",
                   help="start over: move an existing run of this name to <run>.replaced-<time> instead of resuming it")

    def body(args: argparse.Namespace) -> None:
        recipe = recipes.load(args.recipe, args.set)
        if recipe.task != task:
            raise RecipeError(f"{args.recipe}: task: {recipe.task} recipes run with python -m {ENTRY[recipe.task]}")
        if args.print_config:
            print(recipe.to_json())
            return
        preflight(recipe, args.recipe, world_sizes_for(recipe, args.launcher), require_init)
        done = None if args.fresh else finished(recipe)
        if done:
            log.info("%s", done)
            return
        result = train(recipe, args.launcher, args.fresh)
        metric = recipes.METRICS[task][0]
        score = f", {metric} {result[metric]:.2f}%" if isinstance(result.get(metric), float) else ""
        run = RunDir.of(recipe)
        log.info("done: %s at step %s%s; weights: %s", run.url, result.get("step"), score, run.final_weights())

    return cli.run(body, p, argv)


if __name__ == "__main__":
    sys.exit(main())
