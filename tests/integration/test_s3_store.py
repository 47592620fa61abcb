"""Shards and runs on a real S3-compatible store (SeaweedFS on loopback): write, read, survive a restart."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import s3fs

from orchestrator import pretrain, transfer
from orchestrator import recipe as recipes
from orchestrator.data import manifest as mf
from orchestrator.data.reader import ReaderOptions, ShardDataset, ShardLoader
from orchestrator.errors import StorageError
from orchestrator.rundir import STATE, RunDir
from orchestrator.storage import RetryPolicy, check_reachable
from orchestrator.train import components
from tests.conftest import ROOT, smoke_sets
from tests.s3_proxy import S3Proxy
from tests.services import S3Store, free_port
from tests.thread_group import ThreadWorld

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


def test_ranks_starting_together_check_the_dataset_once_counted_at_the_store(s3_store: S3Store, s3_synth: str) -> None:
    """The training start-up's dataset check on 1 and on 8 ranks (threads), every request counted at the store: rank
    0 checks every shard, the other ranks get its manifest. Each rank checking for itself added a footer read per
    shard per rank."""
    proxy = S3Proxy(s3_store.endpoint)
    counts, manifests = {}, []
    try:
        options = proxy.options(s3_store.options)
        for world in (1, 8):
            proxy.reset()
            manifests = ThreadWorld(world, timeout=120).run(
                lambda g: components.checked_manifest(f"{s3_synth}/train", options, g))
            counts[world] = len(list(proxy.select()))
    finally:
        proxy.close()
    assert all(m.num_samples == 320 and m.shards == manifests[0].shards for m in manifests), manifests
    shards = len(manifests[0].shards)
    assert counts[1] >= shards >= 8  # rank 0 did look at every shard
    assert (counts[8] - counts[1]) / 7 <= 2, counts  # a handful per extra rank, not one per shard


def test_the_node_cache_serves_later_epochs_and_a_restart_without_store_reads(s3_store: S3Store, s3_synth: str,
                                                                            tmp_path: Path) -> None:
    """``data.cache_dir``: two workers fetch each shard once (a lock per shard); the next epoch, read by a new loader
    on the same folder as a restarted job would, reads nothing from the store and yields what an uncached loader
    yields. With a limit of three shards the cache stays within it and the epoch is still right."""
    manifest = mf.load(f"{s3_synth}/train", s3_store.options)
    proxy = S3Proxy(s3_store.endpoint)

    def epoch(epoch: int, cache: Path | None, limit: int = 10**9) -> tuple[list[int], int]:
        proxy.reset()
        opts = ReaderOptions(storage_options=proxy.options(s3_store.options), cache_dir=str(cache) if cache else None,
                             cache_limit_bytes=limit)
        lo = ShardLoader(ShardDataset(manifest, to_tensor, train=True, options=opts, global_batch=16), 8, 2)
        lo.set_epoch(epoch)
        got = [int(i) for b in lo for i in b[2]]
        lo.close()
        return got, len(list(proxy.select()))

    try:
        expected = [epoch(e, None)[0] for e in (0, 1)]
        first, fetched = epoch(0, tmp_path / "cache")
        again, after = epoch(1, tmp_path / "cache")
        small = max(s.bytes for s in manifest.shards) * 3
        limited, _ = epoch(1, tmp_path / "small", small)
    finally:
        proxy.close()
    assert [first, again, limited] == [expected[0], expected[1], expected[1]]
    assert fetched >= len(manifest.shards) and after == 0
    assert len(list((tmp_path / "cache").glob("*.parquet"))) == len(manifest.shards)
    assert sum(p.stat().st_size for p in (tmp_path / "small").glob("*.parquet")) <= small


def test_persistent_workers_read_only_row_groups_after_their_first_epoch(s3_store: S3Store, s3_synth: str) -> None:
    """Without a cache: a worker reads each shard's footer once and knows its size from the manifest, so a later epoch
    asks the store for row groups alone (one ranged GET each; no HEAD, no footer), and yields what a new loader
    yields. Opening a shard again each epoch cost a HEAD and a footer read per shard per worker."""
    manifest = mf.load(f"{s3_synth}/train", s3_store.options)
    proxy = S3Proxy(s3_store.endpoint)
    try:
        opts = ReaderOptions(storage_options=proxy.options(s3_store.options))
        loader = ShardLoader(ShardDataset(manifest, to_tensor, train=True, options=opts, global_batch=16), 8, 2)
        fresh = ShardLoader(ShardDataset(manifest, to_tensor, train=True, options=opts, global_batch=16), 8, 2)
        try:
            for e in (0, 1):
                proxy.reset()
                loader.set_epoch(e)
                got = [int(i) for b in loader for i in b[2]]
            requests = list(proxy.select())
            fresh.set_epoch(1)
            assert got == [int(i) for b in fresh for i in b[2]]
        finally:
            loader.close()
            fresh.close()
    finally:
        proxy.close()
    groups = sum(len(s.row_groups) for s in manifest.shards)
    assert {r.method for r in requests} == {"GET"} and all(r.status == 206 for r in requests), requests[:5]
    assert len(requests) <= groups * 2, (len(requests), groups)  # each worker reads at most its groups' share twice


def _read_in_child(url: str, options: dict, out: Any) -> None:
    out.put(len(transfer.get(url, options)))


def test_a_process_forked_after_obstore_was_used_still_reads_the_store(s3_store: S3Store) -> None:
    """A resumed run reads its checkpoint through obstore, then forks DataLoader workers, which fetch shards for the
    node cache: obstore's runtime threads are not in the child, where a call through it hung."""
    import multiprocessing

    url = f"{s3_store.bucket('fork')}/blob"
    transfer.put(url, b"x" * 5000, s3_store.options)
    assert transfer.get(url, s3_store.options) == b"x" * 5000  # this process has used obstore now
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(url, s3_store.options, out))
    child.start()
    child.join(timeout=60)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0 and out.get(timeout=5) == 5000


def test_the_sink_takes_multipart_uploads_from_obstore_and_s3fs_and_stores_nothing(s3_store: S3Store) -> None:
    """The checkpoint bench's store that costs nothing: both clients' uploads succeed part by part, every byte
    reaches the proxy, none the store."""
    sink = S3Proxy(s3_store.endpoint, sink=True)
    bucket = s3_store.bucket("sink")
    data = os.urandom(40 * 2**20)  # three of transfer's 16 MB parts
    try:
        transfer.put(f"{bucket}/obstore", data, sink.options(s3_store.options))
        with s3fs.S3FileSystem(**sink.options(s3_store.options), skip_instance_cache=True).open(
                f"{bucket}/s3fs", "wb", block_size=16 * 2**20) as f:
            f.write(data)
    finally:
        sink.close()
    for key in ("obstore", "s3fs"):  # a multipart upload: start, parts, end
        writes = [r for r in sink.requests if r.path.endswith(f"/{key}")]
        methods = [r.method for r in writes]
        assert methods[0] == methods[-1] == "POST" and set(methods[1:-1]) == {"PUT"}
        assert sum(r.bytes_in for r in writes if r.method == "PUT") == len(data)
    assert sum(r.path.endswith("/obstore") and r.method == "PUT" for r in sink.requests) == 3  # transfer's parts
    assert s3fs.S3FileSystem(**s3_store.options, skip_instance_cache=True).ls(bucket.removeprefix("s3://")) == []


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


def test_the_start_up_check_waits_out_a_burst_of_slowdowns_and_still_fails_fast_on_a_wrong_bucket(
        s3_store: S3Store) -> None:
    proxy = S3Proxy(s3_store.endpoint, slowdown_next=8)  # more than s3fs's own five tries
    try:
        options = proxy.options(s3_store.options)
        check_reachable(f"{s3_store.bucket('runs')}/burst", options, "run.storage", "run.storage_options")
        assert proxy.slowdown_next == 0 and sum(r.status == 503 for r in proxy.select()) == 8
        with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
            check_reachable("s3://no-such-bucket/x", options, "run.storage", "run.storage_options")
    finally:
        proxy.close()


def test_a_run_in_the_store_resumes_on_two_nodes_from_one_checkpoint_read_once_through_a_throttling_store(
        s3_store: S3Store, synth_dir: Path, tmp_path: Path) -> None:
    """One rank trains 4 steps (the data on local disk: the shards' own S3 tests are above); then two torchrun "nodes" of two ranks each resume it, every request going through a
    proxy that counts per node and answers 503 SlowDown to a fifth of them. Rank 2 cannot read the newest
    checkpoint: before one restart decision it resumed from the older one alone and the job hung."""
    proxy = S3Proxy(s3_store.endpoint)
    runs = f"{s3_store.bucket('runs')}/it"
    settings = [*smoke_sets(tmp_path, synth_dir), f"run.storage={runs}", "run.name=s3run", "run.checkpoint_every_steps=2", "data.partitions=4",
                "batch.per_device_max=8"]

    def options(tag: str) -> list[str]:
        return [f"run.storage_options={json.dumps(proxy.options(s3_store.options, tag))}"]
    try:
        pretrain.train(recipes.load(ROOT / "recipes" / "smoke.yaml", [*settings, *options("first"), "run.max_steps=4"]))
        run = RunDir(f"{runs}/s3run", s3_store.options)
        assert [c.step for c in run.committed()] == [2, 4]  # an older checkpoint to fall back to
        size = run.latest().meta["files"][STATE]["size"]

        proxy.slowdown_share = 0.2
        port, marker = free_port(), tmp_path / "unreadable.fired"
        nodes = [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=2",
             "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "orchestrator.pretrain",
             str(ROOT / "recipes" / "smoke.yaml"), "--launcher=local", "--set", *settings, *options(f"node{node}"),
             "run.max_steps=6"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "ORCHESTRATOR_INJECT_FAULT": f"unreadable:4:2:{marker}"}) for node in (0, 1)]
        logs = [p.communicate(timeout=180)[0] for p in nodes]
    finally:
        proxy.close()

    # Throttled and alive: 503s were answered, and every rank finished the run.
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert sum(1 for r in proxy.select() if r.status == 503 and r.tag.startswith("node")) > 0
    starts = sorted(map(int, re.findall(r"rank (\d) of 4 on \S+ \(cpu\) trains from step 4", "".join(logs))))
    assert starts == [0, 1, 2, 3], "every rank resumes at step 4, rank 2 too (its own read would have failed)"

    # One read per node at most, counted at the store: rank 0 read it, node 1 got it over the process group.
    read = {tag: proxy.bytes_served(tag, f"checkpoints/step-00000004/{STATE}") for tag in ("node0", "node1")}
    assert sum(read.values()) <= 1.1 * 2 * size and read == {"node0": size, "node1": 0}, f"{read}, {size} bytes"

    # The run lives in the store, finished, without a secret in it.
    fs = s3fs.S3FileSystem(**s3_store.options)
    folder = f"{runs.removeprefix('s3://')}/s3run"
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(folder)}
    assert {"config.json", "metrics.jsonl", "model.safetensors", "checkpoints", "curves.png", "tensorboard"} <= names
    assert s3_store.options["secret"] not in fs.cat_file(f"{folder}/config.json").decode()
    assert run.latest().step == 6 and run.last_record()["step"] == 6
