"""What differs between classification and segmentation, behind one small interface the loop calls.

A task builds its model and loads ``model.init`` into it, gives the reader its transforms, turns a loaded
batch into the model's inputs and targets on the device, computes the loss, and evaluates (every validation
image exactly once across ranks). Everything else (the loop, resume, checkpoints, stops, metrics) is shared.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from model.factory import create_model
from model.segmentation import create_segmentation_model, load_pretrained, resize
from orchestrator import weight_lookup
from orchestrator.data import device
from orchestrator.data.gpu_decode import DeviceCrop, TrainDraws
from orchestrator.data.manifest import Manifest
from orchestrator.data.reader import WithLabel
from orchestrator.data.seg_transforms import SegEval, SegTrain, rescale_size
from orchestrator.data.transforms import EvalCrop, TrainCrop
from orchestrator.recipe import METRICS, Recipe, uses_mixup
from orchestrator.rundir import RunDir
from orchestrator.train.context import Rank

log = logging.getLogger(__name__)


@dataclass
class EvalSetup:
    """What ``Task.evaluate`` needs (the loop's components or ``orchestrator.evaluate``'s): the loader, precision,
    this rank's place, where the per-class CSV goes, and what only evaluation asks of a classifier: timm's
    ``--valid-labels`` and ImageNet-ReaL scoring."""

    val_loader: Any
    autocast: torch.dtype | None
    channels_last: bool
    device: torch.device
    world_size: int
    is_main: bool
    out: RunDir  # the per-class CSV's folder
    label_subset: list[int] | None = None  # score these outputs only, in the data's class order (ImageNet-A/R)
    real_labels: dict[int, list[int]] | None = None  # sample id -> its ImageNet-ReaL labels (empty: not scored)


def autocast(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


class Task:
    """The interface; ``metrics`` are the validation metrics, the first the headline one (what summaries,
    plots and the pipeline status show)."""

    name = ""
    metrics: tuple[str, ...] = ()

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe

    @property
    def input_size(self) -> int:
        raise NotImplementedError

    def create_model(self, ctx: Rank) -> torch.nn.Module:
        raise NotImplementedError

    def load_init(self, model: torch.nn.Module, url: str, reader: weight_lookup.Reader = weight_lookup.read) -> None:
        raise NotImplementedError

    def transform(self, manifest: Manifest, train: bool) -> Any:
        """The reader's ``(bytes, target) -> (input, target)`` for this split."""
        raise NotImplementedError

    def pretrained_cfg(self) -> dict[str, Any]:
        """The evaluation preprocessing final weights record (timm's ``pretrained_cfg`` keys)."""
        return {"mean": device.IMAGENET_DEFAULT_MEAN, "std": device.IMAGENET_DEFAULT_STD}

    def device_step(self, ctx: Rank) -> Callable[[Any], Any] | None:
        """What turns a loaded training batch into uint8 NHWC images on the device, where the workers do not."""
        return None

    def val_batch(self, micro_batch: int) -> int:
        return micro_batch

    def train_batch(self, images: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor, epoch: int,
                    ctx: Rank) -> tuple[torch.Tensor, torch.Tensor]:
        """A normalised batch and its targets on the device -> the model's inputs and the loss's targets."""
        raise NotImplementedError

    def loss(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, e: EvalSetup, tag: str = "", final: bool = False) -> dict[str, Any]:
        raise NotImplementedError


class Classification(Task):
    name = "classification"
    metrics = METRICS[name]

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        a = recipe.augment
        self.mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.mixup_switch_prob,
                           label_smoothing=a.label_smoothing, num_classes=recipe.model.num_classes) if uses_mixup(recipe) else None
        if self.mixup is not None:
            self.loss_fn: torch.nn.Module = SoftTargetCrossEntropy()  # mixup already smooths the targets
        elif a.label_smoothing > 0:
            self.loss_fn = LabelSmoothingCrossEntropy(a.label_smoothing)
        else:
            self.loss_fn = torch.nn.CrossEntropyLoss()

    @property
    def input_size(self) -> int:
        return self.recipe.data.input_size

    def create_model(self, ctx: Rank) -> torch.nn.Module:
        return create_model(self.recipe.model)

    def load_init(self, model: torch.nn.Module, url: str, reader: weight_lookup.Reader = weight_lookup.read) -> None:
        weight_lookup.load_into(model, url, self.recipe.run.storage_options, reader=reader)

    def pretrained_cfg(self) -> dict[str, Any]:
        d = self.recipe.data
        return {**super().pretrained_cfg(), "input_size": [3, d.input_size, d.input_size], "crop_pct": d.crop_pct,
                "interpolation": d.interpolation}

    def transform(self, manifest: Manifest, train: bool) -> Any:
        d, a = self.recipe.data, self.recipe.augment
        if train and d.decode == "gpu":
            return WithLabel(TrainDraws(d.input_size, a.auto_augment, d.train_interpolation))
        if train:
            return WithLabel(TrainCrop(d.input_size, a.auto_augment, d.train_interpolation, a.color_jitter))
        return WithLabel(EvalCrop(d.input_size, d.crop_pct, d.interpolation))

    def device_step(self, ctx: Rank) -> Callable[[Any], Any] | None:
        return DeviceCrop(self.recipe.data.input_size, ctx.device) if self.recipe.data.decode == "gpu" else None

    def train_batch(self, images: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor, epoch: int,
                    ctx: Rank) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.recipe
        device.random_erase(images, [device.sample_seed(r.run.seed, epoch, i) for i in ids.tolist()], r.augment.re_prob)
        targets = targets.to(ctx.device, non_blocking=True)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return images, targets

    def loss(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(outputs, targets)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, e: EvalSetup, tag: str = "", final: bool = False) -> dict[str, Any]:
        """Top-1/top-5 over the whole validation split; each image counted once across ranks (corrupt excluded).
        At the end of training (and in ``orchestrator.evaluate``) per class too, in ``per_class_acc{_tag}.csv``."""
        subset, real = e.label_subset, e.real_labels
        n = len(subset) if subset is not None else int(getattr(model, "num_classes", self.recipe.model.num_classes))
        model.eval()
        per_class = torch.zeros(3, n, dtype=torch.float64, device=e.device)  # top-1, top-5, images by class
        real_counts = torch.zeros(3, dtype=torch.float64, device=e.device)  # the same over all ReaL-labelled images
        for images, targets, ids, corrupt in e.val_loader:
            images = device.normalize(images, e.device, e.channels_last)
            targets = targets.to(e.device, non_blocking=True)  # the loader's pinned tensors: no host wait
            with autocast(e.autocast, e.device):
                logits = model(images)
            if subset is not None:
                logits = logits[:, subset]
            top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
            valid = corrupt.to(e.device, non_blocking=True) == 0
            hits = top5.eq(targets[:, None])
            for row, hit in enumerate((hits[:, 0] & valid, hits.any(1) & valid, valid)):  # no host sync (a GPU)
                per_class[row].index_add_(0, targets, hit.double())
            if real is not None:
                real_counts += real_hits(top5.cpu(), ids, corrupt, real).to(e.device)
        if e.world_size > 1:
            dist.all_reduce(per_class)
            dist.all_reduce(real_counts)
        top1, top5, images = per_class.sum(1).tolist()
        out = {"top1": 100 * top1 / images, "top5": 100 * top5 / images, "val_images": int(images)}
        if real is not None:
            real_top1, real_top5, real_images = real_counts.tolist()
            out |= {"real_top1": 100 * real_top1 / real_images, "real_top5": 100 * real_top5 / real_images,
                    "real_images": int(real_images)}
        if final and e.is_main:
            names = [cl.name or cl.wnid for cl in e.val_loader.dataset.manifest.classes]
            e.out.write_bytes(f"per_class_acc{'_' + tag if tag else ''}.csv",
                                table_csv(["top1", "top5"], per_class[:2].T / per_class[2:].T, names,
                                          per_class[2].long().tolist()))
        return out


def real_hits(top5: torch.Tensor, ids: torch.Tensor, corrupt: torch.Tensor, real: dict[int, list[int]]) -> torch.Tensor:
    """timm's ``RealLabelsImagenet``: a prediction is right when it is among the image's ReaL labels; images
    without any are not scored. Returns (top-1 hits, top-5 hits, images scored)."""
    out = torch.zeros(3, dtype=torch.float64)
    for preds, sample, bad in zip(top5.tolist(), ids.tolist(), corrupt.tolist(), strict=True):
        labels = real.get(sample)
        if labels and not bad:
            out += torch.tensor([preds[0] in labels, any(p in labels for p in preds), 1], dtype=torch.float64)
    return out


class Segmentation(Task):
    """Semantic segmentation as mmseg's EncoderDecoder: pixel cross-entropy (ignore index) on logits resized to
    the crop, plus the auxiliary head's; mIoU/mAcc/aAcc from a confusion matrix summed over ranks."""

    name = "segmentation"
    metrics = METRICS[name]

    @property
    def input_size(self) -> int:
        return self.recipe.segment.crop_size

    def create_model(self, ctx: Rank) -> torch.nn.Module:
        model: torch.nn.Module = create_segmentation_model(self.recipe.model, self.recipe.head)
        if ctx.device.type == "cuda" and ctx.world_size > 1:  # the configs' SyncBN; plain BN on CPU (gloo has no SyncBN)
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def load_init(self, model: torch.nn.Module, url: str, reader: weight_lookup.Reader = weight_lookup.read) -> None:
        weight_lookup.load_into(model, url, self.recipe.run.storage_options, load=load_pretrained, reader=reader)

    def pretrained_cfg(self) -> dict[str, Any]:
        s = self.recipe.segment
        return {**super().pretrained_cfg(), "task": "segmentation", "crop_size": s.crop_size, "scale": list(s.scale),
                "test_mode": s.test_mode}

    def transform(self, manifest: Manifest, train: bool) -> Any:
        s = self.recipe.segment
        if train:
            return SegTrain(s.crop_size, s.scale, s.ratio_range, s.cat_max_ratio, s.photometric, manifest.reduce_zero_label,
                            s.ignore_index)
        return SegEval(manifest.reduce_zero_label, s.ignore_index)

    def val_batch(self, micro_batch: int) -> int:
        return 1  # images keep their own sizes, as mmseg's test loader (one image per GPU)

    def train_batch(self, images: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor, epoch: int,
                    ctx: Rank) -> tuple[torch.Tensor, torch.Tensor]:
        return images, targets.to(ctx.device, non_blocking=True).long()

    def loss(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        logits, aux = outputs
        loss = self._cross_entropy(logits, targets)
        if aux is not None:
            loss = loss + self.recipe.head.aux_weight * self._cross_entropy(aux, targets)
        return loss

    def _cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """mmseg 0.x's: the mean over every pixel, ignored ones counting as zero loss."""
        per_pixel = F.cross_entropy(resize(logits.float(), targets.shape[1:]), targets,
                                    ignore_index=self.recipe.segment.ignore_index, reduction="none")
        return per_pixel.mean()

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, e: EvalSetup, tag: str = "", final: bool = False) -> dict[str, Any]:
        """Single-scale (``segment.scale``); at the end of training with ``segment.aug_test`` also multi-scale
        with flip, under ``ms_`` keys. Per-class IoU and accuracy go to ``per_class_iou{_tag}.csv``."""
        s = self.recipe.segment
        out = self._evaluate(model, e, [1.0], False, tag)
        if final and s.aug_test:
            ms = self._evaluate(model, e, s.aug_test_ratios, True, f"{tag}_ms" if tag else "ms")
            out |= {f"ms_{k}": v for k, v in ms.items() if k != "val_images"}
        return out

    def _evaluate(self, model: torch.nn.Module, e: EvalSetup, ratios: list[float], flip: bool, tag: str) -> dict[str, Any]:
        model.eval()
        n, ignore = self.recipe.model.num_classes, self.recipe.segment.ignore_index
        confusion = torch.zeros(n * n, dtype=torch.float64, device=e.device)
        images_seen = torch.zeros((), dtype=torch.float64, device=e.device)
        for images, masks, _ids, corrupt in e.val_loader:
            if bool(corrupt.any()):  # a corrupt image's stand-in is another image: not counted twice
                continue
            x = device.normalize(images, e.device, e.channels_last)
            with autocast(e.autocast, e.device):
                probs = self.predict(model, x, ratios, flip)
            confusion += confusion_of(probs.argmax(1)[0], masks[0].to(e.device).long(), n, ignore)
            images_seen += 1
        if e.world_size > 1:
            dist.all_reduce(confusion)
            dist.all_reduce(images_seen)
        metrics, table = confusion_metrics(confusion.view(n, n).cpu())
        if e.is_main:
            names = [cl.name for cl in e.val_loader.dataset.manifest.classes] or [str(i) for i in range(n)]
            e.out.write_bytes(f"per_class_iou{'_' + tag if tag else ''}.csv", table_csv(["IoU", "Acc"], table, names))
        return {**metrics, "val_images": int(images_seen)}

    def predict(self, model: torch.nn.Module, x: torch.Tensor, ratios: list[float], flip: bool) -> torch.Tensor:
        """Class probabilities at ``x``'s size, summed over test scales (and flips), as mmseg's aug_test."""
        s = self.recipe.segment
        h, w = x.shape[2:]
        total = torch.zeros(())
        for ratio in ratios:
            size = rescale_size(h, w, (int(s.scale[0] * ratio), int(s.scale[1] * ratio)))
            if s.test_size_divisor:  # PVT's AlignResize: sizes rounded up to a multiple (the image is resized, not padded)
                size = tuple(-(-side // s.test_size_divisor) * s.test_size_divisor for side in size)
            scaled = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            for flipped in (False, True) if flip else (False,):
                inp = scaled.flip(3) if flipped else scaled
                logits = self.infer(model, inp)
                logits = logits.flip(3) if flipped else logits
                total = total + resize(logits.float(), (h, w)).softmax(1)
        return total

    def infer(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Logits at ``x``'s size: the whole image at once, or sliding ``crop_size`` windows averaged."""
        s = self.recipe.segment
        if s.test_mode == "whole":
            return resize(model(x), x.shape[2:])
        crop, stride = s.crop_size, s.test_stride
        h, w = x.shape[2:]
        out = torch.zeros((x.shape[0], self.recipe.model.num_classes, h, w), device=x.device)
        count = torch.zeros((1, 1, h, w), device=x.device)
        for i in range(max(h - crop + stride - 1, 0) // stride + 1):
            for j in range(max(w - crop + stride - 1, 0) // stride + 1):
                y1, x1 = i * stride, j * stride
                y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
                y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                window = x[:, :, y1:y2, x1:x2]
                out[:, :, y1:y2, x1:x2] += resize(model(window), window.shape[2:]).float()
                count[:, :, y1:y2, x1:x2] += 1
        return out / count


def confusion_of(pred: torch.Tensor, mask: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """The flattened label x prediction counts of one image; pixels labelled ``ignore_index`` are not counted."""
    valid = mask != ignore_index
    return torch.bincount(mask[valid] * num_classes + pred[valid], minlength=num_classes * num_classes).double()


def confusion_metrics(confusion: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    """mIoU, mAcc, aAcc (percent) from a label x prediction confusion matrix, and the per-class ``[IoU, Acc]``
    table. A class absent from both labels and predictions has no IoU and is left out of the means (mmseg's nanmean)."""
    confusion = confusion.double()
    intersect, label, pred = confusion.diag(), confusion.sum(1), confusion.sum(0)
    iou = intersect / (label + pred - intersect)
    acc = intersect / label
    metrics = {"mIoU": float(100 * iou.nanmean()), "mAcc": float(100 * acc.nanmean()),
               "aAcc": float(100 * intersect.sum() / label.sum())}
    return metrics, torch.stack([iou, acc], dim=1)


def table_csv(columns: list[str], table: torch.Tensor, names: list[str], images: list[int] | None = None) -> bytes:
    """A per-class CSV: index, class, each column of ``table`` (fractions, written as percent), images."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["index", "class", *columns, *(["images"] if images is not None else [])])
    for i, values in enumerate(table.tolist()):
        writer.writerow([i, names[i] if i < len(names) else str(i), *(f"{100 * v:.2f}" for v in values),
                         *([images[i]] if images is not None else [])])
    return out.getvalue().encode()


def for_recipe(recipe: Recipe) -> Task:
    return Segmentation(recipe) if recipe.task == "segmentation" else Classification(recipe)
