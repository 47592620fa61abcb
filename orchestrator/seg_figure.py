"""``python -m orchestrator.seg_figure RUN --out figure.png [--images SPLIT] [--num 6]``: predicted masks.

A row per validation image: the image, its ground truth and the run's prediction (single scale, with the
run's test settings), each class in a fixed colour named in the legend, ignored pixels black. RUN is a
segmentation run folder (its final weights, EMA first, else its newest checkpoint); SPLIT defaults to the
run's ``data.val``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.segmentation import create_segmentation_model
from orchestrator import cli
from orchestrator import recipe as recipes
from orchestrator.data import device, manifest
from orchestrator.data.reader import ShardDataset, ShardLoader
from orchestrator.errors import RecipeError
from orchestrator.rundir import RunDir
from orchestrator.train.tasks import Segmentation

log = logging.getLogger("orchestrator.seg_figure")


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("orchestrator.seg_figure", __doc__)
    p.add_argument("run", help="a segmentation run folder, e.g. runs/seg-smoke or s3://bucket/runs/upernet-t")
    p.add_argument("--out", required=True, help="the figure (PNG)")
    p.add_argument("--images", metavar="SPLIT", help="a segmentation shard split (default: the run's data.val)")
    p.add_argument("--num", type=int, default=6, help="images (rows), from the start of the split")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cli.add_storage_option(p)
    return cli.run(draw, p, argv)


def run_recipe(url: str, options: dict[str, Any]) -> recipes.Recipe:
    """The run's recipe (config.json), its redacted storage options replaced by ``--storage-option``."""
    config = RunDir(url, options).config()
    if not config or config.get("task") != "segmentation":
        raise RecipeError(f"{url}: not a segmentation run (no config.json with task: segmentation)")
    for section in ("data", "run"):
        config[section]["storage_options"] = dict(options)
    return recipes.from_dict(config)


def predictions(recipe: recipes.Recipe, weights: str, split: str, num: int, dev: torch.device,
                options: dict[str, Any]) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], list[str]]:
    """(image, ground truth, prediction) for the first ``num`` images of ``split``, and the class names."""
    found = manifest.load(split, options)
    if found.task != "segmentation":
        raise RecipeError(f"--images {split}: holds {found.task} shards, not segmentation shards")
    task = Segmentation(recipe)
    model = create_segmentation_model(recipe.model, recipe.head)
    task.load_init(model, weights)
    model.eval().to(dev)
    loader = ShardLoader(ShardDataset(found, task.transform(found, train=False), train=False), 1, num_workers=0)
    rows = []
    with torch.no_grad():
        for images, masks, _ids, _corrupt in loader:
            probs = task.predict(model, device.normalize(images, dev, False), [1.0], flip=False)
            rows.append((images[0].numpy(), masks[0].numpy(), probs.argmax(1)[0].cpu().numpy().astype(np.uint8)))
            if len(rows) == num:
                break
    names = [c.name for c in found.classes] or [str(i) for i in range(recipe.model.num_classes)]
    return rows, names


def figure(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], names: list[str], ignore_index: int) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    palette = (plt.get_cmap("tab20")(np.arange(len(names)) % 20)[:, :3] * 255).astype(np.uint8)

    def colour(mask: np.ndarray) -> np.ndarray:
        out = np.zeros((*mask.shape, 3), dtype=np.uint8)  # ignored pixels stay black
        known = mask != ignore_index
        out[known] = palette[np.minimum(mask[known], len(names) - 1)]
        return out

    fig, axes = plt.subplots(len(rows), 3, figsize=(6.6, 1.9 * len(rows) + 0.8), squeeze=False)
    present: set[int] = set()
    for r, (image, truth, pred) in enumerate(rows):
        labelled = truth != ignore_index
        present |= set(np.unique(truth[labelled]).tolist()) | set(np.unique(pred).tolist())
        accuracy = float((pred[labelled] == truth[labelled]).mean()) if labelled.any() else float("nan")
        for c, (picture, label) in enumerate([(image, ""), (colour(truth), ""), (colour(pred), f"pixel acc. {accuracy:.0%}")]):
            axes[r, c].imshow(picture, interpolation="nearest")
            axes[r, c].set_xlabel(label, fontsize=8)
    for c, title in enumerate(("image", "ground truth", "prediction")):
        axes[0, c].set_title(title, fontsize=10)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(color=palette[k] / 255, label=names[k]) for k in sorted(present) if k < len(names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def draw(args: argparse.Namespace) -> None:
    options = cli.storage_options(args.storage_option)
    recipe = run_recipe(args.run, options)
    split = args.images or recipe.data.val
    if not split:
        raise RecipeError(f"{args.run}: the run has no data.val; name a split with --images")
    weights = RunDir(args.run, options).best_weights()
    if weights is None:
        raise RecipeError(f"{args.run}: no final weights and no committed checkpoint to predict with")
    rows, names = predictions(recipe, weights, split, args.num, torch.device(args.device), options)
    fig = figure(rows, names, recipe.segment.ignore_index)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    log.info("wrote %s (%d images of %s, weights %s)", args.out, len(rows), split, weights)


if __name__ == "__main__":
    sys.exit(main())
