"""``python -m orchestrator.runs STORAGE [--json]``: the runs under a storage URL, one line each.

State: finished (final weights written), running (its heartbeat in ``status.json`` is fresh),
failed at step N (the loop raised; ``status.json`` has the error), stalled at step N (the stall watchdog
ended an attempt there; until the run moves again), stopped at step N (checkpoints,
no final weights, no fresh heartbeat), or not started. Also the
launcher, epochs and steps done, best and last of the task's headline metric (top-1, or mIoU), the newest committed checkpoint (its marker
and file sizes checked) and where the final weights are.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from orchestrator import cli, storage
from orchestrator.recipe import METRICS
from orchestrator.rundir import RunDir

STALE_AFTER_S = 15 * 60  # a running run writes status.json at least every minute and at every checkpoint


def summary(run: RunDir, every_evaluation: bool = False) -> dict[str, Any]:
    config, status, records = run.config() or {}, run.status(), run.records()
    schedule = config.get("schedule") or {}  # an iteration schedule (schedule.iterations) has no epoch count
    latest = run.latest()
    epochs = [r for r in records if r.get("kind") in ("epoch", "stop")]
    metric = METRICS.get(config.get("task", "classification"), ("top1",))[0]
    scores = [r[metric] for r in epochs if isinstance(r.get(metric), int | float)]
    step = max([status.get("step") or 0, latest.step if latest else 0, *(r.get("step") or 0 for r in records)])
    schedule_steps = status.get("schedule_steps")
    capped = schedule_steps is not None and status.get("total_steps") is not None and status["total_steps"] < schedule_steps
    if run.complete:
        state = f"finished at max_steps {status['total_steps']} of {schedule_steps}" if capped else "finished"
    elif status.get("state") == "running" and time.time() - status.get("updated", 0) < STALE_AFTER_S:
        state = "running"
    elif status.get("state") == "failed":
        state = f"failed at step {step}"
    elif status.get("state") == "stalled":  # the watchdog ended an attempt; "running" again once it moves
        state = f"stalled at step {status.get('step', step)}"
    elif latest:
        state = f"stopped at step {latest.step}"
    else:
        state = "not started"
    return {
        "name": run.name, "state": state, "launcher": status.get("launcher", ""),
        "epochs_done": max((r["epochs_done"] if "epochs_done" in r else r.get("epoch", -1) + 1 for r in epochs), default=0),
        "epochs": None if schedule.get("iterations") else schedule.get("epochs"), "step": step, "total_steps": status.get("total_steps"),
        "schedule_steps": schedule_steps, "max_steps": (config.get("run") or {}).get("max_steps"),
        "metric": metric, "best": max(scores) if scores else None, "last": scores[-1] if scores else None,
        "checkpoint": latest.url if latest else None, "weights": run.final_weights(), "url": run.url,
        "error": status.get("error") if state.startswith("failed") else None,
        "evaluations": {name: {k: e.get(k) for k in ("top1", "top5", "val_images", "weights", "which")}
                        for name, e in run.evaluations(every_evaluation).items()},
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    width = max(len(r["name"]) for r in rows)
    state_width = max(22, *(len(r["state"]) for r in rows))
    print(f"{'run':{width}s} {'state':{state_width}s} {'launcher':8s} {'epochs':>9s} {'steps':>13s} {'best':>6s} "
          f"{'last':>6s}  checkpoint / weights   (best, last: top-1 or mIoU; steps of the schedule)")
    for r in rows:
        epochs = f"{r['epochs_done']}/{r['epochs']}" if r["epochs"] is not None else str(r["epochs_done"])
        total = r["schedule_steps"] if r["schedule_steps"] is not None else r["total_steps"]
        steps = f"{r['step']}/{total if total is not None else '?'}"
        where = r["weights"] or r["checkpoint"] or "-"
        print(f"{r['name']:{width}s} {r['state']:{state_width}s} {r['launcher'] or '-':8s} {epochs:>9s} {steps:>13s} "
              f"{pct(r['best']):>6s} {pct(r['last']):>6s}  {where}")


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("orchestrator.runs", __doc__)
    p.add_argument("storage", help="where the runs live (run.storage), e.g. runs or s3://bucket/runs")
    p.add_argument("--json", action="store_true", help="one JSON object per run, for scripts")
    p.add_argument("--every-evaluation", action="store_true",
                   help="--json: also the evaluations of other weights than the final ones (evaluate --which ...)")
    cli.add_storage_option(p)

    def body(args: argparse.Namespace) -> None:
        options = cli.storage_options(args.storage_option)
        storage.check_reachable(args.storage, options, "STORAGE", "--storage-option")
        rows = [summary(run, args.every_evaluation) for run in RunDir.list(args.storage, options)]
        if args.json:
            for row in rows:
                print(json.dumps(row))
        elif rows:
            print_table(rows)
        else:
            print(f"no runs under {args.storage}")

    return cli.run(body, p, argv)


if __name__ == "__main__":
    sys.exit(main())
