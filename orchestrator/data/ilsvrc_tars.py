"""ImageNet as downloaded: ``ILSVRC2012_img_train.tar`` (a tar of 1,000 class tars), ``ILSVRC2012_img_val.tar`` (50,000
flat JPEGs) and ``ILSVRC2012_devkit_t12.tar.gz``, read in place: nothing is extracted to disk.

The tars are uncompressed, so each image is a byte range of its file: listing reads the tar headers (a seek per
member), and reading an image is one ranged read. The classes are the sorted WNIDs (timm's order). The validation
labels come from the devkit: ``ILSVRC2012_validation_ground_truth.txt`` gives each image a devkit ID, and
``meta.mat``'s synsets map that ID to a WNID. The devkit's IDs are *not* the sorted order (ID 1 is n02119789, kit
fox; sorted index 0 is n01440764, tench): mapping an ID straight to a class index is the classic mistake. Kaggle's
``LOC_val_solution.csv`` beside the tars is used instead when there is no devkit.
"""

from __future__ import annotations

import io
import tarfile
from typing import Any

from orchestrator import storage
from orchestrator.data.sources import Item, class_infos, imagenet_synsets, kaggle_val_labels
from orchestrator.errors import DataError

TRAIN, VAL, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
KAGGLE_LABELS = "LOC_val_solution.csv"


def is_official(url: str, options: dict[str, Any] | None = None) -> bool:
    """A folder holding the training tar as downloaded."""
    fs, path = storage.filesystem(url, options)
    return fs.isdir(path) and fs.exists(storage.join(path, TRAIN))


class OfficialTarSource:
    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        self.url, self.options = url.rstrip("/"), options or {}
        self.fs, self.root = storage.filesystem(self.url, self.options)
        self.train = storage.join(self.root, TRAIN)
        self.class_tars = tar_members(self.fs, self.train)  # name -> (offset, size)
        wnids = sorted(name.removesuffix(".tar") for name in self.class_tars)
        if not wnids or not all(name.endswith(".tar") for name in self.class_tars):
            raise DataError(f"{storage.unstrip(self.fs, self.train)}: expected a tar of class tars (<wnid>.tar)")
        self.classes = class_infos(wnids)
        if len(wnids) == 1000:
            check_imagenet_synsets(wnids, storage.unstrip(self.fs, self.train))

    def splits(self, names: tuple[str, ...] | None = None) -> dict[str, list[list[Item]]]:
        index = {c.wnid: c.index for c in self.classes}
        out: dict[str, list[list[Item]]] = {}
        if names is None or "train" in names:
            out["train"] = []
            with self.fs.open(self.train, "rb") as f:
                for name, (offset, _) in sorted(self.class_tars.items()):
                    wnid = name.removesuffix(".tar")
                    for image, (inner, size) in sorted(members(f, offset).items()):
                        out["train"].append([Item(key=f"{TRAIN}@{offset + inner}+{size}", label=index[wnid],
                                                  path=f"train/{wnid}/{image}", size=size)])
        val = storage.join(self.root, VAL)
        if (names is None or "val" in names) and self.fs.exists(val):
            labels = self.val_labels()
            blocks = []
            for image, (offset, size) in sorted(tar_members(self.fs, val).items()):
                stem = image.rsplit(".", 1)[0]
                if stem not in labels:
                    raise DataError(f"{storage.unstrip(self.fs, val)}: {image} has no ground-truth label in the devkit")
                blocks.append([Item(key=f"{VAL}@{offset}+{size}", label=index[labels[stem]], path=f"val/{image}", size=size)])
            out["val"] = blocks
        return out

    def val_labels(self) -> dict[str, str]:
        """Validation image stem -> WNID, from the devkit (or Kaggle's CSV)."""
        devkit, kaggle = storage.join(self.root, DEVKIT), storage.join(self.root, KAGGLE_LABELS)
        if self.fs.exists(devkit):
            return devkit_val_labels(self.fs.cat_file(devkit), storage.unstrip(self.fs, devkit))
        if self.fs.exists(kaggle):
            return kaggle_val_labels(self.fs.cat_file(kaggle).decode())
        raise DataError(f"{self.url}: {VAL} needs its labels: {DEVKIT} or {KAGGLE_LABELS} beside it")

    def read(self, items: list[Item]) -> list[tuple[bytes, int, str]]:
        out = []
        handles: dict[str, Any] = {}
        try:
            for it in items:
                name, span = it.key.split("@")
                offset, size = (int(v) for v in span.split("+"))
                if name not in handles:
                    handles[name] = self.fs.open(storage.join(self.root, name), "rb")
                handles[name].seek(offset)
                out.append((handles[name].read(size), it.label, it.path))
        finally:
            for handle in handles.values():
                handle.close()
        return out


def tar_members(fs: Any, path: str) -> dict[str, tuple[int, int]]:
    """``members`` of the uncompressed tar file at ``path``."""
    with fs.open(path, "rb") as f:
        return members(f)


def members(f: Any, base: int = 0) -> dict[str, tuple[int, int]]:
    """Member name -> (data offset, size) of the uncompressed tar that starts at ``base`` in the open file ``f``
    (a tar inside a tar: offsets from ``base``), by reading its headers only.

    Plain ustar headers (ImageNet's tars) are parsed here, a seek and a 512-byte read each: tarfile through
    ``_Window`` took 39 us a member, 50 of the 116 CPU-seconds of converting ImageNet's 1.28M training images.
    A tar with any other kind of header (long names, pax, a member over 8 GB) is listed by tarfile."""
    out: dict[str, tuple[int, int]] = {}
    offset = 0
    while True:
        f.seek(base + offset)
        header = f.read(512)
        if len(header) < 512 or header.count(0) == 512:  # the end: two zero blocks (or a truncated file)
            return out
        kind = header[156:157]
        if (kind not in (b"0", b"\0", b"5") or header[257:262] != b"ustar" or header[345:500].strip(b"\0")
                or header[124] & 0x80):
            return _tarfile_members(f, base)  # long names, pax headers, prefixed names, links, sizes in base-256
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        if kind != b"5":
            out[header[:100].rstrip(b"\0").decode().rsplit("/", 1)[-1]] = (offset + 512, size)
        offset += 512 + -(-size // 512) * 512


def _tarfile_members(f: Any, base: int) -> dict[str, tuple[int, int]]:
    f.seek(base)
    with tarfile.open(fileobj=_Window(f, base), mode="r:") as tar:  # type: ignore[call-overload]
        return {m.name.rsplit("/", 1)[-1]: (m.offset_data, m.size) for m in tar if m.isfile()}


class _Window(io.RawIOBase):
    """The open file seen from ``base`` on: a tar inside a tar, read where it lies."""

    def __init__(self, f: Any, base: int) -> None:
        self.f, self.base = f, base

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self.f.read(size)

    def readinto(self, buffer: Any) -> int:
        data = self.f.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            return self.f.seek(self.base + offset) - self.base
        return self.f.seek(offset, whence) - self.base

    def tell(self) -> int:
        return self.f.tell() - self.base


def devkit_val_labels(data: bytes, where: str) -> dict[str, str]:
    """``ILSVRC2012_val_<n>`` -> WNID: the ground truth's devkit IDs through ``meta.mat``'s leaf synsets."""
    from scipy.io import loadmat

    meta = truth = None
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for m in tar:
            if m.name.endswith("data/meta.mat"):
                meta = loadmat(io.BytesIO(tar.extractfile(m).read()), squeeze_me=True)["synsets"]
            elif m.name.endswith("data/ILSVRC2012_validation_ground_truth.txt"):
                truth = [int(line) for line in tar.extractfile(m).read().decode().split()]
    if meta is None or truth is None:
        raise DataError(f"{where}: no data/meta.mat or data/ILSVRC2012_validation_ground_truth.txt in the devkit")
    wnid_of = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in meta if int(s["num_children"]) == 0}
    unknown = sorted(set(truth) - set(wnid_of))
    if unknown:
        raise DataError(f"{where}: the ground truth uses IDs {unknown[:5]} that meta.mat has no leaf synset for")
    return {f"ILSVRC2012_val_{i + 1:08d}": wnid_of[id_] for i, id_ in enumerate(truth)}


def check_imagenet_synsets(wnids: list[str], where: str) -> None:
    """1,000 classes must be ImageNet-1K's synsets (timm's list), or the labels would mean other classes."""
    known = set(imagenet_synsets())
    strange = [w for w in wnids if w not in known]
    if strange:
        raise DataError(f"{where}: 1000 classes, but {len(strange)} are not ImageNet-1K synsets (first: {strange[0]})")
