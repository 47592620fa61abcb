"""``python -m orchestrator.evaluate WEIGHTS --data DATA``: the metrics of any weights on any evaluation set, on
this machine (torchrun too), the Ray cluster (``--launcher ray``) or Slurm (``--launcher slurm``).

WEIGHTS is a run folder or URL (``--which final|ema|model|best|step-N``; the recipe comes from its config.json),
a weights file (``.safetensors``, a checkpoint's ``state.pt``, an official release ``.pth``) whose architecture is
recorded in it or given with ``--set model.name=...`` (a segmentation file needs ``--recipe``, for its head), or a
timm tag (``inception_next_tiny.sail_in1k``) whose weights are already in the local Hugging Face cache: nothing
is downloaded. DATA is the project's shards (a split folder with its manifest, any storage URL) or, read directly
without sharding, an ImageFolder tree, an ILSVRC-2012 root (its ``val/`` split), a flat ILSVRC-2012 val folder
with its labels file (``--val-labels``), or an ADEChallengeData2016 folder (its validation split).

Images go through the training loop's own evaluation (the same reader and transforms, the same
``Task.evaluate``), so a run evaluated here gives exactly what its metrics.jsonl recorded. Classification:
top-1/top-5 with timm's evaluation transform, ``--label-subset`` (ImageNet-A/R) and ``--real-labels``
(ImageNet-ReaL) as timm's validate.py scores them. Segmentation: mIoU/mAcc/aAcc, and with
``segment.aug_test`` multi-scale + flip (``ms_`` keys); ``segment.test_mode`` whole or slide. Every image is
evaluated once across the ranks. The result is printed (``--json``: as JSON) and saved, with a per-class CSV
beside it, as ``<run>/eval/<data name>.json`` (``<file stem>.<data name>.eval.json`` for a weights file)
unless ``--out`` names the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pkgutil
import re
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import timm
import torch
from torch.utils.data import DataLoader, Dataset

from model.weight_format import (
    WeightsError,
    architecture_in,
    classifier_size,
    load_state_dict,
    recorded_config,
)
from orchestrator import cli, launch, storage, weight_lookup
from orchestrator import overrides as overrides_
from orchestrator import recipe as recipes
from orchestrator.data import manifest as mf
from orchestrator.data.reader import ShardDataset, ShardLoader
from orchestrator.data.seg_sources import ADESource
from orchestrator.data.sources import FolderSource, Item
from orchestrator.errors import CheckpointError, DataError, RecipeError
from orchestrator.launch.job import Job
from orchestrator.rundir import EMA_WEIGHTS, WEIGHTS, RunDir
from orchestrator.train import components, restart, tasks
from orchestrator.train.context import Rank

log = logging.getLogger("orchestrator")
ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "validation", "test")
SUBSETS = ("imagenet-a", "imagenet-r")  # timm/data/_info/<name>_indices.txt and _synsets.txt
REAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.")


@dataclasses.dataclass
class Request:
    """One evaluation as every rank needs it (the launchers ship it as the job's argument)."""

    weights: str
    batch: int
    out: str  # the folder the result and its per-class CSV go to
    name: str  # the result's file stem
    val_labels: str | None = None
    classes_file: str | None = None
    label_subset: str | None = None  # imagenet-a, imagenet-r or a file of class indices
    real_labels: str | None = None  # a ReaL labels file; "" for timm's copy
    which: str = "final"  # of a run: which weights (--which); recorded with the result


# --- weights -----------------------------------------------------------------------------------------------
def resolve(spec: str, which: str, sets: list[str], data: str, options: dict[str, Any],
            recipe_file: str | None) -> tuple[recipes.Recipe, str, RunDir | None]:
    """(recipe, weights URL, run folder or None) for WEIGHTS: a run's recipe, or the architecture's defaults."""
    given = {o.key: o.value for o in overrides_.parse(sets)}
    fs, path = storage.filesystem(spec, options)
    values: dict[str, Any] = {}
    if fs.isdir(path):
        run = RunDir(spec, options)
        config = run.config()
        if config is None:
            raise RecipeError(f"{spec}: a folder but not a run (no config.json)")
        url = _run_weights(run, which)
        base = recipes.from_dict({**config, "data": {**config["data"], "storage_options": options},
                                  "run": {**config["run"], "storage_options": options}})
    else:
        run = None
        url, arch, cfg, recorded = _weights_file(spec, fs, path, given.get("model.name"))
        base = recipes.load(recipe_file or ROOT / "recipes" / "a.yaml")
        if base.task == "classification":  # the transform the weights were made for (a segmentation recipe has its own)
            values = {"data.input_size": int(cfg["input_size"][-1]), "data.crop_pct": float(cfg["crop_pct"]),
                      "data.interpolation": cfg["interpolation"]}
            defaulted = [f"{k}={v}" for k, v in values.items() if k not in given]
            if not recorded and defaulted:
                log.warning("%s records no preprocessing: evaluating with timm's defaults for %s: %s (--set a key to "
                            "change it)", spec, arch, ", ".join(defaulted))
        values |= {"model.name": arch, "data.storage_options": options, "run.storage_options": options,
                   "data.num_workers": min(base.data.num_workers, os.cpu_count() or 1)}
    values |= {"data.train": data, "data.val": data, "run.stall_timeout_s": None}
    values |= given
    return recipes.with_values(base, values, "evaluate"), url, run


def _weights_file(spec: str, fs: Any, path: str, arch: str | None) -> tuple[str, str, dict[str, Any], bool]:
    """(URL, architecture, preprocessing, whether the weights carry it) of a weights file, or of a timm tag's cached
    weights. A file of this project records its preprocessing (``model.weight_format.timm_config``); a timm tag has timm's
    own; any other file gets timm's defaults for the architecture."""
    if fs.exists(path):
        data = fs.cat_file(path)
        config = recorded_config(data, spec) or {}
        arch = arch or config.get("architecture") or architecture_in(data, spec)
        if not arch:
            raise RecipeError(f"{spec}: the file does not record its architecture; add --set model.name=<timm name>")
        if not timm.is_model(arch):
            raise RecipeError(f"model.name={arch!r} is not a timm architecture")
        cfg = config.get("pretrained_cfg") or {}
        return spec, arch, {**timm.models.get_pretrained_cfg(arch).to_dict(), **cfg}, "crop_pct" in cfg
    name, _ = timm.models.split_model_name_tag(spec)
    if "/" in spec or not timm.is_model(name):
        raise CheckpointError(f"{spec}: not found (neither a file, a run folder nor a timm model tag)")
    return cached_timm_weights(spec), name, timm.models.get_pretrained_cfg(spec).to_dict(), True


def cached_timm_weights(tag: str) -> str:
    """The local file of a timm tag's weights, from the Hugging Face cache (``HF_HUB_CACHE``, ``HF_HOME``) or
    torch hub's; never downloads."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(tag)
    if cfg is None:
        raise CheckpointError(f"{tag}: timm has no pretrained weights of that name")
    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None)
    if cfg.hf_hub_id:
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(cfg.hf_hub_id, filename, cache_dir=cache)
            if isinstance(found, str):
                return found
    if cfg.url:
        found_hub = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(cfg.url))
        if os.path.exists(found_hub):
            return found_hub
    where = cache or "the default Hugging Face cache"
    raise CheckpointError(
        f"{tag}: its weights ({cfg.hf_hub_id or cfg.url}) are not in the local cache ({where}); nothing is downloaded "
        f"at run time. Fetch them once where there is a network (python -c \"import timm; timm.create_model('{tag}', "
        "pretrained=True)\") or pass the weights file")


def _run_weights(run: RunDir, which: str) -> str:
    if which in ("final", "ema", "model"):
        name = {"ema": EMA_WEIGHTS, "model": WEIGHTS}.get(which)
        url = run.final_weights() if name is None else run.url_of(name) if run.fs.exists(f"{run.path}/{name}") else None
        if url is None and which == "ema" and ((run.config() or {}).get("ema") or {}).get("decay") is None:
            raise CheckpointError(f"{run.url}: its recipe has no EMA (ema.decay: null), so there are no EMA weights; "
                                  "try --which final or model")
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


# --- data --------------------------------------------------------------------------------------------------
class FolderEval(Dataset):
    """A folder read directly: this rank's images (every ``world``-th), as the shard reader's evaluation yields
    them: ``(*transform(bytes, target), sample id, corrupt)``."""

    def __init__(self, data: EvalData, transform: Any, standin: tuple[torch.Tensor, Any], rank: int, world: int) -> None:
        assert data.items is not None
        self.source, self.manifest, self.transform, self.standin = data.source, data.manifest, transform, standin
        self.items, self.ids = data.items[rank::world], list(range(len(data.items)))[rank::world]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        item = self.items[i]
        ((data, target, _),) = self.source.read([item])
        try:
            return *self.transform(data, target), self.ids[i], 0
        except Exception:  # noqa: BLE001 - a corrupt image is counted, not fatal, as in training
            log.warning("corrupt image skipped: %s", item.key)
            image, label = self.standin
            return image, (target if isinstance(target, int) else label), self.ids[i], 1


@dataclasses.dataclass
class EvalData:
    """An evaluation set: shards (their manifest), or a folder's items with a manifest made for them."""

    manifest: mf.Manifest
    source: Any = None
    items: list[Item] | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the shards' storage options

    @property
    def images(self) -> int:
        return len(self.items) if self.items is not None else self.manifest.num_samples

    def names(self) -> list[str]:
        """Each image's file name, by sample id (ImageNet-ReaL is keyed by them)."""
        if self.items is not None:
            return [os.path.basename(it.path or it.key) for it in self.items]
        out = []
        for i in range(len(self.manifest.shards)):
            fs, path = storage.filesystem(self.manifest.shard_url(i), self.options)
            out += pq.read_table(fs.open(path, "rb"), columns=["image.path"]).column(0).to_pylist()
        return [os.path.basename(n or "") for n in out]

    def loader(self, recipe: recipes.Recipe, task: tasks.Task, ctx: Rank, batch: int) -> Any:
        transform = task.transform(self.manifest, train=False)
        if self.items is None:
            ds = ShardDataset(self.manifest, transform, train=False, rank=ctx.rank, world_size=ctx.world_size,
                              seed=recipe.run.seed, options=components.reader_options(recipe))
            return ShardLoader(ds, batch, recipe.data.num_workers, pin_memory=ctx.device.type == "cuda")
        size = recipe.data.input_size
        standin = (torch.zeros(size, size, 3, dtype=torch.uint8), 0) if task.name == "classification" \
            else (torch.zeros(1, 1, 3, dtype=torch.uint8), torch.zeros(1, 1, dtype=torch.uint8))
        ds = FolderEval(self, transform, standin, ctx.rank, ctx.world_size)
        return DataLoader(ds, batch_size=batch, num_workers=recipe.data.num_workers, pin_memory=ctx.device.type == "cuda")


def open_data(recipe: recipes.Recipe, val_labels: str | None, classes_file: str | None) -> EvalData:
    """``data.val``: shards through the training reader, or a folder read directly (its validation split)."""
    d = recipe.data
    fs, path = storage.filesystem(d.val, d.storage_options)
    if not fs.exists(path):
        raise DataError(f"--data {d.val}: not found")
    if path.endswith(".json") or fs.exists(storage.join(path, mf.MANIFEST)) or fs.glob(storage.join(path, "*.parquet")):
        manifest = mf.load(d.val, d.storage_options)
        if manifest.task != recipe.task:
            hint = " (a segmentation weights file needs --recipe, for its head: e.g. recipes/seg/upernet_t.yaml)" \
                if manifest.task == "segmentation" else ""
            raise DataError(f"--data {d.val}: {manifest.task} shards; the model is a {recipe.task} model{hint}")
        return EvalData(manifest, options=d.storage_options)
    splits = [name for name in SPLITS if fs.exists(storage.join(path, name, mf.MANIFEST))]
    if splits:  # a dataset root (data/synth), not one of its splits
        pick = "val" if "val" in splits else splits[0]
        raise DataError(f"--data {d.val}: a dataset root holding the shards of {', '.join(splits)}, not an evaluation "
                        f"set itself; give one split, e.g. --data {d.val.rstrip('/')}/{pick}")
    if recipe.task == "segmentation":
        source: Any = ADESource(d.val, d.storage_options, recipe_reduce_zero_label(recipe), classes_file)
    else:
        source = FolderSource(d.val, d.storage_options, val_labels=val_labels)
    split = source.splits(("val",))
    items = [item for block in (split.get("val") or split.get("train") or []) for item in block]
    if not items:
        raise DataError(f"--data {d.val}: no images")
    manifest = mf.Manifest(split="val", shards=[], classes=source.classes, root=d.val, task=recipe.task,
                           reduce_zero_label=getattr(source, "reduce_zero_label", False))
    return EvalData(manifest, source, items)


def recipe_reduce_zero_label(recipe: recipes.Recipe) -> bool:
    """ADE20K's convention unless the recipe's training shards say otherwise."""
    try:
        return mf.load(recipe.data.train, recipe.data.storage_options).reduce_zero_label
    except (DataError, OSError, ValueError):
        return True


def data_name(url: str) -> str:
    """``.../imagenet/val`` -> ``imagenet-val``; ``.../imagenet-a`` -> ``imagenet-a``."""
    parts = url.rstrip("/").split("/")
    return "-".join(parts[-2:]) if parts[-1] in SPLITS and len(parts) > 1 else parts[-1]


# --- label subsets and ReaL --------------------------------------------------------------------------------
def timm_info(name: str) -> str:
    data = pkgutil.get_data("timm.data", f"_info/{name}")
    assert data is not None
    return data.decode()


def label_subset(spec: str, data: EvalData, outputs: int | None, options: dict[str, Any]) -> list[int]:
    """timm's ``--valid-labels``: the outputs scored, in the data's class order; checked against the data's classes."""
    if spec in SUBSETS:
        prefix = spec.replace("-", "_")
        indices = [int(v) for v in timm_info(f"{prefix}_indices.txt").split()]
        synsets = timm_info(f"{prefix}_synsets.txt").split()
        wnids = [c.wnid for c in data.manifest.classes]
        if wnids != synsets:
            odd = next((w for w in wnids if w not in synsets), None) or f"{len(wnids)} classes against {len(synsets)}"
            raise DataError(f"--label-subset {spec}: the classes of --data {data.manifest.root} are not {spec}'s "
                            f"{len(synsets)} synsets ({odd})")
    else:
        fs, path = storage.filesystem(spec, options)
        if not fs.exists(path):
            raise DataError(f"--label-subset {spec}: not found (imagenet-a, imagenet-r or a file of class indices)")
        try:
            indices = [int(v) for v in fs.cat_file(path).decode().split()]
        except ValueError:
            raise DataError(f"--label-subset {spec}: expected one class index per line") from None
        if len(indices) != len(data.manifest.classes):
            raise DataError(f"--label-subset {spec} has {len(indices)} classes; --data {data.manifest.root} has "
                            f"{len(data.manifest.classes)}")
    if outputs is not None and max(indices) >= outputs:
        raise CheckpointError(f"--label-subset {spec}: index {max(indices)}, but the weights' classifier has {outputs} outputs")
    return indices


def real_labels(spec: str, data: EvalData, options: dict[str, Any]) -> dict[int, list[int]]:
    """Sample id -> ImageNet-ReaL labels (timm's ``RealLabelsImagenet``: one list per ILSVRC2012_val_<n> image)."""
    if spec:
        fs, path = storage.filesystem(spec, options)
        if not fs.exists(path):
            raise DataError(f"--real-labels {spec}: not found")
        text = fs.cat_file(path).decode()
    else:
        text = timm_info("imagenet_real_labels.json")
    table = json.loads(text)
    out = {}
    for sample, name in enumerate(data.names()):
        found = REAL_NAME.match(name)
        if found and int(found.group(1)) <= len(table):
            out[sample] = table[int(found.group(1)) - 1]
    if not out:
        raise DataError(f"--real-labels: no ImageNet val image names (ILSVRC2012_val_<n>.JPEG) in --data {data.manifest.root}")
    return out


# --- one rank ----------------------------------------------------------------------------------------------
def prepare(job: Request, recipe: recipes.Recipe,
            ctx: Rank | None = None) -> tuple[dict[str, torch.Tensor], str, EvalData, list[int] | None]:
    """Weights and data, checked against each other before anything is computed or written. On a job's ranks
    (``ctx``) the weights are read by rank 0 alone and shared with the others."""
    options = recipe.run.storage_options
    sd, what = weight_lookup.state_dict(job.weights, options, restart.reader(ctx) if ctx else weight_lookup.read)
    data = open_data(recipe, job.val_labels, job.classes_file)
    classes = len(data.manifest.classes) or None
    subset = None
    if recipe.task == "segmentation":
        if classes is not None and classes != recipe.model.num_classes:
            raise DataError(f"--data {recipe.data.val} has {classes} classes; the model has model.num_classes="
                            f"{recipe.model.num_classes}")
        if job.label_subset or job.real_labels is not None:
            raise RecipeError("--label-subset and --real-labels are for classification")
        return sd, what, data, None
    outputs = classifier_size(sd)
    if job.label_subset:
        subset = label_subset(job.label_subset, data, outputs, options)
        if job.real_labels is not None:
            raise RecipeError("--real-labels scores the 1000 ImageNet classes; it does not go with --label-subset")
    elif outputs is not None and classes is not None and outputs != classes:
        raise CheckpointError(f"{job.weights}: the weights' classifier has {outputs} classes; --data {recipe.data.val} "
                              f"has {classes}")
    return sd, what, data, subset


def build_model(recipe: recipes.Recipe, task: tasks.Task, sd: dict[str, torch.Tensor], what: str, data: EvalData,
                ctx: Rank) -> torch.nn.Module:
    if task.name == "classification":
        classes = classifier_size(sd) or len(data.manifest.classes) or recipe.model.num_classes
        model = timm.create_model(recipe.model.name, pretrained=False, num_classes=classes)
    else:
        model = task.create_model(ctx)
    try:
        load_state_dict(model, sd, what)
    except WeightsError as exc:
        raise CheckpointError(str(exc)) from exc
    return model


def on_rank(recipe: recipes.Recipe, ctx: Rank, job: Request) -> dict[str, Any]:
    """Evaluate on this rank (the evaluation's job function); rank 0 saves the result and the per-class CSV. The
    result is the same on every rank."""
    sd, what, data, subset = prepare(job, recipe, ctx)
    task = tasks.for_recipe(recipe)
    loader = data.loader(recipe, task, ctx, job.batch)
    real = real_labels(job.real_labels, data, recipe.run.storage_options) if job.real_labels is not None else None
    model = build_model(recipe, task, sd, what, data, ctx).to(ctx.device)
    channels_last = components.channels_last(recipe, ctx)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    out = RunDir(job.out, recipe.run.storage_options)  # the result and its per-class CSV
    setup = tasks.EvalSetup(loader, components.autocast_dtype(recipe, ctx), channels_last, ctx.device, ctx.world_size,
                            ctx.is_main, out, subset, real)
    started = time.monotonic()
    metrics = task.evaluate(model, setup, tag=job.name, final=True)
    seconds = time.monotonic() - started
    d, s = recipe.data, recipe.segment
    settings = {"input_size": d.input_size, "crop_pct": d.crop_pct, "interpolation": d.interpolation} \
        if task.name == "classification" else {"test_mode": s.test_mode, "scale": s.scale, "aug_test": s.aug_test,
                                               "aug_test_ratios": s.aug_test_ratios if s.aug_test else None}
    result = {**metrics, "task": task.name, "images": data.images,
              "images_per_s": round(metrics["val_images"] / max(seconds, 1e-9), 1), "world_size": ctx.world_size,
              "launcher": ctx.launcher, "weights": storage.redact(job.weights), "data": storage.redact(d.val),
              "model": recipe.model.name, "which": job.which, "transform": settings, "label_subset": job.label_subset,
              "time": round(time.time(), 3), "saved": storage.redact(storage.join(job.out, f"{job.name}.json"))}
    if ctx.is_main:
        out.write_json(f"{job.name}.json", result)
    return result


def target(spec: str, url: str, run: RunDir | None, out: str | None, data: str, which: str = "final") -> tuple[str, str]:
    """(folder, file stem) of the result: ``--out``; ``<run>/eval/<data name>`` for a run's final weights and
    ``<data name>.<which>`` for any other ``--which`` (so a checkpoint's result never stands in for the run's);
    beside a weights file; for a timm tag (``url`` is then its cached file), ``eval/<tag>.<data name>`` here."""
    if out is not None:
        folder, _, file = out.rstrip("/").rpartition("/")
        return folder or ".", file.removesuffix(".json")
    if run is not None:
        return run.url_of("eval"), data_name(data) + ("" if which == "final" else f".{which}")
    if url != spec:
        return "eval", f"{spec}.{data_name(data)}"
    folder, _, file = url.rpartition("/")
    return folder or ".", f"{file.rsplit('.', 1)[0]}.{data_name(data)}.eval"


def summary(result: dict[str, Any]) -> str:
    keys = ("mIoU", "mAcc", "aAcc", "ms_mIoU", "ms_mAcc", "ms_aAcc") if result["task"] == "segmentation" \
        else ("top1", "top5", "real_top1", "real_top5")
    metrics = "  ".join(f"{k} {result[k]:.2f}" for k in keys if result.get(k) is not None)
    return (f"{result['model']}  {result['weights']}\n  on {result['data']}: {result['val_images']} images, {metrics}  "
            f"({result['images_per_s']} images/s on {result['world_size']} rank(s), {result['launcher']})\n"
            f"  saved: {result['saved']}")


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("orchestrator.evaluate", __doc__)
    p.add_argument("weights", help="a run folder or URL, a weights file (.safetensors, .pth, .pt), or a cached timm tag")
    p.add_argument("--data", required=True, help="shards (a split folder with its manifest), an ImageFolder tree, an "
                                                 "ILSVRC-2012 root or flat val folder, or an ADEChallengeData2016 folder")
    p.add_argument("--which", default="final", help="for a run: final (EMA first), ema, model (not EMA), best "
                                                    "(final, else the newest checkpoint) or step-N (a checkpoint)")
    p.add_argument("--recipe", help="for a weights file: the recipe it was trained with (default recipes/a.yaml; "
                                    "a segmentation file needs its own, e.g. recipes/seg/upernet_t.yaml)")
    p.add_argument("--task", choices=("classification", "segmentation"),
                   help="checked against the run's (or --recipe's) task; a segmentation weights file needs --recipe")
    p.add_argument("--launcher", choices=("local", "ray", "slurm"), default="local",
                   help="this process or torchrun's (default), the Ray cluster's scaling.num_workers, or a Slurm job")
    p.add_argument("--val-labels", help="the labels file of a flat val folder (as `data shard --val-labels`)")
    p.add_argument("--classes", metavar="FILE", help="segmentation folder: class names, one per line")
    p.add_argument("--label-subset", help="imagenet-a, imagenet-r (timm's 200-class index lists) or a file of indices")
    p.add_argument("--real-labels", nargs="?", const="", metavar="FILE",
                   help="also score ImageNet-ReaL labels (default: timm's copy of real.json)")
    p.add_argument("--batch-size", type=int, help="images per rank and batch (default: a run's micro-batch, else 64)")
    p.add_argument("--out", help="write the result here instead of beside the weights")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    cli.add_set(p, "recipe override (model.name, data.input_size, data.crop_pct, segment.aug_test, scaling.num_workers, ...)")
    cli.add_storage_option(p)
    cli.add_slurm_flags(p, "Slurm (--launcher slurm; as orchestrator.pipeline takes them)")

    def body(args: argparse.Namespace) -> None:
        options = cli.storage_options(args.storage_option)
        for key, url in (("--data", args.data), ("WEIGHTS", args.weights), ("--out", args.out)):
            if url and ("://" in url or "/" in url):
                storage.check_reachable(url, options, key, "--storage-option")
        recipe, url, run = resolve(args.weights, args.which, args.set, args.data, options, args.recipe)
        if args.task and args.task != recipe.task:
            raise RecipeError(f"--task {args.task}: {'the run' if run else args.recipe or 'recipes/a.yaml'} is "
                              f"{recipe.task}" + ("; give the weights' recipe with --recipe" if run is None else ""))
        task = tasks.for_recipe(recipe)
        batch = task.val_batch(args.batch_size or (recipes.micro_batch(recipe) if run is not None else 64))
        folder, name = target(args.weights, url, run, args.out, args.data, args.which)
        job = Request(url, batch, folder, name, args.val_labels, args.classes, args.label_subset, args.real_labels,
                  args.which if run is not None else "final")
        if args.launcher != "local":
            prepare(job, recipe)  # bad input is named here, before a cluster job starts
        result = launch.run(Job(on_rank, recipe, (job,), name=f"evaluate-{name}"), args.launcher, cli.slurm_options(args))
        if result is not None:
            print(json.dumps(result) if args.json else summary(result))

    return cli.run(body, p, argv)


if __name__ == "__main__":
    sys.exit(main())
