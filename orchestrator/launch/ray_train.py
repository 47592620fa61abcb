"""Ray Train (V2) launcher: a job's function on every worker of a TorchTrainer; metrics reported to Ray.

Checkpoints are not handed to Ray: rank 0 commits them into the run folder itself (``RunDir``),
exactly as under every other launcher, so Ray never holds a view of them that pruning or a
partial copy could make stale, and a run moves freely between Ray, Slurm and local. A restarted
worker group resumes from the run folder's newest verified checkpoint. Re-running with the same
``run.name`` and ``run.storage`` resumes; ``--fresh`` starts over.

Rank 0's value comes back through a scratch folder of the job's own under ``run.storage``
(``.launch-<id>/``, removed after), which the driver reads. Ray's own INFO lines go to the session's
log files (``/tmp/ray/session_*/logs``): the driver and ``ray job logs`` show the run's header, one
line per epoch from rank 0 and the summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pickle
import signal
import socket
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.execution import context as ray_train_context
from ray.train.v2.api.config import LoggingConfig
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator import faults, logs, storage
from orchestrator.errors import OrchestratorError, RecipeError
from orchestrator.launch.distributed import collective_timeout, share_host_cores
from orchestrator.launch.job import Job
from orchestrator.recipe import SECRETS_ENV, Recipe, absolute_paths, from_dict, secret_options
from orchestrator.train.context import Rank, StopRequested
from orchestrator.train.stop import StopSignals, interrupted

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class StopRelay:
    """Carries the driver's SIGTERM/SIGINT to the workers, whose loop runs in a thread no signal reaches."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def request(self, signum: int) -> None:
        self.signum = self.signum or signum

    def requested(self) -> int | None:
        return self.signum


@dataclasses.dataclass(frozen=True)
class Stopped:
    """What rank 0 sends back when the driver's relayed stop ended its job: the step and checkpoint it stopped at."""

    step: int
    url: str


def ray_rank(recipe: Recipe, relay: str | None) -> Rank:
    """This Ray Train worker's rank, device and node; stop requests come from the driver's ``relay``."""
    tctx = ray.train.get_context()
    device = ray.train.torch.get_device() if recipe.scaling.gpus_per_worker > 0 else torch.device("cpu")
    rank = Rank(rank=tctx.get_world_rank(), world_size=tctx.get_world_size(), local_rank=tctx.get_local_rank(),
                device=device, launcher="ray", node=ray.get_runtime_context().get_node_id()[:12],
                relayed=(lambda: stop_relayed(relay)) if relay else None, report=_report)
    share_host_cores(rank)
    return rank


def _report(metrics: dict[str, Any]) -> None:
    ray.train.report({k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool)})


def worker(config: dict[str, Any]) -> None:
    """Every Ray Train worker: rebuild the recipe, make the rank, run the job's function; rank 0 leaves its value
    in the scratch folder. (The function and its args travel as pickled bytes, unpickled only here: Ray Train's
    controller unpickles this config and needs none of what they import.)"""
    logs.setup()
    # Ray logs every report at INFO under a logger named by its file path, outside "ray.train" where
    # LoggingConfig would hold it back; the metrics are in metrics.jsonl already.
    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)
    faults.configure(config.get("fault"))
    recipe = from_dict(config["recipe"])
    fn, args = pickle.loads(config["job"])
    relay = config.get("relay")
    rank = ray_rank(recipe, relay)
    try:
        with sigterm_stops(rank.stop) if config["resumable"] else contextlib.nullcontext():
            value = fn(recipe, rank, *args)
    except StopRequested as stopped:
        # Every rank stops at the same step, checkpointed. A driver's request ends the run (the driver says
        # where it resumes); a worker's own SIGTERM (a node drain, a spot notice) is a failure of this worker
        # group, which Ray restarts from that checkpoint while max_failures lasts.
        if relay is None or not stop_relayed(relay):
            raise interrupted(rank.stop.received or signal.SIGTERM, stopped.step, stopped.url) from None
        value = Stopped(stopped.step, stopped.url)
    if rank.is_main:
        fs, path = storage.filesystem(config["scratch"], recipe.run.storage_options)
        fs.makedirs(path, exist_ok=True)
        fs.pipe_file(f"{path}/value.pkl", pickle.dumps(value))


@contextlib.contextmanager
def sigterm_stops(stop: StopSignals) -> Iterator[None]:
    """While training, a SIGTERM to this Ray worker process is a graceful stop request.

    The loop runs in a thread, where no handler can be installed; the process's main thread has
    Ray's handler, which calls ``raise_sys_exit_with_custom_error_message`` (looked up in
    ``ray._private.worker`` at call time) to exit at once. The first SIGTERM is routed to ``stop``
    instead; a second one exits as Ray would, and so does any after training (Ray's own shutdown).
    """
    import ray._private.worker as ray_worker

    exit_now = ray_worker.raise_sys_exit_with_custom_error_message

    def on_sigterm(message: str, exit_code: int = 1) -> None:
        if stop.received is not None:
            exit_now(message, exit_code)
        stop.request(signal.SIGTERM)
        log.warning("this Ray worker got SIGTERM: stopping at the next step to checkpoint it (a second one stops at once)")

    ray_worker.raise_sys_exit_with_custom_error_message = on_sigterm
    try:
        yield
    finally:
        ray_worker.raise_sys_exit_with_custom_error_message = exit_now


class StorageHandler(pafs.FSSpecHandler):
    """fsspec storage for Ray, pickled with its secrets redacted.

    Ray ships the storage filesystem to its controller and Tune saves it in its experiment state
    (``tuner.pkl``, in storage); an fsspec filesystem pickles its credentials. This one pickles
    ``(url, options)`` with ``***`` for secrets, filled back in from ``SECRETS_ENV`` where it is opened.
    """

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self.url, self.options = url, options
        super().__init__(storage.filesystem(url, options)[0])

    def __reduce__(self) -> tuple[Any, tuple[str, dict[str, Any]]]:
        return _reopen, (self.url, storage.redacted_options(self.options))


def _reopen(url: str, options: dict[str, Any]) -> StorageHandler:
    return StorageHandler(url, storage.fill_secrets(options, json.loads(os.environ.get(SECRETS_ENV) or "{}").get("run", {}))[0])


def storage_for_ray(url: str, options: dict[str, Any]) -> tuple[str, pafs.FileSystem | None]:
    """Ray's ``storage_path``/``storage_filesystem`` for a URL (fsspec-backed, so endpoints and credentials apply)."""
    fs, path = storage.filesystem(url, options)
    if storage.is_local(fs):
        return os.path.abspath(path), None
    return path, pafs.PyFileSystem(StorageHandler(url, options))


def job_environment(job: Job) -> dict[str, str]:
    """What ``job``'s Ray processes need from this driver's environment: ``job.env`` and the storage secrets."""
    return {**job.env, **secret_environment(job.recipe)}


def secret_environment(recipe: Recipe) -> dict[str, str]:
    """``SECRETS_ENV`` for the recipe's inline storage secrets, to go into the Ray job's environment."""
    secrets = secret_options(recipe)
    return {SECRETS_ENV: json.dumps(secrets)} if any(secrets.values()) else {}


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"  # the GCS port of a cluster ray.init starts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connect(env_vars: dict[str, str] | None = None) -> None:
    """Attach to the cluster of this Ray job (or ``RAY_ADDRESS``); otherwise start a local one on 127.0.0.1.

    ``env_vars`` go into the environment of every process of this driver's job (Tune's trial actors
    included); inside ``ray job submit`` the job's own environment holds them or nothing does.
    The local cluster gets its dashboard: Ray Train's placement-group cleaner asks the state API
    (served by the dashboard) whether the controller is alive, and without it warns every few
    seconds; Tune's stopped trials also kept their placement groups without it (Ray 2.60). Its job runs
    without Ray Train's preemption watcher, an actor per run (about 1 s of a laptop's start, measured by
    ``bench/orchestration_overhead.py``) that waits for drain notices no local node gets; a value in this
    driver's environment still wins, as Ray Train forwards it to its controller.
    """
    if env_vars:
        _check_job_environment(env_vars)
        os.environ.update(env_vars)  # this driver opens what its job's processes open
    if not sys.stdout.isatty():  # workers' lines reach a file or a pipe: no colour codes around their prefixes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, runtime_env={"env_vars": env_vars} if env_vars else None)
    else:
        # Ray turns token authentication on for a cluster it starts and warns that it did; on our own
        # 127.0.0.1 cluster that is the right default, so the warning is held back for this call.
        auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
        level = auth.level
        auth.setLevel(logging.ERROR)
        # Its address, chosen here and handed to every process of the run (Ray Train's placement-group cleaner
        # asks the state API, which otherwise looks for "the" cluster on this machine and fails where another
        # runs beside it: a second experiment, the test suite).
        gcs = f"127.0.0.1:{free_port()}"
        os.environ[GCS_PORT_ENV] = gcs.rsplit(":", 1)[1]
        try:
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=True, logging_level=logging.WARNING,
                     runtime_env={"env_vars": {PREEMPTION_WATCHER_ENV: "0", "RAY_ADDRESS": gcs, **(env_vars or {})}})
        finally:
            auth.setLevel(level)
            os.environ.pop(GCS_PORT_ENV, None)
        os.environ["RAY_ADDRESS"] = gcs  # this driver's own state-API calls
    logs.setup()  # ray.init configures the "ray" logger; hold it at WARNING again


def _check_job_environment(env_vars: dict[str, str]) -> None:
    """Secrets go into the environment of this driver's Ray job, which is fixed once the job runs (inside
    ``ray job submit``, or after ``ray.init``): refuse, naming the keys, when they are not already there."""
    if not (ray.is_initialized() or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ):
        return
    if all(os.environ.get(k) == v for k, v in env_vars.items()):
        return
    keys = [f"{section}.storage_options.{k}" for section, opts in json.loads(env_vars.get(SECRETS_ENV, "{}")).items()
            for k in opts] or sorted(env_vars)
    raise RecipeError(f"{', '.join(keys)}: secrets reach Ray's processes only through the job's environment, fixed "
                      f"when the job was submitted; submit with --runtime-env-json '{{\"env_vars\": {{\"{SECRETS_ENV}\": "
                      "...}}' or give credentials as AWS_* variables there instead of in the recipe")


def _job_working_dir() -> str | None:
    """The uploaded ``--working-dir`` of the Ray job this driver runs in, if any (a temporary copy)."""
    return (ray.get_runtime_context().runtime_env or {}).get("working_dir")


def check_storage(url: str, key: str = "run.storage") -> None:
    """Inside ``ray job submit --working-dir`` a relative local path points into the job's temporary
    copy of the project and vanishes with it: refuse it, naming the key."""
    if _job_working_dir() and storage.is_local(storage.filesystem(url)[0]) and not os.path.isabs(url.removeprefix("file://")):
        raise RecipeError(f"{key}={url!r} is relative, which inside a Ray job means the job's temporary copy of "
                          "--working-dir; give an absolute path on shared disk or an s3:// / gs:// URL")


def with_absolute_paths(recipe: Recipe) -> Recipe:
    """Workers run elsewhere (another cwd, maybe another node): local paths are made absolute here."""
    check_storage(recipe.run.storage)
    return absolute_paths(recipe)


class Trainer(TorchTrainer):
    """A TorchTrainer whose ``fit()`` leaves SIGINT to the driver's ``StopSignals``: Ray Train's own handler aborts
    the run's controller at once (workers killed, no checkpoint at the stop, ``status.json`` left running), where
    Ctrl-C must stop at the next step with a checkpoint, as on every launcher."""

    def _register_sigint_handler(self, controller: Any) -> None:
        return None


def trainer(job: Job, recipe: Recipe, name: str, scratch: str, relay: str | None,
            callbacks: list[ray.train.UserCallback] | None = None) -> Trainer:
    """A TorchTrainer running ``job`` for ``recipe`` (paths already absolute) as Ray run ``name``: workers and
    resources from ``scaling``; ``relay`` names the driver's StopRelay actor; rank 0's value goes to ``scratch``."""
    s = recipe.scaling
    storage_path, filesystem = storage_for_ray(recipe.run.storage, recipe.run.storage_options)
    gpus = {"GPU": s.gpus_per_worker} if s.gpus_per_worker else {}
    workers = s.num_workers
    if isinstance(workers, list):  # an elastic range: a run keeps it; any other job takes the largest
        workers = tuple(workers) if job.resumable else workers[-1]
    # The recipe goes redacted; secrets are in the job's environment (``connect(secret_environment(...))``).
    config = {"recipe": recipe.to_dict(redact=True), "fault": os.environ.get(faults.ENV), "relay": relay,
              "job": ray.cloudpickle.dumps((job.fn, job.args)),
              "resumable": job.resumable, "scratch": scratch}
    return Trainer(
        worker,
        torch_config=TorchConfig(timeout_s=int(collective_timeout(recipe).total_seconds())),
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, elastic_resize_monitor_interval_s=s.resize_check_s,
                                     use_gpu=s.gpus_per_worker > 0, resources_per_worker={"CPU": s.cpus_per_worker, **gpus}),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=s.max_failures), callbacks=callbacks,
                             logging_config=LoggingConfig(log_level="WARNING")),
    )


def run(job: Job, callbacks: list[ray.train.UserCallback] | None = None, relay: str | None = None) -> Any:
    """``job`` on the Ray cluster (this job's, ``RAY_ADDRESS``'s or a new local one); rank 0's value.

    A resumable job is Ray run ``job.name`` (its state beside the run), any other a scratch run removed after.
    SIGTERM or Ctrl-C to this driver: the workers of a resumable job checkpoint at the next step and return,
    then Interrupted says where it resumes; a second signal stops at once. Inside a Tune trial, ``relay`` is the
    sweep driver's and ``callbacks`` report to Tune."""
    connect(job_environment(job))
    recipe = with_absolute_paths(job.recipe)
    if job.setup is not None:
        job.setup()
    scratch_name = f".launch-{uuid.uuid4().hex[:12]}"
    scratch = storage.join(recipe.run.storage, scratch_name)
    name = job.cluster_name if job.resumable else scratch_name
    fs, path = storage.filesystem(scratch, recipe.run.storage_options)
    try:
        with contextlib.nullcontext((relay, None)) if relay else relayed_stop() as (relay_name, stop):
            result = trainer(job, recipe, name, scratch, relay_name, callbacks).fit()
        if result.error:
            raise cause(result.error)
        try:
            value = pickle.loads(fs.cat_file(f"{path}/value.pkl"))
        except FileNotFoundError:
            raise OrchestratorError(f"the Ray job {name} ended without rank 0's value in {scratch}; see its log") from None
    finally:
        with contextlib.suppress(OSError):
            fs.rm(path, recursive=True)
    if isinstance(value, Stopped):
        raise interrupted(stop.received if stop else stop_relayed(relay_name), value.step, value.url)
    return value


@contextlib.contextmanager
def relayed_stop() -> Iterator[tuple[str, StopSignals]]:
    """While open, this driver's SIGTERM/SIGINT is a graceful stop request relayed to its workers: yields the name
    of the ``StopRelay`` they poll (``Rank.relayed``, asked by ``TrainContext.poll_stop``) and the driver's
    ``StopSignals``."""
    name = f"stop-relay-{uuid.uuid4().hex}"
    # On the driver's node: the relay must not go down with a worker node (elastic runs lose nodes).
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    relay = StopRelay.options(name=name, scheduling_strategy=here).remote()
    stop = StopSignals(relay=lambda signum: relay.request.remote(signum)).install()
    try:
        yield name, stop
    finally:
        stop.restore()
        ray.kill(relay)


def stop_relayed(relay: str) -> int | None:
    """The signal the driver behind ``relay`` relayed, if any (asked from a worker or a Tune trial)."""
    return ray.get(ray.get_actor(relay).requested.remote(), timeout=30)


def cause(error: BaseException) -> BaseException:
    """The worker's own OrchestratorError inside Ray's wrappers (so the CLI prints one line), else ``error``."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OrchestratorError):
            return seen
        seen = seen.__cause__ or getattr(seen, "cause", None) or next(
            (e for e in getattr(seen, "worker_failures", {}).values() if isinstance(e, BaseException)), None)
    return error
