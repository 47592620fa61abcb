"""``python -m orchestrator.evaluate WEIGHTS --data DATA``: top-1 and top-5 of any weights on any evaluation set.

WEIGHTS is a run folder or URL (``--which final|ema|best|step-N``; the recipe comes from its config.json), or
a weights file (``.safetensors``, a checkpoint's ``state.pt``, an official release ``.pth``) whose architecture
is recorded in it or given with ``--set model.name=...``. DATA is the project's shards (a split folder with its
manifest, any storage URL) or, read directly without sharding, an ImageFolder tree, or an ILSVRC-2012 folder
whose ``val/`` split is evaluated (class folders, or flat with its labels file: ``--val-labels``). Images go through the training loop's own evaluation (the
same reader, the same ``EvalCrop``: timm's evaluation transform, and the same ``Classification.evaluate``), so
a run evaluated here gives exactly the top-1 its metrics.jsonl recorded. Under torchrun every image is
evaluated once across the ranks. The result is printed (``--json``: as JSON) and saved next to the weights
(``<run>/eval/<data name>.json``; ``<file stem>.<data name>.eval.json``) unless ``--out`` names a file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import timm
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from model.weights import WeightsError, architecture_in, classifier_size, load_state_dict
from orchestrator import cli, storage, weights
from orchestrator import overrides as overrides_
from orchestrator import recipe as recipes
from orchestrator.data import manifest as mf
from orchestrator.data.reader import ShardDataset, ShardLoader
from orchestrator.data.sources import FolderSource, Item
from orchestrator.data.transforms import EvalCrop
from orchestrator.errors import CheckpointError, DataError, RecipeError
from orchestrator.launch.distributed import context_from_env
from orchestrator.rundir import EMA_WEIGHTS, WEIGHTS, RunDir
from orchestrator.train import components, tasks

log = logging.getLogger("orchestrator")
ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "validation", "test")


def resolve(spec: str, which: str, sets: list[str], data: str, options: dict[str, Any]) -> tuple[recipes.Recipe, str, RunDir | None]:
    """(recipe, weights URL, run folder or None) for WEIGHTS: a run's recipe, or the architecture's defaults."""
    given = {o.key: o.value for o in overrides_.parse(sets)}
    fs, path = storage.filesystem(spec, options)
    if fs.isdir(path):
        run = RunDir(spec, options)
        config = run.config()
        if config is None:
            raise RecipeError(f"{spec}: a folder but not a run (no config.json)")
        url = _run_weights(run, which)
        base = recipes.from_dict({**config, "data": {**config["data"], "storage_options": options},
                                  "run": {**config["run"], "storage_options": options}})
        values: dict[str, Any] = {}
    else:
        if not fs.exists(path):
            raise CheckpointError(f"{spec}: not found")
        url, run = spec, None
        arch = given.get("model.name") or architecture_in(fs.cat_file(path), spec)
        if not arch:
            raise RecipeError(f"{spec}: the file does not record its architecture; add --set model.name=<timm name>")
        if not timm.is_model(arch):
            raise RecipeError(f"model.name={arch!r} is not a timm architecture")
        cfg = timm.create_model(arch, pretrained=False).pretrained_cfg
        base = recipes.load(ROOT / "recipes" / "a.yaml")
        values = {"model.name": arch, "data.input_size": int(cfg.get("input_size", (3, 224, 224))[-1]),
                  "data.crop_pct": float(cfg.get("crop_pct", 0.875)),
                  "data.interpolation": cfg.get("interpolation", "bicubic"), "data.storage_options": options,
                  "data.num_workers": min(base.data.num_workers, os.cpu_count() or 1)}
    values |= {"data.train": data, "data.val": data, "run.stall_timeout_s": None}
    values |= given
    return recipes.with_values(base, values, "evaluate"), url, run


def _run_weights(run: RunDir, which: str) -> str:
    if which in ("final", "ema", "model"):
        name = {"ema": EMA_WEIGHTS, "model": WEIGHTS}.get(which)
        url = run.final_weights() if name is None else run.url_of(name) if run.fs.exists(f"{run.path}/{name}") else None
        if url is None:
            raise CheckpointError(f"{run.url}: no {name or f'{EMA_WEIGHTS} or {WEIGHTS}'} (the run has not finished); "
                                  "try --which best or step-N")
        return url
    if which == "best":
        best = run.best_weights()
        if best is None:
            raise CheckpointError(f"{run.url}: no final weights and no checkpoint")
        return best
    if which.startswith("step-") and which[5:].isdigit():
        step = int(which[5:])
        if not any(c.step == step for c in run.committed()):
            raise CheckpointError(f"{run.url}: no committed checkpoint at step {step} "
                                  f"(committed: {[c.step for c in run.committed()]})")
        return run.checkpoint_url(step)
    raise RecipeError(f"--which {which!r}: expected final, ema, model, best or step-N")


class FolderEval(Dataset):
    """An ImageFolder tree or a flat val folder read directly: this rank's images (every ``world``-th), as the
    shard reader's evaluation yields them: ``(HWC uint8, label, sample id, corrupt)``."""

    def __init__(self, source: FolderSource, items: list[Item], crop: EvalCrop, rank: int, world: int) -> None:
        self.source, self.items, self.crop = source, items[rank::world], crop
        self.ids = list(range(len(items)))[rank::world]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int, int]:
        item = self.items[i]
        ((data, label, _),) = self.source.read([item])
        try:
            return self.crop(data), label, self.ids[i], 0
        except Exception:  # noqa: BLE001 - a corrupt image is counted, not fatal, as in training
            log.warning("corrupt image skipped: %s", item.key)
            return torch.zeros(self.crop.size, self.crop.size, 3, dtype=torch.uint8), label, self.ids[i], 1


def data_loader(recipe: recipes.Recipe, task: tasks.Task, ctx: Any, batch: int,
                val_labels: str | None) -> tuple[Any, int, int | None]:
    """(loader, images, classes: None where the shards do not list them) for ``data.val``: shards through the
    training reader, or a folder directly."""
    d = recipe.data
    fs, path = storage.filesystem(d.val, d.storage_options)
    if not fs.exists(path):
        raise DataError(f"--data {d.val}: not found")
    if path.endswith(".json") or fs.exists(storage.join(path, mf.MANIFEST)) or fs.glob(storage.join(path, "*.parquet")):
        manifest = mf.load(d.val, d.storage_options)
        ds = ShardDataset(manifest, task.transform(manifest, train=False), train=False, rank=ctx.rank,
                          world_size=ctx.world_size, seed=recipe.run.seed, options=components.reader_options(recipe))
        return ShardLoader(ds, batch, d.num_workers), manifest.num_samples, len(manifest.classes) or None
    source = FolderSource(d.val, d.storage_options, val_labels=val_labels)
    split = source.splits()
    items = [item for block in (split.get("val") or split["train"]) for item in block]
    if not items:
        raise DataError(f"--data {d.val}: no images")
    ds = FolderEval(source, items, EvalCrop(d.input_size, d.crop_pct, d.interpolation), ctx.rank, ctx.world_size)
    return DataLoader(ds, batch_size=batch, num_workers=d.num_workers), len(items), len(source.classes)


def data_name(url: str) -> str:
    """``.../imagenet/val`` -> ``imagenet-val``; ``.../imagenet-a`` -> ``imagenet-a``."""
    parts = url.rstrip("/").split("/")
    return "-".join(parts[-2:]) if parts[-1] in SPLITS and len(parts) > 1 else parts[-1]


def evaluate(recipe: recipes.Recipe, url: str, batch: int, val_labels: str | None = None) -> dict[str, Any]:
    """Evaluate the weights at ``url`` on ``recipe.data.val`` in this process (a torchrun rank): the metrics,
    images/s and what was evaluated, the same on every rank."""
    ctx = context_from_env(recipe, launcher="local")
    try:
        sd, what = weights.state_dict(url, recipe.run.storage_options)
        task = tasks.for_recipe(recipe)
        loader, images, classes = data_loader(recipe, task, ctx, batch, val_labels)
        outputs = classifier_size(sd)
        if outputs is not None and classes is not None and outputs != classes:
            raise CheckpointError(f"{url}: the weights' classifier has {outputs} classes; --data {recipe.data.val} "
                                  f"has {classes}")
        model = timm.create_model(recipe.model.name, pretrained=False, num_classes=outputs or classes or 1000)
        try:
            load_state_dict(model, sd, what)
        except WeightsError as exc:
            raise CheckpointError(str(exc)) from exc
        model.to(ctx.device)
        channels_last = components.channels_last(recipe, ctx)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        setup = tasks.EvalSetup(loader, components.autocast_dtype(recipe, ctx), channels_last)
        started = time.monotonic()
        metrics = task.evaluate(model, setup, ctx)
        seconds = time.monotonic() - started
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    d = recipe.data
    return {**metrics, "images": images, "images_per_s": round(metrics["val_images"] / seconds, 1),
            "world_size": ctx.world_size, "weights": storage.redact(url), "data": storage.redact(d.val),
            "model": recipe.model.name, "transform": {"input_size": d.input_size, "crop_pct": d.crop_pct,
                                                      "interpolation": d.interpolation}, "time": round(time.time(), 3)}


def save(result: dict[str, Any], url: str, run: RunDir | None, out: str | None, options: dict[str, Any]) -> str:
    """Where the result goes: ``--out``, ``<run>/eval/<data name>.json``, or beside the weights file."""
    text = json.dumps(result, indent=2).encode()
    name = data_name(result["data"])
    if out is None and run is not None:
        run.write_bytes(f"eval/{name}.json", text)
        return run.url_of("eval", f"{name}.json")
    target = out or f"{url.rsplit('.', 1)[0]}.{name}.eval.json"
    fs, path = storage.filesystem(target, options)
    fs.pipe_file(path, text)
    return target


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("orchestrator.evaluate", __doc__)
    p.add_argument("weights", help="a run folder or URL, or a weights file (.safetensors, .pth, .pt)")
    p.add_argument("--data", required=True, help="shards (a split folder with its manifest), an ImageFolder tree, "
                                                 "or an ILSVRC-2012 folder (its val/ split)")
    p.add_argument("--which", default="final", help="for a run: final (EMA first), ema, model (not EMA), best "
                                                    "(final, else the newest checkpoint) or step-N (a checkpoint)")
    p.add_argument("--val-labels", help="the labels file of a flat val folder (as `data shard --val-labels`)")
    p.add_argument("--batch-size", type=int, help="images per rank and batch (default: a run's micro-batch, else 64)")
    p.add_argument("--out", help="write the result here instead of beside the weights")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    cli.add_set(p, "recipe override (model.name, data.input_size, data.crop_pct, data.interpolation, ...)")
    cli.add_storage_option(p)

    def body(args: argparse.Namespace) -> None:
        options = cli.storage_options(args.storage_option)
        recipe, url, run = resolve(args.weights, args.which, args.set, args.data, options)
        if recipe.task != "classification":
            raise RecipeError(f"{args.weights}: a {recipe.task} run; only classification is evaluated so far")
        batch = args.batch_size or (recipes.micro_batch(recipe) if run is not None else 64)
        result = evaluate(recipe, url, batch, args.val_labels)
        if int(os.environ.get("RANK", 0)) != 0:
            return
        result["saved"] = save(result, url, run, args.out, options)
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{result['model']}  {result['weights']}\n  on {result['data']}: {result['val_images']} images, "
                  f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  ({result['images_per_s']} images/s "
                  f"on {result['world_size']} rank(s))\n  saved: {result['saved']}")

    return cli.run(body, p, argv)


if __name__ == "__main__":
    sys.exit(main())
