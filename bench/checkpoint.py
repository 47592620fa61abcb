"""What checkpointing to object storage costs the training loop: the time of ``--every`` steps that
follow a checkpoint (its staging, and its encoding and upload to a loopback S3 store running in the
background while those steps train, up to its commit) over the time of ``--every`` steps without one,
alternating rounds in the same run. The store runs niced (on a cluster it is not on the training node;
on 2 cores its CPU would otherwise be charged to training). Then one B-sized state (InceptionNeXt-B
weights, EMA and AdamW moments, about 1.3 GB) saved once: what blocks training (staging the tensors in
host memory) against what runs in the background (encoding, upload, commit).

    .venv/bin/python bench/checkpoint.py [--every 20] [--rounds 15] [--skip-b]

The last line is ``checkpoint_overhead=<with / without>``, the median of the per-round ratios; the line
before it gives their spread (quartiles) and the standard error of the median, so a 3% effect can be told
from this machine's noise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from orchestrator import recipe as recipes  # noqa: E402
from orchestrator.rundir import RunDir  # noqa: E402
from orchestrator.train import checkpoint, components, tasks  # noqa: E402
from orchestrator.train.components import Components  # noqa: E402
from orchestrator.train.context import TrainContext  # noqa: E402
from orchestrator.train.loop import save, train_step  # noqa: E402
from tests.services import S3Store  # noqa: E402


class Loader:
    """Stands in for the shard loader: the checkpoint records its position."""

    def state_dict(self) -> dict[str, int]:
        return {"epoch": 0, "batches": 0}


def smoke_components(ctx: TrainContext, batch: int, size: int) -> tuple[Components, recipes.Recipe]:
    recipe = recipes.load(ROOT / "recipes" / "smoke.yaml", [
        f"data.input_size={size}", f"batch.global_batch_size={batch}", f"batch.per_device_max={batch}", "ema.decay=0.999"])
    task = tasks.for_recipe(recipe)
    model = components.build_model(recipe, ctx, init=False, task=task)
    c = components.assemble(recipe, ctx, task, model, model, (Loader(), None), 1000)
    return c, recipe


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--skip-b", action="store_true")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    store = S3Store(data_dir=root / "data", log_path=root / "weed.log", niceness=19)
    store.data_dir.mkdir()
    store.start()
    try:
        bucket = store.bucket("bench")
        ctx = TrainContext(run=RunDir(f"{bucket}/smoke", store.options))
        c, recipe = smoke_components(ctx, args.batch, args.size)
        g = torch.Generator().manual_seed(0)
        data = (torch.randint(0, 256, (args.batch, args.size, args.size, 3), dtype=torch.uint8, generator=g),
                torch.randint(0, 10, (args.batch,), generator=g))
        state = {"step": 0, "epoch": 0, "nonfinite": 0}
        c.step_model.train()

        def steps(checkpointing: bool) -> float:
            """Seconds per step of a window of ``every`` steps; with a checkpoint, saved at its start and
            committed by its end (what the next checkpoint would otherwise wait for)."""
            start = time.perf_counter()
            if checkpointing:
                save(c, recipe, ctx, state, {"epoch": 0})
            for _ in range(args.every):
                train_step(c, recipe, ctx, state, iter([(*data, torch.arange(args.batch), None)]))
                state["step"] += 1
            ctx.flush()
            return (time.perf_counter() - start) / args.every

        steps(True)  # warm-up: first S3 connection, allocator
        ratios, without, with_ = [], [], []
        for _ in range(args.rounds):
            a, b = steps(False), steps(True)
            without.append(a)
            with_.append(b)
            ratios.append(b / a)
        size_mb = len(checkpoint.encode({"model": c.model.state_dict(), "optimizer": c.optimizer.state_dict()})
                      ["state.pt"]) / 2**20
        start = time.perf_counter()
        ctx.run.write_checkpoint(10**6, checkpoint.encode({"model": c.model.state_dict()}), {})
        print(f"smoke model (atto {args.size}px, batch {args.batch}), checkpoint about {size_mb:.1f} MB to {store.endpoint}")
        print(f"  step without checkpoints: {statistics.median(without) * 1000:.1f} ms (median of {args.rounds} rounds)")
        print(f"  step with one every {args.every}: {statistics.median(with_) * 1000:.1f} ms; per-round ratios "
              f"{', '.join(f'{r:.3f}' for r in ratios)}")
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        se = 1.2533 * statistics.stdev(ratios) / len(ratios) ** 0.5  # the median's standard error (normal approximation)
        print(f"  ratio quartiles {q1:.3f}-{q3:.3f}, standard error of the median {se:.3f}")
        print(f"  a synchronous commit of the weights alone takes {(time.perf_counter() - start) * 1000:.0f} ms")
        if not args.skip_b:
            b_sized(bucket, store)
        print(f"checkpoint_overhead={statistics.median(ratios):.3f}")
    finally:
        store.stop()


def b_sized(bucket: str, store: S3Store) -> None:
    """One B-sized state: the training thread pays for the snapshot only."""
    model = timm.create_model("inception_next_base", num_classes=1000)
    ema = timm.create_model("inception_next_base", num_classes=1000)
    optimizer = torch.optim.AdamW(model.parameters())
    for group in optimizer.param_groups:  # materialise the two moments without a B-sized backward
        for param in group["params"]:
            optimizer.state[param] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(param),
                                      "exp_avg_sq": torch.zeros_like(param)}
    ctx = TrainContext(run=RunDir(f"{bucket}/b", store.options))
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict()}
    start = time.perf_counter()
    files = checkpoint.encode(state)
    encoded = time.perf_counter() - start  # what blocked training when the snapshot was encoded in its thread
    for _ in range(3):  # the first staging pays for fresh host memory; a run's later ones reuse it
        start = time.perf_counter()
        snapshot = checkpoint.stage(state)
        staged = time.perf_counter() - start
        ctx.save_checkpoint(1, snapshot, {})
        submitted = time.perf_counter() - start
        ctx.flush()
        uploaded = time.perf_counter() - start
        print(f"B-sized state ({len(files['state.pt']) / 2**30:.2f} GB): staging {staged:.2f} s blocks training "
              f"(encoding it there took {encoded:.2f} s), submit returns at {submitted:.2f} s, encoding, upload and "
              f"commit done in the background at {uploaded:.2f} s")


if __name__ == "__main__":
    main()
