"""What checkpointing to object storage costs the training loop: the time of ``--every`` steps that
follow a checkpoint (its staging, and its encoding and upload to a loopback S3 store running in the
background while those steps train, up to its commit) over the time of ``--every`` steps without one,
alternating rounds in the same run. The store runs niced (on a cluster it is not on the training node;
on 2 cores its CPU would otherwise be charged to training). Then one B-sized state (InceptionNeXt-B
weights, EMA and AdamW moments, about 1.3 GB) saved once: what blocks training (staging the tensors in
host memory) against what runs in the background (encoding, upload, commit).

    .venv/bin/python bench/checkpoint.py [--every 20] [--rounds 15] [--skip-b]

The last line is ``checkpoint_overhead=<with / without>``, the median of the per-round ratios; the line
before it gives their spread (quartiles) and the standard error of the median, so a 3% effect can be told
from this machine's noise.

    .venv/bin/python bench/checkpoint.py --state b [--epoch-s 13] [--epochs 4]

A B-sized state through each S3 client candidate: upload and download MB/s of the encoded ``state.pt`` for the
old writer (s3fs's file writer, one part at a time), s3fs's ``pipe_file`` (waves of 10 parts), boto3's
``TransferConfig`` (10 threads) and obstore (12 parts in a sliding window: ``orchestrator.transfer``, the one
training uses). Then epochs of ``--epoch-s`` seconds (the host waits on the device, as in GPU training) with a
checkpoint at each end, under both ``run.checkpoint_overlap`` policies: the share of each epoch the training thread
lost (staging, and waiting for the previous upload). On this machine the store shares the client's cores and sets the
upload speed, so each client also uploads to a sink (``tests/s3_proxy.py`` with ``sink``: writes answered and
dropped), as to a store elsewhere on a cluster: ``client_upload_speedup=<obstore / old writer>`` there. Last line:
``upload_speedup=<obstore / old writer>`` on the local store. The line before it bounds that figure: the store's
CPU per MB (the least any client cost it) over this machine's cores is the most any client could upload at here,
``upload_speedup_ceiling=`` that over the old writer's speed.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from orchestrator import recipe as recipes  # noqa: E402
from orchestrator import transfer  # noqa: E402
from orchestrator.rundir import RunDir  # noqa: E402
from orchestrator.train import checkpoint, components, tasks  # noqa: E402
from orchestrator.train.components import Components  # noqa: E402
from orchestrator.train.context import TrainContext  # noqa: E402
from orchestrator.train.loop import save, train_step  # noqa: E402
from tests.s3_proxy import S3Proxy  # noqa: E402
from tests.services import S3Store  # noqa: E402


class Loader:
    """Stands in for the shard loader: the checkpoint records its position."""

    def state_dict(self) -> dict[str, int]:
        return {"epoch": 0, "batches": 0}


def smoke_components(ctx: TrainContext, batch: int, size: int) -> tuple[Components, recipes.Recipe]:
    recipe = recipes.load(ROOT / "recipes" / "smoke.yaml", [
        f"data.input_size={size}", f"batch.global_batch_size={batch}", f"batch.per_device_max={batch}", "ema.decay=0.999"])
    task = tasks.for_recipe(recipe)
    model = components.build_model(recipe, ctx, init=False, task=task)
    c = components.assemble(recipe, ctx, task, model, model, (Loader(), None), 1000)
    return c, recipe


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--skip-b", action="store_true")
    p.add_argument("--state", choices=("smoke", "b"), default="smoke")
    p.add_argument("--epoch-s", type=float, default=13.0)
    p.add_argument("--epochs", type=int, default=4)
    args = p.parse_args()
    if args.state == "b":
        return clients_and_epochs(args.epoch_s, args.epochs)
    store = S3Store.started("bench-ckpt-", niceness=19)
    try:
        bucket = store.bucket("bench")
        ctx = TrainContext(run=RunDir(f"{bucket}/smoke", store.options))
        c, recipe = smoke_components(ctx, args.batch, args.size)
        g = torch.Generator().manual_seed(0)
        data = (torch.randint(0, 256, (args.batch, args.size, args.size, 3), dtype=torch.uint8, generator=g),
                torch.randint(0, 10, (args.batch,), generator=g))
        state = {"step": 0, "epoch": 0, "nonfinite": 0}
        c.step_model.train()

        def steps(checkpointing: bool) -> float:
            """Seconds per step of a window of ``every`` steps; with a checkpoint, saved at its start and
            committed by its end (what the next checkpoint would otherwise wait for)."""
            start = time.perf_counter()
            if checkpointing:
                save(c, recipe, ctx, state, {"epoch": 0})
            for _ in range(args.every):
                train_step(c, recipe, ctx, state, iter([(*data, torch.arange(args.batch), None)]))
                state["step"] += 1
            ctx.flush()
            return (time.perf_counter() - start) / args.every

        steps(True)  # warm-up: first S3 connection, allocator
        ratios, without, with_ = [], [], []
        for _ in range(args.rounds):
            a, b = steps(False), steps(True)
            without.append(a)
            with_.append(b)
            ratios.append(b / a)
        size_mb = len(checkpoint.encode({"model": c.model.state_dict(), "optimizer": c.optimizer.state_dict()})
                      ["state.pt"]) / 2**20
        start = time.perf_counter()
        ctx.run.write_checkpoint(10**6, checkpoint.encode({"model": c.model.state_dict()}), {})
        print(f"smoke model (atto {args.size}px, batch {args.batch}), checkpoint about {size_mb:.1f} MB to {store.endpoint}")
        print(f"  step without checkpoints: {statistics.median(without) * 1000:.1f} ms (median of {args.rounds} rounds)")
        print(f"  step with one every {args.every}: {statistics.median(with_) * 1000:.1f} ms; per-round ratios "
              f"{', '.join(f'{r:.3f}' for r in ratios)}")
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        se = 1.2533 * statistics.stdev(ratios) / len(ratios) ** 0.5  # the median's standard error (normal approximation)
        print(f"  ratio quartiles {q1:.3f}-{q3:.3f}, standard error of the median {se:.3f}")
        print(f"  a synchronous commit of the weights alone takes {(time.perf_counter() - start) * 1000:.0f} ms")
        if not args.skip_b:
            b_sized(bucket, store)
        print(f"checkpoint_overhead={statistics.median(ratios):.3f}")
    finally:
        store.stop()


def b_state() -> dict[str, Any]:
    """InceptionNeXt-B's weights, EMA and AdamW moments (without a B-sized backward)."""
    model = timm.create_model("inception_next_base", num_classes=1000)
    ema = timm.create_model("inception_next_base", num_classes=1000)
    optimizer = torch.optim.AdamW(model.parameters())
    for group in optimizer.param_groups:  # materialise the two moments without a B-sized backward
        for param in group["params"]:
            optimizer.state[param] = {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(param),
                                      "exp_avg_sq": torch.rand_like(param)}
    return {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict()}


def b_sized(bucket: str, store: S3Store) -> None:
    """One B-sized state: the training thread pays for the snapshot only."""
    ctx = TrainContext(run=RunDir(f"{bucket}/b", store.options))
    state = b_state()
    start = time.perf_counter()
    files = checkpoint.encode(state)
    encoded = time.perf_counter() - start  # what blocked training when the snapshot was encoded in its thread
    for _ in range(3):  # the first staging pays for fresh host memory; a run's later ones reuse it
        start = time.perf_counter()
        snapshot = checkpoint.stage(state)
        staged = time.perf_counter() - start
        ctx.save_checkpoint(1, snapshot, {})
        submitted = time.perf_counter() - start
        ctx.flush()
        uploaded = time.perf_counter() - start
        print(f"B-sized state ({len(files['state.pt']) / 2**30:.2f} GB): staging {staged:.2f} s blocks training "
              f"(encoding it there took {encoded:.2f} s), submit returns at {submitted:.2f} s, encoding, upload and "
              f"commit done in the background at {uploaded:.2f} s")


def clients_and_epochs(epoch_s: float, epochs: int) -> None:
    store = S3Store.started("bench-ckpt-", niceness=19)
    sink = S3Proxy(store.endpoint, sink=True)
    try:
        bucket = store.bucket("bench").removeprefix("s3://")
        state = b_state()
        data = checkpoint.encode(state)["state.pt"]
        mb = len(data) / 2**20
        print(f"B-sized state.pt: {mb:.0f} MB, to {store.endpoint} (SeaweedFS on loopback, niced), and to a sink "
              "(tests/s3_proxy.py: writes answered and dropped, a store that costs this machine nothing)")
        speeds: dict[str, tuple[float, float, float, float]] = {}
        for name in CLIENTS:
            try:
                os.sync()  # the last upload's pages written out: what is timed is the client and the store, not this disk
                before = store_cpu(store)
                up = upload_s(name, bucket, store.options, data)
                spent = store_cpu(store) - before
                speeds[name] = (up, download_s(name, bucket, store.options, len(data)), spent,
                                upload_s(name, bucket, sink.options(store.options), data))
            except ImportError as exc:
                print(f"  {name:<34} not measured: {exc} (pip install -e '.[bench]')")
        for name, (up, down, spent, to_sink) in speeds.items():
            print(f"  {name:<34} upload {mb / up:7.1f} MB/s ({up:5.1f} s; the store's CPU {spent:4.1f} s)   "
                  f"download {mb / down:7.1f} MB/s ({down:5.1f} s)   upload to the sink {mb / to_sink:7.1f} MB/s")
        for policy in ("wait", "skip"):
            os.sync()
            lost, skipped = epochs_lost(f"s3://{bucket}", store, state, epoch_s, epochs, policy)
            print(f"  {epochs} epochs of {epoch_s:.0f} s, run.checkpoint_overlap={policy}: training lost "
                  f"{statistics.median(lost):.2f} s per epoch (median; {100 * statistics.median(lost) / epoch_s:.1f}%), "
                  f"{skipped} checkpoints skipped")
        old, new = speeds[CLIENTS[0]], speeds[CLIENTS[-1]]
        cores = len(os.sched_getaffinity(0))
        per_mb = min(spent for _, _, spent, _ in speeds.values()) / mb  # the least any client cost the store
        ceiling = cores / per_mb  # MB/s
        print(f"the store's ceiling here: {ceiling:.0f} MB/s for a client that cost nothing ({cores} cores / "
              f"{1000 * per_mb:.1f} store CPU-ms per MB): upload_speedup_ceiling={ceiling / (mb / old[0]):.2f} "
              "(over the old writer's upload)")
        print(f"client_upload_speedup={old[3] / new[3]:.2f} (to the sink: the clients alone)")
        print(f"upload_speedup={old[0] / new[0]:.2f}")
    finally:
        sink.close()
        store.stop()


CLIENTS = ("old writer (s3fs file, serial)", "s3fs pipe_file (waves of 10)", "boto3 TransferConfig (10 threads)",
           "obstore (orchestrator.transfer)")


def store_cpu(store: S3Store) -> float:
    """CPU-seconds the store's process has used (all its threads)."""
    assert store.proc is not None
    fields = Path(f"/proc/{store.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _boto3(options: dict[str, Any]) -> tuple[Any, Any]:
    import boto3
    from boto3.s3.transfer import TransferConfig

    client = boto3.client("s3", endpoint_url=options["endpoint_url"], aws_access_key_id=options["key"],
                          aws_secret_access_key=options["secret"], region_name="us-east-1")
    return client, TransferConfig(multipart_chunksize=16 * 2**20, max_concurrency=10)


def upload_s(name: str, bucket: str, options: dict[str, Any], data: bytes) -> float:
    """Seconds to upload ``data`` with one client (to ``clients/<its index>``)."""
    import s3fs

    key = f"clients/{CLIENTS.index(name)}"
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    start = time.perf_counter()
    if name.startswith("old writer"):
        with fs.open(f"{bucket}/{key}", "wb") as f:
            for at in range(0, len(data), 64 * 2**20):
                f.write(data[at:at + 64 * 2**20])
    elif name.startswith("s3fs"):
        fs.pipe_file(f"{bucket}/{key}", data)
    elif name.startswith("boto3"):
        client, config = _boto3(options)
        client.upload_fileobj(io.BytesIO(data), bucket, key, Config=config)
    else:
        transfer.put(f"s3://{bucket}/{key}", data, options)
    return time.perf_counter() - start


def download_s(name: str, bucket: str, options: dict[str, Any], size: int) -> float:
    """Seconds to download what ``upload_s`` put there with the same client."""
    import s3fs

    key = f"clients/{CLIENTS.index(name)}"
    start = time.perf_counter()
    if name.startswith(("old writer", "s3fs")):
        got = s3fs.S3FileSystem(**options, skip_instance_cache=True).cat_file(f"{bucket}/{key}")
    elif name.startswith("boto3"):
        client, config = _boto3(options)
        buffer = io.BytesIO()
        client.download_fileobj(bucket, key, buffer, Config=config)
        got = buffer.getvalue()
    else:
        got = transfer.get(f"s3://{bucket}/{key}", options)
    assert len(got) == size
    return time.perf_counter() - start


def epochs_lost(bucket: str, store: S3Store, state: dict[str, Any], epoch_s: float, epochs: int,
                policy: str) -> tuple[list[float], int]:
    """Seconds per epoch the training thread spent checkpointing (it sleeps through the rest of an epoch, as a
    host waiting on its GPU does), and how many checkpoints the policy skipped."""
    ctx = TrainContext(run=RunDir(f"{bucket}/epochs-{policy}", store.options))
    lost, skipped = [], 0
    for epoch in range(epochs):
        start = time.perf_counter()
        if policy == "skip" and ctx.uploading():
            skipped += 1
        else:
            ctx.save_checkpoint(epoch + 1, checkpoint.stage(state), {"epoch": epoch})
        spent = time.perf_counter() - start
        lost.append(spent)
        time.sleep(max(0.0, epoch_s - spent))
    ctx.flush()
    return lost, skipped


if __name__ == "__main__":
    main()
