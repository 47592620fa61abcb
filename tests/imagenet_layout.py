"""ImageNet's three downloads as files: the tests' small ones and ``bench/imagenet_scale.py``'s full-size one share
the tar and devkit writers (a devkit whose IDs are shuffled, as the real one's are not the sorted order)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
from scipy.io import savemat
from timm.data import ImageNetInfo

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


def devkit(val_wnids: list[str], seed: int = 0) -> bytes:
    """``ILSVRC2012_devkit_t12.tar.gz``: ``meta.mat`` giving WNIDS[k] the devkit ID ids[k] (a permutation, plus a
    parent synset that is not a class) and the ground truth of ``val_wnids`` in those IDs."""
    ids = np.random.default_rng(seed).permutation(1000) + 1
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height", "num_train_images"]
    synsets = np.array([(int(ids[k]), w, w, "", 0, np.zeros(0), 0, 1) for k, w in enumerate(WNIDS)]
                       + [(1001, "n00000001", "a parent", "", 2, np.array([1, 2]), 1, 0)],
                       dtype=[(f, object) for f in fields])
    mat = io.BytesIO()
    savemat(mat, {"synsets": synsets})
    index = {w: k for k, w in enumerate(WNIDS)}
    truth = "\n".join(str(int(ids[index[w]])) for w in val_wnids) + "\n"
    return tar_bytes({"ILSVRC2012_devkit_t12/data/meta.mat": mat.getvalue(),
                      "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": truth.encode()}, "w:gz")
