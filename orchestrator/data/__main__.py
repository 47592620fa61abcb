"""``python -m orchestrator.data shard SRC DEST``, ``python -m orchestrator.data synth DEST`` (``--task
segmentation``: ADE20K-style images with PNG masks) and ``python -m orchestrator.data verify URL``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from orchestrator import cli, storage
from orchestrator.data.ilsvrc_tars import OfficialTarSource, is_official
from orchestrator.data.seg_sources import open_segmentation_source
from orchestrator.data.shard_writer import WriteOptions, write_dataset
from orchestrator.data.sources import open_source
from orchestrator.data.synth import SynthSegSource, SynthSource
from orchestrator.data.verify import verify
from orchestrator.errors import RecipeError


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("orchestrator.data", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    shard = sub.add_parser("shard", help="convert an ILSVRC/ImageFolder tree or HF-style Parquet into shards")
    shard.add_argument("src", help="source folder or URL: ImageNet's downloads (ILSVRC2012_img_train.tar, _img_val.tar, "
                       "_devkit_t12.tar.gz, read in place), an ILSVRC-2012 tree, an ImageFolder, or Parquet files")
    shard.add_argument("dest", help="destination URL: s3://..., gs://..., file://..., or a local path")
    shard.add_argument("--val-labels", help="ground truth for a flat val/ folder (LOC_val_solution.csv or '<file> <wnid>' lines)")
    shard.add_argument("--classes", dest="classes_file", metavar="FILE",
                       help="segmentation: class names, one per line (default: objectInfo150.txt, else counted from the masks)")
    shard.add_argument("--max-side", type=int, help="re-encode images whose shorter side exceeds this many pixels")
    shard.add_argument("--launcher", choices=("local", "ray", "slurm"), default="local",
                       help="ray: a task per shard across this Ray cluster (RAY_ADDRESS, or a local one started here); "
                       "slurm: a Slurm array job, a task per shard")
    cli.add_slurm_flags(shard, "--launcher slurm")
    shard.add_argument("--split", action="append", choices=("train", "val", "test"), dest="splits",
                       help="convert only this split (repeatable; default: every labelled split found)")
    synth = sub.add_parser("synth", help="generate the embedded learnable dataset")
    synth.add_argument("dest")
    synth.add_argument("--classes", type=int, help="classes (default 10); segmentation: shapes besides the background (default 4)")
    synth.add_argument("--train", type=int, help="training images (default 2000; segmentation 600)")
    synth.add_argument("--val", type=int, help="validation images (default 500; segmentation 100)")
    synth.add_argument("--size", type=int, default=64)
    shard.add_argument("--no-reduce-zero-label", dest="reduce_zero_label", action="store_false",
                       help="segmentation: mask value 0 is a class (default: 0 is 'other' and ignored, as ADE20K)")
    check = sub.add_parser("verify", help="check every shard against its manifest: sha256, rows, classes, totals")
    check.add_argument("url", help="a dataset (its train/ and val/ folders) or one split's folder")
    check.add_argument("--expect", action="append", default=[], metavar="SPLIT=N",
                       help="images a split must hold (default for ImageNet-1K's classes: train=1281167, val=50000)")
    check.add_argument("--workers", type=int, default=16, help="shards checked at once")
    cli.add_storage_option(check)
    for p in (shard, synth):
        p.add_argument("--task", choices=("classification", "segmentation"), default="classification",
                       help="segmentation: SRC is ADEChallengeData2016 (images/, annotations/) or Parquet with a mask column")
        p.add_argument("--shard-size-mb", type=float, default=256.0 if p is shard else 1.0)
        p.add_argument("--rows-per-group", type=int, default=128 if p is shard else 64)
        p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1) if p is shard else 1)
        p.add_argument("--seed", type=int, default=0)
        cli.add_storage_option(p)
    return cli.run(write, parser, argv)


def write(args: argparse.Namespace) -> int | None:
    options = cli.storage_options(args.storage_option)
    if args.command == "verify":
        return check(args, options)
    splits = tuple(dict.fromkeys(getattr(args, "splits", None) or ())) or None
    if splits and "test" in splits:
        raise RecipeError("--split test: ImageNet's test split is unlabelled (every label -1; its labels were never "
                          "released), so it cannot train or evaluate; convert train and val")
    tasks = None
    if getattr(args, "launcher", "local") != "local":
        from orchestrator.launch import shard_tasks

        shard_tasks.check_options(options, args.launcher)
        slurm = cli.slurm_options(args)
        tasks = shard_tasks.on_slurm(slurm) if slurm is not None else shard_tasks.on_ray
    for name in ("src", "dest"):
        if getattr(args, name, None):
            storage.check_reachable(getattr(args, name), options, name.upper(), "--storage-option")
    if args.command == "synth":
        seg = args.task == "segmentation"
        train, val = args.train or (600 if seg else 2000), args.val if args.val is not None else (100 if seg else 500)
        if seg:
            source: Any = SynthSegSource(args.classes or 4, train, val, args.size, args.seed)
        else:
            source = SynthSource(args.classes or 10, train, val, args.size, args.seed)
        opts = WriteOptions(args.shard_size_mb, args.rows_per_group, None, args.seed, args.workers)
    else:
        if args.task == "segmentation":
            source = open_segmentation_source(args.src, options, args.reduce_zero_label, args.classes_file)
        elif is_official(args.src, options):
            source = OfficialTarSource(args.src, options)
        else:
            source = open_source(args.src, options, args.val_labels)
        opts = WriteOptions(args.shard_size_mb, args.rows_per_group, args.max_side, args.seed, args.workers)
    report = write_dataset(source, args.dest, opts, options, splits, tasks)
    print(f"done: {report.written} shards written, {report.reused} verified shards kept, "
          f"{report.skipped_images} unreadable images skipped")



def check(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """``verify``: one line per problem, then a summary; non-zero when there is a problem."""
    try:
        expect = {k: int(v) for k, v in (e.split("=", 1) for e in args.expect)}
    except ValueError as exc:
        raise RecipeError(f"--expect takes SPLIT=N (for example val=50000), got {args.expect}") from exc
    storage.check_reachable(args.url, options, "URL", "--storage-option")
    report = verify(args.url, options, expect, args.workers)
    for line in report.problems:
        print(line)
    print(f"verify: {len(report.problems)} problems in {report.shards} shards of {', '.join(report.splits)} "
          f"({report.images} images)")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
