"""The recipe schema (one dataclass per YAML section), its loader and its validation.

A recipe file may ``extends:`` another (path relative to it); the child's keys override the base's.
``--set section.key=value`` overrides come last. Every error names the file (or ``--set``) and the
dotted key, and is raised before any process group, cluster or dataset read starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from model.config import HeadConfig, ModelConfig
from orchestrator import overrides as overrides_
from orchestrator.errors import RecipeError
from orchestrator.overrides import Override
from orchestrator.storage import (
    absolute,
    fill_secrets,
    redacted_options,
    remember_secrets,
    secret_values,
    url_password,
)


@dataclass
class DataConfig:
    train: str = ""
    val: str | None = None
    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"  # eval resize
    train_interpolation: str = "random"  # RandomResizedCrop (timm's default: random bilinear/bicubic)
    num_workers: int = 8
    # Where training images are decoded and augmented: cpu (the reader's workers; the reference) or gpu (the
    # training device decodes each micro-batch with the workers' draws; README "Data").
    decode: str = "cpu"
    # Samples each partition shuffles over. Host memory: about partitions x (shuffle_buffer + rows per row
    # group) encoded images, spread over the ranks, whatever the world size.
    shuffle_buffer: int = 256
    # The training order is defined over this many partitions (null: the largest of 1, 2, 4, 8, 12, 24, ... 768
    # that leaves two row groups per partition). World sizes must divide it; see README "Many nodes".
    partitions: int | None = None
    max_corrupt_fraction: float = 0.001
    retries: int = 6
    retry_base_delay: float = 0.5
    # Use only the first fraction of each split's row groups (proxy runs, sweeps); 1.0 = all.
    train_fraction: float = 1.0
    val_fraction: float = 1.0
    storage_options: dict[str, Any] = field(default_factory=dict)
    # A node-local folder where whole shards are kept across epochs and restarts, shared by the node's ranks
    # (null: every epoch reads the store); evicted least recently used beyond cache_limit_gb (null: 90% of the
    # disk's free space when the run starts, plus what is cached already). README "Data".
    cache_dir: str | None = None
    cache_limit_gb: float | None = None


@dataclass
class AugmentConfig:
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    repeated_aug: bool = False
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    re_prob: float = 0.25
    color_jitter: float | None = None  # timm disables it when RandAugment is on


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 4e-3
    eps: float = 1e-8
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.05
    clip_grad: float | None = None


@dataclass
class ScheduleConfig:
    epochs: int = 300
    warmup_epochs: float = 20
    sched: str = "cosine"  # cosine | constant | poly
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    power: float = 1.0  # poly: lr = min_lr + (lr - min_lr) * (1 - step / total) ** power
    # Iteration-based schedules (segmentation, as mmseg's IterBasedRunner): the run is this many optimizer
    # steps (epochs is then unused) and warms up over warmup_iterations (instead of warmup_epochs).
    iterations: int | None = None
    warmup_iterations: int | None = None


@dataclass
class BatchConfig:
    global_batch_size: int = 4096
    per_device_max: int = 128


@dataclass
class EmaConfig:
    decay: float | None = None  # null = no EMA


@dataclass
class RunConfig:
    name: str = "run"
    storage: str = "runs"  # a run lives at <storage>/<name>/
    storage_options: dict[str, Any] = field(default_factory=dict)
    checkpoint_every_steps: int | None = None  # also at every epoch end
    keep_checkpoints: int = 3
    # A checkpoint due while the previous one is still uploading: wait for it (training pauses), or skip this one
    # with a line (the next is taken as usual; one needed by a stop or the end is never skipped).
    checkpoint_overlap: str = "wait"  # wait | skip
    seed: int = 0
    max_steps: int | None = None
    eval_every_epochs: int | None = 1  # null: evaluate only every run.eval_every_steps and at the end
    eval_every_steps: int | None = None  # also evaluate (and checkpoint) every this many steps (mmseg: 16000)
    log_every_steps: int = 50
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    channels_last: bool | None = None  # null = on for CUDA
    compile: bool = False
    dist_bn: str = "reduce"  # average BatchNorm statistics across ranks before eval: reduce | broadcast | none
    max_nonfinite_steps: int = 20
    # No progress (micro-batch, evaluation batch, checkpoint chunk) for this long ends the attempt; the launcher
    # resumes from the newest checkpoint. Twice this until the first optimizer step has finished (build, compile,
    # first reads).
    stall_timeout_s: float | None = 600.0  # null: no watchdog
    max_stall_restarts: int = 3  # Slurm: stall requeues of one job before it stops as stalled (Ray: max_failures)
    # Where else rank 0 logs params, metrics and artifacts: tensorboard, mlflow (MLFLOW_TRACKING_URI), wandb
    # (WANDB_API_KEY, WANDB_MODE); see orchestrator/train/trackers.py.
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    experiment: str = "inceptionnext"  # the MLflow experiment / W&B project
    tracking_uri: str | None = None  # the MLflow server; null: MLFLOW_TRACKING_URI
    tracker_weights: bool = False  # also upload the final weights to the trackers


@dataclass
class ScalingConfig:
    num_workers: int | list[int] = 1  # [min, max]: elastic (Ray), every size in between must keep the order
    gpus_per_worker: int = 1
    cpus_per_worker: int = 8
    max_failures: int = 3
    resize_check_s: float = 60.0  # elastic: how often Ray checks whether more workers fit


@dataclass
class SegmentConfig:
    """``task: segmentation``: mmseg's ADE20K data pipeline and evaluation (see ``data/seg_transforms.py``)."""

    crop_size: int = 512
    scale: list[int] = field(default_factory=lambda: [2048, 512])  # Resize img_scale (long side, short side)
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])  # training: scale x a ratio drawn from this
    cat_max_ratio: float = 0.75  # RandomCrop: retry (10 times) while one class covers more of the crop than this
    photometric: bool = True  # PhotoMetricDistortion
    ignore_index: int = 255
    test_mode: str = "whole"  # whole | slide
    test_stride: int = 341  # slide: window stride (the window is crop_size)
    test_size_divisor: int | None = None  # test sizes rounded up to a multiple of this (PVT's AlignResize: 32)
    aug_test: bool = False  # the final evaluation also runs multi-scale with flip (ms_mIoU, ...)
    aug_test_ratios: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75])


TASKS = ("classification", "segmentation")
TRACKERS = ("tensorboard", "mlflow", "wandb")
# Each task's validation metrics, the headline one first (summaries, plots, pipeline status, sweeps).
METRICS = {"classification": ("top1", "top5"), "segmentation": ("mIoU", "mAcc", "aAcc")}
SCALARS = ("task",)  # top-level recipe keys holding a value rather than a section


@dataclass
class Recipe:
    task: str = "classification"  # classification | segmentation (a top-level key in the YAML)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    run: RunConfig = field(default_factory=RunConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if redact:
            for section in ("data", "run"):
                data[section]["storage_options"] = redacted_options(data[section]["storage_options"])
            password = url_password(self.run.tracking_uri)
            if password:
                data["run"]["tracking_uri"] = self.run.tracking_uri.replace(f":{password}@", ":***@")
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclass(frozen=True)
class BatchPlan:
    """How the recipe's global batch is made on ``world_size`` devices."""

    world_size: int
    per_device: int  # samples per device per optimizer step
    micro_batch: int  # samples per forward/backward: the same on every world size
    accum_steps: int


def micro_batch(recipe: Recipe) -> int:
    """Samples per forward/backward: the largest divisor of the global batch up to ``batch.per_device_max``.

    Fixed by the recipe, not the world size, so BatchNorm sees the same micro-batches on any number of devices."""
    gbs, cap = recipe.batch.global_batch_size, recipe.batch.per_device_max
    return max(d for d in range(1, min(gbs, cap) + 1) if gbs % d == 0)


def world_sizes(recipe: Recipe) -> list[int]:
    """Scaling sizes the recipe asks for: one, or every size of an elastic ``[min, max]``."""
    n = recipe.scaling.num_workers
    return list(range(n[0], n[1] + 1)) if isinstance(n, list) else [n]


def plan_batch(recipe: Recipe, world_size: int, source: str = "recipe") -> BatchPlan:
    """Per-device batch and gradient accumulation that keep the global batch and its micro-batches exactly the recipe's."""
    gbs, m = recipe.batch.global_batch_size, micro_batch(recipe)
    per_step = gbs // m
    if per_step % world_size:
        fits = [w for w in range(1, per_step + 1) if per_step % w == 0]
        raise RecipeError(f"{source}: batch.global_batch_size={gbs} is {per_step} micro-batches of {m} (batch.per_device_max="
                          f"{recipe.batch.per_device_max}), which world size {world_size} does not divide; world sizes "
                          f"that fit: {', '.join(map(str, fits))}")
    plan = BatchPlan(world_size, gbs // world_size, m, per_step // world_size)
    if uses_mixup(recipe) and m % 2:
        raise RecipeError(f"{source}: batch.global_batch_size={gbs} gives an odd micro-batch of {m}; timm's "
                          "Mixup/CutMix pairs samples and needs it even")
    return plan


# --- loading ------------------------------------------------------------------------------------
SECRETS_ENV = "INCEPTIONNEXT_STORAGE_SECRETS"


def secret_options(recipe: Recipe) -> dict[str, dict[str, Any]]:
    """The secret storage options of ``recipe`` by section (what ``to_dict(redact=True)`` replaces by ``***``)."""
    return {section: secret_values(getattr(recipe, section).storage_options) for section in ("data", "run")}


@contextlib.contextmanager
def secrets_in_environment(recipe: Recipe) -> Iterator[None]:
    """``SECRETS_ENV`` set in this process while launching processes that inherit its environment
    (sbatch); ``from_dict`` there fills the redacted options back in. Secrets never go into a pickle."""
    old = os.environ.get(SECRETS_ENV)
    os.environ[SECRETS_ENV] = json.dumps(secret_options(recipe))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(SECRETS_ENV, None)
        else:
            os.environ[SECRETS_ENV] = old


def from_dict(data: dict[str, Any]) -> Recipe:
    """A recipe from ``Recipe.to_dict()`` (how launchers ship it to workers). Redacted (``***``) storage
    options are filled in from ``SECRETS_ENV``."""
    secrets = json.loads(os.environ.get(SECRETS_ENV) or "{}")
    data, missing = dict(data), []
    for section in ("data", "run"):
        if section in data:
            options, lost = fill_secrets(data[section]["storage_options"], secrets.get(section, {}),
                                         f"{section}.storage_options.")
            data[section] = {**data[section], "storage_options": options}
            missing += lost
    if missing:
        raise RecipeError(f"recipe: {', '.join(missing)} arrived redacted and {SECRETS_ENV} does not hold them; "
                          "launch through this project's launchers, or pass credentials in the environment")
    recipe = _build(data, {}, "recipe")
    validate(recipe)
    return recipe


def with_values(recipe: Recipe, values: Mapping[str, Any], where: str = "recipe") -> Recipe:
    """A copy of ``recipe`` with ``{"section.key": value}`` applied and validated (sweeps use this per trial)."""
    data = recipe.to_dict(redact=False)
    for dotted, value in values.items():
        section, _, key = dotted.partition(".")
        if section not in data or key not in data[section]:
            raise RecipeError(f"{where}: {dotted}: no such recipe key (expected section.key, e.g. model.drop_path_rate)")
        data[section][key] = value
    origin = dict.fromkeys(values, where)
    out = _build(data, origin, where)
    validate(out, origin, where)
    return out


def absolute_paths(recipe: Recipe) -> Recipe:
    """Local data, storage and init paths made absolute, for processes with another working directory."""
    values: dict[str, Any] = {"data.train": absolute(recipe.data.train), "run.storage": absolute(recipe.run.storage)}
    if recipe.data.val:
        values["data.val"] = absolute(recipe.data.val)
    init = recipe.model.init
    if init and ("/" in init or "." in init):  # a path or URL, not a run name
        values["model.init"] = absolute(init)
    return with_values(recipe, values)


def load(path: str | Path, overrides: list[str | Override] | None = None) -> Recipe:
    """Load ``path`` (following ``extends:``), apply ``section.key=value`` overrides, validate."""
    origin: dict[str, str] = {}
    raw = _read_with_extends(Path(path), origin, seen=())
    for o in overrides_.parse(overrides or []):
        if o.scope:
            raise RecipeError(f"{o.origin} {o.scope}:{o.key}: a STAGE: prefix only applies to pipelines")
        raw.setdefault(o.section, {})
        if not isinstance(raw[o.section], dict):
            raise RecipeError(f"{o.origin} {o.key}: {o.section} is not a section")
        raw[o.section][o.field] = o.value
        origin[o.key] = o.origin
    recipe = _build(raw, origin, str(path))
    validate(recipe, origin, str(path))
    return recipe


def read_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (recipes, sweeps, pipelines), or a RecipeError naming the file."""
    if not path.exists():
        raise RecipeError(f"{path}: {what} file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a {what} file is a mapping of keys, got {type(data).__name__}")
    return data


def _read_with_extends(path: Path, origin: dict[str, str], seen: tuple[Path, ...]) -> dict[str, Any]:
    if path.resolve() in seen:
        raise RecipeError(f"{path}: 'extends' forms a cycle ({' -> '.join(map(str, seen))})")
    data = read_mapping(path, "recipe")
    base: dict[str, Any] = {}
    if "extends" in data:
        base = _read_with_extends(path.parent / str(data.pop("extends")), origin, (*seen, path.resolve()))
    for section, values in data.items():
        if section in SCALARS:  # top-level keys that are values, not sections
            base[section] = values
            origin[section] = str(path)
            continue
        if not isinstance(values, dict):
            raise RecipeError(f"{path}: {section}: expected a mapping of keys, got {values!r}")
        merged = base.setdefault(section, {})
        if not isinstance(merged, dict):
            raise RecipeError(f"{path}: {section}: expected a mapping")
        for key, value in values.items():
            merged[key] = value
            origin[f"{section}.{key}"] = str(path)
    return base


def _build(raw: dict[str, Any], origin: dict[str, str], path: str) -> Recipe:
    sections = {f.name: f.type for f in dataclasses.fields(Recipe)}
    hints = typing.get_type_hints(Recipe)
    built = {}
    for section, values in raw.items():
        if section in SCALARS:
            built[section] = _coerce(values, hints[section], f"{origin.get(section, path)}: {section}")
            continue
        if section not in sections:
            raise RecipeError(f"{origin.get(f'{section}.' + next(iter(values), ''), path)}: unknown section {section!r} "
                              f"(known: {', '.join(sections)})")
        cls = hints[section]
        fields = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            where = f"{origin.get(f'{section}.{key}', path)}: {section}.{key}"
            if key not in fields:
                raise RecipeError(f"{where}: unknown key (known: {', '.join(fields)})")
            kwargs[key] = _coerce(value, fields[key], where)
        built[section] = cls(**kwargs)
    recipe = Recipe(**built)
    remember_secrets(recipe.data.storage_options)  # any later error message hides them
    remember_secrets(recipe.run.storage_options)
    remember_secrets({"password": url_password(recipe.run.tracking_uri)})  # user:password@ in a tracking URI
    return recipe


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except RecipeError:
                continue
        raise RecipeError(f"{where}: expected {_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "4e-3" (no dot) as a string
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise RecipeError(f"{where}: expected {_name(tp)}, got {value!r} ({type(value).__name__})")


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def validate(recipe: Recipe, origin: dict[str, str] | None = None, path: str = "recipe") -> None:
    """Range checks that do not need the cluster or the data."""
    origin = origin or {}

    def fail(dotted: str, message: str) -> None:
        raise RecipeError(f"{origin.get(dotted, path)}: {dotted}: {message}")

    r = recipe
    if r.task not in TASKS:
        fail("task", f"{r.task!r} is not one of {', '.join(TASKS)}")
    if r.task == "segmentation":
        validate_segmentation(r, fail)
    if not r.model.name.startswith("inception_next_"):
        fail("model.name", f"{r.model.name!r} is not an InceptionNeXt model (inception_next_atto/_tiny/_small/_base)")
    for dotted, value in [("model.drop_path_rate", r.model.drop_path_rate), ("model.head_dropout", r.model.head_dropout),
                          ("augment.label_smoothing", r.augment.label_smoothing)]:
        if not 0.0 <= value < 1.0:
            fail(dotted, f"{value} is outside [0, 1)")
    for dotted, value in [("augment.re_prob", r.augment.re_prob), ("augment.mixup_prob", r.augment.mixup_prob),
                          ("augment.mixup_switch_prob", r.augment.mixup_switch_prob)]:
        if not 0.0 <= value <= 1.0:
            fail(dotted, f"{value} is not a probability in [0, 1]")
    for dotted, value in [("data.train_fraction", r.data.train_fraction), ("data.val_fraction", r.data.val_fraction)]:
        if not 0.0 < value <= 1.0:
            fail(dotted, f"{value} is not a fraction in (0, 1]")
    positive = [("optimizer.lr", r.optimizer.lr), ("optimizer.eps", r.optimizer.eps), ("schedule.epochs", r.schedule.epochs),
                ("batch.global_batch_size", r.batch.global_batch_size), ("batch.per_device_max", r.batch.per_device_max),
                ("data.input_size", r.data.input_size), ("data.crop_pct", r.data.crop_pct), ("model.num_classes", r.model.num_classes),
                ("run.keep_checkpoints", r.run.keep_checkpoints), ("data.partitions", r.data.partitions or 1),
                ("data.shuffle_buffer", r.data.shuffle_buffer)]
    for dotted, value in positive:
        if value <= 0:
            fail(dotted, f"must be positive, got {value}")
    for dotted, value in [("optimizer.weight_decay", r.optimizer.weight_decay), ("schedule.warmup_epochs", r.schedule.warmup_epochs),
                          ("augment.mixup", r.augment.mixup), ("augment.cutmix", r.augment.cutmix),
                          ("data.num_workers", r.data.num_workers), ("scaling.gpus_per_worker", r.scaling.gpus_per_worker),
                          ("schedule.min_lr", r.schedule.min_lr), ("schedule.warmup_lr", r.schedule.warmup_lr)]:
        if value < 0:
            fail(dotted, f"must not be negative, got {value}")
    if len(r.optimizer.betas) != 2 or not all(0 <= b < 1 for b in r.optimizer.betas):
        fail("optimizer.betas", f"expected two values in [0, 1), got {r.optimizer.betas}")
    if r.optimizer.name not in ("adamw", "adam", "sgd", "lamb", "lion"):
        fail("optimizer.name", f"{r.optimizer.name!r} is not one of adamw, adam, sgd, lamb, lion")
    if r.schedule.sched not in ("cosine", "constant", "poly"):
        fail("schedule.sched", f"{r.schedule.sched!r} is not cosine, constant or poly")
    for dotted, value in [("schedule.iterations", r.schedule.iterations), ("run.eval_every_steps", r.run.eval_every_steps),
                          ("run.eval_every_epochs", r.run.eval_every_epochs)]:
        if value is not None and value <= 0:
            fail(dotted, f"must be positive or null, got {value}")
    if r.schedule.warmup_iterations is not None and r.schedule.warmup_iterations < 0:
        fail("schedule.warmup_iterations", f"must not be negative, got {r.schedule.warmup_iterations}")
    if r.ema.decay is not None and not 0 < r.ema.decay < 1:
        fail("ema.decay", f"{r.ema.decay} is outside (0, 1)")
    if r.augment.repeated_aug:
        fail("augment.repeated_aug", "repeated augmentation is not supported by the streaming reader (the paper uses off)")
    if r.data.decode not in ("cpu", "gpu"):
        fail("data.decode", f"{r.data.decode!r} is not cpu or gpu")
    if r.data.decode == "gpu" and r.task != "classification":
        fail("data.decode", "gpu decoding is for classification; segmentation decodes in the workers (cpu)")
    if r.data.decode == "gpu" and r.augment.color_jitter and not r.augment.auto_augment:
        fail("data.decode", "gpu decoding replays RandAugment, not colour jitter; use data.decode: cpu with augment.color_jitter")
    if r.run.precision not in ("auto", "fp32", "bf16"):
        fail("run.precision", f"{r.run.precision!r} is not auto, fp32 or bf16")
    if r.run.checkpoint_overlap not in ("wait", "skip"):
        fail("run.checkpoint_overlap", f"{r.run.checkpoint_overlap!r} is not wait or skip")
    if r.run.dist_bn not in ("reduce", "broadcast", "none"):
        fail("run.dist_bn", f"{r.run.dist_bn!r} is not reduce, broadcast or none")
    if r.run.max_stall_restarts < 0:
        fail("run.max_stall_restarts", f"must be 0 or more, got {r.run.max_stall_restarts}")
    if r.run.stall_timeout_s is not None and r.run.stall_timeout_s <= 0:
        fail("run.stall_timeout_s", f"must be positive or null, got {r.run.stall_timeout_s}")
    unknown = [t for t in r.run.trackers if t not in TRACKERS]
    if unknown:
        fail("run.trackers", f"{unknown} not among {', '.join(TRACKERS)}")
    if r.run.max_steps is not None and r.run.max_steps <= 0:
        fail("run.max_steps", f"must be positive or null, got {r.run.max_steps}")
    if not r.data.train:
        fail("data.train", "no training dataset given")
    if r.data.cache_dir is not None and "://" in r.data.cache_dir:
        fail("data.cache_dir", f"{r.data.cache_dir!r} is a URL; the shard cache is a folder on each node's local disk")
    if r.data.cache_limit_gb is not None and r.data.cache_limit_gb <= 0:
        fail("data.cache_limit_gb", f"must be positive, got {r.data.cache_limit_gb}")
    if not r.run.name or "/" in r.run.name:
        fail("run.name", f"{r.run.name!r} must be a non-empty name without '/'")
    n = r.scaling.num_workers
    if (isinstance(n, list) and not (len(n) == 2 and 0 < n[0] <= n[1])) or (isinstance(n, int) and n <= 0):
        fail("scaling.num_workers", f"expected a positive number or [min, max] with 0 < min <= max, got {n}")
    for world in world_sizes(recipe):
        plan_batch(recipe, world, origin.get("batch.global_batch_size", path))


def validate_segmentation(r: Recipe, fail: Any) -> None:
    """The ``head`` and ``segment`` sections of a ``task: segmentation`` recipe."""
    h, g = r.head, r.segment
    if h.name not in ("upernet", "fpn"):
        fail("head.name", f"{h.name!r} is not upernet or fpn")
    for dotted, value in [("head.channels", h.channels), ("head.neck_channels", h.neck_channels),
                          ("head.aux_channels", h.aux_channels), ("segment.crop_size", g.crop_size),
                          ("segment.test_stride", g.test_stride), ("segment.test_size_divisor", g.test_size_divisor or 1)]:
        if value <= 0:
            fail(dotted, f"must be positive, got {value}")
    if not 0 <= h.dropout < 1:
        fail("head.dropout", f"{h.dropout} is outside [0, 1)")
    if h.aux_weight < 0:
        fail("head.aux_weight", f"must not be negative, got {h.aux_weight}")
    if not h.pool_scales or min(h.pool_scales) <= 0:
        fail("head.pool_scales", f"expected positive sizes, got {h.pool_scales}")
    if len(g.scale) != 2 or min(g.scale) <= 0:
        fail("segment.scale", f"expected [long side, short side], got {g.scale}")
    if len(g.ratio_range) != 2 or not 0 < g.ratio_range[0] <= g.ratio_range[1]:
        fail("segment.ratio_range", f"expected [low, high] with 0 < low <= high, got {g.ratio_range}")
    if not 0 < g.cat_max_ratio <= 1:
        fail("segment.cat_max_ratio", f"{g.cat_max_ratio} is not in (0, 1]")
    if not 0 <= g.ignore_index <= 255:
        fail("segment.ignore_index", f"{g.ignore_index} is not a mask value (0-255)")
    if g.test_mode not in ("whole", "slide"):
        fail("segment.test_mode", f"{g.test_mode!r} is not whole or slide")
    if not g.aug_test_ratios or min(g.aug_test_ratios) <= 0:
        fail("segment.aug_test_ratios", f"expected positive ratios, got {g.aug_test_ratios}")


def uses_mixup(recipe: Recipe) -> bool:
    return recipe.task == "classification" and (recipe.augment.mixup > 0 or recipe.augment.cutmix > 0)
