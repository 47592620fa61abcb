"""Grad-CAM maps through the ``grad-cam`` package, one per (image, model), with the model's prediction."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from tqdm import tqdm

from orchestrator.errors import RecipeError
from orchestrator.gradcam.images import Sample
from orchestrator.gradcam.models import CamModel


@dataclass
class Cell:
    cam: np.ndarray  # H x W in [0, 1], at the model's input size
    crop: np.ndarray  # H x W x 3 RGB in [0, 1]: what the model saw, for the overlay
    predicted: int
    probability: float
    target: int


def compute(models: list[CamModel], samples: list[Sample], target: str = "predicted",
            progress: bool = True) -> list[list[Cell]]:
    """``cells[image][model]``; ``target`` is the class the map explains: ``predicted`` or the image's ``label``."""
    if target == "label" and any(s.label is None for s in samples):
        raise RecipeError("--target label needs labelled images (a shard dataset split); this folder has none")
    cells: list[list[Cell]] = [[] for _ in samples]
    bar = tqdm(total=len(models) * len(samples), desc="grad-cam", disable=not progress)
    for m in models:
        device = next(m.model.parameters()).device
        cam = GradCAM(model=m.model, target_layers=[m.target_layer], reshape_transform=m.reshape)
        try:
            for row, sample in enumerate(samples):
                x = m.transform(sample.image).unsqueeze(0).to(device)
                with torch.no_grad():
                    probs = m.model(x).float().softmax(-1)[0]
                predicted = int(probs.argmax())
                wanted = predicted if target == "predicted" else int(sample.label)  # type: ignore[arg-type]
                grayscale = cam(input_tensor=x, targets=[ClassifierOutputTarget(wanted)])[0]
                crop = np.asarray(m.crop(sample.image), dtype=np.float32) / 255.0
                cells[row].append(Cell(grayscale, crop, predicted, float(probs[predicted]), wanted))
                bar.update(1)
        finally:
            cam.activations_and_grads.release()
    bar.close()
    return cells


def box_energy(cam: np.ndarray, box: tuple[int, int, int, int], original_size: tuple[int, int]) -> tuple[float, float]:
    """(share of the map's energy inside ``box``, the box's share of the area), with the box scaled to the map.

    For maps of un-cropped images (crop_pct 1.0 on square images), where image and map cover the same area.
    """
    h, w = cam.shape
    sx, sy = w / original_size[0], h / original_size[1]
    x0, y0, x1, y1 = round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy)
    total = float(cam.sum())
    inside = float(cam[y0:y1, x0:x1].sum())
    return inside / max(total, 1e-12), (x1 - x0) * (y1 - y0) / (h * w)
