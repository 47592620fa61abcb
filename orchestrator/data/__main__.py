"""``python -m orchestrator.data shard SRC DEST`` and ``python -m orchestrator.data synth DEST``."""

from __future__ import annotations

import argparse
import os
import sys

from orchestrator import cli, storage
from orchestrator.data.shard_writer import WriteOptions, write_dataset
from orchestrator.data.sources import open_source
from orchestrator.data.synth import SynthSource


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("orchestrator.data", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    shard = sub.add_parser("shard", help="convert an ILSVRC/ImageFolder tree or HF-style Parquet into shards")
    shard.add_argument("src", help="source folder or URL (ILSVRC-2012 layout, ImageFolder, or Parquet files)")
    shard.add_argument("dest", help="destination URL: s3://..., gs://..., file://..., or a local path")
    shard.add_argument("--val-labels", help="ground truth for a flat val/ folder (LOC_val_solution.csv or '<file> <wnid>' lines)")
    shard.add_argument("--max-side", type=int, help="re-encode images whose shorter side exceeds this many pixels")
    synth = sub.add_parser("synth", help="generate the embedded learnable dataset")
    synth.add_argument("dest")
    synth.add_argument("--classes", type=int, default=10)
    synth.add_argument("--train", type=int, default=2000)
    synth.add_argument("--val", type=int, default=500)
    synth.add_argument("--size", type=int, default=64)
    for p in (shard, synth):
        p.add_argument("--shard-size-mb", type=float, default=256.0 if p is shard else 1.0)
        p.add_argument("--rows-per-group", type=int, default=128 if p is shard else 64)
        p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1) if p is shard else 1)
        p.add_argument("--seed", type=int, default=0)
        cli.add_storage_option(p)
    return cli.run(write, parser, argv)


def write(args: argparse.Namespace) -> None:
    options = cli.storage_options(args.storage_option)
    for name in ("src", "dest"):
        if getattr(args, name, None):
            storage.check_reachable(getattr(args, name), options, name.upper(), "--storage-option")
    if args.command == "synth":
        source = SynthSource(args.classes, args.train, args.val, args.size, args.seed)
        opts = WriteOptions(args.shard_size_mb, args.rows_per_group, None, args.seed, args.workers)
    else:
        source = open_source(args.src, options, args.val_labels)
        opts = WriteOptions(args.shard_size_mb, args.rows_per_group, args.max_side, args.seed, args.workers)
    report = write_dataset(source, args.dest, opts, options)
    print(f"done: {report.written} shards written, {report.reused} verified shards kept, "
          f"{report.skipped_images} unreadable images skipped")


if __name__ == "__main__":
    sys.exit(main())
