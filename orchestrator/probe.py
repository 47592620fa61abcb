"""What ``orchestrator.doctor`` measures on every rank, where a training run would run: launcher-free, like the loop.

``probe(recipe, ctx)`` runs on each rank of a job of the recipe's shape and returns the figures for the doctor's
tables (rank 0 gets every rank's, ``None`` elsewhere). Each measurement is short and bounded by ``seconds``;
one that cannot run here is left out with the reason, never guessed.
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import subprocess
import time
import uuid
from typing import Any

import torch
import torch.distributed as dist

from orchestrator import storage
from orchestrator.data import manifest as mf
from orchestrator.data.reader import open_shard
from orchestrator.recipe import BatchPlan, Recipe, plan_batch
from orchestrator.rundir import RunDir
from orchestrator.train import components, loop, tasks
from orchestrator.train.context import Rank, TrainContext

log = logging.getLogger(__name__)


def probe(recipe: Recipe, ctx: Rank, seconds: float = 3.0) -> list[dict[str, Any]] | None:
    """This rank's figures, gathered on rank 0 (a list by rank; None on other ranks): the doctor's job function."""
    nodes = _gather(ctx, ctx.node)
    local = [r for r, n in enumerate(nodes) if n == ctx.node]
    leader = local[0] == ctx.rank
    out: dict[str, Any] = {"rank": ctx.rank, "node": ctx.node, "devices": describe(ctx, len(local))}
    model_bytes = _grad_bytes(recipe)
    out["allreduce"] = allreduce(ctx, nodes, model_bytes)
    if leader:  # per node: storage and the input pipeline share the node's CPUs and network
        images, out["read"] = read_throughput(recipe, seconds)
        out["input"] = input_rate(recipe, ctx, images, seconds)
    if ctx.is_main:  # checkpoints are written by rank 0
        out["write"] = write_throughput(recipe, 4 * model_bytes)
    out["compute"] = compute(recipe, ctx, seconds)
    everything = _gather(ctx, out)
    return everything if ctx.is_main else None


def _gather(ctx: Rank, value: Any) -> list[Any]:
    if ctx.world_size == 1:
        return [value]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out


def _grad_bytes(recipe: Recipe) -> int:
    """fp32 gradient bytes of the recipe's model (what DDP all-reduces each step)."""
    with torch.device("meta"):
        model = tasks.for_recipe(recipe).create_model(Rank())
    return 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe(ctx: Rank, local_ranks: int) -> dict[str, Any]:
    """Accelerator, memory, driver/CUDA/NCCL versions, and CPU cores per device on this node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    d: dict[str, Any] = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                         "cpu_cores": cores, "cores_per_device": cores / max(local_ranks, 1),
                         "devices_on_node": local_ranks}
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        d |= {"name": props.name, "memory_gb": props.total_memory / 2**30, "cuda": torch.version.cuda,
              "nccl": ".".join(map(str, torch.cuda.nccl.version())), "driver": _driver()}
    else:
        d |= {"name": "cpu", "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30}
    return d


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout
        return out.splitlines()[0].strip() if out.strip() else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def allreduce(ctx: Rank, nodes: list[str], nbytes: int, rounds: int = 5) -> dict[str, Any]:
    """Bus bandwidth (GB/s, as nccl-tests count it: bytes x 2(n-1)/n per second) of an all-reduce of the model's
    gradient size: among the ranks of each node, and across nodes (one rank per node). Every rank takes part
    in creating every group, as torch.distributed requires."""
    if ctx.world_size == 1:
        return {}
    names = sorted(set(nodes))
    per_node = {n: [r for r, m in enumerate(nodes) if m == n] for n in names}
    groups = {n: dist.new_group(per_node[n]) for n in names}
    leaders = [per_node[n][0] for n in names]
    across = dist.new_group(leaders)
    out: dict[str, Any] = {}
    mine = per_node[ctx.node]
    for key, ranks, group in (("within_node", mine, groups[ctx.node]), ("across_nodes", leaders, across)):
        size = len(ranks)
        timed = _time_allreduce(ctx, nbytes, group, rounds) if ctx.rank in ranks and size > 1 else None
        if timed is not None:
            out[key] = {"ranks": size, "gb_per_s": nbytes * 2 * (size - 1) / size / timed / 1e9, "seconds": timed}
    ctx.barrier()
    return out


def _time_allreduce(ctx: Rank, nbytes: int, group: Any, rounds: int) -> float:
    t = torch.ones(max(nbytes // 4, 1), dtype=torch.float32, device=ctx.device)
    dist.all_reduce(t, group=group)  # warm: connections, buffers
    best = float("inf")
    for _ in range(rounds):
        _sync(ctx.device)
        start = time.perf_counter()
        dist.all_reduce(t, group=group)
        _sync(ctx.device)
        best = min(best, time.perf_counter() - start)
    return best


def _sync(where: torch.device) -> None:
    if where.type == "cuda":
        torch.cuda.synchronize(where)


def read_throughput(recipe: Recipe, seconds: float) -> tuple[list[tuple[bytes, Any]], dict[str, Any]]:
    """Row groups of ``data.train`` read as the reader reads them, for about ``seconds``: MB/s and images/s.
    Returns the samples read too (the input-pipeline figure transforms them)."""
    manifest = mf.load(recipe.data.train, recipe.data.storage_options, verify=False)
    target = "mask" if manifest.task == "segmentation" else "label"
    images: list[tuple[bytes, Any]] = []
    nbytes, start = 0, time.perf_counter()
    for index, shard in enumerate(manifest.shards):
        f = open_shard(manifest.shard_url(index), recipe.data.storage_options)
        for g in range(len(shard.row_groups)):
            table = f.read_row_group(g, columns=["image", target])
            column = table.column("image").combine_chunks().field("bytes").to_pylist()
            targets = table.column(target).combine_chunks()
            targets = targets.field("bytes").to_pylist() if target == "mask" else targets.to_pylist()
            images += list(zip(column, targets, strict=True))
            nbytes += sum(map(len, column))
            if time.perf_counter() - start > seconds:
                break
        if time.perf_counter() - start > seconds:
            break
    wall = time.perf_counter() - start
    return images, {"mb_per_s": nbytes / wall / 1e6, "images_per_s": len(images) / wall, "images": len(images),
                    "seconds": wall}


def write_throughput(recipe: Recipe, nbytes: int) -> dict[str, Any]:
    """A checkpoint-sized object (weights, EMA and AdamW's two moments) written to ``run.storage``, then deleted."""
    fs, root = storage.filesystem(recipe.run.storage, recipe.run.storage_options)
    path = f"{root.rstrip('/')}/.doctor-{uuid.uuid4().hex[:8]}.bin"
    payload = os.urandom(min(nbytes, 1 << 20)) * (nbytes // (1 << 20) or 1)
    fs.makedirs(root, exist_ok=True)
    start = time.perf_counter()
    try:
        with fs.open(path, "wb") as f:
            f.write(payload)
        wall = time.perf_counter() - start
    finally:
        fs.rm(path)
    return {"mb_per_s": len(payload) / wall / 1e6, "bytes": len(payload), "seconds": wall}


def input_rate(recipe: Recipe, ctx: Rank, images: list[tuple[bytes, Any]], seconds: float) -> dict[str, Any]:
    """Images per CPU-second of the recipe's training transform on this node (one core, as in a DataLoader
    worker: one torch thread, this thread's CPU time, after one warm-up image), and with ``data.decode: gpu``
    the device step's images/s and the training process's CPU ms per image.

    The process's CPU time counts a Ray worker's other threads too: a CI run measured 1.5 images per CPU-second
    (a laptop: 2,400) and planned an input-bound 5.4 s step against a real 0.19 s."""
    task = tasks.for_recipe(recipe)
    manifest = mf.load(recipe.data.train, recipe.data.storage_options, verify=False)
    transform = task.transform(manifest, train=True)
    outputs = [transform(*images[0])] if images else []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    done, cpu, process, wall = 0, time.thread_time(), time.process_time(), time.perf_counter()
    try:
        while images and time.thread_time() - cpu < seconds:
            outputs.append(transform(*images[done % len(images)]))
            done += 1
    finally:
        torch.set_num_threads(threads)
    cpu, process, wall = time.thread_time() - cpu, time.process_time() - process, time.perf_counter() - wall
    out: dict[str, Any] = {"images_per_cpu_s": done / max(cpu, 1e-9), "images": done, "wall_s": wall,
                           "process_cpu_s": process}
    step = task.device_step(ctx)
    if step is not None and outputs:
        from torch.utils.data import default_collate

        batch = default_collate([(o, t, i, 0) for i, (o, t) in enumerate(outputs[:plan_batch(recipe, ctx.world_size).micro_batch])])
        step(batch)  # warm
        _sync(ctx.device)
        wall, cpu = time.perf_counter(), time.process_time()
        n = len(step(batch)[0])
        _sync(ctx.device)
        out["device_images_per_s"] = n / (time.perf_counter() - wall)
        out["device_cpu_ms_per_image"] = 1e3 * (time.process_time() - cpu) / n
    return out


def compute(recipe: Recipe, ctx: Rank, seconds: float) -> dict[str, Any]:
    """The recipe's model, micro-batch, precision, channels_last and compile: training steps per second on
    this device (forward, backward, optimizer; no data) and peak memory; on a GPU also at half the
    micro-batch, and from the two peaks the largest micro-batch that fits (a linear estimate, printed as such)."""
    plan = plan_batch(recipe, ctx.world_size)
    size = tasks.for_recipe(recipe).input_size
    rates, peaks = {}, {}
    half = {max(plan.micro_batch // 2, 1)} if ctx.device.type == "cuda" else set()  # only the estimate needs it
    for micro in sorted(half | {plan.micro_batch}):
        rates[micro], peaks[micro] = _steps(recipe, ctx, micro, size, seconds / 2)
    micro = plan.micro_batch
    out: dict[str, Any] = {"micro_batch": micro, "images_per_s": rates[micro], "peak_gb": peaks[micro] / 2**30}
    if ctx.device.type == "cuda" and len(peaks) == 2:  # the caching allocator's peaks; a CPU has no such figure
        total = torch.cuda.get_device_properties(ctx.device).total_memory
        small = min(peaks)
        per_image = max((peaks[micro] - peaks[small]) / (micro - small), 1.0)
        fixed = peaks[micro] - per_image * micro
        out["max_micro_batch"] = int(max((0.9 * total - fixed) / per_image, 0))
        out["memory_gb"] = total / 2**30
    return out


def _steps(recipe: Recipe, ctx: Rank, micro: int, size: int, seconds: float) -> tuple[float, float]:
    """Images/s of training steps at ``micro`` images (one process, no DDP) and the peak memory in bytes
    (CUDA: the allocator's peak; CPU: the process's peak RSS)."""
    local = TrainContext(run=RunDir.of(recipe), device=ctx.device)
    task = tasks.for_recipe(recipe)
    model = components.build_model(recipe, local, init=False, task=task)
    step_model = torch.compile(model) if recipe.run.compile else model
    c = components.assemble(recipe, local, task, model, step_model, (None, None), 1000)
    c.plan = BatchPlan(world_size=1, per_device=micro, micro_batch=micro, accum_steps=1)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (micro, size, size, 3), dtype=torch.uint8, generator=g)
    if task.name == "classification":
        targets = torch.randint(0, recipe.model.num_classes, (micro,), generator=g)
    else:
        targets = torch.randint(0, recipe.model.num_classes, (micro, size, size), generator=g)
    batch = (images, targets, torch.arange(micro), None)
    state = {"step": 0, "nonfinite": 0}
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    loop.train_step(c, recipe, local, state, iter([batch]))  # warm (and compile)
    _sync(ctx.device)
    if ctx.world_size > 1:  # every rank times the same window, as every rank steps at once in training: ranks
        dist.barrier()      # sharing a host's cores, each timed alone, once planned a CI run at 5.8x its real step
    done, start = 0, time.perf_counter()
    while done < 2 or time.perf_counter() - start < seconds:
        loop.train_step(c, recipe, local, state, iter([batch]))
        done += 1
        _sync(ctx.device)
    rate = done * micro / (time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return rate, float(peak)
