"""``python -m orchestrator.pipeline PIPELINE --launcher slurm|ray|local [...]``: recipes run as stages.

A pipeline file (``recipes/pipelines/*.yaml``) lists stages; each is an ordinary run
(``<storage>/<pipeline>-<stage>``), so a stage started under Slurm resumes under Ray and the other
way round. Re-submitting skips complete stages and resumes the others. ``--status`` reports each
stage (without importing torch or submitit).

    python -m orchestrator.pipeline recipes/pipelines/b.yaml --launcher slurm --partition gpu \\
        --nodes 4 --gpus-per-node 8 --time 24:00:00
    ray job submit --working-dir . -- python -m orchestrator.pipeline recipes/pipelines/b.yaml --launcher ray
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from orchestrator import cli, storage
from orchestrator import recipe as recipes
from orchestrator.launch import slurm_cluster
from orchestrator.pipeline.spec import Pipeline, load, read_state, stage_recipe


def status(pipeline: Pipeline) -> tuple[list[dict[str, Any]], str]:
    """Each stage: state, launcher, job ids, last epoch/step and metrics; and where job states came from."""
    state = read_state(pipeline)
    jobs_of = {s.name: state["stages"].get(s.name, {}).get("jobs", []) for s in pipeline.stages}
    job_states, source = slurm_cluster.job_states([j[-1] for j in jobs_of.values() if j])
    rows = []
    for s in pipeline.stages:
        run, jobs = pipeline.run(s), jobs_of[s.name]
        last = run.last_record()
        if run.complete:
            where = "complete"
        elif jobs:
            where = job_states.get(jobs[-1], "unknown").lower()
        elif run.latest():
            where = "incomplete"
        else:
            where = "not started"
        headline = recipes.METRICS[stage_recipe(pipeline, s).task][0]
        metrics = {k: last[k] for k in (headline, f"ema_{headline}", "train_loss") if last.get(k) is not None}
        rows.append({"stage": s.name, "state": where, "launcher": state["stages"].get(s.name, {}).get("launcher", ""),
                     "jobs": ",".join(jobs), "epoch": last.get("epoch"), "step": last.get("step"), "metrics": metrics,
                     "run": run.url})
    return rows, source


def print_status(rows: list[dict[str, Any]], source: str) -> None:
    print(f"{'stage':12s} {'state':12s} {'launcher':8s} {'jobs':16s} {'epoch':>5s} {'step':>8s}  metrics / run")
    for r in rows:
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in r["metrics"].items())
        print(f"{r['stage']:12s} {r['state']:12s} {r['launcher']:8s} {r['jobs'] or '-':16s} "
              f"{'-' if r['epoch'] is None else r['epoch']:>5} {'-' if r['step'] is None else r['step']:>8}  "
              f"{metrics + '  ' if metrics else ''}{r['run']}")
    if any(r["jobs"] for r in rows) and source != "sacct":
        print(f"(Slurm job states from {source})")


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("orchestrator.pipeline", __doc__)
    p.add_argument("pipeline", help="pipeline YAML, e.g. recipes/pipelines/b.yaml")
    p.add_argument("--launcher", choices=("slurm", "ray", "local"), default="slurm")
    p.add_argument("--status", action="store_true", help="show each stage's state, jobs, last epoch/step and metrics")
    p.add_argument("--print-config", action="store_true", help="print each stage's resolved recipe (JSON) and exit")
    cli.add_set(p, "recipe override for every stage (section.key=value), or for one (STAGE:section.key=value)")
    p.add_argument("--storage", help="where the stages' runs live, instead of the pipeline file's storage")
    cli.add_slurm_flags(p, "Slurm (default: the pipeline file's slurm section)")

    def body(args: argparse.Namespace) -> None:
        options = cli.slurm_flags(args)
        pipeline = load(args.pipeline, args.set, options, args.storage)
        if args.print_config:
            print(json.dumps({s.name: json.loads(stage_recipe(pipeline, s).to_json()) for s in pipeline.stages}, indent=1))
            return
        storage.check_reachable(pipeline.storage, pipeline.storage_options, "storage",
                                "the pipeline file's storage_options (or --set run.storage_options)")
        if args.status:
            print_status(*status(pipeline))
            return
        import orchestrator.pipeline.runner as runner  # torch, submitit and the loop only when launching

        if args.launcher == "slurm":
            jobs = runner.run_slurm(pipeline)
            print(f"submitted: {' '.join(jobs) if jobs else 'nothing (all stages complete or queued)'}")
        else:
            runner.run_in_process(pipeline, args.launcher)

    return cli.run(body, p, argv)
