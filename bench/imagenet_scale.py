"""ImageNet at full size on this machine: the three official downloads, generated (1,281,167 tiny JPEGs in 1,000
class tars inside one tar, 50,000 validation images, a devkit whose IDs are shuffled), converted into the local S3
store by ``python -m orchestrator.data shard``, by MosaicML Streaming's ``MDSWriter`` and by litdata's ``optimize``.

    .venv/bin/python bench/imagenet_scale.py [--scale 1.0] [--workers 2] [--keep DIR]

It reports:
- images per CPU-second of each conversion (every process's CPU: the command's and its workers'), and wall time;
- the converting command's peak memory (its VmHWM);
- shards redone after the conversion is killed (SIGKILL) at half of the training shards, and after one injected
  upload failure (the store refuses one shard's upload, through ``tests/s3_proxy``): goal, no more than the shards
  in flight;
- the dataset requests at the start of training for 1, 16 and 256 ranks (threads running the real start-up check,
  ``components.checked_manifest``, behind the counting proxy);
- ``data verify``'s wall and CPU time.

The last line: ``images=<n> shards_redone_after_kill=<n> shards_redone_after_failure=<n>
startup_requests_per_rank=<requests added per rank beyond one> conversion_vs_streaming=<x> conversion_vs_litdata=<x>``
(this command's images per CPU-second against each peer's). The peers need ``bash scripts/install_peers.sh``;
without it their figures are left out. ``--scale 0.01`` runs the same steps on 1% of the images (there ``verify``
exits 1: ImageNet's 50 validation images a class are expected of its 1,000 classes).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from orchestrator import storage  # noqa: E402
from orchestrator.data import manifest as mf  # noqa: E402
from orchestrator.data.ilsvrc_tars import DEVKIT, TRAIN, VAL  # noqa: E402
from orchestrator.train import components  # noqa: E402
from tests.imagenet_layout import WNIDS, add, devkit  # noqa: E402
from tests.s3_proxy import S3Proxy  # noqa: E402
from tests.services import S3Store, scratch  # noqa: E402
from tests.thread_group import ThreadWorld  # noqa: E402

TRAIN_IMAGES, VAL_IMAGES = 1_281_167, 50_000
SHARD_MB = 8  # ~160 training shards of these tiny images (ImageNet's real JPEGs at 256 MB: ~570)


# --- the downloads ------------------------------------------------------------------------------------------
def jpeg_pool(rng: np.random.Generator, n: int = 256) -> list[bytes]:
    """``n`` distinct JPEGs of 32-48 px a side (blurred noise: a photo's spectrum in miniature)."""
    pool = []
    for _ in range(n):
        h, w = rng.integers(32, 49, 2)
        img = Image.fromarray(rng.integers(0, 255, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=90)
        pool.append(out.getvalue())
    return pool


def unique(base: bytes, index: int) -> bytes:
    """``base`` with a JPEG comment segment naming ``index`` after its SOI marker: a distinct, valid file."""
    note = f"image {index}".encode()
    return base[:2] + b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note + base[2:]


def per_class(total: int) -> list[int]:
    """ImageNet's 1,281,167 training images over 1,000 classes (the real counts range 732-1,300; these are even)."""
    return [total // 1000 + (k < total % 1000) for k in range(1000)]


def generate(root: Path, scale: float, seed: int = 0) -> tuple[int, int]:
    """The three downloads in ``root``; returns (training images, validation images)."""
    rng = np.random.default_rng(seed)
    pool = jpeg_pool(rng)
    counts = per_class(round(TRAIN_IMAGES * scale))
    n = 0
    with tarfile.open(root / TRAIN, "w") as outer:
        for wnid, count in zip(WNIDS, counts, strict=True):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for i in range(count):
                    add(tar, f"{wnid}_{i + 1}.JPEG", unique(pool[(n + i) % len(pool)], n + i))
            n += count
            add(outer, f"{wnid}.tar", inner.getvalue())
    val = round(VAL_IMAGES * scale)
    labels = [WNIDS[k % 1000] for k in rng.permutation(val)]  # 50 a class at full size, as ImageNet's
    with tarfile.open(root / VAL, "w") as tar:
        for i in range(val):
            add(tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", unique(pool[i % len(pool)], TRAIN_IMAGES + i))
    (root / DEVKIT).write_bytes(devkit(labels, seed))
    return n, val


# --- running a conversion -----------------------------------------------------------------------------------
class Measured:
    """A command run as a child: its wall time, every process's CPU (it and its reaped workers, by wait4), and its
    own peak memory (VmHWM, read while it runs)."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> None:
        self.log = log
        out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed in wait()
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.peak_kb = 0
        self._watch = threading.Thread(target=self._poll_memory, daemon=True)
        self._watch.start()

    def _status(self) -> str:
        try:
            return Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return ""

    def running(self) -> bool:
        """Whether the command has not exited, without reaping it (``wait`` does, to read its CPU)."""
        return re.search(r"State:\s+[^Z]", self._status()) is not None

    def _poll_memory(self) -> None:
        while self.running():
            found = re.search(r"VmHWM:\s+(\d+) kB", self._status())
            if found:
                self.peak_kb = max(self.peak_kb, int(found.group(1)))
            time.sleep(0.2)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)

    def wait(self) -> dict[str, float]:
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self._watch.join()
        return {"code": self.proc.returncode, "wall_s": time.perf_counter() - self.start,
                "cpu_s": usage.ru_utime + usage.ru_stime, "peak_mb": self.peak_kb / 1024}

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log else ""


def shard_command(src: Path, dest: str, options: dict[str, Any], workers: int, *extra: str) -> list[str]:
    opts = [f"{k}={v}" for k, v in options.items()]
    return [sys.executable, "-m", "orchestrator.data", "shard", str(src), dest, "--shard-size-mb", str(SHARD_MB),
            "--workers", str(workers), *extra, "--storage-option", *opts]


def reused(output: str, split: str) -> int:
    """Shards a re-run found recorded and kept (its ``(N already verified)``)."""
    found = re.search(rf"{split}: \d+ images in \d+ shards \((\d+) already verified\)", output)
    assert found, f"no plan line for {split} in the conversion's output:\n{output[-2000:]}"
    return int(found.group(1))


def shard_objects(fs: Any, url: str) -> set[str]:
    path = url.removeprefix("s3://")
    return {p.rsplit("/", 1)[-1] for p in fs.ls(path, refresh=True) if p.endswith(".parquet")} if fs.exists(path) else set()


def killed_at_half(src: Path, store: S3Store, dest: str, workers: int, planned: int, logs: Path) -> dict[str, int]:
    """SIGKILL the conversion once half the training shards are recorded; re-run it. Redone: shards whose object
    was in the store at the kill that the re-run wrote again (uploaded, not yet recorded: in flight)."""
    fs = storage.filesystem(dest, store.options)[0]
    progress = f"{dest.removeprefix('s3://')}/train/_progress"
    run = Measured(shard_command(src, dest, store.options, workers, "--split", "train"), log=logs / "kill-1.log")
    while run.running():
        if fs.exists(progress) and len(fs.ls(progress, refresh=True)) >= planned // 2:
            run.kill()
            break
        time.sleep(0.5)
    run.wait()
    present = shard_objects(fs, f"{dest}/train")
    recorded = len(fs.ls(progress, refresh=True))
    rerun = Measured(shard_command(src, dest, store.options, workers, "--split", "train"), log=logs / "kill-2.log")
    assert rerun.wait()["code"] == 0, rerun.output()[-3000:]
    kept = reused(rerun.output(), "train")
    return {"present": len(present), "recorded": recorded, "kept": kept, "redone": len(present) - kept}


def failed_upload(src: Path, store: S3Store, dest: str, workers: int, logs: Path) -> dict[str, Any]:
    """The validation split converted through a proxy that refuses (403) one shard's upload, then again without it.
    Redone: shards the re-run wrote beyond the one that failed."""
    proxy = S3Proxy(store.endpoint, deny="val/shard-00000.parquet")
    try:
        first = Measured(shard_command(src, dest, proxy.options(store.options), workers, "--split", "val"),
                         log=logs / "fail-1.log")
        code = first.wait()["code"]
    finally:
        proxy.close()
    assert code != 0 and "shard-00000" in first.output(), first.output()[-3000:]
    rerun = Measured(shard_command(src, dest, store.options, workers, "--split", "val"), log=logs / "fail-2.log")
    assert rerun.wait()["code"] == 0, rerun.output()[-3000:]
    planned = len(mf.load(f"{dest}/val", store.options).shards)
    written = planned - reused(rerun.output(), "val")
    return {"planned": planned, "written": written, "redone": written - 1,
            "error": next(line for line in first.output().splitlines() if "shard-00000" in line)}


def startup_requests(proxy: S3Proxy, store: S3Store, url: str, ranks: int) -> int:
    """Requests to the store while ``ranks`` threads run training's start-up dataset check together."""
    proxy.reset()
    world = ThreadWorld(ranks, per_node=8)
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            options = {**proxy.options(store.options, f"r{r}"), "skip_instance_cache": True}
            assert components.checked_manifest(url, options, world.group(r)).shards
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
            world.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return len(list(proxy.select()))


# --- the peers ----------------------------------------------------------------------------------------------
def peers(src: Path, store: S3Store, bucket: str, workers: int, logs: Path) -> dict[str, dict[str, float]]:
    """Streaming's MDSWriter and litdata's optimize on the same downloads (``bench/peer_convert.py``, a child with
    ``.peers/`` first on its path), each measured as this project's command is."""
    found = ROOT / ".peers"
    if not found.is_dir():
        print("streaming, litdata: not measured (install them with: bash scripts/install_peers.sh)")
        return {}
    out = {}
    o = store.options
    for name in ("streaming", "litdata"):
        run = Measured([sys.executable, str(Path(__file__).with_name("peer_convert.py")), name, str(src),
                        f"{bucket}/{name}", "--endpoint", o["endpoint_url"], "--key", o["key"], "--secret", o["secret"],
                        "--workers", str(workers)], env={**os.environ, "PYTHONPATH": str(found)}, log=logs / f"{name}.log")
        result = run.wait()
        assert result["code"] == 0, run.output()[-3000:]
        result["images"] = json.loads(run.output().strip().splitlines()[-1])["images"]
        out[name] = result
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0, help="share of ImageNet's image counts (1.0: full size)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--keep", type=Path, help="folder for the downloads, kept between runs (default: a temporary one)")
    args = parser.parse_args()
    tmp = scratch("bench-imagenet-")
    src = args.keep or tmp / "downloads"
    src.mkdir(parents=True, exist_ok=True)
    logs = tmp / "logs"
    logs.mkdir()
    marker = src / f"generated-{args.scale}"
    start = time.perf_counter()
    if not marker.exists():
        train_n, val_n = generate(src, args.scale)
        marker.write_text(json.dumps([train_n, val_n]))
    train_n, val_n = json.loads(marker.read_text())
    size = sum(f.stat().st_size for f in src.iterdir())
    print(f"downloads: {train_n:,} training and {val_n:,} validation JPEGs, {size / 1e9:.2f} GB in {src} "
          f"({time.perf_counter() - start:.0f} s)")
    store = S3Store(data_dir=tmp / "s3", log_path=tmp / "weed.log", niceness=5)
    store.data_dir.mkdir()
    store.start()
    try:
        bucket = store.bucket("imagenet")
        ours = Measured(shard_command(src, f"{bucket}/ours", store.options, args.workers), log=logs / "ours.log")
        result = ours.wait()
        assert result["code"] == 0, ours.output()[-3000:]
        result["images"] = train_n + val_n
        converted = {"orchestrator.data shard": result, **peers(src, store, bucket, args.workers, logs)}
        print(f"{'conversion':<24} {'images':>10} {'wall s':>8} {'CPU s':>8} {'img/CPU-s':>10} {'peak MB':>8}")
        for name, r in converted.items():
            print(f"{name:<24} {r['images']:>10,} {r['wall_s']:>8.0f} {r['cpu_s']:>8.0f} {r['images'] / r['cpu_s']:>10.0f} "
                  f"{r['peak_mb']:>8.0f}")
        planned = len(mf.load(f"{bucket}/ours/train", store.options).shards)
        verify = Measured([sys.executable, "-m", "orchestrator.data", "verify", f"{bucket}/ours", "--expect",
                           f"train={train_n}", "--expect", f"val={val_n}", "--storage-option",
                           *(f"{k}={v}" for k, v in store.options.items())], log=logs / "verify.log").wait()
        print(f"data verify: {verify['wall_s']:.0f} s, {verify['cpu_s']:.0f} CPU-s, exit {verify['code']}")
        kill = killed_at_half(src, store, f"{bucket}/killed", args.workers, planned, logs)
        print(f"killed at half of {planned} training shards: {kill['present']} shard objects in the store, "
              f"{kill['recorded']} recorded; the re-run kept {kill['kept']} and redid {kill['redone']} "
              f"({args.workers} workers: at most {args.workers} in flight)")
        failure = failed_upload(src, store, f"{bucket}/failed", args.workers, logs)
        print(f"one refused upload: {failure['error'].strip()[:160]}; the re-run wrote {failure['written']} of "
              f"{failure['planned']} validation shards")
        proxy = S3Proxy(store.endpoint)
        try:
            requests = {n: startup_requests(proxy, store, f"{bucket}/ours/train", n) for n in (1, 16, 256)}
        finally:
            proxy.close()
        print("start-up dataset requests: " + ", ".join(f"{n} ranks {r}" for n, r in requests.items()))
    finally:
        store.stop()
        shutil.rmtree(tmp / "s3", ignore_errors=True)
    rate = {k: r["images"] / r["cpu_s"] for k, r in converted.items()}
    mine = rate["orchestrator.data shard"]
    vs = {k: f"{mine / rate[k]:.2f}" if k in rate else "nan" for k in ("streaming", "litdata")}
    print(f"images={train_n + val_n} shards_redone_after_kill={kill['redone']} shards_redone_after_failure="
          f"{failure['redone']} startup_requests_per_rank={(requests[256] - requests[1]) / 255:.2f} "
          f"conversion_vs_streaming={vs['streaming']} conversion_vs_litdata={vs['litdata']}")


if __name__ == "__main__":
    main()
