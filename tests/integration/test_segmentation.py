"""Segmentation through the one training loop: the smoke recipe learns, resume is exact, and the mIoU of
several ranks (gloo) is the mIoU of one process on the same weights, every validation image counted once."""

from __future__ import annotations

import csv
import json
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from orchestrator import recipe as recipes
from orchestrator.data import manifest as mf
from orchestrator.data.reader import ShardDataset, ShardLoader
from orchestrator.data.seg_transforms import SegEval
from orchestrator.launch import local
from orchestrator.rundir import RunDir
from orchestrator.train import loop
from orchestrator.train.context import TrainContext
from orchestrator.train.tasks import confusion_metrics
from tests.conftest import seg_recipe

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def trained(seg_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The smoke recipe for 60 iterations on the test set, evaluated at 30 and at the end (multi-scale too)."""
    tmp = tmp_path_factory.mktemp("seg")
    result = local.run(seg_recipe(tmp, seg_dir, "run.name=smoke", "schedule.iterations=60", "run.eval_every_steps=30",
                                  "segment.aug_test=true", "data.num_workers=2"))
    return tmp / "runs" / "smoke", result


def majority_miou(val: Path) -> float:
    """The mIoU of predicting the most frequent class everywhere, over the classes present in the labels."""
    manifest = mf.load(str(val))
    counts = np.zeros(len(manifest.classes), dtype=np.int64)
    for _images, masks, _ids, _corrupt in ShardLoader(ShardDataset(manifest, SegEval(True), train=False), 1, 0):
        m = masks[0].numpy()
        counts += np.bincount(m[m != 255], minlength=len(counts))
    confusion = torch.zeros(len(counts), len(counts), dtype=torch.float64)
    confusion[:, int(counts.argmax())] = torch.from_numpy(counts)
    return confusion_metrics(confusion)[0]["mIoU"]


def test_smoke_recipe_learns_far_above_predicting_the_majority_class(trained: tuple[Path, dict[str, Any]],
                                                                    seg_dir: Path) -> None:
    run, result = trained
    baseline = majority_miou(seg_dir / "val")
    # Background holds ~80% of the pixels: predicting it everywhere scores ~16 mIoU over 5 classes. A broken head
    # or masks misaligned with their images stay near it; the smoke recipe reaches ~70 within 60 iterations.
    assert baseline < 20 and result["mIoU"] > baseline + 35, (baseline, result)
    assert result["val_images"] == 30 and result["step"] == 60 and result["ms_mIoU"] > baseline + 35
    evals = [(r["step"], r["mIoU"]) for r in RunDir(str(run)).records() if r.get("mIoU") is not None]
    assert [s for s, _ in evals] == [30, 60]
    with open(run / "per_class_iou.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == ["background", "circle", "square", "triangle", "cross"]
    assert np.mean([float(r["IoU"]) for r in rows]) == pytest.approx(result["mIoU"], abs=0.01)
    assert (run / "per_class_iou_ms.csv").exists() and (run / "curves.png").stat().st_size > 1000
    assert json.loads((run / "config.json").read_text())["task"] == "segmentation"


def test_n_plus_n_iterations_equal_2n_bitwise(seg_dir: Path, tmp_path: Path) -> None:
    """Photometric distortion, random resize/crop/flip, drop path, the auxiliary head and 2 workers, stopped at 6."""
    sets = ["schedule.iterations=12", "model.drop_path_rate=0.1", "data.num_workers=2"]
    local.run(seg_recipe(tmp_path, seg_dir, "run.name=straight", *sets))
    local.run(seg_recipe(tmp_path, seg_dir, "run.name=resumed", *sets, "run.max_steps=6"))
    local.run(seg_recipe(tmp_path, seg_dir, "run.name=resumed", *sets))
    records = RunDir(str(tmp_path / "runs" / "resumed")).records()
    assert [r["step"] for r in records if r["kind"] == "resume"] == [6]
    a, b = (load_file(tmp_path / "runs" / name / "model.safetensors") for name in ("straight", "resumed"))
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]


def _evaluate(rank: int, world: int, recipe_dict: dict[str, Any], out: str, port: int) -> None:
    """One rank: the loop's components with the trained weights (model.init), then the task's evaluation."""
    if world > 1:
        os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        dist.init_process_group("gloo", rank=rank, world_size=world)
    recipe = recipes.from_dict(recipe_dict)
    ctx = TrainContext(run=RunDir(f"{out}.run"), rank=rank, world_size=world)
    c = loop.build(recipe, ctx, resuming=False)
    metrics = c.task.evaluate(c.model, c, ctx, final=True)
    if rank == 0:
        Path(out).write_text(json.dumps(metrics))
    if world > 1:
        dist.destroy_process_group()


def test_distributed_miou_equals_single_process_miou(trained: tuple[Path, dict[str, Any]], seg_dir: Path,
                                                    tmp_path: Path) -> None:
    """30 validation images over 2 ranks x 2 workers (8/7/8/7): the confusion matrix summed across ranks gives
    the same mIoU, mAcc and aAcc (single- and multi-scale) as one process over all of them."""
    run, _ = trained
    recipe = seg_recipe(tmp_path, seg_dir, f"model.init={run / 'model.safetensors'}", "data.num_workers=2",
                        "segment.aug_test=true")
    _evaluate(0, 1, recipe.to_dict(redact=False), str(tmp_path / "one.json"), 0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_evaluate, args=(2, recipe.to_dict(redact=False), str(tmp_path / "two.json"), port), nprocs=2,
                       start_method="spawn")
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["val_images"] == two["val_images"] == 30
    assert one == two and one["mIoU"] > 40  # the trained weights, not a fresh head


def test_runs_listing_and_the_mask_figure_of_a_segmentation_run(trained: tuple[Path, dict[str, Any]], seg_dir: Path,
                                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.runs import main as runs_main
    from orchestrator.seg_figure import main as figure_main
    from orchestrator.seg_figure import predictions

    run, result = trained
    assert runs_main([str(run.parent), "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert (row["metric"], row["state"], row["last"]) == ("mIoU", "finished", result["mIoU"])
    assert row["best"] == max(r["mIoU"] for r in RunDir(str(run)).records() if r.get("mIoU") is not None)

    recipe = recipes.from_dict(json.loads((run / "config.json").read_text()))
    rows, names = predictions(recipe, str(run / "model.safetensors"), str(seg_dir / "val"), 3, torch.device("cpu"), {})
    assert names == ["background", "circle", "square", "triangle", "cross"] and len(rows) == 3
    for image, truth, pred in rows:
        assert image.shape[:2] == truth.shape == pred.shape == (48, 64)
        labelled = truth != 255
        assert (pred[labelled] == truth[labelled]).mean() > 0.8  # the trained weights predict the masks
    out = tmp_path / "masks.png"
    assert figure_main([str(run), "--out", str(out), "--num", "3"]) == 0
    assert out.stat().st_size > 10_000
    assert figure_main([str(seg_dir / "val"), "--out", str(out)]) == 2  # not a run: one error line
    assert "not a segmentation run" in capsys.readouterr().err
