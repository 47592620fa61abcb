"""A restart of 16, 64 and 256 ranks (8 per "node") against the local S3 store, behind a proxy that counts every
request per rank and answers 503 SlowDown to a share of them. Ranks are threads running the real start-up check
(``storage.check_reachable``) and the real restart (``orchestrator.train.restart.newest``: rank 0 chooses and reads
the checkpoint, every rank gets it and checks it); 256 processes with torch loaded would not fit in 24 GB. Rank 0's
bytes reach the other threads by reference, so the figures are the store's side of a restart, not the network's.

    .venv/bin/python bench/scale_sim.py [--ranks 16 64 256] [--per-node 8] [--size-mb 1324] [--slowdown 0.2] [--shards 100]
    .venv/bin/python bench/scale_sim.py --before --ranks 16 64 --size-mb 64    # start-up and restart as they were

It also compares, with real processes (gloo, ``--per-node`` of them on one node), the two ways the ranks of a node
can get the bytes: a broadcast over the process group, and a file on node-local disk (what ``restart`` does).

Before the restart each rank runs the training start-up's dataset check (``components.checked_manifest``: rank 0
checks every shard of a ``--shards`` split, the others get its manifest). The last line: ``ranks=<n>
restart_bytes_ratio=<store bytes read / (nodes x checkpoint size)> failed_ranks=<n>
startup_data_requests_per_extra_rank=<dataset requests added per rank beyond the smallest run>`` for the largest run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from orchestrator import storage, transfer  # noqa: E402
from orchestrator.data import manifest as mf  # noqa: E402
from orchestrator.rundir import STATE, RunDir  # noqa: E402
from orchestrator.train import components, restart  # noqa: E402
from tests.s3_proxy import S3Proxy  # noqa: E402
from tests.services import S3Store  # noqa: E402
from tests.thread_group import ThreadWorld  # noqa: E402


def simulate(store: S3Store, proxy: S3Proxy, run_url: str, data_url: str, ranks: int, per_node: int,
             before: bool = False) -> dict[str, float]:
    """Start ``ranks`` threads together; each checks the store and the training dataset, then restarts
    (``before``: as the code did before one start-up decision, every rank checking every shard and reading the
    newest checkpoint it can). What the store saw, per rank."""
    proxy.reset()
    world, failed, ready = ThreadWorld(ranks, per_node=per_node), [], []
    go = threading.Barrier(ranks)

    def rank(r: int) -> None:
        options = proxy.options(store.options, f"n{r // per_node}r{r}")
        go.wait()
        start = time.perf_counter()
        try:
            storage.check_reachable(run_url, options, "run.storage", "run.storage_options")
            fresh = {**options, "skip_instance_cache": True}  # a process of its own would have its own client
            manifest = mf.load(data_url, fresh) if before else components.checked_manifest(data_url, fresh, world.group(r))
            assert manifest.shards
            run = RunDir(run_url, fresh)
            found = next(run.newest_readable(), None) if before else restart.newest(run, world.group(r))
            assert found is not None
            ready.append(time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - counted as a failed rank
            failed.append(f"rank {r}: {storage.one_line(exc)}")
            world.abort()

    threads = [threading.Thread(target=rank, args=(r,), name=f"rank-{r}") for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    requests = list(proxy.select())
    per_rank = Counter(r.tag for r in requests)
    bytes_read = sum(r.bytes_out for r in requests if r.method == "GET" and r.status < 300)
    per_node = Counter()
    for r in requests:
        if r.method == "GET" and r.status < 300:
            per_node[r.tag.split("r")[0]] += r.bytes_out
    for line in failed[:5]:
        print(f"    failed {line}")
    return {"requests": len(requests), "max_requests_per_rank": max(per_rank.values()),
            "dataset_requests": sum(1 for r in requests if DATA in r.path),
            "requests_per_rank": len(requests) / ranks, "bytes_read": bytes_read,
            "max_bytes_per_node": max(per_node.values() or [0]), "slowdowns": sum(r.status == 503 for r in requests),
            "failed": len(failed), "ready_s": max(ready) if len(ready) == ranks else float("nan")}


DATA = "/imagenet-like/"


def dataset(store: S3Store, bucket: str, shards: int) -> str:
    """A training split of ``shards`` shards in the store (copies of one small shard: the start-up check reads
    footers, not images)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    import s3fs

    table = pa.table({"image": pa.array([{"bytes": b"jpeg", "path": f"{i}.jpg"} for i in range(16)], mf.IMAGE_TYPE),
                      "label": pa.array(range(16), pa.int64())})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=8)
    url = f"{bucket}{DATA}train"
    fs = s3fs.S3FileSystem(**store.options)
    fs.pipe({f"{url.removeprefix('s3://')}/shard-{i:05d}.parquet": buf.getvalue() for i in range(shards)})
    mf.write(mf.Manifest(split="train", shards=[mf.ShardInfo(url=f"shard-{i:05d}.parquet", rows=16, row_groups=[8, 8],
                                                             bytes=len(buf.getvalue())) for i in range(shards)]),
             url, store.options)
    return url


def transports(store: S3Store, url: str, per_node: int, size_mb: int) -> None:
    """One node of ``per_node`` processes: broadcast from rank 0 against a download by the node's first rank to
    local disk, read by the others from there."""
    import torch.multiprocessing as mp

    times = mp.get_context("spawn").Manager().dict()
    mp.spawn(_transport_rank, args=(per_node, url, store.options, times), nprocs=per_node, join=True)
    print(f"  one node of {per_node} processes (gloo), {size_mb} MB from rank 0 to the others (median of 5): a "
          f"broadcast {times['broadcast']:.2f} s; a file on node-local disk (restart.ProcessGroup.share_bytes) "
          f"{times['local disk']:.2f} s")


def _transport_rank(rank: int, world: int, url: str, options: dict, times: dict) -> None:
    import torch
    import torch.distributed as dist

    from orchestrator.train.context import Rank

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("SIM_PORT", "29533"))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = restart.ProcessGroup(Rank(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu")))
    data = transfer.get(url, options) if rank == 0 else None
    size = group.share(len(data) if data is not None else 0)
    seconds: dict[str, list[float]] = {"broadcast": [], "local disk": []}
    for round_ in range(5):  # alternating, the median of each
        for how in ("broadcast", "local disk")[::1 if round_ % 2 else -1]:
            dist.barrier()
            start = time.perf_counter()
            got = group.broadcast(data, size) if how == "broadcast" else group.share_bytes(data, size)
            dist.barrier()
            seconds[how].append(time.perf_counter() - start)
            assert len(got) == size
            del got
    if rank == 0:
        times.update({how: statistics.median(s) for how, s in seconds.items()})
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--per-node", type=int, default=8)
    p.add_argument("--size-mb", type=int, default=1324, help="checkpoint size (InceptionNeXt-B's state.pt: 1324 MB)")
    p.add_argument("--slowdown", type=float, default=0.2, help="share of requests answered 503 SlowDown")
    p.add_argument("--transport-mb", type=int, default=256)
    p.add_argument("--shards", type=int, default=100, help="shards of the training split checked at start-up")
    p.add_argument("--before", action="store_true", help="every rank reads the checkpoint itself (the old restart)")
    args = p.parse_args()
    store = S3Store.started("bench-scale-", niceness=19)
    proxy = S3Proxy(store.endpoint, slowdown_share=args.slowdown)
    try:
        bucket = store.bucket("scale")
        run = RunDir(f"{bucket}/b", store.options)
        size = args.size_mb * 2**20
        run.write_checkpoint(1000, {STATE: np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()}, {})
        data = dataset(store, bucket, args.shards)
        print(f"{'every rank checks the data and reads the checkpoint (before)' if args.before else 'rank 0 checks and reads, all ranks get it'}: "
              f"start-up over {args.shards} shards and a restart from a {args.size_mb} MB checkpoint, "
              f"{args.per_node} ranks per node, {100 * args.slowdown:.0f}% of requests answered 503 SlowDown")
        print(f"  {'ranks':>5} {'nodes':>5} {'requests':>8} {'per rank':>8} {'max/rank':>8} {'data req':>8} {'503s':>5} "
              f"{'store GB':>8} {'GB/node max':>11} {'bytes ratio':>11} {'failed':>6} {'ready s':>7}")
        last, data_requests = "", {}
        for ranks in args.ranks:
            nodes = -(-ranks // args.per_node)
            m = simulate(store, proxy, run.url, data, ranks, args.per_node, args.before)
            ratio = m["bytes_read"] / (nodes * size)
            data_requests[ranks] = m["dataset_requests"]
            print(f"  {ranks:>5} {nodes:>5} {m['requests']:>8} {m['requests_per_rank']:>8.1f} "
                  f"{m['max_requests_per_rank']:>8} {m['dataset_requests']:>8} {m['slowdowns']:>5} {m['bytes_read'] / 2**30:>8.2f} "
                  f"{m['max_bytes_per_node'] / 2**30:>11.2f} {ratio:>11.3f} {m['failed']:>6} {m['ready_s']:>7.1f}", flush=True)
            first = min(data_requests)
            extra = (m["dataset_requests"] - data_requests[first]) / (ranks - first) if ranks > first else 0.0
            last = (f"ranks={ranks} restart_bytes_ratio={ratio:.3f} failed_ranks={m['failed']} "
                    f"startup_data_requests_per_extra_rank={extra:.2f}")
        proxy.slowdown_share = 0.0
        small = RunDir(f"{bucket}/transport", store.options)
        small.write_checkpoint(1, {STATE: os.urandom(args.transport_mb * 2**20)}, {})
        transports(store, f"{small.checkpoint_url(1)}/{STATE}", args.per_node, args.transport_mb)
        print(last)
    finally:
        proxy.close()
        store.stop()


if __name__ == "__main__":
    main()
