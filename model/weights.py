"""Load weights into a model from any source users have.

Sources: a checkpoint directory of this project (``state.pt``), a run (its final weights), a
safetensors file, or a ``.pth``/``.pt`` file (official InceptionNeXt release, plain timm state dict,
or one nested under ``model``/``state_dict``/``model_ema``). Never unpickles arbitrary objects:
``torch.load(weights_only=True)`` or safetensors only. EMA weights are preferred when present.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from orchestrator.data import storage
from orchestrator.errors import CheckpointError

log = logging.getLogger(__name__)
EMA_KEYS = ("ema", "model_ema", "state_dict_ema")
MODEL_KEYS = ("model", "state_dict", "module")
FINAL_WEIGHTS = ("model_ema.safetensors", "model.safetensors")


def read_bytes(url: str, options: dict[str, Any] | None = None) -> bytes:
    fs, path = storage.filesystem(url, options)
    if not fs.exists(path):
        raise CheckpointError(f"{url}: not found")
    return fs.cat_file(path)


def state_dict_from(url: str, options: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The model state dict stored at ``url`` and a description of which weights were taken."""
    fs, path = storage.filesystem(url, options)
    if fs.isdir(path):
        for name in ("state.pt", *FINAL_WEIGHTS):
            if fs.exists(storage.join(path, name)):
                return state_dict_from(storage.join(url, name), options)
        raise CheckpointError(f"{url}: folder holds no state.pt or {' / '.join(FINAL_WEIGHTS)}")
    data = read_bytes(url, options)
    if url.endswith(".safetensors"):
        return load_safetensors(data), f"{url} ({'EMA' if 'ema' in url.rsplit('/', 1)[-1] else 'model'} weights)"
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ... for foreign files
        raise CheckpointError(f"{url}: not a weights-only PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{url}: expected a state dict, found {type(obj).__name__}")
    for key in EMA_KEYS:
        if isinstance(obj.get(key), dict) and obj[key]:
            return obj[key], f"{url} (EMA weights, key {key!r})"
    for key in MODEL_KEYS:
        if isinstance(obj.get(key), dict):
            return obj[key], f"{url} (key {key!r})"
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, f"{url} (plain state dict)"
    raise CheckpointError(f"{url}: no state dict under {', '.join(EMA_KEYS + MODEL_KEYS)} and not a plain state dict")


def run_weights(run_dir: str, options: dict[str, Any] | None = None) -> str | None:
    """The best weights a run of this project has: final weights (EMA first), else its newest checkpoint."""
    fs, path = storage.filesystem(run_dir, options)
    for name in FINAL_WEIGHTS:
        if fs.exists(storage.join(path, name)):
            return storage.join(run_dir, name)
    from orchestrator.train.checkpoint import latest

    return latest(storage.join(run_dir, "checkpoints"), options)


def resolve_init(init: str, run_storage: str, options: dict[str, Any] | None = None) -> str:
    """``model.init`` as a URL: a run name under ``run.storage`` resolves to its final weights or newest checkpoint."""
    if "/" in init or "." in init.rsplit("/", 1)[-1]:
        return init
    run_dir = storage.join(run_storage, init)
    weights = run_weights(run_dir, options)
    if weights is None:
        raise CheckpointError(f"model.init={init!r}: run {run_dir} has no final weights and no checkpoint")
    return weights


def load_weights(model: torch.nn.Module, url: str, options: dict[str, Any] | None = None) -> str:
    """Load ``url`` into ``model``: strict except a classifier of another size (dropped, then re-initialised)."""
    sd, what = state_dict_from(url, options)
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}
    own = model.state_dict()
    head = [k for k in sd if k.startswith("head.fc2.") or k.startswith("head.fc.")]
    resized = [k for k in head if k in own and own[k].shape != sd[k].shape]
    for k in resized:
        del sd[k]
    mismatched = [f"{k}: {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in sd if k in own and own[k].shape != sd[k].shape]
    missing = [k for k in own if k not in sd and k not in resized]
    unexpected = [k for k in sd if k not in own]
    if mismatched or missing or unexpected:
        raise CheckpointError(
            f"{url}: does not fit {type(model).__name__} ({len(own)} tensors): "
            + "; ".join(filter(None, [
                f"shape mismatch {mismatched[:3]}" if mismatched else "",
                f"missing {missing[:5]}" if missing else "",
                f"unexpected {unexpected[:5]}" if unexpected else "",
            ]))
            + " - is model.name the architecture the checkpoint was trained with?"
        )
    model.load_state_dict(sd, strict=False)
    note = f"; classifier {resized} re-initialised for {own[resized[0]].shape[0]} classes" if resized else ""
    log.info("loaded %s%s", what, note)
    return what + note
