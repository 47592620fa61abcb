"""Models for Grad-CAM from ``NAME=SOURCE``: a run of this project, a checkpoint file, or ``ARCH@FILE``.

The architecture decides the target layer (the last stage's output, where the paper's Figure 1 maps
come from) and, for Swin, the NHWC -> NCHW reshape; the eval transform is the run's (input size,
crop, interpolation) or the timm model's own data config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.data import create_transform, resolve_data_config
from torchvision import transforms as T

from model.weight_format import (
    WeightsError,
    architecture_in,
    classifier_size,
    load_state_dict,
    recorded_config,
)
from orchestrator import storage, weight_lookup
from orchestrator.data import manifest
from orchestrator.errors import OrchestratorError, RecipeError
from orchestrator.rundir import RunDir

log = logging.getLogger(__name__)
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass
class CamModel:
    name: str
    source: str
    model: torch.nn.Module
    transform: Callable[[Any], torch.Tensor]  # PIL image -> normalised CHW tensor
    crop: Callable[[Any], Any]  # PIL image -> the same resized/cropped PIL image, for display
    target_layer: torch.nn.Module
    reshape: Callable[[torch.Tensor], torch.Tensor] | None
    classes: list[str] | None


def target_layer(model: torch.nn.Module, dotted: str | None = None) -> tuple[torch.nn.Module, Callable | None]:
    """The layer Grad-CAM reads, by architecture, unless ``dotted`` (e.g. ``stages.2``) names one."""
    if dotted:
        try:
            return model.get_submodule(dotted), None
        except AttributeError as exc:
            raise RecipeError(f"--layer {dotted}: {type(model).__name__} has no such submodule") from exc
    kind = type(model).__name__
    if kind in ("MetaNeXt", "ConvNeXt"):  # InceptionNeXt is timm's MetaNeXt
        return model.stages[-1], None
    if kind == "ResNet":
        return model.layer4[-1], None
    if kind == "SwinTransformer":  # timm's Swin keeps NHWC feature maps
        return model.layers[-1].blocks[-1].norm1, lambda t: t.permute(0, 3, 1, 2)
    raise RecipeError(f"no default Grad-CAM layer for {kind} (InceptionNeXt, ConvNeXt, ResNet and Swin have one); "
                      "name one with --layer, e.g. --layer stages.3")


def parse_spec(spec: str) -> tuple[str, str]:
    """``NAME=SOURCE`` -> (NAME, SOURCE); a bare SOURCE is named after its last path component."""
    name, sep, source = spec.partition("=")
    if not sep:
        name, source = spec.rstrip("/").rsplit("/", 1)[-1].split("@")[0], spec
    if not name or not source:
        raise RecipeError(f"--model {spec!r}: expected NAME=SOURCE")
    return name, source


def load(spec: str, options: dict[str, Any] | None = None, device: torch.device | None = None,
         layer: str | None = None) -> CamModel:
    name, source = parse_spec(spec)
    try:
        arch, url, data_cfg, classes = _resolve(source, options or {})
        sd, what = weight_lookup.state_dict(url, options)
        model = timm.create_model(arch, pretrained=False, num_classes=classifier_size(sd) or 1000)
        load_state_dict(model, sd, what)
    except (OrchestratorError, WeightsError, RuntimeError, OSError, ValueError) as exc:
        raise RecipeError(f"--model {spec}: {exc}") from exc
    model.eval().to(device or torch.device("cpu"))
    cfg = resolve_data_config(data_cfg, model=model)
    if not data_cfg:  # a file from elsewhere: say what it is shown at
        log.warning("--model %s: the weights record no preprocessing: timm's defaults for %s: input size %s, crop_pct "
                    "%s, %s", spec, arch, cfg["input_size"][-1], cfg["crop_pct"], cfg["interpolation"])
    transform = create_transform(**cfg)
    crop = T.Compose([t for t in transform.transforms if not isinstance(t, T.Normalize) and "ToTensor" not in type(t).__name__])
    layer_module, reshape = target_layer(model, layer)
    if classes and len(classes) != model.num_classes:
        classes = None
    return CamModel(name, source, model, transform, crop, layer_module, reshape, classes)


def _resolve(source: str, options: dict[str, Any]) -> tuple[str, str, dict[str, Any], list[str] | None]:
    """(timm architecture, weights URL, data config overrides, class names) for a model source."""
    if "@" in source and not source.split("@", 1)[0].count("/"):
        arch, url = source.split("@", 1)
        if not timm.is_model(arch):
            raise RecipeError(f"{arch!r} is not a timm architecture")
        _must_exist(url, options)
        return (arch, url, *_recorded(url, options)[1:])
    fs, path = storage.filesystem(source, options)
    if fs.isdir(path):
        return _from_run(source, options)
    _must_exist(source, options)
    if not source.endswith(WEIGHT_SUFFIXES):
        raise RecipeError(f"{source}: not a run folder, a weights file ({', '.join(WEIGHT_SUFFIXES)}) or ARCH@FILE")
    arch, data_cfg, classes = _recorded(source, options)
    if arch is None:
        raise RecipeError(f"{source}: the file does not say its architecture; write it as ARCH@{source}")
    return arch, source, data_cfg, classes


def _from_run(url: str, options: dict[str, Any]) -> tuple[str, str, dict[str, Any], list[str] | None]:
    run = RunDir(url, options)
    config = run.config()
    if config is None:
        raise RecipeError(f"{url}: a folder but not a run (no config.json)")
    best = run.best_weights()
    if best is None:
        raise RecipeError(f"{url}: the run has no final weights and no checkpoint yet")
    data = config["data"]
    size = data["input_size"]
    data_cfg = {"input_size": (3, size, size), "crop_pct": data["crop_pct"], "interpolation": data["interpolation"]}
    # config.json holds the run's data options with secrets redacted: ours (the command line, the
    # environment) stand in for them, as they do for training.
    data_options = {k: v for k, v in (data.get("storage_options") or {}).items() if v != "***"} | options
    classes = None
    for split in (data.get("val"), data.get("train")):
        try:
            classes = [c.name for c in manifest.load(split, data_options).classes] if split else None
        except OrchestratorError:
            continue  # the data may not be reachable from here; predictions then show class indices
        if classes:
            break
    return config["model"]["name"], best, data_cfg, classes


def _recorded(url: str, options: dict[str, Any]) -> tuple[str | None, dict[str, Any], list[str] | None]:
    """(architecture, data config, class names) a weights file records (``model.weight_format.timm_config``)."""
    data, name = weight_lookup.read(url, options)
    config = recorded_config(data, name) or {}
    cfg = config.get("pretrained_cfg") or {}
    data_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()
                if k in ("input_size", "crop_pct", "interpolation", "mean", "std")}
    classes = list((config.get("label_descriptions") or {}).values()) or None
    return config.get("architecture") or architecture_in(data, name), data_cfg, classes


def _must_exist(url: str, options: dict[str, Any]) -> None:
    fs, path = storage.filesystem(url, options)
    if not fs.exists(path):
        raise RecipeError(f"{url}: no such file")
