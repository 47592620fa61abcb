"""``python -m orchestrator.finetune RECIPE --set model.init=<run or checkpoint>``: fine-tune from a pretraining result."""

from __future__ import annotations

import sys

from orchestrator import pretrain


def main(argv: list[str] | None = None) -> int:
    return pretrain.main(argv, "orchestrator.finetune", require_init=True,
                         doc="Fine-tune InceptionNeXt (e.g. at 384) from a run or checkpoint.")


if __name__ == "__main__":
    sys.exit(main())
