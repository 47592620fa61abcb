"""Segmentation through the one training loop: the smoke recipe learns, resume is exact, and
``orchestrator.evaluate`` gives the run's recorded mIoU on one and two ranks (gloo), every validation image
counted once, from its shards and from an ADE20K-layout folder."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from orchestrator import pretrain
from orchestrator import recipe as recipes
from orchestrator.data import manifest as mf
from orchestrator.data.reader import ShardDataset, ShardLoader
from orchestrator.data.seg_transforms import SegEval
from orchestrator.rundir import RunDir
from orchestrator.train.tasks import confusion_metrics
from tests.conftest import ROOT, seg_recipe

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def trained(seg_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The smoke recipe for 60 iterations on the test set, evaluated at 30 and at the end (multi-scale too)."""
    tmp = tmp_path_factory.mktemp("seg")
    result = pretrain.train(seg_recipe(tmp, seg_dir, "run.name=smoke", "schedule.iterations=60", "run.eval_every_steps=30",
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
    pretrain.train(seg_recipe(tmp_path, seg_dir, "run.name=straight", *sets))
    pretrain.train(seg_recipe(tmp_path, seg_dir, "run.name=resumed", *sets, "run.max_steps=6"))
    pretrain.train(seg_recipe(tmp_path, seg_dir, "run.name=resumed", *sets))
    records = RunDir(str(tmp_path / "runs" / "resumed")).records()
    assert [r["step"] for r in records if r["kind"] == "resume"] == [6]
    a, b = (load_file(tmp_path / "runs" / name / "model.safetensors") for name in ("straight", "resumed"))
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]


def test_evaluate_gives_the_recorded_miou_on_one_and_two_ranks_and_from_an_ade20k_folder(
        trained: tuple[Path, dict[str, Any]], seg_dir: Path, tmp_path: Path) -> None:
    """``orchestrator.evaluate`` of the run: exactly the single- and multi-scale mIoU/mAcc/aAcc its end recorded;
    the same under torchrun on 2 ranks (30 images: 15 each, the confusion matrices summed); the same again from
    the val images and masks laid out as ADEChallengeData2016 and read directly (no shards, no objectInfo150.txt:
    the 5 classes are counted from the masks)."""
    run, result = trained
    keys = ("mIoU", "mAcc", "aAcc", "ms_mIoU", "ms_mAcc", "ms_aAcc")
    command = ["-m", "orchestrator.evaluate", str(run), "--json"]
    one = json.loads(subprocess.run([sys.executable, *command, "--data", str(seg_dir / "val")], cwd=ROOT, check=True,
                                    capture_output=True, text=True, timeout=300).stdout.splitlines()[-1])
    assert {k: one[k] for k in keys} == {k: result[k] for k in keys} and one["val_images"] == 30
    with open(run / "eval" / "per_class_iou_synth_seg0-val.csv") as f:
        assert [r["class"] for r in csv.DictReader(f)] == ["background", "circle", "square", "triangle", "cross"]
    assert (run / "eval" / "per_class_iou_synth_seg0-val_ms.csv").exists()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *command,
                           "--data", str(seg_dir / "val"), "--out", str(tmp_path / "two.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and {k: two[k] for k in (*keys, "val_images")} == {k: one[k] for k in (*keys, "val_images")}

    ade = tmp_path / "ADEChallengeData2016"
    for folder in ("images", "annotations"):
        (ade / folder / "validation").mkdir(parents=True)
    for path, (image, mask) in stored_pairs(seg_dir / "val").items():
        (ade / "images" / "validation" / f"{Path(path).stem}.jpg").write_bytes(image)
        (ade / "annotations" / "validation" / f"{Path(path).stem}.png").write_bytes(mask)
    done = subprocess.run([sys.executable, *command, "--data", str(ade), "--out", str(tmp_path / "ade.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "5 classes found in the masks" in done.stderr
    folder = json.loads((tmp_path / "ade.json").read_text())
    assert {k: folder[k] for k in (*keys, "val_images")} == {k: one[k] for k in (*keys, "val_images")}


def stored_pairs(split: Path) -> dict[str, tuple[bytes, bytes]]:
    """path -> (image bytes, mask bytes) of a segmentation split's shards."""
    out = {}
    for shard in sorted(split.glob("*.parquet")):
        table = pq.read_table(shard)
        for image, mask in zip(table.column("image").to_pylist(), table.column("mask").to_pylist(), strict=True):
            out[image["path"]] = (image["bytes"], mask["bytes"])
    return out


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
    # an iteration schedule: steps of its iterations, passes over the data done, and no epoch count
    assert (row["step"], row["schedule_steps"], row["epochs"]) == (60, 60, None) and row["epochs_done"] >= 1
    assert runs_main([str(run.parent)]) == 0
    line = capsys.readouterr().out.splitlines()[1].split()
    assert line[:5] == [run.name, "finished", "local", str(row["epochs_done"]), "60/60"], line

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
