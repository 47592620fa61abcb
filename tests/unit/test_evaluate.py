"""``orchestrator.evaluate``: a run's own recorded top-1 exactly, timm's evaluation within 0.1 point, the
official release layout, folders read without sharding, every image once on any world size, and bad input
named before anything is written."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from model.weight_format import recorded_config
from orchestrator import evaluate, pretrain, runs
from orchestrator.data.transforms import timm_eval_transform
from orchestrator.rundir import RunDir
from tests.conftest import ROOT, smoke_recipe


@pytest.fixture(scope="module")
def trained(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smoke run of 2 epochs at 32 px with an EMA: final weights, EMA weights and checkpoints."""
    root = tmp_path_factory.mktemp("evaluate")
    recipe = smoke_recipe(root, synth_dir, "ema.decay=0.9", "run.name=evaluated", "run.checkpoint_every_steps=5")
    pretrain.train(recipe)
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
    # Per class, beside it (and the run's own at its end): 10 classes whose images and hits add up to top-1.
    for table in (trained / "eval" / "per_class_acc_synth0-val.csv", trained / "per_class_acc_ema.csv"):
        with open(table) as f:
            rows = list(csv.DictReader(f))
        names = [c["name"] for c in json.loads((synth_dir / "val" / "manifest.json").read_text())["classes"]]
        assert [r["class"] for r in rows] == names and sum(int(r["images"]) for r in rows) == 80
        hits = sum(float(r["top1"]) * int(r["images"]) / 100 for r in rows)
        assert hits / 80 * 100 == pytest.approx(saved["top1"], abs=1e-6)
    assert runs.summary(RunDir(str(trained)))["evaluations"]["synth0-val"]["top1"] == saved["top1"]  # runs --json
    code, result, err = run_main([str(trained), "--data", f"{synth_dir}/val", "--which", "step-10"], capsys)
    assert code == 0 and result["weights"].endswith("step-00000010"), err
    # Each --which has its own file; the run's own result (its final weights) is untouched and is what runs shows.
    assert json.loads((trained / "eval" / "synth0-val.json").read_text()) == saved
    step = json.loads((trained / "eval" / "synth0-val.step-10.json").read_text())
    assert step["which"] == "step-10" and step["weights"] == result["weights"]
    assert (trained / "eval" / "synth0-val.model.json").exists()
    assert list(runs.summary(RunDir(str(trained)))["evaluations"]) == ["synth0-val"]
    assert set(runs.summary(RunDir(str(trained)), every_evaluation=True)["evaluations"]) == {
        "synth0-val", "synth0-val.model", "synth0-val.step-10"}


def timm_top5(sd: dict[str, torch.Tensor], paths: list[Path]) -> list[list[int]]:
    """The peer: timm's create_transform(is_training=False) on PIL images and a plain torch loop; each image's
    top-5 classes."""
    model = timm.create_model("inception_next_atto", num_classes=len(sd["head.fc2.bias"]))
    model.load_state_dict(sd)
    model.eval()
    transform = timm_eval_transform(32, 0.875, "bicubic")  # the smoke recipe's data settings
    with torch.no_grad():
        return [model(transform(Image.open(p).convert("RGB"))[None]).topk(5).indices[0].tolist() for p in paths]


def test_top1_and_top5_match_timms_own_evaluation_of_a_folder(trained: Path, image_folder: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The folder read directly (no shards) against timm's evaluation within 0.1 point."""
    code, ours, err = run_main([str(trained), "--data", str(image_folder), "--which", "model", "--out",
                                str(image_folder.parent / "out.json")], capsys)
    assert code == 0, err
    labelled = [(label, path) for label, wnid in enumerate(sorted(p.name for p in image_folder.iterdir()))
                for path in sorted((image_folder / wnid).iterdir())]
    top5 = timm_top5(load_file(trained / "model.safetensors"), [p for _, p in labelled])
    hits1 = sum(t[0] == label for t, (label, _) in zip(top5, labelled, strict=True))
    hits5 = sum(label in t for t, (label, _) in zip(top5, labelled, strict=True))
    assert ours["val_images"] == len(labelled) == 80
    assert abs(ours["top1"] - 100 * hits1 / 80) <= 0.1 and abs(ours["top5"] - 100 * hits5 / 80) <= 0.1


def imagenet_classifier(trained: Path, rows: list[int], path: Path) -> dict[str, torch.Tensor]:
    """The trained 10-class weights as a 1000-class ImageNet classifier: class k's row at ``rows[k]``, every
    other output far below (never predicted), saved to ``path`` with its architecture."""
    sd = load_file(trained / "model.safetensors")
    weight, bias = torch.zeros(1000, sd["head.fc2.weight"].shape[1]), torch.full((1000,), -1e4)
    weight[rows], bias[rows] = sd["head.fc2.weight"], sd["head.fc2.bias"]
    sd["head.fc2.weight"], sd["head.fc2.bias"] = weight, bias
    save_file(sd, path, metadata={"model": "inception_next_atto"})
    return sd


def test_imagenet_a_layout_with_its_label_subset(trained: Path, image_folder: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """ImageNet-A's 200 class folders (the images in the first 10): the 1000 outputs restricted to timm's
    index list score exactly what the 10-class weights score on their own classes."""
    synsets = (Path(timm.__file__).parent / "data" / "_info" / "imagenet_a_synsets.txt").read_text().split()
    indices = [int(v) for v in (Path(timm.__file__).parent / "data" / "_info" / "imagenet_a_indices.txt").read_text().split()]
    root = tmp_path / "imagenet-a"
    for k, wnid in enumerate(synsets):
        (root / wnid).mkdir(parents=True)
        if k < 10:
            for image in (image_folder / sorted(p.name for p in image_folder.iterdir())[k]).iterdir():
                (root / wnid / image.name).write_bytes(image.read_bytes())
    weights = tmp_path / "in1k.safetensors"
    imagenet_classifier(trained, indices[:10], weights)
    sets = ["--set", "data.input_size=32", "--batch-size", "32"]
    code, ours, err = run_main([str(weights), "--data", str(root), "--label-subset", "imagenet-a", *sets], capsys)
    assert code == 0, err
    code, own, err = run_main([str(trained), "--data", str(image_folder), "--which", "model", "--out",
                               str(tmp_path / "own.json")], capsys)
    assert (ours["val_images"], ours["top1"], ours["top5"]) == (80, own["top1"], own["top5"]), err
    assert (tmp_path / "in1k.imagenet-a.eval.json").exists() and ours["label_subset"] == "imagenet-a"
    (tmp_path / "indices.txt").write_text("\n".join(map(str, indices)) + "\n")  # the same list as a file
    code, listed, err = run_main([str(weights), "--data", str(root), "--label-subset", str(tmp_path / "indices.txt"), *sets,
                                  "--out", str(tmp_path / "listed.json")], capsys)
    assert code == 0 and (listed["top1"], listed["top5"]) == (ours["top1"], ours["top5"]), err
    # Without the subset the class counts differ; with ImageNet-R's the synsets do: both named, nothing written.
    for extra, message in (([], "classifier has 1000 classes; --data"), (["--label-subset", "imagenet-r"],
                                                                         "are not imagenet-r's 200 synsets")):
        code, _, err = run_main([str(weights), "--data", str(root), *sets, *extra, "--out", str(tmp_path / "x.json")],
                                capsys)
        assert code == 2 and message in err, err
    assert not (tmp_path / "x.json").exists()


@pytest.fixture(scope="module")
def flat_val(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """The images as a flat ILSVRC-2012 val folder (ILSVRC2012_val_<n>.JPEG) with its labels file, the 10
    classes being ImageNet's first 10 synsets; and each image's class."""
    from timm.data import ImageNetInfo

    wnids = ImageNetInfo("imagenet-1k").label_names()
    root = tmp_path_factory.mktemp("flat") / "val"
    root.mkdir()
    labels, lines = [], []
    for label, folder in enumerate(sorted(image_folder.iterdir())):
        for image in sorted(folder.iterdir()):
            name = f"ILSVRC2012_val_{len(labels) + 1:08d}.JPEG"
            (root / name).write_bytes(image.read_bytes())
            labels.append(label)
            lines.append(f"{name} {wnids[label]}")
    (root / "val_labels.txt").write_text("\n".join(lines) + "\n")
    return root, labels


def test_a_flat_val_folder_and_real_labels_match_timms_validator(trained: Path, flat_val: tuple[Path, list[int]],
                                                                 tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A flat val folder alone (the 1000 ImageNet classes, labels from its file) and ReaL labels scored as timm's
    RealLabelsImagenet scores them: some images with no ReaL label (not scored), some with two."""
    from timm.data import RealLabelsImagenet

    root, labels = flat_val
    sd = imagenet_classifier(trained, list(range(10)), tmp_path / "in1k.safetensors")
    real = [[] if i % 7 == 0 else [label, (label + 1) % 10] if i % 3 == 0 else [(label + 2) % 10] if i % 5 == 0
            else [label] for i, label in enumerate(labels)]
    (tmp_path / "real.json").write_text(json.dumps(real))
    code, ours, err = run_main([str(tmp_path / "in1k.safetensors"), "--data", str(root), "--set", "data.input_size=32",
                                "--real-labels", str(tmp_path / "real.json")], capsys)
    assert code == 0, err
    paths = sorted(root.glob("*.JPEG"))
    top5 = timm_top5(sd, paths)
    peer = RealLabelsImagenet([p.name for p in paths], real_json=str(tmp_path / "real.json"))
    peer.add_result(torch.zeros(len(top5), 1000).scatter_(1, torch.tensor(top5), torch.tensor([[5.0, 4, 3, 2, 1]] * len(top5))))
    assert ours["real_images"] == sum(1 for r in real if r) and ours["val_images"] == 80
    assert abs(ours["real_top1"] - peer.get_accuracy(1)) <= 0.1 and abs(ours["real_top5"] - peer.get_accuracy(5)) <= 0.1
    assert abs(ours["top1"] - 100 * sum(t[0] == y for t, y in zip(top5, labels, strict=True)) / 80) <= 0.1
    assert ours["real_top1"] != ours["top1"]  # the ReaL labels were used
    # Without FILE: timm's copy of real.json, whose first 80 entries these file names select.
    code, timms, err = run_main([str(tmp_path / "in1k.safetensors"), "--data", str(root), "--set", "data.input_size=32",
                                 "--real-labels", "--out", str(tmp_path / "timms.json")], capsys)
    shipped = json.loads((Path(timm.__file__).parent / "data" / "_info" / "imagenet_real_labels.json").read_text())[:80]
    assert code == 0 and timms["real_images"] == sum(1 for r in shipped if r), err


def test_a_timm_tag_is_read_from_the_local_cache_only(trained: Path, flat_val: tuple[Path, list[int]], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """``inception_next_atto.sail_in1k``: not cached, one line saying so (nothing is downloaded); in the Hugging
    Face cache's layout, evaluated as its file is."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    argv = ["inception_next_atto.sail_in1k", "--data", str(flat_val[0]), "--set", "data.input_size=32"]
    code, _, err = run_main(argv, capsys)
    assert code == 2 and "are not in the local cache" in err and "nothing is downloaded" in err, err
    snapshot = tmp_path / "hub" / "models--timm--inception_next_atto.sail_in1k" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    imagenet_classifier(trained, list(range(10)), snapshot / "model.safetensors")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    code, tagged, err = run_main(argv, capsys)
    assert code == 0, err
    code, filed, err = run_main([str(snapshot / "model.safetensors"), *argv[1:], "--out", str(tmp_path / "f.json")], capsys)
    assert (tagged["top1"], tagged["top5"]) == (filed["top1"], filed["top5"]) and tagged["val_images"] == 80, err
    assert tagged["transform"] == {"input_size": 32, "crop_pct": 0.875, "interpolation": "bicubic"}  # the tag's cfg
    assert tagged["saved"] == "eval/inception_next_atto.sail_in1k.flat0-val.json" and (tmp_path / tagged["saved"]).exists()


def test_an_official_release_file_is_evaluated_with_the_architecture_given(trained: Path, synth_dir: Path,
                                                                           tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str],
                                                                           caplog: pytest.LogCaptureFixture) -> None:
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
    assert ("records no preprocessing: evaluating with timm's defaults for inception_next_atto: data.crop_pct=0.875, "
            "data.interpolation=bicubic") in caplog.text  # the file says nothing of them: the defaults used, in one line
    assert result["top1"] == recorded(trained, "top1")
    assert (tmp_path / "inceptionnext_atto.synth0-val.eval.json").exists()


def test_a_weights_file_alone_is_evaluated_with_the_preprocessing_it_records(trained: Path, synth_dir: Path,
                                                                            tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The final weights carry architecture, classes and evaluation transform: the file copied away from its run gives
    the run's own top-1 with no --set, and timm users get the same settings through ``pretrained_cfg_overlay``."""
    alone = tmp_path / "model_ema.safetensors"
    shutil.copy(trained / "model_ema.safetensors", alone)
    code, result, err = run_main([str(alone), "--data", f"{synth_dir}/val"], capsys)
    assert code == 0, err
    assert result["top1"] == recorded(trained, "ema_top1") and "records no preprocessing" not in err
    assert result["transform"] == {"input_size": 32, "crop_pct": 0.875, "interpolation": "bicubic"}
    config = recorded_config(alone.read_bytes(), alone.name)
    classes = json.loads((synth_dir / "train" / "manifest.json").read_text())["classes"]
    assert config["label_names"] == [c["wnid"] for c in classes] and config["num_classes"] == 10
    model = timm.create_model(config["architecture"], pretrained=True, num_classes=config["num_classes"],
                              pretrained_cfg_overlay=dict(file=str(alone), **config["pretrained_cfg"]))
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert (tuple(data_cfg["input_size"]), data_cfg["crop_pct"]) == ((3, 32, 32), 0.875)
    assert torch.equal(model.state_dict()["head.fc2.bias"], load_file(alone)["head.fc2.bias"])


def test_bad_input_is_named_and_nothing_is_written(trained: Path, synth_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.json"
    empty = tmp_path / "folder"
    empty.mkdir()
    wide = tmp_path / "wide.safetensors"
    sd = load_file(trained / "model.safetensors")
    sd["head.fc2.weight"], sd["head.fc2.bias"] = torch.zeros(12, sd["head.fc2.weight"].shape[1]), torch.zeros(12)
    save_file(sd, wide, metadata={"model": "inception_next_atto"})
    no_ema = tmp_path / "no-ema"  # the run as a recipe without EMA leaves it
    shutil.copytree(trained, no_ema)
    (no_ema / "model_ema.safetensors").unlink()
    config = json.loads((no_ema / "config.json").read_text())
    (no_ema / "config.json").write_text(json.dumps({**config, "ema": {"decay": None}}))
    cases = [
        ([str(no_ema), "--data", f"{synth_dir}/val", "--which", "ema"], "its recipe has no EMA (ema.decay: null)"),
        ([str(wide), "--data", f"{synth_dir}/val"], "classifier has 12 classes; --data"),
        ([str(trained), "--data", str(tmp_path / "empty")], f"{tmp_path}/empty: not found"),
        ([str(trained), "--data", f"{synth_dir}/val", "--which", "step-7"], "no committed checkpoint at step 7"),
        ([str(tmp_path / "nothing.safetensors"), "--data", f"{synth_dir}/val"], "nothing.safetensors: not found"),
        ([str(trained), "--data", str(empty)], f"{empty}: no class folders found"),
        ([str(trained), "--data", str(synth_dir)], f"a dataset root holding the shards of train, val, not an evaluation "
                                                   f"set itself; give one split, e.g. --data {synth_dir}/val"),
        ([str(trained), "--data", "s3://nowhere/val", "--storage-option", "endpoint_url=http://127.0.0.1:9",
          "--storage-option", "key=k", "--storage-option", "secret=s"], "--data=s3://nowhere/val: cannot connect"),
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
