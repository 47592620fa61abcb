"""``orchestrator.evaluate``: a run's own recorded top-1 exactly, timm's evaluation within 0.1 point, the
official release layout, folders read without sharding, every image once on any world size, and bad input
named before anything is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from orchestrator import evaluate, runs
from orchestrator.data.transforms import timm_eval_transform
from orchestrator.launch import local
from orchestrator.rundir import RunDir
from tests.conftest import ROOT, smoke_recipe


@pytest.fixture(scope="module")
def trained(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smoke run of 2 epochs at 32 px with an EMA: final weights, EMA weights and checkpoints."""
    root = tmp_path_factory.mktemp("evaluate")
    recipe = smoke_recipe(root, synth_dir, "ema.decay=0.9", "run.name=evaluated", "run.checkpoint_every_steps=5")
    local.run(recipe)
    return root / "runs" / "evaluated"


@pytest.fixture(scope="module")
def image_folder(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The val shard written out as an ImageFolder tree (class folders named by wnid, as ImageNet's)."""
    root = tmp_path_factory.mktemp("folder") / "val"
    manifest = json.loads((synth_dir / "val" / "manifest.json").read_text())
    wnids = [c["wnid"] for c in manifest["classes"]]
    for shard in sorted((synth_dir / "val").glob("*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            folder = root / wnids[row["label"]]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / Path(row["image"]["path"]).name).write_bytes(row["image"]["bytes"])
    return root


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict, str]:
    code = evaluate.main([*argv, "--json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out.splitlines()[-1]) if code == 0 else {}), err


def recorded(run: Path, key: str) -> float:
    return [r for r in RunDir(str(run)).records() if r["kind"] == "epoch"][-1][key]


def test_a_run_evaluated_gives_exactly_the_top1_it_recorded(trained: Path, synth_dir: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    for which, key in (("model", "top1"), ("final", "ema_top1")):  # final: the EMA weights first
        code, result, err = run_main([str(trained), "--data", f"{synth_dir}/val", "--which", which], capsys)
        assert code == 0, err
        assert result["top1"] == recorded(trained, key) and result["val_images"] == 80
    saved = json.loads((trained / "eval" / "synth0-val.json").read_text())  # saved with the run
    assert saved["top1"] == recorded(trained, "ema_top1") and saved["weights"].endswith("model_ema.safetensors")
    assert runs.summary(RunDir(str(trained)))["evaluations"]["synth0-val"]["top1"] == saved["top1"]  # runs --json
    code, result, err = run_main([str(trained), "--data", f"{synth_dir}/val", "--which", "step-10"], capsys)
    assert code == 0 and result["weights"].endswith("step-00000010"), err


def test_top1_and_top5_match_timms_own_evaluation_of_a_folder(trained: Path, image_folder: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The folder read directly (no shards) against timm's create_transform(is_training=False) on PIL images
    and a plain torch loop."""
    code, ours, err = run_main([str(trained), "--data", str(image_folder), "--which", "model", "--out",
                                str(image_folder.parent / "out.json")], capsys)
    assert code == 0, err
    model = timm.create_model("inception_next_atto", num_classes=10)
    model.load_state_dict(load_file(trained / "model.safetensors"))
    model.eval()
    transform = timm_eval_transform(32, 0.875, "bicubic")  # the smoke recipe's data settings
    classes = sorted(p.name for p in image_folder.iterdir())
    hits1 = hits5 = total = 0
    with torch.no_grad():
        for label, wnid in enumerate(classes):
            for path in sorted((image_folder / wnid).iterdir()):
                logits = model(transform(Image.open(path).convert("RGB"))[None])
                top5 = logits.topk(5).indices[0].tolist()
                hits1, hits5, total = hits1 + (top5[0] == label), hits5 + (label in top5), total + 1
    assert ours["val_images"] == total == 80
    assert abs(ours["top1"] - 100 * hits1 / total) <= 0.1 and abs(ours["top5"] - 100 * hits5 / total) <= 0.1


def test_an_official_release_file_is_evaluated_with_the_architecture_given(trained: Path, synth_dir: Path,
                                                                           tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """sail-sg/inceptionnext's release files are a plain ``torch.save(model.state_dict())`` with timm's keys and
    no architecture recorded: it is asked for, then taken from ``--set model.name``."""
    official = tmp_path / "inceptionnext_atto.pth"
    torch.save(load_file(trained / "model.safetensors"), official)
    sets = ["--batch-size", "32", "--set", "data.input_size=32"]  # the run evaluated in micro-batches of 32
    code, _, err = run_main([str(official), "--data", f"{synth_dir}/val", *sets], capsys)
    assert code == 2 and "does not record its architecture; add --set model.name" in err
    code, result, err = run_main([str(official), "--data", f"{synth_dir}/val", *sets, "model.name=inception_next_atto"],
                                 capsys)
    assert code == 0, err
    assert result["transform"] == {"input_size": 32, "crop_pct": 0.875, "interpolation": "bicubic"}  # timm's cfg, size given
    assert result["top1"] == recorded(trained, "top1")
    assert (tmp_path / "inceptionnext_atto.synth0-val.eval.json").exists()


def test_bad_input_is_named_and_nothing_is_written(trained: Path, synth_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.json"
    wide = tmp_path / "wide.safetensors"
    from safetensors.torch import save_file

    sd = load_file(trained / "model.safetensors")
    sd["head.fc2.weight"], sd["head.fc2.bias"] = torch.zeros(12, sd["head.fc2.weight"].shape[1]), torch.zeros(12)
    save_file(sd, wide, metadata={"model": "inception_next_atto"})
    cases = [
        ([str(wide), "--data", f"{synth_dir}/val"], "classifier has 12 classes; --data"),
        ([str(trained), "--data", str(tmp_path / "empty")], f"{tmp_path}/empty: not found"),
        ([str(trained), "--data", f"{synth_dir}/val", "--which", "step-7"], "no committed checkpoint at step 7"),
        ([str(tmp_path / "nothing.safetensors"), "--data", f"{synth_dir}/val"], "nothing.safetensors: not found"),
    ]
    for argv, message in cases:
        code, _, err = run_main([*argv, "--out", str(out)], capsys)
        assert code == 2 and message in err, (argv, err)
    assert not out.exists()


def test_every_image_once_on_three_ranks(trained: Path, image_folder: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """torchrun with 3 processes (80 images do not divide by 3): the same counts as one process. A folder read
    directly (the shards' split across ranks is the training loop's evaluation, tested with it)."""
    code, one, err = run_main([str(trained), "--data", str(image_folder), "--out", str(tmp_path / "one.json")], capsys)
    assert code == 0, err
    out = tmp_path / "three.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
                           "-m", "orchestrator.evaluate", str(trained), "--data", str(image_folder), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    three = json.loads(out.read_text())
    assert three["world_size"] == 3 and one["world_size"] == 1
    assert (three["val_images"], three["top1"], three["top5"]) == (80, one["top1"], one["top5"])
