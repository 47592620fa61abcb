"""State dicts from the bytes of any weights file users have, and loading them into a model.

Formats: safetensors, or a ``.pth``/``.pt`` file (this project's checkpoint ``state.pt``, the
official InceptionNeXt release, a plain timm state dict, or one nested under ``model`` /
``state_dict`` / ``model_ema``). Never unpickles arbitrary objects: ``torch.load(weights_only=True)``
or safetensors only. EMA weights are preferred when a file holds both. Reading the bytes from
storage is the caller's job, so this package stays free of the orchestrator.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

log = logging.getLogger(__name__)
EMA_KEYS = ("ema", "model_ema", "state_dict_ema")
MODEL_KEYS = ("model", "state_dict", "module")


class WeightsError(ValueError):
    """The bytes are not weights, or the weights do not fit the model."""


def state_dict_from_bytes(data: bytes, name: str) -> tuple[dict[str, torch.Tensor], str]:
    """The model state dict in ``data`` (the file ``name``) and a description of which weights were taken."""
    if name.endswith(".safetensors"):
        try:
            sd = load_safetensors(data)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError
            raise WeightsError(f"{name}: not a safetensors file ({exc})") from exc
        return sd, f"{name} ({'EMA' if 'ema' in name.rsplit('/', 1)[-1] else 'model'} weights)"
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ... for foreign files
        raise WeightsError(f"{name}: not a weights-only PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise WeightsError(f"{name}: expected a state dict, found {type(obj).__name__}")
    for key in EMA_KEYS:
        if isinstance(obj.get(key), dict) and obj[key]:
            return obj[key], f"{name} (EMA weights, key {key!r})"
    for key in MODEL_KEYS:
        if isinstance(obj.get(key), dict):
            return obj[key], f"{name} (key {key!r})"
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, f"{name} (plain state dict)"
    raise WeightsError(f"{name}: no state dict under {', '.join(EMA_KEYS + MODEL_KEYS)} and not a plain state dict")


def timm_config(architecture: str, num_classes: int, label_names: list[str], descriptions: list[str],
                pretrained_cfg: dict[str, Any]) -> dict[str, Any]:
    """What final weights need to be used elsewhere, in the shape of timm's Hugging Face ``config.json``
    (``timm.models.save_for_hf``): architecture, classes and the preprocessing (``pretrained_cfg``: input size,
    crop_pct, interpolation, mean, std). Stored in the safetensors file's own metadata, so it travels with it."""
    return {"architecture": architecture, "num_classes": num_classes, "label_names": label_names,
            "label_descriptions": dict(zip(label_names, descriptions, strict=True)),
            "pretrained_cfg": {**pretrained_cfg, "num_classes": num_classes}}


def safetensors_metadata(architecture: str, config: dict[str, Any]) -> dict[str, str]:
    return {"model": architecture, "config": json.dumps(config)}


def _safetensors_header(data: bytes) -> dict[str, str]:
    size = int.from_bytes(data[:8], "little")  # 8-byte header length, then the JSON header with __metadata__
    return json.loads(data[8:8 + size]).get("__metadata__", {})


def recorded_config(data: bytes, name: str) -> dict[str, Any] | None:
    """The ``timm_config`` a safetensors file of this project carries; None for any other file."""
    if not name.endswith(".safetensors"):
        return None
    config = _safetensors_header(data).get("config")
    return json.loads(config) if config else None


def architecture_in(data: bytes, name: str) -> str | None:
    """The timm architecture this project recorded in a file: safetensors metadata or a checkpoint's ``model_name``."""
    if name.endswith(".safetensors"):
        return _safetensors_header(data).get("model")
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return obj.get("model_name") if isinstance(obj, dict) else None


def classifier_size(sd: dict[str, torch.Tensor]) -> int | None:
    """Number of classes of the classifier in ``sd`` (timm's ``head.fc2`` / ``head.fc`` / ``fc``), if any."""
    for key in ("head.fc2.weight", "head.fc.weight", "fc.weight"):
        if key in sd:
            return int(sd[key].shape[0])
    return None


def load_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> str:
    """Load ``sd`` into ``model``: strict, except a classifier of another size (dropped, then re-initialised)."""
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}
    own = model.state_dict()
    head = [k for k in sd if k.startswith(("head.fc2.", "head.fc.", "fc."))]
    resized = [k for k in head if k in own and own[k].shape != sd[k].shape]
    for k in resized:
        del sd[k]
    mismatched = [f"{k}: {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in sd if k in own and own[k].shape != sd[k].shape]
    missing = [k for k in own if k not in sd and k not in resized]
    unexpected = [k for k in sd if k not in own]
    if mismatched or missing or unexpected:
        raise WeightsError(
            f"{what}: does not fit {type(model).__name__} ({len(own)} tensors): "
            + "; ".join(filter(None, [
                f"shape mismatch {mismatched[:3]}" if mismatched else "",
                f"missing {missing[:5]}" if missing else "",
                f"unexpected {unexpected[:5]}" if unexpected else "",
            ]))
            + " - is model.name the architecture the weights were trained with?"
        )
    model.load_state_dict(sd, strict=False)
    note = f"; classifier {resized} re-initialised for {own[resized[0]].shape[0]} classes" if resized else ""
    log.info("loaded %s%s", what, note)
    return what + note
