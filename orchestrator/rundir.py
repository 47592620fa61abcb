"""The run folder, ``<storage>/<name>/``: the one place that knows its layout and its rules.

    config.json            the resolved recipe (secrets redacted)
    status.json            state (running, stopped, finished, failed), launcher, step, heartbeat
    metrics.jsonl          one record per log line: kind train | epoch | stop
    tensorboard/ curves.png
    checkpoints/step-00001234/state.pt + COMMITTED
    model.safetensors, model_ema.safetensors   final weights: their presence means the run is complete

Commit protocol: a checkpoint counts only once its ``COMMITTED`` marker exists, and the marker is
the last thing written. It lists every file of the checkpoint with its size and sha256, so a
partly written or partly copied file can never pass (renames are not atomic on object stores; a
marker that names its contents is). ``committed()`` checks sizes; reading checks the hashes, and
a checkpoint that fails either is skipped, with a warning naming it, for the next older one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import fsspec

from orchestrator import storage, transfer
from orchestrator.errors import CheckpointError

if TYPE_CHECKING:
    from orchestrator.recipe import Recipe

log = logging.getLogger(__name__)

CONFIG, STATUS, METRICS = "config.json", "status.json", "metrics.jsonl"
CHECKPOINTS, MARKER, STATE = "checkpoints", "COMMITTED", "state.pt"
WEIGHTS, EMA_WEIGHTS = "model.safetensors", "model_ema.safetensors"
OUTPUTS = ("tensorboard", "curves.png")  # written by the metrics writer
_STEP_DIR = re.compile(r"step-(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    url: str
    meta: dict[str, Any]  # the marker: step, epoch, metrics, files {name: {size, sha256}}


class RunDir:
    """A run folder in any storage (local path, ``s3://``, ``gs://``, ``file://``)."""

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.options = dict(options or {})

    @classmethod
    def under(cls, storage_url: str, name: str, options: dict[str, Any] | None = None) -> RunDir:
        return cls(storage.join(storage_url, name), options)

    @classmethod
    def of(cls, recipe: Recipe) -> RunDir:
        """The run folder of a recipe: ``<run.storage>/<run.name>``."""
        return cls.under(recipe.run.storage, recipe.run.name, recipe.run.storage_options)

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @cached_property
    def _fs_path(self) -> tuple[fsspec.AbstractFileSystem, str]:
        return storage.filesystem(self.url, self.options)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self._fs_path[0]

    @property
    def path(self) -> str:
        return self._fs_path[1]

    @property
    def is_local(self) -> bool:
        return storage.is_local(self.fs)

    def url_of(self, *parts: str) -> str:
        return storage.join(self.url, *parts)

    def _p(self, *parts: str) -> str:
        return storage.join(self.path, *parts)

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def __repr__(self) -> str:
        return f"RunDir({self.url!r})"

    # --- small files --------------------------------------------------------------------------------
    def write_bytes(self, name: str, data: bytes) -> None:
        self.fs.makedirs(self._p(*name.split("/")[:-1]) if "/" in name else self.path, exist_ok=True)
        with self.fs.open(self._p(name), "wb") as f:
            f.write(data)

    def put_file(self, local_path: str, name: str) -> None:
        self.fs.put_file(local_path, self._p(name))

    def read_bytes(self, name: str) -> bytes | None:
        target = self._p(name)
        return self.fs.cat_file(target) if self.fs.exists(target) else None

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        self.write_bytes(name, json.dumps(data, indent=2).encode())

    def read_json(self, name: str) -> dict[str, Any] | None:
        data = self.read_bytes(name)
        try:
            return json.loads(data) if data else None
        except json.JSONDecodeError:
            return None

    def config(self) -> dict[str, Any] | None:
        """The recipe the run was started with (``config.json``), or None for a folder that is not a run."""
        return self.read_json(CONFIG)

    def records(self) -> list[dict[str, Any]]:
        """Every metrics record (``metrics.jsonl``); a torn last line (a crash mid-write) is ignored."""
        data = self.read_bytes(METRICS)
        out = []
        for line in (data or b"").decode().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def last_record(self) -> dict[str, Any]:
        """The last epoch-end (or stop) record: what the run last evaluated; else its last record of any kind."""
        records = self.records()
        summaries = [r for r in records if r.get("kind") in ("epoch", "stop")]
        return summaries[-1] if summaries else records[-1] if records else {}

    def evaluations(self, every: bool = False) -> dict[str, dict[str, Any]]:
        """``orchestrator.evaluate``'s results saved with the run, by file stem: those of its final weights
        (``eval/<data name>.json``), or with ``every`` also those of other ``--which`` (``<data name>.<which>``)."""
        folder = self._p("eval")
        if not self.fs.exists(folder):
            return {}
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False))
        found = {n.removesuffix(".json"): self.read_json(f"eval/{n}") or {} for n in names if n.endswith(".json")}
        return {n: e for n, e in found.items() if every or e.get("which", "final") == "final"}

    # --- status -------------------------------------------------------------------------------------
    def write_status(self, state: str, **fields: Any) -> None:
        """``status.json``: what ``orchestrator.runs`` and ``--status`` show (running also serves as a heartbeat)."""
        old = self.read_json(STATUS) or {}
        self.write_json(STATUS, {**old, **fields, "state": state, "updated": time.time()})

    def status(self) -> dict[str, Any]:
        return self.read_json(STATUS) or {}

    # --- final weights ------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """A run is complete when its final weights exist (a pipeline stage is then skipped)."""
        return self.fs.exists(self._p(WEIGHTS))

    def final_weights(self) -> str | None:
        """URL of the final weights, EMA first."""
        for name in (EMA_WEIGHTS, WEIGHTS):
            if self.fs.exists(self._p(name)):
                return self.url_of(name)
        return None

    def best_weights(self) -> str | None:
        """What to initialise from or draw maps with: final weights (EMA first), else the newest checkpoint."""
        final = self.final_weights()
        if final:
            return final
        newest = self.latest()
        return newest.url if newest else None

    # --- checkpoints --------------------------------------------------------------------------------
    @property
    def checkpoints_url(self) -> str:
        return self.url_of(CHECKPOINTS)

    def checkpoint_url(self, step: int) -> str:
        return self.url_of(CHECKPOINTS, f"step-{step:08d}")

    def write_checkpoint(self, step: int, files: dict[str, bytes], meta: dict[str, Any],
                         progress: Callable[[], None] | None = None) -> Checkpoint:
        """Write ``files`` into ``checkpoints/step-N/`` (in parallel parts on S3: ``orchestrator.transfer``), then the
        marker that lists them: the commit. ``progress`` is called for every part."""
        folder = self._p(CHECKPOINTS, f"step-{step:08d}")
        self.fs.makedirs(folder, exist_ok=True)
        if self.fs.exists(storage.join(folder, MARKER)):  # a re-run of this step: uncommit before overwriting
            self.fs.rm(storage.join(folder, MARKER))
        listing = {}
        for name, data in files.items():
            transfer.put(storage.join(self.checkpoint_url(step), name), data, self.options, progress)
            listing[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        marker = {**meta, "step": step, "files": listing, "written": time.time()}
        with self.fs.open(storage.join(folder, MARKER), "wb") as f:
            f.write(json.dumps(marker).encode())
        self.fs.invalidate_cache(folder)  # the files went around fsspec: its listings must not hide them
        return Checkpoint(step, self.checkpoint_url(step), marker)

    def committed(self) -> list[Checkpoint]:
        """Every committed checkpoint whose files have the sizes its marker lists, oldest first."""
        root = self._p(CHECKPOINTS)
        self.fs.invalidate_cache(root)  # other processes write here: never a listing cached earlier
        if not self.fs.exists(root):
            return []
        found = []
        for entry in self.fs.ls(root, detail=False):
            m = _STEP_DIR.search(entry.rstrip("/"))
            if not m:
                continue
            checkpoint = self._checked(int(m.group(1)), entry)
            if checkpoint is not None:
                found.append(checkpoint)
        return sorted(found, key=lambda c: c.step)

    def _checked(self, step: int, folder: str) -> Checkpoint | None:
        try:
            meta = json.loads(self.fs.cat_file(storage.join(folder, MARKER)))
            files = meta["files"]
            sizes = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["size"] for e in self.fs.ls(folder, detail=True)}
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            return None  # no marker yet, or one written by an older version without a file list
        if any(sizes.get(name) != entry["size"] for name, entry in files.items()):
            log.warning("checkpoint %s: a file's size differs from its marker (a torn copy); skipped",
                        self.checkpoint_url(step))
            return None
        return Checkpoint(step, self.checkpoint_url(step), meta)

    def latest(self) -> Checkpoint | None:
        found = self.committed()
        return found[-1] if found else None

    def read_checkpoint(self, checkpoint: Checkpoint, name: str = STATE) -> bytes:
        """A file of a committed checkpoint, checked against the sha256 in its marker."""
        try:
            data = transfer.get(storage.join(checkpoint.url, name), self.options)
        except FileNotFoundError as exc:
            raise CheckpointError(f"{checkpoint.url}: {name} is missing") from exc
        expected = checkpoint.meta["files"].get(name, {}).get("sha256")
        if hashlib.sha256(data).hexdigest() != expected:
            raise CheckpointError(f"{checkpoint.url}: {name} does not match the sha256 in its {MARKER} marker")
        return data

    def newest_readable(self, before_read: Callable[[Checkpoint], None] | None = None) -> Iterator[tuple[Checkpoint, bytes]]:
        """Committed checkpoints, newest first, with their verified state; a bad one is skipped, named.
        ``before_read`` may raise CheckpointError for one (the fault injection of the restart tests)."""
        for checkpoint in reversed(self.committed()):
            try:
                if before_read is not None:
                    before_read(checkpoint)
                yield checkpoint, self.read_checkpoint(checkpoint)
            except CheckpointError as exc:
                log.warning("skipping checkpoint %s: %s; trying the next older one", checkpoint.url, exc)

    def prune(self, keep: int) -> None:
        """Delete all but the newest ``keep`` committed checkpoints, and uncommitted leftovers older than them."""
        found = self.committed()
        if not found:
            return
        kept = {c.step for c in found[-keep:]}
        for entry in self.fs.ls(self._p(CHECKPOINTS), detail=False):
            m = _STEP_DIR.search(entry.rstrip("/"))
            if m and int(m.group(1)) not in kept and int(m.group(1)) < max(kept):
                self.fs.rm(entry, recursive=True)

    # --- starting over ------------------------------------------------------------------------------
    def set_aside(self) -> str | None:
        """Move an existing run folder to ``<run>.replaced-<UTC time>`` (for ``--fresh``); nothing is deleted."""
        if not self.exists():
            return None
        target = f"{self.url}.replaced-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        self.fs.mv(self.path, storage.filesystem(target, self.options)[1], recursive=True)
        log.info("--fresh: moved the existing run %s to %s", self.url, target)
        return target

    @staticmethod
    def list(storage_url: str, options: dict[str, Any] | None = None) -> list[RunDir]:
        """The run folders directly under ``storage_url`` (folders with a ``config.json``), by name."""
        fs, path = storage.filesystem(storage_url, options)
        if not fs.exists(path):
            return []
        runs = []
        for entry in sorted(fs.ls(path, detail=False)):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if fs.isdir(entry) and fs.exists(storage.join(entry, CONFIG)):
                runs.append(RunDir(storage.join(storage_url, name), options))
        return runs
