"""The chaos run: one smoke run on a two-node Ray cluster (two workers, one per node) reading its shards from
an S3 store, under a seeded random schedule of faults (``tests/chaos.py`` lists them), against the same run
uninterrupted. It starts its own services on loopback (a Ray head and a second node of 2 CPUs each, a
SeaweedFS store) and stops them by PID.

    .venv/bin/python bench/chaos.py [--faults 12] [--seed 0] [--every 2] [--kinds worker-kill,tear,...]

It fails (exit 1, naming the fault) unless the run finishes, every step is logged once with the samples of the
uninterrupted run, the final weights equal that run's (bitwise when the world size never changed, else within
the world-size tolerance), each fault resumed from the checkpoint it should have, and no restart redid more
than ``--every`` steps. It prints a table by fault kind and a last line
``faults=<n> survived=<n> max_steps_redone=<k> recovery_s_median=<s>``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests import chaos  # noqa: E402
from tests.services import RayCluster, RayWorkerNode, S3Store  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=2, help="run.checkpoint_every_steps")
    p.add_argument("--stall-s", type=float, default=10.0, help="run.stall_timeout_s")
    p.add_argument("--kinds", default=",".join(chaos.KINDS))
    p.add_argument("--keep", action="store_true", help="keep the work folder (runs, logs) and print its path")
    args = p.parse_args()
    kinds = tuple(args.kinds.split(","))
    if unknown := set(kinds) - set(chaos.KINDS):
        p.error(f"--kinds: unknown {sorted(unknown)}; choose from {', '.join(chaos.KINDS)}")
    plan = chaos.schedule(args.seed, args.faults, kinds, args.every)
    print(f"schedule (seed {args.seed}): " + ", ".join(f"{f.kind}@{f.step}" for f in plan), flush=True)

    work = Path(tempfile.mkdtemp(prefix="chaos-", dir="/tmp"))  # short: Ray's socket paths live under it
    store = S3Store(data_dir=work / "s3", log_path=work / "weed.log")
    store.data_dir.mkdir()
    head = RayCluster(temp_dir=work / "ray", log_path=work / "ray-head.log")
    node = RayWorkerNode(head, work / "ray-node.log", num_cpus=2)
    try:
        store.start()
        head.start()
        node.start()
        data = chaos.write_data(store)
        sets = {name: chaos.settings(store, data, work / "runs", name, plan, args.every, args.stall_s)
                for name in ("reference", "chaos")}
        started = time.monotonic()
        chaos.reference_run(head, sets["reference"], work)
        print(f"uninterrupted run: {time.monotonic() - started:.0f} s", flush=True)
        started = time.monotonic()
        run = chaos.ChaosRun(head, node, store, sets["chaos"], work / "runs" / "chaos", plan, args.every, work,
                             stall_s=args.stall_s, log=lambda line: print(line, flush=True))
        run.run()
        print(f"chaos run: {time.monotonic() - started:.0f} s", flush=True)
        chaos.verify(run, work / "runs" / "reference")
        print(run.table())
        print(run.summary())
        return 0
    except chaos.ChaosError as exc:
        print(f"chaos: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        node.stop()
        head.stop()
        store.stop()
        if args.keep:
            print(f"work folder: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
