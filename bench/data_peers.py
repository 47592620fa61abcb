"""The same JPEGs through MosaicML Streaming and Lightning's litdata, as ``bench/data_pipeline.py`` reads them
through this project's reader: their shards in the same loopback S3 store, N DataLoader workers that persist over
the epochs, every process's CPU counted, timm's training transform (``create_transform`` with
``use_prefetcher=True``, ``fast_collate``: the workers' share, as timm's own side there).

Run by ``bench/data_pipeline.py`` in a child process whose ``PYTHONPATH`` starts with ``.peers/``
(``bash scripts/install_peers.sh``): Streaming imports ``transformers``, which needs a ``huggingface_hub`` older
than timm's, so the peers live beside the project's environment, not in it. Prints one JSON line: per peer, the CPU-seconds of ``--epochs`` epochs and of one (best of ``--passes``), the
images of an epoch, and its conversion's CPU-seconds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from timm.data.loader import fast_collate
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_pipeline import POLICY, RE_PROB, Seeds, cpu_of, parallel_cpu, reseed  # noqa: E402

from orchestrator.data.transforms import open_rgb, timm_train_transform  # noqa: E402
from tests.services import scratch  # noqa: E402


def images_of(folder: Path) -> list[tuple[bytes, int]]:
    """(JPEG bytes, label) in timm's ImageFolder order: classes sorted, files sorted."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    return [(f.read_bytes(), c) for c, name in enumerate(classes) for f in sorted((folder / name).iterdir())]


class Decoded:
    """A peer's sample (a dict) -> timm's transform of its decoded image, seeded per image as on timm's side."""

    def __init__(self, transform: Callable[[Image.Image], Any]) -> None:
        self.transform = transform

    def __call__(self, sample: dict[str, Any]) -> tuple[Any, int]:
        img = open_rgb(sample["image"])
        reseed(Seeds.of_pixels(img))
        return self.transform(img), int(sample["label"])


def streaming_side(items: list[tuple[bytes, int]], remote: str, cache: Path, transform: Decoded,
                   args: argparse.Namespace) -> tuple[float, Callable[[], DataLoader]]:
    """MDS shards written by ``MDSWriter`` straight to the store; a ``StreamingDataset`` over them per pass."""
    from streaming import MDSWriter, StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    def convert() -> None:
        with MDSWriter(out=remote, columns={"image": "bytes", "label": "int"}, size_limit="8mb") as out:
            for data, label in items:
                out.write({"image": data, "label": label})

    class Dataset(StreamingDataset):
        def __getitem__(self, index: int) -> Any:
            return transform(super().__getitem__(index))

    passes = iter(range(1 << 30))

    def make() -> DataLoader:
        clean_stale_shared_memory()
        ds = Dataset(remote=remote, local=str(cache / f"pass{next(passes)}"), shuffle=True, batch_size=args.batch)
        return DataLoader(ds, batch_size=args.batch, num_workers=args.workers, persistent_workers=True,
                          collate_fn=fast_collate, drop_last=True)

    return cpu_of(convert), make


def litdata_side(items: list[tuple[bytes, int]], remote: str, cache: Path, transform: Decoded,
                 args: argparse.Namespace, storage_options: dict[str, Any]) -> tuple[float, Callable[[], DataLoader]]:
    """litdata chunks written by ``optimize`` straight to the store; its ``StreamingDataset`` per pass. Through
    boto3: litdata's obstore path builds its store without ``allow_http``, so a plain-http endpoint (this loopback
    store) fails there (litdata 0.2.76); an https store would take it."""
    import litdata.streaming.downloader
    from litdata import StreamingDataset, optimize

    litdata.streaming.downloader._OBSTORE_AVAILABLE = False

    def convert() -> None:
        optimize(fn=_litdata_sample, inputs=items, output_dir=remote, chunk_bytes="8MB", num_workers=1,
                 storage_options=storage_options, mode="overwrite")
        # optimize() made every later DataLoader spawn its workers; training forks them (Linux's default), and so do
        # the other sides here (a spawned worker would also need this module's local Dataset class by name)
        multiprocessing.set_start_method("fork", force=True)

    passes = iter(range(1 << 30))

    def make() -> DataLoader:
        ds = StreamingDataset(remote, cache_dir=str(cache / f"pass{next(passes)}"), shuffle=True,
                              storage_options=storage_options, transform=transform)
        return DataLoader(ds, batch_size=args.batch, num_workers=args.workers, persistent_workers=True,
                          collate_fn=fast_collate, drop_last=True)

    return cpu_of(convert), make


def _litdata_sample(item: tuple[bytes, int]) -> dict[str, Any]:
    return {"image": item[0], "label": item[1]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", type=Path, required=True, help="the ImageFolder of data_pipeline.py's JPEGs")
    parser.add_argument("--bucket", required=True, help="s3://bucket/prefix in the store; the peers' shards go under it")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    # Streaming reads S3 through boto3, configured from the environment.
    os.environ |= {"S3_ENDPOINT_URL": args.endpoint, "AWS_ACCESS_KEY_ID": args.key, "AWS_SECRET_ACCESS_KEY": args.secret,
                   "AWS_DEFAULT_REGION": "us-east-1"}
    options = {"endpoint_url": args.endpoint, "aws_access_key_id": args.key, "aws_secret_access_key": args.secret}
    items = images_of(args.folder)
    transform = Decoded(timm_train_transform(args.size, POLICY, RE_PROB, "random", use_prefetcher=True))
    cache = scratch("bench-peers-")
    streaming_convert, streaming = streaming_side(items, f"{args.bucket}/mds", cache / "mds", transform, args)
    litdata_convert, litdata = litdata_side(items, f"{args.bucket}/litdata", cache / "litdata", transform, args, options)
    sides = {"streaming": streaming, "litdata": litdata}
    one = parallel_cpu(sides, passes=args.passes, epochs=1)
    spent = parallel_cpu(sides, passes=args.passes, epochs=args.epochs)
    images = {name: sum(len(b[1]) for b in _one_epoch(make)) for name, make in sides.items()}
    print(json.dumps({name: {"cpu_s": spent[name], "one_epoch_cpu_s": one[name], "epochs": args.epochs,
                             "images_per_epoch": images[name],
                             "convert_cpu_s": {"streaming": streaming_convert, "litdata": litdata_convert}[name]}
                      for name in sides}))


def _one_epoch(make: Callable[[], DataLoader]) -> Iterator[Any]:
    """The batches of one epoch (to count the images a pass yields: the peers drop or pad their last batches
    in their own ways)."""
    loader = make()
    yield from loader
    if getattr(loader, "_iterator", None) is not None:
        loader._iterator._shutdown_workers()


if __name__ == "__main__":
    main()
