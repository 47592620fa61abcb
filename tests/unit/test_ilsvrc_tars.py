"""ImageNet's three official files, read in place: the devkit's IDs are not the class order."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from scipy.io import savemat
from timm.data import ImageNetInfo

from orchestrator.data.__main__ import main
from orchestrator.data.ilsvrc_tars import DEVKIT, TRAIN, VAL, OfficialTarSource
from tests.unit.test_shard_writer import jpeg

WNIDS = list(ImageNetInfo("imagenet-1k").label_names())  # sorted: timm's class order


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def tar_bytes(files: dict[str, bytes], mode: str = "w") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as tar:
        for name, data in files.items():
            add(tar, name, data)
    return out.getvalue()


def official(root: Path, val_wnids: list[str]) -> None:
    """The three downloads: one image per class in train, ``val_wnids`` in val, a devkit whose IDs are shuffled."""
    root.mkdir()
    (root / TRAIN).write_bytes(tar_bytes({f"{w}.tar": tar_bytes({f"{w}_1.JPEG": jpeg(i % 3, i, 16)})
                                          for i, w in enumerate(WNIDS)}))
    (root / VAL).write_bytes(tar_bytes({f"ILSVRC2012_val_{i + 1:08d}.JPEG": jpeg(i % 3, 5000 + i, 16)
                                        for i in range(len(val_wnids))}))
    ids = np.random.default_rng(0).permutation(1000) + 1  # WNIDS[k] has devkit ID ids[k]
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height", "num_train_images"]
    synsets = np.array([(int(ids[k]), w, w, "", 0, np.zeros(0), 0, 1) for k, w in enumerate(WNIDS)]
                       + [(1001, "n00000001", "a parent", "", 2, np.array([1, 2]), 1, 0)],  # not a class
                       dtype=[(f, object) for f in fields])
    mat = io.BytesIO()
    savemat(mat, {"synsets": synsets})
    truth = "\n".join(str(int(ids[WNIDS.index(w)])) for w in val_wnids) + "\n"
    (root / DEVKIT).write_bytes(tar_bytes({"ILSVRC2012_devkit_t12/data/meta.mat": mat.getvalue(),
                                           "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt":
                                           truth.encode()}, "w:gz"))


def test_the_official_files_become_shards_with_every_val_image_under_its_sorted_wnid(tmp_path: Path) -> None:
    val_wnids = ["n01751748", "n01440764", "n15075141", "n02119789"]  # sea snake (the anchor), tench, last, kit fox
    official(tmp_path / "in", val_wnids)
    source = OfficialTarSource(str(tmp_path / "in"))
    assert [c.wnid for c in source.classes] == WNIDS and source.classes[65].wnid == "n01751748"
    assert main(["shard", str(tmp_path / "in"), str(tmp_path / "shards"), "--shard-size-mb", "1", "--workers", "1"]) == 0
    val = pq.read_table(tmp_path / "shards" / "val" / "shard-00000.parquet")
    got = {img["path"]: label for img, label in zip(val.column("image").to_pylist(), val.column("label").to_pylist(),
                                                        strict=True)}
    assert got == {f"val/ILSVRC2012_val_{i + 1:08d}.JPEG": WNIDS.index(w) for i, w in enumerate(val_wnids)}
    assert got["val/ILSVRC2012_val_00000001.JPEG"] == 65  # the known anchor: sea snake
    paths = {}
    for shard in (tmp_path / "shards" / "train").glob("shard-*.parquet"):
        table = pq.read_table(shard)
        paths |= dict(zip([i["path"] for i in table.column("image").to_pylist()], table.column("label").to_pylist(),
                          strict=True))
    assert len(paths) == 1000 and all(WNIDS[label] in path for path, label in paths.items())
    assert not any((tmp_path / "in").glob("n*")), "nothing was extracted"
