"""Grad-CAM maps of a briefly trained InceptionNeXt: they must point at the object, and the figure has Figure 1's layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from orchestrator import pretrain
from orchestrator import recipe as recipes
from orchestrator.data.shard_writer import WriteOptions, write_dataset
from orchestrator.data.synth import SynthSource, box_from_path
from orchestrator.gradcam import cam, figure, images, models
from orchestrator.gradcam.__main__ import main
from tests.conftest import ROOT

SIZE = 96  # the last stage is 3x3 here; at 64 px (2x2) the maps are too coarse to say where the object is


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(shard dataset, run folder): atto trained for 4 short epochs on objects at random positions."""
    root = tmp_path_factory.mktemp("gradcam")
    data = root / "data"
    write_dataset(SynthSource(classes=10, train=640, val=40, size=SIZE), str(data), WriteOptions(seed=0))
    pretrain.train(recipes.load(ROOT / "recipes" / "smoke.yaml", [
        f"data.train={data}/train", f"data.val={data}/val", f"data.input_size={SIZE}", "data.crop_pct=1.0",
        "data.num_workers=0", "augment.auto_augment=null", "schedule.epochs=4", "batch.global_batch_size=32",
        "batch.per_device_max=32", f"run.storage={root}/runs", "run.name=cam",
    ]))
    return data, root / "runs" / "cam"


def test_maps_put_their_energy_on_the_object(trained: tuple[Path, Path]) -> None:
    data, run = trained
    samples, _ = images.samples(f"{data}/val", 40)
    cells_per_image = cam.compute([models.load(f"A={run}")], samples, progress=False)
    ratios = []
    for sample, (cell,) in zip(samples, cells_per_image, strict=True):
        assert cell.cam.shape == (SIZE, SIZE) and cell.cam.min() >= 0 and cell.cam.max() <= 1
        inside, area = cam.box_energy(cell.cam, box_from_path(sample.path), sample.image.size)
        ratios.append(inside / area)
    # Uniform maps give 1.0; measured here: mean 1.65, median 2.17 (1.94 and 2.16 after 6 epochs).
    assert np.mean(ratios) > 1.4, f"energy inside the object box / its area share: {np.round(ratios, 2)}"


def test_figure_has_a_row_per_image_and_a_column_per_model(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = trained
    resnet = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18", num_classes=10).state_dict(), str(resnet))
    out, maps = tmp_path / "figure.png", tmp_path / "maps"
    code = main(["--model", f"InceptionNeXt-A={run}", "--model", f"ResNet-18=resnet18@{resnet}", "--images",
                 f"{data}/val", "--num", "3", "--out", str(out), "--save-maps", str(maps), "--target", "label"])

    assert code == 0
    # 3 rows x 3 columns (input + 2 models) of 2.2-inch cells at 100 dpi, plus 0.3 inch for titles.
    assert Image.open(out).size == (660, 690)
    saved = sorted(p.name for p in maps.glob("*.npy"))
    assert saved == [f"{r:03d}-{m}.npy" for r in range(3) for m in ("InceptionNeXt-A", "ResNet-18")]
    assert np.load(maps / "000-InceptionNeXt-A.npy").shape == (SIZE, SIZE)
    assert np.load(maps / "000-ResNet-18.npy").shape == (224, 224)  # resnet18's own data config

    loaded = [models.load(f"A={run}"), models.load(f"R=resnet18@{resnet}")]
    samples, classes = images.samples(f"{data}/val", 3)
    fig = figure.draw(loaded, samples, cam.compute(loaded, samples, progress=False), classes)
    grid = [(ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start) for ax in fig.axes]
    assert grid == [(r, c) for r in range(3) for c in range(3)]
    assert [ax.get_title() for ax in fig.axes[:3]] == ["input", "A", "R"]
    assert fig.axes[0].get_xlabel() == classes[samples[0].label]  # true class under the input
    assert fig.axes[1].get_xlabel().split(" (")[0] in classes  # predicted class name under each map


def test_a_weights_file_is_shown_at_the_size_it_records(trained: tuple[Path, Path], tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """The run's final weights alone (96 px, crop_pct 1.0) are drawn at 96 px with their class names; a file that
    records nothing (a plain state dict, as ARCH@FILE) gets timm's defaults for the architecture, said in one line."""
    _, run = trained
    alone = models.load(f"A={run}/model.safetensors")
    assert alone.crop(Image.new("RGB", (200, 150))).size == (SIZE, SIZE) and alone.classes and len(alone.classes) == 10
    plain = tmp_path / "plain.pth"
    torch.save(load_file(run / "model.safetensors"), plain)
    with caplog.at_level("WARNING"):
        foreign = models.load(f"B=inception_next_atto@{plain}")
    assert foreign.crop(Image.new("RGB", (300, 300))).size == (224, 224)
    assert "the weights record no preprocessing: timm's defaults for inception_next_atto: input size 224, crop_pct 0.875" \
        in caplog.text


def test_bad_sources_are_named(trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, run = trained
    out = str(tmp_path / "f.png")
    assert main(["--model", f"X={tmp_path}/nothing-here", "--images", f"{data}/val", "--out", out]) == 2
    assert f"{tmp_path}/nothing-here" in capsys.readouterr().err
    assert main(["--model", "X=not_a_timm_arch@/tmp/w.safetensors", "--images", f"{data}/val", "--out", out]) == 2
    assert "'not_a_timm_arch' is not a timm architecture" in capsys.readouterr().err
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["--model", f"A={run}", "--images", str(folder), "--out", out]) == 2
    assert f"{folder}/broken.jpg: not a readable image" in capsys.readouterr().err
    Image.new("RGB", (40, 40)).save(folder / "broken.jpg")
    assert main(["--model", f"A={run}", "--images", str(folder), "--out", out, "--target", "label"]) == 2
    assert "--target label needs labelled images" in capsys.readouterr().err
    assert not Path(out).exists()
