"""``python -m orchestrator.finetune RECIPE --set model.init=<run or checkpoint>``: fine-tune from a pretraining result."""

import sys

from orchestrator.cli import main

if __name__ == "__main__":
    sys.exit(main("orchestrator.finetune", "Fine-tune InceptionNeXt (e.g. at 384) from a run or checkpoint.", require_init=True))
