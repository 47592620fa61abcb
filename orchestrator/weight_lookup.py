"""Weights from where users keep them: a run of this project, a checkpoint folder, or a file URL.

Reads the bytes through storage (verified against the commit marker for a checkpoint) and hands
them to ``model.weight_format``, which knows the formats.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from model.weight_format import WeightsError, load_state_dict, state_dict_from_bytes
from orchestrator import storage
from orchestrator.errors import CheckpointError
from orchestrator.rundir import STATE, RunDir


def is_run_name(init: str) -> bool:
    """``model.init`` names a run under ``run.storage`` (no path separator, no file suffix)."""
    return "/" not in init and "." not in init


def resolve_init(init: str, run_storage: str, options: dict[str, Any] | None = None) -> str:
    """``model.init`` as a URL: a run name resolves to its final weights (EMA first) or newest checkpoint."""
    if not is_run_name(init):
        return init
    run = RunDir.under(run_storage, init, options)
    weights = run.best_weights()
    if weights is None:
        raise CheckpointError(f"model.init={init!r}: run {run.url} has no final weights and no checkpoint")
    return weights


def read(url: str, options: dict[str, Any] | None = None) -> tuple[bytes, str]:
    """The bytes of the weights at ``url`` and the file name they came from. A folder is a checkpoint
    (its verified ``state.pt``) or a run (its best weights)."""
    fs, path = storage.filesystem(url, options)
    if fs.isdir(path):
        if fs.exists(storage.join(path, STATE)):
            run_url, _, step = url.rstrip("/").rpartition("/checkpoints/step-")
            run = RunDir(run_url, options)
            checkpoint = next((c for c in run.committed() if f"{c.step:08d}" == step), None)
            if checkpoint is None:
                raise CheckpointError(f"{url}: not a committed checkpoint (no complete marker)")
            return run.read_checkpoint(checkpoint), storage.join(url, STATE)
        best = RunDir(url, options).best_weights()
        if best is None:
            raise CheckpointError(f"{url}: folder holds no checkpoint and no final weights")
        return read(best, options)
    if not fs.exists(path):
        raise CheckpointError(f"{url}: not found")
    return fs.cat_file(path), url


Reader = Callable[[str, "dict[str, Any] | None"], tuple[bytes, str]]  # ``read``, or one that shares rank 0's read


def state_dict(url: str, options: dict[str, Any] | None = None, reader: Reader = read) -> tuple[dict[str, torch.Tensor], str]:
    data, name = reader(url, options)
    try:
        return state_dict_from_bytes(data, name)
    except WeightsError as exc:
        raise CheckpointError(str(exc)) from exc


def load_into(model: torch.nn.Module, url: str, options: dict[str, Any] | None = None,
              load: Callable[[Any, dict[str, torch.Tensor], str], str] = load_state_dict, reader: Reader = read) -> str:
    """Load the weights at ``url`` into ``model`` with ``load`` (default: strict, a classifier of another size
    re-initialised; segmentation passes ``model.segmentation.load_pretrained``)."""
    sd, what = state_dict(url, options, reader)
    try:
        return load(model, sd, what)
    except WeightsError as exc:
        raise CheckpointError(str(exc)) from exc
