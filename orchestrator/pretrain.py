"""``python -m orchestrator.pretrain RECIPE [--set k=v ...] [--launcher ray|local] [--print-config]``."""

import sys

from orchestrator.cli import main

if __name__ == "__main__":
    sys.exit(main("orchestrator.pretrain", "ImageNet pretraining of InceptionNeXt from a recipe."))
