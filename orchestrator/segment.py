"""``python -m orchestrator.segment RECIPE [--set k=v ...] [--launcher ray|local] [--print-config] [--fresh]``:
semantic segmentation (``task: segmentation`` recipes, e.g. recipes/seg/upernet_t.yaml), the same loop and launchers."""

from __future__ import annotations

import sys

from orchestrator import pretrain


def main(argv: list[str] | None = None) -> int:
    return pretrain.main(argv, "orchestrator.segment", task="segmentation",
                         doc="ADE20K-style semantic segmentation (UperNet or Semantic FPN) on an InceptionNeXt backbone.")


if __name__ == "__main__":
    sys.exit(main())
