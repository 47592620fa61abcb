"""Iterations/s of one segmentation training step of this project's loop versus a plain PyTorch loop of the same
model (InceptionNeXt + UperNet with its auxiliary head), batch and crop, measured in the same run.

    .venv/bin/python bench/seg_step.py [--recipe recipes/seg/upernet_t.yaml] [--model inception_next_atto]
                                       [--crop 128] [--batch 4] [--steps 4] [--rounds 6] [--device cpu]

Both sides train on the same in-memory uint8 crops and masks (ignore label included), normalised on the
device as the loader leaves them, so only the step is timed. The loop's step includes what a real run pays
for: per-micro-batch reseeding, the non-finite guard, gradient accumulation bookkeeping and the per-step poly
schedule; the reference is model, two cross-entropies (decode + 0.4 x auxiliary), AdamW. The last line is
``ratio=<loop / reference>``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_step import images_per_sec  # noqa: E402  (bench/ is the script's folder)

from model.segmentation import create_segmentation_model, resize  # noqa: E402
from orchestrator import recipe as recipes  # noqa: E402
from orchestrator.data.device import normalize  # noqa: E402
from orchestrator.rundir import RunDir  # noqa: E402
from orchestrator.train import components, tasks  # noqa: E402
from orchestrator.train.context import TrainContext  # noqa: E402
from orchestrator.train.loop import train_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def pixel_loss(logits: torch.Tensor, targets: torch.Tensor, ignore: int) -> torch.Tensor:
    """mmseg 0.x's cross-entropy: over every pixel of the crop, ignored ones as zero (avg_non_ignore=False)."""
    return F.cross_entropy(resize(logits.float(), targets.shape[1:]), targets, ignore_index=ignore, reduction="none").mean()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "seg" / "upernet_t.yaml"))
    p.add_argument("--model", default="inception_next_atto", help="backbone (the recipe's head is kept)")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    recipe = recipes.load(args.recipe, [
        f"model.name={args.model}", "model.init=null", f"segment.crop_size={args.crop}",
        f"batch.global_batch_size={args.batch}", f"batch.per_device_max={args.batch}",
        f"scaling.gpus_per_worker={int(device.type == 'cuda')}", "scaling.num_workers=1", "data.train=unused"])
    ctx = TrainContext(run=RunDir("unused"), device=device)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (args.batch, args.crop, args.crop, 3), dtype=torch.uint8, generator=g)
    masks = torch.randint(0, recipe.model.num_classes, (args.batch, args.crop, args.crop), dtype=torch.uint8, generator=g)
    masks[:, -args.crop // 8:] = recipe.segment.ignore_index  # padding, as crops of small images have
    batch = (pixels, masks, torch.arange(args.batch), torch.zeros(args.batch))

    task = tasks.for_recipe(recipe)
    model = components.build_model(recipe, ctx, init=False, task=task)
    c = components.assemble(recipe, ctx, task, model, model, (None, None), 1000)
    state = {"step": 0, "nonfinite": 0}

    def ours() -> None:
        train_step(c, recipe, ctx, state, iter([batch]))
        state["step"] += 1

    ref_model = create_segmentation_model(recipe.model, recipe.head).to(device, memory_format=(
        torch.channels_last if c.channels_last else torch.contiguous_format)).train()
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=recipe.optimizer.lr, weight_decay=recipe.optimizer.weight_decay)
    targets = masks.to(device).long()
    dtype, ignore, aux_weight = c.autocast, recipe.segment.ignore_index, recipe.head.aux_weight

    def reference() -> None:
        ref_opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits, aux = ref_model(normalize(pixels, device, c.channels_last))
            loss = pixel_loss(logits, targets, ignore) + aux_weight * pixel_loss(aux, targets, ignore)
        loss.backward()
        ref_opt.step()

    c.step_model.train()
    rates: dict[str, list[float]] = {"reference": [], "loop": []}
    for _ in range(args.rounds):  # alternate so neither side profits from the machine's state
        rates["reference"].append(images_per_sec(reference, 1, args.steps, device))
        rates["loop"].append(images_per_sec(ours, 1, args.steps, device))
    ref, loop = max(rates["reference"]), max(rates["loop"])
    print(f"{args.model} + {recipe.head.name} ({recipe.head.channels} channels, aux {aux_weight}) crop {args.crop} "
          f"batch {args.batch} on {device} ({dtype or torch.float32})")
    print(f"reference loop (model + cross-entropy + AdamW): {ref:.3f} iterations/s")
    print(f"this loop's train_step:                         {loop:.3f} iterations/s")
    print(f"ratio={loop / ref:.3f}")


if __name__ == "__main__":
    main()
