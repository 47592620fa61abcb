"""What Ray Train costs over plain torch DDP: the same smoke training (fixed steps, 2 gloo workers)
under ``torchrun`` (``--launcher local``) and under this project's Ray launcher, in one run.

    .venv/bin/python bench/orchestration_overhead.py [--steps 30] [--rounds 2] [--size 64] [--batch 32]

Both sides run the same command, recipe and data; only the launcher differs. Step times come from the
wall-clock stamps of the loop's per-step metrics records (the first ``--warmup`` steps are dropped);
time to first step is from launching the command to the first record (the Ray side starts its own
local cluster, as on a laptop). Runs alternate between launchers; each round gives a paired ratio,
and the figures are medians over rounds.

Each round also measures Ray Train's own floor: the same driver, cluster start and trainer with an
empty training function, timed from launch to rank 0 entering it. What the Ray run takes beyond it is
this project's (imports, data, model, the first step), which the torchrun run pays as well.

The last lines are ``first_step_ratio=<Ray / torchrun time to first step>`` (target <= 2),
``floor_ratio=<Ray Train's floor / torchrun time to first step>`` and ``overhead_ratio=<Ray step time /
torchrun step time>`` (target <= 1.03).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from orchestrator.data.shard_writer import WriteOptions, write_dataset  # noqa: E402
from orchestrator.data.synth import SynthSource  # noqa: E402
from tests.services import scratch  # noqa: E402


def settings(data: Path, runs: Path, args: argparse.Namespace, name: str) -> list[str]:
    """The ``--set`` overrides of every run of the bench."""
    return [f"data.train={data}/train", "data.val=null", f"data.input_size={args.size}", "data.num_workers=0",
            f"batch.global_batch_size={args.batch}", "data.partitions=2", f"batch.per_device_max={args.batch // 2}",
            f"run.max_steps={args.steps}", "run.log_every_steps=1", f"run.storage={runs}", f"run.name={name}",
            "run.checkpoint_every_steps=0", "scaling.num_workers=2", "scaling.cpus_per_worker=1"]


def launch(command: list[str], what: str) -> float:
    """Run ``command`` as a laptop would (no cluster address, authentication as Ray's default); its start time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    started = time.time()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{what} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return started


def measure(launcher: str, data: Path, runs: Path, args: argparse.Namespace, name: str) -> tuple[float, float]:
    """(median steady-state seconds per step, seconds from launch to the first step) of one run."""
    python = [sys.executable]
    if launcher == "torchrun":
        python = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command = [*python, "-m", "orchestrator.pretrain", "recipes/smoke.yaml",
               f"--launcher={'local' if launcher == 'torchrun' else 'ray'}",
               *(f"--set={s}" for s in settings(data, runs, args, name))]
    started = launch(command, f"{launcher} run")
    records = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    stamps = [r["time"] for r in records if r["kind"] == "train"]
    per_step = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][args.warmup:]
    return statistics.median(per_step), stamps[0] - started


def floor(data: Path, runs: Path, args: argparse.Namespace, name: str) -> float:
    """Seconds from launch to rank 0 entering an empty training function under Ray Train (``--empty-fn``)."""
    stamp = runs / f"{name}.entered"
    started = launch([sys.executable, __file__, "--empty-fn", str(stamp), *settings(data, runs, args, name)], "empty Ray run")
    return float(stamp.read_text()) - started


def empty_fn(recipe: Any, rank: Any, stamp: str) -> None:
    if rank.rank == 0:
        Path(stamp).write_text(repr(time.time()))


def run_empty(stamp: str, sets: list[str]) -> None:
    """The Ray launcher's whole path (recipe, cluster, trainer, rank 0's value) with ``empty_fn`` as the job."""
    from orchestrator import recipe as recipes
    from orchestrator.launch import ray_train
    from orchestrator.launch.job import Job

    ray_train.run(Job(empty_fn, recipes.load("recipes/smoke.yaml", sets), (stamp,), name="empty"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="global batch, split over 2 workers")
    p.add_argument("--empty-fn", nargs="+", metavar=("STAMP", "SET"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.empty_fn:
        return run_empty(args.empty_fn[0], args.empty_fn[1:])
    tmp = scratch("bench-orch-")
    data = tmp / "data"
    write_dataset(SynthSource(classes=10, train=args.batch * (args.steps + 2), val=0, size=args.size), str(data),
                  WriteOptions(seed=0))
    results: dict[str, list[tuple[float, float]]] = {"torchrun": [], "ray": []}
    floors: list[float] = []
    for r in range(args.rounds):
        for launcher in results:
            results[launcher].append(measure(launcher, data, tmp / "runs", args, f"{launcher}-{r}"))
            step, first = results[launcher][-1]
            print(f"round {r} {launcher:8s}: {step * 1000:7.1f} ms/step, first step after {first:5.1f} s", flush=True)
        floors.append(floor(data, tmp / "runs", args, f"empty-{r}"))
        print(f"round {r} Ray Train entered an empty training function after {floors[-1]:5.1f} s", flush=True)
    ratios = [ray[0] / torchrun[0] for ray, torchrun in zip(results["ray"], results["torchrun"], strict=True)]
    print("per-round ratios: " + ", ".join(f"{x:.3f}" for x in ratios))
    step = {k: statistics.median(s for s, _ in v) for k, v in results.items()}
    first = {k: statistics.median(f for _, f in v) for k, v in results.items()}
    for k in results:
        print(f"{k:8s}: {step[k] * 1000:7.1f} ms/step ({args.batch / step[k]:.0f} img/s), time to first step {first[k]:.1f} s")
    floor_s = statistics.median(floors)
    print(f"Ray Train's floor (an empty training function): {floor_s:.1f} s; "
          f"the Ray run's first step {first['ray'] - floor_s:.1f} s after it")
    print(f"first_step_ratio={first['ray'] / first['torchrun']:.2f}")
    print(f"floor_ratio={floor_s / first['torchrun']:.2f}")
    print(f"overhead_ratio={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
