"""Experiment trackers beside metrics.jsonl: MLflow and Weights & Biases (``run.trackers``; TensorBoard, the
default, is written by ``MetricsWriter`` itself).

Rank 0 only. The resolved recipe (secrets redacted, as in config.json) goes as parameters; every record the
loop logs (train, epoch, stop, evaluation) as metrics at its step; launcher, world size, code version and the
run folder's URL as tags; ``curves.png`` and ``config.json`` as artifacts at the end (the final weights only
with ``run.tracker_weights``). The tracker's run id is kept in the run folder (``trackers.json``), so a resumed
run continues the same tracker run on any launcher. A sweep or a pipeline writes ``{"parent": ...}`` into each
child's ``trackers.json`` before it starts (``set_parent``): MLflow nests the child under the parent run,
W&B groups it.

A tracker never stops or slows training: each runs on its own daemon thread behind a bounded queue; what does
not fit is dropped, a failure is warned once and the call retried with backoff (``Background``), and everything
is in metrics.jsonl anyway. At the end the thread gets ``CLOSE_TIMEOUT_S`` plus the artifacts' upload time to
drain, then is left behind, the tracker run's status ended all the same. Secrets never reach a tracker: the
recipe goes redacted, W&B sees the command line redacted, warnings are redacted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from orchestrator import __version__, storage
from orchestrator.recipe import Recipe
from orchestrator.rundir import RunDir

log = logging.getLogger(__name__)
TRACKERS = "trackers.json"
QUEUE_SIZE = 10_000  # calls waiting for one tracker; more are dropped
CLOSE_TIMEOUT_S = 30.0
DRAIN_MB_S = 10.0  # the artifact upload rate the end of a run waits for, on top of CLOSE_TIMEOUT_S
RETRY_AFTER_S = 60.0  # the longest wait before a failed call is tried again
NOT_METRICS = ("epoch", "step", "time", "samples_digest")
ROOT = Path(__file__).resolve().parents[2]
MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED"}  # a stopped run is KILLED (resumable)


def code_version() -> str:
    """The checkout's commit when there is one (``git describe``), else the package version."""
    try:
        done = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=10)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"optimizer": {"lr": 1e-3}}`` -> ``{"optimizer.lr": "0.001"}`` (MLflow parameters are strings)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list | dict | bool) or value is None else str(value)
    return out


def uses_trackers(recipe: Recipe) -> bool:
    return bool(set(recipe.run.trackers) - {"tensorboard"})


def job_environment(recipe: Recipe) -> dict[str, str]:
    """The ``MLFLOW_*`` and ``WANDB_*`` settings of this shell, for the environment of a Ray job's workers
    (which do not inherit the driver's): the tracking URI, W&B's mode and key. Readable by whoever can read
    the cluster's state, as all of a job's environment is (see README, Security)."""
    if not uses_trackers(recipe):
        return {}
    return {k: v for k, v in os.environ.items() if k.startswith(("MLFLOW_", "WANDB_"))}


def open_parent(recipe: Recipe, folder: RunDir, name: str, job_type: str) -> dict[str, Any] | None:
    """The parent of a sweep's trials or a pipeline's stages: an MLflow run they nest under (its id kept in
    ``folder/trackers.json``, so continuing the sweep or pipeline reuses it) and a W&B group. Returns what
    ``set_parent`` gives each child (None without trackers); a tracker that is down is warned about and left out."""
    if not uses_trackers(recipe):
        return None
    parent: dict[str, Any] = {"group": name, "job_type": job_type}
    if "mlflow" not in recipe.run.trackers:
        return parent
    ids = folder.read_json(TRACKERS) or {}
    try:
        client = MlflowTracker.client(recipe)
        run_id = ids.get("mlflow")
        if run_id is None:
            run_id = client.create_run(MlflowTracker.experiment_id(client, recipe), run_name=name,
                                       tags={"kind": job_type, "code_version": code_version()}).info.run_id
            folder.write_json(TRACKERS, {**ids, "mlflow": run_id})
        else:
            client.update_run(run_id, status="RUNNING")
        parent["mlflow"] = run_id
    except Exception as exc:  # noqa: BLE001 - the children still run, and still log, unnested
        log.warning("MLflow: no parent run for %s (%s: %s); its runs are logged without one", name,
                    type(exc).__name__, storage.redact(str(exc))[:300])
    return parent


def close_parent(recipe: Recipe, parent: dict[str, Any], state: str) -> None:
    """End the parent run as ``state`` (finished, stopped or failed): by the sweep or pipeline that opened it, or,
    for Slurm pipelines whose stages run later in their own jobs, by the child whose end is the pipeline's
    (``ends_parent_on`` in its ``parent``: every stage's failure, the last stage's finish)."""
    if "mlflow" in parent:
        try:
            MlflowTracker.client(recipe).set_terminated(parent["mlflow"], MLFLOW_STATUS.get(state, "KILLED"))
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow: could not end the parent run (%s)", storage.redact(str(exc))[:300])


def set_parent(run: RunDir, parent: dict[str, Any]) -> None:
    """Before a child run starts (a sweep's trial, a pipeline's stage): its tracker runs go under ``parent``
    (``open_parent``); a run that already has tracker runs keeps them."""
    ids = run.read_json(TRACKERS) or {}
    run.write_json(TRACKERS, {**ids, "parent": parent})


class Background:
    """One tracker's calls, in order, on a daemon thread behind a bounded queue. A call that fails is warned
    once and tried again (after 2, 4, ... up to ``RETRY_AFTER_S`` seconds) until it goes through, its successors
    queued behind it, so a server that is down when the run starts, or for a while, loses nothing that fits the
    queue. Once closing, a call that fails ends the thread (the rest is in metrics.jsonl)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = queue.Queue(QUEUE_SIZE)
        self.failed = self.dropped = False
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"tracker-{name}", daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self.calls.put_nowait((fn, args))
        except queue.Full:
            if not self.dropped:
                log.warning("tracker %s is behind (%d calls waiting): dropping what does not fit; metrics.jsonl has "
                            "every record", self.name, QUEUE_SIZE)
            self.dropped = True

    def _run(self) -> None:
        while (item := self.calls.get()) is not None:
            fn, args = item
            wait, last_try = 2.0, False
            while True:
                try:
                    fn(*args)
                    break
                except Exception as exc:  # noqa: BLE001 - a tracker never takes training down
                    if not self.failed:
                        log.warning("tracker %s failed (%s: %s); training goes on, metrics.jsonl has every record; "
                                    "retrying (warned once)", self.name, type(exc).__name__,
                                    storage.redact(str(exc))[:300])
                    self.failed = True
                    if last_try:  # closing, and it failed once more: give up
                        return
                    last_try = self.closing.is_set() or self.closing.wait(wait)
                    wait = min(2 * wait, RETRY_AFTER_S)

    def close(self, timeout: float) -> bool:
        """Let the queue drain for ``timeout`` seconds; whether it did."""
        deadline = time.monotonic() + timeout
        self.closing.set()
        with contextlib.suppress(queue.Full):  # a full queue of a dead tracker: the join below times out
            self.calls.put(None, timeout=timeout)
        self.thread.join(max(deadline - time.monotonic(), 0))
        if self.thread.is_alive():
            log.warning("tracker %s still sending after %.0f s: left behind (metrics.jsonl has every record)",
                        self.name, timeout)
        return not self.thread.is_alive()


class Trackers:
    """Rank 0's MLflow / W&B trackers for one attempt of a run; ``log`` every record, ``finish`` at the end."""

    def __init__(self, recipe: Recipe, run: RunDir, launcher: str, world_size: int, local_dir: Path) -> None:
        self.recipe, self.run = recipe, run
        self._lock = threading.Lock()
        ids = run.read_json(TRACKERS) or {}
        tags = {"launcher": launcher, "world_size": str(world_size), "code_version": code_version(),
                "run_url": storage.redact(run.url), "task": recipe.task, "model": recipe.model.name}
        backends: dict[str, Any] = {"mlflow": MlflowTracker, "wandb": WandbTracker}  # defined below
        self.active = [(backends[name](recipe, ids, tags, self._save_id, local_dir), Background(name))
                       for name in dict.fromkeys(recipe.run.trackers) if name in backends]
        for tracker, background in self.active:
            background.submit(tracker.start)

    def _save_id(self, name: str, value: str) -> None:
        with self._lock:
            ids = self.run.read_json(TRACKERS) or {}
            self.run.write_json(TRACKERS, {**ids, name: value})

    def log(self, record: dict[str, Any]) -> None:
        if record.get("kind") == "resume":
            return
        metrics = {k: float(v) for k, v in record.items()
                   if isinstance(v, int | float) and not isinstance(v, bool) and k not in NOT_METRICS}
        for tracker, background in self.active:
            background.submit(tracker.log, metrics, int(record["step"]))

    def finish(self, state: str, files: dict[str, bytes]) -> None:
        """``state``: finished, stopped or failed; ``files`` (curves.png, config.json, weights) as artifacts. The
        drain gets ``CLOSE_TIMEOUT_S`` plus the artifacts' upload at ``DRAIN_MB_S``; a tracker left behind has its
        run's status ended from here all the same, and the staged files are left to it."""
        staged = Path(tempfile.mkdtemp(prefix="inceptionnext-artifacts-"))
        for name, data in files.items():
            (staged / name).write_bytes(data)
        for tracker, background in self.active:
            if files:
                background.submit(tracker.artifacts, [staged / name for name in files])
            background.submit(tracker.finish, state)
        timeout = CLOSE_TIMEOUT_S + sum(map(len, files.values())) / (DRAIN_MB_S * 1e6)
        drained = True
        for tracker, background in self.active:
            if not background.close(timeout):
                drained = False
                tracker.end_status(state)
        if drained:
            shutil.rmtree(staged, ignore_errors=True)


@contextlib.contextmanager
def redacted_argv() -> Iterator[None]:
    """``sys.argv`` with every known secret as ``***`` for the duration (a ``--set`` may carry one)."""
    argv = sys.argv[:]
    sys.argv[:] = [storage.redact(a) for a in argv]
    try:
        yield
    finally:
        sys.argv[:] = argv


class MlflowTracker:
    """An MLflow run in experiment ``run.experiment`` on ``run.tracking_uri`` (else ``MLFLOW_TRACKING_URI``)."""

    def __init__(self, recipe: Recipe, ids: dict[str, Any], tags: dict[str, str], save_id: Callable[[str, str], None],
                 local_dir: Path) -> None:
        self.recipe, self.ids, self.tags, self.save_id = recipe, ids, tags, save_id
        self.run_id: str | None = ids.get("mlflow")

    @staticmethod
    def client(recipe: Recipe) -> Any:
        from mlflow.tracking import MlflowClient

        # A server that is down costs seconds per call, not MLflow's minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        return MlflowClient(tracking_uri=recipe.run.tracking_uri)

    @staticmethod
    def experiment_id(client: Any, recipe: Recipe) -> str:
        """``run.experiment``'s id, the experiment made when it does not exist yet."""
        found = client.get_experiment_by_name(recipe.run.experiment)
        return found.experiment_id if found else client.create_experiment(recipe.run.experiment)

    def start(self) -> None:
        from mlflow.entities import Param, RunTag

        self.mlflow = MlflowTracker.client(self.recipe)
        parent = (self.ids.get("parent") or {}).get("mlflow")
        tags = {**self.tags, **({"mlflow.parentRunId": parent} if parent else {})}
        if self.run_id is not None:  # resumed (a run started alone and continued by a pipeline nests now)
            self.mlflow.update_run(self.run_id, status="RUNNING")
            self.mlflow.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            return
        run = self.mlflow.create_run(MlflowTracker.experiment_id(self.mlflow, self.recipe), run_name=self.recipe.run.name,
                                     tags=tags)
        self.run_id = run.info.run_id
        self.save_id("mlflow", self.run_id)
        params = [Param(k, v[:6000]) for k, v in flatten(self.recipe.to_dict(redact=True)).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a batch
            self.mlflow.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.mlflow.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            self.mlflow.log_artifact(self.run_id, str(path))

    def finish(self, state: str) -> None:
        self.mlflow.set_terminated(self.run_id, MLFLOW_STATUS.get(state, "KILLED"))
        parent = self.ids.get("parent") or {}
        if state in parent.get("ends_parent_on", ()):
            close_parent(self.recipe, parent, state)

    def end_status(self, state: str) -> None:
        """The run's final status from outside its thread (left behind, uploading): never left RUNNING."""
        if self.run_id is not None:
            try:
                MlflowTracker.client(self.recipe).set_terminated(self.run_id, MLFLOW_STATUS.get(state, "KILLED"))
            except Exception as exc:  # noqa: BLE001
                log.warning("MLflow: could not end run %s (%s)", self.run_id, storage.redact(str(exc))[:300])


class WandbTracker:
    """A W&B run in project ``run.experiment`` (``WANDB_MODE=offline`` keeps it on disk until ``wandb sync``)."""

    def __init__(self, recipe: Recipe, ids: dict[str, Any], tags: dict[str, str], save_id: Callable[[str, str], None],
                 local_dir: Path) -> None:
        self.recipe, self.ids, self.tags, self.save_id, self.dir = recipe, ids, tags, save_id, local_dir

    def start(self) -> None:
        import wandb

        run_id = self.ids.get("wandb") or uuid.uuid4().hex[:12]
        parent = self.ids.get("parent") or {}
        self.dir.mkdir(parents=True, exist_ok=True)
        with redacted_argv():  # W&B records the command line in its metadata
            self.wb = wandb.init(project=self.recipe.run.experiment, name=self.recipe.run.name, id=run_id, resume="allow",
                                 config=self.recipe.to_dict(redact=True), tags=[self.tags["launcher"], self.recipe.task],
                                 group=parent.get("group"), job_type=parent.get("job_type"), dir=str(self.dir),
                                 settings=wandb.Settings(console="off", silent=True))
        self.wb.config.update({"tracker_tags": self.tags}, allow_val_change=True)
        self.wb.define_metric("step")
        self.wb.define_metric("*", step_metric="step")  # our step, not W&B's own: resumed runs log steps again
        if "wandb" not in self.ids:
            self.save_id("wandb", run_id)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.wb.log({**metrics, "step": step})

    def artifacts(self, paths: list[Path]) -> None:
        import wandb

        outputs = wandb.Artifact(f"{self.recipe.run.name}-outputs", type="run-outputs")
        for path in paths:
            outputs.add_file(str(path), name=path.name)  # copied: the staged files go when this returns
        self.wb.log_artifact(outputs)

    def finish(self, state: str) -> None:
        self.wb.finish(exit_code=0 if state in ("finished", "stopped") else 1)

    def end_status(self, state: str) -> None:
        """W&B's run belongs to its thread, which ends it (``wandb sync`` finishes an offline one)."""
