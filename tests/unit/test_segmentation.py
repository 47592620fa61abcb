"""Segmentation without services: recipes against Table 2 and the configs, sharding of masks, mmseg's training
augmentation keeping image and mask aligned, the ignore label, the metrics, the heads and weight loading."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from model.config import HeadConfig, ModelConfig
from model.factory import create_model
from model.segmentation import create_segmentation_model, load_pretrained
from model.weight_format import WeightsError
from orchestrator import recipe as recipes
from orchestrator.data import manifest as mf
from orchestrator.data.reader import ShardDataset, ShardLoader
from orchestrator.data.seg_sources import open_segmentation_source
from orchestrator.data.seg_transforms import MEAN_PIXEL, SegEval, SegTrain, decode_mask, rescale_size
from orchestrator.data.shard_writer import WriteOptions, write_dataset
from orchestrator.errors import RecipeError
from orchestrator.train.tasks import Segmentation, confusion_metrics, confusion_of
from tests.conftest import ROOT

SEG = ROOT / "recipes" / "seg"

# Supplementary Table 2: peak stochastic depth of the backbone.
TABLE_2 = {("upernet", "t"): 0.2, ("upernet", "s"): 0.3, ("upernet", "b"): 0.4,
           ("fpn", "t"): 0.1, ("fpn", "s"): 0.2, ("fpn", "b"): 0.2}
# The referenced configs (Swin's upernet_swin_*_512x512_160k_ade20k.py and bases; PoolFormer's
# fpn_poolformer_*_ade20k_40k.py and mmseg's fpn_r50.py / ade20k.py), as the recipes must give them.
CONFIGS = {
    "upernet": {"schedule.iterations": 160000, "batch.global_batch_size": 16, "segment.crop_size": 512,
                "optimizer.name": "adamw", "optimizer.lr": 6e-5, "optimizer.weight_decay": 0.01,
                "optimizer.betas": [0.9, 0.999], "schedule.sched": "poly", "schedule.power": 1.0, "schedule.min_lr": 0.0,
                "schedule.warmup_iterations": 1500, "head.name": "upernet", "head.channels": 512,
                "head.pool_scales": [1, 2, 3, 6], "head.dropout": 0.1, "head.aux_weight": 0.4, "head.aux_channels": 256,
                "run.eval_every_steps": 16000, "segment.test_mode": "whole"},
    "fpn": {"schedule.iterations": 40000, "batch.global_batch_size": 32, "segment.crop_size": 512,
            "optimizer.name": "adamw", "optimizer.lr": 2e-4, "optimizer.weight_decay": 1e-4, "schedule.sched": "poly",
            "schedule.power": 0.9, "schedule.min_lr": 0.0, "schedule.warmup_iterations": 0, "head.name": "fpn",
            "head.channels": 128, "head.neck_channels": 256, "head.dropout": 0.1, "head.aux_weight": 0.0,
            "run.eval_every_steps": 4000, "segment.test_mode": "whole", "segment.test_size_divisor": 32},
}
ADE20K_PIPELINE = {"model.num_classes": 150, "segment.scale": [2048, 512], "segment.ratio_range": [0.5, 2.0],
                   "segment.cat_max_ratio": 0.75, "segment.photometric": True, "segment.ignore_index": 255,
                   "segment.aug_test_ratios": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75], "task": "segmentation"}
NAMES = {"t": "inception_next_tiny", "s": "inception_next_small", "b": "inception_next_base"}


def value(r: recipes.Recipe, dotted: str):
    if "." not in dotted:
        return getattr(r, dotted)
    section, key = dotted.split(".")
    return getattr(getattr(r, section), key)


@pytest.mark.parametrize(("head", "size"), sorted(TABLE_2))
def test_recipes_match_table_2_and_the_referenced_configs(head: str, size: str) -> None:
    r = recipes.load(SEG / f"{head}_{size}.yaml")
    expected = {**CONFIGS[head], **ADE20K_PIPELINE, "model.drop_path_rate": TABLE_2[(head, size)],
                "model.name": NAMES[size], "model.init": f"inceptionnext-{size}-in1k"}
    wrong = {k: (value(r, k), v) for k, v in expected.items() if value(r, k) != v}
    assert not wrong, f"{head}_{size}.yaml (got, expected): {wrong}"
    assert recipes.plan_batch(r, 8).micro_batch == (2 if head == "upernet" else 4)  # samples_per_gpu on 8 GPUs


def test_segmentation_recipe_errors_name_the_key(tmp_path: Path) -> None:
    for override, message in [("head.name=deeplab", "head.name: 'deeplab' is not upernet or fpn"),
                              ("segment.test_mode=grid", "segment.test_mode: 'grid' is not whole or slide"),
                              ("segment.ratio_range=[2.0, 0.5]", "segment.ratio_range: expected [low, high]"),
                              ("segment.ignore_index=300", "segment.ignore_index: 300 is not a mask value")]:
        with pytest.raises(RecipeError, match=message.replace("[", r"\[")):
            recipes.load(SEG / "smoke.yaml", [override])
    (tmp_path / "r.yaml").write_text(f"extends: {SEG / 'smoke.yaml'}\ntask: detection\n")
    with pytest.raises(RecipeError, match=r"r.yaml: task: 'detection' is not one of classification, segmentation"):
        recipes.load(tmp_path / "r.yaml")
    wrong_entry = subprocess.run([sys.executable, "-m", "orchestrator.pretrain", str(SEG / "smoke.yaml")], cwd=ROOT,
                                 capture_output=True, text=True, timeout=60)
    assert wrong_entry.returncode == 2 and "task: segmentation recipes run with python -m orchestrator.segment" in wrong_entry.stderr


# --- shards ------------------------------------------------------------------------------------
def png(mask: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8), "L").save(out, format="PNG")
    return out.getvalue()


def jpeg(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", quality=95)
    return out.getvalue()


def ade_layout(root: Path, masks: dict[str, list[np.ndarray]]) -> Path:
    """The ADEChallengeData2016 layout under ``root``: per folder (training, validation) each mask as a PNG and a
    random JPEG of its size, named as ADE20K's files are."""
    rng = np.random.default_rng(1)
    for folder, arrays in masks.items():
        (root / "images" / folder).mkdir(parents=True)
        (root / "annotations" / folder).mkdir(parents=True)
        for i, mask in enumerate(arrays):
            name = f"ADE_{folder}_{i:08d}"
            (root / "images" / folder / f"{name}.jpg").write_bytes(jpeg(rng.integers(0, 255, (*mask.shape, 3), dtype=np.uint8)))
            (root / "annotations" / folder / f"{name}.png").write_bytes(png(mask))
    return root


@pytest.fixture
def ade(tmp_path: Path) -> Path:
    """The ADEChallengeData2016 layout: 10 training and 5 validation pairs of several sizes (values 0-150),
    a training image whose mask has another size, and objectInfo150.txt naming three classes."""
    rng = np.random.default_rng(0)
    root = ade_layout(tmp_path / "ADEChallengeData2016", {
        folder: [rng.integers(0, 151, (int(rng.integers(20, 40)), int(rng.integers(20, 40)))) for _ in range(n)]
        for folder, n in (("training", 10), ("validation", 5))})
    (root / "images" / "training" / "ADE_bad.jpg").write_bytes(jpeg(np.zeros((20, 30, 3), np.uint8)))
    (root / "annotations" / "training" / "ADE_bad.png").write_bytes(png(np.zeros((21, 30))))
    (root / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n1\t0.1\t1\t1\twall\n"
                                            "2\t0.1\t1\t1\tbuilding;edifice\n3\t0.1\t1\t1\tsky\n")
    return root


def stored(split: Path) -> dict[str, tuple[bytes, bytes]]:
    """path -> (image bytes, mask bytes) as the shards of ``split`` hold them."""
    manifest = json.loads((split / "manifest.json").read_text())
    out = {}
    for shard in manifest["shards"]:
        table = pq.read_table(split / shard["url"])
        for image, mask in zip(table.column("image").to_pylist(), table.column("mask").to_pylist(), strict=True):
            out[image["path"]] = (image["bytes"], mask["bytes"])
    return out


def test_ade20k_masks_survive_sharding_bit_exactly_and_read_back_reduced(ade: Path, tmp_path: Path) -> None:
    report = write_dataset(open_segmentation_source(str(ade)), str(tmp_path / "shards"),
                           WriteOptions(shard_size_mb=0.01, rows_per_group=4, seed=0))
    assert report.skipped_images == 1  # ADE_bad: image 30x20, mask 30x21
    manifest = mf.load(str(tmp_path / "shards" / "train"))
    assert (manifest.task, manifest.reduce_zero_label, [c.name for c in manifest.classes]) == \
        ("segmentation", True, ["wall", "building", "sky"])
    for split, folder, n in (("train", "training", 10), ("val", "validation", 5)):
        rows = stored(tmp_path / "shards" / split)
        assert len(rows) == n
        for path, (image, mask) in rows.items():
            stem = Path(path).stem
            assert image == (ade / "images" / folder / f"{stem}.jpg").read_bytes()
            assert mask == (ade / "annotations" / folder / f"{stem}.png").read_bytes()

    # Through the reader: every validation image once, its mask decoded with ADE20K's reduce_zero_label.
    val = mf.load(str(tmp_path / "shards" / "val"))
    loader = ShardLoader(ShardDataset(val, SegEval(val.reduce_zero_label), train=False), 1, num_workers=2)
    by_id = [Path(p).stem for p in stored(tmp_path / "shards" / "val")]  # sample ids follow shard order
    seen = []
    for _images, masks, ids, corrupt in loader:
        raw = np.array(Image.open(ade / "annotations" / "validation" / f"{by_id[int(ids[0])]}.png"))
        expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
        assert torch.equal(masks[0].long(), torch.from_numpy(expected)) and int(corrupt[0]) == 0
        seen.append(int(ids[0]))
    assert sorted(seen) == list(range(5))


def test_parquet_with_a_mask_column_is_sharded_with_its_masks(tmp_path: Path) -> None:
    """The Hugging Face layout (image and annotation structs) keeps its masks bit for bit too."""
    rng = np.random.default_rng(1)
    pairs = [(jpeg(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)), png(rng.integers(0, 151, (24, 32))))
             for _ in range(6)]
    src = tmp_path / "hf" / "data"
    src.mkdir(parents=True)
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for split, part in (("train", pairs[:4]), ("validation", pairs[4:])):
        pq.write_table(pa.table({
            "image": pa.array([{"bytes": i, "path": f"{split}{k}.jpg"} for k, (i, _) in enumerate(part)], type=struct),
            "annotation": pa.array([{"bytes": m, "path": None} for _, m in part], type=struct)}),
            src / f"{split}-00000-of-00001.parquet")
    write_dataset(open_segmentation_source(str(tmp_path / "hf")), str(tmp_path / "shards"),
                  WriteOptions(shard_size_mb=1, rows_per_group=2, seed=0))
    for split, part in (("train", pairs[:4]), ("val", pairs[4:])):
        assert sorted(stored(tmp_path / "shards" / split).values()) == sorted(part)


def test_a_set_of_our_own_in_the_ade20k_layout_is_counted_from_its_masks(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """No objectInfo150.txt: 10 classes (mask values 1-10 after reduce_zero_label), named by index with one
    warning, not ADE20K's 150; ``--classes FILE`` names them, and a file naming too few is refused."""
    from orchestrator.data.__main__ import main as data_main

    rng = np.random.default_rng(2)
    masks = {folder: [rng.integers(0, 10, (16, 24)) for _ in range(n)] for folder, n in (("training", 3), ("validation", 2))}
    masks["validation"][1][0, 0] = 10  # the largest label, in one mask
    root = ade_layout(tmp_path / "mine", masks)
    shard = ["shard", str(root), "--task", "segmentation", "--shard-size-mb", "1"]
    assert data_main([*shard, str(tmp_path / "counted")]) == 0
    assert [c.name for c in mf.load(str(tmp_path / "counted" / "val")).classes] == [str(i) for i in range(10)]
    assert "10 classes found in the masks (largest label 10, reduce_zero_label), named by index" in caplog.text
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"thing {i}" for i in range(10)) + "\n")
    assert data_main([*shard, str(tmp_path / "named"), "--classes", str(names)]) == 0
    assert [c.name for c in mf.load(str(tmp_path / "named" / "train")).classes] == [f"thing {i}" for i in range(10)]
    names.write_text("a\nb\nc\n")
    capsys.readouterr()
    assert data_main([*shard, str(tmp_path / "refused"), "--classes", str(names)]) == 2
    assert f"--classes {names} names 3 classes, but the masks of {root} have label 10" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_classification_shards_are_refused_for_a_segmentation_recipe(synth_dir: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "orchestrator.segment", str(SEG / "smoke.yaml"), "--launcher=local",
                           "--set", f"data.train={synth_dir}/train", f"data.val={synth_dir}/val",
                           f"run.storage={tmp_path}/runs"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"data.train={synth_dir}/train: holds classification shards, the recipe's task is segmentation" in done.stderr
    assert not (tmp_path / "runs").exists()  # refused before anything was written


# --- augmentation --------------------------------------------------------------------------------
PALETTE = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30]], dtype=np.int64)


def scene(seed: int) -> tuple[bytes, bytes]:
    """An image whose mask can be read off its pixels: blocks of four colours, mask value = colour index + 1
    (value 0, "other", marks a block that is ignored after reduce_zero_label)."""
    rng = np.random.default_rng(seed)
    h, w = 48, 64
    classes = np.kron(rng.integers(0, 4, (h // 16, w // 16)), np.ones((16, 16), dtype=np.int64))
    mask = classes + 1
    mask[16:24, 24:40] = 0
    return jpeg(PALETTE[classes].astype(np.uint8)), png(mask)


def agreement(image: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """The share of labelled pixels inside uniform 5x5 neighbourhoods whose colour is their label's colour."""
    m = mask.long().numpy()
    pad = np.pad(m, 2, constant_values=-1)  # a crop edge has unknown neighbours
    uniform = np.ones_like(m, dtype=bool)
    for dy in range(5):
        for dx in range(5):
            uniform &= pad[dy:dy + m.shape[0], dx:dx + m.shape[1]] == m
    inside = uniform & (m != 255)
    colour = np.abs(image.numpy()[..., None, :].astype(np.int64) - PALETTE).sum(-1).argmin(-1)
    return float((colour[inside] == m[inside]).mean()), int(inside.sum())


def test_training_augmentation_keeps_image_and_mask_aligned() -> None:
    """Resize (x0.5-2), crop, flip and pad on images whose masks are a function of their pixels: every labelled
    interior pixel still shows its class's colour, padding is the mean pixel with ignore labels, and a mask
    flipped against its image (what a misalignment looks like) fails the same check."""
    train = SegTrain(crop=48, scale=[64, 48], ratio_range=[0.5, 2.0], cat_max_ratio=0.75, photometric=False,
                     reduce_zero_label=True)
    sizes, flipped_scores = set(), []
    for seed in range(40):
        np.random.seed(seed)
        image, mask = train(*scene(seed))
        assert image.shape == (48, 48, 3) and mask.shape == (48, 48) and image.dtype == mask.dtype == torch.uint8
        score, pixels = agreement(image, mask)
        assert pixels > 100 and score > 0.995, (seed, score)
        flipped_scores.append(agreement(image, mask.flip(1))[0])
        padded = (mask == 255).all(0)  # whole padded columns on the right
        sizes.add(int((~padded).sum()))
        assert (image[:, padded] == torch.from_numpy(MEAN_PIXEL)).all()
    assert len(sizes) > 5  # the resize ratio varied (padding widths differ)
    assert np.mean(flipped_scores) < 0.6  # chance agreement of a misaligned pair (some scenes are symmetric)


def test_photometric_distortion_leaves_the_mask_alone_and_changes_the_image() -> None:
    on = SegTrain(48, [64, 48], [0.5, 2.0], 0.75, True, True)
    off = SegTrain(48, [64, 48], [0.5, 2.0], 0.75, False, True)
    changed = 0
    for seed in range(10):
        data = scene(seed)
        np.random.seed(seed)
        a_image, a_mask = on(*data)
        np.random.seed(seed)
        b_image, b_mask = off(*data)
        assert torch.equal(a_mask, b_mask)  # photometric draws come after every geometric one
        changed += not torch.equal(a_image, b_image)
    assert changed >= 8  # each of its four ops fires with probability 1/2


def test_crop_respects_cat_max_ratio() -> None:
    """mmseg's RandomCrop retries (up to 10 times) while one class fills 75% or more of the crop."""
    mask = np.zeros((48, 64), dtype=np.uint8)
    mask[:, 56:] = 1  # class 1 only in the right eighth: a crop is mixed when its left edge is 45-48 (4 of 49)

    def mixed_share(cat_max_ratio: float) -> float:
        train, mixed = SegTrain(16, [64, 48], [1.0, 1.0], cat_max_ratio, False, False), []
        for seed in range(200):
            np.random.seed(seed)
            top, left = train.crop_box(mask)
            counts = np.bincount(mask[top:top + 16, left:left + 16].ravel(), minlength=2)
            mixed.append(counts.max() / counts.sum() < 0.75)
        return float(np.mean(mixed))

    assert mixed_share(1.0) < 0.15 and mixed_share(0.75) > 0.45  # one draw: 8%; up to 11 draws: 61%
    assert rescale_size(375, 500, (2048, 512)) == (512, 683)  # mmcv's keep-ratio rescale


# --- the ignore label and the metrics --------------------------------------------------------------
def test_reduce_zero_label_maps_other_to_ignore() -> None:
    mask = decode_mask(png(np.array([[0, 1, 2, 150]])), reduce_zero_label=True)
    assert mask.tolist() == [[255, 0, 1, 149]]
    assert decode_mask(png(np.array([[0, 1]])), reduce_zero_label=False).tolist() == [[0, 1]]


def test_ignored_pixels_count_neither_in_the_metrics_nor_in_the_loss() -> None:
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, 3, (16, 16), generator=g)
    mask[:4] = 255
    pred = mask.clone()
    pred[:4] = 1  # any prediction where the label is ignored
    metrics, _ = confusion_metrics(confusion_of(pred, mask, 3, 255).view(3, 3))
    assert metrics == {"mIoU": 100.0, "mAcc": 100.0, "aAcc": 100.0}
    pred[5, 5] = (mask[5, 5] + 1) % 3  # one wrong labelled pixel is counted
    assert confusion_metrics(confusion_of(pred, mask, 3, 255).view(3, 3))[0]["aAcc"] < 100

    task = Segmentation(recipes.load(SEG / "smoke.yaml", ["model.num_classes=3", "head.aux_weight=0"]))
    logits = torch.randn(1, 3, 16, 16, generator=g)
    other = logits.clone()
    other[:, :, :4] = torch.randn(1, 3, 4, 16, generator=g) * 10
    targets = mask[None]
    assert torch.equal(task.loss((logits, None), targets), task.loss((other, None), targets))
    assert not torch.equal(task.loss((logits, None), targets), task.loss((logits * 2, None), targets))


def test_confusion_metrics_are_mmsegs_intersection_over_union() -> None:
    """Against mmseg's definition computed class by class: IoU = |P & L| / |P | L|, Acc = |P & L| / |L|, means
    over classes present in labels or predictions (a class absent from both is NaN and left out)."""
    g = torch.Generator().manual_seed(3)
    labels, preds = torch.randint(0, 4, (1000,), generator=g), torch.randint(0, 4, (1000,), generator=g)
    labels[labels == 3] = 0
    preds[preds == 3] = 1  # class 3 is absent from both
    metrics, table = confusion_metrics(confusion_of(preds, labels, 4, 255).view(4, 4))
    iou = [((preds == c) & (labels == c)).sum() / ((preds == c) | (labels == c)).sum() for c in range(3)]
    acc = [((preds == c) & (labels == c)).sum() / (labels == c).sum() for c in range(3)]
    assert metrics["mIoU"] == pytest.approx(100 * float(sum(iou)) / 3)
    assert metrics["mAcc"] == pytest.approx(100 * float(sum(acc)) / 3)
    assert metrics["aAcc"] == pytest.approx(100 * float((preds == labels).float().mean()))
    assert torch.isnan(table[3]).all()


def test_sliding_window_inference_covers_the_image_like_whole_inference() -> None:
    """On a model without spatial context (a 1x1 conv) overlapping windows average to the whole-image logits."""
    recipe = recipes.load(SEG / "smoke.yaml", ["segment.crop_size=16", "segment.test_stride=10", "model.num_classes=5"])
    task = Segmentation(recipe)
    conv = torch.nn.Conv2d(3, 5, 1)
    x = torch.randn(1, 3, 37, 50)
    slide = task.infer(conv, x)
    whole = Segmentation(recipes.with_values(recipe, {"segment.test_mode": "whole"})).infer(conv, x)
    torch.testing.assert_close(slide, whole, atol=1e-5, rtol=1e-5)
    probs = task.predict(conv, x, [0.5, 1.0], flip=True)
    assert probs.shape == (1, 5, 37, 50) and torch.allclose(probs.sum(1), torch.full((1, 37, 50), 4.0))


# --- heads and weights ---------------------------------------------------------------------------
ATTO = ModelConfig(name="inception_next_atto", num_classes=7, drop_path_rate=0.1)


def test_upernet_and_fpn_follow_mmsegs_heads_and_every_parameter_trains() -> None:
    x = torch.randn(2, 3, 64, 64)
    for head in (HeadConfig(name="upernet", channels=32, aux_channels=16),
                 HeadConfig(name="fpn", channels=16, neck_channels=24, aux_weight=0.0)):
        model = create_segmentation_model(ATTO, head).train()
        logits, aux = model(x)
        assert logits.shape == (2, 7, 16, 16)  # stride 4
        assert (aux.shape == (2, 7, 4, 4)) if head.aux_weight else aux is None  # the FCN head on stage 3 (stride 16)
        (logits.mean() + (aux.mean() if aux is not None else 0)).backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused, f"{head.name}: parameters without gradients break DDP: {unused[:5]}"
        assert model.eval()(x).shape == (2, 7, 16, 16)
    # The T model with the config's UPerHead: PPM over scales (1, 2, 3, 6) at 512 channels on 768 inputs.
    tiny = create_segmentation_model(ModelConfig(name="inception_next_tiny", num_classes=150), HeadConfig())
    assert [m[0].output_size for m in tiny.head.ppm] == [1, 2, 3, 6]
    assert tiny.head.bottleneck[0].in_channels == 768 + 4 * 512 and tiny.head.fpn_bottleneck[0].in_channels == 4 * 512
    assert tiny.aux[0][0].in_channels == 384 and tiny.aux[1][0].p == 0.1


def test_pretrained_classifier_weights_load_into_the_backbone(tmp_path: Path) -> None:
    classifier = create_model(ModelConfig(name="inception_next_atto", num_classes=10))
    model = create_segmentation_model(ATTO, HeadConfig(channels=16, aux_channels=8))
    what = load_pretrained(model, classifier.state_dict(), "pre.safetensors")
    assert "into the backbone" in what
    own = model.backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in classifier.state_dict().items() if not k.startswith("head."))
    copy = create_segmentation_model(ATTO, HeadConfig(channels=16, aux_channels=8))
    load_pretrained(copy, model.state_dict(), "seg.safetensors")  # a segmentation run's weights load whole
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), model.state_dict().values(), strict=True))
    with pytest.raises(WeightsError, match="does not fit"):
        load_pretrained(model, create_model(ModelConfig(name="inception_next_tiny")).state_dict(), "tiny.pth")
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, tmp_path / "pre.safetensors")
    task = Segmentation(recipes.load(SEG / "smoke.yaml", ["model.num_classes=7", "head.channels=16", "head.aux_channels=8"]))
    task.load_init(fresh := create_segmentation_model(ATTO, HeadConfig(channels=16, aux_channels=8)),
                   str(tmp_path / "pre.safetensors"))
    assert torch.equal(fresh.backbone.stem[0].weight, classifier.stem[0].weight)
