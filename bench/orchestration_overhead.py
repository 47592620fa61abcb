"""What Ray Train costs over plain torch DDP: the same smoke training (fixed steps, 2 gloo workers)
under ``torchrun`` (``--launcher local``) and under this project's Ray launcher, in one run.

    .venv/bin/python bench/orchestration_overhead.py [--steps 30] [--rounds 2] [--size 64] [--batch 32]

Both sides run the same command, recipe and data; only the launcher differs. Step times come from the
wall-clock stamps of the loop's per-step metrics records (the first ``--warmup`` steps are dropped);
time to first step is from launching the command to the first record (the Ray side starts its own
local cluster, as on a laptop). Runs alternate between launchers; each round gives a paired ratio,
and the figures are medians over rounds. The last line is ``overhead_ratio=<Ray step time / torchrun
step time>`` (target <= 1.03).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from orchestrator.data.shard_writer import WriteOptions, write_dataset  # noqa: E402
from orchestrator.data.synth import SynthSource  # noqa: E402


def measure(launcher: str, data: Path, runs: Path, args: argparse.Namespace, name: str) -> tuple[float, float]:
    """(median steady-state seconds per step, seconds from launch to the first step) of one run."""
    sets = [f"data.train={data}/train", "data.val=null", f"data.input_size={args.size}", "data.num_workers=0",
            f"batch.global_batch_size={args.batch}", f"batch.per_device_max={args.batch // 2}",
            f"run.max_steps={args.steps}", "run.log_every_steps=1", f"run.storage={runs}", f"run.name={name}",
            "run.checkpoint_every_steps=0", "scaling.num_workers=2", "scaling.cpus_per_worker=1"]
    python = [sys.executable]
    if launcher == "torchrun":
        python = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command = [*python, "-m", "orchestrator.pretrain", "recipes/smoke.yaml",
               f"--launcher={'local' if launcher == 'torchrun' else 'ray'}", *(f"--set={s}" for s in sets)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    started = time.time()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{launcher} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    stamps = [r["time"] for r in records if r["kind"] == "train"]
    per_step = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][args.warmup:]
    return statistics.median(per_step), stamps[0] - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="global batch, split over 2 workers")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    data = tmp / "data"
    write_dataset(SynthSource(classes=10, train=args.batch * (args.steps + 2), val=0, size=args.size), str(data),
                  WriteOptions(seed=0))
    results: dict[str, list[tuple[float, float]]] = {"torchrun": [], "ray": []}
    for r in range(args.rounds):
        for launcher in results:
            results[launcher].append(measure(launcher, data, tmp / "runs", args, f"{launcher}-{r}"))
            step, first = results[launcher][-1]
            print(f"round {r} {launcher:8s}: {step * 1000:7.1f} ms/step, first step after {first:5.1f} s", flush=True)
    ratios = [ray[0] / torchrun[0] for ray, torchrun in zip(results["ray"], results["torchrun"], strict=True)]
    print("per-round ratios: " + ", ".join(f"{x:.3f}" for x in ratios))
    step = {k: statistics.median(s for s, _ in v) for k, v in results.items()}
    first = {k: statistics.median(f for _, f in v) for k, v in results.items()}
    for k in results:
        print(f"{k:8s}: {step[k] * 1000:7.1f} ms/step ({args.batch / step[k]:.0f} img/s), time to first step {first[k]:.1f} s")
    print(f"first_step_ratio={first['ray'] / first['torchrun']:.2f}")
    print(f"overhead_ratio={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
