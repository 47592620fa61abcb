"""Checkpoints in any storage, written so that a crash never leaves a newer-looking broken one.

Layout: ``<run>/checkpoints/step-00001234/state.pt`` then ``COMMITTED`` (a small JSON), written last.
Only committed checkpoints count as ``latest``; rename is not atomic on object stores, a marker is.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from typing import Any

import torch

from orchestrator.data import storage
from orchestrator.errors import CheckpointError

log = logging.getLogger(__name__)
MARKER = "COMMITTED"
STATE = "state.pt"
_STEP_DIR = re.compile(r"step-(\d+)$")


def step_dir(checkpoints_url: str, step: int) -> str:
    return storage.join(checkpoints_url, f"step-{step:08d}")


def save(url: str, state: dict[str, Any], meta: dict[str, Any], options: dict[str, Any] | None = None) -> None:
    """Write ``state`` (tensors and plain values only) into the folder ``url``, then its commit marker."""
    fs, path = storage.filesystem(url, options)
    fs.makedirs(path, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with fs.open(storage.join(path, STATE), "wb") as f:
        f.write(buffer.getvalue())
    with fs.open(storage.join(path, MARKER), "wb") as f:
        f.write(json.dumps(meta).encode())


def load(url: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The state written by ``save`` (weights-only unpickling: tensors and plain containers)."""
    fs, path = storage.filesystem(url, options)
    if not fs.exists(storage.join(path, MARKER)):
        raise CheckpointError(f"{url}: checkpoint has no {MARKER} marker (it was never completely written)")
    data = fs.cat_file(storage.join(path, STATE))
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def committed(checkpoints_url: str, options: dict[str, Any] | None = None) -> list[tuple[int, str]]:
    """(step, url) of every committed checkpoint, oldest first."""
    fs, path = storage.filesystem(checkpoints_url, options)
    if not fs.exists(path):
        return []
    found = []
    for entry in fs.ls(path, detail=False):
        m = _STEP_DIR.search(entry.rstrip("/"))
        if m and fs.exists(storage.join(entry, MARKER)):
            found.append((int(m.group(1)), storage.join(checkpoints_url, m.group(0))))
    return sorted(found)


def latest(checkpoints_url: str, options: dict[str, Any] | None = None) -> str | None:
    found = committed(checkpoints_url, options)
    return found[-1][1] if found else None


def prune(checkpoints_url: str, keep: int, options: dict[str, Any] | None = None) -> None:
    """Delete all but the newest ``keep`` committed checkpoints, and uncommitted leftovers older than them."""
    found = committed(checkpoints_url, options)
    fs, path = storage.filesystem(checkpoints_url, options)
    for _, url in found[:-keep]:
        fs.rm(storage.filesystem(url, options)[1], recursive=True)
    newest = found[-1][0] if found else None
    for entry in fs.ls(path, detail=False):
        m = _STEP_DIR.search(entry.rstrip("/"))
        if m and newest is not None and int(m.group(1)) < newest and not fs.exists(storage.join(entry, MARKER)):
            log.info("removing uncommitted checkpoint %s", entry)
            fs.rm(entry, recursive=True)


def set_aside(run_url: str, options: dict[str, Any] | None = None) -> str | None:
    """Move an existing run folder to ``<run>.replaced-<UTC time>`` (for ``--fresh``); nothing is deleted."""
    fs, path = storage.filesystem(run_url, options)
    if not fs.exists(path):
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = f"{run_url.rstrip('/')}.replaced-{stamp}"
    fs.mv(path, storage.filesystem(target, options)[1], recursive=True)
    log.info("--fresh: moved the existing run %s to %s", run_url, target)
    return target
