"""Build what the loop composes from the recipe: model, optimizer, schedule, EMA, data (the task gives model,
transforms and loss)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, PolyLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3

from orchestrator import storage, weight_lookup
from orchestrator.data import manifest as mf
from orchestrator.data import shard_cache
from orchestrator.data.reader import ReaderOptions, ShardDataset, ShardLoader
from orchestrator.errors import DataError
from orchestrator.recipe import BatchPlan, Recipe, plan_batch
from orchestrator.train import restart
from orchestrator.train.context import Rank, TrainContext
from orchestrator.train.tasks import EvalSetup, Task

log = logging.getLogger(__name__)


def reader_options(recipe: Recipe) -> ReaderOptions:
    d = recipe.data
    retry = storage.RetryPolicy(attempts=d.retries, base_delay=d.retry_base_delay)
    cache = os.path.expanduser(d.cache_dir) if d.cache_dir else None
    limit = int(d.cache_limit_gb * 1e9) if d.cache_limit_gb else shard_cache.default_limit(cache) if cache else 0
    return ReaderOptions(d.shuffle_buffer, d.max_corrupt_fraction, retry, d.storage_options, cache, limit)


def checked_manifest(url: str, options: dict[str, Any] | None, group: restart.Group) -> mf.Manifest:
    """Rank 0 checks the dataset (its manifest, or the Parquet footers it is built from, and every shard's schema
    and row groups) and every rank gets that checked manifest: one check per job start. Each rank checking for
    itself was one LIST and a footer GET per shard per rank: at 256 ranks and 1,000 shards, ~143,000 requests in one
    burst. A store answering 503 SlowDown is waited out under the retry policy; any other failure is rank 0's,
    raised on every rank."""
    def load() -> mf.Manifest:
        try:
            return mf.load(url, options)
        except DataError as exc:
            if storage.throttled(exc):  # the store said "not now" (503 SlowDown): wait and check again
                raise OSError(str(exc)) from exc
            raise

    found: tuple[str | None, mf.Manifest | None] = (None, None)
    if group.rank == 0:
        try:
            found = (None, storage.with_retries(load, f"checking {storage.redact(url, options)}", options=options,
                                                retry_if=storage.throttled))
        except Exception as exc:  # every rank raises it, none waits on rank 0 forever
            group.share((storage.one_line(exc), None))
            raise
    error, manifest = group.share(found)
    if error is not None:
        raise DataError(f"rank 0 could not use {storage.redact(url, options)}: {error}")
    assert manifest is not None
    return manifest


def build_loaders(recipe: Recipe, ctx: Rank, plan: BatchPlan, task: Task) -> tuple[ShardLoader, ShardLoader | None]:
    d, opts = recipe.data, reader_options(recipe)
    group = restart.ProcessGroup(ctx)
    manifest = checked_manifest(d.train, d.storage_options, group)
    train_ds = ShardDataset(
        manifest, task.transform(manifest, train=True), train=True, rank=ctx.rank, world_size=ctx.world_size,
        seed=recipe.run.seed, options=opts, fraction=d.train_fraction, global_batch=recipe.batch.global_batch_size,
        partitions=d.partitions,
    )
    pin = ctx.device.type == "cuda"
    train = ShardLoader(train_ds, plan.micro_batch, d.num_workers, pin_memory=pin, on_batch=task.device_step(ctx))
    val = None
    if d.val:
        manifest = checked_manifest(d.val, d.storage_options, group)
        val_ds = ShardDataset(manifest, task.transform(manifest, train=False), train=False, rank=ctx.rank,
                              world_size=ctx.world_size, seed=recipe.run.seed, options=opts, fraction=d.val_fraction)
        val = ShardLoader(val_ds, task.val_batch(plan.micro_batch), d.num_workers, pin_memory=pin)
    return train, val


def build_model(recipe: Recipe, ctx: Rank, init: bool, task: Task) -> torch.nn.Module:
    """The task's model on ``ctx.device``; ``init`` loads ``model.init`` (only when not resuming)."""
    model = task.create_model(ctx)
    if init and recipe.model.init:
        task.load_init(model, weight_lookup.resolve_init(recipe.model.init, recipe.run.storage, recipe.run.storage_options),
                       restart.reader(ctx))  # read by rank 0 alone, shared with the others
    model.to(ctx.device)
    if channels_last(recipe, ctx):
        model.to(memory_format=torch.channels_last)
    return model


def channels_last(recipe: Recipe, ctx: Rank) -> bool:
    return recipe.run.channels_last if recipe.run.channels_last is not None else ctx.device.type == "cuda"


def autocast_dtype(recipe: Recipe, ctx: Rank) -> torch.dtype | None:
    """bf16 on CUDA by default, float32 on CPU unless the recipe asks for bf16."""
    if recipe.run.precision == "bf16" or (recipe.run.precision == "auto" and ctx.device.type == "cuda"):
        return torch.bfloat16
    return None


FUSED = ("adamw", "adam", "sgd")  # torch's fused kernels: one launch per step, and a step skipped on the device


def build_optimizer(recipe: Recipe, model: torch.nn.Module) -> torch.optim.Optimizer:
    """timm's optimizer factory: no weight decay on 1-d parameters (norms, biases, layer-scale gammas); torch's
    fused kernel where there is one (CPU and CUDA), which also skips a non-finite step without a host read."""
    o = recipe.optimizer
    kwargs: dict[str, Any] = {"eps": o.eps, "betas": tuple(o.betas)} if o.name != "sgd" else {"momentum": 0.9}
    if o.name in FUSED:
        kwargs["fused"] = True
    return create_optimizer_v2(model, opt=o.name, lr=o.lr, weight_decay=o.weight_decay, filter_bias_and_bn=True, **kwargs)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` honours ``optimizer.found_inf`` (a device flag) itself."""
    return bool(optimizer.defaults.get("fused")) and getattr(optimizer, "_step_supports_amp_scaling", False)


def build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Scheduler:
    """Per-step schedule: linear warmup, then cosine to ``min_lr``, poly (mmseg's) or constant."""
    s = recipe.schedule
    total = total_steps(recipe, steps_per_epoch)
    warmup = s.warmup_iterations if s.warmup_iterations is not None else round(s.warmup_epochs * steps_per_epoch)
    common = dict(warmup_t=warmup, warmup_lr_init=s.warmup_lr, t_in_epochs=False)
    if s.sched == "cosine":
        return CosineLRScheduler(optimizer, t_initial=total, lr_min=s.min_lr, **common)
    if s.sched == "poly":
        return PolyLRScheduler(optimizer, t_initial=total, power=s.power, lr_min=s.min_lr, **common)
    return StepLRScheduler(optimizer, decay_t=max(total, 1) * 10, decay_rate=1.0, **common)


def total_steps(recipe: Recipe, steps_per_epoch: int) -> int:
    """The schedule's length in optimizer steps: ``schedule.iterations``, else epochs x steps per epoch."""
    return recipe.schedule.iterations or recipe.schedule.epochs * steps_per_epoch


def build_ema(recipe: Recipe, model: torch.nn.Module) -> ModelEmaV3 | None:
    return ModelEmaV3(model, decay=recipe.ema.decay) if recipe.ema.decay is not None else None


@dataclass
class Components:
    model: torch.nn.Module  # the raw model (DDP/compile wrappers live in ``step_model``)
    step_model: torch.nn.Module
    ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    task: Task
    train_loader: ShardLoader
    val_loader: ShardLoader | None
    plan: BatchPlan
    steps_per_epoch: int
    autocast: torch.dtype | None
    channels_last: bool
    skipped: torch.Tensor  # steps skipped for a non-finite loss since the loop last read it (on the device)


def assemble(recipe: Recipe, ctx: Rank, task: Task, model: torch.nn.Module, step_model: torch.nn.Module,
             loaders: tuple[Any, Any], steps_per_epoch: int) -> Components:
    """Components around a built model: optimizer, schedule, EMA, precision (benchmarks pass no loaders)."""
    optimizer = build_optimizer(recipe, model)
    return Components(
        model=model, step_model=step_model, ema=build_ema(recipe, model), optimizer=optimizer,
        scheduler=build_scheduler(recipe, optimizer, steps_per_epoch), task=task, train_loader=loaders[0],
        val_loader=loaders[1], plan=plan_batch(recipe, ctx.world_size), steps_per_epoch=steps_per_epoch,
        autocast=autocast_dtype(recipe, ctx), channels_last=channels_last(recipe, ctx),
        skipped=torch.zeros((), device=ctx.device),
    )


def eval_setup(c: Components, ctx: TrainContext) -> EvalSetup:
    """What the task's evaluation needs of the components, on this rank; per-class CSVs go to the run folder."""
    return EvalSetup(c.val_loader, c.autocast, c.channels_last, ctx.device, ctx.world_size, ctx.is_main, ctx.run)
