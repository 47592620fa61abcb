"""Sweep files (``recipes/sweeps/*.yaml``): a base recipe, a search space over recipe keys, proxy
settings for short trials, the metric and the early-stopping scheduler. Validated in full at load,
so a bad key or value fails before anything is launched.

    recipe: ../t.yaml                      # relative to the sweep file
    search:                                # recipe key -> one domain
      model.drop_path_rate: {grid: [0.0, 0.1, 0.2]}
      optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}   # also: uniform, choice, randint
    proxy: {schedule.epochs: 30, data.train_fraction: 0.1, batch.global_batch_size: 1024}
    lr_rule: linear                        # optimizer.lr follows a proxy batch size: linear | sqrt | none
    metric: top1                           # or ema_top1 (needs ema.decay), top5; segmentation: mIoU, mAcc, aAcc
    mode: max
    scheduler: {grace_period: 5, reduction_factor: 3}   # ASHA over epochs (iteration schedules: steps);
                                                        # null runs every trial to the end
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import overrides as overrides_
from orchestrator import recipe as recipes
from orchestrator import storage
from orchestrator.errors import RecipeError

DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclass
class Asha:
    grace_period: int = 1  # epochs (iteration schedules: steps) every trial runs before it can be stopped
    reduction_factor: float = 3.0


@dataclass
class Sweep:
    name: str
    recipe: str
    search: dict[str, dict[str, list[Any]]]
    proxy: dict[str, Any] = field(default_factory=dict)
    lr_rule: str = "linear"
    metric: str = "top1"
    mode: str = "max"
    num_samples: int = 1  # samples of the random domains (each grid point is crossed with them)
    scheduler: Asha | None = field(default_factory=Asha)
    max_concurrent_trials: int = 2
    storage: str = "runs/sweeps"  # the sweep lives at <storage>/<name>/
    storage_options: dict[str, Any] = field(default_factory=dict)
    base: recipes.Recipe | None = field(default=None, repr=False)  # the recipe, before proxy settings

    def lr_factor(self) -> float:
        """How ``optimizer.lr`` scales from the recipe's global batch to the proxy's."""
        assert self.base is not None
        proxy_batch = self.proxy.get("batch.global_batch_size", self.base.batch.global_batch_size)
        ratio = proxy_batch / self.base.batch.global_batch_size
        return {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[self.lr_rule]

    def trial_base(self) -> recipes.Recipe:
        """The recipe every trial starts from: proxy settings, the lr rule, one report per epoch with evaluation."""
        assert self.base is not None
        proxy = dict(self.proxy)
        if "optimizer.lr" not in proxy and self.lr_factor() != 1.0:
            proxy["optimizer.lr"] = self.base.optimizer.lr * self.lr_factor()
        proxy["run.max_steps"] = None
        if not (proxy.get("schedule.iterations") or self.base.schedule.iterations):
            proxy["run.eval_every_epochs"] = 1  # iteration schedules report every run.eval_every_steps instead
        return recipes.with_values(self.base, proxy, f"{self.name}: proxy")

    def progress(self, trial: recipes.Recipe) -> tuple[str, int]:
        """What ASHA counts and the trials' length in it: optimizer steps for iteration schedules (segmentation,
        reported every ``run.eval_every_steps``), else epochs (the loop's ``epochs_done``)."""
        if trial.schedule.iterations:
            return "step", trial.schedule.iterations
        return "epochs_done", trial.schedule.epochs

    def full_recipe(self, params: dict[str, Any], run_name: str) -> recipes.Recipe:
        """The base recipe (full length, no proxy) with a trial's parameters: what to train for real.

        A searched ``optimizer.lr`` was found at the proxy batch, so it is scaled back by the lr rule.
        """
        assert self.base is not None
        values = dict(params)
        if "optimizer.lr" in values:
            values["optimizer.lr"] = values["optimizer.lr"] / self.lr_factor()
        return recipes.with_values(self.base, {**values, "run.name": run_name}, f"{self.name}: best parameters")


def load(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read and check a sweep file; ``overrides`` are ``section.key=value`` for the recipe or ``sweep.field=value``."""
    path = Path(path)
    raw = recipes.read_mapping(path, "sweep")
    recipe_overrides = []
    for o in overrides_.parse(overrides or []):
        if o.section == "sweep":
            raw[o.field] = o.value
        else:
            recipe_overrides.append(o)
    known = {f.name for f in dataclasses.fields(Sweep)} - {"base"}
    unknown = set(raw) - known
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) {sorted(unknown)} (known: {', '.join(sorted(known))})")
    raw.setdefault("name", path.stem)
    for key in ("recipe", "search"):
        if key not in raw:
            raise RecipeError(f"{path}: {key}: missing")
    scheduler = raw.get("scheduler", {})
    if scheduler is not None:
        if not isinstance(scheduler, dict) or set(scheduler) - {f.name for f in dataclasses.fields(Asha)}:
            raise RecipeError(f"{path}: scheduler: expected {{grace_period, reduction_factor}} or null, got {scheduler!r}")
        raw["scheduler"] = Asha(**scheduler)
    sweep = Sweep(**raw)
    storage.remember_secrets(sweep.storage_options)
    sweep.base = recipes.load(path.parent / sweep.recipe, recipe_overrides)
    check(sweep, str(path))
    return sweep


def check(sweep: Sweep, where: str) -> None:
    """Everything that can be checked without data or a cluster, each error naming the key."""
    if sweep.lr_rule not in ("linear", "sqrt", "none"):
        raise RecipeError(f"{where}: lr_rule: {sweep.lr_rule!r} is not linear, sqrt or none")
    if sweep.mode not in ("max", "min"):
        raise RecipeError(f"{where}: mode: {sweep.mode!r} is not max or min")
    assert sweep.base is not None
    metrics = recipes.METRICS[sweep.base.task]
    if sweep.metric.removeprefix("ema_") not in metrics:
        raise RecipeError(f"{where}: metric: {sweep.metric!r} is not one of {', '.join(metrics)} (or ema_ of one) "
                          f"for a {sweep.base.task} recipe")
    if sweep.num_samples < 1 or sweep.max_concurrent_trials < 1:
        raise RecipeError(f"{where}: num_samples and max_concurrent_trials must be at least 1")
    if not isinstance(sweep.search, dict) or not sweep.search:
        raise RecipeError(f"{where}: search: the search space is empty; give at least one key, "
                          "e.g. model.drop_path_rate: {grid: [0.1, 0.2]}")
    trial = sweep.trial_base()
    if sweep.metric.startswith("ema_") and trial.ema.decay is None:
        raise RecipeError(f"{where}: metric: {sweep.metric} needs EMA, but the recipe has ema.decay null")
    if not trial.data.val:
        raise RecipeError(f"{where}: metric: {sweep.metric} needs validation data, but the recipe has no data.val")
    unit, length = sweep.progress(trial)
    if unit == "step" and not trial.run.eval_every_steps:
        raise RecipeError(f"{where}: proxy: an iteration schedule reports only every run.eval_every_steps; set it "
                          f"(e.g. run.eval_every_steps: {max(length // 10, 1)})")
    if sweep.scheduler and not 1 <= sweep.scheduler.grace_period < length:
        what = "iterations (proxy schedule.iterations)" if unit == "step" else "epochs (proxy schedule.epochs)"
        raise RecipeError(f"{where}: scheduler.grace_period: {sweep.scheduler.grace_period} must be at least 1 and less "
                          f"than the trials' {length} {what}")
    if sweep.scheduler and sweep.scheduler.reduction_factor <= 1:
        raise RecipeError(f"{where}: scheduler.reduction_factor: must be more than 1, got {sweep.scheduler.reduction_factor}")
    for dotted, domain in sweep.search.items():
        at = f"{where}: search.{dotted}"
        if not isinstance(domain, dict) or len(domain) != 1 or next(iter(domain)) not in DOMAINS:
            raise RecipeError(f"{at}: expected one of {{{', '.join(f'{d}: [...]' for d in DOMAINS)}}}, got {domain!r}")
        kind, values = next(iter(domain.items()))
        if not isinstance(values, list) or not values:
            raise RecipeError(f"{at}: {kind}: expected a non-empty list, got {values!r}")
        if kind in ("uniform", "loguniform", "randint"):
            if len(values) != 2 or not all(isinstance(v, int | float) for v in values) or not values[0] < values[1]:
                raise RecipeError(f"{at}: {kind}: expected [low, high] with low < high, got {values!r}")
            if kind == "loguniform" and values[0] <= 0:
                raise RecipeError(f"{at}: loguniform: the low bound must be positive, got {values[0]}")
        to_check = [values[0], values[1] - 1] if kind == "randint" else values  # Tune's randint excludes high
        for value in to_check:
            recipes.with_values(trial, {dotted: value}, at)  # names the key when the key or the value is wrong


def space(sweep: Sweep) -> dict[str, Any]:
    """The Tune search space for ``sweep.search``."""
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    return {dotted: make[kind](values) for dotted, domain in sweep.search.items() for kind, values in domain.items()}
