"""Semantic segmentation on an InceptionNeXt backbone: UperNet and Semantic FPN as mmsegmentation 0.x builds them.

Written here rather than taken from segmentation-models-pytorch: smp 0.6's UPerNet gives each pyramid-pooling
branch ``in_channels / 4`` channels (mmseg: 512), has no 3x3 conv per FPN level, no dropout and no auxiliary head,
and its FPN uses GroupNorm and dropout 0.2; the paper follows mmseg's configs. The modules follow mmseg's
``UPerHead``, ``FCNHead`` (auxiliary), ``FPN`` neck and ``FPNHead``: conv + BN + ReLU blocks (``ConvModule``),
bilinear resizing with ``align_corners=False``, ``Dropout2d`` before a 1x1 classifier. Logits come out at stride 4;
the loss and the evaluation resize them to the label's size, as mmseg does.
"""

from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from torch import nn

from model.config import HeadConfig, ModelConfig
from model.weight_format import WeightsError, load_state_dict

STRIDES = (4, 8, 16, 32)


def resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvModule(nn.Sequential):
    """mmcv's ConvModule with BN and ReLU (the conv has no bias, as mmcv's ``bias='auto'``)."""

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Classifier(nn.Sequential):
    """mmseg's ``cls_seg``: Dropout2d, then a 1x1 conv to the classes."""

    def __init__(self, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__(nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(), nn.Conv2d(channels, num_classes, 1))


class UPerHead(nn.Module):
    """Pyramid pooling on the last stage, a top-down FPN over all four, fused at stride 4."""

    def __init__(self, in_channels: list[int], channels: int, pool_scales: list[int], num_classes: int, dropout: float) -> None:
        super().__init__()
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels[-1], channels, 1))
                                 for s in pool_scales)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(ConvModule(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3)
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        psp = self.bottleneck(torch.cat([x, *(resize(m(x), x.shape[2:]) for m in self.ppm)], dim=1))
        laterals = [conv(f) for conv, f in zip(self.lateral, feats[:-1], strict=True)] + [psp]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn, laterals[:-1], strict=True)] + [laterals[-1]]
        size = outs[0].shape[2:]
        return self.classifier(self.fpn_bottleneck(torch.cat([outs[0], *(resize(o, size) for o in outs[1:])], dim=1)))


class FCNHead(nn.Sequential):
    """The auxiliary head: one 3x3 ConvModule on one stage (``num_convs=1``, ``concat_input=False``)."""

    def __init__(self, cin: int, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__(ConvModule(cin, channels, 3), Classifier(channels, num_classes, dropout))


class FPNNeck(nn.Module):
    """mmseg's ``FPN`` neck: 1x1 laterals, nearest top-down sums, 3x3 outputs; plain convs (no norm, no activation)."""

    def __init__(self, in_channels: list[int], channels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.out = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral, feats, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
        return [conv(lat) for conv, lat in zip(self.out, laterals, strict=True)]


class FPNHead(nn.Module):
    """Semantic FPN's head: each level upsampled to stride 4 by 3x3 ConvModules and 2x bilinear steps, summed."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for stride in STRIDES:
            steps = max(1, int(math.log2(stride) - math.log2(STRIDES[0])))
            layers: list[nn.Module] = []
            for k in range(steps):
                layers.append(ConvModule(in_channels if k == 0 else channels, channels, 3))
                if stride != STRIDES[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        out = self.scale_heads[0](feats[0])
        for head, f in zip(self.scale_heads[1:], feats[1:], strict=True):
            out = out + resize(head(f), out.shape[2:])
        return self.classifier(out)


class SegmentationModel(nn.Module):
    """Backbone (timm's InceptionNeXt, stages at strides 4-32), head, optional auxiliary head on stage 3.

    Training returns ``(logits, aux_logits or None)``; evaluation returns the logits (stride 4)."""

    def __init__(self, backbone: nn.Module, head_cfg: HeadConfig, num_classes: int) -> None:
        super().__init__()
        channels = [int(f["num_chs"]) for f in backbone.feature_info]
        backbone.head = nn.Identity()  # the classifier is never run: no unused parameters under DDP
        self.backbone = backbone
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) if head_cfg.out_norm else nn.Identity() for c in channels)
        h = head_cfg
        if h.name == "upernet":
            self.neck: nn.Module = nn.Identity()
            self.head: nn.Module = UPerHead(channels, h.channels, h.pool_scales, num_classes, h.dropout)
        elif h.name == "fpn":
            self.neck = FPNNeck(channels, h.neck_channels)
            self.head = FPNHead(h.neck_channels, h.channels, num_classes, h.dropout)
        else:
            raise ValueError(f"head.name {h.name!r}: expected upernet or fpn")
        self.aux = FCNHead(channels[2], h.aux_channels, num_classes, h.dropout) if h.aux_weight > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        feats = self.backbone.forward_intermediates(x, intermediates_only=True)
        feats = [norm(f) for norm, f in zip(self.norms, feats, strict=True)]
        logits = self.head(self.neck(feats))
        if not self.training:
            return logits
        return logits, (self.aux(feats[2]) if self.aux is not None else None)


def create_segmentation_model(cfg: ModelConfig, head: HeadConfig) -> SegmentationModel:
    """timm's InceptionNeXt (``model.name``, drop path, layer-scale init) under the ``head`` section's head."""
    backbone = timm.create_model(cfg.name, pretrained=False, num_classes=0, drop_path_rate=cfg.drop_path_rate,
                                 ls_init_value=cfg.ls_init_value)
    return SegmentationModel(backbone, head, cfg.num_classes)


def load_pretrained(model: SegmentationModel, sd: dict[str, torch.Tensor], what: str) -> str:
    """A segmentation model's weights (keys under ``backbone.``) load whole; a classifier's (ImageNet
    pretraining) load into the backbone, its classification head left out."""
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):
        return load_state_dict(model, sd, what)
    backbone = {k: v for k, v in sd.items() if not k.startswith("head.")}
    if not backbone:
        raise WeightsError(f"{what}: holds no backbone weights")
    return load_state_dict(model.backbone, backbone, f"{what} into the backbone (its classifier left out)")
