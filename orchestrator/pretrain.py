"""``python -m orchestrator.pretrain RECIPE [--set k=v ...] [--launcher ray|local] [--print-config] [--fresh]``."""

from __future__ import annotations

import argparse
import logging
import sys

from orchestrator import cli
from orchestrator import recipe as recipes
from orchestrator.errors import RecipeError
from orchestrator.launch.launcher import LAUNCHERS, finished, launch, launch_world_sizes, preflight
from orchestrator.rundir import RunDir

log = logging.getLogger("orchestrator")


ENTRY = {"classification": "orchestrator.pretrain (or orchestrator.finetune)", "segmentation": "orchestrator.segment"}


def main(argv: list[str] | None = None, prog: str = "orchestrator.pretrain", require_init: bool = False,
         doc: str = "ImageNet pretraining of InceptionNeXt from a recipe.", task: str = "classification") -> int:
    """The command line of every recipe-running entry point (pretrain, finetune, segment)."""
    p = cli.parser(prog, doc)
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/b.yaml")
    cli.add_set(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe as JSON and exit")
    p.add_argument("--launcher", choices=LAUNCHERS, default="ray",
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
        preflight(recipe, args.recipe, launch_world_sizes(recipe, args.launcher), require_init)
        done = None if args.fresh else finished(recipe)
        if done:
            log.info("%s", done)
            return
        result = launch(recipe, args.launcher, args.fresh)
        metric = recipes.METRICS[task][0]
        score = f", {metric} {result[metric]:.2f}%" if isinstance(result.get(metric), float) else ""
        run = RunDir.of(recipe)
        log.info("done: %s at step %s%s; weights: %s", run.url, result.get("step"), score, run.final_weights())

    return cli.run(body, p, argv)


if __name__ == "__main__":
    sys.exit(main())
