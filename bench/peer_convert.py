"""ImageNet's downloads converted by a peer, for ``bench/imagenet_scale.py``: MosaicML Streaming's ``MDSWriter`` or
litdata's ``optimize``, writing to the S3 store. Neither reads ImageNet's tars itself, so each gets the loop a user
would write: Python's ``tarfile`` over the tar of class tars, and the devkit's labels for validation (parsed by this
project's ``devkit_val_labels``, outside the measured work's hot loop).

    PYTHONPATH=.peers .venv/bin/python bench/peer_convert.py streaming|litdata SRC s3://bucket/prefix \\
        --endpoint URL --key K --secret S [--workers N]

Prints one JSON line, ``{"images": n}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator.data.ilsvrc_tars import DEVKIT, TRAIN, VAL, devkit_val_labels  # noqa: E402

SIZE_LIMIT = "8mb"  # the shard size imagenet_scale.py gives this project's command


def members(src: Path) -> dict[str, list[tuple[int, int, int]]]:
    """(offset, size, class index) of every JPEG in the two tars, by split, in order."""
    out: dict[str, list[tuple[int, int, int]]] = {"train": [], "val": []}
    with tarfile.open(src / TRAIN) as outer:
        wnids = sorted(m.name.removesuffix(".tar") for m in outer.getmembers())
        index = {w: k for k, w in enumerate(wnids)}
        for member in outer.getmembers():
            with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                label = index[member.name.removesuffix(".tar")]
                out["train"] += [(member.offset_data + m.offset_data, m.size, label) for m in inner]
    labels = devkit_val_labels((src / DEVKIT).read_bytes(), str(src / DEVKIT))
    with tarfile.open(src / VAL) as tar:
        out["val"] = [(m.offset_data, m.size, index[labels[m.name.removesuffix(".JPEG")]]) for m in tar]
    return out


_open: dict[str, Any] = {}


def read(path: str, offset: int, size: int) -> bytes:
    if path not in _open:
        _open[path] = open(path, "rb")  # noqa: SIM115 - one per process, for its life
    f = _open[path]
    f.seek(offset)
    return f.read(size)


def litdata_sample(item: tuple[str, int, int, int]) -> dict[str, Any]:
    path, offset, size, label = item
    return {"image": read(path, offset, size), "label": label}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("peer", choices=("streaming", "litdata"))
    parser.add_argument("src", type=Path)
    parser.add_argument("dest")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    os.environ |= {"S3_ENDPOINT_URL": args.endpoint, "AWS_ACCESS_KEY_ID": args.key, "AWS_SECRET_ACCESS_KEY": args.secret,
                   "AWS_DEFAULT_REGION": "us-east-1"}
    found = members(args.src)
    tars = {"train": str(args.src / TRAIN), "val": str(args.src / VAL)}
    for split, items in found.items():
        if args.peer == "streaming":  # one writing process; its uploads run on a thread pool
            from streaming import MDSWriter

            with MDSWriter(out=f"{args.dest}/{split}", columns={"image": "bytes", "label": "int"},
                           size_limit=SIZE_LIMIT) as out:
                for offset, size, label in items:
                    out.write({"image": read(tars[split], offset, size), "label": label})
        else:
            import litdata.streaming.downloader
            from litdata import optimize

            litdata.streaming.downloader._OBSTORE_AVAILABLE = False  # its obstore store cannot reach a plain-http endpoint
            options = {"endpoint_url": args.endpoint, "aws_access_key_id": args.key, "aws_secret_access_key": args.secret}
            optimize(fn=litdata_sample, inputs=[(tars[split], *item) for item in items], output_dir=f"{args.dest}/{split}",
                     chunk_bytes=SIZE_LIMIT.upper(), num_workers=args.workers, storage_options=options, mode="overwrite")
    print(json.dumps({"images": sum(map(len, found.values()))}))


if __name__ == "__main__":
    main()
