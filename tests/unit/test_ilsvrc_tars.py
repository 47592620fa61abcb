"""ImageNet's three official files, read in place: the devkit's IDs are not the class order."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orchestrator.data.__main__ import main
from orchestrator.data.ilsvrc_tars import DEVKIT, TRAIN, VAL, OfficialTarSource, _tarfile_members, members
from tests.imagenet_layout import WNIDS, add, devkit, tar_bytes
from tests.unit.test_shard_writer import jpeg


def official(root: Path, val_wnids: list[str]) -> None:
    """The three downloads: one image per class in train, ``val_wnids`` in val, a devkit whose IDs are shuffled."""
    root.mkdir()
    (root / TRAIN).write_bytes(tar_bytes({f"{w}.tar": tar_bytes({f"{w}_1.JPEG": jpeg(i % 3, i, 16)})
                                          for i, w in enumerate(WNIDS)}))
    (root / VAL).write_bytes(tar_bytes({f"ILSVRC2012_val_{i + 1:08d}.JPEG": jpeg(i % 3, 5000 + i, 16)
                                        for i in range(len(val_wnids))}))
    (root / DEVKIT).write_bytes(devkit(val_wnids))


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


@pytest.mark.parametrize("layout", ["ustar", "gnu", "pax", "long names", "base-256 size"])
def test_the_header_parser_lists_what_tarfile_lists(layout: str) -> None:
    """``members`` parses plain ustar headers itself (6x faster than tarfile) and leaves the rest to tarfile: the same
    names, offsets and sizes either way, for a tar lying inside another file."""
    fmt = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT,
           "long names": tarfile.GNU_FORMAT, "base-256 size": tarfile.GNU_FORMAT}[layout]
    names = ["a.JPEG", "sub/b.JPEG", "empty.JPEG"] + (["n" * 150 + ".JPEG"] if layout == "long names" else [])
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for k, name in enumerate(names):
            add(tar, name, bytes([k]) * (700 * k))
        folder = tarfile.TarInfo("sub")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    data = bytearray(out.getvalue())
    if layout == "base-256 size":  # how tar writes a member over 8 GB: here the second one's 700 bytes
        header = data[512:1024]  # the members: a.JPEG (0 bytes, a header alone), then sub/b.JPEG
        header[124:136] = b"\x80" + (700).to_bytes(11, "big")
        header[148:156] = b" " * 8
        header[148:156] = f"{sum(header):06o}\0 ".encode()
        data[512:1024] = header
    f = io.BytesIO(b"P" * 1024 + bytes(data))
    listed = members(f, 1024)
    assert listed == _tarfile_members(f, 1024)
    assert sorted(listed) == sorted(n.rsplit("/", 1)[-1] for n in names)
    for k, name in enumerate(names):
        offset, size = listed[name.rsplit("/", 1)[-1]]
        f.seek(1024 + offset)
        assert size == 700 * k and f.read(size) == bytes([k]) * size
