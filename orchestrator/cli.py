"""The shared command line of ``orchestrator.pretrain`` and ``orchestrator.finetune``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from orchestrator import recipe as recipes
from orchestrator.data import manifest, storage
from orchestrator.errors import OrchestratorError, RecipeError


def parse(prog: str, description: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/b.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a recipe key")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe as JSON and exit")
    parser.add_argument("--launcher", choices=("ray", "local"), default="ray",
                        help="ray: Ray Train on the current or a new local cluster (default); local: this process / torchrun")
    parser.add_argument("--fresh", action="store_true",
                        help="start over: move an existing run of this name to <run>.replaced-<time> instead of resuming it")
    return parser.parse_args(argv)


def world_size(recipe: recipes.Recipe, launcher: str) -> int:
    if launcher == "local":
        return int(os.environ.get("WORLD_SIZE", 1))
    return recipe.scaling.num_workers


def preflight(recipe: recipes.Recipe, path: str, world: int, require_init: bool) -> None:
    """Checks that need the launch plan or storage, done before any process group or cluster starts."""
    recipes.plan_batch(recipe, world, f"{path} (on {world} device(s))")
    if require_init and not recipe.model.init:
        raise RecipeError(f"{path}: model.init: fine-tuning needs a run name or checkpoint URL to start from")
    for key in ("train", "val"):
        url = getattr(recipe.data, key)
        if url:
            try:
                manifest.load(url, recipe.data.storage_options)
            except OrchestratorError as exc:
                raise RecipeError(f"{path}: data.{key}={url}: {exc}") from exc


def main(prog: str, description: str, argv: list[str] | None = None, require_init: bool = False) -> int:
    args = parse(prog, description, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        recipe = recipes.load(args.recipe, args.set)
        if args.print_config:
            print(recipe.to_json())
            return 0
        preflight(recipe, args.recipe, world_size(recipe, args.launcher), require_init)
        result = launch(recipe, args.launcher, args.fresh)
    except OrchestratorError as exc:
        options = {**recipe.data.storage_options, **recipe.run.storage_options} if "recipe" in locals() else {}
        print(f"error: {storage.redact(str(exc), options)}", file=sys.stderr)
        return 2
    logging.getLogger(prog).info("finished: %s", result)
    return 0


def launch(recipe: recipes.Recipe, launcher: str, fresh: bool = False) -> dict[str, Any]:
    if launcher == "local":
        from orchestrator.launch import local

        return local.run(recipe, fresh)
    from orchestrator.launch import ray_train

    return ray_train.run(recipe, fresh)
