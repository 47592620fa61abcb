"""``python -m orchestrator.doctor RECIPE [--launcher local|ray|slurm] [--set ...] [--nodes 8,32,64] [--json]``.

Before a long run: can this cluster feed, fit and connect the recipe, and how long will it take? The doctor
runs where the recipe would run, through the same launcher (a Ray Train job of the recipe's workers, a Slurm
job of the stage's shape, or this process), measures each node for a few seconds (``orchestrator.probe``:
devices, all-reduce bandwidth, storage reads and writes, the input pipeline, training steps of the recipe's
model) and prints a table per node, a plan (step, epoch and whole-recipe time and what bounds them) and
verdict lines that name the key to change. ``--nodes`` extends the plan to larger clusters with a stated cost
model. The figures are also written to ``<run.storage>/doctor-<utc time>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from typing import Any

from orchestrator import cli, launch, storage
from orchestrator import recipe as recipes
from orchestrator.data import manifest as mf
from orchestrator.data.reader import checked_order, select_groups
from orchestrator.errors import RecipeError
from orchestrator.launch.job import Job
from orchestrator.preflight import preflight, world_sizes_for
from orchestrator.recipe import Recipe, micro_batch, plan_batch

log = logging.getLogger("orchestrator")
BOUNDS = ("compute", "input", "storage read", "all-reduce", "checkpoint")
# The --nodes model: a ring all-reduce moves 2(n-1)/n of the gradient through every link, so at the measured
# cross-node bus bandwidth its time barely grows with n; compute and input scale with the per-device batch.
MODEL = "ring all-reduce at the measured bus bandwidth (across nodes when measured, else within a node)"


def report_name(stamp: str) -> str:
    return f"doctor-{stamp}.json"


def save(recipe: Recipe, stamp: str, report: dict[str, Any]) -> str:
    """The report as ``doctor-<stamp>.json`` under ``run.storage``; returns its URL."""
    fs, root = storage.filesystem(recipe.run.storage, recipe.run.storage_options)
    fs.makedirs(root, exist_ok=True)
    path = f"{root.rstrip('/')}/{report_name(stamp)}"
    with fs.open(path, "w") as f:
        f.write(json.dumps(report, indent=2, default=str))
    return storage.join(recipe.run.storage, report_name(stamp))


def plan(recipe: Recipe, probes: list[dict[str, Any]], nodes: list[int]) -> dict[str, Any]:
    """Step time as the slowest of compute, input, storage reads, the gradient all-reduce and checkpoint
    writes, for this cluster and for ``nodes`` nodes of it (a model: ``MODEL``)."""
    manifest = mf.load(recipe.data.train, recipe.data.storage_options, verify=False)
    order = checked_order(select_groups(manifest, recipe.data.train_fraction), micro_batch(recipe),
                          recipe.batch.global_batch_size, recipe.data.partitions, [], f"data.train={recipe.data.train}")
    leaders = [p for p in probes if "input" in p]
    per_node = max(p["devices"]["devices_on_node"] for p in probes)
    writes = probes[0]["write"]
    cross = [p["allreduce"]["across_nodes"] for p in probes if "across_nodes" in p.get("allreduce", {})]
    within = [p["allreduce"]["within_node"] for p in probes if "within_node" in p.get("allreduce", {})]
    busbw = min(a["gb_per_s"] for a in cross or within) if cross or within else None
    grad_bytes = writes["bytes"] / 4
    every = recipe.run.checkpoint_every_steps or order.steps
    total_steps = recipe.schedule.iterations or recipe.schedule.epochs * order.steps
    measured = len(probes)

    def at(world: int) -> dict[str, Any]:
        p = plan_batch(recipe, world)
        compute = p.per_device / min(r["compute"]["images_per_s"] for r in probes)
        device_step = [lp["input"].get("device_images_per_s") for lp in leaders]
        if all(device_step):  # data.decode: gpu: the device step runs in the training thread
            compute += p.per_device / min(device_step)
        cores = min(lp["devices"]["cores_per_device"] for lp in leaders)
        per_core = min(lp["input"]["images_per_cpu_s"] for lp in leaders)
        times = {
            "compute": compute,
            "input": p.per_device / (per_core * cores),
            "storage read": p.per_device * min(per_node, world) / min(lp["read"]["images_per_s"] for lp in leaders),
            "all-reduce": 0.0 if world == 1 or busbw is None else grad_bytes * 2 * (world - 1) / world / (busbw * 1e9),
            "checkpoint": writes["bytes"] / (writes["mb_per_s"] * 1e6) / every,
        }
        step = max(times.values())
        bound = max(times, key=times.__getitem__)
        others = max(v for k, v in times.items() if k != "input")  # the cores that would make input keep up
        return {"world_size": world, "per_device": p.per_device, "micro_batch": p.micro_batch, "accum_steps": p.accum_steps,
                "seconds": times, "step_s": step, "bound": bound, "epoch_s": step * order.steps,
                "total_s": step * total_steps, "device_hours": step * total_steps * world / 3600,
                "keeps_order": order.why_not(world) is None, "cores_needed_per_device": p.per_device / others / per_core}

    out: dict[str, Any] = {"steps_per_epoch": order.steps, "total_steps": total_steps, "this_cluster": at(measured),
                           "world_sizes_keeping_order": order.world_sizes(), "model": MODEL, "larger": {}}
    for n in nodes:
        world = n * per_node
        try:
            out["larger"][n] = at(world)
        except RecipeError as exc:  # the global batch does not split over ``world`` devices
            out["larger"][n] = {"world_size": world, "error": str(exc)}
    return out


def verdicts(recipe: Recipe, probes: list[dict[str, Any]], planned: dict[str, Any]) -> list[str]:
    """What to change, naming the key; the last line says what bounds the run."""
    here = planned["this_cluster"]
    lines = []
    compute = [p["compute"] for p in probes]
    fits = [c for c in compute if "max_micro_batch" in c and c["max_micro_batch"] < c["micro_batch"]]
    if fits:
        c = min(fits, key=lambda c: c["max_micro_batch"])
        lines.append(f"micro-batch {c['micro_batch']} does not fit in {c['memory_gb']:.0f} GB: set batch.per_device_max: "
                     f"{max(c['max_micro_batch'], 1)}")
    if here["bound"] == "input":
        cores = min(p["devices"]["cores_per_device"] for p in probes)
        fix = "set data.decode: gpu" if recipe.data.decode == "cpu" else "add CPU cores per device"
        lines.append(f"input-bound: {here['cores_needed_per_device']:.1f} cores per device needed, {cores:.1f} "
                     f"available: {fix}")
    if here["bound"] == "storage read":
        lines.append("storage-bound: one reader per node reads slower than the devices train: raise data.num_workers, "
                     "move data.train closer, or shard with --max-side")
    if here["bound"] == "all-reduce":
        lines.append("communication-bound: the gradient all-reduce takes longer than the step's compute: a faster "
                     "interconnect, or fewer larger nodes")
    if here["bound"] == "checkpoint":
        lines.append("checkpoint-bound: writes to run.storage take longer than the steps between them: raise "
                     "run.checkpoint_every_steps")
    for n, row in planned["larger"].items():
        if "error" in row:  # the global batch does not split over these devices: the plan's own reason
            lines.append(f"--nodes {n}: {row['error']}")
        elif not row["keeps_order"]:
            ok = [w for w in planned["world_sizes_keeping_order"] if w > 1]
            lines.append(f"--nodes {n}: world size {row['world_size']} cannot keep the sample order: use "
                         f"{' or '.join(map(str, ok[-2:])) or 'fewer devices'} (data.partitions sets which)")
    lines.append(f"{here['bound']}-bound: {here['step_s']:.3f} s a step on this cluster; the recipe's {planned['total_steps']} "
                 f"steps take {_hours(here['total_s'])} ({here['device_hours']:.1f} device-hours)")
    return lines


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def table(recipe: Recipe, report: dict[str, Any]) -> str:
    """The report as text: a row per node, the plan, the larger clusters, the verdicts."""
    probes, planned = report["probes"], report["plan"]
    rows = [("node", "ranks", "device", "mem GB", "cores/dev", "read MB/s", "read img/s", "input img/CPU-s",
             "train img/s/dev", "peak GB", "max micro", "allreduce GB/s in/across")]
    for node in dict.fromkeys(p["node"] for p in probes):
        mine = [p for p in probes if p["node"] == node]
        lead = next((p for p in mine if "input" in p), mine[0])
        d = lead["devices"]
        ar = [p["allreduce"] for p in mine]
        within = min((a["within_node"]["gb_per_s"] for a in ar if "within_node" in a), default=None)
        across = min((a["across_nodes"]["gb_per_s"] for a in ar if "across_nodes" in a), default=None)
        compute = min(p["compute"]["images_per_s"] for p in mine)
        rows.append((node[:14], str(len(mine)), d["name"][:22], f"{d['memory_gb']:.0f}", f"{d['cores_per_device']:.1f}",
                     f"{lead['read']['mb_per_s']:.0f}", f"{lead['read']['images_per_s']:.0f}",
                     f"{lead['input']['images_per_cpu_s']:.0f}", f"{compute:.1f}",
                     f"{max(p['compute']['peak_gb'] for p in mine):.2f}",
                     str(min((p["compute"].get("max_micro_batch", "-") for p in mine), key=str)),
                     f"{_num(within)}/{_num(across)}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
    d = probes[0]["devices"]
    versions = f"torch {d['torch']}" + (f", CUDA {d['cuda']}, NCCL {d['nccl']}, driver {d['driver']}" if "cuda" in d else "")
    lines.append(f"({versions}; checkpoint write to run.storage {probes[0]['write']['mb_per_s']:.0f} MB/s for "
                 f"{probes[0]['write']['bytes'] / 1e6:.0f} MB; input = the recipe's training transform on one core)")
    here = planned["this_cluster"]
    lines.append("")
    lines.append(f"plan on this cluster ({here['world_size']} devices, {here['per_device']} images per device per step = "
                 f"{here['micro_batch']} x {here['accum_steps']}): step {here['step_s']:.3f} s = max(" + ", ".join(
                     f"{k} {v:.3f}" for k, v in here["seconds"].items()) + ")")
    lines.append(f"  epoch {_hours(here['epoch_s'])} ({planned['steps_per_epoch']} steps), whole recipe {_hours(here['total_s'])}, "
                 f"{here['device_hours']:.1f} device-hours; bound by {here['bound']}")
    for n, row in planned["larger"].items():
        if "error" in row:
            lines.append(f"  {n} nodes ({row['world_size']} devices): {row['error']}")
        else:
            lines.append(f"  {n} nodes ({row['world_size']} devices, model): step {row['step_s']:.3f} s, whole recipe "
                         f"{_hours(row['total_s'])}, {row['device_hours']:.1f} device-hours; bound by {row['bound']}")
    if planned["larger"]:
        lines.append(f"  (model: {planned['model']})")
    lines.append("")
    lines += [f"verdict: {v}" for v in report["verdicts"]]
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("orchestrator.doctor", __doc__)
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/b.yaml")
    cli.add_set(p)
    p.add_argument("--launcher", choices=("ray", "local", "slurm"), default="ray",
                   help="where to measure: the Ray cluster (default, as the other entry points), this process, or Slurm")
    p.add_argument("--nodes", default="", help="plan for these node counts too, e.g. 8,32,64 (a stated cost model)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of the tables")
    p.add_argument("--seconds", type=float, default=3.0, help="how long each measurement runs (default 3)")
    cli.add_slurm_flags(p, "Slurm (--launcher slurm; as orchestrator.pipeline takes them, but --slurm-nodes)",
                        nodes_flag="--slurm-nodes")

    def body(args: argparse.Namespace) -> None:
        recipe = recipes.load(args.recipe, args.set)
        try:
            nodes = [int(n) for n in args.nodes.split(",") if n.strip()]
        except ValueError:
            raise RecipeError(f"--nodes {args.nodes!r}: expected node counts, e.g. 8,32,64") from None
        if args.seconds <= 0:
            raise RecipeError(f"--seconds {args.seconds:g}: must be positive")
        options = cli.slurm_options(args)
        preflight(recipe, args.recipe, world_sizes_for(recipe, args.launcher, options)[-1:])
        from orchestrator.probe import probe  # torch and the loop only when measuring

        probes = launch.run(Job(probe, recipe, (args.seconds,), name=f"doctor-{recipe.run.name}"), args.launcher, options)
        if probes is None:  # a torchrun rank other than 0
            return
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        planned = plan(recipe, probes, nodes)
        report = {"recipe": args.recipe, "launcher": args.launcher, "time": stamp, "probes": probes, "plan": planned}
        report["verdicts"] = verdicts(recipe, probes, planned)
        url = save(recipe, stamp, report)
        print(json.dumps(report, default=str) if args.json else table(recipe, report))
        log.info("figures: %s", url)

    return cli.run(body, p, argv)


if __name__ == "__main__":
    sys.exit(main())
