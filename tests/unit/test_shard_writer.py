"""The shard writer: source layouts, class order, mixing, resume, re-encoding, unreadable images."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from orchestrator.data import manifest as mf
from orchestrator.data.shard_writer import WriteOptions, is_image, plan_shards, write_dataset
from orchestrator.data.sources import Item, open_source
from orchestrator.data.synth import SynthSource, draw
from orchestrator.errors import DataError
from tests.conftest import ROOT

WNIDS = ["n01440764", "n01443537", "n01484850"]  # tench, goldfish, great white shark


def jpeg(label: int, seed: int, size: int = 48) -> bytes:
    img, _ = draw(label, 3, size, seed)
    out = io.BytesIO()
    img.save(out, format="JPEG")
    return out.getvalue()


@pytest.fixture
def ilsvrc(tmp_path: Path) -> Path:
    """ILSVRC-2012 layout: train/<wnid>/*.JPEG and a flat val/ with LOC_val_solution.csv."""
    root = tmp_path / "ilsvrc"
    rows = ["ImageId,PredictionString"]
    for c, wnid in enumerate(WNIDS):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(12):
            (root / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg(c, c * 100 + i))
    (root / "val").mkdir()
    for i in range(9):
        name = f"ILSVRC2012_val_{i + 1:08d}"
        (root / "val" / f"{name}.JPEG").write_bytes(jpeg(i % 3, 1000 + i))
        rows.append(f"{name},{WNIDS[i % 3]} 1 2 3 4")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows))
    return root


def shard(src: Path, dest: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.data", "shard", str(src), str(dest),
                           "--shard-size-mb", "0.01", "--rows-per-group", "4", "--workers", "2", *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def labels_by_path(split: Path) -> dict[str, int]:
    out = {}
    for f in sorted(split.glob("shard-*.parquet")):
        t = pq.read_table(f)
        for image, label in zip(t.column("image").to_pylist(), t.column("label").to_pylist(), strict=True):
            out[image["path"]] = label
    return out


def test_ilsvrc_layout_becomes_mixed_shards_with_timm_class_order(ilsvrc: Path, tmp_path: Path) -> None:
    out = shard(ilsvrc, tmp_path / "shards")
    assert out.returncode == 0, out.stderr
    train = mf.load(str(tmp_path / "shards" / "train"))
    assert [c.wnid for c in train.classes] == WNIDS
    assert train.classes[0].name.startswith("tench")
    assert train.num_samples == 36 and len(train.shards) > 2 and all(s.sha256 for s in train.shards)
    labels = labels_by_path(tmp_path / "shards" / "train")
    assert all(WNIDS[label] in path for path, label in labels.items())
    first = pq.read_table(tmp_path / "shards" / "train" / "shard-00000.parquet").column("label").to_pylist()
    assert len(set(first)) > 1, "a shard must mix classes"
    val = labels_by_path(tmp_path / "shards" / "val")
    assert len(val) == 9 and all(label == (int(p[-13:-5]) - 1) % 3 for p, label in val.items())


def test_rerun_keeps_verified_shards_and_redoes_broken_ones(ilsvrc: Path, tmp_path: Path) -> None:
    dest = tmp_path / "shards"
    first = write_dataset(open_source(str(ilsvrc)), str(dest), WriteOptions(shard_size_mb=0.01, rows_per_group=4))
    shards = sorted((dest / "train").glob("shard-*.parquet"))
    kept = shards[0].stat().st_mtime_ns
    shards[1].unlink()  # interrupted before this shard was uploaded
    shards[2].write_bytes(shards[2].read_bytes()[:100])  # torn write
    (dest / "train" / "manifest.json").unlink()
    again = write_dataset(open_source(str(ilsvrc)), str(dest), WriteOptions(shard_size_mb=0.01, rows_per_group=4))
    assert again.written == 2 and again.reused == first.written - 2
    assert shards[0].stat().st_mtime_ns == kept
    assert mf.load(str(dest / "train")).num_samples == 36


class FailingSource(SynthSource):
    """The synthetic set, whose images with ``fail`` ids cannot be read (an upload or a read failing mid-run)."""

    def __init__(self, fail: set[str]) -> None:
        super().__init__(classes=3, train=60, val=0, size=16)
        self.fail = fail

    def read(self, items: list[Item]) -> list[tuple[bytes, int, str]]:
        if any(it.key in self.fail for it in items):
            raise OSError("503 SlowDown: the store gave up on this shard")
        return super().read(items)


@pytest.mark.parametrize("workers", [1, 2])
def test_one_failing_shard_costs_only_itself(tmp_path: Path, workers: int) -> None:
    dest, opts = tmp_path / "shards", WriteOptions(shard_size_mb=0.002, rows_per_group=4, workers=workers)
    plan = plan_shards(FailingSource(set()).splits()["train"], opts.shard_size_mb * 2**20, opts.seed)
    assert len(plan) >= 4
    with pytest.raises(DataError, match=r"1 shard\(s\) failed \(shard-00000.parquet: .*503 SlowDown"):
        write_dataset(FailingSource({plan[0][0].key}), str(dest), opts)  # the first shard: every later one ran
    assert not (dest / "train" / "manifest.json").exists()
    again = write_dataset(FailingSource(set()), str(dest), opts)
    assert (again.written, again.reused) == (1, len(plan) - 1)
    assert mf.load(str(dest / "train")).num_samples == 60


def test_flat_val_without_labels_file_is_an_error(ilsvrc: Path, tmp_path: Path) -> None:
    (ilsvrc / "LOC_val_solution.csv").unlink()
    out = shard(ilsvrc, tmp_path / "shards")
    assert out.returncode == 2 and "flat validation folder needs a labels file" in out.stderr


def test_hugging_face_parquet_is_resharded(tmp_path: Path) -> None:
    src = tmp_path / "hf" / "data"
    src.mkdir(parents=True)
    images = [{"bytes": jpeg(i % 3, i), "path": f"img{i}.jpg"} for i in range(20)]
    table = pa.table({"image": pa.array(images, type=mf.IMAGE_TYPE), "label": pa.array([i % 3 for i in range(20)], pa.int64())})
    pq.write_table(table, src / "train-00000-of-00001.parquet", row_group_size=5)
    out = shard(src, tmp_path / "shards")
    assert out.returncode == 0, out.stderr
    labels = labels_by_path(tmp_path / "shards" / "train")
    assert labels == {f"img{i}.jpg": i % 3 for i in range(20)}


def test_hugging_face_test_split_is_left_out_and_an_unlabelled_row_is_named(tmp_path: Path) -> None:
    src = tmp_path / "hf"
    src.mkdir()
    for split, labels in (("train", [0, 1, 2, 0]), ("test", [-1] * 4)):
        table = pa.table({"image": pa.array([{"bytes": jpeg(i % 3, i), "path": f"{split}{i}.jpg"} for i in range(4)],
                                            type=mf.IMAGE_TYPE), "label": pa.array(labels, pa.int64())})
        pq.write_table(table, src / f"{split}-00000-of-00001.parquet", row_group_size=2)
    write_dataset(open_source(str(src)), str(tmp_path / "shards"), WriteOptions(rows_per_group=2))
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["train"]
    table = pq.read_table(src / "train-00000-of-00001.parquet")
    pq.write_table(table.set_column(1, "label", pa.array([0, 1, -1, 0], pa.int64())),
                   src / "train-00000-of-00001.parquet", row_group_size=2)
    with pytest.raises(DataError, match=r"train-00000-of-00001.parquet: row group 1, row 0 has label -1"):
        write_dataset(open_source(str(src)), str(tmp_path / "again"), WriteOptions(rows_per_group=2))


def test_split_converts_only_the_splits_named_and_refuses_the_unlabelled_test_split(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.data.__main__ import main

    src = tmp_path / "hf"
    src.mkdir()
    for split in ("train", "validation"):
        table = pa.table({"image": pa.array([{"bytes": jpeg(i % 3, i), "path": f"{split}{i}.jpg"} for i in range(4)],
                                            type=mf.IMAGE_TYPE), "label": pa.array([0, 1, 2, 0], pa.int64())})
        pq.write_table(table, src / f"{split}-00000-of-00001.parquet", row_group_size=2)
    assert main(["shard", str(src), str(tmp_path / "val-only"), "--split", "val", "--rows-per-group", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "val-only").iterdir()) == ["val"]
    assert labels_by_path(tmp_path / "val-only" / "val") == {f"validation{i}.jpg": [0, 1, 2, 0][i] for i in range(4)}
    capsys.readouterr()
    assert main(["shard", str(src), str(tmp_path / "t"), "--split", "test"]) != 0
    assert "--split test: ImageNet's test split is unlabelled" in capsys.readouterr().err
    (src / "validation-00000-of-00001.parquet").unlink()
    with pytest.raises(DataError, match=r"hf: no val split here \(--split val\)"):
        write_dataset(open_source(str(src)), str(tmp_path / "none"), WriteOptions(rows_per_group=2), splits=("val",))
    assert not (tmp_path / "t").exists() and not (tmp_path / "none").exists()


def test_max_side_reencodes_only_large_images(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.new("RGB", (200, 150), (200, 10, 10)).save(root / "a" / "big.jpg")
    small = jpeg(0, 1, size=40)
    (root / "b" / "small.jpg").write_bytes(small)
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = shard(root, tmp_path / "shards", "--max-side", "64")
    assert out.returncode == 0, out.stderr
    assert "1 unreadable images skipped" in out.stdout
    rows = {r["path"]: r["bytes"] for f in (tmp_path / "shards" / "train").glob("shard-*.parquet")
            for r in pq.read_table(f).column("image").to_pylist()}
    assert Image.open(io.BytesIO(rows["a/big.jpg"])).size == (85, 64)
    assert rows["b/small.jpg"] == small


def test_synth_command_writes_the_same_format(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "orchestrator.data", "synth", str(tmp_path / "s"), "--classes", "4",
                          "--train", "40", "--val", "8", "--size", "32"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    train = mf.load(str(tmp_path / "s" / "train"))
    assert train.num_samples == 40 and len(train.classes) == 4
    assert sorted(labels_by_path(tmp_path / "s" / "train").values()) == sorted(i % 4 for i in range(40))


@pytest.mark.parametrize("launcher", ["ray", "slurm"])
def test_cluster_conversions_refuse_inline_secrets_before_starting_anything(
        launcher: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.data.__main__ import main

    args = ["shard", str(tmp_path / "src"), "s3://b/d", "--launcher", launcher, "--storage-option", "secret=abcdefgh"]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert f"--launcher {launcher}: --storage-option secret would travel in the tasks' pickled arguments" in err
    assert "abcdefgh" not in err


def test_the_image_check_reads_a_jpeg_header_and_leaves_other_formats_to_pil() -> None:
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    good = jpeg(0, 1)
    assert is_image(good) and is_image(png.getvalue())
    assert not is_image(b"\xff\xd8 not really a jpeg") and not is_image(good[:40]) and not is_image(b"")
