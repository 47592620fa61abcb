"""Scaling across Ray nodes: the same smoke run on one node, then on two (1 CPU each, one worker per node),
at the same global batch, in one run.

    .venv/bin/python bench/scaling.py [--steps 30] [--size 64] [--batch 32]

Each side starts its own loopback cluster (a head, plus a second node joined with ``ray start --address``)
and submits the run as a Ray driver. Step times come from the loop's per-step metrics records (the first
``--warmup`` steps dropped). Prints samples/s per worker for each, and last
``scaling_efficiency=<2-node samples/s / (2 x 1-node samples/s)>``. On one 2-core machine this measures
the orchestration (all-reduce over loopback, Ray's placement), not the hardware.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from orchestrator.data.shard_writer import WriteOptions, write_dataset  # noqa: E402
from orchestrator.data.synth import SynthSource  # noqa: E402
from tests.services import RayCluster, RayWorkerNode, scratch  # noqa: E402  (the loopback clusters the tests use)


def seconds_per_step(nodes: int, data: Path, tmp: Path, args: argparse.Namespace) -> float:
    head = RayCluster(temp_dir=tmp / f"ray{nodes}", log_path=tmp / f"head{nodes}.log", num_cpus=1)
    head.start()
    second = RayWorkerNode(head, tmp / f"node{nodes}.log", num_cpus=1) if nodes == 2 else None
    try:
        if second:
            second.start()
        name = f"nodes{nodes}"
        sets = [f"data.train={data}/train", "data.val=null", f"data.input_size={args.size}", "data.num_workers=0",
                f"batch.global_batch_size={args.batch}", f"batch.per_device_max={args.batch // 2}",
                f"run.max_steps={args.steps}", "run.log_every_steps=1", f"run.storage={tmp}/runs", f"run.name={name}",
                "run.checkpoint_every_steps=0", f"scaling.num_workers={nodes}", "scaling.cpus_per_worker=1"]
        command = [sys.executable, "-m", "orchestrator.pretrain", "recipes/smoke.yaml", *(f"--set={s}" for s in sets)]
        done = subprocess.run(command, cwd=ROOT, env={**head.env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{nodes}-node run failed:\n{done.stderr[-3000:]}")
    finally:
        if second:
            second.stop()
        head.stop()
    records = [json.loads(line) for line in (tmp / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    stamps = [r["time"] for r in records if r["kind"] == "train"]
    return statistics.median([b - a for a, b in zip(stamps, stamps[1:], strict=False)][args.warmup:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="global batch: 2 micro-batches (1 node) or 1 per node (2)")
    args = p.parse_args()
    tmp = scratch("bench-scaling-", "/tmp")
    data = tmp / "data"
    write_dataset(SynthSource(classes=10, train=args.batch * (args.steps + 2), val=0, size=args.size), str(data),
                  WriteOptions(seed=0))
    rate = {}
    for nodes in (1, 2):
        step = seconds_per_step(nodes, data, tmp, args)
        rate[nodes] = args.batch / step
        print(f"{nodes} node(s): {step * 1000:7.1f} ms/step, {rate[nodes]:.1f} samples/s, "
              f"{rate[nodes] / nodes:.1f} samples/s per worker", flush=True)
    print(f"scaling_efficiency={rate[2] / (2 * rate[1]):.3f}")


if __name__ == "__main__":
    main()
