"""``python -m orchestrator.gradcam --model NAME=SOURCE [--model ...] --images SRC --out figure.png``.

SOURCE: a run folder of this project (its final weights, EMA first, or newest checkpoint), a
checkpoint/weights file this project wrote, or ``ARCH@FILE`` for any timm architecture with local or
object-storage weights (e.g. ``convnext_tiny@weights/convnext_tiny.safetensors``).
SRC: a folder of images, or a shard dataset split (e.g. ``s3://bucket/imagenet/val``).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import numpy as np
import torch

from orchestrator import cli
from orchestrator.gradcam import cam, figure, images, models


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("orchestrator.gradcam", __doc__)
    p.add_argument("--model", action="append", required=True, metavar="NAME=SOURCE", help="a model column (repeat)")
    p.add_argument("--images", required=True, metavar="SRC", help="folder of images or shard dataset split")
    p.add_argument("--out", required=True, help="the figure (PNG)")
    p.add_argument("--num", type=int, default=8, help="images (rows), from the start of SRC")
    p.add_argument("--target", choices=("predicted", "label"), default="predicted", help="class the maps explain")
    p.add_argument("--layer", help="target layer as a dotted module path, instead of the architecture's default")
    p.add_argument("--save-maps", metavar="DIR", help="also write each raw map as DIR/<row>-<model>.npy")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cli.add_storage_option(p)
    return cli.run(draw, p, argv)


def draw(args: argparse.Namespace) -> None:
    options = cli.storage_options(args.storage_option)
    samples, classes = images.samples(args.images, args.num, options)  # cheap checks first
    loaded = [models.load(spec, options, torch.device(args.device), args.layer) for spec in args.model]
    cells = cam.compute(loaded, samples, args.target, progress=sys.stderr.isatty())
    fig = figure.draw(loaded, samples, cells, classes)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    if args.save_maps:
        out = Path(args.save_maps)
        out.mkdir(parents=True, exist_ok=True)
        for r, row in enumerate(cells):
            for m, cell in zip(loaded, row, strict=True):
                np.save(out / f"{r:03d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', m.name)}.npy", cell.cam)
    logging.getLogger("orchestrator.gradcam").info("wrote %s (%d images x %d models)", args.out, len(samples), len(loaded))


if __name__ == "__main__":
    sys.exit(main())
