"""The training process's device step per micro-batch: kernels launched, images/s and CPU ms per image.

    .venv/bin/python bench/device_step.py [--sizes 32,128] [--size 224]

What runs is what the loop runs between the loader and the model: for ``data.decode: gpu`` the
device crop (decode, crop, resize, flip, RandAugment ``rand-m9-mstd0.5-inc1``) and then normalise and
random erasing (0.25); for the CPU-decode path only normalise and erasing. The aten ops each micro-batch
dispatches are counted with ``torch.profiler`` on the device this machine has (each dispatched op is at
least one kernel launch on a GPU; erasing runs its GPU version here too), leaving out decoding itself (the ``decode`` range: nvJPEG's batched
call and packing its outputs into one buffer). ``device_ops_growth`` is ops at the largest size over ops at
the smallest: 1.0 when the launches do not grow with the images; a per-image device step grows with the
ratio of the sizes (4.0 for 32 -> 128).

``host_syncs`` counts, on any device, what would make a CUDA host wait in a steady-state micro-batch
(``orchestrator.data.host_syncs``: reads of device values, data-dependent shapes, tensors made from Python data
on the device, copies from pageable memory): of the device step on both paths, and of the loop's whole
``train_step`` (loader batch to optimizer and EMA step) on a generated dataset. The last line's
``host_syncs=`` is their sum; the target is 0.

With CUDA it also prints the device step's images/s and the training process's CPU ms per image (best
of 3 passes), and runs the steady-state step under ``torch.cuda.set_sync_debug_mode("error")``: any
host read of a device value or blocking copy raises.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import default_collate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.data_pipeline import photo_like, reseed  # noqa: E402
from orchestrator.data import device  # noqa: E402
from orchestrator.data.gpu_decode import DeviceCrop, TrainDraws  # noqa: E402
from orchestrator.data.host_syncs import HostSyncs  # noqa: E402

POLICY, RE_PROB = "rand-m9-mstd0.5-inc1", 0.25


def gpu_batch(jpegs: list[bytes], size: int) -> Any:
    """What the loader hands the device step for ``data.decode: gpu``: (payloads, draws), labels, ids, corrupt."""
    draws = TrainDraws(size, POLICY, "random")
    items = []
    for i, data in enumerate(jpegs):
        reseed(i)
        items.append((draws(data), i % 1000, i, 0))
    batch = default_collate(items)
    return batch if not torch.cuda.is_available() else ((batch[0][0], batch[0][1].pin_memory()), *batch[1:])


def cpu_batch(n: int, size: int) -> Any:
    """What the loader hands over for the CPU-decode path: uint8 NHWC images (pinned on CUDA)."""
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8)
    return (images.pin_memory() if torch.cuda.is_available() else images), torch.arange(n) % 1000, torch.arange(n)


def step(where: torch.device, size: int, gpu_decode: bool) -> Callable[[Any], torch.Tensor]:
    """The loop's device work for one micro-batch (``Classification.train_batch`` without mixup)."""
    crop = DeviceCrop(size, where)

    def run(batch: Any) -> torch.Tensor:
        if gpu_decode:
            images, _targets, ids, _corrupt = crop(batch)
        else:
            images, _targets, ids = batch
        x = device.normalize(images, where, channels_last=where.type == "cuda")
        return device.random_erase(x, [device.sample_seed(0, 0, i) for i in ids.tolist()], RE_PROB, batched=True)
    return run


def counted(mode: HostSyncs, call: Callable[[], Any], times: int = 1) -> list[str]:
    """What would make a CUDA host wait in ``times`` calls of ``call`` once warm: its first call, not counted, makes
    the per-device constants and the optimizer's state."""
    with mode:
        with mode.warming():
            call()
        for _ in range(times):
            call()
    return mode.events


def host_syncs_per_batch(run: Callable[[Any], Any], batch: Any) -> list[str]:
    """What would make a CUDA host wait in ``run(batch)`` once warm."""
    mode = HostSyncs()
    mode.pinned(batch)  # the loader pins its batches on CUDA
    return counted(mode, lambda: run(batch))


class Pinned:
    """A loader whose batches ``mode`` counts as pinned (the loader pins them on CUDA)."""

    def __init__(self, loader: Any, mode: HostSyncs) -> None:
        self.loader, self.mode = loader, mode

    def __iter__(self) -> Any:
        for batch in self.loader:
            self.mode.pinned(batch)
            yield batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


def built(recipe: Any) -> tuple[Any, Any, HostSyncs]:
    """(context, the loop's components, a ``HostSyncs`` with the model, its EMA and the skip counter on the device)."""
    from orchestrator.rundir import RunDir
    from orchestrator.train import loop
    from orchestrator.train.context import TrainContext

    ctx = TrainContext(run=RunDir.of(recipe))
    c = loop.build(recipe, ctx, resuming=False)
    mode = HostSyncs()
    mode.on_device(list(c.model.state_dict().values()), c.skipped,
                   list(c.ema.module.state_dict().values()) if c.ema is not None else [])
    return ctx, c, mode


def train_step_syncs(recipe: Any, steps: int = 2) -> list[str]:
    """What would make a CUDA host wait in the loop's ``train_step`` over ``steps`` steady-state steps, batches pinned."""
    from orchestrator.train import loop

    ctx, c, mode = built(recipe)
    state = {"step": 0, "epoch": 0, "nonfinite": 0}
    batches = iter(Pinned(c.train_loader, mode))
    return counted(mode, lambda: loop.train_step(c, recipe, ctx, state, batches), steps)


def evaluation_syncs(recipe: Any) -> tuple[list[str], int]:
    """What would make a CUDA host wait in the loop's (and ``orchestrator.evaluate``'s) classification evaluation,
    and its batches: the tally it reads once at the end is the only read, whatever the number of batches."""
    from orchestrator.train import components

    ctx, c, mode = built(recipe)
    c.val_loader = Pinned(c.val_loader, mode)
    return counted(mode, lambda: c.task.evaluate(c.model, components.eval_setup(c, ctx))), len(c.val_loader.loader)


def synth_recipe(folder: Path, size: int, decode: str) -> Any:
    """The smoke recipe on a small generated dataset in ``folder`` (written once), decoded on ``decode``."""
    from orchestrator import recipe as recipes
    from orchestrator.data.shard_writer import WriteOptions, write_dataset
    from orchestrator.data.synth import SynthSource

    if not (folder / "train").exists():
        write_dataset(SynthSource(classes=4, train=128, val=16, size=size), str(folder), WriteOptions(seed=0))
    return recipes.load(ROOT / "recipes" / "smoke.yaml", [
        f"data.train={folder}/train", f"data.val={folder}/val", f"data.input_size={size}", "data.num_workers=0",
        f"data.decode={decode}", "batch.global_batch_size=32", "batch.per_device_max=32", "model.num_classes=4",
        "ema.decay=0.99", f"run.storage={folder}/runs"])


def ops_per_batch(run: Callable[[Any], torch.Tensor], batch: Any) -> int:
    """aten ops dispatched by ``run(batch)``, outside the ``decode`` ranges."""
    run(batch)  # warm: lazy initialisation is not per batch
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(batch)
    events = prof.events()
    decode = [(e.time_range.start, e.time_range.end) for e in events if e.name == "decode"]
    return sum(1 for e in events if e.name.startswith("aten::")
               and not any(lo <= e.time_range.start and e.time_range.end <= hi for lo, hi in decode))


def timed(run: Callable[[Any], torch.Tensor], batches: list[Any], where: torch.device) -> tuple[float, float]:
    """images/s and the training process's CPU ms per image, best of 3 passes."""
    best = (0.0, float("inf"))
    for _ in range(3):
        if where.type == "cuda":
            torch.cuda.synchronize()
        start, cpu = time.perf_counter(), time.process_time()
        n = sum(len(run(b)) for b in batches)
        if where.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        best = (max(best[0], n / wall), min(best[1], 1e3 * cpu / n))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="32,128", help="micro-batch sizes to count at (smallest and largest compared)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=int, default=4, help="micro-batches per timed pass (CUDA)")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    where = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {torch.cuda.get_device_name() if where.type == 'cuda' else 'cpu'}")
    rng = np.random.default_rng(0)
    jpegs = [photo_like(rng) for _ in range(max(sizes))]
    counts = {}
    for gpu_decode in (True, False):
        run = step(where, args.size, gpu_decode)
        name = "data.decode gpu (crop, RandAugment, normalise, erase)" if gpu_decode else "data.decode cpu (normalise, erase)"
        for n in sizes:
            batch = gpu_batch(jpegs[:n], args.size) if gpu_decode else cpu_batch(n, args.size)
            counts[gpu_decode, n] = ops_per_batch(run, batch)
        print(f"{name}: aten ops per micro-batch " + ", ".join(f"{n} images {counts[gpu_decode, n]}" for n in sizes)
              + f"; growth {counts[gpu_decode, sizes[-1]] / counts[gpu_decode, sizes[0]]:.3f}")
        if where.type == "cuda":
            batches = [gpu_batch(jpegs[:sizes[-1]], args.size) if gpu_decode else cpu_batch(sizes[-1], args.size)
                       for _ in range(args.batches)]
            rate, cpu_ms = timed(run, batches, where)
            torch.cuda.set_sync_debug_mode("error")
            try:
                for b in batches:
                    run(b)
                synced = "none"
            except RuntimeError as exc:
                synced = str(exc).splitlines()[0]
            finally:
                torch.cuda.set_sync_debug_mode(0)
            print(f"  {sizes[-1]} images a micro-batch: {rate:.0f} images/s, {cpu_ms:.3f} CPU ms per image in the "
                  f"training process; host syncs in the steady state: {synced}")
    syncs = 0
    for gpu_decode in (True, False):
        batch = gpu_batch(jpegs[:sizes[0]], args.size) if gpu_decode else cpu_batch(sizes[0], args.size)
        events = host_syncs_per_batch(step(where, args.size, gpu_decode), batch)
        syncs += len(events)
        print(f"host syncs per micro-batch, device step, data.decode {'gpu' if gpu_decode else 'cpu'}: {len(events)} "
              f"{events or ''}")
    with tempfile.TemporaryDirectory() as tmp:
        for decode in ("gpu", "cpu"):
            events = train_step_syncs(synth_recipe(Path(tmp), 64, decode))
            syncs += len(events)
            print(f"host syncs per step, the loop's train_step, data.decode {decode}: {len(events) / 2:g} {events or ''}")
        events, batches = evaluation_syncs(synth_recipe(Path(tmp), 64, "cpu"))
        print(f"host syncs in an evaluation of {batches} batches (the final tally included): {len(events)} {events}")
    print(f"device_ops_growth={counts[True, sizes[-1]] / counts[True, sizes[0]]:.3f} host_syncs={syncs}")


if __name__ == "__main__":
    main()
