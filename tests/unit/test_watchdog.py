"""The stall watchdog: a rank that stops making progress is found, its stacks saved, the attempt ended, and
the run resumes from its newest checkpoint exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import torch

from orchestrator.rundir import RunDir
from orchestrator.runs import summary
from orchestrator.train.context import TrainContext
from orchestrator.train.watchdog import CHECK_S, for_context
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
