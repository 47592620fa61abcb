"""The ``model`` and ``head`` sections of a recipe: what the factories need to build an InceptionNeXt (and its segmentation head)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    name: str = "inception_next_tiny"  # timm name: inception_next_atto / _tiny / _small / _base
    drop_path_rate: float = 0.0
    head_dropout: float = 0.0
    ls_init_value: float | None = 1e-6
    num_classes: int = 1000
    init: str | None = None  # checkpoint URL/file or run name to start from (fine-tuning)


@dataclass
class HeadConfig:
    """The ``head`` section (``task: segmentation``): mmseg's UPerHead with an FCN auxiliary head on stage 3
    (Swin's UperNet config), or an FPN neck with FPNHead (PoolFormer's Semantic FPN config)."""

    name: str = "upernet"  # upernet | fpn
    channels: int = 512  # UPerHead: 512; FPNHead: 128
    neck_channels: int = 256  # FPN neck outputs (fpn only)
    pool_scales: list[int] = field(default_factory=lambda: [1, 2, 3, 6])  # UPerHead's pyramid pooling (upernet only)
    dropout: float = 0.1  # Dropout2d before the classifier, as mmseg's decode heads
    aux_weight: float = 0.4  # loss weight of the auxiliary FCN head on stage 3; 0 = no auxiliary head
    aux_channels: int = 256
    out_norm: bool = True  # a BatchNorm on each backbone output, as segmentation backbones of Swin/ConvNeXt/PoolFormer add
