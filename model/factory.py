"""Build timm's InceptionNeXt from the recipe's ``model`` section."""

from __future__ import annotations

import timm
import torch

from model.config import ModelConfig


def create_model(cfg: ModelConfig) -> torch.nn.Module:
    """timm's InceptionNeXt with the recipe's drop path, head dropout, layer-scale init and classes (no download)."""
    return timm.create_model(
        cfg.name, pretrained=False, num_classes=cfg.num_classes, drop_path_rate=cfg.drop_path_rate,
        drop_rate=cfg.head_dropout, ls_init_value=cfg.ls_init_value,
    )
