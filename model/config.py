"""The ``model`` section of a recipe: what the factory needs to build an InceptionNeXt."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    name: str = "inception_next_tiny"  # timm name: inception_next_atto / _tiny / _small / _base
    drop_path_rate: float = 0.0
    head_dropout: float = 0.0
    ls_init_value: float | None = 1e-6
    num_classes: int = 1000
    init: str | None = None  # checkpoint URL/file or run name to start from (fine-tuning)
