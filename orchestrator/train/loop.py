"""The training loop: one function per phase, no knowledge of Ray, Slurm or Tune.

``train(recipe, ctx)`` resumes from the run's newest verified checkpoint when there is one, trains until the
recipe's epochs (or ``run.max_steps``) are done, evaluates model and EMA, checkpoints through ``ctx``
and writes the run outputs. Resume is exact: every RNG is reseeded from (seed, step, micro-batch, rank)
and the reader resumes at the batch it stopped at, so N + N steps equal 2N steps bitwise on CPU.

A steady-state step reads nothing back from the device, so the host queues step k + 1 while the device
runs step k: losses are summed on the device and read at log steps; a step whose loss is not finite on
some rank is skipped on the device (the fused optimizer's ``found_inf``, as ``GradScaler`` uses it) and
counted there, the count read at log steps; stop requests are agreed on one step late
(``TrainContext.stop_requested``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save as save_safetensors
from timm.utils import distribute_bn
from tqdm import tqdm

from model.weight_format import safetensors_metadata, timm_config
from orchestrator import faults, storage
from orchestrator.data import device
from orchestrator.data.reader import corrupt_budget
from orchestrator.errors import CheckpointError, DataError, TrainingError
from orchestrator.recipe import Recipe, plan_batch
from orchestrator.rundir import CONFIG, EMA_WEIGHTS, WEIGHTS
from orchestrator.train import checkpoint, components, restart, tasks, trackers, watchdog
from orchestrator.train.components import Components
from orchestrator.train.context import Rank, StopRequested, TrainContext
from orchestrator.train.metrics import MetricsWriter, interactive

log = logging.getLogger(__name__)
HEARTBEAT_S = 60


def seed_everything(*key: int) -> None:
    """Reseed every global RNG from ``key``; called per micro-batch so resume needs no RNG state."""
    seed = int(np.random.SeedSequence([k & 0xFFFFFFFF for k in key]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build(recipe: Recipe, ctx: TrainContext, resuming: bool) -> Components:
    plan = plan_batch(recipe, ctx.world_size)
    task = tasks.for_recipe(recipe)
    seed_everything(recipe.run.seed)  # same initial weights on every rank (DDP also broadcasts them)
    model = components.build_model(recipe, ctx, init=not resuming, task=task)
    step_model = torch.compile(model) if recipe.run.compile else model
    if ctx.world_size > 1:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        step_model = torch.nn.parallel.DistributedDataParallel(step_model, device_ids=ids)
    train_loader, val_loader = components.build_loaders(recipe, ctx, plan, task)
    for loader in (train_loader, val_loader):  # every batch, training and evaluation, is progress
        if loader is not None:
            loader.progress = ctx.tick
    steps_per_epoch = len(train_loader) // plan.accum_steps
    if steps_per_epoch == 0:
        raise TrainingError(f"{recipe.data.train}: one epoch holds fewer samples per rank than one optimizer step "
                            f"({plan.per_device} samples on each of {ctx.world_size} ranks)")
    return components.assemble(recipe, ctx, task, model, step_model, (train_loader, val_loader), steps_per_epoch)


def on_rank(recipe: Recipe, rank: Rank) -> dict[str, Any]:
    """The training job's function (``launch.Job``): train ``recipe``'s run on this rank; the last metrics."""
    return train(recipe, TrainContext.of(recipe, rank))


def train(recipe: Recipe, ctx: TrainContext) -> dict[str, Any]:
    """Train (or resume) the run described by ``recipe``; returns the last metrics. The stall watchdog
    (``run.stall_timeout_s``) watches every step, evaluation and checkpoint upload of it."""
    if recipe.run.stall_timeout_s:
        ctx.watchdog = watchdog.for_context(ctx, recipe.run.stall_timeout_s, ctx.stalled).start()
    try:
        return _train(recipe, ctx)
    except StopRequested:
        raise
    except BaseException as exc:  # recorded for `orchestrator.runs`, then raised as it was
        if ctx.is_main:
            with contextlib.suppress(Exception):
                ctx.run.write_status("failed", error=storage.redact(f"{type(exc).__name__}: {exc}")[:300])
        raise
    finally:
        if ctx.watchdog is not None:
            ctx.watchdog.stop()


def _train(recipe: Recipe, ctx: TrainContext) -> dict[str, Any]:
    saved = newest_state(ctx)
    c = build(recipe, ctx, resuming=saved is not None)
    writer = MetricsWriter(ctx.run, enabled=ctx.is_main, metrics=c.task.metrics, tensorboard="tensorboard" in recipe.run.trackers,
                           trackers=tracker_factory(recipe, ctx))
    try:
        return _train_with(c, recipe, ctx, saved, writer)
    except StopRequested:
        raise
    except BaseException:
        with contextlib.suppress(Exception):  # the failure is what gets reported, not a flush after it
            writer.close("failed")
        raise
    finally:  # their workers persist across epochs: not past the run (a Tune actor trains trial after trial)
        for loader in (c.train_loader, c.val_loader):
            if loader is not None:
                loader.close()


def tracker_factory(recipe: Recipe, ctx: TrainContext) -> Callable[[Path], trackers.Trackers] | None:
    """MLflow / W&B beside metrics.jsonl (``run.trackers``), given the writer's local folder."""
    if not trackers.uses_trackers(recipe):
        return None
    return lambda local: trackers.Trackers(recipe, ctx.run, ctx.launcher, ctx.world_size, local)


def _train_with(c: Components, recipe: Recipe, ctx: TrainContext, saved: tuple[str, dict[str, Any]] | None,
                writer: MetricsWriter) -> dict[str, Any]:
    state = {"step": 0, "epoch": 0, "nonfinite": 0}
    if saved:
        state = restore(c, saved, recipe, ctx)
        writer.truncate_after(state["step"])
        writer.log({"kind": "resume", "step": state["step"], "epoch": state["step"] // c.steps_per_epoch,
                    "world_size": ctx.world_size, "saved_on_world_size": saved[1]["loader"].get("world_size"),
                    "launcher": ctx.launcher})
    total_steps = components.total_steps(recipe, c.steps_per_epoch)
    stop_at = min(total_steps, recipe.run.max_steps or total_steps)
    log.info("rank %d of %d on %s (%s) trains from step %d", ctx.rank, ctx.world_size, ctx.node, ctx.device, state["step"])
    if ctx.is_main:
        ctx.run.write_bytes(CONFIG, recipe.to_json().encode())
        ctx.run.write_status("running", launcher=ctx.launcher, step=state["step"], total_steps=stop_at,
                             schedule_steps=total_steps, world_size=ctx.world_size)
        log_header(c, recipe, ctx, state["step"], stop_at)
    last: dict[str, Any] = {"step": state["step"], "epoch": state["epoch"]}
    if state["step"] >= stop_at:  # stopped after its last checkpoint, before the final weights: nothing to train
        last = next((r for r in reversed(writer.records) if r.get("kind") in ("epoch", "stop")), last)
        ctx.report_metrics(last)
    started, first_step = time.monotonic(), state["step"]
    while state["step"] < stop_at:
        epoch = state["step"] // c.steps_per_epoch
        c.train_loader.set_epoch(epoch)
        train_metrics, stop = train_one_epoch(c, recipe, ctx, state, stop_at, writer, epoch)
        epoch_done = state["step"] % c.steps_per_epoch == 0
        every_steps, every_epochs = recipe.run.eval_every_steps, recipe.run.eval_every_epochs
        step_eval = every_steps is not None and state["step"] % every_steps == 0
        last = {"epoch": epoch, "step": state["step"], "epochs_done": state["step"] // c.steps_per_epoch, **train_metrics}
        final = state["step"] >= total_steps
        evaluated = final or step_eval or (epoch_done and every_epochs is not None and (epoch + 1) % every_epochs == 0)
        if evaluated:
            last |= evaluate_all(c, recipe, ctx, final)
        if epoch_done or step_eval or state["step"] >= stop_at:
            per_step = (time.monotonic() - started) / max(state["step"] - first_step, 1)
            eta = per_step * (stop_at - state["step"])
            if ctx.is_main:
                log.info("epoch %d  step %d/%d  %s  ETA %s", epoch, state["step"], stop_at, _fmt(last), _duration(eta))
            writer.log({**last, "kind": "epoch" if epoch_done or step_eval else "stop"})
            save(c, recipe, ctx, state, last, required=stop or final or state["step"] >= stop_at)
            writer.flush(plots=True, background=True)
            if evaluated or state["step"] >= stop_at:  # Tune requires its metric in every report
                ctx.report_metrics(last)
        if stop and state["step"] < stop_at:
            ctx.flush()
            writer.log({"kind": "stop", "epoch": epoch, "step": state["step"], "epochs_done": state["step"] // c.steps_per_epoch,
                        "reason": ctx.stop_reason()})
            writer.close("stopped")
            if ctx.is_main:
                ctx.run.write_status("stopped", step=state["step"])
            log.info("stopping at step %d as the launcher asked (checkpoint saved); the next run resumes here",
                     state["step"])
            raise StopRequested(state["step"], ctx.run.checkpoint_url(state["step"]))
    ctx.flush()  # the last checkpoint is committed before the final weights mark the run complete
    if ctx.is_main:
        write_final_weights(c, ctx, recipe)
        ctx.run.write_status("finished", step=state["step"])
    writer.close("finished", tracker_artifacts(recipe, ctx))
    return last


def tracker_artifacts(recipe: Recipe, ctx: TrainContext) -> dict[str, bytes]:
    """What the trackers keep of a finished run besides curves.png: config.json, and the weights if asked."""
    if not ctx.is_main or not trackers.uses_trackers(recipe):
        return {}
    names = [CONFIG, *([WEIGHTS, EMA_WEIGHTS] if recipe.run.tracker_weights else [])]
    return {name: data for name in names if (data := ctx.run.read_bytes(name)) is not None}


def log_header(c: Components, recipe: Recipe, ctx: TrainContext, step: int, stop_at: int) -> None:
    """What a user checks first: where the run lives, how the global batch is made, how much data."""
    train_images = c.train_loader.dataset.num_samples
    val_images = c.val_loader.dataset.num_samples if c.val_loader is not None else 0
    log.info("run %s  (%s, %s)", ctx.run.url, recipe.model.name, f"resuming at step {step}" if step else "from step 0")
    order = c.train_loader.dataset.order
    log.info("world size %d  global batch %d = %d ranks x %d per device (%d x %d accumulation); %d partitions: "
             "the same samples on world sizes %s", ctx.world_size, recipe.batch.global_batch_size, ctx.world_size,
             c.plan.per_device, c.plan.micro_batch, c.plan.accum_steps, order.partitions,
             ", ".join(map(str, order.world_sizes())))
    log.info("data %d train / %d val images at %d px  schedule %s = %d steps (%d per epoch)", train_images, val_images,
             c.task.input_size, f"{recipe.schedule.iterations} iterations" if recipe.schedule.iterations
             else f"{recipe.schedule.epochs} epochs", stop_at, c.steps_per_epoch)


def newest_state(ctx: TrainContext) -> tuple[str, dict[str, Any]] | None:
    """(url, state) of the checkpoint every rank resumes from: rank 0's choice, read once (``restart``)."""
    found = restart.newest(ctx.run, restart.ProcessGroup(ctx))
    return (found[0].url, checkpoint.decode(found[1])) if found else None


def train_one_epoch(c: Components, recipe: Recipe, ctx: TrainContext, state: dict[str, int], stop_at: int,
                    writer: MetricsWriter, epoch: int) -> tuple[dict[str, Any], bool]:
    """Optimizer steps until the epoch ends or ``stop_at`` is reached, with mid-epoch checkpoints.

    Returns the last logged metrics and whether the launcher asked to stop (a checkpoint of the
    current step is then saved, here or by the caller at an epoch end).
    """
    c.step_model.train()
    epoch_end = (epoch + 1) * c.steps_per_epoch
    if recipe.run.eval_every_steps:  # return at the next evaluation step, where the caller evaluates and checkpoints
        epoch_end = min(epoch_end, (state["step"] // recipe.run.eval_every_steps + 1) * recipe.run.eval_every_steps)
    every = recipe.run.checkpoint_every_steps
    losses: list[torch.Tensor] = []
    digest = 0
    window_start, window_images = time.monotonic(), 0
    heartbeat = time.monotonic()
    batches = iter(c.train_loader)
    bar = tqdm(total=epoch_end - state["step"], desc=f"epoch {epoch}", disable=not (ctx.is_main and interactive()))
    metrics: dict[str, Any] = {}
    stop = False
    while state["step"] < min(epoch_end, stop_at):
        loss, step_digest = train_step(c, recipe, ctx, state, batches)
        if ctx.watchdog is not None:
            ctx.watchdog.step_done()
        digest += step_digest
        state["step"] += 1
        losses.append(loss)
        window_images += c.plan.per_device * ctx.world_size
        bar.update(1)
        if state["step"] % recipe.run.log_every_steps == 0 or state["step"] in (epoch_end, stop_at):
            elapsed = time.monotonic() - window_start
            check_corrupt(recipe, ctx, state.get("corrupt", 0), state.get("read", 0), "training images read so far")
            count_skipped(c, recipe, state)
            loss_mean, digest = _across_ranks(losses, digest, ctx)
            metrics = {"epoch": epoch, "step": state["step"], "lr": c.optimizer.param_groups[0]["lr"],
                       "train_loss": loss_mean, "images_per_sec": window_images / max(elapsed, 1e-9)}
            writer.log({**metrics, "kind": "train", "samples_digest": digest})
            bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", lr=f"{metrics['lr']:.2e}")
            if ctx.is_main and time.monotonic() - heartbeat > HEARTBEAT_S:  # for `orchestrator.runs`: still alive
                ctx.run.write_status("running", step=state["step"])
                heartbeat = time.monotonic()
            losses, digest, window_start, window_images = [], 0, time.monotonic(), 0
        stop = ctx.stop_requested()
        if (stop or (every and state["step"] % every == 0)) and state["step"] not in (epoch_end, stop_at):
            save(c, recipe, ctx, state, {"epoch": epoch, "step": state["step"]}, required=stop)
        if stop:
            break
    bar.close()
    return {k: v for k, v in metrics.items() if k not in ("epoch", "step")}, stop


def train_step(c: Components, recipe: Recipe, ctx: TrainContext, state: dict[str, int],
               batches: Any) -> tuple[torch.Tensor, int]:
    """One optimizer step over ``accum_steps`` micro-batches (gradients synchronised only on the last).

    Returns the loss (on the device: read it at log steps) and this rank's share of the samples digest
    (``sample_digest``). A step whose loss is not finite on some rank is skipped by every rank, decided on
    the device and counted in ``c.skipped`` (``count_skipped`` reads it)."""
    c.optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=ctx.device)
    digest = 0
    if ctx.watchdog is not None:
        ctx.watchdog.step = state["step"]
    for micro in range(c.plan.accum_steps):
        if micro == 0:
            faults.maybe_stall("stall", state["step"], ctx.rank)
        images, targets, ids, corrupt = next(batches)
        digest += sample_digest(ids)
        if corrupt is not None:  # counted per rank (host tensors); the budget is checked on the sum over ranks
            state["corrupt"] = state.get("corrupt", 0) + int(corrupt.sum())
            state["read"] = state.get("read", 0) + len(corrupt)
        # Keyed by the micro-batch's place in the step (rank r computes r, r + W, ...): the same on any world size.
        seed_everything(recipe.run.seed, state["step"], ctx.rank + micro * ctx.world_size)
        images = device.normalize(images, ctx.device, c.channels_last)
        images, targets = c.task.train_batch(images, targets, ids, state["step"] // c.steps_per_epoch, ctx)
        last = micro == c.plan.accum_steps - 1
        # DDP all-reduces on every backward; skip it until the last micro-batch of the step.
        sync = contextlib.nullcontext() if last or ctx.world_size == 1 else c.step_model.no_sync()
        with sync, tasks.autocast(c.autocast, ctx.device):
            loss = c.task.loss(c.step_model(images), targets) / c.plan.accum_steps
            if last:
                faults.maybe_stall("stall-collective", state["step"], ctx.rank)
            loss.backward()
        total += loss.detach()
    found_inf = _non_finite(total, ctx)
    c.skipped += found_inf
    if recipe.optimizer.clip_grad:
        torch.nn.utils.clip_grad_norm_(c.model.parameters(), recipe.optimizer.clip_grad)
    if components.skips_on_device(c.optimizer):
        c.optimizer.found_inf = found_inf  # read by the fused kernel: no update, no step count, on the device
        c.optimizer.step()
    elif not bool(found_inf):  # optimizers without a fused kernel (lamb, lion) decide on the host
        c.optimizer.step()
    if c.ema is not None:  # as timm with GradScaler: a skipped step leaves the weights, the EMA still updates
        c.ema.update(c.model, step=state["step"])
    c.scheduler.step_update(state["step"] + 1)
    return total, digest


def count_skipped(c: Components, recipe: Recipe, state: dict[str, int]) -> None:
    """Fold the device's count of skipped steps into ``state`` (a host read: log and checkpoint steps only)."""
    skipped = int(c.skipped.item())
    if not skipped:
        return
    c.skipped.zero_()
    state["nonfinite"] += skipped
    log.warning("step %d: %d step(s) with non-finite loss skipped since the last log (%d so far)", state["step"],
                skipped, state["nonfinite"])
    if state["nonfinite"] > recipe.run.max_nonfinite_steps:
        raise TrainingError(f"{state['nonfinite']} steps with non-finite loss by step {state['step']}, more than "
                            f"run.max_nonfinite_steps={recipe.run.max_nonfinite_steps}; lower optimizer.lr or check the data")


def sample_digest(ids: torch.Tensor) -> int:
    """A sum of hashed sample ids: ``samples_digest`` in metrics.jsonl is this over all ranks and the log
    window, so two runs that read the same samples per window (on any world size) log the same numbers."""
    return int((ids.to(torch.int64) * 2654435761 % 2**32).sum())


def check_corrupt(recipe: Recipe, ctx: TrainContext | None, corrupt: int, read: int, what: str) -> None:
    """The corrupt-image budget over all ranks and workers (``ctx``: sum per-rank counts first), so
    it is the same on any world size: ``data.max_corrupt_fraction`` of what was read, at least a few."""
    if ctx is not None and ctx.world_size > 1:
        t = torch.tensor([corrupt, read], dtype=torch.float64, device=ctx.device)
        dist.all_reduce(t)
        corrupt, read = int(t[0]), int(t[1])
    if corrupt > corrupt_budget(recipe.data.max_corrupt_fraction, read):
        raise DataError(f"{corrupt} of {read} {what} were corrupt, more than data.max_corrupt_fraction="
                        f"{recipe.data.max_corrupt_fraction}; the warnings above name each shard and row")


def _non_finite(loss: torch.Tensor, ctx: TrainContext) -> torch.Tensor:
    """1.0 where the step's loss is not finite on some rank, else 0.0, on the device: every rank must agree to
    skip a step, or DDP replicas would diverge."""
    found_inf = (~torch.isfinite(loss)).to(torch.float32)
    if ctx.world_size > 1:
        dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
    return found_inf


def _across_ranks(losses: list[torch.Tensor], digest: int, ctx: TrainContext) -> tuple[float, int]:
    """The mean loss and the samples digest over all ranks, in one all-reduce (float64 holds the digest exactly)."""
    loss = torch.stack(losses).double().sum() if losses else torch.zeros((), dtype=torch.float64, device=ctx.device)
    t = torch.stack([loss, *torch.tensor([len(losses), digest], dtype=torch.float64).to(ctx.device)])
    if ctx.world_size > 1:
        dist.all_reduce(t)
    return (float(t[0] / t[1]) if t[1] else float("nan")), int(t[2])


def evaluate_all(c: Components, recipe: Recipe, ctx: TrainContext, final: bool = False) -> dict[str, Any]:
    """The task's evaluation of the model and its EMA (``ema_`` keys), BatchNorm statistics first made equal across ranks."""
    if c.val_loader is None:
        return {}
    if ctx.world_size > 1 and recipe.run.dist_bn != "none":
        distribute_bn(c.model, ctx.world_size, reduce=recipe.run.dist_bn == "reduce")
    setup = components.eval_setup(c, ctx)
    out: dict[str, Any] = c.task.evaluate(c.model, setup, final=final)
    if c.ema is not None:
        ema = c.task.evaluate(c.ema.module, setup, tag="ema", final=final)
        out |= {f"ema_{k}": v for k, v in ema.items() if k != "val_images"}
    c.step_model.train()
    return out


def save(c: Components, recipe: Recipe, ctx: TrainContext, state: dict[str, int], metrics: dict[str, Any],
         required: bool = False) -> None:
    """Checkpoint ``state``. While the previous upload still runs, rank 0 waits for it, or with
    ``run.checkpoint_overlap=skip`` skips this checkpoint with a line (never one a stop or the end needs)."""
    count_skipped(c, recipe, state)
    if ctx.is_main and not required and recipe.run.checkpoint_overlap == "skip" and ctx.uploading():
        log.warning("step %d: checkpoint skipped: the previous one is still uploading (run.checkpoint_overlap=skip)",
                    state["step"])
        return
    snapshot = None
    if ctx.is_main:  # staged in host memory here; encoded and uploaded in the background
        snapshot = checkpoint.stage({
            "model": c.model.state_dict(), "ema": c.ema.module.state_dict() if c.ema else None,
            "optimizer": c.optimizer.state_dict(), "scheduler": c.scheduler.state_dict(), "state": dict(state),
            "loader": c.train_loader.state_dict(), "model_name": recipe.model.name,
        })
    ctx.save_checkpoint(state["step"], snapshot, {"epoch": metrics.get("epoch"), "metrics": metrics})


def restore(c: Components, saved: tuple[str, dict[str, Any]], recipe: Recipe, ctx: TrainContext) -> dict[str, int]:
    url, state = saved
    if state.get("model_name") != recipe.model.name:
        raise CheckpointError(f"{url}: run {ctx.run.url} was trained as {state.get('model_name')}, the recipe says "
                              f"{recipe.model.name}; use another run.name or the original model")
    c.model.load_state_dict(state["model"])
    if c.ema is not None:
        c.ema.module.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
    c.optimizer.load_state_dict(state["optimizer"])
    c.scheduler.load_state_dict(state["scheduler"])
    loader = state["loader"]
    order = c.train_loader.dataset.order
    for key, dotted, now in [("partitions", "data.partitions", order.partitions),
                             ("micro_batch", "batch.per_device_max (the micro-batch)", order.micro_batch)]:
        if loader.get(key) != now:
            raise CheckpointError(f"{url}: the run's sample order used {dotted}={loader.get(key)}, the recipe now gives "
                                  f"{now}; resuming would repeat or skip samples. Use the original value or another run.name")
    c.train_loader.load_state_dict(loader)
    c.scheduler.step_update(state["state"]["step"])
    if ctx.is_main:
        log.info("resumed from %s at step %d (epoch %d, %d of its %d micro-batches done) on %d ranks; it was saved on %s",
                 url, state["state"]["step"], loader["epoch"], loader["micro_batches"], order.micro_batches,
                 ctx.world_size, loader.get("world_size", "?"))
    return dict(state["state"])


def write_final_weights(c: Components, ctx: TrainContext, recipe: Recipe) -> None:
    """``model.safetensors`` (and ``model_ema.safetensors``) that timm loads with ``pretrained_cfg_overlay``, each
    carrying its architecture, classes and evaluation preprocessing (``model.weight_format.timm_config``)."""
    weights = {WEIGHTS: c.model}
    if c.ema is not None:
        weights[EMA_WEIGHTS] = c.ema.module
    classes = c.train_loader.dataset.manifest.classes
    config = timm_config(recipe.model.name, recipe.model.num_classes, [cl.wnid or cl.name for cl in classes],
                         [cl.name or cl.wnid for cl in classes], c.task.pretrained_cfg())
    for name, module in weights.items():
        tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        ctx.run.write_bytes(name, save_safetensors(tensors, metadata=safetensors_metadata(recipe.model.name, config)))
    log.info("final weights: %s", ", ".join(ctx.run.url_of(name) for name in weights))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _fmt(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) and math.isfinite(v) else f"{k}={v}"
                     for k, v in metrics.items() if k not in ("epoch", "step", "epochs_done"))
