"""Images/s of one training step (forward + backward + optimizer) of this project's loop versus a
plain reference loop (timm model, AdamW, cross-entropy, same batch), measured in the same run.

    .venv/bin/python bench/train_step.py [--model inception_next_atto] [--size 64] [--batch 32] [--steps 20]
    .venv/bin/python bench/train_step.py --model inception_next_tiny --size 224 --batch 128 --device cuda [--compile]

Both sides train on the same in-memory uint8 batch, normalised on the device as the loader leaves it,
so only the step is timed (no data loading). The loop's step includes what a real run pays for:
per-micro-batch reseeding, random erasing, the non-finite guard, the per-step schedule and (when the
recipe has it) EMA. The last line is ``ratio=<loop / reference>``.

Before it, ``epoch_gap_steps=``: the whole loop (``loop.train``) on generated data for ``--gap-epochs`` epochs,
its run folder in a loopback S3 store, a checkpoint, curves and log upload at every epoch end (no evaluation,
DataLoader in the main process): the median time between an epoch's last step and the next epoch's first, less
one step, in median steps. ``--no-gap`` skips it (on CUDA it runs on the CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator import recipe as recipes  # noqa: E402
from orchestrator.data.device import normalize  # noqa: E402
from orchestrator.data.shard_writer import WriteOptions, write_dataset  # noqa: E402
from orchestrator.data.synth import SynthSource  # noqa: E402
from orchestrator.rundir import RunDir  # noqa: E402
from orchestrator.train import components, loop, tasks  # noqa: E402
from orchestrator.train.context import Rank, TrainContext  # noqa: E402
from orchestrator.train.loop import train_step  # noqa: E402
from tests.services import S3Store, scratch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def images_per_sec(step, batch: int, steps: int, device: torch.device) -> float:
    for _ in range(3):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="inception_next_atto")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--gap-epochs", type=int, default=6)
    p.add_argument("--no-gap", action="store_true")
    args = p.parse_args()
    gap = None if args.no_gap else epoch_gap(args.gap_epochs)
    device = torch.device(args.device)
    recipe = recipes.load(ROOT / "recipes" / "smoke.yaml", [
        f"model.name={args.model}", "model.num_classes=1000", f"data.input_size={args.size}", "augment.mixup=0",
        "augment.cutmix=0", "augment.label_smoothing=0", f"batch.global_batch_size={args.batch}",
        f"batch.per_device_max={args.batch}", f"run.compile={str(args.compile).lower()}",
        f"scaling.gpus_per_worker={int(device.type == 'cuda')}",
    ])
    ctx = TrainContext(run=RunDir("unused"), device=device)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    # What the loader hands the loop: uint8 NHWC; both sides normalise it on the device.
    pixels = torch.randint(0, 256, (args.batch, args.size, args.size, 3), dtype=torch.uint8)
    targets = torch.randint(0, 1000, (args.batch,), device=device)
    batch = (pixels, targets, torch.arange(args.batch), torch.zeros(args.batch))

    task = tasks.for_recipe(recipe)
    model = components.build_model(recipe, ctx, init=False, task=task)
    c = components.assemble(recipe, ctx, task, model, torch.compile(model) if args.compile else model, (None, None), 1000)
    state = {"step": 0, "nonfinite": 0}

    def ours() -> None:
        train_step(c, recipe, ctx, state, iter([batch]))
        state["step"] += 1

    ref_model = timm.create_model(args.model, num_classes=1000).to(device, memory_format=fmt)
    ref_model.train()
    ref_step_model = torch.compile(ref_model) if args.compile else ref_model
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-3, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()
    dtype = c.autocast

    def reference() -> None:
        ref_opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(ref_step_model(normalize(pixels, device, fmt == torch.channels_last)), targets)
        loss.backward()
        ref_opt.step()

    c.step_model.train()
    rates: dict[str, list[float]] = {"reference": [], "loop": []}
    for _ in range(args.rounds):  # alternate so neither side profits from the machine's state
        rates["reference"].append(images_per_sec(reference, args.batch, args.steps, device))
        rates["loop"].append(images_per_sec(ours, args.batch, args.steps, device))
    ref, loop = max(rates["reference"]), max(rates["loop"])
    print(f"{args.model} {args.size}px batch {args.batch} on {device} ({dtype or torch.float32}, compile={args.compile})")
    print(f"reference loop (timm + AdamW): {ref:.1f} images/s")
    print(f"this loop's train_step:        {loop:.1f} images/s")
    if gap is not None:
        print(f"epoch_gap_steps={gap:.2f}")
    print(f"ratio={loop / ref:.3f}")


def epoch_gap(epochs: int) -> float:
    """Epoch ends of the real loop, in steps (see the module's docstring)."""
    root = scratch("bench-gap-")
    write_dataset(SynthSource(classes=10, train=512, val=32, size=32), str(root / "data"),
                  WriteOptions(shard_size_mb=0.2, rows_per_group=32, seed=0))
    store = S3Store.started("bench-gap-store-", niceness=19)
    try:
        recipe = recipes.load(ROOT / "recipes" / "smoke.yaml", [
            f"data.train={root}/data/train", f"data.val={root}/data/val", "data.input_size=32", "data.num_workers=0",
            "batch.global_batch_size=32", "batch.per_device_max=32", f"schedule.epochs={epochs}",
            "run.eval_every_epochs=null", "run.log_every_steps=1", f"run.storage={store.bucket('bench')}",
            f"run.storage_options={json.dumps(store.options)}", "run.name=gap"])
        loop.train(recipe, TrainContext.of(recipe, Rank()))
        steps = [r for r in RunDir.of(recipe).records() if r["kind"] == "train"]
    finally:
        store.stop()
    per_epoch = len(steps) // epochs
    inside = [b["time"] - a["time"] for a, b in zip(steps, steps[1:], strict=False) if b["step"] % per_epoch != 1]
    across = [b["time"] - a["time"] for a, b in zip(steps, steps[1:], strict=False) if b["step"] % per_epoch == 1]
    step = statistics.median(inside)
    print(f"epoch ends ({epochs} epochs of {per_epoch} steps, run in loopback S3): a step {1000 * step:.0f} ms, "
          f"from an epoch's last step to the next one's first {1000 * statistics.median(across):.0f} ms (median)")
    return statistics.median(across) / step - 1


if __name__ == "__main__":
    main()
