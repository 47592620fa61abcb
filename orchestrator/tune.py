"""``python -m orchestrator.tune SWEEP [--set key=value ...] [--fresh]``: a Ray Tune sweep of recipe keys.

Each trial is a full Ray Train run of the training loop (its own workers, checkpoints and resume)
reporting per-epoch metrics to Tune; ASHA stops the weak ones early. The sweep folder
``<storage>/<name>/`` gets Tune's state, ``trials/<trial>/`` runs, ``results.csv``, ``results.png``
and ``best_recipe.yaml`` (the full-length recipe with the best parameters, runnable as is).
Re-running the command continues an interrupted sweep; ``--fresh`` moves the old one aside.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import signal
import sys
from typing import Any

import pandas as pd
import yaml

from orchestrator import cli, pretrain, storage
from orchestrator import recipe as recipes
from orchestrator import sweep as sweeps
from orchestrator.errors import Interrupted
from orchestrator.launch import ray_train
from orchestrator.preflight import preflight, world_sizes_for
from orchestrator.rundir import RunDir
from orchestrator.train import trackers

log = logging.getLogger("orchestrator.tune")
COLUMN = {"epochs_done": "epochs", "step": "steps"}  # results.csv's column for what ASHA counts


class TrialStopped(Interrupted):
    """The sweep's driver was stopped (Ctrl-C, SIGTERM): this trial checkpointed at its stop step, or never started.
    Tune records it as errored, which the next run of the sweep resumes (``resume_errored``)."""


def trial(config: dict[str, Any], recipe: dict[str, Any], parent: dict[str, Any] | None = None,
          relay: str | None = None) -> None:
    """Tune function trainable: one Ray Train run of the loop with this trial's parameters (its tracker runs
    under the sweep's ``parent``). A stop the driver relays stops it at the next step, checkpointed."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    recipe = recipes.with_values(recipes.from_dict(recipe),
                                 {**config["params"], "run.name": tune.get_context().get_trial_id()}, "trial")
    if relay is not None and ray_train.stop_relayed(relay):
        raise TrialStopped(f"trial {recipe.run.name}: not started, the sweep was stopped")
    if parent is not None:
        trackers.set_parent(RunDir.of(recipe), parent)
    try:
        ray_train.run(pretrain.training(recipe), callbacks=[TuneReportCallback()], relay=relay)
    except Interrupted as stopped:
        if relay is None or not ray_train.stop_relayed(relay):
            raise
        raise TrialStopped(f"trial {recipe.run.name}: {stopped}") from None


def run(sweep: sweeps.Sweep, fresh: bool = False, verbose: bool = False) -> pd.DataFrame:
    """Run (or continue) the sweep; returns the results table, also written to the sweep folder and printed. Tune's
    own status tables only with ``verbose`` (each trial's rank 0 prints its epoch lines anyway)."""
    from ray import tune

    root = storage.absolute(sweep.storage)
    sweep_url = storage.join(root, sweep.name)
    base = recipes.with_values(sweep.trial_base(), {
        "run.storage": storage.join(sweep_url, "trials"), "run.storage_options": sweep.storage_options}, sweep.name)
    ray_train.connect(ray_train.job_environment(pretrain.training(base)))  # trials get the recipe redacted
    ray_train.check_storage(sweep.storage, "sweep.storage")
    base = ray_train.with_absolute_paths(base)
    if fresh:
        RunDir(sweep_url, sweep.storage_options).set_aside()
    storage_path, filesystem = ray_train.storage_for_ray(root, sweep.storage_options)
    # The trial driver only waits on its TorchTrainer; the workers hold the CPUs/GPUs. ({"cpu": 0} alone is refused.)
    # One parent tracker run per sweep (continued with it), a child per trial.
    parent = trackers.open_parent(base, RunDir(sweep_url, sweep.storage_options), sweep.name, "sweep")
    # Ctrl-C and SIGTERM are the driver's StopSignals' (relayed to every trial's workers), not Tune's handler, which
    # would end the trials without a checkpoint at the stop.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    unit, length = sweep.progress(base)
    if not verbose:  # Tune's newer output prints its configuration box at any verbosity; the older one is silent at 0
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    with ray_train.relayed_stop() as (relay, stop):
        trainable = tune.with_resources(
            tune.with_parameters(trial, recipe=base.to_dict(redact=True), parent=parent, relay=relay),
            {"cpu": 0, "memory": 1})
        grid, experiment = _fit(trainable, sweep, storage_path, filesystem, sweep_url, unit, length, verbose)
    table = summarise(grid, sweep, unit, length)
    # After Ctrl-C the returned grid calls every trial terminated; the saved state (what a re-run continues) does not.
    saved = tune.ExperimentAnalysis(experiment, storage_filesystem=filesystem).trials
    unfinished = sum(t.status not in ("TERMINATED", "ERROR") for t in saved)
    stopped = stop.received is not None or unfinished > 0
    write_outputs(table, grid, sweep, sweep_url, unit, best=not stopped)
    if parent is not None:
        trackers.close_parent(base, parent, "stopped" if stopped else "finished")
    if stopped:
        raise interrupted_sweep(sweep, sweep_url, stop.received)
    return table


def interrupted_sweep(sweep: sweeps.Sweep, sweep_url: str, signum: int | None) -> Interrupted:
    how = f"on {signal.Signals(signum).name}, each running trial checkpointed at its stop step" if signum else "with unfinished trials"
    return Interrupted(f"sweep {sweep.name} stopped {how}; run the same command again to continue it (state in "
                       f"{sweep_url})", 128 + (signum or signal.SIGINT))


def _fit(trainable: Any, sweep: sweeps.Sweep, storage_path: str, filesystem: Any, sweep_url: str, unit: str,
         length: int, verbose: bool) -> tuple[Any, str]:
    """Tune's fit of the sweep, a new one or the saved one continued (ASHA over ``unit`` up to ``length``);
    (results, experiment path)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    param_space = {"params": sweeps.space(sweep)}
    experiment = storage.join(storage_path, sweep.name)
    if tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        log.info("continuing the sweep in %s", sweep_url)
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space, storage_filesystem=filesystem)
    else:
        scheduler = None
        if sweep.scheduler:
            # Progress as the loop counts it (a resumed trial does not restart the count). max_t is one past
            # the end: at max_t ASHA stops the trial itself, which would cut off its final weights.
            scheduler = ASHAScheduler(time_attr=unit, grace_period=sweep.scheduler.grace_period,
                                      reduction_factor=sweep.scheduler.reduction_factor, max_t=length + 1)
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, scheduler=scheduler,
                                        num_samples=sweep.num_samples, max_concurrent_trials=sweep.max_concurrent_trials),
            run_config=tune.RunConfig(name=sweep.name, storage_path=storage_path, storage_filesystem=filesystem,
                                      verbose=1 if verbose else 0),
        )
    return tuner.fit(), experiment


def summarise(grid: Any, sweep: sweeps.Sweep, unit: str, length: int) -> pd.DataFrame:
    """One row per trial: parameters, best and last metric, epochs (or steps) run, stopped early or not, error."""
    rows = []
    for result in grid:
        df = result.metrics_dataframe
        values = df[sweep.metric].dropna() if df is not None and sweep.metric in df else pd.Series(dtype=float)
        ran = int(df[unit].max()) if df is not None and unit in df else 0
        best = (values.max() if sweep.mode == "max" else values.min()) if len(values) else None
        rows.append({
            "trial": (result.metrics or {}).get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1],
            **result.config["params"],
            f"best_{sweep.metric}": best, f"last_{sweep.metric}": values.iloc[-1] if len(values) else None,
            COLUMN[unit]: ran, "stopped_early": result.error is None and ran < length,
            "error": "" if result.error is None else str(result.error).splitlines()[0][:200],
        })
    table = pd.DataFrame(rows)
    return table.sort_values(f"best_{sweep.metric}", ascending=sweep.mode == "min", na_position="last", ignore_index=True)


def write_outputs(table: pd.DataFrame, grid: Any, sweep: sweeps.Sweep, sweep_url: str, unit: str = "epochs_done",
                  best: bool = True) -> None:
    """results.csv, results.png and (once every trial has finished) best_recipe.yaml in the sweep folder."""
    fs, path = storage.filesystem(sweep_url, sweep.storage_options)
    fs.makedirs(path, exist_ok=True)
    with fs.open(storage.join(path, "results.csv"), "w") as f:
        table.to_csv(f, index=False)
    with fs.open(storage.join(path, "results.png"), "wb") as f:
        f.write(plot(table, grid, sweep, unit))
    done = table[table["error"] == ""].dropna(subset=[f"best_{sweep.metric}"])
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if not best:
        return
    if done.empty:
        log.warning("no trial reported %s; no best recipe written", sweep.metric)
        return
    best = done.iloc[0]
    params = {k: _plain(best[k]) for k in sweep.search}
    full = sweep.full_recipe(params, f"{sweep.base.run.name}-{sweep.name}-best")
    header = (f"# Best trial of sweep {sweep.name}: {best['trial']}, best {sweep.metric}={best[f'best_{sweep.metric}']:.4g} "
              f"after {best[COLUMN[unit]]} proxy {COLUMN[unit]}.\n# Parameters: {params}\n# Proxy settings: {sweep.proxy} "
              f"(lr rule: {sweep.lr_rule}). Below: the full-length recipe with these parameters.\n")
    with fs.open(storage.join(path, "best_recipe.yaml"), "w") as f:
        f.write(header + yaml.safe_dump(full.to_dict(redact=True), sort_keys=False))
    log.info("sweep %s: best %s; results.csv, results.png and best_recipe.yaml in %s", sweep.name, params, sweep_url)


def plot(table: pd.DataFrame, grid: Any, sweep: sweeps.Sweep, unit: str = "epochs_done") -> bytes:
    """The metric against each swept parameter (x: stopped early), and every trial's learning curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(sweep.search)
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4.5 * (len(keys) + 1), 3.8), squeeze=False)
    metric = f"best_{sweep.metric}"
    for ax, key in zip(axes[0], keys, strict=False):
        for early, marker in ((False, "o"), (True, "x")):
            part = table[table["stopped_early"] == early]
            ax.scatter(part[key].astype(str) if part[key].dtype == object else part[key], part[metric], marker=marker,
                       label="stopped early" if early else "ran to the end")
        if "loguniform" in sweep.search[key]:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    curves = axes[0][-1]
    for result in grid:
        df = result.metrics_dataframe
        if df is not None and sweep.metric in df and unit in df:
            label = ", ".join(f"{k.split('.')[-1]}={_plain(v):.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                              for k, v in result.config["params"].items())
            curves.plot(df[unit], df[sweep.metric], marker=".", label=label)
    curves.set_xlabel(COLUMN[unit].rstrip("s"))
    curves.set_ylabel(sweep.metric)
    curves.set_title("learning curves")
    curves.grid(alpha=0.3)
    if curves.get_legend_handles_labels()[0]:
        curves.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _plain(value: Any) -> Any:
    """numpy scalars -> Python values (for YAML and labels)."""
    return value.item() if hasattr(value, "item") else value


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("orchestrator.tune", __doc__)
    p.add_argument("sweep", help="sweep YAML, e.g. recipes/sweeps/drop_path_t.yaml")
    cli.add_set(p, "recipe key (section.key=value) or sweep field (sweep.field=value)")
    p.add_argument("--fresh", action="store_true", help="move an existing sweep of this name aside and start over")
    p.add_argument("--print-config", action="store_true", help="print the trials' base recipe and the search space")

    def body(args: argparse.Namespace) -> None:
        sweep = sweeps.load(args.sweep, args.set)
        if args.print_config:
            print(sweep.trial_base().to_json())
            print(yaml.safe_dump({"search": sweep.search}, sort_keys=False))
            return
        base = sweep.trial_base()
        preflight(base, args.sweep, world_sizes_for(base, "ray"))
        storage.check_reachable(sweep.storage, sweep.storage_options, "sweep.storage", "sweep.storage_options")
        run(sweep, args.fresh, args.verbose)

    return cli.run(body, p, argv)


if __name__ == "__main__":
    sys.exit(main())
