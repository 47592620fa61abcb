"""Shards and runs on a real S3-compatible store (SeaweedFS on loopback): write, read, survive a restart."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import s3fs

from orchestrator import pretrain
from orchestrator.data import manifest as mf
from orchestrator.data.reader import ReaderOptions, ShardDataset, ShardLoader
from orchestrator.errors import StorageError
from orchestrator.storage import RetryPolicy
from tests.conftest import ROOT, smoke_recipe
from tests.services import S3Store

pytestmark = pytest.mark.integration


def to_tensor(data: bytes, label: int):
    import torch

    from orchestrator.data.transforms import open_rgb

    open_rgb(data)
    return torch.zeros(1), label


@pytest.fixture(scope="module")
def s3_synth(s3_store: S3Store) -> str:
    """The synthetic dataset written straight to the store by the CLI (many small shards)."""
    dest = f"{s3_store.bucket('datasets')}/synth"
    opts = [f"--storage-option={k}={v}" for k, v in s3_store.options.items()]
    out = subprocess.run([sys.executable, "-m", "orchestrator.data", "synth", dest, "--classes", "10", "--train", "320",
                          "--val", "80", "--size", "32", "--shard-size-mb", "0.03", "--rows-per-group", "16", *opts],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert s3_store.options["secret"] not in out.stdout + out.stderr
    return dest


def test_manifest_on_s3_lists_verified_shards_and_no_secret(s3_store: S3Store, s3_synth: str) -> None:
    manifest = mf.load(f"{s3_synth}/train", s3_store.options)
    assert manifest.num_samples == 320 and len(manifest.shards) >= 8
    fs = s3fs.S3FileSystem(**s3_store.options)
    text = fs.cat_file(f"{s3_synth.removeprefix('s3://')}/train/manifest.json").decode()
    assert s3_store.options["secret"] not in text and s3_store.options["key"] not in text
    assert json.loads(text)["shards"][0]["sha256"]


def test_validation_from_s3_is_read_exactly_once_across_ranks(s3_store: S3Store, s3_synth: str) -> None:
    options = ReaderOptions(storage_options=s3_store.options)
    manifest = mf.load(f"{s3_synth}/val", s3_store.options)
    seen = []
    for rank in range(2):
        ds = ShardDataset(manifest, to_tensor, train=False, rank=rank, world_size=2, options=options)
        seen += [int(i) for b in ShardLoader(ds, 8, 2) for i in b[2]]
    assert sorted(seen) == list(range(80))


def test_reader_survives_a_store_restart_mid_epoch(s3_store: S3Store, s3_synth: str) -> None:
    retry = RetryPolicy(attempts=12, base_delay=0.5, max_delay=4.0)
    options = ReaderOptions(shuffle_buffer=1, storage_options=s3_store.options, retry=retry)
    manifest = mf.load(f"{s3_synth}/train", s3_store.options)
    expected = [int(i) for b in ShardLoader(ShardDataset(manifest, to_tensor, train=True, options=options), 16, 0)
                for i in b[2]]
    batches = iter(ShardLoader(ShardDataset(manifest, to_tensor, train=True, options=options), 16, 0))
    got = [int(i) for i in next(batches)[2]]
    s3_store.stop()
    restarted = threading.Thread(target=s3_store.start)  # comes back while the reader is retrying
    restarted.start()
    try:
        got += [int(i) for b in batches for i in b[2]]
    finally:
        restarted.join()
    assert got == expected


def test_storage_errors_name_the_shard_after_the_last_retry(s3_store: S3Store, s3_synth: str) -> None:
    manifest = mf.load(f"{s3_synth}/val", s3_store.options)
    fs = s3fs.S3FileSystem(**s3_store.options)
    victim = manifest.shard_url(1).removeprefix("s3://")
    data = fs.cat_file(victim)
    fs.rm(victim)
    try:
        options = ReaderOptions(storage_options=s3_store.options, retry=RetryPolicy(attempts=2, base_delay=0.01))
        ds = ShardDataset(manifest, to_tensor, train=False, options=options)
        with pytest.raises(StorageError, match=rf"reading s3://{victim} row group \d+: still failing after 2 attempts"):
            list(ShardLoader(ds, 8, 0))
    finally:
        fs.pipe_file(victim, data)


def test_training_run_lives_in_the_store_and_resumes_from_it(s3_store: S3Store, s3_synth: str, tmp_path: Path) -> None:
    runs = f"{s3_store.bucket('runs')}/it"
    options = json.dumps(s3_store.options)
    overrides = (f"data.train={s3_synth}/train", f"data.val={s3_synth}/val", f"run.storage={runs}",
                 f"run.storage_options={options}", f"data.storage_options={options}", "run.name=s3run")
    pretrain.train(smoke_recipe(tmp_path, Path("unused"), *overrides, "run.max_steps=3"))
    result = pretrain.train(smoke_recipe(tmp_path, Path("unused"), *overrides, "run.max_steps=5"))
    assert result["step"] == 5
    fs = s3fs.S3FileSystem(**s3_store.options)
    run = f"{runs.removeprefix('s3://')}/s3run"
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(run)}
    assert {"config.json", "metrics.jsonl", "model.safetensors", "checkpoints", "curves.png", "tensorboard"} <= names
    assert s3_store.options["secret"] not in fs.cat_file(f"{run}/config.json").decode()
    steps = [json.loads(line)["step"] for line in fs.cat_file(f"{run}/metrics.jsonl").decode().splitlines()]
    assert max(steps) == 5
