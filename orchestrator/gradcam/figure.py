"""The Figure 1 layout: a row per image, the input then one Grad-CAM overlay per model."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from pytorch_grad_cam.utils.image import show_cam_on_image  # noqa: E402

from orchestrator.gradcam.cam import Cell  # noqa: E402
from orchestrator.gradcam.images import Sample  # noqa: E402
from orchestrator.gradcam.models import CamModel  # noqa: E402


def class_name(index: int, classes: list[str] | None) -> str:
    return classes[index] if classes and 0 <= index < len(classes) else f"class {index}"


def draw(models: list[CamModel], samples: list[Sample], cells: list[list[Cell]],
         dataset_classes: list[str] | None = None, cell_inches: float = 2.2) -> Figure:
    rows, cols = len(samples), 1 + len(models)
    fig, axes = plt.subplots(rows, cols, figsize=(cell_inches * cols, cell_inches * rows + 0.3), squeeze=False)
    for r, (sample, row) in enumerate(zip(samples, cells, strict=True)):
        axes[r, 0].imshow(row[0].crop if row else np.asarray(sample.image))
        truth = class_name(sample.label, dataset_classes) if sample.label is not None else Path(sample.name).name
        axes[r, 0].set_xlabel(truth, fontsize=8)
        for c, (m, cell) in enumerate(zip(models, row, strict=True), start=1):
            axes[r, c].imshow(show_cam_on_image(cell.crop, cell.cam, use_rgb=True))
            names = m.classes or dataset_classes
            axes[r, c].set_xlabel(f"{class_name(cell.predicted, names)} ({cell.probability:.0%})", fontsize=8)
    for c, title in enumerate(["input", *(m.name for m in models)]):
        axes[0, c].set_title(title, fontsize=10)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig
