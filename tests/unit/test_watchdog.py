"""The stall watchdog: a rank that stops making progress is found, its stacks saved, the attempt ended, and
the run resumes from its newest checkpoint exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from orchestrator.rundir import RunDir
from orchestrator.runs import summary
from orchestrator.train.context import TrainContext
from orchestrator.train.watchdog import BACKSTOP_S, CHECK_S, Watchdog, for_context, stall_dir
from tests.conftest import ROOT
from tests.unit.test_loop import weights

SLACK_S = CHECK_S + 3  # detection within run.stall_timeout_s + this (the check interval, writing the stacks)


def test_a_stalled_thread_is_found_named_and_its_stacks_saved(tmp_path: Path) -> None:
    ctx = TrainContext(run=RunDir(str(tmp_path / "run")))
    ended: list[str] = []
    done = threading.Event()
    release = threading.Event()

    def blocked_here() -> None:
        dog = for_context(ctx, 1.0, lambda line: (ended.append(line), done.set()))
        dog.start()
        for step in range(3):  # progress, then none
            dog.tick(step)
        release.wait(30)
        dog.stop()

    worker = threading.Thread(target=blocked_here)
    worker.start()
    assert done.wait(1.0 + SLACK_S), "the watchdog did not fire within the timeout and the slack"
    release.set()
    worker.join()
    (line,) = ended
    assert line.startswith("stalled: rank 0 made no progress for ") and "at step 2, blocked in wait (threading.py:" in line
    (stacks,) = (tmp_path / "run" / "stalls").glob("*/rank-0.txt")
    assert "in blocked_here" in stacks.read_text().split("\n\n", 1)[1]  # faulthandler's dump names the frame
    assert RunDir(str(tmp_path / "run")).status()["state"] == "stalled"


def test_progress_keeps_it_quiet(tmp_path: Path) -> None:
    ctx = TrainContext(run=RunDir(str(tmp_path / "run")))
    fired = threading.Event()
    dog = for_context(ctx, 0.5, lambda line: fired.set()).start()
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            dog.tick()
            stop.wait(0.05)

    t = threading.Thread(target=busy)
    t.start()
    assert not fired.wait(0.5 * 2 + CHECK_S + 1)
    stop.set()
    t.join()
    dog.stop()


def pretrain(data: Path, storage: Path, *sets: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ORCHESTRATOR_INJECT_FAULT"}
    if fault:
        env["ORCHESTRATOR_INJECT_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.pretrain", str(ROOT / "recipes" / "smoke.yaml"), "--launcher", "local",
         "--set", f"data.train={data}/train", f"data.val={data}/val", "data.input_size=32", "data.num_workers=0",
         "data.shuffle_buffer=64", "batch.global_batch_size=32", "batch.per_device_max=32", "schedule.epochs=1",
         "run.log_every_steps=1", "run.checkpoint_every_steps=2", "run.stall_timeout_s=4", f"run.storage={storage}",
         *sets], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


def test_a_stalled_local_run_exits_with_the_line_and_the_rerun_resumes_exactly(synth_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "stalled"
    first = pretrain(synth_dir, tmp_path / "runs", "run.name=stall", fault=f"stall:5:0:{marker}")
    assert first.returncode == 1, first.stderr[-2000:]
    (line,) = [x for x in first.stderr.splitlines() if x.startswith("error: stalled: rank 0")]
    assert "at step 5, blocked in maybe_stall (faults.py:" in line and "resumes from the newest checkpoint" in line
    run = tmp_path / "runs" / "stall"
    (stacks,) = run.glob("stalls/*/rank-0.txt")
    assert "in maybe_stall" in stacks.read_text() and "in train_step" in stacks.read_text()
    assert stacks.stat().st_mtime - marker.stat().st_mtime <= 4 + SLACK_S  # detected within the timeout + slack
    assert summary(RunDir(str(run)))["state"] == "stalled at step 5"
    again = pretrain(synth_dir, tmp_path / "runs", "run.name=stall")
    assert again.returncode == 0, again.stderr[-2000:]
    resumes = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "resume"]
    assert [r["step"] for r in resumes] == [4]  # the newest checkpoint before the stall
    assert summary(RunDir(str(run)))["state"] == "finished"
    straight = pretrain(synth_dir, tmp_path / "runs", "run.name=straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    a, b = weights(run), weights(tmp_path / "runs" / "straight")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_the_limit_is_the_timeout_after_the_first_step_twice_it_before_and_off_while_a_peer_uploads() -> None:
    """The rules, pinned: a micro-batch alone does not end the start-up limit (torch.compile runs in the first
    forward and backward); the first finished optimizer step does. A rank that may wait for rank 0's upload (from a
    save to its next step) is not watched."""
    dog = Watchdog(10, 0, lambda line: None)
    assert not dog.due(19.9) and dog.due(20.0)
    dog.tick(0)  # micro-batch 0 yielded
    assert not dog.due(19.9) and dog.limit() == 20
    dog.step_done()
    assert not dog.due(9.9) and dog.due(10.0)
    dog.peer_waiting = True
    assert not dog.due(1e6)
    dog.step_done()
    assert dog.due(10.0)


def stuck_in_a_worker(release: Path) -> None:
    while not release.exists():  # the frame the stack file must name
        time.sleep(0.05)


class Stuck(torch.utils.data.Dataset):
    def __init__(self, release: Path) -> None:
        self.release = release

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        stuck_in_a_worker(self.release)
        return i


def test_a_dataloader_workers_frame_is_in_the_stack_file(tmp_path: Path) -> None:
    """The training thread only waits on the workers' queue; the file names where the worker is stuck."""
    from orchestrator.data.reader import ignore_stop_signals

    ctx = TrainContext(run=RunDir(str(tmp_path / "run")))
    ended: list[str] = []
    done = threading.Event()
    release = tmp_path / "release"

    def load() -> None:
        dog = for_context(ctx, 0.5, lambda line: (ended.append(line), done.set())).start()
        loader = torch.utils.data.DataLoader(Stuck(release), num_workers=1, worker_init_fn=ignore_stop_signals)
        list(loader)
        dog.stop()

    worker = threading.Thread(target=load)
    worker.start()
    try:
        assert done.wait(2 * 0.5 + SLACK_S)
    finally:
        release.touch()
        worker.join(60)
    (stacks,) = (tmp_path / "run" / "stalls").glob("*/rank-0.txt")
    text = stacks.read_text()
    assert "DataLoader worker (pid " in text and "in stuck_in_a_worker" in text.split("DataLoader worker", 1)[1]
    assert "stacks: " + str(stacks) in ended[0]  # a local run folder: written there directly
    assert not list((tmp_path / "run" / "stalls").glob("backstop-*"))  # the backstop's file was empty: gone


SLOW_DUMP = """
import os, signal, sys, threading, time

def dump(signum, frame):  # faulthandler writes a thread at a time; the stalled main thread comes last
    with open(os.path.join(sys.argv[1], f"worker-{os.getpid()}.txt"), "a") as f:
        f.write("Thread 0x1 (most recent call first):\\n")
        f.flush()
        time.sleep(0.15)
        f.write("  File \\"reader.py\\", line 1 in maybe_stall\\n")

signal.signal(signal.SIGUSR1, dump)
open(os.path.join(sys.argv[1], f"worker-{os.getpid()}.txt"), "w").close()
print("ready", flush=True)
threading.Event().wait(60)
"""


def test_a_worker_dump_written_a_thread_at_a_time_is_read_whole(tmp_path: Path) -> None:
    """The chaos run once found a DataLoader worker's dump cut after its first threads: read when it began."""
    dog = Watchdog(60, 0, lambda line: None, lambda name, data: name)
    dog._workers = tmp_path
    worker = subprocess.Popen([sys.executable, "-c", SLOW_DUMP, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None and worker.stdout.readline() == "ready\n"
        text = dog.worker_stacks().decode()
    finally:
        worker.kill()
        worker.wait()
    assert f"DataLoader worker (pid {worker.pid}):" in text and "in maybe_stall" in text


def test_ranks_sharing_a_stalls_folder_each_get_their_backstop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank of a node (every rank, for a run folder on shared disk) collects an earlier attempt's backstop file
    at start: one that another rank took first, or a folder another rank's stop removed, costs no rank its own."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    old = tmp_path / f"backstop-20260101T000000Z-rank-1-pid-{int(dead.stdout)}.txt"
    old.write_text("")
    real_collect = Watchdog._collect

    def taken_by_a_peer(self: Watchdog, path: Path) -> None:
        path.unlink()  # the other rank collected it between this one's listing and its look at it
        real_collect(self, path)

    monkeypatch.setattr(Watchdog, "_collect", taken_by_a_peer)
    dog = Watchdog(60, 0, lambda line: None, local_dir=tmp_path).start()
    try:
        assert [p.name for p in tmp_path.glob(f"backstop-*-pid-{os.getpid()}.txt")]
    finally:
        dog.stop()
    real_mkdir, removed = Path.mkdir, []

    def removed_by_a_peer(self: Path, *args: object, **kwargs: object) -> None:
        real_mkdir(self, *args, **kwargs)
        if self == tmp_path / "shared" and not removed:
            removed.append(self.rmdir())  # a peer's stop found the folder empty and removed it

    monkeypatch.setattr(Path, "mkdir", removed_by_a_peer)
    dog = Watchdog(60, 0, lambda line: None, local_dir=tmp_path / "shared").start()
    try:
        assert removed and [p.name for p in (tmp_path / "shared").glob(f"backstop-*-pid-{os.getpid()}.txt")]
    finally:
        dog.stop()


GIL_HANG = """
import ctypes, sys
from orchestrator.rundir import RunDir
from orchestrator.train.context import TrainContext
from orchestrator.train.watchdog import for_context

ctx = TrainContext(run=RunDir(sys.argv[1]))
for_context(ctx, 1.0, lambda line: print("the Python watchdog ran", flush=True)).start()

def hang_holding_the_gil():
    ctypes.PyDLL(None).sleep(120)  # a C call that keeps the GIL: no Python thread runs again

hang_holding_the_gil()
"""


def test_a_hang_holding_the_gil_ends_in_the_c_backstop_with_its_stacks(tmp_path: Path) -> None:
    """Neither the training thread nor the watchdog's can run; faulthandler's C thread writes the stacks and exits.
    With the run folder on object storage (memory:// stands in) the file stays on node-local disk and the next
    start of the run uploads it."""
    urls = (str(tmp_path / "run"), f"memory://gil-{tmp_path.name}/run")
    started = time.monotonic()
    hangs = [subprocess.Popen([sys.executable, "-c", GIL_HANG, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT) for url in urls]
    for hang, url in zip(hangs, urls, strict=True):
        out, err = hang.communicate(timeout=90)
        assert hang.returncode == 1 and "the Python watchdog ran" not in out, err[-2000:]
        assert time.monotonic() - started < 2 * 1.0 + CHECK_S + BACKSTOP_S + 20
        run = RunDir(url)
        (dump,) = stall_dir(run).glob("backstop-*.txt")
        assert "in hang_holding_the_gil" in dump.read_text() and "Thread" in dump.read_text()
    dog = for_context(TrainContext(run=run), 60, lambda line: None).start()  # the next start, here
    dog.stop()
    (uploaded,) = run.fs.glob(f"{run.path}/stalls/backstop-*.txt")
    assert "in hang_holding_the_gil" in run.fs.cat_file(uploaded).decode() and not list(stall_dir(run).glob("backstop-*"))


SLOW_UPLOADS = """
import sys, time
from orchestrator.pretrain import main
from orchestrator.rundir import RunDir

write = RunDir.write_checkpoint

def slowly(self, step, files, meta, progress=None):  # rank 0's upload moves (ticking its watchdog) but takes 4 s
    for _ in range(8):
        time.sleep(0.5)
        if progress is not None:
            progress()
    return write(self, step, files, meta, progress)

RunDir.write_checkpoint = slowly
sys.exit(main(sys.argv[1:]))
"""


def test_ranks_waiting_for_rank_0s_slow_upload_do_not_declare_a_stall(synth_dir: Path, tmp_path: Path) -> None:
    """Two torchrun ranks, run.stall_timeout_s=2, every checkpoint's upload 4 s: rank 1 waits for it in the next
    step's all-reduce and in the epoch end's barrier, longer than its timeout, and must not call that a stall."""
    script = tmp_path / "slow_uploads.py"
    script.write_text(SLOW_UPLOADS)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
         str(ROOT / "recipes" / "smoke.yaml"), "--launcher", "local", "--set", f"data.train={synth_dir}/train",
         f"data.val={synth_dir}/val", "data.input_size=32", "data.num_workers=0", "batch.global_batch_size=32",
         "batch.per_device_max=16", "schedule.epochs=1", "run.max_steps=7", "run.checkpoint_every_steps=3",
         "run.stall_timeout_s=2", "data.val=null", f"run.storage={tmp_path}/runs", "run.name=slow"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "slow"
    assert not list(run.glob("stalls/*/rank-*.txt")) and "stalled:" not in done.stderr
    assert [c.step for c in RunDir(str(run)).committed()][-1] == 7 and (run / "model.safetensors").exists()
